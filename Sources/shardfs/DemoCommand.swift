import ArgumentParser
import Foundation
import ShardNode
import ShardStore

/// The README's first command runs this: a short tour of the engine on
/// embedded defaults (one folder volume, embedded metadata) in --data-dir.
struct DemoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Start a node on embedded defaults and show the shard engine at work.")
    @OptionGroup var node: NodeOptions

    func run() async throws {
        let node = try await node.startNode(creatingDataFolder: true)
        let config = node.configuration
        emit("node \(config.node.nodeID): data in \(config.node.dataDir), volumes under \(config.resolvedVolumeRoot)")
        for volume in node.volumes.mountedVolumes() {
            emit("  volume \(volume.volumeID) at \(volume.mountPath)\(volume.readOnly ? " (read-only)" : "")")
        }

        let client = "demo-client"
        let shard = try await node.shards.newShard(owner: client)
        emit("\nNewShard for \(client): shard \(shard.id) at \(shard.path)")

        let items = (1...1000).map { i in
            EntryWrite(key: EntryKey(entryID: UInt32(i)), value: Array("entry \(i) of shard \(shard.id)".utf8),
                       indexes: [IndexPair(name: "parity", value: i % 2 == 0 ? "even" : "odd")])
        }
        let started = ContinuousClock.now
        let statuses = try shard.batchPut(items, clientID: client)
        emit("BatchPut of \(items.count) entries (one durable transaction): \(statuses.compactMap { $0 }.count) failed, took \(ContinuousClock.now - started)")

        let entry = try shard.get(EntryKey(entryID: 42))
        emit("Get 42: \"\(String(decoding: entry.value, as: UTF8.self))\" indexes \(entry.indexes.map { "\($0.name)=\(String(decoding: $0.value, as: UTF8.self))" })")
        let page = try shard.list(limit: 5)
        emit("First keys in order: \(page.map(\.key.description).joined(separator: " "))")
        let odd = try shard.find(indexName: "parity", value: Array("odd".utf8))
        emit("Find parity=odd: \(odd.count) entries")

        do {
            try shard.put(EntryKey("intruder"), value: [1], clientID: "someone-else")
        } catch {
            emit("Put by another client: \(error)")
        }

        try await node.shards.closeShard(shard.id)
        do {
            try shard.put(EntryKey("late"), value: [1], clientID: client)
        } catch {
            emit("Put after CloseShard: \(error)")
        }

        let stats = try shard.stats()
        emit("Stats: \(stats.entries) entries, \(ByteSize.format(stats.usedBytes)) used of \(ByteSize.format(stats.limitBytes)), \(stats.state.rawValue)")

        emit("\nShards on this node:")
        for listing in try await node.shards.listShards() {
            emit("  shard \(listing.record.shardID): \(listing.record.state.rawValue), owner \(listing.record.ownerClientID), volume \(listing.record.volumeID), \(listing.stats?.entries ?? 0) entries")
        }
        emit("\nWhile no node runs on it: shardfs shard list --data-dir \(config.node.dataDir)   and   shardfs get \(shard.id) 42 --data-dir \(config.node.dataDir)")
    }
}
