import BatchProtocol

/// Where a node's batch service listens.
public enum Endpoint: Sendable, Hashable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    /// "host:port" (IPv6 as "[::1]:port").
    public static func tcp(_ address: String) throws -> Endpoint {
        guard let (host, port) = splitHostPort(address) else {
            throw ClientError.invalidArgument("\"\(address)\" is not host:port")
        }
        return .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case .tcp(let host, let port): return "\(host):\(port)"
        case .unix(let path): return path
        }
    }
}

/// Why a call failed.
public enum ClientError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The server answered with this status.
    case status(Status)
    /// The server is not the shard's primary (NOT_SHARD_LEADER); `leader` is the
    /// primary's "host:port" as the server knows it, empty if unknown.
    case notShardLeader(Status, leader: String)
    /// Nothing accepted the connection there (no node running, a wrong path or port).
    case unreachable(Endpoint, String)
    /// The connection closed (or the server sent a connection error) before the answer.
    case connectionClosed(String)
    case invalidArgument(String)
    /// The server sent something this client does not understand.
    case protocolViolation(String)
    /// TLS could not be set up (a certificate or key file) or its handshake failed.
    case tls(String)

    public var description: String {
        switch self {
        case .status(let s): return s.description
        case .notShardLeader(let s, let leader): return s.description + (leader.isEmpty ? "" : " (the primary is at \(leader))")
        case .unreachable(let endpoint, let why): return "cannot connect to \(endpoint): \(why)"
        case .connectionClosed(let why): return "connection closed: \(why)"
        case .invalidArgument(let why): return "invalid argument: \(why)"
        case .protocolViolation(let why): return "protocol violation: \(why)"
        case .tls(let why): return "TLS: \(why)"
        }
    }

    /// The error for a non-OK answer and what followed its status.
    static func answer(_ status: Status, _ payload: ResponsePayload) -> ClientError {
        guard status.code == .notShardLeader else { return .status(status) }
        if case .leader(let address) = payload { return .notShardLeader(status, leader: address) }
        return .notShardLeader(status, leader: "")
    }

    /// The server's status, for both `status` and `notShardLeader`.
    public var serverStatus: Status? {
        switch self {
        case .status(let s), .notShardLeader(let s, _): return s
        default: return nil
        }
    }
}
