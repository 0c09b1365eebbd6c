import LMDB

/// Why a shard operation failed. Every layer above (FUSE errno, protocol status
/// codes, command exit messages) maps from this one type.
public enum ShardError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidKey(String)
    case invalidIndex(String)
    case invalidArgument(String)
    /// A write named no client ID.
    case clientIDRequired
    /// A write by a client other than the shard's owner.
    case fenced(owner: String, client: String)
    /// The shard is closed: read-only forever.
    case closed
    /// The shard was opened as a read-only view (a backup node or a read-only mount).
    case readOnlyView
    /// This node is no longer the primary of the shard's volume, or cannot confirm
    /// that it still is (its write fence said so): nothing was written.
    case notPrimary(String)
    /// The write does not fit in the shard's size limit; nothing was committed.
    case full(limit: Int)
    /// The filesystem under the shard has no room for the write (ENOSPC, or an
    /// I/O error with next to no room left: LMDB reports a write a full
    /// filesystem cut short as EIO). Nothing was committed; entries stay
    /// readable by key (a scan that must apply pending batches first fails as
    /// `storage` meanwhile), and the shard takes writes again once there is
    /// room. Not the shard's own limit: that is `full`.
    case volumeFull(String)
    /// One transaction cannot hold this much; nothing was committed.
    case tooLarge(String)
    case entryNotFound(EntryKey)
    case shardExists(String)
    case notAShard(String)
    case corrupt(String)
    case storage(String)
    /// An instance of the shard in this process is still open (being let go:
    /// an open file or a request holds it); LMDB opens an environment once per
    /// process, so a new instance waits for it. Try again later.
    case inUse(String)

    public var description: String {
        switch self {
        case .invalidKey(let why): return "invalid key: \(why)"
        case .invalidIndex(let why): return "invalid index: \(why)"
        case .invalidArgument(let why): return "invalid argument: \(why)"
        case .clientIDRequired: return "a client ID is required to write"
        case .fenced(let owner, let client): return "shard is fenced: it belongs to client \"\(owner)\", not \"\(client)\""
        case .closed: return "shard is closed (read-only forever)"
        case .readOnlyView: return "shard is open read-only on this node"
        case .notPrimary(let why): return "not the primary: \(why)"
        case .full(let limit): return "shard full: the write does not fit in the shard's size limit of \(limit) bytes"
        case .volumeFull(let why): return "volume full: \(why)"
        case .tooLarge(let why): return "write too large: \(why)"
        case .entryNotFound(let key): return "entry not found: \(key)"
        case .shardExists(let path): return "a shard already exists at \(path)"
        case .notAShard(let why): return "not a shard: \(why)"
        case .corrupt(let why): return "shard data is corrupt: \(why)"
        case .storage(let why): return "storage error: \(why)"
        case .inUse(let why): return "shard in use: \(why)"
        }
    }

    /// Maps LMDB failures to the shard's vocabulary.
    static func from(_ error: Error, limit: Int) -> Error {
        guard let e = error as? LMDBError else { return error }
        switch e {
        case .mapFull: return ShardError.full(limit: limit)
        case .transactionFull: return ShardError.tooLarge("more dirty pages than one LMDB transaction may hold")
        default: return ShardError.storage(e.description)
        }
    }
}
