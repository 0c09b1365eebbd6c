import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A child process (etcd, moto_server, a fake cloud) run under a small shell
/// watchdog: once this test process is gone (a crash, `kill -9`), the watchdog
/// kills the child, runs the cleanup commands and ends, so a dead test run leaves
/// none behind. (`shardfs serve` and `mount` need none: they watch the test
/// process themselves, `SHARDFS_EXIT_WITH_PID`.) Foundation starts the watchdog
/// in a process group of its own, so a Ctrl-C of the run does not reach it (an
/// interrupted run was checked: etcd went with the test process); it also
/// ignores SIGINT and SIGHUP, should one be sent to its group.
///
/// The child's standard output and error go to `log`, or, without one, to the
/// watchdog's: pipe them with `standardOutput`/`standardError` before `start()`.
public final class WatchedProcess: @unchecked Sendable {
    /// The `sh` that runs the child and watches this process.
    public let watchdog = Process()
    /// Where the watchdog writes the child's pid; it removes it when it ends.
    public let pidFile: String

    /// `cleanup` (shell commands) runs only if this test process dies first;
    /// `pidFolder` holds the pid file.
    public init(_ executable: String, _ arguments: [String], pidFolder: String = NSTemporaryDirectory(), log: String? = nil,
                cleanup: String = "") {
        pidFile = URL(fileURLWithPath: pidFolder).appendingPathComponent("shardfs-watched-\(getpid())-\(UUID().uuidString.prefix(8)).pid").path
        let output = log.map { ">>\(shellQuoted($0)) 2>&1" } ?? ""
        let script = """
            trap '' INT HUP
            "$@" </dev/null \(output) &
            child=$!
            echo $child > \(shellQuoted(pidFile))
            while kill -0 \(getpid()) 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.2; done
            if ! kill -0 \(getpid()) 2>/dev/null; then
              kill -9 $child 2>/dev/null; wait $child
              \(cleanup.isEmpty ? ":" : cleanup)
            fi
            wait $child
            status=$?
            rm -f \(shellQuoted(pidFile))
            exit $status
            """
        watchdog.executableURL = URL(fileURLWithPath: "/bin/sh")
        watchdog.arguments = ["-c", script, "shardfs-test-watchdog", executable] + arguments
        watchdog.standardInput = FileHandle.nullDevice
        if log != nil {
            watchdog.standardOutput = FileHandle.nullDevice
            watchdog.standardError = FileHandle.nullDevice
        }
    }

    /// Starts the watchdog and waits (up to 10 s) until it has started the child.
    public func start() throws {
        try watchdog.run()
        try waitForPID()
    }

    /// Starts the watchdog with the child's standard output piped (its standard
    /// error discarded) and returns the first line the child prints, or nil if it
    /// ends first (the child runs on: `stop()` it).
    public func startReadingFirstLine() throws -> String? {
        let line = try runReadingFirstLine(watchdog)
        if line != nil { try waitForPID() }
        return line
    }

    /// The child's pid, once the watchdog has written it.
    public var pid: pid_t? {
        (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// Waits (up to 10 s) for the pid file; throws if the watchdog ended first
    /// (the child ended at once: the watchdog removes the file as it ends).
    func waitForPID() throws {
        let deadline = Date(timeIntervalSinceNow: 10)
        while pid == nil {
            guard watchdog.isRunning, Date() < deadline else {
                throw WatchdogFailure(description: "\(watchdog.arguments?.dropFirst(3).first ?? "?") ended at once (or its watchdog did not start it)")
            }
            usleep(5_000)
        }
    }

    /// Whether the child still runs (the watchdog ends with it).
    public var isRunning: Bool { watchdog.isRunning && pid.map { kill($0, 0) == 0 } == true }

    /// Sends `signal` to the child.
    public func signal(_ signal: Int32) {
        if let pid, watchdog.isRunning { kill(pid, signal) }
    }

    /// Sends `signal` to the child and waits for it (and its watchdog) to end.
    public func stop(_ signal: Int32 = SIGKILL) {
        self.signal(signal)
        if watchdog.processIdentifier > 0 { watchdog.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: pidFile)
    }

    /// `stop` without holding a thread: polls, for callers on Swift's cooperative pool.
    public func stop(_ signal: Int32 = SIGKILL) async {
        self.signal(signal)
        while watchdog.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
        if watchdog.processIdentifier > 0 { watchdog.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: pidFile)
    }
}

/// A guard for things this test process makes itself that would outlive it
/// (loop devices, mounts): a watchdog that runs `cleanup` (shell commands) once
/// this process is gone, and nothing if `dismiss()` ends it first. The guard
/// only covers a crash; the test still cleans up itself.
public final class CrashCleanup: @unchecked Sendable {
    private let watchdog = Process()

    public init(_ cleanup: String) throws {
        let script = """
            trap '' INT HUP
            while kill -0 \(getpid()) 2>/dev/null; do sleep 0.2; done
            \(cleanup)
            """
        watchdog.executableURL = URL(fileURLWithPath: "/bin/sh")
        watchdog.arguments = ["-c", script, "shardfs-test-cleanup"]
        watchdog.standardInput = FileHandle.nullDevice
        watchdog.standardOutput = FileHandle.nullDevice
        watchdog.standardError = FileHandle.nullDevice
        try watchdog.run()
    }

    /// Ends the guard without its cleanup (the test has cleaned up).
    public func dismiss() {
        if watchdog.isRunning { kill(watchdog.processIdentifier, SIGKILL) }
        watchdog.waitUntilExit()
    }

    /// Shell commands that unmount everything mounted under `folder` (deepest
    /// first, lazily), detach every loop device whose backing file lies under
    /// it (a busy one is only marked for autoclear: it goes when its last user
    /// does), then remove the folder.
    public static func unmountAndDetach(under folder: String) -> String {
        let prefix = shellQuoted(folder + "/")
        return """
            for m in $(awk -v p=\(prefix) 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do umount -l "$m"; done
            for b in /sys/block/loop*/loop/backing_file; do
              case "$(cat "$b" 2>/dev/null)" in \(prefix)*) d=${b#/sys/block/}; losetup -d "/dev/${d%%/*}";; esac
            done
            rm -rf \(shellQuoted(folder))
            """
    }
}

/// A line for a shell script run in a child (a host in a mount namespace of its
/// own, say): a background watcher that kills the script's process (`$$`, the
/// program it `exec`s next included) once this test process is gone, and ends
/// with it. The watcher first closes every descriptor it inherited: Foundation
/// learns that a child ended when the child's end of a socket pair closes, and
/// a watcher holding it would keep the child unreaped, and itself waiting on
/// that zombie, for ever.
public var killedWithTestProcess: String {
    "(for f in /proc/self/fd/*; do n=${f##*/}; [ \"$n\" -gt 2 ] && eval \"exec $n>&-\"; done 2>/dev/null; "
        + "while kill -0 \(getpid()) 2>/dev/null && kill -0 $$ 2>/dev/null; do sleep 0.2; done; "
        + "kill -0 \(getpid()) 2>/dev/null || kill -9 $$) </dev/null >/dev/null 2>&1 &\n"
}

public struct WatchdogFailure: Error, CustomStringConvertible {
    public let description: String
}

/// `text` in single quotes for sh.
public func shellQuoted(_ text: String) -> String {
    "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'"
}
