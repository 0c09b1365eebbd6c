#ifndef SHARDFS_FUSE_PASSTHROUGH_H
#define SHARDFS_FUSE_PASSTHROUGH_H
// FUSE passthrough (Linux 6.9+, fs/fuse/passthrough.c and iomode.c) for
// libfuse 3.14, which does not speak it itself.
//
// Why: the kernel serves reads of a file opened in passthrough from a backing
// file the daemon named at open, with no round trip to the daemon: a committed
// value file (immutable) reads at the disk's speed.
//
// How, in libfuse terms: the session's custom I/O (fuse_ring.c, installed with
// or without the rings) adds FUSE_PASSTHROUGH and max_stack_depth 1 to
// FUSE_INIT's answer when the kernel offers it; backing files are registered
// with ioctls on the session's /dev/fuse descriptor; an OPEN or CREATE answer
// names one when the same hook adds FOPEN_PASSTHROUGH and the backing ID to the
// fuse_open_out libfuse built.
//
// The kernel's rules, which callers keep:
// - From an inode's first passthrough open to its last release, every open of
//   it must name the same backing file (else EIO); with direct I/O as well,
//   reads and writes of that open still come to the daemon (mmap goes to the
//   backing file).
// - A passthrough open fails (ETXTBSY or EIO) while the inode has opens that use
//   its page cache (neither passthrough nor direct I/O).
// - Passthrough allows only direct I/O, parallel direct writes and noflush
//   beside it (not keep_cache).
// - Registering a backing file needs CAP_SYS_ADMIN, and a file on a filesystem
//   that stacks on none (max_stack_depth 1: ext4, xfs; not overlayfs).
// - A backing file stays open in the kernel while any open names it, after
//   the daemon unregisters it or exits.

#include <stdint.h>

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 312
#endif
#include <fuse3/fuse_lowlevel.h>

#include "fuse_ring.h"

/// Asks for passthrough at FUSE_INIT (call after mounting, before the loop runs;
/// after shardfs_ring_prepare if the rings are used). Installs the session's
/// custom I/O if the rings did not. Returns 0 or a negative errno.
int shardfs_passthrough_request(struct fuse_session *session, struct shardfs_fuse_context *context);

/// 1 once FUSE_INIT's answer turned passthrough on.
int shardfs_passthrough_enabled(const struct shardfs_fuse_context *context);

/// Registers the open file `fd` as a backing file: its ID (> 0), or a negative
/// errno. The kernel holds its own reference: the caller may close `fd`.
int shardfs_backing_open(struct fuse_session *session, int fd);

/// Unregisters a backing file (opens that name it keep it). 0 or a negative errno.
int shardfs_backing_close(struct fuse_session *session, int backing_id);

/// fuse_reply_open and fuse_reply_create with FOPEN_PASSTHROUGH and `backing_id`
/// added to the answer (`fi` must not ask for keep_cache).
int shardfs_reply_open_backed(fuse_req_t req, const struct fuse_file_info *fi, int backing_id);
int shardfs_reply_create_backed(fuse_req_t req, const struct fuse_entry_param *entry, const struct fuse_file_info *fi,
                                int backing_id);

#endif
