// The servers a benchmark starts (Redis, shardfs nodes) as child processes,
// stopped with it even when it is interrupted.
import BatchProtocol
import Dispatch
import Foundation
import ShardFSClient
import ShardStore

/// A server the benchmark started. Stopped by PID (SIGTERM, then SIGKILL), also
/// when the benchmark itself is interrupted.
final class ChildProcess: @unchecked Sendable {
    let process: Process
    let name: String
    private static let lock = NSLock()
    nonisolated(unsafe) private static var running: [Int32: String] = [:]
    nonisolated(unsafe) private static var signalSources: [DispatchSourceSignal] = []

    init(name: String, executable: String, arguments: [String], stdout: Any?, stderrPath: String) throws {
        self.name = name
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        let log = FileHandle(forWritingAtPath: stderrPath)
        process.standardError = log
        process.standardOutput = stdout ?? log
        process.standardInput = FileHandle.nullDevice
        try ChildProcess.lock.withLock {
            try process.run()
            ChildProcess.running[process.processIdentifier] = name
        }
    }

    var pid: Int32 { process.processIdentifier }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL.
    func stop() {
        let pid = process.processIdentifier
        guard ChildProcess.lock.withLock({ ChildProcess.running.removeValue(forKey: pid) }) != nil else { return }
        if process.isRunning { kill(pid, SIGTERM) }
        let deadline = ContinuousClock.now + .seconds(10)
        while process.isRunning && ContinuousClock.now < deadline { usleep(5_000) }
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }

    /// On SIGINT, SIGTERM or SIGHUP: kill every child still running (by PID), then exit.
    static func installSignalCleanup() {
        lock.withLock {
            guard signalSources.isEmpty else { return }
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                signal(sig, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
                source.setEventHandler {
                    let pids = lock.withLock { Array(running.keys) }
                    for pid in pids { kill(pid, SIGKILL) }
                    FileHandle.standardError.write(Data("interrupted: stopped \(pids.count) server process(es)\n".utf8))
                    exit(128 + sig)
                }
                source.resume()
                signalSources.append(source)
            }
        }
    }
}

/// A loopback TCP port nobody listens on right now.
func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw BenchmarkError("socket: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &address) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard ok else { throw BenchmarkError("cannot find a free port: \(String(cString: strerror(errno)))") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// A `redis-server` child on loopback.
struct RedisServer {
    let child: ChildProcess
    let port: Int

    /// Finds `redis-server`. The benchmark never installs it: scripts/bench-batch does.
    static func locate() throws -> String {
        guard let path = which("redis-server") else {
            throw BenchmarkError("redis-server is not installed: scripts/bench-batch installs it (as root), "
                                 + "or leave Redis out with --systems lmdb,shardfs")
        }
        return path
    }

    static func start(executable: String, folder: String, durable: Bool) throws -> RedisServer {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let port = try freeLoopbackPort()
        var arguments = ["--port", "\(port)", "--bind", "127.0.0.1", "--dir", folder, "--daemonize", "no",
                         "--save", "", "--logfile", "", "--unixsocket", ""]
        arguments += durable ? ["--appendonly", "yes", "--appendfsync", "always"] : ["--appendonly", "no"]
        let child = try ChildProcess(name: "redis-server", executable: executable, arguments: arguments, stdout: nil,
                                     stderrPath: folder + "/redis.log")
        let deadline = ContinuousClock.now + .seconds(20)
        while true {
            if let connection = try? RESPConnection(port: port) {
                connection.send(Array("*1\r\n$4\r\nPING\r\n".utf8))
                if (try? connection.expectSimple("PONG")) != nil { break }
            }
            guard child.process.isRunning, ContinuousClock.now < deadline else {
                child.stop()
                let log = (try? String(contentsOfFile: folder + "/redis.log", encoding: .utf8)) ?? ""
                throw BenchmarkError("redis-server did not start on port \(port): \(log.suffix(600))")
            }
            usleep(10_000)
        }
        return RedisServer(child: child, port: port)
    }

    func stop() { child.stop() }
}

private func which(_ name: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    for folder in (path + ":/usr/sbin:/usr/bin:/sbin:/bin").split(separator: ":") {
        let candidate = "\(folder)/\(name)"
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    return nil
}

/// A `shardfs serve` child on a temporary data folder, with TCP on a free loopback port and a Unix socket.
struct ShardFSNode {
    let child: ChildProcess
    let tcpPort: Int
    let socketPath: String

    static func start(executable: String, folder: String, extraArguments: [String] = []) throws -> ShardFSNode {
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            throw BenchmarkError("cannot run the shardfs executable \(executable)")
        }
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let pipe = Pipe()
        let child = try ChildProcess(name: "shardfs serve", executable: executable,
                                     arguments: ["serve", "--data-dir", folder + "/data", "--listen", "127.0.0.1:0",
                                                 "--socket", folder + "/shardfs.sock", "--log-level", "warning"] + extraArguments,
                                     stdout: pipe, stderrPath: folder + "/serve.log")
        try? pipe.fileHandleForWriting.close()
        // A node that never says "ready" is stopped, which ends the read below.
        let watchdog = DispatchWorkItem { if child.process.isRunning { kill(child.pid, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 60, execute: watchdog)
        defer { watchdog.cancel() }
        var text = ""
        while !text.contains("\n") {
            let data = pipe.fileHandleForReading.availableData
            if data.isEmpty { break }
            text += String(decoding: data, as: UTF8.self)
        }
        let line = text.split(separator: "\n").first { $0.hasPrefix("ready ") }.map(String.init) ?? ""
        var tcp: Int?, unix: String?
        for field in line.split(separator: " ") {
            if field.hasPrefix("tcp="), let colon = field.lastIndex(of: ":") { tcp = Int(field[field.index(after: colon)...]) }
            if field.hasPrefix("unix=") { unix = String(field.dropFirst(5)) }
        }
        guard let tcp, let unix else {
            child.stop()
            let log = (try? String(contentsOfFile: folder + "/serve.log", encoding: .utf8)) ?? ""
            throw BenchmarkError("shardfs serve did not get ready (stdout: \(text.prefix(300))) \(log.suffix(800))")
        }
        return ShardFSNode(child: child, tcpPort: tcp, socketPath: unix)
    }

    func stop() { child.stop() }
}
