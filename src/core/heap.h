/*
 * heap.h: what the process's allocator holds, and giving its free memory back, whichever
 * allocator that is (glibc's malloc, or jemalloc linked into the program or preloaded).
 *
 * DESIGN
 * The allocator is the process's, not keel's: libkeel never picks one. keel__heap_* asks
 * jemalloc through mallctl when the process has it (looked up once with dlsym, so libkeel does
 * not link it) and glibc otherwise (mallinfo2, malloc_trim). No locks of keel's own; the
 * allocators lock internally. Any thread may call these; they take milliseconds on a large
 * heap, so the runtime calls keel__heap_trim only on its reaper thread.
 */
#ifndef KEEL_CORE_HEAP_H
#define KEEL_CORE_HEAP_H

#include <stdbool.h>
#include <stdint.h>

typedef struct keel__heap_stats {
    const char *allocator; /* "jemalloc" or "glibc" (static string) */
    uint64_t in_use_bytes; /* allocated by the program and not freed yet */
    uint64_t free_bytes;   /* freed by the program but still held (resident or mapped) by the
                              allocator: fragmentation and caches, not a leak */
} keel__heap_stats;

void keel__heap_stats_get(keel__heap_stats *out);

/* Returns free memory the allocator holds to the operating system (malloc_trim, or with
 * jemalloc: the calling thread's cache flushed, every arena purged, and the build arena
 * destroyed if nothing in it is allocated any more). */
void keel__heap_trim(void);

/* The calling thread is about to sleep after work: it gives back what its allocator cache
 * holds (jemalloc: "thread.idle"; nothing with glibc). Costs microseconds: call it when a
 * thread has been idle a while, not per request. */
void keel__heap_thread_idle(void);

/* A model parse's binding of its thread to the build arena (caller's storage, zeroed or set
 * by begin). */
typedef struct keel__heap_build {
    unsigned prev_arena;
    bool bound;
} keel__heap_build;

/* Binds the calling thread to the build arena (created if there is none) until
 * keel__heap_build_end on the same thread; the thread's cache is flushed at both ends. Without
 * jemalloc, or if jemalloc refuses, nothing is bound and the allocations go where they would
 * have gone. What the thread allocates meanwhile and keeps past the model's life (a library's
 * one-time or thread-local state) keeps the arena from being destroyed: initialize such
 * state before binding. */
void keel__heap_build_begin(keel__heap_build *b);
/* Undoes begin; does nothing if begin bound nothing (or end ran already). */
void keel__heap_build_end(keel__heap_build *b);

#endif
