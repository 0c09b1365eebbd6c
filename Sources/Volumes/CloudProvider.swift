// The volume layer: a cloud provider creates and attaches block volumes; the
// volume manager makes attached volumes usable at `<volume root>/<volumeID>`.
// The embedded default treats plain folders as volumes; loop devices, AWS EBS
// and Aliyun ESSD implement the same protocols.

/// A volume as the provider sees it.
public struct CloudVolume: Sendable, Equatable {
    public var volumeID: String
    public var sizeBytes: Int
    /// Instance IDs the volume is attached to.
    public var attachments: [String]
    public var multiAttach: Bool

    public init(volumeID: String, sizeBytes: Int, attachments: [String] = [], multiAttach: Bool = true) {
        self.volumeID = volumeID
        self.sizeBytes = sizeBytes
        self.attachments = attachments
        self.multiAttach = multiAttach
    }
}

public enum VolumeError: Error, Equatable, Sendable, CustomStringConvertible {
    case notFound(String)
    case alreadyExists(String)
    case invalidArgument(String)
    case notMounted(String)
    case failed(String)

    public var description: String {
        switch self {
        case .notFound(let s): return "volume not found: \(s)"
        case .alreadyExists(let s): return "volume already exists: \(s)"
        case .invalidArgument(let s): return "invalid volume request: \(s)"
        case .notMounted(let s): return "volume not mounted: \(s)"
        case .failed(let s): return "volume operation failed: \(s)"
        }
    }
}

/// Creates, attaches and deletes volumes (the cloud's block-storage API).
public protocol CloudProvider: Sendable {
    /// Short name for logs and configuration ("folder", "loop", "aws", "aliyun").
    var name: String { get }
    func createVolume(sizeBytes: Int, multiAttach: Bool) async throws -> CloudVolume
    func deleteVolume(_ volumeID: String) async throws
    /// Attaches the volume to the instance; returns what to mount: a device path,
    /// or for folder volumes the folder itself.
    func attachVolume(_ volumeID: String, instanceID: String) async throws -> String
    func detachVolume(_ volumeID: String, instanceID: String) async throws
    func describeVolume(_ volumeID: String) async throws -> CloudVolume
    func listVolumes() async throws -> [CloudVolume]
}

/// A volume usable on this node.
public struct MountedVolume: Sendable, Equatable {
    public var volumeID: String
    /// `<volume root>/<volumeID>`.
    public var mountPath: String
    /// Backup nodes mount read-only.
    public var readOnly: Bool

    public init(volumeID: String, mountPath: String, readOnly: Bool) {
        self.volumeID = volumeID
        self.mountPath = mountPath
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
}
