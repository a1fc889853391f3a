/*
 * test_embedded_cycles.c: scenario "1,000 create/destroy cycles of an embedded runtime"
 * (issue 14, point 4).
 *
 * An application that embeds libkeel may create and destroy runtimes for as long as it runs.
 * Each cycle here creates a runtime on the bundled example repository (explicit control),
 * loads the heart model (XGBoost, 2 contexts), answers one request with keel_infer and checks
 * the probability, then destroys the runtime. After the first 20 cycles (process-wide state of
 * XGBoost and libc settled) the baseline is taken; after all of them open fds and threads must
 * equal the baseline and, outside sanitizer builds, RSS must be within 1 MiB of it (after an
 * allocator trim, as keel's reaper does). Under sanitizers 200 cycles (each is several times
 * slower) and no RSS bound: LeakSanitizer checks the leaks instead.
 * How it was checked to fail: with the cycle's keel_runtime_destroy left out (a runtime that
 * is never torn down), the fd and thread checks fail.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/heap.h"
#include "runtime/testhook.h"
#include "testutil.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TU_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TU_SANITIZED 1
#endif
#endif
#ifndef TU_SANITIZED
#define TU_SANITIZED 0
#endif

#define MIB (1024 * 1024)

static int count_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *de;
    int n = 0;

    assert_non_null(d);
    while ((de = readdir(d)) != NULL)
        n += de->d_name[0] != '.';
    closedir(d);
    return n;
}

static int64_t rss_now(void)
{
    int64_t rss, pss;

    keel__heap_trim();
    keel__mem_sample(&rss, &pss);
    return rss;
}

/* One cycle: create, load, infer one row of heart_scale, destroy. */
static void cycle(const char *repo, int i)
{
    static const float row[13] = {0.708333f,  1,  1,          -0.320755f, -0.105023f, -1, 1,
                                  -0.419847f, -1, -0.225806f, 0,          1,          -1};
    const int64_t shape[2] = {1, 13};
    keel_runtime_opts o;
    keel_runtime *rt = NULL;
    keel_request *req = NULL;
    keel_tensor_view out;
    char err[512];
    float p;

    keel_runtime_opts_init(&o);
    o.model_repository = repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 2;
    assert_int_equal(keel_runtime_create(&o, &rt), KEEL_OK);
    if (keel_model_load(rt, "heart", err, sizeof(err)) != KEEL_OK)
        fail_msg("cycle %d: load: %s", i, err);
    assert_int_equal(keel_request_create(rt, "heart", -1, &req), KEEL_OK);
    assert_int_equal(
        keel_request_add_input(req, "features", KEEL_TYPE_FP32, shape, 2, row, sizeof(row)),
        KEEL_OK);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_request_output_by_name(req, "probability", &out), KEEL_OK);
    assert_int_equal(out.bytes, sizeof(float));
    memcpy(&p, out.data, sizeof(p));
    if (!(p > 0.0f && p < 1.0f))
        fail_msg("cycle %d: probability %g", i, (double)p);
    keel_request_destroy(req);
    keel_runtime_destroy(rt);
}

static void test_1000_create_destroy_cycles(void **state)
{
    char *repo = tu_strf("%s/examples/models", KEEL_SOURCE_DIR);
    const int ncycles = TU_SANITIZED ? 200 : 1000, warm = 20;
    int fds0 = 0, threads0 = 0;
    int64_t rss0 = 0, rss1;

    (void)state;
    for (int i = 0; i < ncycles; i++) {
        cycle(repo, i);
        if (i == warm - 1) {
            fds0 = tu_count_fds();
            threads0 = count_threads();
            rss0 = rss_now();
        }
    }
    rss1 = rss_now();
    printf("# %d runtime create/load/infer/destroy cycles: fds %d -> %d, threads %d -> %d, "
           "RSS %.2f -> %.2f MiB (%+.0f KiB)\n",
           ncycles, fds0, tu_count_fds(), threads0, count_threads(), (double)rss0 / MIB,
           (double)rss1 / MIB, (double)(rss1 - rss0) / 1024.0);
    assert_int_equal(tu_count_fds(), fds0);
    assert_int_equal(count_threads(), threads0);
    if (!TU_SANITIZED && (rss1 - rss0 > MIB || rss0 - rss1 > MIB))
        fail_msg("RSS moved by %lld bytes over %d cycles (bound: 1 MiB)", (long long)(rss1 - rss0),
                 ncycles - warm);
    free(repo);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_1000_create_destroy_cycles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
