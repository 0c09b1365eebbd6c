import Synchronization

/// A value several tasks, threads and callbacks share under a lock.
public final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    public init(_ value: Value) { mutex = Mutex(value) }
    public func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
    public var value: Value {
        get { mutex.withLock { $0 } }
    }
    public func set(_ value: Value) { mutex.withLock { $0 = value } }
}
