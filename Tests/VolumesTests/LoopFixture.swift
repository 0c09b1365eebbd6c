import Foundation
import TestSupport
@testable import Volumes

/// A folder for loop images and volume roots, and the cleanup every loop test
/// runs in `defer`, pass or fail: unmount everything under the folder, then
/// detach every loop device whose image lies in it (found through sysfs, so
/// devices a failed step never recorded go too). The provider's loop devices
/// have no autoclear (they stand for cloud attachments, which outlive mounts):
/// a `CrashCleanup` guard does the same cleanup if the test process dies first.
final class LoopFixture: @unchecked Sendable {
    let dir: TemporaryDirectory
    let provider: LoopCloudProvider
    private let crashCleanup: CrashCleanup

    init() throws {
        dir = try TemporaryDirectory("loop")
        provider = LoopCloudProvider(imageDirectory: dir.sub("images"))
        crashCleanup = try CrashCleanup(CrashCleanup.unmountAndDetach(under: dir.path))
    }

    func manager(_ instanceID: String, root: String? = nil) -> BlockVolumeManager {
        let manager = BlockVolumeManager(provider: provider, volumeRoot: root ?? dir.sub("root-\(instanceID)"), instanceID: instanceID)
        manager.pollInterval = .milliseconds(50)
        return manager
    }

    /// Loop devices backing any file under this fixture's folder.
    func loopDevices() -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.filter { $0.hasPrefix("loop") }.sorted().compactMap { name in
            guard let backing = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8),
                  backing.hasPrefix(dir.path + "/") else { return nil }
            return "/dev/" + name
        }
    }

    func mounts() -> [MountInfo] { MountInfo.current().filter { $0.mountPoint.hasPrefix(dir.path + "/") } }

    /// Whether everything the test's managers held is gone: no mount and no
    /// loop device left (a detached device may linger while a udev probe holds
    /// it, so its going is waited for, up to 10 s).
    func allReleased() async -> Bool {
        await waitUntil(10, every: .milliseconds(50)) { loopDevices().isEmpty } && mounts().isEmpty
    }

    func cleanUp() {
        let runner = CommandRunner()
        for mount in mounts().reversed() { _ = try? runner.run("umount", ["-l", mount.mountPoint]) }
        for device in loopDevices() { _ = try? runner.run("losetup", ["-d", device]) }
        dir.remove()
        crashCleanup.dismiss()
    }

    static var isRoot: Bool { getuid() == 0 }
}
