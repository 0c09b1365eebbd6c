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
