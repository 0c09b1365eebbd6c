import Foundation

/// A thread that runs `body` until cancelled; `sleep` wakes early on cancel.
final class Keepalive: @unchecked Sendable {
    private let condition = NSCondition()
    private var cancelled = false
    private var done = false

    init(name: String, _ body: @escaping @Sendable (Keepalive) -> Void) {
        let thread = Thread { [self] in
            Thread.current.name = name  // named from inside: set before `start()` it does not reach Linux
            body(self)
            condition.withLock {
                done = true
                condition.broadcast()
            }
        }
        thread.start()
    }

    var isCancelled: Bool { condition.withLock { cancelled } }

    func cancel() {
        condition.withLock {
            cancelled = true
            condition.broadcast()
        }
    }

    /// Waits `duration` (or until cancelled); false once cancelled.
    func sleep(_ duration: Duration) -> Bool {
        let seconds = Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
        let until = Date(timeIntervalSinceNow: seconds)
        return condition.withLock {
            while !cancelled && Date() < until { _ = condition.wait(until: until) }
            return !cancelled
        }
    }

    /// Returns once the thread has ended (after `cancel`), without blocking a cooperative thread.
    func finished() async {
        while !condition.withLock({ done }) { try? await Task.sleep(for: .milliseconds(10)) }
    }
}

