import Foundation
import Logging
import Metadata
import MetadataEtcd
import NodeSupport
import ShardStore
import Volumes

/// One ShardFS node: the metadata store, the volumes this node holds and the
/// shard manager over them, composed from a `Configuration`. The FUSE daemon,
/// the socket service and the `shardfs` command all start one of these.
public final class StorageNode: Sendable {
    public let configuration: Configuration
    public let metadata: any MetadataStore
    public let volumes: any VolumeManager
    public let shards: ShardManager
    private let lock: DataFolderLock

    init(configuration: Configuration, lock: DataFolderLock, metadata: any MetadataStore, volumes: any VolumeManager,
         shards: ShardManager) {
        self.configuration = configuration
        self.lock = lock
        self.metadata = metadata
        self.volumes = volumes
        self.shards = shards
    }

    /// Starts a node: opens the metadata store, registers the node, mounts the
    /// volumes it holds (creating its first ones on a fresh node) and restores its shards.
    /// Only one node runs per data folder: another process waits up to `lockTimeout` for it.
    /// Also tunes malloc for the whole process (`keepDirtyPagesInTheHeap`).
    public static func start(_ config: Configuration, lockTimeout: Duration = .seconds(30),
                             logger: Logger = Logger(label: "shardfs.node")) async throws -> StorageNode {
        try config.validate()
        keepDirtyPagesInTheHeap()
        do {
            try FileManager.default.createDirectory(atPath: config.node.dataDir, withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: config.resolvedVolumeRoot, withIntermediateDirectories: true)
        } catch {
            throw ConfigurationError("cannot create the data folder \(config.node.dataDir): \(error.localizedDescription)")
        }
        let lock = try DataFolderLock(folder: config.node.dataDir, timeout: lockTimeout)
        let metadata = RetryingMetadataStore(try openMetadata(config), policy: retryPolicy(config))
        try await metadata.registerNode(NodeRecord(nodeID: config.node.nodeID, address: config.server.address))

        let provider = try cloudProvider(config)
        let instanceID = config.node.instanceID.isEmpty ? config.node.nodeID : config.node.instanceID
        let volumes = LocalVolumeManager(provider: provider, volumeRoot: config.resolvedVolumeRoot, instanceID: instanceID)
        var held = try await metadata.listVolumes(nodeID: config.node.nodeID)
        if !held.contains(where: { $0.primaryNodeID == config.node.nodeID }) {
            for _ in 0..<config.cloud.initialVolumes {
                let created = try await provider.createVolume(sizeBytes: 0, multiAttach: true)
                let record = VolumeRecord(volumeID: created.volumeID, primaryNodeID: config.node.nodeID,
                                          mountPath: config.resolvedVolumeRoot + "/" + created.volumeID)
                try await metadata.registerVolume(record)
                logger.info("created volume", metadata: ["volume": "\(created.volumeID)", "provider": "\(provider.name)"])
                held.append(record)
            }
        }
        for volume in held {
            _ = try await volumes.mount(volume.volumeID, readOnly: volume.primaryNodeID != config.node.nodeID)
        }
        let shards = ShardManager(nodeID: config.node.nodeID, metadata: metadata, volumes: volumes,
                                  defaultSizeLimit: config.shard.sizeLimit)
        try await shards.restore()
        return StorageNode(configuration: config, lock: lock, metadata: metadata, volumes: volumes, shards: shards)
    }

    static func openMetadata(_ config: Configuration) throws -> any MetadataStore {
        switch config.metadata.type {
        case "embedded":
            return try EmbeddedMetadataStore(path: config.embeddedMetadataPath)
        case "etcd":
            let m = config.metadata
            func optional(_ s: String) -> String? { s.isEmpty ? nil : s }
            do {
                return try EtcdMetadataStore(configuration: EtcdConfiguration(
                    endpoints: m.endpoints, namespace: m.namespace,
                    username: optional(m.username), password: optional(m.password),
                    caFile: optional(m.tlsCAFile), certFile: optional(m.tlsCertFile), keyFile: optional(m.tlsKeyFile),
                    callTimeout: .milliseconds(m.callTimeoutMs), leaseTTL: m.leaseTTLSeconds))
            } catch {
                throw ConfigurationError("cannot use the etcd metadata store: \(error)")
            }
        default:
            throw ConfigurationError("metadata.type \(config.metadata.type) is not available in this build")
        }
    }

    static func retryPolicy(_ config: Configuration) -> RetryPolicy {
        RetryPolicy(initialBackoff: .milliseconds(config.metadata.retryInitialBackoffMs),
                    multiplier: config.metadata.retryMultiplier,
                    maxBackoff: .milliseconds(config.metadata.retryMaxBackoffMs),
                    deadline: .milliseconds(config.metadata.retryDeadlineMs))
    }

    static func cloudProvider(_ config: Configuration) throws -> any CloudProvider {
        switch config.cloud.provider {
        case "folder":
            return FolderCloudProvider(volumeRoot: config.resolvedVolumeRoot)
        default:
            throw ConfigurationError("cloud.provider \(config.cloud.provider) is not available in this build")
        }
    }
}
