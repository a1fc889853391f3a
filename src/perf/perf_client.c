/*
 * perf_client.c: one blocking keep-alive HTTP connection with timeouts, for the control
 * traffic of the load tools (model metadata, repository load/unload, /metrics scrapes).
 *
 * DESIGN
 * A perf_client is owned by one thread and owns its socket and buffer. Calls perf_http.c and
 * perf_util.c. No lock.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "perf_client.h"
#include "perf_http.h"
#include "perf_util.h"

void perf_client_init(perf_client *c, const perf_target *t)
{
    memset(c, 0, sizeof(*c));
    c->t = t;
    c->fd = -1;
}

void perf_client_fini(perf_client *c)
{
    if (c->fd != -1)
        close(c->fd);
    c->fd = -1;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
}

static bool wait_fd(int fd, short ev, double deadline)
{
    struct pollfd p = {.fd = fd, .events = ev};
    double left = deadline - perf_now();

    if (left <= 0)
        return false;
    return poll(&p, 1, (int)(left * 1000) + 1) == 1;
}

static bool write_all(int fd, const char *p, size_t n, double deadline)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!wait_fd(fd, POLLOUT, deadline))
                return false;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            return false;
        }
    }
    return true;
}

/* One attempt on the current (or a new) connection. *sent_nothing tells whether the failure
 * happened before any response byte arrived on a reused connection (safe to retry). */
static bool client_attempt(perf_client *c, const char *head, size_t head_len, const char *body,
                           size_t body_len, double deadline, perf_http_resp *r, ssize_t *total,
                           bool *retry, char *errbuf, size_t errlen)
{
    bool reused = c->fd != -1;

    *retry = false;
    if (c->fd == -1) {
        c->fd = perf_target_connect(c->t, false);
        if (c->fd == -1) {
            perf_errf(errbuf, errlen, "connect to %s:%s: %s", c->t->host, c->t->port,
                      strerror(errno));
            return false;
        }
    }
    if (!write_all(c->fd, head, head_len, deadline) ||
        (body_len > 0 && !write_all(c->fd, body, body_len, deadline))) {
        *retry = reused;
        perf_errf(errbuf, errlen, "send to %s:%s: %s", c->t->host, c->t->port,
                  errno != 0 ? strerror(errno) : "timed out");
        goto fail;
    }
    c->len = 0;
    for (;;) {
        ssize_t n;
        if (c->cap - c->len < 4096) {
            size_t ncap = c->cap == 0 ? 16384 : c->cap * 2;
            char *nb = realloc(c->buf, ncap);
            if (nb == NULL) {
                perf_errf(errbuf, errlen, "out of memory");
                goto fail;
            }
            c->buf = nb;
            c->cap = ncap;
        }
        if (!wait_fd(c->fd, POLLIN, deadline)) {
            perf_errf(errbuf, errlen, "no answer from %s:%s in time", c->t->host, c->t->port);
            goto fail;
        }
        n = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n == 0 && c->len > 0) {
                *total = perf_http_parse(c->buf, c->len, r);
                if (*total == 0 && r->until_close) {
                    *total = (ssize_t)c->len;
                    close(c->fd);
                    c->fd = -1;
                    return true;
                }
            }
            *retry = reused && c->len == 0;
            perf_errf(errbuf, errlen, "connection to %s:%s closed: %s", c->t->host, c->t->port,
                      n == 0 ? "end of stream" : strerror(errno));
            goto fail;
        }
        c->len += (size_t)n;
        *total = perf_http_parse(c->buf, c->len, r);
        if (*total < 0) {
            perf_errf(errbuf, errlen, "%s:%s did not answer HTTP", c->t->host, c->t->port);
            goto fail;
        }
        if (*total > 0)
            break;
    }
    if (r->close) {
        close(c->fd);
        c->fd = -1;
    }
    return true;
fail:
    if (c->fd != -1)
        close(c->fd);
    c->fd = -1;
    return false;
}

bool perf_client_request(perf_client *c, const char *method, const char *path,
                         const char *content_type, const char *body, size_t body_len,
                         double timeout_s, int *status, const char **resp_body, size_t *resp_len,
                         char *errbuf, size_t errlen)
{
    char head[1024];
    int hl;
    double deadline = perf_now() + timeout_s;
    perf_http_resp r;
    ssize_t total = 0;
    bool retry;
    char *out;

    hl = snprintf(
        head, sizeof(head), "%s %s HTTP/1.1\r\nHost: %s:%s\r\n%s%s%sContent-Length: %zu\r\n\r\n",
        method, path, c->t->host, c->t->port, content_type != NULL ? "Content-Type: " : "",
        content_type != NULL ? content_type : "", content_type != NULL ? "\r\n" : "", body_len);
    if (hl < 0 || (size_t)hl >= sizeof(head)) {
        perf_errf(errbuf, errlen, "path too long");
        return false;
    }
    if (!client_attempt(c, head, (size_t)hl, body, body_len, deadline, &r, &total, &retry, errbuf,
                        errlen)) {
        /* A kept-alive connection the server closed while idle: one fresh try. */
        if (!retry || !client_attempt(c, head, (size_t)hl, body, body_len, deadline, &r, &total,
                                      &retry, errbuf, errlen))
            return false;
    }
    /* Decode in place into a fresh buffer (the body is never longer than the raw bytes). */
    if ((out = malloc((size_t)total + 1)) == NULL) {
        perf_errf(errbuf, errlen, "out of memory");
        return false;
    }
    *resp_len = perf_http_body(c->buf, (size_t)total, &r, out);
    memcpy(c->buf, out, *resp_len + 1);
    free(out);
    *status = r.status;
    *resp_body = c->buf;
    return true;
}
