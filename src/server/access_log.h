/*
 * access_log.h: the access log of `keel serve` (--access-log PATH|-): one line per request,
 * logfmt or JSON, written by a logger thread so that a slow disk never blocks a request.
 *
 * DESIGN
 * srv_alog (access_log.c) owns the log file's descriptor, two byte buffers and the writer
 * thread. Requests format their line on their own thread and copy it into the filling
 * buffer under a.mu (a memcpy, never I/O); when the line does not fit, it is dropped and
 * counted. The writer swaps the buffers under a.mu and writes the full one with no lock
 * held, through a non-blocking descriptor and poll(2), so that a stop or a reopen reaches
 * it even while the reader of a pipe has stopped reading. Dropped lines are reported in the
 * log itself (one line saying how many) and on stderr, and counted in /metrics.
 *
 * Locks: a.mu only (a leaf; never held across I/O or while calling out).
 * Threads: write and reopen from any thread; open/close on the main thread (close after the
 * last writer: the HTTP daemon has stopped).
 */
#ifndef KEEL_SERVER_ACCESS_LOG_H
#define KEEL_SERVER_ACCESS_LOG_H

#include <stddef.h>
#include <stdint.h>

#include "observe.h"

typedef enum srv_alog_format {
    SRV_ALOG_LOGFMT = 0,
    SRV_ALOG_JSON,
} srv_alog_format;

typedef struct srv_alog srv_alog;

/* Opens path for appending ("-" = standard output) and starts the writer thread, whose
 * buffers hold buffer_bytes each. On KEEL_OK *out owns all of it (keel__srv_alog_close);
 * otherwise err says what failed (naming the path). */
keel_err keel__srv_alog_open(const char *path, srv_alog_format fmt, size_t buffer_bytes,
                             srv_alog **out, char *err, size_t errlen);

/* Formats ev as one line and queues it; drops (and counts) it if the buffer is full. Never
 * blocks on I/O. Any thread. */
void keel__srv_alog_write(srv_alog *a, const srv_obs_event *ev);

/* Asks the writer to close and reopen the file (logrotate's SIGHUP). Any thread. */
void keel__srv_alog_reopen(srv_alog *a);

/* Lines queued and lines dropped since open. Any thread. */
uint64_t keel__srv_alog_lines(const srv_alog *a);
uint64_t keel__srv_alog_dropped(const srv_alog *a);

/* Writes what is queued (giving up after 2 s on a stuck reader: the rest is counted as
 * dropped), stops the writer and frees everything. Accepts NULL. */
void keel__srv_alog_close(srv_alog *a);

#endif
