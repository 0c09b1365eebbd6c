import Foundation

// The JSON of etcd's v3 gateway. It omits zero-value fields (a failed txn has
// no `succeeded`, an empty range no `kvs`, an empty value no `value`) and sends
// int64 fields as strings, so every field is optional and numbers go through
// `WireInt`. Keys and values are base64.

/// An int64 the gateway sends as a JSON string (or, defensively, a number).
struct WireInt: Decodable, Sendable {
    let value: Int64

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self), let v = Int64(s) {
            value = v
        } else {
            value = try c.decode(Int64.self)
        }
    }
}

extension Optional where Wrapped == WireInt {
    /// A missing int64 field means zero.
    var int: Int64 { self?.value ?? 0 }
}

struct WireHeader: Decodable, Sendable {
    var revision: WireInt?
}

struct WireKeyValue: Decodable, Sendable {
    var key: String?
    var value: String?
    var create_revision: WireInt?
    var mod_revision: WireInt?
    var version: WireInt?
    var lease: WireInt?

    var keyString: String { Self.decode(key).flatMap { String(data: $0, encoding: .utf8) } ?? "" }
    /// The raw value; an omitted value is an empty one.
    var valueData: Data { Self.decode(value) ?? Data() }
    var modRevision: Int64 { mod_revision.int }
    var createRevision: Int64 { create_revision.int }

    private static func decode(_ base64: String?) -> Data? {
        guard let base64 else { return nil }
        return Data(base64Encoded: base64)
    }
}

struct WireRangeResponse: Decodable, Sendable {
    var header: WireHeader?
    var kvs: [WireKeyValue]?
    var count: WireInt?
}

struct WirePutResponse: Decodable, Sendable {
    var header: WireHeader?
}

struct WireDeleteRangeResponse: Decodable, Sendable {
    var header: WireHeader?
    var deleted: WireInt?
}

struct WireResponseOp: Decodable, Sendable {
    var response_range: WireRangeResponse?
    var response_put: WirePutResponse?
    var response_delete_range: WireDeleteRangeResponse?
}

struct WireTxnResponse: Decodable, Sendable {
    var header: WireHeader?
    var succeeded: Bool?
    var responses: [WireResponseOp]?

    var didSucceed: Bool { succeeded ?? false }
}

struct WireLeaseGrantResponse: Decodable, Sendable {
    var header: WireHeader?
    var ID: WireInt?
    var TTL: WireInt?
    var error: String?
}

/// One message of the keepalive stream: `{"result":{"ID":..,"TTL":..}}`.
/// A missing TTL means the lease is gone.
struct WireLeaseKeepAliveMessage: Decodable, Sendable {
    struct Result: Decodable, Sendable {
        var ID: WireInt?
        var TTL: WireInt?
    }
    var result: Result?
    var error: WireError?
}

struct WireAuthenticateResponse: Decodable, Sendable {
    var token: String?
}

/// `{"error","message","code"}`: a gRPC status.
struct WireError: Decodable, Sendable {
    var error: String?
    var message: String?
    var code: Int?

    var text: String { message ?? error ?? "" }
}

struct WireEvent: Decodable, Sendable {
    /// Omitted for PUT (the zero value).
    var type: String?
    var kv: WireKeyValue?
    var isDelete: Bool { type == "DELETE" }
}

/// One line of the watch stream: `{"result":{...}}` or `{"error":{...}}`.
struct WireWatchMessage: Decodable, Sendable {
    struct Result: Decodable, Sendable {
        var header: WireHeader?
        var created: Bool?
        var canceled: Bool?
        var cancel_reason: String?
        var compact_revision: WireInt?
        var events: [WireEvent]?
    }
    var result: Result?
    var error: WireError?
}

/// Request bodies are built as plain dictionaries: int64s as strings, bytes as base64.
enum Wire {
    static func b64(_ s: String) -> String { Data(s.utf8).base64EncodedString() }
    static func b64(_ d: Data) -> String { d.base64EncodedString() }

    /// The end of the range of every key starting with `prefix`.
    static func prefixEnd(_ prefix: String) -> String {
        var bytes = Array(prefix.utf8)
        while let last = bytes.last {
            if last < 0xff {
                bytes[bytes.count - 1] = last + 1
                return Data(bytes).base64EncodedString()
            }
            bytes.removeLast()
        }
        return Data([0]).base64EncodedString()  // "\0": every key
    }

    static func encode(_ object: [String: Any]) -> Data {
        // Only dictionaries of strings, numbers, bools and arrays go in: cannot fail.
        (try? JSONSerialization.data(withJSONObject: object)) ?? Data("{}".utf8)
    }
}
