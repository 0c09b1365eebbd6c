import BatchProtocol
import NIOCore
import Testing

private func bytes(_ request: Request, id: UInt32) -> [UInt8] {
    var b = ByteBufferAllocator().buffer(capacity: 64)
    RequestCodec.encode(request, requestID: id, into: &b)
    return b.readBytes(length: b.readableBytes)!
}

private let samples: [Request] = [
    .hello(version: 1, token: "secret"),
    .put(client: "c", shard: 1, item: PutItem(key: Array("7".utf8), value: Array("hi".utf8))),
    .get(shard: 2, key: Array("k".utf8)),
    .delete(client: "c", shard: 3, key: Array("k".utf8)),
    .batchPut(client: "c", shard: 4, items: [PutItem(key: [0x61], value: [1, 2, 3], indexes: [IndexField(name: "n", value: [9])]),
                                             PutItem(key: [0x62], value: [])]),
    .batchGet(shard: 5, keys: [[0x61], [0x62], []]),
    .list(shard: 6, after: [0x61], limit: 10),
    .list(shard: 6, after: nil, limit: 0),
    .findByIndex(shard: 7, name: "n", value: [9], after: nil, limit: 5),
    .newShard(owner: "o", requestedID: 0, sizeLimit: 1 << 20),
    .closeShard(client: "c", shard: 8), .deleteShard(client: "c", shard: 9), .listShards, .stat(10), .locate(11),
]

@Suite struct FrameDecoderTests {
    @Test func theDocumentedPutExampleIsByteExact() {
        let put = Request.put(client: "c", shard: 1, item: PutItem(key: Array("7".utf8), value: Array("hi".utf8)))
        #expect(bytes(put, id: 2) == [0, 0, 0, 0x1b, 0x02, 0, 0, 0, 2, 0, 1, 0x63, 0, 0, 0, 0, 0, 0, 0, 1,
                                      0, 1, 0x37, 0, 0, 0, 2, 0x68, 0x69, 0, 0])
        var out = ByteBufferAllocator().buffer(capacity: 16)
        ResponseCodec.encode(.reply(.put, requestID: 2, .ok, .none), into: &out)
        #expect(out.readBytes(length: out.readableBytes)! == [0, 0, 0, 9, 0x82, 0, 0, 0, 2, 0, 0, 0, 0])
    }

    @Test func everyRequestSurvivesBytesDripFedOneAtATime() throws {
        for (i, request) in samples.enumerated() {
            var decoder = FrameDecoder()
            let wire = bytes(request, id: UInt32(i))
            var frames: [Frame] = []
            for byte in wire {
                decoder.append(ByteBuffer(bytes: [byte]))
                if let f = try decoder.next() { frames.append(f) }
            }
            #expect(frames.count == 1)
            #expect(frames.first?.requestID == UInt32(i))
            #expect(try frames.first.map { try RequestCodec.decode($0) } == request)
            #expect(decoder.bufferedBytes == 0)
        }
    }

    @Test func manyFramesInOneBuffer() throws {
        var all: [UInt8] = []
        for (i, request) in samples.enumerated() { all += bytes(request, id: UInt32(100 + i)) }
        var decoder = FrameDecoder()
        decoder.append(ByteBuffer(bytes: all))
        var decoded: [Request] = []
        while let frame = try decoder.next() { decoded.append(try RequestCodec.decode(frame)) }
        #expect(decoded == samples)
    }

    @Test func anOversizedLengthIsRefusedBeforeItsBodyArrives() {
        var decoder = FrameDecoder(maxFrameLength: 1024)
        decoder.append(ByteBuffer(bytes: [0xFF, 0xFF, 0xFF, 0xFF]))  // claims 4 GiB
        #expect { try decoder.next() } throws: { ($0 as? ProtocolError)?.status.code == .frameTooLarge }
    }

    @Test func aLengthShorterThanAHeaderIsMalformed() {
        var decoder = FrameDecoder()
        decoder.append(ByteBuffer(bytes: [0, 0, 0, 2, 1, 1]))
        do { _ = try decoder.next(); Issue.record("accepted") } catch let e as ProtocolError {
            #expect(e.status.code == .invalidRequest)
        } catch { Issue.record("\(error)") }
    }

    @Test func truncatedAndPaddedBodiesAreMalformed() throws {
        let wire = bytes(.get(shard: 1, key: [0x61, 0x62]), id: 1)
        // Same frame with its key length claiming more than the body holds.
        var lying = wire
        lying[18] = 9
        var decoder = FrameDecoder()
        decoder.append(ByteBuffer(bytes: lying))
        let frame = try #require(try decoder.next())
        #expect(throws: ProtocolError.self) { try RequestCodec.decode(frame) }
        // One extra byte after the body.
        var padded = wire + [0]
        padded[3] += 1
        decoder.append(ByteBuffer(bytes: padded))
        let frame2 = try #require(try decoder.next())
        #expect(throws: ProtocolError.self) { try RequestCodec.decode(frame2) }
    }

    @Test func aLyingCountDoesNotAllocate() throws {
        var b = ByteBufferAllocator().buffer(capacity: 32)
        b.writeFrame(type: Opcode.batchGet.rawValue, requestID: 1) { body in
            body.writeInteger(UInt64(1), endianness: .big)
            body.writeInteger(UInt32.max, endianness: .big)
        }
        var decoder = FrameDecoder()
        decoder.append(b)
        let frame = try #require(try decoder.next())
        #expect(throws: ProtocolError.self) { try RequestCodec.decode(frame) }
    }

    @Test func unknownTypesAreInvalidRequests() throws {
        var decoder = FrameDecoder()
        decoder.append(ByteBuffer(bytes: [0, 0, 0, 5, 0x55, 0, 0, 0, 1]))
        let frame = try #require(try decoder.next())
        do { _ = try RequestCodec.decode(frame); Issue.record("accepted") } catch let e as ProtocolError {
            #expect(e.status.code == .invalidRequest)
        }
    }

    @Test func responsesRoundTrip() throws {
        let info = ShardInfo(id: 3, owner: "o", closed: true, volumeID: "v", primaryNodeID: "n",
                             figures: ShardFigures(entries: 1, usedBytes: 2, limitBytes: 3))
        let responses: [Response] = [
            .reply(.hello, requestID: 0, .ok, .hello(HelloInfo(version: 1, maxFrameLength: 9, maxInFlight: 4))),
            .reply(.put, requestID: 1, Status(.shardFenced, "no"), .none),
            .reply(.get, requestID: 2, .ok, .entry(EntryPayload(value: [1], indexes: [IndexField(name: "a", value: [2])], modificationTime: -5))),
            .reply(.batchPut, requestID: 3, .ok, .itemStatuses([.ok, Status(.invalidKey, "bad")])),
            .batchGetItem(requestID: 4, position: 7, .ok, EntryPayload(value: [3], indexes: [], modificationTime: 1)),
            .batchGetItem(requestID: 4, position: 8, Status(.entryNotFound, "gone"), nil),
            .reply(.batchGet, requestID: 4, .ok, .itemCount(2)),
            .reply(.list, requestID: 5, .ok, .listPage(rows: [ListRow(key: [0x61], size: 3, modificationTime: 4)], more: true)),
            .reply(.findByIndex, requestID: 6, .ok, .keys([[0x61], [0x62]], more: false)),
            .reply(.newShard, requestID: 7, .ok, .shardID(42)),
            .reply(.listShards, requestID: 8, .ok, .shards([info, ShardInfo(id: 4, owner: "p", closed: false, volumeID: "",
                                                                          primaryNodeID: "", figures: nil)])),
            .reply(.stat, requestID: 9, .ok, .shard(info)),
            .error(requestID: 0, Status(.frameTooLarge, "big")),
        ]
        var wire = ByteBufferAllocator().buffer(capacity: 256)
        for r in responses { ResponseCodec.encode(r, into: &wire) }
        var decoder = FrameDecoder()
        var decoded: [Response] = []
        for byte in wire.readableBytesView {
            decoder.append(ByteBuffer(bytes: [byte]))
            while let f = try decoder.next() { decoded.append(try ResponseCodec.decode(f)) }
        }
        #expect(decoded == responses)
    }

    /// The server's zero-copy item encoder must put the same bytes on the wire as
    /// the plain one, and the client's raw decoder must read them back, drip-fed.
    @Test func batchGetItemsFromRawBytesMatchThePlainEncoding() throws {
        let entries = [
            EntryPayload(value: [], indexes: [], modificationTime: 0),
            EntryPayload(value: Array(0..<200), indexes: [], modificationTime: -1),
            EntryPayload(value: [7, 8], indexes: [IndexField(name: "kind", value: [1, 2, 3]), IndexField(name: "é", value: [])],
                         modificationTime: 1_700_000_000_000_000_000),
        ]
        var plain = ByteBufferAllocator().buffer(capacity: 512), raw = plain
        for (i, e) in entries.enumerated() {
            ResponseCodec.encodeBatchGetItem(requestID: 9, position: UInt32(i), status: .ok, entry: e, into: &plain)
            let fields = e.indexes.map { (Array($0.name.utf8), $0.value) }
            ResponseCodec.encodeBatchGetItem(
                requestID: 9, position: UInt32(i), valueSize: e.value.count, indexCount: fields.count,
                indexesSize: fields.reduce(0) { $0 + ResponseCodec.indexFieldSize(nameCount: $1.0.count, valueCount: $1.1.count) },
                modificationTime: e.modificationTime, into: &raw,
                value: { target in e.value.withUnsafeBytes { target.copyMemory(from: $0) } },
                indexes: { target in
                    var offset = 0
                    for (name, value) in fields {
                        offset = name.withUnsafeBytes { n in
                            value.withUnsafeBytes { ResponseCodec.storeIndexField(name: n, value: $0, into: target, at: offset) }
                        }
                    }
                })
        }
        ResponseCodec.encodeBatchGetItem(requestID: 9, position: 3, status: Status(.entryNotFound, "gone"), entry: nil, into: &plain)
        ResponseCodec.encodeBatchGetItem(requestID: 9, position: 3, status: Status(.entryNotFound, "gone"), entry: nil, into: &raw)
        #expect(Array(raw.readableBytesView) == Array(plain.readableBytesView))

        var decoder = FrameDecoder()
        var items: [(position: UInt32, status: Status, entry: EntryPayload?)] = []
        for byte in raw.readableBytesView {
            decoder.append(ByteBuffer(bytes: [byte]))
            while let f = try decoder.next() {
                #expect(f.type == Opcode.batchGetItemType && f.requestID == 9)
                items.append(try ResponseCodec.decodeBatchGetItem(f))
            }
        }
        #expect(items.map(\.position) == [0, 1, 2, 3])
        #expect(items.prefix(3).map(\.entry) == entries)
        #expect(items[3].status == Status(.entryNotFound, "gone") && items[3].entry == nil)
    }

    @Test func aBatchGetItemThatThrowsLeavesNothingBehind() {
        struct Gone: Error {}
        var out = ByteBufferAllocator().buffer(capacity: 64)
        out.writeBytes([1, 2, 3])
        #expect(throws: Gone.self) {
            try ResponseCodec.encodeBatchGetItem(requestID: 1, position: 0, valueSize: 4, indexCount: 0, indexesSize: 0,
                                                 modificationTime: 0, into: &out, value: { _ in throw Gone() }, indexes: { _ in })
        }
        #expect(Array(out.readableBytesView) == [1, 2, 3])
    }

    @Test func cutShortOrPaddedBatchGetItemsAreRefused() throws {
        var wire = ByteBufferAllocator().buffer(capacity: 64)
        ResponseCodec.encodeBatchGetItem(requestID: 1, position: 2, status: .ok,
                                         entry: EntryPayload(value: [1, 2, 3], indexes: [IndexField(name: "n", value: [4])], modificationTime: 5),
                                         into: &wire)
        var decoder = FrameDecoder()
        decoder.append(wire)
        let frame = try #require(try decoder.next())
        #expect(try ResponseCodec.decodeBatchGetItem(frame).entry?.value == [1, 2, 3])
        for cut in 0..<frame.body.readableBytes {
            let short = Frame(type: frame.type, requestID: 1, body: frame.body.getSlice(at: frame.body.readerIndex, length: cut)!)
            #expect(throws: ProtocolError.self) { try ResponseCodec.decodeBatchGetItem(short) }
        }
        var padded = frame.body
        padded.writeBytes([0])
        #expect(throws: ProtocolError.self) { try ResponseCodec.decodeBatchGetItem(Frame(type: frame.type, requestID: 1, body: padded)) }
    }

    @Test func statusCodesKeepTheOriginalNumbers() {
        let original = ["OK", "CLIENT_ID_REQUIRED", "SHARD_NOT_FOUND", "SHARD_FENCED", "ENTRY_NOT_FOUND", "READ_EXCEPTION",
                        "METADATA_EXCEPTION", "WRITE_EXCEPTION", "NO_NODE_AVAILABLE", "DEVICE_EXCEPTION", "NOT_SHARD_LEADER"]
        for (n, name) in original.enumerated() { #expect(StatusCode(rawValue: UInt16(n)).name == name) }
        #expect(Set(StatusCode.all.map(\.name)).count == StatusCode.all.count)
    }
}
