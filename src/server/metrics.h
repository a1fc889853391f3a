/*
 * metrics.h: GET /metrics, the Prometheus exposition text (metrics.c).
 *
 * DESIGN
 * Called by server_routes.c on MHD threads; reads libkeel's statistics and keel_srv's atomic
 * counters, takes no server lock.
 */
#ifndef KEEL_SERVER_METRICS_H
#define KEEL_SERVER_METRICS_H

#include <stddef.h>

#include "server_internal.h"

/* The exposition text; malloc'd (the caller frees it), NULL on ENOMEM. */
char *keel__srv_metrics_render(keel_srv *s, size_t *len);

#endif
