import ArgumentParser
import BatchProtocol
import BatchServer
import Dispatch
import Foundation
import Metadata
import NodeSupport
import ShardFUSE
import ShardNode

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run a node with the batch socket service until SIGTERM or SIGINT.",
        discussion: """
            Listens on TCP (server.address, default 127.0.0.1:7070) and on a Unix socket \
            (server.unix_socket, default <data_dir>/shardfs.sock, mode 0660). TCP beyond \
            loopback requires a token (--token or SHARDFS_SERVER_TOKEN). With --mount, the \
            node's shards are also mounted there (as `shardfs mount` does). Prints one \
            "ready" line with the bound addresses once it serves.
            """)
    @OptionGroup var node: NodeOptions
    @OptionGroup var service: ServiceOptions
    @Option(name: .long, help: "Also mount the node's shards on this empty directory.") var mount: String?
    @Option(name: .customShort("o"), help: "Mount options for --mount (see `shardfs mount --help`).") var mountOptions: [String] = []
    @Option(name: .long, help: "host:port of the HTTP listener for /metrics and /status (server.metrics_address; port 0 picks one).")
    var metrics: String?

    func run() async throws {
        let signals = TerminationSignals()
        ProcessWatch.startIfAsked()
        let running = try await ServeCommand.startNode(node, service)
        let admin: AdminEndpoint
        do {
            admin = try await AdminEndpoint.start(node: running.node, tcpAddress: metrics ?? running.node.configuration.server.metricsAddress)
        } catch {
            await running.server.shutdown()
            await running.node.stop()
            throw error
        }
        var fuse: (session: FuseSession, done: Task<Int32, Never>)?
        if let mount {
            var options = MountOptions()
            for list in mountOptions { try options.apply(list) }
            let session = try FuseSession(fileSystem: ShardFileSystem(node: running.node, options: options),
                                          mountpoint: mount, handleSignals: false)
            fuse = (session, Task.detached { await runOnOwnThread { session.run() } })
        }
        let where_ = "tcp=\(running.server.tcpPort.map { "\(running.tcpHost):\($0)" } ?? "-") unix=\(running.server.unixSocketPath ?? "-") mount=\(mount ?? "-") metrics=\(admin.tcpPort.map { "\(Self.host(metrics ?? running.node.configuration.server.metricsAddress)):\($0)" } ?? "-")"
        emit("ready " + where_)
        ServiceManagerNotify.ready(status: "serving " + where_)  // systemd Type=notify
        // A mount that ends on its own (its FUSE connection failed) ends the node
        // too, with an error, so that a supervisor restarts it.
        let signalled = await signals.wait(orEndOf: fuse?.done)
        ServiceManagerNotify.stopping()
        await admin.stop()
        await running.server.shutdown()
        if let fuse {
            if signalled { fuse.session.stop() }
            _ = await fuse.done.value
        }
        fuse = nil  // the mount's file system lets go of the shards it held
        await running.node.stop()
        if !signalled { throw MountError(description: "the mount at \(mount ?? "") ended on its own; see the log") }
    }

    static func host(_ address: String) -> String { String(address[..<(address.lastIndex(of: ":") ?? address.endIndex)]) }

    struct Running {
        let node: StorageNode
        let server: BatchServer
        let tcpHost: String
    }

    /// The node and the socket service `serve` starts (the mount, if any, is added by `run`).
    static func startNode(_ node: NodeOptions, _ service: ServiceOptions) async throws -> Running {
        let storage = try await node.startNode(creatingDataFolder: true)
        let config = try service.serverConfiguration(storage.configuration)
        let server = try await BatchServer.start(config, shards: storage.shards)
        let host = config.tcpAddress.map { String($0[..<($0.lastIndex(of: ":") ?? $0.endIndex)]) } ?? ""
        // The node started registered with the configured address; clients sent
        // here by Locate or a redirect need the one it can be reached at.
        do {
            let address = try service.advertisedAddress(config, boundPort: server.tcpPort)
            try await storage.metadata.registerNode(NodeRecord(nodeID: storage.configuration.node.nodeID, address: address))
        } catch {
            await server.shutdown()
            throw error
        }
        return Running(node: storage, server: server, tcpHost: host)
    }
}

/// Options of the socket service.
struct ServiceOptions: ParsableArguments {
    @Option(name: .long, help: "TCP address host:port (server.address); port 0 picks one.") var listen: String?
    @Flag(name: .long, help: "Do not listen on TCP.") var noTcp = false
    @Option(name: .long, help: "Unix socket path (server.unix_socket; default <data_dir>/shardfs.sock).") var socket: String?
    @Option(name: .long, help: "Shared token TCP clients must present. Also SHARDFS_SERVER_TOKEN.") var token: String?
    @Option(name: .long, help: "TLS on TCP: the server's PEM certificate chain (server.tls.cert); needs --tls-key.") var tlsCert: String?
    @Option(name: .long, help: "TLS on TCP: the server's PEM private key (server.tls.key).") var tlsKey: String?
    @Option(name: .long, help: "TLS on TCP: require client certificates signed by this PEM CA (server.tls.client_ca; mutual TLS).") var tlsClientCa: String?
    @Option(name: .long, help: "Engine threads running LMDB calls.") var engineThreads = 4
    @Option(name: .long, help: "host:port other nodes' clients reach this node at (registered in the metadata; default: the TCP address, with the bound port, and this host's name for a wildcard address).")
    var advertise: String?

    /// What the node registers as its address: --advertise, else the TCP address
    /// it listens on with the port it bound; empty without TCP.
    func advertisedAddress(_ config: BatchServerConfiguration, boundPort: Int?) throws -> String {
        if let advertise {
            guard splitHostPort(advertise) != nil, !advertise.hasPrefix(":") else {
                throw ValidationError("--advertise \"\(advertise)\" is not host:port")
            }
            return advertise
        }
        guard let address = config.tcpAddress, let port = boundPort, let parts = splitHostPort(address, allowingPortZero: true) else {
            return ""
        }
        var host = parts.host
        if host == "0.0.0.0" || host == "::" { host = ProcessInfo.processInfo.hostName }
        return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    func serverConfiguration(_ node: Configuration) throws -> BatchServerConfiguration {
        var config = BatchServerConfiguration()
        config.tcpAddress = noTcp ? nil : (listen ?? node.server.address)
        config.unixSocketPath = socket ?? (node.server.unixSocket.isEmpty ? node.node.dataDir + "/shardfs.sock" : node.server.unixSocket)
        // --token, else server.token (from the file or SHARDFS_SERVER_TOKEN).
        config.token = [token, node.server.token].compactMap { $0 }.first { !$0.isEmpty }
        let cert = tlsCert ?? node.server.tlsCertificate, key = tlsKey ?? node.server.tlsKey
        let clientCA = tlsClientCa ?? node.server.tlsClientCA
        if cert.isEmpty != key.isEmpty {
            throw ValidationError("TLS needs both a certificate and its key (--tls-cert and --tls-key, or server.tls.cert and server.tls.key)")
        }
        if !cert.isEmpty {
            config.tls = ServerTLS(certificateFile: cert, privateKeyFile: key, clientCAFile: clientCA.isEmpty ? nil : clientCA)
        } else if !clientCA.isEmpty {
            throw ValidationError("client certificates (--tls-client-ca, server.tls.client_ca) need TLS: give --tls-cert and --tls-key too")
        }
        guard engineThreads > 0 else { throw ValidationError("--engine-threads must be positive") }
        config.engineThreads = engineThreads
        config.maxConnections = node.server.maxConnections
        config.frameTimeout = .milliseconds(Int64(node.server.frameTimeoutMs))
        config.handshakeTimeout = .milliseconds(Int64(node.server.handshakeTimeoutMs))
        return config
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made: before the service
/// says it is ready, so that a stop sent right after is not lost (the default
/// action would end the process with nothing committed or said).
final class TerminationSignals: @unchecked Sendable {
    private let stream: AsyncStream<Int32>
    private var sources: [DispatchSourceSignal] = []

    init() {
        let (stream, continuation) = AsyncStream<Int32>.makeStream()
        self.stream = stream
        self.continuation = continuation
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { continuation.yield(sig) }
            source.resume()
            sources.append(source)
        }
    }

    private let continuation: AsyncStream<Int32>.Continuation

    /// Waits for a signal; true if one came, false if `task` ended first.
    func wait(orEndOf task: Task<Int32, Never>? = nil) async -> Bool {
        if let task { Task { [continuation] in _ = await task.value; continuation.yield(0) } }
        var received: Int32 = 0
        for await sig in stream { received = sig; break }
        for source in sources { source.cancel() }
        return received != 0
    }
}
