import Foundation

/// A node's YAML configuration file (the keys of Sources/ShardNode/Configuration.swift,
/// config/example.yaml), for tests that start `shardfs` with `--config` or a
/// `config=` mount option. Only the keys set are written: a key left nil keeps
/// the node's default. ShardNodeTests checks that every key here loads as meant.
public struct NodeConfigFile: Sendable {
    public var nodeID: String?
    public var instanceID: String?
    public var dataDir: String?
    /// `server.address`: the batch service's TCP listen address (host:port).
    public var listen: String?
    /// `server.handshake_timeout_ms`.
    public var handshakeTimeoutMs: Int?
    public var cloud = Cloud()
    /// nil: the embedded metadata store (the default).
    public var etcd: Etcd?
    /// `shard.size_limit`, as "16MiB".
    public var shardSizeLimit: String?
    public var backup = Backup()

    public struct Cloud: Sendable {
        /// folder | loop | aws | aliyun
        public var provider: String?
        public var region: String?
        public var endpoint: String?
        public var accessKeyID: String?
        public var secretAccessKey: String?
        public var volumeRoot: String?
        /// The loop provider's image folder.
        public var imageDir: String?
        /// As "64MiB".
        public var volumeSize: String?
        public var initialVolumes: Int?
        public var retryDeadlineSeconds: Int?

        public init(provider: String? = nil, region: String? = nil, endpoint: String? = nil, accessKeyID: String? = nil,
                    secretAccessKey: String? = nil, volumeRoot: String? = nil, imageDir: String? = nil,
                    volumeSize: String? = nil, initialVolumes: Int? = nil, retryDeadlineSeconds: Int? = nil) {
            self.provider = provider
            self.region = region
            self.endpoint = endpoint
            self.accessKeyID = accessKeyID
            self.secretAccessKey = secretAccessKey
            self.volumeRoot = volumeRoot
            self.imageDir = imageDir
            self.volumeSize = volumeSize
            self.initialVolumes = initialVolumes
            self.retryDeadlineSeconds = retryDeadlineSeconds
        }
    }

    /// `metadata.type: etcd` and its settings.
    public struct Etcd: Sendable {
        public var endpoints: [String]
        public var namespace: String?
        /// `metadata.options.lease_ttl_s`.
        public var leaseTTLSeconds: Int?
        /// `metadata.retry.deadline_ms`.
        public var retryDeadlineMs: Int?

        public init(endpoints: [String], namespace: String? = nil, leaseTTLSeconds: Int? = nil, retryDeadlineMs: Int? = nil) {
            self.endpoints = endpoints
            self.namespace = namespace
            self.leaseTTLSeconds = leaseTTLSeconds
            self.retryDeadlineMs = retryDeadlineMs
        }
    }

    public struct Backup: Sendable {
        public var viewIntervalMs: Int?
        public var failoverDelayMs: Int?
        public var automaticFailover: Bool?

        public init(viewIntervalMs: Int? = nil, failoverDelayMs: Int? = nil, automaticFailover: Bool? = nil) {
            self.viewIntervalMs = viewIntervalMs
            self.failoverDelayMs = failoverDelayMs
            self.automaticFailover = automaticFailover
        }
    }

    public init(nodeID: String? = nil, instanceID: String? = nil, dataDir: String? = nil, listen: String? = nil,
                handshakeTimeoutMs: Int? = nil, cloud: Cloud = Cloud(), etcd: Etcd? = nil, shardSizeLimit: String? = nil,
                backup: Backup = Backup()) {
        self.nodeID = nodeID
        self.instanceID = instanceID
        self.dataDir = dataDir
        self.listen = listen
        self.handshakeTimeoutMs = handshakeTimeoutMs
        self.cloud = cloud
        self.etcd = etcd
        self.shardSizeLimit = shardSizeLimit
        self.backup = backup
    }

    /// The YAML text: the sections with a key set, in a fixed order; strings quoted.
    public var yaml: String {
        var out = ""
        func section(_ name: String, _ entries: [(String, Value?)], indent: String = "") {
            let set = entries.compactMap { key, value in value.map { (key, $0) } }
            guard !set.isEmpty else { return }
            out += indent + name + ":\n"
            for (key, value) in set {
                switch value {
                case .scalar(let text): out += indent + "  \(key): \(text)\n"
                case .section(let nested): section(key, nested, indent: indent + "  ")
                }
            }
        }
        section("node", [("node_id", .string(nodeID)), ("instance_id", .string(instanceID)), ("data_dir", .string(dataDir))])
        section("server", [("address", .string(listen)), ("handshake_timeout_ms", .number(handshakeTimeoutMs))])
        section("cloud", [
            ("provider", .string(cloud.provider)), ("region", .string(cloud.region)), ("endpoint", .string(cloud.endpoint)),
            ("access_key_id", .string(cloud.accessKeyID)), ("secret_access_key", .string(cloud.secretAccessKey)),
            ("volume_root", .string(cloud.volumeRoot)), ("image_dir", .string(cloud.imageDir)),
            ("volume_size", .string(cloud.volumeSize)), ("initial_volumes", .number(cloud.initialVolumes)),
            ("retry_deadline_s", .number(cloud.retryDeadlineSeconds)),
        ])
        if let etcd {
            section("metadata", [
                ("type", .string("etcd")),
                ("endpoints", .scalar("[" + etcd.endpoints.map(Self.quoted).joined(separator: ", ") + "]")),
                ("namespace", .string(etcd.namespace)),
                ("options", .section([("lease_ttl_s", .number(etcd.leaseTTLSeconds))])),
                ("retry", .section([("deadline_ms", .number(etcd.retryDeadlineMs))])),
            ])
        }
        section("shard", [("size_limit", .string(shardSizeLimit))])
        section("backup", [
            ("view_interval_ms", .number(backup.viewIntervalMs)), ("failover_delay_ms", .number(backup.failoverDelayMs)),
            ("automatic_failover", backup.automaticFailover.map { .scalar($0 ? "true" : "false") }),
        ])
        return out
    }

    /// Writes `yaml` to `path`; returns `path`.
    @discardableResult
    public func write(to path: String) throws -> String {
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    private indirect enum Value {
        case scalar(String)
        case section([(String, Value?)])

        static func string(_ text: String?) -> Value? { text.map { .scalar(NodeConfigFile.quoted($0)) } }
        static func number(_ n: Int?) -> Value? { n.map { .scalar(String($0)) } }
    }

    /// A YAML double-quoted scalar (JSON's escapes, which YAML shares).
    static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 { out += String(format: "\\x%02X", scalar.value) } else { out.unicodeScalars.append(scalar) }
            }
        }
        return out + "\""
    }
}
