import Foundation
import NIOSSL

/// TLS for TCP connections to nodes (Unix sockets stay plain). PEM files.
public struct ClientTLS: Sendable, Equatable {
    /// The CA that signed the nodes' certificates; nil: the system's trust store.
    public var trustedCAFile: String?
    /// This client's certificate and key, for nodes that ask for one (mutual TLS).
    public var certificateFile: String?
    public var privateKeyFile: String?
    /// The name the node's certificate must carry; nil: the host connected to
    /// (a name, or an IP address, which the certificate must list as such).
    public var serverName: String?

    public init(trustedCAFile: String? = nil, certificateFile: String? = nil, privateKeyFile: String? = nil,
                serverName: String? = nil) {
        self.trustedCAFile = trustedCAFile
        self.certificateFile = certificateFile
        self.privateKeyFile = privateKeyFile
        self.serverName = serverName
    }

    public static func == (a: ClientTLS, b: ClientTLS) -> Bool {
        a.files == b.files && a.serverName == b.serverName
    }

    /// The files a context is made from.
    private var files: [String?] { [trustedCAFile, certificateFile, privateKeyFile] }

    /// The context last made, shared by copies of this value (a cluster's
    /// reconnections read the PEM files once); remade when the files changed.
    private let made = MadeContext()

    private final class MadeContext: @unchecked Sendable {
        let lock = NSLock()
        var files: [String?] = []
        var context: NIOSSLContext?
    }

    /// The TLS context for these files, made once and reused.
    func makeContext() throws -> NIOSSLContext {
        if let cached = made.lock.withLock({ made.files == files ? made.context : nil }) { return cached }
        let context = try buildContext()
        made.lock.withLock {
            made.files = files
            made.context = context
        }
        return context
    }

    private func buildContext() throws -> NIOSSLContext {
        func load<T>(_ what: String, _ path: String, _ body: () throws -> T) throws -> T {
            do { return try body() } catch { throw ClientError.tls("cannot load the TLS \(what) \(path): \(error)") }
        }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        if let trustedCAFile {
            let roots = try load("CA", trustedCAFile) { try NIOSSLCertificate.fromPEMFile(trustedCAFile) }
            guard !roots.isEmpty else { throw ClientError.tls("the CA file \(trustedCAFile) holds no certificate") }
            configuration.trustRoots = .certificates(roots)
        }
        if certificateFile != nil || privateKeyFile != nil {
            guard let certificateFile, let privateKeyFile else {
                throw ClientError.tls("a client certificate needs its key, and a key its certificate")
            }
            let chain = try load("certificate", certificateFile) { try NIOSSLCertificate.fromPEMFile(certificateFile) }
            let key = try load("private key", privateKeyFile) { try NIOSSLPrivateKey(file: privateKeyFile, format: .pem) }
            configuration.certificateChain = chain.map { .certificate($0) }
            configuration.privateKey = .privateKey(key)
        }
        return try load("configuration", trustedCAFile ?? "(system trust store)") { try NIOSSLContext(configuration: configuration) }
    }

    /// The host name to send (SNI) and check: none for an IP address, whose
    /// check NIOSSL makes against the address connected to.
    func hostname(for host: String) -> String? {
        if let serverName { return serverName }
        let isAddress = host.contains(":") || host.split(separator: ".").allSatisfy { UInt8($0) != nil }
        return isAddress ? nil : host
    }
}
