import Foundation
import Metadata
import TestSupport
import Testing

@Suite struct EmbeddedMetadataStoreTests {
    @Test func nodes() async throws {
        let dir = try TemporaryDirectory("meta")
        let store = try EmbeddedMetadataStore(path: dir.path)
        try await store.registerNode(NodeRecord(nodeID: "n1", address: "127.0.0.1:1"))
        try await store.registerNode(NodeRecord(nodeID: "n2", address: "127.0.0.1:2"))
        #expect(try await store.getNode("n1").address == "127.0.0.1:1")
        #expect(try await store.listNodes().map(\.nodeID) == ["n1", "n2"])
        try await store.unregisterNode("n1")
        await #expect(throws: MetadataError.notFound("node n1")) { try await store.getNode("n1") }
        await #expect(throws: MetadataError.notFound("node n1")) { try await store.unregisterNode("n1") }
        await #expect(throws: MetadataError.self) { try await store.registerNode(NodeRecord(nodeID: "", address: "")) }
    }

    @Test func shardsLifecycleAndTransitions() async throws {
        let dir = try TemporaryDirectory("meta")
        let store = try EmbeddedMetadataStore(path: dir.path)
        let id = try await store.generateShardID()
        let record = ShardRecord(shardID: id, volumeID: "v1", ownerClientID: "c", sizeLimit: 1 << 20)
        try await store.createShard(record)
        try await store.createShard(record)  // the same record again: a retry that succeeds
        var other = record
        other.volumeID = "v2"
        await #expect(throws: MetadataError.alreadyExists("shard \(id)")) { try await store.createShard(other) }
        #expect(try await store.getShard(id) == record)
        #expect(try await store.updateShardState(id, to: .closed).state == .closed)
        await #expect(throws: MetadataError.self) { _ = try await store.updateShardState(id, to: .open) }
        #expect(try await store.updateShardState(id, to: .deleting).state == .deleting)
        await #expect(throws: MetadataError.self) { _ = try await store.updateShardState(id, to: .closed) }
        try await store.deleteShard(id)
        await #expect(throws: MetadataError.notFound("shard \(id)")) { try await store.getShard(id) }
        await #expect(throws: MetadataError.notFound("shard \(id)")) { try await store.deleteShard(id) }
        await #expect(throws: MetadataError.notFound("shard 999")) { _ = try await store.updateShardState(999, to: .closed) }
    }

    @Test func listShardsByVolumeInIDOrder() async throws {
        let dir = try TemporaryDirectory("meta")
        let store = try EmbeddedMetadataStore(path: dir.path)
        for (id, volume) in [(300, "b"), (2, "a"), (1000, "a")] as [(UInt64, String)] {
            try await store.createShard(ShardRecord(shardID: id, volumeID: volume, ownerClientID: "c", sizeLimit: 1))
        }
        #expect(try await store.listShards(volumeID: nil).map(\.shardID) == [2, 300, 1000])
        #expect(try await store.listShards(volumeID: "a").map(\.shardID) == [2, 1000])
        // A recorded ID moves the counter past it.
        #expect(try await store.generateShardID() == 1001)
    }

    @Test func idsAreNeverReusedAndClaimsMustBeAboveTheMark() async throws {
        let dir = try TemporaryDirectory("meta")
        do {
            let store = try EmbeddedMetadataStore(path: dir.path)
            #expect(try await store.generateShardID() == 1)
            #expect(try await store.generateShardID() == 2)
            try await store.claimShardID(10)
            await #expect(throws: MetadataError.self) { try await store.claimShardID(10) }
            await #expect(throws: MetadataError.self) { try await store.claimShardID(5) }
            await #expect(throws: MetadataError.self) { try await store.claimShardID(0) }
            #expect(try await store.generateShardID() == 11)
        }
        // Persistent: a reopened store goes on from the mark.
        let reopened = try EmbeddedMetadataStore(path: dir.path)
        #expect(try await reopened.generateShardID() == 12)
    }

    @Test func concurrentIDGenerationFromManyThreadsIsUniqueAndIncreasing() async throws {
        let dir = try TemporaryDirectory("meta")
        let store = try EmbeddedMetadataStore(path: dir.path)
        let perTask = 50
        let sequences = try await withThrowingTaskGroup(of: [UInt64].self) { group in
            for _ in 0..<8 {
                group.addTask {
                    var ids: [UInt64] = []
                    for _ in 0..<perTask { ids.append(try await store.generateShardID()) }
                    return ids
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        for ids in sequences { #expect(ids == ids.sorted() && Set(ids).count == ids.count) }
        let all = sequences.flatMap { $0 }
        #expect(Set(all).count == 8 * perTask)
        #expect(all.max() == UInt64(8 * perTask))
    }

    @Test func volumesAndGuardedPrimaryChange() async throws {
        let dir = try TemporaryDirectory("meta")
        let store = try EmbeddedMetadataStore(path: dir.path)
        try await store.registerVolume(VolumeRecord(volumeID: "v1", primaryNodeID: "n1", mountPath: "/v1"))
        try await store.registerVolume(VolumeRecord(volumeID: "v1", primaryNodeID: "n1", mountPath: "/v1"))  // a retry
        await #expect(throws: MetadataError.alreadyExists("volume v1")) {
            try await store.registerVolume(VolumeRecord(volumeID: "v1", primaryNodeID: "n2", mountPath: "/v1"))
        }
        try await store.addBackup(volumeID: "v1", nodeID: "n2")
        try await store.addBackup(volumeID: "v1", nodeID: "n2")
        try await store.addBackup(volumeID: "v1", nodeID: "n3")
        #expect(try await store.getVolume("v1").backupNodeIDs == ["n2", "n3"])
        #expect(try await store.listVolumes(nodeID: "n3").map(\.volumeID) == ["v1"])
        #expect(try await store.listVolumes(nodeID: "n9").isEmpty)

        let promoted = try await store.updatePrimary(volumeID: "v1", nodeID: "n2", expectedEpoch: 1)
        #expect(promoted.primaryNodeID == "n2" && promoted.epoch == 2 && promoted.backupNodeIDs == ["n3"])
        // A node acting on the old epoch loses.
        await #expect(throws: MetadataError.self) { _ = try await store.updatePrimary(volumeID: "v1", nodeID: "n3", expectedEpoch: 1) }
        #expect(try await store.getVolume("v1").primaryNodeID == "n2")

        try await store.removeBackup(volumeID: "v1", nodeID: "n3")
        #expect(try await store.getVolume("v1").backupNodeIDs.isEmpty)
        try await store.unregisterVolume("v1")
        await #expect(throws: MetadataError.notFound("volume v1")) { try await store.getVolume("v1") }
    }

    @Test func changeListenerSeesEveryChangeInOrder() async throws {
        let dir = try TemporaryDirectory("meta")
        let store = try EmbeddedMetadataStore(path: dir.path)
        let stream = store.changes()
        let record = ShardRecord(shardID: 5, volumeID: "v", ownerClientID: "c", sizeLimit: 1)
        try await store.registerNode(NodeRecord(nodeID: "n", address: ""))
        try await store.createShard(record)
        _ = try await store.updateShardState(5, to: .closed)
        try await store.deleteShard(5)
        try await store.unregisterNode("n")
        var events: [MetadataEvent] = []
        for await event in stream {
            events.append(event)
            if events.count == 5 { break }
        }
        var closed = record
        closed.state = .closed
        #expect(events == [.nodeRegistered(NodeRecord(nodeID: "n", address: "")), .shardCreated(record),
                           .shardUpdated(closed), .shardDeleted(shardID: 5), .nodeUnregistered(nodeID: "n")])
    }
}
