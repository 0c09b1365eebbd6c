import Foundation
import TestSupport
import Testing

/// Observing a running node: `/metrics` (Prometheus) and `/status` over HTTP,
/// `shardfs status`, `shardfs --version`.
@Suite(.onOwnThreads) struct OperationsTests {
    /// One sample's value from Prometheus text: the line `name{labels} value`
    /// (labels as printed, in order), or nil when absent.
    static func sample(_ text: String, _ series: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1))
        }
        return nil
    }

    static func curl(_ url: String, unixSocket: String? = nil) async throws -> String {
        let result = try await runAsync("/usr/bin/curl", ["-sS", "--max-time", "30"] + (unixSocket.map { ["--unix-socket", $0] } ?? []) + [url])
        #expect(result.status == 0, "curl \(url): \(result.stderr)")
        return result.stdout
    }

    @Test func metricsMoveWithTheWorkAndStatusDescribesTheNode() async throws {
        let dir = try TemporaryDirectory("metrics")
        let data = dir.sub("data")
        let server = try await ServeProcess.start(["--data-dir", data, "--node-id", "obs-1", "--listen", "127.0.0.1:0",
                                                   "--metrics", "127.0.0.1:0", "--log-level", "warning"])
        defer { server.stop() }
        let metricsField = server.readyLine.split(whereSeparator: \.isWhitespace).first { $0.hasPrefix("metrics=") }
        let address = try #require(metricsField.map { String($0.dropFirst("metrics=".count)) })
        #expect(address.hasPrefix("127.0.0.1:") && !address.hasSuffix(":0"), "\(server.readyLine)")
        let url = "http://\(address)/metrics"

        let before = try await Self.curl(url)
        #expect(before.contains("# TYPE shardfs_requests_total counter") == false)  // nothing served yet
        #expect(Self.sample(before, "shardfs_build_info{version=\"\(try version())\"}") == 1, "\(before)")
        #expect(Self.sample(before, "shardfs_lease_fresh") == 1)
        #expect(Self.sample(before, "shardfs_shards{state=\"open\"}") == 0)
        #expect(Self.sample(before, "shardfs_batch_log_pending_bytes") == 0)

        // Work through the socket service: a shard, puts, a get of a missing key.
        let socket = ["--socket", data + "/shardfs.sock"]
        func client(_ arguments: [String], input: String = "") async throws -> ProcessResult {
            try await runAsync(shardfs, ["client"] + arguments + socket, input: input)
        }
        let id = try await client(["new-shard", "--client", "alice"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(id == "1")
        for i in 0..<3 { #expect(try await client(["put", id, "k\(i)", "--value", String(repeating: "v", count: 5000), "--client", "alice"]).status == 0) }
        #expect(try await client(["get", id, "missing"]).status != 0)

        let after = try await Self.curl(url)
        #expect(after.contains("# TYPE shardfs_requests_total counter"), "\(after)")
        #expect(Self.sample(after, "shardfs_requests_total{opcode=\"put\",status=\"OK\"}") == 3, "\(after)")
        #expect(Self.sample(after, "shardfs_requests_total{opcode=\"newShard\",status=\"OK\"}") == 1, "\(after)")
        #expect((Self.sample(after, "shardfs_requests_total{opcode=\"get\",status=\"ENTRY_NOT_FOUND\"}") ?? 0) == 1, "\(after)")
        #expect(after.contains("# TYPE shardfs_request_duration_seconds histogram"))
        #expect(Self.sample(after, "shardfs_request_duration_seconds_count{opcode=\"put\"}") == 3, "\(after)")
        #expect((Self.sample(after, "shardfs_socket_received_bytes_total") ?? 0) > 15_000, "\(after)")  // three 5,000-byte values
        #expect((Self.sample(after, "shardfs_socket_sent_bytes_total") ?? 0) > 0)
        #expect(Self.sample(after, "shardfs_shards{state=\"open\"}") == 1, "\(after)")
        #expect((Self.sample(after, "shardfs_shard_used_bytes{shard=\"1\"}") ?? 0) > 0, "\(after)")
        #expect(Self.sample(after, "shardfs_shard_used_bytes{shard=\"other\"}") == 0)
        let fill = try #require(Self.sample(after, "shardfs_shard_fill_ratio{shard=\"1\"}"), "\(after)")
        #expect(fill > 0 && fill < 0.01, "\(after)")  // a few KiB of a 2 GiB limit
        #expect(Self.sample(after, "shardfs_shard_fill_ratio_max") == fill, "\(after)")
        #expect(after.contains("shardfs_volume_primary{volume=") && after.contains("shardfs_volume_free_bytes{volume="), "\(after)")
        // Commits: each durable put is an LMDB group commit (fsync included) or a log append.
        #expect(after.contains("# TYPE shardfs_commit_duration_seconds histogram"), "\(after)")
        #expect((Self.sample(after, "shardfs_commit_duration_seconds_count{kind=\"lmdb\"}") ?? 0) >= 3, "\(after)")
        #expect(Self.sample(after, "shardfs_batch_log_pending_batches") != nil, "\(after)")
        #expect(Self.sample(after, "shardfs_batch_log_apply_lag_seconds") != nil, "\(after)")
        #expect(!after.contains("shardfs_lease_seconds_left"), "the embedded store has no lease")

        // /status over the metrics address and `shardfs status` over the admin socket agree.
        let json = try await runAsync(shardfs, ["status", "--data-dir", data, "--json"])
        #expect(json.status == 0, "\(json.stderr)")
        let status = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        #expect(status["nodeID"] as? String == "obs-1")
        let tcp = server.readyLine.split(whereSeparator: \.isWhitespace).first { $0.hasPrefix("tcp=") }.map { String($0.dropFirst(4)) }
        #expect(status["address"] as? String == tcp, "\(json.stdout)")  // the bound port, not the configured 7070
        #expect(status["version"] as? String == (try version()))
        #expect(status["leaseFresh"] as? Bool == true)
        #expect((status["shardsByState"] as? [String: Int])?["open"] == 1)
        let volumes = try #require(status["volumes"] as? [[String: Any]])
        #expect(volumes.count == 1 && volumes.first?["role"] as? String == "primary" && volumes.first?["writing"] as? Bool == true)
        #expect((volumes.first?["freeBytes"] as? Int ?? 0) > 0)
        let overTCP = try await runAsync(shardfs, ["status", "--address", address])
        #expect(overTCP.status == 0, "\(overTCP.stderr)")
        #expect(overTCP.stdout.contains("obs-1") && overTCP.stdout.contains("primary") && overTCP.stdout.contains("open 1"), "\(overTCP.stdout)")
        let http = try await Self.curl("http://\(address)/status")
        #expect(http.contains("\"nodeID\" : \"obs-1\""), "\(http)")
        #expect(try await Self.curl("http://x/metrics", unixSocket: data + "/shardfs-admin.sock").contains("shardfs_requests_total"))

        #expect(server.stop() == 0)
        #expect(!FileManager.default.fileExists(atPath: data + "/shardfs-admin.sock"))
        // No node: status says so and fails.
        let none = try await runAsync(shardfs, ["status", "--data-dir", data])
        #expect(none.status != 0 && none.stderr.contains("no node answers on") && none.stderr.contains("shardfs-admin.sock"), "\(none.stderr)")
    }

    /// The mount's requests are counted by operation in /metrics (published from
    /// the counters every request already bumps, when the metrics are read).
    @Test func mountRequestsAreCountedByOperation() async throws {
        let dir = try TemporaryDirectory("fuse-metrics")
        let data = dir.sub("data"), mnt = dir.sub("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let server = try await ServeProcess.start(["--data-dir", data, "--listen", "127.0.0.1:0", "--mount", mnt,
                                                   "--metrics", "127.0.0.1:0", "--log-level", "warning"])
        defer {
            _ = server.stop()
            _ = try? run("/bin/fusermount3", ["-u", mnt])
        }
        let metricsField = server.readyLine.split(whereSeparator: \.isWhitespace).first { $0.hasPrefix("metrics=") }
        let url = "http://\(try #require(metricsField).dropFirst("metrics=".count))/metrics"
        let work = try await shell("cd '\(mnt)' && mkdir shard-1 && for i in 1 2 3 4 5; do echo $i > shard-1/f$i; done && cat shard-1/f3")
        #expect(work.status == 0 && work.stdout == "3\n", "\(work.stderr)")

        let text = try await Self.curl(url)
        #expect(text.contains("# TYPE shardfs_fuse_requests_total counter"), "\(text)")
        #expect(Self.sample(text, "shardfs_fuse_requests_total{operation=\"mkdir\"}") == 1, "\(text)")
        #expect(Self.sample(text, "shardfs_fuse_requests_total{operation=\"create\"}") == 5, "\(text)")
        #expect((Self.sample(text, "shardfs_fuse_requests_total{operation=\"flush\"}") ?? 0) >= 5, "\(text)")
        // How long each took, as a histogram: five creates, in the unbounded bucket too.
        #expect(text.contains("# TYPE shardfs_fuse_request_duration_seconds histogram"), "\(text)")
        #expect(Self.sample(text, "shardfs_fuse_request_duration_seconds_count{operation=\"create\"}") == 5, "\(text)")
        #expect(Self.sample(text, "shardfs_fuse_request_duration_seconds_bucket{operation=\"create\",le=\"+Inf\"}") == 5, "\(text)")
        #expect((Self.sample(text, "shardfs_fuse_request_duration_seconds_sum{operation=\"create\"}") ?? 0) > 0, "\(text)")
        // Read again with nothing done: nothing counted twice.
        let again = try await Self.curl(url)
        #expect(Self.sample(again, "shardfs_fuse_requests_total{operation=\"create\"}") == 5, "\(again)")
    }

    @Test func versionIsPrinted() async throws {
        let result = try await runAsync(shardfs, ["--version"])
        #expect(result.status == 0)
        #expect(result.stdout == (try version()) + "\n")
    }

    /// The version constant, read from its one source file (no module import: the
    /// tests check what the binary prints against the file a release edits).
    func version() throws -> String {
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Sources/ShardNode/Version.swift")
        let text = try String(contentsOf: source, encoding: .utf8)
        let line = try #require(text.split(separator: "\n").first { $0.contains("static let string") })
        return String(line.split(separator: "\"")[1])
    }
}
