/*
 * grpc_server.c: the gRPC front end of `keel serve`: service inference.GRPCInferenceService
 * (the Open Inference Protocol plus Triton's extensions, keel's src/server/proto/
 * keel_inference.proto) and grpc.health.v1.Health/Check, on gRPC's C core.
 *
 * DESIGN
 * One completion queue and one thread of ours (the CQ thread) drive every call; gRPC's own
 * threads do the I/O. The CQ thread accepts calls (one grpc_server_request_call always
 * outstanding for every method but ModelInfer, and one grpc_server_request_registered_call
 * for ModelInfer, registered with GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER so that its
 * message comes with the call: a batch and a queue event less per inference), reads the
 * other calls' message, and answers the synchronous RPCs itself: those go
 * through the HTTP routes of server_routes.c (a stack srv_conn naming route, model and
 * version), whose JSON answer grpc_codec.c turns into the protobuf message, so metadata,
 * readiness, statistics, index and configuration are one implementation with one set of
 * messages. ModelInfer takes the shared path of serving.c: decode (grpc_codec.c), admit,
 * submit with the server's flags (--infer-on-io-thread: a fast model runs right here on the
 * CQ thread, a slow one is handed off; a batching model's request is gathered with
 * KEEL_SUBMIT_GATHER and, once the queue has nothing ready, cq_main runs the batches of
 * what it gathered with keel_runtime_run_gathered on the CQ thread, like an HTTP loop at
 * the end of its turn); keel's completion callback (a keel worker thread, or the CQ thread
 * when the model ran inline or a cancel completes a queued request at once)
 * encodes the answer and starts the send batch itself
 * (grpc_call_start_batch may be called from any thread; each call has one batch of each
 * kind at a time). Errors map to gRPC codes as Triton maps them (grpc_code()), with the
 * messages HTTP sends. Every unary call (when its status is handed to gRPC, in call_send) and
 * every stream message (when its answer is queued, in stream_answer) is observed once through
 * serving.c's keel__srv_observe, as HTTP's requests are: histograms, responses by gRPC status,
 * access log, traces; a "traceparent" in the call's metadata is echoed in its initial
 * metadata with keel's span id.
 *
 * Jobs: a keel request is a gjob (the call's embedded one for ModelInfer, one per message
 * for ModelStreamInfer). A stream reads one message at a time, submits each as it arrives,
 * and writes the answers one write batch at a time in completion order (a queue under
 * g->mu; each answer carries its request's id; a failed request is an error_message, the
 * stream goes on). It ends with OK once the client half-closed and every job and write is
 * done. RepositoryModelLoad/Unload are jobs of server_control.c's thread (srv_conn with a
 * job_done hook), like HTTP's.
 *
 * A call (gcall) is counted: one reference per batch in flight (accept, receive, send,
 * write, close) plus one per job in flight; whoever drops the last frees it (the CQ thread,
 * or a completion callback). The close batch (RECV_CLOSE_ON_SERVER, close_watch) completes
 * when the call ends; if the client cancelled it or its deadline passed, the call's jobs are
 * cancelled: a queued request completes KEEL_ECANCELED at once and never reaches the
 * backend. Only a call with something to cancel has one: a stream from its start, a unary
 * call once its job is in flight; every other call (a model that ran inline, an error, the
 * synchronous RPCs) receives its close inside the send batch of its answer (call_send), so
 * the common ModelInfer takes two batches (accept with its message, answer) and two queue
 * events. Whichever of close_watch and call_send comes first takes the op (close_claimed). A job
 * being cancelled is pinned (its completion, which may run meanwhile, leaves the job's release to
 * the canceller). The client's deadline also becomes the request's timeout, so a request
 * still queued at its deadline is answered DEADLINE_EXCEEDED.
 *
 * Locks: g->mu protects the in-flight job list, each job's flags and each stream's write
 * state; it is never held across a gRPC or libkeel call, and never together with s->mu.
 *
 * Lifetime: keel__grpc_start (main thread, after the runtime created its fork server)
 * initialises gRPC and starts the CQ thread. Shutdown: the drain of server.c gates new
 * inferences (UNAVAILABLE "the server is shutting down") and waits for admitted ones, which
 * are counted in s->pending like HTTP's; at its exit timeout (s->cancel_all) the CQ thread
 * cancels the jobs still in flight. keel__grpc_stop then shuts the server down (no new
 * calls), cancels what is left, waits for the in-flight list to empty, lets unary calls being
 * answered finish, cancels the calls still open (streams, calls that never sent a message),
 * shuts the queue down, joins the CQ thread (which frees every call as its last batch
 * completes), waits until no call is left (a keel worker may still be dropping the last
 * reference of a call it answered: ncalls, decremented as call_free's last touch of g) and
 * destroys the server, all before the runtime is destroyed.
 */
#include <arpa/inet.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cliutil.h"
#include "grpc_codec.h"
#include "grpc_server.h"
#include "keel_health.pb-c.h"
#include "keel_inference.pb-c.h"
#include "reply.h"
#include "restrict.h"
#include "server_control.h"
#include "server_internal.h"
#include "server_log.h"
#include "server_routes.h"
#include "serving.h"

#define POLL_MS 50         /* the CQ thread checks s->cancel_all this often when idle */
#define GATHER_MAX 256     /* gathered requests after which the CQ thread runs their batches */
#define STOP_WAIT_MS 5000  /* at stop: longest wait for calls to end before cancelling them */
#define STREAM_HEADROOM 16 /* HTTP/2 streams per connection beyond --max-connections */
#define ERRLEN SRV_MSG_LEN
#define INFER_PATH "/inference.GRPCInferenceService/ModelInfer"

typedef enum rpc_id {
    RPC_UNKNOWN = 0,
    RPC_LIVE,
    RPC_READY,
    RPC_MODEL_READY,
    RPC_SERVER_META,
    RPC_MODEL_META,
    RPC_INFER,
    RPC_STREAM,
    RPC_CONFIG,
    RPC_STATS,
    RPC_INDEX,
    RPC_LOAD,
    RPC_UNLOAD,
    RPC_HEALTH,
} rpc_id;

static const struct {
    const char *path;
    rpc_id id;
} rpcs[] = {
    {"/inference.GRPCInferenceService/ServerLive", RPC_LIVE},
    {"/inference.GRPCInferenceService/ServerReady", RPC_READY},
    {"/inference.GRPCInferenceService/ModelReady", RPC_MODEL_READY},
    {"/inference.GRPCInferenceService/ServerMetadata", RPC_SERVER_META},
    {"/inference.GRPCInferenceService/ModelMetadata", RPC_MODEL_META},
    {INFER_PATH, RPC_INFER},
    {"/inference.GRPCInferenceService/ModelStreamInfer", RPC_STREAM},
    {"/inference.GRPCInferenceService/ModelConfig", RPC_CONFIG},
    {"/inference.GRPCInferenceService/ModelStatistics", RPC_STATS},
    {"/inference.GRPCInferenceService/RepositoryIndex", RPC_INDEX},
    {"/inference.GRPCInferenceService/RepositoryModelLoad", RPC_LOAD},
    {"/inference.GRPCInferenceService/RepositoryModelUnload", RPC_UNLOAD},
    {"/grpc.health.v1.Health/Check", RPC_HEALTH},
};

typedef enum tag_kind { TAG_NEW, TAG_RECV, TAG_SEND, TAG_CLOSE, TAG_WRITE } tag_kind;

typedef struct gcall gcall;
typedef struct gtag {
    gcall *c;
    tag_kind kind;
} gtag;

typedef struct srv_grpc srv_grpc;

/* One keel request of a call: the call's own for ModelInfer, one per message of a stream. */
typedef struct gjob gjob;
struct gjob {
    gcall *c; /* holds a reference on c until the job is finished */
    keel_request *req;
    Inference__ModelInferRequest *msg; /* the requested outputs, for the answer */
    int64_t version;                   /* asked for; -1 = the server's choice */
    /* For the observation (observe()): CLOCK_MONOTONIC when the message's call began (a
     * stream message: when it arrived), it was read, it went to libkeel, its completion
     * ran; its size. */
    uint64_t start_ns, recv_end_ns, request_start_ns, request_end_ns;
    uint64_t bytes_in;
    bool in_flight;       /* under g->mu: submitted, completion not yet run */
    bool cancel_sent;     /* under g->mu: keel_request_cancel called (once) */
    bool cancel_shutdown; /* under g->mu: ... by the drain's exit timeout */
    bool pinned;          /* under g->mu: a canceller is using the job; it finishes it */
    bool finish_pending;  /* under g->mu: completed while pinned */
    gjob *prev, *next;    /* g->inflight, under g->mu */
};

/* A stream answer waiting for the write in progress. */
typedef struct gwrite {
    grpc_byte_buffer *bb;
    struct gwrite *next;
} gwrite;

struct gcall {
    srv_grpc *g;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    gtag t_new, t_recv, t_send, t_close, t_write;
    atomic_int refs;
    rpc_id rpc;
    grpc_byte_buffer *recv_buf;
    bool registered;            /* accepted as a registered ModelInfer call, message included */
    int cancelled;              /* RECV_CLOSE_ON_SERVER's answer */
    bool closed;                /* CQ thread: the close batch completed */
    atomic_bool close_claimed;  /* RECV_CLOSE_ON_SERVER was started (close_watch, call_send) */
    grpc_byte_buffer *send_buf; /* until the send batch completes */
    grpc_slice status_details;
    bool have_details;

    /* W3C trace context from the call's "traceparent" metadata (set once by on_new): echoed
     * in the initial metadata with keel's span id, and in every observation of the call. */
    uint64_t start_ns; /* CLOCK_MONOTONIC: the call was accepted (its headers arrived) */
    bool traced;
    srv_tracectx trace;
    char span_id[17];
    char tp_text[64];
    grpc_metadata tp_md; /* points into tp_text; c outlives every batch that sends it */

    gjob unary; /* ModelInfer */

    /* ModelStreamInfer, under g->mu: one write at a time, the rest queued in order. */
    bool sent_initial;           /* initial metadata went out (by the writer) */
    bool writing;                /* a write batch is in progress */
    gwrite *wq_head, *wq_tail;   /* answers waiting for it */
    grpc_byte_buffer *write_buf; /* the write in progress */
    bool reads_done;             /* the client half-closed (or the read failed) */
    size_t jobs_out;             /* jobs not finished */
    bool finished;               /* the status is being sent */
    bool busy;                   /* jobs_out > 0 || writing: counted in g->nbusy_streams */
};

struct srv_grpc {
    keel_srv *s;
    grpc_server *server;
    grpc_completion_queue *cq;
    int port;
    char addr[INET6_ADDRSTRLEN];
    pthread_t thread;
    bool thread_started;
    int shutdown_tag; /* its address is the tag of grpc_server_shutdown_and_notify */

    pthread_mutex_t mu;
    pthread_cond_t cv; /* the in-flight list emptied, the server shut down */
    gjob *inflight;    /* jobs whose keel request is in flight */
    size_t ninflight;
    bool stopping;          /* keel__grpc_stop began: cancel whatever is in flight */
    bool shutdown_done;     /* the shutdown tag arrived */
    void *infer_method;     /* ModelInfer, registered: its message comes with the call */
    bool accepting;         /* CQ thread only: a request_call is outstanding */
    bool accepting_infer;   /* CQ thread only: a request_registered_call is outstanding */
    atomic_size_t ncalls;   /* calls alive (accepted, not freed) */
    atomic_size_t nstreams; /* of which ModelStreamInfer calls */
    size_t nbusy_streams;   /* under mu: streams with a job or a write not finished */
    size_t max_calls;
    unsigned gathered; /* CQ thread only: KEEL_SUBMIT_GATHER submits since the last run */
};

/* ---------------------------------------------------------------- helpers */

static uint64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The gRPC status of a keel error, as Triton maps its own. */
static grpc_status_code grpc_code(keel_err e)
{
    switch (e) {
    case KEEL_OK:
        return GRPC_STATUS_OK;
    case KEEL_EINVAL:
    case KEEL_ECONFIG:
    case KEEL_ELOAD:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case KEEL_ENOTFOUND:
        return GRPC_STATUS_NOT_FOUND;
    case KEEL_EUNAVAILABLE:
    case KEEL_ESHUTDOWN:
    case KEEL_ERESOURCE:
        return GRPC_STATUS_UNAVAILABLE;
    case KEEL_ETIMEDOUT:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    case KEEL_ECANCELED:
        return GRPC_STATUS_CANCELLED;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

/* The gRPC status of an HTTP status from the shared routes. */
static grpc_status_code http_to_grpc(unsigned st)
{
    switch (st) {
    case 200:
        return GRPC_STATUS_OK;
    case 400:
    case 413:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case 404:
        return GRPC_STATUS_NOT_FOUND;
    case 503:
        return GRPC_STATUS_UNAVAILABLE;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

static void call_free(gcall *c)
{
    srv_grpc *g = c->g;

    if (c->call != NULL)
        grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    if (c->recv_buf != NULL)
        grpc_byte_buffer_destroy(c->recv_buf);
    if (c->send_buf != NULL)
        grpc_byte_buffer_destroy(c->send_buf);
    if (c->have_details)
        grpc_slice_unref(c->status_details);
    if (c->write_buf != NULL)
        grpc_byte_buffer_destroy(c->write_buf);
    while (c->wq_head != NULL) {
        gwrite *w = c->wq_head;
        c->wq_head = w->next;
        grpc_byte_buffer_destroy(w->bb);
        free(w);
    }
    keel_request_destroy(c->unary.req);
    if (c->unary.msg != NULL)
        protobuf_c_message_free_unpacked(&c->unary.msg->base, NULL);
    if (c->rpc == RPC_STREAM)
        atomic_fetch_sub(&g->nstreams, 1);
    free(c);
    atomic_fetch_sub(&g->ncalls, 1);
}

static void call_unref(gcall *c)
{
    int left = atomic_fetch_sub(&c->refs, 1) - 1;

    if (left < 0) {
        keel__srv_log(KEEL_LOG_ERROR, "BUG: gRPC call reference count below zero", NULL);
        abort();
    }
    if (left == 0)
        call_free(c);
}

/* The message packed into a byte buffer. */
static grpc_byte_buffer *pack(const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    grpc_slice sl = grpc_slice_malloc(len);
    grpc_byte_buffer *bb;

    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(sl));
    bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

/* The route label of an RPC (the HTTP route's name where there is one). */
static const char *rpc_route(rpc_id r)
{
    switch (r) {
    case RPC_LIVE:
        return "live";
    case RPC_READY:
        return "ready";
    case RPC_MODEL_READY:
        return "model_ready";
    case RPC_SERVER_META:
        return "server_metadata";
    case RPC_MODEL_META:
        return "model_metadata";
    case RPC_INFER:
        return "infer";
    case RPC_STREAM:
        return "stream_infer";
    case RPC_CONFIG:
        return "model_config";
    case RPC_STATS:
        return "model_stats";
    case RPC_INDEX:
        return "repository_index";
    case RPC_LOAD:
        return "load";
    case RPC_UNLOAD:
        return "unload";
    case RPC_HEALTH:
        return "health";
    case RPC_UNKNOWN:
        break;
    }
    return "unknown";
}

/* The method's name (the path after its last '/'): a known RPC's from rpcs[], without
 * formatting (once per call); an unknown one's copied from the call into buf. */
static const char *rpc_method(const gcall *c, char *buf, size_t len)
{
    size_t n = GRPC_SLICE_LENGTH(c->details.method);
    const char *m = (const char *)GRPC_SLICE_START_PTR(c->details.method);
    const char *slash;

    for (size_t i = 0; c->rpc != RPC_UNKNOWN && i < sizeof(rpcs) / sizeof(rpcs[0]); i++) {
        if (rpcs[i].id == c->rpc)
            return strrchr(rpcs[i].path, '/') + 1;
    }
    slash = n > 0 ? memrchr(m, '/', n) : NULL;
    snprintf(buf, len, "%.*s", slash != NULL ? (int)(m + n - slash - 1) : 0,
             slash != NULL ? slash + 1 : "");
    return buf;
}

/* "addr:port" of the call's client (gRPC names it "ipv4:addr:port" or "ipv6:[addr]:port"). */
static void peer_text(gcall *c, char *out, size_t len)
{
    char *p = grpc_call_get_peer(c->call);
    const char *v = p != NULL ? p : "";

    if (strncmp(v, "ipv4:", 5) == 0 || strncmp(v, "ipv6:", 5) == 0)
        v += 5;
    snprintf(out, len, "%s", v);
    gpr_free(p);
}

/*
 * Feeds one finished gRPC request to the shared observation (serving.c's keel__srv_observe:
 * histograms, responses by code, access log, traces), exactly as HTTP's are: a unary call
 * once when its status goes out (call_send), a stream message once when its answer is queued
 * (stream_answer). j is the inference job (NULL for other RPCs), code the gRPC status (a
 * stream message's: the code its error would have had). Any thread; c and j are alive.
 */
static void observe(gcall *c, const gjob *j, grpc_status_code code, size_t bytes_out,
                    uint64_t send_start)
{
    keel_srv *s = c->g->s;
    srv_obs_event ev;
    char peer[128];
    char method[64];

    memset(&ev, 0, sizeof(ev));
    ev.protocol = SRV_PROTO_GRPC;
    ev.route = rpc_route(c->rpc);
    ev.method = rpc_method(c, method, sizeof(method));
    ev.version = -1;
    ev.status = (unsigned)code;
    ev.bytes_out = bytes_out;
    ev.start_ns = c->start_ns;
    ev.end_ns = mono_ns();
    ev.send_start_ns = send_start;
    ev.trace_id = c->traced ? c->trace.trace_id : "";
    ev.span_id = c->traced ? c->span_id : "";
    if (j != NULL) {
        if (j->msg != NULL) {
            ev.model = j->msg->model_name;
            ev.request_id = j->msg->id;
        }
        ev.version = j->version;
        ev.bytes_in = j->bytes_in;
        ev.start_ns = j->start_ns != 0 ? j->start_ns : c->start_ns;
        ev.recv_end_ns = j->recv_end_ns;
        ev.request_start_ns = j->request_start_ns;
        ev.request_end_ns = j->request_end_ns;
        if (j->req != NULL) {
            /* Read after the completion ran (or the request never reached libkeel: zeros). */
            keel_request_timing_get(j->req, &ev.timing);
            ev.request_id = keel_request_id(j->req);
            if (ev.timing.complete_ns != 0) {
                ev.generation = keel_request_generation_id(j->req);
                if (keel_request_model_version(j->req) >= 0)
                    ev.version = keel_request_model_version(j->req);
            }
        }
    }
    if (s->alog != NULL) {
        peer_text(c, peer, sizeof(peer));
        ev.peer = peer;
    }
    keel__srv_observe(s, &ev);
}

/*
 * Sends the answer: initial metadata, the message (packed from msg if not NULL) and the
 * status, and the call's close (RECV_CLOSE_ON_SERVER) unless close_watch started that
 * already. Consumes nothing of the caller's; any thread. The call keeps one reference for
 * the batch.
 */
static void call_send(gcall *c, const ProtobufCMessage *msg, grpc_status_code code,
                      const char *details)
{
    grpc_op ops[4];
    size_t n = 0, bytes_out = 0;
    grpc_call_error ce;
    uint64_t send_start = mono_ns();

    memset(ops, 0, sizeof(ops));
    if (msg != NULL && code == GRPC_STATUS_OK) {
        c->send_buf = pack(msg);
        bytes_out = grpc_byte_buffer_length(c->send_buf);
    }
    if (!c->sent_initial) { /* a stream's writer may have sent it (no write is running now) */
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = c->traced ? 1 : 0;
        ops[n].data.send_initial_metadata.metadata = c->traced ? &c->tp_md : NULL;
        n++;
    }
    if (c->send_buf != NULL) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->send_buf;
        n++;
    }
    c->status_details = grpc_slice_from_copied_string(details != NULL ? details : "");
    c->have_details = true;
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.trailing_metadata_count = 0;
    ops[n].data.send_status_from_server.status = code;
    ops[n].data.send_status_from_server.status_details = &c->status_details;
    n++;
    if (!atomic_exchange(&c->close_claimed, true)) {
        /* Nothing of the call runs any more that a cancel could stop: its close needs no
         * batch of its own (a batch and a queue event less per call). */
        ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        ops[n].data.recv_close_on_server.cancelled = &c->cancelled;
        n++;
    }
    if ((unsigned)code < 17)
        atomic_fetch_add_explicit(&c->g->s->grpc_status[code], 1, memory_order_relaxed);
    atomic_fetch_add(&c->refs, 1);
    if ((ce = grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL)) != GRPC_CALL_OK) {
        keel__srv_log(KEEL_LOG_ERROR, "gRPC: cannot send an answer", "error",
                      grpc_call_error_to_string(ce), NULL);
        call_unref(c);
    }
    /* A unary call ends here, once; a stream is observed per message (stream_answer). The
     * caller still holds a reference, so c outlives this. */
    if (c->rpc != RPC_STREAM)
        observe(c, c->rpc == RPC_INFER ? &c->unary : NULL, code, bytes_out, send_start);
}

static void call_send_error(gcall *c, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void call_send_error(gcall *c, grpc_status_code code, const char *fmt, ...)
{
    char msg[ERRLEN];
    va_list ap;

    va_start(ap, fmt);
    if (vsnprintf(msg, sizeof(msg), fmt, ap) < 0)
        snprintf(msg, sizeof(msg), "error");
    va_end(ap);
    call_send(c, NULL, code, msg);
}

/* The received message as one contiguous slice (the caller unrefs it); false if there is
 * none. A message that arrived uncompressed in one slice (a small one, as most are) is
 * that slice, referenced, not copied. */
static bool recv_bytes(gcall *c, grpc_slice *out)
{
    grpc_byte_buffer *bb = c->recv_buf;
    grpc_byte_buffer_reader rd;

    if (bb == NULL)
        return false;
    if (bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE &&
        bb->data.raw.slice_buffer.count == 1) {
        *out = grpc_slice_ref(bb->data.raw.slice_buffer.slices[0]);
    } else {
        if (!grpc_byte_buffer_reader_init(&rd, bb))
            return false;
        *out = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
    }
    grpc_byte_buffer_destroy(bb);
    c->recv_buf = NULL;
    return true;
}

/* Unpacks the received message as d; answers INVALID_ARGUMENT and returns NULL if it is not
 * one. */
static ProtobufCMessage *recv_msg(gcall *c, const ProtobufCMessageDescriptor *d)
{
    grpc_slice sl;
    ProtobufCMessage *m;

    if (!recv_bytes(c, &sl)) {
        call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
        return NULL;
    }
    m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
    grpc_slice_unref(sl);
    if (m == NULL)
        call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                        "the request message is not a valid %s (protobuf decoding failed)",
                        d->name);
    return m;
}

/* ---------------------------------------------------------------- synchronous RPCs */

/* Runs an HTTP route for the call; r is filled (the caller frees r->body). */
static void run_route(srv_grpc *g, srv_route route, const char *model, int64_t version,
                      const char *body, srv_reply *r)
{
    srv_conn fc;

    memset(&fc, 0, sizeof(fc));
    memset(r, 0, sizeof(*r));
    fc.s = g->s;
    fc.route = route;
    fc.model = (char *)model;
    fc.version = version;
    fc.fd = -1;
    fc.body = (char *)body;
    fc.body_len = body != NULL ? strlen(body) : 0;
    keel__srv_route_sync(g->s, &fc, r);
}

/* The "error" text of an HTTP error reply, into msg. */
static void reply_message(const srv_reply *r, char *msg, size_t len)
{
    json_t *root = r->body != NULL ? json_loadb(r->body, r->len, 0, NULL) : NULL;
    const char *e = json_string_value(json_object_get(root, "error"));

    snprintf(msg, len, "%s", e != NULL ? e : "out of memory");
    json_decref(root);
}

/* Answers from an HTTP route's reply: an error with its message, or the JSON body (wrapped
 * in an object under wrap_key, when not NULL) as message d. */
static void answer_reply(gcall *c, srv_reply *r, const ProtobufCMessageDescriptor *d,
                         const char *wrap_key)
{
    char msg[ERRLEN];
    json_t *root = NULL;
    ProtobufCMessage *m;

    if (r->status != 200) {
        reply_message(r, msg, sizeof(msg));
        call_send(c, NULL, http_to_grpc(r->status), msg);
        return;
    }
    root = json_loadb(r->body != NULL ? r->body : "{}", r->body != NULL ? r->len : 2, 0, NULL);
    if (root != NULL && wrap_key != NULL) {
        json_t *w = json_object();
        if (w == NULL || json_object_set_new(w, wrap_key, root) != 0) {
            json_decref(w);
            root = NULL;
        } else {
            root = w;
        }
    }
    if (root == NULL || (m = keel__grpc_json_to_msg(d, root)) == NULL) {
        json_decref(root);
        call_send(c, NULL, GRPC_STATUS_INTERNAL, "out of memory");
        return;
    }
    json_decref(root);
    call_send(c, m, GRPC_STATUS_OK, NULL);
    protobuf_c_message_free_unpacked(m, NULL);
}

/* name + version of a request message; answers INVALID_ARGUMENT and returns false when the
 * version is not a number. */
static bool model_and_version(gcall *c, const char *name, const char *version, int64_t *v)
{
    if (!keel__grpc_parse_version(version, v)) {
        call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                        "invalid model version '%.64s': expected a non-negative integer", version);
        return false;
    }
    if (name == NULL || name[0] == '\0') {
        call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT, "name: required");
        return false;
    }
    return true;
}

static void rpc_sync(gcall *c)
{
    srv_grpc *g = c->g;
    srv_reply r;
    int64_t v = -1;

    switch (c->rpc) {
    case RPC_LIVE: {
        Inference__ServerLiveRequest *q = (Inference__ServerLiveRequest *)recv_msg(
            c, &inference__server_live_request__descriptor);
        Inference__ServerLiveResponse a = INFERENCE__SERVER_LIVE_RESPONSE__INIT;
        if (q == NULL)
            return;
        inference__server_live_request__free_unpacked(q, NULL);
        a.live = 1;
        call_send(c, &a.base, GRPC_STATUS_OK, NULL);
        return;
    }
    case RPC_READY: {
        Inference__ServerReadyRequest *q = (Inference__ServerReadyRequest *)recv_msg(
            c, &inference__server_ready_request__descriptor);
        Inference__ServerReadyResponse a = INFERENCE__SERVER_READY_RESPONSE__INIT;
        if (q == NULL)
            return;
        inference__server_ready_request__free_unpacked(q, NULL);
        run_route(g, ROUTE_READY, NULL, -1, NULL, &r);
        a.ready = r.status == 200;
        free(r.body);
        call_send(c, &a.base, GRPC_STATUS_OK, NULL);
        return;
    }
    case RPC_HEALTH: {
        Grpc__Health__V1__HealthCheckRequest *q = (Grpc__Health__V1__HealthCheckRequest *)recv_msg(
            c, &grpc__health__v1__health_check_request__descriptor);
        Grpc__Health__V1__HealthCheckResponse a = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        if (q == NULL)
            return;
        if (q->service[0] != '\0' && strcmp(q->service, "inference.GRPCInferenceService") != 0) {
            call_send_error(c, GRPC_STATUS_NOT_FOUND, "unknown service '%.128s'", q->service);
            grpc__health__v1__health_check_request__free_unpacked(q, NULL);
            return;
        }
        grpc__health__v1__health_check_request__free_unpacked(q, NULL);
        run_route(g, ROUTE_READY, NULL, -1, NULL, &r);
        a.status = r.status == 200
                       ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
        free(r.body);
        call_send(c, &a.base, GRPC_STATUS_OK, NULL);
        return;
    }
    case RPC_MODEL_READY: {
        Inference__ModelReadyRequest *q = (Inference__ModelReadyRequest *)recv_msg(
            c, &inference__model_ready_request__descriptor);
        Inference__ModelReadyResponse a = INFERENCE__MODEL_READY_RESPONSE__INIT;
        if (q == NULL)
            return;
        if (model_and_version(c, q->name, q->version, &v)) {
            /* As Triton: not ready (unknown, loading, failed) is an answer, not an error. */
            a.ready = keel_model_is_ready(g->s->rt, q->name, v);
            call_send(c, &a.base, GRPC_STATUS_OK, NULL);
        }
        inference__model_ready_request__free_unpacked(q, NULL);
        return;
    }
    case RPC_SERVER_META: {
        Inference__ServerMetadataRequest *q = (Inference__ServerMetadataRequest *)recv_msg(
            c, &inference__server_metadata_request__descriptor);
        if (q == NULL)
            return;
        inference__server_metadata_request__free_unpacked(q, NULL);
        run_route(g, ROUTE_SERVER_META, NULL, -1, NULL, &r);
        answer_reply(c, &r, &inference__server_metadata_response__descriptor, NULL);
        free(r.body);
        return;
    }
    case RPC_MODEL_META: {
        Inference__ModelMetadataRequest *q = (Inference__ModelMetadataRequest *)recv_msg(
            c, &inference__model_metadata_request__descriptor);
        if (q == NULL)
            return;
        if (model_and_version(c, q->name, q->version, &v)) {
            run_route(g, ROUTE_MODEL_META, q->name, v, NULL, &r);
            answer_reply(c, &r, &inference__model_metadata_response__descriptor, NULL);
            free(r.body);
        }
        inference__model_metadata_request__free_unpacked(q, NULL);
        return;
    }
    case RPC_CONFIG: {
        Inference__ModelConfigRequest *q = (Inference__ModelConfigRequest *)recv_msg(
            c, &inference__model_config_request__descriptor);
        if (q == NULL)
            return;
        if (model_and_version(c, q->name, q->version, &v)) {
            run_route(g, ROUTE_MODEL_CONFIG, q->name, v, NULL, &r);
            answer_reply(c, &r, &inference__model_config_response__descriptor, "config");
            free(r.body);
        }
        inference__model_config_request__free_unpacked(q, NULL);
        return;
    }
    case RPC_STATS: {
        Inference__ModelStatisticsRequest *q = (Inference__ModelStatisticsRequest *)recv_msg(
            c, &inference__model_statistics_request__descriptor);
        if (q == NULL)
            return;
        if (q->name[0] == '\0' && q->version[0] != '\0') {
            call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT, "version given without a name");
        } else if (q->name[0] == '\0') {
            run_route(g, ROUTE_ALL_STATS, NULL, -1, NULL, &r);
            answer_reply(c, &r, &inference__model_statistics_response__descriptor, NULL);
            free(r.body);
        } else if (model_and_version(c, q->name, q->version, &v)) {
            run_route(g, ROUTE_MODEL_STATS, q->name, v, NULL, &r);
            answer_reply(c, &r, &inference__model_statistics_response__descriptor, NULL);
            free(r.body);
        }
        inference__model_statistics_request__free_unpacked(q, NULL);
        return;
    }
    case RPC_INDEX: {
        Inference__RepositoryIndexRequest *q = (Inference__RepositoryIndexRequest *)recv_msg(
            c, &inference__repository_index_request__descriptor);
        if (q == NULL)
            return;
        if (q->repository_name[0] != '\0') {
            call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                            "repository_name: keel serves one repository; leave it empty");
        } else {
            run_route(g, ROUTE_REPO_INDEX, NULL, -1, q->ready ? "{\"ready\":true}" : NULL, &r);
            answer_reply(c, &r, &inference__repository_index_response__descriptor, "models");
            free(r.body);
        }
        inference__repository_index_request__free_unpacked(q, NULL);
        return;
    }
    default:
        call_send_error(c, GRPC_STATUS_INTERNAL, "internal error: no handler");
        return;
    }
}

/* ---------------------------------------------------------------- model control */

/* The control thread finished a load/unload of a call (or refused it at shutdown). */
static void on_control_done(srv_conn *fc, keel_err status)
{
    gcall *c = fc->job_user;
    keel_srv *s = fc->s;

    (void)status;
    if (fc->ctl_status == 200) {
        /* Both answers are empty messages: an empty load response serves for either. */
        Inference__RepositoryModelLoadResponse a = INFERENCE__REPOSITORY_MODEL_LOAD_RESPONSE__INIT;
        call_send(c, &a.base, GRPC_STATUS_OK, NULL);
    } else {
        call_send(c, NULL, http_to_grpc(fc->ctl_status != 0 ? fc->ctl_status : 500),
                  fc->ctl_msg != NULL ? fc->ctl_msg : "model control failed");
    }
    free(fc->model);
    free(fc->ctl_msg);
    free(fc);
    keel__srv_done(s);
    call_unref(c); /* the job's */
}

/* RepositoryModelLoad / Unload: the same checks and the same control thread as HTTP's. */
static void rpc_control(gcall *c)
{
    srv_grpc *g = c->g;
    keel_srv *s = g->s;
    bool load = c->rpc == RPC_LOAD;
    const char *repo, *model;
    size_t nparams;
    ProtobufCMessage *q;
    srv_conn *fc;

    if (load) {
        Inference__RepositoryModelLoadRequest *m =
            (Inference__RepositoryModelLoadRequest
                 *)(q = recv_msg(c, &inference__repository_model_load_request__descriptor));
        if (q == NULL)
            return;
        repo = m->repository_name, model = m->model_name, nparams = m->n_parameters;
        for (size_t i = 0; i < nparams; i++) {
            call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                            "parameters.%.64s: not supported by keel", m->parameters[i]->key);
            goto done;
        }
    } else {
        Inference__RepositoryModelUnloadRequest *m =
            (Inference__RepositoryModelUnloadRequest
                 *)(q = recv_msg(c, &inference__repository_model_unload_request__descriptor));
        if (q == NULL)
            return;
        repo = m->repository_name, model = m->model_name, nparams = m->n_parameters;
        for (size_t i = 0; i < nparams; i++) {
            if (strcmp(m->parameters[i]->key, "unload_dependents") == 0)
                continue; /* keel models have no dependents */
            call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                            "parameters.%.64s: not supported by keel", m->parameters[i]->key);
            goto done;
        }
    }
    if (s->opts->control != KEEL_SERVER_CONTROL_EXPLICIT) {
        call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                        "explicit model load / unload is not allowed: the model control mode is %s",
                        s->opts->control == KEEL_SERVER_CONTROL_POLL ? "poll" : "none");
        goto done;
    }
    if (repo[0] != '\0') {
        call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                        "repository_name: keel serves one repository; leave it empty");
        goto done;
    }
    if (model[0] == '\0') {
        call_send_error(c, GRPC_STATUS_INVALID_ARGUMENT, "model_name: required");
        goto done;
    }
    if ((fc = calloc(1, sizeof(*fc))) == NULL || (fc->model = strdup(model)) == NULL) {
        free(fc);
        call_send_error(c, GRPC_STATUS_INTERNAL, "out of memory");
        goto done;
    }
    fc->s = s;
    fc->route = load ? ROUTE_REPO_LOAD : ROUTE_REPO_UNLOAD;
    fc->version = -1;
    fc->fd = -1;
    fc->state = CONN_SUBMITTED;
    fc->job_done = on_control_done;
    fc->job_user = c;
    if (!keel__srv_admit(s)) {
        free(fc->model);
        free(fc);
        call_send_error(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        goto done;
    }
    atomic_fetch_add(&c->refs, 1); /* the job's */
    if (!keel__srv_jobq_enqueue(&s->ctlq, fc)) {
        free(fc->model);
        free(fc);
        keel__srv_done(s);
        call_send_error(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        call_unref(c); /* not the last: the receive event holds one */
    }
done:
    protobuf_c_message_free_unpacked(q, NULL);
}

/* ---------------------------------------------------------------- ModelInfer and streams */

static void inflight_unlink_locked(srv_grpc *g, gjob *j)
{
    if (j->prev != NULL)
        j->prev->next = j->next;
    else
        g->inflight = j->next;
    if (j->next != NULL)
        j->next->prev = j->prev;
    j->prev = j->next = NULL;
    if (--g->ninflight == 0)
        pthread_cond_broadcast(&g->cv);
}

/* Keeps c->busy and g->nbusy_streams true after jobs_out or writing changed. A stream
 * stops being busy only once its last answer left, so the shutdown does not cancel a stream
 * whose answers are still queued (the drain answered them; they must reach the client). */
static void stream_busy_locked(srv_grpc *g, gcall *c)
{
    bool busy = c->jobs_out > 0 || c->writing;

    if (busy == c->busy)
        return;
    c->busy = busy;
    if (busy) {
        g->nbusy_streams++;
    } else if (--g->nbusy_streams == 0) {
        pthread_cond_broadcast(&g->cv);
    }
}

static bool stream_should_finish_locked(gcall *c)
{
    if (c->finished || !c->reads_done || c->jobs_out > 0 || c->writing)
        return false;
    c->finished = true;
    return true;
}

/* Ends a stream whose reads, jobs and writes are all done: status OK. */
static void stream_finish(gcall *c)
{
    call_send(c, NULL, GRPC_STATUS_OK, NULL);
}

/* Starts writing bb (consumed) on a stream; the caller set c->writing. Any thread. */
static void stream_start_write(gcall *c, grpc_byte_buffer *bb)
{
    grpc_op ops[2];
    size_t n = 0;
    bool initial;

    /* Under g->mu although only the writer touches them: the batch's completion reaches the
     * CQ thread through gRPC, whose ordering ThreadSanitizer cannot see. */
    pthread_mutex_lock(&c->g->mu);
    initial = !c->sent_initial;
    c->sent_initial = true;
    c->write_buf = bb;
    pthread_mutex_unlock(&c->g->mu);
    memset(ops, 0, sizeof(ops));
    if (initial) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = c->traced ? 1 : 0;
        ops[n].data.send_initial_metadata.metadata = c->traced ? &c->tp_md : NULL;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = bb;
    n++;
    atomic_fetch_add(&c->refs, 1);
    if (grpc_call_start_batch(c->call, ops, n, &c->t_write, NULL) != GRPC_CALL_OK) {
        /* Not expected; treat it as a completed write (the next one or the end follows). */
        keel__srv_log(KEEL_LOG_ERROR, "gRPC: cannot write a stream answer", NULL);
        call_unref(c); /* the buffer is freed with the call */
    }
}

/* Queues one ModelStreamInferResponse (packed into bb, consumed). Any thread. */
static void stream_write(gcall *c, grpc_byte_buffer *bb)
{
    srv_grpc *g = c->g;
    gwrite *w;

    pthread_mutex_lock(&g->mu);
    if (!c->writing) {
        c->writing = true;
        stream_busy_locked(g, c);
        pthread_mutex_unlock(&g->mu);
        stream_start_write(c, bb);
        return;
    }
    pthread_mutex_unlock(&g->mu);
    if ((w = calloc(1, sizeof(*w))) == NULL) {
        keel__srv_log(KEEL_LOG_ERROR, "gRPC: out of memory: a stream answer was dropped", NULL);
        grpc_byte_buffer_destroy(bb);
        return;
    }
    w->bb = bb;
    pthread_mutex_lock(&g->mu);
    if (!c->writing) { /* the write finished meanwhile */
        c->writing = true;
        stream_busy_locked(g, c);
        pthread_mutex_unlock(&g->mu);
        free(w);
        stream_start_write(c, bb);
        return;
    }
    if (c->wq_tail != NULL)
        c->wq_tail->next = w;
    else
        c->wq_head = w;
    c->wq_tail = w;
    pthread_mutex_unlock(&g->mu);
}

/* A write batch completed (CQ thread): start the next one, or end the stream. */
static void on_write(gcall *c)
{
    srv_grpc *g = c->g;
    gwrite *w;
    grpc_byte_buffer *done;
    bool finish = false;

    pthread_mutex_lock(&g->mu);
    done = c->write_buf;
    c->write_buf = NULL;
    if ((w = c->wq_head) != NULL) {
        c->wq_head = w->next;
        if (c->wq_head == NULL)
            c->wq_tail = NULL;
    } else {
        c->writing = false;
        stream_busy_locked(g, c);
        finish = stream_should_finish_locked(c);
    }
    pthread_mutex_unlock(&g->mu);
    if (done != NULL)
        grpc_byte_buffer_destroy(done);
    if (w != NULL) {
        stream_start_write(c, w->bb);
        free(w);
    } else if (finish) {
        stream_finish(c);
    }
    call_unref(c);
}

/* A stream answer: the result, or error_message (Triton's way: the stream goes on), for job
 * j (NULL: a message that never became one); code is the status its error would have had
 * as a unary call. Observed here, once per message. */
static void stream_answer(gcall *c, const gjob *j, const Inference__ModelInferResponse *resp,
                          const char *error, grpc_status_code code)
{
    Inference__ModelStreamInferResponse a = INFERENCE__MODEL_STREAM_INFER_RESPONSE__INIT;
    grpc_byte_buffer *bb;
    uint64_t send_start = mono_ns();
    size_t len;

    a.infer_response = (Inference__ModelInferResponse *)resp;
    a.error_message = (char *)(error != NULL ? error : "");
    bb = pack(&a.base);
    len = grpc_byte_buffer_length(bb);
    /* Before the write: once queued, the write's completion may end the stream and free c
     * unless the caller holds a reference (every caller does; this only orders the line). */
    observe(c, j, error != NULL ? code : GRPC_STATUS_OK, len, send_start);
    stream_write(c, bb);
}

/* Last step of a job: its storage (a stream's) and its reference on the call. */
static void job_finish(gjob *j)
{
    gcall *c = j->c;
    srv_grpc *g = c->g;
    bool finish = false;

    if (j != &c->unary) {
        keel_request_destroy(j->req);
        if (j->msg != NULL)
            protobuf_c_message_free_unpacked(&j->msg->base, NULL);
        free(j);
        pthread_mutex_lock(&g->mu);
        c->jobs_out--;
        stream_busy_locked(g, c);
        finish = stream_should_finish_locked(c);
        pthread_mutex_unlock(&g->mu);
    }
    if (finish)
        stream_finish(c);
    call_unref(c);
}

/* keel's completion callback: encodes and sends the answer (a keel worker thread, or the
 * thread that cancelled a queued request). */
static void on_job_done(keel_request *req, keel_err status, void *user)
{
    gjob *j = user;
    gcall *c = j->c;
    srv_grpc *g = c->g;
    keel_srv *s = g->s;
    bool cancel_shutdown, defer;
    char err[ERRLEN];
    grpc_infer_out o;
    srv_outcome out;
    keel_err e = KEEL_OK;

    j->request_end_ns = mono_ns();
    pthread_mutex_lock(&g->mu);
    j->in_flight = false;
    cancel_shutdown = j->cancel_shutdown;
    inflight_unlink_locked(g, j);
    pthread_mutex_unlock(&g->mu);

    memset(&o, 0, sizeof(o));
    if (status == KEEL_OK) {
        e = keel__grpc_infer_out_fill(&o, req, j->msg->model_name, j->msg, err, sizeof(err));
        if (e != KEEL_OK)
            keel__srv_outcome_set(&out, e, "%s", err);
    } else {
        keel__srv_failed(s, req, status, j->msg->model_name, j->version, cancel_shutdown, &out);
    }
    if (c->rpc == RPC_STREAM)
        stream_answer(c, j, status == KEEL_OK && e == KEEL_OK ? &o.resp : NULL,
                      status == KEEL_OK && e == KEEL_OK ? NULL : out.msg,
                      status == KEEL_OK && e == KEEL_OK ? GRPC_STATUS_OK : grpc_code(out.err));
    else if (status == KEEL_OK && e == KEEL_OK)
        call_send(c, &o.resp.base, GRPC_STATUS_OK, NULL);
    else
        call_send(c, NULL, grpc_code(out.err), out.msg);
    keel__grpc_infer_out_fini(&o);
    keel__srv_done(s);

    pthread_mutex_lock(&g->mu);
    defer = j->pinned;
    j->finish_pending = defer;
    pthread_mutex_unlock(&g->mu);
    if (!defer)
        job_finish(j);
}

/*
 * Starts the call's close batch (RECV_CLOSE_ON_SERVER, TAG_CLOSE: on_close cancels the
 * call's jobs if the client cancelled the call or its deadline passed) unless it was started
 * already, by itself or inside call_send's answer. A stream watches from its start; a unary
 * call only once its job is in flight, so a call answered at once (a model that ran inline
 * on this thread, an error) has no close batch of its own. Any thread; the caller holds a
 * reference on c.
 */
static void close_watch(gcall *c)
{
    grpc_op op;

    if (atomic_exchange(&c->close_claimed, true))
        return;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    atomic_fetch_add(&c->refs, 1);
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL) != GRPC_CALL_OK)
        call_unref(c); /* not the last: the caller holds one */
}

/* The time left until the call's deadline in microseconds; 0 = no deadline; -1 = passed. */
static int64_t deadline_left_us(const gcall *c)
{
    gpr_timespec dl = c->details.deadline, now;
    gpr_timespec left;

    if (gpr_time_cmp(dl, gpr_inf_future(dl.clock_type)) == 0)
        return 0;
    dl = gpr_convert_clock_type(dl, GPR_CLOCK_MONOTONIC);
    now = gpr_now(GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(dl, now) <= 0)
        return -1;
    left = gpr_time_sub(dl, now);
    return (int64_t)left.tv_sec * 1000000 + left.tv_nsec / 1000 + 1;
}

/*
 * Decodes j->msg (owned by j) into a request and submits it. KEEL_OK: on_job_done runs once
 * and j holds a reference on its call until job_finish. Otherwise out says why, nothing runs
 * and j is the caller's to finish.
 */
static keel_err job_submit(gcall *c, gjob *j, srv_outcome *out)
{
    srv_grpc *g = c->g;
    keel_srv *s = g->s;
    Inference__ModelInferRequest *m = j->msg;
    char err[ERRLEN];
    keel_err e;
    int64_t left;
    uint64_t timeout_us = 0;

    if (c->closed && c->cancelled) {
        /* A message read just before the cancel: nobody is waiting for its answer. */
        keel__srv_outcome_set(out, KEEL_ECANCELED, "the call was cancelled");
        return KEEL_ECANCELED;
    }
    if (keel__srv_draining(s)) {
        keel__srv_outcome_set(out, KEEL_ESHUTDOWN, "the server is shutting down");
        return KEEL_ESHUTDOWN;
    }
    if (m->model_name[0] == '\0') {
        keel__srv_outcome_set(out, KEEL_EINVAL, "model_name: required");
        return KEEL_EINVAL;
    }
    if (!keel__grpc_parse_version(m->model_version, &j->version)) {
        keel__srv_outcome_set(out, KEEL_EINVAL,
                              "invalid model version '%.64s': expected a non-negative integer",
                              m->model_version);
        return KEEL_EINVAL;
    }
    if ((e = keel_request_create(s->rt, m->model_name, j->version, &j->req)) != KEEL_OK) {
        keel__srv_outcome_set(out, e, "creating the request: %s", keel_strerror(e));
        return e;
    }
    if ((e = keel__grpc_decode_infer(m, j->req, &timeout_us, err, sizeof(err))) != KEEL_OK) {
        keel__srv_outcome_set(out, e, "%s", err);
        return e;
    }
    /* The tensors are in the request now; keep only the names the answer needs. */
    for (size_t i = 0; i < m->n_inputs; i++) {
        if (m->inputs[i]->contents != NULL) {
            inference__infer_tensor_contents__free_unpacked(m->inputs[i]->contents, NULL);
            m->inputs[i]->contents = NULL;
        }
    }
    for (size_t i = 0; i < m->n_raw_input_contents; i++)
        free(m->raw_input_contents[i].data);
    free(m->raw_input_contents);
    m->raw_input_contents = NULL;
    m->n_raw_input_contents = 0;

    if ((left = deadline_left_us(c)) < 0) {
        keel__srv_outcome_set(out, KEEL_ETIMEDOUT, "the call's deadline has passed");
        return KEEL_ETIMEDOUT;
    }
    /* The client's deadline is the request's, unless the request's timeout parameter asks
     * for less. */
    if (left > 0 && (timeout_us == 0 || (uint64_t)left < timeout_us))
        timeout_us = (uint64_t)left;
    if (timeout_us > 0)
        keel_request_set_timeout_us(j->req, timeout_us);
    if (!keel__srv_admit(s)) {
        keel__srv_outcome_set(out, KEEL_ESHUTDOWN, "the server is shutting down");
        return KEEL_ESHUTDOWN;
    }
    atomic_fetch_add(&c->refs, 1); /* the job's */
    pthread_mutex_lock(&g->mu);
    j->in_flight = true;
    j->prev = NULL;
    j->next = g->inflight;
    if (g->inflight != NULL)
        g->inflight->prev = j;
    g->inflight = j;
    g->ninflight++;
    if (c->rpc == RPC_STREAM) {
        c->jobs_out++;
        stream_busy_locked(g, c);
    }
    pthread_mutex_unlock(&g->mu);
    j->request_start_ns = mono_ns();
    /* --infer-on-io-thread: a fast model runs right here on the CQ thread (on_job_done then
     * runs before this returns), a slow one is handed to keel's inference threads. */
    if ((e = keel__srv_submit(s, j->req, m->model_name, j->version, s->io_submit_flags, on_job_done,
                              j, out)) != KEEL_OK) {
        pthread_mutex_lock(&g->mu);
        j->in_flight = false;
        inflight_unlink_locked(g, j);
        if (c->rpc == RPC_STREAM) {
            c->jobs_out--;
            stream_busy_locked(g, c);
        }
        pthread_mutex_unlock(&g->mu);
        call_unref(c); /* not the last: the caller's event holds one */
        return e;
    }
    if ((s->io_submit_flags & KEEL_SUBMIT_GATHER) != 0)
        g->gathered++; /* cq_main runs the batch once the queue has nothing ready */
    /* A unary call's job may still be queued: watch for the client's cancel (a no-op when
     * the answer went out already, the model having run inline). */
    close_watch(c);
    return KEEL_OK;
}

static void rpc_infer(gcall *c)
{
    srv_outcome out;

    c->unary.c = c;
    c->unary.recv_end_ns = mono_ns();
    c->unary.bytes_in = c->recv_buf != NULL ? grpc_byte_buffer_length(c->recv_buf) : 0;
    if ((c->unary.msg = (Inference__ModelInferRequest *)recv_msg(
             c, &inference__model_infer_request__descriptor)) == NULL)
        return;
    if (job_submit(c, &c->unary, &out) != KEEL_OK)
        call_send(c, NULL, grpc_code(out.err), out.msg);
}

static void stream_read_next(gcall *c)
{
    grpc_op op;

    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_buf;
    atomic_fetch_add(&c->refs, 1);
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_recv, NULL) != GRPC_CALL_OK)
        call_unref(c);
}

/* One message of a stream arrived (or the client half-closed: ok and no buffer). */
static void stream_recv(gcall *c, bool ok)
{
    srv_grpc *g = c->g;
    grpc_slice sl;
    gjob *j;
    srv_outcome out;
    bool finish;

    if (!ok || c->recv_buf == NULL) {
        pthread_mutex_lock(&g->mu);
        c->reads_done = true;
        finish = stream_should_finish_locked(c);
        pthread_mutex_unlock(&g->mu);
        if (finish)
            stream_finish(c);
        return;
    }
    recv_bytes(c, &sl);
    if ((j = calloc(1, sizeof(*j))) == NULL) {
        grpc_slice_unref(sl);
        stream_answer(c, NULL, NULL, "out of memory", GRPC_STATUS_INTERNAL);
        stream_read_next(c);
        return;
    }
    j->c = c;
    j->version = -1;
    j->start_ns = j->recv_end_ns = mono_ns();
    j->bytes_in = GRPC_SLICE_LENGTH(sl);
    j->msg = inference__model_infer_request__unpack(NULL, GRPC_SLICE_LENGTH(sl),
                                                    GRPC_SLICE_START_PTR(sl));
    grpc_slice_unref(sl);
    if (j->msg == NULL) {
        stream_answer(c, j, NULL,
                      "the request message is not a valid inference.ModelInferRequest "
                      "(protobuf decoding failed)",
                      GRPC_STATUS_INVALID_ARGUMENT);
        free(j);
    } else if (job_submit(c, j, &out) != KEEL_OK) {
        stream_answer(c, j, NULL, out.msg, grpc_code(out.err));
        keel_request_destroy(j->req);
        protobuf_c_message_free_unpacked(&j->msg->base, NULL);
        free(j);
    }
    stream_read_next(c);
}

/* Cancels the keel request of j if it is in flight and not yet cancelled; the caller holds
 * g->mu and a guarantee that j exists (it is in the in-flight list). Returns true if the
 * caller must cancel it (j pinned) and then call cancel_done. */
static bool cancel_begin_locked(gjob *j, bool shutdown)
{
    if (!j->in_flight || j->cancel_sent)
        return false;
    j->cancel_sent = true;
    j->cancel_shutdown = shutdown;
    j->pinned = true;
    return true;
}

static void cancel_done(srv_grpc *g, gjob *j, bool shutdown)
{
    bool finish;

    atomic_fetch_add(&g->s->grpc_canceled[shutdown ? 1 : 0], 1);
    keel_request_cancel(j->req); /* may run on_job_done here */
    pthread_mutex_lock(&g->mu);
    j->pinned = false;
    finish = j->finish_pending;
    pthread_mutex_unlock(&g->mu);
    if (finish)
        job_finish(j);
}

/* Cancels the in-flight jobs of call c (c == NULL: of every call). */
static void cancel_jobs(srv_grpc *g, gcall *c, bool shutdown)
{
    gjob **list = NULL;
    size_t n = 0;

    pthread_mutex_lock(&g->mu);
    if (g->ninflight > 0 && (list = calloc(g->ninflight, sizeof(*list))) != NULL) {
        for (gjob *j = g->inflight; j != NULL; j = j->next) {
            if ((c == NULL || j->c == c) && cancel_begin_locked(j, shutdown))
                list[n++] = j;
        }
    }
    pthread_mutex_unlock(&g->mu);
    for (size_t i = 0; i < n; i++)
        cancel_done(g, list[i], shutdown);
    free(list);
}

static void cancel_all(srv_grpc *g)
{
    cancel_jobs(g, NULL, true);
}

/* ---------------------------------------------------------------- the CQ thread */

static void accept_next(srv_grpc *g);

static rpc_id rpc_of(const grpc_slice *method)
{
    size_t len = GRPC_SLICE_LENGTH(*method);
    const char *p = (const char *)GRPC_SLICE_START_PTR(*method);

    for (size_t i = 0; i < sizeof(rpcs) / sizeof(rpcs[0]); i++) {
        if (strlen(rpcs[i].path) == len && memcmp(rpcs[i].path, p, len) == 0)
            return rpcs[i].id;
    }
    return RPC_UNKNOWN;
}

/*
 * --http-restricted-api for gRPC, as Triton does it: the call's method names its API group
 * (grpc.health.v1's Check is in health), and a call to a restricted group must carry the key
 * as metadata "keel-grpc-protocol-KEY" or Triton's "triton-grpc-protocol-KEY"; otherwise it
 * is answered UNAVAILABLE with Triton's text before its message is read. True if refused.
 */
static bool restricted_refused(gcall *c)
{
    static const char *const prefixes[] = {"keel-grpc-protocol-", "triton-grpc-protocol-", NULL};
    const keel_restrict *r = &c->g->s->opts->restricted;
    size_t len = GRPC_SLICE_LENGTH(c->details.method);
    char path[160], msg[300];
    keel_api_group grp;
    keel_restrict_check k;

    if (r->nrules == 0)
        return false;
    snprintf(path, sizeof(path), "%.*s", (int)(len < 150 ? len : 150),
             (const char *)GRPC_SLICE_START_PTR(c->details.method));
    grp = strcmp(path, "/grpc.health.v1.Health/Check") == 0 ? KEEL_API_HEALTH
                                                            : keel__api_group_of_grpc(path);
    keel__restrict_check_begin(&k, r, grp, prefixes);
    for (size_t i = 0; i < c->md.count; i++)
        keel__restrict_check_header(&k, (const char *)GRPC_SLICE_START_PTR(c->md.metadata[i].key),
                                    GRPC_SLICE_LENGTH(c->md.metadata[i].key),
                                    (const char *)GRPC_SLICE_START_PTR(c->md.metadata[i].value),
                                    GRPC_SLICE_LENGTH(c->md.metadata[i].value));
    if (keel__restrict_check_allowed(&k))
        return false;
    call_send_error(c, GRPC_STATUS_UNAVAILABLE, "%s",
                    keel__restrict_message_grpc(k.rule, msg, sizeof(msg)));
    return true;
}

/* W3C trace context: a valid "traceparent" in the call's metadata is echoed (initial
 * metadata) with keel's span id; a malformed one is ignored, never an error. */
static void call_trace_context(gcall *c)
{
    char v[512];

    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_slice *k = &c->md.metadata[i].key, *val = &c->md.metadata[i].value;
        size_t vl = GRPC_SLICE_LENGTH(*val);
        if (GRPC_SLICE_LENGTH(*k) != 11 || memcmp(GRPC_SLICE_START_PTR(*k), "traceparent", 11) != 0)
            continue;
        snprintf(v, sizeof(v), "%.*s", (int)(vl < sizeof(v) ? vl : sizeof(v) - 1),
                 (const char *)GRPC_SLICE_START_PTR(*val));
        if (!keel__srv_traceparent_parse(v, &c->trace))
            return;
        c->traced = true;
        keel__srv_span_id(c->span_id);
        snprintf(c->tp_text, sizeof(c->tp_text), "00-%s-%s-%02x", c->trace.trace_id, c->span_id,
                 c->trace.flags);
        c->tp_md.key = grpc_slice_from_static_string("traceparent");
        c->tp_md.value = grpc_slice_from_static_buffer(c->tp_text, strlen(c->tp_text));
        return;
    }
}

static void on_new(gcall *c, bool ok)
{
    srv_grpc *g = c->g;
    grpc_op op;
    size_t alive;

    if (c->registered)
        g->accepting_infer = false;
    else
        g->accepting = false;
    if (!ok) {
        /* The server is shutting down: no call came. */
        call_unref(c);
        return;
    }
    accept_next(g);
    c->start_ns = mono_ns();
    c->unary.start_ns = c->start_ns;
    call_trace_context(c);
    c->rpc = c->registered ? RPC_INFER : rpc_of(&c->details.method);
    if (c->rpc == RPC_STREAM)
        atomic_fetch_add(&g->nstreams, 1);
    /* ncalls counts the outstanding accepts' calls too (re-armed above). */
    alive = atomic_load(&g->ncalls) - (g->accepting ? 1 : 0) - (g->accepting_infer ? 1 : 0);
    if (c->rpc == RPC_UNKNOWN) {
        char path[160];
        size_t len = GRPC_SLICE_LENGTH(c->details.method);
        snprintf(path, sizeof(path), "%.*s", (int)(len < 128 ? len : 128),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
        call_send_error(c, GRPC_STATUS_UNIMPLEMENTED, "keel does not implement %s", path);
    } else if (restricted_refused(c)) {
        /* answered UNAVAILABLE, like Triton */
    } else if (alive > g->max_calls) {
        call_send_error(c, GRPC_STATUS_UNAVAILABLE,
                        "too many calls in progress (%zu; --max-connections %zu)", alive,
                        g->max_calls);
    } else if (c->rpc == RPC_STREAM) {
        close_watch(c); /* a cancelled stream cancels its jobs */
        stream_read_next(c);
    } else if (c->registered) {
        /* The message came with the call (NULL if the client sent none): one batch and one
         * completion-queue event less per call than reading it. */
        rpc_infer(c);
    } else {
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_RECV_MESSAGE;
        op.data.recv_message.recv_message = &c->recv_buf;
        atomic_fetch_add(&c->refs, 1);
        if (grpc_call_start_batch(c->call, &op, 1, &c->t_recv, NULL) != GRPC_CALL_OK)
            call_unref(c);
    }
    call_unref(c); /* the accept's reference */
}

static void on_recv(gcall *c, bool ok)
{
    if (c->rpc == RPC_STREAM)
        stream_recv(c, ok);
    else if (!ok)
        call_send_error(c, GRPC_STATUS_CANCELLED, "the request message could not be read");
    else if (c->rpc == RPC_INFER)
        rpc_infer(c);
    else if (c->rpc == RPC_LOAD || c->rpc == RPC_UNLOAD)
        rpc_control(c);
    else
        rpc_sync(c);
    call_unref(c);
}

static void on_close(gcall *c)
{
    c->closed = true;
    if (c->cancelled)
        cancel_jobs(c->g, c, false);
    call_unref(c);
}

/* A call to be accepted (its accept's reference); NULL when out of memory. */
static gcall *call_new(srv_grpc *g)
{
    gcall *c = calloc(1, sizeof(*c));

    if (c == NULL) {
        keel__srv_log(KEEL_LOG_ERROR, "gRPC: out of memory: cannot accept calls", NULL);
        return NULL;
    }
    c->g = g;
    c->t_new = (gtag){c, TAG_NEW};
    c->t_recv = (gtag){c, TAG_RECV};
    c->t_send = (gtag){c, TAG_SEND};
    c->t_close = (gtag){c, TAG_CLOSE};
    c->t_write = (gtag){c, TAG_WRITE};
    atomic_init(&c->refs, 1);
    atomic_init(&c->close_claimed, false);
    c->unary.version = -1;
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    atomic_fetch_add(&g->ncalls, 1);
    return c;
}

/*
 * Keeps one grpc_server_request_call (every method but ModelInfer) and one
 * grpc_server_request_registered_call (ModelInfer, its message read with the call)
 * outstanding. CQ thread; and once at start.
 */
static void accept_next(srv_grpc *g)
{
    gcall *c;
    grpc_call_error ce;

    if (!g->accepting && (c = call_new(g)) != NULL) {
        ce = grpc_server_request_call(g->server, &c->call, &c->details, &c->md, g->cq, g->cq,
                                      &c->t_new);
        if (ce != GRPC_CALL_OK) {
            keel__srv_log(KEEL_LOG_ERROR, "gRPC: cannot accept calls", "error",
                          grpc_call_error_to_string(ce), NULL);
            call_unref(c);
        } else {
            g->accepting = true;
        }
    }
    if (g->infer_method != NULL && !g->accepting_infer && (c = call_new(g)) != NULL) {
        c->registered = true;
        /* The method's name for the observation and --http-restricted-api, as a generic
         * call's details carry it (a static slice: unref is a no-op). */
        c->details.method = grpc_slice_from_static_string(INFER_PATH);
        ce = grpc_server_request_registered_call(g->server, g->infer_method, &c->call,
                                                 &c->details.deadline, &c->md, &c->recv_buf, g->cq,
                                                 g->cq, &c->t_new);
        if (ce != GRPC_CALL_OK) {
            keel__srv_log(KEEL_LOG_ERROR, "gRPC: cannot accept ModelInfer calls", "error",
                          grpc_call_error_to_string(ce), NULL);
            call_unref(c);
        } else {
            g->accepting_infer = true;
        }
    }
}

static void *cq_main(void *arg)
{
    srv_grpc *g = arg;
    bool cancelled_all = false;
    uint64_t last_check = 0;

    for (;;) {
        /* A turn: while requests are gathered, take only what is ready; once nothing is
         * (or after GATHER_MAX of them), run their batches here (keel_runtime_run_gathered:
         * a batching model's requests that arrived together run as one backend call on this
         * thread, as on the HTTP loops). */
        gpr_timespec dl = g->gathered > 0
                              ? gpr_inf_past(GPR_CLOCK_MONOTONIC)
                              : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                             gpr_time_from_millis(POLL_MS, GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(g->cq, dl, NULL);
        uint64_t now;

        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (g->gathered > 0 && (ev.type == GRPC_QUEUE_TIMEOUT || g->gathered >= GATHER_MAX)) {
            g->gathered = 0;
            keel_runtime_run_gathered(g->s->rt);
        }
        if (ev.type == GRPC_OP_COMPLETE) {
            if (ev.tag == &g->shutdown_tag) {
                pthread_mutex_lock(&g->mu);
                g->shutdown_done = true;
                pthread_cond_broadcast(&g->cv);
                pthread_mutex_unlock(&g->mu);
            } else {
                gtag *t = ev.tag;
                switch (t->kind) {
                case TAG_NEW:
                    on_new(t->c, ev.success != 0);
                    break;
                case TAG_RECV:
                    on_recv(t->c, ev.success != 0);
                    break;
                case TAG_SEND:
                    call_unref(t->c);
                    break;
                case TAG_CLOSE:
                    on_close(t->c);
                    break;
                case TAG_WRITE:
                    on_write(t->c);
                    break;
                }
            }
        }
        /* The drain's exit timeout (or stop) cancels what is still in flight. */
        now = mono_ns();
        if (!cancelled_all && now - last_check >= (uint64_t)POLL_MS * 1000000u) {
            bool all;
            last_check = now;
            pthread_mutex_lock(&g->s->mu);
            all = g->s->cancel_all;
            pthread_mutex_unlock(&g->s->mu);
            pthread_mutex_lock(&g->mu);
            all |= g->stopping;
            pthread_mutex_unlock(&g->mu);
            if (all) {
                cancel_all(g);
                cancelled_all = true;
            }
        } else if (cancelled_all) {
            cancel_all(g); /* late arrivals (cheap: the list is short or empty) */
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- start / stop */

static void grpc_log(gpr_log_func_args *a)
{
    keel__srv_log(a->severity == GPR_LOG_SEVERITY_ERROR ? KEEL_LOG_WARN : KEEL_LOG_DEBUG,
                  "grpc library", "message", a->message, NULL);
}

static void grpc_free(srv_grpc *g)
{
    if (g->server != NULL)
        grpc_server_destroy(g->server);
    if (g->cq != NULL)
        grpc_completion_queue_destroy(g->cq);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
    grpc_shutdown();
}

keel_err keel__grpc_start(keel_srv *s)
{
    const keel_server_opts *o = s->opts;
    const char *addr = o->grpc_address != NULL ? o->grpc_address : o->http_address;
    srv_grpc *g;
    grpc_arg args[5];
    grpc_channel_args cargs;
    grpc_server_credentials *creds;
    char target[INET6_ADDRSTRLEN + 16];
    struct in6_addr a6;
    struct in_addr a4;
    bool v6;

    if (strcmp(addr, "localhost") == 0)
        addr = "127.0.0.1";
    v6 = inet_pton(AF_INET6, addr, &a6) == 1;
    if (!v6 && inet_pton(AF_INET, addr, &a4) != 1) {
        keel__srv_log(KEEL_LOG_ERROR, "--grpc-address is not an IPv4 or IPv6 address", "address",
                      addr, NULL);
        return KEEL_EINVAL;
    }
    if ((g = calloc(1, sizeof(*g))) == NULL)
        return KEEL_ENOMEM;
    if (pthread_mutex_init(&g->mu, NULL) != 0) {
        free(g);
        return KEEL_ENOMEM;
    }
    if (pthread_cond_init(&g->cv, NULL) != 0) {
        pthread_mutex_destroy(&g->mu);
        free(g);
        return KEEL_ENOMEM;
    }
    g->s = s;
    g->max_calls = o->max_connections;
    snprintf(g->addr, sizeof(g->addr), "%s", addr);
    atomic_init(&g->ncalls, 0);
    atomic_init(&g->nstreams, 0);

    gpr_set_log_function(grpc_log);
    gpr_set_log_verbosity(keel__srv_log_on(KEEL_LOG_DEBUG) ? GPR_LOG_SEVERITY_INFO
                                                           : GPR_LOG_SEVERITY_ERROR);
    keel__cli_absl_release_mode();
    grpc_init();
    memset(args, 0, sizeof(args));
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_ALLOW_REUSEPORT;
    args[0].value.integer = 0; /* a port in use is an error, not a shared port */
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[1].value.integer = (int)o->max_request_bytes; /* <= INT32_MAX: checked by the options */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[2].value.integer = -1; /* answers are as large as the model makes them */
    /* Above keel's own limit (on_new refuses a call beyond --max-connections at once with
     * UNAVAILABLE): at HTTP/2's limit a client queues its call without sending it, so a
     * per-connection limit equal to keel's made the call of a client whose connection
     * held the limit's streams wait for its deadline (DEADLINE_EXCEEDED) instead. The
     * headroom lets refused calls reach keel while earlier refusals are still closing. */
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = GRPC_ARG_MAX_CONCURRENT_STREAMS;
    args[3].value.integer =
        (int)(o->max_connections < INT_MAX - STREAM_HEADROOM ? o->max_connections + STREAM_HEADROOM
                                                             : INT_MAX);
    /* keel serves no channelz service: gRPC need not keep per-call channelz counts. */
    args[4].type = GRPC_ARG_INTEGER;
    args[4].key = GRPC_ARG_ENABLE_CHANNELZ;
    args[4].value.integer = 0;
    cargs.num_args = 5;
    cargs.args = args;
    g->cq = grpc_completion_queue_create_for_next(NULL);
    g->server = grpc_server_create(&cargs, NULL);
    grpc_server_register_completion_queue(g->server, g->cq, NULL);
    /* NULL (not expected): ModelInfer calls come through grpc_server_request_call too. */
    g->infer_method = grpc_server_register_method(g->server, INFER_PATH, NULL,
                                                  GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    snprintf(target, sizeof(target), v6 ? "[%s]:%d" : "%s:%d", addr, o->grpc_port);
    creds = grpc_insecure_server_credentials_create();
    g->port = grpc_server_add_http2_port(g->server, target, creds);
    grpc_server_credentials_release(creds);
    if (g->port <= 0) {
        char pbuf[16];
        keel__srv_log(KEEL_LOG_ERROR, "cannot listen for gRPC (port in use?)", "address", addr,
                      "port", keel__srv_fmt(pbuf, sizeof(pbuf), "%d", o->grpc_port), NULL);
        grpc_server_destroy(g->server);
        g->server = NULL;
        grpc_free(g);
        return KEEL_EIO;
    }
    grpc_server_start(g->server);
    accept_next(g);
    if (pthread_create(&g->thread, NULL, cq_main, g) != 0) {
        keel__srv_log(KEEL_LOG_ERROR, "cannot start the gRPC thread", NULL);
        s->grpc = g;
        keel__grpc_stop(s);
        return KEEL_ENOMEM;
    }
    g->thread_started = true;
    s->grpc = g;
    return KEEL_OK;
}

void keel__grpc_print_listening(keel_srv *s)
{
    char pbuf[16];

    if (s->grpc == NULL)
        return;
    printf("level=info msg=listening protocol=grpc address=%s port=%d\n", s->grpc->addr,
           s->grpc->port);
    fflush(stdout);
    keel__srv_log(KEEL_LOG_INFO, "listening", "protocol", "grpc", "address", s->grpc->addr, "port",
                  keel__srv_fmt(pbuf, sizeof(pbuf), "%d", s->grpc->port), NULL);
}

static bool wait_until(srv_grpc *g, bool (*cond)(srv_grpc *), uint64_t ms)
{
    uint64_t end = mono_ns() + ms * 1000000u;
    bool ok;

    pthread_mutex_lock(&g->mu);
    while (!(ok = cond(g)) && mono_ns() < end) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 20 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    }
    pthread_mutex_unlock(&g->mu);
    return ok;
}

static bool no_inflight(srv_grpc *g)
{
    return g->ninflight == 0;
}

static bool shut_down(srv_grpc *g)
{
    return g->shutdown_done;
}

/* Every call was freed: call_free's decrement of ncalls is its last touch of g, so once this
 * reads 0 (a sequentially consistent load, after that read-modify-write) g may be freed. */
static bool no_calls(srv_grpc *g)
{
    return atomic_load(&g->ncalls) == 0;
}

/* Only idle streams are left open (they stay open until cancelled), or nothing is: every
 * answer of every stream has been written. */
static bool only_streams(srv_grpc *g)
{
    return g->shutdown_done ||
           (atomic_load(&g->ncalls) <= atomic_load(&g->nstreams) && g->nbusy_streams == 0);
}

void keel__grpc_stop(keel_srv *s)
{
    srv_grpc *g = s->grpc;

    if (g == NULL)
        return;
    s->grpc = NULL;
    /* No new calls; the outstanding accept completes with success = 0. */
    grpc_server_shutdown_and_notify(g->server, g->cq, &g->shutdown_tag);
    pthread_mutex_lock(&g->mu);
    g->stopping = true; /* the CQ thread cancels keel requests still in flight */
    pthread_mutex_unlock(&g->mu);
    if (g->thread_started) {
        /* In flight: their completion callbacks still start batches on this queue, so the
         * queue may only shut down once every one of them ran. */
        while (!wait_until(g, no_inflight, 5000))
            keel__srv_log(KEEL_LOG_WARN, "gRPC: waiting for running requests to return", NULL);
        /* Unary calls being answered finish; streams (their requests all answered by
         * now) and calls that never sent their message are cancelled. */
        wait_until(g, only_streams, STOP_WAIT_MS);
        if (!wait_until(g, shut_down, 0)) {
            char n[24];
            keel__srv_log(KEEL_LOG_INFO, "gRPC: cancelling calls still open", "calls",
                          keel__srv_fmt(n, sizeof(n), "%zu", atomic_load(&g->ncalls)), NULL);
            grpc_server_cancel_all_calls(g->server);
            while (!wait_until(g, shut_down, 5000))
                ;
        }
        grpc_completion_queue_shutdown(g->cq);
        pthread_join(g->thread, NULL);
        /* A keel worker may still be inside the completion callback of a call whose last
         * reference it drops (job_finish -> call_free) after gRPC reported the shutdown and
         * the queue's thread left: g is freed only after that callback's last touch. */
        while (!wait_until(g, no_calls, 5000))
            keel__srv_log(KEEL_LOG_WARN, "gRPC: waiting for answered calls to be freed", NULL);
    } else {
        grpc_server_cancel_all_calls(g->server);
        grpc_completion_queue_shutdown(g->cq);
        for (;;) {
            grpc_event ev =
                grpc_completion_queue_next(g->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            if (ev.type == GRPC_QUEUE_SHUTDOWN)
                break;
            if (ev.type == GRPC_OP_COMPLETE && ev.tag != &g->shutdown_tag)
                call_unref(((gtag *)ev.tag)->c);
        }
    }
    grpc_free(g);
}
