/*
 * server_control.c: the model-control thread of `keel serve`.
 *
 * DESIGN
 * keel_model_load blocks for as long as a model takes to load, so no HTTP thread runs it.
 * One control thread does all model control, one operation at a time:
 *   - explicit mode: POST /v2/repository/models/{m}/load and /unload are queued here as jobs
 *     (the connection is parked meanwhile, see server.c) and answered when done;
 *   - poll mode: every --repository-poll-secs it re-scans the repository, loads models whose
 *     files changed or that appeared, and unloads models whose directory (or config.json)
 *     disappeared.
 *
 * A model's signature is a hash over (relative path, mtime in ns, size) of its config.json
 * and of every file under its numeric version folders (followed to a depth of 8), combined
 * with an order-independent sum so that directory order does not matter. A load is retried
 * only when the signature changes again: a model whose files are broken is not reloaded
 * (and its error re-logged) every period. This is deliberately simple: a model caught
 * half-copied fails its load and is reloaded once the copy completes and changes the
 * signature again. Inotify-based watching is a later issue.
 *
 * Locks: s->ctl_mu protects the job queue, ctl_stop and ctl_started; it is never held while
 * calling libkeel or completing a connection. s->sigs belongs to the control thread (and to
 * the main thread before the thread starts and after it is joined).
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "server_internal.h"

#define WALK_MAX_DEPTH 8

/* ---------------------------------------------------------------- signatures */

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

typedef struct sig_acc {
    uint64_t sum;
    uint64_t count;
    bool oom;
} sig_acc;

/* Adds every regular file under dir (named rel in the model's directory). */
static void walk(const char *dir, const char *rel, int depth, sig_acc *acc)
{
    DIR *d;
    struct dirent *de;

    if (depth > WALK_MAX_DEPTH || (d = opendir(dir)) == NULL)
        return;
    while ((de = readdir(d)) != NULL) {
        char *path = NULL, *sub = NULL;
        struct stat st;

        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
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

/* The signature of <repo>/<name>; false if it is not a model (no config.json) or on ENOMEM. */
static bool model_signature(const char *repo, const char *name, uint64_t *out)
{
    char *dir = NULL, *cfg = NULL;
    struct stat st;
    sig_acc acc = {0, 0, false};
    DIR *d = NULL;
    struct dirent *de;
    bool ok = false;

    if (asprintf(&dir, "%s/%s", repo, name) < 0) {
        dir = NULL;
        goto done;
    }
    if (asprintf(&cfg, "%s/config.json", dir) < 0) {
        cfg = NULL;
        goto done;
    }
    if (stat(cfg, &st) != 0 || !S_ISREG(st.st_mode))
        goto done;
    acc.sum += file_hash("config.json", &st);
    acc.count++;
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

/* A repository entry that may be a model: what keel itself accepts, minus hidden names. */
static bool model_name_ok(const char *name)
{
    size_t n = strlen(name);

    if (n == 0 || n > 255 || name[0] == '.')
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c < 0x20 || c == 0x7f)
            return false;
    }
    return true;
}

static srv_sig *sig_find(keel_srv *s, const char *name)
{
    for (size_t i = 0; i < s->nsigs; i++) {
        if (strcmp(s->sigs[i].name, name) == 0)
            return &s->sigs[i];
    }
    return NULL;
}

/* Appends a signature; NULL on ENOMEM. */
static srv_sig *sig_add(keel_srv *s, const char *name, uint64_t sig)
{
    srv_sig *grown;
    char *copy;

    if ((copy = strdup(name)) == NULL)
        return NULL;
    if ((grown = realloc(s->sigs, (s->nsigs + 1) * sizeof(*grown))) == NULL) {
        free(copy);
        return NULL;
    }
    s->sigs = grown;
    s->sigs[s->nsigs].name = copy;
    s->sigs[s->nsigs].sig = sig;
    s->sigs[s->nsigs].seen = true;
    return &s->sigs[s->nsigs++];
}

void keel__srv_control_snapshot(keel_srv *s)
{
    DIR *d = opendir(s->opts->model_repository);
    struct dirent *de;

    if (d == NULL)
        return; /* keel_runtime_create reports a missing repository */
    while ((de = readdir(d)) != NULL) {
        uint64_t sig;
        if (!model_name_ok(de->d_name) ||
            !model_signature(s->opts->model_repository, de->d_name, &sig))
            continue;
        if (sig_add(s, de->d_name, sig) == NULL)
            break; /* out of memory: those models count as new at the first scan */
    }
    closedir(d);
}

void keel__srv_control_fini(keel_srv *s)
{
    for (size_t i = 0; i < s->nsigs; i++)
        free(s->sigs[i].name);
    free(s->sigs);
    s->sigs = NULL;
    s->nsigs = 0;
}

static void poll_load(keel_srv *s, const char *name, const char *why)
{
    char msg[1024];
    keel_err err;

    msg[0] = '\0';
    keel__srv_log(KEEL_LOG_INFO, "repository poll: loading model", "model", name, "reason", why,
                  NULL);
    err = keel_model_load(s->rt, name, msg, sizeof(msg));
    if (err != KEEL_OK)
        keel__srv_log(KEEL_LOG_ERROR, "repository poll: load failed", "model", name, "error",
                      msg[0] != '\0' ? msg : keel_strerror(err), NULL);
}

/* One poll-mode pass over the repository. */
static void poll_scan(keel_srv *s)
{
    const char *repo = s->opts->model_repository;
    DIR *d = opendir(repo);
    struct dirent *de;
    size_t i;

    if (d == NULL) {
        /* Not "every model was removed": a repository that cannot be read is left alone. */
        keel__srv_log(KEEL_LOG_WARN, "repository poll: cannot read the repository", "repository",
                      repo, "error", strerror(errno), NULL);
        return;
    }
    for (i = 0; i < s->nsigs; i++)
        s->sigs[i].seen = false;
    while ((de = readdir(d)) != NULL) {
        uint64_t sig;
        srv_sig *known;

        if (!model_name_ok(de->d_name) || !model_signature(repo, de->d_name, &sig))
            continue;
        if ((known = sig_find(s, de->d_name)) != NULL) {
            known->seen = true;
            if (known->sig == sig)
                continue;
            known->sig = sig;
            poll_load(s, de->d_name, "changed");
        } else {
            if (sig_add(s, de->d_name, sig) == NULL) {
                keel__srv_log(KEEL_LOG_ERROR, "repository poll: out of memory", NULL);
                continue; /* retried at the next scan */
            }
            poll_load(s, de->d_name, "added");
        }
    }
    closedir(d);
    /* Models that are gone. */
    for (i = 0; i < s->nsigs;) {
        keel_err err;
        if (s->sigs[i].seen) {
            i++;
            continue;
        }
        keel__srv_log(KEEL_LOG_INFO, "repository poll: unloading removed model", "model",
                      s->sigs[i].name, NULL);
        err = keel_model_unload(s->rt, s->sigs[i].name);
        if (err != KEEL_OK && err != KEEL_ENOTFOUND)
            keel__srv_log(KEEL_LOG_ERROR, "repository poll: unload failed", "model",
                          s->sigs[i].name, "error", keel_strerror(err), NULL);
        free(s->sigs[i].name);
        s->sigs[i] = s->sigs[--s->nsigs];
    }
}

/* ---------------------------------------------------------------- explicit jobs */

static bool model_known(keel_srv *s, const char *name)
{
    keel_model_status *list = NULL;
    size_t n = 0;
    bool known = false;

    if (keel_model_list(s->rt, &list, &n) != KEEL_OK)
        return false;
    for (size_t i = 0; i < n && !known; i++)
        known = strcmp(list[i].name, name) == 0;
    keel_model_status_free(list, n);
    return known;
}

static void run_job(keel_srv *s, srv_conn *c)
{
    char msg[1024];
    char text[1200];
    keel_err err;

    msg[0] = '\0';
    text[0] = '\0';
    if (c->route == ROUTE_REPO_LOAD) {
        err = keel_model_load(s->rt, c->model, msg, sizeof(msg));
        if (err == KEEL_OK) {
            c->ctl_status = 200;
            keel__srv_log(KEEL_LOG_INFO, "model loaded", "model", c->model, NULL);
        } else {
            c->ctl_status = keel__srv_http_status(err);
            snprintf(text, sizeof(text), "failed to load '%s': %s", c->model,
                     msg[0] != '\0' ? msg : keel_strerror(err));
            keel__srv_log(KEEL_LOG_ERROR, "model load failed", "model", c->model, "error",
                          msg[0] != '\0' ? msg : keel_strerror(err), NULL);
        }
    } else {
        err = keel_model_unload(s->rt, c->model);
        if (err == KEEL_OK) {
            c->ctl_status = 200;
            keel__srv_log(KEEL_LOG_INFO, "model unloaded", "model", c->model, NULL);
        } else if (err == KEEL_ENOTFOUND && model_known(s, c->model)) {
            c->ctl_status = 200; /* nothing loaded: unloading is idempotent */
            err = KEEL_OK;
        } else {
            c->ctl_status = keel__srv_http_status(err);
            if (err == KEEL_ENOTFOUND)
                snprintf(text, sizeof(text), "unknown model '%s'", c->model);
            else
                snprintf(text, sizeof(text), "failed to unload '%s': %s", c->model,
                         keel_strerror(err));
        }
    }
    if (text[0] != '\0')
        c->ctl_msg = strdup(text); /* NULL on ENOMEM: a generic message is sent */
    keel__srv_conn_complete(c, err);
}

/* ---------------------------------------------------------------- the thread */

static void *control_main(void *arg)
{
    keel_srv *s = arg;
    const bool polling = s->opts->control == KEEL_SERVER_CONTROL_POLL;
    struct timespec next;

    clock_gettime(CLOCK_MONOTONIC, &next);
    next.tv_sec += (time_t)s->opts->repository_poll_secs;

    pthread_mutex_lock(&s->ctl_mu);
    while (!s->ctl_stop) {
        srv_conn *c = s->jobs_head;
        struct timespec now;

        if (c != NULL) {
            s->jobs_head = c->job_next;
            if (s->jobs_head == NULL)
                s->jobs_tail = NULL;
            c->job_next = NULL;
            pthread_mutex_unlock(&s->ctl_mu);
            run_job(s, c);
            pthread_mutex_lock(&s->ctl_mu);
            continue;
        }
        if (!polling) {
            pthread_cond_wait(&s->ctl_cv, &s->ctl_mu);
            continue;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec ||
            (now.tv_sec == next.tv_sec && now.tv_nsec >= next.tv_nsec)) {
            pthread_mutex_unlock(&s->ctl_mu);
            poll_scan(s);
            clock_gettime(CLOCK_MONOTONIC, &next);
            next.tv_sec += (time_t)s->opts->repository_poll_secs;
            pthread_mutex_lock(&s->ctl_mu);
            continue;
        }
        pthread_cond_timedwait(&s->ctl_cv, &s->ctl_mu, &next);
    }
    pthread_mutex_unlock(&s->ctl_mu);
    return NULL;
}

keel_err keel__srv_control_start(keel_srv *s)
{
    pthread_mutex_lock(&s->ctl_mu);
    s->ctl_stop = false;
    pthread_mutex_unlock(&s->ctl_mu);
    if (pthread_create(&s->ctl, NULL, control_main, s) != 0)
        return KEEL_ENOMEM;
    pthread_mutex_lock(&s->ctl_mu);
    s->ctl_started = true;
    pthread_mutex_unlock(&s->ctl_mu);
    return KEEL_OK;
}

bool keel__srv_control_enqueue(keel_srv *s, srv_conn *c)
{
    pthread_mutex_lock(&s->ctl_mu);
    if (s->ctl_stop || !s->ctl_started) {
        pthread_mutex_unlock(&s->ctl_mu);
        return false;
    }
    c->job_next = NULL;
    if (s->jobs_tail != NULL)
        s->jobs_tail->job_next = c;
    else
        s->jobs_head = c;
    s->jobs_tail = c;
    pthread_cond_signal(&s->ctl_cv);
    pthread_mutex_unlock(&s->ctl_mu);
    return true;
}

void keel__srv_control_stop(keel_srv *s)
{
    srv_conn *jobs;
    bool started;

    pthread_mutex_lock(&s->ctl_mu);
    s->ctl_stop = true;
    started = s->ctl_started;
    pthread_cond_broadcast(&s->ctl_cv);
    pthread_mutex_unlock(&s->ctl_mu);
    if (started)
        pthread_join(s->ctl, NULL); /* waits for the job or scan in progress */

    pthread_mutex_lock(&s->ctl_mu);
    s->ctl_started = false;
    jobs = s->jobs_head;
    s->jobs_head = s->jobs_tail = NULL;
    pthread_mutex_unlock(&s->ctl_mu);
    /* Jobs that never started are answered, so their connections resume. */
    while (jobs != NULL) {
        srv_conn *c = jobs;
        jobs = c->job_next;
        c->job_next = NULL;
        c->ctl_status = 503;
        c->ctl_msg = strdup("the server is shutting down");
        keel__srv_conn_complete(c, KEEL_ESHUTDOWN);
    }
}
