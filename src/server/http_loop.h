/*
 * http_loop.h: the HTTP event loops (http_loop.c): the listening socket and one
 * libmicrohttpd daemon per --http-threads, each run by its own thread, which runs the
 * batches its requests gathered at the end of every turn.
 */
#ifndef KEEL_SERVER_HTTP_LOOP_H
#define KEEL_SERVER_HTTP_LOOP_H

#include <microhttpd.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

typedef struct srv_http srv_http;
typedef struct srv_http_loop srv_http_loop;

/* What server.c gives every daemon: the access handler, the request-completed and URI
 * callbacks, MHD's logger, and the closure they all share. */
typedef struct srv_http_cbs {
    MHD_AccessHandlerCallback on_request;
    MHD_RequestCompletedCallback on_completed;
    void *(*on_uri)(void *cls, const char *uri, struct MHD_Connection *mc);
    MHD_LogCallback log;
    /* Called by a loop thread after each turn (server.c runs the gathered batches). */
    void (*after_turn)(void *cls);
    /* On a loop thread: requests it gathered in the current turn, not yet run. */
    unsigned (*gathered)(void *cls);
    void *cls;
} srv_http_cbs;

/* The daemons' settings (from keel serve's options). */
typedef struct srv_http_opts {
    const struct sockaddr *addr; /* IPv4 or IPv6; port 0 = any free port */
    socklen_t addrlen;
    unsigned threads;         /* loops, >= 1 */
    unsigned max_connections; /* split between the loops */
    unsigned timeout_secs;    /* idle connections are closed after this; 0 = never */
    size_t connection_memory; /* MHD's per-connection pool */
    int strictness;           /* MHD_OPTION_STRICT_FOR_CLIENT */
} srv_http_opts;

/* Opens the listening socket, starts the daemons and their threads. On failure returns NULL
 * with the reason in err (a busy port: "address in use"). *port is the bound port. */
srv_http *keel__http_start(const srv_http_opts *o, const srv_http_cbs *cbs, unsigned *port,
                           char *err, size_t errlen);

/* Stops accepting: every daemon is quiesced and the listening socket shut down, so connects
 * are refused at once; connections already accepted are still served. Main thread. */
void keel__http_quiesce(srv_http *h);

/* The loop the calling thread runs (the one calling the access handler), NULL elsewhere. */
srv_http_loop *keel__http_current(void);

/* MHD_resume_connection(mc), mc being a connection of loop l, and wakes l if the caller is
 * another thread. After it, mc may be gone. Any thread. */
void keel__http_resume(srv_http_loop *l, struct MHD_Connection *mc);

/* Connections open in every daemon. Any thread. */
size_t keel__http_connections(srv_http *h);

/* Ends the loops (joined), stops the daemons (every connection closed) and closes the
 * listening socket. NULL-safe. Main thread, once. */
void keel__http_stop(srv_http *h);

#endif
