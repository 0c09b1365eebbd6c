import ArgumentParser
import Foundation
import Glibc
import Logging
import ShardNode

@main
struct ShardFS: AsyncParsableCommand {
    /// `mount.fuse3 SRC MNT -t shardfs -o …` (what `mount -t fuse.shardfs` and an
    /// fstab line run) calls `shardfs SRC MNT -o …`: that form means `mount`.
    static func main() async {
        var arguments = Array(CommandLine.arguments.dropFirst())
        let names = configuration.subcommands.compactMap { $0.configuration.commandName } + ["help"]
        if let first = arguments.first, !first.hasPrefix("-"), !names.contains(first) {
            // Only a DATA MNT pair of paths is a mount: a mistyped command must
            // never mount anything.
            guard arguments.count >= 2, looksLikePath(first), looksLikePath(arguments[1]) else {
                let guess = names.min { editDistance($0, first) < editDistance($1, first) }
                let hint = guess.map { editDistance($0, first) <= 2 ? " Did you mean '\($0)'?" : "" } ?? ""
                FileHandle.standardError.write(Data("Error: unknown command '\(first)'.\(hint) See 'shardfs --help'.\n".utf8))
                Glibc.exit(64)  // EX_USAGE
            }
            arguments.insert("mount", at: 0)
        }
        do {
            var command = try parseAsRoot(arguments)
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }

    static let configuration = CommandConfiguration(
        commandName: "shardfs",
        abstract: "ShardFS: shards of entries on cloud block volumes.",
        discussion: """
            Shards are segments of entries written by one client. Each shard is an LMDB \
            environment at <volume root>/<volumeID>/shard-<id>. These commands work on a \
            node's local data folder (--data-dir, default ./data).
            """,
        version: ShardFSVersion.string,
        subcommands: [
            DemoCommand.self, ShardCommand.self,
            PutCommand.self, BatchPutCommand.self, GetCommand.self, ListCommand.self, RemoveCommand.self, MoveCommand.self, FindCommand.self,
            MountCommand.self, ServeCommand.self, StatusCommand.self, ClientCommand.self, VolumeCommand.self,
        ]
    )
}

/// Options every command that opens a node takes. Precedence: flags, then the
/// environment, then the YAML file, then defaults.
struct NodeOptions: ParsableArguments {
    @Option(name: .long, help: "YAML configuration file (see config/example.yaml). Also SHARDFS_CONFIG.")
    var config: String?

    @Option(name: .long, help: "The node's data folder (node.data_dir).")
    var dataDir: String?

    @Option(name: .long, help: "This node's ID (node.node_id, NODE_ID).")
    var nodeID: String?

    @Option(name: .long, help: "Size limit of new shards, e.g. 2GiB (shard.size_limit).")
    var sizeLimit: String?

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical (log.level).")
    var logLevel: String?

    @Option(name: .long, help: "embedded or etcd (metadata.type).")
    var metadataType: String?

    @Option(name: .long, help: "etcd endpoints, comma-separated (metadata.endpoints).")
    var metadataEndpoints: String?

    @Option(name: .long, help: "Key prefix in etcd (metadata.namespace).")
    var metadataNamespace: String?

    func configuration() throws -> Configuration {
        let environment = ProcessInfo.processInfo.environment
        var config = try Configuration.load(file: config ?? environment["SHARDFS_CONFIG"].flatMap { $0.isEmpty ? nil : $0 },
                                            environment: environment)
        if let dataDir { try config.set("node.data_dir", dataDir) }
        if let nodeID { try config.set("node.node_id", nodeID) }
        if let sizeLimit { try config.set("shard.size_limit", sizeLimit) }
        if let logLevel { try config.set("log.level", logLevel) }
        if let metadataType { try config.set("metadata.type", metadataType) }
        if let metadataEndpoints { try config.set("metadata.endpoints", metadataEndpoints) }
        if let metadataNamespace { try config.set("metadata.namespace", metadataNamespace) }
        try config.validate()
        return config
    }

    /// Loads the configuration, bootstraps logging and starts the node.
    /// `creatingDataFolder`: this command may make a new node's folder (serve,
    /// shard new, volume create, demo); the others need an existing one.
    func startNode(creatingDataFolder: Bool = false) async throws -> StorageNode {
        let config = try configuration()
        Log.bootstrap(level: config.logLevel)
        return try await StorageNode.start(config, createDataFolder: creatingDataFolder)
    }
}

/// The client ID that writes: --client or SHARDFS_CLIENT_ID.
struct ClientOption: ParsableArguments {
    @Option(name: .long, help: "Client ID of the writer (the shard's owner). Also SHARDFS_CLIENT_ID.")
    var client: String?

    func clientID() throws -> String {
        if let client, !client.isEmpty { return client }
        if let env = ProcessInfo.processInfo.environment["SHARDFS_CLIENT_ID"], !env.isEmpty { return env }
        throw ValidationError("a client ID is required: pass --client or set SHARDFS_CLIENT_ID")
    }
}

enum Log {
    nonisolated(unsafe) private static var done = false
    private static let lock = NSLock()

    /// swift-log is bootstrapped once per process, to standard error.
    static func bootstrap(level: String) {
        lock.withLock {
            guard !done else { return }
            done = true
            let parsed = Logger.Level(rawValue: level) ?? .info
            LoggingSystem.bootstrap { label in
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = parsed
                return handler
            }
        }
    }
}

/// Writes to standard output without buffering surprises.
func emit(_ text: String) {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}

/// A path as mount.fuse3 passes one: with a slash, or an existing directory.
private func looksLikePath(_ argument: String) -> Bool {
    var isDirectory: ObjCBool = false
    return argument.contains("/") || (FileManager.default.fileExists(atPath: argument, isDirectory: &isDirectory) && isDirectory.boolValue)
}

/// Levenshtein distance, for suggesting the command meant.
private func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    var row = Array(0...b.count)
    for i in 1...max(1, a.count) where !a.isEmpty {
        var previous = row[0]
        row[0] = i
        for j in 1...max(1, b.count) where !b.isEmpty {
            let current = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (a[i - 1] == b[j - 1] ? 0 : 1))
            previous = current
        }
    }
    return row[b.count]
}

/// `--json` of the listing commands: one JSON value on stdout, keys sorted.
struct JSONOption: ParsableArguments {
    @Flag(name: .long, help: "Print JSON instead of a table.") var json = false

    func emit(_ value: Any) throws {
        let data = try JSONSerialization.data(withJSONObject: value, options: [.prettyPrinted, .sortedKeys])
        shardfs.emit(String(decoding: data, as: UTF8.self))
    }
}

