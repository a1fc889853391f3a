/*
 * preprocess.h: the hook between a request and the preprocessing workers (src/workers).
 * Layer: above request.c, below sched.c whose run path calls it (internal.h).
 */
#ifndef KEEL_RUNTIME_PREPROCESS_H
#define KEEL_RUNTIME_PREPROCESS_H

#include "runtime/internal.h"

/* Saved state of a request whose image input was swapped for the decoded tensor. */
typedef struct keel__prep_swap {
    keel__tensor original; /* the BYTES input, out of req->inputs while the backend runs */
    size_t index;          /* its slot in req->inputs */
    bool active;
} keel__prep_swap;
/* Worker thread, no lock held, request leased: if the generation's config has a
 * "preprocess" section and the request carries its BYTES input, decodes the images in a
 * preprocessing worker (deadline: the request's) and puts the FP32 tensor in its place. */
keel_err keel__preprocess_begin(keel_request *req, keel__prep_swap *sw);
/* Restores the request's own input after the run (always call after begin). */
void keel__preprocess_end(keel_request *req, keel__prep_swap *sw);
/* Instead of end, for a request answered while its backend ran (its inputs, with the decoded
 * tensor, went to its run slot): frees the saved input, which nothing else holds. */
void keel__preprocess_drop(keel__prep_swap *sw);
/* Under no lock: false if g's model needs the pool and the pool is unhealthy. */
bool keel__preprocess_ready(keel_runtime *rt, const keel__model_config *cfg);

#endif
