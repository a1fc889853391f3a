/*
 * test_lanes.c: workers' lanes (sched.c's DESIGN, "Lanes"). Chains of requests, each
 * submitted from the completion callback of the one before (the pattern lanes exist for),
 * against the mock backend (y = k * x, k the model version's factor): every request is
 * answered exactly once with its own answer; a request cancelled in its lane never reaches
 * the backend; a request submitted after a hot swap returned is never answered by the
 * generation it replaced; unload and runtime destroy in the middle of the chains answer
 * everything once; a lane never starves requests queued by other threads; and the live
 * counters return to idle. "Ran in a lane" is read from runs_inline: requests submitted
 * with keel_infer_submit() otherwise always count as handed off.
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
#include <stdatomic.h>

#include "keel/keel.h"
#include "mock_backend.h"
#include "runtime/testhook.h"
#include "testutil.h"

typedef struct fixture {
    char *repo;
    keel_runtime *rt;
} fixture;

/* Model "m": `instances` contexts, no dynamic_batching (so no queue policies either):
 * lanes may form. inline_max_us is raised to 1 s so that the mock counts as fast however
 * slow the machine (a sanitizer build under load): which requests enter lanes then depends
 * on the scheduler's rules alone, not on the run-time estimate. */
static void start(fixture *f, int workers, int instances)
{
    keel_runtime_opts o;

    mock_reset();
    mock_gate_open();
    f->repo = tu_mkdtemp("lanes");
    mock_write_model_batching(f->repo, "m", instances, 8, NULL);
    mock_write_version(f->repo, "m", 1, 2.0);
    keel_runtime_opts_init(&o);
    o.model_repository = f->repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = workers;
    o.inline_max_us = 1000000;
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

/* A one-row request for model m: x in each of its 2 columns; NULL on failure (callbacks
 * run on workers, where a cmocka assertion cannot reach the test: they count failures). */
static keel_request *req_x(keel_runtime *rt, float x)
{
    keel_request *req = NULL;
    int64_t shape[2] = {1, 2};
    float v[2] = {x, x};

    if (keel_request_create(rt, "m", -1, &req) != KEEL_OK)
        return NULL;
    if (keel_request_add_input(req, "x", KEEL_TYPE_FP32, shape, 2, v, sizeof(v)) != KEEL_OK) {
        keel_request_destroy(req);
        return NULL;
    }
    return req;
}

/* The factor the answer of a request that sent x shows, or -1 if it is not k * x in both
 * columns for one k. */
static float factor_of(const keel_request *req, float x)
{
    keel_tensor_view v;
    const float *y;

    if (keel_request_output_by_name(req, "y", &v) != KEEL_OK || v.ndim != 2 || v.shape[0] != 1 ||
        v.shape[1] != 2)
        return -1.0f;
    y = v.data;
    if (y[0] != y[1])
        return -1.0f;
    return y[0] / x;
}

/* The chains. Each chain sends `steps` requests one after the other, each from the callback
 * of the one before (a new request object each time: x tells the requests apart). */
typedef struct chains chains;
typedef struct chain {
    chains *all;
    int id;
    int step;
    float x;
    int submitted_at_reload; /* all->reloads when this step was submitted */
} chain;

struct chains {
    keel_runtime *rt;
    int steps;             /* per chain; 0 = until stop */
    _Atomic bool stop;     /* no further steps */
    _Atomic int reloads;   /* hot swaps returned so far (test_swap) */
    _Atomic long answered; /* callbacks */
    _Atomic long accepted; /* submits that returned KEEL_OK */
    _Atomic long wrong;    /* a wrong answer or status, or a second callback */
    _Atomic long stale;    /* answered by a generation older than one returned before */
    _Atomic long refused;  /* a submit refused (unload, shutdown) */
    _Atomic long by_status[KEEL_ERR_COUNT_];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int running; /* chains not finished */
};

static void chain_cb(keel_request *req, keel_err status, void *user);

/* Submits chain c's next step (any thread); false when the chain ends here. */
static bool chain_next(chain *c)
{
    chains *all = c->all;
    keel_request *req;
    keel_err err;

    if (atomic_load(&all->stop) || (all->steps > 0 && c->step >= all->steps))
        return false;
    c->step++;
    c->x = (float)(c->id * 100000 + c->step);
    c->submitted_at_reload = atomic_load(&all->reloads);
    if ((req = req_x(all->rt, c->x)) == NULL) {
        atomic_fetch_add(&all->wrong, 1);
        return false;
    }
    if ((err = keel_infer_submit(req, chain_cb, c)) != KEEL_OK) {
        if (err != KEEL_EUNAVAILABLE && err != KEEL_ENOTFOUND && err != KEEL_ESHUTDOWN)
            atomic_fetch_add(&all->wrong, 1);
        atomic_fetch_add(&all->refused, 1);
        keel_request_destroy(req);
        return false;
    }
    atomic_fetch_add(&all->accepted, 1);
    return true;
}

static void chain_end(chain *c)
{
    pthread_mutex_lock(&c->all->mu);
    c->all->running--;
    pthread_cond_broadcast(&c->all->cv);
    pthread_mutex_unlock(&c->all->mu);
}

static void chain_cb(keel_request *req, keel_err status, void *user)
{
    chain *c = user;
    chains *all = c->all;

    atomic_fetch_add(&all->answered, 1);
    atomic_fetch_add(&all->by_status[status], 1);
    if (status == KEEL_OK) {
        float k = factor_of(req, c->x);
        /* Reload n serves factor 2 + n; the answer may come from that one or a newer. */
        if (k < 0.0f || k != (float)(int)k)
            atomic_fetch_add(&all->wrong, 1);
        else if ((int)k - 2 < c->submitted_at_reload)
            atomic_fetch_add(&all->stale, 1);
    } else if (status != KEEL_EUNAVAILABLE && status != KEEL_ESHUTDOWN &&
               status != KEEL_ECANCELED) {
        atomic_fetch_add(&all->wrong, 1);
    }
    keel_request_destroy(req);
    if (status != KEEL_OK || !chain_next(c))
        chain_end(c);
}

static void chains_start(chains *all, chain *c, int n, keel_runtime *rt, int steps)
{
    memset(all, 0, sizeof(*all));
    all->rt = rt;
    all->steps = steps;
    pthread_mutex_init(&all->mu, NULL);
    pthread_cond_init(&all->cv, NULL);
    all->running = n;
    for (int i = 0; i < n; i++) {
        c[i] = (chain){.all = all, .id = i + 1};
        if (!chain_next(&c[i]))
            fail_msg("chain %d could not start", i);
    }
}

static void chains_wait(chains *all)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 60;
    pthread_mutex_lock(&all->mu);
    while (all->running > 0)
        if (pthread_cond_timedwait(&all->cv, &all->mu, &ts) != 0)
            break;
    pthread_mutex_unlock(&all->mu);
    assert_int_equal(all->running, 0);
    usleep(2000); /* a second callback would have come by now */
    assert_int_equal(atomic_load(&all->answered), atomic_load(&all->accepted));
    assert_int_equal(atomic_load(&all->wrong), 0);
    assert_int_equal(atomic_load(&all->stale), 0);
}

/* The counters once the workers have settled their lanes (a lane drops the slot of a
 * request whose callback submitted nothing right after that callback returns). */
static void assert_idle(keel_runtime *rt, const keel_counters *want)
{
    keel_counters got;

    for (int i = 0; i < 500; i++) {
        keel_runtime_quiesce(rt);
        keel_counters_get(rt, &got);
        if (got.leases == want->leases && got.contexts_in_use == want->contexts_in_use &&
            got.queued == want->queued)
            break;
        usleep(1000);
    }
    tu_assert_counters(rt, want);
}

static uint64_t runs_inline(keel_runtime *rt)
{
    keel_model_stats st;

    assert_int_equal(keel_model_stats_get(rt, "m", &st), KEEL_OK);
    return st.runs_inline;
}

/* 8 chains of 400 steps on 2 workers and 2 contexts: all answered once, correctly, most in
 * lanes, and the counters back to idle. */
static void test_chains_exactly_once(void **state)
{
    static const keel_counters idle = {0, 0, 0, 1, 2, 0, 0};
    fixture f;
    chains all;
    chain c[8];
    keel_model_stats st;

    (void)state;
    start(&f, 2, 2);
    chains_start(&all, c, 8, f.rt, 400);
    chains_wait(&all);
    assert_int_equal(atomic_load(&all.answered), 8 * 400);
    assert_int_equal(atomic_load(&all.by_status[KEEL_OK]), 8 * 400);
    assert_int_equal(keel_model_stats_get(f.rt, "m", &st), KEEL_OK);
    assert_int_equal(st.success, 8 * 400);
    assert_int_equal(st.runs_inline + st.runs_handed_off, 8 * 400);
    /* Only each chain's first two steps must go through the queue. */
    assert_true(st.runs_inline >= 8 * 400 / 2);
    assert_idle(f.rt, &idle);
    stop(&f);
}

/* A callback submits a request and cancels it at once: it is in the callback's worker's
 * lane, not run yet, so it is answered "cancelled while queued" (by the lane, once the
 * callback returned) and never reaches the backend; the chain's next request still runs. */
typedef struct canceller {
    keel_runtime *rt;
    int phase;
    int bad; /* a failure seen in a callback */
    keel_err cancelled_status;
    char msg[256];
    long runs_before;
    long runs_at_cancel_answer;
    bool submitting;         /* in the callback that submits and cancels */
    bool answered_in_cancel; /* the cancelled one answered inside keel_request_cancel */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
} canceller;

static void cancel_done(canceller *k, bool bad)
{
    pthread_mutex_lock(&k->mu);
    k->bad += bad;
    k->done = true;
    pthread_cond_signal(&k->cv);
    pthread_mutex_unlock(&k->mu);
}

static void cancel_cb(keel_request *req, keel_err status, void *user)
{
    canceller *k = user;
    keel_request *next;
    int phase = k->phase++;

    switch (phase) {
    case 0: /* submitted by the test thread: the next one comes from a worker's callback */
    case 1: /* ... and ends on a worker, whose lane keeps its slot: the next goes there */
        keel_request_destroy(req);
        if (status != KEEL_OK || (next = req_x(k->rt, 3.0f)) == NULL) {
            cancel_done(k, true);
            return;
        }
        if (phase == 1) {
            k->runs_before = atomic_load(&mock.runs);
            k->submitting = true;
        }
        if (keel_infer_submit(next, cancel_cb, k) != KEEL_OK) {
            keel_request_destroy(next);
            cancel_done(k, true);
            return;
        }
        /* Phase 0: next is queued and may already run on the other worker, whose callback
         * uses k: nothing more here. Phase 1: next is in this worker's lane, which runs it
         * only after this callback returns. */
        if (phase == 1) {
            if (keel_request_cancel(next) != KEEL_OK)
                k->bad++;
            k->submitting = false;
        }
        return;
    case 2: /* the cancelled one */
        k->cancelled_status = status;
        snprintf(k->msg, sizeof(k->msg), "%s", keel_request_error(req));
        k->runs_at_cancel_answer = atomic_load(&mock.runs);
        k->answered_in_cancel = k->submitting;
        keel_request_destroy(req);
        if ((next = req_x(k->rt, 4.0f)) == NULL || keel_infer_submit(next, cancel_cb, k) != KEEL_OK)
            cancel_done(k, true);
        return;
    default: /* the one after it */
        cancel_done(k, status != KEEL_OK || factor_of(req, 4.0f) != 2.0f);
        keel_request_destroy(req);
        return;
    }
}

static void test_cancel_in_lane(void **state)
{
    static const keel_counters idle = {0, 0, 0, 1, 1, 0, 0};
    fixture f;
    canceller k = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

    (void)state;
    start(&f, 2, 1);
    k.rt = f.rt;
    assert_int_equal(keel_infer_submit(req_x(f.rt, 1.0f), cancel_cb, &k), KEEL_OK);
    pthread_mutex_lock(&k.mu);
    while (!k.done)
        pthread_cond_wait(&k.cv, &k.mu);
    pthread_mutex_unlock(&k.mu);
    assert_int_equal(k.bad, 0);
    assert_int_equal(k.phase, 4);
    assert_int_equal(k.cancelled_status, KEEL_ECANCELED);
    assert_string_equal(k.msg, "request cancelled while queued");
    assert_int_equal(k.runs_at_cancel_answer, k.runs_before); /* never ran */
    /* It was answered by its worker's lane after the submitting callback returned; a
     * request in the shared queue is answered inside keel_request_cancel. */
    assert_false(k.answered_in_cancel);
    assert_idle(f.rt, &idle);
    stop(&f);
}

/* Hot swaps (in place, and to a new version) while 6 chains run in lanes: a request
 * submitted after a swap returned is answered by that generation or a newer one. */
static void test_swap_never_stale(void **state)
{
    static const keel_counters idle = {0, 0, 0, 1, 2, 0, 0};
    fixture f;
    chains all;
    chain c[6];
    uint64_t inline0;

    (void)state;
    start(&f, 2, 2);
    chains_start(&all, c, 6, f.rt, 0);
    usleep(20000);
    inline0 = runs_inline(f.rt);
    assert_true(inline0 > 0); /* lanes formed before the first swap */
    for (int n = 1; n <= 10; n++) {
        /* Reload n serves factor 2 + n: odd n a new version (the old slot is removed),
         * even n the same version again (the generation is swapped in place). */
        long version = 1 + (n + 1) / 2;
        mock_write_version(f.repo, "m", version, 2.0 + n);
        assert_int_equal(keel_model_load(f.rt, "m", NULL, 0), KEEL_OK);
        atomic_store(&all.reloads, n);
        usleep(10000);
    }
    usleep(20000);
    assert_true(runs_inline(f.rt) > inline0); /* lanes formed again after the swaps */
    atomic_store(&all.stop, true);
    chains_wait(&all);
    assert_int_equal(atomic_load(&all.refused), 0);
    assert_int_equal(atomic_load(&all.answered), atomic_load(&all.by_status[KEEL_OK]));
    assert_idle(f.rt, &idle);
    stop(&f);
}

/* Unload while 6 chains run in lanes: every accepted request is answered once (with its
 * answer or "unloaded"), later submits are refused, and nothing is left in flight. */
static void test_unload_under_lanes(void **state)
{
    static const keel_counters idle = {0, 0, 0, 0, 0, 0, 0};
    fixture f;
    chains all;
    chain c[6];

    (void)state;
    start(&f, 2, 2);
    chains_start(&all, c, 6, f.rt, 0);
    usleep(20000);
    assert_true(runs_inline(f.rt) > 0);
    assert_int_equal(keel_model_unload(f.rt, "m"), KEEL_OK);
    chains_wait(&all); /* each chain ends at its first refused submit or failed answer */
    assert_int_equal(atomic_load(&all.refused) + atomic_load(&all.by_status[KEEL_EUNAVAILABLE]), 6);
    assert_idle(f.rt, &idle);
    stop(&f);
}

/* keel_runtime_destroy while 6 chains run in lanes: every accepted request is answered
 * exactly once before destroy returns, and nothing leaks (the sanitizer builds check). */
static void test_destroy_under_lanes(void **state)
{
    fixture f;
    chains all;
    chain c[6];
    long answered;

    (void)state;
    start(&f, 2, 2);
    chains_start(&all, c, 6, f.rt, 0);
    usleep(20000);
    assert_true(runs_inline(f.rt) > 0);
    stop(&f); /* destroys the runtime mid-chain */
    answered = atomic_load(&all.answered);
    assert_int_equal(answered, atomic_load(&all.accepted));
    assert_int_equal(all.running, 0);
    assert_int_equal(atomic_load(&all.wrong), 0);
    assert_true(atomic_load(&all.by_status[KEEL_ESHUTDOWN]) + atomic_load(&all.refused) >= 1);
}

/* Lanes give way: with 4 chains keeping both workers' lanes busy (one context each), a
 * request another thread queues is answered after a few lane runs (a lane yields
 * after each of its requests while another thread's request is queued; without that, it
 * waits until the lanes happen to empty: thousands of runs and more), and so are keel_infer
 * calls. The lane runs are counted from its submit to its callback (the test thread sleeps
 * meanwhile, so the two workers have the two cores). */
typedef struct outside {
    keel_runtime *rt;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t inline_at_submit, waited;
    bool done, bad;
} outside;

static void outside_cb(keel_request *req, keel_err status, void *user)
{
    outside *o = user;
    keel_model_stats st;
    uint64_t now = keel_model_stats_get(o->rt, "m", &st) == KEEL_OK ? st.runs_inline : 0;
    bool bad = status != KEEL_OK || factor_of(req, 1.0f) != 2.0f;

    keel_request_destroy(req);
    pthread_mutex_lock(&o->mu);
    o->waited = now - o->inline_at_submit;
    o->bad = bad;
    o->done = true;
    pthread_cond_signal(&o->cv);
    pthread_mutex_unlock(&o->mu);
}

static void test_lanes_give_way(void **state)
{
    static const keel_counters idle = {0, 0, 0, 1, 2, 0, 0};
    fixture f;
    chains all;
    chain c[4];
    outside o = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    uint64_t max_waited = 0;

    (void)state;
    start(&f, 2, 2);
    o.rt = f.rt;
    chains_start(&all, c, 4, f.rt, 0);
    usleep(20000);
    assert_true(runs_inline(f.rt) > 0);
    for (int i = 0; i < 200; i++) {
        keel_request *req = req_x(f.rt, 5.0f + (float)i);
        assert_int_equal(keel_infer(req), KEEL_OK);
        assert_true(factor_of(req, 5.0f + (float)i) == 2.0f);
        keel_request_destroy(req);

        req = req_x(f.rt, 1.0f);
        o.done = false;
        o.inline_at_submit = runs_inline(f.rt);
        assert_int_equal(keel_infer_submit(req, outside_cb, &o), KEEL_OK);
        pthread_mutex_lock(&o.mu);
        while (!o.done)
            pthread_cond_wait(&o.cv, &o.mu);
        pthread_mutex_unlock(&o.mu);
        assert_false(o.bad);
        max_waited = o.waited > max_waited ? o.waited : max_waited;
    }
    /* Typically 3-5, 45 seen; the bound leaves room for a worker preempted for a few ms
     * while the other runs its lane (CI runs tests side by side); without the yield it was
     * 127,650 to 1,349,894 in three runs. */
    if (max_waited > 20000)
        fail_msg("a queued request waited while the lanes ran %llu requests",
                 (unsigned long long)max_waited);
    atomic_store(&all.stop, true);
    chains_wait(&all);
    assert_idle(f.rt, &idle);
    stop(&f);
}

/* One context, two workers: one lane holds the context, the other worker's lane cannot
 * take one and gives its requests back to the queue; all still answered, counters idle. */
static void test_one_context_two_lanes(void **state)
{
    static const keel_counters idle = {0, 0, 0, 1, 1, 0, 0};
    fixture f;
    chains all;
    chain c[8];

    (void)state;
    start(&f, 2, 1);
    chains_start(&all, c, 8, f.rt, 300);
    chains_wait(&all);
    assert_int_equal(atomic_load(&all.by_status[KEEL_OK]), 8 * 300);
    assert_true(runs_inline(f.rt) > 0);
    assert_idle(f.rt, &idle);
    stop(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chains_exactly_once),   cmocka_unit_test(test_cancel_in_lane),
        cmocka_unit_test(test_swap_never_stale),      cmocka_unit_test(test_unload_under_lanes),
        cmocka_unit_test(test_destroy_under_lanes),   cmocka_unit_test(test_lanes_give_way),
        cmocka_unit_test(test_one_context_two_lanes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
