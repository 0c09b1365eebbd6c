import ArgumentParser
import Foundation

/// The benchmarks, apart from the `shardfs` executable users run: they start
/// baselines (Redis) and write large temporary stores, which a node's binary
/// has no business doing. Setting the baselines up (installing redis-server) is
/// the job of the benchmark scripts (scripts/bench-batch).
@main
struct ShardFSBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shardfs-bench",
        abstract: "ShardFS benchmarks: the shard engine and the batch socket service against their baselines.",
        subcommands: [BenchCommand.self, BatchBenchCommand.self])
}

/// Writes to standard output without buffering surprises.
func emit(_ text: String) {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}
