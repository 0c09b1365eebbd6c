import Foundation
import LMDB
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A shard: one LMDB environment in its own directory. Safe to use from many
/// threads: reads run in parallel snapshots; writes are serialised and group-committed.
///
/// This file holds its state, opening, closing and the write transaction
/// (`write`, `run`); the rest is in extensions by concern: `Shard+Writes`
/// (puts, deletes, renames, metadata; the record-level work), `Shard+Reads`,
/// `Shard+BatchLog` (logged batches: logging, pending reads, applying),
/// `Shard+Staging` (large values written over several transactions),
/// `Shard+Visit` (borrowed reads for the batch service), `Shard+Directory`.
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
    /// The shard's `values/` folder (ValueFiles.swift).
    let valueFiles: ValueFileDirectory
    /// Whether the write transaction running now released a value file: only the
    /// thread inside LMDB's single write transaction touches it (`writeTransaction`).
    var releasedInTransaction = false

    let stateLock = NSLock()
    var committedState: ShardState
    var committer: GroupCommitter<WriteContext>!

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
    let log: BatchLog?
    var logCommitter: GroupCommitter<LogGroup>!
    let logLock = NSLock()
    // Guarded by logLock:
    /// From `close()` on: no batch may be logged.
    var logClosing = false
    /// An append failed and its bytes could not be cut back durably: the log is
    /// not appended to again (batches take the direct path).
    var logBroken = false
    /// Logged batches not yet applied to LMDB, in sequence order.
    var pendingBatches: [PendingBatch] = []
    /// The memory they hold (see `memorySize`), and what applying them may take in LMDB (see `applyCost`).
    var pendingBytes = 0
    var pendingCost = 0
    /// For point reads: a hash of each key written by a pending batch → the last
    /// item that wrote it. A key is pending while that item's batch is past
    /// `appliedSequence`; on a hash collision a read applies the log first.
    var pendingKeys: [UInt64: PendingKey] = [:]
    var pendingItems = 0
    var appliedSequence: UInt64 = 0
    /// The last sequence of the batches an apply in progress took (0: none).
    /// Items logged meanwhile are not composed with those batches' items: a
    /// direct write may land between the apply and them (see `earlierState`).
    var applyingThrough: UInt64 = 0
    /// Why the last attempt to apply pending batches failed (nil once one succeeds).
    /// Until they are applied, every LMDB write fails with it (nothing may land
    /// after an acknowledged batch that is not in yet) and so does every read
    /// that needs them; each new attempt retries.
    var logFailure: ShardError?
    /// When the last batch was logged (for the applier's idle test).
    var lastLogTime = ContinuousClock.now
    /// The sequence of the last logged record; touched only by the log committer's leader.
    var lastLogged: UInt64 = 0
    /// Records of batches put with durability deferred, not written to the file
    /// yet (they are written before any later record, and by `sync()`); touched
    /// only by the log committer's leader.
    var unwrittenLog: [UInt8] = []
    // Guarded by logLock:
    /// The last sequence written to the file, and the last known durable there
    /// (fdatasync'ed, or applied to LMDB).
    var writtenThrough: UInt64 = 0
    var durableThrough: UInt64 = 0
    /// The last sequence logged with durability deferred, and when the oldest
    /// such batch not durable yet was logged: the applier makes them durable
    /// once they are `LogApplier.idleDelay` old.
    var lastDeferred: UInt64 = 0
    /// Barriers that wrote and fdatasync'ed deferred records (tests; the applier's pace).
    let deferredSyncs = Atomic<Int>(0)
    var notDurableSince: ContinuousClock.Instant?
    /// Whether the log applier has this shard in its queue (changed under its
    /// lock): a wake-up then needs no lock.
    let queuedForApplier = Atomic<Bool>(false)

    struct PendingBatch {
        let sequence: UInt64
        var items: [EntryWrite]  // composed in memory (see notePending)
        /// For each move among `items` (by position): what its target shows, an
        /// item of the source's key (see notePending).
        var moved: [UInt32: EntryWrite] = [:]
        let bytes: Int
        let cost: Int
        /// When it was logged (just before its append): how long a view may lack it.
        var loggedAt = ContinuousClock.now
    }

    /// 16 bytes: the map holds one per key written while batches are pending.
    struct PendingKey {
        let sequence: UInt64
        let item: UInt32
        /// An earlier pending item may have set the key's indexes: a put keeping
        /// its indexes cannot take them from LMDB.
        var overwrites = false
        /// A deletion of the key is pending before this item (or it cannot be
        /// told): LMDB's record of the key is not the one this item writes over.
        var afterDeletion = false
        /// What pending items make of the key cannot be told from them alone
        /// (a hash collision, or an item after a move into the key): a read of
        /// it applies the log first.
        var unknown = false
    }

    struct LogGroup {
        var next: UInt64
        var bytes: [UInt8] = []
        var batches: [PendingBatch] = []
        var cost = 0
        /// Whether the group must be durable when it returns (fdatasync): false
        /// when every member deferred durability.
        var sync = false
        /// Whether records kept in memory (`unwrittenLog`) must be written now
        /// (`sync()`, the durability barrier, asks for it).
        var write = false
    }

    /// Memory held by a shard's logged batches waiting for LMDB past which a batch
    /// put applies them first. Larger applies touch each B-tree page for more
    /// entries: with random keys, a transaction's cost follows the pages it
    /// touches, not its entries.
    static let pendingLimit = 256 << 20
    /// The same for all shards of the process together (a writer over it applies
    /// its own shard's batches first).
    static let processPendingLimit = 1 << 30
    static let processPending = PendingTotal()
    /// Room kept free beside what logged batches may take: for direct writes in
    /// flight (a staged value commits 32 MiB at a time) and LMDB's own pages.
    static let logRoomMargin = 64 << 20
    /// Pending memory at which the background applier applies without waiting for a pause.
    static let applyThreshold = 64 << 20
    let batchLogLimit: Int
    static let logAppliedKey = Array("logApplied".utf8)

    // Entry numbers (see EntryMetadata.number). Handed out by `newEntryNumber`
    // to direct writes, logged puts and the mount's new files; every commit that
    // may hold one stores the last handed out in `meta` (`storeEntryNumbers`),
    // and the batch log keeps those of logged puts, so none is given twice.
    // Atomics, not a lock: one is taken per new entry, and batches take thousands.
    let lastEntryNumber = Atomic<UInt64>(0)
    let storedEntryNumber = Atomic<UInt64>(0)
    static let lastEntryNumberKey = Array("lastEntryNumber".utf8)

    let observerLock = NSLock()
    var commitObserver: (@Sendable ([[UInt8]]) -> Void)?

    /// Called after each commit with the keys it changed (put, delete, rename,
    /// index and time changes), on the committing thread: keep it short. Batch
    /// puts made with `reportingChanges: false` are not reported.
    public var onCommit: (@Sendable ([[UInt8]]) -> Void)? {
        get { observerLock.withLock { commitObserver } }
        set { observerLock.withLock { commitObserver = newValue } }
    }

    var fenceCheck: (@Sendable () -> ShardError?)?

    /// Asked before every commit and every batch-log append: an error stops the
    /// write (nothing lands) and is what the writer gets. The node sets it to
    /// refuse writes once it is no longer the primary of the shard's volume or
    /// cannot confirm its lease (docs/BACKUP-VIEWS.md, "Promotion").
    public var writeFence: (@Sendable () -> ShardError?)? {
        get { observerLock.withLock { fenceCheck } }
        set { observerLock.withLock { fenceCheck = newValue } }
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

    init(path: String, creating descriptor: Descriptor?, options: ShardOptions) throws {
        valueFiles = ValueFileDirectory(shardPath: path)
        var envOptions = EnvironmentOptions(mapSize: descriptor?.sizeLimit ?? ShardOptions.minimumSizeLimit)
        envOptions.readOnly = options.readOnly
        envOptions.noSync = !options.durableCommits
        envOptions.maxDatabases = 5
        let dbFlags: DatabaseFlags = options.readOnly ? [] : [.create]
        do {
            // An instance of this process being let go is waited for (LMDB opens
            // an environment once per process); then the batch log's lock keeps
            // out a writer of another process.
            env = try Environment.open(path: path, options: envOptions, waitingUpTo: options.writerWait)
            entries = try env.openDatabase("entries", flags: dbFlags)
            chunks = try env.openDatabase("chunks", flags: dbFlags)
            staging = try env.openDatabase("staging", flags: dbFlags)
            indexes = try env.openDatabase("indexes", flags: dbFlags.union(.duplicateSort))
            meta = try env.openDatabase("meta", flags: dbFlags)
        } catch let error as LMDBError {
            throw error == .notFound ? ShardError.notAShard("\(path) lacks the shard databases")
                : error == .alreadyOpen ? ShardError.inUse("\(path) is still open in this process (an earlier instance not let go yet)")
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
        lastEntryNumber.store(storedNumber, ordering: .relaxed)
        storedEntryNumber.store(storedNumber, ordering: .relaxed)
        try replayLog()
        // Staged chunks a crash left are garbage: remove them, but a failure here
        // (say, a full shard) must not keep the shard from opening.
        if !options.readOnly {
            try? removeLeftoverStagedSets()
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

    /// The shard's durability barrier: every batch put with durability deferred
    /// is durable when it returns (written to the batch log and fdatasync'ed, or
    /// applied to LMDB). Without a log, flushes commits made with
    /// `durableCommits == false` to disk.
    public func sync() throws {
        if log != nil { return try syncDeferred() }
        do { try env.sync(force: true) } catch { throw ShardError.from(error, limit: sizeLimit) }
    }

    deinit {
        // Batches still pending stay in the log, for the next open to replay
        // (those put with durability deferred are written there now).
        if let log, !unwrittenLog.isEmpty, !pendingBatches.isEmpty, writeFence?() == nil { try? log.append(unwrittenLog, sync: true) }
        Self.processPending.add(-pendingBytes)
    }

    /// Tests only: keeps the background applier away from this shard, so what is
    /// pending stays pending until a write, a scan or `applyLog()` applies it.
    var backgroundApplyHeld: Bool {
        get { logLock.withLock { holdingBackgroundApply } }
        set { logLock.withLock { holdingBackgroundApply = newValue } }
    }
    var holdingBackgroundApply = false

    /// Tests only: an error to fail the next applies with (a full or failing disk).
    var applyFault: (@Sendable () throws -> Void)? {
        get { logLock.withLock { injectedApplyFault } }
        set { logLock.withLock { injectedApplyFault = newValue } }
    }
    var injectedApplyFault: (@Sendable () throws -> Void)?

    /// Tests only: an error to fail the next batch-log writes with, before any byte is written.
    var appendFault: (@Sendable () throws -> Void)? {
        get { logLock.withLock { injectedAppendFault } }
        set { logLock.withLock { injectedAppendFault = newValue } }
    }
    var injectedAppendFault: (@Sendable () throws -> Void)?

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
    func run(_ group: [GroupCommitter<WriteContext>.Pending]) {
        let start = ContinuousClock.now
        defer { CommitMetrics.record("lmdb", since: start) }
        if let refused = writeFence?() {
            for member in group { member.error = refused }
            return
        }
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
                try writeTransaction { txn in
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
                try writeTransaction { txn in
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
                member.error = writeFailure(error)
            }
        }
    }

    /// Under this much room a write that failed with EIO is put down to a full
    /// volume: LMDB reports a write that a full filesystem cut short as EIO, and
    /// by then the room that was left has gone into the cut-short write.
    static let fullVolumeRoom = 4 << 20

    /// A failed write's error in the shard's vocabulary (`ShardError.from` for
    /// LMDB's). `code` is the errno for errors that carry one other than LMDB's.
    /// ENOSPC and EDQUOT, and EIO on a filesystem with next to no room left, are
    /// `volumeFull`: the write is refused as on a full local disk, not reported as
    /// a device failure.
    func writeFailure(_ error: Error, code: Int32? = nil) -> Error {
        let mapped = ShardError.from(error, limit: sizeLimit)  // errors not LMDB's stay as they are
        // Failures of the disk only: not LMDB's map or transaction limits, nor a caller's own error.
        var failure = code
        if failure == nil, let e = error as? LMDBError, case .storage? = mapped as? ShardError { failure = e.code }
        if failure == ENOSPC || failure == EDQUOT {
            return ShardError.volumeFull("the filesystem of \(path) has no room left (\(error))")
        }
        if failure == EIO, let room = freeBytes(), room < Self.fullVolumeRoom {
            return ShardError.volumeFull("the filesystem of \(path) has \(room) bytes left (\(error))")
        }
        return mapped
    }

    /// A failed system call of the shard's own files (value files): `storage`,
    /// or `volumeFull` by the rules of `writeFailure`.
    func diskFailure(_ code: Int32, _ what: String) -> ShardError {
        let failure = ShardError.storage("\(what): \(String(cString: strerror(code)))")
        return writeFailure(failure, code: code) as? ShardError ?? failure
    }

    /// The bytes this process may still write on the shard's filesystem (root
    /// may use the blocks kept for it).
    func freeBytes() -> Int? {
        var stats = statvfs()
        guard statvfs(path, &stats) == 0 else { return nil }
        return Int(geteuid() == 0 ? stats.f_bfree : stats.f_bavail) * Int(stats.f_frsize)
    }

    /// `applyLog` before a read: a volume too full for the apply fails the read
    /// as storage (EIO, READ_EXCEPTION), not as a write that did not fit.
    func applyLogBeforeRead() throws {
        do { try applyLog() } catch ShardError.volumeFull(let why) { throw ShardError.storage(why) }
    }

    @usableFromInline
    func readTransaction<R>(applyingLog: Bool = true, _ body: (Transaction) throws -> R) throws -> R {
        if applyingLog { try applyLogBeforeRead() }
        do {
            return try env.read(body)
        } catch let error as ShardError {
            throw error
        } catch {
            throw ShardError.from(error, limit: sizeLimit)
        }
    }

    /// A chunk set ID never used before in this shard.
    func newChunkSet(_ txn: Transaction) throws -> UInt64 {
        let last = try metaCounter(txn, Self.lastChunkSetKey)
        try setMetaCounter(txn, Self.lastChunkSetKey, last + 1)
        return last + 1
    }

    static let lastChunkSetKey = Array("lastChunkSet".utf8)

    /// A number kept in `meta` (8 bytes, big-endian); 0 when absent.
    func metaCounter(_ txn: Transaction, _ key: [UInt8]) throws -> UInt64 {
        try Self.metaCounter(txn, meta, key)
    }

    static func metaCounter(_ txn: Transaction, _ meta: Database, _ key: [UInt8]) throws -> UInt64 {
        try txn.get(meta, key).map { $0.count == 8 ? UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)) : 0 } ?? 0
    }

    /// A number no entry of this shard had or will have (see `EntryMetadata.number`).
    public func newEntryNumber() -> UInt64 {
        lastEntryNumber.wrappingAdd(1, ordering: .relaxed).newValue
    }

    /// `count` numbers in a row (for a batch); returns the first.
    func newEntryNumbers(_ count: Int) -> UInt64 {
        lastEntryNumber.wrappingAdd(UInt64(count), ordering: .relaxed).newValue - UInt64(count) + 1
    }

    /// Inside a write transaction: records the last entry number handed out, if a
    /// commit has not yet; returns it, for `entryNumbersStored` once committed.
    func storeEntryNumbers(_ txn: Transaction) throws -> UInt64? {
        let last = lastEntryNumber.load(ordering: .relaxed)
        guard last > storedEntryNumber.load(ordering: .relaxed) else { return nil }
        try setMetaCounter(txn, Self.lastEntryNumberKey, last)
        return last
    }

    func entryNumbersStored(_ last: UInt64?) {
        guard let last else { return }
        // Only the LMDB writer (one at a time) gets here.
        storedEntryNumber.store(max(storedEntryNumber.load(ordering: .relaxed), last), ordering: .relaxed)
    }

    func setMetaCounter(_ txn: Transaction, _ key: [UInt8], _ value: UInt64) throws {
        try txn.put(meta, key, withUnsafeBytes(of: value.bigEndian) { Array($0) })
    }

    static func now() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}
