import Foundation
import TestSupport
import Testing

/// Without allow_other the kernel does not check modes (default_permissions is
/// off): the daemon refuses writes itself and answers access(2) from the modes.
@Suite struct PermissionTests {
    @Test func accessFollowsTheModesAndClosedShardsRefuseWrites() async throws {
        try await withMount { m in
            #expect(!(try await m.ok("grep ' \(m.mnt) ' /proc/mounts")).contains("default_permissions"))
            try await m.ok("mkdir shard-1 shard-2 && echo a > shard-1/f && echo b > shard-2/g && chmod a-w shard-2")
            let check = """
                import os
                print(os.access("shard-1/f", os.R_OK | os.W_OK), os.access("shard-1/f", os.X_OK),
                      os.access("shard-1", os.W_OK | os.X_OK), os.access("shard-1/missing", os.F_OK))
                """
            #expect(try await m.ok("python3 -c '\(check)'") == "True False True False\n")
            // A closed shard: the daemon says EROFS, as the table in docs/SEMANTICS.md does.
            #expect(try await m.errnoOf("open('shard-2/g', 'w')") == "EROFS")
            #expect(try await m.errnoOf("os.unlink('shard-2/g')") == "EROFS")
            #expect(try await m.errnoOf("open('shard-2/new', 'w')") == "EROFS")
            #expect(try await m.ok("cat shard-2/g") == "b\n")
        }
    }

    /// Write-only handles bypass the kernel's page cache, and with it the kernel's
    /// own clearing of set-ID bits on write: the daemon clears them instead. A
    /// writer that is not root loses set-user-ID, and set-group-ID when the file
    /// is group-executable (as on ext4); root keeps them.
    @Test func aWriteByAnotherUserClearsSetIDBits() async throws {
        try await withMount("client_id=tester,allow_other") { m in
            try await m.ok("mkdir shard-1 && for f in a b c; do echo 1 > shard-1/$f; done && chmod 6777 shard-1/a shard-1/c && chmod 6767 shard-1/b")
            // Opened by root, then written as nobody (the write request carries the writer).
            let script = """
                import os
                fds = [os.open("shard-1/" + f, os.O_WRONLY | os.O_APPEND) for f in "ab"]
                root = os.open("shard-1/c", os.O_WRONLY | os.O_APPEND)
                os.write(root, b"2\\n")
                os.setgroups([]); os.setgid(65534); os.setuid(65534)
                for fd in fds: os.write(fd, b"2\\n")
                for f in "abc": print(f, oct(os.stat("shard-1/" + f).st_mode & 0o7777))
                """
            #expect(try await m.python(script) == "a 0o777\nb 0o2767\nc 0o6777\n")
            // Stored so: the modes after a restart, and the data written.
            await m.unmount()
            try await m.mount()
            #expect(try await m.ok("stat -c %a shard-1/a shard-1/b shard-1/c && cat shard-1/a") == "777\n2767\n6777\n1\n2\n")
        }
    }

    /// Clearing the bits commits nothing of the write: a file rewritten (O_TRUNC)
    /// by another user and lost with the daemon before its close keeps its old
    /// value, with the bits cleared.
    @Test func clearingSetIDBitsCommitsNoHalfWrittenFile() async throws {
        try await withMount("client_id=tester,allow_other") { m in
            try await m.ok("mkdir shard-1 && printf old > shard-1/f && chmod 4777 shard-1/f")
            let pid = try #require(m.daemonPID)
            let script = """
                import os, signal, time
                fd = os.open("shard-1/f", os.O_WRONLY | os.O_TRUNC)
                os.seteuid(65534)
                os.write(fd, b"new")
                os.seteuid(0)
                print(oct(os.stat("shard-1/f").st_mode & 0o7777))
                time.sleep(0.3)  # past the moment deferred commits are made durable
                os.kill(\(pid), signal.SIGKILL)
                """
            #expect(try await m.python(script) == "0o777\n")
            try await m.remountAfterCrash(of: pid)
            #expect(try await m.ok("stat -c %a shard-1/f && cat shard-1/f") == "777\nold")
        }
    }
}
