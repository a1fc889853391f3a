/*
 * server_routes.c: the synchronous endpoints of `keel serve`: server metadata, health,
 * model metadata/ready/config, statistics and the repository index (GET /metrics is rendered
 * on the scrape thread: server_control.c).
 *
 * DESIGN
 * Each endpoint runs on the MHD thread that received the request, calls libkeel functions
 * that only take keel's locks briefly (no inference, no load), and fills an srv_reply that
 * server.c queues. No state of its own and no lock of its own. JSON is built with jansson;
 * every allocation failure becomes a 500 reply, never an abort.
 *
 * Model-level answers: 404 for a model keel has never heard of (not in the repository, never
 * loaded) or a version that is not served while others are; 503 for a known model that is
 * not loaded, still loading or failed (keel__srv_reply_not_served in reply.c decides).
 */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "reply.h"
#include "server_routes.h"

/* ---------------------------------------------------------------- helpers */

/* json_object_set_new that reports failure (it consumes v either way). */
static bool put(json_t *obj, const char *key, json_t *v)
{
    return v != NULL && json_object_set_new(obj, key, v) == 0;
}

static bool append(json_t *arr, json_t *v)
{
    return v != NULL && json_array_append_new(arr, v) == 0;
}

static json_t *version_string(int64_t v)
{
    char buf[24];

    snprintf(buf, sizeof(buf), "%" PRId64, v);
    return json_string(buf);
}

/* ---------------------------------------------------------------- server */

static void server_metadata(srv_reply *r)
{
    static const char *const extensions[] = {"binary_tensor_data", "model_repository", "statistics",
                                             "trace", "model_configuration"};
    json_t *root = json_object(), *ext = json_array();

    if (root == NULL || ext == NULL)
        goto fail;
    for (size_t i = 0; i < sizeof(extensions) / sizeof(extensions[0]); i++) {
        if (!append(ext, json_string(extensions[i])))
            goto fail;
    }
    if (!put(root, "name", json_string("keel")) ||
        !put(root, "version", json_string(KEEL_VERSION_STRING)))
        goto fail;
    if (!put(root, "extensions", ext)) {
        ext = NULL;
        goto fail;
    }
    keel__srv_reply_json(r, 200, root);
    return;
fail:
    json_decref(ext);
    json_decref(root);
    keel__srv_reply_error(r, 500, "out of memory");
}

/* Whether <repository>/<name>/config.json or config.pbtxt exists (keel remembers models that
 * are gone). */
static bool in_repository(keel_srv *s, const char *name)
{
    static const char *const files[] = {"config.json", "config.pbtxt"};
    bool found = false;

    for (int i = 0; i < 2 && !found; i++) {
        char *path = NULL;
        struct stat st;
        if (asprintf(&path, "%s/%s/%s", s->opts->model_repository, name, files[i]) < 0)
            return true; /* out of memory: assume the worst, it counts */
        found = stat(path, &st) == 0;
        free(path);
    }
    return found;
}

/*
 * Ready: not shutting down, no model loading or unloading, and (in none and poll modes,
 * where the repository is what must be served) no model of the repository whose last load
 * failed with no version serving. In explicit mode a failed load was already reported to
 * its caller.
 */
static void server_ready(keel_srv *s, srv_reply *r)
{
    keel_model_status *list = NULL;
    size_t n = 0;

    if (atomic_load(&s->not_ready)) {
        keel__srv_reply_error(r, 503, "the server is shutting down");
        return;
    }
    {
        keel_preprocess_stats ps;
        keel_preprocess_stats_get(s->rt, &ps);
        if (ps.enabled && !ps.healthy) {
            keel__srv_reply_error(r, 503,
                                  "preprocessing workers cannot be kept alive (%u of %u "
                                  "running, fork server %s)",
                                  ps.workers_alive, ps.workers,
                                  ps.forkserver_pid > 0 ? "running" : "gone");
            return;
        }
    }
    if (keel_model_list(s->rt, &list, &n) != KEEL_OK) {
        keel__srv_reply_error(r, 500, "out of memory");
        return;
    }
    for (size_t i = 0; i < n; i++) {
        const keel_model_status *m = &list[i];
        if (m->state == KEEL_MODEL_LOADING || m->state == KEEL_MODEL_UNLOADING) {
            keel__srv_reply_error(r, 503, "model '%s' is %s", m->name,
                                  m->state == KEEL_MODEL_LOADING ? "loading" : "unloading");
            goto done;
        }
        if (m->state == KEEL_MODEL_FAILED && s->opts->control != KEEL_SERVER_CONTROL_EXPLICIT &&
            in_repository(s, m->name)) {
            keel__srv_reply_error(r, 503, "model '%s' failed to load: %s", m->name,
                                  m->last_error_msg[0] != '\0' ? m->last_error_msg
                                                               : keel_strerror(m->last_error));
            goto done;
        }
    }
    keel__srv_reply_empty(r, 200);
done:
    keel_model_status_free(list, n);
}

/* ---------------------------------------------------------------- models */

/* Input or output descriptions for the metadata, from the normalised config's tensors. */
static json_t *tensors_metadata(const json_t *tensors, bool batched)
{
    json_t *arr = json_array(), *t = NULL, *shape = NULL;
    size_t i;
    json_t *cfg;

    if (arr == NULL)
        return NULL;
    json_array_foreach (tensors, i, cfg) {
        const char *name = json_string_value(json_object_get(cfg, "name"));
        const char *dt = json_string_value(json_object_get(cfg, "data_type"));
        const json_t *dims = json_object_get(cfg, "dims");
        size_t j;
        json_t *d;

        if (name == NULL || dt == NULL || !json_is_array(dims))
            goto fail;
        if ((t = json_object()) == NULL || (shape = json_array()) == NULL)
            goto fail;
        if (batched && !append(shape, json_integer(-1)))
            goto fail;
        json_array_foreach (dims, j, d) {
            if (!append(shape, json_integer(json_integer_value(d))))
                goto fail;
        }
        if (!put(t, "name", json_string(name)) ||
            !put(t, "datatype", json_string(keel_datatype_name(keel_datatype_from_name(dt)))))
            goto fail;
        if (!put(t, "shape", shape)) {
            shape = NULL;
            goto fail;
        }
        shape = NULL;
        if (!append(arr, t)) {
            t = NULL;
            goto fail;
        }
        t = NULL;
    }
    return arr;
fail:
    json_decref(shape);
    json_decref(t);
    json_decref(arr);
    return NULL;
}

/*
 * Loads what a model endpoint needs: the parsed config (if cfg != NULL) and the ready
 * versions (if versions != NULL, as a JSON array of strings). On failure fills r and
 * returns false.
 */
static bool model_lookup(keel_srv *s, const srv_conn *c, json_t **cfg, json_t **versions,
                         srv_reply *r)
{
    char *text = NULL;
    keel_model_status *list = NULL;
    size_t n = 0;
    json_error_t jerr;
    keel_err err;

    if (cfg != NULL)
        *cfg = NULL;
    if (versions != NULL)
        *versions = NULL;
    if (!keel_model_is_ready(s->rt, c->model, c->version)) {
        keel__srv_reply_not_served(s, c->model, c->version, r);
        return false;
    }
    if (cfg != NULL) {
        if ((err = keel_model_config_json(s->rt, c->model, &text)) != KEEL_OK) {
            if (err == KEEL_ENOMEM)
                keel__srv_reply_error(r, 500, "out of memory");
            else
                keel__srv_reply_not_served(s, c->model, c->version, r); /* unloaded meanwhile */
            return false;
        }
        *cfg = json_loads(text, 0, &jerr);
        free(text);
        if (*cfg == NULL) {
            keel__srv_reply_error(r, 500, "model '%s': cannot parse its configuration: %s",
                                  c->model, jerr.text);
            return false;
        }
    }
    if (versions != NULL) {
        if (keel_model_list(s->rt, &list, &n) != KEEL_OK || (*versions = json_array()) == NULL)
            goto nomem;
        for (size_t i = 0; i < n; i++) {
            if (strcmp(list[i].name, c->model) != 0 || list[i].version < 0 ||
                list[i].state != KEEL_MODEL_READY)
                continue;
            if (!append(*versions, version_string(list[i].version)))
                goto nomem;
        }
        keel_model_status_free(list, n);
    }
    return true;
nomem:
    keel_model_status_free(list, n);
    if (cfg != NULL) {
        json_decref(*cfg);
        *cfg = NULL;
    }
    if (versions != NULL) {
        json_decref(*versions);
        *versions = NULL;
    }
    keel__srv_reply_error(r, 500, "out of memory");
    return false;
}

static void model_metadata(keel_srv *s, const srv_conn *c, srv_reply *r)
{
    json_t *cfg = NULL, *versions = NULL, *root = NULL, *in = NULL, *out = NULL;
    const char *backend;
    bool batched;

    if (!model_lookup(s, c, &cfg, &versions, r))
        return;
    backend = json_string_value(json_object_get(cfg, "backend"));
    batched = json_integer_value(json_object_get(cfg, "max_batch_size")) > 0;
    in = tensors_metadata(json_object_get(cfg, "input"), batched);
    out = tensors_metadata(json_object_get(cfg, "output"), batched);
    {
        /* An image model: clients send the encoded images, one BYTES element each. */
        const char *pin =
            json_string_value(json_object_get(json_object_get(cfg, "preprocess"), "input"));
        if (in != NULL && pin != NULL &&
            !append(in,
                    json_pack("{s:s,s:s,s:[i]}", "name", pin, "datatype", "BYTES", "shape", -1)))
            goto fail;
    }
    if (in == NULL || out == NULL || (root = json_object()) == NULL)
        goto fail;
    if (!put(root, "name", json_string(c->model)))
        goto fail;
    if (!put(root, "versions", versions)) {
        versions = NULL;
        goto fail;
    }
    versions = NULL;
    if (!put(root, "platform", json_string(backend != NULL ? backend : "")))
        goto fail;
    if (!put(root, "inputs", in)) {
        in = NULL;
        goto fail;
    }
    in = NULL;
    if (!put(root, "outputs", out)) {
        out = NULL;
        goto fail;
    }
    json_decref(cfg);
    keel__srv_reply_json(r, 200, root);
    return;
fail:
    json_decref(in);
    json_decref(out);
    json_decref(versions);
    json_decref(root);
    json_decref(cfg);
    keel__srv_reply_error(r, 500, "out of memory");
}

static void model_ready(keel_srv *s, const srv_conn *c, srv_reply *r)
{
    if (keel_model_is_ready(s->rt, c->model, c->version))
        keel__srv_reply_empty(r, 200);
    else
        keel__srv_reply_not_served(s, c->model, c->version, r);
}

static void model_config(keel_srv *s, const srv_conn *c, srv_reply *r)
{
    char *text = NULL;
    keel_err err;

    if (!keel_model_is_ready(s->rt, c->model, c->version)) {
        keel__srv_reply_not_served(s, c->model, c->version, r);
        return;
    }
    if ((err = keel_model_config_json(s->rt, c->model, &text)) != KEEL_OK) {
        if (err == KEEL_ENOMEM)
            keel__srv_reply_error(r, 500, "out of memory");
        else
            keel__srv_reply_not_served(s, c->model, c->version, r);
        return;
    }
    free(r->body);
    r->status = 200;
    r->body = text; /* malloc'd by libkeel, freed by MHD with free() */
    r->pooled = false;
    r->len = strlen(text);
    r->ctype = "application/json";
}

/* ---------------------------------------------------------------- statistics */

static json_t *count_ns(uint64_t count, uint64_t ns)
{
    return json_pack("{s:I,s:I}", "count", (json_int_t)count, "ns", (json_int_t)ns);
}

/* One entry of "model_stats" (Triton's statistics extension). */
static json_t *stats_entry(const char *name, const char *version, const keel_model_stats *st,
                           const keel_batch_stat *bs, size_t nbs)
{
    uint64_t failed = st->rejected, admitted = st->success;
    json_t *e = NULL, *is = NULL;

    for (int k = 1; k < KEEL_ERR_COUNT_; k++) {
        failed += st->failure[k];
        admitted += st->failure[k];
    }
    if ((is = json_object()) == NULL)
        return NULL;
    /* keel measures queue and compute time per request, not end to end: success.ns is
     * their sum over all admitted requests, an approximation of Triton's figure. */
    if (!put(is, "success", count_ns(st->success, st->queue_ns + st->compute_ns)) ||
        !put(is, "fail", count_ns(failed, 0)) ||
        !put(is, "queue", count_ns(admitted, st->queue_ns)) ||
        !put(is, "compute_input", count_ns(0, 0)) ||
        !put(is, "compute_infer", count_ns(st->execution_count, st->compute_ns)) ||
        !put(is, "compute_output", count_ns(0, 0)))
        goto fail;
    e = json_pack("{s:s,s:s,s:I,s:I,s:I}", "name", name, "version", version, "last_inference",
                  (json_int_t)st->last_inference_unix_ms, "inference_count",
                  (json_int_t)st->inference_count, "execution_count",
                  (json_int_t)st->execution_count);
    if (e == NULL)
        goto fail;
    if (!put(e, "inference_stats", is)) {
        is = NULL;
        goto fail;
    }
    is = NULL;
    {
        json_t *arr = json_array();
        for (size_t i = 0; arr != NULL && i < nbs; i++) {
            json_t *b = json_pack("{s:I,s:o,s:o,s:o}", "batch_size", (json_int_t)bs[i].batch_size,
                                  "compute_input", count_ns(bs[i].count, bs[i].input_ns),
                                  "compute_infer", count_ns(bs[i].count, bs[i].infer_ns),
                                  "compute_output", count_ns(bs[i].count, bs[i].output_ns));
            if (b == NULL || json_array_append_new(arr, b) != 0) {
                json_decref(arr);
                arr = NULL;
            }
        }
        if (!put(e, "batch_stats", arr))
            goto fail;
    }
    /* keel's own (not Triton's): where the requests ran (--infer-on-http-thread). */
    if (!put(e, "keel_runs",
             json_pack("{s:I,s:I}", "inline", (json_int_t)st->runs_inline, "handed_off",
                       (json_int_t)st->runs_handed_off)))
        goto fail;
    return e;
fail:
    json_decref(is);
    json_decref(e);
    return NULL;
}

/* The newest ready version of list[i].name (rows of one model are adjacent), or -1; and
 * whether version (if >= 0) is one of its ready versions. */
static int64_t newest_ready(const keel_model_status *list, size_t n, size_t i, int64_t version,
                            bool *served)
{
    int64_t newest = -1;

    *served = false;
    for (size_t j = i; j < n && strcmp(list[j].name, list[i].name) == 0; j++) {
        if (list[j].state != KEEL_MODEL_READY || list[j].version < 0)
            continue;
        if (list[j].version > newest)
            newest = list[j].version;
        *served |= list[j].version == version;
    }
    return newest;
}

/*
 * Statistics of one model (name != NULL; version -1 = the newest) or of every model keel has
 * loaded at some point (name == NULL). keel keeps statistics per model, across versions and
 * reloads, so "version" only names the version asked for (or the newest serving one).
 */
static void stats(keel_srv *s, const char *name, int64_t version, srv_reply *r)
{
    keel_model_status *list = NULL;
    size_t n = 0;
    json_t *root = NULL, *arr = NULL;
    bool found = false;

    if (keel_model_list(s->rt, &list, &n) != KEEL_OK || (root = json_object()) == NULL ||
        (arr = json_array()) == NULL)
        goto nomem;
    if (!put(root, "model_stats", arr)) {
        arr = NULL;
        goto nomem;
    }
    for (size_t i = 0; i < n; i++) {
        keel_model_stats st;
        char vbuf[24] = "";
        int64_t newest;
        bool served;

        if (i > 0 && strcmp(list[i].name, list[i - 1].name) == 0)
            continue; /* one entry per model; the list is sorted by name */
        if (name != NULL && strcmp(list[i].name, name) != 0)
            continue;
        newest = newest_ready(list, n, i, version, &served);
        if (name != NULL && version >= 0 && !served)
            break; /* answered "not served" below */
        if (keel_model_stats_get(s->rt, list[i].name, &st) != KEEL_OK) {
            if (name == NULL)
                continue; /* in the repository, never loaded: nothing to report */
            memset(&st, 0, sizeof(st));
        }
        found = true;
        if (version >= 0)
            newest = version;
        if (newest >= 0)
            snprintf(vbuf, sizeof(vbuf), "%" PRId64, newest);
        {
            keel_batch_stat bs[128];
            size_t nbs = 0;
            if (keel_model_batch_stats_get(s->rt, list[i].name, bs, 128, &nbs) != KEEL_OK)
                nbs = 0;
            if (!append(arr, stats_entry(list[i].name, vbuf, &st, bs, nbs < 128 ? nbs : 128)))
                goto nomem;
        }
    }
    keel_model_status_free(list, n);
    list = NULL;
    if (name != NULL && !found) {
        json_decref(root);
        keel__srv_reply_not_served(s, name, version, r);
        return;
    }
    keel__srv_reply_json(r, 200, root);
    return;
nomem:
    json_decref(root);
    keel_model_status_free(list, n);
    keel__srv_reply_error(r, 500, "out of memory");
}

/* ---------------------------------------------------------------- repository index */

/* keel's extension of an index row / model metadata: load attempts, retries, eviction and
 * the memory of the row's generation (docs/OPERATIONS.md, "Reading the memory metrics"). */
static json_t *lifecycle_json(const keel_model_status *m)
{
    json_t *o =
        json_pack("{s:I,s:I,s:I,s:I,s:b,s:b}", "load_attempts", (json_int_t)m->load_attempts,
                  "load_failures", (json_int_t)m->load_failures, "last_attempt_unix_ms",
                  (json_int_t)m->last_attempt_unix_ms, "next_retry_unix_ms",
                  (json_int_t)m->next_retry_unix_ms, "pinned", m->pinned, "evicted", m->evicted);

    if (o != NULL && m->generation_id != 0) {
        json_t *mem = json_pack("{s:I,s:I,s:I,s:I}", "rss_bytes", (json_int_t)m->mem_rss_bytes,
                                "pss_bytes", (json_int_t)m->mem_pss_bytes, "estimate_bytes",
                                (json_int_t)m->mem_estimate_bytes, "charged_bytes",
                                (json_int_t)m->mem_charged_bytes);
        /* jansson's set_new consumes the value, and fails on a NULL one. */
        if (json_object_set_new(o, "generation", json_integer((json_int_t)m->generation_id)) != 0 ||
            json_object_set_new(o, "memory", mem) != 0) {
            json_decref(o);
            return NULL;
        }
    }
    if (o != NULL && m->warnings != NULL && m->warnings[0] != '\0') {
        /* Harmless fields of the configuration keel ignores, one per line (config.c). */
        json_t *w = json_array();
        const char *p = m->warnings;

        if (w == NULL || json_object_set_new(o, "warnings", w) != 0) {
            json_decref(o);
            return NULL;
        }
        while (*p != '\0') {
            size_t len = strcspn(p, "\n");
            if (len > 0 && json_array_append_new(w, json_stringn(p, len)) != 0) {
                json_decref(o);
                return NULL;
            }
            p += len + (p[len] == '\n');
        }
    }
    return o;
}

static void repo_index(keel_srv *s, const srv_conn *c, srv_reply *r)
{
    keel_model_status *list = NULL;
    size_t n = 0;
    json_t *arr = NULL, *body = NULL;
    json_error_t jerr;
    bool ready_only = false;

    if (c->body_len > 0) {
        const json_t *ready;
        if ((body = json_loadb(c->body, c->body_len, JSON_REJECT_DUPLICATES, &jerr)) == NULL) {
            keel__srv_reply_error(r, 400, "invalid JSON body: %s", jerr.text);
            return;
        }
        if (!json_is_object(body)) {
            json_decref(body);
            keel__srv_reply_error(r, 400, "invalid body: expected a JSON object");
            return;
        }
        ready = json_object_get(body, "ready");
        if (ready != NULL && !json_is_boolean(ready)) {
            json_decref(body);
            keel__srv_reply_error(r, 400, "ready: expected true or false");
            return;
        }
        ready_only = ready != NULL && json_is_true(ready);
        json_decref(body);
    }
    if (keel_model_list(s->rt, &list, &n) != KEEL_OK || (arr = json_array()) == NULL)
        goto nomem;
    for (size_t i = 0; i < n; i++) {
        const keel_model_status *m = &list[i];
        json_t *row;
        const char *reason = "";

        if (ready_only && m->state != KEEL_MODEL_READY)
            continue;
        if (m->state == KEEL_MODEL_FAILED || m->last_error != KEEL_OK || m->evicted)
            reason =
                m->last_error_msg[0] != '\0' ? m->last_error_msg : keel_strerror(m->last_error);
        else if (m->state == KEEL_MODEL_UNAVAILABLE)
            reason = "unloaded";
        if ((row = json_object()) == NULL)
            goto nomem;
        if (!put(row, "name", json_string(m->name)) ||
            (m->version >= 0 && !put(row, "version", version_string(m->version))) ||
            !put(row, "state", json_string(keel_model_state_name(m->state))) ||
            !put(row, "reason", json_string(reason)) || !put(row, "keel", lifecycle_json(m))) {
            json_decref(row);
            goto nomem;
        }
        if (!append(arr, row)) /* consumes row even when it fails */
            goto nomem;
    }
    keel_model_status_free(list, n);
    keel__srv_reply_json(r, 200, arr);
    return;
nomem:
    json_decref(arr);
    keel_model_status_free(list, n);
    keel__srv_reply_error(r, 500, "out of memory");
}

/* ---------------------------------------------------------------- dispatch */

void keel__srv_route_sync(keel_srv *s, srv_conn *c, srv_reply *r)
{
    switch (c->route) {
    case ROUTE_SERVER_META:
        server_metadata(r);
        return;
    case ROUTE_LIVE:
        keel__srv_reply_empty(r, 200);
        return;
    case ROUTE_READY:
        server_ready(s, r);
        return;
    case ROUTE_MODEL_META:
        model_metadata(s, c, r);
        return;
    case ROUTE_MODEL_READY:
        model_ready(s, c, r);
        return;
    case ROUTE_MODEL_CONFIG:
        model_config(s, c, r);
        return;
    case ROUTE_MODEL_STATS:
        stats(s, c->model, c->version, r);
        return;
    case ROUTE_ALL_STATS:
        stats(s, NULL, -1, r);
        return;
    case ROUTE_REPO_INDEX:
        repo_index(s, c, r);
        return;
    default:
        keel__srv_reply_error(r, 500, "internal error: no synchronous handler for this route");
        return;
    }
}
