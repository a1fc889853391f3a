/*
 * perf_internal.h: the pieces shared by `keel perf` (perf.c) and `keel soak` (soak.c), all
 * implemented in perf_core.c.
 *
 * DESIGN
 * - perf_hist: a latency histogram with fixed relative precision (log-linear buckets in the
 *   manner of HdrHistogram: values below 2^11 exactly, above that 1024 buckets per power of
 *   two, so every recorded value is known within 0.1 %). Written here because Debian has no C
 *   package of HdrHistogram. Not thread-safe; each load loop owns its own.
 * - perf_http_parse: a stateless HTTP/1.1 response framer (status, Content-Length, chunked,
 *   Connection: close). It is given the whole buffer each time and says whether a complete
 *   response is in it; responses here are small, so re-parsing the head is cheap.
 * - perf_client: one blocking keep-alive HTTP connection with timeouts, for the control
 *   traffic (model metadata, repository load/unload, /metrics scrapes). One thread each.
 * - perf_load_run: the load generator. One thread, one epoll set, non-blocking keep-alive
 *   connections, each with at most one request in flight (no pipelining, like wrk and
 *   perf_analyzer). Closed loop: `concurrency` connections each send the next request as soon
 *   as the previous answer arrived. Open loop: request k is due at t0 + k / rate whether or not
 *   earlier ones were answered; a due request waits for an idle connection (opening new ones
 *   up to max_connections), and its latency is measured from its due time, so a stalled
 *   server cannot hide its stall by slowing the generator down (coordinated omission).
 *   The only cross-thread input is the optional stop flag (an atomic), which soak's swap
 *   thread sets when it is done.
 */
#ifndef KEEL_CLI_PERF_INTERNAL_H
#define KEEL_CLI_PERF_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/types.h>

enum { PERF_EXIT_OK = 0, PERF_EXIT_RUNTIME = 1, PERF_EXIT_USAGE = 2, PERF_EXIT_VERDICT = 3 };

/* ---------------------------------------------------------------- histogram */

#define PERF_HIST_SUB_BITS 11
#define PERF_HIST_HALF (1u << (PERF_HIST_SUB_BITS - 1))
#define PERF_HIST_BUCKETS ((64 - PERF_HIST_SUB_BITS + 2) * PERF_HIST_HALF)

typedef struct perf_hist {
    uint64_t *counts; /* PERF_HIST_BUCKETS */
    uint64_t total, min, max;
    double sum;
} perf_hist;

bool perf_hist_init(perf_hist *h);
void perf_hist_fini(perf_hist *h);
void perf_hist_reset(perf_hist *h);
void perf_hist_record(perf_hist *h, uint64_t v);
void perf_hist_merge(perf_hist *into, const perf_hist *from);
/* The smallest recorded value v such that at least q (0..1] of all values are <= v, within the
 * histogram's precision (never above the largest recorded value); 0 if nothing was recorded. */
uint64_t perf_hist_quantile(const perf_hist *h, double q);
/* Exposed for the unit test: bucket of a value and the lowest value of a bucket. */
size_t perf_hist_index(uint64_t v);
uint64_t perf_hist_lowest(size_t idx);

/* ---------------------------------------------------------------- HTTP framing */

typedef struct perf_http_resp {
    int status;
    size_t body_off; /* offset of the body (content-length) or of the first chunk header */
    size_t body_len; /* content-length bodies: its length; chunked: the decoded length */
    bool chunked;
    bool close;       /* "Connection: close" or HTTP/1.0 without keep-alive */
    bool until_close; /* neither length nor chunked: the body ends when the peer closes */
} perf_http_resp;

/* Returns the length of the complete response at the start of buf (> 0), 0 if more bytes are
 * needed, or -1 if the bytes are not an HTTP/1.x response. */
ssize_t perf_http_parse(const char *buf, size_t len, perf_http_resp *r);

/* ---------------------------------------------------------------- target, blocking client */

typedef struct perf_target {
    char host[256];
    char port[16];
    struct sockaddr_storage addr;
    socklen_t addrlen;
} perf_target;

/* Parses "HOST:PORT", "http://HOST:PORT[/]" or "[V6]:PORT" and resolves it. errbuf gets why. */
bool perf_target_parse(const char *url, perf_target *t, char *errbuf, size_t errlen);
/* A non-blocking (nonblock) or blocking TCP socket connecting to t, TCP_NODELAY set;
 * -1 with errno on failure. A non-blocking connect may still be in progress. */
int perf_target_connect(const perf_target *t, bool nonblock);

typedef struct perf_client {
    const perf_target *t;
    int fd;
    char *buf;
    size_t len, cap;
} perf_client;

void perf_client_init(perf_client *c, const perf_target *t);
void perf_client_fini(perf_client *c);
/* One request; on success *status is the HTTP status and *body (owned by c, valid until the
 * next call, NUL-terminated) its decoded body. Reconnects when needed. Returns false with
 * errbuf filled on a transport error or timeout. */
bool perf_client_request(perf_client *c, const char *method, const char *path,
                         const char *content_type, const char *body, size_t body_len,
                         double timeout_s, int *status, const char **resp_body, size_t *resp_len,
                         char *errbuf, size_t errlen);

/* ---------------------------------------------------------------- request bodies */

typedef struct perf_input_spec {
    char name[128];
    char datatype[16];
    int64_t dims[16]; /* per request, the batch dimension included if the model batches */
    size_t ndims;
} perf_input_spec;

typedef struct perf_workload {
    perf_target target;
    char *model; /* NULL with a static endpoint */
    char *version;
    char *endpoint; /* GET this path instead of inferring (a static-reply baseline) */
    unsigned batch;
    bool binary; /* Triton's binary tensor extension instead of JSON data arrays */
    perf_input_spec inputs[8];
    size_t ninputs;
    /* Pre-built HTTP requests (head + body), used in turn. */
    char **reqs;
    size_t *req_lens;
    size_t nreqs;
} perf_workload;

typedef struct perf_data_opts {
    const char *input_data; /* "random" (default), "zero", or a file of rows */
    uint64_t seed;
    size_t variants; /* distinct request bodies to build (random data) */
} perf_data_opts;

/* Fills w->inputs from the model's metadata unless ninputs > 0 already, then builds the
 * requests. Returns false with errbuf filled. */
bool perf_workload_prepare(perf_workload *w, const perf_data_opts *d, char *errbuf, size_t errlen);
void perf_workload_fini(perf_workload *w);
/* Parses NAME:DATATYPE:D1xD2x... (per-request shape) into spec. */
bool perf_input_spec_parse(const char *s, perf_input_spec *spec);

/* ---------------------------------------------------------------- the load loop */

enum {
    PERF_TERR_CONNECT,  /* connect failed */
    PERF_TERR_RESET,    /* the connection broke (reset, closed) with a request in flight */
    PERF_TERR_TIMEOUT,  /* no complete answer within the request timeout */
    PERF_TERR_PROTOCOL, /* the answer was not HTTP */
    PERF_TERR_COUNT_
};
const char *perf_terr_name(int kind);

#define PERF_MAX_STATUS 600
#define PERF_FAILURE_NOTES 8

typedef struct perf_result {
    perf_hist hist;     /* latency of successful (2xx) measured requests, in ns */
    double window_s;    /* measured window */
    uint64_t completed; /* answers (any status) received in the window */
    uint64_t ok;        /* 2xx answers to measured requests */
    uint64_t failed;    /* non-2xx answers plus transport errors of measured requests */
    uint64_t status[PERF_MAX_STATUS]; /* non-2xx answers by status */
    uint64_t terr[PERF_TERR_COUNT_];
    uint64_t unsent;    /* open loop: requests due in the window that were never sent */
    uint64_t max_conns; /* connections opened at most at once */
    double cpu_s;       /* CPU time (user + system) of the load loop's thread, whole run */
    double elapsed_s;   /* wall time of the whole run, warm-up and drain included */
    char notes[PERF_FAILURE_NOTES][200]; /* the first distinct failures, named */
    size_t nnotes;
} perf_result;

typedef struct perf_load_opts {
    unsigned concurrency;     /* closed loop: requests in flight */
    double rate;              /* > 0: open loop at this many requests per second */
    unsigned max_connections; /* open loop: connection pool bound */
    double warmup_s;
    double duration_s;       /* measured seconds; 0 = until *stop */
    const atomic_bool *stop; /* may be NULL */
    double timeout_s;        /* per request */
    bool progress;           /* a progress line on stderr (only if it is a terminal) */
    const char *label;       /* for the progress line */
} perf_load_opts;

bool perf_result_init(perf_result *r);
void perf_result_fini(perf_result *r);
/* Runs the load on w; fills *r (initialised by the caller). Returns false (errbuf) only if the
 * loop itself could not run (no epoll, no memory); request failures are counted in *r. */
bool perf_load_run(const perf_workload *w, const perf_load_opts *o, perf_result *r, char *errbuf,
                   size_t errlen);
/* "404:12;reset:1" (or "" if none) into buf. */
void perf_result_errors(const perf_result *r, char *buf, size_t len);

/* ---------------------------------------------------------------- misc */

double perf_now(void); /* CLOCK_MONOTONIC seconds */
bool perf_parse_double(const char *s, double min, double max, double *out);
bool perf_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out);

int keel_perf_main(int argc, char **argv);
int keel_soak_main(int argc, char **argv);

#endif
