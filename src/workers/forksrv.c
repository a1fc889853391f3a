/*
 * forksrv.c: the fork server.
 *
 * DESIGN
 * The fork server is a child of the keel process, forked by keel__prep_pool_create before
 * any model is loaded (and, in `keel serve` and keel_runtime_create, before keel starts any
 * thread), so it holds no model memory and is single-threaded. Right after the fork it keeps
 * only stdin/stdout on /dev/null, stderr, and its control socket (fd 3); every other
 * descriptor it inherited (listening sockets, model files, eventfds) is closed. It then only
 * answers requests on the control socket, one at a time:
 *   SPAWN  fork a worker; reply with the worker's pid, our end of a fresh socketpair and a
 *          pidfd of the worker (SCM_RIGHTS). The pidfd lets the pool signal and watch the
 *          worker without pid-reuse races although it is not the worker's parent.
 *   REAP   return the wait status of a worker that has exited.
 * The fork server is every worker's parent and reaps them as soon as they exit (SIGCHLD via
 * a signalfd), keeping each status until the pool asks for it, so no worker stays a zombie
 * whether or not the pool is looking. When its control socket reaches end of stream (the pool
 * closed it, or the keel process died) it kills and reaps every worker and exits. Workers
 * have PR_SET_PDEATHSIG(SIGKILL), so a kill -9 of the fork server takes them down too.
 * Children never return into keel code: they leave with _exit().
 * Files: forksrv.c calls worker.c (a new worker runs keel__worker_main_loop) and ipc.c (the
 * messages and descriptors it sends); nothing here is called back by them.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "workers/ipc.h"
#include "workers/prep.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KEEL__SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define KEEL__SANITIZED 1
#endif
#endif

/* ---- the fork server (child process) */

#define FS_MAX_KIDS 256

typedef struct fs_kid {
    pid_t pid;
    int status;
    bool exited;
} fs_kid;

static fs_kid kids[FS_MAX_KIDS]; /* the fork server's own process: no sharing */
static size_t nkids;

static void fs_reap_nohang(void)
{
    pid_t pid;
    int st;

    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (size_t i = 0; i < nkids; i++) {
            if (kids[i].pid == pid) {
                kids[i].exited = true;
                kids[i].status = st;
            }
        }
    }
}

static void fs_forget(size_t i)
{
    kids[i] = kids[--nkids];
}

_Noreturn static void worker_child(int sock, pid_t fs, const keel__prep_opts *o)
{
    sigset_t none;
    struct sigaction sa;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != fs)
        _exit(1); /* the fork server died between fork and prctl */
    if (sock != 3) {
        if (dup2(sock, 3) < 0)
            _exit(1);
    }
    keel__close_fds_from(4);
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigaction(SIGCHLD, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    sigaction(SIGINT, &sa, NULL); /* a terminal's ^C is for keel, which then tears us down */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    prctl(PR_SET_NAME, "keel-prep");
#ifndef KEEL__SANITIZED
    /* Sanitizer runtimes reserve terabytes of address space: no RLIMIT_AS under them. */
    if (o->worker_memory_limit > 0) {
        struct rlimit rl = {.rlim_cur = o->worker_memory_limit, .rlim_max = o->worker_memory_limit};
        setrlimit(RLIMIT_AS, &rl);
    }
#else
    (void)o;
#endif
    {
        /* Hello: the pool counts the worker as spawned only once it is set up (its
         * descriptors closed), so nothing observes it half-initialised. */
        keel__prep_reply_msg hello;
        memset(&hello, 0, sizeof(hello));
        hello.magic = KEEL__PREP_MAGIC;
        if (keel__prep_send(3, &hello, sizeof(hello), NULL, 0) != 0)
            _exit(1);
    }
    keel__worker_main_loop(3);
}

/* SPAWN: forks one worker and hands the pool its socket and a pidfd. */
static void fs_spawn(int ctl, const keel__prep_opts *o)
{
    keel__fs_reply r = {.magic = KEEL__PREP_MAGIC};
    int sv[2] = {-1, -1};
    int pidfd = -1;
    pid_t pid = -1, self = getpid();

    if (nkids >= FS_MAX_KIDS) {
        r.err = EAGAIN;
        goto reply;
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
        r.err = errno;
        goto reply;
    }
    if ((pid = fork()) < 0) {
        r.err = errno;
        goto reply;
    }
    if (pid == 0)
        worker_child(sv[1], self, o);
    close(sv[1]);
    sv[1] = -1;
    kids[nkids].pid = pid;
    kids[nkids].exited = false;
    kids[nkids].status = 0;
    nkids++;
    /* The worker cannot have been reaped yet (only this thread reaps), so the pid is its. */
    if ((pidfd = (int)syscall(SYS_pidfd_open, pid, 0)) < 0) {
        r.err = errno;
        kill(pid, SIGKILL);
        goto reply;
    }
    r.pid = pid;
reply:
    if (r.err == 0) {
        int fds[2] = {sv[0], pidfd};
        (void)keel__prep_send(ctl, &r, sizeof(r), fds, 2);
    } else {
        (void)keel__prep_send(ctl, &r, sizeof(r), NULL, 0);
    }
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    if (pidfd >= 0)
        close(pidfd);
}

static void fs_reap(int ctl, pid_t pid)
{
    keel__fs_reply r = {.magic = KEEL__PREP_MAGIC, .pid = pid};
    size_t i;

    fs_reap_nohang();
    for (i = 0; i < nkids && kids[i].pid != pid; i++)
        ;
    if (i == nkids) {
        r.err = ESRCH;
    } else if (!kids[i].exited) {
        /* The pool asks only once the worker's pidfd reported its exit; do not block on a
         * live process all the same. */
        r.err = EBUSY;
    } else {
        r.status = kids[i].status;
        fs_forget(i);
    }
    (void)keel__prep_send(ctl, &r, sizeof(r), NULL, 0);
}

_Noreturn static void fs_exit(void)
{
    for (size_t i = 0; i < nkids; i++) {
        if (!kids[i].exited)
            kill(kids[i].pid, SIGKILL);
    }
    for (size_t i = 0; i < nkids; i++) {
        int st;
        if (!kids[i].exited)
            while (waitpid(kids[i].pid, &st, 0) < 0 && errno == EINTR)
                ;
    }
    _exit(0);
}

_Noreturn void keel__forksrv_main(int ctl, const keel__prep_opts *o)
{
    sigset_t chld;
    struct sigaction sa;
    int sfd;

    prctl(PR_SET_NAME, "keel-forksrv");
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_SETMASK, &chld, NULL); /* SIGCHLD only through the signalfd */
    if ((sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK)) < 0)
        _exit(1);
    for (;;) {
        struct pollfd pf[2] = {{.fd = ctl, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            fs_exit();
        }
        if (pf[1].revents != 0) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
                ;
            fs_reap_nohang();
        }
        if (pf[0].revents != 0) {
            keel__fs_req q;
            int nfds;
            ssize_t n = keel__prep_recv(ctl, &q, sizeof(q), NULL, 0, &nfds);
            if (n <= 0 && n != -EINTR && n != -EAGAIN)
                fs_exit(); /* end of stream: the pool is gone */
            if (n != (ssize_t)sizeof(q) || q.magic != KEEL__PREP_MAGIC)
                continue;
            if (q.op == KEEL__FS_SPAWN)
                fs_spawn(ctl, o);
            else if (q.op == KEEL__FS_REAP)
                fs_reap(ctl, q.pid);
        }
    }
}
