/*
 * edge.c: request-target checks and repository-path redaction (see edge.h).
 *
 * DESIGN
 * No state but the caller's keel_redact, which is written once before the server starts and
 * only read afterwards, from any thread; no locks.
 *
 * Why the raw target: libmicrohttpd percent-decodes the path before keel's router sees it, so
 * "/v2/models/a%2Fb/infer" arrives as "/v2/models/a/b/infer" and "%00" ends the string early;
 * libmicrohttpd 0.9.75 also keeps a raw NUL in the request line and hands over the URL cut
 * there. Only the target as received can tell those apart from a plain request.
 *
 * Why redaction: load errors name files ("/srv/models/m/1/model.json: not an XGBoost
 * model"), and those messages reach health, metadata and inference clients through "model
 * 'm' failed to load: ...". Operators see the full text in the log and through the
 * repository index (group model-repository); everyone else gets the path replaced.
 */
#include "edge.h"

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

unsigned keel__edge_check_target(const char *raw, size_t len, char *msg, size_t msglen)
{
    bool in_path = true;

    if (memchr(raw, '\0', len) != NULL) {
        snprintf(msg, msglen, "the URL contains a NUL byte");
        return 400;
    }
    if (memchr(raw, '%', len) == NULL)
        return 0; /* the usual target: nothing encoded (a vector scan, not a loop per byte) */
    for (size_t i = 0; i < len; i++) {
        int hi, lo;
        if (raw[i] == '?' || raw[i] == '#')
            in_path = false;
        if (raw[i] != '%' || i + 2 >= len || (hi = hexval(raw[i + 1])) < 0 ||
            (lo = hexval(raw[i + 2])) < 0)
            continue;
        if (hi == 0 && lo == 0) {
            snprintf(msg, msglen, "the URL contains an encoded NUL byte (%%00)");
            return 400;
        }
        if (in_path && hi == 2 && lo == 0xf) {
            snprintf(msg, msglen,
                     "the URL path contains an encoded '/' (%%2F); a model name cannot "
                     "contain '/'");
            return 400;
        }
    }
    return 0;
}

unsigned keel__edge_check_model_name(const char *name, char *msg, size_t msglen)
{
    size_t n = strlen(name);

    if (n == 0 || n > 255) {
        snprintf(msg, msglen, "invalid model name: %s", n == 0 ? "empty" : "longer than 255 bytes");
        return 400;
    }
    if (name[0] == '.') {
        snprintf(msg, msglen, "invalid model name '%.64s': it starts with '.'", name);
        return 400;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c == '/' || c < 0x20 || c == 0x7f) {
            snprintf(msg, msglen, "invalid model name: it contains %s",
                     c == '/' ? "'/'" : "a control character");
            return 400;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- redaction */

/* s as it appears inside a JSON string written by v2codec (quote, backslash and control
 * characters escaped; UTF-8 kept). */
static char *json_escaped(const char *s)
{
    size_t n = strlen(s), k = 0;
    char *out = malloc(n * 6 + 1);

    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            out[k++] = '\\';
            out[k++] = (char)c;
        } else if (c == '\n' || c == '\t' || c == '\r') {
            out[k++] = '\\';
            out[k++] = c == '\n' ? 'n' : c == '\t' ? 't' : 'r';
        } else if (c < 0x20) {
            k += (size_t)snprintf(out + k, 7, "\\u%04x", c);
        } else {
            out[k++] = (char)c;
        }
    }
    out[k] = '\0';
    return out;
}

static bool add_root(keel_redact *r, const char *root)
{
    size_t n = strlen(root);
    char *copy, *esc;

    while (n > 1 && root[n - 1] == '/')
        n--;
    /* "/" would match every absolute path a client sends (URLs echoed in 404s). */
    if (n == 0 || (n == 1 && root[0] == '/'))
        return true;
    if ((copy = strndup(root, n)) == NULL)
        return false;
    esc = json_escaped(copy);
    free(copy);
    if (esc == NULL)
        return false;
    for (size_t i = 0; i < r->nroots; i++) {
        if (strcmp(r->roots[i], esc) == 0) {
            free(esc);
            return true;
        }
    }
    r->roots[r->nroots++] = esc;
    return true;
}

bool keel__redact_init(keel_redact *r, const char *repo)
{
    char *real;
    bool ok;

    memset(r, 0, sizeof(*r));
    if (!add_root(r, repo))
        goto fail;
    real = realpath(repo, NULL);
    ok = real == NULL || add_root(r, real);
    free(real);
    if (!ok)
        goto fail;
    return true;
fail:
    keel__redact_fini(r);
    return false;
}

void keel__redact_fini(keel_redact *r)
{
    for (size_t i = 0; i < r->nroots; i++)
        free(r->roots[i]);
    memset(r, 0, sizeof(*r));
}

static bool word_start(const char *text, size_t at)
{
    return at == 0 || strchr(" \t\"'(:=,[", text[at - 1]) != NULL;
}

static bool word_end(char c)
{
    return c == '\0' || strchr(" \t\r\n\"':,;)]\\", c) != NULL;
}

/* The length of a path of the repository starting at text[at], or 0. */
static size_t path_at(const keel_redact *r, const char *text, size_t len, size_t at)
{
    if (!word_start(text, at))
        return 0;
    for (size_t k = 0; k < r->nroots; k++) {
        size_t n = strlen(r->roots[k]), end;
        if (n > len - at || memcmp(text + at, r->roots[k], n) != 0)
            continue;
        end = at + n;
        if (end < len && text[end] != '/' && !word_end(text[end]))
            continue; /* "/srv/models2" is not inside "/srv/models" */
        while (end < len && !word_end(text[end]))
            end++;
        return end - at;
    }
    return 0;
}

char *keel__redact(const keel_redact *r, const char *text, size_t len, size_t *outlen)
{
    const size_t rlen = sizeof(KEEL_REDACTED_PATH) - 1;
    char *out = NULL;
    size_t k = 0, cap = 0;
    bool any = false;

    *outlen = 0;
    if (r == NULL || r->nroots == 0 || text == NULL)
        return NULL;
    for (size_t i = 0; i < len;) {
        size_t n = path_at(r, text, len, i);
        if (n == 0) {
            i++;
            continue;
        }
        if (!any) {
            /* Redaction never makes the text longer by more than rlen per match, and every
             * match is at least 1 byte: len * (rlen + 1) bounds it. */
            if (len > (SIZE_MAX - 1) / (rlen + 1)) {
                *outlen = (size_t)-1;
                return NULL;
            }
            cap = len * (rlen + 1) + 1;
            if ((out = malloc(cap)) == NULL) {
                *outlen = (size_t)-1;
                return NULL;
            }
            memcpy(out, text, i);
            k = i;
            any = true;
        }
        memcpy(out + k, KEEL_REDACTED_PATH, rlen);
        k += rlen;
        i += n;
        /* Copy up to the next match. */
        while (i < len && path_at(r, text, len, i) == 0)
            out[k++] = text[i++];
    }
    if (!any)
        return NULL;
    out[k] = '\0';
    *outlen = k;
    return out;
}
