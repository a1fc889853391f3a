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
 * Usage: mhd_floor [connection-memory-bytes]   (prints "port=N" once listening, then serves
 * until killed; 127.0.0.1, an ephemeral port). Build: cc -O2 mhd_floor.c -lmicrohttpd
 */
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define EXTRA_PASSES 4 /* as http_loop.c */
#define MAX_GATHERED 4096

static const char ANSWER[] = "{\"model_name\":\"ref_b0\",\"model_version\":\"1\",\"outputs\":[{"
                             "\"name\":\"probability\",\"datatype\":\"FP32\",\"shape\":[1,1],"
                             "\"data\":[0.9977683]}]}";

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
} req;

static req *turn[MAX_GATHERED];
static unsigned nturn;

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
        return answer(c, MHD_HTTP_OK, "", 0);
    }
    if (*upload_size > 0) {
        *upload_size = 0; /* consumed */
        return MHD_YES;
    }
    if (q->ready)
        return answer(c, MHD_HTTP_OK, ANSWER, sizeof(ANSWER) - 1);
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
                turn[i] = turn[--nturn];
        }
    }
    free(q);
    *con_cls = NULL;
}

int main(int argc, char **argv)
{
    size_t mem = argc > 1 ? strtoul(argv[1], NULL, 10) : 16384;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int on = 1;
    struct MHD_Daemon *d;

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
        for (unsigned pass = 0, n = nturn; n > 0 && pass < EXTRA_PASSES; pass++) {
            (void)MHD_run_wait(d, 0);
            if (nturn == n)
                break;
            n = nturn;
        }
        for (unsigned i = 0; i < nturn; i++)
            turn[i]->ready = true; /* keel: the batch runs here, its answers are kept */
        nturn = 0;
    }
}
