/*
 * runtime.c: runtime create/destroy, the registry (model table), model control (load,
 * reload, unload), listing, statistics and counters.
 *
 * DESIGN
 * The registry is rt->models, a list of entries that live until the runtime is destroyed
 * (an entry holds a name, a status, statistics and counters, never a strong reference to
 * anything but its vslots' current generations). A load runs under the entry's load_mu so
 * loads of one model are serialised; it builds every new generation with no lock held, then
 * publishes them all with one pointer store per vslot under rt->mu, and releases the old
 * generations after unlocking. Lock order and object lifetimes: see internal.h.
 *
 * Shutdown (keel_runtime_destroy) is staged: refuse submits and answer queued requests
 * KEEL_ESHUTDOWN; let workers finish running requests and exit; drop the registry's
 * references; let the reaper free every generation; then free the entries.
 */
#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "repository/scan.h"
#include "runtime/internal.h"
#include "workers/prep.h"

void keel__counter_add(keel_runtime *rt, keel__model_entry *e, size_t field_offset, int64_t d)
{
    if (rt != NULL)
        atomic_fetch_add_explicit((_Atomic int64_t *)((char *)&rt->counters + field_offset), d,
                                  memory_order_relaxed);
    if (e != NULL)
        atomic_fetch_add_explicit((_Atomic int64_t *)((char *)&e->counters + field_offset), d,
                                  memory_order_relaxed);
}

void keel_runtime_opts_init(keel_runtime_opts *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->control = KEEL_CONTROL_NONE;
    opts->log_level = KEEL_LOG_INFO;
    opts->poll_interval_ms = 5000;
    opts->settle_ms = 1000;
    opts->retry_initial_ms = 1000;
    opts->retry_max_ms = 60000;
}

const char *keel_model_state_name(keel_model_state st)
{
    switch (st) {
    case KEEL_MODEL_UNAVAILABLE:
        return "UNAVAILABLE";
    case KEEL_MODEL_LOADING:
        return "LOADING";
    case KEEL_MODEL_READY:
        return "READY";
    case KEEL_MODEL_UNLOADING:
        return "UNLOADING";
    case KEEL_MODEL_FAILED:
        return "FAILED";
    }
    return "UNKNOWN";
}

keel_err keel__runtime_add_backend(keel_runtime *rt, const keel__backend *be)
{
    if (rt->nbackends >= KEEL__MAX_BACKENDS)
        return KEEL_ENOMEM;
    rt->backends[rt->nbackends++] = be;
    return KEEL_OK;
}

keel__model_entry *keel__entry_find_locked(keel_runtime *rt, const char *name)
{
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        if (strcmp(e->name, name) == 0)
            return e;
    }
    return NULL;
}

/* Looks an entry up by name. Entries live until the runtime is destroyed, so the pointer
 * stays valid after the lock is dropped. */
static keel__model_entry *entry_lookup(keel_runtime *rt, const char *name)
{
    keel__model_entry *e;

    pthread_mutex_lock(&rt->mu);
    e = keel__entry_find_locked(rt, name);
    pthread_mutex_unlock(&rt->mu);
    return e;
}

/* A model name is one path component, printable, not too long, and not hidden: names
 * starting with '.' are never models (they are where deploys stage copies; scan.h). */
static bool model_name_ok(const char *name)
{
    return keel__repo_name_ok(name);
}

static void entry_free(keel__model_entry *e)
{
    if (e == NULL)
        return;
    pthread_mutex_destroy(&e->load_mu);
    free(e->config_json);
    free(e->name);
    free(e);
}

/* Finds or creates the entry for name; the model directory must exist to create one. */
static keel_err entry_get(keel_runtime *rt, const char *name, keel__model_entry **out, char *errbuf,
                          size_t errlen)
{
    keel__model_entry *e, *fresh = NULL;
    char *dir = NULL;
    struct stat st;

    *out = NULL;
    e = entry_lookup(rt, name);
    if (e != NULL) {
        *out = e;
        return KEEL_OK;
    }
    if (asprintf(&dir, "%s/%s", rt->repo, name) < 0)
        return KEEL_ENOMEM;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        keel__errf(errbuf, errlen, "%s: no such model directory", dir);
        free(dir);
        return KEEL_ENOTFOUND;
    }
    free(dir);
    if ((fresh = keel__calloc(1, sizeof(*fresh))) == NULL ||
        (fresh->name = keel__strdup(name)) == NULL) {
        free(fresh);
        keel__errf(errbuf, errlen, "out of memory");
        return KEEL_ENOMEM;
    }
    pthread_mutex_init(&fresh->load_mu, NULL);
    fresh->state = KEEL_MODEL_UNAVAILABLE;
    pthread_mutex_lock(&rt->mu);
    if ((e = keel__entry_find_locked(rt, name)) == NULL) {
        fresh->next = rt->models;
        rt->models = fresh;
        e = fresh;
        fresh = NULL;
    }
    pthread_mutex_unlock(&rt->mu);
    entry_free(fresh); /* lost a race with another creator */
    *out = e;
    return KEEL_OK;
}

static void record_result_locked(keel__model_entry *e, keel_err err, const char *msg)
{
    bool serving = false;

    for (keel__vslot *v = e->versions; v != NULL; v = v->next)
        serving |= v->current != NULL;
    e->last_error = err;
    snprintf(e->last_error_msg, sizeof(e->last_error_msg), "%s", err == KEEL_OK ? "" : msg);
    if (serving)
        e->state = KEEL_MODEL_READY;
    else
        e->state = err == KEEL_OK ? KEEL_MODEL_UNAVAILABLE : KEEL_MODEL_FAILED;
}

/* Unlinks v from its entry under rt->mu: retires its generation (returned in *old for release
 * after unlocking), drains its queue into *drained, and marks it removed. Returns v if
 * nothing is in flight, meaning the caller frees it after unlocking. */
static keel__vslot *vslot_remove_locked(keel_runtime *rt, keel__vslot *v, keel__generation **old,
                                        keel_request **drained)
{
    keel__vslot **pp = &v->entry->versions;

    while (*pp != v)
        pp = &(*pp)->next;
    *pp = v->next;
    v->next = NULL;
    *old = v->current;
    if (v->current != NULL)
        v->current->retired = true;
    else
        rt->nparked--; /* a linked vslot without a generation is parked */
    v->current = NULL;
    keel__vslot_drain_locked(rt, v, drained);
    v->removed = true;
    /* Drained requests still hold their slots; complete() frees v when the last goes. */
    return v->inflight == 0 ? v : NULL;
}

/* Waits (bounded) until every generation of e has been freed: the resource-preserving swap
 * frees the old generation before building the new one. Requests still running on it finish
 * first; a backend that does not return within the bound only delays the swap. */
static void wait_generations_freed(keel_runtime *rt, keel__model_entry *e)
{
    uint64_t until = keel__now_ns() + 10000000000ull;

    keel_runtime_quiesce(rt);
    while (atomic_load(&e->counters.generations) > 0 && keel__now_ns() < until) {
        usleep(1000);
        keel_runtime_quiesce(rt);
    }
}

/* Under rt->mu, after a failed load: parked vslots of a swap lost their generation for good
 * (removed, like an unload); an evicted model keeps them parked for its next request, but the
 * requests waiting now get the error. */
static void load_failed_locked(keel_runtime *rt, keel__model_entry *e, keel__vslot **tofree,
                               size_t *ntofree, keel_request **drained)
{
    if (e->swapping) {
        for (keel__vslot *v = e->versions, *next; v != NULL; v = next) {
            keel__generation *none = NULL;
            keel__vslot *f;
            next = v->next;
            if (v->current != NULL)
                continue;
            f = vslot_remove_locked(rt, v, &none, drained);
            if (f != NULL)
                tofree[(*ntofree)++] = f;
        }
        e->swapping = false;
    } else if (e->evicted) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            keel__vslot_drain_locked(rt, v, drained);
    }
}

keel_err keel__model_load(keel_runtime *rt, const char *name, bool evicted_reload, char *errbuf,
                          size_t errlen)
{
    keel__model_entry *e = NULL;
    keel__model_config *cfg = NULL;
    int64_t *versions = NULL;
    size_t nversions = 0;
    keel__generation **gens = NULL, **olds = NULL;
    keel__generation **gone = NULL; /* generations of versions that left the policy */
    keel__vslot **fresh = NULL, **tofree = NULL;
    size_t ngone = 0, ntofree = 0;
    keel_request *drained = NULL;
    keel__retire_list retire = {NULL, 0, 0, {0}};
    char msg[KEEL__ERRLEN];
    char *path = NULL, *dir = NULL, *json = NULL;
    uint64_t predicted, charged = 0;
    bool swapping = false; /* this load parked the model's vslots (resource-preserving) */
    keel_err err;

    msg[0] = '\0';
    keel__errf(errbuf, errlen, "%s", "");
    if (rt == NULL || name == NULL)
        return KEEL_EINVAL;
    if (!model_name_ok(name)) {
        keel__errf(errbuf, errlen, "invalid model name");
        return KEEL_EINVAL;
    }
    if ((err = entry_get(rt, name, &e, errbuf, errlen)) != KEEL_OK)
        return err;

    pthread_mutex_lock(&e->load_mu);
    pthread_mutex_lock(&rt->mu);
    if (rt->shutting_down) {
        pthread_mutex_unlock(&rt->mu);
        pthread_mutex_unlock(&e->load_mu);
        keel__errf(errbuf, errlen, "the runtime is shutting down");
        return KEEL_ESHUTDOWN;
    }
    if (evicted_reload && !e->evicted) {
        /* Loaded or unloaded by someone else since the request asked. */
        pthread_mutex_unlock(&rt->mu);
        pthread_mutex_unlock(&e->load_mu);
        return KEEL_OK;
    }
    e->load_attempts++;
    e->last_attempt_unix_ms = keel__unix_ms();
    e->loading = true;
    if (e->state != KEEL_MODEL_READY)
        e->state = KEEL_MODEL_LOADING;
    pthread_mutex_unlock(&rt->mu);

    if (asprintf(&dir, "%s/%s", rt->repo, name) < 0) {
        dir = NULL;
        snprintf(msg, sizeof(msg), "out of memory");
        err = KEEL_ENOMEM;
        goto failed;
    }
    /* config.json or config.pbtxt; harmless Triton fields keel ignores are logged. */
    if ((err = keel__config_find(dir, &path, msg, sizeof(msg))) != KEEL_OK ||
        (err = keel__config_load(path, name, &cfg, msg, sizeof(msg))) != KEEL_OK)
        goto failed;
    for (const char *w = cfg->warnings; w != NULL && *w != '\0'; w += strcspn(w, "\n") + 1) {
        KEEL__LOG(&rt->log, KEEL_LOG_WARN, "model %s: %.*s", name, (int)strcspn(w, "\n"), w);
        if (w[strcspn(w, "\n")] == '\0')
            break;
    }
    if ((err = keel__config_select_versions(cfg, dir, &versions, &nversions, msg, sizeof(msg))) !=
        KEEL_OK)
        goto failed;
    if (nversions == 0) {
        snprintf(msg, sizeof(msg), "%s: no numeric version folder to load", dir);
        err = KEEL_ELOAD;
        goto failed;
    }
    if ((json = keel__strdup(cfg->json)) == NULL ||
        (gens = keel__calloc(nversions, sizeof(*gens))) == NULL ||
        (olds = keel__calloc(nversions, sizeof(*olds))) == NULL ||
        (fresh = keel__calloc(nversions, sizeof(*fresh))) == NULL) {
        snprintf(msg, sizeof(msg), "out of memory");
        err = KEEL_ENOMEM;
        goto failed;
    }

    /* Before building: make room for the predicted charge, and (resource-preserving) take
     * the serving generations out first. Both retire generations, released after unlocking. */
    predicted = keel__repo_version_bytes(dir, versions, nversions);
    pthread_mutex_lock(&rt->mu);
    e->pinned = cfg->pinned;
    if (e->charge_hint > predicted)
        predicted = e->charge_hint;
    if (!keel__retire_reserve_locked(rt, &retire)) {
        pthread_mutex_unlock(&rt->mu);
        snprintf(msg, sizeof(msg), "out of memory");
        err = KEEL_ENOMEM;
        goto failed;
    }
    if (!keel__make_room_locked(rt, e, predicted, &retire, msg, sizeof(msg))) {
        pthread_mutex_unlock(&rt->mu);
        err = KEEL_ERESOURCE;
        goto failed;
    }
    if (cfg->swap_policy == KEEL__SWAP_RESOURCE) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
            if (v->current != NULL) {
                keel__vslot_park_locked(rt, v, &retire);
                swapping = true;
            }
        }
        if (swapping) {
            e->swapping = true;
            e->state = KEEL_MODEL_LOADING;
        }
    }
    pthread_mutex_unlock(&rt->mu);
    if (retire.n > 0) {
        keel__retire_release(rt, &retire);
        if (swapping)
            wait_generations_freed(rt, e);
        else
            keel_runtime_quiesce(rt); /* evicted memory is back before the build is measured */
    }

    for (size_t i = 0; i < nversions; i++) {
        if ((err = keel__generation_build(rt, e, versions[i], &gens[i], msg, sizeof(msg))) !=
            KEEL_OK)
            goto failed;
        charged += gens[i]->mem_charged;
        /* A vslot for a version not served yet; unused ones are freed below. */
        if ((fresh[i] = keel__calloc(1, sizeof(**fresh))) == NULL) {
            snprintf(msg, sizeof(msg), "out of memory");
            err = KEEL_ENOMEM;
            goto failed;
        }
    }
    /* Serve the newest generation's config: its backend may have filled in the inputs and
     * outputs that config.json leaves out (onnx). */
    if (strcmp(json, gens[nversions - 1]->cfg->json) != 0) {
        char *filled = keel__strdup(gens[nversions - 1]->cfg->json);
        if (filled == NULL) {
            snprintf(msg, sizeof(msg), "out of memory");
            err = KEEL_ENOMEM;
            goto failed;
        }
        free(json);
        json = filled;
    }

    /* Publish: one pointer store per version, all under one lock hold. */
    pthread_mutex_lock(&rt->mu);
    {
        size_t nold = 0;
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            nold++;
        gone = keel__calloc(nold, sizeof(*gone));
        tofree = keel__calloc(nold, sizeof(*tofree));
        if (gone == NULL || tofree == NULL || !keel__retire_reserve_locked(rt, &retire)) {
            pthread_mutex_unlock(&rt->mu);
            snprintf(msg, sizeof(msg), "out of memory");
            err = KEEL_ENOMEM;
            goto failed;
        }
    }
    /* Now that the charge is measured, not predicted: make room for it. */
    if (!keel__make_room_locked(rt, e, charged, &retire, msg, sizeof(msg))) {
        pthread_mutex_unlock(&rt->mu);
        err = KEEL_ERESOURCE;
        goto failed;
    }
    for (size_t i = 0; i < nversions; i++) {
        keel__vslot *v, **pp = &e->versions;
        while (*pp != NULL && (*pp)->version < versions[i])
            pp = &(*pp)->next;
        if (*pp != NULL && (*pp)->version == versions[i]) {
            v = *pp;
            if (v->current == NULL)
                rt->nparked--; /* a parked vslot serves again */
        } else {
            v = fresh[i];
            fresh[i] = NULL;
            v->version = versions[i];
            v->entry = e;
            v->next = *pp;
            *pp = v;
        }
        olds[i] = v->current;
        if (olds[i] != NULL)
            olds[i]->retired = true;
        v->current = gens[i];
        v->max_inflight = gens[i]->cfg->max_queue_size;
        v->default_timeout_us = gens[i]->cfg->default_timeout_us;
        gens[i] = NULL; /* the vslot owns that reference now */
        keel__vslot_kick_locked(rt, v);
    }
    for (keel__vslot *v = e->versions, *next; v != NULL; v = next) {
        bool keep = false;
        next = v->next;
        for (size_t i = 0; i < nversions && !keep; i++)
            keep = versions[i] == v->version;
        if (!keep) {
            keel__generation *old = NULL;
            keel__vslot *f, *newest = NULL;
            /* Requests for "the newest version" waiting here go to the newest one now. */
            for (keel__vslot *w = e->versions; w != NULL; w = w->next) {
                for (size_t i = 0; i < nversions; i++) {
                    if (w->version == versions[i] && w->current != NULL)
                        newest = w; /* ascending list: the last is the newest */
                }
            }
            if (newest != NULL)
                keel__vslot_move_latest_locked(rt, v, newest);
            f = vslot_remove_locked(rt, v, &old, &drained);
            gone[ngone++] = old;
            if (f != NULL)
                tofree[ntofree++] = f;
        }
    }
    {
        char *prev = e->config_json;
        e->config_json = json;
        json = prev; /* freed after unlocking */
    }
    if (evicted_reload)
        atomic_fetch_add(&rt->reloads, 1);
    e->loading = e->swapping = e->evicted = e->want_load = false;
    e->load_failures = 0;
    e->next_retry_ns = e->next_retry_unix_ms = 0;
    e->charge_hint = charged;
    record_result_locked(e, KEEL_OK, "");
    pthread_mutex_unlock(&rt->mu);
    pthread_mutex_unlock(&e->load_mu);

    KEEL__LOG(&rt->log, KEEL_LOG_INFO,
              "model %s: loaded %zu version(s), newest %lld, charged %llu bytes", name, nversions,
              (long long)versions[nversions - 1], (unsigned long long)charged);
    keel__fault_leak_on_publish(); /* test-only (keel soak's leak test); no-op unless armed */
    keel__complete_list(drained, KEEL_EUNAVAILABLE, "the model version was unloaded");
    keel__retire_release(rt, &retire);
    for (size_t i = 0; i < nversions; i++)
        keel__generation_release(olds[i]);
    for (size_t i = 0; i < ngone; i++)
        keel__generation_release(gone[i]);
    err = KEEL_OK;
    goto cleanup;

failed:
    pthread_mutex_lock(&rt->mu);
    if (tofree == NULL) {
        size_t nv = 0;
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            nv++;
        tofree = keel__calloc(nv + 1, sizeof(*tofree));
    }
    if (tofree != NULL) {
        ntofree = 0;
        load_failed_locked(rt, e, tofree, &ntofree, &drained);
    }
    e->loading = false;
    e->load_failures++;
    record_result_locked(e, err, msg);
    keel__retry_schedule_locked(rt, e);
    pthread_mutex_unlock(&rt->mu);
    pthread_mutex_unlock(&e->load_mu);
    keel__errf(errbuf, errlen, "%s", msg);
    KEEL__LOG(&rt->log, KEEL_LOG_ERROR, "model %s: load failed: %s", name, msg);
    keel__complete_list(drained, KEEL_EUNAVAILABLE, msg);
    keel__retire_release(rt, &retire);
    if (gens != NULL) {
        for (size_t i = 0; i < nversions; i++)
            keel__generation_release(gens[i]); /* unpublished: refcount 1 -> reaper */
    }
cleanup:
    for (size_t i = 0; i < ntofree; i++)
        free(tofree[i]);
    if (fresh != NULL) {
        for (size_t i = 0; i < nversions; i++)
            free(fresh[i]);
    }
    free(fresh);
    free(gone);
    free(tofree);
    free(gens);
    free(olds);
    free(versions);
    free(json);
    free(path);
    free(dir);
    keel__config_destroy(cfg);
    return err;
}

keel_err keel_model_load(keel_runtime *rt, const char *name, char *errbuf, size_t errlen)
{
    return keel__model_load(rt, name, false, errbuf, errlen);
}

keel_err keel_model_unload(keel_runtime *rt, const char *name)
{
    keel__model_entry *e;
    keel__generation **olds = NULL;
    keel__vslot **tofree = NULL;
    size_t nold = 0, ntofree = 0, n = 0;
    keel_request *drained = NULL;

    if (rt == NULL || name == NULL)
        return KEEL_EINVAL;
    e = entry_lookup(rt, name);
    if (e == NULL)
        return KEEL_ENOTFOUND;

    pthread_mutex_lock(&e->load_mu);
    pthread_mutex_lock(&rt->mu);
    /* An unloaded model is not retried or reloaded by keel itself. */
    e->evicted = e->want_load = false;
    e->next_retry_ns = e->next_retry_unix_ms = 0;
    e->load_failures = 0;
    for (keel__vslot *v = e->versions; v != NULL; v = v->next)
        n++;
    if (n == 0) {
        pthread_mutex_unlock(&rt->mu);
        pthread_mutex_unlock(&e->load_mu);
        return KEEL_ENOTFOUND;
    }
    /* Allocating under the lock is fine (nothing is released or called back). */
    olds = keel__calloc(n, sizeof(*olds));
    tofree = keel__calloc(n, sizeof(*tofree));
    if (olds == NULL || tofree == NULL) {
        pthread_mutex_unlock(&rt->mu);
        pthread_mutex_unlock(&e->load_mu);
        free(olds);
        free(tofree);
        return KEEL_ENOMEM;
    }
    while (e->versions != NULL) {
        keel__vslot *f = vslot_remove_locked(rt, e->versions, &olds[nold++], &drained);
        if (f != NULL)
            tofree[ntofree++] = f;
    }
    e->state = KEEL_MODEL_UNAVAILABLE;
    pthread_mutex_unlock(&rt->mu);
    pthread_mutex_unlock(&e->load_mu);

    KEEL__LOG(&rt->log, KEEL_LOG_INFO, "model %s: unloaded", name);
    keel__complete_list(drained, KEEL_EUNAVAILABLE, "the model was unloaded");
    for (size_t i = 0; i < nold; i++)
        keel__generation_release(olds[i]);
    for (size_t i = 0; i < ntofree; i++)
        free(tofree[i]);
    free(olds);
    free(tofree);
    return KEEL_OK;
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
        if (!model_name_ok(de->d_name))
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
    if ((rt = keel__calloc(1, sizeof(*rt))) == NULL)
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
    rt->life_efd = -1;
    pthread_mutex_init(&rt->mu, NULL);
    pthread_mutex_init(&rt->build_mu, NULL);
    {
        /* Workers also wait for deadlines of requests in parked vslots (sched.c). */
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&rt->work_cv, &ca);
        pthread_condattr_destroy(&ca);
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
    pthread_mutex_lock(&rt->mu);
    rt->shutting_down = true;
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            keel__vslot_drain_locked(rt, v, &drained);
    }
    pthread_mutex_unlock(&rt->mu);
    keel__complete_list(drained, KEEL_ESHUTDOWN, "the runtime is shutting down");
    drained = NULL; /* consumed: the callbacks may have destroyed those requests */

    /* Stage 2: running requests finish; workers exit. */
    pthread_mutex_lock(&rt->mu);
    rt->stopping = true;
    pthread_cond_broadcast(&rt->work_cv);
    pthread_mutex_unlock(&rt->mu);
    for (int i = 0; i < rt->nworkers; i++)
        pthread_join(rt->workers[i], NULL);

    /* Stage 3: loads in progress finish (they hold load_mu), then drop the registry's
     * references. Nothing can be in flight any more. */
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        pthread_mutex_lock(&e->load_mu);
        for (;;) {
            keel__generation *old = NULL;
            keel__vslot *f;
            pthread_mutex_lock(&rt->mu);
            if (e->versions == NULL) {
                pthread_mutex_unlock(&rt->mu);
                break;
            }
            f = vslot_remove_locked(rt, e->versions, &old, &drained);
            pthread_mutex_unlock(&rt->mu);
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
        entry_free(e);
    }
    runtime_free(rt);
}

/* ---- status, statistics, counters */

static int status_cmp(const void *a, const void *b)
{
    const keel_model_status *x = a, *y = b;
    int c = strcmp(x->name, y->name);

    if (c != 0)
        return c;
    return x->version < y->version ? -1 : x->version > y->version;
}

void keel_model_status_free(keel_model_status *list, size_t count)
{
    if (list == NULL)
        return;
    for (size_t i = 0; i < count; i++) {
        free((char *)list[i].name);
        free((char *)list[i].last_error_msg);
    }
    free(list);
}

/* Appends one row (strings copied); false on allocation failure. */
static bool status_push(keel_model_status **list, size_t *n, size_t *cap,
                        const keel_model_status *row)
{
    keel_model_status *p;

    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 16;
        if ((p = keel__realloc(*list, ncap * sizeof(*p))) == NULL)
            return false;
        *list = p;
        *cap = ncap;
    }
    p = &(*list)[*n];
    *p = *row;
    p->name = keel__strdup(row->name);
    p->last_error_msg = keel__strdup(row->last_error_msg);
    if (p->name == NULL || p->last_error_msg == NULL) {
        free((char *)p->name);
        free((char *)p->last_error_msg);
        return false;
    }
    (*n)++;
    return true;
}

keel_err keel_model_list(keel_runtime *rt, keel_model_status **out, size_t *count)
{
    keel_model_status *list = NULL;
    size_t n = 0, cap = 0;
    DIR *d;
    struct dirent *de;
    bool ok = true;

    if (out != NULL)
        *out = NULL;
    if (count != NULL)
        *count = 0;
    if (rt == NULL || out == NULL || count == NULL)
        return KEEL_EINVAL;
    pthread_mutex_lock(&rt->mu);
    for (keel__model_entry *e = rt->models; e != NULL && ok; e = e->next) {
        keel_model_status row = {0};
        row.name = e->name;
        row.last_error = e->last_error;
        row.last_error_msg = e->last_error_msg;
        row.load_attempts = e->load_attempts;
        row.load_failures = e->load_failures;
        row.last_attempt_unix_ms = e->last_attempt_unix_ms;
        row.next_retry_unix_ms = e->next_retry_unix_ms;
        row.pinned = e->pinned;
        row.evicted = e->evicted;
        if (e->versions == NULL) {
            row.version = -1;
            row.state = e->state;
            ok = status_push(&list, &n, &cap, &row);
        }
        for (keel__vslot *v = e->versions; v != NULL && ok; v = v->next) {
            const keel__generation *g = v->current;
            row.version = v->version;
            row.state = g != NULL     ? KEEL_MODEL_READY
                        : e->swapping ? KEEL_MODEL_LOADING
                                      : KEEL_MODEL_UNAVAILABLE;
            row.generation_id = g != NULL ? g->id : 0;
            row.mem_rss_bytes = g != NULL ? g->mem_rss : 0;
            row.mem_pss_bytes = g != NULL ? g->mem_pss : 0;
            row.mem_estimate_bytes = g != NULL ? g->memory_estimate : 0;
            row.mem_charged_bytes = g != NULL ? g->mem_charged : 0;
            ok = status_push(&list, &n, &cap, &row);
        }
    }
    pthread_mutex_unlock(&rt->mu);
    /* Models in the repository that were never loaded. */
    if (ok && (d = opendir(rt->repo)) != NULL) {
        while (ok && (de = readdir(d)) != NULL) {
            bool known = false;
            char *path = NULL;
            if (!model_name_ok(de->d_name))
                continue;
            for (size_t i = 0; i < n && !known; i++)
                known = strcmp(list[i].name, de->d_name) == 0;
            if (known || asprintf(&path, "%s/%s", rt->repo, de->d_name) < 0)
                continue;
            if (keel__config_exists(path)) {
                keel_model_status row = {0};
                row.name = de->d_name;
                row.version = -1;
                row.state = KEEL_MODEL_UNAVAILABLE;
                row.last_error_msg = "";
                row.mem_pss_bytes = 0;
                ok = status_push(&list, &n, &cap, &row);
            }
            free(path);
        }
        closedir(d);
    }
    if (!ok) {
        keel_model_status_free(list, n);
        return KEEL_ENOMEM;
    }
    if (n > 0)
        qsort(list, n, sizeof(*list), status_cmp);
    *out = list;
    *count = n;
    return KEEL_OK;
}

keel_err keel_model_config_json(keel_runtime *rt, const char *name, char **out)
{
    keel__model_entry *e;
    keel_err err = KEEL_OK;

    if (out != NULL)
        *out = NULL;
    if (rt == NULL || name == NULL || out == NULL)
        return KEEL_EINVAL;
    pthread_mutex_lock(&rt->mu);
    e = keel__entry_find_locked(rt, name);
    if (e == NULL)
        err = KEEL_ENOTFOUND;
    else if (e->config_json == NULL || e->versions == NULL)
        err = KEEL_EUNAVAILABLE;
    else if ((*out = keel__strdup(e->config_json)) == NULL)
        err = KEEL_ENOMEM;
    pthread_mutex_unlock(&rt->mu);
    return err;
}

bool keel_model_is_ready(keel_runtime *rt, const char *name, int64_t version)
{
    keel__model_entry *e;
    bool ready = false, prep_ok;

    if (rt == NULL || name == NULL)
        return false;
    prep_ok = keel__preprocess_ready(rt, NULL); /* before rt->mu: it polls the pool */
    pthread_mutex_lock(&rt->mu);
    if ((e = keel__entry_find_locked(rt, name)) != NULL) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
            /* Image models also need live preprocessing workers. */
            if (v->current != NULL && (version == -1 || version == v->version))
                ready |= v->current->cfg->preprocess == NULL || prep_ok;
        }
    }
    pthread_mutex_unlock(&rt->mu);
    return ready;
}

keel_err keel_model_stats_get(keel_runtime *rt, const char *name, keel_model_stats *out)
{
    keel__model_entry *e;
    const keel__stats *s;

    if (out != NULL)
        memset(out, 0, sizeof(*out));
    if (rt == NULL || name == NULL || out == NULL)
        return KEEL_EINVAL;
    e = entry_lookup(rt, name);
    if (e == NULL)
        return KEEL_ENOTFOUND;
    /* Entries live until the runtime is destroyed, and the fields are atomics. */
    s = &e->stats;
    out->success = atomic_load(&s->success);
    for (int i = 0; i < KEEL_ERR_COUNT_; i++)
        out->failure[i] = atomic_load(&s->failure[i]);
    out->rejected = atomic_load(&s->rejected);
    out->inference_count = atomic_load(&s->inference_count);
    out->execution_count = atomic_load(&s->execution_count);
    out->queue_ns = atomic_load(&s->queue_ns);
    out->compute_ns = atomic_load(&s->compute_ns);
    out->last_inference_unix_ms = atomic_load(&s->last_inference_unix_ms);
    return KEEL_OK;
}

static void counters_read(const keel__counters *c, keel_counters *out)
{
    out->requests = atomic_load(&c->requests);
    out->leases = atomic_load(&c->leases);
    out->queued = atomic_load(&c->queued);
    out->generations = atomic_load(&c->generations);
    out->contexts = atomic_load(&c->contexts);
    out->contexts_in_use = atomic_load(&c->contexts_in_use);
}

void keel_counters_get(keel_runtime *rt, keel_counters *out)
{
    if (out == NULL)
        return;
    memset(out, 0, sizeof(*out));
    if (rt != NULL)
        counters_read(&rt->counters, out);
}

keel_err keel_model_counters_get(keel_runtime *rt, const char *name, keel_counters *out)
{
    keel__model_entry *e;

    if (out != NULL)
        memset(out, 0, sizeof(*out));
    if (rt == NULL || name == NULL || out == NULL)
        return KEEL_EINVAL;
    e = entry_lookup(rt, name);
    if (e == NULL)
        return KEEL_ENOTFOUND;
    counters_read(&e->counters, out);
    out->requests = out->leases; /* per model: requests in flight */
    return KEEL_OK;
}
