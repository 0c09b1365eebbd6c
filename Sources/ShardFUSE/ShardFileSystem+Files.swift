import Foundation
import Glibc
import ShardNode
import ShardStore

// Entries as files: create, open, read, write, close (commit), unlink, rename.
// All handles of an inode share its OpenEntry (see HandleTable).

extension ShardFileSystem {
    // MARK: Entries as files

    /// `mode`: the new file's mode, the caller's umask applied by the kernel.
    func create(_ parent: UInt64, _ name: [UInt8], flags: Int32, mode: mode_t = 0o644) throws -> (EntryReply, UInt64) {
        guard case .shard(let id) = try kind(parent) else {
            throw FileSystemError(EPERM, "files live inside shard directories")
        }
        let shard = try localShard(id)
        try writable(shard)
        let key = try entryKey(name)
        let existing = try currentAttributes(shard, key)
        // Counted for the kernel from here: a failure below gives the lookup back.
        let ino = inodes.inode(for: .entry(shard: id, key: key.bytes), lookup: true)
        // 0644 is what an entry without a stored mode shows.
        let modeBits = UInt32(mode & 0o7777)
        let metadata = existing?.metadata ?? EntryMetadata(number: shard.newEntryNumber(), mode: modeBits == 0o644 ? nil : modeBits)
        let registered: (handle: UInt64, entry: OpenEntry, shared: Bool)
        do {
            // A new file is written (created empty) even when opened read-only;
            // an existing one opened read-only (the kernel creates when it has no
            // name cached) is not a writer.
            let writes = existing == nil || flags & O_ACCMODE != O_RDONLY
            registered = try register(ino, shard, key, metadata: metadata, writable: writes, readable: flags & O_ACCMODE != O_WRONLY,
                                      append: flags & O_APPEND != 0, direct: writesDirectly(flags))
        } catch {
            inodes.forget(ino, count: 1)  // the kernel gets no entry, so it will not forget it
            throw error
        }
        let (handle, entry, shared) = registered
        do {
            // The kernel creates when it has no name cached, so the entry may
            // exist (in the shard, or open and uncommitted): then this is an
            // open(O_CREAT) of it, which truncates only with O_TRUNC. A new file
            // is empty, and committed empty unless written.
            let exists = entry.pendingSize != nil || existing != nil
            if exists && flags & O_EXCL != 0 { throw FileSystemError(EEXIST, "\(key) exists") }
            if !exists || flags & O_TRUNC != 0 {
                try entry.truncate(to: 0)
            }
            if !exists {
                // A new file's time is its creation's until written (a write sets
                // the time of its commit), as on a local filesystem: so the
                // kernel may cache what this reply says (unless other handles
                // share the entry: their writes may race this answer), and the
                // fstat that follows most creates costs no round trip. A write
                // through the kernel, or a change from elsewhere, drops that cache.
                entry.setModificationTime(Self.now())
                touchDirectory(shard)
            }
            guard let view = try entryView(shard, key, inode: ino, byName: false) else {
                throw FileSystemError(ENOENT, "entry \(key) is gone")
            }
            return (EntryReply(inode: ino, attributes: fileAttributes(shard, ino, view.attributes), timeout: timeout(shard),
                               attributeTimeout: view.ofWriter && (exists || shared) ? 0 : timeout(shard)), handle)
        } catch {
            _ = try? release(handle)
            inodes.forget(ino, count: 1)  // the kernel gets no entry, so it will not forget it
            throw error
        }
    }

    func open(_ ino: UInt64, flags: Int32) throws -> (handle: UInt64, keepCache: Bool) {
        guard case .entry(let id, let key) = try kind(ino) else { throw FileSystemError(EISDIR, "a directory") }
        let entryKey = EntryKey(trusted: key)  // validated when its inode was made
        let wantsWrite = flags & O_ACCMODE != O_RDONLY
        if isView(id) { return (try openView(id, entryKey, write: wantsWrite), false) }
        let shard = try localShard(id)
        if wantsWrite {
            try writable(shard)
        }
        let current = try currentAttributes(shard, entryKey)
        let (offered, valueFile) = passthroughFor(ino, shard, entryKey, size: current?.size, flags: flags)
        let (handle, entry, _) = try register(ino, shard, entryKey, metadata: current?.metadata ?? EntryMetadata(),
                                              writable: wantsWrite, readable: flags & O_ACCMODE != O_WRONLY, append: flags & O_APPEND != 0,
                                              direct: writesDirectly(flags), offered: offered, valueFile: valueFile)
        do {
            // A file the mount holds open and has not committed yet exists too.
            let exists = entry.pendingSize != nil || current != nil
            guard exists else {
                throw FileSystemError(ENOENT, "entry \(entryKey) is gone")
            }
            if wantsWrite && flags & O_TRUNC != 0 { try entry.truncate(to: 0) }
        } catch {
            _ = try? release(handle)
            throw error
        }
        // The kernel may keep a file's pages across opens: the mount's own writes
        // go through them, and changes made elsewhere (the socket service)
        // invalidate them (entriesChanged).
        return (handle, true)
    }

    /// What an open needs for passthrough (`HandleTable.open`): a backing file
    /// for a read-only open of a committed value file when no handle is open
    /// on the inode; the entry's value file when the inode has a backing file
    /// already and the open could read it through the kernel. Only values past
    /// the spill threshold can be value files: smaller ones cost no lookup here.
    /// Not for `O_DIRECT` opens: the kernel would open the backing file with it,
    /// and the volume's filesystem refuses unaligned direct reads. A lookup that
    /// fails leaves the reads to the daemon.
    private func passthroughFor(_ ino: UInt64, _ shard: Shard, _ key: EntryKey, size: Int?, flags: Int32)
        -> (offered: Backing?, valueFile: UInt64?) {
        guard let size, size > WriteBuffer.spillThreshold, flags & O_ACCMODE == O_RDONLY, flags & __O_DIRECT == 0 else {
            return (nil, nil)
        }
        let state = handles.passthroughState(ino)
        if state.backing != nil {
            // Uncommitted changes (say, a commit that failed) are read from the daemon.
            guard handles.entry(ino)?.hasChanges != true else { return (nil, nil) }
            return (nil, (try? shard.valueFile(of: key, opening: false))?.number)
        }
        guard !state.open, backingFiles.available,
              let file = try? shard.valueFile(of: key, opening: true), let fd = file.fd else { return (nil, nil) }
        defer { close(fd) }
        let backing = backingFiles.register(fd, valueFile: file.number, logger: logger)
        return (backing, backing?.valueFile)
    }

    /// A handle on an entry of a backup's view: read-only. Its pages are not kept
    /// across opens (`keep_cache` off): each open reads the newest generation.
    func openView(_ id: UInt64, _ key: EntryKey, write: Bool) throws -> UInt64 {
        if write { throw FileSystemError(EROFS, "shard \(id) is a read-only view of a volume this node backs") }
        guard try reading(id, { try $0.attributes(key) }) != nil else { throw FileSystemError(ENOENT, "entry \(key) is gone") }
        return handles.openView(ViewFile(shard: id, key: key))
    }

    func read(_ handle: UInt64, offset: Int, count: Int) throws -> [UInt8] {
        if let view = handles.viewFile(handle) {
            // One request, one snapshot: the newest generation when it starts (the
            // shard's own copy, should this node have been promoted meanwhile).
            return try reading(view.shard) { try $0.read(view.key, offset: offset, count: count) }
        }
        let entry = try self.file(handle).entry
        return try entry.read(at: offset, count: count)
    }

    /// `caller`: the writing user. A write by anyone but root clears the file's
    /// set-user-ID bit, and its set-group-ID bit when group-executable, as the
    /// kernel does for a local filesystem (write-only handles bypass its check).
    func write(_ handle: UInt64, _ bytes: UnsafeRawBufferPointer, offset: Int, caller: uid_t = 0) throws -> Int {
        let file = try self.file(handle)
        guard file.writable else { throw FileSystemError(EBADF, "file not open for writing") }
        try writable(file.entry.shard)
        if caller != 0, let mode = file.entry.metadata.mode, let cleared = Self.modeClearingSetID(mode) {
            try clearSetID(file.entry, mode: cleared)
        }
        let movedByAppend = try file.entry.write(bytes, at: offset, append: file.append)
        // Bytes the kernel put at the old end, or written around pages a cached
        // handle may have read back meanwhile: drop the kernel's pages (queued:
        // the drop may come just after this reply).
        if movedByAppend || (file.direct && handles.cachedHandleCount(file.entry.inode) > 0) {
            kernelCache.invalidate?([file.entry.inode])
        }
        return bytes.count
    }

    /// Stores `mode` without committing what is being written: in the entry's
    /// open state (a commit that creates the entry gives it this mode) and in the
    /// stored entry, if there is one yet (a later put keeps its mode).
    private func clearSetID(_ entry: OpenEntry, mode: UInt32) throws {
        entry.metadata.mode = mode
        let key = entry.key, shard = entry.shard
        try own(shard.id, [key.bytes]) {
            do {
                try shard.changeMetadata(key, modificationTime: nil, MetadataChange(mode: mode, changeTime: Self.now()),
                                         clientID: options.clientID, deferringDurability: true)
            } catch ShardError.entryNotFound {
                // Not committed yet: its first commit carries the mode.
            }
        }
        kernelCache.invalidate?([entry.inode])  // its cached mode still shows the bits
    }

    /// The mode a non-root write leaves, or nil when it changes nothing.
    static func modeClearingSetID(_ mode: UInt32) -> UInt32? {
        var cleared = mode & ~UInt32(S_ISUID)
        if mode & UInt32(S_IXGRP) != 0 { cleared &= ~UInt32(S_ISGID) }
        return cleared == mode ? nil : cleared
    }

    /// close(): the file's put, durable within milliseconds or at the next
    /// barrier (fsync) for a file up to 1 MiB, at once for a larger one. The error
    /// is close()'s: the shard checks owner, state and room before it answers.
    func flush(_ handle: UInt64) throws {
        if handles.viewFile(handle) != nil { return }  // nothing to commit
        let entry = try file(handle).entry
        try commit(entry, deferringDurability: true)
    }

    /// fsync(): this file's changes and everything closed before them in the shard are durable.
    func fsync(_ handle: UInt64) throws {
        if handles.viewFile(handle) != nil { return }  // nothing to commit
        let entry = try self.file(handle).entry
        try commit(entry, deferringDurability: false)
        try entry.shard.sync()
    }

    /// fsync() of a directory: a shard's is its durability barrier (every file of
    /// it closed before is durable); the root holds nothing of its own.
    func fsyncDirectory(_ ino: UInt64) throws {
        guard case .shard(let id) = try kind(ino), !isView(id) else { return }
        guard let shard = node.shards.localShard(id) else {
            throw FileSystemError(EIO, "shard \(id) is no longer served here: what was closed in it may not be durable")
        }
        try shard.sync()
    }

    /// The last release of an entry commits what its handles left uncommitted
    /// (a close that failed is retried once). If that fails too, those changes
    /// are lost: readers see the last committed value again.
    func release(_ handle: UInt64) throws {
        if handles.closeView(handle) { return }
        guard let (entry, dropped) = handles.close(handle) else { return }
        if let dropped { backingFiles.unregister(dropped) }
        var failure: Error?
        do { try commit(entry, deferringDurability: true) } catch { failure = error }
        // Still registered during the commit, so an open racing it shares the
        // entry; it goes once no handle came back meanwhile.
        if handles.retire(entry) {
            entry.abandon()  // a staged value that was not committed is removed
            if let failure {
                logger.error("changes of a file could not be committed at its last close and are lost",
                             metadata: ["shard": "\(entry.shard.id)", "key": "\(entry.key)", "error": "\(failure)"])
                kernelCache.invalidate?([entry.inode])
            }
        }
        if let failure { throw failure }
    }

    func commit(_ file: OpenEntry, deferringDurability: Bool) throws {
        try file.commitLock.withLock { try commitLocked(file, deferringDurability: deferringDurability) }
    }

    /// A small file's value goes to the shard as a batch put whose durability is
    /// deferred (`Shard.batchPut`): visible to every reader of the shard at once,
    /// in its batch log within milliseconds or at the shard's next `sync()`. The
    /// shard answers now whatever a durable put would (owner, closed, full).
    func commitLocked(_ file: OpenEntry, deferringDurability: Bool) throws {
        let id = file.shard.id
        if deferringDurability, let (value, time, indexes) = try file.takeSmallValue(limit: Shard.deferredValueLimit) {
            defer { file.finishedCommitting() }
            do {
                try writable(file.shard)
                var item = EntryWrite(key: file.key.bytes, value: value, indexes: indexes ?? [],
                                      modificationTime: time ?? Self.now(), keepsIndexes: indexes == nil)
                if file.metadata.number > 0 { item.entryNumber = file.metadata.number }
                item.creationMode = file.metadata.mode
                // The mount's own write: the shard need not report it back (see entriesChanged).
                if let failed = try file.shard.batchPut([item], clientID: options.clientID, deferringDurability: true,
                                                        reportingChanges: false)[0] {
                    throw failed
                }
            } catch {
                file.keepUncommitted(indexes: indexes)  // the buffer still holds the value: a later close or release retries
                throw error
            }
            return
        }
        guard file.hasChanges else { return }
        try own(id, [file.key.bytes]) { try file.commit() }
    }

    /// What lookup and getattr show of an entry. A file being written (perhaps
    /// created and not committed yet) shows its writer's view, which lookup and
    /// getattr answer uncached (`ofWriter`; only a create's answer for a new
    /// file is cached, until its first write): fstat on a new file must work. Otherwise the shard's
    /// entry; nil if there is none. By name (lookup), an unlinked file
    /// still open for writing is gone; by inode (fstat on its handle) it is not.
    func entryView(_ shard: any ShardReading, _ key: EntryKey, inode: UInt64?, byName: Bool) throws
        -> (attributes: EntryAttributes, ofWriter: Bool)? {
        if !byName, let inode, let unlinked = openEntry(inode)?.unlinkedView {
            return (unlinked, true)  // fstat on a descriptor of an unlinked file
        }
        // The writer's view first: then a create, and fstat while writing, read no snapshot.
        if let writer = inode.flatMap({ openWriter($0, includingUnlinked: !byName) }), let size = writer.pendingSize {
            let time = writer.pendingModificationTime ?? Self.now()
            return (EntryAttributes(key: key, size: size, modificationTime: time, indexes: [], metadata: writer.metadata), true)
        }
        return try currentAttributes(shard, key).map { ($0, false) }
    }

    /// An entry's attributes in the shard (puts not durable yet included).
    func currentAttributes(_ shard: any ShardReading, _ key: EntryKey) throws -> EntryAttributes? {
        try shard.attributes(key)
    }

    func unlink(_ parent: UInt64, _ name: [UInt8]) throws {
        guard case .shard(let id) = try kind(parent) else {
            throw FileSystemError(EISDIR, "shards are removed with rmdir")
        }
        let shard = try localShard(id)
        try writable(shard)
        let key = try entryKey(name)
        let open = openEntry(shard: id, key: key)
        let exists: Bool
        if let open {
            let current = try currentAttributes(shard, key)
            // Its descriptors keep reading it, as on a local filesystem.
            if let current { try open.keepAfterUnlink(current) }
            exists = current != nil
        } else {
            exists = try shard.contains(key)  // no attributes to build
        }
        // Deferred like a close's put: gone for every reader at once, durable at
        // the shard's next fsync or within milliseconds. Created-and-still-open files have
        // nothing committed, and unlinking them is dropping them.
        if !exists {
            guard open != nil else { throw FileSystemError(ENOENT, "no entry \(key) in shard \(id)") }
        } else {
            do {
                if let failed = try shard.batchPut([EntryWrite.deletion(of: key.bytes)], clientID: options.clientID,
                                                   deferringDurability: true, reportingChanges: false)[0] {
                    throw failed
                }
            } catch {
                open?.undoKeepAfterUnlink()  // still linked
                throw error
            }
        }
        touchDirectory(shard)
        if let open {
            open.orphan()  // a writer's close must not bring it back
            // The open file keeps its inode (fstat works); the name is free for a new one.
            inodes.unlink(.entry(shard: id, key: key.bytes))
        }
    }

    func rename(_ parent: UInt64, _ name: [UInt8], _ newParent: UInt64, _ newName: [UInt8], flags: UInt32) throws {
        let from = try kind(parent), to = try kind(newParent)
        guard case .shard(let id) = from, case .shard(let targetID) = to else {
            throw FileSystemError(EPERM, "shard directories cannot be renamed")
        }
        for shard in [id, targetID] where isView(shard) {
            throw FileSystemError(EROFS, "shard \(shard) is a read-only view of a volume this node backs")
        }
        guard id == targetID else { throw FileSystemError(EXDEV, "entries cannot move between shards") }
        if flags & Self.renameExchange != 0 { throw FileSystemError(EINVAL, "RENAME_EXCHANGE is not supported") }
        let shard = try localShard(id)
        try writable(shard)
        let source = try entryKey(name), target = try entryKey(newName)
        if flags & Self.renameNoReplace != 0, try shard.attributes(target) != nil {
            throw FileSystemError(EEXIST, "\(target) exists")
        }
        let openSource = openEntry(shard: id, key: source)
        do {
            // Logged with durability deferred, like close(): rsync renames every file it writes.
            try own(id, [source.bytes, target.bytes]) {
                try shard.rename(source, to: target, clientID: options.clientID, deferringDurability: true)
            }
        } catch ShardError.entryNotFound where openSource?.pendingSize != nil {
            // Created and still open, never committed: the target is replaced now,
            // and the writer's close puts the value under the new name.
            if source != target, try shard.attributes(target) != nil {
                try own(id, [target.bytes]) { try shard.delete(target, clientID: options.clientID) }
            }
        }
        // Open handles follow the entry; handles of a replaced target are orphans.
        if source != target { openEntry(shard: id, key: target)?.orphan() }
        openSource?.renamed(to: target)
        touchDirectory(shard)
        inodes.rename(.entry(shard: id, key: source.bytes), to: .entry(shard: id, key: target.bytes))
    }
}
