import Foundation
import TestSupport
import Testing

/// `shardfs serve --mount`: the socket service and the mount on one node.
@Suite struct ServeTests {
    /// A mount that fails leaves nothing running behind the node that reads
    /// freed memory (the write-behind committer outlived its file system).
    @Test func aMountThatFailsEndsServeWithAnErrorNotACrash() async throws {
        let dir = try TemporaryDirectory("serve")
        for attempt in 0..<5 {
            let data = dir.sub("data\(attempt)")
            let result = try await runAsync(shardfs, ["serve", "--data-dir", data, "--no-tcp", "--mount", dir.sub("missing"),
                                                      "--log-level", "error"])
            #expect(result.status == 1, "\(result.stderr)")
            #expect(result.stderr.contains("mount point \(dir.sub("missing")) does not exist") && !result.stderr.contains("Fatal error"),
                    "\(result.stderr)")
        }
    }

    @Test func aPutThroughTheSocketIsSeenByTheMountAtOnce() async throws {
        try await withServeAndMount { dir, mnt, data, server in
            #expect(server.readyLine.hasPrefix("ready "))
            let socket = ["--socket", data + "/shardfs.sock"]
            func client(_ arguments: [String]) async throws -> ProcessResult {
                try await runAsync(shardfs, ["client"] + arguments.prefix(1) + socket + arguments.dropFirst())
            }
            _ = try await shell("mkdir \(mnt)/shard-3 && echo hi > \(mnt)/shard-3/a && cat \(mnt)/shard-3/a")
            #expect(try await client(["put", "3", "a", "--value", "changed through the socket", "--client", "c"]).status == 0)
            #expect(try await shell("cat \(mnt)/shard-3/a").stdout == "changed through the socket")
            #expect(try await client(["put", "3", "b", "--value", "new", "--client", "c"]).status == 0)
            #expect(try await shell("cat \(mnt)/shard-3/b").stdout == "new")
            #expect(try await client(["delete", "3", "b", "--client", "c"]).status == 0)
            #expect(try await shell("ls \(mnt)/shard-3").stdout == "a\n")
            // SIGTERM unmounts cleanly.
            #expect(server.stop() == 0)
            #expect(!isMounted(mnt))
        }
    }

    /// A descriptor that holds a committed value on the mount sees a put made
    /// through the socket afterwards, and writes on from it (the commit hook
    /// marks the entry stale; it never waits for the entry's lock).
    @Test func anOpenDescriptorSeesAPutMadeThroughTheSocket() async throws {
        try await withServeAndMount { dir, mnt, data, server in
            let script = """
                import os, subprocess, sys
                shardfs, socket, mnt = sys.argv[1:4]
                os.mkdir(mnt + "/shard-1")
                fd = os.open(mnt + "/shard-1/k", os.O_CREAT | os.O_RDWR, 0o644)
                os.write(fd, b"local"); os.fsync(fd)
                subprocess.run([shardfs, "client", "put", "1", "k", "--socket", socket, "--value", "from the socket",
                                "--client", "c"], check=True)
                seen = os.pread(fd, 100, 0)
                os.pwrite(fd, b"+x", len(seen)); os.close(fd)
                print(seen, open(mnt + "/shard-1/k", "rb").read())
                """
            try script.write(toFile: dir.sub("stale.py"), atomically: true, encoding: .utf8)
            let result = try await shell("python3 '\(dir.sub("stale.py"))' '\(shardfs)' '\(data)/shardfs.sock' '\(mnt)'")
            #expect(result.stdout == "b'from the socket' b'from the socket+x'\n", "\(result.stdout) \(result.stderr)")
        }
    }

    /// A file written through the mount past 8 MiB is read through the socket
    /// whole, and the server holds its value once (copied from the value file
    /// straight into the answer), not twice as an `Entry` and a frame.
    @Test func aLargeFileFromTheMountIsAGetHeldOnceByTheServer() async throws {
        try await withServeAndMount { dir, mnt, data, server in
            let size = 256 << 20
            _ = try await shell("mkdir \(mnt)/shard-1 && head -c \(size) /dev/urandom > \(dir.sub("src")) && cp \(dir.sub("src")) \(mnt)/shard-1/big")
            func peak() throws -> Int {
                let status = try String(contentsOfFile: "/proc/\(server.process.processIdentifier)/status", encoding: .utf8)
                let line = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") }!
                return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1])! << 10
            }
            // The peak from here on: clear_refs 5 resets it to what is resident now.
            try "5".write(toFile: "/proc/\(server.process.processIdentifier)/clear_refs", atomically: false, encoding: .utf8)
            let before = try peak()
            let got = try await shell("'\(shardfs)' client get 1 big --socket '\(data)/shardfs.sock' > '\(dir.sub("got"))' && cmp '\(dir.sub("src"))' '\(dir.sub("got"))'")
            #expect(got.status == 0, "\(got.stderr)")
            let grew = try peak() - before
            #expect(grew < size * 3 / 2, "the server's peak grew by \(grew >> 20) MiB for a \(size >> 20) MiB value")
        }
    }

    // A mount whose FUSE ring fails ends the node with an error, for a
    // supervisor to restart it (needs the rings: scripts/test turns them on).
    @Test(.enabled(if: TransportTests.kernelAllowsRings))
    func serveExitsWithAnErrorWhenItsMountEndsOnItsOwn() async throws {
        let dir = try TemporaryDirectory("serve")
        let mnt = dir.sub("mnt"), data = dir.sub("data")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let server = try ServeProcess(["--data-dir", data, "--no-tcp", "--mount", mnt, "-o", "client_id=c", "--log-level", "warning"],
                                      environment: ["SHARDFS_TEST_RING_FAIL_AFTER": "100"])
        defer {
            server.stop()
            if isMounted(mnt) { _ = try? run("/bin/fusermount3", ["-uz", mnt]) }
        }
        // Requests until the ring fails; every file whose close() succeeded is kept.
        let result = try await shell("""
            cd '\(mnt)' && mkdir shard-1 || exit 2
            for i in $(seq 1 300); do timeout 20 sh -c "echo $i > shard-1/f$i" 2>/dev/null || { echo $i; exit 0; }; done
            """)
        let failedAt = try #require(Int(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), "\(result.stdout)")
        let status = server.exitStatus(within: 15)
        #expect(status != nil && status != 0, "serve: \(String(describing: status))")
        #expect(!isMounted(mnt))
        // The node's data: the files closed before the failure are there.
        let listing = try run(shardfs, ["ls", "1", "--data-dir", data, "--log-level", "error"])
        #expect(listing.stdout.split(separator: "\n").count >= failedAt - 1, "\(listing.stdout)")
    }

    /// Runs `body` with `shardfs serve --mount` on a fresh folder (client `c`,
    /// no TCP); stops the server and unmounts afterwards, even on failure.
    private func withServeAndMount(_ body: (_ dir: TemporaryDirectory, _ mnt: String, _ data: String, _ server: ServeProcess)
        async throws -> Void) async throws {
        let dir = try TemporaryDirectory("serve")
        let mnt = dir.sub("mnt"), data = dir.sub("data")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let server = try ServeProcess(["--data-dir", data, "--no-tcp", "--mount", mnt, "-o", "client_id=c", "--log-level", "warning"])
        defer {
            server.stop()
            if isMounted(mnt) { _ = try? run("/bin/fusermount3", ["-uz", mnt]) }
        }
        try await body(dir, mnt, data, server)
    }

    private func isMounted(_ mnt: String) -> Bool {
        isMountPoint(mnt)
    }
}
