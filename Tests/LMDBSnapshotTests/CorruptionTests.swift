import Foundation
import LMDB
@testable import LMDBSnapshot
import Testing
import TestSupport

/// A copy of a fixture's data file that the tests damage, read through a Snapshot.
final class DamagedCopy {
    let fixture: Fixture
    let path: String
    let root: SnapshotRoot
    let original: [UInt8]
    var pageSize: Int { root.pageSize }

    init(seed: UInt64, entries: Int = 3_000, overflowValues: Int = 24) throws {
        fixture = try Fixture(label: "snapshot-corrupt")
        try fixture.fill(seed: seed, entries: entries, overflowValues: overflowValues)
        root = try fixture.newestRoot()
        path = fixture.dir.sub("copy.mdb")
        original = Array(try Data(contentsOf: URL(fileURLWithPath: fixture.dataFile)))
        restore()
    }

    func restore() { _ = FileManager.default.createFile(atPath: path, contents: Data(original)) }

    /// Puts back the original bytes of `page` only.
    func restore(page: UInt64) throws {
        let start = Int(page) * pageSize
        try patch(page: page, offset: 0, Array(original[start ..< start + pageSize]))
    }

    func patch(page: UInt64, offset: Int, _ bytes: [UInt8]) throws {
        let fd = open(path, O_WRONLY)
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(Int(page) * pageSize + offset)) }
        #expect(n == bytes.count)
    }

    func u16(page: UInt64, _ offset: Int) -> Int { Int(original[Int(page) * pageSize + offset]) | Int(original[Int(page) * pageSize + offset + 1]) << 8 }

    /// Child `i` of the branch page `page` (NODEPGNO of its i-th node).
    func child(of page: UInt64, _ i: Int) -> UInt64 {
        let node = u16(page: page, 16 + 2 * i)
        return UInt64(u16(page: page, node)) | UInt64(u16(page: page, node + 2)) << 16 | UInt64(u16(page: page, node + 4)) << 32
    }

    func record(_ name: String) throws -> DatabaseRecord { try fixture.snapshot(root).database(name).record }

    /// Reads every database whole (scan and gets) from a fresh snapshot of the copy.
    func readAll() throws {
        let snapshot = try Snapshot(source: FilePageSource(path: path, pageSize: pageSize), root: root, cacheBytes: 4 << 20)
        try snapshot.read { txn in
            for name in fixture.names {
                let db = try snapshot.database(name)
                for row in try scan(txn, db) { _ = try txn.get(db, row.key) }
            }
        }
    }
}

/// Whether `body` throws `SnapshotError.corrupt` naming `page`.
func expectCorrupt(page: UInt64, _ comment: Comment, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("no error: \(comment)")
    } catch let SnapshotError.corrupt(p, why) {
        #expect(p == page, "\(comment): names page \(p) (\(why)), not \(page)")
    } catch {
        Issue.record("\(comment): \(error), not corrupt(page: \(page))")
    }
}

@Suite(.onOwnThreads) struct CorruptionTests {
    @Test func theUndamagedCopyReads() throws {
        try DamagedCopy(seed: 20).readAll()
    }

    @Test func aPageWithTheWrongNumber() throws {
        let copy = try DamagedCopy(seed: 21)
        let entries = try copy.record("entries")
        #expect(entries.depth >= 2)
        let leafParent = entries.root
        let victim = copy.child(of: leafParent, 0)
        try copy.patch(page: victim, offset: 0, withUnsafeBytes(of: (victim + 1).littleEndian, Array.init))
        expectCorrupt(page: victim, "pgno of a page below the root") { try copy.readAll() }
    }

    @Test func badLowerAndUpperAndNodeOffsets() throws {
        let copy = try DamagedCopy(seed: 22)
        let root = try copy.record("entries").root
        let leaf = copy.child(of: root, 1)
        let ps = copy.pageSize
        let cases: [(String, UInt64, Int, [UInt8])] = [
            ("upper past the page", leaf, 14, [UInt8(truncatingIfNeeded: ps + 8), UInt8(truncatingIfNeeded: (ps + 8) >> 8)]),
            ("lower past upper", leaf, 12, [0xF0, 0x0F]),
            ("lower inside the header", root, 12, [8, 0]),
            ("a node offset past the page end", leaf, 16, [UInt8(truncatingIfNeeded: ps - 4), UInt8(truncatingIfNeeded: (ps - 4) >> 8)]),
            ("a node offset below upper", leaf, 16, [16, 0]),
        ]
        for (what, page, offset, bytes) in cases {
            copy.restore()
            try copy.patch(page: page, offset: offset, bytes)
            expectCorrupt(page: page, Comment(rawValue: what)) { try copy.readAll() }
        }
        // A node whose key runs past the page: the first node's ksize made huge.
        copy.restore()
        let node = copy.u16(page: leaf, 16)
        try copy.patch(page: leaf, offset: node + 6, [0xFF, 0xFF])
        expectCorrupt(page: leaf, "a key past the page end") { try copy.readAll() }
    }

    @Test func aTreeThatPointsBackUpOrOutOfRange() throws {
        let copy = try DamagedCopy(seed: 23)
        let root = try copy.record("entries").root
        let node = copy.u16(page: root, 16)
        // Child 0 of the root is the root itself: found deeper than the tree's depth allows.
        try copy.patch(page: root, offset: node, [UInt8(root & 0xFF), UInt8(root >> 8 & 0xFF), UInt8(root >> 16 & 0xFF), 0, 0, 0])
        expectCorrupt(page: root, "a cycle") { try copy.readAll() }
        // A child past the last page.
        copy.restore()
        let beyond = copy.root.lastPage + 1
        try copy.patch(page: root, offset: node, [UInt8(beyond & 0xFF), UInt8(beyond >> 8 & 0xFF), UInt8(beyond >> 16 & 0xFF), 0, 0, 0])
        expectCorrupt(page: beyond, "a child past the last page") { try copy.readAll() }
    }

    @Test func overflowRunsShorterThanTheirValue() throws {
        let copy = try DamagedCopy(seed: 24)
        var patched: [UInt64] = []
        for page in 2 ... copy.root.lastPage where copy.u16(page: page, 10) & 0x7F == 0x04 {  // P_OVERFLOW
            try copy.patch(page: page, offset: 12, [1, 0, 0, 0])  // mp_pages = 1
            patched.append(page)
        }
        #expect(patched.count > 10)
        do {
            try copy.readAll()
            Issue.record("no error")
        } catch let SnapshotError.corrupt(page, _) {
            #expect(patched.contains(page))
        }
    }

    @Test func aTruncatedFile() throws {
        let copy = try DamagedCopy(seed: 25)
        #expect(truncate(copy.path, off_t(Int(copy.root.lastPage / 2) * copy.pageSize)) == 0)
        do {
            try copy.readAll()
            Issue.record("no error")
        } catch SnapshotError.io(let page, let why) {
            #expect(page > copy.root.lastPage / 2 - 1)
            #expect(why.contains("short read"))
        }
    }

    /// Random damage anywhere in the snapshot's pages: every read either
    /// succeeds or throws a SnapshotError — never a crash, never another error.
    @Test func randomByteDamageNeverCrashes() throws {
        let copy = try DamagedCopy(seed: 26, entries: 1_500, overflowValues: 3)
        var rng = SeededRandom(seed: 27)
        var errors = 0
        var damaged: Set<UInt64> = []
        for _ in 0 ..< 250 {
            for page in damaged { try copy.restore(page: page) }
            damaged = []
            for _ in 0 ..< Int.random(in: 1 ... 4, using: &rng) {
                let page = UInt64.random(in: 2 ... copy.root.lastPage, using: &rng)
                damaged.insert(page)
                // Mostly the header and the node pointers, where damage matters most.
                let offset = Bool.random(using: &rng) ? Int.random(in: 0 ..< 64, using: &rng) : Int.random(in: 0 ..< copy.pageSize, using: &rng)
                try copy.patch(page: page, offset: offset, [UInt8.random(in: 0 ... 255, using: &rng)])
            }
            do { try copy.readAll() } catch is SnapshotError { errors += 1 }
        }
        #expect(errors > 30, "damage is seen (\(errors) of 250 runs threw)")
    }

    @Test func thePageCacheStaysWithinItsBound() {
        var cache = PageCache(capacity: 3 * 4096)
        for n in 0 ..< 10 as Range<UInt64> { cache.insert(Page(number: n, pages: 1, pageSize: 4096)) }
        #expect(cache.count == 3 && cache.bytes == 3 * 4096)
        #expect(cache.get(9) != nil && cache.get(7) != nil && cache.get(6) == nil)
        cache.insert(Page(number: 20, pages: 1, pageSize: 4096))  // evicts 8, the least recently used
        #expect(cache.get(8) == nil && cache.get(9) != nil && cache.get(7) != nil && cache.get(20) != nil)
        cache.insert(Page(number: 30, pages: 4, pageSize: 4096))  // larger than the whole cache: not kept
        #expect(cache.get(30) == nil && cache.count == 3)
    }
}
