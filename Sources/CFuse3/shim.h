#ifndef SHARDFS_CFUSE3_SHIM_H
#define SHARDFS_CFUSE3_SHIM_H
// 312 makes fuse_session_loop_mt a real function (older versions define a
// function-like macro, which Swift cannot import).
#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#endif
