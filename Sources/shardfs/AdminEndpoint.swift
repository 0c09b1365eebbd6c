import BatchProtocol
import Foundation
import Glibc
import Logging
import Metrics
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import ShardFUSE
import ShardNode

/// The process's one metrics backend: Prometheus, bootstrapped once (swift-metrics
/// allows one bootstrap per process). Before it, the layers' metrics are no-ops.
enum MetricsBackend {
    nonisolated(unsafe) private static var done = false
    private static let lock = NSLock()
    static let registry = PrometheusCollectorRegistry()

    /// The metrics as Prometheus text, the mount's request counts brought up to date first.
    static func emit() -> [UInt8] {
        FuseMetrics.publishRequestCounts()
        return registry.emitToBuffer() + Array(FuseMetrics.requestDurationText().utf8)
    }

    static func bootstrap() {
        lock.withLock {
            guard !done else { return }
            done = true
            var factory = PrometheusMetricsFactory(registry: registry)
            // Socket requests take from tens of µs (a read) to seconds (a commit behind a full log).
            factory.durationHistogramBuckets["shardfs_request_duration_seconds"] = [
                .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
                .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
                .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5),
            ]
            // A shard's commit: a few hundred µs (one fdatasync) to seconds (a large apply).
            factory.durationHistogramBuckets["shardfs_commit_duration_seconds"] = [
                .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5),
                .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
                .milliseconds(500), .seconds(1), .seconds(5),
            ]
            factory.durationHistogramBuckets["shardfs_etcd_request_duration_seconds"] = [
                .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
                .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1),
                .seconds(2), .seconds(5), .seconds(10),
            ]
            MetricsSystem.bootstrap(factory)
        }
    }
}

/// The node's admin listener: plain HTTP/1.1 with `GET /metrics` (Prometheus text
/// format) and `GET /status` (JSON, what `shardfs status` shows), on the admin
/// socket `<data_dir>/shardfs-admin.sock` (mode 0600: root or the node's user) and,
/// when `server.metrics_address` is set, on that TCP address. No authentication:
/// keep the TCP address on loopback or a private network.
final class AdminEndpoint: Sendable {
    let group: MultiThreadedEventLoopGroup
    let channels: [Channel]
    /// The TCP port bound, if any (port 0 in the configuration picks one).
    let tcpPort: Int?
    let socketPath: String

    static func socketPath(dataDir: String) -> String { dataDir + "/shardfs-admin.sock" }

    private init(group: MultiThreadedEventLoopGroup, channels: [Channel], tcpPort: Int?, socketPath: String) {
        self.group = group
        self.channels = channels
        self.tcpPort = tcpPort
        self.socketPath = socketPath
    }

    static func start(node: StorageNode, tcpAddress: String?) async throws -> AdminEndpoint {
        MetricsBackend.bootstrap()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(node: node))
                }
            }
        var channels: [Channel] = []
        var port: Int?
        let path = socketPath(dataDir: node.configuration.node.dataDir)
        do {
            unlink(path)  // a socket left by a process that died (the data folder lock says none runs)
            do {
                let unix = try await bootstrap.bind(unixDomainSocketPath: path).get()
                chmod(path, 0o600)
                channels.append(unix)
            } catch {
                // A data folder path too long for a Unix socket must not keep the node from serving.
                Logger(label: "shardfs.admin").warning("no admin socket: `shardfs status` needs --address",
                                                       metadata: ["path": "\(path)", "error": "\(error)"])
            }
            if let tcpAddress, !tcpAddress.isEmpty {
                guard let (host, p) = splitHostPort(tcpAddress, allowingPortZero: true) else {
                    throw CommandFailure("server.metrics_address \"\(tcpAddress)\" is not host:port")
                }
                do {
                    let tcp = try await bootstrap.bind(host: host, port: p).get()
                    port = tcp.localAddress?.port
                    channels.append(tcp)
                } catch {
                    throw CommandFailure("cannot listen for metrics on \(tcpAddress): \(error) — is the port taken? (server.metrics_address, --metrics)")
                }
            }
        } catch {
            for channel in channels { try? await channel.close() }
            try? await group.shutdownGracefully()
            throw error
        }
        return AdminEndpoint(group: group, channels: channels, tcpPort: port, socketPath: path)
    }

    func stop() async {
        for channel in channels { try? await channel.close() }
        try? await group.shutdownGracefully()
        unlink(socketPath)
    }
}

private final class AdminHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let node: StorageNode
    private var head: HTTPRequestHead?

    init(node: StorageNode) { self.node = node }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let path = String(head.uri.split(separator: "?", maxSplits: 1).first ?? "")
            let keepAlive = head.isKeepAlive
            let version = head.version
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            let node = self.node
            guard head.method == .GET, path == "/metrics" || path == "/status" else {
                respond(context, version: version, keepAlive: keepAlive, status: .notFound, type: "text/plain",
                        body: Array("GET /metrics or /status\n".utf8))
                return
            }
            // The status reads metadata and LMDB: never on the event loop.
            Task {
                var status: HTTPResponseStatus = .ok
                var type = "text/plain; version=0.0.4; charset=utf-8"
                var body: [UInt8]
                do {
                    let taken = try await node.status()
                    if path == "/status" {
                        let encoder = JSONEncoder()
                        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                        encoder.dateEncodingStrategy = .iso8601
                        body = Array(try encoder.encode(taken)) + [0x0A]
                        type = "application/json"
                    } else {
                        body = MetricsBackend.emit()
                    }
                } catch {
                    // The metrics still answer (the layers' counters do not need the metadata).
                    if path == "/metrics" {
                        body = MetricsBackend.emit()
                    } else {
                        status = .serviceUnavailable
                        body = Array("cannot take the node's status: \(error)\n".utf8)
                    }
                }
                let (response, finalBody, finalType) = (status, body, type)
                loop.execute {
                    let (handler, context) = bound.value
                    handler.respond(context, version: version, keepAlive: keepAlive, status: response, type: finalType, body: finalBody)
                }
            }
        }
    }

    private func respond(_ context: ChannelHandlerContext, version: HTTPVersion, keepAlive: Bool,
                         status: HTTPResponseStatus, type: String, body: [UInt8]) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: type)
        headers.add(name: "Content-Length", value: "\(body.count)")
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: status, headers: headers))), promise: nil)
        var buffer = context.channel.allocator.buffer(capacity: body.count)
        buffer.writeBytes(body)
        context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if !keepAlive { channel.close(promise: nil) }
        }
    }
}
