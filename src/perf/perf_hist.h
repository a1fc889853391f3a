/*
 * perf_hist.h: a latency histogram with 0.1 % relative precision (perf_hist.c).
 *
 * DESIGN
 * Not thread-safe; a histogram belongs to one thread (merge them afterwards).
 */
#ifndef KEEL_PERF_PERF_HIST_H
#define KEEL_PERF_PERF_HIST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PERF_HIST_SUB_BITS 11
#define PERF_HIST_HALF (1u << (PERF_HIST_SUB_BITS - 1))
#define PERF_HIST_BUCKETS ((64 - PERF_HIST_SUB_BITS + 2) * PERF_HIST_HALF)

typedef struct perf_hist {
    uint64_t *counts; /* PERF_HIST_BUCKETS */
    uint64_t total, min, max;
    double sum;
} perf_hist;

bool perf_hist_init(perf_hist *h);
void perf_hist_fini(perf_hist *h);
void perf_hist_reset(perf_hist *h);
void perf_hist_record(perf_hist *h, uint64_t v);
void perf_hist_merge(perf_hist *into, const perf_hist *from);
/* The smallest recorded value v such that at least q (0..1] of all values are <= v, within the
 * histogram's precision (never above the largest recorded value); 0 if nothing was recorded. */
uint64_t perf_hist_quantile(const perf_hist *h, double q);
/* Exposed for the unit test: bucket of a value and the lowest value of a bucket. */
size_t perf_hist_index(uint64_t v);
uint64_t perf_hist_lowest(size_t idx);

#endif
