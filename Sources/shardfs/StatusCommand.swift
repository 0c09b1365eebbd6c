import ArgumentParser
import Foundation
import Glibc
import ShardNode

/// `shardfs status`: asks the running node itself, over its admin socket
/// (`<data_dir>/shardfs-admin.sock`) or its metrics address (--address), for
/// `/status`. The node is the only one that knows its roles, lease, views and
/// uptime, and the data folder it holds is locked: reading its metadata from a
/// second process would see records, not the live node.
struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show a running node: ID, version, uptime, volumes and roles, shards by state, views, lease.",
        discussion: """
            Asks the node over its admin socket <data_dir>/shardfs-admin.sock (root or the node's \
            user), or with --address over its metrics listener (server.metrics_address). \
            Exits 1 when no node answers.
            """)
    @OptionGroup var node: NodeOptions
    @Option(name: .long, help: "host:port of the node's metrics listener, instead of the admin socket.") var address: String?
    @Flag(name: .long, help: "Print the status as JSON.") var json = false

    func run() async throws {
        let target: AdminTarget
        if let address {
            guard let (host, port) = splitAddress(address) else { throw ValidationError("--address \"\(address)\" is not host:port") }
            target = .tcp(host: host, port: port)
        } else {
            target = .unix(AdminEndpoint.socketPath(dataDir: try node.configuration().node.dataDir))
        }
        let body = try fetchAdmin(target, path: "/status")
        if json {
            FileHandle.standardOutput.write(Data(body))
            return
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let status: NodeStatus
        do { status = try decoder.decode(NodeStatus.self, from: Data(body)) } catch {
            throw CommandFailure("the node at \(target) answered something that is not a status: \(error)")
        }
        emit(Self.render(status))
    }

    static func render(_ s: NodeStatus) -> String {
        var lines: [String] = []
        lines.append("node       \(s.nodeID)  (ShardFS \(s.version), pid \(s.pid))")
        lines.append("address    \(s.address.isEmpty ? "-" : s.address)")
        lines.append("uptime     \(duration(s.uptimeSeconds))")
        lines.append("data       \(s.dataDir)  (metadata: \(s.metadataType))")
        lines.append("lease      \(s.leaseFresh ? "fresh" : "NOT FRESH: this node does not write or serve views until it is renewed")")
        let states = s.shardsByState.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        lines.append("shards     \(states)  (open here: \(s.localShards), batch logs pending: \(ByteSize.format(s.batchLogPendingBytes)))")
        lines.append("")
        lines.append(["VOLUME", "ROLE", "EPOCH", "MOUNTED", "DEVICE", "FREE", "VIEW"].map { $0.padding(toLength: 12, withPad: " ", startingAt: 0) }
            .joined().trimmingCharacters(in: .whitespaces))
        for v in s.volumes {
            let role = v.role + (v.role == "primary" && !v.writing ? "(!)" : "")
            let free = v.freeBytes.map { f in v.sizeBytes.map { "\(ByteSize.format(Int(f)))/\(ByteSize.format(Int($0)))" } ?? "" } ?? "-"
            let view = v.viewGeneration.map { "gen \($0), \(String(format: "%.1f", v.viewAgeSeconds ?? 0)) s old" } ?? "-"
            let cells = [v.volumeID, role, "\(v.epoch)", v.mounted ? v.mountPath : "no", v.device.isEmpty ? "-" : v.device, free, view]
            lines.append(cells.map { $0.count >= 12 ? $0 + "  " : $0.padding(toLength: 12, withPad: " ", startingAt: 0) }
                .joined().trimmingCharacters(in: .whitespaces))
        }
        if s.volumes.contains(where: { $0.role == "primary" && !$0.writing }) {
            lines.append("(!) primary in the metadata but not writing here: taking over, deposed, or its lease lapsed")
        }
        return lines.joined(separator: "\n")
    }

    static func duration(_ seconds: Double) -> String {
        let s = Int(seconds)
        if s < 60 { return "\(s)s" }
        if s < 3600 { return "\(s / 60)m\(s % 60)s" }
        if s < 86400 { return "\(s / 3600)h\(s % 3600 / 60)m" }
        return "\(s / 86400)d\(s % 86400 / 3600)h"
    }
}

enum AdminTarget: CustomStringConvertible {
    case unix(String)
    case tcp(host: String, port: Int)
    var description: String {
        switch self {
        case .unix(let path): return path
        case .tcp(let host, let port): return "\(host):\(port)"
        }
    }
}

private func splitAddress(_ address: String) -> (String, Int)? {
    guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]), port > 0 else { return nil }
    var host = String(address[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return (host.isEmpty ? "127.0.0.1" : host, port)
}

/// GET `path` from a node's admin listener (HTTP/1.0, read to the end): the body,
/// or an error that says what to check. Blocking: for the CLI only.
func fetchAdmin(_ target: AdminTarget, path: String, timeoutSeconds: Int = 30) throws -> [UInt8] {
    let fd: Int32
    switch target {
    case .unix(let socketPath):
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CommandFailure("cannot make a socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(socketPath.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            close(fd)
            throw CommandFailure("the admin socket path \(socketPath) is too long for a Unix socket")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw CommandFailure("no node answers on \(socketPath) (\(reason)) — is `shardfs serve` or `shardfs mount` running on this data folder?")
        }
    case .tcp(let host, let port):
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, "\(port)", &hints, &list) == 0, let first = list else {
            throw CommandFailure("cannot resolve \(host)")
        }
        defer { freeaddrinfo(list) }
        fd = socket(first.pointee.ai_family, first.pointee.ai_socktype, first.pointee.ai_protocol)
        guard fd >= 0, connect(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0 else {
            let reason = String(cString: strerror(errno))
            if fd >= 0 { close(fd) }
            throw CommandFailure("no node answers on \(host):\(port) (\(reason)) — is server.metrics_address set to it?")
        }
    }
    defer { close(fd) }
    var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let request = Array("GET \(path) HTTP/1.0\r\nHost: shardfs\r\n\r\n".utf8)
    var sent = 0
    while sent < request.count {
        let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard n > 0 else { throw CommandFailure("the node at \(target) closed the connection") }
        sent += n
    }
    var response: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &chunk, chunk.count, 0)
        if n > 0 { response += chunk[0..<n] } else if n < 0 && errno == EINTR { continue } else if n < 0 {
            throw CommandFailure("no answer from the node at \(target) within \(timeoutSeconds) s")
        } else { break }
    }
    guard let split = response.firstRange(of: Array("\r\n\r\n".utf8)) else {
        throw CommandFailure("the node at \(target) sent no HTTP answer")
    }
    let head = String(decoding: response[..<split.lowerBound], as: UTF8.self)
    let body = Array(response[split.upperBound...])
    guard head.hasPrefix("HTTP/1.0 200") || head.hasPrefix("HTTP/1.1 200") else {
        throw CommandFailure("the node at \(target) answered \(head.split(separator: "\r\n").first ?? ""): \(String(decoding: body, as: UTF8.self))")
    }
    return body
}
