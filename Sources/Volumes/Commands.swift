import Foundation

/// The result of one finished command.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
}

/// Runs system tools (losetup, mkfs.ext4, mount, umount, blkid) with Foundation's
/// `Process`. Calls block, so the async form runs them on a thread of their own,
/// never on Swift's cooperative pool.
public struct CommandRunner: Sendable {
    public init() {}

    /// Runs `tool` (a name looked up in the usual sbin/bin folders, or a path).
    public func run(_ tool: String, _ arguments: [String]) throws -> CommandResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try Self.locate(tool))
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch {
            throw VolumeError.failed("cannot start \(tool): \(error.localizedDescription)")
        }
        // Drain stderr on another thread so neither pipe can fill and block the child.
        nonisolated(unsafe) var errData = Data()
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) { errData = err.fileHandleForReading.readDataToEndOfFile() }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        process.waitUntilExit()
        return CommandResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                             stderr: String(decoding: errData, as: UTF8.self))
    }

    public func runAsync(_ tool: String, _ arguments: [String]) async throws -> CommandResult {
        try await withCheckedThrowingContinuation { continuation in
            Thread { continuation.resume(with: Result { try self.run(tool, arguments) }) }.start()
        }
    }

    /// Runs and requires exit status 0; the error names what was being done (`purpose`)
    /// and carries the tool's own message.
    @discardableResult
    public func check(_ tool: String, _ arguments: [String], purpose: String) async throws -> String {
        let result = try await runAsync(tool, arguments)
        guard result.status == 0 else {
            let message = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            throw VolumeError.failed("\(purpose): \(tool) \(arguments.joined(separator: " ")) exited with \(result.status): \(message)")
        }
        return result.stdout
    }

    static func locate(_ tool: String) throws -> String {
        if tool.hasPrefix("/") { return tool }
        for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin"] {
            if FileManager.default.isExecutableFile(atPath: dir + "/" + tool) { return dir + "/" + tool }
        }
        throw VolumeError.failed("\(tool) is not installed (install util-linux / e2fsprogs)")
    }
}

/// One line of /proc/self/mountinfo.
public struct MountInfo: Sendable, Equatable {
    /// The kernel's ID of the mount (unique while it exists).
    public var id: Int
    public var mountPoint: String
    public var source: String
    public var fsType: String
    /// The per-mount options (ro/rw, noatime, …).
    public var options: [String]
    /// The filesystem's options (for ext4 these include `norecovery` when mounted with `noload`).
    public var superOptions: [String]

    public var readOnly: Bool { options.contains("ro") }

    /// Parses the kernel's mount table (proc(5)): fields up to the mount point,
    /// optional fields ending at "-", then type, source and super options. Paths
    /// escape space, tab, newline and backslash as octal.
    public static func parse(_ text: String) -> [MountInfo] {
        text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            guard let dash = fields.firstIndex(of: "-"), dash >= 6, dash + 2 < fields.count, let id = Int(fields[0]) else { return nil }
            return MountInfo(id: id, mountPoint: unescape(fields[4]), source: unescape(fields[dash + 2]), fsType: fields[dash + 1],
                             options: fields[5].split(separator: ",").map(String.init),
                             superOptions: dash + 3 < fields.count ? fields[dash + 3].split(separator: ",").map(String.init) : [])
        }
    }

    /// Read to its end: `String(contentsOfFile:)` stops at a procfs file's first
    /// 4 KiB page, which hid mounts from a node with many (it then mounted a
    /// volume again over itself).
    public static func current(path: String = "/proc/self/mountinfo") -> [MountInfo] {
        guard let handle = FileHandle(forReadingAtPath: path) else { return [] }
        defer { try? handle.close() }
        return parse(String(decoding: (try? handle.readToEnd()) ?? Data(), as: UTF8.self))
    }

    static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var bytes: [UInt8] = []
        var utf8 = Array(s.utf8)[...]
        while let c = utf8.popFirst() {
            if c == UInt8(ascii: "\\"), utf8.count >= 3, let value = UInt8(String(decoding: utf8.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(value)
                utf8 = utf8.dropFirst(3)
            } else {
                bytes.append(c)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
