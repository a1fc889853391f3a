/*
 * v2codec.c: KServe V2 infer request decoding and response encoding (see v2codec.h).
 *
 * DESIGN
 * Decoding is one pass of a hand-written recursive-descent JSON parser over the header bytes
 * (RFC 8259: strict grammar, UTF-8 checked in every string, nesting bounded by
 * KEEL__V2_MAX_DEPTH) that knows the request's schema, so every error can name its JSON path
 * ("inputs[0].data[3][1]: ..."). Syntax errors give the byte offset. Why not jansson or yajl,
 * which the server links anyway: "data" arrays are the hot part of a request and the budget is
 * about 5 ns per number; jansson's DOM costs 209 ns and yajl's tokenizer alone 22 ns per
 * number on the development VM (bench/bench_decode.c, docs/PERFORMANCE.md), so a "data" array
 * is decoded straight into the tensor buffer by a loop specialised per datatype, with the
 * number conversions of fastfloat.h. A flat FP32 array, the common case, goes through
 * decode_flat_f32_avx2 on CPUs with AVX2 (two passes per chunk of 256 numbers: the separators
 * found 64 bytes at a time, then the numbers converted two at a time by the vector path,
 * software-pipelined; about 3.9 to 4.4 ns per number on the benchmark's bodies) and through
 * decode_flat's scalar loop elsewhere (6.4 to 15 ns); any array either fast loop does not take
 * whole (nesting, an error, a count mismatch) is decoded again by decode_elems, which reports the
 * error. Splicing a library parser around a hand-written array scanner would still need a full JSON
 * lexer to find where the arrays end, so the whole header is parsed here; keys the schema does not
 * use are checked and skipped.
 *
 * Order of work, so that a hostile body costs no more than its size: an input's "data" is
 * decoded only once its "shape" and "datatype" are known (if "data" comes first, its text is
 * checked and skipped and decoded after the object's closing brace); the element count is
 * checked for overflow and against the bytes left in the JSON (every element takes at least
 * two) before the tensor buffer is allocated, so "shape": [1000000000000] is refused without
 * an allocation. Binary inputs are not copied: the decoded tensor points into the body; the
 * request then borrows it when the caller lends its body (keel_v2_decode_infer_lent, one
 * reference per input) and the data is aligned for its datatype, else keel_request_add_input
 * makes the one copy. Nothing touches the keel_request until the whole body has been
 * validated.
 *
 * Encoding appends to one growing buffer: the JSON, then the binary sections in output order.
 * Every allocation failure becomes a 500 and frees what was built. No locks, no globals
 * beyond constant tables: all functions are reentrant.
 */
#include "v2codec.h"

#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastfloat.h"
#include "v2codec_internal.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "keel's tensors are host order and the V2 binary extension is little-endian"
#endif

/* ---------------------------------------------------------------- growing buffer */

typedef struct sbuf {
    char *p;
    size_t len;
    size_t cap;
    bool oom;
    bool fixed; /* p is the owner's array (not malloc'd): a growth copies it to the heap */
} sbuf;

static bool sb_grow(sbuf *b, size_t extra)
{
    size_t need;
    size_t ncap;
    char *np;

    if (b->oom)
        return false;
    if (__builtin_add_overflow(b->len, extra, &need)) {
        b->oom = true;
        return false;
    }
    if (need <= b->cap)
        return true;
    ncap = b->cap != 0 ? b->cap : 256;
    while (ncap < need)
        ncap = ncap > SIZE_MAX / 2 ? need : ncap * 2;
    if ((np = b->fixed ? malloc(ncap) : realloc(b->p, ncap)) == NULL) {
        b->oom = true;
        return false;
    }
    if (b->fixed && b->len > 0)
        memcpy(np, b->p, b->len);
    b->fixed = false;
    b->p = np;
    b->cap = ncap;
    return true;
}

static inline bool sb_reserve(sbuf *b, size_t extra)
{
    return (b->cap - b->len >= extra && !b->oom) || sb_grow(b, extra);
}

/* The appends are always inlined: the encoder makes about 40 per response, most of them of
 * string literals whose length (strlen of a literal) and copy then fold into a few moves;
 * called, they were 2.2k instructions of a batched batch-1 request (callgrind, session 10). */
static inline __attribute__((always_inline)) void sb_put(sbuf *b, const void *s, size_t n)
{
    if (n == 0 || !sb_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static inline __attribute__((always_inline)) void sb_puts(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static inline __attribute__((always_inline)) void sb_putc(sbuf *b, char c)
{
    if (!sb_reserve(b, 1))
        return;
    b->p[b->len++] = c;
}

/* ---------------------------------------------------------------- UTF-8 */

/* Length of the valid UTF-8 sequence starting at p (p < end, *p >= 0x80), or 0 (RFC 3629:
 * no overlong forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0];
    size_t avail = (size_t)(end - p);
    unsigned char lo = 0x80, hi = 0xBF;
    size_t n;

    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        n = 3;
    else if (c >= 0xF0 && c <= 0xF4)
        n = 4;
    else
        return 0;
    if (avail < n)
        return 0;
    if (c == 0xE0)
        lo = 0xA0;
    else if (c == 0xED)
        hi = 0x9F;
    else if (c == 0xF0)
        lo = 0x90;
    else if (c == 0xF4)
        hi = 0x8F;
    if (p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++) {
        if (p[i] < 0x80 || p[i] > 0xBF)
            return 0;
    }
    return n;
}

static bool utf8_valid(const unsigned char *p, size_t n)
{
    const unsigned char *end = p + n;

    while (p < end) {
        if (*p < 0x80) {
            p++;
        } else {
            size_t k = utf8_seq(p, end);
            if (k == 0)
                return false;
            p += k;
        }
    }
    return true;
}

static void utf8_put(sbuf *b, uint32_t cp)
{
    char u[4];
    size_t n;

    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    sb_put(b, u, n);
}

/* Appends s[0..n) as a JSON string; bytes that are not UTF-8 become U+FFFD. */
static void put_json_string(sbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    const unsigned char *end = p + n;

    sb_putc(b, '"');
    while (p < end) {
        const unsigned char *run = p;
        while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\')
            p++;
        sb_put(b, run, (size_t)(p - run));
        if (p >= end)
            break;
        if (*p >= 0x80) {
            size_t k = utf8_seq(p, end);
            if (k == 0) {
                sb_puts(b, "\xEF\xBF\xBD");
                p++;
            } else {
                sb_put(b, p, k);
                p += k;
            }
            continue;
        }
        switch (*p) {
        case '"':
            sb_puts(b, "\\\"");
            break;
        case '\\':
            sb_puts(b, "\\\\");
            break;
        case '\n':
            sb_puts(b, "\\n");
            break;
        case '\r':
            sb_puts(b, "\\r");
            break;
        case '\t':
            sb_puts(b, "\\t");
            break;
        case '\b':
            sb_puts(b, "\\b");
            break;
        case '\f':
            sb_puts(b, "\\f");
            break;
        default: {
            char u[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
            sb_put(b, u, sizeof(u));
        }
        }
        p++;
    }
    sb_putc(b, '"');
}

/* ---------------------------------------------------------------- decoder state and errors */

#define TMP_SMALL 256 /* bytes of the decoder's scratch on the stack */

#define PATH_SEGS 8

typedef struct pseg {
    const char *key; /* NULL: an array index */
    size_t klen;
    size_t index;
} pseg;

typedef struct dec {
    const char *base; /* the JSON header */
    const char *p;
    const char *end;
    const char *bin; /* the binary section, if has_bin */
    size_t bin_len;
    size_t bin_used;
    bool has_bin;
    pseg path[PATH_SEGS];
    int npath;
    const size_t *eidx; /* while decoding a BYTES element: its indices, for messages */
    int edepth;
    char *err;
    size_t errlen;
    sbuf tmp; /* scratch for decoded keys and strings */
    keel__v2_request *r;
} dec;

static void push_key(dec *d, const char *key, size_t klen)
{
    if (d->npath < PATH_SEGS)
        d->path[d->npath] = (pseg){key, klen, 0};
    d->npath++;
}

static void push_name(dec *d, const char *key)
{
    push_key(d, key, strlen(key));
}

static void push_index(dec *d, size_t i)
{
    if (d->npath < PATH_SEGS)
        d->path[d->npath] = (pseg){NULL, 0, i};
    d->npath++;
}

static void pop(dec *d)
{
    d->npath--;
}

/* Copies at most max bytes of s into out as printable ASCII ('?' for anything else). */
static void sanitize(const char *s, size_t n, size_t max, char *out, size_t outlen)
{
    size_t o = 0;

    for (size_t i = 0; i < n && i < max && o + 1 < outlen; i++) {
        unsigned char c = (unsigned char)s[i];
        out[o++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    if (n > max && o + 4 < outlen) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

/* The current path, plus extra array indices (data elements), e.g. inputs[0].data[2][1]. */
static void path_str(const dec *d, const size_t *extra, int nextra, char *buf, size_t len)
{
    size_t o = 0;
    int n = d->npath < PATH_SEGS ? d->npath : PATH_SEGS;

    if (extra == NULL && d->eidx != NULL) {
        extra = d->eidx;
        nextra = d->edepth;
    }
    buf[0] = '\0';
    for (int i = 0; i < n + nextra && o + 1 < len; i++) {
        const pseg *s = i < n ? &d->path[i] : NULL;
        int w;

        if (s != NULL && s->key != NULL) {
            char k[48];
            sanitize(s->key, s->klen, 40, k, sizeof(k));
            w = snprintf(buf + o, len - o, "%s%s", o > 0 ? "." : "", k);
        } else {
            w = snprintf(buf + o, len - o, "[%zu]", s != NULL ? s->index : extra[i - n]);
        }
        if (w < 0)
            break;
        o += (size_t)w;
        if (o >= len)
            o = len - 1;
    }
}

static int failv(dec *d, int status, const size_t *extra, int nextra, const char *fmt, va_list ap)
    __attribute__((format(printf, 5, 0)));

static int failv(dec *d, int status, const size_t *extra, int nextra, const char *fmt, va_list ap)
{
    char path[256];
    char msg[384];

    if (d->errlen == 0)
        return status;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    path_str(d, extra, nextra, path, sizeof(path));
    if (path[0] != '\0')
        snprintf(d->err, d->errlen, "%s: %s", path, msg);
    else
        snprintf(d->err, d->errlen, "%s", msg);
    return status;
}

/* A 400 (or other status) about the field at the current path. */
static int fail(dec *d, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(dec *d, int status, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    failv(d, status, NULL, 0, fmt, ap);
    va_end(ap);
    return status;
}

/* A 400 about element idx[0..depth) of the data array at the current path. */
static int fail_elem(dec *d, const size_t *idx, int depth, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail_elem(dec *d, const size_t *idx, int depth, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    failv(d, 400, idx, depth, fmt, ap);
    va_end(ap);
    return 400;
}

static int fail_nomem(dec *d)
{
    d->npath = 0;
    return fail(d, 500, "out of memory while decoding the request");
}

/* Invalid JSON at byte `at` of the header. */
static int fail_syntax(dec *d, const char *at, const char *what)
{
    char path[256];

    if (d->errlen == 0)
        return 400;
    path_str(d, NULL, 0, path, sizeof(path));
    if (path[0] != '\0')
        snprintf(d->err, d->errlen, "invalid JSON at byte %zu (in %s): %s", (size_t)(at - d->base),
                 path, what);
    else
        snprintf(d->err, d->errlen, "invalid JSON at byte %zu: %s", (size_t)(at - d->base), what);
    return 400;
}

static int fail_elem_syntax(dec *d, const size_t *idx, int depth, const char *at, const char *what)
{
    char path[256];

    if (d->errlen == 0)
        return 400;
    path_str(d, idx, depth, path, sizeof(path));
    snprintf(d->err, d->errlen, "invalid JSON at byte %zu (in %s): %s", (size_t)(at - d->base),
             path, what);
    return 400;
}

/* ---------------------------------------------------------------- JSON lexing */

static inline const char *ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

/* What kind of JSON value starts at p, for messages; NULL if none does. */
static const char *kind_at(const char *p, const char *end)
{
    if (p >= end)
        return NULL;
    switch (*p) {
    case '{':
        return "an object";
    case '[':
        return "an array";
    case '"':
        return "a string";
    case 't':
    case 'f':
        return "a boolean";
    case 'n':
        return "null";
    default:
        return *p == '-' || (*p >= '0' && *p <= '9') ? "a number" : NULL;
    }
}

/* "got ..." text for the value at p: the number itself, or its kind. */
static void describe(const char *p, const char *end, char *buf, size_t len)
{
    const char *k = kind_at(p, end);

    if (k != NULL && strcmp(k, "a number") == 0) {
        keel__ff_num n;
        const char *q = keel__ff_scan(p, end, &n);
        if (q != NULL) {
            sanitize(p, (size_t)(q - p), 32, buf, len);
            return;
        }
    }
    snprintf(buf, len, "%s", k != NULL ? k : "invalid JSON");
}

/* The first byte of [p, end) a string's plain run ends at: a quote, a backslash, a control
 * character or a non-ASCII byte (end if none). SSE2 looks at 16 bytes per step (byte by byte
 * it took about 7 instructions per byte of a request's keys and names; callgrind,
 * docs/PERFORMANCE.md session 11). */
static inline const unsigned char *plain_run(const unsigned char *p, const unsigned char *end)
{
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\');
    const __m128i space = _mm_set1_epi8(0x20);

    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
        /* Signed: bytes >= 0x80 are negative, so "less than 0x20" takes them too. */
        __m128i stop =
            _mm_or_si128(_mm_cmplt_epi8(v, space),
                         _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, bslash)));
        unsigned m = (unsigned)_mm_movemask_epi8(stop);
        if (m != 0)
            return p + __builtin_ctz(m);
        p += 16;
    }
#endif
    while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\')
        p++;
    return p;
}

/* Reads the string at d->p (which is '"'), appending its decoded bytes to sink (may be NULL:
 * only checked) and setting *n to how many were appended. */
static int read_string(dec *d, sbuf *sink, size_t *n)
{
    const unsigned char *p = (const unsigned char *)d->p + 1;
    const unsigned char *end = (const unsigned char *)d->end;
    size_t start = sink != NULL ? sink->len : 0;

    for (;;) {
        const unsigned char *run = p;
        unsigned char c;

        p = plain_run(p, end);
        if (sink != NULL)
            sb_put(sink, run, (size_t)(p - run));
        if (p >= end)
            return fail_syntax(d, d->end, "unterminated string");
        c = *p;
        if (c == '"') {
            p++;
            break;
        }
        if (c == '\\') {
            uint32_t cp;
            char ch;

            if (end - p < 2)
                return fail_syntax(d, d->end, "unterminated string");
            switch (p[1]) {
            case '"':
                ch = '"';
                break;
            case '\\':
                ch = '\\';
                break;
            case '/':
                ch = '/';
                break;
            case 'b':
                ch = '\b';
                break;
            case 'f':
                ch = '\f';
                break;
            case 'n':
                ch = '\n';
                break;
            case 'r':
                ch = '\r';
                break;
            case 't':
                ch = '\t';
                break;
            case 'u':
                ch = 0;
                break;
            default:
                return fail_syntax(d, (const char *)p, "invalid escape in a string");
            }
            if (p[1] != 'u') {
                if (sink != NULL)
                    sb_putc(sink, ch);
                p += 2;
                continue;
            }
            /* \uXXXX, and a second one for a surrogate pair */
            cp = 0;
            for (int pass = 0; pass < 2; pass++) {
                uint32_t v = 0;
                if (end - p < 6)
                    return fail_syntax(d, (const char *)p, "truncated \\u escape");
                if (p[0] != '\\' || p[1] != 'u')
                    return fail_syntax(d, (const char *)p,
                                       "\\u escape of a high surrogate not followed by a low one");
                for (int i = 2; i < 6; i++) {
                    unsigned char h = p[i];
                    v <<= 4;
                    if (h >= '0' && h <= '9')
                        v |= (uint32_t)(h - '0');
                    else if ((h | 0x20) >= 'a' && (h | 0x20) <= 'f')
                        v |= (uint32_t)((h | 0x20) - 'a' + 10);
                    else
                        return fail_syntax(d, (const char *)p, "invalid \\u escape");
                }
                if (pass == 0) {
                    if (v >= 0xDC00 && v <= 0xDFFF)
                        return fail_syntax(d, (const char *)p,
                                           "\\u escape of an unpaired low surrogate");
                    p += 6;
                    cp = v;
                    if (v < 0xD800 || v > 0xDBFF)
                        break;
                } else {
                    if (v < 0xDC00 || v > 0xDFFF)
                        return fail_syntax(
                            d, (const char *)p,
                            "\\u escape of a high surrogate not followed by a low one");
                    p += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (v - 0xDC00);
                }
            }
            if (sink != NULL)
                utf8_put(sink, cp);
            continue;
        }
        if (c < 0x20)
            return fail_syntax(d, (const char *)p, "unescaped control character in a string");
        /* c >= 0x80 */
        {
            size_t k = utf8_seq(p, end);
            if (k == 0)
                return fail(d, 400, "invalid UTF-8 in a string at byte %zu",
                            (size_t)((const char *)p - d->base));
            if (sink != NULL)
                sb_put(sink, p, k);
            p += k;
        }
    }
    if (sink != NULL && sink->oom)
        return fail_nomem(d);
    d->p = (const char *)p;
    if (n != NULL)
        *n = sink != NULL ? sink->len - start : 0;
    return 0;
}

/* Reads a string into d->tmp, NUL-terminated; *n is its decoded length. */
static int read_tmp_string(dec *d, size_t *n)
{
    int st;

    d->tmp.len = 0;
    if ((st = read_string(d, &d->tmp, n)) != 0)
        return st;
    sb_putc(&d->tmp, '\0');
    if (d->tmp.oom)
        return fail_nomem(d);
    return 0;
}

/* Reads a string value into d->tmp as a C string (*n its length): no NUL inside; non-empty
 * if nonempty. */
static int read_tmp_cstring(dec *d, bool nonempty, size_t *n)
{
    char got[48];
    int st;

    if (d->p >= d->end || *d->p != '"') {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected a string, got %s", got);
    }
    if ((st = read_tmp_string(d, n)) != 0)
        return st;
    if (memchr(d->tmp.p, '\0', *n) != NULL)
        return fail(d, 400, "must not contain a NUL character (\\u0000)");
    if (nonempty && *n == 0)
        return fail(d, 400, "must not be empty");
    return 0;
}

/* Reads a string value as a malloc'd C string, as read_tmp_cstring checks it. */
static int read_cstring(dec *d, bool nonempty, char **out)
{
    size_t n;
    int st;

    *out = NULL;
    if ((st = read_tmp_cstring(d, nonempty, &n)) != 0)
        return st;
    if ((*out = malloc(n + 1)) == NULL)
        return fail_nomem(d);
    memcpy(*out, d->tmp.p, n + 1);
    return 0;
}

/* Whether s lies in r's own string storage (else it is malloc'd, or NULL). */
static bool in_strs(const keel__v2_request *r, const char *s)
{
    return (uintptr_t)s >= (uintptr_t)r->strs &&
           (uintptr_t)s < (uintptr_t)(r->strs + KEEL__V2_STRS);
}

/* read_cstring for a string that lives only as long as the keel__v2_request (an input's name,
 * the id): in its own storage when it fits, else malloc'd. Free with strs_free. */
static int read_cstring_local(dec *d, bool nonempty, char **out)
{
    keel__v2_request *r = d->r;
    size_t n;
    int st;

    if (r == NULL)
        return read_cstring(d, nonempty, out);
    *out = NULL;
    if ((st = read_tmp_cstring(d, nonempty, &n)) != 0)
        return st;
    if (n < KEEL__V2_STRS - r->strs_len) {
        *out = r->strs + r->strs_len;
        r->strs_len += n + 1;
    } else if ((*out = malloc(n + 1)) == NULL) {
        return fail_nomem(d);
    }
    memcpy(*out, d->tmp.p, n + 1);
    return 0;
}

static void strs_free(const keel__v2_request *r, char *s)
{
    if (s != NULL && !in_strs(r, s))
        free(s);
}

static int read_literal(dec *d, const char *word)
{
    size_t n = strlen(word);

    if ((size_t)(d->end - d->p) < n || memcmp(d->p, word, n) != 0)
        return fail_syntax(d, d->p, "invalid literal");
    d->p += n;
    return 0;
}

/* Reads true or false. */
static int read_bool(dec *d, bool *out)
{
    char got[48];

    if (d->p < d->end && *d->p == 't') {
        *out = true;
        return read_literal(d, "true");
    }
    if (d->p < d->end && *d->p == 'f') {
        *out = false;
        return read_literal(d, "false");
    }
    describe(d->p, d->end, got, sizeof(got));
    return fail(d, 400, "expected true or false, got %s", got);
}

/* Decimal digits [s, e) as a uint64; false on overflow. */
static bool digits_u64(const char *s, const char *e, uint64_t *out)
{
    uint64_t v = 0;

    for (; s < e; s++) {
        if (__builtin_mul_overflow(v, 10, &v) ||
            __builtin_add_overflow(v, (uint64_t)(*s - '0'), &v))
            return false;
    }
    *out = v;
    return true;
}

/* Reads a non-negative JSON integer <= max. */
static int read_uint(dec *d, uint64_t max, uint64_t *out)
{
    char got[48];
    keel__ff_num n;
    const char *q;
    uint64_t v;

    q = keel__ff_scan(d->p, d->end, &n);
    if (q == NULL) {
        if (kind_at(d->p, d->end) == NULL ||
            (d->p < d->end && (*d->p == '-' || (*d->p >= '0' && *d->p <= '9'))))
            return fail_syntax(d, d->p, "invalid number");
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected a non-negative integer, got %s", got);
    }
    if (!n.integer || (n.neg && !(n.m == 0 && !n.many))) {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected a non-negative integer, got %s", got);
    }
    if (!digits_u64(d->p + (n.neg ? 1 : 0), q, &v) || v > max) {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "%s is out of range (at most %" PRIu64 ")", got, max);
    }
    *out = v;
    d->p = q;
    return 0;
}

static int skip_value(dec *d, int depth);

/* Expects ':' after a key; leaves d->p at the value. */
static int colon(dec *d)
{
    d->p = ws(d->p, d->end);
    if (d->p >= d->end || *d->p != ':')
        return fail_syntax(d, d->p, "expected ':' after an object key");
    d->p = ws(d->p + 1, d->end);
    return 0;
}

/*
 * Iterates over the members of the object at d->p ('{'): calls member(d, ctx, key, klen, raw,
 * rawlen) with the decoded key in d->tmp (NUL-terminated) and d->p at the value; member must
 * consume the value. raw/rawlen is the key's text in the JSON (for paths).
 */
typedef int (*member_fn)(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen);

static int object_each(dec *d, member_fn member, void *ctx)
{
    int st;

    d->p = ws(d->p + 1, d->end);
    if (d->p < d->end && *d->p == '}') {
        d->p++;
        return 0;
    }
    for (;;) {
        const char *raw;
        size_t klen;
        size_t rawlen;

        if (d->p >= d->end || *d->p != '"')
            return fail_syntax(d, d->p, "expected a string key");
        raw = d->p + 1;
        if ((st = read_tmp_string(d, &klen)) != 0)
            return st;
        rawlen = (size_t)(d->p - 1 - raw); /* d->p is just past the closing quote */
        if ((st = colon(d)) != 0)
            return st;
        if ((st = member(d, ctx, klen, raw, rawlen)) != 0)
            return st;
        d->p = ws(d->p, d->end);
        if (d->p < d->end && *d->p == ',') {
            d->p = ws(d->p + 1, d->end);
            continue;
        }
        if (d->p < d->end && *d->p == '}') {
            d->p++;
            return 0;
        }
        return fail_syntax(d, d->p, "expected ',' or '}' in an object");
    }
}

static bool key_is(const dec *d, size_t klen, const char *name)
{
    size_t n = strlen(name);
    return klen == n && memcmp(d->tmp.p, name, n) == 0;
}

static int skip_member(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen)
{
    int depth = *(int *)ctx;
    (void)klen;
    (void)raw;
    (void)rawlen;
    return skip_value(d, depth + 1);
}

/* Checks and skips one JSON value at d->p; depth is the nesting level of that value. */
static int skip_value(dec *d, int depth)
{
    const char *p = ws(d->p, d->end);
    int st;

    d->p = p;
    if (p >= d->end)
        return fail_syntax(d, p, "expected a value");
    switch (*p) {
    case '{':
        if (depth > KEEL__V2_MAX_DEPTH)
            return fail_syntax(d, p, "nested too deeply");
        return object_each(d, skip_member, &depth);
    case '[':
        if (depth > KEEL__V2_MAX_DEPTH)
            return fail_syntax(d, p, "nested too deeply");
        d->p = ws(p + 1, d->end);
        if (d->p < d->end && *d->p == ']') {
            d->p++;
            return 0;
        }
        for (;;) {
            if ((st = skip_value(d, depth + 1)) != 0)
                return st;
            d->p = ws(d->p, d->end);
            if (d->p < d->end && *d->p == ',') {
                d->p++;
                continue;
            }
            if (d->p < d->end && *d->p == ']') {
                d->p++;
                return 0;
            }
            return fail_syntax(d, d->p, "expected ',' or ']' in an array");
        }
    case '"':
        return read_string(d, NULL, NULL);
    case 't':
        return read_literal(d, "true");
    case 'f':
        return read_literal(d, "false");
    case 'n':
        return read_literal(d, "null");
    default: {
        keel__ff_num n;
        const char *q = keel__ff_scan(p, d->end, &n);
        if (q == NULL)
            return fail_syntax(d, p,
                               *p == '-' || (*p >= '0' && *p <= '9') ? "invalid number"
                                                                     : "expected a value");
        d->p = q;
        return 0;
    }
    }
}

/* ---------------------------------------------------------------- data arrays */

/* "[2,3]" for messages. */
static void shape_str(const keel__v2_tensor *t, char *buf, size_t len)
{
    size_t o = 0;

    o += (size_t)snprintf(buf, len, "[");
    for (size_t i = 0; i < t->ndim && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%" PRId64, i ? "," : "", t->shape[i]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
}

/* The error for a data element at p that is not of the expected kind: a syntax error if p
 * does not start a valid JSON scalar, else a type error. */
static int elem_error(dec *d, const size_t *idx, int depth, const char *p, keel_datatype dt,
                      const char *want)
{
    char got[48];
    const char *k = kind_at(p, d->end);
    keel__ff_num n;

    if (k == NULL)
        return fail_elem_syntax(d, idx, depth, p, "expected a value");
    if ((*p == '-' || (*p >= '0' && *p <= '9')) && keel__ff_scan(p, d->end, &n) == NULL)
        return fail_elem_syntax(d, idx, depth, p, "invalid number");
    if ((*p == 't' && !(d->end - p >= 4 && memcmp(p, "true", 4) == 0)) ||
        (*p == 'f' && !(d->end - p >= 5 && memcmp(p, "false", 5) == 0)) ||
        (*p == 'n' && !(d->end - p >= 4 && memcmp(p, "null", 4) == 0)))
        return fail_elem_syntax(d, idx, depth, p, "invalid literal");
    describe(p, d->end, got, sizeof(got));
    return fail_elem(d, idx, depth, "expected %s for datatype %s, got %s", want,
                     keel_datatype_name(dt), got);
}

static int range_error(dec *d, const size_t *idx, int depth, const char *p, const char *q,
                       keel_datatype dt)
{
    char got[48];

    sanitize(p, (size_t)(q - p), 32, got, sizeof(got));
    return fail_elem(d, idx, depth, "%s is out of range for datatype %s", got,
                     keel_datatype_name(dt));
}

/* Integer element: checks the JSON integer at p against [lo, hi] (magnitude form). */
static inline int int_elem(dec *d, const size_t *idx, int depth, const char **pp, keel_datatype dt,
                           uint64_t max_pos, uint64_t max_neg, bool *neg, uint64_t *mag)
{
    const char *p = *pp;
    keel__ff_num n;
    const char *q = keel__ff_scan(p, d->end, &n);
    char got[48];

    if (q == NULL)
        return elem_error(d, idx, depth, p, dt, "an integer");
    if (!n.integer) {
        sanitize(p, (size_t)(q - p), 32, got, sizeof(got));
        return fail_elem(d, idx, depth, "expected an integer for datatype %s, got %s",
                         keel_datatype_name(dt), got);
    }
    if (n.many) {
        if (!digits_u64(p + (n.neg ? 1 : 0), q, &n.m))
            return range_error(d, idx, depth, p, q, dt);
    }
    if (n.neg ? n.m > max_neg : n.m > max_pos)
        return range_error(d, idx, depth, p, q, dt);
    *neg = n.neg;
    *mag = n.m;
    *pp = q;
    return 0;
}

/*
 * Decodes the elements of the data array at d->p ('[') into out (fixed-size types) or bytes
 * (BYTES), flattening nested arrays; exactly t->count elements are required. Instantiated per
 * datatype (dt is a constant at each call site) so the element switch is resolved at compile
 * time and the loop for flat FP32 data is a tight scan.
 */
static inline __attribute__((always_inline)) int decode_elems(dec *d, const keel__v2_tensor *t,
                                                              keel_datatype dt, int base_depth,
                                                              unsigned char *out, sbuf *bytes)
{
    const char *p = d->p + 1;
    const char *end = d->end;
    const size_t n = t->count;
    size_t count = 0;
    size_t idx[KEEL__V2_MAX_DEPTH + 1];
    int depth = 1;
    const int max_depth = KEEL__V2_MAX_DEPTH - base_depth + 1;
    char shape[128];
    int st;

    idx[0] = 0;
    p = ws(p, end);
    if (p < end && *p == ']') {
        p++;
        depth = 0;
    }
    while (depth > 0) {
        if (p >= end)
            goto eof;
        if (*p == '[') {
            if (depth >= max_depth)
                return fail_elem_syntax(d, idx, depth, p, "nested too deeply");
            idx[depth++] = 0;
            p = ws(p + 1, end);
            if (p < end && *p == ']') {
                p++;
                depth--;
                goto after_value;
            }
            continue;
        }
        if (count == n) {
            if (kind_at(p, end) == NULL)
                return fail_elem_syntax(d, idx, depth, p, "expected a value");
            shape_str(t, shape, sizeof(shape));
            return fail_elem(d, idx, depth, "more elements than the %zu of shape %s", n, shape);
        }
        switch (dt) {
        case KEEL_TYPE_FP32: {
            keel__ff_num num;
            const char *q = keel__ff_scan_fast(p, end, &num);
            float f;
            if (q == NULL)
                return elem_error(d, idx, depth, p, dt, "a number");
            st = keel__ff_to_f32(&num, p, (size_t)(q - p), &f);
            if (st != KEEL__FF_OK)
                return st == KEEL__FF_NOMEM ? fail_nomem(d) : range_error(d, idx, depth, p, q, dt);
            memcpy(out + count * 4, &f, 4);
            p = q;
            break;
        }
        case KEEL_TYPE_FP64: {
            keel__ff_num num;
            const char *q = keel__ff_scan_fast(p, end, &num);
            double v;
            if (q == NULL)
                return elem_error(d, idx, depth, p, dt, "a number");
            st = keel__ff_to_f64(&num, p, (size_t)(q - p), &v);
            if (st != KEEL__FF_OK)
                return st == KEEL__FF_NOMEM ? fail_nomem(d) : range_error(d, idx, depth, p, q, dt);
            memcpy(out + count * 8, &v, 8);
            p = q;
            break;
        }
        case KEEL_TYPE_FP16: {
            keel__ff_num num;
            const char *q = keel__ff_scan_fast(p, end, &num);
            double v;
            uint16_t h;
            if (q == NULL)
                return elem_error(d, idx, depth, p, dt, "a number");
            st = keel__ff_to_f64(&num, p, (size_t)(q - p), &v);
            if (st == KEEL__FF_NOMEM)
                return fail_nomem(d);
            h = st == KEEL__FF_OK ? keel__ff_f64_to_f16(v) : 0x7c00;
            if ((h & 0x7c00) == 0x7c00)
                return range_error(d, idx, depth, p, q, dt);
            memcpy(out + count * 2, &h, 2);
            p = q;
            break;
        }
        case KEEL_TYPE_BOOL:
            if (end - p >= 4 && memcmp(p, "true", 4) == 0) {
                out[count] = 1;
                p += 4;
            } else if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
                out[count] = 0;
                p += 5;
            } else {
                return elem_error(d, idx, depth, p, dt, "true or false");
            }
            break;
        case KEEL_TYPE_UINT8:
        case KEEL_TYPE_UINT16:
        case KEEL_TYPE_UINT32:
        case KEEL_TYPE_UINT64:
        case KEEL_TYPE_INT8:
        case KEEL_TYPE_INT16:
        case KEEL_TYPE_INT32:
        case KEEL_TYPE_INT64: {
            size_t sz = keel_datatype_size(dt);
            bool is_signed = dt >= KEEL_TYPE_INT8;
            uint64_t max_pos = sz == 8 ? UINT64_MAX : (UINT64_C(1) << (sz * 8)) - 1;
            uint64_t max_neg = 0;
            bool neg = false;
            uint64_t mag = 0;
            if (is_signed) {
                max_pos >>= 1;
                max_neg = max_pos + 1;
            }
            if ((st = int_elem(d, idx, depth, &p, dt, max_pos, max_neg, &neg, &mag)) != 0)
                return st;
            {
                uint64_t v = neg ? (uint64_t)0 - mag : mag; /* two's complement */
                switch (sz) {
                case 1: {
                    uint8_t x = (uint8_t)v;
                    memcpy(out + count, &x, 1);
                    break;
                }
                case 2: {
                    uint16_t x = (uint16_t)v;
                    memcpy(out + count * 2, &x, 2);
                    break;
                }
                case 4: {
                    uint32_t x = (uint32_t)v;
                    memcpy(out + count * 4, &x, 4);
                    break;
                }
                default:
                    memcpy(out + count * 8, &v, 8);
                }
            }
            break;
        }
        case KEEL_TYPE_BYTES: {
            size_t at;
            size_t len;
            if (p >= end || *p != '"')
                return elem_error(d, idx, depth, p, dt, "a string");
            at = bytes->len;
            sb_put(bytes, "\0\0\0\0", 4);
            d->p = p;
            d->eidx = idx;
            d->edepth = depth;
            st = read_string(d, bytes, &len);
            d->eidx = NULL;
            if (st != 0)
                return st;
            if (bytes->oom)
                return fail_nomem(d);
            if (len > UINT32_MAX)
                return fail_elem(d, idx, depth, "a BYTES element longer than 4 GiB");
            {
                uint32_t l = (uint32_t)len;
                memcpy(bytes->p + at, &l, 4); /* little-endian host */
            }
            p = d->p;
            break;
        }
        default:
            return fail(d, 500, "internal error: datatype %d", (int)dt);
        }
        count++;
    after_value:
        for (;;) {
            p = ws(p, end);
            if (p >= end)
                goto eof;
            if (*p == ',') {
                idx[depth - 1]++;
                p = ws(p + 1, end);
                break;
            }
            if (*p == ']') {
                p++;
                if (--depth == 0)
                    break;
                continue;
            }
            return fail_elem_syntax(d, idx, depth, p, "expected ',' or ']' in an array");
        }
    }
    if (count != n) {
        shape_str(t, shape, sizeof(shape));
        return fail(d, 400, "%zu elements given, shape %s needs %zu", count, shape, n);
    }
    d->p = p;
    return 0;
eof:
    return fail_elem_syntax(d, idx, depth, end, "unexpected end of the JSON in an array");
}

/*
 * The hot path: a flat array of FP32 or FP64 numbers. Returns true when it decoded the whole
 * array (d->p is then after the ']'); false for anything else (nested arrays, a non-number,
 * a count mismatch, a syntax error), after which decode_elems decodes the array again from
 * the start and reports errors exactly. Kept apart from decode_elems because the per-element
 * bookkeeping of nesting and error paths costs as much as the number itself.
 */
static inline __attribute__((always_inline)) bool decode_flat_from(dec *d, const keel__v2_tensor *t,
                                                                   keel_datatype dt,
                                                                   unsigned char *out,
                                                                   const char *p, size_t count)
{
    const char *end = d->end;
    const size_t n = t->count;

    for (;;) {
        keel__ff_num num;
        const char *q = keel__ff_scan_fast(p, end, &num);

        if (q == NULL || count == n)
            return false;
        if (dt == KEEL_TYPE_FP32) {
            float f;
            if (keel__ff_to_f32(&num, p, (size_t)(q - p), &f) != KEEL__FF_OK)
                return false;
            memcpy(out + count * 4, &f, 4);
        } else {
            double v;
            if (keel__ff_to_f64(&num, p, (size_t)(q - p), &v) != KEEL__FF_OK)
                return false;
            memcpy(out + count * 8, &v, 8);
        }
        count++;
        p = q < end && *q == ',' ? q : ws(q, end);
        if (p < end && *p == ',') {
            p++;
            if (p < end && (unsigned char)*p <= ' ')
                p = ws(p, end);
            continue;
        }
        if (p < end && *p == ']' && count == n) {
            d->p = p + 1;
            return true;
        }
        return false;
    }
}

static inline __attribute__((always_inline)) bool decode_flat(dec *d, const keel__v2_tensor *t,
                                                              keel_datatype dt, unsigned char *out)
{
    if (t->count == 0)
        return false;
    return decode_flat_from(d, t, dt, out, ws(d->p + 1, d->end), 0);
}

#ifdef KEEL__FF_HAVE_AVX2
/*
 * decode_flat for FP32 with the vector number path, in chunks of two passes. Pass 1 finds the
 * separators (',' and the first ']') of up to FLAT_CHUNK numbers, 64 bytes per step, and
 * writes their addresses without a branch per separator (8 written per step whether or not they
 * exist, 4 more when there are more, a loop past 12). Pass 2 converts the numbers between
 * the separators two at a time with keel__ff_f32x2_avx2's two halves, the next pair's first
 * half issued before this pair's second (software pipelining: the loop is bound by the
 * latency of a pair's chain and the reorder buffer, so overlapping two chains is what pays):
 * every number's ends are known before it is converted, so numbers do not wait for each
 * other and no branch depends on the digits. A pair the vector path declines (more than 15
 * digits, an exponent of 4 digits, whitespace before a separator, a near-midpoint value,
 * invalid text) is done one number at a time by flat_one_f32: the one-number vector path,
 * then the scalar scanner, which must end at that separator (after whitespace). Pass 1 steps only
 * while 80 bytes remain, so every load of pass 2 (17 bytes from a number's start, which lies before
 * its separator) stays inside the JSON; the rest of the array is left to decode_flat_from. So this
 * accepts exactly the arrays decode_flat accepts and gives the same floats; on false decode_elems
 * decodes the array again and reports the error.
 */
enum { FLAT_CHUNK = 256 };

KEEL__FF_AVX2_TARGET static inline void flat_sep_write(const char **sep, const char *pos,
                                                       uint64_t *c, int w)
{
    for (int r = 0; r < w; r++) {
        sep[r] = pos + _tzcnt_u64(*c); /* pos + 64 when none is left: written, not counted */
        *c = _blsr_u64(*c);
    }
}

/* One number, [s, e) (s perhaps at whitespace): the vector path, else the scalar scanner,
 * which must end at e (after whitespace). Out of line to keep the hot loop small. */
KEEL__FF_AVX2_TARGET __attribute__((noinline)) static bool
flat_one_f32(const char *s, const char *e, const char *end, float *out)
{
    keel__ff_num num;
    const char *q;

    s = ws(s, e);
    if (keel__ff_f32_avx2(s, e, out))
        return true;
    q = keel__ff_scan_fast(s, end, &num);
    return q != NULL && ws(q, end) == e &&
           keel__ff_to_f32(&num, s, (size_t)(q - s), out) == KEEL__FF_OK;
}

/* Pass 2 with gap (a constant) bytes from a separator to the next number when the body
 * separates them the same way throughout: 1 for ",", 2 for ", " (Python's json.dumps), so the
 * hot loop checks no whitespace; a number that does not start there (other whitespace, a
 * different separator) makes the vector path decline and flat_one_f32 skip it. */
KEEL__FF_AVX2_TARGET __attribute__((always_inline)) static inline const char *
flat_pass2_gap(const char *const *sep, size_t k, const char *s, float *o, const char *end, int gap)
{
    const char *const *q = sep;
    const char *const *qend = sep + (k & ~(size_t)1);

    if (q < qend) {
        /* Software-pipelined: the first half of pair i + 1 is issued before the second half
         * of pair i, so that the two halves' chains overlap (the reorder buffer, not the
         * execution units, bounds this loop). */
        keel__ff_x2 cur, nxt;
        const char *ca = s, *cea = q[0], *cb = q[0] + 1, *ceb = q[1];

        /* One space more, if it is one: a branch (predicted, so the loads need not wait for
         * this byte), not arithmetic on it. */
        if (gap == 2 && __builtin_expect(*cb == ' ', 1))
            cb++;
        keel__ff_x2_front(&cur, ca, cea, cb, ceb);
        s = ceb + 1;
        if (gap == 2 && __builtin_expect(*s == ' ', 1))
            s++;
        for (q += 2; q < qend; q += 2, o += 2) {
            const char *ea = q[0];
            const char *eb = q[1];
            const char *sb = ea + 1;

            if (gap == 2 && __builtin_expect(*sb == ' ', 1))
                sb++;
            keel__ff_x2_front(&nxt, s, ea, sb, eb);
            if (!keel__ff_x2_back(&cur, o) &&
                (!flat_one_f32(ca, cea, end, o) || !flat_one_f32(cb, ceb, end, o + 1)))
                return NULL;
            cur = nxt;
            ca = s;
            cea = ea;
            cb = sb;
            ceb = eb;
            s = eb + 1;
            if (gap == 2 && __builtin_expect(*s == ' ', 1))
                s++;
        }
        if (!keel__ff_x2_back(&cur, o) &&
            (!flat_one_f32(ca, cea, end, o) || !flat_one_f32(cb, ceb, end, o + 1)))
            return NULL;
        o += 2;
    }
    if (k & 1) {
        if (!flat_one_f32(s, q[0], end, o))
            return NULL;
        s = q[0] + 1;
    }
    return s;
}

/* Pass 2 (see below): the k numbers ending at sep[0..k), the first starting at s (perhaps
 * after whitespace), into o[0..k). Returns where the next number starts (perhaps at
 * whitespace), or NULL when one is not a number that ends at its separator. Its own function,
 * so that the few loop variables stay in registers. */
KEEL__FF_AVX2_TARGET __attribute__((noinline)) static const char *
flat_pass2(const char *const *sep, size_t k, const char *s, float *o, const char *end)
{
    if (sep[0][1] == ' ')
        return flat_pass2_gap(sep, k, s, o, end, 2);
    return flat_pass2_gap(sep, k, s, o, end, 1);
}

KEEL__FF_AVX2_TARGET static bool decode_flat_f32_avx2(dec *d, const keel__v2_tensor *t,
                                                      unsigned char *out)
{
    const char *end = d->end;
    const char *p = ws(d->p + 1, end);
    const size_t n = t->count;
    size_t count = 0;
    const char *sep[FLAT_CHUNK + 64];

    if (n == 0)
        return false;
    while (end - p >= 80) {
        const char *pos = p;
        const char *close = NULL;
        size_t k = 0;

        /* Pass 1: separator offsets from p. */
        while (k < FLAT_CHUNK && end - pos >= 80) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(const void *)pos);
            const __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(pos + 32));
            const __m256i comma = _mm256_set1_epi8(',');
            const __m256i rbr = _mm256_set1_epi8(']');
            uint64_t c = (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, comma)) |
                         (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, comma))
                             << 32;
            const uint64_t stop =
                (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, rbr)) |
                (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, rbr)) << 32;
            size_t cnt;

            c &= _blsmsk_u64(stop); /* only the commas before a ']' (all when none) */
            cnt = (size_t)_mm_popcnt_u64(c);
            flat_sep_write(sep + k, pos, &c, 8);
            if (cnt > 8) {
                flat_sep_write(sep + k + 8, pos, &c, 4);
                for (size_t r = 12; r < cnt; r++) {
                    sep[k + r] = pos + _tzcnt_u64(c);
                    c = _blsr_u64(c);
                }
            }
            k += cnt;
            if (stop != 0) {
                close = pos + _tzcnt_u64(stop);
                sep[k++] = close;
                break;
            }
            pos += 64;
        }
        if (k == 0)
            break;
        if (k > n - count)
            return false; /* more numbers than the shape has: decode_elems says so */
        /* Pass 2: the numbers that end at those separators. */
        if ((p = flat_pass2(sep, k, p, (float *)(void *)out + count, end)) == NULL)
            return false;
        count += k;
        if (close != NULL) {
            if (count != n)
                return false;
            d->p = close + 1;
            return true;
        }
    }
    return decode_flat_from(d, t, KEEL_TYPE_FP32, out, ws(p, end), count);
}
#endif

/* Decodes the value at d->p as t's data (shape and datatype are known). Path: ...data. */
static int decode_data(dec *d, keel__v2_tensor *t, int depth)
{
    size_t avail = (size_t)(d->end - d->p);
    size_t esize = keel_datatype_size(t->datatype);
    unsigned char *out = NULL;
    sbuf bytes = {0};
    char got[48];
    char shape[128];
    size_t nbytes = 0;
    int st;

    if (d->p >= d->end || *d->p != '[') {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected an array, got %s", got);
    }
    /* Every element takes at least two bytes ("1,"), so "[" + 2n - 1 + "]" <= avail. This
     * bounds the allocation below by a small multiple of the body size. */
    if (t->count > 0 && t->count > (avail - 1) / 2) {
        shape_str(t, shape, sizeof(shape));
        return fail(d, 400,
                    "shape %s needs %zu elements, more than the %zu bytes left in the JSON can "
                    "hold",
                    shape, t->count, avail);
    }
    if (t->datatype == KEEL_TYPE_BYTES) {
        size_t want = t->count * 4 + 64;
        if (!sb_reserve(&bytes, want))
            return fail_nomem(d);
    } else if (t->count > 0) {
        if (__builtin_mul_overflow(t->count, esize, &nbytes) || (out = malloc(nbytes)) == NULL)
            return fail_nomem(d);
    }
#ifdef KEEL__FF_HAVE_AVX2
    if (t->datatype == KEEL_TYPE_FP32 && keel__ff_simd_level() >= 1) {
        if (decode_flat_f32_avx2(d, t, out))
            goto done;
    } else
#endif
        if (t->datatype == KEEL_TYPE_FP32 && decode_flat(d, t, KEEL_TYPE_FP32, out))
        goto done;
    if (t->datatype == KEEL_TYPE_FP64 && decode_flat(d, t, KEEL_TYPE_FP64, out))
        goto done;
    switch (t->datatype) {
    case KEEL_TYPE_BOOL:
        st = decode_elems(d, t, KEEL_TYPE_BOOL, depth, out, NULL);
        break;
    case KEEL_TYPE_UINT8:
        st = decode_elems(d, t, KEEL_TYPE_UINT8, depth, out, NULL);
        break;
    case KEEL_TYPE_UINT16:
        st = decode_elems(d, t, KEEL_TYPE_UINT16, depth, out, NULL);
        break;
    case KEEL_TYPE_UINT32:
        st = decode_elems(d, t, KEEL_TYPE_UINT32, depth, out, NULL);
        break;
    case KEEL_TYPE_UINT64:
        st = decode_elems(d, t, KEEL_TYPE_UINT64, depth, out, NULL);
        break;
    case KEEL_TYPE_INT8:
        st = decode_elems(d, t, KEEL_TYPE_INT8, depth, out, NULL);
        break;
    case KEEL_TYPE_INT16:
        st = decode_elems(d, t, KEEL_TYPE_INT16, depth, out, NULL);
        break;
    case KEEL_TYPE_INT32:
        st = decode_elems(d, t, KEEL_TYPE_INT32, depth, out, NULL);
        break;
    case KEEL_TYPE_INT64:
        st = decode_elems(d, t, KEEL_TYPE_INT64, depth, out, NULL);
        break;
    case KEEL_TYPE_FP16:
        st = decode_elems(d, t, KEEL_TYPE_FP16, depth, out, NULL);
        break;
    case KEEL_TYPE_FP32:
        st = decode_elems(d, t, KEEL_TYPE_FP32, depth, out, NULL);
        break;
    case KEEL_TYPE_FP64:
        st = decode_elems(d, t, KEEL_TYPE_FP64, depth, out, NULL);
        break;
    case KEEL_TYPE_BYTES:
        st = decode_elems(d, t, KEEL_TYPE_BYTES, depth, NULL, &bytes);
        break;
    default:
        st = fail(d, 500, "internal error: datatype %d", (int)t->datatype);
    }
    if (st != 0) {
        free(out);
        free(bytes.p);
        return st;
    }
done:
    if (t->datatype == KEEL_TYPE_BYTES) {
        t->data = bytes.p;
        t->bytes = bytes.len;
        if (bytes.len == 0) {
            free(bytes.p);
            t->data = NULL;
        }
    } else {
        t->data = out;
        t->bytes = nbytes;
    }
    t->owned = true;
    return 0;
}

/* ---------------------------------------------------------------- request schema */

typedef struct input_ctx {
    keel__v2_tensor *t;
    bool seen_name, seen_shape, seen_datatype, seen_params, seen_data;
    const char *data_at; /* "data" seen before shape/datatype: decoded after the object */
    bool has_bds;
    uint64_t bds; /* parameters.binary_data_size */
} input_ctx;

static int dup_key(dec *d, bool *seen)
{
    if (*seen)
        return fail(d, 400, "given more than once");
    *seen = true;
    return 0;
}

static int read_shape(dec *d, keel__v2_tensor *t)
{
    char got[48];
    size_t count = 1;
    int st;

    if (d->p >= d->end || *d->p != '[') {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected an array of non-negative integers, got %s", got);
    }
    d->p = ws(d->p + 1, d->end);
    t->ndim = 0;
    if (d->p < d->end && *d->p == ']') {
        d->p++;
        t->count = 1;
        return 0;
    }
    for (;;) {
        uint64_t v;

        push_index(d, t->ndim);
        if (t->ndim == KEEL__V2_MAX_DIMS)
            return fail(d, 400, "more than %d dimensions", KEEL__V2_MAX_DIMS);
        if ((st = read_uint(d, INT64_MAX, &v)) != 0)
            return st;
        if (v > SIZE_MAX || __builtin_mul_overflow(count, (size_t)v, &count))
            return fail(d, 400, "the element count of the shape overflows");
        t->shape[t->ndim++] = (int64_t)v;
        pop(d);
        d->p = ws(d->p, d->end);
        if (d->p < d->end && *d->p == ',') {
            d->p = ws(d->p + 1, d->end);
            continue;
        }
        if (d->p < d->end && *d->p == ']') {
            d->p++;
            break;
        }
        return fail_syntax(d, d->p, "expected ',' or ']' in an array");
    }
    t->count = count;
    return 0;
}

static int input_param_member(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen)
{
    input_ctx *c = ctx;
    int st;

    push_key(d, raw, rawlen);
    if (key_is(d, klen, "binary_data_size")) {
        if ((st = dup_key(d, &c->has_bds)) != 0)
            return st;
        if ((st = read_uint(d, UINT64_MAX, &c->bds)) != 0)
            return st;
    } else if ((st = skip_value(d, 5)) != 0) {
        return st;
    }
    pop(d);
    return 0;
}

static int input_member(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen)
{
    input_ctx *c = ctx;
    keel__v2_tensor *t = c->t;
    char got[48];
    int st;

    push_key(d, raw, rawlen);
    if (key_is(d, klen, "name")) {
        if ((st = dup_key(d, &c->seen_name)) != 0 ||
            (st = read_cstring_local(d, true, &t->name)) != 0)
            return st;
    } else if (key_is(d, klen, "shape")) {
        if ((st = dup_key(d, &c->seen_shape)) != 0 || (st = read_shape(d, t)) != 0)
            return st;
    } else if (key_is(d, klen, "datatype")) {
        const char *name;
        size_t n;
        keel_datatype dt;
        if ((st = dup_key(d, &c->seen_datatype)) != 0 || (st = read_tmp_cstring(d, false, &n)) != 0)
            return st;
        name = d->tmp.p; /* valid until the next key or string is read */
        dt = keel_datatype_from_name(name);
        /* KServe names only ("FP32"); keel_datatype_from_name also takes "TYPE_FP32". */
        if (dt == KEEL_TYPE_INVALID || strcmp(keel_datatype_name(dt), name) != 0) {
            sanitize(name, n, 32, got, sizeof(got));
            return fail(d, 400,
                        "unknown datatype \"%s\" (expected BOOL, UINT8, UINT16, UINT32, UINT64, "
                        "INT8, INT16, INT32, INT64, FP16, FP32, FP64 or BYTES)",
                        got);
        }
        t->datatype = dt;
    } else if (key_is(d, klen, "parameters")) {
        if ((st = dup_key(d, &c->seen_params)) != 0)
            return st;
        if (d->p >= d->end || *d->p != '{') {
            describe(d->p, d->end, got, sizeof(got));
            return fail(d, 400, "expected an object, got %s", got);
        }
        if ((st = object_each(d, input_param_member, c)) != 0)
            return st;
    } else if (key_is(d, klen, "data")) {
        if ((st = dup_key(d, &c->seen_data)) != 0)
            return st;
        if (c->seen_shape && c->seen_datatype) {
            if ((st = decode_data(d, t, 4)) != 0)
                return st;
        } else {
            c->data_at = d->p;
            if ((st = skip_value(d, 4)) != 0)
                return st;
        }
    } else if ((st = skip_value(d, 4)) != 0) {
        return st;
    }
    pop(d);
    return 0;
}

/* Takes t's data from the binary section. Path: inputs[i]. */
static int take_binary(dec *d, keel__v2_tensor *t, uint64_t size)
{
    char shape[128];
    char name[48];
    size_t need;
    int st = 0;

    sanitize(t->name, strlen(t->name), 40, name, sizeof(name));
    push_name(d, "parameters");
    push_name(d, "binary_data_size");
    if (!d->has_bin) {
        st = fail(d, 400,
                  "input '%s' has binary data but the request has no binary section "
                  "(no Inference-Header-Content-Length header)",
                  name);
    } else if (size > d->bin_len - d->bin_used) {
        st = fail(d, 400,
                  "input '%s': %" PRIu64 " bytes from offset %zu run past the end of the "
                  "%zu-byte binary section",
                  name, size, d->bin_used, d->bin_len);
    } else if (t->datatype == KEEL_TYPE_BYTES) {
        const unsigned char *p = (const unsigned char *)d->bin + d->bin_used;
        size_t off = 0;
        bool ok = true;
        for (size_t i = 0; i < t->count && ok; i++) {
            uint32_t l;
            if (size - off < 4) {
                ok = false;
                break;
            }
            memcpy(&l, p + off, 4);
            off += 4;
            if (size - off < l)
                ok = false;
            else
                off += l;
        }
        if (!ok || off != size) {
            shape_str(t, shape, sizeof(shape));
            st = fail(d, 400,
                      "input '%s': the %" PRIu64 " bytes are not exactly %zu length-prefixed "
                      "BYTES elements (shape %s)",
                      name, size, t->count, shape);
        }
    } else if (__builtin_mul_overflow(t->count, keel_datatype_size(t->datatype), &need) ||
               need != size) {
        shape_str(t, shape, sizeof(shape));
        st = fail(d, 400,
                  "input '%s': %" PRIu64 " bytes given, shape %s of %s needs %zu elements of "
                  "%zu bytes",
                  name, size, shape, keel_datatype_name(t->datatype), t->count,
                  keel_datatype_size(t->datatype));
    }
    if (st != 0)
        return st;
    pop(d);
    pop(d);
    t->data = size > 0 ? d->bin + d->bin_used : NULL;
    t->bytes = (size_t)size;
    t->owned = false;
    t->binary = true;
    d->bin_used += (size_t)size;
    return 0;
}

/* One element of "inputs"; path: inputs[i]. */
static int read_input(dec *d, size_t i)
{
    keel__v2_request *r = d->r;
    keel__v2_tensor *t = &r->inputs[i];
    input_ctx c = {.t = t};
    char got[48];
    int st;

    if (d->p >= d->end || *d->p != '{') {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected an object, got %s", got);
    }
    if ((st = object_each(d, input_member, &c)) != 0)
        return st;
    if (!c.seen_name) {
        push_name(d, "name");
        return fail(d, 400, "required");
    }
    if (!c.seen_shape) {
        push_name(d, "shape");
        return fail(d, 400, "required");
    }
    if (!c.seen_datatype) {
        push_name(d, "datatype");
        return fail(d, 400, "required");
    }
    if (c.seen_data && c.has_bds)
        return fail(d, 400,
                    "both \"data\" and \"parameters\": {\"binary_data_size\"} given; use one");
    if (!c.seen_data && !c.has_bds) {
        push_name(d, "data");
        return fail(d, 400, "required (or parameters.binary_data_size with a binary section)");
    }
    for (size_t j = 0; j < i; j++) {
        if (strcmp(r->inputs[j].name, t->name) == 0) {
            char name[48];
            sanitize(t->name, strlen(t->name), 40, name, sizeof(name));
            push_name(d, "name");
            return fail(d, 400, "input '%s' given more than once (also inputs[%zu])", name, j);
        }
    }
    if (c.data_at != NULL) {
        const char *save = d->p;
        d->p = c.data_at;
        push_name(d, "data");
        if ((st = decode_data(d, t, 4)) != 0)
            return st;
        pop(d);
        d->p = save;
    }
    if (c.has_bds)
        return take_binary(d, t, c.bds);
    return 0;
}

static int read_inputs(dec *d)
{
    keel__v2_request *r = d->r;
    size_t cap = 0;
    char got[48];
    int st;

    if (d->p >= d->end || *d->p != '[') {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected an array, got %s", got);
    }
    d->p = ws(d->p + 1, d->end);
    if (d->p < d->end && *d->p == ']') {
        d->p++;
        return 0;
    }
    for (;;) {
        push_index(d, r->ninputs);
        if (r->ninputs == KEEL__V2_MAX_INPUTS)
            return fail(d, 400, "more than %d inputs", KEEL__V2_MAX_INPUTS);
        if (r->ninputs == 0) {
            r->inputs = &r->one; /* the common case: no allocation */
            cap = 1;
        } else if (r->ninputs == cap) {
            size_t ncap = cap * 2 < 4 ? 4 : cap * 2;
            keel__v2_tensor *n = malloc(ncap * sizeof(*n));
            if (n == NULL)
                return fail_nomem(d);
            memcpy(n, r->inputs, r->ninputs * sizeof(*n));
            if (r->inputs != &r->one)
                free(r->inputs);
            r->inputs = n;
            cap = ncap;
        }
        memset(&r->inputs[r->ninputs], 0, sizeof(r->inputs[0]));
        r->ninputs++;
        if ((st = read_input(d, r->ninputs - 1)) != 0)
            return st;
        pop(d);
        d->p = ws(d->p, d->end);
        if (d->p < d->end && *d->p == ',') {
            d->p = ws(d->p + 1, d->end);
            continue;
        }
        if (d->p < d->end && *d->p == ']') {
            d->p++;
            return 0;
        }
        return fail_syntax(d, d->p, "expected ',' or ']' in an array");
    }
}

typedef struct output_ctx {
    keel_v2_output_req *o;
    bool seen_name, seen_params;
} output_ctx;

static int output_param_member(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen)
{
    output_ctx *c = ctx;
    int st;

    push_key(d, raw, rawlen);
    if (key_is(d, klen, "binary_data")) {
        if ((st = dup_key(d, &c->o->binary_given)) != 0 || (st = read_bool(d, &c->o->binary)) != 0)
            return st;
    } else if (key_is(d, klen, "classification")) {
        return fail(d, 400, "classification outputs are not supported");
    } else if ((st = skip_value(d, 5)) != 0) {
        return st;
    }
    pop(d);
    return 0;
}

static int output_member(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen)
{
    output_ctx *c = ctx;
    char got[48];
    int st;

    push_key(d, raw, rawlen);
    if (key_is(d, klen, "name")) {
        if ((st = dup_key(d, &c->seen_name)) != 0 || (st = read_cstring(d, true, &c->o->name)) != 0)
            return st;
    } else if (key_is(d, klen, "parameters")) {
        if ((st = dup_key(d, &c->seen_params)) != 0)
            return st;
        if (d->p >= d->end || *d->p != '{') {
            describe(d->p, d->end, got, sizeof(got));
            return fail(d, 400, "expected an object, got %s", got);
        }
        if ((st = object_each(d, output_param_member, c)) != 0)
            return st;
    } else if ((st = skip_value(d, 4)) != 0) {
        return st;
    }
    pop(d);
    return 0;
}

static int read_outputs(dec *d)
{
    keel_v2_request_info *info = &d->r->info;
    size_t cap = 0;
    char got[48];
    int st;

    if (d->p >= d->end || *d->p != '[') {
        describe(d->p, d->end, got, sizeof(got));
        return fail(d, 400, "expected an array, got %s", got);
    }
    d->p = ws(d->p + 1, d->end);
    if (d->p < d->end && *d->p == ']') {
        d->p++;
        return 0;
    }
    for (;;) {
        output_ctx c = {0};

        push_index(d, info->noutputs);
        if (info->noutputs == KEEL__V2_MAX_OUTPUTS)
            return fail(d, 400, "more than %d outputs", KEEL__V2_MAX_OUTPUTS);
        if (info->noutputs == cap) {
            size_t ncap = cap ? cap * 2 : 4;
            keel_v2_output_req *n = realloc(info->outputs, ncap * sizeof(*n));
            if (n == NULL)
                return fail_nomem(d);
            info->outputs = n;
            cap = ncap;
        }
        c.o = &info->outputs[info->noutputs];
        memset(c.o, 0, sizeof(*c.o));
        info->noutputs++;
        if (d->p >= d->end || *d->p != '{') {
            describe(d->p, d->end, got, sizeof(got));
            return fail(d, 400, "expected an object, got %s", got);
        }
        if ((st = object_each(d, output_member, &c)) != 0)
            return st;
        if (!c.seen_name) {
            push_name(d, "name");
            return fail(d, 400, "required");
        }
        for (size_t j = 0; j + 1 < info->noutputs; j++) {
            if (strcmp(info->outputs[j].name, c.o->name) == 0) {
                char name[48];
                sanitize(c.o->name, strlen(c.o->name), 40, name, sizeof(name));
                push_name(d, "name");
                return fail(d, 400, "output '%s' requested more than once (also outputs[%zu])",
                            name, j);
            }
        }
        pop(d);
        d->p = ws(d->p, d->end);
        if (d->p < d->end && *d->p == ',') {
            d->p = ws(d->p + 1, d->end);
            continue;
        }
        if (d->p < d->end && *d->p == ']') {
            d->p++;
            return 0;
        }
        return fail_syntax(d, d->p, "expected ',' or ']' in an array");
    }
}

typedef struct params_ctx {
    bool seen_timeout, seen_bdo, seen_priority;
} params_ctx;

static int param_member(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen)
{
    params_ctx *c = ctx;
    keel__v2_request *r = d->r;
    char got[48];
    char *key = NULL;
    char *value = NULL;
    int st;

    push_key(d, raw, rawlen);
    if (key_is(d, klen, "timeout")) {
        if ((st = dup_key(d, &c->seen_timeout)) != 0 ||
            (st = read_uint(d, UINT64_MAX, &r->info.timeout_us)) != 0)
            return st;
        r->has_timeout = true;
        pop(d);
        return 0;
    }
    if (key_is(d, klen, "priority")) {
        uint64_t prio = 0;
        if ((st = dup_key(d, &c->seen_priority)) != 0 ||
            (st = read_uint(d, UINT32_MAX, &prio)) != 0)
            return st;
        r->info.priority = (uint32_t)prio;
        pop(d);
        return 0;
    }
    if (key_is(d, klen, "binary_data_output")) {
        if ((st = dup_key(d, &c->seen_bdo)) != 0 ||
            (st = read_bool(d, &r->info.binary_data_output)) != 0)
            return st;
        pop(d);
        return 0;
    }
    if (klen == 0)
        return fail(d, 400, "a parameter name must not be empty");
    if (memchr(d->tmp.p, '\0', klen) != NULL)
        return fail(d, 400, "a parameter name must not contain a NUL character (\\u0000)");
    for (size_t i = 0; i < r->nparams; i++) {
        if (strcmp(r->params[i].key, d->tmp.p) == 0)
            return fail(d, 400, "given more than once");
    }
    if (r->nparams == KEEL__V2_MAX_PARAMS)
        return fail(d, 400, "more than %d parameters", KEEL__V2_MAX_PARAMS);
    if ((key = malloc(klen + 1)) == NULL)
        return fail_nomem(d);
    memcpy(key, d->tmp.p, klen + 1);
    if (d->p < d->end && *d->p == '"') {
        st = read_cstring(d, false, &value);
    } else if (d->p < d->end && (*d->p == 't' || *d->p == 'f')) {
        bool b;
        st = read_bool(d, &b);
        if (st == 0 && (value = strdup(b ? "true" : "false")) == NULL)
            st = fail_nomem(d);
    } else if (kind_at(d->p, d->end) != NULL && strcmp(kind_at(d->p, d->end), "a number") == 0) {
        keel__ff_num n;
        const char *q = keel__ff_scan(d->p, d->end, &n);
        if (q == NULL) {
            st = fail_syntax(d, d->p, "invalid number");
        } else if ((value = malloc((size_t)(q - d->p) + 1)) == NULL) {
            st = fail_nomem(d);
        } else {
            memcpy(value, d->p, (size_t)(q - d->p));
            value[q - d->p] = '\0';
            d->p = q;
            st = 0;
        }
    } else {
        if (kind_at(d->p, d->end) == NULL)
            st = fail_syntax(d, d->p, "expected a value");
        else {
            describe(d->p, d->end, got, sizeof(got));
            st = fail(d, 400, "expected a string, number or boolean, got %s", got);
        }
    }
    if (st == 0 && r->nparams % 8 == 0) {
        keel__v2_param *np = realloc(r->params, (r->nparams + 8) * sizeof(*np));
        if (np == NULL)
            st = fail_nomem(d);
        else
            r->params = np;
    }
    if (st != 0) {
        free(key);
        free(value);
        return st;
    }
    r->params[r->nparams].key = key;
    r->params[r->nparams].value = value;
    r->nparams++;
    pop(d);
    return 0;
}

typedef struct top_ctx {
    bool seen_id, seen_params, seen_inputs, seen_outputs;
} top_ctx;

static int top_member(dec *d, void *ctx, size_t klen, const char *raw, size_t rawlen)
{
    top_ctx *c = ctx;
    char got[48];
    int st;

    push_key(d, raw, rawlen);
    if (key_is(d, klen, "id")) {
        char *id;
        if ((st = dup_key(d, &c->seen_id)) != 0 || (st = read_cstring_local(d, false, &id)) != 0)
            return st;
        d->r->info.id = id;
    } else if (key_is(d, klen, "parameters")) {
        params_ctx pc = {0};
        if ((st = dup_key(d, &c->seen_params)) != 0)
            return st;
        if (d->p >= d->end || *d->p != '{') {
            describe(d->p, d->end, got, sizeof(got));
            return fail(d, 400, "expected an object, got %s", got);
        }
        if ((st = object_each(d, param_member, &pc)) != 0)
            return st;
    } else if (key_is(d, klen, "inputs")) {
        if ((st = dup_key(d, &c->seen_inputs)) != 0 || (st = read_inputs(d)) != 0)
            return st;
    } else if (key_is(d, klen, "outputs")) {
        if ((st = dup_key(d, &c->seen_outputs)) != 0 || (st = read_outputs(d)) != 0)
            return st;
    } else if ((st = skip_value(d, 2)) != 0) {
        return st;
    }
    pop(d);
    return 0;
}

static int decode_top(dec *d)
{
    top_ctx c = {0};
    int st;

    d->p = ws(d->p, d->end);
    if (d->p >= d->end)
        return fail_syntax(d, d->p, "the JSON is empty");
    if (*d->p != '{') {
        const char *k = kind_at(d->p, d->end);
        if ((st = skip_value(d, 1)) != 0)
            return st;
        return fail(d, 400, "the request must be a JSON object, got %s", k);
    }
    if ((st = object_each(d, top_member, &c)) != 0)
        return st;
    d->p = ws(d->p, d->end);
    if (d->p != d->end)
        return fail_syntax(d, d->p, "unexpected data after the JSON object");
    if (!c.seen_inputs) {
        push_name(d, "inputs");
        return fail(d, 400, "required");
    }
    if (d->has_bin && d->bin_used != d->bin_len)
        return fail(d, 400,
                    "the binary section has %zu bytes but the inputs' binary_data_size add up to "
                    "%zu",
                    d->bin_len, d->bin_used);
    return 0;
}

void keel_v2_request_info_fini(keel_v2_request_info *info)
{
    if (info == NULL)
        return;
    for (size_t i = 0; i < info->noutputs; i++)
        free(info->outputs[i].name);
    if (info->outputs != NULL) /* free(NULL) is ~40 instructions of jemalloc's */
        free(info->outputs);
    memset(info, 0, sizeof(*info));
}

void keel__v2_request_fini(keel__v2_request *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->ninputs; i++) {
        strs_free(r, r->inputs[i].name);
        if (r->inputs[i].owned)
            free((void *)r->inputs[i].data);
    }
    if (r->inputs != &r->one)
        free(r->inputs);
    strs_free(r, (char *)r->info.id);
    r->info.id = NULL;
    for (size_t i = 0; i < r->nparams; i++) {
        free(r->params[i].key);
        free(r->params[i].value);
    }
    if (r->params != NULL)
        free(r->params);
    keel_v2_request_info_fini(&r->info);
    memset(r, 0, sizeof(*r));
}

int keel__v2_decode(const char *body, size_t body_len, size_t header_len, keel__v2_request *out,
                    char *err, size_t errlen)
{
    dec d = {0};
    char tmp[TMP_SMALL]; /* d.tmp's first storage: keys and short strings need no malloc */
    int st;

    memset(out, 0, sizeof(*out));
    if (errlen > 0)
        err[0] = '\0';
    d.err = err;
    d.errlen = errlen;
    d.r = out;
    d.tmp = (sbuf){.p = tmp, .cap = sizeof(tmp), .fixed = true};
    if (body == NULL)
        body = "";
    d.base = body;
    d.p = body;
    if (header_len == (size_t)-1) {
        d.end = body + body_len;
    } else {
        if (header_len > body_len) {
            snprintf(err, errlen,
                     "Inference-Header-Content-Length is %zu but the body has only %zu bytes",
                     header_len, body_len);
            return 400;
        }
        d.end = body + header_len;
        d.bin = body + header_len;
        d.bin_len = body_len - header_len;
        d.has_bin = true;
    }
    st = decode_top(&d);
    if (!d.tmp.fixed)
        free(d.tmp.p);
    if (st != 0) {
        keel__v2_request_fini(out);
        return st;
    }
    return 200;
}

int keel_v2_decode_infer(keel_request *req, const char *body, size_t body_len, size_t header_len,
                         keel_v2_request_info *info, char *err, size_t errlen)
{
    return keel_v2_decode_infer_lent(req, body, body_len, header_len, NULL, info, err, errlen);
}

/* Whether a binary tensor's data may be read in place: aligned for its elements (BYTES are
 * read byte by byte). */
static bool lendable(const keel__v2_tensor *t)
{
    size_t a = t->datatype == KEEL_TYPE_BYTES ? 1 : keel_datatype_size(t->datatype);

    return a > 0 && ((uintptr_t)t->data % a) == 0;
}

int keel_v2_decode_infer_lent(keel_request *req, const char *body, size_t body_len,
                              size_t header_len, const keel_v2_body_lender *lender,
                              keel_v2_request_info *info, char *err, size_t errlen)
{
    keel__v2_request r;
    keel_err e = KEEL_OK;
    int st;

    memset(info, 0, sizeof(*info));
    if (req == NULL) {
        snprintf(err, errlen, "internal error: no request to decode into");
        return 500;
    }
    if ((st = keel__v2_decode(body, body_len, header_len, &r, err, errlen)) != 200)
        return st;
    if (r.info.id != NULL && (e = keel_request_set_id(req, r.info.id)) != KEEL_OK)
        goto fail;
    for (size_t i = 0; i < r.nparams; i++) {
        if ((e = keel_request_set_parameter(req, r.params[i].key, r.params[i].value)) != KEEL_OK)
            goto fail;
    }
    if (r.has_timeout)
        keel_request_set_timeout_us(req, r.info.timeout_us);
    if (r.info.priority != 0)
        keel_request_set_priority(req, r.info.priority);
    for (size_t i = 0; i < r.ninputs; i++) {
        keel__v2_tensor *t = &r.inputs[i];
        /* A tensor decoded from JSON is a buffer of its own: the request takes it (no copy).
         * A binary one points into the body: borrowed when the caller lends the body and the
         * data is aligned (one reference per input), else copied. */
        if (t->owned && t->data != NULL) {
            e = keel_request_add_input_owned(req, t->name, t->datatype, t->shape, t->ndim,
                                             (void *)t->data, t->bytes);
            if (e == KEEL_OK) {
                t->data = NULL;
                t->owned = false;
            }
        } else if (lender != NULL && t->binary && t->data != NULL && t->bytes > 0 && lendable(t)) {
            lender->retain(lender->arg);
            e = keel_request_add_input_borrowed(req, t->name, t->datatype, t->shape, t->ndim,
                                                t->data, t->bytes, lender->release, lender->arg);
            if (e != KEEL_OK)
                lender->release(lender->arg); /* not taken: the reference goes back */
        } else {
            e = keel_request_add_input(req, t->name, t->datatype, t->shape, t->ndim, t->data,
                                       t->bytes);
        }
        if (e == KEEL_EINVAL) {
            snprintf(err, errlen, "inputs[%zu]: %s", i, keel_request_error(req));
            keel__v2_request_fini(&r);
            return 400;
        }
        if (e != KEEL_OK)
            goto fail;
    }
    for (size_t i = 0; i < r.info.noutputs; i++) {
        if ((e = keel_request_add_output(req, r.info.outputs[i].name)) != KEEL_OK)
            goto fail;
    }
    *info = r.info; /* its outputs move to the caller; its id stays the request's */
    info->id = r.info.id != NULL ? keel_request_id(req) : NULL;
    memset(&r.info.outputs, 0, sizeof(r.info.outputs));
    r.info.noutputs = 0;
    keel__v2_request_fini(&r);
    return 200;

fail:
    keel__v2_request_fini(&r);
    snprintf(err, errlen, "%s while decoding the request",
             e == KEEL_ENOMEM ? "out of memory" : keel_strerror(e));
    return 500;
}

/* ---------------------------------------------------------------- encoding */

/* Room for one element of any fixed-size type, its comma and a format NUL. */
#define ELEM_MAX (KEEL__FF_FMT_MAX + 4)

static void put_u64(sbuf *b, uint64_t v)
{
    if (sb_reserve(b, 24))
        b->len += keel__ff_format_u64(v, b->p + b->len);
}

/* Checks a BYTES output: exactly count framed elements (else false) and whether every
 * element is UTF-8. */
static bool bytes_scan(const keel_tensor_view *v, size_t count, bool *utf8)
{
    const unsigned char *p = v->data;
    size_t off = 0;

    *utf8 = true;
    for (size_t i = 0; i < count; i++) {
        uint32_t l;
        if (v->bytes - off < 4)
            return false;
        memcpy(&l, p + off, 4);
        off += 4;
        if (v->bytes - off < l)
            return false;
        if (*utf8 && !utf8_valid(p + off, l))
            *utf8 = false;
        off += l;
    }
    return off == v->bytes;
}

static void put_elems(sbuf *b, const keel_tensor_view *v, size_t count)
{
    const unsigned char *p = v->data;

    for (size_t i = 0; i < count; i++) {
        char *o;
        if (!sb_reserve(b, ELEM_MAX))
            return;
        o = b->p + b->len;
        if (i > 0)
            *o++ = ',';
        switch (v->datatype) {
        case KEEL_TYPE_BOOL:
            if (p[i]) {
                memcpy(o, "true", 4);
                o += 4;
            } else {
                memcpy(o, "false", 5);
                o += 5;
            }
            break;
        case KEEL_TYPE_UINT8:
            o += keel__ff_format_u64(p[i], o);
            break;
        case KEEL_TYPE_UINT16: {
            uint16_t x;
            memcpy(&x, p + i * 2, 2);
            o += keel__ff_format_u64(x, o);
            break;
        }
        case KEEL_TYPE_UINT32: {
            uint32_t x;
            memcpy(&x, p + i * 4, 4);
            o += keel__ff_format_u64(x, o);
            break;
        }
        case KEEL_TYPE_UINT64: {
            uint64_t x;
            memcpy(&x, p + i * 8, 8);
            o += keel__ff_format_u64(x, o);
            break;
        }
        case KEEL_TYPE_INT8:
            o += keel__ff_format_i64((int8_t)p[i], o);
            break;
        case KEEL_TYPE_INT16: {
            int16_t x;
            memcpy(&x, p + i * 2, 2);
            o += keel__ff_format_i64(x, o);
            break;
        }
        case KEEL_TYPE_INT32: {
            int32_t x;
            memcpy(&x, p + i * 4, 4);
            o += keel__ff_format_i64(x, o);
            break;
        }
        case KEEL_TYPE_INT64: {
            int64_t x;
            memcpy(&x, p + i * 8, 8);
            o += keel__ff_format_i64(x, o);
            break;
        }
        case KEEL_TYPE_FP16: {
            uint16_t h;
            memcpy(&h, p + i * 2, 2);
            if ((h & 0x7c00) == 0x7c00) {
                memcpy(o, "null", 4);
                o += 4;
            } else {
                o += keel__ff_format_f16(h, o);
            }
            break;
        }
        case KEEL_TYPE_FP32: {
            float f;
            memcpy(&f, p + i * 4, 4);
            if (!isfinite(f)) {
                memcpy(o, "null", 4);
                o += 4;
            } else {
                o += keel__ff_format_f32(f, o);
            }
            break;
        }
        case KEEL_TYPE_FP64: {
            double x;
            memcpy(&x, p + i * 8, 8);
            if (!isfinite(x)) {
                memcpy(o, "null", 4);
                o += 4;
            } else {
                o += keel__ff_format_f64(x, o);
            }
            break;
        }
        default:
            break;
        }
        b->len = (size_t)(o - b->p);
    }
}

static void put_bytes_elems(sbuf *b, const keel_tensor_view *v, size_t count)
{
    const unsigned char *p = v->data;
    size_t off = 0;

    for (size_t i = 0; i < count; i++) {
        uint32_t l;
        if (i > 0)
            sb_putc(b, ',');
        memcpy(&l, p + off, 4);
        off += 4;
        put_json_string(b, (const char *)p + off, l);
        off += l;
    }
}

/* Up to this many outputs, the encoder's per-output arrays live on the stack (a response
 * with more allocates them). */
#define ENCODE_SMALL 8

/* keel__v2_encode, writing into buf (cap bytes, the caller's; NULL: none) while the body
 * fits there: out->body is then buf, else malloc'd. */
static int encode_into(const char *model_name, int64_t version, const char *id,
                       const keel_tensor_view *outs, const bool *binary, size_t n, char *buf,
                       size_t cap, keel_v2_response *out, char *err, size_t errlen)
{
    sbuf b = {0};
    bool bin_small[ENCODE_SMALL];
    bool *bin = bin_small;
    char num[24];
    bool any_bin = false;
    size_t json_len;

    memset(out, 0, sizeof(*out));
    if (errlen > 0)
        err[0] = '\0';
    if (buf != NULL && cap > 0)
        b = (sbuf){.p = buf, .cap = cap, .fixed = true};
    if (n > ENCODE_SMALL && (bin = calloc(n, sizeof(*bin))) == NULL)
        goto nomem;
    /* Check every tensor before writing anything. */
    for (size_t i = 0; i < n; i++) {
        const keel_tensor_view *v = &outs[i];
        size_t count = 1;
        size_t need;
        bool utf8 = true;
        const char *nm = v->name != NULL ? v->name : "";

        if (v->name == NULL || v->datatype <= KEEL_TYPE_INVALID ||
            v->datatype >= KEEL_TYPE_COUNT_ || (v->ndim > 0 && v->shape == NULL) ||
            (v->bytes > 0 && v->data == NULL)) {
            snprintf(err, errlen, "output %zu ('%s') is not a valid tensor", i, nm);
            goto bad;
        }
        for (size_t k = 0; k < v->ndim; k++) {
            if (v->shape[k] < 0 || (uint64_t)v->shape[k] > SIZE_MAX ||
                __builtin_mul_overflow(count, (size_t)v->shape[k], &count)) {
                snprintf(err, errlen, "output '%s' has an invalid shape", nm);
                goto bad;
            }
        }
        if (v->datatype == KEEL_TYPE_BYTES) {
            if (!bytes_scan(v, count, &utf8)) {
                snprintf(err, errlen, "output '%s': BYTES data is not %zu length-prefixed elements",
                         nm, count);
                goto bad;
            }
        } else if (__builtin_mul_overflow(count, keel_datatype_size(v->datatype), &need) ||
                   need != v->bytes) {
            snprintf(err, errlen, "output '%s': %zu bytes for %zu elements of %s", nm, v->bytes,
                     count, keel_datatype_name(v->datatype));
            goto bad;
        }
        bin[i] = (binary != NULL && binary[i]) || !utf8;
        any_bin = any_bin || bin[i];
    }

    sb_puts(&b, "{\"model_name\":");
    put_json_string(&b, model_name != NULL ? model_name : "",
                    model_name != NULL ? strlen(model_name) : 0);
    sb_puts(&b, ",\"model_version\":\"");
    sb_put(&b, num, keel__ff_format_i64(version, num));
    sb_putc(&b, '"');
    if (id != NULL) {
        sb_puts(&b, ",\"id\":");
        put_json_string(&b, id, strlen(id));
    }
    sb_puts(&b, ",\"outputs\":[");
    for (size_t i = 0; i < n; i++) {
        const keel_tensor_view *v = &outs[i];
        size_t count = 1;

        for (size_t k = 0; k < v->ndim; k++)
            count *= (size_t)v->shape[k];
        sb_puts(&b, i > 0 ? ",{\"name\":" : "{\"name\":");
        put_json_string(&b, v->name, strlen(v->name));
        sb_puts(&b, ",\"datatype\":\"");
        sb_puts(&b, keel_datatype_name(v->datatype));
        sb_puts(&b, "\",\"shape\":[");
        for (size_t k = 0; k < v->ndim; k++) {
            if (k > 0)
                sb_putc(&b, ',');
            put_u64(&b, (uint64_t)v->shape[k]);
        }
        sb_putc(&b, ']');
        if (bin[i]) {
            sb_puts(&b, ",\"parameters\":{\"binary_data_size\":");
            put_u64(&b, v->bytes);
            sb_puts(&b, "}}");
            continue;
        }
        sb_puts(&b, ",\"data\":[");
        if (v->datatype == KEEL_TYPE_BYTES)
            put_bytes_elems(&b, v, count);
        else
            put_elems(&b, v, count);
        sb_puts(&b, "]}");
    }
    sb_puts(&b, "]}");
    json_len = b.len;
    for (size_t i = 0; i < n; i++) {
        if (bin[i])
            sb_put(&b, outs[i].data, outs[i].bytes);
    }
    sb_reserve(&b, 1);
    if (b.oom)
        goto nomem;
    b.p[b.len] = '\0';
    if (bin != bin_small)
        free(bin);
    out->body = b.p;
    out->body_len = b.len;
    out->json_len = json_len;
    out->has_binary = any_bin;
    return 0;

nomem:
    snprintf(err, errlen, "out of memory while encoding the response");
bad:
    if (!b.fixed)
        free(b.p);
    if (bin != bin_small)
        free(bin);
    return 500;
}

int keel__v2_encode(const char *model_name, int64_t version, const char *id,
                    const keel_tensor_view *outs, const bool *binary, size_t n,
                    keel_v2_response *out, char *err, size_t errlen)
{
    return encode_into(model_name, version, id, outs, binary, n, NULL, 0, out, err, errlen);
}

int keel_v2_encode_infer(const keel_request *req, const char *model_name,
                         const keel_v2_request_info *info, keel_v2_response *out, char *err,
                         size_t errlen)
{
    return keel_v2_encode_infer_into(req, model_name, info, NULL, 0, out, err, errlen);
}

int keel_v2_encode_infer_into(const keel_request *req, const char *model_name,
                              const keel_v2_request_info *info, char *buf, size_t cap,
                              keel_v2_response *out, char *err, size_t errlen)
{
    keel_tensor_view views_small[ENCODE_SMALL];
    bool binary_small[ENCODE_SMALL];
    keel_tensor_view *views = views_small;
    bool *binary = binary_small;
    size_t n;
    const char *id = NULL;
    int st;

    memset(out, 0, sizeof(*out));
    if (req == NULL) {
        snprintf(err, errlen, "internal error: no request to encode");
        return 500;
    }
    n = info != NULL && info->noutputs > 0 ? info->noutputs : keel_request_output_count(req);
    if (n > ENCODE_SMALL && ((views = calloc(n, sizeof(*views))) == NULL ||
                             (binary = calloc(n, sizeof(*binary))) == NULL)) {
        free(views);
        snprintf(err, errlen, "out of memory while encoding the response");
        return 500;
    }
    for (size_t i = 0; i < n; i++) {
        keel_err e;
        if (info != NULL && info->noutputs > 0) {
            const keel_v2_output_req *o = &info->outputs[i];
            e = keel_request_output_by_name(req, o->name, &views[i]);
            binary[i] = o->binary_given ? o->binary : info->binary_data_output;
        } else {
            e = keel_request_output(req, i, &views[i]);
            binary[i] = info != NULL && info->binary_data_output;
        }
        if (e != KEEL_OK) {
            char name[48];
            const char *nm = info != NULL && info->noutputs > 0 ? info->outputs[i].name : "";
            sanitize(nm, strlen(nm), 40, name, sizeof(name));
            snprintf(err, errlen, "requested output '%s' is missing from the result", name);
            st = 500;
            goto out;
        }
    }
    if (info != NULL)
        id = info->id;
    else if (keel_request_id(req)[0] != '\0')
        id = keel_request_id(req);
    st = encode_into(model_name, keel_request_model_version(req), id, views, binary, n, buf, cap,
                     out, err, errlen);
out:
    if (views != views_small)
        free(views);
    if (binary != binary_small)
        free(binary);
    return st;
}

char *keel_v2_error_json(const char *msg)
{
    sbuf b = {0};

    if (msg == NULL)
        msg = "";
    sb_puts(&b, "{\"error\":");
    put_json_string(&b, msg, strlen(msg));
    sb_putc(&b, '}');
    sb_putc(&b, '\0');
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
