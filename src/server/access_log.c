/*
 * access_log.c: the access log's line formats, its two buffers and its writer thread.
 *
 * DESIGN
 * See access_log.h for the contract. The "ring" is a pair of byte buffers: producers append
 * whole lines to fill[] under a.mu; the writer swaps fill[] with its drained spare and
 * writes the full one with no lock held. Memory is bounded by 2 x buffer_bytes whatever the
 * disk does; a line that does not fit is dropped, never split.
 *
 * Writer states: WAITING (cv, for data, a reopen or stop) -> WRITING (poll(2) on the file
 * and on an eventfd that stop/reopen kick) -> WAITING. On stop it writes what is left for
 * up to STOP_FLUSH_MS, then counts what it could not write as dropped and exits. A write
 * error (disk full, a closed pipe) drops the chunk (counted) and is logged once until a
 * write succeeds again; a reopen starts from a clean state.
 *
 * Untrusted strings (request id, model name from the URL) are cut at FIELD_MAX bytes and
 * escaped, so a request never makes more than one line: logfmt quotes and escapes control
 * characters, JSON escapes them and replaces invalid UTF-8 with U+FFFD.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "access_log.h"
#include "server_internal.h"
#include "server_log.h"

#define LINE_BYTES 8192
#define FIELD_MAX 256
#define STOP_FLUSH_MS 2000

struct srv_alog {
    char *path; /* NULL = standard output */
    srv_alog_format fmt;
    size_t cap;
    int fd;  /* writer thread only (after open) */
    int efd; /* eventfd: stop/reopen wake a writer blocked in poll */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *fill; /* mu: lines waiting for the writer */
    size_t fill_len;
    char *spare; /* writer only */
    bool stop;   /* mu */
    bool reopen; /* mu */
    pthread_t thread;

    _Atomic uint64_t lines, dropped;
    uint64_t reported; /* writer only: drops already said in the log */
    bool failing;      /* writer only: the last write failed (logged once) */
};

/* ---------------------------------------------------------------- line building */

typedef struct lbuf {
    char *p;
    size_t len, cap;
} lbuf;

static void put(lbuf *b, const char *s, size_t n)
{
    if (n > b->cap - b->len)
        n = b->cap - b->len;
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void puts_(lbuf *b, const char *s)
{
    put(b, s, strlen(s));
}

static void putf(lbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(lbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->len >= b->cap)
        return;
    va_start(ap, fmt);
    n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n > 0) /* vsnprintf kept at most cap - len - 1 characters */
        b->len += (size_t)n < b->cap - b->len ? (size_t)n : b->cap - b->len - 1;
}

static size_t field_len(const char *v)
{
    return strnlen(v, FIELD_MAX);
}

static void logfmt_value(lbuf *b, const char *v)
{
    size_t n = field_len(v);
    bool quote = n == 0;

    for (size_t i = 0; i < n && !quote; i++) {
        unsigned char c = (unsigned char)v[i];
        quote = c <= ' ' || c == '=' || c == '"' || c == 0x7f;
    }
    if (!quote) {
        put(b, v, n);
        return;
    }
    put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            put(b, e, 2);
        } else if (c == '\n') {
            put(b, "\\n", 2);
        } else if (c == '\t') {
            put(b, "\\t", 2);
        } else if (c < 0x20 || c == 0x7f) {
            putf(b, "\\x%02x", c);
        } else {
            put(b, (const char *)&v[i], 1);
        }
    }
    put(b, "\"", 1);
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    size_t len;
    unsigned char lo = 0x80, hi = 0xbf;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        len = 2;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        len = 3;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        len = 4;
    else
        return 0;
    if (len > n)
        return 0;
    if (s[0] == 0xe0)
        lo = 0xa0; /* overlong */
    else if (s[0] == 0xed)
        hi = 0x9f; /* surrogates */
    else if (s[0] == 0xf0)
        lo = 0x90;
    else if (s[0] == 0xf4)
        hi = 0x8f;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++) {
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    }
    return len;
}

static void json_string(lbuf *b, const char *v)
{
    const unsigned char *s = (const unsigned char *)v;
    size_t n = field_len(v);

    put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            put(b, e, 2);
            i++;
        } else if (c == '\n') {
            put(b, "\\n", 2);
            i++;
        } else if (c < 0x20 || c == 0x7f) {
            putf(b, "\\u%04x", c);
            i++;
        } else {
            size_t k = utf8_seq(s + i, n - i);
            if (k == 0) {
                puts_(b, "\\ufffd");
                i++;
            } else {
                put(b, (const char *)s + i, k);
                i += k;
            }
        }
    }
    put(b, "\"", 1);
}

static void timestamp(char *out, size_t len)
{
    struct timespec ts;
    struct tm tm;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    /* 27 bytes for any year up to 9999; the check keeps a garbled clock from leaving a partial
     * stamp (and tells the compiler the truncation is handled). */
    if (snprintf(out, len, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 (int)(ts.tv_nsec / 1000)) >= (int)len)
        snprintf(out, len, "-");
}

static uint64_t queue_us(const keel_request_timing *t)
{
    uint64_t left = t->dispatch_ns != 0 ? t->dispatch_ns : t->complete_ns;

    return t->submit_ns != 0 && left > t->submit_ns ? (left - t->submit_ns) / 1000u : 0;
}

static uint64_t compute_us(const keel_request_timing *t)
{
    return t->output_start_ns != 0 && t->input_end_ns != 0
               ? (t->output_start_ns - t->input_end_ns) / 1000u
               : 0;
}

static const char *nz(const char *s)
{
    return s != NULL ? s : "";
}

/* One line, newline included. */
static void format_line(srv_alog_format fmt, const srv_obs_event *ev, lbuf *b)
{
    char ts[40], ver[24];
    uint64_t total_us = ev->end_ns > ev->start_ns ? (ev->end_ns - ev->start_ns) / 1000u : 0;

    timestamp(ts, sizeof(ts));
    if (ev->version >= 0)
        snprintf(ver, sizeof(ver), "%" PRId64, ev->version);
    else
        ver[0] = '\0';
    if (fmt == SRV_ALOG_JSON) {
        putf(b, "{\"ts\":\"%s\",\"request_id\":", ts);
        json_string(b, nz(ev->request_id));
        puts_(b, ",\"model\":");
        json_string(b, nz(ev->model));
        putf(b, ",\"version\":%s,\"generation\":%" PRIu64 ",\"protocol\":\"%s\",\"method\":",
             ver[0] != '\0' ? ver : "null", ev->generation, keel__srv_protocol_name(ev->protocol));
        json_string(b, nz(ev->method));
        puts_(b, ",\"route\":");
        json_string(b, nz(ev->route));
        putf(b,
             ",\"status\":%u,\"bytes_in\":%" PRIu64 ",\"bytes_out\":%" PRIu64
             ",\"queue_us\":%" PRIu64 ",\"compute_us\":%" PRIu64 ",\"total_us\":%" PRIu64
             ",\"peer\":",
             ev->status, ev->bytes_in, ev->bytes_out, queue_us(&ev->timing),
             compute_us(&ev->timing), total_us);
        json_string(b, nz(ev->peer));
        puts_(b, ",\"trace_id\":");
        json_string(b, nz(ev->trace_id));
        puts_(b, "}");
    } else {
        putf(b, "ts=%s request_id=", ts);
        logfmt_value(b, nz(ev->request_id));
        puts_(b, " model=");
        logfmt_value(b, nz(ev->model));
        puts_(b, " version=");
        logfmt_value(b, ver);
        putf(b, " generation=%" PRIu64 " protocol=%s method=", ev->generation,
             keel__srv_protocol_name(ev->protocol));
        logfmt_value(b, nz(ev->method));
        puts_(b, " route=");
        logfmt_value(b, nz(ev->route));
        putf(b,
             " status=%u bytes_in=%" PRIu64 " bytes_out=%" PRIu64 " queue_us=%" PRIu64
             " compute_us=%" PRIu64 " total_us=%" PRIu64 " peer=",
             ev->status, ev->bytes_in, ev->bytes_out, queue_us(&ev->timing),
             compute_us(&ev->timing), total_us);
        logfmt_value(b, nz(ev->peer));
        puts_(b, " trace_id=");
        logfmt_value(b, nz(ev->trace_id));
    }
    /* The fields are bounded, so this always fits; the newline is kept regardless. */
    if (b->len >= b->cap)
        b->len = b->cap - 1;
    b->p[b->len++] = '\n';
}

/* ---------------------------------------------------------------- producers */

void keel__srv_alog_write(srv_alog *a, const srv_obs_event *ev)
{
    char line[LINE_BYTES];
    lbuf b = {line, 0, sizeof(line)};
    bool wake = false, fits;

    format_line(a->fmt, ev, &b);
    pthread_mutex_lock(&a->mu);
    fits = b.len <= a->cap - a->fill_len;
    if (fits) {
        wake = a->fill_len == 0;
        memcpy(a->fill + a->fill_len, line, b.len);
        a->fill_len += b.len;
    }
    pthread_mutex_unlock(&a->mu);
    if (!fits) {
        atomic_fetch_add_explicit(&a->dropped, 1, memory_order_relaxed);
        return;
    }
    atomic_fetch_add_explicit(&a->lines, 1, memory_order_relaxed);
    if (wake)
        pthread_cond_signal(&a->cv);
}

static void kick(srv_alog *a)
{
    uint64_t one = 1;

    if (write(a->efd, &one, sizeof(one)) < 0) {
        /* The counter is saturated: the writer has a wake-up pending already. */
    }
}

void keel__srv_alog_reopen(srv_alog *a)
{
    pthread_mutex_lock(&a->mu);
    a->reopen = true;
    pthread_mutex_unlock(&a->mu);
    pthread_cond_signal(&a->cv);
    kick(a);
}

uint64_t keel__srv_alog_lines(const srv_alog *a)
{
    return atomic_load_explicit(&a->lines, memory_order_relaxed);
}

uint64_t keel__srv_alog_dropped(const srv_alog *a)
{
    return atomic_load_explicit(&a->dropped, memory_order_relaxed);
}

/* ---------------------------------------------------------------- the writer */

/* Opens the log non-blocking. -1 with errno on failure. */
static int open_log(const char *path)
{
    int fd;

    if (path != NULL)
        return open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0644);
    /* Standard output: a new open file description where the kernel allows one, so that
     * O_NONBLOCK does not leak to whoever shares our stdout; else a blocking duplicate. */
    fd = open("/proc/self/fd/1", O_WRONLY | O_APPEND | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        fd = fcntl(1, F_DUPFD_CLOEXEC, 3);
    return fd;
}

static size_t count_lines(const char *p, size_t n)
{
    size_t k = 0;

    for (size_t i = 0; i < n; i++)
        k += p[i] == '\n';
    return k;
}

static bool stop_requested(srv_alog *a)
{
    bool stop;

    pthread_mutex_lock(&a->mu);
    stop = a->stop;
    pthread_mutex_unlock(&a->mu);
    return stop;
}

static uint64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Writes p[0..n) to the log; what cannot be written (error, or stuck past the stop
 * deadline) is counted as dropped. */
static void write_chunk(srv_alog *a, const char *p, size_t n)
{
    uint64_t deadline = stop_requested(a) ? mono_ms() + STOP_FLUSH_MS : 0;

    while (n > 0) {
        ssize_t w = a->fd >= 0 ? write(a->fd, p, n) : -1;
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            if (a->failing) {
                a->failing = false;
                keel__srv_log(KEEL_LOG_INFO, "access log writable again", "path",
                              a->path != NULL ? a->path : "-", NULL);
            }
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && a->fd >= 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf[2] = {{.fd = a->fd, .events = POLLOUT, .revents = 0},
                                   {.fd = a->efd, .events = POLLIN, .revents = 0}};
            int timeout = -1;
            if (deadline != 0) {
                uint64_t now = mono_ms();
                if (now >= deadline)
                    break;
                timeout = (int)(deadline - now);
            }
            if (poll(pf, 2, timeout) > 0 && (pf[1].revents & POLLIN) != 0) {
                uint64_t v;
                if (read(a->efd, &v, sizeof(v)) < 0) {
                    /* Nothing pending after all. */
                }
                if (deadline == 0 && stop_requested(a))
                    deadline = mono_ms() + STOP_FLUSH_MS;
            }
            continue;
        }
        if (!a->failing) {
            char e[128];
            a->failing = true;
            snprintf(e, sizeof(e), "%s", a->fd >= 0 ? strerror(errno) : "not open");
            keel__srv_log(KEEL_LOG_ERROR, "cannot write the access log: lines are dropped", "path",
                          a->path != NULL ? a->path : "-", "error", e, NULL);
        }
        break;
    }
    if (n > 0)
        atomic_fetch_add_explicit(&a->dropped, count_lines(p, n), memory_order_relaxed);
}

/* Says in the log itself (and on stderr) how many lines were dropped since the last time. */
static void report_drops(srv_alog *a)
{
    uint64_t d = atomic_load_explicit(&a->dropped, memory_order_relaxed);
    char line[256], ts[40], num[24], tot[24];
    int n;

    if (d == a->reported)
        return;
    timestamp(ts, sizeof(ts));
    if (a->fmt == SRV_ALOG_JSON)
        n = snprintf(line, sizeof(line),
                     "{\"ts\":\"%s\",\"level\":\"warn\",\"msg\":\"access log lines dropped\","
                     "\"dropped\":%" PRIu64 ",\"dropped_total\":%" PRIu64 "}\n",
                     ts, d - a->reported, d);
    else
        n = snprintf(line, sizeof(line),
                     "ts=%s level=warn msg=\"access log lines dropped\" dropped=%" PRIu64
                     " dropped_total=%" PRIu64 "\n",
                     ts, d - a->reported, d);
    keel__srv_log(KEEL_LOG_WARN, "access log lines dropped (the log is not keeping up)", "dropped",
                  keel__srv_fmt(num, sizeof(num), "%" PRIu64, d - a->reported), "dropped_total",
                  keel__srv_fmt(tot, sizeof(tot), "%" PRIu64, d), NULL);
    a->reported = d;
    write_chunk(a, line, (size_t)n);
    /* A notice that could not be written is not itself a dropped request line. */
    a->reported = atomic_load_explicit(&a->dropped, memory_order_relaxed);
}

static void do_reopen(srv_alog *a)
{
    int fd;

    if (a->path == NULL)
        return; /* standard output is not rotated */
    fd = open_log(a->path);
    if (fd < 0) {
        char e[128];
        snprintf(e, sizeof(e), "%s", strerror(errno));
        keel__srv_log(KEEL_LOG_ERROR, "cannot reopen the access log: keeping the old file", "path",
                      a->path, "error", e, NULL);
        return;
    }
    if (a->fd >= 0)
        close(a->fd);
    a->fd = fd;
    a->failing = false;
    keel__srv_log(KEEL_LOG_INFO, "access log reopened", "path", a->path, NULL);
}

static void *writer_main(void *arg)
{
    srv_alog *a = arg;

    for (;;) {
        char *chunk;
        size_t n;
        bool reopen, stop;

        pthread_mutex_lock(&a->mu);
        while (a->fill_len == 0 && !a->stop && !a->reopen)
            pthread_cond_wait(&a->cv, &a->mu);
        chunk = a->fill;
        n = a->fill_len;
        a->fill = a->spare;
        a->fill_len = 0;
        a->spare = chunk;
        reopen = a->reopen;
        a->reopen = false;
        stop = a->stop;
        pthread_mutex_unlock(&a->mu);

        if (reopen)
            do_reopen(a);
        write_chunk(a, chunk, n);
        report_drops(a);
        if (stop) {
            /* Lines queued after the swap (none once the daemon has stopped). */
            pthread_mutex_lock(&a->mu);
            n = a->fill_len;
            pthread_mutex_unlock(&a->mu);
            if (n == 0)
                break;
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- open / close */

static void alog_free(srv_alog *a)
{
    if (a->fd >= 0)
        close(a->fd);
    if (a->efd >= 0)
        close(a->efd);
    free(a->fill);
    free(a->spare);
    free(a->path);
    free(a);
}

keel_err keel__srv_alog_open(const char *path, srv_alog_format fmt, size_t buffer_bytes,
                             srv_alog **out, char *err, size_t errlen)
{
    srv_alog *a = NULL;
    bool mu = false, cv = false;
    keel_err rc = KEEL_EIO;

    *out = NULL;
    err[0] = '\0';
    if ((a = calloc(1, sizeof(*a))) == NULL)
        goto nomem;
    a->fd = -1;
    a->efd = -1;
    a->fmt = fmt;
    a->cap = buffer_bytes < LINE_BYTES ? LINE_BYTES : buffer_bytes;
    if ((a->fill = malloc(a->cap)) == NULL || (a->spare = malloc(a->cap)) == NULL)
        goto nomem;
    if (strcmp(path, "-") != 0 && (a->path = strdup(path)) == NULL)
        goto nomem;
    if ((a->fd = open_log(a->path)) < 0) {
        snprintf(err, errlen, "cannot open the access log '%s': %s", path, strerror(errno));
        goto fail;
    }
    if ((a->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        goto fail;
    }
    if (pthread_mutex_init(&a->mu, NULL) != 0)
        goto nomem;
    mu = true;
    if (pthread_cond_init(&a->cv, NULL) != 0)
        goto nomem;
    cv = true;
    if (pthread_create(&a->thread, NULL, writer_main, a) != 0) {
        snprintf(err, errlen, "cannot start the access log writer thread");
        goto fail;
    }
    *out = a;
    return KEEL_OK;

nomem:
    snprintf(err, errlen, "out of memory");
    rc = KEEL_ENOMEM;
fail:
    if (a != NULL) {
        if (cv)
            pthread_cond_destroy(&a->cv);
        if (mu)
            pthread_mutex_destroy(&a->mu);
        alog_free(a);
    }
    return rc;
}

void keel__srv_alog_close(srv_alog *a)
{
    if (a == NULL)
        return;
    pthread_mutex_lock(&a->mu);
    a->stop = true;
    pthread_mutex_unlock(&a->mu);
    pthread_cond_signal(&a->cv);
    kick(a);
    pthread_join(a->thread, NULL);
    pthread_cond_destroy(&a->cv);
    pthread_mutex_destroy(&a->mu);
    alog_free(a);
}
