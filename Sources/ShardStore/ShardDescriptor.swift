import Foundation
import Glibc
import LMDB

/// fsyncs a directory, making renames and creations in it durable.
public func syncDirectory(_ path: String) throws {
    let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY)
    guard fd >= 0 else { throw ShardError.storage("cannot open \(path): \(String(cString: strerror(errno)))") }
    defer { Glibc.close(fd) }
    guard fsync(fd) == 0 else { throw ShardError.storage("cannot fsync \(path): \(String(cString: strerror(errno)))") }
}

/// The shard's own description, kept in its `meta` database so that a shard's
/// directory describes itself (owner, state, limit) even without metadata.
struct Descriptor {
    var id: UInt64
    var owner: String
    var state: ShardState
    var sizeLimit: Int

    static let formatVersion = "2"
    /// The format of a shard that has held a value file (ValueFiles.swift): set by
    /// the first one, so that a binary that predates value files refuses the shard
    /// ("unknown shard format") instead of reading its records as corrupt and
    /// leaking its files.
    static let valueFilesFormat = "3"
    static let formatKey = Array("format".utf8)

    /// Writes a new shard's descriptor (once, at creation).
    func store(_ txn: Transaction, _ db: Database) throws {
        for (k, v) in [("format", Descriptor.formatVersion), ("id", String(id)), ("owner", owner),
                       ("state", state.rawValue), ("sizeLimit", String(sizeLimit))] {
            try txn.put(db, Array(k.utf8), Array(v.utf8))
        }
    }

    static func load(_ txn: Transaction, _ db: Database, path: String) throws -> Descriptor {
        try load(path: path) { name in try txn.get(db, name) }
    }

    /// Loads the descriptor with `lookup`, which reads one field of the meta database.
    static func load(path: String, _ lookup: ([UInt8]) throws -> UnsafeRawBufferPointer?) throws -> Descriptor {
        func field(_ name: String) throws -> String {
            guard let raw = try lookup(Array(name.utf8)) else {
                throw ShardError.notAShard("\(path) has no \(name) in its shard descriptor")
            }
            return String(decoding: raw, as: UTF8.self)
        }
        guard [formatVersion, valueFilesFormat].contains(try field("format")) else {
            throw ShardError.corrupt("unknown shard format at \(path)")
        }
        guard let id = UInt64(try field("id")), let limit = Int(try field("sizeLimit")),
              let state = ShardState(rawValue: try field("state")) else {
            throw ShardError.corrupt("unreadable shard descriptor at \(path)")
        }
        return Descriptor(id: id, owner: try field("owner"), state: state, sizeLimit: limit)
    }
}

/// A shard's directory name, `shard-<ID>`, on its volume and in the mount: the
/// ID in canonical decimal (no sign, no leading zero), above 0. The one place
/// that writes and reads it.
public enum ShardDirectoryName {
    static let prefix = Array("shard-".utf8)

    public static func of(_ id: UInt64) -> String { "shard-\(id)" }

    /// The ID a name stands for, or nil if it is not exactly such a name.
    public static func id<Name: Collection>(_ name: Name) -> UInt64? where Name.Element == UInt8 {
        guard name.count > prefix.count, name.starts(with: prefix) else { return nil }
        let digits = name.dropFirst(prefix.count)
        guard digits.first != 0x30, digits.count <= 20, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
              let id = UInt64(String(decoding: digits, as: UTF8.self)), id > 0 else { return nil }
        return id
    }
}
