import Foundation

/// The embedded default: each volume is a folder `<volume root>/<volumeID>`.
/// Attaching is a no-op (every "instance" sees the folder); size is not enforced
/// by the folder (each shard enforces its own limit).
public struct FolderCloudProvider: CloudProvider {
    public let name = "folder"
    public let volumeRoot: String

    public init(volumeRoot: String) { self.volumeRoot = volumeRoot }

    public func createVolume(sizeBytes: Int, multiAttach: Bool) async throws -> CloudVolume {
        var id: String
        repeat {
            id = "vol-" + String(UInt32.random(in: 0...UInt32.max), radix: 16).leftPadded(to: 8)
        } while FileManager.default.fileExists(atPath: path(id))
        try createFolder(id)
        return CloudVolume(volumeID: id, sizeBytes: sizeBytes, multiAttach: multiAttach)
    }

    /// Creates the folder for a volume whose ID the caller chose.
    public func createVolume(id: String) throws -> CloudVolume {
        try Self.validate(id)
        guard !FileManager.default.fileExists(atPath: path(id)) else { throw VolumeError.alreadyExists(id) }
        try createFolder(id)
        return CloudVolume(volumeID: id, sizeBytes: 0)
    }

    public func deleteVolume(_ volumeID: String) async throws {
        try Self.validate(volumeID)
        guard FileManager.default.fileExists(atPath: path(volumeID)) else { throw VolumeError.notFound(volumeID) }
        do { try FileManager.default.removeItem(atPath: path(volumeID)) } catch {
            throw VolumeError.failed("cannot remove \(path(volumeID)): \(error.localizedDescription)")
        }
    }

    public func attachVolume(_ volumeID: String, instanceID: String) async throws -> String {
        try Self.validate(volumeID)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path(volumeID), isDirectory: &isDirectory), isDirectory.boolValue else {
            throw VolumeError.notFound(volumeID)
        }
        return path(volumeID)
    }

    public func detachVolume(_ volumeID: String, instanceID: String) async throws {
        _ = try await attachVolume(volumeID, instanceID: instanceID)
    }

    public func describeVolume(_ volumeID: String) async throws -> CloudVolume {
        _ = try await attachVolume(volumeID, instanceID: "")
        return CloudVolume(volumeID: volumeID, sizeBytes: 0)
    }

    public func listVolumes() async throws -> [CloudVolume] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: volumeRoot)) ?? []
        return names.filter { Self.problem(with: $0) == nil }.sorted().map { CloudVolume(volumeID: $0, sizeBytes: 0) }
    }

    func path(_ id: String) -> String { volumeRoot + "/" + id }

    private func createFolder(_ id: String) throws {
        do { try FileManager.default.createDirectory(atPath: path(id), withIntermediateDirectories: true) } catch {
            throw VolumeError.failed("cannot create \(path(id)): \(error.localizedDescription)")
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
        let source = try await provider.attachVolume(volumeID, instanceID: instanceID)
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
        var st = statvfs()
        guard statvfs(volume.mountPath, &st) == 0 else {
            throw VolumeError.failed("statvfs \(volume.mountPath): \(String(cString: strerror(errno)))")
        }
        return Int(st.f_bavail) * Int(st.f_frsize)
    }
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
