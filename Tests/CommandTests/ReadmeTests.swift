import Foundation
import TestSupport
import Testing

/// The README's "Using it" examples, run as written: each `sh` block is a bash
/// script (`set -e`, so every command must succeed) in a fresh folder, with
/// `shardfs` and `shardfs-bench` the built binaries. A README whose commands
/// no longer work fails here. What is changed before running is said where it
/// is changed.
@Suite(.onOwnThreads, .serialized) struct ReadmeTests {
    static let readme = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("README.md").path

    /// The `sh` blocks between "## Using it" and the next section.
    static func examples() throws -> [String] {
        let text = try String(contentsOfFile: readme, encoding: .utf8)
        guard let start = text.range(of: "\n## Using it\n"),
              let end = text.range(of: "\n## ", range: start.upperBound..<text.endIndex) else {
            throw ReadmeError.noSection
        }
        let parts = text[start.upperBound..<end.lowerBound].components(separatedBy: "```")
        // Even parts are prose, odd ones code: "sh\n…".
        return stride(from: 1, to: parts.count, by: 2).compactMap { i in
            parts[i].hasPrefix("sh\n") ? String(parts[i].dropFirst(3)) : nil
        }
    }

    /// Runs `script` in a fresh folder; returns its output, or records the failure.
    func runExample(_ script: String, setup: String = "", cleanup: String = "") async throws -> String {
        let dir = try TemporaryDirectory("readme")
        let bin = productsDirectory().path
        // The binaries by their names, first on PATH, as `mount-helpers/install` puts them.
        try FileManager.default.createDirectory(atPath: dir.sub("bin"), withIntermediateDirectories: true)
        for name in ["shardfs", "shardfs-bench"] {
            try FileManager.default.createSymbolicLink(atPath: dir.sub("bin/" + name), withDestinationPath: bin + "/" + name)
        }
        let full = """
            set -e
            cd \(shellQuoted(dir.path))
            export PATH=\(shellQuoted(dir.sub("bin"))):"$PATH"
            cleanup() { \(cleanup.isEmpty ? ":" : cleanup); }
            trap cleanup EXIT
            \(setup)
            \(script)
            """
        let result = try await shell(full)
        #expect(result.status == 0, "README example failed (status \(result.status)):\n\(script)\nstdout:\n\(result.stdout)\nstderr:\n\(result.stderr)")
        return result.stdout
    }

    @Test func theExamplesAreTheOnesTested() throws {
        let examples = try Self.examples()
        // The filesystem, the service, the data folder: each has its test below.
        #expect(examples.count == 3, "\(examples)")
        #expect(examples.first?.contains("shardfs mount ./data ./mnt") == true)
        #expect(examples.dropFirst().first?.contains("shardfs serve") == true)
        #expect(examples.last?.contains("shardfs shard new") == true)
    }

    @Test func theFilesystemExampleWorks() async throws {
        let example = try #require(try Self.examples().first { $0.contains("shardfs mount") })
        // The user's file to copy.
        _ = try await runExample(example, setup: "echo 'a segment' > segment.log",
                                 cleanup: "fusermount3 -u ./mnt 2>/dev/null || true")
    }

    @Test func theServiceExampleWorks() async throws {
        let example = try #require(try Self.examples().first { $0.contains("shardfs serve") })
        var lines = example.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        // The serve line runs until stopped: here in the background, without the
        // optional mount (`[--mount ./mnt]` is notation), until the socket is there.
        let serve = try #require(lines.firstIndex { $0.hasPrefix("shardfs serve") })
        lines[serve] = lines[serve].replacingOccurrences(of: "[--mount ./mnt]", with: "")
            .components(separatedBy: "#")[0] + " > serve.log 2>&1 &\nserver=$!\n"
            + "for i in $(seq 1 300); do [ -S ./data/shardfs.sock ] && break; sleep 0.1; done"
        // The batch-get of a missing key exits 1, as its comment says.
        let get = try #require(lines.firstIndex { $0.contains("batch-get") && $0.contains("exits 1") })
        lines[get] = lines[get].components(separatedBy: "#")[0] + " || [ $? -eq 1 ]"
        let output = try await runExample(lines.joined(separator: "\n"),
                                          cleanup: "[ -z \"${server:-}\" ] || { kill $server; wait $server || true; }")
        #expect(output.contains("hello"), "\(output)")
    }

    @Test func theDataFolderExampleWorks() async throws {
        let example = try #require(try Self.examples().first { $0.contains("shardfs shard new") })
        // `shardfs-bench bench` measures for minutes: its own test runs it small.
        let runnable = example.split(separator: "\n").filter { !$0.hasPrefix("shardfs-bench bench") }.joined(separator: "\n")
        #expect(runnable != example)
        let output = try await runExample(runnable)
        #expect(output.contains("hello"), "\(output)")
    }
}

enum ReadmeError: Error { case noSection }
