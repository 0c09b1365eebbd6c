import Crypto
import Foundation

public struct AliyunCredentials: Sendable, Equatable {
    public var accessKeyID: String
    public var accessKeySecret: String
    public var securityToken: String

    public init(accessKeyID: String, accessKeySecret: String, securityToken: String = "") {
        self.accessKeyID = accessKeyID
        self.accessKeySecret = accessKeySecret
        self.securityToken = securityToken
    }
}

/// Aliyun's signature V3 (`ACS3-HMAC-SHA256`): canonical request (method,
/// path, sorted percent-encoded query, sorted lowercase headers, signed header
/// names, hex SHA-256 of the body) → "ACS3-HMAC-SHA256\n" + its hex SHA-256 →
/// hex HMAC-SHA256 with the secret.
public struct ACS3Signer: Sendable {
    public init() {}

    public struct Signed: Sendable {
        public var canonicalRequest: String
        public var signature: String
        public var authorization: String
        /// Every x-acs-* header and Authorization (Host is sent by curl).
        public var headers: [(String, String)]
    }

    /// Signs an RPC call whose parameters travel in the query string.
    public func sign(method: String, host: String, path: String, query: [(String, String)], action: String, version: String,
                     body: Data, credentials: AliyunCredentials, date: Date, nonce: String) -> Signed {
        var headers: [(String, String)] = [
            ("x-acs-action", action),
            ("x-acs-version", version),
            ("x-acs-date", Self.timestamp(date)),
            ("x-acs-signature-nonce", nonce),
            ("x-acs-content-sha256", sha256Hex(body)),
        ]
        if !credentials.securityToken.isEmpty { headers.append(("x-acs-security-token", credentials.securityToken)) }
        let signedPairs = (headers + [("host", host)]).map { ($0.0.lowercased(), $0.1.trimmingCharacters(in: .whitespaces)) }
            .sorted { $0.0 < $1.0 }
        let signedHeaders = signedPairs.map(\.0).joined(separator: ";")
        let canonicalRequest = [
            method,
            path.isEmpty ? "/" : path,
            Self.canonicalQuery(query),
            signedPairs.map { "\($0.0):\($0.1)\n" }.joined(),
            signedHeaders,
            sha256Hex(body),
        ].joined(separator: "\n")
        let stringToSign = "ACS3-HMAC-SHA256\n" + sha256Hex(Data(canonicalRequest.utf8))
        let signature = hex(HMAC<SHA256>.authenticationCode(for: Data(stringToSign.utf8),
                                                            using: SymmetricKey(data: Data(credentials.accessKeySecret.utf8))))
        let authorization = "ACS3-HMAC-SHA256 Credential=\(credentials.accessKeyID),SignedHeaders=\(signedHeaders),Signature=\(signature)"
        return Signed(canonicalRequest: canonicalRequest, signature: signature, authorization: authorization,
                      headers: headers + [("Authorization", authorization)])
    }

    static func canonicalQuery(_ query: [(String, String)]) -> String {
        query.map { (percentEncode($0.0), percentEncode($0.1)) }.sorted { $0.0 < $1.0 }.map { "\($0.0)=\($0.1)" }.joined(separator: "&")
    }

    /// ISO 8601 in UTC without fractions: 2023-10-26T10:22:32Z.
    static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        formatter.timeZone = TimeZone(identifier: "UTC")
        return formatter.string(from: date)
    }
}
