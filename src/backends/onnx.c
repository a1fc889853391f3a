/*
 * onnx.c: the "onnx" backend: ONNX models run by OpenCV's DNN module (Debian
 * libopencv-dnn-dev 4.6), through the C interface of onnx_cv.cpp.
 *
 * DESIGN
 * The model (owned by the generation) is the file's bytes, read once, plus the graph's
 * interface resolved against config.json. An execution context owns one cv::dnn::Net built
 * from those bytes: OpenCV 4.6 gives wrong answers, with no error, when two threads run one
 * Net (measured: 38-40 wrong of 40 runs), so Nets are never shared and instance_count
 * contexts give instance_count Nets. Several contexts of one model run at once
 * (concurrent_contexts), each on its own Net.
 *
 * A load, in order, each step failing with a message that names the file:
 *  1. read <version>/model.onnx (or default_model_filename) into memory, once: every later
 *     step sees these bytes, so a file replaced during the load cannot slip past the check;
 *  2. read the graph's inputs (minus initializers) and outputs with onnx_proto.c, a bounded
 *     reader, and check them against config.json, or keep them to fill config.json in when
 *     it leaves "input"/"output" out (complete_config, called by the generation builder);
 *  3. check the bytes in a child process (keel-model-check, through backends/model_check.c):
 *     OpenCV crashes with SIGSEGV on some malformed files, in its importer or in forward (the
 *     ONNX test data's node/test_dropout_default_mask reads past its blobs; whether that
 *     faults depends on the heap, hence the checker's malloc perturb), so the file is parsed,
 *     and run on zero inputs
 *     exactly as the warm-up will run it, in a process that may die. A crash,
 *     an error or a hang (killed at the deadline) fails the load; the server and the
 *     generation currently serving are untouched;
 *  4. contexts: each parses the same bytes into its own Net (loads serialised in onnx_cv.cpp).
 *
 * The helper is found through $KEEL_MODEL_CHECK, else as keel-model-check beside the running
 * executable (/proc/self/exe); its deadline is $KEEL_MODEL_CHECK_TIMEOUT_MS (default 60000)
 * (backends/model_check.h).
 *
 * Tensors: FP32 only. With max_batch_size > 0 the first model dimension is the batch and must
 * be symbolic in the file (or fixed at 1 with max_batch_size 1); config dims exclude it.
 *
 * Threads: model_load, complete_config, context_create, context_destroy and model_free run on
 * keel's loader or reaper threads; run on worker threads, one call at a time per context.
 * No locks here (the load lock lives in onnx_cv.cpp).
 */
#include "backends/backend.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backends/model_check.h"
#include "backends/onnx_cv.h"
#include "backends/onnx_proto.h"
#include "core/core.h"

#define DEFAULT_FILENAME "model.onnx"
#define MAX_FILE_BYTES ((size_t)1 << 31) /* protobuf's own limit is 2 GiB */

typedef struct onnx_model {
    char *path; /* for messages */
    void *bytes;
    size_t len;
    bool batched;
    /* The interface in config order (names and dims as served, batch excluded). */
    keel__onnx_value *inputs;
    size_t ninputs;
    keel__onnx_value *outputs;
    size_t noutputs;
    size_t memory_estimate;
} onnx_model;

typedef struct onnx_context {
    onnx_model *model; /* borrowed */
    keel__cvnet *net;  /* owned: one Net per context */
    keel__cvnet_input *in;
    const char **out_names;
    float **scratch; /* per input, only if a caller's buffer is misaligned */
    size_t *scratch_len;
} onnx_context;

/* ---- files */

static keel_err find_model_file(const keel__model_config *cfg, const char *version_dir, char **out,
                                char *errbuf, size_t errlen)
{
    const char *name = cfg->default_model_filename != NULL && cfg->default_model_filename[0]
                           ? cfg->default_model_filename
                           : DEFAULT_FILENAME;
    char *path;

    *out = NULL;
    if (asprintf(&path, "%s/%s", version_dir, name) < 0)
        return KEEL_ENOMEM;
    *out = path;
    return KEEL_OK;
}

static keel_err read_file(const char *path, void **out, size_t *len, char *errbuf, size_t errlen)
{
    FILE *f = NULL;
    char *buf = NULL;
    struct stat st;
    keel_err err = KEEL_ELOAD;

    *out = NULL;
    *len = 0;
    if ((f = fopen(path, "rbe")) == NULL) {
        keel__errf(errbuf, errlen, "%s: cannot open model file: %s", path, strerror(errno));
        goto fail;
    }
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        keel__errf(errbuf, errlen, "%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size == 0) {
        keel__errf(errbuf, errlen, "%s: model file is empty", path);
        goto fail;
    }
    if ((uint64_t)st.st_size > MAX_FILE_BYTES) {
        keel__errf(errbuf, errlen, "%s: model file is larger than 2 GiB", path);
        goto fail;
    }
    if ((buf = keel__malloc((size_t)st.st_size)) == NULL) {
        keel__errf(errbuf, errlen, "%s: out of memory reading the model file", path);
        err = KEEL_ENOMEM;
        goto fail;
    }
    if (fread(buf, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        keel__errf(errbuf, errlen, "%s: short read of model file", path);
        goto fail;
    }
    fclose(f);
    *out = buf;
    *len = (size_t)st.st_size;
    return KEEL_OK;

fail:
    free(buf);
    if (f != NULL)
        fclose(f);
    return err;
}

/* ---- the model check in a child process (backends/model_check.c) */

/*
 * Runs keel-model-check on the model's bytes, asking it to run the forward the warm-up runs:
 * the resolved inputs (batch 1, variable dimensions 1) and the configured outputs. Some of
 * OpenCV's crashes are in forward, not in the importer. KEEL_OK only if the helper said "ok".
 */
static keel_err check_in_child(const onnx_model *m, char *errbuf, size_t errlen)
{
    typedef char dims_text[KEEL__MAX_DIMS * 24 + 8];
    size_t a = 0;
    char **argv = NULL;
    dims_text *dims = NULL;
    keel__model_check c = {"onnx", "OpenCV", m->path, m->bytes, m->len, NULL};
    keel_err err;

    if ((argv = keel__calloc(1 + 3 * m->ninputs + 2 * m->noutputs, sizeof(*argv))) == NULL ||
        (dims = keel__calloc(m->ninputs + 1, sizeof(*dims))) == NULL) {
        keel__errf(errbuf, errlen, "%s: out of memory starting the model check", m->path);
        free(argv);
        return KEEL_ENOMEM;
    }
    for (size_t i = 0; i < m->ninputs; i++) {
        int o = 0;
        if (m->batched)
            o += snprintf(dims[i], sizeof(dims[i]), "1");
        for (size_t d = 0; d < m->inputs[i].ndims; d++)
            o += snprintf(dims[i] + o, sizeof(dims[i]) - (size_t)o, "%s%" PRId64, o > 0 ? "," : "",
                          m->inputs[i].dims[d] > 0 ? m->inputs[i].dims[d] : 1);
        argv[a++] = (char *)"--input";
        argv[a++] = (char *)m->inputs[i].name;
        argv[a++] = dims[i];
    }
    for (size_t i = 0; i < m->noutputs; i++) {
        argv[a++] = (char *)"--output";
        argv[a++] = (char *)m->outputs[i].name;
    }
    argv[a] = NULL;
    c.args = argv;
    err = keel__model_check_run(&c, errbuf, errlen);
    free(dims);
    free(argv);
    return err;
}

/* ---- the interface: config.json against the graph */

static const keel__onnx_value *find_value(const keel__onnx_value *vs, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(vs[i].name, name) == 0)
            return &vs[i];
    }
    return NULL;
}

/*
 * The served form of a graph value: batch dimension removed when batched. Fails if the
 * value is not FLOAT or its batch dimension cannot carry max_batch_size.
 */
static keel_err served_value(const char *path, const keel__model_config *cfg, const char *what,
                             const keel__onnx_value *gv, keel__onnx_value *out, char *errbuf,
                             size_t errlen)
{
    *out = *gv;
    if (gv->elem_type != KEEL__ONNX_FLOAT) {
        keel__errf(errbuf, errlen,
                   "%s: model %s '%s' is %s; the onnx backend serves FLOAT (TYPE_FP32) tensors "
                   "only",
                   path, what, gv->name, keel__onnx_type_name(gv->elem_type));
        return KEEL_ELOAD;
    }
    if (cfg->max_batch_size == 0 || !gv->has_shape)
        return KEEL_OK;
    if (gv->ndims == 0) {
        keel__errf(errbuf, errlen,
                   "%s: model %s '%s' is a scalar, so it has no batch dimension; set "
                   "max_batch_size to 0",
                   path, what, gv->name);
        return KEEL_ELOAD;
    }
    if (gv->dims[0] != KEEL__ONNX_DIM_UNKNOWN && !(gv->dims[0] == 1 && cfg->max_batch_size == 1)) {
        keel__errf(errbuf, errlen,
                   "%s: model %s '%s' has a fixed first dimension %" PRId64 ", which cannot be "
                   "a batch of up to max_batch_size %" PRId64
                   " (export the model with a dynamic batch axis, or set max_batch_size to 0)",
                   path, what, gv->name, gv->dims[0], cfg->max_batch_size);
        return KEEL_ELOAD;
    }
    out->ndims = gv->ndims - 1;
    memmove(out->dims, gv->dims + 1, out->ndims * sizeof(out->dims[0]));
    return KEEL_OK;
}

/* Checks one config tensor against its served graph value; on KEEL_OK *out takes the config's
 * dims (which may narrow symbolic ones). */
static keel_err match_tensor(const char *path, const char *what, const keel__tensor_config *tc,
                             const keel__onnx_value *sv, keel__onnx_value *out, char *errbuf,
                             size_t errlen)
{
    char cd[96], md[96];

    if (tc->datatype != KEEL_TYPE_FP32) {
        keel__errf(errbuf, errlen,
                   "%s: config %s '%s' is %s; the onnx backend serves TYPE_FP32 "
                   "only",
                   path, what, tc->name, keel_datatype_name(tc->datatype));
        return KEEL_ECONFIG;
    }
    *out = *sv;
    out->ndims = tc->ndims;
    memcpy(out->dims, tc->dims, tc->ndims * sizeof(tc->dims[0]));
    if (!sv->has_shape)
        return KEEL_OK;
    keel__format_dims(cd, sizeof(cd), tc->dims, tc->ndims);
    keel__format_dims(md, sizeof(md), sv->dims, sv->ndims);
    if (sv->ndims != tc->ndims) {
        keel__errf(errbuf, errlen,
                   "%s: config %s '%s' dims %s do not match the model's %s (batch dimension "
                   "excluded; -1 = symbolic)",
                   path, what, tc->name, cd, md);
        return KEEL_ECONFIG;
    }
    for (size_t d = 0; d < tc->ndims; d++) {
        if (sv->dims[d] != KEEL__ONNX_DIM_UNKNOWN && tc->dims[d] != sv->dims[d]) {
            keel__errf(errbuf, errlen,
                       "%s: config %s '%s' dims %s do not match the model's %s (batch "
                       "dimension excluded; -1 = symbolic)",
                       path, what, tc->name, cd, md);
            return KEEL_ECONFIG;
        }
    }
    return KEEL_OK;
}

/* Resolves one side (inputs or outputs) into m: from the config if it lists any, else all
 * of the graph's. Every graph input must be fed, so a config naming only some of them fails;
 * outputs may be a subset. */
static keel_err resolve(onnx_model *m, const keel__model_config *cfg, bool inputs,
                        const keel__onnx_value *gvs, size_t ngv, char *errbuf, size_t errlen)
{
    const keel__tensor_config *tcs = inputs ? cfg->inputs : cfg->outputs;
    size_t ntc = inputs ? cfg->ninputs : cfg->noutputs;
    const char *what = inputs ? "input" : "output";
    size_t n = ntc > 0 ? ntc : ngv;
    keel__onnx_value *out, sv;
    keel_err err;

    if ((out = keel__calloc(n, sizeof(*out))) == NULL) {
        keel__errf(errbuf, errlen, "%s: out of memory", m->path);
        return KEEL_ENOMEM;
    }
    if (inputs) {
        m->inputs = out;
        m->ninputs = n;
    } else {
        m->outputs = out;
        m->noutputs = n;
    }
    if (ntc == 0) {
        for (size_t i = 0; i < ngv; i++) {
            if ((err = served_value(m->path, cfg, what, &gvs[i], &out[i], errbuf, errlen)) !=
                KEEL_OK)
                return err;
            if (!gvs[i].has_shape) {
                keel__errf(errbuf, errlen,
                           "%s: model %s '%s' declares no shape; list the %ss in config.json",
                           m->path, what, gvs[i].name, what);
                return KEEL_ECONFIG;
            }
        }
        return KEEL_OK;
    }
    for (size_t i = 0; i < ntc; i++) {
        const keel__onnx_value *gv = find_value(gvs, ngv, tcs[i].name);
        if (gv == NULL) {
            char names[256];
            size_t off = 0;
            names[0] = '\0';
            for (size_t k = 0; k < ngv && off + 1 < sizeof(names); k++) {
                int w = snprintf(names + off, sizeof(names) - off, "%s'%s'", k > 0 ? ", " : "",
                                 gvs[k].name);
                if (w < 0)
                    break;
                off += (size_t)w;
            }
            keel__errf(errbuf, errlen, "%s: config %s '%s' is not an %s of the model (its %ss: %s)",
                       m->path, what, tcs[i].name, what, what, names);
            return KEEL_ECONFIG;
        }
        if ((err = served_value(m->path, cfg, what, gv, &sv, errbuf, errlen)) != KEEL_OK ||
            (err = match_tensor(m->path, what, &tcs[i], &sv, &out[i], errbuf, errlen)) != KEEL_OK)
            return err;
    }
    if (inputs) {
        for (size_t k = 0; k < ngv; k++) {
            if (find_value(out, n, gvs[k].name) == NULL) {
                keel__errf(errbuf, errlen, "%s: model input '%s' is missing from config.json",
                           m->path, gvs[k].name);
                return KEEL_ECONFIG;
            }
        }
    }
    return KEEL_OK;
}

/* ---- vtable */

static void onnx_model_free(void *model)
{
    onnx_model *m = model;

    if (m == NULL)
        return;
    free(m->inputs);
    free(m->outputs);
    free(m->bytes);
    free(m->path);
    free(m);
}

static keel_err onnx_model_load(const keel__model_config *cfg, const char *version_dir,
                                void **model, char *errbuf, size_t errlen)
{
    onnx_model *m = NULL;
    keel__onnx_graph *g = NULL;
    keel_err err;

    *model = NULL;
    if ((m = keel__calloc(1, sizeof(*m))) == NULL || (g = keel__malloc(sizeof(*g))) == NULL) {
        keel__errf(errbuf, errlen, "%s: out of memory loading an onnx model", version_dir);
        err = KEEL_ENOMEM;
        goto fail;
    }
    m->batched = cfg->max_batch_size > 0;
    if ((err = find_model_file(cfg, version_dir, &m->path, errbuf, errlen)) != KEEL_OK) {
        keel__errf(errbuf, errlen, "%s: out of memory", version_dir);
        goto fail;
    }
    if ((err = read_file(m->path, &m->bytes, &m->len, errbuf, errlen)) != KEEL_OK ||
        (err = keel__onnx_graph_read(m->bytes, m->len, m->path, g, errbuf, errlen)) != KEEL_OK ||
        (err = resolve(m, cfg, true, g->inputs, g->ninputs, errbuf, errlen)) != KEEL_OK ||
        (err = resolve(m, cfg, false, g->outputs, g->noutputs, errbuf, errlen)) != KEEL_OK ||
        (err = check_in_child(m, errbuf, errlen)) != KEEL_OK)
        goto fail;
    /* Each context's Net holds its own copy of the weights, and the model keeps the bytes. */
    m->memory_estimate = m->len * (1 + (size_t)(cfg->instance_count > 0 ? cfg->instance_count : 1));
    free(g);
    *model = m;
    return KEEL_OK;

fail:
    free(g);
    onnx_model_free(m);
    return err;
}

static keel_err fill_side(const keel__onnx_value *vs, size_t n, keel__tensor_config **out,
                          size_t *nout)
{
    keel__tensor_config *ts = keel__calloc(n, sizeof(*ts));

    if (ts == NULL)
        return KEEL_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        if ((ts[i].name = keel__strdup(vs[i].name)) == NULL) {
            for (size_t k = 0; k < i; k++)
                free(ts[k].name);
            free(ts);
            return KEEL_ENOMEM;
        }
        ts[i].datatype = KEEL_TYPE_FP32;
        ts[i].ndims = vs[i].ndims;
        for (size_t d = 0; d < vs[i].ndims; d++)
            ts[i].dims[d] = vs[i].dims[d] < 0 ? -1 : vs[i].dims[d];
    }
    *out = ts;
    *nout = n;
    return KEEL_OK;
}

static keel_err onnx_complete_config(void *model, keel__model_config *cfg, char *errbuf,
                                     size_t errlen)
{
    onnx_model *m = model;
    keel_err err;

    if (cfg->ninputs == 0 &&
        (err = fill_side(m->inputs, m->ninputs, &cfg->inputs, &cfg->ninputs)) != KEEL_OK) {
        keel__errf(errbuf, errlen, "%s: out of memory", m->path);
        return err;
    }
    if (cfg->noutputs == 0 &&
        (err = fill_side(m->outputs, m->noutputs, &cfg->outputs, &cfg->noutputs)) != KEEL_OK) {
        keel__errf(errbuf, errlen, "%s: out of memory", m->path);
        return err;
    }
    return KEEL_OK;
}

static size_t onnx_memory_estimate(void *model)
{
    const onnx_model *m = model;

    return m != NULL ? m->memory_estimate : 0;
}

static void onnx_context_destroy(void *ctx)
{
    onnx_context *c = ctx;

    if (c == NULL)
        return;
    keel__cvnet_free(c->net);
    if (c->scratch != NULL) {
        for (size_t i = 0; i < c->model->ninputs; i++)
            free(c->scratch[i]);
    }
    free(c->scratch);
    free(c->scratch_len);
    free(c->in);
    free(c->out_names);
    free(c);
}

static keel_err onnx_context_create(void *model, const keel__model_config *cfg, void **ctx,
                                    char *errbuf, size_t errlen)
{
    onnx_model *m = model;
    onnx_context *c = NULL;
    keel_err err;

    *ctx = NULL;
    (void)cfg;
    if ((c = keel__calloc(1, sizeof(*c))) == NULL ||
        (c->in = keel__calloc(m->ninputs, sizeof(*c->in))) == NULL ||
        (c->out_names = keel__calloc(m->noutputs, sizeof(*c->out_names))) == NULL ||
        (c->scratch = keel__calloc(m->ninputs, sizeof(*c->scratch))) == NULL ||
        (c->scratch_len = keel__calloc(m->ninputs, sizeof(*c->scratch_len))) == NULL) {
        keel__errf(errbuf, errlen, "%s: out of memory creating a context", m->path);
        err = KEEL_ENOMEM;
        goto fail;
    }
    c->model = m;
    for (size_t i = 0; i < m->ninputs; i++)
        c->in[i].name = m->inputs[i].name;
    for (size_t i = 0; i < m->noutputs; i++)
        c->out_names[i] = m->outputs[i].name;
    if ((err = keel__cvnet_load(m->bytes, m->len, m->path, &c->net, errbuf, errlen)) != KEEL_OK)
        goto fail;
    *ctx = c;
    return KEEL_OK;

fail:
    onnx_context_destroy(c);
    return err;
}

/* The shape to report for output i: OpenCV's own when its rank is the served one (then it
 * must agree with the fixed dims), else the served dims when the value count matches (OpenCV
 * reports a 1-D tensor as 2-D, for example). */
static keel_err output_shape(const onnx_context *c, size_t i, int64_t batch, int64_t *shape,
                             size_t *ndim, size_t count, char *errbuf, size_t errlen)
{
    const keel__onnx_value *o = &c->model->outputs[i];
    size_t off = c->model->batched ? 1 : 0;
    size_t want_ndim = o->ndims + off;
    char got[96], want[96];
    size_t n = 1;
    bool fixed = true;

    if (*ndim == want_ndim) {
        bool ok = !c->model->batched || shape[0] == batch;
        for (size_t d = 0; d < o->ndims && ok; d++)
            ok = o->dims[d] < 0 || shape[d + off] == o->dims[d];
        if (ok)
            return KEEL_OK;
    }
    for (size_t d = 0; d < o->ndims; d++) {
        if (o->dims[d] < 0)
            fixed = false;
        else
            n *= (size_t)o->dims[d];
    }
    if (fixed && n * (size_t)(c->model->batched ? batch : 1) == count) {
        if (c->model->batched)
            shape[0] = batch;
        for (size_t d = 0; d < o->ndims; d++)
            shape[d + off] = o->dims[d];
        *ndim = want_ndim;
        return KEEL_OK;
    }
    keel__format_dims(got, sizeof(got), shape, *ndim);
    keel__format_dims(want, sizeof(want), o->dims, o->ndims);
    keel__errf(errbuf, errlen, "onnx: output '%s' has shape %s, config declares %s%s", o->name, got,
               c->model->batched ? "a batch of " : "", want);
    return KEEL_EBACKEND;
}

static keel_err onnx_run(void *ctx, keel__run_io *io)
{
    onnx_context *c = ctx;
    const onnx_model *m = c->model;
    keel_err err;

    if (io->ninputs != m->ninputs) {
        keel__errf(io->errbuf, io->errlen, "onnx: %zu inputs given, the model has %zu", io->ninputs,
                   m->ninputs);
        return KEEL_EBACKEND;
    }
    for (size_t i = 0; i < m->ninputs; i++) {
        const keel_tensor_view *v = &io->inputs[i];
        const float *data = v->data;

        if (v->datatype != KEEL_TYPE_FP32) {
            keel__errf(io->errbuf, io->errlen, "onnx: input '%s' is not FP32", v->name);
            return KEEL_EBACKEND;
        }
        if (((uintptr_t)data % alignof(float)) != 0) {
            /* keel's own copies are aligned; this only guards a misaligned embedder. */
            if (c->scratch_len[i] < v->bytes) {
                float *p = keel__realloc(c->scratch[i], v->bytes);
                if (p == NULL)
                    return KEEL_ENOMEM;
                c->scratch[i] = p;
                c->scratch_len[i] = v->bytes;
            }
            memcpy(c->scratch[i], v->data, v->bytes);
            data = c->scratch[i];
        }
        c->in[i].shape = v->shape;
        c->in[i].ndim = v->ndim;
        c->in[i].data = data;
    }
    if ((err = keel__cvnet_run(c->net, c->in, m->ninputs, c->out_names, m->noutputs, io->errbuf,
                               io->errlen)) != KEEL_OK)
        return err;
    for (size_t i = 0; i < m->noutputs; i++) {
        int64_t shape[KEEL__MAX_DIMS + 1];
        size_t ndim = 0, count = 0;
        const float *data = NULL;

        if ((err = keel__cvnet_output(c->net, i, shape, KEEL__MAX_DIMS + 1, &ndim, &data, &count,
                                      io->errbuf, io->errlen)) != KEEL_OK ||
            (err = output_shape(c, i, io->batch, shape, &ndim, count, io->errbuf, io->errlen)) !=
                KEEL_OK)
            return err;
        /* The Mat belongs to this context's Net until its next run: emit copies it now. */
        if ((err = io->emit(io, m->outputs[i].name, KEEL_TYPE_FP32, shape, ndim, data,
                            count * sizeof(float))) != KEEL_OK)
            return err;
    }
    return KEEL_OK;
}

const keel__backend keel__onnx_backend = {
    .name = "onnx",
    .concurrent_contexts = true,
    .input_types = KEEL__TYPE_BIT(KEEL_TYPE_FP32),
    .model_load = onnx_model_load,
    .context_create = onnx_context_create,
    .run = onnx_run,
    .context_destroy = onnx_context_destroy,
    .model_free = onnx_model_free,
    .memory_estimate = onnx_memory_estimate,
    .complete_config = onnx_complete_config,
};
