/*
 * xgboost.c: the "xgboost" backend, over the XGBoost 1.7 C API (Debian libxgboost-dev).
 *
 * DESIGN
 * The model is one BoosterHandle, loaded from the version directory and shared read-only by
 * every context of the generation. A context owns one proxy DMatrix and the buffer in which
 * the array-interface JSON of each request is formatted; it borrows the model and never
 * frees it.
 *
 * Why these calls (facts measured on 1.7.4):
 *  - The model file is read by us and handed to XGBoosterLoadModelFromBuffer, which tells
 *    JSON from UBJSON by content. XGBoosterLoadModel would pick the parser from the file's
 *    extension (a UBJSON file named .json fails) and treats the name as a dmlc URI, so any
 *    default_model_filename is accepted here and the content decides. A file that does not
 *    start with '{' (after whitespace) is refused before XGBoost sees it: it is garbage or the
 *    deprecated binary format, which the 1.7.4 xgboost CLI writes for every model_out not
 *    ending in .json, "model.ubj" included (XGBoosterSaveModel does write real UBJSON).
 *  - XGBoost's readers are not hardened: its UBJSON reader has no bounds checks (a truncated
 *    .ubj read past the buffer and crashed, or allocated gigabytes) and both readers recurse
 *    (deep nesting overflowed the stack). check_model_bytes walks the structure first so
 *    those files fail with a message. It cannot catch a well-formed model with corrupted
 *    values (a flipped bit in a child or feature index can still crash or hang XGBoost at
 *    the warm-up prediction): model files remain trusted input, as in Triton.
 *  - nthread=1: OpenMP inside one call is 4x slower at batch 1 on two cores; keel gets its
 *    parallelism from several contexts running at once. XGBoost applies nthread only at its
 *    lazy Configure(), so loading a model still runs OpenMP on all cores (libgomp starts a
 *    thread pool owned by the loading thread); prediction is single-threaded.
 *  - Inplace prediction (XGBoosterPredictFromDense) on a booster is thread-safe once the
 *    learner's lazy Configure() has run, so model_load runs one warm prediction before the
 *    model is shared, and concurrent_contexts is true. The result buffer is thread-local to
 *    the calling thread and overwritten by its next call, so run copies it out through
 *    io->emit before returning.
 *  - Passing a NULL proxy makes XGBoost build a fresh proxy per call, which re-reads the
 *    cgroup CPU quota files each time (2.5x slower); hence one proxy per context.
 *  - The prediction config needs "cache_id":0 (undocumented in 1.7.4). XGBoost's JSON reader
 *    accepts NaN, so "missing":NaN makes NaN inputs mean "feature absent", as in libsvm data.
 *  - XGBoost's "global" configuration (its verbosity) is thread-local in 1.7.4, so a
 *    pthread_once would silence only one thread. Every thread that enters this backend sets
 *    verbosity 0 once (a thread-local flag), which keeps XGBoost's warnings off stderr: the
 *    library never prints. XGBoost errors are returned, never logged, by its C API.
 *
 * Threads: model_load, context_create, context_destroy and model_free run on keel's loader
 * or reaper threads as backend.h describes; run is called on worker threads, one call at a
 * time per context, and several contexts of one model may run at once. No locks here.
 */
#include "backends/backend.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <xgboost/c_api.h>

#include "backends/model_check.h"
#include "backends/xgboost.h"
#include "core/core.h"
#include "core/heap.h"

/* Large enough for the array interface with 20-digit integers; checked at every format. */
#define ARRAY_IFACE_LEN 160

/*
 * What the output holds, with the meaning of Triton's FIL backend parameters (config.c
 * checks their values; docs/OPERATIONS.md):
 *  - RAW (output_class absent or "false"): XGBoost's predictions as they are.
 *  - CLASS (output_class "true"): the class index as FP32, one per row: for a model with one
 *    value per row (binary), 1 if the value is above `threshold` (default 0.5), else 0; for
 *    several values per row, the index of the largest (the first on a tie).
 *  - PROBA (output_class and predict_proba "true"): one probability per class. A binary
 *    model's single value p becomes [1 - p, p] when the config output has 2 values per row;
 *    with 1 value per row it is returned as it is (FIL counts binary models as one class).
 */
typedef enum xgb_output { XGB_RAW = 0, XGB_CLASS, XGB_PROBA } xgb_output;

typedef struct xgb_model {
    BoosterHandle booster;
    int64_t nfeatures; /* per row: product of the config input's dims */
    int64_t nout;      /* values per row: product of the config output's dims */
    int64_t nraw;      /* values per row XGBoost gives */
    xgb_output output;
    float threshold;
    size_t file_bytes; /* memory estimate */
} xgb_model;

typedef struct xgb_context {
    xgb_model *model; /* borrowed */
    DMatrixHandle proxy;
    bool batched;            /* cfg->max_batch_size > 0 */
    const char *output_name; /* borrowed from the generation's config */
    int64_t out_dims[KEEL__MAX_DIMS];
    size_t out_ndims;
    float *scratch; /* only used if an input is not 4-byte aligned */
    size_t scratch_len;
    float *post; /* the output after CLASS or PROBA post-processing */
    size_t post_len;
    char array_iface[ARRAY_IFACE_LEN];
} xgb_context;

/* "cache_id":0 is required by XGBoosterPredictFromDense in 1.7.4 although undocumented. */
static const char predict_config[] =
    "{\"type\":0,\"training\":false,\"iteration_begin\":0,\"iteration_end\":0,"
    "\"strict_shape\":false,\"missing\":NaN,\"cache_id\":0}";

/* XGBoost's verbosity lives in thread-local storage: silence each thread once. */
static void quiet_this_thread(void)
{
    static _Thread_local bool quiet;

    if (!quiet) {
        /* Failure only means warnings may reach stderr; nothing to report. */
        (void)XGBSetGlobalConfig("{\"verbosity\":0}");
        quiet = true;
    }
}

/* A model of one leaf (1 feature), as the xgboost 1.7.4 CLI writes it: loading it walks the
 * same path as a real load, with nothing to parse to speak of. */
static const char tiny_model[] =
    "{\"learner\":{\"attributes\":{},\"feature_names\":[],\"feature_types\":[],"
    "\"gradient_booster\":{\"model\":{\"gbtree_model_param\":{\"num_parallel_tree\":\"1\","
    "\"num_trees\":\"1\",\"size_leaf_vector\":\"0\"},\"tree_info\":[0],\"trees\":[{"
    "\"base_weights\":[-0E0],\"categories\":[],\"categories_nodes\":[],"
    "\"categories_segments\":[],\"categories_sizes\":[],\"default_left\":[0],\"id\":0,"
    "\"left_children\":[-1],\"loss_changes\":[0E0],\"parents\":[2147483647],"
    "\"right_children\":[-1],\"split_conditions\":[-0E0],\"split_indices\":[0],"
    "\"split_type\":[0],\"sum_hessian\":[1E0],\"tree_param\":{\"num_deleted\":\"0\","
    "\"num_feature\":\"1\",\"num_nodes\":\"1\",\"size_leaf_vector\":\"0\"}}]},"
    "\"name\":\"gbtree\"},\"learner_model_param\":{\"base_score\":\"5E-1\","
    "\"boost_from_average\":\"1\",\"num_class\":\"0\",\"num_feature\":\"1\","
    "\"num_target\":\"1\"},\"objective\":{\"name\":\"binary:logistic\","
    "\"reg_loss_param\":{\"scale_pos_weight\":\"1\"}}},\"version\":[1,7,4]}";

/* The first parse on a thread leaves state behind that lives as long as the thread: C++
 * thread-locals of XGBoost's learner (and their destructor registrations), and libgomp's
 * thread pool of the thread that starts a parallel region (LoadModel runs one). Loading and
 * freeing the tiny model once per thread creates all of it here, outside the build arena
 * (see xgb_model_load), where it would pin the arena forever. Failure only means the arena
 * may be kept (heap.c checks before destroying it); nothing to report. */
static void prepare_this_thread(void)
{
    static _Thread_local bool prepared;
    BoosterHandle b = NULL;

    if (prepared)
        return;
    prepared = true;
    if (XGBoosterCreate(NULL, 0, &b) == 0)
        (void)XGBoosterLoadModelFromBuffer(b, tiny_model, (bst_ulong)(sizeof(tiny_model) - 1));
    if (b != NULL)
        XGBoosterFree(b);
}

/* XGBoost's last error on this thread, without its "[hh:mm:ss] " prefix and the stack trace
 * some errors carry on the following lines. Returns the length to print with "%.*s". */
static int xgb_error(const char **msg)
{
    const char *m = XGBGetLastError();
    const char *end;

    if (m == NULL || *m == '\0')
        m = "unknown XGBoost error";
    if (m[0] == '[' && (end = strstr(m, "] ")) != NULL && end - m <= 16)
        m = end + 2;
    if ((end = strstr(m, "\nStack trace:")) == NULL)
        end = m + strlen(m);
    while (end > m && (end[-1] == '\n' || end[-1] == ' '))
        end--;
    *msg = m;
    return end - m > 4096 ? 4096 : (int)(end - m);
}

/* Product of dims; -1 if any dim is variable or the product overflows. */
static int64_t dims_product(const int64_t *dims, size_t ndims)
{
    int64_t n = 1;

    for (size_t i = 0; i < ndims; i++) {
        if (dims[i] < 0 || __builtin_mul_overflow(n, dims[i], &n))
            return -1;
    }
    return n;
}

/* The one input and one output the backend supports; ECONFIG otherwise. */
static keel_err check_config(const keel__model_config *cfg, char *errbuf, size_t errlen)
{
    char dims[96];

    if (cfg->ninputs != 1 || cfg->noutputs != 1) {
        keel__errf(errbuf, errlen,
                   "model '%s': the xgboost backend needs exactly one input and one output "
                   "(config has %zu inputs, %zu outputs)",
                   cfg->name, cfg->ninputs, cfg->noutputs);
        return KEEL_ECONFIG;
    }
    for (int i = 0; i < 2; i++) {
        const keel__tensor_config *t = i == 0 ? &cfg->inputs[0] : &cfg->outputs[0];
        const char *what = i == 0 ? "input" : "output";

        if (t->datatype != KEEL_TYPE_FP32) {
            keel__errf(errbuf, errlen, "model '%s': %s '%s' must be TYPE_FP32 (is %s)", cfg->name,
                       what, t->name, keel_datatype_name(t->datatype));
            return KEEL_ECONFIG;
        }
        if (dims_product(t->dims, t->ndims) <= 0) {
            keel__format_dims(dims, sizeof(dims), t->dims, t->ndims);
            keel__errf(errbuf, errlen,
                       "model '%s': %s '%s' dims %s must be fixed and non-empty for xgboost",
                       cfg->name, what, t->name, dims);
            return KEEL_ECONFIG;
        }
    }
    return KEEL_OK;
}

/*
 * Picks the model file: default_model_filename, else model.json, else model.ubj.
 * On KEEL_OK *out is a malloc'd path.
 */
static keel_err find_model_file(const keel__model_config *cfg, const char *version_dir, char **out,
                                char *errbuf, size_t errlen)
{
    static const char *const defaults[] = {"model.json", "model.ubj"};
    const char *const *names = defaults;
    size_t nnames = 2;
    struct stat st;

    *out = NULL;
    if (cfg->default_model_filename != NULL && cfg->default_model_filename[0] != '\0') {
        names = (const char *const *)&cfg->default_model_filename;
        nnames = 1;
    }
    for (size_t i = 0; i < nnames; i++) {
        char *path = NULL;
        size_t len = strlen(version_dir) + 1 + strlen(names[i]) + 1;

        if ((path = keel__malloc(len)) == NULL)
            return KEEL_ENOMEM;
        snprintf(path, len, "%s/%s", version_dir, names[i]);
        /* Any stat error other than "absent" is left for the open to report. */
        if (stat(path, &st) == 0 || (errno != ENOENT && errno != ENOTDIR)) {
            *out = path;
            return KEEL_OK;
        }
        free(path);
    }
    if (nnames == 1)
        keel__errf(errbuf, errlen, "%s/%s: model file not found", version_dir, names[0]);
    else
        keel__errf(errbuf, errlen, "%s: no model file (looked for model.json, model.ubj)",
                   version_dir);
    return KEEL_ELOAD;
}

/* Reads the whole file. On KEEL_OK *out is malloc'd (NUL-terminated) and *len its size. */
static keel_err read_file(const char *path, char **out, size_t *len, char *errbuf, size_t errlen)
{
    FILE *f = NULL;
    char *buf = NULL;
    struct stat st;
    keel_err err;

    *out = NULL;
    *len = 0;
    if ((f = fopen(path, "rbe")) == NULL) { /* e: O_CLOEXEC */
        keel__errf(errbuf, errlen, "%s: cannot open model file: %s", path, strerror(errno));
        err = KEEL_ELOAD;
        goto fail;
    }
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        keel__errf(errbuf, errlen, "%s: not a regular file", path);
        err = KEEL_ELOAD;
        goto fail;
    }
    if (st.st_size == 0) {
        keel__errf(errbuf, errlen, "%s: model file is empty", path);
        err = KEEL_ELOAD;
        goto fail;
    }
    if ((uint64_t)st.st_size >= SIZE_MAX) {
        keel__errf(errbuf, errlen, "%s: model file too large", path);
        err = KEEL_ELOAD;
        goto fail;
    }
    if ((buf = keel__malloc((size_t)st.st_size + 1)) == NULL) {
        err = KEEL_ENOMEM;
        goto fail;
    }
    if (fread(buf, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        keel__errf(errbuf, errlen, "%s: short read of model file", path);
        err = KEEL_ELOAD;
        goto fail;
    }
    buf[st.st_size] = '\0';
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

/* ---- structural checks of the model bytes, before XGBoost parses them */

/*
 * XGBoost 1.7's readers are recursive and its UBJSON reader does no bounds checking: a
 * truncated .ubj file makes it read past the buffer (SIGSEGV) or allocate gigabytes, and deep
 * nesting overflows the stack in either format (all measured). These checks walk the bytes
 * first so such files fail with a message instead of taking the process down. The UBJSON
 * grammar below is exactly what XGBoost 1.7.4's UBJReader accepts (src/common/json.cc): any
 * other construct would be refused by XGBoost too.
 */
#define MAX_NESTING 64 /* an XGBoost model nests about 7 deep */

typedef struct ubj_cursor {
    const unsigned char *p;
    size_t n;
    size_t pos;
} ubj_cursor;

static bool ubj_skip(ubj_cursor *u, uint64_t count)
{
    if (count > u->n - u->pos)
        return false;
    u->pos += (size_t)count;
    return true;
}

/* A big-endian int64 after the marker 'L' (the only length type XGBoost 1.7 reads). */
static bool ubj_length(ubj_cursor *u, uint64_t *out)
{
    uint64_t v = 0;

    if (u->n - u->pos < 9 || u->p[u->pos] != 'L')
        return false;
    for (int i = 1; i <= 8; i++)
        v = v << 8 | u->p[u->pos + (size_t)i];
    u->pos += 9;
    if (v > INT64_MAX)
        return false; /* negative */
    *out = v;
    return true;
}

static bool ubj_string(ubj_cursor *u)
{
    uint64_t len;

    return ubj_length(u, &len) && ubj_skip(u, len);
}

static bool ubj_value(ubj_cursor *u, int depth)
{
    uint64_t count;

    if (depth > MAX_NESTING || u->pos >= u->n)
        return false;
    switch (u->p[u->pos++]) {
    case 'Z':
    case 'T':
    case 'F':
        return true;
    case 'i':
    case 'U':
    case 'C':
        return ubj_skip(u, 1);
    case 'I':
        return ubj_skip(u, 2);
    case 'l':
    case 'd':
        return ubj_skip(u, 4);
    case 'L':
        return ubj_skip(u, 8);
    case 'S':
        return ubj_string(u);
    case '{': /* keys and values up to '}' */
        for (;;) {
            if (u->pos >= u->n)
                return false;
            if (u->p[u->pos] == '}') {
                u->pos++;
                return true;
            }
            if (!ubj_string(u) || !ubj_value(u, depth + 1))
                return false;
        }
    case '[':
        if (u->pos >= u->n)
            return false;
        if (u->p[u->pos] == '$') { /* typed: $ <type> # L <count>, then raw elements */
            unsigned size;

            if (u->n - u->pos < 3 || u->p[u->pos + 2] != '#')
                return false;
            switch (u->p[u->pos + 1]) {
            case 'U':
                size = 1;
                break;
            case 'd':
            case 'l':
                size = 4;
                break;
            case 'L':
                size = 8;
                break;
            default:
                return false;
            }
            u->pos += 3;
            return ubj_length(u, &count) && count <= (u->n - u->pos) / size &&
                   ubj_skip(u, count * size);
        }
        if (u->p[u->pos] == '#') { /* counted: # L <count>, then values */
            u->pos++;
            if (!ubj_length(u, &count) || count > u->n - u->pos)
                return false;
            for (uint64_t i = 0; i < count; i++) {
                if (!ubj_value(u, depth + 1))
                    return false;
            }
            return true;
        }
        for (;;) {
            if (u->pos >= u->n)
                return false;
            if (u->p[u->pos] == ']') {
                u->pos++;
                return true;
            }
            if (!ubj_value(u, depth + 1))
                return false;
        }
    default:
        return false;
    }
}

/* Nesting depth of JSON text, outside strings. */
static bool json_nesting_ok(const char *p, size_t n)
{
    int depth = 0;
    bool in_string = false;

    for (size_t i = 0; i < n; i++) {
        if (in_string) {
            if (p[i] == '\\')
                i++;
            else if (p[i] == '"')
                in_string = false;
        } else if (p[i] == '"') {
            in_string = true;
        } else if (p[i] == '{' || p[i] == '[') {
            if (++depth > MAX_NESTING)
                return false;
        } else if (p[i] == '}' || p[i] == ']') {
            depth--;
        }
    }
    return true;
}

/*
 * Tells JSON from UBJSON as XGBoost does (after '{' and any spaces: '"' is JSON text, a letter
 * is UBJSON) and checks the structure. *skip is set to the leading whitespace to drop.
 */
static keel_err check_model_bytes(const char *path, const char *bytes, size_t n, size_t *skip,
                                  char *errbuf, size_t errlen)
{
    size_t i = 0, j;

    while (i < n && (bytes[i] == ' ' || bytes[i] == '\t' || bytes[i] == '\r' || bytes[i] == '\n'))
        i++;
    *skip = i;
    if (i == n || bytes[i] != '{') {
        keel__errf(errbuf, errlen,
                   "%s: not an XGBoost JSON or UBJSON model (it does not start with '{'; "
                   "the deprecated binary format is not supported, re-save the model as "
                   ".json or .ubj)",
                   path);
        return KEEL_ELOAD;
    }
    for (j = i + 1; j < n && isspace((unsigned char)bytes[j]); j++)
        ;
    if (j < n && bytes[j] == '"') {
        if (!json_nesting_ok(bytes + i, n - i)) {
            keel__errf(errbuf, errlen, "%s: JSON model nests deeper than %d levels", path,
                       MAX_NESTING);
            return KEEL_ELOAD;
        }
        return KEEL_OK;
    }
    if (j < n && isalpha((unsigned char)bytes[j])) {
        ubj_cursor u = {(const unsigned char *)bytes + i, n - i, 0};

        if (!ubj_value(&u, 0)) {
            keel__errf(errbuf, errlen,
                       "%s: UBJSON model is truncated or malformed (at byte %zu of %zu)", path,
                       i + u.pos, n);
            return KEEL_ELOAD;
        }
        return KEEL_OK;
    }
    keel__errf(errbuf, errlen, "%s: not an XGBoost JSON or UBJSON model", path);
    return KEEL_ELOAD;
}

/* Writes v in decimal at p (no terminator); returns the number of digits (1 to 20). */
static size_t put_u64(char *p, uint64_t v)
{
    char tmp[20];
    size_t n = 0;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    for (size_t i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

/*
 * The array interface XGBoosterPredictFromDense reads:
 * {"data":[<address>,true],"shape":[<rows>,<cols>],"typestr":"<f4","version":3}.
 * Formatted by hand: snprintf cost ~2 500 instructions per call, 3 % of a whole batch-1
 * request (docs/PERFORMANCE.md, issue 11). Returns its length, or -1 if rows or cols is
 * negative.
 */
static int format_iface(char iface[static ARRAY_IFACE_LEN], const float *values, int64_t rows,
                        int64_t cols)
{
    static const char head[] = "{\"data\":[", mid[] = ",true],\"shape\":[",
                      tail[] = "],\"typestr\":\"<f4\",\"version\":3}";
    char *p = iface;

    _Static_assert(sizeof(head) - 1 + 20 + sizeof(mid) - 1 + 20 + 1 + 20 + sizeof(tail) <=
                       ARRAY_IFACE_LEN,
                   "the array interface does not fit");
    if (rows < 0 || cols < 0)
        return -1;
    memcpy(p, head, sizeof(head) - 1);
    p += sizeof(head) - 1;
    p += put_u64(p, (uint64_t)(uintptr_t)values);
    memcpy(p, mid, sizeof(mid) - 1);
    p += sizeof(mid) - 1;
    p += put_u64(p, (uint64_t)rows);
    *p++ = ',';
    p += put_u64(p, (uint64_t)cols);
    memcpy(p, tail, sizeof(tail)); /* with its terminator */
    p += sizeof(tail) - 1;
    return (int)(p - iface);
}

/*
 * Runs one inplace prediction of rows x cols float values. On success *result points into
 * XGBoost's thread-local buffer (valid until this thread's next prediction) and *count is
 * the number of values. Returns 0 or -1 as the C API does.
 */
static int predict_dense(BoosterHandle booster, DMatrixHandle proxy, char *iface, size_t iface_len,
                         const float *values, int64_t rows, int64_t cols, const float **result,
                         uint64_t *count)
{
    bst_ulong const *shape = NULL;
    bst_ulong ndim = 0;
    uint64_t n = 1;
    int len;

    if (iface_len < ARRAY_IFACE_LEN || (len = format_iface(iface, values, rows, cols)) < 0)
        return -2; /* cannot happen: the callers' buffers and shapes; reported by the caller */
    if (XGBoosterPredictFromDense(booster, iface, predict_config, proxy, &shape, &ndim, result) !=
        0)
        return -1;
    for (bst_ulong i = 0; i < ndim; i++)
        n *= (uint64_t)shape[i];
    *count = n;
    return 0;
}

/*
 * What keel-model-check runs in its child process (tools/keel_model_check.c): the bytes
 * through the same structural check, XGBoost's loader and two predictions of one row of
 * nfeatures values (zeros, as the warm-up runs, then NaN: every missing-value branch), so a
 * file that crashes or hangs XGBoost does it there. nfeatures 0 takes the model's own count.
 */
keel_err keel__xgb_trial(const char *path, const char *bytes, size_t n, int64_t nfeatures,
                         char *errbuf, size_t errlen)
{
    BoosterHandle booster = NULL;
    DMatrixHandle proxy = NULL;
    float *row = NULL;
    bst_ulong nfeat = 0;
    const float *result = NULL;
    uint64_t count = 0;
    char iface[ARRAY_IFACE_LEN];
    const char *xmsg;
    size_t skip = 0;
    int len;
    keel_err err = KEEL_ELOAD;

    quiet_this_thread();
    if ((err = check_model_bytes(path, bytes, n, &skip, errbuf, errlen)) != KEEL_OK)
        return err;
    err = KEEL_ELOAD;
    if (XGBoosterCreate(NULL, 0, &booster) != 0 ||
        XGBoosterSetParam(booster, "nthread", "1") != 0 ||
        XGBoosterLoadModelFromBuffer(booster, bytes + skip, (bst_ulong)(n - skip)) != 0 ||
        XGBoosterGetNumFeature(booster, &nfeat) != 0) {
        len = xgb_error(&xmsg);
        keel__errf(errbuf, errlen, "%s: XGBoost cannot load the model: %.*s", path, len, xmsg);
        goto done;
    }
    if (nfeatures <= 0)
        nfeatures = (int64_t)nfeat;
    if ((uint64_t)nfeat != (uint64_t)nfeatures) {
        /* The server's load refuses it after its own (now proven safe) parse, with the
         * config's names in the message; no prediction will run. */
        err = KEEL_OK;
        goto done;
    }
    if (nfeatures > ((int64_t)1 << 24)) {
        keel__errf(errbuf, errlen, "%s: model expects %" PRId64 " features, too many to test", path,
                   nfeatures);
        goto done;
    }
    if (XGProxyDMatrixCreate(&proxy) != 0 ||
        (row = keel__calloc((size_t)nfeatures + 1, sizeof(float))) == NULL) {
        keel__errf(errbuf, errlen, "%s: cannot set up a test prediction", path);
        goto done;
    }
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            for (int64_t i = 0; i < nfeatures; i++)
                row[i] = NAN;
        }
        if (predict_dense(booster, proxy, iface, sizeof(iface), row, 1, nfeatures, &result,
                          &count) != 0) {
            len = xgb_error(&xmsg);
            keel__errf(errbuf, errlen, "%s: a test prediction failed: %.*s", path, len, xmsg);
            goto done;
        }
    }
    err = KEEL_OK;

done:
    free(row);
    if (proxy != NULL)
        XGDMatrixFree(proxy);
    if (booster != NULL)
        XGBoosterFree(booster);
    return err;
}

/*
 * The file's bytes through keel__xgb_trial in keel-model-check (backends/model_check.c), a
 * child process: XGBoost's readers are not hardened, and a well-formed file with a corrupted
 * value (a flipped bit in a child or feature index) can crash or hang the loader or the
 * warm-up prediction. A crash, an error or a hang (killed at the deadline) fails the load
 * here; the server and the generation serving are untouched.
 */
static keel_err check_in_child(const char *path, const char *bytes, size_t n, int64_t nfeatures,
                               char *errbuf, size_t errlen)
{
    char feat[24];
    char *args[] = {(char *)"--features", feat, NULL};
    keel__model_check c = {"xgboost", "XGBoost", path, bytes, n, args};

    snprintf(feat, sizeof(feat), "%" PRId64, nfeatures);
    return keel__model_check_run(&c, errbuf, errlen);
}

/*
 * Loads the booster from the version directory, checks it against the config and warms it.
 * On KEEL_OK *model is owned by the caller (model_free).
 */
static keel_err xgb_model_load(const keel__model_config *cfg, const char *version_dir, void **model,
                               char *errbuf, size_t errlen)
{
    xgb_model *m = NULL;
    BoosterHandle booster = NULL;
    DMatrixHandle proxy = NULL;
    char *path = NULL;
    char *bytes = NULL;
    float *zeros = NULL;
    size_t nbytes = 0;
    size_t skip = 0;
    bst_ulong nfeat = 0;
    const float *result = NULL;
    uint64_t count = 0;
    char iface[ARRAY_IFACE_LEN];
    char dims[96];
    const char *xmsg;
    int64_t want_feat, want_out, m_nraw = 0;
    xgb_output m_mode = XGB_RAW;
    float m_threshold = 0.5f;
    keel__heap_build hb = {0};
    int len;
    keel_err err;

    *model = NULL;
    quiet_this_thread();
    if ((err = check_config(cfg, errbuf, errlen)) != KEEL_OK)
        goto fail;
    want_feat = dims_product(cfg->inputs[0].dims, cfg->inputs[0].ndims);
    want_out = dims_product(cfg->outputs[0].dims, cfg->outputs[0].ndims);

    if ((err = find_model_file(cfg, version_dir, &path, errbuf, errlen)) != KEEL_OK)
        goto fail;
    if ((err = read_file(path, &bytes, &nbytes, errbuf, errlen)) != KEEL_OK)
        goto fail;
    if ((err = check_model_bytes(path, bytes, nbytes, &skip, errbuf, errlen)) != KEEL_OK)
        goto fail;
    if ((err = check_in_child(path, bytes, nbytes, want_feat, errbuf, errlen)) != KEEL_OK)
        goto fail;

    /* The parse runs in the build arena (core/heap.h): the trees, and the far larger garbage
     * of parsing them, share pages only with each other, and the extent metadata the
     * parse's peak needed goes back when the arena is destroyed after the last model is
     * freed. Only the parse: XGBoost keeps a thread-local entry per learner on the thread
     * that created it (at XGBoosterCreate, and at the warm prediction below) and erases it
     * only on the thread that frees the learner (the reaper), so those must stay out of it. */
    prepare_this_thread();
    if (XGBoosterCreate(NULL, 0, &booster) != 0 ||
        XGBoosterSetParam(booster, "nthread", "1") != 0) {
        len = xgb_error(&xmsg);
        keel__errf(errbuf, errlen, "%s: cannot create an XGBoost booster: %.*s", path, len, xmsg);
        err = KEEL_ELOAD;
        goto fail;
    }
    keel__heap_build_begin(&hb);
    if (XGBoosterLoadModelFromBuffer(booster, bytes + skip, (bst_ulong)(nbytes - skip)) != 0) {
        len = xgb_error(&xmsg);
        keel__errf(errbuf, errlen, "%s: XGBoost cannot load the model: %.*s", path, len, xmsg);
        err = KEEL_ELOAD;
        goto fail;
    }
    keel__heap_build_end(&hb);
    free(bytes);
    bytes = NULL;

    if (XGBoosterGetNumFeature(booster, &nfeat) != 0) {
        len = xgb_error(&xmsg);
        keel__errf(errbuf, errlen, "%s: cannot read the model's feature count: %.*s", path, len,
                   xmsg);
        err = KEEL_ELOAD;
        goto fail;
    }
    if ((uint64_t)nfeat != (uint64_t)want_feat) {
        keel__format_dims(dims, sizeof(dims), cfg->inputs[0].dims, cfg->inputs[0].ndims);
        keel__errf(errbuf, errlen,
                   "%s: model expects %" PRIu64 " features, config input '%s' dims %s gives "
                   "%" PRId64,
                   path, (uint64_t)nfeat, cfg->inputs[0].name, dims, want_feat);
        err = KEEL_ELOAD;
        goto fail;
    }

    /* One row of zeros: learns the values per row and runs XGBoost's lazy configuration
     * here, before worker threads share the booster. */
    if (XGProxyDMatrixCreate(&proxy) != 0) {
        len = xgb_error(&xmsg);
        keel__errf(errbuf, errlen, "%s: cannot create a proxy DMatrix: %.*s", path, len, xmsg);
        err = KEEL_ELOAD;
        goto fail;
    }
    if ((zeros = keel__calloc((size_t)want_feat, sizeof(float))) == NULL) {
        err = KEEL_ENOMEM;
        goto fail;
    }
    switch (
        predict_dense(booster, proxy, iface, sizeof(iface), zeros, 1, want_feat, &result, &count)) {
    case 0:
        break;
    case -1:
        len = xgb_error(&xmsg);
        keel__errf(errbuf, errlen, "%s: warm-up prediction failed: %.*s", path, len, xmsg);
        err = KEEL_ELOAD;
        goto fail;
    default:
        keel__errf(errbuf, errlen, "%s: internal error formatting the array interface", path);
        err = KEEL_EINTERNAL;
        goto fail;
    }
    {
        const char *oc = keel__config_param(cfg, "output_class");
        const char *pp = keel__config_param(cfg, "predict_proba");
        const char *th = keel__config_param(cfg, "threshold");
        xgb_output mode = XGB_RAW;
        if (oc != NULL && strcmp(oc, "true") == 0)
            mode = pp != NULL && strcmp(pp, "true") == 0 ? XGB_PROBA : XGB_CLASS;
        if (mode == XGB_CLASS && want_out != 1) {
            keel__format_dims(dims, sizeof(dims), cfg->outputs[0].dims, cfg->outputs[0].ndims);
            keel__errf(errbuf, errlen,
                       "%s: output_class gives one class per row, config output '%s' dims %s "
                       "gives %" PRId64,
                       path, cfg->outputs[0].name, dims, want_out);
            err = KEEL_ELOAD;
            goto fail;
        }
        if (mode != XGB_RAW) {
            /* In range for a float: config.c checked it is a finite number. */
            double t = th != NULL ? strtod(th, NULL) : 0.5;
            m_threshold = (float)t;
            m_mode = mode;
        }
        m_nraw = (int64_t)count;
    }
    if (!(m_mode == XGB_CLASS || (m_mode == XGB_PROBA && count == 1 && want_out == 2)) &&
        count != (uint64_t)want_out) {
        keel__format_dims(dims, sizeof(dims), cfg->outputs[0].dims, cfg->outputs[0].ndims);
        keel__errf(errbuf, errlen,
                   "%s: model gives %" PRIu64 " values per row, config output '%s' dims %s "
                   "gives %" PRId64,
                   path, count, cfg->outputs[0].name, dims, want_out);
        err = KEEL_ELOAD;
        goto fail;
    }
    free(zeros);
    zeros = NULL;
    XGDMatrixFree(proxy);
    proxy = NULL;

    if ((m = keel__calloc(1, sizeof(*m))) == NULL) {
        err = KEEL_ENOMEM;
        goto fail;
    }
    m->booster = booster;
    booster = NULL; /* m owns it now */
    m->nfeatures = want_feat;
    m->nout = want_out;
    m->nraw = m_nraw;
    m->output = m_mode;
    m->threshold = m_threshold;
    m->file_bytes = nbytes;
    free(path);
    *model = m;
    return KEEL_OK;

fail:
    keel__heap_build_end(&hb);
    free(zeros);
    if (proxy != NULL)
        XGDMatrixFree(proxy);
    if (booster != NULL)
        XGBoosterFree(booster);
    free(bytes);
    free(path);
    return err;
}

static void xgb_model_free(void *model)
{
    xgb_model *m = model;

    if (m == NULL)
        return;
    quiet_this_thread();
    XGBoosterFree(m->booster);
    free(m);
}

static size_t xgb_memory_estimate(void *model)
{
    const xgb_model *m = model;

    return m != NULL ? m->file_bytes : 0;
}

/* On KEEL_OK *ctx borrows model and cfg's output name; it owns its proxy DMatrix. */
static keel_err xgb_context_create(void *model, const keel__model_config *cfg, void **ctx,
                                   char *errbuf, size_t errlen)
{
    xgb_context *c = NULL;
    const char *xmsg;
    int len;
    keel_err err;

    *ctx = NULL;
    quiet_this_thread();
    if ((c = keel__calloc(1, sizeof(*c))) == NULL) {
        err = KEEL_ENOMEM;
        goto fail;
    }
    c->model = model;
    c->batched = cfg->max_batch_size > 0;
    c->output_name = cfg->outputs[0].name;
    c->out_ndims = cfg->outputs[0].ndims;
    memcpy(c->out_dims, cfg->outputs[0].dims, sizeof(c->out_dims));
    if (XGProxyDMatrixCreate(&c->proxy) != 0) {
        len = xgb_error(&xmsg);
        keel__errf(errbuf, errlen, "model '%s': cannot create a proxy DMatrix: %.*s", cfg->name,
                   len, xmsg);
        c->proxy = NULL;
        err = KEEL_EBACKEND;
        goto fail;
    }
    *ctx = c;
    return KEEL_OK;

fail:
    free(c);
    return err;
}

static void xgb_context_destroy(void *ctx)
{
    xgb_context *c = ctx;

    if (c == NULL)
        return;
    if (c->proxy != NULL)
        XGDMatrixFree(c->proxy);
    free(c->scratch);
    free(c->post);
    free(c);
}

static keel_err xgb_run(void *ctx, keel__run_io *io)
{
    xgb_context *c = ctx;
    const xgb_model *m = c->model;
    const keel_tensor_view *in;
    const float *values;
    const float *result = NULL;
    uint64_t count = 0;
    int64_t rows = c->batched ? io->batch : 1;
    int64_t shape[KEEL__MAX_DIMS + 1];
    size_t ndim = 0;
    size_t want_bytes;
    uint64_t want_count;
    const char *xmsg;
    int len;

    quiet_this_thread();
    if (io->ninputs != 1 || io->inputs[0].datatype != KEEL_TYPE_FP32 || rows < 0) {
        keel__errf(io->errbuf, io->errlen, "xgboost: expected one FP32 input");
        return KEEL_EBACKEND;
    }
    in = &io->inputs[0];
    if (__builtin_mul_overflow((uint64_t)rows, (uint64_t)m->nfeatures, &want_count) ||
        __builtin_mul_overflow((size_t)want_count, sizeof(float), &want_bytes) ||
        in->bytes != want_bytes) {
        keel__errf(io->errbuf, io->errlen,
                   "xgboost: input '%s' has %zu bytes, expected %" PRId64 " rows of %" PRId64
                   " FP32 features",
                   in->name, in->bytes, rows, m->nfeatures);
        return KEEL_EBACKEND;
    }

    if (c->batched)
        shape[ndim++] = rows;
    for (size_t i = 0; i < c->out_ndims; i++)
        shape[ndim++] = c->out_dims[i];

    if (rows == 0) { /* nothing to compute (XGBoost's shape for 0 rows is degenerate) */
        static const float none;
        return io->emit(io, c->output_name, KEEL_TYPE_FP32, shape, ndim, &none, 0);
    }

    values = in->data;
    if (((uintptr_t)values % alignof(float)) != 0) {
        /* XGBoost reads the array through a float pointer; keel's copies are aligned, so
         * this path exists only to keep a misaligned caller from undefined behaviour. */
        if (c->scratch_len < want_count) {
            float *p = keel__realloc(c->scratch, want_bytes);
            if (p == NULL)
                return KEEL_ENOMEM;
            c->scratch = p;
            c->scratch_len = want_count;
        }
        memcpy(c->scratch, values, want_bytes);
        values = c->scratch;
    }

    switch (predict_dense(m->booster, c->proxy, c->array_iface, sizeof(c->array_iface), values,
                          rows, m->nfeatures, &result, &count)) {
    case 0:
        break;
    case -1:
        len = xgb_error(&xmsg);
        keel__errf(io->errbuf, io->errlen, "xgboost: prediction failed: %.*s", len, xmsg);
        return KEEL_EBACKEND;
    default:
        keel__errf(io->errbuf, io->errlen, "xgboost: cannot format the array interface");
        return KEEL_EINTERNAL;
    }
    if (count != (uint64_t)rows * (uint64_t)m->nraw) {
        keel__errf(io->errbuf, io->errlen,
                   "xgboost: model returned %" PRIu64 " values for %" PRId64
                   " rows, expected %" PRId64 " per row",
                   count, rows, m->nraw);
        return KEEL_EBACKEND;
    }
    if (m->output != XGB_RAW && !(m->output == XGB_PROBA && m->nraw == m->nout)) {
        size_t need = (size_t)rows * (size_t)m->nout;
        if (c->post_len < need) {
            float *p = keel__realloc(c->post, need * sizeof(float));
            if (p == NULL)
                return KEEL_ENOMEM;
            c->post = p;
            c->post_len = need;
        }
        for (int64_t r = 0; r < rows; r++) {
            const float *x = result + r * m->nraw;
            if (m->output == XGB_PROBA) { /* binary: [1 - p, p] */
                c->post[r * 2] = 1.0f - x[0];
                c->post[r * 2 + 1] = x[0];
            } else if (m->nraw == 1) {
                c->post[r] = x[0] > m->threshold ? 1.0f : 0.0f;
            } else {
                int64_t best = 0;
                for (int64_t k = 1; k < m->nraw; k++) {
                    if (x[k] > x[best])
                        best = k;
                }
                c->post[r] = (float)best;
            }
        }
        result = c->post;
        count = need;
    }
    /* result is XGBoost's thread-local buffer: emit copies it before anything reuses it. */
    return io->emit(io, c->output_name, KEEL_TYPE_FP32, shape, ndim, result,
                    (size_t)count * sizeof(float));
}

const keel__backend keel__xgboost_backend = {
    .name = "xgboost",
    .concurrent_contexts = true,
    .input_types = KEEL__TYPE_BIT(KEEL_TYPE_FP32),
    .model_load = xgb_model_load,
    .context_create = xgb_context_create,
    .run = xgb_run,
    .context_destroy = xgb_context_destroy,
    .model_free = xgb_model_free,
    .memory_estimate = xgb_memory_estimate,
};
