import Foundation
import TestSupport
import Testing

/// A backup's FUSE mount (docs/SEMANTICS.md, "Backup mounts"): two `shardfs
/// serve` processes on one etcd and one folder volume; node-a writes it, node-b
/// backs it and mounts. What the primary writes shows up in the backup's mount,
/// every change through it is EROFS, and a shard deleted on the primary vanishes.
@Suite(.serialized) struct BackupMountTests {
    /// The two nodes; `primary` runs Python against node-a's socket.
    struct Cluster {
        let dir: TemporaryDirectory
        let etcd: LocalEtcd
        let mnt: String
        let primarySocket: String
        let shard: UInt64
        let doomed: UInt64

        /// Runs `code` with `c` a client of the primary (and `tools` imported); its output.
        @discardableResult
        func primary(_ code: String, sourceLocation: SourceLocation = #_sourceLocation) async throws -> String {
            let path = dir.sub("primary-\(UUID().uuidString).py")
            try ("import sys\nsys.path.insert(0, \(pythonString(BackupMountTests.pythonDirectory)))\n"
                 + "sys.path.insert(0, \(pythonString(dir.path)))\nfrom shardfs_client import Client\nfrom tools import *\n"
                 + "c = Client(unix=\(pythonString(primarySocket)))\n" + code + "\n").write(toFile: path, atomically: true, encoding: .utf8)
            let result = try await shell("python3 '\(path)'")
            #expect(result.status == 0, "\(code): \(result.stderr)", sourceLocation: sourceLocation)
            return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }

        /// A shell command in the backup's mount point.
        func sh(_ command: String) async throws -> ProcessResult { try await shell("cd '\(mnt)' || exit 1\n\(command)") }

        /// The errno name a Python os call in the backup's mount fails with, or "OK".
        func errnoOf(_ call: String) async throws -> String {
            let path = dir.sub("errno-\(UUID().uuidString).py")
            try "import errno, os\nos.chdir(\(pythonString(mnt)))\ntry:\n    \(call)\n    print('OK')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
                .write(toFile: path, atomically: true, encoding: .utf8)
            return try await shell("python3 '\(path)'").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
    }

    static var pythonDirectory: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("clients/python").path
    }

    /// Values that check themselves: block i of version v of key k holds
    /// "k:v:i:" and then bytes that depend on v, i and the position.
    static let tools = """
        import functools

        @functools.lru_cache(maxsize=4096)
        def block(k, v, i):
            head = ("%s:%08d:%06d:" % (k, v, i)).encode()
            return head + bytes((v * 7 + i + j) % 251 for j in range(len(head), 4096))

        def value(k, v, size):
            return b"".join(block(k, v, i) for i in range((size + 4095) // 4096))[:size]

        def versions(k, data, offset):
            \"\"\"The versions of the 4 KiB blocks in data (read at offset, a multiple of 4096); None if a block is wrong.\"\"\"
            seen = set()
            for start in range(0, len(data), 4096):
                piece = data[start:start + 4096]
                i = (offset + start) // 4096
                parts = piece[:40].split(b":")
                if len(parts) < 4 or parts[0] != k.encode() or int(parts[2]) != i:
                    return None
                v = int(parts[1])
                if piece != block(k, v, i)[:len(piece)]:
                    return None
                seen.add(v)
            return seen
        """

    static func pythonString(_ s: String) -> String {
        "'" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "'", with: "\\'") + "'"
    }

    static func config(_ dir: TemporaryDirectory, node: String, etcd: LocalEtcd, namespace: String, volumes: Int) throws -> String {
        try NodeConfigFile(nodeID: node, dataDir: dir.sub(node),
                           cloud: .init(volumeRoot: dir.sub("volumes"), initialVolumes: volumes),
                           etcd: .init(endpoints: [etcd.endpoint], namespace: namespace, leaseTTLSeconds: 5, retryDeadlineMs: 3000),
                           shardSizeLimit: "64MiB",
                           backup: .init(viewIntervalMs: 100, automaticFailover: false))
            .write(to: dir.sub("\(node).yaml"))
    }


    /// node-a serves shard S ("a", "b" with index color=blue, "big": 300 KB in
    /// chunks) and shard D ("x"); node-b backs the volume and mounts. Stops both
    /// and unmounts whatever happens.
    func withPrimaryAndBackup(mountOptions: String = "client_id=c", _ body: (Cluster) async throws -> Void) async throws {
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let dir = try TemporaryDirectory("backup-mount")
            defer { dir.remove() }
            let namespace = "/backup-mount-\(UUID().uuidString.prefix(8))"
            let mnt = dir.sub("mnt")
            try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
            try Self.tools.write(toFile: dir.sub("tools.py"), atomically: true, encoding: .utf8)
            let configA = try Self.config(dir, node: "node-a", etcd: etcd, namespace: namespace, volumes: 1)
            let configB = try Self.config(dir, node: "node-b", etcd: etcd, namespace: namespace, volumes: 0)
            let a = try await ServeProcess.start(["--config", configA, "--no-tcp", "--log-level", "error"])
            defer { a.stop() }
            var b: ServeProcess?
            defer {
                b?.stop()
                if isMountPoint(mnt) { _ = try? run("/bin/fusermount3", ["-uz", mnt]) }
            }
            let socket = try #require(a.unixSocket)
            var cluster = Cluster(dir: dir, etcd: etcd, mnt: mnt, primarySocket: socket, shard: 0, doomed: 0)
            let ids = try await cluster.primary("""
                s = c.new_shard("c"); d = c.new_shard("c")
                c.put("c", s, b"a", b"alpha")
                c.put("c", s, b"b", b"beta", [("color", b"blue")])
                c.put("c", s, b"big", value("big", 0, 300000))
                c.put("c", d, b"x", b"gone soon")
                open(\(Self.pythonString(dir.sub("big.0"))), "wb").write(value("big", 0, 300000))
                print(s, d)
                """).split(separator: " ").compactMap { UInt64($0) }
            try #require(ids.count == 2)
            cluster = Cluster(dir: dir, etcd: etcd, mnt: mnt, primarySocket: socket, shard: ids[0], doomed: ids[1])
            let volume = try #require(try FileManager.default.contentsOfDirectory(atPath: dir.sub("volumes")).first)
            let added = try await runAsync(shardfs, ["volume", "add-backup", "--config", configA, volume, "--backup", "node-b"])
            try #require(added.status == 0, "\(added.stderr)")
            b = try await ServeProcess.start(["--config", configB, "--no-tcp", "--mount", mnt, "-o", mountOptions,
                                              "--log-level", "error"])
            try #require(isMountPoint(mnt))
            try await body(cluster)
            #expect(b?.stop() == 0)
            #expect(!isMountPoint(mnt))
        } }
    }

    /// With long cache timeouts: what the kernel cached of a view is dropped
    /// when a generation changes it, not when a timeout ends.
    @Test func aBackupsMountServesThePrimarysShardsReadOnlyAndFollowsThem() async throws {
        try await withPrimaryAndBackup(mountOptions: "client_id=c,entry_timeout=60,attr_timeout=60") { c in
            let s = "shard-\(c.shard)", d = "shard-\(c.doomed)"
            // The root lists the primary's shards once the first generation is in.
            #expect(try await waitUntil(10) {
                let names = try await c.sh("ls").stdout.split(separator: "\n")
                return names.contains(Substring(s)) && names.contains(Substring(d))
            })
            #expect(try await c.sh("ls \(s)").stdout == "a\nb\nbig\n")
            #expect(try await c.sh("cat \(s)/a").stdout == "alpha")
            #expect(try await c.sh("cat \(s)/b").stdout == "beta")
            #expect(try await c.sh("cmp \(s)/big '\(c.dir.sub("big.0"))'").status == 0)
            #expect(try await c.sh("cat \(d)/x").stdout == "gone soon")
            // Inode numbers as a local shard's (shard << 36 | entry number), read-only modes.
            let stat = try await c.sh("stat -c '%i %s %a' \(s)/a \(s)").stdout.split(separator: "\n").map { $0.split(separator: " ") }
            try #require(stat.count == 2)
            #expect(UInt64(stat[0][0]).map { $0 >> 36 } == c.shard && stat[0][1] == "5" && stat[0][2] == "444")
            #expect(UInt64(stat[1][0]) == c.shard << 36 && stat[1][2] == "555")
            #expect(try await c.sh("ls -l \(s)").status == 0)
            // Indexes as extended attributes, the owner of the shard.
            #expect(try await c.sh("getfattr --only-values -n user.color \(s)/b").stdout == "blue")
            #expect(try await c.errnoOf("print(os.listxattr('\(s)/b'))") == "['user.color']\nOK")
            #expect(try await c.sh("getfattr --only-values -n user.shardfs.owner \(s)").stdout == "c")
            #expect(try await c.sh("cp -r \(s) '\(c.dir.sub("copy"))' && diff -r \(s) '\(c.dir.sub("copy"))'").status == 0)
            #expect(try await c.sh("df .").status == 0)

            // Each node's metrics (over its admin socket): the backup's role, the
            // view generation it applied and how old it is; the primary's role.
            let volume = try #require(try FileManager.default.contentsOfDirectory(atPath: c.dir.sub("volumes")).first)
            func metrics(_ node: String) async throws -> String {
                let out = try await shell("curl -sS --max-time 30 --unix-socket '\(c.dir.sub(node))/shardfs-admin.sock' http://node/metrics")
                #expect(out.status == 0, "\(out.stderr)")
                return out.stdout
            }
            func sample(_ text: String, _ series: String) -> Double? {
                text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.dropFirst(series.count + 1)) }
            }
            let onBackup = try await metrics("node-b"), onPrimary = try await metrics("node-a")
            #expect(sample(onBackup, "shardfs_volume_primary{volume=\"\(volume)\"}") == 0, "\(onBackup)")
            #expect((sample(onBackup, "shardfs_view_generation{volume=\"\(volume)\"}") ?? 0) >= 1, "\(onBackup)")
            #expect(sample(onBackup, "shardfs_view_age_seconds{volume=\"\(volume)\"}").map { $0 >= 0 && $0 < 30 } == true, "\(onBackup)")
            #expect(sample(onBackup, "shardfs_promotions_total") ?? 0 == 0)
            #expect(sample(onPrimary, "shardfs_volume_primary{volume=\"\(volume)\"}") == 1, "\(onPrimary)")
            // On etcd: the lease's time left, and the calls made to etcd.
            for text in [onBackup, onPrimary] {
                #expect(sample(text, "shardfs_lease_seconds_left").map { $0 > 0 && $0 <= 30 } == true, "\(text)")
                #expect((sample(text, "shardfs_etcd_request_duration_seconds_count{path=\"/v3/kv/range\"}") ?? 0) > 0, "\(text)")
            }

            // Every change through the backup's mount is EROFS.
            let refused = [
                "open('\(s)/a', 'w')", "open('\(s)/a', 'a')", "os.open('\(s)/a', os.O_RDWR)", "open('\(s)/new', 'w')",
                "os.open('\(s)/new', os.O_CREAT | os.O_EXCL | os.O_WRONLY)", "os.unlink('\(s)/a')",
                "os.rename('\(s)/a', '\(s)/z')", "os.truncate('\(s)/a', 0)", "os.mkdir('\(s)/sub')", "os.rmdir('\(s)')",
                "os.setxattr('\(s)/a', 'user.k', b'v')", "os.removexattr('\(s)/b', 'user.color')",
                "os.chmod('\(s)/a', 0o600)", "os.chmod('\(s)', 0o555)", "os.utime('\(s)/a', (1, 1))", "os.utime('\(s)', (1, 1))",
            ]
            for call in refused { #expect(try await c.errnoOf(call) == "EROFS", "\(call)") }
            #expect(try await c.sh("echo x > \(s)/a").status != 0)
            #expect(try await c.sh("test -w \(s)/a || test -w \(s)").status != 0)
            #expect(try await c.sh("test -r \(s)/a && test -r \(s)").status == 0)
            #expect(try await c.sh("cat \(s)/a").stdout == "alpha")

            // Later writes on the primary show up within about 2 s: a new value,
            // a new entry looked up before (no negative entry is kept), a deletion.
            #expect(try await c.errnoOf("os.stat('\(s)/c')") == "ENOENT")
            #expect(try await c.errnoOf("os.stat('\(s)/b')") == "OK")  // its name and attributes are cached now
            // Measured from the put's return to the first open and read that shows it.
            let lag = try await c.primary("""
                import time
                c.put('c', \(c.shard), b'c', b'gamma'); c.delete('c', \(c.shard), b'b'); c.put('c', \(c.shard), b'a', b'alpha 2')
                start = time.time()
                while open(\(Self.pythonString(c.mnt + "/" + s + "/a")), 'rb').read() != b'alpha 2' and time.time() < start + 5:
                    time.sleep(0.005)
                print(time.time() - start)
                """)
            print("backup mount: a write on the primary seen after \(lag) s")
            #expect(Double(lag).map { $0 < 2 } == true)
            // The same generation holds the new entry and the deletion.
            #expect(try await c.sh("cat \(s)/c").stdout == "gamma")
            #expect(try await c.errnoOf("os.stat('\(s)/b')") == "ENOENT")
            #expect(try await c.sh("ls \(s)").stdout == "a\nbig\nc\n")

            // A descriptor held open reads a value rewritten (same size) on the primary.
            let held = try await c.primary("""
                import os, time
                fd = os.open(\(Self.pythonString(c.mnt + "/" + s + "/a")), os.O_RDONLY)
                assert os.pread(fd, 100, 0) == b"alpha 2"
                c.put("c", \(c.shard), b"a", b"ALPHA 3")
                start = time.time()
                while os.pread(fd, 100, 0) != b"ALPHA 3" and time.time() < start + 5:
                    time.sleep(0.01)
                print(os.pread(fd, 100, 0).decode(), time.time() - start)
                """).split(separator: " ")
            #expect(held.first == "ALPHA" && held.count == 3 && Double(held[2]).map { $0 < 2 } == true, "\(held)")

            // A shard deleted on the primary vanishes (its names were cached by the kernel).
            #expect(try await c.errnoOf("os.stat('\(d)'); os.stat('\(d)/x')") == "OK")
            try await c.primary("c.delete_shard(\"c\", \(c.doomed))")
            let deleted = Date()
            #expect(try await waitUntil(5) {
                let gone = try await c.errnoOf("os.stat('\(d)')"), names = try await c.sh("ls").stdout
                return gone == "ENOENT" && !names.contains(d)
            })
            #expect(Date().timeIntervalSince(deleted) < 3)
            #expect(try await c.errnoOf("open('\(d)/x').read()") == "ENOENT")
            #expect(try await c.sh("cat \(s)/a").stdout == "ALPHA 3")

            // A shard made on the primary appears, though its name was looked up before.
            #expect(try await c.errnoOf("os.stat('shard-1000')") == "ENOENT")
            try await c.primary("c.put('c', c.new_shard('c', 1000), b'n', b'new shard')")
            let made = Date()
            #expect(try await waitUntil(5) { try await c.sh("cat shard-1000/n").stdout == "new shard" })
            #expect(Date().timeIntervalSince(made) < 2)
        }
    }

    /// A backup that cannot renew its node lease (etcd is gone; a 5 s lease, as a
    /// loaded machine can stretch a 2 s one between keepalives) stops serving
    /// views: reads and listings fail with EIO rather than answer stale data.
    @Test func aBackupThatCannotConfirmItsLeaseAnswersEIO() async throws {
        try await withPrimaryAndBackup { c in
            let s = "shard-\(c.shard)"
            try #require(try await waitUntil(10) { try await c.sh("cat \(s)/a").stdout == "alpha" })
            await c.etcd.kill9()
            #expect(try await waitUntil(12) { try await c.errnoOf("open('\(s)/a').read()") == "EIO" })
            #expect(try await c.errnoOf("os.listdir('\(s)')") == "EIO")
            #expect(try await c.errnoOf("os.listdir('.')") == "EIO")
        }
    }

    /// The primary rewrites a 300 KB value (three 128 KiB chunks) while the
    /// backup reads it through its mount with O_DIRECT, 96 KiB per request
    /// (across chunk boundaries): each request's bytes are one committed version.
    @Test func aReadOfAViewNeverMixesTwoGenerations() async throws {
        try await withPrimaryAndBackup { c in
            let s = "shard-\(c.shard)"
            #expect(try await waitUntil(10) { try await c.sh("ls \(s)").stdout.contains("big") })
            let reader = c.dir.sub("reader.py")
            try """
                import sys, os, mmap, time
                sys.path.insert(0, \(Self.pythonString(c.dir.path)))
                from tools import *
                path, seconds = sys.argv[1], float(sys.argv[2])
                buf = mmap.mmap(-1, 96 * 1024)
                reads = wrong = 0
                seen = set()
                end = time.time() + seconds
                while time.time() < end:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    for offset in range(0, 300000, 96 * 1024):
                        n = os.preadv(fd, [buf], offset)
                        got = versions("big", bytes(buf[:n]), offset)
                        reads += 1
                        if got is None or len(got) != 1:
                            wrong += 1
                        else:
                            seen |= got
                    os.close(fd)
                print(reads, wrong, len(seen))
                """.write(toFile: reader, atomically: true, encoding: .utf8)
            let reading = Task { try await shell("python3 '\(reader)' '\(c.mnt)/\(s)/big' 4") }
            let rewrites = try await c.primary("""
                import time
                end = time.time() + 4
                v = 0
                while time.time() < end:
                    v += 1
                    c.put("c", \(c.shard), b"big", value("big", v, 300000))
                print(v)
                """)
            let result = try await reading.value
            #expect(result.status == 0, "\(result.stderr)")
            let figures = result.stdout.split(whereSeparator: \.isWhitespace).compactMap { Int($0) }
            try #require(figures.count == 3, "\(result.stdout)")
            print("backup mount: \(figures[0]) reads of 96 KiB during \(rewrites) rewrites, \(figures[1]) wrong or mixed, \(figures[2]) versions seen")
            #expect(figures[0] > 50)
            #expect(figures[1] == 0)
            #expect(figures[2] > 1)
        }
    }
}
