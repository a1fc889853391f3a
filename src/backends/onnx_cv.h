/*
 * onnx_cv.h: the C interface over OpenCV's DNN module (onnx_cv.cpp, one of keel's two C++ files).
 *
 * DESIGN
 * A keel__cvnet is one cv::dnn::Net, owned by exactly one execution context (or by the model
 * check helper). OpenCV 4.6 gives wrong answers without any error when two threads run
 * forward() on one Net at once, so a Net is never shared: the caller guarantees one call at a
 * time per net. Different nets may run at once on different threads.
 * Loads (keel__cvnet_load) are serialised by a process-wide mutex inside onnx_cv.cpp, because
 * OpenCV's importers have had data races; runs take no lock. Every C++ exception is caught at
 * this boundary and returned as a keel_err with a message; nothing here aborts, prints or logs.
 */
#ifndef KEEL_BACKENDS_ONNX_CV_H
#define KEEL_BACKENDS_ONNX_CV_H

#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel__cvnet keel__cvnet;

/* Builds a Net from an ONNX file's bytes (borrowed for the call). what names the file in
 * messages. On KEEL_OK *out is owned by the caller (keel__cvnet_free). */
keel_err keel__cvnet_load(const void *bytes, size_t len, const char *what, keel__cvnet **out,
                          char *errbuf, size_t errlen);

/* One input of a run: FP32 values in C order, borrowed for the call. */
typedef struct keel__cvnet_input {
    const char *name;
    const int64_t *shape;
    size_t ndim;
    const float *data;
} keel__cvnet_input;

/* Sets the inputs and computes the named outputs. On KEEL_OK each output is readable with
 * keel__cvnet_output until the next run or free of this net. */
keel_err keel__cvnet_run(keel__cvnet *net, const keel__cvnet_input *inputs, size_t ninputs,
                         const char *const *outputs, size_t noutputs, char *errbuf, size_t errlen);

/* Output i of the last successful run: its shape (at most max_dims dims; *ndim is set) and
 * its contiguous FP32 values. Returns KEEL_EBACKEND (with a message) if OpenCV produced a
 * type other than FP32 or more dims than max_dims. */
keel_err keel__cvnet_output(keel__cvnet *net, size_t i, int64_t *shape, size_t max_dims,
                            size_t *ndim, const float **data, size_t *count, char *errbuf,
                            size_t errlen);

void keel__cvnet_free(keel__cvnet *net); /* accepts NULL */

/* Nets alive in this process (for tests: every context's Net is freed with its generation). */
long keel__cvnet_live(void);

#ifdef __cplusplus
}
#endif

#endif
