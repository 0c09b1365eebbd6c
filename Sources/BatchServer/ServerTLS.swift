import NIOSSL

/// TLS for the batch service's TCP listener (the Unix socket stays plain: its
/// file mode, 0660, is what guards it). PEM files, read once at start.
public struct ServerTLS: Sendable, Equatable {
    /// The server's certificate chain (leaf first) and its private key.
    public var certificateFile: String
    public var privateKeyFile: String
    /// With it, every client must present a certificate signed by this CA
    /// (mutual TLS); the token, if one is set, is still asked for.
    public var clientCAFile: String?

    public init(certificateFile: String, privateKeyFile: String, clientCAFile: String? = nil) {
        self.certificateFile = certificateFile
        self.privateKeyFile = privateKeyFile
        self.clientCAFile = clientCAFile
    }

    /// The context every TCP connection's handshake uses; a file that is missing
    /// or not PEM is named in the error.
    func makeContext() throws -> NIOSSLContext {
        func load<T>(_ what: String, _ path: String, _ body: () throws -> T) throws -> T {
            do { return try body() } catch {
                throw BatchServerError("cannot load the TLS \(what) \(path): \(error) (server.tls.*, --tls-*)")
            }
        }
        let chain = try load("certificate", certificateFile) { try NIOSSLCertificate.fromPEMFile(certificateFile) }
        guard !chain.isEmpty else { throw BatchServerError("the TLS certificate file \(certificateFile) holds no certificate") }
        let key = try load("private key", privateKeyFile) { try NIOSSLPrivateKey(file: privateKeyFile, format: .pem) }
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) },
                                                                     privateKey: .privateKey(key))
        configuration.minimumTLSVersion = .tlsv12
        if let clientCAFile {
            let roots = try load("client CA", clientCAFile) { try NIOSSLCertificate.fromPEMFile(clientCAFile) }
            guard !roots.isEmpty else { throw BatchServerError("the TLS client CA file \(clientCAFile) holds no certificate") }
            configuration.trustRoots = .certificates(roots)
            // Clients are known by their certificate, not by a host name.
            configuration.certificateVerification = .noHostnameVerification
        }
        return try load("configuration", certificateFile) { try NIOSSLContext(configuration: configuration) }
    }
}
