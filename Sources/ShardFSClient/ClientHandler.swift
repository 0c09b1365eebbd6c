import BatchProtocol
import NIOCore
import NIOSSL

/// One BatchGet item.
public struct BatchGetItem: Sendable, Hashable {
    /// Index of the key in the request.
    public var position: Int
    public var status: Status
    /// Present when the status is OK.
    public var entry: EntryPayload?
    /// The request's keys, shared by all its items: an item does not touch its
    /// own key's storage until `key` is read (a retain per item of scattered
    /// key arrays cost a cache miss each).
    private let keys: [[UInt8]]

    init(position: Int, keys: [[UInt8]], status: Status, entry: EntryPayload?) {
        self.position = position
        self.keys = keys
        self.status = status
        self.entry = entry
    }

    /// The key this item answers.
    public var key: [UInt8] { keys[position] }

    public static func == (a: BatchGetItem, b: BatchGetItem) -> Bool {
        a.position == b.position && a.status == b.status && a.entry == b.entry && a.key == b.key
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(position)
        hasher.combine(key)
        hasher.combine(status)
        hasher.combine(entry)
    }
}

/// Who waits for the answer to a request.
enum Waiter {
    case reply(EventLoopPromise<Response>)
    case batchGet(BatchGetCollector)
}

/// Gathers a BatchGet's items on the event loop and hands them on in arrays, so
/// the consumer's task is resumed once per socket read (`chunks`) or once per
/// request (`all`), not once per item.
final class BatchGetCollector {
    enum Sink {
        case chunks(AsyncThrowingStream<[BatchGetItem], Error>.Continuation)
        case all(EventLoopPromise<[BatchGetItem]>)
    }

    let keys: [[UInt8]]
    let sink: Sink
    var items: [BatchGetItem] = []
    /// Already listed among the collectors to flush at the end of this read.
    var pending = false

    init(keys: [[UInt8]], sink: Sink) {
        self.keys = keys
        self.sink = sink
        if case .all = sink { items.reserveCapacity(keys.count) }
    }

    /// Hands on what has arrived (chunks only; `all` waits for the final frame).
    func flush() {
        pending = false
        guard case .chunks(let continuation) = sink, !items.isEmpty else { return }
        continuation.yield(items)
        items = []
    }

    func finish(_ status: Status, _ payload: ResponsePayload) {
        switch sink {
        case .chunks(let continuation):
            flush()
            if status.isOK { continuation.finish() } else { continuation.finish(throwing: ClientError.answer(status, payload)) }
        case .all(let promise):
            if status.isOK { promise.succeed(items) } else { promise.fail(ClientError.answer(status, payload)) }
            items = []
        }
    }

    func fail(_ error: Error) {
        switch sink {
        case .chunks(let continuation):
            flush()
            continuation.finish(throwing: error)
        case .all(let promise):
            promise.fail(error)
        }
    }
}

/// Decodes response frames and hands each to the waiter of its request ID.
/// Lives on the channel's event loop; waiters are registered there too.
final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private var decoder = FrameDecoder(maxFrameLength: Int(UInt32.max))
    private var waiters: [UInt32: Waiter] = [:]
    private var closedReason: String?
    /// What later calls fail with, when it says more than "closed" (a TLS failure).
    private var closedError: ClientError?

    func register(_ id: UInt32, _ waiter: Waiter) -> Bool {
        if let reason = closedReason {
            fail(waiter, closedError ?? ClientError.connectionClosed(reason))
            return false
        }
        waiters[id] = waiter
        return true
    }

    /// Streams that received items during the current read: flushed once it is decoded.
    private var touched: [BatchGetCollector] = []

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        decoder.append(unwrapInboundIn(data))
        // Items of one request arrive in a run: its collector is looked up once per
        // run, and its array is moved out for the run and back after it (a move,
        // not a copy of the items), so an item costs no dictionary lookup or
        // class-property access.
        var run: (id: UInt32, collector: BatchGetCollector?) = (0, nil)
        var items: [BatchGetItem] = []
        func endRun() {
            guard let collector = run.collector else { return }
            run = (0, nil)
            swap(&collector.items, &items)
            items = []
            if !collector.items.isEmpty && !collector.pending {
                collector.pending = true
                touched.append(collector)
            }
        }
        do {
            while let frame = try decoder.next() {
                if frame.type == Opcode.batchGetItemType {
                    let item = try ResponseCodec.decodeBatchGetItem(frame)
                    if run.collector == nil || run.id != frame.requestID {
                        endRun()
                        if case .batchGet(let collector) = waiters[frame.requestID] {
                            run = (frame.requestID, collector)
                            swap(&collector.items, &items)
                        } else {
                            run = (0, nil)
                        }
                    }
                    guard let collector = run.collector, Int(item.position) < collector.keys.count else { continue }
                    items.append(BatchGetItem(position: Int(item.position), keys: collector.keys, status: item.status, entry: item.entry))
                } else {
                    endRun()
                    deliver(try ResponseCodec.decode(frame), context)
                }
            }
            endRun()
        } catch {
            endRun()
            failAll("undecodable response: \(error)")
            context.close(promise: nil)
        }
        for collector in touched { collector.flush() }
        touched.removeAll(keepingCapacity: true)
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll("the server closed the connection")
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A failed handshake (refused either way, a certificate not trusted or not
        // naming the host) says TLS. A connection that ends without TLS's goodbye
        // (the node crashed: `uncleanShutdown`) is closed like any other, so callers
        // retry it as they would over plain TCP.
        var tls = error is BoringSSLError || error is NIOSSLExtraError
        if let ssl = error as? NIOSSLError, case .handshakeFailed = ssl { tls = true }
        failAll("\(error)", as: tls ? ClientError.tls("\(error)") : nil)
        context.close(promise: nil)
    }

    private func deliver(_ response: Response, _ context: ChannelHandlerContext) {
        switch response {
        case .error(_, let status):
            failAll(status.description)
            context.close(promise: nil)
        case .batchGetItem:
            break  // handled in channelRead
        case .reply(_, let id, let status, let payload):
            switch waiters.removeValue(forKey: id) {
            case .reply(let promise):
                promise.succeed(response)
            case .batchGet(let collector):
                collector.finish(status, payload)
            case nil:
                break
            }
        }
    }

    private func fail(_ waiter: Waiter, _ error: Error) {
        switch waiter {
        case .reply(let promise): promise.fail(error)
        case .batchGet(let collector): collector.fail(error)
        }
    }

    private func failAll(_ reason: String, as error: ClientError? = nil) {
        if closedReason == nil {
            closedReason = reason
            closedError = error
        }
        let all = waiters
        waiters = [:]
        for waiter in all.values { fail(waiter, error ?? ClientError.connectionClosed(reason)) }
    }
}
