/*
 * backend.h: the interface every inference backend implements.
 *
 * DESIGN
 * A backend is a const vtable. keel calls it as follows, and a backend may rely on it:
 *   model_load       once per generation, on a loader thread, never concurrently for one
 *                    generation; may be slow. Returns the shared weights ("model").
 *   context_create   instance_count times per generation, after model_load, on the loader
 *                    thread. A context borrows the model; it never frees it.
 *   run              on a worker thread, one call at a time per context. Several contexts of
 *                    one model run at once only if concurrent_contexts is true (otherwise keel
 *                    lets one context of the generation run at a time).
 *   context_destroy  once per context, before model_free, on the reaper (or loader) thread.
 *   model_free       once per generation, after all its contexts are destroyed.
 * No keel lock is held during any of these calls. Inputs given to run have been validated
 * against the generation's config (names, datatypes, shapes, byte sizes). run hands each
 * output to io->emit, which copies it, so the backend's buffer may be reused after emit
 * returns. Errors are returned as keel_err with a message in io->errbuf / errbuf.
 */
#ifndef KEEL_BACKENDS_BACKEND_H
#define KEEL_BACKENDS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"
#include "repository/config.h"

typedef struct keel__run_io keel__run_io;

struct keel__run_io {
    const keel_tensor_view *inputs; /* in config order, one per configured input */
    size_t ninputs;
    int64_t batch; /* shape[0] of the inputs when max_batch_size > 0, else 1 */
    /* Copies one output into the request. Returns KEEL_OK, or an error the backend must
     * return from run unchanged (KEEL_ENOMEM). Outputs not requested are skipped (KEEL_OK). */
    keel_err (*emit)(keel__run_io *io, const char *name, keel_datatype dt, const int64_t *shape,
                     size_t ndim, const void *data, size_t bytes);
    void *sink; /* keel's: the request */
    char *errbuf;
    size_t errlen;
};

typedef struct keel__backend {
    const char *name;         /* matches config.json "backend" */
    bool concurrent_contexts; /* one model may be run by several contexts at once */
    uint32_t input_types;     /* bitmask of (1u << keel_datatype) accepted as inputs */
    keel_err (*model_load)(const keel__model_config *cfg, const char *version_dir, void **model,
                           char *errbuf, size_t errlen);
    keel_err (*context_create)(void *model, const keel__model_config *cfg, void **ctx, char *errbuf,
                               size_t errlen);
    keel_err (*run)(void *ctx, keel__run_io *io);
    void (*context_destroy)(void *ctx);
    void (*model_free)(void *model);
    /* Bytes the backend believes the model holds (0 = unknown). */
    size_t (*memory_estimate)(void *model);
    /* Optional (NULL = config.json must list every input and output). Called once after
     * model_load, on the loader thread, when the config lists no inputs or no outputs: fills
     * cfg->inputs / cfg->outputs (keel__calloc'd, owned by cfg) from the model file. */
    keel_err (*complete_config)(void *model, keel__model_config *cfg, char *errbuf, size_t errlen);
} keel__backend;

#define KEEL__TYPE_BIT(dt) (1u << (unsigned)(dt))

/* Built-in backends. */
extern const keel__backend keel__xgboost_backend;
extern const keel__backend keel__onnx_backend; /* onnx.c: OpenCV DNN */

#endif
