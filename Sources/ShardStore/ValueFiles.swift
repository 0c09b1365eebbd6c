import CFileIO
import Foundation
import Glibc
import LMDB
import LMDBSnapshot
import Synchronization

// Value files: large values kept in files of their own beside the shard's LMDB
// environment, `values/<number, 16 hex digits>`, so that a value written
// through the mount crosses memory twice (the kernel's copy into the daemon's
// buffer, one `pwrite` into the page cache) instead of four times through LMDB's
// chunks (docs/ARCHITECTURE.md, "Large values: value files").
//
// Rules, kept by the code below:
// - A file is written by one `ValueFile` handle, then synced (`fdatasync`, and
//   its directory), then named by a record in one durable commit; from then on
//   it never changes. A rename moves the record, not the file.
// - Every file in `values/` is either named by exactly one record or listed in
//   `staging`: listed (kind 1) before it is created; unlisted in the commit that
//   names it; listed again (kind 2) in the commit that stops naming it (an
//   overwrite, a delete, a rename over it). Files listed in `staging` are
//   removed after that commit — or, after a crash, when the shard next opens.
// - A file is removed only once no read that may have seen its record runs:
//   reads that can open value files register for the time of their LMDB read
//   transaction (`ValueFileDirectory.beginReading`). Every write transaction
//   runs through `writeTransaction`, which schedules a removal round after a
//   commit that released a file; a round (one at a time per shard) lists the
//   released files first, then waits (holding no thread) for every read
//   registered before then, then removes what it listed. A file that cannot be removed stays listed.
// - Committed files are read through descriptors kept open per file
//   (`withOpenFile`), closed before the file is removed.
// - Only shards with durable commits hold value files (each listing must be on
//   disk before the file is made or removed); the first file raises the shard's
//   format to `Descriptor.valueFilesFormat`, which binaries that predate value
//   files refuse to open.
// - The commit that names a file also records its physical extents (FIEMAP,
//   taken after its `fdatasync`) in `meta` under `valueFileExtentsKey`, and the
//   commit that releases it deletes them: a backup view on a block device reads
//   the file from the device by them, as it reads `data.mdb` by the published
//   map (docs/BACKUP-VIEWS.md); a hole reads as zeros, and a file whose map
//   could not be taken records none and is refused. A snapshot pinned for views
//   counts as a read for as long as it is pinned, so no file it names is removed
//   meanwhile.
// - A sync that fails makes the handle refuse to commit: the kernel reports a
//   lost write once, and a later sync could succeed over it.
// - A value file counts against the shard's size limit from the commit that
//   names it (`meta` keeps the total, `valueFileBytes`) to the one that releases
//   it. LMDB's own pages stay bounded by the map size, so the shard's disk use is
//   at most the limit plus the value files committed while LMDB was not full.

/// What a key of `staging` lists (its value).
enum StagingKind: UInt8 {
    /// A chunk set being written (stored as an empty value).
    case chunkSet = 0
    /// A value file being written by a `ValueFile` handle.
    case writingFile = 1
    /// A value file no record names any more: to be removed.
    case releasedFile = 2

    init(stored: UnsafeRawBufferPointer) {
        self = stored.isEmpty ? .chunkSet : StagingKind(rawValue: stored[0]) ?? .chunkSet
    }
}

/// The `values/` folder of a shard, and the readers that may have a value file open.
final class ValueFileDirectory: @unchecked Sendable {
    let path: String
    // Readers by epoch parity. A reader counts itself in the counter of the
    // current epoch; the remover moves the epoch on and waits until the old
    // epoch's counter is zero: every read that began before then has ended.
    private let epoch = Atomic<UInt64>(0)
    private let evenReaders = Atomic<Int>(0)
    private let oddReaders = Atomic<Int>(0)
    private let removerLock = NSLock()
    private var directoryMade = false
    /// The shard's removal rounds run here, one at a time.
    private let remover = DispatchQueue(label: "shardfs.value-file-remover")

    /// Descriptors of committed value files kept open for reads, one per file and
    /// shared, so that the kernel's readahead follows a reader from one read to
    /// the next (a descriptor opened per read starts it over each time). Entries
    /// no read uses are closed when the table is full, and when their file is removed.
    private let openFiles = Mutex<[UInt64: (fd: Int32, users: Int)]>([:])
    /// Per shard: a node holds many shards, and descriptors are a process-wide budget.
    static let openFilesLimit = 8

    init(shardPath: String) {
        path = shardPath + "/values"
    }

    deinit {
        openFiles.withLock { files in for entry in files.values { close(entry.fd) } }
    }

    /// Runs `body` with a descriptor of committed value file `number`, opened by `opening` if none is.
    func withOpenFile<R>(_ number: UInt64, opening: () throws -> Int32, _ body: (Int32) throws -> R) throws -> R {
        func take(_ files: inout [UInt64: (fd: Int32, users: Int)]) -> Int32? {
            guard let entry = files[number] else { return nil }
            files[number] = (entry.fd, entry.users + 1)
            return entry.fd
        }
        var fd: Int32
        if let cached = openFiles.withLock({ take(&$0) }) {
            fd = cached
        } else {
            let opened = try opening()  // not under the lock: other reads go on
            fd = openFiles.withLock { files -> Int32 in
                if let cached = take(&files) {
                    close(opened)  // another read opened it meanwhile
                    return cached
                }
                if files.count >= Self.openFilesLimit {
                    for (n, entry) in files where entry.users == 0 {
                        close(entry.fd)
                        files[n] = nil
                    }
                }
                files[number] = (opened, 1)
                return opened
            }
        }
        defer {
            openFiles.withLock { files in
                if let entry = files[number], entry.fd == fd { files[number] = (fd, entry.users - 1) }
            }
        }
        return try body(fd)
    }

    /// Before value file `number` is removed (no read that may use it runs any more).
    func closeOpenFile(_ number: UInt64) {
        openFiles.withLock { files in
            if let entry = files.removeValue(forKey: number) { close(entry.fd) }
        }
    }

    func filePath(_ number: UInt64) -> String { Self.filePath(number, in: path) }

    /// Value file `number` in the `values/` folder at `path` (16 hex digits).
    static func filePath(_ number: UInt64, in path: String) -> String {
        path + "/" + String(format: "%016llx", number)
    }

    /// Registers a read that may open value files; pass the result to `endReading`.
    func beginReading() -> UInt64 {
        while true {
            let e = epoch.load(ordering: .sequentiallyConsistent)
            if e & 1 == 0 { evenReaders.add(1, ordering: .sequentiallyConsistent) } else { oddReaders.add(1, ordering: .sequentiallyConsistent) }
            if epoch.load(ordering: .sequentiallyConsistent) == e { return e }
            endReading(e)
        }
    }

    func endReading(_ e: UInt64) {
        if e & 1 == 0 { evenReaders.subtract(1, ordering: .sequentiallyConsistent) } else { oddReaders.subtract(1, ordering: .sequentiallyConsistent) }
    }

    /// Moves the epoch on: the reads registered before now are those of the
    /// returned epoch (see `earlierReadersEnded`). One round at a time.
    private func moveEpoch() -> UInt64 {
        epoch.add(1, ordering: .sequentiallyConsistent).oldValue
    }

    /// Whether every read registered in epoch `old` has ended.
    private func earlierReadersEnded(_ old: UInt64) -> Bool {
        (old & 1 == 0 ? evenReaders.load(ordering: .sequentiallyConsistent) : oddReaders.load(ordering: .sequentiallyConsistent)) == 0
    }

    /// Creates `values/` (made durable in the shard's folder) if it is not there yet.
    func makeDirectory(shardPath: String) throws {
        if removerLock.withLock({ directoryMade }) { return }
        if mkdir(path, 0o700) == 0 {
            try syncDirectory(shardPath)
        } else if errno != EEXIST {
            throw ShardError.storage("cannot create \(path): \(String(cString: strerror(errno)))")
        }
        removerLock.withLock { directoryMade = true }
    }


    /// A removal round: `list` the files to remove (nil or empty: nothing to
    /// do), then, once every read registered before the listing has ended,
    /// `remove` them.
    struct RemovalRound: Sendable {
        let list: @Sendable () -> [UInt64]?
        let remove: @Sendable ([UInt64]) -> Void
    }

    /// Runs `round` on the shard's queue; if a round is under way, another
    /// follows it (a release committed meanwhile may not be in its list). Rounds
    /// run one at a time (the epochs need it). A round that waits for readers
    /// (a view's pin lasts a checkpoint or two) holds no thread: it looks again
    /// every millisecond from the queue.
    func scheduleRemoval(_ round: RemovalRound) {
        let start = removerLock.withLock { () -> Bool in
            if roundRunning { roundAgain = true; return false }
            roundRunning = true
            return true
        }
        if start { remover.async { self.startRound(round) } }
    }

    private var roundRunning = false
    private var roundAgain = false

    private func startRound(_ round: RemovalRound) {
        guard let listed = round.list(), !listed.isEmpty else { return endRound(round) }
        waitThenRemove(listed, after: moveEpoch(), round)
    }

    private func waitThenRemove(_ listed: [UInt64], after old: UInt64, _ round: RemovalRound) {
        guard earlierReadersEnded(old) else {
            remover.asyncAfter(deadline: .now() + .milliseconds(1)) { self.waitThenRemove(listed, after: old, round) }
            return
        }
        round.remove(listed)
        endRound(round)
    }

    private func endRound(_ round: RemovalRound) {
        let again = removerLock.withLock { () -> Bool in
            if roundAgain { roundAgain = false; return true }
            roundRunning = false
            return false
        }
        if again { remover.async { self.startRound(round) } }
    }
}

/// A large value being written into a value file of its shard (the mount's
/// files past `WriteBuffer.spillThreshold`): written at any offsets, read back,
/// truncated, then made an entry's value by `commit`, or dropped.
///
/// The handle owns its file: `commit` hands it to the entry and uses the handle
/// up; `discard`, or dropping the handle unused, removes it; after a crash the
/// shard removes it when it next opens. Not thread-safe: the caller serialises calls.
public final class ValueFile: @unchecked Sendable {
    public let shard: Shard
    public let number: UInt64
    let clientID: String
    private let fd: Int32
    /// The value's size: past the last byte written, or as truncated.
    public private(set) var size = 0
    private var finished = false
    /// A sync failed: the kernel may have dropped pages it could not write and
    /// reports that once, so a later sync could succeed over lost bytes.
    private var syncFailed = false

    init(shard: Shard, number: UInt64, fd: Int32, clientID: String) {
        self.shard = shard
        self.number = number
        self.fd = fd
        self.clientID = clientID
    }

    deinit {
        close(fd)
        if !finished { shard.dropValueFile(number) }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        precondition(!finished, "a value file is written before its commit")
        // No value is larger than the shard's whole limit: fail now, not at the
        // commit after filling the disk (the commit checks what is in use).
        guard offset + bytes.count <= shard.sizeLimit else { throw ShardError.full(limit: shard.sizeLimit) }
        let failure = pwriteFully(fd, bytes, at: offset)
        if failure != 0 { throw shard.diskFailure(failure, "cannot write value file \(number)") }
        size = max(size, offset + bytes.count)
        startWriteback(through: offset + bytes.count)
    }

    /// Where the writeback started by `startWriteback` has reached.
    private var writebackStart = 0
    /// Bytes written in order before their writeback is started.
    static let writebackBytes = 16 << 20

    /// A value written in order has its writeback started every `writebackBytes`
    /// (`sync_file_range`, which does not wait), so the disk writes while the
    /// next bytes arrive and the commit's `fdatasync` finds little left to do.
    /// LMDB's staging, which synced every 16 MiB, had that overlap for free.
    private func startWriteback(through end: Int) {
        guard end >= writebackStart + Self.writebackBytes else {
            if end < writebackStart { writebackStart = 0 }  // a seek back: start over
            return
        }
        let length = (end - writebackStart) / Self.writebackBytes * Self.writebackBytes
        _ = shardfs_start_writeback(fd, Int64(writebackStart), Int64(length))
        writebackStart += length
    }

    /// Copies `buffer.count` bytes from `offset` into `buffer`; zeros past the end.
    public func read(at offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        try readFully(fd, offset: offset, into: buffer, size: size, what: "value file \(number)")
    }

    public func truncate(to newSize: Int) throws {
        guard newSize <= shard.sizeLimit else { throw ShardError.full(limit: shard.sizeLimit) }
        guard ftruncate(fd, off_t(newSize)) == 0 else {
            throw shard.diskFailure(errno, "cannot truncate value file \(number)")
        }
        size = newSize
    }

    /// Makes the file `key`'s value: syncs it, then one durable commit names it
    /// in the entry's record. `indexes` nil keeps the entry's indexes. Uses the
    /// handle up; on failure the file stays (a retry may follow).
    public func commit(as key: EntryKey, indexes: [IndexPair]? = nil, modificationTime: Int64? = nil,
                       entryNumber: UInt64? = nil, creationMode: UInt32? = nil) throws {
        precondition(!finished, "a value file is committed or discarded once")
        guard !syncFailed else { throw ShardError.storage("value file \(number) failed to sync before; its bytes may be lost") }
        guard fdatasync(fd) == 0 else {
            syncFailed = true
            throw shard.diskFailure(errno, "cannot sync value file \(number)")
        }
        do {
            try syncDirectory(shard.valueFiles.path)
        } catch {
            syncFailed = true
            throw error
        }
        // Synced: no extent is left delayed. Where FIEMAP fails (tmpfs has none)
        // nothing is recorded, and a view on a device refuses the value: a missing
        // map must not read as holes, which are zeros.
        let extents = try? fileExtents(fd: fd)
        try shard.commitValueFile(key, number: number, size: size, extents: extents, indexes: indexes, clientID: clientID,
                                  modificationTime: modificationTime, entryNumber: entryNumber, creationMode: creationMode)
        finished = true
    }

    /// Removes the file (best effort: what is left, the shard's next open removes).
    public func discard() {
        guard !finished else { return }
        finished = true
        shard.dropValueFile(number)
    }

    /// Lets the handle go and leaves the file, as a crash would (tests).
    func leaveBehind() { finished = true }
}

/// Reads `buffer.count` bytes at `offset` of a file whose value is `size` bytes; zeros past the end.
func readFully(_ fd: Int32, offset: Int, into buffer: UnsafeMutableRawBufferPointer, size: Int, what: String) throws {
    let available = max(0, min(buffer.count, size - offset))
    let failure = preadFully(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<available]), at: offset)
    if failure != 0 {
        throw ShardError.storage(failure == ENODATA ? "\(what) ends before its \(size) bytes" : "cannot read \(what): \(String(cString: strerror(failure)))")
    }
    if available < buffer.count {
        UnsafeMutableRawBufferPointer(rebasing: buffer[available...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
}


extension Shard {
    static let valueFileBytesKey = Array("valueFileBytes".utf8)

    /// The `meta` key of value file `number`'s extents.
    static func valueFileExtentsKey(_ number: UInt64) -> [UInt8] {
        Array("valueFileExtents/".utf8) + withUnsafeBytes(of: number.bigEndian) { Array($0) }
    }

    /// Extents as stored: per extent, logical, physical and length (u64) and flags (u32), little-endian.
    static func encodeExtents(_ extents: [FileExtent]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(extents.count * 28)
        for e in extents {
            for field in [e.logical, e.physical, e.length] { withUnsafeBytes(of: field.littleEndian) { out.append(contentsOf: $0) } }
            withUnsafeBytes(of: e.flags.littleEndian) { out.append(contentsOf: $0) }
        }
        return out
    }

    static func decodeExtents(_ raw: UnsafeRawBufferPointer) throws -> [FileExtent] {
        guard raw.count % 28 == 0 else { throw ShardError.corrupt("a value file's extent map has \(raw.count) bytes") }
        return stride(from: 0, to: raw.count, by: 28).map { at in
            FileExtent(logical: raw.loadLE(UInt64.self, at: at), physical: raw.loadLE(UInt64.self, at: at + 8),
                       length: raw.loadLE(UInt64.self, at: at + 16), flags: raw.loadLE(UInt32.self, at: at + 24))
        }
    }

    /// A new, empty value file (listed in `staging` by one durable commit, then created).
    public func beginValueFile(clientID: String) throws -> ValueFile {
        // The rules need each listing durable before the file is made or removed.
        guard !env.options.noSync else { throw ShardError.invalidArgument("value files need durable commits") }
        try valueFiles.makeDirectory(shardPath: path)
        let box = StagedSetBox()
        try write(clientID: clientID) { ctx in
            box.set = try self.newChunkSet(ctx.txn)
            try ctx.txn.put(self.staging, chunkSetKey(box.set), [StagingKind.writingFile.rawValue])
            let format = Array(Descriptor.valueFilesFormat.utf8)
            let stored = try Descriptor.formatKey.withUnsafeBytes { try ctx.txn.get(self.meta, $0).map(Array.init) }
            if stored != format { try ctx.txn.put(self.meta, Descriptor.formatKey, format) }
        }
        let fd = Glibc.open(valueFiles.filePath(box.set), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let code = errno
            dropValueFile(box.set)
            throw diskFailure(code, "cannot create value file \(box.set) in \(valueFiles.path)")
        }
        return ValueFile(shard: self, number: box.set, fd: fd, clientID: clientID)
    }

    /// Makes value file `number` (synced, `size` bytes) `key`'s value in one durable commit.
    func commitValueFile(_ key: EntryKey, number: UInt64, size: Int, extents: [FileExtent]?, indexes: [IndexPair]?, clientID: String,
                         modificationTime: Int64?, entryNumber: UInt64?, creationMode: UInt32?) throws {
        if let indexes { try IndexPair.validate(indexes) }
        guard size + key.bytes.count <= sizeLimit else { throw ShardError.full(limit: sizeLimit) }
        let mtime = modificationTime ?? Shard.now()
        do {
            try write(clientID: clientID) { ctx in
                // Before any change: the only ShardErrors a member may throw.
                let inFiles = try self.metaCounter(ctx.txn, Self.valueFileBytesKey)
                let replaced = try ctx.txn.get(self.entries, key.bytes).map { try RecordView($0) }
                let freed = replaced?.valueFile != nil ? replaced!.size : 0
                if self.env.info.usedBytes + Int(inFiles) - freed + size > self.sizeLimit { throw ShardError.full(limit: self.sizeLimit) }
                let kept = indexes ?? replaced?.indexes() ?? []
                try self.writeEntry(ctx.txn, key: key.bytes, size: size, indexes: kept, modificationTime: mtime,
                                    valueFile: number, entryNumber: entryNumber, creationMode: creationMode) { _, _ in }
                _ = try ctx.txn.delete(self.staging, chunkSetKey(number))
                if let extents { try ctx.txn.put(self.meta, Self.valueFileExtentsKey(number), Self.encodeExtents(extents)) }
                // After writeEntry, which released the file it replaced (if any).
                try self.setMetaCounter(ctx.txn, Self.valueFileBytesKey, try self.metaCounter(ctx.txn, Self.valueFileBytesKey) + UInt64(size))
                ctx.changed(key.bytes)
            }
        } catch let error as ShardError {
            throw error
        } catch {
            throw writeFailure(error)
        }
    }

    /// Inside a write transaction: the record naming value file `number` (of
    /// `size` bytes) is being dropped; the file is removed once that commits.
    func releaseValueFile(_ txn: Transaction, _ number: UInt64, size: Int) throws {
        try txn.put(staging, chunkSetKey(number), [StagingKind.releasedFile.rawValue])
        _ = try txn.delete(meta, Self.valueFileExtentsKey(number))
        let inFiles = try metaCounter(txn, Self.valueFileBytesKey)
        try setMetaCounter(txn, Self.valueFileBytesKey, inFiles >= UInt64(size) ? inFiles - UInt64(size) : 0)
        releasedInTransaction = true
    }

    /// Runs a write transaction (LMDB's `env.write`); if it released value files
    /// and committed, a removal round follows (`scheduleValueFileRemoval`).
    /// Every write transaction of the shard goes through here: a release must
    /// be seen by a round that lists after its commit, not one that listed
    /// before (that one would miss it until the shard next opens).
    func writeTransaction<R>(_ body: (Transaction) throws -> R) throws -> R {
        var released = false
        let result = try env.write { txn in
            releasedInTransaction = false  // what an aborted transaction left
            let result = try body(txn)
            released = releasedInTransaction
            releasedInTransaction = false
            return result
        }
        if released { scheduleValueFileRemoval() }
        return result
    }

    /// Removes the value files `staging` lists as released (see the rules above):
    /// those listed when the round starts, once every read that began before
    /// then has ended; a file released later is left to the next round.
    func scheduleValueFileRemoval() {
        valueFiles.scheduleRemoval(.init(
            list: { [weak self] in
                guard let self, let released = try? self.listedValueFiles(.releasedFile), !released.isEmpty else { return nil }
                // Opened without durable commits (the files were made with them):
                // the releases must be on disk before their files go.
                if self.env.options.noSync { guard (try? self.env.sync(force: true)) != nil else { return nil } }
                return released
            },
            remove: { [weak self] released in
                guard let self else { return }
                let gone = released.filter { self.removeFile($0) }
                guard !gone.isEmpty else { return }
                try? self.committer.submit { ctx in
                    for number in gone { _ = try ctx.txn.delete(self.staging, chunkSetKey(number)) }
                }
            }))
    }

    /// Unlinks value file `number`; true if it is gone (a file that cannot be
    /// removed stays listed: the next round, or the next open, tries again).
    private func removeFile(_ number: UInt64) -> Bool {
        valueFiles.closeOpenFile(number)
        return unlink(valueFiles.filePath(number)) == 0 || errno == ENOENT
    }

    /// A value file being written that will not be committed: removed, then unlisted.
    func dropValueFile(_ number: UInt64) {
        guard removeFile(number) else { return }
        try? committer.submit { ctx in _ = try ctx.txn.delete(self.staging, chunkSetKey(number)) }
    }

    /// Value files (or chunk sets) `staging` lists as `kind`.
    func listedValueFiles(_ kind: StagingKind) throws -> [UInt64] {
        try listedInStaging().filter { $0.kind == kind }.map(\.number)
    }

    /// Everything `staging` lists, with its kind, in one read.
    func listedInStaging() throws -> [(number: UInt64, kind: StagingKind)] {
        try readTransaction(applyingLog: false) { txn in
            try txn.withCursor(staging) { cursor in
                var found: [(number: UInt64, kind: StagingKind)] = []
                var pair = try cursor.first()
                while let p = pair {
                    if p.key.count == 8 {
                        found.append((UInt64(bigEndian: p.key.loadUnaligned(as: UInt64.self)), StagingKind(stored: p.value)))
                    }
                    pair = try cursor.next()
                }
                return found
            }
        }
    }

    /// The bytes of the shard's value files (committed ones).
    public func valueFileBytes() throws -> Int {
        Int(try readTransaction(applyingLog: false) { txn in try metaCounter(txn, Self.valueFileBytesKey) })
    }

    // MARK: Reading

    /// Runs a read transaction during which value files may be opened (see the rules above).
    func readingValueFiles<R>(_ body: () throws -> R) rethrows -> R {
        let e = valueFiles.beginReading()
        defer { valueFiles.endReading(e) }
        return try body()
    }

    /// The value file holding `key`'s value as it stands, if it is in one: its
    /// number, and with `opening` a read-only descriptor of it (the caller
    /// closes it). Nil when the value is in LMDB or waits in the batch log. The
    /// file never changes; once a commit stops naming it, it is removed, but a
    /// descriptor opened before still reads it (the mount hands such descriptors
    /// to the kernel for passthrough reads).
    public func valueFile(of key: EntryKey, opening: Bool) throws -> (number: UInt64, fd: Int32?)? {
        try readSeeingPending(CollectionOfOne(key.bytes)) { pending, txn in
            switch pending?[0] {
            case .put?: return nil
            case .deleted?: throw ShardError.entryNotFound(key)
            case .changed?, .notPending?, nil: break
            }
            let stored = (pending?[0] ?? .notPending).recordKey(key.bytes)
            guard let raw = try txn.get(entries, stored) else { throw ShardError.entryNotFound(key) }
            guard let number = try RecordView(raw).valueFile else { return nil }
            // Opened while this read is registered: the file cannot be removed before.
            return (number, opening ? try openValueFile(number) : nil)
        }
    }

    /// `count` bytes (fewer at the end) of the value in value file `number` (`size` bytes) from `offset`.
    func readValueFile(_ number: UInt64, size: Int, offset: Int = 0, count: Int = .max) throws -> [UInt8] {
        let end = min(size, offset &+ count)
        guard offset < end else { return [] }
        return try valueFiles.withOpenFile(number, opening: { try openValueFile(number) }) { fd in
            try [UInt8](unsafeUninitializedCapacity: end - offset) { buffer, initialized in
                try readFully(fd, offset: offset, into: UnsafeMutableRawBufferPointer(buffer), size: size, what: "value file \(number)")
                initialized = end - offset
            }
        }
    }

    /// Calls `body` with the value of value file `number` (`size` bytes) in pieces, in order.
    func forEachValueFilePiece(_ number: UInt64, size: Int, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        try valueFiles.withOpenFile(number, opening: { try openValueFile(number) }) { fd in try forEachPiece(fd, number, size: size, body) }
    }

    private func forEachPiece(_ fd: Int32, _ number: UInt64, size: Int, _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        let piece = min(size, 1 << 20)
        try withUnsafeTemporaryAllocation(byteCount: max(1, piece), alignment: 16) { buffer in
            var offset = 0
            while offset < size {
                let count = min(piece, size - offset)
                let out = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
                try readFully(fd, offset: offset, into: out, size: size, what: "value file \(number)")
                try body(UnsafeRawBufferPointer(out))
                offset += count
            }
        }
    }

    private func openValueFile(_ number: UInt64) throws -> Int32 {
        let fd = Glibc.open(valueFiles.filePath(number), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno, text = "value file \(number) of shard \(id) cannot be opened: \(String(cString: strerror(code)))"
            throw code == ENOENT ? ShardError.corrupt(text) : ShardError.storage(text)
        }
        return fd
    }
}
