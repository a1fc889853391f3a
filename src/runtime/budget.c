/*
 * budget.c: the model memory budget: what each model is charged, evictions to make room,
 * the retire list, parking, and the memory measurement behind it (/proc, keel__heap_trim).
 *
 * DESIGN
 * Memory budget (make_room_locked, under rt->mu): a model's charge is the sum of mem_charged
 * over its serving generations. Before building, a load predicts its charge (the model's last
 * measured charge, else the size of its version folders); after building it knows it (load.c).
 * Each time, while the other models' charges plus this one exceed the limit, the least
 * recently used model that is not pinned, loading or swapping is evicted: its vslots are
 * parked and its generations retired into a retire list. If the models that cannot be
 * evicted leave no room, nothing is evicted and the load fails with KEEL_ERESOURCE. During an
 * availability-preserving reload the old generation lives until the new one is published: the
 * budget counts the model once, at its new charge.
 *
 * The retire list: this file only fills it, under rt->mu (generations are data here; it never
 * takes or drops a reference). Its owner, the load (load.c), releases the generations and
 * frees the list after unlocking. An evicted model whose parked vslots hold requests asks for
 * a reload (want_load_locked): that wakes the lifecycle thread, the one call from a lower
 * layer to a higher one in src/runtime (keel__life_wake, an eventfd write; internal.h).
 *
 * Memory measurement: a build holds rt->build_mu, and so does the reaper while it frees
 * generations and trims the heap (generation.c), so the VmRSS / Pss change across a build is
 * that build's alone. The build trims first (keel__heap_trim) so that heap freed earlier is given
 * back rather than reused invisibly by the new generation. keel__trim runs on the reaper
 * thread; keel__mem_sample on the building thread; the rest under rt->mu from a loading
 * thread (load.c) or a submitting one (sched.c, want_load_locked). Lock order: internal.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/heap.h"
#include "runtime/budget.h"
#include "runtime/lifecycle.h" /* keel__life_wake: the documented way up */
#include "runtime/testhook.h"

/* ---------------------------------------------------------------- memory */

/* Reads a small /proc file into buf (NUL-terminated) without allocating. */
static bool read_proc(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t off = 0;

    if (fd < 0)
        return false;
    while (off + 1 < len) {
        ssize_t r = read(fd, buf + off, len - 1 - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        off += (size_t)r;
    }
    close(fd);
    buf[off] = '\0';
    return off > 0;
}

/* Sanitizer builds map terabytes of shadow memory: reading smaps_rollup then takes ~50 ms
 * instead of ~2 ms (measured) and its PSS describes the sanitizer more than keel, so those
 * builds report PSS as unavailable. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KEEL__READ_PSS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define KEEL__READ_PSS 0
#endif
#endif
#ifndef KEEL__READ_PSS
#define KEEL__READ_PSS 1
#endif

static int64_t rss_bytes(void)
{
    char buf[256];
    long long size, res;

    if (read_proc("/proc/self/statm", buf, sizeof(buf)) &&
        sscanf(buf, "%lld %lld", &size, &res) == 2)
        return (int64_t)res * (int64_t)sysconf(_SC_PAGESIZE);
    return 0;
}

void keel__mem_sample(int64_t *rss, int64_t *pss)
{
    *rss = rss_bytes();
    *pss = -1;
#if KEEL__READ_PSS
    {
        char buf[2048];
        long long kb;
        const char *p;
        /* smaps_rollup (Linux 4.14+): "Pss:   1234 kB" */
        if (read_proc("/proc/self/smaps_rollup", buf, sizeof(buf)) &&
            (p = strstr(buf, "\nPss:")) != NULL && sscanf(p + 5, "%lld", &kb) == 1)
            *pss = (int64_t)kb * 1024;
    }
#endif
}

/* ---------------------------------------------------------------- budget */

uint64_t keel__charge_locked(const keel__model_entry *e)
{
    uint64_t c = 0;

    for (const keel__vslot *v = e->versions; v != NULL; v = v->next) {
        if (v->current != NULL)
            c += v->current->mem_charged;
    }
    return c;
}

bool keel__retire_reserve_locked(keel_runtime *rt, keel__retire_list *l)
{
    size_t need = l->n;
    keel__generation **p;

    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        for (keel__vslot *v = e->versions; v != NULL; v = v->next)
            need++;
    }
    if (need <= l->cap)
        return true;
    if ((p = keel__realloc(l->gens, need * sizeof(*p))) == NULL)
        return false;
    l->gens = p;
    l->cap = need;
    return true;
}

void keel__vslot_park_locked(keel_runtime *rt, keel__vslot *v, keel__retire_list *l)
{
    KEEL__ASSERT(v->current != NULL && l->n < l->cap); /* reserved by the caller */
    keel__routing_changed_locked(rt);
    v->current->retired = true;
    l->gens[l->n++] = v->current;
    v->current = NULL;
    rt->nparked++;
}

static bool evictable(const keel__model_entry *e, const keel__model_entry *self)
{
    return e != self && !e->pinned && !e->loading && !e->swapping && !e->evicted;
}

static void evict_locked(keel_runtime *rt, keel__model_entry *victim, const keel__model_entry *self,
                         keel__retire_list *l)
{
    bool waiting = false;
    size_t used = strlen(l->evicted);

    for (keel__vslot *v = victim->versions; v != NULL; v = v->next) {
        if (v->current != NULL)
            keel__vslot_park_locked(rt, v, l);
        waiting |= v->nqueued > 0;
    }
    victim->evicted = true;
    victim->state = KEEL_MODEL_UNAVAILABLE;
    victim->last_error = KEEL_OK;
    snprintf(victim->last_error_msg, sizeof(victim->last_error_msg),
             "evicted to make room for model '%s' (model memory limit %llu bytes); its next "
             "request loads it again",
             self->name, (unsigned long long)rt->mem_limit);
    atomic_fetch_add(&rt->evictions, 1);
    if (used + strlen(victim->name) + 4 < sizeof(l->evicted))
        snprintf(l->evicted + used, sizeof(l->evicted) - used, "%s'%s'", used > 0 ? ", " : "",
                 victim->name);
    if (waiting)
        keel__want_load_locked(rt, victim); /* requests were queued: they still want it */
}

bool keel__make_room_locked(keel_runtime *rt, keel__model_entry *self, uint64_t need,
                            keel__retire_list *l, char *msg, size_t len)
{
    uint64_t used = 0, movable = 0, limit = rt->mem_limit;

    if (limit == 0)
        return true;
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
        uint64_t c = e == self ? 0 : keel__charge_locked(e);
        used += c;
        if (evictable(e, self))
            movable += c;
    }
    if (need + used <= limit)
        return true;
    if (need > limit || need + used - movable > limit) {
        keel__errf(msg, len,
                   "model '%s' needs about %llu bytes, but the model memory limit is %llu bytes "
                   "and %llu bytes are held by models that cannot be evicted (pinned, loading "
                   "or swapping)",
                   self->name, (unsigned long long)need, (unsigned long long)limit,
                   (unsigned long long)(used - movable));
        return false;
    }
    while (need + used > limit) {
        keel__model_entry *victim = NULL;
        for (keel__model_entry *e = rt->models; e != NULL; e = e->next) {
            if (evictable(e, self) && keel__charge_locked(e) > 0 &&
                (victim == NULL ||
                 atomic_load_explicit(&e->last_used_ns, memory_order_relaxed) <
                     atomic_load_explicit(&victim->last_used_ns, memory_order_relaxed)))
                victim = e;
        }
        KEEL__ASSERT(victim != NULL); /* movable covered the excess */
        used -= keel__charge_locked(victim);
        evict_locked(rt, victim, self, l);
    }
    return true;
}

void keel__want_load_locked(keel_runtime *rt, keel__model_entry *e)
{
    if (e->want_load)
        return;
    e->want_load = true;
    keel__life_wake(rt);
}

void keel_heap_thread_idle(void)
{
    keel__heap_thread_idle();
}

void keel_memory_stats_get(keel_runtime *rt, keel_memory_stats *out)
{
    if (out == NULL)
        return;
    memset(out, 0, sizeof(*out));
    if (rt == NULL)
        return;
    keel__rt_lock(rt);
    out->limit_bytes = rt->mem_limit;
    for (keel__model_entry *e = rt->models; e != NULL; e = e->next)
        out->charged_bytes += keel__charge_locked(e);
    keel__rt_unlock(rt);
    out->evictions = atomic_load(&rt->evictions);
    out->reloads = atomic_load(&rt->reloads);
    out->trims = atomic_load(&rt->trims);
    out->trimmed_bytes = atomic_load(&rt->trimmed_bytes);
    out->rss_bytes = (uint64_t)rss_bytes();
    {
        keel__heap_stats hs;
        keel__heap_stats_get(&hs);
        out->heap_allocator = hs.allocator;
        out->heap_in_use_bytes = hs.in_use_bytes;
        out->heap_free_bytes = hs.free_bytes;
    }
}

/* The reaper, after freeing generations (holding rt->build_mu): gives free heap back. */
void keel__trim(keel_runtime *rt)
{
    int64_t before, after;

    before = rss_bytes();
    keel__heap_trim();
    after = rss_bytes();
    atomic_fetch_add(&rt->trims, 1);
    if (before > after)
        atomic_fetch_add(&rt->trimmed_bytes, (uint64_t)(before - after));
}
