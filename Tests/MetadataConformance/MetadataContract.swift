import Foundation
import Metadata
import Testing

// The contract every `MetadataStore` keeps (Sources/Metadata/MetadataStore.swift),
// as checks that take any store. Each store's test target runs every check
// against its own store:
//
//     @Test(arguments: MetadataContract.checks)
//     func contract(_ check: MetadataContract.Check) async throws {
//         try await check.run(on: MetadataBackend(...))
//     }
//
// What only one store does (etcd's leases, namespaces, watch resumption; the
// embedded store's files) stays in that store's own tests.

/// Stores of the kind under test, all on one fresh backend (a folder, an etcd server).
public struct MetadataBackend: Sendable {
    /// A new store on the backend: what stores opened before (and closed) wrote is there.
    public let open: @Sendable () async throws -> any MetadataStore
    /// Ends a store `open` made (its connections, leases and watches).
    public let close: @Sendable (any MetadataStore) async -> Void

    public init(open: @escaping @Sendable () async throws -> any MetadataStore,
                close: @escaping @Sendable (any MetadataStore) async -> Void) {
        self.open = open
        self.close = close
    }

    /// Runs `body` with a new store, then closes it.
    func withStore(_ body: (any MetadataStore) async throws -> Void) async throws {
        let store = try await open()
        do {
            try await body(store)
            await close(store)
        } catch {
            await close(store)
            throw error
        }
    }
}

public enum MetadataContract {
    /// One part of the contract, named in the test report.
    public struct Check: Sendable, CustomTestStringConvertible {
        public let name: String
        let body: @Sendable (MetadataBackend) async throws -> Void

        public var testDescription: String { name }

        public func run(on backend: MetadataBackend) async throws { try await body(backend) }
    }

    public static let checks: [Check] = [
        Check(name: "nodes", body: nodes),
        Check(name: "shard IDs are never reused and claims must be above the mark", body: shardIDs),
        Check(name: "shard IDs from concurrent callers are unique and increasing", body: concurrentShardIDs),
        Check(name: "shard lifecycle and transitions", body: shards),
        Check(name: "shards are listed by increasing ID, all or by volume", body: listShards),
        Check(name: "volumes and the guarded primary change", body: volumes),
        Check(name: "the change listener sees every change in order", body: changes),
        Check(name: "views: published at the volume's epoch only, generations increase, acknowledgements", body: views),
    ]

    static func nodes(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            try await store.registerNode(NodeRecord(nodeID: "n1", address: "10.0.0.1:7000"))
            try await store.registerNode(NodeRecord(nodeID: "n2", address: ""))
            try await store.registerNode(NodeRecord(nodeID: "n1", address: "10.0.0.1:7001"))  // re-register updates
            #expect(try await store.getNode("n1") == NodeRecord(nodeID: "n1", address: "10.0.0.1:7001"))
            #expect(try await store.listNodes().map(\.nodeID) == ["n1", "n2"])
            try await store.unregisterNode("n2")
            await #expect(throws: MetadataError.notFound("node n2")) { try await store.getNode("n2") }
            await #expect(throws: MetadataError.notFound("node n2")) { try await store.unregisterNode("n2") }
            await #expect(throws: MetadataError.invalidArgument("a node ID must not be empty")) {
                try await store.registerNode(NodeRecord(nodeID: "", address: ""))
            }
            #expect(try await store.listNodes() == [NodeRecord(nodeID: "n1", address: "10.0.0.1:7001")])
        }
    }

    static func shardIDs(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            #expect(try await store.generateShardID() == 1)
            #expect(try await store.generateShardID() == 2)
            try await store.claimShardID(10)
            await #expect(throws: MetadataError.alreadyExists("shard ID 10 is taken (IDs up to 10 have been handed out)")) {
                try await store.claimShardID(10)
            }
            await #expect(throws: MetadataError.alreadyExists("shard ID 5 is taken (IDs up to 10 have been handed out)")) {
                try await store.claimShardID(5)
            }
            await #expect(throws: MetadataError.invalidArgument("shard ID 0 is reserved")) { try await store.claimShardID(0) }
            #expect(try await store.generateShardID() == 11)
        }
        // Persistent: a store opened afterwards goes on from the mark.
        try await backend.withStore { (reopened: any MetadataStore) async throws in
            #expect(try await reopened.generateShardID() == 12)
        }
    }

    static func concurrentShardIDs(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            let tasks = 8, perTask = 50
            let sequences = try await withThrowingTaskGroup(of: [UInt64].self) { group in
                for _ in 0..<tasks {
                    group.addTask {
                        var ids: [UInt64] = []
                        for _ in 0..<perTask { ids.append(try await store.generateShardID()) }
                        return ids
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            for ids in sequences { #expect(ids == ids.sorted() && Set(ids).count == ids.count, "each caller's IDs increase") }
            let all = sequences.flatMap { $0 }
            #expect(Set(all).count == tasks * perTask, "IDs must be unique")
            #expect(all.max() == UInt64(tasks * perTask))
        }
    }

    static func shards(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            let id = try await store.generateShardID()
            let record = ShardRecord(shardID: id, volumeID: "v1", ownerClientID: "c", sizeLimit: 1 << 20)
            try await store.createShard(record)
            try await store.createShard(record)  // the same record again: a retry whose first try landed
            var otherVolume = record
            otherVolume.volumeID = "v2"
            await #expect(throws: MetadataError.alreadyExists("shard \(id)")) { try await store.createShard(otherVolume) }
            var otherOwner = record
            otherOwner.ownerClientID = "someone-else"
            await #expect(throws: MetadataError.alreadyExists("shard \(id)")) { try await store.createShard(otherOwner) }
            await #expect(throws: MetadataError.invalidArgument("a shard needs an owner client ID")) {
                try await store.createShard(ShardRecord(shardID: 500, volumeID: "v1", ownerClientID: "", sizeLimit: 1))
            }
            #expect(try await store.getShard(id) == record)

            #expect(try await store.updateShardState(id, to: .closed).state == .closed)
            #expect(try await store.updateShardState(id, to: .closed).state == .closed)  // to the same state
            await #expect(throws: MetadataError.conflict("shard \(id) cannot go from closed to open")) {
                try await store.updateShardState(id, to: .open)
            }
            #expect(try await store.updateShardState(id, to: .deleting).state == .deleting)
            await #expect(throws: MetadataError.conflict("shard \(id) cannot go from deleting to closed")) {
                try await store.updateShardState(id, to: .closed)
            }
            #expect(try await store.getShard(id).state == .deleting)
            await #expect(throws: MetadataError.notFound("shard 999")) { try await store.updateShardState(999, to: .closed) }

            try await store.deleteShard(id)
            await #expect(throws: MetadataError.notFound("shard \(id)")) { try await store.getShard(id) }
            await #expect(throws: MetadataError.notFound("shard \(id)")) { try await store.deleteShard(id) }
            // Deleted IDs are never reused.
            await #expect(throws: MetadataError.alreadyExists("shard ID \(id) is taken (IDs up to \(id) have been handed out)")) {
                try await store.claimShardID(id)
            }
        }
    }

    static func listShards(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            for (id, volume) in [(300, "b"), (2, "a"), (1000, "a")] as [(UInt64, String)] {
                try await store.createShard(ShardRecord(shardID: id, volumeID: volume, ownerClientID: "c", sizeLimit: 1))
            }
            #expect(try await store.listShards(volumeID: nil).map(\.shardID) == [2, 300, 1000])  // numeric order
            #expect(try await store.listShards(volumeID: "a").map(\.shardID) == [2, 1000])
            #expect(try await store.listShards(volumeID: "none").isEmpty)
            // A recorded ID moves the counter past it.
            #expect(try await store.generateShardID() == 1001)
            await #expect(throws: MetadataError.alreadyExists("shard ID 1000 is taken (IDs up to 1001 have been handed out)")) {
                try await store.claimShardID(1000)
            }
        }
    }

    static func volumes(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            let v1 = VolumeRecord(volumeID: "v1", primaryNodeID: "n1", mountPath: "/vol/v1")
            try await store.registerVolume(v1)
            try await store.registerVolume(VolumeRecord(volumeID: "v2", primaryNodeID: "n3", backupNodeIDs: ["n1"], mountPath: "/vol/v2"))
            try await store.registerVolume(v1)  // a retry of the same registration
            var otherPrimary = v1
            otherPrimary.primaryNodeID = "n2"
            await #expect(throws: MetadataError.alreadyExists("volume v1")) { try await store.registerVolume(otherPrimary) }
            var otherMount = v1
            otherMount.mountPath = "/elsewhere"
            await #expect(throws: MetadataError.alreadyExists("volume v1")) { try await store.registerVolume(otherMount) }
            await #expect(throws: MetadataError.invalidArgument("a volume ID must not be empty")) {
                try await store.registerVolume(VolumeRecord(volumeID: "", primaryNodeID: "n1", mountPath: "/"))
            }
            #expect(try await store.getVolume("v1") == v1)

            try await store.addBackup(volumeID: "v1", nodeID: "n2")
            try await store.addBackup(volumeID: "v1", nodeID: "n2")  // once only
            try await store.addBackup(volumeID: "v1", nodeID: "n4")
            #expect(try await store.getVolume("v1").backupNodeIDs == ["n2", "n4"])
            #expect(try await store.listVolumes(nodeID: nil).map(\.volumeID) == ["v1", "v2"])
            #expect(try await store.listVolumes(nodeID: "n1").map(\.volumeID) == ["v1", "v2"])  // primary of one, backup of the other
            #expect(try await store.listVolumes(nodeID: "n4").map(\.volumeID) == ["v1"])
            #expect(try await store.listVolumes(nodeID: "n9").isEmpty)

            let moved = try await store.updatePrimary(volumeID: "v1", nodeID: "n2", expectedEpoch: 1)
            #expect(moved == VolumeRecord(volumeID: "v1", primaryNodeID: "n2", backupNodeIDs: ["n4"], mountPath: "/vol/v1", epoch: 2))
            // A node acting on the old epoch loses.
            await #expect(throws: MetadataError.conflict("volume v1 is at epoch 2, not 1")) {
                try await store.updatePrimary(volumeID: "v1", nodeID: "n4", expectedEpoch: 1)
            }
            #expect(try await store.getVolume("v1") == moved)

            let facts = VolumeFacts(capacityBytes: 64 << 20, freeBytes: 1 << 20, provider: "loop", type: "loop", zone: "z",
                                    attachments: [VolumeFacts.Attachment(instanceID: "i", role: "primary", state: "attached", device: "/dev/loop0")],
                                    updatedAt: 5)
            try await store.updateVolumeFacts("v1", facts, ifPrimary: nil)
            #expect(try await store.getVolume("v1").facts == facts)
            #expect(try await store.getVolume("v1").epoch == moved.epoch)  // facts are not a change of primary
            await #expect(throws: MetadataError.notFound("volume v9")) { try await store.updateVolumeFacts("v9", facts, ifPrimary: nil) }
            // A node that is not (or no longer) the primary cannot write them.
            var other = facts
            other.attachments = [VolumeFacts.Attachment(instanceID: "i-old", role: "primary", state: "attached", device: "/dev/loop1")]
            await #expect(throws: MetadataError.conflict("volume v1's primary is n2, not n1")) {
                try await store.updateVolumeFacts("v1", other, ifPrimary: "n1")
            }
            #expect(try await store.getVolume("v1").facts == facts)
            try await store.updateVolumeFacts("v1", other, ifPrimary: "n2")
            #expect(try await store.getVolume("v1").facts == other)
            try await store.updateVolumeFacts("v1", facts, ifPrimary: nil)
            try await store.removeBackup(volumeID: "v1", nodeID: "n4")
            #expect(try await store.getVolume("v1").backupNodeIDs.isEmpty)
            try await store.removeBackup(volumeID: "v2", nodeID: "n1")
            #expect(try await store.getVolume("v2").backupNodeIDs.isEmpty)
            try await store.unregisterVolume("v2")
            await #expect(throws: MetadataError.notFound("volume v2")) { try await store.getVolume("v2") }
            await #expect(throws: MetadataError.notFound("volume v2")) { try await store.unregisterVolume("v2") }
            await #expect(throws: MetadataError.notFound("volume v9")) { try await store.addBackup(volumeID: "v9", nodeID: "n1") }
            await #expect(throws: MetadataError.notFound("volume v9")) {
                try await store.updatePrimary(volumeID: "v9", nodeID: "n1", expectedEpoch: 1)
            }
            #expect(try await store.listVolumes(nodeID: nil).map(\.volumeID) == ["v1"])
        }
    }

    static func views(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            try await store.registerNode(NodeRecord(nodeID: "b", address: ""))
            try await store.registerVolume(VolumeRecord(volumeID: "v", primaryNodeID: "p", backupNodeIDs: ["b"], mountPath: "/v"))
            #expect(try await store.getViews("v") == nil)
            let events = EventCollector(store.changes())
            defer { events.cancel() }
            let g1 = VolumeViews(volumeID: "v", epoch: 1, generation: 1, publishedAt: 10,
                                 shards: [ShardSnapshotRecord(shardID: 3, takenIn: 1, snapshot: Data([1, 2, 250]))])
            try await store.publishViews(g1)
            #expect(try await store.getViews("v") == g1)
            // Generations only move on.
            await #expect(throws: MetadataError.conflict("views of volume v: generation 1 is not past 1")) {
                try await store.publishViews(g1)
            }
            var g2 = g1
            g2.generation = 2
            g2.shards = []
            try await store.publishViews(g2)
            // A deposed primary publishes nothing.
            _ = try await store.updatePrimary(volumeID: "v", nodeID: "b", expectedEpoch: 1)
            var stale = g2
            stale.generation = 3
            await #expect(throws: MetadataError.conflict("views of volume v published at epoch 1; the volume is at 2")) {
                try await store.publishViews(stale)
            }
            #expect(try await store.getViews("v") == g2)
            // The new primary starts its own generations at any number.
            let fresh = VolumeViews(volumeID: "v", epoch: 2, generation: 1, publishedAt: 20, shards: [])
            try await store.publishViews(fresh)
            await #expect(throws: MetadataError.notFound("volume w")) {
                try await store.publishViews(VolumeViews(volumeID: "w", epoch: 1, generation: 1, publishedAt: 0, shards: []))
            }

            try await store.acknowledgeViews(volumeID: "v", nodeID: "b", generation: 2)
            try await store.acknowledgeViews(volumeID: "v", nodeID: "c", generation: 1)
            try await store.acknowledgeViews(volumeID: "v", nodeID: "b", generation: 4)
            #expect(try await store.viewAcknowledgements("v") == ["b": 4, "c": 1])
            #expect(try await store.viewAcknowledgements("vv").isEmpty)  // a prefix of no other volume's
            let expected: [MetadataEvent] = [
                .viewsPublished(g1), .viewsPublished(g2), .volumeUpdated(try await store.getVolume("v")), .viewsPublished(fresh),
                .viewsAcknowledged(volumeID: "v", nodeID: "b", generation: 2),
                .viewsAcknowledged(volumeID: "v", nodeID: "c", generation: 1),
                .viewsAcknowledged(volumeID: "v", nodeID: "b", generation: 4),
            ]
            #expect(await events.wait(for: expected.count) == expected)
        }
    }

    static func changes(_ backend: MetadataBackend) async throws {
        try await backend.withStore { store in
            _ = try await store.listNodes()  // a store that watches starts after what is there now
            let events = EventCollector(store.changes())
            defer { events.cancel() }
            let node = NodeRecord(nodeID: "n", address: "a:1")
            let shard = ShardRecord(shardID: 5, volumeID: "v", ownerClientID: "c", sizeLimit: 9)
            try await store.registerNode(node)
            try await store.createShard(shard)
            var closed = shard
            closed.state = .closed
            _ = try await store.updateShardState(5, to: .closed)
            try await store.deleteShard(5)
            let volume = VolumeRecord(volumeID: "v", primaryNodeID: "n", mountPath: "/m")
            try await store.registerVolume(volume)
            let moved = try await store.updatePrimary(volumeID: "v", nodeID: "m", expectedEpoch: 1)
            try await store.unregisterVolume("v")
            try await store.unregisterNode("n")
            _ = try await store.generateShardID()  // the counter is not an event
            let expected: [MetadataEvent] = [
                .nodeRegistered(node), .shardCreated(shard), .shardUpdated(closed), .shardDeleted(shardID: 5),
                .volumeRegistered(volume), .volumeUpdated(moved), .volumeUnregistered(volumeID: "v"),
                .nodeUnregistered(nodeID: "n"),
            ]
            let seen = await events.wait(for: expected.count)
            try await Task.sleep(for: .milliseconds(200))  // nothing more arrives
            #expect(seen == expected)
            #expect(events.all == expected)
        }
    }
}

/// Collects a store's change events in the background.
public final class EventCollector: @unchecked Sendable {
    private let lock = NSLock()
    private var events: [MetadataEvent] = []
    private var task: Task<Void, Never>?

    public init(_ stream: AsyncStream<MetadataEvent>) {
        task = Task { [weak self] in
            for await event in stream { self?.lock.withLock { self?.events.append(event) } }
        }
    }

    public var all: [MetadataEvent] { lock.withLock { events } }

    /// Waits until `count` events arrived (or the timeout passed) and returns them.
    public func wait(for count: Int, timeout: Duration = .seconds(10)) async -> [MetadataEvent] {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while all.count < count && clock.now < deadline { try? await Task.sleep(for: .milliseconds(20)) }
        return all
    }

    public func wait(until predicate: ([MetadataEvent]) -> Bool, timeout: Duration = .seconds(10)) async -> [MetadataEvent] {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while !predicate(all) && clock.now < deadline { try? await Task.sleep(for: .milliseconds(20)) }
        return all
    }

    public func cancel() { task?.cancel() }
}
