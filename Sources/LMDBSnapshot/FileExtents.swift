#if canImport(Glibc)
import Glibc
#endif

// FIEMAP (linux/fiemap.h): struct fiemap is 32 bytes {u64 fm_start, u64
// fm_length, u32 fm_flags, u32 fm_mapped_extents, u32 fm_extent_count, u32
// reserved}, followed by fm_extent_count struct fiemap_extent of 56 bytes
// {u64 fe_logical, u64 fe_physical, u64 fe_length, u64 reserved[2], u32
// fe_flags, u32 reserved[3]}.
private let fiemapIoctl: UInt = 0xC020_660B  // FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap)
private let fiemapFlagSync: UInt32 = 0x1  // FIEMAP_FLAG_SYNC: write dirty data back first
private let fiemapHeaderSize = 32
private let fiemapExtentSize = 56
private let extentsPerCall = 256

/// The physical extent map of the file open at `fd`, in logical order, with
/// FIEMAP (FIEMAP_FLAG_SYNC: the file's dirty data is written back first, so
/// no extent is left delayed-allocated). Asks in batches until the extent
/// flagged FIEMAP_EXTENT_LAST (or none is left). Holes are simply absent.
///
/// The map is true when it is taken; the caller keeps it true for as long as
/// it is used (for an LMDB snapshot: the pin keeps the snapshot's pages from
/// being rewritten, and nothing may move the file's blocks — no defragmenting,
/// no copy-on-write filesystem relocating them).
public func fileExtents(fd: Int32) throws -> [FileExtent] {
    let size = fiemapHeaderSize + extentsPerCall * fiemapExtentSize
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
    defer { buffer.deallocate() }
    var extents: [FileExtent] = []
    var start: UInt64 = 0
    while true {
        memset(buffer.baseAddress!, 0, size)
        buffer.storeBytes(of: start, toByteOffset: 0, as: UInt64.self)  // fm_start
        buffer.storeBytes(of: UInt64.max - start, toByteOffset: 8, as: UInt64.self)  // fm_length: to the end
        buffer.storeBytes(of: fiemapFlagSync, toByteOffset: 16, as: UInt32.self)
        buffer.storeBytes(of: UInt32(extentsPerCall), toByteOffset: 24, as: UInt32.self)  // fm_extent_count
        if ioctl(fd, fiemapIoctl, buffer.baseAddress!) != 0 {
            let e = errno
            if e == EINTR { continue }
            throw SnapshotError.io(page: 0, "FIEMAP: \(String(cString: strerror(e)))")
        }
        let bytes = UnsafeRawBufferPointer(buffer)
        let mapped = Int(bytes.u32(20))
        guard mapped <= extentsPerCall else { throw SnapshotError.io(page: 0, "FIEMAP mapped \(mapped) extents") }
        if mapped == 0 { return extents }
        var sawLast = false
        for i in 0 ..< mapped {
            let o = fiemapHeaderSize + i * fiemapExtentSize
            let extent = FileExtent(logical: bytes.u64(o), physical: bytes.u64(o + 8), length: bytes.u64(o + 16),
                                    flags: bytes.u32(o + 40))
            extents.append(extent)
            if extent.flags & FileExtent.last != 0 { sawLast = true }
        }
        if sawLast { return extents }
        let tail = extents[extents.count - 1]
        guard tail.logical + tail.length > start else { throw SnapshotError.io(page: 0, "FIEMAP made no progress at \(start)") }
        start = tail.logical + tail.length
    }
}
