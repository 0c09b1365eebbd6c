import Foundation
import ShardStore
import TestSupport
import Testing

/// Large files go to a value file of the shard as the data arrives, and close()
/// syncs it and names it in the entry's record (docs/SEMANTICS.md, "Large files
/// and memory").
@Suite struct StagedWriteTests {
    /// The one shard's directory under the node's data folder (`shard-1`).
    static func shardPath(_ fixture: MountFixture) async throws -> String {
        let found = try await shell("find '\(fixture.data)' -type d -name shard-1 | head -1").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        guard !found.isEmpty else { throw FixtureError("no shard-1 under \(fixture.data)") }
        return found
    }

    /// Chunk sets listed as staging in shard-1, seen through a read-only view
    /// (which removes nothing).
    static func stagedSets(_ fixture: MountFixture) async throws -> [UInt64] {
        var options = ShardOptions()
        options.readOnly = true
        let shard = try Shard.open(at: try await shardPath(fixture), options: options)
        return try shard.stagedSets()
    }

    /// The files in the shard's `values/` folder (large values being written or kept).
    static func valueFiles(_ fixture: MountFixture) async throws -> [String] {
        (try? FileManager.default.contentsOfDirectory(atPath: try await shardPath(fixture) + "/values")) ?? []
    }

    /// Reads must come from the daemon, not from pages the writes left cached.
    static func dropCaches() async throws { _ = try await shell("sync; echo 3 > /proc/sys/vm/drop_caches") }

    @Test func aLargeSequentialFileReadsBackByteIdentical() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && head -c 50331651 /dev/urandom > '\(m.dir.sub("src"))'")  // 48 MiB + 3
            try await m.ok("dd if='\(m.dir.sub("src"))' of=shard-1/big bs=1M status=none")
            try await Self.dropCaches()
            try await m.ok("cmp '\(m.dir.sub("src"))' shard-1/big")
            #expect(try await m.ok("stat -c %s shard-1/big") == "50331651\n")
            // Rewriting it (dd without truncating, then shorter with truncating) and
            // reading it back while the writer still has it open.
            try await m.ok("""
                python3 -c '
                import os
                src = open("\(m.dir.sub("src"))", "rb").read()
                fd = os.open("shard-1/big", os.O_RDWR | os.O_TRUNC)
                for i in range(0, 40 << 20, 1 << 20): os.write(fd, src[i:i + (1 << 20)])
                assert os.pread(fd, 3 << 20, 1 << 20) == src[1 << 20:4 << 20]
                assert os.pread(fd, 2 << 20, 39 << 20) == src[39 << 20:40 << 20]
                os.ftruncate(fd, 36 << 20)
                os.close(fd)
                '
                """)
            try await Self.dropCaches()
            try await m.ok("head -c 37748736 '\(m.dir.sub("src"))' | cmp - shard-1/big")
        }
    }

    @Test func aLargeFileCutBackUnderTheThresholdBeforeCloseIsAnOrdinaryValue() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && head -c 12582912 /dev/urandom > '\(m.dir.sub("src"))'")  // 12 MiB
            // Past 8 MiB the bytes went to a value file; cut to 3 MiB + 5 before the
            // close, the value is put into LMDB from it, and the file goes.
            try await m.ok("""
                python3 -c '
                import os
                src = open("\(m.dir.sub("src"))", "rb").read()
                fd = os.open("shard-1/cut", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, src)
                os.ftruncate(fd, (3 << 20) + 5)
                os.close(fd)
                '
                """)
            #expect(try await waitUntil(10) { try await Self.valueFiles(m) == [] })
            try await Self.dropCaches()
            try await m.ok("head -c 3145733 '\(m.dir.sub("src"))' | cmp - shard-1/cut")
            #expect(try await m.ok("stat -c %s shard-1/cut") == "3145733\n")
        }
    }

    /// A committed large file unlinked while open stays readable through its
    /// descriptors whatever its size (past the 64 MiB copied for other values):
    /// its value file is kept open, and copied only when written. Read through
    /// the daemon (`nopassthrough`; the kernel's reads are PassthroughTests').
    @Test func anUnlinkedLargeFileStaysReadableWhateverItsSize() async throws {
        try await withMount("client_id=tester,nopassthrough") { m in
            let source = m.dir.sub("src")
            try await m.ok("mkdir shard-1 && head -c 71303173 /dev/urandom > '\(source)' && cp '\(source)' shard-1/big")  // 68 MiB + 5
            let values = try await Self.shardPath(m) + "/values"
            try await m.python("""
                import os, time
                src = open("\(source)", "rb").read()
                \(MountFixture.pythonHelpers)
                reader = os.open("shard-1/big", os.O_RDONLY)
                writer = os.open("shard-1/big", os.O_RDWR)
                os.unlink("shard-1/big")
                assert wait_empty("\(values)"), "the value file left the shard"
                assert os.fstat(reader).st_nlink == 0 and os.fstat(reader).st_size == len(src)
                assert whole(reader) == src, "read whole after the unlink"
                os.pwrite(writer, b"changed", 60 << 20)
                open("/proc/sys/vm/drop_caches", "w").write("3")  # read from the daemon, not the pages the write updated
                expected = src[:60 << 20] + b"changed" + src[(60 << 20) + 7:]
                assert whole(reader) == expected, "a write to the unlinked file is seen by its descriptors"
                os.close(writer)
                os.close(reader)
                assert not os.path.exists("shard-1/big")
                # Truncating a kept value copies only what it keeps: into memory up to
                # 8 MiB, into a spill file past that.
                for name, cut in (("small", (3 << 20) + 1), ("large", (12 << 20) + 1)):
                    with open("shard-1/" + name, "wb") as f: f.write(src)
                    reader = os.open("shard-1/" + name, os.O_RDONLY)
                    writer = os.open("shard-1/" + name, os.O_RDWR)
                    os.unlink("shard-1/" + name)
                    os.ftruncate(writer, cut)
                    os.pwrite(writer, b"end", cut)
                    open("/proc/sys/vm/drop_caches", "w").write("3")
                    assert os.fstat(reader).st_size == cut + 3, name
                    assert whole(reader) == src[:cut] + b"end", name
                    os.close(writer)
                    os.close(reader)
                """)
        }
    }

    @Test func aLargeWriteThatSeeksBackIsStillCorrect() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && head -c 62914560 /dev/urandom > '\(m.dir.sub("src"))'")  // 60 MiB
            try await m.ok("""
                python3 -c '
                import os
                src = bytearray(open("\(m.dir.sub("src"))", "rb").read())
                fd = os.open("shard-1/patched", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                for i in range(0, 40 << 20, 1 << 20): os.pwrite(fd, src[i:i + (1 << 20)], i)
                os.pwrite(fd, b"header!" * 1000, 4096)   # back into what is staged already
                for i in range(40 << 20, 60 << 20, 1 << 20): os.pwrite(fd, src[i:i + (1 << 20)], i)
                os.close(fd)
                src[4096:4096 + 7000] = b"header!" * 1000
                open("\(m.dir.sub("expected"))", "wb").write(src)
                '
                """)
            try await Self.dropCaches()
            try await m.ok("cmp '\(m.dir.sub("expected"))' shard-1/patched")
        }
    }

    @Test func aLargeWriteOverTheLimitFailsWithENOSPCAndLeavesNothingStaged() async throws {
        let unmounted = try await withFixture { fixture in
            try await fixture.mount(try fixture.sizeLimitOption("24MiB"))
            try await fixture.ok("mkdir shard-1 && echo small > shard-1/ok")
            let result = try await fixture.sh("dd if=/dev/zero of=shard-1/big bs=1M count=40 status=none")
            #expect(result.status != 0 && result.stderr.contains("No space left on device"), "\(result.stderr)")
            #expect(try await fixture.ok("cat shard-1/ok") == "small\n")
            // The failed value's file goes once its last handle is released (FUSE releases after close returns).
            #expect(try await waitUntil(10) { try await Self.valueFiles(fixture) == [] })
            // The space the failed value took is free again: a 12 MiB file fits.
            try await fixture.ok("head -c 12582912 /dev/urandom > '\(fixture.dir.sub("mid"))' && cp '\(fixture.dir.sub("mid"))' shard-1/mid")
            try await Self.dropCaches()
            try await fixture.ok("cmp '\(fixture.dir.sub("mid"))' shard-1/mid")
            #expect(try await Self.stagedSets(fixture) == [])
            #expect(try await Self.valueFiles(fixture).count == 1)  // mid's
        }
        // Nothing of the big value was committed (dd's first close, after its
        // dup2, commits the created file empty, as on any filesystem).
        var options = ShardOptions()
        options.readOnly = true
        let shard = try Shard.open(at: try await Self.shardPath(unmounted), options: options)
        #expect(try shard.attributes(try EntryKey(Array("big".utf8)))?.size ?? 0 == 0)
        #expect(try shard.get(try EntryKey(Array("ok".utf8))).value == Array("small\n".utf8))
    }

    @Test func killDashNineMidLargeWriteLeavesTheOldValueAndNoStaging() async throws {
        let fixture = try MountFixture(options: "client_id=tester")
        var writer: Process?
        do {
            try await fixture.mount()
            try await fixture.ok("mkdir shard-1 && echo old-value > shard-1/big && sync shard-1/big")
            // A writer that stages 40 MiB, then waits with the file open.
            let started = fixture.dir.sub("started")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            process.arguments = ["-c", """
                import os, time
                fd = os.open("\(fixture.mnt)/shard-1/big", os.O_WRONLY | os.O_TRUNC)
                chunk = os.urandom(1 << 20)
                for i in range(40): os.write(fd, chunk)
                open("\(started)", "w").close()
                time.sleep(30)
                """]
            try process.run()
            writer = process
            for _ in 0..<600 where !FileManager.default.fileExists(atPath: started) {
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(FileManager.default.fileExists(atPath: started))
            guard let pid = fixture.daemonPID else { throw FixtureError("no daemon pid") }
            kill(pid, SIGKILL)
            for _ in 0..<100 where kill(pid, 0) == 0 { try await Task.sleep(for: .milliseconds(20)) }
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            writer = nil
            _ = try await shell("fusermount3 -u '\(fixture.mnt)' || fusermount3 -uz '\(fixture.mnt)'")
            // The value file being written is still there (the data went to disk as it came)…
            #expect(try await Self.valueFiles(fixture).count == 1)
            // …and opening the shard removes it; the entry keeps its old value.
            try await fixture.mount()
            #expect(try await fixture.ok("cat shard-1/big") == "old-value\n")
            await fixture.unmount()
            #expect(try await Self.valueFiles(fixture) == [])
            #expect(try await Self.stagedSets(fixture) == [])
        } catch {
            if let writer, writer.isRunning { kill(writer.processIdentifier, SIGKILL) }
            await fixture.unmount()
            throw error
        }
        await fixture.unmount()
        #expect(!fixture.isMounted)
    }
}
