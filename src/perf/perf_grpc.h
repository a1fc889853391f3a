/*
 * perf_grpc.h: the gRPC side of the load tools (perf_grpc.c): a blocking unary call for
 * control traffic (the model's metadata) and the gRPC load loop (unary ModelInfer or
 * ModelStreamInfer), on gRPC's C core with keel's own .proto (src/server/proto).
 *
 * DESIGN
 * perf_grpc_load_run runs on the calling thread, like perf_load_run (which calls it for a
 * gRPC workload); perf_grpc_model_inputs may run on any thread. Each initialises gRPC
 * (grpc_init) for its duration and shuts it down (grpc_shutdown) before returning, so no
 * gRPC thread outlives a call into this file.
 */
#ifndef KEEL_PERF_PERF_GRPC_H
#define KEEL_PERF_PERF_GRPC_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "perf_http.h"

typedef struct perf_workload perf_workload;
typedef struct perf_load_opts perf_load_opts;
typedef struct perf_result perf_result;

/* The name of gRPC status code (0..16: "OK" ... "UNAUTHENTICATED"), else "UNKNOWN". */
const char *perf_grpc_code_name(int code);

/*
 * ModelMetadata of model (version NULL = the server's choice) at t, with a deadline of
 * timeout_s. On success *doc (owned by the caller) is the metadata as the HTTP endpoint
 * writes it ({"name", "inputs": [{"name", "datatype", "shape"}], ...}). Otherwise errbuf
 * says why: the server could not be reached (and the gRPC library's reason), or its status
 * and message. *unreachable (may be NULL) tells the first case from the others.
 */
bool perf_grpc_model_metadata(const perf_target *t, const char *model, const char *version,
                              double timeout_s, json_t **doc, bool *unreachable, char *errbuf,
                              size_t errlen);

/*
 * Packs one inference.ModelInferRequest of w's model and version with one input per entry
 * of names/datatypes/dims and its bytes in raw_input_contents. On success *out (malloc'd)
 * and *len hold it.
 */
bool perf_grpc_pack_infer(const perf_workload *w, const char *id, const void *const *raw,
                          const size_t *raw_len, unsigned char **out, size_t *len);

/* The gRPC load loop; the contract of perf_load_run. */
bool perf_grpc_load_run(const perf_workload *w, const perf_load_opts *o, perf_result *r,
                        char *errbuf, size_t errlen);

#endif
