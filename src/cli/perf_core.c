/*
 * perf_core.c: histogram, HTTP framing, blocking client, request bodies and the epoll load
 * loop shared by `keel perf` and `keel soak`.
 *
 * DESIGN
 * See perf_internal.h for the parts. Everything here is a client of the server's HTTP API and
 * of nothing in libkeel but its public datatype helpers. The load loop is single-threaded and
 * owns its sockets, histogram and buffers; perf_client objects are owned by one thread each.
 * Time is CLOCK_MONOTONIC nanoseconds throughout the loop.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "keel/keel.h"
#include "perf_internal.h"

static void errf(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void errf(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (buf == NULL || len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double perf_now(void)
{
    return (double)now_ns() / 1e9;
}

bool perf_parse_double(const char *s, double min, double max, double *out)
{
    char *end;
    double v;

    errno = 0;
    v = strtod(s, &end);
    if (end == s || *end != '\0' || errno != 0 || !(v >= min && v <= max))
        return false;
    *out = v;
    return true;
}

bool perf_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v;

    if (s[0] < '0' || s[0] > '9')
        return false;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return false;
    *out = v;
    return true;
}

/* ---------------------------------------------------------------- histogram */

size_t perf_hist_index(uint64_t v)
{
    unsigned bits, shift;

    if (v < (UINT64_C(1) << PERF_HIST_SUB_BITS))
        return (size_t)v;
    bits = 64u - (unsigned)__builtin_clzll(v);
    shift = bits - PERF_HIST_SUB_BITS;
    return (size_t)shift * PERF_HIST_HALF + (size_t)(v >> shift);
}

uint64_t perf_hist_lowest(size_t idx)
{
    size_t shift;

    if (idx < 2 * PERF_HIST_HALF)
        return idx;
    shift = idx / PERF_HIST_HALF - 1;
    return (uint64_t)(idx - shift * PERF_HIST_HALF) << shift;
}

/* The highest value that lands in bucket idx. */
static uint64_t hist_highest(size_t idx)
{
    size_t shift;

    if (idx < 2 * PERF_HIST_HALF)
        return idx;
    shift = idx / PERF_HIST_HALF - 1;
    return perf_hist_lowest(idx) + ((UINT64_C(1) << shift) - 1);
}

bool perf_hist_init(perf_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->counts = calloc(PERF_HIST_BUCKETS, sizeof(*h->counts));
    h->min = UINT64_MAX;
    return h->counts != NULL;
}

void perf_hist_fini(perf_hist *h)
{
    free(h->counts);
    h->counts = NULL;
}

void perf_hist_reset(perf_hist *h)
{
    memset(h->counts, 0, PERF_HIST_BUCKETS * sizeof(*h->counts));
    h->total = 0;
    h->min = UINT64_MAX;
    h->max = 0;
    h->sum = 0;
}

void perf_hist_record(perf_hist *h, uint64_t v)
{
    h->counts[perf_hist_index(v)]++;
    h->total++;
    h->sum += (double)v;
    if (v < h->min)
        h->min = v;
    if (v > h->max)
        h->max = v;
}

void perf_hist_merge(perf_hist *into, const perf_hist *from)
{
    for (size_t i = 0; i < PERF_HIST_BUCKETS; i++)
        into->counts[i] += from->counts[i];
    into->total += from->total;
    into->sum += from->sum;
    if (from->min < into->min)
        into->min = from->min;
    if (from->max > into->max)
        into->max = from->max;
}

uint64_t perf_hist_quantile(const perf_hist *h, double q)
{
    uint64_t rank, seen = 0;

    if (h->total == 0)
        return 0;
    if (q >= 1.0)
        return h->max;
    rank = (uint64_t)ceil(q * (double)h->total);
    if (rank < 1)
        rank = 1;
    for (size_t i = 0; i < PERF_HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t v = hist_highest(i);
            if (v > h->max)
                v = h->max;
            if (v < h->min)
                v = h->min;
            return v;
        }
    }
    return h->max;
}

/* ---------------------------------------------------------------- HTTP framing */

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
static size_t http_body(const char *buf, size_t len, const perf_http_resp *r, char *out)
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
        errf(errbuf, errlen, "'%s': only http:// is supported", url);
        return false;
    }
    if (s[0] == '[') {
        hend = strchr(s, ']');
        if (hend == NULL || hend[1] != ':') {
            errf(errbuf, errlen, "'%s': expected [ADDRESS]:PORT", url);
            return false;
        }
        colon = hend + 1;
        s++;
    } else {
        colon = strchr(s, ':');
        if (colon == NULL) {
            errf(errbuf, errlen, "'%s': expected HOST:PORT", url);
            return false;
        }
        hend = colon;
    }
    hlen = (size_t)(hend - s);
    if (hlen == 0 || hlen >= sizeof(t->host)) {
        errf(errbuf, errlen, "'%s': bad host", url);
        return false;
    }
    memcpy(t->host, s, hlen);
    {
        const char *pe = colon + 1;
        size_t plen = strcspn(pe, "/");
        uint64_t port;
        if (plen == 0 || plen >= sizeof(t->port) || strspn(pe + plen, "/") != strlen(pe + plen)) {
            errf(errbuf, errlen, "'%s': bad port (a path is not allowed)", url);
            return false;
        }
        memcpy(t->port, pe, plen);
        if (!perf_parse_u64(t->port, 1, 65535, &port)) {
            errf(errbuf, errlen, "'%s': bad port", url);
            return false;
        }
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if ((rc = getaddrinfo(t->host, t->port, &hints, &res)) != 0 || res == NULL) {
        errf(errbuf, errlen, "%s: %s", t->host, gai_strerror(rc));
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

/* ---------------------------------------------------------------- blocking client */

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
            errf(errbuf, errlen, "connect to %s:%s: %s", c->t->host, c->t->port, strerror(errno));
            return false;
        }
    }
    if (!write_all(c->fd, head, head_len, deadline) ||
        (body_len > 0 && !write_all(c->fd, body, body_len, deadline))) {
        *retry = reused;
        errf(errbuf, errlen, "send to %s:%s: %s", c->t->host, c->t->port,
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
                errf(errbuf, errlen, "out of memory");
                goto fail;
            }
            c->buf = nb;
            c->cap = ncap;
        }
        if (!wait_fd(c->fd, POLLIN, deadline)) {
            errf(errbuf, errlen, "no answer from %s:%s in time", c->t->host, c->t->port);
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
            errf(errbuf, errlen, "connection to %s:%s closed: %s", c->t->host, c->t->port,
                 n == 0 ? "end of stream" : strerror(errno));
            goto fail;
        }
        c->len += (size_t)n;
        *total = perf_http_parse(c->buf, c->len, r);
        if (*total < 0) {
            errf(errbuf, errlen, "%s:%s did not answer HTTP", c->t->host, c->t->port);
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
        errf(errbuf, errlen, "path too long");
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
        errf(errbuf, errlen, "out of memory");
        return false;
    }
    *resp_len = http_body(c->buf, (size_t)total, &r, out);
    memcpy(c->buf, out, *resp_len + 1);
    free(out);
    *status = r.status;
    *resp_body = c->buf;
    return true;
}

/* ---------------------------------------------------------------- request bodies */

bool perf_input_spec_parse(const char *s, perf_input_spec *spec)
{
    const char *c1 = strchr(s, ':'), *c2, *p;
    size_t n;

    memset(spec, 0, sizeof(*spec));
    if (c1 == NULL || (c2 = strchr(c1 + 1, ':')) == NULL)
        return false;
    n = (size_t)(c1 - s);
    if (n == 0 || n >= sizeof(spec->name))
        return false;
    memcpy(spec->name, s, n);
    n = (size_t)(c2 - c1 - 1);
    if (n == 0 || n >= sizeof(spec->datatype))
        return false;
    memcpy(spec->datatype, c1 + 1, n);
    if (keel_datatype_from_name(spec->datatype) == KEEL_TYPE_INVALID ||
        keel_datatype_from_name(spec->datatype) == KEEL_TYPE_BYTES)
        return false;
    for (p = c2 + 1; *p != '\0';) {
        char *e;
        long long d;
        if (spec->ndims == sizeof(spec->dims) / sizeof(spec->dims[0]))
            return false;
        errno = 0;
        d = strtoll(p, &e, 10);
        if (e == p || errno != 0 || d < 1 || d > (1 << 30))
            return false;
        spec->dims[spec->ndims++] = d;
        p = e;
        if (*p == 'x')
            p++;
        else if (*p != '\0')
            return false;
    }
    return spec->ndims > 0;
}

/* Reads the inputs of the model's metadata (GET /v2/models/M[/versions/V]). The batch
 * dimension (-1 first, when the model batches) becomes w->batch; any other -1 becomes 1. */
static bool fetch_inputs(perf_workload *w, char *errbuf, size_t errlen)
{
    perf_client c;
    char path[512];
    const char *body;
    size_t len;
    int status;
    json_t *doc = NULL, *inputs, *in;
    json_error_t jerr;
    size_t i;
    bool ok = false;

    perf_client_init(&c, &w->target);
    if (w->version != NULL)
        snprintf(path, sizeof(path), "/v2/models/%s/versions/%s", w->model, w->version);
    else
        snprintf(path, sizeof(path), "/v2/models/%s", w->model);
    if (!perf_client_request(&c, "GET", path, NULL, NULL, 0, 30, &status, &body, &len, errbuf,
                             errlen))
        goto done;
    if (status != 200) {
        errf(errbuf, errlen, "GET %s: HTTP %d: %.200s", path, status, body);
        goto done;
    }
    if ((doc = json_loadb(body, len, 0, &jerr)) == NULL ||
        !json_is_array(inputs = json_object_get(doc, "inputs")) || json_array_size(inputs) == 0) {
        errf(errbuf, errlen, "GET %s: no inputs in the model metadata", path);
        goto done;
    }
    if (json_array_size(inputs) > sizeof(w->inputs) / sizeof(w->inputs[0])) {
        errf(errbuf, errlen, "the model has more than %zu inputs",
             sizeof(w->inputs) / sizeof(w->inputs[0]));
        goto done;
    }
    json_array_foreach (inputs, i, in) {
        perf_input_spec *s = &w->inputs[i];
        const char *name = json_string_value(json_object_get(in, "name"));
        const char *dt = json_string_value(json_object_get(in, "datatype"));
        json_t *shape = json_object_get(in, "shape"), *d;
        size_t j;
        memset(s, 0, sizeof(*s));
        if (name == NULL || dt == NULL || !json_is_array(shape) ||
            strlen(name) >= sizeof(s->name) || strlen(dt) >= sizeof(s->datatype) ||
            json_array_size(shape) > sizeof(s->dims) / sizeof(s->dims[0])) {
            errf(errbuf, errlen, "GET %s: input %zu is not {name, datatype, shape}", path, i);
            goto done;
        }
        strcpy(s->name, name);
        strcpy(s->datatype, dt);
        if (keel_datatype_from_name(dt) == KEEL_TYPE_INVALID ||
            keel_datatype_from_name(dt) == KEEL_TYPE_BYTES) {
            errf(errbuf, errlen, "input %s: datatype %s is not supported by keel perf", name, dt);
            goto done;
        }
        json_array_foreach (shape, j, d) {
            json_int_t v = json_integer_value(d);
            if (j == 0 && v == -1)
                v = w->batch;
            else if (v == -1)
                v = 1;
            else if (j == 0 && w->batch != 1 && json_array_size(shape) > 0) {
                /* Not a batching model: a batch size other than 1 cannot be honoured. */
                errf(errbuf, errlen,
                     "input %s has no batch dimension (shape starts with %lld); use "
                     "--batch-size 1",
                     name, (long long)v);
                goto done;
            }
            if (v < 1) {
                errf(errbuf, errlen, "input %s: bad dimension %lld", name, (long long)v);
                goto done;
            }
            s->dims[s->ndims++] = v;
        }
        if (s->ndims == 0)
            s->dims[s->ndims++] = 1;
    }
    w->ninputs = json_array_size(inputs);
    ok = true;
done:
    json_decref(doc);
    perf_client_fini(&c);
    return ok;
}

typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static void sb_reserve(sbuf *b, size_t n)
{
    if (b->oom || b->cap - b->len > n)
        return;
    size_t ncap = b->cap == 0 ? 4096 : b->cap;
    while (ncap - b->len <= n)
        ncap *= 2;
    char *np = realloc(b->p, ncap);
    if (np == NULL) {
        b->oom = true;
        return;
    }
    b->p = np;
    b->cap = ncap;
}

static void sb_add(sbuf *b, const void *p, size_t n)
{
    sb_reserve(b, n + 1);
    if (b->oom)
        return;
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    char tmp[512];
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(tmp)) {
        b->oom = true;
        return;
    }
    sb_add(b, tmp, (size_t)n);
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Rows of numbers from a file: one per line, blanks between numbers, '#' comments. */
static bool read_rows(const char *path, double **out, size_t *nvals, char *errbuf, size_t errlen)
{
    FILE *f = fopen(path, "re");
    char line[65536];
    double *v = NULL;
    size_t n = 0, cap = 0;

    if (f == NULL) {
        errf(errbuf, errlen, "%s: %s", path, strerror(errno));
        return false;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char *p = line, *e;
        while (isspace((unsigned char)*p))
            p++;
        if (*p == '#' || *p == '\0')
            continue;
        for (;;) {
            double x;
            while (isspace((unsigned char)*p) || *p == ',')
                p++;
            if (*p == '\0')
                break;
            x = strtod(p, &e);
            if (e == p) {
                errf(errbuf, errlen, "%s: not a number near '%.20s'", path, p);
                free(v);
                fclose(f);
                return false;
            }
            p = e;
            if (n == cap) {
                size_t ncap = cap == 0 ? 1024 : cap * 2;
                double *nv = realloc(v, ncap * sizeof(*v));
                if (nv == NULL) {
                    free(v);
                    fclose(f);
                    errf(errbuf, errlen, "out of memory");
                    return false;
                }
                v = nv;
                cap = ncap;
            }
            v[n++] = x;
        }
    }
    fclose(f);
    if (n == 0) {
        free(v);
        errf(errbuf, errlen, "%s: no numbers", path);
        return false;
    }
    *out = v;
    *nvals = n;
    return true;
}

static size_t spec_elems(const perf_input_spec *s)
{
    size_t n = 1;
    for (size_t i = 0; i < s->ndims; i++)
        n *= (size_t)s->dims[i];
    return n;
}

/* Appends one value as JSON text and as little-endian bytes of the tensor's datatype. */
static void put_value(sbuf *js, sbuf *bin, keel_datatype dt, double x)
{
    switch (dt) {
    case KEEL_TYPE_BOOL: {
        uint8_t b = x != 0;
        if (js != NULL)
            sb_printf(js, "%s", b ? "true" : "false");
        if (bin != NULL)
            sb_add(bin, &b, 1);
        break;
    }
    case KEEL_TYPE_FP32: {
        float f = (float)x;
        if (js != NULL)
            sb_printf(js, "%.9g", (double)f);
        if (bin != NULL)
            sb_add(bin, &f, 4);
        break;
    }
    case KEEL_TYPE_FP64:
        if (js != NULL)
            sb_printf(js, "%.17g", x);
        if (bin != NULL)
            sb_add(bin, &x, 8);
        break;
    case KEEL_TYPE_FP16: {
        /* Only values that are exact in FP16 are generated (multiples of 1/64 below 2). */
        double q = floor(x * 64) / 64;
        uint16_t h = 0;
        if (q > 0) {
            int e;
            double m = frexp(q, &e); /* q = m * 2^e, m in [0.5, 1) */
            h = (uint16_t)(((unsigned)(e - 1 + 15) << 10) | ((unsigned)((m * 2 - 1) * 1024)));
        }
        if (js != NULL)
            sb_printf(js, "%.9g", q);
        if (bin != NULL)
            sb_add(bin, &h, 2);
        break;
    }
    default: {
        int64_t i = (int64_t)x;
        size_t sz = keel_datatype_size(dt);
        if (js != NULL)
            sb_printf(js, "%" PRId64, i);
        if (bin != NULL)
            sb_add(bin, &i, sz); /* little-endian: the low bytes first */
        break;
    }
    }
}

/* Builds request number k. */
static bool build_request(perf_workload *w, const perf_data_opts *d, size_t k, const double *rows,
                          size_t nrows_vals, uint64_t *rng, char errbuf[], size_t errlen)
{
    sbuf js = {0}, bin = {0}, req = {0};
    char path[512];
    bool ok = false;
    bool file = rows != NULL;
    size_t pos = 0;

    if (w->version != NULL)
        snprintf(path, sizeof(path), "/v2/models/%s/versions/%s/infer", w->model, w->version);
    else
        snprintf(path, sizeof(path), "/v2/models/%s/infer", w->model);
    if (file) {
        size_t per_req = spec_elems(&w->inputs[0]);
        pos = (k * per_req) % nrows_vals;
    }
    sb_printf(&js, "{\"id\":\"perf-%zu\",\"inputs\":[", k);
    for (size_t i = 0; i < w->ninputs; i++) {
        const perf_input_spec *s = &w->inputs[i];
        keel_datatype dt = keel_datatype_from_name(s->datatype);
        size_t n = spec_elems(s), bytes_before = bin.len;
        sb_printf(&js, "%s{\"name\":\"%s\",\"datatype\":\"%s\",\"shape\":[", i ? "," : "", s->name,
                  s->datatype);
        for (size_t j = 0; j < s->ndims; j++)
            sb_printf(&js, "%s%" PRId64, j ? "," : "", s->dims[j]);
        sb_printf(&js, "]");
        if (!w->binary)
            sb_printf(&js, ",\"data\":[");
        for (size_t e = 0; e < n; e++) {
            double x;
            if (file) {
                x = rows[pos];
                pos = (pos + 1) % nrows_vals;
            } else if (strcmp(d->input_data, "zero") == 0) {
                x = 0;
            } else if (dt == KEEL_TYPE_FP32 || dt == KEEL_TYPE_FP64 || dt == KEEL_TYPE_FP16) {
                x = (double)(xorshift(rng) >> 11) / 9007199254740992.0;
            } else if (dt == KEEL_TYPE_BOOL) {
                x = (double)(xorshift(rng) & 1);
            } else {
                x = (double)(xorshift(rng) % 100);
            }
            if (!w->binary && e > 0)
                sb_add(&js, ",", 1);
            put_value(w->binary ? NULL : &js, w->binary ? &bin : NULL, dt, x);
        }
        if (w->binary)
            sb_printf(&js, ",\"parameters\":{\"binary_data_size\":%zu}}", bin.len - bytes_before);
        else
            sb_printf(&js, "]}");
    }
    sb_printf(&js, "]%s}", w->binary ? ",\"parameters\":{\"binary_data_output\":true}" : "");
    if (js.oom || bin.oom) {
        errf(errbuf, errlen, "out of memory");
        goto done;
    }
    sb_printf(&req,
              "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n",
              path, w->target.host, w->target.port,
              w->binary ? "application/octet-stream" : "application/json", js.len + bin.len);
    if (w->binary)
        sb_printf(&req, "Inference-Header-Content-Length: %zu\r\n", js.len);
    sb_add(&req, "\r\n", 2);
    sb_add(&req, js.p, js.len);
    if (bin.len > 0)
        sb_add(&req, bin.p, bin.len);
    if (req.oom) {
        errf(errbuf, errlen, "out of memory");
        goto done;
    }
    w->reqs[k] = req.p;
    w->req_lens[k] = req.len;
    req.p = NULL;
    ok = true;
done:
    free(js.p);
    free(bin.p);
    free(req.p);
    return ok;
}

bool perf_workload_prepare(perf_workload *w, const perf_data_opts *d, char *errbuf, size_t errlen)
{
    double *rows = NULL;
    size_t nvals = 0, nreqs;
    uint64_t rng = d->seed != 0 ? d->seed : 0x9e3779b97f4a7c15ULL;
    bool ok = false;

    if (w->endpoint != NULL) {
        sbuf req = {0};
        sb_printf(&req, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n", w->endpoint, w->target.host,
                  w->target.port);
        if (req.oom || (w->reqs = calloc(1, sizeof(*w->reqs))) == NULL ||
            (w->req_lens = calloc(1, sizeof(*w->req_lens))) == NULL) {
            free(req.p);
            errf(errbuf, errlen, "out of memory");
            return false;
        }
        w->reqs[0] = req.p;
        w->req_lens[0] = req.len;
        w->nreqs = 1;
        return true;
    }
    if (w->ninputs == 0 && !fetch_inputs(w, errbuf, errlen))
        return false;
    if (d->input_data != NULL && strcmp(d->input_data, "random") != 0 &&
        strcmp(d->input_data, "zero") != 0) {
        if (w->ninputs != 1) {
            errf(errbuf, errlen, "--input-data FILE needs a model with one input (it has %zu)",
                 w->ninputs);
            return false;
        }
        if (!read_rows(d->input_data, &rows, &nvals, errbuf, errlen))
            return false;
        /* Enough requests to cover every row once (at most 1024 distinct bodies). */
        nreqs = (nvals + spec_elems(&w->inputs[0]) - 1) / spec_elems(&w->inputs[0]);
        if (nreqs > 1024)
            nreqs = 1024;
    } else {
        nreqs = d->variants > 0 ? d->variants : 16;
        if (d->input_data != NULL && strcmp(d->input_data, "zero") == 0)
            nreqs = 1;
    }
    if ((w->reqs = calloc(nreqs, sizeof(*w->reqs))) == NULL ||
        (w->req_lens = calloc(nreqs, sizeof(*w->req_lens))) == NULL) {
        errf(errbuf, errlen, "out of memory");
        goto done;
    }
    for (size_t k = 0; k < nreqs; k++) {
        if (!build_request(w, d, k, rows, nvals, &rng, errbuf, errlen))
            goto done;
        w->nreqs = k + 1;
    }
    ok = true;
done:
    free(rows);
    return ok;
}

void perf_workload_fini(perf_workload *w)
{
    for (size_t i = 0; i < w->nreqs; i++)
        free(w->reqs[i]);
    free(w->reqs);
    free(w->req_lens);
    w->reqs = NULL;
    w->req_lens = NULL;
    w->nreqs = 0;
}

/* ---------------------------------------------------------------- the load loop */

static const char *const terr_names[PERF_TERR_COUNT_] = {
    [PERF_TERR_CONNECT] = "connect",
    [PERF_TERR_RESET] = "reset",
    [PERF_TERR_TIMEOUT] = "timeout",
    [PERF_TERR_PROTOCOL] = "protocol",
};

const char *perf_terr_name(int kind)
{
    return kind >= 0 && kind < PERF_TERR_COUNT_ ? terr_names[kind] : "?";
}

bool perf_result_init(perf_result *r)
{
    memset(r, 0, sizeof(*r));
    return perf_hist_init(&r->hist);
}

void perf_result_fini(perf_result *r)
{
    perf_hist_fini(&r->hist);
}

void perf_result_errors(const perf_result *r, char *buf, size_t len)
{
    size_t off = 0;

    buf[0] = '\0';
    for (int s = 0; s < PERF_MAX_STATUS; s++) {
        if (r->status[s] > 0 && off < len)
            off += (size_t)snprintf(buf + off, len - off, "%s%d:%" PRIu64, off ? ";" : "", s,
                                    r->status[s]);
    }
    for (int k = 0; k < PERF_TERR_COUNT_; k++) {
        if (r->terr[k] > 0 && off < len)
            off += (size_t)snprintf(buf + off, len - off, "%s%s:%" PRIu64, off ? ";" : "",
                                    terr_names[k], r->terr[k]);
    }
}

enum { PC_CLOSED, PC_CONNECTING, PC_IDLE, PC_BUSY };

typedef struct pconn {
    int fd;
    int state;
    bool in_idle_list;
    const char *out;
    size_t out_len, out_off;
    char *in;
    size_t in_len, in_cap;
    uint64_t t_intended, t_sent;
    uint64_t retry_at; /* after a failed connect: not before this time (no busy loop) */
} pconn;

typedef struct loop {
    const perf_workload *w;
    const perf_load_opts *o;
    perf_result *r;
    int ep;
    pconn *conns;
    size_t nconns, open;
    size_t *idle; /* stack of idle connection indices */
    size_t nidle;
    size_t next_req;
    uint64_t t_meas, t_end; /* measured window [t_meas, t_end) */
    bool issuing;
} loop;

static void note_failure(perf_result *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Keeps the first few distinct failure descriptions. */
static void note_failure(perf_result *r, const char *fmt, ...)
{
    char tmp[200];
    va_list ap;

    if (r->nnotes == PERF_FAILURE_NOTES)
        return;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    for (char *p = tmp; *p != '\0'; p++) {
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    }
    for (size_t i = 0; i < r->nnotes; i++) {
        if (strcmp(r->notes[i], tmp) == 0)
            return;
    }
    snprintf(r->notes[r->nnotes++], sizeof(r->notes[0]), "%s", tmp);
}

static void conn_close(loop *L, pconn *c)
{
    if (c->fd != -1) {
        epoll_ctl(L->ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        L->open--;
    }
    c->fd = -1;
    c->state = PC_CLOSED;
    c->in_len = 0;
    if (c->in_idle_list) {
        for (size_t i = L->nidle; i-- > 0;) {
            if (&L->conns[L->idle[i]] == c) {
                L->idle[i] = L->idle[--L->nidle];
                break;
            }
        }
        c->in_idle_list = false;
    }
}

static bool measured(const loop *L, const pconn *c)
{
    return c->t_intended >= L->t_meas;
}

/* A request failed at the transport level: count it if measured, close the connection. */
static void conn_fail(loop *L, pconn *c, int kind, int err)
{
    if (c->state == PC_BUSY && measured(L, c)) {
        L->r->terr[kind]++;
        L->r->failed++;
        note_failure(L->r, "%s: %s", terr_names[kind], err != 0 ? strerror(err) : "");
    } else if (c->state == PC_CONNECTING && L->t_meas <= now_ns()) {
        L->r->terr[kind]++;
        L->r->failed++;
        note_failure(L->r, "%s: %s", terr_names[kind], err != 0 ? strerror(err) : "");
    }
    if (kind == PERF_TERR_CONNECT)
        c->retry_at = now_ns() + 10000000u;
    conn_close(L, c);
}

static bool conn_open(loop *L, pconn *c)
{
    struct epoll_event ev;

    c->fd = perf_target_connect(&L->w->target, true);
    if (c->fd == -1) {
        int e = errno;
        c->state = PC_CONNECTING;
        conn_fail(L, c, PERF_TERR_CONNECT, e);
        return false;
    }
    L->open++;
    if (L->open > L->r->max_conns)
        L->r->max_conns = L->open;
    c->state = PC_CONNECTING;
    c->in_len = 0;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP;
    ev.data.ptr = c;
    if (epoll_ctl(L->ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        int e = errno;
        conn_fail(L, c, PERF_TERR_CONNECT, e);
        return false;
    }
    return true;
}

static void make_idle(loop *L, pconn *c)
{
    c->state = PC_IDLE;
    if (!c->in_idle_list) {
        L->idle[L->nidle++] = (size_t)(c - L->conns);
        c->in_idle_list = true;
    }
}

static void conn_flush(loop *L, pconn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return; /* EPOLLOUT (edge) tells when to go on */
        } else {
            conn_fail(L, c, PERF_TERR_RESET, n < 0 ? errno : 0);
            return;
        }
    }
}

static void conn_send(loop *L, pconn *c, uint64_t intended, uint64_t now)
{
    size_t k = L->next_req++ % L->w->nreqs;

    if (c->in_idle_list) {
        for (size_t i = L->nidle; i-- > 0;) {
            if (&L->conns[L->idle[i]] == c) {
                L->idle[i] = L->idle[--L->nidle];
                break;
            }
        }
        c->in_idle_list = false;
    }
    c->state = PC_BUSY;
    c->out = L->w->reqs[k];
    c->out_len = L->w->req_lens[k];
    c->out_off = 0;
    c->in_len = 0;
    c->t_intended = intended;
    c->t_sent = now;
    conn_flush(L, c);
}

/* A complete response of total bytes is at the start of c->in. */
static void conn_done(loop *L, pconn *c, const perf_http_resp *hr, size_t total, uint64_t now)
{
    perf_result *r = L->r;

    if (now >= L->t_meas && now < L->t_end)
        r->completed++;
    if (measured(L, c)) {
        if (hr->status >= 200 && hr->status < 300) {
            r->ok++;
            perf_hist_record(&r->hist, now - c->t_intended);
        } else {
            r->failed++;
            r->status[hr->status >= 0 && hr->status < PERF_MAX_STATUS ? hr->status : 0]++;
            if (r->nnotes < PERF_FAILURE_NOTES) {
                char *body = malloc(total + 1);
                if (body != NULL) {
                    http_body(c->in, total, hr, body);
                    note_failure(r, "HTTP %d: %.160s", hr->status, body);
                    free(body);
                }
            }
        }
    }
    if (total < c->in_len)
        memmove(c->in, c->in + total, c->in_len - total);
    c->in_len -= total;
    if (hr->close) {
        conn_close(L, c);
        return;
    }
    make_idle(L, c);
}

static void conn_read(loop *L, pconn *c)
{
    for (;;) {
        ssize_t n;
        if (c->in_cap - c->in_len < 4096) {
            size_t ncap = c->in_cap == 0 ? 16384 : c->in_cap * 2;
            char *nb = realloc(c->in, ncap);
            if (nb == NULL) {
                conn_fail(L, c, PERF_TERR_PROTOCOL, ENOMEM);
                return;
            }
            c->in = nb;
            c->in_cap = ncap;
        }
        n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) {
            perf_http_resp hr;
            if (n == 0 && c->state == PC_BUSY && c->in_len > 0 &&
                perf_http_parse(c->in, c->in_len, &hr) == 0 && hr.until_close) {
                conn_done(L, c, &hr, c->in_len, now_ns());
                conn_close(L, c);
                return;
            }
            if (c->state == PC_BUSY)
                conn_fail(L, c, PERF_TERR_RESET, n < 0 ? errno : ECONNRESET);
            else
                conn_close(L, c); /* the server closed an idle connection */
            return;
        }
        c->in_len += (size_t)n;
        if (c->state != PC_BUSY) {
            conn_fail(L, c, PERF_TERR_PROTOCOL, 0); /* bytes nobody asked for */
            return;
        }
        for (;;) {
            perf_http_resp hr;
            ssize_t total = perf_http_parse(c->in, c->in_len, &hr);
            if (total < 0) {
                conn_fail(L, c, PERF_TERR_PROTOCOL, EPROTO);
                return;
            }
            if (total == 0)
                break;
            if (hr.status / 100 == 1) { /* an interim answer: drop it, wait for the real one */
                memmove(c->in, c->in + total, c->in_len - (size_t)total);
                c->in_len -= (size_t)total;
                continue;
            }
            conn_done(L, c, &hr, (size_t)total, now_ns());
            return;
        }
    }
}

/* User + system CPU seconds of the calling thread. */
static double thread_cpu_s(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void progress(const loop *L, uint64_t now, uint64_t t0)
{
    double el = (double)(now - t0) / 1e9, warm = L->o->warmup_s;
    const perf_result *r = L->r;

    if (now < L->t_meas)
        fprintf(stderr, "\r%s: warming up %.1f/%.1f s   \033[K", L->o->label, el, warm);
    else {
        double m = (double)(now - L->t_meas) / 1e9;
        fprintf(stderr, "\r%s: %.1f s  %" PRIu64 " ok  %.0f req/s  %" PRIu64 " failed\033[K",
                L->o->label, m, r->ok, m > 0 ? (double)r->completed / m : 0.0, r->failed);
    }
    fflush(stderr);
}

bool perf_load_run(const perf_workload *w, const perf_load_opts *o, perf_result *r, char *errbuf,
                   size_t errlen)
{
    loop L;
    struct epoll_event evs[256];
    uint64_t t0, next_progress, interval = 0, timeout_ns;
    double cpu0;
    uint64_t k_issued = 0; /* open loop: requests sent so far */
    bool stopping = false; /* the window ended (or *stop): last issuing pass, then drain */
    bool open_loop = o->rate > 0, ok = false, show = o->progress && isatty(2);
    size_t n;

    memset(&L, 0, sizeof(L));
    L.w = w;
    L.o = o;
    L.r = r;
    n = open_loop ? (o->max_connections > 0 ? o->max_connections : 64) : o->concurrency;
    if (n == 0) {
        errf(errbuf, errlen, "no connections to use");
        return false;
    }
    L.nconns = n;
    if ((L.ep = epoll_create1(EPOLL_CLOEXEC)) < 0) {
        errf(errbuf, errlen, "epoll_create1: %s", strerror(errno));
        return false;
    }
    if ((L.conns = calloc(n, sizeof(*L.conns))) == NULL ||
        (L.idle = calloc(n, sizeof(*L.idle))) == NULL) {
        errf(errbuf, errlen, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        L.conns[i].fd = -1;
        L.conns[i].state = PC_CLOSED;
    }
    timeout_ns = (uint64_t)(o->timeout_s * 1e9);
    cpu0 = thread_cpu_s();
    t0 = now_ns();
    L.t_meas = t0 + (uint64_t)(o->warmup_s * 1e9);
    L.t_end = o->duration_s > 0 ? L.t_meas + (uint64_t)(o->duration_s * 1e9) : UINT64_MAX;
    if (open_loop)
        interval = (uint64_t)(1e9 / o->rate);
    next_progress = t0 + 500000000u;
    L.issuing = true;

    if (!open_loop) {
        for (size_t i = 0; i < n; i++)
            conn_open(&L, &L.conns[i]);
    }
    for (;;) {
        uint64_t now = now_ns();
        int timeout_ms = 50, ne;
        uint64_t wait_ns = 0; /* open loop: sleep exactly until the next request is due */

        /* The last issuing pass (open loop: up to the end of the window) runs below, then
         * issuing stops. */
        if (L.issuing && (now >= L.t_end || (o->stop != NULL && atomic_load(o->stop)))) {
            stopping = true;
            if (L.t_end == UINT64_MAX || now < L.t_end)
                L.t_end = now;
        }
        /* Requests whose answer takes longer than the timeout fail. */
        for (size_t i = 0; i < n; i++) {
            pconn *c = &L.conns[i];
            if (c->state == PC_BUSY && now - c->t_sent > timeout_ns)
                conn_fail(&L, c, PERF_TERR_TIMEOUT, ETIMEDOUT);
            else if (c->state == PC_CONNECTING && now - c->t_sent > timeout_ns && c->t_sent != 0)
                conn_fail(&L, c, PERF_TERR_CONNECT, ETIMEDOUT);
        }
        if (L.issuing) {
            if (!open_loop && !stopping) {
                for (size_t i = 0; i < n; i++) {
                    pconn *c = &L.conns[i];
                    if (c->state == PC_CLOSED && now >= c->retry_at) {
                        if (conn_open(&L, c))
                            c->t_sent = now;
                    }
                    if (c->state == PC_IDLE)
                        conn_send(&L, c, now, now);
                }
            } else if (open_loop) {
                /* Requests due by now, and never any due after the window. */
                uint64_t horizon = now < L.t_end ? now : L.t_end;
                uint64_t due = (horizon - t0) / interval + 1;
                while (k_issued < due) {
                    uint64_t intended = t0 + k_issued * interval;
                    if (L.nidle > 0) {
                        conn_send(&L, &L.conns[L.idle[L.nidle - 1]], intended, now);
                        k_issued++;
                        continue;
                    }
                    /* No idle connection: open one if the pool allows, else wait. */
                    if (L.open < n) {
                        for (size_t i = 0; i < n; i++) {
                            if (L.conns[i].state == PC_CLOSED && now >= L.conns[i].retry_at) {
                                if (conn_open(&L, &L.conns[i]))
                                    L.conns[i].t_sent = now;
                                break;
                            }
                        }
                    }
                    break;
                }
                {
                    uint64_t next = t0 + k_issued * interval;
                    if (next > now) {
                        wait_ns = next - now < 50000000u ? next - now : 50000000u;
                        timeout_ms = (int)((wait_ns + 999999u) / 1000000u);
                    } else {
                        timeout_ms = L.nidle > 0 ? 0 : 1;
                    }
                }
                if (stopping) {
                    /* Due inside the measured window but never sent: every connection was
                     * busy (or still connecting). */
                    uint64_t due_start =
                        L.t_meas > t0 ? (L.t_meas - t0 + interval - 1) / interval : 0;
                    uint64_t first = k_issued > due_start ? k_issued : due_start;
                    if (due > first)
                        r->unsent = due - first;
                }
            }
            if (stopping)
                L.issuing = false;
        } else {
            bool busy = false;
            for (size_t i = 0; i < n && !busy; i++)
                busy = L.conns[i].state == PC_BUSY;
            if (!busy)
                break;
        }
        if (wait_ns > 0) {
            /* Nanosecond timeout: a millisecond one would send up to 1 ms late, and that
             * lateness counts in the latencies (they run from the due time). */
            struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)wait_ns};
            ne = epoll_pwait2(L.ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), &ts, NULL);
            if (ne < 0 && errno == ENOSYS)
                ne = epoll_wait(L.ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), timeout_ms);
        } else {
            ne = epoll_wait(L.ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), timeout_ms);
        }
        if (ne < 0 && errno != EINTR) {
            errf(errbuf, errlen, "epoll_wait: %s", strerror(errno));
            goto done;
        }
        for (int i = 0; i < ne; i++) {
            pconn *c = evs[i].data.ptr;
            if (c->fd == -1)
                continue;
            if (c->state == PC_CONNECTING) {
                int err = 0;
                socklen_t sl = sizeof(err);
                if (!(evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
                    continue;
                if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl) != 0)
                    err = errno;
                if (err != 0) {
                    conn_fail(&L, c, PERF_TERR_CONNECT, err);
                    continue;
                }
                make_idle(&L, c);
                if (!open_loop && L.issuing)
                    conn_send(&L, c, now_ns(), now_ns());
                continue;
            }
            if ((evs[i].events & EPOLLOUT) && c->state == PC_BUSY && c->out_off < c->out_len)
                conn_flush(&L, c);
            if (c->fd != -1 && (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                conn_read(&L, c);
                if (!open_loop && L.issuing && c->state == PC_IDLE) {
                    uint64_t t = now_ns();
                    conn_send(&L, c, t, t);
                }
            }
        }
        if (show && now >= next_progress) {
            progress(&L, now, t0);
            next_progress = now + 500000000u;
        }
    }
    r->window_s = L.t_end > L.t_meas ? (double)(L.t_end - L.t_meas) / 1e9 : 0.0;
    r->cpu_s = thread_cpu_s() - cpu0;
    r->elapsed_s = (double)(now_ns() - t0) / 1e9;
    if (show)
        fprintf(stderr, "\r\033[K");
    ok = true;
done:
    if (L.conns != NULL) {
        for (size_t i = 0; i < n; i++) {
            if (L.conns[i].fd != -1)
                close(L.conns[i].fd);
            free(L.conns[i].in);
        }
    }
    free(L.conns);
    free(L.idle);
    close(L.ep);
    return ok;
}
