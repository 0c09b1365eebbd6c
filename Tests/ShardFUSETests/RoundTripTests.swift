import Foundation
import TestSupport
import Testing

/// Round trips the daemon is spared, counted by the daemon itself
/// (`user.shardfs.requests` on the mount's root).
@Suite struct RoundTripTests {
    /// The daemon's request counts by kind, from the root's attribute.
    static func requests(_ m: MountFixture) async throws -> [String: Int] {
        let text = try await m.ok("getfattr --only-values -n user.shardfs.requests .")
        var counts: [String: Int] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let n = Int(parts[1]) { counts[String(parts[0])] = n }
        }
        return counts
    }

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
            let counts = try await Self.requests(m)
            #expect(counts["getxattr", default: 0] >= 5 && counts["lookup", default: 0] >= 1, "\(counts)")
        }
    }

    /// GNU `ls -l` asks every file for security.selinux and system.posix_acl_access;
    /// answered "not supported" once, it stops asking for the rest of the device.
    @Test func lsLongAsksForAttributesOncePerListing() async throws {
        try await withMount { m in
            try await m.ok("mkdir shard-1 && cd shard-1 && for i in $(seq 1 200); do echo $i > f$i; done")
            let before = try await Self.requests(m)
            let listing = try await m.ok("ls -l shard-1 | wc -l")
            #expect(listing == "201\n")
            let after = try await Self.requests(m)
            let getxattr = after["getxattr", default: 0] - before["getxattr", default: 0]
            // Two for ls (one per attribute), one for reading the counts again;
            // before the change, 2 per file (400).
            #expect(getxattr <= 4, "ls -l of 200 files cost \(getxattr) getxattr requests")
            let lookups = after["lookup", default: 0] - before["lookup", default: 0]
            #expect(lookups <= 4, "ls -l of 200 files cost \(lookups) lookups (readdirplus should answer them)")
        }
    }
}
