import Foundation
import Logging
import Metadata
import ShardNode
import ShardStore
import TestSupport
import Testing

/// Log records kept for a test to look at.
struct CapturedLog: LogHandler {
    struct Record: Sendable {
        let level: Logger.Level
        let message: String
        let metadata: [String: String]
    }

    let records: Locked<[Record]>
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?,
             source: String, file: String, function: String, line: UInt) {
        let fields = (metadata ?? [:]).mapValues { "\($0)" }
        records.withLock { $0.append(Record(level: level, message: "\(message)", metadata: fields)) }
    }
}

@Suite struct ViewPublisherTests {
    /// A checkpoint longer than two intervals is logged, with where its time
    /// went (pinning the shards, publishing the generation); one within its
    /// interval is not.
    @Test func aSlowCheckpointIsLoggedWithItsSplit() async throws {
        let dir = try TemporaryDirectory("slow-checkpoint")
        defer { dir.remove() }
        var config = try testConfig(dir)
        try config.set("backup.view_interval_ms", "600000")  // the node's own publisher stays out of the way
        let node = try await StorageNode.start(config)
        let shard = try await node.shards.newShard(owner: "c")
        try shard.put(key1, value: [1], clientID: "c")
        let volumeID = try await node.metadata.getShard(shard.id).volumeID
        try await node.metadata.addBackup(volumeID: volumeID, nodeID: "node-b")
        let records = Locked([CapturedLog.Record]())
        let logger = Logger(label: "test") { _ in CapturedLog(records: records) }

        // A generous interval: nothing to report.
        let patient = ViewPublisher(nodeID: node.configuration.node.nodeID, metadata: node.metadata, shards: node.shards,
                                    interval: .seconds(60), logger: logger)
        await patient.checkpoint()
        await patient.stop()
        #expect(records.value.filter { $0.message.contains("slow") }.isEmpty)

        // One a checkpoint cannot keep (it pins the shard and publishes to metadata).
        try shard.put(key1, value: [2], clientID: "c")
        let hurried = ViewPublisher(nodeID: node.configuration.node.nodeID, metadata: node.metadata, shards: node.shards,
                                    interval: .nanoseconds(1), logger: logger)
        await hurried.checkpoint()
        await hurried.stop()
        let slow = try #require(records.value.first { $0.message.contains("a view checkpoint was slow") }, "\(records.value.map(\.message))")
        #expect(slow.level == .warning)
        #expect(slow.metadata["volume"] == volumeID)
        for part in ["took", "pinning", "publishing"] {
            #expect(slow.metadata[part]?.hasSuffix("seconds") == true, "\(part): \(slow.metadata[part] ?? "missing")")
            #expect(slow.metadata[part] != "0.0 seconds", "\(part) took no time")
        }
    }
}
