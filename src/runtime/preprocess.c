/*
 * preprocess.c: the hook between a request and the preprocessing workers (src/workers).
 *
 * DESIGN
 * A model whose config.json has a "preprocess" section takes encoded images as a BYTES input
 * (config.h). When such a request runs (sched.c, run_and_complete: a keel worker thread with
 * the request leased, no lock held), keel__preprocess_begin sends its images to a worker of
 * the runtime's pool, with the request's deadline, and swaps the BYTES input for the FP32
 * tensor the worker produced, shaped as the model's input; binding and the backend run then
 * see an ordinary request. keel__preprocess_end puts the client's input back, so a request
 * can be resubmitted unchanged. A request may instead carry the model input itself (an
 * already decoded tensor): it then runs as is. The pool is the runtime's (rt->prep), created
 * before and destroyed after every thread that could call here. Layer: above request.c,
 * below sched.c (its run path is the only caller of begin/end) and runtime.c
 * (keel_model_is_ready asks keel__preprocess_ready).
 */
#include <string.h>

#include "runtime/preprocess.h"
#include "runtime/request.h"
#include "workers/image.h"
#include "workers/prep.h"

static const keel__tensor *find_input(const keel_request *req, const char *name, size_t *idx)
{
    for (size_t i = 0; i < req->ninputs; i++) {
        if (strcmp(req->inputs[i].name, name) == 0) {
            *idx = i;
            return &req->inputs[i];
        }
    }
    return NULL;
}

static void spec_from_config(const keel__preprocess_config *pp, keel__image_spec *s)
{
    memset(s, 0, sizeof(*s));
    s->format = (uint32_t)pp->format;
    s->color = (uint32_t)pp->color;
    s->layout = (uint32_t)pp->layout;
    s->width = pp->width;
    s->height = pp->height;
    s->scale = pp->scale;
    memcpy(s->mean, pp->mean, sizeof(s->mean));
    memcpy(s->std, pp->std, sizeof(s->std));
    s->max_pixels = pp->max_pixels;
    s->max_file_bytes = pp->max_file_bytes;
}

keel_err keel__preprocess_begin(keel_request *req, keel__prep_swap *sw)
{
    const keel__model_config *cfg = req->gen->cfg;
    const keel__preprocess_config *pp = cfg->preprocess;
    const keel__tensor_config *tc = NULL;
    const keel__tensor *t;
    keel__image_task task;
    keel__tensor nt;
    size_t idx = 0, other, n = 1, elems, out_len, nd = 0;
    char msg[KEEL__ERRLEN - 96];
    keel_err err;

    memset(sw, 0, sizeof(*sw));
    if (pp == NULL)
        return KEEL_OK;
    if ((t = find_input(req, pp->input, &idx)) == NULL) {
        if (find_input(req, pp->output_input, &other) != NULL)
            return KEEL_OK; /* an already decoded tensor: no preprocessing */
        keel__request_set_error(req, "missing input '%s' (encoded images) for model '%s'",
                                pp->input, cfg->name);
        return KEEL_EINVAL;
    }
    if (find_input(req, pp->output_input, &other) != NULL) {
        keel__request_set_error(req, "model '%s': give either input '%s' or '%s', not both",
                                cfg->name, pp->input, pp->output_input);
        return KEEL_EINVAL;
    }
    if (t->datatype != KEEL_TYPE_BYTES) {
        keel__request_set_error(req, "input '%s': datatype %s, expected BYTES (encoded images)",
                                t->name, keel_datatype_name(t->datatype));
        return KEEL_EINVAL;
    }
    for (size_t d = 0; d < t->ndim; d++)
        n *= (size_t)t->shape[d]; /* checked for overflow when the input was added */
    if (n == 0 || (cfg->max_batch_size > 0 && (int64_t)n > cfg->max_batch_size) ||
        (cfg->max_batch_size == 0 && n != 1)) {
        keel__request_set_error(req, "input '%s': %zu images, model '%s' takes 1 to %lld", t->name,
                                n, cfg->name,
                                (long long)(cfg->max_batch_size > 0 ? cfg->max_batch_size : 1));
        return KEEL_EINVAL;
    }
    for (size_t j = 0; j < cfg->ninputs && tc == NULL; j++) {
        if (strcmp(cfg->inputs[j].name, pp->output_input) == 0)
            tc = &cfg->inputs[j];
    }
    KEEL__ASSERT(tc != NULL); /* config.c checked it */
    if (req->rt->prep == NULL) {
        keel__request_set_error(req, "model '%s': the runtime has no preprocessing workers",
                                cfg->name);
        return KEEL_EUNAVAILABLE;
    }
    memset(&task, 0, sizeof(task));
    spec_from_config(pp, &task.spec);
    task.count = (uint32_t)n;
    elems = keel__image_tensor_elems(&task.spec);
    if (keel__mul_overflow_size(n, elems * sizeof(float), &out_len)) {
        keel__request_set_error(req, "input '%s': too many images", t->name);
        return KEEL_EINVAL;
    }
    memset(&nt, 0, sizeof(nt));
    nt.datatype = KEEL_TYPE_FP32;
    nt.bytes = out_len;
    if ((nt.name = keel__strdup(pp->output_input)) == NULL ||
        (nt.shape = keel__malloc(sizeof(int64_t) * (KEEL__MAX_DIMS + 1))) == NULL ||
        (nt.data = keel__malloc(out_len)) == NULL) {
        err = KEEL_ENOMEM;
        keel__request_set_error(req, "out of memory for the decoded images");
        goto fail;
    }
    if (cfg->max_batch_size > 0)
        nt.shape[nd++] = (int64_t)n;
    for (size_t d = 0; d < tc->ndims; d++)
        nt.shape[nd++] = tc->dims[d];
    nt.ndim = nd;
    msg[0] = '\0';
    err = keel__prep_run(req->rt->prep, KEEL__PREP_TASK_IMAGE, &task, sizeof(task), t->data,
                         t->bytes, nt.data, out_len, req->deadline_ns, msg, sizeof(msg));
    if (err != KEEL_OK) {
        keel__request_set_error(req, "model '%s': input '%s': %s", cfg->name, t->name,
                                msg[0] != '\0' ? msg : keel_strerror(err));
        if (err == KEEL_ERESOURCE)
            err = KEEL_EINVAL; /* this request is too large, whatever else runs */
        goto fail;
    }
    sw->original = req->inputs[idx];
    sw->index = idx;
    sw->active = true;
    req->inputs[idx] = nt;
    return KEEL_OK;

fail:
    free(nt.name);
    free(nt.shape);
    free(nt.data);
    return err;
}

void keel__preprocess_end(keel_request *req, keel__prep_swap *sw)
{
    keel__tensor *t;

    if (!sw->active)
        return;
    t = &req->inputs[sw->index];
    keel__tensor_fini(t);
    *t = sw->original;
    sw->active = false;
}

void keel__preprocess_drop(keel__prep_swap *sw)
{
    if (!sw->active)
        return;
    keel__tensor_fini(&sw->original); /* the request's input: borrowed data is released */
    sw->active = false;
}

bool keel__preprocess_ready(keel_runtime *rt, const keel__model_config *cfg)
{
    if (rt->prep == NULL || (cfg != NULL && cfg->preprocess == NULL))
        return true;
    return keel__prep_healthy(rt->prep);
}

void keel_preprocess_stats_get(keel_runtime *rt, keel_preprocess_stats *out)
{
    keel__prep_stats s;

    memset(out, 0, sizeof(*out));
    out->forkserver_pid = -1;
    if (rt == NULL || rt->prep == NULL)
        return;
    keel__prep_stats_get(rt->prep, &s);
    out->enabled = true;
    out->healthy = s.healthy;
    out->workers = s.workers;
    out->workers_alive = s.workers_alive;
    out->forkserver_pid = s.forkserver_pid;
    out->restarts_signal = s.restarts_signal;
    out->restarts_exit = s.restarts_exit;
    out->restarts_timeout = s.restarts_timeout;
    out->restarts_protocol = s.restarts_protocol;
    out->spawn_failures = s.spawn_failures;
    out->tasks_ok = s.tasks_ok;
    out->tasks_invalid = s.tasks_invalid;
    out->tasks_timeout = s.tasks_timeout;
    out->tasks_crashed = s.tasks_crashed;
    out->tasks_rejected = s.tasks_rejected;
    out->tasks_error = s.tasks_error;
    out->memfds_open = s.memfds_open;
    out->bytes_in_flight = s.bytes_in_flight;
}
