/*
 * perf_client.h: a blocking keep-alive HTTP client (perf_client.c).
 *
 * DESIGN
 * One thread per perf_client; it borrows its target, which must outlive it.
 */
#ifndef KEEL_PERF_PERF_CLIENT_H
#define KEEL_PERF_PERF_CLIENT_H

#include <stdbool.h>
#include <stddef.h>

#include "perf_http.h"

typedef struct perf_client {
    const perf_target *t;
    int fd;
    char *buf;
    size_t len, cap;
} perf_client;

void perf_client_init(perf_client *c, const perf_target *t);
void perf_client_fini(perf_client *c);
/* One request; on success *status is the HTTP status and *body (owned by c, valid until the
 * next call, NUL-terminated) its decoded body. Reconnects when needed. Returns false with
 * errbuf filled on a transport error or timeout. */
bool perf_client_request(perf_client *c, const char *method, const char *path,
                         const char *content_type, const char *body, size_t body_len,
                         double timeout_s, int *status, const char **resp_body, size_t *resp_len,
                         char *errbuf, size_t errlen);

#endif
