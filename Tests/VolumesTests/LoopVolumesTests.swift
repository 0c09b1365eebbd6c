import Foundation
import TestSupport
import Testing
@testable import Volumes

/// Real loop devices, ext4 and mounts: root only. Every test cleans up in `defer`.
@Suite(.serialized, .enabled(if: LoopFixture.isRoot, "loop devices and mounts need root"))
struct LoopVolumesTests {
    @Test func createFormatMountDetachDelete() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let created = try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20, tags: ["shardfs": "test"], idempotencyToken: "tok-1"))
        // Sparse: nothing is allocated yet.
        var st = stat()
        #expect(stat(f.provider.imagePath(created.volumeID), &st) == 0 && st.st_size == 64 << 20 && st.st_blocks * 512 < 1 << 20)
        // A retried create with the same token gets the same volume.
        #expect(try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20, idempotencyToken: "tok-1")).volumeID == created.volumeID)
        #expect(try await f.provider.listVolumes().map(\.volumeID) == [created.volumeID])

        let manager = f.manager("i-a")
        let mounted = try await manager.mount(created.volumeID, readOnly: false)
        #expect(mounted.mountPath == f.dir.sub("root-i-a/\(created.volumeID)") && mounted.device.hasPrefix("/dev/loop"))
        let info = try #require(f.mounts().first { $0.mountPoint == mounted.mountPath })
        #expect(info.fsType == "ext4" && !info.readOnly && info.source == mounted.device)
        try Data("hello".utf8).write(to: URL(fileURLWithPath: mounted.mountPath + "/file"))
        #expect(try manager.freeBytes(created.volumeID) > 40 << 20)

        let described = try await f.provider.describeVolume(created.volumeID)
        #expect(described.state == .inUse && described.tags == ["shardfs": "test"])
        #expect(described.attachments == [VolumeAttachment(instanceID: "i-a", state: .attached, device: mounted.device, readOnly: false)])
        // Detaching a mounted volume is refused; deleting an attached one too.
        await #expect(throws: VolumeError.self) { try await f.provider.detachVolume(created.volumeID, instanceID: "i-a") }
        await #expect(throws: VolumeError.self) { try await f.provider.deleteVolume(created.volumeID) }

        try await manager.detach(created.volumeID)
        #expect(f.mounts().isEmpty && f.loopDevices().isEmpty && manager.mountedVolumes().isEmpty)
        #expect(try await f.provider.describeVolume(created.volumeID).state == .available)

        // Mounting again finds the filesystem and the file (no second mkfs).
        let again = try await manager.mount(created.volumeID, readOnly: false)
        #expect(try String(contentsOfFile: again.mountPath + "/file", encoding: .utf8) == "hello")
        try await manager.detach(created.volumeID)

        try await f.provider.deleteVolume(created.volumeID)
        #expect(try await f.provider.listVolumes().isEmpty)
        #expect(!FileManager.default.fileExists(atPath: f.provider.imagePath(created.volumeID)))
    }

    @Test func oneImageOnTwoHostsPrimaryWritesBackupReads() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20))
        let primary = f.manager("i-a"), backup = f.manager("i-b")
        let rw = try await primary.mount(volume.volumeID, readOnly: false)
        try Data("from the primary".utf8).write(to: URL(fileURLWithPath: rw.mountPath + "/shard-1"))
        // The reader mounts without journal replay: what it sees must be on the device, not in the journal.
        sync()

        let ro = try await backup.mount(volume.volumeID, readOnly: true)
        #expect(ro.device != rw.device)
        let roName = (ro.device as NSString).lastPathComponent
        #expect(try String(contentsOfFile: "/sys/block/\(roName)/ro", encoding: .utf8).hasPrefix("1"))
        let info = try #require(f.mounts().first { $0.mountPoint == ro.mountPath })
        #expect(info.readOnly && info.superOptions.contains("norecovery"))
        #expect(try String(contentsOfFile: ro.mountPath + "/shard-1", encoding: .utf8) == "from the primary")
        #expect(!FileManager.default.createFile(atPath: ro.mountPath + "/nope", contents: Data()))

        let described = try await f.provider.describeVolume(volume.volumeID)
        #expect(described.attachments.map(\.instanceID) == ["i-a", "i-b"] && described.attachments.map(\.readOnly) == [false, true])
        // A second writer is refused, naming the one there is.
        do {
            _ = try await f.provider.attachVolume(volume.volumeID, instanceID: "i-c", readOnly: false)
            Issue.record("a second read-write attachment was allowed")
        } catch VolumeError.failed(let text) {
            #expect(text.contains(volume.volumeID) && text.contains("i-a"))
        }
        // Detaching the backup leaves the primary's attachment.
        try await backup.detach(volume.volumeID)
        #expect(try await f.provider.describeVolume(volume.volumeID).attachments.map(\.instanceID) == ["i-a"])
        #expect(try String(contentsOfFile: rw.mountPath + "/shard-1", encoding: .utf8) == "from the primary")
        try await primary.detach(volume.volumeID)
        #expect(f.loopDevices().isEmpty)
    }

    /// xfs: the backup mounts `ro,norecovery,nouuid`. `sync` is not enough for it
    /// to see the primary's new file (the metadata stays in xfs's log); a freeze
    /// of the primary (fsfreeze -f, -u) writes it in place.
    @Test func xfsPrimaryAndReadOnlyBackup() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        // mkfs.xfs wants at least 300 MiB; the image is sparse.
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 320 << 20))
        let primary = BlockVolumeManager(provider: f.provider, volumeRoot: f.dir.sub("root-a"), instanceID: "i-a", filesystem: .xfs)
        let backup = BlockVolumeManager(provider: f.provider, volumeRoot: f.dir.sub("root-b"), instanceID: "i-b", filesystem: .xfs)
        let rw = try await primary.mount(volume.volumeID, readOnly: false)
        try Data("xfs".utf8).write(to: URL(fileURLWithPath: rw.mountPath + "/f"))
        for flag in ["-f", "-u"] {
            #expect(try await CommandRunner().runAsync("fsfreeze", [flag, rw.mountPath]).status == 0)
        }
        let ro = try await backup.mount(volume.volumeID, readOnly: true)
        let info = try #require(f.mounts().first { $0.mountPoint == ro.mountPath })
        #expect(info.fsType == "xfs" && info.readOnly && info.superOptions.contains("norecovery") && info.superOptions.contains("nouuid"))
        #expect(try String(contentsOfFile: ro.mountPath + "/f", encoding: .utf8) == "xfs")
        // An xfs volume is not taken for ext4.
        await #expect(throws: VolumeError.self) {
            _ = try await BlockVolumeManager(provider: f.provider, volumeRoot: f.dir.sub("root-c"), instanceID: "i-c")
                .mount(volume.volumeID, readOnly: true)
        }
        try await backup.detach(volume.volumeID)
        try await primary.detach(volume.volumeID)
        #expect(f.loopDevices().isEmpty && f.mounts().isEmpty)
    }

    @Test func aBlankVolumeIsNotFormattedReadOnly() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 32 << 20))
        do {
            _ = try await f.manager("i-b").mount(volume.volumeID, readOnly: true)
            Issue.record("a blank volume was mounted read-only")
        } catch VolumeError.failed(let text) {
            #expect(text.contains(volume.volumeID) && text.contains("primary"))
        }
        let probe = try CommandRunner().run("blkid", ["-p", f.provider.imagePath(volume.volumeID)])
        #expect(probe.status == 2)  // still nothing on it
        // The failed mount took back the attachment it made.
        #expect(f.mounts().isEmpty && f.loopDevices().isEmpty)
        #expect(try await f.provider.describeVolume(volume.volumeID).attachments.isEmpty)
    }

    @Test func anotherFilesystemIsNeverReformatted() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 32 << 20))
        let mkfs = try CommandRunner().run("mkfs.ext2", ["-q", "-F", f.provider.imagePath(volume.volumeID)])
        #expect(mkfs.status == 0)
        do {
            _ = try await f.manager("i-a").mount(volume.volumeID, readOnly: false)
            Issue.record("an ext2 volume was mounted as ext4")
        } catch VolumeError.failed(let text) {
            #expect(text.contains("ext2") && text.contains(volume.volumeID))
        }
        let probe = try CommandRunner().run("blkid", ["-p", "-o", "value", "-s", "TYPE", f.provider.imagePath(volume.volumeID)])
        #expect(probe.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "ext2")
        #expect(f.loopDevices().isEmpty)
    }

    @Test func aRestartAdoptsMountsAndLoopDevices() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20))
        let first = try await f.manager("i-a").mount(volume.volumeID, readOnly: false)
        try Data("kept".utf8).write(to: URL(fileURLWithPath: first.mountPath + "/f"))

        // "Crash": a new manager for the same instance and root, the mount still there.
        let restarted = f.manager("i-a")
        #expect(restarted.adoptMounts(of: [volume.volumeID, "vol-not-mounted"]) == [first])
        #expect(restarted.mountedVolumes() == [first])
        #expect(try await restarted.mount(volume.volumeID, readOnly: false) == first)
        // A role that does not match what is mounted is an error, not a second mount.
        await #expect(throws: VolumeError.self) { _ = try await f.manager("i-a").mount(volume.volumeID, readOnly: true) }
        #expect(f.loopDevices() == [first.device] && f.mounts().count == 1)

        // A crash between losetup and saving the record leaves an unclaimed loop
        // device over the image: attaching adopts it instead of making a second.
        try await restarted.unmount(volume.volumeID)
        let recordURL = URL(fileURLWithPath: f.dir.sub("images/\(volume.volumeID).json"))
        var record = try JSONDecoder().decode(LoopCloudProvider.Record.self, from: Data(contentsOf: recordURL))
        record.attachments = [:]
        try JSONEncoder().encode(record).write(to: recordURL)
        #expect(try await f.provider.describeVolume(volume.volumeID).attachments.isEmpty)
        let third = try await f.manager("i-a").mount(volume.volumeID, readOnly: false)
        #expect(third.device == first.device && f.loopDevices() == [first.device])
        #expect(try String(contentsOfFile: third.mountPath + "/f", encoding: .utf8) == "kept")
        try await f.manager("i-a").detach(volume.volumeID)
        #expect(f.loopDevices().isEmpty && f.mounts().isEmpty)
    }

    @Test func listingPagesAndRefusals() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        var ids: [String] = []
        for _ in 0..<3 { ids.append(try await f.provider.createVolume(VolumeSpec(sizeBytes: 16 << 20, multiAttach: false)).volumeID) }
        let page = try await f.provider.describeVolumes([], nextToken: nil, maxResults: 2)
        #expect(page.volumes.count == 2 && page.nextToken != nil)
        #expect(try await f.provider.listVolumes(pageSize: 2).map(\.volumeID) == ids.sorted())
        await #expect(throws: VolumeError.invalidArgument("a loop volume needs at least 16 MiB, not 1024 bytes")) {
            _ = try await f.provider.createVolume(VolumeSpec(sizeBytes: 1024))
        }
        await #expect(throws: VolumeError.notFound("vol-missing")) { _ = try await f.provider.describeVolume("vol-missing") }
        // Not multi-attach: a second instance is refused, even read-only.
        _ = try await f.provider.attachVolume(ids[0], instanceID: "i-a", readOnly: false)
        await #expect(throws: VolumeError.self) { _ = try await f.provider.attachVolume(ids[0], instanceID: "i-b", readOnly: true) }
        try await f.provider.detachVolume(ids[0], instanceID: "i-a")
        #expect(f.loopDevices().isEmpty)
    }
}
