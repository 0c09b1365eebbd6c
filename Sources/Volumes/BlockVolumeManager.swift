import Foundation

/// The filesystems a block volume may carry. Both are journaled single-host
/// filesystems: the primary mounts read-write, a backup read-only with journal
/// replay switched off (`noload` for ext4, `norecovery` for xfs) — a plain `ro`
/// mount replays the journal, which writes to a volume the primary owns. xfs
/// also needs `nouuid` when one kernel sees the volume twice (two loop devices):
/// it refuses a second filesystem with the same UUID.
public enum VolumeFilesystem: String, Sendable, CaseIterable {
    case ext4, xfs

    var mkfs: (tool: String, arguments: [String]) {
        switch self {
        case .ext4: return ("mkfs.ext4", ["-q", "-F"])
        case .xfs: return ("mkfs.xfs", ["-q", "-f"])
        }
    }

    func mountOptions(readOnly: Bool) -> String {
        // xfs rw: nouuid too, for the promoted backup of one kernel (two loop
        // devices) while the fenced primary's shut-down mount still exists; on
        // separate hosts it changes nothing. The log is replayed either way.
        guard readOnly else { return self == .xfs ? "rw,nouuid" : "rw" }
        switch self {
        case .ext4: return "ro,noload"
        case .xfs: return "ro,norecovery,nouuid"
        }
    }
}

/// Attaches block volumes to this instance, formats a new one on its first
/// read-write mount, and mounts each at `<volume root>/<volumeID>`. A restart
/// after a crash adopts what is already there: a mount at the volume's path
/// (from /proc/self/mountinfo) and an attachment of this instance (the
/// provider's; the loop provider finds its loop device by backing file).
public final class BlockVolumeManager: VolumeManager, @unchecked Sendable {
    public let volumeRoot: String
    public let provider: any CloudProvider
    public let instanceID: String
    public let filesystem: VolumeFilesystem
    public var attachTimeout: Duration = .seconds(120)
    public var deviceTimeout: Duration = .seconds(60)
    public var pollInterval: Duration = .milliseconds(500)
    let runner = CommandRunner()
    let mountInfoPath: String
    private let lock = NSLock()
    private var mounted: [String: MountedVolume] = [:]
    /// Volumes attached here by `attach` without a mount (a backup's raw device).
    private var attachedOnly: [String: AttachedVolume] = [:]

    public init(provider: any CloudProvider, volumeRoot: String, instanceID: String, filesystem: VolumeFilesystem = .ext4,
                mountInfoPath: String = "/proc/self/mountinfo") {
        self.provider = provider
        self.volumeRoot = URL(fileURLWithPath: volumeRoot).standardizedFileURL.path
        self.instanceID = instanceID
        self.filesystem = filesystem
        self.mountInfoPath = mountInfoPath
    }

    public func mountPath(_ volumeID: String) -> String { (volumeRoot == "/" ? "" : volumeRoot) + "/" + volumeID }

    public func mount(_ volumeID: String, readOnly: Bool) async throws -> MountedVolume {
        try await mount(volumeID, readOnly: readOnly, format: true)
    }

    /// `format` false: a blank device is refused instead of formatted (a
    /// promotion must find the primary's filesystem, never make a new one).
    func mount(_ volumeID: String, readOnly: Bool, format: Bool) async throws -> MountedVolume {
        try FolderCloudProvider.validate(volumeID)
        let target = mountPath(volumeID)
        if let known = lock.withLock({ mounted[volumeID] }) {
            guard known.readOnly == readOnly else { throw roleMismatch(volumeID, mountedReadOnly: known.readOnly) }
            return known
        }
        // After a crash the mount may still be there: adopt it, unless another
        // node fenced this one off the volume meanwhile.
        try await dropFencedMount(volumeID)
        if let existing = mountInfo(at: target) {
            guard existing.readOnly == readOnly else { throw roleMismatch(volumeID, mountedReadOnly: existing.readOnly) }
            return remember(MountedVolume(volumeID: volumeID, mountPath: target, readOnly: readOnly, device: existing.source))
        }
        let (device, attachedNow) = try await attachDevice(volumeID, readOnly: readOnly)
        do {
            if let elsewhere = MountInfo.current(path: mountInfoPath).first(where: { $0.source == device }) {
                throw VolumeError.failed("device \(device) of volume \(volumeID) is already mounted at \(elsewhere.mountPoint); "
                                         + "unmount it there first")
            }
            try await prepareFilesystem(volumeID, device: device, readOnly: readOnly, format: format)
            do { try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true) } catch {
                throw VolumeError.failed("cannot create mount point \(target) for volume \(volumeID): \(error.localizedDescription)")
            }
            try await runner.check("mount", ["-t", filesystem.rawValue, "-o", filesystem.mountOptions(readOnly: readOnly), device, target],
                                   purpose: "cannot mount volume \(volumeID) (\(device)) at \(target)")
        } catch {
            // Leave nothing half done: an attachment this call made goes again.
            if attachedNow { try? await provider.detachVolume(volumeID, instanceID: instanceID) }
            throw error
        }
        lock.withLock { _ = attachedOnly.removeValue(forKey: volumeID) }
        return remember(MountedVolume(volumeID: volumeID, mountPath: target, readOnly: readOnly, device: device))
    }

    /// Attaches the volume to this instance without mounting it and returns its
    /// local block device: a backup holds the volume this way and reads the raw
    /// device (O_DIRECT at the extents FIEMAP names), which no mount's stale
    /// caches can spoil. Idempotent: an attachment of this instance in the same
    /// mode is reused, and a volume this manager already mounted in that mode
    /// answers its device. Loop volumes attach read-only at the block layer
    /// (`losetup -r`); cloud attachments are read-write there, so the caller
    /// opens the device `O_RDONLY`. `detach` ends it; `releaseAll` too.
    public func attach(_ volumeID: String, readOnly: Bool) async throws -> AttachedVolume {
        try FolderCloudProvider.validate(volumeID)
        try await dropFencedMount(volumeID)
        if let known = lock.withLock({ mounted[volumeID] }) ?? mountInfo(at: mountPath(volumeID)).map({
            MountedVolume(volumeID: volumeID, mountPath: mountPath(volumeID), readOnly: $0.readOnly, device: $0.source)
        }) {
            guard known.readOnly == readOnly else { throw roleMismatch(volumeID, mountedReadOnly: known.readOnly) }
            return AttachedVolume(volumeID: volumeID, device: known.device, readOnly: readOnly)
        }
        let (device, _) = try await attachDevice(volumeID, readOnly: readOnly)
        let attached = AttachedVolume(volumeID: volumeID, device: device, readOnly: readOnly)
        lock.withLock { attachedOnly[volumeID] = attached }
        return attached
    }

    /// The local block device of this instance's attachment of the volume
    /// (mounted or not), nil when it is not attached here.
    public func localDevice(of volumeID: String) async throws -> String? {
        try FolderCloudProvider.validate(volumeID)
        guard let attachment = try await provider.describeVolume(volumeID).attachment(of: instanceID),
              attachment.state == .attached else { return nil }
        return try await provider.localDevice(of: volumeID, instanceID: instanceID)
    }

    /// Volumes attached by `attach` and not mounted.
    public func attachedVolumes() -> [AttachedVolume] {
        lock.withLock { attachedOnly.values.sorted { $0.volumeID < $1.volumeID } }
    }

    /// Makes this node the volume's writer after its primary, `oldInstance`, is
    /// gone or must go: the volume layer's part of a promotion (winning the
    /// volume in metadata comes before, replaying batch logs and publishing the
    /// epoch after — the caller's).
    ///
    /// 1. fence `oldInstance`: forced detach, then wait until the cloud lists it
    ///    no more (`CloudProvider.fence`); from here its writes cannot land;
    /// 2. unmount this node's read-only mount of the volume, if any, or a
    ///    read-write one whose attachment is no longer listed (another node fenced
    ///    this one: it was deposed, and is promoted back; `dropFencedMount`);
    /// 3. detach this instance's read-only attachment, if any (loop: a `losetup -r`
    ///    device cannot become writable; cloud attachments are read-write already
    ///    and stay);
    /// 4. attach read-write and mount read-write: the journal is replayed here
    ///    (ext4; xfs replays its log), so what the old primary committed to the
    ///    journal is in the filesystem. A blank device is refused, never formatted.
    ///
    /// Idempotent and restartable: every step first looks at what is there (no
    /// attachment to fence, no mount, a read-write mount already), so a promote
    /// retried after a crash at any step goes on from where it stopped, and a
    /// promote of a volume this node already has read-write answers its mount.
    /// `oldInstance` nil: nobody to fence (the volume had no primary).
    public func promote(_ volumeID: String, fencing oldInstance: String?) async throws -> MountedVolume {
        try FolderCloudProvider.validate(volumeID)
        if let oldInstance {
            guard oldInstance != instanceID else {
                throw VolumeError.invalidArgument("promoting volume \(volumeID): instance \(instanceID) cannot fence itself")
            }
            try await provider.fence(volumeID, instanceID: oldInstance, timeout: attachTimeout, poll: pollInterval)
        }
        let target = mountPath(volumeID)
        try await dropFencedMount(volumeID)
        if let existing = mountInfo(at: target) {
            if !existing.readOnly {
                lock.withLock { _ = attachedOnly.removeValue(forKey: volumeID) }
                return remember(MountedVolume(volumeID: volumeID, mountPath: target, readOnly: false, device: existing.source))
            }
            try await unmount(volumeID)
        }
        lock.withLock { _ = mounted.removeValue(forKey: volumeID) }
        if let mine = try await provider.describeVolume(volumeID).attachment(of: instanceID), mine.readOnly {
            try await provider.detachVolume(volumeID, instanceID: instanceID)
            try await provider.waitFor(volumeID, .detached(instanceID: instanceID), timeout: attachTimeout, poll: pollInterval)
        }
        lock.withLock { _ = attachedOnly.removeValue(forKey: volumeID) }
        return try await mount(volumeID, readOnly: false, format: false)
    }

    /// A clean stop: unmounts and detaches every volume this manager mounted or
    /// attached, each from this instance only. It goes on past a volume that
    /// fails (busy, the cloud down) and throws the first failure at the end,
    /// naming every volume left; those stay as they are and the next start adopts them.
    public func releaseAll() async throws {
        let ids = Set(mountedVolumes().map(\.volumeID) + attachedVolumes().map(\.volumeID)).sorted()
        var failures: [(String, Error)] = []
        for id in ids {
            do { try await detach(id) } catch { failures.append((id, error)) }
        }
        if let (first, error) = failures.first {
            throw VolumeError.failed("releasing the volumes of instance \(instanceID): \(failures.count) left attached "
                                     + "(\(failures.map(\.0).joined(separator: ", "))); \(first): \(error)")
        }
    }

    /// Unmounts the volume; it stays attached (`detach` also detaches).
    public func unmount(_ volumeID: String) async throws {
        try FolderCloudProvider.validate(volumeID)
        let target = mountPath(volumeID)
        let known = lock.withLock { mounted[volumeID] }
        guard known != nil || mountInfo(at: target) != nil else { throw VolumeError.notMounted(volumeID) }
        if mountInfo(at: target) != nil {
            try await runner.check("umount", [target], purpose: "cannot unmount volume \(volumeID) at \(target) "
                                   + "(a process still using it? see fuser -m \(target); a large file of the ShardFS "
                                   + "mount that a process holds open, read by the kernel, holds the volume too: "
                                   + "fuser -m on that mount)")
        }
        lock.withLock { _ = mounted.removeValue(forKey: volumeID) }
    }

    /// Unmounts (if mounted) and detaches the volume from this instance, waiting until the cloud says it is.
    public func detach(_ volumeID: String) async throws {
        if mountInfo(at: mountPath(volumeID)) != nil || lock.withLock({ mounted[volumeID] }) != nil {
            try await unmount(volumeID)
        }
        lock.withLock { _ = attachedOnly.removeValue(forKey: volumeID) }
        let volume = try await provider.describeVolume(volumeID)
        guard volume.attachment(of: instanceID) != nil else { return }
        try await provider.detachVolume(volumeID, instanceID: instanceID)
        try await provider.waitFor(volumeID, .detached(instanceID: instanceID), timeout: attachTimeout, poll: pollInterval)
    }

    /// Registers those of `volumeIDs` already mounted at their paths (after a
    /// restart) and returns them. Only named volumes: with the volume root "/",
    /// /boot or /home must never pass for volumes.
    @discardableResult
    public func adoptMounts(of volumeIDs: [String]) -> [MountedVolume] {
        let table = MountInfo.current(path: mountInfoPath)
        return volumeIDs.sorted().compactMap { id -> MountedVolume? in
            guard FolderCloudProvider.problem(with: id) == nil,
                  let info = table.last(where: { $0.mountPoint == mountPath(id) }) else { return nil }
            return remember(MountedVolume(volumeID: id, mountPath: info.mountPoint, readOnly: info.readOnly, device: info.source))
        }
    }

    public func mountedVolumes() -> [MountedVolume] {
        lock.withLock { mounted.values.sorted { $0.volumeID < $1.volumeID } }
    }

    public func freeBytes(_ volumeID: String) throws -> Int {
        guard let volume = lock.withLock({ mounted[volumeID] }) else { throw VolumeError.notMounted(volumeID) }
        return try availableBytes(at: volume.mountPath)
    }

    // MARK: Steps

    /// Attaches (or finds this instance's attachment) and waits for the local
    /// device; also says whether this call made the attachment.
    private func attachDevice(_ volumeID: String, readOnly: Bool) async throws -> (device: String, attachedNow: Bool) {
        let volume = try await provider.describeVolume(volumeID)
        var attachedNow = true
        // A read-only attachment (loop: `losetup -r`) cannot serve a writer.
        if !readOnly, let mine = volume.attachment(of: instanceID), mine.readOnly, mine.state != .detached {
            throw VolumeError.failed("volume \(volumeID) is attached read-only to \(instanceID) (\(mine.device)); detach it first "
                                     + "to attach it read-write, or promote")
        }
        switch volume.attachment(of: instanceID)?.state {
        case .attached?, .attaching?:
            attachedNow = false
        case .detaching?:
            try await provider.waitFor(volumeID, .detached(instanceID: instanceID), timeout: attachTimeout, poll: pollInterval)
            _ = try await provider.attachVolume(volumeID, instanceID: instanceID, readOnly: readOnly)
        default:
            do {
                _ = try await provider.attachVolume(volumeID, instanceID: instanceID, readOnly: readOnly)
            } catch let error as VolumeError {
                // A retried attach whose lost first try did land is refused ("in use"):
                // the cloud's own view decides.
                guard case .cloud = error, let now = try? await provider.describeVolume(volumeID),
                      let mine = now.attachment(of: instanceID), [.attached, .attaching].contains(mine.state) else { throw error }
            }
        }
        do {
            try await provider.waitFor(volumeID, .attached(instanceID: instanceID), timeout: attachTimeout, poll: pollInterval)
        } catch VolumeError.timedOut(let text) {
            throw VolumeError.timedOut("\(text); the attachment may still complete: mount again later, or detach volume "
                                       + "\(volumeID) from \(instanceID) and retry")
        }
        let device = try await provider.waitForDevice(of: volumeID, instanceID: instanceID, timeout: deviceTimeout, poll: pollInterval)
        return (device, attachedNow)
    }

    /// Makes the configured filesystem on a blank device (read-write only), and
    /// refuses a device that holds something else.
    private func prepareFilesystem(_ volumeID: String, device: String, readOnly: Bool, format: Bool) async throws {
        // blkid -p probes the device itself (no cache); exit 2 means nothing found.
        let probe = try await runner.runAsync("blkid", ["-p", "-o", "export", device])
        let fields = Dictionary(probe.stdout.split(separator: "\n").compactMap { line -> (String, String)? in
            guard let eq = line.firstIndex(of: "=") else { return nil }
            return (String(line[..<eq]), String(line[line.index(after: eq)...]))
        }, uniquingKeysWith: { a, _ in a })
        switch probe.status {
        case 0:
            if let type = fields["TYPE"] {
                guard type == filesystem.rawValue else {
                    throw VolumeError.failed("volume \(volumeID) (\(device)) holds a \(type) filesystem, not \(filesystem.rawValue); "
                                             + "ShardFS does not reformat it: use another volume or set the filesystem to \(type)")
                }
                return
            }
            throw VolumeError.failed("volume \(volumeID) (\(device)) holds \(fields["PTTYPE"].map { "a \($0) partition table" } ?? "data blkid cannot name"); "
                                     + "ShardFS uses whole-device filesystems and does not overwrite it")
        case 2:
            guard !readOnly else {
                throw VolumeError.failed("volume \(volumeID) has no filesystem yet; its primary formats it on its first "
                                         + "read-write mount, mount it read-only after that")
            }
            guard format else {
                throw VolumeError.failed("volume \(volumeID) (\(device)) shows no filesystem; a promotion takes over the "
                                         + "primary's filesystem and never formats: check that this is the right device")
            }
            let (tool, arguments) = filesystem.mkfs
            try await runner.check(tool, arguments + [device], purpose: "cannot make a \(filesystem.rawValue) filesystem on volume \(volumeID) (\(device))")
        default:
            throw VolumeError.failed("cannot probe volume \(volumeID) (\(device)): blkid exited with \(probe.status): "
                                     + probe.stderr.trimmingCharacters(in: .whitespacesAndNewlines))
        }
    }

    /// A mount of the volume here whose attachment the provider no longer lists
    /// (or lists as detached) sits on a device another node fenced off (a revoked
    /// loop device, a cloud disk force-detached): every I/O through it fails, and
    /// the deposed node's shards may still hold files open on it. It is unmounted
    /// lazily (`umount -l`: those files go on failing) so that the volume can be
    /// attached afresh. (`detaching` is not taken as fenced: Aliyun reports the
    /// disk's state, not this instance's.)
    private func dropFencedMount(_ volumeID: String) async throws {
        let target = mountPath(volumeID)
        guard mountInfo(at: target) != nil else { return }
        let mine = try await provider.describeVolume(volumeID).attachment(of: instanceID)
        guard mine == nil || mine?.state == .detached else { return }
        do {
            try await runner.check("umount", ["-l", target],
                                   purpose: "cannot unmount volume \(volumeID) at \(target), whose device another node fenced off")
        } catch {
            guard mountInfo(at: target) == nil else { throw error }  // else a concurrent call unmounted it
        }
        lock.withLock {
            _ = mounted.removeValue(forKey: volumeID)
            _ = attachedOnly.removeValue(forKey: volumeID)
        }
    }

    private func mountInfo(at path: String) -> MountInfo? {
        MountInfo.current(path: mountInfoPath).last { $0.mountPoint == path }
    }

    private func remember(_ volume: MountedVolume) -> MountedVolume {
        lock.withLock { mounted[volume.volumeID] = volume }
        return volume
    }

    private func roleMismatch(_ volumeID: String, mountedReadOnly: Bool) -> VolumeError {
        .failed("volume \(volumeID) is mounted \(mountedReadOnly ? "read-only" : "read-write") at \(mountPath(volumeID)); "
                + "unmount it before mounting it \(mountedReadOnly ? "read-write" : "read-only")")
    }
}
