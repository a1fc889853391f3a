/*
 * observe.c: latency histograms, responses by status code, W3C trace context.
 *
 * DESIGN
 * See observe.h for the contract and the lock-free series table. Buckets: a 1-2-5 ladder
 * from 10 us to 20 s (20 finite bounds and +Inf), so both a 20 us XGBoost call and a 10 s
 * image model land in a bucket of their own, and histogram_quantile has at most a factor
 * 2.5 between neighbouring bounds. Each observation is two relaxed atomic adds (the bucket
 * and the sum in nanoseconds); the scrape makes the buckets cumulative and derives _count
 * from them, so a scrape is always self-consistent even while observations land.
 *
 * Span ids: splitmix64 over an atomic counter started at a random value (getrandom), so
 * ids are unique within the process and unpredictable across restarts without a lock.
 */
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "grpc_codec.h"
#include "observe.h"

#define NHEADS 256
#define NCODES 600

static const uint64_t bounds_us[] = {10,     20,      50,      100,     200,      500,     1000,
                                     2000,   5000,    10000,   20000,   50000,    100000,  200000,
                                     500000, 1000000, 2000000, 5000000, 10000000, 20000000};
#define NBOUNDS (sizeof(bounds_us) / sizeof(bounds_us[0]))

typedef enum hist_kind {
    H_REQUEST = 0, /* end to end, as the protocol front end saw it */
    H_QUEUE,
    H_COMPUTE,
    H_PREPROCESS,
    H_COUNT_
} hist_kind;

static const struct {
    const char *name;
    const char *help;
} hist_info[H_COUNT_] = {
    {"keel_request_duration_seconds",
     "End-to-end latency of requests that reached a model, from the request's arrival to its "
     "response being sent (every status)."},
    {"keel_request_queue_duration_seconds",
     "Time requests waited in their model's queue for an execution context."},
    {"keel_request_compute_duration_seconds",
     "Time in the backend's run (requests that reached the backend)."},
    {"keel_request_preprocess_duration_seconds",
     "Time decoding images in a preprocessing worker (models with a preprocess section)."},
};

typedef struct hist {
    _Atomic uint64_t buckets[NBOUNDS + 1];
    _Atomic uint64_t sum_ns;
} hist;

typedef struct series {
    char *model;
    int64_t version;
    srv_protocol protocol;
    uint32_t hash;
    hist h[H_COUNT_];
    struct series *next; /* immutable once published */
} series;

struct srv_obs {
    _Atomic(series *) heads[NHEADS];
    _Atomic uint64_t codes[SRV_PROTO_COUNT_][NCODES];
    _Atomic uint64_t no_response[SRV_PROTO_COUNT_];
};

static _Atomic uint64_t span_counter;
static _Atomic bool span_seeded;

const char *keel__srv_protocol_name(srv_protocol p)
{
    return p == SRV_PROTO_GRPC ? "grpc" : "http";
}

srv_obs *keel__srv_obs_create(void)
{
    srv_obs *o = calloc(1, sizeof(*o));
    uint64_t seed = 0;

    if (o == NULL)
        return NULL;
    if (!atomic_exchange(&span_seeded, true)) {
        struct timespec ts;
        if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed)) {
            clock_gettime(CLOCK_REALTIME, &ts);
            seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32);
        }
        atomic_store(&span_counter, seed);
    }
    return o;
}

void keel__srv_obs_destroy(srv_obs *o)
{
    if (o == NULL)
        return;
    for (size_t i = 0; i < NHEADS; i++) {
        series *sr = atomic_load(&o->heads[i]);
        while (sr != NULL) {
            series *next = sr->next;
            free(sr->model);
            free(sr);
            sr = next;
        }
    }
    free(o);
}

static uint32_t key_hash(const char *model, int64_t version, srv_protocol p)
{
    uint32_t h = 2166136261u; /* FNV-1a */

    for (const unsigned char *c = (const unsigned char *)model; *c != '\0'; c++)
        h = (h ^ *c) * 16777619u;
    h = (h ^ (uint32_t)(uint64_t)version) * 16777619u;
    return (h ^ (uint32_t)p) * 16777619u;
}

static series *chain_find(series *sr, uint32_t h, const char *model, int64_t version,
                          srv_protocol p)
{
    for (; sr != NULL; sr = sr->next) {
        if (sr->hash == h && sr->version == version && sr->protocol == p &&
            strcmp(sr->model, model) == 0)
            return sr;
    }
    return NULL;
}

/* The series of (model, version, p), created on first use; NULL on ENOMEM. */
static series *series_get(srv_obs *o, const char *model, int64_t version, srv_protocol p)
{
    uint32_t h = key_hash(model, version, p);
    _Atomic(series *) *head = &o->heads[h % NHEADS];
    series *first = atomic_load_explicit(head, memory_order_acquire);
    series *sr = chain_find(first, h, model, version, p);
    series *mine;

    if (sr != NULL)
        return sr;
    if ((mine = calloc(1, sizeof(*mine))) == NULL || (mine->model = strdup(model)) == NULL) {
        free(mine);
        return NULL;
    }
    mine->version = version;
    mine->protocol = p;
    mine->hash = h;
    for (;;) {
        mine->next = first;
        if (atomic_compare_exchange_weak_explicit(head, &first, mine, memory_order_release,
                                                  memory_order_acquire))
            return mine;
        /* Someone else inserted meanwhile (first now holds the new head): maybe ours. */
        if ((sr = chain_find(first, h, model, version, p)) != NULL) {
            free(mine->model);
            free(mine);
            return sr;
        }
    }
}

static void hist_observe(hist *hs, uint64_t ns)
{
    size_t i = 0;

    /* The first bucket whose bound is >= the value (Prometheus' le: less or equal). */
    while (i < NBOUNDS && ns > bounds_us[i] * 1000u)
        i++;
    atomic_fetch_add_explicit(&hs->buckets[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&hs->sum_ns, ns, memory_order_relaxed);
}

void keel__srv_obs_record(srv_obs *o, const srv_obs_event *ev)
{
    const keel_request_timing *t = &ev->timing;
    srv_protocol p = ev->protocol < SRV_PROTO_COUNT_ ? ev->protocol : SRV_PROTO_HTTP;
    series *sr;

    if (p == SRV_PROTO_GRPC && ev->status < 17) /* every gRPC call ends with a status; 0 = OK */
        atomic_fetch_add_explicit(&o->codes[p][ev->status], 1, memory_order_relaxed);
    else if (p != SRV_PROTO_GRPC && ev->status > 0 && ev->status < NCODES)
        atomic_fetch_add_explicit(&o->codes[p][ev->status], 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&o->no_response[p], 1, memory_order_relaxed);
    if (t->complete_ns == 0 || ev->model == NULL)
        return;
#ifdef KEEL_BENCH_NO_HISTOGRAMS
    return; /* a benchmark build (CMake option): the A/B of the histograms' cost */
#endif
    if ((sr = series_get(o, ev->model, ev->version, p)) == NULL)
        return; /* out of memory: this one observation is lost, nothing else */
    hist_observe(&sr->h[H_REQUEST], ev->end_ns > ev->start_ns ? ev->end_ns - ev->start_ns : 0);
    {
        uint64_t left = t->dispatch_ns != 0 ? t->dispatch_ns : t->complete_ns;
        hist_observe(&sr->h[H_QUEUE], left > t->submit_ns ? left - t->submit_ns : 0);
    }
    if (t->output_start_ns != 0 && t->input_end_ns != 0)
        hist_observe(&sr->h[H_COMPUTE], t->output_start_ns - t->input_end_ns);
    if (t->preprocess_ns != 0)
        hist_observe(&sr->h[H_PREPROCESS], t->preprocess_ns);
}

/* ---------------------------------------------------------------- rendering */

static int series_cmp(const void *a, const void *b)
{
    const series *x = *(series *const *)a, *y = *(series *const *)b;
    int c = strcmp(x->model, y->model);

    if (c != 0)
        return c;
    if (x->version != y->version)
        return x->version < y->version ? -1 : 1;
    return (int)x->protocol - (int)y->protocol;
}

static void put_label(FILE *f, const char *s)
{
    for (; *s != '\0'; s++) {
        if (*s == '\\')
            fputs("\\\\", f);
        else if (*s == '"')
            fputs("\\\"", f);
        else if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

static void put_labels(FILE *f, const series *sr)
{
    fputs("model=\"", f);
    put_label(f, sr->model);
    if (sr->version >= 0)
        fprintf(f, "\",version=\"%" PRId64 "\",protocol=\"%s\"", sr->version,
                keel__srv_protocol_name(sr->protocol));
    else
        fprintf(f, "\",version=\"\",protocol=\"%s\"", keel__srv_protocol_name(sr->protocol));
}

static void render_hist(FILE *f, hist_kind k, series **all, size_t n)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s histogram\n", hist_info[k].name, hist_info[k].help,
            hist_info[k].name);
    for (size_t i = 0; i < n; i++) {
        const hist *hs = &all[i]->h[k];
        uint64_t cum = 0;
        for (size_t b = 0; b <= NBOUNDS; b++) {
            cum += atomic_load_explicit(&hs->buckets[b], memory_order_relaxed);
            fprintf(f, "%s_bucket{", hist_info[k].name);
            put_labels(f, all[i]);
            if (b < NBOUNDS)
                fprintf(f, ",le=\"%g\"} %" PRIu64 "\n", (double)bounds_us[b] / 1e6, cum);
            else
                fprintf(f, ",le=\"+Inf\"} %" PRIu64 "\n", cum);
        }
        fprintf(f, "%s_sum{", hist_info[k].name);
        put_labels(f, all[i]);
        fprintf(f, "} %.9f\n",
                (double)atomic_load_explicit(&hs->sum_ns, memory_order_relaxed) / 1e9);
        fprintf(f, "%s_count{", hist_info[k].name);
        put_labels(f, all[i]);
        fprintf(f, "} %" PRIu64 "\n", cum);
    }
}

char *keel__srv_obs_render(srv_obs *o)
{
    series **all = NULL;
    size_t n = 0, cap = 0;
    char *text = NULL;
    size_t len = 0;
    FILE *f;

    for (size_t i = 0; i < NHEADS; i++) {
        for (series *sr = atomic_load_explicit(&o->heads[i], memory_order_acquire); sr != NULL;
             sr = sr->next) {
            if (n == cap) {
                size_t ncap = cap == 0 ? 64 : cap * 2;
                series **na = realloc(all, ncap * sizeof(*na));
                if (na == NULL) {
                    free(all);
                    return NULL;
                }
                all = na;
                cap = ncap;
            }
            all[n++] = sr;
        }
    }
    if (n > 1)
        qsort(all, n, sizeof(*all), series_cmp);
    if ((f = open_memstream(&text, &len)) == NULL) {
        free(all);
        return NULL;
    }
    for (int k = 0; k < H_COUNT_; k++)
        render_hist(f, (hist_kind)k, all, n);
    fputs("# HELP keel_responses_total Responses sent, by protocol and status code (HTTP: the "
          "status, 0 when the connection ended before a response was sent; gRPC: the status "
          "name, per unary call and per stream message).\n"
          "# TYPE keel_responses_total counter\n",
          f);
    for (int p = 0; p < SRV_PROTO_COUNT_; p++) {
        uint64_t v = atomic_load_explicit(&o->no_response[p], memory_order_relaxed);
        if (v != 0)
            fprintf(f, "keel_responses_total{protocol=\"%s\",code=\"0\"} %" PRIu64 "\n",
                    keel__srv_protocol_name((srv_protocol)p), v);
        for (int c = p == SRV_PROTO_GRPC ? 0 : 1; c < (p == SRV_PROTO_GRPC ? 17 : NCODES); c++) {
            v = atomic_load_explicit(&o->codes[p][c], memory_order_relaxed);
            if (v == 0)
                continue;
            if (p == SRV_PROTO_GRPC)
                fprintf(f, "keel_responses_total{protocol=\"grpc\",code=\"%s\"} %" PRIu64 "\n",
                        keel__grpc_code_name(c), v);
            else
                fprintf(f, "keel_responses_total{protocol=\"%s\",code=\"%d\"} %" PRIu64 "\n",
                        keel__srv_protocol_name((srv_protocol)p), c, v);
        }
    }
    free(all);
    if (fclose(f) != 0) {
        free(text);
        return NULL;
    }
    return text;
}

/* ---------------------------------------------------------------- trace context */

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1; /* uppercase is invalid in traceparent */
}

/* n lowercase hex digits at s, not all zero. */
static bool hex_field(const char *s, size_t n, bool nonzero)
{
    bool any = false;

    for (size_t i = 0; i < n; i++) {
        int v = hexval(s[i]);
        if (v < 0)
            return false;
        any |= v != 0;
    }
    return any || !nonzero;
}

bool keel__srv_traceparent_parse(const char *v, srv_tracectx *out)
{
    /* 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>: 55 characters. */
    size_t len;

    if (v == NULL)
        return false;
    while (*v == ' ' || *v == '\t')
        v++;
    len = strnlen(v, 512);
    while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    if (len < 55 || !hex_field(v, 2, false) || (v[0] == 'f' && v[1] == 'f'))
        return false;
    if (v[2] != '-' || v[35] != '-' || v[52] != '-')
        return false;
    if (!hex_field(v + 3, 32, true) || !hex_field(v + 36, 16, true) || !hex_field(v + 53, 2, false))
        return false;
    if (v[0] == '0' && v[1] == '0') {
        if (len != 55)
            return false;
    } else if (len > 55 && v[55] != '-') {
        return false; /* a later version may append fields, after a '-' */
    }
    memcpy(out->trace_id, v + 3, 32);
    out->trace_id[32] = '\0';
    memcpy(out->parent_id, v + 36, 16);
    out->parent_id[16] = '\0';
    out->flags = (uint8_t)(hexval(v[53]) * 16 + hexval(v[54]));
    return true;
}

void keel__srv_span_id(char out[17])
{
    uint64_t z;

    do {
        z = atomic_fetch_add_explicit(&span_counter, 0x9e3779b97f4a7c15ull, memory_order_relaxed);
        z += 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
    } while (z == 0);
    snprintf(out, 17, "%016" PRIx64, z);
}
