import ArgumentParser
import Benchmarks
import Foundation

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmark the shard engine against raw LMDB (same keys, values, batches, durable commits).",
        discussion: "Prints ops/s for both and their ratio. Build with -c release for meaningful figures.")

    @Option(name: .long, help: "Number of entries.") var entries = 1_000_000
    @Option(name: .long, help: "Entries per batch (one transaction each).") var batch = 1_000
    @Option(name: .long, help: "Rounds; figures are medians.") var rounds = 1
    @Option(name: .long, help: "Folder for the benchmark's files.") var dir = NSTemporaryDirectory()

    func validate() throws {
        guard entries > 0, batch > 0, rounds > 0 else { throw ValidationError("entries, batch and rounds must be positive") }
    }

    func run() async throws {
        var bench = EngineBenchmark()
        bench.entries = entries
        bench.batchSize = batch
        bench.rounds = rounds
        bench.directory = dir
        emit("ShardFS engine vs raw LMDB: \(entries) entries, \(bench.keySize)-byte keys, \(bench.valueSize)-byte values, \(batch) per batch, durable commits, \(rounds) round(s)")
        let lines = try bench.run { FileHandle.standardError.write(Data(("  " + $0 + "\n").utf8)) }
        emit("workload".padding(toLength: 30, withPad: " ", startingAt: 0) + "engine ops/s".leftPad(14) + "raw LMDB ops/s".leftPad(16) + "ratio".leftPad(8) + "  target 0.80")
        for line in lines {
            emit(line.workload.padding(toLength: 30, withPad: " ", startingAt: 0)
                 + String(Int(line.engineOpsPerSecond)).leftPad(14) + String(Int(line.rawOpsPerSecond)).leftPad(16)
                 + String(format: "%.2f", line.ratio).leftPad(8) + (line.ratio >= 0.8 ? "  met" : "  MISSED"))
        }
    }
}

extension String {
    func leftPad(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}
