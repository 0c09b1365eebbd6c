import BatchProtocol
import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// An async client of the batch socket service. One connection; any number of
/// concurrent calls are pipelined on it and matched to answers by request ID.
public final class ShardFSClient: Sendable {
    public let endpoint: Endpoint
    public let server: HelloInfo
    private let channel: Channel
    private let handler: NIOLoopBound<ClientHandler>
    private let ids = IDCounter()

    private init(endpoint: Endpoint, channel: Channel, handler: NIOLoopBound<ClientHandler>, server: HelloInfo) {
        self.endpoint = endpoint
        self.channel = channel
        self.handler = handler
        self.server = server
    }

    /// The client handler a connection's initializer made (set and read on its event loop).
    private final class MadeHandler: @unchecked Sendable {
        var handler: ClientHandler?
    }

    /// Connects and shakes hands; `token` is needed for TCP beyond loopback.
    /// `connectTimeout` bounds the TCP connect (a host that is down answers nothing).
    /// `tls`: for a TCP endpoint, speak TLS (a Unix socket is always plain).
    public static func connect(to endpoint: Endpoint, token: String = "", tls: ClientTLS? = nil, connectTimeout: Duration = .seconds(10),
                               group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> ShardFSClient {
        var tlsSetup: (context: NIOSSLContext, hostname: String?)?
        if let tls, case .tcp(let host, _) = endpoint { tlsSetup = (try tls.makeContext(), tls.hostname(for: host)) }
        let tlsHandler = tlsSetup.map { setup in { @Sendable in try NIOSSLClientHandler(context: setup.context, serverHostname: setup.hostname) } }
        // Kept apart from the pipeline: if the node answers and closes before this
        // task resumes (a refusal at its connection limit), the pipeline is gone,
        // but the handler still holds why.
        let made = MadeHandler()
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(.nanoseconds(Int64(max(1, connectTimeout.components.seconds * 1_000_000_000
                                                    + connectTimeout.components.attoseconds / 1_000_000_000))))
            .channelOption(.socketOption(.so_keepalive), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tlsHandler { try channel.pipeline.syncOperations.addHandler(try tlsHandler()) }
                    let handler = ClientHandler()
                    made.handler = handler
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        let channel: Channel
        do {
            switch endpoint {
            case .tcp(let host, let port): channel = try await bootstrap.connect(host: host, port: port).get()
            case .unix(let path): channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
            }
        } catch {
            throw ClientError.unreachable(endpoint, "\(error)")
        }
        let handler: NIOLoopBound<ClientHandler>
        do {
            handler = try await channel.eventLoop.submit {
                guard let made = made.handler else { throw ChannelError.ioOnClosedChannel }
                return NIOLoopBound(made, eventLoop: channel.eventLoop)
            }.get()
        } catch {
            // The pipeline is gone: the connection closed at once (over TLS, a
            // handshake the node refused, such as without a client certificate it asks for).
            throw tlsSetup == nil ? ClientError.connectionClosed("right after connecting to \(endpoint)")
                : ClientError.tls("\(endpoint) closed the connection during the handshake (does it ask for a client certificate?)")
        }
        let hello: ResponsePayload
        do {
            hello = try await call(channel, handler, id: 0, .hello(version: ProtocolConstants.version, token: token))
        } catch ClientError.tls(let why) {
            try? await channel.close()
            throw ClientError.tls("the handshake with \(endpoint) failed: \(why)")
        }
        guard case .hello(let info) = hello else {
            try? await channel.close()
            throw ClientError.protocolViolation("the server answered Hello with \(hello)")
        }
        let client = ShardFSClient(endpoint: endpoint, channel: channel, handler: handler, server: info)
        return client
    }

    public func close() async {
        try? await channel.close()
    }

    /// False once the connection is closed (by either side): calls would fail at once.
    public var isActive: Bool { channel.isActive }

    // MARK: Entries

    /// Puts one entry; returns once it is durable.
    public func put(client: String, shard: UInt64, key: [UInt8], value: [UInt8], indexes: [IndexField] = []) async throws {
        let item = PutItem(key: key, value: value, indexes: indexes)
        try Self.checkEncodable([item])
        _ = try await call(.put(client: client, shard: shard, item: item))
    }

    /// What the wire's length fields cannot carry is refused here, not cut short
    /// (the server refuses keys and names long before these bounds).
    static func checkEncodable(_ items: [PutItem]) throws {
        for item in items {
            if item.key.count > Int(UInt16.max) || item.value.count > Int(UInt32.max) || item.indexes.count > Int(UInt16.max)
                || item.indexes.contains(where: { $0.name.utf8.count > Int(UInt16.max) || $0.value.count > Int(UInt32.max) }) {
                throw ClientError.invalidArgument("an item's key, value, index count or index exceeds what the protocol can carry")
            }
        }
    }

    public func get(shard: UInt64, key: [UInt8]) async throws -> EntryPayload {
        guard case .entry(let entry) = try await call(.get(shard: shard, key: key)) else { throw unexpected() }
        return entry
    }

    public func delete(client: String, shard: UInt64, key: [UInt8]) async throws {
        _ = try await call(.delete(client: client, shard: shard, key: key))
    }

    /// Puts many entries in one durable transaction; one status per item, in order.
    public func batchPut(client: String, shard: UInt64, items: [PutItem]) async throws -> [Status] {
        try Self.checkEncodable(items)
        guard case .itemStatuses(let statuses) = try await call(.batchPut(client: client, shard: shard, items: items)) else {
            throw unexpected()
        }
        return statuses
    }

    /// Every item of a BatchGet, one per key in request order, returned once the
    /// final frame has arrived: one task resume per request, the fastest way to
    /// read a batch that fits in memory. A missing entry is an item with
    /// ENTRY_NOT_FOUND; throws if the whole request fails.
    public func batchGetAll(shard: UInt64, keys: [[UInt8]]) async throws -> [BatchGetItem] {
        let promise = channel.eventLoop.makePromise(of: [BatchGetItem].self)
        sendBatchGet(shard: shard, keys: keys, .all(promise))
        return try await promise.futureResult.get()
    }

    /// The items of a BatchGet in request order, in arrays as they arrive (one
    /// array per socket read): memory stays bounded by what has not been consumed,
    /// at one task resume per array. Throws if the whole request fails.
    public func batchGetChunks(shard: UInt64, keys: [[UInt8]]) -> AsyncThrowingStream<[BatchGetItem], Error> {
        let (stream, continuation) = AsyncThrowingStream<[BatchGetItem], Error>.makeStream()
        sendBatchGet(shard: shard, keys: keys, .chunks(continuation))
        return stream
    }

    /// Streams the entries of `keys`, one item per key in request order; a missing
    /// entry is an item with ENTRY_NOT_FOUND. The sequence throws if the whole
    /// request fails. Built on `batchGetChunks`.
    public func batchGet(shard: UInt64, keys: [[UInt8]]) -> BatchGetItems {
        BatchGetItems(chunks: batchGetChunks(shard: shard, keys: keys))
    }

    private func sendBatchGet(shard: UInt64, keys: [[UInt8]], _ sink: BatchGetCollector.Sink) {
        let id = ids.next()
        var out = channel.allocator.buffer(capacity: 16 + keys.count * 12)
        RequestCodec.encode(.batchGet(shard: shard, keys: keys), requestID: id, into: &out)
        let channel = self.channel, handler = self.handler
        channel.eventLoop.execute { [out] in
            if handler.value.register(id, .batchGet(BatchGetCollector(keys: keys, sink: sink))) {
                channel.writeAndFlush(out, promise: nil)
            }
        }
    }

    public struct ListPage: Sendable, Hashable {
        public var rows: [ListRow]
        public var more: Bool
    }

    public func list(shard: UInt64, after: [UInt8]? = nil, limit: UInt32 = 0) async throws -> ListPage {
        guard case .listPage(let rows, let more) = try await call(.list(shard: shard, after: after, limit: limit)) else {
            throw unexpected()
        }
        return ListPage(rows: rows, more: more)
    }

    public func find(shard: UInt64, indexName: String, value: [UInt8], after: [UInt8]? = nil,
                     limit: UInt32 = 0) async throws -> (keys: [[UInt8]], more: Bool) {
        let answer = try await call(.findByIndex(shard: shard, name: indexName, value: value, after: after, limit: limit))
        guard case .keys(let keys, let more) = answer else { throw unexpected() }
        return (keys, more)
    }

    // MARK: Shards

    /// Creates a shard for `owner`; `id` asks for that ID, `sizeLimit` (bytes) overrides the node's default.
    public func newShard(owner: String, id: UInt64? = nil, sizeLimit: Int? = nil) async throws -> UInt64 {
        let answer = try await call(.newShard(owner: owner, requestedID: id ?? 0, sizeLimit: UInt64(sizeLimit ?? 0)))
        guard case .shardID(let shard) = answer else { throw unexpected() }
        return shard
    }

    /// Closes a shard (read-only forever); `client` must be its owner.
    public func closeShard(client: String, shard: UInt64) async throws {
        _ = try await call(.closeShard(client: client, shard: shard))
    }

    /// Deletes a shard and its entries; `client` must be its owner.
    public func deleteShard(client: String, shard: UInt64) async throws {
        _ = try await call(.deleteShard(client: client, shard: shard))
    }

    public func listShards() async throws -> [ShardInfo] {
        guard case .shards(let shards) = try await call(.listShards) else { throw unexpected() }
        return shards
    }

    public func stat(_ id: UInt64) async throws -> ShardInfo {
        guard case .shard(let info) = try await call(.stat(id)) else { throw unexpected() }
        return info
    }

    /// Where `id` is served (its primary and backups, with their addresses), as
    /// the answering node's metadata says. Any node answers.
    public func locate(_ id: UInt64) async throws -> ShardLocation {
        guard case .location(let location) = try await call(.locate(id)) else { throw unexpected() }
        return location
    }

    /// The key of the original API's entry ID.
    public static func key(entryID: UInt32) -> [UInt8] { Array(String(entryID).utf8) }

    // MARK: Calls

    /// Sends any request and returns its OK payload; a non-OK status throws
    /// `ClientError.status` (`ClientError.notShardLeader` for NOT_SHARD_LEADER).
    public func call(_ request: Request) async throws -> ResponsePayload {
        try await Self.call(channel, handler, id: ids.next(), request, version: server.version)
    }

    private static func call(_ channel: Channel, _ handler: NIOLoopBound<ClientHandler>, id: UInt32,
                             _ request: Request, version: UInt16 = ProtocolConstants.version) async throws -> ResponsePayload {
        var out = channel.allocator.buffer(capacity: 64)
        RequestCodec.encode(request, requestID: id, version: version, into: &out)
        let promise = channel.eventLoop.makePromise(of: Response.self)
        channel.eventLoop.execute { [out] in
            if handler.value.register(id, .reply(promise)) {
                channel.writeAndFlush(out, promise: nil)
            }
        }
        guard case .reply(_, _, let status, let payload) = try await promise.futureResult.get() else {
            throw ClientError.protocolViolation("a reply was expected")
        }
        guard status.isOK else { throw ClientError.answer(status, payload) }
        return payload
    }

    private func unexpected() -> ClientError { ClientError.protocolViolation("unexpected response payload") }
}

/// The items of one BatchGet, one at a time (see `ShardFSClient.batchGet`).
public struct BatchGetItems: AsyncSequence, Sendable {
    public typealias Element = BatchGetItem
    let chunks: AsyncThrowingStream<[BatchGetItem], Error>

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(chunks: chunks.makeAsyncIterator()) }

    public struct AsyncIterator: AsyncIteratorProtocol {
        var chunks: AsyncThrowingStream<[BatchGetItem], Error>.AsyncIterator
        var buffer: [BatchGetItem] = []
        var index = 0

        public mutating func next() async throws -> BatchGetItem? {
            while index == buffer.count {
                guard let chunk = try await chunks.next() else { return nil }
                buffer = chunk
                index = 0
            }
            defer { index += 1 }
            return buffer[index]
        }
    }
}

/// Request IDs: unique among calls in flight on one connection (they wrap after 2³²).
final class IDCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var value: UInt32 = 0

    func next() -> UInt32 { lock.withLock { value &+= 1; return value } }
}
