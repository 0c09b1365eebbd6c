import Foundation
import LMDB
import Logging
import Metadata
import NodeSupport
import ShardStore

/// The primary's half of backup views (docs/BACKUP-VIEWS.md). Every `interval`,
/// for each volume this node is the primary of and that has backups, it pins a
/// fresh snapshot of every shard that changed and publishes the volume's next
/// generation; it ends the pins every live backup has moved past, and removes a
/// deleted shard's files once no backup can read them. One task; nothing here
/// runs on a writer's path.
public final class ViewPublisher: @unchecked Sendable {
    public let interval: Duration
    private let nodeID: String
    private let metadata: any MetadataStore
    private let shards: ShardManager
    private let logger: Logger
    private let lock = NSLock()
    private var volumes: [String: VolumeState] = [:]
    private var task: Task<Void, Never>?

    private struct Pinned {
        let pin: PinnedSnapshot
        let record: ShardSnapshotRecord
    }

    private struct VolumeState {
        var epoch: UInt64
        var generation: UInt64
        /// Newest pin of each shard, as published in `generation`.
        var current: [UInt64: Pinned] = [:]
        /// Older pins, with the generation that stopped publishing them.
        var retired: [(supersededIn: UInt64, pin: PinnedSnapshot)] = []
        /// Deleted shards: the first generation that no longer listed them.
        var goneSince: [UInt64: UInt64] = [:]
        /// The first generation this process published (deleted shards it never
        /// listed may still be read through generations before it).
        let firstGeneration: UInt64
    }

    public init(nodeID: String, metadata: any MetadataStore, shards: ShardManager, interval: Duration = .milliseconds(500),
                logger: Logger = Logger(label: "shardfs.views")) {
        self.nodeID = nodeID
        self.metadata = metadata
        self.shards = shards
        self.interval = interval
        self.logger = logger
    }

    /// Whether a volume's deleted shards are left for this publisher to remove.
    public func handlesDeletes(_ volumeID: String) -> Bool { lock.withLock { volumes[volumeID] != nil } }

    public func start() {
        lock.withLock {
            guard task == nil else { return }
            task = Task { [weak self, interval] in
                while !Task.isCancelled {
                    await self?.checkpoint()
                    try? await Task.sleep(for: interval)
                }
            }
        }
    }

    /// Stops publishing and ends every pin.
    public func stop() async {
        let running = lock.withLock { defer { task = nil }; return task }
        running?.cancel()
        _ = await running?.value
        lock.withLock {
            for state in volumes.values {
                for pinned in state.current.values { pinned.pin.end() }
                for retired in state.retired { retired.pin.end() }
            }
            volumes.removeAll()
        }
    }

    /// At start, before any shard is opened for writing: the pins of the process
    /// before this one died with it, so its published snapshots may no longer hold.
    /// Publishes, for every volume this node writes that has backups, a generation
    /// with no shards (backups drop their views) and waits until each live backup
    /// has acknowledged it, up to `timeout`.
    public func retirePreviousGenerations(timeout: Duration) async throws {
        let held = try await metadata.listVolumes(nodeID: nodeID).filter { $0.primaryNodeID == nodeID && !$0.backupNodeIDs.isEmpty }
        for volume in held {
            guard let previous = try await metadata.getViews(volume.volumeID), !previous.shards.isEmpty else { continue }
            let empty = VolumeViews(volumeID: volume.volumeID, epoch: volume.epoch, generation: previous.generation + 1,
                                    publishedAt: Int64(Date().timeIntervalSince1970 * 1e9), shards: [])
            try await metadata.publishViews(empty)
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                let live = Set(try await metadata.listNodes().map(\.nodeID))
                let acks = try await metadata.viewAcknowledgements(volume.volumeID)
                if volume.backupNodeIDs.filter(live.contains).allSatisfy({ acks[$0, default: 0] >= empty.generation }) { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            if ContinuousClock.now >= deadline {
                logger.warning("a backup did not leave the views of this node's previous run in time; going on",
                               metadata: ["volume": "\(volume.volumeID)"])
            }
        }
    }

    /// One checkpoint of every volume this node writes that has backups.
    public func checkpoint() async {
        do {
            let held = try await metadata.listVolumes(nodeID: nodeID).filter {
                $0.primaryNodeID == nodeID && !$0.backupNodeIDs.isEmpty && shards.primaryEpoch($0.volumeID) == $0.epoch
            }
            for volume in held { try await checkpoint(volume) }
        } catch {
            logger.warning("view checkpoint failed; retrying at the next one", metadata: ["error": "\(error)"])
        }
    }

    private func checkpoint(_ volume: VolumeRecord) async throws {
        let id = volume.volumeID
        let began = ContinuousClock.now
        var pinning = Duration.zero, publishing = Duration.zero
        defer {
            // A checkpoint longer than two intervals makes the views lag more than
            // the interval promises: say where the time went.
            let took = ContinuousClock.now - began
            if took > interval * 2 {
                logger.warning("a view checkpoint was slow; backups' views lag by as much",
                               metadata: ["volume": "\(id)", "took": "\(took)", "pinning": "\(pinning)",
                                          "publishing": "\(publishing)"])
            }
        }
        var state: VolumeState
        if let known = lock.withLock({ volumes[id] }), known.epoch == volume.epoch {
            state = known
        } else {
            let stored = try await metadata.getViews(id)
            let next = (stored?.generation ?? 0) + 1
            state = VolumeState(epoch: volume.epoch, generation: next - 1, firstGeneration: next)
            lock.withLock { volumes[id] = state }
        }
        let next = state.generation + 1
        var fresh: [UInt64: Pinned] = [:]
        var superseded: [PinnedSnapshot] = []
        let local = shards.localShards(on: id)
        for shard in local {
            // Batches younger than one interval are left to the background applier:
            // a view then lags by about two intervals at most, plus the checkpoint and publishing.
            if let current = state.current[shard.id], !shard.changed(since: current.pin.transactionID, maxPending: interval) { continue }
            let pinBegan = ContinuousClock.now
            let (pin, published) = try await blockingWork { [interval] in try shard.pinForViews(applyingBatchesOlderThan: interval) }
            pinning += ContinuousClock.now - pinBegan
            let record = ShardSnapshotRecord(shardID: shard.id, takenIn: next, snapshot: try published.encoded())
            fresh[shard.id] = Pinned(pin: pin, record: record)
        }
        let localIDs = Set(local.map(\.id))
        let gone = state.current.keys.filter { !localIDs.contains($0) }
        if !fresh.isEmpty || !gone.isEmpty || state.generation < state.firstGeneration {
            var current = state.current
            for (shardID, pinned) in fresh {
                if let old = current[shardID] { superseded.append(old.pin) }
                current[shardID] = pinned
            }
            for shardID in gone {
                superseded.append(current.removeValue(forKey: shardID)!.pin)
                state.goneSince[shardID] = next
            }
            let views = VolumeViews(volumeID: id, epoch: volume.epoch, generation: next,
                                    publishedAt: Int64(Date().timeIntervalSince1970 * 1e9),
                                    shards: current.values.map(\.record).sorted { $0.shardID < $1.shardID })
            let publishBegan = ContinuousClock.now
            defer { publishing = ContinuousClock.now - publishBegan }
            do {
                try await metadata.publishViews(views)
            } catch {
                for pinned in fresh.values { pinned.pin.end() }
                if case MetadataError.conflict = error {
                    logger.warning("views not published: the volume's epoch moved on", metadata: ["volume": "\(id)"])
                    lock.withLock { _ = volumes.removeValue(forKey: id) }
                    return
                }
                throw error
            }
            state.current = current
            state.generation = next
            state.retired += superseded.map { (supersededIn: next, pin: $0) }
        }

        // A pin, or a deleted shard's files, may go once every live backup reads
        // only generations from the one that dropped it on. Which backups live is
        // asked after publishing: a backup registered again after a lapse of its
        // lease (which then loads the newest views) is counted, whatever it loads.
        let liveNodes = Set(try await metadata.listNodes().map(\.nodeID))
        let acks = try await metadata.viewAcknowledgements(id)
        let backups = volume.backupNodeIDs.filter { liveNodes.contains($0) }
        let oldestRead = backups.map { acks[$0] ?? 0 }.min() ?? UInt64.max
        state.retired.removeAll { retired in
            guard retired.supersededIn <= oldestRead else { return false }
            retired.pin.end()
            return true
        }
        removeDeletedFiles(of: volume, oldestRead: oldestRead, state: &state)
        lock.withLock { volumes[id] = state }
    }

    private func removeDeletedFiles(of volume: VolumeRecord, oldestRead: UInt64, state: inout VolumeState) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: volume.mountPath) else { return }
        for name in names where name.hasSuffix(".deleting") {
            guard let shardID = ShardDirectoryName.id(name.utf8.dropLast(".deleting".count)) else { continue }
            let since = state.goneSince[shardID] ?? state.firstGeneration
            guard since <= oldestRead else { continue }
            do {
                try FileManager.default.removeItem(atPath: volume.mountPath + "/" + name)
                state.goneSince.removeValue(forKey: shardID)
            } catch {
                logger.warning("cannot remove a deleted shard's files", metadata: ["dir": "\(name)", "error": "\(error)"])
            }
        }
    }
}
