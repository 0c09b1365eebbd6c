import BatchProtocol
import Metadata
import ShardNode
import ShardStore

/// The one place engine, manager and metadata errors become wire statuses.
/// `writing` tells a storage failure on a write (WRITE_EXCEPTION) from one on a read.
func wireStatus(for error: Error, writing: Bool) -> Status {
    let message = "\(error)"
    let code: StatusCode
    switch error {
    case let e as ShardError:
        switch e {
        case .invalidKey: code = .invalidKey
        case .invalidIndex: code = .invalidIndex
        case .invalidArgument: code = .invalidArgument
        case .clientIDRequired: code = .clientIDRequired
        case .fenced: code = .shardFenced
        case .closed: code = .shardClosed
        case .readOnlyView, .notPrimary: code = .notShardLeader
        case .full: code = .shardFull
        case .volumeFull: code = writing ? .shardFull : .readException  // a write: to a new shard, placed where there is room
        case .tooLarge: code = .writeTooLarge
        case .entryNotFound: code = .entryNotFound
        case .shardExists: code = .shardIDTaken
        case .notAShard: code = .deviceException
        case .corrupt: code = .readException
        case .storage, .inUse: code = writing ? .writeException : .readException
        }
    case let e as ShardManagerError:
        switch e {
        case .shardNotFound: code = .shardNotFound
        case .shardNotLocal, .notPrimary: code = .notShardLeader
        case .shardIDTaken: code = .shardIDTaken
        case .noWritableVolume, .noRoom: code = .noNodeAvailable
        case .invalidArgument: code = .invalidArgument
        }
    case let e as MetadataError:
        switch e {
        case .notFound: code = .shardNotFound
        case .alreadyExists: code = .shardIDTaken
        case .invalidArgument: code = .invalidArgument
        default: code = .metadataException
        }
    case let e as ProtocolError:
        return e.status
    default:
        code = writing ? .writeException : .readException
    }
    return Status(code, message)
}
