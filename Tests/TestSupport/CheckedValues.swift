import Foundation

/// Values that say which key and version they are and check themselves: the
/// key, `#`, the version, `#`, filler, then an FNV-1a checksum of all before
/// it. A reader tells a wrong value (torn, foreign, garbage) from a stale one.
public enum CheckedValue {
    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var hash: UInt32 = 2_166_136_261
        for byte in bytes { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
        return hash
    }

    public static func make(key: String, version: Int, size: Int) -> [UInt8] {
        var bytes = Array("\(key)#\(version)#".utf8)
        while bytes.count < size - 4 { bytes.append(UInt8(truncatingIfNeeded: bytes.count &* 31 &+ version)) }
        return bytes + withUnsafeBytes(of: checksum(bytes).littleEndian) { Array($0) }
    }

    /// The version a value claims, if it is whole and names `key`.
    public static func version(_ value: [UInt8], key: String) -> Int? {
        guard value.count >= 8 else { return nil }
        let body = Array(value.dropLast(4))
        let stored = value.suffix(4).withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }.littleEndian
        guard checksum(body) == stored else { return nil }
        let parts = String(decoding: body.prefix(64), as: UTF8.self).split(separator: "#")
        guard parts.count >= 2, parts[0] == key else { return nil }
        return Int(parts[1])
    }
}

/// The loop devices whose backing file lies under `folder` (`/dev/loopN`).
public func loopDevices(under folder: String) -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
    return names.filter { $0.hasPrefix("loop") }.sorted().compactMap { name in
        guard let backing = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8),
              backing.hasPrefix(folder + "/") else { return nil }
        return "/dev/" + name
    }
}

/// The value below which a fraction `p` of `values` lies (0 for none).
public func percentile(_ values: [Double], _ p: Double) -> Double {
    guard !values.isEmpty else { return 0 }
    let sorted = values.sorted()
    return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
}
