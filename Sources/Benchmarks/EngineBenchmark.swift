import CLMDB
import Foundation
import ShardStore

/// Measures the shard engine against raw LMDB driven through its C API, with the
/// same keys, values, transaction sizes and durability (synchronous commits).
/// Workloads: batch put in sequential and in random key order, random get of
/// every entry (batched, one read transaction per batch for both), and a full
/// ordered listing. Inputs are built before the clock starts.
public struct EngineBenchmark {
    public var entries = 1_000_000
    public var batchSize = 1_000
    public var keySize = 16
    public var valueSize = 100
    public var rounds = 1
    /// Listing passes per round (alternating which side goes first).
    public var listingPasses = 5
    /// Folder for the benchmark's files (a temporary folder under it is removed afterwards).
    public var directory = NSTemporaryDirectory()

    public init() {}

    public struct Line: Sendable {
        public var workload: String
        /// Medians over the rounds.
        public var engineOpsPerSecond: Double
        public var rawOpsPerSecond: Double
        /// Median of the per-round ratios (each round compares runs made side by side).
        public var ratio: Double
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> [Line] {
        let keys = (0..<entries).map { i -> [UInt8] in
            let digits = String(i)
            return Array((String(repeating: "0", count: max(0, keySize - digits.count)) + digits).utf8)
        }
        var generator = SplitMix64(seed: 42)
        let value = (0..<valueSize).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let shuffled = keys.shuffled(using: &generator)
        let getOrder = keys.shuffled(using: &generator)

        var samples: [String: [(Double, Double)]] = [:]
        let order = ["batch put, sequential keys", "batch put, random keys", "random get", "ordered listing"]
        for round in 1...rounds {
            for (name, putKeys) in [(order[0], keys), (order[1], shuffled)] {
                let root = try makeFolder()
                defer { try? FileManager.default.removeItem(atPath: root) }
                progress("round \(round): \(name)")
                let engine = try Shard.create(at: root + "/engine", id: 1, owner: "bench")
                let raw = try RawLMDB(path: root + "/raw")
                let batches = stride(from: 0, to: putKeys.count, by: batchSize).map { start in
                    putKeys[start..<min(start + batchSize, putKeys.count)].map { EntryWrite(key: $0, value: value) }
                }
                // Alternate which side goes first, so neither always runs on the warmer machine.
                let engineFirst = round % 2 == 0
                let (enginePut, rawPut) = try pair(engineFirst,
                    // The engine's time includes applying its batch log to LMDB, so both
                    // sides end with every entry in their B-tree, durably.
                    engine: {
                        for batch in batches { _ = try engine.batchPut(batch, clientID: "bench") }
                        try engine.applyLog()
                    },
                    raw: { for batch in batches { try raw.put(batch) } })
                samples[name, default: []].append((rate(enginePut), rate(rawPut)))

                // Reads run once, on the randomly filled shard (the harder case).
                guard putKeys == shuffled else { continue }
                progress("round \(round): random get")
                let getBatches = stride(from: 0, to: getOrder.count, by: batchSize).map { start in
                    Array(getOrder[start..<min(start + batchSize, getOrder.count)])
                }
                let keyBatches = try getBatches.map { try $0.map { try EntryKey($0) } }
                let (engineGet, rawGet) = try pair(engineFirst, engine: {
                    for batch in keyBatches {
                        for result in try engine.batchGet(batch) { if case .failure(let e) = result { throw e } }
                    }
                }, raw: { for batch in getBatches { try raw.get(batch) } })
                samples[order[2], default: []].append((rate(engineGet), rate(rawGet)))

                progress("round \(round): ordered listing")
                // Both read each entry's key and value size (a listing for `ls -l`).
                // A scan takes tens of milliseconds: take the median of several.
                var engineLists: [Double] = [], rawLists: [Double] = []
                for pass in 0..<listingPasses {
                    var rawSeen = 0, engineSeen = 0
                    let (e, r) = try pair(pass % 2 == 0, engine: {
                        try engine.forEachEntry { view in
                            engineSeen &+= view.size > 0 ? 1 : 0
                            return true
                        }
                    }, raw: { rawSeen = try raw.scan() })
                    guard rawSeen == entries, engineSeen == entries else {
                        throw BenchmarkError("scans saw \(engineSeen) and \(rawSeen) of \(entries) entries")
                    }
                    engineLists.append(e)
                    rawLists.append(r)
                }
                let (engineList, rawList) = (median(engineLists), median(rawLists))
                samples[order[3], default: []].append((rate(engineList), rate(rawList)))
            }
        }
        return order.map { name in
            let s = samples[name] ?? []
            return Line(workload: name, engineOpsPerSecond: median(s.map(\.0)), rawOpsPerSecond: median(s.map(\.1)),
                        ratio: median(s.map { $0.0 / $0.1 }))
        }
    }

    /// Times both sides, in the given order; returns (engine, raw) seconds.
    private func pair(_ engineFirst: Bool, engine: () throws -> Void, raw: () throws -> Void) throws -> (Double, Double) {
        if engineFirst {
            let e = try time(engine)
            return (e, try time(raw))
        }
        let r = try time(raw)
        return (try time(engine), r)
    }

    private func rate(_ seconds: Double) -> Double { Double(entries) / seconds }

    private func makeFolder() throws -> String {
        let path = directory + "/shardfs-bench-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}

struct BenchmarkError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Seconds taken by `body`.
func time(_ body: () throws -> Void) throws -> Double {
    try ContinuousClock().measure(body).inSeconds
}

extension Duration {
    var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// The median; 0 for none.
public func median(_ values: [Double]) -> Double {
    guard !values.isEmpty else { return 0 }
    let sorted = values.sorted()
    return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}

/// A deterministic generator so both sides see the same key order.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The baseline: LMDB's C API with nothing on top, same map size as a shard,
/// default (durable) commits, values copied out as any real reader must.
final class RawLMDB {
    let env: OpaquePointer
    var dbi: MDB_dbi = 0

    init(path: String) throws {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        var env: OpaquePointer?
        try RawLMDB.check(mdb_env_create(&env))
        self.env = env!
        try check(mdb_env_set_mapsize(env, ShardOptions.defaultSizeLimit))
        try check(mdb_env_open(env, path, UInt32(MDB_NOTLS), 0o644))
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, 0, &txn))
        try check(mdb_dbi_open(txn, nil, 0, &dbi))
        try check(mdb_txn_commit(txn))
    }

    deinit { mdb_env_close(env) }

    func put(_ batch: [EntryWrite]) throws {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, 0, &txn))
        for item in batch {
            try item.key.withUnsafeBytes { k in
                try item.value.withUnsafeBytes { v in
                    var key = MDB_val(mv_size: k.count, mv_data: UnsafeMutableRawPointer(mutating: k.baseAddress))
                    var value = MDB_val(mv_size: v.count, mv_data: UnsafeMutableRawPointer(mutating: v.baseAddress))
                    try check(mdb_put(txn, dbi, &key, &value, 0))
                }
            }
        }
        try check(mdb_txn_commit(txn))
    }

    func get(_ keys: [[UInt8]]) throws {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        defer { mdb_txn_abort(txn) }
        for k in keys {
            let copy: [UInt8] = try k.withUnsafeBytes { kb in
                var key = MDB_val(mv_size: kb.count, mv_data: UnsafeMutableRawPointer(mutating: kb.baseAddress))
                var value = MDB_val()
                try check(mdb_get(txn, dbi, &key, &value))
                return Array(UnsafeRawBufferPointer(start: value.mv_data, count: value.mv_size))
            }
            if copy.isEmpty { throw BenchmarkError("empty value") }
        }
    }

    func scan() throws -> Int {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        defer { mdb_txn_abort(txn) }
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, dbi, &cursor))
        defer { mdb_cursor_close(cursor) }
        var key = MDB_val(), value = MDB_val()
        var count = 0
        var rc = mdb_cursor_get(cursor, &key, &value, MDB_FIRST)
        while rc == 0 {
            count &+= value.mv_size > 0 ? 1 : 0
            rc = mdb_cursor_get(cursor, &key, &value, MDB_NEXT)
        }
        return count
    }

    private func check(_ rc: Int32) throws { try RawLMDB.check(rc) }

    private static func check(_ rc: Int32) throws {
        if rc != 0 { throw BenchmarkError(String(cString: mdb_strerror(rc))) }
    }
}
