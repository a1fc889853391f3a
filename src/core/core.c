/*
 * core.c: see core.h.
 *
 * DESIGN
 * The fault table is an array of atomics per point: mode, countdown, probability threshold,
 * PRNG state and a fired counter. Arming and hitting race benignly (a test arms a point before
 * starting the traffic it wants to fail), but every access is atomic so ThreadSanitizer stays
 * quiet and no torn value is ever read.
 */
#include "core/core.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

_Noreturn void keel__panic(const char *file, int line, const char *what)
{
    /* A broken invariant: continuing would corrupt memory or lose requests. */
    fprintf(stderr, "keel: invariant violated at %s:%d: %s\n", file, line, what);
    abort();
}

static const char *const err_names[KEEL_ERR_COUNT_] = {
    [KEEL_OK] = "KEEL_OK",
    [KEEL_EINVAL] = "KEEL_EINVAL",
    [KEEL_ENOMEM] = "KEEL_ENOMEM",
    [KEEL_ENOTFOUND] = "KEEL_ENOTFOUND",
    [KEEL_EUNAVAILABLE] = "KEEL_EUNAVAILABLE",
    [KEEL_ETIMEDOUT] = "KEEL_ETIMEDOUT",
    [KEEL_ECANCELED] = "KEEL_ECANCELED",
    [KEEL_ESHUTDOWN] = "KEEL_ESHUTDOWN",
    [KEEL_ECONFIG] = "KEEL_ECONFIG",
    [KEEL_ELOAD] = "KEEL_ELOAD",
    [KEEL_EBACKEND] = "KEEL_EBACKEND",
    [KEEL_EIO] = "KEEL_EIO",
    [KEEL_EBUSY] = "KEEL_EBUSY",
    [KEEL_EINTERNAL] = "KEEL_EINTERNAL",
    [KEEL_ERESOURCE] = "KEEL_ERESOURCE",
};

static const char *const err_texts[KEEL_ERR_COUNT_] = {
    [KEEL_OK] = "success",
    [KEEL_EINVAL] = "invalid argument or input",
    [KEEL_ENOMEM] = "out of memory",
    [KEEL_ENOTFOUND] = "not found",
    [KEEL_EUNAVAILABLE] = "unavailable",
    [KEEL_ETIMEDOUT] = "deadline exceeded",
    [KEEL_ECANCELED] = "cancelled",
    [KEEL_ESHUTDOWN] = "shutting down",
    [KEEL_ECONFIG] = "invalid model configuration",
    [KEEL_ELOAD] = "model load failed",
    [KEEL_EBACKEND] = "backend error",
    [KEEL_EIO] = "I/O error",
    [KEEL_EBUSY] = "busy",
    [KEEL_EINTERNAL] = "internal error",
    [KEEL_ERESOURCE] = "resource limit exceeded",
};

const char *keel_strerror(keel_err err)
{
    if ((unsigned)err >= KEEL_ERR_COUNT_)
        return "unknown error";
    return err_texts[err];
}

const char *keel_err_name(keel_err err)
{
    if ((unsigned)err >= KEEL_ERR_COUNT_)
        return "KEEL_E?";
    return err_names[err];
}

keel_err keel__err_from_errno(int e)
{
    switch (e) {
    case ENOMEM:
        return KEEL_ENOMEM;
    case ENOENT:
    case ENOTDIR:
        return KEEL_ENOTFOUND;
    case EINVAL:
        return KEEL_EINVAL;
    default:
        return KEEL_EIO;
    }
}

void keel__errf(char *errbuf, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

/* ---- datatypes */

static const struct {
    const char *name;
    const char *triton;
    size_t size;
} dtypes[KEEL_TYPE_COUNT_] = {
    [KEEL_TYPE_INVALID] = {"INVALID", "TYPE_INVALID", 0},
    [KEEL_TYPE_BOOL] = {"BOOL", "TYPE_BOOL", 1},
    [KEEL_TYPE_UINT8] = {"UINT8", "TYPE_UINT8", 1},
    [KEEL_TYPE_UINT16] = {"UINT16", "TYPE_UINT16", 2},
    [KEEL_TYPE_UINT32] = {"UINT32", "TYPE_UINT32", 4},
    [KEEL_TYPE_UINT64] = {"UINT64", "TYPE_UINT64", 8},
    [KEEL_TYPE_INT8] = {"INT8", "TYPE_INT8", 1},
    [KEEL_TYPE_INT16] = {"INT16", "TYPE_INT16", 2},
    [KEEL_TYPE_INT32] = {"INT32", "TYPE_INT32", 4},
    [KEEL_TYPE_INT64] = {"INT64", "TYPE_INT64", 8},
    [KEEL_TYPE_FP16] = {"FP16", "TYPE_FP16", 2},
    [KEEL_TYPE_FP32] = {"FP32", "TYPE_FP32", 4},
    [KEEL_TYPE_FP64] = {"FP64", "TYPE_FP64", 8},
    [KEEL_TYPE_BYTES] = {"BYTES", "TYPE_STRING", 0},
};

const char *keel_datatype_name(keel_datatype dt)
{
    if ((unsigned)dt >= KEEL_TYPE_COUNT_)
        return "INVALID";
    return dtypes[dt].name;
}

keel_datatype keel_datatype_from_name(const char *name)
{
    bool triton;

    if (name == NULL)
        return KEEL_TYPE_INVALID;
    /* One comparison per candidate, and a strcmp only when the first letter matches: this
     * runs for every tensor of every request (issue 11). */
    triton = strncmp(name, "TYPE_", 5) == 0;
    if (triton)
        name += 5;
    for (int i = 1; i < KEEL_TYPE_COUNT_; i++) {
        const char *cand = triton ? dtypes[i].triton + 5 : dtypes[i].name;
        if (cand[0] == name[0] && strcmp(name, cand) == 0)
            return (keel_datatype)i;
    }
    if (triton && strcmp(name, "BYTES") == 0)
        return KEEL_TYPE_BYTES;
    return KEEL_TYPE_INVALID;
}

size_t keel_datatype_size(keel_datatype dt)
{
    if ((unsigned)dt >= KEEL_TYPE_COUNT_)
        return 0;
    return dtypes[dt].size;
}

/* ---- fault injection */

static const char *const fault_names[KEEL__FAULT_ALL_] = {
    [KEEL__FAULT_ALLOC] = "alloc",
    [KEEL__FAULT_BACKEND_LOAD] = "backend_load",
    [KEEL__FAULT_CONTEXT_CREATE] = "context_create",
    [KEEL__FAULT_SUBMIT] = "submit",
    [KEEL__FAULT_BACKEND_RUN] = "backend_run",
    [KEEL__FAULT_COMPLETION] = "completion",
    [KEEL__FAULT_LEAK_PER_SWAP] = "leak_per_swap",
    [KEEL__FAULT_BACKEND_HANG] = "backend_hang",
};

const char *keel__fault_name(keel__fault_point p)
{
    if ((unsigned)p >= KEEL__FAULT_ALL_)
        return "?";
    return fault_names[p];
}

#ifdef KEEL_FAULT_INJECTION
enum { FAULT_OFF = 0, FAULT_NTH, FAULT_PROB };

static struct {
    _Atomic int mode;
    _Atomic uint64_t countdown; /* FAULT_NTH: calls left before the failing one */
    _Atomic uint64_t threshold; /* FAULT_PROB: fail when the next random value < threshold */
    _Atomic uint64_t rng;       /* FAULT_PROB: splitmix64 state */
    _Atomic uint64_t fired;
} faults[KEEL__FAULT_ALL_];

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

bool keel__fault_hit(keel__fault_point p)
{
    int mode = atomic_load_explicit(&faults[p].mode, memory_order_acquire);

    if (mode == FAULT_OFF)
        return false;
    if (mode == FAULT_NTH) {
        uint64_t left = atomic_load(&faults[p].countdown);
        while (left > 0) {
            if (atomic_compare_exchange_weak(&faults[p].countdown, &left, left - 1)) {
                if (left == 1) {
                    atomic_fetch_add(&faults[p].fired, 1);
                    return true;
                }
                return false;
            }
        }
        return false;
    }
    /* FAULT_PROB: each caller draws a distinct step of the sequence. */
    uint64_t step = atomic_fetch_add(&faults[p].rng, 1);
    if (splitmix64(step) < atomic_load(&faults[p].threshold)) {
        atomic_fetch_add(&faults[p].fired, 1);
        return true;
    }
    return false;
}

void keel__fault_arm_nth(keel__fault_point p, uint64_t nth)
{
    atomic_store(&faults[p].mode, FAULT_OFF);
    atomic_store(&faults[p].countdown, nth);
    atomic_store(&faults[p].fired, 0);
    atomic_store_explicit(&faults[p].mode, FAULT_NTH, memory_order_release);
}

void keel__fault_arm_prob(keel__fault_point p, double prob, uint64_t seed)
{
    uint64_t threshold;

    if (prob <= 0.0)
        threshold = 0;
    else if (prob >= 1.0)
        threshold = UINT64_MAX;
    else
        threshold = (uint64_t)(prob * 18446744073709551616.0);
    atomic_store(&faults[p].mode, FAULT_OFF);
    atomic_store(&faults[p].threshold, threshold);
    atomic_store(&faults[p].rng, seed);
    atomic_store(&faults[p].fired, 0);
    atomic_store_explicit(&faults[p].mode, FAULT_PROB, memory_order_release);
}

void keel__fault_disarm_all(void)
{
    for (int i = 0; i < KEEL__FAULT_ALL_; i++)
        atomic_store(&faults[i].mode, FAULT_OFF);
}

uint64_t keel__fault_fired(keel__fault_point p)
{
    return atomic_load(&faults[p].fired);
}

/* The deliberately leaked blocks, reachable from here for the life of the process. */
static struct leaked_block {
    struct leaked_block *next;
} * leaked_blocks;
static pthread_mutex_t leaked_mu = PTHREAD_MUTEX_INITIALIZER;

void keel__fault_leak_on_publish(void)
{
    enum { LEAK_BYTES = 64 * 1024 };
    struct leaked_block *b;

    if (!keel__fault_hit(KEEL__FAULT_LEAK_PER_SWAP))
        return;
    if ((b = malloc(LEAK_BYTES)) != NULL) {
        memset(b, 0xa5, LEAK_BYTES); /* touched, so it counts in RSS */
        pthread_mutex_lock(&leaked_mu);
        b->next = leaked_blocks;
        leaked_blocks = b;
        pthread_mutex_unlock(&leaked_mu);
    }
    (void)memfd_create("keel-fault-leak", MFD_CLOEXEC); /* never closed */
}

void keel__fault_hang(void)
{
    if (!keel__fault_hit(KEEL__FAULT_BACKEND_HANG))
        return;
    for (;;)
        pause(); /* no handler is installed for the signals that could end it */
}

/* KEEL_FAULT=name[,name...]: arms those points to fire on every call, at load time, so that
 * a program on the public API only (keel serve) can run with a fault armed. */
__attribute__((constructor)) static void fault_arm_from_env(void)
{
    const char *env = getenv("KEEL_FAULT");

    while (env != NULL && *env != '\0') {
        size_t n = strcspn(env, ",");
        for (int i = 0; i < KEEL__FAULT_ALL_; i++) {
            if (strlen(fault_names[i]) == n && strncmp(env, fault_names[i], n) == 0)
                keel__fault_arm_prob((keel__fault_point)i, 1.0, 0);
        }
        env += n;
        env += *env == ',';
    }
}
#endif

/* ---- allocation */

void *keel__malloc(size_t n)
{
    if (keel__fault_hit(KEEL__FAULT_ALLOC))
        return NULL;
    return malloc(n == 0 ? 1 : n);
}

void *keel__calloc(size_t n, size_t size)
{
    if (keel__fault_hit(KEEL__FAULT_ALLOC))
        return NULL;
    if (n == 0 || size == 0)
        return calloc(1, 1);
    return calloc(n, size);
}

void *keel__calloc_lines(size_t size)
{
    size_t n = (size + KEEL__CACHELINE - 1) / KEEL__CACHELINE * KEEL__CACHELINE;
    void *p;

    if (keel__fault_hit(KEEL__FAULT_ALLOC))
        return NULL;
    if ((p = aligned_alloc(KEEL__CACHELINE, n > 0 ? n : KEEL__CACHELINE)) != NULL)
        memset(p, 0, n > 0 ? n : KEEL__CACHELINE);
    return p;
}

void *keel__realloc(void *p, size_t n)
{
    if (keel__fault_hit(KEEL__FAULT_ALLOC))
        return NULL;
    return realloc(p, n == 0 ? 1 : n);
}

char *keel__strndup(const char *s, size_t n)
{
    char *d;

    if ((d = keel__malloc(n + 1)) == NULL)
        return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *keel__strdup(const char *s)
{
    return keel__strndup(s, strlen(s));
}

/* ---- clock */

uint64_t keel__now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t keel__unix_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000ULL + (uint64_t)ts.tv_nsec / 1000000ULL;
}

/* ---- logging */

void keel__log(const keel__logger *lg, keel_log_level level, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;

    if (lg->fn == NULL || level > lg->level)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    lg->fn(lg->user, level, buf);
}

void keel__format_dims(char *buf, size_t len, const int64_t *dims, size_t ndims)
{
    size_t off;
    int n;

    if (len == 0)
        return;
    n = snprintf(buf, len, "[");
    if (n < 0 || (size_t)n >= len)
        return;
    off = (size_t)n;
    for (size_t i = 0; i < ndims; i++) {
        n = snprintf(buf + off, len - off, "%s%lld", i > 0 ? "," : "", (long long)dims[i]);
        if (n < 0 || (size_t)n >= len - off)
            return; /* truncated (snprintf terminated it) */
        off += (size_t)n;
    }
    snprintf(buf + off, len - off, "]");
}
