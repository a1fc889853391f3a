/*
 * heap.c: allocator statistics and trimming for glibc malloc and jemalloc (heap.h).
 *
 * DESIGN
 * jemalloc is found at run time: dlsym(RTLD_DEFAULT, "mallctl") once (pthread_once) finds it
 * whether the program links it or LD_PRELOAD brings it, and a glibc-only process finds NULL.
 * Its statistics are cached until "epoch" is written, so a read writes the epoch first; the
 * free-but-held figure is stats.resident (pages the allocator has resident, metadata included)
 * minus stats.allocated. glibc's mallinfo2 walks every arena under the arena's lock: in use is
 * uordblks (small chunks) plus hblkhd (mmapped chunks), held is fordblks (free chunks and the
 * top chunk). No state of keel's own besides the once-resolved function pointer.
 */
#include "core/heap.h"

#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>

typedef int (*mallctl_fn)(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static mallctl_fn je_mallctl; /* written once under `once`, read-only afterwards */

static void resolve(void)
{
    void *sym = dlsym(RTLD_DEFAULT, "mallctl");

    memcpy(&je_mallctl, &sym, sizeof(je_mallctl)); /* object to function pointer, POSIX-style */
}

static mallctl_fn jemalloc(void)
{
    pthread_once(&once, resolve);
    return je_mallctl;
}

static uint64_t je_size(mallctl_fn ctl, const char *name)
{
    size_t v = 0, len = sizeof(v);

    if (ctl(name, &v, &len, NULL, 0) != 0)
        return 0;
    return (uint64_t)v;
}

void keel__heap_stats_get(keel__heap_stats *out)
{
    mallctl_fn ctl = jemalloc();

    memset(out, 0, sizeof(*out));
    if (ctl != NULL) {
        uint64_t epoch = 1, allocated, resident;
        size_t len = sizeof(epoch);
        out->allocator = "jemalloc";
        (void)ctl("epoch", &epoch, &len, &epoch, len); /* refresh the cached statistics */
        allocated = je_size(ctl, "stats.allocated");
        resident = je_size(ctl, "stats.resident");
        out->in_use_bytes = allocated;
        out->free_bytes = resident > allocated ? resident - allocated : 0;
        return;
    }
    struct mallinfo2 mi = mallinfo2();
    out->allocator = "glibc";
    out->in_use_bytes = (uint64_t)mi.uordblks + (uint64_t)mi.hblkhd;
    out->free_bytes = (uint64_t)mi.fordblks;
}

void keel__heap_trim(void)
{
    mallctl_fn ctl = jemalloc();

    if (ctl != NULL) {
        /* The calling thread's cache first: the reaper's holds what freeing the generation
         * just gave back, the loader's the parse garbage, and pages with a cached object in
         * them cannot be purged. Then "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's
         * unused dirty pages go back. */
        (void)ctl("thread.tcache.flush", NULL, NULL, NULL, 0);
        (void)ctl("arena.4096.purge", NULL, NULL, NULL, 0);
        return;
    }
    malloc_trim(0);
}
