import Foundation

/// The mount table of this process, read to its end: `String(contentsOfFile:)`
/// stops at the first page of a procfs file, so a mount listed past 4 KiB (with
/// many mounts on the machine) looked absent.
public func mountTable() -> String {
    guard let handle = FileHandle(forReadingAtPath: "/proc/self/mounts") else { return "" }
    defer { try? handle.close() }
    return String(decoding: (try? handle.readToEnd()) ?? Data(), as: UTF8.self)
}

/// Whether something is mounted at `path` (as /proc/self/mounts spells it).
public func isMountPoint(_ path: String) -> Bool {
    mountTable().contains(" \(path) ")
}

/// /proc/self/mountinfo, read to its end (see `mountTable`).
public func mountInfoText() -> String {
    guard let handle = FileHandle(forReadingAtPath: "/proc/self/mountinfo") else { return "" }
    defer { try? handle.close() }
    return String(decoding: (try? handle.readToEnd()) ?? Data(), as: UTF8.self)
}
