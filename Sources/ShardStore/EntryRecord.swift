import LMDB
import LMDBSnapshot
// The on-disk format of a shard. Four databases in the shard's LMDB environment:
//
//   entries  key -> record: a fixed header, the indexes, then the value inline
//            unless it is chunked (values over `chunkSize` bytes).
//   chunks   chunkSet(u64 BE) chunkNumber(u32 BE) -> up to `chunkSize` bytes.
//            A chunked record names its chunk set, so a large value can be
//            written into a fresh set over several transactions and switched to
//            in one (memory stays bounded), and a rename moves no chunks.
//   staging  chunkSet(u64 BE) -> what no record uses, to be removed: empty, a
//            chunk set being written; [1], a value file being written; [2], a
//            value file a record stopped using. A crash leaves them here and
//            opening the shard removes them (ValueFiles.swift).
//   indexes  (DUPSORT) indexKey(name, value) -> entry key. The reverse index.
//   meta     shard descriptor: id, owner, state, size limit, format; the last chunk set ID;
//            the bytes in value files.
//
// Values written through the mount past `WriteBuffer.spillThreshold` live in
// files of their own, `values/<number, 16 hex digits>` beside the environment
// (ValueFiles.swift): their record is a chunked one with bit 7 set, whose chunk
// set is the file's number (a binary that predates value files finds no
// chunks and reports the record corrupt rather than reading garbage).
//
// Record layout (little-endian), kept small because it is paid on every entry:
//   0      u8   bits 0–3: format version (1); bit 4: value is chunked; bit 5: has indexes;
//               bit 6: has the metadata extension; bit 7: the value is in a value file
//   1..8   i64  modification time, nanoseconds since 1970
//   if extended:     u8 length of the extension, then the extension (`EntryMetadata`):
//                    u8 fields (bit 1 mode, bit 2 change time, bit 3 access time),
//                    the entry number (LEB128), then u32 mode, i64 change time,
//                    i64 access time, each only if its bit is set
//   if chunked:      u64 value size, u64 chunk set (the value file's number if bit 7)
//   if has indexes:  u32 length of the index section, then the section:
//                    per index: u8 name length, name, u32 value length, value
//   then the value itself when not chunked (its size is what remains).
// An entry written since numbers exist thus costs 12–14 bytes over its value
// (9 before), and its size is known from the record's length and first bytes.

@usableFromInline let recordFormatVersion: UInt8 = 1
@usableFromInline let recordFixedSize = 9
/// Values larger than this are stored as chunks of this size (so large values are
/// read and rewritten piecewise, and a read never copies the whole value).
public let chunkSize = 128 * 1024

@usableFromInline
struct RecordFlags: OptionSet, Sendable {
    @usableFromInline let rawValue: UInt8
    @usableFromInline init(rawValue: UInt8) { self.rawValue = rawValue }
    @usableFromInline static let chunked = RecordFlags(rawValue: 1 << 4)
    @usableFromInline static let hasIndexes = RecordFlags(rawValue: 1 << 5)
    @usableFromInline static let extended = RecordFlags(rawValue: 1 << 6)
    /// Always with `chunked`: the "chunk set" is the number of a value file.
    @usableFromInline static let inFile = RecordFlags(rawValue: 1 << 7)
}

/// What an entry carries beside its value, time and indexes (the record's extension).
public struct EntryMetadata: Sendable, Equatable {
    /// The entry's number in its shard: given when its key is created, kept by
    /// rewrites and renames, never given again (the mount's inode numbers come
    /// from it). 0: written before entries had numbers.
    public var number: UInt64
    /// Permission bits set with chmod; nil: derived from the shard's state.
    public var mode: UInt32?
    /// The last change of the entry's metadata, when later than its modification time.
    public var changeTime: Int64?
    /// The access time, when one was set apart from the modification time.
    public var accessTime: Int64?

    public init(number: UInt64 = 0, mode: UInt32? = nil, changeTime: Int64? = nil, accessTime: Int64? = nil) {
        self.number = number
        self.mode = mode
        self.changeTime = changeTime
        self.accessTime = accessTime
    }

    var isEmpty: Bool { self == EntryMetadata() }

    /// Bytes of the extension after its length byte.
    var encodedSize: Int {
        1 + leb128Size(number) + (mode == nil ? 0 : 4) + (changeTime == nil ? 0 : 8) + (accessTime == nil ? 0 : 8)
    }

    func encode(into out: UnsafeMutableRawBufferPointer, at start: Int) -> Int {
        var offset = start
        out[offset] = UInt8(encodedSize)
        out[offset + 1] = (mode == nil ? 0 : 2) | (changeTime == nil ? 0 : 4) | (accessTime == nil ? 0 : 8)
        offset += 2
        var n = number
        repeat {
            out[offset] = UInt8(n & 0x7F) | (n >= 0x80 ? 0x80 : 0)
            n >>= 7
            offset += 1
        } while n > 0
        if let mode { out.storeLE(mode, at: offset); offset += 4 }
        if let changeTime { out.storeLE(UInt64(bitPattern: changeTime), at: offset); offset += 8 }
        if let accessTime { out.storeLE(UInt64(bitPattern: accessTime), at: offset); offset += 8 }
        return offset
    }

    /// Decodes an extension (the bytes after its length byte); nil if malformed.
    init?(decoding ext: UnsafeRawBufferPointer) {
        guard let first = ext.first else { return nil }
        var offset = 1
        guard let (number, used) = decodeLEB128(ext, at: offset) else { return nil }
        offset += used
        self.init(number: number)
        if first & 2 != 0 {
            guard offset + 4 <= ext.count else { return nil }
            mode = ext.loadLE(UInt32.self, at: offset)
            offset += 4
        }
        if first & 4 != 0 {
            guard offset + 8 <= ext.count else { return nil }
            changeTime = Int64(bitPattern: ext.loadLE(UInt64.self, at: offset))
            offset += 8
        }
        if first & 8 != 0 {
            guard offset + 8 <= ext.count else { return nil }
            accessTime = Int64(bitPattern: ext.loadLE(UInt64.self, at: offset))
            offset += 8
        }
        guard offset == ext.count else { return nil }
    }
}

func leb128Size(_ value: UInt64) -> Int {
    var n = value, size = 1
    while n >= 0x80 { n >>= 7; size += 1 }
    return size
}

/// A LEB128 number at `offset` and the bytes it took; nil if cut short or too long.
@usableFromInline
func decodeLEB128(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> (UInt64, Int)? {
    var value: UInt64 = 0
    var shift: UInt64 = 0
    var at = offset
    while at < bytes.count, shift < 64 {
        let byte = bytes[at]
        value |= UInt64(byte & 0x7F) << shift
        at += 1
        if byte & 0x80 == 0 { return (value, at - offset) }
        shift += 7
    }
    return nil
}

/// The metadata of a record whose head is sane (empty if it has none or it is unreadable).
func recordMetadata(_ raw: UnsafeRawBufferPointer) -> EntryMetadata {
    guard raw[0] & RecordFlags.extended.rawValue != 0 else { return EntryMetadata() }
    let end = recordFixedSize + 1 + Int(raw[recordFixedSize])
    return EntryMetadata(decoding: UnsafeRawBufferPointer(rebasing: raw[(recordFixedSize + 1)..<end])) ?? EntryMetadata()
}

/// Where the fields after the fixed header (and the extension) start.
@inlinable @inline(__always)
func recordBodyStart(_ raw: UnsafeRawBufferPointer) -> Int {
    raw[0] & RecordFlags.extended.rawValue != 0 ? recordFixedSize + 1 + Int(raw[recordFixedSize]) : recordFixedSize
}

/// The entry number of a record (0 when it has none), for listings. The record's head must be sane.
@inlinable @inline(__always)
func recordEntryNumber(_ raw: UnsafeRawBufferPointer) -> UInt64 {
    guard raw[0] & RecordFlags.extended.rawValue != 0 else { return 0 }
    return decodeLEB128(raw, at: recordFixedSize + 2)?.0 ?? 0
}

/// Whether the fixed fields `recordValueSize` reads are within the record: a
/// cheap check for listings, which do not decode the whole record.
@inlinable @inline(__always)
func recordHeadIsSane(_ raw: UnsafeRawBufferPointer) -> Bool {
    guard raw.count >= recordFixedSize, raw[0] & 0x0F == recordFormatVersion else { return false }
    let flags = RecordFlags(rawValue: raw[0] & 0xF0)
    if flags.contains(.extended) {
        guard raw.count > recordFixedSize + 2, raw.count >= recordFixedSize + 1 + Int(raw[recordFixedSize]) else { return false }
    }
    let body = recordBodyStart(raw)
    if flags.contains(.chunked) { return raw.count >= body + 16 }
    if flags.contains(.hasIndexes) {
        return raw.count >= body + 4 && Int(raw.loadLE(UInt32.self, at: body)) <= raw.count - body - 4
    }
    return true
}

/// Size of a record's value, from its first bytes and length (for listings).
@inlinable @inline(__always)
func recordValueSize(_ raw: UnsafeRawBufferPointer) -> Int {
    let flags = RecordFlags(rawValue: raw[0] & 0xF0)
    let body = recordBodyStart(raw)
    if flags.contains(.chunked) { return Int(raw.loadLE(UInt64.self, at: body)) }
    if flags.contains(.hasIndexes) { return raw.count - body - 4 - Int(raw.loadLE(UInt32.self, at: body)) }
    return raw.count - body
}

@inlinable @inline(__always)
func recordModificationTime(_ raw: UnsafeRawBufferPointer) -> Int64 {
    Int64(bitPattern: raw.loadLE(UInt64.self, at: 1))
}

/// The decoded header and indexes of a record; the inline value stays in the map.
struct RecordView {
    var flags: RecordFlags
    var modificationTime: Int64
    var metadata = EntryMetadata()
    var size: Int
    /// Where a chunked value's chunks are (0 when inline).
    var chunkSet: UInt64 = 0
    /// Bytes of the index section.
    var indexBytes: UnsafeRawBufferPointer
    /// The inline value (empty when chunked).
    var inlineValue: UnsafeRawBufferPointer

    init(_ raw: UnsafeRawBufferPointer) throws {
        guard raw.count >= recordFixedSize, raw[0] & 0x0F == recordFormatVersion else {
            throw ShardError.corrupt("entry record of \(raw.count) bytes with an unknown header")
        }
        flags = RecordFlags(rawValue: raw[0] & 0xF0)
        modificationTime = recordModificationTime(raw)
        var offset = recordFixedSize
        if flags.contains(.extended) {
            guard raw.count > offset, raw.count >= offset + 1 + Int(raw[offset]),
                  let metadata = EntryMetadata(decoding: UnsafeRawBufferPointer(rebasing: raw[(offset + 1)..<(offset + 1 + Int(raw[offset]))]))
            else { throw ShardError.corrupt("unreadable record extension") }
            self.metadata = metadata
            offset += 1 + Int(raw[offset])
        }
        var chunkedSize = 0
        if flags.contains(.chunked) {
            guard raw.count >= offset + 16 else { throw ShardError.corrupt("truncated record header") }
            chunkedSize = Int(raw.loadLE(UInt64.self, at: offset))
            chunkSet = raw.loadLE(UInt64.self, at: offset + 8)
            offset += 16
        }
        indexBytes = UnsafeRawBufferPointer(start: nil, count: 0)
        if flags.contains(.hasIndexes) {
            guard raw.count >= offset + 4 else { throw ShardError.corrupt("truncated record header") }
            let length = Int(raw.loadLE(UInt32.self, at: offset))
            offset += 4
            guard raw.count >= offset + length else { throw ShardError.corrupt("truncated index section") }
            indexBytes = UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + length)])
            offset += length
            try Self.checkIndexSection(indexBytes)
        }
        inlineValue = UnsafeRawBufferPointer(rebasing: raw[offset...])
        if flags.contains(.inFile) && !flags.contains(.chunked) {
            throw ShardError.corrupt("a record names a value file but is not chunked")
        }
        if flags.contains(.chunked) {
            guard inlineValue.isEmpty else { throw ShardError.corrupt("a chunked record carries inline bytes") }
            size = chunkedSize
        } else {
            size = inlineValue.count
        }
    }

    private static func checkIndexSection(_ section: UnsafeRawBufferPointer) throws {
        var offset = 0
        while offset < section.count {
            let nameLength = Int(section[offset])
            guard offset + 1 + nameLength + 4 <= section.count else { throw ShardError.corrupt("truncated index name") }
            let valueLength = Int(section.loadLE(UInt32.self, at: offset + 1 + nameLength))
            offset += 1 + nameLength + 4 + valueLength
            guard offset <= section.count else { throw ShardError.corrupt("truncated index value") }
        }
    }

    /// Calls `body` for each (name bytes, value bytes) index.
    func forEachIndex(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Void) rethrows {
        var offset = 0
        while offset < indexBytes.count {
            let nameLength = Int(indexBytes[offset])
            let name = UnsafeRawBufferPointer(rebasing: indexBytes[(offset + 1)..<(offset + 1 + nameLength)])
            let valueLength = Int(indexBytes.loadLE(UInt32.self, at: offset + 1 + nameLength))
            let start = offset + 1 + nameLength + 4
            try body(name, UnsafeRawBufferPointer(rebasing: indexBytes[start..<(start + valueLength)]))
            offset = start + valueLength
        }
    }

    func indexes() -> [IndexPair] {
        var result: [IndexPair] = []
        forEachIndex { name, value in
            result.append(IndexPair(name: String(decoding: name, as: UTF8.self), value: Array(value)))
        }
        return result
    }

    var chunkCount: Int { flags.contains(.chunked) ? (size + chunkSize - 1) / chunkSize : 0 }

    /// The number of the value file that holds the value (nil: inline or chunks).
    var valueFile: UInt64? { flags.contains(.inFile) ? chunkSet : nil }
}

/// Size of the index section for `indexes`.
func encodedIndexSize(_ indexes: [IndexPair]) -> Int {
    indexes.reduce(0) { $0 + 1 + $1.name.utf8.count + 4 + $1.value.count }
}

/// Bytes of a record before its inline value.
func recordHeadSize(chunked: Bool, indexes: [IndexPair], metadata: EntryMetadata) -> Int {
    recordFixedSize + (metadata.isEmpty ? 0 : 1 + metadata.encodedSize) + (chunked ? 16 : 0)
        + (indexes.isEmpty ? 0 : 4 + encodedIndexSize(indexes))
}

/// Writes a record's head into `out`; returns the offset where the inline value goes.
/// `inFile`: `chunkSet` is the number of the value file that holds the value.
func encodeRecordHead(into out: UnsafeMutableRawBufferPointer, chunkSet: UInt64?, inFile: Bool = false, modificationTime: Int64,
                      size: Int, indexes: [IndexPair], metadata: EntryMetadata) -> Int {
    let chunked = chunkSet != nil
    var flags: RecordFlags = []
    if chunked { flags.insert(.chunked) }
    if chunked && inFile { flags.insert(.inFile) }
    if !indexes.isEmpty { flags.insert(.hasIndexes) }
    if !metadata.isEmpty { flags.insert(.extended) }
    out[0] = recordFormatVersion | flags.rawValue
    out.storeLE(UInt64(bitPattern: modificationTime), at: 1)
    var offset = recordFixedSize
    if !metadata.isEmpty { offset = metadata.encode(into: out, at: offset) }
    if let chunkSet {
        out.storeLE(UInt64(size), at: offset)
        out.storeLE(chunkSet, at: offset + 8)
        offset += 16
    }
    if !indexes.isEmpty {
        out.storeLE(UInt32(encodedIndexSize(indexes)), at: offset)
        offset += 4
        for index in indexes {
            let name = Array(index.name.utf8)
            out[offset] = UInt8(name.count)
            offset += 1
            name.withUnsafeBytes { out.baseAddress!.advanced(by: offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            offset += name.count
            out.storeLE(UInt32(index.value.count), at: offset)
            offset += 4
            index.value.withUnsafeBytes { v in
                if let base = v.baseAddress { out.baseAddress!.advanced(by: offset).copyMemory(from: base, byteCount: v.count) }
            }
            offset += index.value.count
        }
    }
    return offset
}

/// Key of chunk `n` of a chunk set: set and number big-endian, so a set's
/// chunks are contiguous and in order.
extension RecordView {
    /// Chunk `n` of this chunked value as read (nil: not found), checked to be
    /// there and of the size the record implies.
    func checkedChunk(_ chunk: UnsafeRawBufferPointer?, _ n: Int, key: [UInt8]) throws -> UnsafeRawBufferPointer {
        guard let chunk else { throw ShardError.corrupt("chunk \(n) of \(EntryKey(trusted: key)) is missing") }
        let expected = min(chunkSize, size - n * chunkSize)
        guard chunk.count == expected else { throw ShardError.corrupt("chunk \(n) has \(chunk.count) bytes, not \(expected)") }
        return chunk
    }

    /// Up to `count` bytes of the value from `offset`; `chunk(n)` gives checked chunk n.
    func slice(offset: Int, count: Int, chunk: (Int) throws -> UnsafeRawBufferPointer) throws -> [UInt8] {
        let end = min(size, offset &+ count)
        guard offset < end else { return [] }
        if !flags.contains(.chunked) { return Array(inlineValue[offset..<end]) }
        var out: [UInt8] = []
        out.reserveCapacity(end - offset)
        var position = offset
        while position < end {
            let n = position / chunkSize
            let piece = try chunk(n)
            let start = position - n * chunkSize
            let stop = min(piece.count, end - n * chunkSize)
            out.append(contentsOf: piece[start..<stop])
            position = n * chunkSize + stop
        }
        return out
    }
}

/// A cursor over the reverse index (a DUPSORT database), as LMDB's and a
/// snapshot's both are.
protocol IndexCursor {
    mutating func seek(exactly key: UnsafeRawBufferPointer) throws -> (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)?
    mutating func seek(key: UnsafeRawBufferPointer, atLeastValue value: UnsafeRawBufferPointer) throws -> (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)?
    mutating func nextDuplicate() throws -> (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)?
}

extension Cursor: IndexCursor {}
extension SnapshotCursor: IndexCursor {}

/// One lookup in the reverse index: the entries whose index `name` has `value`.
struct IndexLookup {
    let name: [UInt8]
    let indexKey: [UInt8]
    /// Long values are stored hashed: each hit must be checked against its record.
    let hashed: Bool

    init(name: String, value: [UInt8]) throws {
        self.name = Array(name.utf8)
        guard !self.name.isEmpty, self.name.count <= IndexPair.maxNameLength else {
            throw ShardError.invalidIndex("an index name is 1–\(IndexPair.maxNameLength) bytes")
        }
        indexKey = self.name.withUnsafeBytes { n in value.withUnsafeBytes { reverseIndexKey(name: n, value: $0) } }
        hashed = reverseIndexKeyIsHashed(value.count)
    }

    /// Keys in key order after `after`, at most `limit`; `matches` checks a hit when hashed.
    func keys<C: IndexCursor>(_ cursor: inout C, after: EntryKey?, limit: Int, matches: ([UInt8]) throws -> Bool) throws -> [EntryKey] {
        var pair = try indexKey.withUnsafeBytes { k -> (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)? in
            guard let after else { return try cursor.seek(exactly: k) }
            var p = try after.bytes.withUnsafeBytes { try cursor.seek(key: k, atLeastValue: $0) }
            if let found = p, found.value.elementsEqual(after.bytes) { p = try cursor.nextDuplicate() }
            return p
        }
        var keys: [EntryKey] = []
        while let p = pair, keys.count < limit {
            let key = Array(p.value)
            if try !hashed || matches(key) { keys.append(EntryKey(trusted: key)) }
            pair = try cursor.nextDuplicate()
        }
        return keys
    }
}

func chunkKey(_ set: UInt64, _ n: Int) -> [UInt8] {
    var k = [UInt8](repeating: 0, count: 12)
    k.withUnsafeMutableBytes {
        $0.storeBytes(of: set.bigEndian, toByteOffset: 0, as: UInt64.self)
        $0.storeBytes(of: UInt32(n).bigEndian, toByteOffset: 8, as: UInt32.self)
    }
    return k
}

func chunkSetKey(_ set: UInt64) -> [UInt8] { withUnsafeBytes(of: set.bigEndian) { Array($0) } }

/// Values up to this length are kept literally in the reverse-index key; longer
/// ones by hash (lookups then check the entry's real value).
let literalIndexValueLimit = 256

/// Key of the reverse index for (name, value).
func reverseIndexKey(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) -> [UInt8] {
    var k: [UInt8] = []
    k.reserveCapacity(2 + name.count + min(value.count, literalIndexValueLimit))
    k.append(UInt8(name.count))
    k.append(contentsOf: name)
    if value.count <= literalIndexValueLimit {
        k.append(0)
        k.append(contentsOf: value)
    } else {
        k.append(1)
        withUnsafeBytes(of: fnv1a64(value).bigEndian) { k.append(contentsOf: $0) }
    }
    return k
}

func reverseIndexKeyIsHashed(_ valueCount: Int) -> Bool { valueCount > literalIndexValueLimit }

func fnv1a64(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in bytes {
        h ^= UInt64(b)
        h = h &* 0x0000_0100_0000_01B3
    }
    return h
}

extension UnsafeRawBufferPointer {
    @inlinable @inline(__always)
    func loadLE<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always)
    func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }
}
