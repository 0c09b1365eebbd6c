import Glibc

// Whole reads and writes at an offset: short transfers are continued and EINTR
// is retried. They return 0, or the errno of the failure, so that each caller
// words its own error (a shard's `ShardError`, the mount's errno).

/// Writes all of `bytes` at `offset`; 0, or the errno (EIO for a write that wrote nothing).
public func pwriteFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int) -> Int32 {
    var done = 0
    while done < bytes.count {
        let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return n < 0 ? errno : EIO }
        done += n
    }
    return 0
}

/// Fills `buffer` from `offset`; 0, or the errno (`ENODATA` when the file ends first).
public func preadFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) -> Int32 {
    var done = 0
    while done < buffer.count {
        let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return n < 0 ? errno : ENODATA }
        done += n
    }
    return 0
}
