/*
 * runtime.c: runtime create/destroy and the public API glue that spans layers.
 *
 * DESIGN
 * The top layer of src/runtime (internal.h): it starts and stops every thread the runtime
 * owns and calls any file below it. keel_runtime_create starts the preprocessing pool (first,
 * before any thread: src/workers/pool.c), the reaper (generation.c), the worker threads
 * (sched.c) and the lifecycle thread (lifecycle.c), then loads the repository's models
 * (load.c) unless the control mode is EXPLICIT.
 *
 * Shutdown (keel_runtime_destroy) is staged: stop the lifecycle thread (it waits for a load in
 * progress); refuse submits and answer queued requests KEEL_ESHUTDOWN; let workers finish
 * running requests and exit; drop the registry's references (under each entry's load_mu, so
 * a load still running on an API caller's thread finishes first); let the reaper free every
 * generation; then free the entries and the runtime. Lock order and lifetimes: internal.h.
 */
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "runtime/generation.h"
#include "runtime/lifecycle.h"
#include "runtime/load.h"
#include "runtime/preprocess.h"
#include "runtime/registry.h"
#include "runtime/sched.h"
#include "runtime/testhook.h"
#include "workers/prep.h"

void keel_runtime_opts_init(keel_runtime_opts *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->control = KEEL_CONTROL_NONE;
    opts->log_level = KEEL_LOG_INFO;
    opts->poll_interval_ms = 5000;
    opts->settle_ms = 1000;
    opts->retry_initial_ms = 1000;
    opts->retry_max_ms = 60000;
    opts->inline_max_us = 200;
}

keel_err keel__runtime_add_backend(keel_runtime *rt, const keel__backend *be)
{
    if (rt->nbackends >= KEEL__MAX_BACKENDS)
        return KEEL_ENOMEM;
    rt->backends[rt->nbackends++] = be;
    return KEEL_OK;
}

bool keel_model_is_ready(keel_runtime *rt, const char *name, int64_t version)
{
    keel__model_entry *e;
    bool ready = false, prep_ok;

    if (rt == NULL || name == NULL)
        return false;
    prep_ok = keel__preprocess_ready(rt, NULL); /* before rt->mu: it polls the pool */
    keel__rt_lock(rt);
    if ((e = keel__entry_find_locked(rt, name)) != NULL) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
            /* Image models also need live preprocessing workers; a generation whose usable
             * contexts are all stuck in backend calls that were answered already can run
             * nothing until one returns (sched.c). */
            if (v->current != NULL && (version == -1 || version == v->version))
                ready |= (v->current->cfg->preprocess == NULL || prep_ok) &&
                         v->current->nstuck < v->current->max_in_use;
        }
    }
    keel__rt_unlock(rt);
    return ready;
}

/* ---- runtime create / destroy */

static void load_all(keel_runtime *rt)
{
    DIR *d = opendir(rt->repo);
    struct dirent *de;

    if (d == NULL)
        return;
    while ((de = readdir(d)) != NULL) {
        char *cfg = NULL;
        if (!keel__model_name_ok(de->d_name))
            continue;
        if (asprintf(&cfg, "%s/%s", rt->repo, de->d_name) < 0)
            continue;
        if (keel__config_exists(cfg)) /* errors are recorded in the model's status */
            (void)keel_model_load(rt, de->d_name, NULL, 0);
        free(cfg);
    }
    closedir(d);
}

/* The last step of both create's failure path and destroy: no thread runs any more. */
static void runtime_free(keel_runtime *rt)
{
    keel__prep_pool_destroy(rt->prep); /* kills and reaps its processes */
    keel__watch_free(rt);
    if (rt->life_efd >= 0)
        close(rt->life_efd);
    pthread_mutex_destroy(&rt->build_mu);
    pthread_mutex_destroy(&rt->mu);
    pthread_cond_destroy(&rt->work_cv);
    pthread_cond_destroy(&rt->timer_cv);
    pthread_mutex_destroy(&rt->reap_mu);
    pthread_cond_destroy(&rt->reap_cv);
    pthread_cond_destroy(&rt->reap_idle_cv);
    free(rt->repo);
    free(rt);
}

keel_err keel_runtime_create(const keel_runtime_opts *opts, keel_runtime **out)
{
    keel_runtime *rt = NULL;
    struct stat st;
    int started = 0;
    bool reaper = false;
    long ncpu;

    if (out != NULL)
        *out = NULL;
    if (opts == NULL || out == NULL || opts->model_repository == NULL)
        return KEEL_EINVAL;
    if (stat(opts->model_repository, &st) != 0 || !S_ISDIR(st.st_mode))
        return KEEL_ENOTFOUND;
    if ((rt = keel__calloc_lines(sizeof(*rt))) == NULL)
        return KEEL_ENOMEM;
    if ((rt->repo = keel__strdup(opts->model_repository)) == NULL) {
        free(rt);
        return KEEL_ENOMEM;
    }
    rt->control = opts->control;
    rt->log.fn = opts->log_fn;
    rt->log.user = opts->log_user;
    rt->log.level = opts->log_level;
    rt->poll_interval_ms = opts->poll_interval_ms > 0 ? opts->poll_interval_ms : 5000;
    rt->settle_ms = opts->settle_ms;
    rt->retry_initial_ms = opts->retry_initial_ms > 0 ? opts->retry_initial_ms : 1000;
    rt->retry_max_ms = opts->retry_max_ms > 0 ? opts->retry_max_ms : 60000;
    if (rt->retry_max_ms < rt->retry_initial_ms)
        rt->retry_max_ms = rt->retry_initial_ms;
    rt->mem_limit = opts->model_memory_limit;
    rt->inline_max_ns = (uint64_t)opts->inline_max_us * 1000u;
    rt->life_efd = -1;
    {
        /* rt->mu is held for well under a microsecond (docs/PERFORMANCE.md, lock statistics):
         * a thread that finds it taken spins a little before it sleeps in the kernel, which
         * with two workers on one model halves the context switches (futex waits and wakes,
         * bench/lockstat.sh, "Session 7"). */
        pthread_mutexattr_t ma;
        pthread_mutexattr_init(&ma);
        pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
        pthread_mutex_init(&rt->mu, &ma);
        pthread_mutexattr_destroy(&ma);
    }
    pthread_mutex_init(&rt->build_mu, NULL);
    {
        /* The timer thread waits for deadlines on the monotonic clock (sched.c). */
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&rt->timer_cv, &ca);
        pthread_condattr_destroy(&ca);
        pthread_cond_init(&rt->work_cv, NULL);
    }
    pthread_mutex_init(&rt->reap_mu, NULL);
    pthread_cond_init(&rt->reap_cv, NULL);
    pthread_cond_init(&rt->reap_idle_cv, NULL);
    keel__runtime_add_backend(rt, &keel__xgboost_backend);
    keel__runtime_add_backend(rt, &keel__onnx_backend);
    if (opts->preprocess_workers > 0) {
        /* First, from this thread, before keel starts any thread or loads any model: the
         * fork server must inherit neither (src/workers/pool.c). */
        keel__prep_opts po;
        char msg[256];
        keel__prep_opts_init(&po);
        po.workers = opts->preprocess_workers;
        if (opts->preprocess_timeout_ms > 0)
            po.task_timeout_ms = opts->preprocess_timeout_ms;
        if (opts->preprocess_max_bytes > 0)
            po.max_task_bytes = opts->preprocess_max_bytes;
        po.log = rt->log;
        if (keel__prep_pool_create(&po, &rt->prep, msg, sizeof(msg)) != KEEL_OK) {
            KEEL__LOG(&rt->log, KEEL_LOG_ERROR, "cannot start preprocessing workers: %s", msg);
            runtime_free(rt);
            return KEEL_EIO;
        }
    }

    rt->nworkers = opts->worker_threads;
    if (rt->nworkers <= 0) {
        ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        rt->nworkers = ncpu > 0 ? (int)ncpu : 1;
    }
    if (rt->nworkers > KEEL__MAX_WORKERS)
        rt->nworkers = KEEL__MAX_WORKERS;
    if (pthread_create(&rt->reaper, NULL, keel__reaper_main, rt) != 0)
        goto fail;
    reaper = true;
    if (pthread_create(&rt->timer, NULL, keel__timer_main, rt) != 0)
        goto fail;
    rt->timer_started = true;
    for (started = 0; started < rt->nworkers; started++) {
        if (pthread_create(&rt->workers[started], NULL, keel__worker_main, rt) != 0)
            goto fail;
    }
    if (rt->control == KEEL_CONTROL_POLL)
        keel__watch_snapshot(rt); /* before loading: a change during the loads is seen */
    if (keel__life_start(rt) != KEEL_OK)
        goto fail;
    if (rt->control != KEEL_CONTROL_EXPLICIT)
        load_all(rt);
    *out = rt;
    return KEEL_OK;

fail:
    rt->nworkers = started;
    if (!reaper) {
        /* keel_runtime_destroy expects a reaper; start none and clean up by hand. */
        runtime_free(rt);
        return KEEL_ENOMEM;
    }
    keel_runtime_destroy(rt);
    return KEEL_ENOMEM;
}

void keel_runtime_destroy(keel_runtime *rt)
{
    keel_request *drained = NULL;

    if (rt == NULL)
        return;
    /* Stage 0: no more automatic loads (waits for one in progress). */
    keel__life_stop(rt);

    /* Stage 1: refuse new work; answer everything still queued. */
    keel__rt_lock(rt);
    rt->shutting_down = true;
    keel__routing_changed_locked(rt);
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            keel__vslot_drain_locked(rt, v, &drained);
    }
    keel__rt_unlock(rt);
    keel__complete_list(drained, KEEL_ESHUTDOWN, "the runtime is shutting down");
    drained = NULL; /* consumed: the callbacks may have destroyed those requests */

    /* Stage 2: running requests finish; workers exit. */
    keel__rt_lock(rt);
    rt->stopping = true;
    keel__routing_changed_locked(rt);
    pthread_cond_broadcast(&rt->work_cv);
    keel__rt_unlock(rt);
    for (int i = 0; i < rt->nworkers; i++)
        pthread_join(rt->workers[i], NULL);
    keel__timer_stop(rt);

    /* Stage 3: loads in progress finish (they hold load_mu), then drop the registry's
     * references. Nothing can be in flight any more. */
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        pthread_mutex_lock(&e->load_mu);
        for (;;) {
            keel__generation *old = NULL;
            keel__vslot *f;
            keel__rt_lock(rt);
            if (e->versions == NULL) {
                keel__rt_unlock(rt);
                break;
            }
            f = keel__vslot_remove_locked(rt, e->versions, &old, &drained);
            keel__rt_unlock(rt);
            KEEL__ASSERT(f != NULL && drained == NULL);
            keel__generation_release(old);
            free(f);
        }
        pthread_mutex_unlock(&e->load_mu);
    }

    /* Stage 4: the reaper frees every generation, then stops. */
    keel_runtime_quiesce(rt);
    keel__reaper_stop(rt);

    while (rt->models != NULL) {
        keel__model_entry *e = rt->models;
        rt->models = e->next;
        keel__entry_free(e);
    }
    runtime_free(rt);
}
