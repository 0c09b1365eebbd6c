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
    /// The newest version this side speaks. Version 2 added the client ID to
    /// CloseShard and DeleteShard; the server still speaks version 1 (whose
    /// CloseShard and DeleteShard name no client and are refused).
    public static let version: UInt16 = 2
    /// The oldest version the server still speaks.
    public static let oldestVersion: UInt16 = 1
    /// The largest frame accepted before the handshake: a Hello with a token of up
    /// to 4,000 bytes fits, and an unauthenticated client cannot make the server
    /// buffer more than this (plus one read) for it.
    public static let preHandshakeMaxFrameLength = 4096
    /// type + request ID.
    public static let frameHeaderLength = 5
    public static let defaultMaxFrameLength = 16 << 20
    /// The largest value an answer carries: a frame's length is a `u32`, and
    /// this leaves 16 MiB of it for the rest (indexes, headers). Only a file
    /// written through the mount into a shard whose size limit is larger can be
    /// larger; a Get or BatchGet item answers it with INVALID_ARGUMENT.
    public static let maxValueLength = Int(UInt32.max) - (16 << 20)
    public static let maxPageLimit: UInt32 = 10_000
    public static let defaultPageLimit: UInt32 = 1_000
}
