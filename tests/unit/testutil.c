/* testutil.c: see testutil.h. */
#include "testutil.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

char *tu_strf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;

    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    assert_non_null(s);
    return s;
}

char *tu_mkdtemp(const char *tag)
{
    const char *tmp = getenv("TMPDIR");
    char *p = tu_strf("%s/keel-%s-XXXXXX", tmp != NULL && *tmp != '\0' ? tmp : "/tmp", tag);

    assert_non_null(mkdtemp(p));
    return p;
}

void tu_rm_rf(const char *path)
{
    DIR *d = opendir(path);
    struct dirent *e;

    if (d == NULL) {
        unlink(path);
        return;
    }
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char *child = tu_strf("%s/%s", path, e->d_name);
        struct stat st;
        if (lstat(child, &st) == 0 && S_ISDIR(st.st_mode)) {
            chmod(child, 0700);
            tu_rm_rf(child);
        } else {
            unlink(child);
        }
        free(child);
    }
    closedir(d);
    rmdir(path);
}

void tu_mkdirs(const char *path)
{
    char *p = tu_strf("%s", path);

    for (char *s = p + 1; *s != '\0'; s++) {
        if (*s == '/') {
            *s = '\0';
            mkdir(p, 0755);
            *s = '/';
        }
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST)
        fail_msg("mkdir %s: %s", p, strerror(errno));
    free(p);
}

static void mkparent(const char *path)
{
    char *p = tu_strf("%s", path);
    char *slash = strrchr(p, '/');

    if (slash != NULL && slash != p) {
        *slash = '\0';
        tu_mkdirs(p);
    }
    free(p);
}

void tu_write_file(const char *path, const void *data, size_t len)
{
    FILE *f;
    char *tmp = tu_strf("%s.tmp%d", path, (int)getpid());

    if (len == (size_t)-1)
        len = strlen(data);
    mkparent(path);
    f = fopen(tmp, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    /* Rename so a concurrent reader never sees a half-written file. */
    assert_int_equal(rename(tmp, path), 0);
    free(tmp);
}

char *tu_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    if (f == NULL)
        fail_msg("open %s: %s", path, strerror(errno));
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    if (len != NULL)
        *len = (size_t)n;
    return buf;
}

void tu_copy_file(const char *from, const char *to)
{
    size_t n;
    char *buf = tu_read_file(from, &n);

    tu_write_file(to, buf, n);
    free(buf);
}

int tu_run(const char *fmt, ...)
{
    va_list ap;
    char *cmd = NULL;
    int rc;

    va_start(ap, fmt);
    if (vasprintf(&cmd, fmt, ap) < 0)
        cmd = NULL;
    va_end(ap);
    assert_non_null(cmd);
    rc = system(cmd);
    free(cmd);
    if (rc == -1 || !WIFEXITED(rc))
        return -1;
    return WEXITSTATUS(rc);
}

int tu_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    assert_non_null(d);
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] != '.')
            n++;
    }
    closedir(d);
    return n - 1; /* the directory's own fd */
}

void tu_assert_counters(keel_runtime *rt, const keel_counters *want)
{
    keel_counters got;

    keel_runtime_quiesce(rt);
    keel_counters_get(rt, &got);
    if (got.requests != want->requests || got.leases != want->leases ||
        got.queued != want->queued || got.generations != want->generations ||
        got.contexts != want->contexts || got.contexts_in_use != want->contexts_in_use ||
        got.contexts_stuck != want->contexts_stuck) {
        fail_msg("counters: requests %lld/%lld leases %lld/%lld queued %lld/%lld "
                 "generations %lld/%lld contexts %lld/%lld in_use %lld/%lld stuck %lld/%lld "
                 "(got/want)",
                 (long long)got.requests, (long long)want->requests, (long long)got.leases,
                 (long long)want->leases, (long long)got.queued, (long long)want->queued,
                 (long long)got.generations, (long long)want->generations, (long long)got.contexts,
                 (long long)want->contexts, (long long)got.contexts_in_use,
                 (long long)want->contexts_in_use, (long long)got.contexts_stuck,
                 (long long)want->contexts_stuck);
    }
}

#define HEART_SCALE "/usr/share/doc/liblinear-tools/examples/heart_scale"

int tu_heart_rows(float **x, float **y)
{
    FILE *f = fopen(HEART_SCALE, "r");
    char line[4096];
    int n = 0, cap = 0;
    float *xs = NULL, *ys = NULL;

    if (f == NULL)
        fail_msg("%s: %s (install liblinear-tools)", HEART_SCALE, strerror(errno));
    while (fgets(line, sizeof(line), f) != NULL) {
        char *p = line, *end;
        if (n == cap) {
            cap = cap ? cap * 2 : 256;
            xs = realloc(xs, sizeof(float) * TU_HEART_FEATURES * (size_t)cap);
            ys = realloc(ys, sizeof(float) * (size_t)cap);
            assert_non_null(xs);
            assert_non_null(ys);
        }
        double label = strtod(p, &end);
        if (end == p)
            continue;
        ys[n] = label > 0 ? 1.0f : 0.0f;
        for (int j = 0; j < TU_HEART_FEATURES; j++)
            xs[n * TU_HEART_FEATURES + j] = __builtin_nanf("");
        p = end;
        for (;;) {
            long idx = strtol(p, &end, 10);
            if (end == p || *end != ':')
                break;
            p = end + 1;
            /* strtof, not (float)strtod: one rounding, as a float parser reads the text */
            float v = strtof(p, &end);
            assert_true(idx >= 1 && idx <= TU_HEART_FEATURES);
            xs[n * TU_HEART_FEATURES + idx - 1] = v;
            p = end;
        }
        n++;
    }
    fclose(f);
    *x = xs;
    *y = ys;
    return n;
}

int tu_train_heart(const char *dir, const char *model_name, const char *extra)
{
    char *data = tu_strf("%s/heart01.txt", dir);
    char *conf = tu_strf("%s/train-%s.conf", dir, model_name);
    char *text;
    int rc;

    /* Required by the build (CMakeLists.txt): gone since configure is a failure, not a skip. */
    if (KEEL_XGBOOST_CLI[0] == '\0' || access(KEEL_XGBOOST_CLI, X_OK) != 0)
        fail_msg("the xgboost command '%s' is not executable", KEEL_XGBOOST_CLI);
    if (access(data, R_OK) != 0) {
        rc = tu_run("sed -e 's/^+1/1/' -e 's/^-1/0/' '%s' > '%s'", HEART_SCALE, data);
        assert_int_equal(rc, 0);
    }
    text = tu_strf("booster = gbtree\nobjective = binary:logistic\nnthread = 1\n"
                   "data = \"%s?format=libsvm&indexing_mode=1\"\nmodel_out = \"%s/%s\"\n%s\n",
                   data, dir, model_name, extra != NULL ? extra : "");
    tu_write_file(conf, text, (size_t)-1);
    rc = tu_run("cd '%s' && '%s' '%s' >/dev/null 2>&1", dir, KEEL_XGBOOST_CLI, conf);
    free(text);
    free(conf);
    free(data);
    return rc;
}
