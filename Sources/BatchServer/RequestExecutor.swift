import BatchProtocol
import Glibc
import Metadata
import NIOCore
import ShardNode
import ShardStore
import Synchronization

/// What one trip to the engine produced: the encoded answers, how many requests
/// they finish, streams with more to send, and requests that need async work.
struct Outcome: Sendable {
    var out: ByteBuffer
    var completed = 0
    var continuations: [StreamCursor] = []
    /// Lifecycle requests and requests for shards not loaded here: run with `runAsync`.
    var deferred: [Work] = []
    /// Requests answered NOT_SHARD_LEADER, not yet sent: the answer carries the
    /// primary's address, which `redirect` looks up (metadata: not on an engine thread).
    var redirects: [Redirect] = []
    /// The requests these answers finish (metrics: counts and latency by opcode and status).
    var finished: [Finished] = []
    /// Reads whose answers did not fit beside the others (`RequestExecutor.answerBudget`):
    /// run again in a job of their own once these answers are written.
    var postponed: [Work] = []

    init() { out = ByteBufferAllocator().buffer(capacity: 256) }

    /// Appends what `other` answered.
    mutating func merge(_ other: inout Outcome) {
        out.writeBuffer(&other.out)
        completed += other.completed
        continuations += other.continuations
        deferred += other.deferred
        redirects += other.redirects
        finished += other.finished
        postponed += other.postponed
    }
}

struct Finished: Sendable {
    var requestID: UInt32
    var opcode: Opcode
    var code: StatusCode
}

struct Redirect: Sendable {
    var work: Work
    var status: Status
}

/// Carries out requests against the shard manager. `runSync` blocks on LMDB and
/// must run on an engine thread, never on an event loop.
final class RequestExecutor: Sendable {
    let shards: ShardManager
    let locator: any ShardLocator
    /// A BatchGet is read and sent in pieces of at most this many keys or bytes,
    /// so a slow reader holds back the stream instead of the server buffering it.
    let streamChunkKeys: Int
    let streamChunkBytes: Int
    /// The answers one engine job gathers into one buffer stop short of this
    /// many bytes, unless one answer alone is larger: a later read goes to a
    /// job of its own (`Outcome.postponed`), a BatchGet piece ends early. (One
    /// buffer holds at most 4 GiB, and values written through the mount are
    /// up to their shard's size limit: a few pipelined Gets of such values
    /// would pass it.)
    let answerBudget: Int
    /// The largest value an answer carries (`ProtocolConstants.maxValueLength`);
    /// a larger one is answered INVALID_ARGUMENT before it is read.
    let largestValue: Int

    init(shards: ShardManager, locator: any ShardLocator, streamChunkKeys: Int = 2048, streamChunkBytes: Int = 1 << 20,
         answerBudget: Int = 1 << 30, largestValue: Int = ProtocolConstants.maxValueLength) {
        self.shards = shards
        self.locator = locator
        self.streamChunkKeys = streamChunkKeys
        self.streamChunkBytes = streamChunkBytes
        self.answerBudget = answerBudget
        self.largestValue = largestValue
    }

    /// Whether an answer of about `bytes` may join what `out` holds.
    private func fits(_ bytes: Int, in out: ByteBuffer) -> Bool {
        out.readableBytes == 0 || out.readableBytes + bytes <= answerBudget
    }

    // MARK: On an engine thread

    func runSync(_ works: [Work], resume cursors: [StreamCursor] = []) -> Outcome {
        var outcome = Outcome()
        var wrote = false
        // The answers go out after the mount's kernel invalidations (ShardManager.cacheBarrier).
        defer { if wrote { shards.cacheBarrier?() } }
        var i = 0
        while i < works.count {
            let work = works[i]
            guard let id = work.request.dataShard, let shard = shards.localShard(id) else {
                // A backup serves reads from its view of the shard; writes go on to be redirected.
                if let id = work.request.dataShard, !work.request.isWrite, let views = shards.views, views.serves(id) {
                    do {
                        // Answered into a scratch outcome, kept only if the read stands: a
                        // view read that ends after the backup's lease or currency lapsed
                        // is thrown away by withView, and so are its bytes.
                        var read = Outcome()
                        if try views.withView(id, { view in runOne(work, view, &read) }) == nil {
                            outcome.deferred.append(work)
                        } else if !fits(read.out.readableBytes, in: outcome.out) {
                            outcome.postponed.append(work)  // read again, alone
                        } else {
                            outcome.merge(&read)
                        }
                    } catch {
                        reply(work, wireStatus(for: error, writing: false), .none, &outcome)
                    }
                    i += 1
                    continue
                }
                outcome.deferred.append(work)
                i += 1
                continue
            }
            wrote = wrote || work.request.isWrite
            // Consecutive writes by one client to one shard share a transaction.
            var end = i + 1
            while end < works.count, Self.mergeable(works[i].request, works[end].request) { end += 1 }
            if end - i > 1 {
                putTogether(works[i..<end], shard, &outcome)
            } else {
                runOne(work, shard, &outcome)
            }
            i = end
        }
        for cursor in cursors {
            if let shard = shards.localShard(cursor.shard) {
                stream(cursor, shard, &outcome)
            } else {
                finishStream(cursor, Status(.shardNotFound, "shard \(cursor.shard) went away during the stream"), &outcome)
            }
        }
        return outcome
    }

    private static func mergeable(_ a: Request, _ b: Request) -> Bool {
        func target(_ r: Request) -> (String, UInt64)? {
            switch r {
            case .put(let c, let s, _), .batchPut(let c, let s, _): return (c, s)
            default: return nil
            }
        }
        guard let x = target(a), let y = target(b) else { return false }
        return x == y
    }

    /// Encodes an answer; a NOT_SHARD_LEADER answer waits in `redirects` for the primary's address.
    private func reply(_ work: Work, _ status: Status, _ payload: ResponsePayload = .none, _ outcome: inout Outcome) {
        if status.code == .notShardLeader {
            outcome.redirects.append(Redirect(work: work, status: status))
            return
        }
        ResponseCodec.encode(.reply(work.request.opcode, requestID: work.requestID, status, payload), into: &outcome.out)
        outcome.completed += 1
        outcome.finished.append(Finished(requestID: work.requestID, opcode: work.request.opcode, code: status.code))
    }

    private func runOne(_ work: Work, _ shard: Shard, _ outcome: inout Outcome) {
        let request = work.request
        do {
            switch request {
            case .put(let client, _, let item):
                let status = try shard.batchPut([Self.entryWrite(item)], clientID: client)[0]
                reply(work, status.map { wireStatus(for: $0, writing: true) } ?? .ok, .none, &outcome)
            case .batchPut(let client, _, let items):
                let statuses = try shard.batchPut(items.map(Self.entryWrite), clientID: client)
                reply(work, .ok, .itemStatuses(statuses.map { $0.map { wireStatus(for: $0, writing: true) } ?? .ok }), &outcome)
            case .delete(let client, _, let key):
                try shard.delete(try EntryKey(key), clientID: client)
                reply(work, .ok, .none, &outcome)
            case .get(_, let key):
                // Copied from the map (or the value file) straight into the answer.
                var failed: Status?, postpone = false
                let start = outcome.out.writerIndex
                do {
                    try shard.visitEntries(CollectionOfOne(key)) { _, result in
                        switch result {
                        case .success(let entry) where !fits(entry.size + 64, in: outcome.out): postpone = true
                        case .success(let entry): failed = Self.encodeEntry(entry, .get(work.requestID), largest: largestValue, into: &outcome.out)
                        case .failure(let error): failed = wireStatus(for: error, writing: false)
                        }
                    }
                } catch {
                    outcome.out.moveWriterIndex(to: start)  // no answer twice
                    throw error
                }
                if postpone {
                    outcome.postponed.append(work)
                } else if let failed {
                    reply(work, failed, .none, &outcome)
                } else {
                    outcome.completed += 1
                    outcome.finished.append(Finished(requestID: work.requestID, opcode: .get, code: .ok))
                }
            case .batchGet(_, let keys):
                stream(StreamCursor(requestID: work.requestID, shard: shard.id, keys: keys), shard, &outcome)
            case .list(_, let after, let limit):
                let after = try after.map { try EntryKey($0) }
                try replyList(work, limit, &outcome) { try shard.list(after: after, limit: $0) }
            case .findByIndex(_, let name, let value, let after, let limit):
                let after = try after.map { try EntryKey($0) }
                try replyKeys(work, limit, &outcome) { try shard.find(indexName: name, value: value, after: after, limit: $0) }
            default:
                outcome.deferred.append(work)
            }
        } catch {
            reply(work, wireStatus(for: error, writing: request.isWrite), .none, &outcome)
        }
    }

    /// One page of a listing: asks `fetch` for one row more than the page holds,
    /// to tell whether more follow.
    private func replyList(_ work: Work, _ limit: UInt32, _ outcome: inout Outcome, _ fetch: (Int) throws -> [EntrySummary]) throws {
        let n = Self.pageLimit(limit)
        var rows = try fetch(n + 1)
        let more = rows.count > n
        if more { rows.removeLast() }
        reply(work, .ok, .listPage(rows: rows.map { ListRow(key: $0.key.bytes, size: UInt64($0.size), modificationTime: $0.modificationTime) },
                                   more: more), &outcome)
    }

    /// One page of an index lookup, like `replyList`.
    private func replyKeys(_ work: Work, _ limit: UInt32, _ outcome: inout Outcome, _ fetch: (Int) throws -> [EntryKey]) throws {
        let n = Self.pageLimit(limit)
        var keys = try fetch(n + 1)
        let more = keys.count > n
        if more { keys.removeLast() }
        reply(work, .ok, .keys(keys.map(\.bytes), more: more), &outcome)
    }

    /// A read on a backup's view of the shard (docs/BACKUP-VIEWS.md). A BatchGet
    /// is answered whole from one snapshot.
    private func runOne(_ work: Work, _ view: ShardView, _ outcome: inout Outcome) {
        let request = work.request
        do {
            switch request {
            case .get(_, let key):
                reply(work, .ok, .entry(Self.payload(try view.get(try EntryKey(key), largestValue: largestValue))), &outcome)
            case .batchGet(_, let keys):
                let results = try view.batchGet(keys.map { key in (try? EntryKey(key)) ?? EntryKey(trusted: key) })
                for (p, result) in results.enumerated() {
                    let problem = EntryKey.problem(with: keys[p]).map { ShardError.invalidKey($0) }
                    switch (problem, result) {
                    case (nil, .success(let entry)) where entry.value.count > largestValue
                        || !fits(entry.value.count + 64, in: outcome.out):
                        // Answered whole from one snapshot: an item that would take the
                        // answer past what one buffer holds is refused, to be asked alone.
                        let largest = min(largestValue, answerBudget - outcome.out.readableBytes)
                        let error = Shard.valueTooLarge(entry.key, entry.value.count, max(0, largest))
                        ResponseCodec.encodeBatchGetItem(requestID: work.requestID, position: UInt32(p),
                                                         status: wireStatus(for: error, writing: false), entry: nil, into: &outcome.out)
                    case (nil, .success(let entry)):
                        ResponseCodec.encodeBatchGetItem(requestID: work.requestID, position: UInt32(p), status: .ok,
                                                         entry: Self.payload(entry), into: &outcome.out)
                    case (let error?, _), (nil, .failure(let error)):
                        ResponseCodec.encodeBatchGetItem(requestID: work.requestID, position: UInt32(p),
                                                         status: wireStatus(for: error, writing: false), entry: nil, into: &outcome.out)
                    }
                }
                reply(work, .ok, .itemCount(UInt32(keys.count)), &outcome)
            case .list(_, let after, let limit):
                let after = try after.map { try EntryKey($0) }
                try replyList(work, limit, &outcome) { try view.list(after: after, limit: $0) }
            case .findByIndex(_, let name, let value, let after, let limit):
                let after = try after.map { try EntryKey($0) }
                try replyKeys(work, limit, &outcome) { try view.find(indexName: name, value: value, after: after, limit: $0) }
            default:
                outcome.deferred.append(work)
            }
        } catch {
            reply(work, wireStatus(for: error, writing: false), .none, &outcome)
        }
    }

    /// Several Puts/BatchPuts of one client to one shard: one `batchPut`, statuses split back.
    private func putTogether(_ works: ArraySlice<Work>, _ shard: Shard, _ outcome: inout Outcome) {
        var items: [EntryWrite] = []
        var client = ""
        for work in works {
            switch work.request {
            case .put(let c, _, let item): client = c; items.append(Self.entryWrite(item))
            case .batchPut(let c, _, let batch): client = c; items += batch.map(Self.entryWrite)
            default: break
            }
        }
        let statuses: [ShardError?]
        do {
            statuses = try shard.batchPut(items, clientID: client)
        } catch ShardError.full(_), ShardError.tooLarge(_) {
            // One request that does not fit (in the shard, or in one transaction
            // with the others) must not fail the others: try them one by one.
            for work in works { runOne(work, shard, &outcome) }
            return
        } catch {
            for work in works { reply(work, wireStatus(for: error, writing: true), .none, &outcome) }
            return
        }
        var next = 0
        for work in works {
            switch work.request {
            case .put:
                reply(work, statuses[next].map { wireStatus(for: $0, writing: true) } ?? .ok, .none, &outcome)
                next += 1
            case .batchPut(_, _, let batch):
                let mine = statuses[next..<(next + batch.count)].map { $0.map { wireStatus(for: $0, writing: true) } ?? .ok }
                reply(work, .ok, .itemStatuses(Array(mine)), &outcome)
                next += batch.count
            default: break
            }
        }
    }

    /// Sends the next piece of a BatchGet: at most `streamChunkKeys` keys, and it
    /// stops after the item that passes `streamChunkBytes`; the rest becomes a
    /// continuation. The piece is read in one snapshot and each value is copied
    /// from the map straight into the outgoing buffer (no `Entry` per item).
    private func stream(_ cursor: StreamCursor, _ shard: Shard, _ outcome: inout Outcome) {
        var cursor = cursor
        let limit = min(cursor.keys.count, cursor.next + streamChunkKeys)
        let budgetEnd = outcome.out.writerIndex + streamChunkBytes
        let requestID = cursor.requestID
        var reached = cursor.next
        let start = outcome.out.writerIndex
        do {
            try shard.visitEntries(cursor.keys[cursor.next..<limit]) { p, result in
                // An item too large to join this buffer starts the next piece (in a job of its own).
                if case .success(let entry) = result, !fits(entry.size + 64, in: outcome.out) { throw PieceFull() }
                Self.encodeItem(requestID: requestID, position: UInt32(p), result, largest: largestValue, into: &outcome.out)
                if reached == cursor.next {
                    // Room for the rest at the first item's size: the buffer does not regrow and recopy as it fills.
                    let guess = (outcome.out.writerIndex - start) * (limit - p)
                    outcome.out.reserveCapacity(minimumWritableBytes: min(guess, streamChunkBytes) + 64)
                }
                reached = p + 1
                if outcome.out.writerIndex >= budgetEnd && reached < limit { throw PieceFull() }
            }
        } catch is PieceFull {
            // The rest of the piece goes out after this part is written.
        } catch {
            finishStream(cursor, wireStatus(for: error, writing: false), &outcome)
            return
        }
        cursor.next = reached
        if cursor.next == cursor.keys.count {
            ResponseCodec.encode(.reply(.batchGet, requestID: cursor.requestID, .ok, .itemCount(UInt32(cursor.keys.count))),
                                 into: &outcome.out)
            outcome.completed += 1
            outcome.finished.append(Finished(requestID: cursor.requestID, opcode: .batchGet, code: .ok))
        } else {
            outcome.continuations.append(cursor)
        }
    }

    private struct PieceFull: Error {}

    /// One BatchGet item; a value that cannot be read becomes that item's status.
    private static func encodeItem(requestID: UInt32, position: UInt32, _ result: Result<BorrowedEntry, ShardError>,
                                   largest: Int, into out: inout ByteBuffer) {
        let status: Status
        switch result {
        case .success(let entry):
            guard let failed = encodeEntry(entry, .item(requestID, position: position), largest: largest, into: &out) else { return }
            status = failed
        case .failure(let error):
            status = wireStatus(for: error, writing: false)
        }
        ResponseCodec.encodeBatchGetItem(requestID: requestID, position: position, status: status, entry: nil, into: &out)
    }

    /// Which answer an entry goes into.
    private enum EntryFrame {
        case get(UInt32)
        case item(UInt32, position: UInt32)
    }

    /// Encodes a found entry's answer with status OK, its value and indexes
    /// copied straight from where they lie (LMDB's map, a value file) into
    /// `out`: no `Entry` is built, and a large value is held once, in the
    /// outgoing buffer. Returns the status to answer with instead when the value
    /// cannot be read or carried (nothing of it is then left in `out`).
    private static func encodeEntry(_ entry: BorrowedEntry, _ frame: EntryFrame, largest: Int, into out: inout ByteBuffer) -> Status? {
        guard entry.size <= largest else {
            return wireStatus(for: Shard.valueTooLarge(EntryKey(trusted: entry.key), entry.size, largest), writing: false)
        }
        var indexCount = 0, indexesSize = 0
        entry.forEachIndex { name, value in
            indexCount += 1
            indexesSize += ResponseCodec.indexFieldSize(nameCount: name.count, valueCount: value.count)
        }
        let value = { (target: UnsafeMutableRawBufferPointer) in
            var offset = 0
            try entry.forEachValuePiece { piece in
                if let base = piece.baseAddress, piece.count > 0 {
                    (target.baseAddress! + offset).copyMemory(from: base, byteCount: piece.count)
                }
                offset += piece.count
            }
        }
        let indexes = { (target: UnsafeMutableRawBufferPointer) in
            var offset = 0
            entry.forEachIndex { offset = ResponseCodec.storeIndexField(name: $0, value: $1, into: target, at: offset) }
        }
        do {
            switch frame {
            case .get(let requestID):
                try ResponseCodec.encodeGetReply(requestID: requestID, valueSize: entry.size, indexCount: indexCount,
                                                 indexesSize: indexesSize, modificationTime: entry.modificationTime, into: &out,
                                                 value: value, indexes: indexes)
            case .item(let requestID, let position):
                try ResponseCodec.encodeBatchGetItem(requestID: requestID, position: position, valueSize: entry.size,
                                                     indexCount: indexCount, indexesSize: indexesSize,
                                                     modificationTime: entry.modificationTime, into: &out,
                                                     value: value, indexes: indexes)
            }
            return nil
        } catch {
            return wireStatus(for: error, writing: false)
        }
    }

    private func finishStream(_ cursor: StreamCursor, _ status: Status, _ outcome: inout Outcome) {
        if status.code == .notShardLeader {
            let work = Work(requestID: cursor.requestID, request: .batchGet(shard: cursor.shard, keys: []))
            outcome.redirects.append(Redirect(work: work, status: status))
            return
        }
        ResponseCodec.encode(.reply(.batchGet, requestID: cursor.requestID, status, .none), into: &outcome.out)
        outcome.completed += 1
        outcome.finished.append(Finished(requestID: cursor.requestID, opcode: .batchGet, code: status.code))
    }

    private static func pageLimit(_ limit: UInt32) -> Int {
        Int(limit == 0 ? ProtocolConstants.defaultPageLimit : min(limit, ProtocolConstants.maxPageLimit))
    }

    static func entryWrite(_ item: PutItem) -> EntryWrite {
        EntryWrite(key: item.key, value: item.value, indexes: item.indexes.map { IndexPair(name: $0.name, value: $0.value) })
    }

    static func payload(_ entry: Entry) -> EntryPayload {
        EntryPayload(value: entry.value, indexes: entry.indexes.map { IndexField(name: $0.name, value: $0.value) },
                     modificationTime: entry.modificationTime)
    }

    // MARK: Async (metadata and lifecycle)

    /// Lifecycle requests, and data requests for shards this node has not loaded
    /// (they get the manager's answer: not found, or not on this node).
    func runAsync(_ work: Work) async -> Outcome {
        var outcome = Outcome()
        let request = work.request
        do {
            switch request {
            case .newShard(let owner, let requested, let limit):
                // Checked before the manager takes an ID, so a refused limit uses none.
                if limit != 0, let problem = sizeLimitProblem(limit) { throw ProtocolError(.invalidArgument, problem) }
                let shard = try await shards.newShard(owner: owner, id: requested == 0 ? nil : requested,
                                                      sizeLimit: limit == 0 ? nil : Int(clamping: limit))
                reply(work, .ok, .shardID(shard.id), &outcome)
            case .closeShard(let client, let id):
                try await requireOwner(client, of: id, closing: true)
                try await shards.closeShard(id)
                reply(work, .ok, .none, &outcome)
            case .deleteShard(let client, let id):
                try await requireOwner(client, of: id, closing: false)
                try await shards.deleteShard(id)
                reply(work, .ok, .none, &outcome)
            case .listShards:
                reply(work, .ok, .shards(try await shards.listShards().map(Self.info)), &outcome)
            case .stat(let id):
                reply(work, .ok, .shard(Self.info(try await shards.listing(id))), &outcome)
            case .locate(let id):
                reply(work, .ok, .location(try await locator.locate(id)), &outcome)
            default:
                // A data request whose shard is not loaded: the manager says why.
                if let id = request.dataShard { _ = try await shards.shard(id) }
                throw ShardManagerError.shardNotFound(request.dataShard ?? 0)
            }
        } catch {
            reply(work, wireStatus(for: error, writing: request.isWrite || request.opcode == .newShard), .none, &outcome)
        }
        let redirects = outcome.redirects
        outcome.redirects = []
        await answer(redirects, &outcome)
        return outcome
    }

    /// Closing and deleting are the owner's, like every other write: a shard the
    /// node does not hold is answered as for any request (not found, or not
    /// here), then an empty client ID is CLIENT_ID_REQUIRED and another client's
    /// is SHARD_FENCED. (A shard's owner never changes, so checking first is safe.)
    private func requireOwner(_ client: String, of id: UInt64, closing: Bool) async throws {
        let shard = try await shards.shard(id)
        guard !client.isEmpty else {
            throw ProtocolError(.clientIDRequired, "\(closing ? "closing" : "deleting") shard \(id) needs its owner's client ID "
                                + "(protocol version 2; a version-1 client cannot send one)")
        }
        guard client == shard.owner else { throw ShardError.fenced(owner: shard.owner, client: client) }
    }

    /// Why a NewShard size limit can never be honoured here, or nil: 2^48 bytes
    /// or more (past what a shard's memory map can take), or more than the
    /// largest writable volume of this node holds in all.
    func sizeLimitProblem(_ limit: UInt64) -> String? {
        if limit >= 1 << 48 { return "a size limit of \(limit) bytes is too large: it must be below 2^48 bytes (256 TiB)" }
        var largest: UInt64 = 0
        for volume in shards.volumes.mountedVolumes() where !volume.readOnly {
            var st = statvfs()
            guard statvfs(volume.mountPath, &st) == 0 else { continue }
            largest = max(largest, UInt64(st.f_blocks) * UInt64(st.f_frsize))
        }
        guard largest > 0, limit > largest else { return nil }
        return "a size limit of \(limit) bytes is more than this node's largest volume can ever hold (\(largest) bytes)"
    }

    /// Answers NOT_SHARD_LEADER with the address of the shard's primary.
    func redirect(_ redirects: [Redirect]) async -> Outcome {
        var outcome = Outcome()
        await answer(redirects, &outcome)
        return outcome
    }

    private func answer(_ redirects: [Redirect], _ outcome: inout Outcome) async {
        var addresses: [UInt64: String] = [:]
        for r in redirects {
            var leader = ""
            if let shard = r.work.request.namedShard {
                if let known = addresses[shard] {
                    leader = known
                } else {
                    leader = await primaryAddress(shard)
                    addresses[shard] = leader
                }
            }
            ResponseCodec.encode(.reply(r.work.request.opcode, requestID: r.work.requestID, r.status, .leader(leader)),
                                 into: &outcome.out)
            outcome.completed += 1
            outcome.finished.append(Finished(requestID: r.work.requestID, opcode: r.work.request.opcode, code: r.status.code))
        }
    }

    /// The registered address of the shard's primary; empty when unknown, when
    /// its node is gone, or when it is this node (which cannot serve it: a
    /// client sent back here would only come round again). Kept for
    /// `redirectMemory`: a client polling a shard this node does not serve (a
    /// backup that has not followed it yet) would otherwise cost three metadata
    /// reads per request; an answer that old after a failover only sends a
    /// client round once more. (Locate always asks the metadata.)
    private func primaryAddress(_ shard: UInt64) async -> String {
        let now = ContinuousClock.now
        if let known = redirects.withLock({ $0[shard] }), known.until > now { return known.address }
        var address = ""
        if let location = try? await locator.locate(shard), location.primary.nodeID != shards.nodeID { address = location.primary.address }
        redirects.withLock { known in
            if known.count >= 4096 { known.removeAll() }  // shards come and go: a bound, not an eviction policy
            known[shard] = (address, now + Self.redirectMemory)
        }
        return address
    }

    /// How long a redirect's primary address is reused.
    static let redirectMemory = Duration.seconds(1)
    private let redirects = Mutex<[UInt64: (address: String, until: ContinuousClock.Instant)]>([:])

    static func info(_ listing: ShardListing) -> ShardInfo {
        ShardInfo(id: listing.record.shardID, owner: listing.record.ownerClientID, closed: listing.record.state == .closed,
                  volumeID: listing.record.volumeID, primaryNodeID: listing.primaryNodeID,
                  figures: listing.stats.map {
                      ShardFigures(entries: UInt64($0.entries), usedBytes: UInt64($0.usedBytes), limitBytes: UInt64($0.limitBytes))
                  })
    }
}
