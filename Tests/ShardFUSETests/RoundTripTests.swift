import CFuseRing
import Foundation
import TestSupport
import Testing

/// GNU `ls -l` of a shard of `files` files: its output's line count, and the
/// getxattr and lookup requests the daemon was handed meanwhile.
private func listingCost(_ m: MountFixture, files: Int) async throws -> (lines: String, getxattr: Int, lookup: Int) {
    try await m.ok("mkdir shard-1 && cd shard-1 && for i in $(seq 1 \(files)); do echo $i > f$i; done")
    let before = try await m.requestCounts()
    let lines = try await m.ok("ls -l shard-1 | wc -l")
    let after = try await m.requestCounts()
    return (lines, after["getxattr", default: 0] - before["getxattr", default: 0],
            after["lookup", default: 0] - before["lookup", default: 0])
}

/// `files` files made in a shard, then removed by one `rm`: the FORGETs the
/// daemon was handed meanwhile alone, and the batches of them.
private func forgetsOfUnlinks(_ m: MountFixture, files: Int) async throws -> (alone: Int, batches: Int) {
    try await m.ok("mkdir shard-1 && cd shard-1 && for i in $(seq 1 \(files)); do : > f$i; done")
    let before = try await m.requestCounts()
    try await m.ok("rm shard-1/f*")
    try await Task.sleep(for: .milliseconds(200))  // the last FORGETs are read
    let after = try await m.requestCounts()
    return (after["forget", default: 0] - before["forget", default: 0],
            after["batchForget", default: 0] - before["batchForget", default: 0])
}

/// Round trips the daemon is spared, counted by the daemon itself
/// (`user.shardfs.requests` on the mount's root).
@Suite struct RoundTripTests {
    @Test func securityAndAclAttributesAreNotSupported() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && echo v > shard-1/e && setfattr -n user.topic -v logs shard-1/e")
            for name in ["security.selinux", "system.posix_acl_access", "security.capability", "trusted.x"] {
                let error = try await m.errnoOf("os.getxattr('shard-1/e', '\(name)')")
                #expect(["EOPNOTSUPP", "ENOTSUP"].contains(error), "\(name): \(error)")
            }
            // user.* is served as before: missing names are ENODATA, indexes are there.
            #expect(try await m.errnoOf("os.getxattr('shard-1/e', 'user.missing')") == "ENODATA")
            #expect(try await m.ok("getfattr --only-values -n user.topic shard-1/e") == "logs")
            // The root has the request counts, and no other attribute.
            #expect(try await m.errnoOf("os.getxattr('.', 'user.other')") == "ENODATA")
            let counts = try await m.requestCounts()
            #expect(counts["getxattr", default: 0] >= 5 && counts["lookup", default: 0] >= 1, "\(counts)")
        }
    }

    /// Every unlinked file's inode is evicted, and the kernel sends its FORGET
    /// through /dev/fuse even while the rings serve the unlinks. A worker that
    /// read one waits a moment before reading again, so they come as batches,
    /// not one wake-up per file (before: 9 in 10 came alone).
    @Test(.enabled(if: shardfs_kernel_allows_rings() == 1, "FUSE over io_uring is off"))
    func unlinkedFilesAreForgottenInBatches() async throws {
        try await withMount { m in
            let (alone, batches) = try await forgetsOfUnlinks(m, files: 2000)
            #expect(alone < 1000, "\(alone) FORGETs came alone, \(batches) batches, for 2,000 unlinked files")
            #expect(batches > 0)
        }
    }

    /// Python's `open(…, "wb")` calls fstat right after the create: the create's
    /// answer may be cached for a new file, so that costs no GETATTR. A file
    /// created and closed unwritten keeps its creation time: what was shown
    /// from the cache is what is stored (stat'ed again once the cache expired).
    @Test func aNewFileIsStatedFromItsCreation() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            let before = try await m.requestCounts()
            try await m.ok("python3 -c \"\nfor i in range(100):\n    open('shard-1/f%d' % i, 'wb').close()\"")
            let after = try await m.requestCounts()
            let getattr = after["getattr", default: 0] - before["getattr", default: 0]
            #expect(getattr < 10, "100 creates from Python cost \(getattr) GETATTRs")
            let shown = try await m.ok("python3 -c \"import os; f = open('shard-1/t', 'wb'); print(os.fstat(f.fileno()).st_mtime_ns); f.close()\"")
            try await Task.sleep(for: .milliseconds(1500))  // past the mount's 1 s attribute timeout
            let stored = try await m.ok("python3 -c \"import os; print(os.stat('shard-1/t').st_mtime_ns)\"")
            #expect(shown == stored, "a file created unwritten showed mtime \(shown) and has \(stored)")
        }
    }

    /// GNU `ls -l` asks every file for security.selinux and system.posix_acl_access;
    /// answered "not supported" once, it stops asking for the rest of the device.
    @Test func lsLongAsksForAttributesOncePerListing() async throws {
        try await withMount { m in
            let cost = try await listingCost(m, files: 200)
            #expect(cost.lines == "201\n")
            // Two for ls (one per attribute), and reading the counts again (getfattr
            // asks twice: the size, then the value); before the change, 2 per file (400).
            #expect(cost.getxattr <= 4, "ls -l of 200 files cost \(cost.getxattr) getxattr requests")
            #expect(cost.lookup <= 4, "ls -l of 200 files cost \(cost.lookup) lookups (readdirplus should answer them)")
        }
    }

    /// A file opened write-only is written around the page cache, so the kernel
    /// does not ask `security.capability` before each write: a create, a write
    /// and a close cost LOOKUP, CREATE, WRITE, FLUSH, RELEASE (before: and a
    /// GETXATTR per write() — 100 here, and one per MiB of a big file).
    @Test func writeOnlyFilesAreWrittenWithoutCapabilityQueries() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1")
            let before = try await m.requestCounts()
            try await m.ok("python3 -c \"\nfor i in range(100):\n    open('shard-1/f%d' % i, 'wb').write(b'x' * 1024)\"")
            try await m.ok("dd if=/dev/zero of=shard-1/big bs=1M count=4 status=none")
            let after = try await m.requestCounts()
            let delta = { (kind: String) in after[kind, default: 0] - before[kind, default: 0] }
            // Reading the counts asks twice itself (the size, then the value).
            #expect(delta("getxattr") <= 2, "100 files and 4 MiB written cost \(delta("getxattr")) GETXATTRs")
            #expect(delta("write") == 104 && delta("create") == 101, "\(after)")
            #expect(try await m.ok("cat shard-1/f7 | wc -c && cmp -n 4194304 /dev/zero shard-1/big && echo same") == "1024\nsame\n")
        }
    }
}
