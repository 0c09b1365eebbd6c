import Foundation
import TestSupport
import Testing

/// `shardfs serve --mount`: the socket service and the mount on one node.
@Suite struct ServeTests {
    @Test func aPutThroughTheSocketIsSeenByTheMountAtOnce() async throws {
        let dir = try TemporaryDirectory("serve")
        let mnt = dir.sub("mnt"), data = dir.sub("data")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let server = Process()
        server.executableURL = URL(fileURLWithPath: shardfs)
        server.arguments = ["serve", "--data-dir", data, "--no-tcp", "--mount", mnt, "-o", "client_id=c", "--log-level", "warning"]
        let out = Pipe()
        server.standardOutput = out
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGTERM) }
            server.waitUntilExit()
            if ((try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? "").contains(" \(mnt) ") {
                _ = try? run("/bin/fusermount3", ["-uz", mnt])
            }
        }
        // Wait for the "ready" line.
        var line = Data()
        while !line.contains(0x0A) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { throw FixtureError("serve exited before it was ready") }
            line.append(chunk)
        }
        #expect(String(decoding: line, as: UTF8.self).hasPrefix("ready "))
        let socket = ["--socket", data + "/shardfs.sock"]
        func client(_ arguments: [String]) async throws -> ProcessResult {
            try await runAsync(shardfs, ["client"] + arguments.prefix(1) + socket + arguments.dropFirst())
        }
        _ = try await shell("mkdir \(mnt)/shard-3 && echo hi > \(mnt)/shard-3/a && cat \(mnt)/shard-3/a")
        #expect(try await client(["put", "3", "a", "--value", "changed through the socket", "--client", "c"]).status == 0)
        #expect(try await shell("cat \(mnt)/shard-3/a").stdout == "changed through the socket")
        #expect(try await client(["put", "3", "b", "--value", "new", "--client", "c"]).status == 0)
        #expect(try await shell("cat \(mnt)/shard-3/b").stdout == "new")
        #expect(try await client(["delete", "3", "b", "--client", "c"]).status == 0)
        #expect(try await shell("ls \(mnt)/shard-3").stdout == "a\n")
        // SIGTERM unmounts cleanly.
        kill(server.processIdentifier, SIGTERM)
        server.waitUntilExit()
        #expect(!((try String(contentsOfFile: "/proc/mounts", encoding: .utf8)).contains(" \(mnt) ")))
    }
}
