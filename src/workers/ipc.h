/*
 * ipc.h: messages with descriptors, descriptor hygiene in a child, sealed memfds (ipc.c).
 *
 * DESIGN
 * The lowest file of src/workers/; used by pool.c, forksrv.c and worker.c in their own
 * processes. No state, no lock. The wire formats of the messages are in prep.h.
 */
#ifndef KEEL_WORKERS_IPC_H
#define KEEL_WORKERS_IPC_H

#include <fcntl.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* The seals every memfd crossing a process boundary carries (a reader checks them). */
#define KEEL__MEMFD_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)

/* Closes every descriptor >= from. Async-signal-safe enough for a child of a
 * single-threaded process (close_range, or a fixed range on old kernels). */
void keel__close_fds_from(int from);
/* One message with up to 2 descriptors (MSG_NOSIGNAL). Returns 0 or an errno value. */
int keel__prep_send(int sock, const void *buf, size_t len, const int *fds, int nfds);
/* Receives one message of at most len bytes and up to maxfds descriptors (close-on-exec;
 * extra ones are closed, *nfds says how many were kept). Returns the message length, 0 at
 * end of stream, or -errno. A truncated message is -EMSGSIZE. -EMFILE: the message arrived
 * whole (buf holds it) but its descriptors were lost because this process is out of file
 * descriptors (the kernel closed them; none is returned). */
ssize_t keel__prep_recv(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds);
/* A new close-on-exec memfd named name holding len bytes of data, sealed with
 * KEEL__MEMFD_SEALS and F_SEAL_SEAL unless seal is false (a fault-injection test). Returns
 * the descriptor (the caller owns it) or -1 with errno set. */
int keel__memfd_sealed(const char *name, const void *data, size_t len, bool seal);

#endif
