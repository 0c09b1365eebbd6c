import BatchProtocol
import Foundation
import ShardFSClient
import Testing
import TestSupport

/// Two `shardfs serve` processes sharing one etcd: redirects, Locate, and
/// clients (Swift, Python, the CLI) that follow the primary or go round a dead node.
@Suite(.serialized) struct RoutingTests {
    struct Node {
        let id: String
        let process: ServeProcess
        /// "host:port" from the ready line: what the node registered.
        let address: String
        var endpoint: Endpoint { try! Endpoint.tcp(address) }
    }

    static func serve(_ dir: TemporaryDirectory, _ id: String, _ etcd: LocalEtcd, namespace: String) async throws -> Node {
        let process = try await ServeProcess.start([
            "--data-dir", dir.sub(id), "--node-id", id, "--metadata-type", "etcd", "--metadata-endpoints", etcd.endpoint,
            "--metadata-namespace", namespace, "--listen", "127.0.0.1:0", "--log-level", "error",
        ])
        guard let tcp = process.readyLine.split(whereSeparator: \.isWhitespace).first(where: { $0.hasPrefix("tcp=") }) else {
            process.stop()
            throw ClientError.invalidArgument("no tcp= in \(process.readyLine)")
        }
        return Node(id: id, process: process, address: String(tcp.dropFirst(4)))
    }

    /// Runs `body` with node-a and node-b serving, stopping both (and etcd) whatever happens.
    func withTwoNodes(_ body: (Node, Node, TemporaryDirectory) async throws -> Void) async throws {
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let dir = try TemporaryDirectory("routing")
            let namespace = "/routing-\(UUID().uuidString.prefix(8))"
            let a = try await Self.serve(dir, "node-a", etcd, namespace: namespace)
            defer { a.process.kill9() }
            let b = try await Self.serve(dir, "node-b", etcd, namespace: namespace)
            defer { b.process.kill9() }
            try await body(a, b, dir)
        } }
    }

    /// The leader address of the NOT_SHARD_LEADER `body` throws; nil if it throws anything else or nothing.
    func redirect(_ body: () async throws -> Void) async -> String? {
        do { try await body() } catch ClientError.notShardLeader(_, let leader) { return leader } catch {}
        return nil
    }

    var shardfs: String { productsDirectory().appendingPathComponent("shardfs").path }
    var pythonDirectory: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("clients/python").path
    }
    var python: String { pythonDirectory + "/check_routing.py" }
    var fakeNode: String { pythonDirectory + "/fake_node.py" }

    @Test func aNodeRedirectsToThePrimaryAndClientsFollow() async throws {
        try await withTwoNodes { a, b, _ in
            let toA = try await ShardFSClient.connect(to: a.endpoint)
            let toB = try await ShardFSClient.connect(to: b.endpoint)
            defer { Task { await toA.close(); await toB.close() } }
            let shard = try await toA.newShard(owner: "r")
            try await toA.put(client: "r", shard: shard, key: Array("k".utf8), value: Array("v".utf8))

            // B does not hold the shard: writes and reads are sent to A's registered address.
            #expect(await redirect { try await toB.put(client: "r", shard: shard, key: Array("x".utf8), value: []) } == a.address)
            #expect(await redirect { _ = try await toB.get(shard: shard, key: Array("k".utf8)) } == a.address)
            #expect(await redirect { _ = try await toB.batchPut(client: "r", shard: shard, items: [PutItem(key: [0x61], value: [])]) }
                        == a.address)
            #expect(await redirect { _ = try await toB.batchGetAll(shard: shard, keys: [Array("k".utf8)]) } == a.address)

            // Locate from either node names A.
            for (client, answering) in [(toA, "node-a"), (toB, "node-b")] {
                let location = try await client.locate(shard)
                #expect(location.primary == NodeLocation(nodeID: "node-a", address: a.address))
                #expect(location.shard == shard && !location.closed && location.epoch >= 1 && !location.volumeID.isEmpty)
                #expect(location.backups.isEmpty && location.answeredBy == answering)
            }
            do {
                _ = try await toB.locate(1 << 62)
                Issue.record("Locate of a shard that does not exist succeeded")
            } catch ClientError.status(let s) {
                #expect(s.code == .shardNotFound)
            }

            // A routing client given only B reaches the shard on A.
            let viaB = try ShardFSCluster(nodes: [b.endpoint], options: quick(10))
            defer { Task { await viaB.close() } }
            #expect(try await viaB.get(shard: shard, key: Array("k".utf8)).value == Array("v".utf8))
            #expect(viaB.knownPrimary(of: shard) == a.endpoint)
            try await viaB.put(client: "r", shard: shard, key: Array("k2".utf8), value: Array("v2".utf8))
            #expect(try await toA.get(shard: shard, key: Array("k2".utf8)).value == Array("v2".utf8))
            let statuses = try await viaB.batchPut(client: "r", shard: shard,
                                                   items: (0..<50).map { PutItem(key: Array("b\($0)".utf8), value: [UInt8($0)]) })
            #expect(statuses.count == 50 && statuses.allSatisfy(\.isOK))
            var streamed = 0
            for try await item in viaB.batchGet(shard: shard, keys: (0..<50).map { Array("b\($0)".utf8) }) {
                #expect(item.entry?.value == [UInt8(item.position)])
                streamed += 1
            }
            #expect(streamed == 50)
            #expect(try await viaB.list(shard: shard).rows.count == 52)
            #expect(try await viaB.stat(shard).figures?.entries == 52)
            // A new shard through B is made on B, and its requests stay there.
            let onB = try await viaB.newShard(owner: "r")
            #expect(viaB.knownPrimary(of: onB) == b.endpoint)
            try await viaB.put(client: "r", shard: onB, key: [0x31], value: [1])
            #expect(try await toB.get(shard: onB, key: [0x31]).value == [1])

            // Reached by its Unix socket, A is recognised as the primary (Locate says who answered).
            let socketA = try ShardFSCluster(nodes: [.unix(path: try #require(a.process.unixSocket))], options: quick(10))
            defer { Task { await socketA.close() } }
            #expect(try await socketA.get(shard: shard, key: Array("k2".utf8)).value == Array("v2".utf8))
            #expect(socketA.knownPrimary(of: shard) == .unix(path: try #require(a.process.unixSocket)))

            // The CLI, given B only (or B then A), and the Python client.
            let put = try await runAsync(shardfs, ["client", "put", "--node", b.address, String(shard), "cli", "--value", "from-cli",
                                                   "--client", "r"])
            #expect(put.status == 0, "\(put.stderr)")
            let get = try await runAsync(shardfs, ["client", "get", "--node", "\(b.address),\(a.address)", String(shard), "cli"])
            #expect(get.status == 0 && get.stdout == "from-cli", "\(get.stdout)\(get.stderr)")
            let locate = try await runAsync(shardfs, ["client", "locate", "--node", b.address, String(shard)])
            #expect(locate.stdout.contains("primary node-a \(a.address)\n"), "\(locate.stdout)\(locate.stderr)")
            let py = try await runAsync("/usr/bin/env", ["python3", python, "--other", b.address, "--primary", a.address,
                                                         "--primary-node", "node-a", "--shard", String(shard), "--owner", "r"])
            #expect(py.status == 0 && py.stdout.contains("python routing check passed"), "\(py.stdout)\(py.stderr)")

            // Lifecycle requests are redirected too.
            #expect(await redirect { try await toB.closeShard(client: "r", shard: shard) } == a.address)
            try await viaB.closeShard(client: "r", shard: shard)
            #expect(try await toA.locate(shard).closed)
        }
    }

    @Test func aClientWhoseFirstNodeIsDeadReachesTheOtherWithinTheDeadline() async throws {
        try await withTwoNodes { a, b, _ in
            let toA = try await ShardFSClient.connect(to: a.endpoint)
            let onA = try await toA.newShard(owner: "d")
            await toA.close()
            a.process.kill9()

            let clock = ContinuousClock()
            let started = clock.now
            let cluster = try ShardFSCluster(nodes: [a.endpoint, b.endpoint], options: quick(10))
            defer { Task { await cluster.close() } }
            let shard = try await cluster.newShard(owner: "d")
            try await cluster.put(client: "d", shard: shard, key: [0x6B], value: [7])
            #expect(try await cluster.get(shard: shard, key: [0x6B]).value == [7])
            #expect(clock.now - started < .seconds(10))
            #expect(cluster.knownPrimary(of: shard) == b.endpoint)

            // A shard whose primary is dead cannot be written: the call gives up at its deadline, not before, not much after.
            let short = try ShardFSCluster(nodes: [a.endpoint, b.endpoint], options: quick(2))
            defer { Task { await short.close() } }
            let tried = clock.now
            do {
                try await short.put(client: "d", shard: onA, key: [0x6B], value: [1])
                Issue.record("a write to a dead primary succeeded")
            } catch ClientError.unreachable(let endpoint, _) {
                #expect(endpoint == a.endpoint)
            } catch ClientError.notShardLeader {
                // Also fine: A's registration lapsed meanwhile and nobody knows its primary.
            }
            let waited = clock.now - tried
            #expect(waited >= .seconds(1) && waited < .seconds(8), "\(waited)")

            // The CLI and the Python client with the dead node first.
            let made = try await runAsync(shardfs, ["client", "new-shard", "--node", "\(a.address),\(b.address)", "--client", "cli-d",
                                                    "--deadline", "10"])
            #expect(made.status == 0 && UInt64(made.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) != nil,
                    "\(made.stdout)\(made.stderr)")
            let py = try await runAsync("/usr/bin/env", ["python3", python, "--other", b.address, "--primary", a.address,
                                                         "--primary-node", "node-a", "--shard", String(onA), "--owner", "d",
                                                         "--dead", a.address, "--skip-live"])
            #expect(py.status == 0 && py.stdout.contains("python routing check passed"), "\(py.stdout)\(py.stderr)")
        }
    }

    /// Against a node that hangs up on every request (clients/python/fake_node.py):
    /// what is harmless to repeat is sent again until the deadline, the rest once.
    @Test func onlyRequestsHarmlessToRepeatAreRetriedAfterABrokenConnection() async throws {
        let dir = try TemporaryDirectory("retries")
        let log = dir.sub("sent.log")
        let fake = Process()
        fake.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        fake.arguments = ["python3", fakeNode, log]
        let line = try runReadingFirstLine(fake)
        defer {
            if fake.isRunning { kill(fake.processIdentifier, SIGKILL) }
            fake.waitUntilExit()
        }
        let port = try #require(line.flatMap { Int($0.dropFirst("ready ".count).trimmingCharacters(in: .whitespacesAndNewlines)) },
                                "\(line ?? "no line")")
        func sent(_ op: Opcode) -> Int {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").filter { $0 == String(format: "%02x", op.rawValue) }.count
        }
        var options = RoutingOptions()
        options.deadline = .seconds(3)  // room for a second try on a loaded machine
        let cluster = try ShardFSCluster(nodes: [.tcp(host: "127.0.0.1", port: port)], options: options)
        defer { Task { await cluster.close() } }
        let calls: [(Opcode, Bool, () async throws -> Void)] = [
            (.put, true, { try await cluster.put(client: "o", shard: 1, key: [0x6B], value: [1]) }),
            (.batchPut, true, { _ = try await cluster.batchPut(client: "o", shard: 1, items: [PutItem(key: [0x6B], value: [1])]) }),
            (.get, true, { _ = try await cluster.get(shard: 1, key: [0x6B]) }),
            (.closeShard, true, { try await cluster.closeShard(client: "o", shard: 1) }),
            (.delete, false, { try await cluster.delete(client: "o", shard: 1, key: [0x6B]) }),
            (.deleteShard, false, { try await cluster.deleteShard(client: "o", shard: 1) }),
            (.newShard, false, { _ = try await cluster.newShard(owner: "o") }),
        ]
        for (op, retried, call) in calls {
            do {
                try await call()
                Issue.record("\(op) succeeded against a node that hangs up")
            } catch ClientError.connectionClosed(let why) {
                #expect(why.contains("not retried") == !retried, "\(op): \(why)")
            }
            if retried { #expect(sent(op) >= 2, "\(op) was sent \(sent(op)) times") } else { #expect(sent(op) == 1, "\(op) was sent \(sent(op)) times") }
        }
        let py = try await runAsync("/usr/bin/env", ["python3", pythonDirectory + "/check_retries.py", "--node", "127.0.0.1:\(port)",
                                                     "--log", log])
        #expect(py.status == 0 && py.stdout.contains("python retry check passed"), "\(py.stdout)\(py.stderr)")
    }

    func quick(_ seconds: Int) -> RoutingOptions {
        var options = RoutingOptions()
        options.deadline = .seconds(seconds)
        return options
    }
}
