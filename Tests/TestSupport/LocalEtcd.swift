import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real etcd on free loopback ports for tests of several nodes. It runs
/// under a shell watchdog that kills it, and removes its folder, if the test
/// process dies, so none outlives the tests even on a crash. Use `withLocalEtcd`,
/// which always stops it.
public final class LocalEtcd: @unchecked Sendable {
    public let endpoint: String
    private let dir: TemporaryDirectory
    private var watchdog: Process
    private let pidFile: String
    private let clientPort: Int, peerPort: Int

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    private init(dir: TemporaryDirectory, endpoint: String, watchdog: Process, pidFile: String, clientPort: Int, peerPort: Int) {
        self.dir = dir
        self.endpoint = endpoint
        self.watchdog = watchdog
        self.pidFile = pidFile
        self.clientPort = clientPort
        self.peerPort = peerPort
    }

    /// Starts etcd and waits until it answers. The ports are picked before etcd
    /// binds them, so another process may take one meanwhile: then it tries again.
    public static func start() async throws -> LocalEtcd {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd") else {
            throw Failure(description: "etcd is not installed (apt-get install etcd-server etcd-client)")
        }
        var last = ""
        for _ in 0..<3 {
            let etcd = try launch()
            if try await etcd.waitUntilReady() { return etcd }
            last = etcd.log
            etcd.stop()
        }
        throw Failure(description: "etcd did not start: \(last)")
    }

    private static func launch() throws -> LocalEtcd {
        let dir = try TemporaryDirectory("etcd")
        let client = try freeLoopbackPort(), peer = try freeLoopbackPort()
        let process = try watchdog(dir: dir, client: client, peer: peer)
        return LocalEtcd(dir: dir, endpoint: "http://127.0.0.1:\(client)", watchdog: process, pidFile: dir.sub("etcd.pid"),
                         clientPort: client, peerPort: peer)
    }

    /// etcd on these ports and this folder, under a watchdog.
    private static func watchdog(dir: TemporaryDirectory, client: Int, peer: Int) throws -> Process {
        let endpoint = "http://127.0.0.1:\(client)", peerURL = "http://127.0.0.1:\(peer)"
        let pidFile = dir.sub("etcd.pid")
        let script = """
            "$@" >>"\(dir.sub("etcd.log"))" 2>&1 &
            e=$!
            echo $e > "\(pidFile)"
            while kill -0 \(getpid()) 2>/dev/null && kill -0 $e 2>/dev/null; do sleep 0.2; done
            if ! kill -0 \(getpid()) 2>/dev/null; then kill -9 $e 2>/dev/null; wait $e; rm -rf "\(dir.path)"; fi
            wait $e
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script, "etcd-watchdog", "/usr/bin/etcd", "--name", "test", "--data-dir", dir.sub("data"),
                             "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
                             "--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
                             "--initial-cluster", "test=\(peerURL)", "--log-level", "error"]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Kills etcd (as a crash would) and starts it again on the same ports and
    /// data, waiting until it answers.
    public func restart() async throws {
        for _ in 0..<100 where etcdPID == nil && watchdog.isRunning { usleep(20_000) }
        if let pid = etcdPID { kill(pid, SIGKILL) }
        watchdog.waitUntilExit()
        try? FileManager.default.removeItem(atPath: pidFile)
        watchdog = try Self.watchdog(dir: dir, client: clientPort, peer: peerPort)
        guard try await waitUntilReady() else { throw Failure(description: "etcd did not come back: \(log)") }
    }

    private var etcdPID: pid_t? {
        (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// True once it answers /health; false if it exited first (a port taken).
    private func waitUntilReady() async throws -> Bool {
        var exited = false
        let ready = try await waitUntil(60, every: .milliseconds(50)) {
            if !watchdog.isRunning { exited = true }
            if let pid = etcdPID, kill(pid, 0) != 0 { exited = true }
            if exited { return true }
            guard etcdPID != nil else { return false }
            return try await shell("curl -sf --max-time 1 \(endpoint)/health").status == 0
        }
        return ready && !exited
    }

    public var log: String { (try? String(contentsOfFile: dir.sub("etcd.log"), encoding: .utf8)) ?? "" }

    /// Kills etcd and waits for its watchdog to end.
    public func stop() {
        // The watchdog writes the pid first thing; give it a moment if it has not yet.
        for _ in 0..<100 where etcdPID == nil && watchdog.isRunning { usleep(20_000) }
        if let pid = etcdPID { kill(pid, SIGKILL) } else if watchdog.isRunning { kill(watchdog.processIdentifier, SIGKILL) }
        watchdog.waitUntilExit()
        dir.remove()
    }
}

/// Runs `body` with a fresh etcd, stopping it whatever happens.
public func withLocalEtcd<T>(_ body: (LocalEtcd) async throws -> T) async throws -> T {
    let etcd = try await LocalEtcd.start()
    do {
        let result = try await body(etcd)
        etcd.stop()
        return result
    } catch {
        etcd.stop()
        throw error
    }
}

/// A loopback TCP port nobody listens on right now (bind port 0, read it, close).
public func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw LocalEtcd.Failure(description: "socket failed") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
    guard bound == 0 else { throw LocalEtcd.Failure(description: "bind failed") }
    let named = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    guard named == 0 else { throw LocalEtcd.Failure(description: "getsockname failed") }
    return Int(UInt16(bigEndian: address.sin_port))
}
