/*
 * grpc_server.h: the gRPC front end of `keel serve` (--grpc-port); see grpc_server.c.
 * All three are called by keel_server_run() on the main thread.
 */
#ifndef KEEL_SERVER_GRPC_SERVER_H
#define KEEL_SERVER_GRPC_SERVER_H

#include "keel/keel.h"

typedef struct keel_srv keel_srv;

/* Initialises gRPC, binds --grpc-address:--grpc-port (a port in use is an error: no
 * SO_REUSEPORT) and starts the completion-queue thread. Must run after the runtime was
 * created (its fork server is forked before any gRPC thread exists). Logs why on failure;
 * then nothing is left running. */
keel_err keel__grpc_start(keel_srv *s);
/* The stdout line "level=info msg=listening protocol=grpc address=A port=P" (after HTTP's). */
void keel__grpc_print_listening(keel_srv *s);
/* Stops accepting calls, cancels keel requests still in flight, waits for every call to end
 * and shuts gRPC down. Runs after the drain; accepts a server without gRPC. */
void keel__grpc_stop(keel_srv *s);

#endif
