import Foundation
import Glibc
import ShardStore

/// An open file: the entry it names and, once written, the new value being built.
/// The value is put (committed) by `commit`, which `flush` (close), `fsync` and
/// `release` call; until then other readers see the entry's previous value.
final class OpenFile: @unchecked Sendable {
    let shard: Shard
    /// The entry this handle writes; follows renames (`renamed`), and an unlinked
    /// entry's handle commits nothing (`orphaned`).
    var key: EntryKey { lock.withLock { currentKey } }
    private var currentKey: EntryKey
    private var orphaned = false
    let inode: UInt64
    let writable: Bool
    let clientID: String
    private let spillDirectory: String
    private let lock = NSLock()
    private var buffer: WriteBuffer?
    private var dirty = false
    private var modificationTime: Int64?

    init(shard: Shard, key: EntryKey, inode: UInt64, writable: Bool, truncate: Bool, clientID: String, spillDirectory: String) {
        self.shard = shard
        self.currentKey = key
        self.inode = inode
        self.writable = writable
        self.clientID = clientID
        self.spillDirectory = spillDirectory
        if truncate {
            buffer = newBuffer()
            dirty = true
        }
    }

    var hasBuffer: Bool { lock.withLock { buffer != nil } }
    var hasChanges: Bool { lock.withLock { dirty } }

    /// The new value and its time if it changed, lives in memory and is at most
    /// `limit` bytes; the handle then counts as committed (the caller queues it).
    func takeSmallValue(limit: Int) throws -> ([UInt8], Int64?)? {
        try lock.withLock {
            if orphaned { dirty = false }
            guard dirty, let buffer, buffer.size <= limit else { return nil }
            var value = [UInt8](repeating: 0, count: buffer.size)
            try value.withUnsafeMutableBytes { try buffer.read(at: 0, into: $0) }
            dirty = false
            return (value, modificationTime)
        }
    }

    /// A taken small value was not committed after all (the check or the put
    /// failed): the handle holds unwritten changes again.
    func keepUncommitted() { lock.withLock { if !orphaned { dirty = true } } }

    /// The entry was renamed: later commits go to its new key.
    func renamed(to key: EntryKey) { lock.withLock { currentKey = key } }

    /// The entry was unlinked (or replaced by a rename): drop unwritten changes.
    func orphan() { lock.withLock { orphaned = true } }
    var isOrphaned: Bool { lock.withLock { orphaned } }

    /// Size as this handle sees it, if it holds unwritten changes.
    var pendingSize: Int? { lock.withLock { dirty ? buffer?.size : nil } }

    /// A time set (utimens) on the unwritten changes, if any.
    var pendingModificationTime: Int64? { lock.withLock { dirty ? modificationTime : nil } }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        guard writable else { throw FileSystemError(EBADF, "file not open for writing") }
        try lock.withLock {
            try loadedBuffer().write(bytes, at: offset)
            dirty = true
            modificationTime = nil
        }
    }

    func read(at offset: Int, count: Int) throws -> [UInt8] {
        try lock.withLock {
            guard let buffer else { return try shard.read(currentKey, offset: offset, count: count) }
            let n = max(0, min(count, buffer.size - offset))
            var out = [UInt8](repeating: 0, count: n)
            try out.withUnsafeMutableBytes { try buffer.read(at: offset, into: $0) }
            return out
        }
    }

    func truncate(to size: Int) throws {
        try lock.withLock {
            try loadedBuffer().truncate(to: size)
            dirty = true
        }
    }

    func setModificationTime(_ time: Int64) {
        lock.withLock { modificationTime = time }
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
            if buffer.isStaged {
                // The chunks are in the shard already: write the tail and switch.
                // The set is the entry's value now; later writes start from it.
                try buffer.commitStaged(currentKey, modificationTime: modificationTime)
                self.buffer = nil
                dirty = false
                return
            }
            try shard.put(currentKey, size: buffer.size, indexes: nil, clientID: clientID,
                          modificationTime: modificationTime) { offset, out in
                try buffer.read(at: offset, into: out)
            }
            dirty = false
        }
    }

    /// The handle is done with (released, or unmounting after its commit): a
    /// staged set that was not committed is removed.
    func abandon() {
        lock.withLock {
            buffer?.discardStaging()
            buffer = nil
            dirty = false
        }
    }

    private func newBuffer() -> WriteBuffer {
        WriteBuffer(spillDirectory: spillDirectory, shard: writable ? shard : nil, clientID: clientID)
    }

    /// The buffer, filled with the entry's current value the first time.
    private func loadedBuffer() throws -> WriteBuffer {
        if let buffer { return buffer }
        let fresh = newBuffer()
        if let attributes = try shard.attributes(currentKey) {
            var offset = 0
            while offset < attributes.size {
                let piece = try shard.read(currentKey, offset: offset, count: chunkSize)
                if piece.isEmpty { break }
                try piece.withUnsafeBytes { try fresh.write($0, at: offset) }
                offset += piece.count
            }
        }
        buffer = fresh
        return fresh
    }
}
