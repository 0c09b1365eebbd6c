import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Tells a service manager (systemd, with `Type=notify`) how the service is
/// doing: one datagram per message to the Unix socket named by `$NOTIFY_SOCKET`
/// (a leading `@` is the abstract namespace), as sd_notify(3) does, without
/// libsystemd. Without the variable, nothing is sent.
public enum ServiceManagerNotify {
    /// The service is ready: it serves.
    public static func ready(status: String) { send("READY=1\nSTATUS=\(status)\nMAINPID=\(getpid())") }
    /// The service begins to stop.
    public static func stopping() { send("STOPPING=1") }

    /// Sends `message`; returns whether a manager was there to take it.
    @discardableResult
    public static func send(_ message: String,
                            socket path: String? = ProcessInfo.processInfo.environment["NOTIFY_SOCKET"]) -> Bool {
        guard let path, !path.isEmpty, path.utf8.count < 108 else { return false }
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }  // abstract namespace
        withUnsafeMutableBytes(of: &address.sun_path) { out in
            for (i, byte) in bytes.enumerated() { out[i] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let sent = message.withCString { text in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, text, strlen(text), 0, $0, length) }
            }
        }
        return sent >= 0
    }
}
