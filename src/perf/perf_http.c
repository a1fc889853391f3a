/*
 * perf_http.c: the HTTP/1.1 response framer and the target (URL parsing, resolving,
 * connecting) of the load tools.
 *
 * DESIGN
 * perf_http_parse is stateless: it is given the whole buffer each time and says whether a
 * complete response (status, Content-Length, chunked, Connection: close) is in it; responses
 * here are small, so re-parsing the head is cheap. Calls perf_util.c and src/cliutil (the
 * port number). No state, no lock; any thread.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cliutil.h"
#include "perf_http.h"
#include "perf_util.h"

static const char *find_crlf(const char *p, const char *end)
{
    for (; p + 1 < end; p++) {
        if (p[0] == '\r' && p[1] == '\n')
            return p;
    }
    return NULL;
}

/* Case-insensitive "name:" match at the start of a header line; returns the value start. */
static const char *header_value(const char *line, const char *eol, const char *name)
{
    size_t n = strlen(name);
    const char *v;

    if ((size_t)(eol - line) <= n || strncasecmp(line, name, n) != 0 || line[n] != ':')
        return NULL;
    for (v = line + n + 1; v < eol && (*v == ' ' || *v == '\t'); v++)
        ;
    return v;
}

static bool value_has_token(const char *v, const char *eol, const char *token)
{
    size_t n = strlen(token);

    for (const char *p = v; p + n <= eol; p++) {
        if (strncasecmp(p, token, n) == 0)
            return true;
    }
    return false;
}

ssize_t perf_http_parse(const char *buf, size_t len, perf_http_resp *r)
{
    const char *p = buf, *end = buf + len, *eol;
    bool have_length = false, http10;
    unsigned long long clen = 0;

    memset(r, 0, sizeof(*r));
    if (len >= 5 && memcmp(buf, "HTTP/", 5) != 0)
        return -1;
    if (len < 5 && memcmp(buf, "HTTP/", len) != 0)
        return -1;
    if ((eol = find_crlf(p, end)) == NULL)
        return len > 8192 ? -1 : 0;
    if (eol - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ' ||
        !isdigit((unsigned char)p[9]) || !isdigit((unsigned char)p[10]) ||
        !isdigit((unsigned char)p[11]))
        return -1;
    http10 = p[7] == '0';
    r->close = http10;
    r->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    for (p = eol + 2;; p = eol + 2) {
        const char *v;
        if ((eol = find_crlf(p, end)) == NULL)
            return (size_t)(end - buf) > 65536 ? -1 : 0;
        if (eol == p)
            break; /* end of the head */
        if ((v = header_value(p, eol, "content-length")) != NULL) {
            char *e;
            errno = 0;
            clen = strtoull(v, &e, 10);
            if (e == v || errno != 0 || clen > (UINT64_C(1) << 40))
                return -1;
            have_length = true;
        } else if ((v = header_value(p, eol, "transfer-encoding")) != NULL) {
            r->chunked = value_has_token(v, eol, "chunked");
        } else if ((v = header_value(p, eol, "connection")) != NULL) {
            if (value_has_token(v, eol, "close"))
                r->close = true;
            else if (value_has_token(v, eol, "keep-alive"))
                r->close = false;
        }
    }
    p = eol + 2;
    r->body_off = (size_t)(p - buf);
    if (r->status / 100 == 1 || r->status == 204 || r->status == 304)
        return (ssize_t)r->body_off;
    if (r->chunked) {
        size_t total = 0;
        for (;;) {
            char *e;
            unsigned long long n;
            if ((eol = find_crlf(p, end)) == NULL)
                return 0;
            errno = 0;
            n = strtoull(p, &e, 16);
            if (e == p || errno != 0 || n > (UINT64_C(1) << 40))
                return -1;
            p = eol + 2;
            if (n == 0) {
                /* Trailers (usually none), then an empty line. */
                for (;;) {
                    if ((eol = find_crlf(p, end)) == NULL)
                        return 0;
                    if (eol == p) {
                        r->body_len = total;
                        return (ssize_t)(eol + 2 - buf);
                    }
                    p = eol + 2;
                }
            }
            if ((size_t)(end - p) < n + 2)
                return 0;
            if (p[n] != '\r' || p[n + 1] != '\n')
                return -1;
            total += n;
            p += n + 2;
        }
    }
    if (have_length) {
        r->body_len = (size_t)clen;
        if ((size_t)(end - p) < clen)
            return 0;
        return (ssize_t)(r->body_off + clen);
    }
    r->until_close = true;
    r->close = true;
    return 0;
}

/* Copies the decoded body of a complete response into out (for chunked bodies, without the
 * chunk framing); returns its length. out must hold r->body_len + 1 bytes. */
size_t perf_http_body(const char *buf, size_t len, const perf_http_resp *r, char *out)
{
    const char *p = buf + r->body_off, *end = buf + len;
    size_t n = 0;

    if (!r->chunked) {
        n = r->until_close ? len - r->body_off : r->body_len;
        memcpy(out, p, n);
        out[n] = '\0';
        return n;
    }
    for (;;) {
        const char *eol = find_crlf(p, end);
        unsigned long long c;
        if (eol == NULL)
            break;
        c = strtoull(p, NULL, 16);
        p = eol + 2;
        if (c == 0 || (size_t)(end - p) < c)
            break;
        memcpy(out + n, p, c);
        n += c;
        p += c + 2;
    }
    out[n] = '\0';
    return n;
}

/* ---------------------------------------------------------------- target */

bool perf_target_parse(const char *url, perf_target *t, char *errbuf, size_t errlen)
{
    const char *s = url, *colon, *hend;
    struct addrinfo hints, *res = NULL;
    size_t hlen;
    int rc;

    memset(t, 0, sizeof(*t));
    if (strncmp(s, "http://", 7) == 0)
        s += 7;
    else if (strstr(s, "://") != NULL) {
        perf_errf(errbuf, errlen, "'%s': only http:// is supported", url);
        return false;
    }
    if (s[0] == '[') {
        hend = strchr(s, ']');
        if (hend == NULL || hend[1] != ':') {
            perf_errf(errbuf, errlen, "'%s': expected [ADDRESS]:PORT", url);
            return false;
        }
        colon = hend + 1;
        s++;
    } else {
        colon = strchr(s, ':');
        if (colon == NULL) {
            perf_errf(errbuf, errlen, "'%s': expected HOST:PORT", url);
            return false;
        }
        hend = colon;
    }
    hlen = (size_t)(hend - s);
    if (hlen == 0 || hlen >= sizeof(t->host)) {
        perf_errf(errbuf, errlen, "'%s': bad host", url);
        return false;
    }
    memcpy(t->host, s, hlen);
    {
        const char *pe = colon + 1;
        size_t plen = strcspn(pe, "/");
        uint64_t port;
        if (plen == 0 || plen >= sizeof(t->port) || strspn(pe + plen, "/") != strlen(pe + plen)) {
            perf_errf(errbuf, errlen, "'%s': bad port (a path is not allowed)", url);
            return false;
        }
        memcpy(t->port, pe, plen);
        if (!keel__cli_parse_u64(t->port, 1, 65535, &port)) {
            perf_errf(errbuf, errlen, "'%s': bad port", url);
            return false;
        }
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if ((rc = getaddrinfo(t->host, t->port, &hints, &res)) != 0 || res == NULL) {
        perf_errf(errbuf, errlen, "%s: %s", t->host, gai_strerror(rc));
        return false;
    }
    memcpy(&t->addr, res->ai_addr, res->ai_addrlen);
    t->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return true;
}

int perf_target_connect(const perf_target *t, bool nonblock)
{
    int fd, one = 1;

    fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        return -1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (const struct sockaddr *)&t->addr, t->addrlen) != 0 &&
        !(nonblock && errno == EINPROGRESS)) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}
