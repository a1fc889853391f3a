/*
 * scan.c: model signatures and sizes for the repository watcher. See scan.h.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "repository/scan.h"

#define WALK_MAX_DEPTH 8

static uint64_t mix64(uint64_t x)
{
    /* splitmix64's finaliser */
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    x ^= x >> 31;
    return x;
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);

    for (; *s != '\0'; s++) {
        h ^= (unsigned char)*s;
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

static uint64_t file_hash(const char *rel, const struct stat *st)
{
    uint64_t mtime = (uint64_t)st->st_mtim.tv_sec * 1000000000u + (uint64_t)st->st_mtim.tv_nsec;

    return mix64(fnv1a(rel) ^ mix64(mtime) ^ mix64((uint64_t)st->st_size + 0x9e3779b97f4a7c15u));
}

typedef struct walk_acc {
    uint64_t sum;
    uint64_t count;
    uint64_t bytes;
    bool oom;
} walk_acc;

/* Adds every regular, non-hidden file under dir (named rel in the model's directory). */
static void walk(const char *dir, const char *rel, int depth, walk_acc *acc)
{
    DIR *d;
    struct dirent *de;

    if (depth > WALK_MAX_DEPTH || (d = opendir(dir)) == NULL)
        return;
    while ((de = readdir(d)) != NULL) {
        char *path = NULL, *sub = NULL;
        struct stat st;

        if (de->d_name[0] == '.')
            continue; /* ".", "..", and hidden files such as an rsync or editor temp file */
        if (asprintf(&path, "%s/%s", dir, de->d_name) < 0) {
            acc->oom = true;
            break;
        }
        if (asprintf(&sub, "%s/%s", rel, de->d_name) < 0) {
            free(path);
            acc->oom = true;
            break;
        }
        if (stat(path, &st) == 0) {
            if (S_ISREG(st.st_mode)) {
                acc->sum += file_hash(sub, &st);
                acc->count++;
                acc->bytes += (uint64_t)st.st_size;
            } else if (S_ISDIR(st.st_mode)) {
                walk(path, sub, depth + 1, acc);
            }
        }
        free(path);
        free(sub);
    }
    closedir(d);
}

static bool all_digits(const char *s)
{
    if (*s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return false;
    }
    return true;
}

bool keel__repo_name_ok(const char *name)
{
    size_t n = strlen(name);

    if (n == 0 || n > 255 || name[0] == '.')
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c == '/' || c < 0x20 || c == 0x7f)
            return false;
    }
    return true;
}

void keel__repo_model_dirs(const char *repo, const char *name,
                           void (*fn)(const char *dir, void *user), void *user)
{
    char *dir = NULL;
    DIR *d;
    struct dirent *de;

    if (asprintf(&dir, "%s/%s", repo, name) < 0)
        return;
    fn(dir, user);
    if ((d = opendir(dir)) != NULL) {
        while ((de = readdir(d)) != NULL) {
            char *path = NULL;
            if (!all_digits(de->d_name) || asprintf(&path, "%s/%s", dir, de->d_name) < 0)
                continue;
            fn(path, user);
            free(path);
        }
        closedir(d);
    }
    free(dir);
}

bool keel__repo_signature(const char *repo, const char *name, uint64_t *out)
{
    char *dir = NULL, *cfg = NULL;
    struct stat st;
    walk_acc acc = {0, 0, 0, false};
    DIR *d = NULL;
    struct dirent *de;
    bool ok = false;

    if (asprintf(&dir, "%s/%s", repo, name) < 0) {
        dir = NULL;
        goto done;
    }
    /* config.json and config.pbtxt (both present is a load error, which a change to
     * either must retry): a model has at least one of them. */
    for (int i = 0; i < 2; i++) {
        const char *base = i == 0 ? "config.json" : "config.pbtxt";
        free(cfg);
        if (asprintf(&cfg, "%s/%s", dir, base) < 0) {
            cfg = NULL;
            goto done;
        }
        if (stat(cfg, &st) == 0 && S_ISREG(st.st_mode)) {
            acc.sum += file_hash(base, &st);
            acc.count++;
        }
    }
    if (acc.count == 0)
        goto done;
    if ((d = opendir(dir)) == NULL)
        goto done;
    while ((de = readdir(d)) != NULL) {
        char *path = NULL;
        if (!all_digits(de->d_name))
            continue;
        if (asprintf(&path, "%s/%s", dir, de->d_name) < 0) {
            acc.oom = true;
            break;
        }
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
            walk(path, de->d_name, 1, &acc);
        free(path);
    }
    if (acc.oom)
        goto done;
    *out = mix64(acc.sum ^ mix64(acc.count));
    ok = true;

done:
    if (d != NULL)
        closedir(d);
    free(cfg);
    free(dir);
    return ok;
}

uint64_t keel__repo_version_bytes(const char *model_dir, const int64_t *versions, size_t n)
{
    walk_acc acc = {0, 0, 0, false};

    for (size_t i = 0; i < n; i++) {
        char *path = NULL;
        if (asprintf(&path, "%s/%lld", model_dir, (long long)versions[i]) < 0)
            continue;
        walk(path, "", 1, &acc);
        free(path);
    }
    return acc.bytes;
}
