import Foundation
import TestSupport
import Testing

/// The mount on a volume whose filesystem fills up (the device itself fine):
/// a file that does not fit fails with ENOSPC, not EIO, nothing of it is
/// committed, what was there stays readable, and once there is room the same
/// mount takes files again (docs/SEMANTICS.md, "Errors by cause").
@Suite struct FullVolumeMountTests {
    @Test(.enabled(if: getuid() == 0, "loop devices and mounts need root"))
    func aFullVolumeRefusesFilesWithENOSPCAndTakesThemAgainOnceThereIsRoom() async throws {
        let fixture = try MountFixture(options: "client_id=tester")
        // The node's data folder (its folder volume, its metadata) on a 64 MiB ext4.
        let disk = try FillableDisk(in: fixture.dir, mountedAt: fixture.data, roomMiB: 256, imageMiB: 64)
        defer { disk.cleanUp() }  // after the unmounts below
        do {
            try await fixture.mount()
            try await fixture.ok("mkdir shard-1 && echo kept > shard-1/kept && head -c 16777216 /dev/urandom > '\(fixture.dir.sub("big"))'")
            try await fixture.ok("head -c $(( $(df --output=avail -k '\(fixture.data)' | tail -1) - 1024 ))K /dev/zero > '\(fixture.data)/filler' || true")
            // A large file (a value file as it is written) and a small one (a batch put at close).
            let big = try await fixture.sh("cp '\(fixture.dir.sub("big"))' shard-1/big")
            #expect(big.status != 0)
            #expect(big.stderr.contains("No space left on device"), "\(big.stderr)")
            let small = try await fixture.errnoOf(
                #"[(lambda f: (f.write(b"x" * 262144), f.close()))(open("shard-1/small-%d" % i, "wb")) for i in range(64)]"#)
            #expect(small == "ENOSPC")
            #expect(try await fixture.ok("cat shard-1/kept") == "kept\n")
            // Nothing of the large file was committed: it is gone, or the empty file cp created.
            let left = try await fixture.sh("stat -c %s shard-1/big 2>/dev/null || echo gone").stdout
            #expect(left == "gone\n" || left == "0\n", "\(left)")

            try await fixture.ok("rm -f '\(fixture.data)/filler' shard-1/big")
            try await fixture.ok("cp '\(fixture.dir.sub("big"))' shard-1/big && sync shard-1/big")
            try await fixture.ok("cmp '\(fixture.dir.sub("big"))' shard-1/big")
            try await fixture.ok("echo after > shard-1/after && sync shard-1/after")
            #expect(try await fixture.ok("cat shard-1/after shard-1/kept") == "after\nkept\n")
        } catch {
            await fixture.unmount()
            throw error
        }
        await fixture.unmount()
    }
}
