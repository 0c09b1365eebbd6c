import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// Staging a value chunk by chunk as it arrives (Shard+Staging.swift).
@Suite struct StagingTests {
    func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31) &+ seed } }

    @Test func stagedValueIsInvisibleUntilCommittedAndKeepsIndexes() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir)
        try shard.put(key("v"), value: bytes("old"), indexes: [IndexPair(name: "kind", value: "log")], clientID: "owner")
        let value = pattern(3 * chunkSize + 1234, seed: 7)
        let staged = try shard.beginStaging(clientID: "owner")
        #expect(try shard.stagedSets() == [staged.set])
        try value.withUnsafeBytes { v in
            try staged.stage(UnsafeRawBufferPointer(rebasing: v[0..<(2 * chunkSize)]), firstChunk: 0)
        }
        // Readers still see the old value; the writer reads its staged bytes back.
        #expect(try shard.get(key("v")).value == bytes("old"))
        var back = [UInt8](repeating: 0, count: 1000)
        try back.withUnsafeMutableBytes { try staged.read(offset: chunkSize - 500, into: $0) }
        #expect(back == Array(value[(chunkSize - 500)..<(chunkSize + 500)]))
        try value.withUnsafeBytes { v in
            try staged.commit(as: key("v"), size: value.count, firstChunk: 2,
                              tail: UnsafeRawBufferPointer(rebasing: v[(2 * chunkSize)...]))
        }
        let entry = try shard.get(key("v"))
        #expect(entry.value == value)
        #expect(entry.indexes == [IndexPair(name: "kind", value: "log")])
        #expect(try shard.stagedSets() == [])
        #expect(try shard.find(indexName: "kind", value: bytes("log")) == [key("v")])
    }

    @Test func discardedAndCrashedStagingLeaveNothing() throws {
        let dir = try TemporaryDirectory("shard")
        var shard: Shard? = try makeShard(dir)
        let value = pattern(2 * chunkSize, seed: 3)
        do {
            let discarded = try shard!.beginStaging(clientID: "owner")
            try value.withUnsafeBytes { try discarded.stage($0, firstChunk: 0) }
            discarded.discard()
        }
        #expect(try shard!.stagedSets() == [])
        // A handle dropped unused removes its set.
        do {
            let dropped = try shard!.beginStaging(clientID: "owner")
            try value.withUnsafeBytes { try dropped.stage($0, firstChunk: 0) }
        }
        #expect(try shard!.stagedSets() == [])
        // A set left behind (a crash) is removed when the shard opens again.
        do {
            let left = try shard!.beginStaging(clientID: "owner")
            try value.withUnsafeBytes { try left.stage($0, firstChunk: 0) }
            left.leaveBehind()
        }
        #expect(try shard!.stagedSets().count == 1)
        shard = nil
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(try reopened.stagedSets() == [])
        #expect(try reopened.attributes(key("v")) == nil)
    }

    @Test func stagingPastTheLimitIsFullAndTheShardStaysUsable() throws {
        let dir = try TemporaryDirectory("shard")
        let shard = try makeShard(dir, limit: 4 << 20)
        let staged = try shard.beginStaging(clientID: "owner")
        let piece = pattern(8 * chunkSize, seed: 1)  // 1 MiB
        var failure: Error?
        var first = 0
        do {
            while true {
                try piece.withUnsafeBytes { try staged.stage($0, firstChunk: first) }
                first += 8
            }
        } catch { failure = error }
        #expect(failure as? ShardError == .full(limit: 4 << 20))
        staged.discard()
        #expect(try shard.stagedSets() == [])
        try shard.put(key("after"), value: pattern(2 * chunkSize, seed: 9), clientID: "owner")
        #expect(try shard.get(key("after")).value == pattern(2 * chunkSize, seed: 9))
        // Another client cannot stage into the shard.
        #expect(throws: ShardError.self) { _ = try shard.beginStaging(clientID: "intruder") }
    }
}
