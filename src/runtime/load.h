/*
 * load.h: loading a model (all its versions, one generation each) and unloading it.
 * Layer: above sched.c, below lifecycle.c (internal.h).
 */
#ifndef KEEL_RUNTIME_LOAD_H
#define KEEL_RUNTIME_LOAD_H

#include "runtime/internal.h"

/* Loads name on the calling thread (an API caller or the lifecycle thread), no lock held.
 * evicted_reload marks a reload a request asked for (a no-op if the model is not evicted any
 * more). keel_model_load is this with evicted_reload false. */
keel_err keel__model_load(keel_runtime *rt, const char *name, bool evicted_reload, char *errbuf,
                          size_t errlen);
/* Under rt->mu: unlinks v from its entry: retires its generation (returned in *old for
 * release after unlocking), drains its queue into *drained, and marks it removed. Returns v
 * if nothing is in flight, meaning the caller frees it after unlocking. */
keel__vslot *keel__vslot_remove_locked(keel_runtime *rt, keel__vslot *v, keel__generation **old,
                                       keel_request **drained);

#endif
