import BatchProtocol
import BatchServer
import Foundation
import ShardFSClient
import ShardNode
import TestSupport
import Testing

/// The batch service over TLS: the Swift client, the Python client, mutual TLS,
/// the token over TLS, and what a client that does not speak it, or does not
/// trust the node, gets.
@Suite struct TLSTests {
    func tls(_ pki: TestPKI, client: Bool = false) -> ClientTLS {
        ClientTLS(trustedCAFile: pki.ca, certificateFile: client ? pki.clientCert : nil, privateKeyFile: client ? pki.clientKey : nil)
    }

    @Test func aClientThatTrustsTheNodesCASpeaksTLS() async throws {
        let pki = try await TestPKI.make()
        try await withServer({ $0.tls = ServerTLS(certificateFile: pki.serverCert, privateKeyFile: pki.serverKey) }) { fixture in
            let client = try await ShardFSClient.connect(to: fixture.tcp, tls: tls(pki))
            let shard = try await client.newShard(owner: "c")
            try await client.put(client: "c", shard: shard, key: Array("k".utf8), value: Array("over tls".utf8))
            #expect(try await client.get(shard: shard, key: Array("k".utf8)).value == Array("over tls".utf8))
            await client.close()

            // By name as well as by address: the certificate carries both.
            let byName = try await ShardFSClient.connect(to: .tcp(host: "localhost", port: fixture.server.tcpPort!), tls: tls(pki))
            #expect(try await byName.get(shard: shard, key: Array("k".utf8)).value == Array("over tls".utf8))
            await byName.close()

            // A client that trusts another CA refuses the node; one that speaks
            // plain TCP gets no answer it can read; the Unix socket stays plain.
            var other = tls(pki)
            other.trustedCAFile = pki.otherCA
            await #expect(throws: ClientError.self) { _ = try await ShardFSClient.connect(to: fixture.tcp, tls: other) }
            do {
                _ = try await ShardFSClient.connect(to: fixture.tcp, tls: other)
            } catch let error as ClientError {
                guard case .tls = error else { Issue.record("expected a TLS error, got \(error)"); return }
            }
            await #expect(throws: (any Error).self) {
                _ = try await ShardFSClient.connect(to: fixture.tcp, connectTimeout: .seconds(5))
            }
            let plain = try await fixture.client()
            #expect(try await plain.get(shard: shard, key: Array("k".utf8)).value == Array("over tls".utf8))
            await plain.close()
        }
    }

    @Test func mutualTLSAdmitsOnlyClientsTheCASigned() async throws {
        let pki = try await TestPKI.make()
        try await withServer({
            $0.tcpAddress = "0.0.0.0:0"  // beyond loopback: client certificates stand in for a token
            $0.tls = ServerTLS(certificateFile: pki.serverCert, privateKeyFile: pki.serverKey, clientCAFile: pki.ca)
        }) { fixture in
            let client = try await ShardFSClient.connect(to: fixture.tcp, tls: tls(pki, client: true))
            #expect(try await client.newShard(owner: "c") > 0)
            await client.close()
            // No certificate, or one another CA signed: refused.
            await #expect(throws: ClientError.self) { _ = try await ShardFSClient.connect(to: fixture.tcp, tls: tls(pki)) }
            var stranger = tls(pki)
            stranger.certificateFile = pki.otherClientCert
            stranger.privateKeyFile = pki.otherClientKey
            await #expect(throws: ClientError.self) { _ = try await ShardFSClient.connect(to: fixture.tcp, tls: stranger) }
        }
    }

    /// A TLS connection past the limit is refused in TLS: the client reads why
    /// (TOO_MANY_CONNECTIONS), and a connection is admitted again once one closes.
    /// (Under load the node's answer and close could beat the client's setup,
    /// which then reported a failed handshake: the client keeps its handler now.)
    @Test func aConnectionPastTheLimitIsRefusedOverTLS() async throws {
        let pki = try await TestPKI.make()
        try await withServer({
            $0.maxConnections = 2
            $0.tls = ServerTLS(certificateFile: pki.serverCert, privateKeyFile: pki.serverKey)
        }) { fixture in
            let first = try await ShardFSClient.connect(to: fixture.tcp, tls: tls(pki))
            let second = try await ShardFSClient.connect(to: fixture.tcp, tls: tls(pki))
            #expect(try await second.listShards().isEmpty)
            do {
                let third = try await ShardFSClient.connect(to: fixture.tcp, tls: tls(pki))
                _ = try await third.listShards()
                Issue.record("a third connection was served past a limit of two")
            } catch ClientError.connectionClosed(let why) {
                #expect(why.contains("TOO_MANY_CONNECTIONS"), "\(why)")
            }
            await first.close()
            var admitted = false
            for _ in 0..<100 where !admitted {
                do {
                    let again = try await ShardFSClient.connect(to: fixture.tcp, tls: tls(pki))
                    admitted = try await again.listShards().isEmpty
                    await again.close()
                } catch ClientError.connectionClosed(let why) where why.contains("TOO_MANY_CONNECTIONS") {
                    try await Task.sleep(for: .milliseconds(50))  // the close reaches the server asynchronously
                }
            }
            #expect(admitted)
            await second.close()
        }
    }

    @Test func theTokenIsStillAskedForOverTLS() async throws {
        let pki = try await TestPKI.make()
        try await withServer({
            $0.token = "secret"
            $0.tls = ServerTLS(certificateFile: pki.serverCert, privateKeyFile: pki.serverKey)
        }) { fixture in
            await #expect(throws: ClientError.self) { _ = try await ShardFSClient.connect(to: fixture.tcp, token: "wrong", tls: tls(pki)) }
            let client = try await ShardFSClient.connect(to: fixture.tcp, token: "secret", tls: tls(pki))
            #expect(try await client.newShard(owner: "c") > 0)
            await client.close()
        }
    }

    @Test func aMissingOrWrongFileIsNamedAtStart() async throws {
        let pki = try await TestPKI.make()
        var config = BatchServerConfiguration()
        config.tcpAddress = "127.0.0.1:0"
        config.tls = ServerTLS(certificateFile: pki.dir.sub("missing.pem"), privateKeyFile: pki.serverKey)
        let dir = try TemporaryDirectory("tls-bad")
        var node = Configuration()
        node.node.dataDir = dir.sub("data")
        let storage = try await StorageNode.start(node)
        await #expect { _ = try await BatchServer.start(config, shards: storage.shards) } throws: { error in
            "\(error)".contains("missing.pem")
        }
        config.tls = ServerTLS(certificateFile: pki.serverCert, privateKeyFile: pki.ca)  // a certificate is no key
        await #expect { _ = try await BatchServer.start(config, shards: storage.shards) } throws: { error in
            "\(error)".contains(pki.ca)
        }
    }

    @Test func thePythonClientSpeaksTLS() async throws {
        let pki = try await TestPKI.make()
        try await withServer({
            $0.tls = ServerTLS(certificateFile: pki.serverCert, privateKeyFile: pki.serverKey, clientCAFile: pki.ca)
        }) { fixture in
            let clients = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent("clients/python").path
            let script = """
                import sys; sys.path.insert(0, '\(clients)')
                from shardfs_client import Client, tls_context
                c = Client(host='127.0.0.1', port=\(fixture.server.tcpPort!),
                           tls=tls_context('\(pki.ca)', '\(pki.clientCert)', '\(pki.clientKey)'))
                s = c.new_shard('py')
                c.put('py', s, b'k', b'python over tls')
                print(c.get(s, b'k')['value'].decode())
                try:
                    Client(host='127.0.0.1', port=\(fixture.server.tcpPort!), tls=tls_context('\(pki.ca)'))
                    print('admitted without a certificate')
                except Exception as e:
                    print('refused')
                """
            let result = try await shell("python3 -c \"$SCRIPT\"", environment: ["SCRIPT": script])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.stdout == "python over tls\nrefused\n", "\(result.stdout) \(result.stderr)")
        }
    }
}
