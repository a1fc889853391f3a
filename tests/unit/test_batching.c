/*
 * test_batching.c: dynamic batching (sched.c, batch.c) against the mock backend, whose call
 * log records every backend call: its rows, columns, start time and the first value of each
 * row. Each request sends distinct values and checks its own answer (y = 2x), so an output
 * split to the wrong request fails. The mock's gate holds a "blocker" request in the one
 * context while a test queues requests behind it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <pthread.h>

#include "keel/keel.h"
#include "mock_backend.h"
#include "runtime/testhook.h"
#include "testutil.h"

typedef struct fixture {
    char *repo;
    keel_runtime *rt;
} fixture;

static const keel_counters idle_one_gen = {0, 0, 0, 1, 1, 0, 0};

/* Loads model "m" (one context, factor 2) with the given max_batch_size and batching JSON. */
/* The runtime's inline_max_us for the next start(); 0: its default (200 us). */
static uint32_t start_inline_max_us;

static void start(fixture *f, int max_batch, const char *db)
{
    keel_runtime_opts o;

    mock_reset();
    mock_gate_open();
    f->repo = tu_mkdtemp("batch");
    mock_write_model_batching(f->repo, "m", 1, max_batch, db);
    mock_write_version(f->repo, "m", 1, 2.0);
    keel_runtime_opts_init(&o);
    o.model_repository = f->repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 2;
    if (start_inline_max_us != 0)
        o.inline_max_us = start_inline_max_us;
    assert_int_equal(keel_runtime_create(&o, &f->rt), KEEL_OK);
    assert_int_equal(keel__runtime_add_backend(f->rt, &mock_backend), KEEL_OK);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
}

static void stop(fixture *f)
{
    mock_gate_open();
    keel_runtime_destroy(f->rt);
    assert_int_equal(atomic_load(&mock.loads), atomic_load(&mock.model_frees));
    assert_int_equal(atomic_load(&mock.ctx_creates), atomic_load(&mock.ctx_destroys));
    assert_int_equal(atomic_load(&mock.double_frees), 0);
    tu_rm_rf(f->repo);
    free(f->repo);
}

/* A request of `rows` rows and `cols` columns: row r holds x + r in every column. */
static keel_request *req_rows(keel_runtime *rt, float x, int rows, int cols)
{
    keel_request *req = NULL;
    int64_t shape[2] = {rows, cols};
    float *v = calloc((size_t)(rows * cols), sizeof(float));

    assert_non_null(v);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            v[r * cols + c] = x + (float)r;
    assert_int_equal(keel_request_create(rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, v,
                                            sizeof(float) * (size_t)(rows * cols)),
                     KEEL_OK);
    free(v);
    return req;
}

/* Checks req's output is 2x of what req_rows(x, rows, cols) sent. */
static void check_answer(const keel_request *req, float x, int rows, int cols)
{
    keel_tensor_view v;

    assert_int_equal(keel_request_status(req), KEEL_OK);
    assert_int_equal(keel_request_output_by_name(req, "y", &v), KEEL_OK);
    assert_int_equal(v.ndim, 2);
    assert_int_equal(v.shape[0], rows);
    assert_int_equal(v.shape[1], cols);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            assert_true(((const float *)v.data)[r * cols + c] == 2.0f * (x + (float)r));
}

/* Completion bookkeeping: statuses, and the order requests completed in. */
typedef struct tally {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    int by_status[KEEL_ERR_COUNT_];
} tally;

static void tally_init(tally *t)
{
    memset(t, 0, sizeof(*t));
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
}

static void tally_cb(keel_request *req, keel_err status, void *user)
{
    tally *t = user;

    (void)req;
    pthread_mutex_lock(&t->mu);
    t->done++;
    t->by_status[status]++;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

static void tally_wait(tally *t, int n)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 30;
    pthread_mutex_lock(&t->mu);
    while (t->done < n) {
        if (pthread_cond_timedwait(&t->cv, &t->mu, &ts) != 0)
            break;
    }
    int done = t->done;
    pthread_mutex_unlock(&t->mu);
    if (done < n)
        fail_msg("only %d of %d requests completed within 30 s", done, n);
}

static int tally_get(tally *t, keel_err st)
{
    pthread_mutex_lock(&t->mu);
    int n = st == KEEL_ERR_COUNT_ ? t->done : t->by_status[st];
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* Holds the one context with a running request (x = 1000); returns it (submitted). */
static keel_request *block(fixture *f, tally *t)
{
    keel_request *b = req_rows(f->rt, 1000.0f, 1, 1);

    mock_gate_close();
    assert_int_equal(keel_infer_submit(b, tally_cb, t), KEEL_OK);
    mock_wait_blocked(1);
    return b;
}

static size_t calls(mock_call *c)
{
    return mock_calls(c, 64);
}

/* Ten one-row requests queued behind a blocker, preferred size 4, no delay: batches of 4, 4
 * and the 2 left; every request gets its own rows back. */
static void test_preferred_sizes(void **state)
{
    fixture f;
    tally t;
    keel_request *r[10], *b;
    mock_call c[64];
    size_t n;

    (void)state;
    tally_init(&t);
    start(&f, 8, "{\"preferred_batch_size\": [4]}");
    b = block(&f, &t);
    for (int i = 0; i < 10; i++) {
        r[i] = req_rows(f.rt, (float)(10 * (i + 1)), 1, 1);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    }
    mock_gate_open();
    tally_wait(&t, 11);
    n = calls(c);
    assert_int_equal(n, 4);
    assert_int_equal(c[0].rows, 1);
    assert_int_equal(c[1].rows, 4);
    assert_int_equal(c[2].rows, 4);
    assert_int_equal(c[3].rows, 2);
    /* FIFO: the first batch holds the first four requests, in order. */
    for (int i = 0; i < 4; i++)
        assert_true(c[1].first[i] == (float)(10 * (i + 1)));
    for (int i = 0; i < 10; i++) {
        check_answer(r[i], (float)(10 * (i + 1)), 1, 1);
        keel_request_destroy(r[i]);
    }
    keel_request_destroy(b);
    {
        keel_model_stats st;
        assert_int_equal(keel_model_stats_get(f.rt, "m", &st), KEEL_OK);
        assert_int_equal(st.inference_count, 11);
        assert_int_equal(st.execution_count, 4);
    }
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* KEEL_SUBMIT_GATHER + keel_runtime_run_gathered (an HTTP loop's turn): gathered requests
 * wake no inference thread; run_gathered runs them as one batch on the calling thread, whose
 * callbacks have all run when it returns; a batch size whose run time was never measured is
 * handed to the inference threads instead. */
static pthread_t cb_threads[8];
static tally *cb_tally;

static void thread_cb(keel_request *req, keel_err status, void *user)
{
    cb_threads[(intptr_t)user] = pthread_self();
    tally_cb(req, status, cb_tally);
}

static void test_gather(void **state)
{
    fixture f;
    tally t;
    keel_request *r[8], *w;
    mock_call c[64];
    keel_model_stats a, b;

    (void)state;
    tally_init(&t);
    cb_tally = &t;
    /* The measured class must count as fast however slowly this machine ran it (under ASan
     * with other tests beside it the mock's 2-row run once took over the default 200 us, and
     * the gathered batch went to an inference thread). */
    start_inline_max_us = 1000000;
    start(&f, 8, "{}");
    start_inline_max_us = 0;
    /* Measure batch sizes 2-3 (one size class): a 2-row request through a worker. */
    w = req_rows(f.rt, 1.0f, 2, 1);
    assert_int_equal(keel_infer(w), KEEL_OK);
    keel_request_destroy(w);
    assert_int_equal(keel_model_stats_get(f.rt, "m", &a), KEEL_OK);
    /* A worker woken earlier (the load's dispatch check) may still be on its way back to
     * sleep, and an awake worker may take a gathered batch (legitimately): let it settle. */
    usleep(200 * 1000);

    for (int i = 0; i < 3; i++) {
        r[i] = req_rows(f.rt, (float)(10 * (i + 1)), 1, 1);
        assert_int_equal(
            keel_infer_submit_ex(r[i], KEEL_SUBMIT_GATHER, thread_cb, (void *)(intptr_t)i),
            KEEL_OK);
    }
    usleep(50 * 1000); /* a woken worker would have run them by now */
    assert_int_equal(tally_get(&t, KEEL_ERR_COUNT_), 0);
    assert_int_equal(calls(c), 1);
    keel_runtime_run_gathered(f.rt);
    assert_int_equal(tally_get(&t, KEEL_OK), 3); /* before it returned */
    assert_int_equal(calls(c), 2);
    assert_int_equal(c[1].rows, 3);
    for (int i = 0; i < 3; i++) {
        assert_true(pthread_equal(cb_threads[i], pthread_self()));
        check_answer(r[i], (float)(10 * (i + 1)), 1, 1);
    }
    assert_int_equal(keel_model_stats_get(f.rt, "m", &b), KEEL_OK);
    assert_int_equal(b.runs_inline - a.runs_inline, 3);
    assert_int_equal(b.runs_handed_off, a.runs_handed_off);

    for (int i = 0; i < 3; i++)
        keel_request_destroy(r[i]);
    /* Five rows: a size class never measured, so an inference thread runs it. */
    for (int i = 0; i < 5; i++) {
        r[i] = req_rows(f.rt, (float)(100 + i), 1, 1);
        assert_int_equal(
            keel_infer_submit_ex(r[i], KEEL_SUBMIT_GATHER, thread_cb, (void *)(intptr_t)i),
            KEEL_OK);
    }
    keel_runtime_run_gathered(f.rt);
    tally_wait(&t, 8);
    assert_int_equal(calls(c), 3);
    assert_int_equal(c[2].rows, 5);
    for (int i = 0; i < 5; i++) {
        assert_false(pthread_equal(cb_threads[i], pthread_self()));
        check_answer(r[i], (float)(100 + i), 1, 1);
        keel_request_destroy(r[i]);
    }
    assert_int_equal(keel_model_stats_get(f.rt, "m", &a), KEEL_OK);
    assert_int_equal(a.runs_handed_off - b.runs_handed_off, 5);
    assert_int_equal(a.runs_inline, b.runs_inline);
    /* Unknown flags are refused. */
    w = req_rows(f.rt, 1.0f, 1, 1);
    assert_int_equal(keel_infer_submit_ex(w, 1u << 7, thread_cb, NULL), KEEL_EINVAL);
    keel_request_destroy(w);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* Multi-row requests: rows of each request stay together, the batch never passes
 * max_batch_size, and a request whose columns differ closes the batch. */
static void test_rows_and_shapes(void **state)
{
    fixture f;
    tally t;
    keel_request *r[5], *b;
    static const int rows[5] = {3, 4, 2, 2, 1};
    static const int cols[5] = {1, 1, 1, 2, 1};
    mock_call c[64];

    (void)state;
    tally_init(&t);
    start(&f, 8, "{}");
    b = block(&f, &t);
    for (int i = 0; i < 5; i++) {
        r[i] = req_rows(f.rt, (float)(100 * (i + 1)), rows[i], cols[i]);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    }
    mock_gate_open();
    tally_wait(&t, 6);
    /* 3+4 = 7 fit; 7+2 would pass 8: [3,4]; then [2] closed by the 2-column one; [2x2]; [1]. */
    assert_int_equal(calls(c), 5);
    assert_int_equal(c[1].rows, 7);
    assert_int_equal(c[2].rows, 2);
    assert_int_equal(c[3].rows, 2);
    assert_int_equal(c[3].cols, 2);
    assert_int_equal(c[4].rows, 1);
    for (int i = 0; i < 5; i++) {
        check_answer(r[i], (float)(100 * (i + 1)), rows[i], cols[i]);
        keel_request_destroy(r[i]);
    }
    keel_request_destroy(b);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* A batch waits for more requests at most max_queue_delay from its oldest request; a full
 * batch goes without waiting. Times are the mock's call times against the submit times. */
static void test_delay(void **state)
{
    fixture f;
    tally t;
    keel_request *r[8];
    mock_call c[64];
    struct timespec ts;
    uint64_t t0;
    const uint64_t delay_ns = 300u * 1000000u;

    (void)state;
    tally_init(&t);
    start(&f, 4, "{\"max_queue_delay_microseconds\": 300000}");
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t0 = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    for (int i = 0; i < 2; i++) {
        r[i] = req_rows(f.rt, (float)(i + 1), 1, 1);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    }
    tally_wait(&t, 2);
    assert_int_equal(calls(c), 1);
    assert_int_equal(c[0].rows, 2);
    /* It waited for the delay (a batch of 2 < 4), counted from the first submit. */
    assert_true(c[0].t_ns >= t0 + delay_ns);
    for (int i = 0; i < 2; i++) {
        check_answer(r[i], (float)(i + 1), 1, 1);
        keel_request_destroy(r[i]);
    }
    /* Four requests fill the batch: it runs at once, long before the delay. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t0 = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    for (int i = 0; i < 4; i++) {
        r[i] = req_rows(f.rt, (float)(i + 1), 1, 1);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    }
    tally_wait(&t, 6);
    assert_int_equal(calls(c), 2);
    assert_int_equal(c[1].rows, 4);
    assert_true(c[1].t_ns < t0 + delay_ns);
    for (int i = 0; i < 4; i++)
        keel_request_destroy(r[i]);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* Higher priority first (level 1 before level 2), FIFO within a level; an unknown level is
 * refused at submit. */
static void test_priorities(void **state)
{
    fixture f;
    tally t;
    keel_request *r[4], *b, *bad;
    mock_call c[64];

    (void)state;
    tally_init(&t);
    start(&f, 2, "{\"priority_levels\": 2, \"default_priority_level\": 2}");
    b = block(&f, &t);
    for (int i = 0; i < 4; i++) {
        r[i] = req_rows(f.rt, (float)(i + 1), 1, 1);
        keel_request_set_priority(r[i], i < 2 ? 0 : 1); /* 0: the default, level 2 */
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    }
    bad = req_rows(f.rt, 9.0f, 1, 1);
    keel_request_set_priority(bad, 3);
    assert_int_equal(keel_infer_submit(bad, tally_cb, &t), KEEL_EINVAL);
    assert_non_null(strstr(keel_request_error(bad), "priority 3"));
    mock_gate_open();
    tally_wait(&t, 5);
    assert_int_equal(calls(c), 3);
    assert_true(c[1].first[0] == 3.0f && c[1].first[1] == 4.0f); /* level 1 first */
    assert_true(c[2].first[0] == 1.0f && c[2].first[1] == 2.0f);
    for (int i = 0; i < 4; i++) {
        check_answer(r[i], (float)(i + 1), 1, 1);
        keel_request_destroy(r[i]);
    }
    keel_request_destroy(bad);
    keel_request_destroy(b);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* REJECT: a queued request past its timeout is answered at its deadline while the context
 * is still busy (not after the running batch), and never reaches the backend. The blocker has
 * the same default timeout: it is answered at its deadline too, while its call still runs. */
static void test_reject_while_waiting(void **state)
{
    fixture f;
    tally t;
    keel_request *r[2], *b;
    mock_call c[64];

    (void)state;
    tally_init(&t);
    start(&f, 8, "{\"default_queue_policy\": {\"default_timeout_microseconds\": 50000}}");
    b = block(&f, &t);
    for (int i = 0; i < 2; i++) {
        r[i] = req_rows(f.rt, (float)(i + 1), 1, 1);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    }
    tally_wait(&t, 3); /* the blocker's call still holds the context */
    assert_int_equal(tally_get(&t, KEEL_ETIMEDOUT), 3);
    assert_non_null(strstr(keel_request_error(r[0]), "deadline exceeded"));
    assert_non_null(strstr(keel_request_error(r[1]), "in queue"));
    assert_non_null(strstr(keel_request_error(b), "while running"));
    mock_gate_open();
    for (int i = 0; i < 10000; i++) { /* until the call returned */
        keel_counters k;
        keel_counters_get(f.rt, &k);
        if (k.contexts_stuck == 0)
            break;
        usleep(1000);
    }
    assert_int_equal(calls(c), 1); /* the blocker only */
    for (int i = 0; i < 2; i++)
        keel_request_destroy(r[i]);
    keel_request_destroy(b);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* DELAY: a request past its timeout is not failed but served after every request that is
 * not; allow_timeout_override lets a request wait longer than the default. */
static void test_delay_policy(void **state)
{
    fixture f;
    tally t;
    keel_request *a, *z, *b;
    mock_call c[64];

    (void)state;
    tally_init(&t);
    start(&f, 8,
          "{\"default_queue_policy\": {\"timeout_action\": \"DELAY\","
          " \"default_timeout_microseconds\": 30000, \"allow_timeout_override\": true}}");
    b = block(&f, &t);
    a = req_rows(f.rt, 1.0f, 1, 1);
    assert_int_equal(keel_infer_submit(a, tally_cb, &t), KEEL_OK);
    usleep(200 * 1000); /* a's timeout passes: the timer moves it behind the others */
    z = req_rows(f.rt, 2.0f, 1, 1);
    keel_request_set_timeout_us(z, 60u * 1000000u);
    assert_int_equal(keel_infer_submit(z, tally_cb, &t), KEEL_OK);
    mock_gate_open();
    tally_wait(&t, 3);
    assert_int_equal(tally_get(&t, KEEL_OK), 3);
    assert_int_equal(calls(c), 2);
    assert_int_equal(c[1].rows, 2);
    assert_true(c[1].first[0] == 2.0f && c[1].first[1] == 1.0f); /* z before a */
    check_answer(a, 1.0f, 1, 1);
    check_answer(z, 2.0f, 1, 1);
    keel_request_destroy(a);
    keel_request_destroy(z);
    keel_request_destroy(b);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* A request's timeout is honoured whether or not the model sets a default: alone; shorter
 * than a default without allow_timeout_override (it can only shorten it). */
static void test_timeout_override(void **state)
{
    static const char *const configs[] = {
        "{}", "{\"default_queue_policy\": {\"default_timeout_microseconds\": 60000000}}"};

    (void)state;
    for (int k = 0; k < 2; k++) {
        fixture f;
        tally t;
        keel_request *r, *longer = NULL, *b;
        tally_init(&t);
        start(&f, 8, configs[k]);
        b = block(&f, &t);
        r = req_rows(f.rt, 1.0f, 1, 1);
        keel_request_set_timeout_us(r, 20000);
        assert_int_equal(keel_infer_submit(r, tally_cb, &t), KEEL_OK);
        tally_wait(&t, 1);
        assert_int_equal(tally_get(&t, KEEL_ETIMEDOUT), 1);
        keel_request_destroy(r);
        if (k == 1) {
            /* Longer than the default without the override flag: the default holds (60 s),
             * so it is still waiting when the blocker is released. */
            longer = req_rows(f.rt, 2.0f, 1, 1);
            keel_request_set_timeout_us(longer, 120u * 1000000u);
            assert_int_equal(keel_infer_submit(longer, tally_cb, &t), KEEL_OK);
        }
        mock_gate_open();
        tally_wait(&t, k == 1 ? 3 : 2);
        if (longer != NULL) {
            check_answer(longer, 2.0f, 1, 1);
            keel_request_destroy(longer);
        }
        keel_request_destroy(b);
        tu_assert_counters(f.rt, &idle_one_gen);
        stop(&f);
    }
}

/* A request cancelled while pending never reaches the backend; the rest of its would-be
 * batch runs. */
static void test_cancel_pending(void **state)
{
    fixture f;
    tally t;
    keel_request *r[3], *b;
    mock_call c[64];

    (void)state;
    tally_init(&t);
    start(&f, 8, "{}");
    b = block(&f, &t);
    for (int i = 0; i < 3; i++) {
        r[i] = req_rows(f.rt, (float)(i + 1), 1, 1);
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    }
    assert_int_equal(keel_request_cancel(r[1]), KEEL_OK);
    mock_gate_open();
    tally_wait(&t, 4);
    assert_int_equal(tally_get(&t, KEEL_ECANCELED), 1);
    assert_int_equal(calls(c), 2);
    assert_int_equal(c[1].rows, 2);
    assert_true(c[1].first[0] == 1.0f && c[1].first[1] == 3.0f);
    check_answer(r[0], 1.0f, 1, 1);
    check_answer(r[2], 3.0f, 1, 1);
    for (int i = 0; i < 3; i++)
        keel_request_destroy(r[i]);
    keel_request_destroy(b);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* A backend error fails exactly the requests of its batch, each with the message; a
 * request that fails validation is answered alone and the others of its batch run; the
 * next request succeeds. */
static void test_errors(void **state)
{
    fixture f;
    tally t;
    keel_request *r[3], *b, *wrong, *next;
    int64_t shape[2] = {1, 1};
    float x = 5.0f;

    (void)state;
    tally_init(&t);
    start(&f, 8, "{}");
    b = block(&f, &t);
    r[0] = req_rows(f.rt, 1.0f, 1, 1);
    r[1] = req_rows(f.rt, MOCK_POISON, 1, 1);
    r[2] = req_rows(f.rt, 3.0f, 1, 1);
    for (int i = 0; i < 3; i++)
        assert_int_equal(keel_infer_submit(r[i], tally_cb, &t), KEEL_OK);
    mock_gate_open();
    tally_wait(&t, 4);
    assert_int_equal(tally_get(&t, KEEL_EBACKEND), 3);
    for (int i = 0; i < 3; i++) {
        assert_non_null(strstr(keel_request_error(r[i]), "poisoned"));
        assert_int_equal(keel_request_output_count(r[i]), 0);
        keel_request_destroy(r[i]);
    }
    /* Validation: an input the model does not have, batched with a good one. */
    b = (keel_request_destroy(b), block(&f, &t));
    assert_int_equal(keel_request_create(f.rt, "m", -1, &wrong), KEEL_OK);
    assert_int_equal(keel_request_add_input(wrong, "x", KEEL_TYPE_FP32, shape, 2, &x, sizeof(x)),
                     KEEL_OK);
    assert_int_equal(keel_request_add_output(wrong, "nope"), KEEL_OK);
    next = req_rows(f.rt, 7.0f, 1, 1);
    assert_int_equal(keel_infer_submit(wrong, tally_cb, &t), KEEL_OK);
    assert_int_equal(keel_infer_submit(next, tally_cb, &t), KEEL_OK);
    mock_gate_open();
    tally_wait(&t, 7);
    assert_int_equal(keel_request_status(wrong), KEEL_EINVAL);
    assert_non_null(strstr(keel_request_error(wrong), "unknown output 'nope'"));
    check_answer(next, 7.0f, 1, 1);
    keel_request_destroy(wrong);
    keel_request_destroy(next);
    keel_request_destroy(b);
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* preserve_ordering: a fast request that ends before a slow one dispatched earlier (on the
 * other context) is answered after it; without the setting it is answered first. */
typedef struct order_log {
    pthread_mutex_t mu;
    keel_request *order[4];
    int n;
} order_log;

static void order_cb(keel_request *req, keel_err status, void *user)
{
    order_log *o = user;

    (void)status;
    pthread_mutex_lock(&o->mu);
    o->order[o->n++] = req;
    pthread_mutex_unlock(&o->mu);
}

static void test_preserve_ordering(void **state)
{
    (void)state;
    for (int preserve = 0; preserve < 2; preserve++) {
        fixture f;
        order_log o = {.mu = PTHREAD_MUTEX_INITIALIZER};
        keel_request *slow, *fast;
        keel_runtime_opts opts;

        mock_reset();
        mock_gate_open();
        f.repo = tu_mkdtemp("order");
        mock_write_model_batching(f.repo, "m", 2, 4,
                                  preserve ? "{\"preserve_ordering\": true}" : "{}");
        mock_write_version(f.repo, "m", 1, 2.0);
        keel_runtime_opts_init(&opts);
        opts.model_repository = f.repo;
        opts.control = KEEL_CONTROL_EXPLICIT;
        opts.worker_threads = 2;
        assert_int_equal(keel_runtime_create(&opts, &f.rt), KEEL_OK);
        assert_int_equal(keel__runtime_add_backend(f.rt, &mock_backend), KEEL_OK);
        assert_int_equal(keel_model_load(f.rt, "m", NULL, 0), KEEL_OK);
        slow = req_rows(f.rt, MOCK_SLOW + 300.0f, 1, 1);
        fast = req_rows(f.rt, 5.0f, 1, 2); /* other columns: never in slow's batch */
        assert_int_equal(keel_infer_submit(slow, order_cb, &o), KEEL_OK);
        usleep(50 * 1000); /* slow is running on one context */
        assert_int_equal(keel_infer_submit(fast, order_cb, &o), KEEL_OK);
        for (int i = 0; i < 3000; i++) {
            pthread_mutex_lock(&o.mu);
            int n = o.n;
            pthread_mutex_unlock(&o.mu);
            if (n == 2)
                break;
            usleep(1000);
        }
        assert_int_equal(o.n, 2);
        assert_ptr_equal(o.order[0], preserve ? slow : fast);
        check_answer(fast, 5.0f, 1, 2);
        keel_request_destroy(slow);
        keel_request_destroy(fast);
        stop(&f);
    }
}

/* ---- property test: random clients against the unbatched reference */

typedef struct client {
    keel_runtime *rt;
    unsigned seed;
    int sent, ok, timedout, cancelled, wrong;
} client;

typedef struct one {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int calls;
    keel_err st;
} one;

static void one_cb(keel_request *req, keel_err st, void *user)
{
    one *o = user;

    (void)req;
    pthread_mutex_lock(&o->mu);
    o->calls++;
    o->st = st;
    pthread_cond_signal(&o->cv);
    pthread_mutex_unlock(&o->mu);
}

static void *client_main(void *arg)
{
    client *c = arg;

    for (int i = 0; i < 150; i++) {
        int rows = 1 + (int)(rand_r(&c->seed) % 3), cols = 1 + (int)(rand_r(&c->seed) % 2);
        float x = (float)(rand_r(&c->seed) % 1000) + 1.0f;
        keel_request *req = req_rows(c->rt, x, rows, cols);
        one o = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, KEEL_OK};
        unsigned pick = rand_r(&c->seed) % 10;

        keel_request_set_priority(req, 1 + rand_r(&c->seed) % 3);
        if (pick == 0)
            keel_request_set_timeout_us(req, 1 + rand_r(&c->seed) % 2000);
        if (keel_infer_submit(req, one_cb, &o) != KEEL_OK) {
            c->wrong++;
            keel_request_destroy(req);
            continue;
        }
        c->sent++;
        if (pick == 1)
            (void)keel_request_cancel(req);
        pthread_mutex_lock(&o.mu);
        while (o.calls == 0)
            pthread_cond_wait(&o.cv, &o.mu);
        pthread_mutex_unlock(&o.mu);
        usleep(1000); /* a second callback would be counted by now */
        pthread_mutex_lock(&o.mu);
        if (o.calls != 1)
            c->wrong++;
        pthread_mutex_unlock(&o.mu);
        if (o.st == KEEL_OK) {
            keel_tensor_view v;
            bool good = keel_request_output_by_name(req, "y", &v) == KEEL_OK &&
                        v.shape[0] == rows && v.shape[1] == cols;
            for (int r = 0; good && r < rows; r++)
                for (int k = 0; k < cols; k++)
                    good = ((const float *)v.data)[r * cols + k] == 2.0f * (x + (float)r);
            c->ok++;
            c->wrong += !good;
        } else if (o.st == KEEL_ETIMEDOUT) {
            c->timedout++;
        } else if (o.st == KEEL_ECANCELED) {
            c->cancelled++;
        } else {
            c->wrong++;
        }
        keel_request_destroy(req);
    }
    return NULL;
}

static void test_property_random_clients(void **state)
{
    fixture f;
    client c[8];
    pthread_t th[8];
    int ok = 0, sent = 0, wrong = 0;
    keel_model_stats st;

    (void)state;
    start(&f, 8,
          "{\"max_queue_delay_microseconds\": 500, \"preferred_batch_size\": [4, 8],"
          " \"priority_levels\": 3, \"default_priority_level\": 2}");
    mock_set_run_us(200);
    for (int i = 0; i < 8; i++) {
        c[i] = (client){f.rt, 1234u + (unsigned)i, 0, 0, 0, 0, 0};
        assert_int_equal(pthread_create(&th[i], NULL, client_main, &c[i]), 0);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        ok += c[i].ok;
        sent += c[i].sent;
        wrong += c[i].wrong;
    }
    mock_set_run_us(0);
    assert_int_equal(wrong, 0);
    assert_int_equal(sent, 8 * 150);
    assert_int_equal(keel_model_stats_get(f.rt, "m", &st), KEEL_OK);
    assert_int_equal(st.success, (uint64_t)ok);
    assert_true(st.execution_count < st.success); /* batches formed */
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

/* ---- hot swap under batched load */

#define SWAPS 12
typedef struct swap_seen {
    pthread_mutex_t mu;
    uint64_t gen[4096];
    float k[4096];
    size_t n;
    int bad, ok;
} swap_seen;

typedef struct swap_client {
    keel_runtime *rt;
    swap_seen *seen;
    _Atomic bool *stop;
    unsigned seed;
} swap_client;

static void *swap_client_main(void *arg)
{
    swap_client *c = arg;

    while (!atomic_load(c->stop)) {
        int rows = 1 + (int)(rand_r(&c->seed) % 3);
        float x = (float)(rand_r(&c->seed) % 100) + 1.0f;
        keel_request *req = req_rows(c->rt, x, rows, 1);
        keel_err st = keel_infer(req);
        keel_tensor_view v;
        float k = 0.0f;
        bool good = st == KEEL_OK && keel_request_output_by_name(req, "y", &v) == KEEL_OK &&
                    v.shape[0] == rows;

        /* One factor for every row of the answer: never a mix of generations. */
        for (int r = 0; good && r < rows; r++) {
            float kr = ((const float *)v.data)[r] / (x + (float)r);
            if (r == 0)
                k = kr;
            good = kr == k && (k == 2.0f || k == 3.0f);
        }
        pthread_mutex_lock(&c->seen->mu);
        if (!good) {
            c->seen->bad++;
        } else {
            c->seen->ok++;
            if (c->seen->n < 4096) {
                c->seen->gen[c->seen->n] = keel_request_generation_id(req);
                c->seen->k[c->seen->n++] = k;
            }
        }
        pthread_mutex_unlock(&c->seen->mu);
        keel_request_destroy(req);
    }
    return NULL;
}

/* Reloads alternate the factor (2, 3) while 6 clients send batched requests: 0 failed, each
 * answer from one generation, and that generation's factor. */
static void test_hotswap_batched(void **state)
{
    fixture f;
    swap_seen seen = {.mu = PTHREAD_MUTEX_INITIALIZER};
    swap_client c[6];
    pthread_t th[6];
    _Atomic bool stopping = false;
    uint64_t gens[SWAPS + 1];
    float ks[SWAPS + 1];

    (void)state;
    start(&f, 8, "{\"max_queue_delay_microseconds\": 300}");
    mock_set_run_us(300);
    gens[0] = 0;
    ks[0] = 2.0f;
    {
        keel_model_status *list = NULL;
        size_t n = 0;
        assert_int_equal(keel_model_list(f.rt, &list, &n), KEEL_OK);
        gens[0] = list[0].generation_id;
        keel_model_status_free(list, n);
    }
    for (int i = 0; i < 6; i++) {
        c[i] = (swap_client){f.rt, &seen, &stopping, 99u + (unsigned)i};
        assert_int_equal(pthread_create(&th[i], NULL, swap_client_main, &c[i]), 0);
    }
    for (int s = 1; s <= SWAPS; s++) {
        keel_model_status *list = NULL;
        size_t n = 0;
        usleep(20 * 1000);
        ks[s] = s % 2 == 1 ? 3.0f : 2.0f;
        mock_write_version(f.repo, "m", 1, ks[s]);
        assert_int_equal(keel_model_load(f.rt, "m", NULL, 0), KEEL_OK);
        assert_int_equal(keel_model_list(f.rt, &list, &n), KEEL_OK);
        gens[s] = list[0].generation_id;
        keel_model_status_free(list, n);
    }
    usleep(20 * 1000);
    atomic_store(&stopping, true);
    for (int i = 0; i < 6; i++)
        pthread_join(th[i], NULL);
    mock_set_run_us(0);
    assert_int_equal(seen.bad, 0);
    assert_true(seen.ok > 0);
    for (size_t i = 0; i < seen.n; i++) {
        bool known = false;
        for (int s = 0; s <= SWAPS && !known; s++)
            known = gens[s] == seen.gen[i] && ks[s] == seen.k[i];
        assert_true(known); /* the answer's factor is its generation's */
    }
    tu_assert_counters(f.rt, &idle_one_gen);
    stop(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_preferred_sizes),   cmocka_unit_test(test_gather),
        cmocka_unit_test(test_rows_and_shapes),   cmocka_unit_test(test_delay),
        cmocka_unit_test(test_priorities),        cmocka_unit_test(test_reject_while_waiting),
        cmocka_unit_test(test_delay_policy),      cmocka_unit_test(test_timeout_override),
        cmocka_unit_test(test_cancel_pending),    cmocka_unit_test(test_errors),
        cmocka_unit_test(test_preserve_ordering), cmocka_unit_test(test_property_random_clients),
        cmocka_unit_test(test_hotswap_batched),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
