import Foundation
import TestSupport
import Testing

/// A real etcd on free loopback ports, for tests of several nodes.
final class EtcdProcess: @unchecked Sendable {
    let dir: TemporaryDirectory
    let process = Process()
    let endpoint: String

    init() async throws {
        dir = try TemporaryDirectory("etcd")
        let ports = try await shell("""
            python3 -c 'import socket
            s=[socket.socket() for _ in range(2)]
            [x.bind(("127.0.0.1", 0)) for x in s]
            print(" ".join(str(x.getsockname()[1]) for x in s))'
            """).stdout.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        guard ports.count == 2 else { throw FixtureError("no free ports") }
        endpoint = "http://127.0.0.1:\(ports[0])"
        let peer = "http://127.0.0.1:\(ports[1])"
        process.executableURL = URL(fileURLWithPath: "/usr/bin/etcd")
        process.arguments = ["--name", "test", "--data-dir", dir.sub("data"), "--listen-client-urls", endpoint,
                             "--advertise-client-urls", endpoint, "--listen-peer-urls", peer,
                             "--initial-advertise-peer-urls", peer, "--initial-cluster", "test=\(peer)", "--log-level", "error"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        for _ in 0..<200 {
            if try await shell("curl -sf \(endpoint)/health").status == 0 { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        stop()
        throw FixtureError("etcd did not start")
    }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        process.waitUntilExit()
    }
}

@Suite struct TwoMountTests {
    /// Two nodes on one machine, each with its own data folder, one etcd: each
    /// mount refuses `mkdir shard-N` for an N the other node holds.
    @Test func mkdirOfAShardTheOtherNodeHoldsIsEEXIST() async throws {
        let etcd = try await EtcdProcess()
        defer { etcd.stop() }
        let a = try MountFixture(options: "client_id=a"), b = try MountFixture(options: "client_id=b")
        do {
            for (fixture, node) in [(a, "node-a"), (b, "node-b")] {
                let yaml = fixture.dir.sub("node.yaml")
                try "node:\n  node_id: \(node)\nmetadata:\n  type: etcd\n  endpoints: [\(etcd.endpoint)]\n  namespace: /two-mounts\n"
                    .write(toFile: yaml, atomically: true, encoding: .utf8)
                try await fixture.mount("config=\(yaml)")
            }
            try await a.ok("mkdir shard-5 && echo from-a > shard-5/f")
            #expect(try await b.errnoOf("os.mkdir('shard-5')") == "EEXIST")
            #expect(try await b.errnoOf("os.mkdir('shard-3')") == "EEXIST")  // below the shared high-water mark
            try await b.ok("mkdir shard-6")
            #expect(try await a.errnoOf("os.mkdir('shard-6')") == "EEXIST")
            // Each mount shows the shards on its own volumes.
            #expect(try await a.ok("ls") == "shard-5\n")
            #expect(try await b.ok("ls") == "shard-6\n")
            // Both nodes' shards are in the shared listing, with the node holding each.
            await a.unmount()
            let listing = try await runAsync(shardfs, ["shard", "list", "--data-dir", a.data, "--config", a.dir.sub("node.yaml"),
                                                       "--log-level", "error"])
            #expect(listing.stdout.contains("node-a") && listing.stdout.contains("node-b"), "\(listing.stdout)\(listing.stderr)")
        } catch {
            await a.unmount()
            await b.unmount()
            throw error
        }
        await a.unmount()
        await b.unmount()
    }
}
