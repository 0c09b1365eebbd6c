import Foundation
import LMDB

// Writes: puts, batch puts, deletes, renames, metadata changes, and the
// record-level work they share inside a write transaction (see `Shard.write`).

extension Shard {
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
    /// `entryNumber`, `creationMode`: the number (see `newEntryNumber`) and mode the entry gets if this put creates it.
    public func put(_ key: EntryKey, size: Int, indexes: [IndexPair]? = [], clientID: String, modificationTime: Int64? = nil,
                    entryNumber: UInt64? = nil, creationMode: UInt32? = nil,
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
                                    stagedChunkSet: staged, entryNumber: entryNumber, creationMode: creationMode, source: source)
                if let staged { try ctx.txn.delete(self.staging, chunkSetKey(staged)) }
                ctx.changed(key.bytes)
            }
        } catch {
            if let staged { try? removeStagedSet(staged) }
            throw error
        }
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
            let old = try self.oldEntry(raw)
            let indexesChanged = entry.indexes != oldIndexes
            // From here on only LMDB can fail (the group rule: no ShardError after a change).
            if indexesChanged {
                for index in old.indexes {
                    _ = try index.reverseKey.withUnsafeBytes { k in try key.bytes.withUnsafeBytes { try txn.delete(self.indexes, k, value: $0) } }
                }
            }
            try self.rewriteRecord(txn, key: key.bytes, view, indexes: entry.indexes, modificationTime: entry.modificationTime,
                                   metadata: entry.metadata)
            if indexesChanged { try self.addReverseIndexes(txn, key: key.bytes, entry.indexes) }
            ctx.changed(key.bytes)
        }
    }

    /// Changes an entry's metadata (`change`) and, when given, its modification
    /// time, leaving its value and indexes (chmod and utimens through the mount).
    /// With durability deferred the change is logged like a batch put with
    /// durability deferred (`batchPut`): every reader sees it at once, and it is
    /// durable after `sync()` or within the log applier's delay. Otherwise, or
    /// when the log cannot take it, it is one durable LMDB commit.
    public func changeMetadata(_ key: EntryKey, modificationTime: Int64?, _ change: MetadataChange, clientID: String,
                               deferringDurability: Bool = false) throws {
        guard !isReadOnlyView else { throw ShardError.readOnlyView }
        if deferringDurability, usesBatchLog {
            guard let current = try attributes(key) else { throw ShardError.entryNotFound(key) }
            let item = EntryWrite.update(of: key.bytes, modificationTime: modificationTime, change: change,
                                         recordBytes: Self.rewriteBytes(current))
            if try logBatch([item], statuses: [nil], now: Shard.now(), clientID: clientID, deferringDurability: true) { return }
        }
        try updateEntry(key, clientID: clientID) { entry in
            if let modificationTime { entry.modificationTime = modificationTime }
            change.apply(to: &entry.metadata)
        }
    }

    /// What rewriting an entry's record may take in LMDB, generously (the log's
    /// room check): its value, if the record holds it or a pending put of up to
    /// `deferredValueLimit` does (an update composed with one is applied as that
    /// put again), and its indexes twice (in the record and the reverse rows).
    static func rewriteBytes(_ entry: EntryAttributes) -> Int {
        (entry.size <= deferredValueLimit ? entry.size : 0) + 2 * (entry.indexes.isEmpty ? 0 : encodedIndexSize(entry.indexes))
    }

    /// Applies an update (or what pending updates changed of a put) to the record
    /// of `key`; an entry that is gone is left alone. Mid-batch: an unreadable
    /// record aborts the transaction.
    func changeRecord(_ txn: Transaction, key: [UInt8], modificationTime: Int64?, _ change: MetadataChange?) throws {
        guard let raw = try txn.get(entries, key) else { return }
        guard let view = try? RecordView(raw) else { throw LMDBError.corrupted }
        var metadata = view.metadata
        change?.apply(to: &metadata)
        try rewriteRecord(txn, key: key, view, indexes: view.indexes(), modificationTime: modificationTime ?? view.modificationTime,
                          metadata: metadata)
    }

    /// Writes the record of `key` again with a new head, keeping its value (inline,
    /// or its chunk set) and leaving index rows to the caller.
    func rewriteRecord(_ txn: Transaction, key: [UInt8], _ view: RecordView, indexes: [IndexPair], modificationTime: Int64,
                       metadata: EntryMetadata) throws {
        let chunkSet: UInt64? = view.flags.contains(.chunked) ? view.chunkSet : nil
        let size = view.size
        let inline = Array(view.inlineValue)  // the view points into the page the reserve replaces
        let count = recordHeadSize(chunked: chunkSet != nil, indexes: indexes, metadata: metadata) + inline.count
        try key.withUnsafeBytes { k in
            let out = try txn.reserve(self.entries, k, count: count)
            let offset = encodeRecordHead(into: out, chunkSet: chunkSet, inFile: view.valueFile != nil,
                                          modificationTime: modificationTime, size: size, indexes: indexes, metadata: metadata)
            inline.withUnsafeBytes { v in
                if let base = v.baseAddress { out.baseAddress!.advanced(by: offset).copyMemory(from: base, byteCount: v.count) }
            }
        }
    }

    /// Puts many entries in one transaction. Items that fail validation get their
    /// error at their position and are skipped; the others commit together. Errors
    /// of the whole batch (fenced, closed, full) are thrown and nothing is committed.
    /// `reportingChanges` false: `onCommit` is not told of these keys (a caller
    /// that is the observer itself, and knows already: the mount's own writes).
    public func batchPut(_ items: [EntryWrite], clientID: String, deferringDurability: Bool = false,
                         reportingChanges: Bool = true) throws -> [ShardError?] {
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
        let appending = try !deferringDurability && appendsPastLastKey(items, statuses)
        if !appending, try logBatch(items, statuses: statuses, now: now, clientID: clientID, deferringDurability: deferringDurability,
                                    reportingChanges: reportingChanges) {
            return statuses
        }
        try write(clientID: clientID) { [statuses] ctx in
            for i in items.indices where statuses[i] == nil {
                try self.applyItem(ctx.txn, items[i], defaultTime: now, appending: appending)
                if reportingChanges { ctx.changed(items[i].key) }
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
    /// With durability deferred it is logged like a batch put with durability
    /// deferred (see `changeMetadata`); otherwise it is one durable LMDB commit.
    public func rename(_ from: EntryKey, to: EntryKey, clientID: String, deferringDurability: Bool = false) throws {
        if deferringDurability, usesBatchLog, !isReadOnlyView {
            guard let source = try attributes(from) else { throw ShardError.entryNotFound(from) }
            if from == to { return }
            let item = EntryWrite.move(from: from.bytes, to: to.bytes, sourceBytes: Self.rewriteBytes(source))
            if try logBatch([item], statuses: [nil], now: Shard.now(), clientID: clientID, deferringDurability: true) { return }
        }
        try write(clientID: clientID) { ctx in
            if from == to {
                guard try ctx.txn.get(self.entries, from.bytes) != nil else { throw ShardError.entryNotFound(from) }
                return
            }
            // Nothing is changed before it finds the source (the group rule: no ShardError after a change).
            guard try self.moveRecord(ctx.txn, from: from.bytes, to: to.bytes) else { throw ShardError.entryNotFound(from) }
            ctx.changed(from.bytes)
            ctx.changed(to.bytes)
        }
    }

    /// Moves the record of `from` (with its index rows; its chunks stay where
    /// they are, named by the record) to `to`, replacing what `to` held. Returns
    /// false, changing nothing, if `from` has no entry (or is `to`). Mid-batch: an
    /// unreadable record aborts the transaction.
    @discardableResult
    func moveRecord(_ txn: Transaction, from: [UInt8], to: [UInt8]) throws -> Bool {
        guard from != to, let raw = try txn.get(entries, from) else { return false }
        let record = Array(raw)
        guard let source = try? oldEntry(raw) else { throw LMDBError.corrupted }
        if let replaced = try txn.get(entries, to) {
            guard let target = try? oldEntry(replaced) else { throw LMDBError.corrupted }
            try removeEntry(txn, key: to, old: target)
        }
        try txn.put(entries, to, record)
        for index in source.indexes {
            let rk = index.reverseKey
            try rk.withUnsafeBytes { k in
                _ = try from.withUnsafeBytes { try txn.delete(self.indexes, k, value: $0) }
                try to.withUnsafeBytes { try txn.put(self.indexes, k, $0) }
            }
        }
        try txn.delete(entries, from)
        return true
    }

    /// Sets an entry's modification time (nanoseconds since 1970), e.g. for `touch` or `rsync -a`.
    public func setModificationTime(_ key: EntryKey, _ time: Int64, clientID: String) throws {
        try changeMetadata(key, modificationTime: time, MetadataChange(changeTime: Shard.now()), clientID: clientID)
    }

    func checkLimits(keyCount: Int, valueCount: Int, indexes: [IndexPair]) throws {
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
        /// The value file holding the value, and its size.
        var valueFile: (number: UInt64, size: Int)? = nil
        var hasSideData: Bool { chunkSet != nil || valueFile != nil || !indexes.isEmpty }
    }

    func readOld(_ txn: Transaction, _ key: [UInt8]) throws -> OldEntry? {
        guard let raw = try txn.get(entries, key) else { return nil }
        return try oldEntry(raw)
    }

    func oldEntry(_ raw: UnsafeRawBufferPointer) throws -> OldEntry {
        let view = try RecordView(raw)
        var old = OldEntry(chunkSet: view.flags.contains(.chunked) && view.valueFile == nil ? view.chunkSet : nil, indexes: [])
        if let number = view.valueFile { old.valueFile = (number, view.size) }
        view.forEachIndex { name, value in
            old.indexes.append(.init(reverseKey: reverseIndexKey(name: name, value: value)))
        }
        return old
    }

    func removeEntry(_ txn: Transaction, key: [UInt8], old: OldEntry) throws {
        try removeSideData(txn, key: key, old: old)
        try txn.delete(entries, key)
    }

    func removeSideData(_ txn: Transaction, key: [UInt8], old: OldEntry) throws {
        if let set = old.chunkSet { try deleteChunkSet(txn, set) }
        if let file = old.valueFile { try releaseValueFile(txn, file.number, size: file.size) }
        for index in old.indexes {
            try index.reverseKey.withUnsafeBytes { k in
                try key.withUnsafeBytes { _ = try txn.delete(indexes, k, value: $0) }
            }
        }
    }

    func writeEntry(_ txn: Transaction, _ item: EntryWrite, defaultTime: Int64, appending: Bool = false) throws {
        var indexes = item.indexes
        if item.keepsIndexes, let old = try txn.get(entries, item.key) {
            // Mid-batch: an unreadable record must abort the transaction, not leave it half done.
            guard let view = try? RecordView(old) else { throw LMDBError.corrupted }
            indexes = view.indexes()
        }
        try item.value.withUnsafeBytes { v in
            try writeEntry(txn, key: item.key, size: v.count, indexes: indexes, appending: appending,
                           modificationTime: item.modificationTime ?? defaultTime, entryNumber: item.entryNumber,
                           creationMode: item.creationMode) { offset, out in
                out.copyMemory(from: UnsafeRawBufferPointer(rebasing: v[offset..<(offset + out.count)]))
            }
        }
    }

    /// Writes a record (and chunks and index rows) whose value `source` provides
    /// piecewise, into the record itself or into reserved chunk space: no extra copy.
    /// `stagedChunkSet`: the value's chunks are already written there; `valueFile`:
    /// the value is that value file (written, synced, its size `size`).
    /// A new key gets `entryNumber` (or a new one) and `creationMode`; an existing entry keeps its
    /// number, mode and access time (a rewrite is a change of its value).
    func writeEntry(_ txn: Transaction, key: [UInt8], size: Int, indexes newIndexes: [IndexPair],
                            appending: Bool = false, modificationTime: Int64, stagedChunkSet: UInt64? = nil,
                            valueFile: UInt64? = nil, entryNumber: UInt64? = nil, creationMode: UInt32? = nil,
                            source: (Int, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        let chunked = size > chunkSize || valueFile != nil
        let chunkSet: UInt64? = chunked ? try valueFile ?? stagedChunkSet ?? newChunkSet(txn) : nil
        // Sized for a new key first; the number is taken only once the key proves new.
        var metadata = EntryMetadata(number: entryNumber ?? lastEntryNumber.load(ordering: .relaxed) + 1, mode: creationMode)
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
                if old.hasSideData { try removeSideData(txn, key: key, old: old) }
                out = try txn.reserve(entries, k, count: recordHeadSize(chunked: chunked, indexes: newIndexes, metadata: metadata) + valueBytes)
            }
            let offset = encodeRecordHead(into: out, chunkSet: chunkSet, inFile: valueFile != nil, modificationTime: modificationTime,
                                          size: size, indexes: newIndexes, metadata: metadata)
            if !chunked, size > 0 {
                try source(0, UnsafeMutableRawBufferPointer(rebasing: out[offset...]))
            }
        }
        if let chunkSet, stagedChunkSet == nil, valueFile == nil {
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

    func deleteChunkSet(_ txn: Transaction, _ set: UInt64) throws {
        let prefix = chunkSetKey(set)
        try txn.withCursor(chunks) { cursor in
            var pair = try chunkKey(set, 0).withUnsafeBytes { try cursor.seek(atLeast: $0) }
            while let p = pair, p.key.starts(with: prefix) {
                try cursor.deleteCurrent()
                pair = try cursor.next()  // after a delete: the item that followed
            }
        }
    }

    func addReverseIndexes(_ txn: Transaction, key: [UInt8], _ newIndexes: [IndexPair]) throws {
        for index in newIndexes {
            let rk = Array(index.name.utf8).withUnsafeBytes { n in index.value.withUnsafeBytes { reverseIndexKey(name: n, value: $0) } }
            try rk.withUnsafeBytes { k in try key.withUnsafeBytes { try txn.put(self.indexes, k, $0) } }
        }
    }
}
