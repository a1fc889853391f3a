/*
 * mock_backend.h: a backend for tests. Model file <version>/model.txt holds a number k (and
 * optionally a claimed memory size and a load time in ms); output "y" = input "x" * k (FP32,
 * same shape). Runs can be held at a gate so tests can
 * keep a context busy (keel's warm-up runs, whose input is zero, pass it), and every call is
 * counted so tests can check exactly-once frees.
 */
#ifndef KEEL_MOCK_BACKEND_H
#define KEEL_MOCK_BACKEND_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backends/backend.h"

extern const keel__backend mock_backend;

typedef struct mock_stats {
    _Atomic long loads, model_frees, ctx_creates, ctx_destroys, runs, double_frees;
    _Atomic long destroyed_ctx_used; /* a run on a context that was destroyed: must stay 0 */
} mock_stats;

extern mock_stats mock;

/* One backend call (warm-ups excepted): when it started, its input's rows and columns, and
 * the first value of each of its first MOCK_CALL_ROWS rows. */
#define MOCK_CALL_ROWS 16
typedef struct mock_call {
    uint64_t t_ns; /* CLOCK_MONOTONIC */
    int64_t rows, cols;
    float first[MOCK_CALL_ROWS];
} mock_call;
/* Copies up to max calls of the log (cleared by mock_reset); returns how many. */
size_t mock_calls(mock_call *out, size_t max);
/* An input value that makes the run fail with KEEL_EBACKEND. */
#define MOCK_POISON (-7.0f)
/* A first input value of MOCK_SLOW + n makes the run take n more milliseconds. */
#define MOCK_SLOW 1000000.0f

void mock_reset(void);
/* While closed, runs wait at the gate. */
void mock_gate_close(void);
void mock_gate_open(void);
/* Waits until n runs are waiting at the gate (fails the test after 10 s). */
void mock_wait_blocked(int n);
/* Every run (warm-ups excepted) takes at least us microseconds from now on (0 = none). */
void mock_set_run_us(long us);
/* Context ids are unique per process; each run records the id of its context. */
long mock_ctx_id_of_last_run(void);
/* Id of the most recently loaded model. */
long mock_last_model_id(void);
/* Frees of a given model id (by load order, from 1): must be exactly 1 once it is gone. */
long mock_model_free_count(long model_id);
/* Whether the context id has been destroyed. */
bool mock_ctx_destroyed(long ctx_id);

/* Writes <repo>/<name>/config.json for the mock backend (x, y FP32 dims [-1], batch 8). */
void mock_write_model(const char *repo, const char *name, int instances, int max_queue,
                      long default_timeout_us);
/* The same with config.json's "keel" object set to keel_json (e.g. {"pinned":true}). */
void mock_write_model_keel(const char *repo, const char *name, int instances, int max_queue,
                           long default_timeout_us, const char *keel_json);
/* The same with max_batch_size and a "dynamic_batching" section (JSON text; NULL = none). */
void mock_write_model_batching(const char *repo, const char *name, int instances,
                               int max_batch_size, const char *dynamic_batching);
/* Writes <repo>/<name>/<version>/model.txt with factor k. */
void mock_write_version(const char *repo, const char *name, long version, double k);
/* The same, with the memory the model claims (memory_estimate; 0 = its own size) and a load
 * time in milliseconds. */
void mock_write_version_ex(const char *repo, const char *name, long version, double k,
                           unsigned long estimate, long load_ms);

#endif
