/*
 * server_routes.h: the synchronous endpoints of `keel serve` (server_routes.c).
 *
 * DESIGN
 * Called by server.c's handler on MHD threads; fills a reply (reply.h) that server.c sends.
 */
#ifndef KEEL_SERVER_SERVER_ROUTES_H
#define KEEL_SERVER_SERVER_ROUTES_H

#include "reply.h"
#include "server_internal.h"

/* Answers c's route (metadata, health, stats, index, config, metrics) into r. */
void keel__srv_route_sync(keel_srv *s, srv_conn *c, srv_reply *r);

#endif
