/*
 * perf_hist.c: the latency histogram of the load tools.
 *
 * DESIGN
 * Fixed relative precision (log-linear buckets in the manner of HdrHistogram: values below
 * 2^11 exactly, above that 1024 buckets per power of two, so every recorded value is known
 * within 0.1 %). Written here because Debian has no C package of HdrHistogram. Calls nothing
 * else in src/perf/. Not thread-safe: each load loop owns its own histogram.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "perf_hist.h"

size_t perf_hist_index(uint64_t v)
{
    unsigned bits, shift;

    if (v < (UINT64_C(1) << PERF_HIST_SUB_BITS))
        return (size_t)v;
    bits = 64u - (unsigned)__builtin_clzll(v);
    shift = bits - PERF_HIST_SUB_BITS;
    return (size_t)shift * PERF_HIST_HALF + (size_t)(v >> shift);
}

uint64_t perf_hist_lowest(size_t idx)
{
    size_t shift;

    if (idx < 2 * PERF_HIST_HALF)
        return idx;
    shift = idx / PERF_HIST_HALF - 1;
    return (uint64_t)(idx - shift * PERF_HIST_HALF) << shift;
}

/* The highest value that lands in bucket idx. */
static uint64_t hist_highest(size_t idx)
{
    size_t shift;

    if (idx < 2 * PERF_HIST_HALF)
        return idx;
    shift = idx / PERF_HIST_HALF - 1;
    return perf_hist_lowest(idx) + ((UINT64_C(1) << shift) - 1);
}

bool perf_hist_init(perf_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->counts = calloc(PERF_HIST_BUCKETS, sizeof(*h->counts));
    h->min = UINT64_MAX;
    return h->counts != NULL;
}

void perf_hist_fini(perf_hist *h)
{
    free(h->counts);
    h->counts = NULL;
}

void perf_hist_reset(perf_hist *h)
{
    memset(h->counts, 0, PERF_HIST_BUCKETS * sizeof(*h->counts));
    h->total = 0;
    h->min = UINT64_MAX;
    h->max = 0;
    h->sum = 0;
}

void perf_hist_record(perf_hist *h, uint64_t v)
{
    h->counts[perf_hist_index(v)]++;
    h->total++;
    h->sum += (double)v;
    if (v < h->min)
        h->min = v;
    if (v > h->max)
        h->max = v;
}

void perf_hist_merge(perf_hist *into, const perf_hist *from)
{
    for (size_t i = 0; i < PERF_HIST_BUCKETS; i++)
        into->counts[i] += from->counts[i];
    into->total += from->total;
    into->sum += from->sum;
    if (from->min < into->min)
        into->min = from->min;
    if (from->max > into->max)
        into->max = from->max;
}

uint64_t perf_hist_quantile(const perf_hist *h, double q)
{
    uint64_t rank, seen = 0;

    if (h->total == 0)
        return 0;
    if (q >= 1.0)
        return h->max;
    rank = (uint64_t)ceil(q * (double)h->total);
    if (rank < 1)
        rank = 1;
    for (size_t i = 0; i < PERF_HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t v = hist_highest(i);
            if (v > h->max)
                v = h->max;
            if (v < h->min)
                v = h->min;
            return v;
        }
    }
    return h->max;
}
