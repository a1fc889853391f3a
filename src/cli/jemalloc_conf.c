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
 *   dirty_decay_ms:1000 pages freed while serving go back to the OS after about a second
 *   muzzy_decay_ms:0    idle, not at once: with 0, the madvise of every freed large block
 *                       (a batch's merged input, a body buffer) and the page faults of its
 *                       reuse cost 14 % of the HTTP thread's time and halved batched
 *                       throughput (docs/PERFORMANCE.md, issue 12). A retired generation's
 *                       memory still leaves RSS when the reaper frees it: keel__heap_trim
 *                       purges every arena explicitly then (core/heap.c).
 * No state, no threads: a constant read by the allocator.
 */
#include "cli_alloc.h"

const char *malloc_conf = KEEL_JEMALLOC_CONF;
