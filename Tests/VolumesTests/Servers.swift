import Foundation
import TestSupport
@testable import Volumes

/// A server child process (a fake cloud, moto_server) for one test; `stop()`
/// in `defer` ends it, and so does deinit.
final class ServerProcess: @unchecked Sendable {
    let process = Process()
    let port: Int
    var url: String { "http://127.0.0.1:\(port)" }

    struct Failed: Error, CustomStringConvertible { let description: String }

    /// Starts a fixture script that prints "port N" first.
    init(fixture: String, _ arguments: [String] = []) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("fixtures/\(fixture)").path
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script] + arguments
        guard let text = try runReadingFirstLine(process) else {
            process.waitUntilExit()
            throw Failed(description: "\(fixture) exited before printing its port")
        }
        guard let port = Int(text.split(separator: " ").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") else {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw Failed(description: "\(fixture) printed \(text)")
        }
        self.port = port
    }

    /// Starts moto_server on a free loopback port and waits until it answers.
    init(motoServerAfter seconds: Double = 20) throws {
        port = Self.freePort()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["moto_server", "-H", "127.0.0.1", "-p", "\(port)"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let deadline = Date(timeIntervalSinceNow: seconds)
        while Date() < deadline {
            if let r = try? HTTPClient(timeout: .seconds(2)).sendBlocking(HTTPRequest(method: "GET", url: url + "/moto-api/")), r.status > 0 { return }
            if !process.isRunning { throw Failed(description: "moto_server exited with \(process.terminationStatus)") }
            usleep(100_000)
        }
        stopNow()
        throw Failed(description: "moto_server did not answer within \(seconds) s")
    }

    func stop() { stopNow() }

    private func stopNow() {
        // SIGKILL: a child inherits the test runner's blocked SIGTERM, and these servers keep nothing.
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stopNow() }

    /// The fake's calls per action.
    func calls() throws -> [String: Int] {
        let r = try HTTPClient().sendBlocking(HTTPRequest(method: "GET", url: url + "/_fake/calls"))
        return try JSONDecoder().decode([String: Int].self, from: r.body)
    }

    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
    }
}

extension ServerProcess {
    /// Starting blocks (Python imports, moto's start-up): done on a thread of its
    /// own, so the tests running meanwhile keep Swift's few cooperative threads.
    static func start(fixture: String, _ arguments: [String] = []) async throws -> ServerProcess {
        try await offPool { try ServerProcess(fixture: fixture, arguments) }
    }

    static func startMoto() async throws -> ServerProcess {
        try await offPool { try ServerProcess(motoServerAfter: 30) }
    }
}

func offPool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try work() }) }.start()
    }
}

/// Runs a Python snippet with `input` as its standard input; its stdout, trimmed.
func python(_ script: String, input: String = "") async throws -> String {
    let r = try await runAsync("/usr/bin/env", ["python3", "-c", script], input: input)
    guard r.status == 0 else { throw ServerProcess.Failed(description: "python3 failed: \(r.stderr)") }
    return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
}
