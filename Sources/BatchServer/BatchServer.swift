import BatchProtocol
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ShardNode

/// The batch socket service: TCP and Unix socket listeners in front of one
/// node's shard manager.
public final class BatchServer: Sendable {
    public let configuration: BatchServerConfiguration
    /// The bound TCP port (useful when configured with port 0).
    public let tcpPort: Int?
    public let unixSocketPath: String?

    private let group: MultiThreadedEventLoopGroup
    private let pool: NIOThreadPool
    private let listeners: [Channel]
    private let connections: ConnectionRegistry
    private let logger: Logger

    private init(configuration: BatchServerConfiguration, group: MultiThreadedEventLoopGroup, pool: NIOThreadPool,
                 listeners: [Channel], connections: ConnectionRegistry, tcpPort: Int?, logger: Logger) {
        self.configuration = configuration
        self.group = group
        self.pool = pool
        self.listeners = listeners
        self.connections = connections
        self.tcpPort = tcpPort
        self.unixSocketPath = configuration.unixSocketPath
        self.logger = logger
    }

    /// Binds the listeners and starts serving `shards`.
    public static func start(_ configuration: BatchServerConfiguration, shards: ShardManager,
                             logger: Logger = Logger(label: "shardfs.batch")) async throws -> BatchServer {
        var tcp: (host: String, port: Int)?
        if let address = configuration.tcpAddress {
            tcp = try parseAddress(address)
            if !isLoopback(tcp!.host) && (configuration.token ?? "").isEmpty && configuration.tls?.clientCAFile == nil {
                throw BatchServerError("TCP on \(address) is beyond loopback: a token (server.token) or client certificates "
                                       + "(server.tls.client_ca) are required")
            }
        }
        guard tcp != nil || configuration.unixSocketPath != nil else {
            throw BatchServerError("neither a TCP address nor a Unix socket is configured")
        }
        let tls = try tcp == nil ? nil : configuration.tls?.makeContext()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.eventLoopThreads)
        let pool = NIOThreadPool(numberOfThreads: configuration.engineThreads)
        pool.start()
        let locator = configuration.locator ?? MetadataShardLocator(metadata: shards.metadata, nodeID: shards.nodeID)
        let executor = RequestExecutor(shards: shards, locator: locator, answerBudget: configuration.answerBudget,
                                       largestValue: configuration.largestValue)
        let connections = ConnectionRegistry(limit: configuration.maxConnections, share: configuration.unauthenticatedShare)
        raiseDescriptorLimit(configuration, logger)
        var listeners: [Channel] = []
        do {
            var port: Int?
            if let tcp {
                let tokenRequired = !(configuration.token ?? "").isEmpty
                let channel: Channel
                do {
                    channel = try await bootstrap(group, configuration, executor, pool, connections, .tcp,
                                                  configuration.limits(tokenRequired: tokenRequired), tls: tls)
                        .bind(host: tcp.host, port: tcp.port).get()
                } catch let error as IOError where error.errnoCode == EADDRINUSE {
                    throw BatchServerError("\(tcp.host):\(tcp.port) is taken by another process — choose another with --listen "
                                           + "(server.address), or stop what listens there")
                } catch let error as IOError {
                    throw BatchServerError("cannot listen on \(tcp.host):\(tcp.port): \(String(cString: strerror(error.errnoCode)))")
                }
                listeners.append(channel)
                port = channel.localAddress?.port
                logger.info("batch service listening", metadata: ["tcp": "\(tcp.host):\(port ?? tcp.port)"])
            }
            if let path = configuration.unixSocketPath {
                listeners.append(try await bindUnix(path, bootstrap(group, configuration, executor, pool, connections, .unix,
                                                                    configuration.limits(tokenRequired: false))))
                logger.info("batch service listening", metadata: ["unix": "\(path)"])
            }
            return BatchServer(configuration: configuration, group: group, pool: pool, listeners: listeners,
                               connections: connections, tcpPort: port, logger: logger)
        } catch {
            for listener in listeners { try? await listener.close() }
            try? await pool.shutdownGracefully()
            try? await group.shutdownGracefully()
            throw error
        }
    }

    /// Binds under a temporary name, sets mode 0660, then renames into place, so
    /// the socket is never reachable with looser permissions.
    private static func bindUnix(_ path: String, _ bootstrap: ServerBootstrap) async throws -> Channel {
        let staging = path + ".\(getpid()).binding"
        unlink(staging)
        let channel = try await bootstrap.bind(unixDomainSocketPath: staging).get()
        guard chmod(staging, 0o660) == 0, rename(staging, path) == 0 else {
            let reason = String(cString: strerror(errno))
            try? await channel.close()
            unlink(staging)
            throw BatchServerError("cannot create the Unix socket \(path): \(reason)")
        }
        return channel
    }

    private static func bootstrap(_ group: MultiThreadedEventLoopGroup, _ config: BatchServerConfiguration,
                                  _ executor: RequestExecutor, _ pool: NIOThreadPool, _ connections: ConnectionRegistry,
                                  _ kind: ListenerKind, _ limits: ConnectionLimits, tls: NIOSSLContext? = nil) -> ServerBootstrap {
        ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: true)
            .childChannelOption(.writeBufferWaterMark,
                                value: .init(low: config.outboundLowWater, high: config.outboundHighWater))
            .childChannelInitializer { channel in
                guard connections.admit(channel, kind) else {
                    return channel.eventLoop.makeCompletedFuture {
                        // Over TLS too, so the client reads why.
                        if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                        try channel.pipeline.syncOperations.addHandler(
                            RejectHandler(Status(.tooManyConnections, "the server is at its limit of \(config.maxConnections) connections"),
                                          deadline: config.handshakeTimeout))
                    }
                }
                return channel.eventLoop.makeCompletedFuture {
                    // The handshake counts against the connection's handshake deadline
                    // (ConnectionHandler's clock starts when the TCP connection does).
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                    try channel.pipeline.syncOperations.addHandler(
                        ConnectionHandler(limits: limits, executor: executor, pool: pool, registry: connections))
                }
            }
    }

    /// Stops accepting, lets every connection answer what it has read, then stops the threads.
    public func shutdown() async {
        for listener in listeners { try? await listener.close() }
        if let path = unixSocketPath { unlink(path) }
        let open = connections.all()
        for channel in open { channel.pipeline.fireUserInboundEventTriggered(DrainEvent()) }
        let deadline = ContinuousClock.now + .nanoseconds(configuration.drainTimeout.nanoseconds)
        for channel in open {
            while channel.isActive && ContinuousClock.now < deadline {
                try? await Task.sleep(for: .milliseconds(5))
            }
            if channel.isActive { try? await channel.close() }
        }
        try? await pool.shutdownGracefully()
        try? await group.shutdownGracefully()
        logger.info("batch service stopped")
    }

}

/// Which listener a connection came through: each has its own share of
/// unauthenticated connections.
enum ListenerKind: Sendable { case tcp, unix }

/// Asks a connection still in its handshake to close: a newer one needs its place.
struct EvictEvent: Sendable {}

/// The open connections, for the connection limit and for shutdown.
///
/// At most `limit` connections are counted at once, and at most `share` of each
/// listener's before their handshake. A connection that would exceed either takes
/// the place of its listener's oldest unauthenticated connection, which is sent
/// an `EvictEvent` (and is no longer counted); with none to take, it is refused.
/// So clients that never finish a handshake cost at most `share` connections per
/// listener and cannot keep anyone out for long: each newcomer pushes the oldest out.
final class ConnectionRegistry: @unchecked Sendable {
    private let limit: Int
    private let share: Int
    private let lock = NSLock()
    private var channels: [ObjectIdentifier: Channel] = [:]
    /// Counted connections (admitted, neither closed nor evicted).
    private var counted = 0
    /// Each listener's unauthenticated connections, oldest first.
    private var pending: [ListenerKind: [ObjectIdentifier]] = [.tcp: [], .unix: []]
    private var evicted: Set<ObjectIdentifier> = []

    init(limit: Int, share: Int) {
        self.limit = limit
        self.share = min(share, limit)
    }

    /// Registers `channel` (making room as above) or refuses it; it leaves the registry when it closes.
    func admit(_ channel: Channel, _ kind: ListenerKind) -> Bool {
        let id = ObjectIdentifier(channel)
        let outcome = lock.withLock { () -> (admitted: Bool, victim: Channel?) in
            var victim: ObjectIdentifier?
            if pending[kind]!.count >= share || counted >= limit {
                guard !pending[kind]!.isEmpty else { return (false, nil) }
                victim = pending[kind]!.removeFirst()
                evicted.insert(victim!)
                counted -= 1
            }
            channels[id] = channel
            pending[kind]!.append(id)
            counted += 1
            return (true, victim.flatMap { channels[$0] })
        }
        guard outcome.admitted else {
            ServerMetrics.refusedAtLimit.increment()
            return false
        }
        if outcome.victim != nil { ServerMetrics.evictedInHandshake.increment() }
        ServerMetrics.connections.record(lock.withLock { channels.count })
        channel.closeFuture.whenComplete { _ in
            let open = self.lock.withLock {
                self.channels.removeValue(forKey: id)
                if self.evicted.remove(id) == nil { self.counted -= 1 }
                self.pending[kind]!.removeAll { $0 == id }
                return self.channels.count
            }
            ServerMetrics.connections.record(open)
        }
        outcome.victim?.pipeline.fireUserInboundEventTriggered(EvictEvent())
        return true
    }

    /// `channel` finished its handshake: it no longer counts against its listener's share.
    func authenticated(_ channel: Channel) {
        let id = ObjectIdentifier(channel)
        lock.withLock {
            for kind in [ListenerKind.tcp, .unix] { pending[kind]!.removeAll { $0 == id } }
        }
    }

    func all() -> [Channel] { lock.withLock { Array(channels.values) } }
    var count: Int { lock.withLock { counted } }
}

/// Raises the soft open-files limit toward the hard one when connections plus the
/// descriptors kept for shards do not fit; logs when even the hard limit is short.
func raiseDescriptorLimit(_ config: BatchServerConfiguration, _ logger: Logger) {
    var limits = rlimit()
    guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limits) == 0 else { return }
    let wanted = rlim_t(config.maxConnections + config.reservedDescriptors)
    guard limits.rlim_cur < wanted else { return }
    let raised = min(wanted, limits.rlim_max)
    var new = limits
    new.rlim_cur = raised
    if raised > limits.rlim_cur && setrlimit(Int32(RLIMIT_NOFILE.rawValue), &new) == 0 { limits.rlim_cur = raised }
    if limits.rlim_cur < wanted {
        logger.warning("the open-files limit is too low for server.max_connections: connections may fail with EMFILE",
                       metadata: ["max_connections": "\(config.maxConnections)", "open files limit": "\(limits.rlim_cur)",
                                  "wanted": "\(wanted)"])
    }
}
