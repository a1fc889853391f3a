/*
 * child.h: run a helper program in a child process with a deadline, and read its reply.
 *
 * DESIGN
 * Untrusted work that may crash or hang (today: checking an ONNX file before OpenCV parses
 * it in the server; later: the preprocessing worker pool's jobs) runs in a child process, so
 * a crash costs the child, not the embedding program. keel is a library inside programs that
 * have threads, so the child is started with posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK)
 * then exec): nothing runs between fork and exec in the child but the spawn's own file
 * actions, and the parent's heap is never copied. A bare fork() of a threaded program followed
 * by library code is not allowed (a lock held by another thread at fork stays locked forever).
 *
 * One run, its states and what it owns:
 *
 *   spawn ──fail──► (nothing was started; pipe and input fd closed) ─► error
 *     │ ok: the parent owns pid + the pipe's read end; the child has stdin = input fd,
 *     │     stdout = the pipe's write end, stderr = /dev/null, every other fd closed
 *     ▼
 *   reading: poll(pipe) until EOF, reply buffer full (rest drained), or the deadline
 *     │ EOF ─► reaping: waitpid(WNOHANG) every few ms until the child exits or the deadline
 *     │ deadline (in either state) ─► kill(SIGKILL) ─► waitpid (blocking: SIGKILL cannot be
 *     │                                                  caught, so this returns at once)
 *     ▼
 *   reaped: the pid is gone (no zombie), the pipe is closed (no fd leak); the result says
 *           how the child ended (exit status, signal, or killed at the deadline)
 *
 * Every fd keel creates is O_CLOEXEC, so a child spawned concurrently by another thread
 * never inherits it; the child's own copies are made by the spawn's dup2 actions. The child's
 * signal mask is emptied and every signal reset to its default (a server blocks SIGTERM and
 * friends for signalfd; a child must not inherit that). If the embedding program sets SIGCHLD
 * to SIG_IGN the kernel reaps the child itself and waitpid fails with ECHILD; that is reported
 * as an error rather than a hang. No keel lock is held while a child runs; any thread may
 * call keel__child_run, and several runs may be in progress at once.
 */
#ifndef KEEL_CORE_CHILD_H
#define KEEL_CORE_CHILD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

typedef enum keel__child_end {
    KEEL__CHILD_EXITED = 0, /* status holds the exit status */
    KEEL__CHILD_SIGNALED,   /* status holds the signal number */
    KEEL__CHILD_TIMEDOUT,   /* killed at the deadline */
} keel__child_end;

typedef struct keel__child_result {
    keel__child_end end;
    int status;
    size_t reply_len; /* bytes of reply kept (the rest, if any, was discarded) */
} keel__child_result;

/*
 * Runs argv[0] (an absolute path) with argv and envp (NULL: this process's environment),
 * stdin_fd as its standard input (borrowed; may be -1 for /dev/null) and its standard output
 * captured into reply (up to reply_cap - 1 bytes, NUL-terminated). Waits at most timeout_ms in
 * total; a child still running then is killed. Returns KEEL_OK when the child was started and
 * reaped (how it ended is in *res), or an error with a message in errbuf if it could not be started
 * (the reply is then empty).
 */
keel_err keel__child_run(char *const argv[], char *const envp[], int stdin_fd, uint64_t timeout_ms,
                         char *reply, size_t reply_cap, keel__child_result *res, char *errbuf,
                         size_t errlen);

#endif
