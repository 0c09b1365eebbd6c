import CCurl
import Foundation
import Logging
import Metadata

/// One etcd watch on a key prefix, feeding a `changes()` stream. The watch is a
/// streaming HTTP response (one `{"result":{...}}` JSON object per line, lines may
/// arrive split across chunks), read by a thread of its own with its own curl
/// handle. When the stream breaks (etcd restart, endpoint down) it reconnects,
/// resuming at the revision after the last one delivered, so no event is lost
/// or repeated.
final class EtcdWatch: CurlSink, @unchecked Sendable {
    typealias Mapper = @Sendable (WireKeyValue, Bool) -> MetadataEvent?

    private let client: EtcdClient
    private let prefix: String
    private let continuation: AsyncStream<MetadataEvent>.Continuation
    private let logger: Logger
    private let mapper: Mapper
    /// The first wait before reconnecting a broken watch (doubles up to 2 s on failures).
    private let reconnectDelay: Double
    private let condition = NSCondition()
    private var stopped = false  // under `condition`

    // Used by the watch thread only.
    /// The revision to resume at; nil before the first watch is created.
    private var nextRevision: Int64?
    private var buffer = Data()
    private var created = false
    /// Why etcd canceled the watch, if it did.
    private var cancelReason: String?
    private var compactRevision: Int64?

    init(client: EtcdClient, prefix: String, startRevision: Int64?, continuation: AsyncStream<MetadataEvent>.Continuation,
         logger: Logger, reconnectDelay: Double = 0.05, mapper: @escaping Mapper) {
        self.reconnectDelay = reconnectDelay
        self.client = client
        self.prefix = prefix
        self.nextRevision = startRevision
        self.continuation = continuation
        self.logger = logger
        self.mapper = mapper
    }

    func start() {
        let thread = Thread { [self] in
            Thread.current.name = "shardfs-etcd"  // named from inside: set before `start()` it does not reach Linux
            run()
        }
        thread.start()
    }

    /// Ends the watch: the transfer is aborted within about a second (curl polls
    /// `shouldAbort`) and the stream finishes.
    func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
        }
        continuation.finish()
    }

    private var isStopped: Bool { condition.withLock { stopped } }

    /// Waits `seconds` unless stopped first; returns false when stopped.
    private func pause(_ seconds: Double) -> Bool {
        condition.withLock {
            let until = Date(timeIntervalSinceNow: seconds)
            while !stopped && condition.wait(until: until) {}
            return !stopped
        }
    }

    private func run() {
        guard let handle = client.makeHandle() else {
            logger.error("etcd watch: cannot create a curl handle")
            continuation.finish()
            return
        }
        defer { curl_easy_cleanup(handle) }
        var endpointIndex = 0
        var backoff = reconnectDelay
        while !isStopped {
            let endpoint = client.endpoints[endpointIndex % client.endpoints.count]
            var request: [String: Any] = ["key": Wire.b64(prefix), "range_end": Wire.prefixEnd(prefix)]
            if let next = nextRevision { request["start_revision"] = String(next) }
            buffer.removeAll()
            created = false
            cancelReason = nil
            compactRevision = nil

            let problem: String
            var token: String?
            do {
                token = try client.currentToken(deadline: .now + client.configuration.callTimeout)
                let result = client.transfer(url: endpoint + "/v3/watch", body: Wire.encode(["create_request": request]),
                                             token: token, timeout: nil, sink: self, handle: handle)
                if isStopped { break }
                switch result {
                case .curlError(let code, let detail):
                    problem = cancelReason ?? "\(EtcdErrors.fromCurl(code, detail: detail, endpoint: endpoint))"
                case .http(let status):
                    problem = cancelReason ?? (status == 200 ? "stream ended"
                        : "\(EtcdErrors.fromHTTP(status: status, body: buffer, endpoint: endpoint))")
                }
            } catch {
                problem = "\(error)"
            }
            if let reason = cancelReason, EtcdErrors.isAuthFailure(grpcCode: nil, message: reason) {
                client.invalidateToken(token)
            }
            if let compacted = compactRevision {
                logger.error("etcd compacted revisions this watch had not read: changes were lost",
                             metadata: ["from": "\(nextRevision ?? 0)", "resume": "\(compacted)"])
                nextRevision = compacted
            }
            // A connection that worked resets the backoff; failures back off up to 2 s
            // and move to the next endpoint.
            if created { backoff = reconnectDelay } else {
                endpointIndex += 1
                backoff = min(backoff * 2, max(2, reconnectDelay))
            }
            logger.warning("etcd watch broke; reconnecting",
                           metadata: ["endpoint": "\(endpoint)", "problem": "\(problem)", "resume": "\(nextRevision.map(String.init) ?? "now")"])
            if !pause(backoff) { break }
        }
        continuation.finish()
    }

    // MARK: CurlSink (on the watch thread, inside curl_easy_perform)

    override func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
        buffer.append(contentsOf: bytes)
        // Hand over every complete line; keep a partial one for the next chunk.
        while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
            let line = buffer[buffer.startIndex..<newline]
            let keepGoing = handle(line: Data(line))
            buffer.removeSubrange(buffer.startIndex...newline)
            if !keepGoing { return false }
        }
        return !isStopped
    }

    override func shouldAbort() -> Bool { isStopped }

    /// Returns false to end this connection (the watch was canceled).
    private func handle(line: Data) -> Bool {
        guard line.contains(where: { $0 > 0x20 }) else { return true }
        guard let message = try? JSONDecoder().decode(WireWatchMessage.self, from: line) else {
            logger.warning("etcd watch: a line that does not decode", metadata: ["line": "\(String(decoding: line.prefix(200), as: UTF8.self))"])
            return true
        }
        if let error = message.error {
            cancelReason = error.text
            return false
        }
        guard let result = message.result else { return true }
        if result.canceled == true {
            cancelReason = result.cancel_reason ?? "watch canceled"
            if result.compact_revision.int > 0 { compactRevision = result.compact_revision.int }
            return false
        }
        if result.created == true {
            created = true
            // Without a start revision the watch began after the header's revision.
            if nextRevision == nil, let r = result.header?.revision?.value { nextRevision = r + 1 }
        }
        guard let events = result.events, !events.isEmpty else { return true }
        // Events of one revision (one txn) arrive together; skip any revision
        // already delivered, then move the resume point past this message.
        let floor = nextRevision ?? 0
        var highest = floor - 1
        for event in events {
            guard let kv = event.kv else { continue }
            let revision = kv.modRevision
            guard revision >= floor else { continue }
            highest = max(highest, revision)
            if let mapped = mapper(kv, event.isDelete) { continuation.yield(mapped) }
        }
        nextRevision = highest + 1
        return true
    }
}
