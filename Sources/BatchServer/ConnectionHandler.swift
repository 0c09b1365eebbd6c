import BatchProtocol
import NIOCore
import NIOPosix

/// Asks a connection to drain and close (graceful shutdown).
struct DrainEvent: Sendable {}

/// Carries out a `ConnectionStateMachine`'s actions on one channel. Engine work
/// runs on the thread pool; its answers come back to the event loop in one hop per job.
final class ConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var machine: ConnectionStateMachine
    private let executor: RequestExecutor
    private let pool: NIOThreadPool
    private var readingStopped = false
    private var readPending = false

    init(limits: ConnectionLimits, executor: RequestExecutor, pool: NIOThreadPool) {
        machine = ConnectionStateMachine(limits: limits)
        self.executor = executor
        self.pool = pool
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        perform(machine.received(unwrapInboundIn(data)), context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        perform(machine.readComplete(), context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        perform(machine.writabilityChanged(context.channel.isWritable), context)
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            perform(machine.readTimedOut(), context)
        } else if event is DrainEvent {
            perform(machine.shutdown(), context)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        machine.closed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        machine.closed()
        context.close(promise: nil)
    }

    /// Reads are held back while the state machine says so (backpressure).
    func read(context: ChannelHandlerContext) {
        if readingStopped { readPending = true } else { context.read() }
    }

    private func perform(_ actions: [ConnectionAction], _ context: ChannelHandlerContext) {
        for action in actions {
            switch action {
            case .send(let response):
                var out = context.channel.allocator.buffer(capacity: 64)
                ResponseCodec.encode(response, into: &out)
                context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            case .execute(let works):
                dispatch(works, context)
            case .resume(let cursors):
                submit(works: [], resume: cursors, context)
            case .sendAndClose(let response):
                var out = context.channel.allocator.buffer(capacity: 64)
                ResponseCodec.encode(response, into: &out)
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in channel.close(promise: nil) }
            case .stopReading:
                readingStopped = true
            case .startReading:
                readingStopped = false
                if readPending {
                    readPending = false
                    context.read()
                }
            }
        }
    }

    /// Reads go together in one job; writes go in one job per shard (in order), so
    /// an fsync does not hold up reads, and different shards commit in parallel.
    private func dispatch(_ works: [Work], _ context: ChannelHandlerContext) {
        var reads: [Work] = []
        var writes: [UInt64: [Work]] = [:]
        var shardOrder: [UInt64] = []
        for work in works {
            if work.request.isWrite, let shard = work.request.dataShard {
                if writes[shard] == nil { shardOrder.append(shard) }
                writes[shard, default: []].append(work)
            } else {
                reads.append(work)
            }
        }
        if !reads.isEmpty { submit(works: reads, resume: [], context) }
        for shard in shardOrder { submit(works: writes[shard]!, resume: [], context) }
    }

    private func submit(works: [Work], resume: [StreamCursor], _ context: ChannelHandlerContext) {
        let executor = self.executor
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        pool.runIfActive(eventLoop: context.eventLoop) {
            executor.runSync(works, resume: resume)
        }.whenComplete { result in
            let (handler, context) = bound.value
            switch result {
            case .success(let outcome):
                handler.finish(outcome, context)
            case .failure:
                // The pool is shutting down: nothing more will be answered.
                handler.machine.closed()
                context.close(promise: nil)
            }
        }
    }

    private func finish(_ outcome: Outcome, _ context: ChannelHandlerContext) {
        guard !machine.isClosed else { return }
        if outcome.out.readableBytes > 0 {
            context.writeAndFlush(wrapOutboundOut(outcome.out), promise: nil)
        }
        let executor = self.executor
        let loop = context.eventLoop
        for work in outcome.deferred {
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            Task {
                let answer = await executor.runAsync(work)
                loop.execute {
                    let (handler, context) = bound.value
                    handler.finish(answer, context)
                }
            }
        }
        if outcome.completed > 0 || !outcome.continuations.isEmpty {
            perform(machine.workFinished(completed: outcome.completed, continuations: outcome.continuations), context)
        }
    }
}

/// Sends one error frame to a connection the server will not serve, then closes it.
final class RejectHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let status: Status

    init(_ status: Status) { self.status = status }

    func channelActive(context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: 64)
        ResponseCodec.encode(.error(requestID: 0, status), into: &out)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}
