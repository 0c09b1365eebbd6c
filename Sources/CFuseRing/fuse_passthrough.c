// FUSE passthrough for libfuse 3.14: see include/fuse_passthrough.h.
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include "fuse_passthrough.h"

#include <errno.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>

#include "session_io.h"

// The kernel's passthrough ABI (include/uapi/linux/fuse.h, 7.40). The build
// machine's headers are older than the running kernel, so it is spelled out here.
#define PT_FUSE_PASSTHROUGH (1ULL << 37)
#define PT_FOPEN_PASSTHROUGH (1u << 7)
#define PT_MIN_MINOR 40

struct pt_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define PT_IOC_BACKING_OPEN _IOW(229, 1, struct pt_backing_map)
#define PT_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

/// fuse_init_out's first 40 bytes as of 7.40: max_stack_depth took the first
/// of the reserved words libfuse 3.14 sends as zeros.
struct pt_init_out {
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2;
    uint32_t max_stack_depth;
};
_Static_assert(offsetof(struct pt_init_out, max_stack_depth) == 36, "max_stack_depth follows flags2");

/// fuse_open_out as of 7.40: the padding became the backing ID.
struct pt_open_out {
    uint64_t fh;
    uint32_t open_flags;
    int32_t backing_id;
};
_Static_assert(sizeof(struct pt_open_out) == sizeof(struct fuse_open_out), "fuse_open_out is 16 bytes");

int shardfs_passthrough_request(struct fuse_session *session, struct shardfs_fuse_context *context) {
    __atomic_store_n(&context->passthrough, 1, __ATOMIC_RELEASE);
    int rc = shardfs_session_io_install(session, context);
    if (rc != 0) __atomic_store_n(&context->passthrough, 0, __ATOMIC_RELEASE);
    return rc;
}

int shardfs_passthrough_enabled(const struct shardfs_fuse_context *context) {
    return __atomic_load_n(&context->passthrough, __ATOMIC_ACQUIRE) == 2;
}

void shardfs_passthrough_saw_request(struct shardfs_fuse_context *context, const void *buf, ssize_t n) {
    if (n < (ssize_t)(sizeof(struct fuse_in_header) + offsetof(struct fuse_init_in, unused))) return;
    const struct fuse_in_header *in = buf;
    if (in->opcode != FUSE_INIT || __atomic_load_n(&context->passthrough, __ATOMIC_ACQUIRE) != 1) return;
    const struct fuse_init_in *init = (const void *)(in + 1);
    uint64_t flags = init->flags;
    if (flags & FUSE_INIT_EXT) flags |= (uint64_t)init->flags2 << 32;
    if (init->major == 7 && init->minor >= PT_MIN_MINOR && (flags & PT_FUSE_PASSTHROUGH))
        __atomic_store_n(&context->passthrough_init_unique, in->unique, __ATOMIC_RELEASE);
}

/// The backing file this thread's next OPEN or CREATE answer names (0: none).
static __thread int32_t answer_backing;

void shardfs_passthrough_answering(struct shardfs_fuse_context *context, struct iovec *iov, int count) {
    const struct fuse_out_header *out = iov[0].iov_base;
    if (answer_backing) {
        // libfuse sends an answer as its header and one argument, which for
        // OPEN is a fuse_open_out and for CREATE ends with one.
        if (out->error == 0 && count == 2 && iov[1].iov_len >= sizeof(struct pt_open_out)) {
            struct pt_open_out *open = (void *)((char *)iov[1].iov_base + iov[1].iov_len - sizeof *open);
            open->open_flags |= PT_FOPEN_PASSTHROUGH;
            open->backing_id = answer_backing;
        }
        answer_backing = 0;
        return;
    }
    uint64_t init_unique = __atomic_load_n(&context->passthrough_init_unique, __ATOMIC_ACQUIRE);
    if (init_unique == 0 || out->unique != init_unique) return;
    __atomic_store_n(&context->passthrough_init_unique, 0, __ATOMIC_RELEASE);
    if (out->error != 0 || count < 2 || iov[1].iov_len < sizeof(struct pt_init_out)) return;
    struct pt_init_out *init = iov[1].iov_base;
    init->flags |= FUSE_INIT_EXT;
    init->flags2 |= (uint32_t)(PT_FUSE_PASSTHROUGH >> 32);
    init->max_stack_depth = 1;  // backing files on filesystems that stack on none
    __atomic_store_n(&context->passthrough, 2, __ATOMIC_RELEASE);
}

int shardfs_backing_open(struct fuse_session *session, int fd) {
    struct pt_backing_map map = {.fd = fd};
    int id = ioctl(fuse_session_fd(session), PT_IOC_BACKING_OPEN, &map);
    return id > 0 ? id : (id == 0 ? -EPROTO : -errno);
}

int shardfs_backing_close(struct fuse_session *session, int backing_id) {
    uint32_t id = (uint32_t)backing_id;
    return ioctl(fuse_session_fd(session), PT_IOC_BACKING_CLOSE, &id) == 0 ? 0 : -errno;
}

int shardfs_reply_open_backed(fuse_req_t req, const struct fuse_file_info *fi, int backing_id) {
    answer_backing = backing_id;
    int rc = fuse_reply_open(req, fi);
    answer_backing = 0;  // consumed by the hook, unless libfuse failed before sending
    return rc;
}

int shardfs_reply_create_backed(fuse_req_t req, const struct fuse_entry_param *entry, const struct fuse_file_info *fi,
                                int backing_id) {
    answer_backing = backing_id;
    int rc = fuse_reply_create(req, entry, fi);
    answer_backing = 0;
    return rc;
}
