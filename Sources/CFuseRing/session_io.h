#ifndef SHARDFS_SESSION_IO_H
#define SHARDFS_SESSION_IO_H
// Between the session's I/O hooks (fuse_ring.c) and passthrough (fuse_passthrough.c).
#include <sys/types.h>
#include <sys/uio.h>

#include "fuse_ring.h"

/// io_read saw `n` bytes of a request from /dev/fuse.
void shardfs_passthrough_saw_request(struct shardfs_fuse_context *context, const void *buf, ssize_t n);

/// io_writev is about to send an answer (never a notification): FUSE_INIT's
/// gets passthrough asked for, an OPEN or CREATE answer its backing file.
void shardfs_passthrough_answering(struct shardfs_fuse_context *context, struct iovec *iov, int count);

/// Installs the session's custom I/O, unless the rings did.
int shardfs_session_io_install(struct fuse_session *session, struct shardfs_fuse_context *context);

#endif
