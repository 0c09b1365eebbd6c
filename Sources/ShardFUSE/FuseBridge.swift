// The raw bridge to libfuse's low-level API. Every callback is a global
// function (never a closure of main.swift's top-level code: those are
// main-actor isolated and crash on libfuse's threads). State comes through
// `fuse_req_userdata` (a `shardfs_fuse_context`). Arguments are copied before
// use, each request gets exactly one reply, on the thread that received it
// (FUSE over io_uring relies on that), and errors become errno in
// `errnoValue(of:)`.
import CFuse3
import CFuseRing
import Foundation
import Glibc
import Logging

@inline(__always)
private func fileSystem(_ userdata: UnsafeMutableRawPointer) -> ShardFileSystem {
    let context = userdata.assumingMemoryBound(to: shardfs_fuse_context.self)
    return Unmanaged<ShardFileSystem>.fromOpaque(context.pointee.filesystem!).takeUnretainedValue()
}

@inline(__always)
private func fileSystem(_ req: fuse_req_t?) -> ShardFileSystem { fileSystem(fuse_req_userdata(req)!) }

@inline(__always)
private func bytes(_ name: UnsafePointer<CChar>?) -> [UInt8] {
    guard let name else { return [] }
    return Array(UnsafeRawBufferPointer(start: name, count: strlen(name)))
}

private func fail(_ req: fuse_req_t?, _ error: Error, operation: StaticString = #function) {
    let code = errnoValue(of: error)
    FuseMetrics.failed(operation, errno: code)
    // Refusals (not ordinary misses like ENOENT) are logged with who asked, and
    // failures (EIO, EBUSY, ETIMEDOUT: storage, a shard in use, the metadata
    // store) as warnings: the errno alone says too little.
    let failure = [EIO, EBUSY, ETIMEDOUT].contains(code)
    if failure || [EACCES, EPERM, EROFS, ENOSPC, EFBIG, EEXIST, ETXTBSY].contains(code), let context = fuse_req_ctx(req) {
        let metadata: Logger.Metadata = [
            "operation": "\(operation)", "errno": "\(String(cString: strerror(code)))", "reason": "\(error)",
            "uid": "\(context.pointee.uid)", "pid": "\(context.pointee.pid)",
        ]
        if failure {
            fileSystem(req).logger.warning("failed", metadata: metadata)
        } else {
            fileSystem(req).logger.info("refused", metadata: metadata)
        }
    }
    answered(fuse_reply_err(req, code))
}

private func entryParameters(_ reply: EntryReply) -> fuse_entry_param {
    var parameters = fuse_entry_param()
    parameters.ino = reply.inode
    parameters.generation = 1
    parameters.attr = reply.attributes
    parameters.attr_timeout = reply.attributeTimeout
    parameters.entry_timeout = reply.timeout
    return parameters
}

/// Stops the request's clock once its reply is sent (the daemon's answer
/// latency per operation: `shardfs_fuse_request_duration_seconds`).
@discardableResult @inline(__always)
private func answered(_ result: Int32) -> Int32 {
    shardfs_request_answered()
    return result
}

private func opInit(_ userdata: UnsafeMutableRawPointer?, _ conn: UnsafeMutablePointer<fuse_conn_info>?) {
    guard let conn else { return }
    // Big writes in one request; readdirplus so `ls -l` needs no lookup per file.
    conn.pointee.max_write = FuseSession.maxWrite
    conn.pointee.want |= UInt32(FUSE_CAP_READDIRPLUS)
    conn.pointee.want &= ~UInt32(FUSE_CAP_READDIRPLUS_AUTO)
    // Direct writes only where the kernel is known to drop cached pages of the
    // range first, so readers holding pages see the write (checked on 6.18:
    // FileSystemTests.aReaderHoldingPagesSeesAWriteOnlyHandlesWrites).
    if let userdata {
        fileSystem(userdata).writesAroundPageCache = conn.pointee.proto_major > 7 || conn.pointee.proto_minor >= 42
    }
}

private func opDestroy(_ userdata: UnsafeMutableRawPointer?) {
    guard let userdata else { return }
    fileSystem(userdata).commitAll()
}

private func opLookup(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    FuseRequest.lookup.count()
    let fs = fileSystem(req)
    do {
        guard let reply = try fs.lookupIfPresent(parent, bytes(name)) else {
            var parameters = fuse_entry_param()  // a negative entry, as below
            parameters.entry_timeout = fs.negativeTimeout(parent)
            answered(fuse_reply_entry(req, &parameters))
            return
        }
        var parameters = entryParameters(reply)
        answered(fuse_reply_entry(req, &parameters))
    } catch let error where errnoValue(of: error) == ENOENT {
        // A negative entry, cached like a positive one (not in a backup's view).
        var parameters = fuse_entry_param()
        parameters.entry_timeout = fs.negativeTimeout(parent)
        answered(fuse_reply_entry(req, &parameters))
    } catch {
        fail(req, error)
    }
}

private func opForget(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ count: UInt64) {
    FuseRequest.forget.count()
    fileSystem(req).forget(ino, count)
    fuse_reply_none(req)
}

private func opForgetMulti(_ req: fuse_req_t?, _ count: Int, _ forgets: UnsafeMutablePointer<fuse_forget_data>?) {
    FuseRequest.batchForget.count()
    let fs = fileSystem(req)
    for i in 0..<count { if let f = forgets?[i] { fs.forget(f.ino, f.nlookup) } }
    fuse_reply_none(req)
}

private func opGetattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.getattr.count()
    do {
        var (attributes, timeout) = try fileSystem(req).getattr(ino)
        answered(fuse_reply_attr(req, &attributes, timeout))
    } catch { fail(req, error) }
}

private func opSetattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ attr: UnsafeMutablePointer<stat>?, _ toSet: Int32,
                       _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.setattr.count()
    guard let attr else { answered(fuse_reply_err(req, EINVAL)); return }
    do {
        var (attributes, timeout) = try fileSystem(req).setattr(ino, attr.pointee, AttributeChanges(rawValue: toSet), handle: fi?.pointee.fh)
        answered(fuse_reply_attr(req, &attributes, timeout))
    } catch { fail(req, error) }
}

private func opMkdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t) {
    FuseRequest.mkdir.count()
    do {
        var parameters = entryParameters(try fileSystem(req).mkdir(parent, bytes(name)))
        answered(fuse_reply_entry(req, &parameters))
    } catch { fail(req, error) }
}

private func opRmdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    FuseRequest.rmdir.count()
    do {
        try fileSystem(req).rmdir(parent, bytes(name))
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

private func opUnlink(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    FuseRequest.unlink.count()
    do {
        try fileSystem(req).unlink(parent, bytes(name))
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

private func opRename(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ newParent: fuse_ino_t,
                      _ newName: UnsafePointer<CChar>?, _ flags: UInt32) {
    FuseRequest.rename.count()
    do {
        try fileSystem(req).rename(parent, bytes(name), newParent, bytes(newName), flags: flags)
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

/// Symlinks, hard links and device nodes have no place in a shard.
private func opSymlink(_ req: fuse_req_t?, _ link: UnsafePointer<CChar>?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    FuseRequest.symlink.count()
    fail(req, FileSystemError(EPERM, "symbolic links have no place in a shard"))
}

private func opLink(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ newParent: fuse_ino_t, _ newName: UnsafePointer<CChar>?) {
    FuseRequest.link.count()
    fail(req, FileSystemError(EPERM, "hard links have no place in a shard"))
}

private func opMknod(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t, _ rdev: dev_t) {
    FuseRequest.mknod.count()
    fail(req, FileSystemError(EPERM, "device nodes and FIFOs have no place in a shard"))
}

private func opCreate(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t,
                      _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.create.count()
    guard let fi else { answered(fuse_reply_err(req, EINVAL)); return }
    let fs = fileSystem(req)
    do {
        let (reply, handle) = try fs.create(parent, bytes(name), flags: fi.pointee.flags, mode: mode)
        var parameters = entryParameters(reply)
        fi.pointee.fh = handle
        let file = fs.handles.file(handle)  // as the handle was registered
        fi.pointee.direct_io = file?.direct == true ? 1 : 0  // a create names a backing file only with direct I/O
        let rc = if let backing = file?.passthrough?.backing {
            shardfs_reply_create_backed(req, &parameters, fi, backing)
        } else {
            fuse_reply_create(req, &parameters, fi)
        }
        replied(rc, handle: handle, fs, lookupOf: reply.inode)
    } catch { fail(req, error) }
}

private func opOpen(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.open.count()
    guard let fi else { answered(fuse_reply_err(req, EINVAL)); return }
    let fs = fileSystem(req)
    do {
        let (handle, keepCache) = try fs.open(ino, flags: fi.pointee.flags)
        let file = fs.handles.file(handle)  // as the handle was registered
        fi.pointee.fh = handle
        // A read-only handle has nothing to commit at close(): spare the kernel
        // the flush request (release still comes, asynchronously).
        fi.pointee.noflush = fi.pointee.flags & O_ACCMODE == O_RDONLY ? 1 : 0
        let rc: Int32
        if let passthrough = file?.passthrough {
            // The kernel reads the backing file itself, unless the daemon must
            // see this handle's reads and writes (direct I/O beside it).
            fi.pointee.keep_cache = 0
            fi.pointee.direct_io = passthrough.throughDaemon ? 1 : 0
            rc = shardfs_reply_open_backed(req, fi, passthrough.backing)
        } else {
            fi.pointee.keep_cache = keepCache ? 1 : 0
            fi.pointee.direct_io = file?.direct == true ? 1 : 0
            rc = fuse_reply_open(req, fi)
        }
        replied(rc, handle: handle, fs)
    } catch { fail(req, error) }
}

/// After answering an OPEN or CREATE over /dev/fuse: an answer the kernel did
/// not take (-ENOENT: it no longer has the request, as when the connection was
/// aborted) leaves a handle nobody will release, and for a CREATE a lookup
/// nobody will forget; both are given back here. (Over the rings an answer
/// always goes; a refused one ends the mount.)
private func replied(_ rc: Int32, handle: UInt64, _ fs: ShardFileSystem, lookupOf inode: UInt64? = nil) {
    answered(rc)
    guard rc == -ENOENT else { return }
    _ = try? fs.release(handle)
    if let inode { fs.inodes.forget(inode, count: 1) }
}

private func opRead(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.read.count()
    guard let fi else { answered(fuse_reply_err(req, EBADF)); return }
    do {
        let data = try fileSystem(req).read(fi.pointee.fh, offset: Int(offset), count: size)
        _ = data.withUnsafeBytes { answered(fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count)) }
    } catch { fail(req, error) }
}

private func opWrite(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ buffer: UnsafePointer<CChar>?, _ size: Int, _ offset: off_t,
                     _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.write.count()
    guard let fi, let buffer else { answered(fuse_reply_err(req, EBADF)); return }
    do {
        let caller = fuse_req_ctx(req)?.pointee.uid ?? 0
        let written = try fileSystem(req).write(fi.pointee.fh, UnsafeRawBufferPointer(start: buffer, count: size), offset: Int(offset),
                                                caller: caller)
        answered(fuse_reply_write(req, written))
    } catch { fail(req, error) }
}

private func opFlush(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.flush.count()
    guard let fi else { answered(fuse_reply_err(req, EBADF)); return }
    do {
        try fileSystem(req).flush(fi.pointee.fh)
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

private func opRelease(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.release.count()
    guard let fi else { answered(fuse_reply_err(req, EBADF)); return }
    do {
        try fileSystem(req).release(fi.pointee.fh)
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

private func opFsync(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ datasync: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.fsync.count()
    guard let fi else { answered(fuse_reply_err(req, EBADF)); return }
    do {
        try fileSystem(req).fsync(fi.pointee.fh)
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

/// fsync(2) of a directory: for a shard, every file of it closed before is durable.
private func opFsyncdir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ datasync: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.fsyncdir.count()
    do {
        try fileSystem(req).fsyncDirectory(ino)
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

/// access(2), faccessat(2) (only without default_permissions): the modes say.
private func opAccess(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ mask: Int32) {
    FuseRequest.access.count()
    let uid = fuse_req_ctx(req)?.pointee.uid ?? 0
    do {
        try fileSystem(req).access(ino, mask: mask, uid: uid)
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

private func opOpendir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.opendir.count()
    guard let fi else { answered(fuse_reply_err(req, EINVAL)); return }
    do {
        fi.pointee.fh = try fileSystem(req).opendir(ino)
        answered(fuse_reply_open(req, fi))
    } catch { fail(req, error) }
}

private func opReleasedir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.releasedir.count()
    if let fi { fileSystem(req).releasedir(fi.pointee.fh) }
    answered(fuse_reply_err(req, 0))
}

/// Packs as many items as fit in `size` bytes and replies once.
private func readDirectory(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t,
                           _ fi: UnsafeMutablePointer<fuse_file_info>?, plus: Bool) {
    guard let fi else { answered(fuse_reply_err(req, EBADF)); return }
    let fs = fileSystem(req)
    do {
        // A direntry takes at least 24 bytes (plus: about 150): ask for no more than can fit.
        let limit = max(1, min(1024, size / (plus ? 150 : 32)))
        let items = try fs.readdir(ino, handle: fi.pointee.fh, offset: Int64(offset), limit: limit, plus: plus)
        var buffer = [CChar](repeating: 0, count: size)
        var used = 0, packed = 0
        buffer.withUnsafeMutableBufferPointer { out in
            for item in items {
                var name = item.name.map { CChar(bitPattern: $0) } + [0]
                let needed: Int
                if plus {
                    var parameters = fuse_entry_param()
                    if item.kind != nil {
                        parameters.ino = item.inode
                        parameters.generation = 1
                        parameters.attr_timeout = item.timeout
                        parameters.entry_timeout = item.timeout
                    }
                    parameters.attr = item.attributes
                    needed = fuse_add_direntry_plus(req, out.baseAddress! + used, size - used, &name, &parameters, off_t(item.nextOffset))
                } else {
                    var attributes = item.attributes
                    needed = fuse_add_direntry(req, out.baseAddress! + used, size - used, &name, &attributes, off_t(item.nextOffset))
                }
                if needed > size - used { break }
                used += needed
                packed += 1
            }
        }
        fs.listed(items, packed: packed, handle: fi.pointee.fh, plus: plus)
        _ = buffer.withUnsafeBufferPointer { answered(fuse_reply_buf(req, $0.baseAddress, used)) }
    } catch { fail(req, error) }
}

private func opReaddir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.readdir.count()
    readDirectory(req, ino, size, offset, fi, plus: false)
}

private func opReaddirplus(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t,
                           _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    FuseRequest.readdirplus.count()
    readDirectory(req, ino, size, offset, fi, plus: true)
}

private func opStatfs(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
    FuseRequest.statfs.count()
    do {
        var result = try fileSystem(req).statfs(ino)
        answered(fuse_reply_statfs(req, &result))
    } catch { fail(req, error) }
}

private func opSetxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ value: UnsafePointer<CChar>?,
                        _ size: Int, _ flags: Int32) {
    FuseRequest.setxattr.count()
    let bytesValue = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
    do {
        try fileSystem(req).setxattr(ino, name: String(decoding: bytes(name), as: UTF8.self), value: bytesValue, flags: flags)
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

/// getxattr and listxattr: size 0 asks for the length; too small a buffer is ERANGE.
private func replyAttributeBytes(_ req: fuse_req_t?, _ value: [UInt8], _ size: Int) {
    if size == 0 {
        answered(fuse_reply_xattr(req, value.count))
    } else if value.count > size {
        answered(fuse_reply_err(req, ERANGE))
    } else {
        _ = value.withUnsafeBytes { answered(fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count)) }
    }
}

private func opGetxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ size: Int) {
    FuseRequest.getxattr.count()
    do {
        let value = try fileSystem(req).getxattr(ino, name: String(decoding: bytes(name), as: UTF8.self))
        replyAttributeBytes(req, value, size)
    } catch { fail(req, error) }
}

private func opListxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int) {
    FuseRequest.listxattr.count()
    do {
        replyAttributeBytes(req, try fileSystem(req).listxattr(ino), size)
    } catch { fail(req, error) }
}

private func opRemovexattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    FuseRequest.removexattr.count()
    do {
        try fileSystem(req).removexattr(ino, name: String(decoding: bytes(name), as: UTF8.self))
        answered(fuse_reply_err(req, 0))
    } catch { fail(req, error) }
}

/// The operations table (libfuse's `lo_oper`): one callback per request kind.
func makeOperations() -> fuse_lowlevel_ops {
    var ops = fuse_lowlevel_ops()
    ops.`init` = opInit
    ops.destroy = opDestroy
    ops.lookup = opLookup
    ops.forget = opForget
    ops.forget_multi = opForgetMulti
    ops.getattr = opGetattr
    ops.setattr = opSetattr
    ops.mkdir = opMkdir
    ops.rmdir = opRmdir
    ops.unlink = opUnlink
    ops.rename = opRename
    ops.symlink = opSymlink
    ops.link = opLink
    ops.mknod = opMknod
    ops.create = opCreate
    ops.open = opOpen
    ops.read = opRead
    ops.write = opWrite
    ops.flush = opFlush
    ops.release = opRelease
    ops.fsync = opFsync
    ops.fsyncdir = opFsyncdir
    ops.opendir = opOpendir
    ops.readdir = opReaddir
    ops.readdirplus = opReaddirplus
    ops.releasedir = opReleasedir
    ops.statfs = opStatfs
    ops.setxattr = opSetxattr
    ops.getxattr = opGetxattr
    ops.listxattr = opListxattr
    ops.removexattr = opRemovexattr
    ops.access = opAccess
    return ops
}
