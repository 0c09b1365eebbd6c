import Foundation
import LMDB
import NodeSupport

/// The metadata store for a single node: an LMDB environment in a folder of the
/// node's data directory. Every change is one durable transaction. LMDB's writer
/// lock serialises writers across threads *and* processes, so IDs stay unique and
/// increasing even when two processes open the same folder.
///
/// The change listener sees the changes made through this instance.
public final class EmbeddedMetadataStore: MetadataStore, @unchecked Sendable {
    public let path: String
    private let env: Environment
    private let nodes: Database
    private let shards: Database
    private let volumes: Database
    private let counters: Database
    /// "views/<volume>" → VolumeViews; "acks/<volume>/<node>" → generation (decimal).
    private let views: Database
    private let broadcaster = ChangeBroadcaster()

    private static let shardCounterKey = Array("shardID".utf8)

    /// Opens (creating if needed) the store in the directory `path`.
    public init(path: String) throws {
        do {
            try makeFolderDurably(path)
            let fresh = !FileManager.default.fileExists(atPath: path + "/data.mdb")
            var options = EnvironmentOptions(mapSize: 256 << 20)
            options.maxDatabases = 5
            // An instance of this process being let go (a node restarted in it) is waited for.
            env = try Environment.open(path: path, options: options, waitingUpTo: .seconds(2))
            nodes = try env.openDatabase("nodes", flags: .create)
            shards = try env.openDatabase("shards", flags: .create)
            volumes = try env.openDatabase("volumes", flags: .create)
            counters = try env.openDatabase("counters", flags: .create)
            views = try env.openDatabase("views", flags: .create)
            // LMDB syncs data.mdb's contents, never the folder entry that names it.
            if fresh { try syncFolder(path) }
        } catch {
            throw MetadataError.failed("cannot open the embedded metadata store at \(path): \(error)")
        }
        self.path = path
    }

    deinit { broadcaster.finish() }

    // MARK: Nodes

    public func registerNode(_ node: NodeRecord) async throws {
        guard !node.nodeID.isEmpty else { throw MetadataError.invalidArgument("a node ID must not be empty") }
        try await write { txn in try self.store(txn, self.nodes, key: node.nodeID, node) }
        broadcaster.publish(.nodeRegistered(node))
    }

    public func unregisterNode(_ nodeID: String) async throws {
        try await write { txn in
            guard try txn.delete(self.nodes, Array(nodeID.utf8)) else { throw MetadataError.notFound("node \(nodeID)") }
        }
        broadcaster.publish(.nodeUnregistered(nodeID: nodeID))
    }

    public func getNode(_ nodeID: String) async throws -> NodeRecord {
        try read { txn in
            guard let node: NodeRecord = try self.load(txn, self.nodes, key: nodeID) else {
                throw MetadataError.notFound("node \(nodeID)")
            }
            return node
        }
    }

    public func listNodes() async throws -> [NodeRecord] {
        try read { txn in try self.all(txn, self.nodes) }
    }

    // MARK: Shard IDs

    public func generateShardID() async throws -> UInt64 {
        try await write { txn in
            let next = try self.counter(txn) + 1
            try self.setCounter(txn, next)
            return next
        }
    }

    public func claimShardID(_ id: UInt64) async throws {
        guard id > 0 else { throw MetadataError.invalidArgument("shard ID 0 is reserved") }
        try await write { txn in
            let highest = try self.counter(txn)
            guard id > highest else {
                throw MetadataError.alreadyExists("shard ID \(id) is taken (IDs up to \(highest) have been handed out)")
            }
            try self.setCounter(txn, id)
        }
    }

    // MARK: Shards

    public func createShard(_ shard: ShardRecord) async throws {
        guard shard.shardID > 0 else { throw MetadataError.invalidArgument("shard ID 0 is reserved") }
        guard !shard.ownerClientID.isEmpty else { throw MetadataError.invalidArgument("a shard needs an owner client ID") }
        try await write { txn in
            let key = Self.shardKey(shard.shardID)
            if let existing = try txn.get(self.shards, key) {
                if (try? JSONDecoder().decode(ShardRecord.self, from: Data(existing))) == shard { return }
                throw MetadataError.alreadyExists("shard \(shard.shardID)")
            }
            try txn.put(self.shards, key, try JSONEncoder().encode(shard).bytes)
            // A shard recorded with an ID above the counter moves the counter, so
            // generated IDs never collide with it.
            if try self.counter(txn) < shard.shardID { try self.setCounter(txn, shard.shardID) }
        }
        broadcaster.publish(.shardCreated(shard))
    }

    public func getShard(_ shardID: UInt64) async throws -> ShardRecord {
        try read { txn in try self.shard(txn, shardID) }
    }

    public func updateShardState(_ shardID: UInt64, to state: ShardRecordState) async throws -> ShardRecord {
        let updated = try await write { txn in
            var shard = try self.shard(txn, shardID)
            guard shard.state.allows(state) else {
                throw MetadataError.conflict("shard \(shardID) cannot go from \(shard.state.rawValue) to \(state.rawValue)")
            }
            shard.state = state
            try txn.put(self.shards, Self.shardKey(shardID), try JSONEncoder().encode(shard).bytes)
            return shard
        }
        broadcaster.publish(.shardUpdated(updated))
        return updated
    }

    public func deleteShard(_ shardID: UInt64) async throws {
        try await write { txn in
            guard try txn.delete(self.shards, Self.shardKey(shardID)) else { throw MetadataError.notFound("shard \(shardID)") }
        }
        broadcaster.publish(.shardDeleted(shardID: shardID))
    }

    public func listShards(volumeID: String?) async throws -> [ShardRecord] {
        let all: [ShardRecord] = try read { txn in try self.all(txn, self.shards) }
        return volumeID.map { v in all.filter { $0.volumeID == v } } ?? all
    }

    // MARK: Volumes

    public func registerVolume(_ volume: VolumeRecord) async throws {
        guard !volume.volumeID.isEmpty else { throw MetadataError.invalidArgument("a volume ID must not be empty") }
        try await write { txn in
            if let existing = try txn.get(self.volumes, Array(volume.volumeID.utf8)) {
                if (try? JSONDecoder().decode(VolumeRecord.self, from: Data(existing))) == volume { return }
                throw MetadataError.alreadyExists("volume \(volume.volumeID)")
            }
            try self.store(txn, self.volumes, key: volume.volumeID, volume)
        }
        broadcaster.publish(.volumeRegistered(volume))
    }

    public func getVolume(_ volumeID: String) async throws -> VolumeRecord {
        try read { txn in try self.volume(txn, volumeID) }
    }

    public func listVolumes(nodeID: String?) async throws -> [VolumeRecord] {
        let all: [VolumeRecord] = try read { txn in try self.all(txn, self.volumes) }
        guard let nodeID else { return all }
        return all.filter { $0.isHeld(by: nodeID) }
    }

    public func updatePrimary(volumeID: String, nodeID: String, expectedEpoch: UInt64) async throws -> VolumeRecord {
        try await updateVolume(volumeID) { volume in
            try volume.promote(nodeID, expectedEpoch: expectedEpoch)
        }
    }

    public func updateVolumeFacts(_ volumeID: String, _ facts: VolumeFacts, ifPrimary nodeID: String?) async throws {
        _ = try await updateVolume(volumeID) { volume in try volume.setFacts(facts, ifPrimary: nodeID) }
    }

    public func addBackup(volumeID: String, nodeID: String) async throws {
        _ = try await updateVolume(volumeID) { volume in volume.addBackup(nodeID) }
    }

    public func removeBackup(volumeID: String, nodeID: String) async throws {
        _ = try await updateVolume(volumeID) { volume in volume.removeBackup(nodeID) }
    }

    public func unregisterVolume(_ volumeID: String) async throws {
        try await write { txn in
            guard try txn.delete(self.volumes, Array(volumeID.utf8)) else { throw MetadataError.notFound("volume \(volumeID)") }
        }
        broadcaster.publish(.volumeUnregistered(volumeID: volumeID))
    }

    // MARK: Views

    public func publishViews(_ published: VolumeViews) async throws {
        try await write { txn in
            let volume = try self.volume(txn, published.volumeID)
            let previous: VolumeViews? = try self.load(txn, self.views, key: "views/" + published.volumeID)
            try published.check(against: volume, previous: previous)
            try self.store(txn, self.views, key: "views/" + published.volumeID, published)
        }
        broadcaster.publish(.viewsPublished(published))
    }

    public func getViews(_ volumeID: String) async throws -> VolumeViews? {
        try read { txn in try self.load(txn, self.views, key: "views/" + volumeID) }
    }

    public func acknowledgeViews(volumeID: String, nodeID: String, generation: UInt64) async throws {
        try await write { txn in
            _ = try self.volume(txn, volumeID)
            try txn.put(self.views, Array("acks/\(volumeID)/\(nodeID)".utf8), Array(String(generation).utf8))
        }
        broadcaster.publish(.viewsAcknowledged(volumeID: volumeID, nodeID: nodeID, generation: generation))
    }

    public func viewAcknowledgements(_ volumeID: String) async throws -> [String: UInt64] {
        let prefix = Array("acks/\(volumeID)/".utf8)
        return try read { txn in
            try txn.withCursor(self.views) { cursor in
                var result: [String: UInt64] = [:]
                var pair = try prefix.withUnsafeBytes { try cursor.seek(atLeast: $0) }
                while let (key, value) = pair, key.starts(with: prefix) {
                    if let generation = UInt64(String(decoding: value, as: UTF8.self)) {
                        result[String(decoding: key.dropFirst(prefix.count), as: UTF8.self)] = generation
                    }
                    pair = try cursor.next()
                }
                return result
            }
        }
    }

    public func changes() -> AsyncStream<MetadataEvent> { broadcaster.stream() }

    // MARK: Internals

    private func updateVolume(_ volumeID: String, _ change: @escaping @Sendable (inout VolumeRecord) throws -> Void) async throws -> VolumeRecord {
        let updated = try await write { txn in
            var volume = try self.volume(txn, volumeID)
            try change(&volume)
            try self.store(txn, self.volumes, key: volumeID, volume)
            return volume
        }
        broadcaster.publish(.volumeUpdated(updated))
        return updated
    }

    /// A durable write transaction, run off Swift's cooperative threads (it waits for fsync).
    private func write<R: Sendable>(_ body: @escaping @Sendable (Transaction) throws -> R) async throws -> R {
        let env = self.env
        return try await blockingWork {
            do { return try env.write(body) } catch let error as MetadataError { throw error } catch {
                throw MetadataError.failed("embedded metadata write failed: \(error)")
            }
        }
    }

    private func read<R>(_ body: (Transaction) throws -> R) throws -> R {
        do { return try env.read(body) } catch let error as MetadataError { throw error } catch {
            throw MetadataError.failed("embedded metadata read failed: \(error)")
        }
    }

    private func shard(_ txn: Transaction, _ id: UInt64) throws -> ShardRecord {
        guard let raw = try txn.get(shards, Self.shardKey(id)) else { throw MetadataError.notFound("shard \(id)") }
        return try JSONDecoder().decode(ShardRecord.self, from: Data(raw))
    }

    private func volume(_ txn: Transaction, _ id: String) throws -> VolumeRecord {
        guard let volume: VolumeRecord = try load(txn, volumes, key: id) else { throw MetadataError.notFound("volume \(id)") }
        return volume
    }

    private func counter(_ txn: Transaction) throws -> UInt64 {
        guard let raw = try txn.get(counters, Self.shardCounterKey) else { return 0 }
        guard raw.count == 8 else { throw MetadataError.failed("shard ID counter is corrupt") }
        return UInt64(bigEndian: raw.loadUnaligned(as: UInt64.self))
    }

    private func setCounter(_ txn: Transaction, _ value: UInt64) throws {
        try withUnsafeBytes(of: value.bigEndian) { v in
            try Self.shardCounterKey.withUnsafeBytes { try txn.put(counters, $0, v) }
        }
    }

    /// Big-endian so that LMDB's byte order is numeric order.
    private static func shardKey(_ id: UInt64) -> [UInt8] { withUnsafeBytes(of: id.bigEndian) { Array($0) } }

    private func store<T: Encodable>(_ txn: Transaction, _ db: Database, key: String, _ value: T) throws {
        try txn.put(db, Array(key.utf8), try JSONEncoder().encode(value).bytes)
    }

    private func load<T: Decodable>(_ txn: Transaction, _ db: Database, key: String) throws -> T? {
        guard let raw = try txn.get(db, Array(key.utf8)) else { return nil }
        return try JSONDecoder().decode(T.self, from: Data(raw))
    }

    private func all<T: Decodable>(_ txn: Transaction, _ db: Database) throws -> [T] {
        try txn.withCursor(db) { cursor in
            var result: [T] = []
            var pair = try cursor.first()
            while let (_, value) = pair {
                result.append(try JSONDecoder().decode(T.self, from: Data(value)))
                pair = try cursor.next()
            }
            return result
        }
    }
}

extension Data {
    var bytes: [UInt8] { [UInt8](self) }
}
