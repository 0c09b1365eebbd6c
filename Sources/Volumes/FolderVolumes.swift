import Foundation

/// The embedded default: each volume is a folder `<volume root>/<volumeID>`.
/// Attaching is a no-op (every "instance" sees the folder); size is not enforced
/// by the folder (each shard enforces its own limit).
public struct FolderCloudProvider: CloudProvider {
    public let name = "folder"
    public let volumeRoot: String

    public init(volumeRoot: String) { self.volumeRoot = volumeRoot }

    /// A new folder with a random ID. The folder has no size, type or tags of
    /// its own, so those fields of `spec` are not kept.
    public func createVolume(_ spec: VolumeSpec) async throws -> CloudVolume {
        var id: String
        repeat {
            id = "vol-" + String(UInt32.random(in: 0...UInt32.max), radix: 16).leftPadded(to: 8)
        } while FileManager.default.fileExists(atPath: path(id))
        try createFolder(id)
        return CloudVolume(volumeID: id, sizeBytes: spec.sizeBytes, type: name, multiAttach: spec.multiAttach)
    }

    /// Creates the folder for a volume whose ID the caller chose.
    public func createVolume(id: String) throws -> CloudVolume {
        try Self.validate(id)
        guard !FileManager.default.fileExists(atPath: path(id)) else { throw VolumeError.alreadyExists(id) }
        try createFolder(id)
        return CloudVolume(volumeID: id, sizeBytes: 0, type: name)
    }

    public func deleteVolume(_ volumeID: String) async throws {
        try requireFolder(volumeID)
        do { try FileManager.default.removeItem(atPath: path(volumeID)) } catch {
            throw VolumeError.failed("cannot remove \(path(volumeID)): \(error.localizedDescription)")
        }
    }

    /// Every instance of this host sees the folder: attaching only checks it is there.
    public func attachVolume(_ volumeID: String, instanceID: String, readOnly: Bool) async throws -> VolumeAttachment {
        try requireFolder(volumeID)
        return VolumeAttachment(instanceID: instanceID, state: .attached, device: path(volumeID), readOnly: readOnly)
    }

    public func detachVolume(_ volumeID: String, instanceID: String) async throws {
        try requireFolder(volumeID)
    }

    /// A folder cannot be taken from anyone: every process of the host keeps it.
    /// Fencing a folder volume's writer is the metadata's epoch check alone.
    public func forceDetachVolume(_ volumeID: String, instanceID: String) async throws {
        throw VolumeError.invalidArgument("folder volume \(volumeID) cannot be detached from \(instanceID) by force: "
                                          + "a folder has no attachment to cut")
    }

    /// Folders sorted by ID; the page token is the last ID of the previous page.
    public func describeVolumes(_ volumeIDs: [String], nextToken: String?, maxResults: Int?) async throws -> VolumePage {
        var ids: [String]
        if volumeIDs.isEmpty {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: volumeRoot)) ?? []
            ids = names.filter { Self.problem(with: $0) == nil && isFolder($0) }.sorted()
        } else {
            for id in volumeIDs { try requireFolder(id) }
            ids = volumeIDs.sorted()
        }
        if let nextToken { ids = ids.filter { $0 > nextToken } }
        let page = maxResults.map { Array(ids.prefix(max(1, $0))) } ?? ids
        let more = page.count < ids.count
        return VolumePage(volumes: page.map { CloudVolume(volumeID: $0, sizeBytes: 0, type: name) },
                          nextToken: more ? page.last : nil)
    }

    /// The folder itself is what the manager uses.
    public func localDevice(of volumeID: String, instanceID: String) async throws -> String? {
        try Self.validate(volumeID)
        return isFolder(volumeID) ? path(volumeID) : nil
    }

    private func isFolder(_ id: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path(id), isDirectory: &isDirectory) && isDirectory.boolValue
    }

    private func requireFolder(_ id: String) throws {
        try Self.validate(id)
        guard isFolder(id) else { throw VolumeError.notFound(id) }
    }

    func path(_ id: String) -> String { volumeRoot + "/" + id }

    private func createFolder(_ id: String) throws {
        do { try FileManager.default.createDirectory(atPath: path(id), withIntermediateDirectories: true) } catch {
            throw VolumeError.failed("cannot create \(path(id)): \(error.localizedDescription)")
        }
        // The volume is recorded in the metadata next: its folder must survive a crash first.
        let fd = open(volumeRoot, O_RDONLY | O_DIRECTORY)
        defer { if fd >= 0 { close(fd) } }
        guard fd >= 0, fsync(fd) == 0 else {
            throw VolumeError.failed("cannot fsync \(volumeRoot) after creating \(id): \(String(cString: strerror(errno)))")
        }
    }

    /// Volume IDs become folder names: letters, digits, '-', '_' and '.', 1–64 characters, not starting with '.'.
    public static func problem(with id: String) -> String? {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        if id.isEmpty || id.count > 64 { return "a volume ID has 1–64 characters" }
        if id.first == "." || !id.allSatisfy(allowed.contains) { return "a volume ID uses letters, digits, '-', '_' and '.', and does not start with '.'" }
        return nil
    }

    static func validate(_ id: String) throws {
        if let problem = problem(with: id) { throw VolumeError.invalidArgument("\"\(id)\": \(problem)") }
    }
}

/// Mounts volumes whose provider hands back a folder (folder volumes): the folder
/// already is `<volume root>/<volumeID>`, so mounting records it and checks it is there.
public final class LocalVolumeManager: VolumeManager, @unchecked Sendable {
    public let volumeRoot: String
    public let provider: any CloudProvider
    public let instanceID: String
    private let lock = NSLock()
    private var mounted: [String: MountedVolume] = [:]

    public init(provider: any CloudProvider, volumeRoot: String, instanceID: String) {
        self.provider = provider
        self.volumeRoot = volumeRoot
        self.instanceID = instanceID
    }

    public func mount(_ volumeID: String, readOnly: Bool) async throws -> MountedVolume {
        let target = volumeRoot + "/" + volumeID
        _ = try await provider.attachVolume(volumeID, instanceID: instanceID, readOnly: readOnly)
        guard let source = try await provider.localDevice(of: volumeID, instanceID: instanceID) else {
            throw VolumeError.failed("provider \(provider.name) attached \(volumeID) but it is not visible on this host")
        }
        guard URL(fileURLWithPath: source).standardized.path == URL(fileURLWithPath: target).standardized.path else {
            throw VolumeError.failed("provider \(provider.name) attached \(volumeID) as \(source); this manager mounts only folders")
        }
        let volume = MountedVolume(volumeID: volumeID, mountPath: target, readOnly: readOnly)
        lock.withLock { mounted[volumeID] = volume }
        return volume
    }

    public func unmount(_ volumeID: String) async throws {
        guard lock.withLock({ mounted.removeValue(forKey: volumeID) }) != nil else { throw VolumeError.notMounted(volumeID) }
    }

    public func mountedVolumes() -> [MountedVolume] {
        lock.withLock { mounted.values.sorted { $0.volumeID < $1.volumeID } }
    }

    public func freeBytes(_ volumeID: String) throws -> Int {
        guard let volume = lock.withLock({ mounted[volumeID] }) else { throw VolumeError.notMounted(volumeID) }
        return try availableBytes(at: volume.mountPath)
    }

    /// Folders have nothing to unmount or detach: forgets them.
    public func releaseAll() async throws {
        lock.withLock { mounted.removeAll() }
    }
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
