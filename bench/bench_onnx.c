/*
 * bench_onnx.c: latency per inference and memory per execution context of the onnx backend,
 * in process (libkeel), against raw OpenCV (the same wrapper keel uses, called directly).
 *
 *   bench_onnx MODEL.onnx INSTANCES ITERS
 *
 * Builds a repository in a temp directory with MODEL.onnx as model "m" (inputs and outputs
 * read from the file, max_batch_size 8, instance_count INSTANCES), then prints one line:
 *   rss_base_kb rss_loaded_kb rss_touched_kb keel_p50_us keel_p99_us raw_p50_us raw_p99_us
 * rss_* is this process's VmRSS before the load, after keel_model_load (INSTANCES Nets
 * built, one warm-up run on context 0) and after INSTANCES threads ran 50 requests each at
 * once (so every context's Net has allocated its activations). Latency is ITERS
 * single-threaded keel_infer calls of batch 1 (request created, input copied, inferred,
 * destroyed: what one embedding call costs), then ITERS calls of the raw wrapper on a Net of
 * its own. bench/onnx.sh runs the matrix that docs/PERFORMANCE.md reports; memory per context
 * is the difference between runs with different INSTANCES, each a fresh process.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backends/onnx_cv.h"
#include "backends/onnx_proto.h"
#include "keel/keel.h"

static long rss_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    }
    fclose(f);
    return kb;
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static struct {
    keel_runtime *rt;
    const char *in_name;
    int64_t shape[KEEL__MAX_DIMS];
    size_t ndim;
    float *x;
    size_t n;
} b;

static int infer_once(void)
{
    keel_request *req = NULL;
    int rc = -1;

    if (keel_request_create(b.rt, "m", -1, &req) == KEEL_OK &&
        keel_request_add_input(req, b.in_name, KEEL_TYPE_FP32, b.shape, b.ndim, b.x,
                               b.n * sizeof(float)) == KEEL_OK &&
        keel_infer(req) == KEEL_OK)
        rc = 0;
    else if (req != NULL)
        fprintf(stderr, "bench_onnx: %s\n", keel_request_error(req));
    keel_request_destroy(req);
    return rc;
}

static void *toucher(void *arg)
{
    (void)arg;
    for (int i = 0; i < 50; i++) {
        if (infer_once() != 0)
            exit(1);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    keel_runtime_opts o;
    keel__onnx_graph *g = calloc(1, sizeof(*g));
    char dir[] = "/tmp/keel-bench-onnx-XXXXXX", path[512], cmd[1200], err[512];
    int instances, iters;
    long rss0, rss1, rss2;
    double *lat, k50, k99, r50, r99;
    size_t len = 0;
    char *bytes;
    FILE *f;
    pthread_t th[64];

    if (argc != 4 || (instances = atoi(argv[2])) < 1 || instances > 64 ||
        (iters = atoi(argv[3])) < 10) {
        fprintf(stderr, "usage: bench_onnx MODEL.onnx INSTANCES(1-64) ITERS(>=10)\n");
        return 2;
    }
    if ((f = fopen(argv[1], "rb")) == NULL || g == NULL) {
        perror(argv[1]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    bytes = malloc(len);
    if (bytes == NULL || fread(bytes, 1, len, f) != len)
        return 1;
    fclose(f);
    if (keel__onnx_graph_read(bytes, len, argv[1], g, err, sizeof(err)) != KEEL_OK) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    b.in_name = g->inputs[0].name;
    b.ndim = g->inputs[0].ndims;
    b.n = 1;
    for (size_t d = 0; d < b.ndim; d++) {
        b.shape[d] = g->inputs[0].dims[d] > 0 ? g->inputs[0].dims[d] : 1; /* batch 1 */
        b.n *= (size_t)b.shape[d];
    }
    b.x = malloc(b.n * sizeof(float));
    for (size_t i = 0; i < b.n; i++)
        b.x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f;

    if (mkdtemp(dir) == NULL)
        return 1;
    snprintf(cmd, sizeof(cmd), "mkdir -p %s/m/1 && cp '%s' %s/m/1/model.onnx", dir, argv[1], dir);
    if (system(cmd) != 0)
        return 1;
    snprintf(path, sizeof(path), "%s/m/config.json", dir);
    if ((f = fopen(path, "w")) == NULL)
        return 1;
    fprintf(f,
            "{\"name\": \"m\", \"backend\": \"onnx\", \"max_batch_size\": 8, "
            "\"instance_group\": [{\"count\": %d, \"kind\": \"KIND_CPU\"}]}\n",
            instances);
    fclose(f);

    keel_runtime_opts_init(&o);
    o.model_repository = dir;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = instances;
    if (keel_runtime_create(&o, &b.rt) != KEEL_OK)
        return 1;
    rss0 = rss_kb();
    if (keel_model_load(b.rt, "m", err, sizeof(err)) != KEEL_OK) {
        fprintf(stderr, "bench_onnx: %s\n", err);
        return 1;
    }
    rss1 = rss_kb();
    for (int i = 0; i < instances; i++)
        pthread_create(&th[i], NULL, toucher, NULL);
    for (int i = 0; i < instances; i++)
        pthread_join(th[i], NULL);
    rss2 = rss_kb();

    lat = calloc((size_t)iters, sizeof(double));
    for (int i = 0; i < iters / 10; i++) /* warm */
        infer_once();
    for (int i = 0; i < iters; i++) {
        double t0 = now_us();
        if (infer_once() != 0)
            return 1;
        lat[i] = now_us() - t0;
    }
    qsort(lat, (size_t)iters, sizeof(double), cmp_double);
    k50 = lat[iters / 2];
    k99 = lat[iters * 99 / 100];

    {
        keel__cvnet *net = NULL;
        keel__cvnet_input in = {b.in_name, b.shape, b.ndim, b.x};
        const char *outs[1] = {g->outputs[0].name};
        if (keel__cvnet_load(bytes, len, argv[1], &net, err, sizeof(err)) != KEEL_OK) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        for (int i = 0; i < iters / 10; i++)
            keel__cvnet_run(net, &in, 1, outs, 1, err, sizeof(err));
        for (int i = 0; i < iters; i++) {
            double t0 = now_us();
            if (keel__cvnet_run(net, &in, 1, outs, 1, err, sizeof(err)) != KEEL_OK) {
                fprintf(stderr, "%s\n", err);
                return 1;
            }
            lat[i] = now_us() - t0;
        }
        keel__cvnet_free(net);
    }
    qsort(lat, (size_t)iters, sizeof(double), cmp_double);
    r50 = lat[iters / 2];
    r99 = lat[iters * 99 / 100];
    printf("%ld %ld %ld %.1f %.1f %.1f %.1f\n", rss0, rss1, rss2, k50, k99, r50, r99);

    keel_runtime_destroy(b.rt);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        return 1;
    free(lat);
    free(b.x);
    free(bytes);
    free(g);
    return 0;
}
