#if canImport(Glibc)
import Glibc
#endif

/// One database's record (LMDB's MDB_db): its root and its figures.
public struct DatabaseRecord: Codable, Sendable, Equatable {
    /// md_flags: MDB_DUPSORT and friends (lmdb.h values).
    public var flags: UInt16
    /// Levels of the tree (1: the root is a leaf; 0: empty).
    public var depth: UInt16
    public var branchPages: UInt64
    public var leafPages: UInt64
    public var overflowPages: UInt64
    /// Number of data items (every duplicate counts).
    public var entries: UInt64
    /// Page number of the root; `UInt64.max` (P_INVALID) when the tree is empty.
    public var root: UInt64

    public init(flags: UInt16, depth: UInt16, branchPages: UInt64, leafPages: UInt64, overflowPages: UInt64,
                entries: UInt64, root: UInt64) {
        self.flags = flags
        self.depth = depth
        self.branchPages = branchPages
        self.leafPages = leafPages
        self.overflowPages = overflowPages
        self.entries = entries
        self.root = root
    }

    /// Parses the 48 bytes of an MDB_db at `offset` of `bytes` (which must hold them).
    init(_ bytes: UnsafeRawBufferPointer, at offset: Int) {
        flags = bytes.u16(offset + 4)
        depth = bytes.u16(offset + 6)
        branchPages = bytes.u64(offset + 8)
        leafPages = bytes.u64(offset + 16)
        overflowPages = bytes.u64(offset + 24)
        entries = bytes.u64(offset + 32)
        root = bytes.u64(offset + 40)
    }

    public var isEmpty: Bool { root == Layout.invalidPage }
    public var isDupSort: Bool { flags & Layout.dupSort != 0 }
}

/// What a backup needs to read one committed LMDB snapshot: the contents of
/// the meta page that committed it. The primary publishes it; the backup
/// reads pages from `main.root` down and never looks at the file's meta pages.
public struct SnapshotRoot: Codable, Sendable, Equatable {
    /// Bytes per page (the FREE database's md_pad in the meta page).
    public var pageSize: Int
    /// The transaction that committed this snapshot.
    public var txnid: UInt64
    /// mm_last_pg: no page of the snapshot lies past it.
    public var lastPage: UInt64
    /// The main database; named databases are F_SUBDATA records inside it.
    public var main: DatabaseRecord
    /// mm_mapsize: the environment's size limit when it committed.
    public var mapSize: UInt64

    public init(pageSize: Int, txnid: UInt64, lastPage: UInt64, main: DatabaseRecord, mapSize: UInt64) {
        self.pageSize = pageSize
        self.txnid = txnid
        self.lastPage = lastPage
        self.main = main
        self.mapSize = mapSize
    }

    /// Parses meta page `number` (0 or 1) from its first `Layout.metaPageBytes` bytes.
    /// Checks the page header, magic, version and page size.
    public static func parseMetaPage(_ bytes: UnsafeRawBufferPointer, number: UInt64) throws -> SnapshotRoot {
        guard bytes.count >= Layout.metaPageBytes else {
            throw SnapshotError.notLMDB("meta page \(number) has \(bytes.count) bytes, not \(Layout.metaPageBytes)")
        }
        let flags = bytes.u16(10)
        guard flags & Layout.pageKindMask == Layout.pageMeta else {
            throw SnapshotError.notLMDB("page \(number) is not a meta page (flags 0x\(String(flags, radix: 16)))")
        }
        guard bytes.u64(0) == number else {
            throw SnapshotError.notLMDB("meta page \(number) says it is page \(bytes.u64(0))")
        }
        let m = Layout.pageHeaderSize
        guard bytes.u32(m) == Layout.magic else {
            throw SnapshotError.notLMDB("meta page \(number) has magic 0x\(String(bytes.u32(m), radix: 16))")
        }
        guard bytes.u32(m + 4) == Layout.dataVersion else {
            throw SnapshotError.notLMDB("meta page \(number) has version \(bytes.u32(m + 4)), not \(Layout.dataVersion)")
        }
        let pageSize = Int(bytes.u32(m + 24))  // mm_dbs[FREE_DBI].md_pad
        guard pageSize >= 512, pageSize <= 65536, pageSize & (pageSize - 1) == 0 else {
            throw SnapshotError.notLMDB("meta page \(number) gives page size \(pageSize)")
        }
        let main = DatabaseRecord(bytes, at: m + 24 + Layout.databaseRecordSize)
        let root = SnapshotRoot(pageSize: pageSize, txnid: bytes.u64(m + 128), lastPage: bytes.u64(m + 120),
                                main: main, mapSize: bytes.u64(m + 16))
        guard root.lastPage >= 1, main.isEmpty || (main.root >= 2 && main.root <= root.lastPage) else {
            throw SnapshotError.notLMDB("meta page \(number): main root \(main.root) outside 2...\(root.lastPage)")
        }
        return root
    }

    /// Both meta pages of the LMDB data file open at `fd` (page 0 first), read with pread.
    ///
    /// Contract: a meta page is rewritten two commits after it was written. The
    /// two answers are only consistent with each other and with the file while
    /// no commit runs (a pread racing a commit may see a torn page, which the
    /// checks here do not always catch). Backups never call this on a live file:
    /// they read the root the primary published.
    public static func readMetaPages(fd: Int32) throws -> [SnapshotRoot] {
        var buffer = [UInt8](repeating: 0, count: Layout.metaPageBytes)
        var roots: [SnapshotRoot] = []
        var offset = 0
        for number in 0..<2 as Range<UInt64> {
            try buffer.withUnsafeMutableBytes { out in
                try preadFully(fd: fd, into: out, offset: offset, page: number)
            }
            let root = try buffer.withUnsafeBytes { try parseMetaPage($0, number: number) }
            if let first = roots.first, first.pageSize != root.pageSize {
                throw SnapshotError.notLMDB("meta pages disagree on the page size (\(first.pageSize), \(root.pageSize))")
            }
            roots.append(root)
            offset = root.pageSize
        }
        return roots
    }

    /// The meta page that committed transaction `txnid`.
    ///
    /// Contract: the primary calls this while it holds LMDB's write lock (or
    /// otherwise knows no commit can run) and while a read transaction on
    /// `txnid` pins the snapshot. Then the meta page is neither being rewritten
    /// nor can the pages it reaches be reused, and the answer is race-free.
    /// Throws `noSuchMeta` when neither meta page holds `txnid`.
    public static func meta(of txnid: UInt64, fd: Int32) throws -> SnapshotRoot {
        let roots = try readMetaPages(fd: fd)
        guard let root = roots.first(where: { $0.txnid == txnid }) else {
            throw SnapshotError.noSuchMeta(txnid: txnid, found: roots.map(\.txnid))
        }
        return root
    }
}

/// pread until `buffer` is full: EINTR is retried, an error or end of file throws.
func preadFully(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: Int, page: UInt64) throws {
    var done = 0
    while done < buffer.count {
        let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
        if n < 0 {
            let e = errno
            if e == EINTR { continue }
            throw SnapshotError.io(page: page, "pread at \(offset + done): \(String(cString: strerror(e)))")
        }
        if n == 0 {
            throw SnapshotError.io(page: page, "short read: \(done) of \(buffer.count) bytes at offset \(offset) (end of file)")
        }
        done += n
    }
}
