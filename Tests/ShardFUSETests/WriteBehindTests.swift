import Foundation
import Logging
@testable import ShardFUSE
import ShardStore
import TestSupport
import Testing

/// The write-behind queue on a real shard, without a mount: its failure paths.
@Suite struct WriteBehindTests {
    /// `interval`: a long one leaves every commit to the test's own flush.
    func make(_ dir: TemporaryDirectory, limit: Int = 2 << 30, interval: Double = 0.005) throws -> (Shard, WriteBehind) {
        var options = ShardOptions()
        options.sizeLimit = limit
        let shard = try Shard.create(at: dir.sub("shard-1"), id: 1, owner: "c", options: options)
        let queue = WriteBehind(logger: Logger(label: "test"), interval: interval) { _, _, body in try body() }
        return (shard, queue)
    }

    @Test func queuedPutsAreVisibleThenCommittedByFlush() throws {
        let dir = try TemporaryDirectory("wb")
        let (shard, queue) = try make(dir)
        defer { queue.stop() }
        #expect(queue.enqueue(shard, clientID: "c", key: Array("a".utf8), value: [1, 2], modificationTime: 5))
        #expect(queue.pending(shard: 1, key: Array("a".utf8))?.value == [1, 2])
        #expect(queue.queuedBytes(shard: 1) > 0)
        queue.flush(shard: 1)
        #expect(try shard.get(EntryKey("a")).value == [1, 2])
        #expect(queue.pending(shard: 1, key: Array("a".utf8)) == nil)
        #expect(queue.queuedBytes(shard: 1) == 0)
        #expect(queue.enqueue(shard, clientID: "c", key: Array("a".utf8), value: [], modificationTime: 6, deleted: true))
        queue.flush(shard: 1)
        #expect(try shard.attributes(EntryKey("a")) == nil)
        #expect(queue.takeFailure(shard: 1) == nil)
    }

    @Test func aSecondPutOfAKeyReplacesTheFirstAndItsCost() throws {
        let dir = try TemporaryDirectory("wb")
        let (shard, queue) = try make(dir, interval: 3600)
        defer { queue.stop() }
        #expect(queue.enqueue(shard, clientID: "c", key: Array("a".utf8), value: [1, 2, 3], modificationTime: 5))
        #expect(queue.enqueue(shard, clientID: "c", key: Array("b".utf8), value: [4], modificationTime: 5))
        #expect(queue.enqueue(shard, clientID: "c", key: Array("a".utf8), value: [9], modificationTime: 6))
        #expect(queue.pending(shard: 1, key: Array("a".utf8))?.value == [9])
        #expect(queue.pending(shard: 1, key: Array("b".utf8))?.value == [4])
        #expect(queue.queuedBytes(shard: 1) == 2 * WriteBehind.cost(1))
        queue.flush(shard: 1)
        #expect(try shard.get(EntryKey("a")).value == [9])
        #expect(try shard.get(EntryKey("b")).value == [4])
        #expect(queue.queuedBytes(shard: 1) == 0)
    }

    @Test func aBatchTheShardRefusesIsReportedOnce() throws {
        let dir = try TemporaryDirectory("wb")
        let (shard, queue) = try make(dir)
        defer { queue.stop() }
        #expect(queue.enqueue(shard, clientID: "c", key: Array("a".utf8), value: [1], modificationTime: 5))
        try shard.close()  // through another path, before the queue commits
        queue.flush(shard: 1)
        #expect(queue.takeFailure(shard: 1) as? ShardError == .closed)
        #expect(queue.takeFailure(shard: 1) == nil)
        #expect(try shard.attributes(EntryKey("a")) == nil)
    }

    @Test func aBatchThatDoesNotFitKeepsThePutsThatDo() throws {
        let dir = try TemporaryDirectory("wb")
        let (shard, queue) = try make(dir, limit: 1 << 20)
        defer { queue.stop() }
        // Together far over the limit; each alone fits until the shard fills.
        for i in 0..<12 {
            #expect(queue.enqueue(shard, clientID: "c", key: Array("k\(i)".utf8), value: [UInt8](repeating: 7, count: 200_000),
                                  modificationTime: 1))
        }
        queue.flush(shard: 1)
        let landed = try shard.list().count
        #expect(landed >= 2 && landed < 12, "\(landed) landed")
        if case .full? = queue.takeFailure(shard: 1) as? ShardError {} else { Issue.record("expected a full-shard failure") }
    }

    @Test func nothingIsQueuedForAShardThatIsClosing() throws {
        let dir = try TemporaryDirectory("wb")
        let (shard, queue) = try make(dir)
        defer { queue.stop() }
        queue.beginClosing(shard: 1)
        #expect(!queue.enqueue(shard, clientID: "c", key: Array("a".utf8), value: [1], modificationTime: 5))
        queue.endClosing(shard: 1)
        #expect(queue.enqueue(shard, clientID: "c", key: Array("a".utf8), value: [1], modificationTime: 5))
    }
}
