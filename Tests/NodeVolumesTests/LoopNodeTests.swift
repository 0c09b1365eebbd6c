import Foundation
import TestSupport
import Testing

/// `cloud.provider: loop` end to end through the `shardfs` executable: a fresh
/// node creates, formats and mounts its first loop volume, shards land on it,
/// and `shardfs volume` lists, creates and deletes volumes. Root only; every
/// mount and loop device under the test's folder is removed in `defer`.
@Suite(.serialized, .enabled(if: getuid() == 0, "loop devices and mounts need root"))
struct LoopNodeTests {
    let dir: TemporaryDirectory
    let config: String
    /// The node's volumes stay mounted and attached after each command: this
    /// cleans them up if the test process dies before `cleanUp`.
    let crashCleanup: CrashCleanup

    init() throws {
        dir = try TemporaryDirectory("loopnode")
        crashCleanup = try CrashCleanup(CrashCleanup.unmountAndDetach(under: dir.path))
        config = try NodeConfigFile(nodeID: "n1", dataDir: dir.sub("data"), cloud: .init(provider: "loop", volumeSize: "64MiB"))
            .write(to: dir.sub("shardfs.yaml"))
    }

    func shardfs(_ arguments: String...) async throws -> ProcessResult {
        try await runAsync(productsDirectory().appendingPathComponent("shardfs").path, arguments + ["--config", config])
    }

    func mounts() -> [(source: String, point: String, type: String)] {
        let text = mountInfoText()
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ").map(String.init)
            guard let dash = f.firstIndex(of: "-"), dash + 2 < f.count, f[4].hasPrefix(dir.path + "/") else { return nil }
            return (f[dash + 2], f[4], f[dash + 1])
        }
    }

    func cleanUp() {
        for m in mounts().reversed() { _ = try? run("/usr/bin/umount", ["-l", m.point]) }
        for device in loopDevices(under: dir.path) { _ = try? run("/usr/sbin/losetup", ["-d", device]) }
        dir.remove()
        crashCleanup.dismiss()
    }

    @Test func aFreshNodeGetsALoopVolumeAndTheVolumeCommandsWork() async throws {
        defer { cleanUp() }
        // Commands other than serve, mount, shard new and volume create need the
        // node's folder to exist; an empty one is a fresh node.
        try FileManager.default.createDirectory(atPath: dir.sub("data"), withIntermediateDirectories: true)
        let list = try await shardfs("volume", "list")
        #expect(list.status == 0, "\(list.stderr)")
        let rows = list.stdout.split(separator: "\n").dropFirst().map { $0.split(separator: " ", omittingEmptySubsequences: true).map(String.init) }
        #expect(rows.count == 1)
        let first = try #require(rows.first?.first)
        #expect(rows.first?.contains("in-use") == true && rows.first?.contains("64MiB") == true && rows.last?.last == "n1")
        #expect(mounts().contains { $0.point == dir.sub("data/volumes/\(first)") && $0.type == "ext4" && $0.source.hasPrefix("/dev/loop") })

        // A shard lands on the ext4 volume (its size limit fits there).
        let new = try await shardfs("shard", "new", "--client", "c1", "--size-limit", "16MiB")
        #expect(new.status == 0, "\(new.stderr)")
        let shardID = new.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(FileManager.default.fileExists(atPath: dir.sub("data/volumes/\(first)/shard-\(shardID)/data.mdb")))

        // A volume holding shards is not deleted.
        let refused = try await shardfs("volume", "delete", first)
        #expect(refused.status != 0 && refused.stderr.contains("holds 1 shard"))

        let created = try await shardfs("volume", "create", "--size", "32MiB")
        #expect(created.status == 0, "\(created.stderr)")
        let second = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(mounts().contains { $0.point == dir.sub("data/volumes/\(second)") })
        let deleted = try await shardfs("volume", "delete", second)
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(!mounts().contains { $0.point == dir.sub("data/volumes/\(second)") })
        #expect(!FileManager.default.fileExists(atPath: dir.sub("data/images/\(second).img")))
        let after = try await shardfs("volume", "list")
        #expect(after.stdout.contains(first) && !after.stdout.contains(second))
    }

    /// A node whose volumes have no room for a new shard's size limit makes one
    /// that does: created, formatted, mounted and registered, and the shard lands
    /// there. A limit that fits stays on the first volume.
    @Test func aNodeWithoutRoomForANewShardProvisionsAVolume() async throws {
        defer { cleanUp() }
        let small = try await shardfs("shard", "new", "--client", "c1", "--size-limit", "8MiB")
        #expect(small.status == 0, "\(small.stderr)")
        let volumes = try FileManager.default.contentsOfDirectory(atPath: dir.sub("data/volumes"))
        #expect(volumes.count == 1)
        let first = try #require(volumes.first)
        #expect(FileManager.default.fileExists(atPath: dir.sub("data/volumes/\(first)/shard-\(small.stdout.trimmingCharacters(in: .whitespacesAndNewlines))")))

        // 100 MiB cannot fit on a 64 MiB volume.
        let big = try await shardfs("shard", "new", "--client", "c1", "--size-limit", "100MiB")
        #expect(big.status == 0, "\(big.stderr)")
        let id = big.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let now = try FileManager.default.contentsOfDirectory(atPath: dir.sub("data/volumes")).sorted()
        #expect(now.count == 2)
        let second = try #require(now.first { $0 != first })
        #expect(FileManager.default.fileExists(atPath: dir.sub("data/volumes/\(second)/shard-\(id)/data.mdb")))
        #expect(mounts().contains { $0.point == dir.sub("data/volumes/\(second)") && $0.type == "ext4" })
        let list = try await shardfs("volume", "list")
        #expect(list.stdout.contains(second), "\(list.stdout)")
        var stat = statvfs()
        #expect(statvfs(dir.sub("data/volumes/\(second)"), &stat) == 0 && Int(stat.f_bavail) * Int(stat.f_frsize) >= 100 << 20)
    }

    /// A clean stop of `serve` unmounts its volumes and detaches their loop
    /// devices; the next start attaches and mounts them again, shards and all.
    @Test func aCleanStopUnmountsAndDetachesAndTheNextStartAttachesAgain() async throws {
        defer { cleanUp() }
        let serve = try await ServeProcess.start(["--config", config, "--no-tcp", "--size-limit", "8MiB"])
        let socket = try #require(serve.unixSocket)
        let new = try await runAsync(productsDirectory().appendingPathComponent("shardfs").path,
                                     ["client", "new-shard", "--socket", socket, "--client", "c1"])
        #expect(new.status == 0, "\(new.stderr)")
        #expect(mounts().count == 1 && loopDevices(under: dir.path).count == 1)
        #expect(serve.stop() == 0)
        #expect(mounts().isEmpty, "\(mounts())")
        #expect(loopDevices(under: dir.path).isEmpty)

        let list = try await shardfs("shard", "list")
        #expect(list.status == 0 && list.stdout.contains("c1"), "\(list.stdout) \(list.stderr)")
        #expect(mounts().count == 1)
    }
}
