import Foundation
import TestSupport
import Testing
@testable import Volumes

/// A provider whose describe answers follow a script, to test the generic waits.
final class ScriptedProvider: CloudProvider, @unchecked Sendable {
    let name = "scripted"
    private let lock = NSLock()
    private var answers: [CloudVolume?]
    private(set) var calls = 0
    private(set) var forcedDetaches = 0
    /// What `forceDetachVolume` throws, if anything.
    var forceError: VolumeError?

    init(_ answers: [CloudVolume?]) { self.answers = answers }

    func describeVolumes(_ volumeIDs: [String], nextToken: String?, maxResults: Int?) async throws -> VolumePage {
        let answer = lock.withLock { () -> CloudVolume? in
            calls += 1
            return answers.count > 1 ? answers.removeFirst() : answers[0]
        }
        guard let answer else { throw VolumeError.notFound(volumeIDs.first ?? "") }
        return VolumePage(volumes: [answer], nextToken: nil)
    }
    func createVolume(_ spec: VolumeSpec) async throws -> CloudVolume { throw VolumeError.failed("unused") }
    func attachVolume(_ volumeID: String, instanceID: String, readOnly: Bool) async throws -> VolumeAttachment { throw VolumeError.failed("unused") }
    func detachVolume(_ volumeID: String, instanceID: String) async throws {}
    func forceDetachVolume(_ volumeID: String, instanceID: String) async throws {
        lock.withLock { forcedDetaches += 1 }
        if let forceError { throw forceError }
    }
    func deleteVolume(_ volumeID: String) async throws {}
    func localDevice(of volumeID: String, instanceID: String) async throws -> String? { nil }
}

@Suite struct ProviderInterfaceTests {
    func volume(_ state: VolumeState, _ attachments: [VolumeAttachment]) -> CloudVolume {
        CloudVolume(volumeID: "vol-1", sizeBytes: 1 << 30, state: state, attachments: attachments)
    }

    /// The deadline of waits that end after a few 10 ms polls when the code is
    /// right. Far above them: in the full suite, every test that starts in its
    /// first minute (dozens of suites starting processes, etcd, loop devices on
    /// two vCPUs) takes over 60 s, even one that does nothing but return, and a
    /// 60 s deadline failed this way on 2026-12-07 (twice) and before.
    static let patience: Duration = .seconds(600)

    @Test func waitForAttachmentIsPerInstance() async throws {
        // Another instance's attachment does not satisfy the wait for i-b.
        let provider = ScriptedProvider([
            volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .attached)]),
            volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .attached), VolumeAttachment(instanceID: "i-b", state: .attaching)]),
            volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .attached), VolumeAttachment(instanceID: "i-b", state: .attached)]),
        ])
        let done = try await provider.waitFor("vol-1", .attached(instanceID: "i-b"), timeout: Self.patience, poll: .milliseconds(10))
        #expect(done?.attachment(of: "i-b")?.state == .attached)
        #expect(provider.calls == 3)
    }

    @Test func waitForDetachKeepsOtherAttachments() async throws {
        let provider = ScriptedProvider([
            volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .attached), VolumeAttachment(instanceID: "i-b", state: .detaching)]),
            volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .attached)]),
        ])
        let done = try await provider.waitFor("vol-1", .detached(instanceID: "i-b"), timeout: Self.patience, poll: .milliseconds(10))
        #expect(done?.attachments.map(\.instanceID) == ["i-a"])
    }

    @Test func fenceWaitsOutADetachInProgressAndRefusesWhenStillAttached() async throws {
        let refused = VolumeError.cloud(CloudAPIError(provider: "aliyun", action: "DetachDisk", code: "IncorrectDiskStatus",
                                                      message: "detaching", httpStatus: 403))
        // A detach already under way: the refusal is waited out.
        let detaching = ScriptedProvider([
            volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .detaching), VolumeAttachment(instanceID: "i-b", state: .attached)]),
            volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .detaching), VolumeAttachment(instanceID: "i-b", state: .attached)]),
            volume(.inUse, [VolumeAttachment(instanceID: "i-b", state: .attached)]),
        ])
        detaching.forceError = refused
        try await detaching.fence("vol-1", instanceID: "i-a", timeout: Self.patience, poll: .milliseconds(10))
        #expect(detaching.forcedDetaches == 1)
        // Refused while the cloud still shows it attached: the fence fails, it does not pretend.
        let stuck = ScriptedProvider([volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .attached)])])
        stuck.forceError = refused
        await #expect(throws: refused) { try await stuck.fence("vol-1", instanceID: "i-a", timeout: .seconds(60), poll: .milliseconds(10)) }
        // Nothing attached: nothing to do.
        let gone = ScriptedProvider([volume(.available, [])])
        try await gone.fence("vol-1", instanceID: "i-a", timeout: .seconds(1), poll: .milliseconds(10))
        #expect(gone.forcedDetaches == 0)
        // Not confirmed in time: timedOut, saying the instance may still write.
        let slow = ScriptedProvider([volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .busy)])])
        do {
            try await slow.fence("vol-1", instanceID: "i-a", timeout: .milliseconds(100), poll: .milliseconds(20))
            Issue.record("an unconfirmed fence returned")
        } catch VolumeError.timedOut(let text) {
            #expect(text.contains("i-a") && text.contains("may still write"))
        }
    }

    @Test func waitTimesOutNamingTheVolumeAndWhatItSaw() async throws {
        let provider = ScriptedProvider([volume(.inUse, [VolumeAttachment(instanceID: "i-a", state: .attaching)])])
        do {
            try await provider.waitFor("vol-1", .attached(instanceID: "i-a"), timeout: .milliseconds(100), poll: .milliseconds(20))
            Issue.record("the wait returned")
        } catch VolumeError.timedOut(let text) {
            #expect(text.contains("vol-1") && text.contains("attaching"))
        }
    }

    @Test func waitFailsFastOnErrorStateOrAVanishedVolume() async throws {
        let broken = ScriptedProvider([volume(.error, [])])
        await #expect(throws: VolumeError.self) {
            try await broken.waitFor("vol-1", .state(.available), timeout: .seconds(30), poll: .milliseconds(10))
        }
        #expect(broken.calls == 1)
        let gone = ScriptedProvider([nil])
        await #expect(throws: VolumeError.notFound("vol-1")) {
            try await gone.waitFor("vol-1", .attached(instanceID: "i-a"), timeout: .seconds(30), poll: .milliseconds(10))
        }
        #expect(try await gone.waitFor("vol-1", .deleted, timeout: .seconds(1)) == nil)
    }

    @Test func retryRetriesOnlyTransientErrorsUntilTheDeadline() async throws {
        // A deadline far above the three short waits, so a busy machine cannot make it run out.
        // (The whole suite in one process once delayed these short sleeps by 35 s.)
        let policy = CloudRetryPolicy(initialBackoff: .milliseconds(5), multiplier: 2, maxBackoff: .milliseconds(20), deadline: .seconds(120))
        let short = CloudRetryPolicy(initialBackoff: .milliseconds(5), multiplier: 2, maxBackoff: .milliseconds(20), deadline: .milliseconds(300))
        let throttled = VolumeError.cloud(CloudAPIError(provider: "aws", action: "AttachVolume", code: "RequestLimitExceeded", message: "slow down", httpStatus: 503))
        nonisolated(unsafe) var tries = 0
        let value = try await policy.run("attach") { () async throws -> Int in
            tries += 1
            if tries < 3 { throw throttled }
            return 7
        }
        #expect(value == 7 && tries == 3)

        tries = 0
        let denied = VolumeError.cloud(CloudAPIError(provider: "aws", action: "AttachVolume", code: "UnauthorizedOperation", message: "no", httpStatus: 403))
        await #expect(throws: denied) { try await policy.run("attach") { tries += 1; throw denied } }
        #expect(tries == 1)

        do {
            try await short.run("attach") { throw throttled }
            Issue.record("no deadline")
        } catch VolumeError.timedOut(let text) {
            #expect(text.contains("RequestLimitExceeded") && text.contains("slow down"))
        }
    }

    @Test func cloudErrorsKeepTheirCodeAndClassify() {
        let notFound = CloudAPIError(provider: "aws", action: "DescribeVolumes", code: "InvalidVolume.NotFound",
                                     message: "The volume 'vol-1' does not exist.", httpStatus: 400, requestID: "r-1")
        #expect(VolumeError.cloud(notFound).isNotFound && !VolumeError.cloud(notFound).isTransient)
        #expect(notFound.description == "aws DescribeVolumes failed: InvalidVolume.NotFound: The volume 'vol-1' does not exist. (request r-1)")
        #expect(CloudAPIError(provider: "aliyun", action: "AttachDisk", code: "Throttling.User", message: "", httpStatus: 400).isTransient)
        #expect(CloudAPIError(provider: "aws", action: "x", code: "HTTP 502", message: "", httpStatus: 502).isTransient)
        #expect(VolumeSpec(sizeBytes: (1 << 30) + 1).sizeGiB == 2 && VolumeSpec(sizeBytes: 0).sizeGiB == 1)
    }
}

@Suite struct DeviceDiscoveryTests {
    @Test func ebsAndAliyunDevicesAreFoundByTheirUdevLinks() throws {
        let dir = try TemporaryDirectory("byid")
        try FileManager.default.createDirectory(atPath: dir.sub("by-id"), withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: dir.sub("nvme3n1"), contents: Data())
        _ = FileManager.default.createFile(atPath: dir.sub("vdc"), contents: Data())
        try FileManager.default.createSymbolicLink(atPath: dir.sub("by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"),
                                                   withDestinationPath: "../nvme3n1")
        try FileManager.default.createSymbolicLink(atPath: dir.sub("by-id/virtio-bp1abcdefghijklmnopq"), withDestinationPath: "../vdc")
        let discovery = DeviceDiscovery(byIDDirectory: dir.sub("by-id"), sysBlockDirectory: dir.sub("none"))
        #expect(discovery.ebsDevice("vol-0123456789abcdef0") == dir.sub("nvme3n1"))
        #expect(discovery.ebsDevice("vol-0ffff") == nil)
        // virtio serials keep 20 characters of the disk ID.
        #expect(discovery.aliyunDevice("d-bp1abcdefghijklmnopqrst") == dir.sub("vdc"))
    }

    @Test func withoutUdevTheSysfsSerialIsRead() throws {
        let dir = try TemporaryDirectory("sysblock")
        for (disk, serial) in [("nvme0n1", "AWS-root\n"), ("nvme1n1", "vol0abc                 \n"), ("nvme2n1", "bp1xyz\n")] {
            try FileManager.default.createDirectory(atPath: dir.sub("\(disk)/device"), withIntermediateDirectories: true)
            try serial.write(toFile: dir.sub("\(disk)/device/serial"), atomically: true, encoding: .utf8)
        }
        let discovery = DeviceDiscovery(byIDDirectory: dir.sub("no-by-id"), sysBlockDirectory: dir.path)
        #expect(discovery.ebsDevice("vol-0abc") == "/dev/nvme1n1")
        #expect(discovery.aliyunDevice("d-bp1xyz") == "/dev/nvme2n1")
        #expect(discovery.ebsDevice("vol-0abd") == nil)
    }

    @Test func mountinfoParsesEscapesAndSuperOptions() {
        let text = """
        22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
        97 22 7:3 / /tmp/a\\040b/vol-1 ro,relatime shared:50 - ext4 /dev/loop3 ro,norecovery
        """
        let infos = MountInfo.parse(text)
        #expect(infos.count == 2)
        #expect(infos[1] == MountInfo(id: 97, mountPoint: "/tmp/a b/vol-1", source: "/dev/loop3", fsType: "ext4",
                                      options: ["ro", "relatime"], superOptions: ["ro", "norecovery"]))
        #expect(infos[1].readOnly && !infos[0].readOnly)
        #expect(MountInfo.current().contains { $0.mountPoint == "/" })
    }
}
