import CCurl
import Foundation
import Metadata

/// Turns what curl and etcd report into `MetadataError`, so the retry wrapper
/// retries exactly what is worth retrying.
enum EtcdErrors {
    /// A transfer that failed inside curl (no HTTP answer).
    static func fromCurl(_ code: CURLcode, detail: String, endpoint: String) -> MetadataError {
        let text = "\(endpoint): \(detail.isEmpty ? String(cString: curl_easy_strerror(code)) : detail)"
        switch code {
        case CURLE_OPERATION_TIMEDOUT:
            return .timeout(text)
        case CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_RESOLVE_PROXY,
             CURLE_GOT_NOTHING, CURLE_SEND_ERROR, CURLE_RECV_ERROR, CURLE_PARTIAL_FILE,
             CURLE_SSL_CONNECT_ERROR:
            return .unavailable(text)
        default:
            return .failed(text)
        }
    }

    /// Whether the request surely never reached the server, so another endpoint
    /// may be tried at once without risking a double write.
    static func neverSent(_ code: CURLcode) -> Bool {
        code == CURLE_COULDNT_CONNECT || code == CURLE_COULDNT_RESOLVE_HOST || code == CURLE_SSL_CONNECT_ERROR
    }

    /// An HTTP answer that is not 200: etcd's `{"error","message","code"}` body.
    static func fromHTTP(status: Int, body: Data, endpoint: String) -> MetadataError {
        let wire = try? JSONDecoder().decode(WireError.self, from: body)
        let message = wire?.text ?? String(decoding: body.prefix(300), as: UTF8.self)
        return fromStatus(grpcCode: wire?.code, message: message, httpStatus: status, endpoint: endpoint)
    }

    /// A gRPC status (from an HTTP error body or a canceled watch).
    static func fromStatus(grpcCode: Int?, message: String, httpStatus: Int = 0, endpoint: String) -> MetadataError {
        let text = "\(endpoint): \(message.isEmpty ? "HTTP \(httpStatus)" : message)"
        let lower = message.lowercased()
        if isAuthFailure(grpcCode: grpcCode, message: lower) { return .unauthorized(text) }
        if grpcCode == 4 || lower.contains("deadline exceeded") { return .timeout(text) }
        if grpcCode == 14 || httpStatus == 503 || lower.contains("leader changed") || lower.contains("no leader")
            || lower.contains("request timed out") || lower.contains("too many requests") {
            return .unavailable(text)
        }
        if grpcCode == 5 { return .notFound(text) }
        if grpcCode == 3 { return .invalidArgument(text) }
        return .failed(text)
    }

    static func isAuthFailure(grpcCode: Int?, message: String) -> Bool {
        let lower = message.lowercased()
        return grpcCode == 16 || grpcCode == 7 || lower.contains("authentication failed")
            || lower.contains("invalid auth token") || lower.contains("user name is empty")
            || lower.contains("permission denied") || lower.contains("unauthenticated")
    }

    /// The token is stale or missing (as opposed to wrong credentials): worth one
    /// fresh authentication.
    static func isStaleToken(_ message: String) -> Bool {
        let lower = message.lowercased()
        return lower.contains("invalid auth token") || lower.contains("user name is empty")
            || lower.contains("auth token is not provided")
    }
}
