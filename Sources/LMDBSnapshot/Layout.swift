// LMDB 0.9's on-disk layout on 64-bit little-endian hosts, as mdb.c (0.9.24,
// Debian 12's liblmdb) defines it. Only what a reader of a snapshot needs.
#if canImport(Glibc)
import Glibc
#endif

/// Offsets, sizes and flag values of LMDB's data file (mdb.c names in comments).
enum Layout {
    /// PAGEHDRSZ: pgno u64, pad u16, flags u16, lower u16, upper u16 (or pages u32).
    static let pageHeaderSize = 16
    /// NODESIZE: lo u16, hi u16, flags u16, ksize u16; key, then data.
    static let nodeHeaderSize = 8
    /// sizeof(MDB_db).
    static let databaseRecordSize = 48
    /// PAGEHDRSZ + sizeof(MDB_meta): all a meta page holds.
    static let metaPageBytes = 16 + 136

    static let magic: UInt32 = 0xBEEF_C0DE  // MDB_MAGIC
    static let dataVersion: UInt32 = 1  // MDB_DATA_VERSION (MDB_DEVEL off)
    /// P_INVALID: the root of an empty tree.
    static let invalidPage = UInt64.max

    // Page flags (mp_flags).
    static let pageBranch: UInt16 = 0x01
    static let pageLeaf: UInt16 = 0x02
    static let pageOverflow: UInt16 = 0x04
    static let pageMeta: UInt16 = 0x08
    /// P_DIRTY: left set on sub-pages as written; harmless on disk.
    static let pageDirty: UInt16 = 0x10
    static let pageLeaf2: UInt16 = 0x20
    static let pageSubpage: UInt16 = 0x40
    /// P_KEEP: a spill marker a written page may still carry.
    static let pageKeep: UInt16 = 0x8000
    /// The bits that say what a page is.
    static let pageKindMask: UInt16 = pageBranch | pageLeaf | pageOverflow | pageMeta | pageLeaf2 | pageSubpage

    // Node flags (mn_flags of leaf nodes).
    static let nodeBigData: UInt16 = 0x01  // F_BIGDATA: data is an overflow page number
    static let nodeSubData: UInt16 = 0x02  // F_SUBDATA: data is an MDB_db record
    static let nodeDupData: UInt16 = 0x04  // F_DUPDATA: data holds duplicates

    // Database flags (md_flags, lmdb.h).
    static let reverseKey: UInt16 = 0x02
    static let dupSort: UInt16 = 0x04
    static let integerKey: UInt16 = 0x08
    static let dupFixed: UInt16 = 0x10
    static let integerDup: UInt16 = 0x20
    static let reverseDup: UInt16 = 0x40
    /// Flags that change the order or the page format; this reader does only the default.
    static let unsupportedDatabaseFlags: UInt16 = reverseKey | integerKey | dupFixed | integerDup | reverseDup

    /// OVPAGES: pages an overflow value of `size` bytes takes.
    static func overflowPages(size: Int, pageSize: Int) -> Int {
        (pageHeaderSize - 1 + size) / pageSize + 1
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always) func u16(_ offset: Int) -> UInt16 {
        UInt16(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
    @inline(__always) func u32(_ offset: Int) -> UInt32 {
        UInt32(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
    @inline(__always) func u64(_ offset: Int) -> UInt64 {
        UInt64(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
}

/// LMDB's default order for keys and for DUPSORT values: memcmp over the
/// shorter length, then the shorter one first.
@inline(__always)
func compareKeys(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int {
    let n = Swift.min(a.count, b.count)
    if n > 0, let pa = a.baseAddress, let pb = b.baseAddress {
        let c = memcmp(pa, pb, n)
        if c != 0 { return Int(c) }
    }
    return a.count == b.count ? 0 : (a.count < b.count ? -1 : 1)
}
