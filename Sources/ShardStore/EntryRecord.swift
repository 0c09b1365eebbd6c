// The on-disk format of a shard. Four databases in the shard's LMDB environment:
//
//   entries  key -> record: a fixed header, the indexes, then the value inline
//            unless it is chunked (values over `chunkSize` bytes).
//   chunks   chunkSet(u64 BE) chunkNumber(u32 BE) -> up to `chunkSize` bytes.
//            A chunked record names its chunk set, so a large value can be
//            written into a fresh set over several transactions and switched to
//            in one (memory stays bounded), and a rename moves no chunks.
//   staging  chunkSet(u64 BE) -> empty: sets being written; a crash leaves them
//            here and opening the shard removes them.
//   indexes  (DUPSORT) indexKey(name, value) -> entry key. The reverse index.
//   meta     shard descriptor: id, owner, state, size limit, format; the last chunk set ID.
//
// Record layout (little-endian), kept small because it is paid on every entry:
//   0      u8   bits 0–3: format version (1); bit 4: value is chunked; bit 5: has indexes
//   1..8   i64  modification time, nanoseconds since 1970
//   if chunked:      u64 value size, u64 chunk set
//   if has indexes:  u32 length of the index section, then the section:
//                    per index: u8 name length, name, u32 value length, value
//   then the value itself when not chunked (its size is what remains).
// A plain entry thus costs 9 bytes over its value, and its size is known from
// the record's length without reading past the first bytes.

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
}

/// Whether the fixed fields `recordValueSize` reads are within the record: a
/// cheap check for listings, which do not decode the whole record.
@inlinable @inline(__always)
func recordHeadIsSane(_ raw: UnsafeRawBufferPointer) -> Bool {
    guard raw.count >= recordFixedSize, raw[0] & 0x0F == recordFormatVersion else { return false }
    let flags = RecordFlags(rawValue: raw[0] & 0xF0)
    if flags.contains(.chunked) { return raw.count >= recordFixedSize + 16 }
    if flags.contains(.hasIndexes) {
        return raw.count >= recordFixedSize + 4 && Int(raw.loadLE(UInt32.self, at: recordFixedSize)) <= raw.count - recordFixedSize - 4
    }
    return true
}

/// Size of a record's value, from its first bytes and length (for listings).
@inlinable @inline(__always)
func recordValueSize(_ raw: UnsafeRawBufferPointer) -> Int {
    let flags = RecordFlags(rawValue: raw[0] & 0xF0)
    if flags.contains(.chunked) { return Int(raw.loadLE(UInt64.self, at: recordFixedSize)) }
    if flags.contains(.hasIndexes) { return raw.count - recordFixedSize - 4 - Int(raw.loadLE(UInt32.self, at: recordFixedSize)) }
    return raw.count - recordFixedSize
}

@inlinable @inline(__always)
func recordModificationTime(_ raw: UnsafeRawBufferPointer) -> Int64 {
    Int64(bitPattern: raw.loadLE(UInt64.self, at: 1))
}

/// The decoded header and indexes of a record; the inline value stays in the map.
struct RecordView {
    var flags: RecordFlags
    var modificationTime: Int64
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
}

/// Size of the index section for `indexes`.
func encodedIndexSize(_ indexes: [IndexPair]) -> Int {
    indexes.reduce(0) { $0 + 1 + $1.name.utf8.count + 4 + $1.value.count }
}

/// Bytes of a record before its inline value.
func recordHeadSize(chunked: Bool, indexes: [IndexPair]) -> Int {
    recordFixedSize + (chunked ? 16 : 0) + (indexes.isEmpty ? 0 : 4 + encodedIndexSize(indexes))
}

/// Writes a record's head into `out`; returns the offset where the inline value goes.
func encodeRecordHead(into out: UnsafeMutableRawBufferPointer, chunkSet: UInt64?, modificationTime: Int64,
                      size: Int, indexes: [IndexPair]) -> Int {
    let chunked = chunkSet != nil
    var flags: RecordFlags = []
    if chunked { flags.insert(.chunked) }
    if !indexes.isEmpty { flags.insert(.hasIndexes) }
    out[0] = recordFormatVersion | flags.rawValue
    out.storeLE(UInt64(bitPattern: modificationTime), at: 1)
    var offset = recordFixedSize
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
