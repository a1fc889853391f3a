/*
 * perf_load.h: the load loop and its result (perf_load.c).
 *
 * DESIGN
 * perf_load_run runs on the calling thread until the duration passes or *stop is set (from
 * any thread).
 */
#ifndef KEEL_PERF_PERF_LOAD_H
#define KEEL_PERF_PERF_LOAD_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "perf_bodies.h"
#include "perf_hist.h"

enum {
    PERF_TERR_CONNECT,  /* connect failed */
    PERF_TERR_RESET,    /* the connection broke (reset, closed) with a request in flight */
    PERF_TERR_TIMEOUT,  /* no complete answer within the request timeout */
    PERF_TERR_PROTOCOL, /* the answer was not HTTP */
    PERF_TERR_COUNT_
};
const char *perf_terr_name(int kind);

#define PERF_MAX_STATUS 600
#define PERF_FAILURE_NOTES 8

typedef struct perf_result {
    perf_hist hist;     /* latency of successful (2xx) measured requests, in ns */
    double window_s;    /* measured window */
    uint64_t completed; /* answers (any status) received in the window */
    uint64_t ok;        /* 2xx answers to measured requests */
    uint64_t failed;    /* non-2xx answers plus transport errors of measured requests */
    uint64_t status[PERF_MAX_STATUS]; /* non-2xx answers by status */
    uint64_t grpc_status[17];         /* gRPC: answers other than OK by gRPC status code */
    uint64_t stream_errors;           /* gRPC streams: answers carrying an error_message */
    uint64_t terr[PERF_TERR_COUNT_];
    uint64_t unsent;    /* open loop: requests due in the window that were never sent */
    uint64_t max_conns; /* connections opened at most at once (gRPC: calls in flight) */
    double cpu_s;       /* CPU time (user + system) of the load loop's thread, whole run */
    double elapsed_s;   /* wall time of the whole run, warm-up and drain included */
    char notes[PERF_FAILURE_NOTES][200]; /* the first distinct failures, named */
    size_t nnotes;
} perf_result;

typedef struct perf_load_opts {
    unsigned concurrency;     /* closed loop: requests in flight */
    double rate;              /* > 0: open loop at this many requests per second */
    unsigned max_connections; /* open loop: connection pool bound */
    double warmup_s;
    double duration_s;       /* measured seconds; 0 = until *stop */
    const atomic_bool *stop; /* may be NULL */
    double timeout_s;        /* per request */
    bool progress;           /* a progress line on stderr (only if it is a terminal) */
    const char *label;       /* for the progress line */
    unsigned grpc_channels;  /* gRPC: channels (HTTP/2 connections) the calls share; 0 = 1 */
} perf_load_opts;

bool perf_result_init(perf_result *r);
void perf_result_fini(perf_result *r);
/* Runs the load on w (over gRPC when w->grpc: perf_grpc.c's loop); fills *r (initialised by the
 * caller). Returns false (errbuf) only if the loop itself could not run (no epoll, no memory);
 * request failures are counted in *r. */
bool perf_load_run(const perf_workload *w, const perf_load_opts *o, perf_result *r, char *errbuf,
                   size_t errlen);
/* "404:12;reset:1" or "UNAVAILABLE:3;stream_error:1" (or "" if none) into buf. */
void perf_result_errors(const perf_result *r, char *buf, size_t len);

#endif
