import Foundation

/// Block volumes of one machine, for a single host and for the tests: a volume
/// is a sparse image file `<image folder>/<volumeID>.img` with a record
/// `<volumeID>.json` (spec, tags, idempotency token, attachments); attaching it
/// to an "instance" sets up a loop device over the image, read-only
/// (`losetup -r`) when asked. Two loop devices over one image behave like one
/// volume attached to two hosts. Loop devices do direct I/O on the image
/// (`--direct-io=on`): the volume's pages are cached once, by the filesystem on
/// it, not a second time as the image's, like a real block device — large values
/// read and write about twice as fast as through a buffered loop device
/// (docs/PERFORMANCE.md), and a read-only device reads what the writer's device
/// wrote to the image, cached or not. Records change under an exclusive `flock` of
/// `<image folder>/.lock`, so several processes may share the folder.
///
/// At most one read-write attachment at a time: ext4 and xfs are not cluster
/// filesystems, and a second writer would corrupt the volume.
///
/// A forced detach *revokes* the instance's loop device before detaching it
/// (`revoke`): its capacity drops to zero, so every later I/O through it fails
/// with EIO — like an EBS volume force-detached from a hung instance, and unlike
/// `losetup -d`, which waits for the last user of a busy device. This kernel has
/// no device-mapper (no dm `error` target to load), so the loop device itself is
/// what gets cut.
public struct LoopCloudProvider: CloudProvider {
    public let name = "loop"
    public let imageDirectory: String
    public let sysBlockDirectory: String
    let runner = CommandRunner()

    /// The smallest image: mkfs.ext4 needs a few MiB for its journal and tables.
    public static let minimumSize = 16 << 20

    public init(imageDirectory: String, sysBlockDirectory: String = "/sys/block") {
        self.imageDirectory = URL(fileURLWithPath: imageDirectory).standardizedFileURL.path
        self.sysBlockDirectory = sysBlockDirectory
    }

    struct Record: Codable, Equatable {
        struct Attachment: Codable, Equatable {
            var device: String
            var readOnly: Bool
        }
        var volumeID: String
        var sizeBytes: Int
        var type: String
        var iops: Int?
        var throughputMiBps: Int?
        var multiAttach: Bool
        var availabilityZone: String
        var tags: [String: String]
        var idempotencyToken: String
        /// instance ID → loop device.
        var attachments: [String: Attachment]
    }

    public func imagePath(_ id: String) -> String { imageDirectory + "/" + id + ".img" }
    func recordPath(_ id: String) -> String { imageDirectory + "/" + id + ".json" }

    // MARK: CloudProvider

    public func createVolume(_ spec: VolumeSpec) async throws -> CloudVolume {
        guard spec.sizeBytes >= Self.minimumSize else {
            throw VolumeError.invalidArgument("a loop volume needs at least \(Self.minimumSize >> 20) MiB, not \(spec.sizeBytes) bytes")
        }
        return try await locked {
            if !spec.idempotencyToken.isEmpty,
               let earlier = try allRecords().first(where: { $0.idempotencyToken == spec.idempotencyToken }) {
                return volume(earlier)
            }
            var id: String
            repeat {
                id = "vol-" + String(UInt64.random(in: 0...UInt64.max) & 0xffff_ffff_ffff, radix: 16).leftPadded(to: 12)
            } while FileManager.default.fileExists(atPath: recordPath(id))
            // Sparse: ftruncate allocates nothing; blocks are taken as they are written.
            let fd = open(imagePath(id), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw VolumeError.failed("cannot create image \(imagePath(id)): \(errnoText())") }
            defer { close(fd) }
            guard ftruncate(fd, off_t(spec.sizeBytes)) == 0 else {
                let text = errnoText()
                unlink(imagePath(id))
                throw VolumeError.failed("cannot size image \(imagePath(id)) to \(spec.sizeBytes) bytes: \(text)")
            }
            let record = Record(volumeID: id, sizeBytes: spec.sizeBytes, type: spec.type.isEmpty ? "loop" : spec.type,
                                iops: spec.iops, throughputMiBps: spec.throughputMiBps, multiAttach: spec.multiAttach,
                                availabilityZone: spec.availabilityZone, tags: spec.tags,
                                idempotencyToken: spec.idempotencyToken, attachments: [:])
            do { try save(record) } catch {
                unlink(imagePath(id))
                throw error
            }
            return volume(record)
        }
    }

    public func attachVolume(_ volumeID: String, instanceID: String, readOnly: Bool) async throws -> VolumeAttachment {
        guard !instanceID.isEmpty else { throw VolumeError.invalidArgument("attaching \(volumeID) needs an instance ID") }
        return try await locked {
            var record = try load(volumeID)
            removeStaleRevokedDevices(volumeID)
            let live = liveAttachments(record)
            if let mine = live[instanceID] {
                guard mine.readOnly == readOnly else {
                    throw VolumeError.failed("volume \(volumeID) is already attached to \(instanceID) \(mine.readOnly ? "read-only" : "read-write") "
                                             + "as \(mine.device); detach it first to attach it \(readOnly ? "read-only" : "read-write")")
                }
                return VolumeAttachment(instanceID: instanceID, state: .attached, device: mine.device, readOnly: readOnly)
            }
            let others = live.filter { $0.key != instanceID }
            if !record.multiAttach, let other = others.first {
                throw VolumeError.failed("volume \(volumeID) is not multi-attach and is attached to \(other.key); detach it there first")
            }
            if !readOnly, let writer = others.first(where: { !$0.value.readOnly }) {
                throw VolumeError.failed("volume \(volumeID) is attached read-write to \(writer.key) (\(writer.value.device)); "
                                         + "ext4 has one writer: detach it there, or attach read-only")
            }
            // A loop device over the image that no record claims was set up by a
            // process that died before saving the record: adopt it, not a second one.
            let claimed = Set(live.values.map(\.device))
            let device: String
            if let orphan = loopDevices(backing: imagePath(volumeID)).first(where: {
                !claimed.contains($0.device) && $0.readOnly == readOnly && !$0.revoked
            }) {
                device = orphan.device
            } else {
                let out = try runner.run("losetup", (readOnly ? ["-r"] : []) + ["--direct-io=on", "-f", "--show", imagePath(volumeID)])
                guard out.status == 0 else {
                    throw VolumeError.failed("cannot attach \(volumeID): losetup exited with \(out.status): "
                                             + out.stderr.trimmingCharacters(in: .whitespacesAndNewlines) + " (is this process root, with loop devices available?)")
                }
                device = out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            }
            record.attachments = live
            record.attachments[instanceID] = .init(device: device, readOnly: readOnly)
            do { try save(record) } catch {
                _ = try? runner.run("losetup", ["-d", device])
                throw error
            }
            return VolumeAttachment(instanceID: instanceID, state: .attached, device: device, readOnly: readOnly)
        }
    }

    public func detachVolume(_ volumeID: String, instanceID: String) async throws {
        try await locked {
            var record = try load(volumeID)
            var live = liveAttachments(record)
            guard let mine = live.removeValue(forKey: instanceID) else {
                throw VolumeError.failed("volume \(volumeID) is not attached to \(instanceID)")
            }
            if MountInfo.current().contains(where: { $0.source == mine.device }) {
                throw VolumeError.failed("volume \(volumeID) is still mounted from \(mine.device); unmount it before detaching")
            }
            let out = try runner.run("losetup", ["-d", mine.device])
            if out.status != 0 && isLoop(mine.device, backing: imagePath(volumeID)) {
                throw VolumeError.failed("cannot detach \(volumeID) from \(instanceID): losetup -d \(mine.device): "
                                         + out.stderr.trimmingCharacters(in: .whitespacesAndNewlines))
            }
            // While something still holds the device open (a just-finished unmount,
            // a udev probe) the kernel only marks it for autoclear: wait it out.
            let deadline = Date(timeIntervalSinceNow: 10)
            while isLoop(mine.device, backing: imagePath(volumeID)) {
                guard Date() < deadline else {
                    throw VolumeError.failed("loop device \(mine.device) of volume \(volumeID) is still open after losetup -d; "
                                             + "find who holds it (fuser \(mine.device)) and detach again")
                }
                usleep(20_000)
            }
            record.attachments = live
            try save(record)
        }
    }

    /// Revokes the instance's loop device (every later read or write through
    /// it fails with EIO, whatever its host is doing or will do when it wakes up),
    /// then detaches it: at once when nothing holds it, else when its last user
    /// lets go (the kernel's autoclear). A read-write loop device over the image
    /// that no record claims (an attach that crashed before saving its record)
    /// is revoked too: it could be the fenced instance's. No attachment of the
    /// instance is not an error: a retried fence finds its work done.
    public func forceDetachVolume(_ volumeID: String, instanceID: String) async throws {
        try await locked {
            var record = try load(volumeID)
            let image = imagePath(volumeID)
            let others = Set(record.attachments.filter { $0.key != instanceID }.map(\.value.device))
            var victims = loopDevices(backing: image).filter { !$0.revoked && !$0.readOnly && !others.contains($0.device) }.map(\.device)
            if let mine = record.attachments[instanceID], isLoop(mine.device, backing: image), !victims.contains(mine.device),
               !isRevoked(mine.device) {
                victims.append(mine.device)
            }
            for device in victims {
                try Self.revoke(device)
                // Busy (the old host still has it mounted): the kernel clears it when that mount goes.
                _ = try? runner.run("losetup", ["-d", device])
            }
            if record.attachments.removeValue(forKey: instanceID) != nil { try save(record) }
        }
    }

    public func deleteVolume(_ volumeID: String) async throws {
        try await locked {
            let record = try load(volumeID)
            removeStaleRevokedDevices(volumeID)
            let live = liveAttachments(record)
            if let any = live.first {
                throw VolumeError.failed("volume \(volumeID) is attached to \(any.key) (\(any.value.device)); detach it before deleting")
            }
            if let stray = loopDevices(backing: imagePath(volumeID)).first {
                throw VolumeError.failed("volume \(volumeID) still has loop device \(stray.device); run losetup -d \(stray.device) first")
            }
            unlink(recordPath(volumeID))
            unlink(imagePath(volumeID))
        }
    }

    public func describeVolumes(_ volumeIDs: [String], nextToken: String?, maxResults: Int?) async throws -> VolumePage {
        try await locked {
            var records = try volumeIDs.isEmpty ? allRecords() : volumeIDs.map { try load($0) }
            records.sort { $0.volumeID < $1.volumeID }
            if let nextToken { records = records.filter { $0.volumeID > nextToken } }
            let page = maxResults.map { Array(records.prefix(max(1, $0))) } ?? records
            return VolumePage(volumes: page.map(volume), nextToken: page.count < records.count ? page.last?.volumeID : nil)
        }
    }

    public func localDevice(of volumeID: String, instanceID: String) async throws -> String? {
        try await locked { liveAttachments(try load(volumeID))[instanceID]?.device }
    }

    // MARK: Loop devices

    /// Loop devices whose backing file is `image`, from sysfs.
    func loopDevices(backing image: String) -> [(device: String, readOnly: Bool, revoked: Bool)] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: sysBlockDirectory)) ?? []
        return names.filter { $0.hasPrefix("loop") }.sorted().compactMap { name in
            let device = "/dev/" + name
            guard isLoop(device, backing: image) else { return nil }
            let ro = (try? String(contentsOfFile: sysBlockDirectory + "/" + name + "/ro", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) == "1"
            return (device, ro, isRevoked(device))
        }
    }

    /// The offset `revoke` gives a loop device: past the end of any image, so
    /// the device shows no byte of it (capacity 0).
    static let revokedOffset: UInt64 = 1 << 62

    /// Whether `revoke` cut this loop device off its image.
    func isRevoked(_ device: String) -> Bool {
        let name = (device as NSString).lastPathComponent
        guard let text = try? String(contentsOfFile: sysBlockDirectory + "/" + name + "/loop/offset", encoding: .utf8),
              let offset = UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return false }
        return offset >= Self.revokedOffset
    }

    /// Cuts a loop device off its image while it stays in use: LOOP_SET_STATUS64
    /// moves its offset past the image's end, the kernel drains the I/O in flight
    /// (the loop worker is not paused with a paused process) and sets the
    /// device's capacity to 0. From then on every bio to it fails (beyond the end
    /// of the device): the filesystem mounted from it aborts its journal, fsync
    /// answers EIO, and its dirty pages never reach the image. Pages it wrote
    /// before the call may have reached the image; none after.
    static func revoke(_ device: String) throws {
        let fd = open(device, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw VolumeError.failed("cannot open loop device \(device) to revoke it: \(errnoText())") }
        defer { close(fd) }
        // struct loop_info64 (linux/loop.h): 232 bytes; lo_offset at byte 24.
        let loopGetStatus64: UInt = 0x4C05, loopSetStatus64: UInt = 0x4C04
        var info = [UInt8](repeating: 0, count: 232)
        let failed = info.withUnsafeMutableBytes { raw -> String? in
            guard ioctl(fd, loopGetStatus64, raw.baseAddress!) == 0 else { return "LOOP_GET_STATUS64: \(errnoText())" }
            raw.storeBytes(of: revokedOffset, toByteOffset: 24, as: UInt64.self)
            guard ioctl(fd, loopSetStatus64, raw.baseAddress!) == 0 else { return "LOOP_SET_STATUS64: \(errnoText())" }
            return nil
        }
        if let failed { throw VolumeError.failed("cannot revoke loop device \(device): \(failed)") }
        var size: UInt64 = 0
        let blkGetSize64: UInt = 0x8008_1272
        let status = withUnsafeMutablePointer(to: &size) { ioctl(fd, blkGetSize64, $0) }
        guard status == 0, size == 0 else {
            throw VolumeError.failed("loop device \(device) still shows \(size) bytes after its revocation")
        }
    }

    /// Detaches the revoked loop devices over the volume's image that nothing
    /// holds any more (their host died or unmounted); a held one keeps its
    /// autoclear and goes when its holder does.
    func removeStaleRevokedDevices(_ volumeID: String) {
        // Not waited for: the fenced host may hold one for as long as it lives (a
        // promotion must not wait on it), and one left over is never adopted.
        for stale in loopDevices(backing: imagePath(volumeID)) where stale.revoked {
            _ = try? runner.run("losetup", ["-d", stale.device])
        }
    }

    func isLoop(_ device: String, backing image: String) -> Bool {
        let name = (device as NSString).lastPathComponent
        guard let backing = try? String(contentsOfFile: sysBlockDirectory + "/" + name + "/loop/backing_file", encoding: .utf8) else {
            return false
        }
        // The kernel reports the path it opened, symlinks resolved.
        let resolved = URL(fileURLWithPath: image).resolvingSymlinksInPath().path
        return backing.trimmingCharacters(in: .newlines) == resolved
    }

    /// The record's attachments whose loop device still backs the image and is
    /// not revoked (a reboot, someone's `losetup -d` or a forced detach ends them).
    func liveAttachments(_ record: Record) -> [String: Record.Attachment] {
        record.attachments.filter { isLoop($0.value.device, backing: imagePath(record.volumeID)) && !isRevoked($0.value.device) }
    }

    func volume(_ record: Record) -> CloudVolume {
        let live = liveAttachments(record)
        return CloudVolume(
            volumeID: record.volumeID, sizeBytes: record.sizeBytes, type: record.type, iops: record.iops,
            throughputMiBps: record.throughputMiBps, multiAttach: record.multiAttach,
            availabilityZone: record.availabilityZone, state: live.isEmpty ? .available : .inUse,
            attachments: live.sorted { $0.key < $1.key }.map {
                VolumeAttachment(instanceID: $0.key, state: .attached, device: $0.value.device, readOnly: $0.value.readOnly)
            },
            tags: record.tags)
    }

    // MARK: Records

    func load(_ id: String) throws -> Record {
        try FolderCloudProvider.validate(id)
        guard let data = FileManager.default.contents(atPath: recordPath(id)) else { throw VolumeError.notFound(id) }
        do { return try JSONDecoder().decode(Record.self, from: data) } catch {
            throw VolumeError.failed("the record \(recordPath(id)) of loop volume \(id) does not decode: \(error)")
        }
    }

    func allRecords() throws -> [Record] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: imageDirectory)) ?? []
        return try names.filter { $0.hasSuffix(".json") && !$0.hasPrefix(".") }.map { try load(String($0.dropLast(5))) }
    }

    /// Written to a temporary file and renamed, so a crash leaves the old or the new record.
    func save(_ record: Record) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        let temporary = recordPath(record.volumeID) + ".tmp"
        do {
            try encoder.encode(record).write(to: URL(fileURLWithPath: temporary))
            guard rename(temporary, recordPath(record.volumeID)) == 0 else { throw VolumeError.failed(errnoText()) }
        } catch {
            throw VolumeError.failed("cannot write the record of loop volume \(record.volumeID) in \(imageDirectory): \(error)")
        }
    }

    /// Runs `body` on a thread of its own holding the folder's lock (it runs tools and waits on flock).
    func locked<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            Thread {
                continuation.resume(with: Result {
                    do { try FileManager.default.createDirectory(atPath: imageDirectory, withIntermediateDirectories: true) } catch {
                        throw VolumeError.failed("cannot create the loop image folder \(imageDirectory): \(error.localizedDescription)")
                    }
                    let fd = open(imageDirectory + "/.lock", O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
                    guard fd >= 0 else { throw VolumeError.failed("cannot open \(imageDirectory)/.lock: \(errnoText())") }
                    defer { close(fd) }
                    guard flock(fd, LOCK_EX) == 0 else { throw VolumeError.failed("cannot lock \(imageDirectory)/.lock: \(errnoText())") }
                    return try body()
                })
            }.start()
        }
    }
}

func errnoText() -> String { String(cString: strerror(errno)) }
