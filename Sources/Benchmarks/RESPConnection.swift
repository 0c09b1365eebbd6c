// A minimal RESP client (blocking socket, one per thread): the Redis side of
// bench-batch, doing what the ShardFS client does, no more.
import BatchProtocol
import Dispatch
import Foundation
import ShardFSClient
import ShardStore

final class RESPConnection {
    private let fd: Int32
    private var buffer: UnsafeMutablePointer<UInt8>
    private var capacity = 1 << 20
    private var head = 0, tail = 0
    private var out: [UInt8] = []

    init(port: Int) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw BenchmarkError("socket: \(String(cString: strerror(errno)))") }
        self.fd = fd
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let ok = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard ok else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw BenchmarkError("cannot connect to redis on port \(port): \(reason)")
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        buffer = .allocate(capacity: capacity)
        out.reserveCapacity(256 << 10)
    }

    deinit {
        close(fd)
        buffer.deallocate()
    }

    /// Sends commands `indexes` in order with up to `depth` awaiting their replies.
    func pipeline(_ indexes: Range<Int>, depth: Int, send: (Int) -> Void, receive: (Int) throws -> Void) throws {
        var answered = indexes.lowerBound
        for i in indexes {
            send(i)
            if i - answered + 1 >= depth {
                try receive(answered)
                answered += 1
            }
        }
        while answered < indexes.upperBound {
            try receive(answered)
            answered += 1
        }
    }

    func sendMSET(_ items: [PutItem]) {
        out.removeAll(keepingCapacity: true)
        appendHeader(UInt8(ascii: "*"), 1 + 2 * items.count)
        appendBulk(Array("MSET".utf8))
        for item in items {
            appendBulk(item.key)
            appendBulk(item.value)
        }
        send(out)
    }

    func sendMGET(_ keys: [[UInt8]]) {
        out.removeAll(keepingCapacity: true)
        appendHeader(UInt8(ascii: "*"), 1 + keys.count)
        appendBulk(Array("MGET".utf8))
        for key in keys { appendBulk(key) }
        send(out)
    }

    func send(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if n <= 0 {
                    if n < 0 && errno == EINTR { continue }
                    return  // the next read reports the closed connection
                }
                offset += n
            }
        }
    }

    func expectOK() throws { try expectSimple("OK") }

    func expectSimple(_ word: String) throws {
        let type = try byte()
        let line = try lineText()
        guard type == UInt8(ascii: "+"), line == word else { throw BenchmarkError("redis answered \(Character(Unicode.Scalar(type)))\(line)") }
    }

    /// An MGET answer: `count` values of `size` bytes each, copied out as a real reader would.
    func expectValues(_ count: Int, size: Int) throws {
        let type = try byte()
        guard type == UInt8(ascii: "*") else { throw BenchmarkError("redis answered \(Character(Unicode.Scalar(type)))\(try lineText())") }
        let n = try integer()
        guard n == count else { throw BenchmarkError("MGET answered \(n) of \(count) values") }
        for _ in 0..<n {
            guard try byte() == UInt8(ascii: "$") else { throw BenchmarkError("MGET answered a non-bulk item") }
            let length = try integer()
            guard length == size else { throw BenchmarkError("MGET answered a value of \(length) bytes") }
            try fill(length + 2)
            let value = Array(UnsafeBufferPointer(start: buffer + head, count: length))
            head += length + 2
            if value.isEmpty { throw BenchmarkError("empty value") }
        }
    }

    private func appendHeader(_ type: UInt8, _ n: Int) {
        out.append(type)
        appendDecimal(n)
        out.append(13); out.append(10)
    }

    private func appendBulk(_ bytes: [UInt8]) {
        appendHeader(UInt8(ascii: "$"), bytes.count)
        out.append(contentsOf: bytes)
        out.append(13); out.append(10)
    }

    private func appendDecimal(_ n: Int) {
        if n >= 10 { appendDecimal(n / 10) }
        out.append(UInt8(ascii: "0") + UInt8(n % 10))
    }

    /// Makes at least `count` unread bytes available.
    private func fill(_ count: Int) throws {
        while tail - head < count {
            if head > 0 {
                memmove(buffer, buffer + head, tail - head)
                tail -= head
                head = 0
            }
            if count > capacity {
                let bigger = UnsafeMutablePointer<UInt8>.allocate(capacity: count)
                bigger.update(from: buffer, count: tail)
                buffer.deallocate()
                buffer = bigger
                capacity = count
            }
            let n = recv(fd, buffer + tail, capacity - tail, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw BenchmarkError("redis closed the connection") }
            tail += n
        }
    }

    private func byte() throws -> UInt8 {
        try fill(1)
        defer { head += 1 }
        return buffer[head]
    }

    private func integer() throws -> Int {
        var n = 0, negative = false
        while true {
            let b = try byte()
            if b == 13 { _ = try byte(); return negative ? -n : n }
            if b == UInt8(ascii: "-") { negative = true } else { n = n * 10 + Int(b - 48) }
        }
    }

    private func lineText() throws -> String {
        var bytes: [UInt8] = []
        while true {
            let b = try byte()
            if b == 13 { _ = try byte(); return String(decoding: bytes, as: UTF8.self) }
            bytes.append(b)
        }
    }
}
