#ifndef SHARDFS_CLMDB_SHIM_H
#define SHARDFS_CLMDB_SHIM_H
#include <lmdb.h>
#include <stdint.h>
#include <string.h>

/* A hint to start loading memory that will be read soon (listing scans touch
   each record once; overlapping those cache misses is most of their speed). */
static inline void shardfs_prefetch(const void *address) { __builtin_prefetch(address, 0, 3); }

/* Hints the CPU to load every node of the leaf page that holds `key`, a key a
   cursor returned in a read-only transaction (it points into the map). A scan
   calls this once per page: the page's node headers are then fetched together
   instead of one cache miss after another, which is what bounds an in-order scan.

   This reads LMDB's page layout (mdb.c: MDB_page, MDB_node; the on-disk format of
   every 0.9 release): a node is an 8-byte header followed by its key; a page
   starts with pgno (8 bytes), pad (2), flags (2), lower (2), upper (2), then an
   array of 2-byte node offsets from the page's start, up to `lower`. `page_size`
   must be the environment's page size and equal the OS page size (the caller
   checks), so the page start rounds down within memory that is mapped because
   the key is: a wrong guess costs only useless prefetches, never a fault. */
static inline const void *shardfs_prefetch_leaf_page(const void *key, size_t page_size) {
    const unsigned char *node = (const unsigned char *)key - 8;
    const unsigned char *page = (const unsigned char *)((uintptr_t)node & ~(uintptr_t)(page_size - 1));
    uint16_t flags, lower;
    memcpy(&flags, page + 10, sizeof flags);
    memcpy(&lower, page + 12, sizeof lower);
    /* P_LEAF (0x02) and not P_LEAF2 (0x20); `lower` within the page. */
    if ((flags & 0x22) != 0x02 || lower < 16 || lower > page_size) return page;
    for (size_t at = 16; at + 2 <= lower; at += 2) {
        uint16_t offset;
        memcpy(&offset, page + at, sizeof offset);
        if (offset < page_size) __builtin_prefetch(page + offset, 0, 3);
    }
    return page;
}
#endif
