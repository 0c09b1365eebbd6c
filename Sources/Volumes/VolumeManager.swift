import Foundation
/// A volume usable on this node.
public struct MountedVolume: Sendable, Equatable {
    public var volumeID: String
    /// `<volume root>/<volumeID>`.
    public var mountPath: String
    /// Backup nodes mount read-only.
    public var readOnly: Bool
    /// The block device mounted there; empty for folder volumes.
    public var device: String

    public init(volumeID: String, mountPath: String, readOnly: Bool, device: String = "") {
        self.volumeID = volumeID
        self.mountPath = mountPath
        self.readOnly = readOnly
        self.device = device
    }
}

/// A volume attached to this node and not mounted: a backup reads its device.
public struct AttachedVolume: Sendable, Equatable {
    public var volumeID: String
    /// The local block device (`/dev/loop3`, `/dev/nvme1n1`).
    public var device: String
    public var readOnly: Bool

    public init(volumeID: String, device: String, readOnly: Bool) {
        self.volumeID = volumeID
        self.device = device
        self.readOnly = readOnly
    }
}

/// Attaches and mounts volumes on this node.
public protocol VolumeManager: Sendable {
    var volumeRoot: String { get }
    var provider: any CloudProvider { get }
    /// Attaches the volume to this node and mounts it at `<volume root>/<volumeID>`.
    func mount(_ volumeID: String, readOnly: Bool) async throws -> MountedVolume
    func unmount(_ volumeID: String) async throws
    func mountedVolumes() -> [MountedVolume]
    /// Bytes free for new data on the mounted volume.
    func freeBytes(_ volumeID: String) throws -> Int
    /// A clean stop: unmounts and detaches (from this instance) every volume
    /// this manager holds; throws the first failure after trying them all.
    func releaseAll() async throws
}

extension VolumeManager {
    /// Unmounts the volume if it is mounted here and, for a block volume,
    /// detaches it from this instance (waiting until the cloud says it is).
    public func detach(_ volumeID: String) async throws {
        if let block = self as? BlockVolumeManager {
            try await block.detach(volumeID)
        } else if mountedVolumes().contains(where: { $0.volumeID == volumeID }) {
            try await unmount(volumeID)
        }
    }
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
func availableBytes(at path: String) throws -> Int {
    var st = statvfs()
    guard statvfs(path, &st) == 0 else {
        throw VolumeError.failed("statvfs \(path): \(String(cString: strerror(errno)))")
    }
    return Int(st.f_bavail) * Int(st.f_frsize)
}
