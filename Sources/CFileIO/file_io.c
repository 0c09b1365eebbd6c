#define _GNU_SOURCE
#include <fcntl.h>

#include "file_io.h"

int shardfs_start_writeback(int fd, long long offset, long long nbytes) {
    return sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE);
}
