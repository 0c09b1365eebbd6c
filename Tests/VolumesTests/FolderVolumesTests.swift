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
        #expect(try await provider.attachVolume("vol-b", instanceID: "i-1").device == dir.sub("vol-b"))
        #expect(try await provider.localDevice(of: "vol-b", instanceID: "i-1") == dir.sub("vol-b"))
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

    @Test func describePagesThroughEveryFolder() async throws {
        let dir = try TemporaryDirectory("volumes")
        let provider = FolderCloudProvider(volumeRoot: dir.path)
        for id in ["v1", "v2", "v3", "v4", "v5"] { _ = try provider.createVolume(id: id) }
        let first = try await provider.describeVolumes([], nextToken: nil, maxResults: 2)
        #expect(first.volumes.map(\.volumeID) == ["v1", "v2"])
        let second = try await provider.describeVolumes([], nextToken: first.nextToken, maxResults: 2)
        #expect(second.volumes.map(\.volumeID) == ["v3", "v4"])
        let last = try await provider.describeVolumes([], nextToken: second.nextToken, maxResults: 2)
        #expect(last.volumes.map(\.volumeID) == ["v5"] && last.nextToken == nil)
        #expect(try await provider.listVolumes(pageSize: 2).map(\.volumeID) == ["v1", "v2", "v3", "v4", "v5"])
        await #expect(throws: VolumeError.notFound("v9")) { _ = try await provider.describeVolume("v9") }
    }
}
