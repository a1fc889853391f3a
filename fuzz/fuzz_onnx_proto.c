/*
 * fuzz_onnx_proto.c: libFuzzer driver for the ONNX protobuf reader (src/backends/onnx_proto.h).
 *
 * DESIGN
 * keel__onnx_graph_read runs in the server process on every ONNX file a load sees, before the
 * child-process check, so it must survive any bytes: a graph interface or KEEL_ELOAD /
 * KEEL_ENOMEM with a message naming the file, never a crash, a leak or undefined behaviour.
 * keel__onnx_tensor_read (the tests' .pb reader) gets the same bytes. The driver also checks
 * the contract: on success every name is non-empty and NUL-terminated within its buffer, at
 * most KEEL__ONNX_MAX_IO values on each side, ndims within KEEL__MAX_DIMS, dims positive or
 * KEEL__ONNX_DIM_UNKNOWN; on error the message starts with the name. The corpus seeds are the
 * committed test models (tests/data/onnx/ * /model.onnx and their .pb files).
 *
 * Build and run: fuzz/README.md.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/onnx_proto.h"

#define FUZZ_NAME "models/m/1/model.onnx"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_onnx_proto: contract broken: %s\n", what);
        abort();
    }
}

static void check_value(const keel__onnx_value *v)
{
    check(v->name[0] != '\0', "empty name");
    check(memchr(v->name, '\0', sizeof(v->name)) != NULL, "name not terminated");
    check(v->ndims <= KEEL__MAX_DIMS, "too many dims");
    for (size_t d = 0; d < v->ndims; d++)
        check(v->dims[d] > 0 || v->dims[d] == KEEL__ONNX_DIM_UNKNOWN, "bad dim");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static keel__onnx_graph g;
    keel__onnx_tensor t;
    char err[512];
    keel_err e;

    err[0] = '\0';
    e = keel__onnx_graph_read(data, size, FUZZ_NAME, &g, err, sizeof(err));
    if (e == KEEL_OK) {
        check(g.ninputs >= 1 && g.ninputs <= KEEL__ONNX_MAX_IO, "input count");
        check(g.noutputs >= 1 && g.noutputs <= KEEL__ONNX_MAX_IO, "output count");
        for (size_t i = 0; i < g.ninputs; i++)
            check_value(&g.inputs[i]);
        for (size_t i = 0; i < g.noutputs; i++)
            check_value(&g.outputs[i]);
    } else {
        check(e == KEEL_ELOAD || e == KEEL_ENOMEM, "error code");
        check(strncmp(err, FUZZ_NAME, strlen(FUZZ_NAME)) == 0, "message does not name the file");
    }
    err[0] = '\0';
    if (keel__onnx_tensor_read(data, size, FUZZ_NAME, &t, err, sizeof(err)) == KEEL_OK) {
        check(t.ndims <= KEEL__MAX_DIMS, "tensor dims");
        check(t.count == 0 || t.data != NULL, "tensor data");
        free(t.data);
    } else {
        check(strncmp(err, FUZZ_NAME, strlen(FUZZ_NAME)) == 0, "tensor message");
    }
    return 0;
}
