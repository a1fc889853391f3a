/*
 * reply.c: the answers of `keel serve` before they are sent: the HTTP status of a keel error,
 * {"error": ...} bodies, JSON and empty replies, and the 404/503 for a model that is not
 * served.
 *
 * DESIGN
 * The bottom layer of src/server/ (see server_internal.h for the order): server.c,
 * server_routes.c and server_control.c fill an srv_reply here and server.c alone sends it
 * (send_reply), so this file calls nothing above it. It owns no state and takes no lock;
 * any thread may call it. The srv_reply it fills owns its body until server.c hands it to
 * libmicrohttpd. keel__srv_reply_not_served asks serving.c which outcome a model that is not
 * served has, and maps it to HTTP.
 */
#include <inttypes.h>
#include <jansson.h>
#include <microhttpd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reply.h"
#include "server_internal.h"
#include "serving.h"
#include "v2codec.h"

#define ERRMSG_LEN 1024

static const char JSON_TYPE[] = "application/json";

unsigned keel__srv_http_status(keel_err err)
{
    switch (err) {
    case KEEL_OK:
        return MHD_HTTP_OK;
    case KEEL_EINVAL:
    case KEEL_ECONFIG:
    case KEEL_ELOAD:
        return MHD_HTTP_BAD_REQUEST;
    case KEEL_ENOTFOUND:
        return MHD_HTTP_NOT_FOUND;
    case KEEL_EUNAVAILABLE:
    case KEEL_ETIMEDOUT:
    case KEEL_ECANCELED:
    case KEEL_ESHUTDOWN:
    case KEEL_ERESOURCE:
        return MHD_HTTP_SERVICE_UNAVAILABLE;
    default:
        return MHD_HTTP_INTERNAL_SERVER_ERROR;
    }
}

void keel__srv_reply_error(srv_reply *r, unsigned status, const char *fmt, ...)
{
    char msg[ERRMSG_LEN];
    va_list ap;

    va_start(ap, fmt);
    if (vsnprintf(msg, sizeof(msg), fmt, ap) < 0)
        snprintf(msg, sizeof(msg), "error");
    va_end(ap);
    free(r->body);
    r->status = status;
    r->body = keel_v2_error_json(msg);
    r->pooled = false;
    r->len = r->body != NULL ? strlen(r->body) : 0;
    r->ctype = JSON_TYPE;
}

void keel__srv_reply_json(srv_reply *r, unsigned status, void *root)
{
    char *text;

    if (root == NULL) {
        keel__srv_reply_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    text = json_dumps((json_t *)root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref((json_t *)root);
    if (text == NULL) {
        keel__srv_reply_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    free(r->body);
    r->status = status;
    r->body = text;
    r->pooled = false;
    r->len = strlen(text);
    r->ctype = JSON_TYPE;
}

void keel__srv_reply_empty(srv_reply *r, unsigned status)
{
    free(r->body);
    r->status = status;
    r->body = NULL;
    r->pooled = false;
    r->len = 0;
    r->ctype = NULL;
}

/* ---------------------------------------------------------------- "not served" answers */

void keel__srv_reply_not_served(keel_srv *s, const char *model, int64_t version, srv_reply *r)
{
    srv_outcome o;

    /* The outcome is protocol-independent (serving.c): gRPC maps the same keel_err. */
    keel__srv_not_served(s, model, version, &o);
    keel__srv_reply_error(r, keel__srv_http_status(o.err), "%s", o.msg);
}
