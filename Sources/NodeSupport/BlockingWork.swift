import Dispatch

/// Runs blocking work (a durable commit, an fsync, a folder removal) on a
/// Dispatch thread and resumes the caller when it is done, so an `async` caller
/// never holds one of Swift's few cooperative threads across a disk flush. Each
/// call costs a thread hand-off: use it for lifecycle work, not per-entry paths.
public func blockingWork<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        blockingQueue.async { continuation.resume(with: Result { try work() }) }
    }
}

private let blockingQueue = DispatchQueue(label: "shardfs.blocking-work", attributes: .concurrent)
