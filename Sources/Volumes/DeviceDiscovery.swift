import Foundation

/// Finds the local block device of an attached cloud volume. On Nitro (EBS) and
/// on Aliyun's NVMe instances the device name the API reports (`/dev/sdf`,
/// `/dev/xvdb`) is not the local one: the kernel numbers NVMe devices in the
/// order they appear. The device's serial number names the volume instead:
///
/// - EBS: serial `vol0123…` (the volume ID without its dash), udev link
///   `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123…`;
/// - Aliyun: serial = the disk ID without `d-`, udev link
///   `/dev/disk/by-id/nvme-Alibaba_Cloud_Elastic_Block_Storage_<serial>`, and
///   on virtio hosts `/dev/disk/by-id/virtio-<serial>` (virtio keeps 20 characters).
///
/// The udev links are tried first; without udev, the serials in sysfs
/// (`/sys/block/<dev>/device/serial` for NVMe, `/sys/block/<dev>/serial` for
/// virtio) are read. Both folders are parameters so tests can point them at
/// folders of their own.
public struct DeviceDiscovery: Sendable {
    public var byIDDirectory: String
    public var sysBlockDirectory: String

    public init(byIDDirectory: String = "/dev/disk/by-id", sysBlockDirectory: String = "/sys/block") {
        self.byIDDirectory = byIDDirectory
        self.sysBlockDirectory = sysBlockDirectory
    }

    /// The serial an EBS volume's NVMe device carries.
    public static func ebsSerial(_ volumeID: String) -> String { volumeID.replacingOccurrences(of: "-", with: "") }

    /// The serial an Aliyun disk's device carries.
    public static func aliyunSerial(_ diskID: String) -> String {
        diskID.hasPrefix("d-") ? String(diskID.dropFirst(2)) : diskID
    }

    public func ebsDevice(_ volumeID: String) -> String? {
        let serial = Self.ebsSerial(volumeID)
        return find(byIDNames: ["nvme-Amazon_Elastic_Block_Store_" + serial], serials: [serial])
    }

    public func aliyunDevice(_ diskID: String) -> String? {
        let serial = Self.aliyunSerial(diskID)
        let virtio = String(serial.prefix(20))
        return find(byIDNames: ["nvme-Alibaba_Cloud_Elastic_Block_Storage_" + serial, "virtio-" + virtio],
                    serials: [serial, virtio])
    }

    /// The resolved device of the first by-id link that exists, else the first
    /// whole disk in sysfs whose serial (trimmed) is one of `serials`.
    func find(byIDNames: [String], serials: [String]) -> String? {
        for name in byIDNames {
            let link = byIDDirectory + "/" + name
            if FileManager.default.fileExists(atPath: link) {
                return URL(fileURLWithPath: link).resolvingSymlinksInPath().path
            }
        }
        let disks = (try? FileManager.default.contentsOfDirectory(atPath: sysBlockDirectory)) ?? []
        for disk in disks.sorted() {
            for file in ["device/serial", "serial"] {
                guard let raw = try? String(contentsOfFile: sysBlockDirectory + "/" + disk + "/" + file, encoding: .utf8) else { continue }
                if serials.contains(raw.trimmingCharacters(in: .whitespacesAndNewlines)) { return "/dev/" + disk }
            }
        }
        return nil
    }
}
