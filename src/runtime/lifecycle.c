/*
 * lifecycle.c: what keeps models served without an operator: the repository watcher, load
 * retries with backoff, and reloads of evicted models. It decides when to load; the load
 * itself is load.c's, the memory budget budget.c's.
 *
 * DESIGN
 * One lifecycle thread per runtime (started by keel_runtime_create, stopped first by
 * keel_runtime_destroy). It sleeps in poll() on an eventfd (written by destroy and by a
 * request that needs an evicted model) and, in POLL mode, an inotify descriptor watching the
 * repository, each model folder and each numeric version folder. Its timeout is the earliest
 * of the next full scan, the next settle deadline and the next retry. inotify only wakes it
 * early; the periodic full scan is the truth (inotify queues overflow, it does not see deeper
 * folders or network file systems, and watches can run out).
 *
 * Watch table (lifecycle thread only; built by create before the thread starts): per model
 * folder the signature last seen (sig, repository/scan.h), since when (since_ns), and the
 * signature last acted on (done). A model with sig != done is loaded once
 * now - since_ns >= settle_ms, that is once none of its files has changed for the settle
 * interval; done = sig then, whether the load succeeds or not (a failure is retried by the
 * backoff below; a further change restarts the settle). A model whose folder or config.json
 * disappears is unloaded and forgotten.
 *
 * Each pass the thread collects under rt->mu, then loads one at a time with no lock held:
 *   - evicted models with want_load (a request waits for them);
 *   - (NONE and POLL modes) models whose last load failed, once next_retry_ns has come, if
 *     their files are settled and (POLL) still in the repository.
 * The backoff doubles from retry_initial_ms to retry_max_ms; a success, an unload or a change
 * of the files resets it.
 *
 * The backoff itself is scheduled by the failing load (load.c, next_retry_ns). An evicted
 * model's want_load is set by keel__want_load_locked (budget.c; called when a request arrives
 * for it, sched.c, or when it is evicted with requests queued), which wakes this thread with
 * keel__life_wake: the one call into this file from a layer below it. Layer: calls
 * registry.c and load.c only (internal.h).
 */
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "repository/scan.h"
#include "runtime/lifecycle.h"
#include "runtime/load.h"
#include "runtime/registry.h"

#define WATCH_MASK                                                                                 \
    (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_MODIFY |            \
     IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF)
#define SCAN_DEBOUNCE_NS 100000000ull /* at most one inotify-triggered scan per 100 ms */

typedef struct keel__watch {
    char *name;
    uint64_t sig;      /* last seen */
    uint64_t done;     /* last acted on */
    uint64_t since_ns; /* when sig was first seen */
    bool seen;         /* in the current scan */
} keel__watch;

/* ---------------------------------------------------------------- watching */

static keel__watch *watch_find(keel_runtime *rt, const char *name)
{
    for (size_t i = 0; i < rt->nwatch; i++) {
        if (strcmp(rt->watch[i].name, name) == 0)
            return &rt->watch[i];
    }
    return NULL;
}

static keel__watch *watch_add(keel_runtime *rt, const char *name)
{
    keel__watch *grown;
    char *copy = keel__strdup(name);

    if (copy == NULL)
        return NULL;
    if ((grown = keel__realloc(rt->watch, (rt->nwatch + 1) * sizeof(*grown))) == NULL) {
        free(copy);
        return NULL;
    }
    rt->watch = grown;
    memset(&rt->watch[rt->nwatch], 0, sizeof(*grown));
    rt->watch[rt->nwatch].name = copy;
    return &rt->watch[rt->nwatch++];
}

void keel__watch_free(keel_runtime *rt)
{
    for (size_t i = 0; i < rt->nwatch; i++)
        free(rt->watch[i].name);
    free(rt->watch);
    rt->watch = NULL;
    rt->nwatch = 0;
}

/* Create (POLL mode, before the first loads): what is there now counts as acted on. */
void keel__watch_snapshot(keel_runtime *rt)
{
    DIR *d = opendir(rt->repo);
    struct dirent *de;

    if (d == NULL)
        return;
    while ((de = readdir(d)) != NULL) {
        uint64_t sig;
        keel__watch *w;
        if (!keel__repo_name_ok(de->d_name) || !keel__repo_signature(rt->repo, de->d_name, &sig))
            continue;
        if ((w = watch_add(rt, de->d_name)) == NULL)
            break; /* out of memory: the first scan sees those models as new */
        w->sig = w->done = sig;
        w->since_ns = keel__now_ns();
    }
    closedir(d);
}

static void add_inotify_watch(const char *dir, void *user)
{
    int ifd = *(const int *)user;

    (void)inotify_add_watch(ifd, dir, WATCH_MASK); /* ENOSPC etc.: the periodic scan covers it */
}

/* One pass over the repository: updates sig/since of every model, unloads removed ones. */
static void scan(keel_runtime *rt, int ifd)
{
    DIR *d = opendir(rt->repo);
    struct dirent *de;
    uint64_t now = keel__now_ns();

    if (d == NULL) {
        /* Not "every model was removed": a repository that cannot be read is left alone. */
        KEEL__LOG(&rt->log, KEEL_LOG_WARN, "repository %s: cannot read it: %s", rt->repo,
                  strerror(errno));
        return;
    }
    if (ifd >= 0)
        (void)inotify_add_watch(ifd, rt->repo, WATCH_MASK);
    for (size_t i = 0; i < rt->nwatch; i++)
        rt->watch[i].seen = false;
    while ((de = readdir(d)) != NULL) {
        uint64_t sig;
        keel__watch *w;

        if (!keel__repo_name_ok(de->d_name) || !keel__repo_signature(rt->repo, de->d_name, &sig))
            continue;
        if ((w = watch_find(rt, de->d_name)) == NULL) {
            if ((w = watch_add(rt, de->d_name)) == NULL)
                continue;   /* out of memory: seen at a later scan */
            w->done = ~sig; /* new: load it once settled */
            w->sig = sig;
            w->since_ns = now;
        } else if (w->sig != sig) {
            w->sig = sig;
            w->since_ns = now;
        }
        w->seen = true;
        if (ifd >= 0)
            keel__repo_model_dirs(rt->repo, de->d_name, add_inotify_watch, &ifd);
    }
    closedir(d);
    for (size_t i = 0; i < rt->nwatch;) {
        keel_err err;
        if (rt->watch[i].seen) {
            i++;
            continue;
        }
        KEEL__LOG(&rt->log, KEEL_LOG_INFO, "model %s: removed from the repository; unloading",
                  rt->watch[i].name);
        err = keel_model_unload(rt, rt->watch[i].name);
        if (err != KEEL_OK && err != KEEL_ENOTFOUND)
            KEEL__LOG(&rt->log, KEEL_LOG_ERROR, "model %s: unload failed: %s", rt->watch[i].name,
                      keel_strerror(err));
        free(rt->watch[i].name);
        rt->watch[i] = rt->watch[--rt->nwatch];
    }
}

/* ---------------------------------------------------------------- the thread */

typedef struct pending_load {
    char *name;
    bool reload; /* an evicted model a request waits for */
} pending_load;

static uint64_t min_nz(uint64_t a, uint64_t b)
{
    return a == 0 ? b : b == 0 ? a : a < b ? a : b;
}

/* Under rt->mu: models to load now, and the earliest later retry (*wake). */
static size_t collect_locked(keel_runtime *rt, uint64_t now, pending_load *out, size_t cap,
                             uint64_t *wake)
{
    size_t n = 0;

    for (keel__model_entry *e = rt->models; e != NULL && n < cap; e = e->next) {
        bool reload = false, retry = false;
        if (e->loading)
            continue;
        if (e->evicted) {
            reload = e->want_load;
        } else if (rt->control != KEEL_CONTROL_EXPLICIT && e->last_error != KEEL_OK &&
                   e->next_retry_ns != 0) {
            keel__watch *w = rt->control == KEEL_CONTROL_POLL ? watch_find(rt, e->name) : NULL;
            bool settled = rt->control != KEEL_CONTROL_POLL || (w != NULL && w->sig == w->done);
            if (now >= e->next_retry_ns)
                retry = settled;
            else
                *wake = min_nz(*wake, e->next_retry_ns);
        }
        if (!reload && !retry)
            continue;
        if ((out[n].name = keel__strdup(e->name)) == NULL)
            break;
        out[n].reload = reload;
        if (reload)
            e->want_load = false;
        n++;
    }
    return n;
}

static void run_loads(keel_runtime *rt, pending_load *list, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bool stop;
        keel__rt_lock(rt);
        stop = rt->life_stop;
        keel__rt_unlock(rt);
        if (stop) { /* destroy waits for us: skip the rest */
            free(list[i].name);
            continue;
        }
        if (list[i].reload)
            KEEL__LOG(&rt->log, KEEL_LOG_INFO, "model %s: loading it again for a request",
                      list[i].name);
        else
            KEEL__LOG(&rt->log, KEEL_LOG_INFO, "model %s: retrying the failed load", list[i].name);
        (void)keel__model_load(rt, list[i].name, list[i].reload, NULL, 0); /* result: status */
        free(list[i].name);
    }
}

/* POLL: loads every settled, changed model; returns how many; *wake gets the next settle. */
static size_t settle_loads(keel_runtime *rt, uint64_t now, uint64_t *wake)
{
    size_t n = 0;

    for (size_t i = 0; i < rt->nwatch; i++) {
        keel__watch *w = &rt->watch[i];
        keel__model_entry *e;
        uint64_t settled_at;
        char *name;

        if (w->sig == w->done)
            continue;
        settled_at = w->since_ns + (uint64_t)rt->settle_ms * 1000000u;
        if (now < settled_at) { /* (since_ns may be later than now: the scan ran after it) */
            *wake = min_nz(*wake, settled_at);
            continue;
        }
        w->done = w->sig;
        if ((name = keel__strdup(w->name)) == NULL)
            continue;
        /* New files: the backoff of the old ones no longer applies. */
        keel__rt_lock(rt);
        if ((e = keel__entry_find_locked(rt, name)) != NULL)
            e->load_failures = 0;
        keel__rt_unlock(rt);
        KEEL__LOG(&rt->log, KEEL_LOG_INFO, "model %s: files changed and settled; loading", name);
        (void)keel__model_load(rt, name, false, NULL, 0);
        free(name);
        n++;
        /* The watch table may not move: only this thread changes it, and not during a load. */
    }
    return n;
}

static void *life_main(void *arg)
{
    keel_runtime *rt = arg;
    const bool polling = rt->control == KEEL_CONTROL_POLL;
    const uint64_t interval = (uint64_t)rt->poll_interval_ms * 1000000u;
    int ifd = -1;
    uint64_t next_scan = 0, last_scan = 0;
    pending_load list[16];

    if (polling) {
        ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (ifd < 0)
            KEEL__LOG(&rt->log, KEEL_LOG_WARN,
                      "inotify unavailable (%s): watching the repository by scanning every %u ms",
                      strerror(errno), rt->poll_interval_ms);
        scan(rt, ifd); /* adds the watches; the table was snapshotted by create */
        last_scan = keel__now_ns();
        next_scan = last_scan + interval;
    }
    for (;;) {
        struct pollfd fds[2];
        nfds_t nfds = 0;
        uint64_t now, wake = next_scan;
        size_t n;
        int timeout_ms;

        keel__rt_lock(rt);
        if (rt->life_stop) {
            keel__rt_unlock(rt);
            break;
        }
        now = keel__now_ns();
        n = collect_locked(rt, now, list, sizeof(list) / sizeof(list[0]), &wake);
        keel__rt_unlock(rt);
        if (n > 0) {
            run_loads(rt, list, n);
            continue;
        }
        if (polling) {
            if (now >= next_scan) {
                scan(rt, ifd);
                last_scan = now;
                next_scan = now + interval;
                wake = min_nz(wake, next_scan);
            }
            if (settle_loads(rt, now, &wake) > 0)
                continue;
        }
        timeout_ms = -1;
        if (wake != 0)
            timeout_ms = wake <= now ? 0 : (int)((wake - now + 999999u) / 1000000u);
        fds[nfds].fd = rt->life_efd;
        fds[nfds++].events = POLLIN;
        if (ifd >= 0) {
            fds[nfds].fd = ifd;
            fds[nfds++].events = POLLIN;
        }
        if (poll(fds, nfds, timeout_ms) <= 0)
            continue;
        if (fds[0].revents != 0) {
            uint64_t v;
            (void)!read(rt->life_efd, &v, sizeof(v));
        }
        if (nfds > 1 && fds[1].revents != 0) {
            char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
            while (read(ifd, buf, sizeof(buf)) > 0) {
            } /* only a hint: what changed is what the scan finds */
            next_scan = last_scan + SCAN_DEBOUNCE_NS;
        }
    }
    if (ifd >= 0)
        close(ifd);
    return NULL;
}

void keel__life_wake(keel_runtime *rt)
{
    uint64_t one = 1;

    if (rt->life_efd >= 0)
        (void)!write(rt->life_efd, &one, sizeof(one));
}

keel_err keel__life_start(keel_runtime *rt)
{
    rt->life_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (rt->life_efd < 0)
        return KEEL_EIO;
    if (pthread_create(&rt->life, NULL, life_main, rt) != 0)
        return KEEL_ENOMEM;
    rt->life_started = true;
    return KEEL_OK;
}

void keel__life_stop(keel_runtime *rt)
{
    keel__rt_lock(rt);
    rt->life_stop = true;
    keel__rt_unlock(rt);
    if (rt->life_started) {
        keel__life_wake(rt);
        pthread_join(rt->life, NULL); /* waits for a load in progress */
        rt->life_started = false;
    }
    /* The eventfd stays open until runtime_free: a request for an evicted model may still
     * write to it until the runtime stops admitting requests. */
}
