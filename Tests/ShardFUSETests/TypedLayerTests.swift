import Foundation
@testable import ShardFUSE
import ShardNode
import ShardStore
import TestSupport
import Testing

/// The typed layer on a real node, without a mount: what the kernel is handed.
@Suite struct TypedLayerTests {
    func withFileSystem(_ body: (ShardFileSystem, _ shardInode: UInt64, _ shard: Shard) throws -> Void) async throws {
        let dir = try TemporaryDirectory("typed")
        var config = Configuration()
        try config.set("node.data_dir", dir.path)
        let node = try await StorageNode.start(config)
        let shard = try await node.shards.newShard(owner: "c")
        var options = MountOptions()
        options.clientID = "c"
        let fs = ShardFileSystem(node: node, options: options)
        defer { fs.commitAll() }
        let shardInode = try fs.lookup(InodeTable.rootInode, Array(ShardManager.directoryName(shard.id).utf8)).inode
        try body(fs, shardInode, shard)
    }

    @Test func aPlainListingMakesNoInodesAndAListingPlusOnePerItem() async throws {
        try await withFileSystem { fs, shardInode, shard in
            for i in 0..<50 { try shard.put(try EntryKey("k\(i)"), value: [1], clientID: "c") }
            let handle = try fs.opendir(shardInode)
            let plain = try fs.readdir(shardInode, handle: handle, offset: 0, limit: 100, plus: false)
            #expect(plain.count == 52)  // with . and ..
            #expect(plain.dropFirst(2).allSatisfy { $0.inode == ShardFileSystem.unknownInode })
            #expect(fs.inodes.inodes(ofShard: shard.id) == [shardInode], "a plain listing left inodes behind")
            let plus = try fs.readdir(shardInode, handle: handle, offset: 0, limit: 100, plus: true)
            fs.listed(plus, packed: plus.count, handle: handle, plus: true)
            #expect(Set(plus.dropFirst(2).map(\.inode)).count == 50)
            #expect(fs.inodes.inodes(ofShard: shard.id).count == 51)
            // A plain listing now reports the inodes the kernel holds.
            let again = try fs.readdir(shardInode, handle: handle, offset: 0, limit: 100, plus: false)
            #expect(again.dropFirst(2).map(\.inode) == plus.dropFirst(2).map(\.inode))
            fs.releasedir(handle)
        }
    }

    @Test func lookupAndGetattrShowAWritersViewUncachedThenTheCommittedOne() async throws {
        try await withFileSystem { fs, shardInode, shard in
            let name = Array("new".utf8)
            let (created, handle) = try fs.create(shardInode, name, flags: O_WRONLY | O_CREAT)
            _ = try [UInt8](repeating: 7, count: 3).withUnsafeBytes { try fs.write(handle, $0, offset: 0) }
            let during = try fs.lookup(shardInode, name)
            #expect(during.inode == created.inode)
            #expect(during.attributes.st_size == 3)
            #expect(during.attributeTimeout == 0)
            #expect(during.timeout > 0)
            let (attributes, timeout) = try fs.getattr(created.inode)
            #expect(attributes.st_size == 3 && timeout == 0)
            try fs.flush(handle)
            try fs.release(handle)
            let after = try fs.lookup(shardInode, name)
            #expect(after.attributes.st_size == 3)
            #expect(after.attributeTimeout == after.timeout && after.timeout > 0)
            try fs.unlink(shardInode, name)
            #expect(throws: FileSystemError.self) { try fs.lookup(shardInode, name) }
        }
    }

    @Test func anUnlinkedFileStillBeingWrittenIsGoneByNameNotByHandle() async throws {
        try await withFileSystem { fs, shardInode, _ in
            let name = Array("doomed".utf8)
            let (created, handle) = try fs.create(shardInode, name, flags: O_WRONLY | O_CREAT)
            _ = try [UInt8](repeating: 1, count: 5).withUnsafeBytes { try fs.write(handle, $0, offset: 0) }
            try fs.unlink(shardInode, name)
            #expect(throws: FileSystemError.self) { try fs.lookup(shardInode, name) }
            #expect(try fs.getattr(created.inode).0.st_size == 5)  // fstat on the open handle
            try fs.release(handle)
            #expect(throws: FileSystemError.self) { try fs.lookup(shardInode, name) }  // the close brought nothing back
        }
    }

    /// A direct (write-only) handle's write asks the kernel to drop the file's
    /// pages while a handle through the page cache is open, and only then.
    @Test func directWritesDropCachedPagesOnlyWhileCachedHandlesAreOpen() async throws {
        try await withFileSystem { fs, shardInode, _ in
            fs.writesAroundPageCache = true
            let dropped = Locked<[UInt64]>([])
            fs.kernelCache.invalidate = { inodes in dropped.withLock { $0 += inodes } }
            let (reply, writer) = try fs.create(shardInode, Array("f".utf8), flags: O_WRONLY | O_CREAT)
            let one: [UInt8] = [1]
            func write(_ handle: UInt64, at offset: Int) throws {
                _ = try one.withUnsafeBytes { try fs.write(handle, $0, offset: offset) }
            }
            try write(writer, at: 0)
            #expect(dropped.value.isEmpty, "no handle through the cache: nothing to drop")
            let reader = try fs.open(reply.inode, flags: O_RDONLY).handle
            try write(writer, at: 1)
            #expect(dropped.value == [reply.inode])
            let other = try fs.create(shardInode, Array("f".utf8), flags: O_RDWR | O_CREAT).1
            try write(other, at: 2)  // through the cache: the kernel's pages have the bytes
            #expect(dropped.value == [reply.inode])
            try fs.release(reader)
            try fs.release(other)
            try write(writer, at: 3)
            #expect(dropped.value == [reply.inode], "the cached handles are gone")
            try fs.flush(writer)
            try fs.release(writer)
        }
    }

    /// The kernel's rules for backing files (CFuseRing/fuse_passthrough.h), as
    /// the typed layer keeps them, with a stand-in for the session's ioctls.
    @Test func backingFilesFollowTheKernelsRules() async throws {
        try await withFileSystem { fs, shardInode, shard in
            let registered = Locked<[Int32]>([]), unregistered = Locked<[Int32]>([]), refusal = Locked<Int32>(0)
            fs.backingFiles.connect(BackingFiles.Session(
                enabled: { true },
                register: { fd in
                    #expect(fd >= 0)
                    if refusal.value != 0 { return -refusal.value }
                    return registered.withLock { $0.append(Int32($0.count + 1)); return $0.last! }
                },
                unregister: { id in unregistered.withLock { $0.append(id) } }))
            func commit(_ name: String, size: Int) throws -> UInt64 {
                let (reply, handle) = try fs.create(shardInode, Array(name.utf8), flags: O_WRONLY | O_CREAT)
                let piece = [UInt8](repeating: 7, count: 1 << 20)
                for offset in stride(from: 0, to: size, by: piece.count) {
                    _ = try piece[0..<min(piece.count, size - offset)].withUnsafeBytes { try fs.write(handle, $0, offset: offset) }
                }
                try fs.flush(handle)
                try fs.release(handle)
                return reply.inode
            }
            func passthrough(_ handle: UInt64) -> PassthroughOpen? { fs.handles.file(handle)?.passthrough }
            let big = try commit("big", size: 9 << 20)
            // The first read-only open takes a backing file; later opens name it,
            // through the daemon when they may write.
            let first = try fs.open(big, flags: O_RDONLY).handle
            #expect(passthrough(first) == PassthroughOpen(backing: 1, throughDaemon: false))
            let second = try fs.open(big, flags: O_RDONLY).handle
            #expect(passthrough(second) == PassthroughOpen(backing: 1, throughDaemon: false))
            let writer = try fs.open(big, flags: O_WRONLY).handle
            #expect(passthrough(writer) == PassthroughOpen(backing: 1, throughDaemon: true))
            let whileWriting = try fs.open(big, flags: O_RDONLY).handle
            #expect(passthrough(whileWriting) == PassthroughOpen(backing: 1, throughDaemon: true), "a writer is open")
            #expect { try fs.open(big, flags: O_RDWR) } throws: { ($0 as? FileSystemError)?.code == ETXTBSY }
            // The kernel creates when it has no name cached: a read-only create of the
            // file is a reader, named through the daemon (a writer is open).
            let created = try fs.create(shardInode, Array("big".utf8), flags: O_RDONLY | O_CREAT).1
            #expect(fs.handles.file(created)?.writable == false)
            #expect(passthrough(created) == PassthroughOpen(backing: 1, throughDaemon: true))
            try fs.release(created)
            fs.inodes.forget(big, count: 1)
            #expect(registered.value == [1])
            try fs.release(first)
            try fs.release(second)
            try fs.release(whileWriting)
            #expect(unregistered.value.isEmpty, "a handle is still open")
            try fs.release(writer)
            #expect(unregistered.value == [1], "the last release unregisters it")
            // A handle through the page cache first: no backing file until every handle is gone.
            let cached = try fs.open(big, flags: O_RDWR).handle
            let reader = try fs.open(big, flags: O_RDONLY).handle
            #expect(passthrough(cached) == nil && passthrough(reader) == nil)
            #expect(registered.value == [1], "nothing registered while a handle is open")
            try fs.release(reader)
            try fs.release(cached)
            // A value changed since the backing file was taken is read through the daemon.
            let old = try fs.open(big, flags: O_RDONLY).handle
            #expect(passthrough(old) == PassthroughOpen(backing: 2, throughDaemon: false))
            try shard.put(try EntryKey("big"), value: [UInt8](repeating: 1, count: 9 << 20), clientID: "c")
            let later = try fs.open(big, flags: O_RDONLY).handle
            #expect(passthrough(later) == PassthroughOpen(backing: 2, throughDaemon: true))
            #expect(try fs.read(later, offset: 0, count: 1) == [1])
            try fs.release(later)
            try fs.release(old)
            // Files up to 8 MiB, and values not in a value file, take none.
            let small = try commit("small", size: 8 << 20)
            let smallReader = try fs.open(small, flags: O_RDONLY).handle
            let chunked = try fs.open(big, flags: O_RDONLY).handle
            #expect(passthrough(smallReader) == nil && passthrough(chunked) == nil)
            try fs.release(smallReader)
            try fs.release(chunked)
            // A refusal turns passthrough off for the mount: not asked again.
            _ = try commit("big2", size: 9 << 20)
            refusal.withLock { $0 = EPERM }
            let big2 = try fs.lookup(shardInode, Array("big2".utf8)).inode
            let refused = try fs.open(big2, flags: O_RDONLY).handle
            #expect(passthrough(refused) == nil && !fs.backingFiles.available)
            try fs.release(refused)
            #expect(registered.value == [1, 2] && unregistered.value == [1, 2])
        }
    }
}
