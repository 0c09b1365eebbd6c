import BatchProtocol
import BatchServer
import Foundation
import NIOCore
import ShardFSClient
import ShardNode
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A node with the batch service on a Unix socket and loopback TCP (free port).
final class ServerFixture: @unchecked Sendable {
    let dir: TemporaryDirectory
    let node: StorageNode
    let server: BatchServer
    var socket: String { server.unixSocketPath! }
    var tcp: Endpoint { .tcp(host: "127.0.0.1", port: server.tcpPort!) }

    private init(dir: TemporaryDirectory, node: StorageNode, server: BatchServer) {
        self.dir = dir
        self.node = node
        self.server = server
    }

    static func start(_ tweak: (inout BatchServerConfiguration) -> Void = { _ in }) async throws -> ServerFixture {
        let dir = try TemporaryDirectory("batch")
        var config = Configuration()
        config.node.dataDir = dir.sub("data")
        let node = try await StorageNode.start(config)
        var serverConfig = BatchServerConfiguration()
        serverConfig.tcpAddress = "127.0.0.1:0"
        serverConfig.unixSocketPath = dir.sub("s.sock")
        serverConfig.engineThreads = 2
        tweak(&serverConfig)
        let server = try await BatchServer.start(serverConfig, shards: node.shards)
        return ServerFixture(dir: dir, node: node, server: server)
    }

    func client(token: String = "") async throws -> ShardFSClient {
        try await ShardFSClient.connect(to: .unix(path: socket), token: token)
    }

    func stop() async { await server.shutdown() }
}

/// Runs `body` against a fresh server, stopping it even when `body` throws.
func withServer(_ tweak: (inout BatchServerConfiguration) -> Void = { _ in },
                _ body: (ServerFixture) async throws -> Void) async throws {
    let fixture = try await ServerFixture.start(tweak)
    do {
        try await body(fixture)
    } catch {
        await fixture.stop()
        throw error
    }
    await fixture.stop()
}

/// A plain blocking socket for feeding the server bad bytes.
final class RawSocket: @unchecked Sendable {
    let fd: Int32

    init(unixPath: String, receiveTimeoutSeconds: Int = 5) throws {
        fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            let bytes = Array(unixPath.utf8)
            raw.copyBytes(from: bytes.prefix(raw.count - 1))
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            Glibc.close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        var tv = timeval(tv_sec: receiveTimeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// A TCP connection to 127.0.0.1:`port`.
    init(tcpPort port: Int, receiveTimeoutSeconds: Int = 5) throws {
        fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            Glibc.close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        var tv = timeval(tv_sec: receiveTimeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    func send(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }

    /// Sends all of `bytes`; false once the connection refuses more (closed, reset, or the send timeout).
    func sendAll(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            offset += n
        }
        return true
    }

    /// What has arrived so far, without waiting; `closed` once the server has closed.
    func readNow() -> (bytes: [UInt8], closed: Bool) {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 { out += buf[0..<n]; continue }
            if n == 0 { return (out, true) }
            return (out, errno != EAGAIN && errno != EWOULDBLOCK)
        }
    }

    /// Everything until the server closes (or the timeout).
    func readToEnd() -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return out }
            out += buf[0..<n]
        }
    }

    /// Reads until `count` frames have come (or the server closes, or the timeout).
    func readFrames(_ count: Int) -> [Frame] {
        var decoder = FrameDecoder(maxFrameLength: Int(UInt32.max))
        var frames: [Frame] = []
        var buf = [UInt8](repeating: 0, count: 65_536)
        while frames.count < count {
            while frames.count < count, let frame = try? decoder.next() { frames.append(frame) }
            if frames.count == count { break }
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            decoder.append(ByteBuffer(bytes: buf[0..<n]))
        }
        return frames
    }

    deinit { Glibc.close(fd) }
}
