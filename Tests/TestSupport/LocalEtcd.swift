import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real etcd for one test: free loopback ports, a temporary folder (data,
/// log, TLS files). It runs under a `WatchedProcess` watchdog that kills it and
/// removes the folder if the test process dies, so none outlives the tests even
/// on a crash. Use `withLocalEtcd`, which always destroys it.
public final class LocalEtcd: @unchecked Sendable {
    /// The temporary folder: `data/`, `etcd.log`, `tls/`.
    public let directory: String
    public private(set) var clientPort: Int
    public private(set) var peerPort: Int
    /// Arguments added to etcd's (the TLS ones included).
    public let extraArguments: [String]
    /// With TLS: the CA, server and client files (clients must present a certificate).
    public let tls: TLSFiles?
    private var child: WatchedProcess?

    public var endpoint: String { "\(tls == nil ? "http" : "https")://127.0.0.1:\(clientPort)" }
    public var dataDir: String { directory + "/data" }
    public var log: String { (try? String(contentsOfFile: directory + "/etcd.log", encoding: .utf8)) ?? "" }
    /// etcd's pid while it runs.
    public var pid: pid_t? { child?.pid }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        public init(_ description: String) { self.description = description }
    }

    public static var binary: String? {
        ["/usr/bin/etcd", "/usr/local/bin/etcd"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    private init(extraArguments: [String], tls: Bool) throws {
        directory = URL(fileURLWithPath: NSTemporaryDirectory())
            .appendingPathComponent("shardfs-etcd-\(getpid())-\(UUID().uuidString.prefix(8))").standardizedFileURL.path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        clientPort = try freeLoopbackPort()
        peerPort = try freeLoopbackPort()
        self.tls = tls ? try TLSFiles.make(in: directory) : nil
        var arguments = extraArguments
        if let files = self.tls {
            arguments += ["--cert-file", files.serverCert, "--key-file", files.serverKey,
                          "--client-cert-auth", "--trusted-ca-file", files.ca]
        }
        self.extraArguments = arguments
    }

    /// A fresh etcd, answering. The free ports are picked before etcd binds them,
    /// so another process may take one meanwhile: then etcd exits at once, and it
    /// is started again on newly picked ports (three times at most).
    public static func launch(extraArguments: [String] = [], tls: Bool = false) async throws -> LocalEtcd {
        let etcd = try LocalEtcd(extraArguments: extraArguments, tls: tls)
        for attempt in 1...3 {
            do {
                try await etcd.start()
                return etcd
            } catch let error as Failure where attempt < 3 && error.description.contains("exited at start") {
                await etcd.signalAndWait(SIGKILL)
                etcd.clientPort = try freeLoopbackPort()
                etcd.peerPort = try freeLoopbackPort()
                try? FileManager.default.removeItem(atPath: etcd.dataDir)
                try? FileManager.default.removeItem(atPath: etcd.directory + "/etcd.log")
            } catch {
                await etcd.destroy()
                throw error
            }
        }
        await etcd.destroy()
        throw Failure("etcd did not start")
    }

    /// Starts etcd (on the same ports and data each time) and waits up to 60 s
    /// until it answers /health.
    public func start() async throws {
        guard let binary = Self.binary else { throw Failure("etcd is not installed (apt-get install etcd-server etcd-client)") }
        precondition(child == nil, "etcd is already running")
        let peer = "http://127.0.0.1:\(peerPort)"
        let process = WatchedProcess(binary, [
            "--name", "test", "--data-dir", dataDir,
            "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", "test=\(peer)", "--log-level", "error",
        ] + extraArguments, pidFolder: directory, log: directory + "/etcd.log", cleanup: "rm -rf \(shellQuoted(directory))")
        do { try process.start() } catch {
            throw Failure("etcd exited at start (\(error)): \(log)")
        }
        child = process
        var curl = ["-sf", "--max-time", "1", "-o", "/dev/null"]
        if let tls { curl += ["--cacert", tls.ca, "--cert", tls.clientCert, "--key", tls.clientKey] }
        var exited = false
        let ready = try await waitUntil(60, every: .milliseconds(50)) {
            // An answer from another test's etcd on a port taken meanwhile does not count.
            guard process.isRunning else {
                exited = true
                return true
            }
            return try await runAsync("/usr/bin/curl", curl + ["\(endpoint)/health"]).status == 0 && process.isRunning
        }
        if exited { throw Failure("etcd exited at start: \(log)") }
        if !ready { throw Failure("etcd did not become ready within 60 s: \(log)") }
    }

    /// Graceful stop (SIGTERM), waiting until etcd has exited.
    public func stop() async { await signalAndWait(SIGTERM) }

    /// SIGKILL, like a crash.
    public func kill9() async { await signalAndWait(SIGKILL) }

    /// A graceful stop, then `start()`.
    public func restart() async throws {
        await stop()
        try await start()
    }

    /// SIGSTOP / SIGCONT: an etcd that stops answering, then comes back.
    public func pause() { child?.signal(SIGSTOP) }
    public func resume() { child?.signal(SIGCONT) }

    private func signalAndWait(_ signal: Int32) async {
        guard let child else { return }
        if signal != SIGKILL { child.signal(SIGCONT) }
        await child.stop(signal)
        try? FileManager.default.removeItem(atPath: child.pidFile)
        self.child = nil
    }

    /// Kills etcd and removes its folder.
    public func destroy() async {
        await signalAndWait(SIGKILL)
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Runs etcdctl against this etcd (with the TLS files if any); its output.
    @discardableResult
    public func etcdctl(_ arguments: [String]) throws -> String {
        var tlsArguments: [String] = []
        if let tls { tlsArguments = ["--cacert", tls.ca, "--cert", tls.clientCert, "--key", tls.clientKey] }
        let result = try run("/usr/bin/etcdctl", ["--endpoints", endpoint] + tlsArguments + arguments,
                             environment: ["ETCDCTL_API": "3"])
        guard result.status == 0 else { throw Failure("etcdctl \(arguments) failed: \(result.stdout)\(result.stderr)") }
        return result.stdout
    }
}

/// Runs `body` with a fresh etcd, always destroying it afterwards.
public func withLocalEtcd<T>(extraArguments: [String] = [], tls: Bool = false,
                             _ body: (LocalEtcd) async throws -> T) async throws -> T {
    let etcd = try await LocalEtcd.launch(extraArguments: extraArguments, tls: tls)
    do {
        let result = try await body(etcd)
        await etcd.destroy()
        return result
    } catch {
        await etcd.destroy()
        throw error
    }
}

/// A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (openssl).
public struct TLSFiles: Sendable {
    public let ca: String, serverCert: String, serverKey: String, clientCert: String, clientKey: String

    static func make(in directory: String) throws -> TLSFiles {
        let d = directory + "/tls"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        let script = """
            set -e
            cd \(shellQuoted(d))
            openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.crt 2>/dev/null
            printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > ext.cnf
            for n in server client; do
              openssl req -newkey rsa:2048 -nodes -subj /CN=$n -keyout $n.key -out $n.csr 2>/dev/null
              openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out $n.crt 2>/dev/null
            done
            """
        guard try run("/bin/sh", ["-c", script]).status == 0 else {
            throw LocalEtcd.Failure("openssl could not make test certificates")
        }
        return TLSFiles(ca: d + "/ca.crt", serverCert: d + "/server.crt", serverKey: d + "/server.key",
                        clientCert: d + "/client.crt", clientKey: d + "/client.key")
    }
}

/// A loopback TCP port nobody listens on right now (bind port 0, read it, close).
public func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw LocalEtcd.Failure("socket failed") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
    guard bound == 0 else { throw LocalEtcd.Failure("bind failed") }
    let named = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    guard named == 0 else { throw LocalEtcd.Failure("getsockname failed") }
    return Int(UInt16(bigEndian: address.sin_port))
}
