import Foundation
import Glibc
@testable import ShardFUSE
import TestSupport
import Testing

/// How requests reach the daemon: over the io_uring rings when the kernel's
/// fuse module allows it (scripts/test turns enable_uring on), else /dev/fuse.
@Suite struct TransportTests {
    static let parameter = "/sys/module/fuse/parameters/enable_uring"
    static var kernelAllowsRings: Bool {
        (try? String(contentsOfFile: parameter, encoding: .utf8))?.hasPrefix("Y") == true
    }

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
        try await withMount { fixture in
            let pid = try #require(fixture.daemonPID)
            let before = ringThreads(pid)
            #expect(try await fixture.ok(work) == "7\n")
            let after = ringThreads(pid)
            if Self.kernelAllowsRings {
                // Two threads per possible CPU, each woken for the requests it took.
                #expect(after.count == 2 * ProcessInfo.processInfo.processorCount)
                let wakeups = after.reduce(0) { $0 + $1.value - (before[$1.key] ?? 0) }
                #expect(wakeups >= 300, "the ring threads were woken \(wakeups) times for 300 files")
            } else {
                #expect(after.isEmpty, "ring threads without the kernel's io_uring")
            }
            #expect(try await fixture.ok("ls shard-1 | wc -l") == "299\n")
        }
    }

    @Test func nouringServesEverythingThroughDevFuse() async throws {
        try await withMount("client_id=tester,nouring") { fixture in
            let pid = try #require(fixture.daemonPID)
            #expect(try await fixture.ok(work) == "7\n")
            #expect(ringThreads(pid).isEmpty)
            #expect(try await fixture.ok("ls shard-1 | wc -l") == "299\n")
        }
    }
}
