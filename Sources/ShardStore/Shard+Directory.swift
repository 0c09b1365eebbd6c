import LMDB

extension Shard {
    static let directoryTimeKey = Array("directoryTime".utf8)

    /// The modification time stored for the shard's directory as the mount shows
    /// it (nanoseconds since 1970), if one was stored.
    public func directoryTime() throws -> Int64? {
        let meta = self.meta
        return try readTransaction(applyingLog: false) { txn in
            try txn.get(meta, Self.directoryTimeKey).flatMap { $0.count == 8 ? Int64(bitPattern: $0.loadLE(UInt64.self, at: 0)) : nil }
        }
    }

    /// Stores the directory's modification time (`utimensat` of the shard
    /// directory, or what the mount kept in memory, at unmount). Durable when it returns.
    public func setDirectoryTime(_ time: Int64, clientID: String) throws {
        try write(clientID: clientID) { ctx in
            try ctx.txn.put(self.meta, Self.directoryTimeKey, withUnsafeBytes(of: UInt64(bitPattern: time).littleEndian) { Array($0) })
        }
    }
}
