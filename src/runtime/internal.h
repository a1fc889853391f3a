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
 *   entry->load_mu  ->  rt->mu  ->  req->wait_mu / rt->reap_mu (leaves)
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
 * Threads: API calls run on the caller's thread. Worker threads dispatch and run requests.
 * The reaper thread frees generations. Loads run on the thread calling keel_model_load.
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

/* ---- request.c */
void keel__request_clear_outputs(keel_request *req);
/* Validates req's inputs against cfg and fills req->views (config order) and *batch. */
keel_err keel__request_bind_inputs(keel_request *req, const keel__model_config *cfg,
                                   uint32_t accepted_types, int64_t *batch);
keel_err keel__request_emit(keel__run_io *io, const char *name, keel_datatype dt,
                            const int64_t *shape, size_t ndim, const void *data, size_t bytes);
void keel__request_set_error(keel_request *req, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- sched.c */
void *keel__worker_main(void *arg);
/* Completes every request in the list linked by qnext (already unlinked, state COMPLETING). */
void keel__complete_list(keel_request *list, keel_err status, const char *why);
/* Under rt->mu: unlinks every queued request of v into *list (state COMPLETING). */
void keel__vslot_drain_locked(keel_runtime *rt, keel__vslot *v, keel_request **list);
/* Under rt->mu: puts v on the ready list if it can dispatch, and wakes a worker. */
void keel__vslot_kick_locked(keel_runtime *rt, keel__vslot *v);

#endif
