/// A response status code. 0–10 keep the original service's numbers; the rest are new.
/// Unknown codes are representable, so a client can show what a newer server sent.
public struct StatusCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let ok = StatusCode(rawValue: 0)
    public static let clientIDRequired = StatusCode(rawValue: 1)
    public static let shardNotFound = StatusCode(rawValue: 2)
    public static let shardFenced = StatusCode(rawValue: 3)
    public static let entryNotFound = StatusCode(rawValue: 4)
    public static let readException = StatusCode(rawValue: 5)
    public static let metadataException = StatusCode(rawValue: 6)
    public static let writeException = StatusCode(rawValue: 7)
    public static let noNodeAvailable = StatusCode(rawValue: 8)
    public static let deviceException = StatusCode(rawValue: 9)
    public static let notShardLeader = StatusCode(rawValue: 10)
    public static let shardClosed = StatusCode(rawValue: 11)
    public static let shardFull = StatusCode(rawValue: 12)
    public static let invalidKey = StatusCode(rawValue: 13)
    public static let invalidIndex = StatusCode(rawValue: 14)
    public static let invalidArgument = StatusCode(rawValue: 15)
    public static let shardIDTaken = StatusCode(rawValue: 16)
    public static let writeTooLarge = StatusCode(rawValue: 17)
    public static let frameTooLarge = StatusCode(rawValue: 18)
    public static let unauthorised = StatusCode(rawValue: 19)
    public static let invalidRequest = StatusCode(rawValue: 20)
    public static let unsupportedVersion = StatusCode(rawValue: 21)
    public static let timeout = StatusCode(rawValue: 22)
    public static let tooManyConnections = StatusCode(rawValue: 23)
    public static let shuttingDown = StatusCode(rawValue: 24)

    static let names: [UInt16: String] = [
        0: "OK", 1: "CLIENT_ID_REQUIRED", 2: "SHARD_NOT_FOUND", 3: "SHARD_FENCED", 4: "ENTRY_NOT_FOUND",
        5: "READ_EXCEPTION", 6: "METADATA_EXCEPTION", 7: "WRITE_EXCEPTION", 8: "NO_NODE_AVAILABLE",
        9: "DEVICE_EXCEPTION", 10: "NOT_SHARD_LEADER", 11: "SHARD_CLOSED", 12: "SHARD_FULL", 13: "INVALID_KEY",
        14: "INVALID_INDEX", 15: "INVALID_ARGUMENT", 16: "SHARD_ID_TAKEN", 17: "WRITE_TOO_LARGE",
        18: "FRAME_TOO_LARGE", 19: "UNAUTHORISED", 20: "INVALID_REQUEST", 21: "UNSUPPORTED_VERSION",
        22: "TIMEOUT", 23: "TOO_MANY_CONNECTIONS", 24: "SHUTTING_DOWN",
    ]

    /// Every code this version defines.
    public static var all: [StatusCode] { names.keys.sorted().map(StatusCode.init(rawValue:)) }

    public var name: String { Self.names[rawValue] ?? "STATUS_\(rawValue)" }
    public var description: String { name }
}

/// A status with its message, as sent on the wire.
public struct Status: Hashable, Sendable, CustomStringConvertible {
    public var code: StatusCode
    public var message: String

    public init(_ code: StatusCode, _ message: String = "") {
        self.code = code
        self.message = message
    }

    public static let ok = Status(.ok)
    public var isOK: Bool { code == .ok }
    public var description: String { message.isEmpty ? code.name : "\(code.name): \(message)" }
}
