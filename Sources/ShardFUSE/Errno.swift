import Glibc
import Metadata
import ShardNode
import ShardStore

/// A failure that already is an errno (the filesystem's own checks).
public struct FileSystemError: Error, CustomStringConvertible {
    public let code: Int32
    public let reason: String
    public init(_ code: Int32, _ reason: String) {
        self.code = code
        self.reason = reason
    }
    public var description: String { "\(reason) (\(String(cString: strerror(code))))" }
}

/// The one place errors become errno values; docs/SEMANTICS.md gives each operation's.
func errnoValue(of error: Error) -> Int32 {
    switch error {
    case let e as FileSystemError:
        return e.code
    case let e as ShardError:
        switch e {
        case .invalidKey, .invalidIndex, .invalidArgument: return EINVAL
        case .clientIDRequired, .fenced: return EACCES
        case .closed, .readOnlyView, .notPrimary: return EROFS
        case .full, .volumeFull: return ENOSPC
        case .tooLarge: return EFBIG
        case .entryNotFound: return ENOENT
        case .shardExists: return EEXIST
        case .notAShard, .corrupt, .storage: return EIO
        case .inUse: return EBUSY
        }
    case let e as ShardManagerError:
        switch e {
        case .shardNotFound, .shardNotLocal: return ENOENT
        case .shardIDTaken: return EEXIST
        case .noWritableVolume, .noRoom: return ENOSPC
        case .notPrimary: return EROFS
        case .invalidArgument: return EINVAL
        }
    case let e as MetadataError:
        switch e {
        case .notFound: return ENOENT
        case .alreadyExists: return EEXIST
        case .conflict: return EBUSY
        case .invalidArgument: return EINVAL
        case .unauthorized: return EACCES
        case .timeout, .deadlineExceeded: return ETIMEDOUT
        case .unavailable, .failed: return EIO
        }
    default:
        return EIO
    }
}
