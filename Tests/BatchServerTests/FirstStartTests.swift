import Foundation
import Testing
import TestSupport

/// Issue 15: what a node makes at its first start reaches the disk before anything depends on it.
@Suite struct FirstStartTests {
    /// At first start, every folder and file made is synced into its parent
    /// before it is relied on (traced with strace: the fsyncs the kernel saw).
    @Test func aFirstStartSyncsEveryFolderItMakesIntoItsParent() async throws {
        let dir = try TemporaryDirectory("fsync")
        let data = dir.sub("fresh/data")
        let log = dir.sub("trace")
        let shardfs = productsDirectory().appendingPathComponent("shardfs").path
        let result = try await runAsync("/usr/bin/strace", ["-f", "-qq", "-y", "-e", "trace=mkdir,mkdirat,openat,fsync",
                                                           "-o", log, shardfs, "shard", "new", "--data-dir", data,
                                                           "--client", "x", "--log-level", "error"])
        #expect(result.status == 0, "\(result.stderr)")
        let lines = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").map(String.init)
        func firstLine(_ pattern: String) -> Int? {
            let regex = try! NSRegularExpression(pattern: pattern)
            return lines.firstIndex { regex.firstMatch(in: $0, range: NSRange($0.startIndex..., in: $0)) != nil }
        }
        func escaped(_ s: String) -> String { NSRegularExpression.escapedPattern(for: s) }
        let volumes = try FileManager.default.contentsOfDirectory(atPath: data + "/volumes")
        let volume = try #require(volumes.first)
        let made: [(what: String, created: String)] = [
            (dir.sub("fresh"), "mkdir(at)?\\((AT_FDCWD(<[^>]*>)?, )?\"\(escaped(dir.sub("fresh")))\""),
            (data, "mkdir(at)?\\((AT_FDCWD(<[^>]*>)?, )?\"\(escaped(data))\""),
            (data + "/metadata", "mkdir(at)?\\((AT_FDCWD(<[^>]*>)?, )?\"\(escaped(data + "/metadata"))\""),
            (data + "/metadata/data.mdb", "openat\\(AT_FDCWD(<[^>]*>)?, \"\(escaped(data + "/metadata/data.mdb"))\", [^)]*O_CREAT"),
            (data + "/volumes", "mkdir(at)?\\((AT_FDCWD(<[^>]*>)?, )?\"\(escaped(data + "/volumes"))\""),
            (data + "/volumes/" + volume, "mkdir(at)?\\((AT_FDCWD(<[^>]*>)?, )?\"\(escaped(data + "/volumes/" + volume))\""),
        ]
        for (what, created) in made {
            let parent = (what as NSString).deletingLastPathComponent
            guard let createdAt = firstLine(created) else {
                Issue.record("the trace shows no creation of \(what)")
                continue
            }
            let synced = firstLine("fsync\\(\\d+<\(escaped(parent))>")
            let syncedAfter = lines.indices.contains { i in
                i > createdAt && lines[i].contains("fsync(") && lines[i].contains("<\(parent)>")
            }
            #expect(syncedAfter, "\(parent) was not fsynced after \(what) was made (first fsync of it: line \(String(describing: synced)))")
        }
    }
}
