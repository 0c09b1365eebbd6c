import Foundation
import Glibc
import ShardStore

/// The bytes of a file being written, before they are put as the entry's value.
///
/// Small files stay in memory. Past `spillThreshold` the bytes go to a **value
/// file** of the shard (`Shard.beginValueFile`, docs/ARCHITECTURE.md, "Large
/// values: value files"): every write is one `pwrite` into it, at any offset,
/// and the commit at close syncs it and names it in the entry's record — the
/// value is written to disk once and never copied through LMDB. Without a shard
/// to write into (a value kept for an unlinked file's open descriptors), or when
/// the shard refuses a value file (closed, fenced: the commit then reports why),
/// the bytes go to an unlinked temporary file instead (**spilled**). Not
/// thread-safe: the owning `OpenEntry` serialises calls.
final class WriteBuffer {
    static let spillThreshold = 8 << 20

    /// Where the value is.
    private enum Mode {
        /// All of it in `memory`.
        case memory
        /// All of it in a value file of the shard.
        case valueFile(ValueFile)
        /// All of it in an unlinked temporary file.
        case spilled(fd: Int32)
        /// All of it in a committed value file, read-only (an unlinked entry's
        /// value kept for its open descriptors: the file never changes, and an
        /// open descriptor reads it after the shard removes it). A write or a
        /// truncation first copies it to a spill file.
        case committed(fd: Int32)
    }

    private var mode = Mode.memory
    private var memory: [UInt8] = []
    private(set) var size = 0
    private let spillDirectory: String
    /// Where value files are made; nil: spill instead.
    private let shard: Shard?
    private let clientID: String

    init(spillDirectory: String, shard: Shard? = nil, clientID: String = "") {
        self.spillDirectory = spillDirectory
        self.shard = shard
        self.clientID = clientID
    }

    /// A buffer holding the committed value file open as `fd` (`size` bytes),
    /// which it closes.
    init(keeping fd: Int32, size: Int, spillDirectory: String) {
        self.spillDirectory = spillDirectory
        shard = nil
        clientID = ""
        mode = .committed(fd: fd)
        self.size = size
    }

    deinit {
        switch mode {
        case .spilled(let fd), .committed(let fd): close(fd)
        case .memory, .valueFile: break
        }
        discardValueFile()
    }

    /// Whether the value is in a value file (see `commitValueFile`).
    var isInValueFile: Bool { valueFile != nil }

    private var valueFile: ValueFile? {
        if case .valueFile(let file) = mode { return file }
        return nil
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        let end = offset + bytes.count
        if case .memory = mode, end > Self.spillThreshold { try leaveMemory() }
        if case .committed(let fd) = mode { try spillCommitted(fd, keeping: size) }
        switch mode {
        case .valueFile(let file):
            try file.write(bytes, at: offset)
        case .spilled(let fd):
            try Self.pwriteAll(fd, bytes, at: offset)
        case .committed:
            preconditionFailure("a committed value file is copied before a write")
        case .memory:
            if offset == memory.count {
                memory.append(contentsOf: bytes)
            } else {
                if memory.count < end { memory.append(contentsOf: repeatElement(0, count: end - memory.count)) }
                memory.withUnsafeMutableBytes { m in
                    UnsafeMutableRawBufferPointer(rebasing: m[offset..<end]).copyMemory(from: bytes)
                }
            }
        }
        size = max(size, end)
    }

    /// Copies `buffer.count` bytes from `offset` into `buffer` (zeros past the end).
    func read(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        let available = max(0, min(buffer.count, size - offset))
        switch mode {
        case .valueFile(let file):
            try file.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<available]))
        case .spilled(let fd), .committed(let fd):
            let failure = preadFully(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<available]), at: offset)
            if failure != 0 { throw FileSystemError(failure == ENODATA ? EIO : failure, "cannot read the \(fileName)") }
        case .memory:
            if available > 0 {
                memory.withUnsafeBytes { m in
                    UnsafeMutableRawBufferPointer(rebasing: buffer[0..<available])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: m[offset..<(offset + available)]))
                }
            }
        }
        if available < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    func truncate(to newSize: Int) throws {
        if case .memory = mode, newSize > Self.spillThreshold { try leaveMemory() }
        if case .committed(let fd) = mode {
            if newSize <= Self.spillThreshold {
                // What is kept of it fits in memory: no spill file.
                var kept = [UInt8](repeating: 0, count: min(size, newSize))
                try kept.withUnsafeMutableBytes { try read(at: 0, into: $0) }
                close(fd)
                mode = .memory
                memory = kept
                size = kept.count
            } else {
                try spillCommitted(fd, keeping: newSize)
            }
        }
        switch mode {
        case .valueFile(let file):
            try file.truncate(to: newSize)
        case .spilled(let fd):
            guard ftruncate(fd, off_t(newSize)) == 0 else { throw FileSystemError(errno, "cannot truncate the spill file") }
        case .committed:
            preconditionFailure("a committed value file is copied before a truncation")
        case .memory:
            if newSize < memory.count {
                memory.removeSubrange(newSize...)
            } else {
                memory.append(contentsOf: repeatElement(0, count: newSize - memory.count))
            }
        }
        size = newSize
    }

    /// Makes the value file `key`'s value (synced, then named in one durable
    /// commit). Afterwards the buffer is spent: the caller drops it. On failure
    /// the buffer is unchanged (a later call may retry).
    func commitValueFile(_ key: EntryKey, modificationTime: Int64?, indexes: [IndexPair]?, entryNumber: UInt64,
                         creationMode: UInt32?) throws {
        guard let file = valueFile else { return }
        try file.commit(as: key, indexes: indexes, modificationTime: modificationTime, entryNumber: entryNumber,
                        creationMode: creationMode)
        mode = .memory
        size = 0
    }

    /// Removes the value file, if any (an abandoned or orphaned handle). The
    /// buffer is then empty.
    func discardValueFile() {
        guard let file = valueFile else { return }
        mode = .memory
        size = 0
        file.discard()  // what fails to go, the shard's next open removes
    }

    /// Memory → a value file, or a spill file when there is no shard or it refuses one.
    private func leaveMemory() throws {
        if let shard, let file = try? shard.beginValueFile(clientID: clientID) {
            try memory.withUnsafeBytes { try file.write($0, at: 0) }
            mode = .valueFile(file)
            memory = []
        } else {
            try spill()
        }
    }

    // MARK: Spilling

    /// Memory → spilled.
    private func spill() throws {
        let fd = try makeSpillFile()
        do {
            try memory.withUnsafeBytes { try Self.pwriteAll(fd, $0, at: 0) }
        } catch {
            close(fd)
            throw error
        }
        mode = .spilled(fd: fd)
        memory = []
    }

    /// Committed (`fd`) → spilled: the value's first `keeping` bytes copied
    /// (a truncation copies only what it keeps), the committed file let go.
    private func spillCommitted(_ fd: Int32, keeping: Int) throws {
        let spill = try makeSpillFile()
        let end = min(size, keeping)
        do {
            try withUnsafeTemporaryAllocation(byteCount: 1 << 20, alignment: 16) { piece in
                var offset = 0
                while offset < end {
                    let part = UnsafeMutableRawBufferPointer(rebasing: piece[0..<min(piece.count, end - offset)])
                    try read(at: offset, into: part)
                    try Self.pwriteAll(spill, UnsafeRawBufferPointer(part), at: offset)
                    offset += part.count
                }
            }
        } catch {
            close(spill)
            throw error
        }
        close(fd)
        mode = .spilled(fd: spill)
    }

    private var fileName: String {
        if case .committed = mode { return "kept value file" }
        return "spill file"
    }

    private func makeSpillFile() throws -> Int32 {
        var template = Array((spillDirectory + "/.shardfs-spill-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw FileSystemError(errno, "cannot create a spill file in \(spillDirectory)") }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }  // gone when closed, even after a crash
        return fd
    }

    private static func pwriteAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        let failure = pwriteFully(fd, bytes, at: offset)
        if failure != 0 { throw FileSystemError(failure, "cannot write the spill file") }
    }
}
