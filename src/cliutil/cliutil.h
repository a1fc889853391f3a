/*
 * cliutil.h: the command-line helpers every keel command shares (cliutil.c): the usage-error
 * message and the number parsers.
 *
 * DESIGN
 * A module of its own below src/cli (keel, keel perf, keel soak) and src/server (keel serve's
 * options), so both use one copy without the server reaching into the CLI: it depends on
 * nothing but libc, and keel serve still includes only the public header, its own headers
 * and this one. No state, no lock; any thread (the commands call it from main).
 */
#ifndef KEEL_CLIUTIL_CLIUTIL_H
#define KEEL_CLIUTIL_CLIUTIL_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Prints "<prog>: <why>" and "Try '<prog> --help'." on stderr; returns code (the command's
 * usage exit status). */
int keel__cli_usage_error(const char *prog, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A decimal integer (digits only) in [min, max]. */
bool keel__cli_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out);
/* A number strtod accepts, all of s, in [min, max]. */
bool keel__cli_parse_double(const char *s, double min, double max, double *out);
/* A whole byte count (digits only) with an optional binary suffix k, m or g (either case),
 * in [min, max]. */
bool keel__cli_parse_bytes(const char *s, uint64_t min, uint64_t max, uint64_t *out);

/* Turns off Abseil's debug-mode deadlock detection in gRPC's mutexes, as in Abseil's release
 * builds (absl_mode.cpp). Call once before grpc_init; any thread, idempotent. */
void keel__cli_absl_release_mode(void);

#ifdef __cplusplus
}
#endif

#endif
