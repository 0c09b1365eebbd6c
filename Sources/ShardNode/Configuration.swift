import Foundation
import Yams

/// A node's configuration. Sources, weakest first: built-in defaults, the YAML
/// file, environment variables, command-line flags. `config/example.yaml`
/// documents every key.
public struct Configuration: Sendable, Equatable {
    public struct Node: Sendable, Equatable {
        public var nodeID = "node-1"
        /// Cloud instance ID; empty means "this host" for folder volumes.
        public var instanceID = ""
        /// Where the node keeps its embedded metadata and (by default) its volumes.
        public var dataDir = "./data"
    }

    public struct Server: Sendable, Equatable {
        /// TCP address of the batch socket service.
        public var address = "127.0.0.1:7070"
        /// Unix socket path; empty means `<data_dir>/shardfs.sock`.
        public var unixSocket = ""
        /// Shared token TCP clients must present; required when `address` is not loopback.
        public var token = ""
        /// TLS on the TCP listener: PEM certificate chain and private key (both or
        /// neither); with `tlsClientCA`, clients must present a certificate it signed.
        public var tlsCertificate = ""
        public var tlsKey = ""
        public var tlsClientCA = ""
        public var maxConnections = 1024
        /// A whole frame must arrive within this (from its first byte), and the
        /// handshake within `handshakeTimeoutMs` of connecting: trickled bytes do not extend either.
        public var frameTimeoutMs = 30_000
        public var handshakeTimeoutMs = 10_000
        /// host:port of the HTTP listener serving `/metrics` (Prometheus) and
        /// `/status`; empty: none on TCP (the admin socket in the data folder always serves both).
        public var metricsAddress = ""
    }

    public struct Cloud: Sendable, Equatable {
        /// folder (embedded default) | loop | aws | aliyun
        public var provider = "folder"
        public var region = ""
        public var availabilityZone = ""
        /// Volumes are mounted at `<volume_root>/<volumeID>`; empty means `<data_dir>/volumes`
        /// (production uses "/").
        public var volumeRoot = ""
        /// Volumes a fresh node creates for itself when it holds none.
        public var initialVolumes = 1
        /// Size of the volumes a node creates (loop, aws, aliyun; clouds round up to GiB).
        public var volumeSize = 16 << 30
        /// Volume type of new volumes; empty: the provider's default (io2, cloud_essd).
        public var volumeType = ""
        /// Provisioned IOPS of new volumes (io1/io2, cloud_auto); 0: the provider's default.
        public var iops = 0
        /// Throughput of new volumes in MiB/s (gp3); 0: none asked for.
        public var throughputMiBps = 0
        /// Filesystem made on a blank block volume: ext4 | xfs.
        public var filesystem = "ext4"
        /// Folder of the loop provider's image files; empty: `<data_dir>/images`.
        public var imageDir = ""
        /// The cloud API endpoint; empty: the region's public one.
        public var endpoint = ""
        /// The instance metadata service; empty: the cloud's link-local address.
        public var metadataEndpoint = ""
        /// API keys; empty: the environment, then (aws) the instance profile.
        public var accessKeyID = ""
        public var secretAccessKey = ""
        public var sessionToken = ""
        /// How long an attach may take, and the device to appear after it.
        public var attachTimeoutSeconds = 120
        public var deviceTimeoutSeconds = 60
        /// Transient cloud failures (throttling, 5xx, no connection) are retried until this deadline.
        public var retryDeadlineSeconds = 60
    }

    public struct Metadata: Sendable, Equatable {
        /// embedded | etcd
        public var type = "embedded"
        public var endpoints: [String] = []
        public var namespace = "/shardfs"
        public var username = ""
        public var password = ""
        public var tlsCAFile = ""
        public var tlsCertFile = ""
        public var tlsKeyFile = ""
        /// Deadline of one etcd call (one attempt; retries come on top).
        public var callTimeoutMs = 5000
        /// A node's registration lapses this long after its keepalives stop (etcd lease TTL).
        public var leaseTTLSeconds = 10
        /// Retry policy for transient metadata failures (the original: 100 ms, ×1.5, 2 s, 10 s).
        public var retryInitialBackoffMs = 100
        public var retryMultiplier = 1.5
        public var retryMaxBackoffMs = 2000
        public var retryDeadlineMs = 10_000
    }

    public struct Shard: Sendable, Equatable {
        /// Size limit of new shards, in bytes.
        public var sizeLimit = 2 << 30
    }

    /// Backup views and failover (docs/BACKUP-VIEWS.md).
    public struct Backup: Sendable, Equatable {
        /// How often a primary publishes fresh views of the volumes it writes that have backups.
        public var viewIntervalMs = 500
        /// How long a primary's node record must have been gone (its lease lapsed)
        /// before a backup promotes itself.
        public var failoverDelayMs = 2000
        /// Whether backups promote themselves; `shardfs volume promote` works either way.
        public var automaticFailover = true
    }

    public var node = Node()
    public var server = Server()
    public var cloud = Cloud()
    public var metadata = Metadata()
    public var shard = Shard()
    public var backup = Backup()
    /// trace | debug | info | notice | warning | error | critical
    public var logLevel = "info"

    public init() {}

    /// The folder under which volumes are mounted.
    public var resolvedVolumeRoot: String {
        cloud.volumeRoot.isEmpty ? node.dataDir + "/volumes" : cloud.volumeRoot
    }

    /// The folder of the loop provider's images.
    public var resolvedImageDir: String { cloud.imageDir.isEmpty ? node.dataDir + "/images" : cloud.imageDir }

    /// The folder of the embedded metadata store.
    public var embeddedMetadataPath: String { node.dataDir + "/metadata" }
}

public struct ConfigurationError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension Configuration {
    /// Loads the configuration: defaults, then `file` (if given), then `environment`.
    /// Flags are applied by the caller afterwards, so they win.
    public static func load(file: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> Configuration {
        var config = Configuration()
        if let file {
            let text: String
            do { text = try String(contentsOfFile: file, encoding: .utf8) } catch {
                throw ConfigurationError("cannot read configuration file \(file): \(error.localizedDescription)")
            }
            try config.apply(yaml: text, source: file)
        }
        try config.apply(environment: environment)
        try config.validate()
        return config
    }

    /// Environment variables and the keys they set.
    public static let environmentVariables: [(name: String, key: String)] = [
        ("NODE_ID", "node.node_id"),
        ("INSTANCE_ID", "node.instance_id"),
        ("AWS_REGION", "cloud.region"),
        ("SHARDFS_DATA_DIR", "node.data_dir"),
        ("SHARDFS_SERVER_ADDRESS", "server.address"),
        ("SHARDFS_UNIX_SOCKET", "server.unix_socket"),
        ("SHARDFS_METRICS_ADDRESS", "server.metrics_address"),
        ("SHARDFS_SERVER_TOKEN", "server.token"),
        ("SHARDFS_CLOUD_PROVIDER", "cloud.provider"),
        ("SHARDFS_VOLUME_ROOT", "cloud.volume_root"),
        ("SHARDFS_CLOUD_ENDPOINT", "cloud.endpoint"),
        ("SHARDFS_METADATA_TYPE", "metadata.type"),
        ("SHARDFS_METADATA_ENDPOINTS", "metadata.endpoints"),
        ("SHARDFS_METADATA_NAMESPACE", "metadata.namespace"),
        ("SHARDFS_METADATA_USERNAME", "metadata.options.username"),
        ("SHARDFS_METADATA_PASSWORD", "metadata.options.password"),
        ("SHARDFS_SHARD_SIZE_LIMIT", "shard.size_limit"),
        ("SHARDFS_LOG_LEVEL", "log.level"),
    ]

    mutating func apply(environment: [String: String]) throws {
        for (name, key) in Self.environmentVariables {
            if let value = environment[name], !value.isEmpty {
                try set(key, value, source: "environment variable \(name)")
            }
        }
    }

    mutating func apply(yaml text: String, source: String) throws {
        let root: Any?
        do { root = try Yams.load(yaml: text) } catch {
            throw ConfigurationError("\(source) is not valid YAML: \(error)")
        }
        guard let root else { return }  // an empty file
        guard let sections = root as? [String: Any] else {
            throw ConfigurationError("\(source): the top level must be a mapping of sections")
        }
        try walk(sections, prefix: "", source: source)
    }

    private mutating func walk(_ mapping: [String: Any], prefix: String, source: String) throws {
        for (name, value) in mapping.sorted(by: { $0.key < $1.key }) {
            let key = prefix.isEmpty ? name : prefix + "." + name
            if let nested = value as? [String: Any] {
                guard Self.settableKeys.contains(where: { $0.hasPrefix(key + ".") }) else {
                    throw ConfigurationError("\(source): unknown section \"\(key)\"")
                }
                try walk(nested, prefix: key, source: source)
            } else if let list = value as? [Any] {
                try set(key, list.map { "\($0)" }.joined(separator: ","), source: source)
            } else if value is NSNull {
                continue
            } else {
                try set(key, "\(value)", source: source)
            }
        }
    }

    static let settableKeys: Set<String> = [
        "node.node_id", "node.instance_id", "node.data_dir",
        "server.address", "server.unix_socket", "server.token", "server.max_connections",
        "server.tls.cert", "server.tls.key", "server.tls.client_ca",
        "server.frame_timeout_ms", "server.handshake_timeout_ms", "server.metrics_address",
        "cloud.provider", "cloud.region", "cloud.availability_zone", "cloud.volume_root", "cloud.initial_volumes",
        "cloud.volume_size", "cloud.volume_type", "cloud.iops", "cloud.throughput", "cloud.filesystem", "cloud.image_dir",
        "cloud.endpoint", "cloud.metadata_endpoint", "cloud.access_key_id", "cloud.secret_access_key", "cloud.session_token",
        "cloud.attach_timeout_s", "cloud.device_timeout_s", "cloud.retry_deadline_s",
        "metadata.type", "metadata.endpoints", "metadata.namespace",
        "metadata.options.username", "metadata.options.password",
        "metadata.options.tls.ca_file", "metadata.options.tls.cert_file", "metadata.options.tls.key_file",
        "metadata.options.call_timeout_ms", "metadata.options.lease_ttl_s",
        "metadata.retry.initial_backoff_ms", "metadata.retry.multiplier", "metadata.retry.max_backoff_ms",
        "metadata.retry.deadline_ms",
        "shard.size_limit",
        "backup.view_interval_ms", "backup.failover_delay_ms", "backup.automatic_failover",
        "log.level",
    ]

    /// Sets one dotted key from text (the same syntax in YAML, environment and flags).
    public mutating func set(_ key: String, _ value: String, source: String = "flag") throws {
        func int() throws -> Int {
            guard let n = Int(value), n >= 0 else { throw ConfigurationError("\(source): \(key) must be a whole number, not \"\(value)\"") }
            return n
        }
        switch key {
        case "node.node_id": node.nodeID = value
        case "node.instance_id": node.instanceID = value
        case "node.data_dir": node.dataDir = value
        case "server.address": server.address = value
        case "server.unix_socket": server.unixSocket = value
        case "server.token": server.token = value
        case "server.tls.cert": server.tlsCertificate = value
        case "server.tls.key": server.tlsKey = value
        case "server.tls.client_ca": server.tlsClientCA = value
        case "server.metrics_address": server.metricsAddress = value
        case "server.max_connections":
            server.maxConnections = try int()
            if server.maxConnections < 1 { throw ConfigurationError("\(source): server.max_connections must be at least 1") }
        case "server.frame_timeout_ms":
            server.frameTimeoutMs = try int()
            if server.frameTimeoutMs < 1 { throw ConfigurationError("\(source): server.frame_timeout_ms must be at least 1") }
        case "server.handshake_timeout_ms":
            server.handshakeTimeoutMs = try int()
            if server.handshakeTimeoutMs < 1 { throw ConfigurationError("\(source): server.handshake_timeout_ms must be at least 1") }
        case "cloud.provider": cloud.provider = value
        case "cloud.region": cloud.region = value
        case "cloud.availability_zone": cloud.availabilityZone = value
        case "cloud.volume_root": cloud.volumeRoot = value
        case "cloud.initial_volumes": cloud.initialVolumes = try int()
        case "cloud.volume_size":
            guard let bytes = ByteSize.parse(value) else {
                throw ConfigurationError("\(source): \(key) must be a size like 16GiB, not \"\(value)\"")
            }
            cloud.volumeSize = bytes
        case "cloud.volume_type": cloud.volumeType = value
        case "cloud.iops": cloud.iops = try int()
        case "cloud.throughput": cloud.throughputMiBps = try int()
        case "cloud.filesystem": cloud.filesystem = value
        case "cloud.image_dir": cloud.imageDir = value
        case "cloud.endpoint": cloud.endpoint = value
        case "cloud.metadata_endpoint": cloud.metadataEndpoint = value
        case "cloud.access_key_id": cloud.accessKeyID = value
        case "cloud.secret_access_key": cloud.secretAccessKey = value
        case "cloud.session_token": cloud.sessionToken = value
        case "cloud.attach_timeout_s": cloud.attachTimeoutSeconds = try int()
        case "cloud.device_timeout_s": cloud.deviceTimeoutSeconds = try int()
        case "cloud.retry_deadline_s": cloud.retryDeadlineSeconds = try int()
        case "metadata.type": metadata.type = value
        case "metadata.endpoints":
            metadata.endpoints = value.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        case "metadata.namespace": metadata.namespace = value
        case "metadata.options.username": metadata.username = value
        case "metadata.options.password": metadata.password = value
        case "metadata.options.tls.ca_file": metadata.tlsCAFile = value
        case "metadata.options.tls.cert_file": metadata.tlsCertFile = value
        case "metadata.options.tls.key_file": metadata.tlsKeyFile = value
        case "metadata.options.call_timeout_ms": metadata.callTimeoutMs = try int()
        case "metadata.options.lease_ttl_s": metadata.leaseTTLSeconds = try int()
        case "metadata.retry.initial_backoff_ms": metadata.retryInitialBackoffMs = try int()
        case "metadata.retry.max_backoff_ms": metadata.retryMaxBackoffMs = try int()
        case "metadata.retry.deadline_ms": metadata.retryDeadlineMs = try int()
        case "metadata.retry.multiplier":
            guard let m = Double(value), m >= 1 else { throw ConfigurationError("\(source): \(key) must be a number ≥ 1, not \"\(value)\"") }
            metadata.retryMultiplier = m
        case "shard.size_limit":
            guard let bytes = ByteSize.parse(value) else {
                throw ConfigurationError("\(source): \(key) must be a size like 2GiB, 512MiB or 1048576, not \"\(value)\"")
            }
            shard.sizeLimit = bytes
        case "backup.view_interval_ms":
            backup.viewIntervalMs = try int()
            if backup.viewIntervalMs < 10 { throw ConfigurationError("\(source): backup.view_interval_ms must be at least 10") }
        case "backup.failover_delay_ms": backup.failoverDelayMs = try int()
        case "backup.automatic_failover":
            guard let flag = Bool(value) else { throw ConfigurationError("\(source): \(key) must be true or false, not \"\(value)\"") }
            backup.automaticFailover = flag
        case "log.level": logLevel = value
        default:
            throw ConfigurationError("\(source): unknown key \"\(key)\"")
        }
    }

    public func validate() throws {
        if node.nodeID.isEmpty { throw ConfigurationError("node.node_id must not be empty") }
        if node.dataDir.isEmpty { throw ConfigurationError("node.data_dir must not be empty") }
        guard ["folder", "loop", "aws", "aliyun"].contains(cloud.provider) else {
            throw ConfigurationError("cloud.provider must be folder, loop, aws or aliyun, not \"\(cloud.provider)\"")
        }
        guard ["ext4", "xfs"].contains(cloud.filesystem) else {
            throw ConfigurationError("cloud.filesystem must be ext4 or xfs, not \"\(cloud.filesystem)\"")
        }
        if cloud.provider != "folder" && cloud.volumeSize < 16 << 20 {
            throw ConfigurationError("cloud.volume_size must be at least 16MiB")
        }
        guard ["embedded", "etcd"].contains(metadata.type) else {
            throw ConfigurationError("metadata.type must be embedded or etcd, not \"\(metadata.type)\"")
        }
        if metadata.type == "etcd" && metadata.endpoints.isEmpty {
            throw ConfigurationError("metadata.type is etcd but metadata.endpoints is empty")
        }
        if metadata.callTimeoutMs < 1 || metadata.leaseTTLSeconds < 1 {
            throw ConfigurationError("metadata.options.call_timeout_ms and lease_ttl_s must be at least 1")
        }
        guard ["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(logLevel) else {
            throw ConfigurationError("log.level must be one of trace, debug, info, notice, warning, error, critical, not \"\(logLevel)\"")
        }
        if shard.sizeLimit < 256 << 10 { throw ConfigurationError("shard.size_limit must be at least 256KiB") }
    }
}

/// Sizes written as "2GiB", "512MiB", "64KiB", "2G", "1048576".
public enum ByteSize {
    public static func parse(_ text: String) -> Int? {
        let t = text.trimmingCharacters(in: .whitespaces)
        let units: [(String, Int)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40),
                                      ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40), ("B", 1)]
        for (suffix, factor) in units where t.hasSuffix(suffix) {
            guard let n = Int(t.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)), n >= 0 else { return nil }
            let (product, overflow) = n.multipliedReportingOverflow(by: factor)
            return overflow ? nil : product
        }
        guard let n = Int(t), n >= 0 else { return nil }
        return n
    }

    public static func format(_ bytes: Int) -> String {
        for (suffix, factor) in [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] where bytes >= factor {
            let value = Double(bytes) / Double(factor)
            return value == value.rounded() ? "\(Int(value))\(suffix)" : String(format: "%.1f%@", value, suffix)
        }
        return "\(bytes)B"
    }
}
