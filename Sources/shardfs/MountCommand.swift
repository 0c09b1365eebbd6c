import ArgumentParser
import Foundation
import NodeSupport
import Glibc
import ShardFUSE
import ShardNode

/// `shardfs mount DATA_DIR MOUNTPOINT [-o options] [-f]`. Without -f it
/// re-executes itself in the foreground as a new session (no fork once threads or
/// LMDB exist) and returns once the mount is live, or fails with the child's reason.
struct MountCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a node's shards as a filesystem: shards are directories, entries are files.",
        discussion: """
            DATA_DIR is the node's data folder; an empty or missing one is initialised on \
            embedded defaults. Options (-o, comma-separated): ro, allow_other, client_id=ID, \
            entry_timeout=S, attr_timeout=S, closed_timeout=S, config=FILE, max_threads=N, \
            uid=N, gid=N, umask=OCTAL (owner, group and default modes shown), nonempty, \
            uring (the default: FUSE over io_uring when the kernel's fuse module allows it) or \
            nouring (always /dev/fuse), passthrough (the default: the kernel reads committed files \
            past 8 MiB itself, Linux 6.9+, as root) or nopassthrough, debug; \
            generic mount options (dev, suid, _netdev, nofail, ...) are ignored. Unmount with \
            `fusermount3 -u MOUNTPOINT`, `umount`, or SIGTERM/SIGINT to the daemon. See docs/SEMANTICS.md.
            """)

    @Argument(help: "The node's data folder.") var dataDir: String
    @Argument(help: "An empty directory to mount on.") var mountpoint: String
    @Option(name: .customShort("o"), help: "Mount options, comma-separated (repeatable).") var options: [String] = []
    @Flag(name: [.customShort("f"), .long], help: "Stay in the foreground.") var foreground = false
    @Option(name: .long, help: "YAML configuration file (also -o config=FILE).") var config: String?
    @Option(name: .long, help: "Log level.") var logLevel: String?

    static let readyVariable = "SHARDFS_READY_FD"
    /// glibc's POSIX_SPAWN_SETSID (a GNU extension Swift's Glibc module does not import).
    static let posixSpawnSetsid: Int16 = 0x80

    func run() async throws {
        var mountOptions = MountOptions()
        for list in options { try mountOptions.apply(list) }
        var info = stat()
        guard stat(mountpoint, &info) == 0 else {
            let reason = errno == ENOTCONN ? "a dead ShardFS mount is still there: run fusermount3 -u \(mountpoint)"
                                           : String(cString: strerror(errno))
            throw CommandFailure("mount point \(mountpoint): \(reason == "No such file or directory" ? "no such directory (create it first: mkdir -p \(mountpoint))" : reason)")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else { throw CommandFailure("mount point \(mountpoint) is not a directory") }
        try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true)
        if !foreground {
            try Self.daemonize(dataDir: dataDir)
            return
        }
        // SIGTERM and SIGINT stop the session here, as in `serve`: libfuse's own
        // handlers (left out once these are caught) only flag the loop, which runs on
        // a thread of its own and noticed the flag at the next request, not before.
        let signals = TerminationSignals()
        ProcessWatch.startIfAsked()
        let readyFD = ProcessInfo.processInfo.environment[Self.readyVariable].flatMap { Int32($0) }
        do {
            let environment = ProcessInfo.processInfo.environment
            var node = try Configuration.load(file: config ?? mountOptions.configFile, environment: environment)
            try node.set("node.data_dir", dataDir)
            if let logLevel { try node.set("log.level", logLevel) }
            Log.bootstrap(level: node.logLevel)
            LogFile.reopenOnHangup()
            let storage = try await StorageNode.start(node, lockTimeout: .seconds(5))
            let admin = try await AdminEndpoint.start(node: storage, tcpAddress: node.server.metricsAddress)
            var session: FuseSession? = try FuseSession(fileSystem: ShardFileSystem(node: storage, options: mountOptions),
                                                        mountpoint: mountpoint)
            if let readyFD { Self.report("ready\n", to: readyFD) }
            ServiceManagerNotify.ready(status: "mounted at \(mountpoint)")  // systemd Type=notify, with -f
            let running = session!
            let loop = Task { await runOnOwnThread { running.run() } }
            if await signals.wait(orEndOf: loop) { running.stop() }
            let rc = await loop.value
            session = nil  // the file system lets go of the shards it held
            await admin.stop()
            await storage.stop()
            if rc != 0 { throw MountError(description: "the FUSE loop ended with error \(rc)") }
        } catch {
            if let readyFD { Self.report("error: \(error)\n", to: readyFD) }
            throw error
        }
    }

    private static func report(_ message: String, to fd: Int32) {
        _ = message.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }


    /// Starts `shardfs mount … -f` as a new session with its output in
    /// `<data dir>/shardfs-mount.log`, and waits for it to say the mount is live.
    private static func daemonize(dataDir: String) throws {
        // The daemon must inherit nothing but what the file actions give it: a
        // caller's pipes or sockets held open by it would make the caller wait for
        // the daemon instead of for this process (Foundation's Process does).
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            if let fd = Int32(name), fd > 2 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw ValidationError("cannot create a pipe: \(String(cString: strerror(errno)))") }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }  // the child gets the write end only, as fd 3
        let childFD: Int32 = 3

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, writeEnd, childFD)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let log = URL(fileURLWithPath: dataDir).appendingPathComponent("shardfs-mount.log").path
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, posixSpawnSetsid)  // its own session: the shell's signals stay away

        let arguments = CommandLine.arguments + ["--foreground"]
        var environment = ProcessInfo.processInfo.environment
        environment[readyVariable] = String(childFD)
        environment[LogFile.variable] = log
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/proc/self/exe", &actions, &attributes, argv, envp)
        close(writeEnd)
        guard rc == 0 else {
            close(readEnd)
            throw ValidationError("cannot start the mount daemon: \(String(cString: strerror(rc)))")
        }
        var answer = Data()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(readEnd, &chunk, chunk.count)
            if n > 0 { answer.append(contentsOf: chunk[0..<n]) } else if n < 0 && errno == EINTR { continue } else { break }
        }
        close(readEnd)
        let text = String(decoding: answer, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if text == "ready" { return }
        var status: Int32 = 0
        waitpid(pid, &status, WNOHANG)
        throw CommandFailure(text.isEmpty ? "the mount daemon exited before the mount was live; see \(log)"
                                           : text.replacingOccurrences(of: "error: ", with: ""))
    }
}

/// The FUSE loop blocks: it gets a thread of its own, not Swift's cooperative pool.
func runOnOwnThread(_ body: @escaping @Sendable () -> Int32) async -> Int32 {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: body()) }
        thread.stackSize = 8 << 20
        thread.start()
    }
}
