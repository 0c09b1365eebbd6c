import Foundation
import Metadata
import ShardNode
import ShardStore
import TestSupport
import Testing

func testConfig(_ dir: TemporaryDirectory, volumes: Int = 1) throws -> Configuration {
    var config = Configuration()
    try config.set("node.data_dir", dir.path)
    try config.set("cloud.initial_volumes", String(volumes))
    try config.set("shard.size_limit", "4MiB")
    try config.set("metadata.retry.deadline_ms", "200")
    return config
}

let key1 = try! EntryKey("1")

// Each node lives in a `do` block: leaving it drops the node and closes every
// LMDB environment, as a process exit would (LMDB forbids opening one
// environment twice in a process).

@Suite struct ShardManagerTests {
    @Test func everyChangeListenerHearsEachCommitUntilRemoved() async throws {
        let dir = try TemporaryDirectory("node")
        let node = try await StorageNode.start(try testConfig(dir))
        let heard = Heard()
        let first = node.shards.addChangeListener { shard, keys in heard.add("first", shard, keys) }
        let shard = try await node.shards.newShard(owner: "c")
        _ = node.shards.addChangeListener { shard, keys in heard.add("second", shard, keys) }
        try shard.put(key1, value: [1], clientID: "c")
        #expect(heard.take() == ["first \(shard.id) 1", "second \(shard.id) 1"])
        node.shards.removeChangeListener(first)
        try shard.delete(key1, clientID: "c")
        #expect(heard.take() == ["second \(shard.id) 1"])
    }
    @Test func restartKeepsOpenShardsWritableAndClosedShardsClosed() async throws {
        let dir = try TemporaryDirectory("node")
        let config = try testConfig(dir)
        var open: UInt64 = 0, closed: UInt64 = 0
        do {
            let node = try await StorageNode.start(config)
            let a = try await node.shards.newShard(owner: "c")
            try a.put(key1, value: [1], clientID: "c")
            let b = try await node.shards.newShard(owner: "c")
            try b.put(key1, value: [2], clientID: "c")
            try await node.shards.closeShard(b.id)
            (open, closed) = (a.id, b.id)
        }
        do {
            let node = try await StorageNode.start(config)
            let a = try await node.shards.shard(open)
            #expect(a.state == .open)
            try a.put(try EntryKey("2"), value: [3], clientID: "c")
            let b = try await node.shards.shard(closed)
            #expect(b.state == .closed)
            #expect(try b.get(key1).value == [2])
            #expect(throws: ShardError.closed) { try b.put(try EntryKey("2"), value: [3], clientID: "c") }
            #expect(try await node.metadata.getShard(closed).state == .closed)
            #expect(try await node.shards.listShards().map(\.record.shardID) == [open, closed])
        }
    }

    @Test func explicitIDsAreAcceptedWhenFreeAndMoveTheCounter() async throws {
        let dir = try TemporaryDirectory("node")
        do {
            let node = try await StorageNode.start(try testConfig(dir))
            let ten = try await node.shards.newShard(owner: "c", id: 10)
            #expect(ten.id == 10)
            await #expect(throws: ShardManagerError.shardIDTaken(10)) { try await node.shards.newShard(owner: "c", id: 10) }
            await #expect(throws: ShardManagerError.shardIDTaken(5)) { try await node.shards.newShard(owner: "c", id: 5) }
            let eleven = try await node.shards.newShard(owner: "c")
            #expect(eleven.id == 11)
            await #expect(throws: ShardError.clientIDRequired) { try await node.shards.newShard(owner: "") }
            await #expect(throws: ShardManagerError.self) { try await node.shards.newShard(owner: "c", sizeLimit: 10) }
        }
    }

    @Test func deleteRemovesFilesAndMetadataAndIDsAreNotReused() async throws {
        let dir = try TemporaryDirectory("node")
        do {
            let node = try await StorageNode.start(try testConfig(dir))
            let shard = try await node.shards.newShard(owner: "c")
            try shard.put(key1, value: [1], clientID: "c")
            let path = shard.path
            try await node.shards.closeShard(shard.id)
            try await node.shards.deleteShard(shard.id)  // closed shards can be deleted too
            #expect(!FileManager.default.fileExists(atPath: path))
            await #expect(throws: ShardManagerError.shardNotFound(shard.id)) { try await node.shards.shard(shard.id) }
            await #expect(throws: MetadataError.notFound("shard \(shard.id)")) { try await node.metadata.getShard(shard.id) }
            #expect(try await node.shards.newShard(owner: "c").id == shard.id + 1)
            await #expect(throws: ShardManagerError.shardNotFound(999)) { try await node.shards.deleteShard(999) }
        }
    }

    @Test func restartFinishesAHalfDoneDelete() async throws {
        let dir = try TemporaryDirectory("node")
        let config = try testConfig(dir)
        // Crash after marking: metadata says deleting, files intact.
        var marked: UInt64 = 0, renamed: UInt64 = 0, path1 = "", path2 = ""
        do {
            let node = try await StorageNode.start(config)
            let a = try await node.shards.newShard(owner: "c")
            try a.put(key1, value: [1], clientID: "c")
            _ = try await node.metadata.updateShardState(a.id, to: .deleting)
            // Crash after the rename: a .deleting directory and a deleting record.
            let b = try await node.shards.newShard(owner: "c")
            _ = try await node.metadata.updateShardState(b.id, to: .deleting)
            (marked, renamed, path1, path2) = (a.id, b.id, a.path, b.path)
        }
        #expect(rename(path2, path2 + ".deleting") == 0)
        do {
            let node = try await StorageNode.start(config)
            for id in [marked, renamed] {
                await #expect(throws: MetadataError.notFound("shard \(id)")) { try await node.metadata.getShard(id) }
                await #expect(throws: ShardManagerError.shardNotFound(id)) { try await node.shards.shard(id) }
            }
            #expect(!FileManager.default.fileExists(atPath: path1))
            #expect(!FileManager.default.fileExists(atPath: path2 + ".deleting"))
            let left = try await node.shards.listShards()
            #expect(left.isEmpty)
        }
    }

    @Test func restartRollsBackACreateWithoutFilesAndAdoptsFilesWithoutMetadata() async throws {
        let dir = try TemporaryDirectory("node")
        let config = try testConfig(dir)
        var ghost = "", orphan: UInt64 = 0
        do {
            let node = try await StorageNode.start(config)
            // Metadata written, crash before files.
            ghost = try await node.shards.newShard(owner: "c").path
            let adopted = try await node.shards.newShard(owner: "o")
            try adopted.put(key1, value: [9], clientID: "o")
            try adopted.close()  // closed in its own descriptor only
            try await node.metadata.deleteShard(adopted.id)
            orphan = adopted.id
        }
        try FileManager.default.removeItem(atPath: ghost)
        do {
            let node = try await StorageNode.start(config)
            #expect(try await node.metadata.listShards(volumeID: nil).map(\.shardID) == [orphan])
            let record = try await node.metadata.getShard(orphan)
            #expect(record.ownerClientID == "o" && record.state == .closed)
            #expect(try await node.shards.shard(orphan).get(key1).value == [9])
        }
    }

    @Test func closedInMetadataWinsOverAnOpenDescriptor() async throws {
        let dir = try TemporaryDirectory("node")
        let config = try testConfig(dir)
        var id: UInt64 = 0
        do {
            let node = try await StorageNode.start(config)
            id = try await node.shards.newShard(owner: "c").id
            _ = try await node.metadata.updateShardState(id, to: .closed)  // crash before the shard itself closed
        }
        do {
            let node = try await StorageNode.start(config)
            let shard = try await node.shards.shard(id)
            #expect(shard.state == .closed)
            #expect(throws: ShardError.closed) { try shard.put(key1, value: [], clientID: "c") }
        }
    }

    @Test func newShardsGoToTheVolumeWithFewestOpenShards() async throws {
        let dir = try TemporaryDirectory("node")
        do {
            let node = try await StorageNode.start(try testConfig(dir, volumes: 2))
            let volumes = node.volumes.mountedVolumes().map(\.volumeID)
            #expect(volumes.count == 2)
            var placed: [String: Int] = [:]
            var first: [String: UInt64] = [:]
            for _ in 0..<4 {
                let shard = try await node.shards.newShard(owner: "c")
                let volume = try await node.metadata.getShard(shard.id).volumeID
                placed[volume, default: 0] += 1
                if first[volume] == nil { first[volume] = shard.id }
            }
            #expect(placed.values.sorted() == [2, 2])
            // Closing shards on one volume makes it the emptier one.
            let target = volumes[0]
            for listing in try await node.shards.listShards() where listing.record.volumeID == target {
                try await node.shards.closeShard(listing.record.shardID)
            }
            let next = try await node.shards.newShard(owner: "c")
            #expect(try await node.metadata.getShard(next.id).volumeID == target)
        }
    }

    @Test func unknownAndRemoteShardsGiveClearErrors() async throws {
        let dir = try TemporaryDirectory("node")
        do {
            let node = try await StorageNode.start(try testConfig(dir))
            await #expect(throws: ShardManagerError.shardNotFound(42)) { try await node.shards.shard(42) }
            try await node.metadata.createShard(ShardRecord(shardID: 77, volumeID: "elsewhere", ownerClientID: "c", sizeLimit: 1 << 20))
            await #expect(throws: ShardManagerError.shardNotLocal(77, volumeID: "elsewhere")) { try await node.shards.shard(77) }
            await #expect(throws: ShardManagerError.self) { try await node.shards.closeShard(77) }
        }
    }
}

@Suite struct NodeStartTests {
    @Test func oneNodePerDataFolder() async throws {
        let dir = try TemporaryDirectory("node")
        let config = try testConfig(dir)
        do {
            let node = try await StorageNode.start(config)
            await #expect(throws: ConfigurationError.self) {
                _ = try await StorageNode.start(config, lockTimeout: .milliseconds(100))
            }
            _ = node
        }
        // Released with the node.
        let again = try await StorageNode.start(config, lockTimeout: .milliseconds(100))
        #expect(again.volumes.mountedVolumes().count == 1)
    }

    @Test func aCrashedCreateLeavesNoShard() async throws {
        let dir = try TemporaryDirectory("node")
        let config = try testConfig(dir)
        var volumePath = ""
        do {
            let node = try await StorageNode.start(config)
            volumePath = node.volumes.mountedVolumes()[0].mountPath
        }
        // What a crash inside Shard.create leaves: a half-built directory.
        try FileManager.default.createDirectory(atPath: volumePath + "/shard-5.creating", withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: volumePath + "/shard-5.creating/data.mdb", contents: Data([0]))
        do {
            let node = try await StorageNode.start(config)
            #expect(!FileManager.default.fileExists(atPath: volumePath + "/shard-5.creating"))
            let listed = try await node.shards.listShards()
            #expect(listed.isEmpty)
        }
    }
}

/// What change listeners were told, in order.
final class Heard: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func add(_ who: String, _ shard: UInt64, _ keys: [[UInt8]]) {
        lock.withLock { lines.append("\(who) \(shard) " + keys.map { String(decoding: $0, as: UTF8.self) }.joined(separator: ",")) }
    }
    func take() -> [String] { lock.withLock { defer { lines = [] }; return lines.sorted() } }
}
