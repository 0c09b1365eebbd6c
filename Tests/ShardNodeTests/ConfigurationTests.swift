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
