import Foundation
import ShardNode
import TestSupport
import Testing

@Suite struct ConfigurationTests {
    @Test func defaults() throws {
        let config = try Configuration.load(file: nil, environment: [:])
        #expect(config.node.nodeID == "node-1")
        #expect(config.metadata.type == "embedded")
        #expect(config.shard.sizeLimit == 2 << 30)
        #expect(config.resolvedVolumeRoot == "./data/volumes")
    }

    @Test func precedenceIsFlagsThenEnvironmentThenFileThenDefaults() throws {
        let dir = try TemporaryDirectory("config")
        let file = dir.sub("node.yaml")
        try """
        node:
          node_id: from-file
          data_dir: /srv/file
        cloud:
          region: file-region
        metadata:
          type: etcd
          endpoints: [http://127.0.0.1:2379, http://127.0.0.1:2380]
          namespace: /custom
          options:
            username: u
        shard:
          size_limit: 512MiB
        log:
          level: debug
        """.write(toFile: file, atomically: true, encoding: .utf8)
        var config = try Configuration.load(file: file, environment: ["NODE_ID": "from-env", "AWS_REGION": "eu-west-1"])
        #expect(config.node.nodeID == "from-env")
        #expect(config.cloud.region == "eu-west-1")
        #expect(config.node.dataDir == "/srv/file")
        #expect(config.metadata.endpoints == ["http://127.0.0.1:2379", "http://127.0.0.1:2380"])
        #expect(config.metadata.namespace == "/custom")
        #expect(config.metadata.username == "u")
        #expect(config.shard.sizeLimit == 512 << 20)
        #expect(config.logLevel == "debug")
        #expect(try Configuration.load(file: nil, environment: ["SHARDFS_SERVER_TOKEN": "t0k"]).server.token == "t0k")
        try config.set("node.node_id", "from-flag")
        #expect(config.node.nodeID == "from-flag")
    }

    /// The tests' config builder (TestSupport's `NodeConfigFile`) writes the keys
    /// the node reads: every field set lands where meant, and one left unset keeps its default.
    @Test func theTestsConfigFileBuilderWritesTheKeysTheNodeReads() throws {
        let dir = try TemporaryDirectory("config")
        let full = NodeConfigFile(
            nodeID: "n \"quoted\"", instanceID: "i-1", dataDir: dir.sub("da ta"), listen: "127.0.0.1:7171", handshakeTimeoutMs: 60_000,
            cloud: .init(provider: "aws", region: "us-east-1", endpoint: "http://127.0.0.1:9", accessKeyID: "AKID",
                         secretAccessKey: "s#cret: x", volumeRoot: "/vr", imageDir: "/img", volumeSize: "64MiB",
                         initialVolumes: 0, retryDeadlineSeconds: 5),
            etcd: .init(endpoints: ["http://127.0.0.1:1", "http://127.0.0.1:2"], namespace: "/ns", leaseTTLSeconds: 2,
                        retryDeadlineMs: 3000),
            shardSizeLimit: "16MiB",
            backup: .init(viewIntervalMs: 100, failoverDelayMs: 700, automaticFailover: false))
        let config = try Configuration.load(file: try full.write(to: dir.sub("full.yaml")), environment: [:])
        #expect(config.node.nodeID == "n \"quoted\"" && config.node.instanceID == "i-1" && config.node.dataDir == dir.sub("da ta"))
        #expect(config.server.address == "127.0.0.1:7171" && config.server.handshakeTimeoutMs == 60_000)
        #expect(config.cloud.provider == "aws" && config.cloud.region == "us-east-1" && config.cloud.endpoint == "http://127.0.0.1:9")
        #expect(config.cloud.accessKeyID == "AKID" && config.cloud.secretAccessKey == "s#cret: x")
        #expect(config.cloud.volumeRoot == "/vr" && config.cloud.imageDir == "/img" && config.cloud.volumeSize == 64 << 20)
        #expect(config.cloud.initialVolumes == 0 && config.cloud.retryDeadlineSeconds == 5)
        #expect(config.metadata.type == "etcd" && config.metadata.endpoints == ["http://127.0.0.1:1", "http://127.0.0.1:2"])
        #expect(config.metadata.namespace == "/ns" && config.metadata.leaseTTLSeconds == 2 && config.metadata.retryDeadlineMs == 3000)
        #expect(config.shard.sizeLimit == 16 << 20)
        #expect(config.backup.viewIntervalMs == 100 && config.backup.failoverDelayMs == 700 && !config.backup.automaticFailover)

        let defaults = try Configuration.load(file: nil, environment: [:])
        #expect(try Configuration.load(file: try NodeConfigFile().write(to: dir.sub("empty.yaml")), environment: [:]) == defaults)
        let some = try Configuration.load(file: try NodeConfigFile(nodeID: "n2", etcd: .init(endpoints: ["http://127.0.0.1:1"]))
            .write(to: dir.sub("some.yaml")), environment: [:])
        var expected = defaults
        expected.node.nodeID = "n2"
        expected.metadata.type = "etcd"
        expected.metadata.endpoints = ["http://127.0.0.1:1"]
        #expect(some == expected)
    }

    @Test func theExampleFileLoads() throws {
        var url = URL(fileURLWithPath: #filePath)
        while url.path != "/" && !FileManager.default.fileExists(atPath: url.appendingPathComponent("config/example.yaml").path) {
            url.deleteLastPathComponent()
        }
        let config = try Configuration.load(file: url.appendingPathComponent("config/example.yaml").path, environment: [:])
        #expect(config.metadata.type == "embedded")
    }

    @Test(arguments: [
        ("node:\n  nod_id: x\n", "unknown key \"node.nod_id\""),
        ("nodes:\n  node_id: x\n", "unknown section \"nodes\""),
        ("shard:\n  size_limit: lots\n", "shard.size_limit"),
        ("metadata:\n  type: zookeeper\n", "metadata.type"),
        ("metadata:\n  type: etcd\n", "endpoints"),
        ("- a\n- b\n", "mapping"),
        ("node: [\n", "not valid YAML"),
    ])
    func badFilesGiveClearErrors(_ text: String, _ expected: String) throws {
        let dir = try TemporaryDirectory("config")
        try text.write(toFile: dir.sub("bad.yaml"), atomically: true, encoding: .utf8)
        do {
            _ = try Configuration.load(file: dir.sub("bad.yaml"), environment: [:])
            Issue.record("expected an error mentioning \(expected)")
        } catch let error as ConfigurationError {
            #expect(error.description.contains(expected), "\(error)")
        }
    }

    @Test func missingFileAndBadEnvironmentAreErrors() {
        #expect(throws: ConfigurationError.self) { _ = try Configuration.load(file: "/nonexistent/shardfs.yaml", environment: [:]) }
        #expect(throws: ConfigurationError.self) {
            _ = try Configuration.load(file: nil, environment: ["SHARDFS_SHARD_SIZE_LIMIT": "-1"])
        }
        #expect(throws: ConfigurationError.self) { _ = try Configuration.load(file: nil, environment: ["SHARDFS_LOG_LEVEL": "loud"]) }
    }

    @Test func byteSizes() {
        #expect(ByteSize.parse("2GiB") == 2 << 30)
        #expect(ByteSize.parse("64 KiB") == 64 << 10)
        #expect(ByteSize.parse("1048576") == 1 << 20)
        #expect(ByteSize.parse("3M") == 3 << 20)
        #expect(ByteSize.parse("x") == nil)
        #expect(ByteSize.parse("-5MiB") == nil)
        #expect(ByteSize.parse("99999999999999TiB") == nil)
        #expect(ByteSize.format(2 << 30) == "2GiB")
        #expect(ByteSize.format(1536) == "1.5KiB")
    }
}
