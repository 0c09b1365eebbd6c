// About 500 lines on purpose: one benchmark whose systems (the batch service,
// Redis, raw LMDB) must do exactly the same work, kept side by side so that a
// change to one is seen to apply to all. Its child processes, the RESP client
// and the backup measurement are in files of their own.
import BatchProtocol
import Dispatch
import Foundation
import ShardFSClient
import ShardStore

/// Measures the batch socket service against Redis and against raw LMDB, doing
/// the same work: put `entries` values of `valueSize` bytes in batches of
/// `batchSize` (keys are the original service's entry IDs "1", "2", …, first in
/// increasing order, then shuffled), then get them all in batches, from each
/// count of concurrent connections (which split the key space between them).
///
/// - ShardFS: a `shardfs serve` child process on a temporary data folder, driven
///   through the Swift client over the Unix socket and over loopback TCP.
///   BatchPut is durable (fsync'ed before the answer).
/// - Redis: `redis-server` child processes on a free loopback port, without
///   persistence and with `appendonly yes` + `appendfsync always`; MSET / MGET of
///   `batchSize` keys per command through a minimal RESP client.
/// - raw LMDB through its C API in this process (`RawLMDB`), durable commits, one
///   transaction per batch; a "connection" is a thread.
///
/// Every connection keeps up to `depth` commands in flight (pipelining). Inputs
/// are built before the clock starts; encoding and decoding are timed.
public struct BatchBenchmark {
    public var entries = 1_000_000
    public var batchSize = 1_000
    public var valueSize = 100
    public var rounds = 1
    public var connections = [1, 8]
    /// Commands in flight per connection.
    public var depth = 4
    /// ShardFS transports to measure: "unix", "tcp".
    public var transports = ["unix", "tcp"]
    /// Systems to measure: "lmdb", "redis" (no persistence), "redis-durable", "shardfs";
    /// "shardfs-backup": a primary with etcd metadata measured without, then with,
    /// a backup node following its views (docs/BACKUP-VIEWS.md), puts only, Unix socket;
    /// "shardfs-loop": the node on a loop volume (ext4 on a loop device over a sparse
    /// image: what a block volume adds), Unix socket, to compare with "shardfs" (root).
    public var systems = ["lmdb", "redis", "redis-durable", "shardfs"]
    /// How the ShardFS client reads a BatchGet: "all" (`batchGetAll`, one array per
    /// request), "chunks" (`batchGetChunks`) or "items" (`batchGet`, item by item).
    public var getAPI = "all"
    /// Every BatchGet measurement reads each key this many times (longer, steadier samples).
    public var getRepeat = 1
    /// "shardfs-backup": how often the primary publishes views (backup.view_interval_ms).
    public var viewIntervalMs = 500
    /// The `shardfs` executable started with `serve`.
    public var serverExecutable = ""
    public var directory = NSTemporaryDirectory()

    public init() {}

    public enum Workload: String, CaseIterable, Sendable {
        case putIncreasing = "BatchPut, increasing IDs"
        case putRandom = "BatchPut, random keys"
        case getRandom = "BatchGet, random order"
    }

    public static let rawLMDB = "raw LMDB (C API)"
    public static let redisVolatile = "Redis, no persistence"
    public static let redisDurable = "Redis, appendfsync always"
    public static func shardFS(_ transport: String) -> String { "ShardFS (\(transport))" }
    public static let onLoopVolume = "ShardFS on a loop volume (unix)"
    /// "shardfs-backup" (folder volumes) and "shardfs-backup-loop" (loop volumes: the
    /// backup reads the primary's device with direct I/O, as from a multi-attached volume).
    public static func backupSystem(loop: Bool, withBackup: Bool) -> String {
        "ShardFS on \(loop ? "a loop volume" : "a folder"), etcd, \(withBackup ? "one backup" : "no backup") (unix)"
    }
    public static let backupSystems = [false, true].flatMap { loop in [false, true].map { backupSystem(loop: loop, withBackup: $0) } }

    /// One figure: the median over the rounds.
    public struct Figure: Sendable {
        public var system: String
        public var workload: Workload
        public var connections: Int
        public var opsPerSecond: Double
        /// Every round's figure, in round order (the median is `opsPerSecond`).
        public var rounds: [Double]
    }

    public func run(progress: @escaping @Sendable (String) -> Void = { _ in }) async throws -> [Figure] {
        let inputs = Inputs(entries: entries, batchSize: batchSize, valueSize: valueSize)
        let scratch = directory + "/shardfs-bench-batch-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        ChildProcess.installSignalCleanup()
        // Found before any measurement, so a missing Redis fails the run at once.
        let redisPath = systems.contains("redis") || systems.contains("redis-durable") ? try RedisServer.locate() : ""

        var samples: [String: [Double]] = [:]
        let getCount = inputs.getKeys.count * getRepeat
        func record(_ system: String, _ workload: Workload, _ connections: Int, _ seconds: Double) {
            let done = Double(entries * (workload == .getRandom ? getRepeat : 1))
            samples["\(system)|\(workload.rawValue)|\(connections)", default: []].append(done / seconds)
            progress("  \(system), \(workload.rawValue), \(connections) conn: \(Int(done / seconds)) ops/s")
        }

        /// Put runs of one ShardFS node measured as `system`, a fresh shard each (and
        /// with `gets`, BatchGet runs on the randomly filled one); `around` wraps each
        /// timed run, given its entries and requests (CPU accounting, a probe);
        /// `volumes` (a folder of folder volumes): after each run, wait until the
        /// deleted shard's files are gone, so that their removal (later with a
        /// backup, which must leave them first) is not inside the next timed run.
        func measureShardFS(_ system: String, round: Int, endpoint: Endpoint, gets: Bool, volumes: String? = nil,
                            around: (_ entries: Int, _ requests: Int, _ run: () async throws -> Double) async throws -> Double) async throws {
            var clients: [ShardFSClient] = []
            for _ in 0..<(connections.max() ?? 1) { clients.append(try await ShardFSClient.connect(to: endpoint)) }
            for n in connections {
                for (workload, batches) in [(Workload.putIncreasing, inputs.increasing), (.putRandom, inputs.random)] {
                    progress("round \(round): \(system), \(workload.rawValue), \(n) connection(s)")
                    let shard = try await clients[0].newShard(owner: "bench")
                    record(system, workload, n, try await around(entries, batches.count) {
                        try await shardFSPut(Array(clients.prefix(n)), shard, batches)
                    })
                    if gets, workload == .putRandom, n == connections.last {
                        for g in connections {
                            record(system, .getRandom, g, try await around(entries * getRepeat, getCount) {
                                try await shardFSGet(Array(clients.prefix(g)), shard, inputs.getKeys)
                            })
                        }
                    }
                    try? await clients[0].closeShard(client: "bench", shard: shard)
                    try? await clients[0].deleteShard(client: "bench", shard: shard)
                    if let volumes { try await waitUntilRemoved(shard: shard, under: volumes) }
                }
            }
            for client in clients { await client.close() }
        }

        for round in 1...rounds {
            // raw LMDB, in this process.
            for n in connections where systems.contains("lmdb") {
                for (workload, batches) in [(Workload.putIncreasing, inputs.increasing), (.putRandom, inputs.random)] {
                    progress("round \(round): \(Self.rawLMDB), \(workload.rawValue), \(n) connection(s)")
                    let folder = scratch + "/raw-\(round)-\(n)-\(workload == .putRandom ? "random" : "increasing")"
                    defer { try? FileManager.default.removeItem(atPath: folder) }
                    let raw = SendableBox(try RawLMDB(path: folder))
                    let writes = batches.map { $0.map { EntryWrite(key: $0.key, value: $0.value) } }
                    let parts = split(writes.count, n)
                    record(Self.rawLMDB, workload, n, try await onThreads(n) { t in
                        for i in parts[t] { try raw.value.put(writes[i]) }
                    })
                    // Gets once per round, on the randomly filled store of the last put run.
                    guard workload == .putRandom, n == connections.last else { continue }
                    for g in connections {
                        let gets = split(getCount, g)
                        record(Self.rawLMDB, .getRandom, g, try await onThreads(g) { t in
                            for i in gets[t] { try raw.value.get(inputs.getKeys[i % inputs.getKeys.count]) }
                        })
                    }
                }
            }

            // Redis, both modes; a fresh server (and folder) for every put run.
            for durable in [false, true] where systems.contains(durable ? "redis-durable" : "redis") {
                let system = durable ? Self.redisDurable : Self.redisVolatile
                for n in connections {
                    for (workload, batches) in [(Workload.putIncreasing, inputs.increasing), (.putRandom, inputs.random)] {
                        progress("round \(round): \(system), \(workload.rawValue), \(n) connection(s)")
                        let folder = scratch + "/redis-\(round)-\(durable)-\(n)-\(workload == .putRandom ? "random" : "increasing")"
                        let server = try RedisServer.start(executable: redisPath, folder: folder, durable: durable)
                        defer {
                            server.stop()
                            try? FileManager.default.removeItem(atPath: folder)
                        }
                        let parts = split(batches.count, n)
                        let depth = self.depth
                        record(system, workload, n, try await onThreads(n, prepare: { _ in try RESPConnection(port: server.port) }) { t, redis in
                            try redis.pipeline(parts[t], depth: depth, send: { redis.sendMSET(batches[$0]) },
                                               receive: { _ in try redis.expectOK() })
                        })
                        // MGET of 1,000 keys (the target compares against Redis without persistence).
                        guard workload == .putRandom, !durable, n == connections.last else { continue }
                        for g in connections {
                            let gets = split(getCount, g)
                            let size = valueSize, batchCount = inputs.getKeys.count
                            record(system, .getRandom, g, try await onThreads(g, prepare: { _ in try RESPConnection(port: server.port) }) { t, redis in
                                try redis.pipeline(gets[t], depth: depth, send: { redis.sendMGET(inputs.getKeys[$0 % batchCount]) },
                                                   receive: { i in try redis.expectValues(inputs.getKeys[i % batchCount].count, size: size) })
                            })
                        }
                    }
                }
            }

            // ShardFS: one node for the round; a fresh shard for every put run.
            guard systems.contains("shardfs") else { continue }
            progress("round \(round): starting shardfs serve")
            let node = try ShardFSNode.start(executable: serverExecutable, folder: scratch + "/shardfs-\(round)")
            do {
                for transport in transports {
                    let endpoint: Endpoint = transport == "tcp" ? .tcp(host: "127.0.0.1", port: node.tcpPort) : .unix(path: node.socketPath)
                    let system = Self.shardFS(transport)
                    try await measureShardFS(system, round: round, endpoint: endpoint, gets: true) { entries, requests, run in
                        let before = (server: CPUUse(pid: node.child.pid), client: CPUUse(pid: getpid()), steal: stolenSeconds())
                        let seconds = try await run()
                        progress(Self.cpuLine(server: CPUUse(pid: node.child.pid) - before.server, client: CPUUse(pid: getpid()) - before.client,
                                              entries: entries, requests: requests) + Self.stealNote(stolenSeconds() - before.steal))
                        return seconds
                    }
                }
            } catch {
                node.stop()
                throw error
            }
            node.stop()
        }

        // The node on a loop volume: what a block volume costs beside a folder.
        for round in 1...rounds where systems.contains("shardfs-loop") {
            let folder = scratch + "/loop-\(round)"
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
            let config = folder + "/loop.yaml"
            try """
            cloud:
              provider: loop
              image_dir: \(folder)/images
              volume_size: 8GiB
            """.write(toFile: config, atomically: true, encoding: .utf8)
            progress("round \(round): \(Self.onLoopVolume): starting shardfs serve on a loop volume")
            let node = try ShardFSNode.start(executable: serverExecutable, folder: folder + "/node", extraArguments: ["--config", config])
            do {
                try await measureShardFS(Self.onLoopVolume, round: round, endpoint: .unix(path: node.socketPath), gets: true) { _, _, run in
                    try await run()
                }
            } catch {
                node.stop()
                throw error
            }
            node.stop()  // a clean stop unmounts and detaches the loop device
        }

        // A primary on etcd alone, then with a backup following its views: what
        // publishing views costs the primary's writes.
        for round in 1...rounds {
            for loop in [false, true] where systems.contains(loop ? "shardfs-backup-loop" : "shardfs-backup") {
            // Which goes first alternates by round: later runs of a round were slower
            // (without a backup too; docs/PERFORMANCE.md), which must not count against one side.
            for withBackup in round % 2 == 1 ? [false, true] : [true, false] {
                let system = Self.backupSystem(loop: loop, withBackup: withBackup)
                progress("round \(round): \(system): starting etcd and the node(s)")
                let folder = scratch + "/backup-\(round)-\(loop ? "loop" : "folder")-\(withBackup)"
                let pair = try BackupPair.start(executable: serverExecutable, folder: folder, withBackup: withBackup,
                                                loopVolumes: loop, viewIntervalMs: viewIntervalMs)
                do {
                    // How far the backup's views lag the primary's acknowledged writes while the
                    // load runs. The probe's puts (each an fsync) run without a backup too, read
                    // back from the primary itself, so both sides carry the same writes.
                    let probe = try await ViewLagProbe.start(primary: pair.primary.socketPath,
                                                             backup: pair.backup?.socketPath ?? pair.primary.socketPath)
                    defer { probe.cancel() }  // when a run fails; its task ends on its own
                    try await measureShardFS(system, round: round, endpoint: .unix(path: pair.primary.socketPath), gets: false,
                                             volumes: pair.volumes) { entries, requests, run in
                        // CPU of every process of the pair: on these two vCPUs the backup and etcd
                        // take it from the primary, which on separate hosts they would not.
                        let processes = [("primary", pair.primary.child.pid), ("backup", pair.backup?.child.pid), ("etcd", pair.etcd.pid)]
                            .compactMap { name, pid in pid.map { (name, $0) } }
                        let before = processes.map { CPUUse(pid: $0.1) }
                        let steal = stolenSeconds()
                        let started = ContinuousClock.now
                        let seconds = try await run()
                        let used = zip(processes, before).map { process, start in
                            let use = CPUUse(pid: process.1) - start
                            return "\(process.0) \(String(format: "%.2f", use.seconds)) s (wrote \(use.writtenBytes >> 20) MiB)"
                        }
                        progress("    CPU during the run (\(String(format: "%.2f", seconds)) s): " + used.joined(separator: ", ")
                                 + Self.stealNote(stolenSeconds() - steal))
                        // A value acknowledged in the run that comes back after it still counts.
                        if pair.backup != nil {
                            try await Task.sleep(for: .seconds(3))
                            progress("    view lag on the backup during the run: " + ViewLagProbe.summary(probe.lags(since: started)))
                        }
                        return seconds
                    }
                    await probe.stop()
                } catch {
                    pair.stop()
                    throw error
                }
                pair.stop()
            }
            }
        }

        var figures: [Figure] = []
        for workload in Workload.allCases {
            for n in connections {
                for system in [Self.rawLMDB, Self.redisVolatile, Self.redisDurable] + transports.map(Self.shardFS) + Self.backupSystems + [Self.onLoopVolume] {
                    if let s = samples["\(system)|\(workload.rawValue)|\(n)"] {
                        figures.append(Figure(system: system, workload: workload, connections: n, opsPerSecond: median(s), rounds: s))
                    }
                }
            }
        }
        return figures
    }

    /// Where the time of one measurement went: CPU per entry and thread switches per request, server and client.
    private static func cpuLine(server: CPUUse, client: CPUUse, entries: Int, requests: Int) -> String {
        let n = Double(entries), r = Double(requests)
        return "    CPU per entry: server \(Int(server.seconds * 1e9 / n)) ns, client \(Int(client.seconds * 1e9 / n)) ns; "
                 + "context switches per request: server \(String(format: "%.1f", Double(server.switches) / r)), "
            + "client \(String(format: "%.1f", Double(client.switches) / r))"
    }

    /// The CPU time the hypervisor gave to others during a run, when there was any:
    /// a run with much of it measured a slower machine, not a slower program.
    private static func stealNote(_ seconds: Double) -> String {
        seconds >= 0.01 ? "; stolen by the hypervisor: \(String(format: "%.2f", seconds)) CPU-s" : ""
    }

    // MARK: ShardFS through the Swift client

    private func shardFSPut(_ clients: [ShardFSClient], _ shard: UInt64, _ batches: [[PutItem]]) async throws -> Double {
        try await fanOut(clients, batches.count) { client, i in
            let statuses = try await client.batchPut(client: "bench", shard: shard, items: batches[i])
            guard statuses.count == batches[i].count, statuses.allSatisfy(\.isOK) else {
                throw BenchmarkError("BatchPut answered \(statuses.first { !$0.isOK } ?? Status(.ok, "a short status list"))")
            }
        }
    }

    private func shardFSGet(_ clients: [ShardFSClient], _ shard: UInt64, _ keys: [[[UInt8]]]) async throws -> Double {
        let size = valueSize
        let api = getAPI
        @Sendable func check(_ item: BatchGetItem) throws {
            guard item.status.isOK, item.entry?.value.count == size else {
                throw BenchmarkError("BatchGet item \(item.position): \(item.status)")
            }
        }
        return try await fanOut(clients, keys.count * getRepeat) { client, request in
            let i = request % keys.count
            var seen = 0
            switch api {
            case "items":
                for try await item in client.batchGet(shard: shard, keys: keys[i]) {
                    try check(item)
                    seen += 1
                }
            case "chunks":
                for try await chunk in client.batchGetChunks(shard: shard, keys: keys[i]) {
                    for item in chunk { try check(item) }
                    seen += chunk.count
                }
            default:
                let items = try await client.batchGetAll(shard: shard, keys: keys[i])
                for item in items { try check(item) }
                seen = items.count
            }
            guard seen == keys[i].count else { throw BenchmarkError("BatchGet sent \(seen) of \(keys[i].count) items") }
        }
    }

    /// Runs `body(client, batch)` for `count` batches split across the clients,
    /// each client with `depth` requests in flight; returns the seconds taken.
    private func fanOut(_ clients: [ShardFSClient], _ count: Int,
                        _ body: @escaping @Sendable (ShardFSClient, Int) async throws -> Void) async throws -> Double {
        let parts = split(count, clients.count)
        let depth = self.depth
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (c, client) in clients.enumerated() {
                for lane in 0..<depth {
                    group.addTask {
                        for i in stride(from: parts[c].lowerBound + lane, to: parts[c].upperBound, by: depth) {
                            try await body(client, i)
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        return seconds(since: start)
    }
}

/// The keys, values and batches every system gets, built before any clock starts.
struct Inputs: Sendable {
    let increasing: [[PutItem]]
    let random: [[PutItem]]
    let getKeys: [[[UInt8]]]

    init(entries: Int, batchSize: Int, valueSize: Int) {
        var generator = SplitMix64(seed: 42)
        let value = (0..<valueSize).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let keys = (1...entries).map { ShardFSClient.key(entryID: UInt32($0)) }
        func batches(_ keys: [[UInt8]]) -> [[PutItem]] {
            stride(from: 0, to: keys.count, by: batchSize).map { start in
                keys[start..<min(start + batchSize, keys.count)].map { PutItem(key: $0, value: value) }
            }
        }
        increasing = batches(keys)
        random = batches(keys.shuffled(using: &generator))
        let getOrder = keys.shuffled(using: &generator)
        getKeys = stride(from: 0, to: getOrder.count, by: batchSize).map { Array(getOrder[$0..<min($0 + batchSize, getOrder.count)]) }
    }
}

/// CPU time, context switches and bytes handed to write calls of a process so
/// far, all threads (Linux /proc).
struct CPUUse {
    var seconds = 0.0
    var switches = 0
    var writtenBytes = 0

    init(seconds: Double, switches: Int, writtenBytes: Int) {
        self.seconds = seconds
        self.switches = switches
        self.writtenBytes = writtenBytes
    }

    init(pid: Int32) {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")") {
            // Fields after the command name: state is field 3; utime and stime are fields 14 and 15.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            if fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) {
                seconds = (user + system) / ticks
            }
        }
        if let io = try? String(contentsOfFile: "/proc/\(pid)/io", encoding: .utf8),
           let line = io.split(separator: "\n").first(where: { $0.hasPrefix("wchar:") }) {
            writtenBytes = Int(line.dropFirst("wchar:".count).trimmingCharacters(in: .whitespaces)) ?? 0
        }
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        for task in tasks {
            guard let status = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8) else { continue }
            for line in status.split(separator: "\n") where line.contains("ctxt_switches:") {
                switches += Int(line.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "") ?? 0
            }
        }
    }

    static func - (a: CPUUse, b: CPUUse) -> CPUUse {
        CPUUse(seconds: a.seconds - b.seconds, switches: a.switches - b.switches, writtenBytes: a.writtenBytes - b.writtenBytes)
    }
}

/// CPU time stolen from this virtual machine by its hypervisor so far, all CPUs
/// (the "steal" column of /proc/stat); 0 where unknown.
func stolenSeconds() -> Double {
    guard let stat = try? String(contentsOfFile: "/proc/stat", encoding: .utf8),
          let line = stat.split(separator: "\n").first(where: { $0.hasPrefix("cpu ") }) else { return 0 }
    let fields = line.split(separator: " ")
    // cpu user nice system idle iowait irq softirq steal …
    guard fields.count > 8, let steal = Double(fields[8]) else { return 0 }
    return steal / Double(sysconf(Int32(_SC_CLK_TCK)))
}

/// `count` items split into `parts` contiguous ranges (the key space of each connection).
func split(_ count: Int, _ parts: Int) -> [Range<Int>] {
    (0..<parts).map { p in (count * p / parts)..<(count * (p + 1) / parts) }
}

private func seconds(since start: ContinuousClock.Instant) -> Double {
    (ContinuousClock.now - start).inSeconds
}

/// Holds a value used from threads that the benchmark coordinates itself.
struct SendableBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// Runs `body(t, state)` on `count` new threads (one per "connection"), after
/// `prepare(t)` made each thread's state outside the clock; returns the seconds
/// from the first start to the last end. No thread of Swift's cooperative pool blocks.
func onThreads<State>(_ count: Int, prepare: @escaping @Sendable (Int) throws -> State,
                      _ body: @escaping @Sendable (Int, State) throws -> Void) async throws -> Double {
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Double, Error>) in
        let coordinator = Thread {
            var states: [SendableBox<State>] = []
            do {
                for t in 0..<count { states.append(SendableBox(try prepare(t))) }
            } catch {
                continuation.resume(throwing: error)
                return
            }
            let lock = NSLock()
            nonisolated(unsafe) var failure: Error?
            let group = DispatchGroup()
            let start = ContinuousClock.now
            for t in 0..<count {
                group.enter()
                let state = states[t]
                let thread = Thread {
                    do { try body(t, state.value) } catch { lock.withLock { if failure == nil { failure = error } } }
                    group.leave()
                }
                thread.stackSize = 1 << 20
                thread.start()
            }
            group.wait()
            let elapsed = seconds(since: start)
            if let failure = lock.withLock({ failure }) { continuation.resume(throwing: failure) } else { continuation.resume(returning: elapsed) }
        }
        coordinator.start()
    }
}

func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) throws -> Void) async throws -> Double {
    try await onThreads(count, prepare: { _ in () }) { t, _ in try body(t) }
}
