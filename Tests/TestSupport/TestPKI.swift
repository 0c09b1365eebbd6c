import Foundation

/// Certificates made by the test with the openssl CLI: a CA, a node certificate
/// it signed for 127.0.0.1 and localhost, a client certificate it signed, and a
/// second CA that signed nothing the node trusts.
public struct TestPKI {
    public let dir: TemporaryDirectory
    public var ca: String { dir.sub("ca.pem") }
    public var serverCert: String { dir.sub("server.pem") }
    public var serverKey: String { dir.sub("server.key") }
    public var clientCert: String { dir.sub("client.pem") }
    public var clientKey: String { dir.sub("client.key") }
    public var otherCA: String { dir.sub("other-ca.pem") }
    public var otherClientCert: String { dir.sub("other-client.pem") }
    public var otherClientKey: String { dir.sub("other-client.key") }

    public static func make() async throws -> TestPKI {
        let dir = try TemporaryDirectory("pki")
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        let script = """
            set -e
            cd '\(dir.path)'
            for ca in ca other-ca; do
              openssl req -x509 \(ec) -keyout $ca.key -out $ca.pem -days 2 -subj /CN=$ca 2>/dev/null
            done
            issue() {  # name, CA, extensions
              openssl req \(ec) -keyout $1.key -out $1.csr -subj /CN=$1 -addext "$3" 2>/dev/null
              openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -out $1.pem -days 2 -copy_extensions copy 2>/dev/null
            }
            issue server ca "subjectAltName=IP:127.0.0.1,DNS:localhost"
            issue client ca "extendedKeyUsage=clientAuth"
            issue other-client other-ca "extendedKeyUsage=clientAuth"
            """
        let result = try await shell(script)
        guard result.status == 0 else { throw TLSTestError("openssl failed: \(result.stderr)") }
        return TestPKI(dir: dir)
    }
}

struct TLSTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
