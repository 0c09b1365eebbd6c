import CChecksum
import Foundation
import Glibc

/// A shard's batch log, `<shard>/batch.log`: where a batch put becomes durable
/// before it reaches LMDB.
///
/// A durable LMDB commit rewrites and fsyncs every B-tree page the batch touches:
/// about one page per entry for random keys. Appending the batch here and
/// fsyncing once costs one sequential write instead, and the shard then applies
/// logged batches to LMDB in large transactions, where many entries share a page.
/// `Shard` owns the rules (which batches are logged, when they are applied, how
/// reads wait for them); this file owns the format.
///
/// Format: records, one per logged batch, each
///
///     u32 payload length | u32 CRC-32C of (sequence, payload) | u64 sequence | payload
///
/// (integers little-endian). The payload is a u32 item count, then per item:
///
///     u8 kind (0 put, 1 put keeping the entry's indexes, 2 delete; plus 0x80
///        when an entry number follows: LEB128, the number a put gives the key if
///        it creates it; plus 0x40 when a u32 mode follows, the mode it gives it)
///     u16 key length, key | i64 modification time (ns) | u32 value length, value
///     u16 index count, then per index: u16 name length, name | u32 value length, value
///
/// or, for the mount's chmod, utimens and rename (kinds added 2026-12-07; an
/// older binary reads a record holding one as torn, stops there and empties
/// the log, losing every record after it, so a log left by a crash must be
/// replayed by this version before going back):
///
///     u8 3 (update) | u16 key length, key | u8 fields (1 modification time,
///        2 mode, 4 access time, 8 change time) | the fields set, in that order
///        (i64 times in ns, u32 mode)
///     u8 4 (move) | u16 target key length, target | u16 source key length, source
///
/// Sequences increase by one from record to record. Reading stops at the first
/// record that is short, fails its CRC or breaks the sequence: that is a torn
/// append that was never acknowledged, or the stale tail of an older log that was
/// truncated (see `reset`).
final class BatchLog {
    static let fileName = "batch.log"
    static let recordHeaderSize = 16

    private let fd: Int32
    /// Where the next record goes.
    private(set) var end = 0

    /// Opens (creating) the log in the shard directory and locks it: one writable
    /// instance of a shard at a time, in this process or any other. Waits up to
    /// `lockWait` for an instance being released, then fails.
    init(directory: String, lockWait: Duration = .seconds(2)) throws {
        let path = directory + "/" + Self.fileName
        let existed = access(path, F_OK) == 0
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ShardError.storage("cannot open \(path): \(String(cString: strerror(errno)))") }
        let deadline = ContinuousClock.now + lockWait
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard errno == EWOULDBLOCK || errno == EINTR, ContinuousClock.now < deadline else {
                close(fd)
                throw ShardError.storage("\(directory) is open for writing elsewhere (its batch log is locked)")
            }
            usleep(10_000)
        }
        self.fd = fd
        end = Int(lseek(fd, 0, SEEK_END))
        if !existed {
            do { try syncDirectory(directory) } catch {
                close(fd)
                throw error
            }
        }
    }

    deinit { close(fd) }

    /// The records in the file, in order, up to the first bad one.
    func records() throws -> [(sequence: UInt64, items: [EntryWrite])] {
        let size = Int(lseek(fd, 0, SEEK_END))
        var bytes = [UInt8](repeating: 0, count: size)
        var done = 0
        while done < size {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, size - done, off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw ShardError.storage("cannot read the batch log: \(String(cString: strerror(errno)))") }
            done += n
        }
        var out: [(sequence: UInt64, items: [EntryWrite])] = []
        var at = 0
        while at + Self.recordHeaderSize <= size {
            let length = Int(bytes.readLE(UInt32.self, at: at))
            let crc = bytes.readLE(UInt32.self, at: at + 4)
            guard at + Self.recordHeaderSize + length <= size else { break }
            let checked = bytes.withUnsafeBytes { shardfs_crc32c(0, $0.baseAddress! + at + 8, 8 + length) }
            guard checked == crc else { break }
            let sequence = bytes.readLE(UInt64.self, at: at + 8)
            if let last = out.last, sequence != last.sequence + 1 { break }
            guard let items = Self.decodeItems(bytes, from: at + Self.recordHeaderSize, to: at + Self.recordHeaderSize + length) else { break }
            out.append((sequence, items))
            at += Self.recordHeaderSize + length
        }
        return out
    }

    /// Appends encoded records and, with `sync`, makes them and every record
    /// before them durable (fdatasync); without, they are written only (a
    /// deferred group: the barrier comes later, `sync(failuresSince:)`). A failed
    /// fdatasync, this one or another caller's since this began, fails the append
    /// and marks the log `broken`. On failure the
    /// file is cut back to where it was, durably, so neither a later append nor a
    /// replay after a crash can meet the failed bytes (whose sequences are used
    /// again); if that fails, the log must not be appended to again (the error
    /// says so with `broken`).
    func append(_ records: [UInt8], sync: Bool = true) throws {
        let failuresBefore = syncFailures
        var done = 0
        var failure: Int32 = 0
        var syncFailed = false
        while done < records.count {
            let n = records.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, records.count - done, off_t(end + done)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { failure = n < 0 ? errno : EIO; break }
            done += n
        }
        if failure == 0 && sync {
            if failNextSync || fdatasync(fd) != 0 {
                if failNextSync { (failNextSync, errno) = (false, EIO) }
                failure = errno
                syncFailed = true
                noteSyncFailure()
            } else if syncFailures != failuresBefore {
                // Another fdatasync of this file failed meanwhile, and Linux reports a
                // writeback error once per file: this one's success proves nothing.
                failure = EIO
                syncFailed = true
            }
        }
        guard failure != 0 else {
            end += records.count
            return
        }
        // After a failed fdatasync, records written earlier without one may be lost
        // too (deferred ones): the log is not trusted again (the shard applies what
        // is pending to LMDB instead).
        let broken = ftruncate(fd, off_t(end)) != 0 || fsync(fd) != 0 || syncFailed
        throw BatchLogError(message: "cannot write the batch log: \(String(cString: strerror(failure)))", code: failure, broken: broken)
    }

    /// How many fdatasyncs of this file failed so far (any caller's).
    var syncFailures: Int { failureLock.withLock { failedSyncs } }
    private let failureLock = NSLock()
    private var failedSyncs = 0
    private func noteSyncFailure() { failureLock.withLock { failedSyncs += 1 } }
    /// Tests only: the next fdatasync of an append fails with EIO (a disk that
    /// failed the writeback).
    var failNextSync = false

    /// Makes every record written so far durable (fdatasync), for a caller outside
    /// the log committer: fails if any fdatasync of the file failed since `mark`
    /// (`syncFailures` before the records were written).
    func sync(failuresSince mark: Int) throws {
        if fdatasync(fd) != 0 {
            let code = errno
            noteSyncFailure()
            throw BatchLogError(message: "cannot sync the batch log: \(String(cString: strerror(code)))", code: code, broken: true)
        }
        if syncFailures != mark {
            throw BatchLogError(message: "cannot sync the batch log: an earlier sync of it failed", broken: true)
        }
    }

    /// Empties the log once every record in it is applied and durable in LMDB. Not
    /// synced: if the old records come back after a crash, their sequences are
    /// ones LMDB already has, and new records written over them end the sequence
    /// before any stale tail.
    func reset() throws {
        guard ftruncate(fd, 0) == 0 else {
            let code = errno
            throw BatchLogError(message: "cannot empty the batch log: \(String(cString: strerror(code)))", code: code, broken: true)
        }
        end = 0
    }

    // MARK: Encoding

    /// Appends one record to `out`. The items must be valid (the shard checked
    /// them) and carry their modification time.
    static func encode(sequence: UInt64, items: [EntryWrite], into out: inout [UInt8]) {
        let size = encodedSize(items)
        let start = out.count
        if out.capacity < start + size { out.reserveCapacity(max(start + size, 2 * out.capacity)) }
        out.append(contentsOf: repeatElement(0, count: size))
        out.withUnsafeMutableBytes { whole in
            var w = Writer(base: whole.baseAddress! + start)
            w.put(UInt32(size - recordHeaderSize))
            w.put(UInt32(0))  // CRC, below
            w.put(sequence)
            w.put(UInt32(items.count))
            for item in items {
                if item.isUpdate {
                    encodeUpdate(item, &w)
                    continue
                }
                if let source = item.movedFrom {
                    // A move: kind 4, the target key, the source key.
                    w.put(UInt8(4))
                    w.put(UInt16(item.key.count))
                    w.put(item.key)
                    w.put(UInt16(source.count))
                    w.put(source)
                    continue
                }
                let numbered = !item.isDeletion && item.entryNumber != nil
                let moded = !item.isDeletion && item.creationMode != nil
                w.put(UInt8(item.isDeletion ? 2 : item.keepsIndexes ? 1 : 0) | (numbered ? 0x80 : 0) | (moded ? 0x40 : 0))
                if numbered { w.putLEB128(item.entryNumber!) }
                if moded { w.put(item.creationMode!) }
                w.put(UInt16(item.key.count))
                w.put(item.key)
                w.put(UInt64(bitPattern: item.modificationTime ?? 0))
                w.put(UInt32(item.value.count))
                w.put(item.value)
                let indexes = loggedIndexes(item)
                w.put(UInt16(indexes.count))
                for index in indexes {
                    var name = index.name
                    name.withUTF8 { utf8 in
                        w.put(UInt16(utf8.count))
                        w.put(UnsafeRawBufferPointer(utf8))
                    }
                    w.put(UInt32(index.value.count))
                    w.put(index.value)
                }
            }
            let crc = shardfs_crc32c(0, whole.baseAddress! + start + 8, size - 8)
            whole.storeBytes(of: crc.littleEndian, toByteOffset: start + 4, as: UInt32.self)
        }
    }

    /// An update: kind 3, the key, a byte saying which fields follow (1 the
    /// modification time, 2 the mode, 4 the access time, 8 the change time), them.
    private static func encodeUpdate(_ item: EntryWrite, _ w: inout Writer) {
        let change = item.metadataChange
        w.put(UInt8(3))
        w.put(UInt16(item.key.count))
        w.put(item.key)
        w.put(UInt8((item.modificationTime == nil ? 0 : 1) | (change?.mode == nil ? 0 : 2)
                    | (change?.accessTime == nil ? 0 : 4) | (change?.changeTime == nil ? 0 : 8)))
        if let time = item.modificationTime { w.put(UInt64(bitPattern: time)) }
        if let mode = change?.mode { w.put(mode) }
        if let time = change?.accessTime { w.put(UInt64(bitPattern: time)) }
        if let time = change?.changeTime { w.put(UInt64(bitPattern: time)) }
    }

    private static func updateSize(_ item: EntryWrite) -> Int {
        let change = item.metadataChange
        return 4 + item.key.count + (item.modificationTime == nil ? 0 : 8) + (change?.mode == nil ? 0 : 4)
            + (change?.accessTime == nil ? 0 : 8) + (change?.changeTime == nil ? 0 : 8)
    }

    /// The exact bytes `encode` writes for a batch.
    static func encodedSize(_ items: [EntryWrite]) -> Int {
        items.reduce(recordHeaderSize + 4) { sum, item in
            if item.isUpdate { return sum + updateSize(item) }
            if let source = item.movedFrom { return sum + 5 + item.key.count + source.count }
            return sum + 17 + (!item.isDeletion ? item.entryNumber.map(leb128Size) ?? 0 : 0) + (!item.isDeletion && item.creationMode != nil ? 4 : 0)
                + item.key.count + item.value.count
                + loggedIndexes(item).reduce(0) { $0 + 6 + $1.name.utf8.count + $1.value.count }
        }
    }

    /// A put keeping the entry's indexes, or a delete, logs none.
    private static func loggedIndexes(_ item: EntryWrite) -> [IndexPair] {
        item.keepsIndexes || item.isDeletion ? [] : item.indexes
    }

    /// Writes little-endian integers and bytes at a moving position.
    private struct Writer {
        var base: UnsafeMutableRawPointer

        mutating func put<T: FixedWidthInteger>(_ value: T) {
            base.storeBytes(of: value.littleEndian, as: T.self)
            base += MemoryLayout<T>.size
        }

        mutating func putLEB128(_ value: UInt64) {
            var n = value
            repeat {
                base.storeBytes(of: UInt8(n & 0x7F) | (n >= 0x80 ? 0x80 : 0), as: UInt8.self)
                base += 1
                n >>= 7
            } while n > 0
        }

        mutating func put(_ bytes: [UInt8]) {
            bytes.withUnsafeBytes { put($0) }
        }

        mutating func put(_ bytes: UnsafeRawBufferPointer) {
            if let source = bytes.baseAddress { base.copyMemory(from: source, byteCount: bytes.count) }
            base += bytes.count
        }
    }

    private static func decodeItems(_ bytes: [UInt8], from start: Int, to end: Int) -> [EntryWrite]? {
        var at = start
        func take(_ n: Int) -> Range<Int>? {
            guard n >= 0, at + n <= end else { return nil }
            defer { at += n }
            return at..<(at + n)
        }
        guard let countRange = take(4) else { return nil }
        let count = Int(bytes.readLE(UInt32.self, at: countRange.lowerBound))
        var items: [EntryWrite] = []
        items.reserveCapacity(min(count, (end - start) / 17))
        for _ in 0..<count {
            guard let kindAt = take(1) else { return nil }
            let kind = bytes[kindAt.lowerBound] & 0x3F
            if kind == 3 {
                guard let item = decodeUpdate(bytes, take) else { return nil }
                items.append(item)
                continue
            }
            if kind == 4 {
                guard let targetLength = take(2), let target = take(Int(bytes.readLE(UInt16.self, at: targetLength.lowerBound))),
                      let sourceLength = take(2), let source = take(Int(bytes.readLE(UInt16.self, at: sourceLength.lowerBound)))
                else { return nil }
                items.append(.move(from: Array(bytes[source]), to: Array(bytes[target])))
                continue
            }
            var number: UInt64?
            if bytes[kindAt.lowerBound] & 0x80 != 0 {
                guard let (value, used) = bytes.withUnsafeBytes({ raw in
                    decodeLEB128(UnsafeRawBufferPointer(rebasing: raw[..<end]), at: at)
                }), take(used) != nil else { return nil }
                number = value
            }
            var mode: UInt32?
            if bytes[kindAt.lowerBound] & 0x40 != 0 {
                guard let modeAt = take(4) else { return nil }
                mode = bytes.readLE(UInt32.self, at: modeAt.lowerBound)
            }
            guard kind <= 2, let keyLength = take(2), let key = take(Int(bytes.readLE(UInt16.self, at: keyLength.lowerBound))),
                  let time = take(8), let valueLength = take(4),
                  let value = take(Int(bytes.readLE(UInt32.self, at: valueLength.lowerBound))),
                  let indexCount = take(2) else { return nil }
            var indexes: [IndexPair] = []
            for _ in 0..<Int(bytes.readLE(UInt16.self, at: indexCount.lowerBound)) {
                guard let nameLength = take(2), let name = take(Int(bytes.readLE(UInt16.self, at: nameLength.lowerBound))),
                      let indexValueLength = take(4),
                      let indexValue = take(Int(bytes.readLE(UInt32.self, at: indexValueLength.lowerBound))) else { return nil }
                indexes.append(IndexPair(name: String(decoding: bytes[name], as: UTF8.self), value: Array(bytes[indexValue])))
            }
            var item = EntryWrite(key: Array(bytes[key]), value: Array(bytes[value]), indexes: indexes,
                                  modificationTime: Int64(bitPattern: bytes.readLE(UInt64.self, at: time.lowerBound)),
                                  keepsIndexes: kind == 1)
            item.isDeletion = kind == 2
            item.entryNumber = number
            item.creationMode = mode
            items.append(item)
        }
        return at == end ? items : nil
    }

    private static func decodeUpdate(_ bytes: [UInt8], _ take: (Int) -> Range<Int>?) -> EntryWrite? {
        guard let keyLength = take(2), let key = take(Int(bytes.readLE(UInt16.self, at: keyLength.lowerBound))),
              let fieldsAt = take(1) else { return nil }
        let fields = bytes[fieldsAt.lowerBound]
        guard fields & ~0x0F == 0 else { return nil }
        func time(_ bit: UInt8) -> Int64?? {
            guard fields & bit != 0 else { return .some(nil) }
            guard let at = take(8) else { return nil }
            return Int64(bitPattern: bytes.readLE(UInt64.self, at: at.lowerBound))
        }
        guard let modificationTime = time(1) else { return nil }
        var mode: UInt32?
        if fields & 2 != 0 {
            guard let at = take(4) else { return nil }
            mode = bytes.readLE(UInt32.self, at: at.lowerBound)
        }
        guard let accessTime = time(4), let changeTime = time(8) else { return nil }
        return .update(of: Array(bytes[key]), modificationTime: modificationTime,
                       change: MetadataChange(mode: mode, accessTime: accessTime, changeTime: changeTime))
    }
}

struct BatchLogError: Error, CustomStringConvertible {
    var message: String
    /// The errno of the failed call, when there was one.
    var code: Int32? = nil
    /// The file could not be cut back after a failed append: stop appending to it.
    var broken: Bool
    var description: String { message }
}

extension [UInt8] {
    fileprivate func readLE<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}
