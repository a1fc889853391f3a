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
 * libmicrohttpd. keel__srv_reply_not_served reads the model list from libkeel (a snapshot
 * it frees before returning).
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
    r->len = strlen(text);
    r->ctype = JSON_TYPE;
}

void keel__srv_reply_empty(srv_reply *r, unsigned status)
{
    free(r->body);
    r->status = status;
    r->body = NULL;
    r->len = 0;
    r->ctype = NULL;
}

/* ---------------------------------------------------------------- "not served" answers */

void keel__srv_reply_not_served(keel_srv *s, const char *model, int64_t version, srv_reply *r)
{
    keel_model_status *list = NULL;
    size_t n = 0;
    bool known = false, any_ready = false;
    const keel_model_status *row = NULL;

    if (keel_model_list(s->rt, &list, &n) != KEEL_OK) {
        keel__srv_reply_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (strcmp(list[i].name, model) != 0)
            continue;
        known = true;
        row = &list[i];
        any_ready |= list[i].state == KEEL_MODEL_READY;
    }
    if (!known) {
        keel__srv_reply_error(r, MHD_HTTP_NOT_FOUND, "unknown model '%s'", model);
    } else if (version >= 0 && any_ready) {
        keel__srv_reply_error(r, MHD_HTTP_NOT_FOUND, "model '%s' has no version %" PRId64, model,
                              version);
    } else if (row->state == KEEL_MODEL_LOADING) {
        keel__srv_reply_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "model '%s' is loading", model);
    } else if (row->state == KEEL_MODEL_FAILED) {
        keel__srv_reply_error(
            r, MHD_HTTP_SERVICE_UNAVAILABLE, "model '%s' failed to load: %s", model,
            row->last_error_msg[0] != '\0' ? row->last_error_msg : keel_strerror(row->last_error));
    } else if (any_ready) {
        /* It became ready between the caller's check and this one. */
        keel__srv_reply_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "model '%s' is not ready", model);
    } else {
        keel__srv_reply_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "model '%s' is not loaded", model);
    }
    keel_model_status_free(list, n);
}
