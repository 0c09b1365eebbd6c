import ArgumentParser
import Foundation
import ShardNode
import ShardStore

/// Parses "name=value" index arguments.
func parseIndexes(_ arguments: [String]) throws -> [IndexPair] {
    try arguments.map { argument in
        guard let eq = argument.firstIndex(of: "="), eq != argument.startIndex else {
            throw ValidationError("an index is written name=value, not \"\(argument)\"")
        }
        return IndexPair(name: String(argument[..<eq]), value: String(argument[argument.index(after: eq)...]))
    }
}

struct PutCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "put",
        abstract: "Put an entry: its value from --value, --file or standard input.")
    @OptionGroup var node: NodeOptions
    @OptionGroup var client: ClientOption
    @Argument(help: "Shard ID.") var shardID: UInt64
    @Argument(help: "Entry key (a file name; an entry ID is its decimal number).") var key: String
    @Option(name: .long, help: "The value, as text.") var value: String?
    @Option(name: .long, help: "Read the value from this file.") var file: String?
    @Option(name: .long, help: "An index, name=value (repeatable).") var index: [String] = []

    func validate() throws {
        if value != nil && file != nil { throw ValidationError("give --value or --file, not both") }
    }

    func run() async throws {
        let key = try EntryKey(key)
        let indexes = try parseIndexes(index)
        let bytes: [UInt8]
        if let value {
            bytes = Array(value.utf8)
        } else if let file {
            guard let data = FileManager.default.contents(atPath: file) else { throw ValidationError("cannot read \(file)") }
            bytes = [UInt8](data)
        } else {
            bytes = [UInt8](FileHandle.standardInput.readDataToEndOfFile())
        }
        let shard = try await node.startNode().shards.shard(shardID)
        try shard.put(key, value: bytes, indexes: indexes, clientID: try client.clientID())
    }
}

struct GetCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get", abstract: "Print an entry's value (or its indexes with --indexes).")
    @OptionGroup var node: NodeOptions
    @Argument(help: "Shard ID.") var shardID: UInt64
    @Argument(help: "Entry key.") var key: String
    @Option(name: .long, help: "Write the value to this file instead of standard output.") var output: String?
    @Flag(name: .long, help: "Print the entry's indexes as name=value lines instead of its value.") var indexes = false

    func run() async throws {
        let shard = try await node.startNode().shards.shard(shardID)
        let entry = try shard.get(try EntryKey(key))
        if indexes {
            for index in entry.indexes { emit("\(index.name)=\(String(decoding: index.value, as: UTF8.self))") }
        } else if let output {
            guard FileManager.default.createFile(atPath: output, contents: Data(entry.value)) else {
                throw ValidationError("cannot write \(output)")
            }
        } else {
            FileHandle.standardOutput.write(Data(entry.value))
        }
    }
}

struct ListCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls", abstract: "List a shard's entries in key order: size, modification time, key.")
    @OptionGroup var node: NodeOptions
    @Argument(help: "Shard ID.") var shardID: UInt64
    @Option(name: .long, help: "Start after this key.") var after: String?
    @Option(name: .long, help: "At most this many entries.") var limit: Int?

    func run() async throws {
        let shard = try await node.startNode().shards.shard(shardID)
        let rows = try shard.list(after: try after.map { try EntryKey($0) }, limit: limit ?? .max)
        let formatter = ISO8601DateFormatter()
        for row in rows {
            let date = Date(timeIntervalSince1970: Double(row.modificationTime) / 1e9)
            emit("\(String(row.size).padding(toLength: max(10, String(row.size).count), withPad: " ", startingAt: 0)) \(formatter.string(from: date)) \(row.key)")
        }
    }
}

struct RemoveCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rm", abstract: "Delete an entry.")
    @OptionGroup var node: NodeOptions
    @OptionGroup var client: ClientOption
    @Argument(help: "Shard ID.") var shardID: UInt64
    @Argument(help: "Entry key.") var key: String

    func run() async throws {
        let shard = try await node.startNode().shards.shard(shardID)
        try shard.delete(try EntryKey(key), clientID: try client.clientID())
    }
}

struct MoveCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "mv", abstract: "Rename an entry within its shard (replacing the target).")
    @OptionGroup var node: NodeOptions
    @OptionGroup var client: ClientOption
    @Argument(help: "Shard ID.") var shardID: UInt64
    @Argument(help: "Current key.") var from: String
    @Argument(help: "New key.") var to: String

    func run() async throws {
        let shard = try await node.startNode().shards.shard(shardID)
        try shard.rename(try EntryKey(from), to: try EntryKey(to), clientID: try client.clientID())
    }
}

struct FindCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "find", abstract: "List the keys of entries whose index name=value.")
    @OptionGroup var node: NodeOptions
    @Argument(help: "Shard ID.") var shardID: UInt64
    @Argument(help: "The index to match, name=value.") var index: String

    func run() async throws {
        guard let pair = try parseIndexes([index]).first else { return }
        let shard = try await node.startNode().shards.shard(shardID)
        for key in try shard.find(indexName: pair.name, value: pair.value) { emit(key.description) }
    }
}

struct BatchPutCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batch-put",
        abstract: "Put entries read from standard input as lines KEY<TAB>VALUE.",
        discussion: """
            Commits every --batch lines in one durable transaction and then prints \
            "ok KEY" for each entry of the batch (or "error KEY: reason"): a printed \
            "ok" is an acknowledgement, the entry survives a crash from then on.
            """)
    @OptionGroup var node: NodeOptions
    @OptionGroup var client: ClientOption
    @Argument(help: "Shard ID.") var shardID: UInt64
    @Option(name: .long, help: "Entries per transaction.") var batch = 1

    func validate() throws {
        if batch < 1 { throw ValidationError("--batch must be at least 1") }
    }

    func run() async throws {
        let clientID = try client.clientID()
        let shard = try await node.startNode().shards.shard(shardID)
        var pending: [EntryWrite] = []
        func flush() throws {
            guard !pending.isEmpty else { return }
            let statuses = try shard.batchPut(pending, clientID: clientID)
            for (item, status) in zip(pending, statuses) {
                let key = String(decoding: item.key, as: UTF8.self)
                emit(status.map { "error \(key): \($0)" } ?? "ok \(key)")
            }
            pending.removeAll(keepingCapacity: true)
        }
        while let line = readLine(strippingNewline: true) {
            let parts = line.split(separator: "\t", maxSplits: 1, omittingEmptySubsequences: false)
            pending.append(EntryWrite(key: Array(parts[0].utf8), value: parts.count > 1 ? Array(parts[1].utf8) : []))
            if pending.count >= batch { try flush() }
        }
        try flush()
    }
}
