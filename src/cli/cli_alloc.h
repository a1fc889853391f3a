/*
 * cli_alloc.h: the allocator settings compiled into the keel program (jemalloc_conf.c).
 *
 * DESIGN
 * Only a declaration: jemalloc looks the symbol up by name. Nothing in keel reads it.
 */
#ifndef KEEL_CLI_ALLOC_H
#define KEEL_CLI_ALLOC_H

#define KEEL_JEMALLOC_CONF "narenas:2,dirty_decay_ms:250,muzzy_decay_ms:0"

extern const char *malloc_conf;

#endif
