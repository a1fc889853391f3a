/*
 * sched.c: admission, queueing, dynamic batching, dispatch, the worker threads, the timer
 * thread, cancel, and the completion functions that end every request.
 *
 * DESIGN
 * Admission: a request takes one of its vslot's max_inflight slots at submit (under rt->mu)
 * or is refused at once with KEEL_EUNAVAILABLE; it never blocks and the queue never grows
 * past the bound. A priority level whose queue policy sets max_queue_size also bounds the
 * requests queued at that level. The slot is held until the request completes and is
 * released there, exactly once.
 *
 * Queues: each vslot has one FIFO per priority level (level 1 first) and a last FIFO for
 * requests that passed their timeout under a DELAY policy. Dispatch order is level 1's
 * FIFO, level 2's, ..., then the delayed one. The deadline of a request is fixed at submit:
 * the request's timeout, the level's default_timeout_microseconds, or the shorter of the two
 * when the model sets a default without allow_timeout_override.
 *
 * Dispatch: rt keeps a FIFO "ready list" of vslots that can dispatch now (a queued request,
 * an idle context in the current generation, and no batching delay to wait out). A worker
 * pops a vslot and forms a batch under rt->mu (form_batch_locked): expired requests on the
 * way are taken out (REJECT: answered KEEL_ETIMEDOUT; DELAY: moved to the delayed FIFO);
 * the first request in dispatch order starts the batch; the following ones join while they
 * are compatible with it (same input names, datatypes and non-batch dims: batch.c) and the
 * rows fit max_batch_size. A request that is not compatible closes the batch (it starts the
 * next one). Requests are never split. Without dynamic_batching, or with max_batch_size 0,
 * a batch is one request. With preferred_batch_size, the batch is cut after the last request
 * that makes its rows a preferred size, if any does. If the batch is smaller than the
 * largest preferred size (or max_batch_size) and max_queue_delay_microseconds has not
 * passed since its oldest request was submitted, the vslot waits instead (delay_until_ns):
 * a submit that fills the batch, or the timer thread at the delay, makes it ready again.
 * With delay 0 a batch is whatever is queued when a context frees, so requests that pile up
 * while the model is busy run together and a request that finds the model idle runs alone
 * at once. A batch takes one lease: a reference on the generation per request and one idle
 * context for the batch: the worker's own context when it is idle (worker i of the runtime
 * owns context i mod nctx), for any other thread (keel_infer's caller, a server's I/O thread
 * running a request here or a gathered batch) the context it took last if that one is idle,
 * else the one returned last, so that a thread keeps running on one context and the
 * backend's per-context state (XGBoost's proxy matrix and buffers) stays in one core's
 * cache and one thread's allocator (two keel_infer callers taking the one returned last
 * swapped contexts on most calls: docs/PERFORMANCE.md, session 9). The vslot goes back on the ready
 * list's tail if it can still dispatch, which round-robins workers across models. A worker whose
 * batch ends while no vslot waits on the ready list goes on with the same vslot: end_group forms
 * its next batch under the lock acquisition that ended the last one (the context just returned is
 * leased again), so a model with a standing queue costs one acquisition per batch to end-and-form
 * and none of the ready list's pushes, pops and wake-ups; as soon as another vslot waits,
 * the worker goes back to the ready list and the round robin.
 *
 * Run: a batch of one runs as before (run_leased). A larger batch (run_batch) preprocesses
 * and validates each request against the generation's config (a request that fails is
 * answered with its own error and leaves the batch), merges the rest into one input per
 * configured input, runs the backend once, and splits each output back by rows (batch.c).
 * A backend error fails exactly the requests of that batch, each with the message. One
 * lock acquisition returns the batch's context and ends every request of it
 * (end_group); the callbacks run after unlocking.
 *
 * Timer thread: sleeps until the earliest deadline of a queued request or batching delay
 * (timer_next, lowered by submit and by a vslot that starts waiting), then scans the vslots:
 * REJECT-expired requests are answered KEEL_ETIMEDOUT at their deadline even while every
 * context is busy (parked vslots' too: "waiting for model to load"), DELAY-expired ones move
 * behind the others, and vslots whose delay passed are made ready (flush).
 *
 * Deadline and cancel while running: a run group (struct batch: one request run by
 * run_and_complete, or a batch run by run_batch) owns everything its backend call touches.
 * Each request of it has a keel__run_slot (request.h) on the runner's stack or heap: the
 * sink its outputs are emitted into, the requested-output names, and room for its inputs.
 * A running request's phase, in its slot (atomic) and req->run_slot:
 *   PREP (run_slot NULL: preprocess, bind, merge; the runner owns the request)
 *     --runner publishes run_slot (release), phase BACKEND--> BACKEND (the runner touches
 *       only the slot and the group's own buffers, never the request, until it returns)
 *     --backend returns, runner CAS BACKEND->RETURNED--> RETURNED (the request is the
 *       runner's again: outputs move from the sink into it; end_group ends it as before)
 *     --deadline (timer) or keel_request_cancel, under rt->mu, CAS BACKEND->DETACHED-->
 *       DETACHED: detach_locked moves the request's inputs, views and requested names into
 *       the slot, moves its generation reference to the group (b->ndetached), marks the
 *       group's context stuck (b->stuck; g->nstuck, v->nstuck, counter contexts_stuck) and
 *       answers the request (KEEL_ETIMEDOUT / KEEL_ECANCELED, "... while running") through
 *       complete() after unlocking: its admission slot is dropped, its callback runs. The
 *       backend keeps running on the context; whatever it emits lands in the slot.
 * When the backend returns, the runner (end_group, one rt->mu acquisition as before) returns
 * the context (unstuck; to its own generation, which frees it with itself if it was retired),
 * ends the members that returned, then after unlocking releases one generation reference per
 * detached member and frees the slots (keel__run_slot_fini). The timer finds running requests
 * in rt->running (linked at lease, unlinked when ended, detached or held for ordering); one
 * whose deadline passed or that was cancelled while still in PREP (run_slot NULL) is retried
 * every millisecond (preprocessing is bounded by the same deadline); one whose call returned
 * already (RETURNED; a batch's request that failed before the call has a RETURNED slot of
 * its own, slot_not_run) is left to its runner, which ends it at once. Under
 * a DELAY policy the deadline bounds only the queue: a running request is never failed for
 * time (it is still answered at a cancel). A
 * vslot is freed only when it is removed, no request holds a slot (inflight) and no run with
 * detached members is still in the backend (nstuck). An ordered group whose members were all
 * detached still takes its turn: if an earlier group still runs it holds a marker request
 * (rt == NULL) in v->held. A generation whose every usable context is stuck
 * (nstuck >= max_in_use) is not ready (keel_model_is_ready); new requests queue or are
 * rejected by the normal admission rules. A request run on the submitting thread (run here)
 * is answered at its deadline the same way, but that thread stays in the backend: keel_infer
 * therefore hands a request with its own timeout to a worker. Open point: a deadline that
 * comes only from the queue policy (or an async RUN_IF_FAST on a server's I/O thread) still
 * runs here; excluding every request with a deadline from run-here belongs in submit().
 * Lock order: unchanged, rt->mu only; the slot's phase is an atomic that only the runner
 * (without the lock) and a detach (under rt->mu) change, by compare-and-swap.
 *
 * preserve_ordering: each batch dispatched from a vslot takes the next sequence number; a
 * batch that ends before an earlier one (another context was slower) is held, unanswered,
 * until that one ends (end_group), so responses leave in the order batches were formed.
 * Requests answered without running (expired, cancelled while queued) are not held.
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
 * fast again comes back inline after a few handed-off runs); each thread keeps that moving
 * estimate in a copy of its own and stores it only when it moved by more than 1/4 from the
 * stored one (estimate_update). An unmeasured class is slow:
 * its first run is handed off. A batching model (dynamic_batching, max_batch_size > 0) is
 * never "fast": the server's I/O thread queues its requests and goes on reading, so that
 * requests arriving together are batched by a worker (run on the I/O thread, each would run
 * alone). With a max_queue_delay or preserve_ordering it never runs on the submitting thread
 * at all (KEEL_SUBMIT_RUN_HERE, keel_infer): its requests wait to be gathered, or take their
 * place in the order. Where each request ran is
 * counted per model (stats.runs_inline / runs_handed_off).
 *
 * Gather (KEEL_SUBMIT_GATHER, keel_runtime_run_gathered: an event loop's turn): a batching
 * model's request is queued and its vslot put on the ready list *without* waking a worker.
 * The loop, at the end of its turn, calls keel_runtime_run_gathered: every vslot on the
 * ready list at that moment is popped once; one that can dispatch and whose model is fast
 * for the batch it would form now (no preprocessing; the estimate of the size class of
 * min(queued rows, max_batch_size) known and below inline_max_ns) has its batch formed and
 * run on the calling thread (counted inline); the others go back with a worker woken. So
 * the requests one turn read run as one backend call with no hand-off, and a model whose
 * batches are slow, or whose contexts are busy, is dispatched as before (context_return
 * wakes a worker when one frees). A worker that happens to be awake may take a gathered
 * vslot first: that is only a hand-off, never a lost request.
 *
 * Lanes (issue 12, item 5): a program that keeps requests in flight by submitting the next
 * one from each completion callback (bench_infer's async rows, a pipeline) would take rt->mu
 * twice per request on two workers at once, and the lock's line and the vslot's and
 * generation's lines then cross cores on every request. A worker thread therefore keeps
 * such requests to itself, in its lane (thread-local; no other thread reads or writes it):
 *   Open: end_group on a worker (follow != NULL) ending one request that was itself
 *     submitted from a worker's callback (req->from_cb), of a vslot that may have lanes
 *     (lane_eligible_locked: current generation, no dynamic_batching, no preprocessing, no
 *     priority levels, no default queue timeout; not shutting down) keeps that request's
 *     admission slot and generation reference instead of dropping them: the lane's "pool".
 *     The lane is (v, g, rt->lane_epoch at that moment); a worker has at most one.
 *   Submit (keel_infer_submit_ex, no lock): while the pool is not empty, a request submitted
 *     on the lane's worker for the lane's model and version (no version: only if v is the
 *     newest), with no timeout and no priority, whose size class g's estimate calls fast
 *     (the rule of KEEL_SUBMIT_RUN_IF_FAST), while rt->lane_epoch is unchanged, takes one
 *     slot and reference from the pool (state LANE) and is appended to the lane's FIFO. So
 *     the admission bound holds exactly (a slot passes from one request to the next), and
 *     a request submitted after a swap, unload or shutdown returned (each bumps lane_epoch
 *     under rt->mu, keel__routing_changed_locked) never enters a lane of what it replaced.
 *   Run (lane_run, after the worker's shared batches): one rt->mu acquisition takes an idle
 *     context of g (lane_take_context_locked); then each lane request runs on it with no
 *     lock: a cancel flag seen before the run answers it "cancelled while queued" without
 *     running it, one seen after answers "cancelled while running"; its end puts its slot
 *     and reference back in the pool, sets IDLE and calls its callback, which may submit
 *     the next. One acquisition at the end returns the context and drops what the pool
 *     still holds (lane_settle_locked); the lane closes when it holds nothing.
 *   Giving way: the lane yields (returns its context, keeps its FIFO) after a request when
 *     another vslot waits on the ready list (rt->any_ready) or v has queued requests
 *     (v->any_queued); its worker serves the shared queue then, and end_group forms no
 *     follow-on batch while the worker's lane has requests, so lane and queue alternate
 *     and neither starves. If the lane cannot take a context (none idle, g retired by a
 *     swap, v removed, shutdown), its requests leave it under rt->mu (lane_requeue_locked):
 *     into v's queue like any admitted request (their references dropped: they run on
 *     whatever generation is current then, never an older one), or answered (cancelled,
 *     unloaded, shutting down).
 *   Limits, by design: a lane request is never in rt->running, so it has no deadline (none
 *     is admitted) and a cancel is answered when its worker reaches it: before its run, or
 *     when its (fast) backend call returns. A lane request may start before requests
 *     other threads queued earlier for the same model (the lane gives way after each of its
 *     requests). Lane runs are counted as runs_inline (they run on the thread that
 *     submitted them). The pool's slots stay counted (leases) until the worker settles them,
 *     right after the callbacks that did not submit again return.
 *   Lock order: unchanged; a lane takes rt->mu only as above, and reads without it only
 *   rt->lane_epoch, rt->any_ready, v->any_queued, g->est_run_ns (atomics) and immutable
 *   fields (v->version, v->entry->name, g->cfg); req->state and req->cancel_requested are
 *   accessed with atomic builtins where a lane's access can meet another thread's.
 *
 * Locks: rt->mu only (internal.h's order); per request, submit takes it once, and a batch of
 * n requests takes it once to complete and, unless a worker goes on with the same vslot,
 * once to form; a lane request takes it not at all (its lane, twice per lane run).
 * docs/PERFORMANCE.md has the counts, bench/lockstat.sh measures them. Layer: calls
 * registry.c, request.c, batch.c, preprocess.c (the run path), budget.c (want_load) and
 * generation.c only.
 */
#include <errno.h>
#include <string.h>
#include <time.h>

#include "core/heap.h"
#include "runtime/batch.h"
#include "runtime/budget.h"
#include "runtime/generation.h"
#include "runtime/preprocess.h"
#include "runtime/registry.h"
#include "runtime/request.h"
#include "runtime/sched.h"

/* The calling thread's runtime and index if it is a worker thread (keel__worker_main). */
static _Thread_local const keel_runtime *tl_worker_rt;
static _Thread_local int tl_worker_index;
/* Any other thread (keel_infer's caller, a server's I/O thread running a request or a
 * gathered batch): the generation and context it took last. Only ever compared, never
 * dereferenced: a generation freed since, its address reused, costs a preference at most. */
static _Thread_local const keel__generation *tl_ctx_gen;
static _Thread_local int tl_ctx_index;

/* A worker's lane (DESIGN, "Lanes"): its worker's alone, never read by another thread. */
typedef struct lane {
    keel__vslot *v;            /* NULL: closed */
    keel__generation *g;       /* each slot in pool and each request in the FIFO holds a ref */
    uint64_t epoch;            /* rt->lane_epoch when it opened */
    bool newest;               /* v was its entry's newest serving version then */
    uint32_t pool;             /* admission slots of ended lane requests, free to take */
    keel_request *head, *tail; /* admitted, not yet run (qnext), in order */
    uint32_t n;                /* requests in that FIFO */
    int ctx;                   /* g's context while lane_run holds one, else -1 */
} lane;

static _Thread_local lane tl_lane = {.ctx = -1};
/* A worker thread running completion callbacks: what they submit is marked from_cb. */
static _Thread_local bool tl_in_cb;

/* What settling a lane under rt->mu leaves to do after unlocking. */
typedef struct lane_release {
    keel__generation *g;
    uint32_t refs;       /* references on g to release */
    keel__vslot *free_v; /* a removed vslot whose last slot the lane held */
} lane_release;

static void lane_release_apply(lane_release *rel)
{
    for (uint32_t i = 0; i < rel->refs; i++)
        keel__generation_release(rel->g);
    free(rel->free_v);
    *rel = (lane_release){0};
}

/* Under rt->mu: g->ctx_idle, the lanes' unlocked view of vslot_has_idle_context. */
static void ctx_idle_update_locked(keel__generation *g)
{
    bool idle = g->nfree > 0 && g->in_use < g->max_in_use;

    if (atomic_load_explicit(&g->ctx_idle, memory_order_relaxed) != idle)
        atomic_store_explicit(&g->ctx_idle, idle, memory_order_relaxed);
}

/* Under rt->mu: takes an idle context of g (counted in use): the calling worker's own
 * (index i of its runtime: context i mod nctx) if that one is idle, another thread's last
 * one in g if that one is idle, else the one returned last (DESIGN, "Dispatch"). */
static int context_take_locked(keel_runtime *rt, keel__generation *g)
{
    bool worker = tl_worker_rt == g->rt;
    int want = worker ? tl_worker_index % g->nctx : tl_ctx_gen == g ? tl_ctx_index : -1;
    int ctx;

    if (want >= 0 && g->nfree > 1) {
        for (int i = 0; i < g->nfree - 1; i++)
            if (g->free_stack[i] == want) {
                g->free_stack[i] = g->free_stack[g->nfree - 1];
                g->free_stack[g->nfree - 1] = want;
                break;
            }
    }
    ctx = g->free_stack[--g->nfree];
    if (!worker) {
        tl_ctx_gen = g;
        tl_ctx_index = ctx;
    }
    g->in_use++;
    ctx_idle_update_locked(g);
    keel__counter_add_locked(rt, g->entry, KEEL__CNT(contexts_in_use), 1);
    return ctx;
}

static bool vslot_has_idle_context(const keel__vslot *v)
{
    const keel__generation *g = v->current;

    return g != NULL && g->nfree > 0 && g->in_use < g->max_in_use;
}

/* Rows a batch waits for before its delay passes: the largest preferred size, else
 * max_batch_size. */
static int64_t batch_target(const keel__model_config *cfg)
{
    return cfg->npreferred > 0 ? cfg->preferred[cfg->npreferred - 1] : cfg->max_batch_size;
}

static bool vslot_can_dispatch(const keel__vslot *v)
{
    if (v->nqueued == 0 || !vslot_has_idle_context(v))
        return false;
    /* Waiting out a batching delay: only a full batch or the timer's flush ends it. */
    return v->delay_until_ns == 0 || v->flush ||
           v->queued_rows >= (uint64_t)batch_target(v->current->cfg);
}

/* Does v's current generation batch (dynamic_batching with a batch dimension)? */
static bool vslot_batches(const keel__vslot *v)
{
    return v->current != NULL && v->current->cfg->batching && v->current->cfg->max_batch_size > 0;
}

/* Appends v to the ready list if it can dispatch and is not there; wake: signal a worker
 * (false: a caller of keel_runtime_run_gathered will dispatch it). */
static void ready_push_locked(keel_runtime *rt, keel__vslot *v, bool wake)
{
    if (v->in_ready || v->removed || !vslot_can_dispatch(v))
        return;
    v->in_ready = true;
    v->ready_next = NULL;
    if (rt->ready_tail != NULL) {
        rt->ready_tail->ready_next = v;
    } else {
        rt->ready_head = v;
        atomic_store_explicit(&rt->any_ready, true, memory_order_relaxed);
    }
    rt->ready_tail = v;
    if (wake)
        pthread_cond_signal(&rt->work_cv);
}

void keel__vslot_kick_locked(keel_runtime *rt, keel__vslot *v)
{
    ready_push_locked(rt, v, true);
}

static keel__vslot *ready_pop_locked(keel_runtime *rt)
{
    keel__vslot *v = rt->ready_head;

    if (v == NULL)
        return NULL;
    rt->ready_head = v->ready_next;
    if (rt->ready_head == NULL) {
        rt->ready_tail = NULL;
        atomic_store_explicit(&rt->any_ready, false, memory_order_relaxed);
    }
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
    if (rt->ready_head == NULL)
        atomic_store_explicit(&rt->any_ready, false, memory_order_relaxed);
    v->ready_next = NULL;
    v->in_ready = false;
}

/* Lowers the timer's next wake-up to t (a deadline or a batching delay) and wakes it. */
static void timer_note_locked(keel_runtime *rt, uint64_t t)
{
    if (t != 0 && (rt->timer_next == 0 || t < rt->timer_next)) {
        rt->timer_next = t;
        pthread_cond_signal(&rt->timer_cv);
    }
}

/* Appends req to v's queue q and counts it. */
static void queue_push_locked(keel_runtime *rt, keel__vslot *v, keel_request *req, uint32_t q)
{
    req->queue = q;
    req->qnext = NULL;
    req->qprev = v->qtail[q];
    if (v->qtail[q] != NULL)
        v->qtail[q]->qnext = req;
    else
        v->qhead[q] = req;
    v->qtail[q] = req;
    v->nqueued_q[q]++;
    if (v->nqueued++ == 0)
        atomic_store_explicit(&v->any_queued, true, memory_order_relaxed);
    v->queued_rows += (uint64_t)req->rows;
    keel__counter_add_locked(rt, v->entry, KEEL__CNT(queued), 1);
}

/* Unlinks a queued request from its FIFO in v and drops the queued counters. */
static void queue_unlink_locked(keel_runtime *rt, keel__vslot *v, keel_request *req)
{
    uint32_t q = req->queue;

    if (req->qprev != NULL)
        req->qprev->qnext = req->qnext;
    else
        v->qhead[q] = req->qnext;
    if (req->qnext != NULL)
        req->qnext->qprev = req->qprev;
    else
        v->qtail[q] = req->qprev;
    req->qnext = req->qprev = NULL;
    v->nqueued_q[q]--;
    v->nqueued--;
    v->queued_rows -= (uint64_t)req->rows;
    if (v->nqueued == 0) {
        v->delay_until_ns = 0; /* nothing left to wait for */
        v->flush = false;
        atomic_store_explicit(&v->any_queued, false, memory_order_relaxed);
    }
    keel__counter_add_locked(rt, v->entry, KEEL__CNT(queued), -1);
}

/* The first queued request of v in dispatch order, or NULL. */
static keel_request *queue_first(const keel__vslot *v)
{
    for (uint32_t q = 0; q < KEEL__NQUEUES; q++) {
        if (v->qhead[q] != NULL)
            return v->qhead[q];
    }
    return NULL;
}

/* The request after req in dispatch order, or NULL. */
static keel_request *queue_next(const keel__vslot *v, const keel_request *req)
{
    if (req->qnext != NULL)
        return req->qnext;
    for (uint32_t q = req->queue + 1; q < KEEL__NQUEUES; q++) {
        if (v->qhead[q] != NULL)
            return v->qhead[q];
    }
    return NULL;
}

/* Appends req to the list *tail points at the end of (linked by qnext). */
static void list_append(keel_request **head, keel_request **tail, keel_request *req)
{
    req->qnext = NULL;
    if (*tail != NULL)
        (*tail)->qnext = req;
    else
        *head = req;
    *tail = req;
}

void keel__vslot_drain_locked(keel_runtime *rt, keel__vslot *v, keel_request **list)
{
    keel_request *tail = *list;
    keel_request *req;

    while (tail != NULL && tail->qnext != NULL)
        tail = tail->qnext;
    while ((req = queue_first(v)) != NULL) {
        queue_unlink_locked(rt, v, req);
        req->state = KEEL__REQ_COMPLETING;
        list_append(list, &tail, req);
    }
    ready_remove_locked(rt, v);
}

void keel__vslot_move_latest_locked(keel_runtime *rt, keel__vslot *from, keel__vslot *to)
{
    KEEL__ASSERT(from != to && from->entry == to->entry);
    for (uint32_t q = 0; q < KEEL__NQUEUES; q++) {
        keel_request *req = from->qhead[q];
        while (req != NULL) {
            keel_request *next = req->qnext;
            if (req->version == -1) {
                queue_unlink_locked(rt, from, req);
                from->inflight--;
                to->inflight++; /* already admitted: may exceed the bound once */
                req->vslot = to;
                queue_push_locked(rt, to, req, q);
            }
            req = next;
        }
    }
    if (from->nqueued == 0)
        ready_remove_locked(rt, from);
    keel__vslot_kick_locked(rt, to);
}

void keel__vslot_set_policy_locked(keel__vslot *v, const keel__model_config *cfg)
{
    v->max_inflight = cfg->max_queue_size;
    memcpy(v->qpolicy, cfg->qpolicy, sizeof(v->qpolicy));
    v->qpolicy[0].max_queue_size = 0; /* the default policy's bound is max_inflight */
    v->priority_levels = cfg->priority_levels;
    v->default_priority_level = cfg->default_priority_level;
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

/* A run group (a batch formed under rt->mu, or one request run alone): its requests (qnext),
 * one generation and one context, its place under preserve_ordering, and what detaching
 * requests while its backend runs left to it (rt->mu; sched.c's DESIGN). */
typedef struct batch {
    keel_request *head, *tail;
    size_t n;
    int64_t rows;
    keel__generation *gen;
    keel__vslot *vslot;
    int ctx;
    bool ordered;
    uint64_t seq;
    bool stuck;         /* rt->mu: a request was detached; the context is stuck */
    uint32_t ndetached; /* rt->mu: generation references of detached requests, to release */
} batch;

static void run_and_complete(keel_request *req, batch *follow);

static void lease_locked(keel_runtime *rt, keel__vslot *v, keel_request *req);

int keel__est_class(int64_t rows)
{
    int c = 0;

    while (rows > 1 && c < KEEL__EST_CLASSES - 1) {
        rows >>= 1;
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

/* Rows the request will run as: the first input's leading dimension (bind_inputs checks the
 * rest when it runs), else 1. Without a batch dimension it is 1. */
static int64_t request_rows(const keel_request *req, int64_t max_batch_size)
{
    if (max_batch_size > 0 && req->ninputs > 0 && req->inputs[0].ndim > 0 &&
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
        return false; /* image models decode in a worker process */
    if (g->cfg->batching && g->cfg->max_batch_size > 0)
        return false; /* the I/O thread queues; requests that pile up meanwhile batch */
    est = atomic_load_explicit(&g->est_run_ns[keel__est_class(req->rows)], memory_order_relaxed);
    return keel__est_is_fast(est, rt->inline_max_ns);
}

/* Under rt->mu: req's priority level in v (1..), or 0 with the error set. */
static uint32_t level_of(keel_request *req, const keel__vslot *v)
{
    uint32_t levels = v->priority_levels > 0 ? v->priority_levels : 1;

    if (req->priority == 0)
        return v->priority_levels > 0 ? v->default_priority_level : 1;
    if (req->priority > levels) {
        keel__request_set_error(req, "priority %u is not a level of model '%s' (it has %s%u)",
                                req->priority, v->entry->name,
                                v->priority_levels > 0 ? "levels 1 to " : "the one level ", levels);
        return 0;
    }
    return req->priority;
}

/* Under rt->mu: the deadline of req (0 = none) under its level's policy; see the DESIGN. */
static uint64_t deadline_of(const keel_request *req, const keel__queue_policy *qp)
{
    uint64_t t = qp->default_timeout_us;

    if (req->timeout_us != 0 && (t == 0 || qp->allow_timeout_override || req->timeout_us < t))
        t = req->timeout_us;
    /* A timeout too large to add to the clock is no deadline, not an overflowed one. */
    if (t == 0 || t > (UINT64_MAX - req->submit_ns) / 1000ULL)
        return 0;
    return req->submit_ns + t * 1000ULL;
}

/* The fields every admission sets (submit, lane_submit): the callback, the slot's vslot,
 * the submit time, and the generation whose reference the request holds from now (NULL
 * until it is leased). */
static void request_admitted(keel_request *req, keel_infer_cb cb, void *user, keel__vslot *v,
                             uint64_t now, keel__generation *g)
{
    req->ordered = false;
    req->cb = cb;
    req->user = user;
    req->entry = v->entry;
    req->vslot = v;
    req->gen = g;
    req->ctx_index = -1;
    req->status = KEEL_OK;
    req->generation_id = g != NULL ? g->id : 0;
    req->ran_version = g != NULL ? g->version : -1;
    req->submit_ns = now;
    req->dispatch_ns = 0;
    req->input_end_ns = req->output_start_ns = req->complete_ns = req->preprocess_ns = 0;
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
    const keel__queue_policy *qp;
    uint32_t level;
    keel_err err;

    *run_here = false;
    if (req == NULL || cb == NULL)
        return KEEL_EINVAL;
    rt = req->rt;
    keel__rt_lock(rt);
    if (__atomic_load_n(&req->state, __ATOMIC_ACQUIRE) != KEEL__REQ_IDLE) {
        keel__rt_unlock(rt);
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
    if ((level = level_of(req, v)) == 0) {
        err = KEEL_EINVAL;
        goto fail;
    }
    qp = &v->qpolicy[v->priority_levels > 0 ? level : 0];
    if (v->inflight >= v->max_inflight ||
        (qp->max_queue_size != 0 && v->nqueued_q[level - 1] >= qp->max_queue_size)) {
        atomic_fetch_add_explicit(&e->stats.rejected, 1, memory_order_relaxed);
        if (v->inflight >= v->max_inflight)
            keel__request_set_error(req, "model '%s' version %lld: queue full (%u requests)",
                                    e->name, (long long)v->version, v->max_inflight);
        else
            keel__request_set_error(req,
                                    "model '%s' version %lld: queue of priority %u full (%u "
                                    "requests)",
                                    e->name, (long long)v->version, level, qp->max_queue_size);
        err = KEEL_EUNAVAILABLE;
        goto fail;
    }

    /* Take the slot. */
    v->inflight++;
    keel__counter_add_locked(rt, e, KEEL__CNT(leases), 1);
    req->state = KEEL__REQ_QUEUED;
    req->cancel_requested = false;
    request_admitted(req, cb, user, v, keel__now_ns(), NULL);
    req->from_cb = tl_in_cb && tl_worker_rt == rt;
    /* LRU for the memory budget (no second clock read), to 0.1 ms: stored only when
     * it moved, so that the entry's line is not written by every request. */
    if (req->submit_ns - atomic_load_explicit(&e->last_used_ns, memory_order_relaxed) >= 100000u)
        atomic_store_explicit(&e->last_used_ns, req->submit_ns, memory_order_relaxed);
    req->deadline_ns = deadline_of(req, qp);
    req->timeout_action = qp->timeout_action;
    req->rows = request_rows(req, v->current != NULL ? v->current->cfg->max_batch_size : 1);
    if (keel__fault_hit(KEEL__FAULT_SUBMIT)) {
        /* A failure after the slot was taken: undo everything; the callback never runs. */
        v->inflight--;
        keel__counter_add_locked(rt, e, KEEL__CNT(leases), -1);
        req->state = KEEL__REQ_IDLE;
        req->cb = NULL;
        req->user = NULL;
        req->entry = NULL;
        req->vslot = NULL;
        keel__request_set_error(req, "injected submit fault");
        err = KEEL_EUNAVAILABLE;
        goto fail;
    }
    if ((flags & (KEEL_SUBMIT_RUN_HERE | KEEL_SUBMIT_RUN_IF_FAST)) != 0 && v->nqueued == 0 &&
        vslot_has_idle_context(v) &&
        !(v->current->cfg->batching &&
          (v->current->cfg->max_queue_delay_us > 0 || v->current->cfg->preserve_ordering)) &&
        ((flags & KEEL_SUBMIT_RUN_IF_FAST) == 0 || vslot_is_fast_for(rt, v, req))) {
        req->dispatch_ns = req->submit_ns;
        lease_locked(rt, v, req);
        atomic_fetch_add_explicit(&keel__stats_mine(e)->runs_inline, 1, memory_order_relaxed);
        *run_here = true;
        keel__rt_unlock(rt);
        return KEEL_OK;
    }
    queue_push_locked(rt, v, req, level - 1);
    timer_note_locked(rt, req->deadline_ns);
    /* KEEL_SUBMIT_GATHER: no worker is woken for a batching model's request; the caller's
     * keel_runtime_run_gathered dispatches it with whatever else arrived meanwhile. */
    ready_push_locked(rt, v, (flags & KEEL_SUBMIT_GATHER) == 0 || !vslot_batches(v));
    keel__rt_unlock(rt);
    return KEEL_OK;

fail:
    keel__rt_unlock(rt);
    return err;
}

static bool lane_submit(keel_request *req, keel_infer_cb cb, void *user, keel_err *err);

keel_err keel_infer_submit(keel_request *req, keel_infer_cb cb, void *user)
{
    return keel_infer_submit_ex(req, 0, cb, user);
}

keel_err keel_infer_submit_ex(keel_request *req, unsigned flags, keel_infer_cb cb, void *user)
{
    bool run_here;
    keel_err err;

    if ((flags &
         ~(unsigned)(KEEL_SUBMIT_RUN_HERE | KEEL_SUBMIT_RUN_IF_FAST | KEEL_SUBMIT_GATHER)) != 0)
        return KEEL_EINVAL;
    /* A worker's callback submitting while its lane holds a free slot (DESIGN, "Lanes"). */
    if (tl_lane.pool > 0 && req != NULL && cb != NULL && tl_worker_rt == req->rt &&
        lane_submit(req, cb, user, &err))
        return err;
    err = submit(req, cb, user, flags, &run_here);
    if (err == KEEL_OK && run_here)
        run_and_complete(req, NULL); /* cb runs here; req may be gone afterwards */
    return err;
}

/* The deadline of a running request (0 = none): a DELAY policy never fails a request for
 * time, so it bounds only the wait in the queue. */
static uint64_t run_deadline(const keel_request *req)
{
    return req->timeout_action == KEEL__TIMEOUT_DELAY ? 0 : req->deadline_ns;
}

/* Under rt->mu: links a request that starts running into rt->running, the timer's list, and
 * lowers the timer's wake-up to its deadline. */
static void running_link_locked(keel_runtime *rt, keel_request *req)
{
    req->run_prev = NULL;
    req->run_next = rt->running;
    if (rt->running != NULL)
        rt->running->run_prev = req;
    rt->running = req;
    req->in_running = true;
    timer_note_locked(rt, run_deadline(req));
}

static void running_unlink_locked(keel_runtime *rt, keel_request *req)
{
    if (!req->in_running)
        return;
    if (req->run_prev != NULL)
        req->run_prev->run_next = req->run_next;
    else
        rt->running = req->run_next;
    if (req->run_next != NULL)
        req->run_next->run_prev = req->run_prev;
    req->run_next = req->run_prev = NULL;
    req->in_running = false;
    atomic_store_explicit(&req->run_slot, NULL, memory_order_relaxed);
}

/* Under rt->mu: answers a running request now if its backend call has started (its slot's
 * phase goes BACKEND -> DETACHED; see the DESIGN): what it lent the backend moves to its
 * slot, its generation reference to the group, the group's context is counted stuck. The
 * caller then completes it with status after unlocking. False (nothing done) while the
 * request is not in the backend: before the call, or after it returned. */
static bool detach_locked(keel_runtime *rt, keel_request *req, keel_err status, uint64_t now)
{
    keel__run_slot *s = atomic_load_explicit(&req->run_slot, memory_order_acquire);
    int expect = KEEL__RUN_BACKEND;
    batch *b;

    if (s == NULL ||
        !atomic_compare_exchange_strong_explicit(&s->phase, &expect, KEEL__RUN_DETACHED,
                                                 memory_order_acq_rel, memory_order_acquire))
        return false;
    b = s->group;
    keel__run_slot_take(s, req);
    running_unlink_locked(rt, req);
    if (!b->stuck) {
        b->stuck = true;
        b->gen->nstuck++;
        b->vslot->nstuck++;
        keel__counter_add_locked(rt, b->gen->entry, KEEL__CNT(contexts_stuck), 1);
    }
    b->ndetached++;
    if (status == KEEL_ETIMEDOUT)
        keel__request_set_error(req,
                                "deadline exceeded after %llu us, while running in model '%s' "
                                "version %lld (the backend has not returned)",
                                (unsigned long long)((now - req->submit_ns) / 1000),
                                b->gen->cfg->name, (long long)b->gen->version);
    else
        keel__request_set_error(req,
                                "request cancelled while running in model '%s' version %lld "
                                "(the backend has not returned)",
                                b->gen->cfg->name, (long long)b->gen->version);
    req->status = status;
    req->gen = NULL; /* the group's now */
    req->ctx_index = -1;
    req->ordered = false;
    req->state = KEEL__REQ_COMPLETING;
    return true;
}

/* The fields every end sets (finish_locked, lane_run_one): the callback moves to done_cb, the
 * slot and context go, the result is set, and the request is IDLE (its owner's again once
 * done_cb runs). */
static void request_ended(keel_request *req, keel_err status, uint64_t now)
{
    req->done_cb = req->cb;
    req->done_user = req->user;
    req->cb = NULL;
    req->user = NULL;
    req->ctx_index = -1;
    req->vslot = NULL;
    req->status = status;
    req->complete_ns = now;
    __atomic_store_n(&req->state, KEEL__REQ_IDLE, __ATOMIC_RELEASE);
}

/* Under rt->mu: the part of ending req that needs the lock (its context, if it holds one,
 * is returned by the caller): drops the slot, moves the callback to done_cb, sets the
 * result. Returns the vslot to free after unlocking, or NULL. */
static keel__vslot *finish_locked(keel_runtime *rt, keel_request *req, keel_err status,
                                  uint64_t now, bool keep_slot)
{
    keel__vslot *v = req->vslot;

    if (req->cancel_requested && status == KEEL_OK) {
        status = KEEL_ECANCELED;
        keel__request_set_error(req, "request cancelled while running");
    }
    KEEL__ASSERT(v->inflight > 0);
    running_unlink_locked(rt, req);
    if (keep_slot) {
        tl_lane.pool++; /* the worker's lane keeps the slot (DESIGN, "Lanes") */
    } else {
        v->inflight--;
        keel__counter_add_locked(rt, req->entry, KEEL__CNT(leases), -1);
    }
    request_ended(req, status, now);
    return v->removed && v->inflight == 0 && v->nstuck == 0 ? v : NULL;
}

/* After finish_locked, no lock held: releases what req held, counts it, runs the callback.
 * e and g are what req had (req's own fields are cleared here). unix_ms: the wall clock at
 * the end, read once for a batch by the caller (the statistics' last_inference). */
static void finish_unlocked(keel_request *req, keel__model_entry *e, keel__generation *g,
                            keel__vslot *free_vslot, uint64_t now, uint64_t unix_ms, bool keep_ref)
{
    keel_err status = req->status;
    keel_infer_cb cb = req->done_cb;
    void *user = req->done_user;
    bool was_in_cb = tl_in_cb;
    keel__stat_shard *sh;

    req->gen = NULL;
    req->entry = NULL;
    req->ordered = false;
    req->done_cb = NULL;
    req->done_user = NULL;
    /* Released after unlocking: the generation may be freed (by the reaper). A lane keeps
     * it for the next request (DESIGN, "Lanes"). */
    if (!keep_ref)
        keel__generation_release(g);
    if (free_vslot != NULL)
        free(free_vslot);
    if (status != KEEL_OK)
        keel__request_clear_outputs(req);

    sh = keel__stats_mine(e);
    if (status == KEEL_OK)
        atomic_fetch_add_explicit(&sh->success, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&e->stats.failure[status], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&sh->queue_ns,
                              (req->dispatch_ns != 0 ? req->dispatch_ns : now) - req->submit_ns,
                              memory_order_relaxed);
    atomic_store_explicit(&sh->last_inference_unix_ms, unix_ms, memory_order_relaxed);

    KEEL__ASSERT(cb != NULL);
    tl_in_cb = tl_worker_rt == req->rt;
    cb(req, status, user); /* req may be destroyed or resubmitted from here on */
    tl_in_cb = was_in_cb;
}

/* Under rt->mu: gives context ctx back to g (it came from g); kick: make v ready for it (the
 * caller that passes false kicks v itself, after it formed its next batch). */
static void context_return_locked(keel_runtime *rt, keel__generation *g, int ctx, keel__vslot *v,
                                  bool kick)
{
    KEEL__ASSERT(ctx >= 0 && ctx < g->nctx);
    g->free_stack[g->nfree++] = ctx; /* back to its own generation */
    g->in_use--;
    ctx_idle_update_locked(g);
    keel__counter_add_locked(rt, g->entry, KEEL__CNT(contexts_in_use), -1);
    if (kick && !g->retired)
        keel__vslot_kick_locked(rt, v);
}

static bool form_batch_locked(keel_runtime *rt, keel__vslot *v, uint64_t now, batch *b,
                              keel_request **expired, keel_request **expired_tail);

/* ---- lanes (DESIGN, "Lanes"); the lane is always the calling worker's own */

/* Under rt->mu: may a worker keep requests of v on generation g to itself? */
static bool lane_eligible_locked(const keel_runtime *rt, const keel__vslot *v,
                                 const keel__generation *g)
{
    const keel__model_config *cfg = g->cfg;

    return !rt->shutting_down && !rt->stopping && !v->removed && v->current == g && !g->retired &&
           cfg->preprocess == NULL && !cfg->batching && v->priority_levels == 0 &&
           v->qpolicy[0].default_timeout_us == 0;
}

/* Under rt->mu: the vslot a request for e's newest version goes to, or NULL. */
static keel__vslot *newest_vslot_locked(const keel__model_entry *e)
{
    keel__vslot *newest = NULL;

    for (keel__vslot *w = e->versions; w != NULL; w = w->next) {
        if (w->current != NULL)
            newest = w;
    }
    return newest;
}

/* Under rt->mu, on a worker ending a request of v that ran on g: may the worker's lane keep
 * its slot and reference? Opens the lane on (v, g) if it is closed. */
static bool lane_accepts_locked(keel_runtime *rt, keel__vslot *v, keel__generation *g)
{
    lane *l = &tl_lane;
    uint64_t epoch = atomic_load_explicit(&rt->lane_epoch, memory_order_relaxed);

    if (l->v != NULL)
        return l->v == v && l->g == g && l->epoch == epoch;
    if (!lane_eligible_locked(rt, v, g))
        return false;
    l->v = v;
    l->g = g;
    l->epoch = epoch;
    l->newest = newest_vslot_locked(v->entry) == v;
    return true;
}

/* Under rt->mu: drops the slots the lane's pool holds (their references into rel, released
 * after unlocking), returns its context if return_ctx, and closes the lane once it holds
 * nothing (a removed v whose last slot it held goes into rel, to free). */
static void lane_settle_locked(keel_runtime *rt, lane_release *rel, bool return_ctx)
{
    lane *l = &tl_lane;
    keel__vslot *v = l->v;

    if (v == NULL)
        return;
    KEEL__ASSERT(rel->g == NULL || rel->g == l->g);
    rel->g = l->g;
    if (l->pool > 0) {
        KEEL__ASSERT(v->inflight >= l->pool);
        v->inflight -= l->pool;
        keel__counter_add_locked(rt, v->entry, KEEL__CNT(leases), -(int64_t)l->pool);
        rel->refs += l->pool;
        l->pool = 0;
    }
    if (return_ctx && l->ctx >= 0) {
        context_return_locked(rt, l->g, l->ctx, v, true);
        l->ctx = -1;
    }
    if (l->head == NULL && l->ctx < 0) {
        l->v = NULL;
        l->g = NULL;
        if (v->removed && v->inflight == 0 && v->nstuck == 0)
            rel->free_v = v;
    }
}

/*
 * Ends a group of requests that ran together (b->head: one request, or a batch linked by
 * qnext; each request's outcome in req->status; requests detached while it ran are no longer
 * in it) under one lock acquisition: returns the context the group held (b->ctx >= 0) to
 * b->gen, then finishes every request. Under preserve_ordering (b->ordered), a group that
 * ends before a group dispatched earlier is held on its vslot, unfinished (its requests keep
 * their slots and references; a group left empty by detaching holds a marker, rt == NULL),
 * and finished by the group it waited for, in dispatch order. The callbacks, and the release
 * of the generation references of detached requests, run after unlocking.
 * follow (an inference thread's run, else NULL): under the same lock acquisition, if no
 * other vslot waits on the ready list and v can dispatch, v's next batch is formed into
 * *follow (follow->n > 0; the caller runs it), most likely on the context just returned: a worker
 * goes on with the model it serves while its queue lasts, without the ready list, a wake-up or a
 * second acquisition per request (sched.c's DESIGN, "Dispatch").
 */
static void end_group(keel_runtime *rt, batch *b, batch *follow)
{
    keel__vslot *v = b->vslot, *free_vslot = NULL;
    keel_request *head = b->head, *done = NULL, *done_tail = NULL, *free_at = NULL;
    keel_request *marker = NULL, *markers = NULL, *expired = NULL, *expired_tail = NULL;
    uint64_t now = keel__now_ns(), unix_ms;
    lane_release rel = {0};
    bool pool;

    while (head == NULL && b->ordered && (marker = keel__calloc(1, sizeof(*marker))) == NULL)
        nanosleep(&(struct timespec){0, 1000000}, NULL); /* the order must not be lost */
    keel__rt_lock(rt);
    /* A worker's lane drops what its last callbacks did not take (before anything of this
     * group is released, so that it cannot be the one to free v: this group still holds
     * a slot or a stuck run of v if v is the lane's), then may keep this request's slot
     * and reference (DESIGN, "Lanes"). */
    if (follow != NULL)
        lane_settle_locked(rt, &rel, false);
    pool = follow != NULL && !b->ordered && !b->stuck && head != NULL && head->qnext == NULL &&
           head->from_cb && lane_accepts_locked(rt, v, b->gen);
    if (b->stuck) {
        b->gen->nstuck--;
        v->nstuck--;
        keel__counter_add_locked(rt, b->gen->entry, KEEL__CNT(contexts_stuck), -1);
    }
    if (follow != NULL)
        follow->n = 0;
    if (b->ctx >= 0)
        context_return_locked(rt, b->gen, b->ctx, v, follow == NULL);
    for (keel_request *req = head; req != NULL; req = req->qnext)
        running_unlink_locked(rt, req); /* held or ended: nothing left to detach */
    if (head == NULL && marker != NULL) {
        marker->ordered = true;
        marker->order_seq = b->seq;
        head = marker;
        marker = NULL;
    }
    if (b->ordered && b->seq != v->seq_done) {
        head->held_next = v->held; /* an earlier group still runs: wait for it */
        v->held = head;
        head = NULL;
    }
    for (keel_request *grp = head; grp != NULL;) {
        bool ordered = grp->ordered;
        if (grp->rt == NULL) { /* a marker: its group's requests were answered already */
            grp->qnext = markers;
            markers = grp;
        } else if (done_tail != NULL) {
            done_tail->qnext = grp;
        } else {
            done = grp;
        }
        for (keel_request *req = grp; req != NULL && req->rt != NULL; req = req->qnext) {
            keel__vslot *f = finish_locked(rt, req, req->status, now, pool);
            if (f != NULL) {
                free_vslot = f; /* the last request of a removed vslot */
                free_at = req;
            }
            done_tail = req;
        }
        grp = NULL;
        if (ordered) {
            v->seq_done++;
            for (keel_request **pp = &v->held; *pp != NULL; pp = &(*pp)->held_next) {
                if ((*pp)->order_seq == v->seq_done) {
                    grp = *pp; /* the next one in dispatch order ended already */
                    *pp = grp->held_next;
                    grp->held_next = NULL;
                    break;
                }
            }
        }
    }
    if (b->stuck && free_at == NULL && v->removed && v->inflight == 0 && v->nstuck == 0)
        free_vslot = v; /* the last stuck run of a removed vslot, after its requests */
    if (follow != NULL && free_vslot == NULL) {
        if (rt->ready_head == NULL && tl_lane.head == NULL && !rt->stopping && !v->removed &&
            !v->in_ready && vslot_can_dispatch(v) &&
            !form_batch_locked(rt, v, now, follow, &expired, &expired_tail))
            follow->n = 0;
        keel__vslot_kick_locked(rt, v); /* what is left for the other threads */
    }
    keel__rt_unlock(rt);
    lane_release_apply(&rel);
    keel__complete_list(expired, KEEL_ETIMEDOUT, NULL);
    unix_ms = done != NULL ? keel__unix_ms() : 0;
    for (keel_request *req = done, *next; req != NULL; req = next) {
        next = req->qnext;
        req->qnext = NULL;
        finish_unlocked(req, req->entry, req->gen, req == free_at ? free_vslot : NULL, now, unix_ms,
                        pool);
    }
    for (uint32_t i = 0; i < b->ndetached; i++)
        keel__generation_release(b->gen);
    while (markers != NULL) {
        keel_request *next = markers->qnext;
        free(markers);
        markers = next;
    }
    free(marker);
    if (free_at == NULL)
        free(free_vslot);
}

/* Ends a request: see the file's DESIGN. Called with no lock held, exactly once per
 * successful submit. status is what happened; msg (may be NULL) overrides the message. */
static void complete(keel_request *req, keel_err status, const char *msg)
{
    batch b = {.head = req,
               .tail = req,
               .n = 1,
               .gen = req->gen,
               .vslot = req->vslot,
               .ctx = req->gen != NULL ? req->ctx_index : -1};

    if (msg != NULL)
        keel__request_set_error(req, "%s", msg);
    req->status = status;
    req->qnext = NULL;
    end_group(req->rt, &b, NULL);
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

/* Updates g's run-time estimate of a batch of `size` rows with one sample. */
static void estimate_update(keel__generation *g, int64_t size, uint64_t ns)
{
    /* Each thread follows the estimate of the (generation, class) it ran last in a copy of
     * its own and stores it only when that copy has moved by more than 1/4 from what is
     * stored. Stored on every move of more than 1/64 from the stored value, as before, it
     * was written by 45 % of the runs of two workers sharing a model (bench_infer async
     * w2/i2, jittering samples), so its line travelled between them on most requests, and
     * every submit reads it; now by 5 %. A 50 ms run after 10 us ones still moves it at once
     * (half-way up); a model that turned fast again is seen after a few runs (an eighth of
     * the way down each). Racing stores of one class may lose a sample: an estimate needs
     * no more. */
    static _Thread_local uint64_t tl_id, tl_est;
    static _Thread_local int tl_class = -1;
    int c = keel__est_class(size);
    _Atomic uint64_t *est = &g->est_run_ns[c];
    uint64_t stored = atomic_load_explicit(est, memory_order_relaxed);

    if (tl_id != g->id || tl_class != c) {
        tl_id = g->id; /* ids are never reused, addresses may be */
        tl_class = c;
        tl_est = stored;
    }
    tl_est = keel__est_update(tl_est, ns);
    if (stored == 0 || tl_est > stored + stored / 4 || tl_est + stored / 4 < stored)
        atomic_store_explicit(est, tl_est, memory_order_relaxed);
}

/* The run slot of a batch's request that failed before the call: never in the backend, so
 * never detached, and the timer need not retry it (sched.c's DESIGN). */
static keel__run_slot slot_not_run = {.phase = KEEL__RUN_RETURNED};

/* Runner, after the backend call: takes the request back (phase BACKEND -> RETURNED); false
 * if it was detached meanwhile (it is no longer the runner's). */
static bool slot_returned(keel__run_slot *s)
{
    int expect = KEEL__RUN_BACKEND;

    return atomic_compare_exchange_strong_explicit(&s->phase, &expect, KEEL__RUN_RETURNED,
                                                   memory_order_acq_rel, memory_order_acquire);
}

/* Runs a leased request on its context (worker thread, no lock held), its outputs into slot
 * s of group b. If it is detached while the backend runs, returns without touching it. */
static keel_err run_leased(keel_request *req, keel__run_slot *s, batch *b, int64_t *batch_out)
{
    keel__generation *g = req->gen;
    char errbuf[KEEL__ERRLEN];
    keel__run_io io;
    keel__stat_shard *sh;
    uint64_t t0, t1;
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
    io.emit = keel__run_slot_emit;
    io.sink = s;
    io.errbuf = errbuf;
    io.errlen = sizeof(errbuf);
    if (keel__fault_hit(KEEL__FAULT_BACKEND_RUN)) {
        keel__request_set_error(req, "model '%s': injected backend run fault", g->cfg->name);
        return KEEL_EBACKEND;
    }
    keel__run_slot_begin(s, req, b, *batch_out);
    t0 = keel__now_ns();
    req->input_end_ns = t0;
    atomic_store_explicit(&req->run_slot, s, memory_order_release); /* detachable from now */
    keel__fault_hang();
    err = g->backend->run(g->ctxs[b->ctx], &io);
    t1 = keel__now_ns();
    if (slot_returned(s)) {
        keel__run_slot_end(s, req);
        req->output_start_ns = t1;
    } else {
        req = NULL; /* answered at its deadline or cancel: not ours any more */
    }
    t0 = t1 - t0;
    sh = keel__stats_mine(g->entry);
    atomic_fetch_add_explicit(&sh->compute_ns, t0, memory_order_relaxed);
    estimate_update(g, *batch_out, t0);
    atomic_fetch_add_explicit(&sh->execution_count, 1, memory_order_relaxed);
    if (g->cfg->batching && g->cfg->max_batch_size > 0)
        keel__batch_stats_record(&g->entry->stats, *batch_out, 0, t0, 0);
    if (err != KEEL_OK && req != NULL) {
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
    req->ctx_index = context_take_locked(rt, g);
    req->generation_id = g->id;
    req->ran_version = g->version;
    req->state = KEEL__REQ_RUNNING;
    running_link_locked(rt, req);
}

/* Runs a leased request and completes it (worker thread, or keel_infer's caller); follow as
 * end_group's. */
static void run_and_complete(keel_request *req, batch *follow)
{
    batch b = {.head = req,
               .tail = req,
               .n = 1,
               .gen = req->gen,
               .vslot = req->vslot,
               .ctx = req->ctx_index,
               .ordered = req->ordered,
               .seq = req->order_seq};
    keel__run_slot s = {0};
    int64_t rows = 0;
    keel__prep_swap sw;
    keel_runtime *rt = req->rt;
    uint64_t t0 = req->gen->cfg->preprocess != NULL ? keel__now_ns() : 0;
    keel_err err = keel__preprocess_begin(req, &sw); /* image models: decode in a worker */

    if (t0 != 0)
        req->preprocess_ns = keel__now_ns() - t0;

    if (err == KEEL_OK)
        err = run_leased(req, &s, &b, &rows);
    if (atomic_load_explicit(&s.phase, memory_order_relaxed) == KEEL__RUN_DETACHED) {
        keel__preprocess_drop(&sw); /* req went with its inputs; the client's image is ours */
        b.head = b.tail = NULL;
        b.n = 0;
    } else {
        keel__preprocess_end(req, &sw);
        if (err == KEEL_OK)
            atomic_fetch_add_explicit(&keel__stats_mine(b.gen->entry)->inference_count,
                                      (uint64_t)rows, memory_order_relaxed);
        req->status = err;
        req->qnext = NULL;
    }
    end_group(rt, &b, follow);
    keel__run_slot_fini(&s);
}

/* ---- a worker's lane, run (DESIGN, "Lanes") */

/* On a worker whose lane's pool holds a slot (its callbacks run): takes req into the lane if
 * it may go there; false (nothing done) if it goes through submit() instead. */
static bool lane_submit(keel_request *req, keel_infer_cb cb, void *user, keel_err *err)
{
    lane *l = &tl_lane;
    keel_runtime *rt = req->rt;
    keel__vslot *v = l->v;
    keel__generation *g = l->g;
    keel__model_entry *e = v->entry;
    uint64_t est, now;
    int64_t rows;

    if (__atomic_load_n(&req->state, __ATOMIC_ACQUIRE) != KEEL__REQ_IDLE || req->timeout_us != 0 ||
        req->priority != 0 || (req->version == -1 ? !l->newest : req->version != v->version) ||
        atomic_load_explicit(&rt->lane_epoch, memory_order_acquire) != l->epoch ||
        strcmp(req->model, e->name) != 0)
        return false;
    rows = request_rows(req, g->cfg->max_batch_size);
    est = atomic_load_explicit(&g->est_run_ns[keel__est_class(rows)], memory_order_relaxed);
    if (!keel__est_is_fast(est, rt->inline_max_ns))
        return false;
    req->errmsg[0] = '\0';
    if (keel__fault_hit(KEEL__FAULT_SUBMIT)) {
        keel__request_set_error(req, "injected submit fault");
        *err = KEEL_EUNAVAILABLE;
        return true;
    }
    l->pool--; /* its slot and reference are req's now */
    now = keel__now_ns();
    /* The eviction LRU, to 10 ms: a lane may run for long without rt->mu. */
    if (now - atomic_load_explicit(&e->last_used_ns, memory_order_relaxed) >= 10000000u)
        atomic_store_explicit(&e->last_used_ns, now, memory_order_relaxed);
    __atomic_store_n(&req->cancel_requested, false, __ATOMIC_RELAXED);
    request_admitted(req, cb, user, v, now, g);
    req->from_cb = true;
    req->deadline_ns = 0;
    req->timeout_action = KEEL__TIMEOUT_REJECT;
    req->rows = rows;
    req->qnext = NULL;
    if (l->tail != NULL)
        l->tail->qnext = req;
    else
        l->head = req;
    l->tail = req;
    l->n++;
    __atomic_store_n(&req->state, KEEL__REQ_LANE, __ATOMIC_RELEASE);
    *err = KEEL_OK;
    return true;
}

/* Under rt->mu: takes an idle context of the lane's generation for lane_run; false if it
 * cannot (none idle, g no longer current, v removed, shutting down). */
static bool lane_take_context_locked(keel_runtime *rt)
{
    lane *l = &tl_lane;
    keel__vslot *v = l->v;

    if (rt->shutting_down || v->removed || v->current != l->g || !vslot_has_idle_context(v))
        return false;
    l->ctx = context_take_locked(rt, l->g);
    atomic_store_explicit(&v->entry->last_used_ns, keel__now_ns(), memory_order_relaxed);
    return true;
}

/* Under rt->mu: empties the lane's FIFO: each request drops its reference (into rel) and
 * goes into v's queue like any admitted request (v removed: a request for the newest
 * version into the newest one's, as keel__vslot_move_latest_locked moves queued ones), or,
 * cancelled, unloaded or shutting down, is returned (linked by qnext, status and message
 * set) to be completed after unlocking. */
static keel_request *lane_requeue_locked(keel_runtime *rt, lane_release *rel)
{
    lane *l = &tl_lane;
    keel__vslot *v = l->v;
    keel__vslot *to = !v->removed ? v : newest_vslot_locked(v->entry);
    keel_request *answer = NULL, *answer_tail = NULL, *req;
    bool queued = false;

    rel->g = l->g;
    while ((req = l->head) != NULL) {
        l->head = req->qnext;
        req->qnext = NULL;
        req->gen = NULL;
        req->ctx_index = -1;
        rel->refs++;
        if (__atomic_load_n(&req->cancel_requested, __ATOMIC_ACQUIRE)) {
            req->status = KEEL_ECANCELED;
            keel__request_set_error(req, "request cancelled while queued");
        } else if (rt->shutting_down) {
            req->status = KEEL_ESHUTDOWN;
            keel__request_set_error(req, "the runtime is shutting down");
        } else if (v->removed && (req->version != -1 || to == NULL)) {
            req->status = KEEL_EUNAVAILABLE;
            keel__request_set_error(req, "the model version was unloaded");
        } else {
            uint32_t level = level_of(req, to); /* priority 0: the default level */
            const keel__queue_policy *qp = &to->qpolicy[to->priority_levels > 0 ? level : 0];
            if (to != v) {
                v->inflight--; /* its slot moves along; v is freed when the lane settles */
                to->inflight++;
                req->vslot = to;
            }
            req->deadline_ns = deadline_of(req, qp);
            req->timeout_action = qp->timeout_action;
            __atomic_store_n(&req->state, KEEL__REQ_QUEUED, __ATOMIC_RELAXED);
            queue_push_locked(rt, to, req, level - 1);
            timer_note_locked(rt, req->deadline_ns);
            queued = true;
            continue;
        }
        __atomic_store_n(&req->state, KEEL__REQ_COMPLETING, __ATOMIC_RELAXED);
        list_append(&answer, &answer_tail, req);
    }
    l->tail = NULL;
    l->n = 0;
    if (queued) {
        if (to->current == NULL && to->entry->evicted)
            keel__want_load_locked(rt, to->entry); /* as pick_vslot_locked would */
        keel__vslot_kick_locked(rt, to);
    }
    return answer;
}

/* Runs one lane request on the lane's context and ends it (no lock): its slot and reference
 * go back to the pool, then its callback runs (and may submit the next). */
static void lane_run_one(keel_request *req)
{
    lane *l = &tl_lane;
    batch b = {.head = req, .tail = req, .n = 1, .gen = l->g, .vslot = l->v, .ctx = l->ctx};
    keel__model_entry *e = req->entry;
    keel__run_slot s = {0};
    int64_t rows = 0;
    keel_err err;
    uint64_t now;

    req->dispatch_ns = keel__now_ns();
    if (__atomic_load_n(&req->cancel_requested, __ATOMIC_ACQUIRE)) {
        keel__request_set_error(req, "request cancelled while queued");
        err = KEEL_ECANCELED;
    } else {
        atomic_fetch_add_explicit(&keel__stats_mine(e)->runs_inline, 1, memory_order_relaxed);
        req->ctx_index = l->ctx;
        err = run_leased(req, &s, &b, &rows); /* never detached: not in rt->running */
        atomic_store_explicit(&req->run_slot, NULL, memory_order_relaxed);
        if (err == KEEL_OK)
            atomic_fetch_add_explicit(&keel__stats_mine(e)->inference_count, (uint64_t)rows,
                                      memory_order_relaxed);
        if (err == KEEL_OK && __atomic_load_n(&req->cancel_requested, __ATOMIC_ACQUIRE)) {
            err = KEEL_ECANCELED;
            keel__request_set_error(req, "request cancelled while running");
        }
    }
    now = keel__now_ns();
    l->pool++;
    request_ended(req, err, now);
    finish_unlocked(req, e, l->g, NULL, now, keel__unix_ms(), true);
    keel__run_slot_fini(&s);
}

/* Completes the requests lane_requeue_locked answered (after unlocking). */
static void lane_answer(keel_request *answer)
{
    while (answer != NULL) {
        keel_request *next = answer->qnext;
        answer->qnext = NULL;
        complete(answer, answer->status, NULL);
        answer = next;
    }
}

/* A worker, after its shared batches: runs its lane until it is empty, gives way to the
 * shared queue, or shares its requests with an idle worker; then returns its context and
 * settles (DESIGN, "Lanes"). */
static void lane_run(keel_runtime *rt)
{
    lane *l = &tl_lane;
    lane_release rel = {0};
    keel_request *answer = NULL;
    bool share = false;

    if (l->v == NULL)
        return;
    while (l->head != NULL) {
        keel_request *req;

        if (l->ctx < 0) {
            bool ok;

            keel__rt_lock(rt);
            lane_settle_locked(rt, &rel, false);
            if (!(ok = lane_take_context_locked(rt))) {
                answer = lane_requeue_locked(rt, &rel);
                lane_settle_locked(rt, &rel, false); /* closes the lane */
            }
            keel__rt_unlock(rt);
            lane_release_apply(&rel);
            if (!ok) {
                lane_answer(answer);
                return;
            }
        }
        req = l->head;
        l->head = req->qnext;
        if (l->head == NULL)
            l->tail = NULL;
        l->n--;
        req->qnext = NULL;
        lane_run_one(req);
        if (l->head == NULL)
            break;
        if (atomic_load_explicit(&rt->any_ready, memory_order_relaxed) ||
            atomic_load_explicit(&l->v->any_queued, memory_order_relaxed))
            break; /* give way: the worker serves the queue, then comes back */
        if (l->n >= 2 && atomic_load_explicit(&rt->idle_workers, memory_order_relaxed) > 0 &&
            atomic_load_explicit(&l->g->ctx_idle, memory_order_relaxed)) {
            share = true; /* requests wait here while a worker and a context are idle */
            break;
        }
    }
    keel__rt_lock(rt);
    if (share)
        answer = lane_requeue_locked(rt, &rel);
    lane_settle_locked(rt, &rel, true);
    keel__rt_unlock(rt);
    lane_release_apply(&rel);
    lane_answer(answer);
}

/* ---- batches */

/* Under rt->mu: takes req out of its queue because its deadline passed: into *expired
 * (REJECT) or to the end of the delayed queue with no deadline (DELAY). */
static void expire_locked(keel_runtime *rt, keel__vslot *v, keel_request *req, uint64_t now,
                          keel_request **expired, keel_request **expired_tail)
{
    queue_unlink_locked(rt, v, req);
    if (req->timeout_action == KEEL__TIMEOUT_DELAY) {
        req->deadline_ns = 0;
        queue_push_locked(rt, v, req, KEEL__DELAYED_Q);
        return;
    }
    req->state = KEEL__REQ_COMPLETING;
    if (v->current == NULL)
        keel__request_set_error(
            req, "deadline exceeded after %llu us waiting for model '%s' to load",
            (unsigned long long)((now - req->submit_ns) / 1000), v->entry->name);
    else
        keel__request_set_error(req, "deadline exceeded after %llu us in queue",
                                (unsigned long long)((now - req->submit_ns) / 1000));
    list_append(expired, expired_tail, req);
}

/*
 * Under rt->mu, for a vslot that can dispatch: takes the next batch out of v's queues into
 * *b (see the DESIGN), leasing one context. Expired requests met on the way go to *expired.
 * Returns false if there is no batch to run now (all expired, or waiting for the delay).
 */
static bool form_batch_locked(keel_runtime *rt, keel__vslot *v, uint64_t now, batch *b,
                              keel_request **expired, keel_request **expired_tail)
{
    keel__generation *g = v->current;
    const keel__model_config *cfg = g->cfg;
    int64_t max_rows = cfg->batching ? cfg->max_batch_size : 0;
    keel_request *first = NULL, *req = queue_first(v);
    int64_t rows = 0, cut_rows = 0;
    size_t n = 0, cut = 0, pi = 0;
    bool closed = false;

    memset(b, 0, sizeof(*b));
    /* Pass 1: expire, and find how far the batch goes. */
    while (req != NULL) {
        keel_request *next = queue_next(v, req);
        if (req->deadline_ns != 0 && now >= req->deadline_ns) {
            bool delay = req->timeout_action == KEEL__TIMEOUT_DELAY;
            expire_locked(rt, v, req, now, expired, expired_tail);
            /* A DELAYed request is now the delayed queue's tail: met again at the end. */
            req = delay && next == NULL ? req : next;
            continue;
        }
        if (first == NULL) {
            first = req;
        } else if (!keel__batch_compatible(first, req)) {
            closed = true;
            break;
        } else if (rows + req->rows > max_rows) {
            closed = true; /* full: the next one starts the next batch */
            break;
        }
        rows += req->rows;
        n++;
        while (pi < cfg->npreferred && cfg->preferred[pi] < rows)
            pi++;
        if (pi < cfg->npreferred && cfg->preferred[pi] == rows) {
            cut = n;
            cut_rows = rows;
        }
        if (max_rows <= 0 || rows >= max_rows || n >= UINT32_MAX)
            break;
        req = next;
    }
    if (n == 0)
        return false;
    if (max_rows > 0 && !closed && rows < batch_target(cfg) && cfg->max_queue_delay_us > 0 &&
        !v->flush) {
        uint64_t until = first->submit_ns + cfg->max_queue_delay_us * 1000u;
        if (now < until) {
            v->delay_until_ns = until;
            timer_note_locked(rt, until);
            return false;
        }
    }
    v->delay_until_ns = 0;
    v->flush = false;
    if (cut == 0 || max_rows <= 0) {
        cut = n;
        cut_rows = rows;
    }
    /* Pass 2: unlink the first `cut` requests in dispatch order (pass 1 left them there:
     * whatever it moved went to the end). A batch of one holds the context itself. */
    b->gen = g;
    b->vslot = v;
    b->rows = cut_rows;
    b->ctx = -1;
    b->ordered = cfg->preserve_ordering;
    b->seq = v->seq_next;
    if (cut > 1) {
        b->ctx = context_take_locked(rt, g);
    }
    for (size_t i = 0; i < cut; i++) {
        req = queue_first(v);
        queue_unlink_locked(rt, v, req);
        req->ordered = cfg->preserve_ordering;
        req->order_seq = v->seq_next;
        if (cut == 1) {
            lease_locked(rt, v, req);
        } else {
            keel__generation_acquire(g);
            req->gen = g;
            req->ctx_index = -1;
            req->generation_id = g->id;
            req->ran_version = g->version;
            req->state = KEEL__REQ_RUNNING;
            running_link_locked(rt, req);
        }
        req->dispatch_ns = now;
        list_append(&b->head, &b->tail, req);
        b->n++;
    }
    if (cfg->preserve_ordering)
        v->seq_next++;
    return true;
}

/* Runs a batch of two or more requests (worker thread, no lock held) and completes it; follow
 * as end_group's. */
static void run_batch(keel_runtime *rt, batch *b, batch *follow)
{
    keel__generation *g = b->gen;
    const keel__model_config *cfg = g->cfg;
    keel_request *ok = NULL, *ok_tail = NULL, *failed = NULL, *failed_tail = NULL;
    keel__prep_swap *sw = keel__calloc(b->n, sizeof(*sw));
    keel__run_slot *slots = keel__calloc(b->n, sizeof(*slots));
    int64_t(*shapes)[KEEL__MAX_DIMS + 1] = keel__calloc(cfg->ninputs + 1, sizeof(*shapes));
    keel_tensor_view *views = keel__calloc(cfg->ninputs + 1, sizeof(*views));
    void **bufs = keel__calloc(cfg->ninputs + 1, sizeof(*bufs));
    char errbuf[KEEL__ERRLEN];
    keel__batch_sink sink = {0};
    uint64_t t_in, t_run, t_out = 0;
    keel_err err = KEEL_OK;
    size_t nok = 0;

    errbuf[0] = '\0';
    if (sw == NULL || slots == NULL || shapes == NULL || views == NULL || bufs == NULL) {
        keel__errf(errbuf, sizeof(errbuf), "out of memory forming a batch of %zu requests", b->n);
        err = KEEL_ENOMEM;
    }
    /* Each request: preprocess (image models), then its own validation. sw[0..nok) are the
     * swaps of the requests that passed, in their order; a failed one is restored at once. */
    t_in = keel__now_ns();
    for (keel_request *req = b->head, *next; req != NULL; req = next) {
        int64_t rows = 0;
        keel_err e = err;
        next = req->qnext;
        if (e == KEEL_OK) {
            uint64_t t0 = cfg->preprocess != NULL ? keel__now_ns() : 0;
            e = keel__preprocess_begin(req, &sw[nok]);
            if (t0 != 0)
                req->preprocess_ns = keel__now_ns() - t0;
        }
        keel__request_clear_outputs(req);
        if (e == KEEL_OK)
            e = keel__request_bind_inputs(req, cfg, g->backend->input_types, &rows);
        if (e == KEEL_OK && rows != req->rows) {
            keel__request_set_error(req, "input batch sizes changed while queued");
            e = KEEL_EINVAL;
        }
        req->status = e;
        if (e != KEEL_OK && err != KEEL_OK)
            keel__request_set_error(req, "%s", errbuf);
        if (e == KEEL_OK) {
            nok++;
            list_append(&ok, &ok_tail, req);
        } else {
            if (sw != NULL)
                keel__preprocess_end(req, &sw[nok]);
            list_append(&failed, &failed_tail, req);
        }
    }
    /* The requests that passed, merged into one call; their outputs go to their slots. */
    sink.slots = slots;
    for (keel_request *req = ok; req != NULL; req = req->qnext) {
        keel__run_slot_begin(&slots[sink.nreqs++], req, b, req->rows);
        sink.rows += req->rows;
    }
    if (ok != NULL) {
        keel__run_io io = {views, cfg->ninputs, sink.rows,     keel__batch_emit,
                           &sink, errbuf,       sizeof(errbuf)};
        err = keel__batch_inputs_merge(cfg, ok, sink.rows, shapes, views, bufs, errbuf,
                                       sizeof(errbuf));
        if (err == KEEL_OK && keel__fault_hit(KEEL__FAULT_BACKEND_RUN)) {
            keel__errf(errbuf, sizeof(errbuf), "injected backend run fault");
            err = KEEL_EBACKEND;
            keel__batch_inputs_free(bufs, cfg->ninputs);
        } else if (err == KEEL_OK) {
            t_run = keel__now_ns();
            nok = 0;
            for (keel_request *req = ok, *next; req != NULL; req = next) {
                next = req->qnext; /* req may be detached once published */
                req->input_end_ns = t_run;
                atomic_store_explicit(&req->run_slot, &slots[nok++], memory_order_release);
            }
            for (keel_request *req = failed; req != NULL; req = req->qnext)
                atomic_store_explicit(&req->run_slot, &slot_not_run, memory_order_release);
            keel__fault_hang();
            err = g->backend->run(g->ctxs[b->ctx], &io);
            t_out = keel__now_ns();
            keel__batch_inputs_free(bufs, cfg->ninputs);
            atomic_fetch_add_explicit(&keel__stats_mine(g->entry)->compute_ns, t_out - t_run,
                                      memory_order_relaxed);
            atomic_fetch_add_explicit(&keel__stats_mine(g->entry)->execution_count, 1,
                                      memory_order_relaxed);
            estimate_update(g, sink.rows, t_out - t_run);
            keel__batch_stats_record(&g->entry->stats, sink.rows, t_run - t_in, t_out - t_run,
                                     keel__now_ns() - t_out);
        }
        if (err == KEEL_OK)
            atomic_fetch_add_explicit(&keel__stats_mine(g->entry)->inference_count,
                                      (uint64_t)sink.rows, memory_order_relaxed);
    }
    /* Take back the requests not detached while the backend ran (their slots say which: a
     * detached request's own fields, qnext included, are not ours any more). */
    ok = ok_tail = NULL;
    for (size_t i = 0; i < sink.nreqs; i++) {
        keel_request *req = slots[i].req;
        if (!slot_returned(&slots[i])) {
            keel__preprocess_drop(&sw[i]);
            continue;
        }
        keel__run_slot_end(&slots[i], req);
        keel__preprocess_end(req, &sw[i]);
        if (t_out != 0)
            req->output_start_ns = t_out;
        req->status = err;
        if (err != KEEL_OK)
            keel__request_set_error(req, "model '%s' version %lld: %s", cfg->name,
                                    (long long)g->version,
                                    errbuf[0] != '\0' ? errbuf : keel_strerror(err));
        list_append(&ok, &ok_tail, req);
    }
    /* Requests of one batch complete together; their order among them is not promised. */
    if (ok_tail != NULL)
        ok_tail->qnext = failed;
    b->head = ok != NULL ? ok : failed;
    b->tail = failed_tail != NULL ? failed_tail : ok_tail;
    free(sw);
    free(shapes);
    free(views);
    free(bufs);
    end_group(rt, b, follow);
    for (size_t i = 0; i < sink.nreqs; i++)
        keel__run_slot_fini(&slots[i]);
    free(slots);
}

/* ---- the timer thread */

/* Under rt->mu: expires the queued requests whose deadline passed (into *expired, or behind
 * the others under DELAY), detaches the running ones whose deadline passed or that were
 * cancelled (into *detached, status set), and flushes vslots whose batching delay passed.
 * Returns the earliest deadline or delay still ahead, 0 if none. */
static uint64_t timer_scan_locked(keel_runtime *rt, uint64_t now, keel_request **expired,
                                  keel_request **detached)
{
    keel_request *tail = NULL, *dtail = NULL;
    uint64_t next = 0;

    for (keel_request *req = rt->running, *rn; req != NULL; req = rn) {
        uint64_t dl = run_deadline(req);
        bool due = dl != 0 && dl <= now;
        rn = req->run_next;
        if (due || req->cancel_requested) {
            if (detach_locked(rt, req, req->cancel_requested ? KEEL_ECANCELED : KEEL_ETIMEDOUT,
                              now))
                list_append(detached, &dtail, req);
            else if (atomic_load_explicit(&req->run_slot, memory_order_relaxed) == NULL &&
                     (next == 0 || now + 1000000u < next))
                next = now + 1000000u; /* not in the backend yet: retry */
        } else if (dl != 0 && (next == 0 || dl < next)) {
            next = dl;
        }
    }

    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
            if (v->nqueued == 0)
                continue;
            for (uint32_t q = 0; q < KEEL__NQUEUES; q++) {
                keel_request *req = v->qhead[q];
                while (req != NULL) {
                    keel_request *qn = req->qnext;
                    if (req->deadline_ns != 0 && req->deadline_ns <= now)
                        expire_locked(rt, v, req, now, expired, &tail);
                    else if (req->deadline_ns != 0 && (next == 0 || req->deadline_ns < next))
                        next = req->deadline_ns;
                    req = qn;
                }
            }
            if (v->delay_until_ns != 0 && v->delay_until_ns <= now) {
                v->flush = true;
                keel__vslot_kick_locked(rt, v);
            } else if (v->delay_until_ns != 0 && (next == 0 || v->delay_until_ns < next)) {
                next = v->delay_until_ns;
            }
        }
    }
    return next;
}

void *keel__timer_main(void *arg)
{
    keel_runtime *rt = arg;

    keel__rt_lock(rt);
    while (!rt->stopping) {
        keel_request *expired = NULL, *detached = NULL;
        uint64_t now = keel__now_ns(), next;
        struct timespec ts;

        if (rt->timer_next != 0 && rt->timer_next > now) {
            ts.tv_sec = (time_t)(rt->timer_next / 1000000000u);
            ts.tv_nsec = (long)(rt->timer_next % 1000000000u);
            keel__rt_wait_begin(rt);
            pthread_cond_timedwait(&rt->timer_cv, &rt->mu, &ts); /* CLOCK_MONOTONIC */
            keel__rt_wait_end(rt);
            continue;
        }
        if (rt->timer_next == 0) {
            keel__rt_wait_begin(rt);
            pthread_cond_wait(&rt->timer_cv, &rt->mu);
            keel__rt_wait_end(rt);
            continue;
        }
        next = timer_scan_locked(rt, now, &expired, &detached);
        rt->timer_next = next;
        if (expired != NULL || detached != NULL) {
            keel__rt_unlock(rt);
            keel__complete_list(expired, KEEL_ETIMEDOUT, NULL);
            while (detached != NULL) {
                keel_request *dn = detached->qnext;
                complete(detached, detached->status, NULL);
                detached = dn;
            }
            keel__rt_lock(rt);
        }
    }
    keel__rt_unlock(rt);
    return NULL;
}

void keel__timer_stop(keel_runtime *rt)
{
    if (!rt->timer_started)
        return;
    keel__rt_lock(rt);
    rt->stopping = true;
    pthread_cond_signal(&rt->timer_cv);
    keel__rt_unlock(rt);
    pthread_join(rt->timer, NULL);
    rt->timer_started = false;
}

/* ---- the worker threads */

/* Runs a batch formed by form_batch_locked (no lock held) and completes it; here: on the
 * thread of keel_runtime_run_gathered rather than an inference thread (counted); follow
 * as end_group's (NULL on that thread). */
static void run_formed(keel_runtime *rt, batch *b, bool here, batch *follow)
{
    keel__stat_shard *sh = keel__stats_mine(b->vslot->entry);

    atomic_fetch_add_explicit(here ? &sh->runs_inline : &sh->runs_handed_off, b->n,
                              memory_order_relaxed);
    if (b->n == 1)
        run_and_complete(b->head, follow);
    else
        run_batch(rt, b, follow);
}

void *keel__worker_main(void *arg)
{
    keel_runtime *rt = arg;
    bool worked = false; /* since the thread's last keel__heap_thread_idle */

    tl_worker_rt = rt;
    tl_worker_index = atomic_fetch_add(&rt->worker_seq, 1);

    keel__rt_lock(rt);
    for (;;) {
        keel_request *expired = NULL, *expired_tail = NULL;
        keel__vslot *v;
        batch b;
        bool run;

        while (!rt->stopping && rt->ready_head == NULL && tl_lane.head == NULL) {
            int rc;
            atomic_fetch_add_explicit(&rt->idle_workers, 1, memory_order_relaxed);
            if (!worked) {
                keel__rt_wait_begin(rt);
                pthread_cond_wait(&rt->work_cv, &rt->mu);
                keel__rt_wait_end(rt);
                atomic_fetch_sub_explicit(&rt->idle_workers, 1, memory_order_relaxed);
                continue;
            }
            /* After a second with nothing to do, the thread's allocator cache goes back
             * (core/heap.h): idle threads would otherwise hold it for good. work_cv uses the
             * realtime clock; a clock step only moves when the hint comes. */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            keel__rt_wait_begin(rt);
            rc = pthread_cond_timedwait(&rt->work_cv, &rt->mu, &ts);
            keel__rt_wait_end(rt);
            atomic_fetch_sub_explicit(&rt->idle_workers, 1, memory_order_relaxed);
            if (rc == ETIMEDOUT) {
                worked = false;
                keel__rt_unlock(rt);
                keel__heap_thread_idle();
                keel__rt_lock(rt);
            }
        }
        worked = true;
        if ((v = ready_pop_locked(rt)) == NULL) {
            if (tl_lane.head == NULL)
                break;           /* stopping and nothing left to dispatch */
            keel__rt_unlock(rt); /* the lane gave way to a queue that is served now */
            lane_run(rt);
            keel__rt_lock(rt);
            continue;
        }
        if (!vslot_can_dispatch(v))
            continue; /* its last queued request was cancelled meanwhile */
        run = form_batch_locked(rt, v, keel__now_ns(), &b, &expired, &expired_tail);
        keel__vslot_kick_locked(rt, v);
        if (rt->ready_head != NULL)
            pthread_cond_signal(&rt->work_cv);
        keel__rt_unlock(rt);

        keel__complete_list(expired, KEEL_ETIMEDOUT, NULL);
        /* Each run ends with the next batch of the same vslot when nothing else waits
         * (end_group). */
        while (run) {
            batch next;
            run_formed(rt, &b, false, &next);
            b = next;
            run = b.n > 0;
        }
        lane_run(rt); /* what the callbacks submitted meanwhile */
        keel__rt_lock(rt);
    }
    keel__rt_unlock(rt);
    KEEL__ASSERT(tl_lane.v == NULL);
    return NULL;
}

/* Under rt->mu: may v's next batch run on the thread of keel_runtime_run_gathered? A
 * batching model without preprocessing whose estimate for the size class of the batch it
 * would form now is known and below inline_max_ns (the rule of KEEL_SUBMIT_RUN_IF_FAST). */
static bool vslot_batch_is_fast(const keel_runtime *rt, const keel__vslot *v)
{
    const keel__model_config *cfg = v->current->cfg;
    int64_t rows;
    uint64_t est;

    if (!vslot_batches(v) || cfg->preprocess != NULL)
        return false;
    rows = v->queued_rows < (uint64_t)cfg->max_batch_size ? (int64_t)v->queued_rows
                                                          : cfg->max_batch_size;
    est =
        atomic_load_explicit(&v->current->est_run_ns[keel__est_class(rows)], memory_order_relaxed);
    return keel__est_is_fast(est, rt->inline_max_ns);
}

void keel_runtime_run_gathered(keel_runtime *rt)
{
    size_t budget = 0;

    keel__rt_lock(rt);
    /* Each vslot ready now is looked at once: one batch each, so that a thread serving
     * connections goes back to them after at most one batch per model. */
    for (const keel__vslot *v = rt->ready_head; v != NULL; v = v->ready_next)
        budget++;
    while (budget-- > 0 && rt->ready_head != NULL) {
        keel_request *expired = NULL, *expired_tail = NULL;
        keel__vslot *v = ready_pop_locked(rt);
        batch b;
        bool run;

        if (!vslot_can_dispatch(v))
            continue; /* a context frees: context_return_locked makes it ready again */
        if (!vslot_batch_is_fast(rt, v)) {
            ready_push_locked(rt, v, true); /* an inference thread runs it */
            continue;
        }
        run = form_batch_locked(rt, v, keel__now_ns(), &b, &expired, &expired_tail);
        keel__vslot_kick_locked(rt, v); /* more than one batch queued, another context idle */
        keel__rt_unlock(rt);
        keel__complete_list(expired, KEEL_ETIMEDOUT, NULL);
        if (run)
            run_formed(rt, &b, true, NULL);
        keel__rt_lock(rt);
    }
    if (rt->ready_head != NULL)
        pthread_cond_signal(&rt->work_cv); /* left for the inference threads */
    keel__rt_unlock(rt);
}

keel_err keel_request_cancel(keel_request *req)
{
    keel_runtime *rt;
    keel__vslot *v;

    if (req == NULL)
        return KEEL_EINVAL;
    rt = req->rt;
    keel__rt_lock(rt);
    switch (__atomic_load_n(&req->state, __ATOMIC_ACQUIRE)) {
    case KEEL__REQ_LANE:
        /* Its worker answers it before or after its run (DESIGN, "Lanes"). */
        __atomic_store_n(&req->cancel_requested, true, __ATOMIC_RELEASE);
        keel__rt_unlock(rt);
        return KEEL_OK;
    case KEEL__REQ_QUEUED:
        v = req->vslot;
        queue_unlink_locked(rt, v, req);
        req->state = KEEL__REQ_COMPLETING;
        keel__rt_unlock(rt);
        complete(req, KEEL_ECANCELED, "request cancelled while queued");
        return KEEL_OK; /* req may already be destroyed by its callback */
    case KEEL__REQ_RUNNING:
        req->cancel_requested = true;
        if (detach_locked(rt, req, KEEL_ECANCELED, keel__now_ns())) {
            keel__rt_unlock(rt);
            complete(req, KEEL_ECANCELED, NULL); /* the backend call goes on without it */
            return KEEL_OK;
        }
        timer_note_locked(rt, keel__now_ns() + 1000000u); /* detached once the call starts */
        keel__rt_unlock(rt);
        return KEEL_OK;
    default:
        keel__rt_unlock(rt);
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
    /* A request with a timeout runs on a worker: run here, this thread could not return at
     * the deadline of a backend call that hangs (the answer would come, the call not end). */
    if ((err = submit(req, sync_done, NULL, req->timeout_us != 0 ? 0 : KEEL_SUBMIT_RUN_HERE,
                      &run_here)) != KEEL_OK)
        return err;
    if (run_here)
        run_and_complete(req, NULL); /* sync_done runs here, before the wait below */
    pthread_mutex_lock(&req->wait_mu);
    while (!req->wait_done)
        pthread_cond_wait(&req->wait_cv, &req->wait_mu);
    pthread_mutex_unlock(&req->wait_mu);
    return keel_request_status(req);
}
