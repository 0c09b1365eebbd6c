import Foundation
import TestSupport
import Testing

/// Mounting never hides or takes down something else, and a mistyped command never mounts.
@Suite struct SafeMountTests {
    @Test func aMountPointThatIsAlreadyAMountOrHoldsFilesIsRefused() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && echo v > shard-1/f")
            // The mount shows the node's data folder as its source.
            #expect(mountTable().contains("\(m.data) \(m.mnt) fuse.shardfs "), "\(mountTable())")
            let stacked = try await runAsync(shardfs, ["mount", m.dir.sub("other"), m.mnt, "-o", "client_id=x"])
            #expect(stacked.status != 0 && stacked.stderr.contains("is already a mount point"), "\(stacked.stderr)")
            #expect(try await m.ok("cat shard-1/f") == "v\n")  // the first one is untouched
            let full = m.dir.sub("full")
            try FileManager.default.createDirectory(atPath: full, withIntermediateDirectories: true)
            try "x".write(toFile: full + "/keep", atomically: true, encoding: .utf8)
            let hidden = try await runAsync(shardfs, ["mount", m.dir.sub("other"), full])
            #expect(hidden.status != 0 && hidden.stderr.contains("is not empty") && hidden.stderr.contains("nonempty"),
                    "\(hidden.stderr)")
            #expect(!isMountPoint(full))
            let missing = try await runAsync(shardfs, ["mount", m.dir.sub("other"), m.dir.sub("missing")])
            #expect(missing.status != 0 && missing.stderr.contains("no such directory") && !missing.stderr.contains("Usage"),
                    "\(missing.stderr)")
            // With -o nonempty the files are hidden while mounted, and back afterwards.
            let over = try await runAsync(shardfs, ["mount", m.dir.sub("other"), full, "-o", "nonempty,client_id=x"])
            #expect(over.status == 0, "\(over.stderr)")
            #expect(isMountPoint(full))
            _ = try await shell("fusermount3 -u '\(full)'")
            for _ in 0..<100 where isMountPoint(full) { try await Task.sleep(for: .milliseconds(20)) }
            #expect(FileManager.default.fileExists(atPath: full + "/keep"))
        }
    }

    /// A mount daemon told to watch a process (as every daemon the tests start
    /// watches the test process) unmounts and exits once that process is killed.
    @Test func aMountEndsCleanlyWhenTheProcessItWatchesIsKilled() async throws {
        _ = try await withFixture("client_id=tester") { m in
            let standIn = Process()  // stands in for a test process that crashes
            standIn.executableURL = URL(fileURLWithPath: "/bin/sleep")
            standIn.arguments = ["600"]
            try standIn.run()
            defer { if standIn.isRunning { kill(standIn.processIdentifier, SIGKILL) } }
            try await m.mount(environment: ["SHARDFS_EXIT_WITH_PID": String(standIn.processIdentifier)])
            let daemon = try #require(m.daemonPID)
            _ = try await m.ok("ls")
            kill(standIn.processIdentifier, SIGKILL)
            standIn.waitUntilExit()
            #expect(await waitUntil(15) { !m.isMounted && kill(daemon, 0) != 0 })
        }
    }

    @Test func aMistypedCommandIsAnErrorNeverAMount() async throws {
        let dir = try TemporaryDirectory("cli")
        try FileManager.default.createDirectory(atPath: dir.sub("list"), withIntermediateDirectories: true)
        let result = try await shell("cd '\(dir.path)' && '\(shardfs)' shards list")
        #expect(result.status == 64 && result.stderr.contains("unknown command 'shards'") && result.stderr.contains("'shard'"),
                "\(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.sub("shards")))
        #expect(!isMountPoint(dir.sub("list")))
        let stat = try await shell("cd '\(dir.path)' && '\(shardfs)' stat 1")
        #expect(stat.status == 64 && stat.stderr.contains("unknown command 'stat'"), "\(stat.stderr)")
    }

    /// A refused operation is in the log with its reason and who asked.
    @Test func refusalsAreLoggedWithTheReason() async throws {
        try await withFixture { m in
            try await m.mount(logLevel: "info")
            try await m.ok("mkdir shard-1 && rmdir shard-1")
            #expect(try await m.errnoOf("os.mkdir('shard-1')") == "EEXIST")
            try await m.ok("mkdir shard-2 && echo v > shard-2/f && chmod a-w shard-2")
            #expect(try await m.errnoOf("open('shard-2/f', 'w')") == "EROFS")
            let log = (try? String(contentsOfFile: m.data + "/shardfs-mount.log", encoding: .utf8)) ?? ""
            #expect(log.contains("refused") && log.contains("shard ID 1 is taken: IDs are never used twice"), "\(log)")
            #expect(log.contains("shard 2 is closed") && log.contains("uid=0"), "\(log)")
        }
    }

    /// The owner client of a shard shows through the mount, read-only.
    @Test func aShardDirectoryShowsItsOwner() async throws {
        try await withMount("client_id=alice") { m in
            try await m.ok("mkdir shard-1")
            #expect(try await m.ok("getfattr --only-values -n user.shardfs.owner shard-1") == "alice")
            #expect(try await m.ok("getfattr -d shard-1").isEmpty)  // not listed: copying tools leave it alone
            #expect(try await m.errnoOf("os.setxattr('shard-1', 'user.shardfs.owner', b'mallory')") == "ENOTSUP")
        }
    }
}

