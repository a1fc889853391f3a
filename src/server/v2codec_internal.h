/*
 * v2codec_internal.h: the steps of v2codec.c that do not need a keel_request, for the unit
 * tests, the fuzz driver and the benchmark. The server uses v2codec.h only.
 *
 * DESIGN
 * keel__v2_decode() turns a body into a keel__v2_request (tensors, parameters, outputs) and
 * checks everything the V2 protocol lets it check; keel_v2_decode_infer() then copies that
 * into a keel_request. keel__v2_encode() turns an ordered list of tensor views into the
 * response body; keel_v2_encode_infer() gathers the views from a completed request. Pure
 * functions on caller-owned memory; reentrant.
 */
#ifndef KEEL_SERVER_V2CODEC_INTERNAL_H
#define KEEL_SERVER_V2CODEC_INTERNAL_H

#include "v2codec.h"

/* Most dimensions a shape may have here (keel itself may allow fewer; it says so). */
#define KEEL__V2_MAX_DIMS 16
/* Most inputs, requested outputs and request parameters in one request: every duplicate
 * check is quadratic, here and in keel_request_add_*, so the counts are bounded. */
#define KEEL__V2_MAX_INPUTS 1024
#define KEEL__V2_MAX_OUTPUTS 1024
#define KEEL__V2_MAX_PARAMS 256
/* Deepest JSON nesting accepted (objects and arrays, counted from the top level). */
#define KEEL__V2_MAX_DEPTH 64

typedef struct keel__v2_tensor {
    char *name;
    keel_datatype datatype;
    int64_t shape[KEEL__V2_MAX_DIMS];
    size_t ndim;
    size_t count;     /* elements: the product of shape */
    const void *data; /* row-major, keel's layout; owned (see owned) or inside the body */
    size_t bytes;
    bool owned;  /* data is malloc'd by the decoder; else it is a slice of the body */
    bool binary; /* came from the binary section */
} keel__v2_tensor;

typedef struct keel__v2_param {
    char *key;
    char *value; /* strings as given; numbers as their JSON text; booleans "true"/"false" */
} keel__v2_param;

/* Bytes of a keel__v2_request's own string storage (strs). */
#define KEEL__V2_STRS 192

typedef struct keel__v2_request {
    keel__v2_tensor *inputs; /* in request order: &one while there is one, else malloc'd */
    size_t ninputs;
    keel__v2_tensor one;
    /* The inputs' names and info.id when they fit, else malloc'd (keel__v2_request_fini
     * tells them apart): a request with one input and a short id allocates only its data. */
    char strs[KEEL__V2_STRS];
    size_t strs_len;
    keel__v2_param *params; /* request parameters other than timeout and binary_data_output */
    size_t nparams;
    bool has_timeout;
    keel_v2_request_info info; /* id (see strs), requested outputs, binary_data_output, ... */
} keel__v2_request;

/*
 * Decodes a body (see keel_v2_decode_infer for header_len). Returns 200 and fills *out (free
 * with keel__v2_request_fini; borrowed slices of body stay valid only as long as body; *out
 * points into itself, so it must not be copied), or
 * 400/500 with the message in err (a JSON path, then the reason) and *out empty.
 */
int keel__v2_decode(const char *body, size_t body_len, size_t header_len, keel__v2_request *out,
                    char *err, size_t errlen);
void keel__v2_request_fini(keel__v2_request *r);

/*
 * Encodes a response with the n outputs outs[] in that order; binary[i] sends output i in the
 * binary section (a BYTES output that is not valid UTF-8 goes there regardless). id may be
 * NULL (then no "id" member). Returns 0, or 500 with a message (out of memory, or a tensor
 * whose bytes do not match its shape).
 */
int keel__v2_encode(const char *model_name, int64_t version, const char *id,
                    const keel_tensor_view *outs, const bool *binary, size_t n,
                    keel_v2_response *out, char *err, size_t errlen);

#endif
