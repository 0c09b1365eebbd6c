import LMDB

/// A large value being staged: written piece by piece, as it arrives (a file
/// written through the mount), into a fresh chunk set of its shard, listed in
/// `staging`, in transactions of the caller's size; a last transaction writes
/// the remaining bytes and switches the entry to the set. Readers see the old
/// value or the new one, never a mix.
///
/// The handle owns its set: `commit` makes it an entry's value and uses it up;
/// `discard`, or dropping the handle unused, removes it; after a crash, the
/// shard removes it when it next opens. Not thread-safe: one staging
/// transaction at a time (the caller orders them).
public final class StagedValue: @unchecked Sendable {
    public let shard: Shard
    /// The chunk set (its chunks are `chunkKey(set, n)`).
    public let set: UInt64
    let clientID: String
    private var finished = false

    init(shard: Shard, set: UInt64, clientID: String) {
        self.shard = shard
        self.set = set
        self.clientID = clientID
    }

    deinit { if !finished { try? shard.removeStagedSet(set) } }

    /// Writes whole chunks `firstChunk…` from `bytes` (a multiple of `chunkSize`)
    /// in one durable transaction.
    public func stage(_ bytes: UnsafeRawBufferPointer, firstChunk: Int) throws {
        try shard.stage(bytes, set: set, firstChunk: firstChunk, clientID: clientID)
    }

    /// Copies staged bytes from `offset` into `buffer`; the chunks up to there must be staged whole.
    public func read(offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        try shard.readStaged(set: set, offset: offset, into: buffer)
    }

    /// Makes the value `key`'s: the first `firstChunk` chunks are staged, `tail`
    /// holds the rest of its `size` bytes (see `Shard.commitStaged`). Uses the
    /// handle up; on failure the set stays staged, for a retry or `discard`.
    public func commit(as key: EntryKey, size: Int, firstChunk: Int, tail: UnsafeRawBufferPointer,
                       indexes: [IndexPair]? = nil, modificationTime: Int64? = nil, entryNumber: UInt64? = nil,
                       creationMode: UInt32? = nil) throws {
        precondition(!finished, "a staged value is committed or discarded once")
        try shard.commitStaged(key, set: set, size: size, firstChunk: firstChunk, tail: tail, indexes: indexes,
                               clientID: clientID, modificationTime: modificationTime, entryNumber: entryNumber,
                               creationMode: creationMode)
        finished = true
    }

    /// Lets the handle go and leaves the set, as a crash would: the shard's next
    /// open removes it (tests).
    func leaveBehind() { finished = true }

    /// Removes the set (best effort: what is left, the shard's next open removes).
    public func discard() {
        guard !finished else { return }
        finished = true
        try? shard.removeStagedSet(set)
    }
}

extension Shard {
    /// A new, empty staged value (its set listed in `staging`, in one durable transaction).
    public func beginStaging(clientID: String) throws -> StagedValue {
        let box = StagedSetBox()
        try write(clientID: clientID) { ctx in
            box.set = try self.newChunkSet(ctx.txn)
            try ctx.txn.put(self.staging, chunkSetKey(box.set), [])
        }
        return StagedValue(shard: self, set: box.set, clientID: clientID)
    }

    /// Writes whole chunks `firstChunk…` of staged set `set` from `bytes` (a
    /// multiple of `chunkSize`) in one durable transaction. Fails with `full` at
    /// once if the value would already be larger than the shard's whole limit.
    func stage(_ bytes: UnsafeRawBufferPointer, set: UInt64, firstChunk: Int, clientID: String) throws {
        guard bytes.count % chunkSize == 0, firstChunk >= 0 else {
            throw ShardError.invalidArgument("staged bytes are whole chunks")
        }
        guard firstChunk * chunkSize + bytes.count <= sizeLimit else { throw ShardError.full(limit: sizeLimit) }
        if bytes.isEmpty { return }
        do {
            try write(clientID: clientID) { ctx in
                try self.writeChunks(ctx.txn, set: set, firstChunk: firstChunk, bytes)
            }
        } catch let error as ShardError {
            throw error
        } catch {
            throw ShardError.from(error, limit: sizeLimit)
        }
    }

    /// Makes `key`'s value the staged set `set`: its first `firstChunk` chunks are
    /// staged, `tail` holds the rest of the `size` bytes. One durable transaction
    /// writes the tail's chunks and the record and takes the set out of `staging`.
    /// `indexes` nil keeps the entry's indexes (a rewritten file keeps its
    /// extended attributes). On failure the set stays staged (a retry may follow);
    /// `StagedValue.discard` removes it.
    func commitStaged(_ key: EntryKey, set: UInt64, size: Int, firstChunk: Int, tail: UnsafeRawBufferPointer,
                             indexes: [IndexPair]? = nil, clientID: String, modificationTime: Int64? = nil,
                             entryNumber: UInt64? = nil, creationMode: UInt32? = nil) throws {
        guard firstChunk >= 0, firstChunk * chunkSize + tail.count == size, size > chunkSize else {
            throw ShardError.invalidArgument("a staged value is its staged chunks and its tail, over one chunk")
        }
        if let indexes { try IndexPair.validate(indexes) }
        guard size + key.bytes.count <= sizeLimit else { throw ShardError.full(limit: sizeLimit) }
        let mtime = modificationTime ?? Shard.now()
        do {
            try write(clientID: clientID) { ctx in
                // Before any change: the only ShardError a member may throw.
                let kept = try indexes ?? ctx.txn.get(self.entries, key.bytes).map { try RecordView($0).indexes() } ?? []
                try self.writeChunks(ctx.txn, set: set, firstChunk: firstChunk, tail)
                try self.writeEntry(ctx.txn, key: key.bytes, size: size, indexes: kept, modificationTime: mtime,
                                    stagedChunkSet: set, entryNumber: entryNumber, creationMode: creationMode) { _, _ in }
                _ = try ctx.txn.delete(self.staging, chunkSetKey(set))
                ctx.changed(key.bytes)
            }
        } catch let error as ShardError {
            throw error
        } catch {
            throw ShardError.from(error, limit: sizeLimit)
        }
    }

    /// Copies bytes of a staged set from `offset` into `buffer`; the set's chunks
    /// up to there must be staged whole.
    func readStaged(set: UInt64, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        // Staged chunks are not entries: logged batches do not touch them.
        try readTransaction(applyingLog: false) { txn in
            var done = 0
            while done < buffer.count {
                let position = offset + done
                let n = position / chunkSize, start = position % chunkSize
                guard let chunk = try txn.get(chunks, chunkKey(set, n)), chunk.count == chunkSize else {
                    throw ShardError.corrupt("staged chunk \(n) of set \(set) is missing")
                }
                let length = min(chunkSize - start, buffer.count - done)
                UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + length)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: chunk[start..<(start + length)]))
                done += length
            }
        }
    }

    /// Chunk sets listed in `staging`: what writes in progress, a crash or a failure left.
    public func stagedSets() throws -> [UInt64] {
        try readTransaction(applyingLog: false) { txn in
            try txn.withCursor(staging) { cursor in
                var found: [UInt64] = []
                var pair = try cursor.first()
                while let p = pair {
                    if p.key.count == 8 { found.append(UInt64(bigEndian: p.key.loadUnaligned(as: UInt64.self))) }
                    pair = try cursor.next()
                }
                return found
            }
        }
    }

    /// Chunks `firstChunk…` of `set` from `bytes`, the last one possibly short.
    private func writeChunks(_ txn: Transaction, set: UInt64, firstChunk: Int, _ bytes: UnsafeRawBufferPointer) throws {
        var offset = 0, n = firstChunk
        while offset < bytes.count {
            let length = min(chunkSize, bytes.count - offset)
            let out = try chunkKey(set, n).withUnsafeBytes { try txn.reserve(chunks, $0, count: length) }
            out.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + length)]))
            offset += length
            n += 1
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
            try? removeStagedSet(set)
            throw error
        }
        return set
    }

    /// Removes a staged set that will not be switched to (a failed or abandoned write).
    func removeStagedSet(_ set: UInt64) throws {
        do {
            try committer.submit { ctx in
                try self.deleteChunkSet(ctx.txn, set)
                try ctx.txn.delete(self.staging, chunkSetKey(set))
            }
        } catch let error as ShardError { throw error } catch {
            throw ShardError.from(error, limit: sizeLimit)
        }
    }

    /// At open: chunk sets a crash left half-written are garbage.
    func removeLeftoverStagedSets() throws {
        for set in try stagedSets() { try removeStagedSet(set) }
    }
}

private final class StagedSetBox: @unchecked Sendable {
    var set: UInt64 = 0
}
