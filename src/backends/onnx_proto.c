/*
 * onnx_proto.c: see onnx_proto.h.
 *
 * DESIGN
 * Protobuf wire format: each field is a varint key (field number << 3 | wire type) followed by
 * a varint (type 0), 8 bytes (1), a varint length and that many bytes (2) or 4 bytes (5).
 * Groups (3, 4) are not used by ONNX and are refused. A reader walks one message's bytes with
 * pb_next(), which checks every length against what is left; sub-messages are read by
 * starting a new reader on their bytes. The field numbers below are those of onnx.proto
 * (ONNX 1.x, stable since IR version 3).
 *
 * Graph inputs minus initializers: ONNX files written before IR version 4 list every weight
 * as a graph input too; those are not inputs a client can feed. Initializer names are
 * collected (pointers into the file's bytes), sorted, and each input is looked up.
 */
#include "backends/onnx_proto.h"

#include <string.h>

#include "core/core.h"

/* onnx.proto field numbers. */
enum {
    MODEL_GRAPH = 7,
    GRAPH_INITIALIZER = 5,
    GRAPH_SPARSE_INITIALIZER = 15,
    GRAPH_INPUT = 11,
    GRAPH_OUTPUT = 12,
    VALUE_NAME = 1,
    VALUE_TYPE = 2,
    TYPE_TENSOR = 1,
    TENSORTYPE_ELEM = 1,
    TENSORTYPE_SHAPE = 2,
    SHAPE_DIM = 1,
    DIM_VALUE = 1,
    DIM_PARAM = 2,
    TENSOR_DIMS = 1,
    TENSOR_DATA_TYPE = 2,
    TENSOR_FLOAT_DATA = 4,
    TENSOR_NAME = 8,
    TENSOR_RAW_DATA = 9,
    TENSOR_DATA_LOCATION = 14,
    SPARSE_VALUES = 1,
};

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

typedef struct pb {
    const uint8_t *p;
    size_t n;
    size_t pos;
    size_t base; /* offset of p in the whole file, for messages */
} pb;

/* One field: its number and wire type, and its value (v for varints and fixed ints, or the
 * bytes of a length-delimited field). */
typedef struct pb_field {
    uint32_t num;
    int wt;
    uint64_t v;
    const uint8_t *bytes;
    size_t len;
    size_t at; /* offset of the bytes in the file */
} pb_field;

static bool pb_varint(pb *r, uint64_t *out)
{
    uint64_t v = 0;

    for (int shift = 0; shift < 64; shift += 7) {
        uint8_t b;

        if (r->pos >= r->n)
            return false;
        b = r->p[r->pos++];
        v |= (uint64_t)(b & 0x7f) << shift;
        if ((b & 0x80) == 0) {
            *out = v;
            return true;
        }
    }
    return false; /* more than 10 bytes */
}

/* Reads the next field. Returns 1 on a field, 0 at the end, -1 on malformed bytes. */
static int pb_next(pb *r, pb_field *f)
{
    uint64_t key, len;

    if (r->pos == r->n)
        return 0;
    if (!pb_varint(r, &key) || (key >> 3) == 0 || (key >> 3) > UINT32_MAX)
        return -1;
    f->num = (uint32_t)(key >> 3);
    f->wt = (int)(key & 7);
    f->bytes = NULL;
    f->len = 0;
    f->at = 0;
    f->v = 0;
    switch (f->wt) {
    case WT_VARINT:
        return pb_varint(r, &f->v) ? 1 : -1;
    case WT_I64:
    case WT_I32: {
        size_t k = f->wt == WT_I64 ? 8 : 4;
        if (r->n - r->pos < k)
            return -1;
        for (size_t i = 0; i < k; i++)
            f->v |= (uint64_t)r->p[r->pos + i] << (8 * i);
        r->pos += k;
        return 1;
    }
    case WT_LEN:
        if (!pb_varint(r, &len) || len > r->n - r->pos)
            return -1;
        f->bytes = r->p + r->pos;
        f->len = (size_t)len;
        f->at = r->base + r->pos;
        r->pos += (size_t)len;
        return 1;
    default:
        return -1;
    }
}

static pb pb_sub(const pb_field *f)
{
    pb r = {f->bytes, f->len, 0, f->at};
    return r;
}

const char *keel__onnx_type_name(int32_t t)
{
    static const char *const names[] = {"UNDEFINED",  "FLOAT",   "UINT8",  "INT8",   "UINT16",
                                        "INT16",      "INT32",   "INT64",  "STRING", "BOOL",
                                        "FLOAT16",    "DOUBLE",  "UINT32", "UINT64", "COMPLEX64",
                                        "COMPLEX128", "BFLOAT16"};

    if (t >= 0 && (size_t)t < sizeof(names) / sizeof(names[0]))
        return names[t];
    return "UNKNOWN";
}

/* ---- graph */

typedef struct name_ref {
    const uint8_t *p;
    size_t len;
} name_ref;

static int name_cmp(const void *a, const void *b)
{
    const name_ref *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = n > 0 ? memcmp(x->p, y->p, n) : 0; /* an unnamed initializer has p == NULL */

    if (c != 0)
        return c;
    return x->len < y->len ? -1 : x->len > y->len ? 1 : 0;
}

/* Copies a name field into dst; false if it is too long or holds a NUL. */
static bool copy_name(char *dst, const pb_field *f)
{
    if (f->len >= KEEL__ONNX_MAX_NAME || memchr(f->bytes, '\0', f->len) != NULL)
        return false;
    memcpy(dst, f->bytes, f->len);
    dst[f->len] = '\0';
    return true;
}

typedef struct graph_reader {
    const char *what;
    char *errbuf;
    size_t errlen;
} graph_reader;

static keel_err malformed(const graph_reader *gr, const pb *r, const char *where)
{
    keel__errf(gr->errbuf, gr->errlen, "%s: not a valid ONNX model (malformed %s at byte %zu)",
               gr->what, where, r->base + r->pos);
    return KEEL_ELOAD;
}

/* TensorShapeProto into v. */
static keel_err read_shape(const graph_reader *gr, pb r, keel__onnx_value *v)
{
    pb_field f, g;
    int rc;

    v->has_shape = true;
    while ((rc = pb_next(&r, &f)) == 1) {
        pb d;
        int64_t dim = KEEL__ONNX_DIM_UNKNOWN;

        if (f.num != SHAPE_DIM || f.wt != WT_LEN)
            continue;
        if (v->ndims == KEEL__MAX_DIMS) {
            keel__errf(gr->errbuf, gr->errlen, "%s: tensor '%s' has more than %d dimensions",
                       gr->what, v->name, KEEL__MAX_DIMS);
            return KEEL_ELOAD;
        }
        d = pb_sub(&f);
        while ((rc = pb_next(&d, &g)) == 1) {
            if (g.num == DIM_VALUE && g.wt == WT_VARINT)
                dim = (int64_t)g.v > 0 ? (int64_t)g.v : KEEL__ONNX_DIM_UNKNOWN;
            else if (g.num == DIM_PARAM)
                dim = KEEL__ONNX_DIM_UNKNOWN;
        }
        if (rc < 0)
            return malformed(gr, &d, "shape dimension");
        v->dims[v->ndims++] = dim;
    }
    return rc < 0 ? malformed(gr, &r, "shape") : KEEL_OK;
}

/* ValueInfoProto into v. */
static keel_err read_value(const graph_reader *gr, pb r, keel__onnx_value *v)
{
    pb_field f, g, h;
    keel_err err;
    int rc;

    memset(v, 0, sizeof(*v));
    while ((rc = pb_next(&r, &f)) == 1) {
        if (f.num == VALUE_NAME && f.wt == WT_LEN) {
            if (!copy_name(v->name, &f)) {
                keel__errf(gr->errbuf, gr->errlen,
                           "%s: a graph input or output name is longer than %d bytes or holds "
                           "a NUL",
                           gr->what, KEEL__ONNX_MAX_NAME - 1);
                return KEEL_ELOAD;
            }
        } else if (f.num == VALUE_TYPE && f.wt == WT_LEN) {
            pb t = pb_sub(&f);
            while ((rc = pb_next(&t, &g)) == 1) {
                pb tt;
                if (g.num != TYPE_TENSOR || g.wt != WT_LEN)
                    continue;
                tt = pb_sub(&g);
                while ((rc = pb_next(&tt, &h)) == 1) {
                    if (h.num == TENSORTYPE_ELEM && h.wt == WT_VARINT)
                        v->elem_type = (int32_t)h.v;
                    else if (h.num == TENSORTYPE_SHAPE && h.wt == WT_LEN &&
                             (err = read_shape(gr, pb_sub(&h), v)) != KEEL_OK)
                        return err;
                }
                if (rc < 0)
                    return malformed(gr, &tt, "tensor type");
            }
            if (rc < 0)
                return malformed(gr, &t, "type");
        }
    }
    if (rc < 0)
        return malformed(gr, &r, "value info");
    if (v->name[0] == '\0') {
        keel__errf(gr->errbuf, gr->errlen, "%s: a graph input or output has no name", gr->what);
        return KEEL_ELOAD;
    }
    return KEEL_OK;
}

/* Name of an initializer (TensorProto.name) or a sparse initializer (values.name). */
static bool initializer_name(const pb_field *f, bool sparse, name_ref *out)
{
    pb r = pb_sub(f);
    pb_field g;
    int rc;

    out->p = NULL;
    out->len = 0;
    while ((rc = pb_next(&r, &g)) == 1) {
        if (sparse && g.num == SPARSE_VALUES && g.wt == WT_LEN)
            return initializer_name(&g, false, out);
        if (!sparse && g.num == TENSOR_NAME && g.wt == WT_LEN) {
            out->p = g.bytes;
            out->len = g.len;
        }
    }
    return rc == 0;
}

keel_err keel__onnx_graph_read(const void *bytes, size_t len, const char *what, keel__onnx_graph *g,
                               char *errbuf, size_t errlen)
{
    graph_reader gr = {what, errbuf, errlen};
    pb m = {bytes, len, 0, 0}, r;
    pb_field f, graph = {0};
    name_ref *inits = NULL;
    size_t ninits = 0, cap = 0, nin = 0;
    bool have_graph = false;
    keel_err err = KEEL_OK;
    int rc;

    memset(g, 0, sizeof(*g));
    while ((rc = pb_next(&m, &f)) == 1) {
        if (f.num == MODEL_GRAPH && f.wt == WT_LEN) {
            graph = f;
            have_graph = true;
        }
    }
    if (rc < 0)
        return malformed(&gr, &m, "model");
    if (!have_graph) {
        keel__errf(errbuf, errlen, "%s: not an ONNX model (no graph)", what);
        return KEEL_ELOAD;
    }

    /* First pass: initializer names. */
    r = pb_sub(&graph);
    while ((rc = pb_next(&r, &f)) == 1) {
        name_ref n;
        if ((f.num != GRAPH_INITIALIZER && f.num != GRAPH_SPARSE_INITIALIZER) || f.wt != WT_LEN)
            continue;
        if (!initializer_name(&f, f.num == GRAPH_SPARSE_INITIALIZER, &n)) {
            err = malformed(&gr, &r, "initializer");
            goto done;
        }
        if (ninits == cap) {
            size_t ncap = cap == 0 ? 64 : cap * 2;
            name_ref *p = keel__realloc(inits, ncap * sizeof(*inits));
            if (p == NULL) {
                keel__errf(errbuf, errlen, "%s: out of memory reading the graph", what);
                err = KEEL_ENOMEM;
                goto done;
            }
            inits = p;
            cap = ncap;
        }
        inits[ninits++] = n;
    }
    if (rc < 0) {
        err = malformed(&gr, &r, "graph");
        goto done;
    }
    if (ninits > 1)
        qsort(inits, ninits, sizeof(*inits), name_cmp);

    /* Second pass: inputs (minus initializers) and outputs, in file order. */
    r = pb_sub(&graph);
    while ((rc = pb_next(&r, &f)) == 1) {
        keel__onnx_value *v;
        bool input = f.num == GRAPH_INPUT;

        if ((f.num != GRAPH_INPUT && f.num != GRAPH_OUTPUT) || f.wt != WT_LEN)
            continue;
        if ((input ? g->ninputs : g->noutputs) == KEEL__ONNX_MAX_IO) {
            keel__errf(errbuf, errlen, "%s: the graph has more than %d %s", what, KEEL__ONNX_MAX_IO,
                       input ? "inputs" : "outputs");
            err = KEEL_ELOAD;
            goto done;
        }
        v = input ? &g->inputs[g->ninputs] : &g->outputs[g->noutputs];
        if ((err = read_value(&gr, pb_sub(&f), v)) != KEEL_OK)
            goto done;
        if (input) {
            name_ref key = {(const uint8_t *)v->name, strlen(v->name)};
            nin++;
            if (ninits > 0 && bsearch(&key, inits, ninits, sizeof(*inits), name_cmp) != NULL)
                continue; /* a weight, not a graph input */
            g->ninputs++;
        } else {
            g->noutputs++;
        }
    }
    if (rc < 0) {
        err = malformed(&gr, &r, "graph");
        goto done;
    }
    if (g->ninputs == 0 || g->noutputs == 0) {
        keel__errf(errbuf, errlen, "%s: the graph has no %s", what,
                   g->ninputs == 0 ? (nin > 0 ? "inputs besides its initializers" : "inputs")
                                   : "outputs");
        err = KEEL_ELOAD;
        goto done;
    }

done:
    free(inits);
    return err;
}

/* ---- TensorProto */

keel_err keel__onnx_tensor_read(const void *bytes, size_t len, const char *what,
                                keel__onnx_tensor *t, char *errbuf, size_t errlen)
{
    graph_reader gr = {what, errbuf, errlen};
    pb r = {bytes, len, 0, 0};
    pb_field f, raw = {0}, packed = {0};
    size_t nfloat = 0, count = 1;
    bool have_raw = false;
    int rc;

    memset(t, 0, sizeof(*t));
    while ((rc = pb_next(&r, &f)) == 1) {
        switch (f.num) {
        case TENSOR_DIMS:
            if (f.wt == WT_VARINT) {
                if (t->ndims == KEEL__MAX_DIMS)
                    goto too_many;
                t->dims[t->ndims++] = (int64_t)f.v;
            } else if (f.wt == WT_LEN) { /* packed */
                pb d = pb_sub(&f);
                uint64_t v;
                while (d.pos < d.n) {
                    if (!pb_varint(&d, &v))
                        return malformed(&gr, &d, "dims");
                    if (t->ndims == KEEL__MAX_DIMS)
                        goto too_many;
                    t->dims[t->ndims++] = (int64_t)v;
                }
            }
            break;
        case TENSOR_DATA_TYPE:
            t->data_type = (int32_t)f.v;
            break;
        case TENSOR_NAME:
            if (f.wt == WT_LEN && !copy_name(t->name, &f))
                return malformed(&gr, &r, "name");
            break;
        case TENSOR_RAW_DATA:
            if (f.wt == WT_LEN) {
                raw = f;
                have_raw = true;
            }
            break;
        case TENSOR_FLOAT_DATA:
            if (f.wt == WT_LEN) {
                packed = f;
                nfloat = f.len / 4;
            }
            break;
        case TENSOR_DATA_LOCATION:
            if (f.v != 0) {
                keel__errf(errbuf, errlen, "%s: external tensor data is not supported", what);
                return KEEL_EINVAL;
            }
            break;
        default:
            break;
        }
    }
    if (rc < 0)
        return malformed(&gr, &r, "tensor");
    if (t->data_type != KEEL__ONNX_FLOAT) {
        keel__errf(errbuf, errlen, "%s: tensor '%s' is %s, only FLOAT is supported", what, t->name,
                   keel__onnx_type_name(t->data_type));
        return KEEL_EINVAL;
    }
    for (size_t i = 0; i < t->ndims; i++) {
        if (t->dims[i] < 0 || keel__mul_overflow_size(count, (size_t)t->dims[i], &count) ||
            count > ((size_t)1 << 30)) {
            keel__errf(errbuf, errlen, "%s: tensor '%s' has invalid dims", what, t->name);
            return KEEL_EINVAL;
        }
    }
    if ((have_raw ? raw.len : packed.len) != count * 4) {
        keel__errf(errbuf, errlen, "%s: tensor '%s' holds %zu bytes of data, its dims need %zu",
                   what, t->name, have_raw ? raw.len : packed.len, count * 4);
        return KEEL_EINVAL;
    }
    (void)nfloat;
    t->count = count;
    if (count == 0)
        return KEEL_OK;
    if ((t->data = keel__malloc(count * sizeof(float))) == NULL) {
        keel__errf(errbuf, errlen, "%s: out of memory", what);
        return KEEL_ENOMEM;
    }
    /* Both encodings are little-endian IEEE floats, as is every machine keel runs on. */
    memcpy(t->data, have_raw ? raw.bytes : packed.bytes, count * 4);
    return KEEL_OK;

too_many:
    keel__errf(errbuf, errlen, "%s: tensor has more than %d dims", what, KEEL__MAX_DIMS);
    return KEEL_EINVAL;
}
