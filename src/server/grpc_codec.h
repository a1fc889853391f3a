/*
 * grpc_codec.h: the gRPC codec of `keel serve`: inference.ModelInferRequest (protobuf-c) into
 * a keel_request, a completed keel_request into inference.ModelInferResponse, and the JSON
 * documents the HTTP routes build (metadata, statistics, index, configuration) into their
 * protobuf messages, so both protocols answer from one implementation.
 *
 * DESIGN
 * Pure functions on caller-owned objects: no locks, no threads, no global state; callable
 * from any thread. The request message is untrusted (protobuf-c has already checked its wire
 * format): every shape is checked (non-negative, element count overflow-checked, equal to
 * the data given) before any tensor-sized allocation, and every error names the field in
 * the style of the HTTP codec, e.g. "inputs[1].shape[0]: expected a non-negative integer,
 * got -3".
 */
#ifndef KEEL_SERVER_GRPC_CODEC_H
#define KEEL_SERVER_GRPC_CODEC_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"
#include "keel_inference.pb-c.h"

/* Parses a model version string: "" = -1 (newest), else decimal digits without overflow.
 * false on anything else. */
bool keel__grpc_parse_version(const char *text, int64_t *out);

/*
 * Adds the inputs, requested outputs, id, parameters and timeout of m to req (created by the
 * caller for m's model and version). KEEL_OK, or KEEL_EINVAL / KEEL_ENOMEM with a message in
 * err; req may then hold some inputs (destroy it). The Triton "timeout" parameter (int64 or
 * uint64 microseconds) goes to *timeout_us (0 = not given; the caller combines it with the
 * call's deadline); other parameters are set as strings (booleans "true"/"false", numbers in
 * decimal).
 */
keel_err keel__grpc_decode_infer(const Inference__ModelInferRequest *m, keel_request *req,
                                 uint64_t *timeout_us, char *err, size_t errlen);

#define GRPC_OUT_INLINE 4 /* outputs described without an allocation */

/* A ModelInferResponse that borrows the request's output tensors (valid while the request
 * is); fini frees only what fill allocated (nothing for up to GRPC_OUT_INLINE outputs). */
typedef struct grpc_infer_out {
    Inference__ModelInferResponse resp;
    Inference__ModelInferResponse__InferOutputTensor *tensors;
    Inference__ModelInferResponse__InferOutputTensor **ptrs;
    ProtobufCBinaryData *raw;
    Inference__ModelInferResponse__InferOutputTensor tensors_in[GRPC_OUT_INLINE];
    Inference__ModelInferResponse__InferOutputTensor *ptrs_in[GRPC_OUT_INLINE];
    ProtobufCBinaryData raw_in[GRPC_OUT_INLINE];
    char version[24];
} grpc_infer_out;

/*
 * Fills o from a successfully completed request: model_name = model, model_version = the
 * version the request ran on, id echoed, outputs (the requested ones in request order, else
 * all) with their data in raw_output_contents, as Triton answers. Returns KEEL_OK or an error
 * with a message (a requested output missing, out of memory); o is always safe to fini.
 */
keel_err keel__grpc_infer_out_fill(grpc_infer_out *o, const keel_request *req, const char *model,
                                   const Inference__ModelInferRequest *m, char *err, size_t errlen);
void keel__grpc_infer_out_fini(grpc_infer_out *o);

/*
 * Builds a message of type d from a JSON object, field by field with the proto field names
 * as keys: strings (numbers are formatted), integers (JSON integers or decimal strings),
 * floats, booleans, enums (by value name), nested messages and repeated fields. Keys the
 * message does not have are skipped. Returns a malloc'd message (free it with
 * protobuf_c_message_free_unpacked(msg, NULL)), or NULL on out of memory.
 */
ProtobufCMessage *keel__grpc_json_to_msg(const ProtobufCMessageDescriptor *d, const json_t *j);

/* "OK", "CANCELLED", ... for gRPC status code 0..16 (metrics labels); any thread. */
const char *keel__grpc_code_name(int code);

#endif
