#if canImport(Glibc)
import Glibc
#endif

/// Where a snapshot's pages come from. Implementations are read-only, safe to
/// call from several threads at once, and never hand back bytes they did not
/// read: a short read, an I/O error or a page without written data throws.
public protocol PageSource: Sendable {
    /// Bytes per page; must equal the snapshot's `SnapshotRoot.pageSize`.
    var pageSize: Int { get }
    /// Reads pages `page ..< page + count` into `buffer`, which holds exactly
    /// `count * pageSize` bytes.
    func read(page: UInt64, count: Int, into buffer: UnsafeMutableRawBufferPointer) throws
}

extension PageSource {
    /// Pages `page ..< page + count` as a new array.
    public func read(page: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count * pageSize)
        try bytes.withUnsafeMutableBytes { try read(page: page, count: count, into: $0) }
        return bytes
    }

    func checkRequest(page: UInt64, count: Int, buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard count >= 1, buffer.count == count * pageSize else {
            throw SnapshotError.invalidArgument("\(count) pages into a buffer of \(buffer.count) bytes")
        }
        let (offset, overflow) = page.multipliedReportingOverflow(by: UInt64(pageSize))
        guard !overflow, offset <= UInt64(Int.max) - UInt64(buffer.count) else {
            throw SnapshotError.corrupt(page: page, "page number out of any file's range")
        }
        return Int(offset)
    }
}

/// Pages of an LMDB data file, read with pread (never mmap: a page that is
/// not there is an error, not SIGBUS). The file is opened read-only.
public final class FilePageSource: PageSource {
    public let path: String
    public let pageSize: Int
    private let fd: Int32

    public init(path: String, pageSize: Int) throws {
        guard pageSize > 0 else { throw SnapshotError.invalidArgument("page size \(pageSize)") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw SnapshotError.io(page: 0, "open \(path): \(String(cString: strerror(errno)))")
        }
        self.fd = fd
        self.path = path
        self.pageSize = pageSize
    }

    /// Takes the page size from the file's meta page 0 (which LMDB never changes).
    public convenience init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw SnapshotError.io(page: 0, "open \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var head = [UInt8](repeating: 0, count: Layout.metaPageBytes)
        try head.withUnsafeMutableBytes { try preadFully(fd: fd, into: $0, offset: 0, page: 0) }
        let meta = try head.withUnsafeBytes { try SnapshotRoot.parseMetaPage($0, number: 0) }
        try self.init(path: path, pageSize: meta.pageSize)
    }

    deinit { close(fd) }

    public func read(page: UInt64, count: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        let offset = try checkRequest(page: page, count: count, buffer: buffer)
        try preadFully(fd: fd, into: buffer, offset: offset, page: page)
    }
}

/// One extent of a file's physical layout, as FIEMAP reports it: `length`
/// bytes of the file from `logical` lie on the device from `physical`.
public struct FileExtent: Codable, Sendable, Equatable {
    public var logical: UInt64
    public var physical: UInt64
    public var length: UInt64
    /// FIEMAP_EXTENT_* flags.
    public var flags: UInt32

    public init(logical: UInt64, physical: UInt64, length: UInt64, flags: UInt32) {
        self.logical = logical
        self.physical = physical
        self.length = length
        self.flags = flags
    }

    public static let last: UInt32 = 0x0001  // FIEMAP_EXTENT_LAST
    public static let unknown: UInt32 = 0x0002  // location not known yet
    public static let delayedAllocation: UInt32 = 0x0004  // FIEMAP_EXTENT_DELALLOC
    public static let encoded: UInt32 = 0x0008  // compressed or otherwise encoded
    public static let encrypted: UInt32 = 0x0080
    public static let notAligned: UInt32 = 0x0100
    public static let inline: UInt32 = 0x0200  // data inside metadata blocks
    public static let tail: UInt32 = 0x0400  // packed with other files' tails
    public static let unwritten: UInt32 = 0x0800  // allocated, reads as zeros
    public static let merged: UInt32 = 0x1000
    public static let shared: UInt32 = 0x2000

    /// Flags under which the device does not hold the file's bytes as they are.
    public static let unreadable: UInt32 = unknown | delayedAllocation | encoded | encrypted | notAligned | inline | tail | unwritten

    /// Whether the device holds this extent's bytes, as they are, at `physical`.
    public var isReadable: Bool { flags & Self.unreadable == 0 }
}

/// Pages of a file read straight from the block device its filesystem lives on,
/// at the physical offsets of the file's extent map — bypassing the filesystem
/// and the page cache (O_DIRECT), so neither can be stale. `device` must be the
/// device FIEMAP's physical offsets refer to (the filesystem's own device, not
/// a whole disk holding it in a partition). A page any byte of which is not in
/// a readable extent (see `FileExtent.isReadable`) is an error, never zeros.
public final class DevicePageSource: PageSource {
    public let device: String
    public let pageSize: Int
    /// Sorted by `logical`, not overlapping.
    public let extents: [FileExtent]
    private let fd: Int32
    /// Alignment of offsets, lengths and buffers for O_DIRECT.
    private let alignment: Int

    /// O_DIRECT (Swift's Glibc exports it only under glibc's own name).
    static let directFlag: Int32 = __O_DIRECT
    static let getLogicalBlockSize: UInt = 0x1268  // BLKSSZGET

    public init(device: String, extents: [FileExtent], pageSize: Int) throws {
        guard pageSize > 0 else { throw SnapshotError.invalidArgument("page size \(pageSize)") }
        let sorted = extents.sorted { $0.logical < $1.logical }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.logical + a.length > b.logical {
            throw SnapshotError.invalidArgument("extents at \(a.logical) and \(b.logical) overlap")
        }
        let fd = open(device, O_RDONLY | O_CLOEXEC | Self.directFlag)
        guard fd >= 0 else {
            throw SnapshotError.io(page: 0, "open \(device) O_DIRECT: \(String(cString: strerror(errno)))")
        }
        var blockSize: Int32 = 0
        if ioctl(fd, Self.getLogicalBlockSize, &blockSize) != 0 { blockSize = 512 }  // a regular file: fine for ext4/xfs
        self.fd = fd
        self.device = device
        self.extents = sorted
        self.pageSize = pageSize
        self.alignment = max(4096, Int(blockSize))
    }

    deinit { close(fd) }

    public func read(page: UInt64, count: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        var position = UInt64(try checkRequest(page: page, count: count, buffer: buffer))
        let end = position + UInt64(buffer.count)
        var done = 0
        while position < end {
            let pageHere = position / UInt64(pageSize)
            let extent = try self.extent(containing: position, page: pageHere)
            let n = Int(min(end, extent.logical + extent.length) - position)
            try readDirect(physical: extent.physical + (position - extent.logical),
                           into: UnsafeMutableRawBufferPointer(rebasing: buffer[done ..< done + n]), page: pageHere)
            position += UInt64(n)
            done += n
        }
    }

    private func extent(containing position: UInt64, page: UInt64) throws -> FileExtent {
        // The last extent starting at or before `position`.
        var low = 0, high = extents.count
        while low < high {
            let mid = (low + high) / 2
            if extents[mid].logical <= position { low = mid + 1 } else { high = mid }
        }
        guard low > 0, position < extents[low - 1].logical + extents[low - 1].length else {
            throw SnapshotError.unmapped(page: page, "no extent holds file offset \(position)")
        }
        let extent = extents[low - 1]
        guard extent.isReadable else {
            throw SnapshotError.unmapped(page: page, "the extent at file offset \(extent.logical) has flags 0x\(String(extent.flags, radix: 16))")
        }
        return extent
    }

    /// Reads `buffer.count` bytes at device offset `physical` through an aligned bounce buffer.
    private func readDirect(physical: UInt64, into buffer: UnsafeMutableRawBufferPointer, page: UInt64) throws {
        let a = UInt64(alignment)
        let start = physical / a * a
        let stop = (physical + UInt64(buffer.count) + a - 1) / a * a
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(stop - start), alignment: alignment)
        defer { bounce.deallocate() }
        var done = 0
        while done < bounce.count {
            let n = pread(fd, bounce.baseAddress! + done, bounce.count - done, off_t(start) + off_t(done))
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw SnapshotError.io(page: page, "pread \(device) at \(start + UInt64(done)): \(String(cString: strerror(e)))")
            }
            if n == 0 {
                throw SnapshotError.io(page: page, "short read of \(device) at \(start + UInt64(done)) (end of device)")
            }
            done += n
        }
        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce[Int(physical - start) ..< Int(physical - start) + buffer.count]))
    }
}
