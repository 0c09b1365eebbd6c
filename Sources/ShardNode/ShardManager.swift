import Foundation
import Logging
import Metadata
import NodeSupport
import ShardStore
import Synchronization
import Volumes

public enum ShardManagerError: Error, Equatable, Sendable, CustomStringConvertible {
    case shardNotFound(UInt64)
    /// The shard exists but its volume is not mounted on this node.
    case shardNotLocal(UInt64, volumeID: String)
    case shardIDTaken(UInt64)
    case noWritableVolume
    /// No writable volume of this node has room for a shard of this size limit,
    /// and none could be provisioned.
    case noRoom(Int)
    /// The shard's volume is mounted read-only here (this node is a backup for it).
    case notPrimary(UInt64)
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .shardNotFound(let id): return "shard \(id) not found"
        case .shardNotLocal(let id, let volume): return "shard \(id) lives on volume \(volume), which this node has not mounted"
        case .shardIDTaken(let id):
            return "shard ID \(id) is taken: IDs are never used twice; ask for a higher one, or let the node choose"
        case .noWritableVolume: return "no writable volume on this node for a new shard"
        case .noRoom(let limit):
            return "no volume of this node has \(limit) bytes free for a new shard's size limit; ask for a smaller limit or add a volume"
        case .notPrimary(let id): return "this node is not the primary of shard \(id)'s volume"
        case .invalidArgument(let s): return "invalid argument: \(s)"
        }
    }
}

/// A shard as listed by the manager: its metadata, the node holding its volume
/// as primary, and, if local, its figures.
public struct ShardListing: Sendable {
    public var record: ShardRecord
    /// Empty when the volume is unknown or has no primary.
    public var primaryNodeID: String
    public var stats: ShardStats?
}

/// The shards of this node: creates, opens, closes and deletes them, keeping the
/// shard files on the volumes and the metadata in step. Every change is ordered
/// so that a crash at any point is finished or rolled back by `restore()`:
///
/// - new:    metadata record (open) → files. Record without files: rolled back.
/// - close:  the shard's own descriptor → metadata. Either says closed: closed.
/// - delete: metadata marked `deleting` → directory renamed `shard-N.deleting`
///           → files removed → record removed. A `deleting` record or a
///           `.deleting` directory is finished on restore.
public final class ShardManager: @unchecked Sendable {
    public let nodeID: String
    public let metadata: any MetadataStore
    public let volumes: any VolumeManager
    public let defaultSizeLimit: Int
    private let logger: Logger
    private let lock = NSLock()
    private var shards: [UInt64: (shard: Shard, volumeID: String)] = [:]
    private var changeListeners: [UInt64: ChangeListener] = [:]
    private var nextListener: UInt64 = 1

    /// Told, after a commit to a shard of this node, which entries changed.
    public typealias ChangeListener = @Sendable (_ shard: UInt64, _ keys: [[UInt8]]) -> Void

    /// Set by a FUSE mount of this node: returns once what its change listener
    /// queued so far has reached the kernel (which then drops the cached names,
    /// attributes and pages of the entries changed). The socket service calls it
    /// after its writes, before it answers them: an invalidation that reached the
    /// kernel later, while a reader's GETATTR was in flight, made the kernel drop
    /// that GETATTR's fresh size (it discards attributes older than an
    /// invalidation) and read the new bytes cut to the old size.
    public var cacheBarrier: (@Sendable () -> Void)? {
        get { lock.withLock { barrier } }
        set { lock.withLock { barrier = newValue } }
    }
    private var barrier: (@Sendable () -> Void)?

    /// Adds a listener told after each commit to any shard of this node which
    /// entries changed, so views like a FUSE mount can drop caches: whatever path
    /// wrote them, except the mount's own small-file closes and unlinks, which it
    /// commits unreported (`Shard.batchPut(reportingChanges:)`; the one mount of
    /// a node is the one listener, and needs no word of its own writes). It runs on the committing thread, after the commit: keep it
    /// short, take no lock a writer may hold. Returns what `removeChangeListener` takes.
    public func addChangeListener(_ listener: @escaping ChangeListener) -> UInt64 {
        lock.withLock {
            let id = nextListener
            nextListener += 1
            changeListeners[id] = listener
            for entry in shards.values { forwardCommits(entry.shard) }
            return id
        }
    }

    public func removeChangeListener(_ id: UInt64) {
        lock.withLock {
            changeListeners.removeValue(forKey: id)
            for entry in shards.values { forwardCommits(entry.shard) }
        }
    }

    /// Holds a loaded shard and forwards its commits to the change listeners. A
    /// writable shard gets the write fence of its volume.
    private func adopt(_ shard: Shard, volumeID: String) {
        if !shard.isReadOnlyView {
            // Fenced to this term: an instance still held after the node lost
            // the volume (an open file keeps one) stays refused if it wins it back.
            let term = roles.epoch(volumeID)
            let role = roles.role(volumeID)
            shard.writeFence = { [roles] in roles.refusal(role, term: term) }
        }
        lock.withLock {
            shards[shard.id] = (shard, volumeID)
            forwardCommits(shard)
        }
    }

    // MARK: Roles

    /// The read-only views this node serves as a backup, if it backs any volume.
    public var views: BackupViews? {
        get { lock.withLock { backupViews } }
        set { lock.withLock { backupViews = newValue } }
    }
    private var backupViews: BackupViews?

    /// Volumes this node writes and its lease: what every shard's write fence asks.
    /// Its own object, not the manager, so that a shard a one-off command still
    /// holds after the node object is gone keeps its fence.
    private let roles = NodeRoles()

    /// Whether this node's own lease is fresh (it may still be the primary); set by
    /// the node from its metadata store. Default: always (the embedded store).
    public var leaseIsFresh: @Sendable () -> Bool {
        get { roles.leaseCheck }
        set { roles.leaseCheck = newValue }
    }

    /// Seconds the node's lease surely lives on (nil: no lease, the embedded store); for the status.
    public var leaseSecondsLeft: @Sendable () -> Double? = { nil }

    /// Records that this node writes `volumeID` at `epoch`.
    public func becamePrimary(_ volumeID: String, epoch: UInt64) { roles.set(volumeID, epoch: epoch) }

    /// The epoch this node writes the volume at, nil if it is not its primary.
    public func primaryEpoch(_ volumeID: String) -> UInt64? { roles.epoch(volumeID) }

    /// Why a write to a shard on `volumeID` must not land now, or nil.
    func writeRefusal(_ volumeID: String) -> ShardError? { roles.refusal(volumeID) }

    /// Stops writing a volume another node has won (its epoch moved on): every
    /// write to its shards is refused from now on and they are let go, so requests
    /// for them are redirected. Returns the shards let go.
    @discardableResult
    public func depose(_ volumeID: String) -> [UInt64] {
        let released = unload(volumeID)
        if !released.isEmpty {
            logger.warning("another node is now the primary of a volume; its shards are no longer written here",
                           metadata: ["volume": "\(volumeID)", "shards": "\(released.count)"])
        }
        return released
    }

    /// Ends this node's role for the volume and lets go of its shards.
    @discardableResult
    private func unload(_ volumeID: String) -> [UInt64] {
        roles.set(volumeID, epoch: nil)
        return lock.withLock { () -> [UInt64] in
            let ids = shards.filter { $0.value.volumeID == volumeID }.map(\.key)
            for id in ids { shards.removeValue(forKey: id) }
            return ids
        }
    }

    /// Hands the listeners as they are now to the shard's commits (called again
    /// whenever they change, so a commit takes no lock to find them); with none,
    /// the shard does not collect the keys each commit changed. Called under `lock`.
    private func forwardCommits(_ shard: Shard) {
        let listeners = Array(changeListeners.values)
        guard !listeners.isEmpty else {
            shard.onCommit = nil
            return
        }
        let id = shard.id
        shard.onCommit = { keys in for listener in listeners { listener(id, keys) } }
    }

    public init(nodeID: String, metadata: any MetadataStore, volumes: any VolumeManager, defaultSizeLimit: Int,
                logger: Logger = Logger(label: "shardfs.shards")) {
        self.nodeID = nodeID
        self.metadata = metadata
        self.volumes = volumes
        self.defaultSizeLimit = defaultSizeLimit
        self.logger = logger
    }

    public static func directoryName(_ id: UInt64) -> String { ShardDirectoryName.of(id) }

    func path(_ id: UInt64, on volume: MountedVolume) -> String { volume.mountPath + "/" + Self.directoryName(id) }

    // MARK: Lifecycle

    /// Creates a shard owned by `owner`: with the requested ID if it is free, else the next ID.
    @discardableResult
    public func newShard(owner: String, id requested: UInt64? = nil, sizeLimit: Int? = nil) async throws -> Shard {
        guard !owner.isEmpty else { throw ShardError.clientIDRequired }
        let limit = sizeLimit ?? defaultSizeLimit
        guard limit >= ShardOptions.minimumSizeLimit else {
            throw ShardManagerError.invalidArgument("a shard's size limit is at least \(ShardOptions.minimumSizeLimit) bytes")
        }
        let volume = try await chooseVolume(for: limit)
        if let refused = writeRefusal(volume.volumeID) { throw refused }
        let id: UInt64
        if let requested {
            guard requested > 0 else { throw ShardManagerError.invalidArgument("shard ID 0 is reserved") }
            do { try await metadata.claimShardID(requested) } catch MetadataError.alreadyExists {
                throw ShardManagerError.shardIDTaken(requested)
            }
            id = requested
        } else {
            id = try await metadata.generateShardID()
        }
        let record = ShardRecord(shardID: id, volumeID: volume.volumeID, ownerClientID: owner, state: .open, sizeLimit: limit)
        do { try await metadata.createShard(record) } catch MetadataError.alreadyExists {
            throw ShardManagerError.shardIDTaken(id)
        }
        do {
            var options = ShardOptions()
            options.sizeLimit = limit
            let shardPath = path(id, on: volume)
            let shard = try await blockingWork { [options] in try Shard.create(at: shardPath, id: id, owner: owner, options: options) }
            adopt(shard, volumeID: volume.volumeID)
            logger.info("created shard", metadata: ["shard": "\(id)", "volume": "\(volume.volumeID)", "owner": "\(owner)"])
            return shard
        } catch {
            try? await metadata.deleteShard(id)  // roll back; restore() would do it too
            throw error
        }
    }

    /// The open handle of a shard on this node.
    public func shard(_ id: UInt64) async throws -> Shard {
        if let local = lock.withLock({ shards[id] }) { return local.shard }
        let record: ShardRecord
        do { record = try await metadata.getShard(id) } catch MetadataError.notFound {
            throw ShardManagerError.shardNotFound(id)
        }
        if record.state == .deleting { throw ShardManagerError.shardNotFound(id) }
        throw ShardManagerError.shardNotLocal(id, volumeID: record.volumeID)
    }

    /// The open handle of a shard on this node's volumes, without asking the
    /// metadata (for hot paths that must not wait).
    public func localShard(_ id: UInt64) -> Shard? {
        lock.withLock { shards[id]?.shard }
    }

    /// Loaded shards of one volume, by ID.
    public func localShards(on volumeID: String) -> [Shard] {
        lock.withLock { shards.values.filter { $0.volumeID == volumeID }.map(\.shard).sorted { $0.id < $1.id } }
    }

    /// Says, for a volume, whether a deleted shard's files must stay (renamed
    /// `shard-N.deleting`) for someone else to remove: the view publisher, once no
    /// backup can read them any more. Default: never.
    public var keepsDeletedFiles: @Sendable (_ volumeID: String) -> Bool {
        get { lock.withLock { keepDeleted } }
        set { lock.withLock { keepDeleted = newValue } }
    }
    private var keepDeleted: @Sendable (String) -> Bool = { _ in false }

    /// Loaded shards, by ID.
    public func localShards() -> [Shard] {
        lock.withLock { shards.values.map(\.shard).sorted { $0.id < $1.id } }
    }

    /// Applies every local shard's batch log to LMDB (at a clean shutdown, so
    /// read-only views on other nodes see every acknowledged batch at once).
    public func applyLogs() {
        for shard in localShards() {
            do { try shard.applyLog() } catch {
                // What waits must at least be in the log (closes whose durability was deferred).
                let synced = Result { try shard.sync() }
                logger.error("could not apply a shard's batch log; it is applied when the shard next opens",
                             metadata: ["shard": "\(shard.id)", "error": "\(error)",
                                        "log": "\((try? synced.get()) != nil ? "durable" : "NOT durable: \(synced)")"])
            }
        }
    }

    /// Lets go of every shard (a clean stop, after `applyLogs`): each closes its
    /// files once nothing else holds it, and writes through handles kept elsewhere
    /// are refused. The node serves no shard afterwards.
    public func unloadAll() {
        roles.removeAll()
        lock.withLock { shards.removeAll() }
    }

    /// Closes a shard: read-only forever. Closing a closed shard succeeds.
    public func closeShard(_ id: UInt64) async throws {
        let shard = try await self.shard(id)
        guard !shard.isReadOnlyView else { throw ShardManagerError.notPrimary(id) }
        try await blockingWork { try shard.close() }
        _ = try await metadata.updateShardState(id, to: .closed)
        logger.info("closed shard", metadata: ["shard": "\(id)"])
    }

    /// Deletes a shard and all its entries, open or closed.
    public func deleteShard(_ id: UInt64) async throws {
        let shard = try await self.shard(id)
        guard !shard.isReadOnlyView, let volume = volume(of: id) else { throw ShardManagerError.notPrimary(id) }
        if let refused = writeRefusal(volume.volumeID) { throw refused }
        _ = try await metadata.updateShardState(id, to: .deleting)
        lock.withLock { _ = shards.removeValue(forKey: id) }
        try await finishDelete(id, on: volume)
        logger.info("deleted shard", metadata: ["shard": "\(id)"])
    }

    /// Every shard the metadata knows of, with figures for those on this node.
    public func listShards() async throws -> [ShardListing] {
        let records = try await metadata.listShards(volumeID: nil).filter { $0.state != .deleting }
        let primaries = Dictionary(try await metadata.listVolumes(nodeID: nil).map { ($0.volumeID, $0.primaryNodeID) },
                                   uniquingKeysWith: { a, _ in a })
        let local = lock.withLock { shards }
        return records.map { record in
            ShardListing(record: record, primaryNodeID: primaries[record.volumeID] ?? "",
                         stats: try? local[record.shardID]?.shard.stats())
        }
    }

    /// One shard on this node as `listShards` lists it (not found / not local
    /// errors as for `shard(_:)`), without listing the others.
    public func listing(_ id: UInt64) async throws -> ShardListing {
        let shard = try await self.shard(id)
        let record = try await metadata.getShard(id)
        let primary = (try? await metadata.getVolume(record.volumeID))?.primaryNodeID ?? ""
        return ShardListing(record: record, primaryNodeID: primary, stats: try shard.stats())
    }

    public func stats(_ id: UInt64) async throws -> ShardStats {
        try await shard(id).stats()
    }

    // MARK: Restore

    /// Opens the shards of every mounted volume, reconciling files with metadata.
    /// Only a volume's primary (mounted writable) repairs anything.
    public func restore() async throws {
        for volume in volumes.mountedVolumes() {
            try await restore(volume)
        }
    }

    /// Opens the shards of one mounted volume (after a promotion, say). A restore
    /// that fails part-way (the metadata unreachable, say) leaves this node
    /// neither primary of the volume nor holding any of its shards, so that a
    /// take-over tries again instead of counting a node that serves only some
    /// of them as done.
    public func restore(_ volume: MountedVolume) async throws {
        // A volume this node backs is never opened with LMDB: the primary writes it
        // meanwhile, and LMDB over a read-only mount of a live volume reads stale
        // or reused pages. `BackupViews` serves it (docs/BACKUP-VIEWS.md).
        guard !volume.readOnly else { return }
        // Writable here only as its primary, at the epoch the metadata holds.
        let record = try await metadata.getVolume(volume.volumeID)
        guard record.primaryNodeID == nodeID else {
            logger.error("a volume mounted writable here has another primary; not opening its shards",
                         metadata: ["volume": "\(volume.volumeID)", "primary": "\(record.primaryNodeID)"])
            return
        }
        // Instances from an earlier term here (a node that won its volume back
        // before it noticed losing it) are let go: another node may have written
        // the shards meanwhile, and LMDB opens an environment once per process.
        unload(volume.volumeID)
        becamePrimary(volume.volumeID, epoch: record.epoch)
        do {
            try await openShards(of: volume)
        } catch {
            let released = unload(volume.volumeID)
            logger.error("restoring a volume failed; this node does not write it", metadata: [
                "volume": "\(volume.volumeID)", "shards let go": "\(released.count)", "error": "\(error)",
            ])
            throw error
        }
    }

    /// `restore`'s work for a volume this node is primary of: opens its shards,
    /// finishes interrupted creates and deletes, and makes files and metadata agree.
    private func openShards(of volume: MountedVolume) async throws {
        let records = try await metadata.listShards(volumeID: volume.volumeID)
        var byID = Dictionary(uniqueKeysWithValues: records.map { ($0.shardID, $0) })
        // A volume that cannot be listed is skipped, never read as empty: that
        // would roll back the record of every shard on it.
        let names: [String]
        do { names = try FileManager.default.contentsOfDirectory(atPath: volume.mountPath) } catch {
            logger.error("cannot list a volume; its shards are not restored",
                         metadata: ["volume": "\(volume.volumeID)", "error": "\(error)"])
            return
        }
        for name in names.sorted() {
            if name.hasSuffix(".creating"), ShardDirectoryName.id(name.utf8.dropLast(".creating".count)) != nil {
                // A create that crashed before its rename: never acknowledged, never used.
                try? FileManager.default.removeItem(atPath: volume.mountPath + "/" + name)
                continue
            }
            if name.hasSuffix(".deleting"), ShardDirectoryName.id(name.utf8.dropLast(".deleting".count)) != nil {
                if !keepsDeletedFiles(volume.volumeID) {
                    logger.notice("finishing an interrupted delete", metadata: ["dir": "\(name)"])
                    try? FileManager.default.removeItem(atPath: volume.mountPath + "/" + name)
                }
                continue
            }
            guard let id = ShardDirectoryName.id(name.utf8) else { continue }
            let record = byID.removeValue(forKey: id)
            if let record, record.state == .deleting {
                try await finishDelete(id, on: volume)
                continue
            }
            let shard: Shard
            let path = volume.mountPath + "/" + name
            // Opening replays the batch log and may wait for an instance being let go.
            do { shard = try await blockingWork { try Shard.open(at: path) } } catch ShardError.inUse(let why) {
                // An earlier instance still held here (a file open on the mount
                // keeps one): the restore fails, and the take-over tries again.
                throw ShardError.inUse(why)
            } catch {
                logger.error("cannot open shard; leaving it alone", metadata: ["dir": "\(name)", "error": "\(error)"])
                continue
            }
            try await reconcile(shard, record: record, volume: volume)
            adopt(shard, volumeID: volume.volumeID)
        }

        // Records whose files are missing.
        for record in byID.values {
            if record.state == .deleting {
                try await finishDelete(record.shardID, on: volume)
            } else {
                // Created in metadata, crashed before its files: roll the create back.
                logger.warning("shard has metadata but no files; removing its record",
                               metadata: ["shard": "\(record.shardID)", "volume": "\(volume.volumeID)"])
                _ = try await metadata.updateShardState(record.shardID, to: .deleting)
                try await metadata.deleteShard(record.shardID)
            }
        }
    }

    /// Makes the files and the metadata agree: closed wins (closed is forever);
    /// files without a record are registered from the shard's own descriptor.
    private func reconcile(_ shard: Shard, record: ShardRecord?, volume: MountedVolume) async throws {
        guard let record else {
            logger.warning("shard files without metadata; registering them", metadata: ["shard": "\(shard.id)"])
            let state: ShardRecordState = shard.state == .closed ? .closed : .open
            do {
                try await metadata.createShard(ShardRecord(shardID: shard.id, volumeID: volume.volumeID,
                                                           ownerClientID: shard.owner, state: state, sizeLimit: shard.sizeLimit))
            } catch MetadataError.alreadyExists {
                logger.error("shard ID is recorded on another volume; not registering these files",
                             metadata: ["shard": "\(shard.id)", "volume": "\(volume.volumeID)"])
            }
            return
        }
        if record.state == .closed && shard.state == .open {
            try shard.close()
        } else if record.state == .open && shard.state == .closed {
            _ = try await metadata.updateShardState(shard.id, to: .closed)
        }
    }

    private func finishDelete(_ id: UInt64, on volume: MountedVolume) async throws {
        let live = path(id, on: volume)
        let doomed = live + ".deleting"
        let folder = volume.mountPath
        let keepFiles = keepsDeletedFiles(volume.volumeID)
        try await blockingWork {
            let fm = FileManager.default
            if fm.fileExists(atPath: live) {
                guard rename(live, doomed) == 0 else {
                    throw ShardError.storage("cannot rename \(live): \(String(cString: strerror(errno)))")
                }
                try syncDirectory(folder)
            }
            if !keepFiles, fm.fileExists(atPath: doomed) {
                do { try fm.removeItem(atPath: doomed) } catch {
                    throw ShardError.storage("cannot remove \(doomed): \(error.localizedDescription)")
                }
            }
        }
        do { try await metadata.deleteShard(id) } catch MetadataError.notFound {}
    }

    // MARK: Placement

    private func volume(of id: UInt64) -> MountedVolume? {
        guard let volumeID = lock.withLock({ shards[id]?.volumeID }) else { return nil }
        return volumes.mountedVolumes().first { $0.volumeID == volumeID }
    }

    /// Makes, attaches, formats, mounts and registers a new volume this node is
    /// the primary of (set by the node from its provider and configuration).
    /// Its argument is the room the new volume must have.
    public var provisionVolume: (@Sendable (_ room: Int) async throws -> MountedVolume)? {
        get { lock.withLock { provision } }
        set { lock.withLock { provision = newValue } }
    }
    private var provision: (@Sendable (Int) async throws -> MountedVolume)?

    /// A volume for a new shard of size limit `limit`: one this node writes with
    /// room for the whole limit (block volumes; folder volumes share the host's
    /// filesystem and are not counted), else a new one from `provisionVolume`.
    func chooseVolume(for limit: Int) async throws -> MountedVolume {
        if let volume = try? chooseVolume(room: limit) { return volume }
        guard let provision = provisionVolume else { return try chooseVolume(room: limit) }
        let volume: MountedVolume
        do { volume = try await provision(limit) } catch {
            // The shard fails as one with no room (the caller may try another node); why, the log says.
            logger.error("no volume had room for a new shard and none could be provisioned",
                         metadata: ["size limit": "\(limit)", "error": "\(error)"])
            throw ShardManagerError.noRoom(limit)
        }
        logger.notice("no volume of this node had room for a new shard; provisioned one",
                      metadata: ["volume": "\(volume.volumeID)", "size limit": "\(limit)"])
        return volume
    }

    /// The writable volume with the most free space (compared in whole GiB, since
    /// folders on one filesystem differ by noise), then the fewest open shards;
    /// a block volume only if it has `room` bytes free.
    func chooseVolume(room: Int = 0) throws -> MountedVolume {
        let held = roles.all
        let candidates = volumes.mountedVolumes().filter { volume in
            guard !volume.readOnly, held[volume.volumeID] != nil else { return false }
            return volume.device.isEmpty || ((try? volumes.freeBytes(volume.volumeID)) ?? 0) >= room
        }
        let openCounts = lock.withLock {
            shards.values.reduce(into: [String: Int]()) { counts, entry in
                if entry.shard.state == .open { counts[entry.volumeID, default: 0] += 1 }
            }
        }
        let scored = candidates.map { volume in
            (volume: volume, freeGiB: ((try? volumes.freeBytes(volume.volumeID)) ?? 0) >> 30,
             open: openCounts[volume.volumeID] ?? 0)
        }
        guard let best = scored.min(by: { a, b in
            if a.freeGiB != b.freeGiB { return a.freeGiB > b.freeGiB }
            if a.open != b.open { return a.open < b.open }
            return a.volume.volumeID < b.volume.volumeID
        }) else {
            throw room > 0 && volumes.mountedVolumes().contains(where: { !$0.readOnly && held[$0.volumeID] != nil })
                ? ShardManagerError.noRoom(room) : ShardManagerError.noWritableVolume
        }
        return best.volume
    }
}

/// The volumes a node writes, at which epochs, and whether its lease is fresh:
/// what every writable shard asks before each commit and log append.
final class NodeRoles: @unchecked Sendable {
    private let lock = NSLock()
    private var epochs: [String: UInt64] = [:]
    /// One per volume ever named here, never removed: what a shard's write
    /// fence reads on every commit, without a lock or a lookup by name.
    private var roles: [String: VolumeRole] = [:]
    private var lease: @Sendable () -> Bool = { true }

    /// A volume's epoch as this node writes it (nil: it does not).
    final class VolumeRole: Sendable {
        let volumeID: String
        /// 0 while the node does not write the volume, else its epoch + 1.
        fileprivate let epochPlusOne = Atomic<UInt64>(0)
        init(_ volumeID: String) { self.volumeID = volumeID }
        var epoch: UInt64? {
            let stored = epochPlusOne.load(ordering: .acquiring)
            return stored == 0 ? nil : stored - 1
        }
        fileprivate func set(_ epoch: UInt64?) { epochPlusOne.store(epoch.map { $0 &+ 1 } ?? 0, ordering: .releasing) }
    }

    var leaseCheck: @Sendable () -> Bool {
        get { lock.withLock { lease } }
        set { lock.withLock { lease = newValue } }
    }

    var all: [String: UInt64] { lock.withLock { epochs } }

    func epoch(_ volumeID: String) -> UInt64? { lock.withLock { epochs[volumeID] } }

    /// `volumeID`'s role, made on first use.
    func role(_ volumeID: String) -> VolumeRole { lock.withLock { roleLocked(volumeID) } }

    private func roleLocked(_ volumeID: String) -> VolumeRole {
        if let role = roles[volumeID] { return role }
        let role = VolumeRole(volumeID)
        role.set(epochs[volumeID])
        roles[volumeID] = role
        return role
    }

    func set(_ volumeID: String, epoch: UInt64?) {
        lock.withLock {
            epochs[volumeID] = epoch
            roleLocked(volumeID).set(epoch)
        }
    }

    func removeAll() {
        lock.withLock {
            epochs.removeAll()
            for role in roles.values { role.set(nil) }
        }
    }

    /// Why a write to a shard on `volumeID` must not land now, or nil. `term`:
    /// the epoch the shard was loaded at, if known; a write is refused at any other.
    func refusal(_ volumeID: String, term: UInt64? = nil) -> ShardError? {
        refusal(role(volumeID), term: term)
    }

    /// As `refusal(_:term:)`, by the volume's role (a shard's write fence).
    func refusal(_ role: VolumeRole, term: UInt64? = nil) -> ShardError? {
        let volumeID = role.volumeID
        let epoch = role.epoch, fresh = leaseCheck
        guard epoch != nil else { return .notPrimary("this node no longer writes volume \(volumeID)") }
        if let term, term != epoch {
            return .notPrimary("this shard was loaded in an earlier term of this node as primary of volume \(volumeID)")
        }
        guard fresh() else { return .notPrimary("this node cannot confirm its lease, so it may no longer be the primary of volume \(volumeID)") }
        return nil
    }
}

