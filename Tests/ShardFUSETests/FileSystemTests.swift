import Foundation
import ShardFUSE
import TestSupport
import Testing

/// Each test mounts ShardFS for real and drives it with the tools users run.
@Suite struct FileSystemTests {
    /// Write-only handles write around the page cache: a reader holding cached
    /// pages of the file, or a later open that keeps them, reads what they wrote
    /// (the kernel drops the written range first; why direct writes are used only
    /// on kernels of FUSE 7.42 and later).
    @Test func aReaderHoldingPagesSeesAWriteOnlyHandlesWrites() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            let script = """
                import os
                open("shard-1/c", "wb").write(b"a" * 8192)
                r = os.open("shard-1/c", os.O_RDONLY)
                os.pread(r, 8192, 0)  # its pages are cached now
                w = os.open("shard-1/c", os.O_WRONLY)
                os.pwrite(w, b"b" * 100, 10)
                print(os.pread(r, 20, 0).decode())
                os.close(w)
                os.close(r)
                w = os.open("shard-1/c", os.O_WRONLY)
                os.pwrite(w, b"c" * 5, 0)
                os.close(w)
                r = os.open("shard-1/c", os.O_RDONLY)  # pages kept across opens
                print(os.pread(r, 20, 0).decode())
                """
            #expect(try await m.python(script) == "aaaaaaaaaabbbbbbbbbb\ncccccaaaaabbbbbbbbbb\n")
        }
    }

    @Test func shardsAreDirectoriesAndEntriesAreFiles() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-7 && mkdir shard-9")
            #expect(try await m.ok("ls") == "shard-7\nshard-9\n")
            try await m.ok("printf 'hello world' > shard-7/greeting && cp /etc/hostname shard-7/host")
            #expect(try await m.ok("cat shard-7/greeting") == "hello world")
            try await m.ok("cmp /etc/hostname shard-7/host")
            let listing = try await m.ok("ls -l shard-7")
            #expect(listing.contains("-rw-r--r--") && listing.contains(" 11 ") && listing.contains("greeting"), "\(listing)")
            #expect(try await m.ok("stat -c '%s %F' shard-7/greeting") == "11 regular file\n")
            try await m.ok("touch -d '2001-02-03 04:05:06' shard-7/greeting")
            #expect(try await m.ok("stat -c %Y shard-7/greeting") == "\(981173106)\n")
            // df shows the shard's limit (2 GiB) and use.
            let df = try await m.ok("df -B1 --output=size shard-7 | tail -1")
            #expect(df.trimmingCharacters(in: .whitespacesAndNewlines) == String(2 << 30), "\(df)")
            try await m.ok("mv shard-7/greeting shard-7/renamed && rm shard-7/host")
            #expect(try await m.ok("ls shard-7") == "renamed\n")
            try await m.ok("rmdir shard-9")
            #expect(try await m.ok("ls") == "shard-7\n")
        }
    }

    @Test func overwriteAppendTruncateAndRandomWrites() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && cd shard-1 && echo one > f && echo two >> f")
            #expect(try await m.ok("cat shard-1/f") == "one\ntwo\n")
            try await m.ok("echo replaced > shard-1/f")
            #expect(try await m.ok("cat shard-1/f") == "replaced\n")
            try await m.ok("truncate -s 4 shard-1/f")
            #expect(try await m.ok("cat shard-1/f") == "repl")
            try await m.ok("truncate -s 6 shard-1/f")
            #expect(try await m.ok("od -An -c shard-1/f | tr -s ' '") == " r e p l \\0 \\0\n")
            // A write in the middle of an existing file keeps the rest.
            try await m.ok("printf 'XY' | dd of=shard-1/f bs=1 seek=1 conv=notrunc status=none")
            #expect(try await m.ok("head -c 4 shard-1/f") == "rXYl")
            try await m.ok("dd if=/dev/urandom of=/tmp/shardfs-dd-$$ bs=1M count=3 status=none && dd if=/tmp/shardfs-dd-$$ of=shard-1/dd bs=64K status=none && cmp /tmp/shardfs-dd-$$ shard-1/dd; rc=$?; rm -f /tmp/shardfs-dd-$$; exit $rc")
        }
    }

    @Test func indexesAreExtendedAttributes() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-3 && echo v > shard-3/e && setfattr -n user.topic -v logs shard-3/e")
            try await m.ok("setfattr -n user.level -v 3 shard-3/e")
            let dump = try await m.ok("getfattr -d --absolute-names shard-3/e")
            #expect(dump.contains("user.topic=\"logs\"") && dump.contains("user.level=\"3\""), "\(dump)")
            try await m.ok("setfattr -n user.topic -v metrics shard-3/e")
            #expect(try await m.ok("getfattr --only-values -n user.topic shard-3/e") == "metrics")
            try await m.ok("setfattr -x user.level shard-3/e")
            #expect(!(try await m.ok("getfattr -d shard-3/e")).contains("level"))
            // Rewriting the file keeps its indexes.
            try await m.ok("echo rewritten > shard-3/e")
            #expect(try await m.ok("getfattr --only-values -n user.topic shard-3/e") == "metrics")
            #expect(try await m.errnoOf("os.getxattr('shard-3/e', 'user.missing')") == "ENODATA")
            #expect(["EOPNOTSUPP", "ENOTSUP"].contains(try await m.errnoOf("os.setxattr('shard-3/e', 'trusted.x', b'1')")))
            #expect(try await m.errnoOf("os.removexattr('shard-3/e', 'user.missing')") == "ENODATA")
            await m.unmount()
            // The attribute is an index: the shard finds the entry by it.
            let found = try await runAsync(shardfs, ["find", "3", "topic=metrics", "--data-dir", m.data, "--log-level", "error"])
            #expect(found.stdout == "e\n", "\(found.stderr)")
            let old = try await runAsync(shardfs, ["find", "3", "topic=logs", "--data-dir", m.data, "--log-level", "error"])
            #expect(old.stdout == "")
        }
    }

    @Test func everyFailureHasItsErrno() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 shard-2 && echo x > shard-1/f && echo y > shard-2/g")
            #expect(try await m.errnoOf("os.mkdir('not-a-shard')") == "EINVAL")
            #expect(try await m.errnoOf("os.mkdir('shard-01')") == "EINVAL")
            #expect(try await m.errnoOf("os.mkdir('shard-1')") == "EEXIST")
            #expect(try await m.errnoOf("os.mkdir('shard-1/sub')") == "EPERM")
            #expect(try await m.errnoOf("os.symlink('f', 'shard-1/l')") == "EPERM")
            #expect(try await m.errnoOf("os.link('shard-1/f', 'shard-1/h')") == "EPERM")
            #expect(try await m.errnoOf("os.mknod('shard-1/p', 0o10644)") == "EPERM")
            #expect(try await m.errnoOf("os.chown('shard-1/f', 4242, -1)") == "EPERM")
            #expect(try await m.errnoOf("os.rename('shard-1/f', 'shard-2/f')") == "EXDEV")
            #expect(try await m.errnoOf("os.rename('shard-1', 'shard-3')") == "EPERM")
            #expect(try await m.errnoOf("open('top-level-file', 'w')") == "EPERM")
            #expect(try await m.errnoOf("os.unlink('shard-1/missing')") == "ENOENT")
            #expect(try await m.errnoOf("os.rmdir('shard-99')") == "ENOENT")
            #expect(try await m.errnoOf("open('shard-1/' + 'k' * 256, 'w')") == "ENAMETOOLONG")
            // A file renamed while open for writing commits under its new name
            // (logrotate); one unlinked while open does not come back at close.
            #expect(try await m.errnoOf("f = open('shard-1/log', 'w'); f.write('late'); os.rename('shard-1/log', 'shard-1/log.1'); f.close()") == "OK")
            #expect(try await m.ok("cat shard-1/log.1") == "late")
            #expect(try await m.errnoOf("os.stat('shard-1/log')") == "ENOENT")
            #expect(try await m.errnoOf("f = open('shard-1/gone', 'w'); f.write('x'); os.unlink('shard-1/gone'); f.close()") == "OK")
            #expect(try await m.errnoOf("os.stat('shard-1/gone')") == "ENOENT")
            // rename within a shard replaces its target atomically.
            try await m.ok("echo new > shard-1/a && mv shard-1/a shard-1/f")
            #expect(try await m.ok("cat shard-1/f") == "new\n")
        }
    }

    @Test func chmodAMinusWClosesAShardForever() async throws {
        try await withFixture { fixture in
            try await fixture.mount()
            try await fixture.ok("mkdir shard-4 && echo data > shard-4/f && chmod a-w shard-4")
            #expect(try await fixture.ok("stat -c %A shard-4") == "dr-xr-xr-x\n")
            #expect(try await fixture.ok("stat -c %A shard-4/f") == "-r--r--r--\n")
            #expect(try await fixture.errnoOf("open('shard-4/new', 'w')") == "EROFS")
            #expect(try await fixture.errnoOf("os.unlink('shard-4/f')") == "EROFS")
            #expect(try await fixture.errnoOf("os.chmod('shard-4', 0o755)") == "EPERM")
            #expect(try await fixture.ok("cat shard-4/f") == "data\n")
            await fixture.unmount()
            // Closed across a remount.
            try await fixture.mount()
            #expect(try await fixture.errnoOf("open('shard-4/f', 'a')") == "EROFS")
            // rmdir deletes a closed shard with its entries.
            try await fixture.ok("rmdir shard-4")
            #expect(try await fixture.ok("ls") == "")
        }
    }

    @Test func aMountWritesOnlyShardsItsClientOwns() async throws {
        try await withFixture("client_id=alice") { fixture in
            try await fixture.mount()
            try await fixture.ok("mkdir shard-5 && echo a > shard-5/f")
            await fixture.unmount()
            try await fixture.mount("client_id=bob")
            #expect(try await fixture.ok("cat shard-5/f") == "a\n")
            #expect(try await fixture.errnoOf("open('shard-5/g', 'w')") == "EACCES")
            #expect(try await fixture.errnoOf("os.unlink('shard-5/f')") == "EACCES")
            // Closing and deleting are the owner's too.
            #expect(try await fixture.errnoOf("os.chmod('shard-5', 0o555)") == "EACCES")
            #expect(try await fixture.errnoOf("os.rmdir('shard-5')") == "EACCES")
            #expect(try await fixture.ok("cat shard-5/f") == "a\n")
        }
    }

    @Test func uidGidAndUmaskOptionsSetWhatTheMountShows() async throws {
        try await withMount("client_id=tester,uid=1234,gid=2345,umask=027") { m in
            try await m.ok("mkdir shard-3 && echo a > shard-3/f && echo b > shard-3/g && chmod 604 shard-3/g")
            #expect(try await m.ok("stat -c '%u %g %a' shard-3 shard-3/f shard-3/g .") == "1234 2345 750\n1234 2345 640\n1234 2345 604\n1234 2345 750\n")
        }
        var options = MountOptions()
        #expect(throws: (any Error).self) { try options.apply("umask=99") }
        #expect(throws: (any Error).self) { try options.apply("uid=alice") }
    }

    @Test func readOnlyMountRefusesEveryChange() async throws {
        try await withFixture { fixture in
            try await fixture.mount()
            try await fixture.ok("mkdir shard-6 && echo a > shard-6/f")
            await fixture.unmount()
            try await fixture.mount("ro")
            #expect(try await fixture.ok("cat shard-6/f") == "a\n")
            for call in ["open('shard-6/g', 'w')", "open('shard-6/f', 'a')", "os.unlink('shard-6/f')", "os.mkdir('shard-8')",
                         "os.rmdir('shard-6')", "os.rename('shard-6/f', 'shard-6/h')", "os.setxattr('shard-6/f', 'user.x', b'1')",
                         "os.truncate('shard-6/f', 0)"] {
                #expect(try await fixture.errnoOf(call) == "EROFS", "\(call)")
            }
        }
    }

    @Test func rsyncTarFindAndDuWorkBothWays() async throws {
        try await withMount { m in
            let source = m.dir.sub("source"), back = m.dir.sub("back")
            _ = try await shell("""
                mkdir -p \(source) && cd \(source) && for i in $(seq 1 40); do head -c $((i * 997)) /dev/urandom > file$i; done \
                && touch -d '2020-01-01' file1
                """)
            try await m.ok("mkdir shard-1 shard-2")
            try await m.ok("rsync -a \(source)/ shard-1/")
            try await m.ok("diff -r \(source) shard-1")
            #expect(try await m.ok("stat -c %Y shard-1/file1") == "\(1577836800)\n")
            try await m.ok("rsync -a shard-1/ \(back)/ && diff -r \(source) \(back)")
            // A second rsync finds nothing to do (sizes and times match).
            #expect(try await m.ok("rsync -ai shard-1/ \(back)/") == "")
            try await m.ok("tar -C \(source) -cf - . | tar -C shard-2 -xf -")
            try await m.ok("diff -r \(source) shard-2")
            try await m.ok("tar -C shard-2 -cf \(m.dir.sub("out.tar")) . && mkdir \(m.dir.sub("untar")) && tar -C \(m.dir.sub("untar")) -xf \(m.dir.sub("out.tar")) && diff -r \(source) \(m.dir.sub("untar"))")
            #expect(try await m.ok("find . -type f | wc -l") == "80\n")
            #expect(try await m.ok("find shard-1 -name 'file1*' | sort | head -2") == "shard-1/file1\nshard-1/file10\n")
            let du = Int(try await m.ok("du -sk shard-1 | cut -f1").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            #expect(du >= 40 * 41 / 2 * 997 / 1024 - 40, "du says \(du) KiB")
        }
    }

    @Test func parallelReadersAndWritersOnOneShard() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            try await m.ok("""
                for w in $(seq 1 8); do ( for i in $(seq 1 25); do printf "writer $w item $i" > shard-1/w$w-$i; done ) & done; wait
                """)
            #expect(try await m.ok("ls shard-1 | wc -l") == "200\n")
            try await m.ok("""
                fail=0; for r in $(seq 1 8); do ( for i in $(seq 1 25); do [ "$(cat shard-1/w$r-$i)" = "writer $r item $i" ] || exit 1; done ) & done; \
                for job in $(jobs -p); do wait $job || fail=1; done; exit $fail
                """)
        }
    }

    @Test func killDashNineLosesNoClosedFileAndRemountWorks() async throws {
        try await withFixture { fixture in
            try await fixture.mount()
            try await fixture.ok("mkdir shard-1 && for i in $(seq 1 50); do echo value-$i > shard-1/e$i; done && sync shard-1/e50")
            guard let pid = fixture.daemonPID else { throw FixtureError("no daemon pid") }
            kill(pid, SIGKILL)
            try await fixture.remountAfterCrash(of: pid)
            for i in [1, 25, 50] { #expect(try await fixture.ok("cat shard-1/e\(i)") == "value-\(i)\n") }
            #expect(try await fixture.ok("ls shard-1 | wc -l") == "50\n")
        }
    }

    /// fsync(2) of a shard's directory is its durability barrier: every file
    /// closed before it survives a `kill -9` right after (closes only defer
    /// their durability by milliseconds, so the kill must follow at once).
    @Test func fsyncOfAShardDirectoryMakesItsClosedFilesDurable() async throws {
        try await withFixture { fixture in
            try await fixture.mount()
            guard let pid = fixture.daemonPID else { throw FixtureError("no daemon pid") }
            // The request reaches the daemon (the kernel does not answer it itself).
            let requests = try await fixture.ok("""
                mkdir shard-1 && for i in $(seq 1 200); do echo value-$i > shard-1/e$i; done && \
                python3 -c 'import os; fd = os.open("shard-1", os.O_RDONLY); os.fsync(fd)' && \
                getfattr --only-values -n user.shardfs.requests . && kill -9 \(pid)
                """)
            #expect(requests.contains("fsyncdir 1"), "\(requests)")
            try await fixture.remountAfterCrash(of: pid)
            #expect(try await fixture.ok("ls shard-1 | wc -l") == "200\n")
            for i in [1, 100, 200] { #expect(try await fixture.ok("cat shard-1/e\(i)") == "value-\(i)\n") }
        }
    }

    /// fsync of a shard directory whose shard this node no longer serves (here:
    /// removed while the directory was open) cannot promise anything: EIO.
    @Test func fsyncOfADirectoryWhoseShardIsGoneFailsWithEIO() async throws {
        try await withMount { m in
            let result = try await m.ok("""
                mkdir shard-1 && echo x > shard-1/a && python3 -c '
                import errno, os
                fd = os.open("shard-1", os.O_RDONLY)
                os.fsync(fd)
                os.system("rmdir shard-1")
                try:
                    os.fsync(fd)
                    print("no error")
                except OSError as e:
                    print(errno.errorcode[e.errno])
                '
                """)
            #expect(result == "EIO\n")
        }
    }

    /// A folder of 100 small files `f1`…`f100`, some with their own modes and times.
    static func filesWithModesAndTimes(_ fixture: MountFixture) async throws -> TemporaryDirectory {
        let source = try TemporaryDirectory("tool-source")
        try await fixture.ok("""
            cd '\(source.path)' && for i in $(seq 1 100); do echo value-$i > f$i; done && \
            chmod 0640 f1 f50 && chmod 0755 f2 && chmod 0600 f100 && touch -d '2001-02-03 04:05:06' f1 f2 f99
            """)
        return source
    }

    /// `tar x` sets each file's mode and time after writing it; those changes
    /// are logged like closes (durable at the directory's fsync), so what tar
    /// extracted compares equal after a `kill -9` and a remount.
    @Test func modesAndTimesTarSetSurviveKillDashNineAfterFsyncOfTheDirectory() async throws {
        try await withFixture { fixture in
            try await fixture.mount()
            guard let pid = fixture.daemonPID else { throw FixtureError("no daemon pid") }
            let source = try await Self.filesWithModesAndTimes(fixture)
            defer { source.remove() }
            try await fixture.ok("cd '\(source.path)' && tar cf archive.tar f*")
            try await fixture.ok("""
                mkdir shard-1 && tar xf '\(source.path)/archive.tar' -C shard-1 && tar df '\(source.path)/archive.tar' -C shard-1 && \
                python3 -c 'import os; fd = os.open("shard-1", os.O_RDONLY); os.fsync(fd)' && kill -9 \(pid)
                """)
            try await fixture.remountAfterCrash(of: pid)
            // tar d compares each file's mode, time, size and bytes.
            try await fixture.ok("tar df '\(source.path)/archive.tar' -C shard-1")
            #expect(try await fixture.ok("stat -c '%a %Y' shard-1/f1 shard-1/f2 shard-1/f100") == "640 981173106\n755 981173106\n600 \(try await fixture.ok("stat -c %Y '\(source.path)/f100'"))")
        }
    }

    /// `rsync -a` writes each file under a temporary name, sets its mode and
    /// time, and renames it: all logged like closes. A second rsync finds
    /// nothing to do, before and after a `kill -9` that follows an fsync of the
    /// directory; replaced files keep their inode number across the rename.
    /// (Directory times are left out: those the mount moves are not kept across
    /// a crash, see SEMANTICS.md "Times".)
    @Test func rsyncOfAFolderSurvivesKillDashNineAfterFsyncOfTheDirectory() async throws {
        try await withFixture { fixture in
            try await fixture.mount()
            guard let pid = fixture.daemonPID else { throw FixtureError("no daemon pid") }
            let source = try await Self.filesWithModesAndTimes(fixture)
            defer { source.remove() }
            // Two passes: the second replaces files that changed (rename over an existing entry).
            try await fixture.ok("mkdir shard-1 && rsync -a '\(source.path)/' shard-1/")
            try await fixture.ok("cd '\(source.path)' && echo changed > f3 && touch -d '2002-01-01' f3")
            try await fixture.ok("rsync -a '\(source.path)/' shard-1/")
            let inode = try await fixture.ok("stat -c %i shard-1/f3")
            let unchanged = try await fixture.ok("rsync -ai --dry-run --omit-dir-times '\(source.path)/' shard-1/")
            #expect(unchanged.isEmpty, "rsync would still change: \(unchanged)")
            try await fixture.ok("""
                python3 -c 'import os; fd = os.open("shard-1", os.O_RDONLY); os.fsync(fd)' && kill -9 \(pid)
                """)
            try await fixture.remountAfterCrash(of: pid)
            let after = try await fixture.ok("rsync -ai --dry-run --omit-dir-times '\(source.path)/' shard-1/")
            #expect(after.isEmpty, "after the crash rsync would change: \(after)")
            #expect(try await fixture.ok("ls -a shard-1 | grep -c '^\\.f' || true") == "0\n")  // no temporary names left
            #expect(try await fixture.ok("stat -c %i shard-1/f3") == inode)
            #expect(try await fixture.ok("cat shard-1/f3") == "changed\n")
        }
    }

    @Test func aFullShardFailsCloseWithENOSPCAndStaysUsable() async throws {
        try await withFixture { fixture in
            try await fixture.mount(try fixture.sizeLimitOption("1MiB"))
            try await fixture.ok("mkdir shard-1 && echo small > shard-1/ok")
            let result = try await fixture.sh("head -c 3000000 /dev/zero > shard-1/big")
            #expect(result.status != 0 && result.stderr.contains("No space left on device"), "\(result.stderr)")
            #expect(try await fixture.ok("cat shard-1/ok") == "small\n")
            try await fixture.ok("echo still-writable > shard-1/next")
            #expect(try await fixture.ok("cat shard-1/next") == "still-writable\n")
        }
    }

    /// Filling a small shard with queued closes: every file whose close()
    /// succeeded is there after a remount (the room check before queueing must
    /// never let a queued put fail), and the first refusal is ENOSPC.
    @Test func everyClosedFileSurvivesFillingTheShard() async throws {
        try await withFixture { fixture in
            let limited = try fixture.sizeLimitOption("1MiB")
            try await fixture.mount(limited)
            try await fixture.ok("mkdir shard-1")
            let script = """
            import errno, os
            ok = []
            for i in range(100):
                try:
                    with open("shard-1/f%03d" % i, "wb") as f:
                        f.write(bytes([i]) * 100_000)
                    ok.append(i)
                except OSError as e:
                    print("refused", i, errno.errorcode[e.errno])
                    break
            print(" ".join(map(str, ok)))
            """
            let out = try await fixture.ok("python3 -c '\(script)'")
            #expect(out.contains("refused") && out.contains("ENOSPC"), "\(out)")
            let written = out.split(separator: "\n").last!.split(separator: " ").compactMap { Int($0) }
            #expect(written.count > 3)
            _ = try await shell("fusermount3 -u '\(fixture.mnt)' || fusermount3 -uz '\(fixture.mnt)'")
            try await fixture.mount(limited)
            for i in written {
                #expect(try await fixture.ok("stat -c %s shard-1/f" + String(format: "%03d", i)) == "100000\n", "file \(i)")
            }
        }
    }

    /// A 1 GiB file through the mount: written, read back with cmp, and the
    /// daemon's own (anonymous) memory sampled throughout stays under 160 MiB.
    /// Past 8 MiB a file written in order is staged 16 MiB per transaction;
    /// reads copy one request's bytes. (The shard's mapped pages are page cache.)
    @Test func aOneGiBFileKeepsTheDaemonsMemoryBounded() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            guard let pid = m.daemonPID else { throw FixtureError("no daemon pid") }
            let big = m.dir.sub("big")
            try await m.ok("head -c 1073741824 /dev/urandom > \(big)")
            // Sample the daemon's anonymous memory while the file goes in and out.
            let sampler = Task {
                var peak = 0
                while !Task.isCancelled {
                    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
                    for line in status.split(separator: "\n") where line.hasPrefix("RssAnon:") {
                        peak = max(peak, Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0)
                    }
                    try? await Task.sleep(for: .milliseconds(50))
                }
                return peak
            }
            try await m.ok("cp \(big) shard-1/big && cmp \(big) shard-1/big")
            sampler.cancel()
            let peak = await sampler.value
            #expect(try await m.ok("stat -c %s shard-1/big") == "1073741824\n")
            #expect(peak > 0 && peak < 160 * 1024, "peak anonymous memory \(peak) KiB")
            try await m.ok("rm \(big)")
        }
    }
}

/// The ways mount(8) starts ShardFS: the helper script and mount.fuse3.
@Suite struct MountHelperTests {
    static var repository: String {
        var url = URL(fileURLWithPath: #filePath)
        while url.path != "/" && !FileManager.default.fileExists(atPath: url.appendingPathComponent("mount-helpers").path) {
            url.deleteLastPathComponent()
        }
        return url.path
    }

    func check(_ fixture: MountFixture, start: String) async throws {
        let result = try await shell(start, environment: ["SHARDFS_BIN": shardfs,
                                                          "PATH": productsDirectory().path + ":/usr/sbin:/usr/bin:/sbin:/bin"])
        #expect(result.status == 0, "\(start): \(result.stderr)")
        #expect(fixture.isMounted)
        try await fixture.ok("mkdir shard-2 && echo ok > shard-2/f && cat shard-2/f")
        #expect(try await fixture.errnoOf("open('shard-2/g', 'w')") == "OK")
    }

    @Test func theHelperAcceptsMountsArgvAndGenericOptions() async throws {
        try await withFixture("") { fixture in
            try await check(fixture, start: "\(Self.repository)/mount-helpers/mount.shardfs \(fixture.data) \(fixture.mnt) -n -o rw,_netdev,nofail,dev,suid,defaults,client_id=app")
        }
    }

    @Test func mountFuse3RunsShardfsWithTheBareForm() async throws {
        try await withFixture("") { fixture in
            // What `mount -t fuse.shardfs` and fstab do without our helper installed.
            try await check(fixture, start: "mount.fuse3 \(fixture.data) \(fixture.mnt) -t shardfs -o client_id=app,_netdev,nofail")
        }
    }

    @Test func aReadOnlyHelperMountRefusesWrites() async throws {
        try await withFixture("") { fixture in
            _ = try await shell("mkdir -p \(fixture.data)")
            let result = try await shell("\(Self.repository)/mount-helpers/mount.shardfs \(fixture.data) \(fixture.mnt) -r -o client_id=app",
                                         environment: ["SHARDFS_BIN": shardfs])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(try await fixture.errnoOf("os.mkdir('shard-1')") == "EROFS")
            #expect(try await fixture.errnoOf("open('top', 'w')") == "EROFS")
        }
    }
}

@Suite struct LargeListingTests {
    /// 100,000 entries: `ls -l` lists them all, paged from a cursor with
    /// readdirplus, and the daemon's own memory does not grow with the listing.
    @Test func lsOfAHundredThousandEntries() async throws {
        try await withFixture { fixture in
            // Fill the shard through the engine before mounting (fast), then list through the mount.
            let created = try await runAsync(shardfs, ["shard", "new", "--client", "tester", "--data-dir", fixture.data, "--log-level", "error"])
            #expect(created.stdout == "1\n", "\(created.stderr)")
            let filled = try await shell("seq 1 100000 | awk '{print \"entry-\" $1 \"\\tvalue \" $1}' | '\(shardfs)' batch-put 1 --client tester --batch 5000 --data-dir '\(fixture.data)' --log-level error | grep -vc '^ok '")
            #expect(filled.stdout == "0\n", "\(filled.stderr)")
            try await fixture.mount()
            guard let pid = fixture.daemonPID else { throw FixtureError("no daemon pid") }
            func anonymousKiB() -> Int {
                let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
                return status.split(separator: "\n").first { $0.hasPrefix("RssAnon:") }
                    .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) } ?? 0
            }
            #expect(try await fixture.ok("ls shard-1 | head -3") == "entry-1\nentry-10\nentry-100\n")
            let before = anonymousKiB()
            #expect(try await fixture.ok("ls -l shard-1 | grep -c '^-rw-r--r--'") == "100000\n")
            #expect(try await fixture.ok("ls -l shard-1 | tail -1 | awk '{print $5, $9}'") == "11 entry-99999\n")
            let after = anonymousKiB()
            // Inodes of listed entries stay until the kernel forgets them (a few
            // hundred bytes each); the listing itself is paged.
            #expect(after - before < 64 * 1024, "anonymous memory grew from \(before) to \(after) KiB")
        }
    }
}
