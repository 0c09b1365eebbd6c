// What bench-batch needs to measure a primary with and without a backup: the
// pair of nodes on one etcd, and the probe of how far the backup's views lag.
import BatchProtocol
import Dispatch
import Foundation
import ShardFSClient
import ShardStore

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
