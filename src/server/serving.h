/*
 * serving.h: the protocol-independent serving path of `keel serve`, shared by the HTTP codec
 * (server.c) and the gRPC codec (grpc_server.c).
 *
 * DESIGN
 * A protocol front end turns its message into a keel_request and its outcome back into its
 * own answer; everything between is here, once: admission (the drain gate and the count of
 * work in flight that the staged shutdown waits for), the submit and the undo of a failed
 * one, and the outcome of a request that failed (the keel error, which each codec maps to
 * its own status, and the message, the same text over every protocol). Statistics are
 * libkeel's (every request is counted by the runtime, whichever protocol carried it).
 *
 * Locks: s->mu only (see server_internal.h), never held across a libkeel call. All functions
 * may be called from any thread.
 */
#ifndef KEEL_SERVER_SERVING_H
#define KEEL_SERVER_SERVING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

typedef struct keel_srv keel_srv;

#define SRV_MSG_LEN 1024

/* Why a request was not answered with a result: err picks the status of each protocol
 * (keel__srv_http_status, grpc's mapping), msg is the text both send. */
typedef struct srv_outcome {
    keel_err err;
    char msg[SRV_MSG_LEN];
} srv_outcome;

/* Sets o (printf-style message). */
void keel__srv_outcome_set(srv_outcome *o, keel_err err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Admits one unit of work (an infer or a model-control job): false when the server is
 * draining (answer "the server is shutting down", KEEL_ESHUTDOWN); true counts it in
 * s->pending until keel__srv_done. */
bool keel__srv_admit(keel_srv *s);
/* Ends admitted work; the last one wakes the drain. */
void keel__srv_done(keel_srv *s);
/* Whether new work would be refused (a cheap early check before decoding a body). */
bool keel__srv_draining(keel_srv *s);

/* The outcome for a model (version -1 = any) that is not served: unknown (KEEL_ENOTFOUND),
 * unknown version (KEEL_ENOTFOUND), loading, failed or not loaded (KEEL_EUNAVAILABLE). */
void keel__srv_not_served(keel_srv *s, const char *model, int64_t version, srv_outcome *o);

/*
 * Submits an admitted request (keel_infer_submit_ex with flags). KEEL_OK: cb runs exactly
 * once and the caller calls keel__srv_done after it. Otherwise cb never runs, the admission
 * has been ended here, and o says why (a model not served, a full queue, ...).
 */
keel_err keel__srv_submit(keel_srv *s, keel_request *req, const char *model, int64_t version,
                          unsigned flags, keel_infer_cb cb, void *user, srv_outcome *o);

/* The outcome of a request that completed with status != KEEL_OK. cancel_shutdown: it was
 * cancelled by the drain's exit timeout (answered as a shutdown, not a cancel). */
void keel__srv_failed(keel_srv *s, const keel_request *req, keel_err status, const char *model,
                      int64_t version, bool cancel_shutdown, srv_outcome *o);

#endif
