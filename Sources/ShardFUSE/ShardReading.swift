import ShardStore

/// What the mount's read paths need of a shard, whoever writes it: `Shard` (a
/// shard this node writes) and `ShardView` (a backup's view of a shard its
/// primary writes, at one published snapshot). Every read of one value
/// answers from one snapshot. A `ShardView` is valid only inside
/// `BackupViews.withView`: reach one through `ShardFileSystem.reading`, never
/// keep it. The write paths stay on `Shard`.
protocol ShardReading {
    var id: UInt64 { get }
    var owner: String { get }
    var state: ShardState { get }
    /// A backup's view: never written through this node, changes with each generation.
    var isBackupView: Bool { get }
    /// Cannot be written through the mount (a backup's view, or a shard opened read-only).
    var isReadOnlyView: Bool { get }
    func attributes(_ key: EntryKey) throws -> EntryAttributes?
    /// Up to `count` bytes of the value from `offset`, from one snapshot.
    func read(_ key: EntryKey, offset: Int, count: Int) throws -> [UInt8]
    /// Entries in key order after `after`, at most `limit`, from one snapshot.
    func list(after: EntryKey?, limit: Int) throws -> [EntrySummary]
    func stats() throws -> ShardStats
    /// The shard directory's stored modification time, if one was stored.
    func directoryTime() throws -> Int64?
}

extension Shard: ShardReading {
    var isBackupView: Bool { false }
}

extension ShardView: ShardReading {
    var isBackupView: Bool { true }
    var isReadOnlyView: Bool { true }
}
