/*
 * perf_util.h: the clock and the error-text helper of the load tools (perf_util.c).
 *
 * DESIGN
 * The bottom of src/perf/ (order, top to bottom: perf_load, perf_bodies, perf_grpc,
 * perf_client, perf_http, perf_hist, perf_util; each file calls only files below it). No
 * state; any thread.
 */
#ifndef KEEL_PERF_PERF_UTIL_H
#define KEEL_PERF_PERF_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Formats into buf (len bytes, NUL-terminated); does nothing if buf is NULL or len 0. */
void perf_errf(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
uint64_t perf_now_ns(void); /* CLOCK_MONOTONIC nanoseconds */
double perf_now(void);      /* CLOCK_MONOTONIC seconds */

/* Keeps the first few distinct failure descriptions: appends the formatted text (newlines and
 * tabs turned into spaces) to notes[0..max) unless it is there already or *n == max. */
void perf_note(char (*notes)[200], size_t *n, size_t max, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
