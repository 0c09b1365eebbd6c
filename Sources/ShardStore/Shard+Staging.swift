import Glibc
import LMDB

// Chunk sets being written: a put of a value over `stagingThreshold` writes its
// chunks into a fresh set, listed in `staging`, over several transactions, and
// the record switches to the set in the last one (readers see the old value or
// the new one). What a crash leaves listed, the shard's next open removes, with
// the value files being written or released (ValueFiles.swift).

extension Shard {
    /// Chunk sets listed in `staging`: what writes in progress, a crash or a failure left.
    public func stagedSets() throws -> [UInt64] {
        try listedValueFiles(.chunkSet)
    }

    /// Writes the chunks of a value into a new chunk set, `stagingThreshold` bytes
    /// per transaction; the set is listed in `staging` until a record uses it.
    func stageChunks(size: Int, clientID: String,
                             source: @escaping (Int, UnsafeMutableRawBufferPointer) throws -> Void) throws -> UInt64 {
        var set: UInt64 = 0
        try write(clientID: clientID) { ctx in
            set = try self.newChunkSet(ctx.txn)
            try ctx.txn.put(self.staging, chunkSetKey(set), [])
        }
        let total = (size + chunkSize - 1) / chunkSize, perTransaction = Self.stagingThreshold / chunkSize
        do {
            var first = 0
            while first < total {
                let range = first..<min(total, first + perTransaction)
                try write(clientID: clientID) { [set] ctx in
                    for n in range {
                        let out = try chunkKey(set, n).withUnsafeBytes {
                            try ctx.txn.reserve(self.chunks, $0, count: min(chunkSize, size - n * chunkSize))
                        }
                        try source(n * chunkSize, out)
                    }
                }
                first = range.upperBound
            }
        } catch {
            try? removeStagedSet(set)
            throw error
        }
        return set
    }

    /// Removes a staged set that will not be switched to (a failed or abandoned write).
    func removeStagedSet(_ set: UInt64) throws {
        do {
            try committer.submit { ctx in
                try self.deleteChunkSet(ctx.txn, set)
                try ctx.txn.delete(self.staging, chunkSetKey(set))
            }
        } catch let error as ShardError { throw error } catch {
            throw writeFailure(error)
        }
    }

    /// At open: chunk sets a crash left half-written are garbage, and so are
    /// value files being written or released (ValueFiles.swift).
    func removeLeftoverStagedSets() throws {
        let listed = try listedInStaging()  // one read: usually nothing is listed
        for set in listed where set.kind == .chunkSet { try removeStagedSet(set.number) }
        let files = listed.filter { $0.kind != .chunkSet }.map(\.number)
        guard !files.isEmpty else { return }
        for number in files { unlink(valueFiles.filePath(number)) }
        try committer.submit { ctx in
            for number in files { _ = try ctx.txn.delete(self.staging, chunkSetKey(number)) }
        }
    }
}

final class StagedSetBox: @unchecked Sendable {
    var set: UInt64 = 0
}
