import Foundation

/// Applies the shards' logged batches to LMDB in the background. It waits until
/// a shard has enough pending for a transaction where entries share B-tree pages
/// (`Shard.applyThreshold`), or until its writers pause for `idleDelay`, so under
/// load LMDB gets few large transactions, and after the load it (and read-only
/// views of the shard) catch up within milliseconds. Readers do not wait for it:
/// a read that needs pending batches applies them itself. It also makes batches
/// put with durability deferred durable once the oldest is `idleDelay` old
/// (`Shard.sync`, unless an apply does it). One thread for all shards, started
/// on first use.
final class LogApplier: @unchecked Sendable {
    static let shared = LogApplier()
    static let idleDelay = Duration.milliseconds(5)

    private struct Weak { weak var shard: Shard? }

    private let condition = NSCondition()
    private var waiting: [ObjectIdentifier: Weak] = [:]
    private var started = false

    /// Tells the applier that `shard` has pending batches.
    func wake(_ shard: Shard) {
        // Queued already (the usual case under load): the applier looks at the
        // shard after taking it out of the queue, so it sees what was logged before.
        if shard.queuedForApplier.load(ordering: .acquiring) { return }
        condition.lock()
        let known = waiting[ObjectIdentifier(shard)] != nil
        waiting[ObjectIdentifier(shard)] = Weak(shard: shard)
        shard.queuedForApplier.store(true, ordering: .releasing)
        if !started {
            started = true
            let thread = Thread { [self] in
                // Named from inside: set before `start()`, the name does not reach Linux (15 bytes at most).
                Thread.current.name = "shardfs-applier"
                loop()
            }
            thread.start()
        }
        if !known { condition.signal() }
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while waiting.isEmpty { condition.wait() }
            let shards = waiting.values.compactMap(\.shard)
            waiting.removeAll(keepingCapacity: true)
            for shard in shards { shard.queuedForApplier.store(false, ordering: .releasing) }
            condition.unlock()

            var later: [Shard] = []
            for shard in shards {
                // Puts whose durability was deferred are made durable within
                // about `idleDelay` (a failure is reported by the next `sync()`).
                let deferred = shard.deferredSync(after: Self.idleDelay)
                let applying = shard.logIsWorthApplying()
                // An apply makes them durable too (in LMDB): no fdatasync of the log first.
                if deferred.due && !applying { try? shard.sync() }
                if applying {
                    // A failure is kept by the shard and reported to its next reader or writer.
                    try? shard.applyLog()
                } else if shard.hasPendingBatches || (deferred.waiting && !deferred.due) {
                    later.append(shard)
                }
            }
            guard !later.isEmpty else { continue }
            condition.lock()
            for shard in later {
                waiting[ObjectIdentifier(shard)] = Weak(shard: shard)
                shard.queuedForApplier.store(true, ordering: .releasing)
            }
            _ = condition.wait(until: Date().addingTimeInterval(0.002))
            condition.unlock()
        }
    }
}
