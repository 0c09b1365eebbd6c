import Foundation
import Logging
import ShardStore

/// Puts that `close()` handed over, and unlinks, that are not committed yet.
///
/// A durable commit costs two fsyncs (about 0.6 ms here), so one per `close()`
/// caps a sequential `cp` of small files near 1,700 files/s. Instead `close()`
/// queues the put here and returns; the entry is visible through the mount at
/// once (lookups, attributes and reads consult the queue), and a committer thread
/// commits each shard's queue as one batch every `interval`, or sooner when the
/// queue grows. `fsync()` and every other change to the shard commit the queue
/// first, so it is the durability barrier and order is kept.
///
/// A batch that fails (shard full, closed meanwhile, I/O error) loses those
/// puts: the failure is logged and returned by the next `fsync()` or `close()`
/// on that shard (`pendingFailure`). `close()` checks ownership, the closed state
/// and the room left before queueing, so that is rare.
final class WriteBehind: @unchecked Sendable {
    struct Pending {
        var value: [UInt8]
        /// The entry's indexes from this put on; nil keeps those it has.
        var indexes: [IndexPair]?
        /// What the entry has beside its value (its number is the one the put
        /// gives it if it creates it; mode and times are kept by the shard).
        var metadata = EntryMetadata()
        var modificationTime: Int64
        /// An unlink: the entry is gone for readers of the mount.
        var deleted = false
    }

    /// How long a batch gathers before the committer takes it (seconds).
    let interval: Double
    static let maxQueuedBytes = 32 << 20

    private let condition = NSCondition()
    private var queues: [UInt64: (shard: Shard, clientID: String, puts: [[UInt8]: Pending])] = [:]
    private var queuedBytes = 0
    /// What a queued value may take in the shard: its bytes plus page overhead.
    static func cost(_ bytes: Int) -> Int { bytes + bytes / 8 + 64 }

    /// Per shard: cost of what is queued or in flight (counted against the room left).
    private var shardBytes: [UInt64: Int] = [:]
    private var failures: [UInt64: Error] = [:]
    /// Shards whose queue is being committed: one commit per shard at a time, so a
    /// flush never returns while an earlier batch of the same shard is in flight.
    private var committing: Set<UInt64> = []
    /// Queues being committed stay visible until their commit has landed.
    private var inFlight: [UInt64: Queue] = [:]
    private var stopped = false
    private var thread: Thread?
    private let logger: Logger
    /// Runs a commit as the mount's own write (see `ShardFileSystem.own`).
    private let asOwnWrite: (UInt64, [[UInt8]], () throws -> Void) throws -> Void

    init(logger: Logger, interval: Double = 0.005,
         asOwnWrite: @escaping (UInt64, [[UInt8]], () throws -> Void) throws -> Void) {
        self.logger = logger
        self.interval = interval
        self.asOwnWrite = asOwnWrite
        // The thread keeps the queue alive until `stop()` ends it (the owner's
        // deinit at the latest): it must never outlive what it reads.
        let thread = Thread { [self] in self.committerLoop() }
        thread.name = "shardfs.write-behind"
        self.thread = thread
        thread.start()
    }

    /// Shards being closed: nothing more is queued for them (see `enqueue`).
    private var closing: Set<UInt64> = []

    /// Stops queueing for a shard about to close; a close() after this commits
    /// synchronously and so gets the true answer (EROFS once it is closed).
    func beginClosing(shard id: UInt64) { condition.withLock { _ = closing.insert(id) } }
    func endClosing(shard id: UInt64) { condition.withLock { _ = closing.remove(id) } }

    /// Queues a put (the caller checked that it may write); false if the shard is
    /// closing, and the caller must commit the put itself.
    func enqueue(_ shard: Shard, clientID: String, key: [UInt8], value: [UInt8], indexes: [IndexPair]? = nil,
                 metadata: EntryMetadata = EntryMetadata(), modificationTime: Int64, deleted: Bool = false) -> Bool {
        condition.withLock {
            guard !closing.contains(shard.id) else { return false }
            let wasIdle = queues.isEmpty
            // Changed in place: a copy of the queue would copy its whole table per put.
            let pending = Pending(value: value, indexes: indexes, metadata: metadata, modificationTime: modificationTime, deleted: deleted)
            let previous = queues[shard.id, default: (shard, clientID, [:])].puts.updateValue(pending, forKey: key)?.value.count
            queuedBytes += value.count - (previous ?? 0)
            shardBytes[shard.id, default: 0] += Self.cost(value.count) - (previous.map(Self.cost) ?? 0)
            if wasIdle || queuedBytes >= Self.maxQueuedBytes { condition.broadcast() }
            return true
        }
    }

    /// The queued put of an entry, if any (what readers of the mount see).
    func pending(shard: UInt64, key: [UInt8]) -> Pending? {
        condition.withLock { queues[shard]?.puts[key] ?? inFlight[shard]?.puts[key] }
    }

    /// Bytes queued for a shard (counted against its room when queueing more).
    func queuedBytes(shard: UInt64) -> Int {
        condition.withLock { shardBytes[shard] ?? 0 }
    }

    /// Commits the shard's queue now: the barrier before any other change to the
    /// shard and for fsync. A failed batch is reported by `takeFailure`, which
    /// only close() and fsync() call (other operations must not report it).
    func flush(shard id: UInt64) {
        let queue = condition.withLock { () -> Queue? in
            while committing.contains(id) { condition.wait() }
            return take(id)
        }
        if let queue { commitAndFinish(queue) }
    }

    typealias Queue = (shard: Shard, clientID: String, puts: [[UInt8]: Pending])

    /// Removes a shard's queue and marks it committing (lock held).
    private func take(_ id: UInt64) -> Queue? {
        guard let queue = queues.removeValue(forKey: id) else { return nil }
        queuedBytes -= queue.puts.values.reduce(0) { $0 + $1.value.count }
        committing.insert(id)
        inFlight[id] = queue
        return queue
    }

    private func commitAndFinish(_ queue: Queue) {
        var failure: Error?
        do { try commit(queue) } catch { failure = error }
        condition.withLock {
            if let failure { failures[queue.shard.id] = failure }
            committing.remove(queue.shard.id)
            inFlight.removeValue(forKey: queue.shard.id)
            let left = (shardBytes[queue.shard.id] ?? 0) - queue.puts.values.reduce(0) { $0 + Self.cost($1.value.count) }
            shardBytes[queue.shard.id] = left > 0 ? left : nil
            condition.broadcast()
        }
    }

    /// A failure of a background commit not yet reported, if any.
    func takeFailure(shard id: UInt64) -> Error? {
        condition.withLock { failures.removeValue(forKey: id) }
    }

    /// Commits everything (unmount) and stops the committer.
    func stop() {
        let committer = condition.withLock { () -> Thread? in
            stopped = true
            condition.broadcast()
            return thread
        }
        // Called on the committer itself (its owner's last reference went there):
        // it ends once this returns; waiting for it would wait forever.
        if let committer, committer === Thread.current { return }
        condition.withLock { while thread != nil { condition.wait() } }
    }

    private func commit(_ queue: Queue) throws {
        let items = queue.puts.map { key, pending in
            guard !pending.deleted else { return EntryWrite.deletion(of: key) }
            var item = EntryWrite(key: key, value: pending.value, indexes: pending.indexes ?? [],
                                  modificationTime: pending.modificationTime, keepsIndexes: pending.indexes == nil)
            if pending.metadata.number > 0 { item.entryNumber = pending.metadata.number }
            item.creationMode = pending.metadata.mode
            return item
        }
        do {
            try asOwnWrite(queue.shard.id, Array(queue.puts.keys)) {
                do {
                    let statuses = try queue.shard.batchPut(items, clientID: queue.clientID)
                    if let failed = statuses.compactMap({ $0 }).first { throw failed }
                } catch ShardError.full, ShardError.tooLarge {
                    // The batch does not fit as a whole: keep every put that fits alone.
                    var lastFailure: Error?
                    for item in items {
                        do {
                            if let failed = try queue.shard.batchPut([item], clientID: queue.clientID).first ?? nil { throw failed }
                        } catch { lastFailure = error }
                    }
                    if let lastFailure { throw lastFailure }
                }
            }
        } catch {
            logger.error("queued writes could not be committed and are lost",
                         metadata: ["shard": "\(queue.shard.id)", "entries": "\(items.count)", "error": "\(error)"])
            throw error
        }
    }

    private func committerLoop() {
        while true {
            let (batch, done) = condition.withLock { () -> ([Queue], Bool) in
                // Idle: sleep until something is queued. Then let a batch gather
                // for `interval` (unless it is already large or we are stopping).
                while queues.isEmpty && !stopped { condition.wait() }
                if !stopped && queuedBytes < Self.maxQueuedBytes {
                    _ = condition.wait(until: Date(timeIntervalSinceNow: interval))
                }
                // Shards being flushed right now are left for the next round.
                let ids = queues.keys.filter { !committing.contains($0) }
                return (ids.compactMap { take($0) }, stopped && queues.isEmpty && committing.isEmpty)
            }
            for queue in batch { commitAndFinish(queue) }
            if done {
                condition.withLock {
                    thread = nil
                    condition.broadcast()
                }
                return
            }
        }
    }
}
