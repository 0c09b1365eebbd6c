#include "malloc_tuning.h"
#include <malloc.h>

void shardfs_keep_dirty_pages_in_heap(void) {
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    mallopt(M_TRIM_THRESHOLD, 32 << 20);
}
