/*
 * keel_model_check.c: keel-model-check, the helper that checks an untrusted model file in a
 * process of its own before the server loads it.
 *
 * DESIGN
 *   keel-model-check onnx <name>     model bytes on standard input
 * Reads the bytes, reads the graph's interface (onnx_proto.c), builds a cv::dnn::Net from them
 * (onnx_cv.cpp) and runs it once on zero inputs (symbolic dimensions 1, as keel's warm-up
 * does). Writes exactly one line to standard output and exits:
 *   "ok"                 exit 0: OpenCV loaded and ran the model
 *   "error: <message>"   exit 1: the message names <name> and the reason
 * Anything else (a signal, another status, no line) is a crash, and libkeel says so. The
 * parent (src/backends/onnx.c through src/core/child.c) starts it with posix_spawn, stdin a
 * memfd holding the bytes, stderr /dev/null, and a deadline. One model per process; nothing
 * is kept. It uses only libkeel's internal readers and the OpenCV wrapper, so a later
 * preprocessing worker pool can run the same checks as one of its job kinds.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/onnx_cv.h"
#include "backends/onnx_proto.h"
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

static int check_onnx(const char *name)
{
    keel__onnx_graph *g = malloc(sizeof(*g));
    keel__cvnet_input in[KEEL__ONNX_MAX_IO];
    int64_t shapes[KEEL__ONNX_MAX_IO][KEEL__MAX_DIMS];
    float *zeros[KEEL__ONNX_MAX_IO] = {0};
    const char *outs[KEEL__ONNX_MAX_IO];
    keel__cvnet *net = NULL;
    char msg[600];
    size_t len = 0;
    char *bytes = read_all(&len);
    int rc = 1;

    msg[0] = '\0';
    if (g == NULL || bytes == NULL) {
        snprintf(msg, sizeof(msg), "%s: cannot read the model bytes (out of memory?)", name);
        goto done;
    }
    if (keel__onnx_graph_read(bytes, len, name, g, msg, sizeof(msg)) != KEEL_OK)
        goto done;
    if (keel__cvnet_load(bytes, len, name, &net, msg, sizeof(msg)) != KEEL_OK)
        goto done;
    for (size_t i = 0; i < g->ninputs; i++) {
        const keel__onnx_value *v = &g->inputs[i];
        size_t count = 1;

        for (size_t d = 0; d < v->ndims; d++) {
            shapes[i][d] = v->dims[d] > 0 ? v->dims[d] : 1;
            if (keel__mul_overflow_size(count, (size_t)shapes[i][d], &count) ||
                count > ((size_t)1 << 28)) {
                snprintf(msg, sizeof(msg), "%s: input '%s' is too large to test", name, v->name);
                goto done;
            }
        }
        if ((zeros[i] = calloc(count, sizeof(float))) == NULL) {
            snprintf(msg, sizeof(msg), "%s: out of memory", name);
            goto done;
        }
        in[i].name = v->name;
        in[i].shape = shapes[i];
        in[i].ndim = v->ndims;
        in[i].data = zeros[i];
    }
    for (size_t i = 0; i < g->noutputs; i++)
        outs[i] = g->outputs[i].name;
    if (keel__cvnet_run(net, in, g->ninputs, outs, g->noutputs, msg, sizeof(msg)) != KEEL_OK) {
        /* The wrapper's messages start "onnx: "; say which file. */
        char tmp[sizeof(msg) + KEEL__ONNX_MAX_NAME + 64];
        snprintf(tmp, sizeof(tmp), "%s: a test run on zero inputs failed: %s", name, msg);
        snprintf(msg, sizeof(msg), "%.*s", (int)sizeof(msg) - 1, tmp);
        goto done;
    }
    rc = 0;

done:
    keel__cvnet_free(net);
    if (g != NULL) {
        for (size_t i = 0; i < g->ninputs; i++)
            free(zeros[i]);
    }
    free(g);
    free(bytes);
    return verdict(rc == 0 ? NULL : msg[0] != '\0' ? msg : "the check failed");
}

int main(int argc, char **argv)
{
    if (argc != 3 || strcmp(argv[1], "onnx") != 0) {
        fprintf(stderr, "usage: keel-model-check onnx NAME < model.onnx\n");
        return 2;
    }
    return check_onnx(argv[2]);
}
