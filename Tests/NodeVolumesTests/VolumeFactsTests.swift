import Foundation
import Metadata
import TestSupport
import Testing

/// Volume facts: `shardfs volume create` keeps capacity, free space, type, zone
/// and attachments with roles in the volume's metadata record, and `volume
/// list` shows the attachments' roles. Root only (a loop volume); the mounts
/// and loop devices under the test's folder go in `defer`.
@Suite(.serialized, .enabled(if: getuid() == 0, "loop devices and mounts need root"))
struct VolumeFactsTests {
    @Test func createRecordsFactsAndListShowsRoles() async throws {
        let dir = try TemporaryDirectory("facts")
        // The volume stays mounted and attached after the command: cleaned up
        // below, or by this guard if the test process dies first.
        let crashCleanup = try CrashCleanup(CrashCleanup.unmountAndDetach(under: dir.path))
        defer {
            let points = mountInfoText().split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
                .compactMap { $0.count > 4 && $0[4].hasPrefix(dir.path + "/") ? $0[4] : nil }
            for point in points.reversed() { _ = try? run("/usr/bin/umount", ["-l", point]) }
            let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
            for name in names where name.hasPrefix("loop") {
                if let backing = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8),
                   backing.hasPrefix(dir.path + "/") {
                    _ = try? run("/usr/sbin/losetup", ["-d", "/dev/\(name)"])
                }
            }
            dir.remove()
            crashCleanup.dismiss()
        }
        let config = try NodeConfigFile(nodeID: "n1", dataDir: dir.sub("data"),
                                        cloud: .init(provider: "loop", volumeSize: "64MiB", initialVolumes: 0))
            .write(to: dir.sub("shardfs.yaml"))
        let shardfs = productsDirectory().appendingPathComponent("shardfs").path
        let created = try await runAsync(shardfs, ["volume", "create", "--size", "32MiB", "--config", config])
        #expect(created.status == 0, "\(created.stderr)")
        let volume = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)

        let list = try await runAsync(shardfs, ["volume", "list", "--config", config])
        #expect(list.status == 0, "\(list.stderr)")
        let row = try #require(list.stdout.split(separator: "\n").first { $0.hasPrefix(volume) })
        let columns = row.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        #expect(columns.contains { $0.hasPrefix("n1:attached:primary@/dev/loop") }, "\(row)")
        #expect(columns.contains("32MiB") && columns.last == "n1")

        // The record, read with the node stopped.
        let store = try EmbeddedMetadataStore(path: dir.sub("data/metadata"))
        let facts = try #require(try await store.getVolume(volume).facts)
        #expect(facts.capacityBytes == 32 << 20 && facts.provider == "loop" && facts.type == "loop")
        #expect((facts.freeBytes ?? 0) > 16 << 20 && (facts.freeBytes ?? 0) < 32 << 20)
        #expect(facts.attachments.count == 1 && facts.attachments.first?.instanceID == "n1" && facts.attachments.first?.role == "primary")
        #expect(facts.attachments.first?.device.hasPrefix("/dev/loop") == true && facts.attachments.first?.state == "attached")
    }

    /// Records written before facts were kept decode with none; facts round-trip.
    @Test func recordsWithoutFactsStillDecode() throws {
        let old = #"{"volumeID":"vol-1","primaryNodeID":"n1","backupNodeIDs":["n2"],"mountPath":"/v/vol-1","epoch":3}"#
        let record = try JSONDecoder().decode(VolumeRecord.self, from: Data(old.utf8))
        #expect(record == VolumeRecord(volumeID: "vol-1", primaryNodeID: "n1", backupNodeIDs: ["n2"], mountPath: "/v/vol-1", epoch: 3))
        #expect(record.facts == nil)
        var withFacts = record
        withFacts.facts = VolumeFacts(capacityBytes: 1 << 30, freeBytes: 1 << 29, provider: "aws", type: "io2", zone: "us-east-1a",
                                      attachments: [.init(instanceID: "i-1", role: "primary", state: "attached", device: "/dev/sdf")],
                                      updatedAt: 1_700_000_000)
        #expect(try JSONDecoder().decode(VolumeRecord.self, from: JSONEncoder().encode(withFacts)) == withFacts)
    }
}
