import Foundation
import TestSupport
import Testing
@testable import Volumes

/// Fencing and promotion on real loop devices, ext4 and mounts (root only),
/// and the forced detach of the clouds against the fakes. Every loop test
/// removes its mounts, loop devices and child processes in `defer`.
@Suite(.serialized, .enabled(if: LoopFixture.isRoot, "loop devices and mounts need root"))
struct LoopFencingTests {
    /// A host's namespace starts with copies of every mount; it drops those
    /// under /tmp (other tests') so it keeps none of their devices busy.
    static let dropOtherMounts = """
        for m in $(awk '$5 ~ "^/tmp/" { print $5 }' /proc/self/mountinfo | sort -r); do umount -l -c "$m" 2>/dev/null; done

        """

    /// Writes 4 KiB record N at offset (N-1)*4 KiB and fsyncs it, printing
    /// "ok N" or "err N errno", until 20 attempts failed; then idles.
    static let writer = """
        import os, sys, time
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
        i = fails = 0
        while fails < 20:
            i += 1
            try:
                os.pwrite(fd, (b"rec-%08d\\n" % i).ljust(4096, b"."), (i - 1) * 4096)
                os.fsync(fd)
                print("ok", i, flush=True)
            except OSError as e:
                fails += 1
                print("err", i, e.errno, flush=True)
            time.sleep(0.005)
        print("done", flush=True)
        time.sleep(3600)
        """

    /// The numbers of the whole records in a file the writer wrote.
    static func records(in path: String) throws -> [Int] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return stride(from: 0, to: data.count - 4095, by: 4096).compactMap { start in
            let head = String(decoding: data[start..<start + 12], as: UTF8.self)
            guard head.hasPrefix("rec-") else { return nil }
            return Int(head.dropFirst(4).prefix(8))
        }
    }

    /// Host A, in a mount namespace of its own, mounts the volume read-write from
    /// its loop device and writes and fsyncs records; it is paused (SIGSTOP), host
    /// B promotes itself (fencing A: A's loop device is revoked) and mounts with
    /// journal replay, A is resumed: every fsync of A fails from then on, and no
    /// record A wrote after the revocation is in the image, seen by B through a
    /// fresh mount after A's attempts. The filesystem checks clean at the end.
    @Test func aPausedPrimaryFencedWhileWritingLandsNothingAfterTheRevocation() async throws {
        let f = try LoopFixture()
        let hostA = Process()
        defer {
            if hostA.isRunning { kill(hostA.processIdentifier, SIGKILL) }
            if hostA.processIdentifier > 0 { hostA.waitUntilExit() }
            f.cleanUp()
        }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20)).volumeID
        let deviceA = try await f.provider.attachVolume(volume, instanceID: "i-a", readOnly: false).device
        #expect(try CommandRunner().run("mkfs.ext4", ["-q", "-F", deviceA]).status == 0)
        let mountA = f.dir.sub("host-a")
        hostA.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        hostA.arguments = ["-m", "--propagation", "private", "/bin/bash", "-c",
                           Self.dropOtherMounts + killedWithTestProcess + "mkdir -p '\(mountA)' && mount -t ext4 '\(deviceA)' '\(mountA)' && "
                           + "exec python3 -c '\(Self.writer)' '\(mountA)/records'"]
        let lines = LineCollector()
        let out = Pipe()
        hostA.standardOutput = out
        hostA.standardError = FileHandle.nullDevice
        try hostA.run()
        lines.read(out.fileHandleForReading)
        try await lines.wait(timeout: 60) { $0.filter { $0.hasPrefix("ok ") }.count >= 30 }
        // A's mount is in A's namespace only.
        #expect(!MountInfo.current().contains { $0.source == deviceA })

        kill(hostA.processIdentifier, SIGSTOP)
        try await Task.sleep(for: .milliseconds(200))
        let okBefore = lines.numbers("ok")
        let lastOk = try #require(okBefore.max())
        #expect(okBefore == Array(1...lastOk) && lines.numbers("err").isEmpty)

        // B holds the volume read-only (a backup), then promotes itself, fencing A.
        let b = f.manager("i-b")
        let held = try await b.attach(volume, readOnly: true)
        #expect(held.device != deviceA)
        let promoted = try await b.promote(volume, fencing: "i-a")
        // (The kernel may give the new read-write device the number the read-only one had.)
        #expect(!promoted.readOnly && promoted.device != deviceA && held.readOnly)
        let promotedName = (promoted.device as NSString).lastPathComponent
        #expect(try String(contentsOfFile: "/sys/block/\(promotedName)/ro", encoding: .utf8).hasPrefix("0"))
        // The cloud's view: A's attachment is gone; the kernel's: A's device shows no byte.
        #expect(try await f.provider.describeVolume(volume).attachments.map(\.instanceID) == ["i-b"])
        let nameA = (deviceA as NSString).lastPathComponent
        #expect(try String(contentsOfFile: "/sys/block/\(nameA)/size", encoding: .utf8).hasPrefix("0"))
        let seenAtPromotion = try Self.records(in: promoted.mountPath + "/records")

        kill(hostA.processIdentifier, SIGCONT)
        try await lines.wait(timeout: 60) { $0.contains("done") }
        let okAfter = lines.numbers("ok").filter { $0 > lastOk }
        let errors = lines.lines.filter { $0.hasPrefix("err ") }.map { $0.split(separator: " ") }
        // At most the record in flight at the pause made it (its fsync may have returned just before).
        #expect(okAfter.allSatisfy { $0 == lastOk + 1 }, "A acknowledged \(okAfter) after its revocation")
        // Every write after the revocation fails: EIO, or EROFS once ext4's journal
        // aborted on an EIO (its own commit thread, which SIGSTOP does not stop, may
        // meet the revoked device first on a loaded machine).
        #expect(errors.count == 20, "A's writes after the revocation: \(lines.lines.suffix(25))")
        #expect(errors.allSatisfy { ["5", "30"].contains(String($0.last ?? "")) }, "\(errors)")

        // A fresh mount reads the image again: still nothing of A's later records.
        try await b.unmount(volume)
        let again = try await b.mount(volume, readOnly: false)
        let seenLater = try Self.records(in: again.mountPath + "/records")
        for seen in [seenAtPromotion, seenLater] {
            let top = try #require(seen.max())
            #expect(Array(1...lastOk).allSatisfy(seen.contains), "an acknowledged record is missing")
            #expect(top <= lastOk + 1 && seen == Array(1...top), "records after the revocation landed: \(top) > \(lastOk + 1)")
        }
        #expect(seenLater == seenAtPromotion)

        // A dies: its namespace and mount go, and with them its revoked loop device.
        kill(hostA.processIdentifier, SIGKILL)
        hostA.waitUntilExit()
        try await b.releaseAll()
        #expect(try CommandRunner().run("e2fsck", ["-fn", f.provider.imagePath(volume)]).status == 0)
        #expect(await f.allReleased() && b.mountedVolumes().isEmpty && b.attachedVolumes().isEmpty)
    }

    /// A promotion that crashed after fencing is finished by a new manager: the
    /// read-only mount goes, the read-only attachment goes, a read-write one is
    /// made and mounted with journal replay (a file the primary only fsynced is
    /// there). A second promote answers the same mount. The old primary's mount
    /// (same namespace here) fails its writes from the fence on.
    @Test func aPromotionIsIdempotentAndFinishesAfterACrash() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20)).volumeID
        let a = f.manager("i-a"), b = f.manager("i-b")
        let rw = try await a.mount(volume, readOnly: false)
        sync()
        let ro = try await b.mount(volume, readOnly: true)
        // Written after the backup mounted and only fsynced: in the journal, not in a fresh ro,noload view.
        let fd = open(rw.mountPath + "/journaled", O_CREAT | O_WRONLY, 0o644)
        #expect(fd >= 0 && write(fd, "committed", 9) == 9 && fsync(fd) == 0)

        // "Crash" after step 1: A is fenced, B's promotion went no further.
        try await f.provider.fence(volume, instanceID: "i-a", timeout: .seconds(30), poll: .milliseconds(50))
        try await f.provider.fence(volume, instanceID: "i-a", timeout: .seconds(30), poll: .milliseconds(50))  // done already
        // The fenced host's next write, or at the latest its fsync, fails (ext4 may
        // already have seen the device fail and refuse the write itself).
        let wrote = write(fd, "more", 4)
        let synced = wrote == 4 ? fsync(fd) : -1
        #expect(wrote != 4 || synced == -1)
        #expect(errno == EIO || errno == EROFS)
        close(fd)

        let restarted = f.manager("i-b")
        let promoted = try await restarted.promote(volume, fencing: "i-a")
        #expect(promoted.mountPath == ro.mountPath && !promoted.readOnly && ro.readOnly)
        #expect(try String(contentsOfFile: promoted.mountPath + "/journaled", encoding: .utf8) == "committed")
        let info = try #require(f.mounts().first { $0.mountPoint == promoted.mountPath })
        #expect(!info.readOnly && info.source == promoted.device)
        #expect(try await restarted.promote(volume, fencing: "i-a") == promoted)
        let attachments = try await f.provider.describeVolume(volume).attachments
        #expect(attachments == [VolumeAttachment(instanceID: "i-b", state: .attached, device: promoted.device, readOnly: false)])
        await #expect(throws: VolumeError.self) { _ = try await restarted.promote(volume, fencing: "i-b") }

        // The old primary's mount (host A, here in the same namespace) is unmounted;
        // its revoked device goes with it.
        #expect(try CommandRunner().run("umount", [rw.mountPath]).status == 0)
        try await restarted.releaseAll()
        _ = b  // the crashed manager holds nothing the new one did not release
        #expect(await f.allReleased())
    }

    /// A host fenced off a volume and restarted (its mount of the revoked device
    /// still there) does not adopt that mount: it drops it and attaches afresh,
    /// so it reads what it committed and writes again.
    @Test func aFencedHostRestartedDoesNotAdoptItsRevokedMount() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20)).volumeID
        let rw = try await f.manager("i-a").mount(volume, readOnly: false)
        try "committed".write(toFile: rw.mountPath + "/kept", atomically: true, encoding: .utf8)
        sync()
        try await f.provider.fence(volume, instanceID: "i-a", timeout: .seconds(30), poll: .milliseconds(50))

        let restarted = f.manager("i-a")
        let again = try await restarted.mount(volume, readOnly: false)
        #expect(!f.provider.isRevoked(again.device))  // (the kernel may give it the freed device's number)
        #expect(try String(contentsOfFile: again.mountPath + "/kept", encoding: .utf8) == "committed")
        #expect(FileManager.default.createFile(atPath: again.mountPath + "/after", contents: Data("new".utf8)))
        try await restarted.releaseAll()
        #expect(await f.allReleased())
    }

    /// A host that loses a take-over (it fenced the primary and mounted
    /// read-write, then the old primary took the volume back and fenced it in
    /// turn) lets go of its mount and attachment (`detach`, as the node's
    /// settling does), then backs the volume again: a fresh read-only device
    /// that reads what the primary writes after taking it back.
    @Test func aHostThatLostATakeOverLetsGoAndBacksTheVolumeAgain() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 64 << 20)).volumeID
        let a = f.manager("i-a"), b = f.manager("i-b")
        _ = try await a.mount(volume, readOnly: false)
        _ = try await b.attach(volume, readOnly: true)
        let taken = try await b.promote(volume, fencing: "i-a")
        let back = try await a.promote(volume, fencing: "i-b")
        #expect(f.provider.isRevoked(taken.device) && !f.provider.isRevoked(back.device))
        try "after".write(toFile: back.mountPath + "/taken-back", atomically: true, encoding: .utf8)

        try await b.detach(volume)
        #expect(b.mountedVolumes().isEmpty && b.attachedVolumes().isEmpty)
        #expect(!f.mounts().contains { $0.mountPoint == taken.mountPath })
        let held = try await b.attach(volume, readOnly: true)
        #expect(!f.provider.isRevoked(held.device))
        let attachments = try await f.provider.describeVolume(volume).attachments
        #expect(Set(attachments.map { "\($0.instanceID) \($0.readOnly)" }) == ["i-a false", "i-b true"])
        // It reads what the primary wrote after taking the volume back (synced for a fresh device).
        #expect(try CommandRunner().run("sync", ["-f", back.mountPath]).status == 0)
        let mounted = try await b.mount(volume, readOnly: true)
        #expect(try String(contentsOfFile: mounted.mountPath + "/taken-back", encoding: .utf8) == "after")
        try await b.releaseAll()
        try await a.releaseAll()
        #expect(await f.allReleased())
    }

    /// xfs: the promoted host replays the log (a file the primary only fsynced is
    /// there) and mounts beside the fenced primary's still-existing mount of the
    /// same filesystem in this one kernel (`nouuid`); the fenced mount's writes fail.
    @Test func xfsPromotionReplaysTheLog() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 320 << 20)).volumeID
        let a = BlockVolumeManager(provider: f.provider, volumeRoot: f.dir.sub("root-a"), instanceID: "i-a", filesystem: .xfs)
        let b = BlockVolumeManager(provider: f.provider, volumeRoot: f.dir.sub("root-b"), instanceID: "i-b", filesystem: .xfs)
        let rw = try await a.mount(volume, readOnly: false)
        let fd = open(rw.mountPath + "/logged", O_CREAT | O_WRONLY, 0o644)
        #expect(fd >= 0 && write(fd, "in the log", 10) == 10 && fsync(fd) == 0)
        let promoted = try await b.promote(volume, fencing: "i-a")
        #expect(try String(contentsOfFile: promoted.mountPath + "/logged", encoding: .utf8) == "in the log")
        #expect(write(fd, "late", 4) == -1 || fsync(fd) == -1)
        close(fd)
        let info = try #require(f.mounts().first { $0.mountPoint == promoted.mountPath })
        #expect(info.fsType == "xfs" && !info.readOnly)
        #expect(try CommandRunner().run("umount", [rw.mountPath]).status == 0)
        try await b.releaseAll()
        #expect(await f.allReleased())
    }

    /// A backup can hold the volume attached read-only without a mount and read
    /// the raw device; mounting it later uses that attachment; `releaseAll`
    /// detaches what was only attached.
    @Test func aBackupHoldsTheRawDeviceWithoutAMount() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 32 << 20)).volumeID
        let a = f.manager("i-a"), b = f.manager("i-b")
        _ = try await a.mount(volume, readOnly: false)
        let held = try await b.attach(volume, readOnly: true)
        #expect(try await b.attach(volume, readOnly: true) == held)
        #expect(b.attachedVolumes() == [held] && b.mountedVolumes().isEmpty)
        #expect(try await b.localDevice(of: volume) == held.device)
        #expect(try await f.manager("i-c").localDevice(of: volume) == nil)
        #expect(!MountInfo.current().contains { $0.source == held.device })
        let name = (held.device as NSString).lastPathComponent
        #expect(try String(contentsOfFile: "/sys/block/\(name)/ro", encoding: .utf8).hasPrefix("1"))
        // The raw device reads (ext4's magic 0xEF53 at byte 1080).
        let handle = try #require(FileHandle(forReadingAtPath: held.device))
        try handle.seek(toOffset: 1080)
        #expect(try handle.read(upToCount: 2) == Data([0x53, 0xEF]))
        try handle.close()
        // Asking for it read-write while it is held read-only here is refused.
        await #expect(throws: VolumeError.self) { _ = try await b.attach(volume, readOnly: false) }

        let mounted = try await b.mount(volume, readOnly: true)
        #expect(mounted.device == held.device && b.attachedVolumes().isEmpty)
        try await b.releaseAll()
        try await a.releaseAll()
        #expect(f.mounts().isEmpty && f.loopDevices().isEmpty)
        #expect(try await f.provider.describeVolume(volume).attachments.isEmpty)
    }

    /// A revoked loop device nothing holds (its host died between the revocation
    /// and the detach) is removed by the next attach, and never adopted.
    @Test func aStaleRevokedDeviceIsRemovedOnTheNextAttach() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        let volume = try await f.provider.createVolume(VolumeSpec(sizeBytes: 32 << 20)).volumeID
        let old = try await f.provider.attachVolume(volume, instanceID: "i-a", readOnly: false).device
        try LoopCloudProvider.revoke(old)
        #expect(f.provider.isRevoked(old) && f.loopDevices() == [old])
        #expect(try await f.provider.describeVolume(volume).attachments.isEmpty)
        let new = try await f.provider.attachVolume(volume, instanceID: "i-b", readOnly: false).device
        // Gone at once, or (while a udev probe still holds it) when its holder lets go.
        #expect(await waitUntil(10) { f.loopDevices() == [new] } && !f.provider.isRevoked(new))
        try await f.provider.detachVolume(volume, instanceID: "i-b")
        #expect(f.loopDevices().isEmpty)
    }
}

/// The clouds' forced detach, against the fakes.
@Suite struct CloudFencingTests {
    /// EBS keeps a plain detach from a hung instance in `busy`; the fence's
    /// `Force=true` detaches it, and a second fence finds nothing to do.
    @Test func ebsFenceForcesADetachThatWouldStayBusy() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ec2.py", ["--attach-polls", "1", "--busy", "i-a"])
        defer { fake.stop() }
        var c = AWSConfiguration()
        c.endpoint = fake.url
        c.imdsEndpoint = fake.url
        c.availabilityZone = "us-east-1a"
        c.retry = CloudRetryPolicy(initialBackoff: .milliseconds(20), multiplier: 2, maxBackoff: .milliseconds(200), deadline: .seconds(10))
        let aws = EBSCloudProvider(configuration: c, environment: AWSFakeTests.env)
        let volume = try await aws.createVolume(VolumeSpec(sizeBytes: 4 << 30)).volumeID
        for instance in ["i-a", "i-b"] { _ = try await aws.attachVolume(volume, instanceID: instance) }
        try await aws.waitFor(volume, .attached(instanceID: "i-b"), timeout: .seconds(10), poll: .milliseconds(20))
        try await aws.waitFor(volume, .attached(instanceID: "i-a"), timeout: .seconds(10), poll: .milliseconds(20))

        try await aws.detachVolume(volume, instanceID: "i-a")
        do {
            try await aws.waitFor(volume, .detached(instanceID: "i-a"), timeout: .milliseconds(300), poll: .milliseconds(20))
            Issue.record("a busy attachment went without force")
        } catch VolumeError.timedOut(let text) {
            #expect(text.contains("busy"))
        }
        try await aws.fence(volume, instanceID: "i-a", timeout: .seconds(10), poll: .milliseconds(20))
        #expect(try await aws.describeVolume(volume).attachments.map(\.instanceID) == ["i-b"])
        try await aws.fence(volume, instanceID: "i-a", timeout: .seconds(10), poll: .milliseconds(20))
        let calls = try fake.calls()
        #expect(calls["DetachVolume+Force"] == 1 && calls["DetachVolume"] == 2)
    }

    /// ECS has no forced DetachDisk: the fence is DetachDisk and the wait.
    @Test func ecsFenceDetachesAndWaits() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ecs.py", ["--attach-polls", "1"])
        defer { fake.stop() }
        let ecs = AliyunFakeTests().provider(fake)
        let disk = try await ecs.createVolume(VolumeSpec(sizeBytes: 20 << 30)).volumeID
        for instance in ["i-a", "i-b"] { _ = try await ecs.attachVolume(disk, instanceID: instance) }
        try await ecs.waitFor(disk, .attached(instanceID: "i-b"), timeout: .seconds(10), poll: .milliseconds(20))
        try await ecs.fence(disk, instanceID: "i-a", timeout: .seconds(10), poll: .milliseconds(20))
        #expect(try await ecs.describeVolume(disk).attachments.map(\.instanceID) == ["i-b"])
        try await ecs.fence(disk, instanceID: "i-a", timeout: .seconds(10), poll: .milliseconds(20))
        #expect(try fake.calls()["DetachDisk"] == 1)
    }

    /// A folder has no attachment to cut: fencing one is refused, not faked.
    @Test func aFolderCannotBeFenced() async throws {
        let dir = try TemporaryDirectory("fence-folder")
        defer { dir.remove() }
        let folders = FolderCloudProvider(volumeRoot: dir.path)
        let volume = try folders.createVolume(id: "vol-f")
        await #expect(throws: VolumeError.self) { try await folders.forceDetachVolume(volume.volumeID, instanceID: "i-a") }
    }
}

/// Lines a child prints, read on a thread of its own (not Swift's cooperative pool).
final class LineCollector: @unchecked Sendable {
    private let lock = NSLock()
    private var collected: [String] = []
    var lines: [String] { lock.withLock { collected } }

    func read(_ handle: FileHandle) {
        Thread {
            var pending = Data()
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                pending.append(chunk)
                while let newline = pending.firstIndex(of: 0x0A) {
                    let line = String(decoding: pending[pending.startIndex..<newline], as: UTF8.self)
                    pending = Data(pending[(newline + 1)...])
                    self.lock.withLock { self.collected.append(line) }
                }
            }
        }.start()
    }

    /// The N of every "<prefix> N …" line.
    func numbers(_ prefix: String) -> [Int] {
        lines.compactMap { line in
            let fields = line.split(separator: " ")
            return fields.count >= 2 && fields[0] == prefix ? Int(fields[1]) : nil
        }
    }

    func wait(timeout seconds: Double, until done: ([String]) -> Bool) async throws {
        try await waitUntil(timeout: seconds) { done(self.lines) }
    }
}

struct Timeout: Error, CustomStringConvertible {
    var description: String
}

func waitUntil(timeout seconds: Double, _ condition: () -> Bool) async throws {
    guard await waitUntil(seconds, every: .milliseconds(50), condition) else {
        throw Timeout(description: "condition not met within \(seconds) s")
    }
}
