import Foundation

/// This process's view of the mount table (`/proc/self/mountinfo`), read whole:
/// whether a path is a mount point, and which mount is on top of it. Reading
/// it never touches the mounts themselves (no request reaches a FUSE daemon).
struct MountTable {
    struct Mount: Equatable {
        var id: Int
        var mountPoint: String
        var fileSystemType: String
        var source: String
    }

    let mounts: [Mount]

    init() {
        let text: String
        if let handle = FileHandle(forReadingAtPath: "/proc/self/mountinfo") {
            // Read to the end: a procfs file reports no size, and one page is not all of it.
            text = String(decoding: (try? handle.readToEnd()) ?? Data(), as: UTF8.self)
            try? handle.close()
        } else {
            text = ""
        }
        mounts = text.split(separator: "\n").compactMap(Self.parse)
    }

    /// Mounts at `path`, bottom first (the last one is what the path shows).
    func mounts(at path: String) -> [Mount] { mounts.filter { $0.mountPoint == path } }

    /// `id parent major:minor root mountpoint options [optional…] - fstype source superoptions`
    private static func parse(_ line: Substring) -> Mount? {
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count >= 10, let id = Int(fields[0]), let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else {
            return nil
        }
        return Mount(id: id, mountPoint: unescape(fields[4]), fileSystemType: String(fields[dash + 1]),
                     source: unescape(fields[dash + 2]))
    }

    /// The kernel writes space, tab, newline and backslash as `\ooo`.
    static func unescape(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        let raw = Array(field.utf8)
        var i = 0
        while i < raw.count {
            if raw[i] == 0x5C, i + 4 <= raw.count,
               let value = UInt8(String(decoding: raw[(i + 1)..<(i + 4)], as: UTF8.self), radix: 8) {
                bytes.append(value)
                i += 4
            } else {
                bytes.append(raw[i])
                i += 1
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// How the kernel will show `value` as a mount source, and how libfuse's
    /// option parser wants it (`,` and `\` escaped).
    static func fuseOptionValue(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: ",", with: "\\,")
    }
}
