/*
 * registry.c: the model table: entries by name, their status (keel_model_list,
 * keel_model_config_json), statistics and live-object counters.
 *
 * DESIGN
 * The registry is rt->models, a list of entries that live until the runtime is destroyed
 * (an entry holds a name, a status, statistics and counters, never a strong reference to
 * anything but its vslots' current generations). Entries are created on the first load of a
 * name (keel__entry_get, any thread calling a load) and freed only by keel_runtime_destroy
 * (runtime.c) once no thread runs, so a pointer found under rt->mu stays valid after
 * unlocking. The list and the status fields are under rt->mu; statistics and counters are
 * atomics read without a lock. This file is the lowest layer of src/runtime (internal.h): it
 * calls nothing else in the runtime. Lock order and object lifetimes: see internal.h.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "repository/scan.h"
#include "runtime/registry.h"

void keel__counter_add(keel_runtime *rt, keel__model_entry *e, size_t field_offset, int64_t d)
{
    if (rt != NULL)
        atomic_fetch_add_explicit((_Atomic int64_t *)((char *)&rt->counters + field_offset), d,
                                  memory_order_relaxed);
    if (e != NULL)
        atomic_fetch_add_explicit((_Atomic int64_t *)((char *)&e->counters + field_offset), d,
                                  memory_order_relaxed);
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

keel__model_entry *keel__entry_find_locked(keel_runtime *rt, const char *name)
{
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        if (strcmp(e->name, name) == 0)
            return e;
    }
    return NULL;
}

keel__model_entry *keel__entry_lookup(keel_runtime *rt, const char *name)
{
    keel__model_entry *e;

    pthread_mutex_lock(&rt->mu);
    e = keel__entry_find_locked(rt, name);
    pthread_mutex_unlock(&rt->mu);
    return e;
}

/* A model name is one path component, printable, not too long, and not hidden: names
 * starting with '.' are never models (they are where deploys stage copies; scan.h). */
bool keel__model_name_ok(const char *name)
{
    return keel__repo_name_ok(name);
}

void keel__entry_free(keel__model_entry *e)
{
    if (e == NULL)
        return;
    pthread_mutex_destroy(&e->load_mu);
    free(e->config_json);
    free(e->name);
    free(e);
}

keel_err keel__entry_get(keel_runtime *rt, const char *name, keel__model_entry **out, char *errbuf,
                         size_t errlen)
{
    keel__model_entry *e, *fresh = NULL;
    char *dir = NULL;
    struct stat st;

    *out = NULL;
    e = keel__entry_lookup(rt, name);
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
    keel__entry_free(fresh); /* lost a race with another creator */
    *out = e;
    return KEEL_OK;
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
        free((char *)list[i].warnings);
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
    p->warnings = keel__strdup(row->warnings != NULL ? row->warnings : "");
    if (p->name == NULL || p->last_error_msg == NULL || p->warnings == NULL) {
        free((char *)p->name);
        free((char *)p->last_error_msg);
        free((char *)p->warnings);
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
        row.warnings = e->load_warnings;
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
            if (!keel__model_name_ok(de->d_name))
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

keel_err keel_model_batch_stats_get(keel_runtime *rt, const char *name, keel_batch_stat *out,
                                    size_t max, size_t *count)
{
    keel__model_entry *e;
    size_t n = 0;

    if (count != NULL)
        *count = 0;
    if (rt == NULL || name == NULL || count == NULL || (out == NULL && max > 0))
        return KEEL_EINVAL;
    if ((e = keel__entry_lookup(rt, name)) == NULL)
        return KEEL_ENOTFOUND;
    /* Insertion sort by size into out; slots are atomics, claimed once and never freed. */
    for (size_t i = 0; i < KEEL__BATCH_SLOTS; i++) {
        const keel__batch_slot *slot = &e->stats.batch_slots[i];
        keel_batch_stat b;
        size_t k;
        int64_t size = atomic_load(&slot->size);
        if (size <= 0 || (b.count = atomic_load(&slot->count)) == 0)
            continue;
        b.batch_size = (uint64_t)size;
        b.input_ns = atomic_load(&slot->input_ns);
        b.infer_ns = atomic_load(&slot->infer_ns);
        b.output_ns = atomic_load(&slot->output_ns);
        for (k = n < max ? n : max; k > 0 && out[k - 1].batch_size > b.batch_size; k--) {
            if (k < max)
                out[k] = out[k - 1];
        }
        if (k < max)
            out[k] = b;
        n++;
    }
    *count = n;
    return KEEL_OK;
}

keel_err keel_model_stats_get(keel_runtime *rt, const char *name, keel_model_stats *out)
{
    keel__model_entry *e;
    const keel__stats *s;

    if (out != NULL)
        memset(out, 0, sizeof(*out));
    if (rt == NULL || name == NULL || out == NULL)
        return KEEL_EINVAL;
    e = keel__entry_lookup(rt, name);
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
    out->runs_inline = atomic_load(&s->runs_inline);
    out->runs_handed_off = atomic_load(&s->runs_handed_off);
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
    out->contexts_stuck = atomic_load(&c->contexts_stuck);
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
    e = keel__entry_lookup(rt, name);
    if (e == NULL)
        return KEEL_ENOTFOUND;
    counters_read(&e->counters, out);
    out->requests = out->leases; /* per model: requests in flight */
    return KEEL_OK;
}
