import LMDB

/// An entry borrowed from the memory map during `Shard.visitEntries`: valid only
/// inside the callback that received it (the read transaction ends after it).
/// Lets a caller copy the value straight into its own buffer, with no `Entry`.
public struct BorrowedEntry {
    let txn: Transaction
    let chunks: Database
    let shard: Shard
    /// The entry's key (its bytes).
    public let key: [UInt8]
    let view: RecordView
    /// Set by an update still pending in the batch log.
    var pendingModificationTime: Int64?

    /// Size of the value in bytes.
    public var size: Int { view.size }
    /// Nanoseconds since 1970.
    public var modificationTime: Int64 { pendingModificationTime ?? view.modificationTime }

    /// Calls `body` with each index's (UTF-8 name, value) bytes, in stored order.
    public func forEachIndex(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Void) rethrows {
        try view.forEachIndex(body)
    }

    /// Calls `body` with the value's bytes, in order: once for an inline value,
    /// once per chunk for a chunked one (every chunk is checked before it is handed out).
    public func forEachValuePiece(_ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        guard view.flags.contains(.chunked) else {
            try body(view.inlineValue)
            return
        }
        if let number = view.valueFile { return try shard.forEachValueFilePiece(number, size: view.size, body) }
        for n in 0..<view.chunkCount {
            try body(try view.checkedChunk(try txn.get(chunks, chunkKey(view.chunkSet, n)), n, key: key))
        }
    }
}

extension Shard {
    /// Looks up `keys` in one read snapshot and calls `body(index, result)` for
    /// each key in order: the entry borrowed from the map, or why there is none
    /// (`invalidKey`, `entryNotFound`, `corrupt`, …) — one bad key does not stop
    /// the others. `body` must copy what it keeps before it returns. An error
    /// thrown by `body` ends the visit and is rethrown; a failure to open the
    /// snapshot is thrown before any callback.
    public func visitEntries<Keys: Collection>(
        _ keys: Keys, _ body: (Keys.Index, Result<BorrowedEntry, ShardError>) throws -> Void
    ) throws where Keys.Element == [UInt8] {
        // Acknowledged batches not yet in LMDB answer for their keys.
        try readSeeingPending(keys) { pending, txn in
            var i = keys.startIndex
            var n = 0
            while i != keys.endIndex {
                let key = keys[i]
                let result: Result<BorrowedEntry, ShardError>
                if let problem = EntryKey.problem(with: key) {
                    result = .failure(.invalidKey(problem))
                } else if case .put(let item, _)? = pending?[n] {
                    // The record LMDB will hold, built here for the length of the callback.
                    let metadata = EntryMetadata(number: item.entryNumber ?? 0, mode: item.creationMode)
                    var record = [UInt8](repeating: 0, count: recordHeadSize(chunked: false, indexes: item.indexes, metadata: metadata) + item.value.count)
                    try record.withUnsafeMutableBytes { out in
                        let offset = encodeRecordHead(into: out, chunkSet: nil, modificationTime: item.modificationTime ?? 0,
                                                      size: item.value.count, indexes: item.indexes, metadata: metadata)
                        item.value.withUnsafeBytes { v in
                            if let base = v.baseAddress { out.baseAddress!.advanced(by: offset).copyMemory(from: base, byteCount: v.count) }
                        }
                        let entry = BorrowedEntry(txn: txn, chunks: chunks, shard: self, key: key, view: try RecordView(UnsafeRawBufferPointer(out)))
                        try body(i, .success(entry))
                    }
                    keys.formIndex(after: &i)
                    n += 1
                    continue
                } else if case .deleted? = pending?[n] {
                    result = .failure(.entryNotFound(EntryKey(trusted: key)))
                } else {
                    do {
                        let lookup = pending?[n] ?? .notPending  // not a put or a deletion here
                        let stored = lookup.recordKey(key)
                        if let raw = try txn.get(entries, stored) {
                            result = .success(BorrowedEntry(txn: txn, chunks: chunks, shard: self, key: stored, view: try RecordView(raw),
                                                            pendingModificationTime: lookup.changedTime))
                        } else {
                            result = .failure(.entryNotFound(EntryKey(trusted: key)))
                        }
                    } catch let error as ShardError {
                        result = .failure(error)
                    } catch {
                        result = .failure(ShardError.from(error, limit: sizeLimit) as? ShardError ?? .storage("\(error)"))
                    }
                }
                try body(i, result)
                keys.formIndex(after: &i)
                n += 1
            }
        }
    }
}
