import Foundation
import Metadata
import ShardNode
import ShardStore
import TestSupport
import Testing

/// Two nodes on one machine, each with its own data folder, sharing one etcd.
@Suite struct TwoNodeTests {
    func config(_ dir: TemporaryDirectory, node: String, etcd: LocalEtcd) throws -> Configuration {
        var config = Configuration()
        try config.set("node.node_id", node)
        try config.set("node.data_dir", dir.sub(node))
        try config.set("metadata.type", "etcd")
        try config.set("metadata.endpoints", etcd.endpoint)
        try config.set("metadata.namespace", "/two-nodes")
        try config.set("metadata.retry.deadline_ms", "2000")
        try config.set("shard.size_limit", "4MiB")
        return config
    }

    @Test func nodesShareIDsAndListingsButNotShards() async throws {
        try await withLocalEtcd { etcd in
            let dir = try TemporaryDirectory("two-nodes")
            let a = try await StorageNode.start(try config(dir, node: "node-a", etcd: etcd))
            let b = try await StorageNode.start(try config(dir, node: "node-b", etcd: etcd))

            // IDs from both nodes at once: all different, each node's increasing.
            async let fromA: [UInt64] = (0..<10).asyncMap { _ in try await a.shards.newShard(owner: "ca").id }
            async let fromB: [UInt64] = (0..<10).asyncMap { _ in try await b.shards.newShard(owner: "cb").id }
            let (idsA, idsB) = try await (fromA, fromB)
            #expect(Set(idsA + idsB).count == 20)
            #expect(idsA == idsA.sorted() && idsB == idsB.sorted())

            // Each sees the other's shards, with the node that holds them.
            for node in [a, b] {
                let listing = try await node.shards.listShards()
                #expect(Set(listing.map(\.record.shardID)) == Set(idsA + idsB))
                for row in listing {
                    #expect(row.primaryNodeID == (idsA.contains(row.record.shardID) ? "node-a" : "node-b"))
                    // Figures only for the node's own shards.
                    #expect((row.stats != nil) == (row.primaryNodeID == node.configuration.node.nodeID))
                }
            }

            // An ID the other node holds is refused; the other's shard is not local here.
            let taken = idsA[0]
            await #expect(throws: ShardManagerError.shardIDTaken(taken)) { try await b.shards.newShard(owner: "cb", id: taken) }
            guard let volumeA = a.volumes.mountedVolumes().first?.volumeID else { Issue.record("node-a has no volume"); return }
            await #expect(throws: ShardManagerError.shardNotLocal(taken, volumeID: volumeA)) { try await b.shards.shard(taken) }
            let next = (idsA + idsB).max()! + 5
            let explicit = try await b.shards.newShard(owner: "cb", id: next)
            #expect(explicit.id == next)
            await #expect(throws: ShardManagerError.shardIDTaken(next)) { try await a.shards.newShard(owner: "ca", id: next) }
        }
    }
}

extension Range where Bound == Int {
    /// Runs `transform` for each element in order, awaiting each.
    func asyncMap<T>(_ transform: (Int) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for i in self { out.append(try await transform(i)) }
        return out
    }
}
