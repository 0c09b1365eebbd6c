import Foundation
import Glibc
import Logging

/// Files the kernel reads itself (FUSE passthrough, Linux 6.9+; see
/// CFuseRing/fuse_passthrough.h for the kernel's rules): a read-only open of an
/// entry whose committed value is a value file (past 8 MiB, never changed once
/// committed) names the file as its backing file, and the kernel serves its
/// reads from it without a round trip to the daemon, at the disk's speed.
///
/// The session connects the registration calls once mounted; the kernel turns
/// passthrough on at FUSE_INIT (`enabled`). A registration the kernel refuses
/// for good (not root: EPERM; a volume on a stacked filesystem: ELOOP; no such
/// ioctl) is logged and turns passthrough off for the rest of the mount; one
/// that fails otherwise (out of descriptors or memory) leaves that open's
/// reads to the daemon. Either way the open succeeds, read as without it.
final class BackingFiles: @unchecked Sendable {
    struct Session: Sendable {
        /// Whether FUSE_INIT turned passthrough on.
        let enabled: @Sendable () -> Bool
        /// Registers an open descriptor: the backing ID (> 0), or a negative errno.
        let register: @Sendable (Int32) -> Int32
        let unregister: @Sendable (Int32) -> Void
    }

    private let lock = NSLock()
    private var session: Session?
    private var refused = false

    /// Called by the session once mounted (`-o nopassthrough`: never).
    func connect(_ session: Session) { lock.withLock { self.session = session } }

    /// The session, if opens may name backing files now.
    private var usable: Session? {
        guard let session = lock.withLock({ refused ? nil : self.session }), session.enabled() else { return nil }
        return session
    }

    var available: Bool { usable != nil }

    /// Registers value file `number`, open as `fd` (the caller closes `fd`
    /// afterwards; the kernel keeps its own reference).
    func register(_ fd: Int32, valueFile number: UInt64, logger: Logger) -> Backing? {
        guard let session = usable else { return nil }
        let id = session.register(fd)
        if id > 0 { return Backing(id: id, valueFile: number) }
        let error = -id
        if error == ENOTCONN { return nil }  // the mount is ending
        guard Self.refusedForGood.contains(error) else {
            logger.warning("a large file could not be handed to the kernel; its reads go through the daemon",
                           metadata: ["error": "\(String(cString: strerror(error)))"])
            return nil
        }
        let first = lock.withLock { () -> Bool in
            defer { refused = true }
            return !refused
        }
        if first {
            logger.warning("the kernel refuses backing files: large files are read through the daemon from now on",
                           metadata: ["error": "\(String(cString: strerror(error)))"])
        }
        return nil
    }

    /// Errors that every later registration would meet too.
    static let refusedForGood: Set<Int32> = [EPERM, ELOOP, EINVAL, ENOTTY, EOPNOTSUPP, ENOSYS]

    func unregister(_ backing: Backing) { lock.withLock { session }?.unregister(backing.id) }
}
