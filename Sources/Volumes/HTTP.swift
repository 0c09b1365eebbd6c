import CCurl
import Foundation

/// libcurl must be initialised once, before any other thread uses it.
private let curlGlobalInit: Void = { _ = curl_global_init(Int(CURL_GLOBAL_ALL)) }()

/// Collects a response body (called on the thread running the transfer).
private final class BodySink: @unchecked Sendable {
    var data = Data()
}

private func bodyWriteCallback(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ user: UnsafeMutableRawPointer?) -> Int {
    guard let ptr, let user else { return 0 }
    let n = size * count
    Unmanaged<BodySink>.fromOpaque(user).takeUnretainedValue().data.append(UnsafeRawBufferPointer(start: ptr, count: n).bindMemory(to: UInt8.self))
    return n
}

public struct HTTPRequest: Sendable {
    public var method: String
    public var url: String
    /// Sent in this order; `Host` is taken from the URL by curl.
    public var headers: [(String, String)]
    public var body: Data

    public init(method: String, url: String, headers: [(String, String)] = [], body: Data = Data()) {
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
    }
}

public struct HTTPResponse: Sendable {
    public var status: Int
    public var body: Data
    public var text: String { String(decoding: body, as: UTF8.self) }
}

/// One blocking HTTP exchange per call over libcurl (a fresh easy handle each
/// time: cloud control-plane calls are rare), run on a thread of its own.
/// Failures to reach the server are `VolumeError.unreachable` (transient),
/// except an unresolvable host, which retrying does not fix.
public struct HTTPClient: Sendable {
    public var timeout: Duration
    public var caFile: String?

    public init(timeout: Duration = .seconds(30), caFile: String? = nil) {
        self.timeout = timeout
        self.caFile = caFile
    }

    public func send(_ request: HTTPRequest) async throws -> HTTPResponse {
        try await withCheckedThrowingContinuation { continuation in
            Thread { continuation.resume(with: Result { try self.sendBlocking(request) }) }.start()
        }
    }

    public func sendBlocking(_ request: HTTPRequest) throws -> HTTPResponse {
        _ = curlGlobalInit
        guard let h = curl_easy_init() else { throw VolumeError.failed("curl_easy_init failed") }
        defer { curl_easy_cleanup(h) }
        var headers: UnsafeMutablePointer<curl_slist>? = curl_slist_append(nil, "Expect:")
        for (name, value) in request.headers { headers = curl_slist_append(headers, "\(name): \(value)") }
        defer { curl_slist_free_all(headers) }
        let errorBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
        errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        defer { errorBuffer.deallocate() }
        let ms = Int(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        _ = shardfs_curl_setopt_string(h, CURLOPT_URL, request.url)
        _ = shardfs_curl_setopt_long(h, CURLOPT_NOSIGNAL, 1)
        _ = shardfs_curl_setopt_long(h, CURLOPT_CONNECTTIMEOUT_MS, min(ms, 5000))
        _ = shardfs_curl_setopt_long(h, CURLOPT_TIMEOUT_MS, ms)
        _ = shardfs_curl_setopt_slist(h, CURLOPT_HTTPHEADER, headers)
        _ = shardfs_curl_setopt_pointer(h, CURLOPT_ERRORBUFFER, errorBuffer)
        if let caFile { _ = shardfs_curl_setopt_string(h, CURLOPT_CAINFO, caFile) }
        let sink = BodySink()
        _ = shardfs_curl_setopt_write_callback(h, bodyWriteCallback)
        _ = shardfs_curl_setopt_pointer(h, CURLOPT_WRITEDATA, Unmanaged.passUnretained(sink).toOpaque())
        // POSTFIELDS is not copied: the bytes must live until curl_easy_perform returns.
        var body = [UInt8](request.body)
        if body.isEmpty { body = [0] }  // a valid pointer; the size below says 0 bytes
        let code: CURLcode = withExtendedLifetime(sink) {
            body.withUnsafeMutableBytes { raw in
                switch request.method {
                case "GET":
                    _ = shardfs_curl_setopt_long(h, CURLOPT_HTTPGET, 1)
                default:
                    // An explicit size sends the body (an empty one too) for POST and PUT alike.
                    _ = shardfs_curl_setopt_long(h, CURLOPT_POST, 1)
                    _ = shardfs_curl_setopt_off(h, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(request.body.count))
                    _ = shardfs_curl_setopt_pointer(h, CURLOPT_POSTFIELDS, raw.baseAddress)
                    if request.method != "POST" { _ = shardfs_curl_setopt_string(h, CURLOPT_CUSTOMREQUEST, request.method) }
                }
                return curl_easy_perform(h)
            }
        }
        guard code == CURLE_OK else {
            let detail = String(cString: errorBuffer)
            let text = "\(request.method) \(request.url.split(separator: "?").first ?? ""): " + (detail.isEmpty ? String(cString: curl_easy_strerror(code)) : detail)
            if code == CURLE_COULDNT_RESOLVE_HOST {
                throw VolumeError.failed("cannot resolve the host of \(text); check the region and endpoint")
            }
            throw VolumeError.unreachable(text)
        }
        var status = 0
        _ = shardfs_curl_getinfo_long(h, CURLINFO_RESPONSE_CODE, &status)
        return HTTPResponse(status: status, body: sink.data)
    }
}

/// Percent-encoding of RFC 3986 (unreserved characters stay), which both
/// SigV4 and Aliyun's V3 signature require for query strings and form bodies.
public func percentEncode(_ s: String) -> String {
    var out = ""
    for byte in s.utf8 {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
            out.unicodeScalars.append(Unicode.Scalar(byte))
        default:
            out += String(format: "%%%02X", byte)
        }
    }
    return out
}

/// `k=v&…` of already-sorted parameters, percent-encoded.
func formEncode(_ parameters: [(String, String)]) -> String {
    parameters.map { percentEncode($0.0) + "=" + percentEncode($0.1) }.joined(separator: "&")
}
