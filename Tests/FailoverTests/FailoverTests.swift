import BatchProtocol
import Foundation
import ShardFSClient
import Synchronization
import TestSupport
import Testing

/// The failover harness (docs/BACKUP-VIEWS.md): two "hosts", each a `shardfs
/// serve` in a mount namespace of its own (its mounts vanish when it dies, even by
/// `kill -9`), one etcd, one loop volume (a loop device per host over one image).
/// Host A is the primary, host B its backup. Every value carries its key, a
/// version and a checksum, so a reader can tell a wrong value from a stale one.
/// Root only; every process, loop device and folder is removed in `defer`.
@Suite(.serialized, .enabled(if: getuid() == 0, "loop devices and mount namespaces need root"))
struct FailoverTests {
    static var shardfs: String { productsDirectory().appendingPathComponent("shardfs").path }

    /// A host: `shardfs serve` alone in a new mount namespace.
    final class Host: @unchecked Sendable {
        let name: String
        let port: Int
        let process = Process()
        /// Where its log goes: `<config>.log`.
        let log: FileHandle
        init(name: String, config: String, port: Int, serveArguments: String = "", environment: [String: String] = [:]) throws {
            self.name = name
            self.port = port
            if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
            process.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
            process.arguments = ["-m", "--propagation", "private", "/bin/bash", "-c",
                                 FailoverTests.dropOtherMounts + "exec '\(FailoverTests.shardfs)' serve --config '\(config)' \(serveArguments)"]
            FileManager.default.createFile(atPath: config + ".log", contents: nil)
            log = FileHandle(forWritingAtPath: config + ".log") ?? FileHandle.nullDevice
        }
        var endpoint: Endpoint { get throws { try Endpoint.tcp("127.0.0.1:\(port)") } }

        func start() async throws {
            let line = try await withCheckedThrowingContinuation { (c: CheckedContinuation<String?, Error>) in
                Thread { c.resume(with: Result { try runReadingFirstLine(self.process, standardError: self.log) }) }.start()
            }
            guard line?.hasPrefix("ready") == true else { throw Failure("host \(name) did not start: \(line ?? "(nothing)")") }
        }
        func signal(_ sig: Int32) { if process.isRunning { kill(process.processIdentifier, sig) } }
        func end() {
            signal(SIGCONT)
            signal(SIGKILL)
            if process.processIdentifier > 0 { process.waitUntilExit() }
        }
    }

    /// A flag several tasks read (an `Atomic` local cannot be shared by two tasks).
    final class Flag: Sendable {
        private let value = Atomic<Bool>(true)
        var isSet: Bool { value.load(ordering: .acquiring) }
        func clear() { value.store(false, ordering: .releasing) }
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    /// A new namespace starts with copies of every mount, other tests' too; a copy
    /// would keep their devices busy. Drop those under /tmp (in this namespace only).
    static let dropOtherMounts = """
        for m in $(awk '$5 ~ "^/tmp/" { print $5 }' /proc/self/mountinfo | sort -r); do umount -l -c "$m" 2>/dev/null; done

        """

    let dir: TemporaryDirectory
    init() throws { dir = try TemporaryDirectory("failover") }

    func config(_ node: String, initialVolumes: Int, port: Int, etcd: String, failoverDelayMs: Int = 500) throws -> String {
        // A minute for a client's handshake: the test process, which runs the clients,
        // shares two vCPUs with the whole suite and once sent one after 10 s.
        try NodeConfigFile(nodeID: node, dataDir: dir.sub(node), listen: "127.0.0.1:\(port)", handshakeTimeoutMs: 60_000,
                           cloud: .init(provider: "loop", imageDir: dir.sub("images"), volumeSize: "128MiB", initialVolumes: initialVolumes),
                           etcd: .init(endpoints: [etcd], namespace: "/failover", leaseTTLSeconds: 2),
                           shardSizeLimit: "32MiB",
                           backup: .init(viewIntervalMs: 200, failoverDelayMs: failoverDelayMs))
            .write(to: dir.sub("\(node).yaml"))
    }

    func cleanUp(_ hosts: [Host]) {
        for host in hosts { host.end() }
        for device in loopDevices(under: dir.path) { _ = try? run("/usr/sbin/losetup", ["-d", device]) }
        dir.remove()
    }


    /// Writes files f0…f(n-1) into a shard directory of the mount, version after
    /// version, each value in `CheckedValue`'s format.
    static let fileWriterScript = """
        import os, struct, sys
        folder, count = sys.argv[1], int(sys.argv[2])
        def checksum(b):
            h = 2166136261
            for x in b: h = ((h ^ x) * 16777619) & 0xFFFFFFFF
            return h
        version = 0
        while True:
            version += 1
            for i in range(count):
                key = "f%d" % i
                body = bytearray(("%s#%d#" % (key, version)).encode())
                size = 200 + (i * 53) % 4000
                while len(body) < size - 4: body.append((len(body) * 31 + version) & 0xFF)
                try:
                    with open(os.path.join(folder, key), "wb") as f:
                        f.write(bytes(body) + struct.pack("<I", checksum(body)))
                except OSError:
                    pass
        """

    static func size(_ i: Int) -> Int { i % 40 == 0 ? 200_000 : 200 + (i * 53) % 4000 }

    /// A client that rewrites `keys` of a shard through its primary, version after
    /// version (values that check themselves: `CheckedValue`), until `stop`.
    final class Rewriter: Sendable {
        private let writing = Flag()
        private let cluster: ShardFSCluster
        private let task: Task<Int, Never>

        init(keys: [String], shard: UInt64, primary: Endpoint) throws {
            var options = RoutingOptions()
            options.deadline = .seconds(60)
            let cluster = try ShardFSCluster(nodes: [primary], options: options)
            let writing = writing
            self.cluster = cluster
            task = Task.detached {
                var version = 0, writes = 0
                while writing.isSet {
                    version += 1
                    for (i, key) in keys.enumerated() where writing.isSet {
                        if (try? await cluster.put(client: "writer", shard: shard, key: Array(key.utf8),
                                                   value: CheckedValue.make(key: key, version: version, size: FailoverTests.size(i)))) != nil { writes += 1 }
                    }
                }
                return writes
            }
        }

        /// Stops; the writes acknowledged.
        func stop() async -> Int {
            writing.clear()
            let writes = await task.value
            await cluster.close()
            return writes
        }
    }

    /// Reads keys of a shard from a backup over the socket and checks every value.
    final class CheckedReader {
        let shard: UInt64
        private let client: ShardFSClient
        private(set) var reads = 0, wrong = 0, damaged = 0

        init(shard: UInt64, backup: Endpoint) async throws {
            self.shard = shard
            client = try await ShardFSClient.connect(to: backup)
        }

        /// Reads 10 of `keys` at a time for `seconds`.
        func read(for seconds: Double, _ keys: ArraySlice<String>) async throws {
            let until = Date().addingTimeInterval(seconds)
            while Date() < until {
                for key in keys.shuffled().prefix(10) {
                    do {
                        let entry = try await client.get(shard: shard, key: Array(key.utf8))
                        reads += 1
                        if CheckedValue.version(entry.value, key: key) == nil { wrong += 1 }
                    } catch {
                        // Not served for a moment is fine; a view that finds its pages damaged is not.
                        if "\(error)".contains("corrupt") || "\(error)".contains("view:") { damaged += 1 }
                    }
                }
                try await Task.sleep(for: .milliseconds(2))
            }
        }

        func close() async { await client.close() }
    }

    func volumeID() throws -> String {
        let records = try FileManager.default.contentsOfDirectory(atPath: dir.sub("images")).filter { $0.hasSuffix(".json") }
        guard records.count == 1 else { throw Failure("expected one volume, found \(records)") }
        return String(records[0].dropLast(5))
    }

    /// Starts A (primary, with a shard) and B (its backup, serving views of it).
    func startPair(etcd: LocalEtcd, failoverDelayMs: Int = 500, primaryArguments: String = "",
                   backupEnvironment: [String: String] = [:]) async throws -> (a: Host, b: Host, shard: UInt64, volume: String) {
        let portA = try freeLoopbackPort(), portB = try freeLoopbackPort()
        let configA = try config("a", initialVolumes: 1, port: portA, etcd: etcd.endpoint)
        let configB = try config("b", initialVolumes: 0, port: portB, etcd: etcd.endpoint, failoverDelayMs: failoverDelayMs)
        let a = try Host(name: "a", config: configA, port: portA, serveArguments: primaryArguments)
        try await a.start()
        let volume = try volumeID()
        let client = try await ShardFSClient.connect(to: try a.endpoint)
        let shard = try await client.newShard(owner: "writer")
        await client.close()
        let added = try await runAsync(Self.shardfs, ["volume", "add-backup", volume, "--backup", "b", "--config", configA])
        guard added.status == 0 else { throw Failure("add-backup: \(added.stderr)") }
        let b = try Host(name: "b", config: configB, port: portB, environment: backupEnvironment)
        try await b.start()
        return (a, b, shard, volume)
    }

    // MARK: Scenarios

    /// The primary under write load while the backup reads continuously and checks
    /// every value; then `kill -9` of the primary's whole host: the backup promotes,
    /// the writer (a routing client given both nodes) goes on, and every write
    /// acknowledged before or after the crash is on the new primary.
    @Test func theBackupReadsOnlyCommittedValuesAndTakesOverWhenThePrimaryHostDies() async throws {
        var hosts: [Host] = []
        defer { cleanUp(hosts) }
        try await withHeavyTest { try await withLocalEtcd { etcd in
            // A also mounts its shards (in its own namespace) for a FUSE writer.
            let mountpoint = dir.sub("a-mnt")
            try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
            let (a, b, shard, volume) = try await startPair(etcd: etcd, primaryArguments: "--mount '\(mountpoint)' -o client_id=writer")
            hosts = [a, b]
            let keys = (0..<100).map { "k\($0)" }
            let fileKeys = (0..<20).map { "f\($0)" }
            let acked = Mutex([String: Int]())
            // When each acknowledged version of each key was acknowledged, in order.
            let ackedAt = Mutex([String: [(version: Int, at: Date)]]())
            let ackTimes = Locked([(sent: Date, acked: Date)]())
            let writing = Flag()
            var options = RoutingOptions()
            options.deadline = .seconds(60)
            let cluster = try ShardFSCluster(nodes: [try a.endpoint, try b.endpoint], options: options)
            let writer = Task.detached { () -> (writes: Int, failures: Int) in
                var version = 0, writes = 0, failures = 0
                while writing.isSet {
                    version += 1
                    for (i, key) in keys.enumerated() where writing.isSet {
                        do {
                            let sent = Date()
                            try await cluster.put(client: "writer", shard: shard, key: Array(key.utf8),
                                                  value: CheckedValue.make(key: key, version: version, size: Self.size(i)))
                            let now = Date()
                            acked.withLock { $0[key] = version }
                            ackedAt.withLock { $0[key, default: []].append((version, now)) }
                            ackTimes.withLock { $0.append((sent: sent, acked: Date())) }
                            writes += 1
                        } catch {
                            failures += 1
                        }
                    }
                }
                return (writes, failures)
            }

            // BatchPuts of their own keys, and files written through A's mount
            // (a writer process in A's namespace), into a second shard.
            let batchKeys = (0..<50).map { "b\($0)" }
            let creator = try await ShardFSClient.connect(to: try a.endpoint)
            let fileShard = try await creator.newShard(owner: "writer")
            let batcher = Task.detached { () -> Int in
                var version = 0, batches = 0
                while writing.isSet {
                    version += 1
                    let items = batchKeys.enumerated().map { i, key in
                        PutItem(key: Array(key.utf8), value: CheckedValue.make(key: key, version: version, size: Self.size(i)))
                    }
                    if (try? await cluster.batchPut(client: "writer", shard: shard, items: items)) != nil { batches += 1 }
                }
                return batches
            }
            let fileWriter = Process()
            fileWriter.executableURL = URL(fileURLWithPath: "/usr/bin/nsenter")
            fileWriter.arguments = ["-t", String(a.process.processIdentifier), "-m", "python3", "-c", Self.fileWriterScript,
                                    mountpoint + "/shard-\(fileShard)", String(fileKeys.count)]
            fileWriter.standardOutput = FileHandle.nullDevice
            fileWriter.standardError = FileHandle.nullDevice
            try fileWriter.run()
            defer { if fileWriter.isRunning { kill(fileWriter.processIdentifier, SIGKILL); fileWriter.waitUntilExit() } }
            // Shards made, filled, closed and deleted on the primary meanwhile.
            let churner = Task.detached { () -> Int in
                var cycles = 0
                while writing.isSet {
                    guard let id = try? await creator.newShard(owner: "writer") else { continue }
                    _ = try? await creator.batchPut(client: "writer", shard: id, items: (0..<100).map {
                        PutItem(key: Array("c\($0)".utf8), value: CheckedValue.make(key: "c\($0)", version: 1, size: 1000))
                    })
                    try? await creator.closeShard(client: "writer", shard: id)
                    try? await creator.deleteShard(client: "writer", shard: id)
                    cycles += 1
                }
                return cycles
            }

            // The backup reads what the primary writes, from its views.
            let reader = try await ShardFSClient.connect(to: try b.endpoint)
            var reads = 0, wrong = 0, missing = 0, lags: [Double] = [], staleness: [Double] = []
            var fileReads = 0, batchReads = 0
            // At least 6 s (SHARDFS_FAILOVER_SECONDS for a longer run), and until enough
            // reads of each kind (a loaded machine is slow).
            let seconds = Double(ProcessInfo.processInfo.environment["SHARDFS_FAILOVER_SECONDS"] ?? "") ?? 6
            let started = Date()
            var dropped = false
            while Date().timeIntervalSince(started) < seconds
                    || (reads < 60 || batchReads < 12 || fileReads < 12) && Date().timeIntervalSince(started) < seconds + 54 {
                // Once, mid-run: the backup host's page cache goes.
                if !dropped && Date().timeIntervalSince(started) > seconds / 2 {
                    try "3".write(toFile: "/proc/sys/vm/drop_caches", atomically: false, encoding: .utf8)
                    dropped = true
                }
                for key in batchKeys.shuffled().prefix(3) {
                    if let entry = try? await reader.get(shard: shard, key: Array(key.utf8)) {
                        batchReads += 1
                        if CheckedValue.version(entry.value, key: key) == nil { wrong += 1 }
                    }
                }
                for key in fileKeys.shuffled().prefix(3) {
                    if let entry = try? await reader.get(shard: fileShard, key: Array(key.utf8)) {
                        fileReads += 1
                        if CheckedValue.version(entry.value, key: key) == nil { wrong += 1 }
                    }
                }
                for key in keys.shuffled().prefix(10) {
                    let before = acked.withLock { $0[key] } ?? 0
                    do {
                        let asked = Date()
                        let entry = try await reader.get(shard: shard, key: Array(key.utf8))
                        reads += 1
                        guard let version = CheckedValue.version(entry.value, key: key) else { wrong += 1; continue }
                        if version > (acked.withLock { $0[key] } ?? 0) + 1 { wrong += 1 }  // a version never written
                        lags.append(Double(max(0, before - version)))
                        // Staleness: how long before the read a newer version had been acknowledged.
                        if version < before, let newer = ackedAt.withLock({ $0[key]?.first { $0.version > version }?.at }) {
                            staleness.append(max(0, asked.timeIntervalSince(newer)))
                        } else {
                            staleness.append(0)
                        }
                    } catch {
                        missing += 1  // not in the views yet
                    }
                }
                try await Task.sleep(for: .milliseconds(5))
            }
            // A listing from the backup's view: pages of the keys the primary wrote, in order.
            let page = try await reader.list(shard: shard, limit: 40)
            let listed = page.rows.map { String(decoding: $0.key, as: UTF8.self) }
            #expect(page.more && listed.count == 40 && listed == listed.sorted(by: { $0.utf8.lexicographicallyPrecedes($1.utf8) }), "\(listed)")
            #expect(Set(listed).isSubset(of: Set(keys + batchKeys)))
            await reader.close()
            print("failover harness: backup reads \(reads) of puts, \(batchReads) of batch puts, \(fileReads) of files written through the mount; wrong \(wrong), not yet visible \(missing); versions behind p50 \(percentile(lags, 0.5)) p99 \(percentile(lags, 0.99)) max \(lags.max() ?? 0); staleness p50 \(String(format: "%.3f", percentile(staleness, 0.5))) s, p99 \(String(format: "%.3f", percentile(staleness, 0.99))) s, max \(String(format: "%.3f", staleness.max() ?? 0)) s")
            #expect(wrong == 0)
            #expect(reads > 50)
            #expect(batchReads > 10)
            #expect(fileReads > 10)

            // Crash the primary's host: its processes, and with them its namespace.
            let crashed = Date()
            kill(fileWriter.processIdentifier, SIGKILL)
            a.signal(SIGKILL)
            a.process.waitUntilExit()
            fileWriter.waitUntilExit()
            // Writes resume through B once it has taken over: the first write sent
            // after the kill that is acknowledged.
            func resumed() -> Double? {
                ackTimes.withLock { $0.filter { $0.sent > crashed }.map { $0.acked.timeIntervalSince(crashed) }.min() }
            }
            let deadline = Date().addingTimeInterval(45)
            while Date() < deadline, resumed() == nil { try await Task.sleep(for: .milliseconds(50)) }
            let resumedAfter = resumed()
            try await Task.sleep(for: .seconds(1))
            writing.clear()
            let (writes, failures) = await writer.value
            let batches = await batcher.value, churned = await churner.value
            await creator.close()
            print("failover harness: \(batches) batch puts, \(churned) shards made, filled, closed and deleted")
            print("failover harness: \(writes) writes acknowledged, \(failures) failed; writes resumed \(resumedAfter.map { String(format: "%.2f", $0) } ?? "never") s after the kill")
            #expect(resumedAfter != nil, "no write succeeded after the primary died")
            if resumedAfter == nil { print("host b's log:\n" + ((try? String(contentsOfFile: dir.sub("b.yaml.log"), encoding: .utf8)) ?? "")) }

            // Every acknowledged write is on the new primary.
            let final = acked.withLock { $0 }
            var lost = 0
            for (key, version) in final {
                let entry = try await cluster.get(shard: shard, key: Array(key.utf8))
                if CheckedValue.version(entry.value, key: key) != version { lost += 1 }
            }
            await cluster.close()
            print("failover harness: \(final.count) keys checked on the new primary, \(lost) lost")
            #expect(lost == 0)

            // The new primary's metrics say so (read over its admin socket).
            let metrics = try await shell("curl -sS --max-time 30 --unix-socket '\(dir.sub("b"))/shardfs-admin.sock' http://node/metrics")
            #expect(metrics.status == 0, "\(metrics.stderr)")
            #expect(metrics.stdout.contains("\nshardfs_promotions_total 1\n"), "\(metrics.stdout)")
            #expect(metrics.stdout.contains("\nshardfs_volume_primary{volume=\"\(volume)\"} 1"), "\(metrics.stdout)")
        } }
    }

    /// The primary is paused (SIGSTOP) past its lease while a client writes to it;
    /// the backup promotes itself; the old primary is resumed and keeps being
    /// asked to write: none of its writes lands after the promotion (counted on the
    /// new primary), and it acknowledges none. Made a backup and promoted back by
    /// hand, it writes again without a restart; the node it took the volume back
    /// from, made a backup again, serves views of it.
    @Test func aPausedPrimaryWritesNothingAfterTheBackupTookOver() async throws {
        var hosts: [Host] = []
        defer { cleanUp(hosts) }
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let (a, b, shard, volume) = try await startPair(etcd: etcd)
            hosts = [a, b]
            let keys = (0..<20).map { "p\($0)" }
            // (key → last version acknowledged), and acknowledgements after the pause.
            let acked = Mutex([String: Int]())
            let paused = Atomic<Bool>(false)
            let acksWhilePausedOrAfter = Atomic<Int>(0)
            let writing = Atomic<Bool>(true)
            let direct = try await ShardFSClient.connect(to: try a.endpoint)
            let writer = Task.detached { () -> Int in
                var version = 0, refused = 0
                while writing.load(ordering: .acquiring) {
                    version += 1
                    for (i, key) in keys.enumerated() where writing.load(ordering: .acquiring) {
                        let wasPaused = paused.load(ordering: .acquiring)
                        do {
                            try await direct.put(client: "writer", shard: shard, key: Array(key.utf8),
                                                 value: CheckedValue.make(key: key, version: version, size: Self.size(i)))
                            if wasPaused { acksWhilePausedOrAfter.add(1, ordering: .relaxed) } else { acked.withLock { $0[key] = version } }
                        } catch {
                            refused += 1
                            try? await Task.sleep(for: .milliseconds(20))
                        }
                    }
                }
                return refused
            }
            try await Task.sleep(for: .seconds(2))
            paused.store(true, ordering: .releasing)
            a.signal(SIGSTOP)
            let before = acked.withLock { $0 }

            // The backup takes over: a write through it succeeds.
            let probe = try await ShardFSClient.connect(to: try b.endpoint)
            var promotedAfter: Double?
            let stopped = Date()
            while Date().timeIntervalSince(stopped) < 30 {
                do {
                    try await probe.put(client: "writer", shard: shard, key: Array("probe".utf8), value: [1])
                    promotedAfter = Date().timeIntervalSince(stopped)
                    break
                } catch {
                    try await Task.sleep(for: .milliseconds(100))
                }
            }
            #expect(promotedAfter != nil, "the backup never took over")

            // The old primary wakes up and is asked to write for two more seconds.
            a.signal(SIGCONT)
            try await Task.sleep(for: .seconds(2))
            writing.store(false, ordering: .releasing)
            let refused = await writer.value
            await direct.close()

            // On the new primary: nothing newer than what A acknowledged before the
            // pause, but for the one write in flight when it was paused.
            var landedAfter = 0, lost = 0
            for key in keys {
                let entry = try await probe.get(shard: shard, key: Array(key.utf8))
                let version = CheckedValue.version(entry.value, key: key) ?? -1
                let acknowledged = before[key] ?? 0
                if version < acknowledged { lost += 1 }
                if version > acknowledged + 1 { landedAfter += 1 }
            }
            await probe.close()
            let acksAfter = acksWhilePausedOrAfter.load(ordering: .relaxed)
            print("paused primary: promoted \(promotedAfter.map { String(format: "%.2f", $0) } ?? "never") s after SIGSTOP; old primary acknowledged \(acksAfter) writes after the pause, refused \(refused); on the new primary \(landedAfter) keys newer than acknowledged, \(lost) lost")
            #expect(acksAfter == 0)
            #expect(landedAfter == 0)
            #expect(lost == 0)
            #expect(refused > 0)

            // Promoted back by hand, without a restart, the old primary (fenced, its
            // mount on a revoked device) writes the volume again, through a fresh attachment.
            let added = try await runAsync(Self.shardfs, ["volume", "add-backup", volume, "--backup", "a", "--config", dir.sub("a.yaml")])
            #expect(added.status == 0, "\(added.stderr)")
            let back = try await runAsync(Self.shardfs, ["volume", "promote", volume, "--to", "a", "--config", dir.sub("a.yaml")])
            #expect(back.status == 0, "\(back.stderr)")
            let again = try await ShardFSClient.connect(to: try a.endpoint)
            var wroteBackAfter: Double?
            let promotedBack = Date()
            while Date().timeIntervalSince(promotedBack) < 30 {
                if (try? await again.put(client: "writer", shard: shard, key: Array("back".utf8), value: [2])) != nil {
                    wroteBackAfter = Date().timeIntervalSince(promotedBack)
                    break
                }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(wroteBackAfter != nil, "the old primary, promoted back, never wrote")
            // 0.1 s when nothing waits on the device the old primary was fenced off
            // (a wait on it once made this 10 s).
            #expect((wroteBackAfter ?? 0) < 5, "the old primary, promoted back, wrote after \(wroteBackAfter ?? 0) s")
            if wroteBackAfter != nil {
                for key in keys {
                    let entry = try await again.get(shard: shard, key: Array(key.utf8))
                    #expect(CheckedValue.version(entry.value, key: key) != nil, "\(key) on the old primary promoted back")
                }
                #expect(try await again.get(shard: shard, key: Array("probe".utf8)).value == [1])
            }
            await again.close()
            print("paused primary promoted back by hand: wrote \(wroteBackAfter.map { String(format: "%.2f", $0) } ?? "never") s after the promote")

            // B, deposed in turn (fenced by A's take-over), made a backup again without
            // a restart: it drops its mount of the revoked device and serves views.
            let readded = try await runAsync(Self.shardfs, ["volume", "add-backup", volume, "--backup", "b", "--config", dir.sub("a.yaml")])
            #expect(readded.status == 0, "\(readded.stderr)")
            let viewer = try await ShardFSClient.connect(to: try b.endpoint)
            let served = try await waitUntil(30) {
                (try? await viewer.get(shard: shard, key: Array("back".utf8)))?.value == [2]
            }
            await viewer.close()
            #expect(served, "node b, deposed and made a backup again, serves no view of the shard")
        } }
    }

    /// The primary crashes and comes back before its backup would take over: its
    /// pins died with it, so before it opens a shard (which may write) the backup
    /// must leave every snapshot the old run published. The backup reads throughout
    /// and never returns a wrong value.
    @Test func aRestartedPrimaryRetiresTheSnapshotsItsPreviousRunPinned() async throws {
        var hosts: [Host] = []
        defer { cleanUp(hosts) }
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let (a, b, shard, _) = try await startPair(etcd: etcd, failoverDelayMs: 60_000)
            hosts = [a, b]
            let keys = (0..<50).map { "r\($0)" }
            let writer = try Rewriter(keys: keys, shard: shard, primary: try a.endpoint)
            let reader = try await CheckedReader(shard: shard, backup: try b.endpoint)
            try await reader.read(for: 2, keys[...])
            a.signal(SIGKILL)
            a.process.waitUntilExit()
            let again = try Host(name: "a", config: dir.sub("a.yaml"), port: a.port)
            hosts.append(again)
            async let restarted: Void = again.start()
            try await reader.read(for: 3, keys[...])
            try await restarted
            try await reader.read(for: 3, keys[...])
            let writes = await writer.stop()
            await reader.close()
            print("restarted primary: \(writes) writes, backup reads \(reader.reads), wrong \(reader.wrong), damaged \(reader.damaged)")
            #expect(reader.wrong == 0)
            #expect(reader.damaged == 0)
            #expect(reader.reads > 100)
        } }
    }

    /// As above, with a backup whose metadata stream is stuck (its events dropped)
    /// while the primary restarts: the stream never tells it to leave the previous
    /// run's views. It finds the restarted primary's generation by fetching the
    /// newest one, as it does every quarter lease, and serves no view it has not
    /// shown current within the lease. It reads throughout — once the primary is
    /// back, the half of the keys it had not read, whose pages its views have not
    /// cached — and never returns a wrong value.
    @Test func aRestartedPrimaryIsNotReadThroughTheViewsOfItsPreviousRun() async throws {
        var hosts: [Host] = []
        defer { cleanUp(hosts) }
        let hold = dir.sub("hold-views")
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let (a, b, shard, _) = try await startPair(etcd: etcd, failoverDelayMs: 60_000,
                                                       backupEnvironment: ["SHARDFS_TEST_HOLD_VIEWS_FILE": hold])
            hosts = [a, b]
            let keys = (0..<200).map { "h\($0)" }
            let writer = try Rewriter(keys: keys, shard: shard, primary: try a.endpoint)
            let reader = try await CheckedReader(shard: shard, backup: try b.endpoint)
            try await reader.read(for: 2, keys[..<100])
            // The stream stops well before the kill: the pages of the generation the
            // backup holds are freed early and come first when the restarted primary
            // reuses pages (LMDB takes the oldest freed first).
            FileManager.default.createFile(atPath: hold, contents: nil)
            defer { try? FileManager.default.removeItem(atPath: hold) }
            try await reader.read(for: 3, keys[..<100])
            let beforeKill = reader.reads
            a.signal(SIGKILL)
            a.process.waitUntilExit()
            let again = try Host(name: "a", config: dir.sub("a.yaml"), port: a.port)
            hosts.append(again)
            let started = Date()
            let finished = Locked(false)
            let restarting = Task {
                defer { finished.withLock { $0 = true } }
                try await again.start()
            }
            while !finished.withLock({ $0 }), Date().timeIntervalSince(started) < 60 {
                try await reader.read(for: 0.5, keys[..<100])
            }
            try await restarting.value
            let restartSeconds = Date().timeIntervalSince(started)
            try await reader.read(for: 3, keys[100...])
            // Following again, it serves the primary's newest views.
            try? FileManager.default.removeItem(atPath: hold)
            let before = reader.reads
            try await reader.read(for: 3, keys[100...])
            let servedOnceFollowing = reader.reads - before
            let writes = await writer.stop()
            await reader.close()
            print("restarted primary, backup not following: restart took \(String(format: "%.1f", restartSeconds)) s; \(writes) writes, backup reads \(reader.reads) (\(reader.reads - beforeKill) after the kill, \(servedOnceFollowing) once following again), wrong \(reader.wrong), damaged \(reader.damaged)")
            #expect(reader.wrong == 0)
            #expect(reader.damaged == 0)
            #expect(reader.reads > 100)
            #expect(servedOnceFollowing > 50)
        } }
    }

    /// etcd crashes and restarts while the backup promotes itself: the promotion
    /// completes (or is tried again), there is one primary, at the next epoch.
    @Test func aPromotionSurvivesEtcdRestartingInTheMiddle() async throws {
        var hosts: [Host] = []
        defer { cleanUp(hosts) }
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let (a, b, shard, volume) = try await startPair(etcd: etcd)
            hosts = [a, b]
            let writer = try await ShardFSClient.connect(to: try a.endpoint)
            try await writer.put(client: "writer", shard: shard, key: Array("before".utf8), value: CheckedValue.make(key: "before", version: 1, size: 100))
            await writer.close()
            a.signal(SIGKILL)
            a.process.waitUntilExit()
            // When B starts promoting, etcd crashes and comes back.
            let log = dir.sub("b.yaml.log")
            let started = Date()
            while Date().timeIntervalSince(started) < 30,
                  !((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("promoting") {
                try await Task.sleep(for: .milliseconds(10))
            }
            await etcd.kill9()
            try await etcd.start()
            // B serves writes for the shard, as the one primary, one epoch on.
            let probe = try await ShardFSClient.connect(to: try b.endpoint)
            var wrote = false
            while Date().timeIntervalSince(started) < 60, !wrote {
                wrote = (try? await probe.put(client: "writer", shard: shard, key: Array("after".utf8), value: [1])) != nil
                if !wrote { try await Task.sleep(for: .milliseconds(200)) }
            }
            #expect(wrote, "the backup never took over")
            let before = try await probe.get(shard: shard, key: Array("before".utf8))
            #expect(CheckedValue.version(before.value, key: "before") == 1)
            let location = try await probe.locate(shard)
            await probe.close()
            print("etcd restart during promotion: took over \(String(format: "%.2f", Date().timeIntervalSince(started))) s after the kill; \(location)")
            #expect(location.epoch == 2)
            #expect(location.volumeID == volume)
            #expect(location.primary.nodeID == "b")
        } }
    }
}
