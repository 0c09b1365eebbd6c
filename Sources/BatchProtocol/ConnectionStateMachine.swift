import NIOCore

/// Limits one connection lives by.
public struct ConnectionLimits: Sendable {
    public var maxFrameLength = ProtocolConstants.defaultMaxFrameLength
    /// The largest frame before the handshake is done (a Hello's worth).
    public var preHandshakeMaxFrameLength = ProtocolConstants.preHandshakeMaxFrameLength
    /// Requests read ahead before the connection stops reading until answers go out.
    public var maxInFlight = 64
    /// From the connection's start to a successful Hello; not restarted by bytes arriving.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// From a frame's first byte to its last, while the server is reading (a
    /// connection held back by its own in-flight requests or unread answers is not
    /// charged); not restarted by bytes arriving.
    public var frameTimeout: TimeAmount = .seconds(30)
    /// Nothing in flight, no partial frame and nothing received for this long closes the connection.
    public var idleTimeout: TimeAmount = .seconds(300)
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
///
/// Time comes in as `now` and goes out as `nextDeadline`: the handler arms a timer
/// for it and calls `timerFired` then. Deadlines are absolute (handshake: from the
/// connection's start; frame: from its first byte), so a client that trickles
/// bytes gains nothing by it.
public struct ConnectionStateMachine: Sendable {
    enum Phase: Sendable { case awaitingHello, ready, draining, closed }

    public let limits: ConnectionLimits
    private var phase = Phase.awaitingHello
    private var decoder: FrameDecoder
    /// The version agreed in the handshake (the client's).
    public private(set) var version = ProtocolConstants.version
    /// Requests read and not yet fully answered (a streaming BatchGet counts until its last frame).
    public private(set) var inFlight = 0
    private var batch: [Work] = []
    private var readingStopped = false
    private var writable = true
    private var parked: [StreamCursor] = []
    private let handshakeDeadline: NIODeadline
    /// When the partial frame in the decoder started arriving (nil: none, or not being read).
    private var frameStarted: NIODeadline?
    /// The last time bytes arrived or the last request was answered.
    private var lastActivity: NIODeadline

    public init(limits: ConnectionLimits, now: NIODeadline = .now()) {
        self.limits = limits
        decoder = FrameDecoder(maxFrameLength: min(limits.preHandshakeMaxFrameLength, limits.maxFrameLength))
        handshakeDeadline = now + limits.handshakeTimeout
        lastActivity = now
    }

    public var isClosed: Bool { phase == .closed }

    /// The Hello was accepted (the connection is no longer unauthenticated).
    public var isAuthenticated: Bool { phase == .ready || phase == .draining }

    /// When `timerFired` must next be called; nil: no deadline runs.
    public var nextDeadline: NIODeadline? {
        switch phase {
        case .awaitingHello:
            return handshakeDeadline
        case .ready:
            if let frameStarted { return frameStarted + limits.frameTimeout }
            if inFlight == 0 && decoder.bufferedBytes == 0 { return lastActivity + limits.idleTimeout }
            return nil
        case .draining, .closed:
            return nil
        }
    }

    // MARK: Inputs

    public mutating func received(_ bytes: ByteBuffer, now: NIODeadline = .now()) -> [ConnectionAction] {
        guard phase == .awaitingHello || phase == .ready else { return [] }
        lastActivity = now
        decoder.append(bytes)
        var actions: [ConnectionAction] = []
        decodeFrames(&actions, now: now)
        updateReading(&actions, now: now)
        return actions
    }

    /// The end of a read burst: hand on what it brought.
    public mutating func readComplete() -> [ConnectionAction] {
        var actions: [ConnectionAction] = []
        flushBatch(&actions)
        return actions
    }

    /// Answers went out for `completed` requests; `continuations` are streams with more to send.
    public mutating func workFinished(completed: Int, continuations: [StreamCursor] = [],
                                      now: NIODeadline = .now()) -> [ConnectionAction] {
        guard phase != .closed else { return [] }
        inFlight -= completed
        if inFlight == 0 { lastActivity = now }
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
        decodeFrames(&actions, now: now)  // frames left buffered while the in-flight limit was reached
        flushBatch(&actions)
        updateReading(&actions, now: now)
        return actions
    }

    public mutating func writabilityChanged(_ isWritable: Bool, now: NIODeadline = .now()) -> [ConnectionAction] {
        writable = isWritable
        var actions: [ConnectionAction] = []
        if writable && !parked.isEmpty && phase != .closed {
            actions.append(.resume(parked))
            parked = []
        }
        updateReading(&actions, now: now)
        return actions
    }

    /// The timer armed for `nextDeadline` went off (it may be early or stale: only
    /// a deadline that has passed closes the connection).
    public mutating func timerFired(now: NIODeadline = .now()) -> [ConnectionAction] {
        switch phase {
        case .awaitingHello:
            guard now >= handshakeDeadline else { return [] }
            return [close(.timeout, "no handshake within \(Self.describe(limits.handshakeTimeout))")]
        case .ready:
            if let frameStarted {
                guard now >= frameStarted + limits.frameTimeout else { return [] }
                return [close(.timeout, "a frame was started and not finished within \(Self.describe(limits.frameTimeout))")]
            }
            guard inFlight == 0, decoder.bufferedBytes == 0, now >= lastActivity + limits.idleTimeout else { return [] }
            return [close(.timeout, "idle for \(Self.describe(limits.idleTimeout))")]
        case .draining, .closed:
            return []
        }
    }

    static func describe(_ t: TimeAmount) -> String {
        t.nanoseconds % 1_000_000_000 == 0 ? "\(t.nanoseconds / 1_000_000_000) s" : "\(t.nanoseconds / 1_000_000) ms"
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
            updateReading(&actions, now: .now())
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

    private mutating func decodeFrames(_ actions: inout [ConnectionAction], now: NIODeadline) {
        var decodedAny = false
        defer { updateFrameClock(now: now, decodedAny: decodedAny) }
        while phase == .awaitingHello || phase == .ready, inFlight < limits.maxInFlight {
            let frame: Frame
            do {
                guard let next = try decoder.next() else { return }
                frame = next
                decodedAny = true
            } catch let error as ProtocolError where error.status.code == .frameTooLarge && phase == .awaitingHello {
                actions.append(close(ProtocolError(.frameTooLarge, "before the handshake a frame may be at most "
                                                   + "\(decoder.maxFrameLength) bytes: \(error.status.message)")))
                return
            } catch {
                actions.append(close(error))
                return
            }
            do {
                let request = try RequestCodec.decode(frame, version: version)
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

    /// A frame's clock starts with its first byte read and stops when it is whole;
    /// it does not run while the server itself holds reading back.
    private mutating func updateFrameClock(now: NIODeadline, decodedAny: Bool) {
        guard !readingStopped, phase == .awaitingHello || phase == .ready,
              inFlight < limits.maxInFlight, decoder.bufferedBytes > 0 else {
            frameStarted = nil
            return
        }
        if decodedAny || frameStarted == nil { frameStarted = now }
    }

    private mutating func handshake(_ request: Request, requestID: UInt32) throws -> ConnectionAction {
        guard case .hello(let version, let token) = request else {
            throw ProtocolError(.unauthorised, "the first frame must be a Hello")
        }
        guard (ProtocolConstants.oldestVersion...ProtocolConstants.version).contains(version) else {
            throw ProtocolError(.unsupportedVersion, "this server speaks versions \(ProtocolConstants.oldestVersion) to "
                                + "\(ProtocolConstants.version), not \(version)")
        }
        if let required = limits.requiredToken, !Self.sameToken(token, required) {
            throw ProtocolError(.unauthorised, token.isEmpty ? "this server requires a token" : "wrong token")
        }
        phase = .ready
        self.version = version
        decoder.maxFrameLength = limits.maxFrameLength
        let info = HelloInfo(version: version, maxFrameLength: UInt32(limits.maxFrameLength),
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

    private mutating func updateReading(_ actions: inout [ConnectionAction], now: NIODeadline) {
        let shouldRead = (phase == .awaitingHello || phase == .ready) && inFlight < limits.maxInFlight && writable
        if shouldRead && readingStopped {
            readingStopped = false
            actions.append(.startReading)
            // A partial frame held back by the server starts its clock again now.
            frameStarted = decoder.bufferedBytes > 0 ? now : nil
        } else if !shouldRead && !readingStopped && phase != .closed {
            readingStopped = true
            actions.append(.stopReading)
            frameStarted = nil
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
