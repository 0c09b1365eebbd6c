import Foundation
import TestSupport
import Testing

/// Two "hosts", each a process tree in its own mount namespace (`unshare -m`),
/// one loop image: host A serves shards read-write through the batch service;
/// host B attaches the same volume read-only (a second, `losetup -r` loop
/// device), mounts it `ro,noload` and lists the same shard directories. Neither
/// sees the other's mounts. Root only; loop devices under the test's folder are
/// removed in `defer`, and the namespaces end with their processes.
@Suite(.serialized, .enabled(if: getuid() == 0, "loop devices and mount namespaces need root"))
struct TwoHostTests {
    let dir: TemporaryDirectory
    var shardfs: String { productsDirectory().appendingPathComponent("shardfs").path }

    init() throws { dir = try TemporaryDirectory("twohost") }

    /// A new mount namespace starts with copies of every mount, those of tests
    /// running meanwhile included; a copy keeps their devices busy. A host of
    /// this test has no business with them: it drops its copies of everything
    /// mounted under /tmp (in its own namespace only) first; `-c` skips the path
    /// lookup, which would wait on a busy FUSE daemon of another test.
    static let dropOtherMounts = """
        for m in $(awk '$5 ~ "^/tmp/" { print $5 }' /proc/self/mountinfo | sort -r); do umount -l -c "$m" 2>/dev/null; done

        """

    func config(_ node: String, initialVolumes: Int) throws -> String {
        try NodeConfigFile(nodeID: node, dataDir: dir.sub(node),
                           cloud: .init(provider: "loop", imageDir: dir.sub("images"), volumeSize: "64MiB", initialVolumes: initialVolumes),
                           shardSizeLimit: "16MiB")
            .write(to: dir.sub("\(node).yaml"))
    }

    @Test func primaryWritesThroughTheBatchServiceBackupListsTheSameShards() async throws {
        let hostA = Process()
        defer {
            if hostA.isRunning { kill(hostA.processIdentifier, SIGKILL) }
            if hostA.processIdentifier > 0 { hostA.waitUntilExit() }
            for device in loopDevices(under: dir.path) { _ = try? run("/usr/sbin/losetup", ["-d", device]) }
            dir.remove()
        }
        let configA = try config("a", initialVolumes: 1), configB = try config("b", initialVolumes: 0)
        // Host A: `shardfs serve` in a mount namespace of its own.
        hostA.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        hostA.arguments = ["-m", "--propagation", "private", "/bin/bash", "-c",
                           Self.dropOtherMounts + "exec '\(shardfs)' serve --config '\(configA)' --no-tcp"]
        let out = Pipe()
        hostA.standardOutput = out
        hostA.standardError = FileHandle.nullDevice
        try hostA.run()
        // Read its "ready" line on a thread of its own, not on Swift's cooperative pool.
        let ready = await withCheckedContinuation { (continuation: CheckedContinuation<String, Never>) in
            Thread {
                var line = Data()
                while !line.contains(0x0A) {
                    let chunk = out.fileHandleForReading.availableData
                    if chunk.isEmpty { break }
                    line.append(chunk)
                }
                continuation.resume(returning: String(decoding: line, as: UTF8.self))
            }.start()
        }
        #expect(ready.hasPrefix("ready"), "host A did not start")
        let socket = dir.sub("a/shardfs.sock")

        let volumes = try FileManager.default.contentsOfDirectory(atPath: dir.sub("images")).filter { $0.hasSuffix(".json") }
        let volume = String(try #require(volumes.first).dropLast(5))
        #expect(volumes.count == 1)
        // A's mount lives in A's namespace only.
        let here = mountInfoText()
        #expect(!here.contains(dir.sub("a/volumes/\(volume)")))

        var shards: [String] = []
        for _ in 0..<2 {
            let new = try await runAsync(shardfs, ["client", "new-shard", "--socket", socket, "--client", "writer"])
            #expect(new.status == 0, "\(new.stderr)")
            shards.append(new.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        let put = try await runAsync(shardfs, ["client", "batch-put", "--socket", socket, "--client", "writer", shards[0]],
                                     input: (0..<100).map { "key-\($0)\tvalue-\($0)" }.joined(separator: "\n"))
        #expect(put.status == 0 && put.stdout.contains("100 put"), "\(put.stderr)")
        // A read-only mount without journal replay sees what reached the device: push it there.
        sync()

        // Host B: attach read-only, list, detach, all inside its own namespace.
        let script = Self.dropOtherMounts + """
        set -e
        mountpoint=$('\(shardfs)' volume attach '\(volume)' --read-only --config '\(configB)')
        echo "mounted $mountpoint"
        grep " $mountpoint " /proc/self/mountinfo
        ls "$mountpoint"
        test -s "$mountpoint/shard-\(shards[0])/data.mdb" && echo "data present"
        touch "$mountpoint/x" 2>/dev/null && echo "WROTE" || echo "read-only"
        '\(shardfs)' volume detach '\(volume)' --config '\(configB)'
        """
        let b = try await runAsync("/usr/bin/unshare", ["-m", "--propagation", "private", "/bin/bash", "-c", script])
        #expect(b.status == 0, "\(b.stderr)")
        #expect(b.stdout.contains("mounted \(dir.sub("b/volumes/\(volume)"))"))
        let mountLine = try #require(b.stdout.split(separator: "\n").first { $0.contains(" - ext4 ") })
        #expect(mountLine.contains(" ro,") && mountLine.contains("norecovery"))
        for shard in shards { #expect(b.stdout.contains("shard-\(shard)\n")) }
        #expect(b.stdout.contains("data present") && b.stdout.contains("read-only") && !b.stdout.contains("WROTE"))

        // B's read-only loop device is gone; A's stays attached while A serves.
        #expect(loopDevices(under: dir.path).count == 1)
        let record = try String(contentsOfFile: dir.sub("images/\(volume).json"), encoding: .utf8)
        #expect(record.contains("\"a\"") && !record.contains("\"b\""))
        kill(hostA.processIdentifier, SIGTERM)
        hostA.waitUntilExit()
        #expect(hostA.terminationStatus == 0)
    }
}
