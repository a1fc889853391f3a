/* onnx_testutil.c: see onnx_testutil.h. */
#include "onnx_testutil.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

bool tu_onnx_close(float a, float b)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return fabs((double)a - (double)b) <= 1e-5 + 1e-3 * fabs((double)b);
}

void tu_onnx_read_tensor(const char *path, keel__onnx_tensor *t)
{
    size_t len = 0;
    char *bytes = tu_read_file(path, &len);
    char err[512];

    if (keel__onnx_tensor_read(bytes, len, path, t, err, sizeof(err)) != KEEL_OK)
        fail_msg("%s", err);
    free(bytes);
}

void tu_onnx_add_model(const char *repo, const char *name, const char *model_file, int version,
                       int instances, int max_batch, const char *io_json)
{
    char *cfg = tu_strf("%s/%s/config.json", repo, name);
    char *dst = tu_strf("%s/%s/%d/model.onnx", repo, name, version);
    char *text = tu_strf("{\"name\": \"%s\", \"backend\": \"onnx\", \"max_batch_size\": %d, %s "
                         "\"instance_group\": [{\"count\": %d, \"kind\": \"KIND_CPU\"}]}\n",
                         name, max_batch, io_json, instances);

    tu_write_file(cfg, text, (size_t)-1);
    tu_copy_file(model_file, dst);
    free(cfg);
    free(dst);
    free(text);
}

keel_err tu_onnx_infer(keel_runtime *rt, const char *model, const char *in_name,
                       const int64_t *shape, size_t ndim, const float *data, float **out,
                       size_t *count, int64_t *out_shape, size_t *out_ndim, char *err,
                       size_t errlen)
{
    keel_request *req = NULL;
    keel_tensor_view v;
    size_t n = 1;
    keel_err e;

    *out = NULL;
    *count = 0;
    err[0] = '\0';
    for (size_t i = 0; i < ndim; i++)
        n *= (size_t)shape[i];
    if ((e = keel_request_create(rt, model, -1, &req)) != KEEL_OK)
        return e;
    if ((e = keel_request_add_input(req, in_name, KEEL_TYPE_FP32, shape, ndim, data,
                                    n * sizeof(float))) != KEEL_OK ||
        (e = keel_infer(req)) != KEEL_OK) {
        snprintf(err, errlen, "%s", keel_request_error(req));
        keel_request_destroy(req);
        return e;
    }
    if ((e = keel_request_output(req, 0, &v)) == KEEL_OK) {
        *out = malloc(v.bytes > 0 ? v.bytes : 1);
        if (*out == NULL) {
            keel_request_destroy(req);
            return KEEL_ENOMEM;
        }
        memcpy(*out, v.data, v.bytes);
        *count = v.bytes / sizeof(float);
        *out_ndim = v.ndim;
        memcpy(out_shape, v.shape, v.ndim * sizeof(int64_t));
    }
    keel_request_destroy(req);
    return e;
}

int tu_count_children(void)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;
    pid_t me = getpid();

    assert_non_null(d);
    while ((e = readdir(d)) != NULL) {
        char path[300], buf[512];
        FILE *f;
        char *p;
        int ppid;

        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        if (fgets(buf, sizeof(buf), f) != NULL && (p = strrchr(buf, ')')) != NULL &&
            sscanf(p + 2, "%*c %d", &ppid) == 1 && ppid == me)
            n++;
        fclose(f);
    }
    closedir(d);
    return n;
}
