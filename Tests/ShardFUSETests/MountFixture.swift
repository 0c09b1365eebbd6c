import Foundation
import TestSupport
import Testing

let shardfs = productsDirectory().appendingPathComponent("shardfs").path

/// A real ShardFS mount in a temporary folder: `data/` (the node) and `mnt/`.
/// `withMount` always unmounts, stops the daemon and removes the folder, even
/// when the test fails.
final class MountFixture: @unchecked Sendable {
    let dir: TemporaryDirectory
    var data: String { dir.sub("data") }
    var mnt: String { dir.sub("mnt") }
    let options: String

    init(options: String) throws {
        dir = try TemporaryDirectory("fuse")
        self.options = options
        try FileManager.default.createDirectory(atPath: dir.sub("mnt"), withIntermediateDirectories: true)
    }

    func mount(_ extra: String = "", logLevel: String = "warning", environment: [String: String] = [:]) async throws {
        let all = [options, extra].filter { !$0.isEmpty }.joined(separator: ",")
        let result = try await runAsync(shardfs, ["mount", data, mnt, "--log-level", logLevel] + (all.isEmpty ? [] : ["-o", all]),
                                        environment: environment)
        guard result.status == 0 else { throw FixtureError("mount failed: \(result.stderr)") }
    }

    /// Writes a config file that gives new shards `limit` (as "1MiB") and
    /// returns the mount option that names it.
    func sizeLimitOption(_ limit: String) throws -> String {
        try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
        return "config=" + (try NodeConfigFile(shardSizeLimit: limit).write(to: dir.sub("small.yaml")))
    }

    /// The daemon's pid, from the node lock it holds.
    var daemonPID: Int32? {
        (try? String(contentsOfFile: data + "/node.lock", encoding: .utf8))
            .flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    var isMounted: Bool {
        isMountPoint(mnt)
    }

    /// After a `kill -9` of the daemon `pid` (a crash): waits until it is gone,
    /// unmounts the dead mount (it answers ENOTCONN until then) and mounts again.
    func remountAfterCrash(of pid: Int32) async throws {
        for _ in 0..<100 where kill(pid, 0) == 0 { try await Task.sleep(for: .milliseconds(20)) }
        _ = try await shell("fusermount3 -u '\(mnt)' || fusermount3 -uz '\(mnt)'")
        try await mount()
    }

    func unmount() async {
        let pid = daemonPID
        if isMounted { _ = try? await shell("fusermount3 -u '\(mnt)' 2>/dev/null || fusermount3 -uz '\(mnt)'") }
        // The daemon exits once unmounted; make sure of it.
        if let pid {
            for _ in 0..<100 where kill(pid, 0) == 0 { try? await Task.sleep(for: .milliseconds(50)) }
            if kill(pid, 0) == 0 { kill(pid, SIGKILL) }
        }
        for _ in 0..<100 where isMounted { try? await Task.sleep(for: .milliseconds(20)) }
    }

    /// Runs a shell command in the mount point; returns its result.
    @discardableResult
    func sh(_ command: String) async throws -> ProcessResult {
        try await shell("cd '\(mnt)' || exit 1\n\(command)")
    }

    /// Runs a shell command that must succeed; returns its standard output.
    @discardableResult
    func ok(_ command: String, sourceLocation: SourceLocation = #_sourceLocation) async throws -> String {
        let result = try await sh(command)
        #expect(result.status == 0, "\(command): \(result.stderr)", sourceLocation: sourceLocation)
        return result.stdout
    }

    /// Runs a Python script in the mount point (from a file: no shell quoting);
    /// returns its standard output, expecting it to succeed.
    @discardableResult
    func python(_ script: String, sourceLocation: SourceLocation = #_sourceLocation) async throws -> String {
        let path = dir.sub("script-\(UUID().uuidString).py")
        try script.write(toFile: path, atomically: true, encoding: .utf8)
        return try await ok("python3 '\(path)'", sourceLocation: sourceLocation)
    }

    /// The daemon's request counts by kind, from the root's attribute
    /// (`user.shardfs.requests`: one count per round trip).
    func requestCounts() async throws -> [String: Int] {
        let text = try await ok("getfattr --only-values -n user.shardfs.requests .")
        var counts: [String: Int] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let n = Int(parts[1]) { counts[String(parts[0])] = n }
        }
        return counts
    }

    /// Python functions for scripts (`python`; the script imports `os` and
    /// `time`): `whole(fd)`, a descriptor's whole content from offset 0, read in
    /// pieces with `os.pread`; `wait_empty(path)`, true once folder `path` is
    /// empty, false after two seconds.
    static let pythonHelpers = """
        def whole(fd):
            out = bytearray()
            while True:
                piece = os.pread(fd, 1 << 20, len(out))
                if not piece: return bytes(out)
                out += piece
        def wait_empty(path):
            for _ in range(200):
                if not os.listdir(path): return True
                time.sleep(0.01)
            return False
        """

    /// The errno name a Python os call fails with, or "OK".
    func errnoOf(_ pythonCall: String) async throws -> String {
        let script = """
        import errno, os, sys
        try:
            \(pythonCall)
            print("OK")
        except OSError as e:
            print(errno.errorcode[e.errno])
        """
        return try await sh("python3 -c '\(script.replacingOccurrences(of: "'", with: "'\\''"))'")
            .stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Mounts, runs `body`, and always tears down.
func withMount(_ options: String = "client_id=tester", _ body: (MountFixture) async throws -> Void) async throws {
    try await withFixture(options) { fixture in
        try await fixture.mount()
        try await body(fixture)
    }
}

/// Runs `body` with a fixture it mounts (and remounts) itself; unmounts
/// afterwards even if `body` fails. Returns the fixture, unmounted, for checks
/// of the data folder.
@discardableResult
func withFixture(_ options: String = "client_id=tester", _ body: (MountFixture) async throws -> Void) async throws -> MountFixture {
    let fixture = try MountFixture(options: options)
    do {
        try await body(fixture)
    } catch {
        await fixture.unmount()
        throw error
    }
    await fixture.unmount()
    #expect(!fixture.isMounted)
    return fixture
}
