import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// Differential check of the pending map's composition (Shard.notePending):
/// random sequences of logged puts (keeping indexes or not), deletions,
/// updates and renames on a few keys, run on two shards alike; one is read
/// while the items are pending, the other after applying each step. At the
/// end the first is replayed from its log (a crash copy) and applied: all
/// three must agree.
extension BatchLogTests {
    struct Seen: Equatable, CustomStringConvertible {
        var attributes: EntryAttributes?
        var value: String?
        var description: String {
            guard let a = attributes else { return "absent" }
            let mode = a.metadata.mode.map { String($0, radix: 8) } ?? "-"
            let indexes = a.indexes.map { "\($0.name)=\(String(decoding: $0.value, as: UTF8.self))" }
            return "\(value ?? "?") t\(a.modificationTime) n\(a.metadata.number) m\(mode) a\(a.metadata.accessTime ?? -1) c\(a.metadata.changeTime ?? -1) \(indexes)"
        }
    }

    func seen(_ shard: Shard, _ names: [[UInt8]]) throws -> [Seen] {
        try names.map { name in
            let attributes = try shard.attributes(EntryKey(trusted: name))
            let value = attributes == nil ? nil : String(decoding: try shard.get(EntryKey(trusted: name)).value, as: UTF8.self)
            return Seen(attributes: attributes, value: value)
        }
    }

    func runRandomSequences(names: [[UInt8]], seed: UInt64, trials: Int) throws {
        var state = seed
        func next(_ n: Int) -> Int {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int((state >> 33) % UInt64(n))
        }
        func key(_ index: Int) -> EntryKey { EntryKey(trusted: names[index]) }
        var failures = 0
        for trial in 0..<trials where failures < 5 {
            let (dirA, pathA, a) = try heldSeededShard()
            let (dirB, _, b) = try heldSeededShard()
            defer { dirA.remove(); dirB.remove() }
            var ops: [String] = []
            for step in 0..<12 {
                let index = next(names.count)
                func both(_ body: (Shard) throws -> Void) {
                    let outcomes = [a, b].map { shard in
                        do { try body(shard); return "ok" } catch { return "\(error)" }
                    }
                    #expect(outcomes[0] == outcomes[1], "trial \(trial) step \(step): \(outcomes)")
                }
                switch next(6) {
                case 0, 1:
                    var item = EntryWrite(key: names[index], value: bytes("v\(trial).\(step)"),
                                          indexes: next(2) == 0 ? [] : [IndexPair(name: "c", value: "\(step)")],
                                          modificationTime: Int64(1_000 + step))
                    item.keepsIndexes = next(2) == 0
                    item.creationMode = next(2) == 0 ? nil : UInt32(0o600 + step)
                    ops.append("put #\(index) keeps=\(item.keepsIndexes) indexes=\(item.indexes.count)")
                    both { _ = try $0.batchPut([item], clientID: "owner", deferringDurability: true) }
                case 2:
                    ops.append("delete #\(index)")
                    both { _ = try $0.batchPut([.deletion(of: names[index])], clientID: "owner", deferringDurability: true) }
                case 3:
                    let change = MetadataChange(mode: next(2) == 0 ? nil : UInt32(0o400 + step),
                                                accessTime: next(2) == 0 ? nil : Int64(50 + step),
                                                changeTime: next(2) == 0 ? nil : Int64(70 + step))
                    let time: Int64? = next(2) == 0 ? nil : Int64(5_000 + step)
                    ops.append("update #\(index) \(change) t=\(time.map(String.init) ?? "-")")
                    both { try $0.changeMetadata(key(index), modificationTime: time, change, clientID: "owner", deferringDurability: true) }
                default:
                    let target = next(names.count)
                    ops.append("move #\(index) -> #\(target)")
                    both { try $0.rename(key(index), to: key(target), clientID: "owner", deferringDurability: true) }
                }
                try b.applyLog()
                let pending = try seen(a, names), applied = try seen(b, names)
                if pending != applied {
                    failures += 1
                    Issue.record("trial \(trial) after \(ops):\n pending \(pending)\n applied \(applied)")
                    break
                }
            }
            let expected = try seen(b, names)
            try a.sync()
            try crashCopy(pathA, dirA.sub("copy"))
            let replayed = try seen(try Shard.open(at: dirA.sub("copy")), names)
            if replayed != expected { Issue.record("trial \(trial) replay after \(ops):\n replayed \(replayed)\n expected \(expected)") }
            try a.applyLog()
            let applied = try seen(a, names)
            if applied != expected { Issue.record("trial \(trial) apply after \(ops):\n applied \(applied)\n expected \(expected)") }
        }
    }

    @Test func randomSequencesReadAsApplied() throws {
        try runRandomSequences(names: [seeded(0), seeded(1), seeded(2), "n1", "n2"].map(bytes), seed: 0x1234_5678, trials: 400)
    }

    /// With two keys of the same hash among them (the pending map cannot tell them apart).
    @Test func randomSequencesWithCollidingKeysReadAsApplied() throws {
        let (c1, c2) = Self.collidingKeys()
        #expect(keyHash(c1) == keyHash(c2) && c1 != c2)
        try runRandomSequences(names: [bytes(seeded(0)), bytes(seeded(1)), c1, c2, bytes("n1")], seed: 0x9876_5432, trials: 300)
    }

    /// Two 16-byte keys with the same `keyHash` (built for its current mixing function).
    static func collidingKeys() -> ([UInt8], [UInt8]) {
        func mix(_ h: UInt64, _ w: UInt64) -> UInt64 {
            var h = (h ^ w) &* 0xFF51_AFD7_ED55_8CCD
            h ^= h >> 32
            return h
        }
        func word(_ b: [UInt8]) -> UInt64 { b.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) } }
        let h0: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ 16
        let a = Array("collideAtailtail".utf8)
        for c in UInt8(0x42)...UInt8(0x7A) {
            var b = Array("collide".utf8) + [c]
            let w1 = word(Array(a[8...])) ^ mix(h0, word(Array(a[..<8]))) ^ mix(h0, word(b))
            let tail = withUnsafeBytes(of: w1.littleEndian) { Array($0) }
            if tail.contains(0) || tail.contains(0x2F) { continue }
            b += tail
            return (a, b)
        }
        fatalError("no colliding key found")
    }
}
