/*
 * core.h: errors, allocation with fault injection, clock, logging and small helpers shared by
 * every libkeel module.
 *
 * DESIGN
 * Nothing here owns threads. The fault-injection table is process-global and lock-free
 * (atomics), so tests may arm it from one thread while keel threads consult it. Fault points
 * exist only when KEEL_FAULT_INJECTION is defined (Debug and sanitizer builds); in Release
 * builds keel__fault_hit() is the constant false and the compiler removes every check.
 */
#ifndef KEEL_CORE_CORE_H
#define KEEL_CORE_CORE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "keel/keel.h"

/* Always-on assertion for broken invariants (double release, refcount underflow). */
#define KEEL__ASSERT(cond)                                                                         \
    do {                                                                                           \
        if (!(cond))                                                                               \
            keel__panic(__FILE__, __LINE__, #cond);                                                \
    } while (0)

_Noreturn void keel__panic(const char *file, int line, const char *what);

/* ---- fault injection */

typedef enum keel__fault_point {
    KEEL__FAULT_ALLOC = 0,      /* keel__malloc and friends return NULL */
    KEEL__FAULT_BACKEND_LOAD,   /* the backend's model load fails */
    KEEL__FAULT_CONTEXT_CREATE, /* creating an execution context fails */
    KEEL__FAULT_SUBMIT,         /* keel_infer_submit fails after taking its queue slot */
    KEEL__FAULT_BACKEND_RUN,    /* the backend's run fails */
    KEEL__FAULT_COMPLETION,     /* delivering outputs into the request fails */
    KEEL__FAULT_COUNT_,         /* the points above make a call fail */
    /* Not a failure (so outside the range tests iterate over to fail calls): each published
     * model load leaks on purpose, see keel__fault_leak_on_publish. */
    KEEL__FAULT_LEAK_PER_SWAP = KEEL__FAULT_COUNT_,
    /* Not a failure either: a request's backend run never returns (keel__fault_hang). */
    KEEL__FAULT_BACKEND_HANG,
    KEEL__FAULT_ALL_
} keel__fault_point;

const char *keel__fault_name(keel__fault_point p);

#ifdef KEEL_FAULT_INJECTION
bool keel__fault_hit(keel__fault_point p);
/* Fail only the nth call (1-based) from now on. */
void keel__fault_arm_nth(keel__fault_point p, uint64_t nth);
/* Fail every call with probability prob (0..1), deterministic for a given seed. */
void keel__fault_arm_prob(keel__fault_point p, double prob, uint64_t seed);
void keel__fault_disarm_all(void);
/* How many calls this point has failed since it was armed. */
uint64_t keel__fault_fired(keel__fault_point p);
/*
 * Called once per published model load, with no lock held. When KEEL__FAULT_LEAK_PER_SWAP
 * fires it leaks 64 KiB of touched memory and one memfd, on purpose, so that `keel soak` can
 * be shown to catch a leak. The blocks stay reachable from a static list (LeakSanitizer does
 * not report them: the test proves the soak verdict, not LSan) and the memfd is never closed.
 * Processes that use libkeel arm points from the environment: KEEL_FAULT=name[,name...]
 * (names as keel__fault_name) makes each fire on every call; only in fault-injection builds.
 */
void keel__fault_leak_on_publish(void);
/* Called right before a request's backend run. When KEEL__FAULT_BACKEND_HANG fires the
 * calling thread blocks for good, as in a backend call that never returns (the scenario of
 * a shutdown with a hung backend). */
void keel__fault_hang(void);
#else
#define keel__fault_hit(p) ((void)(p), false)
#define keel__fault_leak_on_publish() ((void)0)
#define keel__fault_hang() ((void)0)
#endif

/* ---- allocation (returns NULL on failure or injected fault) */

#define KEEL__CACHELINE 64

void *keel__malloc(size_t n);
void *keel__calloc(size_t n, size_t size);
/* Zeroed memory aligned to KEEL__CACHELINE, for objects with per-thread shards (_Alignas);
 * released with free(). */
void *keel__calloc_lines(size_t size);
void *keel__realloc(void *p, size_t n);
char *keel__strdup(const char *s);
char *keel__strndup(const char *s, size_t n);

/* ---- errors */

keel_err keel__err_from_errno(int e);
/* snprintf into errbuf if it is non-NULL; always NUL-terminates. */
void keel__errf(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- clock */

uint64_t keel__now_ns(void);  /* CLOCK_MONOTONIC */
uint64_t keel__unix_ms(void); /* CLOCK_REALTIME */

/* ---- logging */

typedef struct keel__logger {
    keel_log_fn fn;
    void *user;
    keel_log_level level;
} keel__logger;

void keel__log(const keel__logger *lg, keel_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Checks the level before formatting anything. */
#define KEEL__LOG(lg, lvl, ...)                                                                    \
    do {                                                                                           \
        if ((lg)->fn != NULL && (lvl) <= (lg)->level)                                              \
            keel__log((lg), (lvl), __VA_ARGS__);                                                   \
    } while (0)

/* ---- messages */

/* Formats dims as "[a,b,c]" into buf (always NUL-terminated; truncated if short). */
void keel__format_dims(char *buf, size_t len, const int64_t *dims, size_t ndims);

/* ---- checked arithmetic */

static inline bool keel__mul_overflow_size(size_t a, size_t b, size_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}

#endif
