/*
 * restrict.c: restricted API groups: the option parser, the group tables and the per-request
 * check (see restrict.h).
 *
 * DESIGN
 * No state of its own and no locks: a keel_restrict is written by keel__restrict_add on the
 * main thread while `keel serve` parses its options, then only read, from any thread, by
 * keel__restrict_check_*. The check works on (name, value) pairs handed in by the front end,
 * so the HTTP server (libmicrohttpd headers) and a gRPC front end (metadata) share it.
 *
 * The value comparison must not tell an attacker how much of a guess was right: it reads every
 * byte of the expected value whatever the input, and folds the differences into one
 * accumulator that is only tested at the end (keel__restrict_equal).
 */
#include "restrict.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char *const group_names[KEEL_API_NGROUPS] = {
    [KEEL_API_HEALTH] = "health",
    [KEEL_API_METADATA] = "metadata",
    [KEEL_API_INFERENCE] = "inference",
    [KEEL_API_SHARED_MEMORY] = "shared-memory",
    [KEEL_API_MODEL_CONFIG] = "model-config",
    [KEEL_API_MODEL_REPOSITORY] = "model-repository",
    [KEEL_API_STATISTICS] = "statistics",
    [KEEL_API_TRACE] = "trace",
    [KEEL_API_LOGGING] = "logging",
    [KEEL_API_METRICS] = "metrics",
};

const char *keel__api_group_name(keel_api_group g)
{
    return g >= 0 && g < KEEL_API_NGROUPS ? group_names[g] : "none";
}

keel_api_group keel__api_group_from_name(const char *name, size_t n)
{
    for (int g = 0; g < KEEL_API_NGROUPS; g++) {
        if (strlen(group_names[g]) == n && memcmp(group_names[g], name, n) == 0)
            return (keel_api_group)g;
    }
    return KEEL_API_NONE;
}

/* inference.GRPCInferenceService's methods (grpc_service.proto), grouped as Triton does, and
 * the standard health check. */
static const struct {
    const char *method;
    keel_api_group group;
} grpc_methods[] = {
    {"ServerLive", KEEL_API_HEALTH},
    {"ServerReady", KEEL_API_HEALTH},
    {"ModelReady", KEEL_API_HEALTH},
    {"Check", KEEL_API_HEALTH}, /* grpc.health.v1.Health */
    {"Watch", KEEL_API_HEALTH},
    {"ServerMetadata", KEEL_API_METADATA},
    {"ModelMetadata", KEEL_API_METADATA},
    {"ModelInfer", KEEL_API_INFERENCE},
    {"ModelStreamInfer", KEEL_API_INFERENCE},
    {"ModelConfig", KEEL_API_MODEL_CONFIG},
    {"ModelStatistics", KEEL_API_STATISTICS},
    {"RepositoryIndex", KEEL_API_MODEL_REPOSITORY},
    {"RepositoryModelLoad", KEEL_API_MODEL_REPOSITORY},
    {"RepositoryModelUnload", KEEL_API_MODEL_REPOSITORY},
    {"SystemSharedMemoryStatus", KEEL_API_SHARED_MEMORY},
    {"SystemSharedMemoryRegister", KEEL_API_SHARED_MEMORY},
    {"SystemSharedMemoryUnregister", KEEL_API_SHARED_MEMORY},
    {"CudaSharedMemoryStatus", KEEL_API_SHARED_MEMORY},
    {"CudaSharedMemoryRegister", KEEL_API_SHARED_MEMORY},
    {"CudaSharedMemoryUnregister", KEEL_API_SHARED_MEMORY},
    {"TraceSetting", KEEL_API_TRACE},
    {"LogSettings", KEEL_API_LOGGING},
};

keel_api_group keel__api_group_of_grpc(const char *method)
{
    const char *slash = method != NULL ? strrchr(method, '/') : NULL;

    if (method == NULL)
        return KEEL_API_NONE;
    if (slash != NULL) /* a full path: "/inference.GRPCInferenceService/ModelInfer" */
        method = slash + 1;
    for (size_t i = 0; i < sizeof(grpc_methods) / sizeof(grpc_methods[0]); i++) {
        if (strcmp(grpc_methods[i].method, method) == 0)
            return grpc_methods[i].group;
    }
    return KEEL_API_NONE;
}

/* ---------------------------------------------------------------- rules */

void keel__restrict_init(keel_restrict *r)
{
    memset(r, 0, sizeof(*r));
    for (int g = 0; g < KEEL_API_NGROUPS; g++)
        r->rule_of[g] = -1;
}

static void wipe(char *p, size_t n)
{
    volatile char *v = p;

    for (size_t i = 0; i < n; i++)
        v[i] = 0;
}

static void rule_fini(keel_restrict_rule *rule)
{
    free(rule->key);
    if (rule->value != NULL) {
        wipe(rule->value, rule->value_len);
        free(rule->value);
    }
    memset(rule, 0, sizeof(*rule));
}

void keel__restrict_fini(keel_restrict *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->nrules; i++)
        rule_fini(&r->rules[i]);
    keel__restrict_init(r);
}

/* RFC 9110 5.6.2: token = 1*tchar. */
static bool is_tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Reads the value from path into a malloc'd string; false with msg. */
static bool read_value_file(const char *path, char **out, size_t *outlen, char *msg, size_t msglen)
{
    FILE *f = NULL;
    char *buf = NULL;
    size_t n;

    *out = NULL;
    if (path[0] == '\0') {
        snprintf(msg, msglen, "'@' must be followed by the path of a file holding the value");
        return false;
    }
    if ((f = fopen(path, "re")) == NULL) {
        snprintf(msg, msglen, "cannot read the value file '%.200s': %s", path, strerror(errno));
        return false;
    }
    if ((buf = malloc(KEEL_RESTRICT_VALUE_MAX + 2)) == NULL) {
        fclose(f);
        snprintf(msg, msglen, "out of memory");
        return false;
    }
    n = fread(buf, 1, KEEL_RESTRICT_VALUE_MAX + 2, f);
    if (ferror(f)) {
        snprintf(msg, msglen, "cannot read the value file '%.200s'", path);
        goto fail;
    }
    /* One line: drop the newline an editor or `echo` leaves at the end. */
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    if (n > KEEL_RESTRICT_VALUE_MAX) {
        snprintf(msg, msglen, "the value file '%.200s' is longer than %d bytes", path,
                 KEEL_RESTRICT_VALUE_MAX);
        goto fail;
    }
    fclose(f);
    buf[n] = '\0';
    *out = buf;
    *outlen = n;
    return true;
fail:
    fclose(f);
    wipe(buf, KEEL_RESTRICT_VALUE_MAX + 2);
    free(buf);
    return false;
}

/* A value a client can send: visible ASCII and inner blanks (an HTTP field value trimmed of
 * the blanks around it, without obs-text), at most KEEL_RESTRICT_VALUE_MAX bytes. */
static bool value_ok(const char *v, size_t n, char *msg, size_t msglen, const char *where)
{
    if (n == 0) {
        snprintf(msg, msglen, "the value%s is empty", where);
        return false;
    }
    if (n > KEEL_RESTRICT_VALUE_MAX) {
        snprintf(msg, msglen, "the value%s is longer than %d bytes", where,
                 KEEL_RESTRICT_VALUE_MAX);
        return false;
    }
    if (v[0] == ' ' || v[0] == '\t' || v[n - 1] == ' ' || v[n - 1] == '\t') {
        snprintf(msg, msglen,
                 "the value%s starts or ends with a blank, which HTTP removes from headers", where);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if ((c < 0x20 && c != '\t') || c >= 0x7f) {
            snprintf(msg, msglen,
                     "the value%s holds a control or non-ASCII byte at offset %zu: it could not "
                     "be sent in a header",
                     where, i);
            return false;
        }
    }
    return true;
}

bool keel__restrict_add(keel_restrict *r, const char *spec, char *msg, size_t msglen)
{
    const char *colon = strchr(spec, ':');
    const char *eq = colon != NULL ? strchr(colon + 1, '=') : NULL;
    keel_restrict_rule rule = {NULL, NULL, 0};
    keel_api_group groups[KEEL_API_NGROUPS];
    size_t ngroups = 0;
    const char *p, *value;

    if (colon == NULL || eq == NULL || colon == spec || eq == colon + 1 || eq[1] == '\0') {
        snprintf(msg, msglen,
                 "expected GROUPS:KEY=VALUE (GROUPS comma-separated, KEY and VALUE not empty)");
        return false;
    }
    if (r->nrules == KEEL_API_NGROUPS) {
        snprintf(msg, msglen, "too many rules");
        return false;
    }
    /* The groups. */
    for (p = spec; p < colon;) {
        const char *comma = memchr(p, ',', (size_t)(colon - p));
        const char *end = comma != NULL ? comma : colon;
        keel_api_group g = keel__api_group_from_name(p, (size_t)(end - p));

        if (end == p) {
            snprintf(msg, msglen, "empty API group name in '%.*s'", (int)(colon - spec), spec);
            return false;
        }
        if (g == KEEL_API_NONE) {
            snprintf(msg, msglen,
                     "unknown restricted api '%.*s' (known: health, metadata, inference, "
                     "shared-memory, model-config, model-repository, statistics, trace, "
                     "logging, metrics)",
                     (int)(end - p), p);
            return false;
        }
        if (r->rule_of[g] != -1) {
            snprintf(msg, msglen,
                     "restricted api '%s' can not be specified in multiple config groups",
                     group_names[g]);
            return false;
        }
        for (size_t i = 0; i < ngroups; i++) {
            if (groups[i] == g) {
                snprintf(msg, msglen, "restricted api '%s' is named twice", group_names[g]);
                return false;
            }
        }
        groups[ngroups++] = g;
        p = comma != NULL ? comma + 1 : colon;
        if (comma != NULL && p == colon) {
            snprintf(msg, msglen, "empty API group name in '%.*s'", (int)(colon - spec), spec);
            return false;
        }
    }
    /* The header name. */
    for (p = colon + 1; p < eq; p++) {
        if (!is_tchar((unsigned char)*p)) {
            snprintf(msg, msglen,
                     "the header name '%.*s' is not an HTTP token (letters, digits and "
                     "!#$%%&'*+-.^_`|~)",
                     (int)(eq - colon - 1), colon + 1);
            return false;
        }
    }
    if ((rule.key = strndup(colon + 1, (size_t)(eq - colon - 1))) == NULL) {
        snprintf(msg, msglen, "out of memory");
        return false;
    }
    /* The value: literal, or @file so that it stays out of ps and /proc/PID/cmdline. */
    value = eq + 1;
    if (value[0] == '@') {
        char where[256];
        if (!read_value_file(value + 1, &rule.value, &rule.value_len, msg, msglen))
            goto fail;
        snprintf(where, sizeof(where), " in '%.200s'", value + 1);
        if (!value_ok(rule.value, rule.value_len, msg, msglen, where))
            goto fail;
    } else {
        rule.value_len = strlen(value);
        if (!value_ok(value, rule.value_len, msg, msglen, ""))
            goto fail;
        if ((rule.value = strdup(value)) == NULL) {
            snprintf(msg, msglen, "out of memory");
            goto fail;
        }
    }
    for (size_t i = 0; i < ngroups; i++)
        r->rule_of[groups[i]] = (int)r->nrules;
    r->rules[r->nrules++] = rule;
    return true;
fail:
    rule_fini(&rule);
    return false;
}

const keel_restrict_rule *keel__restrict_rule(const keel_restrict *r, keel_api_group g)
{
    if (r == NULL || g < 0 || g >= KEEL_API_NGROUPS || r->rule_of[g] < 0)
        return NULL;
    return &r->rules[r->rule_of[g]];
}

/* ---------------------------------------------------------------- the check */

bool keel__restrict_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    volatile unsigned char acc = (unsigned char)(alen != blen);

    /* Every byte of b is read whatever a holds; a is read cyclically so that a shorter or
     * empty input costs the same time as a right one. */
    for (size_t i = 0; i < blen; i++) {
        unsigned char x = alen > 0 ? (unsigned char)a[i % alen] : 0;
        acc |= (unsigned char)(x ^ (unsigned char)b[i]);
    }
    return acc == 0;
}

void keel__restrict_check_begin(keel_restrict_check *k, const keel_restrict *r, keel_api_group g,
                                const char *const *prefixes)
{
    k->rule = keel__restrict_rule(r, g);
    k->prefixes = prefixes;
    k->matches = 0;
    k->equal = false;
}

/* Whether name (n bytes) is prefix + key, ignoring ASCII case. */
static bool name_is(const char *name, size_t n, const char *prefix, const char *key)
{
    size_t plen = strlen(prefix), klen = strlen(key);

    return n == plen + klen && strncasecmp(name, prefix, plen) == 0 &&
           strncasecmp(name + plen, key, klen) == 0;
}

void keel__restrict_check_header(keel_restrict_check *k, const char *name, size_t name_len,
                                 const char *value, size_t value_len)
{
    bool match = false;

    if (k->rule == NULL || name == NULL)
        return;
    if (k->prefixes == NULL) {
        match = name_is(name, name_len, "", k->rule->key);
    } else {
        for (const char *const *p = k->prefixes; *p != NULL && !match; p++)
            match = name_is(name, name_len, *p, k->rule->key);
    }
    if (!match)
        return;
    if (k->matches < 2)
        k->matches++;
    k->equal =
        value != NULL && keel__restrict_equal(value, value_len, k->rule->value, k->rule->value_len);
}

bool keel__restrict_check_allowed(const keel_restrict_check *k)
{
    if (k->rule == NULL)
        return true;
    return k->matches == 1 && k->equal;
}

const char *keel__restrict_message(const keel_restrict_rule *rule, const char *prefix, char *buf,
                                   size_t len)
{
    snprintf(buf, len, "This API is restricted, expecting header '%s%s'",
             prefix != NULL ? prefix : "", rule != NULL ? rule->key : "");
    return buf;
}

const char *keel__restrict_message_grpc(const keel_restrict_rule *rule, char *buf, size_t len)
{
    snprintf(buf, len, "This protocol is restricted, expecting header 'triton-grpc-protocol-%s'",
             rule != NULL ? rule->key : "");
    return buf;
}
