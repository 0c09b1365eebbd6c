#ifndef SHARDFS_MALLOC_TUNING_H
#define SHARDFS_MALLOC_TUNING_H

/* LMDB mallocs a transaction's dirty pages, a large value's overflow pages as
   one block each (a 128 KiB chunk: 33 pages), and frees them at commit. With
   glibc's defaults such a block either gets an mmap of its own or is trimmed
   back to the kernel when freed, so every chunk written faults its pages in
   afresh. Keeps blocks under 4 MiB in the heap (LMDB's largest, its dirty-page
   list, is 2 MiB), and up to 32 MiB of free heap for reuse. Larger blocks (a
   file's staging buffers) still get an mmap of their own: freed, they go back
   to the kernel at once instead of staying in whichever of glibc's per-thread
   arenas took them. Process-wide: call once, in a process that writes large
   values. */
void shardfs_keep_dirty_pages_in_heap(void);

#endif
