// About 700 lines on purpose: one benchmark whose three systems (the batch
// service, Redis, raw LMDB) must do exactly the same work, kept side by side
// so that a change to one is seen to apply to all.
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

// MARK: Child processes

/// A server the benchmark started. Stopped by PID (SIGTERM, then SIGKILL), also
/// when the benchmark itself is interrupted.
final class ChildProcess: @unchecked Sendable {
    let process: Process
    let name: String
    private static let lock = NSLock()
    nonisolated(unsafe) private static var running: [Int32: String] = [:]
    nonisolated(unsafe) private static var signalSources: [DispatchSourceSignal] = []

    init(name: String, executable: String, arguments: [String], stdout: Any?, stderrPath: String) throws {
        self.name = name
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        let log = FileHandle(forWritingAtPath: stderrPath)
        process.standardError = log
        process.standardOutput = stdout ?? log
        process.standardInput = FileHandle.nullDevice
        try ChildProcess.lock.withLock {
            try process.run()
            ChildProcess.running[process.processIdentifier] = name
        }
    }

    var pid: Int32 { process.processIdentifier }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL.
    func stop() {
        let pid = process.processIdentifier
        guard ChildProcess.lock.withLock({ ChildProcess.running.removeValue(forKey: pid) }) != nil else { return }
        if process.isRunning { kill(pid, SIGTERM) }
        let deadline = ContinuousClock.now + .seconds(10)
        while process.isRunning && ContinuousClock.now < deadline { usleep(5_000) }
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }

    /// On SIGINT, SIGTERM or SIGHUP: kill every child still running (by PID), then exit.
    static func installSignalCleanup() {
        lock.withLock {
            guard signalSources.isEmpty else { return }
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                signal(sig, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
                source.setEventHandler {
                    let pids = lock.withLock { Array(running.keys) }
                    for pid in pids { kill(pid, SIGKILL) }
                    FileHandle.standardError.write(Data("interrupted: stopped \(pids.count) server process(es)\n".utf8))
                    exit(128 + sig)
                }
                source.resume()
                signalSources.append(source)
            }
        }
    }
}

/// A loopback TCP port nobody listens on right now.
func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw BenchmarkError("socket: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &address) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard ok else { throw BenchmarkError("cannot find a free port: \(String(cString: strerror(errno)))") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// A `redis-server` child on loopback.
struct RedisServer {
    let child: ChildProcess
    let port: Int

    /// Finds `redis-server`. The benchmark never installs it: scripts/bench-batch does.
    static func locate() throws -> String {
        guard let path = which("redis-server") else {
            throw BenchmarkError("redis-server is not installed: scripts/bench-batch installs it (as root), "
                                 + "or leave Redis out with --systems lmdb,shardfs")
        }
        return path
    }

    static func start(executable: String, folder: String, durable: Bool) throws -> RedisServer {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let port = try freeLoopbackPort()
        var arguments = ["--port", "\(port)", "--bind", "127.0.0.1", "--dir", folder, "--daemonize", "no",
                         "--save", "", "--logfile", "", "--unixsocket", ""]
        arguments += durable ? ["--appendonly", "yes", "--appendfsync", "always"] : ["--appendonly", "no"]
        let child = try ChildProcess(name: "redis-server", executable: executable, arguments: arguments, stdout: nil,
                                     stderrPath: folder + "/redis.log")
        let deadline = ContinuousClock.now + .seconds(20)
        while true {
            if let connection = try? RESPConnection(port: port) {
                connection.send(Array("*1\r\n$4\r\nPING\r\n".utf8))
                if (try? connection.expectSimple("PONG")) != nil { break }
            }
            guard child.process.isRunning, ContinuousClock.now < deadline else {
                child.stop()
                let log = (try? String(contentsOfFile: folder + "/redis.log", encoding: .utf8)) ?? ""
                throw BenchmarkError("redis-server did not start on port \(port): \(log.suffix(600))")
            }
            usleep(10_000)
        }
        return RedisServer(child: child, port: port)
    }

    func stop() { child.stop() }
}

private func which(_ name: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    for folder in (path + ":/usr/sbin:/usr/bin:/sbin:/bin").split(separator: ":") {
        let candidate = "\(folder)/\(name)"
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    return nil
}

/// A `shardfs serve` child on a temporary data folder, with TCP on a free loopback port and a Unix socket.
struct ShardFSNode {
    let child: ChildProcess
    let tcpPort: Int
    let socketPath: String

    static func start(executable: String, folder: String, extraArguments: [String] = []) throws -> ShardFSNode {
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            throw BenchmarkError("cannot run the shardfs executable \(executable)")
        }
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let pipe = Pipe()
        let child = try ChildProcess(name: "shardfs serve", executable: executable,
                                     arguments: ["serve", "--data-dir", folder + "/data", "--listen", "127.0.0.1:0",
                                                 "--socket", folder + "/shardfs.sock", "--log-level", "warning"] + extraArguments,
                                     stdout: pipe, stderrPath: folder + "/serve.log")
        try? pipe.fileHandleForWriting.close()
        // A node that never says "ready" is stopped, which ends the read below.
        let watchdog = DispatchWorkItem { if child.process.isRunning { kill(child.pid, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 60, execute: watchdog)
        defer { watchdog.cancel() }
        var text = ""
        while !text.contains("\n") {
            let data = pipe.fileHandleForReading.availableData
            if data.isEmpty { break }
            text += String(decoding: data, as: UTF8.self)
        }
        let line = text.split(separator: "\n").first { $0.hasPrefix("ready ") }.map(String.init) ?? ""
        var tcp: Int?, unix: String?
        for field in line.split(separator: " ") {
            if field.hasPrefix("tcp="), let colon = field.lastIndex(of: ":") { tcp = Int(field[field.index(after: colon)...]) }
            if field.hasPrefix("unix=") { unix = String(field.dropFirst(5)) }
        }
        guard let tcp, let unix else {
            child.stop()
            let log = (try? String(contentsOfFile: folder + "/serve.log", encoding: .utf8)) ?? ""
            throw BenchmarkError("shardfs serve did not get ready (stdout: \(text.prefix(300))) \(log.suffix(800))")
        }
        return ShardFSNode(child: child, tcpPort: tcp, socketPath: unix)
    }

    func stop() { child.stop() }
}

// MARK: A minimal RESP client (blocking socket, one per thread)

final class RESPConnection {
    private let fd: Int32
    private var buffer: UnsafeMutablePointer<UInt8>
    private var capacity = 1 << 20
    private var head = 0, tail = 0
    private var out: [UInt8] = []

    init(port: Int) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw BenchmarkError("socket: \(String(cString: strerror(errno)))") }
        self.fd = fd
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let ok = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard ok else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw BenchmarkError("cannot connect to redis on port \(port): \(reason)")
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        buffer = .allocate(capacity: capacity)
        out.reserveCapacity(256 << 10)
    }

    deinit {
        close(fd)
        buffer.deallocate()
    }

    /// Sends commands `indexes` in order with up to `depth` awaiting their replies.
    func pipeline(_ indexes: Range<Int>, depth: Int, send: (Int) -> Void, receive: (Int) throws -> Void) throws {
        var answered = indexes.lowerBound
        for i in indexes {
            send(i)
            if i - answered + 1 >= depth {
                try receive(answered)
                answered += 1
            }
        }
        while answered < indexes.upperBound {
            try receive(answered)
            answered += 1
        }
    }

    func sendMSET(_ items: [PutItem]) {
        out.removeAll(keepingCapacity: true)
        appendHeader(UInt8(ascii: "*"), 1 + 2 * items.count)
        appendBulk(Array("MSET".utf8))
        for item in items {
            appendBulk(item.key)
            appendBulk(item.value)
        }
        send(out)
    }

    func sendMGET(_ keys: [[UInt8]]) {
        out.removeAll(keepingCapacity: true)
        appendHeader(UInt8(ascii: "*"), 1 + keys.count)
        appendBulk(Array("MGET".utf8))
        for key in keys { appendBulk(key) }
        send(out)
    }

    func send(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if n <= 0 {
                    if n < 0 && errno == EINTR { continue }
                    return  // the next read reports the closed connection
                }
                offset += n
            }
        }
    }

    func expectOK() throws { try expectSimple("OK") }

    func expectSimple(_ word: String) throws {
        let type = try byte()
        let line = try lineText()
        guard type == UInt8(ascii: "+"), line == word else { throw BenchmarkError("redis answered \(Character(Unicode.Scalar(type)))\(line)") }
    }

    /// An MGET answer: `count` values of `size` bytes each, copied out as a real reader would.
    func expectValues(_ count: Int, size: Int) throws {
        let type = try byte()
        guard type == UInt8(ascii: "*") else { throw BenchmarkError("redis answered \(Character(Unicode.Scalar(type)))\(try lineText())") }
        let n = try integer()
        guard n == count else { throw BenchmarkError("MGET answered \(n) of \(count) values") }
        for _ in 0..<n {
            guard try byte() == UInt8(ascii: "$") else { throw BenchmarkError("MGET answered a non-bulk item") }
            let length = try integer()
            guard length == size else { throw BenchmarkError("MGET answered a value of \(length) bytes") }
            try fill(length + 2)
            let value = Array(UnsafeBufferPointer(start: buffer + head, count: length))
            head += length + 2
            if value.isEmpty { throw BenchmarkError("empty value") }
        }
    }

    private func appendHeader(_ type: UInt8, _ n: Int) {
        out.append(type)
        appendDecimal(n)
        out.append(13); out.append(10)
    }

    private func appendBulk(_ bytes: [UInt8]) {
        appendHeader(UInt8(ascii: "$"), bytes.count)
        out.append(contentsOf: bytes)
        out.append(13); out.append(10)
    }

    private func appendDecimal(_ n: Int) {
        if n >= 10 { appendDecimal(n / 10) }
        out.append(UInt8(ascii: "0") + UInt8(n % 10))
    }

    /// Makes at least `count` unread bytes available.
    private func fill(_ count: Int) throws {
        while tail - head < count {
            if head > 0 {
                memmove(buffer, buffer + head, tail - head)
                tail -= head
                head = 0
            }
            if count > capacity {
                let bigger = UnsafeMutablePointer<UInt8>.allocate(capacity: count)
                bigger.update(from: buffer, count: tail)
                buffer.deallocate()
                buffer = bigger
                capacity = count
            }
            let n = recv(fd, buffer + tail, capacity - tail, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw BenchmarkError("redis closed the connection") }
            tail += n
        }
    }

    private func byte() throws -> UInt8 {
        try fill(1)
        defer { head += 1 }
        return buffer[head]
    }

    private func integer() throws -> Int {
        var n = 0, negative = false
        while true {
            let b = try byte()
            if b == 13 { _ = try byte(); return negative ? -n : n }
            if b == UInt8(ascii: "-") { negative = true } else { n = n * 10 + Int(b - 48) }
        }
    }

    private func lineText() throws -> String {
        var bytes: [UInt8] = []
        while true {
            let b = try byte()
            if b == 13 { _ = try byte(); return String(decoding: bytes, as: UTF8.self) }
            bytes.append(b)
        }
    }
}

/// A primary on etcd (a child etcd on free ports) and, optionally, a backup of its
/// volume serving views; folder volumes under one shared root.
struct BackupPair {
    let etcd: ChildProcess
    let primary: ShardFSNode
    let backup: ShardFSNode?
    /// The folder of the pair's folder volumes.
    let volumes: String

    static func start(executable: String, folder: String, withBackup: Bool, loopVolumes: Bool, viewIntervalMs: Int) throws -> BackupPair {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let client = try freeLoopbackPort(), peer = try freeLoopbackPort()
        let etcd = try ChildProcess(name: "etcd", executable: "/usr/bin/etcd", arguments: [
            "--data-dir", folder + "/etcd", "--listen-client-urls", "http://127.0.0.1:\(client)",
            "--advertise-client-urls", "http://127.0.0.1:\(client)", "--listen-peer-urls", "http://127.0.0.1:\(peer)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(peer)", "--initial-cluster", "default=http://127.0.0.1:\(peer)",
        ], stdout: nil, stderrPath: folder + "/etcd.log")
        func config(_ node: String, volumes: Int) throws -> String {
            let path = folder + "/\(node).yaml"
            try """
            node:
              node_id: \(node)
            cloud:
              volume_root: \(folder)/volumes\(loopVolumes && node != "a" ? "-" + node : "")
              initial_volumes: \(volumes)\(loopVolumes ? "\n  provider: loop\n  image_dir: \(folder)/images\n  volume_size: 8GiB" : "")
            metadata:
              type: etcd
              endpoints: http://127.0.0.1:\(client)
              retry:
                deadline_ms: 20000
            backup:
              view_interval_ms: \(viewIntervalMs)
            """.write(toFile: path, atomically: true, encoding: .utf8)
            return path
        }
        let configA = try config("a", volumes: 1), configB = try config("b", volumes: 0)
        let primary: ShardFSNode
        do { primary = try ShardFSNode.start(executable: executable, folder: folder + "/a", extraArguments: ["--config", configA]) } catch {
            etcd.stop()
            throw error
        }
        guard withBackup else { return BackupPair(etcd: etcd, primary: primary, backup: nil, volumes: folder + "/volumes") }
        do {
            let volumes = try FileManager.default.contentsOfDirectory(atPath: folder + "/volumes")
            guard let volume = volumes.first else { throw BenchmarkError("the primary made no volume") }
            let add = Process()
            add.executableURL = URL(fileURLWithPath: executable)
            add.arguments = ["volume", "add-backup", volume, "--backup", "b", "--config", configA]
            try add.run()
            add.waitUntilExit()
            guard add.terminationStatus == 0 else { throw BenchmarkError("shardfs volume add-backup failed") }
            let backup = try ShardFSNode.start(executable: executable, folder: folder + "/b", extraArguments: ["--config", configB])
            return BackupPair(etcd: etcd, primary: primary, backup: backup, volumes: folder + "/volumes")
        } catch {
            primary.stop()
            etcd.stop()
            throw error
        }
    }

    func stop() {
        backup?.stop()
        primary.stop()
        etcd.stop()
    }
}

/// Measures how far a backup's views lag the primary's acknowledged writes: puts
/// a counter to a probe shard on the primary every 100 ms or so and reads it back from
/// the backup (every 5 ms) until the backup shows it. The probe shard is made,
/// and followed by the backup, before `start` returns: until a backup follows a
/// shard, reads of it are redirected (each a metadata lookup), which is not what
/// the runs measure.
final class ViewLagProbe: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false
    /// (when the probe value was acknowledged, seconds until the backup showed it)
    private var samples: [(at: ContinuousClock.Instant, lag: Double)] = []
    private var task: Task<Void, Never>?

    static func start(primary: String, backup: String) async throws -> ViewLagProbe {
        let writer = try await ShardFSClient.connect(to: .unix(path: primary))
        let reader = try await ShardFSClient.connect(to: .unix(path: backup))
        let shard = try await writer.newShard(owner: "probe")
        let probe = ViewLagProbe()
        let key = Array("probe".utf8)
        var counter: UInt64 = 0
        func putAndWait(within limit: Duration) async -> Double? {
            counter += 1
            let value = withUnsafeBytes(of: counter.bigEndian) { Array($0) }
            guard (try? await writer.put(client: "probe", shard: shard, key: key, value: value)) != nil else { return nil }
            let acknowledged = ContinuousClock.now
            while !probe.isStopped, ContinuousClock.now - acknowledged < limit {
                if let entry = try? await reader.get(shard: shard, key: key), entry.value == value {
                    return (ContinuousClock.now - acknowledged).inSeconds
                }
                try? await Task.sleep(for: .milliseconds(5))
            }
            return nil
        }
        guard await putAndWait(within: .seconds(60)) != nil else {
            await writer.close()
            await reader.close()
            throw BenchmarkError("the backup did not follow the probe shard within a minute")
        }
        probe.task = Task {
            while !probe.isStopped {
                let at = ContinuousClock.now
                if let lag = await putAndWait(within: .seconds(3600)) { probe.record(at: at, lag: lag) }
                // A random pause: a fixed one locks the probe in step with the checkpoints.
                try? await Task.sleep(for: .milliseconds(Int.random(in: 20...180)))
            }
            await writer.close()
            await reader.close()
        }
        return probe
    }

    private var isStopped: Bool { lock.withLock { stopped } }
    private func record(at: ContinuousClock.Instant, lag: Double) { lock.withLock { samples.append((at, lag)) } }

    /// The lags of the probe values acknowledged since `start`, once each came back.
    func lags(since start: ContinuousClock.Instant) -> [Double] {
        lock.withLock { samples.filter { $0.at >= start }.map(\.lag) }
    }

    func stop() async {
        cancel()
        await task?.value
    }

    /// Tells the probing task to end, without waiting for it.
    func cancel() { lock.withLock { stopped = true } }

    static func summary(_ lags: [Double]) -> String {
        guard !lags.isEmpty else { return "no probe came through" }
        let sorted = lags.sorted()
        func at(_ p: Double) -> String { String(format: "%.3f s", sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) }
        return "p50 \(at(0.5)), p99 \(at(0.99)), max \(String(format: "%.3f s", sorted.last!)) (\(lags.count) probes)"
    }
}

/// Waits until no folder volume under `volumes` holds shard `shard`'s files (its
/// directory or its `.deleting` rename), at most a minute.
func waitUntilRemoved(shard: UInt64, under volumes: String) async throws {
    let names = [ShardDirectoryName.of(shard), ShardDirectoryName.of(shard) + ".deleting"]
    for _ in 0..<1_200 {
        let volumeIDs = (try? FileManager.default.contentsOfDirectory(atPath: volumes)) ?? []
        let left = volumeIDs.contains { volume in names.contains { FileManager.default.fileExists(atPath: "\(volumes)/\(volume)/\($0)") } }
        if !left { return }
        try await Task.sleep(for: .milliseconds(50))
    }
    throw BenchmarkError("the files of deleted shard \(shard) were still there after a minute")
}
