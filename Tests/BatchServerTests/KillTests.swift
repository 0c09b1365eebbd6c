import BatchProtocol
import Foundation
import ShardFSClient
import ShardNode
import ShardStore
import Testing
import TestSupport

@Suite struct KillTests {
    @Test func acknowledgedBatchPutsSurviveKillDashNine() async throws {
        let dir = try TemporaryDirectory("batch-kill")
        let data = dir.sub("data")
        let server = try await ServeProcess.start(["--data-dir", data, "--no-tcp", "--log-level", "error"])
        defer { server.kill9() }
        let c = try await connect(to: try #require(server.unixSocket, "\(server.readyLine)"))
        let shard = try await c.newShard(owner: "k")
        let acked = AckLog()
        // Writers stream batches until the server dies under them.
        let writers = (0..<4).map { w in
            Task {
                var batch = 0
                while true {
                    let keys = (0..<200).map { Array("w\(w)-b\(batch)-\($0)".utf8) }
                    guard let statuses = try? await c.batchPut(client: "k", shard: shard,
                                                               items: keys.map { PutItem(key: $0, value: Array(repeating: 5, count: 100)) })
                    else { return }
                    if statuses.allSatisfy(\.isOK) { acked.add(keys) }
                    batch += 1
                }
            }
        }
        let deadline = ContinuousClock.now + .seconds(120)
        while acked.count < 4_000 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        try #require(acked.count >= 4_000, "the writers stalled before the kill")
        server.kill9()
        for w in writers { await w.value }
        await c.close()
        let keys = acked.all()
        #expect(keys.count >= 4_000)

        // A fresh node on the same folder has every acknowledged entry.
        var config = Configuration()
        config.node.dataDir = data
        let node = try await StorageNode.start(config)
        let s = try await node.shards.shard(shard)
        let results = try s.batchGet(try keys.map { try EntryKey($0) })
        let lost = results.filter { if case .failure = $0 { return true } else { return false } }.count
        #expect(lost == 0, "\(lost) of \(keys.count) acknowledged entries were lost")
    }
}

/// Retries for up to 10 s: with the whole suite running on two CPUs, a
/// handshake can miss the server's read timeout, and the server then closes
/// the connection. This test is about what survives kill -9, not about that.
private func connect(to socket: String) async throws -> ShardFSClient {
    var lastError: Error?
    for _ in 0..<200 {
        do { return try await ShardFSClient.connect(to: .unix(path: socket)) } catch { lastError = error }
        try await Task.sleep(for: .milliseconds(50))
    }
    throw lastError!
}

final class AckLog: @unchecked Sendable {
    private let lock = NSLock()
    private var keys: [[UInt8]] = []
    func add(_ more: [[UInt8]]) { lock.withLock { keys += more } }
    var count: Int { lock.withLock { keys.count } }
    func all() -> [[UInt8]] { lock.withLock { keys } }
}
