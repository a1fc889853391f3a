/*
 * server_guard.c: the HTTP server's guard: API group of each route, restricted groups,
 * request-target and header checks, and the redaction of repository paths in error replies.
 *
 * DESIGN
 * Glue between libmicrohttpd (MHD) and the library-free checks of restrict.c and edge.c. Runs
 * on MHD threads, in the first handler call of a request (keel__srv_headers_scan, the one walk
 * of the request's header fields, whose findings the handler and keel__srv_guard use) and
 * whenever a reply is queued (keel__srv_guard_redact). No state and no lock of its own: the rules
 * (s->opts->restricted) and the redaction table (s->redact) are built before the daemon starts
 * and read-only afterwards.
 *
 * Order of the checks in keel__srv_guard, each answering at once with Connection: close:
 *   1. the request target as received: a NUL byte (raw or %00) or an encoded '/' -> 400;
 *   2. more than KEEL_SRV_MAX_HEADERS header fields -> 431 (their bytes are bounded by MHD's
 *      per-connection memory pool, see mhd_start in server.c);
 *   3. a restricted group without its key -> 403 with Triton's message, before any body is
 *      read, so an unauthorised client cannot make keel buffer a request;
 *   4. a model name that no repository could hold (".", "..", leading '.', control
 *      characters) -> 400.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "edge.h"
#include "server_guard.h"
#include "server_internal.h"
#include "server_log.h"

keel_api_group keel__srv_route_group(srv_route r)
{
    switch (r) {
    case ROUTE_LIVE:
    case ROUTE_READY:
    case ROUTE_MODEL_READY:
        return KEEL_API_HEALTH;
    case ROUTE_SERVER_META:
    case ROUTE_MODEL_META:
        return KEEL_API_METADATA;
    case ROUTE_INFER:
        return KEEL_API_INFERENCE;
    case ROUTE_MODEL_CONFIG:
        return KEEL_API_MODEL_CONFIG;
    case ROUTE_MODEL_STATS:
    case ROUTE_ALL_STATS:
        return KEEL_API_STATISTICS;
    case ROUTE_REPO_INDEX:
    case ROUTE_REPO_LOAD:
    case ROUTE_REPO_UNLOAD:
        return KEEL_API_MODEL_REPOSITORY;
    case ROUTE_METRICS:
        return KEEL_API_METRICS;
    case ROUTE_TRACE_SETTING:
        return KEEL_API_TRACE;
    case ROUTE_UNKNOWN:
        break;
    }
    return KEEL_API_NONE;
}

/* key (key_size bytes) is the header name `name` (of len bytes), in any case. */
static inline bool name_is(const char *key, size_t key_size, const char *name, size_t len)
{
    return key_size == len && strncasecmp(key, name, len) == 0;
}

#define NAME_IS(key, size, lit) name_is(key, size, lit, sizeof(lit) - 1)

static enum MHD_Result scan_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                   size_t key_size, const char *value, size_t value_size)
{
    srv_headers *h = cls;

    (void)kind;
    h->count++;
    keel__restrict_check_header(&h->check, key, key_size, value, value_size);
    /* The names keel reads, told apart by length first (no comparison for the others). */
    if (NAME_IS(key, key_size, MHD_HTTP_HEADER_CONTENT_LENGTH)) {
        if (h->content_length_n++ == 0)
            h->content_length = value;
    } else if (NAME_IS(key, key_size, MHD_HTTP_HEADER_TRANSFER_ENCODING)) {
        h->transfer_encoding_n++;
    } else if (NAME_IS(key, key_size, "traceparent")) {
        if (h->traceparent == NULL)
            h->traceparent = value;
    } else if (NAME_IS(key, key_size, "Inference-Header-Content-Length")) {
        if (h->header_length == NULL)
            h->header_length = value;
    }
    return MHD_YES;
}

void keel__srv_headers_scan(keel_srv *s, srv_conn *c, srv_headers *h)
{
    memset(h, 0, sizeof(*h));
    keel__restrict_check_begin(&h->check, &s->opts->restricted, keel__srv_route_group(c->route),
                               NULL);
    MHD_get_connection_values_n(c->mhd, MHD_HEADER_KIND, scan_header, h);
}

unsigned keel__srv_guard(keel_srv *s, srv_conn *c, const srv_headers *h, const char *url,
                         const char *version, srv_reply *r)
{
    char msg[320];
    unsigned st;

    /* 1. The target. MHD (before 1.0) passes url and version as pointers into the request
     * line it split in place: "METHOD SP target SP version", so the target's length as
     * received is version - url - 1. A shorter raw string means a NUL inside it. Later MHD
     * versions refuse such a request line themselves. */
#if MHD_VERSION < 0x01000000
    if (version != NULL && version[0] != '\0' && version > url) {
        size_t received = (size_t)(version - url) - 1;
        if (c->raw_target_len < received) {
            keel__srv_reply_error(r, MHD_HTTP_BAD_REQUEST, "the URL contains a NUL byte");
            return MHD_HTTP_BAD_REQUEST;
        }
    }
#else
    (void)url;
    (void)version;
#endif
    if (c->target_status != 0) {
        keel__srv_reply_error(r, c->target_status, "%s", c->target_msg);
        return c->target_status;
    }

    /* 2 and 3: from the pass over the header fields. */
    if (h->count > KEEL_SRV_MAX_HEADERS) {
        keel__srv_reply_error(r, MHD_HTTP_REQUEST_HEADER_FIELDS_TOO_LARGE,
                              "too many header fields (%u; at most %d)", h->count,
                              KEEL_SRV_MAX_HEADERS);
        return MHD_HTTP_REQUEST_HEADER_FIELDS_TOO_LARGE;
    }
    if (!keel__restrict_check_allowed(&h->check)) {
        keel__srv_reply_error(r, MHD_HTTP_FORBIDDEN, "%s",
                              keel__restrict_message(h->check.rule, NULL, msg, sizeof(msg)));
        return MHD_HTTP_FORBIDDEN;
    }

    /* 4. The model name, now that the client may know whether the route exists. */
    if (c->model != NULL && (st = keel__edge_check_model_name(c->model, msg, sizeof(msg))) != 0) {
        keel__srv_reply_error(r, st, "%s", msg);
        return st;
    }
    return 0;
}

void keel__srv_guard_redact(keel_srv *s, const srv_conn *c, srv_reply *r)
{
    char *text;
    size_t len;

    if (r->status < 400 || r->body == NULL ||
        keel__srv_route_group(c->route) == KEEL_API_MODEL_REPOSITORY)
        return;
    text = keel__redact(&s->redact, r->body, r->len, &len);
    if (text == NULL) {
        if (len == (size_t)-1) {
            /* No memory for the redacted copy: send nothing rather than the paths. */
            free(r->body);
            r->body = NULL;
            r->len = 0;
        }
        return;
    }
    free(r->body);
    r->body = text;
    r->pooled = false;
    r->len = len;
}
