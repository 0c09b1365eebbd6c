import Foundation
import TestSupport
@testable import Volumes

/// A server child process (a fake cloud, moto_server) for one test; `stop()`
/// in `defer` ends it, and so does deinit. It runs under a watchdog
/// (`WatchedProcess`) that kills it if the test process dies first.
final class ServerProcess: @unchecked Sendable {
    private let child: WatchedProcess
    let port: Int
    var url: String { "http://127.0.0.1:\(port)" }

    struct Failed: Error, CustomStringConvertible { let description: String }

    /// Starts a fixture script that prints "port N" first.
    init(fixture: String, _ arguments: [String] = []) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("fixtures/\(fixture)").path
        child = WatchedProcess("/usr/bin/env", ["python3", script] + arguments)
        guard let text = try child.startReadingFirstLine() else {
            child.stop()
            throw Failed(description: "\(fixture) exited before printing its port")
        }
        guard let port = Int(text.split(separator: " ").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") else {
            child.stop()
            throw Failed(description: "\(fixture) printed \(text)")
        }
        self.port = port
    }

    /// Starts moto_server on a free loopback port and waits until it answers.
    init(motoServerAfter seconds: Double = 20) throws {
        port = Self.freePort()
        child = WatchedProcess("/usr/bin/env", ["moto_server", "-H", "127.0.0.1", "-p", "\(port)"], log: "/dev/null")
        try child.start()
        let deadline = Date(timeIntervalSinceNow: seconds)
        while Date() < deadline {
            if let r = try? HTTPClient(timeout: .seconds(2)).sendBlocking(HTTPRequest(method: "GET", url: url + "/moto-api/")), r.status > 0 { return }
            if !child.isRunning {
                child.stop()
                throw Failed(description: "moto_server exited with \(child.watchdog.terminationStatus)")
            }
            usleep(100_000)
        }
        stopNow()
        throw Failed(description: "moto_server did not answer within \(seconds) s")
    }

    func stop() { stopNow() }

    private func stopNow() {
        // SIGKILL: a child inherits the test runner's blocked SIGTERM, and these servers keep nothing.
        child.stop(SIGKILL)
    }

    deinit { stopNow() }

    /// The fake's calls per action.
    func calls() throws -> [String: Int] {
        let r = try HTTPClient().sendBlocking(HTTPRequest(method: "GET", url: url + "/_fake/calls"))
        return try JSONDecoder().decode([String: Int].self, from: r.body)
    }

    static func freePort() -> Int { (try? freeLoopbackPort()) ?? 0 }
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

/// Runs a Python snippet with `input` as its standard input; its stdout, trimmed.
func python(_ script: String, input: String = "") async throws -> String {
    let r = try await runAsync("/usr/bin/env", ["python3", "-c", script], input: input)
    guard r.status == 0 else { throw ServerProcess.Failed(description: "python3 failed: \(r.stderr)") }
    return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
}
