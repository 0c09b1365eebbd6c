/// Why a snapshot could not be read. Every failure to find, read or trust a
/// page is one of these: the reader never crashes on bad bytes and never
/// returns zeros or bytes from outside a page in their place.
public enum SnapshotError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A page's bytes break LMDB's format or the snapshot's bounds.
    case corrupt(page: UInt64, String)
    /// Reading a page failed (errno), or returned fewer bytes than asked.
    case io(page: UInt64, String)
    /// The page is not backed by written data in the extent map (a hole, or an
    /// extent flagged unwritten, delayed, unknown, encoded or inline).
    case unmapped(page: UInt64, String)
    /// The file's meta pages are not LMDB 0.9's (magic, version, page size).
    case notLMDB(String)
    /// Neither meta page holds the transaction asked for (it was overwritten, or not committed yet).
    case noSuchMeta(txnid: UInt64, found: [UInt64])
    /// No named database of that name in the snapshot.
    case databaseNotFound(String)
    /// A database or format this reader does not handle (e.g. DUPFIXED, INTEGERKEY).
    case unsupported(String)
    /// A caller's mistake (e.g. a database handle of another snapshot).
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .corrupt(let page, let why): "page \(page) is corrupt: \(why)"
        case .io(let page, let why): "reading page \(page) failed: \(why)"
        case .unmapped(let page, let why): "page \(page) is not mapped to written data: \(why)"
        case .notLMDB(let why): "not an LMDB 0.9 data file: \(why)"
        case .noSuchMeta(let txnid, let found): "no meta page holds transaction \(txnid) (found \(found))"
        case .databaseNotFound(let name): "no database named \(name) in the snapshot"
        case .unsupported(let why): "unsupported: \(why)"
        case .invalidArgument(let why): "invalid argument: \(why)"
        }
    }
}
