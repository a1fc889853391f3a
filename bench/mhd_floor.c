/*
 * mhd_floor.c: the floor of keel's HTTP exchange: a libmicrohttpd server that does everything
 * keel's batched HTTP path does except keel's own work, so that its CPU per request is what
 * any server built on libmicrohttpd and the kernel's TCP must spend on the same requests.
 * A benchmark aid run by bench/request_cost.sh (never shipped, never used by a test).
 *
 * DESIGN
 * The same shape as src/server/http_loop.c and server.c's batched path, nothing else: one
 * daemon in MHD's external epoll mode on a non-blocking listening socket (MHD_USE_EPOLL |
 * MHD_ALLOW_SUSPEND_RESUME, the same connection memory, timeout, strictness and
 * URI-log/completed callbacks, which MHD then runs as it does for keel), one thread whose turn
 * is MHD_run_wait, then up to EXTRA_PASSES non-blocking passes while each one gathers more,
 * then the end of the turn. A POST is read to its end (every chunk consumed) and then
 * "gathered": the handler returns without a response, as keel's handler does for a request
 * of a batching model; the end of the turn marks the turn's gathered requests answerable (the
 * batch keel would run there is left out: its cost is counted separately, as the model's),
 * and the next turn's handler call queues the answer. The answer has the bytes keel sends for
 * a batch-1 request of ref_b0 (status, Content-Type, a 129-byte V2 body); MHD adds the Date
 * and Content-Length headers for both. A GET is answered at once (keel's /v2/health/live;
 * and ref_b0's metadata, which keel perf reads before it starts), in the final handler call
 * as keel does (an answer in the first call makes MHD close the connection). Each answer is a
 * fresh MHD response over constant bytes (no copy), the least a server that sends a
 * per-request body through MHD can do.
 * Left out, and so not in the floor: parsing the JSON, routing, the request object, the
 * scheduler, the model, encoding the answer, metrics and logs.
 *
 * Built with FLOOR_MODEL (the CMake target mhd_model of a KEEL_BUILD_BENCH build, linked with
 * keel's codec and XGBoost), it also does the work no V2 server can skip for these requests,
 * and nothing else of keel's: each POST body is copied as it arrives (at most 1 KiB) and
 * decoded by keel's decoder (keel__v2_decode: one FP32 input of 20 features, else 400), its
 * row copied into the turn's batch; the end of the turn runs ONE XGBoosterPredictFromDense
 * over the turn's rows (the call and the array interface keel's backend makes, nthread=1),
 * and each answer is encoded by keel's encoder (keel__v2_encode, the request's id, the row's
 * probability) into a malloc'd body MHD frees. Against keel serve it measures what keel's
 * runtime (request objects, scheduler, statistics, observation, routing, the guard) costs.
 *
 * Usage: mhd_floor [connection-memory-bytes]   (prints "port=N" once listening, then serves
 * until killed; 127.0.0.1, an ephemeral port). Build: cc -O2 mhd_floor.c -lmicrohttpd
 *        mhd_model MODEL_JSON [connection-memory-bytes]   (ref_b0's 1/model.json)
 */
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#ifdef FLOOR_MODEL
#include <xgboost/c_api.h>

#include "v2codec_internal.h"

#define NFEAT 20
#define BODY_MAX 1024
static const char NOT_A_ROW[] = "{\"error\":\"not a ref_b0 row\"}";
static BoosterHandle booster;
static DMatrixHandle proxy;
static const char predict_config[] =
    "{\"type\":0,\"training\":false,\"iteration_begin\":0,\"iteration_end\":0,"
    "\"strict_shape\":false,\"missing\":NaN,\"cache_id\":0}";
#endif

#define EXTRA_PASSES 4 /* as http_loop.c; MHD_FLOOR_PASSES=N in the environment: N instead */
#define MAX_GATHERED 4096

#ifndef FLOOR_MODEL
static const char ANSWER[] = "{\"model_name\":\"ref_b0\",\"model_version\":\"1\",\"outputs\":[{"
                             "\"name\":\"probability\",\"datatype\":\"FP32\",\"shape\":[1,1],"
                             "\"data\":[0.9977683]}]}";
#endif

/* keel perf reads the model's metadata once before its load starts. */
static const char METADATA[] = "{\"name\":\"ref_b0\",\"versions\":[\"1\"],\"platform\":\"xgboost\","
                               "\"inputs\":[{\"name\":\"features\",\"datatype\":\"FP32\","
                               "\"shape\":[-1,20]}],\"outputs\":[{\"name\":\"probability\","
                               "\"datatype\":\"FP32\",\"shape\":[-1,1]}]}";

/* A request's state, one per request as keel's srv_conn (a keep-alive connection gets a new
 * one for each request). */
typedef struct {
    bool headers;  /* the first handler call (headers in) is done */
    bool gathered; /* read to its end, waiting for the end of the turn */
    bool ready;    /* the end of the turn passed: answer on the next handler call */
#ifdef FLOOR_MODEL
    size_t blen;  /* body bytes in body (more than BODY_MAX: refused) */
    unsigned row; /* its row of the turn's batch */
    float prob;   /* the model's answer */
    char id[64];  /* the request's id ("" if none) */
    char body[BODY_MAX];
#endif
} req;

static req *turn[MAX_GATHERED];
static unsigned nturn;
#ifdef FLOOR_MODEL
static float batch[MAX_GATHERED][NFEAT];
static unsigned nrows; /* rows of this turn's batch (a request that left keeps its row) */
/* Totals for GET /v2/models/ref_b0/stats, in the fields of keel's statistics that
 * bench/suite.sh and bench/request_cost.sh read: rows answered, XGBoost calls, their time. */
static unsigned long long n_rows, n_calls, call_ns;

static unsigned long long mono_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

/* Decodes q's body into row i of the batch and keeps its id; false if it is not one FP32
 * row of NFEAT features. */
static bool take_row(req *q, unsigned i)
{
    keel__v2_request r;
    char err[256];
    bool ok;

    if (q->blen > BODY_MAX ||
        keel__v2_decode(q->body, q->blen, (size_t)-1, &r, err, sizeof(err)) != 200)
        return false;
    ok = r.ninputs == 1 && r.inputs[0].datatype == KEEL_TYPE_FP32 && r.inputs[0].count == NFEAT;
    if (ok) {
        memcpy(batch[i], r.inputs[0].data, sizeof(batch[i]));
        snprintf(q->id, sizeof(q->id), "%s", r.info.id != NULL ? r.info.id : "");
    }
    keel__v2_request_fini(&r);
    return ok;
}

/* One XGBoost call over the turn's n rows, as keel's backend makes it; each gathered request
 * gets its row's answer. */
static void predict_turn(unsigned n)
{
    char iface[256];
    bst_ulong const *shape = NULL;
    bst_ulong ndim = 0;
    const float *out = NULL;
    unsigned long long t0 = mono_ns();

    snprintf(iface, sizeof(iface),
             "{\"data\":[%llu,true],\"shape\":[%u,%d],\"typestr\":\"<f4\",\"version\":3}",
             (unsigned long long)(uintptr_t)batch, n, NFEAT);
    if (XGBoosterPredictFromDense(booster, iface, predict_config, proxy, &shape, &ndim, &out) !=
        0) {
        fprintf(stderr, "mhd_model: predict: %s\n", XGBGetLastError());
        exit(1);
    }
    for (unsigned i = 0; i < nturn; i++)
        turn[i]->prob = out[turn[i]->row];
    call_ns += mono_ns() - t0;
    n_calls++;
    n_rows += nturn;
}
#endif

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *c)
{
    (void)cls;
    (void)uri;
    (void)c;
    return calloc(1, sizeof(req));
}

static enum MHD_Result answer(struct MHD_Connection *c, unsigned status, const char *body,
                              size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_PERSISTENT);
    enum MHD_Result ok;

    if (r == NULL)
        return MHD_NO;
    if (len > 0) /* keel's /v2/health/live has no body and no Content-Type */
        (void)MHD_add_response_header(r, "Content-Type", "application/json");
    ok = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_size, void **con_cls)
{
    req *q = *con_cls;

    (void)cls;
    (void)version;
    (void)upload_data;
    if (!q->headers) { /* as keel: answers come in the final call, never the first */
        q->headers = true;
        return MHD_YES;
    }
    if (strcmp(method, "POST") != 0) {
        if (strcmp(url, "/v2/models/ref_b0") == 0)
            return answer(c, MHD_HTTP_OK, METADATA, sizeof(METADATA) - 1);
#ifdef FLOOR_MODEL
        if (strcmp(url, "/v2/models/ref_b0/stats") == 0) {
            static char st[512];
            int n = snprintf(st, sizeof(st),
                             "{\"model_stats\":[{\"name\":\"ref_b0\",\"inference_count\":%llu,"
                             "\"execution_count\":%llu,\"inference_stats\":{\"success\":{"
                             "\"count\":%llu},\"compute_infer\":{\"count\":%llu,\"ns\":%llu}}}]}",
                             n_rows, n_calls, n_rows, n_calls, call_ns);
            return answer(c, MHD_HTTP_OK, st, (size_t)n);
        }
#endif
        return answer(c, MHD_HTTP_OK, "", 0);
    }
    if (*upload_size > 0) {
#ifdef FLOOR_MODEL
        if (q->blen + *upload_size <= BODY_MAX)
            memcpy(q->body + q->blen, upload_data, *upload_size);
        q->blen += *upload_size;
#endif
        *upload_size = 0; /* consumed */
        return MHD_YES;
    }
#ifdef FLOOR_MODEL
    if (q->ready) {
        int64_t shape[2] = {1, 1};
        keel_tensor_view v = {"probability", KEEL_TYPE_FP32, shape, 2, &q->prob, sizeof(float)};
        keel_v2_response out;
        char err[256];
        struct MHD_Response *r;
        enum MHD_Result ok;
        if (keel__v2_encode("ref_b0", 1, q->id[0] != '\0' ? q->id : NULL, &v, NULL, 1, &out, err,
                            sizeof(err)) != 0 ||
            (r = MHD_create_response_from_buffer(out.body_len, out.body, MHD_RESPMEM_MUST_FREE)) ==
                NULL)
            return MHD_NO;
        (void)MHD_add_response_header(r, "Content-Type", "application/json");
        ok = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ok;
    }
    if (!q->gathered) {
        if (nrows == MAX_GATHERED)
            return MHD_NO;
        if (!take_row(q, nrows))
            return answer(c, MHD_HTTP_BAD_REQUEST, NOT_A_ROW, sizeof(NOT_A_ROW) - 1);
        q->row = nrows++;
    }
#else
    if (q->ready)
        return answer(c, MHD_HTTP_OK, ANSWER, sizeof(ANSWER) - 1);
#endif
    if (!q->gathered) {
        if (nturn == MAX_GATHERED)
            return MHD_NO;
        q->gathered = true;
        turn[nturn++] = q;
    }
    return MHD_YES; /* no answer yet: MHD calls again in the next turn */
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    req *q = *con_cls;

    (void)cls;
    (void)c;
    (void)toe;
    if (q != NULL && q->gathered && !q->ready) { /* the client left inside the turn */
        for (unsigned i = 0; i < nturn; i++) {
            if (turn[i] == q)
                turn[i] = turn[--nturn]; /* (with FLOOR_MODEL its row is computed unused) */
        }
    }
    free(q);
    *con_cls = NULL;
}

int main(int argc, char **argv)
{
#ifdef FLOOR_MODEL
    size_t mem = argc > 2 ? strtoul(argv[2], NULL, 10) : 16384;
#else
    size_t mem = argc > 1 ? strtoul(argv[1], NULL, 10) : 16384;
#endif
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int on = 1;
    struct MHD_Daemon *d;
    const char *pe = getenv("MHD_FLOOR_PASSES");
    unsigned passes = pe != NULL ? (unsigned)strtoul(pe, NULL, 10) : EXTRA_PASSES;

#ifdef FLOOR_MODEL
    if (argc < 2 || XGBoosterCreate(NULL, 0, &booster) != 0 ||
        XGBoosterLoadModel(booster, argv[1]) != 0 ||
        XGBoosterSetParam(booster, "nthread", "1") != 0 || XGProxyDMatrixCreate(&proxy) != 0) {
        fprintf(stderr, "mhd_model: usage: mhd_model MODEL_JSON [memory] (%s)\n",
                XGBGetLastError());
        return 1;
    }
    (void)XGBSetGlobalConfig("{\"verbosity\":0}");
#endif
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(fd, 1024) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &alen) != 0) {
        perror("mhd_floor: socket");
        return 1;
    }
    d = MHD_start_daemon(MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME, 0, NULL, NULL, on_request, NULL,
                         MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd, MHD_OPTION_NOTIFY_COMPLETED,
                         on_completed, NULL, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)60,
                         MHD_OPTION_CONNECTION_LIMIT, (unsigned)1024,
                         MHD_OPTION_CONNECTION_MEMORY_LIMIT, mem, MHD_OPTION_SIGPIPE_HANDLED_BY_APP,
                         1, MHD_OPTION_STRICT_FOR_CLIENT, -1, MHD_OPTION_URI_LOG_CALLBACK, on_uri,
                         NULL, MHD_OPTION_END);
    if (d == NULL) {
        fprintf(stderr, "mhd_floor: cannot start the daemon\n");
        return 1;
    }
    printf("port=%u\n", (unsigned)ntohs(a.sin_port));
    fflush(stdout);
    for (;;) {
        (void)MHD_run_wait(d, -1);
        for (unsigned pass = 0, n = nturn; n > 0 && pass < passes; pass++) {
            (void)MHD_run_wait(d, 0);
            if (nturn == n)
                break;
            n = nturn;
        }
#ifdef FLOOR_MODEL
        if (nrows > 0)
            predict_turn(nrows);
        nrows = 0;
#endif
        for (unsigned i = 0; i < nturn; i++)
            turn[i]->ready = true; /* keel: the batch runs here, its answers are kept */
        nturn = 0;
    }
}
