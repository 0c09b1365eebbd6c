import NIOCore

/// Limits one connection lives by.
public struct ConnectionLimits: Sendable {
    public var maxFrameLength = ProtocolConstants.defaultMaxFrameLength
    /// Requests read ahead before the connection stops reading until answers go out.
    public var maxInFlight = 64
    /// Read timeouts in a row, with nothing in flight, after which an idle connection is closed.
    public var idleTimeoutTicks = 30
    /// The token a Hello must carry; nil means none is asked for.
    public var requiredToken: String?

    public init() {}
}

/// A request handed to the engine, with the ID its answer carries.
public struct Work: Hashable, Sendable {
    public var requestID: UInt32
    public var request: Request
    public init(requestID: UInt32, request: Request) {
        self.requestID = requestID
        self.request = request
    }
}

/// A BatchGet partly streamed: the keys from `next` on are still to be sent.
public struct StreamCursor: Hashable, Sendable {
    public var requestID: UInt32
    public var shard: UInt64
    public var keys: [[UInt8]]
    public var next: Int
    public init(requestID: UInt32, shard: UInt64, keys: [[UInt8]], next: Int = 0) {
        self.requestID = requestID
        self.shard = shard
        self.keys = keys
        self.next = next
    }
}

/// What the channel handler must do. It does these and nothing else.
public enum ConnectionAction: Hashable, Sendable {
    /// Send a response (the handshake's answer).
    case send(Response)
    /// Run requests on the engine's threads; report with `workFinished`.
    case execute([Work])
    /// Carry on streaming BatchGets; report with `workFinished` too.
    case resume([StreamCursor])
    /// Send this error frame, then close.
    case sendAndClose(Response)
    case stopReading
    case startReading
}

/// The server side of one connection, without I/O: bytes and events in, actions out.
///
/// Requests decoded during one read burst are handed on together at `readComplete`,
/// so a pipelining client costs one trip to the engine threads per burst, not per request.
public struct ConnectionStateMachine: Sendable {
    enum Phase: Sendable { case awaitingHello, ready, draining, closed }

    public let limits: ConnectionLimits
    private var phase = Phase.awaitingHello
    private var decoder: FrameDecoder
    /// Requests read and not yet fully answered (a streaming BatchGet counts until its last frame).
    public private(set) var inFlight = 0
    private var batch: [Work] = []
    private var readingStopped = false
    private var writable = true
    private var parked: [StreamCursor] = []
    private var idleTicks = 0

    public init(limits: ConnectionLimits) {
        self.limits = limits
        decoder = FrameDecoder(maxFrameLength: limits.maxFrameLength)
    }

    public var isClosed: Bool { phase == .closed }

    // MARK: Inputs

    public mutating func received(_ bytes: ByteBuffer) -> [ConnectionAction] {
        guard phase == .awaitingHello || phase == .ready else { return [] }
        idleTicks = 0
        decoder.append(bytes)
        var actions: [ConnectionAction] = []
        decodeFrames(&actions)
        updateReading(&actions)
        return actions
    }

    /// The end of a read burst: hand on what it brought.
    public mutating func readComplete() -> [ConnectionAction] {
        var actions: [ConnectionAction] = []
        flushBatch(&actions)
        return actions
    }

    /// Answers went out for `completed` requests; `continuations` are streams with more to send.
    public mutating func workFinished(completed: Int, continuations: [StreamCursor] = []) -> [ConnectionAction] {
        guard phase != .closed else { return [] }
        inFlight -= completed
        var actions: [ConnectionAction] = []
        if writable {
            if !continuations.isEmpty { actions.append(.resume(continuations)) }
        } else {
            parked += continuations
        }
        if phase == .draining {
            if inFlight == 0 { actions.append(close(.shuttingDown, "the server is shutting down")) }
            return actions
        }
        decodeFrames(&actions)  // frames left buffered while the in-flight limit was reached
        flushBatch(&actions)
        updateReading(&actions)
        return actions
    }

    public mutating func writabilityChanged(_ isWritable: Bool) -> [ConnectionAction] {
        writable = isWritable
        var actions: [ConnectionAction] = []
        if writable && !parked.isEmpty && phase != .closed {
            actions.append(.resume(parked))
            parked = []
        }
        updateReading(&actions)
        return actions
    }

    /// No bytes arrived for one read-timeout period.
    public mutating func readTimedOut() -> [ConnectionAction] {
        switch phase {
        case .awaitingHello:
            return [close(.timeout, "no handshake in time")]
        case .ready:
            // Buffered bytes while reading is on can only be a partial frame: the client stalled mid-frame.
            if decoder.bufferedBytes > 0 && inFlight < limits.maxInFlight && writable {
                return [close(.timeout, "a frame was started and not finished in time")]
            }
            guard inFlight == 0 else { return [] }
            idleTicks += 1
            return idleTicks >= limits.idleTimeoutTicks ? [close(.timeout, "idle for too long")] : []
        case .draining, .closed:
            return []
        }
    }

    /// Stop reading, answer what was read, then close.
    public mutating func shutdown() -> [ConnectionAction] {
        switch phase {
        case .closed, .draining:
            return []
        case .awaitingHello:
            return [close(.shuttingDown, "the server is shutting down")]
        case .ready:
            batch = []
            if inFlight == 0 { return [close(.shuttingDown, "the server is shutting down")] }
            phase = .draining
            var actions: [ConnectionAction] = []
            updateReading(&actions)
            return actions
        }
    }

    /// The connection is gone; later completions are dropped.
    public mutating func closed() {
        phase = .closed
        batch = []
        parked = []
    }

    // MARK: Internals

    private mutating func decodeFrames(_ actions: inout [ConnectionAction]) {
        while phase == .awaitingHello || phase == .ready, inFlight < limits.maxInFlight {
            let frame: Frame
            do {
                guard let next = try decoder.next() else { return }
                frame = next
            } catch {
                actions.append(close(error))
                return
            }
            do {
                let request = try RequestCodec.decode(frame)
                if phase == .awaitingHello {
                    actions.append(try handshake(request, requestID: frame.requestID))
                } else if case .hello = request {
                    throw ProtocolError(.invalidRequest, "a second Hello")
                } else {
                    batch.append(Work(requestID: frame.requestID, request: request))
                    inFlight += 1
                }
            } catch {
                // Before the handshake only a Hello is heard: anything else is unauthorised.
                let failure = phase == .awaitingHello && frame.type != Opcode.hello.rawValue
                    ? ProtocolError(.unauthorised, "the first frame must be a Hello") : error
                actions.append(close(failure, requestID: frame.requestID))
                return
            }
        }
    }

    private mutating func handshake(_ request: Request, requestID: UInt32) throws -> ConnectionAction {
        guard case .hello(let version, let token) = request else {
            throw ProtocolError(.unauthorised, "the first frame must be a Hello")
        }
        guard version == ProtocolConstants.version else {
            throw ProtocolError(.unsupportedVersion, "this server speaks version \(ProtocolConstants.version), not \(version)")
        }
        if let required = limits.requiredToken, !Self.sameToken(token, required) {
            throw ProtocolError(.unauthorised, token.isEmpty ? "this server requires a token" : "wrong token")
        }
        phase = .ready
        let info = HelloInfo(version: ProtocolConstants.version, maxFrameLength: UInt32(limits.maxFrameLength),
                             maxInFlight: UInt32(limits.maxInFlight))
        return .send(.reply(.hello, requestID: requestID, .ok, .hello(info)))
    }

    /// Compares without stopping at the first difference, so timing does not reveal the token.
    static func sameToken(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        var diff = UInt8(x.count == y.count ? 0 : 1)
        for i in 0..<max(x.count, y.count) {
            diff |= (i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0)
        }
        return diff == 0
    }

    private mutating func flushBatch(_ actions: inout [ConnectionAction]) {
        guard !batch.isEmpty, phase == .ready else { return }
        actions.append(.execute(batch))
        batch = []
    }

    private mutating func updateReading(_ actions: inout [ConnectionAction]) {
        let shouldRead = (phase == .awaitingHello || phase == .ready) && inFlight < limits.maxInFlight && writable
        if shouldRead && readingStopped {
            readingStopped = false
            actions.append(.startReading)
        } else if !shouldRead && !readingStopped && phase != .closed {
            readingStopped = true
            actions.append(.stopReading)
        }
    }

    private mutating func close(_ code: StatusCode, _ message: String) -> ConnectionAction {
        close(ProtocolError(code, message))
    }

    private mutating func close(_ error: Error, requestID: UInt32 = 0) -> ConnectionAction {
        phase = .closed
        batch = []
        parked = []
        let status = (error as? ProtocolError)?.status ?? Status(.invalidRequest, "\(error)")
        return .sendAndClose(.error(requestID: requestID, status))
    }
}
