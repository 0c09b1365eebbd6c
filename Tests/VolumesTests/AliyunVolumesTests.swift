import Foundation
import TestSupport
import Testing
@testable import Volumes

@Suite struct ACS3Tests {
    /// The worked example of Aliyun's "Request syntax and signature method V3" page (RunInstances).
    @Test func aliyunDocumentedExample() {
        let signed = ACS3Signer().sign(
            method: "POST", host: "ecs.cn-shanghai.aliyuncs.com", path: "/",
            query: [("ImageId", "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd"), ("RegionId", "cn-shanghai")],
            action: "RunInstances", version: "2014-05-26", body: Data(),
            credentials: AliyunCredentials(accessKeyID: "YourAccessKeyId", accessKeySecret: "YourAccessKeySecret"),
            date: ISO8601DateFormatter().date(from: "2023-10-26T10:22:32Z")!, nonce: "3156853299f313e23d1673dc12e1703d")
        #expect(signed.authorization == "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action;x-acs-content-sha256;"
                + "x-acs-date;x-acs-signature-nonce;x-acs-version,Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0")
    }

    /// Aliyun's official Python SDK (alibabacloud-tea-openapi) signs the same requests.
    @Test(arguments: [
        [("RegionId", "cn-hangzhou"), ("DiskIds", "[\"d-1\",\"d-2\"]"), ("MaxResults", "10")],
        [("RegionId", "cn-hangzhou"), ("ZoneId", "cn-hangzhou-b"), ("Tag.1.Key", "a b/c+d"), ("Tag.1.Value", "é~*!'()"), ("MultiAttach", "Enabled")],
    ])
    func matchesTheOfficialSDK(_ query: [(String, String)]) async throws {
        let credentials = AliyunCredentials(accessKeyID: "LTAI5tEXAMPLE", accessKeySecret: "secret/with+chars=", securityToken: "sts-token")
        let signed = ACS3Signer().sign(method: "POST", host: "ecs.cn-hangzhou.aliyuncs.com", path: "/", query: query,
                                       action: "DescribeDisks", version: "2014-05-26", body: Data(), credentials: credentials,
                                       date: Date(timeIntervalSince1970: 1_790_000_000), nonce: "nonce-1")
        let input: [String: Any] = ["query": Dictionary(query, uniquingKeysWith: { a, _ in a }),
                                    "headers": Dictionary(signed.headers.filter { $0.0 != "Authorization" } + [("host", "ecs.cn-hangzhou.aliyuncs.com")],
                                                          uniquingKeysWith: { a, _ in a })]
        let expected = try await python("""
        import json, sys, types
        from alibabacloud_tea_openapi.utils import Utils
        c = json.load(sys.stdin)
        r = types.SimpleNamespace(method="POST", pathname="/", query=c["query"], headers=c["headers"])
        print(Utils.get_authorization(r, "ACS3-HMAC-SHA256", c["headers"]["x-acs-content-sha256"], "LTAI5tEXAMPLE", "secret/with+chars="))
        """, input: String(decoding: try JSONSerialization.data(withJSONObject: input), as: UTF8.self))
        #expect(expected.hasPrefix("ACS3-HMAC-SHA256 Credential=LTAI5tEXAMPLE,SignedHeaders=host;x-acs-action;"))
        #expect(signed.authorization == expected)
    }
}

/// The ESSD provider against our fake ECS, whose signature check is the official SDK's.
@Suite struct AliyunFakeTests {
    static let env = ["ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAIFAKE", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "fake-secret"]

    func provider(_ fake: ServerProcess, env: [String: String] = Self.env, deadline: Duration = .seconds(10),
                  configure: (inout AliyunConfiguration) -> Void = { _ in }) -> ECSCloudProvider {
        var c = AliyunConfiguration()
        c.endpoint = fake.url
        c.metadataEndpoint = fake.url
        c.retry = CloudRetryPolicy(initialBackoff: .milliseconds(20), multiplier: 2, maxBackoff: .milliseconds(200), deadline: deadline)
        configure(&c)
        return ECSCloudProvider(configuration: c, environment: env)
    }

    @Test func multiAttachLifecycleWithIdentityFromMetadata() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ecs.py", ["--attach-polls", "2", "--instance-id", "i-meta"])
        defer { fake.stop() }
        let ecs = provider(fake)
        #expect(try await ecs.region() == "cn-hangzhou")
        #expect(try await ecs.instanceID() == "i-meta")
        let spec = VolumeSpec(sizeBytes: 40 << 30, tags: ["shardfs": "yes"], idempotencyToken: "tok")
        let disk = try await ecs.createVolume(spec)
        #expect(disk.volumeID.hasPrefix("d-") && disk.type == "cloud_essd" && disk.multiAttach && disk.sizeBytes == 40 << 30)
        #expect(disk.availabilityZone == "cn-hangzhou-b" && disk.tags == ["shardfs": "yes"] && disk.state == .available)
        #expect(try await ecs.createVolume(spec).volumeID == disk.volumeID)

        _ = try await ecs.attachVolume(disk.volumeID, instanceID: "i-meta")
        _ = try await ecs.attachVolume(disk.volumeID, instanceID: "i-other")
        let both = try await ecs.waitFor(disk.volumeID, .attached(instanceID: "i-other"), timeout: .seconds(10), poll: .milliseconds(20))
        #expect(both?.attachments.map(\.instanceID) == ["i-meta", "i-other"] && both?.state == .inUse)
        do {
            try await ecs.deleteVolume(disk.volumeID)
            Issue.record("deleted an attached disk")
        } catch VolumeError.cloud(let e) {
            #expect(e.code == "IncorrectDiskStatus" && e.httpStatus == 403 && !e.requestID.isEmpty)
        }
        try await ecs.detachVolume(disk.volumeID, instanceID: "i-other")
        let left = try await ecs.waitFor(disk.volumeID, .detached(instanceID: "i-other"), timeout: .seconds(10), poll: .milliseconds(20))
        #expect(left?.attachments.map(\.instanceID) == ["i-meta"])
        try await ecs.detachVolume(disk.volumeID, instanceID: "i-meta")
        try await ecs.waitFor(disk.volumeID, .state(.available), timeout: .seconds(10), poll: .milliseconds(20))
        try await ecs.deleteVolume(disk.volumeID)
        await #expect(throws: VolumeError.notFound(disk.volumeID)) { _ = try await ecs.describeVolume(disk.volumeID) }
        do {
            try await ecs.deleteVolume(disk.volumeID)
            Issue.record("deleted twice")
        } catch let error as VolumeError {
            #expect(error.isNotFound && "\(error)".contains("InvalidDiskId.NotFound"))
        }
    }

    @Test func pagesThrottlingAndWrongCredentials() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ecs.py", ["--throttle", "AttachDisk=2", "--throttle", "DeleteDisk=1000"])
        defer { fake.stop() }
        let ecs = provider(fake, deadline: .seconds(30)) { $0.zone = "cn-hangzhou-h"; $0.region = "cn-hangzhou"; $0.instanceID = "i-1" }
        var ids: [String] = []
        for _ in 0..<5 { ids.append(try await ecs.createVolume(VolumeSpec(sizeBytes: 20 << 30)).volumeID) }
        let page = try await ecs.describeVolumes([], nextToken: nil, maxResults: 2)
        #expect(page.volumes.count == 2 && page.nextToken != nil)
        #expect(try await ecs.listVolumes(pageSize: 2).map(\.volumeID) == ids.sorted())

        _ = try await ecs.attachVolume(ids[0], instanceID: "i-1")
        #expect(try fake.calls()["AttachDisk"] == 3)
        do {
            try await provider(fake, deadline: .seconds(1)) { $0.region = "cn-hangzhou" }.deleteVolume(ids[1])
            Issue.record("no deadline")
        } catch VolumeError.timedOut(let text) {
            #expect(text.contains("Throttling.User") && text.contains("DeleteDisk"))
        }
        let wrong = provider(fake, env: ["ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAIFAKE", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "wrong"]) {
            $0.region = "cn-hangzhou"
        }
        let before = try fake.calls()["DescribeDisks"] ?? 0
        do {
            _ = try await wrong.describeVolumes([], nextToken: nil, maxResults: nil)
            Issue.record("a wrong secret was accepted")
        } catch VolumeError.cloud(let e) {
            #expect(e.code == "SignatureDoesNotMatch" && e.message == "Specified signature does not match our calculation.")
        }
        #expect(try fake.calls()["DescribeDisks"] == before + 1)
        let nowhere = provider(fake) { $0.region = "xx-nowhere-1" }
        do {
            _ = try await nowhere.describeVolumes([], nextToken: nil, maxResults: nil)
            Issue.record("an unknown region was accepted")
        } catch VolumeError.cloud(let e) {
            #expect(e.code == "InvalidRegionId.NotFound" && e.message.contains("xx-nowhere-1"))
        }
        // No keys and no RAM role: a credentials error, not a call.
        let none = provider(fake, env: [:])
        do {
            _ = try await none.credentials()
            Issue.record("credentials without keys or a role")
        } catch VolumeError.credentials(let text) {
            #expect(text.contains("ALIBABA_CLOUD_ACCESS_KEY_ID"))
        }
    }

    @Test func ramRoleCredentialsFromTheMetadataService() async throws {
        let fake = try await ServerProcess.start(fixture: "fake_ecs.py", ["--ram-role", "shardfs-role"])
        defer { fake.stop() }
        let ecs = provider(fake, env: [:])
        let credentials = try await ecs.credentials()
        #expect(credentials.accessKeyID == "STS.FAKEROLEKEY" && credentials.securityToken == "role-security-token")
        // The role's keys and token sign calls the fake verifies with the SDK.
        let disk = try await ecs.createVolume(VolumeSpec(sizeBytes: 20 << 30))
        #expect(try await ecs.describeVolume(disk.volumeID).sizeBytes == 20 << 30)
    }
}
