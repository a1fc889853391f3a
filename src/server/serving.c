/*
 * serving.c: the protocol-independent serving path (admission, submit, outcomes); see
 * serving.h. Used by server.c (HTTP) and grpc_server.c (gRPC) from their own threads and
 * from keel's completion callbacks. Lock: s->mu, for the drain flag and the pending count.
 * keel__srv_observe is here too: the one place a finished request of either protocol feeds
 * the histograms (observe.c), traces (trace.c) and the access log (access_log.c).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "access_log.h"
#include "observe.h"
#include "server_internal.h"
#include "serving.h"
#include "trace.h"

void keel__srv_outcome_set(srv_outcome *o, keel_err err, const char *fmt, ...)
{
    va_list ap;

    o->err = err;
    va_start(ap, fmt);
    if (vsnprintf(o->msg, sizeof(o->msg), fmt, ap) < 0)
        snprintf(o->msg, sizeof(o->msg), "%s", keel_strerror(err));
    va_end(ap);
}

/* Admission takes no lock (three lock round trips per request did, issue 12). The count
 * goes up before draining is read, and the drain (server.c) sets draining before it reads
 * the count, all sequentially consistent: an admit either sees draining (and takes itself
 * back) or is counted by the drain's read. The drain waits for the count under s->mu on
 * idle_cv; the decrement that reaches 0 while draining broadcasts under s->mu, so the drain,
 * which reads the count under s->mu before it waits, cannot miss it. */
bool keel__srv_admit(keel_srv *s)
{
    atomic_fetch_add(&s->pending, 1);
    if (atomic_load(&s->draining)) {
        keel__srv_done(s);
        return false;
    }
    return true;
}

void keel__srv_done(keel_srv *s)
{
    if (atomic_fetch_sub(&s->pending, 1) == 1 && atomic_load(&s->draining)) {
        pthread_mutex_lock(&s->mu);
        pthread_cond_broadcast(&s->idle_cv);
        pthread_mutex_unlock(&s->mu);
    }
}

bool keel__srv_draining(keel_srv *s)
{
    return atomic_load(&s->draining);
}

void keel__srv_not_served(keel_srv *s, const char *model, int64_t version, srv_outcome *o)
{
    keel_model_status *list = NULL;
    size_t n = 0;
    bool known = false, any_ready = false;
    const keel_model_status *row = NULL;

    if (keel_model_list(s->rt, &list, &n) != KEEL_OK) {
        keel__srv_outcome_set(o, KEEL_ENOMEM, "out of memory");
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
        keel__srv_outcome_set(o, KEEL_ENOTFOUND, "unknown model '%s'", model);
    } else if (version >= 0 && any_ready) {
        keel__srv_outcome_set(o, KEEL_ENOTFOUND, "model '%s' has no version %" PRId64, model,
                              version);
    } else if (row->state == KEEL_MODEL_LOADING) {
        keel__srv_outcome_set(o, KEEL_EUNAVAILABLE, "model '%s' is loading", model);
    } else if (row->state == KEEL_MODEL_FAILED) {
        keel__srv_outcome_set(o, KEEL_EUNAVAILABLE, "model '%s' failed to load: %s", model,
                              row->last_error_msg[0] != '\0' ? row->last_error_msg
                                                             : keel_strerror(row->last_error));
    } else if (any_ready) {
        /* It became ready between the caller's check and this one. */
        keel__srv_outcome_set(o, KEEL_EUNAVAILABLE, "model '%s' is not ready", model);
    } else {
        keel__srv_outcome_set(o, KEEL_EUNAVAILABLE, "model '%s' is not loaded", model);
    }
    keel_model_status_free(list, n);
}

keel_err keel__srv_submit(keel_srv *s, keel_request *req, const char *model, int64_t version,
                          unsigned flags, keel_infer_cb cb, void *user, srv_outcome *o)
{
    keel_err err = keel_infer_submit_ex(req, flags, cb, user);

    if (err == KEEL_OK)
        return KEEL_OK;
    /* The callback will never run: end the admission and say why. */
    keel__srv_done(s);
    if (err == KEEL_ENOTFOUND)
        keel__srv_not_served(s, model, version, o);
    else
        keel__srv_outcome_set(o, err, "%s",
                              keel_request_error(req)[0] != '\0' ? keel_request_error(req)
                                                                 : keel_strerror(err));
    return err;
}

void keel__srv_failed(keel_srv *s, const keel_request *req, keel_err status, const char *model,
                      int64_t version, bool cancel_shutdown, srv_outcome *o)
{
    const char *msg = keel_request_error(req);

    if (status == KEEL_ENOTFOUND) {
        keel__srv_not_served(s, model, version, o);
        return;
    }
    if (status == KEEL_ECANCELED && cancel_shutdown) {
        keel__srv_outcome_set(o, KEEL_ESHUTDOWN,
                              "the server is shutting down: the request was cancelled at the "
                              "exit timeout");
        return;
    }
    keel__srv_outcome_set(o, status, "%s", msg[0] != '\0' ? msg : keel_strerror(status));
}

void keel__srv_observe(keel_srv *s, const srv_obs_event *ev)
{
    keel__srv_obs_record(s->obs, ev);
    keel__srv_trace_record(s->trace, ev);
    if (s->alog != NULL)
        keel__srv_alog_write(s->alog, ev);
}
