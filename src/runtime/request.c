/*
 * request.c: the request object: inputs, requested outputs, parameters, results.
 *
 * DESIGN
 * A request is owned by its caller. Its builder functions (add_input, ...) and result
 * accessors touch only the request and need no lock; the caller must not use one request
 * from two threads, nor modify it while it is in flight (state != IDLE, checked under rt->mu
 * by submit). Inputs are validated twice: structurally when added (shape, element count,
 * byte size, BYTES framing, duplicate names), and against the generation's config when the
 * request is dispatched (keel__request_bind_inputs), because only then is it known which
 * generation, and so which config, the request runs on. While the backend runs, outputs go
 * to the request's run slot (request.h), which hands them over when the backend returns; a
 * request answered before that (sched.c: a deadline or cancel while running) gives its
 * inputs, views and requested names to the slot and keeps none (a resubmit must add its
 * inputs again).
 *
 * Outputs are recycled: clearing a request's outputs (before each run, on failure) keeps
 * their allocations (name, shape, data) in req->outputs[noutputs..kept_outputs), and the next
 * run's outputs are written into them when they fit (emit_to). A request resubmitted in a
 * loop therefore allocates and frees nothing for its outputs after its first run. That
 * matters beyond the allocator's own cost: with glibc's allocator, a buffer allocated by one
 * worker thread and freed by another (a request run by a different worker each time) moves
 * chunks between the threads' caches on every request, and the slow paths it forces (arena
 * locks taken by both threads) slowed the backend's own allocations on two workers by about
 * 1.6 us of CPU per request (docs/PERFORMANCE.md, "Session 6"). A kept buffer is replaced when it
 * is too small, or more than twice the size needed plus 64 KiB (a request that once got a large
 * output does not keep it for small ones); everything is freed with the request, or with
 * the run slot of a detached request.
 *
 * Destroyed requests are kept for reuse, per thread: keel_request_destroy clears the request
 * (its inputs' data freed, a borrowed input's released then, as before; requested names and
 * parameters freed) but keeps its arrays, its inputs' names and shapes (inputs[ninputs..
 * kept_inputs), refilled by the next add_input), its id's buffer (up to REQ_KEEP_ID bytes),
 * its recycled outputs and its model name, and puts it in the
 * calling thread's cache (at most REQ_CACHE_MAX; beyond that it is freed); keel_request_create
 * on that thread takes one back and resets every other field to what a new request has; a
 * thread that never created a request (an inference thread destroying requests in their
 * callbacks) keeps none, since it would never take them back. A
 * server's I/O thread creates and destroys a request per HTTP or gRPC call, and freeing and
 * allocating its dozen blocks each time was about 2k instructions of a batched batch-1
 * request (callgrind, session 10). The live counter `requests` counts requests between create
 * and destroy, cached ones not. Owner of a cached request: its thread's cache; release path:
 * the thread's exit (a pthread key's destructor frees the cache; the main thread's cache is
 * reachable from its TLS until the process ends). A cached request keeps outputs of at most
 * REQ_CACHE_KEEP_BYTES of data (larger ones are freed at destroy), so a cache holds at most
 * about REQ_CACHE_MAX small requests. AddressSanitizer builds keep no cache (a use after
 * destroy must stay a use after free there). No lock: each cache belongs to one thread.
 * Layer: calls registry.c (counters) only.
 */
#include <stddef.h>
#include <string.h>

#include "runtime/registry.h"
#include "runtime/request.h"

#if defined(__SANITIZE_ADDRESS__)
#define REQ_CACHE_MAX 0u
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define REQ_CACHE_MAX 0u
#endif
#endif
#ifndef REQ_CACHE_MAX
#define REQ_CACHE_MAX 64u /* a batch of an HTTP turn at 64 connections is about 50 requests */
#endif
#define REQ_CACHE_KEEP_BYTES 4096u
#define REQ_KEEP_ID 256u /* an id buffer larger than this is not kept */

/* This thread's destroyed requests, linked through qnext (the DESIGN above). */
typedef struct req_cache {
    keel_request *head;
    unsigned n;
    bool creates; /* this thread has created a request: only such a thread keeps any */
    bool keyed;   /* the exit destructor is registered for this thread */
} req_cache;

static _Thread_local req_cache tl_req_cache;
static pthread_key_t req_cache_key;
static pthread_once_t req_cache_once = PTHREAD_ONCE_INIT;
static bool req_cache_key_ok;

static void outputs_free(keel__tensor *outputs, size_t kept);

/* Makes *s a copy of v unless it already is one (kept: names of reused requests and recycled
 * outputs); false, *s unchanged, when out of memory. */
static bool restring(char **s, const char *v)
{
    char *n;

    if (strcmp(*s, v) == 0)
        return true;
    if ((n = keel__strdup(v)) == NULL)
        return false;
    free(*s);
    *s = n;
    return true;
}

/* Frees a request with everything it holds (its inputs, names, parameters and id already
 * freed or never set). */
static void request_free(keel_request *req)
{
    for (size_t i = 0; i < req->kept_inputs; i++)
        keel__tensor_fini(&req->inputs[i]); /* names and shapes only: data went at destroy */
    free(req->inputs);
    free(req->id_keep);
    outputs_free(req->outputs, req->kept_outputs);
    free(req->requested);
    free(req->params);
    free(req->views);
    free(req->model);
    pthread_mutex_destroy(&req->wait_mu);
    pthread_cond_destroy(&req->wait_cv);
    free(req);
}

static void req_cache_exit(void *arg)
{
    req_cache *c = arg;
    keel_request *req;

    while ((req = c->head) != NULL) {
        c->head = req->qnext;
        request_free(req);
    }
    c->n = 0;
    c->creates = false; /* a request destroyed later in this thread's exit is freed */
}

static void req_cache_key_init(void)
{
    req_cache_key_ok = pthread_key_create(&req_cache_key, req_cache_exit) == 0;
}

/* A cached request, reset to a new one's state for (rt, version), or NULL. */
static keel_request *req_cache_take(keel_runtime *rt, const char *model, int64_t version)
{
    req_cache *c = &tl_req_cache;
    keel_request *req = c->head;
    keel_request kept;

    c->creates = true;
    if (req == NULL || !restring(&req->model, model))
        return NULL;
    c->head = req->qnext;
    c->n--;
    /* Everything before wait_mu back to zero, but for the allocations a request keeps. */
    kept = *req;
    memset(req, 0, offsetof(keel_request, wait_mu));
    req->model = kept.model;
    req->id_keep = kept.id_keep;
    req->id_cap = kept.id_cap;
    req->inputs = kept.inputs;
    req->cap_inputs = kept.cap_inputs;
    req->kept_inputs = kept.kept_inputs;
    req->requested = kept.requested;
    req->cap_requested = kept.cap_requested;
    req->params = kept.params;
    req->cap_params = kept.cap_params;
    req->outputs = kept.outputs;
    req->cap_outputs = kept.cap_outputs;
    req->kept_outputs = kept.kept_outputs;
    req->views = kept.views;
    req->cap_views = kept.cap_views;
    req->wait_done = false;
    req->rt = rt;
    req->version = version;
    req->ctx_index = -1;
    req->ran_version = -1;
    return req;
}

/* Keeps a destroyed (cleared) request in this thread's cache; false if it is full. */
static bool req_cache_put(keel_request *req)
{
    req_cache *c = &tl_req_cache;

    if (c->n >= REQ_CACHE_MAX || !c->creates)
        return false;
    if (!c->keyed) {
        pthread_once(&req_cache_once, req_cache_key_init);
        if (!req_cache_key_ok || pthread_setspecific(req_cache_key, c) != 0)
            return false;
        c->keyed = true;
    }
    req->qnext = c->head;
    c->head = req;
    c->n++;
    return true;
}

unsigned keel__request_cache_cap(void)
{
    return REQ_CACHE_MAX;
}

unsigned keel__request_cached(void)
{
    return tl_req_cache.n;
}

keel_err keel_request_create(keel_runtime *rt, const char *model, int64_t version,
                             keel_request **out)
{
    keel_request *req = NULL;

    if (out != NULL)
        *out = NULL;
    if (rt == NULL || model == NULL || out == NULL || version < -1)
        return KEEL_EINVAL;
    if ((req = req_cache_take(rt, model, version)) != NULL) {
        keel__counter_add(rt, NULL, KEEL__CNT(requests), 1);
        *out = req;
        return KEEL_OK;
    }
    if ((req = keel__calloc(1, sizeof(*req))) == NULL)
        goto nomem;
    req->rt = rt;
    req->version = version;
    req->ctx_index = -1;
    req->ran_version = -1;
    if ((req->model = keel__strdup(model)) == NULL)
        goto nomem;
    pthread_mutex_init(&req->wait_mu, NULL);
    pthread_cond_init(&req->wait_cv, NULL);
    keel__counter_add(rt, NULL, KEEL__CNT(requests), 1);
    *out = req;
    return KEEL_OK;

nomem:
    if (req != NULL)
        free(req->model);
    free(req);
    return KEEL_ENOMEM;
}

/* Frees (or releases, once, when borrowed) a tensor's data; name and shape stay. */
static void tensor_drop_data(keel__tensor *t)
{
    if (t->release != NULL)
        t->release(t->release_arg); /* borrowed: handed back exactly once */
    else
        free(t->data);
    t->release = NULL;
    t->data = NULL;
    t->bytes = 0;
}

void keel__tensor_fini(keel__tensor *t)
{
    free(t->name);
    free(t->shape);
    tensor_drop_data(t);
}

#define tensor_fini keel__tensor_fini

/* How an input's data comes: copied, taken (owned: malloc'd, freed by the tensor) or
 * borrowed (release called once when the tensor is finalised). */
typedef struct data_src {
    void *owned;
    void (*release)(void *arg);
    void *release_arg;
} data_src;

static keel_err tensor_fill(keel__tensor *t, const int64_t *shape, size_t ndim, const void *data,
                            const data_src *src, size_t bytes);

/* Fills t with copies of name, shape and data (or takes src's data, owned or borrowed,
 * instead of copying it); on failure frees what it made, never src's data. */
static keel_err tensor_copy(keel__tensor *t, const char *name, keel_datatype dt,
                            const int64_t *shape, size_t ndim, const void *data,
                            const data_src *src, size_t bytes)
{
    bool take = src != NULL && (src->owned != NULL || src->release != NULL);

    memset(t, 0, sizeof(*t));
    t->datatype = dt;
    t->ndim = ndim;
    t->bytes = bytes;
    if ((t->name = keel__strdup(name)) == NULL ||
        (t->shape = keel__malloc(sizeof(int64_t) * (ndim ? ndim : 1))) == NULL ||
        (!take && (t->data = keel__malloc(bytes)) == NULL)) {
        tensor_fini(t);
        memset(t, 0, sizeof(*t));
        return KEEL_ENOMEM;
    }
    t->cap_dims = ndim ? ndim : 1;
    return tensor_fill(t, shape, ndim, data, src, bytes);
}

/* Makes t's name a copy of name and its shape room for dims dimensions, reusing its
 * allocations where they fit (a kept input or output); false, t still valid, when out of
 * memory. */
static bool tensor_rename(keel__tensor *t, const char *name, size_t dims)
{
    if (!restring(&t->name, name))
        return false;
    if (t->cap_dims < dims) {
        int64_t *p = keel__malloc(sizeof(int64_t) * dims);
        if (p == NULL)
            return false;
        free(t->shape);
        t->shape = p;
        t->cap_dims = dims;
    }
    return true;
}

/* Refills t, a kept input (a name and shape from an earlier use of the request, no data),
 * like tensor_copy, reusing its allocations where they fit. On failure t still holds valid
 * allocations (a name and shape) and no data, so it stays a kept input. */
static keel_err tensor_reuse(keel__tensor *t, const char *name, keel_datatype dt,
                             const int64_t *shape, size_t ndim, const void *data,
                             const data_src *src, size_t bytes)
{
    bool take = src != NULL && (src->owned != NULL || src->release != NULL);
    size_t dims = ndim ? ndim : 1;
    void *copy = NULL;

    if (!take && (copy = keel__malloc(bytes)) == NULL)
        return KEEL_ENOMEM;
    if (!tensor_rename(t, name, dims)) {
        free(copy);
        return KEEL_ENOMEM;
    }
    t->datatype = dt;
    t->ndim = ndim;
    t->bytes = bytes;
    t->data = copy;
    return tensor_fill(t, shape, ndim, data, src, bytes);
}

/* The rest of tensor_copy and tensor_reuse: shape and data into t (allocated). */
static keel_err tensor_fill(keel__tensor *t, const int64_t *shape, size_t ndim, const void *data,
                            const data_src *src, size_t bytes)
{
    bool take = src != NULL && (src->owned != NULL || src->release != NULL);

    if (ndim > 0)
        memcpy(t->shape, shape, sizeof(int64_t) * ndim);
    t->cap_bytes = take ? 0 : bytes;
    if (take && src->release != NULL) {
        t->data = (void *)data;
        t->release = src->release;
        t->release_arg = src->release_arg;
    } else if (take) {
        t->data = src->owned;
    } else if (bytes > 0) {
        memcpy(t->data, data, bytes);
    }
    return KEEL_OK;
}

/* Refills t, an output kept from an earlier run (see the DESIGN: outputs are recycled), with
 * a copy of the given one, reusing its allocations where they fit. On failure t keeps valid
 * (old) allocations, so it can still be finalised. */
static keel_err tensor_refill(keel__tensor *t, const char *name, keel_datatype dt,
                              const int64_t *shape, size_t ndim, const void *data, size_t bytes)
{
    size_t dims = ndim ? ndim : 1;

    if (!tensor_rename(t, name, dims))
        return KEEL_ENOMEM;
    if (bytes > t->cap_bytes || t->cap_bytes / 2 > bytes + 32768) {
        void *p = keel__malloc(bytes);
        if (p == NULL && bytes > 0)
            return KEEL_ENOMEM;
        free(t->data);
        t->data = p;
        t->cap_bytes = bytes;
    }
    t->datatype = dt;
    t->ndim = ndim;
    t->bytes = bytes;
    if (ndim > 0)
        memcpy(t->shape, shape, sizeof(int64_t) * ndim);
    if (bytes > 0)
        memcpy(t->data, data, bytes);
    return KEEL_OK;
}

void keel__request_clear_outputs(keel_request *req)
{
    req->noutputs = 0; /* recycled: outputs[0..kept_outputs) keep their allocations */
}

/* Frees the kept outputs outputs[0..kept) and the array. */
static void outputs_free(keel__tensor *outputs, size_t kept)
{
    for (size_t i = 0; i < kept; i++)
        tensor_fini(&outputs[i]);
    free(outputs);
}

void keel_request_destroy(keel_request *req)
{
    bool big = false;

    if (req == NULL)
        return;
    /* The state is written under rt->mu by other threads. A caller may destroy only a
     * request whose completion it has seen (its callback ran, or keel_infer returned), and
     * whatever told it so ordered the write of IDLE before this read; so the check needs no
     * lock (it cost a round trip on rt->mu per request). Atomic, so that a caller breaking
     * the rule is a race the thread sanitizer reports, besides the assertion. */
    keel__req_state st = __atomic_load_n(&req->state, __ATOMIC_ACQUIRE);
    KEEL__ASSERT(st == KEEL__REQ_IDLE); /* destroying an in-flight request */
    for (size_t i = 0; i < req->ninputs; i++)
        tensor_drop_data(&req->inputs[i]); /* name and shape kept (kept_inputs) */
    req->ninputs = 0;
    for (size_t i = 0; i < req->nrequested; i++)
        free(req->requested[i]);
    req->nrequested = 0;
    for (size_t i = 0; i < req->nparams; i++) {
        free(req->params[i].key);
        free(req->params[i].value);
    }
    req->nparams = 0;
    req->id = NULL; /* its buffer is kept, unless large */
    if (req->id_cap > REQ_KEEP_ID) {
        free(req->id_keep);
        req->id_keep = NULL;
        req->id_cap = 0;
    }
    keel__counter_add(req->rt, NULL, KEEL__CNT(requests), -1);
    for (size_t i = 0; i < req->kept_outputs; i++)
        big = big || req->outputs[i].cap_bytes > REQ_CACHE_KEEP_BYTES;
    if (big) {
        outputs_free(req->outputs, req->kept_outputs);
        req->outputs = NULL;
        req->cap_outputs = req->kept_outputs = 0;
    }
    req->noutputs = 0;
    if (!req_cache_put(req))
        request_free(req);
}

void keel__request_set_error(keel_request *req, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(req->errmsg, sizeof(req->errmsg), fmt, ap);
    va_end(ap);
}

/* Grows *arr (of elem-sized items) so it holds at least need; KEEL_ENOMEM on failure. */
static keel_err grow(void **arr, size_t *cap, size_t need, size_t elem)
{
    size_t ncap;
    size_t bytes;
    void *p;

    if (need <= *cap)
        return KEEL_OK;
    ncap = *cap == 0 ? 4 : *cap * 2;
    if (ncap < need)
        ncap = need;
    if (keel__mul_overflow_size(ncap, elem, &bytes))
        return KEEL_ENOMEM;
    if ((p = keel__realloc(*arr, bytes)) == NULL)
        return KEEL_ENOMEM;
    *arr = p;
    *cap = ncap;
    return KEEL_OK;
}

keel_err keel_request_set_id(keel_request *req, const char *id)
{
    size_t n;

    if (req == NULL || id == NULL)
        return KEEL_EINVAL;
    n = strlen(id) + 1;
    if (n > req->id_cap) { /* the kept buffer is too small: a new one */
        char *buf = keel__malloc(n);
        if (buf == NULL)
            return KEEL_ENOMEM;
        free(req->id_keep);
        req->id_keep = buf;
        req->id_cap = n;
    }
    memmove(req->id_keep, id, n); /* id may be the request's own */
    req->id = req->id_keep;
    return KEEL_OK;
}

const char *keel_request_id(const keel_request *req)
{
    return req != NULL && req->id != NULL ? req->id : "";
}

/* Counts the elements of a shape; false on a negative dim or overflow. */
static bool element_count(const int64_t *shape, size_t ndim, size_t *out)
{
    size_t n = 1;

    for (size_t i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (uint64_t)shape[i] > SIZE_MAX)
            return false;
        if (keel__mul_overflow_size(n, (size_t)shape[i], &n))
            return false;
    }
    *out = n;
    return true;
}

bool keel__bytes_skip(const unsigned char *p, size_t len, size_t from, size_t count, size_t *out)
{
    size_t off = from;

    for (size_t i = 0; i < count; i++) {
        uint32_t l;
        if (len - off < 4)
            return false;
        l = (uint32_t)p[off] | (uint32_t)p[off + 1] << 8 | (uint32_t)p[off + 2] << 16 |
            (uint32_t)p[off + 3] << 24;
        off += 4;
        if (len - off < l)
            return false;
        off += l;
    }
    *out = off;
    return true;
}

/* Checks BYTES framing: exactly n elements of <u32 little-endian length><bytes>. */
static bool bytes_framing_ok(const unsigned char *p, size_t len, size_t n)
{
    size_t end;

    return keel__bytes_skip(p, len, 0, n, &end) && end == len;
}

/* keel_request_add_input, _owned and _borrowed: src (NULL: copy) says how data is taken. */
static keel_err add_input(keel_request *req, const char *name, keel_datatype dt,
                          const int64_t *shape, size_t ndim, const void *data, const data_src *src,
                          size_t bytes)
{
    keel__tensor t;
    size_t n = 0;
    size_t want;
    keel_err err;

    if (req == NULL)
        return KEEL_EINVAL;
    if (name == NULL || name[0] == '\0') {
        keel__request_set_error(req, "input name must be a non-empty string");
        return KEEL_EINVAL;
    }
    if (dt <= KEEL_TYPE_INVALID || dt >= KEEL_TYPE_COUNT_) {
        keel__request_set_error(req, "input '%s': invalid datatype %d", name, (int)dt);
        return KEEL_EINVAL;
    }
    if (ndim > KEEL__MAX_DIMS + 1 || (ndim > 0 && shape == NULL)) {
        keel__request_set_error(req, "input '%s': %zu dimensions, at most %d allowed", name, ndim,
                                KEEL__MAX_DIMS + 1);
        return KEEL_EINVAL;
    }
    if (!element_count(shape, ndim, &n)) {
        keel__request_set_error(req,
                                "input '%s': shape has a negative dimension or its "
                                "element count overflows",
                                name);
        return KEEL_EINVAL;
    }
    if (bytes > 0 && data == NULL)
        return KEEL_EINVAL;
    if (dt == KEEL_TYPE_BYTES) {
        if (!bytes_framing_ok(data, bytes, n)) {
            keel__request_set_error(req,
                                    "input '%s': BYTES data does not hold exactly %zu "
                                    "length-prefixed elements",
                                    name, n);
            return KEEL_EINVAL;
        }
    } else if (keel__mul_overflow_size(n, keel_datatype_size(dt), &want) || want != bytes) {
        keel__request_set_error(req,
                                "input '%s': %zu bytes given, shape and datatype %s "
                                "need %zu elements of %zu bytes",
                                name, bytes, keel_datatype_name(dt), n, keel_datatype_size(dt));
        return KEEL_EINVAL;
    }
    for (size_t i = 0; i < req->ninputs; i++) {
        if (strcmp(req->inputs[i].name, name) == 0) {
            keel__request_set_error(req, "input '%s' given more than once", name);
            return KEEL_EINVAL;
        }
    }
    if (req->ninputs < req->kept_inputs) {
        if ((err = tensor_reuse(&req->inputs[req->ninputs], name, dt, shape, ndim, data, src,
                                bytes)) != KEEL_OK)
            return err;
        req->ninputs++;
        return KEEL_OK;
    }
    if ((err = grow((void **)&req->inputs, &req->cap_inputs, req->ninputs + 1,
                    sizeof(*req->inputs))) != KEEL_OK)
        return err;
    if ((err = tensor_copy(&t, name, dt, shape, ndim, data, src, bytes)) != KEEL_OK)
        return err;
    req->inputs[req->ninputs++] = t;
    req->kept_inputs = req->ninputs;
    return KEEL_OK;
}

keel_err keel_request_add_input(keel_request *req, const char *name, keel_datatype dt,
                                const int64_t *shape, size_t ndim, const void *data, size_t bytes)
{
    return add_input(req, name, dt, shape, ndim, data, NULL, bytes);
}

keel_err keel_request_add_input_owned(keel_request *req, const char *name, keel_datatype dt,
                                      const int64_t *shape, size_t ndim, void *data, size_t bytes)
{
    data_src src = {data, NULL, NULL};
    keel_err err;

    if (bytes == 0 || data == NULL) /* nothing worth taking: the copying path, then free */
        err = add_input(req, name, dt, shape, ndim, data, NULL, bytes);
    else
        err = add_input(req, name, dt, shape, ndim, data, &src, bytes);
    if (err == KEEL_OK && (bytes == 0 || data == NULL))
        free(data);
    return err;
}

keel_err keel_request_add_input_borrowed(keel_request *req, const char *name, keel_datatype dt,
                                         const int64_t *shape, size_t ndim, const void *data,
                                         size_t bytes, void (*release)(void *arg), void *arg)
{
    data_src src = {NULL, release, arg};

    if (release == NULL)
        return KEEL_EINVAL;
    if (bytes == 0 || data == NULL) { /* nothing to borrow: copy (nothing), then release */
        keel_err err = add_input(req, name, dt, shape, ndim, data, NULL, bytes);
        if (err == KEEL_OK)
            release(arg);
        return err;
    }
    return add_input(req, name, dt, shape, ndim, data, &src, bytes);
}

keel_err keel_request_add_output(keel_request *req, const char *name)
{
    char *copy;
    keel_err err;

    if (req == NULL || name == NULL || name[0] == '\0')
        return KEEL_EINVAL;
    for (size_t i = 0; i < req->nrequested; i++) {
        if (strcmp(req->requested[i], name) == 0)
            return KEEL_OK;
    }
    if ((err = grow((void **)&req->requested, &req->cap_requested, req->nrequested + 1,
                    sizeof(char *))) != KEEL_OK)
        return err;
    if ((copy = keel__strdup(name)) == NULL)
        return KEEL_ENOMEM;
    req->requested[req->nrequested++] = copy;
    return KEEL_OK;
}

keel_err keel_request_set_parameter(keel_request *req, const char *key, const char *value)
{
    char *k = NULL, *v = NULL;
    keel_err err;

    if (req == NULL || key == NULL || value == NULL || key[0] == '\0')
        return KEEL_EINVAL;
    if ((v = keel__strdup(value)) == NULL)
        return KEEL_ENOMEM;
    for (size_t i = 0; i < req->nparams; i++) {
        if (strcmp(req->params[i].key, key) == 0) {
            free(req->params[i].value);
            req->params[i].value = v;
            return KEEL_OK;
        }
    }
    if ((err = grow((void **)&req->params, &req->cap_params, req->nparams + 1,
                    sizeof(*req->params))) != KEEL_OK ||
        (k = keel__strdup(key)) == NULL) {
        free(v);
        return err != KEEL_OK ? err : KEEL_ENOMEM;
    }
    req->params[req->nparams].key = k;
    req->params[req->nparams].value = v;
    req->nparams++;
    return KEEL_OK;
}

const char *keel_request_parameter(const keel_request *req, const char *key)
{
    if (req == NULL || key == NULL)
        return NULL;
    for (size_t i = 0; i < req->nparams; i++) {
        if (strcmp(req->params[i].key, key) == 0)
            return req->params[i].value;
    }
    return NULL;
}

void keel_request_set_timeout_us(keel_request *req, uint64_t timeout_us)
{
    if (req != NULL)
        req->timeout_us = timeout_us;
}

void keel_request_set_priority(keel_request *req, uint32_t priority)
{
    if (req != NULL)
        req->priority = priority;
}

keel_err keel_request_status(const keel_request *req)
{
    return req != NULL ? req->status : KEEL_EINVAL;
}

const char *keel_request_error(const keel_request *req)
{
    return req != NULL ? req->errmsg : "";
}

uint64_t keel_request_generation_id(const keel_request *req)
{
    return req != NULL ? req->generation_id : 0;
}

int64_t keel_request_model_version(const keel_request *req)
{
    return req != NULL ? req->ran_version : -1;
}

void keel_request_timing_get(const keel_request *req, keel_request_timing *out)
{
    if (out == NULL)
        return;
    memset(out, 0, sizeof(*out));
    if (req == NULL || req->submit_ns == 0)
        return;
    out->submit_ns = req->submit_ns;
    out->dispatch_ns = req->dispatch_ns;
    out->input_end_ns = req->input_end_ns;
    out->output_start_ns = req->output_start_ns;
    out->complete_ns = req->complete_ns;
    out->preprocess_ns = req->preprocess_ns;
}

size_t keel_request_output_count(const keel_request *req)
{
    return req != NULL ? req->noutputs : 0;
}

static void view_of(const keel__tensor *t, keel_tensor_view *out)
{
    out->name = t->name;
    out->datatype = t->datatype;
    out->shape = t->shape;
    out->ndim = t->ndim;
    out->data = t->data;
    out->bytes = t->bytes;
}

keel_err keel_request_output(const keel_request *req, size_t i, keel_tensor_view *out)
{
    if (out != NULL)
        memset(out, 0, sizeof(*out));
    if (req == NULL || out == NULL)
        return KEEL_EINVAL;
    if (i >= req->noutputs)
        return KEEL_ENOTFOUND;
    view_of(&req->outputs[i], out);
    return KEEL_OK;
}

keel_err keel_request_output_by_name(const keel_request *req, const char *name,
                                     keel_tensor_view *out)
{
    if (out != NULL)
        memset(out, 0, sizeof(*out));
    if (req == NULL || name == NULL || out == NULL)
        return KEEL_EINVAL;
    for (size_t i = 0; i < req->noutputs; i++) {
        if (strcmp(req->outputs[i].name, name) == 0) {
            view_of(&req->outputs[i], out);
            return KEEL_OK;
        }
    }
    return KEEL_ENOTFOUND;
}

/* ---- dispatch-time validation and output delivery (worker thread, no lock) */

keel_err keel__request_bind_inputs(keel_request *req, const keel__model_config *cfg,
                                   uint32_t accepted_types, int64_t *batch)
{
    char got[128], want[128];
    int64_t b = -1;
    keel_err err;

    *batch = 1;
    for (size_t i = 0; i < req->ninputs; i++) {
        bool known = false;
        for (size_t j = 0; j < cfg->ninputs && !known; j++)
            known = strcmp(cfg->inputs[j].name, req->inputs[i].name) == 0;
        if (!known) {
            keel__request_set_error(req, "unexpected input '%s' for model '%s'",
                                    req->inputs[i].name, cfg->name);
            return KEEL_EINVAL;
        }
    }
    if ((err = grow((void **)&req->views, &req->cap_views, cfg->ninputs, sizeof(*req->views))) !=
        KEEL_OK) {
        keel__request_set_error(req, "out of memory binding inputs");
        return err;
    }
    for (size_t j = 0; j < cfg->ninputs; j++) {
        const keel__tensor_config *tc = &cfg->inputs[j];
        const keel__tensor *t = NULL;
        size_t off = cfg->max_batch_size > 0 ? 1 : 0;
        bool ok;

        for (size_t i = 0; i < req->ninputs && t == NULL; i++) {
            if (strcmp(req->inputs[i].name, tc->name) == 0)
                t = &req->inputs[i];
        }
        if (t == NULL) {
            keel__request_set_error(req, "missing input '%s' for model '%s'", tc->name, cfg->name);
            return KEEL_EINVAL;
        }
        if (t->datatype != tc->datatype) {
            keel__request_set_error(req, "input '%s': datatype %s does not match the model's %s",
                                    t->name, keel_datatype_name(t->datatype),
                                    keel_datatype_name(tc->datatype));
            return KEEL_EINVAL;
        }
        if ((accepted_types & KEEL__TYPE_BIT(t->datatype)) == 0) {
            keel__request_set_error(req, "input '%s': the %s backend does not accept %s", t->name,
                                    cfg->backend, keel_datatype_name(t->datatype));
            return KEEL_EINVAL;
        }
        ok = t->ndim == tc->ndims + off;
        for (size_t d = 0; ok && d < tc->ndims; d++)
            ok = tc->dims[d] == -1 || tc->dims[d] == t->shape[d + off];
        if (ok && off == 1) {
            if (t->shape[0] < 1 || t->shape[0] > cfg->max_batch_size) {
                keel__request_set_error(req, "input '%s': batch size %lld outside 1..%lld", t->name,
                                        (long long)t->shape[0], (long long)cfg->max_batch_size);
                return KEEL_EINVAL;
            }
            if (b != -1 && b != t->shape[0]) {
                keel__request_set_error(req,
                                        "input '%s': batch size %lld differs from the "
                                        "other inputs' %lld",
                                        t->name, (long long)t->shape[0], (long long)b);
                return KEEL_EINVAL;
            }
            b = t->shape[0];
        }
        if (!ok) {
            int64_t full[KEEL__MAX_DIMS + 1];
            full[0] = -1;
            memcpy(full + off, tc->dims, sizeof(int64_t) * tc->ndims);
            keel__format_dims(got, sizeof(got), t->shape, t->ndim);
            keel__format_dims(want, sizeof(want), full, tc->ndims + off);
            keel__request_set_error(req, "input '%s': shape %s does not match the model's %s",
                                    t->name, got, want);
            return KEEL_EINVAL;
        }
        view_of(t, &req->views[j]);
    }
    for (size_t i = 0; i < req->nrequested; i++) {
        bool known = false;
        for (size_t j = 0; j < cfg->noutputs && !known; j++)
            known = strcmp(cfg->outputs[j].name, req->requested[i]) == 0;
        if (!known) {
            keel__request_set_error(req, "unknown output '%s' requested from model '%s'",
                                    req->requested[i], cfg->name);
            return KEEL_EINVAL;
        }
    }
    if (b != -1)
        *batch = b;
    return KEEL_OK;
}

void keel__run_slot_begin(keel__run_slot *s, keel_request *req, void *group, int64_t rows)
{
    memset(s, 0, sizeof(*s));
    atomic_init(&s->phase, KEEL__RUN_BACKEND);
    s->group = group;
    s->req = req;
    s->rows = rows;
    keel__request_clear_outputs(req);
    s->outputs = req->outputs;
    s->cap_outputs = req->cap_outputs;
    s->kept_outputs = req->kept_outputs;
    req->outputs = NULL;
    req->cap_outputs = req->kept_outputs = 0;
    s->requested = req->requested;
    s->nrequested = req->nrequested;
}

void keel__run_slot_end(keel__run_slot *s, keel_request *req)
{
    KEEL__ASSERT(req->outputs == NULL);
    req->outputs = s->outputs;
    req->noutputs = s->noutputs;
    req->cap_outputs = s->cap_outputs;
    req->kept_outputs = s->kept_outputs;
    s->outputs = NULL;
    s->noutputs = s->cap_outputs = s->kept_outputs = 0;
    s->requested = NULL;
    s->nrequested = 0;
}

void keel__run_slot_take(keel__run_slot *s, keel_request *req)
{
    s->inputs = req->inputs;
    s->ninputs = req->kept_inputs; /* the kept ones past ninputs too: their names, shapes */
    s->views = req->views;
    s->cap_requested = req->cap_requested;
    req->inputs = NULL;
    req->ninputs = req->cap_inputs = req->kept_inputs = 0;
    req->views = NULL;
    req->cap_views = 0;
    req->requested = NULL;
    req->nrequested = req->cap_requested = 0;
}

void keel__run_slot_fini(keel__run_slot *s)
{
    /* Usually all NULL (the request took them back), and free(NULL) is ~40 instructions of
     * jemalloc's: a slot per request of a batch. */
    if (s->outputs != NULL)
        outputs_free(s->outputs, s->kept_outputs);
    for (size_t i = 0; i < s->ninputs; i++)
        tensor_fini(&s->inputs[i]);
    if (s->inputs != NULL)
        free(s->inputs);
    if (s->views != NULL)
        free(s->views);
    if (s->cap_requested > 0) { /* owned: taken from a detached request */
        for (size_t i = 0; i < s->nrequested; i++)
            free(s->requested[i]);
        free(s->requested);
    }
    memset(s, 0, sizeof(*s));
}

keel_err keel__request_emit_to(keel__run_slot *s, const char *name, keel_datatype dt,
                               const int64_t *shape, size_t ndim, const void *data, size_t bytes,
                               char *errbuf, size_t errlen)
{
    keel__tensor t = {0};
    bool wanted = s->nrequested == 0;
    keel_err err;

    for (size_t i = 0; i < s->nrequested && !wanted; i++)
        wanted = strcmp(s->requested[i], name) == 0;
    if (!wanted)
        return KEEL_OK;
    if (keel__fault_hit(KEEL__FAULT_COMPLETION)) {
        keel__errf(errbuf, errlen, "output '%s': injected completion fault", name);
        return KEEL_ENOMEM;
    }
    if ((err = grow((void **)&s->outputs, &s->cap_outputs, s->noutputs + 1, sizeof(*s->outputs))) !=
        KEEL_OK)
        goto nomem;
    if (s->noutputs < s->kept_outputs) { /* recycled (the DESIGN) */
        if (tensor_refill(&s->outputs[s->noutputs], name, dt, shape, ndim, data, bytes) != KEEL_OK)
            goto nomem;
        s->noutputs++;
        return KEEL_OK;
    }
    if (tensor_copy(&t, name, dt, shape, ndim, data, NULL, bytes) != KEEL_OK)
        goto nomem;
    s->outputs[s->noutputs++] = t;
    s->kept_outputs = s->noutputs;
    return KEEL_OK;

nomem:
    tensor_fini(&t);
    keel__errf(errbuf, errlen, "output '%s': out of memory copying %zu bytes", name, bytes);
    return KEEL_ENOMEM;
}

keel_err keel__run_slot_emit(keel__run_io *io, const char *name, keel_datatype dt,
                             const int64_t *shape, size_t ndim, const void *data, size_t bytes)
{
    return keel__request_emit_to(io->sink, name, dt, shape, ndim, data, bytes, io->errbuf,
                                 io->errlen);
}

keel_err keel__request_emit_run(keel_request *req, const keel_tensor_view *outs, size_t n,
                                bool detached)
{
    keel__run_slot s;
    char err[KEEL__ERRLEN];
    keel_err e = KEEL_OK;

    keel__run_slot_begin(&s, req, NULL, 1);
    for (size_t i = 0; i < n && e == KEEL_OK; i++)
        e = keel__request_emit_to(&s, outs[i].name, outs[i].datatype, outs[i].shape, outs[i].ndim,
                                  outs[i].data, outs[i].bytes, err, sizeof(err));
    if (detached)
        keel__run_slot_fini(&s);
    else
        keel__run_slot_end(&s, req);
    return e;
}

size_t keel__request_input_count(const keel_request *req)
{
    return req->ninputs;
}

keel_err keel__request_input(const keel_request *req, size_t i, keel_tensor_view *out)
{
    const keel__tensor *t;

    if (i >= req->ninputs)
        return KEEL_ENOTFOUND;
    t = &req->inputs[i];
    out->name = t->name;
    out->datatype = t->datatype;
    out->shape = t->shape;
    out->ndim = t->ndim;
    out->data = t->data;
    out->bytes = t->bytes;
    return KEEL_OK;
}
