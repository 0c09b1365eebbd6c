// swift-tools-version:6.0
import PackageDescription

// One module per layer; the folder list under Sources/ is the architecture:
//   CLMDB, CFuse3, CCurl - system libraries (pkg-config)
//   CChecksum     - CRC-32C for the shards' batch logs
//   CFileIO       - file calls glibc hides behind _GNU_SOURCE (sync_file_range)
//   CFuseRing     - the FUSE session layer libfuse 3.14 lacks: io_uring queues, passthrough
//   LMDB          - a thin, safe Swift wrapper over the LMDB C API
//   LMDBSnapshot  - reads one published LMDB snapshot by its root, with pread (backup views)
//   CMallocTuning, NodeSupport - process-wide helpers: blockingWork, the malloc tuning
//   ShardStore    - the shard engine: one LMDB environment per shard
//   Metadata      - the metadata interface, the embedded store, the retry wrapper
//   MetadataEtcd  - the metadata store on etcd (v3 JSON gateway over libcurl)
//   Volumes       - cloud-provider and volume-manager interfaces, local folders
//   ShardNode     - the shard manager, configuration, the node composing the layers
//   ShardFUSE     - the FUSE filesystem (libfuse low-level API)
//   BatchProtocol, BatchServer, ShardFSClient - the batch socket service
//   Benchmarks    - the benchmarks `shardfs-bench` runs
//   shardfs       - the command-line executable
//   ShardFSBench  - the `shardfs-bench` executable (kept out of the binary users run)
let package = Package(
    name: "ShardFS",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "shardfs", targets: ["shardfs"]),
        .executable(name: "shardfs-bench", targets: ["ShardFSBench"]),
        .library(name: "ShardStore", targets: ["ShardStore"]),
        .library(name: "ShardNode", targets: ["ShardNode"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        // TLS for the batch service over TCP (server, Swift client, CLI).
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        // Metrics: swift-metrics is the API the layers call; the Prometheus backend is
        // bootstrapped by the `shardfs` executable only.
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
    ],
    targets: [
        .systemLibrary(name: "CLMDB", pkgConfig: "lmdb", providers: [.apt(["liblmdb-dev"])]),
        .systemLibrary(name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CCurl", pkgConfig: "libcurl", providers: [.apt(["libcurl4-openssl-dev"])]),

        .target(name: "LMDB", dependencies: ["CLMDB"]),
        .target(name: "LMDBSnapshot"),
        .target(name: "CMallocTuning"),
        .target(name: "NodeSupport", dependencies: ["CMallocTuning"]),
        .target(name: "CChecksum"),
        .target(name: "CFileIO"),
        .target(name: "CFuseRing", dependencies: ["CFuse3"]),
        .target(name: "ShardStore", dependencies: [
            "LMDB", "LMDBSnapshot", "CChecksum", "CFileIO",
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        .target(name: "Metadata", dependencies: [
            "LMDB", "NodeSupport",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "MetadataEtcd", dependencies: [
            "Metadata", "CCurl",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        .target(name: "Volumes", dependencies: [
            "CCurl",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "ShardNode", dependencies: [
            "NodeSupport", "LMDB", "LMDBSnapshot", "ShardStore", "Metadata", "MetadataEtcd", "Volumes",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Yams", package: "Yams"),
        ]),
        // The batch socket service: wire protocol (no I/O), server, Swift client.
        .target(name: "BatchProtocol", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        .target(name: "BatchServer", dependencies: [
            "BatchProtocol", "ShardNode", "ShardStore", "Metadata",
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        .target(name: "ShardFSClient", dependencies: [
            "BatchProtocol",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
        // The FUSE filesystem: a raw bridge to libfuse's low-level API and the shard node layer.
        .target(name: "ShardFUSE", dependencies: [
            "CFuse3", "CFuseRing", "ShardNode", "ShardStore", "Metadata", "Volumes",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        .target(name: "Benchmarks", dependencies: ["ShardStore", "LMDB", "CLMDB", "BatchProtocol", "ShardFSClient"]),
        .executableTarget(name: "shardfs", dependencies: [
            "ShardNode", "BatchServer", "ShardFSClient", "ShardFUSE", "NodeSupport",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        .executableTarget(name: "ShardFSBench", dependencies: [
            "Benchmarks",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        // Temporary folders and child processes for the tests.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        // The contract every MetadataStore keeps, run by each store's tests.
        .target(name: "MetadataConformance", dependencies: ["Metadata"], path: "Tests/MetadataConformance"),
        .testTarget(name: "LMDBTests", dependencies: ["LMDB", "TestSupport"]),
        .testTarget(name: "LMDBSnapshotTests", dependencies: ["LMDBSnapshot", "LMDB", "TestSupport"]),
        .testTarget(name: "ShardStoreTests", dependencies: ["ShardStore", "TestSupport"]),
        .testTarget(name: "MetadataTests", dependencies: ["Metadata", "MetadataConformance", "TestSupport"]),
        .testTarget(name: "MetadataEtcdTests", dependencies: [
            "MetadataEtcd", "MetadataConformance", "NodeSupport", "ShardNode", "ShardStore", "TestSupport",
        ]),
        // fixtures/: the fake cloud servers (Python) the tests start.
        .testTarget(name: "VolumesTests", dependencies: ["Volumes", "TestSupport"], exclude: ["fixtures"]),
        // Volume providers wired into a node and `shardfs volume` (root: loop devices).
        .testTarget(name: "NodeVolumesTests", dependencies: ["shardfs", "TestSupport"]),
        .testTarget(name: "FailoverTests", dependencies: ["shardfs", "ShardFSClient", "BatchProtocol", "TestSupport"]),
        .testTarget(name: "ShardNodeTests", dependencies: [
            "ShardNode", "TestSupport", .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "BatchProtocolTests", dependencies: ["BatchProtocol", "TestSupport"]),
        .testTarget(name: "BatchServerTests", dependencies: [
            "BatchServer", "Metadata", "ShardFSClient", "ShardNode", "ShardStore", "TestSupport", "Volumes",
        ]),
        .testTarget(name: "ShardFUSETests", dependencies: [
            "shardfs", "ShardFUSE", "ShardStore", "TestSupport",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "CommandTests", dependencies: ["shardfs", "ShardFSBench", "ShardFSClient", "ShardStore", "TestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
