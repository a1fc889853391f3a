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
/* What one pass over a request's header fields found (keel__srv_headers_scan, after routing):
 * the guard's count and restricted-key check, the body's framing, and the values the handler
 * reads. The values point into MHD's copy of the headers, valid until the request completes;
 * for each name the first field counts, as MHD_lookup_connection_value would return it. One
 * pass instead of a walk of the list per header read (about 600 instructions a request). */
typedef struct srv_headers {
    keel_restrict_check check;
    unsigned count;
    unsigned content_length_n; /* Content-Length fields */
    unsigned transfer_encoding_n;
    const char *content_length;
    const char *traceparent;
    const char *header_length; /* Inference-Header-Content-Length */
} srv_headers;

/* The pass, for c (its route known). */
void keel__srv_headers_scan(keel_srv *s, srv_conn *c, srv_headers *h);
/* The checks of a request's first handler call, after routing and the headers' pass (url and
 * version as MHD gave them). Returns 0 to go on, or the status of the refusal with r filled;
 * the caller sends it and closes the connection. */
unsigned keel__srv_guard(keel_srv *s, srv_conn *c, const srv_headers *h, const char *url,
                         const char *version, srv_reply *r);
/* Before an error reply is queued: removes repository paths from its body unless the route
 * belongs to the model-repository group. */
void keel__srv_guard_redact(keel_srv *s, const srv_conn *c, srv_reply *r);

#endif
