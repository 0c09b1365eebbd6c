import Foundation
import ShardStore

/// Times of shard directories as the mount shows them: they move to now as
/// entries are made, removed and renamed through the mount, and to the time
/// set with utimensat (which the caller stores in the shard at once); the ones
/// moved are stored in their shards at unmount (`unstored`). A shard whose
/// time was never stored starts at the mount's start. Leaf lock.
final class DirectoryTimes: @unchecked Sendable {
    struct Times {
        var modification: Int64
        var change: Int64
        /// Moved since it was stored.
        var unstored = false
    }

    private let lock = NSLock()
    private var times: [UInt64: Times] = [:]
    private let mountTime: Int64

    init(mountTime: Int64) { self.mountTime = mountTime }

    func of(_ shard: Shard) -> Times {
        if let known = lock.withLock({ times[shard.id] }) { return known }
        let time = ((try? shard.directoryTime()) ?? nil) ?? mountTime  // read outside the lock
        return lock.withLock {
            if let known = times[shard.id] { return known }
            times[shard.id] = Times(modification: time, change: time)
            return times[shard.id]!
        }
    }

    /// An entry was made, removed or renamed now.
    func touch(_ shard: Shard, now: Int64) {
        _ = of(shard)
        lock.withLock { times[shard.id] = Times(modification: now, change: now, unstored: true) }
    }

    /// utimensat of the directory (`modification`, stored by the caller), or a
    /// change of its mode (nil): its change time is now.
    func set(_ shard: Shard, modification: Int64?, now: Int64) {
        let current = of(shard)
        lock.withLock {
            times[shard.id] = Times(modification: modification ?? current.modification, change: now,
                                    unstored: modification == nil && current.unstored)
        }
    }

    /// Directories whose time moved since it was stored: shard ID → modification time.
    func unstored() -> [(UInt64, Int64)] {
        lock.withLock { times.filter(\.value.unstored).map { ($0.key, $0.value.modification) } }
    }
}
