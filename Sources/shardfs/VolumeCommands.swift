import ArgumentParser
import Foundation
import Metadata
import ShardNode
import Volumes

/// `shardfs volume …`: volumes through the configured provider (cloud.provider).
/// create, list and delete start the node, as the shard commands do (they need
/// the metadata); attach and detach use only the provider and the volume
/// manager, so a node's open shards never keep the volume busy here.
struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume",
        abstract: "Create, list, attach, detach and delete volumes.",
        subcommands: [Create.self, List.self, Attach.self, Detach.self, Delete.self, AddBackup.self, Promote.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a volume, register this node as its primary and mount it; prints its ID.")
        @OptionGroup var node: NodeOptions
        @Option(name: .long, help: "Size, e.g. 100GiB (default cloud.volume_size).") var size: String?
        @Option(name: .long, help: "Volume type, e.g. io2 or cloud_essd (default cloud.volume_type).") var type: String?
        @Option(name: .long, help: "Provisioned IOPS (default cloud.iops).") var iops: Int?

        func run() async throws {
            let node = try await node.startNode(creatingDataFolder: true)
            var spec = StorageNode.volumeSpec(node.configuration)
            if let size {
                guard let bytes = ByteSize.parse(size) else { throw ValidationError("--size takes a size like 100GiB, not \(size)") }
                spec.sizeBytes = bytes
            }
            if let type { spec.type = type }
            if let iops { spec.iops = iops }
            let created = try await node.volumes.provider.createVolume(spec)
            let mounted = try await node.volumes.mount(created.volumeID, readOnly: false)
            let facts = await StorageNode.facts(of: created.volumeID, volumes: node.volumes) ?? nil
            try await node.metadata.registerVolume(VolumeRecord(volumeID: created.volumeID, primaryNodeID: node.configuration.node.nodeID,
                                                                mountPath: mounted.mountPath, facts: facts))
            emit(created.volumeID)
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the provider's volumes: state, size, type, zone, attachments with roles, where this node mounts them, free space, primary.")
        @OptionGroup var node: NodeOptions
        @OptionGroup var output: JSONOption

        func run() async throws {
            let node = try await node.startNode()
            let volumes = try await node.volumes.provider.listVolumes()
            let records = Dictionary(try await node.metadata.listVolumes(nodeID: nil).map { ($0.volumeID, $0) }, uniquingKeysWith: { a, _ in a })
            let mounted = Dictionary(node.volumes.mountedVolumes().map { ($0.volumeID, $0) }, uniquingKeysWith: { a, _ in a })
            var rows: [[String: Any]] = []
            if !output.json { emit(row("VOLUME", "STATE", "SIZE", "TYPE", "ZONE", "ATTACHMENTS", "MOUNTED", "FREE", "PRIMARY")) }
            let me = node.configuration.node.nodeID, mine = StorageNode.instanceID(of: node.volumes)
            for v in volumes {
                let record = records[v.volumeID]
                // This instance's role is the metadata's; another's is what the block layer
                // says (read-only: backup; loop read-write: primary), else what the facts recorded.
                let attachments = v.attachments.map { a -> String in
                    var role = a.instanceID == mine && record != nil ? (record?.primaryNodeID == me ? "primary" : "backup")
                        : StorageNode.blockRole(a, provider: node.volumes.provider.name)
                    if role.isEmpty { role = record?.facts?.attachments.first { $0.instanceID == a.instanceID }?.role ?? "" }
                    return "\(a.instanceID):\(a.state.rawValue):\(role.isEmpty ? "?" : role)" + (a.device.isEmpty ? "" : "@\(a.device)")
                }
                let here = mounted[v.volumeID]
                let free = here.flatMap { try? node.volumes.freeBytes($0.volumeID) } ?? record?.facts?.freeBytes
                let size = v.sizeBytes > 0 ? v.sizeBytes : record?.facts?.capacityBytes ?? 0
                if output.json {
                    var r: [String: Any] = ["volume": v.volumeID, "state": v.state.rawValue, "sizeBytes": size, "type": v.type,
                                            "zone": v.availabilityZone, "attachments": attachments,
                                            "primary": record?.primaryNodeID ?? "", "registered": record != nil]
                    if let here { r["mountPath"] = here.mountPath; r["readOnly"] = here.readOnly }
                    if let free { r["freeBytes"] = free }
                    rows.append(r)
                    continue
                }
                emit(row(v.volumeID, v.state.rawValue, size > 0 ? ByteSize.format(size) : "-", v.type.isEmpty ? "-" : v.type,
                         v.availabilityZone.isEmpty ? "-" : v.availabilityZone, attachments.isEmpty ? "-" : attachments.joined(separator: ","),
                         here.map { $0.mountPath + ($0.readOnly ? " (ro)" : "") } ?? "-", free.map(ByteSize.format) ?? "-",
                         record.map { $0.primaryNodeID.isEmpty ? "-" : $0.primaryNodeID } ?? "(unregistered)"))
            }
            if output.json { try output.emit(rows) }
        }

        func row(_ columns: String...) -> String {
            zip(columns, [22, 10, 8, 10, 12, 24, 30, 8, 10]).map { $0.padding(toLength: max($1, $0.count), withPad: " ", startingAt: 0) }
                .joined(separator: " ").trimmingCharacters(in: .whitespaces)
        }
    }

    struct Attach: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Attach a volume to this node and mount it; prints the mount path.")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Volume ID.") var volumeID: String
        @Flag(name: .long, help: "Attach and mount read-only (as a backup does).") var readOnly = false

        func run() async throws {
            let volumes = try await VolumeCommand.manager(node)
            emit(try await volumes.mount(volumeID, readOnly: readOnly).mountPath)
        }
    }

    struct Detach: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Unmount a volume and detach it from this node.")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Volume ID.") var volumeID: String

        func run() async throws {
            try await VolumeCommand.manager(node).detach(volumeID)
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a volume that holds no shards: detach it here, delete it, unregister it.")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Volume ID.") var volumeID: String

        func run() async throws {
            let node = try await node.startNode()
            let shards = try await node.metadata.listShards(volumeID: volumeID)
            guard shards.isEmpty else {
                throw ValidationError("volume \(volumeID) holds \(shards.count) shard(s) (\(shards.prefix(5).map { String($0.shardID) }.joined(separator: ", "))); "
                                      + "delete them first")
            }
            try await node.volumes.detach(volumeID)
            try await node.volumes.provider.deleteVolume(volumeID)
            if (try? await node.metadata.getVolume(volumeID)) != nil { try await node.metadata.unregisterVolume(volumeID) }
        }
    }

    struct AddBackup: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add-backup",
            abstract: "Make a node a backup of a volume: it attaches the volume read-only and serves views of its shards (at once if it runs).")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Volume ID.") var volumeID: String
        @Option(name: .long, help: "The backup node's ID (default: this node's).") var backup: String?

        func run() async throws {
            let config = try node.configuration()
            let metadata = try StorageNode.openMetadata(config)
            let backup = self.backup ?? config.node.nodeID
            let volume = try await metadata.getVolume(volumeID)
            guard volume.primaryNodeID != backup else {
                throw ValidationError("node \(backup) is the primary of volume \(volumeID); a primary cannot also be its backup")
            }
            try await metadata.addBackup(volumeID: volumeID, nodeID: backup)
            emit("volume \(volumeID): primary \(volume.primaryNodeID), backups \((volume.backupNodeIDs + [backup]).uniqued().joined(separator: ", "))")
        }
    }

    struct Promote: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a backup of a volume its primary now (the node, running, cuts the old primary off the storage and takes over).")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Volume ID.") var volumeID: String
        @Option(name: .long, help: "The backup to promote (default: this node).") var to: String?

        func run() async throws {
            let config = try node.configuration()
            let metadata = try StorageNode.openMetadata(config)
            let target = to ?? config.node.nodeID
            let volume = try await metadata.getVolume(volumeID)
            guard volume.backupNodeIDs.contains(target) else {
                throw ValidationError("node \(target) is not a backup of volume \(volumeID) (backups: "
                                      + "\(volume.backupNodeIDs.isEmpty ? "none" : volume.backupNodeIDs.joined(separator: ", ")))")
            }
            let won = try await metadata.updatePrimary(volumeID: volumeID, nodeID: target, expectedEpoch: volume.epoch)
            emit("volume \(volumeID): primary \(won.primaryNodeID) at epoch \(won.epoch) (was \(volume.primaryNodeID))")
        }
    }

    /// The configured provider's volume manager, without starting the node.
    static func manager(_ options: NodeOptions) async throws -> any VolumeManager {
        let config = try options.configuration()
        return try await StorageNode.volumeManager(config, provider: try StorageNode.cloudProvider(config))
    }

}

extension Array where Element: Hashable {
    /// The elements in order, each once.
    func uniqued() -> [Element] {
        var seen = Set<Element>()
        return filter { seen.insert($0).inserted }
    }
}
