/*
 * testhook.h: the runtime internals the unit tests reach, and nothing else. Tests include
 * this (with the public keel.h) instead of the runtime's internal headers. The fault points
 * themselves are core's (core/core.h: keel__fault_arm_*).
 */
#ifndef KEEL_RUNTIME_TESTHOOK_H
#define KEEL_RUNTIME_TESTHOOK_H

#include <stdbool.h>
#include <stdint.h>

#include "backends/backend.h"
#include "core/core.h"
#include "keel/keel.h"

/* Registers an extra backend (a mock); only before any model is loaded (runtime.c). */
keel_err keel__runtime_add_backend(keel_runtime *rt, const keel__backend *be);
/* Reads the process's resident set size and (if available, else -1) proportional set size
 * (budget.c). */
void keel__mem_sample(int64_t *rss, int64_t *pss);
/* The inputs a request holds (request.c): what a codec decoded, for the codec tests. The
 * view borrows from the request. */
size_t keel__request_input_count(const keel_request *req);
keel_err keel__request_input(const keel_request *req, size_t i, keel_tensor_view *out);
/* One backend run's outputs into req as the runtime collects them (request.c): a run slot
 * begun on req (its earlier outputs cleared, their allocations kept), outs[0..n) emitted into
 * it, then the slot ended (the outputs are req's), or, with detached, finalised instead (what
 * happens when the request was answered while its backend call ran). For the tests of output
 * recycling; KEEL_OK or the emit's error. */
keel_err keel__request_emit_run(keel_request *req, const keel_tensor_view *outs, size_t n,
                                bool detached);
/* How many destroyed requests a thread keeps for reuse (request.c; 0 under ASan). */
unsigned keel__request_cache_cap(void);
/* How many destroyed requests the calling thread keeps now. */
unsigned keel__request_cached(void);
/* The execution-time estimate behind KEEL_SUBMIT_RUN_IF_FAST (sched.c). */
int keel__est_class(int64_t batch);
uint64_t keel__est_update(uint64_t est, uint64_t sample_ns);
bool keel__est_is_fast(uint64_t est, uint64_t bound_ns);

#endif
