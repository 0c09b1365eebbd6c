/// An index of an entry on the wire: a (name, value) pair.
public struct IndexField: Hashable, Sendable {
    public var name: String
    public var value: [UInt8]
    public init(name: String, value: [UInt8]) {
        self.name = name
        self.value = value
    }
}

/// One entry to write (a Put, or one item of a BatchPut). The key is checked by the server.
public struct PutItem: Hashable, Sendable {
    public var key: [UInt8]
    public var value: [UInt8]
    public var indexes: [IndexField]
    public init(key: [UInt8], value: [UInt8], indexes: [IndexField] = []) {
        self.key = key
        self.value = value
        self.indexes = indexes
    }
}

/// A request, decoded.
public enum Request: Hashable, Sendable {
    case hello(version: UInt16, token: String)
    case put(client: String, shard: UInt64, item: PutItem)
    case get(shard: UInt64, key: [UInt8])
    case delete(client: String, shard: UInt64, key: [UInt8])
    case batchPut(client: String, shard: UInt64, items: [PutItem])
    case batchGet(shard: UInt64, keys: [[UInt8]])
    case list(shard: UInt64, after: [UInt8]?, limit: UInt32)
    case findByIndex(shard: UInt64, name: String, value: [UInt8], after: [UInt8]?, limit: UInt32)
    case newShard(owner: String, requestedID: UInt64, sizeLimit: UInt64)
    /// The client ID names the owner (version 2); a version-1 frame decodes with an empty one.
    case closeShard(client: String, shard: UInt64)
    case deleteShard(client: String, shard: UInt64)
    case listShards
    case stat(UInt64)
    case locate(UInt64)

    public var opcode: Opcode {
        switch self {
        case .hello: return .hello
        case .put: return .put
        case .get: return .get
        case .delete: return .delete
        case .batchPut: return .batchPut
        case .batchGet: return .batchGet
        case .list: return .list
        case .findByIndex: return .findByIndex
        case .newShard: return .newShard
        case .closeShard: return .closeShard
        case .deleteShard: return .deleteShard
        case .listShards: return .listShards
        case .stat: return .stat
        case .locate: return .locate
        }
    }

    /// The shard a data request addresses, nil for lifecycle and listing requests.
    public var dataShard: UInt64? {
        switch self {
        case .put(_, let s, _), .get(let s, _), .delete(_, let s, _), .batchPut(_, let s, _), .batchGet(let s, _),
             .list(let s, _, _), .findByIndex(let s, _, _, _, _):
            return s
        default:
            return nil
        }
    }

    /// The shard a request names, lifecycle and Locate included; nil for Hello, NewShard and ListShards.
    public var namedShard: UInt64? {
        switch self {
        case .closeShard(_, let s), .deleteShard(_, let s), .stat(let s), .locate(let s): return s
        default: return dataShard
        }
    }

    public var isWrite: Bool {
        switch self {
        case .put, .delete, .batchPut: return true
        default: return false
        }
    }
}

/// An entry as read back.
public struct EntryPayload: Hashable, Sendable {
    public var value: [UInt8]
    public var indexes: [IndexField]
    /// Nanoseconds since 1970.
    public var modificationTime: Int64
    public init(value: [UInt8], indexes: [IndexField], modificationTime: Int64) {
        self.value = value
        self.indexes = indexes
        self.modificationTime = modificationTime
    }
}

public struct ListRow: Hashable, Sendable {
    public var key: [UInt8]
    public var size: UInt64
    public var modificationTime: Int64
    public init(key: [UInt8], size: UInt64, modificationTime: Int64) {
        self.key = key
        self.size = size
        self.modificationTime = modificationTime
    }
}

public struct ShardFigures: Hashable, Sendable {
    public var entries: UInt64
    public var usedBytes: UInt64
    public var limitBytes: UInt64
    public init(entries: UInt64, usedBytes: UInt64, limitBytes: UInt64) {
        self.entries = entries
        self.usedBytes = usedBytes
        self.limitBytes = limitBytes
    }
}

public struct ShardInfo: Hashable, Sendable {
    public var id: UInt64
    public var owner: String
    public var closed: Bool
    public var volumeID: String
    public var primaryNodeID: String
    /// Present when the shard is on the answering node.
    public var figures: ShardFigures?
    public init(id: UInt64, owner: String, closed: Bool, volumeID: String, primaryNodeID: String, figures: ShardFigures?) {
        self.id = id
        self.owner = owner
        self.closed = closed
        self.volumeID = volumeID
        self.primaryNodeID = primaryNodeID
        self.figures = figures
    }
}

/// A node as metadata knows it: its ID and the "host:port" its socket service
/// registered (empty when it registered none, or its registration lapsed).
public struct NodeLocation: Hashable, Sendable {
    public var nodeID: String
    public var address: String
    public init(nodeID: String, address: String) {
        self.nodeID = nodeID
        self.address = address
    }
}

/// The answer to Locate: where a shard is served.
public struct ShardLocation: Hashable, Sendable {
    public var shard: UInt64
    public var volumeID: String
    /// The volume's epoch (increases with every change of primary).
    public var epoch: UInt64
    public var closed: Bool
    /// The volume's primary; an empty node ID when the volume has none.
    public var primary: NodeLocation
    public var backups: [NodeLocation]
    /// The node that answered (so a client that reached it by a Unix socket
    /// knows when the primary is the node it is talking to).
    public var answeredBy: String
    public init(shard: UInt64, volumeID: String, epoch: UInt64, closed: Bool, primary: NodeLocation,
                backups: [NodeLocation], answeredBy: String) {
        self.shard = shard
        self.volumeID = volumeID
        self.epoch = epoch
        self.closed = closed
        self.primary = primary
        self.backups = backups
        self.answeredBy = answeredBy
    }
}

public struct HelloInfo: Hashable, Sendable {
    public var version: UInt16
    public var maxFrameLength: UInt32
    public var maxInFlight: UInt32
    public init(version: UInt16, maxFrameLength: UInt32, maxInFlight: UInt32) {
        self.version = version
        self.maxFrameLength = maxFrameLength
        self.maxInFlight = maxInFlight
    }
}

/// What follows the status in a response: a payload after OK, the primary's
/// address after NOT_SHARD_LEADER, nothing after any other status.
public enum ResponsePayload: Hashable, Sendable {
    case none
    /// After NOT_SHARD_LEADER: the address ("host:port") of the shard's primary, empty if unknown.
    case leader(String)
    case location(ShardLocation)
    case hello(HelloInfo)
    case entry(EntryPayload)
    /// BatchPut: one status per item, in request order.
    case itemStatuses([Status])
    /// The final frame of a BatchGet: how many items were sent.
    case itemCount(UInt32)
    case listPage(rows: [ListRow], more: Bool)
    case keys([[UInt8]], more: Bool)
    case shardID(UInt64)
    case shards([ShardInfo])
    case shard(ShardInfo)
}

/// A response frame, decoded.
public enum Response: Hashable, Sendable {
    /// The answer to a request (its final frame for BatchGet). The payload is `.none`
    /// unless the status is OK, or `.leader` when it is NOT_SHARD_LEADER.
    case reply(Opcode, requestID: UInt32, Status, ResponsePayload)
    /// One streamed BatchGet item; the entry is present when the status is OK.
    case batchGetItem(requestID: UInt32, position: UInt32, Status, EntryPayload?)
    /// A connection error: the server closes after it.
    case error(requestID: UInt32, Status)

    public var requestID: UInt32 {
        switch self {
        case .reply(_, let id, _, _), .batchGetItem(let id, _, _, _), .error(let id, _): return id
        }
    }
}
