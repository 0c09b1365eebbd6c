import CFuseRing
import Foundation
import Metrics

/// The mount's metrics (swift-metrics; the executable picks the backend):
/// - `shardfs_fuse_requests_total{operation}`: the requests the daemon was handed.
///   Every callback already bumps a C counter (`FuseRequest.count`, one atomic
///   add, for `user.shardfs.requests`); `publishRequestCounts` copies them into
///   swift-metrics when the metrics are read, so a request costs nothing more.
/// - `shardfs_fuse_errors_total{operation,errno}`: those answered with an error.
///   The operation is the bridge function's name (`opLookup(_:_:_:)` → `lookup`),
///   so no callback needs a line of its own.
/// The labels are bounded: about 30 operations, the errno values ShardFS answers.
public enum FuseMetrics {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var counters: [String: Counter] = [:]
    nonisolated(unsafe) private static var requestCounters: [UInt32: (counter: Counter, published: UInt64)] = [:]

    /// `shardfs_fuse_request_duration_seconds{operation}` as Prometheus text: how long
    /// the daemon took from a request's callback to its reply, counted in C per
    /// request (two clock reads and two relaxed adds; `shardfs_request_answered`)
    /// and rendered here when the metrics are read. Empty before any request.
    public static func requestDurationText() -> String {
        let name = "shardfs_fuse_request_duration_seconds"
        var text = ""
        for kind in FuseRequest.allCases {
            let counts = (0..<Int(SHARDFS_LATENCY_BUCKETS)).map { shardfs_latency_count(kind.rawValue, UInt32($0)) }
            let total = counts.reduce(0, +)
            guard total > 0 else { continue }
            if text.isEmpty { text = "# TYPE \(name) histogram\n" }
            let label = "operation=\"\(kind.name.lowercased())\""
            var cumulative: UInt64 = 0
            for (bucket, count) in counts.enumerated() {
                cumulative += count
                let bound = shardfs_latency_bound_ns(UInt32(bucket))
                let le = bound == UInt64.max ? "+Inf" : "\(Double(bound) / 1e9)"
                text += "\(name)_bucket{\(label),le=\"\(le)\"} \(cumulative)\n"
            }
            text += "\(name)_sum{\(label)} \(Double(shardfs_latency_sum_ns(kind.rawValue)) / 1e9)\n"
            text += "\(name)_count{\(label)} \(total)\n"
        }
        return text
    }

    /// Brings `shardfs_fuse_requests_total` up to the C counters (call before the metrics are read).
    public static func publishRequestCounts() {
        lock.withLock {
            for kind in FuseRequest.allCases {
                let total = kind.total
                let known = requestCounters[kind.rawValue]
                guard total > (known?.published ?? 0) else { continue }
                let counter = known?.counter ?? Counter(label: "shardfs_fuse_requests_total", dimensions: [("operation", kind.name.lowercased())])
                counter.increment(by: Int64(total - (known?.published ?? 0)))
                requestCounters[kind.rawValue] = (counter, total)
            }
        }
    }

    static func failed(_ function: StaticString, errno code: Int32) {
        let name = "\(function)"
        let key = "\(name)|\(code)"
        let counter = lock.withLock { () -> Counter in
            if let known = counters[key] { return known }
            var operation = name.prefix { $0 != "(" }
            if operation.hasPrefix("op") { operation = operation.dropFirst(2) }
            let made = Counter(label: "shardfs_fuse_errors_total",
                               dimensions: [("operation", operation.lowercased()), ("errno", errnoName(code))])
            counters[key] = made
            return made
        }
        counter.increment()
    }

    private static func errnoName(_ code: Int32) -> String {
        let names: [Int32: String] = [EPERM: "EPERM", ENOENT: "ENOENT", EIO: "EIO", EBADF: "EBADF", EACCES: "EACCES",
                                      EEXIST: "EEXIST", EXDEV: "EXDEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR",
                                      EINVAL: "EINVAL", EFBIG: "EFBIG", ENOSPC: "ENOSPC", EROFS: "EROFS",
                                      ENAMETOOLONG: "ENAMETOOLONG", ENOTEMPTY: "ENOTEMPTY", ENODATA: "ENODATA",
                                      ENOTSUP: "ENOTSUP", ERANGE: "ERANGE", ENOSYS: "ENOSYS", EAGAIN: "EAGAIN"]
        return names[code] ?? "\(code)"
    }
}
