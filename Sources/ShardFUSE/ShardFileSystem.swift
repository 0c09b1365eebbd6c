import Foundation
import Synchronization
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
    /// How long the attributes may be cached: `timeout`, or 0 for a writer's view
    /// (but a new file's, answering its create).
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
    /// Owner and group shown: the `uid=`/`gid=` options, else the daemon's.
    private let uid: uid_t, gid: gid_t
    private let attributes: Attributes
    private let spillDirectory: String

    /// What the kernel is told to forget, and which commits are the mount's own.
    let kernelCache = KernelCache()
    let handles = HandleTable()
    /// Committed value files the kernel reads itself (FUSE passthrough).
    let backingFiles = BackingFiles()
    private let directoryTimes: DirectoryTimes

    /// Whether write-only handles bypass the page cache (`writesDirectly`): set
    /// at INIT, on kernels that speak FUSE 7.42 (Linux 6.14) or later.
    var writesAroundPageCache: Bool {
        get { writesAroundPageCacheFlag.load(ordering: .relaxed) }
        set { writesAroundPageCacheFlag.store(newValue, ordering: .relaxed) }
    }
    private let writesAroundPageCacheFlag = Atomic<Bool>(false)

    /// Whether a handle opened with `flags` skips the page cache
    /// (`FOPEN_DIRECT_IO`): a write-only one, where the kernel allows. Its writes
    /// reach the daemon as before (one request per `write()`, up to max_write),
    /// and the kernel no longer asks `getxattr(security.capability)` before each
    /// one (`file_remove_privs` runs on cached writes only): a create + write +
    /// close takes 5 round trips instead of 6. Nothing reads through such a
    /// handle, and it cannot be mmapped (mmap needs read access). The kernel
    /// drops cached pages of the range before the write; `write` asks for them
    /// to be dropped again after it while handles through the cache are open (a
    /// read between the two could cache the old bytes: not seen here, 6,000
    /// appends under a reading loop; the second drop is queued, so it narrows
    /// that window rather than closing it), and clears the set-ID bits the
    /// kernel would have.
    func writesDirectly(_ flags: Int32) -> Bool {
        writesAroundPageCache && flags & O_ACCMODE == O_WRONLY
    }

    /// `commitAll` runs once (the loop's end and libfuse's destroy both call it).
    private let commitAllLock = NSLock()
    private var committedAll = false

    public init(node: StorageNode, options: MountOptions, logger: Logger = Logger(label: "shardfs.fuse")) {
        self.node = node
        self.options = options
        self.logger = logger
        uid = options.uid ?? getuid()
        gid = options.gid ?? getgid()
        var attributes = Attributes(uid: uid, gid: gid, mountTime: Int64(time(nil)) * 1_000_000_000)
        if let umask = options.umask {
            attributes.fileMode = 0o666 & ~umask
            attributes.directoryMode = 0o777 & ~umask
        }
        self.attributes = attributes
        directoryTimes = DirectoryTimes(mountTime: attributes.mountTime)
        spillDirectory = node.configuration.node.dataDir
    }

    // MARK: Names and attributes

    func lookup(_ parent: UInt64, _ name: [UInt8]) throws -> EntryReply {
        guard let reply = try lookupIfPresent(parent, name) else {
            throw FileSystemError(ENOENT, "no \(String(decoding: name, as: UTF8.self)) in inode \(parent)")
        }
        return reply
    }

    /// A lookup; nil when there is no such name (the bridge answers a negative
    /// entry: most lookups of a create are of a name that is not there yet, and
    /// build no error for it).
    func lookupIfPresent(_ parent: UInt64, _ name: [UInt8]) throws -> EntryReply? {
        switch try kind(parent) {
        case .root:
            guard let id = ShardDirectoryName.id(name) else { return nil }
            do {
                return try reading(id) { shard in
                    let ino = inodes.inode(for: .shard(id), lookup: true)
                    return EntryReply(inode: ino, attributes: shardAttributes(shard, ino), timeout: timeout(shard))
                }
            } catch let error as FileSystemError where error.code == ENOENT {
                return nil
            }
        case .shard(let id):
            let key = try entryKey(name)
            return try reading(id) { shard in
                // A file created and still open exists too (for its writer's stat, rename…).
                let known = inodes.existingInode(for: .entry(shard: id, key: key.bytes))
                guard let view = try entryView(shard, key, inode: known, byName: true) else { return nil }
                let ino = inodes.inode(for: .entry(shard: id, key: key.bytes), lookup: true)
                return EntryReply(inode: ino, attributes: fileAttributes(shard, ino, view.attributes), timeout: timeout(shard),
                                  attributeTimeout: view.ofWriter ? 0 : timeout(shard))
            }
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
            return try reading(id) { shard in (shardAttributes(shard, ino), attributeTimeout(shard)) }
        case .entry(let id, let key):
            let entryKey = EntryKey(trusted: key)  // validated when its inode was made
            return try reading(id) { shard in
                guard let view = try entryView(shard, entryKey, inode: ino, byName: false) else {
                    throw FileSystemError(ENOENT, "entry \(entryKey) is gone")
                }
                return (fileAttributes(shard, ino, view.attributes), view.ofWriter ? 0 : attributeTimeout(shard))
            }
        }
    }

    /// chmod, chown, truncate and utimens.
    func setattr(_ ino: UInt64, _ attr: stat, _ toSet: AttributeChanges, handle: UInt64?) throws -> (stat, Double) {
        let kind = try self.kind(ino)
        if !toSet.isEmpty, let id = kind.shardID, isView(id) {
            throw FileSystemError(EROFS, "shard \(id) is a read-only view of a volume this node backs")
        }
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
                let writeBits = attr.st_mode & 0o222
                if writeBits == 0 {
                    if shard.state == .open {
                        try writable(shard)
                        try wait { try await self.node.shards.closeShard(id) }
                        setDirectoryTime(shard, modification: nil)
                        // Cached modes of its files still show write bits: drop them.
                        kernelCache.invalidate?(inodes.inodes(ofShard: id))
                    }
                } else if shard.state == .closed || options.readOnly {
                    throw FileSystemError(options.readOnly ? EROFS : EPERM, "a closed shard stays closed")
                }
            }
        case .entry(let id, let key):
            let shard = try localShard(id)
            let entryKey = EntryKey(trusted: key)  // validated when its inode was made
            let file = handle.flatMap { handles.file($0) }
            if toSet.contains(.size) {
                try writable(shard)
                guard attr.st_size >= 0 else { throw FileSystemError(EINVAL, "negative size") }
                if let file, file.writable {
                    try file.entry.truncate(to: Int(attr.st_size))
                } else if let open = openEntry(ino) {
                    // truncate(2) on a path of an open file: its shared state, committed now.
                    try open.truncate(to: Int(attr.st_size))
                    try commit(open, deferringDurability: false)
                } else {
                    // truncate(2) on a path: rewrite the value now.
                    let temporary = OpenEntry(shard: shard, key: entryKey, inode: ino, metadata: EntryMetadata(),
                                              clientID: options.clientID, spillDirectory: spillDirectory)
                    defer { temporary.abandon() }
                    try temporary.truncate(to: Int(attr.st_size))
                    try commit(temporary, deferringDurability: false)
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
                // Under the entry's commit lock: a close committing it meanwhile has
                // taken the value, and the time must then go to the shard.
                let keptWithValue = writer.map { writer in
                    writer.commitLock.withLock { () -> Bool in
                        guard writer.holdsUncommittedValue, let modification, access == nil, mode == nil else { return false }
                        writer.setModificationTime(modification)  // kept with the value being written
                        return true
                    }
                } ?? false
                if !keptWithValue {
                    // Mode and access time live in the entry: a file being written is committed first.
                    // Both are logged with durability deferred, like close(): chmod and utimens
                    // are durable after fsync (SEMANTICS.md), and tar and rsync set them per file.
                    if let writer, writer.hasChanges { try commit(writer, deferringDurability: true) }
                    try own(id, [key]) {
                        try shard.changeMetadata(entryKey, modificationTime: modification,
                                                 MetadataChange(mode: mode, accessTime: access, changeTime: now),
                                                 clientID: options.clientID, deferringDurability: true)
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
        if mask & W_OK != 0, let id = try kind(ino).shardID, isView(id) {
            throw FileSystemError(EROFS, "shard \(id) is a read-only view of a volume this node backs")
        }
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
        case .shard(let id):
            if isView(id) { throw FileSystemError(EROFS, "shard \(id) is a read-only view of a volume this node backs") }
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
            guard let id = ShardDirectoryName.id(name), let shard = node.shards.localShard(id) else {
                if let id = ShardDirectoryName.id(name), isView(id) {
                    throw FileSystemError(EROFS, "shard \(id) is a read-only view of a volume this node backs")
                }
                throw FileSystemError(ENOENT, "no shard \(String(decoding: name, as: UTF8.self))")
            }
            if options.readOnly { throw FileSystemError(EROFS, "read-only mount") }
            // Deleting is the owner's, as through the socket (a closed shard too).
            if shard.owner != options.clientID {
                throw FileSystemError(EACCES, "shard \(id) belongs to client \(shard.owner), this mount writes as \(options.clientID)")
            }
            try wait { try await self.node.shards.deleteShard(id) }
        case .shard:
            throw FileSystemError(ENOTDIR, "entries are files")
        case .entry:
            throw FileSystemError(ENOTDIR, "entries are files")
        }
    }

    func own<T>(_ shard: UInt64, _ keys: [[UInt8]], _ body: () throws -> T) rethrows -> T {
        try kernelCache.own(shard, keys, body)
    }

    /// The node committed changes to entries of a shard. Those not made by this
    /// mount (the batch service, another handle) are dropped from the kernel's
    /// caches, so the mount sees them at once.
    func entriesChanged(shard id: UInt64, keys: [[UInt8]]) {
        let foreign = kernelCache.foreign(shard: id, keys)
        guard !foreign.isEmpty, let parent = inodes.existingInode(for: .shard(id)) else { return }
        var stale: [UInt64] = []
        for key in foreign {
            kernelCache.invalidateName?(parent, key)
            if let ino = inodes.existingInode(for: .entry(shard: id, key: key)) {
                stale.append(ino)
                openEntry(ino)?.changedElsewhere()
            }
        }
        if !stale.isEmpty { kernelCache.invalidate?(stale) }
    }

    /// Commits every open file (unmount: pending writes first). Runs once: the
    /// session loop's end and libfuse's destroy callback both call it.
    func commitAll() {
        guard commitAllLock.withLock({ () -> Bool in defer { committedAll = true }; return !committedAll }) else { return }
        for entry in handles.allEntries {
            do { try commit(entry, deferringDurability: false) } catch {
                logger.error("could not commit an open file at unmount", metadata: ["key": "\(entry.key)", "error": "\(error)"])
            }
            entry.abandon()
        }
        storeDirectoryTimes()
        node.shards.applyLogs()
    }

    // MARK: Helpers

    func kind(_ ino: UInt64) throws -> NodeKind {
        guard let kind = inodes.kind(of: ino) else { throw FileSystemError(ESTALE, "unknown inode \(ino)") }
        return kind
    }

    /// A shard this node writes, for the write paths: a backup's view is `EROFS`.
    func localShard(_ id: UInt64) throws -> Shard {
        guard let shard = node.shards.localShard(id) else {
            if node.views.serves(id) { throw FileSystemError(EROFS, "shard \(id) is a read-only view of a volume this node backs") }
            throw FileSystemError(ENOENT, "shard \(id) is gone")
        }
        return shard
    }

    /// Whether the shard is served here as a backup's view (this node does not write it).
    func isView(_ id: UInt64) -> Bool {
        node.shards.localShard(id) == nil && node.views.serves(id)
    }

    /// Runs `body` with the shard as this node serves it, for the read paths: its
    /// own, or else the newest view of it (a backup's), which is valid only during
    /// `body` and is one snapshot throughout. `ENOENT` when it serves neither;
    /// `EIO` when it cannot serve the view now (its node lease is not confirmed).
    func reading<R>(_ id: UInt64, _ body: (any ShardReading) throws -> R) throws -> R {
        if let shard = node.shards.localShard(id) { return try body(shard) }
        do {
            if let result = try node.views.withView(id, { view in try body(view) }) { return result }
        } catch ShardError.notPrimary(let reason) {
            throw FileSystemError(EIO, "the view of shard \(id) is not served now: \(reason)")
        }
        throw FileSystemError(ENOENT, "shard \(id) is gone")
    }

    func entry(_ ino: UInt64) throws -> (Shard, EntryKey) {
        guard case .entry(let id, let key) = try kind(ino) else {
            throw FileSystemError(ENOTSUP, "indexes are attributes of entries, not of directories")
        }
        return (try localShard(id), EntryKey(trusted: key))
    }

    func file(_ handle: UInt64) throws -> OpenFile {
        guard let file = handles.file(handle) else { throw FileSystemError(EBADF, "unknown file handle") }
        return file
    }

    /// The shared state of an open inode. Its own lock is taken only after
    /// `lock` is released: a commit holds the entry's lock while its commit hook
    /// needs other locks, so nesting them could deadlock.
    func openEntry(_ ino: UInt64) -> OpenEntry? {
        handles.entry(ino)
    }

    /// The open state of a name. An open file keeps its inode known (the kernel
    /// holds a lookup on it), and a rename moves the inode with its handles.
    func openEntry(shard: UInt64, key: EntryKey) -> OpenEntry? {
        guard let ino = inodes.existingInode(for: .entry(shard: shard, key: key.bytes)) else { return nil }
        return openEntry(ino)
    }

    /// A new handle on `ino`, sharing the inode's open state (made if it has
    /// none: `shared` false). `offered`, `valueFile`: see `HandleTable.open`; a
    /// backing file the open did not take is unregistered here.
    func register(_ ino: UInt64, _ shard: Shard, _ key: EntryKey, metadata: EntryMetadata, writable: Bool, readable: Bool = true,
                  append: Bool, direct: Bool = false, offered: Backing? = nil, valueFile: UInt64? = nil) throws
        -> (handle: UInt64, entry: OpenEntry, shared: Bool) {
        let opened: OpenedHandle
        do {
            opened = try handles.open(ino, writable: writable, readable: readable, append: append, direct: direct, offered: offered,
                                      valueFile: valueFile) {
                OpenEntry(shard: shard, key: key, inode: ino, metadata: metadata, clientID: options.clientID,
                          spillDirectory: spillDirectory)
            }
        } catch {
            if let offered { backingFiles.unregister(offered) }
            throw error
        }
        if let unused = opened.unusedBacking { backingFiles.unregister(unused) }
        return (opened.handle, opened.entry, opened.shared)
    }

    /// The open state of `ino` while it holds uncommitted changes (one whose
    /// entry was unlinked only if `includingUnlinked`).
    func openWriter(_ ino: UInt64, includingUnlinked: Bool = true) -> OpenEntry? {
        guard let entry = openEntry(ino), entry.pendingSize != nil, includingUnlinked || !entry.isOrphaned else { return nil }
        return entry
    }

    /// Writes need a writable mount, an open shard and the mount's client as owner.
    func writable(_ shard: Shard) throws {
        if options.readOnly || shard.isReadOnlyView { throw FileSystemError(EROFS, "read-only mount") }
        if shard.state == .closed { throw FileSystemError(EROFS, "shard \(shard.id) is closed") }
        if shard.owner != options.clientID {
            throw FileSystemError(EACCES, "shard \(shard.id) belongs to client \(shard.owner), this mount writes as \(options.clientID)")
        }
    }

    func entryKey(_ name: [UInt8]) throws -> EntryKey {
        if name.count > EntryKey.maxLength { throw FileSystemError(ENAMETOOLONG, "names are at most 255 bytes") }
        return try EntryKey(name)
    }

    func indexName(_ attribute: String) throws -> String {
        guard attribute.hasPrefix(Self.indexPrefix), attribute.count > Self.indexPrefix.count else {
            throw FileSystemError(ENOTSUP, "only user.<index> attributes can be set")
        }
        return String(attribute.dropFirst(Self.indexPrefix.count))
    }

    /// How long the kernel may keep a name (and the attributes a lookup returns).
    /// A view's names and attributes are dropped at each generation that changes
    /// its shard (`viewsChanged`), so they keep the same timeouts.
    func timeout(_ shard: any ShardReading) -> Double {
        shard.state == .closed ? options.closedTimeout : options.entryTimeout
    }

    /// How long the kernel may keep attributes that getattr returns.
    func attributeTimeout(_ shard: any ShardReading) -> Double {
        shard.state == .closed ? options.closedTimeout : options.attributeTimeout
    }

    /// How long the kernel may keep "no such name" in `parent`: not at all in a
    /// backup's view, whose new entries no invalidation can name.
    func negativeTimeout(_ parent: UInt64) -> Double {
        if case .shard(let id)? = inodes.kind(of: parent), isView(id) { return 0 }
        return options.entryTimeout
    }

    /// A generation of a backed volume was swapped in: the kernel forgets what it
    /// cached of the shards that changed (attributes, pages) or went away (names
    /// too), and "no such shard" for the ones new at the root. Runs on the views'
    /// task; the invalidations are queued, never sent from a request handler.
    func viewsChanged(changed: [UInt64], removed: [UInt64]) {
        let gone = Set(removed)
        var known: Set<UInt64> = []
        for id in changed + removed {
            let held = inodes.existingInode(for: .shard(id)) != nil
            if !held || gone.contains(id) {
                kernelCache.invalidateName?(InodeTable.rootInode, Array(ShardDirectoryName.of(id).utf8))
            }
            if held { known.insert(id) }
        }
        guard !known.isEmpty else { return }
        let stale = inodes.inodes(ofShards: known)
        if !stale.isEmpty { kernelCache.invalidate?(stale) }
    }

    func dot(_ name: String, ino: UInt64, next: Int64) -> DirectoryItem {
        DirectoryItem(name: Array(name.utf8), inode: ino, attributes: rootAttributes(), timeout: 0, nextOffset: next, kind: nil)
    }

    func rootAttributes() -> stat { attributes.root(readOnly: options.readOnly) }

    func isWritable(_ shard: any ShardReading) -> Bool {
        shard.state == .open && !options.readOnly && !shard.isReadOnlyView
    }

    func shardAttributes(_ shard: any ShardReading, _ ino: UInt64) -> stat {
        guard let local = shard as? Shard else {
            // A view's directory time is the one its primary stored (the mount's start if none).
            let time = ((try? shard.directoryTime()) ?? nil) ?? attributes.mountTime
            return attributes.shard(shard.id, writable: false, modificationTime: time, changeTime: time)
        }
        let times = directoryTimes.of(local)
        return attributes.shard(shard.id, writable: isWritable(shard), modificationTime: times.modification, changeTime: times.change)
    }

    func fileAttributes(_ shard: any ShardReading, _ ino: UInt64, _ entry: EntryAttributes) -> stat {
        attributes.file(shard: shard.id, entry, writable: isWritable(shard), linked: ino == Self.unknownInode || inodes.isLinked(ino))
    }

    /// An entry was made, removed or renamed.
    func touchDirectory(_ shard: Shard) { directoryTimes.touch(shard, now: Self.now()) }

    /// utimensat of a shard directory (stored already), or a change of its mode (`modification` nil).
    func setDirectoryTime(_ shard: Shard, modification: Int64?) {
        directoryTimes.set(shard, modification: modification, now: Self.now())
    }

    /// At unmount: directory times moved through the mount are kept for the next one.
    func storeDirectoryTimes() {
        for (id, time) in directoryTimes.unstored() {
            guard let shard = node.shards.localShard(id), isWritable(shard), shard.owner == options.clientID else { continue }
            try? shard.setDirectoryTime(time, clientID: options.clientID)
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
    func wait<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
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

private final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}
