import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `SHARDFS_EXIT_WITH_PID=<pid>`: once that process is gone, this one stops as on
/// SIGTERM (a clean stop: it unmounts and detaches what it holds). The tests set
/// it to their own process, so a test run that crashes leaves no daemons, mounts
/// or loop devices behind, whatever shells stand between. A thread of its own,
/// looking twice a second.
enum ProcessWatch {
    static func startIfAsked() {
        guard let text = ProcessInfo.processInfo.environment["SHARDFS_EXIT_WITH_PID"],
              let watched = pid_t(text), watched > 1 else { return }
        let thread = Thread {
            Thread.current.name = "shardfs-watch"  // named from inside: set before `start()` it does not reach Linux
            while kill(watched, 0) == 0 || errno == EPERM { usleep(500_000) }
            kill(getpid(), SIGTERM)
        }
        thread.start()
    }
}
