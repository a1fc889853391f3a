/*
 * bench_decode.c: what it costs to turn JSON tensor data into floats and back.
 *
 * DESIGN
 * One process, single-threaded. A request body holds one FP32 input of N numbers (default
 * 1 000 000) in one of four styles:
 *   listed    the values 0.708333, -0.320755, 1, -1, 1.5e-3 in turn;
 *   features  half of them the listed values, half random %.6g values in [-1, 1] (libsvm-scaled
 *             features: lengths and signs vary, so branches mispredict);
 *   spaced    features separated by ", " (Python's json.dumps default);
 *   shortest  the shortest round-trip text of random floats in [-1, 1] (what a client that
 *             prints float32 exactly sends; up to 9 significant digits).
 * For each style it times, as ns per number (median of --rounds runs, and the minimum):
 *   keel decode   keel__v2_decode on the whole body (JSON parse, checks, tensor buffer);
 *   fastfloat     the number conversion alone (keel__ff_scan_fast + keel__ff_to_f32) over the
 *                 text;
 *   strtof        strtof over the same text;
 *   yajl          yajl_parse of the body with a number callback that does nothing (the cost of
 *                 the tokenizer alone, before any conversion);
 *   jansson DOM   json_loadb + json_number_value of every element, converted to float.
 * and for encoding (keel__v2_encode of an FP32 output of N values, the features values):
 *   keel encode   the response JSON with shortest round-trip FP32 text;
 *   snprintf loop "%.Pg for P = 6..9 until strtof round-trips" per number (the reference
 *                 the encoder must match), for comparison;
 *   batch 64      encode of one output of 64 values (a batch-64 response), µs per response;
 *   FP64          keel__v2_encode of N FP64 values (snprintf-based), ns per number.
 * and last, ns per request, the decode of the body keel perf sends for a batch-1 request of the
 * reference model (20 features) and the encode of its one-float answer: the JSON work a V2
 * server cannot skip for such a request (docs/PERFORMANCE.md, "Session 15").
 * Times are CPU time of the measuring thread (CLOCK_THREAD_CPUTIME_ID), so time spent
 * descheduled does not count; a busy SMT sibling still slows it down, so note the load.
 * Every decoder's floats are checked against strtof and the program exits non-zero on a
 * mismatch; a benchmark measures, it never fails on a time.
 *
 * Usage: bench_decode [--numbers N] [--rounds R] [--quick]
 * (--quick: only the keel decode and fastfloat rows, for iterating on the decoder).
 */
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <yajl/yajl_parse.h>

#include "fastfloat.h"
#include "v2codec_internal.h"

static uint64_t rng = 0x2545F4914F6CDD1Du;

static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* CPU time of this thread: a neighbour process on a shared machine does not inflate it. */
static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct body {
    char *text;
    size_t len;
    size_t data_off; /* start of the numbers (after '[') */
    size_t data_len; /* the numbers and commas, without the brackets */
    float *want;     /* strtof of each number */
    size_t n;
} body;

static void die(const char *what)
{
    fprintf(stderr, "bench_decode: %s\n", what);
    exit(1);
}

enum { STYLE_LISTED, STYLE_FEATURES, STYLE_SPACED, STYLE_SHORTEST, STYLE_COUNT };

static body make_body(size_t n, int style)
{
    static const char *fixed[] = {"0.708333", "-0.320755", "1", "-1", "1.5e-3"};
    body b = {0};
    size_t cap = n * 16 + 256;
    size_t o = 0;

    b.text = malloc(cap);
    b.want = malloc(n * sizeof(float));
    if (b.text == NULL || b.want == NULL)
        die("out of memory");
    b.n = n;
    o += (size_t)snprintf(b.text, cap,
                          "{\"id\":\"bench\",\"inputs\":[{\"name\":\"x\",\"shape\":[1,%zu],"
                          "\"datatype\":\"FP32\",\"data\":[",
                          n);
    b.data_off = o;
    for (size_t i = 0; i < n; i++) {
        char t[40];
        if (style == STYLE_LISTED) {
            snprintf(t, sizeof(t), "%s", fixed[i % 5]);
        } else if (style == STYLE_FEATURES || style == STYLE_SPACED) {
            if (i % 2 == 0)
                snprintf(t, sizeof(t), "%s", fixed[(i / 2) % 5]);
            else
                snprintf(t, sizeof(t), "%.6g", (double)(rnd() % 2000001) / 1e6 - 1.0);
        } else {
            float f = (float)((double)(rnd() % 2000001) / 1e6 - 1.0) * 0.999f;
            keel__ff_format_f32(f, t);
        }
        b.want[i] = strtof(t, NULL);
        o += (size_t)snprintf(b.text + o, cap - o, "%s%s",
                              i == 0                  ? ""
                              : style == STYLE_SPACED ? ", "
                                                      : ",",
                              t);
    }
    b.data_len = o - b.data_off;
    o += (size_t)snprintf(b.text + o, cap - o, "]}]}");
    b.len = o;
    return b;
}

/* ---- the measured operations; each returns a checksum so nothing is optimised away */

static double run_keel_decode(const body *b)
{
    keel__v2_request r;
    char err[256];
    double s;

    if (keel__v2_decode(b->text, b->len, (size_t)-1, &r, err, sizeof(err)) != 200)
        die(err);
    if (memcmp(r.inputs[0].data, b->want, b->n * sizeof(float)) != 0)
        die("keel decode differs from strtof");
    s = ((const float *)r.inputs[0].data)[b->n - 1];
    keel__v2_request_fini(&r);
    return s;
}

static float *scratch;

static double run_fastfloat(const body *b)
{
    const char *p = b->text + b->data_off;
    const char *end = p + b->data_len;
    size_t i = 0;

    while (p < end) {
        keel__ff_num n;
        const char *q = keel__ff_scan_fast(p, end, &n);
        if (q == NULL || keel__ff_to_f32(&n, p, (size_t)(q - p), &scratch[i]) != KEEL__FF_OK)
            die("fastfloat failed");
        i++;
        p = q + 1;
        while (p < end && *p == ' ')
            p++;
    }
    if (i != b->n || memcmp(scratch, b->want, b->n * sizeof(float)) != 0)
        die("fastfloat differs from strtof");
    return scratch[b->n - 1];
}

static double run_strtof(const body *b)
{
    const char *p = b->text + b->data_off;

    for (size_t i = 0; i < b->n; i++) {
        char *q;
        scratch[i] = strtof(p, &q);
        p = q + 1;
    }
    return scratch[b->n - 1];
}

static size_t yajl_count;

static int on_number(void *ctx, const char *s, size_t l)
{
    (void)ctx;
    (void)s;
    (void)l;
    yajl_count++;
    return 1;
}

static double run_yajl(const body *b)
{
    yajl_callbacks cb;
    yajl_handle h;

    memset(&cb, 0, sizeof(cb));
    cb.yajl_number = on_number;
    yajl_count = 0;
    if ((h = yajl_alloc(&cb, NULL, NULL)) == NULL)
        die("yajl_alloc");
    if (yajl_parse(h, (const unsigned char *)b->text, b->len) != yajl_status_ok ||
        yajl_complete_parse(h) != yajl_status_ok)
        die("yajl_parse");
    yajl_free(h);
    if (yajl_count != b->n + 2) /* the shape's two numbers */
        die("yajl count");
    return (double)yajl_count;
}

static double run_jansson(const body *b)
{
    json_error_t e;
    json_t *j = json_loadb(b->text, b->len, 0, &e);
    json_t *data;
    double s;

    if (j == NULL)
        die(e.text);
    data = json_object_get(json_array_get(json_object_get(j, "inputs"), 0), "data");
    for (size_t i = 0; i < b->n; i++)
        scratch[i] = (float)json_number_value(json_array_get(data, i));
    s = scratch[b->n - 1];
    json_decref(j);
    return s;
}

static keel_tensor_view enc_view;
static int64_t enc_shape[2];

static double run_keel_encode(const body *b)
{
    keel_v2_response resp;
    char err[256];
    double s;

    (void)b;
    if (keel__v2_encode("m", 1, NULL, &enc_view, NULL, 1, &resp, err, sizeof(err)) != 0)
        die(err);
    s = (double)resp.body_len;
    free(resp.body);
    return s;
}

static char *ref_buf;

static double run_snprintf_loop(const body *b)
{
    size_t o = 0;

    for (size_t i = 0; i < b->n; i++) {
        int n = 0;
        for (int P = 6; P <= 9; P++) {
            n = snprintf(ref_buf + o, 40, "%.*g", P, (double)b->want[i]);
            if (strtof(ref_buf + o, NULL) == b->want[i])
                break;
        }
        o += (size_t)n;
        ref_buf[o++] = ',';
    }
    return (double)o;
}

/* A batch-1 request of the reference model as keel perf sends it (bench/suite.sh batching),
 * and its answer: the JSON work any V2 server does for one such request, beside the HTTP
 * exchange and the model (bench/request_cost.sh's floor rows). */
static const char req_body[] =
    "{\"id\":\"perf-12345\",\"inputs\":[{\"name\":\"features\",\"datatype\":\"FP32\","
    "\"shape\":[1,20],\"data\":[0.410417,0.886228,0.840026,0.31886,0.078332,0.525752,0.305996,"
    "0.86711,0.511273,0.964273,0.533143,0.539895,0.015487,0.294914,0.623744,0.26292,0.894503,"
    "0.915524,0.204085,0.05956]}]}";
enum { REQ_REPEAT = 100000 };

static double run_request_decode(const body *b)
{
    char err[256];
    double s = 0;

    (void)b;
    for (int i = 0; i < REQ_REPEAT; i++) {
        keel__v2_request r;
        if (keel__v2_decode(req_body, sizeof(req_body) - 1, (size_t)-1, &r, err, sizeof(err)) !=
            200)
            die(err);
        s += (double)r.inputs[0].count;
        keel__v2_request_fini(&r);
    }
    return s;
}

static double run_request_encode(const body *b)
{
    static float y = 0.7309147f;
    static const int64_t shape[2] = {1, 1};
    const keel_tensor_view v = {"probability", KEEL_TYPE_FP32, shape, 2, &y, sizeof(y)};
    char err[256];
    double s = 0;

    (void)b;
    for (int i = 0; i < REQ_REPEAT; i++) {
        keel_v2_response resp;
        if (keel__v2_encode("ref_b0", 1, "perf-12345", &v, NULL, 1, &resp, err, sizeof(err)) != 0)
            die(err);
        s += (double)resp.body_len;
        free(resp.body);
    }
    return s;
}

typedef double (*op_fn)(const body *b);

/* Runs op rounds times; prints median and min ns per unit. */
static void measure(const char *name, op_fn op, const body *b, int rounds, double units,
                    const char *unit)
{
    double *t = malloc((size_t)rounds * sizeof(double));
    volatile double sink = 0;

    if (t == NULL)
        die("out of memory");
    sink += op(b); /* warm-up */
    for (int r = 0; r < rounds; r++) {
        double t0 = now_ns();
        sink += op(b);
        t[r] = (now_ns() - t0) / units;
    }
    qsort(t, (size_t)rounds, sizeof(double), cmp_double);
    printf("| %-34s | %10.2f | %10.2f | %s |\n", name, t[rounds / 2], t[0], unit);
    (void)sink;
    free(t);
}

int main(int argc, char **argv)
{
    size_t n = 1000000;
    int rounds = 7;
    bool quick = false;
    static const char *style_name[STYLE_COUNT] = {"listed", "features", "spaced", "shortest"};

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--numbers") == 0 && i + 1 < argc)
            n = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc)
            rounds = atoi(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else
            die("usage: bench_decode [--numbers N] [--rounds R] [--quick]");
    }
    if (n < 64 || rounds < 1)
        die("need --numbers >= 64 and --rounds >= 1");
    if ((scratch = malloc(n * sizeof(float))) == NULL || (ref_buf = malloc(n * 40)) == NULL)
        die("out of memory");

    printf("| operation (%zu FP32 numbers) | median | min | unit |\n", n);
    printf("|---|---:|---:|---|\n");
    for (int style = 0; style < STYLE_COUNT; style++) {
        body b = make_body(n, style);
        char label[96];

        printf("| **%s** body: %.2f bytes/number | | | |\n", style_name[style],
               (double)b.data_len / (double)n);
        snprintf(label, sizeof(label), "keel decode (%s)", style_name[style]);
        measure(label, run_keel_decode, &b, rounds, (double)n, "ns/number");
        snprintf(label, sizeof(label), "fastfloat only (%s)", style_name[style]);
        measure(label, run_fastfloat, &b, rounds, (double)n, "ns/number");
        if (quick) {
            free(b.text);
            free(b.want);
            continue;
        }
        snprintf(label, sizeof(label), "strtof only (%s)", style_name[style]);
        measure(label, run_strtof, &b, rounds, (double)n, "ns/number");
        snprintf(label, sizeof(label), "yajl tokenizer only (%s)", style_name[style]);
        measure(label, run_yajl, &b, rounds, (double)n, "ns/number");
        snprintf(label, sizeof(label), "jansson DOM (%s)", style_name[style]);
        measure(label, run_jansson, &b, rounds < 3 ? rounds : 3, (double)n, "ns/number");

        if (style == STYLE_FEATURES) {
            double *d = malloc(n * sizeof(double));
            body small = b;

            enc_shape[0] = 1;
            enc_shape[1] = (int64_t)n;
            enc_view =
                (keel_tensor_view){"y", KEEL_TYPE_FP32, enc_shape, 2, b.want, n * sizeof(float)};
            measure("keel encode FP32", run_keel_encode, &b, rounds, (double)n, "ns/number");
            measure("snprintf %.Pg loop FP32 (reference)", run_snprintf_loop, &b, rounds, (double)n,
                    "ns/number");
            enc_shape[1] = 64;
            enc_view.bytes = 64 * sizeof(float);
            small.n = 64;
            measure("keel encode, batch-64 response", run_keel_encode, &small, rounds * 2000,
                    1000.0, "us/response");
            if (d == NULL)
                die("out of memory");
            for (size_t i = 0; i < n; i++)
                d[i] = (double)b.want[i] * 1.0000001;
            enc_shape[1] = (int64_t)n;
            enc_view = (keel_tensor_view){"y", KEEL_TYPE_FP64, enc_shape, 2, d, n * sizeof(double)};
            measure("keel encode FP64", run_keel_encode, &b, rounds < 3 ? rounds : 3, (double)n,
                    "ns/number");
            free(d);
        }
        free(b.text);
        free(b.want);
    }
    printf("| **batch-1 request** of the reference model (%zu bytes) | | | |\n",
           sizeof(req_body) - 1);
    measure("keel decode, batch-1 request", run_request_decode, NULL, rounds, REQ_REPEAT,
            "ns/request");
    measure("keel encode, its answer", run_request_encode, NULL, rounds, REQ_REPEAT, "ns/request");
    free(scratch);
    free(ref_buf);
    return 0;
}
