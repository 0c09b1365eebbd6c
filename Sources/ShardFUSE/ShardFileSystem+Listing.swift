import Foundation
import Glibc
import ShardNode
import ShardStore

// Directory listings (paged from the last key listed) and statfs.

extension ShardFileSystem {
    // MARK: Directories

    func opendir(_ ino: UInt64) throws -> UInt64 {
        _ = try kind(ino)
        return handles.openDirectory()
    }

    func releasedir(_ handle: UInt64) { handles.closeDirectory(handle) }

    /// Up to `limit` items from `offset` (0 = the start; otherwise a `nextOffset`).
    /// Items of a shard are paged from the key after the last one listed, so a
    /// listing costs memory for one page only, however large the shard.
    /// With `plus`, each item's inode carries one lookup for the kernel from the
    /// start (a forget racing the reply cannot drop it); `listed` gives back the
    /// lookups of items that did not fit in the reply.
    func readdir(_ ino: UInt64, handle: UInt64, offset: Int64, limit: Int, plus: Bool) throws -> [DirectoryItem] {
        var items: [DirectoryItem] = []
        let kind = try self.kind(ino)
        if offset < 1 { items.append(dot(".", ino: ino, next: 1)) }
        if offset < 2 { items.append(dot("..", ino: InodeTable.rootInode, next: 2)) }
        switch kind {
        case .root:
            // The shards this node writes and those it serves views of, by ID.
            for (i, id) in servedShards().enumerated() where Int64(i) + 3 > offset && items.count < limit {
                do {
                    items.append(try reading(id) { shard in
                        let ino = listedInode(.shard(id), plus: plus)
                        return DirectoryItem(name: Array(ShardDirectoryName.of(id).utf8), inode: ino,
                                             attributes: shardAttributes(shard, ino), timeout: timeout(shard),
                                             nextOffset: Int64(i) + 3, kind: .shard(id))
                    })
                } catch let error as FileSystemError where error.code == ENOENT {
                    continue  // a view that went away since; one that cannot be served now is EIO
                }
            }
        case .shard(let id):
            return try reading(id) { shard in
                try listShard(shard, handle: handle, offset: offset, limit: limit, plus: plus, items: items)
            }
        case .entry:
            throw FileSystemError(ENOTDIR, "entries are files")
        }
        return items
    }

    /// Every shard the root lists: this node's own and its views, by ID.
    func servedShards() -> [UInt64] {
        Array(Set(node.shards.localShards().map(\.id)).union(node.views.servedShards())).sorted()
    }

    /// A page of a shard's listing from `offset` (after the dot items in `items`),
    /// from one snapshot of it.
    private func listShard(_ shard: any ShardReading, handle: UInt64, offset: Int64, limit: Int, plus: Bool,
                           items: [DirectoryItem]) throws -> [DirectoryItem] {
        var items = items
        let id = shard.id
        let cursor = handles.cursor(handle) ?? DirectoryCursor()
        // Continue after the last key listed, or (after a seek) count from the start.
        var after: EntryKey? = nil
        var position = max(offset, 2)
        if offset > 2 {
            if let last = cursor.lastKey, cursor.lastOffset == offset {
                after = last
            } else {
                // Count from the start, a page at a time.
                var seen: Int64 = 0
                while seen < offset - 2 {
                    let page = try shard.list(after: after, limit: Int(min(1024, offset - 2 - seen)))
                    // Fewer entries than the offset now: the listing is over.
                    guard let last = page.last else { return items }
                    seen += Int64(page.count)
                    after = last.key
                }
            }
        }
        let rows = try shard.list(after: after, limit: max(0, limit - items.count))
        for row in rows {
            position += 1
            let ino = listedInode(.entry(shard: id, key: row.key.bytes), plus: plus)
            let entry = EntryAttributes(key: row.key, size: row.size, modificationTime: row.modificationTime, indexes: [],
                                        metadata: row.metadata)
            items.append(DirectoryItem(name: row.key.bytes, inode: ino, attributes: fileAttributes(shard, ino, entry),
                                       timeout: timeout(shard), nextOffset: position,
                                       kind: .entry(shard: id, key: row.key.bytes)))
        }
        return items
    }

    /// What a plain readdir gives as an item's inode when the kernel holds none:
    /// libfuse's FUSE_UNKNOWN_INO. The kernel looks the name up before using it.
    static let unknownInode: UInt64 = 0xffff_ffff

    /// An item's inode: readdirplus hands the kernel a lookup on it; a plain
    /// readdir makes none (nothing would ever forget it), so it only reports one
    /// the kernel already holds.
    func listedInode(_ kind: NodeKind, plus: Bool) -> UInt64 {
        plus ? inodes.inode(for: kind, lookup: true) : inodes.existingInode(for: kind) ?? Self.unknownInode
    }

    /// The bridge packed the first `packed` items into the reply: remember where
    /// the listing stands, and with `plus` return the unused items' lookups.
    func listed(_ items: [DirectoryItem], packed: Int, handle: UInt64, plus: Bool) {
        if plus { for item in items[packed...] where item.kind != nil { inodes.forget(item.inode, count: 1) } }
        guard let last = items[..<packed].last else { return }
        if case .entry(_, let key)? = last.kind {
            handles.setCursor(handle, DirectoryCursor(lastKey: EntryKey(trusted: key), lastOffset: last.nextOffset))
        }
    }

    func statfs(_ ino: UInt64) throws -> statvfs {
        var result = statvfs()
        result.f_bsize = 4096
        result.f_frsize = 4096
        result.f_namemax = 255
        var limit = 0, used = 0, entries = 0
        func add(_ stats: ShardStats) {
            limit += stats.limitBytes
            used += min(stats.usedBytes, stats.limitBytes)
            entries += stats.entries
        }
        switch try kind(ino) {
        case .root:
            for shard in node.shards.localShards() { add(try shard.stats()) }
            // Views too (one that went away since is left out).
            for id in node.views.servedShards() where node.shards.localShard(id) == nil {
                if let stats = try? reading(id, { try $0.stats() }) { add(stats) }
            }
        case .shard(let id), .entry(let id, _):
            add(try reading(id) { try $0.stats() })
        }
        result.f_blocks = fsblkcnt_t(limit / 4096)
        result.f_bfree = fsblkcnt_t((limit - used) / 4096)
        result.f_bavail = result.f_bfree
        result.f_files = fsfilcnt_t(entries)
        result.f_ffree = 0
        result.f_favail = 0
        return result
    }
}
