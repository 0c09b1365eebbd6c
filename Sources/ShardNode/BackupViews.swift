import Foundation
import LMDBSnapshot
import Logging
import Metadata
import NodeSupport
import ShardStore
import Volumes

/// The backup's half of backup views (docs/BACKUP-VIEWS.md). For every volume
/// this node backs it follows the generations the primary publishes: builds a
/// `ShardView` of each changed shard (read from the volume's block device by the
/// published extents; from the file itself for a folder volume, which shares this
/// host's page cache), swaps the generation in, waits until no read uses the one
/// before, and acknowledges the new one so the primary can end older pins.
///
/// Views are served only under the lease they were loaded under. The primary
/// keeps pins for live backups only: once this node's lease lapsed, the
/// snapshots its views read may have been released and their pages reused, so
/// after a new lease it serves nothing until it has fetched the newest generation
/// of every volume it backs again (docs/BACKUP-VIEWS.md, "A backup whose lease lapsed").
/// A generation counts as loaded under lease L when it was fetched (`getViews`)
/// while L was held, or came through the stream later than such a fetch: a
/// generation from the stream's backlog may be one whose pins ended while this
/// node was not live. Generations are swapped in one at a time, never backwards.
///
/// Nor does it rely on the stream alone: every `confirmEvery` it fetches the newest
/// generation of each volume, and it serves a volume's views only for
/// `currentFor` after a fetch began that they are at least as new as. A primary
/// that restarted (its pins died with it) publishes a generation without shards
/// and waits, for a backup that does not acknowledge it, longer than that: such a
/// backup has either fetched it (and dropped the old views) or stopped serving
/// them (docs/BACKUP-VIEWS.md, "A primary that restarts").
public final class BackupViews: @unchecked Sendable {
    private let nodeID: String
    private let metadata: any MetadataStore
    private let volumes: any VolumeManager
    private let logger: Logger
    private let lock = NSLock()
    /// Newest generation of each volume.
    private var current: [String: Generation] = [:]
    /// Shard → its volume, for the newest generations.
    private var volumeOf: [UInt64: String] = [:]
    private let leaseGeneration: @Sendable () -> UInt64?
    private var task: Task<Void, Never>?
    /// Applies to one volume run one at a time (the stream's and a fetch's);
    /// volumes do not wait for each other.
    private var gates: [String: SerialGate] = [:]
    private func gate(_ volumeID: String) -> SerialGate {
        lock.withLock {
            if let gate = gates[volumeID] { return gate }
            let gate = SerialGate()
            gates[volumeID] = gate
            return gate
        }
    }
    /// Set by `stop`: nothing is swapped in afterwards.
    private var stopped = false
    /// Per volume: the newest generation fetched, and the lease held when the
    /// fetch began. Generations from the stream at or past it are safe under that lease.
    private var fetched: [String: (lease: UInt64, epoch: UInt64, generation: UInt64)] = [:]
    /// How long views stay served after a fetch showed them current (nil: always),
    /// and how often that is checked.
    private let currentFor: Duration?
    private let confirmEvery: Duration
    /// Per volume: when the last fetch that showed its views current began.
    private var confirmedCurrent: [String: ContinuousClock.Instant] = [:]
    private var confirmer: Task<Void, Never>?
    /// Volumes whose check is running.
    private var confirming: Set<String> = []
    /// Tests only: the periodic fetches stop while set (as when they cannot run).
    public var confirmationsHeld: Bool {
        get { lock.withLock { holdingConfirmations } }
        set { lock.withLock { holdingConfirmations = newValue } }
    }
    private var holdingConfirmations = false
    /// Fetches of a volume's views under a newer lease than the one before (tests, status).
    public var reloadsAfterLeaseChange: Int { lock.withLock { reloadCount } }
    private var reloadCount = 0
    /// Tests only: while set, generations from the stream wait (as on a backup
    /// whose metadata stream is behind); `releaseUpdates` applies them in order.
    /// Fetches still apply.
    public var updatesHeld: Bool {
        get { lock.withLock { holdingUpdates } }
        set { lock.withLock { holdingUpdates = newValue } }
    }
    private var holdingUpdates = false
    private var heldUpdates: [VolumeViews] = []
    private static let holdFile = ProcessInfo.processInfo.environment["SHARDFS_TEST_HOLD_VIEWS_FILE"]
    private var backlogClosed = false

    /// Tests only: what the stream brings from now on is dropped, not held: the
    /// backlog `releaseUpdates` applies ends here.
    public func closeBacklog() { lock.withLock { backlogClosed = true } }

    /// Tests only: stops holding and applies what the stream brought meanwhile.
    public func releaseUpdates() async {
        let backlog = lock.withLock { () -> [VolumeViews] in
            holdingUpdates = false
            backlogClosed = false
            defer { heldUpdates = [] }
            return heldUpdates
        }
        for views in backlog { await apply(views, fetchedUnder: nil) }
    }

    /// Whether the stream's `views` wait (tests; see `updatesHeld`). While the file
    /// named by SHARDFS_TEST_HOLD_VIEWS_FILE exists (tests of nodes run as
    /// processes), they are dropped, as by a stream that is stuck.
    private func holdBack(_ views: VolumeViews) -> Bool {
        if let file = Self.holdFile, FileManager.default.fileExists(atPath: file) { return true }
        return lock.withLock {
            if holdingUpdates && !backlogClosed { heldUpdates.append(views) }
            return holdingUpdates
        }
    }
    /// Volumes being taken over: their views stay dropped.
    private var takenOver: Set<String> = []

    private func releasedForTakeOver(_ volumeID: String) -> Bool { lock.withLock { takenOver.contains(volumeID) } }

    private var listeners: [UInt64: Listener] = [:]
    private var nextListener: UInt64 = 1

    /// A generation swapped in: the shards with a new snapshot (or newly
    /// served), and those no longer served. Told after the swap.
    public typealias Listener = @Sendable (_ volumeID: String, _ changed: [UInt64], _ removed: [UInt64]) -> Void

    /// A volume's views at one generation, and the reads still using them.
    final class Generation: @unchecked Sendable {
        let views: VolumeViews
        let shards: [UInt64: (takenIn: UInt64, view: ShardView)]
        /// The lease this node held when it began loading them (nil: none was fresh).
        let lease: UInt64?
        private let lock = NSLock()
        private var readers = 0
        init(views: VolumeViews, shards: [UInt64: (takenIn: UInt64, view: ShardView)], lease: UInt64?) {
            self.views = views
            self.shards = shards
            self.lease = lease
        }
        func enter() { lock.withLock { readers += 1 } }
        func leave() { lock.withLock { readers -= 1 } }
        var isIdle: Bool { lock.withLock { readers == 0 } }
    }

    /// `leaseGeneration`: the lease this node surely still holds (`LeaseGuard.freshGeneration`),
    /// nil when none is fresh; a read that ends when it is not the lease its views
    /// were loaded under is answered with an error, not its bytes.
    /// `currentFor`: how long a volume's views are served after a fetch showed them
    /// current (less than the lease TTL; nil: no bound), checked every `confirmEvery`.
    public init(nodeID: String, metadata: any MetadataStore, volumes: any VolumeManager,
                leaseGeneration: @escaping @Sendable () -> UInt64? = { 0 }, currentFor: Duration? = nil,
                confirmEvery: Duration = .seconds(1), logger: Logger = Logger(label: "shardfs.backup")) {
        self.nodeID = nodeID
        self.metadata = metadata
        self.volumes = volumes
        self.leaseGeneration = leaseGeneration
        self.currentFor = currentFor
        self.confirmEvery = confirmEvery
        self.logger = logger
    }

    /// Loads the newest generation of every volume this node backs, then follows
    /// new ones through the metadata's change stream.
    public func start() async throws {
        let events = metadata.changes()
        for volume in try await metadata.listVolumes(nodeID: nodeID) where volume.backupNodeIDs.contains(nodeID) {
            try await fetchAndApply(volume.volumeID)
        }
        lock.withLock {
            task = Task { [weak self] in
                for await event in events {
                    guard let self else { return }
                    switch event {
                    case .viewsPublished(let views): if !self.holdBack(views) { await self.apply(views, fetchedUnder: nil) }
                    case .volumeUpdated(let volume): await self.follow(volume)
                    default: break
                    }
                }
            }
            if currentFor != nil {
                confirmer = Task { [weak self, confirmEvery] in
                    while !Task.isCancelled {
                        try? await Task.sleep(for: confirmEvery)
                        guard let self else { return }
                        if !self.confirmationsHeld { self.checkVolumes() }
                    }
                }
            }
        }
    }

    /// Fetches the newest generation of every volume this node backs (see
    /// `fetchAndApply`): periodically, and at once after a lease change. One
    /// check per volume at a time, side by side: a volume slow to apply (readers
    /// to drain, an acknowledgement retried) holds up no other.
    private func checkVolumes() {
        let ids = lock.withLock { () -> [String] in
            guard task != nil else { return [] }  // not started, or stopped
            let due = Set(fetched.keys).union(current.keys).subtracting(confirming)
            confirming.formUnion(due)
            return Array(due)
        }
        for id in ids {
            Task { [weak self] in
                guard let self else { return }
                defer { _ = self.lock.withLock { self.confirming.remove(id) } }
                do { try await self.fetchAndApply(id) } catch {
                    self.logger.warning("cannot fetch a volume's newest views; they stop being served if this lasts",
                                        metadata: ["volume": "\(id)", "error": "\(error)"])
                }
            }
        }
    }

    public func stop() {
        lock.withLock {
            stopped = true
            task?.cancel()
            task = nil
            confirmer?.cancel()
            confirmer = nil
            current.removeAll()
            volumeOf.removeAll()
            fetched.removeAll()
            confirmedCurrent.removeAll()
        }
    }

    /// Fetches the volume's newest generation and applies it as loaded under the
    /// lease held when the fetch began.
    private func fetchAndApply(_ volumeID: String) async throws {
        let began = ContinuousClock.now
        let lease = leaseGeneration()
        if let views = try await metadata.getViews(volumeID) {
            await apply(views, fetchedUnder: .some(lease))
            // Current as of `began` if what is held now is at least as new.
            lock.withLock {
                if let held = current[volumeID], (held.views.epoch, held.views.generation) >= (views.epoch, views.generation) {
                    confirmedCurrent[volumeID] = max(confirmedCurrent[volumeID] ?? began, began)
                }
            }
        } else {
            await gate(volumeID).run {
                self.lock.withLock {
                    // None published yet: whatever the stream brings from now on is newer.
                    if let lease, self.fetched[volumeID] == nil { self.fetched[volumeID] = (lease, 0, 0) }
                    self.confirmedCurrent[volumeID] = max(self.confirmedCurrent[volumeID] ?? began, began)
                }
            }
        }
    }

    /// A volume this node was just made a backup of (while running): attach it
    /// read-only and serve its newest views.
    func follow(_ volume: VolumeRecord) async {
        guard volume.backupNodeIDs.contains(nodeID), volume.primaryNodeID != nodeID,
              backedVolume(volume.volumeID) == nil, !releasedForTakeOver(volume.volumeID) else { return }
        do {
            if let block = volumes as? BlockVolumeManager {
                _ = try await block.attach(volume.volumeID, readOnly: true)
            } else {
                _ = try await volumes.mount(volume.volumeID, readOnly: true)
            }
        } catch {
            logger.error("cannot attach a volume this node was made a backup of; restart the node to retry",
                         metadata: ["volume": "\(volume.volumeID)", "error": "\(error)"])
            return
        }
        logger.notice("this node is now a backup of the volume", metadata: ["volume": "\(volume.volumeID)"])
        do {
            try await fetchAndApply(volume.volumeID)
        } catch {
            logger.warning("cannot fetch the views of a volume this node now backs; the periodic fetch retries",
                           metadata: ["volume": "\(volume.volumeID)", "error": "\(error)"])
        }
    }

    /// Stops serving views of a volume and lets go of its device (before this node
    /// takes the volume over: its read-only attachment must be free to detach).
    /// Returns once no read uses them.
    public func release(_ volumeID: String) async {
        let dropped = lock.withLock { () -> Generation? in
            takenOver.insert(volumeID)
            volumeOf = volumeOf.filter { $0.value != volumeID }
            fetched.removeValue(forKey: volumeID)
            confirmedCurrent.removeValue(forKey: volumeID)
            return current.removeValue(forKey: volumeID)
        }
        if let dropped {
            while !dropped.isIdle { try? await Task.sleep(for: .milliseconds(2)) }
        }
    }

    /// Whether the volume's views were let go for a take-over (`release`) that has not ended (`readmit`).
    public func isReleased(_ volumeID: String) -> Bool { releasedForTakeOver(volumeID) }

    /// Ends what `release` began, once the take-over is over: if it did not end
    /// with this node writing the volume and the record names this node a backup
    /// (someone made it one again: a winner leaves the backups), the volume is
    /// attached read-only and its newest views are loaded (`follow`).
    public func readmit(_ volumeID: String) async {
        guard lock.withLock({ takenOver.remove(volumeID) != nil }) else { return }
        do {
            await follow(try await metadata.getVolume(volumeID))
        } catch {
            logger.warning("cannot read the record of a volume given back after a take-over; a change to it serves it again",
                           metadata: ["volume": "\(volumeID)", "error": "\(error)"])
        }
    }

    /// Adds a listener told after each generation is swapped in (on the task
    /// that follows the metadata; keep it short). Returns what `removeListener` takes.
    public func addListener(_ listener: @escaping Listener) -> UInt64 {
        lock.withLock {
            defer { nextListener += 1 }
            listeners[nextListener] = listener
            return nextListener
        }
    }

    public func removeListener(_ id: UInt64) { lock.withLock { _ = listeners.removeValue(forKey: id) } }

    /// The shards this node serves views of, by ID.
    public func servedShards() -> [UInt64] { lock.withLock { volumeOf.keys.sorted() } }

    /// Whether this node serves a view of the shard.
    public func serves(_ shardID: UInt64) -> Bool { lock.withLock { volumeOf[shardID] != nil } }

    /// The volume of a shard this node serves a view of.
    public func volume(of shardID: UInt64) -> String? { lock.withLock { volumeOf[shardID] } }

    /// The newest generation applied for a volume, and when the primary published it.
    public func generation(of volumeID: String) -> (generation: UInt64, publishedAt: Int64)? {
        lock.withLock { current[volumeID].map { ($0.views.generation, $0.views.publishedAt) } }
    }

    /// Runs `body` with the newest view of the shard; nil if this node serves none.
    /// Throws `notPrimary` when, before or after the read, this node's lease cannot
    /// be confirmed, is not the one the views count as loaded under, or the views
    /// were not shown current within `currentFor` (what was read is then dropped:
    /// the caller must not have sent any of it).
    public func withView<R>(_ shardID: UInt64, _ body: (ShardView) throws -> R) throws -> R? {
        let found = lock.withLock { () -> (Generation, ShardView, ContinuousClock.Instant?)? in
            guard let volumeID = volumeOf[shardID], let generation = current[volumeID],
                  let entry = generation.shards[shardID] else { return nil }
            generation.enter()
            return (generation, entry.view, confirmedCurrent[volumeID])
        }
        guard let (generation, view, confirmed) = found else { return nil }
        defer { generation.leave() }
        if let currentFor, (confirmed.map { ContinuousClock.now > $0 + currentFor } ?? true) {
            throw ShardError.notPrimary("this backup has not confirmed for \(currentFor) that its views are the newest; they are not served")
        }
        guard let lease = leaseGeneration() else {
            throw ShardError.notPrimary("this backup cannot confirm its lease; its views are not served")
        }
        guard generation.lease == lease else {
            checkVolumes()
            throw ShardError.notPrimary("this backup's lease lapsed since its views were loaded; they are loaded again before it serves")
        }
        let result = try body(view)
        guard leaseGeneration() == lease else { throw ShardError.notPrimary("this backup's lease lapsed during the read") }
        if let currentFor, let confirmed, ContinuousClock.now > confirmed + currentFor {
            throw ShardError.notPrimary("this backup's views stopped being shown current during the read")
        }
        return result
    }

    /// Swaps in a published generation (if newer than the one held, or the same
    /// one loaded under a newer lease) and, once no read uses the previous one,
    /// acknowledges it. `fetchedUnder`: the lease held when `getViews` began
    /// (`.some(nil)`: none was fresh); nil: it came through the stream.
    func apply(_ views: VolumeViews, fetchedUnder: UInt64?? = nil) async {
        await gate(views.volumeID).run { await self.applyNow(views, fetchedUnder: fetchedUnder) }
    }

    private func applyNow(_ views: VolumeViews, fetchedUnder: UInt64??) async {
        let id = views.volumeID
        guard let mounted = backedVolume(id), !releasedForTakeOver(id) else { return }
        let (lease, previous) = lock.withLock { () -> (UInt64?, Generation?) in
            let lease: UInt64?
            if let fetchedUnder {
                lease = fetchedUnder
                // A fetch that began under an older lease than one already fetched under
                // (it stalled across a lapse) does not move the baseline back.
                if let l = fetchedUnder, l >= fetched[id]?.lease ?? 0,
                   fetched[id]?.lease != l || !Self.isOlder((views.epoch, views.generation), than: fetched[id]) {
                    if let before = fetched[id]?.lease, l > before { reloadCount += 1 }
                    fetched[id] = (l, views.epoch, views.generation)
                }
            } else if let base = fetched[id], let now = leaseGeneration(), base.lease == now,
                      !Self.isOlder((views.epoch, views.generation), than: base) {
                lease = now
            } else {
                lease = nil  // from the backlog of an older lease, or none is fresh: not served
            }
            return (lease, current[id])
        }
        if let previous {
            let held = (previous.views.epoch, previous.views.generation), offered = (views.epoch, views.generation)
            if held > offered { return }  // never backwards
            if held == offered {
                // The same generation again only to count it under a newer lease (leases only grow).
                guard let lease, previous.lease.map({ lease > $0 }) ?? true else { return }
            }
        }
        var built: [UInt64: (takenIn: UInt64, view: ShardView)] = [:]
        var changed: [UInt64] = []
        for record in views.shards {
            if let kept = previous?.shards[record.shardID], kept.takenIn == record.takenIn, previous?.views.epoch == views.epoch {
                built[record.shardID] = kept
                continue
            }
            do {
                built[record.shardID] = (record.takenIn, try await blockingWork { try Self.view(record, on: mounted) })
                changed.append(record.shardID)
            } catch {
                logger.error("cannot open a shard's view; it is not served until the next generation",
                             metadata: ["shard": "\(record.shardID)", "volume": "\(id)", "error": "\(error)"])
            }
        }
        let generation = Generation(views: views, shards: built, lease: lease)
        let told = lock.withLock { () -> [Listener]? in
            guard !stopped, !takenOver.contains(id), current[id] === previous else { return nil }  // released or stopped meanwhile
            current[id] = generation
            volumeOf = volumeOf.filter { $0.value != id }
            for shardID in built.keys { volumeOf[shardID] = id }
            return Array(listeners.values)
        }
        guard let told else { return }
        let removed = previous.map { $0.shards.keys.filter { built[$0] == nil } } ?? []
        if !changed.isEmpty || !removed.isEmpty { for listener in told { listener(id, changed, removed) } }
        // Reads that began on the previous generation finish first.
        if let previous {
            while !previous.isIdle { try? await Task.sleep(for: .milliseconds(2)) }
        }
        do {
            try await metadata.acknowledgeViews(volumeID: id, nodeID: nodeID, generation: views.generation)
        } catch {
            logger.warning("cannot acknowledge a generation of views; the primary keeps older snapshots pinned",
                           metadata: ["volume": "\(id)", "generation": "\(views.generation)", "error": "\(error)"])
        }
    }

    /// Whether (epoch, generation) `a` comes before `b`.
    private static func isOlder(_ a: (UInt64, UInt64), than b: (lease: UInt64, epoch: UInt64, generation: UInt64)?) -> Bool {
        guard let b else { return false }
        return a < (b.epoch, b.generation)
    }

    /// Where this node reads a volume it backs: the block device it holds attached
    /// read-only (not mounted), or, for a folder volume, the folder.
    private func backedVolume(_ volumeID: String) -> MountedVolume? {
        if let block = volumes as? BlockVolumeManager {
            guard let attached = block.attachedVolumes().first(where: { $0.volumeID == volumeID && $0.readOnly }) else { return nil }
            return MountedVolume(volumeID: volumeID, mountPath: block.mountPath(volumeID), readOnly: true, device: attached.device)
        }
        return volumes.mountedVolumes().first { $0.volumeID == volumeID && $0.readOnly }
    }

    static func view(_ record: ShardSnapshotRecord, on volume: MountedVolume) throws -> ShardView {
        let published = try PublishedSnapshot.decode(record.snapshot)
        let path = volume.mountPath + "/" + ShardDirectoryName.of(record.shardID)
        let source: any PageSource
        if volume.device.isEmpty {
            // A folder volume: this host's page cache is the primary's.
            source = try FilePageSource(path: path + "/data.mdb", pageSize: published.root.pageSize)
        } else {
            source = try DevicePageSource(device: volume.device, extents: published.extents, pageSize: published.root.pageSize)
        }
        return try ShardView(snapshot: try Snapshot(source: source, root: published.root), transactionID: published.root.txnid, path: path,
                             device: volume.device.isEmpty ? nil : volume.device)
    }
}

/// Runs async bodies one at a time, in the order they arrive.
final class SerialGate: @unchecked Sendable {
    private let lock = NSLock()
    private var busy = false
    private var waiting: [CheckedContinuation<Void, Never>] = []

    func run<T>(_ body: () async -> T) async -> T {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = lock.withLock { () -> Bool in
                if busy { waiting.append(c); return false }
                busy = true
                return true
            }
            if now { c.resume() }
        }
        let result = await body()
        let next = lock.withLock { () -> CheckedContinuation<Void, Never>? in
            if waiting.isEmpty { busy = false; return nil }
            return waiting.removeFirst()
        }
        next?.resume()
        return result
    }
}
