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
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "repository/scan.h"
#include "runtime/registry.h"

_Thread_local unsigned keel__tl_shard;

#ifdef KEEL_BENCH_LOCK_STATS
/* rt->mu's counts, process-wide (internal.h): written only by the holder of some runtime's
 * mu, so atomics (several runtimes may exist). Printed to stderr at exit. */
static _Atomic uint64_t ls_acquired, ls_contended, ls_held_ns, ls_max_ns, ls_hist[8];

void keel__rt_lock(keel_runtime *rt)
{
    if (pthread_mutex_trylock(&rt->mu) != 0) {
        atomic_fetch_add_explicit(&ls_contended, 1, memory_order_relaxed);
        pthread_mutex_lock(&rt->mu);
    }
    atomic_fetch_add_explicit(&ls_acquired, 1, memory_order_relaxed);
    rt->mu_since_ns = keel__now_ns();
}

static void ls_held_until_now(keel_runtime *rt)
{
    uint64_t held = keel__now_ns() - rt->mu_since_ns;
    uint64_t max = atomic_load_explicit(&ls_max_ns, memory_order_relaxed);
    unsigned b = 0;

    atomic_fetch_add_explicit(&ls_held_ns, held, memory_order_relaxed);
    while (held > max && !atomic_compare_exchange_weak_explicit(
                             &ls_max_ns, &max, held, memory_order_relaxed, memory_order_relaxed))
        ;
    for (uint64_t lim = 100; b < 7 && held >= lim; lim *= 4) /* < 100 ns, < 400 ns, ... */
        b++;
    atomic_fetch_add_explicit(&ls_hist[b], 1, memory_order_relaxed);
}

void keel__rt_unlock(keel_runtime *rt)
{
    ls_held_until_now(rt);
    pthread_mutex_unlock(&rt->mu);
}

void keel__rt_wait_begin(keel_runtime *rt)
{
    ls_held_until_now(rt);
}

void keel__rt_wait_end(keel_runtime *rt)
{
    atomic_fetch_add_explicit(&ls_acquired, 1, memory_order_relaxed);
    rt->mu_since_ns = keel__now_ns();
}

__attribute__((destructor)) static void ls_print(void)
{
    uint64_t n = atomic_load(&ls_acquired), t0 = keel__now_ns(), clock_ns;

    for (int i = 0; i < 999; i++)
        (void)keel__now_ns();
    clock_ns = (keel__now_ns() - t0) / 1000; /* what one clock read adds to each hold */
    fprintf(stderr,
            "keel lockstat: rt->mu acquisitions %" PRIu64 " contended %" PRIu64
            " held_ns_total %" PRIu64 " held_ns_max %" PRIu64 " clock_read_ns %" PRIu64
            " hist(<100,<400,<1.6k,<6.4k,<25.6k,<102k,<410k,more ns)",
            n, atomic_load(&ls_contended), atomic_load(&ls_held_ns), atomic_load(&ls_max_ns),
            clock_ns);
    for (int i = 0; i < 8; i++)
        fprintf(stderr, " %" PRIu64, atomic_load(&ls_hist[i]));
    fputc('\n', stderr);
}
#endif

unsigned keel__shard_assign(void)
{
    static _Atomic unsigned next;
    unsigned s = atomic_fetch_add_explicit(&next, 1, memory_order_relaxed) % KEEL__SHARDS;

    keel__tl_shard = s + 1;
    return s;
}

void keel__counter_add(keel_runtime *rt, keel__model_entry *e, size_t field_offset, int64_t d)
{
    unsigned s = keel__shard();

    if (rt != NULL)
        atomic_fetch_add_explicit((_Atomic int64_t *)((char *)&rt->counters[s] + field_offset), d,
                                  memory_order_relaxed);
    if (e != NULL)
        atomic_fetch_add_explicit((_Atomic int64_t *)((char *)&e->counters[s] + field_offset), d,
                                  memory_order_relaxed);
}

int64_t keel__counter_sum(const keel__counters c[KEEL__SHARDS], size_t field_offset)
{
    int64_t sum = 0;

    for (unsigned s = 0; s < KEEL__SHARDS; s++)
        sum += atomic_load_explicit((const _Atomic int64_t *)((const char *)&c[s] + field_offset),
                                    memory_order_relaxed);
    return sum > 0 ? sum : 0;
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

    keel__rt_lock(rt);
    e = keel__entry_find_locked(rt, name);
    keel__rt_unlock(rt);
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
    if ((fresh = keel__calloc_lines(sizeof(*fresh))) == NULL ||
        (fresh->name = keel__strdup(name)) == NULL) {
        free(fresh);
        keel__errf(errbuf, errlen, "out of memory");
        return KEEL_ENOMEM;
    }
    pthread_mutex_init(&fresh->load_mu, NULL);
    fresh->state = KEEL_MODEL_UNAVAILABLE;
    keel__rt_lock(rt);
    if ((e = keel__entry_find_locked(rt, name)) == NULL) {
        fresh->next = rt->models;
        rt->models = fresh;
        e = fresh;
        fresh = NULL;
    }
    keel__rt_unlock(rt);
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
    keel__rt_lock(rt);
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
    keel__rt_unlock(rt);
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
    keel__rt_lock(rt);
    e = keel__entry_find_locked(rt, name);
    if (e == NULL)
        err = KEEL_ENOTFOUND;
    else if (e->config_json == NULL || e->versions == NULL)
        err = KEEL_EUNAVAILABLE;
    else if ((*out = keel__strdup(e->config_json)) == NULL)
        err = KEEL_ENOMEM;
    keel__rt_unlock(rt);
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
    for (unsigned i = 0; i < KEEL__SHARDS; i++) {
        const keel__stat_shard *sh = &s->shard[i];
        uint64_t last = atomic_load(&sh->last_inference_unix_ms);
        out->success += atomic_load(&sh->success);
        out->inference_count += atomic_load(&sh->inference_count);
        out->execution_count += atomic_load(&sh->execution_count);
        out->queue_ns += atomic_load(&sh->queue_ns);
        out->compute_ns += atomic_load(&sh->compute_ns);
        out->runs_inline += atomic_load(&sh->runs_inline);
        out->runs_handed_off += atomic_load(&sh->runs_handed_off);
        if (last > out->last_inference_unix_ms)
            out->last_inference_unix_ms = last;
    }
    for (int i = 0; i < KEEL_ERR_COUNT_; i++)
        out->failure[i] = atomic_load(&s->failure[i]);
    out->rejected = atomic_load(&s->rejected);
    return KEEL_OK;
}

static void counters_read(const keel__counters c[KEEL__SHARDS], keel_counters *out)
{
    out->requests = keel__counter_sum(c, KEEL__CNT(requests));
    out->leases = keel__counter_sum(c, KEEL__CNT(leases));
    out->queued = keel__counter_sum(c, KEEL__CNT(queued));
    out->generations = keel__counter_sum(c, KEEL__CNT(generations));
    out->contexts = keel__counter_sum(c, KEEL__CNT(contexts));
    out->contexts_in_use = keel__counter_sum(c, KEEL__CNT(contexts_in_use));
    out->contexts_stuck = keel__counter_sum(c, KEEL__CNT(contexts_stuck));
}

void keel_counters_get(keel_runtime *rt, keel_counters *out)
{
    if (out == NULL)
        return;
    memset(out, 0, sizeof(*out));
    if (rt != NULL)
        counters_read(rt->counters, out);
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
    counters_read(e->counters, out);
    out->requests = out->leases; /* per model: requests in flight */
    return KEEL_OK;
}
