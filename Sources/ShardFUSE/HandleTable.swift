import Foundation
import ShardStore

/// One open(2) of an entry: the state it shares with the entry's other handles,
/// and how it was opened.
struct OpenFile {
    let entry: OpenEntry
    let writable: Bool
    /// O_APPEND: every write lands at the end of the value.
    let append: Bool
    /// Written around the page cache (`ShardFileSystem.writesDirectly`).
    let direct: Bool
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
    /// Each inode's open state, its handles, and how many of them go through
    /// the page cache (not `direct`: they may hold cached pages).
    private var entries: [UInt64: (entry: OpenEntry, handles: Int, cached: Int)] = [:]
    private var directories: [UInt64: DirectoryCursor] = [:]
    private var viewFiles: [UInt64: ViewFile] = [:]
    private var next: UInt64 = 1

    /// A new handle on `ino`, sharing the inode's open state, or one `make`
    /// makes when it has none (`shared` false).
    func open(_ ino: UInt64, writable: Bool, append: Bool, direct: Bool, make: () -> OpenEntry)
        -> (handle: UInt64, entry: OpenEntry, shared: Bool) {
        lock.withLock {
            let handle = newHandle()
            let existing = entries[ino]?.entry
            let entry = existing ?? make()
            entries[ino] = (entry, (entries[ino]?.handles ?? 0) + 1, (entries[ino]?.cached ?? 0) + (direct ? 0 : 1))
            files[handle] = OpenFile(entry: entry, writable: writable, append: append, direct: direct)
            return (handle, entry, existing != nil)
        }
    }

    func file(_ handle: UInt64) -> OpenFile? { lock.withLock { files[handle] } }

    /// How many handles on `ino` go through the page cache (may hold its pages).
    func cachedHandleCount(_ ino: UInt64) -> Int { lock.withLock { entries[ino]?.cached ?? 0 } }

    /// The open state of `ino`, if any handle holds it.
    func entry(_ ino: UInt64) -> OpenEntry? { lock.withLock { entries[ino]?.entry } }

    var allEntries: [OpenEntry] { lock.withLock { entries.values.map(\.entry) } }

    /// Removes a handle; its entry stays until `retire` lets it go.
    func close(_ handle: UInt64) -> OpenEntry? {
        lock.withLock {
            guard let file = files.removeValue(forKey: handle) else { return nil }
            entries[file.entry.inode]?.handles -= 1
            if !file.direct { entries[file.entry.inode]?.cached -= 1 }
            return file.entry
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
