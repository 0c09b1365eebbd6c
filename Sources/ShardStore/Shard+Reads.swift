import Foundation
import LMDB

// Reads: point reads (which see pending logged batches), listings, the reverse
// index and statistics. Reads never wait for writers.

extension Shard {
    // MARK: Reads

    public func get(_ key: EntryKey) throws -> Entry {
        try readSeeingPending(CollectionOfOne(key.bytes)) { pending, txn in
            let lookup = pending?[0] ?? .notPending
            switch lookup {
            case .put(let item, _): return Entry(key, pending: item)
            case .deleted: throw ShardError.entryNotFound(key)
            case .changed, .notPending: break
            }
            let stored = lookup.recordKey(key.bytes)
            guard let raw = try txn.get(entries, stored) else { throw ShardError.entryNotFound(key) }
            let view = try RecordView(raw)
            return Entry(key: key, value: try value(txn, stored, view), indexes: view.indexes(),
                         modificationTime: lookup.changedTime ?? view.modificationTime)
        }
    }

    /// Why a value of `size` bytes is not answered where at most `largest` fit.
    public static func valueTooLarge(_ key: EntryKey, _ size: Int, _ largest: Int) -> ShardError {
        .invalidArgument("the value of \(key) is \(size) bytes, more than one answer can carry (\(largest)); read it through the mount")
    }

    /// Gets many entries from one snapshot; a missing entry is reported at its position.
    public func batchGet(_ keys: [EntryKey]) throws -> [Result<Entry, ShardError>] {
        try readSeeingPending(keys.lazy.map(\.bytes)) { pending, txn in
            keys.indices.map { i in
                let key = keys[i]
                let lookup = pending?[i] ?? .notPending
                switch lookup {
                case .put(let item, _): return .success(Entry(key, pending: item))
                case .deleted: return .failure(.entryNotFound(key))
                case .changed, .notPending: break
                }
                do {
                    let stored = lookup.recordKey(key.bytes)
                    guard let raw = try txn.get(entries, stored) else { return .failure(.entryNotFound(key)) }
                    let view = try RecordView(raw)
                    return .success(Entry(key: key, value: try value(txn, stored, view), indexes: view.indexes(),
                                          modificationTime: lookup.changedTime ?? view.modificationTime))
                } catch let error as ShardError {
                    return .failure(error)
                } catch {
                    return .failure(.storage("\(error)"))
                }
            }
        }
    }

    /// Whether the entry exists (pending puts and deletions included): what
    /// `attributes` answers with a record read, without building the attributes.
    public func contains(_ key: EntryKey) throws -> Bool {
        try readSeeingPending(CollectionOfOne(key.bytes)) { pending, txn in
            switch pending?[0] {
            case .put?: return true
            case .deleted?: return false
            case .changed?, .notPending?, nil: break
            }
            return try txn.get(entries, (pending?[0] ?? .notPending).recordKey(key.bytes)) != nil
        }
    }

    /// Size, modification time and indexes of an entry, or nil if there is none.
    public func attributes(_ key: EntryKey) throws -> EntryAttributes? {
        try readSeeingPending(CollectionOfOne(key.bytes)) { pending, txn in
            let stored = try txn.get(entries, (pending?[0] ?? .notPending).recordKey(key.bytes)).map { try RecordView($0) }
            switch pending?[0] {
            case .put(let item, let anew)?:
                // The entry keeps what it has beside its value, unless a deletion
                // pending before this put drops it: then the put makes it anew.
                var metadata = (anew ? nil : stored?.metadata) ?? EntryMetadata(number: item.entryNumber ?? 0, mode: item.creationMode)
                metadata.changeTime = nil
                if metadata.number == 0 { metadata.number = item.entryNumber ?? 0 }
                item.metadataChange?.apply(to: &metadata)
                return EntryAttributes(key: key, size: item.value.count, modificationTime: item.modificationTime ?? 0,
                                       indexes: item.indexes, metadata: metadata)
            case .changed(let item)?:
                guard let view = stored else { return nil }
                var metadata = view.metadata
                item.metadataChange?.apply(to: &metadata)
                return EntryAttributes(key: key, size: view.size, modificationTime: item.modificationTime ?? view.modificationTime,
                                       indexes: view.indexes(), metadata: metadata)
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
            case .put(let item, _)?:
                let end = min(item.value.count, offset &+ count)
                return offset < end ? Array(item.value[offset..<end]) : []
            case .deleted?: throw ShardError.entryNotFound(key)
            case .changed?, .notPending?, nil: break  // an update leaves the value
            }
            let stored = (pending?[0] ?? .notPending).recordKey(key.bytes)
            guard let raw = try txn.get(entries, stored) else { throw ShardError.entryNotFound(key) }
            let view = try RecordView(raw)
            if let number = view.valueFile { return try self.readValueFile(number, size: view.size, offset: offset, count: count) }
            return try view.slice(offset: offset, count: count) { n in try self.chunk(txn, stored, n, view) }
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
        let lookup = try IndexLookup(name: name, value: value)
        return try readTransaction { txn in
            try txn.withCursor(indexes) { cursor in
                try lookup.keys(&cursor, after: after, limit: limit) { key in try self.entryHasIndex(txn, key, name: lookup.name, value: value) }
            }
        }
    }

    /// An upper bound of the bytes in use, without reading the free list (cheap:
    /// for checks on hot paths; `stats()` gives the exact figure).
    public var usedBytesUpperBound: Int { env.info.usedBytes + logLock.withLock { pendingCost } }

    public func stats() throws -> ShardStats {
        let (count, free) = try readTransaction { txn in (try txn.count(entries), try txn.freePageCount()) }
        let info = env.info
        let used = max(0, info.lastPage + 1 - free) * info.pageSize + (try valueFileBytes())
        return ShardStats(id: id, owner: owner, state: state, entries: count, usedBytes: used, limitBytes: sizeLimit)
    }

    func chunk(_ txn: Transaction, _ key: [UInt8], _ n: Int, _ view: RecordView) throws -> UnsafeRawBufferPointer {
        try view.checkedChunk(try txn.get(chunks, chunkKey(view.chunkSet, n)), n, key: key)
    }

    func value(_ txn: Transaction, _ key: [UInt8], _ view: RecordView) throws -> [UInt8] {
        guard view.flags.contains(.chunked) else { return Array(view.inlineValue) }
        if let number = view.valueFile { return try readValueFile(number, size: view.size) }
        var out: [UInt8] = []
        out.reserveCapacity(view.size)
        for n in 0..<view.chunkCount { out.append(contentsOf: try chunk(txn, key, n, view)) }
        return out
    }

    func entryHasIndex(_ txn: Transaction, _ key: [UInt8], name: [UInt8], value: [UInt8]) throws -> Bool {
        guard let raw = try txn.get(entries, key) else { return false }
        var found = false
        try RecordView(raw).forEachIndex { n, v in
            if n.elementsEqual(name) && v.elementsEqual(value) { found = true }
        }
        return found
    }
}
