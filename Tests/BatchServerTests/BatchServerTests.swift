import BatchProtocol
import BatchServer
import Foundation
import Metadata
import NIOCore
import ShardFSClient
import ShardStore
import Testing
import TestSupport

private func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

func statusCode(_ body: () async throws -> Void) async -> StatusCode? {
    do { try await body() } catch ClientError.status(let s) { return s.code } catch { return nil }
    return .ok
}

private func hello(token: String = "") -> [UInt8] {
    var b = ByteBufferAllocator().buffer(capacity: 32)
    RequestCodec.encode(.hello(version: 1, token: token), requestID: 0, into: &b)
    return Array(b.readableBytesView)
}

/// The frames in `raw`, decoded.
private func responses(_ raw: [UInt8]) -> [Response] {
    var decoder = FrameDecoder(maxFrameLength: Int(UInt32.max))
    decoder.append(ByteBuffer(bytes: raw))
    var out: [Response] = []
    while let f = try? decoder.next(), let r = try? ResponseCodec.decode(f) { out.append(r) }
    return out
}

/// The BatchPut answers among `frames`, by request ID: each item's status, or
/// the request's own status when it failed as a whole.
private func batchPutCodes(_ frames: [Frame]) -> [UInt32: [StatusCode]] {
    var codes: [UInt32: [StatusCode]] = [:]
    for answer in frames.compactMap({ try? ResponseCodec.decode($0) }) {
        guard case .reply(.batchPut, let id, let status, let payload) = answer else { continue }
        if status.isOK, case .itemStatuses(let statuses) = payload { codes[id] = statuses.map(\.code) } else { codes[id] = [status.code] }
    }
    return codes
}

@Suite(.serialized) struct BatchServerTests {
    /// A value larger than an answer may carry (`largestValue`: the protocol's
    /// 4 GiB less 16 MiB by default, reached only by files written through the
    /// mount) is answered INVALID_ARGUMENT, by a Get and as a BatchGet item, and
    /// leaves nothing of itself in the stream: the connection goes on.
    @Test func aValueLargerThanAnAnswerCarriesIsRefusedCleanly() async throws {
        try await withServer({ $0.largestValue = 1 << 20 }) { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "sw")
            let big = [UInt8](repeating: 7, count: 2 << 20)
            try await c.put(client: "sw", shard: shard, key: bytes("big"), value: big)
            try await c.put(client: "sw", shard: shard, key: bytes("small"), value: bytes("s"))
            #expect(await statusCode { _ = try await c.get(shard: shard, key: bytes("big")) } == .invalidArgument)
            let items = try await c.batchGetAll(shard: shard, keys: [bytes("big"), bytes("small")])
            #expect(items.map(\.status.code) == [.invalidArgument, .ok])
            #expect(try await c.get(shard: shard, key: bytes("small")).value == bytes("s"))
        }
    }

    /// Pipelined reads whose answers together pass what one engine job gathers
    /// (`answerBudget`; 1 GiB by default, where a few Gets of large files
    /// written through the mount would pass the 4 GiB one buffer holds) are
    /// answered in jobs of their own: every answer arrives once, whole.
    @Test(.timeLimit(.minutes(1))) func pipelinedReadsPastTheAnswerBudgetAllArriveWhole() async throws {
        try await withServer({ $0.answerBudget = 1 << 20 }) { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "sw")
            let values = (0..<6).map { n in (0..<(700 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ n) } }
            for (n, value) in values.enumerated() {
                try await c.put(client: "sw", shard: shard, key: bytes("k\(n)"), value: value)
            }
            let got = try await withThrowingTaskGroup(of: (Int, [UInt8]).self) { group in
                for n in values.indices { group.addTask { (n, try await c.get(shard: shard, key: bytes("k\(n)")).value) } }
                var got: [Int: [UInt8]] = [:]
                for try await (n, value) in group { got[n] = value }
                return got
            }
            #expect(got.count == values.count && values.indices.allSatisfy { got[$0] == values[$0] })
            let items = try await c.batchGetAll(shard: shard, keys: values.indices.map { bytes("k\($0)") })
            #expect(items.count == values.count && items.allSatisfy { $0.status.isOK && $0.entry?.value == values[Int($0.position)] })
        }
    }

    @Test func everyOperationAndStatusThroughTheSwiftClient() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "sw")
            #expect(await statusCode { _ = try await c.newShard(owner: "sw", id: shard) } == .shardIDTaken)
            #expect(await statusCode { _ = try await c.newShard(owner: "") } == .clientIDRequired)
            #expect(await statusCode { _ = try await c.newShard(owner: "sw", sizeLimit: 10) } == .invalidArgument)

            try await c.put(client: "sw", shard: shard, key: ShardFSClient.key(entryID: 1), value: bytes("one"),
                            indexes: [IndexField(name: "kind", value: bytes("odd"))])
            let one = try await c.get(shard: shard, key: bytes("1"))
            #expect(one.value == bytes("one"))
            #expect(one.indexes == [IndexField(name: "kind", value: bytes("odd"))])
            #expect(await statusCode { _ = try await c.get(shard: shard, key: bytes("2")) } == .entryNotFound)
            #expect(await statusCode { _ = try await c.get(shard: 999_999, key: bytes("1")) } == .shardNotFound)
            #expect(await statusCode { try await c.put(client: "other", shard: shard, key: bytes("x"), value: []) } == .shardFenced)
            #expect(await statusCode { try await c.put(client: "", shard: shard, key: bytes("x"), value: []) } == .clientIDRequired)
            #expect(await statusCode { try await c.put(client: "sw", shard: shard, key: bytes("a/b"), value: []) } == .invalidKey)
            #expect(await statusCode {
                try await c.put(client: "sw", shard: shard, key: bytes("x"), value: [], indexes: [IndexField(name: "", value: [])])
            } == .invalidIndex)

            let statuses = try await c.batchPut(client: "sw", shard: shard, items: [
                PutItem(key: bytes("2"), value: bytes("two")), PutItem(key: bytes(".."), value: []),
                PutItem(key: bytes("3"), value: bytes("three")),
            ])
            #expect(statuses.map(\.code) == [.ok, .invalidKey, .ok])

            let page = try await c.list(shard: shard, limit: 2)
            #expect(page.rows.map(\.key) == [bytes("1"), bytes("2")] && page.more)
            let rest = try await c.list(shard: shard, after: bytes("2"), limit: 2)
            #expect(rest.rows.map(\.key) == [bytes("3")] && !rest.more)
            let found = try await c.find(shard: shard, indexName: "kind", value: bytes("odd"))
            #expect(found.keys == [bytes("1")] && !found.more)

            try await c.delete(client: "sw", shard: shard, key: bytes("3"))
            #expect(await statusCode { try await c.delete(client: "sw", shard: shard, key: bytes("3")) } == .entryNotFound)

            let info = try await c.stat(shard)
            #expect(info.owner == "sw" && info.figures?.entries == 2 && !info.closed)
            let listed = try #require(try await c.listShards().first { $0.id == shard })
            #expect(info.volumeID == listed.volumeID && !info.volumeID.isEmpty)
            #expect(info.primaryNodeID == listed.primaryNodeID && !info.primaryNodeID.isEmpty)

            try await c.closeShard(client: "sw", shard: shard)
            #expect(await statusCode { try await c.put(client: "sw", shard: shard, key: bytes("4"), value: []) } == .shardClosed)
            #expect(try await c.stat(shard).closed)

            let small = try await c.newShard(owner: "sw", sizeLimit: 256 << 10)
            #expect(await statusCode {
                try await c.put(client: "sw", shard: small, key: bytes("big"), value: [UInt8](repeating: 1, count: 300 << 10))
            } == .shardFull)

            try await c.deleteShard(client: "sw", shard: shard)
            #expect(await statusCode { _ = try await c.stat(shard) } == .shardNotFound)
        }
    }

    @Test func thePythonClientWrittenFromTheDocumentAgrees() async throws {
        try await withHeavyTest { try await withServer({ $0.token = "py-token" }) { fx in
            let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent("clients/python/check_protocol.py").path
            let port = fx.server.tcpPort!
            let result = try await offPool {
                try run("/usr/bin/env", ["python3", script, "--socket", fx.socket, "--tcp", "127.0.0.1:\(port)", "--token", "py-token"])
            }
            #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
            #expect(result.stdout.contains("python protocol check passed"))
        } }
    }

    @Test func pipelinedRequestsCompleteOutOfOrderAndMatchTheirAnswers() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let slow = try await c.newShard(owner: "p"), fast = try await c.newShard(owner: "p")
            try await c.put(client: "p", shard: fast, key: bytes("k"), value: bytes("v"))
            let order = OrderLog()
            var sawOutOfOrder = false
            for attempt in 0..<5 where !sawOutOfOrder {
                let items = (0..<20_000).map { PutItem(key: bytes("a\(attempt)-\($0)"), value: [UInt8](repeating: 7, count: 100)) }
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        let statuses = try await c.batchPut(client: "p", shard: slow, items: items)
                        #expect(statuses.count == items.count && statuses.allSatisfy(\.isOK))
                        order.append("put")
                    }
                    try await Task.sleep(for: .milliseconds(2))  // let the batch go out first
                    for i in 0..<20 {
                        group.addTask {
                            let e = try await c.get(shard: fast, key: bytes("k"))
                            #expect(e.value == bytes("v"))
                            order.append("get\(i)")
                        }
                    }
                    try await group.waitForAll()
                }
                sawOutOfOrder = order.take().first != "put"
            }
            #expect(sawOutOfOrder, "a get sent after a big batch put never overtook it")
        }
    }

    /// Writes to one shard from one connection go through that shard's lane:
    /// those that arrive while it commits go in together after, so they land in
    /// the order they were sent even when an earlier one is much larger.
    @Test func pipelinedWritesOfOneConnectionLandInTheOrderSent() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "o"), other = try await c.newShard(owner: "o")
            let path = fx.socket
            for round in 0..<5 {
                let frames = try await offPool { () -> [Frame] in
                    let socket = try RawSocket(unixPath: path)
                    socket.send(hello())
                    // A large batch, then small ones while it is being committed.
                    var b = ByteBufferAllocator().buffer(capacity: 1 << 20)
                    let large = [PutItem(key: bytes("same"), value: bytes("large"))]
                        + (0..<20_000).map { PutItem(key: bytes("r\(round)-\($0)"), value: [UInt8](repeating: 1, count: 20)) }
                    RequestCodec.encode(.batchPut(client: "o", shard: shard, items: large), requestID: 1, into: &b)
                    socket.send(Array(b.readableBytesView))
                    usleep(500)
                    for n in 0..<20 {
                        b.clear()
                        let items = [PutItem(key: bytes("same"), value: bytes("v\(n)"))]
                        RequestCodec.encode(.batchPut(client: "o", shard: n % 3 == 0 ? other : shard, items: items),
                                            requestID: UInt32(n + 2), into: &b)
                        socket.send(Array(b.readableBytesView))
                    }
                    return socket.readFrames(22)
                }
                let codes = batchPutCodes(frames)
                #expect(codes.count == 21 && codes.values.allSatisfy { $0.allSatisfy { $0 == .ok } })
                #expect(try await c.get(shard: shard, key: bytes("same")).value == bytes("v19"))
                #expect(try await c.get(shard: other, key: bytes("same")).value == bytes("v18"))
            }
        }
    }

    /// Pipelined BatchPuts into a shard with room for two of them: the first two
    /// land and the third gets SHARD_FULL, whether they share a lane round (the
    /// round's transaction fails as full and each is tried alone) or arrive in
    /// separate reads. After a close, a BatchPut gets SHARD_CLOSED and nothing of
    /// it lands.
    @Test func batchPutsThatDoNotFitTogetherAreTriedAloneAndClosedShardsRefuseThem() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "f", sizeLimit: 256 << 10)
            let path = fx.socket
            let frames = try await offPool { () -> [Frame] in
                let socket = try RawSocket(unixPath: path)
                var b = ByteBufferAllocator().buffer(capacity: 1 << 20)
                b.writeBytes(hello())
                for n in 0..<3 {
                    let items = [PutItem(key: bytes("v\(n)"), value: [UInt8](repeating: UInt8(n), count: 80 << 10))]
                    RequestCodec.encode(.batchPut(client: "f", shard: shard, items: items), requestID: UInt32(n + 1), into: &b)
                }
                socket.send(Array(b.readableBytesView))
                return socket.readFrames(4)
            }
            let codes = batchPutCodes(frames)
            #expect(codes == [1: [.ok], 2: [.ok], 3: [.shardFull]], "\(codes)")
            #expect(try await c.get(shard: shard, key: bytes("v1")).value.count == 80 << 10)
            #expect(await statusCode { _ = try await c.get(shard: shard, key: bytes("v2")) } == .entryNotFound)

            try await c.closeShard(client: "f", shard: shard)
            #expect(await statusCode {
                _ = try await c.batchPut(client: "f", shard: shard, items: [PutItem(key: bytes("late"), value: bytes("x"))])
            } == .shardClosed)
            #expect(try await c.list(shard: shard).rows.map(\.key) == [bytes("v0"), bytes("v1")])
        }
    }

    @Test func batchGetStreamsEveryItemInOrderAndMissingOnesDoNotAbort() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "s")
            let n = 5_000  // more than one streamed piece
            let present = (0..<n).filter { $0 % 3 != 0 }
            _ = try await c.batchPut(client: "s", shard: shard,
                                     items: present.map { PutItem(key: ShardFSClient.key(entryID: UInt32($0)), value: bytes("v\($0)")) })
            var positions: [Int] = []
            for try await item in c.batchGet(shard: shard, keys: (0..<n).map { ShardFSClient.key(entryID: UInt32($0)) }) {
                positions.append(item.position)
                if item.position % 3 == 0 {
                    #expect(item.status.code == .entryNotFound && item.entry == nil)
                } else {
                    #expect(item.entry?.value == bytes("v\(item.position)"))
                }
            }
            #expect(positions == Array(0..<n))
            var failed: StatusCode?
            do { for try await _ in c.batchGet(shard: 424_242, keys: [bytes("1")]) {} } catch ClientError.status(let s) {
                failed = s.code
            }
            #expect(failed == .shardNotFound)
        }
    }

    @Test func batchGetAllAndChunksReturnEveryItemInOrderWithItsStatus() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "s")
            let n = 5_000  // more than one streamed piece
            func item(_ i: Int) -> PutItem {
                let indexes = i % 5 == 0 ? [IndexField(name: "five", value: bytes(String(i)))] : []
                return PutItem(key: ShardFSClient.key(entryID: UInt32(i)), value: bytes("v" + String(i)), indexes: indexes)
            }
            _ = try await c.batchPut(client: "s", shard: shard, items: (0..<n).filter { $0 % 3 != 0 }.map(item))
            var keys = (0..<n).map { ShardFSClient.key(entryID: UInt32($0)) }
            keys[7] = bytes("a/b")  // a bad key is an item of its own, the others go on
            func check(_ items: [BatchGetItem]) {
                #expect(items.map(\.position) == Array(0..<n))
                #expect(items.map(\.key) == keys)
                for item in items {
                    let p = item.position
                    if p == 7 {
                        #expect(item.status.code == .invalidKey && item.entry == nil)
                    } else if p % 3 == 0 {
                        #expect(item.status.code == .entryNotFound && item.entry == nil)
                    } else {
                        #expect(item.status.isOK)
                        #expect(item.entry?.value == bytes("v\(p)"))
                        #expect(item.entry?.indexes == (p % 5 == 0 ? [IndexField(name: "five", value: bytes("\(p)"))] : []))
                    }
                }
            }
            check(try await c.batchGetAll(shard: shard, keys: keys))
            var chunks = 0
            var streamed: [BatchGetItem] = []
            for try await chunk in c.batchGetChunks(shard: shard, keys: keys) {
                #expect(!chunk.isEmpty)
                chunks += 1
                streamed += chunk
            }
            check(streamed)
            #expect(chunks < n / 10, "items should come in arrays, not one by one (\(chunks) arrays)")
            #expect(try await c.batchGetAll(shard: shard, keys: []).isEmpty)

            var failed: [StatusCode] = []
            do { _ = try await c.batchGetAll(shard: 424_242, keys: [bytes("1")]) } catch ClientError.status(let s) {
                failed.append(s.code)
            }
            do { for try await _ in c.batchGetChunks(shard: 424_242, keys: [bytes("1")]) {} } catch ClientError.status(let s) {
                failed.append(s.code)
            }
            #expect(failed == [.shardNotFound, .shardNotFound])
        }
    }

    @Test func batchGetOfLargeValuesIsSentInPiecesAndComesBackWhole() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "s")
            // 6 × 300 KB: chunked values (over 128 KiB each), more than one 1 MiB stream piece.
            let values = (0..<6).map { i in (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* (i + 3)) } }
            for (i, v) in values.enumerated() {
                try await c.put(client: "s", shard: shard, key: bytes("big\(i)"), value: v)
            }
            let keys = (0..<6).map { bytes("big\($0)") } + [bytes("nothing")]
            let all = try await c.batchGetAll(shard: shard, keys: keys)
            #expect(all.map(\.position) == Array(0..<7))
            let whole = all.prefix(6).map { $0.entry?.value } == values  // (a Bool: no 2 MB failure message)
            #expect(whole)
            #expect(all[6].status.code == .entryNotFound)
            var one: [[UInt8]?] = []
            for try await item in c.batchGet(shard: shard, keys: keys) { one.append(item.entry?.value) }
            let wholeOneByOne = one == values + [nil]
            #expect(wholeOneByOne)
        }
    }

    @Test func badInputClosesOnlyThatConnection() async throws {
        try await withServer({ $0.frameTimeout = .milliseconds(500) }) { fx in
            let good = try await fx.client()
            defer { Task { await good.close() } }
            let shard = try await good.newShard(owner: "b")
            let path = fx.socket
            let results = try await offPool { () -> [[Response]] in
                // Random bytes.
                var rng = SystemRandomNumberGenerator()
                let random = try RawSocket(unixPath: path)
                random.send((0..<64).map { _ in UInt8.random(in: 0...255, using: &rng) })
                // A frame claiming 4 GiB after a good handshake.
                let huge = try RawSocket(unixPath: path)
                huge.send(hello() + [0xFF, 0xFF, 0xFF, 0xFF, 0x02])
                // Half a frame, then silence.
                let half = try RawSocket(unixPath: path)
                half.send(hello() + [0, 0, 0, 40, 0x03, 0, 0])
                // An unknown type.
                let unknown = try RawSocket(unixPath: path)
                unknown.send(hello() + [0, 0, 0, 5, 0x6E, 0, 0, 0, 9])
                return [random, huge, half, unknown].map { responses($0.readToEnd()) }
            }
            func lastError(_ rs: [Response]) -> StatusCode? {
                if case .error(_, let s) = rs.last { return s.code }
                return nil
            }
            #expect(lastError(results[0]) == .invalidRequest || lastError(results[0]) == .unauthorised
                    || lastError(results[0]) == .frameTooLarge)
            #expect(lastError(results[1]) == .frameTooLarge)
            #expect(lastError(results[2]) == .timeout)
            #expect(lastError(results[3]) == .invalidRequest)
            // The server and the good connection carry on.
            try await good.put(client: "b", shard: shard, key: bytes("still"), value: bytes("here"))
            #expect(try await good.get(shard: shard, key: bytes("still")).value == bytes("here"))
        }
    }

    @Test func aThousandConnectionsAtOnce() async throws {
        try await withServer({ $0.maxConnections = 600 }) { fx in
            let path = fx.socket
            let (accepted, refused, others) = try await offPool { () -> (Int, Int, Int) in
                // One after another, each shaking hands before the next connects:
                // 600 are served and kept open, the other 400 are refused.
                var open: [RawSocket] = []
                var refused = 0, others = 0
                for _ in 0..<1_000 {
                    let s = try RawSocket(unixPath: path, receiveTimeoutSeconds: 60)
                    s.send(hello())
                    let first = s.readFrames(1).first.flatMap { try? ResponseCodec.decode($0) }
                    switch first {
                    case .reply(.hello, _, let st, _)? where st.isOK: open.append(s)
                    case .error(_, let st)? where st.code == .tooManyConnections: refused += 1
                    default: others += 1
                    }
                }
                return (open.count, refused, others)
            }
            #expect(accepted == 600 && refused == 400 && others == 0, "\(accepted) served, \(refused) refused, \(others) other")
            // All those closed; the server answers again once it has seen them go
            // (their closes reach it asynchronously, so a first try may still be refused).
            var answered = false
            for _ in 0..<100 where !answered {
                do {
                    let c = try await fx.client()
                    let empty = try await c.listShards().isEmpty  // a refused client is closed by the server
                    await c.close()
                    #expect(empty)
                    answered = true
                } catch ClientError.connectionClosed(let why) where why.contains("TOO_MANY_CONNECTIONS") {
                    try await Task.sleep(for: .milliseconds(50))
                }
            }
            #expect(answered, "the server still refused connections 5 s after 1,000 closed")
        }
    }

    @Test func anUnauthenticatedTCPClientGetsOnlyAnError() async throws {
        try await withServer({ $0.token = "s3cret" }) { fx in
            var refusal: StatusCode?
            do { _ = try await ShardFSClient.connect(to: fx.tcp, token: "") } catch ClientError.connectionClosed(let why) {
                refusal = why.contains("UNAUTHORISED") ? .unauthorised : nil
            }
            #expect(refusal == .unauthorised)
            let wrong = await (try? ShardFSClient.connect(to: fx.tcp, token: "guess")) == nil
            #expect(wrong)
            let c = try await ShardFSClient.connect(to: fx.tcp, token: "s3cret")
            #expect(try await c.listShards().isEmpty)
            await c.close()
            // The Unix socket needs no token: its mode is the access control.
            let attrs = try FileManager.default.attributesOfItem(atPath: fx.socket)
            #expect((attrs[.posixPermissions] as? Int) == 0o660)
        }
    }

    @Test func aNonLoopbackAddressWithoutATokenDoesNotStart() async throws {
        let dir = try TemporaryDirectory("batch-cfg")
        var config = BatchServerConfiguration()
        config.tcpAddress = "0.0.0.0:0"
        config.unixSocketPath = dir.sub("s.sock")
        var c = ShardNodeConfig()
        c.node.dataDir = dir.sub("d")
        let node = try await StorageNode.start(c)
        await #expect(throws: BatchServerError.self) { _ = try await BatchServer.start(config, shards: node.shards) }
    }
}

import ShardNode
typealias ShardNodeConfig = ShardNode.Configuration

/// Completion order, shared by concurrent tasks.
final class OrderLog: @unchecked Sendable {
    private let lock = NSLock()
    private var entries: [String] = []
    func append(_ s: String) { lock.withLock { entries.append(s) } }
    func take() -> [String] { lock.withLock { defer { entries = [] }; return entries } }
}

/// Shutdown through the socket: what was acknowledged is in the shard.
@Suite struct ShutdownTests {
    @Test func shutdownWithPutsInFlightLosesNoAcknowledgedPut() async throws {
        let fixture = try await ServerFixture.start()
        let c = try await fixture.client()
        let shard = try await c.newShard(owner: "g")
        let outcomes = await withTaskGroup(of: (Int, Bool)?.self) { group -> [(Int, Bool)] in
            for i in 0..<500 {
                group.addTask {
                    do {
                        try await c.put(client: "g", shard: shard, key: bytes("k\(i)"), value: bytes("v\(i)"))
                        return (i, true)
                    } catch {
                        return (i, false)
                    }
                }
            }
            group.addTask {
                try? await Task.sleep(for: .milliseconds(3))
                await fixture.stop()  // while puts are in flight
                return nil
            }
            var all: [(Int, Bool)] = []
            for await outcome in group { if let outcome { all.append(outcome) } }
            return all
        }
        #expect(outcomes.count == 500)  // every put got an answer or an error: none hangs
        let acknowledged = outcomes.filter(\.1).map(\.0)
        let stored = try await fixture.node.shards.shard(shard)
        for i in acknowledged {
            #expect(try stored.get(EntryKey("k\(i)")).value == bytes("v\(i)"), "acknowledged put k\(i) is missing")
        }
        // The socket is gone: nobody new gets in.
        await #expect(throws: (any Error).self) { _ = try await fixture.client() }
        await c.close()
    }
}

/// A locator that answers one address and counts how often it is asked.
final class CountingLocator: ShardLocator, @unchecked Sendable {
    private let lock = NSLock()
    private var asked = 0
    var calls: Int { lock.withLock { asked } }

    func locate(_ shard: UInt64) async throws -> ShardLocation {
        lock.withLock { asked += 1 }
        return ShardLocation(shard: shard, volumeID: "vol-elsewhere", epoch: 1, closed: false,
                             primary: NodeLocation(nodeID: "elsewhere", address: "10.0.0.9:7070"), backups: [], answeredBy: "here")
    }
}

@Suite struct RedirectTests {
    /// A client polling a shard another node holds is sent there without a metadata
    /// lookup per request: the primary's address is reused for a second.
    @Test func aRedirectReusesTheLocatedPrimaryForASecond() async throws {
        let locator = CountingLocator()
        try await withServer({ $0.locator = locator }) { f in
            let metadata = f.node.metadata
            try await metadata.registerVolume(VolumeRecord(volumeID: "vol-elsewhere", primaryNodeID: "elsewhere", mountPath: "/elsewhere"))
            try await metadata.createShard(ShardRecord(shardID: 77, volumeID: "vol-elsewhere", ownerClientID: "c", sizeLimit: 1 << 20))
            let client = try await f.client()
            func leader() async -> String? {
                do {
                    _ = try await client.get(shard: 77, key: Array("k".utf8))
                    return nil
                } catch ClientError.notShardLeader(_, let leader) {
                    return leader
                } catch {
                    return "\(error)"
                }
            }
            // At most one lookup per second (a loaded machine may take seconds for these).
            let started = ContinuousClock.now
            for _ in 0..<50 { #expect(await leader() == "10.0.0.9:7070") }
            let seconds = (ContinuousClock.now - started).components.seconds
            #expect(locator.calls <= 1 + Int(seconds), "\(locator.calls) lookups in \(seconds) s")
            // Past the second, the next redirect looks again.
            let before = locator.calls
            try await Task.sleep(for: .milliseconds(1_100))
            #expect(await leader() == "10.0.0.9:7070")
            #expect(locator.calls == before + 1)
            await client.close()
        }
    }
}
