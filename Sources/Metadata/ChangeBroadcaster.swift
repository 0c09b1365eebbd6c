import Foundation

/// Fans metadata events out to every `changes()` stream that is still listening.
public final class ChangeBroadcaster: @unchecked Sendable {
    private let lock = NSLock()
    private var listeners: [UUID: AsyncStream<MetadataEvent>.Continuation] = [:]

    public init() {}

    public func stream() -> AsyncStream<MetadataEvent> {
        let (stream, continuation) = AsyncStream<MetadataEvent>.makeStream()
        let id = UUID()
        lock.withLock { listeners[id] = continuation }
        continuation.onTermination = { [weak self] _ in
            self?.lock.withLock { _ = self?.listeners.removeValue(forKey: id) }
        }
        return stream
    }

    public func publish(_ event: MetadataEvent) {
        let current = lock.withLock { Array(listeners.values) }
        for listener in current { listener.yield(event) }
    }

    /// Ends every stream (the store is going away).
    public func finish() {
        let current = lock.withLock { () -> [AsyncStream<MetadataEvent>.Continuation] in
            defer { listeners.removeAll() }
            return Array(listeners.values)
        }
        for listener in current { listener.finish() }
    }
}
