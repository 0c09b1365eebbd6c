import Foundation
import Glibc
import ShardStore

/// The bytes of a file being written, before they are put as the entry's value.
///
/// Small files stay in memory. Past `spillThreshold` a file written in order
/// (each write at or after the last whole chunk) is **staged**: its whole 128 KiB
/// chunks go straight into a fresh chunk set of the shard, `stageBytes` per
/// transaction, while the bytes after the last whole chunk stay in memory; the
/// commit at close writes that tail and switches the entry to the set in one
/// transaction (`Shard.commitStaged`). A 1 GiB file is thus written into the
/// shard once, as it arrives, and costs no more memory than a small one. Each
/// staging transaction runs on another thread while the writer's next bytes
/// arrive (one at a time per file: the disk's work overlaps the copying).
/// A write before the staged part (a seek back), or a failed staging
/// transaction, moves the bytes to an unlinked temporary file (**spilled**) and
/// drops the staged set: the value is then put from that file at commit, as
/// before. Not thread-safe: the owning `OpenEntry` serialises calls.
final class WriteBuffer {
    static let spillThreshold = 8 << 20
    /// Whole chunks staged per transaction (the memory a staged file holds).
    static let stageBytes = 16 << 20

    /// Where the value is.
    private enum Mode {
        /// All of it in `memory`.
        case memory
        /// Its first `stagedChunks` whole chunks (and those of the transaction in
        /// flight) in the shard, the bytes from `base` on in `memory`.
        case staged(StagedValue)
        /// All of it in an unlinked temporary file.
        case spilled(fd: Int32)
    }

    private var mode = Mode.memory
    private var memory: [UInt8] = []
    private(set) var size = 0
    private let spillDirectory: String
    /// Where staged chunks go; nil: never staged (spill instead).
    private let shard: Shard?
    private let clientID: String
    /// How many whole chunks of the value are staged (in `.staged`).
    private var stagedChunks = 0
    /// The staging transaction running now: the chunks after `stagedChunks`.
    private var inFlight: StagingTransaction?
    /// The memory of the last staging transaction, for the next tail.
    private var spare: [UInt8] = []
    /// The thread that runs this file's staging transactions. One thread of the
    /// file's own measured faster than Dispatch's pool threads (docs/PERFORMANCE.md).
    private var stager: Stager?
    /// Where `memory` starts in staged mode: after the staged and in-flight chunks.
    private var base: Int { stagedChunks * chunkSize + (inFlight?.count ?? 0) }

    init(spillDirectory: String, shard: Shard? = nil, clientID: String = "") {
        self.spillDirectory = spillDirectory
        self.shard = shard
        self.clientID = clientID
    }

    deinit {
        if let fd = spillFile { close(fd) }
        discardStaging()
    }

    /// Whether the value is being staged into the shard (see `commitStaged`).
    var isStaged: Bool { staged != nil }

    private var staged: StagedValue? {
        if case .staged(let value) = mode { return value }
        return nil
    }

    private var spillFile: Int32? {
        if case .spilled(let fd) = mode { return fd }
        return nil
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        let end = offset + bytes.count
        if isStaged && (offset < base || end - base > 4 * Self.stageBytes) {
            // A seek back into the staged chunks, or a tail that cannot be staged
            // (writes far behind its end): the bytes go to a spill file instead.
            try unstage()
        }
        if case .memory = mode, end > Self.spillThreshold {
            // In order: staged. A write far past the end (a hole of zeros) or
            // before the last whole chunk: spilled, where a hole costs nothing
            // (the file is sparse) instead of memory.
            if shard != nil && offset >= (size / chunkSize) * chunkSize && offset - size <= Self.stageBytes {
                try startStaging()
            } else {
                try spill()
            }
        }
        if let fd = spillFile {
            try Self.pwriteAll(fd, bytes, at: offset)
        } else {
            if isStaged { try stageWholeChunks(before: offset) }
            let local = offset - base
            if local == memory.count {
                memory.append(contentsOf: bytes)
            } else {
                if memory.count < local + bytes.count {
                    memory.append(contentsOf: repeatElement(0, count: local + bytes.count - memory.count))
                }
                memory.withUnsafeMutableBytes { m in
                    UnsafeMutableRawBufferPointer(rebasing: m[local..<(local + bytes.count)]).copyMemory(from: bytes)
                }
            }
        }
        size = max(size, end)
    }

    /// Copies `buffer.count` bytes from `offset` into `buffer` (zeros past the end).
    func read(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        let available = max(0, min(buffer.count, size - offset))
        if let fd = spillFile {
            var done = 0
            while done < available {
                let n = pread(fd, buffer.baseAddress! + done, available - done, off_t(offset + done))
                guard n > 0 else { throw FileSystemError(errno == 0 ? EIO : errno, "cannot read the spill file") }
                done += n
            }
        } else if available > 0 {
            var done = 0
            let committed = stagedChunks * chunkSize
            if let staged, offset < committed {
                done = min(available, committed - offset)
                try staged.read(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<done]))
            }
            if let inFlight, done < available, offset + done < base {
                let from = offset + done - committed, count = min(available - done, base - offset - done)
                inFlight.bytes.withUnsafeBytes { b in
                    UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + count)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: b[from..<(from + count)]))
                }
                done += count
            }
            if done < available {
                let local = offset + done - base
                memory.withUnsafeBytes { m in
                    UnsafeMutableRawBufferPointer(rebasing: buffer[done..<available])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: m[local..<(local + available - done)]))
                }
            }
        }
        if available < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    func truncate(to newSize: Int) throws {
        if isStaged {
            // A failed staging transaction has moved the bytes to a spill file:
            // the truncation applies there (close() reports what does not fit).
            _ = try? settle()
        }
        if isStaged {
            if newSize >= base && newSize - base <= 2 * Self.stageBytes {
                if newSize - base < memory.count {
                    memory.removeSubrange((newSize - base)...)
                } else {
                    memory.append(contentsOf: repeatElement(0, count: newSize - base - memory.count))
                }
                size = newSize
                return
            } else if newSize <= Self.spillThreshold {
                // Back to memory: the first bytes, then the staged set is dropped.
                var head = [UInt8](repeating: 0, count: newSize)
                try head.withUnsafeMutableBytes { try read(at: 0, into: $0) }
                memory = head
                discardStaging()
                size = newSize
                return
            }
            try unstage()
        }
        if let fd = spillFile {
            guard ftruncate(fd, off_t(newSize)) == 0 else { throw FileSystemError(errno, "cannot truncate the spill file") }
        } else if newSize > Self.spillThreshold {
            let fd = try spill()
            guard ftruncate(fd, off_t(newSize)) == 0 else { throw FileSystemError(errno, "cannot truncate the spill file") }
        } else if newSize < memory.count {
            memory.removeSubrange(newSize...)
        } else {
            memory.append(contentsOf: repeatElement(0, count: newSize - memory.count))
        }
        size = newSize
    }

    /// Makes the staged value `key`'s value (the tail and the switch, in one
    /// transaction). Afterwards the buffer is spent: the caller drops it. On
    /// failure the buffer is unchanged (a later call may retry).
    func commitStaged(_ key: EntryKey, modificationTime: Int64?, indexes: [IndexPair]?, entryNumber: UInt64,
                      creationMode: UInt32?) throws {
        try settle()
        guard let staged else { return }
        try memory.withUnsafeBytes { tail in
            try staged.commit(as: key, size: size, firstChunk: stagedChunks, tail: tail, indexes: indexes,
                              modificationTime: modificationTime, entryNumber: entryNumber, creationMode: creationMode)
        }
        mode = .memory
        stagedChunks = 0
        memory = []
        size = 0
        stager?.stop()
        stager = nil
    }

    /// Drops the staged set, if any (an abandoned or orphaned handle). The
    /// buffer then holds only its tail: the caller must not use it further
    /// unless it was emptied first.
    func discardStaging() {
        if let inFlight {
            _ = inFlight.wait()
            self.inFlight = nil
        }
        stager?.stop()
        stager = nil
        guard let staged else { return }
        mode = .memory
        stagedChunks = 0
        staged.discard()  // what fails to go, the shard's next open removes
    }

    // MARK: Staging

    private func startStaging() throws {
        guard let shard else { return }
        do {
            mode = .staged(try shard.beginStaging(clientID: clientID))
        } catch {
            try spill()  // as before: the commit reports what is wrong
            return
        }
        stagedChunks = 0
        memory.reserveCapacity(Self.stageBytes + (2 << 20))
        try stageWholeChunks(before: size, force: true)
    }

    /// Once `stageBytes` are held, starts staging the whole chunks before
    /// `offset` (the next write's start) in one transaction on another thread,
    /// after the one in flight has finished. A failure of that one moves the
    /// bytes to a spill file and drops the set (the shard stays as it was),
    /// then throws: this write fails (`ENOSPC` when the shard is full) and no
    /// earlier write is lost.
    private func stageWholeChunks(before offset: Int, force: Bool = false) throws {
        guard isStaged, force || memory.count >= Self.stageBytes else { return }
        try settle()
        guard let staged else { return }
        let count = (min(memory.count, max(0, offset - base)) / chunkSize) * chunkSize
        guard count > 0 else { return }
        // The tail's memory goes to the transaction; the tail goes on in the spare.
        var next = spare
        spare = []
        next.removeAll(keepingCapacity: true)
        next.reserveCapacity(Self.stageBytes + (2 << 20))
        memory.withUnsafeBytes { next.append(contentsOf: UnsafeRawBufferPointer(rebasing: $0[count...])) }
        memory.removeSubrange(count...)
        let transaction = StagingTransaction(bytes: memory)
        memory = next
        let first = stagedChunks
        inFlight = transaction
        if stager == nil { stager = Stager() }
        stager!.run {
            transaction.finish {
                try transaction.bytes.withUnsafeBytes { try staged.stage($0, firstChunk: first) }
            }
        }
    }

    /// Waits for the staging transaction in flight. If it failed, its bytes
    /// go back in front of the tail, everything moves to a spill file, and its
    /// error is thrown.
    private func settle() throws {
        guard let transaction = inFlight else { return }
        let failure = transaction.wait()
        inFlight = nil
        if let failure {
            memory.insert(contentsOf: transaction.bytes, at: 0)
            try? unstage()
            throw failure
        }
        stagedChunks += transaction.count / chunkSize
        spare = transaction.bytes
    }

    /// Staged → spilled: the staged chunks and the tail go to a spill file, the
    /// set is dropped. On failure the bytes stay staged.
    private func unstage() throws {
        if let transaction = inFlight {
            // Finished or not, its bytes are known: wait, and count them once.
            if transaction.wait() == nil {
                stagedChunks += transaction.count / chunkSize
            } else {
                memory.insert(contentsOf: transaction.bytes, at: 0)
            }
            inFlight = nil
        }
        guard let staged else { return }
        let fd = try makeSpillFile()
        do {
            var piece = [UInt8](repeating: 0, count: 1 << 20)
            var offset = 0
            while offset < base {
                let count = min(piece.count, base - offset)
                try piece.withUnsafeMutableBytes { p in
                    let out = UnsafeMutableRawBufferPointer(rebasing: p[0..<count])
                    try staged.read(offset: offset, into: out)
                    try Self.pwriteAll(fd, UnsafeRawBufferPointer(out), at: offset)
                }
                offset += count
            }
            try memory.withUnsafeBytes { try Self.pwriteAll(fd, $0, at: base) }
        } catch {
            close(fd)
            throw error
        }
        memory = []
        discardStaging()
        mode = .spilled(fd: fd)
    }

    // MARK: Spilling

    /// Memory → spilled; returns the spill file.
    @discardableResult
    private func spill() throws -> Int32 {
        let fd = try makeSpillFile()
        do {
            try memory.withUnsafeBytes { try Self.pwriteAll(fd, $0, at: 0) }
        } catch {
            close(fd)
            throw error
        }
        mode = .spilled(fd: fd)
        memory = []
        return fd
    }

    private func makeSpillFile() throws -> Int32 {
        var template = Array((spillDirectory + "/.shardfs-spill-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw FileSystemError(errno, "cannot create a spill file in \(spillDirectory)") }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }  // gone when closed, even after a crash
        return fd
    }


    private static func pwriteAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            guard n > 0 else { throw FileSystemError(errno == 0 ? EIO : errno, "cannot write the spill file") }
            done += n
        }
    }
}

/// One staging transaction run on another thread: its bytes, then its outcome.
private final class StagingTransaction: @unchecked Sendable {
    let bytes: [UInt8]
    var count: Int { bytes.count }
    private let condition = NSCondition()
    private var finished = false
    private var failure: Error?

    init(bytes: [UInt8]) { self.bytes = bytes }

    func finish(_ body: () throws -> Void) {
        var failure: Error?
        do { try body() } catch { failure = error }
        condition.withLock {
            self.failure = failure
            finished = true
            condition.broadcast()
        }
    }

    /// Waits until it has run; its error, if it failed.
    func wait() -> Error? {
        condition.withLock {
            while !finished { condition.wait() }
            return failure
        }
    }
}

/// A thread that runs one piece of work at a time (see `WriteBuffer.stager`).
private final class Stager: @unchecked Sendable {
    private let condition = NSCondition()
    private var work: (() -> Void)?
    private var stopping = false

    init() {
        let thread = Thread { [self] in  // keeps the stager until `stop`
            // Named from inside: set before `start()`, the name does not reach Linux (15 bytes at most).
            Thread.current.name = "shardfs-staging"
            loop()
        }
        thread.start()
    }

    /// Runs `body` on the thread; the caller waits for the previous one first.
    func run(_ body: @escaping () -> Void) {
        condition.withLock {
            work = body
            condition.broadcast()
        }
    }

    /// Ends the thread once its work is done.
    func stop() {
        condition.withLock {
            stopping = true
            condition.broadcast()
        }
    }

    private func loop() {
        while true {
            let body = condition.withLock { () -> (() -> Void)? in
                while work == nil && !stopping { condition.wait() }
                defer { work = nil }
                return work
            }
            guard let body else { return }
            body()
        }
    }
}
