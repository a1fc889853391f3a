/*
 * config.c: see config.h.
 *
 * DESIGN
 * jansson parses the bytes into a tree (duplicate keys rejected, depth bounded by jansson's
 * JSON_PARSER_MAX_DEPTH, "\u0000" rejected so every string is a C string); this file then
 * walks the tree once, copying what keel uses into a keel__model_config allocated with
 * keel__malloc and friends, so every allocation keel owns can fail under fault injection and
 * is released on the single error path (keel__config_destroy() of the half-built config).
 * jansson's own allocations use its default allocator; when one fails jansson returns NULL,
 * which is reported as KEEL_ENOMEM like any other allocation failure.
 *
 * The rules follow Triton's protobuf JSON form: an explicit null means "absent" (as
 * protobuf's JSON parser reads it), and an integer field may be given as a JSON integer or as
 * a string of digits (protobuf writes 64-bit integers as strings). A known key with the wrong
 * type is an error. Every key is checked against `rules`, the table of Triton's fields and
 * what keel does with each (served, refused, or ignored with a warning; docs/OPERATIONS.md
 * has it for users): Triton itself refuses unknown fields, and a silently ignored typo in a
 * serving configuration is an incident waiting to happen, so an unknown key is an error with
 * the nearest known name when one is close (edit distance). Every message names the file
 * (with line and column for config.pbtxt, from the reader's "where" map), the field as a
 * JSON path and what was expected; text copied from the file into a message is clipped and
 * has its control characters replaced.
 *
 * config.pbtxt reaches this file as the JSON its reader (pbtxt.cpp) makes, plus the fields
 * the reader skipped (judged by the same table) and the positions of the fields it set.
 * Triton's backend names are mapped here (map_backend, map_fil), so everything after sees
 * keel's backends only.
 *
 * The normalised JSON (cfg->json) is rebuilt from the parsed fields rather than copied from
 * the input, so it holds exactly the fields keel serves, with every default filled in.
 *
 * Nothing here holds locks or keeps state between calls; any thread may call any function on
 * distinct objects.
 */
#include "repository/config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/core.h"
#include "repository/pbtxt.h"

#define CONFIG_MAX_BYTES (1024 * 1024)
#define MAX_QUEUE_SIZE_LIMIT 1000000
#define CLIP_LEN 64   /* bytes of user text quoted in a message */
#define WARN_MAX 2048 /* bytes of warnings kept per config */

typedef struct parser {
    const char *file; /* for messages */
    char *errbuf;
    size_t errlen;
    const json_t *where; /* config.pbtxt: path -> [line, column]; NULL for JSON */
    char *warnings; /* WARN_MAX bytes (or NULL): the harmless fields keel ignores, a line each */
} parser;

/* Finds the position of the field at path (or of its nearest enclosing field) in a
 * config.pbtxt: "input[0].dims[1]", then "input[0].dims", "input[0]", "input". */
static bool where_is(const parser *p, const char *at, int *line, int *column)
{
    char path[256];
    size_t n;

    if (p->where == NULL || at == NULL)
        return false;
    snprintf(path, sizeof(path), "%s", at);
    for (;;) {
        const json_t *loc = json_object_get(p->where, path);
        if (json_is_array(loc) && json_array_size(loc) == 2) {
            *line = (int)json_integer_value(json_array_get(loc, 0));
            *column = (int)json_integer_value(json_array_get(loc, 1));
            return true;
        }
        n = strlen(path);
        while (n > 0 && path[n - 1] != '.' && path[n - 1] != '[')
            n--;
        if (n == 0)
            return false;
        path[n - 1] = '\0';
    }
}

/* Writes "<file>" or "<file>:<line>:<column>" (config.pbtxt) for the field at. */
static int file_at(const parser *p, const char *at, char *buf, size_t len)
{
    int line, column;

    if (where_is(p, at, &line, &column))
        return snprintf(buf, len, "%s:%d:%d", p->file, line, column);
    return snprintf(buf, len, "%s", p->file);
}

/* ---- messages */

/*
 * Copies s into dst (dstlen >= 4) for quoting in a message: at most CLIP_LEN bytes, control
 * characters replaced by '?', non-ASCII bytes kept only if ascii_only is false, "..." appended
 * when clipped. A clip never splits a UTF-8 sequence.
 */
static void clip(char *dst, size_t dstlen, const char *s, bool ascii_only)
{
    size_t max = dstlen - 4;
    size_t n = 0;

    if (max > CLIP_LEN)
        max = CLIP_LEN;
    for (; s[n] != '\0' && n < max; n++) {
        unsigned char c = (unsigned char)s[n];
        dst[n] = (c < 0x20 || c == 0x7f || (ascii_only && c >= 0x80)) ? '?' : (char)c;
    }
    if (s[n] != '\0') {
        /* Back up to the start of a UTF-8 sequence so the message stays valid UTF-8. */
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
            n--;
        memcpy(dst + n, "...", 3);
        n += 3;
    }
    dst[n] = '\0';
}

/* Writes "<file>: <at>: <message>" (or "<file>: <message>" if at is NULL). Returns ECONFIG. */
static keel_err failf(const parser *p, const char *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static keel_err failf(const parser *p, const char *at, const char *fmt, ...)
{
    va_list ap;
    int n;

    char file[PATH_MAX + 32];

    if (p->errbuf == NULL || p->errlen == 0)
        return KEEL_ECONFIG;
    file_at(p, at, file, sizeof(file));
    if (at != NULL)
        n = snprintf(p->errbuf, p->errlen, "%s: %s: ", file, at);
    else
        n = snprintf(p->errbuf, p->errlen, "%s: ", file);
    if (n < 0 || (size_t)n >= p->errlen)
        return KEEL_ECONFIG;
    va_start(ap, fmt);
    vsnprintf(p->errbuf + n, p->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return KEEL_ECONFIG;
}

/* Describes a JSON value for "got ..." in a message: its value if short, else its type. */
static const char *describe(const json_t *v, char *buf, size_t len)
{
    char s[CLIP_LEN + 4];

    if (v == NULL)
        return "nothing";
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return json_object_size(v) == 0 ? "an empty object" : "an object";
    case JSON_ARRAY:
        return json_array_size(v) == 0 ? "an empty array" : "an array";
    case JSON_STRING:
        clip(s, sizeof(s), json_string_value(v), false);
        snprintf(buf, len, "\"%s\"", s);
        return buf;
    case JSON_INTEGER:
        snprintf(buf, len, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return buf;
    case JSON_REAL:
        /* "2.0", not "2": the point of the message may be that 2.0 is not an integer. */
        snprintf(buf, len, "%g", json_real_value(v));
        if (strpbrk(buf, ".en") == NULL && strlen(buf) + 2 < len)
            strcat(buf, ".0");
        return buf;
    case JSON_TRUE:
        return "true";
    case JSON_FALSE:
        return "false";
    case JSON_NULL:
        return "null";
    }
    return "an unknown value";
}

/* "<at>: expected <what>, got <v>". */
static keel_err expected(const parser *p, const char *at, const json_t *v, const char *what)
{
    char buf[CLIP_LEN + 16];

    if (v == NULL)
        return failf(p, at, "required, expected %s", what);
    return failf(p, at, "expected %s, got %s", what, describe(v, buf, sizeof(buf)));
}

/* ---- typed access */

/* obj[key], with an explicit null read as absent (protobuf's JSON rule). */
static json_t *member(const json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);

    return json_is_null(v) ? NULL : v;
}

/* Reads a JSON integer, or a string of decimal digits with an optional '-'. */
static bool as_int(const json_t *v, int64_t *out)
{
    const char *s, *d;
    char *end;
    long long x;

    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return true;
    }
    if (!json_is_string(v))
        return false;
    s = json_string_value(v);
    d = s[0] == '-' ? s + 1 : s;
    if (*d == '\0' || strspn(d, "0123456789") != strlen(d))
        return false;
    errno = 0;
    x = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return false;
    *out = x;
    return true;
}

/* Reads an integer in [min, max]; v must not be NULL. */
static keel_err get_int(const parser *p, const json_t *v, const char *at, int64_t min, int64_t max,
                        int64_t *out)
{
    char what[96];
    int64_t x;

    if (as_int(v, &x) && x >= min && x <= max) {
        *out = x;
        return KEEL_OK;
    }
    if (max == INT64_MAX)
        snprintf(what, sizeof(what), "an integer >= %" PRId64, min);
    else
        snprintf(what, sizeof(what), "an integer from %" PRId64 " to %" PRId64, min, max);
    return expected(p, at, v, what);
}

/* Reads an optional integer field: *out keeps its default if the field is absent. */
static keel_err opt_int(const parser *p, const json_t *obj, const char *key, const char *at,
                        int64_t min, int64_t max, int64_t *out)
{
    const json_t *v = member(obj, key);

    return v == NULL ? KEEL_OK : get_int(p, v, at, min, max, out);
}

/* Reads a string (v may be NULL, which is "required"). */
static keel_err get_string(const parser *p, const json_t *v, const char *at, bool nonempty,
                           const char **out)
{
    if (!json_is_string(v) || (nonempty && json_string_length(v) == 0))
        return expected(p, at, v, nonempty ? "a non-empty string" : "a string");
    *out = json_string_value(v);
    return KEEL_OK;
}

/* Checks the type of an optional field (v may be NULL, which passes). */
static keel_err want_object(const parser *p, const json_t *v, const char *at)
{
    return v == NULL || json_is_object(v) ? KEEL_OK : expected(p, at, v, "an object");
}

/* ---- strict validation: every field is known, refused, or ignored with a warning */

/* Appends one warning line (clipped to the warnings buffer). */
static void warnf(const parser *p, const char *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void warnf(const parser *p, const char *at, const char *fmt, ...)
{
    char file[PATH_MAX + 32];
    size_t used;
    va_list ap;
    int n;

    if (p->warnings == NULL)
        return;
    used = strlen(p->warnings);
    if (used + 2 >= WARN_MAX)
        return;
    file_at(p, at, file, sizeof(file));
    n = snprintf(p->warnings + used, WARN_MAX - used, "%s: %s: ", file, at);
    if (n < 0 || (size_t)n >= WARN_MAX - used) {
        p->warnings[used] = '\0';
        return;
    }
    used += (size_t)n;
    va_start(ap, fmt);
    n = vsnprintf(p->warnings + used, WARN_MAX - used, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n + 2 > WARN_MAX - used) {
        /* Keep whole lines only. */
        char *last = strrchr(p->warnings, '\n');
        if (last != NULL)
            last[1] = '\0';
        else
            p->warnings[0] = '\0';
        return;
    }
    strcat(p->warnings, "\n");
}

typedef enum rule_kind {
    RULE_OK,     /* keel reads it (or it changes nothing keel does) */
    RULE_WARN,   /* keel ignores it, harmlessly: a warning in the log */
    RULE_REFUSE, /* keel cannot do what it asks: the load fails */
} rule_kind;

/*
 * The fields of Triton's model configuration (message.field, as in model_config.proto) and
 * what keel does with each; docs/OPERATIONS.md has the same table with the reasons. A rule
 * with if_set applies only when the value is not the default (false, 0, "", [], {} or the
 * enum name in dflt), so `optional: false` passes and `optional: true` is refused.
 * "keel" and "preprocess" are keel's own sections (config.json only).
 */
typedef struct field_rule {
    const char *msg;
    const char *name;
    rule_kind kind;
    bool if_set;
    const char *dflt; /* the default enum name, for if_set */
    const char *why;  /* completes "keel does not support <name>: ..." or "... ignored: ..." */
} field_rule;

static const field_rule rules[] = {
    {"ModelConfig", "name", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "platform", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "backend", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "runtime", RULE_REFUSE, true, NULL, "keel picks the backend from \"backend\""},
    {"ModelConfig", "version_policy", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "max_batch_size", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "input", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "output", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "batch_input", RULE_REFUSE, false, NULL,
     "keel batches whole requests only; it adds no batch inputs"},
    {"ModelConfig", "batch_output", RULE_REFUSE, false, NULL,
     "keel splits a batch's outputs by rows only"},
    {"ModelConfig", "optimization", RULE_WARN, false, NULL,
     "performance settings for Triton's backends; answers are the same without them"},
    {"ModelConfig", "dynamic_batching", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "sequence_batching", RULE_REFUSE, false, NULL,
     "keel serves stateless models only"},
    {"ModelConfig", "ensemble_scheduling", RULE_REFUSE, false, NULL, "keel has no ensembles"},
    {"ModelConfig", "instance_group", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "default_model_filename", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "cc_model_filenames", RULE_WARN, true, NULL,
     "GPU-specific model files; keel serves on CPU"},
    {"ModelConfig", "metric_tags", RULE_WARN, true, NULL, "keel's metrics carry no custom tags"},
    {"ModelConfig", "parameters", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "model_warmup", RULE_WARN, false, NULL,
     "keel's backends warm a model up themselves before it serves"},
    {"ModelConfig", "model_operations", RULE_REFUSE, true, NULL,
     "keel cannot load custom operation libraries"},
    {"ModelConfig", "model_transaction_policy", RULE_REFUSE, true, NULL,
     "decoupled models are not supported: keel answers each request once"},
    {"ModelConfig", "model_repository_agents", RULE_REFUSE, false, NULL,
     "keel has no repository agents (they may decrypt or transform the model files)"},
    {"ModelConfig", "response_cache", RULE_WARN, true, NULL,
     "keel has no response cache; every request runs the model"},
    {"ModelConfig", "model_metrics", RULE_WARN, false, NULL, "keel's metrics are fixed"},
    {"ModelConfig", "keel", RULE_OK, false, NULL, NULL},
    {"ModelConfig", "preprocess", RULE_OK, false, NULL, NULL},

    {"ModelInput", "name", RULE_OK, false, NULL, NULL},
    {"ModelInput", "data_type", RULE_OK, false, NULL, NULL},
    {"ModelInput", "format", RULE_WARN, true, "FORMAT_NONE",
     "a description only; keel checks dims, not the layout"},
    {"ModelInput", "dims", RULE_OK, false, NULL, NULL},
    {"ModelInput", "reshape", RULE_REFUSE, false, NULL,
     "keel gives the model the shape clients send"},
    {"ModelInput", "is_shape_tensor", RULE_REFUSE, true, NULL, "shape tensors are TensorRT's"},
    {"ModelInput", "allow_ragged_batch", RULE_REFUSE, true, NULL,
     "keel batches requests whose inputs have the same shape (besides the batch dimension)"},
    {"ModelInput", "optional", RULE_REFUSE, true, NULL, "every input keel declares is required"},
    {"ModelInput", "is_non_linear_format_io", RULE_REFUSE, true, NULL, "a TensorRT format"},

    {"ModelOutput", "name", RULE_OK, false, NULL, NULL},
    {"ModelOutput", "data_type", RULE_OK, false, NULL, NULL},
    {"ModelOutput", "dims", RULE_OK, false, NULL, NULL},
    {"ModelOutput", "reshape", RULE_REFUSE, false, NULL, "keel returns the shape the model gives"},
    {"ModelOutput", "label_filename", RULE_WARN, true, NULL,
     "keel has no classification extension; outputs are returned as tensors"},
    {"ModelOutput", "is_shape_tensor", RULE_REFUSE, true, NULL, "shape tensors are TensorRT's"},
    {"ModelOutput", "is_non_linear_format_io", RULE_REFUSE, true, NULL, "a TensorRT format"},

    {"ModelInstanceGroup", "name", RULE_OK, false, NULL, NULL},
    {"ModelInstanceGroup", "kind", RULE_OK, false, NULL, NULL},
    {"ModelInstanceGroup", "count", RULE_OK, false, NULL, NULL},
    {"ModelInstanceGroup", "rate_limiter", RULE_WARN, false, NULL, "keel has no rate limiter"},
    {"ModelInstanceGroup", "gpus", RULE_REFUSE, true, NULL, "keel serves on CPU"},
    {"ModelInstanceGroup", "secondary_devices", RULE_REFUSE, false, NULL, "keel serves on CPU"},
    {"ModelInstanceGroup", "profile", RULE_WARN, true, NULL, "TensorRT optimization profiles"},
    {"ModelInstanceGroup", "passive", RULE_REFUSE, true, NULL,
     "every instance keel creates takes requests"},
    {"ModelInstanceGroup", "host_policy", RULE_WARN, true, NULL, "keel has no host policies"},

    {"ModelVersionPolicy", "latest", RULE_OK, false, NULL, NULL},
    {"ModelVersionPolicy", "all", RULE_OK, false, NULL, NULL},
    {"ModelVersionPolicy", "specific", RULE_OK, false, NULL, NULL},
    {"ModelVersionPolicy.Latest", "num_versions", RULE_OK, false, NULL, NULL},
    {"ModelVersionPolicy.Specific", "versions", RULE_OK, false, NULL, NULL},

    {"ModelDynamicBatching", "preferred_batch_size", RULE_OK, false, NULL, NULL},
    {"ModelDynamicBatching", "max_queue_delay_microseconds", RULE_OK, false, NULL, NULL},
    {"ModelDynamicBatching", "preserve_ordering", RULE_OK, false, NULL, NULL},
    {"ModelDynamicBatching", "priority_levels", RULE_OK, false, NULL, NULL},
    {"ModelDynamicBatching", "default_priority_level", RULE_OK, false, NULL, NULL},
    {"ModelDynamicBatching", "default_queue_policy", RULE_OK, false, NULL, NULL},
    {"ModelDynamicBatching", "priority_queue_policy", RULE_OK, false, NULL, NULL},

    {"ModelQueuePolicy", "timeout_action", RULE_OK, false, NULL, NULL},
    {"ModelQueuePolicy", "default_timeout_microseconds", RULE_OK, false, NULL, NULL},
    {"ModelQueuePolicy", "allow_timeout_override", RULE_OK, false, NULL, NULL},
    {"ModelQueuePolicy", "max_queue_size", RULE_OK, false, NULL, NULL},

    {"ModelParameter", "string_value", RULE_OK, false, NULL, NULL},
    {"ModelOperations", "op_library_filename", RULE_OK, false, NULL, NULL},
    {"ModelTransactionPolicy", "decoupled", RULE_OK, false, NULL, NULL},
    {"ModelResponseCache", "enable", RULE_OK, false, NULL, NULL},
};

/* Levenshtein distance of a and b, capped at 9 (names are short). */
static unsigned edit_distance(const char *a, const char *b)
{
    unsigned row[64], prev, cur;
    size_t la = strlen(a), lb = strlen(b);

    if (la >= 64 || lb >= 64)
        return 9;
    for (size_t j = 0; j <= lb; j++)
        row[j] = (unsigned)j;
    for (size_t i = 1; i <= la; i++) {
        prev = row[0];
        row[0] = (unsigned)i;
        for (size_t j = 1; j <= lb; j++) {
            cur = row[j];
            unsigned best = prev + (a[i - 1] != b[j - 1]);
            if (row[j] + 1 < best)
                best = row[j] + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            prev = cur;
        }
    }
    return row[lb] > 9 ? 9 : row[lb];
}

/* The closest of names[0..n) to name, if close enough to be a likely typo; else NULL. */
static const char *nearest(const char *name, const char *const *names, size_t n)
{
    const char *best = NULL;
    unsigned best_d = 9, limit = strlen(name) <= 4 ? 1 : strlen(name) <= 10 ? 2 : 3;

    for (size_t i = 0; i < n; i++) {
        unsigned d = edit_distance(name, names[i]);
        if (d < best_d) {
            best_d = d;
            best = names[i];
        }
    }
    return best_d <= limit ? best : NULL;
}

static const field_rule *find_rule(const char *msg, const char *name)
{
    for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++) {
        if (strcmp(rules[i].msg, msg) == 0 && strcmp(rules[i].name, name) == 0)
            return &rules[i];
    }
    return NULL;
}

/* "unknown field "x"; did you mean "y"?" for a field msg does not have. */
static keel_err unknown_field(const parser *p, const char *at, const char *msg, const char *name)
{
    const char *names[64];
    size_t n = 0;
    const char *near;
    char shown[CLIP_LEN + 4];

    for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]) && n < 64; i++) {
        if (strcmp(rules[i].msg, msg) == 0)
            names[n++] = rules[i].name;
    }
    clip(shown, sizeof(shown), name, false);
    near = nearest(name, names, n);
    if (near != NULL)
        return failf(p, at, "unknown field \"%s\"; did you mean \"%s\"?", shown, near);
    return failf(p, at, "unknown field \"%s\" (not a field of Triton's %s)", shown, msg);
}

/* Whether v is its field's default: protobuf leaves such a field out, so it asks nothing. */
static bool is_default(const json_t *v, const char *dflt)
{
    const char *key;
    json_t *x;

    switch (json_typeof(v)) {
    case JSON_NULL:
    case JSON_FALSE:
        return true;
    case JSON_INTEGER:
        return json_integer_value(v) == 0;
    case JSON_REAL:
        return json_real_value(v) == 0.0;
    case JSON_STRING:
        return json_string_length(v) == 0 || strcmp(json_string_value(v), "0") == 0 ||
               (dflt != NULL && strcmp(json_string_value(v), dflt) == 0);
    case JSON_ARRAY:
        return json_array_size(v) == 0;
    case JSON_OBJECT:
        json_object_foreach ((json_t *)v, key, x) {
            if (!is_default(x, NULL))
                return false;
        }
        return true;
    default:
        return false;
    }
}

/* Applies the rule for field name of msg, found at `at` (set: whether its value is not the
 * default; a section skipped by the config.pbtxt reader counts as set). */
static keel_err judge(const parser *p, const char *at, const char *msg, const char *name, bool set)
{
    const field_rule *r = find_rule(msg, name);

    if (r == NULL)
        return unknown_field(p, at, msg, name);
    if (r->kind == RULE_OK || (r->if_set && !set))
        return KEEL_OK;
    if (r->kind == RULE_REFUSE)
        return failf(p, at, "keel does not support Triton's %s: %s", name, r->why);
    warnf(p, at, "ignored: %s", r->why);
    return KEEL_OK;
}

/* Checks every key of obj (a msg) against the table; prefix is obj's path ("" at the top). */
static keel_err check_keys(const parser *p, const json_t *obj, const char *msg, const char *prefix)
{
    const char *key;
    json_t *v;
    char at[CLIP_LEN + 160], shown[CLIP_LEN + 4];
    keel_err err;

    if (!json_is_object(obj))
        return KEEL_OK; /* the field's own parser reports the type */
    json_object_foreach ((json_t *)obj, key, v) {
        const field_rule *r = find_rule(msg, key);
        if (json_is_null(v) && r != NULL)
            continue; /* an explicit null is "absent" (protobuf's JSON rule) */
        clip(shown, sizeof(shown), key, false);
        snprintf(at, sizeof(at), "%s%s%s", prefix, prefix[0] != '\0' ? "." : "", shown);
        if ((err = judge(p, at, msg, key, !is_default(v, r != NULL ? r->dflt : NULL))) != KEEL_OK)
            return err;
    }
    return KEEL_OK;
}

/* Checks each element of root[key], an array of msg objects. */
static keel_err check_array(const parser *p, const json_t *root, const char *key, const char *msg)
{
    const json_t *arr = member(root, key);
    char at[64];
    keel_err err;

    for (size_t i = 0; json_is_array(arr) && i < json_array_size(arr); i++) {
        snprintf(at, sizeof(at), "%s[%zu]", key, i);
        if ((err = check_keys(p, json_array_get(arr, i), msg, at)) != KEEL_OK)
            return err;
    }
    return KEEL_OK;
}

/* The whole tree: every object keel reads is checked field by field. */
static keel_err check_fields(const parser *p, const json_t *root)
{
    const json_t *vp = member(root, "version_policy"), *db = member(root, "dynamic_batching");
    const json_t *params = member(root, "parameters"), *v;
    const char *key;
    char at[CLIP_LEN + 48], shown[CLIP_LEN + 4];
    keel_err err;

    if ((err = check_keys(p, root, "ModelConfig", "")) != KEEL_OK ||
        (err = check_array(p, root, "input", "ModelInput")) != KEEL_OK ||
        (err = check_array(p, root, "output", "ModelOutput")) != KEEL_OK ||
        (err = check_array(p, root, "instance_group", "ModelInstanceGroup")) != KEEL_OK ||
        (err = check_keys(p, member(vp, "latest"), "ModelVersionPolicy.Latest",
                          "version_policy.latest")) != KEEL_OK ||
        (err = check_keys(p, member(vp, "specific"), "ModelVersionPolicy.Specific",
                          "version_policy.specific")) != KEEL_OK ||
        (err = check_keys(p, db, "ModelDynamicBatching", "dynamic_batching")) != KEEL_OK ||
        (err = check_keys(p, member(db, "default_queue_policy"), "ModelQueuePolicy",
                          "dynamic_batching.default_queue_policy")) != KEEL_OK)
        return err;
    if (json_is_object(member(db, "priority_queue_policy"))) {
        json_object_foreach (member(db, "priority_queue_policy"), key, v) {
            clip(shown, sizeof(shown), key, false);
            snprintf(at, sizeof(at), "dynamic_batching.priority_queue_policy.%s", shown);
            if ((err = check_keys(p, v, "ModelQueuePolicy", at)) != KEEL_OK)
                return err;
        }
    }
    if (json_is_object(params)) {
        json_object_foreach ((json_t *)params, key, v) {
            clip(shown, sizeof(shown), key, false);
            snprintf(at, sizeof(at), "parameters.%s", shown);
            if ((err = check_keys(p, v, "ModelParameter", at)) != KEEL_OK)
                return err;
        }
    }
    return KEEL_OK;
}

/* ---- Triton's backends and platforms mapped to keel's */

/* Triton's FIL backend parameters: what keel does with each (docs/OPERATIONS.md). */
static const char *const fil_params[] = {
    "model_type", "output_class", "predict_proba", "threshold", "xgboost_allow_unknown_field",
    /* performance settings of FIL's GPU and CPU kernels: no effect on answers */
    "use_experimental_optimizations", "threads_per_tree", "storage_type", "algo", "blocks_per_sm",
    "transfer_threshold"};
#define FIL_FIRST_PERF 5

/* Reads a "true"/"false" parameter; absent is false. */
static keel_err bool_param(const parser *p, const keel__model_config *cfg, const char *key,
                           bool *out)
{
    const char *v = keel__config_param(cfg, key);
    char at[64];

    *out = false;
    if (v == NULL || strcmp(v, "false") == 0)
        return KEEL_OK;
    if (strcmp(v, "true") == 0) {
        *out = true;
        return KEEL_OK;
    }
    snprintf(at, sizeof(at), "parameters.%s.string_value", key);
    return failf(p, at, "expected \"true\" or \"false\", got \"%.32s\"", v);
}

/*
 * The classification parameters the xgboost backend honours (FIL's names and meaning):
 * output_class, predict_proba (needs output_class) and threshold (a finite number).
 */
static keel_err check_xgboost_params(const parser *p, const keel__model_config *cfg)
{
    bool output_class, proba;
    const char *t = keel__config_param(cfg, "threshold");
    keel_err err;

    if ((err = bool_param(p, cfg, "output_class", &output_class)) != KEEL_OK ||
        (err = bool_param(p, cfg, "predict_proba", &proba)) != KEEL_OK)
        return err;
    if (proba && !output_class)
        return failf(p, "parameters.predict_proba",
                     "\"true\" needs output_class \"true\" (probabilities are for classifiers)");
    if (t != NULL) {
        char *end;
        double x;
        errno = 0;
        x = strtod(t, &end);
        /* Within float range: the backend compares FP32 values with it. */
        if (t[0] == '\0' || *end != '\0' || errno != 0 || !isfinite(x) || fabs(x) > FLT_MAX)
            return failf(p, "parameters.threshold.string_value",
                         "expected a number like \"0.5\", got \"%.32s\"", t);
    }
    return KEEL_OK;
}

/* backend "fil": its parameters, and the model file name its model_type implies. */
static keel_err map_fil(const parser *p, keel__model_config *cfg)
{
    const char *type = keel__config_param(cfg, "model_type"), *file = NULL;
    char at[CLIP_LEN + 48], shown[CLIP_LEN + 4];
    size_t nknown = sizeof(fil_params) / sizeof(fil_params[0]);

    for (size_t i = 0; i < cfg->nparams; i++) {
        const char *key = cfg->param_keys[i], *near;
        size_t k;
        clip(shown, sizeof(shown), key, false);
        snprintf(at, sizeof(at), "parameters.%s", shown);
        for (k = 0; k < nknown && strcmp(key, fil_params[k]) != 0; k++)
            ;
        if (k == nknown) {
            if ((near = nearest(key, fil_params, nknown)) != NULL)
                return failf(p, at, "unknown FIL parameter \"%s\"; did you mean \"%s\"?", shown,
                             near);
            return failf(p, at,
                         "unknown FIL parameter \"%s\" (keel understands model_type, "
                         "output_class, predict_proba, threshold)",
                         shown);
        }
        if (k >= FIL_FIRST_PERF)
            warnf(p, at,
                  "ignored: a performance setting of Triton's FIL backend; answers are the "
                  "same without it");
    }
    if (type == NULL || strcmp(type, "xgboost") == 0)
        file = "xgboost.model"; /* FIL's default model_type */
    else if (strcmp(type, "xgboost_json") == 0)
        file = "xgboost.json";
    else if (strcmp(type, "xgboost_ubj") == 0)
        file = "xgboost.ubj";
    else if (strcmp(type, "lightgbm") == 0 || strcmp(type, "treelite_checkpoint") == 0)
        return failf(p, "parameters.model_type",
                     "keel does not support \"%s\" models: keel's FIL mapping serves XGBoost "
                     "models (xgboost, xgboost_json, xgboost_ubj)",
                     type);
    else
        return failf(p, "parameters.model_type.string_value",
                     "expected \"xgboost\", \"xgboost_json\" or \"xgboost_ubj\", got \"%.32s\"",
                     type);
    {
        const char *allow = keel__config_param(cfg, "xgboost_allow_unknown_field");
        if (allow != NULL && strcmp(allow, "false") != 0)
            return failf(p, "parameters.xgboost_allow_unknown_field",
                         "keel does not support it: XGBoost's own reader decides which model "
                         "fields it accepts");
    }
    if (cfg->default_model_filename == NULL &&
        (cfg->default_model_filename = keel__strdup(file)) == NULL)
        return KEEL_ENOMEM;
    return KEEL_OK;
}

/* Triton's platform and backend names, as keel's backend name (NULL: not one keel has). */
static keel_err map_backend(const parser *p, const json_t *root, const char **backend)
{
    const json_t *pv = member(root, "platform"), *bv = member(root, "backend");
    const char *platform = json_string_value(pv), *b = json_string_value(bv);

    if (pv != NULL && platform == NULL)
        return expected(p, "platform", pv, "a string like \"onnxruntime_onnx\"");
    if (bv != NULL && (b == NULL || b[0] == '\0'))
        return expected(p, "backend", bv, "a backend name, e.g. \"xgboost\"");
    if (platform != NULL && platform[0] != '\0') {
        if (strcmp(platform, "onnxruntime_onnx") != 0)
            return failf(p, "platform",
                         "keel does not support platform \"%.32s\" (keel serves "
                         "\"onnxruntime_onnx\" with its onnx backend; other models need "
                         "backend \"xgboost\", \"fil\" or \"onnx\")",
                         platform);
        if (b != NULL && strcmp(b, "onnxruntime") != 0 && strcmp(b, "onnx") != 0)
            return failf(p, "backend",
                         "\"%.32s\" does not run platform \"onnxruntime_onnx\" (use "
                         "\"onnxruntime\" or leave it out)",
                         b);
        *backend = "onnx";
        return KEEL_OK;
    }
    if (b == NULL)
        return failf(p, "backend",
                     "required, e.g. \"xgboost\" (or Triton's \"fil\", "
                     "\"onnxruntime\", or platform \"onnxruntime_onnx\")");
    if (strcmp(b, "fil") == 0)
        *backend = "xgboost";
    else if (strcmp(b, "onnxruntime") == 0)
        *backend = "onnx";
    else
        *backend = b;
    return KEEL_OK;
}

/* Whether the configuration names Triton's FIL backend. */
static bool names_fil(const json_t *root)
{
    const char *b = json_string_value(member(root, "backend"));

    return b != NULL && strcmp(b, "fil") == 0;
}

/* keel's own "preprocess" section: every key is one keel reads. */
static keel_err check_preprocess_keys(const parser *p, const json_t *root)
{
    static const char *const known[] = {"input",  "output_input", "format",     "color",
                                        "layout", "width",        "height",     "scale",
                                        "mean",   "std",          "max_pixels", "max_file_bytes"};
    const json_t *pp = member(root, "preprocess"), *v;
    const char *key, *near;
    char at[CLIP_LEN + 16], shown[CLIP_LEN + 4];
    size_t n = sizeof(known) / sizeof(known[0]), i;

    if (!json_is_object(pp))
        return KEEL_OK;
    json_object_foreach ((json_t *)pp, key, v) {
        for (i = 0; i < n && strcmp(known[i], key) != 0; i++)
            ;
        if (i < n)
            continue;
        clip(shown, sizeof(shown), key, false);
        snprintf(at, sizeof(at), "preprocess.%s", shown);
        if ((near = nearest(key, known, n)) != NULL)
            return failf(p, at, "unknown field \"%s\"; did you mean \"%s\"?", shown, near);
        return failf(p, at, "unknown field \"%s\"", shown);
    }
    return KEEL_OK;
}

/* ---- fields */

static keel_err parse_identity(const parser *p, const json_t *root, const char *dir_name,
                               keel__model_config *cfg)
{
    const json_t *v;
    const char *name = dir_name, *backend = NULL;
    char want[CLIP_LEN + 4], got[CLIP_LEN + 4];
    int64_t mbs = 0;
    keel_err err;

    if ((v = member(root, "name")) != NULL) {
        if ((err = get_string(p, v, "name", true, &name)) != KEEL_OK)
            return err;
        if (dir_name != NULL && strcmp(name, dir_name) != 0) {
            clip(want, sizeof(want), dir_name, false);
            clip(got, sizeof(got), name, false);
            return failf(p, "name", "expected \"%s\" (the model's directory name), got \"%s\"",
                         want, got);
        }
    } else if (dir_name == NULL) {
        return expected(p, "name", NULL, "a non-empty string");
    } else if (dir_name[0] == '\0') {
        return failf(p, "name", "required: the model's directory name is empty");
    }

    if ((err = map_backend(p, root, &backend)) != KEEL_OK)
        return err;

    if ((err = opt_int(p, root, "max_batch_size", "max_batch_size", 0, INT32_MAX, &mbs)) != KEEL_OK)
        return err;
    cfg->max_batch_size = mbs;

    if ((cfg->name = keel__strdup(name)) == NULL || (cfg->backend = keel__strdup(backend)) == NULL)
        return KEEL_ENOMEM;
    return KEEL_OK;
}

static keel_err parse_dims(const parser *p, const json_t *t, const char *at,
                           keel__tensor_config *tc)
{
    const json_t *dims = member(t, "dims");
    char path[96];
    size_t i;
    int64_t d;

    snprintf(path, sizeof(path), "%s.dims", at);
    if (!json_is_array(dims) || json_array_size(dims) == 0 ||
        json_array_size(dims) > KEEL__MAX_DIMS) {
        char what[64];
        snprintf(what, sizeof(what), "an array of 1 to %d dimensions", KEEL__MAX_DIMS);
        return expected(p, path, dims, what);
    }
    for (i = 0; i < json_array_size(dims); i++) {
        const json_t *v = json_array_get(dims, i);
        if (!as_int(v, &d) || (d != -1 && d < 1)) {
            snprintf(path, sizeof(path), "%s.dims[%zu]", at, i);
            return expected(p, path, v, "-1 or a positive integer");
        }
        tc->dims[i] = d;
    }
    tc->ndims = i;
    return KEEL_OK;
}

static keel_err parse_tensor(const parser *p, const json_t *t, const char *at, json_t *seen,
                             keel__tensor_config *tc)
{
    const char *name = NULL, *dtname;
    char path[96], shown[CLIP_LEN + 4];
    const json_t *prev;
    keel_err err;

    if (!json_is_object(t))
        return expected(p, at, t,
                        "an object like {\"name\": \"x\", \"data_type\": "
                        "\"TYPE_FP32\", \"dims\": [4]}");

    snprintf(path, sizeof(path), "%s.name", at);
    if ((err = get_string(p, member(t, "name"), path, true, &name)) != KEEL_OK)
        return err;
    if ((prev = json_object_get(seen, name)) != NULL) {
        clip(shown, sizeof(shown), name, false);
        return failf(p, path, "duplicate name \"%s\" (already used by %s)", shown,
                     json_string_value(prev));
    }
    if (json_object_set_new(seen, name, json_string(at)) != 0)
        return KEEL_ENOMEM;

    snprintf(path, sizeof(path), "%s.data_type", at);
    {
        const json_t *v = member(t, "data_type");
        dtname = json_string_value(v);
        if (dtname == NULL || strncmp(dtname, "TYPE_", 5) != 0 ||
            (tc->datatype = keel_datatype_from_name(dtname)) == KEEL_TYPE_INVALID)
            return expected(p, path, v, "a string like \"TYPE_FP32\"");
    }

    if ((err = parse_dims(p, t, at, tc)) != KEEL_OK)
        return err;
    if ((tc->name = keel__strdup(name)) == NULL)
        return KEEL_ENOMEM;
    return KEEL_OK;
}

/* Backends that read their inputs and outputs from the model file, so config.json may leave
 * them out (the generation builder asks the backend to fill them in). */
static bool self_describing(const char *backend)
{
    return strcmp(backend, "onnx") == 0;
}

/* Parses root[key] ("input" or "output"), a non-empty array of tensors; required unless the
 * backend is self-describing (then absent means "from the model file": 0 tensors). */
static keel_err parse_tensors(const parser *p, const json_t *root, const char *key,
                              const char *backend, keel__tensor_config **out, size_t *nout)
{
    const json_t *arr = member(root, key);
    json_t *seen = NULL; /* name -> path of the tensor that has it */
    char at[48];
    keel_err err = KEEL_OK;
    size_t n, i;

    /* An empty array is "absent" too (as in protobuf, where an empty repeated field is not
     * there at all): the served JSON of such a model before its backend fills the tensors in
     * has "input": [], and it must read back as the same configuration. */
    if ((arr == NULL || (json_is_array(arr) && json_array_size(arr) == 0)) &&
        self_describing(backend))
        return KEEL_OK;
    if (!json_is_array(arr) || json_array_size(arr) == 0)
        return expected(p, key, arr, "a non-empty array of tensors");
    n = json_array_size(arr);
    if ((seen = json_object()) == NULL)
        return KEEL_ENOMEM;
    if ((*out = keel__calloc(n, sizeof(**out))) == NULL) {
        err = KEEL_ENOMEM;
        goto done;
    }
    *nout = n; /* every name starts NULL, so destroy may walk all n */
    for (i = 0; i < n; i++) {
        snprintf(at, sizeof(at), "%s[%zu]", key, i);
        if ((err = parse_tensor(p, json_array_get(arr, i), at, seen, &(*out)[i])) != KEEL_OK)
            goto done;
    }

done:
    json_decref(seen);
    return err;
}

static keel_err parse_instance_group(const parser *p, const json_t *root, keel__model_config *cfg)
{
    const json_t *arr = member(root, "instance_group");
    char at[48], path[64];
    int64_t total = 0;
    size_t i;
    keel_err err;

    cfg->instance_count = KEEL__DEFAULT_INSTANCE_COUNT;
    if (arr == NULL)
        return KEEL_OK;
    if (!json_is_array(arr))
        return expected(p, "instance_group", arr, "an array like [{\"count\": 2}]");
    if (json_array_size(arr) == 0)
        return KEEL_OK;
    for (i = 0; i < json_array_size(arr); i++) {
        const json_t *g = json_array_get(arr, i);
        const json_t *kind;
        int64_t count = 1;

        snprintf(at, sizeof(at), "instance_group[%zu]", i);
        if (!json_is_object(g))
            return expected(p, at, g, "an object like {\"count\": 2, \"kind\": \"KIND_CPU\"}");
        snprintf(path, sizeof(path), "%s.count", at);
        if ((err = opt_int(p, g, "count", path, 1, KEEL__MAX_INSTANCE_COUNT, &count)) != KEEL_OK)
            return err;
        if ((kind = member(g, "kind")) != NULL) {
            const char *k = json_string_value(kind);
            if (k == NULL || (strcmp(k, "KIND_CPU") != 0 && strcmp(k, "KIND_AUTO") != 0)) {
                snprintf(path, sizeof(path), "%s.kind", at);
                return expected(p, path, kind,
                                "\"KIND_CPU\" or \"KIND_AUTO\" (keel serves on CPU)");
            }
        }
        total += count; /* <= 64 per group: no overflow for any array that fits in memory */
    }
    if (total > KEEL__MAX_INSTANCE_COUNT)
        return failf(p, "instance_group", "expected at most %d instances in total, got %" PRId64,
                     KEEL__MAX_INSTANCE_COUNT, total);
    cfg->instance_count = (int)total;
    return KEEL_OK;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return (x > y) - (x < y);
}

/* Sorts v[0..n) ascending and removes duplicates; returns the new count. */
static size_t sort_unique(int64_t *v, size_t n)
{
    size_t i, m = 0;

    if (n < 2) /* v may be NULL when n is 0, which qsort does not allow */
        return n;
    qsort(v, n, sizeof(*v), cmp_i64);
    for (i = 0; i < n; i++) {
        if (m == 0 || v[m - 1] != v[i])
            v[m++] = v[i];
    }
    return m;
}

static keel_err parse_specific(const parser *p, const json_t *spec, keel__model_config *cfg)
{
    const json_t *arr = member(spec, "versions");
    char at[64];
    size_t i, n;
    keel_err err;

    if (!json_is_array(arr) || json_array_size(arr) == 0)
        return expected(p, "version_policy.specific.versions", arr,
                        "a non-empty array of version numbers");
    n = json_array_size(arr);
    if ((cfg->versions = keel__calloc(n, sizeof(*cfg->versions))) == NULL)
        return KEEL_ENOMEM;
    for (i = 0; i < n; i++) {
        snprintf(at, sizeof(at), "version_policy.specific.versions[%zu]", i);
        if ((err = get_int(p, json_array_get(arr, i), at, 1, INT64_MAX, &cfg->versions[i])) !=
            KEEL_OK)
            return err;
    }
    cfg->nversions = sort_unique(cfg->versions, n);
    return KEEL_OK;
}

static keel_err parse_version_policy(const parser *p, const json_t *root, keel__model_config *cfg)
{
    const json_t *vp = member(root, "version_policy");
    const char *key, *chosen = NULL;
    const json_t *val, *body = NULL;
    int64_t n = 1;
    keel_err err;

    cfg->policy = KEEL__POLICY_LATEST;
    cfg->latest_n = 1;
    if (vp == NULL)
        return KEEL_OK;
    if (!json_is_object(vp))
        return expected(p, "version_policy", vp,
                        "an object like {\"latest\": {\"num_versions\": 1}}");
    /* A oneof: an unknown key is most likely a misspelt policy, so it is not ignored. */
    json_object_foreach ((json_t *)vp, key, val) {
        if (json_is_null(val))
            continue;
        if ((strcmp(key, "latest") != 0 && strcmp(key, "all") != 0 &&
             strcmp(key, "specific") != 0) ||
            chosen != NULL) {
            chosen = NULL;
            break;
        }
        chosen = key;
        body = val;
    }
    if (chosen == NULL)
        return failf(p, "version_policy",
                     "expected exactly one of \"latest\", \"all\" or \"specific\"");

    if (strcmp(chosen, "latest") == 0) {
        if (!json_is_object(body))
            return expected(p, "version_policy.latest", body,
                            "an object like {\"num_versions\": 1}");
        if ((err = opt_int(p, body, "num_versions", "version_policy.latest.num_versions", 1,
                           UINT32_MAX, &n)) != KEEL_OK)
            return err;
        cfg->latest_n = (uint32_t)n;
        return KEEL_OK;
    }
    if (strcmp(chosen, "all") == 0) {
        if (!json_is_object(body))
            return expected(p, "version_policy.all", body, "an object ({})");
        cfg->policy = KEEL__POLICY_ALL;
        return KEEL_OK;
    }
    if (!json_is_object(body))
        return expected(p, "version_policy.specific", body,
                        "an object like {\"versions\": [1, 3]}");
    cfg->policy = KEEL__POLICY_SPECIFIC;
    return parse_specific(p, body, cfg);
}

/* Reads an optional true/false field. */
static keel_err opt_bool(const parser *p, const json_t *obj, const char *key, const char *at,
                         bool *out)
{
    const json_t *v = member(obj, key);

    if (v == NULL)
        return KEEL_OK;
    if (!json_is_boolean(v))
        return expected(p, at, v, "true or false");
    *out = json_is_true(v);
    return KEEL_OK;
}

/* One ModelQueuePolicy object (at names it in messages). */
static keel_err parse_queue_policy(const parser *p, const json_t *qp, const char *at,
                                   keel__queue_policy *out)
{
    char f[CLIP_LEN + 128];
    const json_t *ta;
    int64_t qsize = 0, timeout = 0;
    keel_err err;

    if ((err = want_object(p, qp, at)) != KEEL_OK || qp == NULL)
        return err;
    if ((ta = member(qp, "timeout_action")) != NULL) {
        const char *s = json_string_value(ta);
        snprintf(f, sizeof(f), "%s.timeout_action", at);
        if ((s != NULL && strcmp(s, "REJECT") == 0) ||
            (json_is_integer(ta) && json_integer_value(ta) == 0))
            out->timeout_action = KEEL__TIMEOUT_REJECT;
        else if ((s != NULL && strcmp(s, "DELAY") == 0) ||
                 (json_is_integer(ta) && json_integer_value(ta) == 1))
            out->timeout_action = KEEL__TIMEOUT_DELAY;
        else
            return expected(p, f, ta, "\"REJECT\" or \"DELAY\"");
    }
    snprintf(f, sizeof(f), "%s.max_queue_size", at);
    if ((err = opt_int(p, qp, "max_queue_size", f, 0, MAX_QUEUE_SIZE_LIMIT, &qsize)) != KEEL_OK)
        return err;
    snprintf(f, sizeof(f), "%s.default_timeout_microseconds", at);
    if ((err = opt_int(p, qp, "default_timeout_microseconds", f, 0, INT64_MAX, &timeout)) !=
        KEEL_OK)
        return err;
    snprintf(f, sizeof(f), "%s.allow_timeout_override", at);
    if ((err = opt_bool(p, qp, "allow_timeout_override", f, &out->allow_timeout_override)) !=
        KEEL_OK)
        return err;
    out->max_queue_size = (uint32_t)qsize;
    out->default_timeout_us = (uint64_t)timeout;
    return KEEL_OK;
}

/* dynamic_batching.preferred_batch_size: ascending and unique in cfg->preferred. */
static keel_err parse_preferred(const parser *p, const json_t *db, keel__model_config *cfg)
{
    const json_t *arr = member(db, "preferred_batch_size");
    char at[64];
    keel_err err;

    if (arr == NULL)
        return KEEL_OK;
    if (!json_is_array(arr))
        return expected(p, "dynamic_batching.preferred_batch_size", arr,
                        "an array of batch sizes like [4, 8]");
    if (json_array_size(arr) > 0 && cfg->max_batch_size == 0)
        return failf(p, "dynamic_batching.preferred_batch_size",
                     "needs max_batch_size > 0 (a model without a batch dimension runs one "
                     "request per call)");
    if (json_array_size(arr) > KEEL__MAX_PREFERRED_SIZES)
        return failf(p, "dynamic_batching.preferred_batch_size", "at most %d sizes, got %zu",
                     KEEL__MAX_PREFERRED_SIZES, json_array_size(arr));
    for (size_t i = 0; i < json_array_size(arr); i++) {
        int64_t b = 0;
        size_t k;
        snprintf(at, sizeof(at), "dynamic_batching.preferred_batch_size[%zu]", i);
        if ((err = get_int(p, json_array_get(arr, i), at, 1, cfg->max_batch_size, &b)) != KEEL_OK)
            return err;
        for (k = 0; k < cfg->npreferred && cfg->preferred[k] < b; k++)
            ;
        if (k < cfg->npreferred && cfg->preferred[k] == b)
            continue; /* a size listed twice is the same preference */
        memmove(&cfg->preferred[k + 1], &cfg->preferred[k],
                sizeof(cfg->preferred[0]) * (cfg->npreferred - k));
        cfg->preferred[k] = b;
        cfg->npreferred++;
    }
    return KEEL_OK;
}

/* dynamic_batching.priority_queue_policy: {"<level>": ModelQueuePolicy, ...}. */
static keel_err parse_level_policies(const parser *p, const json_t *db, keel__model_config *cfg)
{
    const json_t *map = member(db, "priority_queue_policy"), *qp;
    const char *key;
    char at[CLIP_LEN + 64], shown[CLIP_LEN + 4];
    keel_err err;

    for (uint32_t l = 1; l <= cfg->priority_levels; l++)
        cfg->qpolicy[l] = cfg->qpolicy[0];
    if ((err = want_object(p, map, "dynamic_batching.priority_queue_policy")) != KEEL_OK ||
        map == NULL)
        return err;
    json_object_foreach ((json_t *)map, key, qp) {
        json_t *k = json_string(key);
        int64_t level = 0;
        clip(shown, sizeof(shown), key, false);
        snprintf(at, sizeof(at), "dynamic_batching.priority_queue_policy.%s", shown);
        if (k == NULL)
            return KEEL_ENOMEM;
        err = cfg->priority_levels == 0 ? failf(p, at, "needs priority_levels > 0")
                                        : get_int(p, k, at, 1, cfg->priority_levels, &level);
        json_decref(k);
        if (err != KEEL_OK)
            return err;
        if ((err = parse_queue_policy(p, qp, at, &cfg->qpolicy[level])) != KEEL_OK)
            return err;
    }
    return KEEL_OK;
}

static keel_err parse_dynamic_batching(const parser *p, const json_t *root, keel__model_config *cfg)
{
    const json_t *db = member(root, "dynamic_batching");
    int64_t delay = 0, levels = 0, dflt = 0;
    keel_err err;

    memset(cfg->qpolicy, 0, sizeof(cfg->qpolicy));
    cfg->max_queue_size = KEEL__DEFAULT_MAX_QUEUE_SIZE;
    cfg->default_timeout_us = 0;
    if ((err = want_object(p, db, "dynamic_batching")) != KEEL_OK || db == NULL)
        return err;
    cfg->batching = true;
    if ((err = parse_queue_policy(p, member(db, "default_queue_policy"),
                                  "dynamic_batching.default_queue_policy", &cfg->qpolicy[0])) !=
            KEEL_OK ||
        (err = parse_preferred(p, db, cfg)) != KEEL_OK ||
        (err = opt_int(p, db, "max_queue_delay_microseconds",
                       "dynamic_batching.max_queue_delay_microseconds", 0, 60000000, &delay)) !=
            KEEL_OK ||
        (err = opt_bool(p, db, "preserve_ordering", "dynamic_batching.preserve_ordering",
                        &cfg->preserve_ordering)) != KEEL_OK ||
        (err = opt_int(p, db, "priority_levels", "dynamic_batching.priority_levels", 0,
                       KEEL__MAX_PRIORITY_LEVELS, &levels)) != KEEL_OK)
        return err;
    cfg->max_queue_delay_us = (uint64_t)delay;
    cfg->priority_levels = (uint32_t)levels;
    if (levels > 0) {
        if (member(db, "default_priority_level") == NULL)
            return failf(p, "dynamic_batching.default_priority_level",
                         "required when priority_levels is set: the level of requests that "
                         "give no priority (1..%" PRId64 ")",
                         levels);
        if ((err = opt_int(p, db, "default_priority_level",
                           "dynamic_batching.default_priority_level", 1, levels, &dflt)) != KEEL_OK)
            return err;
    } else if ((err = opt_int(p, db, "default_priority_level",
                              "dynamic_batching.default_priority_level", 0, 0, &dflt)) != KEEL_OK) {
        return err;
    }
    cfg->default_priority_level = (uint32_t)dflt;
    if ((err = parse_level_policies(p, db, cfg)) != KEEL_OK)
        return err;
    if (cfg->qpolicy[0].max_queue_size != 0)
        cfg->max_queue_size = cfg->qpolicy[0].max_queue_size;
    cfg->default_timeout_us = cfg->qpolicy[0].default_timeout_us;
    return KEEL_OK;
}

static keel_err parse_parameters(const parser *p, const json_t *root, keel__model_config *cfg)
{
    const json_t *params = member(root, "parameters"), *val;
    const char *key, *sv = NULL;
    char shown[CLIP_LEN + 4], at[CLIP_LEN + 48];
    size_t n, i = 0;
    keel_err err;

    if ((err = want_object(p, params, "parameters")) != KEEL_OK || params == NULL)
        return err;
    n = json_object_size(params);
    if ((cfg->param_keys = keel__calloc(n, sizeof(char *))) == NULL ||
        (cfg->param_values = keel__calloc(n, sizeof(char *))) == NULL)
        return KEEL_ENOMEM;
    cfg->nparams = n; /* every slot starts NULL, so destroy may walk all n */
    json_object_foreach ((json_t *)params, key, val) {
        clip(shown, sizeof(shown), key, false);
        snprintf(at, sizeof(at), "parameters.%s", shown);
        if (!json_is_object(val))
            return expected(p, at, val, "an object like {\"string_value\": \"...\"}");
        snprintf(at, sizeof(at), "parameters.%s.string_value", shown);
        if ((err = get_string(p, member(val, "string_value"), at, false, &sv)) != KEEL_OK)
            return err;
        if ((cfg->param_keys[i] = keel__strdup(key)) == NULL ||
            (cfg->param_values[i] = keel__strdup(sv)) == NULL)
            return KEEL_ENOMEM;
        i++;
    }
    return KEEL_OK;
}

static keel_err parse_misc(const parser *p, const json_t *root, keel__model_config *cfg)
{
    const json_t *v;
    const char *fn;
    keel_err err;

    if ((v = member(root, "default_model_filename")) != NULL) {
        fn = json_string_value(v);
        if (fn == NULL || fn[0] == '\0' || strchr(fn, '/') != NULL || strcmp(fn, ".") == 0 ||
            strcmp(fn, "..") == 0)
            return expected(p, "default_model_filename", v,
                            "a file name inside the version folder (no '/')");
        if ((cfg->default_model_filename = keel__strdup(fn)) == NULL)
            return KEEL_ENOMEM;
    }
    /* keel-only settings live under "keel"; keel owns that object, so an unknown key in it is
     * most likely a typo and is an error, not ignored. */
    if ((v = member(root, "keel")) == NULL)
        return KEEL_OK;
    if ((err = want_object(p, v, "keel")) != KEEL_OK)
        return err;
    {
        const char *key;
        json_t *kv;
        json_object_foreach ((json_t *)v, key, kv) {
            if (strcmp(key, "pinned") == 0) {
                if (!json_is_boolean(kv))
                    return expected(p, "keel.pinned", kv, "true or false");
                cfg->pinned = json_is_true(kv);
            } else if (strcmp(key, "swap_policy") == 0) {
                const char *sp = json_string_value(kv);
                if (sp != NULL && strcmp(sp, "availability_preserving") == 0)
                    cfg->swap_policy = KEEL__SWAP_AVAILABILITY;
                else if (sp != NULL && strcmp(sp, "resource_preserving") == 0)
                    cfg->swap_policy = KEEL__SWAP_RESOURCE;
                else
                    return expected(p, "keel.swap_policy", kv,
                                    "\"availability_preserving\" or \"resource_preserving\"");
            } else {
                return failf(p, "keel", "unknown setting \"%s\" (known: pinned, swap_policy)", key);
            }
        }
    }
    return KEEL_OK;
}

/* ---- "preprocess" (images in, tensors out; see config.h) */

static keel_err pp_enum(const parser *p, const json_t *obj, const char *key,
                        const char *const *names, int n, int *out)
{
    const json_t *v = member(obj, key);
    char at[64], what[128] = "";

    if (v == NULL)
        return KEEL_OK;
    snprintf(at, sizeof(at), "preprocess.%s", key);
    for (int i = 0; i < n; i++) {
        if (json_is_string(v) && strcmp(json_string_value(v), names[i]) == 0) {
            *out = i;
            return KEEL_OK;
        }
        snprintf(what + strlen(what), sizeof(what) - strlen(what), "%s\"%s\"", i ? " or " : "",
                 names[i]);
    }
    return expected(p, at, v, what);
}

static keel_err pp_floats(const parser *p, const json_t *obj, const char *key, size_t n, float *out)
{
    const json_t *v = member(obj, key);
    char at[64], what[64];

    snprintf(at, sizeof(at), "preprocess.%s", key);
    snprintf(what, sizeof(what), "an array of %zu numbers (one per channel)", n);
    if (v == NULL)
        return KEEL_OK;
    if (!json_is_array(v) || json_array_size(v) != n)
        return expected(p, at, v, what);
    for (size_t i = 0; i < n; i++) {
        const json_t *x = json_array_get(v, i);
        if (!json_is_number(x))
            return expected(p, at, v, what);
        out[i] = (float)json_number_value(x);
    }
    return KEEL_OK;
}

static keel_err parse_preprocess(const parser *p, const json_t *root, keel__model_config *cfg)
{
    static const char *const formats[] = {"auto", "jpeg", "png"};
    static const char *const colors[] = {"RGB", "GRAY"};
    static const char *const layouts[] = {"NCHW", "NHWC"};
    const json_t *v = member(root, "preprocess"), *x;
    keel__preprocess_config *pp;
    const char *in = NULL, *out = NULL;
    const keel__tensor_config *tc = NULL;
    int64_t w = 0, h = 0, mp = 25000000, mf = 16 * 1024 * 1024;
    size_t ch, elems = 1;
    keel_err err;

    if (v == NULL)
        return KEEL_OK;
    if ((err = want_object(p, v, "preprocess")) != KEEL_OK)
        return err;
    if ((pp = keel__calloc(1, sizeof(*pp))) == NULL)
        return KEEL_ENOMEM;
    cfg->preprocess = pp;
    pp->scale = 1.0f / 255.0f;
    pp->std[0] = pp->std[1] = pp->std[2] = 1.0f;
    if ((err = get_string(p, member(v, "input"), "preprocess.input", true, &in)) != KEEL_OK ||
        (err = get_string(p, member(v, "output_input"), "preprocess.output_input", true, &out)) !=
            KEEL_OK ||
        (err = pp_enum(p, v, "format", formats, 3, &pp->format)) != KEEL_OK ||
        (err = pp_enum(p, v, "color", colors, 2, &pp->color)) != KEEL_OK ||
        (err = pp_enum(p, v, "layout", layouts, 2, &pp->layout)) != KEEL_OK ||
        (err = get_int(p, member(v, "width"), "preprocess.width", 1, 16384, &w)) != KEEL_OK ||
        (err = get_int(p, member(v, "height"), "preprocess.height", 1, 16384, &h)) != KEEL_OK ||
        (err = opt_int(p, v, "max_pixels", "preprocess.max_pixels", 1, INT64_MAX, &mp)) !=
            KEEL_OK ||
        (err = opt_int(p, v, "max_file_bytes", "preprocess.max_file_bytes", 1, UINT32_MAX, &mf)) !=
            KEEL_OK)
        return err;
    pp->width = (uint32_t)w;
    pp->height = (uint32_t)h;
    pp->max_pixels = (uint64_t)mp;
    pp->max_file_bytes = (uint64_t)mf;
    ch = pp->color == 1 ? 1 : 3;
    if ((x = member(v, "scale")) != NULL) {
        if (!json_is_number(x))
            return expected(p, "preprocess.scale", x, "a number");
        pp->scale = (float)json_number_value(x);
    }
    if ((err = pp_floats(p, v, "mean", ch, pp->mean)) != KEEL_OK ||
        (err = pp_floats(p, v, "std", ch, pp->std)) != KEEL_OK)
        return err;
    for (size_t i = 0; i < ch; i++) {
        if (!(pp->std[i] != 0.0f) || !isfinite(pp->std[i]))
            return failf(p, "preprocess.std", "must be finite and non-zero");
    }
    for (size_t i = 0; i < cfg->ninputs; i++) {
        if (strcmp(cfg->inputs[i].name, in) == 0)
            return failf(p, "preprocess.input",
                         "\"%s\" is one of the model's inputs; name the BYTES input clients "
                         "send, which becomes preprocess.output_input",
                         in);
        if (strcmp(cfg->inputs[i].name, out) == 0)
            tc = &cfg->inputs[i];
    }
    if (tc == NULL)
        return failf(p, "preprocess.output_input", "the model has no input named \"%s\"", out);
    if (tc->datatype != KEEL_TYPE_FP32)
        return failf(p, "preprocess.output_input", "input \"%s\" must be TYPE_FP32", out);
    for (size_t d = 0; d < tc->ndims; d++) {
        if (tc->dims[d] < 0)
            return failf(p, "preprocess.output_input", "input \"%s\" must have fixed dims (no -1)",
                         out);
        elems *= (size_t)tc->dims[d];
    }
    if (elems != ch * (size_t)w * (size_t)h)
        return failf(p, "preprocess",
                     "%zu channels x %lld x %lld = %zu values per image, but input \"%s\" "
                     "holds %zu",
                     ch, (long long)w, (long long)h, ch * (size_t)w * (size_t)h, out, elems);
    if ((pp->input = keel__strdup(in)) == NULL || (pp->output_input = keel__strdup(out)) == NULL)
        return KEEL_ENOMEM;
    return KEEL_OK;
}

static json_t *preprocess_json(const keel__preprocess_config *pp)
{
    static const char *const formats[] = {"auto", "jpeg", "png"};
    size_t ch = pp->color == 1 ? 1 : 3;
    json_t *mean = json_array(), *std = json_array();

    for (size_t i = 0; i < ch; i++) {
        json_array_append_new(mean, json_real(pp->mean[i]));
        json_array_append_new(std, json_real(pp->std[i]));
    }
    return json_pack("{s:s,s:s,s:s,s:s,s:s,s:I,s:I,s:f,s:o,s:o,s:I,s:I}", "input", pp->input,
                     "output_input", pp->output_input, "format", formats[pp->format], "color",
                     pp->color == 1 ? "GRAY" : "RGB", "layout", pp->layout == 1 ? "NHWC" : "NCHW",
                     "width", (json_int_t)pp->width, "height", (json_int_t)pp->height, "scale",
                     (double)pp->scale, "mean", mean, "std", std, "max_pixels",
                     (json_int_t)pp->max_pixels, "max_file_bytes", (json_int_t)pp->max_file_bytes);
}

/* ---- normalised JSON */

/* Sets obj[key] = v, consuming v (jansson accepts a NULL v and fails). */
static bool put(json_t *obj, const char *key, json_t *v)
{
    return json_object_set_new(obj, key, v) == 0;
}

static json_t *tensors_json(const keel__tensor_config *ts, size_t n)
{
    json_t *arr = json_array(), *t = NULL, *dims = NULL;
    char dt[32];
    size_t i, d;

    if (arr == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        if (ts[i].datatype == KEEL_TYPE_BYTES)
            snprintf(dt, sizeof(dt), "TYPE_STRING");
        else
            snprintf(dt, sizeof(dt), "TYPE_%s", keel_datatype_name(ts[i].datatype));
        if ((t = json_object()) == NULL || (dims = json_array()) == NULL)
            goto fail;
        for (d = 0; d < ts[i].ndims; d++) {
            if (json_array_append_new(dims, json_integer(ts[i].dims[d])) != 0)
                goto fail;
        }
        if (!put(t, "name", json_string(ts[i].name)) || !put(t, "data_type", json_string(dt)))
            goto fail;
        if (!put(t, "dims", dims)) {
            dims = NULL; /* consumed even on failure */
            goto fail;
        }
        dims = NULL;
        if (json_array_append_new(arr, t) != 0) {
            t = NULL;
            goto fail;
        }
        t = NULL;
    }
    return arr;

fail:
    json_decref(dims);
    json_decref(t);
    json_decref(arr);
    return NULL;
}

static json_t *version_policy_json(const keel__model_config *cfg)
{
    json_t *vp = NULL, *body = NULL, *arr;
    const char *kind = "latest";
    size_t i;

    if ((vp = json_object()) == NULL || (body = json_object()) == NULL)
        goto fail;
    switch (cfg->policy) {
    case KEEL__POLICY_LATEST:
        if (!put(body, "num_versions", json_integer(cfg->latest_n)))
            goto fail;
        break;
    case KEEL__POLICY_ALL:
        kind = "all";
        break;
    case KEEL__POLICY_SPECIFIC:
        kind = "specific";
        arr = json_array(); /* owned by body once put succeeds */
        if (!put(body, "versions", arr))
            goto fail;
        for (i = 0; i < cfg->nversions; i++) {
            if (json_array_append_new(arr, json_integer(cfg->versions[i])) != 0)
                goto fail;
        }
        break;
    }
    if (!put(vp, kind, body)) {
        body = NULL; /* consumed even on failure */
        goto fail;
    }
    return vp;

fail:
    json_decref(body);
    json_decref(vp);
    return NULL;
}

static json_t *queue_policy_json(const keel__queue_policy *qp, uint32_t max_queue_size)
{
    return json_pack("{s:s,s:I,s:b,s:I}", "timeout_action",
                     qp->timeout_action == KEEL__TIMEOUT_DELAY ? "DELAY" : "REJECT",
                     "default_timeout_microseconds", (json_int_t)qp->default_timeout_us,
                     "allow_timeout_override", qp->allow_timeout_override, "max_queue_size",
                     (json_int_t)max_queue_size);
}

/* dynamic_batching as served (defaults filled in), or NULL with batching off. */
static json_t *dynamic_batching_json(const keel__model_config *cfg)
{
    json_t *db = json_object(), *pref = json_array(), *levels = json_object();

    if (db == NULL || pref == NULL || levels == NULL)
        goto fail;
    for (size_t i = 0; i < cfg->npreferred; i++) {
        if (json_array_append_new(pref, json_integer(cfg->preferred[i])) != 0)
            goto fail;
    }
    for (uint32_t l = 1; l <= cfg->priority_levels; l++) {
        char key[16];
        snprintf(key, sizeof(key), "%u", l);
        if (!put(levels, key, queue_policy_json(&cfg->qpolicy[l], cfg->qpolicy[l].max_queue_size)))
            goto fail;
    }
    if (!put(db, "preferred_batch_size", pref)) {
        pref = NULL;
        goto fail;
    }
    pref = NULL;
    if (!put(db, "max_queue_delay_microseconds",
             json_integer((json_int_t)cfg->max_queue_delay_us)) ||
        !put(db, "preserve_ordering", json_boolean(cfg->preserve_ordering)) ||
        !put(db, "priority_levels", json_integer(cfg->priority_levels)) ||
        !put(db, "default_priority_level", json_integer(cfg->default_priority_level)) ||
        !put(db, "default_queue_policy", queue_policy_json(&cfg->qpolicy[0], cfg->max_queue_size)))
        goto fail;
    if (!put(db, "priority_queue_policy", levels)) {
        levels = NULL;
        goto fail;
    }
    return db;

fail:
    json_decref(pref);
    json_decref(levels);
    json_decref(db);
    return NULL;
}

/* Parameters in key order: config.pbtxt's map has no order of its own, and the same
 * configuration must serve the same JSON whichever file it came from. */
static json_t *parameters_json(const keel__model_config *cfg)
{
    json_t *params = json_object(), *sv;
    size_t i, done, next;
    const char *last = NULL;

    if (params == NULL)
        return NULL;
    for (done = 0; done < cfg->nparams; done++) {
        /* Selection of the next key: parameters are few (keys are unique). */
        next = cfg->nparams;
        for (i = 0; i < cfg->nparams; i++) {
            if ((last == NULL || strcmp(cfg->param_keys[i], last) > 0) &&
                (next == cfg->nparams || strcmp(cfg->param_keys[i], cfg->param_keys[next]) < 0))
                next = i;
        }
        last = cfg->param_keys[next];
        if ((sv = json_object()) == NULL)
            goto fail;
        if (!put(sv, "string_value", json_string(cfg->param_values[next]))) {
            json_decref(sv);
            goto fail;
        }
        if (!put(params, cfg->param_keys[next], sv))
            goto fail;
    }
    return params;

fail:
    json_decref(params);
    return NULL;
}

/* Checks UTF-8 well-formedness (jansson refuses to build strings that are not). */
static bool utf8_valid(const char *s)
{
    const unsigned char *u = (const unsigned char *)s;

    while (*u != '\0') {
        size_t n, i;
        uint32_t cp;
        if (u[0] < 0x80) {
            u++;
            continue;
        }
        if ((u[0] & 0xe0) == 0xc0) {
            n = 1;
            cp = u[0] & 0x1f;
        } else if ((u[0] & 0xf0) == 0xe0) {
            n = 2;
            cp = u[0] & 0x0f;
        } else if ((u[0] & 0xf8) == 0xf0) {
            n = 3;
            cp = u[0] & 0x07;
        } else {
            return false;
        }
        for (i = 1; i <= n; i++) {
            if ((u[i] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (u[i] & 0x3f);
        }
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        u += n + 1;
    }
    return true;
}

/* Builds cfg->json from the parsed fields. */
static keel_err build_json(const parser *p, keel__model_config *cfg)
{
    json_t *root = NULL;
    char *text = NULL;
    keel_err err = KEEL_ENOMEM;

    /* Only the name can come from outside the parsed JSON (the directory name). */
    if (!utf8_valid(cfg->name))
        return failf(p, "name", "required: the model's directory name is not valid UTF-8");
    if ((root = json_object()) == NULL)
        goto done;
    if (!put(root, "name", json_string(cfg->name)) ||
        !put(root, "backend", json_string(cfg->backend)) ||
        !put(root, "max_batch_size", json_integer(cfg->max_batch_size)) ||
        !put(root, "version_policy", version_policy_json(cfg)) ||
        !put(root, "input", tensors_json(cfg->inputs, cfg->ninputs)) ||
        !put(root, "output", tensors_json(cfg->outputs, cfg->noutputs)))
        goto done;
    {
        json_t *group = json_pack("[{s:i,s:s}]", "count", cfg->instance_count, "kind", "KIND_CPU");
        if (!put(root, "instance_group", group))
            goto done;
    }
    if ((cfg->batching && !put(root, "dynamic_batching", dynamic_batching_json(cfg))) ||
        !put(root, "parameters", parameters_json(cfg)))
        goto done;
    if (cfg->default_model_filename != NULL &&
        !put(root, "default_model_filename", json_string(cfg->default_model_filename)))
        goto done;
    {
        json_t *k = json_pack("{s:b,s:s}", "pinned", cfg->pinned, "swap_policy",
                              cfg->swap_policy == KEEL__SWAP_RESOURCE ? "resource_preserving"
                                                                      : "availability_preserving");
        if (!put(root, "keel", k))
            goto done;
    }
    if (cfg->preprocess != NULL && !put(root, "preprocess", preprocess_json(cfg->preprocess)))
        goto done;
    if ((text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER)) == NULL)
        goto done;
    /* Copy so that cfg owns only keel allocations (and the copy can fail under injection). */
    if ((cfg->json = keel__strdup(text)) == NULL)
        goto done;
    err = KEEL_OK;

done:
    free(text);
    json_decref(root);
    return err;
}

/* ---- public */

keel_err keel__config_rebuild_json(keel__model_config *cfg)
{
    parser p = {"config.json", NULL, 0, NULL, NULL};
    char *prev = cfg->json;
    keel_err err;

    cfg->json = NULL;
    if ((err = build_json(&p, cfg)) != KEEL_OK) {
        cfg->json = prev;
        return err;
    }
    free(prev);
    return KEEL_OK;
}

/* Parses a configuration tree (from config.json, or from config.pbtxt through pbtxt.cpp). */
static keel_err parse_tree(parser *p, const json_t *root, const char *dir_name,
                           keel__model_config **out)
{
    keel__model_config *cfg = NULL;
    char warnings[WARN_MAX] = "";
    keel_err err;

    p->warnings = warnings;
    if (!json_is_object(root)) {
        err = failf(p, NULL, "expected a JSON object at the top level, got an array");
        goto fail;
    }
    if ((cfg = keel__calloc(1, sizeof(*cfg))) == NULL) {
        err = KEEL_ENOMEM;
        goto fail;
    }
    if ((err = check_fields(p, root)) != KEEL_OK ||
        (err = check_preprocess_keys(p, root)) != KEEL_OK ||
        (err = parse_identity(p, root, dir_name, cfg)) != KEEL_OK ||
        (err = parse_tensors(p, root, "input", cfg->backend, &cfg->inputs, &cfg->ninputs)) !=
            KEEL_OK ||
        (err = parse_tensors(p, root, "output", cfg->backend, &cfg->outputs, &cfg->noutputs)) !=
            KEEL_OK ||
        (err = parse_instance_group(p, root, cfg)) != KEEL_OK ||
        (err = parse_version_policy(p, root, cfg)) != KEEL_OK ||
        (err = parse_dynamic_batching(p, root, cfg)) != KEEL_OK ||
        (err = parse_parameters(p, root, cfg)) != KEEL_OK ||
        (err = parse_misc(p, root, cfg)) != KEEL_OK ||
        (names_fil(root) && (err = map_fil(p, cfg)) != KEEL_OK) ||
        (strcmp(cfg->backend, "xgboost") == 0 && (err = check_xgboost_params(p, cfg)) != KEEL_OK) ||
        (err = parse_preprocess(p, root, cfg)) != KEEL_OK || (err = build_json(p, cfg)) != KEEL_OK)
        goto fail;
    if (warnings[0] != '\0' && (cfg->warnings = keel__strdup(warnings)) == NULL) {
        err = KEEL_ENOMEM;
        goto fail;
    }
    p->warnings = NULL;
    *out = cfg;
    return KEEL_OK;

fail:
    p->warnings = NULL;
    if (err == KEEL_ENOMEM)
        keel__errf(p->errbuf, p->errlen, "%s: out of memory", p->file);
    keel__config_destroy(cfg);
    return err;
}

keel_err keel__config_parse(const char *path, const char *dir_name, const char *text, size_t len,
                            keel__model_config **out, char *errbuf, size_t errlen)
{
    parser p = {path != NULL ? path : "config.json", errbuf, errlen, NULL, NULL};
    json_t *root = NULL;
    json_error_t jerr;
    keel_err err;

    *out = NULL;
    if (errbuf != NULL && errlen > 0)
        errbuf[0] = '\0';
    if (text == NULL) {
        text = "";
        len = 0;
    }
    if ((root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr)) == NULL) {
        char shown[CLIP_LEN + 4];
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            keel__errf(errbuf, errlen, "%s: out of memory", p.file);
            return KEEL_ENOMEM;
        }
        /* jansson quotes the offending input, which may be any bytes. */
        clip(shown, sizeof(shown), jerr.text, true);
        return failf(&p, NULL, "invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
                     shown);
    }
    err = parse_tree(&p, root, dir_name, out);
    json_decref(root);
    return err;
}

/* The config.pbtxt reader's "skipped" records: fields the schema does not declare, judged by
 * the same table as config.json's fields. */
static keel_err judge_skipped(const parser *p, const json_t *skipped)
{
    static const struct {
        const char *msg, *path;
    } paths[] = {{"ModelConfig", ""},
                 {"ModelInput", "input[]"},
                 {"ModelOutput", "output[]"},
                 {"ModelInstanceGroup", "instance_group[]"},
                 {"ModelDynamicBatching", "dynamic_batching"},
                 {"ModelQueuePolicy", "dynamic_batching.default_queue_policy"},
                 {"ModelVersionPolicy", "version_policy"},
                 {"ModelVersionPolicy.Latest", "version_policy.latest"},
                 {"ModelVersionPolicy.Specific", "version_policy.specific"},
                 {"ModelParameter", "parameters.<key>"}};
    keel_err err;

    for (size_t i = 0; i < json_array_size(skipped); i++) {
        const json_t *r = json_array_get(skipped, i);
        const char *msg = json_string_value(json_array_get(r, 0));
        const char *field = json_string_value(json_array_get(r, 1));
        const char *prefix = NULL;
        char at[CLIP_LEN + 96];
        parser q = *p;
        json_t *where = NULL;

        if (msg == NULL || field == NULL)
            return failf(p, NULL, "internal error: malformed record of a skipped field");
        for (size_t k = 0; k < sizeof(paths) / sizeof(paths[0]); k++) {
            if (strcmp(paths[k].msg, msg) == 0)
                prefix = paths[k].path;
        }
        if (prefix == NULL)
            prefix = msg;
        snprintf(at, sizeof(at), "%s%s%.64s", prefix, prefix[0] != '\0' ? "." : "", field);
        /* The skipped field has no path in "where": point at its own line and column. */
        if ((where = json_pack("{s:[O,O]}", at, json_array_get(r, 2), json_array_get(r, 3))) ==
            NULL)
            return KEEL_ENOMEM;
        q.where = where;
        err = judge(&q, at, msg, field, true);
        json_decref(where);
        if (err != KEEL_OK)
            return err;
    }
    return KEEL_OK;
}

keel_err keel__config_parse_pbtxt(const char *path, const char *dir_name, const char *text,
                                  size_t len, keel__model_config **out, char *errbuf, size_t errlen)
{
    parser p = {path != NULL ? path : "config.pbtxt", errbuf, errlen, NULL, NULL};
    char *doc = NULL;
    json_t *root = NULL;
    json_error_t jerr;
    char warnings[WARN_MAX] = "";
    keel_err err;

    *out = NULL;
    if (errbuf != NULL && errlen > 0)
        errbuf[0] = '\0';
    if ((err = keel__pbtxt_to_json(p.file, text, len, &doc, errbuf, errlen)) != KEEL_OK) {
        /* A syntax error after skipped fields: a refused or unknown field among them, which
         * comes earlier in the file, is the clearer message. */
        if (doc != NULL && (root = json_loads(doc, 0, NULL)) != NULL) {
            char first[512];
            parser q = p;
            snprintf(first, sizeof(first), "%s", errbuf != NULL ? errbuf : "");
            if (judge_skipped(&q, json_object_get(root, "skipped")) == KEEL_OK && errbuf != NULL &&
                errlen > 0)
                snprintf(errbuf, errlen, "%s", first);
            json_decref(root);
        }
        free(doc);
        return err;
    }
    if ((root = json_loads(doc, JSON_REJECT_DUPLICATES, &jerr)) == NULL) {
        free(doc);
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            keel__errf(errbuf, errlen, "%s: out of memory", p.file);
            return KEEL_ENOMEM;
        }
        return failf(&p, NULL, "internal error: the converted configuration is not JSON (%s)",
                     jerr.text);
    }
    free(doc);
    p.where = json_object_get(root, "where");
    p.warnings = warnings;
    if ((err = judge_skipped(&p, json_object_get(root, "skipped"))) != KEEL_OK)
        goto done;
    if ((err = parse_tree(&p, json_object_get(root, "config"), dir_name, out)) != KEEL_OK)
        goto done;
    /* Warnings about skipped sections come first, then the tree's own. */
    if (warnings[0] != '\0') {
        size_t a = strlen(warnings), b = (*out)->warnings != NULL ? strlen((*out)->warnings) : 0;
        char *all = keel__malloc(a + b + 1);
        if (all == NULL) {
            keel__config_destroy(*out);
            *out = NULL;
            keel__errf(errbuf, errlen, "%s: out of memory", p.file);
            err = KEEL_ENOMEM;
            goto done;
        }
        memcpy(all, warnings, a);
        memcpy(all + a, (*out)->warnings != NULL ? (*out)->warnings : "", b + 1);
        free((*out)->warnings);
        (*out)->warnings = all;
    }

done:
    json_decref(root);
    return err;
}

static bool is_pbtxt(const char *path)
{
    size_t n = strlen(path);

    return n >= 6 && strcmp(path + n - 6, ".pbtxt") == 0;
}

keel_err keel__config_find(const char *model_dir, char **path, char *errbuf, size_t errlen)
{
    char *json = NULL, *pbtxt = NULL;
    struct stat st;
    bool has_json, has_pbtxt;

    *path = NULL;
    if (asprintf(&json, "%s/config.json", model_dir) < 0) {
        json = NULL;
        goto oom;
    }
    if (asprintf(&pbtxt, "%s/config.pbtxt", model_dir) < 0) {
        pbtxt = NULL;
        goto oom;
    }
    /* lstat's "exists" is enough: a dangling link or a folder is reported by the load. */
    has_json = lstat(json, &st) == 0;
    has_pbtxt = lstat(pbtxt, &st) == 0;
    if (has_json && has_pbtxt) {
        keel__errf(errbuf, errlen,
                   "%s and %s: a model folder holds one configuration; remove one of them", json,
                   pbtxt);
        free(json);
        free(pbtxt);
        return KEEL_ECONFIG;
    }
    if (!has_json && !has_pbtxt) {
        keel__errf(errbuf, errlen, "%s: no config.json or config.pbtxt", model_dir);
        free(json);
        free(pbtxt);
        return KEEL_ECONFIG;
    }
    *path = has_json ? json : pbtxt;
    free(has_json ? pbtxt : json);
    return KEEL_OK;

oom:
    free(json);
    free(pbtxt);
    keel__errf(errbuf, errlen, "%s: out of memory", model_dir);
    return KEEL_ENOMEM;
}

bool keel__config_exists(const char *model_dir)
{
    char path[PATH_MAX];
    struct stat st;

    if (snprintf(path, sizeof(path), "%s/config.json", model_dir) < (int)sizeof(path) &&
        stat(path, &st) == 0)
        return true;
    return snprintf(path, sizeof(path), "%s/config.pbtxt", model_dir) < (int)sizeof(path) &&
           stat(path, &st) == 0;
}

keel_err keel__config_load_dir(const char *model_dir, const char *dir_name,
                               keel__model_config **out, char *errbuf, size_t errlen)
{
    char *path = NULL;
    keel_err err;

    *out = NULL;
    if ((err = keel__config_find(model_dir, &path, errbuf, errlen)) != KEEL_OK)
        return err;
    err = keel__config_load(path, dir_name, out, errbuf, errlen);
    free(path);
    return err;
}

keel_err keel__config_load(const char *path, const char *dir_name, keel__model_config **out,
                           char *errbuf, size_t errlen)
{
    parser p = {path, errbuf, errlen, NULL, NULL};
    struct stat st;
    char *buf = NULL, *grown;
    size_t cap, len = 0;
    ssize_t n;
    int fd = -1;
    keel_err err;

    *out = NULL;
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1) {
        err = failf(&p, NULL, "cannot open: %s", strerror(errno));
        goto done;
    }
    if (fstat(fd, &st) != 0) {
        err = failf(&p, NULL, "cannot stat: %s", strerror(errno));
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        err = failf(&p, NULL, "not a regular file");
        goto done;
    }
    if (st.st_size > CONFIG_MAX_BYTES) {
        err = failf(&p, NULL, "file is %lld bytes; a model configuration may be at most %d bytes",
                    (long long)st.st_size, CONFIG_MAX_BYTES);
        goto done;
    }
    /* The size is a hint only: the file may change while we read, so read to EOF. */
    cap = (size_t)st.st_size + 1;
    if ((buf = keel__malloc(cap)) == NULL) {
        err = KEEL_ENOMEM;
        keel__errf(errbuf, errlen, "%s: out of memory", path);
        goto done;
    }
    for (;;) {
        if (len == cap) {
            if (cap > CONFIG_MAX_BYTES) {
                err = failf(&p, NULL,
                            "file is larger than %d bytes, the limit for a model configuration",
                            CONFIG_MAX_BYTES);
                goto done;
            }
            cap = cap * 2 > CONFIG_MAX_BYTES + 1 ? CONFIG_MAX_BYTES + 1 : cap * 2;
            if ((grown = keel__realloc(buf, cap)) == NULL) {
                err = KEEL_ENOMEM;
                keel__errf(errbuf, errlen, "%s: out of memory", path);
                goto done;
            }
            buf = grown;
        }
        n = read(fd, buf + len, cap - len);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            (void)failf(&p, NULL, "cannot read: %s", strerror(errno));
            err = KEEL_EIO; /* the file exists but the OS failed us: not a config error */
            goto done;
        }
        len += (size_t)n;
    }
    if (len > CONFIG_MAX_BYTES) {
        err = failf(&p, NULL, "file is larger than %d bytes, the limit for a model configuration",
                    CONFIG_MAX_BYTES);
        goto done;
    }
    if (is_pbtxt(path))
        err = keel__config_parse_pbtxt(path, dir_name, buf, len, out, errbuf, errlen);
    else
        err = keel__config_parse(path, dir_name, buf, len, out, errbuf, errlen);

done:
    if (fd != -1)
        close(fd);
    free(buf);
    return err;
}

static void tensors_free(keel__tensor_config *ts, size_t n)
{
    size_t i;

    if (ts == NULL)
        return;
    for (i = 0; i < n; i++)
        free(ts[i].name);
    free(ts);
}

void keel__config_destroy(keel__model_config *cfg)
{
    size_t i;

    if (cfg == NULL)
        return;
    free(cfg->name);
    free(cfg->backend);
    tensors_free(cfg->inputs, cfg->ninputs);
    tensors_free(cfg->outputs, cfg->noutputs);
    free(cfg->versions);
    free(cfg->default_model_filename);
    if (cfg->preprocess != NULL) {
        free(cfg->preprocess->input);
        free(cfg->preprocess->output_input);
        free(cfg->preprocess);
    }
    for (i = 0; i < cfg->nparams; i++) {
        if (cfg->param_keys != NULL)
            free(cfg->param_keys[i]);
        if (cfg->param_values != NULL)
            free(cfg->param_values[i]);
    }
    free(cfg->param_keys);
    free(cfg->param_values);
    free(cfg->json);
    free(cfg->warnings);
    free(cfg);
}

const char *keel__config_param(const keel__model_config *cfg, const char *key)
{
    size_t i;

    for (i = 0; i < cfg->nparams; i++) {
        if (strcmp(cfg->param_keys[i], key) == 0)
            return cfg->param_values[i];
    }
    return NULL;
}

/* ---- versions */

/* Parses a canonical version folder name: digits only, no leading zero, >= 1, fits int64. */
static bool version_name(const char *s, int64_t *out)
{
    int64_t v = 0;

    if (s[0] < '1' || s[0] > '9')
        return false;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return false;
        if (v > (INT64_MAX - (*s - '0')) / 10)
            return false;
        v = v * 10 + (*s - '0');
    }
    *out = v;
    return true;
}

/* Lists the numeric version folders of model_dir into a sorted malloc'd array. */
static keel_err scan_versions(const char *model_dir, int64_t **out, size_t *count, char *errbuf,
                              size_t errlen)
{
    DIR *d = NULL;
    struct dirent *e;
    int64_t *vs = NULL, *grown, v;
    size_t n = 0, cap = 0;
    keel_err err;

    *out = NULL;
    *count = 0;
    if ((d = opendir(model_dir)) == NULL) {
        int saved = errno;
        err = keel__err_from_errno(saved);
        keel__errf(errbuf, errlen, "%s: cannot open the model directory: %s", model_dir,
                   strerror(saved));
        goto fail;
    }
    for (;;) {
        struct stat st;
        errno = 0;
        if ((e = readdir(d)) == NULL) {
            if (errno != 0) {
                int saved = errno;
                err = keel__err_from_errno(saved);
                keel__errf(errbuf, errlen, "%s: cannot read the model directory: %s", model_dir,
                           strerror(saved));
                goto fail;
            }
            break;
        }
        /* "007" is skipped: the loader finds version v in the folder named "%lld" of v. */
        if (!version_name(e->d_name, &v))
            continue;
        if (e->d_type != DT_DIR) {
            /* DT_UNKNOWN on some file systems, DT_LNK for a symlink to a folder. */
            if (e->d_type != DT_UNKNOWN && e->d_type != DT_LNK)
                continue;
            if (fstatat(dirfd(d), e->d_name, &st, 0) != 0 || !S_ISDIR(st.st_mode))
                continue;
        }
        if (n == cap) {
            cap = cap == 0 ? 8 : cap * 2;
            if ((grown = keel__realloc(vs, cap * sizeof(*vs))) == NULL) {
                err = KEEL_ENOMEM;
                keel__errf(errbuf, errlen, "%s: out of memory", model_dir);
                goto fail;
            }
            vs = grown;
        }
        vs[n++] = v;
    }
    closedir(d);
    *out = vs;
    *count = sort_unique(vs, n);
    return KEEL_OK;

fail:
    if (d != NULL)
        closedir(d);
    free(vs);
    return err;
}

keel_err keel__config_select_versions(const keel__model_config *cfg, const char *model_dir,
                                      int64_t **out, size_t *count, char *errbuf, size_t errlen)
{
    int64_t *found = NULL, *sel = NULL;
    size_t nfound = 0, nsel = 0, first = 0, i;
    keel_err err;

    *out = NULL;
    *count = 0;
    if ((err = scan_versions(model_dir, &found, &nfound, errbuf, errlen)) != KEEL_OK)
        return err;

    switch (cfg->policy) {
    case KEEL__POLICY_LATEST:
        nsel = nfound < cfg->latest_n ? nfound : cfg->latest_n;
        first = nfound - nsel;
        break;
    case KEEL__POLICY_ALL:
        nsel = nfound;
        break;
    case KEEL__POLICY_SPECIFIC:
        for (i = 0; i < cfg->nversions; i++) {
            if (bsearch(&cfg->versions[i], found, nfound, sizeof(*found), cmp_i64) == NULL) {
                keel__errf(errbuf, errlen,
                           "%s/%" PRId64 ": version folder listed in version_policy.specific "
                           "does not exist",
                           model_dir, cfg->versions[i]);
                err = KEEL_ECONFIG;
                goto done;
            }
        }
        /* Every listed version exists, so the selection is cfg->versions itself. */
        nsel = cfg->nversions;
        break;
    }
    if (nsel > 0) {
        if ((sel = keel__calloc(nsel, sizeof(*sel))) == NULL) {
            err = KEEL_ENOMEM;
            keel__errf(errbuf, errlen, "%s: out of memory", model_dir);
            goto done;
        }
        memcpy(sel, cfg->policy == KEEL__POLICY_SPECIFIC ? cfg->versions : found + first,
               nsel * sizeof(*sel));
    }
    *out = sel;
    *count = nsel;

done:
    free(found);
    return err;
}
