/*
 * server_control.h: the model-control thread of `keel serve` (server_control.c).
 *
 * DESIGN
 * Started, fed and stopped by server.c (main thread and MHD threads). A finished job is
 * answered through the completion server.c hands down at start, the one call from here back
 * up into server.c (a callback pointer, so the file graph stays one-way).
 */
#ifndef KEEL_SERVER_SERVER_CONTROL_H
#define KEEL_SERVER_SERVER_CONTROL_H

#include <stdbool.h>

#include "server_internal.h"

/* Starts the thread. done records a job's outcome and resumes its connection; it is called
 * exactly once per queued job, from the control thread or from keel__srv_control_stop's
 * caller, with no server lock held. */
keel_err keel__srv_control_start(keel_srv *s, void (*done)(srv_conn *c, keel_err status));
/* Stops the control thread: jobs not started are answered 503; waits for the current one. */
void keel__srv_control_stop(keel_srv *s);
/* Queues c (state SUBMITTED); false if the thread is stopping (c untouched). */
bool keel__srv_control_enqueue(keel_srv *s, srv_conn *c);

#endif
