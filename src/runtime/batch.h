/*
 * batch.h: merging the requests of one batch and splitting the outputs back (batch.c).
 * Layer: above request.c (internal.h).
 */
#ifndef KEEL_RUNTIME_BATCH_H
#define KEEL_RUNTIME_BATCH_H

#include "runtime/internal.h"
#include "runtime/request.h"

/* The sink of a batched run: io->sink while the backend runs (keel__batch_emit). */
typedef struct keel__batch_sink {
    keel__run_slot *slots; /* of the requests whose rows were merged, in row order */
    size_t nreqs;
    int64_t rows;
} keel__batch_sink;

/* Whether b's inputs have a's names, order, datatypes and non-batch dimensions. */
bool keel__batch_compatible(const keel_request *a, const keel_request *b);
/* Concatenates each configured input of the bound requests in list (their views) into one
 * buffer per input: views[j] (shape in shapes[j], first dim = rows) and bufs[j] to free. */
keel_err keel__batch_inputs_merge(const keel__model_config *cfg, keel_request *list, int64_t rows,
                                  int64_t (*shapes)[KEEL__MAX_DIMS + 1], keel_tensor_view *views,
                                  void **bufs, char *errbuf, size_t errlen);
void keel__batch_inputs_free(void **bufs, size_t n);
/* keel__run_io.emit of a batched run: splits the output by rows into each request. */
keel_err keel__batch_emit(keel__run_io *io, const char *name, keel_datatype dt,
                          const int64_t *shape, size_t ndim, const void *data, size_t bytes);
/* Counts one execution of `size` rows in s's batch statistics. */
void keel__batch_stats_record(keel__stats *s, int64_t size, uint64_t input_ns, uint64_t infer_ns,
                              uint64_t output_ns);

#endif
