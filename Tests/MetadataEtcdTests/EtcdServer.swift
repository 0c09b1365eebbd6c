import Foundation
import Metadata
import TestSupport
@testable import MetadataEtcd

#if canImport(Glibc)
import Glibc
#endif

/// A real etcd for one test: free loopback ports, a temporary data directory.
/// etcd runs under a small shell watchdog that kills it and deletes the data
/// directory if this test process dies, so no etcd outlives the tests even on a
/// crash. Use `withEtcd`, which always destroys the server.
final class EtcdServer: @unchecked Sendable {
    let directory: URL
    private(set) var clientPort: Int
    private(set) var peerPort: Int
    let extraArguments: [String]
    /// With TLS: the CA, server and client files (clients must present a certificate).
    let tls: TLSFiles?
    private var wrapper: Process?
    private var etcdPID: pid_t = 0

    var endpoint: String { "\(tls == nil ? "http" : "https")://127.0.0.1:\(clientPort)" }
    var dataDir: String { directory.appendingPathComponent("data").path }

    init(extraArguments: [String] = [], tls: Bool = false) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("shardfs-etcd-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        clientPort = try Self.freePort()
        peerPort = try Self.freePort()
        self.tls = tls ? try TLSFiles.make(in: directory) : nil
        var arguments = extraArguments
        if let files = self.tls {
            arguments += ["--cert-file", files.serverCert, "--key-file", files.serverKey,
                          "--client-cert-auth", "--trusted-ca-file", files.ca]
        }
        self.extraArguments = arguments
    }

    /// A client configuration for this server (with the TLS files if any).
    func configuration(namespace: String = "/test", callTimeout: Duration = .seconds(2)) -> EtcdConfiguration {
        EtcdConfiguration(endpoints: [endpoint], namespace: namespace, caFile: tls?.ca, certFile: tls?.clientCert,
                          keyFile: tls?.clientKey, callTimeout: callTimeout)
    }

    static var etcdBinary: String? {
        ["/usr/bin/etcd", "/usr/local/bin/etcd"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Starts etcd (on the same ports and data directory each time) and waits
    /// until it answers a range request.
    func start() async throws {
        guard let binary = Self.etcdBinary else { throw EtcdTestError("etcd is not installed (apt-get install etcd-server etcd-client)") }
        let peer = "http://127.0.0.1:\(peerPort)"
        let args = [binary, "--name", "test", "--data-dir", dataDir,
                    "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", "test=\(peer)", "--log-level", "error"] + extraArguments
        let pidFile = directory.appendingPathComponent("etcd.pid").path
        try? FileManager.default.removeItem(atPath: pidFile)
        // The watchdog: runs etcd, records its pid, and kills it (and removes the
        // directory) once this test process is gone.
        let script = """
        "$@" >>"\(directory.path)/etcd.log" 2>&1 &
        e=$!
        echo $e > "\(pidFile)"
        while kill -0 \(getpid()) 2>/dev/null && kill -0 $e 2>/dev/null; do sleep 0.2; done
        if ! kill -0 \(getpid()) 2>/dev/null; then kill -9 $e 2>/dev/null; wait $e; rm -rf "\(directory.path)"; fi
        wait $e
        """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script, "etcd-watchdog"] + args
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        wrapper = process

        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(60)
        while etcdPID == 0 {
            if let text = try? String(contentsOfFile: pidFile, encoding: .utf8), let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                etcdPID = pid
            } else if clock.now > deadline {
                throw EtcdTestError("etcd watchdog did not start")
            } else {
                try await Task.sleep(for: .milliseconds(10))
            }
        }
        let client = try EtcdClient(configuration: configuration(callTimeout: .milliseconds(500)), logger: .init(label: "test"))
        defer { client.close() }
        var lastError: Error?
        let ready = try await waitUntil(60, every: .milliseconds(50)) {
            // An answer from another test's etcd on a port taken meanwhile does not count.
            guard kill(etcdPID, 0) == 0 else { throw EtcdTestError("etcd exited at start: \(log)") }
            do {
                let _: WireRangeResponse = try await client.post("/v3/kv/range", ["key": Wire.b64("health")])
            } catch MetadataError.unauthorized {
                // auth is on: etcd is up
            } catch {
                lastError = error
                return false
            }
            return kill(etcdPID, 0) == 0
        }
        if !ready { throw EtcdTestError("etcd did not become ready: \(lastError.map { "\($0)" } ?? "")\n\(log)") }
    }

    var log: String { (try? String(contentsOf: directory.appendingPathComponent("etcd.log"), encoding: .utf8)) ?? "" }

    /// Graceful stop (SIGTERM), waiting until etcd has exited.
    func stop() async { await signalAndWait(SIGTERM) }

    /// SIGKILL, like a crash.
    func kill9() async { await signalAndWait(SIGKILL) }

    /// SIGSTOP / SIGCONT: an etcd that stops answering, then comes back.
    func pause() { if etcdPID != 0 { _ = kill(etcdPID, SIGSTOP) } }
    func resume() { if etcdPID != 0 { _ = kill(etcdPID, SIGCONT) } }

    /// The first start. The free ports were picked before etcd binds them, so
    /// another test may take one meanwhile: then etcd exits at once, and it is
    /// started again on newly picked ports.
    func startOnFreePorts() async throws {
        for attempt in 1...3 {
            do {
                try await start()
                return
            } catch let error as EtcdTestError where attempt < 3 && error.description.contains("exited at start") {
                await signalAndWait(SIGKILL)  // forgets the dead etcd and its watchdog
                clientPort = try Self.freePort()
                peerPort = try Self.freePort()
                try? FileManager.default.removeItem(atPath: dataDir)
                try? FileManager.default.removeItem(at: directory.appendingPathComponent("etcd.log"))
            }
        }
    }

    func restart() async throws {
        await stop()
        try await start()
    }

    private func signalAndWait(_ signal: Int32) async {
        guard let process = wrapper, etcdPID != 0 else { return }
        _ = kill(etcdPID, signal)
        while process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
        wrapper = nil
        etcdPID = 0
    }

    /// Kills etcd and deletes its directory.
    func destroy() async {
        await signalAndWait(SIGKILL)
        try? FileManager.default.removeItem(at: directory)
    }

    /// Runs etcdctl against this server.
    @discardableResult
    func etcdctl(_ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/etcdctl")
        var tlsArguments: [String] = []
        if let tls { tlsArguments = ["--cacert", tls.ca, "--cert", tls.clientCert, "--key", tls.clientKey] }
        process.arguments = ["--endpoints", endpoint] + tlsArguments + arguments
        process.environment = ["ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw EtcdTestError("etcdctl \(arguments) failed: \(output)") }
        return output
    }

    /// A loopback port nobody listens on right now (bind port 0, read it, close).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw EtcdTestError("socket failed") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else { throw EtcdTestError("bind failed") }
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else { throw EtcdTestError("getsockname failed") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

/// A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (openssl).
struct TLSFiles {
    let ca: String, serverCert: String, serverKey: String, clientCert: String, clientKey: String

    static func make(in directory: URL) throws -> TLSFiles {
        let d = directory.appendingPathComponent("tls").path
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        let script = """
        set -e
        cd "\(d)"
        openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.crt 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > ext.cnf
        for n in server client; do
          openssl req -newkey rsa:2048 -nodes -subj /CN=$n -keyout $n.key -out $n.csr 2>/dev/null
          openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out $n.crt 2>/dev/null
        done
        """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw EtcdTestError("openssl could not make test certificates") }
        return TLSFiles(ca: d + "/ca.crt", serverCert: d + "/server.crt", serverKey: d + "/server.key",
                        clientCert: d + "/client.crt", clientKey: d + "/client.key")
    }
}

struct EtcdTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Runs `body` with a fresh etcd, always destroying it afterwards.
func withEtcd<T>(extraArguments: [String] = [], tls: Bool = false, _ body: (EtcdServer) async throws -> T) async throws -> T {
    let server = try EtcdServer(extraArguments: extraArguments, tls: tls)
    do {
        try await server.startOnFreePorts()
        let result = try await body(server)
        await server.destroy()
        return result
    } catch {
        await server.destroy()
        throw error
    }
}

/// A store on `server` under a namespace of its own.
func makeStore(_ server: EtcdServer, namespace: String = "/test", callTimeout: Duration = .seconds(2), leaseTTL: Int = 10,
               username: String? = nil, password: String? = nil) throws -> EtcdMetadataStore {
    try EtcdMetadataStore(configuration: EtcdConfiguration(
        endpoints: [server.endpoint], namespace: namespace, username: username, password: password,
        callTimeout: callTimeout, leaseTTL: leaseTTL))
}
