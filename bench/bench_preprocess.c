/*
 * bench_preprocess.c: image preprocessing latency, in process vs through the worker pool.
 *
 * For each image (grace_hopper.jpg 512x600 JPEG, pngtest.png 91x69 interlaced PNG): decode,
 * convert to RGB, resize to 224x224, normalise with ImageNet's mean/std, NCHW. Measured:
 *   in-process  keel__image_batch() on this thread (no isolation)
 *   pool        keel__prep_run() on a pool of 1 worker, one request at a time: the same work
 *               plus the memfd round trip and the process hop
 *   pool x2     2 client threads on a pool of 2 workers: throughput
 * Prints median and p99 per image. A benchmark: it measures, it does not pass or fail.
 * Usage: bench_preprocess [iterations]   (default 300)
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "workers/image.h"
#include "workers/prep.h"

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static unsigned char *read_element(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;

    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(1);
    }
    rewind(f);
    buf = malloc((size_t)n + 4);
    memcpy(buf, &(uint32_t){(uint32_t)n}, 4);
    if (fread(buf + 4, 1, (size_t)n, f) != (size_t)n)
        exit(1);
    fclose(f);
    *len = (size_t)n + 4;
    return buf;
}

typedef struct job {
    keel__prep_pool *p;
    keel__image_task t;
    const unsigned char *el;
    size_t len;
    int iters;
    uint64_t *ns;
} job;

static void *pool_loop(void *arg)
{
    job *j = arg;
    size_t out_len = keel__image_tensor_elems(&j->t.spec) * sizeof(float);
    float *out = malloc(out_len);
    char err[256];

    for (int i = 0; i < j->iters; i++) {
        uint64_t t0 = keel__now_ns();
        if (keel__prep_run(j->p, KEEL__PREP_TASK_IMAGE, &j->t, sizeof(j->t), j->el, j->len, out,
                           out_len, 0, err, sizeof(err)) != KEEL_OK) {
            fprintf(stderr, "pool: %s\n", err);
            exit(1);
        }
        j->ns[i] = keel__now_ns() - t0;
    }
    free(out);
    return NULL;
}

static void report(const char *img, const char *what, uint64_t *ns, int n, double wall_s)
{
    qsort(ns, (size_t)n, sizeof(*ns), cmp_u64);
    printf("%-16s %-11s median %8.1f us   p99 %8.1f us   %7.0f images/s\n", img, what,
           (double)ns[n / 2] / 1e3, (double)ns[(n * 99) / 100] / 1e3, (double)n / wall_s);
}

int main(int argc, char **argv)
{
    static const char *const paths[] = {
        "/usr/share/matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "/usr/share/doc/libpng-dev/examples/pngtest.png"};
    static const char *const names[] = {"grace_hopper.jpg", "pngtest.png"};
    int iters = argc > 1 ? atoi(argv[1]) : 300;
    uint64_t *ns = calloc((size_t)iters * 2, sizeof(uint64_t));
    keel__image_task t;
    keel__prep_opts o;
    keel__prep_pool *p1 = NULL, *p2 = NULL;
    char err[256];

    memset(&t, 0, sizeof(t));
    t.count = 1;
    t.spec.color = KEEL__IMG_RGB;
    t.spec.layout = KEEL__IMG_NCHW;
    t.spec.width = t.spec.height = 224;
    t.spec.scale = 1.0f / 255.0f;
    t.spec.mean[0] = 0.485f, t.spec.mean[1] = 0.456f, t.spec.mean[2] = 0.406f;
    t.spec.std[0] = 0.229f, t.spec.std[1] = 0.224f, t.spec.std[2] = 0.225f;
    t.spec.max_pixels = KEEL__IMAGE_DEFAULT_MAX_PIXELS;
    t.spec.max_file_bytes = KEEL__IMAGE_DEFAULT_MAX_FILE_BYTES;

    /* Pools first: the fork servers are forked before this process starts threads. */
    keel__prep_opts_init(&o);
    o.workers = 1;
    if (keel__prep_pool_create(&o, &p1, err, sizeof(err)) != KEEL_OK) {
        fprintf(stderr, "pool: %s\n", err);
        return 1;
    }
    o.workers = 2;
    if (keel__prep_pool_create(&o, &p2, err, sizeof(err)) != KEEL_OK) {
        fprintf(stderr, "pool: %s\n", err);
        return 1;
    }
    printf("%d iterations, 224x224 RGB NCHW, ImageNet mean/std\n", iters);
    for (int k = 0; k < 2; k++) {
        size_t len;
        unsigned char *el = read_element(paths[k], &len);
        float *out = malloc(keel__image_tensor_elems(&t.spec) * sizeof(float));
        job j = {.p = p1, .t = t, .el = el, .len = len, .iters = iters, .ns = ns};
        job j2[2] = {j, j};
        pthread_t th[2];
        uint64_t w0;

        w0 = keel__now_ns();
        for (int i = 0; i < iters; i++) {
            uint64_t t0 = keel__now_ns();
            if (keel__image_batch(&t.spec, el, len, 1, out, err, sizeof(err)) != KEEL_OK) {
                fprintf(stderr, "%s: %s\n", names[k], err);
                return 1;
            }
            ns[i] = keel__now_ns() - t0;
        }
        report(names[k], "in-process", ns, iters, (double)(keel__now_ns() - w0) / 1e9);
        w0 = keel__now_ns();
        pool_loop(&j);
        report(names[k], "pool", ns, iters, (double)(keel__now_ns() - w0) / 1e9);
        w0 = keel__now_ns();
        for (int i = 0; i < 2; i++) {
            j2[i].p = p2;
            j2[i].ns = ns + (size_t)i * iters;
            pthread_create(&th[i], NULL, pool_loop, &j2[i]);
        }
        for (int i = 0; i < 2; i++)
            pthread_join(th[i], NULL);
        report(names[k], "pool x2", ns, 2 * iters, (double)(keel__now_ns() - w0) / 1e9);
        free(out);
        free(el);
    }
    keel__prep_pool_destroy(p1);
    keel__prep_pool_destroy(p2);
    free(ns);
    return 0;
}
