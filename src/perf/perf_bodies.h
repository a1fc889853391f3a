/*
 * perf_bodies.h: input specs and the workload of pre-built requests (perf_bodies.c).
 *
 * DESIGN
 * A workload is prepared by one thread, then only read (by the load loop).
 */
#ifndef KEEL_PERF_PERF_BODIES_H
#define KEEL_PERF_PERF_BODIES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "perf_http.h"

typedef struct perf_input_spec {
    char name[128];
    char datatype[16];
    int64_t dims[16]; /* per request, the batch dimension included if the model batches */
    size_t ndims;
} perf_input_spec;

typedef struct perf_workload {
    perf_target target;
    char *model; /* NULL with a static endpoint */
    char *version;
    char *endpoint; /* GET this path instead of inferring (a static-reply baseline) */
    unsigned batch;
    bool binary; /* Triton's binary tensor extension instead of JSON data arrays */
    bool grpc;   /* gRPC ModelInfer (raw_input_contents) instead of HTTP */
    bool stream; /* gRPC: ModelStreamInfer, one message in flight per stream */
    perf_input_spec inputs[8];
    size_t ninputs;
    /* Pre-built requests, used in turn: HTTP (head + body), or with grpc a packed
     * inference.ModelInferRequest. */
    char **reqs;
    size_t *req_lens;
    size_t nreqs;
} perf_workload;

typedef struct perf_data_opts {
    const char *input_data; /* "random" (default), "zero", or a file of rows */
    uint64_t seed;
    size_t variants; /* distinct request bodies to build (random data) */
} perf_data_opts;

/* Fills w->inputs from the model's metadata unless ninputs > 0 already, then builds the
 * requests. Returns false with errbuf filled. */
bool perf_workload_prepare(perf_workload *w, const perf_data_opts *d, char *errbuf, size_t errlen);
void perf_workload_fini(perf_workload *w);
/* Parses NAME:DATATYPE:D1xD2x... (per-request shape) into spec. */
bool perf_input_spec_parse(const char *s, perf_input_spec *spec);

/* The model's inference_count (rows) and execution_count (backend calls) from the server's
 * statistics extension (HTTP only); false if they cannot be read. */
bool perf_server_rows(const perf_workload *w, uint64_t *rows, uint64_t *execs);

#endif
