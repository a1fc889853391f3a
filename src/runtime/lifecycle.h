/*
 * lifecycle.h: the lifecycle thread (repository watching, retries, reloads of evicted
 * models). Layer: above load.c, below runtime.c (internal.h). keel__life_wake is the one
 * function of src/runtime called from a lower layer (budget.c): a wake-up, nothing more.
 */
#ifndef KEEL_RUNTIME_LIFECYCLE_H
#define KEEL_RUNTIME_LIFECYCLE_H

#include "runtime/internal.h"

keel_err keel__life_start(keel_runtime *rt); /* create: after the workers, before load_all */
void keel__life_stop(keel_runtime *rt);      /* first step of destroy */
/* Any thread, any lock: wakes the lifecycle thread (an eventfd write). */
void keel__life_wake(keel_runtime *rt);
void keel__watch_snapshot(keel_runtime *rt); /* create, POLL mode, before the first loads */
void keel__watch_free(keel_runtime *rt);     /* runtime_free, no thread left */

#endif
