/*
 * ipc.c: how the preprocessing processes talk: one SOCK_SEQPACKET message with descriptors
 * (SCM_RIGHTS), closing inherited descriptors in a fresh child, and sealed memfds.
 *
 * DESIGN
 * The bottom of src/workers/: pool.c (the keel process), forksrv.c (the fork server) and
 * worker.c (a worker) all call it, and it calls none of them. It owns no state and takes no
 * lock; every function works on the descriptors its caller passes, from any thread of any of
 * the three processes (keel__close_fds_from only in a freshly forked child). A descriptor
 * received or created here belongs to the caller from the moment it is returned.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "workers/ipc.h"

void keel__close_fds_from(int from)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)from, ~0u, 0u) == 0)
        return;
#endif
    /* Old kernels: close what /proc lists (or a fixed range if /proc is missing). */
    for (int fd = from; fd < 4096; fd++)
        close(fd);
}

int keel__prep_send(int sock, const void *buf, size_t len, const int *fds, int nfds)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n;

    if (nfds > 0) {
        struct cmsghdr *c;
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    do {
        n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno;
    return (size_t)n == len ? 0 : EMSGSIZE;
}

ssize_t keel__prep_recv(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds)
{
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n;
    int kept = 0;

    *nfds = 0;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof(u.buf);
    do {
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (kept < maxfds)
                fds[kept++] = fd;
            else
                close(fd);
        }
    }
    *nfds = kept;
    if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) {
        for (int i = 0; i < kept; i++)
            close(fds[i]);
        *nfds = 0;
        /* The message whole but its descriptors cut: our buffer holds more than any peer
         * sends, so the kernel could not install them (this process is at its fd limit) and
         * closed them. The bytes in buf are valid. */
        if ((mh.msg_flags & MSG_TRUNC) == 0 && maxfds > 0)
            return -EMFILE;
        return -EMSGSIZE;
    }
    return n;
}

int keel__memfd_sealed(const char *name, const void *data, size_t len, bool seal)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    size_t off = 0;

    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)len) != 0)
        goto fail;
    while (off < len) {
        ssize_t n = pwrite(fd, (const char *)data + off, len - off, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            goto fail;
        off += (size_t)n;
    }
    if (seal && fcntl(fd, F_ADD_SEALS, KEEL__MEMFD_SEALS | F_SEAL_SEAL) != 0)
        goto fail;
    return fd;
fail : {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}
}
