/// The type byte of a frame. Responses use the request's opcode | 0x80.
public enum Opcode: UInt8, Sendable, CaseIterable {
    case hello = 0x01
    case put = 0x02
    case get = 0x03
    case delete = 0x04
    case batchPut = 0x05
    case batchGet = 0x06
    case list = 0x07
    case findByIndex = 0x08
    case newShard = 0x09
    case closeShard = 0x0A
    case deleteShard = 0x0B
    case listShards = 0x0C
    case stat = 0x0D
    /// Which node serves a shard (any node answers, from the metadata).
    case locate = 0x0E

    public static let responseBit: UInt8 = 0x80
    /// One streamed item of a BatchGet answer.
    public static let batchGetItemType: UInt8 = 0x90
    /// A connection-level error; the server closes after sending it.
    public static let errorType: UInt8 = 0xFF

    public var responseType: UInt8 { rawValue | Self.responseBit }
}

/// The protocol constants both sides agree on.
public enum ProtocolConstants {
    public static let magic: [UInt8] = Array("SHFS".utf8)
    public static let version: UInt16 = 1
    /// type + request ID.
    public static let frameHeaderLength = 5
    public static let defaultMaxFrameLength = 16 << 20
    public static let maxPageLimit: UInt32 = 10_000
    public static let defaultPageLimit: UInt32 = 1_000
}
