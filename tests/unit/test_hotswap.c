/*
 * test_hotswap.c: hot-swap under load and failed reloads, with real XGBoost models trained
 * on heart_scale by the xgboost command-line tool.
 *
 * Hot-swap: 8 threads infer continuously while another reloads the model back and forth
 * between two files with distinguishable outputs, 1,000 times. Every request must succeed,
 * every answer must equal the reference output of the file its generation was loaded from
 * (never a mix), and afterwards one generation is alive and no lease is held.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

#define NTHREADS 8
#define NSWAPS 1000
#define NROWS 4
#define MAX_GENS 4096

typedef struct swap_ctx {
    keel_runtime *rt;
    char *repo;
    char *files[2]; /* model A and model B */
    float *x;
    float ref[2][NROWS];
    _Atomic int stop;
    _Atomic long answers;
    _Atomic long failures;
    _Atomic long mixed;
    _Atomic int gen_file_seen[MAX_GENS]; /* 0 unknown, 1 + file index seen in answers */
    int gen_file_loaded[MAX_GENS];       /* 1 + file index, written by the swapper */
} swap_ctx;

static const char *config_json =
    "{\"name\":\"heart\",\"backend\":\"xgboost\",\"max_batch_size\":8,"
    "\"input\":[{\"name\":\"features\",\"data_type\":\"TYPE_FP32\",\"dims\":[13]}],"
    "\"output\":[{\"name\":\"probability\",\"data_type\":\"TYPE_FP32\",\"dims\":[1]}],"
    "\"instance_group\":[{\"count\":2,\"kind\":\"KIND_CPU\"}],"
    "\"dynamic_batching\":{\"default_queue_policy\":{\"max_queue_size\":64}}}";

static keel_runtime *open_rt(const char *repo)
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

static uint64_t gen_of(keel_runtime *rt)
{
    keel_model_status *st = NULL;
    size_t n = 0;
    uint64_t id = 0;

    assert_int_equal(keel_model_list(rt, &st, &n), KEEL_OK);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(st[i].name, "heart") == 0)
            id = st[i].generation_id;
    }
    keel_model_status_free(st, n);
    return id;
}

static keel_err infer_row(keel_runtime *rt, const float *row, float *out, uint64_t *gen,
                          keel_request **reuse)
{
    keel_request *req = reuse != NULL ? *reuse : NULL;
    int64_t shape[2] = {1, TU_HEART_FEATURES};
    keel_tensor_view v;
    keel_err err;

    if (req == NULL) {
        assert_int_equal(keel_request_create(rt, "heart", -1, &req), KEEL_OK);
        assert_int_equal(keel_request_add_input(req, "features", KEEL_TYPE_FP32, shape, 2, row,
                                                sizeof(float) * TU_HEART_FEATURES),
                         KEEL_OK);
    }
    err = keel_infer(req);
    if (err == KEEL_OK) {
        assert_int_equal(keel_request_output_by_name(req, "probability", &v), KEEL_OK);
        assert_int_equal(v.bytes, sizeof(float));
        assert_int_equal(v.ndim, 2);
        *out = *(const float *)v.data;
        *gen = keel_request_generation_id(req);
    }
    if (reuse != NULL)
        *reuse = req;
    else
        keel_request_destroy(req);
    return err;
}

static void *infer_thread(void *arg)
{
    swap_ctx *c = arg;
    keel_request *reqs[NROWS] = {NULL};

    for (long i = 0; !atomic_load(&c->stop); i++) {
        int r = (int)(i % NROWS);
        float y = 0;
        uint64_t g = 0;
        if (infer_row(c->rt, c->x + r * TU_HEART_FEATURES, &y, &g, &reqs[r]) != KEEL_OK) {
            atomic_fetch_add(&c->failures, 1);
            continue;
        }
        int which = y == c->ref[0][r] ? 1 : y == c->ref[1][r] ? 2 : -1;
        if (which < 0 || g == 0 || g >= MAX_GENS) {
            atomic_fetch_add(&c->mixed, 1);
            continue;
        }
        int expected = 0;
        if (!atomic_compare_exchange_strong(&c->gen_file_seen[g], &expected, which) &&
            expected != which)
            atomic_fetch_add(&c->mixed, 1); /* one generation gave answers of both models */
        atomic_fetch_add(&c->answers, 1);
    }
    for (int r = 0; r < NROWS; r++)
        keel_request_destroy(reqs[r]);
    return NULL;
}

static void install(swap_ctx *c, int which)
{
    char *dst = tu_strf("%s/heart/1/model.json", c->repo);

    tu_copy_file(c->files[which], dst); /* written to a temp name, then renamed */
    free(dst);
}

static void test_hotswap_under_load(void **state)
{
    swap_ctx *c = calloc(1, sizeof(*c));
    char *work = tu_mkdtemp("hotswap");
    char *cfg;
    float *y = NULL;
    pthread_t th[NTHREADS];
    char err[512];

    (void)state;
    assert_non_null(c);
    c->repo = tu_strf("%s/repo", work);
    c->files[0] = tu_strf("%s/a.json", work);
    c->files[1] = tu_strf("%s/b.json", work);
    assert_int_equal(tu_train_heart(work, "a.json", "max_depth = 2\nnum_round = 5\n"), 0);
    assert_int_equal(tu_train_heart(work, "b.json", "max_depth = 4\nnum_round = 30\n"), 0);
    tu_heart_rows(&c->x, &y);
    cfg = tu_strf("%s/heart/config.json", c->repo);
    tu_write_file(cfg, config_json, (size_t)-1);
    free(cfg);

    c->rt = open_rt(c->repo);
    /* Reference outputs of each file, measured through keel before the race. */
    for (int which = 0; which < 2; which++) {
        install(c, which);
        assert_int_equal(keel_model_load(c->rt, "heart", err, sizeof(err)), KEEL_OK);
        c->gen_file_loaded[gen_of(c->rt)] = which + 1;
        for (int r = 0; r < NROWS; r++) {
            uint64_t g;
            assert_int_equal(
                infer_row(c->rt, c->x + r * TU_HEART_FEATURES, &c->ref[which][r], &g, NULL),
                KEEL_OK);
        }
    }
    for (int r = 0; r < NROWS; r++)
        assert_true(fabsf(c->ref[0][r] - c->ref[1][r]) > 1e-4f);

    for (int i = 0; i < NTHREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, infer_thread, c), 0);
    for (int s = 0; s < NSWAPS; s++) {
        int which = s % 2; /* B is loaded now: swap to A, then B, ... */
        install(c, which);
        if (keel_model_load(c->rt, "heart", err, sizeof(err)) != KEEL_OK)
            fail_msg("swap %d: %s", s, err);
        uint64_t g = gen_of(c->rt);
        assert_true(g < MAX_GENS);
        c->gen_file_loaded[g] = which + 1;
    }
    atomic_store(&c->stop, 1);
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(th[i], NULL);

    printf("# %ld answers during %d swaps\n", atomic_load(&c->answers), NSWAPS);
    assert_int_equal(atomic_load(&c->failures), 0);
    assert_int_equal(atomic_load(&c->mixed), 0);
    assert_true(atomic_load(&c->answers) > NSWAPS);
    for (int g = 1; g < MAX_GENS; g++) {
        int seen = atomic_load(&c->gen_file_seen[g]);
        if (seen != 0 && seen != c->gen_file_loaded[g])
            fail_msg("generation %d answered like file %d but was loaded from file %d", g, seen,
                     c->gen_file_loaded[g]);
    }
    const keel_counters idle = {0, 0, 0, 1, 2, 0, 0};
    tu_assert_counters(c->rt, &idle);
    keel_runtime_destroy(c->rt);
    free(c->x);
    free(y);
    free(c->files[0]);
    free(c->files[1]);
    tu_rm_rf(work);
    free(work);
    free(c->repo);
    free(c);
}

/* A broken model file of each kind leaves the previous version answering, reports an error
 * naming the file and reason, and leaves the live counters where they were. */
static void test_failed_load_keeps_old(void **state)
{
    char *work = tu_mkdtemp("badload");
    char *repo = tu_strf("%s/repo", work);
    char *good = tu_strf("%s/good.json", work);
    char *cfg = tu_strf("%s/heart/config.json", repo);
    char *dst = tu_strf("%s/heart/1/model.json", repo);
    float *x = NULL, *y = NULL;
    keel_runtime *rt;
    keel_counters before, after;
    float ref, out;
    uint64_t gen0, gen;
    char err[512];
    size_t len;
    char *text;

    (void)state;
    assert_int_equal(tu_train_heart(work, "good.json", "max_depth = 3\nnum_round = 10\n"), 0);
    tu_heart_rows(&x, &y);
    tu_write_file(cfg, config_json, (size_t)-1);
    tu_copy_file(good, dst);
    rt = open_rt(repo);
    assert_int_equal(keel_model_load(rt, "heart", err, sizeof(err)), KEEL_OK);
    assert_int_equal(infer_row(rt, x, &ref, &gen0, NULL), KEEL_OK);
    text = tu_read_file(good, &len);

    struct {
        const char *what;
        const char *expect; /* in the error message */
    } cases[] = {
        {"truncated", "model.json"}, {"empty", "model.json"},      {"wrong-format", "model.json"},
        {"missing", "heart/1"},      {"unreadable", "model.json"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *what = cases[i].what;
        if (strcmp(what, "unreadable") == 0 && geteuid() == 0) {
            /* root reads anything: use a directory where the file should be instead */
            unlink(dst);
            tu_mkdirs(dst);
        } else if (strcmp(what, "truncated") == 0) {
            tu_write_file(dst, text, len / 2);
        } else if (strcmp(what, "empty") == 0) {
            tu_write_file(dst, "", 0);
        } else if (strcmp(what, "wrong-format") == 0) {
            tu_write_file(dst, "\x89PNG\r\n\x1a\n not a model", 20);
        } else if (strcmp(what, "missing") == 0) {
            unlink(dst);
        } else {
            tu_write_file(dst, text, len);
            chmod(dst, 0);
        }
        keel_runtime_quiesce(rt);
        keel_counters_get(rt, &before);
        memset(err, 0, sizeof(err));
        keel_err e = keel_model_load(rt, "heart", err, sizeof(err));
        if (e == KEEL_OK || strstr(err, cases[i].expect) == NULL)
            fail_msg("%s: load returned %s, message '%s'", what, keel_err_name(e), err);
        printf("# %s: %s: %s\n", what, keel_err_name(e), err);
        keel_runtime_quiesce(rt);
        keel_counters_get(rt, &after);
        assert_memory_equal(&before, &after, sizeof(before));
        assert_int_equal(infer_row(rt, x, &out, &gen, NULL), KEEL_OK);
        assert_true(out == ref);
        assert_true(gen == gen0);

        keel_model_status *st = NULL;
        size_t n = 0;
        assert_int_equal(keel_model_list(rt, &st, &n), KEEL_OK);
        assert_int_equal(n, 1);
        assert_int_equal(st[0].state, KEEL_MODEL_READY);
        assert_int_equal(st[0].last_error, e);
        assert_string_equal(st[0].last_error_msg, err);
        keel_model_status_free(st, n);
        /* restore for the next case */
        struct stat sb;
        if (stat(dst, &sb) == 0 && S_ISDIR(sb.st_mode))
            tu_rm_rf(dst);
        chmod(dst, 0644);
        unlink(dst);
    }
    /* A good file loads again. */
    tu_copy_file(good, dst);
    assert_int_equal(keel_model_load(rt, "heart", err, sizeof(err)), KEEL_OK);
    assert_int_equal(infer_row(rt, x, &out, &gen, NULL), KEEL_OK);
    assert_true(out == ref);
    assert_true(gen > gen0);
    keel_runtime_destroy(rt);
    free(text);
    free(x);
    free(y);
    free(good);
    free(cfg);
    free(dst);
    free(repo);
    tu_rm_rf(work);
    free(work);
}

/* Conformance through the whole runtime: keel's answers equal the xgboost tool's predictions
 * for every heart_scale row, at batch 1 and at batch 8. */
static void test_conformance_through_runtime(void **state)
{
    char *work = tu_mkdtemp("conf");
    char *repo = tu_strf("%s/repo", work);
    char *cfg = tu_strf("%s/heart/config.json", repo);
    char *model = tu_strf("%s/heart/1/model.json", repo);
    char *conf = tu_strf("%s/train-model.json.conf", work);
    float *x = NULL, *y = NULL;
    keel_runtime *rt;
    char err[512];
    int n;

    (void)state;
    assert_int_equal(tu_train_heart(work, "model.json", "max_depth = 4\nnum_round = 20\n"), 0);
    assert_int_equal(tu_run("cd '%s' && '%s' '%s' task=pred model_in=model.json "
                            "'test:data=heart01.txt?format=libsvm&indexing_mode=1' "
                            "name_pred=pred.txt >/dev/null 2>&1",
                            work, KEEL_XGBOOST_CLI, conf),
                     0);
    char *predpath = tu_strf("%s/pred.txt", work);
    char *pred = tu_read_file(predpath, NULL);
    n = tu_heart_rows(&x, &y);
    tu_write_file(cfg, config_json, (size_t)-1);
    char *trained = tu_strf("%s/model.json", work);
    tu_copy_file(trained, model);
    free(trained);
    rt = open_rt(repo);
    assert_int_equal(keel_model_load(rt, "heart", err, sizeof(err)), KEEL_OK);

    char *p = pred;
    float *want = calloc((size_t)n, sizeof(float));
    for (int i = 0; i < n; i++) {
        char *end;
        want[i] = strtof(p, &end);
        assert_true(end != p);
        p = end;
    }
    for (int i = 0; i < n; i++) {
        float out;
        uint64_t g;
        assert_int_equal(infer_row(rt, x + i * TU_HEART_FEATURES, &out, &g, NULL), KEEL_OK);
        if (fabsf(out - want[i]) > 1e-6f)
            fail_msg("row %d: keel %.9g, xgboost tool %.9g", i, out, want[i]);
    }
    for (int i = 0; i + 8 <= n; i += 8) {
        keel_request *req = NULL;
        int64_t shape[2] = {8, TU_HEART_FEATURES};
        keel_tensor_view v;
        assert_int_equal(keel_request_create(rt, "heart", -1, &req), KEEL_OK);
        assert_int_equal(keel_request_add_input(req, "features", KEEL_TYPE_FP32, shape, 2,
                                                x + i * TU_HEART_FEATURES,
                                                sizeof(float) * 8 * TU_HEART_FEATURES),
                         KEEL_OK);
        assert_int_equal(keel_infer(req), KEEL_OK);
        assert_int_equal(keel_request_output(req, 0, &v), KEEL_OK);
        assert_int_equal(v.shape[0], 8);
        assert_int_equal(v.shape[1], 1);
        for (int k = 0; k < 8; k++)
            assert_true(fabsf(((const float *)v.data)[k] - want[i + k]) <= 1e-6f);
        keel_request_destroy(req);
    }
    keel_runtime_destroy(rt);
    free(want);
    free(pred);
    free(predpath);
    free(x);
    free(y);
    free(cfg);
    free(model);
    free(conf);
    free(repo);
    tu_rm_rf(work);
    free(work);
}

/* Load/unload cycles of a real XGBoost model: counters and open fds return to baseline. */
static void test_xgboost_load_unload_cycles(void **state)
{
    char *work = tu_mkdtemp("cycles");
    char *repo = tu_strf("%s/repo", work);
    char *cfg = tu_strf("%s/heart/config.json", repo);
    char *trained = tu_strf("%s/m.json", work);
    char *dst = tu_strf("%s/heart/1/model.json", repo);
    keel_runtime *rt;
    keel_counters base;
    float *x = NULL, *y = NULL;
    char err[512];
    int fds0;

    (void)state;
    assert_int_equal(tu_train_heart(work, "m.json", "max_depth = 3\nnum_round = 10\n"), 0);
    tu_heart_rows(&x, &y);
    tu_write_file(cfg, config_json, (size_t)-1);
    tu_copy_file(trained, dst);
    rt = open_rt(repo);
    /* The first load allocates XGBoost's process-wide state; measure after it. */
    assert_int_equal(keel_model_load(rt, "heart", err, sizeof(err)), KEEL_OK);
    assert_int_equal(keel_model_unload(rt, "heart"), KEEL_OK);
    keel_runtime_quiesce(rt);
    keel_counters_get(rt, &base);
    fds0 = tu_count_fds();
    for (int i = 0; i < 300; i++) {
        float out;
        uint64_t g;
        assert_int_equal(keel_model_load(rt, "heart", err, sizeof(err)), KEEL_OK);
        assert_int_equal(infer_row(rt, x, &out, &g, NULL), KEEL_OK);
        assert_int_equal(keel_model_unload(rt, "heart"), KEEL_OK);
    }
    tu_assert_counters(rt, &base);
    assert_int_equal(base.generations, 0);
    assert_int_equal(tu_count_fds(), fds0);
    keel_runtime_destroy(rt);
    free(x);
    free(y);
    free(cfg);
    free(trained);
    free(dst);
    free(repo);
    tu_rm_rf(work);
    free(work);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conformance_through_runtime),
        cmocka_unit_test(test_failed_load_keeps_old),
        cmocka_unit_test(test_hotswap_under_load),
        cmocka_unit_test(test_xgboost_load_unload_cycles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
