/*
 * perf_load.c: the load generator of keel perf and keel soak.
 *
 * DESIGN
 * One thread, one epoll set, non-blocking keep-alive connections, each with at most one
 * request in flight (no pipelining, like wrk and perf_analyzer). Closed loop: `concurrency`
 * connections each send the next request as soon as the previous answer arrived. Open loop:
 * request k is due at t0 + k / rate whether or not earlier ones were answered; a due request
 * waits for an idle connection (opening new ones up to max_connections), and its latency is
 * measured from its due time, so a stalled server cannot hide its stall by slowing the
 * generator down (coordinated omission). The loop owns its sockets, histogram and buffers; the
 * only cross-thread input is the optional stop flag (an atomic), which soak's swap thread sets
 * when it is done. Time is CLOCK_MONOTONIC nanoseconds throughout. The top of src/perf/: calls
 * perf_bodies (the workload it sends), perf_http, perf_hist and perf_util, and hands a gRPC
 * workload to perf_grpc.c's loop.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "perf_bodies.h"
#include "perf_grpc.h"
#include "perf_hist.h"
#include "perf_http.h"
#include "perf_load.h"
#include "perf_util.h"

static const char *const terr_names[PERF_TERR_COUNT_] = {
    [PERF_TERR_CONNECT] = "connect",
    [PERF_TERR_RESET] = "reset",
    [PERF_TERR_TIMEOUT] = "timeout",
    [PERF_TERR_PROTOCOL] = "protocol",
};

const char *perf_terr_name(int kind)
{
    return kind >= 0 && kind < PERF_TERR_COUNT_ ? terr_names[kind] : "?";
}

bool perf_result_init(perf_result *r)
{
    memset(r, 0, sizeof(*r));
    return perf_hist_init(&r->hist);
}

void perf_result_fini(perf_result *r)
{
    perf_hist_fini(&r->hist);
}

void perf_result_errors(const perf_result *r, char *buf, size_t len)
{
    size_t off = 0;

    buf[0] = '\0';
    for (int s = 0; s < PERF_MAX_STATUS; s++) {
        if (r->status[s] > 0 && off < len)
            off += (size_t)snprintf(buf + off, len - off, "%s%d:%" PRIu64, off ? ";" : "", s,
                                    r->status[s]);
    }
    for (int c = 0; c < 17; c++) {
        if (r->grpc_status[c] > 0 && off < len)
            off += (size_t)snprintf(buf + off, len - off, "%s%s:%" PRIu64, off ? ";" : "",
                                    perf_grpc_code_name(c), r->grpc_status[c]);
    }
    if (r->stream_errors > 0 && off < len)
        off += (size_t)snprintf(buf + off, len - off, "%sstream_error:%" PRIu64, off ? ";" : "",
                                r->stream_errors);
    for (int k = 0; k < PERF_TERR_COUNT_; k++) {
        if (r->terr[k] > 0 && off < len)
            off += (size_t)snprintf(buf + off, len - off, "%s%s:%" PRIu64, off ? ";" : "",
                                    terr_names[k], r->terr[k]);
    }
}

enum { PC_CLOSED, PC_CONNECTING, PC_IDLE, PC_BUSY };

typedef struct pconn {
    int fd;
    int state;
    bool in_idle_list;
    const char *out;
    size_t out_len, out_off;
    char *in;
    size_t in_len, in_cap;
    uint64_t t_intended, t_sent;
    uint64_t retry_at; /* after a failed connect: not before this time (no busy loop) */
} pconn;

typedef struct loop {
    const perf_workload *w;
    const perf_load_opts *o;
    perf_result *r;
    int ep;
    pconn *conns;
    size_t nconns, open;
    size_t *idle; /* stack of idle connection indices */
    size_t nidle;
    size_t next_req;
    uint64_t t_meas, t_end; /* measured window [t_meas, t_end) */
    bool issuing;
} loop;

#define note_failure(r, ...) perf_note((r)->notes, &(r)->nnotes, PERF_FAILURE_NOTES, __VA_ARGS__)

static void conn_close(loop *L, pconn *c)
{
    if (c->fd != -1) {
        epoll_ctl(L->ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        L->open--;
    }
    c->fd = -1;
    c->state = PC_CLOSED;
    c->in_len = 0;
    if (c->in_idle_list) {
        for (size_t i = L->nidle; i-- > 0;) {
            if (&L->conns[L->idle[i]] == c) {
                L->idle[i] = L->idle[--L->nidle];
                break;
            }
        }
        c->in_idle_list = false;
    }
}

static bool measured(const loop *L, const pconn *c)
{
    return c->t_intended >= L->t_meas;
}

/* A request failed at the transport level: count it if measured, close the connection. */
static void conn_fail(loop *L, pconn *c, int kind, int err)
{
    if (c->state == PC_BUSY && measured(L, c)) {
        L->r->terr[kind]++;
        L->r->failed++;
        note_failure(L->r, "%s: %s", terr_names[kind], err != 0 ? strerror(err) : "");
    } else if (c->state == PC_CONNECTING && L->t_meas <= perf_now_ns()) {
        L->r->terr[kind]++;
        L->r->failed++;
        note_failure(L->r, "%s: %s", terr_names[kind], err != 0 ? strerror(err) : "");
    }
    if (kind == PERF_TERR_CONNECT)
        c->retry_at = perf_now_ns() + 10000000u;
    conn_close(L, c);
}

static bool conn_open(loop *L, pconn *c)
{
    struct epoll_event ev;

    c->fd = perf_target_connect(&L->w->target, true);
    if (c->fd == -1) {
        int e = errno;
        c->state = PC_CONNECTING;
        conn_fail(L, c, PERF_TERR_CONNECT, e);
        return false;
    }
    L->open++;
    if (L->open > L->r->max_conns)
        L->r->max_conns = L->open;
    c->state = PC_CONNECTING;
    c->in_len = 0;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP;
    ev.data.ptr = c;
    if (epoll_ctl(L->ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        int e = errno;
        conn_fail(L, c, PERF_TERR_CONNECT, e);
        return false;
    }
    return true;
}

static void make_idle(loop *L, pconn *c)
{
    c->state = PC_IDLE;
    if (!c->in_idle_list) {
        L->idle[L->nidle++] = (size_t)(c - L->conns);
        c->in_idle_list = true;
    }
}

static void conn_flush(loop *L, pconn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return; /* EPOLLOUT (edge) tells when to go on */
        } else {
            conn_fail(L, c, PERF_TERR_RESET, n < 0 ? errno : 0);
            return;
        }
    }
}

static void conn_send(loop *L, pconn *c, uint64_t intended, uint64_t now)
{
    size_t k = L->next_req++ % L->w->nreqs;

    if (c->in_idle_list) {
        for (size_t i = L->nidle; i-- > 0;) {
            if (&L->conns[L->idle[i]] == c) {
                L->idle[i] = L->idle[--L->nidle];
                break;
            }
        }
        c->in_idle_list = false;
    }
    c->state = PC_BUSY;
    c->out = L->w->reqs[k];
    c->out_len = L->w->req_lens[k];
    c->out_off = 0;
    c->in_len = 0;
    c->t_intended = intended;
    c->t_sent = now;
    conn_flush(L, c);
}

/* A complete response of total bytes is at the start of c->in. */
static void conn_done(loop *L, pconn *c, const perf_http_resp *hr, size_t total, uint64_t now)
{
    perf_result *r = L->r;

    if (now >= L->t_meas && now < L->t_end)
        r->completed++;
    if (measured(L, c)) {
        if (hr->status >= 200 && hr->status < 300) {
            r->ok++;
            perf_hist_record(&r->hist, now - c->t_intended);
        } else {
            r->failed++;
            r->status[hr->status >= 0 && hr->status < PERF_MAX_STATUS ? hr->status : 0]++;
            if (r->nnotes < PERF_FAILURE_NOTES) {
                char *body = malloc(total + 1);
                if (body != NULL) {
                    perf_http_body(c->in, total, hr, body);
                    note_failure(r, "HTTP %d: %.160s", hr->status, body);
                    free(body);
                }
            }
        }
    }
    if (total < c->in_len)
        memmove(c->in, c->in + total, c->in_len - total);
    c->in_len -= total;
    if (hr->close) {
        conn_close(L, c);
        return;
    }
    make_idle(L, c);
}

static void conn_read(loop *L, pconn *c)
{
    for (;;) {
        ssize_t n;
        if (c->in_cap - c->in_len < 4096) {
            size_t ncap = c->in_cap == 0 ? 16384 : c->in_cap * 2;
            char *nb = realloc(c->in, ncap);
            if (nb == NULL) {
                conn_fail(L, c, PERF_TERR_PROTOCOL, ENOMEM);
                return;
            }
            c->in = nb;
            c->in_cap = ncap;
        }
        n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) {
            perf_http_resp hr;
            if (n == 0 && c->state == PC_BUSY && c->in_len > 0 &&
                perf_http_parse(c->in, c->in_len, &hr) == 0 && hr.until_close) {
                conn_done(L, c, &hr, c->in_len, perf_now_ns());
                conn_close(L, c);
                return;
            }
            if (c->state == PC_BUSY)
                conn_fail(L, c, PERF_TERR_RESET, n < 0 ? errno : ECONNRESET);
            else
                conn_close(L, c); /* the server closed an idle connection */
            return;
        }
        c->in_len += (size_t)n;
        if (c->state != PC_BUSY) {
            conn_fail(L, c, PERF_TERR_PROTOCOL, 0); /* bytes nobody asked for */
            return;
        }
        for (;;) {
            perf_http_resp hr;
            ssize_t total = perf_http_parse(c->in, c->in_len, &hr);
            if (total < 0) {
                conn_fail(L, c, PERF_TERR_PROTOCOL, EPROTO);
                return;
            }
            if (total == 0)
                break;
            if (hr.status / 100 == 1) { /* an interim answer: drop it, wait for the real one */
                memmove(c->in, c->in + total, c->in_len - (size_t)total);
                c->in_len -= (size_t)total;
                continue;
            }
            conn_done(L, c, &hr, (size_t)total, perf_now_ns());
            return;
        }
    }
}

/* User + system CPU seconds of the calling thread. */
static double thread_cpu_s(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void progress(const loop *L, uint64_t now, uint64_t t0)
{
    double el = (double)(now - t0) / 1e9, warm = L->o->warmup_s;
    const perf_result *r = L->r;

    if (now < L->t_meas)
        fprintf(stderr, "\r%s: warming up %.1f/%.1f s   \033[K", L->o->label, el, warm);
    else {
        double m = (double)(now - L->t_meas) / 1e9;
        fprintf(stderr, "\r%s: %.1f s  %" PRIu64 " ok  %.0f req/s  %" PRIu64 " failed\033[K",
                L->o->label, m, r->ok, m > 0 ? (double)r->completed / m : 0.0, r->failed);
    }
    fflush(stderr);
}

bool perf_load_run(const perf_workload *w, const perf_load_opts *o, perf_result *r, char *errbuf,
                   size_t errlen)
{
    loop L;
    struct epoll_event evs[256];
    uint64_t t0, next_progress, interval = 0, timeout_ns;
    double cpu0;
    uint64_t k_issued = 0; /* open loop: requests sent so far */
    bool stopping = false; /* the window ended (or *stop): last issuing pass, then drain */
    bool open_loop = o->rate > 0, ok = false, show = o->progress && isatty(2);
    size_t n;

    if (w->grpc)
        return perf_grpc_load_run(w, o, r, errbuf, errlen);
    memset(&L, 0, sizeof(L));
    L.w = w;
    L.o = o;
    L.r = r;
    n = open_loop ? (o->max_connections > 0 ? o->max_connections : 64) : o->concurrency;
    if (n == 0) {
        perf_errf(errbuf, errlen, "no connections to use");
        return false;
    }
    L.nconns = n;
    if ((L.ep = epoll_create1(EPOLL_CLOEXEC)) < 0) {
        perf_errf(errbuf, errlen, "epoll_create1: %s", strerror(errno));
        return false;
    }
    if ((L.conns = calloc(n, sizeof(*L.conns))) == NULL ||
        (L.idle = calloc(n, sizeof(*L.idle))) == NULL) {
        perf_errf(errbuf, errlen, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        L.conns[i].fd = -1;
        L.conns[i].state = PC_CLOSED;
    }
    timeout_ns = (uint64_t)(o->timeout_s * 1e9);
    cpu0 = thread_cpu_s();
    t0 = perf_now_ns();
    L.t_meas = t0 + (uint64_t)(o->warmup_s * 1e9);
    L.t_end = o->duration_s > 0 ? L.t_meas + (uint64_t)(o->duration_s * 1e9) : UINT64_MAX;
    if (open_loop)
        interval = (uint64_t)(1e9 / o->rate);
    next_progress = t0 + 500000000u;
    L.issuing = true;

    if (!open_loop) {
        for (size_t i = 0; i < n; i++)
            conn_open(&L, &L.conns[i]);
    }
    for (;;) {
        uint64_t now = perf_now_ns();
        int timeout_ms = 50, ne;
        uint64_t wait_ns = 0; /* open loop: sleep exactly until the next request is due */

        /* The last issuing pass (open loop: up to the end of the window) runs below, then
         * issuing stops. */
        if (L.issuing && (now >= L.t_end || (o->stop != NULL && atomic_load(o->stop)))) {
            stopping = true;
            if (L.t_end == UINT64_MAX || now < L.t_end)
                L.t_end = now;
        }
        /* Requests whose answer takes longer than the timeout fail. */
        for (size_t i = 0; i < n; i++) {
            pconn *c = &L.conns[i];
            if (c->state == PC_BUSY && now - c->t_sent > timeout_ns)
                conn_fail(&L, c, PERF_TERR_TIMEOUT, ETIMEDOUT);
            else if (c->state == PC_CONNECTING && now - c->t_sent > timeout_ns && c->t_sent != 0)
                conn_fail(&L, c, PERF_TERR_CONNECT, ETIMEDOUT);
        }
        if (L.issuing) {
            if (!open_loop && !stopping) {
                for (size_t i = 0; i < n; i++) {
                    pconn *c = &L.conns[i];
                    if (c->state == PC_CLOSED && now >= c->retry_at) {
                        if (conn_open(&L, c))
                            c->t_sent = now;
                    }
                    if (c->state == PC_IDLE)
                        conn_send(&L, c, now, now);
                }
            } else if (open_loop) {
                /* Requests due by now, and never any due after the window. */
                uint64_t horizon = now < L.t_end ? now : L.t_end;
                uint64_t due = (horizon - t0) / interval + 1;
                while (k_issued < due) {
                    uint64_t intended = t0 + k_issued * interval;
                    if (L.nidle > 0) {
                        conn_send(&L, &L.conns[L.idle[L.nidle - 1]], intended, now);
                        k_issued++;
                        continue;
                    }
                    /* No idle connection: open one if the pool allows, else wait. */
                    if (L.open < n) {
                        for (size_t i = 0; i < n; i++) {
                            if (L.conns[i].state == PC_CLOSED && now >= L.conns[i].retry_at) {
                                if (conn_open(&L, &L.conns[i]))
                                    L.conns[i].t_sent = now;
                                break;
                            }
                        }
                    }
                    break;
                }
                {
                    uint64_t next = t0 + k_issued * interval;
                    if (next > now) {
                        wait_ns = next - now < 50000000u ? next - now : 50000000u;
                        timeout_ms = (int)((wait_ns + 999999u) / 1000000u);
                    } else {
                        timeout_ms = L.nidle > 0 ? 0 : 1;
                    }
                }
                if (stopping) {
                    /* Due inside the measured window but never sent: every connection was
                     * busy (or still connecting). */
                    uint64_t due_start =
                        L.t_meas > t0 ? (L.t_meas - t0 + interval - 1) / interval : 0;
                    uint64_t first = k_issued > due_start ? k_issued : due_start;
                    if (due > first)
                        r->unsent = due - first;
                }
            }
            if (stopping)
                L.issuing = false;
        } else {
            bool busy = false;
            for (size_t i = 0; i < n && !busy; i++)
                busy = L.conns[i].state == PC_BUSY;
            if (!busy)
                break;
        }
        if (wait_ns > 0) {
            /* Nanosecond timeout: a millisecond one would send up to 1 ms late, and that
             * lateness counts in the latencies (they run from the due time). */
            struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)wait_ns};
            ne = epoll_pwait2(L.ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), &ts, NULL);
            if (ne < 0 && errno == ENOSYS)
                ne = epoll_wait(L.ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), timeout_ms);
        } else {
            ne = epoll_wait(L.ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), timeout_ms);
        }
        if (ne < 0 && errno != EINTR) {
            perf_errf(errbuf, errlen, "epoll_wait: %s", strerror(errno));
            goto done;
        }
        for (int i = 0; i < ne; i++) {
            pconn *c = evs[i].data.ptr;
            if (c->fd == -1)
                continue;
            if (c->state == PC_CONNECTING) {
                int err = 0;
                socklen_t sl = sizeof(err);
                if (!(evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
                    continue;
                if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl) != 0)
                    err = errno;
                if (err != 0) {
                    conn_fail(&L, c, PERF_TERR_CONNECT, err);
                    continue;
                }
                make_idle(&L, c);
                if (!open_loop && L.issuing)
                    conn_send(&L, c, perf_now_ns(), perf_now_ns());
                continue;
            }
            if ((evs[i].events & EPOLLOUT) && c->state == PC_BUSY && c->out_off < c->out_len)
                conn_flush(&L, c);
            if (c->fd != -1 && (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                conn_read(&L, c);
                if (!open_loop && L.issuing && c->state == PC_IDLE) {
                    uint64_t t = perf_now_ns();
                    conn_send(&L, c, t, t);
                }
            }
        }
        if (show && now >= next_progress) {
            progress(&L, now, t0);
            next_progress = now + 500000000u;
        }
    }
    r->window_s = L.t_end > L.t_meas ? (double)(L.t_end - L.t_meas) / 1e9 : 0.0;
    r->cpu_s = thread_cpu_s() - cpu0;
    r->elapsed_s = (double)(perf_now_ns() - t0) / 1e9;
    if (show)
        fprintf(stderr, "\r\033[K");
    ok = true;
done:
    if (L.conns != NULL) {
        for (size_t i = 0; i < n; i++) {
            if (L.conns[i].fd != -1)
                close(L.conns[i].fd);
            free(L.conns[i].in);
        }
    }
    free(L.conns);
    free(L.idle);
    close(L.ep);
    return ok;
}
