import Metrics

/// How long the shards' durable writes take, fsyncs included
/// (`shardfs_commit_duration_seconds{kind}`, swift-metrics; a no-op until the
/// executable bootstraps a backend):
/// - `lmdb`: a group of LMDB writes (puts, deletes, renames, closes), the
///   pending batches it applies first included;
/// - `apply`: the log applier's transaction of logged batches;
/// - `log`: a batch-log append made durable (`fdatasync`), or the barrier that
///   writes and fdatasyncs deferred records (`Shard.syncDeferred`); a deferred
///   put itself costs no I/O and is not counted.
/// One sample per group, not per write. The handle is looked up per sample (the
/// backend's registry, under its lock): a handle made before the executable
/// bootstraps the backend would stay a no-op.
enum CommitMetrics {
    static func record(_ kind: String, since start: ContinuousClock.Instant) {
        let elapsed = ContinuousClock.now - start
        let nanoseconds = elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000
        Metrics.Timer(label: "shardfs_commit_duration_seconds", dimensions: [("kind", kind)]).recordNanoseconds(nanoseconds)
    }
}
