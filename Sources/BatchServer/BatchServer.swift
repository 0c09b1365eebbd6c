import BatchProtocol
import Foundation
import Logging
import NIOCore
import NIOPosix
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
            if !isLoopback(tcp!.host) && (configuration.token ?? "").isEmpty {
                throw BatchServerError("TCP on \(address) is beyond loopback: a token (server.token) is required")
            }
        }
        guard tcp != nil || configuration.unixSocketPath != nil else {
            throw BatchServerError("neither a TCP address nor a Unix socket is configured")
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: configuration.eventLoopThreads)
        let pool = NIOThreadPool(numberOfThreads: configuration.engineThreads)
        pool.start()
        let locator = configuration.locator ?? MetadataShardLocator(metadata: shards.metadata, nodeID: shards.nodeID)
        let executor = RequestExecutor(shards: shards, locator: locator)
        let connections = ConnectionRegistry(limit: configuration.maxConnections)
        var listeners: [Channel] = []
        do {
            var port: Int?
            if let tcp {
                let tokenRequired = !(configuration.token ?? "").isEmpty
                let channel: Channel
                do {
                    channel = try await bootstrap(group, configuration, executor, pool, connections,
                                                  configuration.limits(tokenRequired: tokenRequired))
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
                listeners.append(try await bindUnix(path, bootstrap(group, configuration, executor, pool, connections,
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
                                  _ limits: ConnectionLimits) -> ServerBootstrap {
        ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: true)
            .childChannelOption(.writeBufferWaterMark,
                                value: .init(low: config.outboundLowWater, high: config.outboundHighWater))
            .childChannelInitializer { channel in
                guard connections.admit(channel) else {
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            RejectHandler(Status(.tooManyConnections, "the server is at its limit of \(config.maxConnections) connections")))
                    }
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([
                        IdleStateHandler(readTimeout: config.readTimeout),
                        ConnectionHandler(limits: limits, executor: executor, pool: pool),
                    ])
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

/// The open connections, for the connection limit and for shutdown.
final class ConnectionRegistry: @unchecked Sendable {
    private let limit: Int
    private let lock = NSLock()
    private var channels: [ObjectIdentifier: Channel] = [:]

    init(limit: Int) { self.limit = limit }

    /// Registers `channel` unless the limit is reached; it leaves the registry when it closes.
    func admit(_ channel: Channel) -> Bool {
        let admitted = lock.withLock { () -> Bool in
            guard channels.count < limit else { return false }
            channels[ObjectIdentifier(channel)] = channel
            return true
        }
        if admitted {
            channel.closeFuture.whenComplete { _ in
                self.lock.withLock { _ = self.channels.removeValue(forKey: ObjectIdentifier(channel)) }
            }
        }
        return admitted
    }

    func all() -> [Channel] { lock.withLock { Array(channels.values) } }
    var count: Int { lock.withLock { channels.count } }
}
