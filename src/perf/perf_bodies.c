/*
 * perf_bodies.c: the requests the load tools send: input specs, the model's inputs from its
 * metadata, and pre-built KServe V2 infer requests (JSON or Triton's binary tensor extension)
 * with random, zero or file data.
 *
 * DESIGN
 * A perf_workload is built once by one thread before the load starts and is read-only while
 * the load loop runs. Calls perf_client.c (the metadata request over HTTP), perf_grpc.c (over
 * gRPC: ModelMetadata, and packing the ModelInferRequests) and perf_util.c, and of libkeel
 * only its public datatype helpers. No lock.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/keel.h"
#include "perf_bodies.h"
#include "perf_client.h"
#include "perf_grpc.h"
#include "perf_util.h"

bool perf_input_spec_parse(const char *s, perf_input_spec *spec)
{
    const char *c1 = strchr(s, ':'), *c2, *p;
    size_t n;

    memset(spec, 0, sizeof(*spec));
    if (c1 == NULL || (c2 = strchr(c1 + 1, ':')) == NULL)
        return false;
    n = (size_t)(c1 - s);
    if (n == 0 || n >= sizeof(spec->name))
        return false;
    memcpy(spec->name, s, n);
    n = (size_t)(c2 - c1 - 1);
    if (n == 0 || n >= sizeof(spec->datatype))
        return false;
    memcpy(spec->datatype, c1 + 1, n);
    if (keel_datatype_from_name(spec->datatype) == KEEL_TYPE_INVALID ||
        keel_datatype_from_name(spec->datatype) == KEEL_TYPE_BYTES)
        return false;
    for (p = c2 + 1; *p != '\0';) {
        char *e;
        long long d;
        if (spec->ndims == sizeof(spec->dims) / sizeof(spec->dims[0]))
            return false;
        errno = 0;
        d = strtoll(p, &e, 10);
        if (e == p || errno != 0 || d < 1 || d > (1 << 30))
            return false;
        spec->dims[spec->ndims++] = d;
        p = e;
        if (*p == 'x')
            p++;
        else if (*p != '\0')
            return false;
    }
    return spec->ndims > 0;
}

/* Reads the inputs of the model's metadata (GET /v2/models/M[/versions/V]). The batch
 * dimension (-1 first, when the model batches) becomes w->batch; any other -1 becomes 1. */
static bool fetch_inputs(perf_workload *w, char *errbuf, size_t errlen)
{
    perf_client c;
    char path[512];
    const char *body;
    size_t len;
    int status;
    json_t *doc = NULL, *inputs, *in;
    json_error_t jerr;
    size_t i;
    bool ok = false;

    perf_client_init(&c, &w->target);
    if (w->grpc) {
        /* The same document, from gRPC's ModelMetadata. */
        snprintf(path, sizeof(path), "ModelMetadata");
        if (!perf_grpc_model_metadata(&w->target, w->model, w->version, 30, &doc, NULL, errbuf,
                                      errlen))
            goto done;
    } else {
        if (w->version != NULL)
            snprintf(path, sizeof(path), "/v2/models/%s/versions/%s", w->model, w->version);
        else
            snprintf(path, sizeof(path), "/v2/models/%s", w->model);
        if (!perf_client_request(&c, "GET", path, NULL, NULL, 0, 30, &status, &body, &len, errbuf,
                                 errlen))
            goto done;
        if (status != 200) {
            perf_errf(errbuf, errlen, "GET %s: HTTP %d: %.200s", path, status, body);
            goto done;
        }
        doc = json_loadb(body, len, 0, &jerr);
    }
    if (doc == NULL || !json_is_array(inputs = json_object_get(doc, "inputs")) ||
        json_array_size(inputs) == 0) {
        perf_errf(errbuf, errlen, "%s%s: no inputs in the model metadata", w->grpc ? "" : "GET ",
                  path);
        goto done;
    }
    if (json_array_size(inputs) > sizeof(w->inputs) / sizeof(w->inputs[0])) {
        perf_errf(errbuf, errlen, "the model has more than %zu inputs",
                  sizeof(w->inputs) / sizeof(w->inputs[0]));
        goto done;
    }
    json_array_foreach (inputs, i, in) {
        perf_input_spec *s = &w->inputs[i];
        const char *name = json_string_value(json_object_get(in, "name"));
        const char *dt = json_string_value(json_object_get(in, "datatype"));
        json_t *shape = json_object_get(in, "shape"), *d;
        size_t j;
        memset(s, 0, sizeof(*s));
        if (name == NULL || dt == NULL || !json_is_array(shape) ||
            strlen(name) >= sizeof(s->name) || strlen(dt) >= sizeof(s->datatype) ||
            json_array_size(shape) > sizeof(s->dims) / sizeof(s->dims[0])) {
            perf_errf(errbuf, errlen, "%s: input %zu is not {name, datatype, shape}", path, i);
            goto done;
        }
        strcpy(s->name, name);
        strcpy(s->datatype, dt);
        if (keel_datatype_from_name(dt) == KEEL_TYPE_INVALID ||
            keel_datatype_from_name(dt) == KEEL_TYPE_BYTES) {
            perf_errf(errbuf, errlen, "input %s: datatype %s is not supported by keel perf", name,
                      dt);
            goto done;
        }
        json_array_foreach (shape, j, d) {
            json_int_t v = json_integer_value(d);
            if (j == 0 && v == -1)
                v = w->batch;
            else if (v == -1)
                v = 1;
            else if (j == 0 && w->batch != 1 && json_array_size(shape) > 0) {
                /* Not a batching model: a batch size other than 1 cannot be honoured. */
                perf_errf(errbuf, errlen,
                          "input %s has no batch dimension (shape starts with %lld); use "
                          "--batch-size 1",
                          name, (long long)v);
                goto done;
            }
            if (v < 1) {
                perf_errf(errbuf, errlen, "input %s: bad dimension %lld", name, (long long)v);
                goto done;
            }
            s->dims[s->ndims++] = v;
        }
        if (s->ndims == 0)
            s->dims[s->ndims++] = 1;
    }
    w->ninputs = json_array_size(inputs);
    ok = true;
done:
    json_decref(doc);
    perf_client_fini(&c);
    return ok;
}

typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static void sb_reserve(sbuf *b, size_t n)
{
    if (b->oom || b->cap - b->len > n)
        return;
    size_t ncap = b->cap == 0 ? 4096 : b->cap;
    while (ncap - b->len <= n)
        ncap *= 2;
    char *np = realloc(b->p, ncap);
    if (np == NULL) {
        b->oom = true;
        return;
    }
    b->p = np;
    b->cap = ncap;
}

static void sb_add(sbuf *b, const void *p, size_t n)
{
    sb_reserve(b, n + 1);
    if (b->oom)
        return;
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    char tmp[512];
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(tmp)) {
        b->oom = true;
        return;
    }
    sb_add(b, tmp, (size_t)n);
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Rows of numbers from a file: one per line, blanks between numbers, '#' comments. */
static bool read_rows(const char *path, double **out, size_t *nvals, char *errbuf, size_t errlen)
{
    FILE *f = fopen(path, "re");
    char line[65536];
    double *v = NULL;
    size_t n = 0, cap = 0;

    if (f == NULL) {
        perf_errf(errbuf, errlen, "%s: %s", path, strerror(errno));
        return false;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char *p = line, *e;
        while (isspace((unsigned char)*p))
            p++;
        if (*p == '#' || *p == '\0')
            continue;
        for (;;) {
            double x;
            while (isspace((unsigned char)*p) || *p == ',')
                p++;
            if (*p == '\0')
                break;
            x = strtod(p, &e);
            if (e == p) {
                perf_errf(errbuf, errlen, "%s: not a number near '%.20s'", path, p);
                free(v);
                fclose(f);
                return false;
            }
            p = e;
            if (n == cap) {
                size_t ncap = cap == 0 ? 1024 : cap * 2;
                double *nv = realloc(v, ncap * sizeof(*v));
                if (nv == NULL) {
                    free(v);
                    fclose(f);
                    perf_errf(errbuf, errlen, "out of memory");
                    return false;
                }
                v = nv;
                cap = ncap;
            }
            v[n++] = x;
        }
    }
    fclose(f);
    if (n == 0) {
        free(v);
        perf_errf(errbuf, errlen, "%s: no numbers", path);
        return false;
    }
    *out = v;
    *nvals = n;
    return true;
}

static size_t spec_elems(const perf_input_spec *s)
{
    size_t n = 1;
    for (size_t i = 0; i < s->ndims; i++)
        n *= (size_t)s->dims[i];
    return n;
}

/* Appends one value as JSON text and as little-endian bytes of the tensor's datatype. */
static void put_value(sbuf *js, sbuf *bin, keel_datatype dt, double x)
{
    switch (dt) {
    case KEEL_TYPE_BOOL: {
        uint8_t b = x != 0;
        if (js != NULL)
            sb_printf(js, "%s", b ? "true" : "false");
        if (bin != NULL)
            sb_add(bin, &b, 1);
        break;
    }
    case KEEL_TYPE_FP32: {
        float f = (float)x;
        if (js != NULL)
            sb_printf(js, "%.9g", (double)f);
        if (bin != NULL)
            sb_add(bin, &f, 4);
        break;
    }
    case KEEL_TYPE_FP64:
        if (js != NULL)
            sb_printf(js, "%.17g", x);
        if (bin != NULL)
            sb_add(bin, &x, 8);
        break;
    case KEEL_TYPE_FP16: {
        /* Only values that are exact in FP16 are generated (multiples of 1/64 below 2). */
        double q = floor(x * 64) / 64;
        uint16_t h = 0;
        if (q > 0) {
            int e;
            double m = frexp(q, &e); /* q = m * 2^e, m in [0.5, 1) */
            h = (uint16_t)(((unsigned)(e - 1 + 15) << 10) | ((unsigned)((m * 2 - 1) * 1024)));
        }
        if (js != NULL)
            sb_printf(js, "%.9g", q);
        if (bin != NULL)
            sb_add(bin, &h, 2);
        break;
    }
    default: {
        int64_t i = (int64_t)x;
        size_t sz = keel_datatype_size(dt);
        if (js != NULL)
            sb_printf(js, "%" PRId64, i);
        if (bin != NULL)
            sb_add(bin, &i, sz); /* little-endian: the low bytes first */
        break;
    }
    }
}

/* Builds request number k: an HTTP request (JSON or binary tensors), or with w->grpc a packed
 * ModelInferRequest with the same values as raw_input_contents. */
static bool build_request(perf_workload *w, const perf_data_opts *d, size_t k, const double *rows,
                          size_t nrows_vals, uint64_t *rng, char errbuf[], size_t errlen)
{
    sbuf js = {0}, bin = {0}, req = {0};
    char path[512];
    bool ok = false;
    bool file = rows != NULL;
    bool binary = w->binary || w->grpc; /* values as little-endian bytes */
    size_t pos = 0, raw_off[8] = {0}, raw_len[8] = {0};

    if (w->version != NULL)
        snprintf(path, sizeof(path), "/v2/models/%s/versions/%s/infer", w->model, w->version);
    else
        snprintf(path, sizeof(path), "/v2/models/%s/infer", w->model);
    if (file) {
        size_t per_req = spec_elems(&w->inputs[0]);
        pos = (k * per_req) % nrows_vals;
    }
    sb_printf(&js, "{\"id\":\"perf-%zu\",\"inputs\":[", k);
    for (size_t i = 0; i < w->ninputs; i++) {
        const perf_input_spec *s = &w->inputs[i];
        keel_datatype dt = keel_datatype_from_name(s->datatype);
        size_t n = spec_elems(s), bytes_before = bin.len;
        raw_off[i] = bin.len;
        sb_printf(&js, "%s{\"name\":\"%s\",\"datatype\":\"%s\",\"shape\":[", i ? "," : "", s->name,
                  s->datatype);
        for (size_t j = 0; j < s->ndims; j++)
            sb_printf(&js, "%s%" PRId64, j ? "," : "", s->dims[j]);
        sb_printf(&js, "]");
        if (!binary)
            sb_printf(&js, ",\"data\":[");
        for (size_t e = 0; e < n; e++) {
            double x;
            if (file) {
                x = rows[pos];
                pos = (pos + 1) % nrows_vals;
            } else if (strcmp(d->input_data, "zero") == 0) {
                x = 0;
            } else if (dt == KEEL_TYPE_FP32 || dt == KEEL_TYPE_FP64 || dt == KEEL_TYPE_FP16) {
                x = (double)(xorshift(rng) >> 11) / 9007199254740992.0;
            } else if (dt == KEEL_TYPE_BOOL) {
                x = (double)(xorshift(rng) & 1);
            } else {
                x = (double)(xorshift(rng) % 100);
            }
            if (!binary && e > 0)
                sb_add(&js, ",", 1);
            put_value(binary ? NULL : &js, binary ? &bin : NULL, dt, x);
        }
        raw_len[i] = bin.len - bytes_before;
        if (binary)
            sb_printf(&js, ",\"parameters\":{\"binary_data_size\":%zu}}", bin.len - bytes_before);
        else
            sb_printf(&js, "]}");
    }
    sb_printf(&js, "]%s}", w->binary ? ",\"parameters\":{\"binary_data_output\":true}" : "");
    if (js.oom || bin.oom) {
        perf_errf(errbuf, errlen, "out of memory");
        goto done;
    }
    if (w->grpc) {
        const void *raw[8];
        char id[32];
        unsigned char *msg;
        for (size_t i = 0; i < w->ninputs; i++)
            raw[i] = bin.p + raw_off[i];
        snprintf(id, sizeof(id), "perf-%zu", k);
        if (!perf_grpc_pack_infer(w, id, raw, raw_len, &msg, &w->req_lens[k])) {
            perf_errf(errbuf, errlen, "out of memory");
            goto done;
        }
        w->reqs[k] = (char *)msg;
        ok = true;
        goto done;
    }
    sb_printf(&req,
              "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n",
              path, w->target.host, w->target.port,
              w->binary ? "application/octet-stream" : "application/json", js.len + bin.len);
    if (w->binary)
        sb_printf(&req, "Inference-Header-Content-Length: %zu\r\n", js.len);
    sb_add(&req, "\r\n", 2);
    sb_add(&req, js.p, js.len);
    if (bin.len > 0)
        sb_add(&req, bin.p, bin.len);
    if (req.oom) {
        perf_errf(errbuf, errlen, "out of memory");
        goto done;
    }
    w->reqs[k] = req.p;
    w->req_lens[k] = req.len;
    req.p = NULL;
    ok = true;
done:
    free(js.p);
    free(bin.p);
    free(req.p);
    return ok;
}

bool perf_workload_prepare(perf_workload *w, const perf_data_opts *d, char *errbuf, size_t errlen)
{
    double *rows = NULL;
    size_t nvals = 0, nreqs;
    uint64_t rng = d->seed != 0 ? d->seed : 0x9e3779b97f4a7c15ULL;
    bool ok = false;

    if (w->endpoint != NULL) {
        sbuf req = {0};
        sb_printf(&req, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n", w->endpoint, w->target.host,
                  w->target.port);
        if (req.oom || (w->reqs = calloc(1, sizeof(*w->reqs))) == NULL ||
            (w->req_lens = calloc(1, sizeof(*w->req_lens))) == NULL) {
            free(req.p);
            perf_errf(errbuf, errlen, "out of memory");
            return false;
        }
        w->reqs[0] = req.p;
        w->req_lens[0] = req.len;
        w->nreqs = 1;
        return true;
    }
    if (w->ninputs == 0) {
        if (!fetch_inputs(w, errbuf, errlen))
            return false;
    } else if (w->grpc) {
        /* The inputs were given, but an unreachable server (or not a gRPC one) is still said
         * once, clearly, instead of as a run of failed calls. */
        json_t *doc = NULL;
        bool unreachable = false;
        if (!perf_grpc_model_metadata(&w->target, w->model, w->version, 10, &doc, &unreachable,
                                      errbuf, errlen) &&
            unreachable)
            return false;
        json_decref(doc);
    }
    if (d->input_data != NULL && strcmp(d->input_data, "random") != 0 &&
        strcmp(d->input_data, "zero") != 0) {
        if (w->ninputs != 1) {
            perf_errf(errbuf, errlen, "--input-data FILE needs a model with one input (it has %zu)",
                      w->ninputs);
            return false;
        }
        if (!read_rows(d->input_data, &rows, &nvals, errbuf, errlen))
            return false;
        /* Enough requests to cover every row once (at most 1024 distinct bodies). */
        nreqs = (nvals + spec_elems(&w->inputs[0]) - 1) / spec_elems(&w->inputs[0]);
        if (nreqs > 1024)
            nreqs = 1024;
    } else {
        nreqs = d->variants > 0 ? d->variants : 16;
        if (d->input_data != NULL && strcmp(d->input_data, "zero") == 0)
            nreqs = 1;
    }
    if ((w->reqs = calloc(nreqs, sizeof(*w->reqs))) == NULL ||
        (w->req_lens = calloc(nreqs, sizeof(*w->req_lens))) == NULL) {
        perf_errf(errbuf, errlen, "out of memory");
        goto done;
    }
    for (size_t k = 0; k < nreqs; k++) {
        if (!build_request(w, d, k, rows, nvals, &rng, errbuf, errlen))
            goto done;
        w->nreqs = k + 1;
    }
    ok = true;
done:
    free(rows);
    return ok;
}

void perf_workload_fini(perf_workload *w)
{
    for (size_t i = 0; i < w->nreqs; i++)
        free(w->reqs[i]);
    free(w->reqs);
    free(w->req_lens);
    w->reqs = NULL;
    w->req_lens = NULL;
    w->nreqs = 0;
}

bool perf_server_rows(const perf_workload *w, uint64_t *rows, uint64_t *execs)
{
    perf_client c;
    char path[512], err[256];
    const char *body = NULL;
    size_t len = 0;
    int status = 0;
    json_t *doc = NULL, *e;
    bool ok = false;

    if (w->grpc || w->model == NULL)
        return false; /* the statistics come from the HTTP port */
    perf_client_init(&c, &w->target);
    if (w->version != NULL)
        snprintf(path, sizeof(path), "/v2/models/%s/versions/%s/stats", w->model, w->version);
    else
        snprintf(path, sizeof(path), "/v2/models/%s/stats", w->model);
    if (perf_client_request(&c, "GET", path, NULL, NULL, 0, 10, &status, &body, &len, err,
                            sizeof(err)) &&
        status == 200 && (doc = json_loadb(body, len, 0, NULL)) != NULL &&
        (e = json_array_get(json_object_get(doc, "model_stats"), 0)) != NULL &&
        json_is_integer(json_object_get(e, "inference_count")) &&
        json_is_integer(json_object_get(e, "execution_count"))) {
        *rows = (uint64_t)json_integer_value(json_object_get(e, "inference_count"));
        *execs = (uint64_t)json_integer_value(json_object_get(e, "execution_count"));
        ok = true;
    }
    json_decref(doc);
    perf_client_fini(&c);
    return ok;
}
