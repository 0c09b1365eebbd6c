import BatchServer
import Foundation
import Metadata
import ShardFSClient
import ShardNode
import ShardStore
import Synchronization
import Testing
import TestSupport
import Volumes

/// The socket service on a backup: reads are answered from views, and a read
/// that ends after the backup stopped holding the lease its views were loaded
/// under is answered NOT_SHARD_LEADER, without its bytes (docs/BACKUP-VIEWS.md).
@Suite struct BackupReadTests {
    /// The lease a backup's views see, turned over on demand at a chosen read of it.
    final class TestLease: Sendable {
        private let state = Mutex<(lease: UInt64, turnAfter: Int?)>((1, nil))
        /// The lease now; the read `turnAfter` counts down to moves it on.
        func read() -> UInt64? {
            state.withLock { s in
                if let n = s.turnAfter {
                    if n == 0 { s.lease += 1; s.turnAfter = nil } else { s.turnAfter = n - 1 }
                }
                return s.lease
            }
        }
        /// The lease moves on at the `reads + 1`-th read from now.
        func turn(after reads: Int) { state.withLock { $0.turnAfter = reads } }
    }

    /// Node A's shard, filled by `populate` and published to node B, a backup in
    /// this process whose socket service (`tweak`) answers from its views;
    /// `body` gets a client of B, the shard's ID and B's lease.
    func withBackupReads(_ tweak: (inout BatchServerConfiguration) -> Void = { _ in }, populate: (Shard) throws -> Void,
                         _ body: (ShardFSClient, UInt64, TestLease) async throws -> Void) async throws {
        let dir = try TemporaryDirectory("backup-read")
        defer { dir.remove() }
        var config = Configuration()
        config.node.dataDir = dir.sub("a")
        try config.set("cloud.volume_root", dir.sub("volumes"))
        let a = try await StorageNode.start(config)
        let shard = try await a.shards.newShard(owner: "c")
        try populate(shard)
        guard let volume = a.volumes.mountedVolumes().first?.volumeID else { Issue.record("node-a mounted no volume"); return }
        try await a.metadata.addBackup(volumeID: volume, nodeID: "node-b")
        await a.publisher.checkpoint()

        // Node B: a backup of the volume in this process, whose lease the test turns over.
        let lease = TestLease()
        let bVolumes = LocalVolumeManager(provider: FolderCloudProvider(volumeRoot: dir.sub("volumes")),
                                          volumeRoot: dir.sub("volumes"), instanceID: "host-b")
        _ = try await bVolumes.mount(volume, readOnly: true)
        let views = BackupViews(nodeID: "node-b", metadata: a.metadata, volumes: bVolumes, leaseGeneration: { lease.read() })
        views.updatesHeld = true  // only this test's reads ask for the lease
        try await views.start()
        defer { views.stop() }
        let bShards = ShardManager(nodeID: "node-b", metadata: a.metadata, volumes: bVolumes, defaultSizeLimit: 1 << 30)
        bShards.views = views
        var serverConfig = BatchServerConfiguration()
        serverConfig.tcpAddress = nil  // the Unix socket only: no port shared with other tests
        serverConfig.unixSocketPath = dir.sub("b.sock")
        serverConfig.engineThreads = 1
        tweak(&serverConfig)
        let server = try await BatchServer.start(serverConfig, shards: bShards)
        let client = try await ShardFSClient.connect(to: .unix(path: dir.sub("b.sock")))
        do {
            try await body(client, shard.id, lease)
        } catch {
            Issue.record("\(error)")
        }
        await client.close()
        await server.shutdown()
        await a.stopRoles()
    }

    @Test func aViewReadThatEndsUnderAnotherLeaseIsAnsweredWithoutItsBytes() async throws {
        try await withBackupReads(populate: { try $0.put(try EntryKey("k"), value: Array("committed".utf8), clientID: "c") }) {
            client, shard, lease in
            #expect(try await client.get(shard: shard, key: Array("k".utf8)).value == Array("committed".utf8))
            // The lease moves on during the next read: its check before the read
            // sees the lease the views were loaded under, the one after does not.
            lease.turn(after: 1)
            do {
                let got = try await client.get(shard: shard, key: Array("k".utf8))
                Issue.record("a read that ended under another lease was answered: \(got.value.count) bytes")
            } catch ClientError.notShardLeader {
            }
        }
    }

    /// A BatchGet from a view is answered whole from one snapshot: an item that
    /// would take the answer past what one engine job gathers (`answerBudget`)
    /// is refused INVALID_ARGUMENT, to be asked for alone, and a value larger
    /// than an answer carries (`largestValue`) is refused by a Get too.
    @Test func aViewAnswerPastTheBudgetRefusesItemsToBeAskedAlone() async throws {
        let values = (0..<3).map { n in [UInt8](repeating: UInt8(n + 1), count: 700 << 10) }
        try await withBackupReads({ $0.answerBudget = 1 << 20; $0.largestValue = 800 << 10 }, populate: { shard in
            for (n, value) in values.enumerated() { try shard.put(try EntryKey("k\(n)"), value: value, clientID: "c") }
            try shard.put(try EntryKey("huge"), value: [UInt8](repeating: 9, count: 900 << 10), clientID: "c")
        }) { client, shard, _ in
            let items = try await client.batchGetAll(shard: shard, keys: (0..<3).map { Array("k\($0)".utf8) })
            #expect(items.map(\.status.code) == [.ok, .invalidArgument, .invalidArgument])
            #expect(items.first?.entry?.value == values[0])
            for n in 1..<3 { #expect(try await client.get(shard: shard, key: Array("k\(n)".utf8)).value == values[n]) }
            #expect(await statusCode { _ = try await client.get(shard: shard, key: Array("huge".utf8)) } == .invalidArgument)
        }
    }
}
