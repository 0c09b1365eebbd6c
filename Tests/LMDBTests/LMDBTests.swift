import LMDB
import TestSupport
import Foundation
import Synchronization
import Testing

@Suite(.onOwnThreads) struct LMDBTests {
    @Test func putGetDeleteAndOrder() throws {
        let dir = try TemporaryDirectory("lmdb")
        let env = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 1 << 20))
        let db = try env.openDatabase("d", flags: .create)
        try env.write { txn in
            for k in ["b", "a", "c"] { try txn.put(db, Array(k.utf8), Array((k + k).utf8)) }
        }
        let (value, keys, count) = try env.read { txn in
            let value = try txn.get(db, Array("a".utf8)).map { Array($0) }
            var keys: [String] = []
            try txn.withCursor(db) { cursor in
                var pair = try cursor.first()
                while let p = pair { keys.append(String(decoding: p.key, as: UTF8.self)); pair = try cursor.next() }
            }
            return (value, keys, try txn.count(db))
        }
        #expect(value == Array("aa".utf8))
        #expect(keys == ["a", "b", "c"])
        #expect(count == 3)
        #expect(try env.write { txn in try txn.delete(db, Array("b".utf8)) })
        #expect(try env.write { txn in try txn.delete(db, Array("b".utf8)) } == false)
    }

    @Test func aThrowingBodyAbortsTheTransaction() throws {
        struct Stop: Error {}
        let dir = try TemporaryDirectory("lmdb")
        let env = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 1 << 20))
        let db = try env.openDatabase("d", flags: .create)
        #expect(throws: Stop.self) {
            try env.write { txn in
                try txn.put(db, [1], [1])
                throw Stop()
            }
        }
        #expect(try env.read { try $0.get(db, [1]) } == nil)
    }

    @Test func mapFullIsReportedAndTheEnvironmentStaysUsable() throws {
        let dir = try TemporaryDirectory("lmdb")
        let env = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 256 << 10))
        let db = try env.openDatabase("d", flags: .create)
        #expect(throws: LMDBError.mapFull) {
            try env.write { txn in try txn.put(db, [1], [UInt8](repeating: 0, count: 512 << 10)) }
        }
        try env.write { txn in try txn.put(db, [2], [2]) }
        #expect(try env.read { try $0.get(db, [2]).map { Array($0) } } == [2])
    }

    @Test func duplicateSortedValuesAndReadOnlyOpen() throws {
        let dir = try TemporaryDirectory("lmdb")
        do {
            let env = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 1 << 20))
            let db = try env.openDatabase("dups", flags: [.create, .duplicateSort])
            try env.write { txn in
                for v in [3, 1, 2] as [UInt8] { try txn.put(db, [9], [v]) }
            }
            let values: [UInt8] = try env.read { txn in
                try txn.withCursor(db) { cursor in
                    var out: [UInt8] = []
                    var pair = try [UInt8(9)].withUnsafeBytes { try cursor.seek(exactly: $0) }
                    while let p = pair { out.append(p.value[0]); pair = try cursor.nextDuplicate() }
                    return out
                }
            }
            #expect(values == [1, 2, 3])
        }
        var options = EnvironmentOptions(mapSize: 1 << 20)
        options.readOnly = true
        let ro = try Environment(path: dir.path, options: options)
        let db = try ro.openDatabase("dups", flags: [.duplicateSort])
        #expect(try ro.read { try $0.count(db) } == 3)
        #expect(throws: LMDBError.self) { try ro.write { txn in try txn.put(db, [1], [1]) } }
        #expect(throws: LMDBError.notFound) { _ = try ro.openDatabase("missing") }
    }

    /// lmdb.h: an environment must not be opened twice in one process (the second
    /// open would take over the lock file's mutexes and its close destroy them).
    /// The second open is refused, by any path to the folder, until the first closes.
    @Test func anEnvironmentOpensOncePerProcess() throws {
        let dir = try TemporaryDirectory("lmdb")
        let link = dir.path + "-link"
        #expect(symlink(dir.path, link) == 0)
        defer { unlink(link) }
        var first: Environment? = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 1 << 20))
        let db = try first!.openDatabase("d", flags: [.create])
        try first!.write { txn in try txn.put(db, [1], [1]) }
        var readOnly = EnvironmentOptions(mapSize: 1 << 20)
        readOnly.readOnly = true
        #expect(throws: LMDBError.alreadyOpen) { _ = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 1 << 20)) }
        #expect(throws: LMDBError.alreadyOpen) { _ = try Environment(path: link, options: readOnly) }
        // The first is unharmed, and once closed the folder opens again.
        try first!.write { txn in try txn.put(db, [2], [2]) }
        first = nil
        let again = try Environment(path: link, options: readOnly)
        let reopened = try again.openDatabase("d")
        #expect(try again.read { try $0.count(reopened) } == 2)
    }

    /// Read transactions are kept reset and renewed (LMDB.swift): a renewed one
    /// reads the newest commit, and a kept one pins no snapshot, so commits reuse
    /// freed pages and the file does not grow with them.
    @Test func keptReadTransactionsReadTheNewestCommitAndPinNothing() throws {
        let dir = try TemporaryDirectory("lmdb")
        let env = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 64 << 20))
        let db = try env.openDatabase("d", flags: .create)
        let key = Array("k".utf8)
        func value() throws -> [UInt8]? { try env.read { try $0.get(db, key).map { Array($0) } } }
        #expect(try value() == nil)
        for round in 0..<2000 {
            try env.write { try $0.put(db, key, [UInt8](repeating: UInt8(truncatingIfNeeded: round), count: 4096)) }
            #expect(try value() == [UInt8](repeating: UInt8(truncatingIfNeeded: round), count: 4096))
        }
        // 2000 commits of a 4 KiB value: a pinned snapshot would keep every old page.
        #expect(env.info.lastPage < 100, "\(env.info.lastPage) pages")
    }

    /// More readers at once than are kept (16 held open together, then reading
    /// on while a writer commits): each reads a whole commit, and the
    /// environment closes with kept transactions (it opens again at once).
    @Test func manyReadersAtOnceAndACloseWithKeptReaders() throws {
        let dir = try TemporaryDirectory("lmdb")
        do {
            let env = try Environment(path: dir.path, options: EnvironmentOptions(mapSize: 64 << 20))
            let db = try env.openDatabase("d", flags: .create)
            let readers = 16
            let torn = Mutex(0)
            let arrived = DispatchSemaphore(value: 0), go = DispatchSemaphore(value: 0), done = DispatchGroup()
            for _ in 0..<readers {
                done.enter()
                Thread {
                    defer { done.leave() }
                    // All in a read transaction at once: more than the 8 kept ones.
                    _ = try? env.read { _ in
                        arrived.signal()
                        go.wait()
                    }
                    for _ in 0..<200 {
                        // Both keys are written in one commit: a read sees them equal.
                        let pair = try? env.read { txn in
                            (try txn.get(db, Array("a".utf8)).map { Array($0) }, try txn.get(db, Array("b".utf8)).map { Array($0) })
                        }
                        if pair == nil || pair!.0 != pair!.1 { torn.withLock { $0 += 1 } }
                    }
                }.start()
            }
            for _ in 0..<readers { arrived.wait() }
            for _ in 0..<readers { go.signal() }
            for round in 0..<300 {
                let v = Array("\(round)".utf8)
                try env.write { txn in
                    try txn.put(db, Array("a".utf8), v)
                    try txn.put(db, Array("b".utf8), v)
                }
            }
            done.wait()
            #expect(torn.withLock { $0 } == 0)
        }  // the last reference goes: kept transactions end, then the environment closes
        let again = try Environment.open(path: dir.path, options: EnvironmentOptions(mapSize: 64 << 20), waitingUpTo: .seconds(5))
        let reopened = try again.openDatabase("d")
        #expect(try again.read { try $0.get(reopened, Array("a".utf8)).map { Array($0) } } == Array("299".utf8))
    }
}
