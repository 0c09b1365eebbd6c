import BatchProtocol
import NIOCore

/// How the socket service listens and the limits it holds to.
public struct BatchServerConfiguration: Sendable {
    /// "host:port" for TCP; nil for no TCP listener. Port 0 picks a free port.
    public var tcpAddress: String? = "127.0.0.1:7070"
    /// The Unix socket's path; nil for none. Created with mode 0660.
    public var unixSocketPath: String?
    /// The shared token clients must present. Required when TCP listens beyond loopback;
    /// when set, asked of every TCP client (never of Unix socket clients).
    public var token: String?
    /// TLS on the TCP listener; nil: plain TCP (fine on loopback).
    public var tls: ServerTLS?
    public var maxFrameLength = ProtocolConstants.defaultMaxFrameLength
    public var maxInFlightPerConnection = 64
    /// Connections served at once, over both listeners; more are refused with
    /// TOO_MANY_CONNECTIONS. Each connection is a file descriptor, and so are each
    /// open shard's two LMDB files: 1,024 matches the soft open-files limit a Linux
    /// service usually starts with (`ulimit -n`). `start` raises the soft limit
    /// toward the hard one to fit this plus `reservedDescriptors`, and logs when it cannot.
    public var maxConnections = 1024
    /// File descriptors kept for everything but connections (shards, metadata, logs).
    public var reservedDescriptors = 1024
    /// Of `maxConnections`, how many each listener may hold before their handshake
    /// (a quarter): when that share is full a new connection closes the listener's
    /// oldest unauthenticated one, so slow or silent clients never keep out
    /// authenticated ones, nor clients of the other listener.
    public var unauthenticatedShare: Int { max(1, maxConnections / 4) }
    /// From accepting a connection to its Hello accepted.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// From a frame's first byte to its last (while the server reads): a 16 MiB
    /// frame needs about 0.6 MB/s.
    public var frameTimeout: TimeAmount = .seconds(30)
    /// Nothing in flight and nothing read for this long closes the connection.
    public var idleTimeout: TimeAmount = .seconds(300)
    /// Past this many unsent bytes a connection stops reading and streaming.
    public var outboundHighWater = 1 << 20
    public var outboundLowWater = 256 << 10
    /// Engine threads (LMDB calls never run on an event loop).
    public var engineThreads = 4
    public var eventLoopThreads = 1
    /// The answers one engine job gathers stop short of this many bytes (one
    /// answer alone may be larger): the reads past it run in jobs of their own.
    public var answerBudget = 1 << 30
    /// The largest value a Get or BatchGet item answers with; past it,
    /// INVALID_ARGUMENT (the protocol's own limit: `ProtocolConstants.maxValueLength`).
    public var largestValue = ProtocolConstants.maxValueLength
    /// How long a graceful shutdown waits for in-flight requests.
    public var drainTimeout: TimeAmount = .seconds(30)
    /// Where shards are served (Locate, and the address a NOT_SHARD_LEADER answer
    /// carries); nil: `MetadataShardLocator` over the node's metadata.
    public var locator: (any ShardLocator)?

    public init() {}

    func limits(tokenRequired: Bool) -> ConnectionLimits {
        var limits = ConnectionLimits()
        limits.maxFrameLength = maxFrameLength
        limits.maxInFlight = maxInFlightPerConnection
        limits.handshakeTimeout = handshakeTimeout
        limits.frameTimeout = frameTimeout
        limits.idleTimeout = idleTimeout
        limits.requiredToken = tokenRequired ? (token ?? "") : nil
        return limits
    }
}

public struct BatchServerError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// "host:port" (IPv6 as "[::1]:port") into its parts; port 0 picks a free port.
func parseAddress(_ address: String) throws -> (host: String, port: Int) {
    guard let parts = splitHostPort(address, allowingPortZero: true) else {
        throw BatchServerError("server address \"\(address)\" is not host:port")
    }
    return parts
}

func isLoopback(_ host: String) -> Bool {
    host == "localhost" || host == "::1" || host.hasPrefix("127.")
}
