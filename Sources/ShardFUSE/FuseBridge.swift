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

private func fail(_ req: fuse_req_t?, _ error: Error) {
    fuse_reply_err(req, errnoValue(of: error))
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

private func opInit(_ userdata: UnsafeMutableRawPointer?, _ conn: UnsafeMutablePointer<fuse_conn_info>?) {
    guard let conn else { return }
    // Big writes in one request; readdirplus so `ls -l` needs no lookup per file.
    conn.pointee.max_write = FuseSession.maxWrite
    conn.pointee.want |= UInt32(FUSE_CAP_READDIRPLUS)
    conn.pointee.want &= ~UInt32(FUSE_CAP_READDIRPLUS_AUTO)
}

private func opDestroy(_ userdata: UnsafeMutableRawPointer?) {
    guard let userdata else { return }
    fileSystem(userdata).commitAll()
}

private func opLookup(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    let fs = fileSystem(req)
    do {
        var parameters = entryParameters(try fs.lookup(parent, bytes(name)))
        fuse_reply_entry(req, &parameters)
    } catch let error where errnoValue(of: error) == ENOENT {
        // A negative entry, cached like a positive one.
        var parameters = fuse_entry_param()
        parameters.entry_timeout = fs.options.entryTimeout
        fuse_reply_entry(req, &parameters)
    } catch {
        fail(req, error)
    }
}

private func opForget(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ count: UInt64) {
    fileSystem(req).forget(ino, count)
    fuse_reply_none(req)
}

private func opForgetMulti(_ req: fuse_req_t?, _ count: Int, _ forgets: UnsafeMutablePointer<fuse_forget_data>?) {
    let fs = fileSystem(req)
    for i in 0..<count { if let f = forgets?[i] { fs.forget(f.ino, f.nlookup) } }
    fuse_reply_none(req)
}

private func opGetattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    do {
        var (attributes, timeout) = try fileSystem(req).getattr(ino)
        fuse_reply_attr(req, &attributes, timeout)
    } catch { fail(req, error) }
}

private func opSetattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ attr: UnsafeMutablePointer<stat>?, _ toSet: Int32,
                       _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let attr else { fuse_reply_err(req, EINVAL); return }
    do {
        var (attributes, timeout) = try fileSystem(req).setattr(ino, attr.pointee, AttributeChanges(rawValue: toSet), handle: fi?.pointee.fh)
        fuse_reply_attr(req, &attributes, timeout)
    } catch { fail(req, error) }
}

private func opMkdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t) {
    do {
        var parameters = entryParameters(try fileSystem(req).mkdir(parent, bytes(name)))
        fuse_reply_entry(req, &parameters)
    } catch { fail(req, error) }
}

private func opRmdir(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    do {
        try fileSystem(req).rmdir(parent, bytes(name))
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

private func opUnlink(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    do {
        try fileSystem(req).unlink(parent, bytes(name))
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

private func opRename(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ newParent: fuse_ino_t,
                      _ newName: UnsafePointer<CChar>?, _ flags: UInt32) {
    do {
        try fileSystem(req).rename(parent, bytes(name), newParent, bytes(newName), flags: flags)
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

/// Symlinks, hard links and device nodes have no place in a shard.
private func opSymlink(_ req: fuse_req_t?, _ link: UnsafePointer<CChar>?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    fuse_reply_err(req, EPERM)
}

private func opLink(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ newParent: fuse_ino_t, _ newName: UnsafePointer<CChar>?) {
    fuse_reply_err(req, EPERM)
}

private func opMknod(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t, _ rdev: dev_t) {
    fuse_reply_err(req, EPERM)
}

private func opCreate(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ mode: mode_t,
                      _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi else { fuse_reply_err(req, EINVAL); return }
    do {
        let (reply, handle) = try fileSystem(req).create(parent, bytes(name), flags: fi.pointee.flags)
        var parameters = entryParameters(reply)
        fi.pointee.fh = handle
        fuse_reply_create(req, &parameters, fi)
    } catch { fail(req, error) }
}

private func opOpen(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi else { fuse_reply_err(req, EINVAL); return }
    do {
        let (handle, keepCache) = try fileSystem(req).open(ino, flags: fi.pointee.flags)
        fi.pointee.fh = handle
        fi.pointee.keep_cache = keepCache ? 1 : 0
        // A read-only handle has nothing to commit at close(): spare the kernel
        // the flush request (release still comes, asynchronously).
        fi.pointee.noflush = fi.pointee.flags & O_ACCMODE == O_RDONLY ? 1 : 0
        fuse_reply_open(req, fi)
    } catch { fail(req, error) }
}

private func opRead(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi else { fuse_reply_err(req, EBADF); return }
    do {
        let data = try fileSystem(req).read(fi.pointee.fh, offset: Int(offset), count: size)
        _ = data.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
    } catch { fail(req, error) }
}

private func opWrite(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ buffer: UnsafePointer<CChar>?, _ size: Int, _ offset: off_t,
                     _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi, let buffer else { fuse_reply_err(req, EBADF); return }
    do {
        let written = try fileSystem(req).write(fi.pointee.fh, UnsafeRawBufferPointer(start: buffer, count: size), offset: Int(offset))
        fuse_reply_write(req, written)
    } catch { fail(req, error) }
}

private func opFlush(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi else { fuse_reply_err(req, EBADF); return }
    do {
        try fileSystem(req).flush(fi.pointee.fh)
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

private func opRelease(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi else { fuse_reply_err(req, EBADF); return }
    do {
        try fileSystem(req).release(fi.pointee.fh)
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

private func opFsync(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ datasync: Int32, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi else { fuse_reply_err(req, EBADF); return }
    do {
        try fileSystem(req).fsync(fi.pointee.fh)
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

/// access(2), faccessat(2) (only without default_permissions): the modes say.
private func opAccess(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ mask: Int32) {
    let uid = fuse_req_ctx(req)?.pointee.uid ?? 0
    do {
        try fileSystem(req).access(ino, mask: mask, uid: uid)
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

private func opOpendir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    guard let fi else { fuse_reply_err(req, EINVAL); return }
    do {
        fi.pointee.fh = try fileSystem(req).opendir(ino)
        fuse_reply_open(req, fi)
    } catch { fail(req, error) }
}

private func opReleasedir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    if let fi { fileSystem(req).releasedir(fi.pointee.fh) }
    fuse_reply_err(req, 0)
}

/// Packs as many items as fit in `size` bytes and replies once.
private func readDirectory(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t,
                           _ fi: UnsafeMutablePointer<fuse_file_info>?, plus: Bool) {
    guard let fi else { fuse_reply_err(req, EBADF); return }
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
        _ = buffer.withUnsafeBufferPointer { fuse_reply_buf(req, $0.baseAddress, used) }
    } catch { fail(req, error) }
}

private func opReaddir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t, _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    readDirectory(req, ino, size, offset, fi, plus: false)
}

private func opReaddirplus(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ offset: off_t,
                           _ fi: UnsafeMutablePointer<fuse_file_info>?) {
    readDirectory(req, ino, size, offset, fi, plus: true)
}

private func opStatfs(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
    do {
        var result = try fileSystem(req).statfs(ino)
        fuse_reply_statfs(req, &result)
    } catch { fail(req, error) }
}

private func opSetxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ value: UnsafePointer<CChar>?,
                        _ size: Int, _ flags: Int32) {
    let bytesValue = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
    do {
        try fileSystem(req).setxattr(ino, name: String(decoding: bytes(name), as: UTF8.self), value: bytesValue, flags: flags)
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

/// getxattr and listxattr: size 0 asks for the length; too small a buffer is ERANGE.
private func replyAttributeBytes(_ req: fuse_req_t?, _ value: [UInt8], _ size: Int) {
    if size == 0 {
        fuse_reply_xattr(req, value.count)
    } else if value.count > size {
        fuse_reply_err(req, ERANGE)
    } else {
        _ = value.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
    }
}

private func opGetxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?, _ size: Int) {
    do {
        let value = try fileSystem(req).getxattr(ino, name: String(decoding: bytes(name), as: UTF8.self))
        replyAttributeBytes(req, value, size)
    } catch { fail(req, error) }
}

private func opListxattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int) {
    do {
        replyAttributeBytes(req, try fileSystem(req).listxattr(ino), size)
    } catch { fail(req, error) }
}

private func opRemovexattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ name: UnsafePointer<CChar>?) {
    do {
        try fileSystem(req).removexattr(ino, name: String(decoding: bytes(name), as: UTF8.self))
        fuse_reply_err(req, 0)
    } catch { fail(req, error) }
}

private func makeOperations() -> fuse_lowlevel_ops {
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

/// The session pointer for the invalidation queue. Once `alive` is false, blocks
/// send nothing more; the session is destroyed only after the queue drained.
/// (Not set on the queue itself: a block may be stuck in the kernel, waiting
/// for a page a read request of the stopped session holds, until the unmount.)
private final class SessionHandle: @unchecked Sendable {
    let session: OpaquePointer
    private let lock = NSLock()
    private var isAlive = true
    var alive: Bool {
        get { lock.withLock { isAlive } }
        set { lock.withLock { isAlive = newValue } }
    }
    init(_ session: OpaquePointer) { self.session = session }
}

public struct MountError: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}

/// A live FUSE session: mounted on `init`, served by `run()` on threads of
/// libfuse's multithreaded loop, unmounted when `run()` returns.
public final class FuseSession: @unchecked Sendable {
    private let session: OpaquePointer
    private let fileSystem: ShardFileSystem
    private var arguments = fuse_args()
    public let mountpoint: String
    /// `mountpoint` as the mount table spells it.
    private let resolvedMountpoint: String
    /// The largest write the kernel sends in one request (and so the size of
    /// each io_uring entry's payload buffer).
    static let maxWrite: UInt32 = 1 << 20

    private let handlesSignals: Bool
    /// What libfuse hands every callback: the filesystem, and the io_uring rings.
    private let context: UnsafeMutablePointer<shardfs_fuse_context>
    /// Kernel cache invalidations run here, never in a request handler.
    private let invalidations = DispatchQueue(label: "shardfs.fuse.invalidate")
    private var sessionHandle: SessionHandle?
    /// This mount's change listener on the shard manager (see `ShardManager.addChangeListener`).
    private var changeListener: UInt64?

    /// `handleSignals`: SIGTERM, SIGINT and SIGHUP end the loop (a process that
    /// only mounts); a process with other services stops the session itself.
    public init(fileSystem: ShardFileSystem, mountpoint: String, handleSignals: Bool = true) throws {
        self.handlesSignals = handleSignals
        self.fileSystem = fileSystem
        self.mountpoint = mountpoint
        var mountOptions = ["fsname=shardfs", "subtype=shardfs"]
        if fileSystem.options.readOnly { mountOptions.append("ro") }
        // With other users, the kernel checks modes (default_permissions). Without
        // them only the daemon's user reaches the mount, and it owns every file:
        // the checks would only cost a GETATTR of the directory per create and
        // unlink (each one drops its cached attributes). The daemon refuses what
        // the modes forbid itself (EROFS) and answers access(2) (`opAccess`).
        if fileSystem.options.allowOther { mountOptions += ["allow_other", "default_permissions"] }
        for argument in ["shardfs", "-o", mountOptions.joined(separator: ",")] + (fileSystem.options.debug ? ["-d"] : []) {
            fuse_opt_add_arg(&arguments, argument)
        }
        var ops = makeOperations()
        context = .allocate(capacity: 1)
        context.initialize(to: shardfs_fuse_context(filesystem: Unmanaged.passUnretained(fileSystem).toOpaque(), ring: nil))
        guard let session = fuse_session_new(&arguments, &ops, MemoryLayout<fuse_lowlevel_ops>.size, context) else {
            context.deallocate()
            fuse_opt_free_args(&arguments)
            throw MountError(description: "cannot start a FUSE session (is /dev/fuse available?)")
        }
        self.session = session
        // Resolved before mounting: afterwards, looking at the path would wait for
        // this very session to answer.
        if let resolved = realpath(mountpoint, nil) {
            resolvedMountpoint = String(cString: resolved)
            free(resolved)
        } else {
            resolvedMountpoint = mountpoint
        }
        guard fuse_session_mount(session, mountpoint) == 0 else {
            fuse_session_destroy(session)
            fuse_opt_free_args(&arguments)
            context.deallocate()
            throw MountError(description: "cannot mount at \(mountpoint): see the message above (is it an empty directory? not already mounted?)")
        }
        if fileSystem.options.uring {
            // Four threads per CPU queue, one entry each, so a request that
            // blocks (an fsync, a shard's creation) holds up no other: the
            // kernel gives a thread a request only when it is waiting for one.
            let rc = shardfs_ring_prepare(session, context, resolvedMountpoint, 4, 1, Int(Self.maxWrite))
            if rc == 0 {
                fileSystem.logger.info("FUSE requests go over io_uring once the kernel takes it at FUSE_INIT (one queue per CPU)")
            } else if rc == -EOPNOTSUPP {
                fileSystem.logger.info("FUSE requests go through /dev/fuse: the fuse module's enable_uring is off")
            } else if rc == -ENOSYS {
                fileSystem.logger.info("FUSE requests go through /dev/fuse: this kernel has no FUSE over io_uring")
            } else {
                fileSystem.logger.warning("FUSE over io_uring could not be set up; requests go through /dev/fuse",
                                          metadata: ["error": "\(String(cString: strerror(-rc)))"])
            }
        } else {
            fileSystem.logger.info("FUSE requests go through /dev/fuse (-o nouring)")
        }
        // SIGTERM, SIGINT and SIGHUP end the loop; `run` then unmounts.
        if handleSignals { fuse_set_signal_handlers(session) }
        let handle = SessionHandle(session)
        let queue = invalidations
        sessionHandle = handle
        fileSystem.invalidate = { inodes in
            queue.async {
                for ino in inodes where handle.alive { fuse_lowlevel_notify_inval_inode(handle.session, ino, 0, 0) }
            }
        }
        fileSystem.invalidateName = { parent, name in
            queue.async {
                guard handle.alive else { return }
                var cName = name.map { CChar(bitPattern: $0) } + [0]
                fuse_lowlevel_notify_inval_entry(handle.session, parent, &cName, name.count)
            }
        }
        changeListener = fileSystem.node.shards.addChangeListener { [weak fileSystem] shard, keys in
            fileSystem?.entriesChanged(shard: shard, keys: keys)
        }
    }

    /// Serves requests until unmounted or signalled; blocks the calling thread,
    /// which must be a thread of its own (not Swift's cooperative pool).
    public func run() -> Int32 {
        let config = fuse_loop_cfg_create()
        fuse_loop_cfg_set_max_threads(config, UInt32(fileSystem.options.maxThreads))
        let rc = fuse_session_loop_mt(session, config)
        fuse_loop_cfg_destroy(config)
        // The rings stop serving before open files are committed, as the loop has.
        var ringFailed = false
        if let ring = context.pointee.ring {
            ringFailed = shardfs_ring_failed(ring) != 0
            fileSystem.logger.info("FUSE over io_uring served \(shardfs_ring_requests(ring)) requests")
            shardfs_ring_stop(ring)
        }
        if let changeListener { fileSystem.node.shards.removeChangeListener(changeListener) }
        fileSystem.invalidate = nil
        fileSystem.invalidateName = nil
        sessionHandle?.alive = false  // queued invalidations send nothing more
        fileSystem.commitAll()
        if handlesSignals { fuse_remove_signal_handlers(session) }
        fuse_session_unmount(session)
        // libfuse takes an aborted connection for an unmount and leaves the mount.
        if shardfs_is_mounted(resolvedMountpoint) != 0 { lazyUnmount() }
        // An invalidation still in the kernel returns once the mount is gone;
        // none may touch the session after it is destroyed.
        invalidations.sync {}
        fuse_session_destroy(session)
        fuse_opt_free_args(&arguments)
        context.deallocate()
        if ringFailed {
            fileSystem.logger.error("the mount ended because a FUSE ring failed (see above); open files were committed")
            return rc != 0 ? rc : -EIO
        }
        return rc
    }

    /// Ends the loop from another thread: unmounting makes every worker's read
    /// of /dev/fuse fail, so the loop returns and `run` finishes (open files
    /// are committed first, in `run`).
    public func stop() {
        fuse_session_exit(session)
        lazyUnmount()
    }

    private func lazyUnmount() {
        let unmount = Process()
        unmount.executableURL = URL(fileURLWithPath: "/bin/fusermount3")
        unmount.arguments = ["-u", "-z", mountpoint]
        try? unmount.run()
        unmount.waitUntilExit()
    }

}
