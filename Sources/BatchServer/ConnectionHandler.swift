import BatchProtocol
import NIOCore
import NIOConcurrencyHelpers
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
    private let registry: ConnectionRegistry
    private var readingStopped = false
    private var readPending = false
    private var toldAuthenticated = false
    /// The timer armed for the machine's next deadline, and that deadline.
    private var timer: Scheduled<Void>?
    private var timerDeadline: NIODeadline?
    /// Each shard's writes from this connection, in arrival order.
    private var lanes: [UInt64: WriteLane] = [:]
    /// When each request in progress arrived (metrics: its latency).
    private var arrived: [UInt32: NIODeadline] = [:]

    init(limits: ConnectionLimits, executor: RequestExecutor, pool: NIOThreadPool, registry: ConnectionRegistry) {
        machine = ConnectionStateMachine(limits: limits)
        self.executor = executor
        self.pool = pool
        self.registry = registry
    }

    func channelActive(context: ChannelHandlerContext) {
        armTimer(context)  // the handshake deadline
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        ServerMetrics.bytesIn.increment(by: Int64(bytes.readableBytes))
        perform(machine.received(bytes), context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        perform(machine.readComplete(), context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        perform(machine.writabilityChanged(context.channel.isWritable), context)
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is EvictEvent {
            guard !machine.isClosed else { return }
            machine.closed()
            perform([.sendAndClose(.error(requestID: 0, Status(.tooManyConnections,
                "too many connections are waiting for their handshake: the oldest, this one, was closed")))], context)
        } else if event is DrainEvent {
            perform(machine.shutdown(), context)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        machine.closed()
        timer?.cancel()
        timer = nil
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
                ServerMetrics.bytesOut.increment(by: Int64(out.readableBytes))
                context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            case .execute(let works):
                let now = NIODeadline.now()
                for work in works { arrived[work.requestID] = now }
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
        if !toldAuthenticated && machine.isAuthenticated {
            toldAuthenticated = true
            registry.authenticated(context.channel)
        }
        armTimer(context)
    }

    /// Keeps one timer at or before the machine's next deadline. A deadline that
    /// moved later is caught when the earlier timer fires and finds nothing due.
    private func armTimer(_ context: ChannelHandlerContext) {
        guard !machine.isClosed, let next = machine.nextDeadline else { return }
        if let armed = timerDeadline, armed <= next { return }
        timer?.cancel()
        timerDeadline = next
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(deadline: next) {
            let (handler, context) = bound.value
            handler.timer = nil
            handler.timerDeadline = nil
            handler.perform(handler.machine.timerFired(), context)
        }
    }

    /// Reads go together in one job; writes go to their shard's lane (in order),
    /// so an fsync does not hold up reads, and different shards commit in parallel.
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
        for shard in shardOrder {
            let lane = lanes[shard] ?? WriteLane()
            lanes[shard] = lane
            if lane.enqueue(writes[shard]!) { drain(lane, shard: shard, context) }
        }
    }

    /// Runs a lane's writes on an engine thread until the lane is empty. Writes
    /// that arrive meanwhile join the lane without waking a thread, and each round
    /// takes all of them (one transaction); its answers go back in one hop. After
    /// `roundsPerJob` rounds the job goes to the back of the pool's queue, so a
    /// client that keeps a lane busy does not keep an engine thread from others.
    private func drain(_ lane: WriteLane, shard: UInt64, _ context: ChannelHandlerContext) {
        let executor = self.executor
        let loop = context.eventLoop
        let pool = self.pool
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        @Sendable func job(_ state: NIOThreadPool.WorkItemState) {
            guard case .active = state else {
                loop.execute {
                    // The pool is shutting down: nothing more will be answered.
                    let (handler, context) = bound.value
                    handler.machine.closed()
                    context.close(promise: nil)
                }
                return
            }
            for _ in 0..<Self.roundsPerJob {
                guard let works = lane.take() else {
                    loop.execute {
                        let (handler, _) = bound.value
                        handler.dropIfIdle(lane, shard: shard)
                    }
                    return
                }
                let outcome = executor.runSync(works)
                loop.execute {
                    let (handler, context) = bound.value
                    handler.finish(outcome, context)
                }
            }
            pool.submit(job)
        }
        pool.submit(job)
    }

    static let roundsPerJob = 8

    /// Forgets a lane with nothing queued or running (a connection may write to
    /// many shards over its life).
    private func dropIfIdle(_ lane: WriteLane, shard: UInt64) {
        if lanes[shard] === lane, lane.isIdle { lanes[shard] = nil }
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
            ServerMetrics.bytesOut.increment(by: Int64(outcome.out.readableBytes))
            context.writeAndFlush(wrapOutboundOut(outcome.out), promise: nil)
        }
        if !outcome.finished.isEmpty {
            let now = NIODeadline.now()
            for done in outcome.finished {
                let took = arrived.removeValue(forKey: done.requestID).map { (now - $0).nanoseconds } ?? 0
                ServerMetrics.finished(done.opcode, done.code, nanoseconds: took)
            }
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
        if !outcome.redirects.isEmpty {
            let redirects = outcome.redirects
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            Task {
                let answer = await executor.redirect(redirects)
                loop.execute {
                    let (handler, context) = bound.value
                    handler.finish(answer, context)
                }
            }
        }
        // Reads whose answers did not fit beside these: a job of their own.
        if !outcome.postponed.isEmpty { submit(works: outcome.postponed, resume: [], context) }
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
    /// How long the answer may wait for a TLS handshake (the server's handshake timeout).
    let deadline: TimeAmount

    init(_ status: Status, deadline: TimeAmount) {
        self.status = status
        self.deadline = deadline
    }

    func channelActive(context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: 64)
        ResponseCodec.encode(.error(requestID: 0, status), into: &out)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in channel.close(promise: nil) }
        // Over TLS the answer waits for a handshake a silent client never makes.
        context.eventLoop.scheduleTask(in: deadline) { channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// One connection's writes to one shard, queued in order for at most one engine
/// job at a time. The event loop enqueues; the job takes.
final class WriteLane: @unchecked Sendable {
    private let lock = NIOLock()
    private var queue: [Work] = []
    private var running = false

    /// Queues writes; true when no job is running, so the caller must start one.
    func enqueue(_ works: [Work]) -> Bool {
        lock.withLock {
            queue += works
            if running { return false }
            running = true
            return true
        }
    }

    /// Everything queued, or nil (and the job ends) when the lane is empty.
    func take() -> [Work]? {
        lock.withLock {
            guard !queue.isEmpty else {
                running = false
                return nil
            }
            let works = queue
            queue = []
            return works
        }
    }

    /// Nothing queued and no job running.
    var isIdle: Bool { lock.withLock { !running && queue.isEmpty } }
}
