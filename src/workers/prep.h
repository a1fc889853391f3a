/*
 * prep.h: the preprocessing pool: untrusted-input work (image decoding) in worker processes.
 *
 * DESIGN
 * A pool owns one fork server process and its worker processes (pool.c has the state
 * machines, lock order and the reasons for each choice). Callers on any thread submit one
 * task at a time per call with keel__prep_run(), which blocks the calling thread until the
 * result, the task's deadline, or the worker's death; the pool supervises and replaces
 * workers itself. Create the pool before the process starts threads or loads models: the fork
 * server is forked from the calling thread at create and every worker descends from it.
 */
#ifndef KEEL_WORKERS_PREP_H
#define KEEL_WORKERS_PREP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "core/core.h"

#define KEEL__PREP_MAX_WORKERS 64

typedef struct keel__prep_opts {
    int workers;                  /* worker processes, 1..KEEL__PREP_MAX_WORKERS */
    uint32_t task_timeout_ms;     /* a task's deadline when the caller has none (or a later) */
    uint64_t max_task_bytes;      /* one task's input plus its result */
    uint64_t max_total_bytes;     /* inputs plus results of every task in flight */
    uint64_t worker_memory_limit; /* RLIMIT_AS of a worker; 0 = none (ignored under ASan/TSan) */
    keel__logger log;
} keel__prep_opts;

#define KEEL__PREP_DEFAULT_WORKERS 2
#define KEEL__PREP_DEFAULT_TIMEOUT_MS 10000u
#define KEEL__PREP_DEFAULT_MAX_TASK_BYTES (64u * 1024u * 1024u)
#define KEEL__PREP_DEFAULT_WORKER_MEMORY (1024ull * 1024u * 1024u)

void keel__prep_opts_init(keel__prep_opts *o);

/* Task types. The test types exist only in builds with fault points. */
enum {
    KEEL__PREP_TASK_IMAGE = 1, /* params: keel__image_spec; input: BYTES elements */
#ifdef KEEL_FAULT_INJECTION
    KEEL__PREP_TASK_ECHO = 100,     /* output = input */
    KEEL__PREP_TASK_SLEEP = 101,    /* sleeps params' u32 milliseconds, then echoes */
    KEEL__PREP_TASK_CRASH = 102,    /* dies of SIGSEGV */
    KEEL__PREP_TASK_EXIT = 103,     /* _exit(3) */
    KEEL__PREP_TASK_UNSEALED = 104, /* replies with a result memfd it did not seal */
#endif
};

#define KEEL__PREP_MAX_PARAMS 128

typedef struct keel__prep_pool keel__prep_pool;

/* Forks the fork server and starts the workers (waits for each to be spawned). On KEEL_OK
 * the caller owns *out (keel__prep_pool_destroy). errbuf says why on failure. */
keel_err keel__prep_pool_create(const keel__prep_opts *o, keel__prep_pool **out, char *errbuf,
                                size_t errlen);

/* Kills and reaps every worker and the fork server and closes every descriptor, within a
 * bounded time. No task may be running (callers stopped first). Accepts NULL. */
void keel__prep_pool_destroy(keel__prep_pool *p);

/*
 * Runs one task in a worker: params (plen bytes, <= KEEL__PREP_MAX_PARAMS) and the input
 * (in, inlen) go to the worker in a sealed memfd; the result must be exactly out_len bytes,
 * copied into out. deadline_ns (CLOCK_MONOTONIC; 0 = none) is tightened to the pool's task
 * timeout; the call returns by then whatever the worker does. Returns KEEL_OK;
 * KEEL_EINVAL (the worker refused the input: errbuf names the problem); KEEL_ERESOURCE
 * (a byte limit); KEEL_ETIMEDOUT (no worker free in time, or the worker overran and was
 * killed); KEEL_EBACKEND (the worker crashed or broke the protocol and was replaced);
 * KEEL_EUNAVAILABLE (the pool cannot run workers); KEEL_ESHUTDOWN; KEEL_ENOMEM/KEEL_EIO.
 * Thread-safe; blocks the calling thread.
 */
keel_err keel__prep_run(keel__prep_pool *p, uint32_t type, const void *params, size_t plen,
                        const void *in, size_t inlen, void *out, size_t out_len,
                        uint64_t deadline_ns, char *errbuf, size_t errlen);

typedef struct keel__prep_stats {
    bool healthy;
    uint32_t workers;       /* configured */
    uint32_t workers_alive; /* spawned and not known dead */
    int64_t forkserver_pid; /* -1 once it is gone */
    uint64_t restarts_signal, restarts_exit, restarts_timeout, restarts_protocol;
    uint64_t spawn_failures;
    uint64_t tasks_ok, tasks_invalid, tasks_timeout, tasks_crashed, tasks_rejected, tasks_error;
    int64_t memfds_open; /* memfds the parent holds now */
    uint64_t bytes_in_flight;
} keel__prep_stats;

void keel__prep_stats_get(keel__prep_pool *p, keel__prep_stats *out);
/* True when the fork server lives and at least one worker is alive or can be spawned. */
bool keel__prep_healthy(keel__prep_pool *p);
/* Pids of live workers (tests); returns how many were written. */
size_t keel__prep_worker_pids(keel__prep_pool *p, pid_t *pids, size_t max);
pid_t keel__prep_forkserver_pid(keel__prep_pool *p);

/* ---- inside the child processes (forksrv.c, worker.c); their transport is ipc.h */
_Noreturn void keel__forksrv_main(int ctl, const keel__prep_opts *o);
_Noreturn void keel__worker_main_loop(int sock);
/* Wire format (one SOCK_SEQPACKET message each; fds travel as SCM_RIGHTS). */
#define KEEL__PREP_MAGIC 0x6b65656cu /* "keel" */
typedef struct keel__prep_task_msg {
    uint32_t magic;
    uint32_t type;
    uint64_t id;
    uint64_t in_bytes;  /* size of the sealed input memfd (sent with the message) */
    uint64_t out_bytes; /* the exact result size expected */
    uint32_t plen;
    uint8_t params[KEEL__PREP_MAX_PARAMS];
} keel__prep_task_msg;

typedef struct keel__prep_reply_msg {
    uint32_t magic;
    uint32_t status; /* keel_err */
    uint64_t id;
    uint64_t out_bytes; /* of the sealed result memfd sent with the message (status OK) */
    char msg[400];
} keel__prep_reply_msg;

/* Fork server control: requests and replies. */
enum { KEEL__FS_SPAWN = 1, KEEL__FS_REAP = 2 };
typedef struct keel__fs_req {
    uint32_t magic;
    uint32_t op;
    int32_t pid; /* REAP */
} keel__fs_req;
typedef struct keel__fs_reply {
    uint32_t magic;
    int32_t err; /* errno, 0 = ok */
    int32_t pid;
    int32_t status; /* REAP: waitpid status */
} keel__fs_reply;

#endif
