import Foundation
import LMDB
import LMDBSnapshot
@testable import ShardStore
import TestSupport
import Testing

/// Large values kept in value files beside the shard's LMDB (ValueFiles.swift):
/// each rule of that file's header, on a real shard.
@Suite(.onOwnThreads) struct ValueFileTests {
    func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31) &+ seed } }

    func fileExists(_ shard: Shard, _ number: UInt64) -> Bool {
        FileManager.default.fileExists(atPath: shard.valueFiles.filePath(number))
    }

    /// Waits (at most 10 s) for the background remover to take `number` away.
    func waitUntilRemoved(_ shard: Shard, _ number: UInt64) async throws -> Bool {
        for _ in 0..<1000 {
            if !fileExists(shard, number), try shard.stagedNumbers().isEmpty { return true }
            try await Task.sleep(for: .milliseconds(10))
        }
        return false
    }

    /// Writes `value` into a new value file, in pieces and one seek back, and commits it as `name`.
    func commitValueFile(_ shard: Shard, _ name: String, _ value: [UInt8]) throws -> UInt64 {
        let file = try shard.beginValueFile(clientID: "owner")
        let number = file.number
        let piece = 1 << 20
        try value.withUnsafeBytes { v in
            var offset = 0
            while offset < value.count {
                let end = min(value.count, offset + piece)
                try file.write(UnsafeRawBufferPointer(rebasing: v[offset..<end]), at: offset)
                offset = end
            }
            try file.write(UnsafeRawBufferPointer(rebasing: v[0..<10]), at: 0)  // a seek back rewrites in place
        }
        try file.commit(as: key(name))
        return number
    }

    @Test func aValueFileIsInvisibleUntilCommittedThenReadWholeAndInPieces() throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        try shard.put(key("v"), value: bytes("old"), indexes: [IndexPair(name: "kind", value: "log")], clientID: "owner")
        let value = pattern(3 << 20 + 1234, seed: 5)
        let file = try shard.beginValueFile(clientID: "owner")
        try value.withUnsafeBytes { try file.write($0, at: 0) }
        #expect(try shard.get(key("v")).value == bytes("old"))
        #expect(try shard.stagedNumbers() == [file.number])
        var back = [UInt8](repeating: 0, count: 1000)
        try back.withUnsafeMutableBytes { try file.read(at: (1 << 20) - 500, into: $0) }
        #expect(back == Array(value[((1 << 20) - 500)..<((1 << 20) + 500)]))
        let number = file.number
        try file.commit(as: key("v"))

        let entry = try shard.get(key("v"))
        #expect(entry.value == value)
        #expect(entry.indexes == [IndexPair(name: "kind", value: "log")])  // a rewrite keeps the indexes
        #expect(try shard.read(key("v"), offset: 2 << 20, count: 4096) == Array(value[(2 << 20)..<((2 << 20) + 4096)]))
        #expect(try shard.read(key("v"), offset: value.count - 10, count: 4096) == Array(value[(value.count - 10)...]))
        #expect(try shard.attributes(key("v"))?.size == value.count)
        #expect(try shard.stagedNumbers() == [])
        #expect(fileExists(shard, number))
        #expect(try shard.valueFileBytes() == value.count)
        #expect(try shard.stats().usedBytes >= value.count)
    }

    @Test func aRenameMovesTheRecordAndAnOverwriteReleasesTheFile() async throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        let value = pattern(2 << 20, seed: 9)
        let number = try commitValueFile(shard, "a", value)
        try shard.rename(key("a"), to: key("b"), clientID: "owner")
        #expect(fileExists(shard, number))
        #expect(try shard.get(key("b")).value == value)
        #expect(try shard.attributes(key("a")) == nil)
        try shard.put(key("b"), value: bytes("small"), clientID: "owner")
        #expect(try shard.get(key("b")).value == bytes("small"))
        #expect(try await waitUntilRemoved(shard, number))
        #expect(try shard.valueFileBytes() == 0)
    }

    /// `valueFile(of:opening:)` names the file holding an entry's value and
    /// opens it; the descriptor reads that value after the entry changed and the
    /// file was removed (what the mount hands the kernel, and keeps for an
    /// unlinked file's descriptors). Values in LMDB have none.
    @Test func anOpenedValueFileOutlivesItsRecord() async throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        let value = pattern(2 << 20, seed: 3)
        let number = try commitValueFile(shard, "a", value)
        let found = try #require(try shard.valueFile(of: key("a"), opening: true))
        let fd = try #require(found.fd)
        defer { close(fd) }
        #expect(found.number == number)
        #expect(try shard.valueFile(of: key("a"), opening: false)?.fd == nil)
        try shard.put(key("a"), value: bytes("small"), clientID: "owner")
        #expect(try shard.valueFile(of: key("a"), opening: false) == nil, "the value is in LMDB now")
        #expect(try await waitUntilRemoved(shard, number))
        var back = [UInt8](repeating: 0, count: value.count)
        #expect(back.withUnsafeMutableBytes { preadFully(fd, into: $0, at: 0) } == 0)
        #expect(back == value)
        #expect(throws: ShardError.self) { try shard.valueFile(of: key("gone"), opening: false) }
    }

    @Test func aDeleteReleasesTheFileOnlyAfterTheReadsThatMaySeeIt() async throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        let number = try commitValueFile(shard, "v", pattern(2 << 20, seed: 1))
        // A read registered before the delete commits holds the file.
        let reading = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let reader = Thread {
            shard.readingValueFiles {
                reading.signal()
                release.wait()
            }
        }
        reader.start()
        reading.wait()
        try shard.delete(key("v"), clientID: "owner")
        try await Task.sleep(for: .milliseconds(300))
        #expect(fileExists(shard, number))
        release.signal()
        #expect(try await waitUntilRemoved(shard, number))
        #expect(try shard.valueFileBytes() == 0)
        #expect(throws: ShardError.entryNotFound(key("v"))) { _ = try shard.get(key("v")) }
    }

    @Test func whatACrashLeavesIsRemovedAtOpen() throws {
        let dir = try TemporaryDirectory("valuefile")
        var shard: Shard? = try makeShard(dir)
        let committed = pattern(2 << 20, seed: 3)
        let kept = try commitValueFile(shard!, "kept", committed)
        // Dropped unused: removed at once.
        var dropped: UInt64 = 0
        do {
            let file = try shard!.beginValueFile(clientID: "owner")
            dropped = file.number
            try committed.withUnsafeBytes { try file.write($0, at: 0) }
        }
        #expect(!fileExists(shard!, dropped))
        // Left behind while being written (a crash): still listed, removed when the shard opens again.
        var left: UInt64 = 0
        do {
            let file = try shard!.beginValueFile(clientID: "owner")
            left = file.number
            try committed.withUnsafeBytes { try file.write($0, at: 0) }
            file.leaveBehind()
        }
        #expect(try shard!.stagedNumbers() == [left])
        #expect(fileExists(shard!, left))
        shard = nil
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(try reopened.stagedNumbers() == [])
        #expect(!fileExists(reopened, left))
        #expect(fileExists(reopened, kept))
        #expect(try reopened.get(key("kept")).value == committed)
        #expect(try reopened.valueFileBytes() == committed.count)
    }

    @Test func aFileReleasedButNotYetRemovedWhenTheProcessDiesIsRemovedAtOpen() async throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        let value = pattern(2 << 20, seed: 4)
        let released = try commitValueFile(shard, "old", value)
        let kept = try commitValueFile(shard, "kept", value)
        // A read holds the removal back: the delete lists the file as released
        // (kind 2) and it stays. A crash now leaves both on disk.
        let reading = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let reader = Thread { shard.readingValueFiles { reading.signal(); release.wait() } }
        reader.start()
        reading.wait()
        do {
            defer { release.signal() }
            try shard.delete(key("old"), clientID: "owner")
            #expect(try shard.stagedNumbers() == [released])
            #expect(fileExists(shard, released))
            try crashCopy(dir.sub("shard-7"), dir.sub("copy"))
        }
        let copy = try Shard.open(at: dir.sub("copy"))
        #expect(try copy.stagedNumbers() == [])
        #expect(!fileExists(copy, released))
        #expect(fileExists(copy, kept))
        #expect(try copy.get(key("kept")).value == value)
        #expect(try copy.valueFileBytes() == value.count)
        #expect(throws: ShardError.entryNotFound(key("old"))) { _ = try copy.get(key("old")) }
        // The live shard removes it once the read has ended.
        #expect(try await waitUntilRemoved(shard, released))
    }

    @Test func moreFilesThanTheOpenDescriptorsReadBackAndAreRemoved() async throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        let count = ValueFileDirectory.openFilesLimit + 3
        let numbers = try (0..<count).map { try commitValueFile(shard, "v\($0)", pattern(1 << 20 + $0, seed: UInt8($0))) }
        for round in 0..<2 {  // the second round reads through descriptors kept or opened again
            for i in 0..<count {
                #expect(try shard.read(key("v\(i)"), offset: 1 << 20, count: 100) == Array(pattern(1 << 20 + i, seed: UInt8(i))[(1 << 20)...]), "round \(round)")
            }
        }
        for i in 0..<count { try shard.delete(key("v\(i)"), clientID: "owner") }
        for number in numbers { #expect(try await waitUntilRemoved(shard, number)) }
    }

    @Test func aClosedShardTakesNoValueFile() throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        try shard.close()
        #expect(throws: ShardError.self) { _ = try shard.beginValueFile(clientID: "owner") }
        #expect(try shard.stagedNumbers() == [])
    }

    @Test func aShardWithoutDurableCommitsMakesNoValueFile() throws {
        let dir = try TemporaryDirectory("valuefile")
        var options = ShardOptions()
        options.durableCommits = false
        let shard = try Shard.create(at: dir.sub("shard-7"), id: 7, owner: "owner", options: options)
        #expect(throws: ShardError.self) { _ = try shard.beginValueFile(clientID: "owner") }
    }

    @Test func valueFilesCountAgainstTheShardsLimit() throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir, limit: 8 << 20)
        _ = try commitValueFile(shard, "first", pattern(5 << 20, seed: 1))
        let second = try shard.beginValueFile(clientID: "owner")
        try pattern(5 << 20, seed: 2).withUnsafeBytes { try second.write($0, at: 0) }
        #expect(throws: ShardError.full(limit: 8 << 20)) { try second.commit(as: key("second")) }
        second.discard()
        #expect(try shard.stagedNumbers() == [])
        // No write or truncation makes a value larger than the whole limit; the file stays usable.
        let third = try shard.beginValueFile(clientID: "owner")
        #expect(throws: ShardError.full(limit: 8 << 20)) { try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try third.write($0, at: (8 << 20) - 5) } }
        #expect(throws: ShardError.full(limit: 8 << 20)) { try third.truncate(to: (8 << 20) + 1) }
        try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try third.write($0, at: 0) }
        #expect(third.size == 10)
        third.discard()
        // Replacing the first value frees its bytes in the same commit.
        _ = try commitValueFile(shard, "first", pattern(5 << 20, seed: 3))
        #expect(try shard.get(key("first")).value == pattern(5 << 20, seed: 3))
        // Another client cannot write a value file into the shard.
        #expect(throws: ShardError.self) { _ = try shard.beginValueFile(clientID: "intruder") }
    }

    /// A view of `shard`'s newest snapshot as a backup reads it: pages from the
    /// data file (a folder volume), or from `device` by the published extents.
    func view(of shard: Shard, device: String? = nil) throws -> (PinnedSnapshot, ShardView) {
        let (pin, published) = try shard.pinForViews(applyingBatchesOlderThan: .zero)
        let source: any PageSource = try device.map { try DevicePageSource(device: $0, extents: published.extents, pageSize: published.root.pageSize) }
            ?? FilePageSource(path: shard.path + "/data.mdb", pageSize: published.root.pageSize)
        let view = try ShardView(snapshot: try Snapshot(source: source, root: published.root), transactionID: published.root.txnid,
                                 path: shard.path, device: device)
        return (pin, view)
    }

    @Test func aViewReadsAValueFileAndItsPinKeepsTheFileAfterADelete() async throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        let value = pattern(2 << 20 + 77, seed: 4)
        let number = try commitValueFile(shard, "v", value)
        let (pin, view) = try view(of: shard)
        try shard.delete(key("v"), clientID: "owner")
        try await Task.sleep(for: .milliseconds(300))
        #expect(fileExists(shard, number))
        #expect(try view.get(key("v")).value == value)
        #expect(try view.read(key("v"), offset: (1 << 20) - 3, count: 10) == Array(value[((1 << 20) - 3)..<((1 << 20) + 7)]))
        #expect(try view.stats().usedBytes >= value.count)
        pin.end()
        #expect(try await waitUntilRemoved(shard, number))
    }

    @Test func filesReleasedWhileAPinWaitsAreKeptUntilItEnds() async throws {
        let dir = try TemporaryDirectory("valuefile")
        let shard = try makeShard(dir)
        let names = ["a", "b", "c"]
        let numbers = try names.enumerated().map { try commitValueFile(shard, $1, pattern(1 << 20 + 5, seed: UInt8($0))) }
        let (pin, view) = try view(of: shard)
        // Each delete schedules a removal round while the first still waits for the pin.
        for name in ["a", "b", "c"] {
            try shard.delete(key(name), clientID: "owner")
            try await Task.sleep(for: .milliseconds(50))
        }
        try await Task.sleep(for: .milliseconds(300))
        for number in numbers { #expect(fileExists(shard, number)) }
        for (i, name) in names.enumerated() { #expect(try view.get(key(name)).value == pattern(1 << 20 + 5, seed: UInt8(i))) }
        pin.end()
        for number in numbers { #expect(try await waitUntilRemoved(shard, number)) }
        #expect(try shard.valueFileBytes() == 0)
    }

    @Test func aShardThatHeldAValueFileHasTheNewerFormatForGood() throws {
        let dir = try TemporaryDirectory("valuefile")
        var shard: Shard? = try makeShard(dir)
        func format(_ shard: Shard) throws -> String? {
            try shard.readTransaction(applyingLog: false) { txn in
                try txn.get(shard.meta, Descriptor.formatKey).map { String(decoding: $0, as: UTF8.self) }
            }
        }
        #expect(try format(shard!) == Descriptor.formatVersion)
        _ = try commitValueFile(shard!, "v", pattern(1 << 20, seed: 1))
        #expect(try format(shard!) == Descriptor.valueFilesFormat)
        shard = nil
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(try format(reopened) == Descriptor.valueFilesFormat)
        #expect(try reopened.get(key("v")).value == pattern(1 << 20, seed: 1))
    }

    @Test(.enabled(if: getuid() == 0, "loop devices and mounts need root"))
    func aViewOnABlockDeviceReadsValueFilesByTheirRecordedExtents() async throws {
        let fs = try LoopFilesystem()
        defer { fs.cleanUp() }
        var options = ShardOptions()
        options.sizeLimit = 64 << 20
        let shard = try Shard.create(at: fs.mountPoint + "/shard-7", id: 7, owner: "owner", options: options)
        let first = pattern(3 << 20 + 1001, seed: 6), second = pattern(5 << 20 + 3, seed: 8)
        let firstNumber = try commitValueFile(shard, "v", first)
        let (oldPin, old) = try view(of: shard, device: fs.device)
        // Rewritten: the old view still reads the first file, from the device; a new one reads the second.
        _ = try commitValueFile(shard, "v", second)
        let (newPin, new) = try view(of: shard, device: fs.device)
        #expect(try old.get(key("v")).value == first)
        #expect(try old.read(key("v"), offset: 4095, count: 8193) == Array(first[4095..<(4095 + 8193)]))
        #expect(try new.get(key("v")).value == second)
        #expect(try new.read(key("v"), offset: second.count - 5, count: 100) == Array(second[(second.count - 5)...]))
        // A sparse value (a write far past the end leaves a hole): the hole reads as zeros.
        let sparse = try shard.beginValueFile(clientID: "owner")
        try first.withUnsafeBytes { v in
            try sparse.write(UnsafeRawBufferPointer(rebasing: v[0..<(1 << 20)]), at: 0)
            try sparse.write(UnsafeRawBufferPointer(rebasing: v[0..<(1 << 20)]), at: 6 << 20)
        }
        try sparse.commit(as: key("sparse"))
        let (sparsePin, sparseView) = try view(of: shard, device: fs.device)
        var expected = [UInt8](repeating: 0, count: 7 << 20)
        expected.replaceSubrange(0..<(1 << 20), with: first[0..<(1 << 20)])
        expected.replaceSubrange((6 << 20)..<(7 << 20), with: first[0..<(1 << 20)])
        #expect(try sparseView.get(key("sparse")).value == expected)
        #expect(try sparseView.read(key("sparse"), offset: (1 << 20) - 2, count: 4) == [first[(1 << 20) - 2], first[(1 << 20) - 1], 0, 0])
        sparsePin.end()
        // A file whose map was not recorded (FIEMAP failed) is refused, never read as holes.
        let sparseNumber = try #require(try shard.readTransaction(applyingLog: false) { txn in
            try txn.get(shard.entries, key("sparse").bytes).map { try RecordView($0).valueFile }
        } ?? nil)
        try shard.write(clientID: "owner") { ctx in _ = try ctx.txn.delete(shard.meta, Shard.valueFileExtentsKey(sparseNumber)) }
        let (mapless, maplessView) = try view(of: shard, device: fs.device)
        #expect(throws: ShardError.self) { _ = try maplessView.get(key("sparse")) }
        mapless.end()
        // The old pin alone holds the first file.
        newPin.end()
        try await Task.sleep(for: .milliseconds(300))
        #expect(fileExists(shard, firstNumber))
        oldPin.end()
        #expect(try await waitUntilRemoved(shard, firstNumber))
    }

    /// A value file whose sync fails (its disk is full: `values/` here is a
    /// `FillableDisk`) is not committed, the entry keeps its value, and a retry of
    /// the commit is refused even once there is room again: Linux reports a
    /// failed writeback once, and a second sync could succeed over the lost
    /// pages. The shard stays usable: the next value file commits.
    @Test(.enabled(if: getuid() == 0, "loop devices and mounts need root"))
    func aValueFileWhoseSyncFailsIsNeverCommitted() throws {
        let dir = try TemporaryDirectory("valuefile-fault")
        defer { dir.remove() }
        var shard: Shard? = try makeShard(dir)
        try shard!.put(key("v"), value: bytes("old"), clientID: "owner")
        let disk = try FillableDisk(in: dir, mountedAt: dir.sub("shard-7/values"))
        defer { disk.cleanUp() }
        try disk.fill(leavingKiB: 8 << 10)  // 8 MiB left for a 24 MiB value
        do {
            let file = try shard!.beginValueFile(clientID: "owner")
            let value = pattern(24 << 20, seed: 3)
            // The bytes reach the page cache; the disk under them has no room.
            try value.withUnsafeBytes { try file.write($0, at: 0) }
            #expect(file.size == 24 << 20)
            do {
                try file.commit(as: key("v"))
                Issue.record("a value file committed on a full disk")
            } catch {
                // The sync fails: EIO, or ENOSPC (read as `volumeFull`).
                let failedSync: Bool
                switch error as? ShardError {
                case .storage(let why)?, .volumeFull(let why)?: failedSync = why.contains("cannot sync value file")
                default: failedSync = false
                }
                #expect(failedSync, "the commit failed otherwise: \(error)")
            }
            try disk.emptyRoom()
            #expect(throws: ShardError.storage("value file \(file.number) failed to sync before; its bytes may be lost")) {
                try file.commit(as: key("v"))
            }
            file.discard()
        }
        #expect(try shard!.get(key("v")).value == bytes("old"))
        // Room again: the next value file commits.
        let next = pattern(12 << 20, seed: 9)
        _ = try commitValueFile(shard!, "w", next)
        #expect(try shard!.get(key("w")).value == next)
        shard = nil
        try disk.remount()  // what reached the disk
        let reopened = try Shard.open(at: dir.sub("shard-7"))
        #expect(try reopened.get(key("v")).value == bytes("old"))
        #expect(try reopened.get(key("w")).value == next)
    }
}

extension Shard {
    /// Every number `staging` lists: chunk sets and value files.
    func stagedNumbers() throws -> [UInt64] {
        try readTransaction(applyingLog: false) { txn in
            try txn.withCursor(staging) { cursor in
                var found: [UInt64] = []
                var pair = try cursor.first()
                while let p = pair {
                    if p.key.count == 8 { found.append(UInt64(bigEndian: p.key.loadUnaligned(as: UInt64.self))) }
                    pair = try cursor.next()
                }
                return found
            }
        }
    }
}
