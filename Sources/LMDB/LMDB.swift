// A thin Swift layer over LMDB's C API. lmdb.h is the contract; the rules that
// matter to callers are repeated where they apply:
//
// - Environments are opened with MDB_NOTLS, so a read-only transaction is not
//   tied to the thread that began it. It still must be used by one thread at a
//   time, and every transaction here lives inside one synchronous closure:
//   never hold one across `await`.
// - A write transaction and its cursors belong to one thread. LMDB allows one
//   writer per environment; `write` blocks until it is this caller's turn.
// - Buffers handed out by `get` and cursors point into the memory map. They are
//   valid only until the next update in the same transaction or its end: copy
//   what you keep.
// - Databases are opened once, at setup (mdb_dbi_open must not run in
//   concurrent transactions of one process).
// - Ended read transactions are kept, reset, for the next read
//   (`mdb_txn_reset`, then `mdb_txn_renew`): a renewal allocates nothing and
//   keeps its reader slot, where a begin allocates a transaction and takes a
//   slot under the lock file's mutex. A reset transaction pins no snapshot.
// - An environment is open at most once per process (lmdb.h, "Caveats"): its
//   lock file's locks are fcntl locks, which a process holds only once, so a
//   second open in the same process takes the first's mutexes for its own and
//   re-initialises them, and its close destroys them under the first. Opening
//   a folder that is open already here throws `LMDBError.alreadyOpen`.
import CLMDB
#if canImport(Glibc)
import Glibc
import Synchronization
#endif

/// An error returned by LMDB, with its return code.
public struct LMDBError: Error, Equatable, CustomStringConvertible, Sendable {
    public let code: Int32
    public init(code: Int32) { self.code = code }

    public static let notFound = LMDBError(code: MDB_NOTFOUND)
    public static let keyExists = LMDBError(code: MDB_KEYEXIST)
    /// The environment's map size (the shard's size limit) is reached.
    public static let mapFull = LMDBError(code: MDB_MAP_FULL)
    /// The transaction has too many dirty pages.
    public static let transactionFull = LMDBError(code: MDB_TXN_FULL)
    public static let badValueSize = LMDBError(code: MDB_BAD_VALSIZE)
    /// Located page was wrong type, or data the caller expected is missing.
    public static let corrupted = LMDBError(code: MDB_CORRUPTED)
    /// The environment is open in this process already (EBUSY).
    public static let alreadyOpen = LMDBError(code: EBUSY)

    public var description: String {
        String(cString: mdb_strerror(code))
    }
}

@inlinable @inline(__always)
func check(_ rc: Int32) throws {
    if rc != 0 { throw LMDBError(code: rc) }
}

/// How to open an environment.
public struct EnvironmentOptions: Sendable {
    /// Upper bound of the data file, rounded up to a page. Writes past it fail with `LMDBError.mapFull`.
    public var mapSize: Int
    public var maxDatabases: UInt32 = 8
    public var maxReaders: UInt32 = 512
    public var readOnly = false
    /// The caller promises to coordinate access itself (needed for MDB_RDONLY on a
    /// writable filesystem where the user may not write the lock file).
    public var noLock = false
    /// Skip the fsyncs at commit: commits stay atomic but not durable until `sync(force:)`.
    public var noSync = false
    /// File mode of the data and lock files.
    public var mode: mode_t = 0o644

    public init(mapSize: Int) { self.mapSize = mapSize }
}

/// A database (a named B-tree) inside an environment.
public struct Database: Sendable {
    public let handle: MDB_dbi
    public init(handle: MDB_dbi) { self.handle = handle }
}

public struct DatabaseFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let create = DatabaseFlags(rawValue: UInt32(MDB_CREATE))
    /// Sorted duplicate values under one key.
    public static let duplicateSort = DatabaseFlags(rawValue: UInt32(MDB_DUPSORT))
}

public struct PutFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let noOverwrite = PutFlags(rawValue: UInt32(MDB_NOOVERWRITE))
    public static let noDuplicateData = PutFlags(rawValue: UInt32(MDB_NODUPDATA))
    /// Keys arrive in increasing order: LMDB appends without searching.
    public static let append = PutFlags(rawValue: UInt32(MDB_APPEND))
}

/// Figures of an environment (mdb_env_info + mdb_env_stat).
public struct EnvironmentInfo: Sendable {
    public var mapSize: Int
    public var pageSize: Int
    /// Highest page number in use; (lastPage + 1) * pageSize bytes of the file are in use or free-listed.
    public var lastPage: Int
    /// The ID of the last committed transaction.
    public var lastTransactionID: UInt64 = 0
    public var usedBytes: Int { (lastPage + 1) * pageSize }
}

/// An LMDB environment: one data file (and its lock file) in a directory.
/// Safe to share between threads; see the rules at the top of this file.
public final class Environment: @unchecked Sendable {
    public let path: String
    public let options: EnvironmentOptions
    @usableFromInline let env: OpaquePointer
    /// LMDB's page size for this environment (the OS page size when it was created).
    public let pageSize: Int

    /// The folder's identity while this environment has it open (see `OpenFolders`).
    private let folder: OpenFolders.Folder
    /// Ended read transactions, reset, for `read` to renew (at most `idleReaderLimit`).
    private let idleReaders = Mutex<[IdleReader]>([])
    /// A reset read transaction: used by one thread at a time (`MDB_NOTLS`), handed over under the lock.
    private struct IdleReader: @unchecked Sendable { let txn: OpaquePointer }
    /// Enough for the threads that read at once (a ring thread per CPU, a few
    /// more); each holds a reader slot of `EnvironmentOptions.maxReaders`.
    static let idleReaderLimit = 8

    /// Opens (creating if needed) the environment in the directory `path`, which
    /// must exist. Throws `LMDBError.alreadyOpen` while another `Environment` of
    /// this process has it open.
    public init(path: String, options: EnvironmentOptions) throws {
        folder = try OpenFolders.claim(path)
        var env: OpaquePointer?
        do { try check(mdb_env_create(&env)) } catch {
            OpenFolders.release(folder)
            throw error
        }
        guard let env else {
            OpenFolders.release(folder)
            throw LMDBError(code: EINVAL)
        }
        do {
            try check(mdb_env_set_mapsize(env, options.mapSize))
            try check(mdb_env_set_maxdbs(env, options.maxDatabases))
            try check(mdb_env_set_maxreaders(env, options.maxReaders))
            var flags = UInt32(MDB_NOTLS)
            if options.readOnly { flags |= UInt32(MDB_RDONLY) }
            if options.noLock { flags |= UInt32(MDB_NOLOCK) }
            if options.noSync { flags |= UInt32(MDB_NOSYNC) }
            try check(mdb_env_open(env, path, flags, options.mode))
        } catch {
            mdb_env_close(env)
            OpenFolders.release(folder)
            throw error
        }
        self.env = env
        self.path = path
        self.options = options
        var stat = MDB_stat()
        mdb_env_stat(env, &stat)
        pageSize = Int(stat.ms_psize)
    }

    deinit {
        idleReaders.withLock { idle in for reader in idle { mdb_txn_abort(reader.txn) } }  // all must end before the close
        mdb_env_close(env)
        OpenFolders.release(folder)
    }

    /// Opens like `init`, waiting up to `wait` while another instance of this
    /// process still has the folder open (one being let go: a background task
    /// may hold it a moment longer); `LMDBError.alreadyOpen` after that. Blocks.
    public static func open(path: String, options: EnvironmentOptions, waitingUpTo wait: Duration) throws -> Environment {
        let deadline = ContinuousClock.now + wait
        while true {
            do { return try Environment(path: path, options: options) } catch let error as LMDBError
                where error == .alreadyOpen && ContinuousClock.now < deadline {
                usleep(10_000)
            }
        }
    }

    /// Opens a named database. Call at setup only, never concurrently with other
    /// `openDatabase` calls on the same environment.
    public func openDatabase(_ name: String, flags: DatabaseFlags = []) throws -> Database {
        let readOnly = options.readOnly || !flags.contains(.create)
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, readOnly ? UInt32(MDB_RDONLY) : 0, &txn))
        var dbi: MDB_dbi = 0
        let rc = mdb_dbi_open(txn, name, flags.rawValue, &dbi)
        if rc != 0 {
            mdb_txn_abort(txn)
            throw LMDBError(code: rc)
        }
        try check(mdb_txn_commit(txn))
        return Database(handle: dbi)
    }

    /// Runs `body` in a read-only snapshot. Buffers obtained inside are invalid once it returns.
    @inlinable
    public func read<R>(_ body: (Transaction) throws -> R) throws -> R {
        try read(prepare: { begin in try begin() }) { _, txn in try body(txn) }
    }

    /// Like `read`, but the snapshot begins inside `prepare`, when it calls the
    /// `begin` it is given (exactly once): so a caller can take its snapshot and
    /// look at state of its own in one step, under a lock of its own.
    public func read<P, R>(prepare: (_ begin: () throws -> Void) throws -> P, _ body: (P, Transaction) throws -> R) throws -> R {
        var txn: OpaquePointer?
        let prepared: P
        do {
            prepared = try prepare {
                precondition(txn == nil, "read(prepare:) calls begin once")
                txn = try beginRead()
            }
        } catch {
            if let txn { endRead(txn) }
            throw error
        }
        guard let txn else { preconditionFailure("read(prepare:) needs prepare to call begin") }
        defer { endRead(txn) }
        return try body(prepared, Transaction(txn: txn))
    }

    /// A read transaction on the newest snapshot: a kept one renewed, or a new one.
    private func beginRead() throws -> OpaquePointer {
        if let kept = idleReaders.withLock({ $0.popLast() })?.txn {
            let rc = mdb_txn_renew(kept)
            if rc == 0 { return kept }
            mdb_txn_abort(kept)
            throw LMDBError(code: rc)
        }
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        return txn!
    }

    /// Ends a read transaction: reset and kept for the next read, or aborted.
    private func endRead(_ txn: OpaquePointer) {
        mdb_txn_reset(txn)
        let reader = IdleReader(txn: txn)
        let kept = idleReaders.withLock { idle -> Bool in
            guard idle.count < Self.idleReaderLimit else { return false }
            idle.append(reader)
            return true
        }
        if !kept { mdb_txn_abort(txn) }
    }

    /// Runs `body` in a write transaction on the calling thread and commits it if
    /// `body` returns; aborts it if `body` throws. Blocks while another writer is active.
    /// With the default options the commit is durable when this returns.
    @inlinable
    public func write<R>(_ body: (Transaction) throws -> R) throws -> R {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, 0, &txn))
        let result: R
        do {
            result = try body(Transaction(txn: txn!))
        } catch {
            mdb_txn_abort(txn)
            throw error
        }
        try check(mdb_txn_commit(txn))  // frees the transaction, success or not
        return result
    }

    /// Flushes data to disk. With `force`, even if the environment was opened with `noSync`.
    public func sync(force: Bool = true) throws {
        try check(mdb_env_sync(env, force ? 1 : 0))
    }

    public var info: EnvironmentInfo {
        var info = MDB_envinfo()
        mdb_env_info(env, &info)
        var stat = MDB_stat()
        mdb_env_stat(env, &stat)
        return EnvironmentInfo(mapSize: info.me_mapsize, pageSize: Int(stat.ms_psize), lastPage: info.me_last_pgno,
                               lastTransactionID: UInt64(info.me_last_txnid))
    }

    /// Changes the map size (the size limit). Only while this process has no
    /// active transaction on the environment, e.g. right after opening it (kept
    /// read transactions, reset, are not active).
    public func setMapSize(_ size: Int) throws {
        try check(mdb_env_set_mapsize(env, size))
    }

    /// Pins the newest committed snapshot: begins a read transaction that stays open
    /// until `PinnedSnapshot.end()` (or deinit), so LMDB reuses none of the pages that
    /// snapshot reaches. `whileNoCommit` runs with the environment's writer lock held
    /// (no commit can start), e.g. to read that snapshot's meta page from the file
    /// before the next commits overwrite it. Blocks while another writer is active.
    public func pinNewest<R>(_ whileNoCommit: (_ snapshot: PinnedSnapshot, _ fd: Int32) throws -> R) throws -> (PinnedSnapshot, R) {
        var writer: OpaquePointer?
        try check(mdb_txn_begin(env, nil, 0, &writer))
        defer { mdb_txn_abort(writer) }
        var reader: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &reader))
        let pinned = PinnedSnapshot(environment: self, txn: reader!)
        var fd: Int32 = -1
        try check(mdb_env_get_fd(env, &fd))
        return (pinned, try whileNoCommit(pinned, fd))
    }

    /// Reader slots held by dead processes are released (useful after `kill -9` of a reader).
    @discardableResult
    public func clearStaleReaders() -> Int32 {
        var dead: Int32 = 0
        mdb_reader_check(env, &dead)
        return dead
    }
}

/// A read transaction kept open across calls (see `Environment.pinNewest`). It holds
/// one reader slot; end it as soon as nobody needs its snapshot (the file cannot
/// reuse the pages it reaches meanwhile, so it grows instead).
public final class PinnedSnapshot: @unchecked Sendable {
    private let environment: Environment  // kept open while the transaction lives
    /// The MDB_txn's address (0 once ended), and what else ends with it.
    private let state: Mutex<(txn: UInt, endings: [@Sendable () -> Void])>
    /// The ID of the snapshot's transaction (LMDB's txnid: the number of its meta page).
    public let transactionID: UInt64

    init(environment: Environment, txn: OpaquePointer) {
        self.environment = environment
        transactionID = UInt64(mdb_txn_id(txn))
        state = Mutex((UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(txn))), []))
    }

    /// Runs `body` once, after the snapshot is released (at once if it already is):
    /// for what the caller holds for as long as the pin (files the snapshot names, say).
    public func onEnd(_ body: @escaping @Sendable () -> Void) {
        let ended = state.withLock { held -> Bool in
            if held.txn == 0 { return true }
            held.endings.append(body)
            return false
        }
        if ended { body() }
    }

    /// Releases the snapshot, then runs what `onEnd` registered. Idempotent.
    public func end() {
        let (ending, endings) = state.withLock { held -> (UInt, [@Sendable () -> Void]) in
            defer { held = (0, []) }
            return (held.txn, held.endings)
        }
        if let ending = OpaquePointer(bitPattern: ending) { mdb_txn_abort(ending) }
        for body in endings { body() }
    }

    deinit { end() }
}

/// A transaction handed to a closure by `Environment.read` or `write`.
/// Never let it escape the closure.
public struct Transaction {
    @usableFromInline let txn: OpaquePointer

    @usableFromInline init(txn: OpaquePointer) { self.txn = txn }

    /// The value under `key`, or nil. The buffer points into the map: see the rules above.
    @inlinable
    public func get(_ db: Database, _ key: UnsafeRawBufferPointer) throws -> UnsafeRawBufferPointer? {
        var k = MDB_val(key)
        var v = MDB_val()
        let rc = mdb_get(txn, db.handle, &k, &v)
        if rc == MDB_NOTFOUND { return nil }
        try check(rc)
        return v.buffer
    }

    @inlinable
    public func get(_ db: Database, _ key: [UInt8]) throws -> UnsafeRawBufferPointer? {
        try key.withUnsafeBytes { try get(db, $0) }
    }

    @inlinable
    public func put(_ db: Database, _ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer, flags: PutFlags = []) throws {
        var k = MDB_val(key)
        var v = MDB_val(value)
        try check(mdb_put(txn, db.handle, &k, &v, flags.rawValue))
    }

    public func put(_ db: Database, _ key: [UInt8], _ value: [UInt8], flags: PutFlags = []) throws {
        try key.withUnsafeBytes { k in try value.withUnsafeBytes { v in try put(db, k, v, flags: flags) } }
    }

    /// What `reserveIfAbsent` found.
    public enum Reservation {
        /// The key was new: fill these bytes before the next update.
        case reserved(UnsafeMutableRawBufferPointer)
        /// The key exists (nothing was written): its current value.
        case existing(UnsafeRawBufferPointer)
    }

    /// Reserves `count` bytes for `key` if the key is absent, else returns its value
    /// untouched — one B-tree lookup either way (MDB_NOOVERWRITE | MDB_RESERVE).
    /// `appending`: the key is probably past every key in the database; then it is
    /// first tried with MDB_APPEND, which skips the search and, when a page
    /// splits, leaves the old page full instead of half full.
    @inlinable
    public func reserveIfAbsent(_ db: Database, _ key: UnsafeRawBufferPointer, count: Int,
                                appending: Bool = false) throws -> Reservation {
        var k = MDB_val(key)
        var v = MDB_val(mv_size: count, mv_data: nil)
        if appending {
            let rc = mdb_put(txn, db.handle, &k, &v, UInt32(MDB_APPEND | MDB_RESERVE))
            if rc == 0 { return .reserved(UnsafeMutableRawBufferPointer(start: v.mv_data, count: count)) }
            if rc != MDB_KEYEXIST { try check(rc) }
            v = MDB_val(mv_size: count, mv_data: nil)  // not past the last key: look it up
        }
        let rc = mdb_put(txn, db.handle, &k, &v, UInt32(MDB_NOOVERWRITE | MDB_RESERVE))
        if rc == MDB_KEYEXIST { return .existing(v.buffer) }
        try check(rc)
        return .reserved(UnsafeMutableRawBufferPointer(start: v.mv_data, count: count))
    }

    /// Reserves `count` bytes for `key` and returns them to be filled before the
    /// next update (MDB_RESERVE): saves a copy of large values. Not for DUPSORT databases.
    @inlinable
    public func reserve(_ db: Database, _ key: UnsafeRawBufferPointer, count: Int, flags: PutFlags = []) throws -> UnsafeMutableRawBufferPointer {
        var k = MDB_val(key)
        var v = MDB_val(mv_size: count, mv_data: nil)
        try check(mdb_put(txn, db.handle, &k, &v, flags.rawValue | UInt32(MDB_RESERVE)))
        return UnsafeMutableRawBufferPointer(start: v.mv_data, count: count)
    }

    /// Deletes `key` (and, in a DUPSORT database, only the pair with `value` if given).
    /// Returns false if there was nothing to delete.
    @discardableResult
    public func delete(_ db: Database, _ key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer? = nil) throws -> Bool {
        var k = MDB_val(key)
        let rc: Int32
        if let value {
            var v = MDB_val(value)
            rc = mdb_del(txn, db.handle, &k, &v)
        } else {
            rc = mdb_del(txn, db.handle, &k, nil)
        }
        if rc == MDB_NOTFOUND { return false }
        try check(rc)
        return true
    }

    @discardableResult
    public func delete(_ db: Database, _ key: [UInt8]) throws -> Bool {
        try key.withUnsafeBytes { try delete(db, $0) }
    }

    /// Number of entries in `db`.
    public func count(_ db: Database) throws -> Int {
        var stat = MDB_stat()
        try check(mdb_stat(txn, db.handle, &stat))
        return stat.ms_entries
    }

    /// Pages on LMDB's free list (free for reuse) as of this transaction.
    /// The free list maps transaction IDs to page lists whose first word is their length.
    public func freePageCount() throws -> Int {
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, 0, &cursor))  // dbi 0 is FREE_DBI
        defer { mdb_cursor_close(cursor) }
        var k = MDB_val(), v = MDB_val()
        var total = 0
        var rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
        while rc == 0 {
            if v.mv_size >= MemoryLayout<Int>.size {
                total += v.mv_data.loadUnaligned(as: Int.self)
            }
            rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
        }
        if rc != MDB_NOTFOUND { try check(rc) }
        return total
    }

    /// Runs `body` with a cursor on `db`, closed when `body` returns.
    @inlinable
    public func withCursor<R>(_ db: Database, _ body: (inout Cursor) throws -> R) throws -> R {
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, db.handle, &cursor))
        defer { mdb_cursor_close(cursor) }
        var c = Cursor(cursor: cursor!)
        return try body(&c)
    }
}

/// A position in a database. Keys and values returned point into the map.
public struct Cursor {
    @usableFromInline let cursor: OpaquePointer
    public typealias Pair = (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)

    @usableFromInline init(cursor: OpaquePointer) { self.cursor = cursor }

    @inlinable
    func op(_ op: MDB_cursor_op, key: UnsafeRawBufferPointer? = nil, value: UnsafeRawBufferPointer? = nil) throws -> Pair? {
        var k = key.map { MDB_val($0) } ?? MDB_val()
        var v = value.map { MDB_val($0) } ?? MDB_val()
        let rc = mdb_cursor_get(cursor, &k, &v, op)
        if rc == MDB_NOTFOUND { return nil }
        try check(rc)
        return (k.buffer, v.buffer)
    }

    @inlinable
    public func first() throws -> Pair? { try op(MDB_FIRST) }
    @inlinable
    public func next() throws -> Pair? { try op(MDB_NEXT) }
    public func last() throws -> Pair? { try op(MDB_LAST) }
    public func current() throws -> Pair? { try op(MDB_GET_CURRENT) }
    /// The first pair whose key is >= `key`.
    @inlinable
    public func seek(atLeast key: UnsafeRawBufferPointer) throws -> Pair? { try op(MDB_SET_RANGE, key: key) }
    /// Exactly `key` (its first duplicate).
    public func seek(exactly key: UnsafeRawBufferPointer) throws -> Pair? { try op(MDB_SET_KEY, key: key) }
    /// DUPSORT: the first duplicate of `key` >= `value`.
    public func seek(key: UnsafeRawBufferPointer, atLeastValue value: UnsafeRawBufferPointer) throws -> Pair? {
        try op(MDB_GET_BOTH_RANGE, key: key, value: value)
    }
    /// DUPSORT: the next duplicate of the current key.
    public func nextDuplicate() throws -> Pair? { try op(MDB_NEXT_DUP) }

    /// Deletes the pair at the cursor (write transactions only).
    public func deleteCurrent() throws { try check(mdb_cursor_del(cursor, 0)) }
}

// Shared empty buffer: LMDB must never be handed a NULL data pointer.
@usableFromInline nonisolated(unsafe) let emptyByte = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)

extension MDB_val {
    @inlinable @inline(__always)
    init(_ buffer: UnsafeRawBufferPointer) {
        self.init(mv_size: buffer.count, mv_data: UnsafeMutableRawPointer(mutating: buffer.baseAddress) ?? emptyByte)
    }

    @inlinable @inline(__always)
    var buffer: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: mv_data, count: mv_size)
    }
}

/// Hints the CPU to load `address` soon (a cache-miss overlap for scans).
@inlinable @inline(__always)
public func prefetch(_ address: UnsafeRawPointer?) {
    if let address { shardfs_prefetch(address) }
}

/// For an in-order scan in a read-only transaction: each time the cursor reaches a
/// new leaf page, hints the CPU to load all of that page's nodes at once (see
/// `shardfs_prefetch_leaf_page` in the shim for the page layout it relies on).
/// Does nothing when the environment's page size is not the OS page size.
public struct LeafPagePrefetcher {
    @usableFromInline let pageSize: Int
    @usableFromInline var lastPage: UInt = 0

    public init(_ environment: Environment) {
        pageSize = environment.pageSize == Int(sysconf(Int32(_SC_PAGESIZE))) ? environment.pageSize : 0
    }

    /// Call with each key the cursor returns, before reading its node.
    @inlinable @inline(__always)
    public mutating func visit(key: UnsafeRawPointer?) {
        guard pageSize != 0, let key else { return }
        let page = UInt(bitPattern: key - 8) & ~UInt(pageSize - 1)
        if page != lastPage {
            lastPage = page
            _ = shardfs_prefetch_leaf_page(key, pageSize)
        }
    }
}

/// The environment folders open in this process, by device and inode (two paths
/// may name one folder), so none is opened twice (see the rules at the top).
enum OpenFolders {
    struct Folder: Hashable, Sendable {
        let device: UInt64
        let inode: UInt64
    }

    private static let open = Mutex<Set<Folder>>([])

    static func claim(_ path: String) throws -> Folder {
        var st = stat()
        guard stat(path, &st) == 0 else { throw LMDBError(code: errno) }
        let folder = Folder(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        let claimed = open.withLock { $0.insert(folder).inserted }
        guard claimed else { throw LMDBError.alreadyOpen }
        return folder
    }

    static func release(_ folder: Folder) {
        _ = open.withLock { $0.remove(folder) }
    }
}
