/*
 * restrict.h: restricted API groups (`--http-restricted-api GROUPS:KEY=VALUE`), Triton's
 * "Limit Endpoint Access", shared by every front end.
 *
 * DESIGN
 * The API is divided into Triton's groups (health, metadata, inference, shared-memory,
 * model-config, model-repository, statistics, trace, logging) plus keel's own `metrics`
 * (GET /metrics). A rule names some groups, a header KEY and the VALUE it must carry; a request
 * to a restricted group is allowed only if it carries exactly one header named KEY (HTTP; a
 * front end may also accept names with a prefix, such as gRPC's "triton-grpc-protocol-KEY")
 * whose value equals VALUE, compared in constant time. Each group is in at most one rule.
 *
 * Nothing here knows libmicrohttpd or gRPC: a front end classifies its request into a group
 * (keel__api_group_of_grpc for gRPC method names; the HTTP server maps its routes), then feeds
 * the request's headers (or metadata) to a keel_restrict_check and reads the verdict.
 *
 * A keel_restrict is filled on the main thread while the options are parsed and only read
 * afterwards, so any thread may check against it without a lock. It owns its keys and values;
 * values are never logged or echoed.
 */
#ifndef KEEL_SERVER_RESTRICT_H
#define KEEL_SERVER_RESTRICT_H

#include <stdbool.h>
#include <stddef.h>

typedef enum keel_api_group {
    KEEL_API_NONE = -1, /* no group: an unknown path (answered 404 whatever the headers) */
    KEEL_API_HEALTH = 0,
    KEEL_API_METADATA,
    KEEL_API_INFERENCE,
    KEEL_API_SHARED_MEMORY, /* accepted for Triton command lines; keel has no such API */
    KEEL_API_MODEL_CONFIG,
    KEEL_API_MODEL_REPOSITORY,
    KEEL_API_STATISTICS,
    KEEL_API_TRACE,   /* /v2/trace/setting, /v2/models/{m}/trace/setting */
    KEEL_API_LOGGING, /* accepted; keel has no logging API yet */
    KEEL_API_METRICS, /* keel's own: GET /metrics */
    KEEL_API_NGROUPS,
} keel_api_group;

/* The group's name as on the command line ("model-repository"), or "none". */
const char *keel__api_group_name(keel_api_group g);
/* The group named by the n bytes at name, or KEEL_API_NONE. */
keel_api_group keel__api_group_from_name(const char *name, size_t n);
/* The group of a gRPC method of inference.GRPCInferenceService ("ModelInfer", ...), or
 * KEEL_API_NONE for a name this table does not know. */
keel_api_group keel__api_group_of_grpc(const char *method);

#define KEEL_RESTRICT_VALUE_MAX 4096 /* bytes of a VALUE (or of its file) */

typedef struct keel_restrict_rule {
    char *key;   /* owned; the header name without any prefix */
    char *value; /* owned; NUL-terminated, value_len bytes */
    size_t value_len;
} keel_restrict_rule;

typedef struct keel_restrict {
    keel_restrict_rule rules[KEEL_API_NGROUPS]; /* a rule restricts at least one group */
    size_t nrules;
    int rule_of[KEEL_API_NGROUPS]; /* index into rules, -1 = unrestricted */
} keel_restrict;

/* Caller's storage; fini frees the keys and values (and wipes the values). */
void keel__restrict_init(keel_restrict *r);
void keel__restrict_fini(keel_restrict *r);

/*
 * Adds the rule of one option value "GROUPS:KEY=VALUE" (GROUPS comma-separated; VALUE is
 * literal, or "@PATH" to read it from a file, one trailing newline removed). Returns true, or
 * false with a one-line reason in msg (which never contains the value) and r unchanged: an
 * unknown group, a group already restricted, an empty or invalid KEY (an HTTP token), an empty
 * VALUE, one with control characters or surrounding blanks, an unreadable or too long file.
 */
bool keel__restrict_add(keel_restrict *r, const char *spec, char *msg, size_t msglen);

/* The rule restricting g, or NULL if g is open to everyone. */
const keel_restrict_rule *keel__restrict_rule(const keel_restrict *r, keel_api_group g);

/*
 * One request's check, on the caller's stack:
 *     keel_restrict_check k;
 *     keel__restrict_check_begin(&k, r, group, prefixes);
 *     for each header or metadata entry: keel__restrict_check_header(&k, name, n, value, vn);
 *     if (!keel__restrict_check_allowed(&k)) -> refuse (403 over HTTP, UNAVAILABLE over gRPC)
 * prefixes: NULL for HTTP (the header is KEY itself), else a NULL-terminated list of prefixes
 * one of which the entry's name must carry ("keel-grpc-protocol-", "triton-grpc-protocol-").
 * Names compare without regard to ASCII case; the value must match byte for byte, in a time
 * that depends only on the length of the expected value. A request carrying the header more
 * than once is refused, whatever the values: which one counts would depend on the front end
 * and on proxies.
 */
typedef struct keel_restrict_check {
    const keel_restrict_rule *rule; /* NULL: the group is open */
    const char *const *prefixes;
    unsigned matches;
    bool equal; /* the last matching entry's value equals the rule's */
} keel_restrict_check;

void keel__restrict_check_begin(keel_restrict_check *k, const keel_restrict *r, keel_api_group g,
                                const char *const *prefixes);
void keel__restrict_check_header(keel_restrict_check *k, const char *name, size_t name_len,
                                 const char *value, size_t value_len);
bool keel__restrict_check_allowed(const keel_restrict_check *k);

/* Triton's refusal text: "This API is restricted, expecting header 'KEY'" (prefix may be
 * NULL or "" for HTTP). Writes into buf; returns buf. */
const char *keel__restrict_message(const keel_restrict_rule *rule, const char *prefix, char *buf,
                                   size_t len);

/* Triton's gRPC refusal (status UNAVAILABLE): "This protocol is restricted, expecting header
 * 'triton-grpc-protocol-KEY'". Returns buf. */
const char *keel__restrict_message_grpc(const keel_restrict_rule *rule, char *buf, size_t len);

/* Constant-time equality of a (alen bytes) with the expected b (blen bytes): the time depends
 * on blen only. */
bool keel__restrict_equal(const char *a, size_t alen, const char *b, size_t blen);

#endif
