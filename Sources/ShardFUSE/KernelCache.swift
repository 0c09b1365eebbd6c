import Foundation

/// What the mount tells the kernel to forget, and which commits are its own.
///
/// The kernel caches names, attributes and pages; a change made elsewhere (the
/// batch service, another handle's commit reported by the shard) must drop
/// them, but the mount's own writes went through the kernel already, so
/// dropping their caches would only cost. The callbacks are the session's and
/// run asynchronously: never inside a request handler (deadlock). Leaf locks:
/// the commit hook reads them while the committing thread may hold others.
final class KernelCache: @unchecked Sendable {
    private let callbackLock = NSLock()
    private var inodesCallback: (@Sendable ([UInt64]) -> Void)?
    private var nameCallback: (@Sendable (UInt64, [UInt8]) -> Void)?

    private let ownLock = NSLock()
    /// Entries this mount is committing itself, with how many commits are in progress for each.
    private var ownWrites: [OwnWrite: Int] = [:]
    private struct OwnWrite: Hashable { var shard: UInt64; var key: [UInt8] }

    /// Forgets cached attributes and pages of inodes.
    var invalidate: (@Sendable ([UInt64]) -> Void)? {
        get { callbackLock.withLock { inodesCallback } }
        set { callbackLock.withLock { inodesCallback = newValue } }
    }

    /// Forgets a cached name (parent inode, name).
    var invalidateName: (@Sendable (UInt64, [UInt8]) -> Void)? {
        get { callbackLock.withLock { nameCallback } }
        set { callbackLock.withLock { nameCallback = newValue } }
    }

    /// Runs a write of this mount's own, so that its commit is not mistaken for a
    /// change made elsewhere.
    func own<T>(_ shard: UInt64, _ keys: [[UInt8]], _ body: () throws -> T) rethrows -> T {
        let marks = keys.map { OwnWrite(shard: shard, key: $0) }
        ownLock.withLock { for mark in marks { ownWrites[mark, default: 0] += 1 } }
        defer {  // the commit hook has run by now
            ownLock.withLock {
                for mark in marks {
                    let left = (ownWrites[mark] ?? 1) - 1
                    ownWrites[mark] = left > 0 ? left : nil
                }
            }
        }
        return try body()
    }

    /// Of `keys` committed to a shard, those this mount did not write itself.
    func foreign(shard: UInt64, _ keys: [[UInt8]]) -> [[UInt8]] {
        ownLock.withLock { keys.filter { ownWrites[OwnWrite(shard: shard, key: $0)] == nil } }
    }
}
