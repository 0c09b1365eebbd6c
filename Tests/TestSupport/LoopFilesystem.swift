import Foundation

/// An ext4 filesystem on a loop device, mounted in a temporary folder; `cleanUp`
/// (run in `defer`, pass or fail) unmounts it and detaches every loop device
/// whose image lies in the folder. `mount -o loop` sets the loop device up with
/// autoclear: it detaches itself when the filesystem is unmounted. If the test
/// process dies first, a `CrashCleanup` guard unmounts it (and sweeps the folder).
public final class LoopFilesystem {
    public let dir: TemporaryDirectory
    public let device: String
    public let mountPoint: String
    private let crashCleanup: CrashCleanup

    public init() throws {
        dir = try TemporaryDirectory("snapshot-loop")
        let image = dir.sub("ext4.img")
        mountPoint = dir.sub("mnt")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        crashCleanup = try CrashCleanup(CrashCleanup.unmountAndDetach(under: dir.path))
        var device = ""
        do {
            try Self.sh("truncate -s 128M '\(image)' && mkfs.ext4 -q -F '\(image)'")
            try Self.sh("mount -o loop '\(image)' '\(mountPoint)'")
            device = try Self.sh("findmnt -nro SOURCE --mountpoint '\(mountPoint)'").trimmingCharacters(in: .whitespacesAndNewlines)
        } catch {
            Self.cleanUp(dir: dir, mountPoint: mountPoint)
            crashCleanup.dismiss()
            throw error
        }
        self.device = device
    }

    /// Whether the kernel detaches the loop device by itself once it is unmounted.
    public var autoclear: Bool {
        let name = (device as NSString).lastPathComponent
        return (try? String(contentsOfFile: "/sys/block/\(name)/loop/autoclear", encoding: .utf8))?.hasPrefix("1") == true
    }

    @discardableResult
    public static func sh(_ command: String) throws -> String {
        let result = try run("/bin/bash", ["-c", command])
        guard result.status == 0 else { throw Failure(description: "\(command): \(result.stderr)") }
        return result.stdout
    }

    public func cleanUp() {
        Self.cleanUp(dir: dir, mountPoint: mountPoint)
        crashCleanup.dismiss()
    }

    static func cleanUp(dir: TemporaryDirectory, mountPoint: String) {
        if isMountPoint(mountPoint) { _ = try? run("/bin/umount", [mountPoint]) }
        if isMountPoint(mountPoint) { _ = try? run("/bin/umount", ["-l", mountPoint]) }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        for name in names where name.hasPrefix("loop") {
            if let backing = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8),
               backing.hasPrefix(dir.path + "/") {
                _ = try? run("/sbin/losetup", ["-d", "/dev/" + name])
            }
        }
        dir.remove()
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }
}
