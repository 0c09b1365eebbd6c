// The FUSE session: mounting (over io_uring or /dev/fuse), the request loop,
// kernel cache invalidations, and unmounting. The callbacks it serves with are
// in FuseBridge.swift.
import CFuse3
import CFuseRing
import Foundation
import Glibc
import Logging
import Volumes

/// The session and context pointers for the invalidation queue and backing
/// files. Once `alive` is false, blocks send nothing more; the session is
/// destroyed only after the queue drained.
/// (Not set on the queue itself: a block may be stuck in the kernel, waiting
/// for a page a read request of the stopped session holds, until the unmount.)
private final class SessionHandle: @unchecked Sendable {
    let session: OpaquePointer
    let context: UnsafePointer<shardfs_fuse_context>
    private let lock = NSLock()
    private var isAlive = true
    var alive: Bool {
        get { lock.withLock { isAlive } }
        set { lock.withLock { isAlive = newValue } }
    }
    init(_ session: OpaquePointer, _ context: UnsafePointer<shardfs_fuse_context>) {
        self.session = session
        self.context = context
    }
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

    /// What the mount shows as its source: the node's data folder.
    private let source: String
    /// The kernel's ID of this mount (mountinfo), once mounted.
    private var mountID: Int?
    private let handlesSignals: Bool
    /// What libfuse hands every callback: the filesystem, and the io_uring rings.
    private let context: UnsafeMutablePointer<shardfs_fuse_context>
    /// Kernel cache invalidations run here, never in a request handler.
    private let invalidations = DispatchQueue(label: "shardfs.fuse.invalidate")
    private var sessionHandle: SessionHandle?
    /// This mount's change listener on the shard manager (see `ShardManager.addChangeListener`).
    private var changeListener: UInt64?
    /// This mount's listener on the node's backup views (see `BackupViews.addListener`).
    private var viewsListener: UInt64?

    /// `handleSignals`: SIGTERM, SIGINT and SIGHUP end the loop (a process that
    /// only mounts); a process with other services stops the session itself.
    public init(fileSystem: ShardFileSystem, mountpoint: String, handleSignals: Bool = true) throws {
        self.handlesSignals = handleSignals
        self.fileSystem = fileSystem
        self.mountpoint = mountpoint
        // Resolved before mounting: afterwards, looking at the path would wait for
        // this very session to answer.
        guard let resolved = realpath(mountpoint, nil) else {
            switch errno {
            case ENOENT:
                throw MountError(description: "mount point \(mountpoint) does not exist: create the directory first (mkdir -p \(mountpoint))")
            case ENOTCONN:
                throw MountError(description: "mount point \(mountpoint): a dead ShardFS mount is still there: run fusermount3 -u \(mountpoint)")
            case let code:
                throw MountError(description: "mount point \(mountpoint): \(String(cString: strerror(code)))")
            }
        }
        resolvedMountpoint = String(cString: resolved)
        free(resolved)
        try Self.checkMountpoint(mountpoint, resolved: resolvedMountpoint, allowNonEmpty: fileSystem.options.allowNonEmpty)
        // `mount`, `df` and `mount -a` show (and recognise) the node's data folder.
        source = URL(fileURLWithPath: fileSystem.node.configuration.node.dataDir).standardizedFileURL.path
        var mountOptions = ["fsname=" + Self.fuseOptionValue(source), "subtype=shardfs"]
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
        context.initialize(to: shardfs_fuse_context(filesystem: Unmanaged.passUnretained(fileSystem).toOpaque(), ring: nil,
                                                    passthrough: 0, passthrough_init_unique: 0))
        guard let session = fuse_session_new(&arguments, &ops, MemoryLayout<fuse_lowlevel_ops>.size, context) else {
            context.deallocate()
            fuse_opt_free_args(&arguments)
            throw MountError(description: "cannot start a FUSE session (is /dev/fuse available?)")
        }
        self.session = session
        guard fuse_session_mount(session, mountpoint) == 0 else {
            fuse_session_destroy(session)
            fuse_opt_free_args(&arguments)
            context.deallocate()
            throw MountError(description: "cannot mount at \(mountpoint): see the message above")
        }
        // What `run` and `stop` unmount: this mount, never one stacked on it later.
        mountID = Self.mounts(at: resolvedMountpoint).last { $0.fsType == "fuse.shardfs" && $0.source == source }?.id
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
        let handle = SessionHandle(session, context)
        sessionHandle = handle
        if fileSystem.options.passthrough {
            // Asked at FUSE_INIT (after the rings, whose I/O hooks it shares);
            // the kernel says there whether it takes it.
            let rc = shardfs_passthrough_request(session, context)
            if rc == 0 {
                fileSystem.backingFiles.connect(BackingFiles.Session(
                    enabled: { handle.alive && shardfs_passthrough_enabled(handle.context) != 0 },
                    register: { fd in handle.alive ? shardfs_backing_open(handle.session, fd) : -ENOTCONN },
                    unregister: { id in if handle.alive { _ = shardfs_backing_close(handle.session, id) } }))
            } else {
                fileSystem.logger.warning("FUSE passthrough could not be asked for; large files are read through the daemon",
                                          metadata: ["error": "\(String(cString: strerror(-rc)))"])
            }
        }
        // SIGTERM, SIGINT and SIGHUP end the loop; `run` then unmounts.
        if handleSignals { fuse_set_signal_handlers(session) }
        let queue = invalidations
        fileSystem.kernelCache.invalidate = { inodes in
            queue.async {
                for ino in inodes where handle.alive { fuse_lowlevel_notify_inval_inode(handle.session, ino, 0, 0) }
            }
        }
        fileSystem.kernelCache.invalidateName = { parent, name in
            queue.async {
                guard handle.alive else { return }
                var cName = name.map { CChar(bitPattern: $0) } + [0]
                fuse_lowlevel_notify_inval_entry(handle.session, parent, &cName, name.count)
            }
        }
        changeListener = fileSystem.node.shards.addChangeListener { [weak fileSystem] shard, keys in
            fileSystem?.entriesChanged(shard: shard, keys: keys)
        }
        // The queue is serial: once an empty block has run, every invalidation
        // queued before it has been written to the kernel.
        fileSystem.node.shards.cacheBarrier = { queue.sync {} }
        viewsListener = fileSystem.node.views.addListener { [weak fileSystem] _, changed, removed in
            fileSystem?.viewsChanged(changed: changed, removed: removed)
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
        fileSystem.logger.info("FUSE requests handed to the daemon, by kind", metadata: ["requests": "\(FuseRequest.report().split(separator: "\n").joined(separator: ", "))"])
        if let changeListener { fileSystem.node.shards.removeChangeListener(changeListener) }
        if let viewsListener { fileSystem.node.views.removeListener(viewsListener) }
        fileSystem.kernelCache.invalidate = nil
        fileSystem.kernelCache.invalidateName = nil
        fileSystem.node.shards.cacheBarrier = nil
        sessionHandle?.alive = false  // queued invalidations send nothing more
        fileSystem.commitAll()
        if handlesSignals { fuse_remove_signal_handlers(session) }
        if ownsTopMount() {
            fuse_session_unmount(session)
            // libfuse takes an aborted connection for an unmount and leaves the mount.
            if shardfs_is_mounted(resolvedMountpoint) != 0 && ownsTopMount() { lazyUnmount() }
        }
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
        if ownsTopMount() { lazyUnmount() }
    }

    /// Refuses a mount point that is already one (mounting would stack on it, and
    /// an unmount by path would then take the wrong one), and one that holds
    /// files (hidden while mounted) unless `-o nonempty`.
    static func checkMountpoint(_ mountpoint: String, resolved: String, allowNonEmpty: Bool) throws {
        var info = stat()
        guard stat(resolved, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
            throw MountError(description: "mount point \(mountpoint) is not a directory")
        }
        if let top = Self.mounts(at: resolved).last {
            throw MountError(description: "\(mountpoint) is already a mount point (\(top.fsType) of \(top.source)): "
                                + "unmount it first, or mount on an empty directory")
        }
        if !allowNonEmpty, let names = try? FileManager.default.contentsOfDirectory(atPath: resolved), !names.isEmpty {
            throw MountError(description: "\(mountpoint) is not empty: its files would be hidden while ShardFS is mounted "
                                + "(mount on an empty directory, or add -o nonempty)")
        }
    }

    /// Whether what the mount point shows is this session's mount. Another
    /// mounted over it afterwards is not unmounted in its place: the unmount
    /// is left for whoever removes that one (logged).
    private func ownsTopMount() -> Bool {
        guard let top = Self.mounts(at: resolvedMountpoint).last else { return false }
        if let mountID, top.id != mountID {
            fileSystem.logger.error("another filesystem is mounted over this mount; leaving both in place",
                                    metadata: ["mountpoint": "\(resolvedMountpoint)", "over": "\(top.fsType) \(top.source)"])
            return false
        }
        return true
    }

    /// Mounts at `path`, bottom first (the last is what the path shows). Reading
    /// the mount table never reaches a FUSE daemon.
    private static func mounts(at path: String) -> [MountInfo] { MountInfo.current().filter { $0.mountPoint == path } }

    /// A value as libfuse's option parser wants it (`,` and `\\` escaped).
    private static func fuseOptionValue(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: ",", with: "\\,")
    }

    private func lazyUnmount() {
        let unmount = Process()
        unmount.executableURL = URL(fileURLWithPath: "/bin/fusermount3")
        unmount.arguments = ["-u", "-z", mountpoint]
        try? unmount.run()
        unmount.waitUntilExit()
    }

}
