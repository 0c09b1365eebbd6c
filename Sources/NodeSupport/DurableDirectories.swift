import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A folder could not be made or synced.
public struct DirectoryError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// fsyncs the folder `path`, making the creations, renames and removals of its
/// entries durable (a new file or folder is only sure to survive a crash once
/// its parent folder has been synced).
public func syncFolder(_ path: String) throws {
    let fd = open(path, O_RDONLY | O_DIRECTORY)
    guard fd >= 0 else { throw DirectoryError(description: "cannot open \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    guard fsync(fd) == 0 else { throw DirectoryError(description: "cannot fsync \(path): \(String(cString: strerror(errno)))") }
}

/// `mkdir -p path`, then fsyncs the parent of every folder it made (deepest
/// first), so that what was made reaches the disk before anything depends on it.
/// Folders that already existed are left alone (and not synced).
public func makeFolderDurably(_ path: String) throws {
    var missing: [String] = []
    var current = path
    while !current.isEmpty && !FileManager.default.fileExists(atPath: current) {
        missing.append(current)
        let parent = (current as NSString).deletingLastPathComponent
        if parent == current { break }
        current = parent
    }
    for folder in missing.reversed() {
        guard mkdir(folder, 0o755) == 0 || errno == EEXIST else {
            throw DirectoryError(description: "cannot create \(folder): \(String(cString: strerror(errno)))")
        }
    }
    for folder in missing {
        let parent = (folder as NSString).deletingLastPathComponent
        try syncFolder(parent.isEmpty ? "." : parent)
    }
}
