import Foundation
import TestSupport
import Testing

/// Committed large files are read by the kernel itself (FUSE passthrough of
/// their value files; docs/SEMANTICS.md, "Large files read by the kernel").
@Suite struct PassthroughTests {
    /// READ requests the daemon was handed while `command` ran.
    static func readsDuring(_ m: MountFixture, _ command: String) async throws -> Int {
        let before = try await m.requestCounts()
        try await m.ok(command)
        let after = try await m.requestCounts()
        return after["read", default: 0] - before["read", default: 0]
    }

    /// A 24 MiB + 5 file (a value file once closed) and its source outside the mount.
    static func writeLargeFile(_ m: MountFixture, name: String = "big", seed: String = "src") async throws -> String {
        let source = m.dir.sub(seed)
        try await m.ok("mkdir -p shard-1 && head -c 25165829 /dev/urandom > '\(source)' && cp '\(source)' shard-1/\(name)")
        try await StagedWriteTests.dropCaches()
        return source
    }

    /// Whether a `cmp` of the mount's `big` against `source` is read without
    /// the daemon, within a few seconds: the daemon learns of the last
    /// `close()` of earlier descriptors a moment after it returns, and until
    /// then a new open names their backing file.
    static func readByTheKernel(_ m: MountFixture, _ source: String) async throws -> Bool {
        try await waitUntil(5) {
            // Each try reads cold: a try read through the daemon leaves the mount's page cache filled.
            try await StagedWriteTests.dropCaches()
            return try await readsDuring(m, "cmp '\(source)' shard-1/big") == 0
        }
    }

    @Test func aCommittedLargeFileIsReadWithoutTheDaemon() async throws {
        try await withMount { m in
            let source = try await Self.writeLargeFile(m)
            #expect(try await Self.readsDuring(m, "cmp '\(source)' shard-1/big") == 0)
            // Small files, and large ones with nopassthrough, are read by the daemon.
            try await m.ok("head -c 100000 /dev/urandom > shard-1/small")
            try await StagedWriteTests.dropCaches()
            #expect(try await Self.readsDuring(m, "cat shard-1/small > /dev/null") > 0)
        }
        try await withMount("client_id=tester,nopassthrough") { m in
            let source = try await Self.writeLargeFile(m)
            #expect(try await Self.readsDuring(m, "cmp '\(source)' shard-1/big") > 0)
        }
        // Without the rings, the same session hooks ask for passthrough at FUSE_INIT.
        try await withMount("client_id=tester,nouring") { m in
            let source = try await Self.writeLargeFile(m)
            #expect(try await Self.readsDuring(m, "cmp '\(source)' shard-1/big") == 0)
        }
    }

    /// A descriptor opened before a change reads the value it opened (the kernel
    /// reads that value file); opens after the change read the new value, by
    /// the daemon while the old descriptors stay open and by the kernel after.
    @Test func descriptorsOpenBeforeAChangeKeepTheirValue() async throws {
        try await withMount { m in
            let old = try await Self.writeLargeFile(m)
            let new = m.dir.sub("new")
            try await m.ok("head -c 20971520 /dev/urandom > '\(new)'")
            let out = try await m.python("""
                import mmap, os
                old = open("\(old)", "rb").read()
                new = open("\(new)", "rb").read()
                \(MountFixture.pythonHelpers)
                reader = os.open("shard-1/big", os.O_RDONLY)
                assert os.pread(reader, 4096, 0) == old[:4096]
                # A writer opens while the kernel reads the file for `reader`.
                writer = os.open("shard-1/big", os.O_WRONLY | os.O_TRUNC)
                os.write(writer, new)
                os.close(writer)
                assert os.stat("shard-1/big").st_size == len(new)
                assert whole(reader) == old, "the old descriptor reads the old value, whole"
                later = os.open("shard-1/big", os.O_RDONLY)
                assert whole(later) == new, "an open after the change reads the new value"
                # mmap goes to the file the kernel reads: the old value (SEMANTICS says so).
                mapped = mmap.mmap(later, 0, prot=mmap.PROT_READ)
                print("mapped old" if mapped[:4096] == old[:4096] else "mapped new")
                mapped.close()
                os.close(later)
                os.close(reader)
                """)
            #expect(out == "mapped old\n")
            try await StagedWriteTests.dropCaches()
            #expect(try await Self.readByTheKernel(m, new), "all closed: the new value file is read by the kernel")
        }
    }

    /// An unlinked (or replaced) large file stays readable through descriptors
    /// open on it; its value file leaves `values/` as before.
    @Test func anUnlinkedFileStaysReadableThroughItsDescriptors() async throws {
        try await withMount { m in
            let source = try await Self.writeLargeFile(m)
            #expect(try await StagedWriteTests.valueFiles(m).count == 1)
            let values = try await StagedWriteTests.shardPath(m) + "/values"
            try await m.python("""
                import os, time
                \(MountFixture.pythonHelpers)
                src = open("\(source)", "rb").read()
                fd = os.open("shard-1/big", os.O_RDONLY)
                os.unlink("shard-1/big")
                assert wait_empty("\(values)"), "the value file is removed"
                assert os.pread(fd, len(src) + 1, 0) == src
                os.close(fd)
                """)
        }
    }

    /// Handles that use the page cache and handles that name the backing file
    /// never meet on one inode (the kernel would fail the open): whichever comes
    /// first decides until the last handle of the file is released.
    @Test func cachedAndKernelReadHandlesDoNotMeet() async throws {
        try await withMount { m in
            let source = try await Self.writeLargeFile(m)
            try await m.python("""
                import errno, os
                src = open("\(source)", "rb").read()
                # A read-write handle first (through the page cache), then readers:
                # read by the daemon, no error.
                rw = os.open("shard-1/big", os.O_RDWR)
                readers = [os.open("shard-1/big", os.O_RDONLY) for _ in range(3)]
                os.close(rw)
                readers.append(os.open("shard-1/big", os.O_RDONLY))
                for fd in readers:
                    assert os.pread(fd, 1 << 20, 3 << 20) == src[3 << 20:4 << 20]
                    os.close(fd)
                """)
            #expect(try await Self.readByTheKernel(m, source))
        }
    }

    /// While the kernel reads a file for a descriptor, a read-write open is
    /// refused (ETXTBSY: the kernel would open the committed value file
    /// read-write for it); write-only opens work, and a reader opened while a
    /// writer holds uncommitted changes reads them, through the daemon.
    @Test func whileTheKernelReadsAFileWritersGoThroughTheDaemon() async throws {
        try await withMount { m in
            let source = try await Self.writeLargeFile(m)
            let out = try await m.python("""
                import errno, os
                src = open("\(source)", "rb").read()
                kernel = os.open("shard-1/big", os.O_RDONLY)
                assert os.pread(kernel, 10, 0) == src[:10]
                try:
                    os.open("shard-1/big", os.O_RDWR)
                    print("read-write opened")
                except OSError as e:
                    print(errno.errorcode[e.errno])
                writer = os.open("shard-1/big", os.O_WRONLY | os.O_CREAT, 0o644)
                os.pwrite(writer, b"uncommitted", 0)
                reader = os.open("shard-1/big", os.O_RDONLY)
                assert os.pread(reader, 11, 0) == b"uncommitted", "a new reader sees the writer's changes"
                assert os.pread(kernel, 11, 0) == src[:11], "the first reader keeps the value it opened"
                os.close(writer)
                os.close(reader)
                os.close(kernel)
                """)
            #expect(out == "ETXTBSY\n")
            let expected = m.dir.sub("expected")
            try await m.ok("{ printf uncommitted; tail -c +12 '\(source)'; } > '\(expected)' && cmp '\(expected)' shard-1/big")
            try await StagedWriteTests.dropCaches()
            #expect(try await Self.readByTheKernel(m, expected))
        }
    }
}
