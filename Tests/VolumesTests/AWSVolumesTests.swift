import Foundation
import TestSupport
import Testing
@testable import Volumes

/// The EBS provider against our fake EC2 (several attachments per volume,
/// `attaching` for a while, throttling, signatures checked with botocore).
@Suite struct AWSFakeTests {
    static let env = ["AWS_ACCESS_KEY_ID": "AKIDFAKE", "AWS_SECRET_ACCESS_KEY": "fake-secret", "AWS_REGION": "us-east-1"]

    func provider(_ fake: ServerProcess, env: [String: String] = Self.env, deadline: Duration = .seconds(10),
                  configure: (inout AWSConfiguration) -> Void = { _ in }) -> EBSCloudProvider {
        var c = AWSConfiguration()
        c.endpoint = fake.url
        c.imdsEndpoint = fake.url
        c.availabilityZone = "us-east-1a"
        c.retry = CloudRetryPolicy(initialBackoff: .milliseconds(20), multiplier: 2, maxBackoff: .milliseconds(200), deadline: deadline)
        configure(&c)
        return EBSCloudProvider(configuration: c, environment: env)
    }

    @Test func multiAttachLifecycle() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ec2.py", ["--attach-polls", "2"])
        defer { fake.stop() }
        let aws = provider(fake)
        let spec = VolumeSpec(sizeBytes: 10 << 30, iops: 4000, tags: ["shardfs": "yes", "owner": "a b"], idempotencyToken: "create-1")
        let created = try await aws.createVolume(spec)
        #expect(created.volumeID.hasPrefix("vol-") && created.type == "io2" && created.iops == 4000 && created.multiAttach)
        #expect(created.sizeBytes == 10 << 30 && created.availabilityZone == "us-east-1a" && created.tags == ["shardfs": "yes", "owner": "a b"])
        #expect(try await aws.createVolume(spec).volumeID == created.volumeID)  // same token, same volume

        let a = try await aws.attachVolume(created.volumeID, instanceID: "i-a")
        let b = try await aws.attachVolume(created.volumeID, instanceID: "i-b")
        #expect(a.state == .attaching && b.state == .attaching && a.device == "/dev/sdf" && b.device == "/dev/sdf")
        let attached = try await aws.waitFor(created.volumeID, .attached(instanceID: "i-b"), timeout: .seconds(10), poll: .milliseconds(20))
        #expect(attached?.attachments.map(\.instanceID) == ["i-a", "i-b"] && attached?.state == .inUse)
        // A second volume on i-a gets the next free device name.
        let other = try await aws.createVolume(VolumeSpec(sizeBytes: 1 << 30))
        #expect(try await aws.attachVolume(other.volumeID, instanceID: "i-a").device == "/dev/sdg")

        // Deleting an attached volume: EC2's own code and message come back, at once.
        do {
            try await aws.deleteVolume(created.volumeID)
            Issue.record("deleted an attached volume")
        } catch VolumeError.cloud(let e) {
            #expect(e.code == "VolumeInUse" && e.message.contains(created.volumeID) && e.httpStatus == 400 && !e.requestID.isEmpty)
        }
        try await aws.detachVolume(created.volumeID, instanceID: "i-b")
        let left = try await aws.waitFor(created.volumeID, .detached(instanceID: "i-b"), timeout: .seconds(10), poll: .milliseconds(20))
        #expect(left?.attachments.map(\.instanceID) == ["i-a"])
        try await aws.detachVolume(created.volumeID, instanceID: "i-a")
        try await aws.waitFor(created.volumeID, .state(.available), timeout: .seconds(10), poll: .milliseconds(20))
        try await aws.deleteVolume(created.volumeID)
        do {
            _ = try await aws.describeVolume(created.volumeID)
            Issue.record("a deleted volume is described")
        } catch let error as VolumeError {
            #expect(error.isNotFound)
            #expect(error == .cloud(CloudAPIError(provider: "aws", action: "DescribeVolumes", code: "InvalidVolume.NotFound",
                                                  message: "The volume '\(created.volumeID)' does not exist.", httpStatus: 400,
                                                  requestID: { if case .cloud(let e) = error { return e.requestID }; return "" }())))
        }
        let calls = try fake.calls()
        #expect(calls["DeleteVolume"] == 2)  // the refused one was not retried
    }

    @Test func describePagesWithNextToken() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ec2.py")
        defer { fake.stop() }
        let aws = provider(fake)
        var ids: [String] = []
        for _ in 0..<12 { ids.append(try await aws.createVolume(VolumeSpec(sizeBytes: 1 << 30)).volumeID) }
        let first = try await aws.describeVolumes([], nextToken: nil, maxResults: 5)
        #expect(first.volumes.count == 5 && first.nextToken != nil)
        #expect(try await aws.listVolumes(pageSize: 5).map(\.volumeID) == ids.sorted())
        #expect(try fake.calls()["DescribeVolumes"] == 1 + 3)
    }

    @Test func throttlingAnd5xxAreRetriedOthersAreNot() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ec2.py", ["--throttle", "AttachVolume=2", "--fail5xx", "CreateVolume=1",
                                                              "--throttle", "DeleteVolume=1000"])
        defer { fake.stop() }
        let aws = provider(fake, deadline: .seconds(30))
        let retried = LockedList()
        aws.onRetry = { retried.append("\($0)") }
        let volume = try await aws.createVolume(VolumeSpec(sizeBytes: 1 << 30))
        _ = try await aws.attachVolume(volume.volumeID, instanceID: "i-a")
        var calls = try fake.calls()
        #expect(calls["CreateVolume"] == 2 && calls["AttachVolume"] == 3)
        #expect(retried.items.count == 3 && retried.items.filter { $0.contains("RequestLimitExceeded") }.count == 2)
        // Throttled past the deadline: a timeout that says why.
        do {
            try await provider(fake, deadline: .seconds(1)).deleteVolume(volume.volumeID)
            Issue.record("no deadline")
        } catch VolumeError.timedOut(let text) {
            #expect(text.contains("DeleteVolume") && text.contains("RequestLimitExceeded") && text.contains("Request limit exceeded."))
        }
        // Wrong credentials fail at once with EC2's code.
        let wrong = provider(fake, env: ["AWS_ACCESS_KEY_ID": "AKIDFAKE", "AWS_SECRET_ACCESS_KEY": "not-the-secret", "AWS_REGION": "us-east-1"])
        calls = try fake.calls()
        do {
            _ = try await wrong.describeVolumes([], nextToken: nil, maxResults: nil)
            Issue.record("a wrong secret was accepted")
        } catch VolumeError.cloud(let e) {
            #expect(e.code == "SignatureDoesNotMatch" && e.httpStatus == 403
                    && e.message == "The request signature we calculated does not match the signature you provided.")
        }
        #expect(try fake.calls()["DescribeVolumes"] == (calls["DescribeVolumes"] ?? 0) + 1)
        // A region the credentials are not scoped to.
        let elsewhere = provider(fake, env: ["AWS_ACCESS_KEY_ID": "AKIDFAKE", "AWS_SECRET_ACCESS_KEY": "fake-secret", "AWS_REGION": "eu-west-9"])
        do {
            _ = try await elsewhere.describeVolumes([], nextToken: nil, maxResults: nil)
            Issue.record("a wrong region was accepted")
        } catch VolumeError.cloud(let e) {
            #expect(e.code == "AuthFailure" && e.message.contains("eu-west-9"))
        }
    }

    @Test func identityAndCredentialsFromIMDSv2() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ec2.py", ["--instance-id", "i-0123imds"])
        defer { fake.stop() }
        let aws = provider(fake, env: [:]) { $0.availabilityZone = "" }
        #expect(try await aws.region() == "us-east-1")
        #expect(try await aws.instanceID() == "i-0123imds")
        let credentials = try await aws.credentials()
        #expect(credentials.accessKeyID == "ASIAFAKEROLEKEY" && credentials.sessionToken == "role-session-token")
        // The role's keys and session token sign a call the fake verifies; the zone comes from IMDS too.
        let volume = try await aws.createVolume(VolumeSpec(sizeBytes: 1 << 30))
        #expect(volume.availabilityZone == "us-east-1a")
        // The environment wins over IMDS and the configuration.
        let configured = provider(fake, env: ["INSTANCE_ID": "i-env", "AWS_REGION": "us-east-1"]) {
            $0.instanceID = "i-config"
            $0.accessKeyID = "AKIDFAKE"
            $0.secretAccessKey = "fake-secret"
        }
        #expect(try await configured.instanceID() == "i-env")
        #expect(try await configured.credentials().accessKeyID == "AKIDFAKE")
        _ = try await configured.describeVolume(volume.volumeID)
        // A key without its secret is a configuration error, not a call.
        let half = provider(fake, env: [:]) { $0.accessKeyID = "AKIDFAKE" }
        await #expect(throws: VolumeError.self) { _ = try await half.credentials() }
    }
}

@Suite struct MetadataServiceTests {
    /// Off the cloud nothing answers at the metadata address: the retries stop at
    /// the deadline with an error that says what to configure.
    @Test func anUnreachableMetadataServiceSaysWhatToConfigure() async throws {
        var c = AWSConfiguration()
        c.imdsEndpoint = "http://127.0.0.1:\(ServerProcess.freePort())"
        c.retry = CloudRetryPolicy(initialBackoff: .milliseconds(20), deadline: .seconds(2))
        let aws = EBSCloudProvider(configuration: c, environment: [:])
        do {
            _ = try await aws.region()
            Issue.record("a region without a metadata service")
        } catch VolumeError.timedOut(let text) {
            #expect(text.contains("placement/region") && text.contains("unreachable") && text.contains("configure the region"))
        }
    }
}

final class LockedList: @unchecked Sendable {
    private let lock = NSLock()
    private var storage: [String] = []
    func append(_ s: String) { lock.withLock { storage.append(s) } }
    var items: [String] { lock.withLock { storage } }
}

/// The same provider against moto_server (request signing, XML, error paths).
@Suite struct AWSMotoTests {
    @Test func createAttachDetachDeleteOnMoto() async throws {
        let moto = try await ServerProcess.startMoto()
        defer { moto.stop() }
        var c = AWSConfiguration()
        c.endpoint = moto.url
        c.availabilityZone = "us-east-1a"
        c.retry = CloudRetryPolicy(initialBackoff: .milliseconds(20), deadline: .seconds(5))
        let aws = EBSCloudProvider(configuration: c, environment: ["AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                                                  "AWS_REGION": "us-east-1"])
        // moto attaches only to instances it knows: start one through the same signed client.
        let images = try await aws.call("DescribeImages", [])
        let image = try #require(images.items("imagesSet").first?["imageId"])
        let run = try await aws.call("RunInstances", [("ImageId", image), ("MinCount", "1"), ("MaxCount", "1"),
                                                     ("Placement.AvailabilityZone", "us-east-1a")])
        let instance = try #require(run.items("instancesSet").first?["instanceId"])

        let volume = try await aws.createVolume(VolumeSpec(sizeBytes: 20 << 30, iops: 5000, tags: ["shardfs": "moto"]))
        let described = try await aws.describeVolume(volume.volumeID)
        #expect(described.type == "io2" && described.iops == 5000 && described.multiAttach && described.sizeBytes == 20 << 30)
        #expect(described.tags == ["shardfs": "moto"])
        let attachment = try await aws.attachVolume(volume.volumeID, instanceID: instance)
        #expect(attachment.instanceID == instance && !attachment.device.isEmpty)
        try await aws.waitFor(volume.volumeID, .attached(instanceID: instance), timeout: .seconds(10), poll: .milliseconds(50))
        try await aws.detachVolume(volume.volumeID, instanceID: instance)
        try await aws.waitFor(volume.volumeID, .detached(instanceID: instance), timeout: .seconds(10), poll: .milliseconds(50))
        #expect(try await aws.listVolumes().contains { $0.volumeID == volume.volumeID })
        try await aws.deleteVolume(volume.volumeID)
        do {
            try await aws.deleteVolume(volume.volumeID)
            Issue.record("deleted twice")
        } catch VolumeError.cloud(let e) {
            #expect(e.code == "InvalidVolume.NotFound" && e.message.contains(volume.volumeID))
        }
    }
}

/// The volume manager over the EBS provider: the fake EC2 attaches, and the
/// "NVMe device" is a loop device the test links into a by-id folder under
/// the volume's serial, as udev does on a Nitro host.
@Suite(.serialized, .enabled(if: LoopFixture.isRoot, "loop devices and mounts need root"))
struct AWSManagerTests {
    @Test func managerAttachesFindsTheDeviceBySerialFormatsAndMounts() async throws {
        let f = try LoopFixture()
        defer { f.cleanUp() }
        // The first AttachVolume lands but its answer is lost (a 500): the retry is refused as
        // "in use", and the manager goes on because the cloud shows the attachment.
        let fake = try await ServerProcess.start(fixture: "fake_ec2.py", ["--attach-polls", "3", "--lose-answer", "AttachVolume=1"])
        defer { fake.stop() }
        var c = AWSConfiguration()
        c.endpoint = fake.url
        c.availabilityZone = "us-east-1a"
        c.discovery = DeviceDiscovery(byIDDirectory: f.dir.sub("by-id"), sysBlockDirectory: f.dir.sub("no-sysfs"))
        let aws = EBSCloudProvider(configuration: c, environment: AWSFakeTests.env)
        let volume = try await aws.createVolume(VolumeSpec(sizeBytes: 1 << 30))

        // The block device the "cloud" will present.
        _ = FileManager.default.createFile(atPath: f.dir.sub("disk.img"), contents: nil)
        #expect(truncate(f.dir.sub("disk.img"), 64 << 20) == 0)
        let device = try CommandRunner().run("losetup", ["-f", "--show", f.dir.sub("disk.img")]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        try FileManager.default.createDirectory(atPath: f.dir.sub("by-id"), withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: f.dir.sub("by-id/nvme-Amazon_Elastic_Block_Store_\(DeviceDiscovery.ebsSerial(volume.volumeID))"),
                                                   withDestinationPath: device)

        let manager = BlockVolumeManager(provider: aws, volumeRoot: f.dir.sub("root"), instanceID: "i-a")
        manager.pollInterval = .milliseconds(20)
        let mounted = try await manager.mount(volume.volumeID, readOnly: false)
        #expect(mounted.device == device && mounted.mountPath == f.dir.sub("root/\(volume.volumeID)"))
        #expect(f.mounts().first { $0.mountPoint == mounted.mountPath }?.fsType == "ext4")
        #expect(try await aws.describeVolume(volume.volumeID).attachment(of: "i-a")?.state == .attached)
        try await manager.detach(volume.volumeID)
        #expect(f.mounts().isEmpty)
        #expect(try await aws.describeVolume(volume.volumeID).attachments.isEmpty)
        #expect(try fake.calls()["DetachVolume"] == 1 && fake.calls()["AttachVolume"] == 2)
    }
}
