/*
 * keel_model_check.c: keel-model-check, the helper that checks an untrusted model file in a
 * process of its own before the server loads it.
 *
 * DESIGN
 *   keel-model-check onnx <name> [--input NAME DIMS]... [--output NAME]...   (bytes on stdin)
 * Reads the bytes, reads the graph's interface (onnx_proto.c), builds a cv::dnn::Net from them
 * (onnx_cv.cpp) and runs it twice on zero inputs: the inputs and outputs given (libkeel passes
 * exactly what its warm-up will run), else every graph input (symbolic dimensions 1) and every
 * graph output; with outputs given, then once more on a fresh Net for every graph output
 * (only a crash counts there). Writes exactly one line to standard output and exits:
 *   "ok"                 exit 0: OpenCV loaded and ran the model
 *   "error: <message>"   exit 1: the message names <name> and the reason
 * xgboost: loads the bytes with XGBoost and predicts one row of N features (zeros, then NaN),
 * exactly what the backend's load and warm-up run (keel__xgb_trial in backends/xgboost.c).
 * Anything else (a signal, another status, no line) is a crash, and libkeel says so. The
 * parent (src/backends/onnx.c and xgboost.c through backends/model_check.c and
 * src/core/child.c) starts it with posix_spawn, stdin a
 * memfd holding the bytes, stderr /dev/null, and a deadline. One model per process; nothing
 * is kept. It uses only libkeel's internal readers and the OpenCV wrapper, so a later
 * preprocessing worker pool can run the same checks as one of its job kinds.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/onnx_cv.h"
#include "backends/onnx_proto.h"
#include "backends/xgboost.h"
#include "core/core.h"

#define MAX_BYTES ((size_t)1 << 31)

static int verdict(const char *msg)
{
    if (msg == NULL) {
        fputs("ok\n", stdout);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    printf("error: %s\n", msg);
    fflush(stdout);
    return 1;
}

/* Reads standard input to EOF. */
static char *read_all(size_t *len)
{
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap), *p;
    ssize_t r;

    if (buf == NULL)
        return NULL;
    for (;;) {
        if (n == cap) {
            if (cap >= MAX_BYTES || (p = realloc(buf, cap * 2)) == NULL) {
                free(buf);
                return NULL;
            }
            buf = p;
            cap *= 2;
        }
        r = read(0, buf + n, cap - n);
        if (r == 0)
            break;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            free(buf);
            return NULL;
        }
        n += (size_t)r;
    }
    *len = n;
    return buf;
}

/* What to run: from --input/--output, else the graph's whole interface. */
typedef struct run_spec {
    size_t ninputs, noutputs;
    const char *in_names[KEEL__ONNX_MAX_IO];
    int64_t shapes[KEEL__ONNX_MAX_IO][KEEL__MAX_DIMS + 1];
    size_t ndims[KEEL__ONNX_MAX_IO];
    const char *out_names[KEEL__ONNX_MAX_IO];
} run_spec;

/* "1,3,32,32" into shape; false if malformed. */
static bool parse_dims(const char *s, int64_t *shape, size_t *ndim)
{
    char *end;

    *ndim = 0;
    if (*s == '\0')
        return true; /* a scalar */
    for (;;) {
        long long v = strtoll(s, &end, 10);
        if (end == s || v < 1 || *ndim == KEEL__MAX_DIMS + 1)
            return false;
        shape[(*ndim)++] = v;
        if (*end == '\0')
            return true;
        if (*end != ',')
            return false;
        s = end + 1;
    }
}

static int check_onnx(const char *name, const run_spec *spec_in)
{
    keel__onnx_graph *g = malloc(sizeof(*g));
    run_spec *spec = malloc(sizeof(*spec));
    keel__cvnet_input in[KEEL__ONNX_MAX_IO];
    float *zeros[KEEL__ONNX_MAX_IO] = {0};
    keel__cvnet *net = NULL;
    char msg[600];
    size_t len = 0;
    char *bytes = read_all(&len);
    int rc = 1;

    msg[0] = '\0';
    if (g == NULL || spec == NULL || bytes == NULL) {
        snprintf(msg, sizeof(msg), "%s: cannot read the model bytes (out of memory?)", name);
        goto done;
    }
    if (keel__onnx_graph_read(bytes, len, name, g, msg, sizeof(msg)) != KEEL_OK)
        goto done;
    *spec = *spec_in;
    if (spec->ninputs == 0) { /* the graph's inputs, variable dimensions 1 */
        for (size_t i = 0; i < g->ninputs; i++) {
            spec->in_names[i] = g->inputs[i].name;
            spec->ndims[i] = g->inputs[i].ndims;
            for (size_t d = 0; d < g->inputs[i].ndims; d++)
                spec->shapes[i][d] = g->inputs[i].dims[d] > 0 ? g->inputs[i].dims[d] : 1;
        }
        spec->ninputs = g->ninputs;
    }
    if (spec->noutputs == 0) {
        for (size_t i = 0; i < g->noutputs; i++)
            spec->out_names[i] = g->outputs[i].name;
        spec->noutputs = g->noutputs;
    }
    if (keel__cvnet_load(bytes, len, name, &net, msg, sizeof(msg)) != KEEL_OK)
        goto done;
    for (size_t i = 0; i < spec->ninputs; i++) {
        size_t count = 1;

        for (size_t d = 0; d < spec->ndims[i]; d++) {
            if (keel__mul_overflow_size(count, (size_t)spec->shapes[i][d], &count) ||
                count > ((size_t)1 << 28)) {
                snprintf(msg, sizeof(msg), "%s: input '%s' is too large to test", name,
                         spec->in_names[i]);
                goto done;
            }
        }
        if ((zeros[i] = calloc(count, sizeof(float))) == NULL) {
            snprintf(msg, sizeof(msg), "%s: out of memory", name);
            goto done;
        }
        in[i].name = spec->in_names[i];
        in[i].shape = spec->shapes[i];
        in[i].ndim = spec->ndims[i];
        in[i].data = zeros[i];
    }
    /* Twice: the first forward allocates the Net's blobs, the second reuses them, as every
     * request after the warm-up does in the server. */
    for (int pass = 0; pass < 2; pass++) {
        if (keel__cvnet_run(net, in, spec->ninputs, spec->out_names, spec->noutputs, msg,
                            sizeof(msg)) != KEEL_OK) {
            /* The wrapper's messages start "onnx: "; say which file. */
            char tmp[sizeof(msg) + KEEL__ONNX_MAX_NAME + 64];
            snprintf(tmp, sizeof(tmp), "%s: a test run on zero inputs failed: %s", name, msg);
            snprintf(msg, sizeof(msg), "%.*s", (int)sizeof(msg) - 1, tmp);
            goto done;
        }
    }
    /* Then every graph output at once, on a fresh Net. The server never asks for more than
     * the configured outputs, but OpenCV's bad memory accesses depend on the heap: a layer
     * with more outputs than OpenCV implements (the test data's Dropout with its mask) reads
     * past its blobs, which faults here reliably only when all outputs are computed. An
     * error (an exception) here is fine: only a crash counts, and the parent sees it. */
    if (spec_in->noutputs > 0) {
        const char *all[KEEL__ONNX_MAX_IO];
        char ignored[600];

        keel__cvnet_free(net);
        net = NULL;
        for (size_t i = 0; i < g->noutputs; i++)
            all[i] = g->outputs[i].name;
        if (keel__cvnet_load(bytes, len, name, &net, ignored, sizeof(ignored)) == KEEL_OK)
            (void)keel__cvnet_run(net, in, spec->ninputs, all, g->noutputs, ignored,
                                  sizeof(ignored));
    }
    rc = 0;

done:
    keel__cvnet_free(net);
    for (size_t i = 0; i < KEEL__ONNX_MAX_IO; i++)
        free(zeros[i]);
    free(spec);
    free(g);
    free(bytes);
    return verdict(rc == 0 ? NULL : msg[0] != '\0' ? msg : "the check failed");
}

static int check_xgboost(const char *name, int64_t nfeatures)
{
    char msg[600];
    size_t len = 0;
    char *bytes = read_all(&len);
    keel_err err;

    if (bytes == NULL) {
        snprintf(msg, sizeof(msg), "%s: cannot read the model bytes (out of memory?)", name);
        return verdict(msg);
    }
    err = keel__xgb_trial(name, bytes, len, nfeatures, msg, sizeof(msg));
    free(bytes);
    return verdict(err == KEEL_OK ? NULL : msg);
}

static int usage(void)
{
    fprintf(stderr, "usage: keel-model-check onnx NAME [--input NAME DIMS]... [--output NAME]..."
                    " < model.onnx\n  DIMS: comma-separated, e.g. 1,3,32,32\n"
                    "       keel-model-check xgboost NAME [--features N] < model.json\n");
    return 2;
}

int main(int argc, char **argv)
{
    static run_spec spec;

    if (argc >= 3 && strcmp(argv[1], "xgboost") == 0) {
        long long features = 0;
        char *end;

        if (argc == 5 && strcmp(argv[3], "--features") == 0) {
            features = strtoll(argv[4], &end, 10);
            if (end == argv[4] || *end != '\0' || features < 1)
                return usage();
        } else if (argc != 3) {
            return usage();
        }
        return check_xgboost(argv[2], (int64_t)features);
    }
    if (argc < 3 || strcmp(argv[1], "onnx") != 0)
        return usage();
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--input") == 0 && i + 2 < argc && spec.ninputs < KEEL__ONNX_MAX_IO) {
            size_t k = spec.ninputs++;
            spec.in_names[k] = argv[i + 1];
            if (!parse_dims(argv[i + 2], spec.shapes[k], &spec.ndims[k]))
                return usage();
            i += 2;
        } else if (strcmp(argv[i], "--output") == 0 && i + 1 < argc &&
                   spec.noutputs < KEEL__ONNX_MAX_IO) {
            spec.out_names[spec.noutputs++] = argv[++i];
        } else {
            return usage();
        }
    }
    return check_onnx(argv[2], &spec);
}
