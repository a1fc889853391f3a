/*
 * perf_util.c: the clock and the error-text helper of the load tools.
 *
 * DESIGN
 * The bottom of src/perf/: every other file of the library calls it, it calls only libc. No
 * state, no lock; any thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
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

void perf_note(char (*notes)[200], size_t *n, size_t max, const char *fmt, ...)
{
    char tmp[200];
    va_list ap;

    if (*n >= max)
        return;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    for (char *p = tmp; *p != '\0'; p++) {
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    }
    for (size_t i = 0; i < *n; i++) {
        if (strcmp(notes[i], tmp) == 0)
            return;
    }
    snprintf(notes[(*n)++], sizeof(notes[0]), "%s", tmp);
}
