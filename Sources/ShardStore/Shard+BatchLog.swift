import Foundation
import LMDB

// The batch log's side of a shard (see BatchLog for the file, ARCHITECTURE.md "A
// batch put" for the rules): which batches are logged, the log's group commit,
// point reads that see pending batches, and applying them to LMDB. The pending
// state is guarded by `logLock`.

extension Shard {
    // MARK: The batch log

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
    func logBatch(_ items: [EntryWrite], statuses: [ShardError?], now: Int64, clientID: String,
                  deferringDurability: Bool = false, reportingChanges: Bool = true) throws -> Bool {
        guard log != nil else { return false }
        guard !clientID.isEmpty else { throw ShardError.clientIDRequired }
        guard clientID == owner else { throw ShardError.fenced(owner: owner, client: clientID) }
        var valid: [EntryWrite] = []
        valid.reserveCapacity(items.count)
        for i in items.indices where statuses[i] == nil {
            var item = items[i]
            // Chunked values (the direct path writes them once, not twice), and more
            // indexes than the log's count field holds, go direct; with durability
            // deferred, values up to `deferredValueLimit` are logged all the same
            // (a direct commit would make the caller wait for its fsyncs).
            let valueLimit = deferringDurability ? Self.deferredValueLimit : chunkSize
            if item.value.count > valueLimit || item.indexes.count > Int(UInt16.max) { return false }
            // An update without a time leaves the entry's own.
            if item.modificationTime == nil && !item.isUpdate && !item.isMove { item.modificationTime = now }
            // What is logged is what is applied, in memory now or replayed later.
            if item.keepsIndexes || item.isDeletion || item.isUpdate || item.isMove { item.indexes = [] }
            valid.append(item)
        }
        // A point read of a pending put that creates its key must show the number
        // the entry will have: it is fixed now, for the batch's puts in one go.
        let unnumbered = valid.indices.filter {
            !valid[$0].isDeletion && !valid[$0].isUpdate && !valid[$0].isMove && valid[$0].entryNumber == nil
        }
        if !unnumbered.isEmpty {
            var next = newEntryNumbers(unnumbered.count)
            for i in unnumbered {
                valid[i].entryNumber = next
                next += 1
            }
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
                if !deferringDurability { group.sync = true }
                logged = true
            }
        } catch where !logged {
            return false  // another member's failure: this batch was not written; go direct
        }
        guard logged else { return false }
        if reportingChanges, let observer = onCommit {
            var keys = valid.map(\.key)
            for item in valid { if let source = item.movedFrom { keys.append(source) } }
            observer(keys)
        }
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
    func appendsPastLastKey(_ items: [EntryWrite], _ statuses: [ShardError?]) throws -> Bool {
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
            sum + 128 + item.key.count + item.value.count + (item.movedFrom?.count ?? 0)
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
            // An update rewrites the record (head and inline value) where it is; a
            // move writes it under its new key.
            if item.isUpdate || item.isMove {
                return sum + 2 * (96 + item.key.count + (item.movedFrom?.count ?? 0) + (item.extras?.recordValueBytes ?? 0))
            }
            let indexes = item.indexes.reduce(0) { $0 + 48 + 2 * ($1.name.utf8.count + $1.value.count) + item.key.count }
            return sum + 2 * (64 + item.key.count + item.value.count + indexes)
        }
    }

    /// Appends a group of batches to the log with one fdatasync (the log
    /// committer's leader runs this, one group at a time). A group whose members
    /// all deferred durability is kept in memory (`unwrittenLog`) until a later
    /// group writes, `sync()` asks, or it grows past `unwrittenLimit`.
    func runLogGroup(_ group: [GroupCommitter<LogGroup>.Pending]) {
        guard let log else { return }
        var ctx = LogGroup(next: lastLogged + 1)
        for member in group {
            do { try member.body(&ctx) } catch { member.error = error }
        }
        guard !ctx.batches.isEmpty || (ctx.write && !unwrittenLog.isEmpty) else { return }
        if let refused = writeFence?() {
            for member in group { member.error = refused }
            return
        }
        do {
            // Under steady load something is always pending: past its size bound the
            // file is emptied anyway, once what it holds is applied.
            if log.end > batchLogLimit { try applyLog() }
            // Nothing pending: every record in the file, and every one kept in
            // memory, is applied (durably, in LMDB), so start afresh.
            if !hasPendingBatches {
                if log.end > 0 { try log.reset() }
                unwrittenLog.removeAll(keepingCapacity: true)
            }
            if ctx.sync || ctx.write || unwrittenLog.count + ctx.bytes.count > Self.unwrittenLimit {
                // Earlier records first: the file's sequences never skip.
                let start = ContinuousClock.now
                defer { if ctx.sync { CommitMetrics.record("log", since: start) } }
                func append(_ bytes: [UInt8]) throws {
                    if let fault = appendFault { try fault() }
                    try log.append(bytes, sync: ctx.sync)
                }
                if unwrittenLog.isEmpty {
                    try append(ctx.bytes)
                } else {
                    let earlier = unwrittenLog.count
                    unwrittenLog += ctx.bytes
                    do { try append(unwrittenLog) } catch {
                        // This group's records go (their sequences are used again);
                        // the earlier ones, acknowledged, wait for the next write.
                        unwrittenLog.removeSubrange(earlier...)
                        throw error
                    }
                    unwrittenLog.removeAll(keepingCapacity: true)
                }
                let last = ctx.next - 1
                logLock.withLock {
                    writtenThrough = last
                    if ctx.sync { markDurable(through: last) }
                }
            } else {
                unwrittenLog += ctx.bytes
            }
        } catch {
            if let logError = error as? BatchLogError, logError.broken { logLock.withLock { logBroken = true } }
            let failure = error as? ShardError ?? writeFailure(error, code: (error as? BatchLogError)?.code) as? ShardError
                ?? ShardError.storage("\(error)")
            for member in group { member.error = failure }
            return
        }
        guard !ctx.batches.isEmpty else { return }
        lastLogged = ctx.next - 1
        let bytes = ctx.batches.reduce(0) { $0 + $1.bytes }
        Self.processPending.add(bytes)
        let now = ContinuousClock.now
        logLock.withLock {
            pendingBatches += ctx.batches
            pendingBytes += bytes
            pendingCost += ctx.cost
            for at in (pendingBatches.count - ctx.batches.count)..<pendingBatches.count { notePending(at: at) }
            lastLogTime = now
            if !ctx.sync {
                lastDeferred = lastLogged
                if notDurableSince == nil { notDurableSince = now }
            }
        }
    }

    /// The largest value a batch put with durability deferred logs (the mount's
    /// small files, `ShardFileSystem.smallFileLimit`).
    public static let deferredValueLimit = 1 << 20

    /// Past this many bytes of deferred records in memory, the next group writes them.
    static let unwrittenLimit = 1 << 20

    /// Every logged batch up to `sequence` is durable (under logLock).
    /// `laterSince`: when every batch past `sequence` was logged at the earliest
    /// (the barrier's start), the new age of what still waits; without it, that
    /// age stays as it was.
    func markDurable(through sequence: UInt64, laterSince: ContinuousClock.Instant? = nil) {
        durableThrough = max(durableThrough, sequence)
        if durableThrough >= lastDeferred {
            notDurableSince = nil
        } else if let laterSince, notDurableSince != nil {
            // Batches logged during the barrier: due one delay after it began, not
            // at once (the applier would sync on every pass under a steady load).
            notDurableSince = laterSince
        }
    }

    /// The durability barrier for batches put with durability deferred: writes
    /// what is kept in memory and fdatasyncs the log, outside the log committer,
    /// so puts go on meanwhile. If the log cannot be made durable it is not
    /// appended to again, and what is pending is applied to LMDB instead.
    func syncDeferred() throws {
        let (broken, waiting) = logLock.withLock { (logBroken, durableThrough < lastDeferred) }
        if broken { return try applyLog() }
        guard waiting, let log else { return }
        deferredSyncs.add(1, ordering: .relaxed)
        let mark = log.syncFailures
        let start = ContinuousClock.now
        defer { CommitMetrics.record("log", since: start) }
        try logCommitter.submit { group in group.write = true }
        let target = logLock.withLock { writtenThrough }
        do { try log.sync(failuresSince: mark) } catch let syncError {
            // After a failed fdatasync the page cache may claim what the disk lacks:
            // the log is not used again, and what is pending goes to LMDB instead.
            logLock.withLock { logBroken = true }
            do { try applyLog() } catch let applyError {
                let why = "the batch log cannot be made durable (\(syncError)), nor its batches applied: \(applyError)"
                if case .volumeFull? = applyError as? ShardError { throw ShardError.volumeFull(why) }
                throw ShardError.storage(why)
            }
            return  // applied: durable in LMDB after all
        }
        logLock.withLock { markDurable(through: target, laterSince: start) }
    }

    /// Whether batches put with durability deferred wait to be made durable, and
    /// whether the oldest has waited `delay`.
    func deferredSync(after delay: Duration) -> (waiting: Bool, due: Bool) {
        logLock.withLock {
            guard let since = notDurableSince, !holdingBackgroundApply else { return (false, false) }
            return (true, ContinuousClock.now - since >= delay)
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

    /// Logged batches not yet applied to LMDB, and when the oldest was logged (status, metrics).
    public var pendingLog: (batches: Int, oldest: ContinuousClock.Instant?) {
        logLock.withLock { (pendingBatches.count, pendingBatches.first?.loggedAt) }
    }

    /// Maps the keys of the pending batch at `at` to its items (under logLock),
    /// in log order, so a point read answers from one pending item (or from
    /// LMDB) without applying the log:
    /// - an update whose key has a pending item before it is composed with it
    ///   here, in memory (the log keeps the update as it came): it becomes that
    ///   item with the update's changes; a put after a pending update keeps the
    ///   update's mode and access time, as a rewrite of the entry does. Applying
    ///   the composed items gives what applying the logged ones in order gives;
    /// - a move shows its source as deleted and its target as what the source
    ///   held (`moved`: the source's pending item, or its LMDB record).
    /// Where that cannot be told (a hash collision, an item after a move into its
    /// key), the key is marked `unknown` and a read of it applies the log first.
    func notePending(at: Int) {
        let applied = appliedSequence
        let sequence = pendingBatches[at].sequence
        for i in pendingBatches[at].items.indices {
            let key = pendingBatches[at].items[i].key
            var mark = PendingKey(sequence: sequence, item: UInt32(i))
            if let source = pendingBatches[at].items[i].movedFrom {
                if noteMove(at: at, i, from: source, mark: mark, applied: applied) { continue }
                // Its source is gone before it: in memory it changes nothing, for
                // good (a rebuild of this map must not read it as a move of LMDB's record).
                pendingBatches[at].items[i] = .update(of: key, modificationTime: nil, change: MetadataChange(), recordBytes: 0)
            }
            // One probe for a key not pending yet (the common case), two otherwise.
            let hash = keyHash(key)
            guard let earlier = pendingKeys.updateValue(mark, forKey: hash), earlier.sequence > applied else { continue }
            let item = pendingBatches[at].items[i]
            let before = earlierState(earlier, of: key)
            if item.isUpdate {
                switch before {
                case .unknown:
                    mark.unknown = true
                case .gone:
                    // The entry is gone before the update (which then does nothing): reads see that.
                    mark = earlier
                case .item(let earlierItem):
                    var composed = earlierItem
                    composed.modificationTime = item.modificationTime ?? earlierItem.modificationTime
                    composed.setMetadataChange(item.metadataChange!.after(earlierItem.metadataChange))
                    pendingBatches[at].items[i] = composed
                    mark.overwrites = earlier.overwrites  // it stands for the earlier item too
                    mark.afterDeletion = earlier.afterDeletion
                }
            } else {
                mark.overwrites = true
                switch before {
                case .unknown:
                    mark.afterDeletion = true
                    mark.unknown = !item.isDeletion  // a deletion leaves nothing to tell
                case .gone:
                    mark.afterDeletion = true
                    mark.overwrites = false  // made anew: it keeps no indexes
                case .item(let earlierItem):
                    mark.afterDeletion = earlier.afterDeletion
                    if !item.isDeletion, item.metadataChange == nil, let kept = earlierItem.metadataChange?.keptByRewrite {
                        pendingBatches[at].items[i].setMetadataChange(kept)
                    }
                    // The entry keeps the number and mode the put that made it gave
                    // (read from this item while LMDB has no record of the key).
                    if !item.isDeletion, !earlierItem.isUpdate, let number = earlierItem.entryNumber {
                        pendingBatches[at].items[i].entryNumber = number
                        pendingBatches[at].items[i].creationMode = earlierItem.creationMode
                    }
                    // A put keeping the indexes keeps those the earlier item left: LMDB's
                    // (as far as that item could tell), or the ones it set, which it takes
                    // now (the mount puts a file at each close and keeps its indexes).
                    if item.keepsIndexes && !item.isDeletion {
                        if earlierItem.keepsIndexes || earlierItem.isUpdate {
                            mark.overwrites = earlier.overwrites
                        } else {
                            pendingBatches[at].items[i].indexes = earlierItem.indexes
                            pendingBatches[at].items[i].keepsIndexes = false
                        }
                    }
                }
            }
            pendingKeys[hash] = mark
        }
        pendingItems += pendingBatches[at].items.count
    }

    /// What the pending items before `mark` leave of `key` (under logLock).
    enum EarlierState {
        /// This item (a put, a composed put, or an update of LMDB's record).
        case item(EntryWrite)
        /// Deleted, or moved away.
        case gone
        case unknown
    }

    func earlierState(_ mark: PendingKey, of key: [UInt8]) -> EarlierState {
        // An item an apply in progress took: a direct write may land after it and
        // before the item noted now, so nothing is composed with it.
        guard !mark.unknown, mark.sequence > applyingThrough, let item = pendingItem(mark) else { return .unknown }
        if item.key == key {
            // Items after a move into the key are not composed with what it moved.
            if item.isMove { return .unknown }
            return item.isDeletion ? .gone : .item(item)
        }
        return item.movedFrom == key ? .gone : .unknown  // another key of the same hash: cannot tell
    }

    /// Notes a move (see notePending): the source reads as gone, the target as
    /// what the source held before it. Returns false for a move that does
    /// nothing (its source is gone before it).
    func noteMove(at: Int, _ i: Int, from source: [UInt8], mark: PendingKey, applied: UInt64) -> Bool {
        let target = pendingBatches[at].items[i].key
        let sourceHash = keyHash(source), targetHash = keyHash(target)
        let earlier = pendingKeys[sourceHash].flatMap { $0.sequence > applied ? $0 : nil }
        var targetMark = mark
        let shown: EntryWrite
        switch earlier.map({ earlierState($0, of: source) }) {
        case nil:
            // The source's LMDB record, unchanged.
            shown = .update(of: source, modificationTime: nil, change: MetadataChange())
        case .item(let item)?:
            shown = item
            targetMark.overwrites = earlier!.overwrites
            targetMark.afterDeletion = earlier!.afterDeletion
        case .gone?:
            return false
        case .unknown?:
            shown = .update(of: source, modificationTime: nil, change: MetadataChange())
            targetMark.unknown = true
        }
        if sourceHash == targetHash { targetMark.unknown = true }
        pendingBatches[at].moved[UInt32(i)] = shown
        pendingKeys[sourceHash] = mark
        pendingKeys[targetHash] = targetMark
        return true
    }

    /// The pending item `key` points at, if its batch is still pending (under logLock).
    func pendingItem(_ key: PendingKey) -> EntryWrite? {
        guard let base = pendingBatches.first?.sequence, key.sequence >= base else { return nil }
        let at = Int(key.sequence - base)
        guard at < pendingBatches.count, pendingBatches[at].sequence == key.sequence else { return nil }
        return pendingBatches[at].items[Int(key.item)]
    }

    /// What a point read of one key finds in the pending logged batches.
    enum PendingLookup {
        /// Nothing pending for the key: LMDB has it (or not).
        case notPending
        /// The last pending put of the key (its value is inline: logged values are).
        /// `anew`: a deletion is pending before it, so the entry it makes keeps
        /// nothing of LMDB's record (number, mode, indexes). Its `metadataChange`
        /// says what pending updates changed of the entry's metadata.
        case put(EntryWrite, anew: Bool)
        /// An update of the entry LMDB holds: its value and indexes are LMDB's;
        /// the item's modification time (when set) and metadata change are newer.
        case changed(EntryWrite)
        case deleted

        /// The key whose LMDB record a read of `key` builds on: the pending item's
        /// own (a moved entry's record is still at its source), else `key`.
        func recordKey(_ key: [UInt8]) -> [UInt8] {
            switch self {
            case .put(let item, _), .changed(let item): item.key
            case .notPending, .deleted: key
            }
        }

        /// The modification time a pending update set over LMDB's record.
        var changedTime: Int64? {
            if case .changed(let item) = self { item.modificationTime } else { nil }
        }
    }

    /// Runs `body` in a read snapshot, with what pending logged batches hold for
    /// each of `keys` (nil when nothing is pending for them), so a point read sees
    /// every acknowledged put without waiting for the log to be applied (a lookup
    /// of a name being created must not wait for a commit either). The lookups
    /// and the snapshot's start are taken together under `logLock`, so no write
    /// lands between them; but an apply takes its batches off the pending list
    /// after its commit, so the snapshot may already hold an item the map still
    /// answers with: the snapshot's last applied sequence (in LMDB, written by
    /// the apply) tells, and such a key is read from LMDB alone (an answer
    /// relative to LMDB's record, as a move's, would be wrong over the applied
    /// one). When the pending map cannot tell
    /// (a hash collision, or a put that keeps indexes an earlier pending item may
    /// have changed), the log is applied first and the lookup is made again; a
    /// put that keeps the indexes LMDB holds is shown with them.
    func readSeeingPending<Keys: Collection<[UInt8]>, R>(_ keys: Keys, _ body: ([PendingLookup]?, Transaction) throws -> R) throws -> R {
        let hashes = log == nil ? [] : keys.map(keyHash)
        while true {
            let outcome: R?
            do {
                outcome = try readingValueFiles { try env.read(prepare: { begin in
                    try logLock.withLock {
                        let answer = hashes.isEmpty ? PendingAnswer.none : pendingAnswer(keys, hashes)
                        try begin()
                        return answer
                    }
                }) { answer, txn -> R? in
                    switch answer {
                    case .unknown: return nil
                    case .none: return try body(nil, txn)
                    case .lookups(var lookups, let sequences):
                        let applied = try metaCounter(txn, Self.logAppliedKey)
                        for i in lookups.indices where sequences[i] <= applied { lookups[i] = .notPending }
                        // A move whose source has no record here does nothing (or what it
                        // moves cannot be told from this snapshot): apply, then read.
                        for (i, key) in zip(lookups.indices, keys) {
                            if case .changed(let item) = lookups[i], item.key != key, try txn.get(entries, item.key) == nil { return nil }
                        }
                        for i in lookups.indices {
                            guard case .put(var item, let anew) = lookups[i], item.keepsIndexes else { continue }
                            // From LMDB's record of the item's own key (a move's source, for its target).
                            item.indexes = anew ? [] : try txn.get(entries, item.key).map { try RecordView($0).indexes() } ?? []
                            item.keepsIndexes = false
                            lookups[i] = .put(item, anew: anew)
                        }
                        return try body(lookups, txn)
                    }
                } }
            } catch let error as ShardError {
                throw error
            } catch {
                throw ShardError.from(error, limit: sizeLimit)
            }
            if let outcome { return outcome }
            try applyLogBeforeRead()
        }
    }

    /// What the pending map says about `keys` (whose hashes are `hashes`). Under `logLock`.
    func pendingAnswer<Keys: Collection<[UInt8]>>(_ keys: Keys, _ hashes: [UInt64]) -> PendingAnswer {
        guard let base = pendingBatches.first?.sequence else { return .none }
        var lookups: [PendingLookup] = []
        var sequences: [UInt64] = []
        var any = false
        for (key, hash) in zip(keys, hashes) {
            guard let found = pendingKeys[hash], found.sequence > appliedSequence else {
                lookups.append(.notPending)
                sequences.append(0)
                continue
            }
            sequences.append(found.sequence)
            guard found.sequence >= base else { return .unknown }
            let at = Int(found.sequence - base)
            guard at < pendingBatches.count, pendingBatches[at].sequence == found.sequence else { return .unknown }
            guard !found.unknown else { return .unknown }
            var item = pendingBatches[at].items[Int(found.item)]
            if let source = item.movedFrom {
                if source == key && item.key != key {
                    lookups.append(.deleted)
                    any = true
                    continue
                }
                guard item.key == key, let shown = pendingBatches[at].moved[found.item] else { return .unknown }
                item = shown  // of the source's key: reads take LMDB's record from there
            } else if item.key != key {
                return .unknown
            }
            // A put keeping its indexes takes them from LMDB (see readSeeingPending),
            // unless an earlier pending item of the key may have changed them.
            guard !(item.keepsIndexes && found.overwrites) else { return .unknown }
            lookups.append(item.isDeletion ? .deleted : item.isUpdate ? .changed(item) : .put(item, anew: found.afterDeletion))
            any = true
        }
        return any ? .lookups(lookups, sequences: sequences) : .none
    }

    /// `sequences`: of the item each lookup answers with (0: not pending).
    enum PendingAnswer { case none, lookups([PendingLookup], sequences: [UInt64]), unknown }

    /// Applies the pending batches in one durable transaction that also records
    /// the last applied sequence (so a restart replays exactly the rest), or, if
    /// that fails, batch by batch. Runs in the LMDB committer's leader, before its
    /// group; returns why pending batches could not all be applied.
    func applyPendingBatches() -> ShardError? {
        let batches = logLock.withLock { () -> [PendingBatch] in
            applyingThrough = pendingBatches.last?.sequence ?? 0
            return pendingBatches
        }
        guard !batches.isEmpty else { return nil }
        defer { logLock.withLock { applyingThrough = 0 } }
        // A deposed primary leaves its log to the new one, which replays it.
        if let refused = writeFence?() { return refused }
        do {
            try applyBatches(batches)
        } catch {
            // A large group may not fit where its batches one by one do.
            for batch in batches {
                do { try applyBatches([batch]) } catch {
                    let why = "acknowledged batches cannot be applied yet (\(ShardError.from(error, limit: sizeLimit))); they are kept in the batch log and retried"
                    let failure: ShardError
                    if case .volumeFull? = writeFailure(error) as? ShardError { failure = .volumeFull(why) } else { failure = .storage(why) }
                    logLock.withLock { logFailure = failure }
                    return failure
                }
            }
        }
        logLock.withLock { logFailure = nil }
        return nil
    }

    func applyBatches(_ batches: [PendingBatch]) throws {
        if let fault = applyFault { try fault() }
        let start = ContinuousClock.now
        defer { CommitMetrics.record("apply", since: start) }
        var numbers: UInt64?
        try writeTransaction { txn in
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
            markDurable(through: appliedSequence)
            pendingItems -= batches.reduce(0) { $0 + $1.items.count }
            if pendingBatches.isEmpty {
                pendingKeys.removeAll(keepingCapacity: true)
            } else if pendingKeys.count > 2 * pendingItems + 65_536 {
                // Under steady load the map would keep every key ever written.
                pendingKeys.removeAll(keepingCapacity: true)
                pendingItems = 0
                for at in pendingBatches.indices { notePending(at: at) }
            }
        }
    }

    /// Applies the items of many batches in key order: inserts that follow the
    /// B-tree's order touch each page once, with its path still in cache, where
    /// random keys would jump between pages. Items of one key keep their log
    /// order, so the last one wins, as it would applied batch by batch. A move
    /// touches two keys: it is applied in log order, the items before it (in key
    /// order) first, those after it afterwards.
    func applyInKeyOrder(_ txn: Transaction, _ batches: [[EntryWrite]]) throws {
        let items = batches.count == 1 ? batches[0] : Array(batches.joined())
        guard let move = items.firstIndex(where: \.isMove) else { return try applySorted(txn, items[...]) }
        var start = items.startIndex
        var next: Int? = move
        while let at = next {
            try applySorted(txn, items[start..<at])
            try applyItem(txn, items[at], defaultTime: Shard.now())
            start = at + 1
            next = items[start...].firstIndex(where: \.isMove)
        }
        try applySorted(txn, items[start...])
    }

    private func applySorted(_ txn: Transaction, _ items: ArraySlice<EntryWrite>) throws {
        guard !items.isEmpty else { return }
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
        // Items are passed borrowed from the buffer: a copy of each (three retains
        // and releases, through an outlined copy) showed in profiles.
        let now = Shard.now()
        try items.withUnsafeBufferPointer { items in
            for position in order {
                try applyItem(txn, items[Int(position.index)], defaultTime: now)
            }
        }
    }

    /// One item of a batch: a put, or a delete (nothing happens if the entry is
    /// absent). Mid-batch, an unreadable old record aborts the whole transaction.
    func applyItem(_ txn: Transaction, _ item: EntryWrite, defaultTime: Int64, appending: Bool = false) throws {
        if item.isUpdate {
            return try changeRecord(txn, key: item.key, modificationTime: item.modificationTime, item.metadataChange)
        }
        if let source = item.movedFrom {
            try moveRecord(txn, from: source, to: item.key)  // a source gone by then: nothing to move
            return
        }
        guard item.isDeletion else {
            try writeEntry(txn, item, defaultTime: defaultTime, appending: appending)
            // A put composed with pending updates (see notePending).
            if let change = item.metadataChange { try changeRecord(txn, key: item.key, modificationTime: nil, change) }
            return
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
    func replayLog() throws {
        guard let log else { return }
        let applied = try env.read { txn in try metaCounter(txn, Self.logAppliedKey) }
        let records = try log.records().filter { $0.sequence > applied }
        // Numbers the log's puts carry were handed out before the crash.
        let logged = records.lazy.flatMap(\.items).compactMap(\.entryNumber).max() ?? 0
        if logged > lastEntryNumber.load(ordering: .relaxed) { lastEntryNumber.store(logged, ordering: .relaxed) }
        if let last = records.last {
            let apply = {
                var numbers: UInt64?
                try self.writeTransaction { txn in
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
}

/// A byte count shared by all shards of the process.
extension Shard {
    /// Bytes of logged batches not yet applied, over every shard of this process (metrics).
    public static var pendingLogBytes: Int { processPending.value }
}

final class PendingTotal: @unchecked Sendable {
    private let lock = NSLock()
    private var total = 0
    var value: Int { lock.withLock { total } }
    func add(_ bytes: Int) { lock.withLock { total += bytes } }
}
