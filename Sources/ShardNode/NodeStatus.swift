import Foundation
import Glibc
import Metadata
import Metrics
import NodeSupport
import ShardStore
import Volumes

/// What `shardfs status` shows and `/status` answers: a running node as it sees
/// itself now. Taking one also refreshes the node's gauges (shards by state, used
/// bytes, roles, views, lease), so a scrape of `/metrics` takes one first.
public struct NodeStatus: Codable, Sendable {
    public struct Volume: Codable, Sendable {
        public var volumeID: String
        /// primary | backup, as the metadata says.
        public var role: String
        /// Whether this node writes the volume now (a primary whose epoch it confirmed).
        public var writing: Bool
        public var epoch: UInt64
        public var primaryNodeID: String
        public var mountPath: String
        /// Empty for folder volumes and volumes not attached here.
        public var device: String
        public var mounted: Bool
        public var freeBytes: Int64?
        public var sizeBytes: Int64?
        /// Backups: the newest view generation applied, and how old it was when this was taken.
        public var viewGeneration: UInt64?
        public var viewAgeSeconds: Double?
    }

    public var nodeID: String
    /// The socket service's address as registered in the metadata (empty without TCP).
    public var address: String
    public var version: String
    public var pid: Int32
    public var dataDir: String
    public var metadataType: String
    public var startedAt: Date
    public var uptimeSeconds: Double
    /// Whether the node may act on its roles (its etcd lease surely lives; always with the embedded store).
    public var leaseFresh: Bool
    /// Seconds the lease surely lives on (absent with the embedded store, which has none).
    public var leaseSecondsLeft: Double?
    public var volumes: [Volume]
    /// Shards of the volumes this node holds, by metadata state (open, closed, deleting).
    public var shardsByState: [String: Int]
    /// Shards open in this process, and the bytes of their logged batches not yet applied.
    public var localShards: Int
    public var batchLogPendingBytes: Int
    /// Logged batches not yet applied to LMDB, and the age of the oldest (the apply lag).
    public var batchLogPendingBatches: Int
    public var batchLogApplyLagSeconds: Double
}

extension StorageNode {
    /// Shards given a label of their own in `shardfs_shard_used_bytes`: the largest
    /// this many; the rest are summed under shard="other" (a bound on cardinality).
    public static let labelledShards = 50

    /// The node's status, with its gauges refreshed. Reads the metadata and each
    /// local shard's figures (LMDB, off the caller's thread).
    public func status() async throws -> NodeStatus {
        let config = configuration
        let nodeID = config.node.nodeID
        let held = try await metadata.listVolumes(nodeID: nodeID)
        // The address clients are sent to, as registered (serve registers the bound port).
        let address = (try? await metadata.getNode(nodeID))?.address ?? config.server.address
        let mounted = Dictionary(volumes.mountedVolumes().map { ($0.volumeID, $0) }, uniquingKeysWith: { a, _ in a })
        let now = Date()
        var rows: [NodeStatus.Volume] = []
        var states: [String: Int] = ["open": 0, "closed": 0, "deleting": 0]
        for record in held.sorted(by: { $0.volumeID < $1.volumeID }) {
            let here = mounted[record.volumeID]
            let path = here?.mountPath ?? record.mountPath
            var free: Int64?, size: Int64?
            var fs = statvfs()
            if here != nil, statvfs(path, &fs) == 0 {
                free = Int64(fs.f_bavail) * Int64(fs.f_frsize)
                size = Int64(fs.f_blocks) * Int64(fs.f_frsize)
            }
            let isPrimary = record.primaryNodeID == nodeID
            let view = isPrimary ? nil : views.generation(of: record.volumeID)
            rows.append(NodeStatus.Volume(
                volumeID: record.volumeID, role: isPrimary ? "primary" : "backup",
                writing: shards.primaryEpoch(record.volumeID) != nil, epoch: record.epoch,
                primaryNodeID: record.primaryNodeID, mountPath: path, device: here?.device ?? "",
                mounted: here != nil, freeBytes: free, sizeBytes: size, viewGeneration: view?.generation,
                viewAgeSeconds: view.map { max(0, now.timeIntervalSince1970 - Double($0.publishedAt) / 1e9) }))
            if isPrimary {
                for shard in try await metadata.listShards(volumeID: record.volumeID) { states[shard.state.rawValue, default: 0] += 1 }
            }
        }
        let local = shards.localShards()
        let used = try await blockingWork { local.compactMap { try? $0.stats() }.map { ($0.id, $0.usedBytes, $0.limitBytes) } }
        let pending = local.map(\.pendingLog)
        let oldest = pending.compactMap(\.oldest).min()
        let lag = oldest.map { ContinuousClock.now - $0 }.map { Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18 } ?? 0
        let status = NodeStatus(
            nodeID: nodeID, address: address, version: ShardFSVersion.string, pid: getpid(),
            dataDir: config.node.dataDir, metadataType: config.metadata.type, startedAt: startedAt,
            uptimeSeconds: now.timeIntervalSince(startedAt), leaseFresh: shards.leaseIsFresh(),
            leaseSecondsLeft: shards.leaseSecondsLeft(),
            volumes: rows, shardsByState: states, localShards: local.count, batchLogPendingBytes: Shard.pendingLogBytes,
            batchLogPendingBatches: pending.reduce(0) { $0 + $1.batches }, batchLogApplyLagSeconds: lag)
        NodeGauges.shared.update(status, usedBytes: used)
        return status
    }
}

/// The node's gauges, set from a status. Series of volumes or shards that went
/// away are removed, so a scrape shows only what the node has now.
final class NodeGauges: @unchecked Sendable {
    static let shared = NodeGauges()
    private let lock = NSLock()
    private var volumeSeries: [String: [Gauge]] = [:]
    private var shardSeries: [String: [Gauge]] = [:]

    /// `usedBytes`: each local shard's ID, bytes in use and size limit.
    func update(_ status: NodeStatus, usedBytes: [(UInt64, Int, Int)]) {
        lock.withLock {
            Gauge(label: "shardfs_build_info", dimensions: [("version", status.version)]).record(1)
            Gauge(label: "shardfs_start_time_seconds").record(status.startedAt.timeIntervalSince1970)
            Gauge(label: "shardfs_lease_fresh").record(status.leaseFresh ? 1 : 0)
            Gauge(label: "shardfs_batch_log_pending_bytes").record(status.batchLogPendingBytes)
            Gauge(label: "shardfs_batch_log_pending_batches").record(status.batchLogPendingBatches)
            Gauge(label: "shardfs_batch_log_apply_lag_seconds").record(status.batchLogApplyLagSeconds)
            if let left = status.leaseSecondsLeft { Gauge(label: "shardfs_lease_seconds_left").record(left) }
            Gauge(label: "shardfs_local_shards").record(status.localShards)
            for (state, count) in status.shardsByState {
                Gauge(label: "shardfs_shards", dimensions: [("state", state)]).record(count)
            }
            var volumes: [String: [Gauge]] = [:]
            for v in status.volumes {
                let d = [("volume", v.volumeID)]
                var g: [Gauge] = []
                func set(_ label: String, _ value: Double) {
                    let gauge = Gauge(label: label, dimensions: d)
                    gauge.record(value)
                    g.append(gauge)
                }
                set("shardfs_volume_primary", v.role == "primary" ? 1 : 0)
                set("shardfs_volume_writing", v.writing ? 1 : 0)
                set("shardfs_volume_epoch", Double(v.epoch))
                if let free = v.freeBytes, let size = v.sizeBytes {
                    set("shardfs_volume_free_bytes", Double(free))
                    set("shardfs_volume_size_bytes", Double(size))
                }
                if let generation = v.viewGeneration, let age = v.viewAgeSeconds {
                    set("shardfs_view_generation", Double(generation))
                    set("shardfs_view_age_seconds", age)
                }
                volumes[v.volumeID] = g
            }
            for (volume, gauges) in volumeSeries where volumes[volume] == nil { gauges.forEach { $0.destroy() } }
            volumeSeries = volumes

            let sorted = usedBytes.sorted { $0.1 > $1.1 }
            func ratio(_ used: Int, _ limit: Int) -> Double { limit > 0 ? Double(used) / Double(limit) : 0 }
            var shards: [String: [Gauge]] = [:]
            for (id, bytes, limit) in sorted.prefix(StorageNode.labelledShards) {
                let used = Gauge(label: "shardfs_shard_used_bytes", dimensions: [("shard", "\(id)")])
                used.record(bytes)
                let fill = Gauge(label: "shardfs_shard_fill_ratio", dimensions: [("shard", "\(id)")])
                fill.record(ratio(bytes, limit))
                shards["\(id)"] = [used, fill]
            }
            let other = Gauge(label: "shardfs_shard_used_bytes", dimensions: [("shard", "other")])
            other.record(sorted.dropFirst(StorageNode.labelledShards).reduce(0) { $0 + $1.1 })
            shards["other"] = [other]
            // The fullest shard, labelled or not: what to alert on.
            Gauge(label: "shardfs_shard_fill_ratio_max").record(usedBytes.map { ratio($0.1, $0.2) }.max() ?? 0)
            for (id, gauges) in shardSeries where shards[id] == nil { gauges.forEach { $0.destroy() } }
            shardSeries = shards
        }
    }
}
