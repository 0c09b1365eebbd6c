import Foundation
import Logging
import Metadata
import MetadataEtcd
import Synchronization

/// Whether this node may act on its roles now: its etcd lease surely lives (by
/// this host's clock, with a margin), and it is the lease the roles were checked
/// under. When the lease lapsed and the store registered the node again, the node
/// may have been replaced meanwhile: until `recheck` has confirmed, from the
/// metadata, each volume it writes (deposing those another node won), it acts on
/// none. With the embedded store (one node, no leases) it always may.
public final class LeaseGuard: Sendable {
    private let etcd: EtcdMetadataStore?
    private let nodeID: String
    private let margin: Duration
    private let confirmed = Atomic<UInt64>(0)

    public init(metadata: any MetadataStore, nodeID: String, margin: Duration = .milliseconds(500)) {
        let base = (metadata as? RetryingMetadataStore)?.base ?? metadata
        etcd = base as? EtcdMetadataStore
        self.nodeID = nodeID
        self.margin = margin
    }

    /// Seconds until the node's lease may lapse (by this host's clock); nil with
    /// the embedded store, 0 when the store holds no lease for the node.
    public func secondsLeft() -> Double? {
        guard let etcd else { return nil }
        guard let (until, _) = etcd.leaseState(nodeID) else { return 0 }
        let left = until - ContinuousClock.now
        return max(0, Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18)
    }

    public func isFresh() -> Bool { freshGeneration() != nil }

    /// Which lease the node holds, if it is fresh (see `isFresh`); nil otherwise.
    /// A lease that lapsed is followed by another one (a new generation): what the
    /// node took under the old one — a backup's views — may no longer hold (the
    /// primary stops pinning for a backup that is not live). 0 with the embedded store.
    public func freshGeneration() -> UInt64? {
        guard let etcd else { return 0 }
        guard let (until, generation) = etcd.leaseState(nodeID) else { return nil }
        return generation == confirmed.load(ordering: .acquiring) && ContinuousClock.now + margin < until ? generation : nil
    }

    /// After a new lease: checks every volume this node writes against the
    /// metadata, deposes those it no longer holds at its epoch, then acts again.
    /// Returns whether there was anything to check.
    @discardableResult
    public func recheck(shards: ShardManager, metadata: any MetadataStore, logger: Logger) async -> Bool {
        guard let etcd, let (_, generation) = etcd.leaseState(nodeID),
              generation != confirmed.load(ordering: .acquiring) else { return false }
        do {
            for volume in try await metadata.listVolumes(nodeID: nil) {
                guard let held = shards.primaryEpoch(volume.volumeID) else { continue }
                if volume.primaryNodeID != nodeID || volume.epoch != held { shards.depose(volume.volumeID) }
            }
            confirmed.store(generation, ordering: .releasing)
            logger.notice("this node's lease lapsed and was granted anew; its roles are checked and it writes again",
                          metadata: ["node": "\(nodeID)"])
        } catch {
            logger.warning("cannot check this node's roles after its lease lapsed; retrying", metadata: ["error": "\(error)"])
        }
        return true
    }
}
