import Foundation
import LMDB
#if canImport(Glibc)
import Glibc
#endif

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
    /// A logged put not yet applied to LMDB (its key was checked when it was logged).
    init(pending item: EntryWrite) {
        self.init(key: EntryKey(trusted: item.key), value: item.value, indexes: item.indexes,
                  modificationTime: item.modificationTime ?? 0)
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
    /// How long a writable open waits for another instance to let go of the shard.
    var writerWait = Duration.seconds(2)

    public init() {}
}

/// A shard: one LMDB environment in its own directory. Safe to use from many
/// threads: reads run in parallel snapshots; writes are serialised and group-committed.
public final class Shard: @unchecked Sendable {
    public let path: String
    public let id: UInt64
    public let owner: String
    public let sizeLimit: Int
    public let isReadOnlyView: Bool

    @usableFromInline let env: Environment
    @usableFromInline let entries: Database
    let chunks: Database
    let staging: Database
    let indexes: Database
    let meta: Database

    private let stateLock = NSLock()
    private var committedState: ShardState
    private var committer: GroupCommitter<WriteContext>!

    struct WriteContext {
        let txn: Transaction
        var state: ShardState
        /// Keys this group changed, for `onCommit` (collected only when it is set).
        var changed: [[UInt8]] = []
        let observed: Bool

        mutating func changed(_ key: [UInt8]) {
            if observed { changed.append(key) }
        }
    }

    // The batch log (see BatchLog and `logBatch`). A logged batch is acknowledged
    // once it is in the log; it is applied to LMDB by the next LMDB writer (the
    // background `LogApplier`, any other write, or a read, which waits for it).
    /// nil: batches go straight to LMDB (a read-only view, or commits that are not
    /// durable anyway). Holding it (a file lock) makes this the shard's only
    /// writable instance.
    private let log: BatchLog?
    private var logCommitter: GroupCommitter<LogGroup>!
    private let logLock = NSLock()
    // Guarded by logLock:
    /// From `close()` on: no batch may be logged.
    private var logClosing = false
    /// An append failed and its bytes could not be cut back durably: the log is
    /// not appended to again (batches take the direct path).
    private var logBroken = false
    /// Logged batches not yet applied to LMDB, in sequence order.
    private var pendingBatches: [PendingBatch] = []
    /// The memory they hold (see `memorySize`), and what applying them may take in LMDB (see `applyCost`).
    private var pendingBytes = 0
    private var pendingCost = 0
    /// For point reads: a hash of each key written by a pending batch → the last
    /// item that wrote it. A key is pending while that item's batch is past
    /// `appliedSequence`; on a hash collision a read applies the log first.
    private var pendingKeys: [UInt64: PendingKey] = [:]
    private var pendingItems = 0
    private var appliedSequence: UInt64 = 0
    /// Why the last attempt to apply pending batches failed (nil once one succeeds).
    /// Until they are applied, every LMDB write fails with it (nothing may land
    /// after an acknowledged batch that is not in yet) and so does every read
    /// that needs them; each new attempt retries.
    private var logFailure: ShardError?
    /// When the last batch was logged (for the applier's idle test).
    private var lastLogTime = ContinuousClock.now
    /// The sequence of the last logged record; touched only by the log committer's leader.
    private var lastLogged: UInt64 = 0

    struct PendingBatch {
        let sequence: UInt64
        let items: [EntryWrite]
        let bytes: Int
        let cost: Int
    }

    struct PendingKey {
        let sequence: UInt64
        let item: Int
    }

    struct LogGroup {
        var next: UInt64
        var bytes: [UInt8] = []
        var batches: [PendingBatch] = []
        var cost = 0
    }

    /// Memory held by a shard's logged batches waiting for LMDB past which a batch
    /// put applies them first. Larger applies touch each B-tree page for more
    /// entries: with random keys, a transaction's cost follows the pages it
    /// touches, not its entries.
    static let pendingLimit = 256 << 20
    /// The same for all shards of the process together (a writer over it applies
    /// its own shard's batches first).
    static let processPendingLimit = 1 << 30
    private static let processPending = PendingTotal()
    /// Room kept free beside what logged batches may take: for direct writes in
    /// flight (a staged value commits 32 MiB at a time) and LMDB's own pages.
    static let logRoomMargin = 64 << 20
    /// Pending memory at which the background applier applies without waiting for a pause.
    static let applyThreshold = 64 << 20
    private let batchLogLimit: Int
    static let logAppliedKey = Array("logApplied".utf8)

    // Entry numbers (see EntryMetadata.number). Handed out by `newEntryNumber`
    // to direct writes, logged puts and the mount's new files; every commit that
    // may hold one stores the last handed out in `meta` (`storeEntryNumbers`),
    // and the batch log keeps those of logged puts, so none is given twice.
    private let numberLock = NSLock()
    private var lastEntryNumber: UInt64 = 0
    private var storedEntryNumber: UInt64 = 0
    static let lastEntryNumberKey = Array("lastEntryNumber".utf8)

    private let observerLock = NSLock()
    private var commitObserver: (@Sendable ([[UInt8]]) -> Void)?

    /// Called after each commit with the keys it changed (put, delete, rename,
    /// index and time changes), on the committing thread: keep it short.
    public var onCommit: (@Sendable ([[UInt8]]) -> Void)? {
        get { observerLock.withLock { commitObserver } }
        set { observerLock.withLock { commitObserver = newValue } }
    }

    public var state: ShardState { stateLock.withLock { committedState } }

    // MARK: Opening

    /// Creates a new shard in the directory `path`, which must not exist yet.
    ///
    /// Atomic: the shard is built in `<path>.creating`, which is renamed to `path`
    /// once its descriptor is durable, and the rename is made durable (parent
    /// directory fsync'ed) before this returns. After a crash there is either no
    /// `path` or a complete shard; a leftover `.creating` directory is garbage.
    public static func create(at path: String, id: UInt64, owner: String, options: ShardOptions = ShardOptions()) throws -> Shard {
        guard !owner.isEmpty else { throw ShardError.clientIDRequired }
        guard options.sizeLimit >= ShardOptions.minimumSizeLimit else {
            throw ShardError.invalidArgument("a shard's size limit is at least \(ShardOptions.minimumSizeLimit) bytes")
        }
        guard !options.readOnly else { throw ShardError.readOnlyView }
        let fm = FileManager.default
        if fm.fileExists(atPath: path) { throw ShardError.shardExists(path) }
        let building = path + ".creating"
        do {
            try? fm.removeItem(atPath: building)
            try fm.createDirectory(atPath: building, withIntermediateDirectories: true)
        } catch {
            throw ShardError.storage("cannot create \(building): \(error.localizedDescription)")
        }
        do {
            let descriptor = Descriptor(id: id, owner: owner, state: .open, sizeLimit: options.sizeLimit)
            let built = try Shard(path: building, creating: descriptor, options: options)
            try built.sync()  // even with durableCommits off, the descriptor is on disk
            try syncDirectory(building)
            guard Glibc.rename(building, path) == 0 else {
                throw errno == EEXIST || errno == ENOTEMPTY
                    ? ShardError.shardExists(path) : ShardError.storage("cannot rename \(building): \(String(cString: strerror(errno)))")
            }
            try syncDirectory(URL(fileURLWithPath: path).deletingLastPathComponent().path)
        } catch {
            try? fm.removeItem(atPath: building)
            throw error
        }
        return try open(at: path, options: options)
    }

    /// Opens the shard in `path`. An open shard opens writable unless `options.readOnly`.
    public static func open(at path: String, options: ShardOptions = ShardOptions()) throws -> Shard {
        guard FileManager.default.fileExists(atPath: path + "/data.mdb") else {
            throw ShardError.notAShard("\(path) holds no shard data")
        }
        return try Shard(path: path, creating: nil, options: options)
    }

    private init(path: String, creating descriptor: Descriptor?, options: ShardOptions) throws {
        var envOptions = EnvironmentOptions(mapSize: descriptor?.sizeLimit ?? ShardOptions.minimumSizeLimit)
        envOptions.readOnly = options.readOnly
        envOptions.noSync = !options.durableCommits
        envOptions.maxDatabases = 5
        let dbFlags: DatabaseFlags = options.readOnly ? [] : [.create]
        do {
            env = try Environment(path: path, options: envOptions)
            entries = try env.openDatabase("entries", flags: dbFlags)
            chunks = try env.openDatabase("chunks", flags: dbFlags)
            staging = try env.openDatabase("staging", flags: dbFlags)
            indexes = try env.openDatabase("indexes", flags: dbFlags.union(.duplicateSort))
            meta = try env.openDatabase("meta", flags: dbFlags)
        } catch let error as LMDBError {
            throw error == .notFound
                ? ShardError.notAShard("\(path) lacks the shard databases")
                : ShardError.storage("cannot open shard at \(path): \(error)")
        }
        let stored: Descriptor
        if let descriptor {
            let meta = self.meta
            try env.write { txn in try descriptor.store(txn, meta) }
            stored = descriptor
        } else {
            let meta = self.meta
            stored = try env.read { txn in try Descriptor.load(txn, meta, path: path) }
            // Read-only views too: the writer may grow the file up to the limit, and
            // a view whose map is smaller fails every read with MDB_MAP_RESIZED.
            if stored.sizeLimit > env.info.mapSize {
                try env.setMapSize(stored.sizeLimit)
            }
        }
        self.path = path
        self.id = stored.id
        self.owner = stored.owner
        self.sizeLimit = stored.sizeLimit
        self.committedState = stored.state
        self.isReadOnlyView = options.readOnly
        self.batchLogLimit = options.batchLogLimit
        // A shard being created gets its log when it is opened under its final name.
        self.log = descriptor == nil && !options.readOnly && options.durableCommits ? try BatchLog(directory: path, lockWait: options.writerWait) : nil
        self.logClosing = stored.state == .closed
        self.committer = GroupCommitter(runGroup: { [unowned self] group in self.run(group) })
        self.logCommitter = GroupCommitter(runGroup: { [unowned self] group in self.runLogGroup(group) })
        if !options.readOnly {
            // Reader slots of processes killed mid-read would pin old pages forever.
            env.clearStaleReaders()
        }
        let meta = self.meta
        let storedNumber = try env.read { txn in try Self.metaCounter(txn, meta, Self.lastEntryNumberKey) }
        (lastEntryNumber, storedEntryNumber) = (storedNumber, storedNumber)
        try replayLog()
        // Staged chunks a crash left are garbage: remove them, but a failure here
        // (say, a full shard) must not keep the shard from opening.
        if !options.readOnly {
            try? discardStagedChunks()
        }
    }

    // MARK: Writes

    /// Puts one entry: replaces its value and indexes in one durable transaction.
    public func put(_ key: EntryKey, value: [UInt8], indexes: [IndexPair] = [], clientID: String,
                    modificationTime: Int64? = nil) throws {
        try IndexPair.validate(indexes)
        try checkLimits(keyCount: key.bytes.count, valueCount: value.count, indexes: indexes)
        let mtime = modificationTime ?? Shard.now()
        let item = EntryWrite(key: key, value: value, indexes: indexes, modificationTime: mtime)
        try write(clientID: clientID) { ctx in
            try self.writeEntry(ctx.txn, item, defaultTime: mtime)
            ctx.changed(key.bytes)
        }
    }

    /// Values larger than this are written in several transactions of about this
    /// size each (then switched to in one), so a write's memory stays bounded.
    public static let stagingThreshold = 32 << 20

    /// Puts one entry whose value comes from `source` rather than memory: `source`
    /// fills a buffer with `count` bytes of the value starting at `offset`. Chunks
    /// are filled in place. Values over `stagingThreshold` are staged into a fresh
    /// chunk set in several transactions and made visible by a last one: readers
    /// see the old value or the new one, never a mix, and memory stays bounded.
    /// `indexes` nil keeps the indexes the entry has at commit time (a file
    /// rewritten through the mount keeps its extended attributes).
    /// `source` must not throw `ShardError`.
    /// `entryNumber`: the number the entry gets if this put creates it (see `newEntryNumber`).
    public func put(_ key: EntryKey, size: Int, indexes: [IndexPair]? = [], clientID: String, modificationTime: Int64? = nil,
                    entryNumber: UInt64? = nil,
                    source: @escaping (_ offset: Int, _ buffer: UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard size >= 0 else { throw ShardError.invalidArgument("negative size") }
        if let indexes { try IndexPair.validate(indexes) }
        try checkLimits(keyCount: key.bytes.count, valueCount: size, indexes: indexes ?? [])
        let mtime = modificationTime ?? Shard.now()
        var staged: UInt64?
        if size > Self.stagingThreshold {
            staged = try stageChunks(size: size, clientID: clientID, source: source)
        }
        do {
            try write(clientID: clientID) { [staged] ctx in
                let kept = try indexes ?? ctx.txn.get(self.entries, key.bytes).map { try RecordView($0).indexes() } ?? []
                try self.writeEntry(ctx.txn, key: key.bytes, size: size, indexes: kept, modificationTime: mtime,
                                    stagedChunkSet: staged, entryNumber: entryNumber, source: source)
                if let staged { try ctx.txn.delete(self.staging, chunkSetKey(staged)) }
                ctx.changed(key.bytes)
            }
        } catch {
            if let staged { try? discardStaged(staged) }
            throw error
        }
    }

    /// Writes the chunks of a value into a new chunk set, `stagingThreshold` bytes
    /// per transaction; the set is listed in `staging` until a record uses it.
    func stageChunks(size: Int, clientID: String,
                             source: @escaping (Int, UnsafeMutableRawBufferPointer) throws -> Void) throws -> UInt64 {
        var set: UInt64 = 0
        try write(clientID: clientID) { ctx in
            set = try self.newChunkSet(ctx.txn)
            try ctx.txn.put(self.staging, chunkSetKey(set), [])
        }
        let total = (size + chunkSize - 1) / chunkSize, perTransaction = Self.stagingThreshold / chunkSize
        do {
            var first = 0
            while first < total {
                let range = first..<min(total, first + perTransaction)
                try write(clientID: clientID) { [set] ctx in
                    for n in range {
                        let out = try chunkKey(set, n).withUnsafeBytes {
                            try ctx.txn.reserve(self.chunks, $0, count: min(chunkSize, size - n * chunkSize))
                        }
                        try source(n * chunkSize, out)
                    }
                }
                first = range.upperBound
            }
        } catch {
            try? discardStaged(set)
            throw error
        }
        return set
    }

    /// Removes a staged chunk set (a put that failed or was interrupted).
    func discardStaged(_ set: UInt64) throws {
        try committer.submit { ctx in
            try self.deleteChunkSet(ctx.txn, set)
            try ctx.txn.delete(self.staging, chunkSetKey(set))
        }
    }

    /// At open: chunk sets a crash left half-written are garbage.
    private func discardStagedChunks() throws {
        for set in try stagedSets() { try discardStaged(set) }
    }

    /// Replaces an entry's indexes, leaving its value and time untouched; `change`
    /// gets the current indexes. Atomic with respect to every other write.
    public func updateIndexes(_ key: EntryKey, clientID: String, _ change: @escaping ([IndexPair]) throws -> [IndexPair]) throws {
        let now = Shard.now()
        try updateEntry(key, clientID: clientID) { entry in
            entry.indexes = try change(entry.indexes)
            entry.metadata.changeTime = now
        }
    }

    /// Changes an entry's indexes, modification time or metadata (mode, times),
    /// leaving its value as it is; `change` gets the current ones (it must not
    /// change the number). Atomic with respect to every other write.
    public func updateEntry(_ key: EntryKey, clientID: String, _ change: @escaping (inout EntryChange) throws -> Void) throws {
        try write(clientID: clientID) { ctx in
            let txn = ctx.txn
            guard let raw = try txn.get(self.entries, key.bytes) else { throw ShardError.entryNotFound(key) }
            let view = try RecordView(raw)
            let oldIndexes = view.indexes()
            var entry = EntryChange(indexes: oldIndexes, modificationTime: view.modificationTime, metadata: view.metadata)
            try change(&entry)
            try IndexPair.validate(entry.indexes)
            entry.metadata.number = view.metadata.number
            let size = view.size
            let chunkSet: UInt64? = view.flags.contains(.chunked) ? view.chunkSet : nil
            let inline = Array(view.inlineValue)
            let old = try self.oldEntry(raw)
            let indexesChanged = entry.indexes != oldIndexes
            // From here on only LMDB can fail (the group rule: no ShardError after a change).
            if indexesChanged {
                for index in old.indexes {
                    _ = try index.reverseKey.withUnsafeBytes { k in try key.bytes.withUnsafeBytes { try txn.delete(self.indexes, k, value: $0) } }
                }
            }
            let count = recordHeadSize(chunked: chunkSet != nil, indexes: entry.indexes, metadata: entry.metadata) + inline.count
            try key.bytes.withUnsafeBytes { k in
                let out = try txn.reserve(self.entries, k, count: count)
                let offset = encodeRecordHead(into: out, chunkSet: chunkSet, modificationTime: entry.modificationTime, size: size,
                                              indexes: entry.indexes, metadata: entry.metadata)
                inline.withUnsafeBytes { v in
                    if let base = v.baseAddress { out.baseAddress!.advanced(by: offset).copyMemory(from: base, byteCount: v.count) }
                }
            }
            if indexesChanged { try self.addReverseIndexes(txn, key: key.bytes, entry.indexes) }
            ctx.changed(key.bytes)
        }
    }

    /// Puts many entries in one transaction. Items that fail validation get their
    /// error at their position and are skipped; the others commit together. Errors
    /// of the whole batch (fenced, closed, full) are thrown and nothing is committed.
    public func batchPut(_ items: [EntryWrite], clientID: String) throws -> [ShardError?] {
        var statuses = [ShardError?](repeating: nil, count: items.count)
        var invalid = 0
        for i in items.indices {
            do {
                if let problem = EntryKey.problem(with: items[i].key) { throw ShardError.invalidKey(problem) }
                if !items[i].indexes.isEmpty { try IndexPair.validate(items[i].indexes) }
                try checkLimits(keyCount: items[i].key.count, valueCount: items[i].value.count, indexes: items[i].indexes)
            } catch let error as ShardError {
                statuses[i] = error
                invalid += 1
            }
        }
        if invalid == items.count { return statuses }
        let now = Shard.now()
        // A batch that appends commits directly (LMDB's best case); others are logged.
        let appending = try appendsPastLastKey(items, statuses)
        if !appending, try logBatch(items, statuses: statuses, now: now, clientID: clientID) { return statuses }
        try write(clientID: clientID) { [statuses] ctx in
            for i in items.indices where statuses[i] == nil {
                try self.applyItem(ctx.txn, items[i], defaultTime: now, appending: appending)
                ctx.changed(items[i].key)
            }
        }
        return statuses
    }

    /// Deletes an entry; `entryNotFound` if there is none.
    public func delete(_ key: EntryKey, clientID: String) throws {
        try write(clientID: clientID) { ctx in
            guard let old = try self.readOld(ctx.txn, key.bytes) else { throw ShardError.entryNotFound(key) }
            try self.removeEntry(ctx.txn, key: key.bytes, old: old)
            ctx.changed(key.bytes)
        }
    }

    /// Renames an entry within the shard, atomically replacing `to` if it exists.
    public func rename(_ from: EntryKey, to: EntryKey, clientID: String) throws {
        try write(clientID: clientID) { ctx in
            let txn = ctx.txn
            guard let source = try self.readOld(txn, from.bytes) else { throw ShardError.entryNotFound(from) }
            if from == to { return }
            let record = try txn.get(self.entries, from.bytes).map { Array($0) }!
            if let target = try self.readOld(txn, to.bytes) {
                try self.removeEntry(txn, key: to.bytes, old: target)
            }
            // The record names its chunk set: the chunks stay where they are.
            try txn.put(self.entries, to.bytes, record)
            for index in source.indexes {
                let rk = index.reverseKey
                try rk.withUnsafeBytes { k in
                    _ = try from.bytes.withUnsafeBytes { try txn.delete(self.indexes, k, value: $0) }
                    try to.bytes.withUnsafeBytes { try txn.put(self.indexes, k, $0) }
                }
            }
            try txn.delete(self.entries, from.bytes)
            ctx.changed(from.bytes)
            ctx.changed(to.bytes)
        }
    }

    /// Sets an entry's modification time (nanoseconds since 1970), e.g. for `touch` or `rsync -a`.
    public func setModificationTime(_ key: EntryKey, _ time: Int64, clientID: String) throws {
        let now = Shard.now()
        try updateEntry(key, clientID: clientID) { entry in
            entry.modificationTime = time
            entry.metadata.changeTime = now
        }
    }

    /// Closes the shard: from now on, and after any restart, every write fails with `closed`.
    /// Closing a closed shard does nothing.
    public func close() throws {
        guard !isReadOnlyView else { throw ShardError.readOnlyView }
        // No batch may be logged once the close commits: stop appends, and wait out
        // a log group in flight (its batches are then pending, and the commit below
        // applies them first, or fails with nothing committed).
        let wasClosing = logLock.withLock { defer { logClosing = true }; return logClosing }
        do {
            if log != nil { try logCommitter.submit { _ in } }
            try committer.submit { ctx in
                if ctx.state == .closed { return }
                try ctx.txn.put(self.meta, Array("state".utf8), Array(ShardState.closed.rawValue.utf8))
                ctx.state = .closed
            }
        } catch {
            logLock.withLock { logClosing = wasClosing }
            throw error
        }
    }

    /// Flushes commits made with `durableCommits == false` to disk.
    public func sync() throws {
        do { try env.sync(force: true) } catch { throw ShardError.from(error, limit: sizeLimit) }
    }

    // MARK: Reads

    public func get(_ key: EntryKey) throws -> Entry {
        try readSeeingPending(CollectionOfOne(key.bytes)) { pending, txn in
            switch pending?[0] {
            case .put(let item)?: return Entry(pending: item)
            case .deleted?: throw ShardError.entryNotFound(key)
            case .notPending?, nil: break
            }
            guard let raw = try txn.get(entries, key.bytes) else { throw ShardError.entryNotFound(key) }
            let view = try RecordView(raw)
            return Entry(key: key, value: try value(txn, key.bytes, view), indexes: view.indexes(),
                         modificationTime: view.modificationTime)
        }
    }

    /// Gets many entries from one snapshot; a missing entry is reported at its position.
    public func batchGet(_ keys: [EntryKey]) throws -> [Result<Entry, ShardError>] {
        try readSeeingPending(keys.lazy.map(\.bytes)) { pending, txn in
            keys.indices.map { i in
                let key = keys[i]
                switch pending?[i] {
                case .put(let item)?: return .success(Entry(pending: item))
                case .deleted?: return .failure(.entryNotFound(key))
                case .notPending?, nil: break
                }
                do {
                    guard let raw = try txn.get(entries, key.bytes) else { return .failure(.entryNotFound(key)) }
                    let view = try RecordView(raw)
                    return .success(Entry(key: key, value: try value(txn, key.bytes, view), indexes: view.indexes(),
                                          modificationTime: view.modificationTime))
                } catch let error as ShardError {
                    return .failure(error)
                } catch {
                    return .failure(.storage("\(error)"))
                }
            }
        }
    }

    /// Size, modification time and indexes of an entry, or nil if there is none.
    public func attributes(_ key: EntryKey) throws -> EntryAttributes? {
        try readSeeingPending(CollectionOfOne(key.bytes)) { pending, txn in
            let stored = try txn.get(entries, key.bytes).map { try RecordView($0) }
            switch pending?[0] {
            case .put(let item)?:
                // The entry keeps what it has beside its value (a deletion pending
                // before this put may yet drop it: then the put's number holds).
                var metadata = stored?.metadata ?? EntryMetadata(number: item.entryNumber ?? 0)
                metadata.changeTime = nil
                if metadata.number == 0 { metadata.number = item.entryNumber ?? 0 }
                return EntryAttributes(key: key, size: item.value.count, modificationTime: item.modificationTime ?? 0,
                                       indexes: item.indexes, metadata: metadata)
            case .deleted?: return nil
            case .notPending?, nil: break
            }
            guard let view = stored else { return nil }
            return EntryAttributes(key: key, size: view.size, modificationTime: view.modificationTime,
                                   indexes: view.indexes(), metadata: view.metadata)
        }
    }

    /// Up to `count` bytes of the value from `offset`, touching only the chunks needed.
    public func read(_ key: EntryKey, offset: Int, count: Int) throws -> [UInt8] {
        guard offset >= 0, count >= 0 else { throw ShardError.invalidArgument("negative offset or count") }
        return try readSeeingPending(CollectionOfOne(key.bytes)) { pending, txn in
            switch pending?[0] {
            case .put(let item)?:
                let end = min(item.value.count, offset &+ count)
                return offset < end ? Array(item.value[offset..<end]) : []
            case .deleted?: throw ShardError.entryNotFound(key)
            case .notPending?, nil: break
            }
            guard let raw = try txn.get(entries, key.bytes) else { throw ShardError.entryNotFound(key) }
            let view = try RecordView(raw)
            let end = min(view.size, offset &+ count)
            guard offset < end else { return [] }
            if !view.flags.contains(.chunked) { return Array(view.inlineValue[offset..<end]) }
            var out: [UInt8] = []
            out.reserveCapacity(end - offset)
            var position = offset
            while position < end {
                let n = position / chunkSize
                let chunk = try self.chunk(txn, key.bytes, n, view)
                let start = position - n * chunkSize
                let stop = min(chunk.count, end - n * chunkSize)
                out.append(contentsOf: chunk[start..<stop])
                position = n * chunkSize + stop
            }
            return out
        }
    }

    /// Entries in key order, starting after `after` (or at the first), at most `limit` of them.
    public func list(after: EntryKey? = nil, limit: Int = .max) throws -> [EntrySummary] {
        var rows: [EntrySummary] = []
        try forEachEntry(after: after) { view in
            guard rows.count < limit else { return false }
            rows.append(EntrySummary(key: EntryKey(trusted: Array(view.key)), size: view.size,
                                     modificationTime: view.modificationTime, metadata: view.metadata))
            return rows.count < limit
        }
        return rows
    }

    /// Visits entries in key order from one snapshot until `body` returns false.
    /// The view is valid only during the call. Inlinable: listings are hot, and
    /// specialising the caller's closure into the loop matters.
    @inlinable
    public func forEachEntry(after: EntryKey? = nil, _ body: (EntryView) throws -> Bool) throws {
        try readTransaction { txn in
            try txn.withCursor(entries) { cursor in
                var pair: Cursor.Pair?
                if let after {
                    pair = try after.bytes.withUnsafeBytes { try cursor.seek(atLeast: $0) }
                    if let p = pair, p.key.elementsEqual(after.bytes) { pair = try cursor.next() }
                } else {
                    pair = try cursor.first()
                }
                // Cache misses bound a scan, so it overlaps them: on reaching a
                // leaf page it asks for all of that page's nodes at once, and it
                // gathers entries in blocks, prefetching each record, before
                // handing them to `body`. Pages stay mapped for the whole read
                // transaction, so held pointers stay valid.
                var pages = LeafPagePrefetcher(env)
                try withUnsafeTemporaryAllocation(of: Cursor.Pair.self, capacity: Shard.scanBlock) { block in
                    while pair != nil {
                        var count = 0
                        while let p = pair, count < Shard.scanBlock {
                            pages.visit(key: p.key.baseAddress)
                            prefetch(p.value.baseAddress)
                            block.initializeElement(at: count, to: p)
                            count += 1
                            pair = try cursor.next()
                        }
                        for i in 0..<count {
                            let (key, raw) = block[i]
                            guard recordHeadIsSane(raw) else {
                                throw ShardError.corrupt("unreadable record for key \(String(decoding: key, as: UTF8.self))")
                            }
                            guard try body(EntryView(key: key, record: raw)) else { return }
                        }
                    }
                }
            }
        }
    }

    /// Entries a scan gathers before handing them on (a few pages' worth).
    @usableFromInline static let scanBlock = 64

    /// Keys of the entries whose index `name` has exactly `value`, in key order.
    public func find(indexName name: String, value: [UInt8], after: EntryKey? = nil, limit: Int = .max) throws -> [EntryKey] {
        let nameBytes = Array(name.utf8)
        guard !nameBytes.isEmpty, nameBytes.count <= IndexPair.maxNameLength else {
            throw ShardError.invalidIndex("an index name is 1–\(IndexPair.maxNameLength) bytes")
        }
        let rk = nameBytes.withUnsafeBytes { n in value.withUnsafeBytes { reverseIndexKey(name: n, value: $0) } }
        let hashed = reverseIndexKeyIsHashed(value.count)
        return try readTransaction { txn in
            var keys: [EntryKey] = []
            try txn.withCursor(indexes) { cursor in
                var pair: Cursor.Pair? = try rk.withUnsafeBytes { k in
                    if let after {
                        var p = try after.bytes.withUnsafeBytes { try cursor.seek(key: k, atLeastValue: $0) }
                        if let found = p, found.value.elementsEqual(after.bytes) { p = try cursor.nextDuplicate() }
                        return p
                    }
                    return try cursor.seek(exactly: k)
                }
                while let p = pair, keys.count < limit {
                    let key = Array(p.value)
                    let matches = try !hashed || entryHasIndex(txn, key, name: nameBytes, value: value)
                    if matches {
                        keys.append(EntryKey(trusted: key))
                    }
                    pair = try cursor.nextDuplicate()
                }
            }
            return keys
        }
    }

    /// An upper bound of the bytes in use, without reading the free list (cheap:
    /// for checks on hot paths; `stats()` gives the exact figure).
    public var usedBytesUpperBound: Int { env.info.usedBytes + logLock.withLock { pendingCost } }

    public func stats() throws -> ShardStats {
        let (count, free) = try readTransaction { txn in (try txn.count(entries), try txn.freePageCount()) }
        let info = env.info
        let used = max(0, info.lastPage + 1 - free) * info.pageSize
        return ShardStats(id: id, owner: owner, state: state, entries: count, usedBytes: used, limitBytes: sizeLimit)
    }

    // MARK: The batch log

    deinit {
        // Batches still pending stay in the log, for the next open to replay.
        Self.processPending.add(-pendingBytes)
    }

    /// Whether batch puts go through the batch log (see `log`).
    var usesBatchLog: Bool { log != nil }

    /// Applies every logged batch to LMDB now. Reads call this first, so they see
    /// every acknowledged put; the background applier and clean shutdowns call it too.
    public func applyLog() throws {
        guard log != nil, hasPendingBatches else { return }
        // An LMDB writer applies pending batches before its group, or fails the
        // group with the reason.
        try committer.submit { _ in }
    }

    /// Logs a batch of valid items instead of committing it to LMDB, when it may
    /// be: the shard has a log and room to spare, and no value needs chunks.
    /// Returns false when the batch must take the direct path.
    private func logBatch(_ items: [EntryWrite], statuses: [ShardError?], now: Int64, clientID: String) throws -> Bool {
        guard log != nil else { return false }
        guard !clientID.isEmpty else { throw ShardError.clientIDRequired }
        guard clientID == owner else { throw ShardError.fenced(owner: owner, client: clientID) }
        var valid: [EntryWrite] = []
        valid.reserveCapacity(items.count)
        for i in items.indices where statuses[i] == nil {
            var item = items[i]
            // Chunked values, and more indexes than the log's count field holds, go direct.
            if item.value.count > chunkSize || item.indexes.count > Int(UInt16.max) { return false }
            if item.modificationTime == nil { item.modificationTime = now }
            // A point read of a pending put that creates its key must show the
            // number the entry will have: it is fixed now.
            if !item.isDeletion && item.entryNumber == nil { item.entryNumber = newEntryNumber() }
            // What is logged is what is applied, in memory now or replayed later.
            if item.keepsIndexes || item.isDeletion { item.indexes = [] }
            valid.append(item)
        }
        let size = BatchLog.encodedSize(valid)
        guard size <= Int(UInt32.max) else { return false }
        let cost = Self.applyCost(valid)
        let memory = Self.memorySize(valid)
        let (pending, failing) = logLock.withLock { (pendingBytes, logFailure != nil) }
        // Back-pressure, and a retry of a failed apply before more is acknowledged.
        if failing || pending + memory > Self.pendingLimit
            || Self.processPending.value + memory > Self.processPendingLimit {
            try applyLog()
        }
        var logged = false
        do {
            try logCommitter.submit { group in
                // Checked in log order: `close()` stops appends before it commits,
                // and room is reserved against everything logged before.
                let (closing, broken, pendingCost) = self.logLock.withLock { (self.logClosing, self.logBroken, self.pendingCost) }
                guard !closing, !broken, self.state == .open,
                      2 * self.env.info.usedBytes + pendingCost + group.cost + cost + Self.logRoomMargin <= self.sizeLimit
                else { return }
                BatchLog.encode(sequence: group.next, items: valid, into: &group.bytes)
                group.batches.append(PendingBatch(sequence: group.next, items: valid, bytes: memory, cost: cost))
                group.next += 1
                group.cost += cost
                logged = true
            }
        } catch where !logged {
            return false  // another member's failure: this batch was not written; go direct
        }
        guard logged else { return false }
        if let observer = onCommit { observer(valid.map(\.key)) }
        LogApplier.shared.wake(self)
        return true
    }

    /// Whether a batch commits straight to LMDB, appending: every key lies past
    /// the last key in the shard, and nothing is pending. That is LMDB's best case
    /// (new pages, filled in order, MDB_APPEND). Any other batch is logged: its
    /// acknowledgment waits for one log fsync instead of a commit's two, and the
    /// applier puts many batches into LMDB together, in key order, where entries
    /// share pages (measured: faster for scattered keys by far, and for keys
    /// counting up in the middle of the tree too). Either path is correct.
    private func appendsPastLastKey(_ items: [EntryWrite], _ statuses: [ShardError?]) throws -> Bool {
        guard !hasPendingBatches else { return false }
        var lowest: Int?
        for i in items.indices where statuses[i] == nil {
            if lowest.map({ compareKeys(items[i].key, items[$0].key) < 0 }) ?? true { lowest = i }
        }
        guard let lowest else { return false }
        let first = items[lowest].key
        let entries = self.entries
        return try readTransaction(applyingLog: false) { txn in
            try txn.withCursor(entries) { cursor in
                guard let last = try cursor.last() else { return true }
                return first.withUnsafeBytes { compareKeys(last.key, $0) } < 0
            }
        }
    }

    /// The memory pending items hold: their bytes and the arrays around them.
    static func memorySize(_ items: [EntryWrite]) -> Int {
        items.reduce(0) { sum, item in
            sum + 128 + item.key.count + item.value.count
                + item.indexes.reduce(0) { $0 + 80 + $1.name.utf8.count + $1.value.count }
        }
    }

    /// What applying these items may take in LMDB, generously: the records, one
    /// reverse-index row per index (which holds the entry's key again), and twice
    /// that for half-full pages after splits. With twice the pages in use (a
    /// transaction may copy every one), this is what the room check adds up, so an
    /// acknowledged batch never meets the size limit when it is applied.
    static func applyCost(_ items: [EntryWrite]) -> Int {
        items.reduce(0) { sum, item in
            let indexes = item.indexes.reduce(0) { $0 + 48 + 2 * ($1.name.utf8.count + $1.value.count) + item.key.count }
            return sum + 2 * (64 + item.key.count + item.value.count + indexes)
        }
    }

    /// Appends a group of batches to the log with one fdatasync (the log
    /// committer's leader runs this, one group at a time).
    private func runLogGroup(_ group: [GroupCommitter<LogGroup>.Pending]) {
        guard let log else { return }
        var ctx = LogGroup(next: lastLogged + 1)
        for member in group {
            do { try member.body(&ctx) } catch { member.error = error }
        }
        guard !ctx.batches.isEmpty else { return }
        do {
            // Under steady load something is always pending: past its size bound the
            // file is emptied anyway, once what it holds is applied.
            if log.end > batchLogLimit { try applyLog() }
            // Nothing pending: every record in the file is applied, so start afresh.
            if log.end > 0, !hasPendingBatches { try log.reset() }
            try log.append(ctx.bytes)
        } catch {
            if let logError = error as? BatchLogError, logError.broken { logLock.withLock { logBroken = true } }
            let failure = error as? ShardError ?? ShardError.storage("\(error)")
            for member in group { member.error = failure }
            return
        }
        lastLogged = ctx.next - 1
        let bytes = ctx.batches.reduce(0) { $0 + $1.bytes }
        Self.processPending.add(bytes)
        logLock.withLock {
            pendingBatches += ctx.batches
            pendingBytes += bytes
            pendingCost += ctx.cost
            for batch in ctx.batches {
                for (i, item) in batch.items.enumerated() { pendingKeys[keyHash(item.key)] = PendingKey(sequence: batch.sequence, item: i) }
                pendingItems += batch.items.count
            }
            lastLogTime = .now
        }
    }

    /// Whether the background applier should apply now: enough is pending for a
    /// transaction where entries share pages, or the writers have paused (so LMDB,
    /// and read-only views, catch up within milliseconds of the last put).
    func logIsWorthApplying() -> Bool {
        logLock.withLock {
            !holdingBackgroundApply && !pendingBatches.isEmpty
                && (pendingBytes >= Self.applyThreshold || ContinuousClock.now - lastLogTime >= LogApplier.idleDelay)
        }
    }

    var hasPendingBatches: Bool { logLock.withLock { !pendingBatches.isEmpty } }

    /// What a point read of one key finds in the pending logged batches.
    enum PendingLookup {
        /// Nothing pending for the key: LMDB has it (or not).
        case notPending
        /// The last pending put of the key (its value is inline: logged values are).
        case put(EntryWrite)
        case deleted
    }

    /// Runs `body` in a read snapshot, with what pending logged batches hold for
    /// each of `keys` (nil when nothing is pending for them), so a point read sees
    /// every acknowledged put without waiting for the log to be applied (a lookup
    /// of a name being created must not wait for a commit either). The lookups
    /// and the snapshot's start are taken together under `logLock` (an apply
    /// takes its batches off the pending list under it, after its commit), so
    /// they agree: no write lands between them. When the pending map cannot tell
    /// (a hash collision, or a put that keeps the indexes LMDB holds), the log is
    /// applied first and the lookup is made again.
    func readSeeingPending<Keys: Collection<[UInt8]>, R>(_ keys: Keys, _ body: ([PendingLookup]?, Transaction) throws -> R) throws -> R {
        let hashes = log == nil ? [] : keys.map(keyHash)
        while true {
            let outcome: R?
            do {
                outcome = try env.read(prepare: { begin in
                    try logLock.withLock {
                        let answer = hashes.isEmpty ? PendingAnswer.none : pendingAnswer(keys, hashes)
                        try begin()
                        return answer
                    }
                }) { answer, txn -> R? in
                    switch answer {
                    case .unknown: return nil
                    case .none: return try body(nil, txn)
                    case .lookups(let lookups): return try body(lookups, txn)
                    }
                }
            } catch let error as ShardError {
                throw error
            } catch {
                throw ShardError.from(error, limit: sizeLimit)
            }
            if let outcome { return outcome }
            try applyLog()
        }
    }

    /// What the pending map says about `keys` (whose hashes are `hashes`). Under `logLock`.
    private func pendingAnswer<Keys: Collection<[UInt8]>>(_ keys: Keys, _ hashes: [UInt64]) -> PendingAnswer {
        guard let base = pendingBatches.first?.sequence else { return .none }
        var lookups: [PendingLookup] = []
        var any = false
        for (key, hash) in zip(keys, hashes) {
            guard let found = pendingKeys[hash], found.sequence > appliedSequence else {
                lookups.append(.notPending)
                continue
            }
            guard found.sequence >= base else { return .unknown }
            let at = Int(found.sequence - base)
            guard at < pendingBatches.count, pendingBatches[at].sequence == found.sequence else { return .unknown }
            let item = pendingBatches[at].items[found.item]
            guard item.key == key, !item.keepsIndexes else { return .unknown }
            lookups.append(item.isDeletion ? .deleted : .put(item))
            any = true
        }
        return any ? .lookups(lookups) : .none
    }

    private enum PendingAnswer { case none, lookups([PendingLookup]), unknown }

    /// Applies the pending batches in one durable transaction that also records
    /// the last applied sequence (so a restart replays exactly the rest), or, if
    /// that fails, batch by batch. Runs in the LMDB committer's leader, before its
    /// group; returns why pending batches could not all be applied.
    private func applyPendingBatches() -> ShardError? {
        let batches = logLock.withLock { pendingBatches }
        guard !batches.isEmpty else { return nil }
        do {
            try applyBatches(batches)
        } catch {
            // A large group may not fit where its batches one by one do.
            for batch in batches {
                do { try applyBatches([batch]) } catch {
                    let failure = ShardError.storage(
                        "acknowledged batches cannot be applied yet (\(ShardError.from(error, limit: sizeLimit))); they are kept in the batch log and retried")
                    logLock.withLock { logFailure = failure }
                    return failure
                }
            }
        }
        logLock.withLock { logFailure = nil }
        return nil
    }

    /// Tests only: keeps the background applier away from this shard, so what is
    /// pending stays pending until a write, a scan or `applyLog()` applies it.
    var backgroundApplyHeld: Bool {
        get { logLock.withLock { holdingBackgroundApply } }
        set { logLock.withLock { holdingBackgroundApply = newValue } }
    }
    private var holdingBackgroundApply = false

    /// Tests only: an error to fail the next applies with (a full or failing disk).
    var applyFault: (@Sendable () throws -> Void)? {
        get { logLock.withLock { injectedApplyFault } }
        set { logLock.withLock { injectedApplyFault = newValue } }
    }
    private var injectedApplyFault: (@Sendable () throws -> Void)?

    private func applyBatches(_ batches: [PendingBatch]) throws {
        if let fault = applyFault { try fault() }
        var numbers: UInt64?
        try env.write { txn in
            try applyInKeyOrder(txn, batches.map(\.items))
            try setMetaCounter(txn, Self.logAppliedKey, batches.last!.sequence)
            numbers = try storeEntryNumbers(txn)
        }
        entryNumbersStored(numbers)
        let bytes = batches.reduce(0) { $0 + $1.bytes }
        let cost = batches.reduce(0) { $0 + $1.cost }
        Self.processPending.add(-bytes)
        logLock.withLock {
            pendingBatches.removeFirst(batches.count)
            pendingBytes -= bytes
            pendingCost -= cost
            appliedSequence = batches.last!.sequence
            pendingItems -= batches.reduce(0) { $0 + $1.items.count }
            if pendingBatches.isEmpty {
                pendingKeys.removeAll(keepingCapacity: true)
            } else if pendingKeys.count > 2 * pendingItems + 65_536 {
                // Under steady load the map would keep every key ever written.
                pendingKeys.removeAll(keepingCapacity: true)
                for batch in pendingBatches {
                    for (i, item) in batch.items.enumerated() { pendingKeys[keyHash(item.key)] = PendingKey(sequence: batch.sequence, item: i) }
                }
            }
        }
    }

    /// Applies the items of many batches in key order: inserts that follow the
    /// B-tree's order touch each page once, with its path still in cache, where
    /// random keys would jump between pages. Items of one key keep their log
    /// order, so the last one wins, as it would applied batch by batch.
    private func applyInKeyOrder(_ txn: Transaction, _ batches: [[EntryWrite]]) throws {
        let items = batches.count == 1 ? batches[0] : Array(batches.joined())
        // The keys go into one buffer, so the sort compares bytes without touching
        // (and retaining) the items; it orders by the first 8 bytes as an integer,
        // then by whole keys, then by log order (the items' order).
        typealias Position = (prefix: UInt64, offset: UInt32, length: UInt32, index: UInt32)
        var keys: [UInt8] = []
        keys.reserveCapacity(items.reduce(0) { $0 + $1.key.count })
        var order: [Position] = []
        order.reserveCapacity(items.count)
        for (i, item) in items.enumerated() {
            order.append((keyPrefix(item.key), UInt32(keys.count), UInt32(item.key.count), UInt32(i)))
            keys.append(contentsOf: item.key)
        }
        keys.withUnsafeBytes { keys in
            func precedes(_ x: Position, _ y: Position) -> Bool {
                if x.prefix != y.prefix { return x.prefix < y.prefix }
                let c = compareKeys(UnsafeRawBufferPointer(rebasing: keys[Int(x.offset)..<Int(x.offset + x.length)]),
                                    UnsafeRawBufferPointer(rebasing: keys[Int(y.offset)..<Int(y.offset + y.length)]))
                return c != 0 ? c < 0 : x.index < y.index
            }
            // Appends (keys already increasing) need no sort.
            if !order.indices.dropFirst().allSatisfy({ precedes(order[$0 - 1], order[$0]) }) {
                order.sort(by: precedes)
            }
        }
        for position in order {
            try applyItem(txn, items[Int(position.index)], defaultTime: Shard.now())
        }
    }

    /// One item of a batch: a put, or a delete (nothing happens if the entry is
    /// absent). Mid-batch, an unreadable old record aborts the whole transaction.
    private func applyItem(_ txn: Transaction, _ item: EntryWrite, defaultTime: Int64, appending: Bool = false) throws {
        guard item.isDeletion else {
            return try writeEntry(txn, item, defaultTime: defaultTime, appending: appending)
        }
        if let raw = try txn.get(entries, item.key) {
            guard let old = try? oldEntry(raw) else { throw LMDBError.corrupted }
            try removeEntry(txn, key: item.key, old: old)
        }
    }

    /// At open: applies what the log holds beyond the last applied sequence (batches
    /// acknowledged before a crash), then empties it. Acknowledged data must get
    /// in: if it does not fit under the size limit, the map grows to take it (the
    /// shard is then full for new writes).
    private func replayLog() throws {
        guard let log else { return }
        let applied = try env.read { txn in try metaCounter(txn, Self.logAppliedKey) }
        let records = try log.records().filter { $0.sequence > applied }
        // Numbers the log's puts carry were handed out before the crash.
        let logged = records.lazy.flatMap(\.items).compactMap(\.entryNumber).max() ?? 0
        numberLock.withLock { lastEntryNumber = max(lastEntryNumber, logged) }
        if let last = records.last {
            let apply = {
                var numbers: UInt64?
                try self.env.write { txn in
                    try self.applyInKeyOrder(txn, records.map(\.items))
                    try self.setMetaCounter(txn, Self.logAppliedKey, last.sequence)
                    numbers = try self.storeEntryNumbers(txn)
                }
                self.entryNumbersStored(numbers)
            }
            do {
                do { try apply() } catch let error as LMDBError where error == .mapFull {
                    // No transaction is open on this new environment, so the map may grow.
                    let needed = Self.applyCost(records.flatMap(\.items))
                    try env.setMapSize(env.info.mapSize + 2 * env.info.usedBytes + needed + Self.logRoomMargin)
                    try apply()
                    try env.setMapSize(sizeLimit)  // LMDB keeps at least what is in use
                }
            } catch {
                throw ShardError.storage("cannot apply the batch log of \(path): \(ShardError.from(error, limit: sizeLimit))")
            }
        }
        lastLogged = max(applied, records.last?.sequence ?? 0)
        appliedSequence = lastLogged
        if log.end > 0 { try log.reset() }
    }

    // MARK: Internals

    /// Checks who may write, then queues `body` for the next group commit.
    func write(clientID: String, _ body: @escaping (inout WriteContext) throws -> Void) throws {
        guard !isReadOnlyView else { throw ShardError.readOnlyView }
        guard !clientID.isEmpty else { throw ShardError.clientIDRequired }
        guard clientID == owner else { throw ShardError.fenced(owner: owner, client: clientID) }
        try committer.submit { ctx in
            if ctx.state == .closed { throw ShardError.closed }
            try body(&ctx)
        }
    }

    /// Runs a group of writes in one transaction. A body may throw a `ShardError`
    /// only before its first change (so the transaction stays whole); any other
    /// error, or a failed commit, aborts the group and each member is retried
    /// alone, so one write that does not fit cannot fail the others.
    private func run(_ group: [GroupCommitter<WriteContext>.Pending]) {
        // Logged batches first: every write lands after the batches acknowledged
        // before it, and none lands while they cannot be applied.
        if let failure = applyPendingBatches() {
            for member in group { member.error = failure }
            return
        }
        let observed = onCommit != nil
        if group.count > 1 {
            var state = self.state
            do {
                var changed: [[UInt8]] = []
                var numbers: UInt64?
                try env.write { txn in
                    var ctx = WriteContext(txn: txn, state: state, observed: observed)
                    for member in group {
                        do { try member.body(&ctx) } catch let error as ShardError { member.error = error }
                    }
                    state = ctx.state
                    changed = ctx.changed
                    numbers = try storeEntryNumbers(txn)
                }
                entryNumbersStored(numbers)
                stateLock.withLock { committedState = state }
                if !changed.isEmpty { onCommit?(changed) }
                return
            } catch {
                for member in group { member.error = nil }
            }
        }
        for member in group {
            do {
                var state = self.state
                var changed: [[UInt8]] = []
                var numbers: UInt64?
                try env.write { txn in
                    var ctx = WriteContext(txn: txn, state: state, observed: observed)
                    try member.body(&ctx)
                    state = ctx.state
                    changed = ctx.changed
                    numbers = try storeEntryNumbers(txn)
                }
                entryNumbersStored(numbers)
                stateLock.withLock { committedState = state }
                if !changed.isEmpty { onCommit?(changed) }
            } catch {
                member.error = ShardError.from(error, limit: sizeLimit)
            }
        }
    }

    @usableFromInline
    func readTransaction<R>(applyingLog: Bool = true, _ body: (Transaction) throws -> R) throws -> R {
        if applyingLog { try applyLog() }
        do {
            return try env.read(body)
        } catch let error as ShardError {
            throw error
        } catch {
            throw ShardError.from(error, limit: sizeLimit)
        }
    }

    private func checkLimits(keyCount: Int, valueCount: Int, indexes: [IndexPair]) throws {
        // Past the size limit the write can never fit; say so before touching LMDB.
        if valueCount + keyCount + (indexes.isEmpty ? 0 : encodedIndexSize(indexes)) > sizeLimit {
            throw ShardError.full(limit: sizeLimit)
        }
    }

    /// What a write must undo of an existing entry, copied out of the map.
    struct OldEntry {
        struct Index { var reverseKey: [UInt8] }
        var chunkSet: UInt64?
        var indexes: [Index]
    }

    private func readOld(_ txn: Transaction, _ key: [UInt8]) throws -> OldEntry? {
        guard let raw = try txn.get(entries, key) else { return nil }
        return try oldEntry(raw)
    }

    private func oldEntry(_ raw: UnsafeRawBufferPointer) throws -> OldEntry {
        let view = try RecordView(raw)
        var old = OldEntry(chunkSet: view.flags.contains(.chunked) ? view.chunkSet : nil, indexes: [])
        view.forEachIndex { name, value in
            old.indexes.append(.init(reverseKey: reverseIndexKey(name: name, value: value)))
        }
        return old
    }

    private func removeEntry(_ txn: Transaction, key: [UInt8], old: OldEntry) throws {
        try removeSideData(txn, key: key, old: old)
        try txn.delete(entries, key)
    }

    private func removeSideData(_ txn: Transaction, key: [UInt8], old: OldEntry) throws {
        if let set = old.chunkSet { try deleteChunkSet(txn, set) }
        for index in old.indexes {
            try index.reverseKey.withUnsafeBytes { k in
                try key.withUnsafeBytes { _ = try txn.delete(indexes, k, value: $0) }
            }
        }
    }

    private func writeEntry(_ txn: Transaction, _ item: EntryWrite, defaultTime: Int64, appending: Bool = false) throws {
        var indexes = item.indexes
        if item.keepsIndexes, let old = try txn.get(entries, item.key) {
            // Mid-batch: an unreadable record must abort the transaction, not leave it half done.
            guard let view = try? RecordView(old) else { throw LMDBError.corrupted }
            indexes = view.indexes()
        }
        try item.value.withUnsafeBytes { v in
            try writeEntry(txn, key: item.key, size: v.count, indexes: indexes, appending: appending,
                           modificationTime: item.modificationTime ?? defaultTime, entryNumber: item.entryNumber) { offset, out in
                out.copyMemory(from: UnsafeRawBufferPointer(rebasing: v[offset..<(offset + out.count)]))
            }
        }
    }

    /// Writes a record (and chunks and index rows) whose value `source` provides
    /// piecewise, into the record itself or into reserved chunk space: no extra copy.
    /// `stagedChunkSet`: the value's chunks are already written there.
    /// A new key gets `entryNumber` (or a new one); an existing entry keeps its
    /// number, mode and access time (a rewrite is a change of its value).
    func writeEntry(_ txn: Transaction, key: [UInt8], size: Int, indexes newIndexes: [IndexPair],
                            appending: Bool = false, modificationTime: Int64, stagedChunkSet: UInt64? = nil,
                            entryNumber: UInt64? = nil,
                            source: (Int, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        let chunked = size > chunkSize
        let chunkSet: UInt64? = chunked ? try stagedChunkSet ?? newChunkSet(txn) : nil
        // Sized for a new key first; the number is taken only once the key proves new.
        var metadata = EntryMetadata(number: entryNumber ?? numberLock.withLock { lastEntryNumber + 1 })
        let valueBytes = chunked ? 0 : size
        let count = recordHeadSize(chunked: chunked, indexes: newIndexes, metadata: metadata) + valueBytes
        try key.withUnsafeBytes { k in
            // One lookup for a new key (the append workload); an existing key is
            // cleaned of its chunks and index rows, then overwritten.
            var out: UnsafeMutableRawBufferPointer
            switch try txn.reserveIfAbsent(entries, k, count: count, appending: appending) {
            case .reserved(let buffer):
                out = buffer
                if entryNumber == nil {
                    metadata.number = newEntryNumber()
                    let exact = recordHeadSize(chunked: chunked, indexes: newIndexes, metadata: metadata) + valueBytes
                    if exact != count { out = try txn.reserve(entries, k, count: exact) }
                }
            case .existing(let raw):
                // Earlier items of the group may have changed the transaction: an
                // unreadable old record must abort it, not fail as a ShardError.
                guard let view = try? RecordView(raw), let old = try? oldEntry(raw) else { throw LMDBError.corrupted }
                metadata = view.metadata
                metadata.changeTime = nil
                if metadata.number == 0 { metadata.number = entryNumber ?? newEntryNumber() }
                if old.chunkSet != nil || !old.indexes.isEmpty { try removeSideData(txn, key: key, old: old) }
                out = try txn.reserve(entries, k, count: recordHeadSize(chunked: chunked, indexes: newIndexes, metadata: metadata) + valueBytes)
            }
            let offset = encodeRecordHead(into: out, chunkSet: chunkSet, modificationTime: modificationTime,
                                          size: size, indexes: newIndexes, metadata: metadata)
            if !chunked, size > 0 {
                try source(0, UnsafeMutableRawBufferPointer(rebasing: out[offset...]))
            }
        }
        if let chunkSet, stagedChunkSet == nil {
            var n = 0
            while n * chunkSize < size {
                let length = min(chunkSize, size - n * chunkSize)
                let out = try chunkKey(chunkSet, n).withUnsafeBytes { try txn.reserve(chunks, $0, count: length) }
                try source(n * chunkSize, out)
                n += 1
            }
        }
        try addReverseIndexes(txn, key: key, newIndexes)
    }

    /// A chunk set ID never used before in this shard.
    func newChunkSet(_ txn: Transaction) throws -> UInt64 {
        let last = try metaCounter(txn, Self.lastChunkSetKey)
        try setMetaCounter(txn, Self.lastChunkSetKey, last + 1)
        return last + 1
    }

    static let lastChunkSetKey = Array("lastChunkSet".utf8)

    /// A number kept in `meta` (8 bytes, big-endian); 0 when absent.
    private func metaCounter(_ txn: Transaction, _ key: [UInt8]) throws -> UInt64 {
        try Self.metaCounter(txn, meta, key)
    }

    private static func metaCounter(_ txn: Transaction, _ meta: Database, _ key: [UInt8]) throws -> UInt64 {
        try txn.get(meta, key).map { $0.count == 8 ? UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)) : 0 } ?? 0
    }

    /// A number no entry of this shard had or will have (see `EntryMetadata.number`).
    public func newEntryNumber() -> UInt64 {
        numberLock.withLock {
            lastEntryNumber += 1
            return lastEntryNumber
        }
    }

    /// Inside a write transaction: records the last entry number handed out, if a
    /// commit has not yet; returns it, for `entryNumbersStored` once committed.
    private func storeEntryNumbers(_ txn: Transaction) throws -> UInt64? {
        guard let last = numberLock.withLock({ lastEntryNumber > storedEntryNumber ? lastEntryNumber : nil }) else { return nil }
        try setMetaCounter(txn, Self.lastEntryNumberKey, last)
        return last
    }

    private func entryNumbersStored(_ last: UInt64?) {
        guard let last else { return }
        numberLock.withLock { storedEntryNumber = max(storedEntryNumber, last) }
    }

    private func setMetaCounter(_ txn: Transaction, _ key: [UInt8], _ value: UInt64) throws {
        try txn.put(meta, key, withUnsafeBytes(of: value.bigEndian) { Array($0) })
    }

    private func deleteChunkSet(_ txn: Transaction, _ set: UInt64) throws {
        let prefix = chunkSetKey(set)
        try txn.withCursor(chunks) { cursor in
            var pair = try chunkKey(set, 0).withUnsafeBytes { try cursor.seek(atLeast: $0) }
            while let p = pair, p.key.starts(with: prefix) {
                try cursor.deleteCurrent()
                pair = try cursor.next()  // after a delete: the item that followed
            }
        }
    }

    private func addReverseIndexes(_ txn: Transaction, key: [UInt8], _ newIndexes: [IndexPair]) throws {
        for index in newIndexes {
            let rk = Array(index.name.utf8).withUnsafeBytes { n in index.value.withUnsafeBytes { reverseIndexKey(name: n, value: $0) } }
            try rk.withUnsafeBytes { k in try key.withUnsafeBytes { try txn.put(self.indexes, k, $0) } }
        }
    }

    private func chunk(_ txn: Transaction, _ key: [UInt8], _ n: Int, _ view: RecordView) throws -> UnsafeRawBufferPointer {
        guard let chunk = try txn.get(chunks, chunkKey(view.chunkSet, n)) else {
            throw ShardError.corrupt("chunk \(n) of \(EntryKey(trusted: key)) is missing")
        }
        let expected = min(chunkSize, view.size - n * chunkSize)
        guard chunk.count == expected else { throw ShardError.corrupt("chunk \(n) has \(chunk.count) bytes, not \(expected)") }
        return chunk
    }

    private func value(_ txn: Transaction, _ key: [UInt8], _ view: RecordView) throws -> [UInt8] {
        guard view.flags.contains(.chunked) else { return Array(view.inlineValue) }
        var out: [UInt8] = []
        out.reserveCapacity(view.size)
        for n in 0..<view.chunkCount { out.append(contentsOf: try chunk(txn, key, n, view)) }
        return out
    }

    private func entryHasIndex(_ txn: Transaction, _ key: [UInt8], name: [UInt8], value: [UInt8]) throws -> Bool {
        guard let raw = try txn.get(entries, key) else { return false }
        var found = false
        try RecordView(raw).forEachIndex { n, v in
            if n.elementsEqual(name) && v.elementsEqual(value) { found = true }
        }
        return found
    }

    static func now() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

/// fsyncs a directory, making renames and creations in it durable.
public func syncDirectory(_ path: String) throws {
    let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY)
    guard fd >= 0 else { throw ShardError.storage("cannot open \(path): \(String(cString: strerror(errno)))") }
    defer { Glibc.close(fd) }
    guard fsync(fd) == 0 else { throw ShardError.storage("cannot fsync \(path): \(String(cString: strerror(errno)))") }
}

/// The shard's own description, kept in its `meta` database so that a shard's
/// directory describes itself (owner, state, limit) even without metadata.
struct Descriptor {
    var id: UInt64
    var owner: String
    var state: ShardState
    var sizeLimit: Int

    static let formatVersion = "2"

    func store(_ txn: Transaction, _ db: Database) throws {
        for (k, v) in [("format", Descriptor.formatVersion), ("id", String(id)), ("owner", owner),
                       ("state", state.rawValue), ("sizeLimit", String(sizeLimit))] {
            try txn.put(db, Array(k.utf8), Array(v.utf8))
        }
    }

    static func load(_ txn: Transaction, _ db: Database, path: String) throws -> Descriptor {
        func field(_ name: String) throws -> String {
            guard let raw = try txn.get(db, Array(name.utf8)) else {
                throw ShardError.notAShard("\(path) has no \(name) in its shard descriptor")
            }
            return String(decoding: raw, as: UTF8.self)
        }
        guard try field("format") == formatVersion else { throw ShardError.corrupt("unknown shard format at \(path)") }
        guard let id = UInt64(try field("id")), let limit = Int(try field("sizeLimit")),
              let state = ShardState(rawValue: try field("state")) else {
            throw ShardError.corrupt("unreadable shard descriptor at \(path)")
        }
        return Descriptor(id: id, owner: try field("owner"), state: state, sizeLimit: limit)
    }
}

/// LMDB's default key order (bytes, then length): negative, zero or positive.
func compareKeys(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int32 {
    let n = a.count == 0 || b.count == 0 ? 0 : memcmp(a.baseAddress!, b.baseAddress!, min(a.count, b.count))
    return n != 0 ? n : Int32(a.count) - Int32(b.count)
}

func compareKeys(_ a: [UInt8], _ b: [UInt8]) -> Int32 {
    a.withUnsafeBytes { a in b.withUnsafeBytes { b in compareKeys(a, b) } }
}

/// A key's first 8 bytes as a big-endian integer (zero-padded): ordering by it
/// agrees with `compareKeys` wherever two prefixes differ.
func keyPrefix(_ key: [UInt8]) -> UInt64 {
    var prefix: UInt64 = 0
    for i in 0..<8 { prefix = prefix << 8 | UInt64(i < key.count ? key[i] : 0) }
    return prefix
}

/// A fast 64-bit hash of a key's bytes (for the pending-key filter, where a
/// collision costs only an unneeded apply).
func keyHash(_ key: [UInt8]) -> UInt64 {
    key.withUnsafeBytes { bytes in
        var h: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(bytes.count)
        var i = 0
        while i + 8 <= bytes.count {
            h = (h ^ bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* 0xFF51_AFD7_ED55_8CCD
            h ^= h >> 32
            i += 8
        }
        while i < bytes.count {
            h = (h ^ UInt64(bytes[i])) &* 0x0100_0000_01B3
            i += 1
        }
        h ^= h >> 33
        h = h &* 0xC4CE_B9FE_1A85_EC53
        return h ^ (h >> 33)
    }
}

/// A byte count shared by all shards of the process.
final class PendingTotal: @unchecked Sendable {
    private let lock = NSLock()
    private var total = 0
    var value: Int { lock.withLock { total } }
    func add(_ bytes: Int) { lock.withLock { total += bytes } }
}
