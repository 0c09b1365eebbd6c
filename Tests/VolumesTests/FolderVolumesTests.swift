import Foundation
import TestSupport
import Testing
import Volumes

@Suite struct FolderVolumesTests {
    @Test func createAttachListDelete() async throws {
        let dir = try TemporaryDirectory("volumes")
        let provider = FolderCloudProvider(volumeRoot: dir.path)
        let a = try await provider.createVolume(sizeBytes: 0, multiAttach: true)
        let b = try provider.createVolume(id: "vol-b")
        #expect(try await provider.listVolumes().map(\.volumeID) == [a.volumeID, "vol-b"].sorted())
        #expect(try await provider.attachVolume("vol-b", instanceID: "i-1") == dir.sub("vol-b"))
        #expect(throws: VolumeError.alreadyExists("vol-b")) { _ = try provider.createVolume(id: "vol-b") }
        try await provider.deleteVolume(b.volumeID)
        await #expect(throws: VolumeError.notFound("vol-b")) { _ = try await provider.attachVolume("vol-b", instanceID: "i-1") }
    }

    @Test(arguments: ["", "../escape", ".hidden", "a/b", String(repeating: "v", count: 65)])
    func invalidVolumeIDsAreRefused(_ id: String) async throws {
        let dir = try TemporaryDirectory("volumes")
        let provider = FolderCloudProvider(volumeRoot: dir.path)
        #expect(throws: VolumeError.self) { _ = try provider.createVolume(id: id) }
        await #expect(throws: VolumeError.self) { _ = try await provider.attachVolume(id, instanceID: "i") }
    }

    @Test func managerMountsFoldersAndReportsFreeSpace() async throws {
        let dir = try TemporaryDirectory("volumes")
        let provider = FolderCloudProvider(volumeRoot: dir.path)
        _ = try provider.createVolume(id: "v1")
        let manager = LocalVolumeManager(provider: provider, volumeRoot: dir.path, instanceID: "i-1")
        let mounted = try await manager.mount("v1", readOnly: true)
        #expect(mounted == MountedVolume(volumeID: "v1", mountPath: dir.sub("v1"), readOnly: true))
        #expect(manager.mountedVolumes() == [mounted])
        #expect(try manager.freeBytes("v1") > 0)
        try await manager.unmount("v1")
        #expect(manager.mountedVolumes().isEmpty)
        await #expect(throws: VolumeError.notMounted("v1")) { try await manager.unmount("v1") }
        #expect(throws: VolumeError.notMounted("v1")) { _ = try manager.freeBytes("v1") }
        await #expect(throws: VolumeError.notFound("missing")) { _ = try await manager.mount("missing", readOnly: false) }
    }
}
