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
    private let attributes: Attributes
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

    /// Times of shard directories: they change as entries are made and removed
    /// through the mount (and with utimensat); stored in the shard at unmount
    /// and when set. A lock of its own: requests of any kind touch it.
    private let timesLock = NSLock()
    private var directoryTimes: [UInt64: DirectoryTimes] = [:]
    private struct DirectoryTimes {
        var modification: Int64
        var change: Int64
        /// Changed since it was stored.
        var unstored = false
    }

    private let lock = NSLock()
    private var files: [UInt64: FileHandle] = [:]
    /// The state every handle of an inode shares, and how many handles hold it.
    private var openEntries: [UInt64: (entry: OpenEntry, handles: Int)] = [:]
    private var committedAll = false
    private var directories: [UInt64: DirectoryCursor] = [:]
    private var nextHandle: UInt64 = 1

    public init(node: StorageNode, options: MountOptions, logger: Logger = Logger(label: "shardfs.fuse")) {
        self.node = node
        self.options = options
        self.logger = logger
        attributes = Attributes(uid: uid, gid: gid, mountTime: Int64(time(nil)) * 1_000_000_000)
        spillDirectory = node.configuration.node.dataDir
        writeBehind = WriteBehind(logger: logger) { [unowned self] shard, keys, body in
            try self.own(shard, keys, body)
        }
    }

    // MARK: Names and attributes

    func lookup(_ parent: UInt64, _ name: [UInt8]) throws -> EntryReply {
        switch try kind(parent) {
        case .root:
            guard let id = ShardDirectoryName.id(name), let shard = node.shards.localShard(id) else {
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
            if !toSet.isDisjoint(with: [.modificationTime, .modificationTimeNow]) {
                let shard = try localShard(id)
                try writable(shard)
                let time = toSet.contains(.modificationTimeNow) ? Self.now() : Attributes.nanoseconds(attr.st_mtim)
                try shard.setDirectoryTime(time, clientID: options.clientID)
                setDirectoryTime(shard, modification: time)
            }
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
                        setDirectoryTime(shard, modification: nil)
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
                    loadable(file.entry)
                    try file.entry.truncate(to: Int(attr.st_size))
                } else if let open = openEntry(ino) {
                    // truncate(2) on a path of an open file: its shared state, committed now.
                    loadable(open)
                    try open.truncate(to: Int(attr.st_size))
                    try commit(open, behind: false)
                } else {
                    // truncate(2) on a path: rewrite the value now.
                    let temporary = OpenEntry(shard: shard, key: entryKey, inode: ino, metadata: EntryMetadata(),
                                              clientID: options.clientID, spillDirectory: spillDirectory)
                    defer { temporary.abandon() }
                    try temporary.truncate(to: Int(attr.st_size))
                    try commit(temporary, behind: false)
                }
            }
            let now = Self.now()
            let modification: Int64? = toSet.contains(.modificationTimeNow) ? now
                : toSet.contains(.modificationTime) ? Attributes.nanoseconds(attr.st_mtim) : nil
            let access: Int64? = toSet.contains(.accessTimeNow) ? now
                : toSet.contains(.accessTime) ? Attributes.nanoseconds(attr.st_atim) : nil
            let mode: UInt32? = toSet.contains(.mode) ? UInt32(attr.st_mode & 0o7777) : nil
            if modification != nil || access != nil || mode != nil {
                try writable(shard)
                let writer = openEntry(ino)
                if let writer, writer.pendingSize != nil, let modification, access == nil, mode == nil {
                    writer.setModificationTime(modification)  // kept with the value being written
                } else {
                    // Mode and access time live in the entry: a file being written is committed first.
                    if let writer, writer.hasChanges { try commit(writer, behind: false) }
                    writeBehind.flush(shard: id)
                    try own(id, [key]) {
                        try shard.updateEntry(entryKey, clientID: options.clientID) { entry in
                            if let modification { entry.modificationTime = modification }
                            if let access { entry.metadata.accessTime = access }
                            if let mode { entry.metadata.mode = mode }
                            entry.metadata.changeTime = now
                        }
                    }
                    if let writer, let mode { writer.metadata.mode = mode }
                }
            }
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
            guard let id = ShardDirectoryName.id(name) else {
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
            guard let id = ShardDirectoryName.id(name), node.shards.localShard(id) != nil else {
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
        let existing = try currentAttributes(shard, key)
        let metadata = existing?.metadata ?? EntryMetadata(number: shard.newEntryNumber())
        let (handle, entry, _) = register(ino, shard, key, metadata: metadata, writable: true, append: flags & O_APPEND != 0)
        do {
            // The kernel creates when it has no name cached, so the entry may
            // exist (in the shard, or open and uncommitted): then this is an
            // open(O_CREAT) of it, which truncates only with O_TRUNC. A new file
            // is empty, and committed empty unless written.
            let exists = entry.pendingSize != nil || existing != nil
            if exists && flags & O_EXCL != 0 { throw FileSystemError(EEXIST, "\(key) exists") }
            if !exists || flags & O_TRUNC != 0 {
                try entry.truncate(to: 0)
            }
            if !exists { touchDirectory(shard) }
            guard let view = try entryView(shard, key, inode: ino, byName: false) else {
                throw FileSystemError(ENOENT, "entry \(key) is gone")
            }
            return (EntryReply(inode: ino, attributes: fileAttributes(shard, ino, view.attributes), timeout: timeout(shard),
                               attributeTimeout: view.ofWriter ? 0 : timeout(shard)), handle)
        } catch {
            _ = try? release(handle)
            throw error
        }
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
        let current = try currentAttributes(shard, entryKey)
        let (handle, entry, _) = register(ino, shard, entryKey, metadata: current?.metadata ?? EntryMetadata(),
                                          writable: wantsWrite, append: flags & O_APPEND != 0)
        do {
            // A file the mount holds open and has not committed yet exists too.
            let exists = entry.pendingSize != nil || current != nil
            guard exists else {
                throw FileSystemError(ENOENT, "entry \(entryKey) is gone")
            }
            if wantsWrite && flags & O_TRUNC != 0 { try entry.truncate(to: 0) }
        } catch {
            _ = try? release(handle)
            throw error
        }
        // The kernel may keep a file's pages across opens: the mount's own writes
        // go through them, and changes made elsewhere (the socket service)
        // invalidate them (entriesChanged).
        return (handle, true)
    }

    func read(_ handle: UInt64, offset: Int, count: Int) throws -> [UInt8] {
        let entry = try self.file(handle).entry
        if !entry.hasBuffer, let pending = writeBehind.pending(shard: entry.shard.id, key: entry.key.bytes), !pending.deleted {
            guard offset < pending.value.count else { return [] }
            return Array(pending.value[offset..<min(pending.value.count, offset + count)])
        }
        return try entry.read(at: offset, count: count)
    }

    func write(_ handle: UInt64, _ bytes: UnsafeRawBufferPointer, offset: Int) throws -> Int {
        let file = try self.file(handle)
        guard file.writable else { throw FileSystemError(EBADF, "file not open for writing") }
        try writable(file.entry.shard)
        loadable(file.entry)
        if try file.entry.write(bytes, at: offset, append: file.append) {
            invalidate?([file.entry.inode])  // the kernel put the bytes at the old end
        }
        return bytes.count
    }

    /// close(): a small file's put is queued (visible at once, durable at fsync or
    /// within milliseconds); a larger one is committed now. The error is close()'s,
    /// and so is that of an earlier queued batch of the shard that failed.
    func flush(_ handle: UInt64) throws {
        let entry = try file(handle).entry
        try commit(entry, behind: true)
        if let failure = writeBehind.takeFailure(shard: entry.shard.id) { throw failure }
    }

    /// fsync(): this file's changes and everything queued before them are durable.
    func fsync(_ handle: UInt64) throws {
        let entry = try self.file(handle).entry
        try commit(entry, behind: false)
        writeBehind.flush(shard: entry.shard.id)
        if let failure = writeBehind.takeFailure(shard: entry.shard.id) { throw failure }
    }

    /// The last release of an entry commits what its handles left uncommitted
    /// (a close that failed is retried once). If that fails too, those changes
    /// are lost: readers see the last committed value again.
    func release(_ handle: UInt64) throws {
        guard let entry = lock.withLock({ unregister(handle) }) else { return }
        var failure: Error?
        do { try commit(entry, behind: true) } catch { failure = error }
        // Still registered during the commit, so an open racing it shares the
        // entry; it goes once no handle came back meanwhile.
        let last = lock.withLock { () -> Bool in
            guard let open = openEntries[entry.inode], open.entry === entry, open.handles == 0 else { return false }
            openEntries.removeValue(forKey: entry.inode)
            return true
        }
        if last {
            entry.abandon()  // a staged value that was not committed is removed
            if let failure {
                logger.error("changes of a file could not be committed at its last close and are lost",
                             metadata: ["shard": "\(entry.shard.id)", "key": "\(entry.key)", "error": "\(failure)"])
                invalidate?([entry.inode])
            }
        }
        if let failure { throw failure }
    }

    private func commit(_ file: OpenEntry, behind: Bool) throws {
        try file.commitLock.withLock { try commitLocked(file, behind: behind) }
    }

    private func commitLocked(_ file: OpenEntry, behind: Bool) throws {
        let id = file.shard.id
        if behind, let (value, time, indexes) = try file.takeSmallValue(limit: Self.writeBehindLimit) {
            do {
                // Checked now, as a synchronous put would: owner, closed state, room.
                try writable(file.shard)
                let room = file.shard.sizeLimit - file.shard.usedBytesUpperBound - writeBehind.queuedBytes(shard: id)
                if WriteBehind.cost(value.count) + 4096 < room,
                   writeBehind.enqueue(file.shard, clientID: options.clientID, key: file.key.bytes, value: value,
                                       indexes: indexes, metadata: file.metadata, modificationTime: time ?? Self.now()) {
                    return
                }
                // Near the limit, or the shard is closing: commit now, for an exact answer.
                writeBehind.flush(shard: id)
                try own(id, [file.key.bytes]) {
                    try file.shard.put(file.key, size: value.count, indexes: indexes, clientID: options.clientID,
                                       modificationTime: time, entryNumber: file.metadata.number) { offset, out in
                        value.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + out.count)])) }
                    }
                }
            } catch {
                file.keepUncommitted(indexes: indexes)  // the buffer still holds the value: a later close or release retries
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
            let time = writer.pendingModificationTime ?? Self.now()
            return (EntryAttributes(key: key, size: size, modificationTime: time, indexes: [], metadata: writer.metadata), true)
        }
        return current.map { ($0, false) }
    }

    /// An entry's attributes as the mount shows them: a queued put wins.
    private func currentAttributes(_ shard: Shard, _ key: EntryKey) throws -> EntryAttributes? {
        if let pending = writeBehind.pending(shard: shard.id, key: key.bytes) {
            if pending.deleted { return nil }
            return EntryAttributes(key: key, size: pending.value.count, modificationTime: pending.modificationTime, indexes: [],
                                   metadata: pending.metadata)
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
        let open = openEntry(shard: id, key: key)
        // Queued like a put: gone for readers of the mount at once, durable at the
        // next fsync or within milliseconds. Created-and-still-open files have
        // nothing committed, and unlinking them is dropping them.
        if try currentAttributes(shard, key) == nil {
            guard open != nil else { throw FileSystemError(ENOENT, "no entry \(key) in shard \(id)") }
        } else if !writeBehind.enqueue(shard, clientID: options.clientID, key: key.bytes, value: [],
                                       modificationTime: 0, deleted: true) {
            writeBehind.flush(shard: id)  // the shard is closing: commit now, for an exact answer
            try own(id, [key.bytes]) { try shard.delete(key, clientID: options.clientID) }
        }
        touchDirectory(shard)
        if let open {
            open.orphan()  // a writer's close must not bring it back
            // The open file keeps its inode (fstat works); the name is free for a new one.
            inodes.unlink(.entry(shard: id, key: key.bytes))
        }
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
        let openSource = openEntry(shard: id, key: source)
        do {
            try own(id, [source.bytes, target.bytes]) { try shard.rename(source, to: target, clientID: options.clientID) }
        } catch ShardError.entryNotFound where openSource?.pendingSize != nil {
            // Created and still open, never committed: the target is replaced now,
            // and the writer's close puts the value under the new name.
            if source != target, try shard.attributes(target) != nil {
                try own(id, [target.bytes]) { try shard.delete(target, clientID: options.clientID) }
            }
        }
        // Open handles follow the entry; handles of a replaced target are orphans.
        if source != target { openEntry(shard: id, key: target)?.orphan() }
        openSource?.renamed(to: target)
        touchDirectory(shard)
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
                items.append(DirectoryItem(name: Array(ShardDirectoryName.of(shard.id).utf8), inode: ino,
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
                let entry = EntryAttributes(key: row.key, size: row.size, modificationTime: row.modificationTime, indexes: [],
                                            metadata: row.metadata)
                items.append(DirectoryItem(name: row.key.bytes, inode: ino, attributes: fileAttributes(shard, ino, entry),
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
        let index = try indexName(name)
        try changeIndexes(ino) { current in
            let exists = current.contains { $0.name == index }
            if flags & Self.xattrCreate != 0 && exists { throw FileSystemError(EEXIST, "index \(index) exists") }
            if flags & Self.xattrReplace != 0 && !exists { throw FileSystemError(ENODATA, "no index \(index)") }
            var updated = current.filter { $0.name != index }
            updated.append(IndexPair(name: index, value: value))
            try IndexPair.validate(updated)
            return updated
        }
    }

    /// Changes an entry's indexes: in the shard (after what is queued), or, for
    /// a file created and not committed yet, with its value at its commit.
    private func changeIndexes(_ ino: UInt64, _ change: @escaping ([IndexPair]) throws -> [IndexPair]) throws {
        let (shard, key) = try entry(ino)
        try writable(shard)
        if let open = openEntry(ino) {
            let uncommitted = try currentAttributes(shard, key) == nil
            if try open.changeIndexes(startIfUncommitted: uncommitted, change) { return }
        }
        writeBehind.flush(shard: shard.id)
        try own(shard.id, [key.bytes]) { try shard.updateIndexes(key, clientID: options.clientID, change) }
    }

    /// An entry's indexes as the mount shows them: those waiting for its first commit win.
    private func currentIndexes(_ ino: UInt64) throws -> [IndexPair] {
        let (shard, key) = try entry(ino)
        if let pending = openEntry(ino)?.pendingIndexes { return pending }
        if let queued = writeBehind.pending(shard: shard.id, key: key.bytes), !queued.deleted, let indexes = queued.indexes {
            return indexes
        }
        return try shard.attributes(key)?.indexes ?? []
    }

    func getxattr(_ ino: UInt64, name: String) throws -> [UInt8] {
        guard name.hasPrefix(Self.indexPrefix) else { throw FileSystemError(ENODATA, "only user.* attributes exist") }
        let index = String(name.dropFirst(Self.indexPrefix.count))
        guard let pair = try currentIndexes(ino).first(where: { $0.name == index }) else {
            throw FileSystemError(ENODATA, "no index \(index)")
        }
        return pair.value
    }

    func listxattr(_ ino: UInt64) throws -> [UInt8] {
        guard case .entry = try kind(ino) else { return [] }
        var out: [UInt8] = []
        for index in try currentIndexes(ino) {
            out += Array((Self.indexPrefix + index.name).utf8) + [0]
        }
        return out
    }

    func removexattr(_ ino: UInt64, name: String) throws {
        let index = try indexName(name)
        try changeIndexes(ino) { current in
            guard current.contains(where: { $0.name == index }) else { throw FileSystemError(ENODATA, "no index \(index)") }
            return current.filter { $0.name != index }
        }
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
            if let ino = inodes.existingInode(for: .entry(shard: id, key: key)) {
                stale.append(ino)
                openEntry(ino)?.dropCommittedBuffer()
            }
        }
        if !stale.isEmpty { invalidate?(stale) }
    }

    /// Commits every open file (unmount: pending writes first). Runs once: the
    /// session loop's end and libfuse's destroy callback both call it.
    func commitAll() {
        guard lock.withLock({ () -> Bool in defer { committedAll = true }; return !committedAll }) else { return }
        for entry in lock.withLock({ openEntries.values.map(\.entry) }) {
            do { try commit(entry, behind: false) } catch {
                logger.error("could not commit an open file at unmount", metadata: ["key": "\(entry.key)", "error": "\(error)"])
            }
            entry.abandon()
        }
        writeBehind.stop()
        storeDirectoryTimes()
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

    private func file(_ handle: UInt64) throws -> FileHandle {
        guard let file = lock.withLock({ files[handle] }) else { throw FileSystemError(EBADF, "unknown file handle") }
        return file
    }

    /// The shared state of an open inode. Its own lock is taken only after
    /// `lock` is released: a commit holds the entry's lock while its commit hook
    /// needs other locks, so nesting them could deadlock.
    private func openEntry(_ ino: UInt64) -> OpenEntry? {
        lock.withLock { openEntries[ino]?.entry }
    }

    /// The open state of a name. An open file keeps its inode known (the kernel
    /// holds a lookup on it), and a rename moves the inode with its handles.
    private func openEntry(shard: UInt64, key: EntryKey) -> OpenEntry? {
        guard let ino = inodes.existingInode(for: .entry(shard: shard, key: key.bytes)) else { return nil }
        return openEntry(ino)
    }

    /// A new handle on `ino`, sharing the inode's open state (made if it has
    /// none: `shared` false).
    private func register(_ ino: UInt64, _ shard: Shard, _ key: EntryKey, metadata: EntryMetadata, writable: Bool, append: Bool)
        -> (handle: UInt64, entry: OpenEntry, shared: Bool) {
        lock.withLock {
            let handle = nextHandle
            nextHandle += 1
            let existing = openEntries[ino]?.entry
            let entry = existing ?? OpenEntry(shard: shard, key: key, inode: ino, metadata: metadata, clientID: options.clientID,
                                              spillDirectory: spillDirectory)
            openEntries[ino] = (entry, (openEntries[ino]?.handles ?? 0) + 1)
            files[handle] = FileHandle(entry: entry, writable: writable, append: append)
            return (handle, entry, existing != nil)
        }
    }

    /// Removes a handle (lock held); its entry stays registered until `release` lets it go.
    private func unregister(_ handle: UInt64) -> OpenEntry? {
        guard let file = files.removeValue(forKey: handle) else { return nil }
        openEntries[file.entry.inode]?.handles -= 1
        return file.entry
    }

    /// Before an entry's buffer is first filled from the shard: what earlier
    /// handles of the entry queued must be in the shard (an entry is made anew
    /// once its last handle is released, after that handle's put was queued).
    private func loadable(_ entry: OpenEntry) {
        if !entry.hasBuffer { writeBehind.flush(shard: entry.shard.id) }
    }

    /// The open state of `ino` while it holds uncommitted changes (one whose
    /// entry was unlinked only if `includingUnlinked`).
    private func openWriter(_ ino: UInt64, includingUnlinked: Bool = true) -> OpenEntry? {
        guard let entry = openEntry(ino), entry.pendingSize != nil, includingUnlinked || !entry.isOrphaned else { return nil }
        return entry
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

    private func rootAttributes() -> stat { attributes.root(readOnly: options.readOnly) }

    private func isWritable(_ shard: Shard) -> Bool {
        shard.state == .open && !options.readOnly && !shard.isReadOnlyView
    }

    private func shardAttributes(_ shard: Shard, _ ino: UInt64) -> stat {
        let times = directoryTimes(shard)
        return attributes.shard(shard.id, writable: isWritable(shard), modificationTime: times.modification, changeTime: times.change)
    }

    private func fileAttributes(_ shard: Shard, _ ino: UInt64, _ entry: EntryAttributes) -> stat {
        attributes.file(shard: shard.id, entry, writable: isWritable(shard))
    }

    /// A shard directory's times: kept in memory once read (the stored time, or the mount's start).
    private func directoryTimes(_ shard: Shard) -> DirectoryTimes {
        if let times = timesLock.withLock({ directoryTimes[shard.id] }) { return times }
        let stored = (try? shard.directoryTime()) ?? nil
        let time = stored ?? attributes.mountTime
        return timesLock.withLock {
            if let times = directoryTimes[shard.id] { return times }
            let times = DirectoryTimes(modification: time, change: time)
            directoryTimes[shard.id] = times
            return times
        }
    }

    /// An entry was made or removed: the directory's modification and change time are now.
    private func touchDirectory(_ shard: Shard) {
        _ = directoryTimes(shard)
        let now = Self.now()
        timesLock.withLock { directoryTimes[shard.id] = DirectoryTimes(modification: now, change: now, unstored: true) }
    }

    /// utimensat of a shard directory (stored already), or a change of its mode (`modification` nil).
    private func setDirectoryTime(_ shard: Shard, modification: Int64?) {
        let times = directoryTimes(shard)
        let now = Self.now()
        timesLock.withLock {
            directoryTimes[shard.id] = DirectoryTimes(modification: modification ?? times.modification, change: now,
                                                      unstored: modification == nil && times.unstored)
        }
    }

    /// At unmount: directory times changed through the mount are kept for the next one.
    private func storeDirectoryTimes() {
        let unstored = timesLock.withLock { directoryTimes.filter(\.value.unstored) }
        for (id, times) in unstored {
            guard let shard = node.shards.localShard(id), isWritable(shard), shard.owner == options.clientID else { continue }
            try? shard.setDirectoryTime(times.modification, clientID: options.clientID)
        }
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

/// One open(2) of an entry: the state it shares with the entry's other handles,
/// and how it was opened.
struct FileHandle {
    let entry: OpenEntry
    let writable: Bool
    /// O_APPEND: every write lands at the end of the value.
    let append: Bool
}

/// Where a directory listing stands.
struct DirectoryCursor {
    var lastKey: EntryKey?
    var lastOffset: Int64 = 0
}

private final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}
