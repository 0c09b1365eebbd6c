#ifndef SHARDFS_FILE_IO_H
#define SHARDFS_FILE_IO_H

/* File calls that glibc declares only under _GNU_SOURCE, which Swift's Glibc
   module is built without. */

/* sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE): starts writeback
   of the range's dirty pages and returns without waiting for it. Returns 0, or
   -1 with errno set. Durability still needs fdatasync: this only moves disk
   work earlier, so that a later fdatasync has less left to wait for. */
int shardfs_start_writeback(int fd, long long offset, long long nbytes);

#endif
