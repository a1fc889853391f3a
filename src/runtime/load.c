/*
 * load.c: loading a model (every version its policy selects, one generation each) and
 * unloading it.
 *
 * DESIGN
 * A load runs on the thread that asks for it (keel_model_load's caller, or the lifecycle
 * thread for watched changes, retries and reloads of evicted models), under the entry's
 * load_mu so loads of one model are serialised, in phases:
 *   begin    finds or creates the entry, takes load_mu, marks the entry loading (rt->mu).
 *   prepare  reads config.json and the version policy (no lock), then under rt->mu makes
 *            room in the memory budget for the predicted charge and, for a
 *            resource-preserving swap, parks the serving versions; after unlocking it
 *            releases what that retired and waits until its memory is back.
 *   build    builds every new generation with no lock held (generation.c).
 *   publish  under rt->mu makes room for the measured charge, then publishes every
 *            generation with one pointer store per vslot and unlinks the versions that left
 *            the policy; after unlocking it releases the old generations and answers the
 *            requests that cannot be served any more.
 *   fail     any phase's error ends here, on one path: under rt->mu the entry records the
 *            error and schedules its retry; after unlocking the unpublished generations are
 *            released.
 * Each phase takes rt->mu at most once; a phase that fails with rt->mu held unlocks before it
 * returns, so fail always starts with no rt->mu held and e->load_mu held. Everything the load
 * owns is in one load_job, freed once at the end (load_job_fini). Nothing is released or
 * called back under rt->mu. Unload (keel_model_unload) takes the same locks and removes every
 * version. Layer: calls registry.c, budget.c, generation.c and sched.c only (internal.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "repository/scan.h"
#include "runtime/budget.h"
#include "runtime/generation.h"
#include "runtime/load.h"
#include "runtime/registry.h"
#include "runtime/sched.h"

/* Everything one load owns, from begin to load_job_fini. */
typedef struct load_job {
    keel_runtime *rt;
    const char *name;
    bool evicted_reload; /* a reload a request asked for */
    keel__model_entry *e;
    keel__model_config *cfg;
    char *dir, *path, *json;
    int64_t *versions;
    size_t nversions;
    keel__generation **gens; /* built, not yet published: one reference each */
    keel__generation **olds; /* generations replaced at publish */
    keel__generation **gone; /* generations of versions that left the policy */
    keel__vslot **fresh;     /* a vslot per version not served yet; unused ones are freed */
    keel__vslot **tofree;    /* removed vslots with nothing in flight */
    size_t ngone, ntofree;
    keel_request *drained;    /* requests to answer after unlocking */
    keel__retire_list retire; /* generations retired by the budget or a swap */
    uint64_t charged;
    bool swapping; /* this load parked the model's vslots (resource-preserving) */
    char msg[KEEL__ERRLEN];
} load_job;

/* The one out-of-memory result of a load. */
static keel_err oom(load_job *j)
{
    snprintf(j->msg, sizeof(j->msg), "out of memory");
    return KEEL_ENOMEM;
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

keel__vslot *keel__vslot_remove_locked(keel_runtime *rt, keel__vslot *v, keel__generation **old,
                                       keel_request **drained)
{
    keel__vslot **pp = &v->entry->versions;

    keel__routing_changed_locked(rt);
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
    /* Drained requests still hold their slots, and a run whose requests were answered while
     * it ran (nstuck) still uses v; the last of them frees v (sched.c: end_group). */
    return v->inflight == 0 && v->nstuck == 0 ? v : NULL;
}

/* Waits (bounded) until every generation of e has been freed: the resource-preserving swap
 * frees the old generation before building the new one. Requests still running on it finish
 * first; a backend that does not return within the bound only delays the swap. */
static void wait_generations_freed(keel_runtime *rt, keel__model_entry *e)
{
    uint64_t until = keel__now_ns() + 10000000000ull;

    keel_runtime_quiesce(rt);
    while (keel__counter_sum(e->counters, KEEL__CNT(generations)) > 0 && keel__now_ns() < until) {
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
            f = keel__vslot_remove_locked(rt, v, &none, drained);
            if (f != NULL)
                tofree[(*ntofree)++] = f;
        }
        e->swapping = false;
    } else if (e->evicted) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            keel__vslot_drain_locked(rt, v, drained);
    }
}

/* Under rt->mu, after a failed load (load_failures already counted): when the lifecycle
 * thread tries it again. */
static void retry_schedule_locked(keel_runtime *rt, keel__model_entry *e)
{
    uint64_t d = rt->retry_initial_ms;

    e->next_retry_ns = 0;
    e->next_retry_unix_ms = 0;
    if (rt->control == KEEL_CONTROL_EXPLICIT && !e->evicted)
        return; /* the caller was told; nothing retries by itself */
    for (uint64_t i = 1; i < e->load_failures && d < rt->retry_max_ms; i++)
        d *= 2;
    if (d > rt->retry_max_ms)
        d = rt->retry_max_ms;
    e->next_retry_ns = keel__now_ns() + d * 1000000u;
    e->next_retry_unix_ms = keel__unix_ms() + d;
}

/* No lock held: logs evictions, releases the generations, empties l (budget.h). */
static void retire_release(keel_runtime *rt, keel__retire_list *l)
{
    if (l->evicted[0] != '\0')
        KEEL__LOG(&rt->log, KEEL_LOG_INFO,
                  "model memory limit: evicted %s (reloaded on their next request)", l->evicted);
    for (size_t i = 0; i < l->n; i++)
        keel__generation_release(l->gens[i]);
    free(l->gens);
    memset(l, 0, sizeof(*l));
}

/* ---------------------------------------------------------------- the load, in phases */

/* Begin (no lock held on entry): finds or creates the entry, takes its load_mu and marks it
 * loading. Returns true if the load goes on, holding e->load_mu; false if it is over, with
 * nothing held and its result in *err. */
static bool load_begin(load_job *j, keel_err *err, char *errbuf, size_t errlen)
{
    keel_runtime *rt = j->rt;
    keel__model_entry *e;

    if (!keel__model_name_ok(j->name)) {
        keel__errf(errbuf, errlen, "invalid model name");
        *err = KEEL_EINVAL;
        return false;
    }
    if ((*err = keel__entry_get(rt, j->name, &j->e, errbuf, errlen)) != KEEL_OK)
        return false;
    e = j->e;
    pthread_mutex_lock(&e->load_mu);
    keel__rt_lock(rt);
    if (rt->shutting_down || (j->evicted_reload && !e->evicted)) {
        /* A reload a request asked for: loaded or unloaded by someone else since. */
        *err = rt->shutting_down ? KEEL_ESHUTDOWN : KEEL_OK;
        keel__rt_unlock(rt);
        pthread_mutex_unlock(&e->load_mu);
        if (*err != KEEL_OK)
            keel__errf(errbuf, errlen, "the runtime is shutting down");
        return false;
    }
    e->load_attempts++;
    e->last_attempt_unix_ms = keel__unix_ms();
    e->loading = true;
    if (e->state != KEEL_MODEL_READY)
        e->state = KEEL_MODEL_LOADING;
    keel__rt_unlock(rt);
    return true;
}

/* Prepare, no lock held: the model's configuration, the versions its policy selects, the job's
 * arrays. */
static keel_err load_read(load_job *j)
{
    keel_runtime *rt = j->rt;
    keel_err err;

    /* asprintf leaves its pointer undefined on failure: reset each one on its own, so that
     * the one made before a failure is still freed (load_job_fini). */
    if (asprintf(&j->dir, "%s/%s", rt->repo, j->name) < 0) {
        j->dir = NULL;
        return oom(j);
    }
    /* config.json or config.pbtxt (both is an error naming both). */
    if ((err = keel__config_find(j->dir, &j->path, j->msg, sizeof(j->msg))) != KEEL_OK ||
        (err = keel__config_load(j->path, j->name, &j->cfg, j->msg, sizeof(j->msg))) != KEEL_OK)
        return err;
    /* Harmless Triton fields keel ignores are logged, one line each. */
    for (const char *w = j->cfg->warnings; w != NULL && *w != '\0'; w += strcspn(w, "\n") + 1) {
        KEEL__LOG(&rt->log, KEEL_LOG_WARN, "model %s: %.*s", j->name, (int)strcspn(w, "\n"), w);
        if (w[strcspn(w, "\n")] == '\0')
            break;
    }
    if ((err = keel__config_select_versions(j->cfg, j->dir, &j->versions, &j->nversions, j->msg,
                                            sizeof(j->msg))) != KEEL_OK)
        return err;
    if (j->nversions == 0) {
        snprintf(j->msg, sizeof(j->msg), "%s: no numeric version folder to load", j->dir);
        return KEEL_ELOAD;
    }
    if ((j->json = keel__strdup(j->cfg->json)) == NULL ||
        (j->gens = keel__calloc(j->nversions, sizeof(*j->gens))) == NULL ||
        (j->olds = keel__calloc(j->nversions, sizeof(*j->olds))) == NULL ||
        (j->fresh = keel__calloc(j->nversions, sizeof(*j->fresh))) == NULL)
        return oom(j);
    return KEEL_OK;
}

/* Prepare, under rt->mu: makes room for the predicted charge and (resource-preserving) takes
 * the serving generations out first. Both retire generations into j->retire. */
static keel_err prepare_locked(load_job *j, uint64_t predicted)
{
    keel_runtime *rt = j->rt;
    keel__model_entry *e = j->e;

    e->pinned = j->cfg->pinned;
    if (e->charge_hint > predicted)
        predicted = e->charge_hint;
    if (!keel__retire_reserve_locked(rt, &j->retire))
        return oom(j);
    if (!keel__make_room_locked(rt, e, predicted, &j->retire, j->msg, sizeof(j->msg)))
        return KEEL_ERESOURCE;
    if (j->cfg->swap_policy == KEEL__SWAP_RESOURCE) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next) {
            if (v->current != NULL) {
                keel__vslot_park_locked(rt, v, &j->retire);
                j->swapping = true;
            }
        }
        if (j->swapping) {
            e->swapping = true;
            e->state = KEEL_MODEL_LOADING;
        }
    }
    return KEEL_OK;
}

/* Prepare: read, one lock phase, then (no lock) release what it retired and wait until that
 * memory is back, so that the build measures its own memory alone. */
static keel_err load_prepare(load_job *j)
{
    keel_runtime *rt = j->rt;
    uint64_t predicted;
    keel_err err;

    if ((err = load_read(j)) != KEEL_OK)
        return err;
    predicted = keel__repo_version_bytes(j->dir, j->versions, j->nversions);
    keel__rt_lock(rt);
    err = prepare_locked(j, predicted);
    keel__rt_unlock(rt);
    if (err != KEEL_OK || j->retire.n == 0)
        return err;
    retire_release(rt, &j->retire);
    if (j->swapping)
        wait_generations_freed(rt, j->e);
    else
        keel_runtime_quiesce(rt); /* evicted memory is back before the build is measured */
    return KEEL_OK;
}

/* Build, no lock held: one generation per version, and a vslot for each in case it is new. */
static keel_err load_build(load_job *j)
{
    const size_t last = j->nversions - 1;
    keel_err err;

    for (size_t i = 0; i < j->nversions; i++) {
        if ((err = keel__generation_build(j->rt, j->e, j->versions[i], &j->gens[i], j->msg,
                                          sizeof(j->msg))) != KEEL_OK)
            return err;
        j->charged += j->gens[i]->mem_charged;
        if ((j->fresh[i] = keel__calloc(1, sizeof(*j->fresh[i]))) == NULL)
            return oom(j);
    }
    /* Serve the newest generation's config: its backend may have filled in the inputs and
     * outputs that config.json leaves out (onnx). */
    if (strcmp(j->json, j->gens[last]->cfg->json) != 0) {
        char *filled = keel__strdup(j->gens[last]->cfg->json);
        if (filled == NULL)
            return oom(j);
        free(j->json);
        j->json = filled;
    }
    return KEEL_OK;
}

/* Publish, under rt->mu: one pointer store per version; a version not served yet gets its
 * fresh vslot. The vslots own the generations' references from here on. */
static void publish_versions_locked(load_job *j)
{
    keel_runtime *rt = j->rt;
    keel__model_entry *e = j->e;

    keel__routing_changed_locked(rt);
    for (size_t i = 0; i < j->nversions; i++) {
        keel__vslot *v, **pp = &e->versions;
        while (*pp != NULL && (*pp)->version < j->versions[i])
            pp = &(*pp)->next;
        if (*pp != NULL && (*pp)->version == j->versions[i]) {
            v = *pp;
            if (v->current == NULL)
                rt->nparked--; /* a parked vslot serves again */
        } else {
            v = j->fresh[i];
            j->fresh[i] = NULL;
            v->version = j->versions[i];
            v->entry = e;
            v->next = *pp;
            *pp = v;
        }
        j->olds[i] = v->current;
        if (j->olds[i] != NULL)
            j->olds[i]->retired = true;
        v->current = j->gens[i];
        keel__vslot_set_policy_locked(v, j->gens[i]->cfg);
        j->gens[i] = NULL; /* the vslot owns that reference now */
        keel__vslot_kick_locked(rt, v);
    }
}

/* Publish, under rt->mu: removes the vslots of versions that left the policy; their requests
 * for "the newest version" move to the newest one, the others are drained. */
static void drop_left_versions_locked(load_job *j)
{
    keel__model_entry *e = j->e;

    for (keel__vslot *v = e->versions, *next; v != NULL; v = next) {
        bool keep = false;
        keel__generation *old = NULL;
        keel__vslot *f, *newest = NULL;

        next = v->next;
        for (size_t i = 0; i < j->nversions && !keep; i++)
            keep = j->versions[i] == v->version;
        if (keep)
            continue;
        for (keel__vslot *w = e->versions; w != NULL; w = w->next) {
            for (size_t i = 0; i < j->nversions; i++) {
                if (w->version == j->versions[i] && w->current != NULL)
                    newest = w; /* ascending list: the last is the newest */
            }
        }
        if (newest != NULL)
            keel__vslot_move_latest_locked(j->rt, v, newest);
        f = keel__vslot_remove_locked(j->rt, v, &old, &j->drained);
        j->gone[j->ngone++] = old;
        if (f != NULL)
            j->tofree[j->ntofree++] = f;
    }
}

/* Publish, under rt->mu: makes room for the measured charge, publishes, records success. */
static keel_err publish_locked(load_job *j)
{
    keel_runtime *rt = j->rt;
    keel__model_entry *e = j->e;
    size_t nold = 0;
    char *prev;

    for (keel__vslot *v = e->versions; v != NULL; v = v->next)
        nold++;
    j->gone = keel__calloc(nold, sizeof(*j->gone));
    j->tofree = keel__calloc(nold, sizeof(*j->tofree));
    if (j->gone == NULL || j->tofree == NULL || !keel__retire_reserve_locked(rt, &j->retire))
        return oom(j);
    /* Now that the charge is measured, not predicted: make room for it. */
    if (!keel__make_room_locked(rt, e, j->charged, &j->retire, j->msg, sizeof(j->msg)))
        return KEEL_ERESOURCE;
    publish_versions_locked(j);
    drop_left_versions_locked(j);
    prev = e->config_json;
    e->config_json = j->json;
    j->json = prev; /* freed after unlocking */
    if (j->evicted_reload)
        atomic_fetch_add(&rt->reloads, 1);
    e->loading = e->swapping = e->evicted = e->want_load = false;
    e->load_failures = 0;
    e->next_retry_ns = e->next_retry_unix_ms = 0;
    e->charge_hint = j->charged;
    record_result_locked(e, KEEL_OK, "");
    /* What the served configuration left out (harmless Triton fields): the index shows it. */
    snprintf(e->load_warnings, sizeof(e->load_warnings), "%s",
             j->cfg != NULL && j->cfg->warnings != NULL ? j->cfg->warnings : "");
    return KEEL_OK;
}

/* Publish: one lock phase; on KEEL_OK the load is done and e->load_mu released, then (no
 * lock) the replaced generations are released and the requests of removed versions answered. */
static keel_err load_publish(load_job *j)
{
    keel_runtime *rt = j->rt;
    keel_err err;

    keel__rt_lock(rt);
    err = publish_locked(j);
    keel__rt_unlock(rt);
    if (err != KEEL_OK)
        return err;
    pthread_mutex_unlock(&j->e->load_mu);

    KEEL__LOG(&rt->log, KEEL_LOG_INFO,
              "model %s: loaded %zu version(s), newest %lld, charged %llu bytes", j->name,
              j->nversions, (long long)j->versions[j->nversions - 1],
              (unsigned long long)j->charged);
    keel__fault_leak_on_publish(); /* test-only (keel soak's leak test); no-op unless armed */
    keel__complete_list(j->drained, KEEL_EUNAVAILABLE, "the model version was unloaded");
    j->drained = NULL;
    retire_release(rt, &j->retire);
    for (size_t i = 0; i < j->nversions; i++)
        keel__generation_release(j->olds[i]);
    for (size_t i = 0; i < j->ngone; i++)
        keel__generation_release(j->gone[i]);
    return KEEL_OK;
}

/* Fail: the one error path of every phase after begin (no rt->mu held, e->load_mu held):
 * records err, schedules the retry, releases e->load_mu, answers the requests that cannot be
 * served and releases the unpublished generations. */
static void load_fail(load_job *j, keel_err err, char *errbuf, size_t errlen)
{
    keel_runtime *rt = j->rt;
    keel__model_entry *e = j->e;

    keel__rt_lock(rt);
    if (j->tofree == NULL) {
        size_t nv = 0;
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            nv++;
        j->tofree = keel__calloc(nv + 1, sizeof(*j->tofree));
    }
    if (j->tofree != NULL) {
        j->ntofree = 0;
        load_failed_locked(rt, e, j->tofree, &j->ntofree, &j->drained);
    }
    e->loading = false;
    e->load_failures++;
    record_result_locked(e, err, j->msg);
    retry_schedule_locked(rt, e);
    keel__rt_unlock(rt);
    pthread_mutex_unlock(&e->load_mu);
    keel__errf(errbuf, errlen, "%s", j->msg);
    KEEL__LOG(&rt->log, KEEL_LOG_ERROR, "model %s: load failed: %s", j->name, j->msg);
    keel__complete_list(j->drained, KEEL_EUNAVAILABLE, j->msg);
    j->drained = NULL;
    retire_release(rt, &j->retire);
    if (j->gens != NULL) {
        for (size_t i = 0; i < j->nversions; i++)
            keel__generation_release(j->gens[i]); /* unpublished: refcount 1 -> reaper */
    }
}

/* Frees what the job still owns (no lock held): removed vslots, unused fresh ones, arrays. */
static void load_job_fini(load_job *j)
{
    for (size_t i = 0; i < j->ntofree; i++)
        free(j->tofree[i]);
    if (j->fresh != NULL) {
        for (size_t i = 0; i < j->nversions; i++)
            free(j->fresh[i]);
    }
    free(j->fresh);
    free(j->gone);
    free(j->tofree);
    free(j->gens);
    free(j->olds);
    free(j->versions);
    free(j->json);
    free(j->path);
    free(j->dir);
    keel__config_destroy(j->cfg);
}

keel_err keel__model_load(keel_runtime *rt, const char *name, bool evicted_reload, char *errbuf,
                          size_t errlen)
{
    load_job j;
    keel_err err;

    memset(&j, 0, sizeof(j));
    j.rt = rt;
    j.name = name;
    j.evicted_reload = evicted_reload;
    keel__errf(errbuf, errlen, "%s", "");
    if (rt == NULL || name == NULL)
        return KEEL_EINVAL;
    if (!load_begin(&j, &err, errbuf, errlen))
        return err;
    if ((err = load_prepare(&j)) != KEEL_OK || (err = load_build(&j)) != KEEL_OK ||
        (err = load_publish(&j)) != KEEL_OK)
        load_fail(&j, err, errbuf, errlen);
    load_job_fini(&j);
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
    e = keel__entry_lookup(rt, name);
    if (e == NULL)
        return KEEL_ENOTFOUND;

    pthread_mutex_lock(&e->load_mu);
    keel__rt_lock(rt);
    /* An unloaded model is not retried or reloaded by keel itself. */
    e->evicted = e->want_load = false;
    e->next_retry_ns = e->next_retry_unix_ms = 0;
    e->load_failures = 0;
    for (keel__vslot *v = e->versions; v != NULL; v = v->next)
        n++;
    if (n == 0) {
        keel__rt_unlock(rt);
        pthread_mutex_unlock(&e->load_mu);
        return KEEL_ENOTFOUND;
    }
    /* Allocating under the lock is fine (nothing is released or called back). */
    olds = keel__calloc(n, sizeof(*olds));
    tofree = keel__calloc(n, sizeof(*tofree));
    if (olds == NULL || tofree == NULL) {
        keel__rt_unlock(rt);
        pthread_mutex_unlock(&e->load_mu);
        free(olds);
        free(tofree);
        return KEEL_ENOMEM;
    }
    while (e->versions != NULL) {
        keel__vslot *f = keel__vslot_remove_locked(rt, e->versions, &olds[nold++], &drained);
        if (f != NULL)
            tofree[ntofree++] = f;
    }
    e->state = KEEL_MODEL_UNAVAILABLE;
    keel__rt_unlock(rt);
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
