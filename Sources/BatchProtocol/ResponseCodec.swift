import NIOCore

/// Responses to and from bytes (the server encodes, the client decodes).
public enum ResponseCodec {
    public static func encode(_ response: Response, into out: inout ByteBuffer) {
        switch response {
        case .reply(let op, let id, let status, let payload):
            out.writeFrame(type: op.responseType, requestID: id) { b in
                b.writeStatus(status)
                if status.isOK {
                    writePayload(payload, &b)
                } else if status.code == .notShardLeader {
                    // Always present after NOT_SHARD_LEADER (empty: the primary is unknown).
                    if case .leader(let address) = payload { b.writeStr(address) } else { b.writeStr("") }
                }
            }
        case .batchGetItem(let id, let position, let status, let entry):
            encodeBatchGetItem(requestID: id, position: position, status: status, entry: entry, into: &out)
        case .error(let id, let status):
            out.writeFrame(type: Opcode.errorType, requestID: id) { $0.writeStatus(status) }
        }
    }

    /// The hot path of BatchGet: no `Response` value is built per item.
    public static func encodeBatchGetItem(requestID: UInt32, position: UInt32, status: Status, entry: EntryPayload?,
                                          into out: inout ByteBuffer) {
        out.writeFrame(type: Opcode.batchGetItemType, requestID: requestID) { b in
            b.writeU32(position)
            b.writeStatus(status)
            if status.isOK, let entry { writeEntry(entry, &b) }
        }
    }

    /// A BatchGet item with status OK whose value and indexes the caller copies in
    /// straight from where they lie (the server copies them out of the LMDB map,
    /// building no `EntryPayload`). The whole frame is reserved and written in one
    /// go, which costs a fraction of field-by-field `ByteBuffer` writes.
    /// `value` gets exactly `valueSize` bytes to fill; `indexes` gets
    /// `indexesSize` bytes to fill with `indexCount` fields (`storeIndexField`).
    /// If `value` throws, nothing of the item stays in `out`.
    public static func encodeBatchGetItem(requestID: UInt32, position: UInt32, valueSize: Int, indexCount: Int,
                                          indexesSize: Int, modificationTime: Int64, into out: inout ByteBuffer,
                                          value: (UnsafeMutableRawBufferPointer) throws -> Void,
                                          indexes: (UnsafeMutableRawBufferPointer) -> Void) rethrows {
        try encodeEntryFrame(type: Opcode.batchGetItemType, requestID: requestID, position: position, valueSize: valueSize,
                             indexCount: indexCount, indexesSize: indexesSize, modificationTime: modificationTime, into: &out,
                             value: value, indexes: indexes)
    }

    /// A Get's answer with status OK, written as `encodeBatchGetItem` writes an
    /// item: the value copied in straight from where it lies, so the server
    /// holds it once, in the outgoing buffer.
    public static func encodeGetReply(requestID: UInt32, valueSize: Int, indexCount: Int, indexesSize: Int,
                                      modificationTime: Int64, into out: inout ByteBuffer,
                                      value: (UnsafeMutableRawBufferPointer) throws -> Void,
                                      indexes: (UnsafeMutableRawBufferPointer) -> Void) rethrows {
        try encodeEntryFrame(type: Opcode.get.responseType, requestID: requestID, position: nil, valueSize: valueSize,
                             indexCount: indexCount, indexesSize: indexesSize, modificationTime: modificationTime, into: &out,
                             value: value, indexes: indexes)
    }

    /// length, type, ID, [position], status OK (code, empty message), then the
    /// entry: value (length, bytes), indexes (count, fields), modification time.
    private static func encodeEntryFrame(type: UInt8, requestID: UInt32, position: UInt32?, valueSize: Int, indexCount: Int,
                                         indexesSize: Int, modificationTime: Int64, into out: inout ByteBuffer,
                                         value: (UnsafeMutableRawBufferPointer) throws -> Void,
                                         indexes: (UnsafeMutableRawBufferPointer) -> Void) rethrows {
        let positionSize = position == nil ? 0 : 4
        let head = 4 + 1 + 4 + positionSize + 2 + 2 + 4
        let total = head + valueSize + 2 + indexesSize + 8
        try out.writeWithUnsafeMutableBytes(minimumWritableBytes: total) { p in
            let b = UnsafeMutableRawBufferPointer(rebasing: p[0..<total])
            b.storeBytes(of: UInt32(total - 4).bigEndian, toByteOffset: 0, as: UInt32.self)
            b[4] = type
            b.storeBytes(of: requestID.bigEndian, toByteOffset: 5, as: UInt32.self)
            if let position { b.storeBytes(of: position.bigEndian, toByteOffset: 9, as: UInt32.self) }
            b.storeBytes(of: UInt32(0), toByteOffset: 9 + positionSize, as: UInt32.self)
            b.storeBytes(of: UInt32(truncatingIfNeeded: valueSize).bigEndian, toByteOffset: 13 + positionSize, as: UInt32.self)
            try value(UnsafeMutableRawBufferPointer(rebasing: b[head..<(head + valueSize)]))
            var offset = head + valueSize
            b.storeBytes(of: UInt16(truncatingIfNeeded: indexCount).bigEndian, toByteOffset: offset, as: UInt16.self)
            offset += 2
            indexes(UnsafeMutableRawBufferPointer(rebasing: b[offset..<(offset + indexesSize)]))
            offset += indexesSize
            b.storeBytes(of: UInt64(bitPattern: modificationTime).bigEndian, toByteOffset: offset, as: UInt64.self)
            return total
        }
    }

    /// Wire size of one field of `indexes` (`str` name, `bytes` value).
    public static func indexFieldSize(nameCount: Int, valueCount: Int) -> Int { 2 + nameCount + 4 + valueCount }

    /// Stores one field of `indexes` at `offset` of `out`; returns the offset after it.
    public static func storeIndexField(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer,
                                       into out: UnsafeMutableRawBufferPointer, at offset: Int) -> Int {
        var o = offset
        out.storeBytes(of: UInt16(truncatingIfNeeded: name.count).bigEndian, toByteOffset: o, as: UInt16.self)
        o += 2
        if let base = name.baseAddress, name.count > 0 { (out.baseAddress! + o).copyMemory(from: base, byteCount: name.count) }
        o += name.count
        out.storeBytes(of: UInt32(truncatingIfNeeded: value.count).bigEndian, toByteOffset: o, as: UInt32.self)
        o += 4
        if let base = value.baseAddress, value.count > 0 { (out.baseAddress! + o).copyMemory(from: base, byteCount: value.count) }
        return o + value.count
    }

    private static func writeEntry(_ e: EntryPayload, _ b: inout ByteBuffer) {
        b.writeBlob(e.value)
        b.writeIndexes(e.indexes)
        b.writeI64(e.modificationTime)
    }

    private static func writeShard(_ s: ShardInfo, _ b: inout ByteBuffer) {
        b.writeU64(s.id)
        b.writeStr(s.owner)
        b.writeInteger(UInt8(s.closed ? 1 : 0))
        b.writeStr(s.volumeID)
        b.writeStr(s.primaryNodeID)
        b.writeBool(s.figures != nil)
        if let f = s.figures {
            b.writeU64(f.entries)
            b.writeU64(f.usedBytes)
            b.writeU64(f.limitBytes)
        }
    }

    private static func writePayload(_ payload: ResponsePayload, _ b: inout ByteBuffer) {
        switch payload {
        case .none: break
        case .hello(let h):
            b.writeU16(h.version)
            b.writeU32(h.maxFrameLength)
            b.writeU32(h.maxInFlight)
        case .entry(let e): writeEntry(e, &b)
        case .itemStatuses(let statuses):
            b.reserveCapacity(minimumWritableBytes: 4 + 4 * statuses.count)
            b.writeU32(UInt32(statuses.count))
            for s in statuses { b.writeStatus(s) }
        case .itemCount(let n): b.writeU32(n)
        case .listPage(let rows, let more):
            b.writeU32(UInt32(rows.count))
            for r in rows {
                b.writeKey(r.key)
                b.writeU64(r.size)
                b.writeI64(r.modificationTime)
            }
            b.writeBool(more)
        case .keys(let keys, let more):
            b.writeU32(UInt32(keys.count))
            for k in keys { b.writeKey(k) }
            b.writeBool(more)
        case .shardID(let id): b.writeU64(id)
        case .shards(let shards):
            b.writeU32(UInt32(shards.count))
            for s in shards { writeShard(s, &b) }
        case .shard(let s): writeShard(s, &b)
        case .leader: break  // only after NOT_SHARD_LEADER (see `encode`)
        case .location(let l):
            b.writeU64(l.shard)
            b.writeStr(l.volumeID)
            b.writeU64(l.epoch)
            b.writeInteger(UInt8(l.closed ? 1 : 0))
            b.writeStr(l.primary.nodeID)
            b.writeStr(l.primary.address)
            b.writeU16(UInt16(min(l.backups.count, Int(UInt16.max))))
            for node in l.backups.prefix(Int(UInt16.max)) {
                b.writeStr(node.nodeID)
                b.writeStr(node.address)
            }
            b.writeStr(l.answeredBy)
        }
    }

    public static func decode(_ frame: Frame) throws -> Response {
        var b = frame.body
        let response: Response
        if frame.type == Opcode.errorType {
            response = .error(requestID: frame.requestID, try b.readStatus())
        } else if frame.type == Opcode.batchGetItemType {
            let item = try decodeBatchGetItem(frame)
            response = .batchGetItem(requestID: frame.requestID, position: item.position, item.status, item.entry)
            return response
        } else if frame.type & Opcode.responseBit != 0, let op = Opcode(rawValue: frame.type & ~Opcode.responseBit) {
            let status = try b.readStatus()
            let payload: ResponsePayload
            if status.isOK {
                payload = try readPayload(op, &b)
            } else if status.code == .notShardLeader {
                payload = .leader(try b.readStr("leader address"))
            } else {
                payload = .none
            }
            response = .reply(op, requestID: frame.requestID, status, payload)
        } else {
            throw ProtocolError(.invalidRequest, "unknown response type 0x\(String(frame.type, radix: 16))")
        }
        guard b.readableBytes == 0 else { throw ProtocolError.malformed("\(b.readableBytes) bytes after a response body") }
        return response
    }

    /// The body of a BatchGetItem frame (type 0x90), read straight from the bytes
    /// without building a `Response` (the client's hot path: one per item).
    public static func decodeBatchGetItem(_ frame: Frame) throws -> (position: UInt32, status: Status, entry: EntryPayload?) {
        try frame.body.withUnsafeReadableBytes { bytes in
            var r = RawReader(bytes)
            let position = try r.u32("position")
            let status = try r.status()
            var entry: EntryPayload?
            if status.isOK {
                let value = try r.blob("value")
                entry = EntryPayload(value: value, indexes: try r.indexes(), modificationTime: Int64(bitPattern: try r.u64("mtime")))
            }
            guard r.remaining == 0 else { throw ProtocolError.malformed("\(r.remaining) bytes after a response body") }
            return (position, status, entry)
        }
    }

    private static func readEntry(_ b: inout ByteBuffer) throws -> EntryPayload {
        EntryPayload(value: try b.readBlob("value"), indexes: try b.readIndexes(), modificationTime: try b.readI64("mtime"))
    }

    private static func readShard(_ b: inout ByteBuffer) throws -> ShardInfo {
        let id = try b.readU64("shard"), owner = try b.readStr("owner"), state = try b.readU8("state")
        let volume = try b.readStr("volume"), primary = try b.readStr("primary")
        let figures = try b.readBool("local")
            ? ShardFigures(entries: try b.readU64("entries"), usedBytes: try b.readU64("used"), limitBytes: try b.readU64("limit"))
            : nil
        return ShardInfo(id: id, owner: owner, closed: state == 1, volumeID: volume, primaryNodeID: primary, figures: figures)
    }

    private static func readLocation(_ b: inout ByteBuffer) throws -> ShardLocation {
        let shard = try b.readU64("shard"), volume = try b.readStr("volume"), epoch = try b.readU64("epoch")
        let state = try b.readU8("state")
        guard state <= 1 else { throw ProtocolError.malformed("shard state \(state)") }
        let primary = NodeLocation(nodeID: try b.readStr("primary"), address: try b.readStr("primary address"))
        let n = Int(try b.readU16("backup count"))
        guard n <= b.readableBytes / 4 else { throw ProtocolError.malformed("count \(n) exceeds the frame") }
        let backups = try (0..<n).map { _ in NodeLocation(nodeID: try b.readStr("backup"), address: try b.readStr("backup address")) }
        return ShardLocation(shard: shard, volumeID: volume, epoch: epoch, closed: state == 1, primary: primary,
                             backups: backups, answeredBy: try b.readStr("answering node"))
    }

    private static func readPayload(_ op: Opcode, _ b: inout ByteBuffer) throws -> ResponsePayload {
        switch op {
        case .hello:
            return .hello(HelloInfo(version: try b.readU16("version"), maxFrameLength: try b.readU32("max frame"),
                                    maxInFlight: try b.readU32("max in flight")))
        case .put, .delete, .closeShard, .deleteShard: return .none
        case .get: return .entry(try readEntry(&b))
        case .batchPut:
            let n = try b.readCount(minimumItemSize: 4)
            return .itemStatuses(try b.readRaw { r in try (0..<n).map { _ in try r.status() } })
        case .batchGet: return .itemCount(try b.readU32("count"))
        case .list:
            let n = try b.readCount(minimumItemSize: 18)
            let rows = try (0..<n).map { _ in
                ListRow(key: try b.readKey(), size: try b.readU64("size"), modificationTime: try b.readI64("mtime"))
            }
            return .listPage(rows: rows, more: try b.readBool("more"))
        case .findByIndex:
            let n = try b.readCount(minimumItemSize: 2)
            let keys = try (0..<n).map { _ in try b.readKey() }
            return .keys(keys, more: try b.readBool("more"))
        case .newShard: return .shardID(try b.readU64("shard"))
        case .listShards:
            let n = try b.readCount(minimumItemSize: 15)
            return .shards(try (0..<n).map { _ in try readShard(&b) })
        case .stat: return .shard(try readShard(&b))
        case .locate: return .location(try readLocation(&b))
        }
    }
}
