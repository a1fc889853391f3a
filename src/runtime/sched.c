/*
 * sched.c: admission, queueing, dispatch, the worker threads, cancel, and the one completion
 * function that ends every request.
 *
 * DESIGN
 * Admission: a request takes one of its vslot's max_inflight slots at submit (under rt->mu)
 * or is refused at once with KEEL_EUNAVAILABLE; it never blocks and the queue never grows
 * past the bound. The slot is held until complete() and released there, exactly once.
 *
 * Dispatch: rt keeps a FIFO "ready list" of vslots that can dispatch now (a queued request
 * and an idle context in the current generation). A worker pops a vslot, pops its oldest
 * request, and either answers it KEEL_ETIMEDOUT (deadline passed: it never reaches the
 * backend) or takes a lease: a reference on the vslot's current generation and one of its
 * idle contexts. The vslot goes back on the ready list's tail if it can still dispatch,
 * which round-robins workers across models.
 *
 * Completion (complete()): under rt->mu the context goes back to the generation it came from
 * (a retired generation keeps it until it is freed, and never hands it out again) and the
 * slot is dropped; after unlocking, the generation reference is released, statistics are
 * updated and the callback runs.
 *
 * Run here (KEEL_SUBMIT_RUN_HERE, keel_infer): a request that would be first in an empty
 * queue while its generation has an idle context is leased at submit and run by the caller's
 * thread, never overtaking a queued request and never waiting for a context. With
 * KEEL_SUBMIT_RUN_IF_FAST it must also be "fast": no preprocessing, and the generation's
 * estimate of the backend's run time for the request's batch size class (est_run_ns, one
 * per power of two) known and below rt->inline_max_ns. Every run, wherever it ran, updates
 * the estimate of its class: a slower sample moves it half-way up at once (one 50 ms run
 * makes a 10 us model slow), a faster one an eighth of the way down (a model that turned
 * fast again comes back inline after a few handed-off runs). An unmeasured class is slow:
 * its first run is handed off. Where each request ran is counted per model
 * (stats.runs_inline / runs_handed_off). All locks: see internal.h. Layer: calls registry.c,
 * request.c, preprocess.c (the run path), budget.c (want_load) and generation.c only.
 */
#include <string.h>
#include <time.h>

#include "runtime/budget.h"
#include "runtime/generation.h"
#include "runtime/preprocess.h"
#include "runtime/registry.h"
#include "runtime/request.h"
#include "runtime/sched.h"

static bool vslot_has_idle_context(const keel__vslot *v)
{
    const keel__generation *g = v->current;

    return g != NULL && g->nfree > 0 && g->in_use < g->max_in_use;
}

static bool vslot_can_dispatch(const keel__vslot *v)
{
    return v->qhead != NULL && vslot_has_idle_context(v);
}

void keel__vslot_kick_locked(keel_runtime *rt, keel__vslot *v)
{
    if (v->in_ready || v->removed || !vslot_can_dispatch(v))
        return;
    v->in_ready = true;
    v->ready_next = NULL;
    if (rt->ready_tail != NULL)
        rt->ready_tail->ready_next = v;
    else
        rt->ready_head = v;
    rt->ready_tail = v;
    pthread_cond_signal(&rt->work_cv);
}

static keel__vslot *ready_pop_locked(keel_runtime *rt)
{
    keel__vslot *v = rt->ready_head;

    if (v == NULL)
        return NULL;
    rt->ready_head = v->ready_next;
    if (rt->ready_head == NULL)
        rt->ready_tail = NULL;
    v->ready_next = NULL;
    v->in_ready = false;
    return v;
}

static void ready_remove_locked(keel_runtime *rt, keel__vslot *v)
{
    keel__vslot **pp = &rt->ready_head;
    keel__vslot *prev = NULL;

    if (!v->in_ready)
        return;
    while (*pp != NULL && *pp != v) {
        prev = *pp;
        pp = &(*pp)->ready_next;
    }
    KEEL__ASSERT(*pp == v);
    *pp = v->ready_next;
    if (rt->ready_tail == v)
        rt->ready_tail = prev;
    v->ready_next = NULL;
    v->in_ready = false;
}

/* Unlinks a queued request from v's FIFO and drops the queued counters. */
static void queue_unlink_locked(keel_runtime *rt, keel__vslot *v, keel_request *req)
{
    if (req->qprev != NULL)
        req->qprev->qnext = req->qnext;
    else
        v->qhead = req->qnext;
    if (req->qnext != NULL)
        req->qnext->qprev = req->qprev;
    else
        v->qtail = req->qprev;
    req->qnext = req->qprev = NULL;
    keel__counter_add(rt, v->entry, KEEL__CNT(queued), -1);
}

void keel__vslot_drain_locked(keel_runtime *rt, keel__vslot *v, keel_request **list)
{
    keel_request *tail = *list;

    while (tail != NULL && tail->qnext != NULL)
        tail = tail->qnext;
    while (v->qhead != NULL) {
        keel_request *req = v->qhead;
        queue_unlink_locked(rt, v, req);
        req->state = KEEL__REQ_COMPLETING;
        if (tail != NULL)
            tail->qnext = req;
        else
            *list = req;
        tail = req;
    }
    ready_remove_locked(rt, v);
}

void keel__vslot_move_latest_locked(keel_runtime *rt, keel__vslot *from, keel__vslot *to)
{
    keel_request *req = from->qhead;

    KEEL__ASSERT(from != to && from->entry == to->entry);
    while (req != NULL) {
        keel_request *next = req->qnext;
        if (req->version == -1) {
            queue_unlink_locked(rt, from, req);
            from->inflight--;
            to->inflight++; /* already admitted: may exceed the bound once */
            req->vslot = to;
            req->qprev = to->qtail;
            if (to->qtail != NULL)
                to->qtail->qnext = req;
            else
                to->qhead = req;
            to->qtail = req;
            keel__counter_add(rt, to->entry, KEEL__CNT(queued), 1);
        }
        req = next;
    }
    if (from->qhead == NULL)
        ready_remove_locked(rt, from);
    keel__vslot_kick_locked(rt, to);
}

/* Picks the vslot for a request under rt->mu, or explains why there is none. A model that
 * is evicted or in a resource-preserving swap has parked vslots (internal.h): the request
 * waits in one for the load (an evicted model's load is asked for here). */
static keel_err pick_vslot_locked(keel_request *req, keel__model_entry *e, keel__vslot **out)
{
    keel__vslot *best = NULL;

    *out = NULL;
    for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
        if (v->current == NULL)
            continue;
        if (req->version == -1 || v->version == req->version)
            best = v; /* ascending list: the last match is the newest */
    }
    if (best != NULL) {
        *out = best;
        return KEEL_OK;
    }
    if (e->evicted || e->swapping) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
            if (req->version == -1 || v->version == req->version)
                best = v;
        }
    }
    if (best != NULL && e->evicted && e->next_retry_ns > keel__now_ns()) {
        keel__request_set_error(
            req,
            "model '%s' was evicted by the model memory limit and reloading "
            "it failed (%s); next attempt in %llu ms",
            e->name, e->last_error_msg,
            (unsigned long long)((e->next_retry_ns - keel__now_ns()) / 1000000));
        return KEEL_EUNAVAILABLE;
    }
    if (best != NULL) {
        if (e->evicted)
            keel__want_load_locked(req->rt, e);
        *out = best;
        return KEEL_OK;
    }
    if (req->version != -1 && e->versions != NULL) {
        keel__request_set_error(req, "model '%s' has no version %lld", e->name,
                                (long long)req->version);
        return KEEL_ENOTFOUND;
    }
    keel__request_set_error(req, "model '%s' is not ready (%s)", e->name,
                            keel_model_state_name(e->state));
    return KEEL_EUNAVAILABLE;
}

static void lease_locked(keel_runtime *rt, keel__vslot *v, keel_request *req);
static void run_and_complete(keel_request *req);

int keel__est_class(int64_t batch)
{
    int c = 0;

    while (batch > 1 && c < KEEL__EST_CLASSES - 1) {
        batch >>= 1;
        c++;
    }
    return c;
}

uint64_t keel__est_update(uint64_t est, uint64_t sample_ns)
{
    if (sample_ns == 0)
        sample_ns = 1; /* 0 means "not measured" */
    if (est == 0)
        return sample_ns;
    if (sample_ns >= est)
        return est + (sample_ns - est + 1) / 2;
    return est - (est - sample_ns) / 8;
}

bool keel__est_is_fast(uint64_t est, uint64_t bound_ns)
{
    return est != 0 && est < bound_ns;
}

/* Rows the request will run as: the first input's leading dimension when the model has a
 * batch dimension (bind_inputs checks the rest when it runs), else 1. */
static int64_t request_rows(const keel_request *req, const keel__model_config *cfg)
{
    if (cfg->max_batch_size > 0 && req->ninputs > 0 && req->inputs[0].ndim > 0 &&
        req->inputs[0].shape[0] > 0)
        return req->inputs[0].shape[0];
    return 1;
}

/* Under rt->mu: may req run on the submitting thread under KEEL_SUBMIT_RUN_IF_FAST? */
static bool vslot_is_fast_for(const keel_runtime *rt, const keel__vslot *v, const keel_request *req)
{
    const keel__generation *g = v->current;
    uint64_t est;

    if (g->cfg->preprocess != NULL)
        return false;
    est = atomic_load_explicit(&g->est_run_ns[keel__est_class(request_rows(req, g->cfg))],
                               memory_order_relaxed);
    return keel__est_is_fast(est, rt->inline_max_ns);
}

/*
 * Admits req (see the file's DESIGN). With may_run_here (keel_infer, KEEL_SUBMIT_RUN_HERE), a
 * request that would be first in an empty queue while its generation has an idle context is
 * leased at once and *run_here is set: the caller runs it on its own thread through
 * run_and_complete(), the same code a worker uses, which saves the two thread hand-offs a
 * synchronous call otherwise costs (docs/PERFORMANCE.md). Otherwise it is queued for a worker.
 */
static keel_err submit(keel_request *req, keel_infer_cb cb, void *user, unsigned flags,
                       bool *run_here)
{
    keel_runtime *rt;
    keel__model_entry *e;
    keel__vslot *v = NULL;
    keel_err err;

    *run_here = false;
    if (req == NULL || cb == NULL)
        return KEEL_EINVAL;
    rt = req->rt;
    pthread_mutex_lock(&rt->mu);
    if (req->state != KEEL__REQ_IDLE) {
        pthread_mutex_unlock(&rt->mu);
        return KEEL_EBUSY; /* do not touch errmsg: the request belongs to the runtime */
    }
    /* The request is ours now (IDLE, under the lock): results of a previous run go. */
    req->errmsg[0] = '\0';
    if (rt->shutting_down) {
        keel__request_set_error(req, "the runtime is shutting down");
        err = KEEL_ESHUTDOWN;
        goto fail;
    }
    if ((e = keel__entry_find_locked(rt, req->model)) == NULL) {
        keel__request_set_error(req, "unknown model '%s'", req->model);
        err = KEEL_ENOTFOUND;
        goto fail;
    }
    if ((err = pick_vslot_locked(req, e, &v)) != KEEL_OK)
        goto fail;
    if (v->inflight >= v->max_inflight) {
        atomic_fetch_add_explicit(&e->stats.rejected, 1, memory_order_relaxed);
        keel__request_set_error(req, "model '%s' version %lld: queue full (%u requests)", e->name,
                                (long long)v->version, v->max_inflight);
        err = KEEL_EUNAVAILABLE;
        goto fail;
    }

    /* Take the slot. */
    v->inflight++;
    keel__counter_add(rt, e, KEEL__CNT(leases), 1);
    req->state = KEEL__REQ_QUEUED;
    req->cancel_requested = false;
    req->cb = cb;
    req->user = user;
    req->entry = e;
    req->vslot = v;
    req->gen = NULL;
    req->ctx_index = -1;
    req->status = KEEL_OK;
    req->generation_id = 0;
    req->ran_version = -1;
    req->submit_ns = keel__now_ns();
    e->last_used_ns = req->submit_ns; /* LRU for the memory budget: no second clock read */
    req->dispatch_ns = 0;
    req->input_end_ns = req->output_start_ns = req->complete_ns = req->preprocess_ns = 0;
    {
        uint64_t t = req->timeout_us != 0 ? req->timeout_us : v->default_timeout_us;
        /* A timeout too large to add to the clock is no deadline, not an overflowed one. */
        bool fits = t <= (UINT64_MAX - req->submit_ns) / 1000ULL;
        req->deadline_ns = t != 0 && fits ? req->submit_ns + t * 1000ULL : 0;
    }
    if (keel__fault_hit(KEEL__FAULT_SUBMIT)) {
        /* A failure after the slot was taken: undo everything; the callback never runs. */
        v->inflight--;
        keel__counter_add(rt, e, KEEL__CNT(leases), -1);
        req->state = KEEL__REQ_IDLE;
        req->cb = NULL;
        req->user = NULL;
        req->entry = NULL;
        req->vslot = NULL;
        keel__request_set_error(req, "injected submit fault");
        err = KEEL_EUNAVAILABLE;
        goto fail;
    }
    if ((flags & (KEEL_SUBMIT_RUN_HERE | KEEL_SUBMIT_RUN_IF_FAST)) != 0 && v->qhead == NULL &&
        vslot_has_idle_context(v) &&
        ((flags & KEEL_SUBMIT_RUN_IF_FAST) == 0 || vslot_is_fast_for(rt, v, req))) {
        req->dispatch_ns = req->submit_ns;
        lease_locked(rt, v, req);
        atomic_fetch_add_explicit(&e->stats.runs_inline, 1, memory_order_relaxed);
        *run_here = true;
        pthread_mutex_unlock(&rt->mu);
        return KEEL_OK;
    }
    req->qnext = NULL;
    req->qprev = v->qtail;
    if (v->qtail != NULL)
        v->qtail->qnext = req;
    else
        v->qhead = req;
    v->qtail = req;
    keel__counter_add(rt, e, KEEL__CNT(queued), 1);
    if (v->current == NULL)
        pthread_cond_broadcast(&rt->work_cv); /* parked: idle workers watch its deadline */
    else
        keel__vslot_kick_locked(rt, v);
    pthread_mutex_unlock(&rt->mu);
    return KEEL_OK;

fail:
    pthread_mutex_unlock(&rt->mu);
    return err;
}

keel_err keel_infer_submit(keel_request *req, keel_infer_cb cb, void *user)
{
    return keel_infer_submit_ex(req, 0, cb, user);
}

keel_err keel_infer_submit_ex(keel_request *req, unsigned flags, keel_infer_cb cb, void *user)
{
    bool run_here;
    keel_err err;

    if ((flags & ~(unsigned)(KEEL_SUBMIT_RUN_HERE | KEEL_SUBMIT_RUN_IF_FAST)) != 0)
        return KEEL_EINVAL;
    err = submit(req, cb, user, flags, &run_here);
    if (err == KEEL_OK && run_here)
        run_and_complete(req); /* cb runs here; req may be gone afterwards */
    return err;
}

/* Ends a request: see the file's DESIGN. Called with no lock held, exactly once per
 * successful submit. status_in is what happened; msg (may be NULL) overrides the message. */
static void complete(keel_request *req, keel_err status, const char *msg)
{
    keel_runtime *rt = req->rt;
    keel__model_entry *e = req->entry;
    keel__vslot *v = req->vslot;
    keel__generation *g = req->gen;
    keel__vslot *free_vslot = NULL;
    keel_infer_cb cb;
    void *user;
    uint64_t now = keel__now_ns();

    if (msg != NULL)
        keel__request_set_error(req, "%s", msg);

    pthread_mutex_lock(&rt->mu);
    if (req->cancel_requested && status == KEEL_OK) {
        status = KEEL_ECANCELED;
        keel__request_set_error(req, "request cancelled while running");
    }
    if (g != NULL) {
        KEEL__ASSERT(req->ctx_index >= 0 && req->ctx_index < g->nctx);
        g->free_stack[g->nfree++] = req->ctx_index; /* back to its own generation */
        g->in_use--;
        keel__counter_add(rt, e, KEEL__CNT(contexts_in_use), -1);
        if (!g->retired)
            keel__vslot_kick_locked(rt, v);
    }
    KEEL__ASSERT(v->inflight > 0);
    v->inflight--;
    if (v->removed && v->inflight == 0)
        free_vslot = v;
    keel__counter_add(rt, e, KEEL__CNT(leases), -1);
    cb = req->cb;
    user = req->user;
    req->cb = NULL;
    req->user = NULL;
    req->gen = NULL;
    req->ctx_index = -1;
    req->vslot = NULL;
    req->entry = NULL;
    req->status = status;
    req->complete_ns = now;
    req->state = KEEL__REQ_IDLE;
    pthread_mutex_unlock(&rt->mu);

    /* Released after unlocking: the generation may be freed (by the reaper). */
    keel__generation_release(g);
    if (free_vslot != NULL)
        free(free_vslot);
    if (status != KEEL_OK)
        keel__request_clear_outputs(req);

    if (status == KEEL_OK)
        atomic_fetch_add_explicit(&e->stats.success, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&e->stats.failure[status], 1, memory_order_relaxed);
    if (req->dispatch_ns != 0)
        atomic_fetch_add_explicit(&e->stats.queue_ns, req->dispatch_ns - req->submit_ns,
                                  memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&e->stats.queue_ns, now - req->submit_ns, memory_order_relaxed);
    atomic_store_explicit(&e->stats.last_inference_unix_ms, keel__unix_ms(), memory_order_relaxed);

    KEEL__ASSERT(cb != NULL);
    cb(req, status, user); /* req may be destroyed or resubmitted from here on */
}

void keel__complete_list(keel_request *list, keel_err status, const char *why)
{
    while (list != NULL) {
        keel_request *next = list->qnext;
        list->qnext = NULL;
        complete(list, status, why);
        list = next;
    }
}

/* Runs a leased request on its context (worker thread, no lock held). */
static keel_err run_leased(keel_request *req, int64_t *batch_out)
{
    keel__generation *g = req->gen;
    char errbuf[KEEL__ERRLEN];
    keel__run_io io;
    uint64_t t0;
    keel_err err;

    errbuf[0] = '\0';
    *batch_out = 0;
    keel__request_clear_outputs(req);
    if ((err = keel__request_bind_inputs(req, g->cfg, g->backend->input_types, batch_out)) !=
        KEEL_OK)
        return err;
    io.inputs = req->views;
    io.ninputs = g->cfg->ninputs;
    io.batch = *batch_out;
    io.emit = keel__request_emit;
    io.sink = req;
    io.errbuf = errbuf;
    io.errlen = sizeof(errbuf);
    if (keel__fault_hit(KEEL__FAULT_BACKEND_RUN)) {
        keel__request_set_error(req, "model '%s': injected backend run fault", g->cfg->name);
        return KEEL_EBACKEND;
    }
    t0 = keel__now_ns();
    req->input_end_ns = t0;
    err = g->backend->run(g->ctxs[req->ctx_index], &io);
    req->output_start_ns = keel__now_ns();
    t0 = req->output_start_ns - t0;
    atomic_fetch_add_explicit(&g->entry->stats.compute_ns, t0, memory_order_relaxed);
    {
        /* Racing updates of one class may lose a sample: an estimate needs no more. */
        _Atomic uint64_t *est = &g->est_run_ns[keel__est_class(*batch_out)];
        atomic_store_explicit(est,
                              keel__est_update(atomic_load_explicit(est, memory_order_relaxed), t0),
                              memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&g->entry->stats.execution_count, 1, memory_order_relaxed);
    if (err != KEEL_OK) {
        keel__request_set_error(req, "model '%s' version %lld: %s", g->cfg->name,
                                (long long)g->version,
                                errbuf[0] != '\0' ? errbuf : keel_strerror(err));
        return err;
    }
    return KEEL_OK;
}

/* Under rt->mu: gives req a lease on v's current generation: a reference and an idle
 * context (the caller checked there is one). */
static void lease_locked(keel_runtime *rt, keel__vslot *v, keel_request *req)
{
    keel__generation *g = v->current;

    keel__generation_acquire(g);
    req->gen = g;
    req->ctx_index = g->free_stack[--g->nfree];
    g->in_use++;
    keel__counter_add(rt, v->entry, KEEL__CNT(contexts_in_use), 1);
    req->generation_id = g->id;
    req->ran_version = g->version;
    req->state = KEEL__REQ_RUNNING;
}

/* Runs a leased request and completes it (worker thread, or keel_infer's caller). */
static void run_and_complete(keel_request *req)
{
    int64_t batch = 0;
    keel__prep_swap sw;
    uint64_t t0 = req->gen->cfg->preprocess != NULL ? keel__now_ns() : 0;
    keel_err err = keel__preprocess_begin(req, &sw); /* image models: decode in a worker */

    if (t0 != 0)
        req->preprocess_ns = keel__now_ns() - t0;

    if (err == KEEL_OK)
        err = run_leased(req, &batch);
    keel__preprocess_end(req, &sw);

    if (err == KEEL_OK)
        atomic_fetch_add_explicit(&req->gen->entry->stats.inference_count, (uint64_t)batch,
                                  memory_order_relaxed);
    complete(req, err, NULL);
}

/* Under rt->mu: unlinks the requests of parked vslots whose deadline is <= now into *list
 * (state COMPLETING, error message set); returns the earliest remaining deadline, 0 if none. */
static uint64_t parked_expire_locked(keel_runtime *rt, uint64_t now, keel_request **list)
{
    uint64_t next = 0;

    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
            keel_request *req = v->current == NULL ? v->qhead : NULL;
            while (req != NULL) {
                keel_request *qn = req->qnext;
                if (req->deadline_ns != 0 && req->deadline_ns <= now) {
                    queue_unlink_locked(rt, v, req);
                    req->state = KEEL__REQ_COMPLETING;
                    keel__request_set_error(
                        req, "deadline exceeded after %llu us waiting for model '%s' to load",
                        (unsigned long long)((now - req->submit_ns) / 1000), e->name);
                    req->qnext = *list;
                    *list = req;
                } else if (req->deadline_ns != 0 && (next == 0 || req->deadline_ns < next)) {
                    next = req->deadline_ns;
                }
                req = qn;
            }
        }
    }
    return next;
}

/* Under rt->mu: waits for work. While vslots are parked, it also wakes for the earliest
 * deadline of a request waiting in one, and answers the expired ones (lock dropped). */
static void worker_wait_locked(keel_runtime *rt)
{
    while (!rt->stopping && rt->ready_head == NULL) {
        keel_request *expired = NULL;
        uint64_t next = 0;
        struct timespec ts;

        if (rt->nparked > 0)
            next = parked_expire_locked(rt, keel__now_ns(), &expired);
        if (expired != NULL) {
            pthread_mutex_unlock(&rt->mu);
            keel__complete_list(expired, KEEL_ETIMEDOUT, NULL);
            pthread_mutex_lock(&rt->mu);
            continue;
        }
        if (next == 0) {
            pthread_cond_wait(&rt->work_cv, &rt->mu);
            continue;
        }
        ts.tv_sec = (time_t)(next / 1000000000u);
        ts.tv_nsec = (long)(next % 1000000000u);
        pthread_cond_timedwait(&rt->work_cv, &rt->mu, &ts); /* work_cv uses CLOCK_MONOTONIC */
    }
}

void *keel__worker_main(void *arg)
{
    keel_runtime *rt = arg;

    pthread_mutex_lock(&rt->mu);
    for (;;) {
        keel__vslot *v;
        keel_request *req;
        bool expired;

        worker_wait_locked(rt);
        if ((v = ready_pop_locked(rt)) == NULL)
            break; /* stopping and nothing left to dispatch */
        if (!vslot_can_dispatch(v))
            continue; /* its last queued request was cancelled meanwhile */
        req = v->qhead;
        queue_unlink_locked(rt, v, req);
        req->dispatch_ns = keel__now_ns();
        expired = req->deadline_ns != 0 && req->dispatch_ns >= req->deadline_ns;
        if (expired) {
            req->state = KEEL__REQ_COMPLETING;
        } else {
            lease_locked(rt, v, req);
            atomic_fetch_add_explicit(&v->entry->stats.runs_handed_off, 1, memory_order_relaxed);
        }
        keel__vslot_kick_locked(rt, v);
        if (rt->ready_head != NULL)
            pthread_cond_signal(&rt->work_cv);
        pthread_mutex_unlock(&rt->mu);

        if (expired) {
            keel__request_set_error(
                req, "deadline exceeded after %llu us in queue",
                (unsigned long long)((req->dispatch_ns - req->submit_ns) / 1000));
            complete(req, KEEL_ETIMEDOUT, NULL);
        } else {
            run_and_complete(req);
        }
        pthread_mutex_lock(&rt->mu);
    }
    pthread_mutex_unlock(&rt->mu);
    return NULL;
}

keel_err keel_request_cancel(keel_request *req)
{
    keel_runtime *rt;
    keel__vslot *v;

    if (req == NULL)
        return KEEL_EINVAL;
    rt = req->rt;
    pthread_mutex_lock(&rt->mu);
    switch (req->state) {
    case KEEL__REQ_QUEUED:
        v = req->vslot;
        queue_unlink_locked(rt, v, req);
        req->state = KEEL__REQ_COMPLETING;
        pthread_mutex_unlock(&rt->mu);
        complete(req, KEEL_ECANCELED, "request cancelled while queued");
        return KEEL_OK; /* req may already be destroyed by its callback */
    case KEEL__REQ_RUNNING:
        req->cancel_requested = true;
        pthread_mutex_unlock(&rt->mu);
        return KEEL_OK;
    default:
        pthread_mutex_unlock(&rt->mu);
        return KEEL_EINVAL;
    }
}

static void sync_done(keel_request *req, keel_err status, void *user)
{
    (void)status;
    (void)user;
    pthread_mutex_lock(&req->wait_mu);
    req->wait_done = true;
    pthread_cond_signal(&req->wait_cv);
    pthread_mutex_unlock(&req->wait_mu);
}

keel_err keel_infer(keel_request *req)
{
    bool run_here;
    keel_err err;

    if (req == NULL)
        return KEEL_EINVAL;
    pthread_mutex_lock(&req->wait_mu);
    req->wait_done = false;
    pthread_mutex_unlock(&req->wait_mu);
    if ((err = submit(req, sync_done, NULL, KEEL_SUBMIT_RUN_HERE, &run_here)) != KEEL_OK)
        return err;
    if (run_here)
        run_and_complete(req); /* sync_done runs here, before the wait below */
    pthread_mutex_lock(&req->wait_mu);
    while (!req->wait_done)
        pthread_cond_wait(&req->wait_cv, &req->wait_mu);
    pthread_mutex_unlock(&req->wait_mu);
    return keel_request_status(req);
}
