/*
 * grpc_codec.c: protobuf-c messages <-> keel requests, and JSON -> protobuf; see
 * grpc_codec.h. No locks, no threads: called by grpc_server.c on its completion-queue thread
 * (decode, JSON) and on keel's completion threads (encode).
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc_codec.h"

#define MAX_DIMS 16      /* as the HTTP codec (v2codec_internal.h) */
#define MAX_TENSORS 1024 /* inputs, outputs */
#define MAX_PARAMS 256

static keel_err fail(char *err, size_t errlen, keel_err code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static keel_err fail(char *err, size_t errlen, keel_err code, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    if (vsnprintf(err, errlen, fmt, ap) < 0)
        snprintf(err, errlen, "invalid request");
    va_end(ap);
    return code;
}

bool keel__grpc_parse_version(const char *s, int64_t *out)
{
    int64_t v = 0;

    if (s == NULL || *s == '\0') {
        *out = -1;
        return true;
    }
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9' || v > (INT64_MAX - (*s - '0')) / 10)
            return false;
        v = v * 10 + (*s - '0');
    }
    *out = v;
    return true;
}

/* "[2,3]" into buf (for error messages only: snprintf costs more than a whole call's
 * decoding, so the hot path never formats a shape). */
static const char *fmt_shape(char *buf, size_t len, const int64_t *shape, size_t n)
{
    size_t o = 0;

    o += (size_t)snprintf(buf, len, "[");
    for (size_t i = 0; i < n && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%" PRId64, i ? "," : "", shape[i]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
    return buf;
}

/* v in decimal into buf (at least 21 bytes): snprintf's cost, once per answer, is not. */
static void fmt_i64(char *buf, int64_t v)
{
    char tmp[24];
    size_t n = 0, o = 0;
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;

    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    if (v < 0)
        buf[o++] = '-';
    while (n > 0)
        buf[o++] = tmp[--n];
    buf[o] = '\0';
}

/* The element count of the shape, false on overflow. */
static bool elem_count(const int64_t *shape, size_t n, size_t *out)
{
    size_t c = 1;

    for (size_t i = 0; i < n; i++) {
        if ((uint64_t)shape[i] > SIZE_MAX || (shape[i] != 0 && c > SIZE_MAX / (size_t)shape[i]))
            return false;
        c *= (size_t)shape[i];
    }
    *out = c;
    return true;
}

/* Checks BYTES data: exactly count 4-byte-length-prefixed elements. */
static bool bytes_well_formed(const uint8_t *p, size_t len, size_t count)
{
    size_t off = 0;

    for (size_t i = 0; i < count; i++) {
        uint32_t n;
        if (len - off < 4)
            return false;
        n = (uint32_t)p[off] | (uint32_t)p[off + 1] << 8 | (uint32_t)p[off + 2] << 16 |
            (uint32_t)p[off + 3] << 24;
        off += 4;
        if (len - off < n)
            return false;
        off += n;
    }
    return off == len;
}

/* The typed contents of input i as keel's raw little-endian bytes; *data malloc'd. */
static keel_err typed_data(size_t i, keel_datatype dt, const Inference__InferTensorContents *c,
                           size_t count, const int64_t *shape, size_t ndim, uint8_t **data,
                           size_t *bytes, char *err, size_t errlen)
{
    size_t have = 0, esz = keel_datatype_size(dt), total = 0;
    const char *field = "";
    uint8_t *buf = NULL;
    char sh[256];

    *data = NULL;
    *bytes = 0;
    switch (dt) {
    case KEEL_TYPE_BOOL:
        have = c->n_bool_contents, field = "bool_contents";
        break;
    case KEEL_TYPE_INT8:
    case KEEL_TYPE_INT16:
    case KEEL_TYPE_INT32:
        have = c->n_int_contents, field = "int_contents";
        break;
    case KEEL_TYPE_INT64:
        have = c->n_int64_contents, field = "int64_contents";
        break;
    case KEEL_TYPE_UINT8:
    case KEEL_TYPE_UINT16:
    case KEEL_TYPE_UINT32:
        have = c->n_uint_contents, field = "uint_contents";
        break;
    case KEEL_TYPE_UINT64:
        have = c->n_uint64_contents, field = "uint64_contents";
        break;
    case KEEL_TYPE_FP32:
        have = c->n_fp32_contents, field = "fp32_contents";
        break;
    case KEEL_TYPE_FP64:
        have = c->n_fp64_contents, field = "fp64_contents";
        break;
    case KEEL_TYPE_BYTES:
        have = c->n_bytes_contents, field = "bytes_contents";
        break;
    case KEEL_TYPE_FP16:
        return fail(err, errlen, KEEL_EINVAL,
                    "inputs[%zu]: FP16 data must be sent in raw_input_contents (the typed "
                    "contents have no FP16 field)",
                    i);
    default:
        return fail(err, errlen, KEEL_EINVAL, "inputs[%zu]: unsupported datatype", i);
    }
    if (have != count)
        return fail(err, errlen, KEEL_EINVAL,
                    "inputs[%zu].contents.%s: %zu elements given, shape %s needs %zu", i, field,
                    have, fmt_shape(sh, sizeof(sh), shape, ndim), count);
    if (dt == KEEL_TYPE_BYTES) {
        for (size_t k = 0; k < count; k++) {
            if (c->bytes_contents[k].len > UINT32_MAX ||
                total > SIZE_MAX - 4 - c->bytes_contents[k].len)
                return fail(err, errlen, KEEL_EINVAL,
                            "inputs[%zu].contents.bytes_contents[%zu]: too large", i, k);
            total += 4 + c->bytes_contents[k].len;
        }
    } else {
        total = count * esz; /* count * esz <= the message size: no overflow */
    }
    if ((buf = malloc(total > 0 ? total : 1)) == NULL)
        return fail(err, errlen, KEEL_ENOMEM, "out of memory while decoding the request");
    for (size_t k = 0, off = 0; k < count; k++) {
        switch (dt) {
        case KEEL_TYPE_BOOL:
            buf[k] = c->bool_contents[k] ? 1 : 0;
            break;
        case KEEL_TYPE_INT8:
        case KEEL_TYPE_INT16: {
            int32_t v = c->int_contents[k];
            int32_t lo = dt == KEEL_TYPE_INT8 ? INT8_MIN : INT16_MIN;
            int32_t hi = dt == KEEL_TYPE_INT8 ? INT8_MAX : INT16_MAX;
            if (v < lo || v > hi) {
                free(buf);
                return fail(err, errlen, KEEL_EINVAL,
                            "inputs[%zu].contents.int_contents[%zu]: %" PRId32
                            " is out of range for datatype %s",
                            i, k, v, keel_datatype_name(dt));
            }
            if (dt == KEEL_TYPE_INT8) {
                int8_t b = (int8_t)v;
                memcpy(buf + k, &b, 1);
            } else {
                int16_t h = (int16_t)v;
                memcpy(buf + 2 * k, &h, 2);
            }
            break;
        }
        case KEEL_TYPE_INT32:
            memcpy(buf + 4 * k, &c->int_contents[k], 4);
            break;
        case KEEL_TYPE_INT64:
            memcpy(buf + 8 * k, &c->int64_contents[k], 8);
            break;
        case KEEL_TYPE_UINT8:
        case KEEL_TYPE_UINT16: {
            uint32_t v = c->uint_contents[k];
            uint32_t hi = dt == KEEL_TYPE_UINT8 ? UINT8_MAX : UINT16_MAX;
            if (v > hi) {
                free(buf);
                return fail(err, errlen, KEEL_EINVAL,
                            "inputs[%zu].contents.uint_contents[%zu]: %" PRIu32
                            " is out of range for datatype %s",
                            i, k, v, keel_datatype_name(dt));
            }
            if (dt == KEEL_TYPE_UINT8) {
                buf[k] = (uint8_t)v;
            } else {
                uint16_t h = (uint16_t)v;
                memcpy(buf + 2 * k, &h, 2);
            }
            break;
        }
        case KEEL_TYPE_UINT32:
            memcpy(buf + 4 * k, &c->uint_contents[k], 4);
            break;
        case KEEL_TYPE_UINT64:
            memcpy(buf + 8 * k, &c->uint64_contents[k], 8);
            break;
        case KEEL_TYPE_FP32:
            memcpy(buf + 4 * k, &c->fp32_contents[k], 4);
            break;
        case KEEL_TYPE_FP64:
            memcpy(buf + 8 * k, &c->fp64_contents[k], 8);
            break;
        case KEEL_TYPE_BYTES: {
            uint32_t n = (uint32_t)c->bytes_contents[k].len;
            buf[off] = (uint8_t)n;
            buf[off + 1] = (uint8_t)(n >> 8);
            buf[off + 2] = (uint8_t)(n >> 16);
            buf[off + 3] = (uint8_t)(n >> 24);
            if (n > 0)
                memcpy(buf + off + 4, c->bytes_contents[k].data, n);
            off += 4 + (size_t)n;
            break;
        }
        default:
            break;
        }
    }
    *data = buf;
    *bytes = total;
    return KEEL_OK;
}

/* Sets one request parameter from an InferParameter. */
static keel_err set_param(keel_request *req, const char *key, const Inference__InferParameter *p,
                          char *err, size_t errlen)
{
    char num[40];
    const char *val = NULL;

    if (p == NULL)
        return fail(err, errlen, KEEL_EINVAL, "parameters.%.64s: no value", key);
    switch (p->parameter_choice_case) {
    case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM:
        val = p->bool_param ? "true" : "false";
        break;
    case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM:
        snprintf(num, sizeof(num), "%" PRId64, p->int64_param);
        val = num;
        break;
    case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM:
        snprintf(num, sizeof(num), "%" PRIu64, p->uint64_param);
        val = num;
        break;
    case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_DOUBLE_PARAM:
        snprintf(num, sizeof(num), "%.17g", p->double_param);
        val = num;
        break;
    case INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM:
        val = p->string_param;
        break;
    default:
        return fail(err, errlen, KEEL_EINVAL, "parameters.%.64s: no value", key);
    }
    if (keel_request_set_parameter(req, key, val) != KEEL_OK)
        return fail(err, errlen, KEEL_ENOMEM, "out of memory while decoding the request");
    return KEEL_OK;
}

static keel_err decode_params(const Inference__ModelInferRequest *m, keel_request *req,
                              uint64_t *timeout_us, char *err, size_t errlen)
{
    keel_err e;

    if (m->n_parameters > MAX_PARAMS)
        return fail(err, errlen, KEEL_EINVAL, "parameters: more than %d parameters", MAX_PARAMS);
    for (size_t i = 0; i < m->n_parameters; i++) {
        const char *key = m->parameters[i]->key;
        const Inference__InferParameter *p = m->parameters[i]->value;
        if (key == NULL || key[0] == '\0')
            return fail(err, errlen, KEEL_EINVAL, "parameters: a parameter name must not be empty");
        for (size_t j = 0; j < i; j++) {
            if (strcmp(m->parameters[j]->key, key) == 0)
                return fail(err, errlen, KEEL_EINVAL, "parameters.%.64s: given more than once",
                            key);
        }
        if (strcmp(key, "timeout") == 0) {
            /* Triton's request timeout, in microseconds. */
            if (p != NULL &&
                p->parameter_choice_case ==
                    INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM &&
                p->int64_param >= 0) {
                *timeout_us = (uint64_t)p->int64_param;
                continue;
            }
            if (p != NULL && p->parameter_choice_case ==
                                 INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM) {
                *timeout_us = p->uint64_param;
                continue;
            }
            return fail(err, errlen, KEEL_EINVAL,
                        "parameters.timeout: expected a non-negative integer (microseconds)");
        }
        if (strcmp(key, "priority") == 0) {
            /* Triton's request priority level (1 = highest; 0 = the model's default). */
            if (p != NULL && ((p->parameter_choice_case ==
                                   INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM &&
                               p->int64_param >= 0 && p->int64_param <= UINT32_MAX) ||
                              (p->parameter_choice_case ==
                                   INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM &&
                               p->uint64_param <= UINT32_MAX))) {
                keel_request_set_priority(
                    req, p->parameter_choice_case ==
                                 INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM
                             ? (uint32_t)p->int64_param
                             : (uint32_t)p->uint64_param);
                continue;
            }
            return fail(err, errlen, KEEL_EINVAL,
                        "parameters.priority: expected a non-negative integer (a priority level)");
        }
        if (strcmp(key, "binary_data_output") == 0)
            continue; /* gRPC answers are always binary (raw_output_contents) */
        if ((e = set_param(req, key, p, err, errlen)) != KEEL_OK)
            return e;
    }
    return KEEL_OK;
}

keel_err keel__grpc_decode_infer(const Inference__ModelInferRequest *m, keel_request *req,
                                 uint64_t *timeout_us, char *err, size_t errlen)
{
    size_t nraw = m->n_raw_input_contents;
    keel_err e;

    err[0] = '\0';
    *timeout_us = 0;
    if (m->n_inputs == 0)
        return fail(err, errlen, KEEL_EINVAL, "inputs: required");
    if (m->n_inputs > MAX_TENSORS)
        return fail(err, errlen, KEEL_EINVAL, "inputs: more than %d inputs", MAX_TENSORS);
    if (m->n_outputs > MAX_TENSORS)
        return fail(err, errlen, KEEL_EINVAL, "outputs: more than %d outputs", MAX_TENSORS);
    if (nraw > 0 && nraw != m->n_inputs)
        return fail(err, errlen, KEEL_EINVAL,
                    "raw_input_contents: %zu entries for %zu inputs (one per input, in the order "
                    "of inputs)",
                    nraw, m->n_inputs);
    /* Check every input before adding any, so that nothing tensor-sized is copied for a
     * request that is refused anyway. */
    for (size_t i = 0; i < m->n_inputs; i++) {
        const Inference__ModelInferRequest__InferInputTensor *t = m->inputs[i];
        keel_datatype dt;
        size_t count = 0;
        char shape[256];

        if (t->name == NULL || t->name[0] == '\0')
            return fail(err, errlen, KEEL_EINVAL, "inputs[%zu].name: required", i);
        for (size_t j = 0; j < i; j++) {
            if (strcmp(m->inputs[j]->name, t->name) == 0)
                return fail(err, errlen, KEEL_EINVAL,
                            "inputs[%zu]: input '%s' given more than once (also inputs[%zu])", i,
                            t->name, j);
        }
        dt = keel_datatype_from_name(t->datatype);
        if (dt == KEEL_TYPE_INVALID || strcmp(keel_datatype_name(dt), t->datatype) != 0)
            return fail(err, errlen, KEEL_EINVAL,
                        "inputs[%zu].datatype: unknown datatype \"%.64s\" (expected BOOL, UINT8, "
                        "UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64 or "
                        "BYTES)",
                        i, t->datatype);
        if (t->n_shape > MAX_DIMS)
            return fail(err, errlen, KEEL_EINVAL, "inputs[%zu].shape: more than %d dimensions", i,
                        MAX_DIMS);
        for (size_t k = 0; k < t->n_shape; k++) {
            if (t->shape[k] < 0)
                return fail(err, errlen, KEEL_EINVAL,
                            "inputs[%zu].shape[%zu]: expected a non-negative integer, got %" PRId64,
                            i, k, t->shape[k]);
        }
        if (!elem_count(t->shape, t->n_shape, &count))
            return fail(err, errlen, KEEL_EINVAL,
                        "inputs[%zu].shape: the element count of the shape overflows", i);
        if (nraw > 0) {
            const ProtobufCBinaryData *r = &m->raw_input_contents[i];
            size_t esz = keel_datatype_size(dt);
            if (t->contents != NULL)
                return fail(err, errlen, KEEL_EINVAL,
                            "inputs[%zu].contents: must be empty when raw_input_contents is used",
                            i);
            if (dt == KEEL_TYPE_BYTES) {
                if (!bytes_well_formed(r->data, r->len, count))
                    return fail(err, errlen, KEEL_EINVAL,
                                "raw_input_contents[%zu]: %zu bytes are not %zu BYTES elements "
                                "(each a 4-byte little-endian length and that many bytes)",
                                i, r->len, count);
            } else if (count > SIZE_MAX / esz || r->len != count * esz) {
                return fail(err, errlen, KEEL_EINVAL,
                            "raw_input_contents[%zu]: %zu bytes, shape %s of %s needs %zu", i,
                            r->len, fmt_shape(shape, sizeof(shape), t->shape, t->n_shape),
                            t->datatype, count > SIZE_MAX / esz ? 0 : count * esz);
            }
        } else {
            if (t->contents == NULL)
                return fail(err, errlen, KEEL_EINVAL,
                            "inputs[%zu].contents: required (or raw_input_contents)", i);
            /* Counts are checked when the data is converted, before it is added. */
        }
    }
    for (size_t i = 0; i < m->n_outputs; i++) {
        const Inference__ModelInferRequest__InferRequestedOutputTensor *t = m->outputs[i];
        if (t->name == NULL || t->name[0] == '\0')
            return fail(err, errlen, KEEL_EINVAL, "outputs[%zu].name: required", i);
        for (size_t j = 0; j < i; j++) {
            if (strcmp(m->outputs[j]->name, t->name) == 0)
                return fail(err, errlen, KEEL_EINVAL,
                            "outputs[%zu]: output '%s' requested more than once (also "
                            "outputs[%zu])",
                            i, t->name, j);
        }
        for (size_t k = 0; k < t->n_parameters; k++) {
            if (strcmp(t->parameters[k]->key, "classification") == 0)
                return fail(err, errlen, KEEL_EINVAL,
                            "outputs[%zu].parameters.classification: classification outputs "
                            "are not supported",
                            i);
        }
    }

    if (m->id != NULL && m->id[0] != '\0' && keel_request_set_id(req, m->id) != KEEL_OK)
        return fail(err, errlen, KEEL_ENOMEM, "out of memory while decoding the request");
    if ((e = decode_params(m, req, timeout_us, err, errlen)) != KEEL_OK)
        return e;
    for (size_t i = 0; i < m->n_inputs; i++) {
        const Inference__ModelInferRequest__InferInputTensor *t = m->inputs[i];
        keel_datatype dt = keel_datatype_from_name(t->datatype);
        uint8_t *owned = NULL;
        const void *data;
        size_t bytes;

        if (nraw > 0) {
            data = m->raw_input_contents[i].data;
            bytes = m->raw_input_contents[i].len;
        } else {
            size_t count = 0; /* elem_count succeeded in the first pass */
            elem_count(t->shape, t->n_shape, &count);
            if ((e = typed_data(i, dt, t->contents, count, t->shape, t->n_shape, &owned, &bytes,
                                err, errlen)) != KEEL_OK)
                return e;
            data = owned;
        }
        e = keel_request_add_input(req, t->name, dt, t->shape, t->n_shape, data != NULL ? data : "",
                                   bytes);
        free(owned);
        if (e != KEEL_OK)
            return fail(
                err, errlen, e == KEEL_ENOMEM ? KEEL_ENOMEM : KEEL_EINVAL, "inputs[%zu]: %s", i,
                keel_request_error(req)[0] != '\0' ? keel_request_error(req) : keel_strerror(e));
    }
    for (size_t i = 0; i < m->n_outputs; i++) {
        if ((e = keel_request_add_output(req, m->outputs[i]->name)) != KEEL_OK)
            return fail(
                err, errlen, e == KEEL_ENOMEM ? KEEL_ENOMEM : KEEL_EINVAL, "outputs[%zu]: %s", i,
                keel_request_error(req)[0] != '\0' ? keel_request_error(req) : keel_strerror(e));
    }
    return KEEL_OK;
}

/* ---------------------------------------------------------------- response */

void keel__grpc_infer_out_fini(grpc_infer_out *o)
{
    if (o->tensors != o->tensors_in)
        free(o->tensors);
    if (o->ptrs != o->ptrs_in)
        free(o->ptrs);
    if (o->raw != o->raw_in)
        free(o->raw);
    o->tensors = NULL;
    o->ptrs = NULL;
    o->raw = NULL;
}

keel_err keel__grpc_infer_out_fill(grpc_infer_out *o, const keel_request *req, const char *model,
                                   const Inference__ModelInferRequest *m, char *err, size_t errlen)
{
    static const Inference__ModelInferResponse init = INFERENCE__MODEL_INFER_RESPONSE__INIT;
    static const Inference__ModelInferResponse__InferOutputTensor tinit =
        INFERENCE__MODEL_INFER_RESPONSE__INFER_OUTPUT_TENSOR__INIT;
    size_t n = m != NULL && m->n_outputs > 0 ? m->n_outputs : keel_request_output_count(req);

    memset(o, 0, sizeof(*o));
    o->resp = init;
    fmt_i64(o->version, keel_request_model_version(req));
    o->resp.model_name = (char *)model;
    o->resp.model_version = o->version;
    o->resp.id = (char *)keel_request_id(req);
    if (n <= GRPC_OUT_INLINE) {
        o->tensors = o->tensors_in;
        o->ptrs = o->ptrs_in;
        o->raw = o->raw_in;
    } else if ((o->tensors = calloc(n, sizeof(*o->tensors))) == NULL ||
               (o->ptrs = calloc(n, sizeof(*o->ptrs))) == NULL ||
               (o->raw = calloc(n, sizeof(*o->raw))) == NULL) {
        keel__grpc_infer_out_fini(o);
        return fail(err, errlen, KEEL_ENOMEM, "out of memory while encoding the response");
    }
    for (size_t i = 0; i < n; i++) {
        keel_tensor_view v;
        keel_err e;
        if (m != NULL && m->n_outputs > 0)
            e = keel_request_output_by_name(req, m->outputs[i]->name, &v);
        else
            e = keel_request_output(req, i, &v);
        if (e != KEEL_OK) {
            keel__grpc_infer_out_fini(o);
            return fail(err, errlen, KEEL_EINTERNAL,
                        "requested output '%s' is missing from the result",
                        m != NULL && m->n_outputs > 0 ? m->outputs[i]->name : "?");
        }
        o->tensors[i] = tinit;
        o->tensors[i].name = (char *)v.name;
        o->tensors[i].datatype = (char *)keel_datatype_name(v.datatype);
        o->tensors[i].n_shape = v.ndim;
        o->tensors[i].shape = (int64_t *)v.shape;
        o->ptrs[i] = &o->tensors[i];
        o->raw[i].data = (uint8_t *)v.data;
        o->raw[i].len = v.bytes;
    }
    o->resp.n_outputs = n;
    o->resp.outputs = o->ptrs;
    o->resp.n_raw_output_contents = n;
    o->resp.raw_output_contents = o->raw;
    return KEEL_OK;
}

/* ---------------------------------------------------------------- JSON -> protobuf */

static bool json_u64(const json_t *v, uint64_t *out)
{
    if (json_is_integer(v) && json_integer_value(v) >= 0) {
        *out = (uint64_t)json_integer_value(v);
        return true;
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        char *end;
        if (*s < '0' || *s > '9')
            return false;
        *out = strtoull(s, &end, 10);
        return *end == '\0';
    }
    return false;
}

static bool json_i64(const json_t *v, int64_t *out)
{
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return true;
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        char *end;
        if (*s == '\0')
            return false;
        *out = strtoll(s, &end, 10);
        return *end == '\0';
    }
    return false;
}

static size_t elem_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        return 4;
    case PROTOBUF_C_TYPE_FLOAT:
        return sizeof(float);
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return 8;
    case PROTOBUF_C_TYPE_DOUBLE:
        return sizeof(double);
    case PROTOBUF_C_TYPE_STRING:
        return sizeof(char *);
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(ProtobufCMessage *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    }
    return 0;
}

/* Stores JSON value v as one element of field f at p. 1 stored, 0 skipped (wrong type),
 * -1 out of memory. */
static int store(const ProtobufCFieldDescriptor *f, const json_t *v, void *p)
{
    int64_t i64;
    uint64_t u64;

    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        if (!json_i64(v, &i64) || i64 < INT32_MIN || i64 > INT32_MAX)
            return 0;
        *(int32_t *)p = (int32_t)i64;
        return 1;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        if (!json_u64(v, &u64) || u64 > UINT32_MAX)
            return 0;
        *(uint32_t *)p = (uint32_t)u64;
        return 1;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        if (!json_i64(v, &i64))
            return 0;
        *(int64_t *)p = i64;
        return 1;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        if (!json_u64(v, &u64))
            return 0;
        *(uint64_t *)p = u64;
        return 1;
    case PROTOBUF_C_TYPE_FLOAT:
        if (!json_is_number(v))
            return 0;
        *(float *)p = (float)json_number_value(v);
        return 1;
    case PROTOBUF_C_TYPE_DOUBLE:
        if (!json_is_number(v))
            return 0;
        *(double *)p = json_number_value(v);
        return 1;
    case PROTOBUF_C_TYPE_BOOL:
        if (!json_is_boolean(v))
            return 0;
        *(protobuf_c_boolean *)p = json_is_true(v);
        return 1;
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumValue *ev;
        if (!json_is_string(v))
            return 0;
        ev = protobuf_c_enum_descriptor_get_value_by_name(f->descriptor, json_string_value(v));
        if (ev == NULL)
            return 0;
        *(int *)p = ev->value;
        return 1;
    }
    case PROTOBUF_C_TYPE_STRING: {
        char buf[32], *s;
        if (json_is_string(v))
            s = strdup(json_string_value(v));
        else if (json_is_integer(v))
            s = strdup(
                (snprintf(buf, sizeof(buf), "%" JSON_INTEGER_FORMAT, json_integer_value(v)), buf));
        else
            return 0;
        if (s == NULL)
            return -1;
        *(char **)p = s;
        return 1;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        ProtobufCMessage *sub;
        if (!json_is_object(v))
            return 0;
        if ((sub = keel__grpc_json_to_msg(f->descriptor, v)) == NULL)
            return -1;
        *(ProtobufCMessage **)p = sub;
        return 1;
    }
    case PROTOBUF_C_TYPE_BYTES:
        return 0;
    }
    return 0;
}

ProtobufCMessage *keel__grpc_json_to_msg(const ProtobufCMessageDescriptor *d, const json_t *j)
{
    ProtobufCMessage *m = calloc(1, d->sizeof_message);

    if (m == NULL)
        return NULL;
    protobuf_c_message_init(d, m);
    if (!json_is_object(j))
        return m;
    for (unsigned k = 0; k < d->n_fields; k++) {
        const ProtobufCFieldDescriptor *f = &d->fields[k];
        const json_t *v = json_object_get(j, f->name);
        char *base = (char *)m;

        if (v == NULL || json_is_null(v) || (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) != 0)
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = json_is_array(v) ? json_array_size(v) : 0, esz = elem_size(f->type), got = 0;
            char *arr;
            if (n == 0 || esz == 0)
                continue;
            if ((arr = calloc(n, esz)) == NULL)
                goto nomem;
            /* Owned by m from here (freed by free_unpacked through the count). */
            *(void **)(base + f->offset) = arr;
            for (size_t i = 0; i < n; i++) {
                int r = store(f, json_array_get(v, i), arr + got * esz);
                if (r < 0) {
                    *(size_t *)(base + f->quantifier_offset) = got;
                    goto nomem;
                }
                got += (size_t)r;
            }
            *(size_t *)(base + f->quantifier_offset) = got;
        } else {
            if (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_MESSAGE) {
                /* Replace the default (static empty string / NULL) only on success. */
                void *tmp = NULL;
                int r = store(f, v, &tmp);
                if (r < 0)
                    goto nomem;
                if (r > 0)
                    *(void **)(base + f->offset) = tmp;
            } else if (store(f, v, base + f->offset) < 0) {
                goto nomem;
            }
        }
    }
    return m;
nomem:
    protobuf_c_message_free_unpacked(m, NULL);
    return NULL;
}

const char *keel__grpc_code_name(int code)
{
    static const char *const names[17] = {"OK",
                                          "CANCELLED",
                                          "UNKNOWN",
                                          "INVALID_ARGUMENT",
                                          "DEADLINE_EXCEEDED",
                                          "NOT_FOUND",
                                          "ALREADY_EXISTS",
                                          "PERMISSION_DENIED",
                                          "RESOURCE_EXHAUSTED",
                                          "FAILED_PRECONDITION",
                                          "ABORTED",
                                          "OUT_OF_RANGE",
                                          "UNIMPLEMENTED",
                                          "INTERNAL",
                                          "UNAVAILABLE",
                                          "DATA_LOSS",
                                          "UNAUTHENTICATED"};

    return code >= 0 && code < 17 ? names[code] : "UNKNOWN";
}
