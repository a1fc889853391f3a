/*
 * trace.c: the trace settings and Triton-format TIMESTAMPS traces.
 *
 * DESIGN
 * See trace.h for the contract. Settings (Triton's names, values as strings on the wire):
 *   trace_level   ["OFF"] or ["TIMESTAMPS"] ("TENSORS" is refused: keel does not trace
 *                 tensors)
 *   trace_rate    every rate-th inference of the scope is traced (default 1000)
 *   trace_count   traces left to collect; -1 = no limit (default); reaching 0 stops tracing
 *   log_frequency 0 (default): the traces are written to <dir>/<trace_file> when the server
 *                 stops; N: every N traces are written to <dir>/<trace_file>.<k>, k = 0, 1,
 *                 ... (k restarts at 0 when trace_file changes)
 *   trace_file    a file name (no '/'), default "trace.json"
 * A model's override starts as a copy of the global settings with the posted ones changed;
 * posting {} for a model removes it, and a null value takes that setting from the global
 * scope again. Counters (requests seen, traces left) belong to the scope.
 *
 * One traced request gives two array entries, as Triton writes them: the header
 *   {"id": N, "model_name": ..., "model_version": V, "request_id": ...}
 * and {"id": N, "timestamps": [{"name": ..., "ns": ...}, ...]} with, in time order, the
 * steps it reached: HTTP_RECV_START, HTTP_RECV_END (GRPC_WAITREAD_START/END for gRPC),
 * REQUEST_START (the handler submits), QUEUE_START, COMPUTE_START, COMPUTE_INPUT_END,
 * COMPUTE_OUTPUT_START, COMPUTE_END, REQUEST_END (the completion reached the front end),
 * HTTP_SEND_START, HTTP_SEND_END (GRPC_SEND_*). ns is CLOCK_MONOTONIC, as Triton's steady
 * clock. Pending traces are bounded (PENDING_MAX bytes per scope); traces beyond it are
 * dropped and counted in the log.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server_internal.h"
#include "server_log.h"
#include "trace.h"

#define FILE_MAX 256
#define PENDING_MAX (16u << 20)
#define DEFAULT_RATE 1000
#define DEFAULT_FILE "trace.json"

typedef struct trace_settings {
    bool on; /* trace_level TIMESTAMPS */
    int64_t rate;
    int64_t count;
    int64_t log_frequency;
    char file[FILE_MAX];
} trace_settings;

typedef struct trace_scope {
    char *model; /* NULL for the global scope */
    trace_settings set;
    uint64_t seen;     /* inferences observed (for the rate) */
    char *buf;         /* pending entries, comma separated */
    size_t len, cap;   /* of buf */
    uint64_t npending; /* traces in buf */
    uint64_t file_idx; /* next <file>.<k> */
    uint64_t dropped;  /* traces lost: pending buffer full */
    struct trace_scope *next;
} trace_scope;

struct srv_trace {
    const char *dir;
    pthread_mutex_t mu;
    trace_scope global;  /* mu */
    trace_scope *models; /* mu */
    _Atomic bool any_on; /* some scope traces: record must look */
    uint64_t next_id;    /* mu */
};

/* A file to write after unlocking. */
typedef struct trace_out {
    char *path;
    char *buf;
    size_t len;
} trace_out;

static void settings_default(trace_settings *s)
{
    memset(s, 0, sizeof(*s));
    s->on = false;
    s->rate = DEFAULT_RATE;
    s->count = -1;
    s->log_frequency = 0;
    snprintf(s->file, sizeof(s->file), "%s", DEFAULT_FILE);
}

srv_trace *keel__srv_trace_create(const char *dir)
{
    srv_trace *t = calloc(1, sizeof(*t));

    if (t == NULL)
        return NULL;
    if (pthread_mutex_init(&t->mu, NULL) != 0) {
        free(t);
        return NULL;
    }
    t->dir = dir;
    settings_default(&t->global.set);
    return t;
}

/* ---------------------------------------------------------------- output */

/* Under t->mu: takes the scope's pending traces into *out with the file they go to (final:
 * shutdown or a settings change, so a partial batch is written too). */
static void take_pending(srv_trace *t, trace_scope *sc, bool final, trace_out *out)
{
    char path[4096];

    memset(out, 0, sizeof(*out));
    if (sc->npending == 0 || t->dir == NULL)
        return;
    if (sc->set.log_frequency > 0)
        snprintf(path, sizeof(path), "%s/%s.%" PRIu64, t->dir, sc->set.file, sc->file_idx++);
    else if (final)
        snprintf(path, sizeof(path), "%s/%s", t->dir, sc->set.file);
    else
        return;
    if ((out->path = strdup(path)) == NULL)
        return; /* keep them pending; the next attempt may have memory */
    out->buf = sc->buf;
    out->len = sc->len;
    sc->buf = NULL;
    sc->len = sc->cap = 0;
    sc->npending = 0;
}

/* No lock held: writes out as a JSON array and frees it. */
static void write_out(trace_out *out)
{
    int fd;
    bool ok = true;
    const char *parts[3] = {"[\n", out->buf, "\n]\n"};
    size_t lens[3] = {2, out->len, 3};

    if (out->path == NULL)
        return;
    fd = open(out->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        ok = false;
    for (int i = 0; ok && i < 3; i++) {
        const char *p = parts[i];
        size_t n = lens[i];
        while (n > 0) {
            ssize_t w = write(fd, p, n);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                ok = false;
                break;
            }
            p += w;
            n -= (size_t)w;
        }
    }
    if (fd >= 0 && close(fd) != 0)
        ok = false;
    if (!ok) {
        char e[128];
        snprintf(e, sizeof(e), "%s", strerror(errno));
        keel__srv_log(KEEL_LOG_ERROR, "cannot write a trace file", "path", out->path, "error", e,
                      NULL);
    }
    free(out->path);
    free(out->buf);
    memset(out, 0, sizeof(*out));
}

/* Makes room for n more bytes (and the NUL) in the scope's pending buffer. */
static bool buf_reserve(trace_scope *sc, size_t n)
{
    if (sc->len + n + 1 > sc->cap) {
        size_t ncap = sc->cap == 0 ? 4096 : sc->cap;
        char *nb;
        while (ncap < sc->len + n + 1)
            ncap *= 2;
        if ((nb = realloc(sc->buf, ncap)) == NULL)
            return false;
        sc->buf = nb;
        sc->cap = ncap;
    }
    return true;
}

/* Appends n bytes that buf_reserve made room for. */
static void buf_put(trace_scope *sc, const char *s, size_t n)
{
    memcpy(sc->buf + sc->len, s, n);
    sc->len += n;
    sc->buf[sc->len] = '\0';
}

/* ---------------------------------------------------------------- recording */

static trace_scope *scope_find_locked(srv_trace *t, const char *model)
{
    for (trace_scope *sc = t->models; sc != NULL; sc = sc->next) {
        if (strcmp(sc->model, model) == 0)
            return sc;
    }
    return NULL;
}

static void any_on_update_locked(srv_trace *t)
{
    bool on = t->global.set.on && t->global.set.count != 0;

    for (trace_scope *sc = t->models; sc != NULL && !on; sc = sc->next)
        on = sc->set.on && sc->set.count != 0;
    atomic_store(&t->any_on, on);
}

typedef struct stamp {
    const char *name;
    uint64_t ns;
} stamp;

/* One trace's two entries into buf (NUL-terminated); false if it does not fit. */
static bool format_trace(uint64_t id, const srv_obs_event *ev, char *buf, size_t cap, size_t *len)
{
    const keel_request_timing *tm = &ev->timing;
    bool grpc = ev->protocol == SRV_PROTO_GRPC;
    stamp st[] = {
        {grpc ? "GRPC_WAITREAD_START" : "HTTP_RECV_START", ev->start_ns},
        {grpc ? "GRPC_WAITREAD_END" : "HTTP_RECV_END", ev->recv_end_ns},
        {"REQUEST_START", ev->request_start_ns},
        {"QUEUE_START", tm->submit_ns},
        {"COMPUTE_START", tm->dispatch_ns},
        {"COMPUTE_INPUT_END", tm->input_end_ns},
        {"COMPUTE_OUTPUT_START", tm->output_start_ns},
        {"COMPUTE_END", tm->complete_ns},
        {"REQUEST_END", ev->request_end_ns},
        {grpc ? "GRPC_SEND_START" : "HTTP_SEND_START", ev->send_start_ns},
        {grpc ? "GRPC_SEND_END" : "HTTP_SEND_END", ev->end_ns},
    };
    json_t *hdr = json_object();
    char *htext = NULL;
    size_t n = 0;
    int k;

    if (hdr == NULL)
        return false;
    if (json_object_set_new(hdr, "id", json_integer((json_int_t)id)) != 0 ||
        json_object_set_new(hdr, "model_name", json_string(ev->model)) != 0 ||
        json_object_set_new(hdr, "model_version", json_integer(ev->version)) != 0 ||
        json_object_set_new(hdr, "request_id",
                            json_string(ev->request_id != NULL ? ev->request_id : "")) != 0) {
        json_decref(hdr);
        return false;
    }
    /* Model names and request ids are any UTF-8 the client sent: jansson escapes them. */
    htext = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(hdr);
    if (htext == NULL)
        return false;
    k = snprintf(buf, cap, "%s,\n{\"id\":%" PRIu64 ",\"timestamps\":[", htext, id);
    free(htext);
    if (k < 0 || (size_t)k >= cap)
        return false;
    n = (size_t)k;
    for (size_t i = 0, w = 0; i < sizeof(st) / sizeof(st[0]); i++) {
        if (st[i].ns == 0)
            continue; /* a step the request never reached */
        k = snprintf(buf + n, cap - n, "%s{\"name\":\"%s\",\"ns\":%" PRIu64 "}", w++ ? "," : "",
                     st[i].name, st[i].ns);
        if (k < 0 || (size_t)k >= cap - n)
            return false;
        n += (size_t)k;
    }
    k = snprintf(buf + n, cap - n, "]}");
    if (k < 0 || (size_t)k >= cap - n)
        return false;
    *len = n + (size_t)k;
    return true;
}

bool keel__srv_trace_active(srv_trace *t)
{
    return t != NULL && atomic_load_explicit(&t->any_on, memory_order_relaxed);
}

void keel__srv_trace_record(srv_trace *t, const srv_obs_event *ev)
{
    trace_scope *sc;
    trace_out out = {NULL, NULL, 0};
    char text[4096];
    size_t len = 0;
    uint64_t id;

    if (t == NULL || !atomic_load_explicit(&t->any_on, memory_order_relaxed) || ev->model == NULL ||
        ev->timing.complete_ns == 0 || ev->recv_end_ns == 0)
        return;
    pthread_mutex_lock(&t->mu);
    sc = scope_find_locked(t, ev->model);
    if (sc == NULL)
        sc = &t->global;
    if (!sc->set.on || sc->set.count == 0 || sc->seen++ % (uint64_t)sc->set.rate != 0) {
        pthread_mutex_unlock(&t->mu);
        return;
    }
    id = ++t->next_id;
    /* Room for the separator and the trace first, so that a failure appends nothing. */
    if (sc->len + sizeof(text) > PENDING_MAX || !format_trace(id, ev, text, sizeof(text), &len) ||
        !buf_reserve(sc, len + 2)) {
        bool first = sc->dropped++ == 0;
        pthread_mutex_unlock(&t->mu);
        if (first) /* logged after unlocking: stderr is I/O */
            keel__srv_log(KEEL_LOG_WARN,
                          "traces dropped: too many pending (lower trace_rate or set "
                          "log_frequency)",
                          NULL);
        return;
    }
    if (sc->npending > 0)
        buf_put(sc, ",\n", 2);
    buf_put(sc, text, len);
    sc->npending++;
    if (sc->set.count > 0 && --sc->set.count == 0)
        any_on_update_locked(t);
    if (sc->set.log_frequency > 0 && sc->npending >= (uint64_t)sc->set.log_frequency)
        take_pending(t, sc, false, &out);
    pthread_mutex_unlock(&t->mu);
    write_out(&out);
}

/* ---------------------------------------------------------------- settings API */

static char *error_json(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *error_json(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    json_t *o;
    char *s;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if ((o = json_pack("{s:s}", "error", msg)) == NULL)
        return NULL;
    s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

static char *settings_json(const trace_settings *s)
{
    char rate[24], count[24], freq[24];
    json_t *o;
    char *text;

    snprintf(rate, sizeof(rate), "%" PRId64, s->rate);
    snprintf(count, sizeof(count), "%" PRId64, s->count);
    snprintf(freq, sizeof(freq), "%" PRId64, s->log_frequency);
    o = json_pack("{s:[s],s:s,s:s,s:s,s:s,s:s}", "trace_level", s->on ? "TIMESTAMPS" : "OFF",
                  "trace_rate", rate, "trace_count", count, "log_frequency", freq, "trace_file",
                  s->file, "trace_mode", "triton");
    if (o == NULL)
        return NULL;
    text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return text;
}

/* An integer setting: a decimal string (Triton's form) or a JSON integer. */
static bool int_value(json_t *v, int64_t min, int64_t *out)
{
    long long x;
    char *end;
    const char *s;

    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_string(v)) {
        s = json_string_value(v);
        if (s[0] == '\0' || (s[0] != '-' && (s[0] < '0' || s[0] > '9')))
            return false;
        errno = 0;
        x = strtoll(s, &end, 10);
        if (errno != 0 || *end != '\0')
            return false;
    } else {
        return false;
    }
    if (x < min)
        return false;
    *out = x;
    return true;
}

/* trace_level: "OFF"/"TIMESTAMPS" or an array of them. */
static bool level_value(json_t *v, bool *on, char *msg, size_t len)
{
    json_t *items[16];
    size_t n = 0;

    if (json_is_string(v)) {
        items[n++] = v;
    } else if (json_is_array(v) && json_array_size(v) <= 16) {
        for (size_t i = 0; i < json_array_size(v); i++)
            items[n++] = json_array_get(v, i);
    } else {
        snprintf(msg, len, "trace_level: expected a string or an array of strings");
        return false;
    }
    *on = false;
    for (size_t i = 0; i < n; i++) {
        const char *s = json_string_value(items[i]);
        if (s == NULL) {
            snprintf(msg, len, "trace_level: expected strings");
            return false;
        }
        if (strcmp(s, "TIMESTAMPS") == 0) {
            *on = true;
        } else if (strcmp(s, "TENSORS") == 0) {
            snprintf(msg, len, "trace_level TENSORS is not supported (only OFF and TIMESTAMPS)");
            return false;
        } else if (strcmp(s, "OFF") != 0) {
            snprintf(msg, len, "trace_level: '%.64s' is not OFF or TIMESTAMPS", s);
            return false;
        }
    }
    return true;
}

/* Applies body's settings to *s (defaults: what a null resets to). Returns 0 or 400. */
static unsigned apply(json_t *body, const trace_settings *defaults, const char *dir,
                      trace_settings *s, char *msg, size_t len)
{
    const char *key;
    json_t *v;

    json_object_foreach (body, key, v) {
        bool null = json_is_null(v);
        if (strcmp(key, "trace_level") == 0) {
            if (null)
                s->on = defaults->on;
            else if (!level_value(v, &s->on, msg, len))
                return 400;
        } else if (strcmp(key, "trace_rate") == 0) {
            if (null)
                s->rate = defaults->rate;
            else if (!int_value(v, 1, &s->rate)) {
                snprintf(msg, len, "trace_rate: expected an integer >= 1");
                return 400;
            }
        } else if (strcmp(key, "trace_count") == 0) {
            if (null)
                s->count = defaults->count;
            else if (!int_value(v, -1, &s->count)) {
                snprintf(msg, len, "trace_count: expected an integer >= -1 (-1 = no limit)");
                return 400;
            }
        } else if (strcmp(key, "log_frequency") == 0) {
            if (null)
                s->log_frequency = defaults->log_frequency;
            else if (!int_value(v, 0, &s->log_frequency)) {
                snprintf(msg, len, "log_frequency: expected an integer >= 0");
                return 400;
            }
        } else if (strcmp(key, "trace_file") == 0) {
            const char *f = json_string_value(v);
            if (null) {
                snprintf(s->file, sizeof(s->file), "%s", defaults->file);
            } else if (f == NULL || f[0] == '\0' || strchr(f, '/') != NULL || strcmp(f, ".") == 0 ||
                       strcmp(f, "..") == 0 || strlen(f) >= FILE_MAX - 24) {
                snprintf(msg, len,
                         "trace_file: expected a file name (no '/'); traces are written under "
                         "--trace-dir");
                return 400;
            } else {
                snprintf(s->file, sizeof(s->file), "%s", f);
            }
        } else if (strcmp(key, "trace_mode") == 0) {
            if (!null && (!json_is_string(v) || strcmp(json_string_value(v), "triton") != 0)) {
                snprintf(msg, len, "trace_mode: only 'triton' is supported");
                return 400;
            }
        } else {
            snprintf(msg, len, "unknown trace setting '%.64s'", key);
            return 400;
        }
    }
    if (s->on && dir == NULL) {
        snprintf(msg, len, "tracing is off in this server: start keel serve with --trace-dir DIR");
        return 400;
    }
    return 0;
}

static void scope_free(trace_scope *sc)
{
    free(sc->model);
    free(sc->buf);
    free(sc);
}

unsigned keel__srv_trace_setting(srv_trace *t, keel_runtime *rt, const char *model, bool post,
                                 const char *body, size_t len, char **json)
{
    json_t *root = NULL;
    json_error_t jerr;
    char msg[512];
    trace_settings now;
    trace_out out = {NULL, NULL, 0};
    trace_scope *fresh = NULL, *gone = NULL;
    unsigned rc = 200;

    *json = NULL;
    if (model != NULL) {
        keel_model_stats st;
        if (keel_model_stats_get(rt, model, &st) != KEEL_OK &&
            !keel_model_is_ready(rt, model, -1)) {
            *json = error_json("unknown model '%.200s'", model);
            return 404;
        }
    }
    if (post) {
        bool empty = body == NULL || len == 0;
        root = json_loadb(empty ? "{}" : body, empty ? 2 : len, JSON_REJECT_DUPLICATES, &jerr);
        if (root == NULL || !json_is_object(root)) {
            *json = error_json("invalid trace setting body: %s",
                               root == NULL ? jerr.text : "expected a JSON object");
            json_decref(root);
            return 400;
        }
        if (model != NULL && json_object_size(root) > 0 &&
            (fresh = calloc(1, sizeof(*fresh))) != NULL && (fresh->model = strdup(model)) == NULL) {
            free(fresh);
            fresh = NULL;
        }
        if (model != NULL && json_object_size(root) > 0 && fresh == NULL) {
            json_decref(root);
            *json = error_json("out of memory");
            return 500;
        }
    }

    pthread_mutex_lock(&t->mu);
    {
        trace_scope *sc = model != NULL ? scope_find_locked(t, model) : &t->global;
        if (post && model != NULL && json_object_size(root) == 0) {
            /* {} for a model: back to the global settings. */
            if (sc != NULL) {
                trace_scope **pp = &t->models;
                while (*pp != sc)
                    pp = &(*pp)->next;
                *pp = sc->next;
                take_pending(t, sc, true, &out);
                gone = sc;
            }
            now = t->global.set;
        } else if (post) {
            trace_settings defaults, next;
            if (model == NULL)
                settings_default(&defaults);
            else
                defaults = t->global.set;
            next = sc != NULL ? sc->set : t->global.set;
            rc = apply(root, &defaults, t->dir, &next, msg, sizeof(msg));
            if (rc == 0) {
                if (sc == NULL) {
                    sc = fresh;
                    fresh = NULL;
                    sc->next = t->models;
                    t->models = sc;
                }
                if (strcmp(next.file, sc->set.file) != 0 ||
                    next.log_frequency != sc->set.log_frequency) {
                    /* Pending traces go where they were meant to; then the index restarts. */
                    take_pending(t, sc, true, &out);
                    sc->file_idx = 0;
                }
                if (next.rate != sc->set.rate)
                    sc->seen = 0;
                sc->set = next;
                now = next;
                rc = 200;
            }
        } else {
            now = sc != NULL ? sc->set : t->global.set;
        }
        any_on_update_locked(t);
    }
    pthread_mutex_unlock(&t->mu);

    write_out(&out);
    if (gone != NULL)
        scope_free(gone);
    if (fresh != NULL)
        scope_free(fresh);
    json_decref(root);
    *json = rc == 200 ? settings_json(&now) : error_json("%s", msg);
    if (*json == NULL)
        return 500;
    return rc;
}

void keel__srv_trace_destroy(srv_trace *t)
{
    trace_out out;

    if (t == NULL)
        return;
    /* The daemon has stopped: no record or setting call can run any more. */
    take_pending(t, &t->global, true, &out);
    write_out(&out);
    free(t->global.buf);
    while (t->models != NULL) {
        trace_scope *sc = t->models;
        t->models = sc->next;
        take_pending(t, sc, true, &out);
        write_out(&out);
        scope_free(sc);
    }
    pthread_mutex_destroy(&t->mu);
    free(t);
}
