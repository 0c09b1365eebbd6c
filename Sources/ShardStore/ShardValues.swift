import Foundation

/// Whether a shard takes writes. Closed is forever.
public enum ShardState: String, Codable, Sendable {
    case open
    case closed
}

/// An entry as read back.
public struct Entry: Sendable, Equatable {
    public var key: EntryKey
    public var value: [UInt8]
    public var indexes: [IndexPair]
    /// Nanoseconds since 1970.
    public var modificationTime: Int64
}

extension Entry {
    /// A logged put of `key` not yet applied to LMDB (the item's own key is the
    /// source's when the put was moved to `key` since).
    init(_ key: EntryKey, pending item: EntryWrite) {
        self.init(key: key, value: item.value, indexes: item.indexes, modificationTime: item.modificationTime ?? 0)
    }
}

/// What a file view needs of an entry, without its value.
public struct EntryAttributes: Sendable, Equatable {
    public var key: EntryKey
    public var size: Int
    public var modificationTime: Int64
    public var indexes: [IndexPair]
    public var metadata: EntryMetadata

    public init(key: EntryKey, size: Int, modificationTime: Int64, indexes: [IndexPair], metadata: EntryMetadata = EntryMetadata()) {
        self.key = key
        self.size = size
        self.modificationTime = modificationTime
        self.indexes = indexes
        self.metadata = metadata
    }
}

/// One row of a listing.
public struct EntrySummary: Sendable, Equatable {
    public var key: EntryKey
    public var size: Int
    public var modificationTime: Int64
    public var metadata: EntryMetadata = EntryMetadata()
}

/// What `updateEntry` may change of an entry, leaving its value as it is.
public struct EntryChange: Sendable {
    public var indexes: [IndexPair]
    public var modificationTime: Int64
    public var metadata: EntryMetadata
}

/// A listing row borrowed from the map; valid only inside the `forEachEntry` callback.
/// Size and time are read from the record only when asked for, so a listing of
/// names alone touches no record.
public struct EntryView {
    public let key: UnsafeRawBufferPointer
    @usableFromInline let record: UnsafeRawBufferPointer

    @usableFromInline init(key: UnsafeRawBufferPointer, record: UnsafeRawBufferPointer) {
        self.key = key
        self.record = record
    }

    @inlinable public var size: Int { recordValueSize(record) }
    @inlinable public var modificationTime: Int64 { recordModificationTime(record) }
    /// The entry's number (0: none), read from the record's extension.
    @inlinable public var entryNumber: UInt64 { recordEntryNumber(record) }
    /// Its metadata (mode, times), decoded from the record.
    public var metadata: EntryMetadata { recordMetadata(record) }
}

/// One item of a batch put. The key is validated by the shard (per-item status).
public struct EntryWrite: Sendable {
    public var key: [UInt8]
    public var value: [UInt8]
    public var indexes: [IndexPair]
    /// Nanoseconds since 1970; nil means now.
    public var modificationTime: Int64?
    /// Keep the indexes the entry has when the batch commits (`indexes` is ignored):
    /// a file rewritten through the mount keeps its extended attributes.
    public var keepsIndexes = false
    /// Delete the entry instead (nothing happens if it does not exist).
    public var isDeletion = false
    /// The number the entry gets if this put creates its key (an existing entry
    /// keeps its own); nil: the shard gives one. Logged puts carry theirs.
    public var entryNumber: UInt64?
    /// The mode the entry gets if this put creates its key (nil: the default).
    public var creationMode: UInt32?
    /// An update (`update(of:…)`): changes the existing entry's metadata and,
    /// when `modificationTime` is set, its time; its value, indexes and number stay.
    public internal(set) var isUpdate = false
    /// What an update or a move carries (one pointer, nil for a plain put or
    /// delete: the batch paths feel this struct's size).
    var extras: ItemExtras?

    /// For an update, the metadata it sets. On a pending put, in memory only: the
    /// metadata of pending updates of its key before it, which it keeps.
    public var metadataChange: MetadataChange? { extras?.change }
    /// For a move (`move(from:to:)`): the key whose entry is renamed to `key`,
    /// with its value, indexes and metadata, replacing what `key` held.
    public var movedFrom: [UInt8]? { extras?.movedFrom }
    public var isMove: Bool { extras?.movedFrom != nil }

    /// An item that renames the entry at `source` to `target`, as `Shard.rename`
    /// does (nothing happens if `source` has no entry when it is applied).
    /// `sourceBytes`: the inline value bytes of the source's record now (what
    /// the move may take in LMDB; the log's room check).
    static func move(from source: [UInt8], to target: [UInt8], sourceBytes: Int = chunkSize) -> EntryWrite {
        var item = EntryWrite(key: target, value: [])
        item.extras = ItemExtras(movedFrom: source, recordValueBytes: sourceBytes)
        return item
    }

    /// An item that changes the metadata of `key`'s entry (chmod, utimens) and
    /// nothing else; nil fields stay as they are. Logged like a put, applied in
    /// log order (an entry that is gone by then is left alone). `recordBytes`:
    /// as for `move`.
    public static func update(of key: [UInt8], modificationTime: Int64?, change: MetadataChange) -> EntryWrite {
        update(of: key, modificationTime: modificationTime, change: change, recordBytes: 0)
    }

    static func update(of key: [UInt8], modificationTime: Int64?, change: MetadataChange, recordBytes: Int) -> EntryWrite {
        var item = EntryWrite(key: key, value: [])
        item.modificationTime = modificationTime
        item.isUpdate = true
        item.extras = ItemExtras(change: change, recordValueBytes: recordBytes)
        return item
    }

    /// Sets the metadata change a pending item carries in memory (see `Shard.notePending`).
    mutating func setMetadataChange(_ change: MetadataChange?) {
        extras = ItemExtras(change: change, movedFrom: extras?.movedFrom, recordValueBytes: extras?.recordValueBytes ?? 0)
    }

    /// An item of a batch that deletes `key`.
    public static func deletion(of key: [UInt8]) -> EntryWrite {
        var item = EntryWrite(key: key, value: [])
        item.isDeletion = true
        return item
    }

    public init(key: [UInt8], value: [UInt8], indexes: [IndexPair] = [], modificationTime: Int64? = nil,
                keepsIndexes: Bool = false) {
        self.key = key
        self.value = value
        self.indexes = indexes
        self.modificationTime = modificationTime
        self.keepsIndexes = keepsIndexes
    }

    public init(key: EntryKey, value: [UInt8], indexes: [IndexPair] = [], modificationTime: Int64? = nil) {
        self.init(key: key.bytes, value: value, indexes: indexes, modificationTime: modificationTime)
    }
}

/// Metadata that an update sets (chmod, utimens). Nil fields stay as they are.
public struct MetadataChange: Sendable, Equatable {
    public var mode: UInt32?
    public var accessTime: Int64?
    public var changeTime: Int64?

    public init(mode: UInt32? = nil, accessTime: Int64? = nil, changeTime: Int64? = nil) {
        self.mode = mode
        self.accessTime = accessTime
        self.changeTime = changeTime
    }

    /// This change made after `earlier`: its fields win where it sets them.
    func after(_ earlier: MetadataChange?) -> MetadataChange {
        guard let earlier else { return self }
        return MetadataChange(mode: mode ?? earlier.mode, accessTime: accessTime ?? earlier.accessTime,
                              changeTime: changeTime ?? earlier.changeTime)
    }

    /// What of it outlives a rewrite of the value: mode and access time (a
    /// rewrite's change time is its modification time, as `writeEntry` keeps it).
    var keptByRewrite: MetadataChange? {
        mode == nil && accessTime == nil ? nil : MetadataChange(mode: mode, accessTime: accessTime)
    }

    func apply(to metadata: inout EntryMetadata) {
        if let mode { metadata.mode = mode }
        if let accessTime { metadata.accessTime = accessTime }
        if let changeTime { metadata.changeTime = changeTime }
    }
}

/// What an item beyond a plain put or delete carries (see `EntryWrite.extras`).
final class ItemExtras: Sendable {
    let change: MetadataChange?
    let movedFrom: [UInt8]?
    /// The inline value bytes of the record an update or move rewrites, when it
    /// was logged: what applying it may take in LMDB (the log's room check).
    let recordValueBytes: Int

    init(change: MetadataChange? = nil, movedFrom: [UInt8]? = nil, recordValueBytes: Int) {
        self.change = change
        self.movedFrom = movedFrom
        self.recordValueBytes = recordValueBytes
    }
}

public struct ShardStats: Sendable, Equatable {
    public var id: UInt64
    public var owner: String
    public var state: ShardState
    public var entries: Int
    /// Bytes of the data file holding live data (LMDB pages in use, not free-listed).
    public var usedBytes: Int
    /// The size limit: writes that would grow the shard past it fail as `full`.
    public var limitBytes: Int
}

/// How to open or create a shard.
public struct ShardOptions: Sendable {
    public static let defaultSizeLimit = 2 << 30  // 2 GiB
    public static let minimumSizeLimit = 256 << 10

    /// Size limit for a new shard (an existing shard keeps the one it was created with).
    public var sizeLimit = ShardOptions.defaultSizeLimit
    /// Open as a read-only view (backup nodes, read-only mounts): every write fails with `readOnlyView`.
    public var readOnly = false
    /// Commit with fsync (the default): a write is durable when it returns. When false,
    /// commits are atomic but only made durable by `sync()`.
    public var durableCommits = true
    /// Batch log size past which an append first applies everything and empties it.
    var batchLogLimit = 256 << 20
    /// How long an open waits for another instance to let go of the shard: a
    /// writer of another process (writable opens), or any instance of this one.
    var writerWait = Duration.seconds(2)

    public init() {}
}
