/*
 * keel.h: the one public header of libkeel, an embeddable model-inference runtime.
 *
 * DESIGN
 * A keel_runtime serves the models found in one model repository directory.
 * Each loaded model version is served by a *generation*: the backend model (shared weights)
 * plus a bounded pool of execution contexts. Reloading a model builds a complete new
 * generation, runs a warm-up inference, publishes it, and releases the old one; requests
 * already running on the old generation finish there, and the old generation is freed when
 * its last request completes. A failed load leaves the previous generation serving.
 *
 * Requests are owned by the caller. keel_infer_submit() hands a request to the runtime until
 * its completion callback runs; keel_infer() is submit + wait. Contract (as in libuv): if
 * keel_infer_submit() returns KEEL_OK the callback runs exactly once, on a keel thread or on
 * the thread that cancels the request or destroys the runtime, with no keel lock held; any
 * other return means it never runs.
 *
 * Thread-safety: every function may be called from any thread, except that one request must
 * not be used from two threads at once (keel_request_cancel() is the exception: it may race
 * with completion).
 *
 * Conventions: functions return keel_err (KEEL_OK = 0). Out-parameters are set to NULL/0 on
 * entry and filled only on KEEL_OK. destroy/release functions accept NULL. The library never
 * prints; install a log handler to see its messages. It never aborts on bad input; a broken
 * internal invariant (double release, refcount underflow) is an always-on assertion.
 */
#ifndef KEEL_KEEL_H
#define KEEL_KEEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Marks the functions of the public API: the only symbols libkeel.so exports (libkeel is
 * compiled with hidden visibility, so nothing of keel's internals is reachable from outside). */
#if defined(__GNUC__) || defined(__clang__)
#define KEEL_EXTERN __attribute__((visibility("default")))
#else
#define KEEL_EXTERN
#endif

#define KEEL_VERSION_MAJOR 0
#define KEEL_VERSION_MINOR 1
#define KEEL_VERSION_PATCH 0
#define KEEL_VERSION_STRING "0.1.0"

/* ---------------------------------------------------------------- errors */

typedef enum keel_err {
    KEEL_OK = 0,
    KEEL_EINVAL,       /* bad argument or bad input (names, shapes, datatypes, sizes) */
    KEEL_ENOMEM,       /* an allocation failed */
    KEEL_ENOTFOUND,    /* unknown model, version or output */
    KEEL_EUNAVAILABLE, /* model not ready, or its queue is full: try again later */
    KEEL_ETIMEDOUT,    /* the request's deadline passed before it ran */
    KEEL_ECANCELED,    /* the request was cancelled */
    KEEL_ESHUTDOWN,    /* the runtime is shutting down */
    KEEL_ECONFIG,      /* a config.json is invalid */
    KEEL_ELOAD,        /* a model file could not be loaded */
    KEEL_EBACKEND,     /* the backend failed while running a request */
    KEEL_EIO,          /* an operating-system call failed */
    KEEL_EBUSY,        /* the object is in use (e.g. a request submitted twice) */
    KEEL_EINTERNAL,    /* a bug in keel */
    KEEL_ERESOURCE,    /* a resource limit (the model memory limit) does not allow it */
    KEEL_ERR_COUNT_    /* number of codes; not an error */
} keel_err;

/* Returns a static, human-readable description of err (never NULL). */
KEEL_EXTERN const char *keel_strerror(keel_err err);
/* Returns the code's name, e.g. "KEEL_ETIMEDOUT" (never NULL). */
KEEL_EXTERN const char *keel_err_name(keel_err err);

/* ---------------------------------------------------------------- datatypes */

/* The KServe V2 tensor datatypes. */
typedef enum keel_datatype {
    KEEL_TYPE_INVALID = 0,
    KEEL_TYPE_BOOL,
    KEEL_TYPE_UINT8,
    KEEL_TYPE_UINT16,
    KEEL_TYPE_UINT32,
    KEEL_TYPE_UINT64,
    KEEL_TYPE_INT8,
    KEEL_TYPE_INT16,
    KEEL_TYPE_INT32,
    KEEL_TYPE_INT64,
    KEEL_TYPE_FP16,
    KEEL_TYPE_FP32,
    KEEL_TYPE_FP64,
    KEEL_TYPE_BYTES, /* each element: 4-byte little-endian length, then that many bytes */
    KEEL_TYPE_COUNT_
} keel_datatype;

/* "FP32", "BYTES", ... (KServe names); "INVALID" for anything else. */
KEEL_EXTERN const char *keel_datatype_name(keel_datatype dt);
/* Accepts KServe names ("FP32") and Triton config names ("TYPE_FP32", "TYPE_STRING").
 * Returns KEEL_TYPE_INVALID for anything else. */
KEEL_EXTERN keel_datatype keel_datatype_from_name(const char *name);
/* Size of one element in bytes; 0 for BYTES and INVALID. */
KEEL_EXTERN size_t keel_datatype_size(keel_datatype dt);

/* ---------------------------------------------------------------- logging */

typedef enum keel_log_level {
    KEEL_LOG_ERROR = 0,
    KEEL_LOG_WARN,
    KEEL_LOG_INFO,
    KEEL_LOG_DEBUG,
} keel_log_level;

/* Called from any keel thread, never with a keel lock held. msg is valid for the call only. */
typedef void (*keel_log_fn)(void *user, keel_log_level level, const char *msg);

/* ---------------------------------------------------------------- runtime */

typedef struct keel_runtime keel_runtime;

typedef enum keel_model_control {
    KEEL_CONTROL_NONE = 0, /* load every model in the repository at create */
    KEEL_CONTROL_EXPLICIT, /* load nothing at create; models are loaded through the API */
    KEEL_CONTROL_POLL,     /* as NONE, then watch the repository: load new and changed models
                              once their files have settled, unload removed ones */
    /* libkeel itself always allows keel_model_load/unload; a server enforces the mode. */
} keel_model_control;

typedef struct keel_runtime_opts {
    const char *model_repository; /* directory; required. Copied. */
    keel_model_control control;   /* default KEEL_CONTROL_NONE */
    int worker_threads;           /* inference threads; 0 = number of online CPUs (max 64) */
    keel_log_fn log_fn;           /* may be NULL: messages are dropped */
    void *log_user;
    keel_log_level log_level; /* default KEEL_LOG_INFO */
    /* POLL: a full re-scan of the repository at least this often (inotify wakes the watcher
     * sooner where it works); default 5000. */
    uint32_t poll_interval_ms;
    /* POLL: a new or changed model is loaded once none of its files has changed for this
     * long (a half-copied file is never loaded); default 1000. */
    uint32_t settle_ms;
    /* NONE/POLL: a failed load is retried after retry_initial_ms, doubling up to
     * retry_max_ms, until it succeeds or its files change; defaults 1000 and 60000.
     * EXPLICIT mode never retries by itself (the caller got the error). */
    uint32_t retry_initial_ms;
    uint32_t retry_max_ms;
    /* Bytes all loaded models may hold together (their charged memory, see
     * keel_model_status); 0 = no limit. A load that would exceed it first unloads the least
     * recently used models not marked "pinned" ("evicts" them; an evicted model is loaded
     * again by its next request), and fails with KEEL_ERESOURCE if that is not enough. */
    uint64_t model_memory_limit;
    /* Preprocessing worker processes for models whose config.json has a "preprocess"
     * section (images in, tensors out; docs/OPERATIONS.md). 0 (the default) = none: such
     * models then fail to load. With N > 0, keel_runtime_create forks a small fork server
     * first, from the calling thread, before it starts threads or loads models; call it
     * before your program starts threads of its own. */
    int preprocess_workers;
    /* A preprocessing task's deadline when the request's own is later or unset; default
     * 10000. A worker that overruns it is killed and replaced. */
    uint32_t preprocess_timeout_ms;
    /* Bytes one request's preprocessing may move (encoded images plus the decoded tensor);
     * larger requests fail with KEEL_ERESOURCE. Default 64 MiB. */
    uint64_t preprocess_max_bytes;
    /* keel_infer_submit_ex with KEEL_SUBMIT_RUN_IF_FAST runs a request on the calling thread
     * only if its model version's estimated execution time for a batch of that size is below
     * this bound, in microseconds. Default 200; 0 = no model counts as fast. */
    uint32_t inline_max_us;
} keel_runtime_opts;

KEEL_EXTERN void keel_runtime_opts_init(keel_runtime_opts *opts);

/*
 * Creates a runtime. With KEEL_CONTROL_NONE every model in the repository is loaded; a model
 * that fails to load is recorded (see keel_model_list) and does not fail the create.
 * On KEEL_OK the caller owns *out and must keel_runtime_destroy() it.
 */
KEEL_EXTERN keel_err keel_runtime_create(const keel_runtime_opts *opts, keel_runtime **out);

/*
 * Staged shutdown: new submits fail with KEEL_ESHUTDOWN, queued requests complete with
 * KEEL_ESHUTDOWN (their callbacks run on this thread), running requests finish, then every
 * generation, context and thread is released. The caller must not destroy requests that are
 * still in flight before their callbacks have run. Accepts NULL.
 * A backend call in progress is waited for, however long it takes: a model cannot be freed
 * while a backend thread is inside it, so a call that never returns makes this never return.
 * To bound a shutdown, cancel what is running first (keel_request_cancel answers a running
 * request at once and leaves its context stuck) and give up on destroy after a bound of your
 * own, ending the process without it: `keel serve` does so (--stuck-exit-secs, exit status 3).
 */
KEEL_EXTERN void keel_runtime_destroy(keel_runtime *rt);

/*
 * Waits until every retired generation whose last reference has dropped has been freed by
 * the reaper thread. Useful before reading counters or measuring memory. Thread-safe.
 */
KEEL_EXTERN void keel_runtime_quiesce(keel_runtime *rt);

/* ---------------------------------------------------------------- model control */

/*
 * Loads (or reloads) the model <repository>/<name>: reads config.json, picks versions by the
 * version policy, builds a new generation for each (load, contexts, warm-up inference) and
 * publishes them all at once; versions that leave the policy are unloaded. If anything fails
 * nothing is published, the previous generations keep serving, and the error is recorded in
 * the model's status. errbuf (may be NULL) receives a message naming the file and reason.
 * Blocking. Loads of one model are serialised; the builds of all models run one at a time
 * (so that each generation's memory can be measured, see keel_model_status), the rest of
 * loads of different models in parallel. With model_memory_limit, least recently used models
 * may be evicted first, or the load fails with KEEL_ERESOURCE. config.json's "keel" object
 * may set "swap_policy" ("availability_preserving", the default: the old generation serves
 * until the new one is published; "resource_preserving": the old one is retired and freed
 * first and requests wait for the new one) and "pinned" (never evicted).
 */
KEEL_EXTERN keel_err keel_model_load(keel_runtime *rt, const char *name, char *errbuf,
                                     size_t errlen);

/* Unloads every version of name. Queued requests complete with KEEL_EUNAVAILABLE; running
 * requests finish on their generation. KEEL_ENOTFOUND if the model is not loaded. */
KEEL_EXTERN keel_err keel_model_unload(keel_runtime *rt, const char *name);

typedef enum keel_model_state {
    KEEL_MODEL_UNAVAILABLE = 0, /* known (in the repository or loaded before) but not loaded */
    KEEL_MODEL_LOADING,
    KEEL_MODEL_READY,
    KEEL_MODEL_UNLOADING,
    KEEL_MODEL_FAILED, /* the last load failed and no version is serving */
} keel_model_state;

KEEL_EXTERN const char *keel_model_state_name(keel_model_state st); /* "READY", ... */

/* One row per (model, loaded version); a model with no version loaded has one row with
 * version -1. Strings are owned by the list. */
typedef struct keel_model_status {
    const char *name;
    int64_t version;            /* -1 if none loaded */
    keel_model_state state;     /* of this version (for version -1: of the model) */
    uint64_t generation_id;     /* monotonic, never reused; 0 if none */
    keel_err last_error;        /* result of the most recent load attempt of the model */
    const char *last_error_msg; /* "" if the last load succeeded */
    /* Fields of the served configuration keel ignores because ignoring them is harmless (a
     * Triton config.pbtxt's model_warmup, say), one per line; "" if none. */
    const char *warnings;
    uint64_t load_attempts;        /* loads attempted since the runtime started */
    uint64_t load_failures;        /* consecutive failed loads (0 after a success) */
    uint64_t last_attempt_unix_ms; /* wall clock of the most recent load attempt; 0 if none */
    uint64_t next_retry_unix_ms;   /* when keel retries a failed load itself; 0 if it won't */
    bool pinned;                   /* config.json "pinned": never evicted */
    bool evicted; /* unloaded to stay within model_memory_limit; its next request reloads it */
    /* Memory of this row's generation (rows with version -1: all 0). Measured around its
     * build (load, contexts, warm-up), which keel serialises process-wide so that the change
     * belongs to it: */
    int64_t mem_rss_bytes;       /* change of the process's resident set size (VmRSS) */
    int64_t mem_pss_bytes;       /* change of its proportional set size (smaps_rollup); -1 = n/a */
    uint64_t mem_estimate_bytes; /* the backend's own estimate; 0 if it has none */
    uint64_t mem_charged_bytes;  /* what model_memory_limit counts: max(RSS change, estimate) */
} keel_model_status;

/* Lists every model of the repository and every model keel has loaded. On KEEL_OK the caller
 * owns *out (free with keel_model_status_free). */
KEEL_EXTERN keel_err keel_model_list(keel_runtime *rt, keel_model_status **out, size_t *count);
KEEL_EXTERN void keel_model_status_free(keel_model_status *list, size_t count);

/* The config.json of the model's newest loaded generation, as normalised JSON (defaults
 * filled in). On KEEL_OK the caller owns *out (free()). KEEL_EUNAVAILABLE if not loaded. */
KEEL_EXTERN keel_err keel_model_config_json(keel_runtime *rt, const char *name, char **out);

/* True if the model (version -1 = any) has a ready generation. */
KEEL_EXTERN bool keel_model_is_ready(keel_runtime *rt, const char *name, int64_t version);

/* ---------------------------------------------------------------- statistics and counters */

/* Per-model statistics, kept across reloads (they name the model, never a generation). */
typedef struct keel_model_stats {
    uint64_t success;                  /* requests that completed KEEL_OK */
    uint64_t failure[KEEL_ERR_COUNT_]; /* admitted requests that completed with that error */
    uint64_t rejected;                 /* submits refused because the queue was full */
    uint64_t inference_count;          /* rows (batch elements) computed successfully */
    uint64_t execution_count;          /* backend run calls */
    uint64_t queue_ns;                 /* total time admitted requests waited in queue */
    uint64_t compute_ns;               /* total time in the backend's run */
    uint64_t last_inference_unix_ms;   /* wall clock of the last completion; 0 if none */
    /* Where requests ran: on the submitting thread (KEEL_SUBMIT_RUN_HERE, _RUN_IF_FAST,
     * keel_infer, and requests an inference thread's callback submitted and that thread
     * kept: keel_infer_submit) or handed to an inference thread. Requests that never ran
     * (expired in the queue, cancelled while queued) count in neither. */
    uint64_t runs_inline;
    uint64_t runs_handed_off;
} keel_model_stats;

KEEL_EXTERN keel_err keel_model_stats_get(keel_runtime *rt, const char *name,
                                          keel_model_stats *out);

/* Executions of a batching model by executed batch size (rows), as Triton's batch_stats:
 * how many backend calls ran with that many rows and the time they took (input = merging
 * the requests' inputs, infer = the backend call, output = splitting the outputs back). */
typedef struct keel_batch_stat {
    uint64_t batch_size;
    uint64_t count;
    uint64_t input_ns, infer_ns, output_ns;
} keel_batch_stat;

/* Fills out[0..max) with the sizes seen, ascending; *count is how many there are (may be
 * more than max). At most 128 distinct sizes are kept per model; executions of further
 * sizes are counted in execution_count only. */
KEEL_EXTERN keel_err keel_model_batch_stats_get(keel_runtime *rt, const char *name,
                                                keel_batch_stat *out, size_t max, size_t *count);

/* Process-wide memory management. */
typedef struct keel_memory_stats {
    uint64_t limit_bytes;   /* model_memory_limit (0 = none) */
    uint64_t charged_bytes; /* sum of mem_charged_bytes over serving generations */
    uint64_t evictions;     /* models unloaded to make room */
    uint64_t reloads;       /* evicted models loaded again because a request came */
    uint64_t trims;         /* malloc_trim calls after generations were freed */
    uint64_t trimmed_bytes; /* resident memory those trims gave back to the OS */
    uint64_t rss_bytes;     /* the process's resident set size now */
    /* The process's allocator (glibc malloc, or jemalloc when the program links or preloads
     * it): bytes the program has allocated and not freed, and bytes it freed that the
     * allocator still holds. In-use growing over reloads is a leak; free-held growing while
     * in-use stays flat is fragmentation. */
    const char *heap_allocator; /* "glibc" or "jemalloc" (static string) */
    uint64_t heap_in_use_bytes;
    uint64_t heap_free_bytes;
} keel_memory_stats;

KEEL_EXTERN void keel_memory_stats_get(keel_runtime *rt, keel_memory_stats *out);

/* Tells the process's allocator that the calling thread goes to sleep after work: the
 * memory its per-thread cache holds is given back (jemalloc's "thread.idle"; nothing with
 * glibc's malloc, whose per-thread cache is small). Any thread. It costs microseconds and the
 * next allocations refill the cache, so call it when a thread has been idle for a while (keel's
 * own threads do after a second), not per request. */
KEEL_EXTERN void keel_heap_thread_idle(void);

/* Live objects. All return to their idle values when nothing is in flight. */
typedef struct keel_counters {
    int64_t requests;        /* keel_request objects alive (created, not destroyed) */
    int64_t leases;          /* requests admitted and not yet completed (queue slots in use) */
    int64_t queued;          /* admitted requests waiting for a context */
    int64_t generations;     /* generations alive (serving, retiring, or awaiting the reaper) */
    int64_t contexts;        /* execution contexts alive */
    int64_t contexts_in_use; /* contexts currently running a request */
    /* Of those, contexts whose request was answered (deadline or cancel) while the backend
     * still runs it: not reused until the backend returns. */
    int64_t contexts_stuck;
} keel_counters;

/* Totals over the runtime. */
KEEL_EXTERN void keel_counters_get(keel_runtime *rt, keel_counters *out);
/* One model's counters; for a model, requests counts its requests in flight. */
KEEL_EXTERN keel_err keel_model_counters_get(keel_runtime *rt, const char *name,
                                             keel_counters *out);

/* Preprocessing workers (zeros when the runtime has none). */
typedef struct keel_preprocess_stats {
    bool enabled;           /* preprocess_workers > 0 */
    bool healthy;           /* the fork server lives and workers can be kept alive */
    uint32_t workers;       /* configured */
    uint32_t workers_alive; /* running now */
    int64_t forkserver_pid; /* -1 if none */
    /* Workers replaced, by cause: died of a signal, exited, overran a task's deadline,
     * broke the protocol (e.g. an unsealed result). */
    uint64_t restarts_signal, restarts_exit, restarts_timeout, restarts_protocol;
    uint64_t spawn_failures;
    /* Tasks by outcome: done; refused as invalid input (bad image); deadline passed; the
     * worker crashed; over a byte limit; other errors. */
    uint64_t tasks_ok, tasks_invalid, tasks_timeout, tasks_crashed, tasks_rejected, tasks_error;
    int64_t memfds_open;      /* shared-memory segments keel holds now (0 when idle) */
    uint64_t bytes_in_flight; /* task inputs plus results now */
} keel_preprocess_stats;

KEEL_EXTERN void keel_preprocess_stats_get(keel_runtime *rt, keel_preprocess_stats *out);

/* ---------------------------------------------------------------- requests */

typedef struct keel_request keel_request;

/* Creates a request for model name, version (-1 = the newest loaded version). The model need
 * not be loaded yet; that is checked at submit. On KEEL_OK the caller owns *out. */
KEEL_EXTERN keel_err keel_request_create(keel_runtime *rt, const char *model, int64_t version,
                                         keel_request **out);

/* Destroys a request that is not in flight (never submitted, or its callback has run;
 * it may be called from inside the callback). Destroying an in-flight request is a bug and
 * an assertion. Accepts NULL. */
KEEL_EXTERN void keel_request_destroy(keel_request *req);

/* Sets the request id (copied; echoed by servers). */
KEEL_EXTERN keel_err keel_request_set_id(keel_request *req, const char *id);
KEEL_EXTERN const char *keel_request_id(const keel_request *req); /* "" if unset */

/* Adds a named input tensor. The data is copied. shape has ndim entries, each >= 0; bytes
 * must equal the element count times the datatype size (for BYTES: the serialised size).
 * Full validation against the model happens when the request runs. */
KEEL_EXTERN keel_err keel_request_add_input(keel_request *req, const char *name, keel_datatype dt,
                                            const int64_t *shape, size_t ndim, const void *data,
                                            size_t bytes);
/* As keel_request_add_input, but takes data instead of copying it: data must come from
 * malloc(). On KEEL_OK the request owns it (and frees it with free()); on any other return
 * the caller still does. Saves a copy for callers that decode into a buffer of their own. */
KEEL_EXTERN keel_err keel_request_add_input_owned(keel_request *req, const char *name,
                                                  keel_datatype dt, const int64_t *shape,
                                                  size_t ndim, void *data, size_t bytes);

/* As keel_request_add_input, but borrows data: no copy; the request reads it in place and
 * calls release(arg) exactly once when it no longer needs it (at keel_request_destroy, or,
 * for a request answered at its deadline or cancel while its backend call still runs, when
 * that call returns: a resubmit must add its inputs again). Until then data must stay valid
 * and unchanged. release may run on any thread, with no keel lock held. On any return other
 * than KEEL_OK release is not called and the caller keeps data. For callers whose buffers
 * outlive the request anyway, or that count references (keel serve: a request body's binary
 * tensors). */
KEEL_EXTERN keel_err keel_request_add_input_borrowed(keel_request *req, const char *name,
                                                     keel_datatype dt, const int64_t *shape,
                                                     size_t ndim, const void *data, size_t bytes,
                                                     void (*release)(void *arg), void *arg);

/* Asks for one output by name. With no requested outputs, all of the model's are returned. */
KEEL_EXTERN keel_err keel_request_add_output(keel_request *req, const char *name);

/* A string request parameter (both copied; a later set of the same key replaces it). */
KEEL_EXTERN keel_err keel_request_set_parameter(keel_request *req, const char *key,
                                                const char *value);
KEEL_EXTERN const char *keel_request_parameter(const keel_request *req,
                                               const char *key); /* or NULL */

/* Timeout from submit, in microseconds; 0 = the model's default_timeout_microseconds (0 there
 * = none). A request still queued when its deadline passes completes with KEEL_ETIMEDOUT (or,
 * under a DELAY queue policy, waits behind every other request) and never reaches the backend
 * meanwhile. The request's timeout replaces the model's default when the model has none or
 * its queue policy sets allow_timeout_override; otherwise it can only shorten it. */
KEEL_EXTERN void keel_request_set_timeout_us(keel_request *req, uint64_t timeout_us);
/* Priority level (Triton's "priority": 1 is the highest); 0 = the model's
 * default_priority_level. A model without priority_levels has the one level 1. A level the
 * model does not have fails the submit with KEEL_EINVAL. */
KEEL_EXTERN void keel_request_set_priority(keel_request *req, uint32_t priority);

/* Completion callback: status is KEEL_OK or the reason the request failed. Runs exactly once
 * per successful submit, with no keel lock held. It may destroy or resubmit req, and submit
 * others, but must not wait for another request to complete (keel_infer included): the
 * inference thread running it may be the one, or hold the context, that request needs. */
typedef void (*keel_infer_cb)(keel_request *req, keel_err status, void *user);

/*
 * Submits req. KEEL_OK: cb(req, status, user) will run exactly once; the request belongs to
 * the runtime until then. Any other return: cb never runs and req is unchanged apart from
 * its error message. Returns KEEL_EUNAVAILABLE at once if the model is not ready or its queue
 * is full (never blocks; a model evicted by the memory limit is the exception: the request
 * is queued, the model is loaded again, and the request completes KEEL_ETIMEDOUT if its
 * deadline passes first), KEEL_ENOTFOUND for an unknown model or version, KEEL_EBUSY if req is
 * already in flight, KEEL_ESHUTDOWN during runtime destroy. A request may be submitted again
 * after its callback has run; its previous outputs are discarded.
 * Submitted from a completion callback (a pipeline that keeps requests in flight this way):
 * a request for the model whose request just completed on that inference thread, with no
 * timeout or priority of its own, for a fast model without dynamic batching, preprocessing,
 * priority levels or a default queue timeout, is kept by that thread and run there after
 * the callback returns, with no runtime lock and no hand-off (it may start before requests
 * other threads queued earlier; the thread still serves those between its own). Its
 * admission slot stays counted until the callbacks that submitted nothing return.
 */
KEEL_EXTERN keel_err keel_infer_submit(keel_request *req, keel_infer_cb cb, void *user);

/* Flags for keel_infer_submit_ex. */
enum {
    /* When the model version's queue is empty and its current generation has an idle
     * context, run the request on the calling thread: cb runs before the call returns. It
     * never waits for a context: otherwise the request is queued as usual. */
    KEEL_SUBMIT_RUN_HERE = 1u << 0,
    /* As KEEL_SUBMIT_RUN_HERE, and only if the model is fast and needs no preprocessing:
     * the model version's moving estimate of the backend's run time for a batch of this
     * size (power-of-two size classes, measured on every run) is known and below the
     * runtime's inline_max_us. Otherwise the request is queued for an inference thread,
     * whose runs keep the estimate current. A thread serving many clients (an HTTP thread)
     * thus runs fast models itself and never computes a slow one. */
    KEEL_SUBMIT_RUN_IF_FAST = 1u << 1,
    /* For a model version with dynamic batching: queue the request without waking an
     * inference thread for it. The caller promises to call keel_runtime_run_gathered soon
     * from this thread (an I/O thread: once it has read every request that arrived
     * together), which forms batches from what is queued and runs them on the calling thread
     * when the model is fast, so that requests arriving together run as one backend call
     * with no thread hand-off. Ignored for a model without dynamic batching (combine it with
     * KEEL_SUBMIT_RUN_IF_FAST for those). */
    KEEL_SUBMIT_GATHER = 1u << 2,
};

/*
 * Dispatches the batches that are ready now (see KEEL_SUBMIT_GATHER), one per model version
 * at most: a batch of a fast model (no preprocessing, its estimated run time for a batch of
 * that size known and below inline_max_us) runs on the calling thread and its callbacks run
 * before this returns; the others are handed to the inference threads. Never waits for a
 * context: a model whose contexts are busy is dispatched when one frees. Any thread.
 */
KEEL_EXTERN void keel_runtime_run_gathered(keel_runtime *rt);

/* keel_infer_submit with flags (0 = the same as keel_infer_submit). Same contract: KEEL_OK
 * means cb runs exactly once (with KEEL_SUBMIT_RUN_HERE possibly before this returns). */
KEEL_EXTERN keel_err keel_infer_submit_ex(keel_request *req, unsigned flags, keel_infer_cb cb,
                                          void *user);

/* Synchronous inference: submit + wait for completion. Returns the request's status. When the
 * model's queue is empty and a context is idle, the request runs on the calling thread (same
 * admission, lease and completion code, without the hand-off to a worker). */
KEEL_EXTERN keel_err keel_infer(keel_request *req);

/* Cancels an in-flight request. A queued request completes with KEEL_ECANCELED (its callback
 * may run on this thread before this returns); a running one completes with KEEL_ECANCELED
 * when the backend returns, its outputs discarded. A request an inference thread kept from
 * a callback (keel_infer_submit) completes KEEL_ECANCELED on that thread, without running if
 * it has not started. KEEL_OK if the cancel was recorded, KEEL_EINVAL if the request is not
 * in flight. */
KEEL_EXTERN keel_err keel_request_cancel(keel_request *req);

/* Result accessors: valid after completion until the request is destroyed or resubmitted. */
KEEL_EXTERN keel_err keel_request_status(const keel_request *req);
/* A message naming what was wrong when status != KEEL_OK ("" otherwise). */
KEEL_EXTERN const char *keel_request_error(const keel_request *req);
/* The generation and version the request ran on (0 / -1 if it never reached one). */
KEEL_EXTERN uint64_t keel_request_generation_id(const keel_request *req);
KEEL_EXTERN int64_t keel_request_model_version(const keel_request *req);

/*
 * Where a request's time went in its most recent run: CLOCK_MONOTONIC timestamps in
 * nanoseconds (comparable with clock_gettime(CLOCK_MONOTONIC) in the caller), 0 for a step
 * the request never reached (a request that timed out in its queue has no dispatch). The
 * steps are those of Triton's trace format, so that a server can write traces, latency
 * histograms and access logs without timing libkeel from the outside:
 *   queue time   = (dispatch_ns, or complete_ns if never dispatched) - submit_ns
 *   compute time = output_start_ns - input_end_ns (the backend's run, as in the statistics)
 */
typedef struct keel_request_timing {
    uint64_t submit_ns;       /* admitted by keel_infer_submit: the queue wait starts */
    uint64_t dispatch_ns;     /* left its queue with a context (compute starts) */
    uint64_t input_end_ns;    /* inputs preprocessed and bound: the backend's run starts */
    uint64_t output_start_ns; /* the backend's run returned: outputs are being collected */
    uint64_t complete_ns;     /* completed (any status), just before the callback */
    uint64_t preprocess_ns;   /* duration of image preprocessing in a worker; 0 = none */
} keel_request_timing;

/* Fills *out (caller's storage) with req's timing: zeros for a request never submitted.
 * Valid, like the other result accessors, from the callback until the request is destroyed
 * or submitted again; complete_ns != 0 means the callback ran (or is running). */
void keel_request_timing_get(const keel_request *req, keel_request_timing *out);

typedef struct keel_tensor_view {
    const char *name;
    keel_datatype datatype;
    const int64_t *shape;
    size_t ndim;
    const void *data;
    size_t bytes;
} keel_tensor_view;

KEEL_EXTERN size_t keel_request_output_count(const keel_request *req);
/* Borrowed view of output i; KEEL_ENOTFOUND if out of range. */
KEEL_EXTERN keel_err keel_request_output(const keel_request *req, size_t i, keel_tensor_view *out);
KEEL_EXTERN keel_err keel_request_output_by_name(const keel_request *req, const char *name,
                                                 keel_tensor_view *out);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_KEEL_H */
