@testable import ShardStore
import TestSupport
import Testing

@Suite(.onOwnThreads) struct ShardDirectoryNameTests {
    @Test func namesRoundTrip() {
        for id: UInt64 in [1, 7, 42, UInt64.max] {
            #expect(ShardDirectoryName.id(Array(ShardDirectoryName.of(id).utf8)) == id)
        }
    }

    @Test(arguments: ["shard-0", "shard-01", "shard-", "shard", "shard-1x", "shard--1", "shard-+1", "Shard-1",
                      "shard-18446744073709551616", "shard-1.creating", "xshard-1"])
    func otherNamesAreNoShards(_ name: String) {
        #expect(ShardDirectoryName.id(Array(name.utf8)) == nil)
    }
}
