import Foundation
import LMDB
import LMDBSnapshot
import Testing
import TestSupport

/// A seeded generator (SplitMix64): every run of a test sees the same data.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func bytes(_ count: Int) -> [UInt8] { (0 ..< count).map { _ in UInt8.random(in: 0 ... 255, using: &self) } }
}

/// The databases a shard has (Shard.swift), filled with every shape LMDB has:
/// a deep tree, inline values of 0 bytes to ~2 KiB, 128 KiB overflow values,
/// DUPSORT keys with one duplicate, a few (a sub-page) and many (a sub-database),
/// and deletes.
struct Fixture {
    let dir: TemporaryDirectory
    let env: Environment
    let names = ["entries", "chunks", "staging", "indexes", "meta"]
    let dbs: [String: Database]

    init(label: String = "snapshot", in directory: String? = nil) throws {
        dir = try TemporaryDirectory(label)
        let path = directory ?? dir.path
        env = try Environment(path: path, options: EnvironmentOptions(mapSize: 512 << 20))
        var dbs: [String: Database] = [:]
        for name in names {
            dbs[name] = try env.openDatabase(name, flags: name == "indexes" ? [.create, .duplicateSort] : .create)
        }
        self.dbs = dbs
    }

    var dataFile: String { env.path + "/data.mdb" }

    /// Writes the standard contents (several commits, deletes among them).
    func fill(seed: UInt64, entries: Int = 20_000, overflowValues: Int = 24) throws {
        var rng = SeededRandom(seed: seed)
        let e = dbs["entries"]!, c = dbs["chunks"]!, s = dbs["staging"]!, ix = dbs["indexes"]!, m = dbs["meta"]!
        var keys: [[UInt8]] = []
        try env.write { txn in
            for i in 0 ..< entries {
                let key = Array("k\(UInt32.random(in: 0 ... UInt32.max, using: &rng))-\(i)".utf8)
                keys.append(key)
                let size: Int
                switch i % 100 {
                case 0: size = 0
                case 1: size = 2_000 + Int.random(in: 0 ..< 100, using: &rng)
                default: size = Int.random(in: 1 ..< 120, using: &rng)
                }
                try txn.put(e, key, rng.bytes(size))
            }
            for i in 0 ..< overflowValues {  // overflow values: 128 KiB and odd sizes around it
                try txn.put(c, Array("chunk-\(i)".utf8), rng.bytes(128 * 1024 + (i % 3) * 777))
            }
            try txn.put(c, Array("small".utf8), [1, 2, 3])
            try txn.put(s, [0x01], [])
            try txn.put(m, Array("version".utf8), [0, 0, 0, 0, 0, 0, 0, 1])
            // indexes: one value, a few (sub-page), many (sub-database). (LMDB refuses empty duplicates.)
            for k in 0 ..< 300 {
                let key = Array("topic\u{0}\(k)".utf8)
                let count = k % 10 == 0 ? 1 : (k % 50 == 7 ? 1_500 : Int.random(in: 2 ... 12, using: &rng))
                for _ in 0 ..< count {
                    try txn.put(ix, key, rng.bytes(Int.random(in: 1 ... 40, using: &rng)))
                }
            }
        }
        try env.write { txn in  // deletes and rewrites
            for (i, key) in keys.enumerated() where i % 7 == 3 { try txn.delete(e, key) }
            for (i, key) in keys.enumerated() where i % 11 == 5 { try txn.put(e, key, rng.bytes(i % 300)) }
            try txn.delete(c, Array("chunk-5".utf8))
            try txn.put(c, Array("chunk-6".utf8), rng.bytes(10))  // overflow to inline
            try txn.put(c, Array("small".utf8), rng.bytes(128 * 1024))  // inline to overflow
            // Thin out a sub-database: every third duplicate of a key with many.
            let many = Array("topic\u{0}57".utf8)
            let dups: [[UInt8]] = try txn.withCursor(ix) { cursor in
                var out: [[UInt8]] = []
                var pair = try many.withUnsafeBytes { try cursor.seek(exactly: $0) }
                while let p = pair { out.append(Array(p.value)); pair = try cursor.nextDuplicate() }
                return out
            }
            #expect(dups.count > 1_000)
            for (i, value) in dups.enumerated() where i % 3 == 0 {
                try many.withUnsafeBytes { k in try value.withUnsafeBytes { v in _ = try txn.delete(ix, k, value: v) } }
            }
            try txn.delete(ix, Array("topic\u{0}20".utf8))
        }
    }

    /// The newest committed root (no writer may run meanwhile).
    func newestRoot() throws -> SnapshotRoot {
        let fd = open(dataFile, O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        return try SnapshotRoot.readMetaPages(fd: fd).max { $0.txnid < $1.txnid }!
    }

    func snapshot(_ root: SnapshotRoot? = nil, cacheBytes: Int = 1 << 20) throws -> Snapshot {
        let root = try root ?? newestRoot()
        return try Snapshot(source: FilePageSource(path: dataFile, pageSize: root.pageSize), root: root, cacheBytes: cacheBytes)
    }
}

typealias Row = (key: [UInt8], value: [UInt8])

/// A pair copied out (LMDB's `Cursor.Pair` and `SnapshotCursor.Pair` are the same tuple type).
func rows(_ pair: (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)?) -> Row? {
    pair.map { (Array($0.key), Array($0.value)) }
}

func same(_ a: Row?, _ b: Row?) -> Bool {
    switch (a, b) {
    case (nil, nil): true
    case let (x?, y?): x.key == y.key && x.value == y.value
    default: false
    }
}

func describe(_ r: Row?) -> String {
    guard let r else { return "nil" }
    return "\(r.key.prefix(24).map { String($0, radix: 16) }.joined(separator: " ")) => \(r.value.count) bytes"
}

/// Every pair of `db` in order, through LMDB.
func scan(_ txn: Transaction, _ db: Database) throws -> [Row] {
    try txn.withCursor(db) { cursor in
        var out: [Row] = []
        var pair = try cursor.first()
        while let p = pair { out.append((Array(p.key), Array(p.value))); pair = try cursor.next() }
        return out
    }
}

/// Every pair of `db` in order, through the snapshot.
func scan(_ txn: SnapshotTransaction, _ db: SnapshotDatabase) throws -> [Row] {
    try txn.withCursor(db) { cursor in
        var out: [Row] = []
        var pair = try cursor.first()
        while let p = pair { out.append((Array(p.key), Array(p.value))); pair = try cursor.next() }
        return out
    }
}

/// Whether every pair of every database, counts and gets agree between LMDB and the snapshot.
func expectSameContents(_ fixture: Fixture, _ snapshot: Snapshot, _ ltxn: Transaction) throws {
    try snapshot.read { stxn in
        for name in fixture.names {
            let ldb = fixture.dbs[name]!, sdb = try snapshot.database(name)
            let expected = try scan(ltxn, ldb), got = try scan(stxn, sdb)
            #expect(got.count == expected.count, "\(name): \(got.count) pairs, LMDB has \(expected.count)")
            #expect(zip(got, expected).allSatisfy { same($0, $1) }, "\(name): pairs differ")
            #expect(try stxn.count(sdb) == ltxn.count(ldb), "\(name): count")
            for row in expected {
                let l = try ltxn.get(ldb, row.key).map(Array.init), s = try stxn.get(sdb, row.key).map(Array.init)
                if l != s { Issue.record("\(name): get differs for \(describe((row.key, [])))"); break }
            }
        }
    }
}
