/*
 * metrics.c: GET /metrics, in the Prometheus text exposition format (version 0.0.4).
 *
 * DESIGN
 * Rendered on demand on the scrape thread (server_control.c; never on an HTTP loop, where a
 * render of 100 models' series, 15-25 ms, held up the loop's other connections), from
 * libkeel's statistics and counters (atomics read without locks) and from /proc/self. Nothing is
 * cached and nothing is held between scrapes. Every family has # HELP and # TYPE lines and is
 * written in one block; label values are escaped as the format requires; the output passes
 * `promtool check metrics` (which is why durations are in seconds: promtool rejects
 * abbreviated units such as _us in names). Per-model families list every model keel has
 * loaded at some point (statistics survive reloads and unloads). The latency histograms and
 * responses by code come from observe.c (lock-free series the request path feeds).
 */
#include <dirent.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "grpc_codec.h"
#include "metrics.h"
#include "server_internal.h"

/* ---------------------------------------------------------------- a growable buffer */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->oom)
        return;
    for (;;) {
        size_t room = b->cap - b->len;
        va_start(ap, fmt);
        n = vsnprintf(b->p != NULL ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        {
            size_t ncap = b->cap == 0 ? 8192 : b->cap * 2;
            char *np;
            while (ncap - b->len <= (size_t)n)
                ncap *= 2;
            if ((np = realloc(b->p, ncap)) == NULL) {
                b->oom = true;
                return;
            }
            b->p = np;
            b->cap = ncap;
        }
    }
}

/* Appends s escaped as a label value: backslash, double quote and newline. */
static void sb_label(sbuf *b, const char *s)
{
    for (; *s != '\0' && !b->oom; s++) {
        if (*s == '\\')
            sb_printf(b, "\\\\");
        else if (*s == '"')
            sb_printf(b, "\\\"");
        else if (*s == '\n')
            sb_printf(b, "\\n");
        else
            sb_printf(b, "%c", *s);
    }
}

static void family(sbuf *b, const char *name, const char *type, const char *help)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* ---------------------------------------------------------------- /proc */

static bool proc_rss_bytes(uint64_t *out)
{
    FILE *f = fopen("/proc/self/statm", "re");
    unsigned long long size, resident;
    long page = sysconf(_SC_PAGESIZE);
    bool ok;

    if (f == NULL)
        return false;
    ok = fscanf(f, "%llu %llu", &size, &resident) == 2 && page > 0;
    fclose(f);
    if (ok)
        *out = (uint64_t)resident * (uint64_t)page;
    return ok;
}

static bool proc_open_fds(uint64_t *out)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    uint64_t n = 0;

    if (d == NULL)
        return false;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] != '.')
            n++;
    }
    closedir(d);
    *out = n > 0 ? n - 1 : 0; /* not counting the directory stream's own fd */
    return true;
}

static bool proc_threads(uint64_t *out)
{
    FILE *f = fopen("/proc/self/status", "re");
    char line[256];
    bool ok = false;

    if (f == NULL)
        return false;
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long n;
        if (sscanf(line, "Threads: %llu", &n) == 1) {
            *out = n;
            ok = true;
            break;
        }
    }
    fclose(f);
    return ok;
}

/* ---------------------------------------------------------------- per-model families */

typedef struct model_row {
    const char *name;
    keel_model_stats st;
    keel_counters cnt;
} model_row;

/* A short, stable label for each keel error; "rejected" is the queue-full refusal. */
static const char *reason_label(keel_err e)
{
    switch (e) {
    case KEEL_EINVAL:
        return "invalid_argument";
    case KEEL_ENOMEM:
        return "out_of_memory";
    case KEEL_ENOTFOUND:
        return "not_found";
    case KEEL_EUNAVAILABLE:
        return "unavailable";
    case KEEL_ETIMEDOUT:
        return "timeout";
    case KEEL_ECANCELED:
        return "cancelled";
    case KEEL_ESHUTDOWN:
        return "shutdown";
    case KEEL_ECONFIG:
        return "config";
    case KEEL_ELOAD:
        return "load";
    case KEEL_EBACKEND:
        return "backend";
    case KEEL_EIO:
        return "io";
    case KEEL_EBUSY:
        return "busy";
    case KEEL_EINTERNAL:
        return "internal";
    case KEEL_ERESOURCE:
        return "resource";
    default:
        return "other";
    }
}

static void model_counter(sbuf *b, const char *name, const char *type, const char *help,
                          const model_row *rows, size_t n, size_t field_off, bool seconds)
{
    family(b, name, type, help);
    for (size_t i = 0; i < n; i++) {
        uint64_t v;
        memcpy(&v, (const char *)&rows[i].st + field_off, sizeof(v));
        sb_printf(b, "%s{model=\"", name);
        sb_label(b, rows[i].name);
        if (seconds)
            sb_printf(b, "\"} %.9f\n", (double)v / 1e9);
        else
            sb_printf(b, "\"} %" PRIu64 "\n", v);
    }
}

/* A family with one unlabelled sample. */
static void scalar(sbuf *b, const char *name, const char *type, const char *help, uint64_t v)
{
    family(b, name, type, help);
    sb_printf(b, "%s %" PRIu64 "\n", name, v);
}

/* One sample per model (the first row of each model in the name-sorted list). */
#define FOR_EACH_MODEL(i, list, n)                                                                 \
    for (size_t i = 0; i < (n); i++)                                                               \
        if (i == 0 || strcmp((list)[i].name, (list)[i - 1].name) != 0)

static void model_gauge_u64(sbuf *b, const char *name, const char *type, const char *help,
                            const keel_model_status *list, size_t n, size_t field_off, double scale)
{
    family(b, name, type, help);
    FOR_EACH_MODEL(i, list, n)
    {
        uint64_t v;
        memcpy(&v, (const char *)&list[i] + field_off, sizeof(v));
        sb_printf(b, "%s{model=\"", name);
        sb_label(b, list[i].name);
        if (scale != 1.0)
            sb_printf(b, "\"} %.3f\n", (double)v * scale);
        else
            sb_printf(b, "\"} %" PRIu64 "\n", v);
    }
}

/* The preprocessing worker pool, when the server runs one (--preprocess-workers). */
static void preprocess_metrics(sbuf *b, keel_srv *s)
{
    keel_preprocess_stats ps;
    static const char *const causes[] = {"signal", "exit", "timeout", "protocol"};
    static const char *const outcomes[] = {"ok",      "invalid",  "timeout",
                                           "crashed", "rejected", "error"};
    uint64_t restarts[4], tasks[6];

    keel_preprocess_stats_get(s->rt, &ps);
    if (!ps.enabled)
        return;
    restarts[0] = ps.restarts_signal;
    restarts[1] = ps.restarts_exit;
    restarts[2] = ps.restarts_timeout;
    restarts[3] = ps.restarts_protocol;
    tasks[0] = ps.tasks_ok;
    tasks[1] = ps.tasks_invalid;
    tasks[2] = ps.tasks_timeout;
    tasks[3] = ps.tasks_crashed;
    tasks[4] = ps.tasks_rejected;
    tasks[5] = ps.tasks_error;
    scalar(b, "keel_preprocess_workers", "gauge", "Preprocessing worker processes configured.",
           ps.workers);
    scalar(b, "keel_preprocess_workers_alive", "gauge",
           "Preprocessing worker processes running now.", ps.workers_alive);
    scalar(b, "keel_preprocess_healthy", "gauge",
           "1 if the fork server lives and workers can be kept alive, else 0.", ps.healthy);
    family(b, "keel_preprocess_worker_restarts_total", "counter",
           "Preprocessing workers replaced, by cause (signal: killed or crashed; exit: exited; "
           "timeout: overran a task deadline; protocol: broke the protocol).");
    for (int k = 0; k < 4; k++)
        sb_printf(b, "keel_preprocess_worker_restarts_total{cause=\"%s\"} %" PRIu64 "\n", causes[k],
                  restarts[k]);
    scalar(b, "keel_preprocess_spawn_failures_total", "counter",
           "Preprocessing workers the fork server could not start.", ps.spawn_failures);
    family(b, "keel_preprocess_tasks_total", "counter",
           "Preprocessing tasks (one per request), by outcome.");
    for (int k = 0; k < 6; k++)
        sb_printf(b, "keel_preprocess_tasks_total{outcome=\"%s\"} %" PRIu64 "\n", outcomes[k],
                  tasks[k]);
    scalar(b, "keel_preprocess_memfds_open", "gauge",
           "Shared-memory segments (memfds) the server holds for preprocessing now.",
           ps.memfds_open > 0 ? (uint64_t)ps.memfds_open : 0);
    scalar(b, "keel_preprocess_bytes_in_flight", "gauge",
           "Preprocessing task inputs plus results in flight now, in bytes.", ps.bytes_in_flight);
}

/* Load attempts, failures, retries and evictions: what the lifecycle thread is doing. */
static void model_lifecycle(sbuf *b, const keel_model_status *list, size_t n)
{
    model_gauge_u64(b, "keel_model_load_attempts_total", "counter",
                    "Loads of the model attempted (by the API, the repository watcher, retries "
                    "and reloads after eviction).",
                    list, n, offsetof(keel_model_status, load_attempts), 1.0);
    model_gauge_u64(b, "keel_model_load_failures", "gauge",
                    "Consecutive failed loads of the model (0 after a success).", list, n,
                    offsetof(keel_model_status, load_failures), 1.0);
    model_gauge_u64(b, "keel_model_last_load_attempt_timestamp_seconds", "gauge",
                    "Unix time of the model's most recent load attempt (0 if none).", list, n,
                    offsetof(keel_model_status, last_attempt_unix_ms), 1e-3);
    model_gauge_u64(b, "keel_model_next_load_retry_timestamp_seconds", "gauge",
                    "Unix time keel retries the model's failed load itself (0 if it will not).",
                    list, n, offsetof(keel_model_status, next_retry_unix_ms), 1e-3);
    family(b, "keel_model_load_error", "gauge",
           "1 if the model's most recent load attempt failed, labelled with the reason.");
    FOR_EACH_MODEL(i, list, n)
    {
        sb_printf(b, "keel_model_load_error{model=\"");
        sb_label(b, list[i].name);
        sb_printf(b, "\",reason=\"%s\"} %d\n",
                  list[i].last_error == KEEL_OK ? "" : reason_label(list[i].last_error),
                  list[i].last_error != KEEL_OK);
    }
    family(b, "keel_model_evicted", "gauge",
           "1 if the model was unloaded to stay within --model-memory-limit (its next request "
           "loads it again).");
    FOR_EACH_MODEL(i, list, n)
    {
        sb_printf(b, "keel_model_evicted{model=\"");
        sb_label(b, list[i].name);
        sb_printf(b, "\"} %d\n", list[i].evicted);
    }
}

/* Per-generation memory (a series exists while its generation serves), and the budget. */
static void memory_metrics(sbuf *b, keel_srv *s, const keel_model_status *list, size_t n)
{
    static const struct {
        const char *kind;
        size_t off;
    } kinds[] = {
        {"rss", offsetof(keel_model_status, mem_rss_bytes)},
        {"pss", offsetof(keel_model_status, mem_pss_bytes)},
        {"estimate", offsetof(keel_model_status, mem_estimate_bytes)},
        {"charged", offsetof(keel_model_status, mem_charged_bytes)},
    };
    keel_memory_stats ms;

    family(b, "keel_generation_memory_bytes", "gauge",
           "Memory of a serving generation: kind=rss and pss are the process's resident and "
           "proportional set size change measured across its build (load, contexts, warm-up), "
           "estimate is the backend's own figure, charged what --model-memory-limit counts.");
    for (size_t i = 0; i < n; i++) {
        if (list[i].generation_id == 0)
            continue;
        for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
            int64_t v;
            memcpy(&v, (const char *)&list[i] + kinds[k].off, sizeof(v));
            if (strcmp(kinds[k].kind, "pss") == 0 && v == -1)
                continue; /* smaps_rollup not available */
            sb_printf(b, "keel_generation_memory_bytes{model=\"");
            sb_label(b, list[i].name);
            sb_printf(b,
                      "\",version=\"%" PRId64 "\",generation=\"%" PRIu64 "\",kind=\"%s\"} %" PRId64
                      "\n",
                      list[i].version, list[i].generation_id, kinds[k].kind, v);
        }
    }
    keel_memory_stats_get(s->rt, &ms);
    scalar(b, "keel_model_memory_limit_bytes", "gauge", "--model-memory-limit (0 = no limit).",
           ms.limit_bytes);
    scalar(b, "keel_model_memory_charged_bytes", "gauge",
           "Memory charged to the serving generations of all models.", ms.charged_bytes);
    scalar(b, "keel_model_evictions_total", "counter",
           "Models unloaded to stay within --model-memory-limit.", ms.evictions);
    scalar(b, "keel_model_reloads_total", "counter",
           "Evicted models loaded again because a request came for them.", ms.reloads);
    scalar(b, "keel_memory_trims_total", "counter",
           "Allocator trims (malloc_trim or jemalloc purge) after generations were freed.",
           ms.trims);
    scalar(b, "keel_memory_trimmed_bytes_total", "counter",
           "Resident memory those trims gave back to the operating system.", ms.trimmed_bytes);
    /* A leak grows the first, fragmentation the second (docs/OPERATIONS.md). */
    scalar(b, "keel_memory_heap_in_use_bytes", "gauge",
           "Heap the process has allocated and not freed (glibc mallinfo2 or jemalloc stats).",
           ms.heap_in_use_bytes);
    scalar(b, "keel_memory_heap_free_bytes", "gauge",
           "Heap the process freed that the allocator still holds (fragmentation, caches).",
           ms.heap_free_bytes);
}

#ifdef KEEL_FAULT_INJECTION
/* Test hook (fault-injection builds only, like libkeel's KEEL_FAULT points):
 * KEEL_FAULT_SCRAPE_DELAY_MS=N makes every render N ms slower, so that a test can show that a
 * slow scrape holds up no inference (tests/integration/test_observability.py). */
static void scrape_test_delay(void)
{
    const char *env = getenv("KEEL_FAULT_SCRAPE_DELAY_MS");
    long ms = env != NULL ? strtol(env, NULL, 10) : 0;
    struct timespec ts;

    if (ms <= 0 || ms > 60000)
        return;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}
#else
#define scrape_test_delay() ((void)0)
#endif

char *keel__srv_metrics_render(keel_srv *s, size_t *len)
{
    sbuf b = {NULL, 0, 0, false};
    keel_model_status *list = NULL;
    size_t n = 0, nrows = 0;
    model_row *rows = NULL;
    keel_counters c;
    uint64_t v;
    struct rusage ru;
    struct rlimit rl;

    scrape_test_delay();
    *len = 0;
    if (keel_model_list(s->rt, &list, &n) != KEEL_OK)
        return NULL;
    if (n > 0 && (rows = calloc(n, sizeof(*rows))) == NULL) {
        keel_model_status_free(list, n);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(list[i].name, list[i - 1].name) == 0)
            continue; /* sorted by name: one row per model */
        if (keel_model_stats_get(s->rt, list[i].name, &rows[nrows].st) != KEEL_OK)
            continue; /* never loaded */
        if (keel_model_counters_get(s->rt, list[i].name, &rows[nrows].cnt) != KEEL_OK)
            memset(&rows[nrows].cnt, 0, sizeof(rows[nrows].cnt));
        rows[nrows].name = list[i].name;
        nrows++;
    }

    model_counter(&b, "keel_inference_request_success_total", "counter",
                  "Inference requests that completed successfully.", rows, nrows,
                  offsetof(keel_model_stats, success), false);

    family(&b, "keel_inference_request_failure_total", "counter",
           "Inference requests that failed, by reason (rejected: refused because the "
           "model's queue was full).");
    for (size_t i = 0; i < nrows; i++) {
        for (int k = 1; k <= KEEL_ERR_COUNT_; k++) {
            uint64_t cnt = k == KEEL_ERR_COUNT_ ? rows[i].st.rejected : rows[i].st.failure[k];
            sb_printf(&b, "keel_inference_request_failure_total{model=\"");
            sb_label(&b, rows[i].name);
            sb_printf(&b, "\",reason=\"%s\"} %" PRIu64 "\n",
                      k == KEEL_ERR_COUNT_ ? "rejected" : reason_label((keel_err)k), cnt);
        }
    }

    model_counter(&b, "keel_inference_count_total", "counter",
                  "Inferences computed successfully (batch rows; a request of batch 8 counts 8).",
                  rows, nrows, offsetof(keel_model_stats, inference_count), false);
    model_counter(&b, "keel_inference_exec_count_total", "counter",
                  "Backend executions (model runs).", rows, nrows,
                  offsetof(keel_model_stats, execution_count), false);
    /* Executed batch sizes of batching models (dynamic_batching), from the batch statistics:
     * buckets are powers of two; the sum is the rows those executions computed. */
    family(&b, "keel_batch_size", "histogram",
           "Rows per backend execution of models with dynamic batching.");
    for (size_t i = 0; i < nrows; i++) {
        keel_batch_stat bs[128];
        size_t nbs = 0;
        uint64_t total = 0, sum = 0;
        if (keel_model_batch_stats_get(s->rt, rows[i].name, bs, 128, &nbs) != KEEL_OK || nbs == 0)
            continue;
        if (nbs > 128)
            nbs = 128;
        for (uint64_t le = 1; le <= 32768; le *= 2) {
            uint64_t cum = 0;
            for (size_t k = 0; k < nbs; k++)
                cum += bs[k].batch_size <= le ? bs[k].count : 0;
            sb_printf(&b, "keel_batch_size_bucket{model=\"");
            sb_label(&b, rows[i].name);
            sb_printf(&b, "\",le=\"%" PRIu64 "\"} %" PRIu64 "\n", le, cum);
        }
        for (size_t k = 0; k < nbs; k++) {
            total += bs[k].count;
            sum += bs[k].count * bs[k].batch_size;
        }
        sb_printf(&b, "keel_batch_size_bucket{model=\"");
        sb_label(&b, rows[i].name);
        sb_printf(&b, "\",le=\"+Inf\"} %" PRIu64 "\n", total);
        sb_printf(&b, "keel_batch_size_sum{model=\"");
        sb_label(&b, rows[i].name);
        sb_printf(&b, "\"} %" PRIu64 "\n", sum);
        sb_printf(&b, "keel_batch_size_count{model=\"");
        sb_label(&b, rows[i].name);
        sb_printf(&b, "\"} %" PRIu64 "\n", total);
    }
    model_counter(&b, "keel_inference_queue_duration_seconds_total", "counter",
                  "Total time admitted requests waited in the queue, in seconds.", rows, nrows,
                  offsetof(keel_model_stats, queue_ns), true);
    model_counter(&b, "keel_inference_compute_duration_seconds_total", "counter",
                  "Total time spent in the backend's run, in seconds.", rows, nrows,
                  offsetof(keel_model_stats, compute_ns), true);
    model_counter(&b, "keel_inference_runs_inline_total", "counter",
                  "Requests run on the thread that submitted them (an HTTP thread: "
                  "--infer-on-http-thread), without a hand-off.",
                  rows, nrows, offsetof(keel_model_stats, runs_inline), false);
    model_counter(&b, "keel_inference_runs_handed_off_total", "counter",
                  "Requests handed to an inference thread to run.", rows, nrows,
                  offsetof(keel_model_stats, runs_handed_off), false);

    family(&b, "keel_inference_pending_requests", "gauge",
           "Requests admitted and not yet completed (queued or running).");
    for (size_t i = 0; i < nrows; i++) {
        sb_printf(&b, "keel_inference_pending_requests{model=\"");
        sb_label(&b, rows[i].name);
        sb_printf(&b, "\"} %" PRId64 "\n", rows[i].cnt.leases);
    }
    family(&b, "keel_inference_contexts_stuck", "gauge",
           "Execution contexts of the model whose request was answered (deadline or cancel) "
           "while the backend still runs it.");
    for (size_t i = 0; i < nrows; i++) {
        sb_printf(&b, "keel_inference_contexts_stuck{model=\"");
        sb_label(&b, rows[i].name);
        sb_printf(&b, "\"} %" PRId64 "\n", rows[i].cnt.contexts_stuck);
    }

    family(&b, "keel_model_ready", "gauge",
           "1 if the model version is loaded and ready, else 0 (version \"\" if none is).");
    for (size_t i = 0; i < n; i++) {
        sb_printf(&b, "keel_model_ready{model=\"");
        sb_label(&b, list[i].name);
        if (list[i].version >= 0)
            sb_printf(&b, "\",version=\"%" PRId64 "\"} %d\n", list[i].version,
                      list[i].state == KEEL_MODEL_READY);
        else
            sb_printf(&b, "\",version=\"\"} 0\n");
    }

    model_lifecycle(&b, list, n);
    memory_metrics(&b, s, list, n);
    preprocess_metrics(&b, s);

    keel_counters_get(s->rt, &c);
    family(&b, "keel_live_requests", "gauge", "keel_request objects alive.");
    sb_printf(&b, "keel_live_requests %" PRId64 "\n", c.requests);
    family(&b, "keel_live_leases", "gauge",
           "Requests admitted and not yet completed (queue slots in use).");
    sb_printf(&b, "keel_live_leases %" PRId64 "\n", c.leases);
    family(&b, "keel_live_queued", "gauge", "Admitted requests waiting for a context.");
    sb_printf(&b, "keel_live_queued %" PRId64 "\n", c.queued);
    family(&b, "keel_live_generations", "gauge",
           "Model generations alive (serving, retiring or awaiting the reaper).");
    sb_printf(&b, "keel_live_generations %" PRId64 "\n", c.generations);
    family(&b, "keel_live_contexts", "gauge", "Execution contexts alive.");
    sb_printf(&b, "keel_live_contexts %" PRId64 "\n", c.contexts);
    family(&b, "keel_live_contexts_in_use", "gauge", "Execution contexts running a request.");
    sb_printf(&b, "keel_live_contexts_in_use %" PRId64 "\n", c.contexts_in_use);
    family(&b, "keel_live_contexts_stuck", "gauge",
           "Execution contexts whose request was answered (deadline or cancel) while the "
           "backend still runs it; not reused until it returns.");
    sb_printf(&b, "keel_live_contexts_stuck %" PRId64 "\n", c.contexts_stuck);

    v = (uint64_t)atomic_load(&s->pending);
    family(&b, "keel_http_inflight_requests", "gauge",
           "Requests (HTTP and gRPC) waiting for an inference or a model load/unload.");
    sb_printf(&b, "keel_http_inflight_requests %" PRIu64 "\n", v);
    family(&b, "keel_http_responses_total", "counter", "HTTP responses sent, by status class.");
    for (int k = 1; k <= 5; k++)
        sb_printf(&b, "keel_http_responses_total{code=\"%dxx\"} %" PRIu64 "\n", k,
                  atomic_load(&s->http_responses[k]));
    family(&b, "keel_http_cancelled_requests_total", "counter",
           "Inference requests cancelled by the server, by cause (client_gone: the client "
           "disconnected while waiting; shutdown: still in flight at the exit timeout).");
    sb_printf(&b, "keel_http_cancelled_requests_total{cause=\"client_gone\"} %" PRIu64 "\n",
              atomic_load(&s->canceled_hangup));
    sb_printf(&b, "keel_http_cancelled_requests_total{cause=\"shutdown\"} %" PRIu64 "\n",
              atomic_load(&s->canceled_shutdown));
    {
        char *obs = keel__srv_obs_render(s->obs);
        if (obs == NULL)
            b.oom = true;
        else
            sb_printf(&b, "%s", obs);
        free(obs);
    }
    if (s->alog != NULL) {
        family(&b, "keel_access_log_lines_total", "counter",
               "Access log lines queued for the log writer.");
        sb_printf(&b, "keel_access_log_lines_total %" PRIu64 "\n", keel__srv_alog_lines(s->alog));
        family(&b, "keel_access_log_dropped_lines_total", "counter",
               "Access log lines dropped because the writer's buffer was full (a slow or "
               "blocked log) or the write failed.");
        sb_printf(&b, "keel_access_log_dropped_lines_total %" PRIu64 "\n",
                  keel__srv_alog_dropped(s->alog));
    }
    family(&b, "keel_grpc_responses_total", "counter",
           "gRPC calls answered, by status code (only codes that occurred).");
    for (int k = 0; k < 17; k++) {
        uint64_t calls = atomic_load(&s->grpc_status[k]);
        if (calls > 0 || k == 0)
            sb_printf(&b, "keel_grpc_responses_total{code=\"%s\"} %" PRIu64 "\n",
                      keel__grpc_code_name(k), calls);
    }
    family(&b, "keel_grpc_cancelled_requests_total", "counter",
           "gRPC inference requests cancelled, by cause (client: the client cancelled the "
           "call or its deadline passed while it waited; shutdown: still in flight at the "
           "exit timeout).");
    sb_printf(&b, "keel_grpc_cancelled_requests_total{cause=\"client\"} %" PRIu64 "\n",
              atomic_load(&s->grpc_canceled[0]));
    sb_printf(&b, "keel_grpc_cancelled_requests_total{cause=\"shutdown\"} %" PRIu64 "\n",
              atomic_load(&s->grpc_canceled[1]));

    if (proc_rss_bytes(&v)) {
        family(&b, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        sb_printf(&b, "process_resident_memory_bytes %" PRIu64 "\n", v);
    }
    if (proc_open_fds(&v)) {
        family(&b, "process_open_fds", "gauge", "Number of open file descriptors.");
        sb_printf(&b, "process_open_fds %" PRIu64 "\n", v);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        family(&b, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
        sb_printf(&b, "process_max_fds %" PRIu64 "\n", (uint64_t)rl.rlim_cur);
    }
    if (proc_threads(&v)) {
        family(&b, "process_threads", "gauge", "Number of operating-system threads.");
        sb_printf(&b, "process_threads %" PRIu64 "\n", v);
    }
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        family(&b, "process_cpu_seconds_total", "counter",
               "Total user and system CPU time spent in seconds.");
        sb_printf(&b, "process_cpu_seconds_total %.6f\n",
                  (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                      (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    }
    family(&b, "process_start_time_seconds", "gauge",
           "Start time of the process since the Unix epoch in seconds.");
    sb_printf(&b, "process_start_time_seconds %.3f\n", (double)s->start_unix_ms / 1e3);

    free(rows);
    keel_model_status_free(list, n);
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    *len = b.len;
    return b.p;
}
