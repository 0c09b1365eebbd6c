import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One node process per data folder: an exclusive `flock` on `<data>/node.lock`,
/// held for the node's life and dropped by the kernel if the process dies (even
/// by `kill -9`). Without it, a second process restoring the folder could roll
/// back a shard the first is in the middle of creating.
final class DataFolderLock: Sendable {
    let path: String
    private let fd: Int32

    /// Waits up to `timeout` for the lock; `waiting` is told at once (with the
    /// holder's pid) when it must wait.
    init(folder: String, timeout: Duration, waiting: (String) -> Void = { _ in }) throws {
        path = folder + "/node.lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw ConfigurationError("cannot open \(path): \(String(cString: strerror(errno)))")
        }
        let deadline = ContinuousClock.now + timeout
        var told = false
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            guard errno == EWOULDBLOCK || errno == EINTR, ContinuousClock.now < deadline else {
                close(fd)
                throw ConfigurationError("the data folder \(folder) is in use by another ShardFS process (pid \(holder))")
            }
            if !told {
                waiting(holder)
                told = true
            }
            usleep(10_000)
        }
        ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { pwrite(fd, $0, strlen($0), 0) }
        self.fd = fd
    }

    deinit { close(fd) }
}
