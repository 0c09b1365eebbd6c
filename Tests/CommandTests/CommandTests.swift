import Foundation
import ShardStore
import TestSupport
import Testing

let shardfs = productsDirectory().appendingPathComponent("shardfs").path
let shardfsBench = productsDirectory().appendingPathComponent("shardfs-bench").path

func shardfsRun(_ arguments: [String], input: String = "", environment: [String: String] = [:]) throws -> ProcessResult {
    try run(shardfs, arguments, input: input, environment: environment)
}

@Suite(.onOwnThreads) struct CommandTests {
    @Test func helpWorksEverywhere() throws {
        for command in [[], ["demo"], ["shard"], ["shard", "new"], ["shard", "list"], ["put"], ["get"], ["ls"], ["rm"],
                        ["mv"], ["find"], ["batch-put"]] {
            let result = try shardfsRun(command + ["--help"])
            #expect(result.status == 0, "\(command) --help: \(result.stderr)")
            #expect(result.stdout.contains("USAGE"), "\(command)")
        }
        for command in [[], ["bench"], ["bench-batch"]] {
            let result = try run(shardfsBench, command + ["--help"])
            #expect(result.status == 0, "shardfs-bench \(command) --help: \(result.stderr)")
            #expect(result.stdout.contains("USAGE"), "shardfs-bench \(command)")
        }
    }

    /// The binary users run carries no benchmarks: they live in shardfs-bench.
    @Test func benchmarksAreNotInTheShardfsBinary() throws {
        let help = try shardfsRun(["--help"])
        #expect(help.status == 0)
        #expect(!help.stdout.contains("bench"), "\(help.stdout)")
    }

    @Test func engineBenchmarkRuns() throws {
        let dir = try TemporaryDirectory("bench")
        let result = try run(shardfsBench, ["bench", "--entries", "2000", "--batch", "100", "--dir", dir.path])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("random get"), "\(result.stdout)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).isEmpty)
    }

    /// Without Redis, against the shardfs built beside shardfs-bench (its default server).
    @Test func batchBenchmarkRunsWithoutRedis() throws {
        // A short folder: the node's socket path, several levels below it, must fit in sun_path.
        var template = Array("/tmp/sfb-XXXXXX".utf8CString)
        let dir = try #require(mkdtemp(&template).map { String(cString: $0) })
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let result = try run(shardfsBench, ["bench-batch", "--entries", "2000", "--batch", "100", "--connections", "1",
                                            "--transports", "unix", "--systems", "lmdb,shardfs", "--dir", dir])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("ShardFS (unix)") && result.stdout.contains("raw LMDB"), "\(result.stdout)")
        #expect(!result.stdout.contains("Redis"), "\(result.stdout)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
    }

    @Test func lifecycleThroughTheCommand() throws {
        let dir = try TemporaryDirectory("cli")
        let data = ["--data-dir", dir.path, "--log-level", "error"]
        let created = try shardfsRun(["shard", "new", "--client", "c"] + data)
        #expect(created.status == 0, "\(created.stderr)")
        let id = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(id == "1")
        #expect(try shardfsRun(["put", id, "k1", "--value", "hello", "--index", "color=red"] + data,
                               environment: ["SHARDFS_CLIENT_ID": "c"]).status == 0)
        #expect(try shardfsRun(["put", id, "k2", "--client", "c"] + data, input: "from stdin").status == 0)
        #expect(try shardfsRun(["get", id, "k1"] + data).stdout == "hello")
        #expect(try shardfsRun(["get", id, "k2"] + data).stdout == "from stdin")
        #expect(try shardfsRun(["get", id, "k1", "--indexes"] + data).stdout == "color=red\n")
        #expect(try shardfsRun(["find", id, "color=red"] + data).stdout == "k1\n")
        #expect(try shardfsRun(["mv", id, "k2", "k3", "--client", "c"] + data).status == 0)
        #expect(try shardfsRun(["rm", id, "k1", "--client", "c"] + data).status == 0)
        let listing = try shardfsRun(["ls", id] + data).stdout
        #expect(listing.hasSuffix(" k3\n") && !listing.contains("k1"), "\(listing)")
        #expect(try shardfsRun(["shard", "close", id] + data).status == 0)
        let stat = try shardfsRun(["shard", "stat", id] + data).stdout
        #expect(stat.contains("state:   closed") && stat.contains("entries: 1"), "\(stat)")
        let list = try shardfsRun(["shard", "list"] + data).stdout
        #expect(list.contains("closed") && list.contains(" c "), "\(list)")
        // --json: the same, for programs.
        let json = try shardfsRun(["shard", "list", "--json"] + data).stdout
        let rows = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]], "\(json)")
        #expect(rows.count == 1 && rows[0]["state"] as? String == "closed" && rows[0]["owner"] as? String == "c"
                && rows[0]["id"] as? Int == Int(id) && rows[0]["entries"] as? Int == 1, "\(json)")
        let statJSON = try shardfsRun(["shard", "stat", id, "--json"] + data).stdout
        let fields = try #require(try JSONSerialization.jsonObject(with: Data(statJSON.utf8)) as? [String: Any], "\(statJSON)")
        #expect(fields["state"] as? String == "closed" && fields["entries"] as? Int == 1, "\(statJSON)")
        let volumes = try shardfsRun(["volume", "list", "--json"] + data).stdout
        #expect((try? JSONSerialization.jsonObject(with: Data(volumes.utf8)) as? [[String: Any]])?.count == 1, "\(volumes)")
        #expect(try shardfsRun(["shard", "delete", id] + data).status == 0)
        #expect(try shardfsRun(["shard", "list"] + data).stdout.split(separator: "\n").count == 1)
    }

    @Test(arguments: [
        (["get", "9", "k"], "shard 9 not found"),
        (["put", "1", "a/b", "--value", "x", "--client", "c"], "invalid key"),
        (["put", "1", "k", "--value", "x"], "client ID is required"),
        (["put", "1", "k", "--value", "x", "--client", "intruder"], "fenced"),
        (["get", "1", "missing"], "entry not found"),
        (["shard", "new", "--client", "c", "--id", "1"], "shard ID 1 is taken"),
        (["shard", "new", "--client", "c", "--size-limit", "huge"], "shard.size_limit"),
        (["put", "1", "k", "--value", "x", "--file", "/etc/hostname", "--client", "c"], "not both"),
        (["ls", "1", "--config", "/nonexistent.yaml"], "cannot read configuration file"),
        (["find", "1", "novalue"], "name=value"),
        (["ls", "1", "--metadata-type", "etcd"], "metadata.endpoints is empty"),
        (["ls", "1", "--metadata-type", "etcd", "--metadata-endpoints", "ftp://x"], "bad etcd endpoint"),
    ])
    func errorsExitNonZeroWithAClearMessage(_ arguments: [String], _ message: String) throws {
        let dir = try TemporaryDirectory("cli")
        let data = ["--data-dir", dir.path, "--log-level", "error"]
        #expect(try shardfsRun(["shard", "new", "--client", "c"] + data).status == 0)
        let result = try shardfsRun(arguments + data)
        #expect(result.status != 0)
        #expect(result.stderr.contains(message), "stderr: \(result.stderr)")
    }

    /// A typo in --data-dir is an error naming the folder, never a new empty node.
    @Test func commandsThatNeedANodeNeverMakeItsFolder() throws {
        let dir = try TemporaryDirectory("cli")
        let typo = dir.sub("dtaa")
        for command in [["ls", "1"], ["get", "1", "k"], ["find", "1", "a=b"], ["shard", "list"], ["shard", "stat", "1"],
                        ["shard", "close", "1"], ["rm", "1", "k", "--client", "c"]] {
            let result = try shardfsRun(command + ["--data-dir", typo, "--log-level", "error"])
            #expect(result.status != 0 && result.stderr.contains("there is no data folder \(typo)"), "\(command): \(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: typo), "\(command) made the folder")
        }
        #expect(try shardfsRun(["shard", "new", "--client", "c", "--data-dir", typo, "--log-level", "error"]).stdout == "1\n")
    }

    /// A node told to watch a process (as every node the tests start watches the
    /// test process) stops cleanly once that process is killed, shells between or not.
    @Test func aNodeStopsCleanlyWhenTheProcessItWatchesIsKilled() async throws {
        let dir = try TemporaryDirectory("cli")
        let standIn = Process()  // stands in for a test process that crashes
        standIn.executableURL = URL(fileURLWithPath: "/bin/sleep")
        standIn.arguments = ["600"]
        try standIn.run()
        let server = try await ServeProcess.start(["--data-dir", dir.path, "--no-tcp", "--log-level", "warning"],
                                                  environment: ["SHARDFS_EXIT_WITH_PID": String(standIn.processIdentifier)])
        defer { server.kill9() }
        #expect(server.exitStatus(within: 1.5) == nil)  // still serving while the watched process lives
        kill(standIn.processIdentifier, SIGKILL)
        standIn.waitUntilExit()
        #expect(server.exitStatus(within: 15) == 0)
    }

    /// A second process on a busy data folder says at once what it waits for.
    @Test func waitingForABusyDataFolderIsSaidAtOnce() async throws {
        let dir = try TemporaryDirectory("cli")
        let server = try await ServeProcess.start(["--data-dir", dir.path, "--no-tcp", "--log-level", "warning"])
        defer { server.stop() }
        let waiting = try await shell("timeout 3 '\(shardfs)' shard list --data-dir '\(dir.path)' 2>&1; true")
        #expect(waiting.stdout.contains("the data folder is in use by another ShardFS process; waiting for it")
                && waiting.stdout.contains("pid=\(server.process.processIdentifier)"), "\(waiting.stdout)")
    }

    /// A client with no node to talk to says which socket and what to check.
    @Test func aClientWithNoNodeSaysWhereItLooked() throws {
        let dir = try TemporaryDirectory("cli")
        let result = try shardfsRun(["client", "list-shards", "--socket", dir.sub("none.sock")])
        #expect(result.status != 0 && result.stderr.contains("no node serves \(dir.sub("none.sock"))")
                && result.stderr.contains("shardfs serve") && !result.stderr.contains("descriptor"), "\(result.stderr)")
    }

    /// A taken port is said with the address and what to do, not as a failed system call.
    @Test func aTakenPortIsSaidPlainly() async throws {
        let dir = try TemporaryDirectory("cli")
        let script = """
            import socket, subprocess, sys
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1); port = s.getsockname()[1]
            r = subprocess.run([sys.argv[1], "serve", "--data-dir", sys.argv[2], "--listen", "127.0.0.1:%d" % port,
                                "--log-level", "error"], capture_output=True, text=True, timeout=60)
            print(r.returncode, port, r.stderr.strip())
            """
        try script.write(toFile: dir.sub("taken.py"), atomically: true, encoding: .utf8)
        let result = try await shell("python3 '\(dir.sub("taken.py"))' '\(shardfs)' '\(dir.sub("data"))'")
        let fields = result.stdout.split(separator: " ", maxSplits: 2).map(String.init)
        #expect(fields.count == 3 && fields[0] == "1", "\(result.stdout) \(result.stderr)")
        #expect(fields.count == 3 && fields[2].contains("127.0.0.1:\(fields[1]) is taken") && fields[2].contains("--listen")
                && !fields[2].contains("descriptor"), "\(result.stdout)")
    }

    /// systemd's Type=notify: READY=1 once the node serves, STOPPING=1 when it stops,
    /// on the datagram socket $NOTIFY_SOCKET names (a socket here plays systemd).
    @Test func serveTellsTheServiceManagerWhenItIsReadyAndStopping() async throws {
        let dir = try TemporaryDirectory("cli")
        let script = """
            import os, signal, socket, subprocess, sys
            path = sys.argv[3]
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(path); s.settimeout(30)
            env = dict(os.environ, NOTIFY_SOCKET=path)
            p = subprocess.Popen([sys.argv[1], "serve", "--data-dir", sys.argv[2], "--no-tcp", "--log-level", "error"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                ready = s.recv(4096).decode()
                p.send_signal(signal.SIGTERM)
                stopping = s.recv(4096).decode()
                print(p.wait(timeout=30), ready.splitlines()[0], "MAINPID=%d" % p.pid in ready, stopping)
            finally:
                if p.poll() is None: p.kill(); p.wait()
            """
        try script.write(toFile: dir.sub("notify.py"), atomically: true, encoding: .utf8)
        let result = try await shell("python3 '\(dir.sub("notify.py"))' '\(shardfs)' '\(dir.sub("data"))' '\(dir.sub("notify.sock"))'")
        #expect(result.stdout == "0 READY=1 True STOPPING=1\n", "\(result.stdout) \(result.stderr)")
    }

    @Test func processesCreatingShardsAtOnceGetUniqueIDs() throws {
        let dir = try TemporaryDirectory("cli")
        let data = ["--data-dir", dir.path, "--log-level", "error"]
        #expect(try shardfsRun(["shard", "new", "--client", "c"] + data).stdout == "1\n")  // initialise the node once
        let results = try (0..<8).map { _ -> Process in
            let p = Process()
            p.executableURL = URL(fileURLWithPath: shardfs)
            p.arguments = ["shard", "new", "--client", "c", "--data-dir", dir.path, "--log-level", "warning"]
            p.standardOutput = Pipe()
            p.standardError = Pipe()
            try p.run()
            return p
        }.map { p -> String in
            let out = (p.standardOutput as! Pipe).fileHandleForReading.readDataToEndOfFile()
            let err = (p.standardError as! Pipe).fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            // No process may see another's shard half-made (it would log a warning or an error).
            #expect(err.isEmpty, "\(String(decoding: err, as: UTF8.self))")
            return String(decoding: out, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(Set(results) == Set((2...9).map(String.init)), "\(results)")
    }

    @Test func demoRunsOnEmbeddedDefaults() throws {
        let dir = try TemporaryDirectory("cli")
        let result = try shardfsRun(["demo", "--data-dir", dir.sub("data")])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("BatchPut of 1000 entries"))
        #expect(result.stdout.contains("Put after CloseShard: shard is closed"))
    }

    /// A child streams durable puts and acknowledges each; it is killed with
    /// SIGKILL mid-stream. Every acknowledged entry must be there afterwards.
    @Test func killDashNineLosesNoAcknowledgedPut() throws {
        signal(SIGPIPE, SIG_IGN)
        let dir = try TemporaryDirectory("cli")
        let data = ["--data-dir", dir.path, "--log-level", "error"]
        #expect(try shardfsRun(["shard", "new", "--client", "c"] + data).stdout == "1\n")

        let child = Process()
        child.executableURL = URL(fileURLWithPath: shardfs)
        child.arguments = ["batch-put", "1", "--client", "c", "--batch", "3"] + data
        let stdin = Pipe(), stdout = Pipe()
        child.standardInput = stdin
        child.standardOutput = stdout
        try child.run()

        // Feed entries as fast as the child takes them, until it dies.
        let writer = Thread {
            var i = 0
            while true {
                let line = "k\(i)\tvalue-\(i)-" + String(repeating: "x", count: i % 300) + "\n"
                do { try stdin.fileHandleForWriting.write(contentsOf: Data(line.utf8)) } catch { return }
                i += 1
            }
        }
        writer.start()

        var acknowledged: [String] = []
        var buffer = Data()
        let reader = stdout.fileHandleForReading
        while acknowledged.count < 600 {
            let chunk = reader.availableData
            if chunk.isEmpty { break }
            buffer.append(chunk)
            while let newline = buffer.firstIndex(of: 0x0A) {
                let line = String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self)
                buffer.removeSubrange(buffer.startIndex...newline)
                if line.hasPrefix("ok ") { acknowledged.append(String(line.dropFirst(3))) }
            }
        }
        kill(child.processIdentifier, SIGKILL)
        child.waitUntilExit()
        try? stdin.fileHandleForWriting.close()
        #expect(child.terminationReason == .uncaughtSignal)
        #expect(acknowledged.count >= 600)

        // Open the shard's files directly, as the restarted node would.
        let volumes = dir.sub("volumes")
        let volume = try #require(try FileManager.default.contentsOfDirectory(atPath: volumes).first)
        let shard = try Shard.open(at: volumes + "/" + volume + "/shard-1")
        for key in acknowledged {
            let i = Int(key.dropFirst())!
            let entry = try shard.get(try EntryKey(key))
            #expect(entry.value == Array(("value-\(i)-" + String(repeating: "x", count: i % 300)).utf8), "entry \(key)")
        }
    }
}
