import Dispatch
import Foundation
import Glibc
import Logging

/// The daemonised mount writes its standard output and error (its log) to
/// `<data_dir>/shardfs-mount.log`. On SIGHUP it opens that path again and puts it
/// under both descriptors, so that logrotate can rename the file and signal the
/// daemon (`postrotate … kill -HUP`) without `copytruncate` and without losing lines.
/// `serve` writes to standard error only (journald under systemd): nothing to reopen.
enum LogFile {
    /// Set by `mount` for its daemon: the log file's path.
    static let variable = "SHARDFS_LOG_FILE"
    nonisolated(unsafe) private static var source: DispatchSourceSignal?

    /// Installs the SIGHUP handler when this process is a mount daemon writing to a log file.
    static func reopenOnHangup() {
        guard let path = ProcessInfo.processInfo.environment[variable], !path.isEmpty else { return }
        signal(SIGHUP, SIG_IGN)
        let hangup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        hangup.setEventHandler { reopen(path) }
        hangup.resume()
        source = hangup
    }

    /// Opens `path` (creating it, mode 0644) and makes it descriptors 1 and 2.
    static func reopen(_ path: String) {
        let logger = Logger(label: "shardfs.log")
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            logger.error("cannot reopen the log file on SIGHUP; still writing to the old one",
                         metadata: ["path": "\(path)", "error": "\(String(cString: strerror(errno)))"])
            return
        }
        fflush(nil)  // every stdio stream: what is buffered goes to the old file
        dup2(fd, 1)
        dup2(fd, 2)
        close(fd)
        logger.notice("log file reopened (SIGHUP)", metadata: ["path": "\(path)"])
    }
}
