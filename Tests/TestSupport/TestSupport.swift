import Foundation

/// A fresh folder under the system's temporary folder, removed by `remove()`.
public final class TemporaryDirectory: @unchecked Sendable {
    public let path: String

    public init(_ label: String = "test") throws {
        // Canonical (no "//"): mount tables and tools print paths that way.
        let base = URL(fileURLWithPath: NSTemporaryDirectory())
            .appendingPathComponent("shardfs-\(label)-\(getpid())-\(UUID().uuidString.prefix(8))").standardizedFileURL.path
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        path = base
    }

    public func sub(_ name: String) -> String { path + "/" + name }

    public func remove() { try? FileManager.default.removeItem(atPath: path) }

    deinit { remove() }
}

/// Where SwiftPM put the products (the `shardfs` executable) for this test run.
/// Every `shardfs` the tests start (through this) watches this process and stops
/// cleanly once it is gone (`SHARDFS_EXIT_WITH_PID`), so a crashed test run leaves
/// no daemons, mounts or loop devices behind.
public func productsDirectory() -> URL {
    _ = watchedByChildren
    var url = Bundle.main.bundleURL
    for _ in 0..<3 {
        if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("shardfs").path) { return url }
        url = url.deletingLastPathComponent()
    }
    return Bundle.main.bundleURL
}

/// Set once, before the first child is started; children inherit it.
private let watchedByChildren: Void = { setenv("SHARDFS_EXIT_WITH_PID", String(getpid()), 1) }()

/// The result of a finished child process.
public struct ProcessResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
}

/// Runs an executable to completion with `input` on its standard input.
public func run(_ executable: String, _ arguments: [String], input: String = "",
                environment: [String: String] = [:]) throws -> ProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    env.merge(environment) { $1 }
    process.environment = env
    let out = Pipe(), err = Pipe(), inp = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = inp
    try process.run()
    inp.fileHandleForWriting.write(Data(input.utf8))
    try inp.fileHandleForWriting.close()
    // Read both pipes before waiting so a chatty child cannot block on a full pipe.
    let group = DispatchGroup()
    nonisolated(unsafe) var errData = Data()
    DispatchQueue.global().async(group: group) { errData = err.fileHandleForReading.readDataToEndOfFile() }
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    group.wait()
    process.waitUntilExit()
    return ProcessResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData, as: UTF8.self))
}

/// Blocking work (a child process, socket reads and writes, sleeps) on a thread
/// of its own, so the test waiting for it does not hold one of Swift's few
/// cooperative threads, which every other test running meanwhile needs (a
/// `Task.detached` runs on those same threads).
public func offPool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try work() }) }.start()
    }
}

/// `run` off the cooperative pool (see `offPool`).
public func runAsync(_ executable: String, _ arguments: [String], input: String = "",
                     environment: [String: String] = [:]) async throws -> ProcessResult {
    try await offPool { try run(executable, arguments, input: input, environment: environment) }
}

/// Runs a shell command line (bash -c) off the cooperative pool.
public func shell(_ command: String, environment: [String: String] = [:]) async throws -> ProcessResult {
    try await runAsync("/bin/bash", ["-c", command], environment: environment)
}

/// A `shardfs serve …` child, returned once it printed its "ready …" line.
/// Runs `process` with its standard output piped (standard error discarded) and
/// returns the first line it prints, or nil if it closes its output first.
public func runReadingFirstLine(_ process: Process, standardError: FileHandle = .nullDevice) throws -> String? {
    let out = Pipe()
    process.standardOutput = out
    process.standardError = standardError
    try process.run()
    var line = Data()
    while !line.contains(0x0A) {
        let chunk = out.fileHandleForReading.availableData
        if chunk.isEmpty { return nil }
        line.append(chunk)
    }
    return String(decoding: line, as: UTF8.self)
}

public final class ServeProcess: @unchecked Sendable {
    public let process = Process()
    public let readyLine: String

    public struct NotReady: Error, CustomStringConvertible {
        public let description = "shardfs serve exited before it was ready"
    }

    /// `arguments` follow `serve`; `environment` adds to this process's.
    public init(_ arguments: [String], environment: [String: String] = [:]) throws {
        process.executableURL = productsDirectory().appendingPathComponent("shardfs")
        process.arguments = ["serve"] + arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        guard let line = try runReadingFirstLine(process) else {
            process.waitUntilExit()
            throw NotReady()
        }
        readyLine = line
    }

    /// `init` on a thread of its own, so that waiting for the ready line does not
    /// hold one of Swift's few cooperative threads (which other tests need).
    public static func start(_ arguments: [String], environment: [String: String] = [:]) async throws -> ServeProcess {
        try await withCheckedThrowingContinuation { continuation in
            Thread { continuation.resume(with: Result { try ServeProcess(arguments, environment: environment) }) }.start()
        }
    }

    /// The Unix socket it serves, from the ready line's `unix=PATH`; nil if none.
    public var unixSocket: String? {
        let path = readyLine.split(whereSeparator: \.isWhitespace).first { $0.hasPrefix("unix=") }?.dropFirst("unix=".count)
        return path.flatMap { $0 == "-" ? nil : String($0) }
    }

    /// SIGTERM if it still runs, then its exit status.
    @discardableResult
    public func stop() -> Int32 {
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// SIGKILL if it still runs (a crash: no clean shutdown), then waits for it to exit.
    public func kill9() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    /// Its exit status once it exits by itself within `seconds`, else nil.
    public func exitStatus(within seconds: Double) -> Int32? {
        let deadline = Date(timeIntervalSinceNow: seconds)
        while process.isRunning && Date() < deadline { usleep(50_000) }
        return process.isRunning ? nil : process.terminationStatus
    }
}

/// Runs `body` while no other heavy or timing-sensitive test of this process
/// runs (the whole suite runs its suites in parallel on two vCPUs: several
/// multi-process tests at once starved each other's nodes past their timeouts).
/// Waiting takes no thread.
public func withHeavyTest<T>(_ body: () async throws -> T) async throws -> T {
    await HeavyTests.shared.acquire()
    do {
        let result = try await body()
        await HeavyTests.shared.release()
        return result
    } catch {
        await HeavyTests.shared.release()
        throw error
    }
}

actor HeavyTests {
    static let shared = HeavyTests()
    private var busy = false
    private var waiting: [CheckedContinuation<Void, Never>] = []

    func acquire() async {
        if !busy {
            busy = true
            return
        }
        await withCheckedContinuation { waiting.append($0) }
    }

    func release() {
        if waiting.isEmpty { busy = false } else { waiting.removeFirst().resume() }
    }
}

/// True once `condition` holds, trying every `interval` for at least `seconds`.
/// The last try comes after the time is up: the suite starts hundreds of tests
/// at once on two vCPUs, and a starved test may sleep past its deadline; it must
/// not give up on a condition that came true while it slept.
public func waitUntil(_ seconds: Double, every interval: Duration = .milliseconds(20),
                      _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: interval)
    }
    return try await condition()
}
