import BatchProtocol
import Metadata
import ShardNode

/// Finds where a shard is served: its volume's primary and backups with the
/// addresses their nodes registered. Locate answers with it, and a
/// NOT_SHARD_LEADER answer carries the primary's address from it.
/// Throws `ShardManagerError.shardNotFound` for a shard that does not exist (or is being deleted).
public protocol ShardLocator: Sendable {
    func locate(_ shard: UInt64) async throws -> ShardLocation
}

/// The locator over the metadata: shard → volume → primary and backups → their
/// node records. A node whose record is gone (its lease lapsed: it is dead) has
/// an empty address.
public struct MetadataShardLocator: ShardLocator {
    public let metadata: any MetadataStore
    /// The node answering (`ShardLocation.answeredBy`).
    public let nodeID: String

    public init(metadata: any MetadataStore, nodeID: String) {
        self.metadata = metadata
        self.nodeID = nodeID
    }

    public func locate(_ id: UInt64) async throws -> ShardLocation {
        let record: ShardRecord
        do { record = try await metadata.getShard(id) } catch MetadataError.notFound {
            throw ShardManagerError.shardNotFound(id)
        }
        guard record.state != .deleting else { throw ShardManagerError.shardNotFound(id) }
        let volume: VolumeRecord?
        do { volume = try await metadata.getVolume(record.volumeID) } catch MetadataError.notFound { volume = nil }
        var addresses: [String: String] = [:]
        if volume != nil {
            for node in try await metadata.listNodes() { addresses[node.nodeID] = node.address }
        }
        func node(_ nodeID: String) -> NodeLocation { NodeLocation(nodeID: nodeID, address: addresses[nodeID] ?? "") }
        return ShardLocation(shard: id, volumeID: record.volumeID, epoch: volume?.epoch ?? 0, closed: record.state == .closed,
                             primary: node(volume?.primaryNodeID ?? ""), backups: (volume?.backupNodeIDs ?? []).map(node),
                             answeredBy: nodeID)
    }
}
