/*
 * test_perf.c: the parts of `keel perf` that must be exact whatever the network does: the
 * latency histogram's precision and the HTTP response framer (src/perf/perf_hist.c,
 * src/perf/perf_http.c).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "keel_inference.pb-c.h"
#include "perf_bodies.h"
#include "perf_grpc.h"
#include "perf_hist.h"
#include "perf_http.h"
#include "perf_load.h"

/* Every bucket's lowest value maps back to it, buckets are contiguous and increasing. */
static void test_hist_buckets(void **state)
{
    (void)state;
    for (size_t i = 0; i + 1 < PERF_HIST_BUCKETS; i++) {
        uint64_t lo = perf_hist_lowest(i), next = perf_hist_lowest(i + 1);
        assert_int_equal(perf_hist_index(lo), i);
        assert_true(next > lo);
        assert_int_equal(perf_hist_index(next - 1), i);
    }
    assert_int_equal(perf_hist_index(UINT64_MAX), PERF_HIST_BUCKETS - 1);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Quantiles agree with the exact nearest-rank values within 0.1 %. */
static void test_hist_quantiles(void **state)
{
    enum { N = 100000 };
    perf_hist h;
    uint64_t *v = malloc(N * sizeof(*v)), x = 88172645463325252ULL;
    const double qs[] = {0.0001, 0.5, 0.9, 0.99, 0.999, 1.0};

    (void)state;
    assert_non_null(v);
    assert_true(perf_hist_init(&h));
    assert_int_equal(perf_hist_quantile(&h, 0.5), 0);
    for (size_t i = 0; i < N; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        /* Log-uniform from 1 ns to about 1 s: every bucket size is exercised. */
        v[i] = (uint64_t)exp((double)(x >> 11) / 9007199254740992.0 * 20.7);
        perf_hist_record(&h, v[i]);
    }
    qsort(v, N, sizeof(*v), cmp_u64);
    assert_int_equal(h.total, N);
    assert_int_equal(h.min, v[0]);
    assert_int_equal(h.max, v[N - 1]);
    for (size_t k = 0; k < sizeof(qs) / sizeof(qs[0]); k++) {
        size_t rank = (size_t)ceil(qs[k] * N);
        uint64_t exact = v[rank - 1], got = perf_hist_quantile(&h, qs[k]);
        assert_true(got >= exact);
        assert_true((double)(got - exact) <= 0.001 * (double)exact + 1e-9);
    }
    {
        perf_hist h2;
        assert_true(perf_hist_init(&h2));
        perf_hist_merge(&h2, &h);
        perf_hist_merge(&h2, &h);
        assert_int_equal(h2.total, 2 * N);
        assert_int_equal(perf_hist_quantile(&h2, 0.5), perf_hist_quantile(&h, 0.5));
        perf_hist_reset(&h2);
        assert_int_equal(h2.total, 0);
        assert_int_equal(perf_hist_quantile(&h2, 0.99), 0);
        perf_hist_fini(&h2);
    }
    perf_hist_fini(&h);
    free(v);
}

/* A complete response parses to its full length; every proper prefix asks for more. */
static void check_framed(const char *resp, size_t len, int status, size_t body_len, bool close)
{
    perf_http_resp r;

    for (size_t cut = 0; cut < len; cut++)
        assert_int_equal(perf_http_parse(resp, cut, &r), 0);
    assert_int_equal(perf_http_parse(resp, len, &r), (ssize_t)len);
    assert_int_equal(r.status, status);
    assert_int_equal(r.body_len, body_len);
    assert_int_equal(r.close, close);
}

static void test_http_framing(void **state)
{
    const char *cl = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     "content-length: 11\r\n\r\n{\"ok\":true}";
    const char *chunked = "HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n"
                          "Connection: close\r\n\r\n5\r\nhello\r\n1a; ext=1\r\n"
                          "abcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: y\r\n\r\n";
    const char *nobody = "HTTP/1.0 204 No Content\r\n\r\n";
    char two[512];
    perf_http_resp r;

    (void)state;
    check_framed(cl, strlen(cl), 200, 11, false);
    check_framed(chunked, strlen(chunked), 400, 31, true);
    check_framed(nobody, strlen(nobody), 204, 0, true);
    /* Pipelined: only the first response's length. */
    snprintf(two, sizeof(two), "%s%s", cl, cl);
    assert_int_equal(perf_http_parse(two, strlen(two), &r), (ssize_t)strlen(cl));
    /* No length, not chunked: the body ends at close. */
    assert_int_equal(perf_http_parse("HTTP/1.1 200 OK\r\n\r\nabc", 22, &r), 0);
    assert_true(r.until_close);
    /* Not HTTP, a broken chunk, a bad status line. */
    assert_int_equal(perf_http_parse("SSH-2.0-OpenSSH", 15, &r), -1);
    assert_int_equal(perf_http_parse("HTTX", 4, &r), -1);
    {
        const char *bad = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n";
        assert_int_equal(perf_http_parse(bad, strlen(bad), &r), -1);
        bad = "HTTP/1.1 2x0 OK\r\n\r\n";
        assert_int_equal(perf_http_parse(bad, strlen(bad), &r), -1);
        bad = "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n";
        assert_int_equal(perf_http_parse(bad, strlen(bad), &r), -1);
    }
}

static void test_input_spec(void **state)
{
    perf_input_spec s;

    (void)state;
    assert_true(perf_input_spec_parse("features:FP32:4x13", &s));
    assert_string_equal(s.name, "features");
    assert_string_equal(s.datatype, "FP32");
    assert_int_equal(s.ndims, 2);
    assert_int_equal(s.dims[0], 4);
    assert_int_equal(s.dims[1], 13);
    assert_false(perf_input_spec_parse("features:FP32:", &s));
    assert_false(perf_input_spec_parse("features:FLOAT:3", &s));
    assert_false(perf_input_spec_parse("features:BYTES:3", &s));
    assert_false(perf_input_spec_parse("features:FP32:0x3", &s));
    assert_false(perf_input_spec_parse(":FP32:3", &s));
    assert_false(perf_input_spec_parse("features:FP32:3y4", &s));
}

/* A packed gRPC request decodes back to the model, version, id, inputs and raw bytes. */
static void test_grpc_pack(void **state)
{
    perf_workload w;
    static const float a[3] = {1.5f, -2.0f, 0.25f};
    static const uint8_t b[2] = {1, 0};
    const void *raw[2] = {a, b};
    size_t lens[2] = {sizeof(a), sizeof(b)};
    unsigned char *msg = NULL;
    size_t len = 0;
    Inference__ModelInferRequest *m;

    (void)state;
    memset(&w, 0, sizeof(w));
    w.model = "heart";
    w.version = "3";
    assert_true(perf_input_spec_parse("x:FP32:1x3", &w.inputs[0]));
    assert_true(perf_input_spec_parse("flag:BOOL:2", &w.inputs[1]));
    w.ninputs = 2;
    assert_true(perf_grpc_pack_infer(&w, "perf-7", raw, lens, &msg, &len));
    m = inference__model_infer_request__unpack(NULL, len, msg);
    assert_non_null(m);
    assert_string_equal(m->model_name, "heart");
    assert_string_equal(m->model_version, "3");
    assert_string_equal(m->id, "perf-7");
    assert_int_equal(m->n_inputs, 2);
    assert_string_equal(m->inputs[0]->name, "x");
    assert_string_equal(m->inputs[0]->datatype, "FP32");
    assert_int_equal(m->inputs[0]->n_shape, 2);
    assert_int_equal(m->inputs[0]->shape[1], 3);
    assert_string_equal(m->inputs[1]->datatype, "BOOL");
    assert_int_equal(m->n_raw_input_contents, 2);
    assert_int_equal(m->raw_input_contents[0].len, sizeof(a));
    assert_memory_equal(m->raw_input_contents[0].data, a, sizeof(a));
    assert_memory_equal(m->raw_input_contents[1].data, b, sizeof(b));
    inference__model_infer_request__free_unpacked(m, NULL);
    free(msg);
}

/* gRPC failures are named by status, streams' error answers as stream_error. */
static void test_grpc_errors_column(void **state)
{
    perf_result r;
    char buf[256];

    (void)state;
    assert_true(perf_result_init(&r));
    r.grpc_status[5] = 12;
    r.grpc_status[14] = 3;
    r.stream_errors = 2;
    perf_result_errors(&r, buf, sizeof(buf));
    assert_string_equal(buf, "NOT_FOUND:12;UNAVAILABLE:3;stream_error:2");
    assert_string_equal(perf_grpc_code_name(4), "DEADLINE_EXCEEDED");
    assert_string_equal(perf_grpc_code_name(99), "UNKNOWN");
    perf_result_fini(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hist_buckets), cmocka_unit_test(test_hist_quantiles),
        cmocka_unit_test(test_http_framing), cmocka_unit_test(test_input_spec),
        cmocka_unit_test(test_grpc_pack),    cmocka_unit_test(test_grpc_errors_column),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
