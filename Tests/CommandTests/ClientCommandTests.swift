import Foundation
import ShardFSClient
import TestSupport
import Testing

/// `shardfs client …` against a running `shardfs serve` (Unix socket only).
@Suite(.onOwnThreads) struct ClientCommandTests {
    @Test func everyClientCommandAgainstARunningNode() async throws {
        let dir = try TemporaryDirectory("client")
        let data = dir.sub("data")
        let server = try ServeProcess(["--data-dir", data, "--no-tcp", "--log-level", "warning"])
        defer { server.stop() }
        let socket = ["--socket", data + "/shardfs.sock"]
        func client(_ arguments: [String], input: String = "") async throws -> ProcessResult {
            try await runAsync(shardfs, ["client"] + arguments + socket, input: input)
        }
        func ok(_ arguments: [String], input: String = "", sourceLocation: SourceLocation = #_sourceLocation) async throws -> String {
            let result = try await client(arguments, input: input)
            #expect(result.status == 0, "\(arguments): \(result.stderr)", sourceLocation: sourceLocation)
            return result.stdout
        }

        let id = try await ok(["new-shard", "--client", "alice"]).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(id == "1")
        #expect(try await ok(["new-shard", "--client", "alice", "--id", "7"]) == "7\n")
        _ = try await ok(["put", id, "k1", "--value", "one", "--client", "alice"])
        _ = try await ok(["put", id, "k2", "--client", "alice"], input: "two from stdin")
        #expect(try await ok(["get", id, "k2"]) == "two from stdin")
        #expect(try await ok(["batch-put", id, "--client", "alice"], input: "a\tA\nb\tB\n") == "2 put, 0 failed\n")
        let got = try await client(["batch-get", id, "a", "missing", "k1"])
        #expect(got.status == 1)  // one key is missing
        #expect(got.stdout == "a\tA\nmissing\t!ENTRY_NOT_FOUND\nk1\tone\n")
        _ = try await ok(["delete", id, "b", "--client", "alice"])
        #expect(try await ok(["ls", id]) == "1\ta\n3\tk1\n14\tk2\n")
        // Another client may not write alice's shard.
        let fenced = try await client(["put", id, "x", "--value", "no", "--client", "bob"])
        #expect(fenced.status != 0)
        let stat = try await ok(["stat", id])
        #expect(stat.contains("owner alice") && stat.contains("state open") && stat.contains("entries 3"), "\(stat)")
        _ = try await ok(["close-shard", id, "--client", "alice"])
        #expect(try await client(["put", id, "z", "--value", "late", "--client", "alice"]).status != 0)
        #expect(try await ok(["list-shards"]) == "1\talice\tclosed\t3\n7\talice\topen\t0\n")
        let json = try await ok(["list-shards", "--json"])
        let rows = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]], "\(json)")
        #expect(rows.map { $0["id"] as? Int } == [1, 7] && rows[0]["state"] as? String == "closed" && rows[0]["entries"] as? Int == 3, "\(json)")
        let statJSON = try await ok(["stat", "7", "--json"])
        #expect((try JSONSerialization.jsonObject(with: Data(statJSON.utf8)) as? [String: Any])?["state"] as? String == "open", "\(statJSON)")
        _ = try await ok(["delete-shard", "7", "--client", "alice"])
        #expect(try await ok(["list-shards"]) == "1\talice\tclosed\t3\n")
        #expect(try await client(["get", "7", "k1"]).status != 0)
    }
}

/// `shardfs serve` with TLS on TCP, and `shardfs client` speaking it.
@Suite(.onOwnThreads) struct TLSCommandTests {
    @Test func serveAndClientSpeakTLS() async throws {
        let pki = try await TestPKI.make()
        let dir = try TemporaryDirectory("client-tls")
        let data = dir.sub("data")
        let server = try await ServeProcess.start(["--data-dir", data, "--listen", "127.0.0.1:0", "--tls-cert", pki.serverCert,
                                                   "--tls-key", pki.serverKey, "--tls-client-ca", pki.ca, "--log-level", "warning"])
        defer { _ = server.stop() }
        let tcp = try #require(server.readyLine.split(whereSeparator: \.isWhitespace).first { $0.hasPrefix("tcp=") }?.dropFirst(4))
        let mutual = ["--address", String(tcp), "--tls-ca", pki.ca, "--tls-cert", pki.clientCert, "--tls-key", pki.clientKey]
        let made = try await runAsync(shardfs, ["client", "new-shard", "--client", "alice"] + mutual)
        #expect(made.status == 0, "\(made.stderr)")
        let id = made.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try await runAsync(shardfs, ["client", "put", id, "k", "--value", "tls", "--client", "alice"] + mutual).status == 0)
        #expect(try await runAsync(shardfs, ["client", "get", id, "k"] + mutual).stdout == "tls")
        // Without a client certificate the node refuses, and the error says TLS.
        let refused = try await runAsync(shardfs, ["client", "get", id, "k", "--address", String(tcp), "--tls-ca", pki.ca])
        #expect(refused.status != 0 && refused.stderr.contains("TLS"), "\(refused.stderr)")
        // Half a client identity is a usage error; so is half a server one.
        let half = try await runAsync(shardfs, ["client", "get", id, "k", "--address", String(tcp), "--tls-cert", pki.clientCert])
        #expect(half.status != 0 && half.stderr.contains("--tls-key"), "\(half.stderr)")
        let serveHalf = try await runAsync(shardfs, ["serve", "--data-dir", dir.sub("other"), "--listen", "127.0.0.1:0",
                                                     "--tls-cert", pki.serverCert])
        #expect(serveHalf.status != 0 && serveHalf.stderr.contains("--tls-key"), "\(serveHalf.stderr)")
    }

    /// A node that dies (kill -9) ends its TLS connections without TLS's goodbye:
    /// the client's calls fail as closed connections, which a cluster retries
    /// elsewhere, not as TLS errors, which it would not.
    @Test func aNodeThatDiesClosesItsTLSConnections() async throws {
        let pki = try await TestPKI.make()
        let dir = try TemporaryDirectory("client-tls-kill")
        // A long handshake deadline: with the whole suite running, a debug build's
        // TLS handshake has taken longer than the default 10 s.
        let config = dir.sub("config.yaml")
        try "server:\n  handshake_timeout_ms: 60000\n".write(toFile: config, atomically: true, encoding: .utf8)
        let server = try await ServeProcess.start(["--data-dir", dir.sub("data"), "--listen", "127.0.0.1:0", "--tls-cert", pki.serverCert,
                                                   "--tls-key", pki.serverKey, "--config", config, "--log-level", "warning"])
        defer { server.kill9() }
        let tcp = try #require(server.readyLine.split(whereSeparator: \.isWhitespace).first { $0.hasPrefix("tcp=") }?.dropFirst(4))
        let client = try await ShardFSClient.connect(to: try Endpoint.tcp(String(tcp)), tls: ClientTLS(trustedCAFile: pki.ca))
        let shard = try await client.newShard(owner: "c")
        server.kill9()
        do {
            _ = try await client.get(shard: shard, key: Array("k".utf8))
            Issue.record("a call to a dead node succeeded")
        } catch let error as ClientError {
            if case .connectionClosed = error {} else { Issue.record("expected a closed connection, got \(error)") }
        }
        await client.close()
    }
}
