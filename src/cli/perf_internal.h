/*
 * perf_internal.h: what `keel` (keel.c), `keel perf` (perf.c) and `keel soak` (soak.c) share:
 * their exit codes and entry points, and the load-tool library they are built on.
 *
 * DESIGN
 * The load generator itself lives in src/perf/ (the keel_perf library), one concern per
 * file: perf_hist (latency histogram), perf_http (response framer, target), perf_client
 * (blocking client), perf_bodies (request bodies), perf_load (the epoll load loop),
 * perf_util (clock, error text). The command-line helpers are src/cliutil's. Both commands
 * run on the main thread; soak adds its own threads (soak.c).
 */
#ifndef KEEL_CLI_PERF_INTERNAL_H
#define KEEL_CLI_PERF_INTERNAL_H

#include "cliutil.h"
#include "perf_bodies.h"
#include "perf_client.h"
#include "perf_hist.h"
#include "perf_http.h"
#include "perf_load.h"
#include "perf_util.h"

enum { PERF_EXIT_OK = 0, PERF_EXIT_RUNTIME = 1, PERF_EXIT_USAGE = 2, PERF_EXIT_VERDICT = 3 };

int keel_perf_main(int argc, char **argv);
int keel_soak_main(int argc, char **argv);

#endif
