/*
 * soak.c: `keel soak`, hot swaps under load with the server sampled over time.
 *
 * DESIGN
 * Three threads, each with its own HTTP connection:
 *   main     starts `keel serve` itself (or attaches to --url/--pid), takes an idle baseline,
 *            runs the load loop of src/perf/perf_load.c (an optional steady phase without
 *            swaps, then the swap phase until the swap thread sets `stop`), waits for the
 *            server to go idle again, takes a final idle sample, stops the server it
 *            started, and writes the verdict, the CSV and the SVG. keel_soak_main runs
 *            these as phases: soak_parse_args, soak_prepare, soak_baseline, soak_run,
 *            soak_report.
 *   swapper  POST /v2/repository/models/{m}/load every --swap-interval (a reload: keel builds
 *            a new generation and swaps it in), toggling --load-unload models with each swap;
 *            counts and names failures; sets `stop` after --swaps swaps.
 *   sampler  every --sample-interval reads /proc/PID (VmRSS, Threads, fds, memfds, children)
 *            and scrapes the keel_live_* gauges from /metrics, appending one row under
 *            `mu` (the sample array is read by main only after the sampler has been joined).
 * Shared state: `stop`, `phase` and `swaps_done` are atomics; the sample array is the
 * sampler's until it is joined.
 *
 * Verdict, per series, over the samples of the swap phase after its first --warmup-fraction:
 * the least-squares line through them gives the fitted growth over that window (slope times
 * its length), and the floor rise is the minimum of the last quarter of those samples minus
 * the minimum of the first quarter. A series GROWS when both exceed its tolerance: RSS
 * --rss-tolerance (default 512 KiB), gauges that move with the requests in flight (live
 * requests, leases, queued, contexts in use, HTTP in flight) the number of requests the load
 * can have in flight, generations and contexts the two generations a reload in flight holds
 * (the new one being built, the old one until it is reaped; contexts per generation from the
 * idle baseline), every other count 0.5 (one more object). Requiring both keeps a
 * transient spike at the end (fit) or one noisy sample (floor) from passing for a leak. Then
 * the idle check: after the load and swaps stop, every count series must come back to its
 * value in the idle baseline taken before the load (RSS is exempt: allocators keep memory).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "perf_internal.h"

/* ---------------------------------------------------------------- series */

enum {
    S_RSS,
    S_THREADS,
    S_FDS,
    S_MEMFDS,
    S_CHILDREN,
    S_LIVE_REQUESTS,
    S_LIVE_LEASES,
    S_LIVE_QUEUED,
    S_LIVE_GENERATIONS,
    S_LIVE_CONTEXTS,
    S_LIVE_CONTEXTS_IN_USE,
    S_HTTP_INFLIGHT,
    S_COUNT_
};

static const struct {
    const char *name;   /* CSV column and verdict name */
    const char *metric; /* /metrics sample name, or NULL for /proc */
    bool inflight;      /* moves with the requests in flight */
    bool per_swap;      /* moves with the swap in flight (generations and their contexts) */
} series[S_COUNT_] = {
    [S_RSS] = {.name = "rss_bytes", .metric = NULL, .inflight = false},
    [S_THREADS] = {.name = "threads", .metric = NULL, .inflight = false},
    [S_FDS] = {.name = "fds", .metric = NULL, .inflight = false},
    [S_MEMFDS] = {.name = "memfds", .metric = NULL, .inflight = false},
    [S_CHILDREN] = {.name = "children", .metric = NULL, .inflight = false},
    [S_LIVE_REQUESTS] = {.name = "live_requests", .metric = "keel_live_requests", .inflight = true},
    [S_LIVE_LEASES] = {.name = "live_leases", .metric = "keel_live_leases", .inflight = true},
    [S_LIVE_QUEUED] = {.name = "live_queued", .metric = "keel_live_queued", .inflight = true},
    [S_LIVE_GENERATIONS] = {.name = "live_generations",
                            .metric = "keel_live_generations",
                            .inflight = false,
                            .per_swap = true},
    [S_LIVE_CONTEXTS] = {.name = "live_contexts",
                         .metric = "keel_live_contexts",
                         .inflight = false,
                         .per_swap = true},
    [S_LIVE_CONTEXTS_IN_USE] = {.name = "live_contexts_in_use",
                                .metric = "keel_live_contexts_in_use",
                                .inflight = true},
    [S_HTTP_INFLIGHT] = {.name = "http_inflight",
                         .metric = "keel_http_inflight_requests",
                         .inflight = true},
};

enum { PH_BASELINE, PH_STEADY, PH_SWAP, PH_IDLE };
static const char *const phase_names[] = {"baseline", "steady", "swap", "idle"};

typedef struct sample {
    double t;
    int phase;
    uint64_t swaps;
    double v[S_COUNT_]; /* NAN when unavailable */
} sample;

typedef struct soak {
    /* options */
    const char *repo, *url, *model;
    const char *load_unload[16];
    size_t nload_unload;
    const char *serve_args[32];
    size_t nserve_args;
    pid_t pid;
    uint64_t swaps;
    double swap_interval, sample_interval, warmup_fraction, steady_s, rss_tolerance;
    const char *csv_path, *svg_path;
    perf_workload w;
    perf_data_opts d;
    perf_load_opts lo;
    /* run */
    pid_t child;   /* the server we started, or -1 */
    int child_out; /* the read end of its stdout, kept open while it runs, or -1 */
    double t0;
    atomic_bool stop, sampler_stop;
    atomic_int phase;
    atomic_uint_fast64_t swaps_done;
    pthread_mutex_t mu;
    sample *samples;
    size_t nsamples, cap;
    /* swapper results */
    uint64_t swap_ok, swap_failed;
    char swap_notes[4][200];
    size_t nswap_notes;
    double swap_max_s;
    /* the threads of the run (main thread only) */
    pthread_t sampler, swapper;
    bool sampler_up, swapper_up;
} soak;

static void soak_help(FILE *f)
{
    fputs("usage: keel soak --model-repository DIR --model NAME [options]\n"
          "       keel soak --url HOST:PORT --pid PID --model NAME [options]\n"
          "\n"
          "Loads a server with inference requests while hot-swapping a model through the\n"
          "repository API (POST /v2/repository/models/NAME/load reloads it: a new generation\n"
          "is built and swapped in), and samples the server every --sample-interval: resident\n"
          "memory, threads, open fds, memfds, child processes (from /proc/PID) and the\n"
          "keel_live_* gauges of /metrics. Ends with a verdict per series (does it grow after\n"
          "the warm-up?), an idle check (do the counts return to their values before the\n"
          "load?), failed requests and swaps by cause, a CSV and an SVG plot.\n"
          "\n"
          "server:\n"
          "  --model-repository DIR        start 'keel serve' on DIR in explicit model-control\n"
          "                                mode on a free port, load --model, stop it at the end\n"
          "  --serve-arg ARG               one more argument for that server (repeatable;\n"
          "                                default --log-level warn --shutdown-grace-secs 0)\n"
          "  -u, --url HOST:PORT           or: a server already running in explicit mode...\n"
          "  --pid PID                     ...and its process id (for /proc sampling)\n"
          "swaps:\n"
          "  -m, --model NAME              the model to load, infer on and hot-swap\n"
          "  --swaps N                     hot swaps to make (default 100)\n"
          "  --swap-interval SECS          between the start of two swaps (default 1; 0 = back\n"
          "                                to back)\n"
          "  --load-unload NAME            also unload/load NAME in turn with every swap\n"
          "                                (repeatable); each ends in its initial state\n"
          "  --steady-secs SECS            load without swaps first, for a steady-state latency\n"
          "                                to compare with (default 0)\n"
          "load (as keel perf):\n"
          "  --concurrency N               closed loop, requests in flight (default 4)\n"
          "  --request-rate R              open loop, requests per second\n"
          "  --max-connections N           open loop connection pool (default 64)\n"
          "  -b, --batch-size N            rows per request (default 1)\n"
          "  --input-tensor-format json|binary, --input-data random|zero|FILE, --timeout SECS\n"
          "sampling and verdict:\n"
          "  --sample-interval SECS        (default 1)\n"
          "  --warmup-fraction F           share of the swap phase left out of the verdict\n"
          "                                (default 0.25)\n"
          "  --rss-tolerance BYTES         RSS growth allowed after the warm-up, suffix\n"
          "                                k/m/g (default 512k)\n"
          "  --csv FILE                    one row per sample\n"
          "  --svg FILE                    a plot of every series over time\n"
          "  -h, --help                    print this help\n"
          "\n"
          "A series grows when both its least-squares growth over the window and the rise of\n"
          "its floor (minimum of the last quarter minus minimum of the first) exceed its\n"
          "tolerance: --rss-tolerance for RSS, the requests in flight for the gauges that\n"
          "follow them, the two generations a reload holds (and their contexts) for\n"
          "live_generations and live_contexts, 0.5 (one object) for every other count.\n"
          "exit status: 0 flat and nothing failed, 1 error, 2 usage, 3 a series grew, a count\n"
          "did not return to idle, too few samples to judge, or requests or swaps failed\n",
          f);
}

#define soak_usage(...) keel__cli_usage_error("keel soak", PERF_EXIT_USAGE, __VA_ARGS__)

static void sleep_s(double s)
{
    struct timespec ts;

    if (s <= 0)
        return;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ---------------------------------------------------------------- /proc sampling */

static void proc_status(pid_t pid, double *rss, double *threads)
{
    char path[64], line[256];
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    if ((f = fopen(path, "re")) == NULL)
        return;
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long n;
        if (sscanf(line, "VmRSS: %llu kB", &n) == 1)
            *rss = (double)n * 1024.0;
        else if (sscanf(line, "Threads: %llu", &n) == 1)
            *threads = (double)n;
    }
    fclose(f);
}

static void proc_fds(pid_t pid, double *fds, double *memfds)
{
    char path[64], link[96], target[256];
    DIR *d;
    struct dirent *de;
    unsigned n = 0, m = 0;

    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    if ((d = opendir(path)) == NULL)
        return;
    while ((de = readdir(d)) != NULL) {
        ssize_t len;
        if (de->d_name[0] == '.')
            continue;
        n++;
        snprintf(link, sizeof(link), "%s/%.20s", path, de->d_name);
        len = readlink(link, target, sizeof(target) - 1);
        if (len > 0) {
            target[len] = '\0';
            if (strncmp(target, "/memfd:", 7) == 0)
                m++;
        }
    }
    closedir(d);
    *fds = n;
    *memfds = m;
}

/* Processes whose parent is pid (field 4 of /proc/N/stat). */
static double proc_children(pid_t pid)
{
    DIR *d = opendir("/proc");
    struct dirent *de;
    unsigned n = 0;

    if (d == NULL)
        return NAN;
    while ((de = readdir(d)) != NULL) {
        char path[64], buf[512], *p;
        FILE *f;
        int ppid;
        if (de->d_name[0] < '1' || de->d_name[0] > '9')
            continue;
        snprintf(path, sizeof(path), "/proc/%.20s/stat", de->d_name);
        if ((f = fopen(path, "re")) == NULL)
            continue;
        p = fgets(buf, sizeof(buf), f);
        fclose(f);
        /* The command name is in parentheses and may contain anything: skip past its end. */
        if (p == NULL || (p = strrchr(buf, ')')) == NULL)
            continue;
        if (sscanf(p + 1, " %*c %d", &ppid) == 1 && ppid == (int)pid)
            n++;
    }
    closedir(d);
    return n;
}

/* The value of an unlabelled sample "name value" in Prometheus text. */
static double metric_value(const char *text, const char *name)
{
    size_t n = strlen(name);

    for (const char *p = text; p != NULL && *p != '\0';) {
        if (strncmp(p, name, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        p = strchr(p, '\n');
        if (p != NULL)
            p++;
    }
    return NAN;
}

static void take_sample(soak *s, perf_client *c, sample *out)
{
    const char *body;
    size_t len;
    int status;
    char err[256];

    out->t = perf_now() - s->t0;
    out->phase = atomic_load(&s->phase);
    out->swaps = atomic_load(&s->swaps_done);
    for (int i = 0; i < S_COUNT_; i++)
        out->v[i] = NAN;
    proc_status(s->pid, &out->v[S_RSS], &out->v[S_THREADS]);
    proc_fds(s->pid, &out->v[S_FDS], &out->v[S_MEMFDS]);
    out->v[S_CHILDREN] = proc_children(s->pid);
    if (perf_client_request(c, "GET", "/metrics", NULL, NULL, 0, 10, &status, &body, &len, err,
                            sizeof(err)) &&
        status == 200) {
        for (int i = 0; i < S_COUNT_; i++) {
            if (series[i].metric != NULL)
                out->v[i] = metric_value(body, series[i].metric);
        }
    }
    /* Not kept alive: the next sample's fd count must not include the sampler's own
     * connection (the baseline is taken with none open). */
    perf_client_fini(c);
}

static bool push_sample(soak *s, const sample *x)
{
    bool ok = true;

    pthread_mutex_lock(&s->mu);
    if (s->nsamples == s->cap) {
        size_t ncap = s->cap == 0 ? 256 : s->cap * 2;
        sample *ns = realloc(s->samples, ncap * sizeof(*ns));
        if (ns == NULL)
            ok = false;
        else {
            s->samples = ns;
            s->cap = ncap;
        }
    }
    if (ok)
        s->samples[s->nsamples++] = *x;
    pthread_mutex_unlock(&s->mu);
    return ok;
}

static void *sampler_main(void *arg)
{
    soak *s = arg;
    perf_client c;
    double next = perf_now();

    perf_client_init(&c, &s->w.target);
    while (!atomic_load(&s->sampler_stop)) {
        sample x;
        double now;
        take_sample(s, &c, &x);
        push_sample(s, &x);
        next += s->sample_interval;
        now = perf_now();
        if (next < now)
            next = now; /* a slow sample: do not try to catch up */
        while (!atomic_load(&s->sampler_stop) && perf_now() < next)
            sleep_s(fmin(0.05, next - perf_now()));
    }
    perf_client_fini(&c);
    return NULL;
}

/* ---------------------------------------------------------------- swaps */

static void swap_note(soak *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void swap_note(soak *s, const char *fmt, ...)
{
    va_list ap;
    char tmp[200];

    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    for (size_t i = 0; i < s->nswap_notes; i++) {
        if (strcmp(s->swap_notes[i], tmp) == 0)
            return;
    }
    if (s->nswap_notes < sizeof(s->swap_notes) / sizeof(s->swap_notes[0]))
        snprintf(s->swap_notes[s->nswap_notes++], sizeof(s->swap_notes[0]), "%s", tmp);
}

/* POST /v2/repository/models/NAME/(load|unload); true on HTTP 200. */
static bool repo_call(soak *s, perf_client *c, const char *name, const char *what)
{
    char path[512], err[256];
    const char *body;
    size_t len;
    int status;
    double t = perf_now();

    snprintf(path, sizeof(path), "/v2/repository/models/%s/%s", name, what);
    if (!perf_client_request(c, "POST", path, "application/json", "{}", 2, 120, &status, &body,
                             &len, err, sizeof(err))) {
        swap_note(s, "%s %s: %s", what, name, err);
        return false;
    }
    t = perf_now() - t;
    if (t > s->swap_max_s)
        s->swap_max_s = t;
    if (status != 200) {
        swap_note(s, "%s %s: HTTP %d: %.120s", what, name, status, body);
        return false;
    }
    return true;
}

static void *swapper_main(void *arg)
{
    soak *s = arg;
    perf_client c;
    double next = perf_now();

    perf_client_init(&c, &s->w.target);
    for (uint64_t i = 0; i < s->swaps && !atomic_load(&s->stop); i++) {
        while (perf_now() < next)
            sleep_s(fmin(0.05, next - perf_now()));
        next += s->swap_interval;
        if (repo_call(s, &c, s->model, "load"))
            s->swap_ok++;
        else
            s->swap_failed++;
        /* Odd swaps unload the other models, even ones load them back. */
        for (size_t k = 0; k < s->nload_unload; k++) {
            if (!repo_call(s, &c, s->load_unload[k], i % 2 == 0 ? "unload" : "load"))
                s->swap_failed++;
        }
        atomic_fetch_add(&s->swaps_done, 1);
    }
    if (atomic_load(&s->swaps_done) % 2 == 1) {
        for (size_t k = 0; k < s->nload_unload; k++) {
            if (!repo_call(s, &c, s->load_unload[k], "load"))
                s->swap_failed++;
        }
    }
    perf_client_fini(&c);
    atomic_store(&s->stop, true);
    return NULL;
}

/* ---------------------------------------------------------------- the server */

/* Starts keel serve (this very binary) and reads its listening line. */
static bool server_start(soak *s, char *err, size_t errlen)
{
    const char *argv[80];
    size_t n = 0;
    int pfd[2];
    char line[512];
    size_t len = 0;
    double deadline;

    argv[n++] = "keel";
    argv[n++] = "serve";
    argv[n++] = "--model-repository";
    argv[n++] = s->repo;
    argv[n++] = "--http-port";
    argv[n++] = "0";
    argv[n++] = "--grpc-port";
    argv[n++] = "-1";
    argv[n++] = "--model-control-mode";
    argv[n++] = "explicit";
    argv[n++] = "--load-model";
    argv[n++] = s->model;
    for (size_t k = 0; k < s->nload_unload; k++) {
        argv[n++] = "--load-model";
        argv[n++] = s->load_unload[k];
    }
    if (s->nserve_args == 0) {
        argv[n++] = "--log-level";
        argv[n++] = "warn";
        argv[n++] = "--shutdown-grace-secs";
        argv[n++] = "0";
    }
    for (size_t k = 0; k < s->nserve_args; k++)
        argv[n++] = s->serve_args[k];
    argv[n] = NULL;
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        return false;
    }
    s->child = fork();
    if (s->child < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        close(pfd[0]);
        close(pfd[1]);
        return false;
    }
    if (s->child == 0) {
        dup2(pfd[1], 1);
        execv("/proc/self/exe", (char *const *)argv);
        _exit(127);
    }
    close(pfd[1]);
    deadline = perf_now() + 120;
    while (memchr(line, '\n', len) == NULL) {
        ssize_t r;
        struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
        fd_set set;
        if (perf_now() > deadline || len == sizeof(line) - 1) {
            snprintf(err, errlen, "keel serve printed no listening line");
            goto fail;
        }
        FD_ZERO(&set);
        FD_SET(pfd[0], &set);
        if (select(pfd[0] + 1, &set, NULL, NULL, &tv) <= 0)
            continue;
        r = read(pfd[0], line + len, sizeof(line) - 1 - len);
        if (r <= 0) {
            snprintf(err, errlen, "keel serve exited before listening (see its log above)");
            goto fail;
        }
        len += (size_t)r;
    }
    line[len] = '\0';
    {
        const char *p = strstr(line, " port=");
        char url[64];
        if (p == NULL) {
            snprintf(err, errlen, "unexpected first line from keel serve: %.100s", line);
            goto fail;
        }
        snprintf(url, sizeof(url), "127.0.0.1:%d", atoi(p + 6));
        if (!perf_target_parse(url, &s->w.target, err, errlen))
            goto fail;
    }
    /* Its stdout stays a pipe nobody reads (keel serve writes nothing more there), open until
     * it has exited. */
    s->child_out = pfd[0];
    s->pid = s->child;
    return true;
fail:
    close(pfd[0]);
    kill(s->child, SIGKILL);
    waitpid(s->child, NULL, 0);
    s->child = -1;
    return false;
}

/* SIGTERM and wait (60 s, then SIGKILL); returns the exit status, 128 + signal, or -1. */
static int server_stop(soak *s)
{
    int st, rc = -1;

    if (s->child <= 0)
        return 0;
    kill(s->child, SIGTERM);
    for (int i = 0; i < 1200 && rc == -1; i++) {
        if (waitpid(s->child, &st, WNOHANG) == s->child)
            rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        else
            sleep_s(0.05);
    }
    if (rc == -1) {
        kill(s->child, SIGKILL);
        waitpid(s->child, &st, 0);
    }
    s->child = -1;
    if (s->child_out != -1)
        close(s->child_out);
    s->child_out = -1;
    return rc;
}

/* ---------------------------------------------------------------- verdict */

typedef struct verdict {
    bool present;
    double first, last; /* window values */
    double growth, floor_rise, tolerance;
    bool grows;
    double idle_before, idle_after;
    bool idle_fail;
} verdict;

static void judge(const soak *s, verdict v[S_COUNT_], double *win_start, double *win_end)
{
    size_t a = 0, b = 0; /* swap-phase samples [a, b) */
    double t_start = 0, t_end = 0;
    const sample *base = NULL, *idle = NULL;
    unsigned inflight = s->lo.rate > 0 ? s->lo.max_connections : s->lo.concurrency;
    const double swap_generations = 2;
    double per_gen = 1;

    for (size_t i = 0; i < s->nsamples; i++) {
        if (s->samples[i].phase == PH_BASELINE)
            base = &s->samples[i];
        if (s->samples[i].phase == PH_IDLE)
            idle = &s->samples[i];
    }
    /* The swapper runs one reload at a time, and while it runs two generations more than at
     * idle can be alive: the one being built and the one it retires, until its last lease is
     * returned and the reaper frees it. When loads take about as long as the swap interval,
     * that is most of the time, and the floor of the last quarter can sit one generation (and
     * its contexts) above the first quarter's without anything leaking. A leak grows by one
     * per swap, dozens over the window. Contexts per generation from the idle baseline. */
    if (base != NULL && !isnan(base->v[S_LIVE_CONTEXTS]) && !isnan(base->v[S_LIVE_GENERATIONS]) &&
        base->v[S_LIVE_GENERATIONS] > 0)
        per_gen = ceil(base->v[S_LIVE_CONTEXTS] / base->v[S_LIVE_GENERATIONS]);
    if (per_gen < 1)
        per_gen = 1;
    while (a < s->nsamples && s->samples[a].phase != PH_SWAP)
        a++;
    for (b = a; b < s->nsamples && s->samples[b].phase == PH_SWAP;)
        b++;
    if (b > a) {
        t_start = s->samples[a].t;
        t_end = s->samples[b - 1].t;
        t_start += (t_end - t_start) * s->warmup_fraction;
        while (a < b && s->samples[a].t < t_start)
            a++;
    }
    *win_start = t_start;
    *win_end = t_end;
    for (int k = 0; k < S_COUNT_; k++) {
        verdict *r = &v[k];
        double sx = 0, sy = 0, sxx = 0, sxy = 0, n = 0, fmin1 = INFINITY, fmin2 = INFINITY;
        size_t cnt = 0, q;
        memset(r, 0, sizeof(*r));
        for (size_t i = a; i < b; i++) {
            if (!isnan(s->samples[i].v[k]))
                cnt++;
        }
        r->tolerance = k == S_RSS           ? s->rss_tolerance
                       : series[k].inflight ? inflight
                       : series[k].per_swap
                           ? swap_generations * (k == S_LIVE_CONTEXTS ? per_gen : 1)
                           : 0.5;
        if (base != NULL && idle != NULL && k != S_RSS && !isnan(base->v[k]) &&
            !isnan(idle->v[k])) {
            r->idle_before = base->v[k];
            r->idle_after = idle->v[k];
            r->idle_fail = idle->v[k] > base->v[k];
        }
        if (cnt < 4)
            continue;
        r->present = true;
        q = cnt / 4 > 0 ? cnt / 4 : 1;
        cnt = 0;
        for (size_t i = a; i < b; i++) {
            double x = s->samples[i].t, y = s->samples[i].v[k];
            if (isnan(y))
                continue;
            if (n == 0)
                r->first = y;
            r->last = y;
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
            n++;
            if (cnt < q && y < fmin1)
                fmin1 = y;
            cnt++;
        }
        {
            size_t seen = 0;
            for (size_t i = a; i < b; i++) {
                double y = s->samples[i].v[k];
                if (isnan(y))
                    continue;
                if (seen >= cnt - q && y < fmin2)
                    fmin2 = y;
                seen++;
            }
        }
        {
            double den = n * sxx - sx * sx;
            double slope = den > 0 ? (n * sxy - sx * sy) / den : 0;
            r->growth = slope * (t_end - t_start);
        }
        r->floor_rise = fmin2 - fmin1;
        r->grows = r->growth > r->tolerance && r->floor_rise > r->tolerance;
    }
}

static void fmt_value(int k, double v, char *buf, size_t len)
{
    if (isnan(v))
        snprintf(buf, len, "-");
    else if (k == S_RSS)
        snprintf(buf, len, "%+.2f MiB", v / 1048576.0);
    else
        snprintf(buf, len, "%+.2f", v);
}

/* ---------------------------------------------------------------- CSV and SVG */

static bool write_csv(const soak *s, const char *path)
{
    FILE *f = fopen(path, "we");

    if (f == NULL) {
        fprintf(stderr, "keel soak: %s: %s\n", path, strerror(errno));
        return false;
    }
    fputs("t_s,phase,swaps", f);
    for (int k = 0; k < S_COUNT_; k++)
        fprintf(f, ",%s", series[k].name);
    fputc('\n', f);
    for (size_t i = 0; i < s->nsamples; i++) {
        const sample *x = &s->samples[i];
        fprintf(f, "%.3f,%s,%" PRIu64, x->t, phase_names[x->phase], x->swaps);
        for (int k = 0; k < S_COUNT_; k++) {
            if (isnan(x->v[k]))
                fputs(",", f);
            else
                fprintf(f, ",%.0f", x->v[k]);
        }
        fputc('\n', f);
    }
    if (fclose(f) != 0) {
        fprintf(stderr, "keel soak: %s: write error\n", path);
        return false;
    }
    return true;
}

static void svg_label(FILE *f, double v, int k)
{
    if (k == S_RSS)
        fprintf(f, "%.2f MiB", v / 1048576.0);
    else
        fprintf(f, "%.0f", v);
}

/* One panel per series, stacked; each normalised to its own range, with its min and max on
 * the axis, the swap phase shaded and the verdict window marked. */
static bool write_svg(const soak *s, const char *path, const verdict v[S_COUNT_], double ws,
                      double we)
{
    const double W = 960, left = 110, right = 20, top = 66, ph = 90, gap = 34;
    double tmax = s->nsamples > 0 ? s->samples[s->nsamples - 1].t : 1, H;
    int panels = 0;
    FILE *f = fopen(path, "we");

    if (f == NULL) {
        fprintf(stderr, "keel soak: %s: %s\n", path, strerror(errno));
        return false;
    }
    if (tmax <= 0)
        tmax = 1;
    for (int k = 0; k < S_COUNT_; k++)
        panels += v[k].present;
    H = top + panels * (ph + gap) + 30;
#define X(t) (left + (W - left - right) * (t) / tmax)
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
            "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"11\">\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
            "<text x=\"%.0f\" y=\"20\" font-size=\"14\">keel soak: model %s, %" PRIu64
            " swaps, %.0f s</text>\n"
            "<text x=\"%.0f\" y=\"36\" fill=\"#555\">each panel is scaled to its own range; "
            "shaded: swap phase; dashed: verdict window</text>\n",
            W, H, W, H, left, s->model, (uint64_t)atomic_load(&s->swaps_done), tmax, left);
    int p = 0;
    for (int k = 0; k < S_COUNT_; k++) {
        double y0, lo = INFINITY, hi = -INFINITY, sw0 = -1, sw1 = -1;
        if (!v[k].present)
            continue;
        y0 = top + p * (ph + gap);
        p++;
        for (size_t i = 0; i < s->nsamples; i++) {
            double y = s->samples[i].v[k];
            if (!isnan(y)) {
                lo = fmin(lo, y);
                hi = fmax(hi, y);
            }
            if (s->samples[i].phase == PH_SWAP) {
                if (sw0 < 0)
                    sw0 = s->samples[i].t;
                sw1 = s->samples[i].t;
            }
        }
        if (hi - lo < 1e-9) {
            hi = lo + 1;
        }
        if (sw0 >= 0)
            fprintf(f,
                    "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                    "fill=\"#eef3fb\"/>\n",
                    X(sw0), y0, X(sw1) - X(sw0), ph);
        fprintf(f,
                "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
                "stroke=\"#999\"/>\n",
                left, y0, W - left - right, ph);
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#888\" "
                "stroke-dasharray=\"4 3\"/>\n"
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#888\" "
                "stroke-dasharray=\"4 3\"/>\n",
                X(ws), y0, X(ws), y0 + ph, X(we), y0, X(we), y0 + ph);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" fill=\"%s\">%s: %s", left, y0 - 6,
                v[k].grows || v[k].idle_fail ? "#c00" : "#060", series[k].name,
                v[k].grows       ? "GROWS"
                : v[k].idle_fail ? "does not return to idle"
                                 : "flat");
        {
            char g[64];
            fmt_value(k, v[k].growth, g, sizeof(g));
            fprintf(f, " (fitted growth %s)</text>\n", g);
        }
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">", left - 6, y0 + 10);
        svg_label(f, hi, k);
        fprintf(f, "</text>\n<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">", left - 6, y0 + ph);
        svg_label(f, lo, k);
        fprintf(f,
                "</text>\n<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" "
                "points=\"",
                v[k].grows ? "#c00" : "#1f5fbf");
        for (size_t i = 0; i < s->nsamples; i++) {
            double y = s->samples[i].v[k];
            if (isnan(y))
                continue;
            fprintf(f, "%.1f,%.1f ", X(s->samples[i].t), y0 + ph - ph * (y - lo) / (hi - lo));
        }
        fprintf(f, "\"/>\n");
    }
    {
        double yb = top + panels * (ph + gap) - gap + 14;
        for (int i = 0; i <= 5; i++) {
            double t = tmax * i / 5;
            fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.0f s</text>\n", X(t),
                    yb, t);
        }
    }
#undef X
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "keel soak: %s: write error\n", path);
        return false;
    }
    return true;
}

/* ---------------------------------------------------------------- main */

/*
 * Waits until the gauges that follow requests in flight read 0 and every other count (fds,
 * threads, memfds, children, live generations and contexts) is back at its value in ref (when
 * ref is given) or has not changed for a second: closed connections take the server a moment
 * to notice, and a retired generation is freed by keel's reaper only after its last request
 * completed; a leaked object never goes. At most 15 s. The last sample is left in *out.
 */
static void wait_quiet(soak *s, perf_client *c, const sample *ref, sample *out)
{
    double deadline = perf_now() + 15, stable_since = perf_now();
    double last[S_COUNT_];

    for (int k = 0; k < S_COUNT_; k++)
        last[k] = NAN;
    for (;;) {
        bool quiet = true, changed = false;
        double now;
        take_sample(s, c, out);
        now = perf_now();
        for (int k = 0; k < S_COUNT_; k++) {
            if (k == S_RSS || isnan(out->v[k]))
                continue;
            if (series[k].inflight && out->v[k] != 0)
                quiet = false;
            if (out->v[k] != last[k] && !(isnan(last[k]) && isnan(out->v[k])))
                changed = true;
            last[k] = out->v[k];
        }
        if (changed)
            stable_since = now;
        for (int k = 0; ref != NULL && k < S_COUNT_; k++) {
            if (k != S_RSS && !series[k].inflight && !isnan(ref->v[k]) && out->v[k] > ref->v[k] &&
                now - stable_since < 1.0)
                quiet = false;
        }
        if (quiet || now > deadline)
            return;
        sleep_s(0.05);
    }
}

/* The final idle sample, after the load and the swaps stopped. */
static void settle(soak *s, perf_client *c, const sample *base)
{
    sample x;

    atomic_store(&s->phase, PH_IDLE);
    wait_quiet(s, c, base, &x);
    push_sample(s, &x);
}

/* ---------------------------------------------------------------- the phases of a run */

/* Every option's default; the mutex. */
static void soak_init(soak *s)
{
    memset(s, 0, sizeof(*s));
    s->child = -1;
    s->child_out = -1;
    s->swaps = 100;
    s->swap_interval = 1;
    s->sample_interval = 1;
    s->warmup_fraction = 0.25;
    s->rss_tolerance = 512 * 1024;
    s->d.input_data = "random";
    s->d.variants = 16;
    s->lo.concurrency = 4;
    s->lo.max_connections = 64;
    s->lo.timeout_s = 30;
    s->lo.progress = true;
    pthread_mutex_init(&s->mu, NULL);
}

/* Parses the options into s. Returns -1 to go on, or the exit status (--help, usage error). */
static int soak_parse_args(soak *s, int argc, char **argv)
{
    const char *format = "json";
    uint64_t batch = 1;

    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        uint64_t x;
#define TAKE()                                                                                     \
    do {                                                                                           \
        if (i + 1 >= argc)                                                                         \
            return soak_usage("option '%s' needs a value", a);                                     \
        val = argv[++i];                                                                           \
    } while (0)
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            soak_help(stdout);
            return PERF_EXIT_OK;
        } else if (strcmp(a, "--model-repository") == 0) {
            TAKE();
            s->repo = val;
        } else if (strcmp(a, "--serve-arg") == 0) {
            TAKE();
            if (s->nserve_args == sizeof(s->serve_args) / sizeof(s->serve_args[0]))
                return soak_usage("too many --serve-arg options");
            s->serve_args[s->nserve_args++] = val;
        } else if (strcmp(a, "-u") == 0 || strcmp(a, "--url") == 0) {
            TAKE();
            s->url = val;
        } else if (strcmp(a, "--pid") == 0) {
            TAKE();
            if (!keel__cli_parse_u64(val, 1, INT32_MAX, &x))
                return soak_usage("--pid: '%s' is not a process id", val);
            s->pid = (pid_t)x;
        } else if (strcmp(a, "-m") == 0 || strcmp(a, "--model") == 0) {
            TAKE();
            s->model = val;
        } else if (strcmp(a, "--swaps") == 0) {
            TAKE();
            if (!keel__cli_parse_u64(val, 1, UINT32_MAX, &s->swaps))
                return soak_usage("--swaps: '%s' is not a positive integer", val);
        } else if (strcmp(a, "--swap-interval") == 0) {
            TAKE();
            if (!keel__cli_parse_double(val, 0, 86400, &s->swap_interval))
                return soak_usage("--swap-interval: '%s' is not in 0..86400 seconds", val);
        } else if (strcmp(a, "--load-unload") == 0) {
            TAKE();
            if (s->nload_unload == sizeof(s->load_unload) / sizeof(s->load_unload[0]))
                return soak_usage("too many --load-unload options");
            s->load_unload[s->nload_unload++] = val;
        } else if (strcmp(a, "--steady-secs") == 0) {
            TAKE();
            if (!keel__cli_parse_double(val, 0, 86400, &s->steady_s))
                return soak_usage("--steady-secs: '%s' is not in 0..86400", val);
        } else if (strcmp(a, "--concurrency") == 0) {
            TAKE();
            if (!keel__cli_parse_u64(val, 1, 10000, &x))
                return soak_usage("--concurrency: '%s' is not in 1..10000", val);
            s->lo.concurrency = (unsigned)x;
            s->lo.rate = 0;
        } else if (strcmp(a, "--request-rate") == 0) {
            TAKE();
            if (!keel__cli_parse_double(val, 0.001, 1e7, &s->lo.rate))
                return soak_usage("--request-rate: '%s' is not a positive rate", val);
        } else if (strcmp(a, "--max-connections") == 0) {
            TAKE();
            if (!keel__cli_parse_u64(val, 1, 100000, &x))
                return soak_usage("--max-connections: '%s' is not in 1..100000", val);
            s->lo.max_connections = (unsigned)x;
        } else if (strcmp(a, "-b") == 0 || strcmp(a, "--batch-size") == 0) {
            TAKE();
            if (!keel__cli_parse_u64(val, 1, 1u << 20, &batch))
                return soak_usage("--batch-size: '%s' is not in 1..1048576", val);
        } else if (strcmp(a, "--input-tensor-format") == 0) {
            TAKE();
            if (strcmp(val, "json") != 0 && strcmp(val, "binary") != 0)
                return soak_usage("--input-tensor-format: '%s' is not json or binary", val);
            format = val;
        } else if (strcmp(a, "--input-data") == 0) {
            TAKE();
            s->d.input_data = val;
        } else if (strcmp(a, "--timeout") == 0) {
            TAKE();
            if (!keel__cli_parse_double(val, 0.001, 3600, &s->lo.timeout_s))
                return soak_usage("--timeout: '%s' is not in 0.001..3600 seconds", val);
        } else if (strcmp(a, "--sample-interval") == 0) {
            TAKE();
            if (!keel__cli_parse_double(val, 0.01, 3600, &s->sample_interval))
                return soak_usage("--sample-interval: '%s' is not in 0.01..3600 seconds", val);
        } else if (strcmp(a, "--warmup-fraction") == 0) {
            TAKE();
            if (!keel__cli_parse_double(val, 0, 0.9, &s->warmup_fraction))
                return soak_usage("--warmup-fraction: '%s' is not in 0..0.9", val);
        } else if (strcmp(a, "--rss-tolerance") == 0) {
            TAKE();
            uint64_t bytes;
            if (!keel__cli_parse_bytes(val, 0, UINT64_C(1) << 50, &bytes))
                return soak_usage("--rss-tolerance: '%s' is not a byte count (k/m/g allowed)", val);
            s->rss_tolerance = (double)bytes;
        } else if (strcmp(a, "--csv") == 0) {
            TAKE();
            s->csv_path = val;
        } else if (strcmp(a, "--svg") == 0) {
            TAKE();
            s->svg_path = val;
        } else if (strcmp(a, "--no-progress") == 0) {
            s->lo.progress = false;
        } else if (a[0] == '-') {
            return soak_usage("unknown option '%s'", a);
        } else {
            return soak_usage("unexpected argument '%s'", a);
        }
#undef TAKE
    }
    if (s->model == NULL)
        return soak_usage("--model is required");
    if ((s->repo == NULL) == (s->url == NULL))
        return soak_usage("give either --model-repository (keel soak starts the server) or "
                          "--url and --pid");
    if (s->url != NULL && s->pid == 0)
        return soak_usage("--url needs --pid (the server's process, sampled through /proc)");
    if (s->repo != NULL && s->pid != 0)
        return soak_usage("--pid goes with --url, not with --model-repository");
    s->w.model = (char *)s->model;
    s->w.batch = (unsigned)batch;
    s->w.binary = strcmp(format, "binary") == 0;
    return -1;
}

/* Starts the server (or resolves --url) and builds the requests. Returns PERF_EXIT_OK, or the
 * exit status after printing why. */
static int soak_prepare(soak *s)
{
    char err[512];

    s->t0 = perf_now();
    if (s->repo != NULL) {
        if (!server_start(s, err, sizeof(err))) {
            fprintf(stderr, "keel soak: %s\n", err);
            return PERF_EXIT_RUNTIME;
        }
    } else if (!perf_target_parse(s->url, &s->w.target, err, sizeof(err))) {
        fprintf(stderr, "keel soak: %s\n", err);
        return PERF_EXIT_USAGE;
    }
    if (!perf_workload_prepare(&s->w, &s->d, err, sizeof(err))) {
        fprintf(stderr, "keel soak: %s\n", err);
        return PERF_EXIT_RUNTIME;
    }
    return PERF_EXIT_OK;
}

static void print_banner(const soak *s)
{
    printf("keel soak: model %s on %s:%s (pid %d), %" PRIu64 " swaps every %.3g s, load %s %g, "
           "batch %u, %s tensors\n",
           s->model, s->w.target.host, s->w.target.port, (int)s->pid, s->swaps, s->swap_interval,
           s->lo.rate > 0 ? "rate" : "concurrency",
           s->lo.rate > 0 ? s->lo.rate : (double)s->lo.concurrency, s->w.batch,
           s->w.binary ? "binary" : "JSON");
    fflush(stdout);
}

/*
 * The idle baseline into *base: taken after a short priming load and one reload, so that
 * whatever the server creates once on first use (thread pools, caches) is already there, and
 * after the priming connections are closed on the server's side. Failed priming requests
 * count as failures of the steady phase. False (message printed) if the load could not run.
 */
static bool soak_baseline(soak *s, perf_client *ctl, perf_result *steady, sample *base)
{
    perf_result prime;
    perf_load_opts plo = s->lo;
    sample pre;
    char err[512];

    atomic_store(&s->phase, PH_BASELINE);
    take_sample(s, ctl, &pre);
    plo.warmup_s = 0;
    plo.duration_s = 0.5;
    plo.progress = false;
    if (!perf_result_init(&prime) || !perf_load_run(&s->w, &plo, &prime, err, sizeof(err))) {
        fprintf(stderr, "keel soak: priming load: %s\n", err);
        perf_result_fini(&prime);
        return false;
    }
    steady->failed += prime.failed;
    for (size_t k = 0; k < prime.nnotes; k++)
        printf("  failed request (priming): %s\n", prime.notes[k]);
    perf_result_fini(&prime);
    if (!repo_call(s, ctl, s->model, "load"))
        s->swap_failed++;
    wait_quiet(s, ctl, &pre, base);
    base->phase = PH_BASELINE;
    return true;
}

/* Stops and joins the swap and sampler threads that are still running (any exit path). */
static void soak_join_threads(soak *s)
{
    if (s->swapper_up) {
        atomic_store(&s->stop, true);
        pthread_join(s->swapper, NULL);
        s->swapper_up = false;
    }
    if (s->sampler_up) {
        atomic_store(&s->sampler_stop, true);
        pthread_join(s->sampler, NULL);
        s->sampler_up = false;
    }
}

/*
 * The sampled run: the sampler thread from the baseline on, the steady phase (--steady-secs),
 * the swap phase (the load until the swap thread is done), then the threads joined and the
 * server left to settle. False (message printed) if a thread or a load could not start; the
 * caller joins what runs (soak_join_threads).
 */
static bool soak_run(soak *s, perf_client *ctl, const sample *base, perf_result *steady,
                     perf_result *during)
{
    char err[512];

    push_sample(s, base);
    if (pthread_create(&s->sampler, NULL, sampler_main, s) != 0) {
        fprintf(stderr, "keel soak: cannot start the sampler thread\n");
        return false;
    }
    s->sampler_up = true;

    if (s->steady_s > 0) {
        atomic_store(&s->phase, PH_STEADY);
        s->lo.warmup_s = fmin(1.0, s->steady_s / 4);
        s->lo.duration_s = s->steady_s;
        s->lo.label = "steady";
        if (!perf_load_run(&s->w, &s->lo, steady, err, sizeof(err))) {
            fprintf(stderr, "keel soak: %s\n", err);
            return false;
        }
    }
    atomic_store(&s->phase, PH_SWAP);
    if (pthread_create(&s->swapper, NULL, swapper_main, s) != 0) {
        fprintf(stderr, "keel soak: cannot start the swap thread\n");
        return false;
    }
    s->swapper_up = true;
    s->lo.warmup_s = 0;
    s->lo.duration_s = 0;
    s->lo.stop = &s->stop;
    s->lo.label = "swapping";
    if (!perf_load_run(&s->w, &s->lo, during, err, sizeof(err))) {
        fprintf(stderr, "keel soak: %s\n", err);
        atomic_store(&s->stop, true);
        return false;
    }
    pthread_join(s->swapper, NULL);
    s->swapper_up = false;
    atomic_store(&s->sampler_stop, true);
    pthread_join(s->sampler, NULL);
    s->sampler_up = false;
    perf_client_init(ctl, &s->w.target);
    settle(s, ctl, base);
    perf_client_fini(ctl);
    return true;
}

/* The verdict window and one row per judged series; *grows / *idle_fail and the names of the
 * series that failed (comma-separated into names / idle_names). */
static void report_series(const soak *s, const verdict v[S_COUNT_], double ws, double we,
                          bool *grows, char *names, size_t nlen, bool *idle_fail, char *idle_names,
                          size_t ilen)
{
    size_t off = 0, ioff = 0;
    uint64_t sw0 = 0, sw1 = 0;

    for (size_t i = 0; i < s->nsamples; i++) {
        if (s->samples[i].phase == PH_SWAP && s->samples[i].t <= ws)
            sw0 = s->samples[i].swaps;
        if (s->samples[i].phase == PH_SWAP && s->samples[i].t <= we)
            sw1 = s->samples[i].swaps;
    }
    printf("\nverdict window: %.1f s .. %.1f s, swaps %" PRIu64 " .. %" PRIu64
           " (after %.0f %% warm-up of the swap phase)\n",
           ws, we, sw0, sw1, s->warmup_fraction * 100);
    printf("%-22s %14s %14s %14s %12s %8s  %s\n", "series", "fitted growth", "floor rise",
           "tolerance", "idle before", "after", "verdict");
    for (int k = 0; k < S_COUNT_; k++) {
        char g[32], fr[32], tol[32];
        if (!v[k].present)
            continue;
        fmt_value(k, v[k].growth, g, sizeof(g));
        fmt_value(k, v[k].floor_rise, fr, sizeof(fr));
        if (k == S_RSS)
            snprintf(tol, sizeof(tol), "%.2f MiB", v[k].tolerance / 1048576.0);
        else
            snprintf(tol, sizeof(tol), "%.1f", v[k].tolerance);
        printf("%-22s %14s %14s %14s %12.0f %8.0f  %s\n", series[k].name, g, fr, tol,
               v[k].idle_before, v[k].idle_after,
               v[k].grows       ? "GROWS"
               : v[k].idle_fail ? "NOT IDLE"
                                : "flat");
        if (v[k].grows) {
            *grows = true;
            off +=
                (size_t)snprintf(names + off, nlen - off, "%s%s", off ? "," : "", series[k].name);
        }
        if (v[k].idle_fail) {
            *idle_fail = true;
            ioff += (size_t)snprintf(idle_names + ioff, ilen - ioff, "%s%s", ioff ? "," : "",
                                     series[k].name);
        }
    }
}

/* Requests, swaps and latencies (during the swaps, and in the steady phase if there was one). */
static void report_traffic(const soak *s, const perf_result *steady, const perf_result *during)
{
    char errs[512];

    perf_result_errors(during, errs, sizeof(errs));
    printf("\nrequests: %" PRIu64 " ok, %" PRIu64 " failed%s%s\n", during->ok + steady->ok,
           during->failed + steady->failed, errs[0] != '\0' ? " " : "", errs);
    for (size_t k = 0; k < during->nnotes; k++)
        printf("  failed request: %s\n", during->notes[k]);
    for (size_t k = 0; k < steady->nnotes; k++)
        printf("  failed request (steady phase): %s\n", steady->notes[k]);
    printf("swaps: %" PRIu64 " ok, %" PRIu64 " failed, slowest %.1f ms\n", s->swap_ok,
           s->swap_failed, s->swap_max_s * 1e3);
    for (size_t k = 0; k < s->nswap_notes; k++)
        printf("  failed swap: %s\n", s->swap_notes[k]);
    printf("latency during swaps: p50 %.3f ms, p99 %.3f ms, p99.9 %.3f ms, max %.3f ms, "
           "%.0f req/s\n",
           (double)perf_hist_quantile(&during->hist, 0.5) / 1e6,
           (double)perf_hist_quantile(&during->hist, 0.99) / 1e6,
           (double)perf_hist_quantile(&during->hist, 0.999) / 1e6, (double)during->hist.max / 1e6,
           during->window_s > 0 ? (double)during->completed / during->window_s : 0.0);
    if (s->steady_s > 0 && steady->hist.total > 0)
        printf("latency steady (no swaps): p50 %.3f ms, p99 %.3f ms, p99.9 %.3f ms, max "
               "%.3f ms, %.0f req/s; p99 during swaps / steady = %.2f\n",
               (double)perf_hist_quantile(&steady->hist, 0.5) / 1e6,
               (double)perf_hist_quantile(&steady->hist, 0.99) / 1e6,
               (double)perf_hist_quantile(&steady->hist, 0.999) / 1e6,
               (double)steady->hist.max / 1e6,
               steady->window_s > 0 ? (double)steady->completed / steady->window_s : 0.0,
               (double)perf_hist_quantile(&during->hist, 0.99) /
                   (double)perf_hist_quantile(&steady->hist, 0.99));
}

/* The report on standard output, ending with the one-line verdict. Returns the exit status:
 * PERF_EXIT_OK only if every series is flat and idle again and nothing failed. */
static int soak_report(const soak *s, const verdict v[S_COUNT_], double ws, double we,
                       const perf_result *steady, const perf_result *during, bool started,
                       int srv_rc)
{
    bool grows = false, idle_fail = false;
    int judged = 0;
    char names[512] = "", idle_names[512] = "";

    report_series(s, v, ws, we, &grows, names, sizeof(names), &idle_fail, idle_names,
                  sizeof(idle_names));
    report_traffic(s, steady, during);
    if (started)
        printf("server exit status: %d\n", srv_rc);
    for (int k = 0; k < S_COUNT_; k++)
        judged += v[k].present;
    if (judged == 0)
        printf("\nno series has 4 samples in the verdict window: make the swap phase "
               "longer (--swaps, --swap-interval) or sample more often "
               "(--sample-interval)\n");
    printf("verdict=%s", grows || idle_fail ? "grows" : judged == 0 ? "unknown" : "flat");
    if (grows)
        printf(" series=%s", names);
    if (idle_fail)
        printf(" not_idle=%s", idle_names);
    printf(" failed_requests=%" PRIu64 " failed_swaps=%" PRIu64 "\n",
           during->failed + steady->failed, s->swap_failed);
    fflush(stdout);
    if (grows || idle_fail || judged == 0 || during->failed + steady->failed > 0 ||
        s->swap_failed > 0 || srv_rc != 0)
        return PERF_EXIT_VERDICT;
    return PERF_EXIT_OK;
}

int keel_soak_main(int argc, char **argv)
{
    soak S;
    soak *s = &S;
    int rc = PERF_EXIT_RUNTIME, srv_rc = 0;
    perf_result steady, during;
    bool steady_init = false, during_init = false;
    perf_client ctl;
    sample base;
    verdict v[S_COUNT_];
    double ws = 0, we = 0;
    bool started;

    soak_init(s);
    perf_client_init(&ctl, &s->w.target);
    if ((rc = soak_parse_args(s, argc, argv)) >= 0)
        return rc;
    if ((rc = soak_prepare(s)) != PERF_EXIT_OK)
        goto done;
    rc = PERF_EXIT_RUNTIME;
    if (!perf_result_init(&steady) || !perf_result_init(&during)) {
        fprintf(stderr, "keel soak: out of memory\n");
        goto done;
    }
    steady_init = during_init = true;
    print_banner(s);
    if (!soak_baseline(s, &ctl, &steady, &base) || !soak_run(s, &ctl, &base, &steady, &during))
        goto done;

    judge(s, v, &ws, &we);
    started = s->child > 0;
    if (started)
        srv_rc = server_stop(s);
    rc = soak_report(s, v, ws, we, &steady, &during, started, srv_rc);
    if (s->csv_path != NULL && !write_csv(s, s->csv_path))
        rc = PERF_EXIT_RUNTIME;
    if (s->svg_path != NULL && !write_svg(s, s->svg_path, v, ws, we))
        rc = PERF_EXIT_RUNTIME;
done:
    soak_join_threads(s);
    if (s->child > 0 && rc == PERF_EXIT_RUNTIME)
        (void)server_stop(s);
    perf_client_fini(&ctl);
    if (steady_init)
        perf_result_fini(&steady);
    if (during_init)
        perf_result_fini(&during);
    perf_workload_fini(&s->w);
    free(s->samples);
    pthread_mutex_destroy(&s->mu);
    return rc;
}
