import NIOCore

/// Requests to and from bytes (the client encodes, the server decodes).
public enum RequestCodec {
    /// `version` is the one the connection speaks (HelloOK's): version 1 has no
    /// client ID in CloseShard and DeleteShard.
    public static func encode(_ request: Request, requestID: UInt32, version: UInt16 = ProtocolConstants.version,
                              into out: inout ByteBuffer) {
        out.writeFrame(type: request.opcode.rawValue, requestID: requestID) { b in
            switch request {
            case .hello(let version, let token):
                b.writeBytes(ProtocolConstants.magic)
                b.writeU16(version)
                b.writeStr(token)
            case .put(let client, let shard, let item):
                b.writeStr(client)
                b.writeU64(shard)
                writeItem(item, &b)
            case .get(let shard, let key):
                b.writeU64(shard)
                b.writeKey(key)
            case .delete(let client, let shard, let key):
                b.writeStr(client)
                b.writeU64(shard)
                b.writeKey(key)
            case .batchPut(let client, let shard, let items):
                b.writeStr(client)
                b.writeU64(shard)
                b.writeU32(UInt32(items.count))
                // Sized once, written in one pass.
                let size = items.reduce(0) {
                    $0 + RawWriter.keySize($1.key) + 4 + $1.value.count + ($1.indexes.isEmpty ? 2 : RawWriter.indexesSize($1.indexes))
                }
                b.writeRaw(size: size) { w in
                    for item in items {
                        w.key(item.key)
                        w.blob(item.value)
                        if item.indexes.isEmpty { w.u16(0) } else { w.indexes(item.indexes) }
                    }
                }
            case .batchGet(let shard, let keys):
                b.writeU64(shard)
                b.writeU32(UInt32(keys.count))
                b.writeRaw(size: keys.reduce(0) { $0 + RawWriter.keySize($1) }) { w in
                    for key in keys { w.key(key) }
                }
            case .list(let shard, let after, let limit):
                b.writeU64(shard)
                b.writeAfterKey(after)
                b.writeU32(limit)
            case .findByIndex(let shard, let name, let value, let after, let limit):
                b.writeU64(shard)
                b.writeStr(name)
                b.writeBlob(value)
                b.writeAfterKey(after)
                b.writeU32(limit)
            case .newShard(let owner, let requestedID, let sizeLimit):
                b.writeStr(owner)
                b.writeU64(requestedID)
                b.writeU64(sizeLimit)
            case .closeShard(let client, let id), .deleteShard(let client, let id):
                if version >= 2 { b.writeStr(client) }
                b.writeU64(id)
            case .stat(let id), .locate(let id):
                b.writeU64(id)
            case .listShards:
                break
            }
        }
    }

    private static func writeItem(_ item: PutItem, _ b: inout ByteBuffer) {
        b.writeKey(item.key)
        b.writeBlob(item.value)
        b.writeIndexes(item.indexes)
    }

    /// Decodes a request frame of a connection speaking `version`; throws
    /// `invalidRequest` for an unknown type or a malformed body.
    public static func decode(_ frame: Frame, version: UInt16 = ProtocolConstants.version) throws -> Request {
        guard let op = Opcode(rawValue: frame.type) else {
            throw ProtocolError(.invalidRequest, "unknown request type 0x\(String(frame.type, radix: 16))")
        }
        var b = frame.body
        let request: Request
        switch op {
        case .hello:
            guard try b.readRaw(4, "magic") == ProtocolConstants.magic else {
                throw ProtocolError(.invalidRequest, "not a ShardFS batch protocol client (bad magic)")
            }
            request = .hello(version: try b.readU16("version"), token: try b.readStr("token"))
        case .put:
            request = .put(client: try b.readStr("client ID"), shard: try b.readU64("shard"), item: try readItem(&b))
        case .get:
            request = .get(shard: try b.readU64("shard"), key: try b.readKey())
        case .delete:
            request = .delete(client: try b.readStr("client ID"), shard: try b.readU64("shard"), key: try b.readKey())
        case .batchPut:
            let client = try b.readStr("client ID"), shard = try b.readU64("shard")
            let n = try b.readCount(minimumItemSize: 8)
            let items = try b.readRaw { r in
                var items: [PutItem] = []
                items.reserveCapacity(n)
                for _ in 0..<n { items.append(PutItem(key: try r.key(), value: try r.blob("value"), indexes: try r.indexes())) }
                return items
            }
            request = .batchPut(client: client, shard: shard, items: items)
        case .batchGet:
            let shard = try b.readU64("shard")
            let n = try b.readCount(minimumItemSize: 2)
            let keys = try b.readRaw { r in
                var keys: [[UInt8]] = []
                keys.reserveCapacity(n)
                for _ in 0..<n { keys.append(try r.key()) }
                return keys
            }
            request = .batchGet(shard: shard, keys: keys)
        case .list:
            request = .list(shard: try b.readU64("shard"), after: try b.readAfterKey(), limit: try b.readU32("limit"))
        case .findByIndex:
            request = .findByIndex(shard: try b.readU64("shard"), name: try b.readStr("index name"),
                                   value: try b.readBlob("index value"), after: try b.readAfterKey(), limit: try b.readU32("limit"))
        case .newShard:
            request = .newShard(owner: try b.readStr("owner"), requestedID: try b.readU64("requested ID"),
                                sizeLimit: try b.readU64("size limit"))
        case .closeShard:
            request = .closeShard(client: version >= 2 ? try b.readStr("client ID") : "", shard: try b.readU64("shard"))
        case .deleteShard:
            request = .deleteShard(client: version >= 2 ? try b.readStr("client ID") : "", shard: try b.readU64("shard"))
        case .listShards: request = .listShards
        case .stat: request = .stat(try b.readU64("shard"))
        case .locate: request = .locate(try b.readU64("shard"))
        }
        guard b.readableBytes == 0 else { throw ProtocolError.malformed("\(b.readableBytes) bytes after the \(op) body") }
        return request
    }

    private static func readItem(_ b: inout ByteBuffer) throws -> PutItem {
        PutItem(key: try b.readKey(), value: try b.readBlob("value"), indexes: try b.readIndexes())
    }
}
