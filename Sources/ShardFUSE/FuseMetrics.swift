import Foundation
import Metrics

/// FUSE operations that failed, by operation and errno (swift-metrics; the
/// executable picks the backend). The operation is the bridge function's name
/// (`opLookup(_:_:_:)` → `lookup`), so no callback needs a line of its own.
/// Both labels are bounded: about 30 operations, the errno values ShardFS answers.
enum FuseMetrics {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var counters: [String: Counter] = [:]

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
