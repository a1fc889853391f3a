/*
 * sched.h: admission, queueing, dispatch, the worker threads and the one completion function.
 * Layer: above registry.c, request.c, preprocess.c, budget.c and generation.c (internal.h).
 */
#ifndef KEEL_RUNTIME_SCHED_H
#define KEEL_RUNTIME_SCHED_H

#include "runtime/internal.h"

void *keel__worker_main(void *arg); /* a worker thread (started by create) */
void *keel__timer_main(void *arg);  /* the timer thread (started by create) */
/* Stops and joins the timer thread (destroy, after the queues were drained). */
void keel__timer_stop(keel_runtime *rt);
/* Under rt->mu: copies cfg's queue policies into v (when a generation is published in it). */
void keel__vslot_set_policy_locked(keel__vslot *v, const keel__model_config *cfg);
/* Completes every request in the list linked by qnext (already unlinked, state COMPLETING). */
void keel__complete_list(keel_request *list, keel_err status, const char *why);
/* Under rt->mu: unlinks every queued request of v into *list (state COMPLETING). */
void keel__vslot_drain_locked(keel_runtime *rt, keel__vslot *v, keel_request **list);
/* Under rt->mu: moves the requests queued in from that asked for the newest version (-1) to
 * the tail of to's queue (a newer version of the same model that serves), with their
 * admission slots: a version leaving the policy must not fail requests that did not ask for
 * it. Requests for from's version itself stay. */
void keel__vslot_move_latest_locked(keel_runtime *rt, keel__vslot *from, keel__vslot *to);
/* Under rt->mu: puts v on the ready list if it can dispatch, and wakes a worker. */
void keel__vslot_kick_locked(keel_runtime *rt, keel__vslot *v);
/* The execution-time estimate (sched.c's DESIGN): a batch's size class, the estimate after
 * one more sample (est 0 = none yet), and whether an estimate is below bound_ns. */
int keel__est_class(int64_t batch);
uint64_t keel__est_update(uint64_t est, uint64_t sample_ns);
bool keel__est_is_fast(uint64_t est, uint64_t bound_ns);

#endif
