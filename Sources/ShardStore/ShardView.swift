import Foundation
import Glibc
import LMDB
import LMDBSnapshot
import Synchronization

// Backup views (docs/BACKUP-VIEWS.md). The primary pins a snapshot of a shard and
// publishes where its pages are (`PublishedSnapshot`); a backup reads that snapshot
// through `ShardView`, without LMDB: from the raw device, by the published root.

/// Where a pinned snapshot's pages are: its root and the data file's extents.
public struct PublishedSnapshot: Codable, Sendable, Equatable {
    public var root: SnapshotRoot
    /// The data file's physical extents when the snapshot was pinned (after fdatasync).
    public var extents: [FileExtent]

    public init(root: SnapshotRoot, extents: [FileExtent]) {
        self.root = root
        self.extents = extents
    }

    public func encoded() throws -> Data { try JSONEncoder().encode(self) }

    public static func decode(_ data: Data) throws -> PublishedSnapshot {
        do { return try JSONDecoder().decode(PublishedSnapshot.self, from: data) } catch {
            throw ShardError.corrupt("unreadable published snapshot: \(error)")
        }
    }
}

extension Shard {
    /// Pins the newest snapshot for backups, and holds a read transaction on it,
    /// then maps the data file. A backup reads LMDB only, so acknowledged batches
    /// logged before `now - maxPending` are applied to LMDB first; younger ones are
    /// left to the background applier (which applies under load in large
    /// transactions, or within milliseconds of a pause): forcing them in at every
    /// checkpoint made more, smaller transactions than the log would. The pin
    /// keeps every page the snapshot reaches from reuse until `PinnedSnapshot.end()`.
    public func pinForViews(applyingBatchesOlderThan maxPending: Duration) throws -> (pin: PinnedSnapshot, published: PublishedSnapshot) {
        if log != nil, hasBatches(loggedBefore: ContinuousClock.now - maxPending) { try applyLogBeforeRead() }
        do {
            let (pin, root) = try env.pinNewest { pinned, fd in
                // The writer lock is held: no commit releases a value file this
                // snapshot names before the pin counts as a read of them (ValueFiles.swift).
                let reading = valueFiles.beginReading()
                pinned.onEnd { [valueFiles] in valueFiles.endReading(reading) }
                // The meta page of this snapshot is still on disk.
                return try SnapshotRoot.meta(of: pinned.transactionID, fd: fd)
            }
            do {
                // A durable commit (the default) already synced what the backup reads
                // from the device: pages, then the meta page.
                if env.options.noSync { try env.sync(force: true) }
                let extents = try withDataFile { fd in try fileExtents(fd: fd) }
                return (pin, PublishedSnapshot(root: root, extents: extents))
            } catch {
                pin.end()
                throw error
            }
        } catch let error as ShardError {
            throw error
        } catch {
            throw ShardError.storage("cannot pin shard \(id) for views: \(error)")
        }
    }

    private func withDataFile<R>(_ body: (Int32) throws -> R) throws -> R {
        let fd = Glibc.open(path + "/data.mdb", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ShardError.storage("cannot open \(path)/data.mdb: \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        return try body(fd)
    }
}

/// A read-only view of a shard at one published snapshot, read with `LMDBSnapshot`
/// (pread by published root, no memory map: a failing read is an error, never
/// SIGBUS). Every read either answers from that snapshot or throws. Safe to share
/// between threads.
public final class ShardView: Sendable {
    public let id: UInt64
    public let owner: String
    public let state: ShardState
    public let sizeLimit: Int
    /// The LMDB transaction whose snapshot this is.
    public let transactionID: UInt64
    let snapshot: Snapshot
    let entries: SnapshotDatabase
    let chunks: SnapshotDatabase
    let indexes: SnapshotDatabase
    let meta: SnapshotDatabase
    /// The shard's `values/` folder, read when `device` is nil.
    let valuesPath: String
    /// The block device the shard's volume is on: value files are read from it by
    /// the extents their commit recorded (nil: a folder volume, read through the folder).
    let device: String?
    /// Value files this view has read, kept open for its later reads (a FUSE
    /// read of a large file asks for 128 KiB at a time): a descriptor on a
    /// folder volume, on a device the page source over the file's extents. A
    /// view lives while its snapshot is served (a generation, or more while the
    /// shard does not change); the pin that keeps its snapshot keeps the files.
    /// At most `keptValueFiles` per view and `keptValueFilesTotal` in the
    /// process (each one a descriptor); past that, a read opens its own.
    private let valueSources = Mutex<[UInt64: ValueSource]>([:])
    static let keptValueFiles = 16
    static let keptValueFilesTotal = 256
    private static let keptTotal = Atomic<Int>(0)

    private enum ValueSource: Sendable {
        case file(Int32)
        case device(DevicePageSource, readable: [FileExtent])
    }

    /// Opens the view; reads the shard's own descriptor from the snapshot. `path`
    /// is the shard's folder; `device`, when the snapshot's pages come from a
    /// block device, that device (value files are then read from it too).
    public init(snapshot: Snapshot, transactionID: UInt64, path: String, device: String? = nil) throws {
        self.snapshot = snapshot
        self.transactionID = transactionID
        valuesPath = ValueFileDirectory(shardPath: path).path
        self.device = device
        do {
            entries = try snapshot.database("entries")
            chunks = try snapshot.database("chunks")
            indexes = try snapshot.database("indexes")
            let meta = try snapshot.database("meta")
            self.meta = meta
            let descriptor = try snapshot.read { txn in
                try Descriptor.load(path: path) { name in try name.withUnsafeBytes { try txn.get(meta, $0) } }
            }
            id = descriptor.id
            owner = descriptor.owner
            state = descriptor.state
            sizeLimit = descriptor.sizeLimit
        } catch {
            throw ShardView.shardError(error)
        }
    }

    deinit {
        valueSources.withLock { sources in
            for case .file(let fd) in sources.values { Glibc.close(fd) }
            Self.keptTotal.subtract(sources.count, ordering: .relaxed)
        }
    }

    /// Snapshot errors as shard errors: what the reader refused is `corrupt`, a
    /// device that failed is `storage`.
    static func shardError(_ error: any Error) -> ShardError {
        switch error {
        case let e as ShardError: return e
        case let e as SnapshotError: return .corrupt("view: \(e)")
        default: return .storage("view: \(error)")
        }
    }

    /// Bytes `offset ..< offset + count` (fewer at the end) of the value in value
    /// file `number` of `size` bytes: from the folder, or from the device at the
    /// extents the file's commit recorded in this snapshot. The pin that keeps
    /// this snapshot's pages keeps the file (ValueFiles.swift).
    private func valueFileBytes(_ txn: SnapshotTransaction, _ number: UInt64, size: Int, offset: Int, count: Int) throws -> [UInt8] {
        let end = min(size, offset &+ count)
        guard offset < end else { return [] }
        let source = try valueSource(txn, number)
        defer { if case .file(let fd) = source.source, !source.kept { Glibc.close(fd) } }
        switch source.source {
        case .file(let fd):
            return try [UInt8](unsafeUninitializedCapacity: end - offset) { buffer, initialized in
                try readFully(fd, offset: offset, into: UnsafeMutableRawBufferPointer(buffer), size: size, what: "view: value file \(number)")
                initialized = end - offset
            }
        case .device(let source, let readable):
            do {
                return try Self.read(source, readable: readable, offset: offset, end: end, number: number)
            } catch let error as SnapshotError {
                throw ShardError.storage("view: value file \(number) on \(source.device): \(error)")  // the device failed
            }
        }
    }

    /// Value file `number`'s source: kept from an earlier read, or opened now
    /// (and kept, while there is room).
    private func valueSource(_ txn: SnapshotTransaction, _ number: UInt64) throws -> (source: ValueSource, kept: Bool) {
        if let known = valueSources.withLock({ $0[number] }) { return (known, true) }
        let opened: ValueSource
        if let device {
            guard let raw = try Shard.valueFileExtentsKey(number).withUnsafeBytes({ try txn.get(meta, $0) }) else {
                throw ShardError.corrupt("view: value file \(number) has no recorded extents")
            }
            do {
                let (source, readable) = try Self.deviceSource(device, extents: try Shard.decodeExtents(raw), number: number)
                opened = .device(source, readable: readable)
            } catch let error as SnapshotError {
                throw ShardError.storage("view: value file \(number) on \(device): \(error)")  // the device, not the data
            }
        } else {
            let fd = Glibc.open(ValueFileDirectory.filePath(number, in: valuesPath), O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                let code = errno, text = "view: value file \(number) cannot be opened: \(String(cString: strerror(code)))"
                throw code == ENOENT ? ShardError.corrupt(text) : ShardError.storage(text)
            }
            opened = .file(fd)
        }
        return valueSources.withLock { sources in
            if let known = sources[number] {  // another read opened it meanwhile
                if case .file(let fd) = opened { Glibc.close(fd) }
                return (known, true)
            }
            guard sources.count < Self.keptValueFiles else { return (opened, false) }
            guard Self.keptTotal.add(1, ordering: .relaxed).newValue <= Self.keptValueFilesTotal else {
                Self.keptTotal.subtract(1, ordering: .relaxed)
                return (opened, false)
            }
            sources[number] = opened
            return (opened, true)
        }
    }

    /// The device, read over a synced file's extents: a hole or an unwritten
    /// extent inside the file reads as zeros (the file was synced: nothing is
    /// left delayed); an extent whose bytes the device does not hold as they are
    /// is an error (when read). Sectors of 512 bytes: FIEMAP's last extent ends
    /// at the file's size rounded up to a sector, not to a filesystem block.
    static func deviceSource(_ device: String, extents: [FileExtent], number: UInt64) throws
        -> (source: DevicePageSource, readable: [FileExtent]) {
        for e in extents {
            let (stop, overflow) = e.logical.addingReportingOverflow(e.length)
            guard !overflow, stop <= UInt64(Int.max) else { throw ShardError.corrupt("view: value file \(number) has an extent out of range") }
        }
        let readable = extents.filter { $0.flags & FileExtent.unwritten == 0 }
        return (try DevicePageSource(device: device, extents: readable, pageSize: 512), readable)
    }

    /// Bytes `offset ..< end` of value file `number`, which `source` reads, in
    /// pieces of 1 MiB straight into the result.
    static func read(_ source: DevicePageSource, readable: [FileExtent], offset: Int, end: Int, number: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: end - offset)
        if let bad = readable.first(where: { !$0.isReadable && $0.logical < UInt64(end) && $0.logical + $0.length > UInt64(offset) }) {
            throw ShardError.corrupt("view: value file \(number) has an extent at \(bad.logical) with flags 0x\(String(bad.flags, radix: 16))")
        }
        let sector = source.pageSize, piece = 1 << 20
        try out.withUnsafeMutableBytes { buffer in
            for extent in readable {
                let a = max(offset, Int(extent.logical)), b = min(end, Int(extent.logical + extent.length))
                var at = a
                while at < b {
                    let stop = min(b, at + piece)
                    let first = at / sector, last = (stop - 1) / sector
                    let sectors = try source.read(page: UInt64(first), count: last - first + 1)
                    sectors.withUnsafeBytes { s in
                        UnsafeMutableRawBufferPointer(rebasing: buffer[(at - offset) ..< (stop - offset)])
                            .copyMemory(from: UnsafeRawBufferPointer(rebasing: s[(at - first * sector) ..< (stop - first * sector)]))
                    }
                    at = stop
                }
            }
        }
        return out
    }

    private func reading<R>(_ body: (SnapshotTransaction) throws -> R) throws -> R {
        do { return try snapshot.read(body) } catch { throw ShardView.shardError(error) }
    }

    /// The entry; `largestValue`: a larger value is refused (`invalidArgument`)
    /// before it is read (a protocol that cannot carry it).
    public func get(_ key: EntryKey, largestValue: Int = .max) throws -> Entry {
        try reading { txn in
            guard let raw = try key.bytes.withUnsafeBytes({ try txn.get(entries, $0) }) else { throw ShardError.entryNotFound(key) }
            let view = try RecordView(raw)
            if view.size > largestValue { throw Shard.valueTooLarge(key, view.size, largestValue) }
            return Entry(key: key, value: try value(txn, key.bytes, view), indexes: view.indexes(), modificationTime: view.modificationTime)
        }
    }

    public func batchGet(_ keys: [EntryKey]) throws -> [Result<Entry, ShardError>] {
        try reading { txn in
            keys.map { key in
                do {
                    guard let raw = try key.bytes.withUnsafeBytes({ try txn.get(entries, $0) }) else {
                        return .failure(.entryNotFound(key))
                    }
                    let view = try RecordView(raw)
                    return .success(Entry(key: key, value: try value(txn, key.bytes, view), indexes: view.indexes(),
                                          modificationTime: view.modificationTime))
                } catch {
                    return .failure(ShardView.shardError(error))
                }
            }
        }
    }

    public func attributes(_ key: EntryKey) throws -> EntryAttributes? {
        try reading { txn in
            guard let raw = try key.bytes.withUnsafeBytes({ try txn.get(entries, $0) }) else { return nil }
            let view = try RecordView(raw)
            return EntryAttributes(key: key, size: view.size, modificationTime: view.modificationTime,
                                   indexes: view.indexes(), metadata: view.metadata)
        }
    }

    /// Up to `count` bytes of the value from `offset`, touching only the chunks needed.
    public func read(_ key: EntryKey, offset: Int, count: Int) throws -> [UInt8] {
        guard offset >= 0, count >= 0 else { throw ShardError.invalidArgument("negative offset or count") }
        return try reading { txn in
            guard let raw = try key.bytes.withUnsafeBytes({ try txn.get(entries, $0) }) else { throw ShardError.entryNotFound(key) }
            let view = try RecordView(raw)
            if let number = view.valueFile { return try valueFileBytes(txn, number, size: view.size, offset: offset, count: count) }
            return try view.slice(offset: offset, count: count) { n in try chunk(txn, key.bytes, n, view) }
        }
    }

    public func list(after: EntryKey? = nil, limit: Int = .max) throws -> [EntrySummary] {
        try reading { txn in
            var rows: [EntrySummary] = []
            try txn.withCursor(entries) { cursor in
                var pair: SnapshotCursor.Pair?
                if let after {
                    pair = try after.bytes.withUnsafeBytes { try cursor.seek(atLeast: $0) }
                    if let p = pair, p.key.elementsEqual(after.bytes) { pair = try cursor.next() }
                } else {
                    pair = try cursor.first()
                }
                while let p = pair, rows.count < limit {
                    guard recordHeadIsSane(p.value) else {
                        throw ShardError.corrupt("unreadable record for key \(String(decoding: p.key, as: UTF8.self))")
                    }
                    let view = EntryView(key: p.key, record: p.value)
                    rows.append(EntrySummary(key: EntryKey(trusted: Array(p.key)), size: view.size,
                                             modificationTime: view.modificationTime, metadata: view.metadata))
                    pair = try cursor.next()
                }
            }
            return rows
        }
    }

    public func find(indexName name: String, value: [UInt8], after: EntryKey? = nil, limit: Int = .max) throws -> [EntryKey] {
        let lookup = try IndexLookup(name: name, value: value)
        return try reading { txn in
            try txn.withCursor(indexes) { cursor in
                try lookup.keys(&cursor, after: after, limit: limit) { key in
                    guard let raw = try key.withUnsafeBytes({ try txn.get(entries, $0) }) else { return false }
                    var found = false
                    try RecordView(raw).forEachIndex { n, v in
                        if n.elementsEqual(lookup.name) && v.elementsEqual(value) { found = true }
                    }
                    return found
                }
            }
        }
    }

    /// Entries and an upper bound of the bytes in use (the view does not read the free list).
    public func stats() throws -> ShardStats {
        let (count, inFiles) = try reading { txn in
            (try txn.count(entries),
             try txn.get(meta, Shard.valueFileBytesKey).map { $0.count == 8 ? Int(UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self))) : 0 } ?? 0)
        }
        let root = snapshot.root
        return ShardStats(id: id, owner: owner, state: state, entries: count,
                          usedBytes: Int(root.lastPage + 1) * root.pageSize + inFiles, limitBytes: sizeLimit)
    }

    /// The directory time stored in the shard at this snapshot (as `Shard.directoryTime`), if any.
    public func directoryTime() throws -> Int64? {
        do {
            let meta = try snapshot.database("meta")
            return try snapshot.read { txn in
                try txn.get(meta, Shard.directoryTimeKey).flatMap { $0.count == 8 ? Int64(bitPattern: $0.loadLE(UInt64.self, at: 0)) : nil }
            }
        } catch {
            throw ShardView.shardError(error)
        }
    }

    private func chunk(_ txn: SnapshotTransaction, _ key: [UInt8], _ n: Int, _ view: RecordView) throws -> UnsafeRawBufferPointer {
        let raw = try chunkKey(view.chunkSet, n).withUnsafeBytes { try txn.get(chunks, $0) }
        return try view.checkedChunk(raw, n, key: key)
    }

    private func value(_ txn: SnapshotTransaction, _ key: [UInt8], _ view: RecordView) throws -> [UInt8] {
        guard view.flags.contains(.chunked) else { return Array(view.inlineValue) }
        if let number = view.valueFile { return try valueFileBytes(txn, number, size: view.size, offset: 0, count: view.size) }
        var out: [UInt8] = []
        out.reserveCapacity(view.size)
        for n in 0..<view.chunkCount { out.append(contentsOf: try chunk(txn, key, n, view)) }
        return out
    }
}

extension Shard {
    /// Whether a view at snapshot `transactionID` needs a new pin: a commit since,
    /// or an acknowledged batch not yet applied that was logged more than
    /// `maxPending` ago (see `pinForViews`).
    public func changed(since transactionID: UInt64, maxPending: Duration) -> Bool {
        env.info.lastTransactionID != transactionID || hasBatches(loggedBefore: ContinuousClock.now - maxPending)
    }

    /// Whether a batch logged before `instant` is still waiting for LMDB.
    func hasBatches(loggedBefore instant: ContinuousClock.Instant) -> Bool {
        logLock.withLock { pendingBatches.first.map { $0.loggedAt <= instant } ?? false }
    }
}
