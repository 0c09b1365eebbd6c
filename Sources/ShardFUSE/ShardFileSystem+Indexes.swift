import Foundation
import Glibc
import ShardNode
import ShardStore

// Indexes as extended attributes: user.NAME is index NAME of the entry.

extension ShardFileSystem {
    // MARK: Indexes as extended attributes

    static let indexPrefix = "user."

    func setxattr(_ ino: UInt64, name: String, value: [UInt8], flags: Int32) throws {
        let index = try indexName(name)
        try changeIndexes(ino) { current in
            let exists = current.contains { $0.name == index }
            if flags & Self.xattrCreate != 0 && exists { throw FileSystemError(EEXIST, "index \(index) exists") }
            if flags & Self.xattrReplace != 0 && !exists { throw FileSystemError(ENODATA, "no index \(index)") }
            var updated = current.filter { $0.name != index }
            updated.append(IndexPair(name: index, value: value))
            try IndexPair.validate(updated)
            return updated
        }
    }

    /// Changes an entry's indexes: in the shard, or, for
    /// a file created and not committed yet, with its value at its commit.
    func changeIndexes(_ ino: UInt64, _ change: @escaping ([IndexPair]) throws -> [IndexPair]) throws {
        let (shard, key) = try entry(ino)
        try writable(shard)
        if let open = openEntry(ino) {
            let uncommitted = try currentAttributes(shard, key) == nil
            if try open.changeIndexes(startIfUncommitted: uncommitted, change) { return }
        }
        try own(shard.id, [key.bytes]) { try shard.updateIndexes(key, clientID: options.clientID, change) }
    }

    /// An entry's indexes as the mount shows them: those waiting for its first commit win.
    func currentIndexes(_ ino: UInt64) throws -> [IndexPair] {
        guard case .entry(let id, let bytes) = try kind(ino) else {
            throw FileSystemError(ENOTSUP, "indexes are attributes of entries, not of directories")
        }
        let key = EntryKey(trusted: bytes)  // validated when its inode was made
        if let pending = openEntry(ino)?.pendingIndexes { return pending }
        return try reading(id) { shard in try shard.attributes(key)?.indexes ?? [] }
    }

    /// A shard directory's one attribute: the client that owns the shard (read-only).
    static let ownerAttribute = "user.shardfs.owner"

    /// The mount root's one attribute: the FUSE requests this daemon was handed,
    /// by kind ("name count" lines; RequestCounts.swift). By name only, like the owner.
    static let requestsAttribute = "user.shardfs.requests"

    func getxattr(_ ino: UInt64, name: String) throws -> [UInt8] {
        // Names outside user. (GNU `ls -l` asks every file for security.selinux
        // and system.posix_acl_access) are not supported, as on a filesystem
        // mounted without them: ENOTSUP, not ENODATA. `ls` then stops asking for
        // the rest of the device, where ENODATA would cost two round trips a file.
        guard name.hasPrefix(Self.indexPrefix) else { throw FileSystemError(ENOTSUP, "only user.* attributes exist") }
        if case .root = try kind(ino) {
            guard name == Self.requestsAttribute else { throw FileSystemError(ENODATA, "the root has only \(Self.requestsAttribute)") }
            return Array(FuseRequest.report().utf8)
        }
        if case .shard(let id) = try kind(ino) {
            guard name == Self.ownerAttribute else { throw FileSystemError(ENODATA, "a shard has only \(Self.ownerAttribute)") }
            return Array(try reading(id) { $0.owner }.utf8)
        }
        let index = String(name.dropFirst(Self.indexPrefix.count))
        guard let pair = try currentIndexes(ino).first(where: { $0.name == index }) else {
            throw FileSystemError(ENODATA, "no index \(index)")
        }
        return pair.value
    }

    func listxattr(_ ino: UInt64) throws -> [UInt8] {
        // The owner attribute is read by name only: listed, `rsync -X` and `cp -a`
        // would try to copy it onto the directory, and to remove it there.
        guard case .entry = try kind(ino) else { return [] }
        var out: [UInt8] = []
        for index in try currentIndexes(ino) {
            out += Array((Self.indexPrefix + index.name).utf8) + [0]
        }
        return out
    }

    func removexattr(_ ino: UInt64, name: String) throws {
        let index = try indexName(name)
        try changeIndexes(ino) { current in
            guard current.contains(where: { $0.name == index }) else { throw FileSystemError(ENODATA, "no index \(index)") }
            return current.filter { $0.name != index }
        }
    }
}
