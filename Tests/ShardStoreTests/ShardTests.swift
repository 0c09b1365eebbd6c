import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// A shard in a temporary folder, owned by "owner".
func makeShard(_ dir: TemporaryDirectory, limit: Int = ShardOptions.defaultSizeLimit, id: UInt64 = 7) throws -> Shard {
    var options = ShardOptions()
    options.sizeLimit = limit
    return try Shard.create(at: dir.sub("shard-\(id)"), id: id, owner: "owner", options: options)
}

func key(_ s: String) -> EntryKey { try! EntryKey(s) }

/// What a crash of the process leaves of a live shard: its files as they are
/// now (LMDB's lock file aside), folders such as `values/` included.
func crashCopy(_ path: String, _ copy: String) throws {
    try FileManager.default.createDirectory(atPath: copy, withIntermediateDirectories: true)
    for name in try FileManager.default.contentsOfDirectory(atPath: path) where name != "lock.mdb" {
        try FileManager.default.copyItem(atPath: path + "/" + name, toPath: copy + "/" + name)
    }
}
func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

@Suite(.onOwnThreads) struct KeyTests {
    @Test func validKeys() throws {
        #expect(try EntryKey("a").bytes == [0x61])
        #expect(try EntryKey(String(repeating: "k", count: 255)).bytes.count == 255)
        #expect(try EntryKey("...").description == "...")
        #expect(try EntryKey("ünïcødé file.txt").description == "ünïcødé file.txt")
        #expect(EntryKey(entryID: 42).bytes == bytes("42"))
        #expect(EntryKey(entryID: 0).entryID == 0)
        #expect(try EntryKey("4294967295").entryID == UInt32.max)
    }

    @Test(arguments: ["", ".", "..", "a/b", "/", "a\u{0}b", String(repeating: "k", count: 256)])
    func invalidKeys(_ text: String) {
        #expect(throws: ShardError.self) { try EntryKey(text) }
    }

    @Test func entryIDsAreCanonicalDecimal() throws {
        #expect(try EntryKey("042").entryID == nil)
        #expect(try EntryKey("4294967296").entryID == nil)
        #expect(try EntryKey("x1").entryID == nil)
        #expect(try EntryKey("7").entryID == 7)
    }
}

@Suite(.onOwnThreads) struct ShardTests {
    @Test func putGetOverwriteDelete() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("a"), value: bytes("one"), indexes: [IndexPair(name: "kind", value: "x")], clientID: "owner")
        var entry = try shard.get(key("a"))
        #expect(entry.value == bytes("one"))
        #expect(entry.indexes == [IndexPair(name: "kind", value: "x")])

        // Overwrite replaces value and indexes together.
        try shard.put(key("a"), value: bytes("two"), indexes: [IndexPair(name: "other", value: "y")], clientID: "owner")
        entry = try shard.get(key("a"))
        #expect(entry.value == bytes("two"))
        #expect(entry.indexes == [IndexPair(name: "other", value: "y")])
        #expect(try shard.find(indexName: "kind", value: bytes("x")).isEmpty)
        #expect(try shard.find(indexName: "other", value: bytes("y")) == [key("a")])

        try shard.delete(key("a"), clientID: "owner")
        #expect(throws: ShardError.entryNotFound(key("a"))) { try shard.get(key("a")) }
        #expect(try shard.find(indexName: "other", value: bytes("y")).isEmpty)
        #expect(throws: ShardError.entryNotFound(key("a"))) { try shard.delete(key("a"), clientID: "owner") }
    }

    @Test func emptyValueAndMaximalKey() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let long = try EntryKey(String(repeating: "z", count: 255))
        try shard.put(long, value: [], clientID: "owner")
        #expect(try shard.get(long).value == [])
        #expect(try shard.attributes(long)?.size == 0)
        #expect(try shard.list().map(\.key) == [long])
    }

    @Test func largeValuesAreChunkedAndReadByRange() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let size = chunkSize * 3 + 1234
        let value = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        try shard.put(key("big"), value: value, indexes: [IndexPair(name: "n", value: "1")], clientID: "owner")
        #expect(try shard.get(key("big")).value == value)
        #expect(try shard.read(key("big"), offset: chunkSize - 10, count: 20) == Array(value[(chunkSize - 10)..<(chunkSize + 10)]))
        #expect(try shard.read(key("big"), offset: size - 5, count: 100) == Array(value[(size - 5)...]))
        #expect(try shard.read(key("big"), offset: size + 5, count: 100) == [])

        // Rename moves chunks and index; overwrite with a small value drops old chunks.
        try shard.rename(key("big"), to: key("moved"), clientID: "owner")
        #expect(try shard.get(key("moved")).value == value)
        #expect(try shard.find(indexName: "n", value: bytes("1")) == [key("moved")])
        try shard.put(key("moved"), value: bytes("small"), clientID: "owner")
        #expect(try shard.get(key("moved")).value == bytes("small"))
        let before = try shard.stats().usedBytes
        #expect(before < chunkSize * 2, "old chunks must be freed, \(before) bytes in use")
    }

    @Test func renameReplacesTargetAtomically() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("a"), value: bytes("A"), indexes: [IndexPair(name: "i", value: "a")], clientID: "owner")
        try shard.put(key("b"), value: bytes("B"), indexes: [IndexPair(name: "i", value: "b")], clientID: "owner")
        try shard.rename(key("a"), to: key("b"), clientID: "owner")
        #expect(try shard.list().map(\.key) == [key("b")])
        #expect(try shard.get(key("b")).value == bytes("A"))
        #expect(try shard.find(indexName: "i", value: bytes("a")) == [key("b")])
        #expect(try shard.find(indexName: "i", value: bytes("b")).isEmpty)
        #expect(throws: ShardError.entryNotFound(key("a"))) { try shard.rename(key("a"), to: key("c"), clientID: "owner") }
        try shard.rename(key("b"), to: key("b"), clientID: "owner")
        #expect(try shard.get(key("b")).value == bytes("A"))
    }

    @Test func listingIsOrderedAndPaged() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let keys = (0..<250).map { String(format: "k%04d", $0) }
        _ = try shard.batchPut(keys.shuffled().map { EntryWrite(key: bytes($0), value: bytes($0)) }, clientID: "owner")
        var seen: [String] = []
        var after: EntryKey?
        while true {
            let page = try shard.list(after: after, limit: 64)
            if page.isEmpty { break }
            seen += page.map(\.key.description)
            after = page.last?.key
        }
        #expect(seen == keys)
        #expect(try shard.list(after: key("k0248")).map(\.key.description) == ["k0249"])
        #expect(try shard.list(after: key("k00000")).first?.key.description == "k0001")
        #expect(try shard.stats().entries == 250)
    }

    /// A scan crosses many leaf pages (it prefetches each page's nodes as it
    /// reaches it): every entry comes back once, in order, with its own size,
    /// whatever its key length and record kind (inline, indexed, chunked).
    @Test func scanAcrossManyPagesSeesEveryEntryWithItsSize() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        var expected: [String: Int] = [:]
        var writes: [EntryWrite] = []
        for i in 0..<6_000 {
            // Key lengths from 1 to 255 bytes, so nodes straddle cache lines and pages differently.
            let name = String(format: "%05d", i) + String(repeating: "x", count: (i * 37) % 251)
            let size = i % 97 == 0 ? 200_000 : (i * 13) % 300
            var write = EntryWrite(key: bytes(name), value: [UInt8](repeating: UInt8(i & 0xFF), count: size))
            if i % 5 == 0 { write.indexes = [IndexPair(name: "n", value: bytes("\(i % 7)"))] }
            writes.append(write)
            expected[name] = size
        }
        let shuffled = writes.shuffled()
        for start in stride(from: 0, to: shuffled.count, by: 500) {
            _ = try shard.batchPut(Array(shuffled[start..<start + 500]), clientID: "owner")
        }
        // Overwrites and deletes leave pages with nodes out of address order.
        _ = try shard.batchPut(writes.filter { $0.key.first == UInt8(ascii: "1") }.map {
            var w = $0; w.value = [1, 2, 3]; return w
        }, clientID: "owner")
        for (name, _) in expected where name.hasPrefix("1") { expected[name] = 3 }
        for name in expected.keys.filter({ $0.hasPrefix("2") }) {
            try shard.delete(key(name), clientID: "owner")
            expected[name] = nil
        }

        var seen: [(String, Int)] = []
        try shard.forEachEntry { view in
            seen.append((String(decoding: view.key, as: UTF8.self), view.size))
            return true
        }
        #expect(seen.map(\.0) == expected.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) })
        #expect(seen.allSatisfy { expected[$0.0] == $0.1 })
        let middle = seen[seen.count / 2].0
        #expect(try shard.list(after: key(middle), limit: 3).map(\.key.description) == seen[(seen.count / 2 + 1)...].prefix(3).map(\.0))
    }

    @Test func batchPutReportsInvalidItemsAndCommitsTheRest() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let statuses = try shard.batchPut([
            EntryWrite(key: bytes("good"), value: bytes("1")),
            EntryWrite(key: bytes("bad/key"), value: bytes("2")),
            EntryWrite(key: [], value: bytes("3")),
            EntryWrite(key: bytes("dup-index"), value: bytes("4"),
                       indexes: [IndexPair(name: "x", value: "1"), IndexPair(name: "x", value: "2")]),
            EntryWrite(key: bytes("good2"), value: bytes("5")),
        ], clientID: "owner")
        #expect(statuses[0] == nil && statuses[4] == nil)
        if case .invalidKey = statuses[1] {} else { Issue.record("expected invalidKey, got \(String(describing: statuses[1]))") }
        if case .invalidKey = statuses[2] {} else { Issue.record("expected invalidKey, got \(String(describing: statuses[2]))") }
        if case .invalidIndex = statuses[3] {} else { Issue.record("expected invalidIndex, got \(String(describing: statuses[3]))") }
        #expect(try shard.list().map(\.key.description) == ["good", "good2"])
    }

    @Test func batchGetReportsMissingEntriesWithoutAborting() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("1"), value: bytes("one"), clientID: "owner")
        try shard.put(key("3"), value: bytes("three"), clientID: "owner")
        let results = try shard.batchGet([key("1"), key("2"), key("3")])
        #expect(try results[0].get().value == bytes("one"))
        #expect(throws: ShardError.entryNotFound(key("2"))) { try results[1].get() }
        #expect(try results[2].get().value == bytes("three"))
    }

    @Test func visitEntriesHandsOutEveryKeyInOrderFromOneSnapshot() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let big = (0..<(chunkSize * 2 + 99)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try shard.put(key("small"), value: bytes("one"), indexes: [IndexPair(name: "kind", value: "odd"), IndexPair(name: "n", value: [])],
                      clientID: "owner", modificationTime: 42)
        try shard.put(key("big"), value: big, clientID: "owner")
        let keys = [bytes("big"), bytes("missing"), bytes("a/b"), bytes("small"), bytes("big")]
        var seen: [Int] = []
        var got: [Int: (value: [UInt8], pieces: Int, indexes: [IndexPair], time: Int64)] = [:]
        var failures: [Int: ShardError] = [:]
        try shard.visitEntries(keys) { i, result in
            seen.append(i)
            switch result {
            case .success(let entry):
                var value: [UInt8] = [], pieces = 0
                try entry.forEachValuePiece { value += $0; pieces += 1 }
                #expect(entry.size == value.count)
                var indexes: [IndexPair] = []
                entry.forEachIndex { indexes.append(IndexPair(name: String(decoding: $0, as: UTF8.self), value: Array($1))) }
                got[i] = (value, pieces, indexes, entry.modificationTime)
            case .failure(let error):
                failures[i] = error
            }
        }
        #expect(seen == [0, 1, 2, 3, 4])
        #expect(got[0]?.value == big && got[0]?.pieces == 3 && got[4]?.value == big)
        #expect(got[3]?.value == bytes("one") && got[3]?.pieces == 1 && got[3]?.time == 42)
        #expect(got[3]?.indexes == [IndexPair(name: "kind", value: "odd"), IndexPair(name: "n", value: [])])
        #expect(failures[1] == .entryNotFound(key("missing")))
        if case .invalidKey = failures[2] {} else { Issue.record("expected invalidKey, got \(String(describing: failures[2]))") }

        // A slice visits its own indices; an error thrown by the body ends the visit.
        struct Stop: Error {}
        var visited: [Int] = []
        #expect(throws: Stop.self) {
            try shard.visitEntries(keys[1...]) { i, _ in
                visited.append(i)
                if i == 2 { throw Stop() }
            }
        }
        #expect(visited == [1, 2])
    }

    @Test func findByIndexAfterOverwriteAndDeleteIncludingLongValues() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let long = [UInt8](repeating: 7, count: 1000)
        let long2 = [UInt8](repeating: 7, count: 999) + [8]
        for i in 0..<10 {
            try shard.put(key("e\(i)"), value: [], indexes: [
                IndexPair(name: "parity", value: i % 2 == 0 ? "even" : "odd"),
                IndexPair(name: "blob", value: i < 5 ? long : long2),
            ], clientID: "owner")
        }
        #expect(try shard.find(indexName: "parity", value: bytes("even")).map(\.description) == ["e0", "e2", "e4", "e6", "e8"])
        #expect(try shard.find(indexName: "blob", value: long).count == 5)
        #expect(try shard.find(indexName: "blob", value: long2).count == 5)
        #expect(try shard.find(indexName: "parity", value: bytes("even"), after: key("e2"), limit: 2).map(\.description) == ["e4", "e6"])
        try shard.put(key("e0"), value: [], indexes: [IndexPair(name: "parity", value: "odd")], clientID: "owner")
        try shard.delete(key("e2"), clientID: "owner")
        #expect(try shard.find(indexName: "parity", value: bytes("even")).map(\.description) == ["e4", "e6", "e8"])
        #expect(try shard.find(indexName: "parity", value: bytes("odd")).first == key("e0"))
        #expect(try shard.find(indexName: "blob", value: long).map(\.description) == ["e1", "e3", "e4"])
        #expect(try shard.find(indexName: "nothing", value: bytes("x")).isEmpty)
    }

    @Test func invalidIndexesAreRefused() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        for bad in [IndexPair(name: "", value: "x"), IndexPair(name: String(repeating: "n", count: 201), value: "x"),
                    IndexPair(name: "v", value: [UInt8](repeating: 0, count: IndexPair.maxValueLength + 1))] {
            #expect(throws: ShardError.self) { try shard.put(key("k"), value: [], indexes: [bad], clientID: "owner") }
        }
        #expect(try shard.list().isEmpty)
    }

    @Test func writesByOtherClientsAreFenced() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        #expect(throws: ShardError.fenced(owner: "owner", client: "intruder")) {
            try shard.put(key("a"), value: [1], clientID: "intruder")
        }
        #expect(throws: ShardError.clientIDRequired) { try shard.put(key("a"), value: [1], clientID: "") }
        #expect(throws: ShardError.fenced(owner: "owner", client: "intruder")) {
            _ = try shard.batchPut([EntryWrite(key: bytes("a"), value: [1])], clientID: "intruder")
        }
        #expect(try shard.list().isEmpty)
    }

    @Test func fullShardCommitsNothingAndStaysUsable() throws {
        let dir = try TemporaryDirectory("shard")
        let limit = 1 << 20
        let shard = try makeShard(dir, limit: limit)
        try shard.put(key("small"), value: bytes("fits"), clientID: "owner")
        // One value larger than the whole limit, and a batch that overflows it.
        #expect(throws: ShardError.full(limit: limit)) {
            try shard.put(key("huge"), value: [UInt8](repeating: 1, count: 2 << 20), clientID: "owner")
        }
        let batch = (0..<40).map { EntryWrite(key: bytes("b\($0)"), value: [UInt8](repeating: 2, count: 40_000)) }
        #expect(throws: ShardError.full(limit: limit)) { _ = try shard.batchPut(batch, clientID: "owner") }
        #expect(try shard.list().map(\.key.description) == ["small"])
        #expect(try shard.get(key("small")).value == bytes("fits"))
        // Smaller writes still work, and deleting frees room.
        try shard.put(key("next"), value: [UInt8](repeating: 3, count: 100_000), clientID: "owner")
        #expect(try shard.get(key("next")).value.count == 100_000)
        let stats = try shard.stats()
        #expect(stats.limitBytes == limit)
        #expect(stats.usedBytes <= limit)
    }

    @Test func closedShardRefusesWritesAndStaysClosedAfterReopen() throws {
        let dir = try TemporaryDirectory("shard")
        do {
            let shard = try makeShard(dir)
            try shard.put(key("a"), value: [1], clientID: "owner")
            try shard.close()
            try shard.close()  // idempotent
            #expect(shard.state == .closed)
            #expect(throws: ShardError.closed) { try shard.put(key("b"), value: [2], clientID: "owner") }
            #expect(throws: ShardError.closed) { try shard.delete(key("a"), clientID: "owner") }
            #expect(throws: ShardError.closed) { try shard.rename(key("a"), to: key("c"), clientID: "owner") }
            #expect(throws: ShardError.closed) { _ = try shard.batchPut([EntryWrite(key: bytes("x"), value: [])], clientID: "owner") }
        }
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(reopened.state == .closed)
        #expect(throws: ShardError.closed) { try reopened.put(key("b"), value: [2], clientID: "owner") }
        #expect(try reopened.get(key("a")).value == [1])
    }

    @Test func openShardReopensWritableWithItsOwnerAndLimit() throws {
        let dir = try TemporaryDirectory("shard")
        do {
            let shard = try makeShard(dir, limit: 4 << 20)
            try shard.put(key("a"), value: [1], clientID: "owner")
        }
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(reopened.state == .open)
        #expect(reopened.owner == "owner")
        #expect(reopened.id == 7)
        #expect(reopened.sizeLimit == 4 << 20)
        try reopened.put(key("b"), value: [2], clientID: "owner")
        #expect(try reopened.list().count == 2)
        #expect(throws: ShardError.full(limit: 4 << 20)) {
            try reopened.put(key("c"), value: [UInt8](repeating: 0, count: 5 << 20), clientID: "owner")
        }
    }

    @Test func readOnlyViewRefusesEveryWrite() throws {
        let dir = try TemporaryDirectory("shard")
        do { try makeShard(dir).put(key("a"), value: [1], clientID: "owner") }
        var options = ShardOptions()
        options.readOnly = true
        let view = try Shard.open(at: dir.sub("shard-7"), options: options)
        #expect(try view.get(key("a")).value == [1])
        #expect(throws: ShardError.readOnlyView) { try view.put(key("b"), value: [2], clientID: "owner") }
        #expect(throws: ShardError.readOnlyView) { try view.close() }
    }

    @Test func creatingOverAnExistingShardFails() throws {
        let dir = try TemporaryDirectory("shard")
        _ = try makeShard(dir)
        #expect(throws: ShardError.shardExists(dir.sub("shard-7"))) { _ = try makeShard(dir) }
        #expect(throws: ShardError.self) { _ = try Shard.open(at: dir.sub("nothing-here")) }
    }

    @Test func modificationTimeIsKeptAndSettable() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("a"), value: [1], clientID: "owner", modificationTime: 1_000_000_000)
        #expect(try shard.attributes(key("a"))?.modificationTime == 1_000_000_000)
        try shard.setModificationTime(key("a"), 5_000_000_000, clientID: "owner")
        #expect(try shard.attributes(key("a"))?.modificationTime == 5_000_000_000)
        #expect(try shard.get(key("a")).value == [1])
        #expect(try shard.attributes(key("none")) == nil)
    }

    @Test func concurrentWritersAllLandAndAreGroupCommitted() async throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let writers = 8, perWriter = 200
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<writers {
                group.addTask {
                    for i in 0..<perWriter {
                        try shard.put(key("w\(w)-\(i)"), value: bytes("\(w):\(i)"), clientID: "owner")
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(try shard.stats().entries == writers * perWriter)
        #expect(try shard.get(key("w3-150")).value == bytes("3:150"))
    }

    @Test func oneWriteThatDoesNotFitDoesNotFailOthersInItsGroup() async throws {
        let dir = try TemporaryDirectory("shard")
        let limit = 1 << 20
        let shard = try makeShard(dir, limit: limit)
        // Many small writers race with writers whose values cannot fit next to each other.
        let results = try await withThrowingTaskGroup(of: (String, Bool).self) { group in
            for i in 0..<40 {
                group.addTask {
                    let big = i % 10 == 0
                    do {
                        try shard.put(key("k\(i)"), value: [UInt8](repeating: 1, count: big ? 700_000 : 10), clientID: "owner")
                        return ("k\(i)", true)
                    } catch ShardError.full {
                        return ("k\(i)", false)
                    }
                }
            }
            return try await group.reduce(into: [:]) { $0[$1.0] = $1.1 }
        }
        for i in 0..<40 where i % 10 != 0 { #expect(results["k\(i)"] == true, "small write k\(i) failed") }
        #expect((0..<40).filter { $0 % 10 == 0 }.filter { results["k\($0)"] == true }.count <= 1)
        for (k, ok) in results where ok { #expect(try shard.attributes(key(k)) != nil) }
    }
}

@Suite(.onOwnThreads) struct StreamingAndIndexUpdateTests {
    @Test func putFromASourceWritesChunksPiecewise() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let size = chunkSize * 2 + 77
        var requested: [Int] = []
        try shard.put(key("streamed"), size: size, clientID: "owner") { offset, buffer in
            requested.append(buffer.count)
            for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: offset + i) }
        }
        #expect(requested == [chunkSize, chunkSize, 77])
        let value = try shard.get(key("streamed")).value
        #expect(value.count == size)
        #expect(value.enumerated().allSatisfy { $0.element == UInt8(truncatingIfNeeded: $0.offset) })
        try shard.put(key("small"), size: 3, clientID: "owner") { _, buffer in buffer.copyBytes(from: [1, 2, 3]) }
        #expect(try shard.get(key("small")).value == [1, 2, 3])
    }

    @Test func aFailingSourceCommitsNothing() throws {
        struct ReadFailed: Error {}
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("k"), value: bytes("old"), clientID: "owner")
        #expect(throws: ReadFailed.self) {
            try shard.put(key("k"), size: chunkSize * 3, clientID: "owner") { offset, _ in
                if offset > 0 { throw ReadFailed() }
            }
        }
        #expect(try shard.get(key("k")).value == bytes("old"))
    }

    @Test func updateIndexesKeepsValueAndTime() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let big = [UInt8](repeating: 9, count: chunkSize + 5)
        try shard.put(key("k"), value: big, indexes: [IndexPair(name: "a", value: "1")], clientID: "owner",
                      modificationTime: 42)
        try shard.updateIndexes(key("k"), clientID: "owner") { $0 + [IndexPair(name: "b", value: "2")] }
        var entry = try shard.get(key("k"))
        #expect(entry.value == big && entry.modificationTime == 42)
        #expect(entry.indexes == [IndexPair(name: "a", value: "1"), IndexPair(name: "b", value: "2")])
        #expect(try shard.find(indexName: "b", value: bytes("2")) == [key("k")])
        try shard.updateIndexes(key("k"), clientID: "owner") { $0.filter { $0.name != "a" } }
        entry = try shard.get(key("k"))
        #expect(entry.indexes == [IndexPair(name: "b", value: "2")])
        #expect(try shard.find(indexName: "a", value: bytes("1")).isEmpty)
        #expect(throws: ShardError.self) {
            try shard.updateIndexes(key("k"), clientID: "owner") { $0 + [IndexPair(name: "b", value: "dup")] }
        }
        #expect(throws: ShardError.entryNotFound(key("none"))) { try shard.updateIndexes(key("none"), clientID: "owner") { $0 } }
        #expect(throws: ShardError.fenced(owner: "owner", client: "x")) { try shard.updateIndexes(key("k"), clientID: "x") { $0 } }
    }
}

@Suite(.onOwnThreads) struct StagedValueTests {
    func pattern(_ offset: Int, _ buffer: UnsafeMutableRawBufferPointer) {
        for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: (offset + i) &* 7 &+ (offset + i) >> 13) }
    }

    @Test func aValueLargerThanOneTransactionIsStagedAndSwitchedAtOnce() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        let size = Shard.stagingThreshold * 2 + 12_345
        try shard.put(key("old"), value: bytes("previous"), indexes: [IndexPair(name: "i", value: "1")], clientID: "owner")
        try shard.put(key("old"), size: size, indexes: nil, clientID: "owner", source: pattern)
        #expect(try shard.attributes(key("old"))?.size == size)
        #expect(try shard.attributes(key("old"))?.indexes == [IndexPair(name: "i", value: "1")])
        for offset in [0, chunkSize - 3, Shard.stagingThreshold - 1, size - 100] {
            var expected = [UInt8](repeating: 0, count: min(200, size - offset))
            expected.withUnsafeMutableBytes { pattern(offset, $0) }
            #expect(try shard.read(key("old"), offset: offset, count: 200) == expected, "at \(offset)")
        }
        // Renaming moves no chunks; overwriting frees them.
        try shard.rename(key("old"), to: key("new"), clientID: "owner")
        #expect(try shard.read(key("new"), offset: size - 1, count: 1).count == 1)
        let before = try shard.stats().usedBytes
        try shard.put(key("new"), value: bytes("small"), clientID: "owner")
        #expect(try shard.stats().usedBytes < before - size / 2)
    }

    @Test func aFailedStagedPutLeavesTheOldValueAndNoGarbage() throws {
        struct SourceFailed: Error {}
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("k"), value: bytes("kept"), clientID: "owner")
        let base = try shard.stats().usedBytes
        #expect(throws: SourceFailed.self) {
            try shard.put(key("k"), size: Shard.stagingThreshold * 3, clientID: "owner") { offset, buffer in
                if offset >= Shard.stagingThreshold * 2 { throw SourceFailed() }
                self.pattern(offset, buffer)
            }
        }
        #expect(try shard.get(key("k")).value == bytes("kept"))
        #expect(try shard.stats().usedBytes < base + Shard.stagingThreshold / 2)
    }

    @Test func chunksAStagedPutLeftBehindAreRemovedWhenTheShardOpens() throws {
        let dir = try TemporaryDirectory("shard")
        var base = 0
        do {
            let shard = try makeShard(dir)
            base = try shard.stats().usedBytes
            // What a crash between staging and the switch leaves.
            _ = try shard.stageChunks(size: Shard.stagingThreshold + 1000, clientID: "owner", source: pattern)
            #expect(try shard.stats().usedBytes > base + Shard.stagingThreshold / 2)
        }
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(try reopened.stats().usedBytes < base + Shard.stagingThreshold / 2)
    }
}

@Suite(.onOwnThreads) struct BatchDeletionTests {
    @Test func aBatchCanDeleteAndPutTogether() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("old"), value: bytes("1"), indexes: [IndexPair(name: "i", value: "x")], clientID: "owner")
        let statuses = try shard.batchPut([EntryWrite.deletion(of: bytes("old")), EntryWrite(key: bytes("new"), value: bytes("2")),
                                           EntryWrite.deletion(of: bytes("never-existed")), EntryWrite.deletion(of: bytes("bad/key"))],
                                          clientID: "owner")
        #expect(statuses[0] == nil && statuses[1] == nil && statuses[2] == nil)
        if case .invalidKey = statuses[3] {} else { Issue.record("expected invalidKey, got \(String(describing: statuses[3]))") }
        #expect(try shard.list().map(\.key.description) == ["new"])
        #expect(try shard.find(indexName: "i", value: bytes("x")).isEmpty)
    }
}
