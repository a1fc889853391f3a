/*
 * test_onnx_concurrency.c: the onnx backend under concurrent clients (label "concurrency",
 * so it also runs under ThreadSanitizer).
 *
 * DESIGN
 * OpenCV 4.6 computes wrong outputs, silently, when two threads run one cv::dnn::Net. keel
 * must give every execution context its own Net. test_four_clients_two_contexts sends 10,000
 * requests from 4 threads to a CNN with instance_count 2 (so both contexts run at once, and
 * requests also run on the clients' own threads through keel_infer's run-here path), each
 * with one of 16 distinct inputs, and compares every answer bit for bit with the answer the
 * same runtime gave single-threaded before: 0 wrong answers. (Checked by hand: with one Net
 * shared by the two contexts this test fails; the process dies inside OpenCV, heap corruption
 * detected by glibc, within the first thousand requests.)
 * test_hotswap_under_load swaps an MLP between two weight sets while 4 threads infer: no
 * request fails, every answer is exactly A's or B's, and afterwards the counters and the live
 * OpenCV Nets are one generation's worth (the old generations' Nets were all freed).
 * Under sanitizers the counts are scaled down (the plain stage runs the acceptance counts).
 */
#include "onnx_testutil.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backends/onnx_cv.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifdef SANITIZED
#define REQUESTS 1000
#define SWAPS 6
#else
#define REQUESTS 10000
#define SWAPS 20
#endif
#define CLIENTS 4
#define NINPUTS 16
#define CNN_IN (3 * 32 * 32)
#define CNN_OUT 10

static keel_runtime *runtime_on(const char *repo)
{
    keel_runtime_opts o;
    keel_runtime *rt = NULL;

    keel_runtime_opts_init(&o);
    o.model_repository = repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 2;
    assert_int_equal(keel_runtime_create(&o, &rt), KEEL_OK);
    return rt;
}

/* ---------------------------------------------------------------- 4 clients, 2 contexts */

static struct {
    keel_runtime *rt;
    float in[NINPUTS][CNN_IN];
    float ref[NINPUTS][CNN_OUT];
    _Atomic long wrong, failed, done;
    char first_error[600];
    pthread_mutex_t mu;
} c1;

static void *client_main(void *arg)
{
    long id = (long)(intptr_t)arg;
    int64_t shape[4] = {1, 3, 32, 32}, os[4];

    for (long i = 0; i < REQUESTS / CLIENTS; i++) {
        int k = (int)((id * 131 + i * 7) % NINPUTS);
        float *got = NULL;
        size_t count = 0, nd = 0;
        char err[512];
        keel_err e = tu_onnx_infer(c1.rt, "cnn", "image", shape, 4, c1.in[k], &got, &count, os, &nd,
                                   err, sizeof(err));
        if (e != KEEL_OK) {
            pthread_mutex_lock(&c1.mu);
            if (c1.first_error[0] == '\0')
                snprintf(c1.first_error, sizeof(c1.first_error), "%s: %s", keel_strerror(e), err);
            pthread_mutex_unlock(&c1.mu);
            atomic_fetch_add(&c1.failed, 1);
        } else if (count != CNN_OUT || memcmp(got, c1.ref[k], sizeof(c1.ref[k])) != 0) {
            atomic_fetch_add(&c1.wrong, 1);
        }
        atomic_fetch_add(&c1.done, 1);
        free(got);
    }
    return NULL;
}

static void test_four_clients_two_contexts(void **state)
{
    char *repo = tu_mkdtemp("onnx-conc");
    char *src = tu_strf("%s/cnn/model.onnx", TU_ONNX_DATA);
    keel_counters one = {.generations = 1, .contexts = 2};
    pthread_t th[CLIENTS];
    int64_t shape[4] = {1, 3, 32, 32}, os[4];
    uint32_t seed = 42;
    char err[512];
    struct timespec t0, t1;

    (void)state;
    memset(&c1, 0, sizeof(c1));
    pthread_mutex_init(&c1.mu, NULL);
    for (int k = 0; k < NINPUTS; k++) {
        for (int j = 0; j < CNN_IN; j++) {
            seed = seed * 1664525u + 1013904223u;
            c1.in[k][j] = (float)(seed >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
        }
    }
    tu_onnx_add_model(repo, "cnn", src, 1, 2, 8, "");
    c1.rt = runtime_on(repo);
    if (keel_model_load(c1.rt, "cnn", err, sizeof(err)) != KEEL_OK)
        fail_msg("%s", err);
    /* The single-threaded reference, from the same runtime. */
    for (int k = 0; k < NINPUTS; k++) {
        float *got = NULL;
        size_t count = 0, nd = 0;
        assert_int_equal(tu_onnx_infer(c1.rt, "cnn", "image", shape, 4, c1.in[k], &got, &count, os,
                                       &nd, err, sizeof(err)),
                         KEEL_OK);
        assert_int_equal(count, CNN_OUT);
        memcpy(c1.ref[k], got, sizeof(c1.ref[k]));
        free(got);
    }
    for (int k = 1; k < NINPUTS; k++) /* distinct inputs give distinct answers */
        assert_memory_not_equal(c1.ref[0], c1.ref[k], sizeof(c1.ref[0]));

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < CLIENTS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, client_main, (void *)(intptr_t)i), 0);
    for (int i = 0; i < CLIENTS; i++)
        pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld requests from %d threads on 2 contexts in %.2f s: %ld wrong, %ld failed\n",
           (long)atomic_load(&c1.done), CLIENTS,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
           (long)atomic_load(&c1.wrong), (long)atomic_load(&c1.failed));
    if (atomic_load(&c1.failed) != 0)
        fail_msg("%ld requests failed, first: %s", (long)atomic_load(&c1.failed), c1.first_error);
    assert_int_equal(atomic_load(&c1.done), REQUESTS);
    assert_int_equal(atomic_load(&c1.wrong), 0);
    tu_assert_counters(c1.rt, &one);
    assert_int_equal(keel__cvnet_live(), 2);
    keel_runtime_destroy(c1.rt);
    assert_int_equal(keel__cvnet_live(), 0);
    pthread_mutex_destroy(&c1.mu);
    tu_rm_rf(repo);
    free(repo);
    free(src);
}

/* ---------------------------------------------------------------- hot swap under load */

static struct {
    keel_runtime *rt;
    keel__onnx_tensor in;
    float ref[2][20]; /* A's and B's answers */
    atomic_bool stop;
    _Atomic long seen[2], wrong, failed;
    char first_error[600];
    pthread_mutex_t mu;
} c2;

static void *swap_client_main(void *arg)
{
    int64_t shape[2] = {4, 20}, os[3];

    (void)arg;
    while (!atomic_load(&c2.stop)) {
        float *got = NULL;
        size_t count = 0, nd = 0;
        char err[512];
        keel_err e = tu_onnx_infer(c2.rt, "swap", "x", shape, 2, c2.in.data, &got, &count, os, &nd,
                                   err, sizeof(err));
        if (e != KEEL_OK) {
            pthread_mutex_lock(&c2.mu);
            if (c2.first_error[0] == '\0')
                snprintf(c2.first_error, sizeof(c2.first_error), "%s: %s", keel_strerror(e), err);
            pthread_mutex_unlock(&c2.mu);
            atomic_fetch_add(&c2.failed, 1);
        } else if (count == 20 && memcmp(got, c2.ref[0], sizeof(c2.ref[0])) == 0) {
            atomic_fetch_add(&c2.seen[0], 1);
        } else if (count == 20 && memcmp(got, c2.ref[1], sizeof(c2.ref[1])) == 0) {
            atomic_fetch_add(&c2.seen[1], 1);
        } else {
            atomic_fetch_add(&c2.wrong, 1);
        }
        free(got);
    }
    return NULL;
}

static void put_model(const char *src, const char *dst)
{
    char *tmp = tu_strf("%s.tmp", dst);
    tu_copy_file(src, tmp);
    assert_int_equal(rename(tmp, dst), 0);
    free(tmp);
}

static void test_hotswap_under_load(void **state)
{
    char *repo = tu_mkdtemp("onnx-swap");
    char *a = tu_strf("%s/mlp/model.onnx", TU_ONNX_DATA);
    char *b = tu_strf("%s/mlp_b/model.onnx", TU_ONNX_DATA);
    char *target = tu_strf("%s/swap/1/model.onnx", repo);
    const char *srcs[2] = {a, b};
    keel_counters one = {.generations = 1, .contexts = 2};
    pthread_t th[CLIENTS];
    int64_t shape[2] = {4, 20}, os[3];
    char err[512];

    (void)state;
    memset(&c2, 0, sizeof(c2));
    pthread_mutex_init(&c2.mu, NULL);
    tu_onnx_read_tensor(TU_ONNX_DATA "/mlp/test_data_set_0/input_0.pb", &c2.in);
    tu_onnx_add_model(repo, "swap", a, 1, 2, 8, "");
    c2.rt = runtime_on(repo);
    for (int m = 1; m >= 0; m--) { /* B's answer, then A's (which stays loaded) */
        float *got = NULL;
        size_t count = 0, nd = 0;
        put_model(srcs[m], target);
        if (keel_model_load(c2.rt, "swap", err, sizeof(err)) != KEEL_OK)
            fail_msg("%s", err);
        assert_int_equal(tu_onnx_infer(c2.rt, "swap", "x", shape, 2, c2.in.data, &got, &count, os,
                                       &nd, err, sizeof(err)),
                         KEEL_OK);
        assert_int_equal(count, 20);
        memcpy(c2.ref[m], got, sizeof(c2.ref[m]));
        free(got);
    }
    assert_memory_not_equal(c2.ref[0], c2.ref[1], sizeof(c2.ref[0]));

    for (int i = 0; i < CLIENTS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, swap_client_main, NULL), 0);
    for (int s = 1; s <= SWAPS; s++) {
        struct timespec pause = {0, 20 * 1000000L};
        put_model(srcs[s % 2], target);
        if (keel_model_load(c2.rt, "swap", err, sizeof(err)) != KEEL_OK)
            fail_msg("swap %d: %s", s, err);
        nanosleep(&pause, NULL);
    }
    atomic_store(&c2.stop, true);
    for (int i = 0; i < CLIENTS; i++)
        pthread_join(th[i], NULL);
    printf("%d swaps under load: %ld answers from A, %ld from B, %ld wrong, %ld failed\n", SWAPS,
           (long)atomic_load(&c2.seen[0]), (long)atomic_load(&c2.seen[1]),
           (long)atomic_load(&c2.wrong), (long)atomic_load(&c2.failed));
    if (atomic_load(&c2.failed) != 0)
        fail_msg("%ld requests failed, first: %s", (long)atomic_load(&c2.failed), c2.first_error);
    assert_int_equal(atomic_load(&c2.wrong), 0);
    assert_true(atomic_load(&c2.seen[0]) > 0 && atomic_load(&c2.seen[1]) > 0);
    /* SWAPS + 2 generations were built; one is left, with its two contexts and two Nets. */
    tu_assert_counters(c2.rt, &one);
    assert_int_equal(keel__cvnet_live(), 2);
    keel_runtime_destroy(c2.rt);
    assert_int_equal(keel__cvnet_live(), 0);
    assert_int_equal(tu_count_children(), 0);
    free(c2.in.data);
    pthread_mutex_destroy(&c2.mu);
    free(target);
    free(a);
    free(b);
    tu_rm_rf(repo);
    free(repo);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_four_clients_two_contexts),
        cmocka_unit_test(test_hotswap_under_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
