// The metadata interface: which shards exist, where they live, who owns them,
// which nodes hold which volumes. One source of truth per deployment: the
// embedded store for one node, etcd for many. Everything above talks to this
// protocol only.

/// A node of the cluster.
public struct NodeRecord: Codable, Sendable, Equatable {
    public var nodeID: String
    /// Where its socket service listens ("host:port"), empty if none.
    public var address: String

    public init(nodeID: String, address: String) {
        self.nodeID = nodeID
        self.address = address
    }
}

/// The life of a shard as the metadata knows it. `deleting` marks a delete in
/// progress: its files may be partly gone and it is finished on the next start.
public enum ShardRecordState: String, Codable, Sendable {
    case open
    case closed
    case deleting
}

public struct ShardRecord: Codable, Sendable, Equatable {
    public var shardID: UInt64
    public var volumeID: String
    public var ownerClientID: String
    public var state: ShardRecordState
    public var sizeLimit: Int

    public init(shardID: UInt64, volumeID: String, ownerClientID: String, state: ShardRecordState = .open, sizeLimit: Int) {
        self.shardID = shardID
        self.volumeID = volumeID
        self.ownerClientID = ownerClientID
        self.state = state
        self.sizeLimit = sizeLimit
    }
}

public struct VolumeRecord: Codable, Sendable, Equatable {
    public var volumeID: String
    /// The node that mounts it read-write; empty when none does.
    public var primaryNodeID: String
    /// Nodes that mount it read-only.
    public var backupNodeIDs: [String]
    /// Where the volume is mounted on its nodes (`<volume root>/<volumeID>`).
    public var mountPath: String
    /// Fencing token: increases with every change of primary. A writer carrying an
    /// older epoch than the volume's is stale and must stop.
    public var epoch: UInt64
    /// Capacity, free space, type, zone and attachments as last seen; nil in
    /// records written before they were kept, or by a node that had none.
    public var facts: VolumeFacts?

    public init(volumeID: String, primaryNodeID: String, backupNodeIDs: [String] = [], mountPath: String, epoch: UInt64 = 1,
                facts: VolumeFacts? = nil) {
        self.volumeID = volumeID
        self.primaryNodeID = primaryNodeID
        self.backupNodeIDs = backupNodeIDs
        self.mountPath = mountPath
        self.epoch = epoch
        self.facts = facts
    }
}

/// A change seen by the change listener.
public enum MetadataEvent: Sendable, Equatable {
    case nodeRegistered(NodeRecord)
    case nodeUnregistered(nodeID: String)
    case shardCreated(ShardRecord)
    case shardUpdated(ShardRecord)
    case shardDeleted(shardID: UInt64)
    case volumeRegistered(VolumeRecord)
    case volumeUpdated(VolumeRecord)
    case volumeUnregistered(volumeID: String)
    case viewsPublished(VolumeViews)
    /// A backup left every generation of the volume's views before `generation`.
    case viewsAcknowledged(volumeID: String, nodeID: String, generation: UInt64)
}

/// Why a metadata call failed. Only `isTransient` failures are worth retrying.
public enum MetadataError: Error, Equatable, Sendable, CustomStringConvertible {
    case notFound(String)
    case alreadyExists(String)
    /// A guarded change lost: stale epoch, concurrent update, forbidden transition.
    case conflict(String)
    case invalidArgument(String)
    /// The store cannot be reached right now (no connection, leader change, overload).
    case unavailable(String)
    /// One attempt took too long.
    case timeout(String)
    /// The retry wrapper gave up at its deadline; carries the last transient failure.
    case deadlineExceeded(String)
    /// Wrong credentials or no permission: retrying does not help.
    case unauthorized(String)
    /// Anything else the store reports: not retried.
    case failed(String)

    public var isTransient: Bool {
        switch self {
        case .unavailable, .timeout: return true
        default: return false
        }
    }

    public var description: String {
        switch self {
        case .notFound(let s): return "not found: \(s)"
        case .alreadyExists(let s): return "already exists: \(s)"
        case .conflict(let s): return "conflict: \(s)"
        case .invalidArgument(let s): return "invalid argument: \(s)"
        case .unavailable(let s): return "metadata store unavailable: \(s)"
        case .timeout(let s): return "metadata call timed out: \(s)"
        case .deadlineExceeded(let s): return "metadata store did not answer before the deadline: \(s)"
        case .unauthorized(let s): return "not authorised by the metadata store: \(s)"
        case .failed(let s): return "metadata store error: \(s)"
        }
    }
}

/// The metadata interface. Implementations are safe to call concurrently.
///
/// Shard IDs: `generateShardID` returns IDs that are unique and strictly
/// increasing across every caller of the same store, and never reused, even
/// after deletes and restarts. `claimShardID` accepts an explicitly requested ID
/// only if it is above every ID handed out so far (an ID at or below that mark may
/// have belonged to a deleted shard) and moves the counter to it; otherwise it
/// fails with `alreadyExists`.
public protocol MetadataStore: Sendable {
    // Nodes
    func registerNode(_ node: NodeRecord) async throws
    func unregisterNode(_ nodeID: String) async throws
    func getNode(_ nodeID: String) async throws -> NodeRecord
    func listNodes() async throws -> [NodeRecord]

    // Shard IDs
    func generateShardID() async throws -> UInt64
    func claimShardID(_ id: UInt64) async throws

    // Shards
    /// `alreadyExists` if another shard with this ID is recorded. The same record
    /// already there succeeds: a retried create whose first try landed.
    func createShard(_ shard: ShardRecord) async throws
    func getShard(_ shardID: UInt64) async throws -> ShardRecord
    /// Allowed: open → closed, open/closed → deleting, and to the same state.
    /// Anything else (closed → open, leaving deleting) fails with `conflict`.
    func updateShardState(_ shardID: UInt64, to state: ShardRecordState) async throws -> ShardRecord
    func deleteShard(_ shardID: UInt64) async throws
    /// All shards, or those on one volume, by increasing ID.
    func listShards(volumeID: String?) async throws -> [ShardRecord]

    // Volumes
    func registerVolume(_ volume: VolumeRecord) async throws
    func getVolume(_ volumeID: String) async throws -> VolumeRecord
    /// All volumes, or those a node holds as primary or backup.
    func listVolumes(nodeID: String?) async throws -> [VolumeRecord]
    /// Makes `nodeID` the primary if the volume's epoch is still `expectedEpoch`;
    /// the epoch then increases by one. A stale `expectedEpoch` fails with `conflict`.
    func updatePrimary(volumeID: String, nodeID: String, expectedEpoch: UInt64) async throws -> VolumeRecord
    /// Replaces what the record says of the volume's size, room and attachments.
    /// Mostly informational, but a promotion fences the instance the facts name
    /// as primary: with `ifPrimary`, the facts are written only while the record
    /// names that node primary (`conflict` otherwise), so a node that lost the
    /// volume cannot name itself after the winner did. `notFound` for an unknown volume.
    func updateVolumeFacts(_ volumeID: String, _ facts: VolumeFacts, ifPrimary nodeID: String?) async throws
    func addBackup(volumeID: String, nodeID: String) async throws
    func removeBackup(volumeID: String, nodeID: String) async throws
    func unregisterVolume(_ volumeID: String) async throws

    // Backup views (docs/BACKUP-VIEWS.md)
    /// Stores a generation of the volume's views if `views.epoch` is the volume's
    /// epoch and the generation is past the stored one; else `conflict`.
    func publishViews(_ views: VolumeViews) async throws
    /// The newest published views of the volume, nil if none.
    func getViews(_ volumeID: String) async throws -> VolumeViews?
    /// Records that backup `nodeID` reads no generation of the volume's views
    /// before `generation`. The etcd store keeps it on the node's lease (a backup
    /// whose lease lapsed has no acknowledgement), as long as this store
    /// registered the node.
    func acknowledgeViews(volumeID: String, nodeID: String, generation: UInt64) async throws
    /// Backup node → the generation it acknowledged last, for the volume.
    func viewAcknowledgements(_ volumeID: String) async throws -> [String: UInt64]

    /// The change listener: every change made after the call, in order.
    func changes() -> AsyncStream<MetadataEvent>
}

extension ShardRecordState {
    /// Whether a shard may move from `self` to `next`.
    public func allows(_ next: ShardRecordState) -> Bool {
        switch (self, next) {
        case (let a, let b) where a == b: return true
        case (.open, .closed), (.open, .deleting), (.closed, .deleting): return true
        default: return false
        }
    }
}

extension VolumeRecord {
    /// Whether `nodeID` holds the volume, as primary or backup.
    public func isHeld(by nodeID: String) -> Bool {
        primaryNodeID == nodeID || backupNodeIDs.contains(nodeID)
    }

    /// Makes `nodeID` the primary if the epoch is still `expectedEpoch`, and moves
    /// the epoch on: the rule every store applies inside its guarded update.
    public mutating func promote(_ nodeID: String, expectedEpoch: UInt64) throws {
        guard epoch == expectedEpoch else {
            throw MetadataError.conflict("volume \(volumeID) is at epoch \(epoch), not \(expectedEpoch)")
        }
        primaryNodeID = nodeID
        backupNodeIDs.removeAll { $0 == nodeID }
        epoch += 1
    }

    /// Sets the facts, if `nodeID` (when given) is the primary.
    public mutating func setFacts(_ facts: VolumeFacts, ifPrimary nodeID: String?) throws {
        if let nodeID, primaryNodeID != nodeID {
            throw MetadataError.conflict("volume \(volumeID)'s primary is \(primaryNodeID), not \(nodeID)")
        }
        self.facts = facts
    }

    public mutating func addBackup(_ nodeID: String) {
        if !backupNodeIDs.contains(nodeID) { backupNodeIDs.append(nodeID) }
    }

    public mutating func removeBackup(_ nodeID: String) {
        backupNodeIDs.removeAll { $0 == nodeID }
    }
}
