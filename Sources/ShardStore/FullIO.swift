import Glibc

// Whole reads and writes at an offset: short transfers are continued and EINTR
// is retried. They return 0, or the errno of the failure, so that each caller
// words its own error (a shard's `ShardError`, the mount's errno).

/// Writes all of `bytes` at `offset`; 0, or the errno (EIO for a write that wrote nothing).
public func pwriteFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: Int) -> Int32 {
    transferFully(bytes.count, endedEarly: EIO) { done in
        pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
    }
}

/// Fills `buffer` from `offset`; 0, or the errno (`ENODATA` when the file ends first).
public func preadFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) -> Int32 {
    transferFully(buffer.count, endedEarly: ENODATA) { done in
        pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
    }
}

/// Calls `transfer(done)` (bytes moved, or -1 and errno) until `count` bytes have moved.
private func transferFully(_ count: Int, endedEarly: Int32, _ transfer: (_ done: Int) -> Int) -> Int32 {
    var done = 0
    while done < count {
        let n = transfer(done)
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return n < 0 ? errno : endedEarly }
        done += n
    }
    return 0
}
