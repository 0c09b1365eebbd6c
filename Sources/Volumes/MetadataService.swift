/// The instance metadata services of EC2 (IMDSv2) and ECS (hardened mode) work
/// alike: a PUT for a session token, then GETs that carry it. Off the cloud the
/// service does not answer at all, so its retries stop after 10 s (or the
/// configured deadline if shorter) with an error that says what to configure.
struct MetadataService: Sendable {
    let provider: String
    let endpoint: String
    /// Header of the token request (its TTL) and of the reads (the token).
    let ttlHeader: String
    let tokenHeader: String
    let retry: CloudRetryPolicy
    let http = HTTPClient(timeout: .seconds(5))

    func get(_ path: String, onRetry: (VolumeError) -> Void) async throws -> String {
        var policy = retry
        policy.deadline = min(retry.deadline, .seconds(10))
        do {
            return try await policy.run("\(provider) instance metadata \(path)", onRetry: onRetry) {
                let token = try await http.send(HTTPRequest(method: "PUT", url: endpoint + "/latest/api/token", headers: [(ttlHeader, "300")]))
                guard token.status == 200 else { throw failure(path, token) }
                let answer = try await http.send(HTTPRequest(method: "GET", url: endpoint + path, headers: [(tokenHeader, token.text)]))
                guard answer.status == 200 else { throw failure(path, answer) }
                return answer.text.trimmingCharacters(in: .whitespacesAndNewlines)
            }
        } catch VolumeError.timedOut(let text) {
            throw VolumeError.timedOut("\(text); the instance metadata service at \(endpoint) does not answer: "
                                       + "off the cloud, configure the region, the instance ID and the keys")
        }
    }

    private func failure(_ path: String, _ response: HTTPResponse) -> VolumeError {
        .cloud(CloudAPIError(provider: provider, action: "instance metadata \(path)", code: "HTTP \(response.status)",
                             message: String(response.text.prefix(200)), httpStatus: response.status))
    }
}
