#ifndef SHARDFS_CLMDB_SHIM_H
#define SHARDFS_CLMDB_SHIM_H
#include <lmdb.h>
#endif
