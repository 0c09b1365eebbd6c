import Foundation

/// Serialises the writes of one shard and commits concurrent ones together.
///
/// There is no writer thread to hand work to (a wake-up on the other CPU costs
/// hundreds of microseconds here). The first caller to arrive becomes the
/// leader: it takes every write queued so far, runs them in one transaction on
/// its own thread and commits; callers that queued meanwhile wait for that commit
/// (their result is durable when they wake) or become the next leader.
final class GroupCommitter<Context>: @unchecked Sendable {
    typealias Body = (inout Context) throws -> Void

    final class Pending {
        let body: Body
        var error: Error?
        var done = false
        init(_ body: @escaping Body) { self.body = body }
    }

    /// Runs a group and records each member's error. Called on the leader's thread,
    /// one group at a time.
    private let runGroup: ([Pending]) -> Void
    private let condition = NSCondition()
    private var queue: [Pending] = []
    private var leaderActive = false

    init(runGroup: @escaping ([Pending]) -> Void) {
        self.runGroup = runGroup
    }

    /// Runs `body` in a write transaction, possibly shared with other callers' bodies,
    /// and returns once that transaction has committed (or throws its error).
    func submit(_ body: @escaping Body) throws {
        let pending = Pending(body)
        condition.lock()
        queue.append(pending)
        while leaderActive && !pending.done { condition.wait() }
        if pending.done {
            condition.unlock()
            if let error = pending.error { throw error }
            return
        }
        leaderActive = true
        let group = queue
        queue.removeAll(keepingCapacity: true)
        condition.unlock()

        runGroup(group)

        condition.lock()
        for member in group { member.done = true }
        leaderActive = false
        condition.broadcast()
        condition.unlock()
        if let error = pending.error { throw error }
    }
}
