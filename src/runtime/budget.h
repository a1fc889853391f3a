/*
 * budget.h: the model memory budget (charge, eviction, parking, the retire list) and the
 * memory measurement (/proc sampling, malloc_trim). Layer: above registry.c (internal.h);
 * its one call upward is keel__life_wake (lifecycle.h), from keel__want_load_locked.
 */
#ifndef KEEL_RUNTIME_BUDGET_H
#define KEEL_RUNTIME_BUDGET_H

#include "runtime/internal.h"

/* Generations taken out of service under rt->mu, released after unlocking by the list's
 * owner (load.c), which also frees gens. This file only fills the list. */
typedef struct keel__retire_list {
    keel__generation **gens;
    size_t n, cap;
    char evicted[256]; /* names of models evicted, for the log */
} keel__retire_list;

/* Under rt->mu: the memory e's serving generations are charged. */
uint64_t keel__charge_locked(const keel__model_entry *e);
/* Under rt->mu: room for one generation per vslot of the runtime; false on ENOMEM. */
bool keel__retire_reserve_locked(keel_runtime *rt, keel__retire_list *l);
/* Under rt->mu: retires v's generation into l and parks v (reserve first). */
void keel__vslot_park_locked(keel_runtime *rt, keel__vslot *v, keel__retire_list *l);
/* Under rt->mu (reserve first): evicts least recently used models until self fits with need
 * bytes; false (nothing evicted, msg says why) if it cannot fit. */
bool keel__make_room_locked(keel_runtime *rt, keel__model_entry *self, uint64_t need,
                            keel__retire_list *l, char *msg, size_t len);
/* Under rt->mu: requests of a parked vslot of an evicted model exist: ask for a reload
 * (wakes the lifecycle thread). */
void keel__want_load_locked(keel_runtime *rt, keel__model_entry *e);
/* Reads the process's resident set size and (if available, else -1) proportional set size.
 * Also in testhook.h. */
void keel__mem_sample(int64_t *rss, int64_t *pss);
/* The reaper, after freeing generations (holding rt->build_mu): gives free heap back. */
void keel__trim(keel_runtime *rt);

#endif
