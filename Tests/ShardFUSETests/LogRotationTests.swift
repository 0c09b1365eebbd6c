import Foundation
import TestSupport
import Testing

/// The daemonised mount's log (`<data>/shardfs-mount.log`) and its admin socket.
@Suite(.serialized) struct LogRotationTests {
    /// logrotate without copytruncate: the file is renamed, the daemon gets SIGHUP,
    /// and writes on in a new file at the old path; the renamed one keeps what was before.
    @Test func sighupReopensTheLogFileAndFailedOperationsAreCounted() async throws {
        try await withFixture { m in
            try await m.mount(logLevel: "info")
            let log = m.data + "/shardfs-mount.log"
            let pid = try #require(m.daemonPID)
            #expect(FileManager.default.fileExists(atPath: log))
            try FileManager.default.moveItem(atPath: log, toPath: log + ".1")
            #expect(kill(pid, SIGHUP) == 0)
            var text = ""
            for _ in 0..<100 {
                text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                if text.contains("log file reopened") { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(text.contains("log file reopened"), "new log: \(text)")
            #expect(kill(pid, 0) == 0, "the daemon must survive SIGHUP")
            #expect(m.isMounted)
            let old = try String(contentsOfFile: log + ".1", encoding: .utf8)
            #expect(!old.contains("log file reopened"))

            // A refused operation is logged in the new file and counted in /metrics.
            #expect(try await m.sh("mkdir not-a-shard").status != 0)
            #expect(try await m.sh("ln -s target a-link").status != 0)
            let metrics = try await shell("curl -sS --max-time 30 --unix-socket '\(m.data)/shardfs-admin.sock' http://x/metrics")
            #expect(metrics.status == 0, "\(metrics.stderr)")
            #expect(metrics.stdout.contains("shardfs_fuse_errors_total{operation=\"mkdir\",errno="), "\(metrics.stdout)")
            #expect(metrics.stdout.contains("shardfs_fuse_errors_total{operation=\"symlink\",errno=\"EPERM\"}"), "\(metrics.stdout)")
            let status = try await runAsync(shardfs, ["status", "--data-dir", m.data])
            #expect(status.status == 0 && status.stdout.contains("primary"), "\(status.stdout) \(status.stderr)")
        }
    }
}
