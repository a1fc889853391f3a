/*
 * server_log.c: logfmt lines on stderr for `keel serve`.
 *
 * DESIGN
 * One line per event: `ts=2024-05-01T12:00:00.123Z level=info msg="model loaded" model=heart`.
 * The level is checked before anything is formatted. A line is built in a stack buffer and
 * written with one fwrite: stdio locks the stream for the call, so lines from different
 * threads never interleave and no lock of ours is needed. A line longer than the buffer is
 * cut (and ends with `truncated=true`). The only state is the level, an atomic written once
 * at start. Values are quoted when they are empty or hold a blank, '=', '"' or a control
 * character; inside quotes '"' and '\' are escaped and control characters written as \n, \t
 * or \xNN, so one event is always one line.
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "server_log.h"

#define LINE_MAX_BYTES 4096

static _Atomic int log_level = KEEL_LOG_INFO;

void keel__srv_log_init(keel_log_level level)
{
    atomic_store(&log_level, (int)level);
}

bool keel__srv_log_on(keel_log_level level)
{
    return (int)level <= atomic_load_explicit(&log_level, memory_order_relaxed);
}

typedef struct line {
    char buf[LINE_MAX_BYTES];
    size_t len;
    bool cut;
} line;

static void put_raw(line *l, const char *s, size_t n)
{
    /* Keep room for " truncated=true\n". */
    const size_t cap = sizeof(l->buf) - 17;

    if (l->cut)
        return;
    if (n > cap - l->len) {
        n = cap - l->len;
        l->cut = true;
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static bool needs_quotes(const char *v)
{
    if (*v == '\0')
        return true;
    for (const unsigned char *p = (const unsigned char *)v; *p != '\0'; p++) {
        if (*p <= ' ' || *p == '=' || *p == '"' || *p == 0x7f)
            return true;
    }
    return false;
}

static void put_value(line *l, const char *v)
{
    if (v == NULL)
        v = "";
    if (!needs_quotes(v)) {
        put_raw(l, v, strlen(v));
        return;
    }
    put_raw(l, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)v; *p != '\0'; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            put_raw(l, esc, 2);
        } else if (*p == '\n') {
            put_raw(l, "\\n", 2);
        } else if (*p == '\t') {
            put_raw(l, "\\t", 2);
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof(esc), "\\x%02x", *p);
            put_raw(l, esc, 4);
        } else {
            put_raw(l, (const char *)p, 1);
        }
    }
    put_raw(l, "\"", 1);
}

static void put_pair(line *l, const char *key, const char *value)
{
    put_raw(l, " ", 1);
    put_raw(l, key, strlen(key));
    put_raw(l, "=", 1);
    put_value(l, value);
}

static const char *level_name(keel_log_level level)
{
    switch (level) {
    case KEEL_LOG_ERROR:
        return "error";
    case KEEL_LOG_WARN:
        return "warn";
    case KEEL_LOG_INFO:
        return "info";
    case KEEL_LOG_DEBUG:
        return "debug";
    }
    return "info";
}

static void line_start(line *l, keel_log_level level, const char *msg)
{
    struct timespec ts;
    struct tm tm;
    char stamp[64];
    int n;

    l->len = 0;
    l->cut = false;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = snprintf(stamp, sizeof(stamp),
                 "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000L);
    if (n > 0)
        put_raw(l, stamp, (size_t)n < sizeof(stamp) ? (size_t)n : sizeof(stamp) - 1);
    put_raw(l, level_name(level), strlen(level_name(level)));
    put_pair(l, "msg", msg);
}

static void line_end(line *l)
{
    if (l->cut) {
        static const char tail[] = " truncated=true";
        memcpy(l->buf + l->len, tail, sizeof(tail) - 1); /* room was kept by put_raw */
        l->len += sizeof(tail) - 1;
    }
    l->buf[l->len++] = '\n';
    fwrite(l->buf, 1, l->len, stderr);
}

void keel__srv_log(keel_log_level level, const char *msg, ...)
{
    line l;
    va_list ap;
    const char *key;

    if (!keel__srv_log_on(level))
        return;
    line_start(&l, level, msg);
    va_start(ap, msg);
    while ((key = va_arg(ap, const char *)) != NULL) {
        const char *value = va_arg(ap, const char *);
        put_pair(&l, key, value);
    }
    va_end(ap);
    line_end(&l);
}

void keel__srv_log_keel(void *user, keel_log_level level, const char *msg)
{
    line l;

    (void)user;
    if (!keel__srv_log_on(level))
        return;
    line_start(&l, level, msg);
    put_pair(&l, "component", "keel");
    line_end(&l);
}

const char *keel__srv_fmt(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    if (vsnprintf(buf, len, fmt, ap) < 0 && len > 0)
        buf[0] = '\0';
    va_end(ap);
    return buf;
}
