import Foundation
import LMDB
import LMDBSnapshot
import Testing
import TestSupport

@Suite(.onOwnThreads, .serialized, .enabled(if: getuid() == 0, "loop devices and mounts need root"))
struct DeviceTests {
    /// The fixture's loop device detaches itself once its filesystem is unmounted
    /// (autoclear), so an unmount is all a crashed run's cleanup needs to do.
    @Test func theLoopDeviceGoesWithItsMount() async throws {
        let fs = try LoopFilesystem()
        defer { fs.cleanUp() }
        #expect(fs.autoclear)
        #expect(loopDevices(under: fs.dir.path) == [fs.device])
        #expect(try run("/bin/umount", [fs.mountPoint]).status == 0)
        #expect(try await waitUntil(10) { loopDevices(under: fs.dir.path).isEmpty })
    }

    /// A file written through ext4 and fdatasync'd reads back byte for byte from
    /// the raw device at the physical offsets FIEMAP gives (O_DIRECT).
    @Test func extentsOfAFileReadBackFromTheRawDevice() throws {
        let fs = try LoopFilesystem()
        defer { fs.cleanUp() }
        var rng = SeededRandom(seed: 31)
        let pageSize = 4096
        let path = fs.mountPoint + "/file"
        let fd = open(path, O_RDWR | O_CREAT, 0o644)
        #expect(fd >= 0)
        defer { close(fd) }
        var contents: [UInt8] = []
        for _ in 0 ..< 12 {
            let piece = rng.bytes(pageSize * 40)
            #expect(piece.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(contents.count)) } == piece.count)
            contents += piece
        }
        #expect(fdatasync(fd) == 0)
        let extents = try fileExtents(fd: fd)
        #expect(!extents.isEmpty)
        #expect(extents.allSatisfy { $0.isReadable })
        #expect(extents.last!.flags & FileExtent.last != 0)
        #expect(extents.first!.logical == 0 && extents.reduce(0) { $0 + $1.length } == UInt64(contents.count))
        // ext4 lays this file out in one or a few extents; the same mapping cut
        // into many pieces (some inside a page, at 512-byte boundaries) makes
        // reads cross extent boundaries everywhere.
        var pieces: [FileExtent] = []
        for extent in extents {
            var done: UInt64 = 0
            while done < extent.length {
                let n = min(extent.length - done, UInt64(512 * Int.random(in: 1 ... 24, using: &rng)))
                pieces.append(FileExtent(logical: extent.logical + done, physical: extent.physical + done, length: n, flags: 0))
                done += n
            }
        }
        #expect(pieces.count > 100)
        let pages = contents.count / pageSize
        for map in [extents, pieces.shuffled(using: &rng)] {
            let source = try DevicePageSource(device: fs.device, extents: map, pageSize: pageSize)
            #expect(try source.read(page: 0, count: pages) == contents)
            for _ in 0 ..< 50 {  // single pages and runs
                let page = Int.random(in: 0 ..< pages, using: &rng), count = Int.random(in: 1 ... min(60, pages - page), using: &rng)
                #expect(try source.read(page: UInt64(page), count: count) == Array(contents[page * pageSize ..< (page + count) * pageSize]))
            }
        }
        let source = try DevicePageSource(device: fs.device, extents: extents, pageSize: pageSize)
        // Past the file: no extent, an error, not zeros.
        #expect(throws: SnapshotError.self) { try source.read(page: UInt64(pages), count: 1) }
        #expect(throws: SnapshotError.self) { try source.read(page: UInt64(pages - 1), count: 2) }
    }

    @Test func holesAndUnwrittenExtentsAreErrorsNotZeros() throws {
        let fs = try LoopFilesystem()
        defer { fs.cleanUp() }
        let pageSize = 4096
        // A hole between two written pages.
        let sparse = open(fs.mountPoint + "/sparse", O_RDWR | O_CREAT, 0o644)
        defer { close(sparse) }
        let page = [UInt8](repeating: 0xAB, count: pageSize)
        _ = page.withUnsafeBytes { pwrite(sparse, $0.baseAddress, pageSize, 0) }
        _ = page.withUnsafeBytes { pwrite(sparse, $0.baseAddress, pageSize, off_t(10 * pageSize)) }
        fdatasync(sparse)
        let source = try DevicePageSource(device: fs.device, extents: try fileExtents(fd: sparse), pageSize: pageSize)
        #expect(try source.read(page: 0, count: 1) == page)
        #expect(try source.read(page: 10, count: 1) == page)
        #expect(throws: SnapshotError.unmapped(page: 5, "no extent holds file offset \(5 * pageSize)")) { try source.read(page: 5, count: 1) }
        // 300 written pages with holes between them: 300 extents, more than one FIEMAP call returns.
        let dotted = open(fs.mountPoint + "/dotted", O_RDWR | O_CREAT, 0o644)
        defer { close(dotted) }
        for i in 0 ..< 300 {
            let bytes = [UInt8](repeating: UInt8(i % 251), count: pageSize)
            _ = bytes.withUnsafeBytes { pwrite(dotted, $0.baseAddress, pageSize, off_t(2 * i * pageSize)) }
        }
        let many = try fileExtents(fd: dotted)
        #expect(many.count == 300)
        #expect(many.map(\.logical) == (0 ..< 300).map { UInt64(2 * $0 * pageSize) })
        let dots = try DevicePageSource(device: fs.device, extents: many, pageSize: pageSize)
        #expect(try dots.read(page: 598, count: 1) == [UInt8](repeating: UInt8(299 % 251), count: pageSize))
        #expect(throws: SnapshotError.self) { try dots.read(page: 597, count: 1) }
        // Allocated but never written (fallocate): FIEMAP says unwritten; reading it is refused.
        let reserved = open(fs.mountPoint + "/reserved", O_RDWR | O_CREAT, 0o644)
        defer { close(reserved) }
        #expect(posix_fallocate(reserved, 0, off_t(8 * pageSize)) == 0)
        let extents = try fileExtents(fd: reserved)
        #expect(!extents.isEmpty && extents.allSatisfy { $0.flags & FileExtent.unwritten != 0 })
        let unwritten = try DevicePageSource(device: fs.device, extents: extents, pageSize: pageSize)
        do {
            _ = try unwritten.read(page: 2, count: 1)
            Issue.record("an unwritten extent was read")
        } catch SnapshotError.unmapped(let p, _) {
            #expect(p == 2)
        }
    }

    /// The whole path a backup takes: an LMDB environment on ext4, its root and
    /// extent map taken after a sync, every database read from the raw device.
    @Test func aSnapshotReadFromTheRawDeviceMatchesLMDB() throws {
        let fs = try LoopFilesystem()
        defer { fs.cleanUp() }
        let envDir = fs.mountPoint + "/shard-1"
        try FileManager.default.createDirectory(atPath: envDir, withIntermediateDirectories: true)
        do {
            let f = try Fixture(label: "snapshot-device", in: envDir)
            try f.fill(seed: 33, entries: 5_000)
            try f.env.read { pin in
                try f.env.sync(force: true)
                let fd = open(f.dataFile, O_RDONLY)
                defer { close(fd) }
                let root = try SnapshotRoot.readMetaPages(fd: fd).max { $0.txnid < $1.txnid }!
                let extents = try fileExtents(fd: fd)
                let device = try DevicePageSource(device: fs.device, extents: extents, pageSize: root.pageSize)
                let snapshot = try Snapshot(source: device, root: root, cacheBytes: 1 << 20)
                try expectSameContents(f, snapshot, pin)
            }
        }
    }
}
