/*
 * jemalloc_conf.c: the allocator settings of the keel program when it is linked with Debian's
 * jemalloc (CMake option KEEL_JEMALLOC, on by default outside sanitizer builds).
 *
 * DESIGN
 * jemalloc reads the string `malloc_conf` of the program at its first allocation, before
 * main; MALLOC_CONF in the environment still overrides it. The settings come from the soak
 * comparison in docs/PERFORMANCE.md ("Memory over reloads"): glibc's malloc keeps the freed
 * memory of retired generations in fragments of many arenas and RSS creeps by about 2 MiB
 * between reload 1,000 and 3,000; jemalloc with these settings stays flat.
 *   narenas:2          one arena per core of the target machine instead of four per CPU, so
 *                      the garbage of a model load is not spread over arenas that serve
 *                      nothing else afterwards;
 *   dirty_decay_ms:250 freed pages go back to the OS within a quarter of a second
 *   muzzy_decay_ms:0   (madvise), not at once: a server reuses what it freed microseconds
 *                      ago. With 0, every slab that emptied was unmapped and faulted in again
 *                      by the next allocation: under gRPC load (a ~13 KB arena per call, 32
 *                      calls in flight) page faults and the TLB shootdowns of the madvise calls
 *                      took a quarter of the server's CPU (issue 13), and under batched HTTP
 *                      load (a batch's merged input, body buffers) 14 % of the HTTP thread's
 *                      (issue 12). A retired generation's
 *                      memory still leaves RSS when the reaper frees it: keel__heap_trim
 *                      (src/core/heap.c) flushes the thread cache and purges every arena then,
 *                      whatever the decay.
 * No state, no threads: a constant read by the allocator.
 */
#include "cli_alloc.h"

const char *malloc_conf = KEEL_JEMALLOC_CONF;
