/* testutil.h: helpers shared by the unit tests (temp directories, files, commands). */
#ifndef KEEL_TESTUTIL_H
#define KEEL_TESTUTIL_H

#include <setjmp.h> /* cmocka needs these first */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "keel/keel.h"

/* Creates a fresh directory under $TMPDIR; returns a malloc'd path. Fails the test on error. */
char *tu_mkdtemp(const char *tag);
/* Removes a directory tree (like rm -rf). */
void tu_rm_rf(const char *path);
/* mkdir -p */
void tu_mkdirs(const char *path);
/* Writes len bytes (or strlen(text) if len is (size_t)-1) to path; creates parent dirs. */
void tu_write_file(const char *path, const void *data, size_t len);
/* Copies a file; creates parent dirs. */
void tu_copy_file(const char *from, const char *to);
/* Reads a whole file into a malloc'd NUL-terminated buffer; *len may be NULL. */
char *tu_read_file(const char *path, size_t *len);
/* Runs a shell command; returns its exit status (or -1). */
int tu_run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* snprintf into a malloc'd string. */
char *tu_strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Number of open file descriptors of this process. */
int tu_count_fds(void);
/* Asserts the runtime's counters equal want, after keel_runtime_quiesce (deterministic). */
void tu_assert_counters(keel_runtime *rt, const keel_counters *want);

/* heart_scale (Debian liblinear-tools) as dense rows: 13 features, absent ones NaN; labels
 * mapped to 1/0. Returns the row count; *x (n*13) and *y (n) are malloc'd. */
#define TU_HEART_FEATURES 13
int tu_heart_rows(float **x, float **y);
/* Trains an XGBoost model on heart_scale with the xgboost command-line tool into
 * <dir>/<model_name> (".json" or ".ubj"); extra is appended to the tool's config (lines
 * "key = value"). Returns 0 on success. Skips the test if the tool is missing. */
int tu_train_heart(const char *dir, const char *model_name, const char *extra);

#endif
