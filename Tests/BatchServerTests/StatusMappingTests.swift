import BatchProtocol
@testable import BatchServer
import ShardStore
import Testing

/// Engine errors on the wire (`wireStatus`): a full volume refuses a write as a
/// full shard does (the client writes to a new shard, placed where there is
/// room), while a read that meets it reports a read failure.
@Suite struct StatusMappingTests {
    @Test func aFullVolumeIsShardFullForWritesAndAReadFailureForReads() {
        let full = ShardError.volumeFull("the filesystem of /v/shard-7 has no room left")
        #expect(wireStatus(for: full, writing: true).code == .shardFull)
        #expect(wireStatus(for: full, writing: false).code == .readException)
        #expect(wireStatus(for: full, writing: true).message.contains("volume full"))
        #expect(wireStatus(for: ShardError.full(limit: 1 << 20), writing: true).code == .shardFull)
        #expect(wireStatus(for: ShardError.inUse("held"), writing: true).code == .writeException)
    }
}
