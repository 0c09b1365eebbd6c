import Foundation

// What a primary publishes so that its backups can serve read-only views of a
// live volume, and what the backups answer. docs/BACKUP-VIEWS.md has the design.

/// Generation `generation` of a volume's views: for each shard on the volume, the
/// snapshot a backup may read. Published by the primary at `epoch`; a store
/// refuses a publication whose epoch is not the volume's (a deposed primary
/// cannot publish).
public struct VolumeViews: Codable, Sendable, Equatable {
    public var volumeID: String
    public var epoch: UInt64
    /// Increases with every publication of the volume's views.
    public var generation: UInt64
    /// When the primary took the newest of these snapshots, nanoseconds since 1970
    /// (by its clock: a backup uses it to report staleness, not to decide anything).
    public var publishedAt: Int64
    /// Every shard a backup may serve, by increasing ID. A shard absent here is not
    /// served (deleted, or not created yet when the generation was taken).
    public var shards: [ShardSnapshotRecord]

    public init(volumeID: String, epoch: UInt64, generation: UInt64, publishedAt: Int64, shards: [ShardSnapshotRecord]) {
        self.volumeID = volumeID
        self.epoch = epoch
        self.generation = generation
        self.publishedAt = publishedAt
        self.shards = shards
    }
}

/// One shard's snapshot in a generation.
public struct ShardSnapshotRecord: Codable, Sendable, Equatable {
    public var shardID: UInt64
    /// The generation that took this snapshot (an unchanged shard keeps its older one).
    public var takenIn: UInt64
    /// Where the snapshot's pages are, encoded by the publisher (the metadata store
    /// does not look inside; JSON stores carry it as base64).
    public var snapshot: Data

    public init(shardID: UInt64, takenIn: UInt64, snapshot: Data) {
        self.shardID = shardID
        self.takenIn = takenIn
        self.snapshot = snapshot
    }
}

extension VolumeViews {
    /// The rule every store applies before it stores a publication.
    public func check(against volume: VolumeRecord, previous: VolumeViews?) throws {
        guard volume.epoch == epoch else {
            throw MetadataError.conflict("views of volume \(volumeID) published at epoch \(epoch); the volume is at \(volume.epoch)")
        }
        if let previous, previous.epoch == epoch, previous.generation >= generation {
            throw MetadataError.conflict("views of volume \(volumeID): generation \(generation) is not past \(previous.generation)")
        }
    }
}
