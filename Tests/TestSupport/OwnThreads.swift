import Foundation
import Testing

/// `@Suite(.onOwnThreads)`: the suite's tests run on threads of their own, not on
/// Swift's cooperative pool (as many threads as CPUs: 2 here). For suites whose
/// tests block (fsyncs of LMDB commits, child processes, loop devices,
/// synchronous test bodies): run on the pool, each held a thread until it ended,
/// so every other test starting meanwhile waited, and timers and deadlines of
/// tests elsewhere were late by a minute.
public struct OwnThreadsTrait: SuiteTrait, TestTrait, TestScoping {
    public var isRecursive: Bool { true }

    public func provideScope(for test: Test, testCase: Test.Case?,
                             performing function: @Sendable () async throws -> Void) async throws {
        try await withTaskExecutorPreference(ThreadPerJobExecutor.shared, operation: function)
    }
}

extension Trait where Self == OwnThreadsTrait {
    public static var onOwnThreads: Self { Self() }
}

/// Runs each job on a new thread: a job that blocks holds nothing anyone else
/// needs. Tests have few jobs each (a synchronous test body is one), so the
/// thread's start (tens of microseconds) does not matter.
final class ThreadPerJobExecutor: TaskExecutor {
    static let shared = ThreadPerJobExecutor()

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        Thread { job.runSynchronously(on: self.asUnownedTaskExecutor()) }.start()
    }
}
