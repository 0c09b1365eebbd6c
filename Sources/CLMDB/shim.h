#ifndef SHARDFS_CLMDB_SHIM_H
#define SHARDFS_CLMDB_SHIM_H
#include <lmdb.h>

/* A hint to start loading memory that will be read soon (listing scans touch
   each record once; overlapping those cache misses is most of their speed). */
static inline void shardfs_prefetch(const void *address) { __builtin_prefetch(address, 0, 3); }
#endif
