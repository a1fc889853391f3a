/*
 * perf_http.h: the HTTP/1.1 response framer and the target address (perf_http.c).
 *
 * DESIGN
 * Stateless functions; any thread.
 */
#ifndef KEEL_PERF_PERF_HTTP_H
#define KEEL_PERF_PERF_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

typedef struct perf_http_resp {
    int status;
    size_t body_off; /* offset of the body (content-length) or of the first chunk header */
    size_t body_len; /* content-length bodies: its length; chunked: the decoded length */
    bool chunked;
    bool close;       /* "Connection: close" or HTTP/1.0 without keep-alive */
    bool until_close; /* neither length nor chunked: the body ends when the peer closes */
} perf_http_resp;

/* Returns the length of the complete response at the start of buf (> 0), 0 if more bytes are
 * needed, or -1 if the bytes are not an HTTP/1.x response. */
ssize_t perf_http_parse(const char *buf, size_t len, perf_http_resp *r);
/* Copies the body of the complete response r (perf_http_parse said so) at buf, decoded if it
 * is chunked, into out, which has room for it plus a NUL. Returns its length. */
size_t perf_http_body(const char *buf, size_t len, const perf_http_resp *r, char *out);

/* ---------------------------------------------------------------- target */

typedef struct perf_target {
    char host[256];
    char port[16];
    struct sockaddr_storage addr;
    socklen_t addrlen;
} perf_target;

/* Parses "HOST:PORT", "http://HOST:PORT[/]" or "[V6]:PORT" and resolves it. errbuf gets why. */
bool perf_target_parse(const char *url, perf_target *t, char *errbuf, size_t errlen);
/* A non-blocking (nonblock) or blocking TCP socket connecting to t, TCP_NODELAY set;
 * -1 with errno on failure. A non-blocking connect may still be in progress. */
int perf_target_connect(const perf_target *t, bool nonblock);

#endif
