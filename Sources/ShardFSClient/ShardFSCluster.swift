import BatchProtocol
import Foundation
import NIOCore
import NIOPosix

/// How a `ShardFSCluster` follows primaries and retries.
public struct RoutingOptions: Sendable {
    /// How long one call keeps trying (other nodes, a primary that moved) before
    /// it gives up with the last error. Zero: one attempt (redirects still followed).
    public var deadline: Duration = .seconds(30)
    /// NOT_SHARD_LEADER redirects followed in a row before the call backs off and asks again.
    public var maxRedirects = 4
    /// The first pause between attempts; it doubles up to `maxBackoff` (each with jitter).
    public var initialBackoff: Duration = .milliseconds(50)
    public var maxBackoff: Duration = .seconds(1)
    /// Bound on one TCP connect (a host that is down answers nothing).
    public var connectTimeout: Duration = .seconds(5)

    public init() {}
}

/// A client of several nodes that routes each request to the primary of its shard.
///
/// - A shard's primary is learnt from Locate (asked of any node on first use) or
///   from a NOT_SHARD_LEADER redirect, and remembered until it fails.
/// - A redirect is followed at once (up to `maxRedirects` in a row).
/// - A node that cannot be reached, or NOT_SHARD_LEADER with no address (the
///   primary is unknown, e.g. during a takeover), makes the call try the other
///   nodes and ask again, with backoff, until `deadline`.
/// - A request whose connection broke after it was sent is retried only if
///   repeating it is harmless: reads, Locate, CloseShard, and Put/BatchPut (an
///   overwrite with the same value; see docs/PROTOCOL.md, "Client routing",
///   for what "landing twice" means). Delete, DeleteShard and NewShard then fail
///   with `connectionClosed`: whether they were applied is unknown.
/// - NewShard goes to the first node that answers and can create one.
///
/// One connection per node, shared by concurrent calls (pipelined).
public final class ShardFSCluster: Sendable {
    public let nodes: [Endpoint]
    public let options: RoutingOptions
    private let token: String
    private let tls: ClientTLS?
    private let group: EventLoopGroup
    private let table: RoutingTable

    /// `nodes` in order of preference; `token` is presented to every TCP node,
    /// and `tls`, if given, is spoken with each (a node a redirect names included).
    public init(nodes: [Endpoint], token: String = "", tls: ClientTLS? = nil, options: RoutingOptions = RoutingOptions(),
                group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws {
        guard !nodes.isEmpty else { throw ClientError.invalidArgument("no node to connect to") }
        self.nodes = nodes
        self.options = options
        self.token = token
        self.tls = tls
        self.group = group
        table = RoutingTable()
    }

    /// Closes every connection.
    public func close() async {
        for client in await table.removeAllConnections() { await client.close() }
    }

    /// The node the cluster sends `shard`'s requests to now, if it knows one.
    public func knownPrimary(of shard: UInt64) -> Endpoint? { table.primary(shard) }

    // MARK: Entries

    public func put(client: String, shard: UInt64, key: [UInt8], value: [UInt8], indexes: [IndexField] = []) async throws {
        try await perform(Call(shard: shard, writes: true)) { try await $0.put(client: client, shard: shard, key: key, value: value, indexes: indexes) }
    }

    public func get(shard: UInt64, key: [UInt8]) async throws -> EntryPayload {
        try await perform(Call(shard: shard)) { try await $0.get(shard: shard, key: key) }
    }

    /// Not retried once sent (a second Delete of a deleted entry answers ENTRY_NOT_FOUND).
    public func delete(client: String, shard: UInt64, key: [UInt8]) async throws {
        try await perform(Call(shard: shard, writes: true, idempotent: false)) {
            try await $0.delete(client: client, shard: shard, key: key)
        }
    }

    public func batchPut(client: String, shard: UInt64, items: [PutItem]) async throws -> [Status] {
        try await perform(Call(shard: shard, writes: true)) { try await $0.batchPut(client: client, shard: shard, items: items) }
    }

    public func batchGetAll(shard: UInt64, keys: [[UInt8]]) async throws -> [BatchGetItem] {
        try await perform(Call(shard: shard)) { try await $0.batchGetAll(shard: shard, keys: keys) }
    }

    /// Streams a BatchGet from the shard's primary. It is routed and retried like
    /// any read until its first item arrives; a failure after that ends the stream.
    public func batchGet(shard: UInt64, keys: [[UInt8]]) -> BatchGetItems {
        let (stream, continuation) = AsyncThrowingStream<[BatchGetItem], Error>.makeStream()
        let task = Task {
            do {
                try await perform(Call(shard: shard)) { client in
                    var started = false
                    do {
                        for try await chunk in client.batchGetChunks(shard: shard, keys: keys) {
                            started = true
                            continuation.yield(chunk)
                        }
                    } catch where started {
                        throw StreamBroken(error: error)
                    }
                }
                continuation.finish()
            } catch let broken as StreamBroken {
                continuation.finish(throwing: broken.error)
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return BatchGetItems(chunks: stream)
    }

    public func list(shard: UInt64, after: [UInt8]? = nil, limit: UInt32 = 0) async throws -> ShardFSClient.ListPage {
        try await perform(Call(shard: shard)) { try await $0.list(shard: shard, after: after, limit: limit) }
    }

    public func find(shard: UInt64, indexName: String, value: [UInt8], after: [UInt8]? = nil,
                     limit: UInt32 = 0) async throws -> (keys: [[UInt8]], more: Bool) {
        try await perform(Call(shard: shard)) { try await $0.find(shard: shard, indexName: indexName, value: value, after: after, limit: limit) }
    }

    // MARK: Shards

    /// Creates a shard on the first node that answers and has a writable volume;
    /// not retried once sent (a second NewShard would make a second shard).
    public func newShard(owner: String, id: UInt64? = nil, sizeLimit: Int? = nil) async throws -> UInt64 {
        try await perform(Call(idempotent: false, nextNodeOn: [.noNodeAvailable, .notShardLeader])) { client in
            let shard = try await client.newShard(owner: owner, id: id, sizeLimit: sizeLimit)
            table.setPrimary(shard, client.endpoint)  // it made the shard on a volume it holds as primary
            return shard
        }
    }

    /// `client` must be the shard's owner.
    public func closeShard(client: String, shard id: UInt64) async throws {
        try await perform(Call(shard: id, writes: true)) { try await $0.closeShard(client: client, shard: id) }
    }

    /// `client` must be the shard's owner. Not retried once sent (a second
    /// DeleteShard answers SHARD_NOT_FOUND).
    public func deleteShard(client: String, shard id: UInt64) async throws {
        try await perform(Call(shard: id, writes: true, idempotent: false)) { try await $0.deleteShard(client: client, shard: id) }
        table.forgetPrimary(id)
    }

    public func listShards() async throws -> [ShardInfo] {
        try await perform(Call()) { try await $0.listShards() }
    }

    public func stat(_ id: UInt64) async throws -> ShardInfo {
        try await perform(Call(shard: id)) { try await $0.stat(id) }
    }

    /// Where `id` is served, asked of the first node that answers.
    public func locate(_ id: UInt64) async throws -> ShardLocation {
        try await perform(Call()) { client in
            let location = try await client.locate(id)
            table.learn(node: location.answeredBy, at: client.endpoint)
            return location
        }
    }

    // MARK: Routing

    /// What a call needs routing by: its shard (nil: any node), whether it
    /// writes (its success proves the node is the primary), whether repeating
    /// it after a lost connection is harmless, and statuses that send it on to
    /// the next node at once.
    struct Call {
        var shard: UInt64?
        var writes = false
        var idempotent = true
        var nextNodeOn: Set<StatusCode> = []
    }

    /// Something a later attempt may overcome (after a backoff).
    private struct Retryable: Error { let error: Error }
    /// A stream that failed after some items went out: not retried.
    private struct StreamBroken: Error { let error: Error }

    private func perform<T>(_ call: Call, _ body: (ShardFSClient) async throws -> T) async throws -> T {
        let clock = ContinuousClock()
        let deadline = clock.now + options.deadline
        var backoff = options.initialBackoff
        while true {
            do {
                return try await attempt(call, body)
            } catch let retryable as Retryable {
                let pause = backoff * Double.random(in: 0.5...1.0)
                guard clock.now + pause < deadline else { throw retryable.error }
                try await Task.sleep(for: pause)
                backoff = min(backoff * 2, options.maxBackoff)
            }
        }
    }

    /// One attempt: find the node, send, follow redirects.
    private func attempt<T>(_ call: Call, _ body: (ShardFSClient) async throws -> T) async throws -> T {
        var target: Endpoint?
        if let shard = call.shard {
            target = table.primary(shard)
            if target == nil { target = try await locatePrimary(shard) }
        }
        var provenPrimary = target != nil
        var candidates = table.rotation(nodes)
        var redirects = 0
        var lastError: Error = ClientError.invalidArgument("no node to try")
        while true {
            // A known primary, else the nodes in turn.
            let endpoint: Endpoint
            if let target {
                endpoint = target
            } else if !candidates.isEmpty {
                endpoint = candidates.removeFirst()
            } else {
                throw Retryable(error: lastError)
            }
            let client: ShardFSClient
            do {
                client = try await table.connection(endpoint, token: token, tls: tls, timeout: options.connectTimeout, group: group)
            } catch {
                // Nothing was sent.
                table.failed(endpoint, nodes: nodes)
                if target == nil { lastError = error; continue }
                throw Retryable(error: error)
            }
            do {
                let result = try await body(client)
                table.succeeded(endpoint, nodes: nodes)
                if let shard = call.shard, provenPrimary || call.writes { table.setPrimary(shard, endpoint) }
                return result
            } catch ClientError.notShardLeader(let status, let leader) {
                if let shard = call.shard { table.forgetPrimary(shard) }
                let error = ClientError.notShardLeader(status, leader: leader)
                if !leader.isEmpty, redirects < options.maxRedirects, let next = try? Endpoint.tcp(leader) {
                    redirects += 1
                    target = next
                    provenPrimary = true
                    continue
                }
                lastError = error
                // No address: another node may know more, else ask again later.
                if target == nil && !candidates.isEmpty && leader.isEmpty { continue }
                throw Retryable(error: error)
            } catch let error as ClientError where error.serverStatus.map({ call.nextNodeOn.contains($0.code) }) == true {
                lastError = error
                if target == nil && !candidates.isEmpty { continue }
                throw Retryable(error: error)
            } catch ClientError.connectionClosed(let why) {
                await table.drop(client)
                table.failed(endpoint, nodes: nodes)
                guard call.idempotent else {
                    throw ClientError.connectionClosed(why + " — the request may or may not have been applied; not retried")
                }
                throw Retryable(error: ClientError.connectionClosed(why))
            }
        }
    }

    /// The endpoint of `shard`'s primary as the first node that answers Locate
    /// says, or nil if it names none with an address (the call then tries the
    /// nodes in turn). SHARD_NOT_FOUND is final.
    private func locatePrimary(_ shard: UInt64) async throws -> Endpoint? {
        var lastError: Error = ClientError.invalidArgument("no node to ask")
        for endpoint in table.rotation(nodes) {
            let client: ShardFSClient
            do {
                client = try await table.connection(endpoint, token: token, tls: tls, timeout: options.connectTimeout, group: group)
            } catch {
                table.failed(endpoint, nodes: nodes)
                lastError = error
                continue
            }
            let location: ShardLocation
            do {
                location = try await client.locate(shard)
            } catch ClientError.connectionClosed(let why) {
                await table.drop(client)
                table.failed(endpoint, nodes: nodes)
                lastError = ClientError.connectionClosed(why)
                continue
            } catch let error as ClientError where error.serverStatus?.code == .shardNotFound {
                throw error
            } catch {
                return nil  // e.g. the metadata store is unavailable there: try the nodes themselves
            }
            table.succeeded(endpoint, nodes: nodes)
            table.learn(node: location.answeredBy, at: endpoint)
            let primary = location.primary
            if primary.nodeID.isEmpty { return nil }
            if primary.nodeID == location.answeredBy { return endpoint }
            if let known = table.endpoint(ofNode: primary.nodeID) { return known }
            return primary.address.isEmpty ? nil : try? Endpoint.tcp(primary.address)
        }
        throw Retryable(error: lastError)
    }
}

/// The cluster's shared state: connections, shard → primary, node ID →
/// endpoint, and which node to try first. Short critical sections only.
final class RoutingTable: @unchecked Sendable {
    private let lock = NSLock()
    private var connections: [Endpoint: Task<ShardFSClient, Error>] = [:]
    private var primaries: [UInt64: Endpoint] = [:]
    private var nodeEndpoints: [String: Endpoint] = [:]
    private var preferred = 0

    /// The connection to `endpoint`, made on first use (one per endpoint, even
    /// when several calls ask at once) and again once it has closed.
    func connection(_ endpoint: Endpoint, token: String, tls: ClientTLS?, timeout: Duration, group: EventLoopGroup) async throws -> ShardFSClient {
        for _ in 0..<2 {
            let task = lock.withLock {
                if let task = connections[endpoint] { return task }
                let task = Task { try await ShardFSClient.connect(to: endpoint, token: token, tls: tls, connectTimeout: timeout, group: group) }
                connections[endpoint] = task
                return task
            }
            let client: ShardFSClient
            do { client = try await task.value } catch {
                lock.withLock { if connections[endpoint] == task { connections[endpoint] = nil } }
                throw error
            }
            if client.isActive { return client }
            lock.withLock { if connections[endpoint] == task { connections[endpoint] = nil } }
            await client.close()
        }
        throw ClientError.connectionClosed("the connection to \(endpoint) closed as soon as it was made")
    }

    /// Forgets a connection that failed (if it is still the one kept).
    func drop(_ client: ShardFSClient) async {
        let endpoint = client.endpoint
        let kept = lock.withLock { connections[endpoint] }
        if let kept, let keptClient = try? await kept.value, keptClient === client {
            lock.withLock { if connections[endpoint] == kept { connections[endpoint] = nil } }
        }
        await client.close()
    }

    func removeAllConnections() async -> [ShardFSClient] {
        let tasks = lock.withLock {
            defer { connections = [:] }
            return Array(connections.values)
        }
        var clients: [ShardFSClient] = []
        for task in tasks { if let client = try? await task.value { clients.append(client) } }
        return clients
    }

    func primary(_ shard: UInt64) -> Endpoint? { lock.withLock { primaries[shard] } }
    func setPrimary(_ shard: UInt64, _ endpoint: Endpoint) { lock.withLock { primaries[shard] = endpoint } }
    func forgetPrimary(_ shard: UInt64) { lock.withLock { _ = primaries.removeValue(forKey: shard) } }

    func learn(node: String, at endpoint: Endpoint) {
        guard !node.isEmpty else { return }
        lock.withLock { nodeEndpoints[node] = endpoint }
    }

    func endpoint(ofNode node: String) -> Endpoint? { lock.withLock { nodeEndpoints[node] } }

    /// `nodes` starting with the one that answered last.
    func rotation(_ nodes: [Endpoint]) -> [Endpoint] {
        let start = lock.withLock { preferred } % nodes.count
        return Array(nodes[start...] + nodes[..<start])
    }

    func succeeded(_ endpoint: Endpoint, nodes: [Endpoint]) {
        guard let i = nodes.firstIndex(of: endpoint) else { return }
        lock.withLock { preferred = i }
    }

    /// `endpoint` could not be used: no shard is routed there until it is learnt
    /// again, and the next node becomes the first to try.
    func failed(_ endpoint: Endpoint, nodes: [Endpoint]) {
        lock.withLock {
            primaries = primaries.filter { $0.value != endpoint }
            nodeEndpoints = nodeEndpoints.filter { $0.value != endpoint }
            if let i = nodes.firstIndex(of: endpoint), i == preferred % nodes.count { preferred = (i + 1) % nodes.count }
        }
    }
}
