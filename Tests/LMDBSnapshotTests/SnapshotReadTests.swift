import Foundation
import LMDB
@testable import LMDBSnapshot
import Testing
import TestSupport

/// Runs `body` on a thread of its own and waits for it (LMDB writes while this thread holds a read).
func onThread(_ body: @escaping @Sendable () throws -> Void) throws {
    nonisolated(unsafe) var failure: Error?
    let done = DispatchSemaphore(value: 0)
    Thread {
        do { try body() } catch { failure = error }
        done.signal()
    }.start()
    done.wait()
    if let failure { throw failure }
}

@Suite(.onOwnThreads) struct SnapshotReadTests {
    @Test func metaPagesGiveTheCommittedRoots() throws {
        let f = try Fixture()
        try f.fill(seed: 1, entries: 500)
        let fd = open(f.dataFile, O_RDONLY)
        defer { close(fd) }
        let roots = try SnapshotRoot.readMetaPages(fd: fd)
        #expect(roots.count == 2)
        #expect(Set(roots.map(\.txnid)).count == 2)
        #expect(abs(Int(roots[0].txnid) - Int(roots[1].txnid)) == 1, "the two meta pages hold consecutive commits")
        let newest = roots.max { $0.txnid < $1.txnid }!
        #expect(newest.pageSize == f.env.pageSize)
        #expect(newest.lastPage == UInt64(f.env.info.lastPage))
        #expect(newest.mapSize == UInt64(f.env.info.mapSize))
        #expect(newest.main.entries == UInt64(f.names.count), "the main database holds the named databases' records")
        #expect(try SnapshotRoot.meta(of: newest.txnid, fd: fd) == newest)
        #expect(try FilePageSource(path: f.dataFile).pageSize == newest.pageSize)
        #expect(throws: SnapshotError.noSuchMeta(txnid: 999_999, found: roots.map(\.txnid))) {
            try SnapshotRoot.meta(of: 999_999, fd: fd)
        }
        // Published as JSON and read back on a backup.
        let decoded = try JSONDecoder().decode(SnapshotRoot.self, from: JSONEncoder().encode(newest))
        #expect(decoded == newest)
        // A fresh environment's main database is empty: its root is P_INVALID.
        let dir = try TemporaryDirectory("snapshot-empty")
        let empty = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 1 << 20))
        try empty.write { _ in }
        let efd = open(dir.path + "/data.mdb", O_RDONLY)
        defer { close(efd) }
        let eroot = try SnapshotRoot.readMetaPages(fd: efd).max { $0.txnid < $1.txnid }!
        #expect(eroot.main.isEmpty)
        #expect(try JSONDecoder().decode(SnapshotRoot.self, from: JSONEncoder().encode(eroot)) == eroot)
        let snapshot = try Snapshot(source: FilePageSource(path: dir.path + "/data.mdb", pageSize: eroot.pageSize), root: eroot)
        #expect(try snapshot.read { txn in try txn.withCursor(snapshot.main) { try $0.first() == nil } })
        #expect(throws: SnapshotError.databaseNotFound("entries")) { try snapshot.database("entries") }
    }

    @Test func notAnLMDBFileIsRefused() throws {
        let dir = try TemporaryDirectory("snapshot-notlmdb")
        let path = dir.sub("x")
        try Data(repeating: 7, count: 8192).write(to: URL(fileURLWithPath: path))
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        #expect(throws: SnapshotError.self) { try SnapshotRoot.readMetaPages(fd: fd) }
        let short = open("/dev/null", O_RDONLY)
        defer { close(short) }
        #expect(throws: SnapshotError.self) { try SnapshotRoot.readMetaPages(fd: short) }
    }

    @Test func everyShapeReadsAsLMDBReadsIt() throws {
        let f = try Fixture()
        try f.fill(seed: 42)
        let snapshot = try f.snapshot(cacheBytes: 256 << 10)
        let entries = try snapshot.database("entries")
        #expect(entries.record.depth >= 3, "the tree is deep enough to have inner branch pages")
        #expect(try snapshot.database("chunks").record.overflowPages > 0)
        #expect(try snapshot.database("indexes").isDupSort)
        try f.env.read { ltxn in
            try expectSameContents(f, snapshot, ltxn)
            try expectSameSeeks(f, snapshot, ltxn, seed: 99)
        }
        #expect(snapshot.cacheUsage.bytes <= 256 << 10)
    }

    @Test func duplicatesInSubPagesAndSubDatabasesSeekAsInLMDB() throws {
        let f = try Fixture()
        try f.fill(seed: 5, entries: 200)
        let snapshot = try f.snapshot()
        // Both forms LMDB keeps duplicates in occur: sub-pages and sub-databases (deep enough to branch).
        var single = 0, subpages = 0, subdatabases = 0, deepest: UInt16 = 0
        try snapshot.read { txn in
            try txn.withCursor(try snapshot.database("indexes")) { cursor in
                var ok = try cursor.main.first(txn.state)
                while ok {
                    let node = cursor.main.node
                    switch node.flags {
                    case 0: single += 1
                    case 0x04: subpages += 1
                    case 0x06:
                        subdatabases += 1
                        deepest = max(deepest, DatabaseRecord(node.data, at: 0).depth)
                    default: Issue.record("flags \(node.flags)")
                    }
                    ok = try cursor.main.next(txn.state)
                }
            }
        }
        #expect(single > 0 && subpages > 0 && subdatabases > 0 && deepest >= 2, "\(single) \(subpages) \(subdatabases) \(deepest)")
        try f.env.read { ltxn in try expectSameDuplicateSeeks(f, snapshot, ltxn, seed: 6) }
    }

    /// The design's core: the primary pins transaction T, publishes its root, and
    /// commits on; the backup reads T by that root while the file changes beneath it.
    @Test func aPinnedSnapshotOutlivesFiftyCommits() throws {
        let f = try Fixture()
        try f.fill(seed: 3, entries: 6_000)
        // A few commits before T leave pages on the free list that the commits
        // after T may reuse (pages freed by T itself stay put while T is pinned).
        var rng = SeededRandom(seed: 4)
        let all = try f.env.read { try scan($0, f.dbs["entries"]!) }.map(\.key)
        for _ in 0 ..< 3 {
            try f.env.write { txn in
                for _ in 0 ..< 1_000 { try txn.put(f.dbs["entries"]!, all.randomElement(using: &rng)!, rng.bytes(50)) }
            }
        }
        try f.env.read { pin in
            let root = try f.newestRoot()
            var before: [String: [Row]] = [:]
            for name in f.names { before[name] = try scan(pin, f.dbs[name]!) }
            let env = f.env, e = f.dbs["entries"]!, c = f.dbs["chunks"]!, ix = f.dbs["indexes"]!
            let keys = before["entries"]!.map(\.key)
            let fileBefore = try Data(contentsOf: URL(fileURLWithPath: f.dataFile))
            try onThread {
                var rng = SeededRandom(seed: 11)
                for round in 0 ..< 50 {
                    try env.write { txn in
                        for _ in 0 ..< 300 { try txn.put(e, keys.randomElement(using: &rng)!, rng.bytes(Int.random(in: 0 ..< 200, using: &rng))) }
                        for _ in 0 ..< 60 { try txn.delete(e, keys.randomElement(using: &rng)!) }
                        try txn.put(c, Array("chunk-\(round % 24)".utf8), rng.bytes(100_000 + round))
                        try txn.put(ix, Array("topic\u{0}\(round)".utf8), rng.bytes(16))
                        try txn.delete(ix, Array("topic\u{0}\(round + 100)".utf8))
                    }
                }
            }
            let fd = open(f.dataFile, O_RDONLY)
            defer { close(fd) }
            #expect(try !SnapshotRoot.readMetaPages(fd: fd).contains { $0.txnid == root.txnid }, "T's meta page is overwritten")
            #expect(throws: SnapshotError.self) { try SnapshotRoot.meta(of: root.txnid, fd: fd) }
            // Pages inside T's range that T does not reach were freed and rewritten meanwhile.
            let fileAfter = try Data(contentsOf: URL(fileURLWithPath: f.dataFile))
            let ps = root.pageSize
            let rewritten = (2 ... Int(root.lastPage)).filter { p in
                fileBefore[p * ps ..< (p + 1) * ps] != fileAfter[p * ps ..< (p + 1) * ps]
            }
            #expect(rewritten.count > 10, "\(rewritten.count) pages of T's range were rewritten")
            let snapshot = try f.snapshot(root, cacheBytes: 0)
            try snapshot.read { txn in
                for name in f.names {
                    let got = try scan(txn, try snapshot.database(name))
                    #expect(got.count == before[name]!.count && zip(got, before[name]!).allSatisfy { same($0, $1) },
                            "\(name) reads as it was at transaction \(root.txnid)")
                }
            }
            // And the newest snapshot really differs (the commits landed).
            let now = try f.snapshot()
            let current = try now.read { try scan($0, try now.database("entries")) }
            #expect(current.count != before["entries"]!.count || !zip(current, before["entries"]!).allSatisfy { same($0, $1) })
        }
    }

    @Test func concurrentReadersShareOneSnapshot() throws {
        let f = try Fixture()
        try f.fill(seed: 8, entries: 4_000)
        let snapshot = try f.snapshot(cacheBytes: 64 << 10)  // small: pages come and go under the readers
        let expected = try f.env.read { txn in try f.names.map { try scan(txn, f.dbs[$0]!) } }
        let names = f.names
        let failures = NSLock()
        nonisolated(unsafe) var bad = 0
        DispatchQueue.concurrentPerform(iterations: 4) { i in
            do {
                for round in 0 ..< 3 {
                    for (n, name) in names.enumerated() where (n + i + round) % 2 == 0 || name == "entries" {
                        let got = try snapshot.read { try scan($0, try snapshot.database(name)) }
                        if got.count != expected[n].count || !zip(got, expected[n]).allSatisfy({ same($0, $1) }) {
                            failures.lock(); bad += 1; failures.unlock()
                        }
                    }
                }
            } catch {
                failures.lock(); bad += 1; failures.unlock()
            }
        }
        #expect(bad == 0)
    }

    @Test func handlesAndFlagsAreChecked() throws {
        let f = try Fixture()
        try f.fill(seed: 2, entries: 100)
        // A database with an order this reader does not implement is refused, not misread.
        let integer = try f.env.openDatabase("integer", flags: DatabaseFlags(rawValue: DatabaseFlags.create.rawValue | 0x08))
        try f.env.write { txn in try txn.put(integer, [1, 0, 0, 0], [1]) }
        let snapshot = try f.snapshot()
        #expect(throws: SnapshotError.self) { try snapshot.database("integer") }
        #expect(throws: SnapshotError.databaseNotFound("nope")) { try snapshot.database("nope") }
        // A key of the main database that is not a database record.
        let other = try f.snapshot()
        let entries = try other.database("entries")
        #expect(throws: SnapshotError.self) { try snapshot.read { txn in try txn.count(entries) } }
        #expect(throws: SnapshotError.self) {
            try snapshot.read { txn in try txn.withCursor(try snapshot.database("entries")) { c in
                try [UInt8]([1]).withUnsafeBytes { try c.seek(key: $0, atLeastValue: $0) }
            } }
        }
        #expect(throws: SnapshotError.self) {
            try Snapshot(source: FilePageSource(path: f.dataFile, pageSize: 8192), root: try f.newestRoot())
        }
    }
}

/// Random seeks (at least, exactly, then a few steps on) agree with LMDB's.
func expectSameSeeks(_ f: Fixture, _ snapshot: Snapshot, _ ltxn: Transaction, seed: UInt64) throws {
    var rng = SeededRandom(seed: seed)
    try snapshot.read { stxn in
        for name in f.names {
            let ldb = f.dbs[name]!, sdb = try snapshot.database(name)
            let keys = try scan(ltxn, ldb).map(\.key)
            var mismatches = 0
            for i in 0 ..< 1_500 {
                var probe: [UInt8]
                switch i % 6 {
                case 0 where !keys.isEmpty: probe = keys.randomElement(using: &rng)!
                case 1 where !keys.isEmpty: probe = keys.randomElement(using: &rng)! + [0]
                case 2 where !keys.isEmpty: probe = Array(keys.randomElement(using: &rng)!.dropLast())
                case 3: probe = [UInt8](repeating: 0xFF, count: Int.random(in: 1 ... 8, using: &rng))
                default: probe = rng.bytes(Int.random(in: 1 ... 12, using: &rng))
                }
                if probe.isEmpty { probe = [0] }
                let (l, s) = try probe.withUnsafeBytes { p in
                    try ltxn.withCursor(ldb) { lc in
                        try stxn.withCursor(sdb) { sc in
                            var l = [rows(try lc.seek(atLeast: p))], s = [rows(try sc.seek(atLeast: p))]
                            if l[0] != nil { for _ in 0 ..< 3 { l.append(rows(try lc.next())); s.append(rows(try sc.next())) } }
                            l.append(rows(try lc.seek(exactly: p))); s.append(rows(try sc.seek(exactly: p)))
                            l.append(rows(try ltxn.get(ldb, p).map { (p, $0) })); s.append(rows(try stxn.get(sdb, p).map { (p, $0) }))
                            return (l, s)
                        }
                    }
                }
                if l.count != s.count || !zip(l, s).allSatisfy({ same($0, $1) }) {
                    mismatches += 1
                    if mismatches <= 3 { Issue.record("\(name): probe \(probe) LMDB \(l.map(describe)) snapshot \(s.map(describe))") }
                }
            }
            #expect(mismatches == 0, "\(name)")
            let (ll, sl) = try ltxn.withCursor(ldb) { lc in try stxn.withCursor(sdb) { sc in (rows(try lc.last()), rows(try sc.last())) } }
            #expect(same(ll, sl), "\(name): last")
        }
    }
}

/// For every key of the DUPSORT database (and absent ones): seek(key:atLeastValue:)
/// with many values, then every nextDuplicate to the end and the next key, as LMDB does.
func expectSameDuplicateSeeks(_ f: Fixture, _ snapshot: Snapshot, _ ltxn: Transaction, seed: UInt64) throws {
    var rng = SeededRandom(seed: seed)
    let ldb = f.dbs["indexes"]!
    let all = try scan(ltxn, ldb)
    var byKey: [[UInt8]: [[UInt8]]] = [:]
    for row in all { byKey[row.key, default: []].append(row.value) }
    #expect(byKey.values.contains { $0.count == 1 } && byKey.values.contains { $0.count > 1_000 }
            && byKey.values.contains { (2 ... 20).contains($0.count) })
    try snapshot.read { stxn in
        let sdb = try snapshot.database("indexes")
        var mismatches = 0
        var checked = 0
        let keys = byKey.keys.sorted { $0.lexicographicallyPrecedes($1) } + [Array("absent".utf8), Array("topic\u{0}".utf8)]
        for key in keys {
            let dups = byKey[key] ?? []
            var probes: [[UInt8]] = [[0], [0xFF, 0xFF], rng.bytes(3)]
            for _ in 0 ..< min(6, dups.count) {
                let d = dups.randomElement(using: &rng)!
                probes.append(d)
                probes.append(d + [0])
                if d.count > 1 { probes.append(Array(d.dropLast())) }
            }
            for probe in probes {
                let (l, s): ([Row?], [Row?]) = try key.withUnsafeBytes { k in
                    try probe.withUnsafeBytes { v in
                        try ltxn.withCursor(ldb) { lc in
                            try stxn.withCursor(sdb) { sc in
                                var l = [rows(try lc.seek(key: k, atLeastValue: v))], s = [rows(try sc.seek(key: k, atLeastValue: v))]
                                if l[0] != nil {
                                    while true {
                                        let a = rows(try lc.nextDuplicate()), b = rows(try sc.nextDuplicate())
                                        l.append(a); s.append(b)
                                        if a == nil || b == nil { break }
                                    }
                                    l.append(rows(try lc.next())); s.append(rows(try sc.next()))
                                }
                                l.append(rows(try lc.seek(exactly: k))); s.append(rows(try sc.seek(exactly: k)))
                                if l.last! != nil { l.append(rows(try lc.nextDuplicate())); s.append(rows(try sc.nextDuplicate())) }
                                return (l, s)
                            }
                        }
                    }
                }
                checked += 1
                if l.count != s.count || !zip(l, s).allSatisfy({ same($0, $1) }) {
                    mismatches += 1
                    if mismatches <= 3 { Issue.record("key \(key) value \(probe): LMDB \(l.map(describe)) snapshot \(s.map(describe))") }
                }
            }
        }
        #expect(checked > 1_000)
        #expect(mismatches == 0)
    }
}
