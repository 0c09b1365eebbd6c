import Foundation
import TestSupport
import Testing

@Suite struct TwoMountTests {
    /// Two nodes on one machine, each with its own data folder, one etcd: each
    /// mount refuses `mkdir shard-N` for an N the other node holds.
    @Test func mkdirOfAShardTheOtherNodeHoldsIsEEXIST() async throws {
        try await withLocalEtcd { etcd in
            let a = try MountFixture(options: "client_id=a"), b = try MountFixture(options: "client_id=b")
            do {
                for (fixture, node) in [(a, "node-a"), (b, "node-b")] {
                    let yaml = try NodeConfigFile(nodeID: node, etcd: .init(endpoints: [etcd.endpoint], namespace: "/two-mounts"))
                        .write(to: fixture.dir.sub("node.yaml"))
                    try await fixture.mount("config=\(yaml)")
                }
                try await a.ok("mkdir shard-5 && echo from-a > shard-5/f")
                #expect(try await b.errnoOf("os.mkdir('shard-5')") == "EEXIST")
                #expect(try await b.errnoOf("os.mkdir('shard-3')") == "EEXIST")  // below the shared high-water mark
                try await b.ok("mkdir shard-6")
                #expect(try await a.errnoOf("os.mkdir('shard-6')") == "EEXIST")
                // Each mount shows the shards on its own volumes.
                #expect(try await a.ok("ls") == "shard-5\n")
                #expect(try await b.ok("ls") == "shard-6\n")
                // Both nodes' shards are in the shared listing, with the node holding each.
                await a.unmount()
                let listing = try await runAsync(shardfs, ["shard", "list", "--data-dir", a.data, "--config", a.dir.sub("node.yaml"),
                                                           "--log-level", "error"])
                #expect(listing.stdout.contains("node-a") && listing.stdout.contains("node-b"), "\(listing.stdout)\(listing.stderr)")
            } catch {
                await a.unmount()
                await b.unmount()
                throw error
            }
            await a.unmount()
            await b.unmount()
        }
    }
}
