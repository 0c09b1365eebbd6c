import Foundation
import ShardStore

/// One open(2) of an entry: the state it shares with the entry's other handles,
/// and how it was opened.
struct OpenFile {
    let entry: OpenEntry
    let writable: Bool
    /// O_APPEND: every write lands at the end of the value.
    let append: Bool
    /// Written around the page cache (`ShardFileSystem.writesDirectly`), or
    /// naming a backing file.
    let direct: Bool
    /// The backing file the open names (FUSE passthrough), if any.
    var passthrough: PassthroughOpen? = nil
}

/// A committed value file registered as an inode's backing file (FUSE
/// passthrough, `BackingFiles`): the kernel reads it without the daemon.
struct Backing: Equatable {
    let id: Int32
    /// Its number in the shard: which value it holds.
    let valueFile: UInt64
}

/// How an open names its inode's backing file: from an inode's first
/// passthrough open to its last release, the kernel wants every open of it to.
struct PassthroughOpen: Equatable {
    let backing: Int32
    /// Reads and writes still come to the daemon (FOPEN_DIRECT_IO beside it): the
    /// open may write, or the entry's value is no longer the backing file's.
    let throughDaemon: Bool
}

/// What `HandleTable.open` registered.
struct OpenedHandle {
    let handle: UInt64
    let entry: OpenEntry
    /// Other handles held the inode's open state already.
    let shared: Bool
    let passthrough: PassthroughOpen?
    /// The backing file offered to the open, when it did not take it: the caller unregisters it.
    let unusedBacking: Backing?
}

/// One open(2) of an entry of a backup's view: read-only, and read from the
/// newest view at each request (a view lives only within one request).
struct ViewFile {
    let shard: UInt64
    let key: EntryKey
}

/// Where a directory listing stands.
struct DirectoryCursor {
    var lastKey: EntryKey?
    var lastOffset: Int64 = 0
}

/// The mount's file and directory handles (`fuse_file_info.fh`), and the open
/// state each inode's handles share, which lives from the inode's first open to
/// its last release (`retire`). Like `InodeTable`: one leaf lock; an entry's
/// own lock is taken only after this one is released.
final class HandleTable: @unchecked Sendable {
    private let lock = NSLock()
    private var files: [UInt64: OpenFile] = [:]
    /// Each inode's open state, its handles, how many of them go through the
    /// page cache (not `direct`: they may hold cached pages), and the backing
    /// file every open names while the kernel reads the inode itself.
    private var entries: [UInt64: OpenInode] = [:]
    private struct OpenInode {
        let entry: OpenEntry
        var handles = 0
        var cached = 0
        /// Handles open for writing.
        var writers = 0
        var backing: Backing?
    }
    private var directories: [UInt64: DirectoryCursor] = [:]
    private var viewFiles: [UInt64: ViewFile] = [:]
    private var next: UInt64 = 1

    /// A new handle on `ino`, sharing the inode's open state, or one `make`
    /// makes when it has none (`shared` false).
    ///
    /// Passthrough: `offered` is a backing file for a read-only open of the
    /// entry's committed value file. The open takes it when no other handle is
    /// open on the inode (none may use its page cache). While the inode has a
    /// backing file, every open names it (the kernel's rule), and only a
    /// read-only one whose entry's value is still that file (`valueFile`, nil:
    /// unknown or not to be read by the kernel) while no handle may write reads
    /// it through the kernel; the others come to the daemon (direct I/O). A
    /// read-write open is refused then (`ETXTBSY`): the kernel opens the backing
    /// file for it with its flags, and a shared writable mmap would write into
    /// the committed value file. On a throw, the caller unregisters `offered`.
    func open(_ ino: UInt64, writable: Bool, readable: Bool = true, append: Bool, direct: Bool, offered: Backing? = nil,
              valueFile: UInt64? = nil, make: () -> OpenEntry) throws -> OpenedHandle {
        try lock.withLock {
            let existing = entries[ino]
            if existing?.backing != nil && writable && readable {
                throw FileSystemError(ETXTBSY, "the file is open for reading through the kernel: it cannot be opened for reading and writing")
            }
            let handle = newHandle()
            var inode = existing ?? OpenInode(entry: make())
            var passthrough: PassthroughOpen?
            var unused = offered
            if let backing = inode.backing {
                let kernelReads = !writable && inode.writers == 0 && valueFile == backing.valueFile
                passthrough = PassthroughOpen(backing: backing.id, throughDaemon: !kernelReads)
            } else if inode.handles == 0, let offered {
                inode.backing = offered
                unused = nil
                passthrough = PassthroughOpen(backing: offered.id, throughDaemon: false)
            }
            // A handle that names a backing file uses no page cache.
            let direct = direct || passthrough != nil
            inode.handles += 1
            if !direct { inode.cached += 1 }
            if writable { inode.writers += 1 }
            entries[ino] = inode
            files[handle] = OpenFile(entry: inode.entry, writable: writable, append: append, direct: direct, passthrough: passthrough)
            return OpenedHandle(handle: handle, entry: inode.entry, shared: existing != nil, passthrough: passthrough,
                                unusedBacking: unused)
        }
    }

    /// The backing file of `ino`, while it has one; `open` (no handle open on
    /// it: none), else nil: whether an open should prepare a backing file.
    func passthroughState(_ ino: UInt64) -> (open: Bool, backing: Backing?) {
        lock.withLock { (entries[ino].map { $0.handles > 0 } ?? false, entries[ino]?.backing) }
    }

    func file(_ handle: UInt64) -> OpenFile? { lock.withLock { files[handle] } }

    /// How many handles on `ino` go through the page cache (may hold its pages).
    func cachedHandleCount(_ ino: UInt64) -> Int { lock.withLock { entries[ino]?.cached ?? 0 } }

    /// The open state of `ino`, if any handle holds it.
    func entry(_ ino: UInt64) -> OpenEntry? { lock.withLock { entries[ino]?.entry } }

    var allEntries: [OpenEntry] { lock.withLock { entries.values.map(\.entry) } }

    /// Removes a handle; its entry stays until `retire` lets it go. The last
    /// handle of an inode takes its backing file along: the caller unregisters
    /// it (the kernel released every open that named it before this release).
    func close(_ handle: UInt64) -> (entry: OpenEntry, droppedBacking: Backing?)? {
        lock.withLock {
            guard let file = files.removeValue(forKey: handle), var inode = entries[file.entry.inode] else { return nil }
            inode.handles -= 1
            if !file.direct { inode.cached -= 1 }
            if file.writable { inode.writers -= 1 }
            let dropped = inode.handles == 0 ? inode.backing : nil
            if dropped != nil { inode.backing = nil }
            entries[file.entry.inode] = inode
            return (file.entry, dropped)
        }
    }

    /// Lets an entry go once no handle holds it (none came back since its last
    /// `close`); true if it went.
    func retire(_ entry: OpenEntry) -> Bool {
        lock.withLock {
            guard let open = entries[entry.inode], open.entry === entry, open.handles == 0 else { return false }
            entries.removeValue(forKey: entry.inode)
            return true
        }
    }

    func openView(_ file: ViewFile) -> UInt64 {
        lock.withLock {
            let handle = newHandle()
            viewFiles[handle] = file
            return handle
        }
    }

    func viewFile(_ handle: UInt64) -> ViewFile? { lock.withLock { viewFiles[handle] } }

    /// Removes a view's handle; false if `handle` is not one.
    func closeView(_ handle: UInt64) -> Bool { lock.withLock { viewFiles.removeValue(forKey: handle) != nil } }

    func openDirectory() -> UInt64 {
        lock.withLock {
            let handle = newHandle()
            directories[handle] = DirectoryCursor()
            return handle
        }
    }

    func cursor(_ handle: UInt64) -> DirectoryCursor? { lock.withLock { directories[handle] } }

    func setCursor(_ handle: UInt64, _ cursor: DirectoryCursor) {
        lock.withLock { if directories[handle] != nil { directories[handle] = cursor } }
    }

    func closeDirectory(_ handle: UInt64) { lock.withLock { _ = directories.removeValue(forKey: handle) } }

    /// Lock held.
    private func newHandle() -> UInt64 {
        defer { next += 1 }
        return next
    }
}
