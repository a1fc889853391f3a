/*
 * test_xgboost.c: the xgboost backend against a reference it did not write.
 *
 * DESIGN
 * The reference is the xgboost command-line tool (path in KEEL_XGBOOST_CLI). The group setup
 * converts liblinear's heart_scale example (libsvm format, labels +1/-1, 13 features) into
 * three training sets (binary, 3-class, regression), trains each with the CLI, and asks the
 * CLI for its predictions on every row. The tests then load the CLI's model files through the
 * backend vtable directly (no runtime), run every row with absent libsvm features given as
 * NaN, and require the CLI's numbers within 1e-6. A model.ubj is produced through the C API
 * (XGBoosterSaveModel), because the 1.7.4 CLI writes its deprecated binary format for any
 * model_out not ending in .json; setup checks the file really is UBJSON.
 * A second data set gives some rows an explicit 0 in place of a value, which must stay a value
 * (missing is NaN only), and the committed example model is checked on its sample rows.
 * Failure cases check the error code, that the message names the file and the reason, and
 * (under ASan/LSan) that nothing leaks. test_never_prints captures stderr while XGBoost would
 * warn. A missing CLI fails the tests (the build requires it); they skip only where noted, as
 * root or on a newer XGBoost.
 * Single-threaded except test_never_prints (loads on fresh threads, XGBoost's verbosity being
 * per thread) and test_concurrent_contexts, which runs two contexts of one model at once.
 * Under ThreadSanitizer, XGBoost's OpenMP model loading shows up as races inside libxgboost
 * and libgomp, which are not instrumented: suppress "race:libxgboost.so" and "race:libgomp.so".
 */
#include "testutil.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xgboost/c_api.h>

#include "backends/backend.h"
#include "core/core.h"

#ifndef KEEL_SOURCE_DIR
#define KEEL_SOURCE_DIR "."
#endif
#ifndef KEEL_XGBOOST_CLI
#define KEEL_XGBOOST_CLI "/usr/bin/xgboost"
#endif

#define NROWS 270
#define NFEAT 13
#define TOLERANCE 1e-6

static const keel__backend *const be = &keel__xgboost_backend;

/* Everything the group setup builds; read-only during the tests. */
static struct {
    bool have_cli;
    char *dir;              /* temp dir holding data, models and predictions */
    float x[NROWS][NFEAT];  /* NaN = feature absent in heart_scale */
    float xz[NROWS][NFEAT]; /* x with feature i % 13 of row i an explicit 0 */
    int label[NROWS];       /* 1 = heart disease, 0 = not */
    size_t nmissing;        /* absent features in heart_scale, so NaN handling is exercised */
    float *pred_bin;        /* the CLI's predictions: NROWS values */
    float *pred_multi;      /* NROWS * 3 */
    float *pred_reg;        /* NROWS */
    float *pred_zeros;      /* the binary model on xz: NROWS */
} g;

/* ---------------------------------------------------------------- config built by hand */

typedef struct test_cfg {
    keel__model_config cfg;
    keel__tensor_config in;
    keel__tensor_config out;
} test_cfg;

static void cfg_init(test_cfg *t, int64_t max_batch, int64_t nfeat, int64_t nout,
                     const char *filename)
{
    memset(t, 0, sizeof(*t));
    t->in.name = (char *)"features";
    t->in.datatype = KEEL_TYPE_FP32;
    t->in.dims[0] = nfeat;
    t->in.ndims = 1;
    t->out.name = (char *)"probability";
    t->out.datatype = KEEL_TYPE_FP32;
    t->out.dims[0] = nout;
    t->out.ndims = 1;
    t->cfg.name = (char *)"heart";
    t->cfg.backend = (char *)"xgboost";
    t->cfg.max_batch_size = max_batch;
    t->cfg.inputs = &t->in;
    t->cfg.ninputs = 1;
    t->cfg.outputs = &t->out;
    t->cfg.noutputs = 1;
    t->cfg.instance_count = 2;
    t->cfg.default_model_filename = (char *)filename;
}

/* ---------------------------------------------------------------- emit capture */

typedef struct capture {
    int calls;
    char name[64];
    keel_datatype dt;
    int64_t shape[KEEL__MAX_DIMS + 1];
    size_t ndim;
    float *data;
    size_t bytes;
} capture;

static keel_err capture_emit(keel__run_io *io, const char *name, keel_datatype dt,
                             const int64_t *shape, size_t ndim, const void *data, size_t bytes)
{
    capture *c = io->sink;

    c->calls++;
    snprintf(c->name, sizeof(c->name), "%s", name);
    c->dt = dt;
    c->ndim = ndim;
    memcpy(c->shape, shape, ndim * sizeof(*shape));
    free(c->data);
    c->data = malloc(bytes > 0 ? bytes : 1);
    if (c->data == NULL)
        return KEEL_ENOMEM;
    memcpy(c->data, data, bytes);
    c->bytes = bytes;
    return KEEL_OK;
}

/*
 * Runs rows [0, NROWS) of x through ctx in batches of `batch` (with a batch dimension when
 * batched) and writes nout values per row to out. Checks the emitted name, type and shape.
 * Returns the first error instead of failing, so threads can report it.
 */
static keel_err run_rows(void *ctx, float (*x)[NFEAT], bool batched, int64_t batch, int64_t nout,
                         float *out, char *errbuf, size_t errlen)
{
    capture cap = {0};
    keel_err err = KEEL_OK;

    for (int64_t r = 0; r < NROWS; r += batch) {
        int64_t n = r + batch <= NROWS ? batch : NROWS - r;
        int64_t shape[2] = {n, NFEAT};
        keel_tensor_view in = {
            .name = "features",
            .datatype = KEEL_TYPE_FP32,
            .shape = batched ? shape : shape + 1,
            .ndim = batched ? 2 : 1,
            .data = x[r],
            .bytes = (size_t)(n * NFEAT) * sizeof(float),
        };
        keel__run_io io = {
            .inputs = &in,
            .ninputs = 1,
            .batch = batched ? n : 1,
            .emit = capture_emit,
            .sink = &cap,
            .errbuf = errbuf,
            .errlen = errlen,
        };

        cap.calls = 0;
        if ((err = be->run(ctx, &io)) != KEEL_OK)
            break;
        if (cap.calls != 1 || strcmp(cap.name, "probability") != 0 || cap.dt != KEEL_TYPE_FP32 ||
            cap.ndim != (batched ? 2u : 1u) ||
            (batched && (cap.shape[0] != n || cap.shape[1] != nout)) ||
            (!batched && cap.shape[0] != nout) || cap.bytes != (size_t)(n * nout) * sizeof(float)) {
            snprintf(errbuf, errlen, "rows %lld..: unexpected emit (calls %d, ndim %zu)",
                     (long long)r, cap.calls, cap.ndim);
            err = KEEL_EINTERNAL;
            break;
        }
        memcpy(out + r * nout, cap.data, cap.bytes);
    }
    free(cap.data);
    return err;
}

/* ---------------------------------------------------------------- reference data */

static void load_heart_scale(void)
{
    float *x = NULL, *y = NULL;
    int n = tu_heart_rows(&x, &y); /* the one heart_scale parser, shared with other tests */

    assert_int_equal(n, NROWS);
    assert_int_equal(TU_HEART_FEATURES, NFEAT);
    for (int i = 0; i < NROWS; i++) {
        g.label[i] = y[i] > 0.5f ? 1 : 0;
        for (int j = 0; j < NFEAT; j++) {
            g.x[i][j] = x[i * NFEAT + j];
            g.nmissing += isnan(g.x[i][j]) ? 1 : 0;
        }
    }
    free(x);
    free(y);
}

/* Writes a libsvm file (1-based features, absent = missing) with the given targets. Values
 * are printed with 9 significant digits, which round-trip a float exactly. */
static void write_libsvm(const char *name, float (*x)[NFEAT], const float *target)
{
    char *path = tu_strf("%s/%s", g.dir, name);
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    for (int i = 0; i < NROWS; i++) {
        fprintf(f, "%.9g", (double)target[i]);
        for (int j = 0; j < NFEAT; j++) {
            if (!isnan(x[i][j]))
                fprintf(f, " %d:%.9g", j + 1, (double)x[i][j]);
        }
        fputc('\n', f);
    }
    assert_int_equal(fclose(f), 0);
    free(path);
}

/* Asks the CLI for model <model>.json's predictions on <data>.txt (count values). */
static float *cli_predict(const char *model, const char *data, size_t count)
{
    char *predf = tu_strf("%s/%s-%s.pred", g.dir, model, data);
    float *pred = calloc(count, sizeof(float));
    FILE *f;
    size_t n = 0;
    float v;

    assert_non_null(pred);
    if (tu_run("cd '%s' && '%s' %s.conf task=pred model_in=%s.json "
               "'test:data=%s.txt?format=libsvm&indexing_mode=1' name_pred='%s' "
               ">%s.pred.log 2>&1",
               g.dir, KEEL_XGBOOST_CLI, model, model, data, predf, model) != 0)
        fail_msg("xgboost CLI prediction failed: see %s/%s.pred.log", g.dir, model);
    f = fopen(predf, "r");
    assert_non_null(f);
    /* The CLI prints max_digits10 (9) significant digits: floats round-trip exactly. */
    while (fscanf(f, "%f", &v) == 1) {
        assert_true(n < count);
        pred[n++] = v;
    }
    fclose(f);
    assert_int_equal(n, count);
    free(predf);
    return pred;
}

/* Trains <stem>.json with the CLI on <stem>.txt, then returns its predictions on every row. */
static float *train_and_predict(const char *stem, const char *objective, const char *extra,
                                size_t count)
{
    char *conf = tu_strf("%s/%s.conf", g.dir, stem);
    char *text = tu_strf("booster = gbtree\n"
                         "objective = %s\n"
                         "%s"
                         "max_depth = 3\n"
                         "eta = 0.3\n"
                         "num_round = 10\n"
                         "nthread = 1\n"
                         "seed = 0\n"
                         "data = \"%s.txt?format=libsvm&indexing_mode=1\"\n"
                         "model_out = \"%s.json\"\n",
                         objective, extra, stem, stem);

    tu_write_file(conf, text, (size_t)-1);
    if (tu_run("cd '%s' && '%s' %s.conf >%s.train.log 2>&1", g.dir, KEEL_XGBOOST_CLI, stem, stem) !=
        0)
        fail_msg("xgboost CLI training of %s failed: see %s/%s.train.log", stem, g.dir, stem);
    free(conf);
    free(text);
    return cli_predict(stem, stem, count);
}

/* Copies <stem>.json into <subdir>/<name> (a version directory of its own). */
static char *version_dir_with(const char *subdir, const char *from, const char *name)
{
    char *dir = tu_strf("%s/%s", g.dir, subdir);
    char *src = tu_strf("%s/%s", g.dir, from);
    char *dst = tu_strf("%s/%s", dir, name);

    tu_copy_file(src, dst);
    free(src);
    free(dst);
    return dir;
}

/* Saves the CLI's JSON model as UBJSON through the C API and checks the bytes: UBJSON
 * objects start with '{' followed by a type marker for the first key's length. */
static void make_ubj(void)
{
    BoosterHandle h = NULL;
    char *json = tu_strf("%s/bin.json", g.dir);
    char *ubj = tu_strf("%s/bin.ubj", g.dir);
    size_t len;
    char *bytes;

    assert_int_equal(XGBoosterCreate(NULL, 0, &h), 0);
    assert_int_equal(XGBoosterSetParam(h, "nthread", "1"), 0);
    assert_int_equal(XGBoosterLoadModel(h, json), 0);
    assert_int_equal(XGBoosterSaveModel(h, ubj), 0);
    assert_int_equal(XGBoosterFree(h), 0);
    bytes = tu_read_file(ubj, &len);
    assert_true(len > 2);
    if (bytes[0] != '{' || strchr("iUIlL", bytes[1]) == NULL)
        fail_msg("%s is not UBJSON (starts with 0x%02x 0x%02x)", ubj, (unsigned char)bytes[0],
                 (unsigned char)bytes[1]);
    free(bytes);
    free(json);
    free(ubj);
}

static int group_setup(void **state)
{
    float target[NROWS];

    (void)state;
    g.have_cli = KEEL_XGBOOST_CLI[0] != '\0' && access(KEEL_XGBOOST_CLI, X_OK) == 0;
    if (!g.have_cli)
        return 0;
    load_heart_scale();
    g.dir = tu_mkdtemp("xgboost");

    for (int i = 0; i < NROWS; i++)
        target[i] = (float)g.label[i];
    write_libsvm("bin.txt", g.x, target);
    g.pred_bin = train_and_predict("bin", "binary:logistic", "", NROWS);

    /* heart_scale has no explicit zeros; these rows have one each, which must stay a value
     * (missing is NaN, not 0), as it does for the CLI reading "k:0" from libsvm text. */
    memcpy(g.xz, g.x, sizeof(g.x));
    for (int i = 0; i < NROWS; i++)
        g.xz[i][i % NFEAT] = 0.0f;
    write_libsvm("zeros.txt", g.xz, target);
    g.pred_zeros = cli_predict("bin", "zeros", NROWS);

    /* Three classes that need two features: disease, plus age above the middle. */
    for (int i = 0; i < NROWS; i++)
        target[i] = (float)(g.label[i] + (g.x[i][0] > 0.0f ? 1 : 0));
    write_libsvm("multi.txt", g.x, target);
    g.pred_multi =
        train_and_predict("multi", "multi:softprob", "num_class = 3\n", (size_t)NROWS * 3);

    /* Resting blood pressure (scaled) plus the label; absent values count as 0. */
    for (int i = 0; i < NROWS; i++)
        target[i] = (isnan(g.x[i][3]) ? 0.0f : g.x[i][3]) + (float)g.label[i];
    write_libsvm("reg.txt", g.x, target);
    g.pred_reg = train_and_predict("reg", "reg:squarederror", "", NROWS);

    make_ubj();
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    if (g.dir != NULL)
        tu_rm_rf(g.dir);
    free(g.dir);
    free(g.pred_bin);
    free(g.pred_multi);
    free(g.pred_reg);
    free(g.pred_zeros);
    return 0;
}

#define REQUIRE_CLI()                                                                              \
    do {                                                                                           \
        if (!g.have_cli)                                                                           \
            fail_msg("the xgboost command '%s' is not executable", KEEL_XGBOOST_CLI);              \
    } while (0)

/* ---------------------------------------------------------------- conformance */

static void assert_close(const float *got, const float *want, size_t n, const char *what)
{
    double worst = 0.0;
    size_t at = 0;

    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst)) { /* also catches NaN */
            worst = isnan(d) ? INFINITY : d;
            at = i;
        }
    }
    if (worst > TOLERANCE)
        fail_msg("%s: value %zu is %.9g, the xgboost CLI says %.9g (|diff| %.3g > %g)", what, at,
                 (double)got[at], (double)want[at], worst, TOLERANCE);
}

/* Loads version_dir with cfg, runs every row in batches of 1 and of NROWS (or singly with no
 * batch dimension) and compares with want. */
static void check_model(const test_cfg *t, const char *version_dir, float (*x)[NFEAT],
                        const float *want, int64_t nout, const char *what)
{
    void *model = NULL, *ctx = NULL;
    char errbuf[512] = "";
    float *got = calloc((size_t)(NROWS * nout), sizeof(float));
    bool batched = t->cfg.max_batch_size > 0;
    keel_err err;

    assert_non_null(got);
    err = be->model_load(&t->cfg, version_dir, &model, errbuf, sizeof(errbuf));
    if (err != KEEL_OK)
        fail_msg("%s: load: %s: %s", what, keel_err_name(err), errbuf);
    assert_int_equal(be->context_create(model, &t->cfg, &ctx, errbuf, sizeof(errbuf)), KEEL_OK);

    memset(got, 0, (size_t)(NROWS * nout) * sizeof(float));
    err = run_rows(ctx, x, batched, 1, nout, got, errbuf, sizeof(errbuf));
    if (err != KEEL_OK)
        fail_msg("%s: run: %s: %s", what, keel_err_name(err), errbuf);
    assert_close(got, want, (size_t)(NROWS * nout), what);

    if (batched) {
        memset(got, 0, (size_t)(NROWS * nout) * sizeof(float));
        err = run_rows(ctx, x, true, NROWS, nout, got, errbuf, sizeof(errbuf));
        if (err != KEEL_OK)
            fail_msg("%s: run batch %d: %s: %s", what, NROWS, keel_err_name(err), errbuf);
        assert_close(got, want, (size_t)(NROWS * nout), what);
    }

    be->context_destroy(ctx);
    be->model_free(model);
    free(got);
}

static void test_vtable(void **state)
{
    (void)state;
    assert_string_equal(be->name, "xgboost");
    assert_true(be->concurrent_contexts);
    assert_int_equal(be->input_types, KEEL__TYPE_BIT(KEEL_TYPE_FP32));
}

static void test_binary_json(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    /* heart_scale has absent features; they reach XGBoost as NaN and must mean "missing". */
    assert_true(g.nmissing > 0);
    dir = version_dir_with("v_json", "bin.json", "model.json");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    check_model(&t, dir, g.x, g.pred_bin, 1, "binary model.json");
    free(dir);
}

static void test_binary_ubj(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    /* Only model.ubj in the directory: the backend falls back to it. */
    dir = version_dir_with("v_ubj", "bin.ubj", "model.ubj");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    check_model(&t, dir, g.x, g.pred_bin, 1, "binary model.ubj");
    free(dir);
}

static void test_no_batch_dimension(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("v_nobatch", "bin.json", "model.json");
    cfg_init(&t, 0, NFEAT, 1, NULL);
    check_model(&t, dir, g.x, g.pred_bin, 1, "binary, max_batch_size 0");
    free(dir);
}

static void test_default_model_filename(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    /* The format is found from the content, not the name. */
    dir = version_dir_with("v_named", "bin.json", "weights.bin");
    cfg_init(&t, 512, NFEAT, 1, "weights.bin");
    check_model(&t, dir, g.x, g.pred_bin, 1, "JSON named weights.bin");
    free(dir);
    dir = version_dir_with("v_named_ubj", "bin.ubj", "weights.json");
    cfg_init(&t, 512, NFEAT, 1, "weights.json");
    check_model(&t, dir, g.x, g.pred_bin, 1, "UBJSON named weights.json");
    free(dir);
}

static void test_multiclass(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("v_multi", "multi.json", "model.json");
    cfg_init(&t, 512, NFEAT, 3, NULL);
    check_model(&t, dir, g.x, g.pred_multi, 3, "multi:softprob");
    free(dir);
}

static void test_regression(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("v_reg", "reg.json", "model.json");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    check_model(&t, dir, g.x, g.pred_reg, 1, "reg:squarederror");
    free(dir);
}

static void test_explicit_zeros(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("v_zeros", "bin.json", "model.json");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    check_model(&t, dir, g.xz, g.pred_zeros, 1, "explicit zeros");
    free(dir);
}

static void test_memory_estimate(void **state)
{
    test_cfg t;
    void *model = NULL;
    char errbuf[512] = "";
    char *dir, *file;
    struct stat st;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("v_mem", "bin.json", "model.json");
    file = tu_strf("%s/model.json", dir);
    assert_int_equal(stat(file, &st), 0);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    assert_int_equal(be->model_load(&t.cfg, dir, &model, errbuf, sizeof(errbuf)), KEEL_OK);
    assert_int_equal(be->memory_estimate(model), (size_t)st.st_size);
    be->model_free(model);
    free(file);
    free(dir);
}

/* The committed example (scripts/train-examples.sh) on its own sample rows, against the CLI. */
static void test_example_model(void **state)
{
    enum { NSAMPLE = 5 };
    test_cfg t;
    void *model = NULL, *ctx = NULL;
    char errbuf[512] = "";
    char *sample, *vdir;
    char *libsvm, *text, *p, *end, *from, *to;
    float x[NSAMPLE][NFEAT], labels[NSAMPLE], *want;
    int64_t shape[2] = {NSAMPLE, NFEAT};
    capture cap = {0};
    keel_tensor_view in = {"features", KEEL_TYPE_FP32, shape, 2, x, sizeof(x)};
    keel__run_io io = {&in, 1, NSAMPLE, capture_emit, &cap, errbuf, sizeof(errbuf)};
    FILE *f;

    (void)state;
    REQUIRE_CLI();
    sample = tu_strf("%s/examples/heart_sample.txt", KEEL_SOURCE_DIR);
    vdir = tu_strf("%s/examples/models/heart/1", KEEL_SOURCE_DIR);
    /* '#' comment lines, then rows: label, then 13 values with nan for absent ones */
    text = tu_read_file(sample, NULL);
    p = text;
    for (int i = 0; i < NSAMPLE; i++) {
        while (*p == '#' || *p == '\n')
            p += strcspn(p, "\n") + (p[strcspn(p, "\n")] == '\n');
        labels[i] = strtof(p, &end);
        assert_true(end != p);
        for (int j = 0; j < NFEAT; j++) {
            p = end;
            x[i][j] = strtof(p, &end);
            assert_true(end != p);
        }
        p = end;
    }
    free(text);
    libsvm = tu_strf("%s/sample.txt", g.dir);
    f = fopen(libsvm, "w");
    assert_non_null(f);
    for (int i = 0; i < NSAMPLE; i++) {
        fprintf(f, "%g", (double)labels[i]);
        for (int j = 0; j < NFEAT; j++) {
            if (!isnan(x[i][j]))
                fprintf(f, " %d:%.9g", j + 1, (double)x[i][j]);
        }
        fputc('\n', f);
    }
    assert_int_equal(fclose(f), 0);
    /* cli_predict wants <name>.json and <name>.conf in the temp dir. */
    from = tu_strf("%s/model.json", vdir);
    to = tu_strf("%s/example.json", g.dir);
    tu_copy_file(from, to);
    free(from);
    free(to);
    from = tu_strf("%s/bin.conf", g.dir);
    to = tu_strf("%s/example.conf", g.dir);
    tu_copy_file(from, to);
    free(from);
    free(to);
    want = cli_predict("example", "sample", NSAMPLE);

    cfg_init(&t, 256, NFEAT, 1, NULL);
    if (be->model_load(&t.cfg, vdir, &model, errbuf, sizeof(errbuf)) != KEEL_OK)
        fail_msg("%s", errbuf);
    assert_int_equal(be->context_create(model, &t.cfg, &ctx, errbuf, sizeof(errbuf)), KEEL_OK);
    assert_int_equal(be->run(ctx, &io), KEEL_OK);
    assert_int_equal(cap.bytes, sizeof(float) * NSAMPLE);
    assert_close(cap.data, want, NSAMPLE, "examples/models/heart");
    for (int i = 0; i < NSAMPLE; i++)
        assert_true(cap.data[i] >= 0.0f && cap.data[i] <= 1.0f);
    be->context_destroy(ctx);
    be->model_free(model);
    free(cap.data);
    free(want);
    free(libsvm);
    free(vdir);
    free(sample);
}

/* ---------------------------------------------------------------- load failures */

/* Loads dir and requires want_err with a message containing both substrings. */
static void expect_load_error(const test_cfg *t, const char *dir, keel_err want_err,
                              const char *needle1, const char *needle2)
{
    void *model = (void *)&model; /* must be reset to NULL */
    char errbuf[1024] = "";
    keel_err err = be->model_load(&t->cfg, dir, &model, errbuf, sizeof(errbuf));

    if (err != want_err)
        fail_msg("load of %s: got %s (%s), want %s", dir, keel_err_name(err), errbuf,
                 keel_err_name(want_err));
    assert_null(model);
    if (strstr(errbuf, needle1) == NULL || (needle2 != NULL && strstr(errbuf, needle2) == NULL))
        fail_msg("message \"%s\" should contain \"%s\" and \"%s\"", errbuf, needle1,
                 needle2 != NULL ? needle2 : "");
}

/* A version directory holding one file model.json with the given bytes. */
static char *dir_with_bytes(const char *subdir, const char *name, const void *data, size_t len,
                            char **file)
{
    char *dir = tu_strf("%s/%s", g.dir, subdir);

    *file = tu_strf("%s/%s", dir, name);
    tu_mkdirs(dir);
    tu_write_file(*file, data, len);
    return dir;
}

static void test_truncated_json(void **state)
{
    test_cfg t;
    char *src, *dir, *file;
    size_t len;
    char *bytes;

    (void)state;
    REQUIRE_CLI();
    src = tu_strf("%s/bin.json", g.dir);
    bytes = tu_read_file(src, &len);
    dir = dir_with_bytes("bad_trunc", "model.json", bytes, len / 2, &file);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "XGBoost cannot load the model");
    free(bytes);
    free(src);
    free(file);
    free(dir);
}

/* XGBoost 1.7 reads UBJSON without bounds checks: a truncated .ubj used to crash it. */
static void test_truncated_ubj(void **state)
{
    test_cfg t;
    char *src, *dir, *file;
    size_t len;
    char *bytes;
    int tried = 0;

    (void)state;
    REQUIRE_CLI();
    src = tu_strf("%s/bin.ubj", g.dir);
    bytes = tu_read_file(src, &len);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    for (size_t n = 1; n < len; n += n < 512 ? 1 : 7) {
        dir = dir_with_bytes("bad_trunc_ubj", "model.ubj", bytes, n, &file);
        expect_load_error(&t, dir, KEEL_ELOAD, file, n > 1 ? "truncated or malformed" : NULL);
        free(file);
        free(dir);
        tried++;
    }
    assert_true(tried > 1000);
    free(bytes);
    free(src);
}

/* XGBoost's readers are recursive: deep nesting would overflow the stack. */
static void test_deep_nesting(void **state)
{
    enum { DEPTH = 200000 };
    static const char ubj_head[] = {'{', 'L', 0, 0, 0, 0, 0, 0, 0, 1, 'a'};
    test_cfg t;
    char *text = malloc(2 * DEPTH + 64);
    char *dir, *file;
    size_t n;

    (void)state;
    REQUIRE_CLI();
    assert_non_null(text);
    cfg_init(&t, 512, NFEAT, 1, NULL);

    n = (size_t)sprintf(text, "{\"learner\":");
    memset(text + n, '[', DEPTH);
    memset(text + n + DEPTH, ']', DEPTH);
    n += 2 * DEPTH;
    text[n++] = '}';
    dir = dir_with_bytes("bad_deep_json", "model.json", text, n, &file);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "nests deeper than");
    free(file);
    free(dir);

    memcpy(text, ubj_head, sizeof(ubj_head));
    memset(text + sizeof(ubj_head), '[', DEPTH);
    memset(text + sizeof(ubj_head) + DEPTH, ']', DEPTH);
    text[sizeof(ubj_head) + 2 * DEPTH] = '}';
    dir =
        dir_with_bytes("bad_deep_ubj", "model.ubj", text, sizeof(ubj_head) + 2 * DEPTH + 1, &file);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "truncated or malformed");
    free(file);
    free(dir);
    free(text);
}

static void test_empty_file(void **state)
{
    test_cfg t;
    char *dir, *file;

    (void)state;
    REQUIRE_CLI();
    dir = dir_with_bytes("bad_empty", "model.json", "", 0, &file);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "model file is empty");
    free(file);
    free(dir);
}

static void test_random_bytes(void **state)
{
    test_cfg t;
    unsigned char bytes[4096];
    uint32_t s = 12345;
    char *dir, *file;

    (void)state;
    REQUIRE_CLI();
    for (size_t i = 0; i < sizeof(bytes); i++) {
        s = s * 1103515245u + 12345u;
        bytes[i] = (unsigned char)(s >> 16);
    }
    bytes[0] = 0x9c; /* deterministic anyway; not '{' or whitespace */
    dir = dir_with_bytes("bad_random", "model.json", bytes, sizeof(bytes), &file);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "not an XGBoost JSON or UBJSON model");
    free(file);
    free(dir);

    /* Random bytes behind '{' get past the first check: behind '{"' they reach XGBoost's JSON
     * parser, behind '{L' (UBJSON) keel's structure check, which keeps them from XGBoost's
     * unchecked UBJSON reader. */
    bytes[0] = '{';
    bytes[1] = 'L';
    dir = dir_with_bytes("bad_random_ubj", "model.ubj", bytes, sizeof(bytes), &file);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "UBJSON model is truncated or malformed");
    free(file);
    free(dir);
    bytes[1] = '"';
    dir = dir_with_bytes("bad_random_json", "model.json", bytes, sizeof(bytes), &file);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "XGBoost cannot load the model");
    free(file);
    free(dir);
}

static void test_missing_file(void **state)
{
    test_cfg t;
    char *dir, *named;

    (void)state;
    REQUIRE_CLI();
    dir = tu_strf("%s/bad_missing", g.dir);
    tu_mkdirs(dir);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, dir, "no model file");
    /* The version directory itself missing. */
    named = tu_strf("%s/nonexistent", dir);
    expect_load_error(&t, named, KEEL_ELOAD, named, "no model file");
    free(named);
    /* A configured default_model_filename that is absent. */
    named = tu_strf("%s/weights.json", dir);
    cfg_init(&t, 512, NFEAT, 1, "weights.json");
    expect_load_error(&t, dir, KEEL_ELOAD, named, "not found");
    free(named);
    free(dir);
}

static void test_unreadable_file(void **state)
{
    test_cfg t;
    char *dir;
    char *file;

    (void)state;
    REQUIRE_CLI();
    if (geteuid() == 0) {
        print_message("running as root: an unreadable file cannot be made\n");
        skip();
    }
    dir = version_dir_with("bad_unreadable", "bin.json", "model.json");
    file = tu_strf("%s/model.json", dir);
    assert_int_equal(chmod(file, 0), 0);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "cannot open");
    free(file);
    free(dir);
}

static void test_deprecated_binary_refused(void **state)
{
    test_cfg t;
    BoosterHandle h = NULL;
    char *src, *dir, *file, *bytes;

    (void)state;
    REQUIRE_CLI();
    src = tu_strf("%s/bin.json", g.dir);
    dir = tu_strf("%s/bad_legacy", g.dir);
    file = tu_strf("%s/model.ubj", dir);
    tu_mkdirs(dir);
    /* XGBoost 1.7 saves its deprecated binary format for names not ending in .json or .ubj;
     * the 1.7.4 CLI does so for every name but .json, model.ubj included. */
    assert_int_equal(XGBoosterCreate(NULL, 0, &h), 0);
    assert_int_equal(XGBoosterSetParam(h, "nthread", "1"), 0);
    assert_int_equal(XGBoosterLoadModel(h, src), 0);
    free(src);
    src = tu_strf("%s/legacy.bin", dir);
    assert_int_equal(XGBoosterSaveModel(h, src), 0);
    assert_int_equal(XGBoosterFree(h), 0);
    bytes = tu_read_file(src, NULL);
    if (bytes[0] == '{') {
        free(bytes);
        free(src);
        free(file);
        free(dir);
        print_message("this XGBoost no longer writes the deprecated binary format\n");
        skip();
    }
    free(bytes);
    assert_int_equal(rename(src, file), 0);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, file, "deprecated binary format");
    free(src);
    free(file);
    free(dir);
}

static void test_feature_mismatch(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("bad_features", "bin.json", "model.json");
    cfg_init(&t, 512, 20, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, "model expects 13 features",
                      "config input 'features' dims [20] gives 20");
    free(dir);
}

static void test_output_mismatch(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("bad_outputs", "multi.json", "model.json");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    expect_load_error(&t, dir, KEEL_ELOAD, "model gives 3 values per row",
                      "config output 'probability' dims [1] gives 1");
    free(dir);
}

static void test_config_shape_refused(void **state)
{
    test_cfg t;
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("bad_cfg", "bin.json", "model.json");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    t.in.dims[0] = -1;
    expect_load_error(&t, dir, KEEL_ECONFIG, "input 'features' dims [-1]", "fixed");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    t.out.datatype = KEEL_TYPE_INT32;
    expect_load_error(&t, dir, KEEL_ECONFIG, "output 'probability' must be TYPE_FP32", NULL);
    cfg_init(&t, 512, NFEAT, 1, NULL);
    t.cfg.noutputs = 0;
    expect_load_error(&t, dir, KEEL_ECONFIG, "exactly one input and one output", NULL);
    free(dir);
}

/* ---------------------------------------------------------------- silence */

typedef struct load_job {
    const test_cfg *t;
    const char *dir;
    keel_err err;
    char errbuf[512];
} load_job;

static void *load_and_free(void *arg)
{
    load_job *j = arg;
    void *model = NULL;

    j->err = be->model_load(&j->t->cfg, j->dir, &model, j->errbuf, sizeof(j->errbuf));
    be->model_free(model);
    return NULL;
}

static void test_never_prints(void **state)
{
    test_cfg t;
    load_job jobs[2];
    pthread_t th;
    char *src, *dir, *file, *log, *text, *version, *out;
    size_t len;
    int saved, fd;

    (void)state;
    REQUIRE_CLI();
    /* A JSON model claiming XGBoost 1.5 makes XGBoost 1.7 log a warning while loading. */
    src = tu_strf("%s/bin.json", g.dir);
    text = tu_read_file(src, &len);
    version = strstr(text, "\"version\":[");
    assert_non_null(version);
    *version = '\0';
    out = tu_strf("%s\"version\":[1,5,0]}", text);
    dir = tu_strf("%s/v_old", g.dir);
    file = tu_strf("%s/model.json", dir);
    tu_mkdirs(dir);
    tu_write_file(file, out, (size_t)-1);
    log = tu_strf("%s/stderr.log", g.dir);
    cfg_init(&t, 512, NFEAT, 1, NULL);

    /* XGBoost's verbosity is per thread: load on two fresh threads, stderr captured. */
    fflush(stderr);
    saved = dup(2);
    assert_true(saved >= 0);
    fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(dup2(fd, 2), 2);
    for (int i = 0; i < 2; i++) {
        jobs[i] = (load_job){.t = &t, .dir = dir};
        assert_int_equal(pthread_create(&th, NULL, load_and_free, &jobs[i]), 0);
        assert_int_equal(pthread_join(th, NULL), 0);
    }
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    close(fd);

    for (int i = 0; i < 2; i++) {
        if (jobs[i].err != KEEL_OK)
            fail_msg("load %d: %s: %s", i, keel_err_name(jobs[i].err), jobs[i].errbuf);
    }
    free(text);
    text = tu_read_file(log, &len);
    if (len != 0)
        fail_msg("the backend let XGBoost print: %s", text);
    free(text);
    free(out);
    free(log);
    free(file);
    free(dir);
    free(src);
}

/* ---------------------------------------------------------------- concurrency */

typedef struct worker {
    void *ctx;
    float (*x)[NFEAT];
    float out[NROWS];
    const float *want;
    int rounds;
    int mismatches;
    keel_err err;
    char errbuf[256];
} worker;

static void *worker_main(void *arg)
{
    worker *w = arg;

    for (int i = 0; i < w->rounds && w->err == KEEL_OK; i++) {
        memset(w->out, 0, sizeof(w->out));
        w->err = run_rows(w->ctx, w->x, true, 1 + i % 7, 1, w->out, w->errbuf, sizeof(w->errbuf));
        if (w->err == KEEL_OK && memcmp(w->out, w->want, sizeof(w->out)) != 0)
            w->mismatches++;
    }
    return NULL;
}

static void test_concurrent_contexts(void **state)
{
    test_cfg t;
    void *model = NULL;
    void *ctx0 = NULL;
    char errbuf[512] = "";
    float single[2][NROWS];
    worker w[2];
    pthread_t th[2];
    char *dir;

    (void)state;
    REQUIRE_CLI();
    dir = version_dir_with("v_threads", "bin.json", "model.json");
    cfg_init(&t, 512, NFEAT, 1, NULL);
    assert_int_equal(be->model_load(&t.cfg, dir, &model, errbuf, sizeof(errbuf)), KEEL_OK);

    /* Single-threaded answers first; then two contexts at once, each on different rows (so
     * any cross-talk between them shows), must reproduce them bit for bit. */
    assert_int_equal(be->context_create(model, &t.cfg, &ctx0, errbuf, sizeof(errbuf)), KEEL_OK);
    assert_int_equal(run_rows(ctx0, g.x, true, 1, 1, single[0], errbuf, sizeof(errbuf)), KEEL_OK);
    assert_close(single[0], g.pred_bin, NROWS, "single-threaded");
    assert_int_equal(run_rows(ctx0, g.xz, true, 1, 1, single[1], errbuf, sizeof(errbuf)), KEEL_OK);
    assert_close(single[1], g.pred_zeros, NROWS, "single-threaded, zeros");
    be->context_destroy(ctx0);

    memset(w, 0, sizeof(w));
    for (int i = 0; i < 2; i++) {
        assert_int_equal(be->context_create(model, &t.cfg, &w[i].ctx, errbuf, sizeof(errbuf)),
                         KEEL_OK);
        w[i].x = i == 0 ? g.x : g.xz;
        w[i].want = single[i];
        w[i].rounds = 40;
    }
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < 2; i++) {
        if (w[i].err != KEEL_OK)
            fail_msg("thread %d: %s: %s", i, keel_err_name(w[i].err), w[i].errbuf);
        if (w[i].mismatches != 0)
            fail_msg("thread %d: %d of %d rounds differ from the single-threaded run", i,
                     w[i].mismatches, w[i].rounds);
        be->context_destroy(w[i].ctx);
    }
    be->model_free(model);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vtable),
        cmocka_unit_test(test_binary_json),
        cmocka_unit_test(test_binary_ubj),
        cmocka_unit_test(test_no_batch_dimension),
        cmocka_unit_test(test_default_model_filename),
        cmocka_unit_test(test_multiclass),
        cmocka_unit_test(test_regression),
        cmocka_unit_test(test_explicit_zeros),
        cmocka_unit_test(test_memory_estimate),
        cmocka_unit_test(test_example_model),
        cmocka_unit_test(test_truncated_json),
        cmocka_unit_test(test_truncated_ubj),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_empty_file),
        cmocka_unit_test(test_random_bytes),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_unreadable_file),
        cmocka_unit_test(test_deprecated_binary_refused),
        cmocka_unit_test(test_feature_mismatch),
        cmocka_unit_test(test_output_mismatch),
        cmocka_unit_test(test_config_shape_refused),
        cmocka_unit_test(test_never_prints),
        cmocka_unit_test(test_concurrent_contexts),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
