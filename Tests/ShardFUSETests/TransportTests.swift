import CFuseRing
import Foundation
import Glibc
@testable import ShardFUSE
import TestSupport
import Testing

/// How requests reach the daemon: over the io_uring rings when the kernel's
/// fuse module allows it (scripts/test turns enable_uring on), else /dev/fuse.
@Suite struct TransportTests {
    static var kernelAllowsRings: Bool { shardfs_kernel_allows_rings() == 1 }

    /// The daemon's ring threads and how often each has been woken so far.
    func ringThreads(_ pid: Int32) -> [String: Int] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        var threads: [String: Int] = [:]
        for task in tasks {
            let comm = (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8)) ?? ""
            guard comm.hasPrefix("shardfs-ring-") else { continue }
            let status = (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8)) ?? ""
            let switches = status.split(separator: "\n").filter { $0.hasPrefix("voluntary_ctxt_switches") }
                .compactMap { Int($0.split(separator: "\t").last?.trimmingCharacters(in: .whitespaces) ?? "") }
            threads[task] = switches.first ?? 0
        }
        return threads
    }

    let work = "mkdir shard-1 && for i in $(seq 1 300); do echo $i > shard-1/f$i; done && cat shard-1/f7 && rm shard-1/f8"

    @Test func requestsGoThroughTheRingsWhenTheKernelAllowsThem() async throws {
        try await withFixture { fixture in
            let allowed = Self.kernelAllowsRings  // as the daemon will see it (scripts/test holds it on)
            try await fixture.mount()
            let pid = try #require(fixture.daemonPID)
            let before = ringThreads(pid)
            #expect(try await fixture.ok(work) == "7\n")
            let after = ringThreads(pid)
            if allowed {
                // Four threads per possible CPU (this machine's are all online),
                // each woken for the requests it took.
                #expect(after.count == 4 * Int(shardfs_possible_cpus()))
                let wakeups = after.reduce(0) { $0 + $1.value - (before[$1.key] ?? 0) }
                #expect(wakeups >= 300, "the ring threads were woken \(wakeups) times for 300 files")
            } else {
                #expect(after.isEmpty, "ring threads without the kernel's io_uring")
            }
            #expect(try await fixture.ok("ls shard-1 | wc -l") == "299\n")
            if allowed {
                // Threads started while a ring thread served a request (the log
                // applier, started by the first close) run like the process: the
                // normal class, every CPU, not the ring thread's idle class on one CPU.
                let process = Self.allowedCPUs(pid, nil)
                for (task, name) in Self.threads(pid) where !name.hasPrefix("shardfs-ring-") {
                    #expect(sched_getscheduler(pid_t(task)!) == SCHED_OTHER, "thread \(name) is not in the normal class")
                    #expect(Self.allowedCPUs(pid, task) == process, "thread \(name) runs on fewer CPUs than the process")
                }
                // The applier names itself once it runs: under load, a moment after it starts.
                #expect(await waitUntil(10) { Self.threads(pid).contains { $0.value == "shardfs-applier" } },
                        "no shardfs-applier thread: \(Self.threads(pid).values.sorted())")
            }
        }
    }

    static func threads(_ pid: Int32) -> [String: String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return Dictionary(uniqueKeysWithValues: tasks.map { task in
            (task, ((try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8)) ?? "")
                .trimmingCharacters(in: .newlines))
        })
    }

    /// `Cpus_allowed_list` of the process (its main thread) or of one of its threads.
    static func allowedCPUs(_ pid: Int32, _ task: String?) -> String {
        let path = task.map { "/proc/\(pid)/task/\($0)/status" } ?? "/proc/\(pid)/status"
        let status = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        return status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }.map(String.init) ?? "?"
    }

    // Needs the rings (scripts/test turns enable_uring on); without them there
    // is no ring to fail.
    @Test(.enabled(if: TransportTests.kernelAllowsRings))
    func aRingThatFailsEndsTheMountAndLosesNoClosedFile() async throws {
        try await withFixture { fixture in
            try await fixture.mount(environment: ["SHARDFS_TEST_RING_FAIL_AFTER": "400"])
            let pid = try #require(fixture.daemonPID)
            // Requests fail (the connection is aborted) once the ring fails: nothing hangs.
            let result = try await fixture.sh("""
                mkdir shard-1 || exit 2
                for i in $(seq 1 500); do
                  timeout 20 sh -c "echo $i > shard-1/f$i" 2>/dev/null || { echo $i; exit 0; }
                done
                echo none
                """)
            let failedAt = try #require(Int(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)),
                                        "no request failed: \(result.stdout) \(result.stderr)")
            #expect(failedAt > 20)
            // The daemon commits what it holds, unmounts and exits.
            for _ in 0..<200 where kill(pid, 0) == 0 || fixture.isMounted { try await Task.sleep(for: .milliseconds(50)) }
            #expect(kill(pid, 0) != 0, "the daemon is still running")
            #expect(!fixture.isMounted)
            let log = (try? String(contentsOfFile: fixture.data + "/shardfs-mount.log", encoding: .utf8)) ?? ""
            #expect(log.contains("a FUSE ring failed"), "the daemon did not report the failure: \(log)")
            // Every file whose close() succeeded is there, over /dev/fuse this time.
            try await fixture.mount("nouring")
            for i in 1..<failedAt {
                #expect(try await fixture.ok("cat shard-1/f\(i)") == "\(i)\n")
            }
        }
    }

    @Test func nouringServesEverythingThroughDevFuse() async throws {
        try await withFixture("client_id=tester,nouring") { fixture in
            try await fixture.mount(logLevel: "info")
            let pid = try #require(fixture.daemonPID)
            #expect(try await fixture.ok(work) == "7\n")
            #expect(ringThreads(pid).isEmpty)
            #expect(try await fixture.ok("ls shard-1 | wc -l") == "299\n")
            // The log says which transport the mount uses, and why.
            let log = (try? String(contentsOfFile: fixture.data + "/shardfs-mount.log", encoding: .utf8)) ?? ""
            #expect(log.contains("FUSE requests go through /dev/fuse (-o nouring)"), "\(log)")
        }
        let help = try await runAsync(shardfs, ["mount", "--help"])
        #expect(help.stdout.contains("nouring") && help.stdout.contains("uring (the default"), "\(help.stdout)")
    }
}
