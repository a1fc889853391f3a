/*
 * bench_infer.c: what keel costs on top of calling XGBoost directly.
 *
 * DESIGN
 * One process measures, on the reference model of bench/train-reference.sh (100 trees,
 * depth 6, 20 FP32 features; models ref_i1 and ref_i2 differ only in instance count):
 *   raw    XGBoosterPredictFromDense on the booster, called exactly as src/backends/xgboost.c
 *          calls it: nthread=1, a proxy DMatrix per calling thread, the array interface
 *          formatted per call, the same prediction config; the caller reads the result in
 *          place. Run on 1 thread, or on 2 threads (one proxy each) as the baseline of keel's
 *          2-worker async mode.
 *   sync   keel_infer() on one reused request from a single caller thread.
 *   async  depth requests in flight through keel_infer_submit(); each callback resubmits its
 *          request until the round ends.
 *   sync2  two caller threads, each calling keel_infer() on its own request ("sync 2 callers
 *          i2", against raw on 2 threads): the run-to-completion path, the one keel serve's
 *          I/O threads take since issue 11 (a request runs on the thread that read it when
 *          the model has an idle context); the workers stay idle.
 *   sync2 split  the same on two runtimes of one instance each, a caller on each ("sync 2
 *          callers 2 rt"): the run-to-completion path with no scheduler state shared.
 *   split  two runtimes of one worker each ("2 rt w1/i1"), half the depth on each, at once:
 *          keel's 2-thread async rate when its threads share no scheduler state, the upper
 *          bound of per-worker queues and contexts for "async w2/i2" (issue 12, item 5).
 * keel runs in two runtimes: 1 worker thread serving ref_i1 (one context), and 2 worker
 * threads serving ref_i2 (two contexts). Each (batch, keel mode) pair is measured as
 * rounds of raw, keel, raw, keel, ... of about --seconds each, so slow drifts of the machine
 * hit both sides alike; the table shows the median and the spread (min..max) of the rounds,
 * and keel/raw is the median of the per-round ratios of calls/s. It also shows CPU time per
 * call (all threads of the process) and context switches per call, since a handoff between
 * threads costs wall time that instruction counts do not show.
 *
 * Each row also shows "xcore": the round trip of one cache line between CPU 0 and CPU 1 (two
 * pinned threads), measured just before the row. This VM has a slow and a fast mode in which
 * the rows whose threads share lines differ by 10 % and raw's do not (PERFORMANCE.md,
 * session 9); whether the round trip tells the modes apart is what the column is for (only
 * the slow mode has been seen with it so far: 577-800 ns).
 *
 * --callgrind MODE runs a fixed number of calls of one mode after a warm-up, between
 * CALLGRIND_ZERO_STATS and CALLGRIND_DUMP_STATS_AT, so the dumps bench/callgrind.sh reads hold
 * those calls (from every thread) and no model loading or teardown (see run_callgrind).
 *
 * A benchmark measures; it never passes or fails on a time. It exits non-zero only if
 * something breaks (a load fails, a request fails, keel and raw disagree on a prediction).
 *
 * Threads: the main thread drives everything; raw rounds on 2 threads start helper threads
 * per round; keel's callbacks run on keel's worker threads and touch only the atomics and the
 * mutex of their async_run.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include <xgboost/c_api.h>

#include "keel/keel.h"

#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define HAVE_CALLGRIND 1
#endif
#endif
#ifndef HAVE_CALLGRIND
#define HAVE_CALLGRIND 0
#define CALLGRIND_ZERO_STATS
#define CALLGRIND_DUMP_STATS_AT(s) ((void)(s))
#endif

#define NFEATURES 20
#define MAX_BATCH 256 /* the reference configs' max_batch_size */
#define MAX_ROUNDS 50
#define MAX_DEPTH 256
#define IFACE_LEN 160

/* Exactly the backend's prediction config (src/backends/xgboost.c). */
static const char predict_config[] =
    "{\"type\":0,\"training\":false,\"iteration_begin\":0,\"iteration_end\":0,"
    "\"strict_shape\":false,\"missing\":NaN,\"cache_id\":0}";

typedef struct options {
    const char *repo;
    int rounds;
    double seconds;
    int depth;
    int batches[4];
    int nbatches;
    bool two_threads;           /* --two-threads: only the rows with two keel threads */
    const char *callgrind_mode; /* NULL: the timed table */
    int cg_batch;
    long cg_iterations;
    int cg_instances;
} options;

/* ---------------------------------------------------------------- helpers */

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long ctx_switches(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return ru.ru_nvcsw + ru.ru_nivcsw;
}

static void sleep_s(double s)
{
    struct timespec ts;

    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Inputs: uniform on [0, 1) like the training data, from the same Park-Miller generator. */
static void fill_inputs(float *x, size_t n)
{
    uint64_t state = 987654321;

    for (size_t i = 0; i < n; i++) {
        state = state * 16807 % 2147483647;
        x[i] = (float)((double)state / 2147483647.0);
    }
}

static void log_to_stderr(void *user, keel_log_level level, const char *msg)
{
    (void)user;
    fprintf(stderr, "keel[%d]: %s\n", (int)level, msg);
}

/* XGBoost's verbosity is thread-local (see xgboost.c): silence each thread that calls it. */
static void xgb_quiet_this_thread(void)
{
    (void)XGBSetGlobalConfig("{\"verbosity\":0}");
}

/* ---------------------------------------------------------------- raw XGBoost */

typedef struct raw_caller {
    DMatrixHandle proxy; /* one per calling thread */
    char iface[IFACE_LEN];
    double checksum; /* keeps the compiler from dropping the reads of the result */
} raw_caller;

static int raw_caller_init(raw_caller *c)
{
    memset(c, 0, sizeof(*c));
    xgb_quiet_this_thread();
    if (XGProxyDMatrixCreate(&c->proxy) != 0) {
        fprintf(stderr, "bench: XGProxyDMatrixCreate: %s\n", XGBGetLastError());
        return -1;
    }
    return 0;
}

static void raw_caller_fini(raw_caller *c)
{
    if (c->proxy != NULL)
        XGDMatrixFree(c->proxy);
    c->proxy = NULL;
}

/* The array interface, formatted exactly as src/backends/xgboost.c does it. */
static size_t put_u64(char *p, uint64_t v)
{
    char tmp[20];
    size_t n = 0;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    for (size_t i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

/* XGBoosterPredictFromDense's array interface:
 * {"data":[<address>,true],"shape":[<rows>,<cols>],"typestr":"<f4","version":3}.
 * Formatted by hand: snprintf cost ~2 500 instructions per call, 3 % of a whole batch-1
 * request (docs/PERFORMANCE.md, issue 11). Returns its length, or -1 if rows or cols is
 * negative.
 */
static int format_iface(char iface[static IFACE_LEN], const float *values, int64_t rows,
                        int64_t cols)
{
    static const char head[] = "{\"data\":[", mid[] = ",true],\"shape\":[",
                      tail[] = "],\"typestr\":\"<f4\",\"version\":3}";
    char *p = iface;

    _Static_assert(sizeof(head) - 1 + 20 + sizeof(mid) - 1 + 20 + 1 + 20 + sizeof(tail) <=
                       IFACE_LEN,
                   "the array interface does not fit");
    if (rows < 0 || cols < 0)
        return -1;
    memcpy(p, head, sizeof(head) - 1);
    p += sizeof(head) - 1;
    p += put_u64(p, (uint64_t)(uintptr_t)values);
    memcpy(p, mid, sizeof(mid) - 1);
    p += sizeof(mid) - 1;
    p += put_u64(p, (uint64_t)rows);
    *p++ = ',';
    p += put_u64(p, (uint64_t)cols);
    memcpy(p, tail, sizeof(tail)); /* with its terminator */
    p += sizeof(tail) - 1;
    return (int)(p - iface);
}

/* One prediction of rows x NFEATURES, as xgb_run does it. Returns the result or NULL. */
static const float *raw_predict(BoosterHandle booster, raw_caller *c, const float *values,
                                int64_t rows)
{
    bst_ulong const *shape = NULL;
    bst_ulong ndim = 0;
    const float *result = NULL;
    int len;

    len = format_iface(c->iface, values, rows, NFEATURES);
    if (len < 0)
        return NULL;
    if (XGBoosterPredictFromDense(booster, c->iface, predict_config, c->proxy, &shape, &ndim,
                                  &result) != 0)
        return NULL;
    for (int64_t i = 0; i < rows; i++)
        c->checksum += result[i];
    return result;
}

/* Loads model.json as the backend does: bytes through XGBoosterLoadModelFromBuffer,
 * nthread=1, one warm prediction before any other thread uses the booster. */
static int raw_load(const char *path, BoosterHandle *out)
{
    BoosterHandle b = NULL;
    raw_caller warm;
    FILE *f = NULL;
    char *buf = NULL;
    struct stat st;
    float zeros[NFEATURES] = {0};
    int rc = -1;

    *out = NULL;
    memset(&warm, 0, sizeof(warm));
    xgb_quiet_this_thread();
    if ((f = fopen(path, "rb")) == NULL || fstat(fileno(f), &st) != 0 || st.st_size <= 0) {
        fprintf(stderr, "bench: cannot read %s: %s\n", path, strerror(errno));
        goto done;
    }
    if ((buf = malloc((size_t)st.st_size)) == NULL ||
        fread(buf, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        fprintf(stderr, "bench: cannot read %s\n", path);
        goto done;
    }
    if (XGBoosterCreate(NULL, 0, &b) != 0 || XGBoosterSetParam(b, "nthread", "1") != 0 ||
        XGBoosterLoadModelFromBuffer(b, buf, (bst_ulong)st.st_size) != 0) {
        fprintf(stderr, "bench: %s: %s\n", path, XGBGetLastError());
        goto done;
    }
    if (raw_caller_init(&warm) != 0)
        goto done;
    if (raw_predict(b, &warm, zeros, 1) == NULL) {
        fprintf(stderr, "bench: warm-up prediction: %s\n", XGBGetLastError());
        goto done;
    }
    *out = b;
    b = NULL;
    rc = 0;

done:
    raw_caller_fini(&warm);
    if (b != NULL)
        XGBoosterFree(b);
    free(buf);
    if (f != NULL)
        fclose(f);
    return rc;
}

/* One thread of a timed round on several threads (round_threads): body calls its function
 * in a loop until *stop, counting the calls, after counting itself into *ready. */
typedef struct timed_thread {
    void (*body)(struct timed_thread *t);
    void *arg; /* the body's: a raw_args, or a keel_request */
    _Atomic bool *stop;
    _Atomic int *ready;
    _Atomic uint64_t calls;
    _Atomic bool failed;
    pthread_t tid;
    char pad[64]; /* keeps two threads' counters off one cache line */
} timed_thread;

typedef struct raw_args {
    BoosterHandle booster;
    const float *x;
    int batch;
} raw_args;

static void raw_thread_body(timed_thread *t)
{
    const raw_args *a = t->arg;
    raw_caller c;

    if (raw_caller_init(&c) != 0 || raw_predict(a->booster, &c, a->x, a->batch) == NULL) {
        atomic_store(&t->failed, true);
        atomic_fetch_add(t->ready, 1);
        raw_caller_fini(&c);
        return;
    }
    atomic_fetch_add(t->ready, 1);
    while (!atomic_load_explicit(t->stop, memory_order_relaxed)) {
        if (raw_predict(a->booster, &c, a->x, a->batch) == NULL) {
            atomic_store(&t->failed, true);
            break;
        }
        atomic_fetch_add_explicit(&t->calls, 1, memory_order_relaxed);
    }
    raw_caller_fini(&c);
}

/* ---------------------------------------------------------------- cross-core round trip */

/* How long one cache line takes to go from CPU 0 to CPU 1 and back: two threads pinned one
 * per CPU hand a counter back and forth. Printed with each row (measured just before it) to
 * test whether this trip is what changes between this VM's two modes (docs/PERFORMANCE.md,
 * session 9), in which keel's 2-thread rows move and raw's do not. */
#define PINGPONG_TRIPS 20000
typedef struct pingpong {
    _Alignas(64) _Atomic long turn;
    _Atomic bool pinned_failed;
} pingpong;

static bool pin_to_cpu(int cpu)
{
    cpu_set_t set;

    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

static void *pingpong_echo(void *arg)
{
    pingpong *pp = arg;

    if (!pin_to_cpu(1))
        atomic_store(&pp->pinned_failed, true);
    for (long i = 0; i < PINGPONG_TRIPS; i++) {
        while (atomic_load_explicit(&pp->turn, memory_order_acquire) != 2 * i + 1) {
            if (atomic_load_explicit(&pp->pinned_failed, memory_order_relaxed))
                return NULL;
        }
        atomic_store_explicit(&pp->turn, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

/* Median round trip in ns over 5 runs of PINGPONG_TRIPS, or -1 if the threads could not be
 * pinned to CPUs 0 and 1 (fewer than two CPUs). The calling thread is pinned to CPU 0 while
 * it measures and unpinned after. */
static double cross_core_ns(void)
{
    double v[5];
    cpu_set_t all;
    double result = -1;

    if (pthread_getaffinity_np(pthread_self(), sizeof(all), &all) != 0)
        return -1;
    for (int r = 0; r < 5; r++) {
        pingpong pp;
        pthread_t t;
        double t0;
        bool ok = true;

        atomic_init(&pp.turn, 0);
        atomic_init(&pp.pinned_failed, !pin_to_cpu(0));
        if (pthread_create(&t, NULL, pingpong_echo, &pp) != 0)
            goto done;
        t0 = now_s();
        for (long i = 0; i < PINGPONG_TRIPS && ok; i++) {
            atomic_store_explicit(&pp.turn, 2 * i + 1, memory_order_release);
            while (atomic_load_explicit(&pp.turn, memory_order_acquire) != 2 * i + 2) {
                if (atomic_load_explicit(&pp.pinned_failed, memory_order_relaxed)) {
                    ok = false;
                    break;
                }
            }
        }
        v[r] = (now_s() - t0) * 1e9 / PINGPONG_TRIPS;
        atomic_store(&pp.pinned_failed, true); /* releases the echo if it is still waiting */
        pthread_join(t, NULL);
        if (!ok)
            goto done;
    }
    for (int i = 1; i < 5; i++) /* insertion sort of five */
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            double tmp = v[j];
            v[j] = v[j - 1];
            v[j - 1] = tmp;
        }
    result = v[2];

done:
    pthread_setaffinity_np(pthread_self(), sizeof(all), &all);
    return result;
}

/* ---------------------------------------------------------------- keel */

typedef struct keel_side {
    keel_runtime *rt;
    const char *model;
    int workers; /* = the model's instance count */
} keel_side;

/* inline_max_us for keel_side_open (0: the runtime's default). The callgrind modes raise it:
 * under valgrind a batch-1 call takes about 50 times as long, so the default bound would call
 * the model slow and keel would take another path (no lanes) than it takes natively. */
static uint32_t side_inline_max_us;

static int keel_side_open(keel_side *k, const char *repo, int instances)
{
    keel_runtime_opts opts;
    char errbuf[512];
    keel_err err;

    k->rt = NULL;
    k->model = instances == 1 ? "ref_i1" : "ref_i2";
    k->workers = instances;
    keel_runtime_opts_init(&opts);
    opts.model_repository = repo;
    opts.control = KEEL_CONTROL_EXPLICIT;
    opts.worker_threads = instances;
    if (side_inline_max_us != 0)
        opts.inline_max_us = side_inline_max_us;
    opts.log_fn = log_to_stderr;
    opts.log_level = KEEL_LOG_WARN;
    if ((err = keel_runtime_create(&opts, &k->rt)) != KEEL_OK) {
        fprintf(stderr, "bench: keel_runtime_create(%s): %s\n", repo, keel_strerror(err));
        return -1;
    }
    if ((err = keel_model_load(k->rt, k->model, errbuf, sizeof(errbuf))) != KEEL_OK) {
        fprintf(stderr, "bench: keel_model_load(%s): %s: %s\n", k->model, keel_strerror(err),
                errbuf);
        keel_runtime_destroy(k->rt);
        k->rt = NULL;
        return -1;
    }
    return 0;
}

static keel_request *make_request(const keel_side *k, const float *x, int batch)
{
    keel_request *req = NULL;
    int64_t shape[2] = {batch, NFEATURES};
    keel_err err;

    if ((err = keel_request_create(k->rt, k->model, -1, &req)) != KEEL_OK ||
        (err = keel_request_add_input(req, "features", KEEL_TYPE_FP32, shape, 2, x,
                                      sizeof(float) * (size_t)batch * NFEATURES)) != KEEL_OK) {
        fprintf(stderr, "bench: building a request: %s %s\n", keel_strerror(err),
                req != NULL ? keel_request_error(req) : "");
        keel_request_destroy(req);
        return NULL;
    }
    return req;
}

/* One async run: requests resubmit themselves from their callbacks while tickets last and
 * stop is false; the last callback to give up wakes the waiter. Completions are counted per
 * calling thread (each keel worker its own cache line, as raw's threads count theirs), and an
 * unlimited run (tickets INT64_MAX, the timed rounds) takes no ticket: the harness adds no
 * line that both workers write per request, so keel is not charged for the benchmark's own
 * sharing. */
#define COMPLETED_SLOTS 8
typedef struct async_run {
    struct {
        _Alignas(64) _Atomic uint64_t n;
    } completed[COMPLETED_SLOTS];
    _Alignas(64) _Atomic int64_t tickets;
    bool unlimited;
    _Atomic bool stop;
    _Atomic int failures;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int outstanding; /* mu */
} async_run;

static _Thread_local unsigned completed_slot; /* slot + 1; 0 = not assigned */

static void completed_add(async_run *a)
{
    static _Atomic unsigned next;

    if (completed_slot == 0)
        completed_slot = atomic_fetch_add(&next, 1) % COMPLETED_SLOTS + 1;
    atomic_fetch_add_explicit(&a->completed[completed_slot - 1].n, 1, memory_order_relaxed);
}

static uint64_t completed_sum(async_run *a)
{
    uint64_t n = 0;

    for (int i = 0; i < COMPLETED_SLOTS; i++)
        n += atomic_load_explicit(&a->completed[i].n, memory_order_relaxed);
    return n;
}

static bool take_ticket(async_run *a)
{
    return a->unlimited || atomic_fetch_sub_explicit(&a->tickets, 1, memory_order_relaxed) > 0;
}

static void async_cb(keel_request *req, keel_err status, void *user)
{
    async_run *a = user;

    if (status == KEEL_OK) {
        completed_add(a);
        if (!atomic_load_explicit(&a->stop, memory_order_relaxed) && take_ticket(a)) {
            if (keel_infer_submit(req, async_cb, a) == KEEL_OK)
                return;
            status = KEEL_EINTERNAL; /* reported below with the request's message */
        }
    }
    if (status != KEEL_OK && atomic_fetch_add(&a->failures, 1) == 0)
        fprintf(stderr, "bench: async request failed: %s\n", keel_request_error(req));
    pthread_mutex_lock(&a->mu);
    if (--a->outstanding == 0)
        pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

/* Starts every request (one ticket each). Returns the number started. */
static int async_start(async_run *a, keel_request **reqs, int depth, int64_t tickets)
{
    int started = 0;

    for (int i = 0; i < COMPLETED_SLOTS; i++)
        atomic_store(&a->completed[i].n, 0);
    atomic_store(&a->tickets, tickets);
    a->unlimited = tickets == INT64_MAX;
    atomic_store(&a->stop, false);
    atomic_store(&a->failures, 0);
    pthread_mutex_lock(&a->mu);
    a->outstanding = depth;
    pthread_mutex_unlock(&a->mu);
    for (int i = 0; i < depth; i++) {
        keel_err err = KEEL_EUNAVAILABLE;

        if (take_ticket(a) && (err = keel_infer_submit(reqs[i], async_cb, a)) == KEEL_OK) {
            started++;
            continue;
        }
        if (err != KEEL_EUNAVAILABLE || atomic_load(&a->tickets) >= 0)
            fprintf(stderr, "bench: keel_infer_submit: %s\n", keel_request_error(reqs[i]));
        pthread_mutex_lock(&a->mu);
        a->outstanding--;
        pthread_mutex_unlock(&a->mu);
    }
    return started;
}

static void async_wait(async_run *a)
{
    pthread_mutex_lock(&a->mu);
    while (a->outstanding > 0)
        pthread_cond_wait(&a->cv, &a->mu);
    pthread_mutex_unlock(&a->mu);
}

/* ---------------------------------------------------------------- timed rounds */

typedef struct sample {
    double calls_per_s;
    double cpu_us_per_call; /* CPU of every thread of the process */
    double csw_per_call;    /* voluntary + involuntary context switches */
    bool ok;
} sample;

typedef struct window {
    double t, cpu;
    long csw;
} window;

static window window_open(void)
{
    window w = {now_s(), cpu_s(), ctx_switches()};
    return w;
}

static sample window_close(window w0, uint64_t calls)
{
    window w1 = window_open();
    sample s;

    s.calls_per_s = (double)calls / (w1.t - w0.t);
    s.cpu_us_per_call = calls > 0 ? (w1.cpu - w0.cpu) * 1e6 / (double)calls : 0;
    s.csw_per_call = calls > 0 ? (double)(w1.csw - w0.csw) / (double)calls : 0;
    s.ok = calls > 0;
    return s;
}

static void *timed_thread_main(void *arg)
{
    timed_thread *t = arg;

    t->body(t);
    return NULL;
}

/* Runs body on n threads (at most 2), thread i with args[i]: once all count themselves ready,
 * the calls of a window of `seconds`. Not ok if a thread failed or could not start. */
static sample round_threads(int n, void (*body)(timed_thread *), void *const *args, double seconds)
{
    timed_thread th[2];
    _Atomic bool stop = false;
    _Atomic int ready = 0;
    uint64_t c0 = 0, c1 = 0;
    sample s = {0};
    window w;
    int started = 0;
    bool failed = false;

    for (int i = 0; i < n && i < 2; i++) {
        memset(&th[i], 0, sizeof(th[i]));
        th[i].body = body;
        th[i].arg = args[i];
        th[i].stop = &stop;
        th[i].ready = &ready;
        atomic_init(&th[i].calls, 0);
        atomic_init(&th[i].failed, false);
        if (pthread_create(&th[i].tid, NULL, timed_thread_main, &th[i]) != 0)
            break;
        started++;
    }
    if (started == n) {
        while (atomic_load(&ready) < n)
            sleep_s(0.001);
        for (int i = 0; i < n; i++)
            c0 += atomic_load(&th[i].calls);
        w = window_open();
        sleep_s(seconds);
        for (int i = 0; i < n; i++)
            c1 += atomic_load(&th[i].calls);
        s = window_close(w, c1 - c0);
    }
    atomic_store(&stop, true);
    for (int i = 0; i < started; i++) {
        pthread_join(th[i].tid, NULL);
        failed |= atomic_load(&th[i].failed);
    }
    if (failed || started != n)
        s.ok = false;
    return s;
}

static sample round_raw(BoosterHandle booster, const float *x, int batch, int nthreads,
                        double seconds)
{
    raw_args a = {booster, x, batch};
    void *args[2] = {&a, &a};
    sample s = round_threads(nthreads, raw_thread_body, args, seconds);

    if (!s.ok)
        fprintf(stderr, "bench: raw prediction failed: %s\n", XGBGetLastError());
    return s;
}

static sample round_sync(keel_request *req, int batch, double seconds)
{
    uint64_t calls = 0;
    sample s = {0};
    window w = window_open();
    double end = w.t + seconds;

    (void)batch;
    for (;;) {
        for (int i = 0; i < 8; i++) {
            keel_err err = keel_infer(req);
            if (err != KEEL_OK) {
                fprintf(stderr, "bench: keel_infer: %s\n", keel_request_error(req));
                return s;
            }
        }
        calls += 8;
        if (now_s() >= end)
            break;
    }
    return window_close(w, calls);
}

/* MODE_SYNC2: two caller threads, each calling keel_infer() on its own request in a loop (the
 * run-to-completion path keel serve's I/O threads take: the caller runs the request when the
 * model has an idle context), against raw on 2 threads. */
static void sync_thread_body(timed_thread *t)
{
    keel_request *req = t->arg;

    atomic_fetch_add(t->ready, 1);
    while (!atomic_load_explicit(t->stop, memory_order_relaxed)) {
        if (keel_infer(req) != KEEL_OK) {
            fprintf(stderr, "bench: keel_infer: %s\n", keel_request_error(req));
            atomic_store(&t->failed, true);
            break;
        }
        atomic_fetch_add_explicit(&t->calls, 1, memory_order_relaxed);
    }
}

static sample round_sync2(keel_request **reqs, double seconds)
{
    void *args[2] = {reqs[0], reqs[1]};

    return round_threads(2, sync_thread_body, args, seconds);
}

static sample round_async(keel_request **reqs, int depth, double seconds)
{
    async_run a;
    sample s = {0};
    uint64_t c0, c1;
    window w;
    int started;

    memset(&a, 0, sizeof(a));
    pthread_mutex_init(&a.mu, NULL);
    pthread_cond_init(&a.cv, NULL);
    started = async_start(&a, reqs, depth, INT64_MAX);
    if (started == depth) {
        c0 = completed_sum(&a);
        w = window_open();
        sleep_s(seconds);
        c1 = completed_sum(&a);
        s = window_close(w, c1 - c0);
    }
    atomic_store(&a.stop, true);
    async_wait(&a);
    if (atomic_load(&a.failures) > 0 || started != depth)
        s.ok = false;
    pthread_mutex_destroy(&a.mu);
    pthread_cond_destroy(&a.cv);
    return s;
}

/* Two async runs at once, each on its own runtime (MODE_SPLIT): depth requests of reqs[0..depth)
 * on the first runtime and as many of reqs2 on the second; calls/s is their sum. */
static sample round_async_split(keel_request **reqs, keel_request **reqs2, int depth,
                                double seconds)
{
    async_run a[2];
    keel_request **sets[2] = {reqs, reqs2};
    sample s = {0};
    uint64_t c0 = 0, c1 = 0;
    window w;
    int started[2];

    memset(a, 0, sizeof(a));
    for (int i = 0; i < 2; i++) {
        pthread_mutex_init(&a[i].mu, NULL);
        pthread_cond_init(&a[i].cv, NULL);
        started[i] = async_start(&a[i], sets[i], depth, INT64_MAX);
    }
    if (started[0] == depth && started[1] == depth) {
        c0 = completed_sum(&a[0]) + completed_sum(&a[1]);
        w = window_open();
        sleep_s(seconds);
        c1 = completed_sum(&a[0]) + completed_sum(&a[1]);
        s = window_close(w, c1 - c0);
    }
    for (int i = 0; i < 2; i++) {
        atomic_store(&a[i].stop, true);
        async_wait(&a[i]);
        if (atomic_load(&a[i].failures) > 0 || started[i] != depth)
            s.ok = false;
        pthread_mutex_destroy(&a[i].mu);
        pthread_cond_destroy(&a[i].cv);
    }
    return s;
}

/* ---------------------------------------------------------------- statistics and table */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct summary {
    double median, min, max;
} summary;

static summary summarise(const double *v, int n)
{
    double sorted[MAX_ROUNDS];
    summary s;

    memcpy(sorted, v, sizeof(double) * (size_t)n);
    qsort(sorted, (size_t)n, sizeof(double), cmp_double);
    s.min = sorted[0];
    s.max = sorted[n - 1];
    s.median = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    return s;
}

/* MODE_SPLIT: two runtimes of one worker and one instance each (sides[0] and sides[2]), half
 * the depth on each: keel with no scheduler state shared between the two threads, the upper
 * bound of a per-worker design for MODE_ASYNC w2/i2 (issue 12, item 5). */
typedef enum mode { MODE_SYNC, MODE_SYNC2, MODE_SYNC2_SPLIT, MODE_ASYNC, MODE_SPLIT } mode;

typedef struct row_spec {
    mode m;
    int instances; /* keel: workers = contexts */
    int raw_threads;
} row_spec;

static const row_spec row_specs[] = {
    {MODE_SYNC, 1, 1},  {MODE_SYNC, 2, 1},  {MODE_ASYNC, 1, 1},       {MODE_ASYNC, 2, 2},
    {MODE_SPLIT, 1, 2}, {MODE_SYNC2, 2, 2}, {MODE_SYNC2_SPLIT, 1, 2},
};

static sample round_keel(mode m, keel_request **reqs, keel_request **reqs2, int nreqs, int batch,
                         double seconds)
{
    if (m == MODE_SYNC)
        return round_sync(reqs[0], batch, seconds);
    if (m == MODE_SYNC2)
        return round_sync2(reqs, seconds);
    if (m == MODE_SYNC2_SPLIT)
        return round_sync2((keel_request *[2]){reqs[0], reqs2[0]}, seconds);
    if (m == MODE_ASYNC)
        return round_async(reqs, nreqs, seconds);
    return round_async_split(reqs, reqs2, nreqs, seconds);
}

/* Measures one table row: rounds of raw then keel. Returns 0, or -1 if anything failed. */
static int measure_row(const options *o, BoosterHandle booster, keel_side *sides, const float *x,
                       int batch, const row_spec *spec)
{
    keel_side *k = &sides[spec->instances - 1];
    keel_request *reqs[MAX_DEPTH] = {0};
    keel_request *reqs2[MAX_DEPTH] = {0};
    int nreqs = spec->m == MODE_SYNC          ? 1
                : spec->m == MODE_SYNC2       ? 2
                : spec->m == MODE_SYNC2_SPLIT ? 1
                : spec->m == MODE_SPLIT       ? o->depth / 2
                                              : o->depth;
    double kc[MAX_ROUNDS], rc[MAX_ROUNDS], ratio[MAX_ROUNDS];
    double kcpu[MAX_ROUNDS], rcpu[MAX_ROUNDS], kcsw[MAX_ROUNDS];
    double xcore;
    summary sk, sr, sq, skcpu, srcpu, skcsw;
    char label[48], rawlabel[16];
    int result = -1;

    for (int i = 0; i < nreqs; i++) {
        if ((reqs[i] = make_request(k, x, batch)) == NULL)
            goto done;
        if ((spec->m == MODE_SPLIT || spec->m == MODE_SYNC2_SPLIT) &&
            (reqs2[i] = make_request(&sides[2], x, batch)) == NULL)
            goto done;
    }
    xcore = cross_core_ns();
    /* One untimed warm-up of each side. */
    if (!round_raw(booster, x, batch, spec->raw_threads, o->seconds / 10).ok)
        goto done;
    if (!round_keel(spec->m, reqs, reqs2, nreqs, batch, o->seconds / 10).ok)
        goto done;
    for (int r = 0; r < o->rounds; r++) {
        sample raw_s = round_raw(booster, x, batch, spec->raw_threads, o->seconds);
        sample keel_s = round_keel(spec->m, reqs, reqs2, nreqs, batch, o->seconds);

        if (!raw_s.ok || !keel_s.ok)
            goto done;
        rc[r] = raw_s.calls_per_s;
        rcpu[r] = raw_s.cpu_us_per_call;
        kc[r] = keel_s.calls_per_s;
        kcpu[r] = keel_s.cpu_us_per_call;
        kcsw[r] = keel_s.csw_per_call;
        ratio[r] = keel_s.calls_per_s / raw_s.calls_per_s;
    }
    sk = summarise(kc, o->rounds);
    sr = summarise(rc, o->rounds);
    sq = summarise(ratio, o->rounds);
    skcpu = summarise(kcpu, o->rounds);
    srcpu = summarise(rcpu, o->rounds);
    skcsw = summarise(kcsw, o->rounds);
    if (spec->m == MODE_SYNC)
        snprintf(label, sizeof(label), "sync w%d/i%d", spec->instances, spec->instances);
    else if (spec->m == MODE_SYNC2)
        snprintf(label, sizeof(label), "sync 2 callers i%d", spec->instances);
    else if (spec->m == MODE_SYNC2_SPLIT)
        snprintf(label, sizeof(label), "sync 2 callers 2 rt");
    else if (spec->m == MODE_ASYNC)
        snprintf(label, sizeof(label), "async w%d/i%d d%d", spec->instances, spec->instances,
                 nreqs);
    else
        snprintf(label, sizeof(label), "2 rt w1/i1 d%d+%d", nreqs, nreqs);
    snprintf(rawlabel, sizeof(rawlabel), "raw %dT", spec->raw_threads);
    printf("| %5d | %-16s | %9.0f (%.0f..%.0f) | %10.0f | %-6s | %9.0f (%.0f..%.0f) | %10.0f "
           "| %.3f (%.3f..%.3f) | %6.2f | %6.2f | %5.2f | %5.0f |\n",
           batch, label, sk.median, sk.min, sk.max, sk.median * batch, rawlabel, sr.median, sr.min,
           sr.max, sr.median * batch, sq.median, sq.min, sq.max, skcpu.median, srcpu.median,
           skcsw.median, xcore);
    fflush(stdout);
    result = 0;

done:
    for (int i = 0; i < nreqs; i++) {
        keel_request_destroy(reqs[i]);
        keel_request_destroy(reqs2[i]);
    }
    return result;
}

/* keel and raw must compute the same numbers for the same rows. */
static int check_agreement(BoosterHandle booster, keel_side *k, const float *x, int batch)
{
    raw_caller c;
    keel_request *req = NULL;
    keel_tensor_view out;
    const float *raw;
    int rc = -1;

    if (raw_caller_init(&c) != 0)
        return -1;
    if ((raw = raw_predict(booster, &c, x, batch)) == NULL) {
        fprintf(stderr, "bench: raw prediction: %s\n", XGBGetLastError());
        goto done;
    }
    if ((req = make_request(k, x, batch)) == NULL)
        goto done;
    if (keel_infer(req) != KEEL_OK || keel_request_output(req, 0, &out) != KEEL_OK) {
        fprintf(stderr, "bench: keel_infer: %s\n", keel_request_error(req));
        goto done;
    }
    if (out.bytes != sizeof(float) * (size_t)batch || memcmp(out.data, raw, out.bytes) != 0) {
        fprintf(stderr, "bench: keel and raw XGBoost disagree at batch %d\n", batch);
        goto done;
    }
    rc = 0;

done:
    keel_request_destroy(req);
    raw_caller_fini(&c);
    return rc;
}

static void print_cpu_model(void)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];

    if (f == NULL)
        return;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "model name", 10) == 0) {
            char *p = strchr(line, ':');
            if (p != NULL) {
                p[strcspn(p, "\n")] = '\0';
                printf("cpu:%s\n", p + 1);
            }
            break;
        }
    }
    fclose(f);
}

static int run_table(const options *o, BoosterHandle booster, keel_side *sides, const float *x)
{
    printf("keel %s bench_infer: reference model 100 trees, depth 6, %d FP32 features\n",
           KEEL_VERSION_STRING, NFEATURES);
    print_cpu_model();
    printf("%d rounds of %.2f s per side, interleaved raw/keel; median (min..max) over rounds\n",
           o->rounds, o->seconds);
    printf("wN/iN = keel worker threads / model instances; dN = requests in flight; "
           "raw NT = raw XGBoost on N threads\n");
    printf("cpu = CPU us per call over all threads; csw = context switches per keel call\n");
    printf("xcore = ns for a cache line to go from CPU 0 to CPU 1 and back, measured before the "
           "row (-1: not measured)\n\n");
    printf("| batch | keel mode        | keel calls/s (min..max)  | keel rows/s | raw    "
           "| raw calls/s (min..max)   |  raw rows/s | keel/raw (min..max) | keel cpu | raw "
           "cpu | csw | xcore |\n");
    printf("|------:|------------------|-------------------------:|-----------:|--------"
           "|-------------------------:|-----------:|--------------------:|-------:|-------:|"
           "----:|------:|\n");
    for (int b = 0; b < o->nbatches; b++) {
        for (size_t i = 0; i < sizeof(row_specs) / sizeof(row_specs[0]); i++) {
            if (o->two_threads && row_specs[i].raw_threads != 2)
                continue;
            if (measure_row(o, booster, sides, x, o->batches[b], &row_specs[i]) != 0)
                return -1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- callgrind mode */

typedef struct cg_run {
    const options *o;
    BoosterHandle booster;
    const float *x;
    raw_caller raw;
    keel_request *reqs[MAX_DEPTH];
    int nreqs;
    async_run a;
} cg_run;

/* Makes exactly n calls of the chosen mode. Returns 0, or -1 on a failure (reported). */
static int cg_calls(cg_run *r, long n)
{
    const char *which = r->o->callgrind_mode;

    if (strcmp(which, "raw") == 0) {
        for (long i = 0; i < n; i++) {
            if (raw_predict(r->booster, &r->raw, r->x, r->o->cg_batch) == NULL) {
                fprintf(stderr, "bench: raw prediction: %s\n", XGBGetLastError());
                return -1;
            }
        }
    } else if (strcmp(which, "sync") == 0) {
        for (long i = 0; i < n; i++) {
            if (keel_infer(r->reqs[0]) != KEEL_OK) {
                fprintf(stderr, "bench: keel_infer: %s\n", keel_request_error(r->reqs[0]));
                return -1;
            }
        }
    } else {
        async_start(&r->a, r->reqs, r->nreqs, n);
        async_wait(&r->a);
        if (atomic_load(&r->a.failures) > 0 || completed_sum(&r->a) != (uint64_t)n) {
            fprintf(stderr, "bench: async run failed\n");
            return -1;
        }
    }
    return 0;
}

/*
 * Warm-up, then two dumps: part 1 holds `short` calls, part 2 holds o->cg_iterations calls.
 * The first dump after CALLGRIND_ZERO_STATS also carries a fixed ~1M instructions that do not
 * depend on the call count (measured: 20 and 200 calls give the same excess); the second
 * does not (100 and 1000 calls give the same per-call count), so bench/callgrind.sh divides
 * the totals of part 2 by the iterations.
 */
static int run_callgrind(const options *o, BoosterHandle booster, keel_side *k, const float *x)
{
    cg_run r;
    long warm = o->cg_iterations / 10 > 100 ? o->cg_iterations / 10 : 100;
    long shortn = o->cg_iterations / 5 > 1 ? o->cg_iterations / 5 : 1;
    bool is_raw = strcmp(o->callgrind_mode, "raw") == 0;
    double t0, t1, c0, c1;
    int rc = -1;

    memset(&r, 0, sizeof(r));
    r.o = o;
    r.booster = booster;
    r.x = x;
    r.nreqs = strcmp(o->callgrind_mode, "async") == 0 ? o->depth : 1;
    pthread_mutex_init(&r.a.mu, NULL);
    pthread_cond_init(&r.a.cv, NULL);
    if (!HAVE_CALLGRIND)
        fprintf(stderr, "bench: built without valgrind/callgrind.h: nothing is dumped\n");
    if (is_raw) {
        if (raw_caller_init(&r.raw) != 0)
            goto done;
    } else {
        for (int i = 0; i < r.nreqs; i++) {
            if ((r.reqs[i] = make_request(k, x, o->cg_batch)) == NULL)
                goto done;
        }
    }
    if (cg_calls(&r, warm) != 0)
        goto done;
    CALLGRIND_ZERO_STATS;
    if (cg_calls(&r, shortn) != 0)
        goto done;
    CALLGRIND_DUMP_STATS_AT("short");
    c0 = cpu_s();
    t0 = now_s();
    if (cg_calls(&r, o->cg_iterations) != 0)
        goto done;
    t1 = now_s();
    c1 = cpu_s();
    CALLGRIND_DUMP_STATS_AT("measured");
    /* seconds and cpu_seconds cover the measured calls only (not the load, the warm-up or
     * the short run): bench/suite.sh's raw rate is iterations / seconds. */
    printf("callgrind mode=%s batch=%d instances=%d short=%ld iterations=%ld seconds=%.6f "
           "cpu_seconds=%.6f\n",
           o->callgrind_mode, o->cg_batch, o->cg_instances, shortn, o->cg_iterations, t1 - t0,
           c1 - c0);
    rc = 0;

done:
    raw_caller_fini(&r.raw);
    for (int i = 0; i < r.nreqs; i++)
        keel_request_destroy(r.reqs[i]);
    pthread_mutex_destroy(&r.a.mu);
    pthread_cond_destroy(&r.a.cv);
    return rc;
}

/* ---------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f, "usage: bench_infer --model-repository DIR [--rounds N] [--seconds S] [--depth N]\n"
               "                   [--batches 1,64] [--two-threads]\n"
               "       bench_infer --model-repository DIR --callgrind raw|sync|async\n"
               "                   [--batch N] [--iterations N] [--instances 1|2] [--depth N]\n"
               "DIR is the repository written by bench/train-reference.sh (models ref_i1, "
               "ref_i2).\n");
}

static int parse_batches(const char *s, options *o)
{
    char *end;

    o->nbatches = 0;
    while (*s != '\0' && o->nbatches < 4) {
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > MAX_BATCH)
            return -1;
        o->batches[o->nbatches++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end != ',' && *end != '\0')
            return -1;
    }
    return o->nbatches > 0 ? 0 : -1;
}

static int parse_args(int argc, char **argv, options *o)
{
    memset(o, 0, sizeof(*o));
    o->rounds = 5;
    o->seconds = 1.0;
    o->depth = 8;
    o->batches[0] = 1;
    o->batches[1] = 64;
    o->nbatches = 2;
    o->cg_batch = 1;
    o->cg_iterations = 20000;
    o->cg_instances = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(a, "--two-threads") == 0) {
            o->two_threads = true;
            continue;
        }
        if (v == NULL)
            return -1;
        i++;
        if (strcmp(a, "--model-repository") == 0)
            o->repo = v;
        else if (strcmp(a, "--rounds") == 0)
            o->rounds = atoi(v);
        else if (strcmp(a, "--seconds") == 0)
            o->seconds = atof(v);
        else if (strcmp(a, "--depth") == 0)
            o->depth = atoi(v);
        else if (strcmp(a, "--batches") == 0) {
            if (parse_batches(v, o) != 0)
                return -1;
        } else if (strcmp(a, "--callgrind") == 0)
            o->callgrind_mode = v;
        else if (strcmp(a, "--batch") == 0)
            o->cg_batch = atoi(v);
        else if (strcmp(a, "--iterations") == 0)
            o->cg_iterations = atol(v);
        else if (strcmp(a, "--instances") == 0)
            o->cg_instances = atoi(v);
        else
            return -1;
    }
    if (o->repo == NULL || o->rounds < 1 || o->rounds > MAX_ROUNDS || !(o->seconds > 0) ||
        o->depth < 1 || o->depth > MAX_DEPTH || o->cg_batch < 1 || o->cg_batch > MAX_BATCH ||
        o->cg_iterations < 1 || (o->cg_instances != 1 && o->cg_instances != 2))
        return -1;
    if (o->callgrind_mode != NULL && strcmp(o->callgrind_mode, "raw") != 0 &&
        strcmp(o->callgrind_mode, "sync") != 0 && strcmp(o->callgrind_mode, "async") != 0)
        return -1;
    return 0;
}

int main(int argc, char **argv)
{
    options o;
    BoosterHandle booster = NULL;
    keel_side sides[3] = {{0}, {0}, {0}}; /* i1, i2, and a second i1 runtime (MODE_SPLIT) */
    float *x = NULL;
    char path[4096];
    int rc = 1;

    if (parse_args(argc, argv, &o) != 0) {
        usage(stderr);
        return 2;
    }
    if ((x = malloc(sizeof(float) * MAX_BATCH * NFEATURES)) == NULL)
        return 1;
    fill_inputs(x, (size_t)MAX_BATCH * NFEATURES);
    snprintf(path, sizeof(path), "%s/ref_i1/1/model.json", o.repo);
    if (raw_load(path, &booster) != 0)
        goto done;

    if (o.callgrind_mode != NULL) {
        keel_side *k = &sides[o.cg_instances - 1];
        side_inline_max_us = 10000000; /* 10 s: see side_inline_max_us */
        if (strcmp(o.callgrind_mode, "raw") != 0 && keel_side_open(k, o.repo, o.cg_instances) != 0)
            goto done;
        rc = run_callgrind(&o, booster, k, x) == 0 ? 0 : 1;
        goto done;
    }

    if (keel_side_open(&sides[0], o.repo, 1) != 0 || keel_side_open(&sides[1], o.repo, 2) != 0 ||
        keel_side_open(&sides[2], o.repo, 1) != 0)
        goto done;
    for (int b = 0; b < o.nbatches; b++) {
        if (check_agreement(booster, &sides[0], x, o.batches[b]) != 0 ||
            check_agreement(booster, &sides[1], x, o.batches[b]) != 0)
            goto done;
    }
    rc = run_table(&o, booster, sides, x) == 0 ? 0 : 1;

done:
    keel_runtime_destroy(sides[0].rt);
    keel_runtime_destroy(sides[1].rt);
    keel_runtime_destroy(sides[2].rt);
    if (booster != NULL)
        XGBoosterFree(booster);
    free(x);
    return rc;
}
