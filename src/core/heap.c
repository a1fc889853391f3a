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
 * top chunk).
 *
 * The build arena (jemalloc only): a backend binds its loading thread to it while it parses a
 * model (keel__heap_build_begin/end), so the model's memory and the far larger garbage of the
 * parse share pages only with each other. jemalloc never gives back an arena's metadata
 * (the extent descriptors a parse's peak needed: ~3 MiB for a 12 MB XGBoost JSON file) except
 * by destroying the arena, so keel__heap_trim destroys it once nothing in it is allocated
 * (statistics read after "epoch"; thread caches' objects count as allocated, so a cached
 * object keeps it) and no thread is bound to it; the next build creates a new one. One
 * arena, not one per generation: while a model is loaded the arena lives anyway, and a build
 * that left an object in it (a library's thread-local) keeps it alive, reused, instead of
 * adding another. Destroying an arena with a live object would free that object under its
 * owner; the allocated == 0 check is what makes it safe, as only a thread bound through
 * build_begin can allocate from a created arena (jemalloc never assigns one automatically).
 * arena_mu guards build_arena and build_users; a leaf lock (jemalloc's locks are taken under
 * it, nothing of keel's); the destroy runs after unlocking.
 */
#include "core/heap.h"

#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

typedef int (*mallctl_fn)(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static mallctl_fn je_mallctl; /* written once under `once`, read-only afterwards */

/* The build arena (jemalloc only). arena_mu guards both; it is a leaf lock, and the arena's
 * destruction runs after it is unlocked. */
static pthread_mutex_t arena_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned build_arena; /* 0: none (arena 0 is automatic, never a build arena) */
static int build_users;      /* threads bound to build_arena between begin and end */

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

/* Bytes allocated in arena `ind` (thread caches' objects count as allocated), or UINT64_MAX if
 * this jemalloc cannot say (built without statistics). */
static uint64_t arena_allocated(mallctl_fn ctl, unsigned ind)
{
    char name[64];
    uint64_t epoch = 1, total = 0;
    size_t len = sizeof(epoch), v, vlen;
    static const char *const kinds[] = {"small", "large"};

    (void)ctl("epoch", &epoch, &len, &epoch, len);
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        snprintf(name, sizeof(name), "stats.arenas.%u.%s.allocated", ind, kinds[i]);
        vlen = sizeof(v);
        if (ctl(name, &v, &vlen, NULL, 0) != 0)
            return UINT64_MAX;
        total += v;
    }
    return total;
}

void keel__heap_build_begin(keel__heap_build *b)
{
    mallctl_fn ctl = jemalloc();
    unsigned prev = 0, ind = 0;
    size_t len = sizeof(unsigned);

    memset(b, 0, sizeof(*b));
    if (ctl == NULL)
        return;
    if (ctl("thread.arena", &prev, &len, NULL, 0) != 0)
        return;
    pthread_mutex_lock(&arena_mu);
    if (build_arena == 0) {
        len = sizeof(ind);
        if (ctl("arenas.create", &ind, &len, NULL, 0) != 0)
            ind = 0;
        build_arena = ind;
    }
    ind = build_arena;
    if (ind != 0)
        build_users++;
    pthread_mutex_unlock(&arena_mu);
    if (ind == 0)
        return;
    /* Cached objects of the thread's old arena must not be handed out as the build's. */
    (void)ctl("thread.tcache.flush", NULL, NULL, NULL, 0);
    if (ctl("thread.arena", NULL, NULL, &ind, sizeof(ind)) != 0) {
        pthread_mutex_lock(&arena_mu);
        build_users--;
        pthread_mutex_unlock(&arena_mu);
        return;
    }
    b->prev_arena = prev;
    b->bound = true;
}

void keel__heap_build_end(keel__heap_build *b)
{
    mallctl_fn ctl = jemalloc();

    if (!b->bound)
        return;
    /* What the build freed into this thread's cache goes back to the build arena, and the
     * cache holds nothing of it afterwards. */
    (void)ctl("thread.tcache.flush", NULL, NULL, NULL, 0);
    (void)ctl("thread.arena", NULL, NULL, &b->prev_arena, sizeof(b->prev_arena));
    pthread_mutex_lock(&arena_mu);
    build_users--;
    pthread_mutex_unlock(&arena_mu);
    b->bound = false;
}

/* Destroys the build arena if nothing in it is allocated any more and no build is bound to
 * it: its metadata (extent descriptors grown with the build's peak) goes back with it. */
static void build_arena_retire(mallctl_fn ctl)
{
    unsigned ind = 0;
    char name[64];

    pthread_mutex_lock(&arena_mu);
    if (build_arena != 0 && build_users == 0 && arena_allocated(ctl, build_arena) == 0) {
        ind = build_arena;
        build_arena = 0;
    }
    pthread_mutex_unlock(&arena_mu);
    if (ind == 0)
        return;
    snprintf(name, sizeof(name), "arena.%u.destroy", ind);
    (void)ctl(name, NULL, NULL, NULL, 0);
}

void keel__heap_thread_idle(void)
{
    mallctl_fn ctl = jemalloc();
    unsigned ind;
    size_t len = sizeof(ind);
    char name[64];

    if (ctl == NULL)
        return;
    /* "thread.idle" (jemalloc 5.3) flushes the caller's cache and purges its arena only by
     * a heuristic; an older jemalloc has only the flush. Then the thread's arena is purged:
     * without jemalloc's background thread, decay runs only when an arena allocates, so the
     * pages the flush emptied would stay resident while everything sleeps. */
    if (ctl("thread.idle", NULL, NULL, NULL, 0) != 0)
        (void)ctl("thread.tcache.flush", NULL, NULL, NULL, 0);
    if (ctl("thread.arena", &ind, &len, NULL, 0) == 0) {
        snprintf(name, sizeof(name), "arena.%u.purge", ind);
        (void)ctl(name, NULL, NULL, NULL, 0);
    }
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
        build_arena_retire(ctl);
        return;
    }
    malloc_trim(0);
}
