import Foundation
import TestSupport
import Testing

/// `cloud.provider: aws` and `aliyun` wired through the configuration: the
/// endpoint, keys, region and instance come from the YAML file, and
/// `shardfs volume list` reads the fake cloud's volumes (the fakes check every
/// signature). No devices: the node holds no volumes and creates none.
@Suite struct CloudNodeTests {
    static func fixture(_ name: String) -> String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("VolumesTests/fixtures/\(name)").path
    }

    /// Starts a fake on a thread of its own, under a watchdog that kills it if the
    /// test process dies first; returns the process and its port.
    static func startFake(_ name: String) async throws -> (WatchedProcess, Int) {
        try await withCheckedThrowingContinuation { continuation in
            Thread {
                continuation.resume(with: Result {
                    let process = WatchedProcess("/usr/bin/env", ["python3", fixture(name)])
                    let text = (try process.startReadingFirstLine() ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
                    guard let port = Int(text.split(separator: " ").last ?? "") else {
                        process.stop()
                        throw CocoaError(.fileReadCorruptFile)
                    }
                    return (process, port)
                })
            }.start()
        }
    }

    static func stop(_ process: WatchedProcess) {
        process.stop()
    }

    /// `shardfs volume list` of a node whose cloud is `cloud` (holding no volumes, creating none).
    func listWith(_ cloud: NodeConfigFile.Cloud, dir: TemporaryDirectory) async throws -> ProcessResult {
        var cloud = cloud
        cloud.initialVolumes = 0
        cloud.retryDeadlineSeconds = 5
        let config = try NodeConfigFile(nodeID: "n1", instanceID: "i-node", dataDir: dir.sub("data"), cloud: cloud)
            .write(to: dir.sub("node.yaml"))
        try FileManager.default.createDirectory(atPath: dir.sub("data"), withIntermediateDirectories: true)
        // The environment's cloud keys would win over the file's: none here.
        let shardfs = productsDirectory().appendingPathComponent("shardfs").path
        return try await runAsync("/usr/bin/env", ["-u", "AWS_ACCESS_KEY_ID", "-u", "AWS_SECRET_ACCESS_KEY", "-u", "AWS_REGION",
                                                   "-u", "ALIBABA_CLOUD_ACCESS_KEY_ID", "-u", "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
                                                   shardfs, "volume", "list", "--config", config])
    }

    @Test func awsFromTheConfiguration() async throws {
        let dir = try TemporaryDirectory("cloudnode")
        let (fake, port) = try await Self.startFake("fake_ec2.py")
        defer { Self.stop(fake) }
        // A volume made by boto3 (the reference client) in the fake.
        let made = try await runAsync("/usr/bin/env", ["python3", "-c", """
            import boto3
            ec2 = boto3.client("ec2", endpoint_url="http://127.0.0.1:\(port)", region_name="us-east-1",
                               aws_access_key_id="AKIDFAKE", aws_secret_access_key="fake-secret")
            print(ec2.create_volume(Size=8, VolumeType="io2", Iops=3000, MultiAttachEnabled=True,
                                    AvailabilityZone="us-east-1a")["VolumeId"])
            """])
        #expect(made.status == 0, "\(made.stderr)")
        let volume = made.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let list = try await listWith(.init(provider: "aws", region: "us-east-1", endpoint: "http://127.0.0.1:\(port)",
                                         accessKeyID: "AKIDFAKE", secretAccessKey: "fake-secret"), dir: dir)
        #expect(list.status == 0, "\(list.stderr)")
        let row = try #require(list.stdout.split(separator: "\n").first { $0.hasPrefix(volume) })
        #expect(row.contains("8GiB") && row.contains("io2") && row.contains("us-east-1a") && row.contains("(unregistered)"))

        // A wrong secret: the command fails with EC2's code.
        let wrong = try await listWith(.init(provider: "aws", region: "us-east-1", endpoint: "http://127.0.0.1:\(port)",
                                         accessKeyID: "AKIDFAKE", secretAccessKey: "wrong"), dir: dir)
        #expect(wrong.status != 0 && wrong.stderr.contains("SignatureDoesNotMatch"))
    }

    @Test func aliyunFromTheConfiguration() async throws {
        let dir = try TemporaryDirectory("cloudnode")
        let (fake, port) = try await Self.startFake("fake_ecs.py")
        defer { Self.stop(fake) }
        let list = try await listWith(.init(provider: "aliyun", region: "cn-hangzhou", endpoint: "http://127.0.0.1:\(port)",
                                         accessKeyID: "LTAIFAKE", secretAccessKey: "fake-secret"), dir: dir)
        #expect(list.status == 0, "\(list.stderr)")
        #expect(list.stdout.hasPrefix("VOLUME"))
        let nowhere = try await listWith(.init(provider: "aliyun", region: "xx-nowhere-1", endpoint: "http://127.0.0.1:\(port)",
                                         accessKeyID: "LTAIFAKE", secretAccessKey: "fake-secret"), dir: dir)
        #expect(nowhere.status != 0 && nowhere.stderr.contains("InvalidRegionId.NotFound"))
    }
}
