/*
 * server_guard.h: the checks of a request's first handler call (server_guard.c): the API
 * group of its route and the restricted-API keys, the raw request target, header counts; and
 * the redaction of repository paths from error replies.
 *
 * DESIGN
 * Below server.c, above reply.c and restrict.c/edge.c (which know nothing of libmicrohttpd).
 * Called on MHD threads; reads only what keel_server_run set before the daemon started.
 */
#ifndef KEEL_SERVER_SERVER_GUARD_H
#define KEEL_SERVER_SERVER_GUARD_H

#include "reply.h"
#include "restrict.h"
#include "server_internal.h"

#define KEEL_SRV_MAX_HEADERS 100 /* header fields of one request */

/* The API group of a route (KEEL_API_NONE for ROUTE_UNKNOWN). */
keel_api_group keel__srv_route_group(srv_route r);
/* The checks of a request's first handler call, after routing (url and version as MHD gave
 * them). Returns 0 to go on, or the status of the refusal with r filled; the caller sends it
 * and closes the connection. */
unsigned keel__srv_guard(keel_srv *s, srv_conn *c, const char *url, const char *version,
                         srv_reply *r);
/* Before an error reply is queued: removes repository paths from its body unless the route
 * belongs to the model-repository group. */
void keel__srv_guard_redact(keel_srv *s, const srv_conn *c, srv_reply *r);

#endif
