/*
 * onnx_proto.h: a small, bounds-checked reader for the parts of the ONNX protobuf format keel
 * needs: a model's graph inputs and outputs, and TensorProto files (the test data).
 *
 * DESIGN
 * ONNX files are untrusted bytes. This reader never recurses deeper than the fixed nesting of
 * the messages it reads (model -> graph -> value_info -> type -> tensor_type -> shape -> dim),
 * checks every length against the bytes left, and skips fields it does not know, so a
 * truncated or hostile file yields an error message, never a read out of bounds. It holds no
 * state between calls and no locks; any thread may call it on distinct objects. It reads the
 * graph's declared interface only; whether OpenCV can run the graph is decided by the model
 * check in a child process (core/child.h, tools/keel_model_check.c).
 *
 * Why not protobuf-c or libprotobuf: Debian ships no compiled ONNX schema, so using one means
 * generating a decoder from onnx.proto at build time (from python3-onnx, pulling Python and
 * numpy into the build), and a generated decoder unpacks every initializer, that is the
 * model's weights, into heap memory in the server process just to read the interface, which
 * this reader skips without allocating. A judgment, not a benchmark; the reader is fuzzed
 * (fuzz/fuzz_onnx_proto.c) and OpenCV's own protobuf parser still reads the whole file.
 */
#ifndef KEEL_BACKENDS_ONNX_PROTO_H
#define KEEL_BACKENDS_ONNX_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"
#include "repository/config.h"

#define KEEL__ONNX_MAX_IO 64        /* graph inputs or outputs keel accepts */
#define KEEL__ONNX_MAX_NAME 256     /* bytes of a tensor name, NUL included */
#define KEEL__ONNX_FLOAT 1          /* TensorProto.DataType.FLOAT */
#define KEEL__ONNX_DIM_UNKNOWN (-1) /* dim_param or no dim_value */

/* One graph input or output as the file declares it. */
typedef struct keel__onnx_value {
    char name[KEEL__ONNX_MAX_NAME];
    int32_t elem_type; /* TensorProto.DataType; 0 if the file gives none */
    bool has_shape;    /* false: the file declares no shape at all */
    size_t ndims;
    int64_t dims[KEEL__MAX_DIMS]; /* KEEL__ONNX_DIM_UNKNOWN where symbolic or absent */
} keel__onnx_value;

typedef struct keel__onnx_graph {
    keel__onnx_value inputs[KEEL__ONNX_MAX_IO]; /* graph inputs that are not initializers */
    size_t ninputs;
    keel__onnx_value outputs[KEEL__ONNX_MAX_IO];
    size_t noutputs;
} keel__onnx_graph;

/*
 * Reads the graph interface of an ONNX ModelProto. what names the file in messages.
 * On error returns KEEL_ELOAD with e.g. "<what>: not an ONNX model (truncated at byte 812)".
 * g is caller's storage (about 50 KB: allocate it, do not put it on a small stack).
 */
keel_err keel__onnx_graph_read(const void *bytes, size_t len, const char *what, keel__onnx_graph *g,
                               char *errbuf, size_t errlen);

/* A TensorProto holding FLOAT data (float_data or raw_data), e.g. a test_data_set .pb file. */
typedef struct keel__onnx_tensor {
    char name[KEEL__ONNX_MAX_NAME];
    int32_t data_type;
    size_t ndims;
    int64_t dims[KEEL__MAX_DIMS];
    float *data; /* malloc'd, count values; NULL if count is 0 */
    size_t count;
} keel__onnx_tensor;

/* Parses a TensorProto. Only FLOAT tensors are decoded (others: KEEL_EINVAL naming the type).
 * On KEEL_OK the caller frees t->data. */
keel_err keel__onnx_tensor_read(const void *bytes, size_t len, const char *what,
                                keel__onnx_tensor *t, char *errbuf, size_t errlen);

/* "FLOAT", "INT64", ... for messages; "type 99" style for unknown codes (static buffer-free:
 * unknown codes give "UNKNOWN"). */
const char *keel__onnx_type_name(int32_t elem_type);

#endif
