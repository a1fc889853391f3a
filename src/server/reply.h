/*
 * reply.h: replies before they are sent, and the HTTP status of a keel error (reply.c).
 *
 * DESIGN
 * The lowest file of src/server/ that knows HTTP: callers fill an srv_reply here and server.c
 * sends it. No state, no lock; any thread.
 */
#ifndef KEEL_SERVER_REPLY_H
#define KEEL_SERVER_REPLY_H

#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

typedef struct keel_srv keel_srv;

/* A response to queue: body is malloc'd (free()) or NULL for an empty body. */
typedef struct srv_reply {
    unsigned status;
    char *body;
    size_t len;
    const char *ctype; /* static; NULL = none */
    const char *allow; /* static; NULL = none */
    bool pooled;       /* body is a server.c loop buffer (LOOP_BUF bytes; free() works too) */
} srv_reply;

/* Sets r to {"error": msg} with the given status. Never fails: on ENOMEM the body is NULL
 * and the sender substitutes a static message. */
void keel__srv_reply_error(srv_reply *r, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Serialises root (consumed) as the body of a 200 (or status) reply; 500 on failure. */
void keel__srv_reply_json(srv_reply *r, unsigned status, void *root /* json_t * */);
/* Sets an empty-bodied reply. */
void keel__srv_reply_empty(srv_reply *r, unsigned status);

/* The HTTP status for a keel error (see docs/OPERATIONS.md). */
unsigned keel__srv_http_status(keel_err err);

/* Fills r with the right 404/503 for a model (version -1 = any) that is not served: unknown,
 * unknown version, not loaded, loading or failed. Reads s->rt only. */
void keel__srv_reply_not_served(keel_srv *s, const char *model, int64_t version, srv_reply *r);

#endif
