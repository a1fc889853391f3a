/*
 * registry.h: the model table (entries by name), per-model status, statistics and counters.
 * Layer: the lowest of src/runtime (see internal.h); calls nothing else in it.
 */
#ifndef KEEL_RUNTIME_REGISTRY_H
#define KEEL_RUNTIME_REGISTRY_H

#include <stddef.h>

#include "runtime/internal.h"

/* The calling thread's shard index (internal.h: per-thread shards), assigned round-robin
 * at its first call. */
extern _Thread_local unsigned keel__tl_shard; /* index + 1; 0 = not assigned yet */
unsigned keel__shard_assign(void);
static inline unsigned keel__shard(void)
{
    unsigned s = keel__tl_shard;

    return s != 0 ? s - 1 : keel__shard_assign();
}
/* The calling thread's shard of e's statistics. */
static inline keel__stat_shard *keel__stats_mine(keel__model_entry *e)
{
    return &e->stats.shard[keel__shard()];
}

/* Adds d to one live-object counter of rt and of e (either may be NULL), in the calling
 * thread's shard; any thread. */
void keel__counter_add(keel_runtime *rt, keel__model_entry *e, size_t field_offset, int64_t d);
/* The same for a counter that only rt->mu's holder changes (leases, queued, contexts_in_use,
 * contexts_stuck: sched.c): a plain load and store, no locked instruction (the lock orders
 * the writers; readers load the atomics as before). Unlike keel__counter_add, neither rt
 * nor e may be NULL (every caller holds a request's, vslot's or generation's entry). */
static inline void keel__counter_add_locked(keel_runtime *rt, keel__model_entry *e,
                                            size_t field_offset, int64_t d)
{
    unsigned s = keel__shard();
    _Atomic int64_t *p = (_Atomic int64_t *)((char *)&rt->counters[s] + field_offset);

    atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) + d,
                          memory_order_relaxed);
    p = (_Atomic int64_t *)((char *)&e->counters[s] + field_offset);
    atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) + d,
                          memory_order_relaxed);
}
#define KEEL__CNT(field) offsetof(keel__counters, field)
/* The sum of one counter's shards (internal.h: exact at rest, never below 0). */
int64_t keel__counter_sum(const keel__counters c[KEEL__SHARDS], size_t field_offset);

/* Under rt->mu: the entry named name, or NULL. */
keel__model_entry *keel__entry_find_locked(keel_runtime *rt, const char *name);
/* Takes rt->mu: the entry named name, or NULL. Entries live until the runtime is destroyed,
 * so the pointer stays valid after the lock is dropped. */
keel__model_entry *keel__entry_lookup(keel_runtime *rt, const char *name);
/* No lock held: finds or creates the entry for name; the model directory must exist to
 * create one (KEEL_ENOTFOUND otherwise, errbuf says which). */
keel_err keel__entry_get(keel_runtime *rt, const char *name, keel__model_entry **out, char *errbuf,
                         size_t errlen);
/* Destroy only: frees an entry (no generation or vslot left). Accepts NULL. */
void keel__entry_free(keel__model_entry *e);
/* A model name is one path component, printable, not too long, and not hidden. */
bool keel__model_name_ok(const char *name);

#endif
