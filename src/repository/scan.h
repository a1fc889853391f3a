/*
 * scan.h: reading the shape of a model repository on disk: which entries are models, and a
 * signature of each model's files, for the repository watcher (runtime/lifecycle.c).
 *
 * DESIGN
 * A model's signature is a hash over (relative path, mtime in ns, size) of its config.json
 * and/or config.pbtxt and of every file under its numeric version folders (to a depth of 8),
 * combined with an order-independent sum so that directory order does not matter. Names starting
 * with '.' are skipped at every level, so a deploy that copies into ".tmp-3" (or "3.tmp", which is
 * not a numeric version folder) and renames it to "3" never shows a half-copied version. Pure
 * functions over the file system: no locks, no threads, no state.
 */
#ifndef KEEL_REPOSITORY_SCAN_H
#define KEEL_REPOSITORY_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A repository entry that may be a model: one path component, not hidden, printable. */
bool keel__repo_name_ok(const char *name);

/* The signature of <repo>/<name>; false if it is not a model (no config.json or
 * config.pbtxt) or on ENOMEM. */
bool keel__repo_signature(const char *repo, const char *name, uint64_t *out);

/* Total size of the regular files under <model_dir>/<v> for each of the versions. */
uint64_t keel__repo_version_bytes(const char *model_dir, const int64_t *versions, size_t n);

/* Calls fn(dir, user) for <repo>/<name> and each numeric version folder in it (the folders a
 * watcher should watch). */
void keel__repo_model_dirs(const char *repo, const char *name,
                           void (*fn)(const char *dir, void *user), void *user);

#endif
