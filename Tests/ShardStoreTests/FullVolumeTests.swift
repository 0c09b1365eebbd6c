import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// A volume whose filesystem fills up while its device is fine (the ordinary
/// "disk full"): a write that does not fit is refused with `volumeFull`
/// (ENOSPC at the mount, SHARD_FULL on the wire), nothing of it is committed,
/// everything acknowledged stays readable, and once there is room again the
/// shard takes writes without being reopened. (A device that fails writes is
/// another matter: OPERATIONS.md, and ValueFileTests' fault test.)
@Suite(.onOwnThreads) struct FullVolumeTests {
    @Test(.enabled(if: getuid() == 0, "loop devices and mounts need root"))
    func aFullFilesystemRefusesWritesAndTheShardStaysUsable() throws {
        let dir = try TemporaryDirectory("full-volume")
        defer { dir.remove() }
        // A 64 MiB ext4 on a device with room to spare: the filesystem fills, not the device.
        let disk = try FillableDisk(in: dir, mountedAt: dir.sub("volume"), roomMiB: 256, imageMiB: 64)
        defer { disk.cleanUp() }
        var held: Shard? = try Shard.create(at: dir.sub("volume/shard-7"), id: 7, owner: "owner", options: ShardOptions())
        defer { held = nil }  // before the disk's cleanup: nothing of the volume left open
        var acknowledged: [String: [UInt8]] = [:]
        func put(_ name: String, _ size: Int, deferred: Bool = false) throws {
            let value = [UInt8](repeating: UInt8(truncatingIfNeeded: name.hashValue), count: size)
            if deferred {
                if let failed = try held!.batchPut([EntryWrite(key: bytes(name), value: value)], clientID: "owner",
                                                   deferringDurability: true)[0] { throw failed }
            } else {
                try held!.put(key(name), value: value, clientID: "owner")
            }
            acknowledged[name] = value
        }
        func isVolumeFull(_ error: Error?) -> Bool {
            if case ShardError.volumeFull? = error as? ShardError { return true }
            return false
        }
        try put("m-kept", 1000)
        try LoopFilesystem.sh("head -c $(( $(df --output=avail -k '\(dir.sub("volume"))' | tail -1) - 1024 ))K /dev/zero > '\(dir.sub("volume/filler"))' || true")

        // Puts past the last key commit straight to LMDB; the others go through the batch log.
        var refusals: [Error] = []
        for (prefix, deferred) in [("z", false), ("b", false), ("c", true)] {
            for i in 0..<40 {
                do { try put(String(format: "\(prefix)-%02d", i), 256 << 10, deferred: deferred) } catch {
                    refusals.append(error)
                    break
                }
            }
        }
        do { try held!.sync() } catch { refusals.append(error) }
        #expect(refusals.count >= 2, "\(refusals)")
        for refusal in refusals { #expect(isVolumeFull(refusal), "\(refusal)") }
        for (name, value) in acknowledged { #expect(try held!.get(key(name)).value == value, "\(name)") }
        // A scan applies what is pending first: if that cannot be done, the scan
        // fails as a read (storage), never as a write that did not fit.
        do { _ = try held!.list() } catch { #expect(!isVolumeFull(error), "\(error)") }

        try LoopFilesystem.sh("rm -f '\(dir.sub("volume/filler"))'")
        try put("z-99", 100)
        try put("b-99", 100)
        try put("c-99", 100, deferred: true)
        try held!.sync()
        try held!.applyLog()
        for (name, value) in acknowledged { #expect(try held!.get(key(name)).value == value, "\(name)") }
    }
}
