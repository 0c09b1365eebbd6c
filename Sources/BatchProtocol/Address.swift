/// "host:port" (IPv6 as "[::1]:port"; an empty host is 127.0.0.1) into its
/// parts, or nil if it is not one. Port 0 (pick a free port) only for a server.
public func splitHostPort(_ address: String, allowingPortZero: Bool = false) -> (host: String, port: Int)? {
    guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]),
          ((allowingPortZero ? 0 : 1)...65535).contains(port) else { return nil }
    var host = String(address[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return (host.isEmpty ? "127.0.0.1" : host, port)
}
