/*
 * http_loop.c: the HTTP event loops. keel opens the listening socket; each of the
 * --http-threads loops owns one libmicrohttpd (MHD) daemon in MHD's external-loop mode and
 * the thread that runs it.
 *
 * DESIGN
 * Why our own loops and not MHD's thread pool: a turn of a loop is one MHD_run_wait (poll,
 * then every ready connection read, handled and written), then server.c's after_turn, which
 * calls keel_runtime_run_gathered if the turn gathered a request.
 * Requests of a model with dynamic batching are submitted with KEEL_SUBMIT_GATHER (queued,
 * no inference thread woken), so the requests that arrived together in one turn run as one
 * batch on this thread right after it, and their connections are resumed and answered in
 * the next turn: no thread hand-off and one backend call for the lot. A turn that gathered
 * requests polls again without waiting (MHD_run_wait with 0), up to EXTRA_PASSES times while
 * each pass gathers more, before it runs them: with few connections the clients' next
 * requests come one by one, the first wakes the loop, and the others arrive while it reads
 * that one; the extra pass lets them join its batch rather than start the next one (one
 * epoll_wait per turn when nothing came). A pass also accepts new connections and reads
 * their requests, so passes go on while they bring more even when every open connection has
 * a request gathered (a rule that stopped them then, 1.011x at 8 keep-alive connections,
 * was reverted: clients that open a connection per request lost their batches). Four: at 8
 * connections four passes served 1.08x (session 10) and 1.055x (session 11) the requests/s of two,
 * eight no more than four, one or none 11-12 % less (docs/PERFORMANCE.md). A pass runs MHD on the
 * turn's GATHERED connections too: a client that hangs up then makes MHD complete one whose request
 * is in flight, which server.c's ORPHANED state handles (before it, conn_free aborted: "BUG:
 * connection completed while its request is in flight"). MHD's internal threads have no hook at
 * the end of a turn; with them every batched request went to an inference thread and back
 * (docs/PERFORMANCE.md, issue 12: 7 futex calls and an eventfd write per request, 0.36-0.45 of
 * raw XGBoost at 64 connections). A slow model's batches, and any batch whose model's contexts
 * are busy, still go to the inference threads; fast models without batching still run in the
 * handler (KEEL_SUBMIT_RUN_IF_FAST).
 *
 * The listening socket is non-blocking and shared by every daemon (MHD_OPTION_LISTEN_SOCKET):
 * each loop polls it, the first accept wins, the others find nothing (EAGAIN). MHD's own pool
 * shares its socket the same way; the connection limit is split between the daemons the
 * way MHD splits it between pool workers (the first ones take the remainder). The socket is
 * ours: every daemon is quiesced before it is stopped (an unquiesced daemon would close it)
 * and we close it once, after the last daemon stopped.
 *
 * Threads: loop i is the only thread that calls MHD_run_wait on daemon i. Other threads call
 * only MHD_resume_connection (completions, through keel__http_resume), MHD_get_daemon_info
 * and MHD_quiesce_daemon (the main thread), which MHD allows from any thread.
 *
 * Wake-ups: in external mode MHD has no inter-thread channel (0.9.75 drops MHD_USE_ITC
 * unless it runs its own threads), so a connection resumed by another thread would wait for
 * the loop's next network event. Each loop has an eventfd in MHD's own epoll set with a NULL
 * data pointer, which MHD_epoll skips ("if (NULL == events[i].data.ptr) continue"): writing
 * it ends the loop's MHD_run_wait. keel__http_resume resumes the connection, then writes the
 * eventfd only if no wake-up is pending (the atomic `woken`: one write for all the
 * completions of a batch). The loop clears `woken` and reads the eventfd *before* its next
 * MHD_run_wait, whose first step moves every connection resumed until then back to the
 * active set, so no resume is missed: one that comes after the clear writes again. A resume
 * on the loop's own thread (a batch run by keel_runtime_run_gathered, a fast model run in the
 * handler) needs no write: MHD_run_wait sees MHD's own resuming flag and does not block.
 *
 * Lifetime: start (socket, daemons, eventfds, threads; any failure undoes what was done) ->
 * quiesce (listening stops, connects are refused; accepted connections are still served) ->
 * stop (stop flag, every loop woken and joined, each daemon quiesced if it was not and
 * stopped: MHD closes its connections; then the eventfds and the socket are closed). No
 * lock: the flags are atomics; the loops array is written only before the threads start and
 * after they were joined.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "http_loop.h"
#include "keel/keel.h"

struct srv_http_loop {
    srv_http *h;
    struct MHD_Daemon *d;
    int efd;            /* the wake-up eventfd, in d's epoll set */
    _Atomic bool woken; /* efd was written and not yet read */
    pthread_t thread;
    bool started;
    bool quiesced;
};
typedef srv_http_loop http_loop;

static _Thread_local http_loop *tl_loop; /* the loop this thread runs */

struct srv_http {
    int fd; /* the listening socket, ours */
    void (*after_turn)(void *cls);
    unsigned (*gathered)(void *cls);
    void *cls;
    _Atomic bool stop;
    unsigned n;
    http_loop loops[];
};

/* Non-blocking passes a turn that gathered requests may add before running them. */
#define EXTRA_PASSES 4
#define IDLE_MS 1000

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void *loop_main(void *arg)
{
    http_loop *l = arg;
    srv_http *h = l->h;

    bool worked = false; /* since the last keel_heap_thread_idle */

    tl_loop = l;
    while (!atomic_load_explicit(&h->stop, memory_order_acquire)) {
        /* Blocks until network activity, MHD's next connection timeout or a wake-up; after
         * work, for at most IDLE_MS: a turn that waited that long found the loop idle, and
         * the thread's allocator cache goes back (keel_heap_thread_idle), which an idle
         * thread would otherwise hold for good. Two clock reads per turn. */
        if (worked) {
            uint64_t t0 = now_ms();
            (void)MHD_run_wait(l->d, IDLE_MS);
            if (now_ms() - t0 >= IDLE_MS) {
                keel_heap_thread_idle();
                worked = false;
            }
        } else {
            (void)MHD_run_wait(l->d, -1);
            worked = true;
        }
        if (atomic_exchange_explicit(&l->woken, false, memory_order_acq_rel)) {
            uint64_t v;
            (void)!read(l->efd, &v, sizeof(v)); /* non-blocking; EAGAIN is fine */
        }
        /* Requests that arrived while this turn read the others join its batches: up to
         * EXTRA_PASSES non-blocking passes, while each brings more (see the DESIGN). */
        for (unsigned pass = 0, n = h->gathered(h->cls); n > 0 && pass < EXTRA_PASSES; pass++) {
            unsigned before = n;
            (void)MHD_run_wait(l->d, 0);
            if ((n = h->gathered(h->cls)) == before)
                break;
        }
        /* server.c: the batches of the requests this turn gathered, then their answers. */
        h->after_turn(h->cls);
    }
    return NULL;
}

static void loop_wake(http_loop *l)
{
    if (!atomic_exchange_explicit(&l->woken, true, memory_order_acq_rel)) {
        uint64_t one = 1;
        (void)!write(l->efd, &one, sizeof(one));
    }
}

srv_http_loop *keel__http_current(void)
{
    return tl_loop;
}

void keel__http_resume(srv_http_loop *l, struct MHD_Connection *mc)
{
    MHD_resume_connection(mc);
    if (l != NULL && l != tl_loop)
        loop_wake(l);
}

/* Puts l's eventfd into its daemon's epoll set (NULL data: MHD skips the event). */
static bool loop_add_wakeup(http_loop *l)
{
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(l->d, MHD_DAEMON_INFO_EPOLL_FD);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};

    if ((l->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
        return false;
    return di != NULL && epoll_ctl(di->epoll_fd, EPOLL_CTL_ADD, l->efd, &ev) == 0;
}

static int listen_socket(const srv_http_opts *o, unsigned *port, char *err, size_t errlen)
{
    int fd = socket(o->addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int on = 1;
    union {
        struct sockaddr sa;
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } bound;
    socklen_t len = sizeof(bound);

    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    /* As MHD sets its own: SO_REUSEADDR (a restart binds at once despite TIME_WAIT), never
     * SO_REUSEPORT (a second server on the port must fail), IPv6 only on an IPv6 address. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        (o->addr->sa_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on)) != 0)) {
        snprintf(err, errlen, "setsockopt: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (bind(fd, o->addr, o->addrlen) != 0 || listen(fd, 1024) != 0) {
        snprintf(err, errlen, "%s", strerror(errno));
        close(fd);
        return -1;
    }
    if (getsockname(fd, &bound.sa, &len) != 0) {
        snprintf(err, errlen, "getsockname: %s", strerror(errno));
        close(fd);
        return -1;
    }
    *port = ntohs(bound.sa.sa_family == AF_INET6 ? bound.v6.sin6_port : bound.v4.sin_port);
    return fd;
}

static struct MHD_Daemon *daemon_start(const srv_http_opts *o, const srv_http_cbs *cbs, int fd,
                                       unsigned limit)
{
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG |
                     (o->addr->sa_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    struct MHD_OptionItem items[] = {
        {MHD_OPTION_CONNECTION_TIMEOUT, (intptr_t)o->timeout_secs, NULL},
        {MHD_OPTION_CONNECTION_LIMIT, (intptr_t)limit, NULL},
        /* Headers and MHD's read buffer live in this per-connection pool; bodies are
         * copied out of it chunk by chunk, so it bounds header size, not body size. */
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, (intptr_t)o->connection_memory, NULL},
        {MHD_OPTION_SIGPIPE_HANDLED_BY_APP, 1, NULL},
        {MHD_OPTION_STRICT_FOR_CLIENT, o->strictness, NULL},
        /* The request target as received, and the srv_conn of each request. */
        {MHD_OPTION_URI_LOG_CALLBACK, (intptr_t)cbs->on_uri, cbs->cls},
        {MHD_OPTION_END, 0, NULL},
    };

    /* The logger comes first so that MHD reports option errors through it. */
    return MHD_start_daemon(flags, 0, NULL, NULL, cbs->on_request, cbs->cls,
                            MHD_OPTION_EXTERNAL_LOGGER, cbs->log, cbs->cls,
                            MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd, MHD_OPTION_NOTIFY_COMPLETED,
                            cbs->on_completed, cbs->cls, MHD_OPTION_ARRAY, items, MHD_OPTION_END);
}

srv_http *keel__http_start(const srv_http_opts *o, const srv_http_cbs *cbs, unsigned *port,
                           char *err, size_t errlen)
{
    unsigned n = o->threads > 0 ? o->threads : 1;
    srv_http *h = calloc(1, sizeof(*h) + n * sizeof(h->loops[0]));

    if (h == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    h->after_turn = cbs->after_turn;
    h->gathered = cbs->gathered;
    h->cls = cbs->cls;
    h->n = n;
    atomic_init(&h->stop, false);
    if ((h->fd = listen_socket(o, port, err, errlen)) < 0) {
        free(h);
        return NULL;
    }
    for (unsigned i = 0; i < n; i++) {
        h->loops[i].efd = -1;
        atomic_init(&h->loops[i].woken, false);
    }
    for (unsigned i = 0; i < n; i++) {
        unsigned limit = o->max_connections / n + (i < o->max_connections % n ? 1 : 0);
        h->loops[i].h = h;
        if ((h->loops[i].d = daemon_start(o, cbs, h->fd, limit > 0 ? limit : 1)) == NULL) {
            snprintf(err, errlen, "cannot start the HTTP daemon %u of %u", i + 1, n);
            goto fail;
        }
        if (!loop_add_wakeup(&h->loops[i])) {
            snprintf(err, errlen, "cannot set up the wake-up of HTTP loop %u: %s", i + 1,
                     strerror(errno));
            goto fail;
        }
    }
    for (unsigned i = 0; i < n; i++) {
        int rc = pthread_create(&h->loops[i].thread, NULL, loop_main, &h->loops[i]);
        if (rc != 0) {
            snprintf(err, errlen, "cannot start an HTTP thread: %s", strerror(rc));
            goto fail;
        }
        h->loops[i].started = true;
    }
    return h;

fail:
    keel__http_stop(h);
    return NULL;
}

void keel__http_quiesce(srv_http *h)
{
    if (h == NULL)
        return;
    for (unsigned i = 0; i < h->n; i++) {
        if (h->loops[i].d != NULL && !h->loops[i].quiesced) {
            (void)MHD_quiesce_daemon(h->loops[i].d); /* returns our socket */
            h->loops[i].quiesced = true;
        }
    }
    /* Connects are refused from now on; the socket is closed at the stop. */
    shutdown(h->fd, SHUT_RDWR);
}

size_t keel__http_connections(srv_http *h)
{
    size_t n = 0;

    for (unsigned i = 0; h != NULL && i < h->n; i++) {
        const union MHD_DaemonInfo *di =
            h->loops[i].d != NULL
                ? MHD_get_daemon_info(h->loops[i].d, MHD_DAEMON_INFO_CURRENT_CONNECTIONS)
                : NULL;
        if (di != NULL)
            n += di->num_connections;
    }
    return n;
}

void keel__http_stop(srv_http *h)
{
    if (h == NULL)
        return;
    atomic_store_explicit(&h->stop, true, memory_order_release);
    for (unsigned i = 0; i < h->n; i++) {
        if (h->loops[i].started) {
            uint64_t one = 1;
            (void)!write(h->loops[i].efd, &one, sizeof(one)); /* sees stop at once */
            pthread_join(h->loops[i].thread, NULL);
        }
    }
    for (unsigned i = 0; i < h->n; i++) {
        http_loop *l = &h->loops[i];
        if (l->d == NULL)
            continue;
        if (!l->quiesced)
            (void)MHD_quiesce_daemon(l->d); /* else MHD_stop_daemon closes our socket */
        MHD_stop_daemon(l->d);
    }
    for (unsigned i = 0; i < h->n; i++) {
        if (h->loops[i].efd >= 0)
            close(h->loops[i].efd);
    }
    close(h->fd);
    free(h);
}
