/*
 * xthread_free.c: an LD_PRELOAD library that counts frees of memory allocated by another
 * thread, and where they happen.
 *
 * DESIGN
 * A measuring tool for bench/xthread_free.sh (never linked into keel, never run by the test
 * suite). With glibc's allocator, a block allocated on thread A and freed on thread B goes
 * into B's per-thread cache; a steady stream of them starves A's cache and overfills B's, and
 * both threads then take the slow paths under the arena locks, which slows every other
 * allocation of theirs too (docs/PERFORMANCE.md, "Session 6"). This library wraps malloc,
 * calloc, realloc and free, remembers the allocating thread of every live block in an
 * open-addressed table (one mutex: slow, which a count does not mind), and at exit prints
 * the number of frees, how many were cross-thread, and the distinct call stacks of the
 * cross-thread ones (up to 64, six frames each, with the block's size and a count) for
 * addr2line. Blocks from posix_memalign and friends are not tracked (their frees count as
 * same-thread). Allocation before dlsym resolves the real functions comes from a small
 * static buffer and is never freed.
 *
 * Threads: any; the table and the stack list are under one mutex; a thread-local flag keeps
 * backtrace()'s own allocations out of the count.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TABLE_SIZE (1u << 22) /* live blocks tracked at once: more than any bench holds */
#define MAX_SITES 64
#define FRAMES 6

typedef struct block {
    void *p;
    int tid;
    size_t size;
} block;

typedef struct site {
    void *frame[FRAMES];
    long n;
    size_t size;
} site;

static block table[TABLE_SIZE];
static site sites[MAX_SITES];
static int nsites;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local int my_tid, in_hook;
static _Atomic long nfree, ncross;
static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static _Alignas(16) char boot[1 << 16];
static size_t boot_used;

static int tid(void)
{
    if (my_tid == 0)
        my_tid = (int)syscall(SYS_gettid);
    return my_tid;
}

static unsigned slot_of(const void *p)
{
    return (unsigned)(((uintptr_t)p >> 4) * 2654435761u) & (TABLE_SIZE - 1);
}

static void *boot_alloc(size_t n)
{
    void *p;

    n = (n + 15) & ~(size_t)15;
    if (boot_used + n > sizeof(boot))
        return NULL;
    p = boot + boot_used;
    boot_used += n;
    return p;
}

static bool from_boot(const void *p)
{
    return (const char *)p >= boot && (const char *)p < boot + sizeof(boot);
}

static void remember(void *p, size_t size)
{
    unsigned i;

    if (p == NULL || in_hook)
        return;
    pthread_mutex_lock(&mu);
    i = slot_of(p);
    while (table[i].p != NULL && table[i].p != p)
        i = (i + 1) & (TABLE_SIZE - 1);
    table[i].p = p; /* new, or an address reused after a free we did not see */
    table[i].tid = tid();
    table[i].size = size;
    pthread_mutex_unlock(&mu);
}

/* Removes p (backward-shift deletion keeps the probe chains whole); its block or tid -1. */
static block forget(void *p)
{
    block b = {NULL, -1, 0};
    unsigned i, j;

    pthread_mutex_lock(&mu);
    i = slot_of(p);
    while (table[i].p != NULL && table[i].p != p)
        i = (i + 1) & (TABLE_SIZE - 1);
    if (table[i].p == p) {
        b = table[i];
        table[i].p = NULL;
        for (j = (i + 1) & (TABLE_SIZE - 1); table[j].p != NULL; j = (j + 1) & (TABLE_SIZE - 1)) {
            unsigned k = slot_of(table[j].p);
            bool moves = i <= j ? (k <= i || k > j) : (k <= i && k > j);
            if (moves) {
                table[i] = table[j];
                table[j].p = NULL;
                i = j;
            }
        }
    }
    pthread_mutex_unlock(&mu);
    return b;
}

static void note_free(void *p)
{
    void *bt[FRAMES + 2];
    block b;
    int n, s;

    if (p == NULL || in_hook)
        return;
    b = forget(p);
    atomic_fetch_add(&nfree, 1);
    if (b.p == NULL || b.tid == tid())
        return;
    atomic_fetch_add(&ncross, 1);
    in_hook = 1;
    n = backtrace(bt, FRAMES + 2);
    if (n < FRAMES + 2)
        memset(bt + n, 0, sizeof(void *) * (size_t)(FRAMES + 2 - n));
    pthread_mutex_lock(&mu);
    for (s = 0; s < nsites; s++) {
        if (memcmp(sites[s].frame, bt + 2, sizeof(sites[s].frame)) == 0)
            break;
    }
    if (s == nsites && nsites < MAX_SITES) {
        memcpy(sites[s].frame, bt + 2, sizeof(sites[s].frame));
        sites[s].size = b.size;
        nsites++;
    }
    if (s < MAX_SITES)
        sites[s].n++;
    pthread_mutex_unlock(&mu);
    in_hook = 0;
}

void *malloc(size_t n)
{
    void *p;

    if (real_malloc == NULL && (real_malloc = dlsym(RTLD_NEXT, "malloc")) == NULL)
        return boot_alloc(n);
    p = real_malloc(n);
    remember(p, n);
    return p;
}

void *calloc(size_t a, size_t b)
{
    void *p;

    if (real_calloc == NULL) {
        /* dlsym itself may calloc: answer from the static buffer (zeroed) meanwhile. */
        if (b != 0 && a > SIZE_MAX / b)
            return NULL;
        p = boot_alloc(a * b);
        real_calloc = dlsym(RTLD_NEXT, "calloc");
        return p;
    }
    p = real_calloc(a, b);
    remember(p, a * b);
    return p;
}

void *realloc(void *old, size_t n)
{
    void *p;

    if (real_realloc == NULL)
        real_realloc = dlsym(RTLD_NEXT, "realloc");
    if (from_boot(old)) {
        size_t left = (size_t)(boot + sizeof(boot) - (char *)old);
        p = malloc(n);
        if (p != NULL)
            memcpy(p, old, n < left ? n : left); /* the old size is unknown: copy what fits */
        return p;
    }
    if (old != NULL)
        note_free(old);
    p = real_realloc(old, n);
    remember(p, n);
    return p;
}

void free(void *p)
{
    if (p == NULL || from_boot(p))
        return;
    if (real_free == NULL)
        real_free = dlsym(RTLD_NEXT, "free");
    note_free(p);
    real_free(p);
}

__attribute__((destructor)) static void report(void)
{
    in_hook = 1;
    fprintf(stderr, "xthread_free: frees %ld cross-thread %ld\n", (long)atomic_load(&nfree),
            (long)atomic_load(&ncross));
    for (int s = 0; s < nsites; s++) {
        char **sym = backtrace_symbols(sites[s].frame, FRAMES);
        fprintf(stderr, "xthread_free: site %d: %ld frees of %zu-byte blocks\n", s, sites[s].n,
                sites[s].size);
        for (int k = 0; k < FRAMES && sites[s].frame[k] != NULL; k++)
            fprintf(stderr, "xthread_free:     %s\n", sym != NULL ? sym[k] : "?");
    }
}
