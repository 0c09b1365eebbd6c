import CFuseRing

/// The FUSE requests the bridge is handed, by kind: each one is a round trip
/// between the caller and the daemon. The kernel's opcode numbers (fuse_kernel.h,
/// which libfuse 3.14 does not install). `scripts/bench-fs` reads the counts
/// through `user.shardfs.requests` on the mount's root, before and after each
/// workload, to report round trips per operation.
enum FuseRequest: UInt32, CaseIterable, Sendable {
    case lookup = 1, forget = 2, getattr = 3, setattr = 4, symlink = 6, mknod = 8, mkdir = 9, unlink = 10,
         rmdir = 11, rename = 12, link = 13, open = 14, read = 15, write = 16, statfs = 17, release = 18,
         fsync = 20, setxattr = 21, getxattr = 22, listxattr = 23, removexattr = 24, flush = 25, opendir = 27,
         readdir = 28, releasedir = 29, fsyncdir = 30, access = 34, create = 35, batchForget = 42, readdirplus = 44

    var name: String { "\(self)" }

    @inline(__always)
    func count() { shardfs_count_request(rawValue) }

    var total: UInt64 { shardfs_requests_of(rawValue) }

    /// "name count" per line, for every kind asked at least once.
    static func report() -> String {
        allCases.compactMap { kind in kind.total == 0 ? nil : "\(kind.name) \(kind.total)\n" }.joined()
    }
}
