/*
 * server_control.c: the job threads of `keel serve`: model control and scrapes.
 *
 * DESIGN
 * Work that takes milliseconds to seconds never runs on an HTTP loop (a loop serves many
 * connections, and each would wait for it) nor on gRPC's completion-queue thread. Such a
 * request becomes a job: its connection is parked (server.c), a job thread runs it and
 * answers it through s->ctl_done, the completion server.c hands down at start (this file
 * sits below server.c and never calls it by name). Two job threads, each with its FIFO
 * (srv_jobq), so that a scrape never waits behind a model load:
 *   control  (explicit mode) POST /v2/repository/models/{m}/load and /unload, and gRPC's
 *            RepositoryModelLoad/Unload: keel_model_load blocks for as long as a model takes
 *            to load. Poll mode needs no thread here: libkeel's lifecycle thread watches the
 *            repository (runtime/lifecycle.c).
 *   scrape   (always) GET /metrics: rendering a scrape costs ~0.15 ms per loaded model
 *            (docs/PERFORMANCE.md), 15-25 ms with 100 models, which on a loop thread held
 *            up every other request of that loop for as long.
 * A job's outcome: ctl_status, and ctl_msg (an error) or ctl_body (a scrape's text), owned
 * by the connection.
 *
 * Locks: q->mu protects a queue's FIFO, stop and started flags; it is never held while
 * running a job, calling libkeel or completing a connection, and the two queues' locks
 * never nest.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "metrics.h"
#include "reply.h"
#include "server_control.h"
#include "server_log.h"

/* ---------------------------------------------------------------- explicit jobs */

/* Hands a finished job back to the front end that queued it. */
static void job_complete(srv_conn *c, keel_err err)
{
    if (c->job_done != NULL)
        c->job_done(c, err); /* gRPC's, set by the job's front end */
    else
        c->s->ctl_done(c, err); /* HTTP's, handed down by server.c at start */
}

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

static void run_control_job(keel_srv *s, srv_conn *c)
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
    job_complete(c, err);
}

static void run_scrape_job(keel_srv *s, srv_conn *c)
{
    size_t len = 0;

    if ((c->ctl_body = keel__srv_metrics_render(s, &len)) == NULL) {
        c->ctl_status = 500;
        c->ctl_msg = strdup("out of memory");
        job_complete(c, KEEL_ENOMEM);
        return;
    }
    c->ctl_body_len = len;
    c->ctl_status = 200;
    job_complete(c, KEEL_OK);
}

static void run_job(keel_srv *s, srv_conn *c)
{
    if (c->route == ROUTE_METRICS)
        run_scrape_job(s, c);
    else
        run_control_job(s, c);
}

/* ---------------------------------------------------------------- the threads */

static void *jobq_main(void *arg)
{
    srv_jobq *q = arg;

    pthread_mutex_lock(&q->mu);
    while (!q->stop) {
        srv_conn *c = q->head;

        if (c == NULL) {
            pthread_cond_wait(&q->cv, &q->mu);
            continue;
        }
        q->head = c->job_next;
        if (q->head == NULL)
            q->tail = NULL;
        c->job_next = NULL;
        pthread_mutex_unlock(&q->mu);
        run_job(q->s, c);
        /* Jobs are loads, unloads and scrapes: seconds apart at most rates. What the job
         * left in this thread's allocator cache goes back now instead of staying with a
         * thread that may sleep for days (keel.h). */
        keel_heap_thread_idle();
        pthread_mutex_lock(&q->mu);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

int keel__srv_jobq_init(srv_jobq *q, keel_srv *s, const char *name)
{
    pthread_condattr_t ca;
    int rc;

    memset(q, 0, sizeof(*q));
    q->s = s;
    q->name = name;
    if ((rc = pthread_mutex_init(&q->mu, NULL)) != 0)
        return rc;
    if ((rc = pthread_condattr_init(&ca)) == 0) {
        rc = pthread_cond_init(&q->cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    if (rc != 0)
        pthread_mutex_destroy(&q->mu);
    return rc;
}

void keel__srv_jobq_fini(srv_jobq *q)
{
    pthread_cond_destroy(&q->cv);
    pthread_mutex_destroy(&q->mu);
}

keel_err keel__srv_jobq_start(srv_jobq *q, void (*done)(srv_conn *c, keel_err status))
{
    q->s->ctl_done = done; /* written before the thread starts, read-only after */
    pthread_mutex_lock(&q->mu);
    q->stop = false;
    pthread_mutex_unlock(&q->mu);
    if (pthread_create(&q->thread, NULL, jobq_main, q) != 0)
        return KEEL_ENOMEM;
    pthread_mutex_lock(&q->mu);
    q->started = true;
    pthread_mutex_unlock(&q->mu);
    return KEEL_OK;
}

bool keel__srv_jobq_enqueue(srv_jobq *q, srv_conn *c)
{
    pthread_mutex_lock(&q->mu);
    if (q->stop || !q->started) {
        pthread_mutex_unlock(&q->mu);
        return false;
    }
    c->job_next = NULL;
    if (q->tail != NULL)
        q->tail->job_next = c;
    else
        q->head = c;
    q->tail = c;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    return true;
}

void keel__srv_jobq_stop(srv_jobq *q)
{
    srv_conn *jobs;
    bool started;

    pthread_mutex_lock(&q->mu);
    q->stop = true;
    started = q->started;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    if (started)
        pthread_join(q->thread, NULL); /* waits for the job in progress */

    pthread_mutex_lock(&q->mu);
    q->started = false;
    jobs = q->head;
    q->head = q->tail = NULL;
    pthread_mutex_unlock(&q->mu);
    /* Jobs that never started are answered, so their connections resume. */
    while (jobs != NULL) {
        srv_conn *c = jobs;
        jobs = c->job_next;
        c->job_next = NULL;
        c->ctl_status = 503;
        c->ctl_msg = strdup("the server is shutting down");
        job_complete(c, KEEL_ESHUTDOWN);
    }
}
