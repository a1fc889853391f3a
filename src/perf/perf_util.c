/*
 * perf_util.c: the clock and the error-text helper of the load tools.
 *
 * DESIGN
 * The bottom of src/perf/: every other file of the library calls it, it calls only libc. No
 * state, no lock; any thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "perf_util.h"

void perf_errf(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (buf == NULL || len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

uint64_t perf_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double perf_now(void)
{
    return (double)perf_now_ns() / 1e9;
}
