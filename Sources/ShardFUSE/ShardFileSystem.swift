import Foundation
import Glibc
import Logging
import Metadata
import ShardNode
import ShardStore

/// What a name resolves to, with how long the kernel may cache it.
struct EntryReply {
    var inode: UInt64
    var attributes: stat
    var timeout: Double
    /// How long the attributes may be cached: `timeout`, or 0 for a writer's view.
    var attributeTimeout: Double

    init(inode: UInt64, attributes: stat, timeout: Double, attributeTimeout: Double? = nil) {
        self.inode = inode
        self.attributes = attributes
        self.timeout = timeout
        self.attributeTimeout = attributeTimeout ?? timeout
    }
}

/// One row of a directory listing.
struct DirectoryItem {
    var name: [UInt8]
    var inode: UInt64
    var attributes: stat
    var timeout: Double
    /// The position after this item (what a later readdir continues from).
    var nextOffset: Int64
    var kind: NodeKind?
}

/// The typed layer of the mount: shards are directories of the root, entries are
/// files of their shard. Each method does its work on the calling FUSE thread
/// and returns a value or throws; the bridge (`FuseBridge`) turns that into
/// exactly one reply. docs/SEMANTICS.md describes every operation.
public final class ShardFileSystem: @unchecked Sendable {
    let node: StorageNode
    let options: MountOptions
    let inodes = InodeTable()
    let logger: Logger
    private let uid = getuid(), gid = getgid()
    private let mountTime = timespec(tv_sec: time(nil), tv_nsec: 0)
    private let spillDirectory: String

    /// Tells the kernel to forget cached attributes and pages of inodes. Set by the
    /// session; runs asynchronously (never inside a request handler: deadlock).
    var invalidate: (@Sendable ([UInt64]) -> Void)? {
        get { callbackLock.withLock { invalidateCallback } }
        set { callbackLock.withLock { invalidateCallback = newValue } }
    }
    /// Tells the kernel to forget a cached name (parent inode, name). Same rules.
    var invalidateName: (@Sendable (UInt64, [UInt8]) -> Void)? {
        get { callbackLock.withLock { invalidateNameCallback } }
        set { callbackLock.withLock { invalidateNameCallback = newValue } }
    }
    private let callbackLock = NSLock()
    private var invalidateCallback: (@Sendable ([UInt64]) -> Void)?
    private var invalidateNameCallback: (@Sendable (UInt64, [UInt8]) -> Void)?

    /// Entries this mount is committing itself (with how many commits are in
    /// progress for each): the kernel already knows them. A lock of its own: the
    /// commit hook reads it while the committing thread may hold other locks.
    private let ownLock = NSLock()
    private var ownWrites: [OwnWrite: Int] = [:]
    private struct OwnWrite: Hashable { var shard: UInt64; var key: [UInt8] }

    /// Puts of closed small files not yet committed (see WriteBehind).
    private(set) var writeBehind: WriteBehind!
    /// Files up to this size are committed behind `close()`; larger ones at once.
    static let writeBehindLimit = 1 << 20

    private let lock = NSLock()
    private var files: [UInt64: OpenFile] = [:]
    /// The handles open on each inode, so finding a key's open files costs no scan.
    private var handlesByInode: [UInt64: Set<UInt64>] = [:]
    private var committedAll = false
    private var directories: [UInt64: DirectoryCursor] = [:]
    private var nextHandle: UInt64 = 1

    public init(node: StorageNode, options: MountOptions, logger: Logger = Logger(label: "shardfs.fuse")) {
        self.node = node
        self.options = options
        self.logger = logger
        spillDirectory = node.configuration.node.dataDir
        writeBehind = WriteBehind(logger: logger) { [unowned self] shard, keys, body in
            try self.own(shard, keys, body)
        }
    }

    // MARK: Names and attributes

    func lookup(_ parent: UInt64, _ name: [UInt8]) throws -> EntryReply {
        switch try kind(parent) {
        case .root:
            guard let id = Self.shardID(name), let shard = node.shards.localShard(id) else {
                throw FileSystemError(ENOENT, "no shard \(String(decoding: name, as: UTF8.self))")
            }
            let ino = inodes.inode(for: .shard(id), lookup: true)
            return EntryReply(inode: ino, attributes: shardAttributes(shard, ino), timeout: timeout(shard))
        case .shard(let id):
            let shard = try localShard(id)
            let key = try entryKey(name)
            // A file created and still open exists too (for its writer's stat, rename…).
            let known = inodes.existingInode(for: .entry(shard: id, key: key.bytes))
            guard let view = try entryView(shard, key, inode: known, byName: true) else {
                throw FileSystemError(ENOENT, "no entry \(key) in shard \(id)")
            }
            let ino = inodes.inode(for: .entry(shard: id, key: key.bytes), lookup: true)
            return EntryReply(inode: ino, attributes: fileAttributes(shard, ino, view.attributes), timeout: timeout(shard),
                              attributeTimeout: view.ofWriter ? 0 : timeout(shard))
        case .entry:
            throw FileSystemError(ENOTDIR, "entries are files")
        }
    }

    func forget(_ ino: UInt64, _ count: UInt64) { inodes.forget(ino, count: count) }

    func getattr(_ ino: UInt64) throws -> (stat, Double) {
        switch try kind(ino) {
        case .root:
            return (rootAttributes(), options.attributeTimeout)
        case .shard(let id):
            let shard = try localShard(id)
            return (shardAttributes(shard, ino), attributeTimeout(shard))
        case .entry(let id, let key):
            let shard = try localShard(id)
            let entryKey = EntryKey(trusted: key)  // validated when its inode was made
            guard let view = try entryView(shard, entryKey, inode: ino, byName: false) else {
                throw FileSystemError(ENOENT, "entry \(entryKey) is gone")
            }
            return (fileAttributes(shard, ino, view.attributes), view.ofWriter ? 0 : attributeTimeout(shard))
        }
    }

    /// chmod, chown, truncate and utimens.
    func setattr(_ ino: UInt64, _ attr: stat, _ toSet: AttributeChanges, handle: UInt64?) throws -> (stat, Double) {
        let kind = try self.kind(ino)
        if !toSet.isDisjoint(with: [.uid, .gid]) {
            let changesOwner = (toSet.contains(.uid) && attr.st_uid != uid) || (toSet.contains(.gid) && attr.st_gid != gid)
            if changesOwner { throw FileSystemError(EPERM, "ShardFS files cannot change owner") }
        }
        switch kind {
        case .root:
            if toSet.contains(.size) { throw FileSystemError(EISDIR, "the root is a directory") }
        case .shard(let id):
            if toSet.contains(.size) { throw FileSystemError(EISDIR, "a shard is a directory") }
            if toSet.contains(.mode) {
                let shard = try localShard(id)
                // Queued puts land before the shard closes; none are queued after.
                writeBehind.beginClosing(shard: id)
                defer { writeBehind.endClosing(shard: id) }
                writeBehind.flush(shard: id)
                let writeBits = attr.st_mode & 0o222
                if writeBits == 0 {
                    if shard.state == .open {
                        try writable(shard)
                        try wait { try await self.node.shards.closeShard(id) }
                        // Cached modes of its files still show write bits: drop them.
                        invalidate?(inodes.inodes(ofShard: id))
                    }
                } else if shard.state == .closed || options.readOnly {
                    throw FileSystemError(options.readOnly ? EROFS : EPERM, "a closed shard stays closed")
                }
            }
        case .entry(let id, let key):
            let shard = try localShard(id)
            let entryKey = EntryKey(trusted: key)  // validated when its inode was made
            let file = handle.flatMap { h in lock.withLock { files[h] } }
            if !toSet.isDisjoint(with: [.size, .modificationTime, .modificationTimeNow]) { writeBehind.flush(shard: id) }
            if toSet.contains(.size) {
                try writable(shard)
                guard attr.st_size >= 0 else { throw FileSystemError(EINVAL, "negative size") }
                if let file, file.writable {
                    try file.truncate(to: Int(attr.st_size))
                } else {
                    // truncate(2) on a path: rewrite the value now.
                    let temporary = OpenFile(shard: shard, key: entryKey, inode: ino, writable: true, truncate: false,
                                             clientID: options.clientID, spillDirectory: spillDirectory)
                    defer { temporary.abandon() }
                    try temporary.truncate(to: Int(attr.st_size))
                    try commit(temporary, behind: false)
                }
            }
            if !toSet.isDisjoint(with: [.modificationTime, .modificationTimeNow]) {
                try writable(shard)
                let time = toSet.contains(.modificationTimeNow)
                    ? Self.now() : Int64(attr.st_mtim.tv_sec) * 1_000_000_000 + Int64(attr.st_mtim.tv_nsec)
                let writer = file ?? openWriter(ino)
                if let writer, writer.pendingSize != nil {
                    writer.setModificationTime(time)
                } else {
                    try own(id, [key]) { try shard.setModificationTime(entryKey, time, clientID: options.clientID) }
                }
            }
            // A file's mode is fixed (0644, or 0444 when it cannot be written): chmod
            // is accepted and changes nothing, so tools like `rsync -a` and `tar` work.
        }
        return try getattr(ino)
    }

    /// access(2): what the modes allow the caller (root: reading and writing
    /// always, executing where some execute bit is set, as the kernel's own check).
    func access(_ ino: UInt64, mask: Int32, uid: uid_t) throws {
        let mode = Int32(try getattr(ino).0.st_mode)
        guard mask != F_OK else { return }
        if uid == 0 {
            if mask & X_OK != 0 && mode & 0o111 == 0 { throw FileSystemError(EACCES, "no execute bit") }
            return
        }
        let bits = uid == self.uid ? (mode >> 6) & 7 : mode & 7
        if mask & bits & 7 != mask & 7 { throw FileSystemError(EACCES, "the mode does not allow it") }
    }

    // MARK: Shards as directories

    func mkdir(_ parent: UInt64, _ name: [UInt8]) throws -> EntryReply {
        switch try kind(parent) {
        case .root:
            guard let id = Self.shardID(name) else {
                throw FileSystemError(EINVAL, "a directory at the root is a shard: its name is shard-<ID>")
            }
            if options.readOnly { throw FileSystemError(EROFS, "read-only mount") }
            _ = try wait { try await self.node.shards.newShard(owner: self.options.clientID, id: id) }
            return try lookup(parent, name)
        case .shard:
            throw FileSystemError(EPERM, "shards are flat: no directories inside a shard")
        case .entry:
            throw FileSystemError(ENOTDIR, "entries are files")
        }
    }

    /// Deletes a whole shard, open or closed, with its entries: the one departure
    /// from POSIX (a closed shard's entries cannot be unlinked one by one).
    func rmdir(_ parent: UInt64, _ name: [UInt8]) throws {
        switch try kind(parent) {
        case .root:
            guard let id = Self.shardID(name), node.shards.localShard(id) != nil else {
                throw FileSystemError(ENOENT, "no shard \(String(decoding: name, as: UTF8.self))")
            }
            if options.readOnly { throw FileSystemError(EROFS, "read-only mount") }
            writeBehind.flush(shard: id)
            try wait { try await self.node.shards.deleteShard(id) }
        case .shard:
            throw FileSystemError(ENOTDIR, "entries are files")
        case .entry:
            throw FileSystemError(ENOTDIR, "entries are files")
        }
    }

    // MARK: Entries as files

    func create(_ parent: UInt64, _ name: [UInt8], flags: Int32) throws -> (EntryReply, UInt64) {
        guard case .shard(let id) = try kind(parent) else {
            throw FileSystemError(EPERM, "files live inside shard directories")
        }
        let shard = try localShard(id)
        try writable(shard)
        let key = try entryKey(name)
        let ino = inodes.inode(for: .entry(shard: id, key: key.bytes), lookup: true)
        let file = OpenFile(shard: shard, key: key, inode: ino, writable: true, truncate: true,
                            clientID: options.clientID, spillDirectory: spillDirectory)
        let handle = register(file)
        let attributes = EntryAttributes(key: key, size: 0, modificationTime: Self.now(), indexes: [])
        return (EntryReply(inode: ino, attributes: fileAttributes(shard, ino, attributes), timeout: timeout(shard)), handle)
    }

    func open(_ ino: UInt64, flags: Int32) throws -> (handle: UInt64, keepCache: Bool) {
        guard case .entry(let id, let key) = try kind(ino) else { throw FileSystemError(EISDIR, "a directory") }
        let shard = try localShard(id)
        let entryKey = EntryKey(trusted: key)  // validated when its inode was made
        let wantsWrite = flags & O_ACCMODE != O_RDONLY
        if wantsWrite {
            try writable(shard)
            writeBehind.flush(shard: id)  // the handle builds on the latest value
        }
        guard try currentAttributes(shard, entryKey) != nil else { throw FileSystemError(ENOENT, "entry \(entryKey) is gone") }
        let file = OpenFile(shard: shard, key: entryKey, inode: ino, writable: wantsWrite, truncate: flags & O_TRUNC != 0,
                            clientID: options.clientID, spillDirectory: spillDirectory)
        // The kernel may keep a file's pages across opens: the mount's own writes
        // go through them, and changes made elsewhere (the socket service)
        // invalidate them (entriesChanged).
        return (register(file), true)
    }

    func read(_ handle: UInt64, offset: Int, count: Int) throws -> [UInt8] {
        let file = try self.file(handle)
        if !file.hasBuffer, let pending = writeBehind.pending(shard: file.shard.id, key: file.key.bytes), !pending.deleted {
            guard offset < pending.value.count else { return [] }
            return Array(pending.value[offset..<min(pending.value.count, offset + count)])
        }
        return try file.read(at: offset, count: count)
    }

    func write(_ handle: UInt64, _ bytes: UnsafeRawBufferPointer, offset: Int) throws -> Int {
        let file = try self.file(handle)
        try writable(file.shard)
        try file.write(bytes, at: offset)
        return bytes.count
    }

    /// close(): a small file's put is queued (visible at once, durable at fsync or
    /// within milliseconds); a larger one is committed now. The error is close()'s,
    /// and so is that of an earlier queued batch of the shard that failed.
    func flush(_ handle: UInt64) throws {
        let file = try file(handle)
        try commit(file, behind: true)
        if let failure = writeBehind.takeFailure(shard: file.shard.id) { throw failure }
    }

    /// fsync(): this file's changes and everything queued before them are durable.
    func fsync(_ handle: UInt64) throws {
        let file = try self.file(handle)
        try commit(file, behind: false)
        writeBehind.flush(shard: file.shard.id)
        if let failure = writeBehind.takeFailure(shard: file.shard.id) { throw failure }
    }

    func release(_ handle: UInt64) throws {
        guard let file = lock.withLock({ unregister(handle) }) else { return }
        defer { file.abandon() }  // a staged value that was not committed is removed
        try commit(file, behind: true)
    }

    private func commit(_ file: OpenFile, behind: Bool) throws {
        let id = file.shard.id
        if behind, let (value, time) = try file.takeSmallValue(limit: Self.writeBehindLimit) {
            do {
                // Checked now, as a synchronous put would: owner, closed state, room.
                try writable(file.shard)
                let room = file.shard.sizeLimit - file.shard.usedBytesUpperBound - writeBehind.queuedBytes(shard: id)
                if WriteBehind.cost(value.count) + 4096 < room,
                   writeBehind.enqueue(file.shard, clientID: options.clientID, key: file.key.bytes, value: value,
                                       modificationTime: time ?? Self.now()) {
                    return
                }
                // Near the limit, or the shard is closing: commit now, for an exact answer.
                writeBehind.flush(shard: id)
                try own(id, [file.key.bytes]) {
                    try file.shard.put(file.key, size: value.count, indexes: nil, clientID: options.clientID,
                                       modificationTime: time) { offset, out in
                        value.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + out.count)])) }
                    }
                }
            } catch {
                file.keepUncommitted()  // the buffer still holds the value: a later close or release retries
                throw error
            }
            return
        }
        guard file.hasChanges else { return }
        writeBehind.flush(shard: id)
        try own(id, [file.key.bytes]) { try file.commit() }
    }

    /// What lookup and getattr show of an entry. A file being written (perhaps
    /// created and not committed yet) shows its writer's view, never cached by the
    /// kernel (`ofWriter`): fstat on a new file must work. Otherwise the queued or
    /// committed entry; nil if there is none. By name (lookup), an unlinked file
    /// still open for writing is gone; by inode (fstat on its handle) it is not.
    private func entryView(_ shard: Shard, _ key: EntryKey, inode: UInt64?, byName: Bool) throws
        -> (attributes: EntryAttributes, ofWriter: Bool)? {
        let current = try currentAttributes(shard, key)
        if let writer = inode.flatMap({ openWriter($0, includingUnlinked: !byName) }), let size = writer.pendingSize {
            let time = writer.pendingModificationTime ?? current?.modificationTime ?? Self.now()
            return (EntryAttributes(key: key, size: size, modificationTime: time, indexes: []), true)
        }
        return current.map { ($0, false) }
    }

    /// An entry's attributes as the mount shows them: a queued put wins.
    private func currentAttributes(_ shard: Shard, _ key: EntryKey) throws -> EntryAttributes? {
        if let pending = writeBehind.pending(shard: shard.id, key: key.bytes) {
            if pending.deleted { return nil }
            return EntryAttributes(key: key, size: pending.value.count, modificationTime: pending.modificationTime, indexes: [])
        }
        return try shard.attributes(key)
    }

    func unlink(_ parent: UInt64, _ name: [UInt8]) throws {
        guard case .shard(let id) = try kind(parent) else {
            throw FileSystemError(EISDIR, "shards are removed with rmdir")
        }
        let shard = try localShard(id)
        try writable(shard)
        let key = try entryKey(name)
        let open = openFiles(shard: id, key: key)
        // Queued like a put: gone for readers of the mount at once, durable at the
        // next fsync or within milliseconds. Created-and-still-open files have
        // nothing committed, and unlinking them is dropping them.
        if try currentAttributes(shard, key) == nil {
            guard !open.isEmpty else { throw FileSystemError(ENOENT, "no entry \(key) in shard \(id)") }
        } else if !writeBehind.enqueue(shard, clientID: options.clientID, key: key.bytes, value: [],
                                       modificationTime: 0, deleted: true) {
            writeBehind.flush(shard: id)  // the shard is closing: commit now, for an exact answer
            try own(id, [key.bytes]) { try shard.delete(key, clientID: options.clientID) }
        }
        for file in open { file.orphan() }  // a writer's close must not bring it back
    }

    func rename(_ parent: UInt64, _ name: [UInt8], _ newParent: UInt64, _ newName: [UInt8], flags: UInt32) throws {
        let from = try kind(parent), to = try kind(newParent)
        guard case .shard(let id) = from, case .shard(let targetID) = to else {
            throw FileSystemError(EPERM, "shard directories cannot be renamed")
        }
        guard id == targetID else { throw FileSystemError(EXDEV, "entries cannot move between shards") }
        if flags & Self.renameExchange != 0 { throw FileSystemError(EINVAL, "RENAME_EXCHANGE is not supported") }
        let shard = try localShard(id)
        try writable(shard)
        let source = try entryKey(name), target = try entryKey(newName)
        writeBehind.flush(shard: id)
        if flags & Self.renameNoReplace != 0, try shard.attributes(target) != nil {
            throw FileSystemError(EEXIST, "\(target) exists")
        }
        let openSource = openFiles(shard: id, key: source)
        do {
            try own(id, [source.bytes, target.bytes]) { try shard.rename(source, to: target, clientID: options.clientID) }
        } catch ShardError.entryNotFound where !openSource.isEmpty {
            // Created and still open, never committed: the target is replaced now,
            // and the writer's close puts the value under the new name.
            if source != target, try shard.attributes(target) != nil {
                try own(id, [target.bytes]) { try shard.delete(target, clientID: options.clientID) }
            }
        }
        // Open handles follow the entry; handles of a replaced target are orphans.
        let displaced = openFiles(shard: id, key: target), moved = openSource
        for file in displaced where source != target { file.orphan() }
        for file in moved { file.renamed(to: target) }
        inodes.rename(.entry(shard: id, key: source.bytes), to: .entry(shard: id, key: target.bytes))
    }

    // MARK: Directories

    func opendir(_ ino: UInt64) throws -> UInt64 {
        _ = try kind(ino)
        return lock.withLock {
            let handle = nextHandle
            nextHandle += 1
            directories[handle] = DirectoryCursor()
            return handle
        }
    }

    func releasedir(_ handle: UInt64) { lock.withLock { _ = directories.removeValue(forKey: handle) } }

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
            let shards = node.shards.localShards()
            for (i, shard) in shards.enumerated() where Int64(i) + 3 > offset && items.count < limit {
                let ino = listedInode(.shard(shard.id), plus: plus)
                items.append(DirectoryItem(name: Array(ShardManager.directoryName(shard.id).utf8), inode: ino,
                                           attributes: shardAttributes(shard, ino), timeout: timeout(shard),
                                           nextOffset: Int64(i) + 3, kind: .shard(shard.id)))
            }
        case .shard(let id):
            let shard = try localShard(id)
            if offset == 0 { writeBehind.flush(shard: id) }  // list what is queued too
            let cursor = lock.withLock { directories[handle] } ?? DirectoryCursor()
            // Continue after the last key listed, or (after a seek) count from the start.
            var after: EntryKey? = nil
            var position = max(offset, 2)
            if offset > 2 {
                if let last = cursor.lastKey, cursor.lastOffset == offset {
                    after = last
                } else {
                    var seen: Int64 = 0
                    try shard.forEachEntry { view in
                        seen += 1
                        if seen == offset - 2 { after = EntryKey(trusted: Array(view.key)) }
                        return seen < offset - 2
                    }
                    // Fewer entries than the offset now: the listing is over.
                    if seen < offset - 2 { return items }
                }
            }
            let rows = try shard.list(after: after, limit: max(0, limit - items.count))
            for row in rows {
                position += 1
                let ino = listedInode(.entry(shard: id, key: row.key.bytes), plus: plus)
                let attributes = EntryAttributes(key: row.key, size: row.size, modificationTime: row.modificationTime, indexes: [])
                items.append(DirectoryItem(name: row.key.bytes, inode: ino, attributes: fileAttributes(shard, ino, attributes),
                                           timeout: timeout(shard), nextOffset: position,
                                           kind: .entry(shard: id, key: row.key.bytes)))
            }
        case .entry:
            throw FileSystemError(ENOTDIR, "entries are files")
        }
        return items
    }

    /// What a plain readdir gives as an item's inode when the kernel holds none:
    /// libfuse's FUSE_UNKNOWN_INO. The kernel looks the name up before using it.
    static let unknownInode: UInt64 = 0xffff_ffff

    /// An item's inode: readdirplus hands the kernel a lookup on it; a plain
    /// readdir makes none (nothing would ever forget it), so it only reports one
    /// the kernel already holds.
    private func listedInode(_ kind: NodeKind, plus: Bool) -> UInt64 {
        plus ? inodes.inode(for: kind, lookup: true) : inodes.existingInode(for: kind) ?? Self.unknownInode
    }

    /// The bridge packed the first `packed` items into the reply: remember where
    /// the listing stands, and with `plus` return the unused items' lookups.
    func listed(_ items: [DirectoryItem], packed: Int, handle: UInt64, plus: Bool) {
        if plus { for item in items[packed...] where item.kind != nil { inodes.forget(item.inode, count: 1) } }
        guard let last = items[..<packed].last else { return }
        if case .entry(_, let key)? = last.kind {
            lock.withLock {
                directories[handle]?.lastKey = EntryKey(trusted: key)
                directories[handle]?.lastOffset = last.nextOffset
            }
        }
    }

    func statfs(_ ino: UInt64) throws -> statvfs {
        var result = statvfs()
        result.f_bsize = 4096
        result.f_frsize = 4096
        result.f_namemax = 255
        let shards: [Shard]
        switch try kind(ino) {
        case .root: shards = node.shards.localShards()
        case .shard(let id), .entry(let id, _): shards = [try localShard(id)]
        }
        var limit = 0, used = 0, entries = 0
        for shard in shards {
            let stats = try shard.stats()
            limit += stats.limitBytes
            used += min(stats.usedBytes, stats.limitBytes)
            entries += stats.entries
        }
        result.f_blocks = fsblkcnt_t(limit / 4096)
        result.f_bfree = fsblkcnt_t((limit - used) / 4096)
        result.f_bavail = result.f_bfree
        result.f_files = fsfilcnt_t(entries)
        result.f_ffree = 0
        result.f_favail = 0
        return result
    }

    // MARK: Indexes as extended attributes

    static let indexPrefix = "user."

    func setxattr(_ ino: UInt64, name: String, value: [UInt8], flags: Int32) throws {
        let (shard, key) = try entry(ino)
        let index = try indexName(name)
        try writable(shard)
        writeBehind.flush(shard: shard.id)
        try own(shard.id, [key.bytes]) { try shard.updateIndexes(key, clientID: options.clientID) { current in
            let exists = current.contains { $0.name == index }
            if flags & Self.xattrCreate != 0 && exists { throw FileSystemError(EEXIST, "index \(index) exists") }
            if flags & Self.xattrReplace != 0 && !exists { throw FileSystemError(ENODATA, "no index \(index)") }
            var updated = current.filter { $0.name != index }
            updated.append(IndexPair(name: index, value: value))
            return updated
        } }
    }

    func getxattr(_ ino: UInt64, name: String) throws -> [UInt8] {
        guard name.hasPrefix(Self.indexPrefix) else { throw FileSystemError(ENODATA, "only user.* attributes exist") }
        let (shard, key) = try entry(ino)
        let index = String(name.dropFirst(Self.indexPrefix.count))
        guard let pair = try shard.attributes(key)?.indexes.first(where: { $0.name == index }) else {
            throw FileSystemError(ENODATA, "no index \(index)")
        }
        return pair.value
    }

    func listxattr(_ ino: UInt64) throws -> [UInt8] {
        guard case .entry = try kind(ino) else { return [] }
        let (shard, key) = try entry(ino)
        var out: [UInt8] = []
        for index in try shard.attributes(key)?.indexes ?? [] {
            out += Array((Self.indexPrefix + index.name).utf8) + [0]
        }
        return out
    }

    func removexattr(_ ino: UInt64, name: String) throws {
        let (shard, key) = try entry(ino)
        let index = try indexName(name)
        try writable(shard)
        writeBehind.flush(shard: shard.id)
        try own(shard.id, [key.bytes]) { try shard.updateIndexes(key, clientID: options.clientID) { current in
            guard current.contains(where: { $0.name == index }) else { throw FileSystemError(ENODATA, "no index \(index)") }
            return current.filter { $0.name != index }
        } }
    }

    /// Runs a write of this mount's own, so that its commit is not mistaken for a
    /// change made elsewhere (which would needlessly drop the kernel's caches).
    private func own<T>(_ shard: UInt64, _ keys: [[UInt8]], _ body: () throws -> T) rethrows -> T {
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

    /// The node committed changes to entries of a shard. Those not made by this
    /// mount (the batch service, another handle) are dropped from the kernel's
    /// caches, so the mount sees them at once.
    func entriesChanged(shard id: UInt64, keys: [[UInt8]]) {
        let foreign = ownLock.withLock { keys.filter { ownWrites[OwnWrite(shard: id, key: $0)] == nil } }
        guard !foreign.isEmpty, let parent = inodes.existingInode(for: .shard(id)) else { return }
        var stale: [UInt64] = []
        for key in foreign {
            invalidateName?(parent, key)
            if let ino = inodes.existingInode(for: .entry(shard: id, key: key)) { stale.append(ino) }
        }
        if !stale.isEmpty { invalidate?(stale) }
    }

    /// Commits every open file (unmount: pending writes first). Runs once: the
    /// session loop's end and libfuse's destroy callback both call it.
    func commitAll() {
        guard lock.withLock({ () -> Bool in defer { committedAll = true }; return !committedAll }) else { return }
        for file in lock.withLock({ Array(files.values) }) {
            do { try commit(file, behind: false) } catch {
                logger.error("could not commit an open file at unmount", metadata: ["key": "\(file.key)", "error": "\(error)"])
            }
            file.abandon()
        }
        writeBehind.stop()
        node.shards.applyLogs()
    }

    // MARK: Helpers

    private func kind(_ ino: UInt64) throws -> NodeKind {
        guard let kind = inodes.kind(of: ino) else { throw FileSystemError(ESTALE, "unknown inode \(ino)") }
        return kind
    }

    private func localShard(_ id: UInt64) throws -> Shard {
        guard let shard = node.shards.localShard(id) else { throw FileSystemError(ENOENT, "shard \(id) is gone") }
        return shard
    }

    private func entry(_ ino: UInt64) throws -> (Shard, EntryKey) {
        guard case .entry(let id, let key) = try kind(ino) else {
            throw FileSystemError(ENOTSUP, "indexes are attributes of entries, not of directories")
        }
        return (try localShard(id), EntryKey(trusted: key))
    }

    private func file(_ handle: UInt64) throws -> OpenFile {
        guard let file = lock.withLock({ files[handle] }) else { throw FileSystemError(EBADF, "unknown file handle") }
        return file
    }

    /// The open files of an entry. An open file keeps its inode known (the kernel
    /// holds a lookup on it), and a rename moves the inode with its handles.
    private func openFiles(shard: UInt64, key: EntryKey) -> [OpenFile] {
        guard let ino = inodes.existingInode(for: .entry(shard: shard, key: key.bytes)) else { return [] }
        return openFiles(inode: ino).filter { $0.shard.id == shard && $0.key == key }
    }

    /// File locks are taken only after `lock` is released (see `openWriter`).
    private func openFiles(inode: UInt64) -> [OpenFile] {
        lock.withLock { handlesByInode[inode].map { $0.compactMap { files[$0] } } ?? [] }
    }

    private func register(_ file: OpenFile) -> UInt64 {
        lock.withLock {
            let handle = nextHandle
            nextHandle += 1
            files[handle] = file
            handlesByInode[file.inode, default: []].insert(handle)
            return handle
        }
    }

    /// Removes a handle (lock held).
    private func unregister(_ handle: UInt64) -> OpenFile? {
        guard let file = files.removeValue(forKey: handle) else { return nil }
        handlesByInode[file.inode]?.remove(handle)
        if handlesByInode[file.inode]?.isEmpty == true { handlesByInode.removeValue(forKey: file.inode) }
        return file
    }

    /// A handle with unwritten changes to `ino` (one whose entry was unlinked
    /// only if `includingUnlinked`). The file's own lock is taken only after
    /// `lock` is released: a commit holds the file's lock while its commit hook
    /// needs other locks, so nesting them here could deadlock.
    private func openWriter(_ ino: UInt64, includingUnlinked: Bool = true) -> OpenFile? {
        openFiles(inode: ino).first { $0.pendingSize != nil && (includingUnlinked || !$0.isOrphaned) }
    }

    /// Writes need a writable mount, an open shard and the mount's client as owner.
    private func writable(_ shard: Shard) throws {
        if options.readOnly || shard.isReadOnlyView { throw FileSystemError(EROFS, "read-only mount") }
        if shard.state == .closed { throw FileSystemError(EROFS, "shard \(shard.id) is closed") }
        if shard.owner != options.clientID {
            throw FileSystemError(EACCES, "shard \(shard.id) belongs to client \(shard.owner), this mount writes as \(options.clientID)")
        }
    }

    private func entryKey(_ name: [UInt8]) throws -> EntryKey {
        if name.count > EntryKey.maxLength { throw FileSystemError(ENAMETOOLONG, "names are at most 255 bytes") }
        return try EntryKey(name)
    }

    private func indexName(_ attribute: String) throws -> String {
        guard attribute.hasPrefix(Self.indexPrefix), attribute.count > Self.indexPrefix.count else {
            throw FileSystemError(ENOTSUP, "only user.<index> attributes can be set")
        }
        return String(attribute.dropFirst(Self.indexPrefix.count))
    }

    /// How long the kernel may keep a name (and the attributes a lookup returns).
    private func timeout(_ shard: Shard) -> Double {
        shard.state == .closed ? options.closedTimeout : options.entryTimeout
    }

    /// How long the kernel may keep attributes that getattr returns.
    private func attributeTimeout(_ shard: Shard) -> Double {
        shard.state == .closed ? options.closedTimeout : options.attributeTimeout
    }

    private func dot(_ name: String, ino: UInt64, next: Int64) -> DirectoryItem {
        DirectoryItem(name: Array(name.utf8), inode: ino, attributes: rootAttributes(), timeout: 0, nextOffset: next, kind: nil)
    }

    private func baseAttributes(_ ino: UInt64) -> stat {
        var st = stat()
        st.st_ino = UInt(ino)
        st.st_uid = uid
        st.st_gid = gid
        st.st_blksize = 4096
        st.st_atim = mountTime
        st.st_mtim = mountTime
        st.st_ctim = mountTime
        return st
    }

    private func rootAttributes() -> stat {
        var st = baseAttributes(InodeTable.rootInode)
        st.st_mode = S_IFDIR | (options.readOnly ? 0o555 : 0o755)
        st.st_nlink = 2
        return st
    }

    private func shardAttributes(_ shard: Shard, _ ino: UInt64) -> stat {
        var st = baseAttributes(ino)
        let writable = shard.state == .open && !options.readOnly && !shard.isReadOnlyView
        st.st_mode = S_IFDIR | (writable ? 0o755 : 0o555)
        st.st_nlink = 2
        return st
    }

    private func fileAttributes(_ shard: Shard, _ ino: UInt64, _ attributes: EntryAttributes) -> stat {
        var st = baseAttributes(ino)
        let writable = shard.state == .open && !options.readOnly && !shard.isReadOnlyView
        st.st_mode = S_IFREG | (writable ? 0o644 : 0o444)
        st.st_nlink = 1
        st.st_size = off_t(attributes.size)
        st.st_blocks = blkcnt_t((attributes.size + 511) / 512)
        let time = timespec(tv_sec: Int(attributes.modificationTime / 1_000_000_000),
                            tv_nsec: Int(attributes.modificationTime % 1_000_000_000))
        st.st_mtim = time
        st.st_ctim = time
        st.st_atim = time
        return st
    }

    /// `shard-<N>` with N canonical decimal above 0.
    static func shardID(_ name: [UInt8]) -> UInt64? {
        let prefix = Array("shard-".utf8)
        guard name.count > prefix.count, name.starts(with: prefix) else { return nil }
        let digits = name[prefix.count...]
        guard digits.first != 0x30, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
              let id = UInt64(String(decoding: digits, as: UTF8.self)), id > 0 else { return nil }
        return id
    }

    static func now() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    static let xattrCreate: Int32 = 1  // XATTR_CREATE
    static let xattrReplace: Int32 = 2  // XATTR_REPLACE
    static let renameNoReplace: UInt32 = 1  // RENAME_NOREPLACE
    static let renameExchange: UInt32 = 2  // RENAME_EXCHANGE

    /// Runs async work (metadata) from a FUSE thread, which may block: it is not
    /// one of Swift's cooperative threads.
    private func wait<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
        let box = ResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        Task {
            do { box.result = .success(try await body()) } catch { box.result = .failure(error) }
            done.signal()
        }
        done.wait()
        return try box.result!.get()
    }
}

/// Which attributes a setattr changes (the values of libfuse's FUSE_SET_ATTR_*).
struct AttributeChanges: OptionSet {
    let rawValue: Int32
    static let mode = AttributeChanges(rawValue: 1 << 0)
    static let uid = AttributeChanges(rawValue: 1 << 1)
    static let gid = AttributeChanges(rawValue: 1 << 2)
    static let size = AttributeChanges(rawValue: 1 << 3)
    static let accessTime = AttributeChanges(rawValue: 1 << 4)
    static let modificationTime = AttributeChanges(rawValue: 1 << 5)
    static let accessTimeNow = AttributeChanges(rawValue: 1 << 7)
    static let modificationTimeNow = AttributeChanges(rawValue: 1 << 8)
}

/// Where a directory listing stands.
struct DirectoryCursor {
    var lastKey: EntryKey?
    var lastOffset: Int64 = 0
}

private final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}
