import Foundation
import TestSupport
import Testing

/// Behaviours tools rely on from a local filesystem (issue: shared writers,
/// xattrs on open files, stable inodes, modes and times). docs/SEMANTICS.md.
@Suite struct LocalSemanticsTests {
    @Test func concurrentAppendersFromSeveralProcessesLoseNothing() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            try await m.ok("""
                cd shard-1
                for p in 1 2 3 4; do
                  ( for i in $(seq 1 500); do echo "p$p line $i" >> log; done ) &
                done
                wait
                """)
            #expect(try await m.ok("wc -l < shard-1/log") == "2000\n")
            #expect(try await m.ok("tr -cd '\\000' < shard-1/log | wc -c") == "0\n")
            // Each writer's lines are all there, whole and in its own order.
            for p in 1...4 {
                let mine = try await m.ok("grep -x 'p\(p) line [0-9]*' shard-1/log | cut -d' ' -f3 | tr '\\n' ' '")
                #expect(mine == (1...500).map(String.init).joined(separator: " ") + " ", "writer \(p)")
            }
            // And committed: the shard holds the same after a remount.
            let before = try await m.ok("md5sum < shard-1/log")
            await m.unmount()
            try await m.mount()
            #expect(try await m.ok("md5sum < shard-1/log") == before)
        }
    }

    @Test func twoAppendingHandlesShareOneFile() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && printf 'base\\n' > shard-1/log && cp shard-1/log shard-1/log2")
            let out = try await m.python("""
                import os
                def app(path): return os.open(path, os.O_WRONLY | os.O_APPEND)
                def cat(path):
                    with open(path, 'rb') as f: return f.read()
                # A appends, B appends and closes, then A closes.
                a = app('shard-1/log'); os.write(a, b'A1\\n')
                b = app('shard-1/log'); os.write(b, b'B1\\n'); os.close(b)
                first = cat('shard-1/log')
                os.close(a)
                # B writes after A opened but before A writes.
                a = app('shard-1/log2')
                b = app('shard-1/log2'); os.write(b, b'B1\\n')
                os.write(a, b'A1\\n'); os.close(b); os.close(a)
                print(repr(first), repr(cat('shard-1/log')), repr(cat('shard-1/log2')))
                """)
            #expect(out == "b'base\\nA1\\nB1\\n' b'base\\nA1\\nB1\\n' b'base\\nB1\\nA1\\n'\n")
            await m.unmount()
            try await m.mount()
            #expect(try await m.ok("cat shard-1/log shard-1/log2") == "base\nA1\nB1\nbase\nB1\nA1\n")
        }
    }

    @Test func readersOnTheMountSeeEveryWriteAtOnce() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && printf 'OLD-CONTENT' > shard-1/f && printf 'OLD' > shard-1/g")
            let out = try await m.python("""
                import os
                def cat(path):
                    with open(path, 'rb') as f: return f.read()
                w = os.open('shard-1/f', os.O_WRONLY)
                os.pwrite(w, b'NEW', 0)
                seen = [cat('shard-1/f'), os.stat('shard-1/f').st_size]
                t = os.open('shard-1/g', os.O_WRONLY | os.O_TRUNC)
                seen += [cat('shard-1/g'), os.stat('shard-1/g').st_size]
                os.write(t, b'TRUNC')
                seen += [cat('shard-1/g')]
                os.close(w); os.close(t)
                print(seen)
                """)
            #expect(out == "[b'NEW-CONTENT', 11, b'', 0, b'TRUNC']\n")
        }
    }

    @Test func aLastCloseThatFailsLeavesTheCommittedValue() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && printf 'committed' > shard-1/f")
            let out = try await m.python("""
                import errno, os, time
                w = os.open('shard-1/f', os.O_WRONLY | os.O_TRUNC)
                os.write(w, b'never committed')
                os.chmod('shard-1', 0o555)  # closes the shard (no child: its exec would flush w)
                try:
                    os.close(w)
                    print('closed')
                except OSError as e:
                    print(errno.errorcode[e.errno])
                # The kernel's cached pages are dropped within milliseconds.
                for _ in range(100):
                    with open('shard-1/f', 'rb') as f: value = f.read()
                    if value == b'committed': break
                    time.sleep(0.02)
                print(value)
                """)
            #expect(out == "EROFS\nb'committed'\n")
        }
    }

    @Test func extendedAttributesWorkBeforeTheFirstClose() async throws {
        let fixture = try await withFixture { m in
            try await m.mount()
            try await m.ok("mkdir shard-1 shard-2")
            let out = try await m.python("""
                import os
                fd = os.open('shard-1/new', os.O_CREAT | os.O_WRONLY, 0o644)
                os.write(fd, b'value')
                os.setxattr(fd, 'user.topic', b'logs')
                os.setxattr('shard-1/new', 'user.level', b'3')
                before = sorted(os.listxattr(fd)), os.getxattr('shard-1/new', 'user.topic')
                os.removexattr(fd, 'user.level')
                os.close(fd)
                print(before, sorted(os.listxattr('shard-1/new')), os.getxattr('shard-1/new', 'user.topic'))
                """)
            #expect(out == "(['user.level', 'user.topic'], b'logs') ['user.topic'] b'logs'\n")
            // The index is the shard's: find-by-index sees it after a remount.
            await m.unmount()
            try await m.mount()
            #expect(try await m.ok("getfattr --only-values -n user.topic shard-1/new") == "logs")
            // mv and cp -a across shards keep indexes, without a complaint.
            let mv = try await m.sh("mv shard-1/new shard-2/moved && cp -a shard-2/moved shard-1/copy")
            #expect(mv.status == 0 && mv.stderr.isEmpty, "\(mv.stderr)")
            #expect(try await m.ok("getfattr --only-values -n user.topic shard-2/moved") == "logs")
            #expect(try await m.ok("getfattr --only-values -n user.topic shard-1/copy") == "logs")
            #expect(try await m.ok("cat shard-1/copy") == "value")
        }
        // The index is in the shard's reverse index too.
        let find = try await runAsync(shardfs, ["find", "--data-dir", fixture.data, "1", "topic=logs"])
        #expect(find.stdout == "copy\n", "\(find.stderr)")
    }

    @Test func inodeNumbersAreStableAcrossCacheDropsRenamesRewritesAndRemounts() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 shard-2 && echo a > shard-1/a && echo b > shard-1/b && echo c > shard-2/a")
            let stat = "stat -c '%i %n' shard-1 shard-2 shard-1/* shard-2/*"
            let first = try await m.ok(stat)
            let numbers = first.split(separator: "\n").map { $0.split(separator: " ")[0] }
            #expect(Set(numbers).count == 5, "\(first)")
            // What a plain listing (getdents) shows is the same number.
            #expect(try await m.ok("ls -i shard-1 | sort -k2") == (try await m.ok("stat -c '%i %n' shard-1/* | sed 's#shard-1/##'")))
            try await m.ok("sync; echo 2 > /proc/sys/vm/drop_caches")
            #expect(try await m.ok(stat) == first)
            let a = try await m.ok("stat -c %i shard-1/a")
            try await m.ok("mv shard-1/a shard-1/renamed && echo rewritten > shard-1/b")
            #expect(try await m.ok("stat -c %i shard-1/renamed") == a)
            #expect(try await m.ok("find shard-1 -inum \(a.trimmingCharacters(in: .whitespacesAndNewlines))") == "shard-1/renamed\n")
            let b = try await m.ok("stat -c %i shard-1/b")
            await m.unmount()
            try await m.mount()
            #expect(try await m.ok("stat -c %i shard-1/renamed shard-1/b") == a + b)
            // A new entry of a removed one's name is another file.
            try await m.ok("rm shard-1/b && echo new > shard-1/b")
            #expect(try await m.ok("stat -c %i shard-1/b") != b)
            // mv out of the mount is not mistaken for a file replaced while copied.
            let out = try await m.sh("mkdir -p ../outside && mv shard-1/renamed ../outside/ && cat ../outside/renamed")
            #expect(out.status == 0 && out.stdout == "a\n", "\(out.stderr)")
        }
    }

    @Test func modesAndTimesAreKept() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && echo v > shard-1/f")
            let out = try await m.python("""
                import os, time
                s0 = os.stat('shard-1/f')
                time.sleep(0.01)
                os.chmod('shard-1/f', 0o620)
                s1 = os.stat('shard-1/f')
                os.utime('shard-1/f', ns=(1_000_000_000_123, s1.st_mtime_ns))
                s2 = os.stat('shard-1/f')
                print(oct(s1.st_mode & 0o7777), s1.st_ctime_ns > s0.st_ctime_ns, s1.st_mtime_ns == s0.st_mtime_ns,
                      s2.st_atime_ns, s2.st_mtime_ns == s0.st_mtime_ns)
                d0 = os.stat('shard-1')
                time.sleep(0.01)
                open('shard-1/g', 'w').close()
                d1 = os.stat('shard-1')
                time.sleep(0.01)
                os.unlink('shard-1/g')
                d2 = os.stat('shard-1')
                print(d1.st_mtime_ns > d0.st_mtime_ns, d1.st_ctime_ns > d0.st_ctime_ns, d2.st_mtime_ns > d1.st_mtime_ns)
                """)
            #expect(out == "0o620 True True 1000000000123 True\nTrue True True\n")
            // A mode set before the first close (cp -p does so) is kept too.
            try await m.ok("printf x > /tmp/shardfs-mode-$$ && chmod 0604 /tmp/shardfs-mode-$$ && cp -p /tmp/shardfs-mode-$$ shard-1/copied; rc=$?; rm -f /tmp/shardfs-mode-$$; exit $rc")
            try await m.ok("touch -d '2001-02-03 04:05:06' shard-1")
            await m.unmount()
            try await m.mount()
            #expect(try await m.ok("stat -c '%a %X' shard-1/f && stat -c %a shard-1/copied") == "620 1000\n604\n")
            #expect(try await m.ok("stat -c %Y shard-1") == "981173106\n")
            // A closed shard shows no write bits, whatever the mode.
            try await m.ok("chmod a-w shard-1")
            #expect(try await waitUntil(10) { try await m.ok("stat -c %a shard-1/f") == "400\n" })
        }
    }

    /// Closing a shard drops the attributes the kernel cached of its files (the
    /// drop is queued, so a `stat` racing the `chmod` may still see write bits):
    /// with a minute's attribute timeout, only that drop can show the new mode.
    @Test func closingAShardDropsItsFilesCachedModes() async throws {
        try await withMount("client_id=tester,attr_timeout=60,entry_timeout=60") { m in
            try await m.ok("mkdir shard-1 && echo v > shard-1/f && chmod 640 shard-1/f")
            #expect(try await m.ok("stat -c %a shard-1/f") == "640\n")
            try await m.ok("chmod a-w shard-1")
            #expect(try await waitUntil(10) { try await m.ok("stat -c %a shard-1/f") == "440\n" })
        }
    }

    @Test func aRepeatedRsyncSendsNothing() async throws {
        try await withMount { m in
            try await m.ok("""
                mkdir shard-1 ../src && cd ../src
                for i in $(seq 1 20); do head -c $((i * 300)) /dev/urandom > file$i; done
                chmod 0600 file3 && chmod 0640 file4 && touch -d '2020-01-02 03:04:05' file5
                setfattr -n user.topic -v logs file6
                """)
            try await m.ok("rsync -aX ../src/ shard-1/")
            let second = try await m.ok("rsync -aX --itemize-changes ../src/ shard-1/")
            #expect(second.isEmpty, "\(second)")
            try await m.ok("diff -r ../src shard-1")
            #expect(try await m.ok("stat -c %a shard-1/file3 shard-1/file4") == "600\n640\n")
            #expect(try await m.ok("getfattr --only-values -n user.topic shard-1/file6") == "logs")
        }
    }

    @Test func newFilesTakeTheModeAndUmaskTheyAreCreatedWith() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            let out = try await m.python("""
                import os
                os.umask(0o077)
                os.close(os.open('shard-1/script', os.O_CREAT | os.O_WRONLY, 0o755))
                os.umask(0o022)
                fd = os.open('shard-1/secret', os.O_CREAT | os.O_WRONLY, 0o600)
                before = oct(os.fstat(fd).st_mode & 0o7777)
                os.write(fd, b's'); os.close(fd)
                os.close(os.open('shard-1/plain', os.O_CREAT | os.O_WRONLY, 0o666))
                print(before, *[oct(os.stat('shard-1/' + n).st_mode & 0o7777) for n in ('script', 'secret', 'plain')])
                """)
            #expect(out == "0o600 0o700 0o600 0o644\n")
            await m.unmount()
            try await m.mount()
            #expect(try await m.ok("stat -c %a shard-1/script shard-1/secret shard-1/plain") == "700\n600\n644\n")
        }
    }

    @Test func descriptorsOfAnUnlinkedFileStillReadAndStatIt() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && printf 'kept value' > shard-1/f")
            let out = try await m.python("""
                import os
                r = os.open('shard-1/f', os.O_RDONLY)
                os.unlink('shard-1/f')
                st = os.fstat(r)
                print(st.st_nlink, st.st_size, os.pread(r, 100, 0), os.path.exists('shard-1/f'))
                os.close(r)
                """)
            #expect(out == "0 10 b'kept value' False\n")
        }
    }

    @Test func aWriteFarPastTheEndMakesAHoleNotMemory() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            let pid = try #require(m.daemonPID)
            let out = try await m.python("""
                import os
                fd = os.open('shard-1/sparse', os.O_CREAT | os.O_WRONLY, 0o644)
                os.pwrite(fd, b'x', 256 * 1024 * 1024 + 1)
                rss = [l for l in open('/proc/\(pid)/status') if l.startswith('VmRSS')][0].split()[1]
                os.close(fd)
                r = os.open('shard-1/sparse', os.O_RDONLY)
                print(os.fstat(r).st_size, os.pread(r, 4, 256 * 1024 * 1024 - 1), os.pread(r, 2, 1000), int(rss) < 200 * 1024)
                """)
            #expect(out == "268435458 b'\\x00\\x00x' b'\\x00\\x00' True\n")
        }
    }
}

