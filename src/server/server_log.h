/*
 * server_log.h: logfmt lines on stderr for `keel serve` (server_log.c).
 *
 * DESIGN
 * The bottom of src/server/: calls nothing else in the module. Any thread; the level is set
 * once by keel__srv_log_init on the main thread before other threads start.
 */
#ifndef KEEL_SERVER_SERVER_LOG_H
#define KEEL_SERVER_SERVER_LOG_H

#include <stdbool.h>
#include <stddef.h>

#include "keel/keel.h"

void keel__srv_log_init(keel_log_level level);
bool keel__srv_log_on(keel_log_level level);
/* Logs one logfmt line: ts, level, msg, then key/value string pairs ending with NULL. Values
 * are quoted when they need it. */
void keel__srv_log(keel_log_level level, const char *msg, ...);
/* A keel_log_fn for the runtime (component=keel). */
void keel__srv_log_keel(void *user, keel_log_level level, const char *msg);
/* Formats a value into buf (for numbers in keel__srv_log calls). Returns buf. */
const char *keel__srv_fmt(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
