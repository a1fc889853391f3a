/*
 * test_xgboost_bad_file.c: scenario "an XGBoost model file that crashes or hangs XGBoost"
 * (issue 14, point 3 of what to build).
 *
 * XGBoost 1.7.4's readers trust the file: issue 5 found that about 3.5 % of bit-flipped .ubj
 * files crash it in process. keel checks every XGBoost file in keel-model-check, a child
 * process, before its own load (backends/model_check.c). This test, in an embedded runtime:
 *  1. trains a small model on heart_scale (the xgboost command), serves it as version 1 and
 *     records its answers;
 *  2. converts it to UBJSON (XGBoosterSaveModelToBuffer) and flips single bits of it, with a
 *     fixed seed, until keel-model-check dies on one (run here directly through core/child.c
 *     with the server's environment: the malloc perturb byte); a crash is a signal, or under
 *     a sanitizer a report and an exit without a verdict;
 *  3. puts that file in as version 2 and asks for a load: it must fail with a message naming
 *     the file and the crash, and version 1 must keep answering exactly as before;
 *  4. a hang: version 2 becomes a JSON model whose first tree has a cycle (node 0's children
 *     both lead to a node whose children lead back to 0), on which XGBoost's prediction loops
 *     forever; with a 2 s deadline the load fails with "did not finish within 2000 ms" and
 *     version 1 keeps answering;
 *  5. the unflipped UBJSON file as version 2 loads and gives version 1's answers;
 *  6. a check that passed is remembered by content: the same bytes reload with a 1 ms
 *     deadline (no helper run), a file one byte longer fails it;
 * and throughout: no process and no fd left behind, counters idle.
 * How it was checked to fail: with the check_in_child call of xgboost.c's model_load left out,
 * step 3 kills the test process (SIGSEGV inside XGBoost) and step 4 never returns.
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xgboost/c_api.h>

#include "core/child.h"
#include "testutil.h"

extern char **environ;

#define NROWS 8
#define MAX_FLIPS 2000

static float rows[NROWS * TU_HEART_FEATURES];

static const char config[] =
    "{\"name\":\"m\",\"backend\":\"xgboost\",\"max_batch_size\":8,"
    "\"input\":[{\"name\":\"x\",\"data_type\":\"TYPE_FP32\",\"dims\":[13]}],"
    "\"output\":[{\"name\":\"p\",\"data_type\":\"TYPE_FP32\",\"dims\":[1]}],"
    "\"instance_group\":[{\"count\":1,\"kind\":\"KIND_CPU\"}]}";

/* NROWS rows of heart_scale through the model; the answers into out, the generation id. */
static uint64_t answer(keel_runtime *rt, float *out)
{
    const int64_t shape[2] = {NROWS, TU_HEART_FEATURES};
    keel_request *req = NULL;
    keel_tensor_view v;
    uint64_t gen;

    assert_int_equal(keel_request_create(rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, rows, sizeof(rows)),
                     KEEL_OK);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_request_output_by_name(req, "p", &v), KEEL_OK);
    assert_int_equal(v.bytes, NROWS * sizeof(float));
    memcpy(out, v.data, NROWS * sizeof(float));
    gen = keel_request_generation_id(req);
    keel_request_destroy(req);
    return gen;
}

/* The model file as UBJSON, through XGBoost's own writer. */
static char *to_ubj(const char *json_path, size_t *len)
{
    BoosterHandle b = NULL;
    bst_ulong n = 0;
    const char *buf = NULL;
    char *out;

    assert_int_equal(XGBoosterCreate(NULL, 0, &b), 0);
    assert_int_equal(XGBoosterLoadModel(b, json_path), 0);
    assert_int_equal(XGBoosterSaveModelToBuffer(b, "{\"format\":\"ubj\"}", &n, &buf), 0);
    assert_true(n > 16 && buf[0] == '{');
    out = malloc(n);
    assert_non_null(out);
    memcpy(out, buf, n);
    *len = n;
    XGBoosterFree(b);
    return out;
}

/* The server's environment for the checker (backends/model_check.c): the malloc perturb. */
static char **perturbed_env(void)
{
    static char perturb[] = "GLIBC_TUNABLES=glibc.malloc.perturb=85";
    size_t n = 0, k = 0;
    char **env;

    while (environ[n] != NULL)
        n++;
    env = calloc(n + 2, sizeof(*env));
    assert_non_null(env);
    for (size_t i = 0; i < n; i++) {
        if (strncmp(environ[i], "GLIBC_TUNABLES=", 15) != 0)
            env[k++] = environ[i];
    }
    env[k++] = perturb;
    return env;
}

/* How keel-model-check ends on path: 1 crashed (a signal, or no verdict), 0 otherwise. */
static int checker_crashes(const char *helper, char **env, const char *path)
{
    char *argv[] = {(char *)helper,       (char *)"xgboost", (char *)path,
                    (char *)"--features", (char *)"13",      NULL};
    char reply[512], err[256];
    keel__child_result res;
    FILE *f = fopen(path, "rbe");
    int rc;

    assert_non_null(f);
    rc = keel__child_run(argv, env, fileno(f), 20000, reply, sizeof(reply), &res, err, sizeof(err));
    fclose(f);
    if (rc != KEEL_OK)
        fail_msg("keel-model-check did not start: %s", err);
    if (res.end == KEEL__CHILD_SIGNALED)
        return 1;
    return res.end == KEEL__CHILD_EXITED && strncmp(reply, "ok\n", 3) != 0 &&
           strncmp(reply, "error: ", 7) != 0;
}

/* A copy of the JSON model whose first tree loops: 0 -> c -> 0 whatever the input. */
static void write_cycle_model(const char *from, const char *to)
{
    json_error_t jerr;
    json_t *root = json_load_file(from, 0, &jerr), *tree, *left, *right;
    json_int_t c;

    assert_non_null(root);
    tree = json_array_get(
        json_object_get(
            json_object_get(json_object_get(json_object_get(root, "learner"), "gradient_booster"),
                            "model"),
            "trees"),
        0);
    left = json_object_get(tree, "left_children");
    right = json_object_get(tree, "right_children");
    assert_true(json_is_array(left) && json_is_array(right));
    c = json_integer_value(json_array_get(left, 0));
    assert_true(c > 0 && (size_t)c < json_array_size(left));
    assert_int_equal(json_array_set_new(right, 0, json_integer(c)), 0);
    assert_int_equal(json_array_set_new(left, (size_t)c, json_integer(0)), 0);
    assert_int_equal(json_array_set_new(right, (size_t)c, json_integer(0)), 0);
    assert_int_equal(json_dump_file(root, to, JSON_COMPACT), 0);
    json_decref(root);
}

static void assert_still_v1(keel_runtime *rt, uint64_t gen1, const float *p1)
{
    float p[NROWS];
    keel_model_status *st = NULL;
    size_t n = 0;

    assert_true(answer(rt, p) == gen1);
    assert_memory_equal(p, p1, sizeof(p));
    assert_int_equal(keel_model_list(rt, &st, &n), KEEL_OK);
    assert_int_equal(n, 1);
    assert_int_equal(st[0].state, KEEL_MODEL_READY);
    assert_int_equal(st[0].last_error, KEEL_ELOAD);
    keel_model_status_free(st, n);
}

static void assert_no_children(void)
{
    errno = 0;
    assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
    assert_int_equal(errno, ECHILD);
}

static void test_crashing_and_hanging_files(void **state)
{
    char *dir = tu_mkdtemp("xgb-bad"), *repo = tu_strf("%s/repo", dir);
    char *json = tu_strf("%s/heart.json", dir), *cand = tu_strf("%s/cand.ubj", dir);
    char *v1 = tu_strf("%s/m/1/model.json", repo), *v2ubj = tu_strf("%s/m/2/model.ubj", repo);
    char *v2json = tu_strf("%s/m/2/model.json", repo), *cfg = tu_strf("%s/m/config.json", repo);
    char *helper = tu_strf("%s/keel-model-check", KEEL_BINARY_DIR);
    const keel_counters idle = {.generations = 1, .contexts = 1};
    char **env = perturbed_env();
    float *x = NULL, *y = NULL, p1[NROWS], p[NROWS];
    keel_runtime_opts o;
    keel_runtime *rt = NULL;
    char err[1024];
    char *ubj, *flipped, *text, *extra;
    size_t text_len = 0;
    size_t ubj_len = 0;
    uint64_t gen1, seed = 0x2545f4914f6cdd1dULL;
    int fds_none, fds0, found = -1;

    (void)state;
    assert_true(tu_heart_rows(&x, &y) >= NROWS);
    memcpy(rows, x, sizeof(rows));
    free(x);
    free(y);
    assert_int_equal(tu_train_heart(dir, "heart.json", "num_round = 20\nmax_depth = 4"), 0);
    tu_copy_file(json, v1);
    tu_write_file(cfg, config, (size_t)-1);

    fds_none = tu_count_fds();
    keel_runtime_opts_init(&o);
    o.model_repository = repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 2;
    assert_int_equal(keel_runtime_create(&o, &rt), KEEL_OK);
    if (keel_model_load(rt, "m", err, sizeof(err)) != KEEL_OK)
        fail_msg("version 1: %s", err);
    gen1 = answer(rt, p1);
    fds0 = tu_count_fds();

    /* 2. A bit flip that crashes XGBoost in keel-model-check. */
    ubj = to_ubj(json, &ubj_len);
    flipped = malloc(ubj_len);
    assert_non_null(flipped);
    for (int i = 0; i < MAX_FLIPS && found < 0; i++) {
        size_t pos;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        pos = (size_t)(seed % ubj_len);
        memcpy(flipped, ubj, ubj_len);
        flipped[pos] ^= (char)(1u << ((seed >> 32) % 8));
        tu_write_file(cand, flipped, ubj_len);
        if (checker_crashes(helper, env, cand))
            found = i;
    }
    if (found < 0)
        fail_msg("none of %d bit-flipped .ubj files crashed XGBoost in keel-model-check",
                 MAX_FLIPS);
    printf("# flip %d crashed keel-model-check\n", found);

    /* 3. As version 2: the load fails naming the file and the crash; version 1 serves. */
    tu_copy_file(cand, v2ubj);
    assert_int_equal(keel_model_load(rt, "m", err, sizeof(err)), KEEL_ELOAD);
    printf("# crash: %s\n", err);
    assert_non_null(strstr(err, v2ubj));
    if (strstr(err, "XGBoost crashed on this model file (signal") == NULL &&
        strstr(err, "without a verdict") == NULL) /* sanitizer builds: a report, exit 1 */
        fail_msg("not a crash message: %s", err);
    assert_still_v1(rt, gen1, p1);

    /* 4. A tree with a cycle: XGBoost's prediction never returns. */
    assert_int_equal(unlink(v2ubj), 0);
    write_cycle_model(json, v2json);
    assert_int_equal(setenv("KEEL_MODEL_CHECK_TIMEOUT_MS", "2000", 1), 0);
    assert_int_equal(keel_model_load(rt, "m", err, sizeof(err)), KEEL_ELOAD);
    assert_int_equal(unsetenv("KEEL_MODEL_CHECK_TIMEOUT_MS"), 0);
    printf("# hang: %s\n", err);
    assert_non_null(strstr(err, v2json));
    assert_non_null(strstr(err, "did not finish within 2000 ms"));
    assert_still_v1(rt, gen1, p1);
    assert_int_equal(tu_count_fds(), fds0);
    assert_no_children();
    tu_assert_counters(rt, &idle);

    /* 5. The file before the flip loads, as a new generation with the same answers. */
    assert_int_equal(unlink(v2json), 0);
    tu_write_file(v2ubj, ubj, ubj_len);
    if (keel_model_load(rt, "m", err, sizeof(err)) != KEEL_OK)
        fail_msg("the unflipped .ubj: %s", err);
    assert_true(answer(rt, p) != gen1);
    assert_memory_equal(p, p1, sizeof(p));
    tu_assert_counters(rt, &idle);
    assert_no_children();

    /* 6. Passed checks are remembered by content: the same bytes load again without the
     * helper (here: a deadline of 1 ms, which no check meets); other bytes still need it. */
    assert_int_equal(setenv("KEEL_MODEL_CHECK_TIMEOUT_MS", "1", 1), 0);
    assert_int_equal(keel_model_unload(rt, "m"), KEEL_OK);
    if (keel_model_load(rt, "m", err, sizeof(err)) != KEEL_OK)
        fail_msg("reload of checked bytes: %s", err);
    assert_true(answer(rt, p) != gen1);
    assert_memory_equal(p, p1, sizeof(p));
    text = tu_read_file(json, &text_len);
    assert_int_equal(unlink(v2ubj), 0);
    extra = tu_strf("%s\n", text); /* one byte more than version 1's checked file */
    tu_write_file(v2json, extra, (size_t)-1);
    assert_int_equal(keel_model_load(rt, "m", err, sizeof(err)), KEEL_ELOAD);
    assert_non_null(strstr(err, "did not finish within 1 ms"));
    assert_int_equal(unsetenv("KEEL_MODEL_CHECK_TIMEOUT_MS"), 0);
    free(extra);
    free(text);

    keel_runtime_destroy(rt);
    assert_int_equal(tu_count_fds(), fds_none);
    free(flipped);
    free(ubj);
    free(env);
    tu_rm_rf(dir);
    free(helper);
    free(v2json);
    free(cfg);
    free(v2ubj);
    free(v1);
    free(cand);
    free(json);
    free(repo);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crashing_and_hanging_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
