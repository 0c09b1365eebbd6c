// FUSE over io_uring for libfuse 3.14: see include/fuse_ring.h for what and why.
// One file (about 700 lines) on purpose: the kernel ABI structures, the raw
// io_uring setup, the session I/O hooks and the ring threads share static
// state and invariants that splitting would have to export.
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include "fuse_ring.h"
#include "session_io.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse3/fuse_lowlevel.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

// The kernel's FUSE-over-io_uring ABI (include/uapi/linux/fuse.h, 7.42). The
// build machine's headers are older than the running kernel, so it is spelled
// out here.
#define RING_FUSE_OVER_IO_URING (1ULL << 41)
#define RING_IN_OUT_HEADER_SIZE 128
#define RING_OP_IN_OUT_SIZE 128
enum { RING_CMD_REGISTER = 1, RING_CMD_COMMIT_AND_FETCH = 2 };

struct ring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;  // to quote when committing the answer
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};

struct ring_req_header {
    char in_out[RING_IN_OUT_HEADER_SIZE];  // fuse_in_header in, fuse_out_header out
    char op_in[RING_OP_IN_OUT_SIZE];       // the operation's fixed-size argument
    struct ring_ent_in_out ent;
};

struct ring_cmd_req {  // in the SQE's 80-byte command area
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

_Static_assert(sizeof(struct ring_req_header) == 288, "fuse_uring_req_header is 288 bytes");
_Static_assert(sizeof(struct ring_cmd_req) == 24, "fuse_uring_cmd_req is 24 bytes");

// Room before a payload buffer for the request's headers, so that header,
// argument and payload form one contiguous /dev/fuse-style message without
// copying the payload.
#define PREFACE 4096
#define SQE_SIZE 128
#define EVENTFD_TAG UINT64_MAX

// One io_uring, mapped by hand (no liburing): the submission and completion
// rings and the 128-byte SQEs FUSE's commands need.
struct uring {
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    char *sqes;
    void *sq_map, *cq_map;
    size_t sq_map_size, cq_map_size, sqes_size;
    unsigned unsubmitted;
};

struct ring_entry {
    struct ring_req_header *header;  // page-aligned
    char *region;                    // PREFACE bytes, then the payload
    char *payload;
    size_t payload_size;
    struct iovec iov[2];
    uint64_t commit_id;
    uint64_t unique;
    int replied;
    int last_cmd;
};

struct ring_thread {
    struct shardfs_ring *ring;
    unsigned qid;
    pthread_t tid;
    int running;
    int eventfd;
    struct uring uring;
    unsigned count;
    struct ring_entry *entries;
};

/// Where the session's FUSE_INIT stands, as the custom I/O sees it.
enum init_state {
    INIT_WAITING,  // not read yet
    INIT_OFFERED,  // read, and the kernel offered io_uring: its answer takes the rings
    INIT_DONE,     // answered (rings taken or not), or io_uring was not offered
};

/// What the ring threads do before their first registration.
enum start_state { START_WAIT, START_GO, START_STOP };

struct shardfs_ring {
    struct fuse_session *session;
    struct shardfs_fuse_context *context;
    int fuse_fd;
    unsigned queues, thread_count;
    struct ring_thread *threads;
    atomic_int init_state;
    uint64_t init_unique;  // written before init_state becomes INIT_OFFERED
    pthread_mutex_t lock;  // guards start and its condition
    pthread_cond_t start_changed;
    enum start_state start;
    atomic_uint_fast64_t requests;
    atomic_int failed;
    atomic_int serving;  // 1 once FUSE_INIT's answer took the rings
    long fail_after;  // tests: fail the ring after this many requests (-1: never)
    char abort_path[64];  // /sys/fs/fuse/connections/N/abort, "" if unknown
    char mountpoint[4096];
    struct fuse_custom_io io;
};

// The ring entry whose request this thread is processing: its answer goes
// back through the ring. Set only around fuse_session_process_buf.
static __thread struct ring_entry *current_entry;

// MARK: io_uring

static int uring_setup(struct uring *u, unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    memset(u, 0, sizeof *u);
    u->fd = -1;
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 2;
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0) return -errno;
    u->fd = fd;
    u->entries = p.sq_entries;
    u->sq_map_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_map_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (u->cq_map_size > u->sq_map_size) u->sq_map_size = u->cq_map_size;
        u->cq_map_size = u->sq_map_size;
    }
    u->sq_map = mmap(NULL, u->sq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (u->sq_map == MAP_FAILED) { u->sq_map = NULL; return -errno; }
    if (single) {
        u->cq_map = u->sq_map;
    } else {
        u->cq_map = mmap(NULL, u->cq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (u->cq_map == MAP_FAILED) { u->cq_map = NULL; return -errno; }
    }
    u->sqes_size = p.sq_entries * SQE_SIZE;
    u->sqes = mmap(NULL, u->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED) { u->sqes = NULL; return -errno; }
    char *sq = u->sq_map, *cq = u->cq_map;
    u->sq_head = (unsigned *)(sq + p.sq_off.head);
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(sq + p.sq_off.array);
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

static void uring_close(struct uring *u) {
    if (u->sqes) munmap(u->sqes, u->sqes_size);
    if (u->cq_map && u->cq_map != u->sq_map) munmap(u->cq_map, u->cq_map_size);
    if (u->sq_map) munmap(u->sq_map, u->sq_map_size);
    if (u->fd >= 0) close(u->fd);
    memset(u, 0, sizeof *u);
    u->fd = -1;
}

/// A zeroed SQE to fill, published by uring_publish; NULL if the ring is full
/// (it cannot be: each thread has an SQE per entry plus one for its eventfd).
static struct io_uring_sqe *uring_sqe(struct uring *u) {
    unsigned tail = *u->sq_tail;
    unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= u->entries) return NULL;
    unsigned index = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(u->sqes + (size_t)index * SQE_SIZE);
    memset(sqe, 0, SQE_SIZE);
    u->sq_array[index] = index;
    return sqe;
}

static void uring_publish(struct uring *u) {
    __atomic_store_n(u->sq_tail, *u->sq_tail + 1, __ATOMIC_RELEASE);
    u->unsubmitted++;
}

/// Submits what is published and waits for at least one completion.
static int uring_submit_and_wait(struct uring *u) {
    for (;;) {
        int n = (int)syscall(__NR_io_uring_enter, u->fd, u->unsubmitted, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (n >= 0) {
            u->unsubmitted -= (unsigned)n < u->unsubmitted ? (unsigned)n : u->unsubmitted;
            return 0;
        }
        if (errno != EINTR) return -errno;
    }
}

// MARK: FUSE commands

static void prepare_command(struct ring_thread *t, struct ring_entry *e, int cmd) {
    struct io_uring_sqe *sqe = uring_sqe(&t->uring);
    if (!sqe) {  // impossible by construction; a lost entry would hang a request
        fprintf(stderr, "shardfs: FUSE ring %u has no free submission slot\n", t->qid);
        abort();
    }
    e->last_cmd = cmd;
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = t->ring->fuse_fd;
    sqe->cmd_op = (uint32_t)cmd;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd == RING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct ring_cmd_req *req = (struct ring_cmd_req *)sqe->cmd;
    req->qid = (uint16_t)t->qid;
    req->commit_id = cmd == RING_CMD_COMMIT_AND_FETCH ? e->commit_id : 0;
    uring_publish(&t->uring);
}

/// Answers the entry's request with an error (a malformed request, or one the
/// filesystem did not answer on this thread).
static void answer_error(struct ring_entry *e, int error) {
    struct fuse_out_header *out = (struct fuse_out_header *)e->header->in_out;
    out->len = sizeof *out;
    out->error = -error;
    out->unique = e->unique;
    e->header->ent.payload_sz = 0;
}

/// Hands one request from the ring to libfuse, as /dev/fuse would have
/// delivered it: header, argument and payload in one buffer.
static void process(struct ring_thread *t, struct ring_entry *e) {
    struct fuse_in_header in;
    memcpy(&in, e->header->in_out, sizeof in);
    uint32_t payload = e->header->ent.payload_sz;
    e->commit_id = e->header->ent.commit_id;
    e->unique = in.unique;
    e->replied = 0;
    if (e->commit_id == 0) return;  // the kernel could not match an answer: the caller sees ring_failed
    if (in.len < sizeof in + payload || in.len - sizeof in - payload > RING_OP_IN_OUT_SIZE || payload > e->payload_size) {
        fprintf(stderr, "shardfs: malformed FUSE ring request (opcode %u, length %u, payload %u)\n", in.opcode, in.len, payload);
        answer_error(e, EIO);
        return;
    }
    size_t argument = in.len - sizeof in - payload;
    char *start = e->payload - sizeof in - argument;
    memcpy(start, &in, sizeof in);
    memcpy(start + sizeof in, e->header->op_in, argument);
    struct fuse_buf buf;
    memset(&buf, 0, sizeof buf);
    buf.size = in.len;
    buf.mem = start;
    buf.fd = -1;
    current_entry = e;
    fuse_session_process_buf(t->ring->session, &buf);
    current_entry = NULL;
    if (!e->replied) {
        fprintf(stderr, "shardfs: FUSE request %u (opcode %u) was not answered on its ring thread\n",
                (unsigned)in.unique, in.opcode);
        answer_error(e, EIO);
    }
    atomic_fetch_add_explicit(&t->ring->requests, 1, memory_order_relaxed);
}

/// The answer to a ring request: into the entry's header and payload (the
/// thread commits it when processing returns).
static ssize_t answer_through_ring(struct ring_entry *e, const struct iovec *iov, int count) {
    struct fuse_out_header *out = (struct fuse_out_header *)e->header->in_out;
    memcpy(out, iov[0].iov_base, sizeof *out);
    size_t length = 0, total = iov[0].iov_len;
    for (int i = 1; i < count; i++) {
        if (length + iov[i].iov_len > e->payload_size) {
            answer_error(e, EIO);
            e->replied = 1;
            errno = EINVAL;
            return -1;
        }
        memmove(e->payload + length, iov[i].iov_base, iov[i].iov_len);
        length += iov[i].iov_len;
        total += iov[i].iov_len;
    }
    e->header->ent.payload_sz = (uint32_t)length;
    e->replied = 1;
    return (ssize_t)total;
}

/// Something the kernel waits on cannot go on (a command refused, io_uring
/// failing): end the mount rather than leave requests of this CPU hanging.
/// Aborting the connection fails them at once (ECONNABORTED); the session loop
/// then returns, and the daemon commits what it holds, unmounts and exits with
/// an error. The abort goes through the FUSE control filesystem when it is
/// mounted (the mount's owner may write it), else through a forced unmount of
/// this mount, which aborts it too (that needs CAP_SYS_ADMIN).
static void ring_failed(struct ring_thread *t, const char *what, int error) {
    struct shardfs_ring *ring = t->ring;
    fprintf(stderr, "shardfs: FUSE ring of CPU %u: %s: %s; ending the mount\n", t->qid, what, strerror(error));
    if (atomic_exchange(&ring->failed, 1)) return;
    fuse_session_exit(ring->session);
    int fd = ring->abort_path[0] ? open(ring->abort_path, O_WRONLY | O_CLOEXEC) : -1;
    int aborted = fd >= 0 && write(fd, "1", 1) == 1;
    if (fd >= 0) close(fd);
    if (!aborted && umount2(ring->mountpoint, MNT_FORCE) != 0 && errno != EBUSY)
        perror("shardfs: aborting the FUSE connection");
}

/// Whether a command's error only says the connection is gone (unmount, abort).
static int connection_gone(int error) {
    return error == ENOTCONN || error == ECANCELED || error == ECONNABORTED || error == ENODEV;
}

// MARK: Threads started from ring threads

// A ring thread is pinned to one CPU and in the SCHED_IDLE class (below), and a
// thread inherits both from the thread that starts it. Threads are started while
// a request is served: a thread pool growing (Swift's cooperative pool, a
// dispatch queue's workers), the shard log applier started by the first close,
// the staging thread of the first large file. Those must run like the rest of
// the process, not at idle priority on one CPU (measured: the log applier,
// which makes deferred closes durable, ran SCHED_IDLE on CPU 0). So this file
// interposes pthread_create: a thread started from a ring thread first takes
// the normal class and the process's CPUs, and a neutral name (until its own
// code names it), then runs its start routine. Other threads are not touched.

static __thread int in_ring_thread;
static cpu_set_t process_cpus;  // what the thread preparing the rings may run on
static atomic_int process_cpus_known;

struct started_thread {
    void *(*start)(void *);
    void *argument;
};

static void *start_like_the_process(void *argument) {
    struct started_thread started = *(struct started_thread *)argument;
    free(argument);
    struct sched_param no_priority = { .sched_priority = 0 };
    (void)pthread_setschedparam(pthread_self(), SCHED_OTHER, &no_priority);
    if (atomic_load(&process_cpus_known))
        (void)pthread_setaffinity_np(pthread_self(), sizeof process_cpus, &process_cpus);
    pthread_setname_np(pthread_self(), "shardfs-thread");
    return started.start(started.argument);
}

typedef int (*pthread_create_function)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

int pthread_create(pthread_t *thread, const pthread_attr_t *attributes, void *(*start)(void *), void *argument) {
    static _Atomic(pthread_create_function) next;
    pthread_create_function create = atomic_load(&next);
    if (!create) {
        create = (pthread_create_function)dlsym(RTLD_NEXT, "pthread_create");
        if (!create) return EAGAIN;
        atomic_store(&next, create);
    }
    if (!in_ring_thread) return create(thread, attributes, start, argument);
    struct started_thread *started = malloc(sizeof *started);
    if (!started) return EAGAIN;
    started->start = start;
    started->argument = argument;
    int rc = create(thread, attributes, start_like_the_process, started);
    if (rc != 0) free(started);
    return rc;
}

static void *ring_thread_main(void *argument) {
    struct ring_thread *t = argument;
    struct shardfs_ring *ring = t->ring;
    in_ring_thread = 1;
    char name[16];
    snprintf(name, sizeof name, "shardfs-ring-%u", t->qid);
    pthread_setname_np(pthread_self(), name);
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(t->qid, &cpus);
    (void)pthread_setaffinity_np(pthread_self(), sizeof cpus, &cpus);  // an offline CPU: run anywhere
    // The kernel wakes the caller while this thread is still running (it
    // commits the answer). A CPU running only SCHED_IDLE threads counts as idle
    // when the scheduler places a woken task, so the caller comes back to this
    // CPU instead of being moved to another one; its next request then lands on
    // this CPU's queue again. Measured with CPU hogs on the caller's own CPU,
    // the ring still answered faster than /dev/fuse (docs/PERFORMANCE.md).
    // The cost: with CPU-bound tasks on the same CPU, a ring thread runs only
    // when their slice ends (a few ms), and a lock it holds waits as long.
    // Switching to the normal class around each request would avoid that, but
    // the two system calls halved the create rate (measured).
    struct sched_param no_priority = { .sched_priority = 0 };
    (void)pthread_setschedparam(pthread_self(), SCHED_IDLE, &no_priority);

    // Registration waits for FUSE_INIT's answer (the kernel refuses it before).
    pthread_mutex_lock(&ring->lock);
    while (ring->start == START_WAIT) pthread_cond_wait(&ring->start_changed, &ring->lock);
    int go = ring->start == START_GO;
    pthread_mutex_unlock(&ring->lock);
    if (!go) return NULL;

    for (unsigned i = 0; i < t->count; i++) prepare_command(t, &t->entries[i], RING_CMD_REGISTER);
    struct io_uring_sqe *poll = uring_sqe(&t->uring);
    poll->opcode = IORING_OP_POLL_ADD;
    poll->fd = t->eventfd;
    poll->poll32_events = POLLIN;
    poll->user_data = EVENTFD_TAG;
    uring_publish(&t->uring);

    unsigned live = t->count;  // entries the kernel still holds for us
    while (live > 0) {
        int rc = uring_submit_and_wait(&t->uring);
        if (rc != 0) {
            ring_failed(t, "io_uring_enter", -rc);
            break;
        }
        unsigned head = *t->uring.cq_head;
        unsigned tail = __atomic_load_n(t->uring.cq_tail, __ATOMIC_ACQUIRE);
        int stop = 0;
        for (; head != tail; head++) {
            struct io_uring_cqe *cqe = &t->uring.cqes[head & *t->uring.cq_mask];
            if (cqe->user_data == EVENTFD_TAG) { stop = 1; continue; }
            struct ring_entry *e = (struct ring_entry *)(uintptr_t)cqe->user_data;
            int error = cqe->res < 0 ? -cqe->res : 0;
            if (error == EAGAIN || error == EINTR) {  // not ready yet: send it again
                prepare_command(t, e, e->last_cmd);
                continue;
            }
            if (error) {
                live--;
                if (connection_gone(error)) continue;
                if (e->last_cmd == RING_CMD_REGISTER) {
                    // The kernel fell back to /dev/fuse for the whole mount when
                    // it refused a registration (fuse_uring_cmd clears io_uring).
                    fprintf(stderr, "shardfs: FUSE ring of CPU %u not registered (%s); requests use /dev/fuse\n",
                            t->qid, strerror(error));
                    atomic_store_explicit(&t->ring->serving, 0, memory_order_release);  // no FORGET pauses then
                } else {
                    ring_failed(t, "committing an answer", error);
                }
                continue;
            }
            process(t, e);
            if (ring->fail_after >= 0 && (long)atomic_load(&ring->requests) >= ring->fail_after) {
                // As if the kernel had refused this answer: the entry is lost.
                ring_failed(t, "failure injected (SHARDFS_TEST_RING_FAIL_AFTER)", EIO);
                live--;
                continue;
            }
            if (e->commit_id == 0) {
                ring_failed(t, "a request without a commit id", EPROTO);
                live--;
                continue;
            }
            prepare_command(t, e, RING_CMD_COMMIT_AND_FETCH);
        }
        __atomic_store_n(t->uring.cq_head, head, __ATOMIC_RELEASE);
        if (stop) {
            // Answers prepared in this round still go to their callers.
            if (t->uring.unsubmitted > 0)
                (void)syscall(__NR_io_uring_enter, t->uring.fd, t->uring.unsubmitted, 0, 0, NULL, 0);
            break;
        }
    }
    return NULL;
}

// MARK: The session's I/O

// The kernel sends FORGETs through /dev/fuse even while the rings serve every
// other request: one per inode it evicts (every unlinked file, say), each a
// wake-up of a worker. While the rings serve, a worker that has just read a
// FORGET waits this long before it reads again, so that what the kernel queued
// meanwhile comes as one BATCH_FORGET. (An INTERRUPT, the only other request on
// /dev/fuse then, waits at most as long.)
#define FORGET_BATCHING_PAUSE_US 1000
static __thread int read_a_forget;

static ssize_t io_read(int fd, void *buf, size_t length, void *userdata) {
    struct shardfs_fuse_context *context = userdata;
    struct shardfs_ring *ring = __atomic_load_n(&context->ring, __ATOMIC_ACQUIRE);
    if (read_a_forget && ring && atomic_load_explicit(&ring->serving, memory_order_acquire))
        usleep(FORGET_BATCHING_PAUSE_US);
    ssize_t n = read(fd, buf, length);
    read_a_forget = n >= (ssize_t)sizeof(struct fuse_in_header) &&
                    (((const struct fuse_in_header *)buf)->opcode == FUSE_FORGET ||
                     ((const struct fuse_in_header *)buf)->opcode == FUSE_BATCH_FORGET);
    shardfs_passthrough_saw_request(context, buf, n);
    if (!ring || atomic_load_explicit(&ring->init_state, memory_order_acquire) != INIT_WAITING) return n;
    if (n >= (ssize_t)(sizeof(struct fuse_in_header) + offsetof(struct fuse_init_in, unused))) {
        const struct fuse_in_header *in = buf;
        if (in->opcode == FUSE_INIT) {
            const struct fuse_init_in *init = (const void *)(in + 1);
            uint64_t flags = init->flags;
            if (flags & FUSE_INIT_EXT) flags |= (uint64_t)init->flags2 << 32;
            ring->init_unique = in->unique;
            atomic_store_explicit(&ring->init_state, (flags & RING_FUSE_OVER_IO_URING) ? INIT_OFFERED : INIT_DONE,
                                  memory_order_release);
        }
    }
    return n;
}

static void set_start(struct shardfs_ring *ring, enum start_state start) {
    pthread_mutex_lock(&ring->lock);
    if (ring->start == START_WAIT) ring->start = start;
    pthread_cond_broadcast(&ring->start_changed);
    pthread_mutex_unlock(&ring->lock);
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata) {
    const struct fuse_out_header *out = iov[0].iov_base;
    if (out->unique == 0) return writev(fd, iov, count);  // a notification
    struct shardfs_fuse_context *context = userdata;
    shardfs_passthrough_answering(context, iov, count);
    struct ring_entry *e = current_entry;
    if (e && out->unique == e->unique) return answer_through_ring(e, iov, count);
    struct shardfs_ring *ring = __atomic_load_n(&context->ring, __ATOMIC_ACQUIRE);
    if (!ring || atomic_load_explicit(&ring->init_state, memory_order_acquire) != INIT_OFFERED ||
        out->unique != ring->init_unique)
        return writev(fd, iov, count);
    // FUSE_INIT's answer. Taking the rings: from here the kernel queues requests
    // for them and waits until every CPU's queue is registered.
    int take = out->error == 0 && count >= 2 && iov[1].iov_len >= offsetof(struct fuse_init_out, unused);
    if (take) {
        struct fuse_init_out *init = iov[1].iov_base;
        init->flags |= FUSE_INIT_EXT;
        init->flags2 |= (uint32_t)(RING_FUSE_OVER_IO_URING >> 32);
    }
    ssize_t n = writev(fd, iov, count);
    atomic_store_explicit(&ring->init_state, INIT_DONE, memory_order_release);
    if (take && n >= 0) atomic_store_explicit(&ring->serving, 1, memory_order_release);
    set_start(ring, take && n >= 0 ? START_GO : START_STOP);
    return n;
}

/// The hooks without rings (passthrough alone): io_read and io_writev find no ring.
static const struct fuse_custom_io plain_io = {.read = io_read, .writev = io_writev};

int shardfs_session_io_install(struct fuse_session *session, struct shardfs_fuse_context *context) {
    if (__atomic_load_n(&context->ring, __ATOMIC_ACQUIRE)) return 0;  // the rings' I/O has the hooks
    return fuse_session_custom_io(session, &plain_io, fuse_session_fd(session));
}

// MARK: Setup and teardown

/// The kernel keeps a queue per *possible* CPU (a VM may have more possible
/// CPUs than present ones), and waits for all of them to be registered.
unsigned shardfs_possible_cpus(void) {
    FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
    unsigned highest = 0;
    int found = 0;
    if (f) {
        char text[256];
        if (fgets(text, sizeof text, f)) {
            for (char *p = text; *p;) {  // "0-3,5": the largest number is the last CPU
                if (*p >= '0' && *p <= '9') {
                    unsigned long v = strtoul(p, &p, 10);
                    if (v >= highest) highest = (unsigned)v;
                    found = 1;
                } else {
                    p++;
                }
            }
        }
        fclose(f);
    }
    if (found) return highest + 1;
    long n = sysconf(_SC_NPROCESSORS_CONF);
    return n > 0 ? (unsigned)n : 1;
}

/// Whether a CPU is there and online (a possible CPU may be neither).
static int cpu_online(unsigned cpu) {
    char path[96];
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%u", cpu);
    if (access(path, F_OK) != 0) return 0;
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%u/online", cpu);
    FILE *f = fopen(path, "re");
    if (!f) return 1;  // no switch: always online (CPU 0)
    int c = fgetc(f);
    fclose(f);
    return c == '1';
}

int shardfs_kernel_allows_rings(void) {
    FILE *f = fopen("/sys/module/fuse/parameters/enable_uring", "re");
    if (!f) return -1;
    int c = fgetc(f);
    fclose(f);
    return c == 'Y';
}

/// Finds a FUSE mount in /proc/self/mountinfo; returns its device minor number
/// (which names its FUSE connection), or -1.
static long find_mount(const char *mountpoint) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) return -1;
    char *line = NULL;
    size_t capacity = 0;
    long found = -1;
    while (getline(&line, &capacity, f) > 0) {
        unsigned major, minor;
        char point[4096];
        // "36 25 0:45 / /mount/point rw,... - fuse.shardfs ...": octal escapes in the point
        if (sscanf(line, "%*u %*u %u:%u %*s %4095s", &major, &minor, point) != 3) continue;
        const char *separator = strstr(line, " - ");
        if (!separator || strncmp(separator + 3, "fuse", 4) != 0) continue;  // FUSE mounts only
        char plain[4096];
        size_t j = 0;
        for (size_t i = 0; point[i] && j + 1 < sizeof plain; j++) {
            if (point[i] == '\\' && point[i + 1] && point[i + 2] && point[i + 3]) {
                plain[j] = (char)(((point[i + 1] - '0') << 6) | ((point[i + 2] - '0') << 3) | (point[i + 3] - '0'));
                i += 4;
            } else {
                plain[j] = point[i++];
            }
        }
        plain[j] = 0;
        if (strcmp(plain, mountpoint) == 0) found = minor;
    }
    free(line);
    fclose(f);
    return found;
}

int shardfs_is_mounted(const char *mountpoint) { return find_mount(mountpoint) >= 0; }

/// Stops the threads (waiting ones and serving ones) and frees everything.
static void stop_and_free(struct shardfs_ring *ring) {
    set_start(ring, START_STOP);
    for (unsigned i = 0; i < ring->thread_count; i++) {
        struct ring_thread *t = &ring->threads[i];
        if (!t->running) continue;
        uint64_t one = 1;
        if (write(t->eventfd, &one, sizeof one) != sizeof one) perror("shardfs: waking a FUSE ring thread");
        pthread_join(t->tid, NULL);
        t->running = 0;
    }
    for (unsigned i = 0; i < ring->thread_count; i++) {
        struct ring_thread *t = &ring->threads[i];
        for (unsigned j = 0; t->entries && j < t->count; j++) {
            struct ring_entry *e = &t->entries[j];
            if (e->header) munmap(e->header, PREFACE);
            if (e->region) munmap(e->region, PREFACE + e->payload_size);
        }
        free(t->entries);
        uring_close(&t->uring);
        if (t->eventfd >= 0) close(t->eventfd);
    }
    free(ring->threads);
    pthread_cond_destroy(&ring->start_changed);
    pthread_mutex_destroy(&ring->lock);
    free(ring);
}

int shardfs_ring_prepare(struct fuse_session *session, struct shardfs_fuse_context *context, const char *mountpoint,
                         unsigned threads_per_queue, unsigned entries_per_thread, size_t payload_size) {
    if (threads_per_queue < 1 || entries_per_thread < 1) return -EINVAL;
    int allowed = shardfs_kernel_allows_rings();
    if (allowed <= 0) return allowed < 0 ? -ENOSYS : -EOPNOTSUPP;
    struct shardfs_ring *ring = calloc(1, sizeof *ring);
    if (!ring) return -ENOMEM;
    pthread_mutex_init(&ring->lock, NULL);
    pthread_cond_init(&ring->start_changed, NULL);
    ring->start = START_WAIT;
    const char *fail_after = getenv("SHARDFS_TEST_RING_FAIL_AFTER");
    ring->fail_after = fail_after ? atol(fail_after) : -1;
    ring->session = session;
    ring->context = context;
    ring->fuse_fd = fuse_session_fd(session);
    ring->queues = shardfs_possible_cpus();
    if (!atomic_load(&process_cpus_known) && sched_getaffinity(0, sizeof process_cpus, &process_cpus) == 0)
        atomic_store(&process_cpus_known, 1);
    // A possible CPU that is not online sends no requests: one thread registers
    // its queue (the kernel needs every queue), the others serve.
    unsigned *threads_of = calloc(ring->queues, sizeof *threads_of);
    if (!threads_of) {
        pthread_cond_destroy(&ring->start_changed);
        pthread_mutex_destroy(&ring->lock);
        free(ring);
        return -ENOMEM;
    }
    for (unsigned q = 0; q < ring->queues; q++) {
        threads_of[q] = cpu_online(q) ? threads_per_queue : 1;
        ring->thread_count += threads_of[q];
    }
    long connection = find_mount(mountpoint);
    if (connection >= 0)
        snprintf(ring->abort_path, sizeof ring->abort_path, "/sys/fs/fuse/connections/%ld/abort", connection);
    snprintf(ring->mountpoint, sizeof ring->mountpoint, "%s", mountpoint);
    ring->threads = calloc(ring->thread_count, sizeof *ring->threads);
    if (ring->threads) {
        for (unsigned q = 0, i = 0; q < ring->queues; q++)
            for (unsigned k = 0; k < threads_of[q]; k++) ring->threads[i++].qid = q;
    }
    free(threads_of);
    if (!ring->threads) {
        pthread_cond_destroy(&ring->start_changed);
        pthread_mutex_destroy(&ring->lock);
        free(ring);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < ring->thread_count; i++) {
        ring->threads[i].eventfd = -1;
        ring->threads[i].uring.fd = -1;
    }
    int rc = 0;
    // Everything that can fail is done now, threads included, before FUSE_INIT
    // is answered: once the kernel is told to use the rings, it waits for them.
    for (unsigned i = 0; i < ring->thread_count && rc == 0; i++) {
        struct ring_thread *t = &ring->threads[i];
        t->ring = ring;
        t->count = entries_per_thread;
        t->eventfd = eventfd(0, EFD_CLOEXEC);
        if (t->eventfd < 0) { rc = -errno; break; }
        rc = uring_setup(&t->uring, entries_per_thread + 1);
        if (rc != 0) break;
        t->entries = calloc(t->count, sizeof *t->entries);
        if (!t->entries) { rc = -ENOMEM; break; }
        for (unsigned j = 0; j < t->count; j++) {
            struct ring_entry *e = &t->entries[j];
            e->payload_size = payload_size;
            e->header = mmap(NULL, PREFACE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (e->header == MAP_FAILED) { e->header = NULL; rc = -errno; break; }
            e->region = mmap(NULL, PREFACE + payload_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (e->region == MAP_FAILED) { e->region = NULL; rc = -errno; break; }
            e->payload = e->region + PREFACE;
            e->iov[0].iov_base = e->header;
            e->iov[0].iov_len = sizeof(struct ring_req_header);
            e->iov[1].iov_base = e->payload;
            e->iov[1].iov_len = payload_size;
        }
        if (rc == 0) {
            rc = -pthread_create(&t->tid, NULL, ring_thread_main, t);
            t->running = rc == 0;
        }
    }
    if (rc == 0) {
        ring->io.read = io_read;
        ring->io.writev = io_writev;
        rc = fuse_session_custom_io(session, &ring->io, ring->fuse_fd);
    }
    if (rc != 0) {
        stop_and_free(ring);
        return rc;
    }
    __atomic_store_n(&context->ring, ring, __ATOMIC_RELEASE);
    return 0;
}

int shardfs_ring_failed(const struct shardfs_ring *ring) {
    return ring ? atomic_load(&((struct shardfs_ring *)ring)->failed) : 0;
}

uint64_t shardfs_ring_requests(const struct shardfs_ring *ring) {
    return ring ? atomic_load(&((struct shardfs_ring *)ring)->requests) : 0;
}

void shardfs_ring_stop(struct shardfs_ring *ring) {
    if (!ring) return;
    __atomic_store_n(&ring->context->ring, NULL, __ATOMIC_RELEASE);
    stop_and_free(ring);
}

// MARK: Request counts

static atomic_uint_fast64_t request_counts[64];

// Per opcode: answers by how long the daemon took (from the callback's start to
// its reply, on the thread that handles it), in SHARDFS_LATENCY_BUCKETS buckets
// (the last one unbounded), and the sum of those times in nanoseconds.
static const uint64_t latency_bounds_ns[SHARDFS_LATENCY_BUCKETS - 1] = {
    10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000,
    10000000, 25000000, 50000000, 100000000, 250000000, 1000000000,
};
static atomic_uint_fast64_t latency_counts[64][SHARDFS_LATENCY_BUCKETS];
static atomic_uint_fast64_t latency_sums_ns[64];
static _Thread_local unsigned current_opcode;
static _Thread_local uint64_t current_start_ns;  // 0: no request being handled

static uint64_t monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

void shardfs_count_request(unsigned opcode) {
    unsigned slot = opcode < 64 ? opcode : 63;
    atomic_fetch_add_explicit(&request_counts[slot], 1, memory_order_relaxed);
    current_opcode = slot;
    current_start_ns = monotonic_ns();
}

void shardfs_request_answered(void) {
    if (!current_start_ns) return;
    uint64_t elapsed = monotonic_ns() - current_start_ns;
    current_start_ns = 0;
    unsigned bucket = 0;
    while (bucket < SHARDFS_LATENCY_BUCKETS - 1 && elapsed > latency_bounds_ns[bucket]) bucket++;
    atomic_fetch_add_explicit(&latency_counts[current_opcode][bucket], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&latency_sums_ns[current_opcode], elapsed, memory_order_relaxed);
}

uint64_t shardfs_latency_bound_ns(unsigned bucket) {
    return bucket < SHARDFS_LATENCY_BUCKETS - 1 ? latency_bounds_ns[bucket] : UINT64_MAX;
}

uint64_t shardfs_latency_count(unsigned opcode, unsigned bucket) {
    if (opcode >= 64 || bucket >= SHARDFS_LATENCY_BUCKETS) return 0;
    return atomic_load_explicit(&latency_counts[opcode][bucket], memory_order_relaxed);
}

uint64_t shardfs_latency_sum_ns(unsigned opcode) {
    return opcode < 64 ? atomic_load_explicit(&latency_sums_ns[opcode], memory_order_relaxed) : 0;
}

uint64_t shardfs_requests_of(unsigned opcode) {
    return atomic_load_explicit(&request_counts[opcode < 64 ? opcode : 63], memory_order_relaxed);
}
