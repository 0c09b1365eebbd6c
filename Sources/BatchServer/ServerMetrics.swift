import BatchProtocol
import Metrics
import NIOConcurrencyHelpers

/// The socket service's metrics, through swift-metrics (the executable picks the
/// backend; without one they cost a no-op call). Handles are made once per label
/// set and kept: making one asks the backend's registry, under its lock.
/// Labels are bounded: opcode (16 values) × status code (about 25).
enum ServerMetrics {
    static let bytesIn = Counter(label: "shardfs_socket_received_bytes_total")
    static let bytesOut = Counter(label: "shardfs_socket_sent_bytes_total")
    static let connections = Gauge(label: "shardfs_socket_connections")
    static let refusedAtLimit = Counter(label: "shardfs_socket_connections_refused_total", dimensions: [("reason", "limit")])
    static let evictedInHandshake = Counter(label: "shardfs_socket_connections_refused_total", dimensions: [("reason", "handshake_share")])

    private static let lock = NIOLock()
    nonisolated(unsafe) private static var requests: [UInt32: Counter] = [:]
    nonisolated(unsafe) private static var timers: [Opcode: Metrics.Timer] = [:]

    /// One request answered, `nanoseconds` after it arrived.
    static func finished(_ opcode: Opcode, _ code: StatusCode, nanoseconds: Int64) {
        let key = UInt32(opcode.rawValue) << 16 | UInt32(code.rawValue)
        let (counter, timer) = lock.withLock { () -> (Counter, Metrics.Timer) in
            let counter = requests[key] ?? {
                let made = Counter(label: "shardfs_requests_total",
                                   dimensions: [("opcode", "\(opcode)"), ("status", "\(code)")])
                requests[key] = made
                return made
            }()
            let timer = timers[opcode] ?? {
                let made = Metrics.Timer(label: "shardfs_request_duration_seconds", dimensions: [("opcode", "\(opcode)")])
                timers[opcode] = made
                return made
            }()
            return (counter, timer)
        }
        counter.increment()
        timer.recordNanoseconds(nanoseconds)
    }
}
