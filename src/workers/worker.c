/*
 * worker.c: a preprocessing worker process's loop.
 *
 * DESIGN
 * A worker is a child of the fork server (forksrv.c) and holds exactly four descriptors:
 * stdin and stdout on /dev/null, stderr, and its task socket (fd 3). It serves one task at a
 * time: receive a task message with a sealed input memfd, check the memfd's size against the
 * message before mapping it (read-only), run the task, write the result into a new memfd,
 * seal it against shrinking, growing and writing (so the pool can map it without any risk of
 * SIGBUS), and reply with it. End of stream on the socket means the pool closed it: exit.
 * Anything a worker does wrong (crash, hang, garbage) costs only this process: the pool kills
 * and replaces it. Single-threaded; leaves only through _exit().
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "workers/image.h"
#include "workers/ipc.h"
#include "workers/prep.h"

static keel_err run_task(const keel__prep_task_msg *m, const uint8_t *in, void *out, bool *seal,
                         char *msg, size_t msglen)
{
    switch (m->type) {
    case KEEL__PREP_TASK_IMAGE: {
        keel__image_task t;
        if (m->plen != sizeof(t)) {
            keel__errf(msg, msglen, "bad image task parameters");
            return KEEL_EINTERNAL;
        }
        memcpy(&t, m->params, sizeof(t));
        if ((uint64_t)t.count * keel__image_tensor_elems(&t.spec) * sizeof(float) != m->out_bytes) {
            keel__errf(msg, msglen, "image task: result size does not match the spec");
            return KEEL_EINTERNAL;
        }
        return keel__image_batch(&t.spec, in, m->in_bytes, t.count, out, msg, msglen);
    }
#ifdef KEEL_FAULT_INJECTION
    case KEEL__PREP_TASK_SLEEP: {
        uint32_t ms = 0;
        struct timespec ts;
        memcpy(&ms, m->params, m->plen >= 4 ? 4 : 0);
        ts.tv_sec = ms / 1000;
        ts.tv_nsec = (long)(ms % 1000) * 1000000L;
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
        /* fall through */
    case KEEL__PREP_TASK_ECHO:
        if (m->in_bytes != m->out_bytes) {
            keel__errf(msg, msglen, "echo: %llu bytes in, %llu expected out",
                       (unsigned long long)m->in_bytes, (unsigned long long)m->out_bytes);
            return KEEL_EINVAL;
        }
        if (m->in_bytes > 0)
            memcpy(out, in, m->in_bytes);
        return KEEL_OK;
    case KEEL__PREP_TASK_CRASH:
        signal(SIGSEGV, SIG_DFL); /* past any sanitizer's handler: a plain crash */
        raise(SIGSEGV);
        _exit(99);
    case KEEL__PREP_TASK_EXIT:
        _exit(3);
    case KEEL__PREP_TASK_UNSEALED:
        *seal = false;
        memset(out, 0, m->out_bytes);
        return KEEL_OK;
#endif
    default:
        keel__errf(msg, msglen, "unknown task type %u", m->type);
        return KEEL_EINTERNAL;
    }
}

static void serve_one(int sock, const keel__prep_task_msg *m, ssize_t n, int infd, int nfds)
{
    keel__prep_reply_msg r;
    const uint8_t *in = NULL;
    void *map = MAP_FAILED;
    void *out = NULL;
    int outfd = -1;
    bool seal = true;
    struct stat st;
    keel_err err;

    memset(&r, 0, sizeof(r));
    r.magic = KEEL__PREP_MAGIC;
    r.id = m->id;
    if (n != (ssize_t)sizeof(*m) || m->magic != KEEL__PREP_MAGIC || nfds != 1 ||
        m->plen > KEEL__PREP_MAX_PARAMS) {
        keel__errf(r.msg, sizeof(r.msg), "malformed task message");
        err = KEEL_EINTERNAL;
        goto reply;
    }
    if (fstat(infd, &st) != 0 || (uint64_t)st.st_size != m->in_bytes) {
        keel__errf(r.msg, sizeof(r.msg), "task memfd size does not match the message");
        err = KEEL_EINTERNAL;
        goto reply;
    }
    if (m->in_bytes > 0) {
        if ((map = mmap(NULL, m->in_bytes, PROT_READ, MAP_SHARED, infd, 0)) == MAP_FAILED) {
            keel__errf(r.msg, sizeof(r.msg), "cannot map the task: %s", strerror(errno));
            err = KEEL_ENOMEM;
            goto reply;
        }
        in = map;
    }
    if ((out = malloc(m->out_bytes > 0 ? m->out_bytes : 1)) == NULL) {
        keel__errf(r.msg, sizeof(r.msg), "worker out of memory for a %llu-byte result",
                   (unsigned long long)m->out_bytes);
        err = KEEL_ENOMEM;
        goto reply;
    }
    err = run_task(m, in, out, &seal, r.msg, sizeof(r.msg));
    if (err == KEEL_OK &&
        (outfd = keel__memfd_sealed("keel-prep-result", out, m->out_bytes, seal)) < 0) {
        keel__errf(r.msg, sizeof(r.msg), "cannot write the result: %s", strerror(errno));
        err = KEEL_ENOMEM;
    }
reply:
    r.status = (uint32_t)err;
    r.out_bytes = err == KEEL_OK ? m->out_bytes : 0;
    if (keel__prep_send(sock, &r, sizeof(r), &outfd, outfd >= 0 ? 1 : 0) != 0)
        _exit(0); /* the pool is gone or killed us: nothing to answer */
    if (outfd >= 0)
        close(outfd);
    free(out);
    if (map != MAP_FAILED)
        munmap(map, m->in_bytes);
}

_Noreturn void keel__worker_main_loop(int sock)
{
    for (;;) {
        keel__prep_task_msg m;
        int fd = -1, nfds = 0;
        ssize_t n = keel__prep_recv(sock, &m, sizeof(m), &fd, 1, &nfds);

        if (n == 0)
            _exit(0);
        if (n < 0 && n != -EMSGSIZE)
            _exit(1);
        serve_one(sock, &m, n, fd, nfds);
        if (nfds > 0)
            close(fd);
    }
}
