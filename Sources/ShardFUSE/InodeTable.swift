import Foundation

/// What an inode stands for.
enum NodeKind: Hashable, Sendable {
    case root
    case shard(UInt64)
    /// `key`: the bytes of a valid `EntryKey` (checked once, when the inode is made).
    case entry(shard: UInt64, key: [UInt8])

    /// The shard a shard directory or an entry belongs to.
    var shardID: UInt64? {
        switch self {
        case .root: return nil
        case .shard(let id), .entry(let id, _): return id
        }
    }

    /// A key's bytes are hashed at once (the synthesized hash feeds them one by
    /// one), for the inode lookups most requests make.
    func hash(into hasher: inout Hasher) {
        switch self {
        case .root:
            hasher.combine(0 as UInt8)
        case .shard(let id):
            hasher.combine(1 as UInt8)
            hasher.combine(id)
        case .entry(let shard, let key):
            hasher.combine(2 as UInt8)
            hasher.combine(shard)
            key.withUnsafeBytes { hasher.combine(bytes: $0) }
        }
    }
}

/// Inode numbers for the mount. An inode lives while the kernel holds lookups on
/// it (the lookup count follows `lookup`/`readdirplus` replies and `forget`), as
/// in libfuse's passthrough_ll. Numbers are never reused within a mount.
final class InodeTable: @unchecked Sendable {
    static let rootInode: UInt64 = 1

    private struct Slot {
        /// nil: the entry was replaced by a rename while the kernel held this inode.
        var kind: NodeKind?
        var lookups: UInt64
    }

    private let lock = NSLock()
    private var slots: [UInt64: Slot] = [rootInode: Slot(kind: .root, lookups: 1)]
    private var byKind: [NodeKind: UInt64] = [.root: rootInode]
    private var next: UInt64 = 2

    /// The inode of `kind`, created if needed; `lookup` counts one kernel reference.
    func inode(for kind: NodeKind, lookup: Bool) -> UInt64 {
        lock.withLock {
            // One hash of the kind, found or inserted (0: no inode yet).
            let (ino, made) = Self.findOrMake(&byKind[kind, default: 0], &next)
            if made {
                slots[ino] = Slot(kind: kind, lookups: lookup ? 1 : 0)
            } else if lookup {
                slots[ino]!.lookups += 1
            }
            return ino
        }
    }

    private static func findOrMake(_ slot: inout UInt64, _ next: inout UInt64) -> (UInt64, Bool) {
        if slot != 0 { return (slot, false) }
        slot = next
        next += 1
        return (slot, true)
    }

    /// The inode of `kind` if the kernel may know it (never creates one).
    func existingInode(for kind: NodeKind) -> UInt64? {
        lock.withLock { byKind[kind] }
    }

    func kind(of ino: UInt64) -> NodeKind? {
        lock.withLock { slots[ino]?.kind ?? nil }
    }

    /// The kernel dropped `count` references.
    func forget(_ ino: UInt64, count: UInt64) {
        guard ino != Self.rootInode else { return }
        lock.withLock {
            guard var slot = slots[ino] else { return }
            slot.lookups -= min(count, slot.lookups)
            if slot.lookups == 0 {
                slots.removeValue(forKey: ino)
                if let kind = slot.kind, byKind[kind] == ino { byKind.removeValue(forKey: kind) }
            } else {
                slots[ino] = slot
            }
        }
    }

    /// After a rename the kernel's inode for `from` now names `to`; an inode that
    /// named `to` before is left pointing at nothing (its getattr fails ENOENT).
    func rename(_ from: NodeKind, to: NodeKind) {
        lock.withLock {
            if let displaced = byKind.removeValue(forKey: to), var slot = slots[displaced] {
                slot.kind = nil
                slots[displaced] = slot
            }
            guard let ino = byKind.removeValue(forKey: from) else { return }
            slots[ino]?.kind = to
            byKind[to] = ino
        }
    }

    /// The entry was unlinked while open: its inode lives on for the open
    /// handles (fstat), and the name is free for a new inode.
    func unlink(_ kind: NodeKind) {
        lock.withLock { _ = byKind.removeValue(forKey: kind) }
    }

    /// Whether `ino` still has its name (false once unlinked or replaced while open).
    func isLinked(_ ino: UInt64) -> Bool {
        lock.withLock {
            guard let kind = slots[ino]?.kind ?? nil else { return false }
            return byKind[kind] == ino
        }
    }

    /// The inodes the kernel may hold for a shard: its directory and its entries.
    func inodes(ofShard id: UInt64) -> [UInt64] { inodes(ofShards: [id]) }

    /// The inodes the kernel may hold for any of the shards (one pass over the table).
    func inodes(ofShards ids: Set<UInt64>) -> [UInt64] {
        lock.withLock {
            slots.compactMap { ino, slot in slot.kind?.shardID.map { ids.contains($0) ? ino : nil } ?? nil }
        }
    }
}
