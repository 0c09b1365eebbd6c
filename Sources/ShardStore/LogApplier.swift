import Foundation

/// Applies the shards' logged batches to LMDB in the background, as soon as it
/// can: under load each pass finds many batches waiting and applies them in one
/// transaction; when the load stops, LMDB (and read-only views of the shard)
/// catch up within one commit. One thread for all shards, started on first use.
final class LogApplier: @unchecked Sendable {
    static let shared = LogApplier()

    private struct Weak { weak var shard: Shard? }

    private let condition = NSCondition()
    private var waiting: [ObjectIdentifier: Weak] = [:]
    private var started = false

    /// Asks for `shard`'s pending batches to be applied.
    func wake(_ shard: Shard) {
        condition.lock()
        waiting[ObjectIdentifier(shard)] = Weak(shard: shard)
        if !started {
            started = true
            let thread = Thread { [self] in loop() }
            thread.name = "shardfs-log-applier"
            thread.start()
        }
        condition.signal()
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while waiting.isEmpty { condition.wait() }
            let shards = waiting.values.compactMap(\.shard)
            waiting.removeAll(keepingCapacity: true)
            condition.unlock()
            // A failure is kept by the shard and reported to its next reader or writer.
            for shard in shards { try? shard.applyLog() }
        }
    }
}
