import Foundation
import Glibc
import ShardStore

/// What the mount holds of an entry while any handle has it open: one per
/// inode, shared by every handle on it, as a page cache is shared by every
/// descriptor of a file. Writes from any handle go into one buffer, so appends
/// from several descriptors and processes interleave whole, and every reader on
/// the mount sees every write at once (docs/SEMANTICS.md, "Visibility").
///
/// The buffer becomes the entry's value when it is committed (`commit`, or
/// `takeSmallValue` for a put whose durability is deferred), which a flush of any of its
/// handles (close), `fsync` and the last release do. Each commit puts the whole
/// buffer as it stands, in one transaction.
final class OpenEntry: @unchecked Sendable {
    let shard: Shard
    /// The kernel's node ID for the entry (its handles are registered under it).
    let inode: UInt64
    let clientID: String
    private let spillDirectory: String

    /// Held across taking the value and putting it (`ShardFileSystem.commit`),
    /// so two handles' commits land in the order they took the value. Taken before `lock`.
    let commitLock = NSLock()
    private let lock = NSLock()
    // Guarded by lock:
    /// The entry this state belongs to; follows renames (`renamed`).
    private var currentKey: EntryKey
    /// The entry was unlinked (or replaced by a rename): nothing is committed.
    private var orphaned = false
    /// The value being built; nil until the first write or truncation.
    private var buffer: WriteBuffer?
    /// The buffer holds changes not committed yet.
    private var dirty = false
    private var modificationTime: Int64?
    /// Indexes set (setxattr) before the entry's first commit, committed with
    /// its value; nil: the commit keeps the indexes the entry has.
    private var indexes: [IndexPair]?
    /// The entry's attributes when it was unlinked while open.
    private var unlinked: EntryAttributes?
    /// The entry's number, mode and access time: those it has in the shard, or
    /// for a new file the number its first commit gives it.
    private var entryMetadata: EntryMetadata

    init(shard: Shard, key: EntryKey, inode: UInt64, metadata: EntryMetadata, clientID: String, spillDirectory: String) {
        self.shard = shard
        self.currentKey = key
        self.inode = inode
        self.entryMetadata = metadata
        self.clientID = clientID
        self.spillDirectory = spillDirectory
    }

    var metadata: EntryMetadata {
        get { lock.withLock { entryMetadata } }
        set { lock.withLock { entryMetadata = newValue } }
    }

    var key: EntryKey { lock.withLock { currentKey } }
    var hasBuffer: Bool { lock.withLock { buffer != nil } }
    var hasChanges: Bool { lock.withLock { dirty } }
    var isOrphaned: Bool { lock.withLock { orphaned } }

    /// Size as the mount's readers see it, while there are uncommitted changes.
    var pendingSize: Int? { lock.withLock { dirty ? buffer?.size : committing?.size } }

    /// A time set (utimens) on the uncommitted changes, if any.
    var pendingModificationTime: Int64? { lock.withLock { dirty ? modificationTime : committing?.time } }

    /// Whether changes not yet taken for a commit are held (not a value being committed).
    var holdsUncommittedValue: Bool { lock.withLock { dirty && buffer != nil } }

    /// A small value taken for its put, until the put returns: the entry still
    /// shows it (a lookup or open by another process must not find the file gone
    /// while the shard takes the put). Guarded by lock.
    private var committing: (size: Int, time: Int64?)?

    /// The indexes that will be committed with the value, if set before its first commit.
    var pendingIndexes: [IndexPair]? { lock.withLock { indexes } }

    /// The new value, its time and indexes, if it changed, lives in memory and
    /// is at most `limit` bytes; the entry then counts as committed (the caller
    /// puts it, and calls `keepUncommitted` if that fails).
    func takeSmallValue(limit: Int) throws -> (value: [UInt8], time: Int64?, indexes: [IndexPair]?)? {
        try lock.withLock {
            if orphaned { dirty = false }
            guard dirty, let buffer, buffer.size <= limit else { return nil }
            var value = [UInt8](repeating: 0, count: buffer.size)
            try value.withUnsafeMutableBytes { try buffer.read(at: 0, into: $0) }
            dirty = false
            committing = (buffer.size, modificationTime)
            defer { indexes = nil }
            return (value, modificationTime, indexes)
        }
    }

    /// The put of a taken small value returned (either way): the shard shows it now, or
    /// `keepUncommitted` made the entry dirty again.
    func finishedCommitting() { lock.withLock { committing = nil } }

    /// A taken small value was not committed after all (the check or the put
    /// failed): the entry holds uncommitted changes again.
    func keepUncommitted(indexes taken: [IndexPair]?) {
        lock.withLock {
            guard !orphaned else { return }
            dirty = true
            if indexes == nil { indexes = taken }
        }
    }

    /// The entry was renamed: later commits go to its new key.
    func renamed(to key: EntryKey) { lock.withLock { currentKey = key } }

    /// The entry was unlinked (or replaced by a rename): drop uncommitted changes.
    func orphan() { lock.withLock { orphaned = true } }

    /// Values up to this size stay readable through open descriptors after an
    /// unlink (copied out of the shard first; past 8 MiB into a temporary file).
    /// A value in a value file stays readable whatever its size: its file is kept open.
    static let keptAfterUnlink = 64 << 20

    /// Before an unlink: keeps the entry's value for its open descriptors and
    /// what fstat shows of it from then on. A value file is kept open (its size
    /// is the file's, which may be a newer value than `attributes` say); when
    /// it cannot be, or the value is not in one, a copy up to 64 MiB.
    /// `undoKeepAfterUnlink` takes it back if the unlink then fails.
    func keepAfterUnlink(_ attributes: EntryAttributes) throws {
        try lock.withLock {
            if buffer == nil {
                if attributes.size > WriteBuffer.spillThreshold, let file = try? shard.valueFile(of: currentKey, opening: true),
                   let fd = file.fd {
                    var st = stat()
                    let size = fstat(fd, &st) == 0 ? Int(st.st_size) : attributes.size
                    buffer = WriteBuffer(keeping: fd, size: size, spillDirectory: spillDirectory)
                    keptForUnlink = true
                } else if attributes.size <= Self.keptAfterUnlink {
                    let kept = WriteBuffer(spillDirectory: spillDirectory)
                    try fill(kept)
                    buffer = kept
                    keptForUnlink = true
                }
            }
            unlinked = attributes
        }
    }

    /// The unlink `keepAfterUnlink` prepared for failed: the entry is still
    /// linked. A kept value not written since goes (reads use the shard again).
    func undoKeepAfterUnlink() {
        lock.withLock {
            if keptForUnlink && !dirty { buffer = nil }
            keptForUnlink = false
            unlinked = nil
        }
    }

    /// The buffer holds only a value kept by `keepAfterUnlink` (guarded by lock).
    private var keptForUnlink = false

    /// What fstat shows of an unlinked file still open (nil while linked).
    var unlinkedView: EntryAttributes? {
        lock.withLock {
            guard var view = unlinked else { return nil }
            if let size = buffer?.size { view.size = size }
            if dirty, let modificationTime { view.modificationTime = modificationTime }
            return view
        }
    }

    /// Writes at `offset`, or at the end with `append` (O_APPEND: where the
    /// value ends now, whatever offset the kernel computed). Returns whether the
    /// bytes landed elsewhere than `offset` (the kernel's cached pages and size
    /// are then wrong and must be dropped).
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int, append: Bool) throws -> Bool {
        try lock.withLock {
            dropStaleBuffer()
            let buffer = try loadedBuffer()
            let position = append ? buffer.size : offset
            try buffer.write(bytes, at: position)
            dirty = true
            modificationTime = nil
            return position != offset
        }
    }

    /// Bytes from the uncommitted value, or from the shard when there is none.
    func read(at offset: Int, count: Int) throws -> [UInt8] {
        try lock.withLock {
            dropStaleBuffer()
            guard let buffer else { return try shard.read(currentKey, offset: offset, count: count) }
            let n = max(0, min(count, buffer.size - offset))
            var out = [UInt8](repeating: 0, count: n)
            try out.withUnsafeMutableBytes { try buffer.read(at: offset, into: $0) }
            return out
        }
    }

    func truncate(to size: Int) throws {
        try lock.withLock {
            dropStaleBuffer()
            if size == 0, buffer == nil {
                buffer = newBuffer()  // no need to load what is cut away
            } else {
                try loadedBuffer().truncate(to: size)
            }
            dirty = true
            modificationTime = nil  // new content: the time of its commit (callers set theirs after)
        }
    }

    func setModificationTime(_ time: Int64) {
        lock.withLock { modificationTime = time }
    }

    /// Changes the indexes that will be committed with the value. Only before
    /// the entry's first commit (`startIfUncommitted`: the entry has no value in
    /// the shard yet); false if the entry's indexes live in the shard instead.
    func changeIndexes(startIfUncommitted: Bool, _ change: ([IndexPair]) throws -> [IndexPair]) throws -> Bool {
        try lock.withLock {
            if indexes == nil {
                guard startIfUncommitted, dirty, !orphaned else { return false }
                indexes = []
            }
            indexes = try change(indexes!)
            return true
        }
    }

    /// Puts the buffered value if it changed. Errors (shard full, closed, fenced)
    /// go back to close()/fsync(); the buffer is kept so a later call may retry.
    func commit() throws {
        try lock.withLock {
            guard dirty, let buffer else { return }
            if orphaned {
                dirty = false
                return
            }
            if buffer.isInValueFile && buffer.size > WriteBuffer.spillThreshold {
                // The value file becomes the entry's value; later writes start from it.
                try buffer.commitValueFile(currentKey, modificationTime: modificationTime, indexes: indexes,
                                           entryNumber: entryMetadata.number, creationMode: entryMetadata.mode)
                self.buffer = nil
            } else {
                try shard.put(currentKey, size: buffer.size, indexes: indexes, clientID: clientID,
                              modificationTime: modificationTime, entryNumber: entryMetadata.number,
                              creationMode: entryMetadata.mode) { offset, out in
                    try buffer.read(at: offset, into: out)
                }
            }
            dirty = false
            indexes = nil
        }
    }

    /// The last handle is gone (or the mount stops): a value file that was not
    /// committed is removed, and uncommitted changes are dropped.
    func abandon() {
        lock.withLock {
            buffer?.discardValueFile()
            buffer = nil
            dirty = false
        }
    }

    /// The entry changed through another path: a committed buffer is stale and
    /// goes the next time the entry is used. Takes only a leaf lock: the commit
    /// hook calls this, and the entry's own lock may be held by a thread waiting
    /// for that very commit.
    func changedElsewhere() { staleLock.withLock { stale = true } }

    private let staleLock = NSLock()
    private var stale = false

    /// Drops a committed buffer made stale by a change elsewhere (lock held).
    private func dropStaleBuffer() {
        guard staleLock.withLock({ defer { stale = false }; return stale }) else { return }
        if !dirty { buffer = nil }  // a value file it held goes with it
    }

    private func newBuffer() -> WriteBuffer {
        WriteBuffer(spillDirectory: spillDirectory, shard: shard, clientID: clientID)
    }

    /// The buffer, filled with the entry's current value the first time (lock held).
    private func loadedBuffer() throws -> WriteBuffer {
        if let buffer { return buffer }
        let fresh = newBuffer()
        try fill(fresh)
        buffer = fresh
        return fresh
    }

    /// Copies the entry's committed value into `buffer` (lock held).
    private func fill(_ buffer: WriteBuffer) throws {
        guard let attributes = try shard.attributes(currentKey) else { return }
        var offset = 0
        while offset < attributes.size {
            let piece = try shard.read(currentKey, offset: offset, count: chunkSize)
            if piece.isEmpty { break }
            try piece.withUnsafeBytes { try buffer.write($0, at: offset) }
            offset += piece.count
        }
    }
}
