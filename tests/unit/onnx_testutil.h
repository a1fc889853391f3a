/* onnx_testutil.h: helpers shared by the onnx backend's tests (test_onnx, test_onnx_concurrency).
 */
#ifndef KEEL_ONNX_TESTUTIL_H
#define KEEL_ONNX_TESTUTIL_H

#include "testutil.h"

#include "backends/onnx_proto.h"

#ifndef KEEL_SOURCE_DIR
#define KEEL_SOURCE_DIR "."
#endif
/* PyTorch-exported models and PyTorch's outputs (scripts/export-onnx-test-models.py). */
#define TU_ONNX_DATA KEEL_SOURCE_DIR "/tests/data/onnx"
/* Debian libonnx-testdata. */
#define TU_ONNX_TESTDATA "/usr/share/libonnx-testdata/data"

/* The acceptance tolerance: |a-b| <= 1e-5 + 1e-3*|b| (b the reference). */
bool tu_onnx_close(float a, float b);

/* Reads a TensorProto .pb file (FLOAT only); fails the test otherwise. Free t->data. */
void tu_onnx_read_tensor(const char *path, keel__onnx_tensor *t);

/* Writes <repo>/<name>/config.json (backend onnx) and copies model_file to version `version`.
 * io_json is the text of the "input" and "output" members (e.g. "\"input\": [...],
 * \"output\": [...],"), or "" to leave them to the model file. */
void tu_onnx_add_model(const char *repo, const char *name, const char *model_file, int version,
                       int instances, int max_batch, const char *io_json);

/* One synchronous inference of a single FP32 input; copies the first output into *out
 * (malloc'd, *count values, shape into shape[]/ndim). Returns the request's status. */
keel_err tu_onnx_infer(keel_runtime *rt, const char *model, const char *in_name,
                       const int64_t *shape, size_t ndim, const float *data, float **out,
                       size_t *count, int64_t *out_shape, size_t *out_ndim, char *err,
                       size_t errlen);

/* Number of child processes of this process that still exist (zombies included). */
int tu_count_children(void);

#endif
