/*
 * keel.c: the keel command-line program.
 *
 * DESIGN
 * A thin client of the public API (include/keel/keel.h) and of nothing else in keel: whatever
 * this program can do, an embedding application can do too. models and infer are
 * single-threaded; the only code that keel threads may run is log_to_stderr(), which writes one
 * line per call with one stdio call (stdio locks the stream, so lines never interleave). perf
 * and soak are HTTP clients with their own threads (perf_internal.h, soak.c).
 *
 * Commands:
 *   keel models --model-repository DIR         load every model, print their status table
 *   keel infer  --model-repository DIR --model NAME [FILE|-]
 *                                              score rows of numbers, one request per row
 *   keel serve  --model-repository DIR [...]   the HTTP server (src/server/server.h); only
 *                                              when built with the server (KEEL_HAVE_SERVER)
 *   keel perf   [...]                          HTTP load generator (perf.c)
 *   keel soak   [...]                          hot swaps under load, sampled (soak.c)
 * Exit codes: 0 success, 1 runtime error (bad repository, model not ready, bad row, failed
 * inference, write error), 2 usage error. Every error is one line on stderr, "keel: ...".
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cliutil.h"
#include "keel/keel.h"
#ifdef KEEL_HAVE_SERVER
#include "server.h"
#endif
#include "perf_internal.h"

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2 };

/* Commands, as bits, so the option table can say which commands take an option. */
enum { CMD_MODELS = 1u << 0, CMD_INFER = 1u << 1 };

typedef struct cli_opts {
    const char *repository; /* --model-repository */
    const char *model;      /* --model */
    int64_t version;        /* --version; -1 = newest loaded */
    const char *input_name; /* --input */
    bool label_first;       /* --label-first */
    keel_log_level log_level;
    const char *file; /* positional; NULL or "-" = standard input */
} cli_opts;

typedef enum opt_id {
    OPT_HELP,
    OPT_REPOSITORY,
    OPT_MODEL,
    OPT_VERSION,
    OPT_INPUT,
    OPT_LABEL_FIRST,
    OPT_LOG_VERBOSE,
} opt_id;

enum { ARG_NONE, ARG_REQUIRED, ARG_OPTIONAL /* only as --name=value */ };

static const struct {
    const char *name;
    opt_id id;
    int arg;
    unsigned cmds;
} options[] = {
    {"--help", OPT_HELP, ARG_NONE, CMD_MODELS | CMD_INFER},
    {"-h", OPT_HELP, ARG_NONE, CMD_MODELS | CMD_INFER},
    {"--model-repository", OPT_REPOSITORY, ARG_REQUIRED, CMD_MODELS | CMD_INFER},
    {"--log-verbose", OPT_LOG_VERBOSE, ARG_OPTIONAL, CMD_MODELS | CMD_INFER},
    {"--model", OPT_MODEL, ARG_REQUIRED, CMD_INFER},
    {"--version", OPT_VERSION, ARG_REQUIRED, CMD_INFER},
    {"--input", OPT_INPUT, ARG_REQUIRED, CMD_INFER},
    {"--label-first", OPT_LABEL_FIRST, ARG_NONE, CMD_INFER},
};

/* src/cli/convert.c: `keel convert`. */
int keel_convert_main(int argc, char **argv);

static void print_help(FILE *f)
{
    fputs("usage: keel <command> [options]\n"
          "       keel --help | --version\n"
          "\n"
          "commands:\n"
          "  models --model-repository DIR\n"
          "      Loads every model in DIR and prints one line per loaded model version\n"
          "      (or per model, if none of its versions loaded): name, version, state,\n"
          "      generation id and the error of the model's last load.\n"
          "\n"
          "  infer --model-repository DIR --model NAME [--version N] [--input NAME]\n"
          "        [--label-first] [FILE | -]\n"
          "      Scores rows read from FILE (standard input if FILE is - or absent): one row\n"
          "      per line, numbers separated by blanks, \"nan\" for a missing value; blank lines\n"
          "      and lines starting with '#' are skipped. Each row of F numbers becomes one\n"
          "      request with a FP32 input of shape [F] ([1, F] if the model batches). Prints\n"
          "      one line per row: the label (with --label-first), then every output value,\n"
          "      separated by tabs; a summary goes to standard error. Stops at the first\n"
          "      row that fails.\n"
          "\n"
          "  serve --model-repository DIR [options]\n"
          "      Serves the models over HTTP (KServe V2 REST). See 'keel serve --help'.\n"
          "\n"
          "  perf --url HOST:PORT --model NAME [options]\n"
          "      Load generator for a KServe V2 HTTP server: throughput and latency\n"
          "      percentiles per concurrency or request rate. See 'keel perf --help'.\n"
          "\n"
          "  convert --model-repository DIR --model NAME\n"
          "      Loads the model (config.json or Triton's config.pbtxt) and prints the\n"
          "      configuration keel serves it with, as config.json. See 'keel convert --help'.\n"
          "\n"
          "  soak --model-repository DIR --model NAME [options]\n"
          "      Hot-swaps a model under load while sampling the server's memory, fds,\n"
          "      threads and live objects; a verdict per series, CSV and SVG plot.\n"
          "      See 'keel soak --help'.\n"
          "\n"
          "options:\n"
          "  --model-repository DIR  the model repository directory (required)\n"
          "  --model NAME            the model to run (infer; required)\n"
          "  --version N             the model version to run (default: the newest loaded)\n"
          "  --input NAME            the model's input tensor (default: features)\n"
          "  --label-first           the first number of each row is a label, not a feature\n"
          "  --log-verbose[=N]       keel's log on standard error: 0 warnings and errors\n"
          "                          (default), 1 (--log-verbose) adds info, 2 adds debug\n"
          "  -h, --help              print this help\n"
          "\n"
          "exit status: 0 success, 1 error, 2 usage error\n",
          f);
}

/* Prints "keel: <why>" and a pointer to --help; returns EXIT_USAGE. */
#define usage_error(...) keel__cli_usage_error("keel", EXIT_USAGE, __VA_ARGS__)

static bool parse_int64(const char *s, int64_t *out)
{
    char *end;
    long long v;

    errno = 0;
    v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || errno != 0)
        return false;
    *out = (int64_t)v;
    return true;
}

/*
 * Parses the options of command cmd from argv[0..argc). Returns EXIT_OK, EXIT_USAGE (after
 * printing why), or -1 if --help was given. Options and operands may come in any order; "--"
 * ends the options. Values are borrowed from argv.
 */
static int parse_opts(unsigned cmd, int argc, char **argv, cli_opts *o)
{
    bool options_done = false;

    o->repository = NULL;
    o->model = NULL;
    o->version = -1;
    o->input_name = "features";
    o->label_first = false;
    o->log_level = KEEL_LOG_WARN;
    o->file = NULL;

    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        const char *val = NULL;
        const char *eq;
        size_t namelen;
        size_t k;
        int64_t n;

        if (options_done || arg[0] != '-' || strcmp(arg, "-") == 0) {
            if (o->file != NULL)
                return usage_error("unexpected argument '%s'", arg);
            if (cmd != CMD_INFER)
                return usage_error("unexpected argument '%s'", arg);
            o->file = arg;
            continue;
        }
        if (strcmp(arg, "--") == 0) {
            options_done = true;
            continue;
        }
        eq = strchr(arg, '=');
        namelen = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
        for (k = 0; k < sizeof(options) / sizeof(options[0]); k++) {
            if (strlen(options[k].name) == namelen && strncmp(arg, options[k].name, namelen) == 0)
                break;
        }
        if (k == sizeof(options) / sizeof(options[0]))
            return usage_error("unknown option '%s'", arg);
        if ((options[k].cmds & cmd) == 0)
            return usage_error("option '%.*s' does not apply to 'keel %s'", (int)namelen, arg,
                               cmd == CMD_MODELS ? "models" : "infer");
        if (eq != NULL) {
            if (options[k].arg == ARG_NONE)
                return usage_error("option '%s' takes no value", arg);
            val = eq + 1;
        } else if (options[k].arg == ARG_REQUIRED) {
            if (i + 1 >= argc)
                return usage_error("option '%s' needs a value", arg);
            val = argv[++i];
        }

        switch (options[k].id) {
        case OPT_HELP:
            return -1;
        case OPT_REPOSITORY:
            o->repository = val;
            break;
        case OPT_MODEL:
            o->model = val;
            break;
        case OPT_VERSION:
            if (!parse_int64(val, &n) || n < 0)
                return usage_error("--version: '%s' is not a version number", val);
            o->version = n;
            break;
        case OPT_INPUT:
            o->input_name = val;
            break;
        case OPT_LABEL_FIRST:
            o->label_first = true;
            break;
        case OPT_LOG_VERBOSE:
            if (val == NULL)
                n = 1;
            else if (!parse_int64(val, &n) || n < 0)
                return usage_error("--log-verbose: '%s' is not a level (0, 1 or 2)", val);
            o->log_level = n == 0 ? KEEL_LOG_WARN : n == 1 ? KEEL_LOG_INFO : KEEL_LOG_DEBUG;
            break;
        }
    }

    if (o->repository == NULL || o->repository[0] == '\0')
        return usage_error("--model-repository DIR is required");
    if (cmd == CMD_INFER) {
        if (o->model == NULL || o->model[0] == '\0')
            return usage_error("--model NAME is required");
        if (o->input_name[0] == '\0')
            return usage_error("--input needs a name");
    }
    return EXIT_OK;
}

/* Runs on any keel thread, never under a keel lock. */
static void log_to_stderr(void *user, keel_log_level level, const char *msg)
{
    static const char *const names[] = {"error", "warning", "info", "debug"};
    const char *name = (unsigned)level < sizeof(names) / sizeof(names[0]) ? names[level] : "log";

    (void)user;
    fprintf(stderr, "keel: %s: %s\n", name, msg);
}

/* On EXIT_OK the caller owns *out. */
static int runtime_open(const cli_opts *o, keel_runtime **out)
{
    keel_runtime_opts ro;
    keel_err err;

    *out = NULL;
    keel_runtime_opts_init(&ro);
    ro.model_repository = o->repository;
    ro.control = KEEL_CONTROL_NONE;
    /* Every model of the repository loads, image models too (examples/models/digits_image):
     * they need a preprocessing worker even though `keel infer` sends only tensors. */
    ro.preprocess_workers = 1;
    ro.log_fn = log_to_stderr;
    ro.log_user = NULL;
    ro.log_level = o->log_level;
    err = keel_runtime_create(&ro, out);
    if (err != KEEL_OK) {
        fprintf(stderr, "keel: %s: cannot serve this model repository: %s\n", o->repository,
                keel_strerror(err));
        return EXIT_RUNTIME;
    }
    return EXIT_OK;
}

/* ---------------------------------------------------------------- keel models */

static int cmd_models(const cli_opts *o)
{
    keel_runtime *rt = NULL;
    keel_model_status *list = NULL;
    size_t count = 0;
    int namew = (int)strlen("NAME");
    keel_err err;
    int rc;

    if ((rc = runtime_open(o, &rt)) != EXIT_OK)
        goto done;
    if ((err = keel_model_list(rt, &list, &count)) != KEEL_OK) {
        fprintf(stderr, "keel: listing the models: %s\n", keel_strerror(err));
        rc = EXIT_RUNTIME;
        goto done;
    }
    for (size_t i = 0; i < count; i++) {
        size_t len = strlen(list[i].name);
        if (len > (size_t)namew && len < 200)
            namew = (int)len;
    }
    printf("%-*s  %7s  %-11s  %10s  %s\n", namew, "NAME", "VERSION", "STATE", "GENERATION",
           "LAST ERROR");
    for (size_t i = 0; i < count; i++) {
        const keel_model_status *st = &list[i];
        char version[24] = "-";
        char generation[24] = "-";

        if (st->version >= 0)
            snprintf(version, sizeof(version), "%" PRId64, st->version);
        if (st->generation_id != 0)
            snprintf(generation, sizeof(generation), "%" PRIu64, st->generation_id);
        printf("%-*s  %7s  %-11s  %10s  ", namew, st->name, version,
               keel_model_state_name(st->state), generation);
        if (st->last_error == KEEL_OK)
            printf("-\n");
        else if (st->last_error_msg != NULL && st->last_error_msg[0] != '\0')
            printf("%s: %s\n", keel_err_name(st->last_error), st->last_error_msg);
        else
            printf("%s: %s\n", keel_err_name(st->last_error), keel_strerror(st->last_error));
    }
    rc = EXIT_OK;

done:
    keel_model_status_free(list, count);
    keel_runtime_destroy(rt);
    return rc;
}

/* ---------------------------------------------------------------- keel infer */

/*
 * Explains why the model cannot serve: not in the repository, the wanted version not loaded,
 * or its last load failed. Always returns EXIT_RUNTIME.
 */
static int report_not_ready(keel_runtime *rt, const cli_opts *o)
{
    keel_model_status *list = NULL;
    size_t count = 0;
    const keel_model_status *found = NULL;
    keel_err err;

    if ((err = keel_model_list(rt, &list, &count)) != KEEL_OK) {
        fprintf(stderr, "keel: model %s is not ready (listing the models: %s)\n", o->model,
                keel_strerror(err));
        return EXIT_RUNTIME;
    }
    for (size_t i = 0; i < count; i++) {
        if (strcmp(list[i].name, o->model) == 0) {
            found = &list[i];
            break;
        }
    }
    if (found == NULL) {
        fprintf(stderr, "keel: model %s is not in the repository %s\n", o->model, o->repository);
    } else if (found->last_error != KEEL_OK) {
        fprintf(stderr, "keel: model %s is %s: %s: %s\n", o->model,
                keel_model_state_name(found->state), keel_strerror(found->last_error),
                found->last_error_msg != NULL && found->last_error_msg[0] != '\0'
                    ? found->last_error_msg
                    : keel_err_name(found->last_error));
    } else if (o->version >= 0) {
        fprintf(stderr, "keel: model %s has no ready version %" PRId64 "\n", o->model, o->version);
    } else {
        fprintf(stderr, "keel: model %s is %s\n", o->model, keel_model_state_name(found->state));
    }
    keel_model_status_free(list, count);
    return EXIT_RUNTIME;
}

/*
 * Finds `"key": <integer>` in JSON text. This is a deliberately minimal scan, not a parser:
 * the command line links no JSON library, and the normalised config keel returns always has
 * the integer fields we ask for. An occurrence inside a string value is preceded by a
 * backslash-escaped quote and is skipped.
 */
static bool json_find_int(const char *json, const char *key, long long *out)
{
    size_t keylen = strlen(key);

    for (const char *p = strchr(json, '"'); p != NULL; p = strchr(p + 1, '"')) {
        const char *q = p + 1;
        char *end;
        long long v;

        if ((p > json && p[-1] == '\\') || strncmp(q, key, keylen) != 0 || q[keylen] != '"')
            continue;
        q += keylen + 1;
        while (isspace((unsigned char)*q))
            q++;
        if (*q != ':')
            continue;
        q++;
        while (isspace((unsigned char)*q))
            q++;
        errno = 0;
        v = strtoll(q, &end, 10);
        if (end == q || errno != 0)
            continue;
        if (*end != '\0' && *end != ',' && *end != '}' && !isspace((unsigned char)*end))
            continue;
        *out = v;
        return true;
    }
    return false;
}

/* Converts an IEEE 754 half to float without libm. */
static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    float f;

    if (exp == 0) {
        f = (float)mant / 16777216.0f; /* zero or subnormal: mant * 2^-24 */
        return sign != 0 ? -f : f;
    }
    if (exp == 31)
        bits = sign | 0x7f800000u | (mant << 13);
    else
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* Prints every element of t, tab-separated; *first says whether the line is still empty and
 * is cleared once something is printed. Returns false if t cannot be printed (malformed BYTES
 * data, unknown datatype). */
static bool print_tensor(FILE *out, const keel_tensor_view *t, bool *first)
{
    const unsigned char *d = t->data;
    size_t size = keel_datatype_size(t->datatype);

    if (t->datatype == KEEL_TYPE_BYTES) {
        size_t off = 0;
        while (off < t->bytes) {
            uint32_t len;
            if (t->bytes - off < 4)
                return false;
            len = (uint32_t)d[off] | (uint32_t)d[off + 1] << 8 | (uint32_t)d[off + 2] << 16 |
                  (uint32_t)d[off + 3] << 24;
            off += 4;
            if (t->bytes - off < len)
                return false;
            if (!*first)
                fputc('\t', out);
            *first = false;
            fwrite(d + off, 1, len, out);
            off += len;
        }
        return true;
    }
    if (size == 0)
        return false;
    for (size_t off = 0; off + size <= t->bytes; off += size) {
        union {
            uint8_t u8;
            uint16_t u16;
            uint32_t u32;
            uint64_t u64;
            int8_t i8;
            int16_t i16;
            int32_t i32;
            int64_t i64;
            float f32;
            double f64;
        } v;

        memcpy(&v, d + off, size); /* the data may not be aligned for the type */
        if (!*first)
            fputc('\t', out);
        *first = false;
        switch (t->datatype) {
        case KEEL_TYPE_BOOL:
            fprintf(out, "%d", v.u8 != 0);
            break;
        case KEEL_TYPE_UINT8:
            fprintf(out, "%u", (unsigned)v.u8);
            break;
        case KEEL_TYPE_UINT16:
            fprintf(out, "%u", (unsigned)v.u16);
            break;
        case KEEL_TYPE_UINT32:
            fprintf(out, "%" PRIu32, v.u32);
            break;
        case KEEL_TYPE_UINT64:
            fprintf(out, "%" PRIu64, v.u64);
            break;
        case KEEL_TYPE_INT8:
            fprintf(out, "%d", (int)v.i8);
            break;
        case KEEL_TYPE_INT16:
            fprintf(out, "%d", (int)v.i16);
            break;
        case KEEL_TYPE_INT32:
            fprintf(out, "%" PRId32, v.i32);
            break;
        case KEEL_TYPE_INT64:
            fprintf(out, "%" PRId64, v.i64);
            break;
        case KEEL_TYPE_FP16:
            fprintf(out, "%.5g", (double)half_to_float(v.u16));
            break;
        case KEEL_TYPE_FP32:
            fprintf(out, "%.9g", (double)v.f32);
            break;
        case KEEL_TYPE_FP64:
            fprintf(out, "%.17g", v.f64);
            break;
        default:
            return false;
        }
    }
    return true;
}

/*
 * Parses one line into vals (grown as needed; *cap is its capacity). Returns the number of
 * values (0 for a blank or '#' line), or -1 after printing which token is not a number.
 */
static long parse_row(const char *line, float **vals, size_t *cap, const char *fname,
                      unsigned long lineno)
{
    const char *p = line;
    size_t n = 0;

    while (isspace((unsigned char)*p))
        p++;
    if (*p == '\0' || *p == '#')
        return 0;
    while (*p != '\0') {
        char *end;
        double v;

        v = strtod(p, &end);
        if (end == p || (*end != '\0' && !isspace((unsigned char)*end))) {
            const char *tok_end = p;
            while (*tok_end != '\0' && !isspace((unsigned char)*tok_end))
                tok_end++;
            fprintf(stderr, "keel: %s:%lu: column %zu: '%.*s' is not a number\n", fname, lineno,
                    n + 1, (int)(tok_end - p > 40 ? 40 : tok_end - p), p);
            return -1;
        }
        /* A value out of float's range becomes inf or 0, as strtod and the cast make it. */
        if (n == *cap) {
            size_t ncap = *cap == 0 ? 64 : *cap * 2;
            float *nv;
            if (ncap > SIZE_MAX / sizeof(float) ||
                (nv = realloc(*vals, ncap * sizeof(float))) == NULL) {
                fprintf(stderr, "keel: %s:%lu: out of memory\n", fname, lineno);
                return -1;
            }
            *vals = nv;
            *cap = ncap;
        }
        (*vals)[n++] = (float)v;
        p = end;
        while (isspace((unsigned char)*p))
            p++;
    }
    return (long)n;
}

/* Prints "keel: <where>: <what>: <the request's message or the code's description>". */
static void report_request_error(const char *where, const char *what, const keel_request *req,
                                 keel_err err)
{
    const char *msg = req != NULL ? keel_request_error(req) : NULL;

    if (msg != NULL && msg[0] != '\0')
        fprintf(stderr, "keel: %s: %s: %s (%s)\n", where, what, msg, keel_err_name(err));
    else
        fprintf(stderr, "keel: %s: %s: %s\n", where, what, keel_strerror(err));
}

static double elapsed_ms(const struct timespec *start)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) * 1e3 +
           (double)(now.tv_nsec - start->tv_nsec) / 1e6;
}

static int cmd_infer(const cli_opts *o)
{
    const bool use_stdin = o->file == NULL || strcmp(o->file, "-") == 0;
    const char *fname = use_stdin ? "<stdin>" : o->file;
    FILE *in = NULL;
    keel_runtime *rt = NULL;
    keel_request *req = NULL;
    char *config = NULL;
    char *line = NULL;
    size_t linecap = 0;
    float *vals = NULL;
    size_t cap = 0;
    long long max_batch = 0;
    unsigned long lineno = 0;
    unsigned long rows = 0;
    int64_t last_version = -1;
    uint64_t last_generation = 0;
    struct timespec start;
    char where[512];
    keel_err err;
    int rc;

    clock_gettime(CLOCK_MONOTONIC, &start);
    /* Open the input first: a typo in its name should not cost a model load. */
    if (use_stdin) {
        in = stdin;
    } else if ((in = fopen(o->file, "r")) == NULL) {
        fprintf(stderr, "keel: %s: %s\n", o->file, strerror(errno));
        rc = EXIT_RUNTIME;
        goto done;
    }
    if ((rc = runtime_open(o, &rt)) != EXIT_OK)
        goto done;
    if (!keel_model_is_ready(rt, o->model, o->version)) {
        rc = report_not_ready(rt, o);
        goto done;
    }
    if ((err = keel_model_config_json(rt, o->model, &config)) != KEEL_OK) {
        fprintf(stderr, "keel: model %s: reading its configuration: %s\n", o->model,
                keel_strerror(err));
        rc = EXIT_RUNTIME;
        goto done;
    }
    /* With max_batch_size > 0 every input has a leading batch dimension. */
    if (!json_find_int(config, "max_batch_size", &max_batch))
        max_batch = 0;

    for (;;) {
        ssize_t got;
        long n;
        const float *feats;
        size_t nfeats;
        int64_t shape[2];
        size_t ndim;
        bool first;

        errno = 0;
        if ((got = getline(&line, &linecap, in)) < 0) {
            if (ferror(in)) {
                fprintf(stderr, "keel: %s: %s\n", fname, strerror(errno != 0 ? errno : EIO));
                rc = EXIT_RUNTIME;
                goto done;
            }
            break;
        }
        lineno++;
        if ((size_t)got != strlen(line)) {
            fprintf(stderr, "keel: %s:%lu: the line contains a NUL byte\n", fname, lineno);
            rc = EXIT_RUNTIME;
            goto done;
        }
        if ((n = parse_row(line, &vals, &cap, fname, lineno)) < 0) {
            rc = EXIT_RUNTIME;
            goto done;
        }
        if (n == 0)
            continue;
        if (o->label_first && n < 2) {
            fprintf(stderr, "keel: %s:%lu: --label-first needs a label and at least one feature\n",
                    fname, lineno);
            rc = EXIT_RUNTIME;
            goto done;
        }
        feats = o->label_first ? vals + 1 : vals;
        nfeats = o->label_first ? (size_t)n - 1 : (size_t)n;
        ndim = 0;
        if (max_batch > 0)
            shape[ndim++] = 1;
        shape[ndim++] = (int64_t)nfeats;
        snprintf(where, sizeof(where), "%s:%lu", fname, lineno);

        if ((err = keel_request_create(rt, o->model, o->version, &req)) != KEEL_OK) {
            report_request_error(where, "creating the request", NULL, err);
            rc = EXIT_RUNTIME;
            goto done;
        }
        err = keel_request_add_input(req, o->input_name, KEEL_TYPE_FP32, shape, ndim, feats,
                                     nfeats * sizeof(float));
        if (err != KEEL_OK) {
            report_request_error(where, "adding the input", req, err);
            rc = EXIT_RUNTIME;
            goto done;
        }
        if ((err = keel_infer(req)) != KEEL_OK) {
            report_request_error(where, "inference failed", req, err);
            rc = EXIT_RUNTIME;
            goto done;
        }

        first = true;
        if (o->label_first) {
            printf("%.9g", (double)vals[0]);
            first = false;
        }
        for (size_t i = 0; i < keel_request_output_count(req); i++) {
            keel_tensor_view t;

            if ((err = keel_request_output(req, i, &t)) != KEEL_OK) {
                putchar('\n');
                report_request_error(where, "reading an output", req, err);
                rc = EXIT_RUNTIME;
                goto done;
            }
            if (!print_tensor(stdout, &t, &first)) {
                putchar('\n');
                fprintf(stderr, "keel: %s: output %s: cannot print %s data of %zu bytes\n", where,
                        t.name, keel_datatype_name(t.datatype), t.bytes);
                rc = EXIT_RUNTIME;
                goto done;
            }
        }
        putchar('\n');
        rows++;
        last_version = keel_request_model_version(req);
        last_generation = keel_request_generation_id(req);
        keel_request_destroy(req);
        req = NULL;
    }

    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "keel: writing the results: %s\n", strerror(errno != 0 ? errno : EIO));
        rc = EXIT_RUNTIME;
        goto done;
    }
    if (rows == 0)
        fprintf(stderr, "keel: %s: no rows to score\n", fname);
    else
        fprintf(stderr,
                "keel: scored %lu row%s from %s with model %s version %" PRId64
                " (generation %" PRIu64 ") in %.1f ms\n",
                rows, rows == 1 ? "" : "s", fname, o->model, last_version, last_generation,
                elapsed_ms(&start));
    rc = EXIT_OK;

done:
    /* Lines printed before a failure must reach stdout before the runtime goes away. */
    fflush(stdout);
    keel_request_destroy(req);
    keel_runtime_destroy(rt);
    free(config);
    free(vals);
    free(line);
    if (in != NULL && in != stdin)
        fclose(in);
    return rc;
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    cli_opts o;
    unsigned cmd;
    int rc;

    if (argc < 2) {
        print_help(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        print_help(stdout);
        return EXIT_OK;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("keel %s\n", KEEL_VERSION_STRING);
        return EXIT_OK;
    }
    if (strcmp(argv[1], "serve") == 0) {
#ifdef KEEL_HAVE_SERVER
        return keel_server_main(argc - 2, argv + 2);
#else
        return usage_error("this keel was built without the HTTP server");
#endif
    }
    if (strcmp(argv[1], "perf") == 0)
        return keel_perf_main(argc - 2, argv + 2);
    if (strcmp(argv[1], "soak") == 0)
        return keel_soak_main(argc - 2, argv + 2);
    if (strcmp(argv[1], "convert") == 0)
        return keel_convert_main(argc - 2, argv + 2);
    if (strcmp(argv[1], "models") == 0)
        cmd = CMD_MODELS;
    else if (strcmp(argv[1], "infer") == 0)
        cmd = CMD_INFER;
    else if (argv[1][0] == '-')
        return usage_error("unknown option '%s'", argv[1]);
    else
        return usage_error("unknown command '%s'", argv[1]);

    rc = parse_opts(cmd, argc - 2, argv + 2, &o);
    if (rc == -1) {
        print_help(stdout);
        return EXIT_OK;
    }
    if (rc != EXIT_OK)
        return rc;
    return cmd == CMD_MODELS ? cmd_models(&o) : cmd_infer(&o);
}
