/*
 * test_runtime.c: the runtime's lifetime and accounting invariants, driven through the
 * public API with the mock backend (tests/unit/mock_backend.h) and the XGBoost example model.
 * Each test asserts something a user would notice if it broke: a lost request slot, a
 * callback that never fires or fires twice, a stale or freed model answering, counters that
 * do not return to idle.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"
#include "mock_backend.h"
#include "runtime/testhook.h"
#include "testutil.h"

typedef struct fixture {
    char *repo;
    keel_runtime *rt;
} fixture;

static const keel_counters idle_one_gen = {0, 0, 0, 1, 1, 0, 0};

static keel_runtime *start_runtime(const char *repo, int workers)
{
    keel_runtime_opts o;
    keel_runtime *rt = NULL;

    keel_runtime_opts_init(&o);
    o.model_repository = repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = workers;
    assert_int_equal(keel_runtime_create(&o, &rt), KEEL_OK);
    assert_int_equal(keel__runtime_add_backend(rt, &mock_backend), KEEL_OK);
    return rt;
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));

    mock_reset();
    mock_gate_open();
    f->repo = tu_mkdtemp("rt");
    mock_write_model(f->repo, "m", 1, 4, 0);
    mock_write_version(f->repo, "m", 1, 2.0);
    f->rt = start_runtime(f->repo, 2);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;

    mock_gate_open();
    keel_runtime_destroy(f->rt);
    /* Every model and context the runtime made was freed exactly once. */
    assert_int_equal(atomic_load(&mock.loads), atomic_load(&mock.model_frees));
    assert_int_equal(atomic_load(&mock.ctx_creates), atomic_load(&mock.ctx_destroys));
    assert_int_equal(atomic_load(&mock.double_frees), 0);
    assert_int_equal(atomic_load(&mock.destroyed_ctx_used), 0);
    tu_rm_rf(f->repo);
    free(f->repo);
    free(f);
    return 0;
}

static keel_request *make_req(keel_runtime *rt, const char *model, float x)
{
    keel_request *req = NULL;
    int64_t shape[2] = {1, 1};

    assert_int_equal(keel_request_create(rt, model, -1, &req), KEEL_OK);
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, &x, sizeof(x)),
                     KEEL_OK);
    return req;
}

static float output0(const keel_request *req)
{
    keel_tensor_view v;

    assert_int_equal(keel_request_output_by_name(req, "y", &v), KEEL_OK);
    assert_int_equal(v.datatype, KEEL_TYPE_FP32);
    assert_int_equal(v.bytes, sizeof(float));
    return *(const float *)v.data;
}

static uint64_t current_gen(keel_runtime *rt, const char *model)
{
    keel_model_status *st = NULL;
    size_t n = 0;
    uint64_t id = 0;

    assert_int_equal(keel_model_list(rt, &st, &n), KEEL_OK);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(st[i].name, model) == 0 && st[i].generation_id > id)
            id = st[i].generation_id;
    }
    keel_model_status_free(st, n);
    return id;
}

/* ---- async bookkeeping shared by several tests */

typedef struct tally {
    _Atomic long calls;
    _Atomic long by_status[KEEL_ERR_COUNT_];
    _Atomic long destroyed;
} tally;

static void tally_cb(keel_request *req, keel_err status, void *user)
{
    tally *t = user;

    /* Destroy first and count the call last: a test that saw the count may then read the
     * live-request counter without racing this destroy. */
    keel_request_destroy(req);
    atomic_fetch_add(&t->destroyed, 1);
    atomic_fetch_add(&t->by_status[status], 1);
    atomic_fetch_add(&t->calls, 1);
}

/* Waits until no context is stuck in a backend call whose request was answered already. */
static void wait_unstuck(keel_runtime *rt)
{
    keel_counters c;

    for (int i = 0; i < 10000; i++) {
        keel_counters_get(rt, &c);
        if (c.contexts_stuck == 0)
            return;
        usleep(1000);
    }
    fail_msg("a context is still stuck after 10 s");
}

static void wait_calls(tally *t, long n)
{
    for (int i = 0; i < 20000 && atomic_load(&t->calls) < n; i++) {
        struct timespec ts = {0, 500000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(atomic_load(&t->calls), n);
}

/* ---- tests */

static void test_sync_and_async(void **state)
{
    fixture *f = *state;
    keel_request *req = make_req(f->rt, "m", 3.0f);
    tally t = {0};

    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_true(output0(req) == 6.0f);
    assert_int_equal(keel_request_model_version(req), 1);
    assert_true(keel_request_generation_id(req) == current_gen(f->rt, "m"));
    /* A request can be submitted again; the previous outputs are replaced. */
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_request_output_count(req), 1);
    keel_request_destroy(req);

    for (int i = 0; i < 3; i++) {
        req = make_req(f->rt, "m", 1.0f);
        assert_int_equal(keel_infer_submit(req, tally_cb, &t), KEEL_OK);
    }
    wait_calls(&t, 3);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 3);
    tu_assert_counters(f->rt, &idle_one_gen);

    keel_model_stats st;
    assert_int_equal(keel_model_stats_get(f->rt, "m", &st), KEEL_OK);
    assert_int_equal(st.success, 5);
    assert_int_equal(st.inference_count, 5); /* rows; warm-up runs are not counted */
    /* The model batches (dynamic_batching): the three queued together may share a call. */
    assert_true(st.execution_count >= 3 && st.execution_count <= 5);
}

/* keel_request_timing_get: the steps of a run in order, the compute time the statistics
 * count, zeros for steps not reached, and a fresh set on resubmit. */
static void test_request_timing(void **state)
{
    fixture *f = *state;
    keel_request *req = make_req(f->rt, "m", 2.0f);
    keel_request *bad = NULL;
    keel_request_timing t, t2;
    keel_model_stats s0, s1;
    int64_t shape[2] = {1, 1};
    float x = 1.0f;

    keel_request_timing_get(req, &t);
    assert_true(t.submit_ns == 0 && t.complete_ns == 0); /* never submitted */
    assert_int_equal(keel_model_stats_get(f->rt, "m", &s0), KEEL_OK);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_model_stats_get(f->rt, "m", &s1), KEEL_OK);
    keel_request_timing_get(req, &t);
    assert_true(t.submit_ns != 0);
    assert_true(t.submit_ns <= t.dispatch_ns);
    assert_true(t.dispatch_ns <= t.input_end_ns);
    assert_true(t.input_end_ns <= t.output_start_ns);
    assert_true(t.output_start_ns <= t.complete_ns);
    assert_true(t.preprocess_ns == 0);
    /* The backend's run, exactly as the statistics count it. */
    assert_true(s1.compute_ns - s0.compute_ns == t.output_start_ns - t.input_end_ns);

    assert_int_equal(keel_infer(req), KEEL_OK);
    keel_request_timing_get(req, &t2);
    assert_true(t2.submit_ns >= t.complete_ns && t2.complete_ns >= t2.submit_ns);
    keel_request_destroy(req);

    /* A request that fails validation never reaches the backend. */
    assert_int_equal(keel_request_create(f->rt, "m", -1, &bad), KEEL_OK);
    assert_int_equal(keel_request_add_input(bad, "nosuch", KEEL_TYPE_FP32, shape, 2, &x, sizeof(x)),
                     KEEL_OK);
    assert_int_equal(keel_infer(bad), KEEL_EINVAL);
    keel_request_timing_get(bad, &t);
    assert_true(t.submit_ns != 0 && t.dispatch_ns >= t.submit_ns && t.complete_ns >= t.dispatch_ns);
    assert_true(t.input_end_ns == 0 && t.output_start_ns == 0);
    keel_request_destroy(bad);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* KEEL_SUBMIT_RUN_HERE: an idle context runs the request on the caller before submit
 * returns; a busy one queues it (never waits); unknown flags are refused. */
static void test_submit_run_here(void **state)
{
    fixture *f = *state;
    tally t = {0};
    keel_request *a = make_req(f->rt, "m", 1.0f);
    keel_request *b = make_req(f->rt, "m", 1.0f);
    keel_request *c = make_req(f->rt, "m", 1.0f);

    assert_int_equal(keel_infer_submit_ex(c, 1u << 7, tally_cb, &t), KEEL_EINVAL);
    keel_request_destroy(c);
    assert_int_equal(keel_infer_submit_ex(a, KEEL_SUBMIT_RUN_HERE, tally_cb, &t), KEEL_OK);
    assert_int_equal(atomic_load(&t.calls), 1); /* ran here, callback already delivered */
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 1);

    /* Hold the only context with an async request, then RUN_HERE must queue, not block. */
    keel_request *held = make_req(f->rt, "m", 1.0f);
    mock_gate_close();
    assert_int_equal(keel_infer_submit(held, tally_cb, &t), KEEL_OK);
    mock_wait_blocked(1);
    assert_int_equal(keel_infer_submit_ex(b, KEEL_SUBMIT_RUN_HERE, tally_cb, &t), KEEL_OK);
    assert_int_equal(atomic_load(&t.calls), 1);
    mock_gate_open();
    wait_calls(&t, 3);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 3);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* The estimate behind KEEL_SUBMIT_RUN_IF_FAST: size classes, how samples move it. */
static void test_exec_estimate(void **state)
{
    (void)state;
    assert_int_equal(keel__est_class(0), 0);
    assert_int_equal(keel__est_class(1), 0);
    assert_int_equal(keel__est_class(2), 1);
    assert_int_equal(keel__est_class(3), 1);
    assert_int_equal(keel__est_class(64), 6);
    assert_int_equal(keel__est_class(INT64_MAX), 15);
    assert_true(keel__est_update(0, 5000) == 5000);             /* first sample: taken as is */
    assert_true(keel__est_update(0, 0) != 0);                   /* measured stays "measured" */
    assert_true(keel__est_update(10000, 50000000) == 25005000); /* up: half-way at once */
    assert_true(keel__est_update(8000, 800) == 7100);           /* down: an eighth of the way */
    assert_false(keel__est_is_fast(0, 200000));                 /* unmeasured is slow */
    assert_true(keel__est_is_fast(199999, 200000));
    assert_false(keel__est_is_fast(200000, 200000));
    assert_false(keel__est_is_fast(1, 0)); /* bound 0: nothing is fast */
}

static keel_request *make_batch_req(keel_runtime *rt, const char *model, int64_t rows)
{
    keel_request *req = NULL;
    float x[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    int64_t shape[2] = {rows, 1};

    assert_true(rows <= 8);
    assert_int_equal(keel_request_create(rt, model, -1, &req), KEEL_OK);
    assert_int_equal(
        keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, x, (size_t)rows * sizeof(float)),
        KEEL_OK);
    return req;
}

/* Submits one request with flags and waits for it; returns whether it ran on this thread
 * (from the model's inline counter, checked against the handed-off one). */
static bool submit_where(keel_runtime *rt, unsigned flags, int64_t rows)
{
    keel_model_stats a, b;
    tally t = {0};
    keel_request *req = make_batch_req(rt, "m", rows);

    assert_int_equal(keel_model_stats_get(rt, "m", &a), KEEL_OK);
    assert_int_equal(keel_infer_submit_ex(req, flags, tally_cb, &t), KEEL_OK);
    wait_calls(&t, 1);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 1);
    assert_int_equal(keel_model_stats_get(rt, "m", &b), KEEL_OK);
    assert_int_equal((b.runs_inline - a.runs_inline) + (b.runs_handed_off - a.runs_handed_off), 1);
    return b.runs_inline == a.runs_inline + 1;
}

/* A run of the mock takes microseconds, but a loaded machine may stretch one sample past the
 * bound: true if one of 50 submits ran here. */
static bool soon_inline(keel_runtime *rt, int64_t rows)
{
    for (int i = 0; i < 50; i++) {
        if (submit_where(rt, KEEL_SUBMIT_RUN_IF_FAST, rows))
            return true;
    }
    return false;
}

/* KEEL_SUBMIT_RUN_IF_FAST: an unmeasured batch size is handed off, a measured fast one runs
 * here, a model that turned slow is handed off again, preprocessing aside. */
static void test_submit_run_if_fast(void **state)
{
    fixture *f = *state;

    /* The fixture's model batches (dynamic_batching): it is never "fast", its requests are
     * queued to be batched. */
    for (int i = 0; i < 20; i++)
        assert_false(submit_where(f->rt, KEEL_SUBMIT_RUN_IF_FAST, 1));
    /* The same model without dynamic_batching. */
    mock_write_model_batching(f->repo, "m", 1, 8, NULL);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
    assert_false(submit_where(f->rt, KEEL_SUBMIT_RUN_IF_FAST, 1)); /* not measured yet */
    assert_true(soon_inline(f->rt, 1));                            /* measured: a few us */
    assert_false(submit_where(f->rt, KEEL_SUBMIT_RUN_IF_FAST, 4)); /* another size class */
    assert_true(soon_inline(f->rt, 5));                            /* 4-7: measured now */
    assert_false(submit_where(f->rt, 0, 1));                       /* no flag: handed off */
    assert_true(submit_where(f->rt, KEEL_SUBMIT_RUN_HERE, 1));

    /* The model turns slow (5 ms a run): one run measured (forced here) is enough. */
    mock_set_run_us(5000);
    assert_true(submit_where(f->rt, KEEL_SUBMIT_RUN_HERE, 1));
    for (int i = 0; i < 3; i++)
        assert_false(submit_where(f->rt, KEEL_SUBMIT_RUN_IF_FAST, 1));
    /* Fast again: the handed-off runs bring the estimate back down. */
    mock_set_run_us(0);
    assert_true(soon_inline(f->rt, 1));

    /* A queued request is never overtaken: with the only context held and one request
     * queued behind it, a fast request queues too. */
    tally t = {0};
    keel_request *held = make_req(f->rt, "m", 1.0f);
    keel_request *queued = make_req(f->rt, "m", 1.0f);
    keel_request *fast = make_req(f->rt, "m", 1.0f);
    mock_gate_close();
    assert_int_equal(keel_infer_submit(held, tally_cb, &t), KEEL_OK);
    mock_wait_blocked(1);
    assert_int_equal(keel_infer_submit(queued, tally_cb, &t), KEEL_OK);
    assert_int_equal(keel_infer_submit_ex(fast, KEEL_SUBMIT_RUN_IF_FAST, tally_cb, &t), KEEL_OK);
    assert_int_equal(atomic_load(&t.calls), 0);
    mock_gate_open();
    wait_calls(&t, 3);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 3);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* inline_max_us 0: no model is fast. */
static void test_run_if_fast_bound_zero(void **state)
{
    fixture *f = *state;
    keel_runtime_opts o;

    keel_runtime_destroy(f->rt);
    keel_runtime_opts_init(&o);
    assert_int_equal(o.inline_max_us, 200);
    o.model_repository = f->repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 2;
    o.inline_max_us = 0;
    assert_int_equal(keel_runtime_create(&o, &f->rt), KEEL_OK);
    assert_int_equal(keel__runtime_add_backend(f->rt, &mock_backend), KEEL_OK);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
    for (int i = 0; i < 3; i++)
        assert_false(submit_where(f->rt, KEEL_SUBMIT_RUN_IF_FAST, 1));
    assert_true(submit_where(f->rt, KEEL_SUBMIT_RUN_HERE, 1));
}

/* keel_request_add_input_owned takes the buffer on KEEL_OK, leaves it with the caller on an
 * error (ASan reports a leak or a double free otherwise). */
static void test_add_input_owned(void **state)
{
    fixture *f = *state;
    keel_request *req = NULL;
    int64_t shape[2] = {1, 2}, bad[2] = {1, 3};
    float *x = malloc(2 * sizeof(float));

    assert_non_null(x);
    x[0] = 3.0f;
    x[1] = 4.0f;
    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_request_add_input_owned(req, "x", KEEL_TYPE_FP32, bad, 2, x, 8),
                     KEEL_EINVAL); /* 3 elements need 12 bytes: x is still ours */
    x[1] = 5.0f;
    assert_int_equal(keel_request_add_input_owned(req, "x", KEEL_TYPE_FP32, shape, 2, x, 8),
                     KEEL_OK);
    x = NULL; /* the request's now */
    assert_int_equal(keel_infer(req), KEEL_OK);
    keel_tensor_view v;
    assert_int_equal(keel_request_output_by_name(req, "y", &v), KEEL_OK);
    assert_int_equal(v.bytes, 2 * sizeof(float));
    assert_true(((const float *)v.data)[0] == 6.0f && ((const float *)v.data)[1] == 10.0f);
    keel_request_destroy(req);
}

static void test_bad_inputs_then_good(void **state)
{
    fixture *f = *state;
    keel_request *req = NULL;
    int64_t shape[2] = {1, 2};
    float two[2] = {1, 2};
    double d = 1;

    /* Structural errors are refused when added. */
    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, two, 4),
                     KEEL_EINVAL);
    assert_non_null(strstr(keel_request_error(req), "'x'"));
    int64_t neg[2] = {1, -3};
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, neg, 2, two, 8), KEEL_EINVAL);
    int64_t huge[3] = {INT64_MAX, INT64_MAX, 2};
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, huge, 3, two, 8),
                     KEEL_EINVAL);
    unsigned char badbytes[5] = {9, 0, 0, 0, 'a'};
    int64_t one = 1;
    assert_int_equal(keel_request_add_input(req, "s", KEEL_TYPE_BYTES, &one, 1, badbytes, 5),
                     KEEL_EINVAL);
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, two, 8), KEEL_OK);
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, two, 8),
                     KEEL_EINVAL);
    assert_non_null(strstr(keel_request_error(req), "more than once"));
    keel_request_destroy(req);

    /* Model-level errors are answered through completion with a message. */
    struct {
        const char *name;
        keel_datatype dt;
        int64_t shape[3];
        size_t ndim;
        const void *data;
        size_t bytes;
        const char *expect;
    } cases[] = {
        {"x", KEEL_TYPE_FP64, {1, 1}, 2, &d, 8, "datatype FP64"},
        {"x", KEEL_TYPE_FP32, {2}, 1, two, 8, "shape [2]"},
        {"x", KEEL_TYPE_FP32, {9, 1}, 2, NULL, 0, "batch size 9"},
        {"z", KEEL_TYPE_FP32, {1, 2}, 2, two, 8, "unexpected input 'z'"},
    };
    float nine[9] = {0};
    cases[2].data = nine;
    cases[2].bytes = sizeof(nine);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
        assert_int_equal(keel_request_add_input(req, cases[i].name, cases[i].dt, cases[i].shape,
                                                cases[i].ndim, cases[i].data, cases[i].bytes),
                         KEEL_OK);
        assert_int_equal(keel_infer(req), KEEL_EINVAL);
        if (strstr(keel_request_error(req), cases[i].expect) == NULL)
            fail_msg("case %zu: message '%s' lacks '%s'", i, keel_request_error(req),
                     cases[i].expect);
        keel_request_destroy(req);
    }
    req = make_req(f->rt, "m", 1.0f);
    assert_int_equal(keel_request_add_output(req, "nope"), KEEL_OK);
    assert_int_equal(keel_infer(req), KEEL_EINVAL);
    assert_non_null(strstr(keel_request_error(req), "unknown output 'nope'"));
    keel_request_destroy(req);
    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_infer(req), KEEL_EINVAL);
    assert_non_null(strstr(keel_request_error(req), "missing input 'x'"));
    keel_request_destroy(req);

    /* Unknown model / version. */
    req = make_req(f->rt, "nosuch", 1.0f);
    assert_int_equal(keel_infer(req), KEEL_ENOTFOUND);
    keel_request_destroy(req);
    assert_int_equal(keel_request_create(f->rt, "m", 7, &req), KEEL_OK);
    assert_int_equal(keel_infer(req), KEEL_ENOTFOUND);
    assert_non_null(strstr(keel_request_error(req), "no version 7"));
    keel_request_destroy(req);

    /* And the next good request succeeds. */
    req = make_req(f->rt, "m", 4.0f);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_true(output0(req) == 8.0f);
    keel_request_destroy(req);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* A request holding a context on generation N while two swaps happen finishes normally; its
 * context is destroyed, never reused; the next request runs on N+2; N's model is freed once. */
static void test_return_after_swap(void **state)
{
    fixture *f = *state;
    keel_request *held = make_req(f->rt, "m", 1.0f);
    keel_request *next;
    tally t = {0};
    uint64_t n = current_gen(f->rt, "m");
    long held_ctx, model_n = mock_last_model_id(); /* the model of generation N */

    mock_gate_close();
    assert_int_equal(keel_infer_submit(held, tally_cb, &t), KEEL_OK);
    mock_wait_blocked(1);
    held_ctx = mock_ctx_id_of_last_run();

    mock_write_version(f->repo, "m", 1, 3.0);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
    mock_write_version(f->repo, "m", 1, 5.0);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
    assert_true(current_gen(f->rt, "m") == n + 2);

    /* N is retired but alive: the held request keeps it. */
    keel_counters c;
    keel_runtime_quiesce(f->rt);
    keel_counters_get(f->rt, &c);
    assert_int_equal(c.generations, 2);
    assert_int_equal(mock_model_free_count(model_n), 0);
    assert_false(mock_ctx_destroyed(held_ctx));

    mock_gate_open();
    wait_calls(&t, 1);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 1);
    keel_runtime_quiesce(f->rt);
    assert_true(mock_ctx_destroyed(held_ctx));
    assert_int_equal(mock_model_free_count(model_n), 1);

    next = make_req(f->rt, "m", 1.0f);
    assert_int_equal(keel_infer(next), KEEL_OK);
    assert_true(keel_request_generation_id(next) == n + 2);
    assert_true(output0(next) == 5.0f);
    assert_true(mock_ctx_id_of_last_run() != held_ctx);
    keel_request_destroy(next);
    tu_assert_counters(f->rt, &idle_one_gen);
    assert_int_equal(mock_model_free_count(model_n), 1);
}

/* Full queue answers EUNAVAILABLE at once; expired requests never reach the backend. */
static void test_overload_and_deadline(void **state)
{
    fixture *f = *state;
    keel_request *reqs[5];
    tally t = {0};
    long runs0;

    /* max_queue_size is 4: the 5th concurrent request is refused without blocking. */
    mock_gate_close();
    for (int i = 0; i < 4; i++) {
        reqs[i] = make_req(f->rt, "m", 1.0f);
        assert_int_equal(keel_infer_submit(reqs[i], tally_cb, &t), KEEL_OK);
    }
    mock_wait_blocked(1);
    reqs[4] = make_req(f->rt, "m", 1.0f);
    assert_int_equal(keel_infer_submit(reqs[4], tally_cb, &t), KEEL_EUNAVAILABLE);
    assert_non_null(strstr(keel_request_error(reqs[4]), "queue full"));
    assert_int_equal(keel_infer(reqs[4]), KEEL_EUNAVAILABLE); /* sync is refused too */
    mock_gate_open();
    wait_calls(&t, 4);
    assert_int_equal(keel_infer(reqs[4]), KEEL_OK); /* slots came back */
    keel_request_destroy(reqs[4]);

    /* Deadline: hold the only context, queue a request with a 1 ms timeout, wait past it. */
    memset(&t, 0, sizeof(t));
    mock_gate_close();
    reqs[0] = make_req(f->rt, "m", 1.0f);
    assert_int_equal(keel_infer_submit(reqs[0], tally_cb, &t), KEEL_OK);
    mock_wait_blocked(1);
    runs0 = atomic_load(&mock.runs);
    reqs[1] = make_req(f->rt, "m", 1.0f);
    keel_request_set_timeout_us(reqs[1], 1000);
    assert_int_equal(keel_infer_submit(reqs[1], tally_cb, &t), KEEL_OK);
    usleep(20000);
    mock_gate_open();
    wait_calls(&t, 2);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 1);
    assert_int_equal(atomic_load(&t.by_status[KEEL_ETIMEDOUT]), 1);
    assert_int_equal(atomic_load(&mock.runs), runs0); /* the expired one never ran */

    /* A huge timeout means no deadline: queued behind a held run, it must not wrap around
     * into an already expired deadline. */
    memset(&t, 0, sizeof(t));
    mock_gate_close();
    reqs[0] = make_req(f->rt, "m", 1.0f);
    assert_int_equal(keel_infer_submit(reqs[0], tally_cb, &t), KEEL_OK);
    mock_wait_blocked(1);
    reqs[1] = make_req(f->rt, "m", 1.0f);
    keel_request_set_timeout_us(reqs[1], UINT64_MAX);
    assert_int_equal(keel_infer_submit(reqs[1], tally_cb, &t), KEEL_OK);
    mock_gate_open();
    wait_calls(&t, 2);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 2);
    keel_model_stats st;
    assert_int_equal(keel_model_stats_get(f->rt, "m", &st), KEEL_OK);
    assert_int_equal(st.failure[KEEL_ETIMEDOUT], 1);
    assert_int_equal(st.rejected, 2);
    tu_assert_counters(f->rt, &idle_one_gen);
}

static void test_cancel(void **state)
{
    fixture *f = *state;
    keel_request *running = make_req(f->rt, "m", 1.0f);
    keel_request *queued = make_req(f->rt, "m", 1.0f);
    keel_request *idle = make_req(f->rt, "m", 1.0f);
    tally t = {0};

    assert_int_equal(keel_request_cancel(idle), KEEL_EINVAL);
    keel_request_destroy(idle);
    mock_gate_close();
    assert_int_equal(keel_infer_submit(running, tally_cb, &t), KEEL_OK);
    mock_wait_blocked(1);
    assert_int_equal(keel_infer_submit(queued, tally_cb, &t), KEEL_OK);
    assert_int_equal(keel_infer_submit(queued, tally_cb, &t), KEEL_EBUSY);
    assert_int_equal(keel_request_cancel(queued), KEEL_OK); /* callback ran already */
    assert_int_equal(atomic_load(&t.by_status[KEEL_ECANCELED]), 1);
    assert_int_equal(keel_request_cancel(running), KEEL_OK);
    mock_gate_open();
    wait_calls(&t, 2);
    assert_int_equal(atomic_load(&t.by_status[KEEL_ECANCELED]), 2);
    wait_unstuck(f->rt); /* answered before its backend call returned */
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* Opens the gate once the two queued requests were answered SHUTDOWN (or after 5 s), so the
 * outcome of each request is fixed: the running one completes OK, the queued ones never run. */
typedef struct shutdown_opener {
    tally *t;
    _Atomic long shutdown_seen; /* ESHUTDOWN answers when the gate opened */
} shutdown_opener;

static void *open_gate_after_shutdown(void *arg)
{
    shutdown_opener *o = arg;

    for (int ms = 0; ms < 5000 && atomic_load(&o->t->by_status[KEEL_ESHUTDOWN]) < 2; ms++)
        usleep(1000);
    atomic_store(&o->shutdown_seen, atomic_load(&o->t->by_status[KEEL_ESHUTDOWN]));
    mock_gate_open();
    return NULL;
}

/* Unloading answers queued requests; destroying the runtime answers queued ones SHUTDOWN and
 * lets running ones finish. */
static void test_unload_and_shutdown_with_queue(void **state)
{
    fixture *f = *state;
    tally t = {0};
    keel_request *r[3];

    mock_gate_close();
    for (int i = 0; i < 3; i++) {
        r[i] = make_req(f->rt, "m", 1.0f);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
        if (i == 0)
            mock_wait_blocked(1); /* the first runs alone; the others queue behind it */
    }
    assert_int_equal(keel_model_unload(f->rt, "m"), KEEL_OK);
    assert_int_equal(atomic_load(&t.by_status[KEEL_EUNAVAILABLE]), 2);
    assert_false(keel_model_is_ready(f->rt, "m", -1));
    keel_request *late = make_req(f->rt, "m", 1.0f);
    assert_int_equal(keel_infer(late), KEEL_EUNAVAILABLE);
    mock_gate_open();
    wait_calls(&t, 3);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 1);
    keel_counters zero = {1, 0, 0, 0, 0, 0, 0}; /* 'late' still exists */
    tu_assert_counters(f->rt, &zero);
    keel_request_destroy(late);

    /* Reload, queue work behind a held run, destroy the runtime. */
    memset(&t, 0, sizeof(t));
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
    mock_gate_close();
    for (int i = 0; i < 3; i++) {
        r[i] = make_req(f->rt, "m", 1.0f);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
        if (i == 0)
            mock_wait_blocked(1); /* the first runs alone; the others queue behind it */
    }
    /* Open the gate from another thread while destroy waits for the running request, once
     * destroy has answered the queued ones: each request's outcome is then known. */
    pthread_t opener;
    shutdown_opener so = {.t = &t};
    assert_int_equal(pthread_create(&opener, NULL, open_gate_after_shutdown, &so), 0);
    keel_runtime_destroy(f->rt);
    pthread_join(opener, NULL);
    f->rt = start_runtime(f->repo, 2); /* for teardown */
    assert_int_equal(atomic_load(&t.calls), 3);
    /* The queued two were answered before the gate opened, the running one after. */
    assert_int_equal(atomic_load(&so.shutdown_seen), 2);
    assert_int_equal(atomic_load(&t.by_status[KEEL_ESHUTDOWN]), 2);
    assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 1);
}

/* A failed reload keeps the old generation serving and records the error. */
static void test_failed_reload_keeps_old(void **state)
{
    fixture *f = *state;
    keel_request *req;
    keel_model_status *st = NULL;
    size_t n = 0;
    char err[512];
    uint64_t gen = current_gen(f->rt, "m");

    char *path = tu_strf("%s/m/1/model.txt", f->repo);
    tu_write_file(path, "garbage", (size_t)-1);
    free(path);
    assert_int_equal(keel_model_load(f->rt, "m", err, sizeof(err)), KEEL_ELOAD);
    assert_non_null(strstr(err, "model.txt"));
    req = make_req(f->rt, "m", 1.0f);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_true(output0(req) == 2.0f);
    assert_true(keel_request_generation_id(req) == gen);
    keel_request_destroy(req);
    assert_int_equal(keel_model_list(f->rt, &st, &n), KEEL_OK);
    assert_int_equal(n, 1);
    assert_int_equal(st[0].state, KEEL_MODEL_READY);
    assert_int_equal(st[0].last_error, KEEL_ELOAD);
    assert_non_null(strstr(st[0].last_error_msg, "not a number"));
    keel_model_status_free(st, n);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* ---- error-path accounting: each fault point armed in turn */

#ifdef KEEL_FAULT_INJECTION
typedef struct fault_run {
    keel_runtime *rt;
    const char *repo;
    tally t;
    long submitted_ok;
} fault_run;

static void run_faulted_traffic(fault_run *fr, bool sync, int nreq)
{
    for (int i = 0; i < nreq; i++) {
        keel_request *req = NULL;
        float x = 1.0f;
        int64_t shape[2] = {1, 1};
        if (i % 100 == 50) /* reloads exercise the load-time fault points */
            (void)keel_model_load(fr->rt, "m", NULL, 0);
        if (keel_request_create(fr->rt, "m", -1, &req) != KEEL_OK)
            continue; /* injected allocation failure */
        if (keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, &x, sizeof(x)) != KEEL_OK) {
            keel_request_destroy(req);
            continue;
        }
        if (sync) {
            keel_err err = keel_infer(req);
            if (err == KEEL_OK)
                assert_true(output0(req) == 2.0f);
            keel_request_destroy(req);
        } else {
            /* Stay under the queue bound so submits reach the submit fault point. */
            for (int w = 0; w < 100000 && fr->submitted_ok - atomic_load(&fr->t.calls) >= 4; w++)
                usleep(20);
            if (keel_infer_submit(req, tally_cb, &fr->t) == KEEL_OK)
                fr->submitted_ok++;
            else
                keel_request_destroy(req);
        }
    }
}

#endif

static void test_fault_points(void **state)
{
#ifdef KEEL_FAULT_INJECTION
    fixture *f = *state;

    for (int p = 0; p < KEEL__FAULT_COUNT_; p++) {
        for (int sync = 0; sync < 2; sync++) {
            fault_run fr = {.rt = f->rt, .repo = f->repo};
            keel__fault_arm_prob((keel__fault_point)p, 0.2, 1234 + (uint64_t)p);
            run_faulted_traffic(&fr, sync != 0, 1000);
            if (!sync)
                wait_calls(&fr.t, fr.submitted_ok);
            keel__fault_disarm_all();
            if (keel__fault_fired((keel__fault_point)p) == 0)
                fail_msg("fault point %s never fired", keel__fault_name((keel__fault_point)p));
            /* Every accepted async request completed exactly once, and was freed. */
            assert_int_equal(atomic_load(&fr.t.calls), fr.submitted_ok);
            assert_int_equal(atomic_load(&fr.t.destroyed), fr.submitted_ok);
            /* The model is still loaded (a failed reload keeps the old generation). */
            assert_true(keel_model_is_ready(f->rt, "m", -1));
            tu_assert_counters(f->rt, &idle_one_gen);

            /* No slot lost: max_queue_size (4) concurrent requests are accepted, a 5th not. */
            tally t = {0};
            mock_gate_close();
            for (int i = 0; i < 4; i++) {
                keel_request *req = make_req(f->rt, "m", 1.0f);
                assert_int_equal(keel_infer_submit(req, tally_cb, &t), KEEL_OK);
            }
            keel_request *extra = make_req(f->rt, "m", 1.0f);
            assert_int_equal(keel_infer_submit(extra, tally_cb, &t), KEEL_EUNAVAILABLE);
            keel_request_destroy(extra);
            mock_gate_open();
            wait_calls(&t, 4);
            assert_int_equal(atomic_load(&t.by_status[KEEL_OK]), 4);
            tu_assert_counters(f->rt, &idle_one_gen);
        }
    }
#else
    (void)state;
    skip();
#endif
}

/* ---- 1,000 load/unload cycles of several models */

static void test_load_unload_cycles(void **state)
{
    fixture *f = *state;
    const char *names[3] = {"a", "b", "c"};
    keel_counters base;
    int fds0;

    for (int i = 0; i < 3; i++) {
        mock_write_model(f->repo, names[i], 2, 8, 0);
        mock_write_version(f->repo, names[i], 1, 1.0 + i);
        mock_write_version(f->repo, names[i], 2, 10.0 + i);
    }
    keel_runtime_quiesce(f->rt);
    keel_counters_get(f->rt, &base);
    fds0 = tu_count_fds();
    for (int cycle = 0; cycle < 1000; cycle++) {
        const char *name = names[cycle % 3];
        assert_int_equal(keel_model_load(f->rt, name, NULL, 0), KEEL_OK);
        if (cycle % 10 == 0) {
            keel_request *req = make_req(f->rt, name, 1.0f);
            assert_int_equal(keel_infer(req), KEEL_OK);
            assert_true(output0(req) == (float)(10.0 + cycle % 3)); /* latest version (2) */
            keel_request_destroy(req);
        }
        assert_int_equal(keel_model_unload(f->rt, name), KEEL_OK);
    }
    tu_assert_counters(f->rt, &base);
    assert_int_equal(tu_count_fds(), fds0);
    for (int i = 0; i < 3; i++) {
        keel_counters c;
        assert_int_equal(keel_model_counters_get(f->rt, names[i], &c), KEEL_OK);
        assert_int_equal(c.generations, 0);
        assert_int_equal(c.contexts, 0);
        assert_int_equal(c.leases, 0);
    }
}

/* Versions: latest-N serves several; a request picks one; unknown one is NOTFOUND. */
static void test_versions(void **state)
{
    fixture *f = *state;
    keel_request *req = NULL;
    float x = 1.0f;
    int64_t shape[2] = {1, 1};
    char *cfg = tu_strf("%s/v/config.json", f->repo);

    tu_write_file(cfg,
                  "{\"backend\":\"mock\",\"max_batch_size\":8,"
                  "\"input\":[{\"name\":\"x\",\"data_type\":\"TYPE_FP32\",\"dims\":[-1]}],"
                  "\"output\":[{\"name\":\"y\",\"data_type\":\"TYPE_FP32\",\"dims\":[-1]}],"
                  "\"version_policy\":{\"latest\":{\"num_versions\":2}}}",
                  (size_t)-1);
    free(cfg);
    mock_write_version(f->repo, "v", 1, 1.0);
    mock_write_version(f->repo, "v", 2, 2.0);
    mock_write_version(f->repo, "v", 3, 3.0);
    assert_int_equal(keel_model_load(f->rt, "v", NULL, 0), KEEL_OK);
    for (int64_t v = 1; v <= 3; v++) {
        assert_int_equal(keel_request_create(f->rt, "v", v, &req), KEEL_OK);
        assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, &x, 4),
                         KEEL_OK);
        assert_int_equal(keel_infer(req), v == 1 ? KEEL_ENOTFOUND : KEEL_OK);
        if (v > 1) {
            assert_true(output0(req) == (float)v);
            assert_int_equal(keel_request_model_version(req), v);
        }
        keel_request_destroy(req);
    }
    req = make_req(f->rt, "v", 1.0f);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_request_model_version(req), 3);
    keel_request_destroy(req);
    char *json = NULL;
    assert_int_equal(keel_model_config_json(f->rt, "v", &json), KEEL_OK);
    assert_non_null(strstr(json, "\"mock\""));
    free(json);
    assert_int_equal(keel_model_unload(f->rt, "v"), KEEL_OK);
}

typedef struct outcome {
    _Atomic int done;
    keel_err status;
    int64_t version;
    float y;
} outcome;

static void outcome_cb(keel_request *req, keel_err status, void *user)
{
    outcome *o = user;
    keel_tensor_view v;

    o->status = status;
    o->version = keel_request_model_version(req);
    if (status == KEEL_OK && keel_request_output_by_name(req, "y", &v) == KEEL_OK)
        o->y = *(const float *)v.data;
    keel_request_destroy(req);
    atomic_store(&o->done, 1);
}

/* A new version that replaces the only one (version policy latest 1): requests queued for
 * "the newest version" are answered by the new one, not failed; a request queued for the old
 * version by number gets KEEL_EUNAVAILABLE; the running one finishes on the old version. */
static void test_version_change_keeps_queued_latest(void **state)
{
    fixture *f = *state;
    outcome o[4];
    keel_request *req;
    float x = 1.0f;
    int64_t shape[2] = {1, 1};

    memset(o, 0, sizeof(o));
    mock_gate_close();
    for (int i = 0; i < 4; i++) {
        assert_int_equal(keel_request_create(f->rt, "m", i == 3 ? 1 : -1, &req), KEEL_OK);
        assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, &x, 4),
                         KEEL_OK);
        assert_int_equal(keel_infer_submit(req, outcome_cb, &o[i]), KEEL_OK);
        if (i == 0)
            mock_wait_blocked(1); /* the first runs (and waits at the gate); the rest queue */
    }
    mock_write_version(f->repo, "m", 2, 5.0);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK); /* version 1 leaves */
    assert_false(keel_model_is_ready(f->rt, "m", 1));
    mock_gate_open();
    for (int i = 0; i < 4; i++) {
        for (int k = 0; k < 20000 && !atomic_load(&o[i].done); k++) {
            struct timespec ts = {0, 500000};
            nanosleep(&ts, NULL);
        }
        assert_true(atomic_load(&o[i].done));
    }
    assert_int_equal(o[0].status, KEEL_OK);
    assert_int_equal(o[0].version, 1);
    assert_true(o[0].y == 2.0f);
    for (int i = 1; i < 3; i++) {
        assert_int_equal(o[i].status, KEEL_OK);
        assert_int_equal(o[i].version, 2);
        assert_true(o[i].y == 5.0f);
    }
    assert_int_equal(o[3].status, KEEL_EUNAVAILABLE);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* Datatype names: KServe's ("FP32"), Triton's config names ("TYPE_FP32", "TYPE_STRING" for
 * BYTES, and "TYPE_BYTES"), and nothing else (case, prefixes, INVALID). */
static void test_datatype_names(void **state)
{
    (void)state;
    for (int i = 1; i < KEEL_TYPE_COUNT_; i++) {
        keel_datatype dt = (keel_datatype)i;
        char triton[32];
        assert_int_equal(keel_datatype_from_name(keel_datatype_name(dt)), dt);
        snprintf(triton, sizeof(triton), "TYPE_%s",
                 dt == KEEL_TYPE_BYTES ? "STRING" : keel_datatype_name(dt));
        assert_int_equal(keel_datatype_from_name(triton), dt);
    }
    assert_int_equal(keel_datatype_from_name("TYPE_BYTES"), KEEL_TYPE_BYTES);
    assert_int_equal(keel_datatype_from_name("FP3"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name("FP322"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name("fp32"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name("STRING"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name("TYPE_"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name("TYPE_TYPE_FP32"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name("INVALID"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name("TYPE_INVALID"), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name(""), KEEL_TYPE_INVALID);
    assert_int_equal(keel_datatype_from_name(NULL), KEEL_TYPE_INVALID);
}

/* ---- deadlines and cancel while the backend runs (issue 14, item 2) */

/* One answer, recorded by its callback (which leaves the request to the test). */
typedef struct probe {
    _Atomic int done;
    keel_err status;
    uint64_t t_ns;
    char msg[512];
} probe;

static uint64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void probe_cb(keel_request *req, keel_err status, void *user)
{
    probe *p = user;

    p->status = status;
    p->t_ns = mono_ns();
    snprintf(p->msg, sizeof(p->msg), "%s", keel_request_error(req));
    atomic_store(&p->done, 1); /* last: the test may destroy req from here on */
}

/* Waits up to ms for the answer; whether it came. */
static bool probe_wait(probe *p, int ms)
{
    for (int i = 0; i < ms * 2 && !atomic_load(&p->done); i++)
        usleep(500);
    return atomic_load(&p->done) != 0;
}

static void submit_probe(keel_request *req, probe *p)
{
    assert_int_equal(keel_infer_submit(req, probe_cb, p), KEEL_OK);
}

static keel_counters model_counters(keel_runtime *rt, const char *model)
{
    keel_counters c;

    assert_int_equal(keel_model_counters_get(rt, model, &c), KEEL_OK);
    return c;
}

/* A request whose deadline passes while its backend call hangs is answered at the deadline;
 * its admission slot comes back at once, its context stays out of use (stuck, the model not
 * ready) until the backend returns, and then serves again. */
static void test_deadline_while_running(void **state)
{
    fixture *f = *state;
    const keel_counters idle2 = {0, 0, 0, 2, 2, 0, 0};
    keel_request *r1, *r2;
    probe p1 = {0}, p2 = {0};
    keel_counters c;
    uint64_t t0;

    /* "one": one context and a queue of one request (the running one holds it). */
    mock_write_model(f->repo, "one", 1, 1, 0);
    mock_write_version(f->repo, "one", 1, 3.0);
    assert_int_equal(keel_model_load(f->rt, "one", NULL, 0), KEEL_OK);
    r1 = make_req(f->rt, "one", 1.0f);
    r2 = make_req(f->rt, "one", 2.0f);
    mock_gate_close();
    keel_request_set_timeout_us(r1, 200000);
    t0 = mono_ns();
    submit_probe(r1, &p1);
    mock_wait_blocked(1);
    assert_true(probe_wait(&p1, 5000));
    assert_int_equal(p1.status, KEEL_ETIMEDOUT);
    assert_non_null(strstr(p1.msg, "while running"));
    assert_true(p1.t_ns - t0 >= 200000000u);
    assert_true(p1.t_ns - t0 < 1500000000u); /* at the deadline, not when the backend returns */
    /* The backend still has it: its inputs went with the run (the request keeps none). */
    assert_int_equal(keel__request_input_count(r1), 0);
    c = model_counters(f->rt, "one");
    assert_int_equal(c.contexts_stuck, 1);
    assert_int_equal(c.contexts_in_use, 1);
    assert_int_equal(c.leases, 0);
    assert_false(keel_model_is_ready(f->rt, "one", -1));
    assert_true(keel_model_is_ready(f->rt, "m", -1));
    /* Its slot came back: the queue of one admits another request, which waits. */
    submit_probe(r2, &p2);
    keel_request_destroy(r1); /* while the backend still reads what was its input */
    usleep(20000);
    assert_false(atomic_load(&p2.done));
    mock_gate_open();
    assert_true(probe_wait(&p2, 5000));
    assert_int_equal(p2.status, KEEL_OK);
    assert_true(output0(r2) == 6.0f);
    keel_request_destroy(r2);
    tu_assert_counters(f->rt, &idle2);
    assert_true(keel_model_is_ready(f->rt, "one", -1));
    c = model_counters(f->rt, "one");
    assert_int_equal(c.contexts_stuck, 0);
}

/* ---- borrowed inputs (keel_request_add_input_borrowed: keel serve's binary tensors) */

typedef struct lend {
    _Atomic int released;
    float x[2];
} lend;

static void lend_release(void *arg)
{
    atomic_fetch_add(&((lend *)arg)->released, 1);
}

/* The request reads the caller's buffer in place and hands it back exactly once, at destroy;
 * a refused add leaves it with the caller (no release). */
static void test_add_input_borrowed(void **state)
{
    fixture *f = *state;
    keel_request *req = NULL;
    int64_t shape[2] = {1, 2}, bad[2] = {1, 3};
    lend l = {0, {3.0f, 5.0f}};
    keel_tensor_view v;

    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(
        keel_request_add_input_borrowed(req, "x", KEEL_TYPE_FP32, bad, 2, l.x, 8, lend_release, &l),
        KEEL_EINVAL); /* 3 elements need 12 bytes */
    assert_int_equal(
        keel_request_add_input_borrowed(req, "x", KEEL_TYPE_FP32, shape, 2, l.x, 8, NULL, &l),
        KEEL_EINVAL); /* no release function */
    assert_int_equal(atomic_load(&l.released), 0);
    assert_int_equal(keel_request_add_input_borrowed(req, "x", KEEL_TYPE_FP32, shape, 2, l.x, 8,
                                                     lend_release, &l),
                     KEEL_OK);
    assert_int_equal(keel__request_input(req, 0, &v), KEEL_OK);
    assert_ptr_equal(v.data, l.x); /* read in place, not copied */
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_request_output_by_name(req, "y", &v), KEEL_OK);
    assert_int_equal(v.bytes, 2 * sizeof(float));
    assert_true(((const float *)v.data)[0] == 6.0f && ((const float *)v.data)[1] == 10.0f);
    assert_int_equal(atomic_load(&l.released), 0); /* still the request's input */
    keel_request_destroy(req);
    assert_int_equal(atomic_load(&l.released), 1);
}

/* Outputs are recycled (request.c's DESIGN): a resubmitted request gets its new outputs in
 * the buffers of its last run, and outputs of another count, name, shape or size are
 * written right over the kept ones. */
static void check_output(const keel_request *req, size_t i, const char *name, size_t ndim,
                         const int64_t *shape, const float *want, size_t n)
{
    keel_tensor_view v;

    assert_int_equal(keel_request_output(req, i, &v), KEEL_OK);
    assert_string_equal(v.name, name);
    assert_int_equal(v.datatype, KEEL_TYPE_FP32);
    assert_int_equal(v.ndim, ndim);
    for (size_t d = 0; d < ndim; d++)
        assert_int_equal(v.shape[d], shape[d]);
    assert_int_equal(v.bytes, n * sizeof(float));
    assert_memory_equal(v.data, want, n * sizeof(float));
}

static keel_tensor_view out_view(const char *name, const int64_t *shape, size_t ndim,
                                 const float *x, size_t n)
{
    keel_tensor_view v = {name, KEEL_TYPE_FP32, shape, ndim, x, n * sizeof(float)};
    return v;
}

static void test_outputs_recycled(void **state)
{
    fixture *f = *state;
    keel_request *req = make_req(f->rt, "m", 3.0f);
    const float six = 6.0f, nine = 9.0f, big[6] = {1, 2, 3, 4, 5, 6};
    const int64_t s11[2] = {1, 1}, s23[2] = {2, 3}, s1[1] = {1};
    keel_tensor_view v, one, two[2];
    const void *first;

    assert_int_equal(keel_infer(req), KEEL_OK);
    check_output(req, 0, "y", 2, s11, &six, 1);
    assert_int_equal(keel_request_output(req, 0, &v), KEEL_OK);
    first = v.data;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(keel_infer(req), KEEL_OK);
        assert_int_equal(keel_request_output_count(req), 1);
        check_output(req, 0, "y", 2, s11, &six, 1);
        assert_int_equal(keel_request_output(req, 0, &v), KEEL_OK);
        assert_ptr_equal(v.data, first); /* the kept buffer, not a new one */
    }

    /* Runs emitting other outputs, the way a backend's emit does: more of them, another
     * name first, a larger shape and size; then fewer and smaller again. */
    two[0] = out_view("z", s1, 1, &nine, 1);
    two[1] = out_view("y", s23, 2, big, 6);
    assert_int_equal(keel__request_emit_run(req, two, 2, false), KEEL_OK);
    assert_int_equal(keel_request_output_count(req), 2);
    check_output(req, 0, "z", 1, s1, &nine, 1);
    check_output(req, 1, "y", 2, s23, big, 6);
    one = out_view("y", s1, 1, &nine, 1);
    assert_int_equal(keel__request_emit_run(req, &one, 1, false), KEEL_OK);
    assert_int_equal(keel_request_output_count(req), 1);
    check_output(req, 0, "y", 1, s1, &nine, 1);
    assert_int_equal(keel_request_output_by_name(req, "z", &v), KEEL_ENOTFOUND);

    /* A run whose request was answered while it ran frees what its slot kept (the sanitizer
     * builds check the frees); the request starts over with new buffers. */
    assert_int_equal(keel__request_emit_run(req, two, 2, true), KEEL_OK);
    assert_int_equal(keel_request_output_count(req), 0);
    assert_int_equal(keel_infer(req), KEEL_OK);
    check_output(req, 0, "y", 2, s11, &six, 1);
    keel_request_destroy(req);
}

/* A request answered at its deadline while its backend call still runs gives its borrowed
 * input to the run: the buffer is released once, when the backend returns, not at the answer
 * nor at the request's destroy. */
static void test_borrowed_input_outlives_detached_request(void **state)
{
    fixture *f = *state;
    const keel_counters idle2 = {0, 0, 0, 2, 2, 0, 0};
    keel_request *r1 = NULL;
    int64_t shape[2] = {1, 1};
    lend l = {0, {1.0f, 0.0f}};
    probe p1 = {0};
    keel_counters c;

    mock_write_model(f->repo, "one", 1, 1, 0);
    mock_write_version(f->repo, "one", 1, 3.0);
    assert_int_equal(keel_model_load(f->rt, "one", NULL, 0), KEEL_OK);
    assert_int_equal(keel_request_create(f->rt, "one", -1, &r1), KEEL_OK);
    assert_int_equal(keel_request_add_input_borrowed(r1, "x", KEEL_TYPE_FP32, shape, 2, l.x,
                                                     sizeof(float), lend_release, &l),
                     KEEL_OK);
    mock_gate_close();
    keel_request_set_timeout_us(r1, 100000);
    submit_probe(r1, &p1);
    mock_wait_blocked(1);
    assert_true(probe_wait(&p1, 5000));
    assert_int_equal(p1.status, KEEL_ETIMEDOUT);
    keel_request_destroy(r1); /* the backend still reads l.x */
    usleep(20000);
    assert_int_equal(atomic_load(&l.released), 0);
    c = model_counters(f->rt, "one");
    assert_int_equal(c.contexts_stuck, 1);
    mock_gate_open();
    for (int i = 0; i < 10000 && atomic_load(&l.released) == 0; i++)
        usleep(500);
    assert_int_equal(atomic_load(&l.released), 1);
    tu_assert_counters(f->rt, &idle2);
}

static void *open_gate_later(void *arg)
{
    (void)arg;
    usleep(3000 * 1000);
    mock_gate_open();
    return NULL;
}

typedef struct infer_thread {
    keel_request *req;
    keel_err err;
} infer_thread;

static void *infer_in_thread(void *arg)
{
    infer_thread *t = arg;

    t->err = keel_infer(t->req);
    return NULL;
}

/* A thread that is not a worker (keel_infer's caller; a server's I/O thread) runs on the
 * context it ran on last when that one is idle, not on whichever was returned last: two
 * callers would otherwise swap contexts, and the backend's per-context state between cores,
 * on most calls (docs/PERFORMANCE.md, session 9). Thread A holds one context at the gate
 * while this thread runs on the other; A's context is then returned last. */
static void test_caller_keeps_its_context(void **state)
{
    fixture *f = *state;
    infer_thread a = {0};
    keel_request *b;
    pthread_t ta;
    long ctx_a, ctx_b;

    mock_write_model(f->repo, "m2", 2, 4, 0);
    mock_write_version(f->repo, "m2", 1, 2.0);
    assert_int_equal(keel_model_load(f->rt, "m2", NULL, 0), KEEL_OK);
    a.req = make_req(f->rt, "m2", 1.0f);
    b = make_req(f->rt, "m2", 0.0f); /* zeros pass the closed gate, like keel's warm-ups */
    mock_gate_close();
    assert_int_equal(pthread_create(&ta, NULL, infer_in_thread, &a), 0);
    mock_wait_blocked(1);
    ctx_a = mock_ctx_id_of_last_run();
    assert_int_equal(keel_infer(b), KEEL_OK);
    ctx_b = mock_ctx_id_of_last_run();
    assert_true(ctx_a != ctx_b);
    mock_gate_open();
    pthread_join(ta, NULL);
    assert_int_equal(a.err, KEEL_OK);
    assert_true(output0(a.req) == 2.0f);
    /* Both contexts idle now, A's returned last: this thread takes its own again. */
    for (int i = 0; i < 3; i++) {
        assert_int_equal(keel_infer(b), KEEL_OK);
        assert_int_equal(mock_ctx_id_of_last_run(), ctx_b);
    }
    keel_request_destroy(a.req);
    keel_request_destroy(b);
    assert_int_equal(keel_model_unload(f->rt, "m2"), KEEL_OK);
}

/* Destroys the request arg on a thread of its own; returns how many that thread then keeps. */
static void *destroy_in_thread(void *arg)
{
    keel_request_destroy(arg);
    return (void *)(uintptr_t)keel__request_cached();
}

/* A destroyed request is kept for reuse by its thread (request.c's DESIGN): the next one
 * created there starts as a new request would, whatever the last one carried. */
static void test_reused_request_starts_fresh(void **state)
{
    fixture *f = *state;
    keel_request *a = make_req(f->rt, "m", 3.0f);
    keel_request *b = NULL;
    keel_request *c;
    keel_request_timing t;
    int64_t shape[2] = {1, 1};
    int64_t shape3[3] = {1, 1, 1};
    keel_tensor_view v;
    float x = 1.0f;
    uintptr_t was_a = (uintptr_t)a;
    pthread_t t_destroy;
    void *kept = NULL;
    unsigned n0;

    assert_int_equal(keel_request_set_id(a, "first"), KEEL_OK);
    assert_int_equal(keel_request_set_parameter(a, "k", "v"), KEEL_OK);
    assert_int_equal(keel_request_add_output(a, "y"), KEEL_OK);
    assert_int_equal(keel_infer(a), KEEL_OK);
    assert_true(output0(a) == 6.0f);
    keel_request_set_timeout_us(a, 1); /* c below would (most likely) time out with it */
    keel_request_destroy(a);
    tu_assert_counters(f->rt, &idle_one_gen); /* a kept request is not a live one */

    /* Another model's request: the same object when the cache is on. */
    assert_int_equal(keel_request_create(f->rt, "nope", -1, &b), KEEL_OK);
    if (keel__request_cache_cap() > 0)
        assert_true((uintptr_t)b == was_a);
    assert_string_equal(keel_request_id(b), "");
    assert_null(keel_request_parameter(b, "k"));
    assert_string_equal(keel_request_error(b), "");
    assert_int_equal(keel_request_output_count(b), 0);
    assert_int_equal(keel__request_input_count(b), 0);
    keel_request_timing_get(b, &t);
    assert_true(t.submit_ns == 0 && t.complete_ns == 0);
    /* a's input's name and shape are kept allocations, refilled here with a longer name and
     * more dims. */
    assert_int_equal(
        keel_request_add_input(b, "a_longer_name_than_x", KEEL_TYPE_FP32, shape3, 3, &x, sizeof(x)),
        KEEL_OK);
    assert_int_equal(keel_request_add_input(b, "x", KEEL_TYPE_FP32, shape, 2, &x, sizeof(x)),
                     KEEL_OK);
    assert_int_equal(keel__request_input_count(b), 2);
    assert_int_equal(keel__request_input(b, 0, &v), KEEL_OK);
    assert_string_equal(v.name, "a_longer_name_than_x");
    assert_int_equal(v.ndim, 3);
    assert_true(v.shape[0] == 1 && v.shape[1] == 1 && v.shape[2] == 1);
    assert_true(*(const float *)v.data == 1.0f);
    /* So is the id's buffer: a longer id, then the request's own id set again. */
    assert_int_equal(keel_request_set_id(b, "an-id-longer-than-first"), KEEL_OK);
    assert_int_equal(keel_request_set_id(b, keel_request_id(b)), KEEL_OK);
    assert_string_equal(keel_request_id(b), "an-id-longer-than-first");
    assert_int_equal(keel_infer(b), KEEL_ENOTFOUND);
    assert_non_null(strstr(keel_request_error(b), "nope"));
    keel_request_destroy(b);

    /* Back to "m", no timeout: it runs, and answers from its own input. */
    c = make_req(f->rt, "m", 5.0f);
    assert_string_equal(keel_request_error(c), "");
    assert_int_equal(keel_infer(c), KEEL_OK);
    assert_true(output0(c) == 10.0f);
    assert_int_equal(keel_request_output_count(c), 1);
    assert_int_equal(keel__request_input_count(c), 1); /* b's second input is not c's */
    assert_int_equal(keel__request_input(c, 0, &v), KEEL_OK);
    assert_string_equal(v.name, "x");
    assert_int_equal(v.ndim, 2);
    assert_string_equal(keel_request_id(c), "");
    n0 = keel__request_cached();
    keel_request_destroy(c);
    tu_assert_counters(f->rt, &idle_one_gen);
    assert_int_equal(keel__request_cached(), n0 < keel__request_cache_cap() ? n0 + 1 : n0);

    /* A thread that never created a request keeps none of those it destroys. */
    c = make_req(f->rt, "m", 2.0f);
    assert_int_equal(pthread_create(&t_destroy, NULL, destroy_in_thread, c), 0);
    assert_int_equal(pthread_join(t_destroy, &kept), 0);
    assert_true((uintptr_t)kept == 0);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* keel_infer with a timeout returns at the deadline of a backend call that hangs. */
static void test_sync_deadline_while_running(void **state)
{
    fixture *f = *state;
    keel_request *r = make_req(f->rt, "m", 1.0f);
    pthread_t opener;
    uint64_t t0, dt;

    mock_gate_close();
    /* Should keel_infer hang in the backend, the gate opens after 3 s. */
    assert_int_equal(pthread_create(&opener, NULL, open_gate_later, NULL), 0);
    keel_request_set_timeout_us(r, 100000);
    t0 = mono_ns();
    assert_int_equal(keel_infer(r), KEEL_ETIMEDOUT);
    dt = mono_ns() - t0;
    assert_non_null(strstr(keel_request_error(r), "while running"));
    assert_true(dt >= 100000000u && dt < 1500000000u);
    keel_request_destroy(r);
    pthread_join(opener, NULL);
    wait_unstuck(f->rt);
    tu_assert_counters(f->rt, &idle_one_gen);
}

/* keel_request_cancel on a running request answers it at once; the context is stuck until
 * the backend returns. */
static void test_cancel_while_running(void **state)
{
    fixture *f = *state;
    keel_request *r = make_req(f->rt, "m", 1.0f);
    probe p = {0};
    keel_counters c;

    mock_gate_close();
    submit_probe(r, &p);
    mock_wait_blocked(1);
    assert_int_equal(keel_request_cancel(r), KEEL_OK);
    assert_true(probe_wait(&p, 1000));
    assert_int_equal(p.status, KEEL_ECANCELED);
    assert_non_null(strstr(p.msg, "cancelled while running"));
    assert_int_equal(keel_request_cancel(r), KEEL_EINVAL); /* answered: nothing to cancel */
    keel_request_destroy(r);
    keel_counters_get(f->rt, &c);
    assert_int_equal(c.contexts_stuck, 1);
    assert_int_equal(c.leases, 0);
    assert_int_equal(c.requests, 0);
    assert_false(keel_model_is_ready(f->rt, "m", -1));
    mock_gate_open();
    wait_unstuck(f->rt);
    tu_assert_counters(f->rt, &idle_one_gen);
    assert_true(keel_model_is_ready(f->rt, "m", -1));
    /* The context serves again. */
    r = make_req(f->rt, "m", 4.0f);
    assert_int_equal(keel_infer(r), KEEL_OK);
    assert_true(output0(r) == 8.0f);
    keel_request_destroy(r);
}

/* In a batch, the request whose deadline passes while the batch runs is answered alone; the
 * others get their outputs when the backend returns. */
static void test_batch_member_deadline(void **state)
{
    fixture *f = *state;
    const keel_counters idle2 = {0, 0, 0, 2, 2, 0, 0};
    keel_request *r[3];
    probe p[3] = {{0}};
    mock_call calls[8];
    uint64_t t0;
    size_t n0, n;

    mock_write_model_batching(f->repo, "b", 1, 8, "{\"max_queue_delay_microseconds\":100000}");
    mock_write_version(f->repo, "b", 1, 2.0);
    assert_int_equal(keel_model_load(f->rt, "b", NULL, 0), KEEL_OK);
    n0 = mock_calls(calls, 8);
    r[0] = make_req(f->rt, "b", MOCK_SLOW + 1500.0f); /* its row makes the call take 1.5 s */
    r[1] = make_req(f->rt, "b", 2.0f);
    r[2] = make_req(f->rt, "b", 3.0f);
    keel_request_set_timeout_us(r[0], 500000);
    t0 = mono_ns();
    for (int i = 0; i < 3; i++)
        submit_probe(r[i], &p[i]);
    assert_true(probe_wait(&p[0], 5000));
    assert_int_equal(p[0].status, KEEL_ETIMEDOUT);
    assert_non_null(strstr(p[0].msg, "while running"));
    assert_true(p[0].t_ns - t0 < 1200000000u);
    assert_false(atomic_load(&p[1].done) || atomic_load(&p[2].done)); /* still running */
    assert_int_equal(model_counters(f->rt, "b").contexts_stuck, 1);
    keel_request_destroy(r[0]);
    for (int i = 1; i < 3; i++) {
        assert_true(probe_wait(&p[i], 10000));
        assert_int_equal(p[i].status, KEEL_OK);
        assert_true(output0(r[i]) == 2.0f * (float)(i + 1));
        assert_true(p[i].t_ns - t0 >= 1500000000u);
        keel_request_destroy(r[i]);
    }
    n = mock_calls(calls, 8);
    assert_int_equal(n, n0 + 1); /* the three ran as one batch */
    assert_int_equal(calls[n - 1].rows, 3);
    tu_assert_counters(f->rt, &idle2);
}

/* The model is unloaded while a detached run is stuck: the generation waits for the backend,
 * then goes with its context (the teardown checks every model and context was freed once,
 * none used after its free; ASan that the detached request's inputs and the vslot were). */
static void test_unload_while_stuck(void **state)
{
    fixture *f = *state;
    const keel_counters gone = {0, 0, 0, 0, 0, 0, 0};
    keel_request *r = make_req(f->rt, "m", 1.0f);
    probe p = {0};
    keel_counters c;

    mock_gate_close();
    keel_request_set_timeout_us(r, 50000);
    submit_probe(r, &p);
    mock_wait_blocked(1);
    assert_true(probe_wait(&p, 5000));
    assert_int_equal(p.status, KEEL_ETIMEDOUT);
    keel_request_destroy(r);
    assert_int_equal(keel_model_unload(f->rt, "m"), KEEL_OK);
    keel_runtime_quiesce(f->rt);
    keel_counters_get(f->rt, &c);
    assert_int_equal(c.generations, 1); /* held by the stuck run */
    assert_int_equal(c.contexts_stuck, 1);
    assert_int_equal(atomic_load(&mock.model_frees), 0);
    mock_gate_open();
    for (int i = 0; i < 5000 && atomic_load(&mock.model_frees) == 0; i++)
        usleep(1000);
    tu_assert_counters(f->rt, &gone);
    assert_int_equal(atomic_load(&mock.model_frees), 1);
}

/* preserve_ordering: a batch whose requests were all answered while it ran still takes its
 * turn, so the batches after it are not held for ever. */
static void test_ordered_detached_batch(void **state)
{
    fixture *f = *state;
    keel_request *a, *b, *c;
    probe pa = {0}, pb = {0}, pc = {0};
    long runs0;

    mock_write_model_batching(f->repo, "o", 2, 8, "{\"preserve_ordering\":true}");
    mock_write_version(f->repo, "o", 1, 2.0);
    assert_int_equal(keel_model_load(f->rt, "o", NULL, 0), KEEL_OK);
    runs0 = atomic_load(&mock.runs);
    a = make_req(f->rt, "o", MOCK_SLOW + 1500.0f);
    submit_probe(a, &pa);
    for (int i = 0; i < 5000 && atomic_load(&mock.runs) == runs0; i++)
        usleep(1000);
    assert_int_equal(atomic_load(&mock.runs), runs0 + 1); /* a runs, alone */
    b = make_req(f->rt, "o", MOCK_SLOW + 300.0f);
    keel_request_set_timeout_us(b, 100000);
    submit_probe(b, &pb);
    assert_true(probe_wait(&pb, 5000));
    assert_int_equal(pb.status, KEEL_ETIMEDOUT);
    keel_request_destroy(b);
    assert_true(probe_wait(&pa, 10000)); /* b's call returned before a's */
    assert_int_equal(pa.status, KEEL_OK);
    keel_request_destroy(a);
    c = make_req(f->rt, "o", 5.0f);
    submit_probe(c, &pc);
    assert_true(probe_wait(&pc, 5000));
    assert_int_equal(pc.status, KEEL_OK);
    assert_true(output0(c) == 10.0f);
    keel_request_destroy(c);
    wait_unstuck(f->rt);
    tu_assert_counters(f->rt, &(keel_counters){0, 0, 0, 2, 3, 0, 0});
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_datatype_names),
        cmocka_unit_test_setup_teardown(test_sync_and_async, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_inputs_then_good, setup, teardown),
        cmocka_unit_test_setup_teardown(test_submit_run_here, setup, teardown),
        cmocka_unit_test_setup_teardown(test_request_timing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_return_after_swap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_overload_and_deadline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_deadline_while_running, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_while_running, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sync_deadline_while_running, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batch_member_deadline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unload_while_stuck, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ordered_detached_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unload_and_shutdown_with_queue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_reload_keeps_old, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fault_points, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_unload_cycles, setup, teardown),
        cmocka_unit_test_setup_teardown(test_versions, setup, teardown),
        cmocka_unit_test(test_exec_estimate),
        cmocka_unit_test_setup_teardown(test_add_input_owned, setup, teardown),
        cmocka_unit_test_setup_teardown(test_add_input_borrowed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_outputs_recycled, setup, teardown),
        cmocka_unit_test_setup_teardown(test_borrowed_input_outlives_detached_request, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_submit_run_if_fast, setup, teardown),
        cmocka_unit_test_setup_teardown(test_caller_keeps_its_context, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reused_request_starts_fresh, setup, teardown),
        cmocka_unit_test_setup_teardown(test_run_if_fast_bound_zero, setup, teardown),
        cmocka_unit_test_setup_teardown(test_version_change_keeps_queued_latest, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
