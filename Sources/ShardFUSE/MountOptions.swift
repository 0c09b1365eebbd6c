import Glibc
/// Options of a mount, from `-o a,b=c` lists. Generic mount options that
/// mount(8) and mount.fuse3 pass along are accepted and ignored.
public struct MountOptions: Sendable, Equatable {
    /// Refuse every change with EROFS (what backup nodes use).
    public var readOnly = false
    public var allowOther = false
    /// The client ID the mount writes as: shards made by `mkdir` belong to it, and
    /// only shards it owns are writable through the mount.
    public var clientID = "shardfs-mount"
    /// Seconds the kernel may cache names and attributes of open shards' entries.
    public var entryTimeout = 1.0
    public var attributeTimeout = 1.0
    /// Seconds for closed shards, which never change.
    public var closedTimeout = 86_400.0
    /// A configuration file for the node (`-o config=FILE`).
    public var configFile: String?
    public var maxThreads = 16
    /// Serve requests over io_uring (per-CPU queues) when the kernel allows it
    /// (`nouring` keeps /dev/fuse). See CFuseRing.
    public var uring = true
    /// Let the kernel read committed large files itself (FUSE passthrough,
    /// `nopassthrough` keeps every read in the daemon). See `BackingFiles`.
    public var passthrough = true
    public var debug = false
    /// Mount over a directory that holds files (hidden while mounted); refused otherwise.
    public var allowNonEmpty = false
    /// Owner and group every file and directory shows (default: the daemon's).
    public var uid: uid_t?
    public var gid: gid_t?
    /// Bits taken from the modes shown by default (files 0666, directories 0777
    /// less it); a mode set with chmod is kept as set. Nil: files 0644, directories 0755.
    public var umask: mode_t?

    public init() {}

    static let ignored: Set<String> = [
        "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto", "_netdev", "nofail",
        "user", "users", "nouser", "defaults", "async", "sync", "atime", "noatime", "relatime", "strictatime",
        "nodiratime", "diratime", "default_permissions",
    ]

    /// Applies one comma-separated `-o` list.
    public mutating func apply(_ list: String) throws {
        for option in list.split(separator: ",").map(String.init) where !option.isEmpty {
            let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
            let name = parts[0], value = parts.count > 1 ? parts[1] : nil
            func number() throws -> Double {
                guard let v = value.flatMap(Double.init), v >= 0 else {
                    throw MountOptionError("option \(name) needs a non-negative number, as in \(name)=1.5")
                }
                return v
            }
            switch name {
            case "ro": readOnly = true
            case "allow_other": allowOther = true
            case "client_id":
                guard let value, !value.isEmpty else { throw MountOptionError("option client_id needs a value") }
                clientID = value
            case "entry_timeout": entryTimeout = try number()
            case "attr_timeout": attributeTimeout = try number()
            case "closed_timeout": closedTimeout = try number()
            case "config":
                guard let value, !value.isEmpty else { throw MountOptionError("option config needs a file name") }
                configFile = value
            case "max_threads":
                guard let v = value.flatMap(Int.init), v >= 1 else { throw MountOptionError("option max_threads needs a count") }
                maxThreads = v
            case "debug": debug = true
            case "uring": uring = true
            case "nouring": uring = false
            case "passthrough": passthrough = true
            case "nopassthrough": passthrough = false
            case "nonempty", "allow_non_empty": allowNonEmpty = true
            case "uid":
                guard let v = value.flatMap({ UInt32($0) }) else { throw MountOptionError("option uid needs a numeric user ID, as in uid=1000") }
                uid = v
            case "gid":
                guard let v = value.flatMap({ UInt32($0) }) else { throw MountOptionError("option gid needs a numeric group ID, as in gid=1000") }
                gid = v
            case "umask":
                guard let v = value.flatMap({ UInt32($0, radix: 8) }), v <= 0o777 else {
                    throw MountOptionError("option umask needs octal permission bits, as in umask=022")
                }
                umask = v
            case "fsname", "subtype": break  // set by the mount itself
            default:
                if Self.ignored.contains(name) { continue }
                throw MountOptionError("unknown mount option \"\(option)\"")
            }
        }
    }
}

public struct MountOptionError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
