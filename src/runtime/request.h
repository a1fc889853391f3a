/*
 * request.h: the parts of a request the runtime's other files use: binding its inputs to a
 * config, collecting outputs, errors. Layer: above registry.c (internal.h).
 */
#ifndef KEEL_RUNTIME_REQUEST_H
#define KEEL_RUNTIME_REQUEST_H

#include "runtime/internal.h"
#include "runtime/testhook.h" /* keel__request_input_count, keel__request_input */

void keel__request_clear_outputs(keel_request *req);
/* Validates req's inputs against cfg and fills req->views (config order) and *batch. */
keel_err keel__request_bind_inputs(keel_request *req, const keel__model_config *cfg,
                                   uint32_t accepted_types, int64_t *batch);
keel_err keel__request_emit(keel__run_io *io, const char *name, keel_datatype dt,
                            const int64_t *shape, size_t ndim, const void *data, size_t bytes);
/* Copies one output (or its rows of a batch's output) into req if req asked for it. */
keel_err keel__request_emit_to(keel_request *req, const char *name, keel_datatype dt,
                               const int64_t *shape, size_t ndim, const void *data, size_t bytes,
                               char *errbuf, size_t errlen);
/* Walks count BYTES elements (<u32 little-endian length><bytes>) of p[0..len) from byte
 * offset from; *out is the offset after them. False if they do not fit. */
bool keel__bytes_skip(const unsigned char *p, size_t len, size_t from, size_t count, size_t *out);
void keel__request_set_error(keel_request *req, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
