/// When and how long to retry.
public struct RetryPolicy: Sendable {
    public var initialBackoff: Duration = .milliseconds(100)
    public var multiplier: Double = 1.5
    public var maxBackoff: Duration = .seconds(2)
    /// Give up once the next try would start later than this after the first.
    public var deadline: Duration = .seconds(10)
    /// Each wait is drawn uniformly from [backoff × (1 − jitter), backoff].
    public var jitter: Double = 0.5

    public init() {}

    public init(initialBackoff: Duration, multiplier: Double, maxBackoff: Duration, deadline: Duration, jitter: Double = 0.5) {
        self.initialBackoff = initialBackoff
        self.multiplier = multiplier
        self.maxBackoff = maxBackoff
        self.deadline = deadline
        self.jitter = jitter
    }

    /// Runs `operation`, retrying it after transient `MetadataError`s with exponential
    /// backoff and jitter until `deadline`. Other errors are thrown at once. Throws
    /// `CancellationError` as soon as the task is cancelled, even mid-wait.
    public func run<T>(_ operation: () async throws -> T) async throws -> T {
        let clock = ContinuousClock()
        let start = clock.now
        var backoff = initialBackoff
        while true {
            try Task.checkCancellation()
            do {
                return try await operation()
            } catch let error as MetadataError where error.isTransient {
                let fraction = jitter > 0 ? Double.random(in: (1 - jitter)...1) : 1
                let wait = backoff * fraction
                if clock.now + wait - start > deadline {
                    throw MetadataError.deadlineExceeded("gave up after \(clock.now - start): \(error)")
                }
                try await Task.sleep(for: wait)
                backoff = min(backoff * multiplier, maxBackoff)
            }
        }
    }
}

/// Wraps any store and retries its transient failures (no connection, timeouts,
/// unavailable) under a `RetryPolicy`. "Not found", "already exists", conflicts
/// and invalid input fail at once: retrying cannot change their answer.
///
/// A call retried after a failure whose effect did land may see its own effect:
/// `generateShardID` may skip an ID (never reuse one) and `createShard` may report
/// `alreadyExists` for the record it made itself; callers check the record.
public struct RetryingMetadataStore: MetadataStore {
    public let base: any MetadataStore
    public let policy: RetryPolicy

    public init(_ base: any MetadataStore, policy: RetryPolicy = RetryPolicy()) {
        self.base = base
        self.policy = policy
    }

    public func registerNode(_ node: NodeRecord) async throws { try await policy.run { try await base.registerNode(node) } }
    public func unregisterNode(_ nodeID: String) async throws { try await policy.run { try await base.unregisterNode(nodeID) } }
    public func getNode(_ nodeID: String) async throws -> NodeRecord { try await policy.run { try await base.getNode(nodeID) } }
    public func listNodes() async throws -> [NodeRecord] { try await policy.run { try await base.listNodes() } }
    public func generateShardID() async throws -> UInt64 { try await policy.run { try await base.generateShardID() } }
    public func claimShardID(_ id: UInt64) async throws { try await policy.run { try await base.claimShardID(id) } }
    public func createShard(_ shard: ShardRecord) async throws { try await policy.run { try await base.createShard(shard) } }
    public func getShard(_ shardID: UInt64) async throws -> ShardRecord { try await policy.run { try await base.getShard(shardID) } }
    public func updateShardState(_ shardID: UInt64, to state: ShardRecordState) async throws -> ShardRecord {
        try await policy.run { try await base.updateShardState(shardID, to: state) }
    }
    public func deleteShard(_ shardID: UInt64) async throws { try await policy.run { try await base.deleteShard(shardID) } }
    public func listShards(volumeID: String?) async throws -> [ShardRecord] {
        try await policy.run { try await base.listShards(volumeID: volumeID) }
    }
    public func registerVolume(_ volume: VolumeRecord) async throws { try await policy.run { try await base.registerVolume(volume) } }
    public func getVolume(_ volumeID: String) async throws -> VolumeRecord { try await policy.run { try await base.getVolume(volumeID) } }
    public func listVolumes(nodeID: String?) async throws -> [VolumeRecord] {
        try await policy.run { try await base.listVolumes(nodeID: nodeID) }
    }
    public func updatePrimary(volumeID: String, nodeID: String, expectedEpoch: UInt64) async throws -> VolumeRecord {
        try await policy.run { try await base.updatePrimary(volumeID: volumeID, nodeID: nodeID, expectedEpoch: expectedEpoch) }
    }
    public func updateVolumeFacts(_ volumeID: String, _ facts: VolumeFacts, ifPrimary nodeID: String?) async throws {
        try await policy.run { try await base.updateVolumeFacts(volumeID, facts, ifPrimary: nodeID) }
    }
    public func addBackup(volumeID: String, nodeID: String) async throws {
        try await policy.run { try await base.addBackup(volumeID: volumeID, nodeID: nodeID) }
    }
    public func removeBackup(volumeID: String, nodeID: String) async throws {
        try await policy.run { try await base.removeBackup(volumeID: volumeID, nodeID: nodeID) }
    }
    public func unregisterVolume(_ volumeID: String) async throws { try await policy.run { try await base.unregisterVolume(volumeID) } }
    public func publishViews(_ views: VolumeViews) async throws { try await policy.run { try await base.publishViews(views) } }
    public func getViews(_ volumeID: String) async throws -> VolumeViews? { try await policy.run { try await base.getViews(volumeID) } }
    public func acknowledgeViews(volumeID: String, nodeID: String, generation: UInt64) async throws {
        try await policy.run { try await base.acknowledgeViews(volumeID: volumeID, nodeID: nodeID, generation: generation) }
    }
    public func viewAcknowledgements(_ volumeID: String) async throws -> [String: UInt64] {
        try await policy.run { try await base.viewAcknowledgements(volumeID) }
    }
    public func changes() -> AsyncStream<MetadataEvent> { base.changes() }
}
