import ArgumentParser
import Foundation
import ShardNode
import ShardStore

struct ShardCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shard",
        abstract: "Create, close, delete, list and inspect shards.",
        subcommands: [New.self, Close.self, Delete.self, List.self, Stat.self]
    )

    struct New: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a shard owned by a client; prints its ID.")
        @OptionGroup var node: NodeOptions
        @OptionGroup var client: ClientOption
        @Option(name: .long, help: "Ask for this shard ID (it must be above every ID handed out so far).")
        var id: UInt64?

        func run() async throws {
            let node = try await node.startNode(creatingDataFolder: true)
            let shard = try await node.shards.newShard(owner: try client.clientID(), id: id)
            emit(String(shard.id))
        }
    }

    struct Close: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Close a shard: read-only forever.")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Shard ID.") var shardID: UInt64

        func run() async throws {
            try await node.startNode().shards.closeShard(shardID)
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a shard and all its entries.")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Shard ID.") var shardID: UInt64

        func run() async throws {
            try await node.startNode().shards.deleteShard(shardID)
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List every shard the metadata knows: ID, state, owner, node, volume, entries, used and limit.",
            discussion: "Entries and used bytes are shown for shards on this node's volumes, '-' for others.")
        @OptionGroup var node: NodeOptions
        @OptionGroup var output: JSONOption

        func run() async throws {
            let listings = try await node.startNode().shards.listShards()
            if output.json {
                try output.emit(listings.map { listing -> [String: Any] in
                    var row: [String: Any] = ["id": listing.record.shardID, "state": listing.record.state.rawValue,
                                              "owner": listing.record.ownerClientID, "node": listing.primaryNodeID,
                                              "volume": listing.record.volumeID, "limitBytes": listing.record.sizeLimit]
                    if let stats = listing.stats { row["entries"] = stats.entries; row["usedBytes"] = stats.usedBytes }
                    return row
                })
                return
            }
            emit(row("ID", "STATE", "OWNER", "NODE", "VOLUME", "ENTRIES", "USED", "LIMIT"))
            for listing in listings {
                let r = listing.record
                emit(row(String(r.shardID), r.state.rawValue, r.ownerClientID,
                         listing.primaryNodeID.isEmpty ? "-" : listing.primaryNodeID, r.volumeID,
                         listing.stats.map { String($0.entries) } ?? "-",
                         listing.stats.map { ByteSize.format($0.usedBytes) } ?? "-",
                         ByteSize.format(r.sizeLimit)))
            }
        }

        func row(_ columns: String...) -> String {
            zip(columns, [8, 8, 16, 10, 14, 10, 10, 8]).map { $0.padding(toLength: max($1, $0.count), withPad: " ", startingAt: 0) }
                .joined(separator: " ").trimmingCharacters(in: .whitespaces)
        }
    }

    struct Stat: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a shard's state, owner, volume and figures.")
        @OptionGroup var node: NodeOptions
        @Argument(help: "Shard ID.") var shardID: UInt64
        @OptionGroup var output: JSONOption

        func run() async throws {
            let node = try await node.startNode()
            let record = try await node.metadata.getShard(shardID)
            let stats = try await node.shards.stats(shardID)
            let primary = (try? await node.metadata.getVolume(record.volumeID).primaryNodeID).flatMap { $0.isEmpty ? nil : $0 } ?? "-"
            if output.json {
                try output.emit(["id": stats.id, "state": stats.state.rawValue, "owner": stats.owner, "volume": record.volumeID,
                                 "node": primary == "-" ? "" : primary, "entries": stats.entries, "usedBytes": stats.usedBytes,
                                 "limitBytes": stats.limitBytes] as [String: Any])
                return
            }
            emit("""
                shard:   \(stats.id)
                state:   \(stats.state.rawValue)
                owner:   \(stats.owner)
                volume:  \(record.volumeID)
                node:    \(primary)
                entries: \(stats.entries)
                used:    \(stats.usedBytes) bytes (\(ByteSize.format(stats.usedBytes)))
                limit:   \(stats.limitBytes) bytes (\(ByteSize.format(stats.limitBytes)))
                """)
        }
    }
}
