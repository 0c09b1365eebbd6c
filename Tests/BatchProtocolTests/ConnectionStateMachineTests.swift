import BatchProtocol
import NIOCore
import Testing

private func wire(_ request: Request, id: UInt32) -> ByteBuffer {
    var b = ByteBufferAllocator().buffer(capacity: 64)
    RequestCodec.encode(request, requestID: id, into: &b)
    return b
}

private let hello = wire(.hello(version: ProtocolConstants.version, token: ""), id: 0)

private func errorCode(_ actions: [ConnectionAction]) -> StatusCode? {
    for case .sendAndClose(.error(_, let status)) in actions { return status.code }
    return nil
}

@Suite struct ConnectionStateMachineTests {
    func ready(_ limits: ConnectionLimits = ConnectionLimits()) -> ConnectionStateMachine {
        var m = ConnectionStateMachine(limits: limits)
        let actions = m.received(hello)
        #expect(actions.count == 1)
        guard case .send(.reply(.hello, _, .ok, .hello)) = actions.first else {
            Issue.record("no HelloOK: \(actions)")
            return m
        }
        return m
    }

    @Test func requestsOfOneBurstGoToTheEngineTogether() {
        var m = ready()
        var burst = wire(.get(shard: 1, key: [0x61]), id: 1)
        var second = wire(.stat(1), id: 2)
        burst.writeBuffer(&second)
        // Drip-fed: nothing runs before the burst ends.
        for byte in burst.readableBytesView { #expect(m.received(ByteBuffer(bytes: [byte])).isEmpty) }
        #expect(m.readComplete() == [.execute([Work(requestID: 1, request: .get(shard: 1, key: [0x61])),
                                              Work(requestID: 2, request: .stat(1))])])
        #expect(m.inFlight == 2)
        #expect(m.workFinished(completed: 2).isEmpty)
        #expect(m.inFlight == 0)
    }

    @Test func anythingBeforeHelloIsUnauthorised() {
        var m = ConnectionStateMachine(limits: ConnectionLimits())
        #expect(errorCode(m.received(wire(.stat(1), id: 5))) == .unauthorised)
        #expect(m.isClosed)
        #expect(m.received(hello).isEmpty)  // closed stays closed
    }

    @Test func aWrongTokenOrVersionIsRefused() {
        var limits = ConnectionLimits()
        limits.requiredToken = "s3cret"
        var m = ConnectionStateMachine(limits: limits)
        #expect(errorCode(m.received(hello)) == .unauthorised)
        var m2 = ConnectionStateMachine(limits: limits)
        #expect(errorCode(m2.received(wire(.hello(version: 1, token: "nope"), id: 0))) == .unauthorised)
        var m3 = ConnectionStateMachine(limits: limits)
        guard case .send = m3.received(wire(.hello(version: 1, token: "s3cret"), id: 0)).first else {
            Issue.record("the right token was refused")
            return
        }
        var m4 = ConnectionStateMachine(limits: ConnectionLimits())
        #expect(errorCode(m4.received(wire(.hello(version: 9, token: ""), id: 0))) == .unsupportedVersion)
    }

    @Test func randomBytesCloseWithAnError() {
        var m = ConnectionStateMachine(limits: ConnectionLimits())
        #expect(errorCode(m.received(ByteBuffer(bytes: [0x47, 0x45, 0x54, 0x20, 0x2F, 0x20, 0x48, 0x54]))) != nil)
        #expect(m.isClosed)
    }

    @Test func anOversizedFrameClosesWithFrameTooLarge() {
        var m = ready()
        #expect(errorCode(m.received(ByteBuffer(bytes: [0xFF, 0xFF, 0xFF, 0xFF]))) == .frameTooLarge)
    }

    @Test func aStalledHalfFrameTimesOutButAnIdleConnectionWaits() {
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
        var limits = ConnectionLimits()
        limits.idleTimeout = .seconds(300)
        limits.frameTimeout = .seconds(30)
        var m = ConnectionStateMachine(limits: limits, now: t0)
        _ = m.received(hello, now: t0)
        #expect(m.nextDeadline == t0 + .seconds(300))
        #expect(m.timerFired(now: t0 + .seconds(299)).isEmpty)
        #expect(errorCode(m.timerFired(now: t0 + .seconds(300))) == .timeout)  // idle too long
        var m2 = ConnectionStateMachine(limits: limits, now: t0)
        _ = m2.received(hello, now: t0)
        let half = wire(.stat(1), id: 1).getSlice(at: 0, length: 6)!
        #expect(m2.received(half, now: t0 + .seconds(1)).isEmpty)
        #expect(m2.nextDeadline == t0 + .seconds(31))
        #expect(errorCode(m2.timerFired(now: t0 + .seconds(31))) == .timeout)
    }

    /// The issue's slow client: bytes trickling in do not move a deadline.
    @Test func deadlinesRunFromTheStartNotFromTheLastByte() {
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
        var limits = ConnectionLimits()
        limits.handshakeTimeout = .seconds(10)
        limits.frameTimeout = .seconds(30)
        // A Hello at one byte a second (17 bytes) never makes it: closed at 10 s.
        var m = ConnectionStateMachine(limits: limits, now: t0)
        var closedAt: Int?
        for (i, byte) in hello.readableBytesView.enumerated() {
            let now = t0 + .seconds(Int64(i))
            if let deadline = m.nextDeadline, deadline <= now, errorCode(m.timerFired(now: now)) == .timeout {
                closedAt = i
                break
            }
            _ = m.received(ByteBuffer(bytes: [byte]), now: now)
            #expect(m.nextDeadline == t0 + .seconds(10))
        }
        #expect(closedAt == 10)
        // After the handshake: a Put trickled at one byte a second is closed 30 s after its first byte.
        var r = ConnectionStateMachine(limits: limits, now: t0)
        _ = r.received(hello, now: t0)
        let put = wire(.put(client: "c", shard: 1, item: PutItem(key: [0x61], value: [UInt8](repeating: 7, count: 100))), id: 1)
        closedAt = nil
        for (i, byte) in put.readableBytesView.enumerated() {
            let now = t0 + .seconds(Int64(100 + i))
            if let deadline = r.nextDeadline, deadline <= now, errorCode(r.timerFired(now: now)) == .timeout {
                closedAt = i
                break
            }
            _ = r.received(ByteBuffer(bytes: [byte]), now: now)
            #expect(r.nextDeadline == t0 + .seconds(130))
        }
        #expect(closedAt == 30)
        // A frame that comes whole in time stops its clock; the next one starts a new one.
        var q = ConnectionStateMachine(limits: limits, now: t0)
        _ = q.received(hello, now: t0)
        _ = q.received(put.getSlice(at: 0, length: 10)!, now: t0 + .seconds(1))
        var rest = put.getSlice(at: 10, length: put.readableBytes - 10)!
        var nextHalf = put.getSlice(at: 0, length: 3)!
        rest.writeBuffer(&nextHalf)
        _ = q.received(rest, now: t0 + .seconds(29))
        #expect(q.nextDeadline == t0 + .seconds(59))
        #expect(q.timerFired(now: t0 + .seconds(31)).isEmpty)
    }

    @Test func aFrameTheServerHoldsBackIsNotCharged() {
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
        var limits = ConnectionLimits()
        limits.maxInFlight = 1
        limits.frameTimeout = .seconds(30)
        var m = ConnectionStateMachine(limits: limits, now: t0)
        _ = m.received(hello, now: t0)
        var bytes = wire(.stat(1), id: 1)
        var half = wire(.stat(2), id: 2).getSlice(at: 0, length: 6)!
        bytes.writeBuffer(&half)
        #expect(m.received(bytes, now: t0) == [.stopReading])
        _ = m.readComplete()
        #expect(m.nextDeadline == nil)  // one request in flight, reading stopped: no clock runs
        #expect(m.timerFired(now: t0 + .seconds(100)).isEmpty)
        #expect(m.workFinished(completed: 1, now: t0 + .seconds(100)) == [.startReading])
        #expect(m.nextDeadline == t0 + .seconds(130))  // the half frame's clock starts when reading does
    }

    @Test func beforeTheHandshakeAFrameMayBeAtMost4KiB() {
        var m = ConnectionStateMachine(limits: ConnectionLimits())
        // 16 MiB is the limit after the handshake, not before it.
        #expect(errorCode(m.received(ByteBuffer(bytes: [0x00, 0x00, 0x10, 0x01]))) == .frameTooLarge)
        var big = ConnectionStateMachine(limits: ConnectionLimits())
        #expect(big.received(wire(.hello(version: 2, token: String(repeating: "t", count: 4000)), id: 0)).count == 1)
        #expect(big.isAuthenticated)
        #expect(big.received(ByteBuffer(bytes: [0x00, 0xF0, 0x00, 0x00])).isEmpty)  // 15 MiB now announced: fine
    }

    @Test func versionOneClientsAreUnderstoodAndCloseWithoutAClientID() throws {
        var m = ConnectionStateMachine(limits: ConnectionLimits())
        let answer = m.received(wire(.hello(version: 1, token: ""), id: 0))
        guard case .send(.reply(.hello, _, .ok, .hello(let info))) = answer.first else {
            Issue.record("version 1 refused: \(answer)")
            return
        }
        #expect(info.version == 1 && m.version == 1)
        var old = ByteBufferAllocator().buffer(capacity: 32)
        RequestCodec.encode(.closeShard(client: "ignored", shard: 5), requestID: 3, version: 1, into: &old)
        #expect(old.readableBytes == 4 + 5 + 8)  // version 1: the shard alone
        _ = m.received(old)
        #expect(m.readComplete() == [.execute([Work(requestID: 3, request: .closeShard(client: "", shard: 5))])])
        var v2 = ConnectionStateMachine(limits: ConnectionLimits())
        _ = v2.received(wire(.hello(version: 2, token: ""), id: 0))
        _ = v2.received(wire(.deleteShard(client: "me", shard: 6), id: 4))
        #expect(v2.readComplete() == [.execute([Work(requestID: 4, request: .deleteShard(client: "me", shard: 6))])])
        var v3 = ConnectionStateMachine(limits: ConnectionLimits())
        #expect(errorCode(v3.received(wire(.hello(version: 3, token: ""), id: 0))) == .unsupportedVersion)
    }

    @Test func theInFlightLimitStopsReadingUntilAnswersGoOut() {
        var limits = ConnectionLimits()
        limits.maxInFlight = 2
        var m = ready(limits)
        var bytes = ByteBufferAllocator().buffer(capacity: 64)
        for id in 1...3 {
            var one = wire(.stat(UInt64(id)), id: UInt32(id))
            bytes.writeBuffer(&one)
        }
        #expect(m.received(bytes) == [.stopReading])
        #expect(m.readComplete() == [.execute([Work(requestID: 1, request: .stat(1)), Work(requestID: 2, request: .stat(2))])])
        // The third frame waits in the buffer and runs once one answer is out.
        #expect(m.nextDeadline == nil)  // a full pipeline is not a stalled frame
        #expect(m.workFinished(completed: 1) == [.execute([Work(requestID: 3, request: .stat(3))])])
        #expect(m.workFinished(completed: 2) == [.startReading])
    }

    @Test func aSlowReaderParksStreamsAndStopsReading() {
        var m = ready()
        _ = m.received(wire(.batchGet(shard: 1, keys: [[0x61], [0x62]]), id: 7))
        _ = m.readComplete()
        #expect(m.writabilityChanged(false) == [.stopReading])
        let cursor = StreamCursor(requestID: 7, shard: 1, keys: [[0x61], [0x62]], next: 1)
        #expect(m.workFinished(completed: 0, continuations: [cursor]).isEmpty)  // parked
        #expect(m.writabilityChanged(true) == [.resume([cursor]), .startReading])
        #expect(m.workFinished(completed: 1).isEmpty)
    }

    @Test func shutdownDrainsInFlightRequestsThenCloses() {
        var m = ready()
        _ = m.received(wire(.stat(1), id: 1))
        _ = m.readComplete()
        #expect(m.shutdown() == [.stopReading])
        #expect(m.received(wire(.stat(2), id: 2)).isEmpty)  // nothing new is read
        #expect(errorCode(m.workFinished(completed: 1)) == .shuttingDown)
    }

    @Test func aSecondHelloIsAProtocolError() {
        var m = ready()
        #expect(errorCode(m.received(hello)) == .invalidRequest)
    }
}
