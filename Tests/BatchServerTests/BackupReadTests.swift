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

    @Test func aViewReadThatEndsUnderAnotherLeaseIsAnsweredWithoutItsBytes() async throws {
        let dir = try TemporaryDirectory("backup-read")
        defer { dir.remove() }
        var config = Configuration()
        config.node.dataDir = dir.sub("a")
        try config.set("cloud.volume_root", dir.sub("volumes"))
        let a = try await StorageNode.start(config)
        let shard = try await a.shards.newShard(owner: "c")
        try shard.put(try EntryKey("k"), value: Array("committed".utf8), clientID: "c")
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
        let server = try await BatchServer.start(serverConfig, shards: bShards)
        let client = try await ShardFSClient.connect(to: .unix(path: dir.sub("b.sock")))
        do {
            #expect(try await client.get(shard: shard.id, key: Array("k".utf8)).value == Array("committed".utf8))
            // The lease moves on during the next read: its check before the read
            // sees the lease the views were loaded under, the one after does not.
            lease.turn(after: 1)
            do {
                let got = try await client.get(shard: shard.id, key: Array("k".utf8))
                Issue.record("a read that ended under another lease was answered: \(got.value.count) bytes")
            } catch ClientError.notShardLeader {
            }
        } catch {
            Issue.record("\(error)")
        }
        await client.close()
        await server.shutdown()
        await a.stopRoles()
    }
}
