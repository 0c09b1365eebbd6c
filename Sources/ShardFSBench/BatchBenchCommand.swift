import ArgumentParser
import Benchmarks
import Foundation

struct BatchBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-batch",
        abstract: "Benchmark the batch socket service against Redis and raw LMDB (same entries, batches, connections).",
        discussion: """
            Starts a `shardfs serve` node and `redis-server` (no persistence, then appendonly yes + \
            appendfsync always) as child processes on loopback and stops them after; raw LMDB runs \
            in-process. redis-server must be installed: scripts/bench-batch installs it and runs this. \
            Prints ops/s, every ratio and whether each target is met. Build with -c release.
            """)

    @Option(name: .long, help: "Number of entries (100-byte values, keys are entry IDs 1…N).") var entries = 1_000_000
    @Option(name: .long, help: "Entries per batch (one BatchPut / BatchGet / MSET / MGET / LMDB transaction).") var batch = 1_000
    @Option(name: .long, help: "Rounds; figures are medians.") var rounds = 1
    @Option(name: .long, help: "Connection counts to measure, comma-separated.") var connections = "1,8"
    @Option(name: .long, help: "Commands in flight per connection (pipelining).") var depth = 4
    @Option(name: .long, help: "ShardFS transports, comma-separated: unix, tcp.") var transports = "unix,tcp"
    @Option(name: .long, help: "Systems to measure, comma-separated: lmdb, redis, redis-durable, shardfs, shardfs-backup, shardfs-backup-loop, shardfs-loop.")
    var systems = "lmdb,redis,redis-durable,shardfs"
    @Option(name: .long, help: "shardfs-backup: how often the primary publishes views, in ms.")
    var viewInterval = 500
    @Option(name: .customLong("get-api"), help: "How the ShardFS client reads BatchGet answers: all (one array per request), chunks, items.")
    var getAPI = "all"
    @Option(name: .customLong("get-repeat"), help: "Each BatchGet measurement reads every key this many times.")
    var getRepeat = 1
    @Option(name: .long, help: "Folder for the benchmark's files.") var dir = NSTemporaryDirectory()
    @Option(name: .long, help: "The shardfs executable to run `serve` with (default: the shardfs beside this executable).") var server: String?

    private var connectionCounts: [Int] { connections.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }
    private var systemList: [String] { systems.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
    private var transportList: [String] { transports.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }

    func validate() throws {
        guard entries > 0, batch > 0, rounds > 0, depth > 0, getRepeat > 0 else { throw ValidationError("entries, batch, rounds, depth and get-repeat must be positive") }
        let counts = connectionCounts
        guard !counts.isEmpty, counts.count == connections.split(separator: ",").count, counts.allSatisfy({ $0 > 0 && $0 <= 256 }) else {
            throw ValidationError("--connections takes positive counts, e.g. 1,8")
        }
        guard !transportList.isEmpty, transportList.allSatisfy({ $0 == "unix" || $0 == "tcp" }) else {
            throw ValidationError("--transports takes unix and/or tcp")
        }
        guard !systemList.isEmpty, systemList.allSatisfy(["lmdb", "redis", "redis-durable", "shardfs", "shardfs-backup", "shardfs-backup-loop", "shardfs-loop"].contains) else {
            throw ValidationError("--systems takes lmdb, redis, redis-durable, shardfs, shardfs-backup, shardfs-backup-loop and/or shardfs-loop")
        }
        guard ["all", "chunks", "items"].contains(getAPI) else { throw ValidationError("--get-api takes all, chunks or items") }
    }

    func run() async throws {
        var bench = BatchBenchmark()
        bench.entries = entries
        bench.batchSize = batch
        bench.rounds = rounds
        bench.connections = connectionCounts
        bench.depth = depth
        bench.transports = transportList
        bench.systems = systemList
        bench.viewIntervalMs = viewInterval
        bench.getAPI = getAPI
        bench.getRepeat = getRepeat
        bench.directory = dir
        bench.serverExecutable = server ?? Self.shardfsBesideThisExecutable()
        emit("Batch service: \(entries) entries, \(bench.valueSize)-byte values, \(batch) per batch, connections \(connections), "
             + "\(depth) in flight per connection, \(rounds) round(s); durable = fsync'ed before the answer")
        let figures = try await bench.run { FileHandle.standardError.write(Data(("  " + $0 + "\n").utf8)) }

        func figure(_ system: String, _ workload: BatchBenchmark.Workload, _ n: Int) -> Double? {
            figures.first { $0.system == system && $0.workload == workload && $0.connections == n }?.opsPerSecond
        }
        let shardFS = transportList.map(BatchBenchmark.shardFS)
        let others = [BatchBenchmark.rawLMDB, BatchBenchmark.redisVolatile, BatchBenchmark.redisDurable]
        emit("")
        emit("workload".padding(toLength: 26, withPad: " ", startingAt: 0) + "conn".leftPad(5) + "  "
             + "system".padding(toLength: 28, withPad: " ", startingAt: 0) + "ops/s".leftPad(11))
        for workload in BatchBenchmark.Workload.allCases {
            for n in connectionCounts {
                for system in others + shardFS + BatchBenchmark.backupSystems + [BatchBenchmark.onLoopVolume] {
                    guard let ops = figure(system, workload, n) else { continue }
                    emit(workload.rawValue.padding(toLength: 26, withPad: " ", startingAt: 0) + String(n).leftPad(5) + "  "
                         + system.padding(toLength: 28, withPad: " ", startingAt: 0) + String(Int(ops)).leftPad(11))
                }
            }
        }
        emit("")
        emit("ratios (ShardFS ÷ other, same workload and connections)")
        for workload in BatchBenchmark.Workload.allCases {
            for n in connectionCounts {
                for mine in shardFS {
                    guard let a = figure(mine, workload, n) else { continue }
                    let parts = others.compactMap { other in figure(other, workload, n).map { "÷ \(other) \(String(format: "%.2f", a / $0))" } }
                    emit("  \(workload.rawValue), \(n) conn, \(mine): " + parts.joined(separator: "; "))
                }
            }
        }
        emit("")
        emit("targets")
        var missed = 0
        for mine in shardFS {
            for n in connectionCounts {
                for workload in [BatchBenchmark.Workload.putIncreasing, .putRandom] {
                    for (other, goal) in [(BatchBenchmark.rawLMDB, 0.8), (BatchBenchmark.redisDurable, 1.0)] {
                        guard let a = figure(mine, workload, n), let b = figure(other, workload, n) else { continue }
                        missed += target("\(mine) durable \(workload.rawValue), \(n) conn ≥ \(String(format: "%.1f", goal))× \(other)", a / b, goal)
                    }
                }
                let goal = n == 1 ? 0.5 : 0.8
                if let a = figure(mine, .getRandom, n), let b = figure(BatchBenchmark.redisVolatile, .getRandom, n) {
                    missed += target("\(mine) BatchGet, \(n) conn ≥ \(String(format: "%.1f", goal))× Redis MGET (no persistence)", a / b, goal)
                }
            }
        }
        // A loop volume costs at most 10% beside a folder volume (docs/VOLUMES.md).
        for n in connectionCounts {
            for workload in BatchBenchmark.Workload.allCases {
                guard let loop = figure(BatchBenchmark.onLoopVolume, workload, n),
                      let folder = figure(BatchBenchmark.shardFS("unix"), workload, n) else { continue }
                missed += target("\(workload.rawValue), \(n) conn, on a loop volume ≥ 0.9× on a folder volume", loop / folder, 0.9)
            }
        }
        // Publishing views costs the primary at most 10% (docs/BACKUP-VIEWS.md). Each
        // round measures both sides, in alternating order; the target takes the median
        // of the rounds' ratios, which a machine getting slower or faster across the
        // run moves less than a ratio of medians.
        func perRound(_ system: String, _ workload: BatchBenchmark.Workload, _ n: Int) -> [Double] {
            figures.first { $0.system == system && $0.workload == workload && $0.connections == n }?.rounds ?? []
        }
        for loop in [false, true] {
            for n in connectionCounts {
                for workload in [BatchBenchmark.Workload.putIncreasing, .putRandom] {
                    let with = perRound(BatchBenchmark.backupSystem(loop: loop, withBackup: true), workload, n)
                    let without = perRound(BatchBenchmark.backupSystem(loop: loop, withBackup: false), workload, n)
                    guard !with.isEmpty, with.count == without.count else { continue }
                    let ratios = zip(with, without).map { $0 / $1 }.sorted()
                    let spread = ratios.count > 1 ? " (median of rounds \(ratios.map { String(format: "%.2f", $0) }.joined(separator: " ")))" : ""
                    missed += target("durable \(workload.rawValue), \(n) conn, \(loop ? "loop volume" : "folder"), with a backup ≥ 0.9× without",
                                     median(ratios), 0.9, note: spread)
                }
            }
        }
        emit(missed == 0 ? "all targets met" : "\(missed) target(s) missed")
    }

    private func target(_ name: String, _ ratio: Double, _ goal: Double, note: String = "") -> Int {
        emit("  " + name.padding(toLength: 96, withPad: " ", startingAt: 0) + String(format: "%.3f", ratio).leftPad(7)
             + (ratio >= goal ? "  met" : "  MISSED") + note)
        return ratio >= goal ? 0 : 1
    }

    /// SwiftPM builds both executables into one folder.
    private static func shardfsBesideThisExecutable() -> String {
        let own = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: own).deletingLastPathComponent().appendingPathComponent("shardfs").path
    }
}
