/*
 * request.h: the parts of a request the runtime's other files use: binding its inputs to a
 * config, collecting outputs, errors. Layer: above registry.c (internal.h).
 */
#ifndef KEEL_RUNTIME_REQUEST_H
#define KEEL_RUNTIME_REQUEST_H

#include "runtime/internal.h"
#include "runtime/testhook.h" /* keel__request_input_count, keel__request_input */

/* What one request of a running group lends the backend call (sched.c's DESIGN): the sink
 * its outputs are emitted into (with the names it asked for), and, once it was answered
 * before the backend returned (detached), its inputs and views, so that a late read or
 * write of the backend touches only memory the slot owns. Owned by the runner. */
enum { KEEL__RUN_BACKEND = 1, KEEL__RUN_RETURNED, KEEL__RUN_DETACHED };
typedef struct keel__run_slot {
    _Atomic int phase; /* KEEL__RUN_*: changed by compare-and-swap only */
    void *group;       /* sched.c's run group */
    keel_request *req; /* the runner's note of its request: never touched once detached */
    int64_t rows;      /* its rows of a batch's merged inputs */
    keel__tensor *outputs;
    size_t noutputs, cap_outputs;
    size_t kept_outputs; /* as keel_request's: outputs[0..kept_outputs) are allocated */
    char **requested;    /* borrowed from the request; owned once detached */
    size_t nrequested, cap_requested;
    keel__tensor *inputs; /* the rest: owned once detached, else NULL */
    size_t ninputs;
    keel_tensor_view *views;
} keel__run_slot;

/* Runner, before the backend call: the slot takes req's (cleared) output array and borrows
 * its requested names; phase BACKEND. */
void keel__run_slot_begin(keel__run_slot *s, keel_request *req, void *group, int64_t rows);
/* Runner, after a CAS BACKEND -> RETURNED: the outputs go back into req. */
void keel__run_slot_end(keel__run_slot *s, keel_request *req);
/* Under rt->mu, after a CAS BACKEND -> DETACHED: moves req's inputs, views and requested
 * names into the slot; req keeps none. */
void keel__run_slot_take(keel__run_slot *s, keel_request *req);
/* Frees what the slot owns (no lock held). */
void keel__run_slot_fini(keel__run_slot *s);
/* keel__run_io.emit of a run of one request: io->sink is its slot. */
keel_err keel__run_slot_emit(keel__run_io *io, const char *name, keel_datatype dt,
                             const int64_t *shape, size_t ndim, const void *data, size_t bytes);

void keel__request_clear_outputs(keel_request *req);
/* Frees a tensor's name and shape, and its data (free, or release once when borrowed). */
void keel__tensor_fini(keel__tensor *t);
/* Validates req's inputs against cfg and fills req->views (config order) and *batch. */
keel_err keel__request_bind_inputs(keel_request *req, const keel__model_config *cfg,
                                   uint32_t accepted_types, int64_t *batch);
/* Copies one output (or its rows of a batch's output) into slot s if its request asked for
 * it. */
keel_err keel__request_emit_to(keel__run_slot *s, const char *name, keel_datatype dt,
                               const int64_t *shape, size_t ndim, const void *data, size_t bytes,
                               char *errbuf, size_t errlen);
/* Walks count BYTES elements (<u32 little-endian length><bytes>) of p[0..len) from byte
 * offset from; *out is the offset after them. False if they do not fit. */
bool keel__bytes_skip(const unsigned char *p, size_t len, size_t from, size_t count, size_t *out);
void keel__request_set_error(keel_request *req, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
