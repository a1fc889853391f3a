/*
 * observe.h: what every finished request feeds, whatever protocol carried it: latency
 * histograms per model and version, responses by status code, the access log and trace
 * context. Protocol front ends (HTTP: server.c, gRPC: grpc_server.c) fill one srv_obs_event
 * per request and call keel__srv_observe() (serving.c) once, when the request is over.
 *
 * DESIGN
 * srv_obs (observe.c) owns the histogram series and the per-code response counters. Both are
 * written without a lock: buckets, sums and counters are relaxed atomics, and the series
 * table is an append-only hash of singly linked chains whose heads are swapped in with a
 * compare-and-swap; a series is never removed before the server is destroyed (Prometheus
 * series must not vanish while the process lives), so a reader may walk a chain at any time.
 * The table grows only with (model, version, protocol) triples of requests that reached
 * libkeel, i.e. of models that exist. Rendering (the /metrics scrape) reads the same atomics
 * and never blocks an observation.
 *
 * Threads: keel__srv_observe from any thread (MHD threads, the gRPC CQ thread, keel's
 * completion callbacks), render from the scrape's
 * MHD thread; create before the daemon starts, destroy after it stopped.
 */
#ifndef KEEL_SERVER_OBSERVE_H
#define KEEL_SERVER_OBSERVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

/* The protocols that feed the same series; the label value is the name. */
typedef enum srv_protocol { SRV_PROTO_HTTP = 0, SRV_PROTO_GRPC, SRV_PROTO_COUNT_ } srv_protocol;

const char *keel__srv_protocol_name(srv_protocol p);

/* One finished request, as the protocol front end saw it. Strings are borrowed for the
 * call; NULL is read as "". */
typedef struct srv_obs_event {
    srv_protocol protocol;
    const char *route;      /* "infer", "metrics", ... */
    const char *method;     /* "GET", "POST", ... */
    const char *model;      /* NULL for requests that name no model */
    int64_t version;        /* the version it ran on, else the one asked for, else -1 */
    uint64_t generation;    /* the generation it ran on; 0 = none */
    const char *request_id; /* the client's id */
    const char *trace_id;   /* 32 lowercase hex digits of a valid traceparent, or "" */
    const char *span_id;    /* keel's span id (16 hex) when trace_id is set, or "" */
    const char *peer;       /* "addr:port"; only needed when the access log is on */
    /* The protocol's status: HTTP's code (0 = no response was sent), or the gRPC status code
     * (0 = OK; always set: every gRPC call, and every stream message, ends with one). */
    unsigned status;
    uint64_t bytes_in;  /* request body bytes received */
    uint64_t bytes_out; /* response body bytes queued */
    uint64_t start_ns;  /* CLOCK_MONOTONIC: the request's headers arrived */
    uint64_t end_ns;    /* CLOCK_MONOTONIC: the response was sent */
    /* For traces (0 = not reached): the request was read, handed to libkeel, its
     * completion reached the front end, its response started going out. */
    uint64_t recv_end_ns, request_start_ns, request_end_ns, send_start_ns;
    keel_request_timing timing; /* zeros if the request never reached libkeel */
} srv_obs_event;

typedef struct srv_obs srv_obs;

/* On success *out owns the tables (keel__srv_obs_destroy). NULL on ENOMEM. */
srv_obs *keel__srv_obs_create(void);
void keel__srv_obs_destroy(srv_obs *o);

/* Counts ev's status and, if the request completed in libkeel (timing.complete_ns != 0),
 * observes its end-to-end, queue, compute and preprocessing times. Lock-free. */
void keel__srv_obs_record(srv_obs *o, const srv_obs_event *ev);

/* Appends the histogram and response-code families in Prometheus text format to a
 * malloc'd string; NULL on ENOMEM. */
char *keel__srv_obs_render(srv_obs *o);

/* ---------------------------------------------------------------- W3C trace context */

/* A parsed `traceparent` header (W3C Trace Context, level 1). */
typedef struct srv_tracectx {
    char trace_id[33]; /* 32 lowercase hex digits, not all zero */
    char parent_id[17];
    uint8_t flags;
} srv_tracectx;

/* Parses a traceparent header value. False (out untouched) when it is malformed: wrong
 * length or separators, uppercase or non-hex digits, version ff, an all-zero trace or parent
 * id, or version 00 with trailing data. Later versions are read by their 00 prefix, as the
 * specification asks. Never fails on any input otherwise. */
bool keel__srv_traceparent_parse(const char *v, srv_tracectx *out);

/* A fresh span id, 16 lowercase hex digits plus NUL, never all zero. Lock-free. */
void keel__srv_span_id(char out[17]);

#endif
