import Dispatch
import Foundation
@testable import ShardStore
import TestSupport
import Testing

/// Items logged while an apply is under way (between the apply taking its
/// batches and taking them off the pending list), and reads in that window:
/// a direct write that started the apply lands after the batches it took and
/// before the items logged meanwhile, so those are not composed with what the
/// apply took, and a read whose snapshot already holds an applied item reads
/// LMDB. Each case is checked live, after a replay of the log, and applied.
/// (Found by review; `applyFault` runs in that window.)
extension BatchLogTests {
    /// Runs `check` on the shard while its items are pending, on a crash copy
    /// replayed from the log, and on the shard once applied.
    func checkPendingReplayedAndApplied(_ shard: Shard, _ dir: TemporaryDirectory, _ path: String,
                                        _ check: (Shard, String) throws -> Void) throws {
        try check(shard, "pending")
        try shard.sync()
        try crashCopy(path, dir.sub("copy"))
        try check(try Shard.open(at: dir.sub("copy")), "replayed")
        try shard.applyLog()
        try check(shard, "applied")
    }

    /// A chmod logged while a direct write applies the pending batches (after the
    /// apply took its list, before it commits) was composed with the put being
    /// applied; the direct write then landed, and the composed chmod, applied
    /// later, wrote the old put's value over it (a direct put: a large file's
    /// close, a truncate) or brought the entry back (a direct delete: the batch
    /// service's Delete).
    @Test(arguments: ["put", "delete"])
    func aChmodLoggedDuringAnApplyDoesNotUndoTheDirectWriteAfterIt(_ direct: String) throws {
        let (dir, path, shard) = try heldSeededShard()
        defer { dir.remove() }
        let k = key(seeded(5))
        _ = try shard.batchPut([put(seeded(5), "closed")], clientID: "owner", deferringDurability: true)
        // Another thread's chmod, between the apply's snapshot of the pending list and its commit.
        shard.applyFault = { [shard] in
            shard.applyFault = nil
            try shard.changeMetadata(k, modificationTime: nil, MetadataChange(mode: 0o600), clientID: "owner",
                                     deferringDurability: true)
        }
        if direct == "put" {
            try shard.put(k, value: bytes("direct"), clientID: "owner")
        } else {
            try shard.delete(k, clientID: "owner")
        }
        #expect(shard.applyFault == nil)
        func check(_ shard: Shard, _ when: String) throws {
            if direct == "put" {
                #expect(String(decoding: try shard.get(k).value, as: UTF8.self) == "direct", "\(when)")
                #expect(try shard.attributes(k)?.metadata.mode == 0o600, "\(when)")
            } else {
                #expect(try shard.attributes(k) == nil, "\(when)")
            }
        }
        try checkPendingReplayedAndApplied(shard, dir, path, check)
    }

    /// The same with a close (a put keeping its indexes) logged during the apply
    /// that a setxattr (a direct index update) triggers: it takes the indexes of
    /// the put being applied, and drops the one the setxattr set.
    @Test func aCloseLoggedDuringAnApplyKeepsTheIndexSetAfterIt() throws {
        let (dir, path, shard) = try heldSeededShard()
        defer { dir.remove() }
        let k = key(seeded(6))
        _ = try shard.batchPut([put(seeded(6), "first")], clientID: "owner", deferringDurability: true)
        let again: EntryWrite = {
            var item = put(seeded(6), "second")
            item.keepsIndexes = true
            return item
        }()
        shard.applyFault = { [shard] in
            shard.applyFault = nil
            _ = try shard.batchPut([again], clientID: "owner", deferringDurability: true)
        }
        let colour = [IndexPair(name: "colour", value: "red")]
        try shard.updateIndexes(k, clientID: "owner") { _ in colour }
        #expect(shard.applyFault == nil)
        func check(_ shard: Shard, _ when: String) throws {
            let entry = try shard.get(k)
            #expect(String(decoding: entry.value, as: UTF8.self) == "second", "\(when)")
            #expect(entry.indexes == colour, "\(when)")
        }
        try checkPendingReplayedAndApplied(shard, dir, path, check)
    }

    /// A rename logged during such an apply shows the source's pending put as the
    /// target; the direct write to the source lands before the move is applied,
    /// so the target shows one value while pending and another once applied.
    @Test func aRenameLoggedDuringAnApplyShowsWhatItWillMove() throws {
        let (dir, path, shard) = try heldSeededShard()
        defer { dir.remove() }
        let source = key(seeded(7)), target = key("moved")
        _ = try shard.batchPut([put(seeded(7), "first")], clientID: "owner", deferringDurability: true)
        shard.applyFault = { [shard] in
            shard.applyFault = nil
            try shard.rename(source, to: target, clientID: "owner", deferringDurability: true)
        }
        try shard.put(source, value: bytes("second"), clientID: "owner")
        #expect(shard.applyFault == nil)
        let pending = try shownEntry(shard, "moved")?.value
        try shard.sync()
        try crashCopy(path, dir.sub("copy"))
        let replayed = try shownEntry(try Shard.open(at: dir.sub("copy")), "moved")?.value
        try shard.applyLog()
        let applied = try shownEntry(shard, "moved")?.value
        #expect(replayed == "second")
        #expect(applied == "second")
        #expect(pending == applied, "a read before the apply shows \(pending ?? "nothing"), after it \(applied ?? "nothing")")
    }

    /// The lookups and the snapshot are taken together under logLock, but an
    /// apply commits before it takes its batches off the list: a read between
    /// the two sees the move as pending (the target read at the source's key)
    /// in a snapshot where the source's record has moved already.
    @Test func aReadDuringTheApplyOfAMoveFindsTheTarget() throws {
        let (dir, _, shard) = try heldSeededShard()
        defer { dir.remove() }
        var missed = 0, reads = 0
        for n in 0..<200 {
            let target = key("moved\(n)")
            try shard.rename(key(seeded(n)), to: target, clientID: "owner", deferringDurability: true)
            let done = DispatchSemaphore(value: 0)
            DispatchQueue.global().async { [shard] in
                try? shard.applyLog()
                done.signal()
            }
            while done.wait(timeout: .now()) == .timedOut {
                reads += 1
                if try shard.attributes(target) == nil { missed += 1 }
            }
            #expect(try shard.attributes(target) != nil)
            #expect(!shard.hasPendingBatches)
        }
        #expect(missed == 0, "\(missed) of \(reads) reads of a renamed entry during an apply found nothing")
    }

    /// Rebuilding the pending map (applyBatches, once it holds many stale keys)
    /// notes a move whose source was gone when it was logged (a rename racing an
    /// unlink of its source: `rename` checks the source, then logs) as a move of
    /// LMDB's record at the source, which is absent: the target, untouched by
    /// the move, reads as absent until the log is applied.
    @Test func rebuildingThePendingMapKeepsAMoveThatDoesNothingSo() throws {
        let (dir, _, shard) = try heldSeededShard()
        defer { dir.remove() }
        let source = bytes(seeded(8)), target = seeded(9)
        // Many keys, so that the map is rebuilt when this batch is applied; and the source's unlink.
        var items = (0..<70_000).map { put(String(format: "f%06d", $0), "x") }
        items.append(.deletion(of: source))
        _ = try shard.batchPut(items, clientID: "owner", deferringDurability: true)
        // The rename whose check of its source ran before the unlink above, logged
        // after it, while the batch is being applied (so it stays pending).
        shard.applyFault = { [shard] in
            shard.applyFault = nil
            let move = EntryWrite.move(from: source, to: bytes(target))
            _ = try shard.logBatch([move], statuses: [nil], now: Shard.now(), clientID: "owner", deferringDurability: true)
        }
        try shard.put(key("other"), value: bytes("x"), clientID: "owner")  // applies the big batch
        #expect(shard.applyFault == nil)
        #expect(shard.hasPendingBatches)
        let pending = try shownEntry(shard, target)?.value
        try shard.applyLog()
        #expect(try shownEntry(shard, target)?.value == "seed")
        #expect(pending == "seed")
    }
}
