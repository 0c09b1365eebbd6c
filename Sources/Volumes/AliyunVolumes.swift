import Foundation

/// Settings of the Aliyun ESSD provider. Empty strings mean "find out": the
/// environment, then the ECS metadata service.
public struct AliyunConfiguration: Sendable {
    public var region = ""
    public var instanceID = ""
    /// Zone of new disks; empty: this instance's.
    public var zone = ""
    /// ECS API endpoint; empty: https://ecs.<region>.aliyuncs.com.
    public var endpoint = ""
    /// The ECS metadata service (tests point it at a local fake).
    public var metadataEndpoint = "http://100.100.100.200"
    public var accessKeyID = ""
    public var accessKeySecret = ""
    public var securityToken = ""
    /// Defaults of new disks: ESSD, which has multi-attach.
    public var diskCategory = "cloud_essd"
    public var performanceLevel = "PL1"
    public var retry = CloudRetryPolicy()
    public var callTimeout: Duration = .seconds(30)
    public var discovery = DeviceDiscovery()

    public init() {}
}

/// Aliyun ESSD disks through the ECS RPC API (2014-05-26), signed with V3
/// (`ACS3-HMAC-SHA256`), over libcurl. Throttling and 5xx are retried with
/// backoff until `retry.deadline`; everything else is thrown at once as
/// `VolumeError.cloud` with ECS's code and message.
///
/// ECS lists a multi-attach disk's attachments without a state of their own:
/// an instance listed there is `attached`, or `attaching`/`detaching` while the
/// disk's status says so.
public final class ECSCloudProvider: CloudProvider, @unchecked Sendable {
    public let name = "aliyun"
    public let configuration: AliyunConfiguration
    let environment: [String: String]
    let http: HTTPClient
    private let lock = NSLock()
    private var cachedRegion: String?
    private var cachedInstanceID: String?
    private var cachedZone: String?
    private var cachedCredentials: (AliyunCredentials, expires: Date)?
    public var onRetry: @Sendable (VolumeError) -> Void = { _ in }

    static let apiVersion = "2014-05-26"

    public init(configuration: AliyunConfiguration, environment: [String: String] = ProcessInfo.processInfo.environment) {
        self.configuration = configuration
        self.environment = environment
        self.http = HTTPClient(timeout: configuration.callTimeout)
    }

    // MARK: Identity

    public func region() async throws -> String {
        try await cached(\.cachedRegion, environment["ALIBABA_CLOUD_REGION_ID"] ?? "", configuration.region, "/latest/meta-data/region-id")
    }

    public func instanceID() async throws -> String {
        try await cached(\.cachedInstanceID, environment["INSTANCE_ID"] ?? "", configuration.instanceID, "/latest/meta-data/instance-id")
    }

    func defaultZone() async throws -> String {
        try await cached(\.cachedZone, "", configuration.zone, "/latest/meta-data/zone-id")
    }

    private func cached(_ slot: ReferenceWritableKeyPath<ECSCloudProvider, String?>, _ env: String, _ config: String,
                        _ path: String) async throws -> String {
        if let v = lock.withLock({ self[keyPath: slot] }) { return v }
        var v = env.isEmpty ? config : env
        if v.isEmpty { v = try await metadata(path) }
        lock.withLock { self[keyPath: slot] = v }
        return v
    }

    /// ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET (and _SECURITY_TOKEN), else the
    /// configuration, else the instance's RAM role's temporary keys from the
    /// metadata service (cached until five minutes before they expire).
    public func credentials() async throws -> AliyunCredentials {
        if let id = environment["ALIBABA_CLOUD_ACCESS_KEY_ID"], let secret = environment["ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
           !id.isEmpty, !secret.isEmpty {
            return AliyunCredentials(accessKeyID: id, accessKeySecret: secret, securityToken: environment["ALIBABA_CLOUD_SECURITY_TOKEN"] ?? "")
        }
        if !configuration.accessKeyID.isEmpty {
            guard !configuration.accessKeySecret.isEmpty else {
                throw VolumeError.credentials("an Aliyun AccessKey ID is configured without its secret")
            }
            return AliyunCredentials(accessKeyID: configuration.accessKeyID, accessKeySecret: configuration.accessKeySecret,
                                     securityToken: configuration.securityToken)
        }
        if let (c, expires) = lock.withLock({ cachedCredentials }), expires.timeIntervalSinceNow > 300 { return c }
        let role: String
        do {
            role = try await metadata("/latest/meta-data/ram/security-credentials/").split(separator: "\n").first.map(String.init) ?? ""
        } catch {
            throw VolumeError.credentials("no Aliyun credentials: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET, "
                                          + "configure both keys, or give the instance a RAM role (metadata service: \(error))")
        }
        guard !role.isEmpty else { throw VolumeError.credentials("the instance has no RAM role and no Aliyun keys are set") }
        struct Wire: Decodable {
            var AccessKeyId: String
            var AccessKeySecret: String
            var SecurityToken: String
            var Expiration: String
        }
        let raw = try await metadata("/latest/meta-data/ram/security-credentials/" + role)
        guard let wire = try? JSONDecoder().decode(Wire.self, from: Data(raw.utf8)) else {
            throw VolumeError.credentials("the metadata service sent credentials of RAM role \(role) that do not decode")
        }
        let c = AliyunCredentials(accessKeyID: wire.AccessKeyId, accessKeySecret: wire.AccessKeySecret, securityToken: wire.SecurityToken)
        let expires = ISO8601DateFormatter().date(from: wire.Expiration) ?? Date(timeIntervalSinceNow: 600)
        lock.withLock { cachedCredentials = (c, expires) }
        return c
    }

    /// A metadata path, with the metadata service's session token (hardened mode).
    func metadata(_ path: String) async throws -> String {
        try await MetadataService(provider: name, endpoint: configuration.metadataEndpoint, ttlHeader: "X-aliyun-ecs-metadata-token-ttl-seconds",
                                  tokenHeader: "X-aliyun-ecs-metadata-token", retry: configuration.retry).get(path, onRetry: onRetry)
    }

    // MARK: CloudProvider

    public func createVolume(_ spec: VolumeSpec) async throws -> CloudVolume {
        let category = spec.type.isEmpty ? configuration.diskCategory : spec.type
        let zone = spec.availabilityZone.isEmpty ? try await defaultZone() : spec.availabilityZone
        var p: [(String, String)] = [("RegionId", try await region()), ("ZoneId", zone), ("DiskCategory", category),
                                     ("Size", "\(spec.sizeGiB)")]
        if category == "cloud_essd" { p.append(("PerformanceLevel", configuration.performanceLevel)) }
        // Only ESSD AutoPL (cloud_auto) takes provisioned IOPS; throughput has no parameter.
        if let iops = spec.iops, category == "cloud_auto" { p += [("ProvisionedIops", "\(iops)"), ("BurstingEnabled", "false")] }
        if spec.multiAttach { p.append(("MultiAttach", "Enabled")) }
        p.append(("ClientToken", spec.idempotencyToken.isEmpty ? UUID().uuidString : spec.idempotencyToken))
        for (n, tag) in spec.tags.sorted(by: { $0.key < $1.key }).enumerated() {
            p += [("Tag.\(n + 1).Key", tag.key), ("Tag.\(n + 1).Value", tag.value)]
        }
        let answer = try await call("CreateDisk", p)
        guard let id = answer["DiskId"] as? String else { throw VolumeError.failed("ECS CreateDisk answered without a DiskId") }
        // The create answers only the ID; a describe fills in the rest (it may briefly not list it yet).
        return (try? await describeVolume(id))
            ?? CloudVolume(volumeID: id, sizeBytes: spec.sizeGiB << 30, type: category, multiAttach: spec.multiAttach,
                           availabilityZone: zone, state: .creating, tags: spec.tags)
    }

    public func attachVolume(_ volumeID: String, instanceID: String, readOnly: Bool) async throws -> VolumeAttachment {
        _ = try await call("AttachDisk", [("InstanceId", instanceID), ("DiskId", volumeID), ("DeleteWithInstance", "false")])
        return VolumeAttachment(instanceID: instanceID, state: .attaching)
    }

    public func detachVolume(_ volumeID: String, instanceID: String) async throws {
        _ = try await call("DetachDisk", [("InstanceId", instanceID), ("DiskId", volumeID)])
    }

    /// ECS's `DetachDisk` has no forced form (its `DeleteWithInstance` is about
    /// releasing a disk with its instance, not about forcing): the same call as
    /// `detachVolume`, which ECS carries out with the instance Running or
    /// Stopped, whatever the guest does. `fence` then waits until the disk no
    /// longer lists the instance.
    public func forceDetachVolume(_ volumeID: String, instanceID: String) async throws {
        try await detachVolume(volumeID, instanceID: instanceID)
    }

    public func deleteVolume(_ volumeID: String) async throws {
        _ = try await call("DeleteDisk", [("DiskId", volumeID)])
    }

    public func describeVolumes(_ volumeIDs: [String], nextToken: String?, maxResults: Int?) async throws -> VolumePage {
        var p: [(String, String)] = [("RegionId", try await region())]
        if !volumeIDs.isEmpty {
            let list = String(decoding: try JSONEncoder().encode(volumeIDs), as: UTF8.self)
            p.append(("DiskIds", list))
        }
        if let maxResults { p.append(("MaxResults", "\(min(500, max(1, maxResults)))")) }
        if let nextToken { p.append(("NextToken", nextToken)) }
        let answer = try await call("DescribeDisks", p)
        let disks = ((answer["Disks"] as? [String: Any])?["Disk"] as? [[String: Any]]) ?? []
        let volumes = disks.map(Self.volume)
        // ECS answers no error for an unknown ID in DiskIds, only fewer disks.
        if let missing = volumeIDs.first(where: { id in !volumes.contains { $0.volumeID == id } }) {
            throw VolumeError.notFound(missing)
        }
        let token = answer["NextToken"] as? String ?? ""
        return VolumePage(volumes: volumes, nextToken: token.isEmpty ? nil : token)
    }

    public func localDevice(of volumeID: String, instanceID: String) async throws -> String? {
        configuration.discovery.aliyunDevice(volumeID)
    }

    // MARK: Wire

    /// One ECS action: parameters in the query string of a signed POST; retried while transient.
    func call(_ action: String, _ parameters: [(String, String)]) async throws -> [String: Any] {
        let region = try await region()
        let endpoint = configuration.endpoint.isEmpty ? "https://ecs.\(region).aliyuncs.com" : configuration.endpoint
        guard let url = URL(string: endpoint), let host = url.host else {
            throw VolumeError.invalidArgument("the ECS endpoint \"\(endpoint)\" is not a URL")
        }
        let hostHeader = url.port.map { "\(host):\($0)" } ?? host
        let path = url.path.isEmpty ? "/" : url.path
        let query = ACS3Signer.canonicalQuery(parameters)
        let raw = try await configuration.retry.run("ECS \(action)", onRetry: onRetry) { () async throws -> Data in
            let signed = ACS3Signer().sign(method: "POST", host: hostHeader, path: path, query: parameters, action: action,
                                           version: Self.apiVersion, body: Data(), credentials: try await credentials(), date: Date(),
                                           nonce: UUID().uuidString)
            let response = try await http.send(HTTPRequest(method: "POST", url: endpoint + (url.path.isEmpty ? "/" : "") + "?" + query,
                                                           headers: signed.headers))
            guard response.status == 200 else {
                let json = (try? JSONSerialization.jsonObject(with: response.body)) as? [String: Any]
                throw VolumeError.cloud(CloudAPIError(
                    provider: name, action: action, code: json?["Code"] as? String ?? "HTTP \(response.status)",
                    message: json?["Message"] as? String ?? String(response.text.prefix(300)),
                    httpStatus: response.status, requestID: json?["RequestId"] as? String ?? ""))
            }
            return response.body
        }
        guard let json = (try? JSONSerialization.jsonObject(with: raw)) as? [String: Any] else {
            throw VolumeError.failed("ECS \(action) answered with a body that is not a JSON object")
        }
        return json
    }

    static func volume(_ d: [String: Any]) -> CloudVolume {
        let status = d["Status"] as? String ?? ""
        let state: VolumeState = switch status {
        case "Available": .available
        case "In_use", "Attaching", "Detaching": .inUse
        case "Creating": .creating
        default: .unknown
        }
        let attachmentState: AttachmentState = status == "Attaching" ? .attaching : status == "Detaching" ? .detaching : .attached
        let attachments = ((d["Attachments"] as? [String: Any])?["Attachment"] as? [[String: Any]]) ?? []
        let tags = ((d["Tags"] as? [String: Any])?["Tag"] as? [[String: Any]]) ?? []
        return CloudVolume(
            volumeID: d["DiskId"] as? String ?? "", sizeBytes: ((d["Size"] as? Int) ?? 0) << 30, type: d["Category"] as? String ?? "",
            iops: d["IOPS"] as? Int, multiAttach: d["MultiAttach"] as? String == "Enabled", availabilityZone: d["ZoneId"] as? String ?? "",
            state: state,
            attachments: attachments.map {
                VolumeAttachment(instanceID: $0["InstanceId"] as? String ?? "", state: attachmentState, device: $0["Device"] as? String ?? "")
            },
            tags: Dictionary(tags.map { ($0["TagKey"] as? String ?? "", $0["TagValue"] as? String ?? "") }, uniquingKeysWith: { a, _ in a }))
    }
}
