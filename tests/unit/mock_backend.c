/* mock_backend.c: see mock_backend.h. */
#include "mock_backend.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "testutil.h"

#define MAX_IDS 100000

mock_stats mock;

static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static bool gate_closed;
static int gate_blocked;
static _Atomic long next_model_id, next_ctx_id, last_run_ctx;
static _Atomic long model_frees_by_id[MAX_IDS];
static _Atomic bool ctx_dead[MAX_IDS];

typedef struct mock_model {
    long id;
    double k;
    size_t estimate; /* what memory_estimate reports (0: its own size) */
} mock_model;

typedef struct mock_ctx {
    long id;
    mock_model *model;
    float *out;
    size_t cap;
} mock_ctx;

static _Atomic long run_us; /* mock_set_run_us */

/* The call log (mock_calls): runs other than warm-ups, in the order they started. */
#define MAX_CALLS 4096
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static mock_call call_log[MAX_CALLS];
static size_t ncalls;

size_t mock_calls(mock_call *out, size_t max)
{
    size_t n;

    pthread_mutex_lock(&log_mu);
    n = ncalls < max ? ncalls : max;
    memcpy(out, call_log, n * sizeof(*out));
    pthread_mutex_unlock(&log_mu);
    return n;
}

static void log_call(const keel_tensor_view *x)
{
    struct timespec ts;
    mock_call c = {0};

    clock_gettime(CLOCK_MONOTONIC, &ts);
    c.t_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    c.rows = x->ndim > 0 ? x->shape[0] : 1;
    c.cols = x->ndim > 1 ? x->shape[1] : 1;
    for (int64_t r = 0; r < c.rows && r < MOCK_CALL_ROWS; r++)
        c.first[r] = ((const float *)x->data)[r * c.cols];
    pthread_mutex_lock(&log_mu);
    if (ncalls < MAX_CALLS)
        call_log[ncalls++] = c;
    pthread_mutex_unlock(&log_mu);
}

void mock_reset(void)
{
    atomic_store(&run_us, 0);
    atomic_store(&mock.loads, 0);
    atomic_store(&mock.model_frees, 0);
    atomic_store(&mock.ctx_creates, 0);
    atomic_store(&mock.ctx_destroys, 0);
    atomic_store(&mock.runs, 0);
    atomic_store(&mock.double_frees, 0);
    atomic_store(&mock.destroyed_ctx_used, 0);
    pthread_mutex_lock(&log_mu);
    ncalls = 0;
    pthread_mutex_unlock(&log_mu);
}

void mock_gate_close(void)
{
    pthread_mutex_lock(&gate_mu);
    gate_closed = true;
    pthread_mutex_unlock(&gate_mu);
}

void mock_gate_open(void)
{
    pthread_mutex_lock(&gate_mu);
    gate_closed = false;
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
}

void mock_wait_blocked(int n)
{
    for (int i = 0; i < 10000; i++) {
        pthread_mutex_lock(&gate_mu);
        int b = gate_blocked;
        pthread_mutex_unlock(&gate_mu);
        if (b >= n)
            return;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    fail_msg("timed out waiting for %d runs at the gate", n);
}

long mock_last_model_id(void)
{
    return atomic_load(&next_model_id);
}

long mock_ctx_id_of_last_run(void)
{
    return atomic_load(&last_run_ctx);
}

long mock_model_free_count(long model_id)
{
    return model_id > 0 && model_id < MAX_IDS ? atomic_load(&model_frees_by_id[model_id]) : -1;
}

bool mock_ctx_destroyed(long ctx_id)
{
    return ctx_id > 0 && ctx_id < MAX_IDS && atomic_load(&ctx_dead[ctx_id]);
}

static keel_err mock_load(const keel__model_config *cfg, const char *dir, void **out, char *errbuf,
                          size_t errlen)
{
    char path[4096];
    FILE *f;
    mock_model *m;
    double k;
    unsigned long estimate = 0;
    long load_ms = 0;

    (void)cfg;
    snprintf(path, sizeof(path), "%s/model.txt", dir);
    if ((f = fopen(path, "r")) == NULL) {
        snprintf(errbuf, errlen, "%s: cannot open", path);
        return KEEL_ELOAD;
    }
    if (fscanf(f, "%lf", &k) != 1) {
        fclose(f);
        snprintf(errbuf, errlen, "%s: not a number", path);
        return KEEL_ELOAD;
    }
    /* Optional: the memory the model claims to hold, and how long loading takes. */
    if (fscanf(f, "%lu %ld", &estimate, &load_ms) < 1)
        estimate = 0;
    fclose(f);
    if (load_ms > 0) {
        struct timespec ts = {load_ms / 1000, (load_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if ((m = calloc(1, sizeof(*m))) == NULL)
        return KEEL_ENOMEM;
    m->id = atomic_fetch_add(&next_model_id, 1) + 1;
    m->k = k;
    m->estimate = estimate;
    atomic_fetch_add(&mock.loads, 1);
    *out = m;
    return KEEL_OK;
}

static keel_err mock_ctx_create(void *model, const keel__model_config *cfg, void **out,
                                char *errbuf, size_t errlen)
{
    mock_ctx *c = calloc(1, sizeof(*c));

    (void)cfg;
    (void)errbuf;
    (void)errlen;
    if (c == NULL)
        return KEEL_ENOMEM;
    c->id = atomic_fetch_add(&next_ctx_id, 1) + 1;
    c->model = model;
    atomic_fetch_add(&mock.ctx_creates, 1);
    *out = c;
    return KEEL_OK;
}

void mock_set_run_us(long us)
{
    atomic_store(&run_us, us);
}

static keel_err mock_run(void *ctxp, keel__run_io *io)
{
    mock_ctx *c = ctxp;
    const keel_tensor_view *x = &io->inputs[0];
    size_t n = x->bytes / sizeof(float);

    if (n == 0 || ((const float *)x->data)[0] != 0.0f) {
        atomic_fetch_add(&mock.runs, 1); /* warm-ups are not counted */
        log_call(x);
    }
    if (mock_ctx_destroyed(c->id))
        atomic_fetch_add(&mock.destroyed_ctx_used, 1);
    atomic_store(&last_run_ctx, c->id);
    /* keel's warm-up inference sends zeros; it passes the gate so reloads can proceed. */
    bool warmup = n > 0 && ((const float *)x->data)[0] == 0.0f;
    pthread_mutex_lock(&gate_mu);
    gate_blocked++;
    while (gate_closed && !warmup)
        pthread_cond_wait(&gate_cv, &gate_mu);
    gate_blocked--;
    pthread_mutex_unlock(&gate_mu);
    if (!warmup && ((const float *)x->data)[0] >= MOCK_SLOW) {
        /* A row that asks for a slow run: value - MOCK_SLOW milliseconds. */
        long ms = (long)(((const float *)x->data)[0] - MOCK_SLOW);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (!warmup && atomic_load(&run_us) > 0) {
        long us = atomic_load(&run_us);
        struct timespec ts = {us / 1000000, (us % 1000000) * 1000L};
        nanosleep(&ts, NULL);
    }
    if (n > c->cap) {
        float *p = realloc(c->out, n * sizeof(float));
        if (p == NULL)
            return KEEL_ENOMEM;
        c->out = p;
        c->cap = n;
    }
    for (size_t i = 0; i < n; i++) {
        if (((const float *)x->data)[i] == MOCK_POISON) {
            snprintf(io->errbuf, io->errlen, "mock: poisoned value in row %zu", i);
            return KEEL_EBACKEND;
        }
        c->out[i] = ((const float *)x->data)[i] * (float)c->model->k;
    }
    return io->emit(io, "y", KEEL_TYPE_FP32, x->shape, x->ndim, c->out, n * sizeof(float));
}

static void mock_ctx_destroy(void *ctxp)
{
    mock_ctx *c = ctxp;

    atomic_store(&ctx_dead[c->id], true);
    atomic_fetch_add(&mock.ctx_destroys, 1);
    free(c->out);
    free(c);
}

static void mock_free(void *model)
{
    mock_model *m = model;

    if (atomic_fetch_add(&model_frees_by_id[m->id], 1) != 0)
        atomic_fetch_add(&mock.double_frees, 1);
    atomic_fetch_add(&mock.model_frees, 1);
    free(m);
}

static size_t mock_mem(void *model)
{
    const mock_model *m = model;

    return m->estimate != 0 ? m->estimate : sizeof(mock_model);
}

const keel__backend mock_backend = {
    .name = "mock",
    .concurrent_contexts = true,
    .input_types = KEEL__TYPE_BIT(KEEL_TYPE_FP32),
    .model_load = mock_load,
    .context_create = mock_ctx_create,
    .run = mock_run,
    .context_destroy = mock_ctx_destroy,
    .model_free = mock_free,
    .memory_estimate = mock_mem,
};

void mock_write_model(const char *repo, const char *name, int instances, int max_queue,
                      long default_timeout_us)
{
    mock_write_model_keel(repo, name, instances, max_queue, default_timeout_us, "{}");
}

void mock_write_model_batching(const char *repo, const char *name, int instances,
                               int max_batch_size, const char *dynamic_batching)
{
    char *path = tu_strf("%s/%s/config.json", repo, name);
    char *text = tu_strf("{\"name\":\"%s\",\"backend\":\"mock\",\"max_batch_size\":%d,"
                         "\"input\":[{\"name\":\"x\",\"data_type\":\"TYPE_FP32\",\"dims\":[-1]}],"
                         "\"output\":[{\"name\":\"y\",\"data_type\":\"TYPE_FP32\",\"dims\":[-1]}],"
                         "\"instance_group\":[{\"count\":%d,\"kind\":\"KIND_CPU\"}]%s%s}",
                         name, max_batch_size, instances,
                         dynamic_batching != NULL ? ",\"dynamic_batching\":" : "",
                         dynamic_batching != NULL ? dynamic_batching : "");

    tu_write_file(path, text, (size_t)-1);
    free(path);
    free(text);
}

void mock_write_model_keel(const char *repo, const char *name, int instances, int max_queue,
                           long default_timeout_us, const char *keel_json)
{
    char *path = tu_strf("%s/%s/config.json", repo, name);
    char *text = tu_strf("{\"name\":\"%s\",\"backend\":\"mock\",\"max_batch_size\":8,\"keel\":%s,"
                         "\"input\":[{\"name\":\"x\",\"data_type\":\"TYPE_FP32\",\"dims\":[-1]}],"
                         "\"output\":[{\"name\":\"y\",\"data_type\":\"TYPE_FP32\",\"dims\":[-1]}],"
                         "\"instance_group\":[{\"count\":%d,\"kind\":\"KIND_CPU\"}],"
                         "\"dynamic_batching\":{\"default_queue_policy\":{\"max_queue_size\":%d,"
                         "\"default_timeout_microseconds\":%ld}}}",
                         name, keel_json, instances, max_queue, default_timeout_us);

    tu_write_file(path, text, (size_t)-1);
    free(path);
    free(text);
}

void mock_write_version(const char *repo, const char *name, long version, double k)
{
    mock_write_version_ex(repo, name, version, k, 0, 0);
}

void mock_write_version_ex(const char *repo, const char *name, long version, double k,
                           unsigned long estimate, long load_ms)
{
    char *path = tu_strf("%s/%s/%ld/model.txt", repo, name, version);
    char *text = tu_strf("%.17g %lu %ld\n", k, estimate, load_ms);

    tu_write_file(path, text, (size_t)-1);
    free(path);
    free(text);
}
