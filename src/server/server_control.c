/*
 * server_control.c: the model-control thread of `keel serve` (explicit mode).
 *
 * DESIGN
 * keel_model_load blocks for as long as a model takes to load, so no HTTP thread runs it.
 * In explicit mode one control thread runs the repository API's load and unload requests,
 * one at a time: POST /v2/repository/models/{m}/load and /unload are queued here as jobs
 * (the connection is parked meanwhile, see server.c) and answered when done. Poll mode needs
 * no thread here: libkeel's lifecycle thread watches the repository (runtime/lifecycle.c).
 *
 * A finished job is answered through s->ctl_done, the completion server.c hands down at
 * keel__srv_control_start: this file sits below server.c and never calls it by name.
 *
 * Locks: s->ctl_mu protects the job queue, ctl_stop and ctl_started; it is never held while
 * calling libkeel or completing a connection.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
    job_complete(c, err);
}

/* ---------------------------------------------------------------- the thread */

static void *control_main(void *arg)
{
    keel_srv *s = arg;

    pthread_mutex_lock(&s->ctl_mu);
    while (!s->ctl_stop) {
        srv_conn *c = s->jobs_head;

        if (c == NULL) {
            pthread_cond_wait(&s->ctl_cv, &s->ctl_mu);
            continue;
        }
        s->jobs_head = c->job_next;
        if (s->jobs_head == NULL)
            s->jobs_tail = NULL;
        c->job_next = NULL;
        pthread_mutex_unlock(&s->ctl_mu);
        run_job(s, c);
        /* Jobs are loads and unloads: rare, and milliseconds to seconds each. What the job
         * left in this thread's allocator cache goes back now instead of staying with a
         * thread that may sleep for days (keel.h). */
        keel_heap_thread_idle();
        pthread_mutex_lock(&s->ctl_mu);
    }
    pthread_mutex_unlock(&s->ctl_mu);
    return NULL;
}

keel_err keel__srv_control_start(keel_srv *s, void (*done)(srv_conn *c, keel_err status))
{
    s->ctl_done = done; /* written before the thread starts, read-only after */
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
        job_complete(c, KEEL_ESHUTDOWN);
    }
}
