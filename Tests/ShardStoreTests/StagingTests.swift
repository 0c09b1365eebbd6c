import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// Chunk sets listed in `staging` (Shard+Staging.swift): what a crash leaves
/// there is removed when the shard opens again.
@Suite(.onOwnThreads) struct StagingTests {
    @Test func aChunkSetACrashLeftStagedIsRemovedAtOpen() throws {
        let dir = try TemporaryDirectory("shard")
        var shard: Shard? = try makeShard(dir)
        try shard!.put(key("kept"), value: [UInt8](repeating: 1, count: 3 * chunkSize), clientID: "owner")
        // A large put's first transaction, and no more: its set listed, one chunk written.
        let box = StagedSetBox()
        try shard!.write(clientID: "owner") { ctx in
            box.set = try shard!.newChunkSet(ctx.txn)
            try ctx.txn.put(shard!.staging, chunkSetKey(box.set), [])
            try ctx.txn.put(shard!.chunks, chunkKey(box.set, 0), [UInt8](repeating: 2, count: chunkSize))
        }
        #expect(try shard!.stagedSets() == [box.set])
        shard = nil
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(try reopened.stagedSets() == [])
        #expect(try reopened.readTransaction(applyingLog: false) { txn in try txn.get(reopened.chunks, chunkKey(box.set, 0)) == nil })
        #expect(try reopened.get(key("kept")).value == [UInt8](repeating: 1, count: 3 * chunkSize))
    }
}
