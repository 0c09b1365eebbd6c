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
}
