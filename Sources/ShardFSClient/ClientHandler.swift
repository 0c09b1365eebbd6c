import BatchProtocol
import NIOCore

/// One streamed BatchGet item.
public struct BatchGetItem: Sendable, Hashable {
    /// Index of the key in the request.
    public var position: Int
    public var key: [UInt8]
    public var status: Status
    /// Present when the status is OK.
    public var entry: EntryPayload?
}

/// Who waits for the answer to a request.
enum Waiter {
    case reply(EventLoopPromise<Response>)
    case stream(keys: [[UInt8]], AsyncThrowingStream<BatchGetItem, Error>.Continuation)
}

/// Decodes response frames and hands each to the waiter of its request ID.
/// Lives on the channel's event loop; waiters are registered there too.
final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private var decoder = FrameDecoder(maxFrameLength: Int(UInt32.max))
    private var waiters: [UInt32: Waiter] = [:]
    private var closedReason: String?

    func register(_ id: UInt32, _ waiter: Waiter) -> Bool {
        if let reason = closedReason {
            fail(waiter, ClientError.connectionClosed(reason))
            return false
        }
        waiters[id] = waiter
        return true
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        decoder.append(unwrapInboundIn(data))
        do {
            while let frame = try decoder.next() {
                deliver(try ResponseCodec.decode(frame), context)
            }
        } catch {
            failAll("undecodable response: \(error)")
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll("the server closed the connection")
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        failAll("\(error)")
        context.close(promise: nil)
    }

    private func deliver(_ response: Response, _ context: ChannelHandlerContext) {
        switch response {
        case .error(_, let status):
            failAll(status.description)
            context.close(promise: nil)
        case .batchGetItem(let id, let position, let status, let entry):
            guard case .stream(let keys, let continuation) = waiters[id], Int(position) < keys.count else { return }
            continuation.yield(BatchGetItem(position: Int(position), key: keys[Int(position)], status: status, entry: entry))
        case .reply(_, let id, let status, _):
            switch waiters.removeValue(forKey: id) {
            case .reply(let promise):
                promise.succeed(response)
            case .stream(_, let continuation):
                if status.isOK { continuation.finish() } else { continuation.finish(throwing: ClientError.status(status)) }
            case nil:
                break
            }
        }
    }

    private func fail(_ waiter: Waiter, _ error: Error) {
        switch waiter {
        case .reply(let promise): promise.fail(error)
        case .stream(_, let continuation): continuation.finish(throwing: error)
        }
    }

    private func failAll(_ reason: String) {
        if closedReason == nil { closedReason = reason }
        let all = waiters
        waiters = [:]
        for waiter in all.values { fail(waiter, ClientError.connectionClosed(reason)) }
    }
}
