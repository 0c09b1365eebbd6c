#ifndef SHARDFS_CRC32C_H
#define SHARDFS_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/* CRC-32C (Castagnoli) of `length` bytes, continuing from `crc` (0 to start).
   Uses the CPU's crc32 instruction when it has one (SSE 4.2), else a table. */
uint32_t shardfs_crc32c(uint32_t crc, const void *data, size_t length);
#endif
