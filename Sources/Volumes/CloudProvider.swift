// The volume layer: a cloud provider creates and attaches block volumes; the
// volume manager makes attached volumes usable at `<volume root>/<volumeID>`.
// Folders (the embedded default), loop devices, AWS EBS and Aliyun ESSD
// implement the same protocol.

import Foundation

/// A volume's lifecycle state, in the clouds' common vocabulary.
public enum VolumeState: String, Sendable, Equatable, CaseIterable {
    case creating, available, inUse = "in-use", deleting, deleted, error, unknown
}

/// The state of one instance's attachment.
public enum AttachmentState: String, Sendable, Equatable {
    case attaching, attached, detaching, detached, busy, unknown
}

/// One instance's attachment of a volume (multi-attach volumes have several).
public struct VolumeAttachment: Sendable, Equatable {
    public var instanceID: String
    public var state: AttachmentState
    /// The device name the cloud reports ("/dev/sdf", a loop device); on NVMe
    /// hosts it is not the local name, see `CloudProvider.localDevice`.
    public var device: String
    public var readOnly: Bool

    public init(instanceID: String, state: AttachmentState, device: String = "", readOnly: Bool = false) {
        self.instanceID = instanceID
        self.state = state
        self.device = device
        self.readOnly = readOnly
    }
}

/// What to create.
public struct VolumeSpec: Sendable, Equatable {
    /// Clouds round up to whole GiB.
    public var sizeBytes: Int
    /// Volume type; empty means the provider's default (io2, cloud_essd, loop image).
    public var type: String
    public var iops: Int?
    public var throughputMiBps: Int?
    public var multiAttach: Bool
    /// Empty: the provider's configured zone.
    public var availabilityZone: String
    public var tags: [String: String]
    /// Makes a retried create return the first volume instead of a second one
    /// (EC2 ClientToken, ECS ClientToken). Empty: none.
    public var idempotencyToken: String

    public init(sizeBytes: Int, type: String = "", iops: Int? = nil, throughputMiBps: Int? = nil, multiAttach: Bool = true,
                availabilityZone: String = "", tags: [String: String] = [:], idempotencyToken: String = "") {
        self.sizeBytes = sizeBytes
        self.type = type
        self.iops = iops
        self.throughputMiBps = throughputMiBps
        self.multiAttach = multiAttach
        self.availabilityZone = availabilityZone
        self.tags = tags
        self.idempotencyToken = idempotencyToken
    }

    /// The size in whole GiB, rounded up (at least 1).
    public var sizeGiB: Int { max(1, (sizeBytes + (1 << 30) - 1) >> 30) }
}

/// A volume as the provider sees it.
public struct CloudVolume: Sendable, Equatable {
    public var volumeID: String
    public var sizeBytes: Int
    public var type: String
    public var iops: Int?
    public var throughputMiBps: Int?
    public var multiAttach: Bool
    public var availabilityZone: String
    public var state: VolumeState
    public var attachments: [VolumeAttachment]
    public var tags: [String: String]

    public init(volumeID: String, sizeBytes: Int, type: String = "", iops: Int? = nil, throughputMiBps: Int? = nil,
                multiAttach: Bool = true, availabilityZone: String = "", state: VolumeState = .available,
                attachments: [VolumeAttachment] = [], tags: [String: String] = [:]) {
        self.volumeID = volumeID
        self.sizeBytes = sizeBytes
        self.type = type
        self.iops = iops
        self.throughputMiBps = throughputMiBps
        self.multiAttach = multiAttach
        self.availabilityZone = availabilityZone
        self.state = state
        self.attachments = attachments
        self.tags = tags
    }

    public func attachment(of instanceID: String) -> VolumeAttachment? {
        attachments.first { $0.instanceID == instanceID }
    }
}

/// One page of a describe/list call.
public struct VolumePage: Sendable, Equatable {
    public var volumes: [CloudVolume]
    /// Pass back to get the next page; nil on the last one.
    public var nextToken: String?

    public init(volumes: [CloudVolume], nextToken: String?) {
        self.volumes = volumes
        self.nextToken = nextToken
    }
}

/// What `waitFor` waits for.
public enum VolumeCondition: Sendable, Equatable, CustomStringConvertible {
    case state(VolumeState)
    /// The instance's attachment is `attached`.
    case attached(instanceID: String)
    /// The instance has no attachment any more (other instances' stay).
    case detached(instanceID: String)
    /// The volume no longer exists.
    case deleted

    public var description: String {
        switch self {
        case .state(let s): return "state \(s.rawValue)"
        case .attached(let i): return "attached to \(i)"
        case .detached(let i): return "detached from \(i)"
        case .deleted: return "deleted"
        }
    }
}

/// Creates, attaches and deletes volumes (the cloud's block-storage API).
public protocol CloudProvider: Sendable {
    /// Short name for logs and configuration ("folder", "loop", "aws", "aliyun").
    var name: String { get }
    func createVolume(_ spec: VolumeSpec) async throws -> CloudVolume
    /// Starts attaching the volume to the instance and returns the attachment as
    /// the cloud reports it (often `attaching`; wait with `waitFor(.attached)`).
    /// `readOnly` is honoured where the block layer can (loop devices); cloud
    /// attachments are read-write and read-only is enforced by the mount.
    func attachVolume(_ volumeID: String, instanceID: String, readOnly: Bool) async throws -> VolumeAttachment
    /// Detaches the volume from this one instance; other attachments stay.
    func detachVolume(_ volumeID: String, instanceID: String) async throws
    /// Cuts this one instance off the volume now, whatever it is doing (a dead,
    /// hung or paused primary): EBS `DetachVolume` with `Force=true`; ECS
    /// `DetachDisk` (ECS has no forced form); loop: the instance's loop device is
    /// revoked (every later I/O through it fails with EIO), then detached.
    /// The instance loses what it had not written: use it to fence, not to
    /// detach. Returns once the cloud took the request; `fence` also waits
    /// until the cloud shows the attachment gone. Other attachments stay.
    func forceDetachVolume(_ volumeID: String, instanceID: String) async throws
    /// Deletes a volume that is attached nowhere.
    func deleteVolume(_ volumeID: String) async throws
    /// The named volumes (all when `volumeIDs` is empty), one page at a time.
    func describeVolumes(_ volumeIDs: [String], nextToken: String?, maxResults: Int?) async throws -> VolumePage
    /// The local block device (or folder) of a volume attached to `instanceID`,
    /// which must be this host; nil while it has not appeared.
    func localDevice(of volumeID: String, instanceID: String) async throws -> String?
}

extension CloudProvider {
    public func createVolume(sizeBytes: Int, multiAttach: Bool) async throws -> CloudVolume {
        try await createVolume(VolumeSpec(sizeBytes: sizeBytes, multiAttach: multiAttach))
    }

    public func attachVolume(_ volumeID: String, instanceID: String) async throws -> VolumeAttachment {
        try await attachVolume(volumeID, instanceID: instanceID, readOnly: false)
    }

    /// One volume; `VolumeError.notFound` (or the cloud's not-found error) if it does not exist.
    public func describeVolume(_ volumeID: String) async throws -> CloudVolume {
        let page = try await describeVolumes([volumeID], nextToken: nil, maxResults: nil)
        guard let volume = page.volumes.first(where: { $0.volumeID == volumeID }) else { throw VolumeError.notFound(volumeID) }
        return volume
    }

    /// Every volume, following the pages.
    public func listVolumes(pageSize: Int? = nil) async throws -> [CloudVolume] {
        var all: [CloudVolume] = []
        var token: String?
        repeat {
            let page = try await describeVolumes([], nextToken: token, maxResults: pageSize)
            all += page.volumes
            token = page.nextToken
        } while token != nil
        return all
    }

    /// Polls until the volume meets `condition`, failing fast when it cannot any
    /// more (the volume is gone or in `error`), or with `timedOut` at the deadline.
    @discardableResult
    public func waitFor(_ volumeID: String, _ condition: VolumeCondition, timeout: Duration,
                        poll: Duration = .milliseconds(500)) async throws -> CloudVolume? {
        let deadline = ContinuousClock.now + timeout
        var last = "not described yet"
        while true {
            let volume: CloudVolume?
            do { volume = try await describeVolume(volumeID) } catch let error as VolumeError where error.isNotFound {
                volume = nil
            }
            guard let volume else {
                if condition == .deleted || condition == .state(.deleted) { return nil }
                if case .detached = condition { return nil }
                throw VolumeError.notFound(volumeID)
            }
            switch condition {
            case .state(let s) where volume.state == s: return volume
            case .attached(let i) where volume.attachment(of: i)?.state == .attached: return volume
            case .detached(let i) where volume.attachment(of: i) == nil || volume.attachment(of: i)?.state == .detached: return volume
            default: break
            }
            if volume.state == .error { throw VolumeError.failed("volume \(volumeID) is in state error while waiting for \(condition)") }
            let a = condition.instanceID.flatMap { volume.attachment(of: $0) }
            last = "state \(volume.state.rawValue)" + (a.map { ", attachment \($0.state.rawValue)" } ?? ", not attached to that instance")
            if ContinuousClock.now + poll > deadline {
                throw VolumeError.timedOut("volume \(volumeID) did not become \(condition) within \(timeout) (last seen: \(last))")
            }
            try await Task.sleep(for: poll)
        }
    }

    /// Fences `instanceID` off the volume: a forced detach, then a wait until the
    /// cloud no longer lists that instance's attachment (`.detached`). Idempotent:
    /// an instance without an attachment is already fenced, and a forced detach
    /// refused because the attachment went meanwhile, or is being detached, is
    /// followed by the wait. Throws
    /// `timedOut` when the attachment is still listed at the deadline — the
    /// caller must then not assume the instance is cut off.
    public func fence(_ volumeID: String, instanceID: String, timeout: Duration,
                      poll: Duration = .milliseconds(500)) async throws {
        guard let attachment = try await describeVolume(volumeID).attachment(of: instanceID),
              attachment.state != .detached else { return }
        do {
            try await forceDetachVolume(volumeID, instanceID: instanceID)
        } catch let error as VolumeError {
            // Refused because the attachment went meanwhile, or is already being
            // detached (ECS refuses a second DetachDisk then): wait for it.
            guard case .cloud = error else { throw error }
            let now = try await describeVolume(volumeID).attachment(of: instanceID)
            guard now == nil || now?.state == .detaching || now?.state == .detached else { throw error }
        }
        do {
            try await waitFor(volumeID, .detached(instanceID: instanceID), timeout: timeout, poll: poll)
        } catch VolumeError.timedOut(let text) {
            throw VolumeError.timedOut("fencing instance \(instanceID) off volume \(volumeID): \(text); "
                                       + "it may still write to the volume: do not mount it read-write elsewhere")
        }
    }

    /// Polls `localDevice` until the attached volume's device appears.
    public func waitForDevice(of volumeID: String, instanceID: String, timeout: Duration,
                              poll: Duration = .milliseconds(200)) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let device = try await localDevice(of: volumeID, instanceID: instanceID) { return device }
            if ContinuousClock.now + poll > deadline {
                throw VolumeError.timedOut("the device of volume \(volumeID) did not appear on this host within \(timeout); "
                                           + "check that it is attached to instance \(instanceID) and that this host is that instance")
            }
            try await Task.sleep(for: poll)
        }
    }
}

extension VolumeCondition {
    var instanceID: String? {
        switch self {
        case .attached(let i), .detached(let i): return i
        default: return nil
        }
    }
}

/// An error the cloud's API returned, with its own code and message.
public struct CloudAPIError: Error, Sendable, Equatable, CustomStringConvertible {
    public var provider: String
    public var action: String
    /// The cloud's error code ("InvalidVolume.NotFound", "Throttling", …); for a
    /// response without one, "HTTP <status>".
    public var code: String
    public var message: String
    public var httpStatus: Int
    public var requestID: String

    public init(provider: String, action: String, code: String, message: String, httpStatus: Int, requestID: String = "") {
        self.provider = provider
        self.action = action
        self.code = code
        self.message = message
        self.httpStatus = httpStatus
        self.requestID = requestID
    }

    /// Throttling and server-side failures: the same call may succeed later.
    public var isTransient: Bool {
        if httpStatus >= 500 || httpStatus == 429 { return true }
        let transientCodes: Set<String> = [
            "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled", "TooManyRequests",
            "ServiceUnavailable", "Unavailable", "InternalError", "InternalFailure", "Throttling.User", "Throttling.Api",
            "ServiceUnavailable.Retry", "InternalError.Retry",
        ]
        return transientCodes.contains(code) || code.hasPrefix("Throttling")
    }

    /// The volume (or disk) does not exist.
    public var isNotFound: Bool {
        ["InvalidVolume.NotFound", "InvalidVolumeID.NotFound", "InvalidDiskId.NotFound", "InvalidDisk.NotFound"].contains(code)
    }

    public var description: String {
        "\(provider) \(action) failed: \(code): \(message)" + (requestID.isEmpty ? "" : " (request \(requestID))")
    }
}

public enum VolumeError: Error, Equatable, Sendable, CustomStringConvertible {
    case notFound(String)
    case alreadyExists(String)
    case invalidArgument(String)
    case notMounted(String)
    case failed(String)
    /// The cloud refused or failed the call; its code and message are kept.
    case cloud(CloudAPIError)
    /// The cloud could not be reached (no connection, timeout): transient.
    case unreachable(String)
    /// A wait or the retry deadline ran out.
    case timedOut(String)
    /// No credentials, or the cloud rejected them.
    case credentials(String)

    public var description: String {
        switch self {
        case .notFound(let s): return "volume not found: \(s)"
        case .alreadyExists(let s): return "volume already exists: \(s)"
        case .invalidArgument(let s): return "invalid volume request: \(s)"
        case .notMounted(let s): return "volume not mounted: \(s)"
        case .failed(let s): return "volume operation failed: \(s)"
        case .cloud(let e): return e.description
        case .unreachable(let s): return "cloud API unreachable: \(s)"
        case .timedOut(let s): return "timed out: \(s)"
        case .credentials(let s): return "cloud credentials: \(s)"
        }
    }

    public var isNotFound: Bool {
        switch self {
        case .notFound: return true
        case .cloud(let e): return e.isNotFound
        default: return false
        }
    }

    /// Worth retrying with backoff: throttling, 5xx, no connection.
    public var isTransient: Bool {
        switch self {
        case .cloud(let e): return e.isTransient
        case .unreachable: return true
        default: return false
        }
    }
}

/// Retries transient cloud failures with exponential backoff and jitter until a
/// deadline; every other error is thrown at once.
public struct CloudRetryPolicy: Sendable {
    public var initialBackoff: Duration
    public var multiplier: Double
    public var maxBackoff: Duration
    public var deadline: Duration

    public init(initialBackoff: Duration = .milliseconds(200), multiplier: Double = 2, maxBackoff: Duration = .seconds(5),
                deadline: Duration = .seconds(60)) {
        self.initialBackoff = initialBackoff
        self.multiplier = multiplier
        self.maxBackoff = maxBackoff
        self.deadline = deadline
    }

    /// `onRetry` sees each transient error before the wait (for logs and tests).
    public func run<T>(_ what: String, onRetry: (VolumeError) -> Void = { _ in },
                       _ operation: () async throws -> T) async throws -> T {
        let start = ContinuousClock.now
        var backoff = initialBackoff
        while true {
            try Task.checkCancellation()
            do {
                return try await operation()
            } catch let error as VolumeError where error.isTransient {
                let wait = backoff * Double.random(in: 0.5...1)
                if ContinuousClock.now + wait - start > deadline {
                    throw VolumeError.timedOut("\(what) still failing after \(ContinuousClock.now - start) of retries: \(error)")
                }
                onRetry(error)
                try await Task.sleep(for: wait)
                backoff = min(backoff * multiplier, maxBackoff)
            }
        }
    }
}
