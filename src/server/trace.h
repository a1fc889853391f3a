/*
 * trace.h: Triton's trace extension for `keel serve`: GET/POST /v2/trace/setting and
 * /v2/models/{m}/trace/setting, and per-request TIMESTAMPS traces written in Triton's JSON
 * trace format (so Triton's trace_summary.py and other existing tooling read them).
 *
 * DESIGN
 * srv_trace (trace.c) owns the settings (a global scope and per-model overrides), each
 * scope's sampling counters and the traces collected and not yet written. Protocol front
 * ends call keel__srv_trace_record once per finished inference (the same srv_obs_event
 * that feeds the histograms); while no scope traces, that is one atomic load and no lock.
 * Files are written only under the directory given with --trace-dir (the API names a file,
 * never a path), by the thread whose trace completes a batch of log_frequency traces, with
 * no lock held, after that request's response was sent.
 *
 * Locks: t->mu (a leaf): settings, counters, pending traces. Never held across file I/O.
 * Threads: any (MHD threads today); create/destroy on the main thread around the daemon.
 */
#ifndef KEEL_SERVER_TRACE_H
#define KEEL_SERVER_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"
#include "observe.h"

typedef struct srv_trace srv_trace;

/* dir: where trace files go (borrowed, must outlive the object); NULL = tracing cannot be
 * turned on (the settings API then answers 400 to a level other than OFF). NULL on ENOMEM. */
srv_trace *keel__srv_trace_create(const char *dir);
/* Writes the traces still pending (log_frequency 0: the whole file) and frees everything.
 * Accepts NULL. */
void keel__srv_trace_destroy(srv_trace *t);

/* Handles a trace setting request: model NULL = global; post with its JSON body (may be
 * empty). Returns the HTTP status and sets *json (malloc'd) to the response body: the
 * settings in effect, or {"error": ...}. For a model, a POST with an empty object removes
 * its override, and a null value resets that setting to the global one. */
unsigned keel__srv_trace_setting(srv_trace *t, keel_runtime *rt, const char *model, bool post,
                                 const char *body, size_t len, char **json);

/* Whether some scope traces now (one atomic load): a front end records a request's steps
 * (HTTP_RECV_END, REQUEST_START, REQUEST_END, HTTP_SEND_START) only if it was on when the
 * request arrived; a request without them is not traced. Accepts NULL (false). */
bool keel__srv_trace_active(srv_trace *t);

/* A finished inference: traced if its scope's level is TIMESTAMPS, the rate picks it and
 * the count allows it. ev->model must be set, ev->timing.complete_ns != 0 and the front end's
 * steps recorded (ev->recv_end_ns != 0); others are ignored. Any thread. */
void keel__srv_trace_record(srv_trace *t, const srv_obs_event *ev);

#endif
