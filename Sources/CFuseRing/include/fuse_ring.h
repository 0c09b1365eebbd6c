#ifndef SHARDFS_FUSE_RING_H
#define SHARDFS_FUSE_RING_H
// FUSE over io_uring (Linux 6.14+, fs/fuse/dev_uring.c) for libfuse 3.14, which
// does not speak it itself.
//
// Why: every FUSE request is a synchronous round trip. Over /dev/fuse, the
// daemon thread that takes a request may run on another CPU than the caller,
// and on a virtual machine whose idle vCPUs halt, waking across vCPUs costs
// more than the request's work. Over io_uring the kernel keeps one queue per
// CPU: a request goes to the queue of the caller's CPU, served by threads
// pinned to that CPU, so caller and daemon take turns on one CPU.
//
// How, in libfuse terms: the session gets a custom I/O (fuse_session_custom_io)
// that reads and writes /dev/fuse as usual, but (1) answers FUSE_INIT with
// FUSE_OVER_IO_URING when the kernel offers it, (2) then releases the ring
// threads (started, with their buffers, before that answer), which register
// their entries and hand each request to fuse_session_process_buf, and (3)
// sends a reply that belongs to a ring request back through its ring entry
// instead of /dev/fuse. Requests the kernel
// still sends over /dev/fuse (FORGET, INTERRUPT) and notifications keep using
// the descriptor, served by libfuse's own loop.
//
// Rules the code relies on:
// - Every request taken from a ring is answered on the thread that processes
//   it, before fuse_session_process_buf returns (the bridge answers every
//   operation on the calling thread).
// - shardfs_ring_stop must run before fuse_session_unmount/destroy.
// - Ring threads are pinned to one CPU and SCHED_IDLE. This file interposes
//   pthread_create so that a thread started from a ring thread (a pool growing
//   during a request, a lazily started helper thread) takes the normal class
//   and the process's CPUs instead of inheriting those.

#include <stddef.h>
#include <stdint.h>

struct fuse_session;
struct shardfs_ring;

/// What libfuse hands callbacks as userdata: the filesystem, the ring, and
/// where passthrough stands (fuse_passthrough.h; written by the C code only).
struct shardfs_fuse_context {
    void *filesystem;
    struct shardfs_ring *ring;
    int passthrough;                   // 0 not asked, 1 asked at FUSE_INIT, 2 on
    uint64_t passthrough_init_unique;  // FUSE_INIT's request, when the kernel offered passthrough
};

/// Prepares FUSE over io_uring for a session just mounted at `mountpoint`
/// (before its loop runs): one queue per possible CPU, `threads_per_queue`
/// threads per queue, `entries_per_thread` requests in flight per thread (1: a
/// thread is given a request only when it waits for one, so a request that
/// blocks holds up no other), payload buffers of `payload_size` bytes (the
/// session's max_write). Installs the custom I/O on the session and sets
/// `context->ring`. Returns 0, or a negative errno when the rings cannot be
/// used (-EOPNOTSUPP: the fuse module's enable_uring is off; -ENOSYS: the
/// kernel has no FUSE over io_uring); the session then keeps plain /dev/fuse
/// I/O. The kernel still decides at FUSE_INIT.
///
/// Should a ring fail after the kernel took the rings (a command refused,
/// io_uring failing), the connection is aborted and the session told to exit:
/// requests fail (ENOTCONN) instead of hanging, and `shardfs_ring_failed` says
/// so, for the daemon to unmount and exit with an error.
/// (Tests make that happen with SHARDFS_TEST_RING_FAIL_AFTER=N in the daemon's
/// environment: the ring fails after N requests.)
int shardfs_ring_prepare(struct fuse_session *session, struct shardfs_fuse_context *context, const char *mountpoint,
                         unsigned threads_per_queue, unsigned entries_per_thread, size_t payload_size);

/// Whether a ring failed and aborted the connection (see above).
int shardfs_ring_failed(const struct shardfs_ring *ring);

/// The kernel's queue count: one per possible CPU.
unsigned shardfs_possible_cpus(void);

/// 1 if the fuse module's enable_uring is on, 0 if off, -1 if the kernel has
/// no such switch.
int shardfs_kernel_allows_rings(void);

/// Whether the mount table (/proc/self/mountinfo) has a FUSE mount at `mountpoint`.
int shardfs_is_mounted(const char *mountpoint);

/// Requests answered through the rings so far (0 while, or when, the kernel
/// does not use them).
uint64_t shardfs_ring_requests(const struct shardfs_ring *ring);

/// Requests the bridge was handed, by FUSE opcode (the kernel's numbering,
/// fuse_kernel.h; opcodes >= 64 are counted as 63): one count per round trip
/// between a caller and the daemon, over either transport. Process-wide (a
/// daemon serves one mount); relaxed atomics, cheap enough to stay on.
void shardfs_count_request(unsigned opcode);
uint64_t shardfs_requests_of(unsigned opcode);

/// How long the daemon took to answer, per opcode: `shardfs_count_request`
/// starts the clock of the calling thread's request, `shardfs_request_answered`
/// (called right after the reply is sent, on the same thread) stops it and
/// counts the time in one of SHARDFS_LATENCY_BUCKETS buckets (10 µs … 1 s, then
/// unbounded). Requests with no reply (FORGET) are not counted. Relaxed atomics.
#define SHARDFS_LATENCY_BUCKETS 16
void shardfs_request_answered(void);
/// The upper bound of a bucket in nanoseconds (UINT64_MAX for the last).
uint64_t shardfs_latency_bound_ns(unsigned bucket);
uint64_t shardfs_latency_count(unsigned opcode, unsigned bucket);
uint64_t shardfs_latency_sum_ns(unsigned opcode);

/// Stops and joins the ring threads and frees the ring. Requests the kernel
/// queued on the ring afterwards wait until the unmount fails them.
void shardfs_ring_stop(struct shardfs_ring *ring);

#endif
