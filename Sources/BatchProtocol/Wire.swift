import NIOCore

/// Why bytes could not be understood. The status is what the peer is told.
public struct ProtocolError: Error, Hashable, Sendable, CustomStringConvertible {
    public var status: Status
    public init(_ code: StatusCode, _ message: String) { status = Status(code, message) }
    public var description: String { status.description }

    static func malformed(_ what: String) -> ProtocolError { ProtocolError(.invalidRequest, "malformed frame: \(what)") }
}

/// Field readers and writers of the encoding in docs/PROTOCOL.md. Readers throw
/// `invalidRequest` on a short buffer instead of returning nil, so codecs read straight-line.
extension ByteBuffer {
    mutating func readU8(_ field: String) throws -> UInt8 {
        guard let v = readInteger(as: UInt8.self) else { throw ProtocolError.malformed("\(field) is cut short") }
        return v
    }

    mutating func readU16(_ field: String) throws -> UInt16 {
        guard let v = readInteger(endianness: .big, as: UInt16.self) else { throw ProtocolError.malformed("\(field) is cut short") }
        return v
    }

    /// A count that the remaining bytes can hold: a lying count must not make us reserve gigabytes.
    mutating func readCount(minimumItemSize: Int) throws -> Int {
        let n = Int(try readU32("count"))
        guard n <= readableBytes / minimumItemSize else { throw ProtocolError.malformed("count \(n) exceeds the frame") }
        return n
    }

    mutating func readU32(_ field: String) throws -> UInt32 {
        guard let v = readInteger(endianness: .big, as: UInt32.self) else { throw ProtocolError.malformed("\(field) is cut short") }
        return v
    }

    mutating func readU64(_ field: String) throws -> UInt64 {
        guard let v = readInteger(endianness: .big, as: UInt64.self) else { throw ProtocolError.malformed("\(field) is cut short") }
        return v
    }

    mutating func readI64(_ field: String) throws -> Int64 { Int64(bitPattern: try readU64(field)) }

    mutating func readBool(_ field: String) throws -> Bool {
        switch try readU8(field) {
        case 0: return false
        case 1: return true
        default: throw ProtocolError.malformed("\(field) must be 0 or 1")
        }
    }

    mutating func readRaw(_ count: Int, _ field: String) throws -> [UInt8] {
        guard let v = readBytes(length: count) else { throw ProtocolError.malformed("\(field) is cut short") }
        return v
    }

    mutating func readStr(_ field: String) throws -> String {
        let n = Int(try readU16(field))
        guard let s = readString(length: n) else { throw ProtocolError.malformed("\(field) is cut short") }
        return s
    }

    mutating func readKey(_ field: String = "key") throws -> [UInt8] { try readRaw(Int(try readU16(field)), field) }

    mutating func readBlob(_ field: String) throws -> [UInt8] { try readRaw(Int(try readU32(field)), field) }

    mutating func readIndexes() throws -> [IndexField] {
        let n = Int(try readU16("index count"))
        var out: [IndexField] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(IndexField(name: try readStr("index name"), value: try readBlob("index value"))) }
        return out
    }

    mutating func readStatus() throws -> Status {
        Status(StatusCode(rawValue: try readU16("status")), try readStr("status message"))
    }

    mutating func readAfterKey() throws -> [UInt8]? { try readBool("has-after") ? try readKey("after") : nil }

    mutating func writeU16(_ v: UInt16) { writeInteger(v, endianness: .big) }
    mutating func writeU32(_ v: UInt32) { writeInteger(v, endianness: .big) }
    mutating func writeU64(_ v: UInt64) { writeInteger(v, endianness: .big) }
    mutating func writeI64(_ v: Int64) { writeInteger(UInt64(bitPattern: v), endianness: .big) }
    mutating func writeBool(_ v: Bool) { writeInteger(UInt8(v ? 1 : 0)) }

    /// Strings longer than a u16 allows are cut (messages only; names are validated before).
    mutating func writeStr(_ s: String) {
        var utf8 = Array(s.utf8)
        if utf8.count > Int(UInt16.max) { utf8 = Array(utf8.prefix(Int(UInt16.max))) }
        writeU16(UInt16(utf8.count))
        writeBytes(utf8)
    }

    /// At most 65,535 bytes, and the length says how many (longer keys are invalid anyway).
    mutating func writeKey(_ k: [UInt8]) {
        let n = min(k.count, Int(UInt16.max))
        writeU16(UInt16(n))
        writeBytes(k.prefix(n))
    }

    mutating func writeBlob(_ b: [UInt8]) {
        writeU32(UInt32(truncatingIfNeeded: b.count))
        writeBytes(b)
    }

    mutating func writeIndexes(_ indexes: [IndexField]) {
        writeU16(UInt16(min(indexes.count, Int(UInt16.max))))
        for i in indexes.prefix(Int(UInt16.max)) {
            writeStr(i.name)
            writeBlob(i.value)
        }
    }

    mutating func writeStatus(_ s: Status) {
        // Most statuses are a bare OK: code and empty message in one write.
        guard !s.message.isEmpty else { return writeU32(UInt32(s.code.rawValue) << 16) }
        writeU16(s.code.rawValue)
        writeStr(s.message)
    }

    mutating func writeAfterKey(_ k: [UInt8]?) {
        writeBool(k != nil)
        if let k { writeKey(k) }
    }

    /// Writes a frame: reserves the length, lets `body` write type, ID and body, then fills the length in.
    public mutating func writeFrame(type: UInt8, requestID: UInt32, _ body: (inout ByteBuffer) -> Void) {
        let start = writerIndex
        writeU32(0)
        writeInteger(type)
        writeU32(requestID)
        body(&self)
        setInteger(UInt32(writerIndex - start - 4), at: start, endianness: .big)
    }
}

/// Big-endian fields from raw bytes, for hot decoders (items of a BatchPut or a
/// BatchGet, one item frame of a stream); throws like the `ByteBuffer` readers.
struct RawReader {
    let bytes: UnsafeRawBufferPointer
    var offset = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    mutating func take(_ n: Int, _ field: StaticString) throws -> UnsafeRawBufferPointer {
        guard n <= remaining else { throw ProtocolError.malformed("\(field) is cut short") }
        defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + n)])
    }

    mutating func u16(_ field: StaticString) throws -> UInt16 { UInt16(bigEndian: try take(2, field).loadUnaligned(as: UInt16.self)) }
    mutating func u32(_ field: StaticString) throws -> UInt32 { UInt32(bigEndian: try take(4, field).loadUnaligned(as: UInt32.self)) }
    mutating func u64(_ field: StaticString) throws -> UInt64 { UInt64(bigEndian: try take(8, field).loadUnaligned(as: UInt64.self)) }

    mutating func key(_ field: StaticString = "key") throws -> [UInt8] { Array(try take(Int(try u16(field)), field)) }
    mutating func blob(_ field: StaticString) throws -> [UInt8] { Array(try take(Int(try u32(field)), field)) }

    mutating func status() throws -> Status {
        let code = StatusCode(rawValue: try u16("status"))
        let length = Int(try u16("status message"))
        return length == 0 ? Status(code) : Status(code, String(decoding: try take(length, "status message"), as: UTF8.self))
    }

    mutating func indexes() throws -> [IndexField] {
        let count = Int(try u16("index count"))
        guard count > 0 else { return [] }
        var out: [IndexField] = []
        out.reserveCapacity(min(count, remaining / 6))  // each takes at least 6 bytes: a lying count reserves little
        for _ in 0..<count {
            let name = String(decoding: try take(Int(try u16("index name")), "index name"), as: UTF8.self)
            out.append(IndexField(name: name, value: try blob("index value")))
        }
        return out
    }
}

extension ByteBuffer {
    /// Runs `body` over the readable bytes and moves past what it read.
    mutating func readRaw<T>(_ body: (inout RawReader) throws -> T) rethrows -> T {
        let (value, used) = try withUnsafeReadableBytes { bytes in
            var reader = RawReader(bytes)
            let value = try body(&reader)
            return (value, reader.offset)
        }
        moveReaderIndex(forwardBy: used)
        return value
    }
}

/// Big-endian fields into raw bytes, for hot encoders (the items of a BatchPut or
/// a BatchGet); writes what the `ByteBuffer` writers write. `size` functions say
/// how many bytes each write takes, so a frame is sized once.
struct RawWriter {
    var at: UnsafeMutableRawPointer

    mutating func u16(_ v: UInt16) { put(v) }
    mutating func u32(_ v: UInt32) { put(v) }

    private mutating func put<T: FixedWidthInteger>(_ v: T) {
        at.storeBytes(of: v.bigEndian, as: T.self)
        at += MemoryLayout<T>.size
    }

    mutating func bytes(_ b: UnsafeRawBufferPointer) {
        if let base = b.baseAddress { at.copyMemory(from: base, byteCount: b.count) }
        at += b.count
    }

    /// A u16 length and at most 65,535 bytes (keys; names).
    mutating func short(_ b: UnsafeRawBufferPointer) {
        let n = min(b.count, Int(UInt16.max))
        u16(UInt16(n))
        bytes(UnsafeRawBufferPointer(rebasing: b[0..<n]))
    }

    mutating func key(_ k: [UInt8]) { k.withUnsafeBytes { short($0) } }

    mutating func blob(_ b: [UInt8]) {
        u32(UInt32(truncatingIfNeeded: b.count))
        b.withUnsafeBytes { bytes($0) }
    }

    mutating func indexes(_ indexes: [IndexField]) {
        let n = min(indexes.count, Int(UInt16.max))
        u16(UInt16(n))
        for index in indexes.prefix(n) {
            var name = index.name
            name.withUTF8 { short(UnsafeRawBufferPointer($0)) }
            blob(index.value)
        }
    }

    static func keySize(_ k: [UInt8]) -> Int { 2 + min(k.count, Int(UInt16.max)) }

    static func indexesSize(_ indexes: [IndexField]) -> Int {
        indexes.prefix(Int(UInt16.max)).reduce(2) { $0 + 2 + min($1.name.utf8.count, Int(UInt16.max)) + 4 + $1.value.count }
    }
}

extension ByteBuffer {
    /// Writes exactly `size` bytes with `body`.
    mutating func writeRaw(size: Int, _ body: (inout RawWriter) -> Void) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: size) { out in
            var writer = RawWriter(at: out.baseAddress!)
            body(&writer)
            precondition(writer.at - out.baseAddress! == size, "RawWriter wrote other than its size")
            return size
        }
    }
}
