// LMDBSnapshot: a read-only reader of one committed LMDB snapshot, addressed
// by its root, reading pages with pread from a `PageSource`.
// (About 740 lines on purpose, half of them this header: the contract below,
// and the page checks, which must be read together with the reads they guard.
// The page layout is in Layout.swift, the sources in PageSource.swift.)
//
// What it reads
//   The B-trees of one snapshot of an LMDB 0.9 data file (64-bit layout), from
//   the main database's record in a published `SnapshotRoot` down: branch and
//   leaf pages, overflow pages (F_BIGDATA), named databases (F_SUBDATA records
//   in the main database) and DUPSORT databases with duplicates in sub-pages
//   (F_DUPDATA) or sub-databases (F_DUPDATA|F_SUBDATA). Keys and duplicates
//   are in LMDB's default order (memcmp, then the shorter first); databases
//   with other orders or DUPFIXED are refused (`SnapshotError.unsupported`).
//   It never reads the file's meta pages (the primary rewrites them) and never
//   maps the file (a missing page is an error, never SIGBUS).
//
// What the caller must guarantee
//   The pin: from before `root` is taken until the last read of this Snapshot,
//   the writer holds a read transaction on `root.txnid` in its own environment
//   (so LMDB reuses none of the pages this snapshot reaches), and the pages
//   were made durable (fdatasync) before the root was published. With a
//   `DevicePageSource`, the extent map must be taken after that sync and the
//   file's blocks must not move while it is used.
//
// What it checks, on every page it reads (a violation throws
// `SnapshotError.corrupt(page:…)` naming the page; nothing crashes, nothing
// is returned from outside a page):
//   - the page number lies in 2...root.lastPage, and the header's pgno is it;
//   - the page's kind is the one expected (branch above the tree's depth, leaf
//     at it, overflow for F_BIGDATA, leaf sub-page for F_DUPDATA);
//   - lower/upper lie inside the page, every node offset and node (header,
//     key, data) lies inside the page (or sub-page), node flags are LMDB's,
//     keys are strictly increasing, a branch's children lie in range;
//   - an overflow run lies within lastPage and holds the value's size;
//   - a tree is no deeper than its record says (so a cycle cannot loop).
//
// What it cannot detect
//   A page rewritten at the same page number with well-formed contents —
//   what happens when the pin is missing and the writer reuses a page this
//   snapshot reaches. Such a read may return wrong (but well-formed) answers.
//   Bytes that are wrong but consistent (no checksums in LMDB 0.9) likewise,
//   and a damaged tree that reaches one page twice (no cycle deeper than the
//   tree's depth is possible, but a scan may then see pairs twice).
//
// Threads and lifetimes
//   A `Snapshot` is safe to share; its page cache is bounded (LRU, bytes) and
//   locked. A `SnapshotTransaction` and its cursors belong to one `read`
//   closure on one thread. Buffers they return stay valid until that closure
//   returns (as in LMDB): the transaction holds every leaf and overflow page
//   it returned bytes from, so a long scan holds the pages it visited until
//   it ends — split very long scans into several `read` calls.
#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A page (or an overflow run) as read from the source: immutable once checked.
final class Page: @unchecked Sendable {
    let number: UInt64
    /// Pages held (more than one only for an overflow run).
    let pages: Int
    let storage: UnsafeMutableRawBufferPointer
    var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(storage) }

    init(number: UInt64, pages: Int, pageSize: Int) {
        self.number = number
        self.pages = pages
        storage = .allocate(byteCount: pages * pageSize, alignment: 16)
    }

    deinit { storage.deallocate() }
}

/// A least-recently-used set of pages, bounded in bytes. Not locked: its owner locks.
struct PageCache {
    private struct Slot {
        var page: Page?
        var newer = -1
        var older = -1
    }

    let capacity: Int
    private(set) var bytes = 0
    private var index: [UInt64: Int] = [:]
    private var slots: [Slot] = []
    private var freeSlots: [Int] = []
    private var newest = -1
    private var oldest = -1

    init(capacity: Int) { self.capacity = max(0, capacity) }

    var count: Int { index.count }

    mutating func get(_ number: UInt64) -> Page? {
        guard let s = index[number] else { return nil }
        unlink(s)
        linkNewest(s)
        return slots[s].page
    }

    mutating func insert(_ page: Page) {
        let size = page.storage.count
        guard size <= capacity else { return }
        if let s = index[page.number] { remove(slot: s) }
        let s: Int
        if let free = freeSlots.popLast() { s = free; slots[s] = Slot(page: page) } else { s = slots.count; slots.append(Slot(page: page)) }
        index[page.number] = s
        bytes += size
        linkNewest(s)
        while bytes > capacity, oldest >= 0 { remove(slot: oldest) }
    }

    private mutating func remove(slot s: Int) {
        guard let page = slots[s].page else { return }
        unlink(s)
        index[page.number] = nil
        bytes -= page.storage.count
        slots[s] = Slot()
        freeSlots.append(s)
    }

    private mutating func unlink(_ s: Int) {
        let (newer, older) = (slots[s].newer, slots[s].older)
        if newer >= 0 { slots[newer].older = older } else { newest = older }
        if older >= 0 { slots[older].newer = newer } else { oldest = newer }
        slots[s].newer = -1
        slots[s].older = -1
    }

    private mutating func linkNewest(_ s: Int) {
        slots[s].older = newest
        slots[s].newer = -1
        if newest >= 0 { slots[newest].newer = s }
        newest = s
        if oldest < 0 { oldest = s }
    }
}

/// A database of one snapshot: the main database or a named one.
public struct SnapshotDatabase: Sendable, Equatable {
    /// nil for the main database.
    public let name: String?
    public let record: DatabaseRecord
    let snapshot: ObjectIdentifier

    public var isDupSort: Bool { record.isDupSort }
}

/// One committed snapshot of an LMDB environment, read by its root. See the top of this file.
public final class Snapshot: @unchecked Sendable {
    public let root: SnapshotRoot
    public let source: any PageSource
    private let lock = NSLock()
    private var cache: PageCache  // guarded by lock

    /// `cacheBytes`: the bound of this snapshot's page cache (0: no cache).
    public init(source: any PageSource, root: SnapshotRoot, cacheBytes: Int = 8 << 20) throws {
        guard source.pageSize == root.pageSize else {
            throw SnapshotError.invalidArgument("the source's page size \(source.pageSize) is not the root's \(root.pageSize)")
        }
        let maxPages = root.mapSize / UInt64(root.pageSize)
        guard root.lastPage >= 1, root.lastPage < maxPages else {
            throw SnapshotError.invalidArgument("last page \(root.lastPage) outside a map of \(maxPages) pages")
        }
        self.source = source
        self.root = root
        cache = PageCache(capacity: cacheBytes)
        try Self.checkRecord(root.main, name: "main", lastPage: root.lastPage)
    }

    /// The main database (holding the named databases' records when there are any).
    public var main: SnapshotDatabase { SnapshotDatabase(name: nil, record: root.main, snapshot: ObjectIdentifier(self)) }

    /// The named database `name` (a F_SUBDATA record in the main database).
    public func database(_ name: String) throws -> SnapshotDatabase {
        let main = self.main
        let record: DatabaseRecord = try read { txn in
            var cursor = SnapshotCursor(state: txn.state, db: main)
            let key = Array(name.utf8)
            guard try key.withUnsafeBytes({ try cursor.main.seek($0, txn.state) }) == .exact else {
                throw SnapshotError.databaseNotFound(name)
            }
            let node = cursor.main.node
            guard node.flags == Layout.nodeSubData, node.dataSize == Layout.databaseRecordSize else {
                throw SnapshotError.databaseNotFound("\(name) (a key of the main database that is not a database)")
            }
            return DatabaseRecord(node.data, at: 0)
        }
        try Self.checkRecord(record, name: name, lastPage: root.lastPage)
        return SnapshotDatabase(name: name, record: record, snapshot: ObjectIdentifier(self))
    }

    /// Runs `body` with a read transaction on this snapshot. Buffers obtained
    /// inside are valid until `body` returns; never let the transaction escape.
    public func read<R>(_ body: (SnapshotTransaction) throws -> R) throws -> R {
        try body(SnapshotTransaction(state: ReadState(snapshot: self)))
    }

    /// Pages and bytes the cache holds now.
    public var cacheUsage: (pages: Int, bytes: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (cache.count, cache.bytes)
    }

    static func checkRecord(_ record: DatabaseRecord, name: String, lastPage: UInt64) throws {
        if record.flags & Layout.unsupportedDatabaseFlags != 0 {
            throw SnapshotError.unsupported("database \(name) has flags 0x\(String(record.flags, radix: 16)) (only the default order and DUPSORT are read)")
        }
        if record.isEmpty { return }
        guard record.depth >= 1, record.depth <= maxDepth, record.root >= 2, record.root <= lastPage else {
            throw SnapshotError.corrupt(page: record.root, "root of database \(name) (depth \(record.depth)) is out of range")
        }
    }

    /// LMDB's CURSOR_STACK: no tree is deeper.
    static let maxDepth: UInt16 = 32

    // MARK: Pages

    private func cached(_ number: UInt64) -> Page? {
        lock.lock()
        defer { lock.unlock() }
        return cache.get(number)
    }

    private func remember(_ page: Page) {
        lock.lock()
        defer { lock.unlock() }
        cache.insert(page)
    }

    private func checkNumber(_ number: UInt64, from parent: UInt64?) throws {
        guard number >= 2, number <= root.lastPage else {
            throw SnapshotError.corrupt(page: number, "outside 2...\(root.lastPage)" + (parent.map { " (referenced by page \($0))" } ?? ""))
        }
    }

    /// A branch or leaf page, checked (see the top of this file).
    func treePage(_ number: UInt64, leaf: Bool, from parent: UInt64?) throws -> Page {
        try checkNumber(number, from: parent)
        let page: Page
        if let hit = cached(number) {
            page = hit
        } else {
            page = Page(number: number, pages: 1, pageSize: root.pageSize)
            try source.read(page: number, count: 1, into: page.storage)
            try checkHeader(page.bytes, number: number)
            let kind = page.bytes.u16(10) & Layout.pageKindMask
            guard kind == Layout.pageBranch || kind == Layout.pageLeaf else {
                throw SnapshotError.corrupt(page: number, "flags 0x\(String(page.bytes.u16(10), radix: 16)) are not a branch or leaf page's")
            }
            try checkNodes(page.bytes, base: 0, size: root.pageSize, leaf: kind == Layout.pageLeaf, page: number)
            remember(page)
        }
        let kind = page.bytes.u16(10) & Layout.pageKindMask
        guard kind == (leaf ? Layout.pageLeaf : Layout.pageBranch) else {
            throw SnapshotError.corrupt(page: number, "expected a \(leaf ? "leaf" : "branch") page, found flags 0x\(String(page.bytes.u16(10), radix: 16))")
        }
        return page
    }

    /// The overflow run at `number` holding a value of `size` bytes (from its 16th byte on).
    func overflowPage(_ number: UInt64, size: Int, from parent: UInt64) throws -> Page {
        try checkNumber(number, from: parent)
        let needed = Layout.overflowPages(size: size, pageSize: root.pageSize)
        if let hit = cached(number), hit.pages >= needed, hit.bytes.u16(10) & Layout.pageKindMask == Layout.pageOverflow {
            return hit
        }
        guard UInt64(needed - 1) <= root.lastPage - number else {
            throw SnapshotError.corrupt(page: number, "a \(size)-byte value needs \(needed) pages, past the last page \(root.lastPage) (referenced by page \(parent))")
        }
        // The header first, into one page: a damaged size must not make us allocate the whole run.
        let head = Page(number: number, pages: 1, pageSize: root.pageSize)
        try source.read(page: number, count: 1, into: head.storage)
        try checkHeader(head.bytes, number: number)
        let flags = head.bytes.u16(10)
        guard flags & Layout.pageKindMask == Layout.pageOverflow else {
            throw SnapshotError.corrupt(page: number, "expected an overflow page (referenced by page \(parent)), found flags 0x\(String(flags, radix: 16))")
        }
        let run = Int(head.bytes.u32(12))
        guard run >= needed, UInt64(run - 1) <= root.lastPage - number else {
            throw SnapshotError.corrupt(page: number, "overflow run of \(run) pages: a \(size)-byte value needs \(needed), last page is \(root.lastPage)")
        }
        let page: Page
        if needed == 1 {
            page = head
        } else {
            page = Page(number: number, pages: needed, pageSize: root.pageSize)
            page.storage.copyMemory(from: head.bytes)
            try source.read(page: number + 1, count: needed - 1,
                            into: UnsafeMutableRawBufferPointer(rebasing: page.storage[root.pageSize...]))
        }
        remember(page)
        return page
    }

    private func checkHeader(_ bytes: UnsafeRawBufferPointer, number: UInt64) throws {
        guard bytes.u64(0) == number else {
            throw SnapshotError.corrupt(page: number, "its header says page \(bytes.u64(0))")
        }
        let flags = bytes.u16(10)
        guard flags & ~(Layout.pageKindMask | Layout.pageDirty | Layout.pageKeep) == 0 else {
            throw SnapshotError.corrupt(page: number, "unknown page flags 0x\(String(flags, radix: 16))")
        }
        if flags & Layout.pageLeaf2 != 0 {
            throw SnapshotError.unsupported("page \(number) is a LEAF2 (DUPFIXED) page")
        }
    }

    /// Checks the node area of the page or sub-page of `size` bytes at `base` of `bytes`.
    func checkNodes(_ bytes: UnsafeRawBufferPointer, base: Int, size: Int, leaf: Bool, page: UInt64) throws {
        let header = Layout.pageHeaderSize
        let lower = Int(bytes.u16(base + 12)), upper = Int(bytes.u16(base + 14))
        let what = base == 0 ? "" : " (sub-page at offset \(base))"
        guard lower >= header, (lower - header) % 2 == 0, lower <= upper, upper <= size else {
            throw SnapshotError.corrupt(page: page, "lower \(lower) / upper \(upper) outside a \(size)-byte page\(what)")
        }
        let count = (lower - header) / 2
        guard count >= 1 else { throw SnapshotError.corrupt(page: page, "no nodes\(what)") }
        var previousKey: UnsafeRawBufferPointer?
        for i in 0 ..< count {
            let offset = Int(bytes.u16(base + header + 2 * i))
            guard offset >= upper, offset + Layout.nodeHeaderSize <= size else {
                throw SnapshotError.corrupt(page: page, "node \(i) at offset \(offset) outside \(upper)..<\(size)\(what)")
            }
            let node = base + offset
            let keySize = Int(bytes.u16(node + 6))
            var end = offset + Layout.nodeHeaderSize + keySize
            if leaf {
                let flags = bytes.u16(node + 4)
                switch flags {
                case 0, Layout.nodeBigData, Layout.nodeSubData, Layout.nodeDupData, Layout.nodeDupData | Layout.nodeSubData: break
                default: throw SnapshotError.corrupt(page: page, "node \(i) has flags 0x\(String(flags, radix: 16))\(what)")
                }
                end += flags == Layout.nodeBigData ? 8 : Int(bytes.u16(node)) | Int(bytes.u16(node + 2)) << 16
            }
            guard end <= size else {
                throw SnapshotError.corrupt(page: page, "node \(i) at offset \(offset) ends at \(end), past \(size)\(what)")
            }
            let key = UnsafeRawBufferPointer(rebasing: bytes[node + Layout.nodeHeaderSize ..< node + Layout.nodeHeaderSize + keySize])
            if leaf || i >= 1 {  // a branch's first key is not used
                if let previousKey, compareKeys(previousKey, key) >= 0 {
                    throw SnapshotError.corrupt(page: page, "keys out of order at node \(i)\(what)")
                }
                previousKey = key
            }
        }
    }
}

/// The pages one read transaction has handed out bytes from, kept until it ends.
final class ReadState {
    let snapshot: Snapshot
    private var held: [ObjectIdentifier: Page] = [:]

    init(snapshot: Snapshot) { self.snapshot = snapshot }

    func treePage(_ number: UInt64, leaf: Bool, from parent: UInt64?) throws -> Page {
        let page = try snapshot.treePage(number, leaf: leaf, from: parent)
        if leaf { hold(page) }
        return page
    }

    func overflowValue(_ number: UInt64, size: Int, from parent: UInt64) throws -> UnsafeRawBufferPointer {
        let page = try snapshot.overflowPage(number, size: size, from: parent)
        hold(page)
        return UnsafeRawBufferPointer(rebasing: page.bytes[Layout.pageHeaderSize ..< Layout.pageHeaderSize + size])
    }

    private func hold(_ page: Page) {
        let id = ObjectIdentifier(page)
        if held[id] == nil { held[id] = page }
    }
}

/// A node of a leaf page or sub-page (its bytes were checked when the page was read).
struct LeafNode {
    let bytes: UnsafeRawBufferPointer
    let offset: Int

    var flags: UInt16 { bytes.u16(offset + 4) }
    var key: UnsafeRawBufferPointer {
        let start = offset + Layout.nodeHeaderSize
        return UnsafeRawBufferPointer(rebasing: bytes[start ..< start + Int(bytes.u16(offset + 6))])
    }
    /// NODEDSZ: the value's size (for F_BIGDATA, the overflow value's).
    var dataSize: Int { Int(bytes.u16(offset)) | Int(bytes.u16(offset + 2)) << 16 }
    /// The bytes stored in the node after the key.
    var data: UnsafeRawBufferPointer {
        let start = offset + Layout.nodeHeaderSize + Int(bytes.u16(offset + 6))
        return UnsafeRawBufferPointer(rebasing: bytes[start ..< start + (flags == Layout.nodeBigData ? 8 : dataSize)])
    }
}

/// A position in one B-tree (a database, a duplicate sub-database, or a duplicate sub-page).
struct TreeCursor {
    struct Frame {
        let page: Page
        /// Where the page (or sub-page) header starts in `page`.
        let base: Int
        let count: Int
        var index: Int

        func nodeOffset(_ i: Int) -> Int { base + Int(page.bytes.u16(base + Layout.pageHeaderSize + 2 * i)) }
        func key(_ i: Int) -> UnsafeRawBufferPointer {
            let node = nodeOffset(i)
            let start = node + Layout.nodeHeaderSize
            return UnsafeRawBufferPointer(rebasing: page.bytes[start ..< start + Int(page.bytes.u16(node + 6))])
        }
        /// NODEPGNO of a branch node.
        func child(_ i: Int) -> UInt64 {
            let node = nodeOffset(i), b = page.bytes
            return UInt64(b.u16(node)) | UInt64(b.u16(node + 2)) << 16 | UInt64(b.u16(node + 4)) << 32
        }
    }

    enum Root {
        case empty
        case tree(root: UInt64, depth: Int)
        case subpage(Frame)
    }

    enum Position { case unset, at, end }
    enum Found { case exact, after, none }

    let root: Root
    var stack: [Frame] = []
    var position = Position.unset

    init(root: Root) { self.root = root }

    init(record: DatabaseRecord) {
        root = record.isEmpty ? .empty : .tree(root: record.root, depth: Int(record.depth))
    }

    var top: Frame { stack[stack.count - 1] }
    var node: LeafNode { LeafNode(bytes: top.page.bytes, offset: top.nodeOffset(top.index)) }
    var key: UnsafeRawBufferPointer { top.key(top.index) }

    /// Descends from the child of the top frame (or from the root) to a leaf,
    /// choosing in each page the index `choose(frame, isLeaf)` gives.
    private mutating func descend(_ state: ReadState, choose: (Frame, Bool) -> Int) throws {
        let depth: Int
        var number: UInt64
        var parent: UInt64?
        switch root {
        case .empty:
            position = .end
            return
        case .subpage(var frame):
            frame.index = choose(frame, true)
            stack = [frame]
            position = .at
            return
        case .tree(let rootPage, let d):
            depth = d
            if let top = stack.last {
                number = top.child(top.index)
                parent = top.page.number
            } else {
                number = rootPage
            }
        }
        while true {
            let leaf = stack.count + 1 == depth
            guard stack.count < depth else {
                throw SnapshotError.corrupt(page: number, "tree deeper than its depth \(depth)")
            }
            let page = try state.treePage(number, leaf: leaf, from: parent)
            let count = (Int(page.bytes.u16(12)) - Layout.pageHeaderSize) / 2
            var frame = Frame(page: page, base: 0, count: count, index: 0)
            frame.index = choose(frame, leaf)
            stack.append(frame)
            if leaf { break }
            parent = number
            number = frame.child(frame.index)
        }
        position = .at
    }

    mutating func first(_ state: ReadState) throws -> Bool {
        stack.removeAll(keepingCapacity: true)
        try descend(state) { _, _ in 0 }
        return position == .at
    }

    mutating func last(_ state: ReadState) throws -> Bool {
        stack.removeAll(keepingCapacity: true)
        try descend(state) { frame, _ in frame.count - 1 }
        return position == .at
    }

    /// Like MDB_NEXT: the first pair of an unpositioned cursor; stays at the end once there.
    mutating func next(_ state: ReadState) throws -> Bool {
        switch position {
        case .unset: return try first(state)
        case .end: return false
        case .at: break
        }
        if top.index + 1 < top.count {
            stack[stack.count - 1].index += 1
            return true
        }
        // Up to the nearest page with a next child, then down its leftmost path.
        var level = stack.count - 1
        while level > 0 && stack[level - 1].index + 1 >= stack[level - 1].count { level -= 1 }
        guard level > 0 else {
            position = .end
            return false
        }
        stack.removeSubrange(level...)
        stack[level - 1].index += 1
        try descend(state) { _, _ in 0 }
        return true
    }

    /// Positions at the first key >= `key` (MDB_SET_RANGE), saying whether it is `key` itself.
    mutating func seek(_ key: UnsafeRawBufferPointer, _ state: ReadState) throws -> Found {
        stack.removeAll(keepingCapacity: true)
        var leafIndexPastEnd = false
        try descend(state) { frame, isLeaf in
            if isLeaf {
                // The first index whose key is >= `key`.
                var low = 0, high = frame.count
                while low < high {
                    let mid = (low + high) / 2
                    if compareKeys(frame.key(mid), key) < 0 { low = mid + 1 } else { high = mid }
                }
                if low == frame.count {
                    leafIndexPastEnd = true
                    return frame.count - 1
                }
                return low
            }
            // The last child whose separator is <= `key` (the first separator is not compared).
            var low = 1, high = frame.count
            while low < high {
                let mid = (low + high) / 2
                if compareKeys(frame.key(mid), key) <= 0 { low = mid + 1 } else { high = mid }
            }
            return low - 1
        }
        guard position == .at else { return .none }
        if leafIndexPastEnd {
            return try next(state) ? .after : .none
        }
        return compareKeys(self.key, key) == 0 ? .exact : .after
    }
}

/// A read transaction on a snapshot, handed to a `Snapshot.read` closure: the
/// read half of `LMDB.Transaction`. Never let it escape the closure.
public struct SnapshotTransaction {
    let state: ReadState

    public var snapshot: Snapshot { state.snapshot }

    func check(_ db: SnapshotDatabase) throws {
        guard db.snapshot == ObjectIdentifier(state.snapshot) else {
            throw SnapshotError.invalidArgument("database \(db.name ?? "main") belongs to another snapshot")
        }
    }

    /// The value under `key` (its first duplicate in a DUPSORT database), or nil.
    /// The buffer stays valid until the `read` closure returns.
    public func get(_ db: SnapshotDatabase, _ key: UnsafeRawBufferPointer) throws -> UnsafeRawBufferPointer? {
        try withCursor(db) { cursor in try cursor.seek(exactly: key)?.value }
    }

    public func get(_ db: SnapshotDatabase, _ key: [UInt8]) throws -> UnsafeRawBufferPointer? {
        try key.withUnsafeBytes { try get(db, $0) }
    }

    /// Number of data items in `db` (every duplicate counts), from its record.
    public func count(_ db: SnapshotDatabase) throws -> Int {
        try check(db)
        return Int(clamping: db.record.entries)
    }

    /// Runs `body` with a cursor on `db`.
    public func withCursor<R>(_ db: SnapshotDatabase, _ body: (inout SnapshotCursor) throws -> R) throws -> R {
        try check(db)
        var cursor = SnapshotCursor(state: state, db: db)
        return try body(&cursor)
    }
}

/// A position in a snapshot's database: the read half of `LMDB.Cursor`, with its
/// semantics (MDB_FIRST, MDB_NEXT, MDB_SET_RANGE, MDB_SET_KEY, MDB_GET_BOTH_RANGE,
/// MDB_NEXT_DUP). Keys and values stay valid until the `read` closure returns.
/// After a seek or `next()` that finds nothing the cursor is at the end and
/// `next()` returns nil (LMDB leaves the position after a failed exact seek
/// unspecified). After `nextDuplicate()` returns nil the cursor stays on the
/// key's last duplicate, and `next()` goes on to the next key, as in LMDB.
public struct SnapshotCursor {
    public typealias Pair = (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)

    let state: ReadState
    let db: SnapshotDatabase
    var main: TreeCursor
    /// The duplicates of the current key, when it has several.
    var dups: TreeCursor?

    init(state: ReadState, db: SnapshotDatabase) {
        self.state = state
        self.db = db
        main = TreeCursor(record: db.record)
    }

    public mutating func first() throws -> Pair? {
        guard try main.first(state) else { return atEnd() }
        return try enterNode(last: false)
    }

    public mutating func last() throws -> Pair? {
        guard try main.last(state) else { return atEnd() }
        return try enterNode(last: true)
    }

    /// The next pair: the next duplicate, else the next key's first. On an unpositioned cursor, the first.
    public mutating func next() throws -> Pair? {
        if main.position == .at, dups != nil {
            if try dups!.next(state) { return try current() }
        }
        guard try main.next(state) else { return atEnd() }
        return try enterNode(last: false)
    }

    /// The current pair, or nil when the cursor is not on one.
    public func current() throws -> Pair? {
        guard main.position == .at else { return nil }
        if let dups { return dups.position == .at ? (main.key, dups.key) : nil }
        return try valueOfNode()
    }

    /// The first pair whose key is >= `key` (its first duplicate).
    public mutating func seek(atLeast key: UnsafeRawBufferPointer) throws -> Pair? {
        guard try main.seek(key, state) != .none else { return atEnd() }
        return try enterNode(last: false)
    }

    /// Exactly `key` (its first duplicate).
    public mutating func seek(exactly key: UnsafeRawBufferPointer) throws -> Pair? {
        guard try main.seek(key, state) == .exact else { return atEnd() }
        return try enterNode(last: false)
    }

    /// DUPSORT: the first duplicate of `key` that is >= `value`.
    public mutating func seek(key: UnsafeRawBufferPointer, atLeastValue value: UnsafeRawBufferPointer) throws -> Pair? {
        guard db.isDupSort else { throw SnapshotError.invalidArgument("seek(key:atLeastValue:) on a database without DUPSORT") }
        guard try main.seek(key, state) == .exact else { return atEnd() }
        if try enterDuplicates() {
            guard try dups!.seek(value, state) != .none else { return atEnd() }
            return try current()
        }
        let pair = try valueOfNode()
        guard compareKeys(pair.value, value) >= 0 else { return atEnd() }
        return pair
    }

    /// DUPSORT: the next duplicate of the current key, or nil after its last.
    /// On an unpositioned cursor, the first pair (as MDB_NEXT_DUP).
    public mutating func nextDuplicate() throws -> Pair? {
        switch main.position {
        case .unset: return try first()
        case .end: return nil
        case .at: break
        }
        guard dups != nil, try dups!.next(state) else { return nil }
        return try current()
    }

    private mutating func atEnd() -> Pair? {
        main.position = .end
        dups = nil
        return nil
    }

    /// Sets up `dups` for the node under the main cursor; false if it has a single value.
    private mutating func enterDuplicates() throws -> Bool {
        let node = main.node
        guard node.flags & Layout.nodeDupData != 0 else {
            dups = nil
            return false
        }
        let page = main.top.page
        guard db.isDupSort else {
            throw SnapshotError.corrupt(page: page.number, "duplicates under a key of \(db.name ?? "main"), which is not DUPSORT")
        }
        if node.flags & Layout.nodeSubData != 0 {
            guard node.dataSize == Layout.databaseRecordSize else {
                throw SnapshotError.corrupt(page: page.number, "a duplicate sub-database record of \(node.dataSize) bytes")
            }
            let record = DatabaseRecord(node.data, at: 0)
            try Snapshot.checkRecord(record, name: "(duplicates)", lastPage: state.snapshot.root.lastPage)
            guard !record.isEmpty else { throw SnapshotError.corrupt(page: page.number, "an empty duplicate sub-database") }
            dups = TreeCursor(record: record)
        } else {
            // A sub-page: a leaf page inside the node's data, offsets relative to its start.
            let base = node.offset + Layout.nodeHeaderSize + node.key.count
            let size = node.dataSize
            guard size >= Layout.pageHeaderSize else {
                throw SnapshotError.corrupt(page: page.number, "a duplicate sub-page of \(size) bytes")
            }
            let flags = page.bytes.u16(base + 10)
            if flags & Layout.pageLeaf2 != 0 { throw SnapshotError.unsupported("DUPFIXED sub-page in page \(page.number)") }
            guard flags & ~(Layout.pageDirty | Layout.pageKeep) == Layout.pageLeaf | Layout.pageSubpage else {
                throw SnapshotError.corrupt(page: page.number, "sub-page at offset \(base) has flags 0x\(String(flags, radix: 16))")
            }
            try state.snapshot.checkNodes(page.bytes, base: base, size: size, leaf: true, page: page.number)
            let count = (Int(page.bytes.u16(base + 12)) - Layout.pageHeaderSize) / 2
            for i in 0 ..< count {
                let sub = LeafNode(bytes: page.bytes, offset: base + Int(page.bytes.u16(base + Layout.pageHeaderSize + 2 * i)))
                guard sub.flags == 0 else {
                    throw SnapshotError.corrupt(page: page.number, "node \(i) of the sub-page at offset \(base) has flags 0x\(String(sub.flags, radix: 16))")
                }
            }
            dups = TreeCursor(root: .subpage(.init(page: page, base: base, count: count, index: 0)))
        }
        return true
    }

    private mutating func enterNode(last: Bool) throws -> Pair? {
        if try enterDuplicates() {
            guard try (last ? dups!.last(state) : dups!.first(state)) else { return atEnd() }
            return try current()
        }
        return try valueOfNode()
    }

    /// The main cursor's key and value, for a node without duplicates.
    private func valueOfNode() throws -> Pair {
        let node = main.node
        if node.flags == Layout.nodeBigData {
            let number = node.data.u64(0)
            return (node.key, try state.overflowValue(number, size: node.dataSize, from: main.top.page.number))
        }
        return (node.key, node.data)
    }
}
