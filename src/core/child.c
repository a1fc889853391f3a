/*
 * child.c: see child.h (the DESIGN comment there has the state machine and the lifetimes).
 */
#include "core/child.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"

extern char **environ;

static uint64_t ms_left(uint64_t deadline_ns)
{
    uint64_t now = keel__now_ns();

    return now >= deadline_ns ? 0 : (deadline_ns - now + 999999) / 1000000;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {0, (long)ms * 1000000L};

    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Waits for pid without a deadline (used after SIGKILL). */
static int wait_blocking(pid_t pid, int *wstatus)
{
    pid_t r;

    while ((r = waitpid(pid, wstatus, 0)) == -1 && errno == EINTR)
        ;
    return r == pid ? 0 : -1;
}

keel_err keel__child_run(char *const argv[], char *const envp[], int stdin_fd, uint64_t timeout_ms,
                         char *reply, size_t reply_cap, keel__child_result *res, char *errbuf,
                         size_t errlen)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    bool fa_ok = false, attr_ok = false;
    int pipefd[2] = {-1, -1};
    pid_t pid = -1;
    sigset_t none, all;
    uint64_t deadline;
    size_t len = 0;
    int wstatus = 0, rc;
    bool eof = false, timed_out = false;
    keel_err err;

    memset(res, 0, sizeof(*res));
    if (reply_cap > 0)
        reply[0] = '\0';
    if (timeout_ms > UINT64_MAX / 2000000)
        timeout_ms = UINT64_MAX / 2000000;
    deadline = keel__now_ns() + timeout_ms * 1000000;

    if (pipe2(pipefd, O_CLOEXEC) != 0) {
        keel__errf(errbuf, errlen, "cannot create a pipe for %s: %s", argv[0], strerror(errno));
        err = keel__err_from_errno(errno);
        goto fail;
    }
    if ((rc = posix_spawn_file_actions_init(&fa)) != 0) {
        errno = rc;
        goto spawn_error;
    }
    fa_ok = true;
    if ((rc = posix_spawnattr_init(&attr)) != 0) {
        errno = rc;
        goto spawn_error;
    }
    attr_ok = true;
    sigemptyset(&none);
    sigfillset(&all);
    if ((rc = stdin_fd >= 0
                  ? posix_spawn_file_actions_adddup2(&fa, stdin_fd, 0)
                  : posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)) != 0 ||
        (rc = posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1)) != 0 ||
        (rc = posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0)) != 0 ||
        (rc = posix_spawn_file_actions_addclosefrom_np(&fa, 3)) != 0 ||
        (rc = posix_spawnattr_setsigmask(&attr, &none)) != 0 ||
        (rc = posix_spawnattr_setsigdefault(&attr, &all)) != 0 ||
        (rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)) !=
            0) {
        errno = rc;
        goto spawn_error;
    }
    if ((rc = posix_spawn(&pid, argv[0], &fa, &attr, argv, envp != NULL ? envp : environ)) != 0) {
        pid = -1;
        errno = rc;
        goto spawn_error;
    }
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    fa_ok = attr_ok = false;
    close(pipefd[1]); /* the child holds the only write end now */
    pipefd[1] = -1;

    /* reading */
    while (!eof) {
        struct pollfd p = {pipefd[0], POLLIN, 0};
        uint64_t left = ms_left(deadline);
        char sink[4096];
        ssize_t n;

        if (left == 0) {
            timed_out = true;
            break;
        }
        rc = poll(&p, 1, left > 1000 ? 1000 : (int)left);
        if (rc < 0 && errno != EINTR) {
            timed_out = true; /* cannot wait any more: treat as a hang, kill it */
            break;
        }
        if (rc <= 0)
            continue;
        if (len + 1 < reply_cap)
            n = read(pipefd[0], reply + len, reply_cap - 1 - len);
        else
            n = read(pipefd[0], sink, sizeof(sink)); /* reply full: drain and discard */
        if (n == 0)
            eof = true;
        else if (n > 0 && len + 1 < reply_cap)
            len += (size_t)n;
        else if (n < 0 && errno != EINTR && errno != EAGAIN)
            eof = true;
    }
    if (reply_cap > 0)
        reply[len] = '\0';
    res->reply_len = len;

    /* reaping */
    while (!timed_out) {
        pid_t r = waitpid(pid, &wstatus, WNOHANG);
        if (r == pid)
            break;
        if (r == -1 && errno != EINTR) {
            keel__errf(errbuf, errlen, "cannot wait for %s (pid %d): %s", argv[0], (int)pid,
                       strerror(errno));
            pid = -1; /* not ours to reap any more (SIGCHLD ignored?) */
            err = KEEL_EIO;
            goto fail;
        }
        if (ms_left(deadline) == 0)
            timed_out = true;
        else
            sleep_ms(2);
    }
    if (timed_out) {
        kill(pid, SIGKILL);
        if (wait_blocking(pid, &wstatus) != 0) {
            keel__errf(errbuf, errlen, "cannot reap %s (pid %d): %s", argv[0], (int)pid,
                       strerror(errno));
            pid = -1;
            err = KEEL_EIO;
            goto fail;
        }
        res->end = KEEL__CHILD_TIMEDOUT;
    } else if (WIFSIGNALED(wstatus)) {
        res->end = KEEL__CHILD_SIGNALED;
        res->status = WTERMSIG(wstatus);
    } else {
        res->end = KEEL__CHILD_EXITED;
        res->status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1;
    }
    close(pipefd[0]);
    return KEEL_OK;

spawn_error:
    keel__errf(errbuf, errlen, "cannot start %s: %s", argv[0], strerror(errno));
    err = errno == ENOMEM ? KEEL_ENOMEM : KEEL_EIO;
fail:
    if (fa_ok)
        posix_spawn_file_actions_destroy(&fa);
    if (attr_ok)
        posix_spawnattr_destroy(&attr);
    if (pid > 0) {
        kill(pid, SIGKILL);
        wait_blocking(pid, &wstatus);
    }
    if (pipefd[0] != -1)
        close(pipefd[0]);
    if (pipefd[1] != -1)
        close(pipefd[1]);
    if (reply_cap > 0)
        reply[0] = '\0';
    return err;
}
