/*
 * server_control.h: the job threads of `keel serve` (server_control.c): model control and
 * scrapes.
 *
 * DESIGN
 * Initialised, started, fed and stopped by server.c (main thread, HTTP loops) and
 * grpc_server.c (its completion-queue thread enqueues control jobs). A finished job is
 * answered through the completion server.c hands down at start, the one call from here back
 * up into server.c (a callback pointer, so the file graph stays one-way).
 */
#ifndef KEEL_SERVER_SERVER_CONTROL_H
#define KEEL_SERVER_SERVER_CONTROL_H

#include <stdbool.h>

#include "server_internal.h"

/* The queue's lock and condition variable (0, or an errno value); fini after its stop. */
int keel__srv_jobq_init(srv_jobq *q, keel_srv *s, const char *name);
void keel__srv_jobq_fini(srv_jobq *q);
/* Starts q's thread. done records a job's outcome and resumes its connection; it is called
 * exactly once per queued job, from the job thread or from keel__srv_jobq_stop's caller, with
 * no server lock held. Both queues get the same done. */
keel_err keel__srv_jobq_start(srv_jobq *q, void (*done)(srv_conn *c, keel_err status));
/* Stops q's thread: jobs not started are answered 503; waits for the current one. Safe on
 * a queue whose thread never started. */
void keel__srv_jobq_stop(srv_jobq *q);
/* Queues c (state SUBMITTED); false if the thread is stopping or not running (c untouched). */
bool keel__srv_jobq_enqueue(srv_jobq *q, srv_conn *c);

#endif
