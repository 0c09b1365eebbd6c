import Glibc
import ShardStore

/// The attributes the mount shows, as functions of what the shard holds
/// (docs/SEMANTICS.md: "The tree", "Inode numbers", "Modes and times").
struct Attributes {
    let uid: uid_t
    let gid: gid_t
    /// Default modes: of files without a chmod of their own, and of directories.
    var fileMode: mode_t = 0o644
    var directoryMode: mode_t = 0o755
    /// Times of the root, and of shard directories that have none of their own yet.
    let mountTime: Int64

    // MARK: Inode numbers

    /// Entry numbers and shard IDs share the 64 bits: the shard above bit 36.
    static let entryBits: UInt64 = 36
    static let shardLimit: UInt64 = 1 << 27
    static let rootInode: UInt64 = 1

    /// The inode number users see (`st_ino`, `d_ino`) for an entry: made of its
    /// shard and its entry number, both stable for the entry's life (renames and
    /// rewrites keep the number, which is never given again in the shard), so it
    /// survives cache drops, remounts and restarts and differs between live
    /// entries. Past 2^27 shards or 2^36 numbers in a shard, and for entries
    /// written before numbers existed (number 0), it is a hash with the top bit
    /// set instead: still stable, but two entries may then share one.
    static func inodeNumber(shard: UInt64, entry number: UInt64, key: [UInt8]) -> UInt64 {
        if number > 0, shard < shardLimit, number < 1 << entryBits { return shard << entryBits | number }
        var bytes = withUnsafeBytes(of: shard.littleEndian) { Array($0) } + withUnsafeBytes(of: number.littleEndian) { Array($0) }
        if number == 0 { bytes += key }
        return fnv1a(bytes) | 1 << 63
    }

    /// A shard directory's inode number: entry number 0 of its shard.
    static func inodeNumber(shard: UInt64) -> UInt64 {
        shard < shardLimit ? shard << entryBits : fnv1a(withUnsafeBytes(of: shard.littleEndian) { Array($0) }) | 1 << 63
    }

    private static func fnv1a(_ bytes: [UInt8]) -> UInt64 {
        bytes.reduce(0xcbf2_9ce4_8422_2325) { ($0 ^ UInt64($1)) &* 0x0000_0100_0000_01B3 }
    }

    // MARK: stat

    func root(readOnly: Bool) -> stat {
        var st = base(Self.rootInode)
        st.st_mode = S_IFDIR | (readOnly ? directoryMode & ~0o222 : directoryMode)
        st.st_nlink = 2
        setTimes(&st, modification: mountTime, change: mountTime, access: mountTime)
        return st
    }

    /// A shard directory: `0755` (or the `umask` option's), without write bits when
    /// it cannot be written (closed, a read-only mount or view); its times follow
    /// the entries made and removed.
    func shard(_ id: UInt64, writable: Bool, modificationTime: Int64, changeTime: Int64) -> stat {
        var st = base(Self.inodeNumber(shard: id))
        st.st_mode = S_IFDIR | (writable ? directoryMode : directoryMode & ~0o222)
        st.st_nlink = 2
        setTimes(&st, modification: modificationTime, change: max(changeTime, modificationTime), access: modificationTime)
        return st
    }

    /// An entry: its mode as set with chmod (default `0644`, or the `umask` option's) without write bits
    /// when it cannot be written; change and access time are the modification
    /// time unless set apart (chmod, xattr changes; utimensat of the access time).
    /// `linked` false: unlinked while open (nlink 0).
    func file(shard: UInt64, _ entry: EntryAttributes, writable: Bool, linked: Bool = true) -> stat {
        var st = base(Self.inodeNumber(shard: shard, entry: entry.metadata.number, key: entry.key.bytes))
        let mode = entry.metadata.mode.map { mode_t($0) } ?? fileMode & 0o7777
        st.st_mode = S_IFREG | (writable ? mode : mode & ~0o222)
        st.st_nlink = linked ? 1 : 0
        st.st_size = off_t(entry.size)
        st.st_blocks = blkcnt_t((entry.size + 511) / 512)
        let modification = entry.modificationTime
        setTimes(&st, modification: modification, change: max(entry.metadata.changeTime ?? modification, modification),
                 access: entry.metadata.accessTime ?? modification)
        return st
    }

    private func base(_ ino: UInt64) -> stat {
        var st = stat()
        st.st_ino = UInt(ino)
        st.st_uid = uid
        st.st_gid = gid
        st.st_blksize = 4096
        return st
    }

    private func setTimes(_ st: inout stat, modification: Int64, change: Int64, access: Int64) {
        st.st_mtim = Self.timespec(modification)
        st.st_ctim = Self.timespec(change)
        st.st_atim = Self.timespec(access)
    }

    static func timespec(_ nanoseconds: Int64) -> Glibc.timespec {
        Glibc.timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
    }

    static func nanoseconds(_ time: Glibc.timespec) -> Int64 {
        Int64(time.tv_sec) * 1_000_000_000 + Int64(time.tv_nsec)
    }
}
