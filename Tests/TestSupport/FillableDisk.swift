import Foundation

/// An ext4 without a journal on a loop device whose image lives on a tmpfs of
/// `roomMiB`: once `fill` takes the tmpfs's room, the ext4's writeback fails
/// (`ENOSPC`, then `EIO`) as a full or failing volume's would, and nothing goes
/// read-only (no journal to abort); `emptyRoom` gives the room back. `cleanUp`
/// (in `defer`) unmounts both, the ext4 first; a crash of the test process is
/// covered by a `CrashCleanup` guard on the folder. It shows that failures are
/// reported and refused, not that acknowledged bytes survive: the last write a
/// plain `fdatasync` acknowledged just before the tmpfs filled read back as
/// zeros after a remount (PLATFORM.md, "Fault injection").
public final class FillableDisk {
    public let mountPoint: String
    private let room: String
    private let guardian: CrashCleanup

    public init(in dir: TemporaryDirectory, mountedAt mountPoint: String, roomMiB: Int = 64, imageMiB: Int = 256) throws {
        self.mountPoint = mountPoint
        room = dir.sub("room")
        guardian = try CrashCleanup(CrashCleanup.unmountAndDetach(under: dir.path))
        do {
            try LoopFilesystem.sh("""
                mkdir -p '\(room)' '\(mountPoint)' && mount -t tmpfs -o size=\(roomMiB)M tmpfs '\(room)' &&
                truncate -s \(imageMiB)M '\(room)/img' && mkfs.ext4 -q -F -O ^has_journal -E nodiscard '\(room)/img' &&
                mount -o loop '\(room)/img' '\(mountPoint)'
                """)
        } catch {
            cleanUp()
            throw error
        }
    }

    /// Takes the tmpfs's room but `leavingKiB`.
    public func fill(leavingKiB: Int) throws {
        try LoopFilesystem.sh("head -c $(( $(df --output=avail -k '\(room)' | tail -1) - \(leavingKiB) ))K /dev/zero > '\(room)/filler' || true")
    }

    public func emptyRoom() throws {
        try LoopFilesystem.sh("rm -f '\(room)/filler'")
    }

    /// Unmounts the ext4 and mounts it again: what reads see after is what
    /// reached the disk, not pages left in the cache (nothing may hold it open).
    public func remount() throws {
        try LoopFilesystem.sh("umount '\(mountPoint)' && mount -o loop '\(room)/img' '\(mountPoint)'")
    }

    public func cleanUp() {
        _ = try? LoopFilesystem.sh("""
            if mountpoint -q '\(mountPoint)'; then umount '\(mountPoint)' || umount -l '\(mountPoint)'; fi
            if mountpoint -q '\(room)'; then umount '\(room)' || umount -l '\(room)'; fi
            """)
        guardian.dismiss()
    }
}
