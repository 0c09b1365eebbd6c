import Foundation
import Logging
import Metrics
import Metadata
import Volumes

/// Keeps this node's roles in step with the metadata, and promotes it when the
/// primary of a volume it backs is gone (docs/BACKUP-VIEWS.md, "Promotion"):
/// - a volume this node writes whose epoch moved on (another node won it) is
///   deposed at once: its shards take no more writes here;
/// - a volume that names this node primary at an epoch it does not hold yet (a
///   promotion by hand, `shardfs volume promote`) is taken over;
/// - a volume this node backs whose primary's node record has been gone for
///   `failoverDelay` (its lease lapsed) is won in metadata, then taken over.
/// Taking over: cut the old primary off the storage and confirm it, mount
/// read-write, open the shards (which replays their batch logs), start writing.
public final class Failover: @unchecked Sendable {
    public let failoverDelay: Duration
    /// Whether a backup promotes itself when its primary is gone (else only by hand).
    public let automatic: Bool
    private let nodeID: String
    private let metadata: any MetadataStore
    private let shards: ShardManager
    private let lease: LeaseGuard?
    /// Cuts the old primary off the volume (`oldPrimary`, or, when nil, whichever
    /// other instance has it attached read-write) and mounts it read-write here.
    private let takeOverVolume: @Sendable (_ volumeID: String, _ oldPrimary: String?) async throws -> MountedVolume
    /// Run when a promotion of the volume ends (`writing`: with this node writing
    /// it): a take-over that began here and did not end writing lets go of what
    /// it mounted, and the volume's views are served again if this node backs it.
    private let settle: @Sendable (_ volumeID: String, _ writing: Bool) async -> Void
    private let logger: Logger
    private let lock = NSLock()
    private var task: Task<Void, Never>?
    private var watchers: [String: Task<Void, Never>] = [:]
    /// Volumes asked to be promoted again while a promotion of them ran.
    private var lookAgain: Set<String> = []
    /// Set by `stop`: an event still being handled then starts no promotion.
    private var stopped = false
    /// Tests only: runs once a take-over has mounted the volume read-write, before
    /// the node checks that it still holds the volume (another node may win it meanwhile).
    public var beforeConfirmingTheWin: (@Sendable (_ volumeID: String) async -> Void)? {
        get { lock.withLock { _beforeConfirmingTheWin } }
        set { lock.withLock { _beforeConfirmingTheWin = newValue } }
    }
    private var _beforeConfirmingTheWin: (@Sendable (_ volumeID: String) async -> Void)?
    private var leaseTask: Task<Void, Never>?
    /// Promotions done, for reports: volume → how long from noticing to serving.
    public private(set) var promotions: [(volumeID: String, took: Duration)] = []

    public init(nodeID: String, metadata: any MetadataStore, shards: ShardManager, lease: LeaseGuard? = nil,
                failoverDelay: Duration, automatic: Bool = true,
                takeOverVolume: @escaping @Sendable (_ volumeID: String, _ oldPrimary: String?) async throws -> MountedVolume,
                settle: @escaping @Sendable (_ volumeID: String, _ writing: Bool) async -> Void = { _, _ in },
                logger: Logger = Logger(label: "shardfs.failover")) {
        self.nodeID = nodeID
        self.metadata = metadata
        self.shards = shards
        self.lease = lease
        self.failoverDelay = failoverDelay
        self.automatic = automatic
        self.takeOverVolume = takeOverVolume
        self.settle = settle
        self.logger = logger
    }

    public func start() async throws {
        let events = metadata.changes()
        // Primaries already gone when this node starts.
        let live = Set(try await metadata.listNodes().map(\.nodeID))
        for volume in try await metadata.listVolumes(nodeID: nodeID) where volume.backupNodeIDs.contains(nodeID) {
            if !live.contains(volume.primaryNodeID) { watchPrimary(of: volume.volumeID, primary: volume.primaryNodeID) }
        }
        lock.withLock {
            stopped = false
            task = Task { [weak self] in
                for await event in events {
                    guard let self else { return }
                    await self.handle(event)
                }
            }
            // A lease granted anew (after a lapse) is acted on once the roles are checked.
            if let lease {
                leaseTask = Task { [weak self, lease] in
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .milliseconds(250))
                        guard let self else { return }
                        await lease.recheck(shards: self.shards, metadata: self.metadata, logger: self.logger)
                    }
                }
            }
        }
    }

    /// Stops following the metadata and cancels promotions; returns once the
    /// event being handled and a take-over under way have ended. A take-over
    /// cut short is not settled: what it mounted read-write stays mounted, for
    /// the node's clean stop (`StorageNode.stop`) to release.
    public func stop() async {
        let running = lock.withLock { () -> [Task<Void, Never>] in
            stopped = true
            let running = [task, leaseTask].compactMap { $0 } + Array(watchers.values)
            for running in running { running.cancel() }
            task = nil
            leaseTask = nil
            watchers.removeAll()
            lookAgain.removeAll()
            return running
        }
        for task in running { await task.value }
    }

    func handle(_ event: MetadataEvent) async {
        switch event {
        case .volumeUpdated(let volume):
            let held = shards.primaryEpoch(volume.volumeID)
            if let held, volume.primaryNodeID != nodeID || volume.epoch != held {
                shards.depose(volume.volumeID)
            } else if held == nil, volume.primaryNodeID == nodeID, volume.epoch > 1 {
                // Won by hand (or by this node's own promotion, which is taking it over).
                pursue(volume.volumeID, after: .zero, mayWin: false)
            }
        case .nodeUnregistered(let gone):
            guard let volumes = try? await metadata.listVolumes(nodeID: nodeID) else { return }
            for volume in volumes where volume.primaryNodeID == gone && volume.backupNodeIDs.contains(nodeID) {
                watchPrimary(of: volume.volumeID, primary: gone)
            }
        default:
            break
        }
    }

    /// Waits `failoverDelay`; if the primary is still gone, wins the volume and takes it over.
    private func watchPrimary(of volumeID: String, primary: String) {
        guard automatic else { return }
        pursue(volumeID, after: failoverDelay, mayWin: true)
    }

    /// After `delay`, promotes this node for the volume (`promote`); `mayWin`:
    /// it may also win the volume from a primary that is gone (automatic
    /// failover), else it only takes over a volume the record names it primary
    /// of (by hand). While a promotion of the volume runs here, a new request
    /// makes it look again once done, instead of being dropped. At its end the
    /// volume is settled: a take-over that began here and did not end with this
    /// node writing the volume is given back.
    private func pursue(_ volumeID: String, after delay: Duration, mayWin: Bool) {
        let noticed = ContinuousClock.now
        lock.withLock {
            guard !stopped else { return }
            guard watchers[volumeID] == nil else {
                lookAgain.insert(volumeID)
                return
            }
            watchers[volumeID] = Task { [weak self] in
                if delay > .zero { try? await Task.sleep(for: delay) }
                while let self, !Task.isCancelled {
                    await self.promote(volumeID, mayWin: mayWin, goneSince: noticed)
                    guard !Task.isCancelled else { break }
                    await self.settle(volumeID, self.shards.primaryEpoch(volumeID) != nil)
                    let again = self.lock.withLock { () -> Bool in
                        if self.lookAgain.remove(volumeID) != nil { return true }
                        self.watchers.removeValue(forKey: volumeID)
                        return false
                    }
                    if !again { return }
                }  // cancelled: `stop` forgets the watchers
            }
        }
    }

    /// Takes the volume over while the record names this node its primary; with
    /// `mayWin`, first wins it from a primary that is gone. Tries again after
    /// failures (etcd down, say) until this node writes the volume, the record
    /// names a live primary (or, without `mayWin`, any other primary), or this
    /// node is neither primary nor backup of it. A win whose answer was lost is
    /// found on the next look: the volume names this node.
    private func promote(_ volumeID: String, mayWin: Bool, goneSince noticed: ContinuousClock.Instant) async {
        var pause = Duration.milliseconds(200)
        while !Task.isCancelled {
            do {
                let volume = try await metadata.getVolume(volumeID)
                if volume.primaryNodeID == nodeID {
                    await takeOver(volumeID, epoch: volume.epoch, oldPrimary: nil, noticed: noticed)
                    if shards.primaryEpoch(volumeID) == volume.epoch { return }
                } else {
                    guard mayWin else { return }
                    let live = Set(try await metadata.listNodes().map(\.nodeID))
                    guard !live.contains(volume.primaryNodeID), volume.backupNodeIDs.contains(nodeID) else { return }
                    logger.warning("the primary of a volume this node backs is gone; promoting",
                                   metadata: ["volume": "\(volumeID)", "old primary": "\(volume.primaryNodeID)", "epoch": "\(volume.epoch)"])
                    let won = try await metadata.updatePrimary(volumeID: volumeID, nodeID: nodeID, expectedEpoch: volume.epoch)
                    await takeOver(volumeID, epoch: won.epoch, oldPrimary: volume.primaryNodeID, noticed: noticed)
                    if shards.primaryEpoch(volumeID) == won.epoch { return }
                }
            } catch {
                logger.warning("promotion not done yet; trying again", metadata: ["volume": "\(volumeID)", "error": "\(error)"])
            }
            try? await Task.sleep(for: pause)
            pause = min(pause * 2, .seconds(5))
        }
    }

    /// Steps 2–4 of a promotion, for a volume this node has won at `epoch`.
    func takeOver(_ volumeID: String, epoch: UInt64, oldPrimary: String?, noticed: ContinuousClock.Instant) async {
        if shards.primaryEpoch(volumeID) == epoch { return }
        do {
            let mounted = try await takeOverVolume(volumeID, oldPrimary)
            if let hook = beforeConfirmingTheWin { await hook(volumeID) }
            // Still ours? A later epoch means someone else won meanwhile: do not write.
            let volume = try await metadata.getVolume(volumeID)
            guard volume.primaryNodeID == nodeID, volume.epoch == epoch else {
                logger.error("lost the volume while taking it over; not writing it", metadata: ["volume": "\(volumeID)"])
                return
            }
            try Task.checkCancellation()  // a node being stopped does not start writing
            try await shards.restore(mounted)
            let took = ContinuousClock.now - noticed
            lock.withLock { promotions.append((volumeID, took)) }
            Counter(label: "shardfs_promotions_total").increment()  // metrics (helper operations)
            logger.notice("this node is now the primary of the volume",
                          metadata: ["volume": "\(volumeID)", "epoch": "\(epoch)", "took": "\(took)"])
        } catch is CancellationError {
            logger.notice("stopped while taking over a volume; not writing it", metadata: ["volume": "\(volumeID)"])
        } catch {
            logger.error("taking over a volume failed; its shards are not served for writes here",
                         metadata: ["volume": "\(volumeID)", "error": "\(error)"])
        }
    }
}
