// About 630 lines on purpose: every operation of `MetadataStore` on etcd, each
// a guarded compare-and-swap over the same few primitives (at the end), read
// best in one place beside the key layout below. Leases' keepalive thread is in
// Keepalive.swift, the wire types in EtcdWire.swift.
import Foundation
import Logging
import Metadata

/// The metadata store on etcd, for clusters of nodes: the same semantics as
/// `EmbeddedMetadataStore`, with every guarded change a compare-and-swap txn.
///
/// Layout under the namespace (default "/shardfs"), values JSON:
///   <ns>/nodes/<nodeID>           NodeRecord, attached to the node's lease
///   <ns>/shards/<20-digit ID>     ShardRecord (zero-padded: key order is ID order)
///   <ns>/volumes/<volumeID>       VolumeRecord
///   <ns>/counters/shard-id        the highest shard ID handed out, in decimal
///   <ns>/views/<volumeID>         VolumeViews: the newest generation a primary published
///   <ns>/view-acks/<volumeID>/<nodeID>  generation a backup acknowledged (decimal), on its lease
///
/// Each call is one attempt with `callTimeout`; wrap the store in
/// `RetryingMetadataStore` to retry transient failures. Call `close()` when done:
/// it stops the lease keepalives (without revoking) and the watches.
public final class EtcdMetadataStore: MetadataStore, @unchecked Sendable {
    public let configuration: EtcdConfiguration
    let client: EtcdClient
    let logger: Logger
    private let namespace: String
    private let lock = NSLock()
    private var leases: [String: NodeLease] = [:]
    private var injectedAfterLeaseGrant: (@Sendable (Int64) async throws -> Void)?

    /// Tests only: runs after `registerNode` is granted a new lease, before the
    /// node's key is put on it (to make the lease lapse in between).
    var afterLeaseGrant: (@Sendable (Int64) async throws -> Void)? {
        get { lock.withLock { injectedAfterLeaseGrant } }
        set { lock.withLock { injectedAfterLeaseGrant = newValue } }
    }
    private var holdingKeepalives = false

    /// Tests only: keepalives are not sent while set, as if this host were cut off
    /// from etcd: its leases run out there, and once it is cleared the next
    /// keepalive finds them gone and registers the nodes again.
    public var keepalivesHeld: Bool {
        get { lock.withLock { holdingKeepalives } }
        set { lock.withLock { holdingKeepalives = newValue } }
    }
    private var watches: [ObjectIdentifier: EtcdWatch] = [:]
    private var closed = false
    /// Seconds a broken watch waits before reconnecting at first. Internal: tests
    /// raise it to make changes land while the watch is surely disconnected.
    var watchReconnectDelay: Double {
        get { lock.withLock { reconnectDelay } }
        set { lock.withLock { reconnectDelay = newValue } }
    }
    private var reconnectDelay = 0.05

    /// A CAS that keeps losing (heavy contention) gives up after this many tries
    /// with a transient error.
    private static let maxCASAttempts = 500

    /// A node this store registered, and the task keeping its lease alive.
    private final class NodeLease: @unchecked Sendable {
        var leaseID: Int64
        var record: NodeRecord
        var keepalive: Keepalive?
        /// The lease surely lives until then: the send time of the last grant or
        /// keepalive etcd answered, plus the TTL (etcd counts from its receipt, later).
        var surelyValidUntil: ContinuousClock.Instant
        /// Moves on each time the lease lapsed and the node was registered again.
        var generation: UInt64 = 0
        init(leaseID: Int64, record: NodeRecord, surelyValidUntil: ContinuousClock.Instant) {
            self.leaseID = leaseID
            self.record = record
            self.surelyValidUntil = surelyValidUntil
        }
    }

    /// Checks the configuration (bad endpoints fail with `invalidArgument`); does
    /// not connect: the first call does.
    public init(configuration: EtcdConfiguration, logger: Logger = Logger(label: "shardfs.metadata.etcd")) throws {
        guard configuration.leaseTTL >= 1 else { throw MetadataError.invalidArgument("leaseTTL must be at least 1 second") }
        self.configuration = configuration
        self.logger = logger
        self.client = try EtcdClient(configuration: configuration, logger: logger)
        self.namespace = configuration.normalizedNamespace
    }

    deinit {
        for lease in leases.values { lease.keepalive?.cancel() }
        for watch in watches.values { watch.stop() }
        client.close()
    }

    /// Stops the keepalives (the leases then lapse: their nodes disappear after
    /// the TTL, as if this process had died) and the watches, and frees the
    /// connections. Calls after `close()` fail.
    public func close() async {
        let (keepalives, active) = lock.withLock { () -> ([Keepalive], [EtcdWatch]) in
            closed = true
            defer { leases.removeAll(); watches.removeAll() }
            return (leases.values.compactMap(\.keepalive), Array(watches.values))
        }
        for keepalive in keepalives { keepalive.cancel() }
        for watch in active { watch.stop() }
        for keepalive in keepalives { await keepalive.finished() }
        client.close()
    }

    // MARK: Keys

    private var nodesPrefix: String { namespace + "/nodes/" }
    private var shardsPrefix: String { namespace + "/shards/" }
    private var volumesPrefix: String { namespace + "/volumes/" }
    private var counterKey: String { namespace + "/counters/shard-id" }
    private func nodeKey(_ id: String) -> String { nodesPrefix + id }
    private func volumeKey(_ id: String) -> String { volumesPrefix + id }
    private func shardKey(_ id: UInt64) -> String { shardsPrefix + Self.paddedID(id) }

    static func paddedID(_ id: UInt64) -> String {
        let digits = String(id)
        return String(repeating: "0", count: max(0, 20 - digits.count)) + digits
    }

    // MARK: Nodes

    public func registerNode(_ node: NodeRecord) async throws {
        guard !node.nodeID.isEmpty else { throw MetadataError.invalidArgument("a node ID must not be empty") }
        try checkOpen()
        let value = try encode(node)
        if let existing = lock.withLock({ leases[node.nodeID] }) {
            do {
                try await put(nodeKey(node.nodeID), value, lease: lock.withLock { existing.leaseID })
                lock.withLock { existing.record = node }
                return
            } catch MetadataError.notFound {
                // The lease lapsed (etcd forgot it): start over with a new one.
                removeLease(node.nodeID)?.keepalive?.cancel()
            }
        }
        var sent = ContinuousClock.now
        var leaseID = try await grantLease()
        var attempts = 1
        while true {
            do {
                try await afterLeaseGrant?(leaseID)
                try await put(nodeKey(node.nodeID), value, lease: leaseID)
                break
            } catch MetadataError.notFound where attempts < 3 {
                // The new lease lapsed before it was used: this process stood still
                // for a whole TTL (a starved or paused host). Take another.
                attempts += 1
                sent = ContinuousClock.now
                leaseID = try await grantLease()
            } catch {
                try? await revokeLease(leaseID)
                throw error
            }
        }
        let entry = NodeLease(leaseID: leaseID, record: node, surelyValidUntil: sent + .seconds(configuration.leaseTTL))
        let previous = lock.withLock { () -> NodeLease? in
            defer { leases[node.nodeID] = entry }
            return leases[node.nodeID]
        }
        previous?.keepalive?.cancel()
        entry.keepalive = startKeepalive(nodeID: node.nodeID, entry: entry)
    }

    public func unregisterNode(_ nodeID: String) async throws {
        try checkOpen()
        let entry = removeLease(nodeID)
        entry?.keepalive?.cancel()
        let deleted = try await deleteKey(nodeKey(nodeID))
        if let entry {
            // The key is gone already; revoking frees the lease at once.
            do { try await revokeLease(entry.leaseID) } catch {
                logger.warning("could not revoke the lease of an unregistered node (it lapses by itself)",
                               metadata: ["node": "\(nodeID)", "error": "\(error)"])
            }
        }
        guard deleted else { throw MetadataError.notFound("node \(nodeID)") }
    }

    public func getNode(_ nodeID: String) async throws -> NodeRecord {
        guard let kv = try await get(nodeKey(nodeID)) else { throw MetadataError.notFound("node \(nodeID)") }
        return try decode(NodeRecord.self, kv)
    }

    public func listNodes() async throws -> [NodeRecord] {
        try await list(nodesPrefix).map { try decode(NodeRecord.self, $0) }
    }

    // MARK: Shard IDs

    public func generateShardID() async throws -> UInt64 {
        try await advanceCounter { $0 + 1 }
    }

    /// Not idempotent under retry: a claim that landed and is retried finds its
    /// own ID taken (`alreadyExists`), as it would another node's.
    public func claimShardID(_ id: UInt64) async throws {
        guard id > 0 else { throw MetadataError.invalidArgument("shard ID 0 is reserved") }
        _ = try await advanceCounter { highest in
            guard id > highest else {
                throw MetadataError.alreadyExists("shard ID \(id) is taken (IDs up to \(highest) have been handed out)")
            }
            return id
        }
    }

    /// Moves the shard ID counter from its value to `next(value)` by compare-and-swap,
    /// retrying when another writer moved it first; returns the new value.
    private func advanceCounter(_ next: (UInt64) throws -> UInt64) async throws -> UInt64 {
        var kv = try await get(counterKey)
        for attempt in 0..<Self.maxCASAttempts {
            let value = try next(try counterValue(kv))
            let response = try await txn(
                compare: [guardRevision(counterKey, kv)],
                success: [putOp(counterKey, Data(String(value).utf8))],
                failure: [rangeOp(counterKey)])
            if response.didSucceed { return value }
            kv = response.responses?.first?.response_range?.kvs?.first
            try await backoffAfterLostCAS(attempt)
        }
        throw MetadataError.unavailable("the shard ID counter is too contended")
    }

    // MARK: Shards

    public func createShard(_ shard: ShardRecord) async throws {
        guard shard.shardID > 0 else { throw MetadataError.invalidArgument("shard ID 0 is reserved") }
        guard !shard.ownerClientID.isEmpty else { throw MetadataError.invalidArgument("a shard needs an owner client ID") }
        let key = shardKey(shard.shardID)
        let value = try encode(shard)
        var counter = try await get(counterKey)
        for attempt in 0..<Self.maxCASAttempts {
            // One txn: the shard must be absent and, if its ID is above the counter,
            // the counter moves to it (guarded, so it never moves back).
            var compare = [createdAbsent(key)]
            var success = [putOp(key, value)]
            if shard.shardID > (try counterValue(counter)) {
                compare.append(guardRevision(counterKey, counter))
                success.append(putOp(counterKey, Data(String(shard.shardID).utf8)))
            }
            let response = try await txn(compare: compare, success: success, failure: [rangeOp(key), rangeOp(counterKey)])
            if response.didSucceed { return }
            let answers = response.responses ?? []
            if let existing = answers.first?.response_range?.kvs?.first {
                // A retry of a create whose first try landed finds its own record.
                if (try? decode(ShardRecord.self, existing)) == shard { return }
                throw MetadataError.alreadyExists("shard \(shard.shardID)")
            }
            counter = answers.count > 1 ? answers[1].response_range?.kvs?.first : try await get(counterKey)
            try await backoffAfterLostCAS(attempt)
        }
        throw MetadataError.unavailable("the shard ID counter is too contended")
    }

    public func getShard(_ shardID: UInt64) async throws -> ShardRecord {
        guard let kv = try await get(shardKey(shardID)) else { throw MetadataError.notFound("shard \(shardID)") }
        return try decode(ShardRecord.self, kv)
    }

    public func updateShardState(_ shardID: UInt64, to state: ShardRecordState) async throws -> ShardRecord {
        try await update(shardKey(shardID), ShardRecord.self, what: "shard \(shardID)") { shard in
            guard shard.state.allows(state) else {
                throw MetadataError.conflict("shard \(shardID) cannot go from \(shard.state.rawValue) to \(state.rawValue)")
            }
            shard.state = state
        }
    }

    public func deleteShard(_ shardID: UInt64) async throws {
        guard try await deleteKey(shardKey(shardID)) else { throw MetadataError.notFound("shard \(shardID)") }
    }

    public func listShards(volumeID: String?) async throws -> [ShardRecord] {
        let all = try await list(shardsPrefix).map { try decode(ShardRecord.self, $0) }
        return volumeID.map { v in all.filter { $0.volumeID == v } } ?? all
    }

    // MARK: Volumes

    public func registerVolume(_ volume: VolumeRecord) async throws {
        guard !volume.volumeID.isEmpty else { throw MetadataError.invalidArgument("a volume ID must not be empty") }
        let key = volumeKey(volume.volumeID)
        let response = try await txn(compare: [createdAbsent(key)], success: [putOp(key, try encode(volume))],
                                     failure: [rangeOp(key)])
        guard response.didSucceed else {
            // A retry of a register whose first try landed finds its own record.
            if let existing = response.responses?.first?.response_range?.kvs?.first,
               (try? decode(VolumeRecord.self, existing)) == volume { return }
            throw MetadataError.alreadyExists("volume \(volume.volumeID)")
        }
    }

    public func getVolume(_ volumeID: String) async throws -> VolumeRecord {
        guard let kv = try await get(volumeKey(volumeID)) else { throw MetadataError.notFound("volume \(volumeID)") }
        return try decode(VolumeRecord.self, kv)
    }

    public func listVolumes(nodeID: String?) async throws -> [VolumeRecord] {
        let all = try await list(volumesPrefix).map { try decode(VolumeRecord.self, $0) }
        guard let nodeID else { return all }
        return all.filter { $0.isHeld(by: nodeID) }
    }

    public func updatePrimary(volumeID: String, nodeID: String, expectedEpoch: UInt64) async throws -> VolumeRecord {
        // Guarded by the record's mod revision: if anything changes it between the
        // read and the write, the txn fails and the epoch check runs again on the
        // new record, so of two racing changes from one epoch only one wins.
        try await update(volumeKey(volumeID), VolumeRecord.self, what: "volume \(volumeID)") { volume in
            try volume.promote(nodeID, expectedEpoch: expectedEpoch)
        }
    }

    public func updateVolumeFacts(_ volumeID: String, _ facts: VolumeFacts, ifPrimary nodeID: String?) async throws {
        _ = try await update(volumeKey(volumeID), VolumeRecord.self, what: "volume \(volumeID)") { volume in
            try volume.setFacts(facts, ifPrimary: nodeID)
        }
    }

    public func addBackup(volumeID: String, nodeID: String) async throws {
        _ = try await update(volumeKey(volumeID), VolumeRecord.self, what: "volume \(volumeID)") { volume in volume.addBackup(nodeID) }
    }

    public func removeBackup(volumeID: String, nodeID: String) async throws {
        _ = try await update(volumeKey(volumeID), VolumeRecord.self, what: "volume \(volumeID)") { volume in volume.removeBackup(nodeID) }
    }

    public func unregisterVolume(_ volumeID: String) async throws {
        guard try await deleteKey(volumeKey(volumeID)) else { throw MetadataError.notFound("volume \(volumeID)") }
    }

    // MARK: Views

    private func viewsKey(_ volumeID: String) -> String { namespace + "/views/" + volumeID }
    private func ackPrefix(_ volumeID: String) -> String { namespace + "/view-acks/" + volumeID + "/" }

    public func publishViews(_ views: VolumeViews) async throws {
        let vKey = volumeKey(views.volumeID), key = viewsKey(views.volumeID)
        for attempt in 0..<Self.maxCASAttempts {
            // The volume's record and the stored views, both unchanged since read:
            // a primary change landing in between makes the txn fail and the epoch
            // check run again.
            guard let volumeKV = try await get(vKey) else { throw MetadataError.notFound("volume \(views.volumeID)") }
            let previousKV = try await get(key)
            try views.check(against: try decode(VolumeRecord.self, volumeKV),
                            previous: try previousKV.map { try decode(VolumeViews.self, $0) })
            let response = try await txn(compare: [guardRevision(vKey, volumeKV), guardRevision(key, previousKV)],
                                         success: [putOp(key, try encode(views))], failure: [])
            if response.didSucceed { return }
            try await backoffAfterLostCAS(attempt + 1)
        }
        throw MetadataError.unavailable("views of volume \(views.volumeID) are too contended")
    }

    public func getViews(_ volumeID: String) async throws -> VolumeViews? {
        try await get(viewsKey(volumeID)).map { try decode(VolumeViews.self, $0) }
    }

    public func acknowledgeViews(volumeID: String, nodeID: String, generation: UInt64) async throws {
        let lease = lock.withLock { leases[nodeID]?.leaseID }
        try await put(ackPrefix(volumeID) + nodeID, Data(String(generation).utf8), lease: lease)
    }

    public func viewAcknowledgements(_ volumeID: String) async throws -> [String: UInt64] {
        let prefix = ackPrefix(volumeID)
        var result: [String: UInt64] = [:]
        for kv in try await list(prefix) {
            if let generation = UInt64(String(decoding: kv.valueData, as: UTF8.self)) {
                result[String(kv.keyString.dropFirst(prefix.count))] = generation
            }
        }
        return result
    }

    // MARK: Changes

    /// Events from an etcd watch on the namespace. It starts after the highest
    /// revision this store has seen, so every change made through this store after
    /// the call is included; it survives broken connections by resuming after the
    /// last revision delivered.
    public func changes() -> AsyncStream<MetadataEvent> {
        let (stream, continuation) = AsyncStream<MetadataEvent>.makeStream()
        let seen = client.highestRevision
        let watch = EtcdWatch(
            client: client, prefix: namespace + "/", startRevision: seen > 0 ? seen + 1 : nil,
            continuation: continuation, logger: logger, reconnectDelay: watchReconnectDelay
        ) { [namespace] kv, isDelete in Self.event(namespace: namespace, kv, isDelete: isDelete) }
        let id = ObjectIdentifier(watch)
        let accepted = lock.withLock { () -> Bool in
            guard !closed else { return false }
            watches[id] = watch
            return true
        }
        guard accepted else {
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [weak self] _ in
            watch.stop()
            self?.lock.withLock { _ = self?.watches.removeValue(forKey: id) }
        }
        watch.start()
        return stream
    }

    /// The event a watched key change means; nil for keys that are not records
    /// (the counter) or do not decode.
    static func event(namespace: String, _ kv: WireKeyValue, isDelete: Bool) -> MetadataEvent? {
        let key = kv.keyString
        guard key.hasPrefix(namespace + "/") else { return nil }
        let path = key.dropFirst(namespace.count + 1)
        guard let slash = path.firstIndex(of: "/") else { return nil }
        let kind = path[..<slash]
        let id = String(path[path.index(after: slash)...])
        let created = kv.createRevision == kv.modRevision
        let decoder = JSONDecoder()
        switch kind {
        case "nodes":
            if isDelete { return .nodeUnregistered(nodeID: id) }
            return (try? decoder.decode(NodeRecord.self, from: kv.valueData)).map { .nodeRegistered($0) }
        case "shards":
            if isDelete { return UInt64(id).map { .shardDeleted(shardID: $0) } }
            guard let shard = try? decoder.decode(ShardRecord.self, from: kv.valueData) else { return nil }
            return created ? .shardCreated(shard) : .shardUpdated(shard)
        case "volumes":
            if isDelete { return .volumeUnregistered(volumeID: id) }
            guard let volume = try? decoder.decode(VolumeRecord.self, from: kv.valueData) else { return nil }
            return created ? .volumeRegistered(volume) : .volumeUpdated(volume)
        case "views":
            if isDelete { return nil }
            return (try? decoder.decode(VolumeViews.self, from: kv.valueData)).map { .viewsPublished($0) }
        case "view-acks":
            // A lapsed lease deletes the acknowledgement: the backup reads nothing any more.
            guard let split = id.lastIndex(of: "/") else { return nil }
            let generation = isDelete ? 0 : UInt64(String(decoding: kv.valueData, as: UTF8.self)) ?? 0
            return .viewsAcknowledged(volumeID: String(id[..<split]), nodeID: String(id[id.index(after: split)...]),
                                      generation: generation)
        default:
            return nil
        }
    }

    // MARK: Leases

    private func grantLease() async throws -> Int64 {
        try await client.onCurlQueue { try self.grantLeaseBlocking() }
    }

    private func grantLeaseBlocking() throws -> Int64 {
        let response = try client.postBlocking("/v3/lease/grant", ["TTL": String(configuration.leaseTTL)], as: WireLeaseGrantResponse.self)
        if let error = response.error, !error.isEmpty { throw MetadataError.failed("lease grant: \(error)") }
        guard let id = response.ID?.value, id != 0 else { throw MetadataError.failed("etcd granted no lease") }
        return id
    }

    private func revokeLease(_ id: Int64) async throws {
        try await client.onCurlQueue { try self.revokeLeaseBlocking(id) }
    }

    private func revokeLeaseBlocking(_ id: Int64) throws {
        do {
            _ = try client.postBlocking("/v3/lease/revoke", ["ID": String(id)], as: WirePutResponse.self)
        } catch MetadataError.notFound {
            // Already gone: that is what we wanted.
        }
    }

    private func removeLease(_ nodeID: String) -> NodeLease? {
        lock.withLock { leases.removeValue(forKey: nodeID) }
    }

    /// Until when the lease of a node this store registered surely lives (by this
    /// host's clock), nil for a node it did not register. A node that holds a role
    /// acts on it only before this instant (docs/BACKUP-VIEWS.md).
    public func leaseSurelyValidUntil(_ nodeID: String) -> ContinuousClock.Instant? {
        lock.withLock { leases[nodeID]?.surelyValidUntil }
    }

    /// The node's lease as this store keeps it: until when it surely lives, and how
    /// many times it lapsed and was granted anew (a node that held a role on the
    /// old lease must check the role again before acting on it).
    public func leaseState(_ nodeID: String) -> (surelyValidUntil: ContinuousClock.Instant, generation: UInt64)? {
        lock.withLock { leases[nodeID].map { ($0.surelyValidUntil, $0.generation) } }
    }

    /// Renews the lease every third of its TTL, on a thread of its own, so that
    /// nothing else the process does (a busy cooperative pool, other metadata
    /// calls) can delay it; a failed renewal is tried again within 250 ms. If etcd
    /// forgot the lease (an outage longer than the TTL), the node is registered
    /// again on a new lease.
    private func startKeepalive(nodeID: String, entry: NodeLease) -> Keepalive {
        let interval = Duration.milliseconds(max(200, configuration.leaseTTL * 1000 / 3))
        return Keepalive(name: "shardfs-lease") { [weak self] keepalive in
            var pause = interval
            while keepalive.sleep(pause) {
                guard let self else { return }
                pause = self.keepAlive(nodeID: nodeID, entry: entry, keepalive: keepalive) ? interval : min(interval, .milliseconds(250))
            }
        }
    }

    /// Renews the lease (or registers the node again on a new one); false if that failed.
    private func keepAlive(nodeID: String, entry: NodeLease, keepalive: Keepalive) -> Bool {
        let (leaseID, held) = lock.withLock { (entry.leaseID, holdingKeepalives) }
        if held { return false }
        do {
            let sent = ContinuousClock.now
            let message = try client.postBlocking("/v3/lease/keepalive", ["ID": String(leaseID)], as: WireLeaseKeepAliveMessage.self)
            if let error = message.error { throw EtcdErrors.fromStatus(grpcCode: error.code, message: error.text, endpoint: "keepalive") }
            if message.result?.TTL.int ?? 0 > 0 {
                lock.withLock { entry.surelyValidUntil = sent + .seconds(configuration.leaseTTL) }
                return true
            }
            // No TTL: the lease expired. Register again, unless unregistered meanwhile.
            logger.warning("the lease of a node expired; registering it again", metadata: ["node": "\(nodeID)"])
            let newLease = try grantLeaseBlocking()
            let record = lock.withLock { () -> NodeRecord? in
                guard leases[nodeID] === entry, !keepalive.isCancelled else { return nil }
                return entry.record
            }
            guard let record else {
                try? revokeLeaseBlocking(newLease)
                return true
            }
            // The key first: if this put fails, the entry keeps the expired lease
            // and the next round tries again (not a live lease with no key on it).
            do {
                _ = try client.postBlocking("/v3/kv/put", ["key": Wire.b64(nodeKey(nodeID)), "value": Wire.b64(try encode(record)),
                                                           "lease": String(newLease)], as: WirePutResponse.self)
            } catch {
                try? revokeLeaseBlocking(newLease)
                throw error
            }
            let adopted = lock.withLock { () -> Bool in
                guard leases[nodeID] === entry else { return false }
                entry.leaseID = newLease
                entry.generation += 1
                entry.surelyValidUntil = sent + .seconds(configuration.leaseTTL)
                return true
            }
            if !adopted { try? revokeLeaseBlocking(newLease) }
            return true
        } catch {
            if !keepalive.isCancelled {
                logger.warning("lease keepalive failed", metadata: ["node": "\(nodeID)", "error": "\(error)"])
            }
            return false
        }
    }

    // MARK: etcd primitives

    private func checkOpen() throws {
        if lock.withLock({ closed }) { throw MetadataError.failed("the etcd metadata store is closed") }
    }

    private func get(_ key: String) async throws -> WireKeyValue? {
        let response = try await client.post("/v3/kv/range", ["key": Wire.b64(key)], as: WireRangeResponse.self)
        return response.kvs?.first
    }

    /// Every key under `prefix`, in key order.
    private func list(_ prefix: String) async throws -> [WireKeyValue] {
        let response = try await client.post(
            "/v3/kv/range", ["key": Wire.b64(prefix), "range_end": Wire.prefixEnd(prefix)], as: WireRangeResponse.self)
        return response.kvs ?? []
    }

    private func put(_ key: String, _ value: Data, lease: Int64? = nil) async throws {
        var body: [String: Any] = ["key": Wire.b64(key), "value": Wire.b64(value)]
        if let lease { body["lease"] = String(lease) }
        _ = try await client.post("/v3/kv/put", body, as: WirePutResponse.self)
    }

    /// Deletes one key; false if it did not exist.
    private func deleteKey(_ key: String) async throws -> Bool {
        let response = try await client.post("/v3/kv/deleterange", ["key": Wire.b64(key)], as: WireDeleteRangeResponse.self)
        return response.deleted.int > 0
    }

    private func txn(compare: [[String: Any]], success: [[String: Any]], failure: [[String: Any]]) async throws -> WireTxnResponse {
        try await client.post("/v3/kv/txn", ["compare": compare, "success": success, "failure": failure], as: WireTxnResponse.self)
    }

    /// Read-modify-write of one record, guarded by its mod revision; re-run on the
    /// fresh record when another writer got there first.
    private func update<T: Codable>(_ key: String, _ type: T.Type, what: String, _ change: (inout T) throws -> Void) async throws -> T {
        guard var kv = try await get(key) else { throw MetadataError.notFound(what) }
        for attempt in 0..<Self.maxCASAttempts {
            var record = try decode(T.self, kv)
            try change(&record)
            let response = try await txn(
                compare: [guardRevision(key, kv)], success: [putOp(key, try encode(record))], failure: [rangeOp(key)])
            if response.didSucceed { return record }
            guard let fresh = response.responses?.first?.response_range?.kvs?.first else { throw MetadataError.notFound(what) }
            kv = fresh
            try await backoffAfterLostCAS(attempt)
        }
        throw MetadataError.unavailable("\(what) is too contended")
    }

    /// A short random pause after losing a CAS, growing with the losses, so that
    /// many contenders do not all retry in lockstep.
    private func backoffAfterLostCAS(_ attempt: Int) async throws {
        guard attempt > 0 else { return }
        let micros = Int.random(in: 0...(min(attempt, 10) * 500))
        try await Task.sleep(for: .microseconds(micros))
    }

    private func putOp(_ key: String, _ value: Data) -> [String: Any] {
        ["request_put": ["key": Wire.b64(key), "value": Wire.b64(value)]]
    }

    private func rangeOp(_ key: String) -> [String: Any] {
        ["request_range": ["key": Wire.b64(key)]]
    }

    /// The key does not exist (its create revision is 0).
    private func createdAbsent(_ key: String) -> [String: Any] {
        ["key": Wire.b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"]
    }

    /// The key is still as read: unchanged since `kv`, or still absent.
    private func guardRevision(_ key: String, _ kv: WireKeyValue?) -> [String: Any] {
        guard let kv else { return createdAbsent(key) }
        return ["key": Wire.b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": String(kv.modRevision)]
    }

    private func counterValue(_ kv: WireKeyValue?) throws -> UInt64 {
        guard let kv else { return 0 }
        let text = String(decoding: kv.valueData, as: UTF8.self).trimmingCharacters(in: .whitespaces)
        guard let value = UInt64(text) else { throw MetadataError.failed("the shard ID counter is corrupt: \"\(text)\"") }
        return value
    }

    private func encode<T: Encodable>(_ value: T) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        do { return try encoder.encode(value) } catch { throw MetadataError.failed("cannot encode a record: \(error)") }
    }

    private func decode<T: Decodable>(_ type: T.Type, _ kv: WireKeyValue) throws -> T {
        do { return try JSONDecoder().decode(T.self, from: kv.valueData) } catch {
            throw MetadataError.failed("corrupt record at \(kv.keyString): \(error)")
        }
    }
}
