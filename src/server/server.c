/*
 * server.c: `keel serve`: lifecycle, signals, the HTTP access handler, infer, and the
 * hang-up watcher.
 *
 * DESIGN
 * HTTP runs on libmicrohttpd (MHD) in keel's own event loops (http_loop.c: one daemon per
 * --http-threads in MHD's external epoll mode) with MHD_ALLOW_SUSPEND_RESUME, so no HTTP
 * thread ever waits for an inference or a model load: the handler submits the work, suspends
 * the connection, and the completion resumes it (and wakes the loop). (MHD's internal
 * epoll thread pool is not used: in our tests of 0.9.75 a worker that had answered a request
 * early, 413 before the body, stopped picking up its new connections until its next timeout.)
 * A request of a batching model is not suspended in its handler: it stays GATHERED until the
 * end of the loop turn, when keel_runtime_run_gathered has run the turn's batch on this
 * thread; after_turn then marks it RESUMED (answered in the next turn, MHD still polls it)
 * or suspends it like any other (its batch went to an inference thread).
 *
 * Per-connection state machine (srv_conn, one per HTTP request; a keep-alive connection
 * gets a fresh, zeroed one for each request, from the loop thread's cache of freed ones:
 * conn_alloc, conn_release):
 *
 *   first handler call (headers in): route, method check, Content-Length over the limit ->
 *   413 at once. State READING.
 *     READING --body chunks--> READING (buffered up to the route's limit, the rest
 *                                       discarded and the request answered 413)
 *     READING --a piece that leaves a Content-Length body incomplete, the client gone
 *        (client_left)--> MHD closes it (the handler returns MHD_NO), then freed as below
 *     READING --final call, synchronous endpoint or error--> ANSWERED
 *     READING --final call, infer/load/unload: pending++, submit ok--> SUBMITTED
 *     SUBMITTED --infer with KEEL_SUBMIT_GATHER, not done--> GATHERED (the loop thread's
 *        tl_gathered list); after_turn: done --> RESUMED (pending--; the handler answers
 *        in the next turn), else --> SUSPENDING as below
 *     GATHERED --MHD request-completed callback--> ORPHANED: the client left while the
 *        turn's extra passes ran MHD (http_loop.c) and MHD closed the connection; it frees
 *        its MHD_Connection after the callback, so c->mhd is dropped. The request is
 *        cancelled (counted as a client-gone cancel) and the connection stays in tl_gathered;
 *        after_turn: done --> freed (observed, pending--), else --> ABANDONED
 *     ABANDONED --completion--> freed by the completion (observed, pending--)
 *     SUBMITTED --completion already recorded--> RESUMED (never suspended; answered now)
 *     SUBMITTED --MHD_suspend_connection--> SUSPENDING --> PARKED (listed in s->parked)
 *        (a completion that lands while SUSPENDING is noticed right after the suspend,
 *         and the handler resumes the connection itself)
 *     PARKED --completion, not pinned--> RESUMED: unlisted, MHD_resume_connection,
 *        then pending-- (in that order: pending == 0 means nothing is suspended)
 *     PARKED --watcher pins it, keel_request_cancel, completion, unpin--> RESUMED (the
 *        watcher resumes it: the pin keeps the request alive while it is being cancelled)
 *     RESUMED --MHD calls the handler again--> ANSWERED (response built from the outcome)
 *     READING/RESUMED/ANSWERED --MHD request-completed callback--> freed;
 *        the keel_request is destroyed there, so exactly once and only after its
 *        callback ran (MHD cannot complete a connection that is suspended, and one that is
 *        GATHERED becomes ORPHANED instead). MHD does not complete a SUBMITTED or
 *        SUSPENDING connection: both exist only inside its handler call.
 *
 * Lock order: s->mu and a job queue's lock (s->ctlq.mu, s->scrapeq.mu) never nest, and
 * none is held while calling libkeel or MHD (keel_request_cancel may run the completion,
 * which takes s->mu, on the caller's thread; MHD takes its own locks in suspend/resume). The
 * completion callback runs on a keel worker thread, on the watcher (cancel), or on a job
 * thread (model control, scrapes: server_control.c).
 *
 * Hang-up watcher: MHD does not poll suspended sockets, so a thread polls the sockets of
 * PARKED infer connections every 10 ms (POLLRDHUP/POLLHUP/POLLERR) and cancels the
 * request of a client that has gone: a queued request then completes KEEL_ECANCELED at
 * once and never reaches the backend; a running one is answered at once too (its backend
 * call runs on, its context counted stuck until it returns).
 * fds are only read under s->mu while their connection is PARKED, so MHD cannot have closed
 * (and the kernel reused) them. At shutdown the same thread cancels every parked infer.
 *
 * Signals: SIGTERM, SIGINT and SIGHUP are blocked in every thread and read from a signalfd
 * by the main thread. SIGHUP only asks the access log's writer to reopen its file
 * (logrotate); it never stops the server.
 *
 * Observability: MHD's request-completed callback (on_completed) observes every request
 * exactly once before freeing it: observe() fills a protocol-neutral srv_obs_event for the
 * histograms (observe.c), the access log (access_log.c) and traces (trace.c).
 *
 * Shutdown (main thread, woken by signalfd): readiness turns 503; the server keeps
 * serving for --shutdown-grace-secs; then new infer/load/unload get 503 "shutting down"
 * (draining) and every response says Connection: close; the control thread stops;
 * in-flight requests finish, up to --exit-timeout-secs, after which the rest are cancelled
 * (counted and logged); once pending == 0 the daemon is quiesced (the listening socket shut
 * down, so connects are refused) and requests already being received get their answer;
 * then the watcher stops, MHD_stop_daemon closes every connection, and keel_runtime_destroy
 * runs last. A second signal skips the waits (requests still in flight are cancelled,
 * never abandoned). From the exit timeout on, the stuck-call guard bounds the rest by
 * --stuck-exit-secs: a model call that never returns ends the process with exit status 3
 * instead of holding it forever (stuck_guard, below).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "grpc_server.h"
#include "http_loop.h"
#include "reply.h"
#include "sdnotify.h"
#include "server_control.h"
#include "server_guard.h"
#include "server_internal.h"
#include "server_log.h"
#include "server_routes.h"
#include "serving.h"
#include "trace.h"

#define WATCH_INTERVAL_MS 10
#define SMALL_BODY_LIMIT (1u << 20)  /* JSON bodies of index/load/unload */
#define BODY_PRESIZE_MAX (64u << 10) /* body buffer allocated from Content-Length at once */
#define ERRMSG_LEN 1024
#define QUIET_MS 200       /* at shutdown: no request in progress this long = only idle left */
#define CLOSE_WAIT_MS 5000 /* at shutdown: longest wait for requests being received */

/*
 * libmicrohttpd 0.9.75 to 0.9.77 reject whitespace in a header name (RFC 7230 3.2.4, a
 * request-smuggling vector) only at strictness -1, although their documentation puts it at
 * 1; level 1 instead requires Host and refuses blanks in the URL, which keel's router
 * rejects anyway (404). Later versions reorganised the levels.
 */
#if MHD_VERSION < 0x00097800
#define STRICTNESS (-1)
#else
#define STRICTNESS 1
#endif

static const char ALLOW_GET[] = "GET, HEAD";
static const char ALLOW_GET_POST[] = "GET, HEAD, POST";
static const char ALLOW_POST[] = "POST";
static const char JSON_TYPE[] = "application/json";

static void loop_buf_give(void *b);

/* ---------------------------------------------------------------- small helpers */

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t unix_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int cond_init(pthread_cond_t *cv)
{
    pthread_condattr_t attr;
    int rc;

    if ((rc = pthread_condattr_init(&attr)) != 0)
        return rc;
    if ((rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)) == 0)
        rc = pthread_cond_init(cv, &attr);
    pthread_condattr_destroy(&attr);
    return rc;
}

/* An absolute deadline ms from now for pthread_cond_timedwait on our condition variables,
 * which all use CLOCK_MONOTONIC (see cond_init). */
static struct timespec deadline_in_ms(uint64_t ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* Queues r (its body is consumed) and marks c ANSWERED. Returns what the handler returns. */
static enum MHD_Result send_reply(srv_conn *c, srv_reply *r, const char *extra_name,
                                  const char *extra_value, bool close_after)
{
    static const char nomem[] = "{\"error\":\"out of memory\"}";
    struct MHD_Response *resp;
    enum MHD_Result ret;
    unsigned status = r->status;
    char tp[64];

    keel__srv_guard_redact(c->s, c, r);
    if (r->body == NULL && status >= 400) {
        /* keel__srv_reply_error could not allocate: say so with a static body. */
        resp = MHD_create_response_from_buffer(sizeof(nomem) - 1, (void *)nomem,
                                               MHD_RESPMEM_PERSISTENT);
        r->ctype = JSON_TYPE;
        c->bytes_out = sizeof(nomem) - 1;
    } else if (r->pooled) { /* MHD gives it back when it is done with it */
        resp = MHD_create_response_from_buffer_with_free_callback(r->len, r->body, loop_buf_give);
        c->bytes_out = r->len;
    } else {
        resp = MHD_create_response_from_buffer(r->len, r->body, MHD_RESPMEM_MUST_FREE);
        c->bytes_out = r->len;
    }
    if (c->traced) /* W3C Trace Context: the caller's trace, keel's span */
        snprintf(tp, sizeof(tp), "00-%s-%s-%02x", c->trace.trace_id, c->span_id, c->trace.flags);
    if (resp == NULL) {
        free(r->body);
        r->body = NULL;
        return MHD_NO; /* MHD closes the connection */
    }
    r->body = NULL; /* the response owns it now */
    if ((r->ctype != NULL &&
         MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->ctype) != MHD_YES) ||
        (r->allow != NULL &&
         MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, r->allow) != MHD_YES) ||
        (extra_name != NULL && MHD_add_response_header(resp, extra_name, extra_value) != MHD_YES) ||
        (c->traced && MHD_add_response_header(resp, "traceparent", tp) != MHD_YES) ||
        ((close_after || atomic_load(&c->s->conn_close)) &&
         MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close") != MHD_YES)) {
        MHD_destroy_response(resp);
        return MHD_NO;
    }
    if (c->stepped)
        c->send_start_ns = now_ns();
    ret = MHD_queue_response(c->mhd, status, resp);
    MHD_destroy_response(resp);
    c->state = CONN_ANSWERED;
    if (c->counted) {
        atomic_fetch_sub(&c->s->http_open, 1);
        c->counted = false;
    }
    c->http_status = status;
    if (status / 100 < 6)
        atomic_fetch_add_explicit(&c->s->http_responses[status / 100], 1, memory_order_relaxed);
    return ret;
}

static enum MHD_Result send_error(srv_conn *c, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static enum MHD_Result send_error(srv_conn *c, unsigned status, const char *fmt, ...)
{
    char msg[ERRMSG_LEN];
    srv_reply r = {0};
    va_list ap;

    va_start(ap, fmt);
    if (vsnprintf(msg, sizeof(msg), fmt, ap) < 0)
        snprintf(msg, sizeof(msg), "error");
    va_end(ap);
    keel__srv_reply_error(&r, status, "%s", msg);
    return send_reply(c, &r, NULL, NULL, false);
}

/* ---------------------------------------------------------------- routing */

/* Parses a version path segment: decimal digits only, no overflow. */
static bool parse_version(const char *s, int64_t *out)
{
    int64_t v = 0;

    if (*s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9' || v > (INT64_MAX - (*s - '0')) / 10)
            return false;
        v = v * 10 + (*s - '0');
    }
    *out = v;
    return true;
}

/* s (n bytes) is the literal lit: a length check and an inlined compare, not a strcmp call
 * (the router made about ten per request, issue 12). */
#define IS_LIT(s, n, lit) ((n) == sizeof(lit) - 1 && memcmp((s), lit, sizeof(lit) - 1) == 0)
#define SEG_IS(k, lit) IS_LIT(seg[k], seglen[k], lit)
#define TAIL_IS(lit) IS_LIT(tail, taillen, lit)

/* c->model = a copy of the name's n bytes: in c when short, else allocated. */
static bool conn_set_model(srv_conn *c, const char *name, size_t n)
{
    if (n < sizeof(c->model_small)) {
        c->model = c->model_small;
    } else if ((c->model = malloc(n + 1)) == NULL) {
        return false;
    }
    memcpy(c->model, name, n);
    c->model[n] = '\0';
    return true;
}

/*
 * Routes url into c (route, model, version). Returns 0, or an HTTP status (404 unknown path,
 * with msg left to the caller; 400 bad version, 500 no memory, with the reason in msg).
 */
static unsigned route_segments(srv_conn *c, const char *url, char *msg, size_t msglen)
{
    char stackbuf[256];
    char *copy = NULL, *seg[8], *p;
    size_t seglen[8];
    size_t nseg = 0;
    size_t i = 0, len;
    unsigned rc = MHD_HTTP_NOT_FOUND;
    const char *tail;
    size_t taillen;

    c->version = -1;
    if (url[0] != '/')
        return MHD_HTTP_NOT_FOUND;
    len = strlen(url + 1);
    if (IS_LIT(url + 1, len, "metrics")) {
        c->route = ROUTE_METRICS;
        return 0;
    }
    if (IS_LIT(url + 1, len, "v2") || IS_LIT(url + 1, len, "v2/")) {
        c->route = ROUTE_SERVER_META;
        return 0;
    }
    /* The segments are cut in a copy: on the stack for the usual short path, else on the
     * heap (the URL is bounded only by --http-connection-memory). */
    if (len < sizeof(stackbuf)) {
        memcpy(stackbuf, url + 1, len + 1);
        p = stackbuf;
    } else if ((copy = strdup(url + 1)) == NULL) {
        snprintf(msg, msglen, "out of memory");
        return MHD_HTTP_INTERNAL_SERVER_ERROR;
    } else {
        p = copy;
    }
    /* strtok_r would merge empty segments ("//"); split by hand and reject them. */
    for (;;) {
        char *slash = strchr(p, '/');
        if (nseg == sizeof(seg) / sizeof(seg[0]))
            goto done;
        seg[nseg] = p;
        seglen[nseg++] = slash != NULL ? (size_t)(slash - p) : strlen(p);
        if (slash == NULL)
            break;
        *slash = '\0';
        p = slash + 1;
    }
    for (i = 0; i < nseg; i++) {
        if (seg[i][0] == '\0')
            goto done;
    }
    if (!SEG_IS(0, "v2") || nseg < 2)
        goto done;

    if (SEG_IS(1, "health") && nseg == 3) {
        if (SEG_IS(2, "live"))
            c->route = ROUTE_LIVE;
        else if (SEG_IS(2, "ready"))
            c->route = ROUTE_READY;
        rc = c->route != ROUTE_UNKNOWN ? 0 : MHD_HTTP_NOT_FOUND;
        goto done;
    }
    if (SEG_IS(1, "trace")) {
        if (nseg == 3 && SEG_IS(2, "setting")) {
            c->route = ROUTE_TRACE_SETTING;
            rc = 0;
        }
        goto done;
    }
    if (SEG_IS(1, "repository")) {
        if (nseg == 3 && SEG_IS(2, "index")) {
            c->route = ROUTE_REPO_INDEX;
            rc = 0;
        } else if (nseg == 5 && SEG_IS(2, "models") && (SEG_IS(4, "load") || SEG_IS(4, "unload"))) {
            c->route = SEG_IS(4, "load") ? ROUTE_REPO_LOAD : ROUTE_REPO_UNLOAD;
            if (!conn_set_model(c, seg[3], seglen[3])) {
                snprintf(msg, msglen, "out of memory");
                rc = MHD_HTTP_INTERNAL_SERVER_ERROR;
            } else {
                rc = 0;
            }
        }
        goto done;
    }
    if (!SEG_IS(1, "models") || nseg < 3)
        goto done;
    if (nseg == 3 && SEG_IS(2, "stats")) {
        /* As in Triton, this shadows the metadata of a model named "stats". */
        c->route = ROUTE_ALL_STATS;
        rc = 0;
        goto done;
    }
    if (nseg == 5 && SEG_IS(3, "trace") && SEG_IS(4, "setting")) {
        c->route = ROUTE_TRACE_SETTING;
        if (!conn_set_model(c, seg[2], seglen[2])) {
            snprintf(msg, msglen, "out of memory");
            rc = MHD_HTTP_INTERNAL_SERVER_ERROR;
        } else {
            rc = 0;
        }
        goto done;
    }
    /* /v2/models/{m}[/versions/{v}][/ready|config|stats|infer] */
    i = 3;
    if (nseg >= 5 && SEG_IS(3, "versions")) {
        if (!parse_version(seg[4], &c->version)) {
            snprintf(msg, msglen, "invalid model version '%.64s': expected a non-negative integer",
                     seg[4]);
            rc = MHD_HTTP_BAD_REQUEST;
            goto done;
        }
        i = 5;
    }
    if (nseg > i + 1)
        goto done;
    tail = nseg == i + 1 ? seg[i] : "";
    taillen = nseg == i + 1 ? seglen[i] : 0;
    if (tail[0] == '\0')
        c->route = ROUTE_MODEL_META;
    else if (TAIL_IS("ready"))
        c->route = ROUTE_MODEL_READY;
    else if (TAIL_IS("config"))
        c->route = ROUTE_MODEL_CONFIG;
    else if (TAIL_IS("stats"))
        c->route = ROUTE_MODEL_STATS;
    else if (TAIL_IS("infer"))
        c->route = ROUTE_INFER;
    else
        goto done;
    if (!conn_set_model(c, seg[2], seglen[2])) {
        c->route = ROUTE_UNKNOWN;
        snprintf(msg, msglen, "out of memory");
        rc = MHD_HTTP_INTERNAL_SERVER_ERROR;
        goto done;
    }
    rc = 0;

done:
    if (copy != NULL) /* free(NULL) is ~40 instructions of jemalloc's: see conn_free */
        free(copy);
    if (rc != 0)
        c->route = ROUTE_UNKNOWN;
    return rc;
}

/* route_segments, with the message of a 404 formatted only when there is one (formatting it
 * for every request cost about 1 200 instructions of a batch-1 infer, issue 11). */
static unsigned route_url(srv_conn *c, const char *url, char *msg, size_t msglen)
{
    unsigned rc = route_segments(c, url, msg, msglen);

    if (rc == MHD_HTTP_NOT_FOUND)
        snprintf(msg, msglen, "unknown endpoint '%.200s'", url);
    return rc;
}

static bool route_is_post(srv_route r)
{
    return r == ROUTE_INFER || r == ROUTE_REPO_INDEX || r == ROUTE_REPO_LOAD ||
           r == ROUTE_REPO_UNLOAD;
}

/* ---------------------------------------------------------------- connection life */

/* The allocation c->body lives in (NULL if none). */
static char *body_base(const srv_conn *c)
{
    return c->body != NULL ? c->body - c->body_pad : NULL;
}

/*
 * Freed srv_conns are kept for reuse by the thread that makes them (a loop thread: on_uri),
 * as request.c keeps requests: a batched batch-1 request's connection state is ~1 KiB that
 * calloc zeroed and free returned for every HTTP request. At most CONN_CACHE_MAX per thread;
 * a thread that never made one (a completion freeing an abandoned connection) keeps none.
 * The same cache keeps up to LOOP_BUFS_MAX buffers of LOOP_BUF bytes, for the bodies and
 * answers of small requests (loop_buf_take, loop_buf_give): plain malloc'd blocks, so any
 * path may free() one instead (a body lent to its request, grown, or an answer destroyed on
 * another thread); only one known to be LOOP_BUF bytes (c->body_pooled, srv_reply's pooled)
 * is given back. Owner: the thread's cache; release path: the thread's exit (a pthread
 * key's destructor). AddressSanitizer builds keep none, so that a use after conn_free (or
 * after a buffer went back) stays a use after free.
 */
#if defined(__SANITIZE_ADDRESS__)
#define CONN_CACHE_MAX 0u
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CONN_CACHE_MAX 0u
#endif
#endif
#ifndef CONN_CACHE_MAX
#define CONN_CACHE_MAX 64u
#endif
#define LOOP_BUF 1024u
#define LOOP_BUFS_MAX (2u * CONN_CACHE_MAX) /* a body and an answer per connection */

static _Thread_local struct conn_cache {
    srv_conn *head; /* linked through next */
    unsigned n;
    bool makes; /* this thread has made a connection */
    bool keyed; /* conn_cache_exit is registered for this thread */
    char *bufs[LOOP_BUFS_MAX + 1];
    unsigned nbufs;
} tl_conns;
static pthread_key_t conn_cache_key;
static pthread_once_t conn_cache_once = PTHREAD_ONCE_INIT;
static bool conn_cache_key_ok;

static void conn_cache_exit(void *arg)
{
    struct conn_cache *cc = arg;
    srv_conn *c;

    while ((c = cc->head) != NULL) {
        cc->head = c->next;
        free(c);
    }
    cc->n = 0;
    while (cc->nbufs > 0)
        free(cc->bufs[--cc->nbufs]);
    cc->makes = false; /* a connection freed later in this thread's exit is freed */
}

static void conn_cache_key_init(void)
{
    conn_cache_key_ok = pthread_key_create(&conn_cache_key, conn_cache_exit) == 0;
}

/* A zeroed srv_conn, from this thread's cache when it has one. */
static srv_conn *conn_alloc(void)
{
    srv_conn *c = tl_conns.head;

    tl_conns.makes = true;
    if (c == NULL)
        return calloc(1, sizeof(*c));
    tl_conns.head = c->next;
    tl_conns.n--;
    memset(c, 0, sizeof(*c));
    return c;
}

/* Whether this thread may keep what it frees: it makes connections and its cache is
 * released at its exit. */
static bool conn_cache_keeps(void)
{
    if (!tl_conns.makes)
        return false;
    if (!tl_conns.keyed) {
        pthread_once(&conn_cache_once, conn_cache_key_init);
        if (!conn_cache_key_ok || pthread_setspecific(conn_cache_key, &tl_conns) != 0)
            return false;
        tl_conns.keyed = true;
    }
    return true;
}

/* Gives a finished srv_conn (everything it owned freed) to this thread's cache, or frees it. */
static void conn_release(srv_conn *c)
{
    if (tl_conns.n >= CONN_CACHE_MAX || !conn_cache_keeps()) {
        free(c);
        return;
    }
    c->next = tl_conns.head;
    tl_conns.head = c;
    tl_conns.n++;
}

/* A malloc'd block of LOOP_BUF bytes, from this thread's cache when it has one; NULL when
 * out of memory. */
static char *loop_buf_take(void)
{
    if (tl_conns.nbufs > 0)
        return tl_conns.bufs[--tl_conns.nbufs];
    return malloc(LOOP_BUF);
}

/* Gives back a block of loop_buf_take (also MHD's free callback of a pooled answer). */
static void loop_buf_give(void *b)
{
    if (b == NULL)
        return;
    if (tl_conns.nbufs >= LOOP_BUFS_MAX || !conn_cache_keeps()) {
        free(b);
        return;
    }
    tl_conns.bufs[tl_conns.nbufs++] = b;
}

/* Frees c's body buffer, or gives it back when it is a pooled one. */
static void body_drop(srv_conn *c)
{
    if (c->body == NULL)
        return;
    if (c->body_pooled)
        loop_buf_give(body_base(c));
    else
        free(body_base(c));
    c->body = NULL;
    c->body_pooled = false;
}

static void conn_free(srv_conn *c)
{
    if (c == NULL)
        return;
    /* MHD completes only connections it is running, a submitted one is suspended until its
     * completion ran, and an orphaned one is freed only once it ran; anything else would
     * destroy an in-flight request. */
    if (c->state == CONN_SUBMITTED || c->state == CONN_GATHERED || c->state == CONN_SUSPENDING ||
        c->state == CONN_PARKED ||
        ((c->state == CONN_ORPHANED || c->state == CONN_ABANDONED) && !c->done)) {
        keel__srv_log(KEEL_LOG_ERROR, "BUG: connection completed while its request is in flight",
                      NULL);
        abort();
    }
    if (c->counted)
        atomic_fetch_sub(&c->s->http_open, 1);
    keel_request_destroy(c->req);
    if (c->have_info)
        keel_v2_request_info_fini(&c->info);
    /* Each is usually NULL here, and jemalloc's free(NULL) still costs ~40 instructions
     * (callgrind): ten such calls were 1 % of a batched request. */
    body_drop(c);
    if (c->model != c->model_small && c->model != NULL)
        free(c->model);
    if (c->ctl_msg != NULL)
        free(c->ctl_msg);
    if (c->ctl_body != NULL)
        free(c->ctl_body);
    conn_release(c);
}

static const char *route_name(srv_route r)
{
    switch (r) {
    case ROUTE_SERVER_META:
        return "server_metadata";
    case ROUTE_LIVE:
        return "live";
    case ROUTE_READY:
        return "ready";
    case ROUTE_MODEL_META:
        return "model_metadata";
    case ROUTE_MODEL_READY:
        return "model_ready";
    case ROUTE_MODEL_CONFIG:
        return "model_config";
    case ROUTE_MODEL_STATS:
        return "model_stats";
    case ROUTE_ALL_STATS:
        return "stats";
    case ROUTE_INFER:
        return "infer";
    case ROUTE_REPO_INDEX:
        return "repository_index";
    case ROUTE_REPO_LOAD:
        return "load";
    case ROUTE_REPO_UNLOAD:
        return "unload";
    case ROUTE_METRICS:
        return "metrics";
    case ROUTE_TRACE_SETTING:
        return "trace_setting";
    case ROUTE_UNKNOWN:
        break;
    }
    return "unknown";
}

/* Formats the client's address as "addr:port" ("" if unknown). */
static void peer_text(struct MHD_Connection *mc, char *out, size_t len)
{
    const union MHD_ConnectionInfo *ci =
        mc != NULL ? MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CLIENT_ADDRESS) : NULL;
    const struct sockaddr *sa = ci != NULL ? ci->client_addr : NULL;
    char a[INET6_ADDRSTRLEN];

    out[0] = '\0';
    if (sa == NULL)
        return;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        if (inet_ntop(AF_INET, &in->sin_addr, a, sizeof(a)) != NULL)
            snprintf(out, len, "%s:%u", a, (unsigned)ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        if (inet_ntop(AF_INET6, &in6->sin6_addr, a, sizeof(a)) != NULL)
            snprintf(out, len, "[%s]:%u", a, (unsigned)ntohs(in6->sin6_port));
    }
}

/* Feeds the request's one observation (histograms, response codes, access log): called
 * exactly once per srv_conn, from MHD's request-completed callback, after its response was
 * sent and (for an infer) after its keel completion ran; for an orphaned connection (mc NULL:
 * no peer address, status 0) when it is freed, after its completion. */
static void observe(srv_conn *c, struct MHD_Connection *mc)
{
    keel_srv *s = c->s;
    srv_obs_event ev;
    char peer[INET6_ADDRSTRLEN + 16];

    memset(&ev, 0, sizeof(ev));
    ev.protocol = SRV_PROTO_HTTP;
    ev.route = route_name(c->route);
    ev.method = c->method;
    ev.model = c->model;
    ev.version = c->version;
    ev.status = c->http_status;
    ev.bytes_in = (uint64_t)c->body_len + c->discarded;
    ev.bytes_out = c->bytes_out;
    ev.start_ns = c->start_ns;
    ev.end_ns = now_ns();
    ev.trace_id = c->traced ? c->trace.trace_id : "";
    ev.span_id = c->traced ? c->span_id : "";
    if (c->req != NULL) {
        /* Only read once the completion ran: c->done is set under s->mu before the resume
         * that led here; a request that was never submitted has zero timing. */
        keel_request_timing_get(c->req, &ev.timing);
        ev.request_id = keel_request_id(c->req);
        if (ev.timing.complete_ns != 0) {
            ev.generation = keel_request_generation_id(c->req);
            if (keel_request_model_version(c->req) >= 0)
                ev.version = keel_request_model_version(c->req);
        }
    }
    ev.recv_end_ns = c->recv_end_ns;
    ev.request_start_ns = c->request_start_ns;
    ev.request_end_ns = c->request_end_ns;
    ev.send_start_ns = c->send_start_ns;
    if (s->alog != NULL) {
        peer_text(mc, peer, sizeof(peer));
        ev.peer = peer;
    }
    keel__srv_observe(s, &ev);
}

/* Decrements s->pending; called after the connection's resume (if any) was requested. */
static void pending_done(keel_srv *s)
{
    keel__srv_done(s);
}

/*
 * MHD completed a GATHERED connection (its client left during the turn's extra passes):
 * MHD frees the MHD_Connection when the callback returns, but the request is in flight and
 * after_turn still holds the connection in tl_gathered. Cancels the request; after_turn or
 * the completion frees the connection (orphan_free).
 */
static void orphan(srv_conn *c)
{
    keel_srv *s = c->s;

    pthread_mutex_lock(&s->mu);
    c->state = CONN_ORPHANED;
    c->mhd = NULL;
    c->cancelled = true;
    pthread_mutex_unlock(&s->mu);
    /* KEEL_EINVAL: it completed already (done is set). */
    if (keel_request_cancel(c->req) == KEEL_OK)
        atomic_fetch_add_explicit(&s->canceled_hangup, 1, memory_order_relaxed);
}

/* Frees an orphaned connection whose completion ran: its observation, then the connection,
 * then its admission (so pending == 0 still means no request of a connection is alive). */
static void orphan_free(srv_conn *c)
{
    keel_srv *s = c->s;

    observe(c, NULL);
    conn_free(c);
    pending_done(s);
}

/* MHD's request-completed callback: where an srv_conn is freed (an orphaned one: after its
 * completion, see orphan). */
static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    srv_conn *c = *con_cls;

    (void)cls;
    if (c == NULL)
        return;
    *con_cls = NULL;
    if (c->state == CONN_GATHERED) {
        /* Only this thread moves a GATHERED connection on: no lock needed to read it. */
        orphan(c);
        return;
    }
    observe(c, mc);
    if (keel__srv_log_on(KEEL_LOG_DEBUG)) {
        char st[16], us[32];
        keel__srv_log(KEEL_LOG_DEBUG, "request done", "route", route_name(c->route), "model",
                      c->model != NULL ? c->model : "", "status",
                      keel__srv_fmt(st, sizeof(st), "%u", c->http_status), "duration_us",
                      keel__srv_fmt(us, sizeof(us), "%" PRIu64, (now_ns() - c->start_ns) / 1000u),
                      "outcome", toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "ok" : "aborted",
                      NULL);
    }
    conn_free(c);
}

static void parked_unlink_locked(keel_srv *s, srv_conn *c)
{
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->parked = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    s->nparked--;
}

/* Records the completion of a submitted connection (infer or control job) and resumes it.
 * Called exactly once per submit, from any thread, with no lock held. */
static void conn_complete(srv_conn *c, keel_err status)
{
    keel_srv *s = c->s;
    struct MHD_Connection *mc = NULL;
    srv_http_loop *loop = c->loop;
    bool resume = false, abandoned = false;

    pthread_mutex_lock(&s->mu);
    c->status = status;
    c->done = true;
    if (c->state == CONN_PARKED && !c->pinned) {
        parked_unlink_locked(s, c);
        c->state = CONN_RESUMED;
        mc = c->mhd;
        resume = true;
    } else if (c->state == CONN_ABANDONED) {
        abandoned = true; /* after_turn has let go of it: nobody else holds it */
    }
    pthread_mutex_unlock(&s->mu);
    /* From here on c may be freed by an MHD thread as soon as it is resumed. */
    if (resume) {
        keel__http_resume(loop, mc);
        pending_done(s);
    } else if (abandoned) {
        orphan_free(c);
    }
}

static void on_infer_done(keel_request *req, keel_err status, void *user)
{
    srv_conn *c = user;

    (void)req;
    if (c->stepped)
        c->request_end_ns = now_ns(); /* published by the s->mu in conn_complete */
    conn_complete(c, status);
}

/* Forward: the answer of a resumed connection. */
static enum MHD_Result answer_resumed(srv_conn *c);

/*
 * Suspends a submitted connection (on its loop thread; s->mu held on entry, released) whose
 * completion has not been recorded: SUSPENDING, then PARKED, or RESUMED at once if the
 * completion landed meanwhile.
 */
static void suspend_locked(srv_conn *c)
{
    keel_srv *s = c->s;
    const union MHD_ConnectionInfo *ci;
    bool resume = false;
    int fd = -1;

    c->state = CONN_SUSPENDING;
    pthread_mutex_unlock(&s->mu);
    ci = MHD_get_connection_info(c->mhd, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci != NULL)
        fd = ci->connect_fd;
    MHD_suspend_connection(c->mhd);

    pthread_mutex_lock(&s->mu);
    if (c->done) {
        c->state = CONN_RESUMED;
        resume = true;
    } else {
        c->state = CONN_PARKED;
        c->fd = fd;
        c->prev = NULL;
        c->next = s->parked;
        if (s->parked != NULL)
            s->parked->prev = c;
        s->parked = c;
        s->nparked++;
        if (s->watch_idle)
            pthread_cond_signal(&s->watch_cv);
    }
    pthread_mutex_unlock(&s->mu);
    if (resume) {
        keel__http_resume(c->loop, c->mhd);
        pending_done(s);
    }
}

/*
 * Called by the handler right after a successful submit (state SUBMITTED, counted in
 * pending): answers at once if the completion has already been recorded (the request ran
 * on this thread), else suspends the connection.
 */
static enum MHD_Result park(srv_conn *c)
{
    keel_srv *s = c->s;

    pthread_mutex_lock(&s->mu);
    if (c->done) {
        c->state = CONN_RESUMED;
        pthread_mutex_unlock(&s->mu);
        pending_done(s);
        return answer_resumed(c);
    }
    suspend_locked(c);
    return MHD_YES;
}

/* Infer connections submitted by this loop thread in the current turn (CONN_GATHERED), and
 * how many. */
static _Thread_local srv_conn *tl_gathered;
static _Thread_local unsigned tl_ngathered;

static unsigned gathered(void *cls)
{
    (void)cls;
    return tl_ngathered;
}

/*
 * The end of a loop turn (http_loop.c): keel_runtime_run_gathered runs the batches of the
 * requests gathered in it, then a connection whose request completed becomes RESUMED and
 * MHD calls its handler in the next turn to answer it (it never left MHD's ready list: no
 * suspend, no resume, no wake-up); the others are suspended like any submitted connection.
 * Until then MHD may call a GATHERED connection's handler again; it does nothing (on_request)
 * because only this function may move the connection on: it still holds it in its list.
 * MHD may also complete one (the client left): it is ORPHANED then (see orphan), and freed
 * here if its request completed, else by the completion.
 */
static void after_turn(void *cls)
{
    keel_srv *s = cls;
    srv_conn *c;
    srv_conn *waiting = NULL, *orphans = NULL;
    unsigned answered = 0;

    if (tl_gathered == NULL)
        return; /* nothing gathered: other loops run their own turns' batches */
    tl_ngathered = 0;
    keel_runtime_run_gathered(s->rt);
    /* One s->mu round trip for the turn's completed connections (most of them, when the
     * batches ran here), not one each. */
    pthread_mutex_lock(&s->mu);
    while ((c = tl_gathered) != NULL) {
        tl_gathered = c->gnext;
        if (c->state == CONN_ORPHANED) {
            if (c->done) {
                c->gnext = orphans;
                orphans = c;
            } else {
                c->gnext = NULL;
                c->state = CONN_ABANDONED; /* the completion frees it */
            }
        } else if (c->done) {
            c->gnext = NULL;
            c->state = CONN_RESUMED;
            answered++;
        } else {
            c->gnext = waiting;
            waiting = c;
        }
    }
    pthread_mutex_unlock(&s->mu);
    while (answered-- > 0)
        pending_done(s);
    while ((c = orphans) != NULL) {
        orphans = c->gnext;
        orphan_free(c);
    }
    while ((c = waiting) != NULL) {
        waiting = c->gnext;
        c->gnext = NULL;
        pthread_mutex_lock(&s->mu);
        if (c->done) {
            c->state = CONN_RESUMED;
            pthread_mutex_unlock(&s->mu);
            pending_done(s);
        } else {
            suspend_locked(c);
        }
    }
}

/* ---------------------------------------------------------------- infer */

/* Parses v, the value of the Inference-Header-Content-Length header (NULL if absent):
 * (size_t)-1 if absent, else its value; false if it is not a decimal integer. */
static bool header_length(const char *v, size_t *out)
{
    uint64_t n = 0;

    *out = (size_t)-1;
    if (v == NULL)
        return true;
    while (*v == ' ' || *v == '\t')
        v++;
    if (*v == '\0')
        return false;
    for (; *v >= '0' && *v <= '9'; v++) {
        if (n > (UINT64_MAX - 9) / 10)
            return false;
        n = n * 10 + (uint64_t)(*v - '0');
    }
    while (*v == ' ' || *v == '\t')
        v++;
    if (*v != '\0' || n >= SIZE_MAX)
        return false;
    *out = (size_t)n;
    return true;
}

/* A request body lent to the binary tensors that read it in place: freed with the last
 * reference (the decoder's, dropped after decoding, and one per borrowed input, dropped by
 * libkeel when the request, or the run it was detached into, is done with it). */
typedef struct body_holder {
    _Atomic unsigned refs;
    char *buf;
} body_holder;

static void body_retain(void *arg)
{
    atomic_fetch_add_explicit(&((body_holder *)arg)->refs, 1, memory_order_relaxed);
}

static void body_release(void *arg)
{
    body_holder *h = arg;

    if (atomic_fetch_sub_explicit(&h->refs, 1, memory_order_acq_rel) == 1) {
        free(h->buf);
        free(h);
    }
}

/* A holder for buf with the caller's one reference (it then owns buf), or NULL (out of
 * memory: the caller keeps buf and copies). */
static body_holder *body_lend(char *buf)
{
    body_holder *h = malloc(sizeof(*h));

    if (h == NULL)
        return NULL;
    atomic_init(&h->refs, 1);
    h->buf = buf;
    return h;
}

static enum MHD_Result infer_start(srv_conn *c)
{
    keel_srv *s = c->s;
    char err[ERRMSG_LEN];
    body_holder *lent;
    size_t hlen;
    int st;
    keel_err kerr;
    srv_outcome o;

    if (keel__srv_draining(s))
        return send_error(c, MHD_HTTP_SERVICE_UNAVAILABLE, "the server is shutting down");
    hlen = c->hlen;
    if (!c->hlen_ok)
        return send_error(c, MHD_HTTP_BAD_REQUEST,
                          "Inference-Header-Content-Length: expected a non-negative integer");
    if (hlen != (size_t)-1 && hlen > c->body_len)
        return send_error(c, MHD_HTTP_BAD_REQUEST,
                          "Inference-Header-Content-Length %zu is larger than the body (%zu "
                          "bytes)",
                          hlen, c->body_len);
    if ((kerr = keel_request_create(s->rt, c->model, c->version, &c->req)) != KEEL_OK)
        return send_error(c, keel__srv_http_status(kerr), "creating the request: %s",
                          keel_strerror(kerr));
    err[0] = '\0';
    if (hlen != (size_t)-1 && c->body != NULL && (lent = body_lend(body_base(c))) != NULL) {
        /* Binary tensors are read in place: the body goes to a holder that the request's
         * borrowed inputs reference (keel_v2_decode_infer_lent); ours is dropped below. */
        keel_v2_body_lender lender = {body_retain, body_release, lent};
        const char *body = c->body;
        c->body = NULL;
        c->body_pooled = false; /* the holder free()s it */
        st = keel_v2_decode_infer_lent(c->req, body, c->body_len, hlen, &lender, &c->info, err,
                                       sizeof(err));
        body_release(lent);
    } else {
        st = keel_v2_decode_infer(c->req, c->body != NULL ? c->body : "", c->body_len, hlen,
                                  &c->info, err, sizeof(err));
        /* The request holds copies of the tensors; the body is not needed any more. */
        body_drop(c);
    }
    if (st != MHD_HTTP_OK)
        return send_error(c, st >= 400 && st < 600 ? (unsigned)st : MHD_HTTP_BAD_REQUEST, "%s",
                          err[0] != '\0' ? err : "invalid infer request");
    c->have_info = true;
    c->body_cap = 0;

    if (!keel__srv_admit(s))
        return send_error(c, MHD_HTTP_SERVICE_UNAVAILABLE, "the server is shutting down");
    /* Written before the submit, whose hand-off through the runtime's lock orders it before
     * the completion's read under s->mu. */
    c->state = CONN_SUBMITTED;

    /* --infer-on-http-thread: when the runtime runs the request right here (auto: a fast
     * model with an idle context and nothing queued; on: any such model), the completion is
     * recorded before park() and the answer goes out without a suspend or a thread hand-off.
     * The HTTP thread never waits for a context; under auto it never computes a slow model,
     * so its other connections wait at most about --inline-max-us. */
    if (c->stepped)
        c->request_start_ns = now_ns();
    kerr =
        keel__srv_submit(s, c->req, c->model, c->version, s->io_submit_flags, on_infer_done, c, &o);
    if (kerr != KEEL_OK) {
        /* The callback will never run and the admission is over: answer now. */
        c->state = CONN_READING;
        return send_error(c, keel__srv_http_status(o.err), "%s", o.msg);
    }
    if (c->loop != NULL && (s->io_submit_flags & KEEL_SUBMIT_GATHER) != 0) {
        /* Not suspended yet: the batch it joined most likely runs on this thread at the end
         * of the turn (after_turn settles it). */
        pthread_mutex_lock(&s->mu);
        if (!c->done) {
            c->state = CONN_GATHERED;
            pthread_mutex_unlock(&s->mu);
            c->gnext = tl_gathered;
            tl_gathered = c;
            tl_ngathered++;
            return MHD_YES;
        }
        pthread_mutex_unlock(&s->mu);
    }
    return park(c);
}

static enum MHD_Result infer_answer(srv_conn *c)
{
    keel_v2_response resp = {0};
    srv_reply r = {0};
    char *pb;
    char err[ERRMSG_LEN];
    char hl[32];
    int st;

    if (c->status != KEEL_OK) {
        srv_outcome o;
        keel__srv_failed(c->s, c->req, c->status, c->model, c->version, c->cancel_shutdown, &o);
        return send_error(c, keel__srv_http_status(o.err), "%s", o.msg);
    }
    err[0] = '\0';
    pb = loop_buf_take(); /* the answer is written there while it fits */
    st = keel_v2_encode_infer_into(c->req, c->model, &c->info, pb, pb != NULL ? LOOP_BUF : 0, &resp,
                                   err, sizeof(err));
    if (resp.body != pb)
        loop_buf_give(pb); /* not used: it grew past it, or failed */
    if (st != 0)
        return send_error(c, st >= 400 && st < 600 ? (unsigned)st : 500, "%s",
                          err[0] != '\0' ? err : "encoding the response failed");
    r.status = MHD_HTTP_OK;
    r.body = resp.body;
    r.len = resp.body_len;
    r.pooled = resp.body == pb;
    if (resp.has_binary) {
        r.ctype = "application/octet-stream";
        snprintf(hl, sizeof(hl), "%zu", resp.json_len);
        return send_reply(c, &r, "Inference-Header-Content-Length", hl, false);
    }
    r.ctype = JSON_TYPE;
    return send_reply(c, &r, NULL, NULL, false);
}

/* ---------------------------------------------------------------- model control API */

/* Checks the optional JSON body of load/unload: an object whose "parameters", if any, holds
 * nothing keel does not support. Returns 0 or 400 with msg. */
static unsigned check_control_body(const srv_conn *c, char *msg, size_t msglen)
{
    json_t *root, *params;
    json_error_t jerr;
    const char *key;
    json_t *val;
    unsigned rc = 0;

    if (c->body_len == 0)
        return 0;
    root = json_loadb(c->body, c->body_len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        snprintf(msg, msglen, "invalid JSON body: %s", jerr.text);
        return MHD_HTTP_BAD_REQUEST;
    }
    if (!json_is_object(root)) {
        snprintf(msg, msglen, "invalid body: expected a JSON object");
        rc = MHD_HTTP_BAD_REQUEST;
        goto done;
    }
    params = json_object_get(root, "parameters");
    if (params == NULL || json_is_null(params))
        goto done;
    if (!json_is_object(params)) {
        snprintf(msg, msglen, "parameters: expected an object");
        rc = MHD_HTTP_BAD_REQUEST;
        goto done;
    }
    json_object_foreach (params, key, val) {
        if (c->route == ROUTE_REPO_UNLOAD && strcmp(key, "unload_dependents") == 0)
            continue; /* keel models have no dependents */
        snprintf(msg, msglen, "parameters.%.64s: not supported by keel", key);
        rc = MHD_HTTP_BAD_REQUEST;
        goto done;
    }
done:
    json_decref(root);
    return rc;
}

/* Queues c on job thread q (server_control.c) and parks it until the job answers it. */
static enum MHD_Result job_start(srv_conn *c, srv_jobq *q)
{
    keel_srv *s = c->s;

    if (!keel__srv_admit(s))
        return send_error(c, MHD_HTTP_SERVICE_UNAVAILABLE, "the server is shutting down");
    c->state = CONN_SUBMITTED; /* the queue's lock orders it before the completion */
    if (!keel__srv_jobq_enqueue(q, c)) {
        c->state = CONN_READING;
        pending_done(s);
        return send_error(c, MHD_HTTP_SERVICE_UNAVAILABLE, "the server is shutting down");
    }
    return park(c);
}

static enum MHD_Result control_start(srv_conn *c)
{
    keel_srv *s = c->s;
    char msg[ERRMSG_LEN];
    unsigned rc;

    if (s->opts->control != KEEL_SERVER_CONTROL_EXPLICIT)
        return send_error(c, MHD_HTTP_BAD_REQUEST,
                          "explicit model load / unload is not allowed: the model control "
                          "mode is %s",
                          s->opts->control == KEEL_SERVER_CONTROL_POLL ? "poll" : "none");
    if ((rc = check_control_body(c, msg, sizeof(msg))) != 0)
        return send_error(c, rc, "%s", msg);
    return job_start(c, &s->ctlq);
}

static enum MHD_Result answer_resumed(srv_conn *c)
{
    srv_reply r = {0};

    if (c->route == ROUTE_INFER)
        return infer_answer(c);
    if (c->route == ROUTE_METRICS && c->ctl_status == MHD_HTTP_OK && c->ctl_body != NULL) {
        r.status = MHD_HTTP_OK;
        r.body = c->ctl_body; /* the response owns it from here */
        r.len = c->ctl_body_len;
        r.ctype = "text/plain; version=0.0.4; charset=utf-8";
        c->ctl_body = NULL;
        return send_reply(c, &r, NULL, NULL, false);
    }
    /* A control job: its outcome is ctl_status and ctl_msg. */
    if (c->ctl_status == MHD_HTTP_OK) {
        keel__srv_reply_empty(&r, MHD_HTTP_OK);
        return send_reply(c, &r, NULL, NULL, false);
    }
    return send_error(c, c->ctl_status != 0 ? c->ctl_status : 500, "%s",
                      c->ctl_msg != NULL ? c->ctl_msg : "model control failed");
}

/* ---------------------------------------------------------------- the access handler */

/*
 * Has the client closed its side while its body is incomplete? libmicrohttpd 0.9.75 in epoll
 * mode takes a short read for "nothing more to read" (connection.c, recv_param_adapter), so
 * a FIN that came with the last bytes raises no new event: the connection would sit in
 * CLOSE-WAIT, its slot and fd held, until --http-timeout-secs. A peek after a chunk that
 * leaves a Content-Length body incomplete finds it (recv returns 0, or an error for a reset).
 * A chunked body is not checked: its end is not known here, and a client that half-closes
 * after a complete request still expects its answer. Nor are headers cut short (MHD calls no
 * handler before they are complete): those wait for the timeout.
 */
static bool client_left(struct MHD_Connection *mc)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    char b;
    ssize_t n;

    if (ci == NULL)
        return false;
    n = recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* Appends a body chunk, keeping at most c->body_limit bytes. */
static void take_body(srv_conn *c, const char *data, size_t n)
{
    if (c->too_large || n > c->body_limit - c->body_len) {
        if (c->body_limit > 0 && !c->too_large) {
            c->too_large = true;
            body_drop(c); /* nothing of it will be used */
            c->body_cap = 0;
        }
        c->discarded += n;
        return;
    }
    if (c->body_len + n > c->body_cap) {
        size_t ncap = c->body_cap == 0 ? 16384 : c->body_cap;
        char *nb;
        while (ncap < c->body_len + n)
            ncap = ncap > c->body_limit / 2 ? c->body_limit : ncap * 2;
        /* A body of known length never gets more than it needs. */
        if (c->body_expect >= c->body_len + n && ncap > c->body_expect)
            ncap = c->body_expect;
        if ((nb = realloc(body_base(c), c->body_pad + ncap + 1)) == NULL) {
            /* Treated as too large: the answer is 413 either way, and no memory is held. */
            c->too_large = true;
            body_drop(c);
            c->body_cap = 0;
            c->discarded += n;
            return;
        }
        c->body = nb + c->body_pad;
        c->body_cap = ncap;
        c->body_pooled = false; /* no longer LOOP_BUF bytes */
    }
    memcpy(c->body + c->body_len, data, n);
    c->body_len += n;
    c->body[c->body_len] = '\0';
}

/*
 * MHD's URI log callback: runs when the request line has been parsed, before MHD cuts the
 * query off and percent-decodes the path, and its result becomes the request's context
 * pointer. So this is where the srv_conn is made, and where the target is seen as received
 * (server_guard.c checks it). NULL (no memory) makes the handler close the connection.
 */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *mc)
{
    srv_conn *c = conn_alloc();

    (void)mc;
    if (c == NULL)
        return NULL;
    c->s = cls;
    c->loop = keel__http_current(); /* MHD calls this on the connection's loop thread */
    c->fd = -1;
    c->version = -1;
    c->state = CONN_READING;
    c->start_ns = now_ns();
    c->stepped = keel__srv_trace_active(c->s->trace);
    if (uri != NULL) {
        c->raw_target_len = strlen(uri);
        c->target_status =
            keel__edge_check_target(uri, c->raw_target_len, c->target_msg, sizeof(c->target_msg));
    }
    return c;
}

static enum MHD_Result first_call(keel_srv *s, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *http_version, srv_conn *c)
{
    char msg[256];
    unsigned rc;
    srv_headers h;
    size_t mlen = strlen(method);
    bool is_post = IS_LIT(method, mlen, MHD_HTTP_METHOD_POST);
    bool is_get_only = !is_post && IS_LIT(method, mlen, MHD_HTTP_METHOD_GET);
    bool is_get = is_get_only || (!is_post && IS_LIT(method, mlen, MHD_HTTP_METHOD_HEAD));

    /* c came from on_uri; MHD's completed callback frees it. */
    c->begun = true;
    c->mhd = mc;
    c->method = is_post ? "POST" : is_get_only ? "GET" : is_get ? "HEAD" : "OTHER";
    c->counted = true;
    atomic_fetch_add(&s->http_open, 1);

    rc = route_url(c, url, msg, sizeof(msg));
    if (rc == 0) {
        bool post = route_is_post(c->route);
        c->method_ok = post ? is_post : is_get;
        c->allow = post ? ALLOW_POST : ALLOW_GET;
        if (c->route == ROUTE_TRACE_SETTING) {
            c->method_ok = is_get || is_post;
            c->allow = ALLOW_GET_POST;
            post = is_post;
        }
        if (c->method_ok && post)
            c->body_limit = c->route == ROUTE_INFER ? s->opts->max_request_bytes
                            : s->opts->max_request_bytes < SMALL_BODY_LIMIT
                                ? s->opts->max_request_bytes
                                : SMALL_BODY_LIMIT;
    }

    /* Every header this request's handling reads, in one pass (server_guard.c). */
    keel__srv_headers_scan(s, c, &h);
    c->hlen_ok = header_length(h.header_length, &c->hlen);
    /* A malformed traceparent is ignored, never an error (W3C Trace Context). */
    if (keel__srv_traceparent_parse(h.traceparent, &c->trace)) {
        c->traced = true;
        keel__srv_span_id(c->span_id);
    }

    /* RFC 9112 6.3: several Content-Length headers, or one with Transfer-Encoding, make the
     * body's framing ambiguous (the way requests are smuggled past proxies). libmicrohttpd
     * would pick one; refuse the request instead and close the connection. */
    if (h.content_length_n > 1 || (h.content_length_n > 0 && h.transfer_encoding_n > 0)) {
        srv_reply r = {0};
        keel__srv_reply_error(&r, MHD_HTTP_BAD_REQUEST,
                              h.content_length_n > 1
                                  ? "ambiguous framing: several Content-Length headers"
                                  : "ambiguous framing: Content-Length with Transfer-Encoding");
        return send_reply(c, &r, NULL, NULL, true);
    }
    {
        /* Bad targets, too many headers, restricted groups without their key, impossible
         * model names: refused before any body is read (server_guard.c). */
        srv_reply r = {0};
        if (keel__srv_guard(s, c, &h, url, http_version, &r) != 0)
            return send_reply(c, &r, NULL, NULL, true);
    }
    {
        /* A binary-extension body: pad its buffer so that the binary section starts on a
         * 16-byte boundary (malloc's blocks are 16-aligned), where its tensors can be read
         * in place. A bad header is refused later, by infer_start. */
        if (c->route == ROUTE_INFER && c->hlen_ok && c->hlen != (size_t)-1)
            c->body_pad = (16 - c->hlen % 16) % 16;
    }
    if (h.content_length != NULL) {
        const char *cl = h.content_length;
        uint64_t limit = c->body_limit > 0 ? c->body_limit : s->opts->max_request_bytes;
        char *end;
        unsigned long long n;
        errno = 0;
        n = strtoull(cl, &end, 10);
        if (errno == 0 && end != cl && n > limit)
            /* Refuse before buffering anything; MHD then discards the body and closes. */
            return send_error(c, MHD_HTTP_CONTENT_TOO_LARGE,
                              "request body of %llu bytes exceeds the limit of %" PRIu64 " bytes",
                              n, limit);
        /* MHD holds the client to Content-Length, so the buffer can be sized once instead of
         * grown (realloc) as the body arrives. Only up to BODY_PRESIZE_MAX before the bytes
         * are there (larger bodies grow as they arrive, to exactly their length): a client
         * that announces a large body and sends nothing holds 64 KiB, not the limit. */
        if (errno == 0 && end != cl && n > 0 && c->body_limit > 0 && rc == 0) {
            size_t cap = n < BODY_PRESIZE_MAX ? n : BODY_PRESIZE_MAX;
            char *base;
            c->body_expect = (size_t)n;
            if (c->body_pad + cap + 1 <= LOOP_BUF) { /* small: a pooled buffer */
                if ((base = loop_buf_take()) != NULL) {
                    c->body_pooled = true;
                    cap = LOOP_BUF - c->body_pad - 1;
                }
            } else {
                base = malloc(c->body_pad + cap + 1);
            }
            if (base != NULL) {
                c->body = base + c->body_pad;
                c->body_cap = cap;
                c->body[0] = '\0';
            }
        }
    }
    if (rc != 0) {
        /* Answered in the final call, after the body (if any) was discarded. */
        c->route = ROUTE_UNKNOWN;
        c->method_ok = true;
        c->route_status = rc;
        snprintf(c->route_msg, sizeof(c->route_msg), "%s", msg);
    }
    return MHD_YES;
}

static enum MHD_Result final_call(srv_conn *c)
{
    srv_reply r = {0};

    if (c->stepped)
        c->recv_end_ns = now_ns();
    if (c->too_large) {
        /* A body without Content-Length that grew past the limit. */
        keel__srv_reply_error(&r, MHD_HTTP_CONTENT_TOO_LARGE,
                              "request body exceeds the limit of %zu bytes", c->body_limit);
        return send_reply(c, &r, NULL, NULL, true);
    }
    if (c->route == ROUTE_UNKNOWN)
        return send_error(c, c->route_status, "%s", c->route_msg);
    if (!c->method_ok) {
        keel__srv_reply_error(&r, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed; use %s",
                              c->allow);
        r.allow = c->allow;
        return send_reply(c, &r, NULL, NULL, false);
    }
    switch (c->route) {
    case ROUTE_INFER:
        return infer_start(c);
    case ROUTE_REPO_LOAD:
    case ROUTE_REPO_UNLOAD:
        return control_start(c);
    case ROUTE_METRICS: /* rendered on the scrape thread, never on this loop */
        return job_start(c, &c->s->scrapeq);
    case ROUTE_TRACE_SETTING: {
        char *json = NULL;
        unsigned st =
            keel__srv_trace_setting(c->s->trace, c->s->rt, c->model, strcmp(c->method, "POST") == 0,
                                    c->body, c->body_len, &json);
        if (json == NULL)
            return send_error(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        r.status = st;
        r.body = json;
        r.len = strlen(json);
        r.ctype = JSON_TYPE;
        return send_reply(c, &r, NULL, NULL, false);
    }
    default:
        keel__srv_route_sync(c->s, c, &r);
        return send_reply(c, &r, NULL, NULL, false);
    }
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    keel_srv *s = cls;
    srv_conn *c = *con_cls;

    if (c == NULL)
        return MHD_NO; /* on_uri had no memory: MHD closes the connection */
    if (!c->begun)
        return first_call(s, mc, url, method, version, c);
    switch (c->state) {
    case CONN_READING:
        if (*upload_data_size != 0) {
            take_body(c, upload_data, *upload_data_size);
            *upload_data_size = 0;
            /* A client that keeps sending long after the limit is cut off. */
            if (c->discarded > s->opts->max_request_bytes)
                return MHD_NO;
            /* A body that can never be completed: close now, not at the timeout. */
            if (c->body_expect > 0 && c->body_len + c->discarded < c->body_expect &&
                client_left(mc))
                return MHD_NO;
            return MHD_YES;
        }
        return final_call(c);
    case CONN_RESUMED:
        return answer_resumed(c);
    default:
        /* MHD does not call a suspended connection's handler, nor one with a response. */
        *upload_data_size = 0;
        return MHD_YES;
    }
}

/* ---------------------------------------------------------------- the hang-up watcher */

/* Cancels the requests of batch (pinned under s->mu by the caller), then unpins them and
 * resumes those whose completion ran meanwhile. */
static void cancel_batch(keel_srv *s, srv_conn **batch, size_t n, bool shutdown)
{
    size_t nresume = 0;

    for (size_t i = 0; i < n; i++) {
        /* KEEL_EINVAL means it already completed; the unpin below resumes it. */
        if (keel_request_cancel(batch[i]->req) == KEEL_OK)
            atomic_fetch_add_explicit(shutdown ? &s->canceled_shutdown : &s->canceled_hangup, 1,
                                      memory_order_relaxed);
    }
    pthread_mutex_lock(&s->mu);
    for (size_t i = 0; i < n; i++) {
        srv_conn *c = batch[i];
        c->pinned = false;
        if (c->done && c->state == CONN_PARKED) {
            parked_unlink_locked(s, c);
            c->state = CONN_RESUMED;
            batch[nresume++] = c; /* keep the ones to resume at the front */
        }
    }
    pthread_mutex_unlock(&s->mu);
    for (size_t i = 0; i < nresume; i++) {
        keel__http_resume(batch[i]->loop, batch[i]->mhd);
        pending_done(s);
    }
}

static void *watcher_loop(void *arg)
{
    keel_srv *s = arg;
    struct pollfd *pfd = s->watch_pfd;
    srv_conn **conns = s->watch_conns;
    const size_t cap = s->watch_cap;

    pthread_mutex_lock(&s->mu);
    while (!s->watch_stop) {
        size_t n = 0, nbatch = 0;
        bool all = s->cancel_all;

        if (s->nparked == 0) {
            s->watch_idle = true; /* the next park wakes us (a timed wait needs no signal) */
            pthread_cond_wait(&s->watch_cv, &s->mu);
            s->watch_idle = false;
            continue;
        }
        for (srv_conn *c = s->parked; c != NULL && n < cap; c = c->next) {
            if (c->route != ROUTE_INFER || c->done || c->pinned || c->cancelled)
                continue; /* a cancelled running request stays parked until it returns */
            conns[n] = c;
            pfd[n].fd = c->fd;
            pfd[n].events = POLLRDHUP;
            pfd[n].revents = 0;
            n++;
        }
        if (n > 0 && !all && poll(pfd, (nfds_t)n, 0) <= 0)
            n = 0;
        for (size_t i = 0; i < n; i++) {
            if (all || (pfd[i].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0) {
                conns[i]->pinned = true;
                conns[i]->cancelled = true;
                conns[i]->cancel_shutdown = all;
                conns[nbatch++] = conns[i];
            }
        }
        if (nbatch > 0) {
            pthread_mutex_unlock(&s->mu);
            if (!all && keel__srv_log_on(KEEL_LOG_DEBUG)) {
                char nb[24];
                keel__srv_log(KEEL_LOG_DEBUG, "client gone, cancelling request", "count",
                              keel__srv_fmt(nb, sizeof(nb), "%zu", nbatch), NULL);
            }
            cancel_batch(s, conns, nbatch, all);
            pthread_mutex_lock(&s->mu);
            continue;
        }
        {
            struct timespec dl = deadline_in_ms(WATCH_INTERVAL_MS);
            pthread_cond_timedwait(&s->watch_cv, &s->mu, &dl);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static keel_err watcher_start(keel_srv *s)
{
    /* The connection limit is split between the HTTP loops, at least 1 each: leave room. */
    size_t cap = (size_t)s->opts->max_connections + s->opts->http_threads + 64;

    s->watch_cap = cap;
    s->watch_pfd = calloc(cap, sizeof(*s->watch_pfd));
    s->watch_conns = calloc(cap, sizeof(*s->watch_conns));
    if (s->watch_pfd == NULL || s->watch_conns == NULL)
        return KEEL_ENOMEM; /* freed by watcher_stop */
    if (pthread_create(&s->watcher, NULL, watcher_loop, s) != 0)
        return KEEL_ENOMEM;
    s->watcher_started = true;
    return KEEL_OK;
}

static void watcher_stop(keel_srv *s)
{
    if (s->watcher_started) {
        pthread_mutex_lock(&s->mu);
        s->watch_stop = true;
        pthread_cond_broadcast(&s->watch_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->watcher, NULL);
        s->watcher_started = false;
    }
    free(s->watch_pfd);
    free(s->watch_conns);
    s->watch_pfd = NULL;
    s->watch_conns = NULL;
}

/* ---------------------------------------------------------------- start and shutdown */

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
/* MHD's error log. Before the daemon listens its messages (why it cannot bind, ...) are
 * warnings; afterwards they are mostly clients misbehaving, logged at debug. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    keel_srv *s = cls;
    char msg[512];
    size_t n;

    if (vsnprintf(msg, sizeof(msg), fmt, ap) < 0)
        return;
    n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    keel__srv_log(atomic_load(&s->listening) ? KEEL_LOG_DEBUG : KEEL_LOG_WARN, msg, "component",
                  "http", NULL);
}
#pragma GCC diagnostic pop

typedef union srv_addr {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} srv_addr;

/* Parses an IPv4 or IPv6 literal ("localhost" = 127.0.0.1). */
static bool addr_parse(const char *text, int port, srv_addr *a, bool *v6)
{
    memset(a, 0, sizeof(*a));
    *v6 = false;
    if (strcmp(text, "localhost") == 0)
        text = "127.0.0.1";
    if (inet_pton(AF_INET, text, &a->v4.sin_addr) == 1) {
        a->v4.sin_family = AF_INET;
        a->v4.sin_port = htons((uint16_t)port);
        return true;
    }
    if (inet_pton(AF_INET6, text, &a->v6.sin6_addr) == 1) {
        a->v6.sin6_family = AF_INET6;
        a->v6.sin6_port = htons((uint16_t)port);
        *v6 = true;
        return true;
    }
    return false;
}

/* Opens the listening socket and starts the HTTP loops (http_loop.c). */
static srv_http *http_start(keel_srv *s, const srv_addr *addr, bool v6, unsigned *port, char *err,
                            size_t errlen)
{
    const keel_server_opts *o = s->opts;
    srv_http_opts ho = {
        .addr = &addr->sa,
        .addrlen = v6 ? sizeof(addr->v6) : sizeof(addr->v4),
        .threads = o->http_threads,
        .max_connections = o->max_connections,
        .timeout_secs = o->http_timeout_secs,
        .connection_memory = o->http_connection_memory,
        .strictness = STRICTNESS,
    };
    srv_http_cbs cbs = {on_request, on_completed, on_uri, mhd_log, after_turn, gathered, s};

    return keel__http_start(&ho, &cbs, port, err, errlen);
}

/* Waits up to timeout_ms (-1 = forever) for SIGTERM/SIGINT. Returns the signal, or 0.
 * SIGHUP (logrotate) reopens the access log and returns 0. */
static int wait_signal(keel_srv *s, int sfd, int timeout_ms)
{
    struct pollfd p = {.fd = sfd, .events = POLLIN, .revents = 0};
    struct signalfd_siginfo si;
    int r = poll(&p, 1, timeout_ms);

    if (r <= 0)
        return 0; /* timeout, or EINTR (a stop/continue): the caller re-checks its clock */
    if (read(sfd, &si, sizeof(si)) != (ssize_t)sizeof(si))
        return 0;
    if (si.ssi_signo == SIGHUP) {
        if (s->alog != NULL)
            keel__srv_alog_reopen(s->alog);
        return 0;
    }
    return (int)si.ssi_signo;
}

static const char *signal_name(int sig)
{
    return sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" : "signal";
}

/* --load-model NAME: loads one model at start; a failure is logged and ends the start. */
static keel_err load_start_model(keel_srv *s, const char *name)
{
    char msg[ERRMSG_LEN];
    keel_err err;

    if ((err = keel_model_load(s->rt, name, msg, sizeof(msg))) != KEEL_OK)
        keel__srv_log(KEEL_LOG_ERROR, "--load-model failed", "model", name, "error",
                      msg[0] != '\0' ? msg : keel_strerror(err), NULL);
    return err;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* --load-model '*' (Triton's spelling): every model of the repository (keel_model_list lists
 * each directory with a config.json), in name order, as if each were named. */
static keel_err load_every_model(keel_srv *s)
{
    keel_model_status *list = NULL;
    size_t n = 0, nnames = 0;
    char **names = NULL;
    keel_err err;

    if ((err = keel_model_list(s->rt, &list, &n)) != KEEL_OK ||
        (n > 0 && (names = calloc(n, sizeof(*names))) == NULL)) {
        keel__srv_log(KEEL_LOG_ERROR, "--load-model '*': cannot list the repository", "error",
                      keel_strerror(err != KEEL_OK ? err : KEEL_ENOMEM), NULL);
        keel_model_status_free(list, n);
        return err != KEEL_OK ? err : KEEL_ENOMEM;
    }
    for (size_t i = 0; i < n && err == KEEL_OK; i++) {
        bool seen = false; /* one row per version: one name per model */
        for (size_t j = 0; j < nnames && !seen; j++)
            seen = strcmp(names[j], list[i].name) == 0;
        if (!seen && (names[nnames++] = strdup(list[i].name)) == NULL)
            err = KEEL_ENOMEM;
    }
    keel_model_status_free(list, n);
    if (err != KEEL_OK)
        keel__srv_log(KEEL_LOG_ERROR, "--load-model '*': out of memory", NULL);
    else
        qsort(names, nnames, sizeof(*names), name_cmp);
    for (size_t i = 0; i < nnames && err == KEEL_OK; i++)
        err = load_start_model(s, names[i]);
    for (size_t i = 0; i < nnames; i++)
        free(names[i]);
    free(names);
    return err;
}

static void log_models(keel_srv *s)
{
    keel_model_status *list = NULL;
    size_t n = 0;

    if (keel_model_list(s->rt, &list, &n) != KEEL_OK)
        return;
    for (size_t i = 0; i < n; i++) {
        char v[24];
        if (list[i].state == KEEL_MODEL_FAILED)
            keel__srv_log(KEEL_LOG_ERROR, "model failed to load", "model", list[i].name, "error",
                          list[i].last_error_msg[0] != '\0' ? list[i].last_error_msg
                                                            : keel_strerror(list[i].last_error),
                          NULL);
        else
            keel__srv_log(KEEL_LOG_INFO, "model", "model", list[i].name, "version",
                          list[i].version >= 0
                              ? keel__srv_fmt(v, sizeof(v), "%" PRId64, list[i].version)
                              : "-",
                          "state", keel_model_state_name(list[i].state), NULL);
    }
    keel_model_status_free(list, n);
}

/*
 * Stops accepting connections and lets the requests already being received get their answer
 * (503 "shutting down" for new work). The listening socket is shut down, so further connects
 * are refused at once, but it is closed only after MHD_stop_daemon (MHD's rule for a
 * quiesced socket). Returns when no connection is left, or no request has been in progress
 * for QUIET_MS (what is left are idle keep-alive connections), or after CLOSE_WAIT_MS.
 */
static void stop_accepting(keel_srv *s, bool hurry)
{
    uint64_t t0 = now_ns(), quiet_since = t0;

    atomic_store(&s->conn_close, true);
    keel__http_quiesce(s->http);
    while (!hurry && now_ns() - t0 < (uint64_t)CLOSE_WAIT_MS * 1000000u) {
        uint64_t now = now_ns();
        if (keel__http_connections(s->http) == 0)
            break;
        if (atomic_load(&s->http_open) > 0)
            quiet_since = now;
        else if (now - quiet_since >= (uint64_t)QUIET_MS * 1000000u)
            break;
        usleep(10000);
    }
}

/* The stuck-call guard. When the drain's exit timeout has passed, every request still in
 * flight is cancelled and answered, but the rest of the shutdown (the wait for a request
 * running on an I/O thread, the HTTP loops, gRPC, keel_runtime_destroy) still waits for model
 * calls in progress: a cancelled request's call runs on, and its generation cannot be freed
 * while a backend is inside it. A call that never returns would keep the process alive
 * forever, holding its port and telling the orchestrator nothing. So a thread started at the
 * exit timeout waits up to --stuck-exit-secs for keel_server_run to finish; if it has not, it
 * logs what is stuck and ends the process with _exit(KEEL_SERVER_EXIT_STUCK): no destructor,
 * no free of memory a backend thread may still be using. It reads only the server (freed
 * after the guard is joined), never the runtime (freed by the teardown it watches): the
 * contexts stuck are a snapshot keel_server_run takes after the drain. mu guards done and
 * stuck; s->mu is taken after it is unlocked, never under it. */
typedef struct stuck_guard {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC (cond_init) */
    bool done;
    unsigned secs;
    int64_t stuck; /* contexts stuck when the drain ended; -1: it did not end */
    keel_srv *s;
} stuck_guard;

static void *stuck_guard_main(void *arg)
{
    stuck_guard *g = arg;
    struct timespec dl = deadline_in_ms((uint64_t)g->secs * 1000u);
    int64_t stuck, pending;
    bool done;
    char b1[24], b2[24], b3[24];

    pthread_mutex_lock(&g->mu);
    while (!g->done && pthread_cond_timedwait(&g->cv, &g->mu, &dl) != ETIMEDOUT)
        ;
    done = g->done;
    stuck = g->stuck;
    pthread_mutex_unlock(&g->mu);
    if (done)
        return NULL;
    pending = atomic_load(&g->s->pending);
    keel__srv_log(KEEL_LOG_ERROR,
                  "stuck exit: model calls still running after the exit timeout; exiting "
                  "without waiting for them or freeing the runtime",
                  "contexts_stuck", keel__srv_fmt(b1, sizeof(b1), "%" PRId64, stuck), "in_flight",
                  keel__srv_fmt(b2, sizeof(b2), "%" PRId64, pending), "waited_secs",
                  keel__srv_fmt(b3, sizeof(b3), "%u", g->secs), NULL);
    _exit(KEEL_SERVER_EXIT_STUCK);
}

/* Starts the guard; false (and nothing started) if it cannot: the shutdown then waits as
 * before, which it logs. */
static bool stuck_guard_start(stuck_guard *g, keel_srv *s, unsigned secs)
{
    g->done = false;
    g->secs = secs;
    g->stuck = -1;
    g->s = s;
    if (pthread_mutex_init(&g->mu, NULL) != 0)
        goto fail;
    if (cond_init(&g->cv) != 0) {
        pthread_mutex_destroy(&g->mu);
        goto fail;
    }
    if (pthread_create(&g->thread, NULL, stuck_guard_main, g) != 0) {
        pthread_cond_destroy(&g->cv);
        pthread_mutex_destroy(&g->mu);
        goto fail;
    }
    return true;
fail:
    keel__srv_log(KEEL_LOG_WARN,
                  "cannot start the stuck-call guard; the shutdown waits for model calls "
                  "however long they run",
                  NULL);
    return false;
}

static void stuck_guard_set_stuck(stuck_guard *g, int64_t stuck)
{
    pthread_mutex_lock(&g->mu);
    g->stuck = stuck;
    pthread_mutex_unlock(&g->mu);
}

static void stuck_guard_stop(stuck_guard *g)
{
    pthread_mutex_lock(&g->mu);
    g->done = true;
    pthread_cond_signal(&g->cv);
    pthread_mutex_unlock(&g->mu);
    pthread_join(g->thread, NULL);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
}

/*
 * The staged shutdown after the first signal (see the DESIGN at the top). Returns when
 * nothing is in flight and no new connection is accepted; MHD and the runtime are still up.
 */
static void drain(keel_srv *s, int sfd, stuck_guard *guard, bool *guarded)
{
    const keel_server_opts *o = s->opts;
    bool hurry = false;
    uint64_t t0 = now_ns(), deadline;
    int64_t left;
    char b1[24], b2[24];

    atomic_store(&s->not_ready, true);
    /* Grace: still serving, but not ready, so load balancers move traffic away. */
    deadline = t0 + (uint64_t)o->shutdown_grace_secs * 1000000000u;
    while (!hurry && now_ns() < deadline) {
        uint64_t ms = (deadline - now_ns()) / 1000000u + 1;
        int sig = wait_signal(s, sfd, ms > 1000 ? 1000 : (int)ms);
        if (sig != 0) {
            keel__srv_log(KEEL_LOG_WARN, "second signal: skipping the grace and drain waits",
                          "signal", signal_name(sig), NULL);
            hurry = true;
        }
    }

    atomic_store(&s->draining, true); /* before the count is read: serving.c's admit */
    left = atomic_load(&s->pending);
    keel__srv_log(KEEL_LOG_INFO, "draining", "in_flight",
                  keel__srv_fmt(b1, sizeof(b1), "%" PRId64, left), NULL);
    keel__srv_jobq_stop(&s->ctlq);
    keel__srv_jobq_stop(&s->scrapeq);

    /* Let in-flight requests finish, up to the exit timeout. */
    deadline = now_ns() + (uint64_t)o->exit_timeout_secs * 1000000000u;
    pthread_mutex_lock(&s->mu);
    while (atomic_load(&s->pending) > 0 && !hurry && now_ns() < deadline) {
        struct timespec dl = deadline_in_ms(100);
        pthread_cond_timedwait(&s->idle_cv, &s->mu, &dl);
        if (atomic_load(&s->pending) > 0) {
            pthread_mutex_unlock(&s->mu);
            if (wait_signal(s, sfd, 0) != 0) {
                keel__srv_log(KEEL_LOG_WARN, "second signal: cancelling requests in flight", NULL);
                hurry = true;
            }
            pthread_mutex_lock(&s->mu);
        }
    }
    left = atomic_load(&s->pending);
    pthread_mutex_unlock(&s->mu);
    /* From here the shutdown is bounded by --stuck-exit-secs (stuck_guard). */
    *guarded = stuck_guard_start(guard, s, s->opts->stuck_exit_secs);
    pthread_mutex_lock(&s->mu);
    if (left > 0) {
        /* Cancel the rest. Queued and running requests complete at once (a running one's
         * backend call runs on). The watcher keeps cancelling late parkers. */
        s->cancel_all = true;
        pthread_cond_broadcast(&s->watch_cv);
        pthread_mutex_unlock(&s->mu);
        keel__srv_log(KEEL_LOG_WARN, "exit timeout: cancelling requests in flight", "in_flight",
                      keel__srv_fmt(b1, sizeof(b1), "%" PRId64, left), NULL);
        pthread_mutex_lock(&s->mu);
        while (atomic_load(&s->pending) > 0) {
            struct timespec dl = deadline_in_ms(5000);
            if (pthread_cond_timedwait(&s->idle_cv, &s->mu, &dl) == ETIMEDOUT &&
                atomic_load(&s->pending) > 0)
                keel__srv_log(KEEL_LOG_WARN, "waiting for running requests to return", "in_flight",
                              keel__srv_fmt(b1, sizeof(b1), "%" PRId64, atomic_load(&s->pending)),
                              NULL);
        }
    }
    pthread_mutex_unlock(&s->mu);
    stop_accepting(s, hurry);
    keel__srv_log(KEEL_LOG_INFO, "drained", "cancelled",
                  keel__srv_fmt(b1, sizeof(b1), "%" PRIu64, atomic_load(&s->canceled_shutdown)),
                  "duration_ms",
                  keel__srv_fmt(b2, sizeof(b2), "%" PRIu64, (now_ns() - t0) / 1000000u), NULL);
}

int keel_server_run(const keel_server_opts *o)
{
    keel_srv *s = NULL;
    keel_runtime_opts ro;
    srv_addr addr;
    bool v6 = false;
    sigset_t set;
    int sfd = -1;
    int rc = KEEL_SERVER_EXIT_RUNTIME;
    int sig;
    bool locks = false;
    keel_err err;
    unsigned port = 0;
    char herr[256];
    char addrtext[INET6_ADDRSTRLEN];
    char pbuf[16];
    char status[160];
    keel__srv_watchdog *wd = NULL;
    stuck_guard guard;
    bool guarded = false;

    keel__srv_log_init(o->log_level);
    if (!addr_parse(o->http_address, o->http_port, &addr, &v6)) {
        fprintf(stderr, "keel serve: --http-address: '%s' is not an IPv4 or IPv6 address\n",
                o->http_address);
        return KEEL_SERVER_EXIT_USAGE;
    }
    /* Every thread inherits this mask: the signals are only ever read from the signalfd. */
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0 ||
        (sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot set up signal handling", "error", strerror(errno),
                      NULL);
        goto done;
    }
    signal(SIGPIPE, SIG_IGN);

    if ((s = calloc(1, sizeof(*s))) == NULL)
        goto nomem;
    s->opts = o;
    s->start_unix_ms = unix_ms();
    if (!keel__redact_init(&s->redact, o->model_repository))
        goto nomem;
    if (pthread_mutex_init(&s->mu, NULL) != 0)
        goto nomem;
    if (cond_init(&s->idle_cv) != 0) {
        pthread_mutex_destroy(&s->mu);
        goto nomem;
    }
    if (cond_init(&s->watch_cv) != 0) {
        pthread_cond_destroy(&s->idle_cv);
        pthread_mutex_destroy(&s->mu);
        goto nomem;
    }
    if (keel__srv_jobq_init(&s->ctlq, s, "control") != 0) {
        pthread_cond_destroy(&s->watch_cv);
        pthread_cond_destroy(&s->idle_cv);
        pthread_mutex_destroy(&s->mu);
        goto nomem;
    }
    if (keel__srv_jobq_init(&s->scrapeq, s, "scrape") != 0) {
        keel__srv_jobq_fini(&s->ctlq);
        pthread_cond_destroy(&s->watch_cv);
        pthread_cond_destroy(&s->idle_cv);
        pthread_mutex_destroy(&s->mu);
        goto nomem;
    }
    locks = true;
    if ((s->obs = keel__srv_obs_create()) == NULL ||
        (s->trace = keel__srv_trace_create(o->trace_dir)) == NULL)
        goto nomem;

    keel__srv_log(KEEL_LOG_INFO, "starting", "version", KEEL_VERSION_STRING, "repository",
                  o->model_repository, "control",
                  o->control == KEEL_SERVER_CONTROL_POLL       ? "poll"
                  : o->control == KEEL_SERVER_CONTROL_EXPLICIT ? "explicit"
                                                               : "none",
                  NULL);
    keel__srv_notify("STATUS=loading the models", NULL);
    keel_runtime_opts_init(&ro);
    ro.model_repository = o->model_repository;
    ro.control = o->control == KEEL_SERVER_CONTROL_EXPLICIT ? KEEL_CONTROL_EXPLICIT
                 : o->control == KEEL_SERVER_CONTROL_POLL   ? KEEL_CONTROL_POLL
                                                            : KEEL_CONTROL_NONE;
    ro.poll_interval_ms = o->repository_poll_secs * 1000u;
    ro.settle_ms = o->repository_settle_ms;
    ro.retry_max_ms = o->load_retry_max_secs * 1000u;
    ro.model_memory_limit = o->model_memory_limit;
    ro.worker_threads = o->worker_threads;
    /* No thread runs yet: the runtime forks its preprocessing fork server first. */
    ro.preprocess_workers = o->preprocess_workers;
    ro.preprocess_timeout_ms = o->preprocess_timeout_ms;
    ro.preprocess_max_bytes = o->preprocess_max_bytes;
    ro.inline_max_us = o->inline_max_us;
    s->submit_flags = o->infer_on_http_thread == KEEL_SERVER_INLINE_ON     ? KEEL_SUBMIT_RUN_HERE
                      : o->infer_on_http_thread == KEEL_SERVER_INLINE_AUTO ? KEEL_SUBMIT_RUN_IF_FAST
                                                                           : 0;
    /* The HTTP loops and gRPC's completion-queue thread also gather batching models'
     * requests and run the batches at the end of each turn (http_loop.c, grpc_server.c). */
    s->io_submit_flags = s->submit_flags | (s->submit_flags != 0 ? KEEL_SUBMIT_GATHER : 0);
    ro.log_fn = keel__srv_log_keel;
    ro.log_user = NULL;
    ro.log_level = o->log_level;
    if ((err = keel_runtime_create(&ro, &s->rt)) != KEEL_OK) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot serve the model repository", "repository",
                      o->model_repository, "error",
                      err == KEEL_ENOTFOUND ? "no such directory" : keel_strerror(err), NULL);
        goto done;
    }
    if (o->nload_models == 1 && strcmp(o->load_models[0], "*") == 0)
        err = load_every_model(s);
    else
        for (size_t i = 0; i < o->nload_models && err == KEEL_OK; i++)
            err = load_start_model(s, o->load_models[i]);
    if (err != KEEL_OK)
        goto done;
    log_models(s);
    /* The log's writer thread starts only now: keel_runtime_create forked the preprocessing
     * fork server first, from a process with no other thread. */
    if (o->access_log != NULL) {
        char msg[ERRMSG_LEN];
        if (keel__srv_alog_open(o->access_log, o->access_log_json ? SRV_ALOG_JSON : SRV_ALOG_LOGFMT,
                                (size_t)o->access_log_buffer_bytes, &s->alog, msg,
                                sizeof(msg)) != KEEL_OK) {
            keel__srv_log(KEEL_LOG_ERROR, "cannot start the access log", "error", msg, NULL);
            goto done;
        }
    }

    if (o->control == KEEL_SERVER_CONTROL_EXPLICIT &&
        keel__srv_jobq_start(&s->ctlq, conn_complete) != KEEL_OK) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot start the model control thread", NULL);
        goto done;
    }
    if (keel__srv_jobq_start(&s->scrapeq, conn_complete) != KEEL_OK) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot start the scrape thread", NULL);
        goto done;
    }
    if (watcher_start(s) != KEEL_OK) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot start the hang-up watcher", NULL);
        goto done;
    }
    /* gRPC starts its threads here, long after the runtime forked its fork server. */
    if (o->grpc_port >= 0 && keel__grpc_start(s) != KEEL_OK)
        goto done;
    if ((s->http = http_start(s, &addr, v6, &port, herr, sizeof(herr))) == NULL) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot listen", "address", o->http_address, "port",
                      keel__srv_fmt(pbuf, sizeof(pbuf), "%d", o->http_port), "reason", herr, NULL);
        goto done;
    }
    atomic_store(&s->listening, true);
    if (inet_ntop(v6 ? AF_INET6 : AF_INET,
                  v6 ? (void *)&addr.v6.sin6_addr : (void *)&addr.v4.sin_addr, addrtext,
                  sizeof(addrtext)) == NULL)
        snprintf(addrtext, sizeof(addrtext), "%s", o->http_address);
    /* The contract with scripts and tests: exactly this line on stdout, once. */
    printf("level=info msg=listening address=%s port=%u\n", addrtext, port);
    fflush(stdout);
    keel__srv_log(KEEL_LOG_INFO, "listening", "address", addrtext, "port",
                  keel__srv_fmt(pbuf, sizeof(pbuf), "%u", port), NULL);
    keel__grpc_print_listening(s);
    /* systemd (Type=notify): the start set is loaded and the port answers. */
    snprintf(status, sizeof(status), "serving on %s port %u", addrtext, port);
    keel__srv_notify("READY=1", status);
    if (keel__srv_watchdog_start(v6, port, &wd) != KEEL_OK) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot start the systemd watchdog thread", NULL);
        goto done;
    }

    while ((sig = wait_signal(s, sfd, -1)) == 0)
        ;
    keel__srv_log(KEEL_LOG_INFO, "shutting down", "signal", signal_name(sig), NULL);
    /* The drain may outlast WatchdogSec; systemd stops watching once it reads STOPPING=1. */
    keel__srv_watchdog_stop(wd);
    wd = NULL;
    snprintf(status, sizeof(status), "draining after %s", signal_name(sig));
    keel__srv_notify("STOPPING=1", status);
    drain(s, sfd, &guard, &guarded);
    rc = KEEL_SERVER_EXIT_OK;
    if (guarded) {
        keel_counters c;
        keel_counters_get(s->rt, &c);
        stuck_guard_set_stuck(&guard, c.contexts_stuck);
    }
    goto done;

nomem:
    keel__srv_log(KEEL_LOG_ERROR, "out of memory", NULL);
done:
    keel__srv_watchdog_stop(wd);
    if (s != NULL) {
        if (locks) {
            /* Also the error paths: no connection can be in flight unless MHD started,
             * and then drain() has run or nothing was ever submitted. */
            keel__srv_jobq_stop(&s->ctlq);
            keel__srv_jobq_stop(&s->scrapeq);
            watcher_stop(s);
        }
        keel__grpc_stop(s);       /* nothing in flight is left after drain(); NULL-safe */
        keel__http_stop(s->http); /* NULL-safe */
        /* No request can be observed any more: the daemon has stopped. */
        keel__srv_alog_close(s->alog);
        keel__srv_trace_destroy(s->trace);
        keel__srv_obs_destroy(s->obs);
        keel_runtime_destroy(s->rt);
        if (guarded)
            stuck_guard_stop(&guard); /* the teardown finished in time */
        if (locks) {
            keel__srv_jobq_fini(&s->scrapeq);
            keel__srv_jobq_fini(&s->ctlq);
            pthread_cond_destroy(&s->watch_cv);
            pthread_cond_destroy(&s->idle_cv);
            pthread_mutex_destroy(&s->mu);
        }
        keel__redact_fini(&s->redact);
        free(s);
    }
    if (sfd >= 0)
        close(sfd);
    if (rc == KEEL_SERVER_EXIT_OK)
        keel__srv_log(KEEL_LOG_INFO, "stopped", NULL);
    return rc;
}
