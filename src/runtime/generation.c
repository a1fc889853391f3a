/*
 * generation.c: building, referencing and freeing generations; the reaper thread.
 *
 * DESIGN
 * A generation is built privately by the loading thread (holding only build_mu, which makes
 * builds one at a time so their memory can be measured), and becomes shared only when
 * load.c publishes it in a vslot. Its refcount starts at 1 (the reference the publisher
 * hands to the vslot). Every lease adds one. The release that drops the count to zero never
 * frees anything itself: it pushes the generation on the reaper's queue, so the heavy
 * destruction (backend contexts, then the model) runs on the reaper thread, off the request
 * path, holding only build_mu; after each batch the reaper gives the freed heap back to the
 * OS (keel__heap_trim: malloc_trim, or jemalloc's purge), counted in keel_memory_stats. A refcount
 * underflow is a panic. reap_mu is a leaf lock (see internal.h). Layer: calls registry.c (counters)
 * and budget.c (memory sampling, trim) only.
 */
#include <string.h>

#include "core/heap.h"
#include "runtime/budget.h"
#include "runtime/generation.h"
#include "runtime/registry.h"

static const keel__backend *find_backend(keel_runtime *rt, const char *name)
{
    for (int i = 0; i < rt->nbackends; i++) {
        if (strcmp(rt->backends[i]->name, name) == 0)
            return rt->backends[i];
    }
    return NULL;
}

/* Frees a generation's contexts, then its model, then itself. Exactly once per generation. */
static void generation_free(keel__generation *g)
{
    keel_runtime *rt = g->rt;
    int nctx = 0;

    for (int i = 0; i < g->nctx; i++) {
        if (g->ctxs[i] != NULL) {
            g->backend->context_destroy(g->ctxs[i]);
            nctx++;
        }
    }
    if (g->model != NULL)
        g->backend->model_free(g->model);
    keel__counter_add(rt, g->entry, KEEL__CNT(contexts), -nctx);
    if (g->id != 0)
        keel__counter_add(rt, g->entry, KEEL__CNT(generations), -1);
    keel__config_destroy(g->cfg);
    free(g->ctxs);
    free(g->free_stack);
    free(g);
}

/* Discards outputs of the warm-up run after checking they are ones the config declares. */
static keel_err warmup_emit(keel__run_io *io, const char *name, keel_datatype dt,
                            const int64_t *shape, size_t ndim, const void *data, size_t bytes)
{
    const keel__model_config *cfg = io->sink;

    (void)shape;
    (void)ndim;
    (void)data;
    (void)bytes;
    for (size_t i = 0; i < cfg->noutputs; i++) {
        if (strcmp(cfg->outputs[i].name, name) != 0)
            continue;
        if (cfg->outputs[i].datatype != dt) {
            keel__errf(io->errbuf, io->errlen, "output '%s' is %s but config.json declares %s",
                       name, keel_datatype_name(dt), keel_datatype_name(cfg->outputs[i].datatype));
            return KEEL_EINVAL;
        }
        return KEEL_OK;
    }
    keel__errf(io->errbuf, io->errlen, "output '%s' is not declared in config.json", name);
    return KEEL_EINVAL;
}

/* Runs one inference of zero-valued inputs (batch 1, variable dims 1) on context 0. */
static keel_err warmup(keel__generation *g, char *errbuf, size_t errlen)
{
    const keel__model_config *cfg = g->cfg;
    keel_tensor_view *views = NULL;
    int64_t *shapes = NULL;
    void **bufs = NULL;
    keel__run_io io;
    char runerr[KEEL__ERRLEN];
    keel_err err = KEEL_ENOMEM;
    size_t off = cfg->max_batch_size > 0 ? 1 : 0;

    runerr[0] = '\0';
    if ((views = keel__calloc(cfg->ninputs, sizeof(*views))) == NULL ||
        (shapes = keel__calloc(cfg->ninputs * (KEEL__MAX_DIMS + 1), sizeof(int64_t))) == NULL ||
        (bufs = keel__calloc(cfg->ninputs, sizeof(void *))) == NULL) {
        keel__errf(errbuf, errlen, "out of memory preparing the warm-up inference");
        goto done;
    }
    for (size_t i = 0; i < cfg->ninputs; i++) {
        const keel__tensor_config *tc = &cfg->inputs[i];
        int64_t *shape = shapes + i * (KEEL__MAX_DIMS + 1);
        size_t n = 1, esize, bytes;

        shape[0] = 1;
        for (size_t d = 0; d < tc->ndims; d++) {
            shape[d + off] = tc->dims[d] == -1 ? 1 : tc->dims[d];
            if (keel__mul_overflow_size(n, (size_t)shape[d + off], &n))
                n = SIZE_MAX;
        }
        esize = tc->datatype == KEEL_TYPE_BYTES ? 4 : keel_datatype_size(tc->datatype);
        if (n > ((size_t)1 << 28) / esize) {
            keel__errf(errbuf, errlen, "input '%s' is too large for a warm-up inference", tc->name);
            err = KEEL_ELOAD;
            goto done;
        }
        bytes = n * esize; /* BYTES: n empty strings, each a zero length prefix */
        if ((bufs[i] = keel__calloc(1, bytes)) == NULL) {
            keel__errf(errbuf, errlen, "out of memory preparing the warm-up inference");
            goto done;
        }
        views[i].name = tc->name;
        views[i].datatype = tc->datatype;
        views[i].shape = shape;
        views[i].ndim = tc->ndims + off;
        views[i].data = bufs[i];
        views[i].bytes = bytes;
    }
    io.inputs = views;
    io.ninputs = cfg->ninputs;
    io.batch = 1;
    io.emit = warmup_emit;
    io.sink = (void *)cfg;
    io.errbuf = runerr;
    io.errlen = sizeof(runerr);
    if ((err = g->backend->run(g->ctxs[0], &io)) != KEEL_OK) {
        keel__errf(errbuf, errlen, "warm-up inference failed: %s",
                   runerr[0] != '\0' ? runerr : keel_strerror(err));
        err = KEEL_ELOAD;
    }
done:
    if (bufs != NULL) {
        for (size_t i = 0; i < cfg->ninputs; i++)
            free(bufs[i]);
    }
    free(bufs);
    free(shapes);
    free(views);
    return err;
}

static keel_err build(keel_runtime *rt, keel__model_entry *e, int64_t version,
                      keel__generation **out, char *errbuf, size_t errlen)
{
    keel__generation *g = NULL;
    char *cfg_path = NULL, *dir = NULL;
    char sub[KEEL__ERRLEN];
    keel_err err;

    *out = NULL;
    sub[0] = '\0';
    if ((g = keel__calloc_lines(sizeof(*g))) == NULL || /* est_run_ns is line-aligned */
        asprintf(&dir, "%s/%s", rt->repo, e->name) < 0) {
        dir = NULL;
        err = KEEL_ENOMEM;
        keel__errf(errbuf, errlen, "out of memory loading model '%s'", e->name);
        goto fail;
    }
    /* config.json or config.pbtxt (both present is an error naming both). */
    if ((err = keel__config_find(dir, &cfg_path, errbuf, errlen)) != KEEL_OK)
        goto fail;
    free(dir);
    if (asprintf(&dir, "%s/%s/%lld", rt->repo, e->name, (long long)version) < 0) {
        dir = NULL;
        err = KEEL_ENOMEM;
        keel__errf(errbuf, errlen, "out of memory loading model '%s'", e->name);
        goto fail;
    }
    g->rt = rt;
    g->entry = e;
    g->version = version;
    atomic_init(&g->refs, 1);
    if ((err = keel__config_load(cfg_path, e->name, &g->cfg, errbuf, errlen)) != KEEL_OK)
        goto fail;
    if (g->cfg->preprocess != NULL && rt->prep == NULL) {
        keel__errf(errbuf, errlen,
                   "%s: preprocess: the runtime has no preprocessing workers "
                   "(preprocess_workers = 0)",
                   cfg_path);
        err = KEEL_ECONFIG;
        goto fail;
    }
    if ((g->backend = find_backend(rt, g->cfg->backend)) == NULL) {
        keel__errf(errbuf, errlen, "%s: backend: unknown backend \"%s\"", cfg_path,
                   g->cfg->backend);
        err = KEEL_ECONFIG;
        goto fail;
    }
    if (keel__fault_hit(KEEL__FAULT_BACKEND_LOAD)) {
        keel__errf(errbuf, errlen, "%s: injected backend load fault", dir);
        err = KEEL_ELOAD;
        goto fail;
    }
    if ((err = g->backend->model_load(g->cfg, dir, &g->model, sub, sizeof(sub))) != KEEL_OK) {
        g->model = NULL;
        keel__errf(errbuf, errlen, "%s", sub[0] != '\0' ? sub : keel_strerror(err));
        goto fail;
    }
    if (g->cfg->ninputs == 0 || g->cfg->noutputs == 0) {
        /* config.c lets a backend that reads its interface from the model file leave them
         * out; the backend fills them in and the served JSON is rebuilt. */
        if (g->backend->complete_config == NULL) {
            keel__errf(errbuf, errlen, "%s: %s: required by backend \"%s\"", cfg_path,
                       g->cfg->ninputs == 0 ? "input" : "output", g->cfg->backend);
            err = KEEL_ECONFIG;
            goto fail;
        }
        if ((err = g->backend->complete_config(g->model, g->cfg, sub, sizeof(sub))) != KEEL_OK ||
            (err = keel__config_rebuild_json(g->cfg)) != KEEL_OK) {
            keel__errf(errbuf, errlen, "%s", sub[0] != '\0' ? sub : keel_strerror(err));
            goto fail;
        }
    }
    g->nctx = g->cfg->instance_count;
    if ((g->ctxs = keel__calloc((size_t)g->nctx, sizeof(void *))) == NULL ||
        (g->free_stack = keel__calloc((size_t)g->nctx, sizeof(int))) == NULL) {
        keel__errf(errbuf, errlen, "out of memory creating contexts for %s", dir);
        err = KEEL_ENOMEM;
        goto fail;
    }
    for (int i = 0; i < g->nctx; i++) {
        if (keel__fault_hit(KEEL__FAULT_CONTEXT_CREATE)) {
            keel__errf(errbuf, errlen, "%s: context %d: injected context create fault", dir, i);
            err = KEEL_ELOAD;
            goto fail;
        }
        if ((err = g->backend->context_create(g->model, g->cfg, &g->ctxs[i], sub, sizeof(sub))) !=
            KEEL_OK) {
            g->ctxs[i] = NULL;
            keel__errf(errbuf, errlen, "%s: context %d: %s", dir, i,
                       sub[0] != '\0' ? sub : keel_strerror(err));
            goto fail;
        }
        keel__counter_add(rt, e, KEEL__CNT(contexts), 1);
        g->free_stack[g->nfree++] = g->nctx - 1 - i; /* context 0 is handed out first */
    }
    g->max_in_use = g->backend->concurrent_contexts ? g->nctx : 1;
    atomic_store_explicit(&g->ctx_idle, g->nfree > 0, memory_order_relaxed); /* unpublished */
    if ((err = warmup(g, sub, sizeof(sub))) != KEEL_OK) {
        keel__errf(errbuf, errlen, "%s: %s", dir, sub);
        goto fail;
    }
    if (g->backend->memory_estimate != NULL)
        g->memory_estimate = g->backend->memory_estimate(g->model);
    g->id = atomic_fetch_add(&rt->next_gen_id, 1) + 1;
    keel__counter_add(rt, e, KEEL__CNT(generations), 1);
    free(cfg_path);
    free(dir);
    *out = g;
    return KEEL_OK;

fail:
    if (g != NULL)
        generation_free(g); /* private and unpublished: freed here, once */
    free(cfg_path);
    free(dir);
    return err;
}

/* Builds under rt->build_mu and measures the process's memory across the build (see
 * budget.c): nothing else builds, frees generations or trims meanwhile. */
keel_err keel__generation_build(keel_runtime *rt, keel__model_entry *e, int64_t version,
                                keel__generation **out, char *errbuf, size_t errlen)
{
    int64_t rss0, pss0, rss1, pss1;
    keel_err err;

    pthread_mutex_lock(&rt->build_mu);
    keel__heap_trim();
    keel__mem_sample(&rss0, &pss0);
    err = build(rt, e, version, out, errbuf, errlen);
    keel__mem_sample(&rss1, &pss1);
    pthread_mutex_unlock(&rt->build_mu);
    if (err == KEEL_OK) {
        keel__generation *g = *out;
        g->mem_rss = rss1 - rss0;
        g->mem_pss = pss0 >= 0 && pss1 >= 0 ? pss1 - pss0 : -1;
        g->mem_charged = g->mem_rss > 0 ? (uint64_t)g->mem_rss : 0;
        if (g->memory_estimate > g->mem_charged)
            g->mem_charged = g->memory_estimate;
    }
    return err;
}

void keel__generation_acquire(keel__generation *g)
{
    int64_t prev = atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed);

    KEEL__ASSERT(prev > 0); /* acquiring a dead generation */
}

void keel__generation_release(keel__generation *g)
{
    keel_runtime *rt;
    int64_t prev;

    if (g == NULL)
        return;
    prev = atomic_fetch_sub_explicit(&g->refs, 1, memory_order_acq_rel);
    KEEL__ASSERT(prev > 0); /* refcount underflow: a double release */
    if (prev != 1)
        return;
    rt = g->rt;
    pthread_mutex_lock(&rt->reap_mu);
    g->reap_next = rt->reap_head;
    rt->reap_head = g;
    pthread_cond_signal(&rt->reap_cv);
    pthread_mutex_unlock(&rt->reap_mu);
}

void *keel__reaper_main(void *arg)
{
    keel_runtime *rt = arg;

    pthread_mutex_lock(&rt->reap_mu);
    for (;;) {
        keel__generation *list;

        while (rt->reap_head == NULL && !rt->reap_stop)
            pthread_cond_wait(&rt->reap_cv, &rt->reap_mu);
        if (rt->reap_head == NULL)
            break; /* stop requested and nothing left */
        list = rt->reap_head;
        rt->reap_head = NULL;
        rt->reaping = true;
        pthread_mutex_unlock(&rt->reap_mu);
        pthread_mutex_lock(&rt->build_mu); /* not during a build's measurement */
        while (list != NULL) {
            keel__generation *next = list->reap_next;
            KEEL__LOG(&rt->log, KEEL_LOG_DEBUG, "model %s version %lld: freeing generation %llu",
                      list->entry->name, (long long)list->version, (unsigned long long)list->id);
            generation_free(list);
            list = next;
        }
        keel__trim(rt); /* give the freed heap back to the OS, off the request path */
        pthread_mutex_unlock(&rt->build_mu);
        pthread_mutex_lock(&rt->reap_mu);
        rt->reaping = false;
        pthread_cond_broadcast(&rt->reap_idle_cv);
    }
    pthread_mutex_unlock(&rt->reap_mu);
    return NULL;
}

void keel_runtime_quiesce(keel_runtime *rt)
{
    if (rt == NULL)
        return;
    pthread_mutex_lock(&rt->reap_mu);
    while (rt->reap_head != NULL || rt->reaping)
        pthread_cond_wait(&rt->reap_idle_cv, &rt->reap_mu);
    pthread_mutex_unlock(&rt->reap_mu);
}

void keel__reaper_stop(keel_runtime *rt)
{
    pthread_mutex_lock(&rt->reap_mu);
    rt->reap_stop = true;
    pthread_cond_signal(&rt->reap_cv);
    pthread_mutex_unlock(&rt->reap_mu);
    pthread_join(rt->reaper, NULL);
}
