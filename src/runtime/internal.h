/*
 * internal.h: the runtime's objects: registry entries, version slots, generations, requests.
 *
 * DESIGN
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
 *   (lifecycle.c). It is never held while waiting for the reaper.
 *   rt->mu protects: the model table, each entry's version list and status, each vslot's
 *   current pointer, queue, in-flight count and ready-list membership, each generation's
 *   free-context stack, in-use count and retired flag, and each request's state and cancel
 *   flag. Counters and statistics are atomics and need no lock.
 *   Nothing is released, destroyed or called back while rt->mu is held: completions collect
 *   what to release under the lock and act after unlocking.
 *
 * Request state machine (state under rt->mu):
 *   IDLE --submit--> QUEUED --dispatch--> RUNNING --backend returns--> (complete) --> IDLE
 *                      |  \--expired at dispatch / cancel / unload / shutdown--> (complete)
 *   complete() is the only way out of QUEUED or RUNNING: it returns the context to its own
 *   generation, drops the admission slot, releases the generation reference (all exactly
 *   once), updates statistics, then runs the callback once with no lock held.
 *
 * Generation state: loading (private to the loader) -> ready (published in a vslot) ->
 *   retired (swapped out or unloaded; never hands out a context again) -> freed (reaper).
 *
 * Vslot state (rt->mu): serving (current != NULL) | parked (current == NULL, !removed) |
 *   removed. A vslot is parked when its model is evicted by the memory budget or while a
 *   resource-preserving swap has retired the old generation and builds the new one. Requests
 *   admitted to a parked vslot wait in its queue; publishing a generation into it dispatches
 *   them, a failed load answers them, and a worker answers KEEL_ETIMEDOUT to any whose deadline
 *   passes meanwhile (workers wake for the earliest such deadline: sched.c).
 *
 * Model entry lifecycle (rt->mu; lifecycle.c drives the automatic transitions):
 *   UNAVAILABLE/FAILED --load--> LOADING --ok--> READY --unload--> UNAVAILABLE
 *                                     \--fail--> FAILED (nothing served) or READY (old kept)
 *   READY --evict (budget)--> UNAVAILABLE+evicted --request--> want_load --lifecycle--> load
 *   A failed load schedules next_retry_ns (doubling backoff) unless the runtime is EXPLICIT;
 *   the lifecycle thread retries it then. A success, an unload or a file change resets it.
 *
 * Threads: API calls run on the caller's thread. Worker threads dispatch and run requests.
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

/* Live-object counters (atomics). */
typedef struct keel__counters {
    _Atomic int64_t requests;
    _Atomic int64_t leases;
    _Atomic int64_t queued;
    _Atomic int64_t generations;
    _Atomic int64_t contexts;
    _Atomic int64_t contexts_in_use;
} keel__counters;

typedef struct keel__stats {
    _Atomic uint64_t success;
    _Atomic uint64_t failure[KEEL_ERR_COUNT_];
    _Atomic uint64_t rejected;
    _Atomic uint64_t inference_count;
    _Atomic uint64_t execution_count;
    _Atomic uint64_t queue_ns;
    _Atomic uint64_t compute_ns;
    _Atomic uint64_t last_inference_unix_ms;
} keel__stats;

struct keel__generation {
    _Atomic int64_t refs;
    uint64_t id;
    int64_t version;
    keel_runtime *rt;
    keel__model_entry *entry;
    const keel__backend *backend;
    keel__model_config *cfg;
    void *model;
    void **ctxs; /* all contexts, destroyed with the generation */
    int nctx;
    int *free_stack; /* rt->mu: indices of idle contexts */
    int nfree;       /* rt->mu */
    int in_use;      /* rt->mu */
    int max_in_use;  /* nctx, or 1 if the backend cannot run one model concurrently */
    bool retired;    /* rt->mu */
    size_t memory_estimate;
    int64_t mem_rss;             /* VmRSS change across the build */
    int64_t mem_pss;             /* smaps_rollup Pss change; -1 if unavailable */
    uint64_t mem_charged;        /* max(mem_rss, memory_estimate), what the budget counts */
    keel__generation *reap_next; /* rt->reap_mu */
};

struct keel__vslot {
    int64_t version;
    keel__model_entry *entry;
    keel__generation *current;   /* rt->mu; strong reference */
    keel_request *qhead, *qtail; /* rt->mu */
    uint32_t inflight;           /* rt->mu: admitted, not completed */
    uint32_t max_inflight;       /* rt->mu: from the current generation's config */
    uint64_t default_timeout_us; /* rt->mu */
    bool in_ready;               /* rt->mu */
    bool removed;                /* rt->mu: unlinked; freed when inflight drops to 0 */
    keel__vslot *next;           /* entry's version list, ascending */
    keel__vslot *ready_next;     /* rt's ready list */
};

struct keel__model_entry {
    char *name;
    pthread_mutex_t load_mu;
    keel__vslot *versions;             /* rt->mu */
    keel_model_state state;            /* rt->mu */
    keel_err last_error;               /* rt->mu */
    char last_error_msg[KEEL__ERRLEN]; /* rt->mu */
    uint64_t load_attempts;            /* rt->mu */
    uint64_t load_failures;            /* rt->mu: consecutive */
    uint64_t last_attempt_unix_ms;     /* rt->mu */
    uint64_t next_retry_ns;            /* rt->mu: monotonic; 0 = no retry scheduled */
    uint64_t next_retry_unix_ms;       /* rt->mu: the same on the wall clock */
    uint64_t last_used_ns;             /* rt->mu: last submit (LRU for eviction) */
    uint64_t charge_hint;              /* rt->mu: last measured charge, predicts the next */
    bool loading;                      /* rt->mu: a load runs; never evicted meanwhile */
    bool swapping;                     /* rt->mu: resource-preserving swap: vslots parked */
    bool evicted;                      /* rt->mu: unloaded by the budget; vslots parked */
    bool want_load;                    /* rt->mu: evicted and a request waits: reload it */
    bool pinned;                       /* rt->mu: from the last config read */
    char *config_json;                 /* rt->mu */
    keel__stats stats;
    keel__counters counters;
    keel__model_entry *next;
};

struct keel_runtime {
    char *repo;
    keel_model_control control;
    keel__logger log;

    pthread_mutex_t mu;
    pthread_cond_t work_cv;
    keel__model_entry *models;            /* mu */
    keel__vslot *ready_head, *ready_tail; /* mu */
    bool shutting_down;                   /* mu: submits refused */
    bool stopping;                        /* mu: workers exit when idle */
    int nworkers;
    pthread_t workers[KEEL__MAX_WORKERS];

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
    keel__counters counters;

    /* Model lifecycle (lifecycle.c). */
    pthread_mutex_t build_mu;
    uint32_t poll_interval_ms, settle_ms, retry_initial_ms, retry_max_ms;
    uint64_t mem_limit;
    uint32_t nparked; /* mu: parked vslots (workers then also watch deadlines) */
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
} keel__req_state;

typedef struct keel__tensor {
    char *name;
    keel_datatype datatype;
    int64_t *shape;
    size_t ndim;
    void *data;
    size_t bytes;
} keel__tensor;

typedef struct keel__param {
    char *key;
    char *value;
} keel__param;

struct keel_request {
    keel_runtime *rt;
    char *model;
    int64_t version;
    char *id;
    keel__tensor *inputs;
    size_t ninputs, cap_inputs;
    char **requested;
    size_t nrequested, cap_requested;
    keel__param *params;
    size_t nparams, cap_params;
    keel__tensor *outputs;
    size_t noutputs, cap_outputs;
    keel_tensor_view *views; /* scratch for run: inputs in config order */
    size_t cap_views;
    uint64_t timeout_us;

    /* In flight (state under rt->mu). */
    keel__req_state state;
    bool cancel_requested;
    keel_infer_cb cb;
    void *user;
    keel__model_entry *entry;
    keel__vslot *vslot;    /* the admission slot */
    keel__generation *gen; /* lease: generation reference, once dispatched */
    int ctx_index;         /* lease: context of gen, or -1 */
    keel_request *qnext, *qprev;
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

/* ---- runtime.c */
keel__model_entry *keel__entry_find_locked(keel_runtime *rt, const char *name);
void keel__counter_add(keel_runtime *rt, keel__model_entry *e, size_t field_offset, int64_t d);
#define KEEL__CNT(field) offsetof(keel__counters, field)
/* Test hook: registers an extra backend; only before any model is loaded. */
keel_err keel__runtime_add_backend(keel_runtime *rt, const keel__backend *be);

/* ---- generation.c */
/* Builds a complete generation (load, contexts, warm-up) for one version; no lock held. */
keel_err keel__generation_build(keel_runtime *rt, keel__model_entry *e, int64_t version,
                                keel__generation **out, char *errbuf, size_t errlen);
void keel__generation_acquire(keel__generation *g);
/* Drops one reference; the last one hands g to the reaper. Never call with rt->mu held. */
void keel__generation_release(keel__generation *g);
void *keel__reaper_main(void *arg);
void keel__reaper_stop(keel_runtime *rt);

/* ---- lifecycle.c */
/* Loads name. why is logged; evicted_reload marks a reload a request asked for. */
keel_err keel__model_load(keel_runtime *rt, const char *name, bool evicted_reload, char *errbuf,
                          size_t errlen);
keel_err keel__life_start(keel_runtime *rt); /* after the workers, before load_all */
void keel__life_stop(keel_runtime *rt);      /* first step of destroy */
void keel__life_wake(keel_runtime *rt);      /* any thread, any lock */
/* Reads the process's resident set size and (if available, else -1) proportional set size. */
void keel__mem_sample(int64_t *rss, int64_t *pss);
/* Under rt->mu: requests of a parked vslot of an evicted model exist: ask for a reload. */
void keel__want_load_locked(keel_runtime *rt, keel__model_entry *e);
/* Under rt->mu: after a failed load, when it is tried again (load_failures already counted). */
void keel__retry_schedule_locked(keel_runtime *rt, keel__model_entry *e);
/* Under rt->mu: the memory e's serving generations are charged. */
uint64_t keel__charge_locked(const keel__model_entry *e);

/* Generations taken out of service under rt->mu, released after unlocking. */
typedef struct keel__retire_list {
    keel__generation **gens;
    size_t n, cap;
    char evicted[256]; /* names of models evicted, for the log */
} keel__retire_list;
/* Under rt->mu: room for one generation per vslot of the runtime; false on ENOMEM. */
bool keel__retire_reserve_locked(keel_runtime *rt, keel__retire_list *l);
/* Under rt->mu: retires v's generation into l and parks v (reserve first). */
void keel__vslot_park_locked(keel_runtime *rt, keel__vslot *v, keel__retire_list *l);
/* No lock held: logs evictions, releases the generations, empties l. */
void keel__retire_release(keel_runtime *rt, keel__retire_list *l);
/* Under rt->mu (reserve first): evicts least recently used models until self fits with need
 * bytes; false (nothing evicted, msg says why) if it cannot fit. */
bool keel__make_room_locked(keel_runtime *rt, keel__model_entry *self, uint64_t need,
                            keel__retire_list *l, char *msg, size_t len);
void keel__watch_snapshot(keel_runtime *rt); /* create, POLL mode, before the first loads */
void keel__watch_free(keel_runtime *rt);
void keel__trim(keel_runtime *rt); /* reaper, holding build_mu */

/* ---- request.c */
void keel__request_clear_outputs(keel_request *req);
/* Validates req's inputs against cfg and fills req->views (config order) and *batch. */
keel_err keel__request_bind_inputs(keel_request *req, const keel__model_config *cfg,
                                   uint32_t accepted_types, int64_t *batch);
keel_err keel__request_emit(keel__run_io *io, const char *name, keel_datatype dt,
                            const int64_t *shape, size_t ndim, const void *data, size_t bytes);
void keel__request_set_error(keel_request *req, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- preprocess.c */
/* Saved state of a request whose image input was swapped for the decoded tensor. */
typedef struct keel__prep_swap {
    keel__tensor original; /* the BYTES input, out of req->inputs while the backend runs */
    size_t index;          /* its slot in req->inputs */
    bool active;
} keel__prep_swap;
/* Worker thread, no lock held, request leased: if the generation's config has a
 * "preprocess" section and the request carries its BYTES input, decodes the images in a
 * preprocessing worker (deadline: the request's) and puts the FP32 tensor in its place. */
keel_err keel__preprocess_begin(keel_request *req, keel__prep_swap *sw);
/* Restores the request's own input after the run (always call after begin). */
void keel__preprocess_end(keel_request *req, keel__prep_swap *sw);
/* Under no lock: false if g's model needs the pool and the pool is unhealthy. */
bool keel__preprocess_ready(keel_runtime *rt, const keel__model_config *cfg);

/* ---- sched.c */
void *keel__worker_main(void *arg);
/* Completes every request in the list linked by qnext (already unlinked, state COMPLETING). */
void keel__complete_list(keel_request *list, keel_err status, const char *why);
/* Under rt->mu: unlinks every queued request of v into *list (state COMPLETING). */
void keel__vslot_drain_locked(keel_runtime *rt, keel__vslot *v, keel_request **list);
/* Under rt->mu: moves the requests queued in from that asked for the newest version (-1) to
 * the tail of to's queue (a newer version of the same model that serves), with their
 * admission slots: a version leaving the policy must not fail requests that did not ask for
 * it. Requests for from's version itself stay. */
void keel__vslot_move_latest_locked(keel_runtime *rt, keel__vslot *from, keel__vslot *to);
/* Under rt->mu: puts v on the ready list if it can dispatch, and wakes a worker. */
void keel__vslot_kick_locked(keel_runtime *rt, keel__vslot *v);
/* Answers queued requests of parked vslots whose deadline passed (no lock held). Returns the
 * earliest remaining deadline of a parked request, 0 if none. */
uint64_t keel__expire_parked(keel_runtime *rt);

#endif
