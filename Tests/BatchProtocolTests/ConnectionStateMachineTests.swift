import BatchProtocol
import NIOCore
import Testing

private func wire(_ request: Request, id: UInt32) -> ByteBuffer {
    var b = ByteBufferAllocator().buffer(capacity: 64)
    RequestCodec.encode(request, requestID: id, into: &b)
    return b
}

private let hello = wire(.hello(version: 1, token: ""), id: 0)

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
        var limits = ConnectionLimits()
        limits.idleTimeoutTicks = 3
        var m = ready(limits)
        #expect(m.readTimedOut().isEmpty)
        #expect(m.readTimedOut().isEmpty)
        #expect(errorCode(m.readTimedOut()) == .timeout)  // idle for 3 periods
        var m2 = ready(limits)
        let half = wire(.stat(1), id: 1).getSlice(at: 0, length: 6)!
        #expect(m2.received(half).isEmpty)
        #expect(errorCode(m2.readTimedOut()) == .timeout)
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
        #expect(m.readTimedOut().isEmpty)  // a full pipeline is not a stalled frame
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
