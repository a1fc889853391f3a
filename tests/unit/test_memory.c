/*
 * test_memory.c: memory that comes back, measured.
 *
 * - Per-generation accounting: the resident-memory change keel reports for a generation is
 *   within 25% of the change measured around a bare XGBoost load of the same file (a model
 *   made large enough, by repeating the trees of a trained one, that the measurement is not
 *   noise), and the figures disappear when the model is unloaded.
 * - 10,000 load/unload cycles over 20 distinct models, no traffic: after the cycles and a
 *   trim, process RSS is within 1 MiB of the baseline taken after the first 100 cycles, and
 *   open fds, threads and live counters equal the baseline.
 * Under AddressSanitizer the allocator keeps freed memory in quarantine and adds shadow
 * memory, so RSS figures mean something else: there the test still runs every step (and
 * LeakSanitizer checks for leaks, over 2,000 cycles) but does not assert the RSS bounds.
 */
#include <dirent.h>
#include <jansson.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <xgboost/c_api.h>

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

#define CONFIG_FMT                                                                                 \
    "{\"name\":\"%s\",\"backend\":\"xgboost\",\"max_batch_size\":8,"                               \
    "\"input\":[{\"name\":\"features\",\"data_type\":\"TYPE_FP32\",\"dims\":[13]}],"               \
    "\"output\":[{\"name\":\"probability\",\"data_type\":\"TYPE_FP32\",\"dims\":[1]}]}"

static void write_model(const char *repo, const char *name, const char *file)
{
    char *cfg = tu_strf("%s/%s/config.json", repo, name);
    char *text = tu_strf(CONFIG_FMT, name);
    char *dst = tu_strf("%s/%s/1/model.json", repo, name);

    tu_write_file(cfg, text, (size_t)-1);
    tu_copy_file(file, dst);
    free(cfg);
    free(text);
    free(dst);
}

static keel_runtime *open_rt(const char *repo)
{
    keel_runtime_opts o;
    keel_runtime *rt = NULL;

    keel_runtime_opts_init(&o);
    o.model_repository = repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 1;
    assert_int_equal(keel_runtime_create(&o, &rt), KEEL_OK);
    return rt;
}

static int64_t rss_now(void)
{
    int64_t rss, pss;

    keel__mem_sample(&rss, &pss);
    return rss;
}

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

/* Writes a copy of the trained model at src with its trees repeated until there are ntrees. */
static void inflate_model(const char *src, const char *dst, size_t ntrees)
{
    json_error_t jerr;
    json_t *root = json_load_file(src, 0, &jerr);
    json_t *model, *trees, *info, *grown, *ginfo;
    size_t have;

    assert_non_null(root);
    model = json_object_get(json_object_get(json_object_get(root, "learner"), "gradient_booster"),
                            "model");
    trees = json_object_get(model, "trees");
    info = json_object_get(model, "tree_info");
    assert_true(json_is_array(trees) && json_is_array(info));
    have = json_array_size(trees);
    assert_true(have > 0);
    grown = json_array();
    ginfo = json_array();
    for (size_t i = 0; i < ntrees; i++) {
        json_t *t = json_deep_copy(json_array_get(trees, i % have));
        json_object_set_new(t, "id", json_integer((json_int_t)i));
        json_array_append_new(grown, t);
        json_array_append(ginfo, json_array_get(info, i % have));
    }
    json_object_set_new(model, "trees", grown);
    json_object_set_new(model, "tree_info", ginfo);
    {
        char n[32];
        snprintf(n, sizeof(n), "%zu", ntrees);
        json_object_set_new(json_object_get(model, "gbtree_model_param"), "num_trees",
                            json_string(n));
    }
    assert_int_equal(json_dump_file(root, dst, JSON_COMPACT), 0);
    json_decref(root);
}

/* RSS change across a bare XGBoost load of path (the booster freed afterwards). */
static int64_t bare_load_delta(const char *path)
{
    BoosterHandle h = NULL;
    size_t len;
    char *buf = tu_read_file(path, &len);
    int64_t before, after;

    malloc_trim(0);
    before = rss_now();
    assert_int_equal(XGBoosterCreate(NULL, 0, &h), 0);
    assert_int_equal(XGBoosterLoadModelFromBuffer(h, buf, len), 0);
    after = rss_now();
    assert_int_equal(XGBoosterFree(h), 0);
    free(buf);
    malloc_trim(0);
    return after - before;
}

static void test_generation_memory_matches_bare_load(void **state)
{
    char *work = tu_mkdtemp("genmem");
    char *repo = tu_strf("%s/repo", work);
    char *small = tu_strf("%s/small.json", work);
    char *big = tu_strf("%s/big.json", work);
    keel_runtime *rt;
    keel_model_status *st = NULL;
    size_t n = 0;
    int64_t bare, reported = 0, pss = 0;
    keel_memory_stats ms0, ms1, ms2;
    uint64_t charged = 0, estimate = 0;
    char err[512];

    (void)state;
    assert_int_equal(tu_train_heart(work, "small.json", "max_depth = 6\nnum_round = 20\n"), 0);
    inflate_model(small, big, 2000);
    write_model(repo, "big", big);
    (void)bare_load_delta(big); /* XGBoost's one-time process state is not the model's */
    bare = bare_load_delta(big);

    rt = open_rt(repo);
    keel_runtime_quiesce(rt);
    keel_memory_stats_get(rt, &ms0);
    assert_int_equal(keel_model_load(rt, "big", err, sizeof(err)), KEEL_OK);
    keel_memory_stats_get(rt, &ms1);
    assert_int_equal(keel_model_list(rt, &st, &n), KEEL_OK);
    assert_int_equal(n, 1);
    reported = st[0].mem_rss_bytes;
    pss = st[0].mem_pss_bytes;
    charged = st[0].mem_charged_bytes;
    estimate = st[0].mem_estimate_bytes;
    keel_model_status_free(st, n);
    printf("# bare XGBoost load: %.2f MiB; keel reports RSS %.2f MiB, PSS %.2f MiB, estimate "
           "%.2f MiB, charged %.2f MiB\n",
           (double)bare / MIB, (double)reported / MIB, (double)pss / MIB, (double)estimate / MIB,
           (double)charged / MIB);
    /* The estimate is the model file's size (what a budget can know before loading), and the
     * runtime's budget total is what the model's row says it charged. Comparisons of charged
     * with the estimate or the reported RSS would hold by definition (charged is their max),
     * so the charge is held against the bare load, measured independently, instead. */
    {
        struct stat sb;
        keel_memory_stats ms;
        assert_int_equal(stat(big, &sb), 0);
        assert_int_equal(estimate, (uint64_t)sb.st_size);
        keel_memory_stats_get(rt, &ms);
        assert_int_equal(ms.charged_bytes, charged);
    }
    if (!TU_SANITIZED) {
        assert_true(bare > 4 * MIB); /* large enough to mean something */
        if (charged < (uint64_t)bare * 3 / 4)
            fail_msg("keel charged %llu bytes for a model whose bare load took %lld",
                     (unsigned long long)charged, (long long)bare);
        if (reported < bare * 3 / 4 || reported > bare * 5 / 4)
            fail_msg("keel reported %lld bytes, the bare load took %lld (more than 25%% apart)",
                     (long long)reported, (long long)bare);
    }

    /* Unloaded: the model's row has no generation and no memory any more. */
    assert_int_equal(keel_model_unload(rt, "big"), KEEL_OK);
    keel_runtime_quiesce(rt);
    /* The allocator's in-use figure (what /metrics exports to tell a leak from fragmentation)
     * follows the model: up by at least half its file's size while loaded (the trees in memory;
     * most of the RSS a load takes is parsing garbage the allocator keeps as free-held), back
     * after the unload. */
    keel_memory_stats_get(rt, &ms2);
    printf("# heap (%s) in use %.2f -> %.2f -> %.2f MiB, free held %.2f -> %.2f -> %.2f MiB\n",
           ms1.heap_allocator, (double)ms0.heap_in_use_bytes / MIB,
           (double)ms1.heap_in_use_bytes / MIB, (double)ms2.heap_in_use_bytes / MIB,
           (double)ms0.heap_free_bytes / MIB, (double)ms1.heap_free_bytes / MIB,
           (double)ms2.heap_free_bytes / MIB);
    assert_non_null(ms1.heap_allocator);
    if (!TU_SANITIZED) {
        if (ms1.heap_in_use_bytes < ms0.heap_in_use_bytes + estimate / 2)
            fail_msg("heap in use grew by %lld bytes over the load of a %llu-byte model",
                     (long long)(ms1.heap_in_use_bytes - ms0.heap_in_use_bytes),
                     (unsigned long long)estimate);
        if (ms2.heap_in_use_bytes > ms0.heap_in_use_bytes + MIB)
            fail_msg("heap in use %llu bytes after the unload, %llu before the load",
                     (unsigned long long)ms2.heap_in_use_bytes,
                     (unsigned long long)ms0.heap_in_use_bytes);
    }
    assert_int_equal(keel_model_list(rt, &st, &n), KEEL_OK);
    assert_int_equal(n, 1);
    assert_int_equal(st[0].version, -1);
    assert_int_equal(st[0].generation_id, 0);
    assert_int_equal(st[0].mem_rss_bytes, 0);
    assert_int_equal(st[0].mem_charged_bytes, 0);
    keel_model_status_free(st, n);
    {
        keel_memory_stats ms;
        keel_memory_stats_get(rt, &ms);
        assert_int_equal(ms.charged_bytes, 0);
        assert_true(ms.trims > 0); /* the reaper trimmed after freeing the generation */
        printf("# trims %llu, trimmed %.2f MiB\n", (unsigned long long)ms.trims,
               (double)ms.trimmed_bytes / MIB);
    }
    keel_runtime_destroy(rt);
    free(small);
    free(big);
    free(repo);
    tu_rm_rf(work);
    free(work);
}

static void test_load_unload_cycles_20_models(void **state)
{
    char *work = tu_mkdtemp("cycles20");
    char *repo = tu_strf("%s/repo", work);
    char *file = tu_strf("%s/m.json", work);
    keel_runtime *rt;
    keel_counters base;
    int64_t rss0 = 0, rss1; /* rss0, fds0, threads0: sampled after cycle 100 */
    int fds0 = 0, threads0 = 0;
    char err[512];
    /* 10,000 cycles as the acceptance asks; under sanitizers (where RSS is not asserted and
     * each cycle is several times slower) 2,000, still 100 per model, for the leak check. */
    const int ncycles = TU_SANITIZED ? 2000 : 10000, nmodels = 20;

    (void)state;
    assert_int_equal(tu_train_heart(work, "m.json", "max_depth = 3\nnum_round = 10\n"), 0);
    for (int m = 0; m < nmodels; m++) {
        char name[16];
        snprintf(name, sizeof(name), "m%02d", m);
        write_model(repo, name, file);
    }
    rt = open_rt(repo);
    for (int i = 0; i < ncycles; i++) {
        char name[16];
        snprintf(name, sizeof(name), "m%02d", i % nmodels);
        if (keel_model_load(rt, name, err, sizeof(err)) != KEEL_OK)
            fail_msg("cycle %d: %s", i, err);
        assert_int_equal(keel_model_unload(rt, name), KEEL_OK);
        if (i == 99) {
            keel_runtime_quiesce(rt);
            malloc_trim(0);
            rss0 = rss_now();
            fds0 = tu_count_fds();
            threads0 = count_threads();
            keel_counters_get(rt, &base);
        }
    }
    keel_runtime_quiesce(rt);
    malloc_trim(0);
    rss1 = rss_now();
    printf("# %d load/unload cycles over %d models: RSS %.2f MiB after 100, %.2f MiB after "
           "all (%+.1f KiB); fds %d -> %d; threads %d -> %d\n",
           ncycles, nmodels, (double)rss0 / MIB, (double)rss1 / MIB, (double)(rss1 - rss0) / 1024.0,
           fds0, tu_count_fds(), threads0, count_threads());
    assert_int_equal(tu_count_fds(), fds0);
    assert_int_equal(count_threads(), threads0);
    assert_int_equal(base.generations, 0);
    tu_assert_counters(rt, &base);
    if (!TU_SANITIZED && (rss1 - rss0 > MIB || rss0 - rss1 > MIB))
        fail_msg("RSS moved by %lld bytes over the cycles (bound: 1 MiB)",
                 (long long)(rss1 - rss0));
    keel_runtime_destroy(rt);
    free(file);
    free(repo);
    tu_rm_rf(work);
    free(work);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generation_memory_matches_bare_load),
        cmocka_unit_test(test_load_unload_cycles_20_models),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
