import Crypto
import Foundation

public struct AWSCredentials: Sendable, Equatable {
    public var accessKeyID: String
    public var secretAccessKey: String
    public var sessionToken: String

    public init(accessKeyID: String, secretAccessKey: String, sessionToken: String = "") {
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
    }
}

/// AWS Signature Version 4 (header form), as the SigV4 documentation describes
/// it: canonical request → string to sign → HMAC chain over date, region,
/// service and "aws4_request".
public struct SigV4Signer: Sendable {
    public var service: String
    public var region: String

    public init(service: String, region: String) {
        self.service = service
        self.region = region
    }

    public struct Signed: Sendable {
        public var canonicalRequest: String
        public var stringToSign: String
        public var signature: String
        public var authorization: String
        /// Headers to send: the caller's, plus X-Amz-Date, X-Amz-Security-Token and Authorization.
        public var headers: [(String, String)]
    }

    /// Signs a request. `host` includes the port when it is not the scheme's
    /// default (curl sends it so); `query` is the raw query string (already encoded).
    /// Every header given is signed, with `host` and `x-amz-date`.
    public func sign(method: String, host: String, path: String, query: String, headers: [(String, String)],
                     body: Data, credentials: AWSCredentials, date: Date) -> Signed {
        let amzDate = Self.timestamp(date)
        let day = String(amzDate.prefix(8))
        var all = headers + [("Host", host), ("X-Amz-Date", amzDate)]
        if !credentials.sessionToken.isEmpty { all.append(("X-Amz-Security-Token", credentials.sessionToken)) }
        // Lowercase names, values trimmed with inner runs of spaces collapsed, sorted by name.
        var canonical: [String: String] = [:]
        for (name, value) in all {
            let trimmed = value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
            let key = name.lowercased()
            canonical[key] = canonical[key].map { $0 + "," + trimmed } ?? trimmed
        }
        let names = canonical.keys.sorted()
        let signedHeaders = names.joined(separator: ";")
        let canonicalRequest = [
            method,
            path.isEmpty ? "/" : path,
            Self.canonicalQuery(query),
            names.map { "\($0):\(canonical[$0]!)\n" }.joined(),
            signedHeaders,
            hex(SHA256.hash(data: body)),
        ].joined(separator: "\n")
        let scope = "\(day)/\(region)/\(service)/aws4_request"
        let stringToSign = ["AWS4-HMAC-SHA256", amzDate, scope, hex(SHA256.hash(data: Data(canonicalRequest.utf8)))].joined(separator: "\n")
        var key = SymmetricKey(data: Data(("AWS4" + credentials.secretAccessKey).utf8))
        for part in [day, region, service, "aws4_request"] {
            key = SymmetricKey(data: Data(HMAC<SHA256>.authenticationCode(for: Data(part.utf8), using: key)))
        }
        let signature = hex(HMAC<SHA256>.authenticationCode(for: Data(stringToSign.utf8), using: key))
        let authorization = "AWS4-HMAC-SHA256 Credential=\(credentials.accessKeyID)/\(scope), SignedHeaders=\(signedHeaders), Signature=\(signature)"
        var sent = headers + [("X-Amz-Date", amzDate)]
        if !credentials.sessionToken.isEmpty { sent.append(("X-Amz-Security-Token", credentials.sessionToken)) }
        sent.append(("Authorization", authorization))
        return Signed(canonicalRequest: canonicalRequest, stringToSign: stringToSign, signature: signature,
                      authorization: authorization, headers: sent)
    }

    /// Query parameters sorted by name then value, each side percent-encoded once
    /// (decoded first, so an encoded query is not encoded twice).
    static func canonicalQuery(_ query: String) -> String {
        guard !query.isEmpty else { return "" }
        let pairs = query.split(separator: "&").map { part -> (String, String) in
            let kv = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let decode = { (s: Substring) in String(s).removingPercentEncoding ?? String(s) }
            return (decode(kv[0]), kv.count > 1 ? decode(kv[1]) : "")
        }
        return pairs.map { (percentEncode($0.0), percentEncode($0.1)) }
            .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            .map { "\($0.0)=\($0.1)" }.joined(separator: "&")
    }

    static func timestamp(_ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyyMMdd'T'HHmmss'Z'"
        return formatter.string(from: date)
    }
}

func sha256Hex(_ data: Data) -> String { hex(SHA256.hash(data: data)) }

func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
    digest.map { String(format: "%02x", $0) }.joined()
}
