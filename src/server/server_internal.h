/*
 * server_internal.h: the structures shared by the files of `keel serve` (src/server/).
 *
 * DESIGN
 * One keel_srv per process, created and destroyed by keel_server_run() on the main thread.
 * Files and the threads that run their code:
 *   server.c          lifecycle, signals, the libmicrohttpd (MHD) access handler and the
 *                     per-connection state machine, infer, the hang-up watcher thread
 *   server_routes.c   the synchronous endpoints (metadata, health, stats, index, config);
 *                     MHD threads
 *   server_control.c  the model-control thread: API load/unload jobs (explicit mode); poll
 *                     mode is libkeel's lifecycle thread
 *   metrics.c         GET /metrics, Prometheus text; MHD threads
 *   server_log.c      logfmt lines on stderr; any thread
 *   server_opts.c     `keel serve` options; main thread
 *   serving.c         the protocol-independent path: admission, submit, outcomes; any thread
 *   grpc_server.c     the gRPC front end (its own completion-queue thread, see its DESIGN)
 *   grpc_codec.c      protobuf <-> keel_request, JSON answers -> protobuf; pure functions
 *
 * Locks (none is ever held while calling libkeel or libmicrohttpd, and they never nest):
 *   s->mu      connection states from SUBMITTED on, the parked list, s->pending, s->draining,
 *              the watcher's flags. Held for pointer and counter updates (and one poll(2)
 *              with a zero timeout in the watcher).
 *   s->ctl_mu  the control thread's job queue and stop flag.
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

#include "keel/keel.h"
#include "server.h"
#include "serving.h"
#include "v2codec.h"

/* ---------------------------------------------------------------- connections */

typedef enum srv_route {
    ROUTE_UNKNOWN = 0,
    ROUTE_SERVER_META,  /* GET /v2 */
    ROUTE_LIVE,         /* GET /v2/health/live */
    ROUTE_READY,        /* GET /v2/health/ready */
    ROUTE_MODEL_META,   /* GET /v2/models/{m}[/versions/{v}] */
    ROUTE_MODEL_READY,  /* GET .../ready */
    ROUTE_MODEL_CONFIG, /* GET .../config */
    ROUTE_MODEL_STATS,  /* GET .../stats */
    ROUTE_ALL_STATS,    /* GET /v2/models/stats */
    ROUTE_INFER,        /* POST .../infer */
    ROUTE_REPO_INDEX,   /* POST /v2/repository/index */
    ROUTE_REPO_LOAD,    /* POST /v2/repository/models/{m}/load */
    ROUTE_REPO_UNLOAD,  /* POST /v2/repository/models/{m}/unload */
    ROUTE_METRICS,      /* GET /metrics */
} srv_route;

/* The per-connection state machine; server.c's DESIGN draws it. */
typedef enum srv_conn_state {
    CONN_READING = 0, /* headers seen, body being buffered (MHD thread only) */
    CONN_SUBMITTED,   /* handed to keel or to the control thread; not yet suspended */
    CONN_SUSPENDING,  /* the handler is calling MHD_suspend_connection */
    CONN_PARKED,      /* suspended and listed in s->parked, waiting for its completion */
    CONN_RESUMED,     /* completion recorded and resume requested; MHD will call again */
    CONN_ANSWERED,    /* a response is queued; only MHD's completed callback remains */
} srv_conn_state;

typedef struct keel_srv keel_srv;
typedef struct srv_conn srv_conn;

struct srv_conn {
    keel_srv *s;
    struct MHD_Connection *mhd;
    srv_route route;
    unsigned route_status; /* ROUTE_UNKNOWN: the status to answer, with route_msg */
    char route_msg[256];
    bool method_ok;       /* the method is one the route accepts */
    const char *allow;    /* the route's Allow header (static) */
    char *model;          /* owned; NULL for routes without a model */
    int64_t version;      /* -1 = none in the URL */
    uint64_t start_ns;    /* first handler call, CLOCK_MONOTONIC */
    unsigned http_status; /* what was queued, for the access log */
    bool counted;         /* counted in s->http_open */

    /* Body buffering (MHD thread only). */
    char *body;
    size_t body_len, body_cap;
    size_t body_limit;  /* bytes kept for this route (0: the body is discarded) */
    uint64_t discarded; /* bytes over the limit thrown away */
    bool too_large;

    /* Under s->mu from CONN_SUBMITTED on (before that, MHD thread only). */
    srv_conn_state state;
    bool done;             /* the completion was recorded */
    bool pinned;           /* the watcher is cancelling this request: it owns the resume */
    bool cancelled;        /* keel_request_cancel was called (once per request) */
    bool cancel_shutdown;  /* ... because of the exit timeout, not a hang-up */
    srv_conn *prev, *next; /* s->parked list while CONN_PARKED */
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
    char *ctl_msg; /* owned; NULL = empty 200 body */
    /* Set by a front end other than HTTP's (gRPC): called instead of keel__srv_conn_complete
     * when the job is done, with no lock held; it owns c from then on. */
    void (*job_done)(srv_conn *c, keel_err status);
    void *job_user;
};

/* ---------------------------------------------------------------- the server */

struct keel_srv {
    const keel_server_opts *opts;
    keel_runtime *rt;
    struct MHD_Daemon *mhd;
    uint64_t start_unix_ms;

    pthread_mutex_t mu;
    pthread_cond_t idle_cv;  /* broadcast when pending drops to 0 */
    pthread_cond_t watch_cv; /* wakes the watcher: a conn was parked, cancel_all, stop */
    srv_conn *parked;        /* CONN_PARKED connections */
    size_t nparked;
    int64_t pending; /* connections SUBMITTED, SUSPENDING or PARKED */
    bool draining;   /* new infer/load/unload answered 503 */
    bool cancel_all; /* shutdown: the watcher cancels every parked infer */
    bool watch_stop;
    pthread_t watcher;
    bool watcher_started;
    struct pollfd *watch_pfd; /* the watcher's scratch arrays, watch_cap entries each */
    srv_conn **watch_conns;
    size_t watch_cap;

    _Atomic bool not_ready;           /* set at the first signal: readiness answers 503 */
    _Atomic bool listening;           /* the daemon is up (MHD's messages become debug) */
    _Atomic bool conn_close;          /* shutting down: every response says Connection: close */
    _Atomic int64_t http_open;        /* requests whose headers arrived and that are not answered */
    MHD_socket listen_fd;             /* after MHD_quiesce_daemon: ours to close after the stop */
    _Atomic uint64_t canceled_hangup; /* requests cancelled because the client left */
    _Atomic uint64_t canceled_shutdown; /* requests cancelled at the drain deadline */
    _Atomic uint64_t http_responses[6]; /* by status class: [1] 1xx ... [5] 5xx */

    /* gRPC (grpc_server.c); NULL with --grpc-port -1. */
    struct srv_grpc *grpc;
    _Atomic uint64_t grpc_status[17];  /* calls answered, by gRPC status code (0 OK ... 16) */
    _Atomic uint64_t grpc_canceled[2]; /* [0] by the client (cancel, deadline), [1] shutdown */

    /* The model-control thread (server_control.c). */
    pthread_mutex_t ctl_mu;
    pthread_cond_t ctl_cv;
    srv_conn *jobs_head, *jobs_tail;
    bool ctl_stop;
    pthread_t ctl;
    bool ctl_started;
};

/* ---------------------------------------------------------------- replies */

/* A response to queue: body is malloc'd (free()) or NULL for an empty body. */
typedef struct srv_reply {
    unsigned status;
    char *body;
    size_t len;
    const char *ctype; /* static; NULL = none */
    const char *allow; /* static; NULL = none */
} srv_reply;

/* Sets r to {"error": msg} with the given status. Never fails: on ENOMEM the body is NULL
 * and the sender substitutes a static message. */
void keel__srv_reply_error(srv_reply *r, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Serialises root (consumed) as the body of a 200 (or status) reply; 500 on failure. */
void keel__srv_reply_json(srv_reply *r, unsigned status, void *root /* json_t * */);
/* Sets an empty-bodied reply. */
void keel__srv_reply_empty(srv_reply *r, unsigned status);

/* The HTTP status for a keel error (see docs/OPERATIONS.md). */
unsigned keel__srv_http_status(keel_err err);

/* Fills r with the right 404/503 for a model (version -1 = any) that is not served: unknown,
 * unknown version, not loaded, loading or failed. */
void keel__srv_reply_not_served(keel_srv *s, const char *model, int64_t version, srv_reply *r);

/* server_routes.c: synchronous endpoints. body may be NULL. */
void keel__srv_route_sync(keel_srv *s, srv_conn *c, srv_reply *r);

/* metrics.c: the Prometheus exposition text; malloc'd, NULL on ENOMEM. */
char *keel__srv_metrics_render(keel_srv *s, size_t *len);

/* server.c: records the completion of a submitted connection (infer or control job) and
 * resumes it. Called exactly once per submit, from any thread, with no lock held. */
void keel__srv_conn_complete(srv_conn *c, keel_err status);

/* server_control.c */
keel_err keel__srv_control_start(keel_srv *s);
/* Stops the control thread: jobs not started are answered 503; waits for the current one. */
void keel__srv_control_stop(keel_srv *s);
/* Queues c (state SUBMITTED); false if the thread is stopping (c untouched). */
bool keel__srv_control_enqueue(keel_srv *s, srv_conn *c);
/* Poll mode: records the repository's signatures before the runtime loads it. */

/* ---------------------------------------------------------------- logging (server_log.c) */

void keel__srv_log_init(keel_log_level level);
bool keel__srv_log_on(keel_log_level level);
/* Logs one logfmt line: ts, level, msg, then key/value string pairs ending with NULL. Values
 * are quoted when they need it. */
void keel__srv_log(keel_log_level level, const char *msg, ...);
/* A keel_log_fn for the runtime (component=keel). */
void keel__srv_log_keel(void *user, keel_log_level level, const char *msg);
/* Formats a value into buf (for numbers in keel__srv_log calls). Returns buf. */
const char *keel__srv_fmt(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
