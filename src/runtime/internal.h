/*
 * internal.h: the runtime's objects (registry entries, version slots, generations,
 * requests), its lock order and its state machines. The functions are declared in one
 * header per file beside it (registry.h, request.h, ...): a file's includes say what it uses.
 *
 * DESIGN
 *
 * Layers (a file calls only files below it, and includes only their headers):
 *   runtime.c      create/destroy, the threads; API calls that span layers (is_ready)
 *   lifecycle.c    the watch table, the lifecycle thread, its retries and reloads
 *   load.c         a model's load (begin, prepare, build, publish, fail) and unload
 *   sched.c        admission, queues, batching, dispatch, workers, timer, complete(), cancel
 *   generation.c   building, referencing and freeing generations; the reaper thread
 *   preprocess.c   a request's images through the preprocessing workers (sched.c's run path)
 *   batch.c        merging a batch's inputs, splitting its outputs (sched.c's run path)
 *   budget.c       memory charge, eviction, parking, the retire list; /proc sampling, trim
 *   request.c      the request object: inputs, outputs, binding to a config
 *   registry.c     the model table: entry lookup, list, status, statistics, counters
 * Each file may call any file listed below it (none calls a file above it); files on
 * different rows that do not call each other (preprocess.c and budget.c, say) could as well
 * be swapped. The one call upward is a wake-up: budget.c's keel__want_load_locked calls
 * keel__life_wake (lifecycle.c), an eventfd write that makes the lifecycle thread reload an
 * evicted model a request waits for; it takes no lock and calls nothing back.
 * scripts/check-file-cycles.py checks the rule from the object files and the includes.
 * Tests reach the runtime only through testhook.h.
 *
 * Objects and owners
 *   keel_runtime        owns the model table, the worker threads and the reaper thread.
 *   keel__model_entry   one per model name ever loaded; lives until the runtime is destroyed.
 *                       Holds the model's status, statistics and counters (by name, never a
 *                       generation), and its list of version slots.
 *   keel__vslot         one per served version of a model: the registry's current-generation
 *                       pointer for that version (one strong reference), the admission count
 *                       and the FIFO of queued requests. Unlinked from its entry when the
 *                       version leaves the policy or the model is unloaded; freed by whoever
 *                       drops its in-flight count to zero after that.
 *   keel__generation    immutable after publish: config, backend model (the weights), the
 *                       execution contexts, a refcount, a monotonic id. References: one from
 *                       the vslot while current, one per lease holding one of its contexts.
 *                       The last release hands it to the reaper thread, which destroys its
 *                       contexts and then its model, exactly once, with no lock held.
 *   keel_request        owned by the caller; while in flight it holds a lease: its admission
 *                       slot in a vslot, and once dispatched a generation reference plus one
 *                       context index of that generation.
 *
 * Lock order (a lock may be taken while holding the ones to its left, never the reverse):
 *   entry->load_mu  ->  rt->build_mu  ->  rt->mu  ->  req->wait_mu / rt->reap_mu (leaves)
 *   build_mu serialises generation builds process-wide, and the reaper's frees and trims, so
 *   that the resident-memory change measured across a build belongs to that generation
 *   (budget.c). It is never held while waiting for the reaper.
 *   rt->mu protects: the model table, each entry's version list and status, each vslot's
 *   current pointer, queue, in-flight count and ready-list membership, each generation's
 *   free-context stack, in-use count and retired flag, and each request's state and cancel
 *   flag (except while the request is in a worker's lane: its worker alone moves it, and a
 *   cancel sets the flag atomically; sched.c's DESIGN, "Lanes"). Counters and statistics
 *   are atomics and need no lock.
 *   Nothing is released, destroyed or called back while rt->mu is held: completions collect
 *   what to release under the lock and act after unlocking.
 *
 * Request state machine (state under rt->mu):
 *   IDLE --submit--> QUEUED --dispatch (alone or in a batch)--> RUNNING --backend returns-->
 *                      |   (end_group; held first under preserve_ordering) --> IDLE
 *                      |  \--expired (timer or dispatch; REJECT) / cancel / unload /
 *                      |      shutdown--> (complete) --> IDLE
 *                      \--expired under DELAY--> QUEUED (delayed FIFO, no deadline)
 *   RUNNING --deadline or cancel while the backend runs (detach)--> (complete) --> IDLE; the
 *     backend call goes on with what the request lent it (sched.c's DESIGN).
 *   end_group() (complete() for one request) is the only way out of QUEUED or RUNNING: it
 *   returns the context to its own generation (a batch holds one context for all its
 *   requests; a request run alone holds it itself), drops each admission slot, releases each
 *   request's generation reference (all exactly once), updates statistics, then runs each
 *   callback once with no lock held.
 *   Lanes (sched.c's DESIGN): a request a worker's callback submits may instead go
 *   IDLE --lane submit (no lock; takes over the slot and reference of a request that ended on
 *   that worker)--> LANE --the worker runs it--> IDLE (its slot and reference pass to the next
 *   lane request, or are dropped under rt->mu when the lane closes), or
 *   LANE --the lane gives way or cannot run (under rt->mu)--> QUEUED, or (complete) --> IDLE.
 *   A cancel of a LANE request sets its flag; its worker answers it before or after its run.
 *
 * Generation state: loading (private to the loader) -> ready (published in a vslot) ->
 *   retired (swapped out or unloaded; never hands out a context again) -> freed (reaper).
 *
 * Vslot state (rt->mu): serving (current != NULL) | parked (current == NULL, !removed) |
 *   removed. A vslot is parked when its model is evicted by the memory budget or while a
 *   resource-preserving swap has retired the old generation and builds the new one. Requests
 *   admitted to a parked vslot wait in its queue; publishing a generation into it dispatches
 *   them, a failed load answers them, and the timer thread answers KEEL_ETIMEDOUT to any whose
 *   deadline passes meanwhile (sched.c).
 *
 * Model entry lifecycle (rt->mu; load.c makes the transitions, lifecycle.c starts the
 * automatic ones):
 *   UNAVAILABLE/FAILED --load--> LOADING --ok--> READY --unload--> UNAVAILABLE
 *                                     \--fail--> FAILED (nothing served) or READY (old kept)
 *   READY --evict (budget)--> UNAVAILABLE+evicted --request--> want_load --lifecycle--> load
 *   A failed load schedules next_retry_ns (doubling backoff) unless the runtime is EXPLICIT;
 *   the lifecycle thread retries it then. A success, an unload or a file change resets it.
 *
 * Threads: API calls run on the caller's thread. Worker threads dispatch and run requests
 * and batches. The timer thread answers queued requests at their deadline and ends batching
 * delays.
 * The reaper thread frees generations (then gives freed heap back with malloc_trim). Loads
 * run on the thread calling keel_model_load, or on the lifecycle thread (repository
 * watching, retries, reloads of evicted models).
 */
#ifndef KEEL_RUNTIME_INTERNAL_H
#define KEEL_RUNTIME_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "backends/backend.h"
#include "core/core.h"
#include "repository/config.h"

#define KEEL__MAX_BACKENDS 8
#define KEEL__MAX_WORKERS 64
#define KEEL__ERRLEN 512

typedef struct keel__model_entry keel__model_entry;
typedef struct keel__vslot keel__vslot;
typedef struct keel__generation keel__generation;

/* Per-thread shards. Counters and the statistics every request writes are kept in
 * KEEL__SHARDS shards of one cache line each (rt->counters, e->counters, e->stats.shard); a
 * thread writes only the shard of its index (keel__shard(), registry.h: assigned round-robin
 * at the thread's first use), so two threads serving one model do not pass those lines back
 * and forth on every request; readers sum the shards (registry.c). A sum read while requests
 * move between threads is off by the changes in flight (a live count read mid-request may
 * show one more or one fewer; it is never shown below 0); at rest it is exact. The counters
 * that only rt->mu's holder changes (leases, queued, contexts_in_use, contexts_stuck:
 * sched.c) are added with a plain load and store (keel__counter_add_locked, registry.h):
 * a locked add costs a store-buffer drain, ten per request. */
#define KEEL__SHARDS 8

/* Live-object counters (atomics): one shard (above). */
typedef struct keel__counters {
    _Alignas(KEEL__CACHELINE) _Atomic int64_t requests;
    _Atomic int64_t leases;
    _Atomic int64_t queued;
    _Atomic int64_t generations;
    _Atomic int64_t contexts;
    _Atomic int64_t contexts_in_use;
    _Atomic int64_t contexts_stuck;
} keel__counters;

/* Executed batch sizes of one model (Triton's batch_stats): a small open-addressed table,
 * written lock-free (the size is claimed with a compare-and-swap). Sizes that find the table
 * full are counted in overflow only. */
#define KEEL__BATCH_SLOTS 128
typedef struct keel__batch_slot {
    _Atomic int64_t size; /* 0 = free */
    _Atomic uint64_t count, input_ns, infer_ns, output_ns;
} keel__batch_slot;

/* The statistics every request writes: one shard (above). last_inference_unix_ms is the
 * latest of the shards'. */
typedef struct keel__stat_shard {
    _Alignas(KEEL__CACHELINE) _Atomic uint64_t success;
    _Atomic uint64_t inference_count;
    _Atomic uint64_t execution_count;
    _Atomic uint64_t queue_ns;
    _Atomic uint64_t compute_ns;
    _Atomic uint64_t last_inference_unix_ms;
    _Atomic uint64_t runs_inline;
    _Atomic uint64_t runs_handed_off;
} keel__stat_shard;

typedef struct keel__stats {
    keel__stat_shard shard[KEEL__SHARDS];
    _Atomic uint64_t failure[KEEL_ERR_COUNT_];
    _Atomic uint64_t rejected;
    _Atomic uint64_t batch_overflow; /* executions whose size found batch_slots full */
    keel__batch_slot batch_slots[KEEL__BATCH_SLOTS];
} keel__stats;

/* Size classes of the execution-time estimate: batch 1, 2-3, 4-7, ..., >= 2^15 (sched.c). */
#define KEEL__EST_CLASSES 16

struct keel__generation {
    /* Read-mostly (fixed after publish), read by every request. */
    uint64_t id;
    int64_t version;
    keel_runtime *rt;
    keel__model_entry *entry;
    const keel__backend *backend;
    keel__model_config *cfg;
    void *model;
    void **ctxs; /* all contexts, destroyed with the generation */
    int nctx;
    int max_in_use;  /* nctx, or 1 if the backend cannot run one model concurrently */
    int *free_stack; /* rt->mu: indices of idle contexts (the array; its contents change) */
    size_t memory_estimate;
    int64_t mem_rss;      /* VmRSS change across the build */
    int64_t mem_pss;      /* smaps_rollup Pss change; -1 if unavailable */
    uint64_t mem_charged; /* max(mem_rss, memory_estimate), what the budget counts */
    /* Written per request, kept off the lines above: the reference count (every lease), the
     * context stack's state (rt->mu) and the run-time estimate (every run). */
    char gap_[KEEL__CACHELINE];
    _Atomic int64_t refs;
    int nfree;    /* rt->mu */
    int in_use;   /* rt->mu */
    bool retired; /* rt->mu */
    int nstuck;   /* rt->mu: contexts whose answered run is still in the backend */
    /* nfree > 0 && in_use < max_in_use, written under rt->mu when that changes, read by
     * workers' lanes without it (sched.c). */
    _Atomic bool ctx_idle;
    /* Moving estimate of the backend's run time, ns, per batch size class; 0 = not measured
     * yet. Updated after every run, stored only when it moves (sched.c), read by submit;
     * atomics, no lock; on a line of its own. */
    _Alignas(KEEL__CACHELINE) _Atomic uint64_t est_run_ns[KEEL__EST_CLASSES];
    keel__generation *reap_next; /* rt->reap_mu */
};

/* A vslot's queues: one FIFO per priority level (level l at l - 1), then the queue of
 * requests that passed their timeout under a DELAY policy (served after all others). */
#define KEEL__NQUEUES (KEEL__MAX_PRIORITY_LEVELS + 1)
#define KEEL__DELAYED_Q KEEL__MAX_PRIORITY_LEVELS

struct keel__vslot {
    int64_t version;
    keel__model_entry *entry;
    keel__generation *current;          /* rt->mu; strong reference */
    keel_request *qhead[KEEL__NQUEUES]; /* rt->mu */
    keel_request *qtail[KEEL__NQUEUES]; /* rt->mu */
    uint32_t nqueued_q[KEEL__NQUEUES];  /* rt->mu: requests in each queue */
    uint32_t nqueued;                   /* rt->mu: in all queues */
    uint64_t queued_rows;               /* rt->mu: their rows (request_rows) */
    uint32_t inflight;                  /* rt->mu: admitted, not completed */
    uint32_t max_inflight;              /* rt->mu: from the current generation's config */
    /* rt->mu: the current generation's queue policies (config.h), kept while parked. */
    keel__queue_policy qpolicy[KEEL__MAX_PRIORITY_LEVELS + 1];
    uint32_t priority_levels, default_priority_level; /* rt->mu */
    /* rt->mu: batching waits for more requests until this time (0 = not waiting); flush is
     * set when it passed (sched.c: the timer thread). */
    uint64_t delay_until_ns;
    bool flush;
    /* rt->mu: preserve_ordering (sched.c): the next batch's sequence number, the one to end
     * next, and batches that ended early, unfinished (heads linked by held_next). */
    uint64_t seq_next, seq_done;
    keel_request *held;
    uint32_t nstuck; /* rt->mu: runs with detached requests still in the backend */
    bool in_ready;   /* rt->mu */
    /* nqueued > 0, written under rt->mu when that changes, read without the lock by workers
     * running a lane of v (sched.c: a lane gives way to queued requests). */
    _Atomic bool any_queued;
    bool removed;            /* rt->mu: unlinked; freed when inflight drops to 0 */
    keel__vslot *next;       /* entry's version list, ascending */
    keel__vslot *ready_next; /* rt's ready list */
};

struct keel__model_entry {
    char *name;
    pthread_mutex_t load_mu;
    keel__vslot *versions;             /* rt->mu */
    keel_model_state state;            /* rt->mu */
    keel_err last_error;               /* rt->mu */
    char last_error_msg[KEEL__ERRLEN]; /* rt->mu */
    char load_warnings[KEEL__ERRLEN];  /* rt->mu: the served config's warnings, "" if none */
    uint64_t load_attempts;            /* rt->mu */
    uint64_t load_failures;            /* rt->mu: consecutive */
    uint64_t last_attempt_unix_ms;     /* rt->mu */
    uint64_t next_retry_ns;            /* rt->mu: monotonic; 0 = no retry scheduled */
    uint64_t next_retry_unix_ms;       /* rt->mu: the same on the wall clock */
    /* Last submit, the LRU clock of eviction: written under rt->mu by submit and without it
     * by a worker's lane (sched.c), hence atomic (relaxed; stored only when it moved). */
    _Atomic uint64_t last_used_ns;
    uint64_t charge_hint; /* rt->mu: last measured charge, predicts the next */
    bool loading;         /* rt->mu: a load runs; never evicted meanwhile */
    bool swapping;        /* rt->mu: resource-preserving swap: vslots parked */
    bool evicted;         /* rt->mu: unloaded by the budget; vslots parked */
    bool want_load;       /* rt->mu: evicted and a request waits: reload it */
    bool pinned;          /* rt->mu: from the last config read */
    char *config_json;    /* rt->mu */
    keel__stats stats;
    keel__counters counters[KEEL__SHARDS];
    keel__model_entry *next;
};

struct keel_runtime {
    char *repo;
    keel_model_control control;
    keel__logger log;

    pthread_mutex_t mu;
#ifdef KEEL_BENCH_LOCK_STATS
    uint64_t mu_since_ns; /* mu: when the holder took it */
#endif
    pthread_cond_t work_cv;
    keel__model_entry *models;            /* mu */
    keel__vslot *ready_head, *ready_tail; /* mu */
    _Atomic bool any_ready;               /* see lane_epoch below */
    _Atomic int idle_workers;
    keel_request *running; /* mu: running requests (sched.c), by run_next */
    /* Lanes (sched.c's DESIGN) read these without mu: lane_epoch changes (under mu) with
     * anything that changes where a request is routed or what serves it (a publish, a park,
     * a removal, shutdown): on a line of its own, read on every lane request, written
     * rarely. any_ready (ready_head != NULL) and idle_workers (workers waiting for work)
     * are written under mu, beside the ready list, whose line their writers hold anyway. */
    _Alignas(KEEL__CACHELINE) _Atomic uint64_t lane_epoch;
    _Alignas(KEEL__CACHELINE) bool shutting_down; /* mu: submits refused */
    bool stopping;                                /* mu: workers and the timer exit when idle */
    int nworkers;
    pthread_t workers[KEEL__MAX_WORKERS];
    _Atomic int worker_seq; /* hands each worker thread its index (sched.c) */
    /* The timer thread (sched.c): queue deadlines and batching delays. */
    pthread_cond_t timer_cv; /* CLOCK_MONOTONIC */
    uint64_t timer_next;     /* mu: when the timer wakes next; 0 = when signalled */
    bool timer_started;
    pthread_t timer;
    uint64_t inline_max_ns; /* fixed after create: KEEL_SUBMIT_RUN_IF_FAST's bound */

    pthread_mutex_t reap_mu;
    pthread_cond_t reap_cv;
    pthread_cond_t reap_idle_cv;
    keel__generation *reap_head; /* reap_mu */
    bool reaping;                /* reap_mu */
    bool reap_stop;              /* reap_mu */
    pthread_t reaper;

    const keel__backend *backends[KEEL__MAX_BACKENDS]; /* fixed after create */
    int nbackends;

    _Atomic uint64_t next_gen_id;
    keel__counters counters[KEEL__SHARDS];

    /* Model lifecycle (lifecycle.c) and memory budget (budget.c). */
    pthread_mutex_t build_mu;
    uint32_t poll_interval_ms, settle_ms, retry_initial_ms, retry_max_ms;
    uint64_t mem_limit;
    uint32_t nparked; /* mu: parked vslots */
    bool life_stop;   /* mu */
    bool life_started;
    pthread_t life;
    int life_efd;              /* eventfd waking the lifecycle thread; -1 if none */
    struct keel__watch *watch; /* lifecycle thread only (and create before it starts) */
    size_t nwatch;
    _Atomic uint64_t evictions, reloads, trims, trimmed_bytes;

    /* Preprocessing workers (src/workers; NULL = none). Created first in create, before any
     * thread; destroyed last, in runtime_free, once no thread can use it. */
    struct keel__prep_pool *prep;
};

typedef enum keel__req_state {
    KEEL__REQ_IDLE = 0,
    KEEL__REQ_QUEUED,
    KEEL__REQ_RUNNING,
    KEEL__REQ_COMPLETING,
    KEEL__REQ_LANE, /* admitted to a worker's lane (sched.c), not under rt->mu */
} keel__req_state;

typedef struct keel__tensor {
    char *name;
    keel_datatype datatype;
    int64_t *shape;
    size_t ndim;
    void *data;
    size_t bytes;
    /* NULL: data is the tensor's own (malloc'd). Else data is borrowed
     * (keel_request_add_input_borrowed): release(release_arg) is called once instead of free,
     * by whoever finalises the tensor (the request, or the run slot it moved to). */
    void (*release)(void *arg);
    void *release_arg;
    /* An output's allocations, kept for the request's next run (request.c, "Outputs are
     * recycled"): data holds cap_bytes, shape cap_dims elements. */
    size_t cap_bytes, cap_dims;
} keel__tensor;

typedef struct keel__param {
    char *key;
    char *value;
} keel__param;

struct keel_request {
    keel_runtime *rt;
    char *model;
    int64_t version;
    char *id;      /* NULL: none; else id_keep */
    char *id_keep; /* the id's buffer, id_cap bytes, kept across reuses (request.c) */
    size_t id_cap;
    keel__tensor *inputs;
    size_t ninputs, cap_inputs;
    size_t kept_inputs; /* inputs[0..kept_inputs) hold a name and shape (>= ninputs) */
    char **requested;
    size_t nrequested, cap_requested;
    keel__param *params;
    size_t nparams, cap_params;
    keel__tensor *outputs;
    size_t noutputs, cap_outputs;
    size_t kept_outputs;     /* outputs[0..kept_outputs) hold allocations (>= noutputs) */
    keel_tensor_view *views; /* scratch for run: inputs in config order */
    size_t cap_views;
    uint64_t timeout_us;
    uint32_t priority; /* 0 = the model's default level */

    /* In flight (state under rt->mu, except in a lane: sched.c's DESIGN, "Lanes"; the
     * accesses that can meet a lane's are atomic builtins). */
    keel__req_state state;
    bool cancel_requested;
    bool from_cb; /* submitted by a worker's completion callback (sched.c: lanes) */
    keel_infer_cb cb;
    void *user;
    keel__model_entry *entry;
    keel__vslot *vslot;    /* the admission slot */
    keel__generation *gen; /* lease: generation reference, once dispatched */
    int ctx_index;         /* lease: context of gen, or -1 */
    keel_request *qnext, *qprev;
    uint32_t queue;                      /* index of the vslot queue it waits in */
    keel__timeout_action timeout_action; /* of its level's policy */
    int64_t rows;                        /* request_rows at submit */
    bool ordered;                        /* rt->mu: dispatched under preserve_ordering */
    uint64_t order_seq;                  /* rt->mu: its batch's sequence number */
    keel_request *held_next;             /* rt->mu: its vslot's held batches */
    keel_request *run_next, *run_prev;   /* rt->mu: rt->running, while in_running */
    bool in_running;                     /* rt->mu */
    /* Its run slot while the backend runs (sched.c's DESIGN); NULL before and after. */
    struct keel__run_slot *_Atomic run_slot;
    keel_infer_cb done_cb; /* a batch's completion: cb between lock and call */
    void *done_user;
    uint64_t submit_ns, dispatch_ns, deadline_ns;
    /* Timing of the current run (keel_request_timing): 0 until reached; reset at submit. */
    uint64_t input_end_ns, output_start_ns, complete_ns, preprocess_ns;

    /* Result. */
    keel_err status;
    uint64_t generation_id;
    int64_t ran_version;
    char errmsg[KEEL__ERRLEN];

    /* keel_infer's wait. */
    pthread_mutex_t wait_mu;
    pthread_cond_t wait_cv;
    bool wait_done;
};

/* rt->mu is taken and released through these. A benchmark build (CMake option
 * KEEL_BENCH_LOCK_STATS) counts every acquisition, those that found the lock taken, and how
 * long it was held (registry.c; printed to stderr at exit, bench/lockstat.sh); every other
 * build takes the mutex directly. A condition wait on rt->mu is bracketed by
 * keel__rt_wait_begin / keel__rt_wait_end so that the wait is not counted as holding it. */
#ifdef KEEL_BENCH_LOCK_STATS
void keel__rt_lock(keel_runtime *rt);
void keel__rt_unlock(keel_runtime *rt);
void keel__rt_wait_begin(keel_runtime *rt);
void keel__rt_wait_end(keel_runtime *rt);
#else
#define keel__rt_lock(rt) pthread_mutex_lock(&(rt)->mu)
#define keel__rt_unlock(rt) pthread_mutex_unlock(&(rt)->mu)
#define keel__rt_wait_begin(rt) ((void)(rt))
#define keel__rt_wait_end(rt) ((void)(rt))
#endif

/* Under rt->mu: whatever serves a model or routes its requests changed (a generation
 * published, parked or retired, a version slot added or removed, shutdown): workers' lanes
 * stop taking requests (sched.c's DESIGN, "Lanes"). */
static inline void keel__routing_changed_locked(keel_runtime *rt)
{
    atomic_fetch_add_explicit(&rt->lane_epoch, 1, memory_order_release);
}

#endif
