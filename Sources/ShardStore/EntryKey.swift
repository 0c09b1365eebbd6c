import Foundation
/// The key of an entry: a byte string that is also a valid file name, so every
/// entry can be shown as a file. 1–255 bytes, no `/`, no NUL, not `.` or `..`.
/// The original API's 32-bit entry ID N is the key `String(N)` (decimal, no leading zeros).
public struct EntryKey: Hashable, Comparable, Sendable, CustomStringConvertible {
    public static let maxLength = 255

    public let bytes: [UInt8]

    /// Validates `bytes`; throws `ShardError.invalidKey` with the reason.
    public init(_ bytes: [UInt8]) throws {
        if let problem = EntryKey.problem(with: bytes) { throw ShardError.invalidKey(problem) }
        self.bytes = bytes
    }

    public init(_ string: String) throws { try self.init(Array(string.utf8)) }

    /// The key of the original API's entry ID.
    public init(entryID: UInt32) {
        self.bytes = Array(String(entryID).utf8)
    }

    /// A key read back from a shard (validated when it was written): no check.
    public init(trusted bytes: [UInt8]) { self.bytes = bytes }

    /// Why `bytes` is not a valid key, or nil if it is.
    public static func problem<C: Collection>(with bytes: C) -> String? where C.Element == UInt8 {
        if bytes.isEmpty { return "a key must not be empty" }
        if bytes.count > maxLength { return "a key is at most \(maxLength) bytes (this one has \(bytes.count))" }
        for b in bytes where b == 0x2F || b == 0 {
            return b == 0 ? "a key must not contain NUL" : "a key must not contain '/'"
        }
        if bytes.count <= 2 && bytes.allSatisfy({ $0 == 0x2E }) { return "'.' and '..' are not keys" }
        return nil
    }

    /// The entry ID this key names, if it is one (decimal, no leading zeros, fits 32 bits).
    public var entryID: UInt32? {
        guard bytes.count <= 10, bytes.first != 0x30 || bytes.count == 1 else { return nil }
        var n: UInt64 = 0
        for b in bytes {
            guard b >= 0x30 && b <= 0x39 else { return nil }
            n = n * 10 + UInt64(b - 0x30)
        }
        return n <= UInt64(UInt32.max) ? UInt32(n) : nil
    }

    /// The key as text (invalid UTF-8 is shown with replacement characters).
    public var description: String { String(decoding: bytes, as: UTF8.self) }

    public static func < (a: EntryKey, b: EntryKey) -> Bool {
        // LMDB's default order: memcmp, then length.
        a.bytes.lexicographicallyPrecedes(b.bytes)
    }
}

/// An index of an entry: a (name, value) pair. Entries can be found by it.
public struct IndexPair: Hashable, Sendable {
    public static let maxNameLength = 200
    public static let maxValueLength = 65_536

    public var name: String
    public var value: [UInt8]

    public init(name: String, value: [UInt8]) {
        self.name = name
        self.value = value
    }

    public init(name: String, value: String) { self.init(name: name, value: Array(value.utf8)) }

    public static func validate(_ indexes: [IndexPair]) throws {
        var seen = Set<String>()
        for index in indexes {
            let n = index.name.utf8.count
            if n == 0 || n > maxNameLength {
                throw ShardError.invalidIndex("an index name is 1–\(maxNameLength) bytes (\"\(index.name)\" has \(n))")
            }
            if index.name.utf8.contains(0) { throw ShardError.invalidIndex("an index name must not contain NUL") }
            if index.value.count > maxValueLength {
                throw ShardError.invalidIndex("an index value is at most \(maxValueLength) bytes (\"\(index.name)\" has \(index.value.count))")
            }
            if !seen.insert(index.name).inserted {
                throw ShardError.invalidIndex("index \"\(index.name)\" is given twice")
            }
        }
    }
}

// MARK: Key bytes

/// LMDB's default key order (bytes, then length): negative, zero or positive.
func compareKeys(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int32 {
    let n = a.count == 0 || b.count == 0 ? 0 : memcmp(a.baseAddress!, b.baseAddress!, min(a.count, b.count))
    return n != 0 ? n : Int32(a.count) - Int32(b.count)
}

func compareKeys(_ a: [UInt8], _ b: [UInt8]) -> Int32 {
    a.withUnsafeBytes { a in b.withUnsafeBytes { b in compareKeys(a, b) } }
}

/// A key's first 8 bytes as a big-endian integer (zero-padded): ordering by it
/// agrees with `compareKeys` wherever two prefixes differ.
func keyPrefix(_ key: [UInt8]) -> UInt64 {
    var prefix: UInt64 = 0
    for i in 0..<8 { prefix = prefix << 8 | UInt64(i < key.count ? key[i] : 0) }
    return prefix
}

/// A fast 64-bit hash of a key's bytes (for the pending-key filter, where a
/// collision costs only an unneeded apply).
func keyHash(_ key: [UInt8]) -> UInt64 {
    key.withUnsafeBytes { bytes in
        var h: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(bytes.count)
        var i = 0
        while i + 8 <= bytes.count {
            h = (h ^ bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* 0xFF51_AFD7_ED55_8CCD
            h ^= h >> 32
            i += 8
        }
        while i < bytes.count {
            h = (h ^ UInt64(bytes[i])) &* 0x0100_0000_01B3
            i += 1
        }
        h ^= h >> 33
        h = h &* 0xC4CE_B9FE_1A85_EC53
        return h ^ (h >> 33)
    }
}
