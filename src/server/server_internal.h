/*
 * server_internal.h: the structures shared by the files of `keel serve` (src/server/), and
 * their order.
 *
 * DESIGN
 * One keel_srv per process, created and destroyed by keel_server_run() on the main thread.
 * Files, top to bottom: each calls only files below it (checked by scripts/check-layers.py
 * from the object files' symbol tables), and the threads that run their code:
 *   server_opts.c     `keel serve` options, and keel_server_main (parse, then run); main
 *                     thread
 *   server.c          lifecycle, signals, the libmicrohttpd (MHD) access handler and the
 *                     per-connection state machine, infer, the hang-up watcher thread
 *   server_control.c  the job threads: model control (API load/unload jobs, explicit mode;
 *                     poll mode is libkeel's lifecycle thread) and scrapes (GET /metrics is
 *                     rendered there, never on an HTTP loop). A job is answered through the
 *                     completion server.c hands down (s->ctl_done), not by calling server.c.
 *   server_routes.c   the synchronous endpoints (metadata, health, stats, index, config);
 *                     MHD threads
 *   metrics.c         GET /metrics, Prometheus text; the scrape thread
 *   reply.c           replies before they are sent, keel_err -> HTTP status, the 404/503 of a
 *                     model that is not served; any thread
 *   sdnotify.c        systemd notifications (READY, STOPPING, STATUS) and the watchdog
 *                     thread; main thread
 *   observe.c         latency histograms, responses by code, trace context: fed once per
 *                     request (protocol-neutral) through serving.c's keel__srv_observe, from
 *                     MHD's request-completed callback and from grpc_server.c
 *   access_log.c      --access-log: line formats, buffers and the writer thread
 *   trace.c           Triton's trace extension: settings API and trace files
 *   v2codec.c, fastfloat.c  the KServe V2 JSON codec; any thread
 *   server_log.c      logfmt lines on stderr; any thread
 *   serving.c         the protocol-independent path: admission, submit, outcomes, and the
 *                     one observation of a finished request (keel__srv_observe); any thread
 *   grpc_server.c     the gRPC front end (its own completion-queue thread, see its DESIGN)
 *   grpc_codec.c      protobuf <-> keel_request, JSON answers -> protobuf; pure functions
 * Each file has its own header (reply.h, server_routes.h, server_control.h, metrics.h,
 * server_log.h, v2codec.h); this one holds only the structures they share.
 *
 * Locks (none is ever held while calling libkeel or libmicrohttpd, and they never nest):
 *   s->mu      connection states from SUBMITTED on, the parked list, the watcher's flags,
 *              and the drain's wait on idle_cv (s->pending and s->draining are atomics).
 *              Held for pointer and counter updates (and one poll(2) with a zero timeout in
 *              the watcher).
 *   q->mu      a job thread's queue and stop flag (s->ctlq, s->scrapeq).
 * Everything else in keel_srv is written before the threads start and read-only after, or
 * atomic.
 *
 * Lifetimes: keel_srv outlives every thread and the MHD daemon; the runtime outlives the
 * daemon (MHD_stop_daemon runs before keel_runtime_destroy), so a handler may use s->rt
 * without further checks. An srv_conn is owned by MHD's per-request context pointer from
 * the first handler call until MHD's request-completed callback frees it (see server.c).
 */
#ifndef KEEL_SERVER_SERVER_INTERNAL_H
#define KEEL_SERVER_SERVER_INTERNAL_H

#include <microhttpd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "access_log.h"
#include "edge.h"
#include "http_loop.h"
#include "keel/keel.h"
#include "observe.h"
#include "restrict.h"
#include "server.h"
#include "serving.h"
#include "v2codec.h"

/* ---------------------------------------------------------------- connections */

typedef enum srv_route {
    ROUTE_UNKNOWN = 0,
    ROUTE_SERVER_META,   /* GET /v2 */
    ROUTE_LIVE,          /* GET /v2/health/live */
    ROUTE_READY,         /* GET /v2/health/ready */
    ROUTE_MODEL_META,    /* GET /v2/models/{m}[/versions/{v}] */
    ROUTE_MODEL_READY,   /* GET .../ready */
    ROUTE_MODEL_CONFIG,  /* GET .../config */
    ROUTE_MODEL_STATS,   /* GET .../stats */
    ROUTE_ALL_STATS,     /* GET /v2/models/stats */
    ROUTE_INFER,         /* POST .../infer */
    ROUTE_REPO_INDEX,    /* POST /v2/repository/index */
    ROUTE_REPO_LOAD,     /* POST /v2/repository/models/{m}/load */
    ROUTE_REPO_UNLOAD,   /* POST /v2/repository/models/{m}/unload */
    ROUTE_METRICS,       /* GET /metrics */
    ROUTE_TRACE_SETTING, /* GET/POST /v2[/models/{m}]/trace/setting */
} srv_route;

/* The per-connection state machine; server.c's DESIGN draws it. */
typedef enum srv_conn_state {
    CONN_READING = 0, /* headers seen, body being buffered (MHD thread only) */
    CONN_SUBMITTED,   /* handed to keel or to the control thread; not yet suspended */
    CONN_GATHERED,    /* submitted in this loop turn, not suspended; settled after the turn */
    CONN_SUSPENDING,  /* the handler is calling MHD_suspend_connection */
    CONN_PARKED,      /* suspended and listed in s->parked, waiting for its completion */
    CONN_RESUMED,     /* completion recorded and resume requested; MHD will call again */
    CONN_ANSWERED,    /* a response is queued; only MHD's completed callback remains */
    CONN_ORPHANED,    /* GATHERED, and MHD completed it (the client left): still in the loop
                         thread's list, its request cancelled; c->mhd is gone */
    CONN_ABANDONED,   /* ORPHANED, settled by after_turn before its completion ran: the
                         completion frees it */
} srv_conn_state;

typedef struct keel_srv keel_srv;
typedef struct srv_conn srv_conn;

struct srv_conn {
    keel_srv *s;
    struct MHD_Connection *mhd;
    srv_http_loop *loop; /* the HTTP loop that serves it (http_loop.c) */
    bool begun; /* the handler's first call ran (the conn is made by the URI log callback) */
    /* The request target as received (server_guard.c): its length up to the first NUL, and
     * the verdict of keel__edge_check_target (0, or 400 with target_msg). */
    size_t raw_target_len;
    unsigned target_status;
    char target_msg[160];
    srv_route route;
    unsigned route_status; /* ROUTE_UNKNOWN: the status to answer, with route_msg */
    char route_msg[256];
    bool method_ok;       /* the method is one the route accepts */
    const char *allow;    /* the route's Allow header (static) */
    char *model;          /* model_small or owned; NULL for routes without a model */
    char model_small[64]; /* the model's name when it fits */
    int64_t version;      /* -1 = none in the URL */
    uint64_t start_ns;    /* first handler call, CLOCK_MONOTONIC */
    unsigned http_status; /* what was queued, for the access log */
    bool counted;         /* counted in s->http_open */
    const char *method;   /* static: "GET", "HEAD", "POST" or "OTHER" */
    uint64_t bytes_out;   /* response body bytes queued */
    bool traced;          /* a valid traceparent came: echo it with span_id */
    /* Inference-Header-Content-Length, read in the first call: hlen_ok false if malformed,
     * else hlen its value or (size_t)-1 if absent. */
    bool hlen_ok;
    size_t hlen;
    srv_tracectx trace;
    char span_id[17]; /* keel's span for this request, when traced */
    /* CLOCK_MONOTONIC steps for Triton traces (0 = not reached); request_end_ns is written
     * by the completion before it records done under s->mu. Read only when some trace scope
     * was on as the request arrived (stepped): four clock reads per request less otherwise,
     * and a request that arrived before tracing was turned on is never traced. */
    bool stepped;
    uint64_t recv_end_ns, request_start_ns, request_end_ns, send_start_ns;

    /* Body buffering (MHD thread only). body points body_pad bytes into its allocation
     * (free body - body_pad): the pad puts a binary-extension body's binary section on a
     * 16-byte boundary, so that its tensors can be read in place (server.c's infer_start). */
    char *body;
    size_t body_pad;
    bool body_pooled; /* its allocation is a LOOP_BUF block (server.c: loop_buf_take) */
    size_t body_len, body_cap;
    size_t body_limit;  /* bytes kept for this route (0: the body is discarded) */
    size_t body_expect; /* Content-Length (within the limit), 0 if unknown or none */
    uint64_t discarded; /* bytes over the limit thrown away */
    bool too_large;

    /* Under s->mu from CONN_SUBMITTED on (before that, MHD thread only). */
    srv_conn_state state;
    bool done;             /* the completion was recorded */
    bool pinned;           /* the watcher is cancelling this request: it owns the resume */
    bool cancelled;        /* keel_request_cancel was called (once per request) */
    bool cancel_shutdown;  /* ... because of the exit timeout, not a hang-up */
    srv_conn *prev, *next; /* s->parked list while CONN_PARKED */
    srv_conn *gnext;       /* the loop thread's list while GATHERED or ORPHANED (server.c) */
    int fd;                /* the client socket, read only while CONN_PARKED */

    /* Infer: the request (destroyed only in the completed callback) and its outcome. */
    keel_request *req;
    keel_v2_request_info info;
    bool have_info;
    keel_err status; /* written under s->mu by the completion */

    /* Model control: the job and its outcome (written by the control thread before it
     * completes the connection). */
    srv_conn *job_next;
    unsigned ctl_status;
    char *ctl_msg;  /* owned; NULL = empty 200 body */
    char *ctl_body; /* owned: a scrape's rendered text (ctl_status 200), else NULL */
    size_t ctl_body_len;
    /* Set by a front end other than HTTP's (gRPC): called instead of keel__srv_conn_complete
     * when the job is done, with no lock held; it owns c from then on. */
    void (*job_done)(srv_conn *c, keel_err status);
    void *job_user;
};

/* ---------------------------------------------------------------- the server */

/* One job thread and its FIFO (server_control.c). mu protects head, tail, stop and started;
 * it is never held while a job runs or a connection is completed. */
typedef struct srv_jobq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    srv_conn *head, *tail;
    bool stop;
    bool started;
    pthread_t thread;
    keel_srv *s;
    const char *name; /* "control" or "scrape", for the logs */
} srv_jobq;

struct keel_srv {
    const keel_server_opts *opts;
    keel_runtime *rt;
    srv_http *http;     /* the listening socket and the HTTP loops (http_loop.c) */
    keel_redact redact; /* repository paths removed from error replies (server_guard.c) */
    uint64_t start_unix_ms;
    unsigned submit_flags;    /* keel_infer_submit_ex's, from --infer-on-io-thread (HTTP, gRPC) */
    unsigned io_submit_flags; /* the same plus KEEL_SUBMIT_GATHER (HTTP loops, gRPC's CQ) */

    pthread_mutex_t mu;
    pthread_cond_t idle_cv;  /* broadcast when pending drops to 0 */
    pthread_cond_t watch_cv; /* wakes the watcher: a conn was parked, cancel_all, stop */
    srv_conn *parked;        /* CONN_PARKED connections */
    size_t nparked;
    /* Admission without s->mu (serving.c's keel__srv_admit/done): both sequentially
     * consistent, so that an admit that missed draining is counted by the drain's wait. */
    _Atomic int64_t pending; /* connections SUBMITTED, SUSPENDING or PARKED */
    atomic_bool draining;    /* new infer/load/unload answered 503 */
    bool cancel_all;         /* shutdown: the watcher cancels every parked infer */
    bool watch_stop;
    bool watch_idle; /* the watcher waits for a first parked connection (no timeout) */
    pthread_t watcher;
    bool watcher_started;
    struct pollfd *watch_pfd; /* the watcher's scratch arrays, watch_cap entries each */
    srv_conn **watch_conns;
    size_t watch_cap;

    _Atomic bool not_ready;           /* set at the first signal: readiness answers 503 */
    _Atomic bool listening;           /* the daemon is up (MHD's messages become debug) */
    _Atomic bool conn_close;          /* shutting down: every response says Connection: close */
    _Atomic int64_t http_open;        /* requests whose headers arrived and that are not answered */
    _Atomic uint64_t canceled_hangup; /* requests cancelled because the client left */
    _Atomic uint64_t canceled_shutdown; /* requests cancelled at the drain deadline */
    _Atomic uint64_t http_responses[6]; /* by status class: [1] 1xx ... [5] 5xx */

    /* Histograms, responses by code (observe.c) and the access log (NULL = off); created
     * before the daemon starts, destroyed after it stopped. */
    srv_obs *obs;
    srv_alog *alog;
    struct srv_trace *trace; /* trace.c: Triton's trace extension */
    /* gRPC (grpc_server.c); NULL with --grpc-port -1. */
    struct srv_grpc *grpc;
    _Atomic uint64_t grpc_status[17];  /* calls answered, by gRPC status code (0 OK ... 16) */
    _Atomic uint64_t grpc_canceled[2]; /* [0] by the client (cancel, deadline), [1] shutdown */

    /* The job threads (server_control.c): model control (explicit mode: API loads and
     * unloads) and scrapes (GET /metrics, rendered off the HTTP loops). */
    srv_jobq ctlq, scrapeq;
    /* server.c's completion, handed down at keel__srv_jobq_start: a job thread answers a
     * job through it, so server_control.c never calls server.c by name. */
    void (*ctl_done)(srv_conn *c, keel_err status);
};

/* serving.c: feeds one finished request to the histograms, traces and access log. Every
 * protocol front end calls it exactly once per request (gRPC: per unary call and per stream
 * message), from any thread, no lock held. */
void keel__srv_observe(keel_srv *s, const srv_obs_event *ev);

#endif
