import Foundation
import Logging
import Metadata
import ShardStore
@testable import ShardNode
import TestSupport
import Testing
import Volumes

/// `Failover`'s bookkeeping, driven event by event (`handle`) on an embedded
/// node whose own failover is stopped, with take-overs the test holds and lets
/// go: the orders of events the multi-node tests cannot time.
@Suite struct FailoverTests {
    /// What the test sees of its `Failover`: take-overs (each "mounts" a folder
    /// read-write) and settlings (`writing` of each).
    struct Seen: Sendable {
        var takeOvers = 0
        var settled: [Bool] = []
    }

    /// Holds take-overs until opened. A waiter does not wake when its task is
    /// cancelled (as a take-over's does when `stop` runs): it waits for `open`.
    final class Gate: Sendable {
        private let state = Locked((open: true, waiting: [CheckedContinuation<Void, Never>]()))
        func close() { state.withLock { $0.open = false } }
        func open() {
            let waiting = state.withLock { state in
                defer { state = (true, []) }
                return state.waiting
            }
            for waiter in waiting { waiter.resume() }
        }
        func pass() async {
            await withCheckedContinuation { continuation in
                let go = state.withLock { state in
                    if !state.open { state.waiting.append(continuation) }
                    return state.open
                }
                if go { continuation.resume() }
            }
        }
    }

    /// A node (its own failover stopped), a volume "vol-x" on primary "node-o"
    /// that this node backs, and a `Failover` for this node whose take-overs pass
    /// `gate`; `settle` runs when a promotion of the volume ends. The failover
    /// is stopped (the gate opened) however `body` ends.
    static func withFailover(_ name: String, logger: Logger = Logger(label: "shardfs.failover"),
                             settle: @escaping @Sendable (StorageNode, Failover, _ writing: Bool) async -> Void = { _, _, _ in },
                             _ body: (StorageNode, Failover, Locked<Seen>, Gate) async throws -> Void) async throws {
        let dir = try TemporaryDirectory(name)
        defer { dir.remove() }
        let (node, folder) = try await backupOfVolumeX(in: dir)
        let seen = Locked(Seen()), gate = Gate()
        let made = Locked<Failover?>(nil)
        let failover = Failover(nodeID: node.configuration.node.nodeID, metadata: node.metadata, shards: node.shards,
                                failoverDelay: .zero,
                                takeOverVolume: { volumeID, _ in
                                    seen.withLock { $0.takeOvers += 1 }
                                    await gate.pass()
                                    return MountedVolume(volumeID: volumeID, mountPath: folder, readOnly: false)
                                },
                                settle: { _, writing in
                                    seen.withLock { $0.settled.append(writing) }
                                    if let failover = made.value { await settle(node, failover, writing) }
                                },
                                logger: logger)
        made.set(failover)
        do {
            try await body(node, failover, seen, gate)
        } catch {
            gate.open()
            await failover.stop()
            throw error
        }
        gate.open()
        await failover.stop()
    }

    /// A node whose own failover is stopped, backing "vol-x" (a folder of `dir`)
    /// of primary "node-o".
    static func backupOfVolumeX(in dir: TemporaryDirectory) async throws -> (StorageNode, folder: String) {
        let node = try await StorageNode.start(try testConfig(dir))
        await node.failover.stop()
        let folder = dir.sub("vol-x")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try await node.metadata.registerVolume(VolumeRecord(volumeID: "vol-x", primaryNodeID: "node-o",
                                                            backupNodeIDs: [node.configuration.node.nodeID], mountPath: folder))
        return (node, folder)
    }

    /// Names `nodeID` primary of "vol-x" in the record, as `shardfs volume promote` does.
    static func promote(_ node: StorageNode, to nodeID: String) async throws -> VolumeRecord {
        let volume = try await node.metadata.getVolume("vol-x")
        return try await node.metadata.updatePrimary(volumeID: "vol-x", nodeID: nodeID, expectedEpoch: volume.epoch)
    }

    /// A promotion asked for while another of the same volume runs is not
    /// dropped: it runs once that one has ended. Here the first ends without the
    /// volume (another node was named primary meanwhile), and the request made
    /// while it settles is what makes this node the primary (epoch 4).
    @Test func aPromotionAskedForWhileOneRunsRunsAfterIt() async throws {
        let askedAgain = Locked(false)
        try await Self.withFailover("failover-again", settle: { node, failover, writing in
            let first = askedAgain.withLock { asked in
                defer { asked = true }
                return !asked
            }
            guard !writing, first else { return }
            guard let again = try? await Self.promote(node, to: node.configuration.node.nodeID) else { return }
            await failover.handle(.volumeUpdated(again))
        }) { node, failover, seen, gate in
            gate.close()
            await failover.handle(.volumeUpdated(try await Self.promote(node, to: node.configuration.node.nodeID)))
            #expect(await waitUntil(5) { seen.value.takeOvers == 1 })
            _ = try await Self.promote(node, to: "node-o")  // epoch 3: the first take-over is lost
            gate.open()
            #expect(await waitUntil(10) { node.shards.primaryEpoch("vol-x") == 4 },
                    "the promotion asked for during the first was dropped: \(seen.value)")
            #expect(seen.value.takeOvers == 2)
            #expect(await waitUntil(5) { seen.value.settled == [false, true] }, "\(seen.value)")
        }
    }

    /// `stop` returns only once a take-over under way has ended, so that the
    /// node's clean stop that follows releases what that take-over mounted;
    /// the take-over does not go on to write, and says so.
    @Test func stopWaitsForATakeOverUnderWay() async throws {
        let records = Locked([CapturedLog.Record]())
        let logger = Logger(label: "test") { _ in CapturedLog(records: records) }
        try await Self.withFailover("failover-stop", logger: logger) { node, failover, seen, gate in
            gate.close()
            await failover.handle(.volumeUpdated(try await Self.promote(node, to: node.configuration.node.nodeID)))
            #expect(await waitUntil(5) { seen.value.takeOvers == 1 })
            let stopped = Locked(false)
            let stopping = Task {
                await failover.stop()
                stopped.set(true)
            }
            try await Task.sleep(for: .milliseconds(300))
            #expect(!stopped.value, "stop returned while a take-over was under way")
            gate.open()
            await stopping.value
            // The take-over it waited for ended without writing: a stopping node
            // does not become a primary (the record still names it; its lease,
            // gone with the node, lets a backup take the volume).
            #expect(seen.value.takeOvers == 1)
            #expect(node.shards.primaryEpoch("vol-x") == nil)
            #expect(records.value.contains { $0.message.contains("stopped while taking over") }, "\(records.value.map(\.message))")
        }
    }

    /// An event handled after `stop` (one its event loop was already handling
    /// when `stop` ran) starts no promotion: nothing would stop or await it.
    @Test func aStoppedFailoverStartsNoPromotion() async throws {
        try await Self.withFailover("failover-stopped") { node, failover, seen, _ in
            await failover.stop()
            await failover.handle(.volumeUpdated(try await Self.promote(node, to: node.configuration.node.nodeID)))
            try await Task.sleep(for: .milliseconds(300))
            #expect(seen.value.takeOvers == 0)
            #expect(node.shards.primaryEpoch("vol-x") == nil)
        }
    }
}

/// A store that answers through `base`, except that listing a volume's shards
/// fails (unavailable, as etcd down) while `listingFailures` lasts.
final class ListingOutage: MetadataStore, Sendable {
    let base: any MetadataStore
    let listingFailures: Locked<Int>
    let listings = Locked(0)

    init(_ base: any MetadataStore, failures: Int) {
        self.base = base
        listingFailures = Locked(failures)
    }

    func listShards(volumeID: String?) async throws -> [ShardRecord] {
        listings.withLock { $0 += 1 }
        let fail = listingFailures.withLock { left in
            defer { left = max(0, left - 1) }
            return left > 0
        }
        if fail { throw MetadataError.unavailable("metadata down (test)") }
        return try await base.listShards(volumeID: volumeID)
    }

    func registerNode(_ node: NodeRecord) async throws { try await base.registerNode(node) }
    func unregisterNode(_ nodeID: String) async throws { try await base.unregisterNode(nodeID) }
    func getNode(_ nodeID: String) async throws -> NodeRecord { try await base.getNode(nodeID) }
    func listNodes() async throws -> [NodeRecord] { try await base.listNodes() }
    func generateShardID() async throws -> UInt64 { try await base.generateShardID() }
    func claimShardID(_ id: UInt64) async throws { try await base.claimShardID(id) }
    func createShard(_ shard: ShardRecord) async throws { try await base.createShard(shard) }
    func getShard(_ shardID: UInt64) async throws -> ShardRecord { try await base.getShard(shardID) }
    func updateShardState(_ shardID: UInt64, to state: ShardRecordState) async throws -> ShardRecord {
        try await base.updateShardState(shardID, to: state)
    }
    func deleteShard(_ shardID: UInt64) async throws { try await base.deleteShard(shardID) }
    func registerVolume(_ volume: VolumeRecord) async throws { try await base.registerVolume(volume) }
    func getVolume(_ volumeID: String) async throws -> VolumeRecord { try await base.getVolume(volumeID) }
    func listVolumes(nodeID: String?) async throws -> [VolumeRecord] { try await base.listVolumes(nodeID: nodeID) }
    func updatePrimary(volumeID: String, nodeID: String, expectedEpoch: UInt64) async throws -> VolumeRecord {
        try await base.updatePrimary(volumeID: volumeID, nodeID: nodeID, expectedEpoch: expectedEpoch)
    }
    func updateVolumeFacts(_ volumeID: String, _ facts: VolumeFacts, ifPrimary nodeID: String?) async throws {
        try await base.updateVolumeFacts(volumeID, facts, ifPrimary: nodeID)
    }
    func addBackup(volumeID: String, nodeID: String) async throws { try await base.addBackup(volumeID: volumeID, nodeID: nodeID) }
    func removeBackup(volumeID: String, nodeID: String) async throws {
        try await base.removeBackup(volumeID: volumeID, nodeID: nodeID)
    }
    func unregisterVolume(_ volumeID: String) async throws { try await base.unregisterVolume(volumeID) }
    func publishViews(_ views: VolumeViews) async throws { try await base.publishViews(views) }
    func getViews(_ volumeID: String) async throws -> VolumeViews? { try await base.getViews(volumeID) }
    func acknowledgeViews(volumeID: String, nodeID: String, generation: UInt64) async throws {
        try await base.acknowledgeViews(volumeID: volumeID, nodeID: nodeID, generation: generation)
    }
    func viewAcknowledgements(_ volumeID: String) async throws -> [String: UInt64] { try await base.viewAcknowledgements(volumeID) }
    func changes() -> AsyncStream<MetadataEvent> { base.changes() }
}

extension FailoverTests {
    /// A take-over whose restore fails part-way (the metadata down while the
    /// volume's shards are listed) does not leave the node primary of a volume
    /// whose shards it does not serve: it tries again, and then serves them.
    @Test func aTakeOverWhoseRestoreFailsIsTriedAgain() async throws {
        let dir = try TemporaryDirectory("failover-restore")
        defer { dir.remove() }
        let (node, folder) = try await Self.backupOfVolumeX(in: dir)
        let me = node.configuration.node.nodeID
        // A shard the old primary wrote on the volume.
        let id = try await node.metadata.generateShardID()
        try await node.metadata.createShard(ShardRecord(shardID: id, volumeID: "vol-x", ownerClientID: "c", sizeLimit: 4 << 20))
        try {
            let written = try Shard.create(at: folder + "/" + ShardManager.directoryName(id), id: id, owner: "c")
            try written.put(key1, value: [7], clientID: "c")
        }()

        let outage = ListingOutage(node.metadata, failures: 1)
        let shards = ShardManager(nodeID: me, metadata: outage, volumes: node.volumes, defaultSizeLimit: 4 << 20)
        let failover = Failover(nodeID: me, metadata: outage, shards: shards, failoverDelay: .zero,
                                takeOverVolume: { volumeID, _ in MountedVolume(volumeID: volumeID, mountPath: folder, readOnly: false) })
        let volume = try await node.metadata.getVolume("vol-x")
        await failover.handle(.volumeUpdated(try await Self.promote(node, to: me)))
        let served = await waitUntil(10) { shards.localShard(id) != nil }
        #expect(served, "the node is primary (epoch \(String(describing: shards.primaryEpoch("vol-x")))) without serving shard \(id)")
        #expect(shards.primaryEpoch("vol-x") == volume.epoch + 1)
        #expect(outage.listings.value >= 2)
        #expect(try shards.localShard(id)?.get(key1).value == [7])
        await failover.stop()
    }
}
