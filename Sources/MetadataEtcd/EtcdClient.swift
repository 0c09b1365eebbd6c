import CCurl
import Dispatch
import Foundation
import Logging
import Metrics
import Metadata

/// libcurl must be initialised once, before any other thread uses it.
private let curlGlobalInit: Void = { _ = curl_global_init(Int(CURL_GLOBAL_ALL)) }()

/// Receives the bytes of one HTTP response (called on the curl thread).
class CurlSink: @unchecked Sendable {
    var data = Data()
    /// Returns false to abort the transfer.
    func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
        data.append(contentsOf: bytes)
        return true
    }
    /// Polled by curl about once a second during a transfer; true aborts it.
    func shouldAbort() -> Bool { false }
}

private func curlWriteCallback(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ user: UnsafeMutableRawPointer?) -> Int {
    guard let ptr, let user else { return 0 }
    let sink = Unmanaged<CurlSink>.fromOpaque(user).takeUnretainedValue()
    let n = size * count
    return sink.receive(UnsafeRawBufferPointer(start: ptr, count: n)) ? n : 0
}

private func curlProgressCallback(_ user: UnsafeMutableRawPointer?, _: curl_off_t, _: curl_off_t, _: curl_off_t, _: curl_off_t) -> Int32 {
    guard let user else { return 0 }
    return Unmanaged<CurlSink>.fromOpaque(user).takeUnretainedValue().shouldAbort() ? 1 : 0
}

/// The result of one HTTP POST on one endpoint.
enum TransferResult {
    case curlError(CURLcode, String)
    case http(Int)
}

/// A marker for responses that carry etcd's header (to follow the revision).
protocol WireHasHeader { var header: WireHeader? { get } }
extension WireRangeResponse: WireHasHeader {}
extension WirePutResponse: WireHasHeader {}
extension WireDeleteRangeResponse: WireHasHeader {}
extension WireTxnResponse: WireHasHeader {}
extension WireLeaseGrantResponse: WireHasHeader {}

/// The HTTP/JSON side of etcd's v3 gateway over libcurl: a pool of easy handles
/// (each used by one thread at a time, keeping its connections alive between
/// calls), failover between endpoints, the auth token and call deadlines.
/// Blocking curl calls run on a dispatch queue, never on Swift's cooperative pool.
final class EtcdClient: @unchecked Sendable {
    let endpoints: [String]
    let configuration: EtcdConfiguration
    let logger: Logger

    private let queue = DispatchQueue(label: "shardfs.etcd.curl", attributes: .concurrent)
    private let lock = NSLock()
    private var idle: [UnsafeMutableRawPointer] = []
    private var preferred = 0
    private var token: String?
    private var closed = false
    private var revision: Int64 = 0
    private static let maxIdleHandles = 8

    init(configuration: EtcdConfiguration, logger: Logger) throws {
        _ = curlGlobalInit
        self.endpoints = try configuration.validatedEndpoints()
        self.configuration = configuration
        self.logger = logger
        if configuration.callTimeout <= .zero { throw MetadataError.invalidArgument("callTimeout must be positive") }
        if (configuration.username == nil) != (configuration.password == nil) {
            throw MetadataError.invalidArgument("etcd username and password go together")
        }
    }

    deinit { close() }

    /// Frees the idle handles; calls still running free theirs when they end.
    func close() {
        let handles = lock.withLock { () -> [UnsafeMutableRawPointer] in
            closed = true
            defer { idle.removeAll() }
            return idle
        }
        for h in handles { curl_easy_cleanup(h) }
    }

    /// The highest etcd revision seen in any answer.
    var highestRevision: Int64 { lock.withLock { revision } }

    private func noteRevision(_ r: Int64) {
        lock.withLock { if r > revision { revision = r } }
    }

    // MARK: Calls

    /// POSTs `body` to `path` (e.g. "/v3/kv/range") and decodes the answer.
    func post<R: Decodable & Sendable>(_ path: String, _ body: [String: Any], as type: R.Type = R.self) async throws -> R {
        let data = Wire.encode(body)
        let raw = try await onCurlQueue { try self.call(path, data) }
        return try decode(path, raw)
    }

    /// `post` on the calling thread (which it blocks), for a thread of its own.
    func postBlocking<R: Decodable & Sendable>(_ path: String, _ body: [String: Any], as type: R.Type = R.self) throws -> R {
        try decode(path, try call(path, Wire.encode(body)))
    }

    private func decode<R: Decodable & Sendable>(_ path: String, _ raw: Data) throws -> R {
        let decoded: R
        do { decoded = try JSONDecoder().decode(R.self, from: raw) } catch {
            throw MetadataError.failed("etcd sent an answer to \(path) that does not decode: \(error)")
        }
        if let r = (decoded as? WireHasHeader)?.header?.revision { noteRevision(r.value) }
        return decoded
    }

    /// Runs blocking work on the curl queue and resumes the caller when done.
    func onCurlQueue<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async { continuation.resume(with: Result { try work() }) }
        }
    }

    /// One call (blocking): authenticates if needed, fails over, and retries once
    /// with a fresh token when etcd rejects the old one.
    func call(_ path: String, _ body: Data) throws -> Data {
        let start = ContinuousClock.now
        do {
            let answer = try callOnce(path, body)
            EtcdMetrics.finished(path, since: start, failure: nil)
            return answer
        } catch {
            EtcdMetrics.finished(path, since: start, failure: error)
            throw error
        }
    }

    private func callOnce(_ path: String, _ body: Data) throws -> Data {
        let deadline = ContinuousClock.now + configuration.callTimeout
        let token = try currentToken(deadline: deadline)
        do {
            return try callWithFailover(path, body, token: token, deadline: deadline)
        } catch MetadataError.unauthorized(let message) where configuration.username != nil && EtcdErrors.isStaleToken(message) {
            logger.info("etcd rejected the auth token, authenticating again", metadata: ["reason": "\(message)"])
            invalidateToken(token)
            let fresh = try currentToken(deadline: deadline)
            return try callWithFailover(path, body, token: fresh, deadline: deadline)
        }
    }

    /// The token to send, authenticating first if there is none (nil without auth).
    func currentToken(deadline: ContinuousClock.Instant) throws -> String? {
        guard let user = configuration.username, let password = configuration.password else { return nil }
        if let t = lock.withLock({ token }) { return t }
        let body = Wire.encode(["name": user, "password": password])
        let raw = try callWithFailover("/v3/auth/authenticate", body, token: nil, deadline: deadline)
        guard let t = (try? JSONDecoder().decode(WireAuthenticateResponse.self, from: raw))?.token, !t.isEmpty else {
            throw MetadataError.failed("etcd authentication returned no token")
        }
        lock.withLock { token = t }
        return t
    }

    /// Forgets `stale` (unless another call already replaced it).
    func invalidateToken(_ stale: String?) {
        lock.withLock { if token == stale { token = nil } }
    }

    /// Tries the preferred endpoint, then the others when a request surely never
    /// left (connection refused, unresolvable host). Any other failure is thrown
    /// (a write may have landed) but moves the next call to another endpoint.
    private func callWithFailover(_ path: String, _ body: Data, token: String?, deadline: ContinuousClock.Instant) throws -> Data {
        let start = lock.withLock { preferred }
        var lastError: MetadataError?
        for i in 0..<endpoints.count {
            let index = (start + i) % endpoints.count
            let endpoint = endpoints[index]
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { break }
            let sink = CurlSink()
            let result = transfer(url: endpoint + path, body: body, token: token, timeout: remaining, sink: sink)
            switch result {
            case .http(200):
                if i > 0 { lock.withLock { preferred = index } }
                return sink.data
            case .http(let status):
                let error = EtcdErrors.fromHTTP(status: status, body: sink.data, endpoint: endpoint)
                if error.isTransient { rotate(from: index, reason: error) }
                throw error
            case .curlError(let code, let detail):
                let error = EtcdErrors.fromCurl(code, detail: detail, endpoint: endpoint)
                lastError = error
                if EtcdErrors.neverSent(code) && i + 1 < endpoints.count {
                    logger.warning("etcd endpoint failed, trying the next one", metadata: ["endpoint": "\(endpoint)", "error": "\(error)"])
                    continue
                }
                if error.isTransient { rotate(from: index, reason: error) }
                throw error
            }
        }
        throw lastError ?? MetadataError.timeout("etcd call to \(path) ran out of time")
    }

    private func rotate(from index: Int, reason: MetadataError) {
        guard endpoints.count > 1 else { return }
        let next = (index + 1) % endpoints.count
        lock.withLock { if preferred == index { preferred = next } }
        logger.warning("etcd endpoint failing over", metadata: ["from": "\(endpoints[index])", "to": "\(endpoints[next])", "error": "\(reason)"])
    }

    // MARK: curl

    /// One blocking POST on a pooled handle. `timeout` nil means none (streams).
    func transfer(url: String, body: Data, token: String?, timeout: Duration?, sink: CurlSink, handle: UnsafeMutableRawPointer? = nil) -> TransferResult {
        guard let h = handle ?? checkout() else { return .curlError(CURLE_FAILED_INIT, "etcd client is closed") }
        defer { if handle == nil { checkin(h) } }
        // reset keeps the live connections, so the next call reuses them.
        curl_easy_reset(h)
        var headers: UnsafeMutablePointer<curl_slist>? = curl_slist_append(nil, "Content-Type: application/json")
        headers = curl_slist_append(headers, "Expect:")
        if let token { headers = curl_slist_append(headers, "Authorization: \(token)") }
        defer { curl_slist_free_all(headers) }
        let errorBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
        errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        defer { errorBuffer.deallocate() }

        let connectMs = min(timeout?.milliseconds ?? 3000, 3000)
        _ = shardfs_curl_setopt_string(h, CURLOPT_URL, url)
        _ = shardfs_curl_setopt_long(h, CURLOPT_POST, 1)
        _ = shardfs_curl_setopt_long(h, CURLOPT_NOSIGNAL, 1)
        _ = shardfs_curl_setopt_long(h, CURLOPT_CONNECTTIMEOUT_MS, connectMs)
        _ = shardfs_curl_setopt_long(h, CURLOPT_TIMEOUT_MS, timeout?.milliseconds ?? 0)
        _ = shardfs_curl_setopt_long(h, CURLOPT_TCP_KEEPALIVE, 1)
        _ = shardfs_curl_setopt_long(h, CURLOPT_TCP_KEEPIDLE, 10)
        _ = shardfs_curl_setopt_long(h, CURLOPT_TCP_KEEPINTVL, 5)
        _ = shardfs_curl_setopt_slist(h, CURLOPT_HTTPHEADER, headers)
        _ = shardfs_curl_setopt_pointer(h, CURLOPT_ERRORBUFFER, errorBuffer)
        if let ca = configuration.caFile { _ = shardfs_curl_setopt_string(h, CURLOPT_CAINFO, ca) }
        if let cert = configuration.certFile { _ = shardfs_curl_setopt_string(h, CURLOPT_SSLCERT, cert) }
        if let key = configuration.keyFile { _ = shardfs_curl_setopt_string(h, CURLOPT_SSLKEY, key) }
        let user = Unmanaged.passUnretained(sink).toOpaque()
        _ = shardfs_curl_setopt_write_callback(h, curlWriteCallback)
        _ = shardfs_curl_setopt_pointer(h, CURLOPT_WRITEDATA, user)
        _ = shardfs_curl_setopt_xferinfo_callback(h, curlProgressCallback)
        _ = shardfs_curl_setopt_pointer(h, CURLOPT_XFERINFODATA, user)
        _ = shardfs_curl_setopt_long(h, CURLOPT_NOPROGRESS, 0)

        let code: CURLcode = withExtendedLifetime(sink) {
            body.withUnsafeBytes { raw in
                _ = shardfs_curl_setopt_off(h, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(raw.count))
                _ = shardfs_curl_setopt_pointer(h, CURLOPT_POSTFIELDS, UnsafeMutableRawPointer(mutating: raw.baseAddress))
                return curl_easy_perform(h)
            }
        }
        guard code == CURLE_OK else { return .curlError(code, String(cString: errorBuffer)) }
        var status = 0
        _ = shardfs_curl_getinfo_long(h, CURLINFO_RESPONSE_CODE, &status)
        return .http(status)
    }

    /// A handle of its own (for a long stream); the caller cleans it up.
    func makeHandle() -> UnsafeMutableRawPointer? { curl_easy_init() }

    private func checkout() -> UnsafeMutableRawPointer? {
        if let h = lock.withLock({ closed ? nil : idle.popLast() }) { return h }
        return lock.withLock { closed } ? nil : curl_easy_init()
    }

    private func checkin(_ h: UnsafeMutableRawPointer) {
        let keep = lock.withLock { () -> Bool in
            guard !closed, idle.count < Self.maxIdleHandles else { return false }
            idle.append(h)
            return true
        }
        if !keep { curl_easy_cleanup(h) }
    }
}

/// etcd calls as the node sees them (swift-metrics; a no-op until the executable
/// bootstraps a backend): `shardfs_etcd_request_duration_seconds{path}`, failover
/// and re-authentication included, and `shardfs_etcd_failures_total{path,kind}`.
/// Labels are bounded: the handful of gateway paths the store calls, and the
/// `MetadataError` kinds. Handles are looked up per call (a few per metadata
/// operation), never cached before the backend exists.
enum EtcdMetrics {
    static func finished(_ path: String, since start: ContinuousClock.Instant, failure: Error?) {
        let elapsed = ContinuousClock.now - start
        Metrics.Timer(label: "shardfs_etcd_request_duration_seconds", dimensions: [("path", path)])
            .recordNanoseconds(elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000)
        guard let failure else { return }
        let kind: String
        switch failure as? MetadataError {
        case .unavailable?: kind = "unavailable"
        case .timeout?, .deadlineExceeded?: kind = "timeout"
        case .notFound?: kind = "not_found"
        case .alreadyExists?, .conflict?: kind = "conflict"
        case .unauthorized?: kind = "unauthorized"
        case .invalidArgument?: kind = "invalid_argument"
        default: kind = "failed"
        }
        Counter(label: "shardfs_etcd_failures_total", dimensions: [("path", path), ("kind", kind)]).increment()
    }
}
