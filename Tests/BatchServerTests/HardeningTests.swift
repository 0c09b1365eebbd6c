import BatchProtocol
import BatchServer
import Foundation
import NIOCore
import ShardFSClient
import ShardNode
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

private func helloFrame(version: UInt16 = ProtocolConstants.version) -> [UInt8] {
    var b = ByteBufferAllocator().buffer(capacity: 32)
    RequestCodec.encode(.hello(version: version, token: ""), requestID: 0, into: &b)
    return Array(b.readableBytesView)
}

private func requestFrame(_ request: Request, id: UInt32, version: UInt16 = ProtocolConstants.version) -> [UInt8] {
    var b = ByteBufferAllocator().buffer(capacity: 64)
    RequestCodec.encode(request, requestID: id, version: version, into: &b)
    return Array(b.readableBytesView)
}

private func decodeAll(_ raw: [UInt8]) -> [Response] {
    var decoder = FrameDecoder(maxFrameLength: Int(UInt32.max))
    decoder.append(ByteBuffer(bytes: raw))
    var out: [Response] = []
    while let f = try? decoder.next(), let r = try? ResponseCodec.decode(f) { out.append(r) }
    return out
}

private func errorStatus(_ raw: [UInt8]) -> StatusCode? {
    if case .error(_, let s) = decodeAll(raw).last { return s.code }
    return nil
}

private func code(_ body: () async throws -> Void) async -> StatusCode? {
    do { try await body() } catch ClientError.status(let s) { return s.code } catch { return nil }
    return .ok
}

/// Sends `bytes` one at a time, `interval` apart, until the server closes.
/// Returns when it closed (seconds from the first byte; nil if it did not
/// within `waitAfter` seconds of the last byte) and what it sent.
private func trickle(_ socket: RawSocket, _ bytes: [UInt8], interval: Double, waitAfter: Double = 3) -> (closedAfter: Double?, received: [UInt8]) {
    let start = Date()
    var received: [UInt8] = []
    for byte in bytes {
        socket.send([byte])
        usleep(useconds_t(interval * 1_000_000))
        let now = socket.readNow()
        received += now.bytes
        if now.closed { return (Date().timeIntervalSince(start), received) }
    }
    let deadline = Date(timeIntervalSinceNow: waitAfter)
    while Date() < deadline {
        let now = socket.readNow()
        received += now.bytes
        if now.closed { return (Date().timeIntervalSince(start), received) }
        usleep(20_000)
    }
    return (nil, received)
}

/// The issue's security list (issue 15): deadlines, limits before the handshake,
/// who may close and delete, size limits and the connection limit (first start: FirstStartTests).
@Suite(.serialized) struct HardeningTests {
    @Test func aClientTricklingBytesIsClosedAtTheDeadlineNotKeptAlive() async throws {
        try await withServer({ $0.handshakeTimeout = .seconds(1); $0.frameTimeout = .seconds(1) }) { fx in
            let port = fx.server.tcpPort!
            let (handshake, frame) = try await offPool { () -> ((Double?, [UInt8]), (Double?, [UInt8])) in
                // A Hello at 5 bytes a second would take 3.4 s: the handshake deadline is 1 s.
                let slowHello = try RawSocket(tcpPort: port)
                let first = trickle(slowHello, helloFrame(), interval: 0.2)
                // Shaken hands, then a 129-byte Put at 20 bytes a second (6.5 s): the frame deadline is 1 s.
                let slowFrame = try RawSocket(tcpPort: port)
                slowFrame.send(helloFrame())
                guard case .reply(.hello, _, let st, _)? = slowFrame.readFrames(1).first.flatMap({ try? ResponseCodec.decode($0) }),
                      st.isOK else { return (first, (nil, [])) }
                let put = requestFrame(.put(client: "c", shard: 1, item: PutItem(key: [0x61], value: [UInt8](repeating: 7, count: 100))),
                                       id: 1)
                return (first, trickle(slowFrame, put, interval: 0.05))
            }
            #expect(errorStatus(handshake.1) == .timeout, "\(decodeAll(handshake.1))")
            #expect(handshake.0.map { $0 >= 0.9 && $0 < 3 } == true, "closed after \(String(describing: handshake.0)) s")
            #expect(errorStatus(frame.1) == .timeout, "\(decodeAll(frame.1))")
            #expect(frame.0.map { $0 >= 0.9 && $0 < 4 } == true, "closed after \(String(describing: frame.0)) s")
        }
    }

    @Test func sixtySlowUnauthenticatedClientsDoNotKeepARealClientOut() async throws {
        // Deadlines long enough not to help: the share of unauthenticated connections must.
        try await withServer({ $0.maxConnections = 60; $0.handshakeTimeout = .seconds(60); $0.frameTimeout = .seconds(60) }) { fx in
            let port = fx.server.tcpPort!
            let hello = helloFrame()
            let tricklers = try await offPool { () -> [RawSocket] in
                // 60 clients each start a Hello (never finished) and keep trickling it.
                let sockets = try (0..<60).map { _ in try RawSocket(tcpPort: port) }
                for (i, s) in sockets.enumerated() { s.send([hello[0]]); if i % 10 == 9 { usleep(20_000) } }
                return sockets
            }
            let stop = ManagedAtomicFlag()
            let dripping = Thread {
                var next = 1
                while !stop.isSet && next < hello.count - 1 {
                    for s in tricklers { s.send([hello[next]]) }
                    next += 1
                    usleep(300_000)
                }
            }
            dripping.start()
            defer { stop.set() }
            try await Task.sleep(for: .milliseconds(300))
            // A real TCP client and a Unix socket client still get in and work.
            let tcp = try await ShardFSClient.connect(to: fx.tcp)
            let shard = try await tcp.newShard(owner: "real")
            try await tcp.put(client: "real", shard: shard, key: Array("k".utf8), value: Array("v".utf8))
            #expect(try await tcp.get(shard: shard, key: Array("k".utf8)).value == Array("v".utf8))
            let unix = try await fx.client()
            #expect(try await unix.stat(shard).owner == "real")
            // Most tricklers were pushed out; at most a quarter of 60 may wait for a handshake.
            // (Their closes may still be on the way: look again for up to 10 s.)
            let (pushedOut, stillOpen) = try await offPool { () -> (Int, Int) in
                var seen = [(bytes: [UInt8], closed: Bool)](repeating: ([], false), count: tricklers.count)
                for _ in 0..<200 {
                    for (i, s) in tricklers.enumerated() where !seen[i].closed {
                        let now = s.readNow()
                        seen[i] = (seen[i].bytes + now.bytes, now.closed)
                    }
                    if seen.filter({ !$0.closed }).count <= 15 { break }
                    usleep(50_000)
                }
                return (seen.filter { $0.closed && errorStatus($0.bytes) == .tooManyConnections }.count,
                        seen.filter { !$0.closed }.count)
            }
            #expect(pushedOut >= 45 && stillOpen <= 15, "\(pushedOut) pushed out, \(stillOpen) still open")
            await tcp.close()
            await unix.close()
        }
    }

    @Test func serverMemoryStaysBoundedWithFortyClientsDribblingLargeFrames() async throws {
        let dir = try TemporaryDirectory("rss")
        let serve = try await ServeProcess.start(["--data-dir", dir.sub("data"), "--listen", "127.0.0.1:0", "--log-level", "error"])
        defer { serve.stop() }
        let pid = serve.process.processIdentifier
        let tcp = try #require(serve.readyLine.split(whereSeparator: \.isWhitespace).first { $0.hasPrefix("tcp=") })
        let port = try #require(Int(tcp.split(separator: ":").last!))
        // Warm up: a real client's work, so the baseline includes what serving costs.
        let warm = try await ShardFSClient.connect(to: .tcp(host: "127.0.0.1", port: port))
        let shard = try await warm.newShard(owner: "w")
        try await warm.put(client: "w", shard: shard, key: Array("k".utf8), value: [UInt8](repeating: 1, count: 1 << 20))
        await warm.close()
        let before = try residentBytes(pid)
        let held = try await offPool { () -> [RawSocket] in
            // Each announces a Put of 16 MiB before any Hello, then pushes 8 MiB of it.
            var header: [UInt8] = []
            let length = UInt32(16 << 20)
            header += withUnsafeBytes(of: length.bigEndian, Array.init)
            header += [Opcode.put.rawValue, 0, 0, 0, 1]
            let chunk = [UInt8](repeating: 0x41, count: 64 << 10)
            var sockets: [RawSocket] = []
            for _ in 0..<40 {
                let s = try RawSocket(tcpPort: port, receiveTimeoutSeconds: 2)
                if s.sendAll(header) {
                    for _ in 0..<128 where s.sendAll(chunk) {}
                }
                sockets.append(s)
            }
            return sockets
        }
        try await Task.sleep(for: .milliseconds(500))
        let after = try residentBytes(pid)
        let grown = after - before
        #expect(grown < 48 << 20, "RSS grew by \(grown >> 20) MiB (from \(before >> 20) MiB)")
        // They were refused at the length, with FRAME_TOO_LARGE.
        let refused = try await offPool { held.filter { errorStatus($0.readNow().bytes) == .frameTooLarge }.count }
        #expect(refused == 40)
        let after2 = try await ShardFSClient.connect(to: .tcp(host: "127.0.0.1", port: port))
        #expect(try await after2.get(shard: shard, key: Array("k".utf8)).value.count == 1 << 20)
        await after2.close()
    }

    @Test func onlyTheOwnerClosesOrDeletesAShard() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let shard = try await c.newShard(owner: "alice")
            #expect(await code { try await c.closeShard(client: "mallory", shard: shard) } == .shardFenced)
            #expect(await code { try await c.deleteShard(client: "mallory", shard: shard) } == .shardFenced)
            #expect(await code { try await c.deleteShard(client: "", shard: shard) } == .clientIDRequired)
            #expect(await code { try await c.closeShard(client: "mallory", shard: 999_999) } == .shardNotFound)
            // A version-1 client is understood, but its CloseShard and DeleteShard name no one: refused.
            let path = fx.socket
            let old = try await offPool { () -> [Response] in
                let s = try RawSocket(unixPath: path, receiveTimeoutSeconds: 60)
                s.send(helloFrame(version: 1) + requestFrame(.closeShard(client: "", shard: shard), id: 1, version: 1)
                       + requestFrame(.deleteShard(client: "", shard: shard), id: 2, version: 1)
                       + requestFrame(.stat(shard), id: 3, version: 1))
                return s.readFrames(4).compactMap { try? ResponseCodec.decode($0) }
            }
            #expect(old.count == 4)
            for case .reply(let op, _, let status, let payload) in old {
                switch op {
                case .hello: if case .hello(let info) = payload { #expect(info.version == 1) } else { Issue.record("\(payload)") }
                case .closeShard, .deleteShard: #expect(status.code == .clientIDRequired, "\(status)")
                case .stat: #expect(status.isOK)
                default: Issue.record("unexpected \(op)")
                }
            }
            #expect(try await c.stat(shard).closed == false)
            try await c.closeShard(client: "alice", shard: shard)
            #expect(try await c.stat(shard).closed)
            try await c.deleteShard(client: "alice", shard: shard)
            #expect(await code { _ = try await c.stat(shard) } == .shardNotFound)
        }
    }

    @Test func sizeLimitsNoVolumeCanHoldAreRefusedWithoutUsingAnID() async throws {
        try await withServer { fx in
            let c = try await fx.client()
            defer { Task { await c.close() } }
            let first = try await c.newShard(owner: "s")
            var st = statvfs()
            #expect(statvfs(fx.node.configuration.resolvedVolumeRoot, &st) == 0)
            let volumeBytes = Int(st.f_blocks) * Int(st.f_frsize)
            for limit in [1 << 48, Int(UInt64(1 << 62)), volumeBytes + (1 << 30)] {
                do {
                    _ = try await c.newShard(owner: "s", sizeLimit: limit)
                    Issue.record("a size limit of \(limit) was accepted")
                } catch ClientError.status(let status) {
                    #expect(status.code == .invalidArgument && status.message.contains("size limit"), "\(status)")
                }
            }
            // No ID was used by the refusals.
            #expect(try await c.newShard(owner: "s") == first + 1)
            // A limit the volume can hold is fine.
            #expect(try await c.newShard(owner: "s", sizeLimit: 1 << 30) == first + 2)
        }
    }

    @Test func theDocumentedLimitsAreTheDefaults() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let doc = try String(contentsOf: root.appendingPathComponent("docs/PROTOCOL.md"), encoding: .utf8)
        let server = BatchServerConfiguration()
        let node = ShardNode.Configuration()
        #expect(server.maxConnections == 1024 && node.server.maxConnections == server.maxConnections)
        #expect(doc.contains("| max connections (both listeners together) | 1,024 |"))
        #expect(server.handshakeTimeout == .milliseconds(Int64(node.server.handshakeTimeoutMs)))
        #expect(server.frameTimeout == .milliseconds(Int64(node.server.frameTimeoutMs)))
        #expect(doc.contains("| handshake deadline (from connecting to the Hello accepted) | 10 s |") && server.handshakeTimeout == .seconds(10))
        #expect(doc.contains("| frame deadline (from a frame's first byte to its last) | 30 s |") && server.frameTimeout == .seconds(30))
        #expect(doc.contains("| frame length before the handshake | 4,096 bytes |")
                && ProtocolConstants.preHandshakeMaxFrameLength == 4096)
        #expect(doc.contains("| connections still in their handshake, per listener | a quarter of max connections (256) |")
                && server.unauthenticatedShare == 256)
        #expect(!doc.contains("4,096 connections") && !doc.contains("| max connections | 4,096 |"))
    }
}

/// VmRSS of a process, in bytes.
private func residentBytes(_ pid: Int32) throws -> Int {
    let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
    guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
          let kb = Int(line.split(whereSeparator: \.isWhitespace)[1]) else {
        throw POSIXError(.EINVAL)
    }
    return kb << 10
}

/// A flag one thread sets and another reads.
private final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
}
