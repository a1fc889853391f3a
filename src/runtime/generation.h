/*
 * generation.h: building, referencing and freeing generations; the reaper thread.
 * Layer: above registry.c and budget.c (internal.h).
 */
#ifndef KEEL_RUNTIME_GENERATION_H
#define KEEL_RUNTIME_GENERATION_H

#include "runtime/internal.h"

/* Builds a complete generation (load, contexts, warm-up) for one version; no lock held. */
keel_err keel__generation_build(keel_runtime *rt, keel__model_entry *e, int64_t version,
                                keel__generation **out, char *errbuf, size_t errlen);
void keel__generation_acquire(keel__generation *g);
/* Drops one reference; the last one hands g to the reaper. Never call with rt->mu held. */
void keel__generation_release(keel__generation *g);
void *keel__reaper_main(void *arg);       /* the reaper thread (started by create) */
void keel__reaper_stop(keel_runtime *rt); /* destroy, once no generation is left */

#endif
