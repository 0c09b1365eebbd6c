import Foundation

/// Settings of the AWS EBS provider. Empty strings mean "find out": the
/// environment, then the instance metadata service (IMDSv2).
public struct AWSConfiguration: Sendable {
    public var region = ""
    public var instanceID = ""
    /// Default availability zone of new volumes; empty: this instance's.
    public var availabilityZone = ""
    /// EC2 API endpoint; empty: https://ec2.<region>.amazonaws.com.
    public var endpoint = ""
    /// The instance metadata service (tests point it at a local fake).
    public var imdsEndpoint = "http://169.254.169.254"
    public var accessKeyID = ""
    public var secretAccessKey = ""
    public var sessionToken = ""
    /// Defaults of new volumes: io2 is the type with multi-attach.
    public var volumeType = "io2"
    public var iops = 3000
    public var retry = CloudRetryPolicy()
    /// One HTTP exchange (retries come on top).
    public var callTimeout: Duration = .seconds(30)
    public var discovery = DeviceDiscovery()

    public init() {}
}

/// AWS EBS through the EC2 Query API (version 2016-11-15), signed with SigV4,
/// over libcurl. Throttling, 5xx and unreachable endpoints are retried with
/// backoff until `retry.deadline`; every other error is thrown at once as
/// `VolumeError.cloud` with EC2's code and message.
public final class EBSCloudProvider: CloudProvider, @unchecked Sendable {
    public let name = "aws"
    public let configuration: AWSConfiguration
    let environment: [String: String]
    let http: HTTPClient
    private let lock = NSLock()
    private var cachedCredentials: (AWSCredentials, expires: Date)?
    private var cachedRegion: String?
    private var cachedInstanceID: String?
    private var cachedZone: String?
    /// Called before each retry of a transient failure (logs, tests).
    public var onRetry: @Sendable (VolumeError) -> Void = { _ in }

    static let apiVersion = "2016-11-15"

    public init(configuration: AWSConfiguration, environment: [String: String] = ProcessInfo.processInfo.environment) {
        self.configuration = configuration
        self.environment = environment
        self.http = HTTPClient(timeout: configuration.callTimeout)
    }

    // MARK: Identity

    /// AWS_REGION / AWS_DEFAULT_REGION, the configuration, else IMDS placement/region.
    public func region() async throws -> String {
        if let r = lock.withLock({ cachedRegion }) { return r }
        var r = environment["AWS_REGION"] ?? environment["AWS_DEFAULT_REGION"] ?? ""
        if r.isEmpty { r = configuration.region }
        if r.isEmpty { r = try await imds("/latest/meta-data/placement/region") }
        lock.withLock { cachedRegion = r }
        return r
    }

    /// INSTANCE_ID, the configuration, else IMDS instance-id.
    public func instanceID() async throws -> String {
        if let i = lock.withLock({ cachedInstanceID }) { return i }
        var i = environment["INSTANCE_ID"] ?? ""
        if i.isEmpty { i = configuration.instanceID }
        if i.isEmpty { i = try await imds("/latest/meta-data/instance-id") }
        lock.withLock { cachedInstanceID = i }
        return i
    }

    func defaultZone() async throws -> String {
        if !configuration.availabilityZone.isEmpty { return configuration.availabilityZone }
        if let z = lock.withLock({ cachedZone }) { return z }
        let z = try await imds("/latest/meta-data/placement/availability-zone")
        lock.withLock { cachedZone = z }
        return z
    }

    /// The environment's keys, the configuration's, else the instance profile's
    /// temporary keys from IMDS (cached until five minutes before they expire).
    public func credentials() async throws -> AWSCredentials {
        let env = environment
        if let id = env["AWS_ACCESS_KEY_ID"], let secret = env["AWS_SECRET_ACCESS_KEY"], !id.isEmpty, !secret.isEmpty {
            return AWSCredentials(accessKeyID: id, secretAccessKey: secret, sessionToken: env["AWS_SESSION_TOKEN"] ?? "")
        }
        if !configuration.accessKeyID.isEmpty {
            guard !configuration.secretAccessKey.isEmpty else {
                throw VolumeError.credentials("an AWS access key ID is configured without its secret access key")
            }
            return AWSCredentials(accessKeyID: configuration.accessKeyID, secretAccessKey: configuration.secretAccessKey,
                                  sessionToken: configuration.sessionToken)
        }
        if let (c, expires) = lock.withLock({ cachedCredentials }), expires.timeIntervalSinceNow > 300 { return c }
        let role: String
        do {
            role = try await imds("/latest/meta-data/iam/security-credentials/").split(separator: "\n").first.map(String.init) ?? ""
        } catch {
            throw VolumeError.credentials("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, configure them, "
                                          + "or give the instance a role (instance metadata: \(error))")
        }
        guard !role.isEmpty else { throw VolumeError.credentials("the instance has no IAM role and no AWS keys are set") }
        let raw = try await imds("/latest/meta-data/iam/security-credentials/" + role)
        struct Wire: Decodable {
            var AccessKeyId: String
            var SecretAccessKey: String
            var Token: String
            var Expiration: String
        }
        guard let wire = try? JSONDecoder().decode(Wire.self, from: Data(raw.utf8)) else {
            throw VolumeError.credentials("the instance metadata service sent credentials of role \(role) that do not decode")
        }
        let c = AWSCredentials(accessKeyID: wire.AccessKeyId, secretAccessKey: wire.SecretAccessKey, sessionToken: wire.Token)
        let expires = ISO8601DateFormatter().date(from: wire.Expiration) ?? Date(timeIntervalSinceNow: 600)
        lock.withLock { cachedCredentials = (c, expires) }
        return c
    }

    /// GETs a metadata path with an IMDSv2 session token.
    func imds(_ path: String) async throws -> String {
        try await MetadataService(provider: name, endpoint: configuration.imdsEndpoint, ttlHeader: "X-aws-ec2-metadata-token-ttl-seconds",
                                  tokenHeader: "X-aws-ec2-metadata-token", retry: configuration.retry).get(path, onRetry: onRetry)
    }

    // MARK: CloudProvider

    public func createVolume(_ spec: VolumeSpec) async throws -> CloudVolume {
        let type = spec.type.isEmpty ? configuration.volumeType : spec.type
        let zone = spec.availabilityZone.isEmpty ? try await defaultZone() : spec.availabilityZone
        var p: [(String, String)] = [("Size", "\(spec.sizeGiB)"), ("VolumeType", type), ("AvailabilityZone", zone)]
        // io1/io2 require Iops; only they take MultiAttachEnabled.
        if let iops = spec.iops ?? (["io1", "io2"].contains(type) ? configuration.iops : nil) { p.append(("Iops", "\(iops)")) }
        if let throughput = spec.throughputMiBps { p.append(("Throughput", "\(throughput)")) }
        if spec.multiAttach { p.append(("MultiAttachEnabled", "true")) }
        // A token per create makes the retries of one create idempotent.
        p.append(("ClientToken", spec.idempotencyToken.isEmpty ? UUID().uuidString : spec.idempotencyToken))
        if !spec.tags.isEmpty {
            p.append(("TagSpecification.1.ResourceType", "volume"))
            for (n, tag) in spec.tags.sorted(by: { $0.key < $1.key }).enumerated() {
                p += [("TagSpecification.1.Tag.\(n + 1).Key", tag.key), ("TagSpecification.1.Tag.\(n + 1).Value", tag.value)]
            }
        }
        return Self.volume(try await call("CreateVolume", p))
    }

    public func attachVolume(_ volumeID: String, instanceID: String, readOnly: Bool) async throws -> VolumeAttachment {
        // EC2 wants a device name unused on that instance; NVMe hosts ignore it
        // (see DeviceDiscovery), so any free /dev/sd[f-p] does.
        let mine = try await call("DescribeVolumes", [("Filter.1.Name", "attachment.instance-id"), ("Filter.1.Value.1", instanceID)])
        let used = Set(mine.items("volumeSet").flatMap { Self.volume($0).attachments }.filter { $0.instanceID == instanceID }.map(\.device))
        guard let device = "fghijklmnop".map({ "/dev/sd\($0)" }).first(where: { !used.contains($0) }) else {
            throw VolumeError.failed("instance \(instanceID) has no free device name for volume \(volumeID) (sdf–sdp in use)")
        }
        let answer = try await call("AttachVolume", [("VolumeId", volumeID), ("InstanceId", instanceID), ("Device", device)])
        return VolumeAttachment(instanceID: answer["instanceId"].isEmpty ? instanceID : answer["instanceId"],
                                state: AttachmentState(rawValue: answer["status"]) ?? .unknown,
                                device: answer["device"].isEmpty ? device : answer["device"])
    }

    public func detachVolume(_ volumeID: String, instanceID: String) async throws {
        _ = try await call("DetachVolume", [("VolumeId", volumeID), ("InstanceId", instanceID)])
    }

    /// `Force=true`: EBS detaches even while the instance still uses the volume
    /// (a plain detach of a mounted volume can sit in `busy` for ever); the
    /// instance's unflushed writes are lost, and its I/O fails from then on.
    public func forceDetachVolume(_ volumeID: String, instanceID: String) async throws {
        _ = try await call("DetachVolume", [("VolumeId", volumeID), ("InstanceId", instanceID), ("Force", "true")])
    }

    public func deleteVolume(_ volumeID: String) async throws {
        _ = try await call("DeleteVolume", [("VolumeId", volumeID)])
    }

    public func describeVolumes(_ volumeIDs: [String], nextToken: String?, maxResults: Int?) async throws -> VolumePage {
        var p: [(String, String)] = volumeIDs.enumerated().map { ("VolumeId.\($0.offset + 1)", $0.element) }
        // EC2 takes MaxResults (5…500) only without volume IDs.
        if volumeIDs.isEmpty, let maxResults { p.append(("MaxResults", "\(min(500, max(5, maxResults)))")) }
        if let nextToken { p.append(("NextToken", nextToken)) }
        let answer = try await call("DescribeVolumes", p)
        let token = answer["nextToken"]
        return VolumePage(volumes: answer.items("volumeSet").map(Self.volume), nextToken: token.isEmpty ? nil : token)
    }

    public func localDevice(of volumeID: String, instanceID: String) async throws -> String? {
        configuration.discovery.ebsDevice(volumeID)
    }

    // MARK: Wire

    /// One EC2 action: a signed form POST; retried while transient.
    func call(_ action: String, _ parameters: [(String, String)]) async throws -> XMLTree {
        let region = try await region()
        let endpoint = configuration.endpoint.isEmpty ? "https://ec2.\(region).amazonaws.com" : configuration.endpoint
        guard let url = URL(string: endpoint), let host = url.host else {
            throw VolumeError.invalidArgument("the EC2 endpoint \"\(endpoint)\" is not a URL")
        }
        let hostHeader = url.port.map { "\(host):\($0)" } ?? host
        let body = Data(formEncode([("Action", action), ("Version", Self.apiVersion)] + parameters).utf8)
        return try await configuration.retry.run("EC2 \(action)", onRetry: onRetry) {
            let credentials = try await credentials()
            let signed = SigV4Signer(service: "ec2", region: region).sign(
                method: "POST", host: hostHeader, path: url.path.isEmpty ? "/" : url.path, query: "",
                headers: [("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")],
                body: body, credentials: credentials, date: Date())
            let response = try await http.send(HTTPRequest(method: "POST", url: endpoint, headers: signed.headers, body: body))
            let xml = XMLTree.parse(response.body)
            guard response.status == 200 else {
                throw VolumeError.cloud(CloudAPIError(
                    provider: name, action: action,
                    code: xml?.find("Code")?.text ?? "HTTP \(response.status)",
                    message: xml?.find("Message")?.text ?? String(response.text.prefix(300)),
                    httpStatus: response.status,
                    requestID: xml?.find("RequestID")?.text ?? xml?.find("RequestId")?.text ?? ""))
            }
            guard let xml else { throw VolumeError.failed("EC2 \(action) answered with a body that is not XML: \(response.text.prefix(200))") }
            return xml
        }
    }

    static func volume(_ e: XMLTree) -> CloudVolume {
        CloudVolume(
            volumeID: e["volumeId"], sizeBytes: (Int(e["size"]) ?? 0) << 30, type: e["volumeType"],
            iops: Int(e["iops"]), throughputMiBps: Int(e["throughput"]), multiAttach: e["multiAttachEnabled"] == "true",
            availabilityZone: e["availabilityZone"], state: VolumeState(rawValue: e["status"]) ?? .unknown,
            attachments: e.items("attachmentSet").map {
                VolumeAttachment(instanceID: $0["instanceId"], state: AttachmentState(rawValue: $0["status"]) ?? .unknown, device: $0["device"])
            },
            tags: Dictionary(e.items("tagSet").map { ($0["key"], $0["value"]) }, uniquingKeysWith: { a, _ in a }))
    }
}
