import Foundation
import Logging
import Metadata
import MetadataEtcd
import NodeSupport
import ShardStore
import Synchronization
import Volumes

/// One ShardFS node: the metadata store, the volumes this node holds and the
/// shard manager over them, composed from a `Configuration`. The FUSE daemon,
/// the socket service and the `shardfs` command all start one of these.
public final class StorageNode: Sendable {
    public let configuration: Configuration
    public let metadata: any MetadataStore
    public let volumes: any VolumeManager
    public let shards: ShardManager
    /// When this node started (`shardfs status`, `shardfs_start_time_seconds`).
    public let startedAt = Date()
    /// Backup views and failover: what this node publishes as a primary, serves
    /// as a backup, and how it changes roles (docs/BACKUP-VIEWS.md).
    public let publisher: ViewPublisher
    public let views: BackupViews
    public let failover: Failover
    private let lock: DataFolderLock
    /// Refreshes the volume facts every minute.
    private let factsRefresh = Mutex<Task<Void, Never>?>(nil)

    init(configuration: Configuration, lock: DataFolderLock, metadata: any MetadataStore, volumes: any VolumeManager,
         shards: ShardManager, publisher: ViewPublisher, views: BackupViews, failover: Failover) {
        self.configuration = configuration
        self.lock = lock
        self.metadata = metadata
        self.volumes = volumes
        self.shards = shards
        self.publisher = publisher
        self.views = views
        self.failover = failover
    }

    /// Stops publishing and following views and changing roles (a clean stop,
    /// before the shards' logs are applied).
    public func stopRoles() async {
        factsRefresh.withLock { $0?.cancel() }
        await failover.stop()
        views.stop()
        await publisher.stop()
    }

    /// A clean stop, once nothing serves the node's shards any more: roles
    /// stopped, every batch log applied, the shards let go, and the volumes
    /// unmounted and detached from this instance. A volume that cannot be
    /// released (still busy, the cloud down) stays as it is, with a warning; the
    /// next start adopts it.
    public func stop(logger: Logger = Logger(label: "shardfs.node")) async {
        await stopRoles()
        shards.applyLogs()
        shards.unloadAll()
        do { try await volumes.releaseAll() } catch {
            logger.warning("not every volume could be released; the next start adopts what is left", metadata: ["error": "\(error)"])
        }
    }

    /// Starts a node: opens the metadata store, registers the node, mounts the
    /// volumes it holds (creating its first ones on a fresh node) and restores its shards.
    /// Only one node runs per data folder: another process waits up to `lockTimeout` for it.
    /// Also tunes malloc for the whole process (`keepDirtyPagesInTheHeap`).
    /// `createDataFolder` false: a missing data folder is an error (commands that
    /// only read or change what exists must not make an empty node of a typo).
    public static func start(_ config: Configuration, lockTimeout: Duration = .seconds(30), createDataFolder: Bool = true,
                             logger: Logger = Logger(label: "shardfs.node")) async throws -> StorageNode {
        try config.validate()
        keepDirtyPagesInTheHeap()
        if !createDataFolder && !FileManager.default.fileExists(atPath: config.node.dataDir) {
            throw ConfigurationError("there is no data folder \(config.node.dataDir): a node's folder is made by `shardfs serve`, "
                                     + "`shardfs mount` or `shardfs shard new` (is --data-dir right?)")
        }
        do {
            // Synced into their parents: the node records volumes and shards in them.
            try makeFolderDurably(config.node.dataDir)
            try makeFolderDurably(config.resolvedVolumeRoot)
        } catch {
            throw ConfigurationError("cannot create the data folder \(config.node.dataDir): \(error)")
        }
        let lock = try DataFolderLock(folder: config.node.dataDir, timeout: lockTimeout) { holder in
            logger.notice("the data folder is in use by another ShardFS process; waiting for it",
                           metadata: ["folder": "\(config.node.dataDir)", "pid": "\(holder)", "up to": "\(lockTimeout)"])
        }
        let metadata = RetryingMetadataStore(try openMetadata(config), policy: retryPolicy(config))
        try await metadata.registerNode(NodeRecord(nodeID: config.node.nodeID, address: config.server.address))

        let provider = try cloudProvider(config)
        let volumes = try await volumeManager(config, provider: provider)
        var held = try await metadata.listVolumes(nodeID: config.node.nodeID)
        if !held.contains(where: { $0.primaryNodeID == config.node.nodeID }) {
            for _ in 0..<config.cloud.initialVolumes {
                let created = try await provider.createVolume(volumeSpec(config))
                let record = VolumeRecord(volumeID: created.volumeID, primaryNodeID: config.node.nodeID,
                                          mountPath: config.resolvedVolumeRoot + "/" + created.volumeID)
                try await metadata.registerVolume(record)
                logger.info("created volume", metadata: ["volume": "\(created.volumeID)", "provider": "\(provider.name)"])
                held.append(record)
            }
        }
        for volume in held {
            if volume.primaryNodeID != config.node.nodeID, let block = volumes as? BlockVolumeManager {
                // A backup reads the raw device (docs/BACKUP-VIEWS.md): attached, not mounted.
                _ = try await block.attach(volume.volumeID, readOnly: true)
            } else {
                _ = try await volumes.mount(volume.volumeID, readOnly: volume.primaryNodeID != config.node.nodeID)
            }
        }
        let shards = ShardManager(nodeID: config.node.nodeID, metadata: metadata, volumes: volumes,
                                  defaultSizeLimit: config.shard.sizeLimit)
        if config.cloud.provider != "folder" {
            let provisioner = VolumeProvisioner(config: config, provider: provider, metadata: metadata, volumes: volumes, shards: shards)
            shards.provisionVolume = { room in try await provisioner.provision(room: room) }
        }
        let lease = LeaseGuard(metadata: metadata, nodeID: config.node.nodeID)
        let leaseIsFresh: @Sendable () -> Bool = { lease.isFresh() }
        shards.leaseIsFresh = leaseIsFresh
        shards.leaseSecondsLeft = { lease.secondsLeft() }
        let publisher = ViewPublisher(nodeID: config.node.nodeID, metadata: metadata, shards: shards,
                                      interval: .milliseconds(config.backup.viewIntervalMs))
        shards.keepsDeletedFiles = { [weak publisher] volumeID in publisher?.handlesDeletes(volumeID) ?? false }
        // Opening a shard may write (it replays its batch log): first, no backup may
        // still read a snapshot the previous run pinned.
        try await publisher.retirePreviousGenerations(timeout: .seconds(config.metadata.leaseTTLSeconds + 5))
        try await shards.restore()
        // Views of what there is, before anything is served.
        await publisher.checkpoint()
        publisher.start()
        let views = BackupViews(nodeID: config.node.nodeID, metadata: metadata, volumes: volumes,
                                leaseGeneration: { lease.freshGeneration() },
                                currentFor: .seconds(config.metadata.leaseTTLSeconds) - .milliseconds(500),
                                confirmEvery: max(.milliseconds(200), .seconds(config.metadata.leaseTTLSeconds) / 4))
        try await views.start()
        shards.views = views
        let failover = Failover(nodeID: config.node.nodeID, metadata: metadata, shards: shards, lease: lease,
                                failoverDelay: .milliseconds(config.backup.failoverDelayMs),
                                automatic: config.backup.automaticFailover) { volumeID, oldPrimary in
            await views.release(volumeID)  // its reads hold the read-only device open
            return try await takeOver(volumeID, by: config.node.nodeID, oldPrimary: oldPrimary, volumes: volumes,
                                      provider: provider, metadata: metadata)
        } settle: { volumeID, writing in
            guard views.isReleased(volumeID) else { return }  // no take-over began here
            if !writing { await letGo(volumeID, volumes: volumes) }
            await views.readmit(volumeID)
        }
        try await failover.start()
        let node = StorageNode(configuration: config, lock: lock, metadata: metadata, volumes: volumes, shards: shards,
                               publisher: publisher, views: views, failover: failover)
        await node.refreshVolumeFacts()
        node.factsRefresh.withLock {
            $0 = Task { [weak node] in
                while !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(60))
                    await node?.refreshVolumeFacts()
                }
            }
        }
        return node
    }

    /// Promotion steps 2–3 in the volume layer: cut the old primary off (the other
    /// instance holding the volume read-write) and mount the volume read-write here.
    static func takeOver(_ volumeID: String, by nodeID: String, oldPrimary: String?, volumes: any VolumeManager,
                         provider: any CloudProvider, metadata: any MetadataStore) async throws -> MountedVolume {
        guard let block = volumes as? BlockVolumeManager else {
            // A folder volume: one host, nothing to fence; remount writable.
            if volumes.mountedVolumes().contains(where: { $0.volumeID == volumeID }) { try await volumes.unmount(volumeID) }
            return try await volumes.mount(volumeID, readOnly: false)
        }
        // The old primary is a node; what the storage knows is instances. Which
        // instance was the primary's, its own facts say (it writes them at start
        // and every minute); else the one holding the volume read-write (loop
        // volumes say which attachment that is; cloud attachments do not).
        let attachments = try await provider.describeVolume(volumeID).attachments
        let recorded = (try? await metadata.getVolume(volumeID))?.facts?.attachments
            .first { $0.role == "primary" && $0.instanceID != block.instanceID }?.instanceID
        let fenced = recorded.flatMap { id in attachments.contains { $0.instanceID == id } ? id : nil }
            ?? attachments.first { $0.instanceID != block.instanceID && !$0.readOnly }?.instanceID
        let mounted = try await block.promote(volumeID, fencing: fenced)
        // Named primary in the facts only while the record still names this node
        // (a node that lost the volume meanwhile must not be the one fenced next).
        if let facts = await facts(of: volumeID, volumes: volumes) {
            try? await metadata.updateVolumeFacts(volumeID, facts, ifPrimary: nodeID)
        }
        return mounted
    }

    /// Undoes what a take-over that did not end with this node writing the volume
    /// mounted here: a read-write mount goes (a block volume's attachment too; the
    /// winner fences it anyway); a read-only attachment stays, for the views.
    /// Failures are logged: the node does not write the volume either way.
    static func letGo(_ volumeID: String, volumes: any VolumeManager, logger: Logger = Logger(label: "shardfs.failover")) async {
        guard volumes.mountedVolumes().contains(where: { $0.volumeID == volumeID && !$0.readOnly }) else { return }
        do { try await volumes.detach(volumeID) } catch {
            logger.error("cannot let go of a volume another node won while this node was taking it over",
                         metadata: ["volume": "\(volumeID)", "error": "\(error)"])
        }
    }

    // MARK: Volume facts

    /// The instance the manager attaches volumes to.
    public static func instanceID(of volumes: any VolumeManager) -> String {
        (volumes as? BlockVolumeManager)?.instanceID ?? (volumes as? LocalVolumeManager)?.instanceID ?? ""
    }

    /// The role the block layer shows: a read-only attachment is a backup's; a
    /// read-write loop attachment is the primary's (a loop volume has one). Cloud
    /// attachments are all read-write there: "" (unknown).
    public static func blockRole(_ attachment: VolumeAttachment, provider: String) -> String {
        attachment.readOnly ? "backup" : provider == "loop" ? "primary" : ""
    }

    /// What this node sees of a volume it is the primary of: the provider's answer
    /// (size, type, zone, attachments, this instance's as primary) and the free
    /// room of its mount. Nil when the provider cannot be asked now.
    public static func facts(of volumeID: String, volumes: any VolumeManager) async -> VolumeFacts? {
        guard let volume = try? await volumes.provider.describeVolume(volumeID) else { return nil }
        let mine = instanceID(of: volumes), provider = volumes.provider.name
        return VolumeFacts(capacityBytes: volume.sizeBytes, freeBytes: try? volumes.freeBytes(volumeID), provider: provider,
                           type: volume.type, zone: volume.availabilityZone,
                           attachments: volume.attachments.map {
                               VolumeFacts.Attachment(instanceID: $0.instanceID,
                                                      role: $0.instanceID == mine ? "primary" : blockRole($0, provider: provider),
                                                      state: $0.state.rawValue, device: $0.device)
                           })
    }

    /// Writes the facts of every volume this node writes into their records
    /// (while the record names it primary). Failures are logged: the next
    /// refresh writes them.
    public func refreshVolumeFacts(logger: Logger = Logger(label: "shardfs.node")) async {
        for volume in volumes.mountedVolumes() where shards.primaryEpoch(volume.volumeID) != nil {
            guard let facts = await Self.facts(of: volume.volumeID, volumes: volumes) else { continue }
            do { try await metadata.updateVolumeFacts(volume.volumeID, facts, ifPrimary: configuration.node.nodeID) } catch {
                logger.info("could not record a volume's facts", metadata: ["volume": "\(volume.volumeID)", "error": "\(error)"])
            }
        }
    }

    /// The metadata store the configuration names (without retries).
    public static func openMetadata(_ config: Configuration) throws -> any MetadataStore {
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

    /// The provider `cloud.provider` names, set up from the configuration.
    public static func cloudProvider(_ config: Configuration) throws -> any CloudProvider {
        let c = config.cloud
        let retry = CloudRetryPolicy(deadline: .seconds(c.retryDeadlineSeconds))
        switch c.provider {
        case "folder":
            return FolderCloudProvider(volumeRoot: config.resolvedVolumeRoot)
        case "loop":
            return LoopCloudProvider(imageDirectory: config.resolvedImageDir)
        case "aws":
            var a = AWSConfiguration()
            a.region = c.region
            a.instanceID = config.node.instanceID
            a.availabilityZone = c.availabilityZone
            a.endpoint = c.endpoint
            if !c.metadataEndpoint.isEmpty { a.imdsEndpoint = c.metadataEndpoint }
            a.accessKeyID = c.accessKeyID
            a.secretAccessKey = c.secretAccessKey
            a.sessionToken = c.sessionToken
            if !c.volumeType.isEmpty { a.volumeType = c.volumeType }
            if c.iops > 0 { a.iops = c.iops }
            a.retry = retry
            return EBSCloudProvider(configuration: a)
        case "aliyun":
            var a = AliyunConfiguration()
            a.region = c.region
            a.instanceID = config.node.instanceID
            a.zone = c.availabilityZone
            a.endpoint = c.endpoint
            if !c.metadataEndpoint.isEmpty { a.metadataEndpoint = c.metadataEndpoint }
            a.accessKeyID = c.accessKeyID
            a.accessKeySecret = c.secretAccessKey
            a.securityToken = c.sessionToken
            if !c.volumeType.isEmpty { a.diskCategory = c.volumeType }
            a.retry = retry
            return ECSCloudProvider(configuration: a)
        default:
            throw ConfigurationError("cloud.provider \(c.provider) is not available in this build")
        }
    }

    /// What a node creates: the configured size, type, IOPS and throughput, multi-attach, tagged with the node.
    public static func volumeSpec(_ config: Configuration) -> VolumeSpec {
        let c = config.cloud
        return VolumeSpec(sizeBytes: c.provider == "folder" ? 0 : c.volumeSize, type: c.volumeType,
                          iops: c.iops > 0 ? c.iops : nil, throughputMiBps: c.throughputMiBps > 0 ? c.throughputMiBps : nil,
                          multiAttach: true, availabilityZone: c.availabilityZone, tags: ["shardfs-node": config.node.nodeID])
    }

    /// The manager of this node's volumes: folders, or block volumes attached to
    /// this instance. Its `mount` adopts a mount a previous run left at the volume's path.
    public static func volumeManager(_ config: Configuration, provider: any CloudProvider) async throws -> any VolumeManager {
        var instanceID = config.node.instanceID
        if instanceID.isEmpty {
            switch provider {
            case let aws as EBSCloudProvider: instanceID = try await aws.instanceID()
            case let ecs as ECSCloudProvider: instanceID = try await ecs.instanceID()
            default: instanceID = config.node.nodeID
            }
        }
        guard config.cloud.provider != "folder" else {
            return LocalVolumeManager(provider: provider, volumeRoot: config.resolvedVolumeRoot, instanceID: instanceID)
        }
        let manager = BlockVolumeManager(provider: provider, volumeRoot: config.resolvedVolumeRoot, instanceID: instanceID,
                                         filesystem: VolumeFilesystem(rawValue: config.cloud.filesystem) ?? .ext4)
        manager.attachTimeout = .seconds(config.cloud.attachTimeoutSeconds)
        manager.deviceTimeout = .seconds(config.cloud.deviceTimeoutSeconds)
        return manager
    }
}

/// Makes a new volume for this node when none of its volumes has room for a new
/// shard: through the provider (size and type from the configuration), registered
/// in metadata with this node as primary, then attached, formatted and mounted.
/// One at a time: shards asking meanwhile wait for it. A volume the provider made
/// but that could not be registered is deleted again, so none is half-registered.
actor VolumeProvisioner {
    let config: Configuration
    let provider: any CloudProvider
    let metadata: any MetadataStore
    let volumes: any VolumeManager
    /// Weak: the manager holds this provisioner (through its `provisionVolume`).
    private weak var shards: ShardManager?
    private var running: Task<MountedVolume, Error>?

    init(config: Configuration, provider: any CloudProvider, metadata: any MetadataStore, volumes: any VolumeManager, shards: ShardManager) {
        self.config = config
        self.provider = provider
        self.metadata = metadata
        self.volumes = volumes
        self.shards = shards
    }

    /// A new volume with at least `room` bytes free for shards (the configured size,
    /// or more when a shard's size limit asks for it).
    func provision(room: Int) async throws -> MountedVolume {
        if let running { return try await running.value }
        var spec = StorageNode.volumeSpec(config)
        spec.sizeBytes = max(spec.sizeBytes, room + room / 8 + (32 << 20))  // the filesystem's own share
        let task = Task { [config, provider, metadata, volumes, shards, spec] () throws -> MountedVolume in
            let created = try await provider.createVolume(spec)
            let record = VolumeRecord(volumeID: created.volumeID, primaryNodeID: config.node.nodeID,
                                      mountPath: config.resolvedVolumeRoot + "/" + created.volumeID)
            do { try await metadata.registerVolume(record) } catch {
                try? await provider.deleteVolume(created.volumeID)
                throw error
            }
            let mounted = try await volumes.mount(created.volumeID, readOnly: false)
            shards?.becamePrimary(created.volumeID, epoch: record.epoch)
            if let facts = await StorageNode.facts(of: created.volumeID, volumes: volumes) {
                try? await metadata.updateVolumeFacts(created.volumeID, facts, ifPrimary: config.node.nodeID)
            }
            return mounted
        }
        running = task
        defer { running = nil }
        return try await task.value
    }
}

