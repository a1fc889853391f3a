/*
 * v2codec.h: KServe V2 / Open Inference Protocol infer request decoding and response encoding,
 * including Triton's binary tensor extension. Used by the HTTP server; depends only on the
 * public API (keel/keel.h) and on the JSON libraries it chooses.
 *
 * DESIGN
 * Decoding fills a caller-created keel_request from an HTTP body. The body is untrusted: every
 * shape is checked (non-negative, element count overflow-checked, equal to the data given)
 * before any tensor-sized allocation, and every error names the field, e.g.
 * "inputs[1].shape[0]: expected a non-negative integer, got -3". Nothing here holds locks or
 * threads; all functions are reentrant and may run on any thread on distinct objects.
 *
 * Binary extension (Triton): when the header Inference-Header-Content-Length: N is present,
 * the first N bytes of the body are the JSON header and the rest is the binary section; an
 * input with "parameters": {"binary_data_size": S} takes the next S bytes of that section
 * (in input order) as its raw little-endian data (BYTES: 4-byte length-prefixed elements).
 * On output, "binary_data_output": true in the request parameters, or "parameters":
 * {"binary_data": true} on a requested output, returns that output in the binary section with
 * "parameters": {"binary_data_size": S} in its JSON entry.
 */
#ifndef KEEL_SERVER_V2CODEC_H
#define KEEL_SERVER_V2CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

/* What the client asked for about outputs, kept from decoding for encoding. */
typedef struct keel_v2_output_req {
    char *name;
    bool binary;       /* parameters.binary_data */
    bool binary_given; /* parameters.binary_data was present: it overrides binary_data_output */
} keel_v2_output_req;

typedef struct keel_v2_request_info {
    const char *id; /* "id", or NULL: the request's (keel_request_id), valid while it is */
    keel_v2_output_req *outputs; /* requested outputs in request order (may be 0) */
    size_t noutputs;
    bool binary_data_output; /* request parameters.binary_data_output */
    uint64_t timeout_us;     /* request parameters.timeout (Triton, microseconds), or 0 */
    uint32_t priority;       /* request parameters.priority (Triton: 1 = highest), or 0 */
} keel_v2_request_info;

/* Frees what decoding put in info and zeroes it. Accepts NULL and an all-zero info. */
void keel_v2_request_info_fini(keel_v2_request_info *info);

/*
 * Decodes an infer request body into req (adds inputs, requested outputs, id, parameters and
 * timeout). header_len is the Inference-Header-Content-Length value, or (size_t)-1 when the
 * header is absent (then the whole body is JSON). On success returns 200 and fills *info (the
 * caller finis it; info->id is req's own id, valid while req is and its id is not set
 * again). On failure returns the HTTP status to answer (400 bad request, 500 out of
 * memory; the body size limit, 413, is the server's to enforce) with a NUL-terminated message
 * in err (a JSON path such as "inputs[0].shape[1]: ..." when a field is at fault), and *info
 * is left empty. The whole body is validated before req is touched, so after a 400 caused by
 * the body req is unchanged; after a 500, or a 400 from keel's own limits (more dimensions
 * than keel_request_add_input accepts), req may hold some of the inputs: destroy it.
 * body need not be NUL-terminated. Request parameters other than timeout and
 * binary_data_output are set with keel_request_set_parameter (numbers as their JSON text,
 * booleans as "true"/"false"). JSON FP32/FP64 numbers convert exactly like strtof/strtod;
 * FP16 like numpy (to double, then round to nearest even); a finite number that overflows
 * its type, an INT/UINT value out of range or with a fraction or exponent, is a 400.
 */
int keel_v2_decode_infer(keel_request *req, const char *body, size_t body_len, size_t header_len,
                         keel_v2_request_info *info, char *err, size_t errlen);

/* How a caller lends its body to the request: binary tensors whose data is aligned for their
 * datatype (keel serve pads its body buffers so that the binary section starts 16-aligned)
 * are borrowed (keel_request_add_input_borrowed), each taking one reference with
 * retain(arg) and giving it back with release(arg) when the request no longer needs it; the
 * others are copied. retain and release may run on any thread. */
typedef struct keel_v2_body_lender {
    void (*retain)(void *arg);
    void (*release)(void *arg);
    void *arg;
} keel_v2_body_lender;

/* keel_v2_decode_infer, with binary tensors borrowed from the body through lender (NULL: all
 * copied, as keel_v2_decode_infer does). */
int keel_v2_decode_infer_lent(keel_request *req, const char *body, size_t body_len,
                              size_t header_len, const keel_v2_body_lender *lender,
                              keel_v2_request_info *info, char *err, size_t errlen);

/* An encoded response: body = json (json_len bytes) followed by the binary section. */
typedef struct keel_v2_response {
    char *body; /* malloc'd; the caller frees it; body[body_len] is a NUL (not sent) */
    size_t body_len;
    size_t json_len; /* value for the Inference-Header-Content-Length response header */
    bool has_binary; /* send Inference-Header-Content-Length only if true */
} keel_v2_response;

/*
 * Encodes a completed, successful request as the V2 infer response: model_name, model_version
 * (as a string; the version the request ran on), id (echoed if the request had one), and the
 * outputs (only the requested ones, in request order, if any were requested) with name,
 * datatype, shape and data (JSON numbers flat in row-major order, BOOL as true/false, BYTES as
 * strings when valid UTF-8, else in the binary section) or binary_data_size. An output goes to
 * the binary section if its request entry says "binary_data": true, or, without that entry
 * or key, if the request said "binary_data_output": true. FP32 and FP16 values are printed in
 * the form "%.Pg" with the smallest P (FP32: from 6 to 9, FP16: 3 to 5, FP64: 15 to 17) that
 * parses back to the same value (shortest round-trip form in all but rare cases). NaN and
 * infinities, which JSON cannot express, are written as null (request binary output to get
 * them bit-exact). info may be NULL (all outputs, JSON, no id). Returns 0 or an HTTP status
 * (500: out of memory, a requested output missing, a tensor inconsistent with its shape)
 * with a message; out is zeroed first and filled only on 0.
 */
int keel_v2_encode_infer(const keel_request *req, const char *model_name,
                         const keel_v2_request_info *info, keel_v2_response *out, char *err,
                         size_t errlen);
/* keel_v2_encode_infer into the caller's buf (cap bytes) while the body fits: out->body is
 * then buf (the caller's, never freed here), else malloc'd as above. */
int keel_v2_encode_infer_into(const keel_request *req, const char *model_name,
                              const keel_v2_request_info *info, char *buf, size_t cap,
                              keel_v2_response *out, char *err, size_t errlen);

/* {"error": "<msg>"} with msg JSON-escaped (bytes that are not UTF-8 become U+FFFD);
 * malloc'd, NUL-terminated. NULL on ENOMEM. */
char *keel_v2_error_json(const char *msg);

#endif
