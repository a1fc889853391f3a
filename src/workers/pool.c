/*
 * pool.c: the preprocessing pool, parent side: the fork server handle, the worker table, task
 * submission with a deadline, supervision, counters and teardown.
 *
 * DESIGN
 * Processes. keel__prep_pool_create forks the fork server (forksrv.c) from the calling
 * thread; every worker is a child of the fork server, never of keel, so workers never
 * inherit model memory, keel's threads or its sockets. The fork server reaps workers; the
 * pool holds a pidfd for each worker (from the fork server, SCM_RIGHTS) to kill it and to
 * see it die without pid-reuse races, and asks the fork server for its wait status (REAP)
 * to count the cause. The pool is the fork server's parent and reaps it at destroy.
 *
 * Transport. A task's parameters travel in the message; its input in a memfd the pool fills
 * and seals (no shrink, grow or write) before sending, so the worker maps a file whose size
 * cannot change under it. The result comes back in a memfd the worker must have sealed the
 * same way: the pool checks the seals and the size with fstat before mmap, so a worker can
 * never make keel take SIGBUS. memfds are anonymous: nothing lives in /dev/shm and a kill -9
 * of any process frees them with its descriptors. Bounded: a task's input plus result may
 * not exceed max_task_bytes (KEEL_ERESOURCE at once), and all tasks in flight together not
 * max_total_bytes (a task waits for room within its deadline).
 *
 * Worker slot state machine (under mu):
 *   EMPTY --supervisor (or a waiting task) claims--> SPAWNING --hello received--> IDLE
 *     ^                        \--spawn failed (100 ms backoff)--> EMPTY
 *     |                     IDLE --task taken--> BUSY --result / worker refused--> IDLE
 *     \------- retired: killed (SIGKILL via pidfd), exit seen on pidfd, status REAPed ------/
 *   A BUSY worker whose socket hangs up, whose pidfd fires, that breaks the protocol or that
 *   overruns the task deadline is retired by the caller that made it busy (so its error can
 *   name the cause); the slot goes EMPTY and the pool's supervisor thread spawns the
 *   replacement, so the failed task does not also wait for a fork. An IDLE worker found dead
 *   when a task takes it is retired the same way and the task moves on to another slot.
 * Task state machine (the caller's stack): waiting for a slot and room -> running (sent,
 *   polling socket + pidfd until the deadline) -> done (result copied) | failed (invalid
 *   input, timeout, crash, protocol) ; every path returns the bytes and the slot.
 *
 * Threads: callers of keel__prep_run (any thread) and one supervisor thread, started after
 * the fork server was forked and joined first at destroy.
 * Locks: mu protects the slot table, bytes in flight and stopping; cv (CLOCK_MONOTONIC)
 * signals a slot or bytes becoming free, or a slot becoming EMPTY. fs_mu serialises
 * conversations with the fork server (one request, one reply). The two are never held
 * together, and no I/O with a worker runs under either. Counters are atomics.
 *
 * Out of file descriptors: a spawn whose reply keel cannot take the descriptors of (keel at
 * its fd limit: the kernel closes them, MSG_CTRUNC) fails that spawn only, with EMFILE: the
 * fork server did answer and stays; the worker it forked exits (its socket's peer is gone)
 * and is REAPed at once. A task whose result memfd is lost the same way fails with EMFILE
 * and its worker stays. A task that finds no running worker at its deadline names the last
 * spawn's error. (tests/scenarios/test_fd_exhaustion.py)
 *
 * Health: the pool is unhealthy when the fork server is gone (it is never restarted: forking
 * a new one from a process that now holds models and threads is what this design avoids) or
 * when no worker is alive and the last spawn failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "workers/ipc.h"
#include "workers/prep.h"

#define SEALS KEEL__MEMFD_SEALS
/* How long the pool waits for a SIGKILLed process to be gone, and for the fork server. */
#define KILL_WAIT_MS 2000
#define FS_REPLY_MS 2000
#define SPAWN_BACKOFF_NS (100ull * 1000 * 1000)

typedef enum wstate { W_EMPTY = 0, W_SPAWNING, W_IDLE, W_BUSY } wstate;

typedef enum cause { C_SIGNAL, C_EXIT, C_TIMEOUT, C_PROTOCOL } cause;

typedef struct worker {
    wstate st; /* mu */
    pid_t pid; /* written under mu; read without it only by the slot's owner */
    int sock;  /* sock, pidfd: used only by the thread that owns the slot (SPAWNING/BUSY) */
    int pidfd;
} worker;

struct keel__prep_pool {
    keel__prep_opts o;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    worker w[KEEL__PREP_MAX_WORKERS]; /* mu (state) */
    uint64_t bytes_in_flight;         /* mu */
    uint64_t next_spawn_ns;           /* mu: after a failed spawn, not before this */
    bool last_spawn_failed;           /* mu */
    int last_spawn_errno;             /* mu: why the last failed spawn failed */
    bool stopping;                    /* mu */
    pthread_t supervisor;             /* spawns replacements for EMPTY slots */
    bool supervisor_started;

    pthread_mutex_t fs_mu;
    int fs_sock;  /* fs_mu */
    int fs_pidfd; /* fs_mu */
    pid_t fs_pid; /* fs_mu; -1 once reaped */
    _Atomic bool fs_dead;

    _Atomic uint64_t next_id;
    _Atomic uint64_t restarts[4]; /* by cause */
    _Atomic uint64_t spawn_failures;
    _Atomic uint64_t tasks_ok, tasks_invalid, tasks_timeout, tasks_crashed, tasks_rejected,
        tasks_error;
    _Atomic int64_t memfds;
    _Atomic int32_t alive;
};

void keel__prep_opts_init(keel__prep_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->workers = KEEL__PREP_DEFAULT_WORKERS;
    o->task_timeout_ms = KEEL__PREP_DEFAULT_TIMEOUT_MS;
    o->max_task_bytes = KEEL__PREP_DEFAULT_MAX_TASK_BYTES;
    o->max_total_bytes = 0; /* 0 = workers * max_task_bytes */
    o->worker_memory_limit = KEEL__PREP_DEFAULT_WORKER_MEMORY;
}

static void close_memfd(keel__prep_pool *p, int fd)
{
    close(fd);
    atomic_fetch_sub(&p->memfds, 1);
}

/* Waits until fd is readable or ms pass; true if readable (or hung up). */
static bool wait_readable(int fd, int ms)
{
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    uint64_t end = keel__now_ns() + (uint64_t)ms * 1000000u;

    for (;;) {
        uint64_t now = keel__now_ns();
        int left = now >= end ? 0 : (int)((end - now + 999999) / 1000000);
        int n = poll(&pf, 1, left);
        if (n > 0)
            return true;
        if (n == 0 || (n < 0 && errno != EINTR))
            return false;
    }
}

/* ---- the fork server conversation (fs_mu held) */

static void fs_mark_dead_locked(keel__prep_pool *p)
{
    int st;

    atomic_store(&p->fs_dead, true);
    if (p->fs_pid > 0) {
        if (p->fs_pidfd >= 0)
            syscall(SYS_pidfd_send_signal, p->fs_pidfd, SIGKILL, NULL, 0);
        while (waitpid(p->fs_pid, &st, 0) < 0 && errno == EINTR)
            ;
        p->fs_pid = -1;
    }
}

/* One request and its reply; fds (up to 2) are received into fds. */
static int fs_call_locked(keel__prep_pool *p, const keel__fs_req *q, keel__fs_reply *r, int *fds,
                          int *nfds)
{
    ssize_t n;
    int e;

    *nfds = 0;
    if (atomic_load(&p->fs_dead))
        return EPIPE;
    if ((e = keel__prep_send(p->fs_sock, q, sizeof(*q), NULL, 0)) != 0)
        goto dead;
    if (!wait_readable(p->fs_sock, FS_REPLY_MS)) {
        e = ETIMEDOUT;
        goto dead;
    }
    n = keel__prep_recv(p->fs_sock, r, sizeof(*r), fds, 2, nfds);
    if (n == -EMFILE && r->magic == KEEL__PREP_MAGIC)
        return EMFILE; /* the fork server answered; we could not take its descriptors */
    if (n != (ssize_t)sizeof(*r) || r->magic != KEEL__PREP_MAGIC) {
        for (int i = 0; i < *nfds; i++)
            close(fds[i]);
        *nfds = 0;
        e = n < 0 ? (int)-n : EPROTO;
        goto dead;
    }
    return 0;
dead:
    /* A fork server that does not answer is useless: it is killed and never replaced. */
    KEEL__LOG(&p->o.log, KEEL_LOG_ERROR, "preprocessing fork server lost (%s)", strerror(e));
    fs_mark_dead_locked(p);
    return e;
}

/* Waits for a new worker's hello (it has closed every inherited descriptor). */
static bool await_hello(int sock)
{
    keel__prep_reply_msg m;
    int nfds = 0;
    ssize_t n;

    if (!wait_readable(sock, FS_REPLY_MS))
        return false;
    n = keel__prep_recv(sock, &m, sizeof(m), NULL, 0, &nfds);
    return n == (ssize_t)sizeof(m) && m.magic == KEEL__PREP_MAGIC && m.id == 0 &&
           m.status == KEEL_OK;
}

/* A worker was forked but its socket and pidfd never reached us (we were out of fds: the
 * kernel closed them in flight). With its socket's peer closed it exits at once (its hello
 * or its first read fails); the fork server keeps its status until asked, so ask until it
 * has exited, for at most FS_REPLY_MS. */
static void forget_lost_worker(keel__prep_pool *p, pid_t pid)
{
    keel__fs_req q = {.magic = KEEL__PREP_MAGIC, .op = KEEL__FS_REAP, .pid = pid};

    for (int waited = 0; waited < FS_REPLY_MS; waited += 2) {
        keel__fs_reply r;
        int fds[2], nfds = 0, e;

        pthread_mutex_lock(&p->fs_mu);
        e = fs_call_locked(p, &q, &r, fds, &nfds);
        pthread_mutex_unlock(&p->fs_mu);
        for (int k = 0; k < nfds; k++)
            close(fds[k]);
        if (e != 0 || r.err != EBUSY)
            return;
        usleep(2000);
    }
    KEEL__LOG(&p->o.log, KEEL_LOG_ERROR,
              "preprocessing worker %d, spawned while keel was out of file descriptors, has "
              "not exited",
              (int)pid);
}

/* Spawns a worker into slot i (state SPAWNING, owned by the caller). */
static keel_err spawn_into(keel__prep_pool *p, int i)
{
    keel__fs_req q = {.magic = KEEL__PREP_MAGIC, .op = KEEL__FS_SPAWN};
    keel__fs_reply r;
    int fds[2], nfds = 0, e;
    worker *w = &p->w[i];
    bool ok;

    pthread_mutex_lock(&p->fs_mu);
    e = fs_call_locked(p, &q, &r, fds, &nfds);
    pthread_mutex_unlock(&p->fs_mu);
    if (e == EMFILE && r.err == 0 && r.pid > 0)
        forget_lost_worker(p, r.pid);
    ok = e == 0 && r.err == 0 && nfds == 2 && r.pid > 0;
    if (ok && !await_hello(fds[0])) {
        /* Never came up: kill it, and collect its status so the fork server forgets it. */
        keel__fs_req rq = {.magic = KEEL__PREP_MAGIC, .op = KEEL__FS_REAP, .pid = r.pid};
        keel__fs_reply rr;
        int rfds[2], rn = 0;
        syscall(SYS_pidfd_send_signal, fds[1], SIGKILL, NULL, 0);
        (void)wait_readable(fds[1], KILL_WAIT_MS);
        usleep(2000); /* its SIGCHLD reaches the fork server */
        pthread_mutex_lock(&p->fs_mu);
        (void)fs_call_locked(p, &rq, &rr, rfds, &rn);
        pthread_mutex_unlock(&p->fs_mu);
        e = ETIMEDOUT;
        ok = false;
    }
    if (!ok) {
        for (int k = 0; k < nfds; k++)
            close(fds[k]);
        atomic_fetch_add(&p->spawn_failures, 1);
        KEEL__LOG(&p->o.log, KEEL_LOG_ERROR, "cannot spawn a preprocessing worker: %s",
                  strerror(e != 0       ? e
                           : r.err != 0 ? r.err
                                        : EPROTO));
    } else {
        w->sock = fds[0];
        w->pidfd = fds[1];
        atomic_fetch_add(&p->alive, 1);
    }
    pthread_mutex_lock(&p->mu);
    w->pid = ok ? r.pid : -1; /* written under mu: keel__prep_worker_pids reads it */
    w->st = ok ? W_IDLE : W_EMPTY;
    p->last_spawn_failed = !ok;
    if (!ok)
        p->last_spawn_errno = e != 0 ? e : r.err != 0 ? r.err : EPROTO;
    p->next_spawn_ns = ok ? 0 : keel__now_ns() + SPAWN_BACKOFF_NS;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return ok ? KEEL_OK : KEEL_EUNAVAILABLE;
}

/* The supervisor thread: fills EMPTY slots (a retired worker's, or one whose spawn failed,
 * after the backoff), so a replacement runs soon after a failure even with no traffic, and
 * the task that saw the failure returns without waiting for the fork. */
static void *supervisor_main(void *arg)
{
    keel__prep_pool *p = arg;

    pthread_mutex_lock(&p->mu);
    while (!p->stopping) {
        uint64_t now = keel__now_ns();
        int empty = -1;
        for (int i = 0; i < p->o.workers && empty < 0; i++) {
            if (p->w[i].st == W_EMPTY)
                empty = i;
        }
        if (empty >= 0 && !atomic_load(&p->fs_dead) && now >= p->next_spawn_ns) {
            p->w[empty].st = W_SPAWNING;
            pthread_mutex_unlock(&p->mu);
            (void)spawn_into(p, empty);
            pthread_mutex_lock(&p->mu);
        } else if (empty >= 0 && !atomic_load(&p->fs_dead)) {
            struct timespec ts = {.tv_sec = (time_t)(p->next_spawn_ns / 1000000000u),
                                  .tv_nsec = (long)(p->next_spawn_ns % 1000000000u)};
            pthread_cond_timedwait(&p->cv, &p->mu, &ts);
        } else {
            pthread_cond_wait(&p->cv, &p->mu);
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* Kills the worker of a slot the caller owns, waits for it to be gone, has the fork server
 * reap it and counts the restart; why overrides the cause seen in its status (timeout,
 * protocol). Returns a short description for error messages. */
static const char *retire(keel__prep_pool *p, int i, int why, char *desc, size_t dlen)
{
    worker *w = &p->w[i];
    keel__fs_req q = {.magic = KEEL__PREP_MAGIC, .op = KEEL__FS_REAP, .pid = w->pid};
    keel__fs_reply r = {0};
    int fds[2], nfds, e = 0, st = 0;
    bool have_status = false;
    cause c;

    syscall(SYS_pidfd_send_signal, w->pidfd, SIGKILL, NULL, 0); /* ESRCH if already gone */
    (void)wait_readable(w->pidfd, KILL_WAIT_MS);
    pthread_mutex_lock(&p->fs_mu);
    for (int tries = 0; tries < 50; tries++) {
        if ((e = fs_call_locked(p, &q, &r, fds, &nfds)) != 0)
            break;
        if (r.err == 0) {
            have_status = true;
            st = r.status;
            break;
        }
        if (r.err != EBUSY)
            break;
        pthread_mutex_unlock(&p->fs_mu);
        usleep(2000); /* between the pidfd's exit and the fork server's SIGCHLD */
        pthread_mutex_lock(&p->fs_mu);
    }
    pthread_mutex_unlock(&p->fs_mu);
    close(w->sock);
    close(w->pidfd);
    w->sock = w->pidfd = -1;
    atomic_fetch_sub(&p->alive, 1);

    if (why >= 0)
        c = (cause)why;
    else if (have_status && WIFEXITED(st))
        c = C_EXIT;
    else
        c = C_SIGNAL;
    atomic_fetch_add(&p->restarts[c], 1);
    if (have_status && WIFSIGNALED(st) && why < 0)
        snprintf(desc, dlen, "worker pid %d died of signal %d (%s)", (int)w->pid, WTERMSIG(st),
                 strsignal(WTERMSIG(st)));
    else if (have_status && WIFEXITED(st) && why < 0)
        snprintf(desc, dlen, "worker pid %d exited with status %d", (int)w->pid, WEXITSTATUS(st));
    else if (why == C_TIMEOUT)
        snprintf(desc, dlen, "worker pid %d overran the task deadline and was killed", (int)w->pid);
    else if (why == C_PROTOCOL)
        snprintf(desc, dlen, "worker pid %d broke the protocol and was killed", (int)w->pid);
    else
        snprintf(desc, dlen, "worker pid %d died", (int)w->pid);
    KEEL__LOG(&p->o.log, KEEL_LOG_WARN, "preprocessing %s; replacing it", desc);
    return desc; /* w->pid is reset under mu by release() */
}

keel_err keel__prep_pool_create(const keel__prep_opts *o, keel__prep_pool **out, char *errbuf,
                                size_t errlen)
{
    keel__prep_pool *p = NULL;
    pthread_condattr_t ca;
    int sv[2] = {-1, -1};
    pid_t pid;

    *out = NULL;
    if (o == NULL || o->workers < 1 || o->workers > KEEL__PREP_MAX_WORKERS) {
        keel__errf(errbuf, errlen, "preprocessing workers must be 1..%d", KEEL__PREP_MAX_WORKERS);
        return KEEL_EINVAL;
    }
    if ((p = keel__calloc(1, sizeof(*p))) == NULL)
        return KEEL_ENOMEM;
    p->o = *o;
    if (p->o.task_timeout_ms == 0)
        p->o.task_timeout_ms = KEEL__PREP_DEFAULT_TIMEOUT_MS;
    if (p->o.max_task_bytes == 0)
        p->o.max_task_bytes = KEEL__PREP_DEFAULT_MAX_TASK_BYTES;
    if (p->o.max_total_bytes == 0)
        p->o.max_total_bytes = p->o.max_task_bytes * (uint64_t)p->o.workers;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->fs_mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &ca);
    pthread_condattr_destroy(&ca);
    for (int i = 0; i < KEEL__PREP_MAX_WORKERS; i++) {
        p->w[i].pid = -1;
        p->w[i].sock = p->w[i].pidfd = -1;
    }
    p->fs_sock = p->fs_pidfd = -1;
    p->fs_pid = -1;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
        keel__errf(errbuf, errlen, "socketpair: %s", strerror(errno));
        goto fail;
    }
    if ((pid = fork()) < 0) {
        keel__errf(errbuf, errlen, "fork: %s", strerror(errno));
        goto fail;
    }
    if (pid == 0) {
        /* The fork server: keep the control socket as fd 3, stdin/stdout on /dev/null,
         * stderr, and nothing else (the parent's sockets, model files, eventfds). */
        int ctl = fcntl(sv[1], F_DUPFD, 10);
        int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (ctl < 0 || nul < 0 || dup2(nul, 0) < 0 || dup2(nul, 1) < 0 || dup2(ctl, 3) < 0)
            _exit(1);
        keel__close_fds_from(4);
        keel__forksrv_main(3, &p->o);
    }
    close(sv[1]);
    sv[1] = -1;
    p->fs_pid = pid;
    p->fs_sock = sv[0];
    sv[0] = -1;
    if ((p->fs_pidfd = (int)syscall(SYS_pidfd_open, pid, 0)) < 0) {
        keel__errf(errbuf, errlen, "pidfd_open: %s (Linux 5.3 or later is needed)",
                   strerror(errno));
        goto fail;
    }
    for (int i = 0; i < p->o.workers; i++) {
        p->w[i].st = W_SPAWNING;
        if (spawn_into(p, i) != KEEL_OK) {
            keel__errf(errbuf, errlen, "cannot spawn preprocessing worker %d", i);
            goto fail;
        }
    }
    /* The only thread the pool starts; the fork server was forked before it. */
    if (pthread_create(&p->supervisor, NULL, supervisor_main, p) != 0) {
        keel__errf(errbuf, errlen, "cannot start the preprocessing supervisor thread");
        goto fail;
    }
    p->supervisor_started = true;
    *out = p;
    return KEEL_OK;

fail:
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    keel__prep_pool_destroy(p);
    return KEEL_EIO;
}

void keel__prep_pool_destroy(keel__prep_pool *p)
{
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    if (p->supervisor_started)
        pthread_join(p->supervisor, NULL); /* finishes a spawn in progress first */
    for (int i = 0; i < KEEL__PREP_MAX_WORKERS; i++)
        KEEL__ASSERT(p->w[i].st != W_BUSY && p->w[i].st != W_SPAWNING);
    /* Workers first: SIGKILL through the pidfd (race-free), then their sockets. */
    for (int i = 0; i < KEEL__PREP_MAX_WORKERS; i++) {
        worker *w = &p->w[i];
        if (w->pidfd >= 0) {
            syscall(SYS_pidfd_send_signal, w->pidfd, SIGKILL, NULL, 0);
            close(w->pidfd);
            atomic_fetch_sub(&p->alive, 1);
        }
        if (w->sock >= 0)
            close(w->sock);
        w->pidfd = w->sock = -1;
        w->st = W_EMPTY;
    }
    /* End of stream tells the fork server to kill and reap its workers and exit. */
    if (p->fs_sock >= 0)
        close(p->fs_sock);
    p->fs_sock = -1;
    if (p->fs_pid > 0) {
        int st;
        if (p->fs_pidfd < 0 || !wait_readable(p->fs_pidfd, KILL_WAIT_MS)) {
            if (p->fs_pidfd >= 0)
                syscall(SYS_pidfd_send_signal, p->fs_pidfd, SIGKILL, NULL, 0);
            else
                kill(p->fs_pid, SIGKILL);
        }
        while (waitpid(p->fs_pid, &st, 0) < 0 && errno == EINTR)
            ;
        p->fs_pid = -1;
    }
    if (p->fs_pidfd >= 0)
        close(p->fs_pidfd);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->fs_mu);
    free(p);
}

/* ---- tasks */

typedef enum outcome { O_OK, O_REFUSED, O_DEAD, O_TIMEOUT, O_PROTOCOL, O_LOCAL } outcome;

/* Makes the sealed input memfd; -1 and errno on failure. */
static int task_memfd(keel__prep_pool *p, const void *in, size_t len)
{
    int fd = keel__memfd_sealed("keel-prep-task", in, len, true);

    if (fd >= 0)
        atomic_fetch_add(&p->memfds, 1);
    return fd;
}

/* Copies the worker's sealed result memfd into out; O_PROTOCOL if it is not what was asked. */
static outcome take_result(keel__prep_pool *p, int fd, void *out, size_t out_len, char *errbuf,
                           size_t errlen)
{
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    void *m;

    if (seals < 0 || (seals & SEALS) != SEALS) {
        keel__errf(errbuf, errlen, "result memfd is not sealed");
        return O_PROTOCOL;
    }
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size != out_len) {
        keel__errf(errbuf, errlen, "result memfd has the wrong size");
        return O_PROTOCOL;
    }
    if (out_len == 0)
        return O_OK;
    if ((m = mmap(NULL, out_len, PROT_READ, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        keel__errf(errbuf, errlen, "cannot map the result: %s", strerror(errno));
        return O_LOCAL;
    }
    memcpy(out, m, out_len);
    munmap(m, out_len);
    return O_OK;
}

/* Sends the task to worker w and waits for its answer until deadline. */
static outcome exchange(keel__prep_pool *p, worker *w, uint32_t type, const void *params,
                        size_t plen, const void *in, size_t inlen, void *out, size_t out_len,
                        uint64_t deadline, keel_err *werr, char *errbuf, size_t errlen)
{
    keel__prep_task_msg m;
    keel__prep_reply_msg r;
    int fd, rfd = -1, nfds = 0, e;
    ssize_t n;
    outcome oc;

    memset(&m, 0, sizeof(m));
    m.magic = KEEL__PREP_MAGIC;
    m.type = type;
    m.id = atomic_fetch_add(&p->next_id, 1) + 1;
    m.in_bytes = inlen;
    m.out_bytes = out_len;
    m.plen = (uint32_t)plen;
    if (plen > 0)
        memcpy(m.params, params, plen);
    if ((fd = task_memfd(p, in, inlen)) < 0) {
        keel__errf(errbuf, errlen, "cannot create the task memfd: %s", strerror(errno));
        return O_LOCAL;
    }
    e = keel__prep_send(w->sock, &m, sizeof(m), &fd, 1);
    close_memfd(p, fd); /* the worker has its own reference now */
    if (e != 0)
        return O_DEAD;
    for (;;) {
        struct pollfd pf[2] = {{.fd = w->sock, .events = POLLIN},
                               {.fd = w->pidfd, .events = POLLIN}};
        uint64_t now = keel__now_ns();
        int left, k;
        if (now >= deadline)
            return O_TIMEOUT;
        left = (int)((deadline - now + 999999) / 1000000);
        k = poll(pf, 2, left);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return O_DEAD;
        if (k == 0)
            continue; /* the loop's deadline check decides */
        if ((pf[0].revents & POLLIN) != 0)
            break;
        if (pf[0].revents != 0 || pf[1].revents != 0)
            return O_DEAD;
    }
    n = keel__prep_recv(w->sock, &r, sizeof(r), &rfd, 1, &nfds);
    if (n == -EMFILE) {
        /* The worker answered and waits for its next task; only we cannot take the result. */
        keel__errf(errbuf, errlen, "cannot receive the worker's result: %s", strerror(EMFILE));
        return O_LOCAL;
    }
    if (n == 0 || (n < 0 && n != -EMSGSIZE))
        return O_DEAD; /* end of stream, or ECONNRESET: it died before reading the task */
    if (nfds == 1)
        atomic_fetch_add(&p->memfds, 1);
    if (n != (ssize_t)sizeof(r) || r.magic != KEEL__PREP_MAGIC || r.id != m.id ||
        r.status >= (uint32_t)KEEL_ERR_COUNT_) {
        keel__errf(errbuf, errlen, "malformed reply");
        oc = O_PROTOCOL;
        goto done;
    }
    r.msg[sizeof(r.msg) - 1] = '\0';
    if (r.status != KEEL_OK) {
        *werr = (keel_err)r.status;
        keel__errf(errbuf, errlen, "%s", r.msg);
        oc = nfds == 0 ? O_REFUSED : O_PROTOCOL;
        goto done;
    }
    if (nfds != 1 || r.out_bytes != out_len) {
        keel__errf(errbuf, errlen, "reply without its result memfd");
        oc = O_PROTOCOL;
        goto done;
    }
    oc = take_result(p, rfd, out, out_len, errbuf, errlen);
done:
    if (nfds == 1)
        close_memfd(p, rfd);
    return oc;
}

/* Claims an idle worker and room for need bytes before deadline (see the DESIGN). */
static keel_err acquire(keel__prep_pool *p, uint64_t need, uint64_t deadline, int *slot,
                        char *errbuf, size_t errlen)
{
    keel_err err = KEEL_OK;

    pthread_mutex_lock(&p->mu);
    for (;;) {
        int idle = -1, empty = -1, live = 0, running = 0;
        uint64_t now = keel__now_ns(), wake = deadline;
        struct timespec ts;

        if (p->stopping) {
            keel__errf(errbuf, errlen, "the preprocessing pool is shutting down");
            err = KEEL_ESHUTDOWN;
            break;
        }
        for (int i = 0; i < p->o.workers; i++) {
            if (p->w[i].st == W_IDLE && idle < 0)
                idle = i;
            if (p->w[i].st == W_EMPTY && empty < 0)
                empty = i;
            if (p->w[i].st != W_EMPTY)
                live++;
            if (p->w[i].st == W_IDLE || p->w[i].st == W_BUSY)
                running++;
        }
        if (idle >= 0 && p->bytes_in_flight + need <= p->o.max_total_bytes) {
            p->w[idle].st = W_BUSY;
            p->bytes_in_flight += need;
            *slot = idle;
            break;
        }
        if (empty >= 0 && !atomic_load(&p->fs_dead) && now >= p->next_spawn_ns) {
            p->w[empty].st = W_SPAWNING;
            pthread_mutex_unlock(&p->mu);
            (void)spawn_into(p, empty);
            pthread_mutex_lock(&p->mu);
            continue;
        }
        if (live == 0 && atomic_load(&p->fs_dead)) {
            keel__errf(errbuf, errlen, "no preprocessing worker can run: the fork server is gone");
            err = KEEL_EUNAVAILABLE;
            break;
        }
        if (now >= deadline) {
            if (running == 0 && p->last_spawn_failed)
                keel__errf(errbuf, errlen,
                           "no preprocessing worker is running before the deadline: the last "
                           "spawn failed: %s",
                           strerror(p->last_spawn_errno));
            else
                keel__errf(errbuf, errlen,
                           "no preprocessing worker became free before the deadline "
                           "(%d workers, %llu bytes in flight)",
                           p->o.workers, (unsigned long long)p->bytes_in_flight);
            err = KEEL_ETIMEDOUT;
            break;
        }
        if (empty >= 0 && p->next_spawn_ns > now && p->next_spawn_ns < wake)
            wake = p->next_spawn_ns;
        ts.tv_sec = (time_t)(wake / 1000000000u);
        ts.tv_nsec = (long)(wake % 1000000000u);
        pthread_cond_timedwait(&p->cv, &p->mu, &ts);
    }
    pthread_mutex_unlock(&p->mu);
    return err;
}

static void release(keel__prep_pool *p, int slot, uint64_t need, bool retired)
{
    pthread_mutex_lock(&p->mu);
    p->bytes_in_flight -= need;
    p->w[slot].st = retired ? W_EMPTY : W_IDLE; /* EMPTY: the supervisor replaces it */
    if (retired)
        p->w[slot].pid = -1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

keel_err keel__prep_run(keel__prep_pool *p, uint32_t type, const void *params, size_t plen,
                        const void *in, size_t inlen, void *out, size_t out_len,
                        uint64_t deadline_ns, char *errbuf, size_t errlen)
{
    uint64_t need, now = keel__now_ns();
    uint64_t deadline = now + (uint64_t)p->o.task_timeout_ms * 1000000u;
    char desc[160];
    keel_err err = KEEL_OK;

    if (deadline_ns != 0 && deadline_ns < deadline)
        deadline = deadline_ns;
    if (plen > KEEL__PREP_MAX_PARAMS || (plen > 0 && params == NULL)) {
        keel__errf(errbuf, errlen, "task parameters too large");
        return KEEL_EINVAL;
    }
    if (__builtin_add_overflow((uint64_t)inlen, (uint64_t)out_len, &need) ||
        need > p->o.max_task_bytes || need > p->o.max_total_bytes) {
        atomic_fetch_add(&p->tasks_rejected, 1);
        keel__errf(errbuf, errlen,
                   "preprocessing task of %zu input + %zu result bytes exceeds the limit of "
                   "%llu bytes per task",
                   inlen, out_len, (unsigned long long)p->o.max_task_bytes);
        return KEEL_ERESOURCE;
    }
    for (;;) {
        int slot = -1;
        worker *w;
        keel_err werr = KEEL_EINVAL;
        outcome oc;
        struct pollfd pf;

        if ((err = acquire(p, need, deadline, &slot, errbuf, errlen)) != KEEL_OK) {
            if (err == KEEL_ETIMEDOUT)
                atomic_fetch_add(&p->tasks_timeout, 1);
            else
                atomic_fetch_add(&p->tasks_error, 1);
            return err;
        }
        w = &p->w[slot];
        /* A worker that died while idle is replaced without failing this task. */
        pf.fd = w->pidfd;
        pf.events = POLLIN;
        if (poll(&pf, 1, 0) > 0) {
            retire(p, slot, -1, desc, sizeof(desc));
            release(p, slot, need, true);
            continue;
        }
        oc = exchange(p, w, type, params, plen, in, inlen, out, out_len, deadline, &werr, errbuf,
                      errlen);
        switch (oc) {
        case O_OK:
            atomic_fetch_add(&p->tasks_ok, 1);
            release(p, slot, need, false);
            return KEEL_OK;
        case O_REFUSED:
            atomic_fetch_add(werr == KEEL_EINVAL ? &p->tasks_invalid : &p->tasks_error, 1);
            release(p, slot, need, false);
            return werr;
        case O_LOCAL:
            atomic_fetch_add(&p->tasks_error, 1);
            release(p, slot, need, false);
            return KEEL_EIO;
        case O_TIMEOUT:
            retire(p, slot, C_TIMEOUT, desc, sizeof(desc));
            keel__errf(errbuf, errlen, "preprocessing deadline exceeded: %s", desc);
            atomic_fetch_add(&p->tasks_timeout, 1);
            err = KEEL_ETIMEDOUT;
            break;
        case O_PROTOCOL: {
            char why[160];
            snprintf(why, sizeof(why), "%s", errbuf != NULL ? errbuf : "");
            retire(p, slot, C_PROTOCOL, desc, sizeof(desc));
            keel__errf(errbuf, errlen, "preprocessing failed: %s (%s)", desc, why);
            atomic_fetch_add(&p->tasks_crashed, 1);
            err = KEEL_EBACKEND;
            break;
        }
        case O_DEAD:
            retire(p, slot, -1, desc, sizeof(desc));
            keel__errf(errbuf, errlen, "preprocessing failed: %s while running this task", desc);
            atomic_fetch_add(&p->tasks_crashed, 1);
            err = KEEL_EBACKEND;
            break;
        }
        release(p, slot, need, true);
        return err;
    }
}

/* ---- observation */

bool keel__prep_healthy(keel__prep_pool *p)
{
    bool failing;

    if (p == NULL)
        return true;
    /* trylock: a health probe never waits for a spawn in progress (whoever talks to the
     * fork server then notices its death anyway). */
    if (pthread_mutex_trylock(&p->fs_mu) == 0) {
        if (!atomic_load(&p->fs_dead) && p->fs_pidfd >= 0) {
            struct pollfd pf = {.fd = p->fs_pidfd, .events = POLLIN};
            if (poll(&pf, 1, 0) > 0) {
                KEEL__LOG(&p->o.log, KEEL_LOG_ERROR, "preprocessing fork server pid %d died",
                          (int)p->fs_pid);
                fs_mark_dead_locked(p);
            }
        }
        pthread_mutex_unlock(&p->fs_mu);
    }
    pthread_mutex_lock(&p->mu);
    failing = p->last_spawn_failed;
    pthread_mutex_unlock(&p->mu);
    if (atomic_load(&p->fs_dead))
        return false;
    return !(failing && atomic_load(&p->alive) <= 0);
}

void keel__prep_stats_get(keel__prep_pool *p, keel__prep_stats *s)
{
    memset(s, 0, sizeof(*s));
    s->forkserver_pid = -1;
    if (p == NULL)
        return;
    s->healthy = keel__prep_healthy(p);
    s->workers = (uint32_t)p->o.workers;
    s->workers_alive = (uint32_t)(atomic_load(&p->alive) > 0 ? atomic_load(&p->alive) : 0);
    s->forkserver_pid = atomic_load(&p->fs_dead) ? -1 : keel__prep_forkserver_pid(p);
    s->restarts_signal = atomic_load(&p->restarts[C_SIGNAL]);
    s->restarts_exit = atomic_load(&p->restarts[C_EXIT]);
    s->restarts_timeout = atomic_load(&p->restarts[C_TIMEOUT]);
    s->restarts_protocol = atomic_load(&p->restarts[C_PROTOCOL]);
    s->spawn_failures = atomic_load(&p->spawn_failures);
    s->tasks_ok = atomic_load(&p->tasks_ok);
    s->tasks_invalid = atomic_load(&p->tasks_invalid);
    s->tasks_timeout = atomic_load(&p->tasks_timeout);
    s->tasks_crashed = atomic_load(&p->tasks_crashed);
    s->tasks_rejected = atomic_load(&p->tasks_rejected);
    s->tasks_error = atomic_load(&p->tasks_error);
    s->memfds_open = atomic_load(&p->memfds);
    pthread_mutex_lock(&p->mu);
    s->bytes_in_flight = p->bytes_in_flight;
    pthread_mutex_unlock(&p->mu);
}

size_t keel__prep_worker_pids(keel__prep_pool *p, pid_t *pids, size_t max)
{
    size_t n = 0;

    pthread_mutex_lock(&p->mu);
    for (int i = 0; i < p->o.workers && n < max; i++) {
        if (p->w[i].st == W_IDLE || p->w[i].st == W_BUSY)
            pids[n++] = p->w[i].pid;
    }
    pthread_mutex_unlock(&p->mu);
    return n;
}

pid_t keel__prep_forkserver_pid(keel__prep_pool *p)
{
    pid_t pid;

    pthread_mutex_lock(&p->fs_mu);
    pid = p->fs_pid;
    pthread_mutex_unlock(&p->fs_mu);
    return pid;
}
