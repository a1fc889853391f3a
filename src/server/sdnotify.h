/*
 * sdnotify.h: systemd's service notification protocol for `keel serve` (sdnotify.c).
 *
 * DESIGN
 * Through libsystemd's sd_notify (Debian libsystemd-dev): READY=1 once the start set of
 * models is loaded and the server listens, STOPPING=1 when the drain begins, STATUS= lines at
 * each stage, and WATCHDOG=1 from a thread of its own while the server makes progress. All of
 * it does nothing when NOTIFY_SOCKET is unset (not started by systemd). Calls only server_log.c
 * below it. The watchdog's progress check is a real request: every half WatchdogSec it sends
 * GET /v2/health/live to the server's own port over loopback, with a deadline of a quarter
 * WatchdogSec, and pings only when the answer is 200, so a wedged HTTP loop (or a process
 * that cannot accept) stops the pings and systemd restarts keel.
 * Threads: the notify functions from the main thread; the watchdog thread is started and
 * stopped by the main thread (stop wakes it through a pipe and joins it).
 */
#ifndef KEEL_SERVER_SDNOTIFY_H
#define KEEL_SERVER_SDNOTIFY_H

#include <stdbool.h>

#include "keel/keel.h"

typedef struct keel__srv_watchdog keel__srv_watchdog;

/* Sends one notification ("READY=1", "STOPPING=1", ...) followed by STATUS=<status> when status
 * is not NULL. No-op without NOTIFY_SOCKET. */
void keel__srv_notify(const char *state, const char *status);

/* Starts the watchdog thread if systemd asked for one (WATCHDOG_USEC; sd_watchdog_enabled);
 * *out stays NULL otherwise. v6 says whether the server listens on IPv6; the probe goes to the
 * loopback address of that family and the given port. On KEEL_OK the caller owns *out. */
keel_err keel__srv_watchdog_start(bool v6, unsigned port, keel__srv_watchdog **out);
/* Stops and joins the watchdog thread; NULL is fine. */
void keel__srv_watchdog_stop(keel__srv_watchdog *w);

#endif
