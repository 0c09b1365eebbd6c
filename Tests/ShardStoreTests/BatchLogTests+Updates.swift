import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// Metadata updates (chmod and utimens through the mount) logged with
/// durability deferred: read at once without an apply, composed with what is
/// pending for their key, replayed from the log as they were logged, and
/// applied to LMDB to the same result.
extension BatchLogTests {
    /// What reads of `key` show of its metadata, through every read path.
    func shown(_ shard: Shard, _ name: String) throws -> (size: Int, time: Int64, mode: UInt32?, access: Int64?, change: Int64?, value: String) {
        let attributes = try #require(try shard.attributes(key(name)))
        let entry = try shard.get(key(name))
        #expect(entry.modificationTime == attributes.modificationTime)
        var visited: Int64?
        try shard.visitEntries([bytes(name)]) { _, result in visited = try? result.get().modificationTime }
        #expect(visited == attributes.modificationTime)
        #expect(try shard.read(key(name), offset: 0, count: 100) == entry.value)
        return (attributes.size, attributes.modificationTime, attributes.metadata.mode, attributes.metadata.accessTime,
                attributes.metadata.changeTime, String(decoding: entry.value, as: UTF8.self))
    }

    @Test func aLoggedUpdateIsReadAtOnceReplayedAndAppliedAlike() throws {
        let (dir, path, shard) = try heldSeededShard()
        defer { dir.remove() }
        let number = try #require(try shard.attributes(key(seeded(5)))?.metadata.number)
        try shard.changeMetadata(key(seeded(5)), modificationTime: 5_000,
                                 MetadataChange(mode: 0o640, accessTime: 4_000, changeTime: 6_000),
                                 clientID: "owner", deferringDurability: true)
        #expect(shard.hasPendingBatches)
        let expected = (size: 4, time: Int64(5_000), mode: UInt32?(0o640), access: Int64?(4_000), change: Int64?(6_000), value: "seed")
        #expect(try shown(shard, seeded(5)) == expected)
        #expect(shard.hasPendingBatches)  // answered from the pending map, not by an apply
        #expect(try logSize(path) == 0)  // deferred: nothing written yet

        // Only the mode: the times stay as the first update left them.
        try shard.changeMetadata(key(seeded(5)), modificationTime: nil, MetadataChange(mode: 0o600),
                                 clientID: "owner", deferringDurability: true)
        let second = (size: 4, time: Int64(5_000), mode: UInt32?(0o600), access: Int64?(4_000), change: Int64?(6_000), value: "seed")
        #expect(try shown(shard, seeded(5)) == second)
        #expect(shard.hasPendingBatches)

        try shard.sync()
        try crashCopy(path, dir.sub("copy"))
        let replayed = try Shard.open(at: dir.sub("copy"))
        #expect(try shown(replayed, seeded(5)) == second)
        #expect(try replayed.attributes(key(seeded(5)))?.metadata.number == number)

        try shard.applyLog()
        #expect(!shard.hasPendingBatches)
        #expect(try shown(shard, seeded(5)) == second)
        #expect(try shard.attributes(key(seeded(5)))?.metadata.number == number)
        #expect(try shard.list().first { $0.key == key(seeded(5)) }?.metadata.mode == 0o600)
    }

    /// An update of a key whose put is pending shows that put's value with the
    /// update's metadata; a put after it keeps the mode and access time, as a
    /// rewrite of an entry does.
    @Test func updatesComposeWithThePendingPutsOfTheirKey() throws {
        let (dir, path, shard) = try heldSeededShard()
        defer { dir.remove() }
        let name = seeded(5) + "new"
        var made = put(name, "v1")
        made.creationMode = 0o600
        made.keepsIndexes = true  // as the mount's close puts a file
        // Put twice, as the mount does when a file is committed before its close.
        _ = try shard.batchPut([made], clientID: "owner", deferringDurability: true)
        _ = try shard.batchPut([made], clientID: "owner", deferringDurability: true)
        try shard.changeMetadata(key(name), modificationTime: 7_000, MetadataChange(mode: 0o755, changeTime: 7_500),
                                 clientID: "owner", deferringDurability: true)
        try shard.changeMetadata(key(name), modificationTime: nil, MetadataChange(accessTime: 8_000, changeTime: 8_500),
                                 clientID: "owner", deferringDurability: true)
        let updated = (size: 2, time: Int64(7_000), mode: UInt32?(0o755), access: Int64?(8_000), change: Int64?(8_500), value: "v1")
        #expect(try shown(shard, name) == updated)
        #expect(shard.hasPendingBatches)

        _ = try shard.batchPut([put(name, "v2!")], clientID: "owner", deferringDurability: true)
        let rewritten = (size: 3, time: Int64(1_000), mode: UInt32?(0o755), access: Int64?(8_000), change: Int64?.none, value: "v2!")
        #expect(try shown(shard, name) == rewritten)
        #expect(shard.hasPendingBatches)

        try shard.sync()
        try crashCopy(path, dir.sub("copy"))
        #expect(try shown(try Shard.open(at: dir.sub("copy")), name) == rewritten)
        try shard.applyLog()
        #expect(try shown(shard, name) == rewritten)
    }

    @Test func anUpdateNeedsTheEntryAndItsOwner() throws {
        let (dir, _, shard) = try heldSeededShard()
        defer { dir.remove() }
        let change = MetadataChange(mode: 0o644)
        #expect(throws: ShardError.entryNotFound(key("absent"))) {
            try shard.changeMetadata(key("absent"), modificationTime: nil, change, clientID: "owner", deferringDurability: true)
        }
        _ = try shard.batchPut([.deletion(of: bytes(seeded(7)))], clientID: "owner", deferringDurability: true)
        #expect(throws: ShardError.entryNotFound(key(seeded(7)))) {
            try shard.changeMetadata(key(seeded(7)), modificationTime: nil, change, clientID: "owner", deferringDurability: true)
        }
        #expect(throws: ShardError.fenced(owner: "owner", client: "intruder")) {
            try shard.changeMetadata(key(seeded(8)), modificationTime: nil, change, clientID: "intruder", deferringDurability: true)
        }
        #expect(try shard.attributes(key(seeded(8)))?.metadata.mode == nil)
    }

    /// A closed shard refuses logged updates and renames like any write, and
    /// keeps what it had; a rename of a missing entry fails either way.
    @Test func aClosedShardRefusesLoggedUpdatesAndRenames() throws {
        let (dir, _, shard) = try heldSeededShard()
        defer { dir.remove() }
        #expect(throws: ShardError.entryNotFound(key("absent"))) {
            try shard.rename(key("absent"), to: key("x"), clientID: "owner", deferringDurability: false)
        }
        #expect(throws: ShardError.entryNotFound(key("absent"))) {
            try shard.rename(key("absent"), to: key("absent"), clientID: "owner", deferringDurability: false)
        }
        try shard.close()
        #expect(throws: ShardError.closed) {
            try shard.changeMetadata(key(seeded(1)), modificationTime: 1, MetadataChange(mode: 0o600), clientID: "owner",
                                     deferringDurability: true)
        }
        #expect(throws: ShardError.closed) {
            try shard.rename(key(seeded(1)), to: key("moved"), clientID: "owner", deferringDurability: true)
        }
        #expect(try shard.attributes(key(seeded(1)))?.metadata.mode == nil)
        #expect(try shard.attributes(key("moved")) == nil)
        #expect(!shard.hasPendingBatches)
    }

    /// A shard without a log, or a durable update, commits to LMDB at once.
    @Test func aDurableUpdateCommitsToLMDB() throws {
        let (dir, path, shard) = try heldSeededShard()
        defer { dir.remove() }
        try shard.changeMetadata(key(seeded(9)), modificationTime: 9_000, MetadataChange(mode: 0o444),
                                 clientID: "owner", deferringDurability: false)
        #expect(!shard.hasPendingBatches)
        try crashCopy(path, dir.sub("copy"))
        let copy = try Shard.open(at: dir.sub("copy"))
        #expect(try copy.attributes(key(seeded(9)))?.metadata.mode == 0o444)
        #expect(try copy.attributes(key(seeded(9)))?.modificationTime == 9_000)
    }

    /// The log's update record keeps exactly the fields that were set.
    @Test func updateRecordsRoundTripThroughTheLog() throws {
        let dir = try TemporaryDirectory("log")
        let path = dir.sub("shard-7")
        _ = try makeShard(dir)
        try writeLog(path, [
            (1, [put("a", "1"), put("b", "2")]),
            (2, [.update(of: bytes("a"), modificationTime: nil, change: MetadataChange()),
                 .update(of: bytes("b"), modificationTime: -5, change: MetadataChange(mode: 0o7777, accessTime: 0, changeTime: Int64.max)),
                 .update(of: bytes("gone"), modificationTime: 3, change: MetadataChange(mode: 0o600))]),
        ])
        let records = try BatchLog(directory: path).records()
        #expect(records.count == 2)
        let updates = records[1].items
        #expect(updates.allSatisfy { $0.isUpdate })
        #expect(updates[0].modificationTime == nil && updates[0].metadataChange == MetadataChange())
        #expect(updates[1].modificationTime == -5
                && updates[1].metadataChange == MetadataChange(mode: 0o7777, accessTime: 0, changeTime: Int64.max))
        let shard = try Shard.open(at: path)
        let a = try #require(try shard.attributes(key("a")))
        #expect(a.modificationTime == 1_000 && a.metadata.mode == nil)
        let b = try #require(try shard.attributes(key("b")))
        #expect(b.modificationTime == -5 && b.metadata.mode == 0o7777 && b.metadata.accessTime == 0 && b.metadata.changeTime == Int64.max)
        #expect(try shard.attributes(key("gone")) == nil)  // an update of no entry does nothing
    }
}

/// Renames (the mount's rename, which rsync makes of every file it writes)
/// logged with durability deferred.
extension BatchLogTests {
    struct Shown: Equatable {
        var value: String
        var size: Int
        var time: Int64
        var number: UInt64
        var mode: UInt32?
        var indexes: [IndexPair]
    }

    /// What every read path shows of `name`, or nil if none finds it.
    func shownEntry(_ shard: Shard, _ name: String) throws -> Shown? {
        guard let attributes = try shard.attributes(key(name)) else {
            #expect(throws: ShardError.entryNotFound(key(name))) { _ = try shard.get(key(name)) }
            #expect(throws: ShardError.entryNotFound(key(name))) { _ = try shard.read(key(name), offset: 0, count: 1) }
            #expect(throws: ShardError.entryNotFound(key(name))) { _ = try shard.batchGet([key(name)])[0].get() }
            return nil
        }
        let entry = try shard.get(key(name))
        #expect(entry.key == key(name))
        #expect(entry.modificationTime == attributes.modificationTime && entry.indexes == attributes.indexes)
        #expect(try shard.batchGet([key(name)])[0].get() == entry)
        #expect(try shard.read(key(name), offset: 1, count: 100) == Array(entry.value.dropFirst()))
        var visited: [UInt8] = []
        try shard.visitEntries([bytes(name)]) { _, result in try result.get().forEachValuePiece { visited += $0 } }
        #expect(visited == entry.value)
        return Shown(value: String(decoding: entry.value, as: UTF8.self), size: attributes.size, time: attributes.modificationTime,
                     number: attributes.metadata.number, mode: attributes.metadata.mode, indexes: attributes.indexes)
    }

    @Test func aLoggedRenameIsReadAtOnceReplayedAndAppliedAlike() throws {
        let (dir, path, shard) = try heldSeededShard()
        defer { dir.remove() }
        let colour = [IndexPair(name: "colour", value: "red")]
        // An entry LMDB holds, with an index and a mode, moved.
        try shard.updateIndexes(key(seeded(5)), clientID: "owner") { _ in colour }
        try shard.updateEntry(key(seeded(5)), clientID: "owner") { $0.metadata.mode = 0o640 }
        let old = try #require(try shownEntry(shard, seeded(5)))
        try shard.rename(key(seeded(5)), to: key("moved"), clientID: "owner", deferringDurability: true)
        // A file just written, its mode and time set, renamed over an older entry (rsync).
        var made = put("tmp", "fresh")
        made.creationMode = 0o600
        made.keepsIndexes = true
        _ = try shard.batchPut([made], clientID: "owner", deferringDurability: true)
        let madeNumber = try #require(try shard.attributes(key("tmp"))?.metadata.number)
        try shard.changeMetadata(key("tmp"), modificationTime: 3_000, MetadataChange(mode: 0o644, changeTime: 3_500),
                                 clientID: "owner", deferringDurability: true)
        try shard.rename(key("tmp"), to: key(seeded(6)), clientID: "owner", deferringDurability: true)
        #expect(shard.hasPendingBatches)

        let moved = Shown(value: "seed", size: 4, time: 1_000, number: old.number, mode: 0o640, indexes: colour)
        let replaced = Shown(value: "fresh", size: 5, time: 3_000, number: madeNumber, mode: 0o644, indexes: [])
        func check(_ shard: Shard) throws {
            #expect(try shownEntry(shard, "moved") == moved)
            #expect(try shownEntry(shard, seeded(6)) == replaced)
            #expect(try shownEntry(shard, seeded(5)) == nil)
            #expect(try shownEntry(shard, "tmp") == nil)
        }
        try check(shard)
        #expect(shard.hasPendingBatches)  // answered from the pending map, not by an apply
        #expect(try logSize(path) == 0)

        try shard.sync()
        try crashCopy(path, dir.sub("copy"))
        let replayed = try Shard.open(at: dir.sub("copy"))
        try check(replayed)
        #expect(try replayed.find(indexName: "colour", value: bytes("red")) == [key("moved")])
        try shard.applyLog()
        try check(shard)
        #expect(try shard.find(indexName: "colour", value: bytes("red")) == [key("moved")])
        #expect(try shard.list().count == 200)  // 200 seeded, one moved away, one replaced, one new
    }

    /// After a move into a key, what later items make of it is not composed:
    /// a read of it applies the log first, and shows the right thing.
    @Test func itemsAfterAMoveIntoAKeyAreReadAfterAnApply() throws {
        let (dir, _, shard) = try heldSeededShard()
        defer { dir.remove() }
        let number = try #require(try shard.attributes(key(seeded(5)))?.metadata.number)
        try shard.rename(key(seeded(5)), to: key("moved"), clientID: "owner", deferringDurability: true)
        try shard.changeMetadata(key("moved"), modificationTime: 7_000, MetadataChange(mode: 0o700),
                                 clientID: "owner", deferringDurability: true)
        #expect(try shownEntry(shard, "moved") == Shown(value: "seed", size: 4, time: 7_000, number: number, mode: 0o700, indexes: []))
        // The source's key is free: a put there makes a new entry.
        _ = try shard.batchPut([put(seeded(5), "again")], clientID: "owner", deferringDurability: true)
        let again = try #require(try shownEntry(shard, seeded(5)))
        #expect(again.value == "again" && again.number != number && again.mode == nil)
        try shard.rename(key("moved"), to: key("moved"), clientID: "owner", deferringDurability: true)
        #expect(try shownEntry(shard, "moved")?.value == "seed")
        #expect(throws: ShardError.entryNotFound(key("absent"))) {
            try shard.rename(key("absent"), to: key("x"), clientID: "owner", deferringDurability: true)
        }
        #expect(throws: ShardError.fenced(owner: "owner", client: "intruder")) {
            try shard.rename(key("moved"), to: key("x"), clientID: "intruder", deferringDurability: true)
        }
    }

    /// A move whose source is gone by the time it is noted does nothing.
    @Test func moveRecordsRoundTripThroughTheLog() throws {
        let dir = try TemporaryDirectory("log")
        let path = dir.sub("shard-7")
        _ = try makeShard(dir)
        try writeLog(path, [
            (1, [put("a", "1"), put("b", "2"), put("c", "3")]),
            (2, [.move(from: bytes("a"), to: bytes("b")), .move(from: bytes("gone"), to: bytes("c"))]),
        ])
        let records = try BatchLog(directory: path).records()
        #expect(records[1].items.map { $0.movedFrom.map { String(decoding: $0, as: UTF8.self) } } == ["a", "gone"])
        #expect(records[1].items.map { String(decoding: $0.key, as: UTF8.self) } == ["b", "c"])
        let shard = try Shard.open(at: path)
        #expect(try shard.list().map(\.key.description) == ["b", "c"])
        #expect(try shard.get(key("b")).value == bytes("1"))
        #expect(try shard.get(key("c")).value == bytes("3"))
    }
}
