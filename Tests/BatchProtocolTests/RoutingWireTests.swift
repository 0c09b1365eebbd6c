import BatchProtocol
import NIOCore
import Testing

/// Locate and the NOT_SHARD_LEADER redirect on the wire.
@Suite struct RoutingWireTests {
    private func wire(_ response: Response) -> [UInt8] {
        var b = ByteBufferAllocator().buffer(capacity: 64)
        ResponseCodec.encode(response, into: &b)
        return b.readBytes(length: b.readableBytes)!
    }

    /// Feeds `bytes` one at a time; every frame that completes is decoded.
    private func dripFed(_ bytes: [UInt8]) throws -> [Response] {
        var decoder = FrameDecoder()
        var out: [Response] = []
        for byte in bytes {
            decoder.append(ByteBuffer(bytes: [byte]))
            while let frame = try decoder.next() { out.append(try ResponseCodec.decode(frame)) }
        }
        #expect(decoder.bufferedBytes == 0)
        return out
    }

    private let location = ShardLocation(
        shard: 42, volumeID: "vol-1", epoch: 7, closed: true, primary: NodeLocation(nodeID: "node-a", address: "10.0.0.1:7070"),
        backups: [NodeLocation(nodeID: "node-b", address: "10.0.0.2:7070"), NodeLocation(nodeID: "node-c", address: "")],
        answeredBy: "node-b")

    @Test func locateIsByteExact() throws {
        var b = ByteBufferAllocator().buffer(capacity: 32)
        RequestCodec.encode(.locate(5), requestID: 3, into: &b)
        #expect(b.readBytes(length: b.readableBytes)! == [0, 0, 0, 13, 0x0E, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 5])

        let bytes = wire(.reply(.locate, requestID: 3, .ok, .location(ShardLocation(
            shard: 5, volumeID: "v", epoch: 2, closed: false, primary: NodeLocation(nodeID: "a", address: "h:1"),
            backups: [NodeLocation(nodeID: "b", address: "")], answeredBy: "b"))))
        let body: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 5, 0, 1, 0x76, 0, 0, 0, 0, 0, 0, 0, 2, 0,
                             0, 1, 0x61, 0, 3, 0x68, 0x3A, 0x31, 0, 1, 0, 1, 0x62, 0, 0, 0, 1, 0x62]
        #expect(bytes == [0, 0, 0, UInt8(5 + 4 + body.count), 0x8E, 0, 0, 0, 3, 0, 0, 0, 0] + body)
    }

    @Test func aRedirectCarriesThePrimarysAddressByteExact() {
        let bytes = wire(.reply(.put, requestID: 2, Status(.notShardLeader, "x"), .leader("h:1")))
        #expect(bytes == [0, 0, 0, 15, 0x82, 0, 0, 0, 2, 0, 10, 0, 1, 0x78, 0, 3, 0x68, 0x3A, 0x31])
        // Unknown primary: the field is still there, empty.
        #expect(wire(.reply(.put, requestID: 2, Status(.notShardLeader), .none))
                    == [0, 0, 0, 11, 0x82, 0, 0, 0, 2, 0, 10, 0, 0, 0, 0])
    }

    @Test func locateAndRedirectsSurviveBytesDripFedOneAtATime() throws {
        let responses: [Response] = [
            .reply(.locate, requestID: 1, .ok, .location(location)),
            .reply(.locate, requestID: 2, .ok, .location(ShardLocation(
                shard: 1, volumeID: "", epoch: 0, closed: false, primary: NodeLocation(nodeID: "", address: ""),
                backups: [], answeredBy: ""))),
            .reply(.locate, requestID: 3, Status(.shardNotFound, "shard 9 not found"), .none),
            .reply(.put, requestID: 4, Status(.notShardLeader, "not the primary"), .leader("10.0.0.1:7070")),
            .reply(.batchPut, requestID: 5, Status(.notShardLeader), .leader("")),
            .reply(.get, requestID: 6, Status(.notShardLeader, "not here"), .leader("[::1]:7070")),
            // The final frame of a BatchGet and lifecycle requests redirect the same way.
            .reply(.batchGet, requestID: 7, Status(.notShardLeader), .leader("h:9")),
            .reply(.closeShard, requestID: 8, Status(.notShardLeader), .leader("h:9")),
            .reply(.put, requestID: 9, .ok, .none),
        ]
        var all: [UInt8] = []
        for r in responses { all += wire(r) }
        #expect(try dripFed(all) == responses)

        var requests = ByteBufferAllocator().buffer(capacity: 64)
        RequestCodec.encode(.locate(UInt64.max), requestID: 77, into: &requests)
        var decoder = FrameDecoder()
        var frames: [Frame] = []
        for byte in requests.readableBytesView {
            decoder.append(ByteBuffer(bytes: [byte]))
            if let f = try decoder.next() { frames.append(f) }
        }
        #expect(try frames.map { try RequestCodec.decode($0) } == [.locate(UInt64.max)])
        #expect(frames.first?.requestID == 77)
    }

    @Test func cutShortOrPaddedLocateAndRedirectFramesAreRefused() throws {
        for response in [Response.reply(.locate, requestID: 1, .ok, .location(location)),
                         .reply(.put, requestID: 1, Status(.notShardLeader, "m"), .leader("h:1"))] {
            let bytes = wire(response)
            for cut in 1..<(bytes.count - 9) {
                // The same frame with its length (and body) cut short by `cut` bytes.
                var short = Array(bytes.dropLast(cut))
                short[3] -= UInt8(cut)
                var decoder = FrameDecoder()
                decoder.append(ByteBuffer(bytes: short))
                let frame = try #require(try decoder.next())
                #expect(throws: ProtocolError.self) { try ResponseCodec.decode(frame) }
            }
            var padded = bytes + [0]
            padded[3] += 1
            var decoder = FrameDecoder()
            decoder.append(ByteBuffer(bytes: padded))
            let frame = try #require(try decoder.next())
            #expect(throws: ProtocolError.self) { try ResponseCodec.decode(frame) }
        }
        // A Locate request with a short or long body.
        for body in [[UInt8](repeating: 0, count: 7), [UInt8](repeating: 0, count: 9)] {
            let frame = Frame(type: Opcode.locate.rawValue, requestID: 1, body: ByteBuffer(bytes: body))
            #expect(throws: ProtocolError.self) { try RequestCodec.decode(frame) }
        }
    }

    @Test func theConnectionHandsLocateToTheEngineLikeAnyRequest() {
        var m = ConnectionStateMachine(limits: ConnectionLimits())
        var hello = ByteBufferAllocator().buffer(capacity: 32)
        RequestCodec.encode(.hello(version: 1, token: ""), requestID: 0, into: &hello)
        _ = m.received(hello)
        var locate = ByteBufferAllocator().buffer(capacity: 32)
        RequestCodec.encode(.locate(3), requestID: 4, into: &locate)
        for byte in locate.readableBytesView { #expect(m.received(ByteBuffer(bytes: [byte])).isEmpty) }
        #expect(m.readComplete() == [.execute([Work(requestID: 4, request: .locate(3))])])
        #expect(Request.locate(3).namedShard == 3 && Request.locate(3).dataShard == nil && !Request.locate(3).isWrite)
    }
}
