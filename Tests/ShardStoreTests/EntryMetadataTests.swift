import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// Entry numbers (the mount's inode numbers) and the metadata kept beside a
/// value: a number is given when a key is created, kept by rewrites, renames
/// and metadata changes, and never given again, across restarts and the batch log.
@Suite(.onOwnThreads) struct EntryMetadataTests {
    func number(_ shard: Shard, _ name: String) throws -> UInt64 {
        try #require(try shard.attributes(key(name))).metadata.number
    }

    @Test func numbersFollowTheEntryNotTheName() throws {
        let dir = try TemporaryDirectory("meta")
        let shard = try makeShard(dir)
        try shard.put(key("a"), value: bytes("1"), clientID: "owner")
        try shard.put(key("b"), value: bytes("2"), clientID: "owner")
        let a = try number(shard, "a"), b = try number(shard, "b")
        #expect(a > 0 && b > 0 && a != b)
        try shard.put(key("a"), value: bytes("rewritten"), clientID: "owner")
        #expect(try number(shard, "a") == a)
        try shard.rename(key("a"), to: key("c"), clientID: "owner")
        #expect(try number(shard, "c") == a)
        try shard.updateIndexes(key("c"), clientID: "owner") { _ in [IndexPair(name: "n", value: "v")] }
        try shard.setModificationTime(key("c"), 5, clientID: "owner")
        #expect(try number(shard, "c") == a)
        try shard.delete(key("b"), clientID: "owner")
        try shard.put(key("b"), value: bytes("new"), clientID: "owner")
        let reborn = try number(shard, "b")
        #expect(reborn != b && reborn != a)
        // A listing shows the same numbers.
        var listed: [String: UInt64] = [:]
        try shard.forEachEntry { view in
            listed[String(decoding: view.key, as: UTF8.self)] = view.entryNumber
            return true
        }
        #expect(listed == ["b": reborn, "c": a])
    }

    @Test func numbersAreNeverGivenAgainAfterARestart() throws {
        let dir = try TemporaryDirectory("meta")
        var highest: UInt64 = 0
        do {
            let shard = try makeShard(dir)
            for i in 0..<10 { try shard.put(key("k\(i)"), value: bytes("v"), clientID: "owner") }
            highest = try (0..<10).map { try number(shard, "k\($0)") }.max()!
            // Handed out and never used: still not given again.
            highest = max(highest, shard.newEntryNumber())
            try shard.put(key("last"), value: bytes("v"), clientID: "owner")
            highest = max(highest, try number(shard, "last"))
        }
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        try reopened.put(key("after"), value: bytes("v"), clientID: "owner")
        #expect(try number(reopened, "after") > highest)
    }

    @Test func loggedPutsShowTheirNumberBeforeAndAfterTheyAreApplied() throws {
        let dir = try TemporaryDirectory("meta")
        let path = dir.sub("shard-7")
        var pendingNumber: UInt64 = 0
        var existing: UInt64 = 0
        do {
            let shard = try makeShard(dir)
            shard.backgroundApplyHeld = true
            // Seeded keys (appended straight to LMDB); a batch among them is logged.
            _ = try shard.batchPut((0..<50).map { EntryWrite(key: bytes(String(format: "k%02d", $0)), value: bytes("s")) },
                                   clientID: "owner")
            existing = try number(shard, "k10")
            _ = try shard.batchPut([EntryWrite(key: bytes("k10"), value: bytes("over")), EntryWrite(key: bytes("k10x"), value: bytes("new"))],
                                   clientID: "owner")
            #expect(shard.hasPendingBatches)
            pendingNumber = try number(shard, "k10x")
            #expect(pendingNumber > 0)
            #expect(try number(shard, "k10") == existing)
            #expect(shard.hasPendingBatches)
            // Dropped without applying: the log keeps the batch (a crash).
        }
        let reopened = try Shard.open(at: path)
        #expect(try number(reopened, "k10x") == pendingNumber)
        #expect(try number(reopened, "k10") == existing)
        try reopened.put(key("later"), value: bytes("v"), clientID: "owner")
        #expect(try number(reopened, "later") > pendingNumber)
    }

    @Test func modeAndAccessTimeSurviveRewritesAndReopens() throws {
        let dir = try TemporaryDirectory("meta")
        do {
            let shard = try makeShard(dir)
            try shard.put(key("f"), value: bytes("v"), clientID: "owner", modificationTime: 10)
            try shard.updateEntry(key("f"), clientID: "owner") { entry in
                entry.metadata.mode = 0o620
                entry.metadata.accessTime = 7
                entry.metadata.changeTime = 20
                entry.metadata.number = 999_999  // ignored: numbers are the shard's
            }
            let changed = try #require(try shard.attributes(key("f"))).metadata
            #expect(changed.mode == 0o620 && changed.accessTime == 7 && changed.changeTime == 20 && changed.number != 999_999)
            // A rewrite keeps mode and access time; its change time is its modification time again.
            try shard.put(key("f"), value: bytes("rewritten, and longer than before"), clientID: "owner", modificationTime: 30)
            _ = try shard.batchPut([EntryWrite(key: bytes("f"), value: bytes("batch"), modificationTime: 40, keepsIndexes: true)],
                                   clientID: "owner")
        }
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        let attributes = try #require(try reopened.attributes(key("f")))
        #expect(attributes.metadata.mode == 0o620 && attributes.metadata.accessTime == 7 && attributes.metadata.changeTime == nil)
        #expect(attributes.modificationTime == 40 && attributes.size == 5)
        #expect(try reopened.get(key("f")).value == bytes("batch"))
    }

    @Test func recordsWithoutTheExtensionStillRead() throws {
        // The head of a record written before entry numbers: version 1, no extension.
        var raw: [UInt8] = [1] + withUnsafeBytes(of: UInt64(77).littleEndian) { Array($0) } + bytes("old")
        try raw.withUnsafeMutableBytes { out in
            let view = try RecordView(UnsafeRawBufferPointer(out))
            #expect(view.size == 3 && view.modificationTime == 77 && view.metadata == EntryMetadata())
            #expect(recordHeadIsSane(UnsafeRawBufferPointer(out)) && recordEntryNumber(UnsafeRawBufferPointer(out)) == 0)
        }
        // And one with every field round-trips.
        let metadata = EntryMetadata(number: 300, mode: 0o755, changeTime: -5, accessTime: 1 << 40)
        var record = [UInt8](repeating: 0, count: recordHeadSize(chunked: false, indexes: [], metadata: metadata) + 2)
        try record.withUnsafeMutableBytes { out in
            let offset = encodeRecordHead(into: out, chunkSet: nil, modificationTime: 9, size: 2, indexes: [], metadata: metadata)
            out[offset] = 0x68; out[offset + 1] = 0x69
            let view = try RecordView(UnsafeRawBufferPointer(out))
            #expect(view.metadata == metadata && view.size == 2 && Array(view.inlineValue) == bytes("hi"))
            #expect(recordValueSize(UnsafeRawBufferPointer(out)) == 2 && recordEntryNumber(UnsafeRawBufferPointer(out)) == 300)
        }
    }
}
