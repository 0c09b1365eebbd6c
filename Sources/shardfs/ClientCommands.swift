import ArgumentParser
import BatchProtocol
import Foundation
import ShardFSClient

/// `shardfs client …`: talk to a running node through its batch socket service.
struct ClientCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "client",
        abstract: "Talk to a running node (shardfs serve) over its socket.",
        subcommands: [ClientPut.self, ClientGet.self, ClientDelete.self, ClientBatchPut.self, ClientBatchGet.self,
                      ClientList.self, ClientNewShard.self, ClientCloseShard.self, ClientDeleteShard.self,
                      ClientListShards.self, ClientStat.self, ClientLocate.self])
}

/// Where the nodes are: --node (several), --socket, --address (+ --token), or ./data/shardfs.sock.
struct ConnectOptions: ParsableArguments {
    @Option(name: .long, help: "A node: host:port, or the path of its Unix socket (repeatable, or a comma list). Requests go to each shard's primary; other nodes are tried when one is down.") var node: [String] = []
    @Option(name: .long, help: "Unix socket of the node (default: SHARDFS_UNIX_SOCKET, else <SHARDFS_DATA_DIR or ./data>/shardfs.sock, as serve uses).") var socket: String?
    @Option(name: .long, help: "TCP address host:port of the node.") var address: String?
    @Option(name: .long, help: "Token for TCP. Also SHARDFS_SERVER_TOKEN.") var token: String?
    @Option(name: .long, help: "Seconds to keep trying other nodes and a primary that moved (default: 30 with several nodes, 0 with one).") var deadline: Double?
    @Flag(name: .long, help: "Speak TLS to TCP nodes, trusting the system's CAs (implied by the other --tls options).") var tls = false
    @Option(name: .long, help: "Speak TLS to TCP nodes, trusting this PEM CA. Also SHARDFS_TLS_CA.") var tlsCa: String?
    @Option(name: .long, help: "This client's PEM certificate, for nodes that ask for one (mutual TLS); needs --tls-key.") var tlsCert: String?
    @Option(name: .long, help: "This client's PEM private key.") var tlsKey: String?

    /// The nodes in the order given: --node first, then --address and --socket;
    /// with none of them, the default socket.
    func endpoints() throws -> [Endpoint] {
        var out: [Endpoint] = []
        for list in node {
            for item in list.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !item.isEmpty {
                out.append(item.contains("/") ? .unix(path: item) : try Endpoint.tcp(item))
            }
        }
        if let address { out.append(try Endpoint.tcp(address)) }
        if let socket { out.append(.unix(path: socket)) }
        if out.isEmpty {
            let environment = ProcessInfo.processInfo.environment
            let fromEnvironment = environment["SHARDFS_UNIX_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
            out.append(.unix(path: fromEnvironment ?? (environment["SHARDFS_DATA_DIR"] ?? "./data") + "/shardfs.sock"))
        }
        return out
    }

    func connect() throws -> ShardFSCluster {
        let nodes = try endpoints()
        var options = RoutingOptions()
        let seconds = deadline ?? (nodes.count > 1 ? 30 : 0)
        guard seconds >= 0 && seconds.isFinite else { throw ValidationError("--deadline must be zero or more seconds") }
        options.deadline = .milliseconds(Int64(seconds * 1000))
        let token = self.token ?? ProcessInfo.processInfo.environment["SHARDFS_SERVER_TOKEN"] ?? ""
        return try ShardFSCluster(nodes: nodes, token: token, tls: try clientTLS(), options: options)
    }

    /// TLS for TCP nodes when any --tls option (or SHARDFS_TLS_CA) asks for it.
    func clientTLS() throws -> ClientTLS? {
        let ca = tlsCa ?? ProcessInfo.processInfo.environment["SHARDFS_TLS_CA"].flatMap { $0.isEmpty ? nil : $0 }
        guard tls || ca != nil || tlsCert != nil || tlsKey != nil else { return nil }
        guard (tlsCert == nil) == (tlsKey == nil) else { throw ValidationError("--tls-cert and --tls-key go together") }
        return ClientTLS(trustedCAFile: ca, certificateFile: tlsCert, privateKeyFile: tlsKey)
    }
}

/// A command that failed for a reason a person can act on, said as it is.
struct CommandFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Runs `body` with a client of the nodes and closes it after. A node that
/// cannot be reached is named with what to check (the socket layer's words
/// name system calls, not what to do).
func withClient<T>(_ options: ConnectOptions, _ body: (ShardFSCluster) async throws -> T) async throws -> T {
    let client = try options.connect()
    do {
        let result = try await body(client)
        await client.close()
        return result
    } catch ClientError.unreachable(let endpoint, let why) {
        await client.close()
        let others = client.nodes.count > 1 ? " (nor any other node given)" : ""
        switch endpoint {
        case .unix(let path):
            throw CommandFailure("no node serves \(path)\(others) — is `shardfs serve` running? (--socket, --node or SHARDFS_UNIX_SOCKET name another)")
        case .tcp(let host, let port):
            throw CommandFailure("no node answers at \(host):\(port)\(others) — is `shardfs serve` running and listening there? (\(why))")
        }
    } catch {
        await client.close()
        throw error
    }
}

func readInput(_ file: String?) throws -> [UInt8] {
    if let file {
        guard let data = FileManager.default.contents(atPath: file) else { throw ValidationError("cannot read \(file)") }
        return [UInt8](data)
    }
    return [UInt8](FileHandle.standardInput.readDataToEndOfFile())
}

struct ClientPut: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "put", abstract: "Put an entry (value from --value, --file or stdin).")
    @OptionGroup var connection: ConnectOptions
    @OptionGroup var client: ClientOption
    @Argument var shardID: UInt64
    @Argument var key: String
    @Option(name: .long) var value: String?
    @Option(name: .long) var file: String?
    @Option(name: .long, help: "An index, name=value (repeatable).") var index: [String] = []

    func validate() throws {
        if value != nil && file != nil { throw ValidationError("give --value or --file, not both") }
    }

    func run() async throws {
        let bytes = try value.map { Array($0.utf8) } ?? readInput(file)
        let indexes = try parseIndexes(index).map { IndexField(name: $0.name, value: $0.value) }
        let clientID = try client.clientID()
        try await withClient(connection) {
            try await $0.put(client: clientID, shard: shardID, key: Array(key.utf8), value: bytes, indexes: indexes)
        }
    }
}

struct ClientGet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "get", abstract: "Print an entry's value.")
    @OptionGroup var connection: ConnectOptions
    @Argument var shardID: UInt64
    @Argument var key: String

    func run() async throws {
        let entry = try await withClient(connection) { try await $0.get(shard: shardID, key: Array(key.utf8)) }
        FileHandle.standardOutput.write(Data(entry.value))
    }
}

struct ClientDelete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete an entry.")
    @OptionGroup var connection: ConnectOptions
    @OptionGroup var client: ClientOption
    @Argument var shardID: UInt64
    @Argument var key: String

    func run() async throws {
        let clientID = try client.clientID()
        try await withClient(connection) { try await $0.delete(client: clientID, shard: shardID, key: Array(key.utf8)) }
    }
}

struct ClientBatchPut: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batch-put",
        abstract: "Put many entries in one durable batch: files (key = file name) or key<TAB>value lines on stdin.")
    @OptionGroup var connection: ConnectOptions
    @OptionGroup var client: ClientOption
    @Argument var shardID: UInt64
    @Argument(help: "Files to put; none: read key<TAB>value lines from standard input.") var files: [String] = []

    func run() async throws {
        var items: [PutItem] = []
        if files.isEmpty {
            let text = String(decoding: try readInput(nil), as: UTF8.self)
            for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
                guard let tab = line.firstIndex(of: "\t") else { throw ValidationError("a line is key<TAB>value: \"\(line)\"") }
                items.append(PutItem(key: Array(line[..<tab].utf8), value: Array(line[line.index(after: tab)...].utf8)))
            }
        } else {
            for file in files {
                items.append(PutItem(key: Array(URL(fileURLWithPath: file).lastPathComponent.utf8), value: try readInput(file)))
            }
        }
        let clientID = try client.clientID()
        let statuses = try await withClient(connection) { try await $0.batchPut(client: clientID, shard: shardID, items: items) }
        var failed = 0
        for (item, status) in zip(items, statuses) where !status.isOK {
            failed += 1
            FileHandle.standardError.write(Data("\(String(decoding: item.key, as: UTF8.self)): \(status)\n".utf8))
        }
        emit("\(items.count - failed) put, \(failed) failed")
        if failed > 0 { throw ExitCode(1) }
    }
}

struct ClientBatchGet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batch-get", abstract: "Get many entries: prints key<TAB>value (or key<TAB>!STATUS) lines as they stream in.")
    @OptionGroup var connection: ConnectOptions
    @Argument var shardID: UInt64
    @Argument var keys: [String]

    func run() async throws {
        var missing = 0
        try await withClient(connection) { client in
            for try await item in client.batchGet(shard: shardID, keys: keys.map { Array($0.utf8) }) {
                let key = String(decoding: item.key, as: UTF8.self)
                if let entry = item.entry {
                    emit("\(key)\t\(String(decoding: entry.value, as: UTF8.self))")
                } else {
                    missing += 1
                    emit("\(key)\t!\(item.status.code.name)")
                }
            }
        }
        if missing > 0 { throw ExitCode(1) }
    }
}

struct ClientList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ls", abstract: "List a shard's entries: size, key.")
    @OptionGroup var connection: ConnectOptions
    @Argument var shardID: UInt64

    func run() async throws {
        try await withClient(connection) { client in
            var after: [UInt8]?
            repeat {
                let page = try await client.list(shard: shardID, after: after)
                for row in page.rows { emit("\(row.size)\t\(String(decoding: row.key, as: UTF8.self))") }
                after = page.more ? page.rows.last?.key : nil
            } while after != nil
        }
    }
}

struct ClientNewShard: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "new-shard", abstract: "Create a shard; prints its ID.")
    @OptionGroup var connection: ConnectOptions
    @OptionGroup var client: ClientOption
    @Option(name: .long, help: "Ask for this shard ID.") var id: UInt64?

    func run() async throws {
        let owner = try client.clientID()
        emit(String(try await withClient(connection) { try await $0.newShard(owner: owner, id: id) }))
    }
}

struct ClientCloseShard: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "close-shard",
                                                    abstract: "Close a shard (read-only forever); --client must be its owner.")
    @OptionGroup var connection: ConnectOptions
    @OptionGroup var client: ClientOption
    @Argument var shardID: UInt64
    func run() async throws {
        let clientID = try client.clientID()
        try await withClient(connection) { try await $0.closeShard(client: clientID, shard: shardID) }
    }
}

struct ClientDeleteShard: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete-shard",
                                                    abstract: "Delete a shard and its entries; --client must be its owner.")
    @OptionGroup var connection: ConnectOptions
    @OptionGroup var client: ClientOption
    @Argument var shardID: UInt64
    func run() async throws {
        let clientID = try client.clientID()
        try await withClient(connection) { try await $0.deleteShard(client: clientID, shard: shardID) }
    }
}

struct ClientListShards: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list-shards", abstract: "List shards: ID, owner, state, entries.")
    @OptionGroup var connection: ConnectOptions
    @OptionGroup var output: JSONOption

    func run() async throws {
        let shards = try await withClient(connection, { try await $0.listShards() })
        if output.json {
            try output.emit(shards.map { s -> [String: Any] in
                var row: [String: Any] = ["id": s.id, "owner": s.owner, "state": s.closed ? "closed" : "open", "volume": s.volumeID]
                if let f = s.figures { row["entries"] = f.entries; row["usedBytes"] = f.usedBytes; row["limitBytes"] = f.limitBytes }
                return row
            })
            return
        }
        for s in shards {
            emit("\(s.id)\t\(s.owner)\t\(s.closed ? "closed" : "open")\t\(s.figures.map { String($0.entries) } ?? "-")")
        }
    }
}

struct ClientStat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stat", abstract: "A shard's owner, state and figures.")
    @OptionGroup var connection: ConnectOptions
    @Argument var shardID: UInt64
    @OptionGroup var output: JSONOption

    func run() async throws {
        let s = try await withClient(connection) { try await $0.stat(shardID) }
        if output.json {
            var row: [String: Any] = ["id": s.id, "owner": s.owner, "state": s.closed ? "closed" : "open", "volume": s.volumeID]
            if let f = s.figures { row["entries"] = f.entries; row["usedBytes"] = f.usedBytes; row["limitBytes"] = f.limitBytes }
            try output.emit(row)
            return
        }
        emit("id \(s.id)\nowner \(s.owner)\nstate \(s.closed ? "closed" : "open")\nvolume \(s.volumeID)")
        if let f = s.figures { emit("entries \(f.entries)\nused \(f.usedBytes)\nlimit \(f.limitBytes)") }
    }
}

struct ClientLocate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "locate", abstract: "Where a shard is served: its primary and backups, with their addresses.")
    @OptionGroup var connection: ConnectOptions
    @Argument var shardID: UInt64

    func run() async throws {
        let l = try await withClient(connection) { try await $0.locate(shardID) }
        func node(_ n: NodeLocation) -> String { n.nodeID.isEmpty ? "-" : "\(n.nodeID) \(n.address.isEmpty ? "-" : n.address)" }
        emit("shard \(l.shard)\nstate \(l.closed ? "closed" : "open")\nvolume \(l.volumeID)\nepoch \(l.epoch)\nprimary \(node(l.primary))")
        for backup in l.backups { emit("backup \(node(backup))") }
    }
}
