import Foundation
import Metadata

/// How to reach etcd and how to lay out the metadata in it.
public struct EtcdConfiguration: Sendable {
    /// Client URLs, e.g. "http://127.0.0.1:2379"; tried in order, with failover.
    public var endpoints: [String]
    /// Every key lives under this prefix ("<namespace>/nodes/<id>", ...).
    public var namespace: String
    /// etcd user and password; nil when etcd auth is off.
    public var username: String?
    public var password: String?
    /// TLS: CA bundle to verify the server, and a client certificate and key.
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    /// Deadline of one call (one attempt: the retry wrapper adds retries).
    public var callTimeout: Duration
    /// Lease of a registered node, in seconds: the node disappears this long
    /// after its keepalives stop.
    public var leaseTTL: Int

    public init(
        endpoints: [String] = ["http://127.0.0.1:2379"],
        namespace: String = "/shardfs",
        username: String? = nil,
        password: String? = nil,
        caFile: String? = nil,
        certFile: String? = nil,
        keyFile: String? = nil,
        callTimeout: Duration = .seconds(5),
        leaseTTL: Int = 10
    ) {
        self.endpoints = endpoints
        self.namespace = namespace
        self.username = username
        self.password = password
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
        self.callTimeout = callTimeout
        self.leaseTTL = leaseTTL
    }

    /// Checks the endpoints and returns them without a trailing slash.
    func validatedEndpoints() throws -> [String] {
        guard !endpoints.isEmpty else { throw MetadataError.invalidArgument("no etcd endpoint configured") }
        return try endpoints.map { raw in
            var s = raw.trimmingCharacters(in: .whitespaces)
            while s.hasSuffix("/") { s.removeLast() }
            guard let url = URL(string: s), let scheme = url.scheme?.lowercased(),
                  scheme == "http" || scheme == "https",
                  let host = url.host, !host.isEmpty,
                  url.path.isEmpty, url.query == nil
            else {
                throw MetadataError.invalidArgument("bad etcd endpoint \"\(raw)\": expected http(s)://host:port")
            }
            return s
        }
    }

    /// The namespace without a trailing slash ("" means the root).
    var normalizedNamespace: String {
        var ns = namespace
        while ns.hasSuffix("/") { ns.removeLast() }
        return ns
    }
}

extension Duration {
    /// Whole milliseconds, at least 1 (curl treats 0 as "no timeout").
    var milliseconds: Int {
        let (s, atto) = components
        return max(1, Int(s) * 1000 + Int(atto / 1_000_000_000_000_000))
    }
}
