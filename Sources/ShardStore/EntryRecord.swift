// The on-disk format of a shard. Four databases in the shard's LMDB environment:
//
//   entries  key -> record: a fixed header, the indexes, then the value inline
//            unless it is chunked (values over `chunkSize` bytes).
//   chunks   key 0x00 chunkNumber(u32 big-endian) -> up to `chunkSize` bytes.
//            Keys never contain NUL, so one entry's chunks are contiguous and
//            sort right after each other.
//   indexes  (DUPSORT) indexKey(name, value) -> entry key. The reverse index.
//   meta     shard descriptor: id, owner, state, size limit, format.
//
// Record header (little-endian):
//   0      u8   format version (1)
//   1      u8   flags (bit 0: value is chunked)
//   2..9   i64  modification time, nanoseconds since 1970
//   10..17 u64  value size in bytes
//   18..19 u16  number of indexes
//   then per index: u8 name length, name, u32 value length, value
//   then the value itself when not chunked.

let recordFormatVersion: UInt8 = 1
let recordHeaderSize = 20
/// Values larger than this are stored as chunks of this size (so large values are
/// read and rewritten piecewise, and a read never copies the whole value).
public let chunkSize = 128 * 1024

struct RecordFlags: OptionSet {
    let rawValue: UInt8
    static let chunked = RecordFlags(rawValue: 1)
}

/// The decoded header and indexes of a record; the inline value stays in the map.
struct RecordView {
    var flags: RecordFlags
    var modificationTime: Int64
    var size: Int
    var indexCount: Int
    /// Bytes of the index section.
    var indexBytes: UnsafeRawBufferPointer
    /// The inline value (empty when chunked).
    var inlineValue: UnsafeRawBufferPointer

    init(_ raw: UnsafeRawBufferPointer) throws {
        guard raw.count >= recordHeaderSize, raw[0] == recordFormatVersion else {
            throw ShardError.corrupt("entry record of \(raw.count) bytes with an unknown header")
        }
        flags = RecordFlags(rawValue: raw[1])
        modificationTime = Int64(bitPattern: raw.loadLE(UInt64.self, at: 2))
        size = Int(raw.loadLE(UInt64.self, at: 10))
        indexCount = Int(raw.loadLE(UInt16.self, at: 18))
        var offset = recordHeaderSize
        for _ in 0..<indexCount {
            guard offset + 1 <= raw.count else { throw ShardError.corrupt("truncated index section") }
            let nameLength = Int(raw[offset])
            guard offset + 1 + nameLength + 4 <= raw.count else { throw ShardError.corrupt("truncated index name") }
            let valueLength = Int(raw.loadLE(UInt32.self, at: offset + 1 + nameLength))
            offset += 1 + nameLength + 4 + valueLength
            guard offset <= raw.count else { throw ShardError.corrupt("truncated index value") }
        }
        indexBytes = UnsafeRawBufferPointer(rebasing: raw[recordHeaderSize..<offset])
        inlineValue = UnsafeRawBufferPointer(rebasing: raw[offset...])
        if flags.contains(.chunked) ? !inlineValue.isEmpty : inlineValue.count != size {
            throw ShardError.corrupt("value size \(size) does not match the record")
        }
    }

    /// Calls `body` for each (name bytes, value bytes) index.
    func forEachIndex(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Void) rethrows {
        var offset = 0
        for _ in 0..<indexCount {
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
        result.reserveCapacity(indexCount)
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

/// Writes a record header and index section into `out`; returns the offset where the inline value goes.
func encodeRecordHead(into out: UnsafeMutableRawBufferPointer, flags: RecordFlags, modificationTime: Int64,
                      size: Int, indexes: [IndexPair]) -> Int {
    out[0] = recordFormatVersion
    out[1] = flags.rawValue
    out.storeLE(UInt64(bitPattern: modificationTime), at: 2)
    out.storeLE(UInt64(size), at: 10)
    out.storeLE(UInt16(indexes.count), at: 18)
    var offset = recordHeaderSize
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
    return offset
}

/// Key of chunk `n` of entry `key`: key, NUL, n as u32 big-endian (so chunks sort in order).
func chunkKey(_ key: [UInt8], _ n: Int) -> [UInt8] {
    var k = key
    k.reserveCapacity(key.count + 5)
    k.append(0)
    withUnsafeBytes(of: UInt32(n).bigEndian) { k.append(contentsOf: $0) }
    return k
}

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
    @inline(__always)
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
