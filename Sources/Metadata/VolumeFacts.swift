import Foundation

/// What a node last saw of a volume through its cloud provider and its mount:
/// size, room, kind, place, and who is attached in which role. Written by the
/// node that registers (or refreshes) the volume record, only while the record
/// names it primary. Informational, but for one use: a promotion fences the
/// instance named here as primary (`StorageNode.takeOver`).
public struct VolumeFacts: Codable, Sendable, Equatable {
    /// One instance's attachment.
    public struct Attachment: Codable, Sendable, Equatable {
        public var instanceID: String
        /// "primary" (read-write), "backup" (read-only) or "" when the provider
        /// does not say (cloud attachments are read-write at the block layer).
        public var role: String
        /// The cloud's attachment state ("attached", "attaching", …).
        public var state: String
        /// The device name the provider reports (not the local NVMe name).
        public var device: String

        public init(instanceID: String, role: String, state: String, device: String) {
            self.instanceID = instanceID
            self.role = role
            self.state = state
            self.device = device
        }
    }

    public var capacityBytes: Int
    /// Free bytes on the mounted filesystem when the facts were taken; nil when
    /// the writer of the facts did not have it mounted.
    public var freeBytes: Int?
    /// The provider ("loop", "aws", …) and its volume type ("io2", "cloud_essd", "loop").
    public var provider: String
    public var type: String
    public var zone: String
    public var attachments: [Attachment]
    /// When they were taken (seconds since 1970).
    public var updatedAt: Double

    public init(capacityBytes: Int, freeBytes: Int? = nil, provider: String, type: String, zone: String,
                attachments: [Attachment] = [], updatedAt: Double = Date().timeIntervalSince1970) {
        self.capacityBytes = capacityBytes
        self.freeBytes = freeBytes
        self.provider = provider
        self.type = type
        self.zone = zone
        self.attachments = attachments
        self.updatedAt = updatedAt
    }
}
