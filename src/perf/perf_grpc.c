/*
 * perf_grpc.c: keel perf over gRPC: the model's metadata (one blocking unary call), packed
 * inference.ModelInferRequest messages, and the gRPC load loop (unary ModelInfer, or
 * ModelStreamInfer with one message in flight per stream), on gRPC's C core and protobuf-c
 * with keel's own src/server/proto/keel_inference.proto.
 *
 * DESIGN
 * The loop mirrors perf_load.c's: one thread, one completion queue, `slots` each carrying at
 * most one request (closed loop: `concurrency` slots each sending the next request when the
 * answer arrived; open loop: requests due at t0 + k / rate take idle slots out of
 * max_connections, latency from the due time). A unary slot makes one call per request (the
 * whole call in one batch, the request's deadline sent as the call's); a stream slot opens
 * one ModelStreamInfer call and sends each request as one message, read back as one answer.
 * A request not answered within the timeout has its call cancelled by the loop (a stream's:
 * the slot reopens it); the channels have no deadline filter. The calls share
 * `grpc_channels` direct channels (channel_open_direct: each on its own TCP connection, no
 * reconnect), slot i on channel i mod channels; the metadata call uses a normal channel. A
 * slot may be reused only once every batch started on its call has completed (ops == 0): the
 * tags point into it. Failures are counted by gRPC status name, and stream answers carrying
 * an error_message as stream_error.
 *
 * The request messages are built once (perf_bodies.c, through perf_grpc_pack_infer) and sent
 * from static slices: the workload outlives every call. gRPC is initialised per run
 * (grpc_init / grpc_shutdown), and everything of the run (calls, channels, queue) is
 * destroyed before it returns. Calls perf_hist.c and perf_util.c only.
 */
#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cliutil.h"
#include "keel_inference.pb-c.h"
#include "perf_bodies.h"
#include "perf_grpc.h"
#include "perf_hist.h"
#include "perf_load.h"
#include "perf_util.h"

#define M_INFER "/inference.GRPCInferenceService/ModelInfer"
#define M_STREAM "/inference.GRPCInferenceService/ModelStreamInfer"
#define M_META "/inference.GRPCInferenceService/ModelMetadata"

static const char *const code_names[17] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *perf_grpc_code_name(int code)
{
    return code >= 0 && code < 17 ? code_names[code] : "UNKNOWN";
}

static gpr_timespec mono_after(double secs)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_nanos((int64_t)(secs * 1e9), GPR_TIMESPAN));
}

/* "host:port" (IPv6 in brackets) of t. */
static void target_text(const perf_target *t, char *out, size_t len)
{
    snprintf(out, len, strchr(t->host, ':') != NULL ? "[%s]:%s" : "%s:%s", t->host, t->port);
}

static grpc_channel *channel_open(const perf_target *t)
{
    grpc_arg args[3];
    grpc_channel_args cargs;
    grpc_channel_credentials *creds;
    grpc_channel *ch;
    char target[300];

    memset(args, 0, sizeof(args));
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL; /* one connection per channel */
    args[0].value.integer = 1;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[1].value.integer = -1; /* answers are as large as the model makes them */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_ENABLE_RETRIES;
    args[2].value.integer = 0; /* a failed request is counted, never resent */
    cargs.num_args = 3;
    cargs.args = args;
    target_text(t, target, sizeof(target));
    creds = grpc_insecure_credentials_create();
    ch = grpc_channel_create(target, creds, &cargs);
    grpc_channel_credentials_release(creds);
    return ch;
}

/*
 * The load loop's channel: a direct channel over a TCP connection of our own
 * (grpc_channel_create_from_fd), not a client channel. A client channel runs every call
 * through name resolution's config selector, a load-balancing pick and a subchannel call:
 * about a quarter of keel perf's instructions per unary call (bench/callgrind_grpc.sh),
 * which a load generator on one target needs none of. The price: the channel does not
 * reconnect; if the server closes the connection, the rest of the run's calls on it fail
 * (counted as UNAVAILABLE). Minimal stack: no deadline filter either (perf_grpc_load_run
 * cancels a call that outlives --timeout). NULL with errbuf set if the connection fails.
 */
static grpc_channel *channel_open_direct(const perf_target *t, char *errbuf, size_t errlen)
{
    grpc_arg args[2];
    grpc_channel_args cargs;
    grpc_channel_credentials *creds;
    grpc_channel *ch;
    char target[300];
    int fd;

    target_text(t, target, sizeof(target));
    if ((fd = perf_target_connect(t, false)) < 0) {
        perf_errf(errbuf, errlen, "cannot connect to the gRPC server at %s: %s", target,
                  strerror(errno));
        return NULL;
    }
    memset(args, 0, sizeof(args));
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = -1; /* answers are as large as the model makes them */
    /* No deadline filter (its timer per call): the loop enforces --timeout itself. */
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MINIMAL_STACK;
    args[1].value.integer = 1;
    cargs.num_args = 2;
    cargs.args = args;
    creds = grpc_insecure_credentials_create();
    ch = grpc_channel_create_from_fd(target, fd, creds, &cargs); /* owns fd from here */
    grpc_channel_credentials_release(creds);
    if (ch == NULL)
        perf_errf(errbuf, errlen, "cannot open a gRPC channel to %s", target);
    return ch;
}

/* The bytes of a received message (owned by the caller: grpc_slice_unref). */
static grpc_slice buffer_bytes(grpc_byte_buffer *bb)
{
    grpc_byte_buffer_reader rd;
    grpc_slice sl;

    if (!grpc_byte_buffer_reader_init(&rd, bb))
        return grpc_empty_slice();
    sl = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    return sl;
}

/* Drains and destroys a queue that no call uses any more. */
static void cq_destroy(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
}

/* ---------------------------------------------------------------- metadata */

bool perf_grpc_model_metadata(const perf_target *t, const char *model, const char *version,
                              double timeout_s, json_t **doc, bool *unreachable, char *errbuf,
                              size_t errlen)
{
    Inference__ModelMetadataRequest q = INFERENCE__MODEL_METADATA_REQUEST__INIT;
    Inference__ModelMetadataResponse *a = NULL;
    grpc_completion_queue *cq;
    grpc_channel *ch;
    grpc_call *call;
    grpc_metadata_array md_init, md_trail;
    grpc_byte_buffer *send = NULL, *recv = NULL;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice(), sl;
    grpc_op ops[6];
    grpc_event ev;
    char target[300];
    bool ok = false;
    json_t *root = NULL, *inputs = NULL;

    *doc = NULL;
    if (unreachable != NULL)
        *unreachable = false;
    target_text(t, target, sizeof(target));
    q.name = (char *)model;
    q.version = (char *)(version != NULL ? version : "");
    sl = grpc_slice_malloc(protobuf_c_message_get_packed_size(&q.base));
    protobuf_c_message_pack(&q.base, GRPC_SLICE_START_PTR(sl));
    send = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);

    keel__cli_absl_release_mode();
    grpc_init();
    cq = grpc_completion_queue_create_for_next(NULL);
    ch = channel_open(t);
    sl = grpc_slice_from_static_string(M_META);
    call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, sl, NULL,
                                    mono_after(timeout_s), NULL);
    grpc_metadata_array_init(&md_init);
    grpc_metadata_array_init(&md_trail);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_init;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &md_trail;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    if (grpc_call_start_batch(call, ops, 6, call, NULL) != GRPC_CALL_OK) {
        perf_errf(errbuf, errlen, "gRPC: cannot start a call to %s", target);
        grpc_call_cancel(call, NULL);
    } else {
        do
            ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        while (ev.type != GRPC_OP_COMPLETE);
        if (status == GRPC_STATUS_UNAVAILABLE || status == GRPC_STATUS_DEADLINE_EXCEEDED) {
            if (unreachable != NULL)
                *unreachable = true;
            perf_errf(errbuf, errlen,
                      "cannot reach a gRPC server at %s (%s: %.*s); is --url the server's gRPC "
                      "port (keel serve --grpc-port, default 8001)?",
                      target, perf_grpc_code_name((int)status), (int)GRPC_SLICE_LENGTH(details),
                      (const char *)GRPC_SLICE_START_PTR(details));
        } else if (status != GRPC_STATUS_OK) {
            perf_errf(errbuf, errlen, "ModelMetadata of %s on %s: %s: %.*s", model, target,
                      perf_grpc_code_name((int)status), (int)GRPC_SLICE_LENGTH(details),
                      (const char *)GRPC_SLICE_START_PTR(details));
        } else if (recv == NULL) {
            perf_errf(errbuf, errlen, "ModelMetadata of %s on %s: no answer message", model,
                      target);
        } else {
            sl = buffer_bytes(recv);
            a = inference__model_metadata_response__unpack(NULL, GRPC_SLICE_LENGTH(sl),
                                                           GRPC_SLICE_START_PTR(sl));
            grpc_slice_unref(sl);
            if (a == NULL)
                perf_errf(errbuf, errlen,
                          "ModelMetadata of %s on %s: the answer is not a ModelMetadataResponse",
                          model, target);
        }
    }
    if (a != NULL) {
        root = json_object();
        inputs = json_array();
        if (root == NULL || inputs == NULL || json_object_set_new(root, "inputs", inputs) != 0) {
            json_decref(inputs);
            goto oom;
        }
        for (size_t i = 0; i < a->n_inputs; i++) {
            json_t *in = json_object(), *shape = json_array();
            if (in == NULL || shape == NULL || json_array_append_new(inputs, in) != 0 ||
                json_object_set_new(in, "shape", shape) != 0 ||
                json_object_set_new(in, "name", json_string(a->inputs[i]->name)) != 0 ||
                json_object_set_new(in, "datatype", json_string(a->inputs[i]->datatype)) != 0) {
                json_decref(shape);
                goto oom;
            }
            for (size_t j = 0; j < a->inputs[i]->n_shape; j++) {
                if (json_array_append_new(shape, json_integer(a->inputs[i]->shape[j])) != 0)
                    goto oom;
            }
        }
        *doc = root;
        root = NULL;
        ok = true;
    }
    goto done;
oom:
    perf_errf(errbuf, errlen, "out of memory");
done:
    json_decref(root);
    if (a != NULL)
        inference__model_metadata_response__free_unpacked(a, NULL);
    grpc_call_unref(call);
    grpc_channel_destroy(ch);
    cq_destroy(cq);
    grpc_metadata_array_destroy(&md_init);
    grpc_metadata_array_destroy(&md_trail);
    grpc_slice_unref(details);
    grpc_byte_buffer_destroy(send);
    if (recv != NULL)
        grpc_byte_buffer_destroy(recv);
    grpc_shutdown();
    return ok;
}

/* ---------------------------------------------------------------- requests */

bool perf_grpc_pack_infer(const perf_workload *w, const char *id, const void *const *raw,
                          const size_t *raw_len, unsigned char **out, size_t *len)
{
    Inference__ModelInferRequest m = INFERENCE__MODEL_INFER_REQUEST__INIT;
    Inference__ModelInferRequest__InferInputTensor t[8], *tp[8];
    ProtobufCBinaryData bin[8];

    *out = NULL;
    if (w->ninputs > 8)
        return false;
    m.model_name = w->model;
    m.model_version = w->version != NULL ? w->version : "";
    m.id = (char *)id;
    for (size_t i = 0; i < w->ninputs; i++) {
        inference__model_infer_request__infer_input_tensor__init(&t[i]);
        t[i].name = (char *)w->inputs[i].name;
        t[i].datatype = (char *)w->inputs[i].datatype;
        t[i].n_shape = w->inputs[i].ndims;
        t[i].shape = (int64_t *)w->inputs[i].dims;
        tp[i] = &t[i];
        bin[i].data = (uint8_t *)raw[i];
        bin[i].len = raw_len[i];
    }
    m.n_inputs = w->ninputs;
    m.inputs = tp;
    m.n_raw_input_contents = w->ninputs;
    m.raw_input_contents = bin;
    *len = protobuf_c_message_get_packed_size(&m.base);
    if ((*out = malloc(*len > 0 ? *len : 1)) == NULL)
        return false;
    protobuf_c_message_pack(&m.base, *out);
    return true;
}

/* ---------------------------------------------------------------- the load loop */

enum { GS_CLOSED, GS_IDLE, GS_BUSY };
enum { T_UNARY, T_OPEN, T_SEND, T_RECV, T_STATUS, T_HALFCLOSE };

typedef struct gslot gslot;
typedef struct gtag {
    gslot *s;
    int kind;
} gtag;

struct gslot {
    size_t chan;
    grpc_call *call;
    int state;
    int ops;          /* batches started on call and not yet completed */
    bool stream_open; /* stream: the call's status has not arrived */
    bool send_done, recv_done, got_answer;
    grpc_byte_buffer *send_bb, *recv_bb;
    grpc_metadata_array md_init, md_trail;
    grpc_status_code status;
    grpc_slice details;
    bool status_done;
    uint64_t t_intended, t_sent;
    uint64_t retry_at; /* after UNAVAILABLE: not before this time (no busy loop) */
    bool in_idle;
    gtag tags[6];
};

typedef struct gloop {
    const perf_workload *w;
    const perf_load_opts *o;
    perf_result *r;
    grpc_completion_queue *cq;
    grpc_channel **chans;
    void **handles; /* per channel: the registered method */
    size_t nchans;
    gslot *slots;
    size_t nslots, busy;
    size_t *idle;
    size_t nidle;
    size_t next_req;
    uint64_t t_meas, t_end;
} gloop;

#define note_failure(r, ...) perf_note((r)->notes, &(r)->nnotes, PERF_FAILURE_NOTES, __VA_ARGS__)

static bool measured(const gloop *L, const gslot *s)
{
    return s->t_intended >= L->t_meas;
}

static void idle_remove(gloop *L, gslot *s)
{
    if (!s->in_idle)
        return;
    for (size_t i = L->nidle; i-- > 0;) {
        if (&L->slots[L->idle[i]] == s) {
            L->idle[i] = L->idle[--L->nidle];
            break;
        }
    }
    s->in_idle = false;
}

static void make_idle(gloop *L, gslot *s)
{
    s->state = GS_IDLE;
    if (!s->in_idle) {
        L->idle[L->nidle++] = (size_t)(s - L->slots);
        s->in_idle = true;
    }
}

/* The call's resources once no batch is outstanding; the slot is closed (a stream) or idle
 * (unary: a slot is idle between calls). */
static void call_release(gloop *L, gslot *s)
{
    if (s->call != NULL)
        grpc_call_unref(s->call);
    s->call = NULL;
    grpc_metadata_array_destroy(&s->md_init);
    grpc_metadata_array_destroy(&s->md_trail);
    grpc_metadata_array_init(&s->md_init);
    grpc_metadata_array_init(&s->md_trail);
    grpc_slice_unref(s->details);
    s->details = grpc_empty_slice();
    if (s->send_bb != NULL)
        grpc_byte_buffer_destroy(s->send_bb);
    s->send_bb = NULL;
    if (s->recv_bb != NULL)
        grpc_byte_buffer_destroy(s->recv_bb);
    s->recv_bb = NULL;
    s->stream_open = false;
    s->status_done = false;
    if (L->w->stream) {
        s->state = GS_CLOSED;
        idle_remove(L, s);
    } else {
        make_idle(L, s);
    }
}

static grpc_call_error start(gslot *s, const grpc_op *ops, size_t n, int kind)
{
    grpc_call_error ce = grpc_call_start_batch(s->call, ops, n, &s->tags[kind], NULL);

    if (ce == GRPC_CALL_OK)
        s->ops++;
    return ce;
}

/* Counts the end of the request of a busy slot: an answer (ok, or a stream's error_message:
 * err set) or a failed call (code). */
static void request_end(gloop *L, gslot *s, bool answered, const char *err, grpc_status_code code)
{
    perf_result *r = L->r;
    uint64_t now = perf_now_ns();

    L->busy--;
    if (now >= L->t_meas && now < L->t_end)
        r->completed++;
    if (!measured(L, s))
        return;
    if (answered && err == NULL) {
        r->ok++;
        perf_hist_record(&r->hist, now - s->t_intended);
    } else if (answered) {
        r->failed++;
        r->stream_errors++;
        note_failure(r, "stream error: %.160s", err);
    } else {
        r->failed++;
        r->grpc_status[(unsigned)code < 17 ? (unsigned)code : 2]++;
        note_failure(
            r, "gRPC %s: %.*s", perf_grpc_code_name((int)code),
            (int)(GRPC_SLICE_LENGTH(s->details) < 160 ? GRPC_SLICE_LENGTH(s->details) : 160),
            (const char *)GRPC_SLICE_START_PTR(s->details));
    }
}

/* Starts request k on an idle (unary) or open idle (stream) slot. */
static void slot_send(gloop *L, gslot *s, uint64_t intended, uint64_t now)
{
    size_t k = L->next_req++ % L->w->nreqs;
    grpc_slice sl = grpc_slice_from_static_buffer(L->w->reqs[k], L->w->req_lens[k]);
    grpc_op ops[6];

    idle_remove(L, s);
    s->state = GS_BUSY;
    s->t_intended = intended;
    s->t_sent = now;
    s->send_bb = grpc_raw_byte_buffer_create(&sl, 1);
    s->send_done = s->recv_done = s->got_answer = false;
    L->busy++;
    if (L->busy > L->r->max_conns)
        L->r->max_conns = L->busy;
    memset(ops, 0, sizeof(ops));
    if (!L->w->stream) {
        s->call = grpc_channel_create_registered_call(
            L->chans[s->chan], NULL, GRPC_PROPAGATE_DEFAULTS, L->cq, L->handles[s->chan],
            mono_after(L->o->timeout_s), NULL);
        ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[1].op = GRPC_OP_SEND_MESSAGE;
        ops[1].data.send_message.send_message = s->send_bb;
        ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_init;
        ops[4].op = GRPC_OP_RECV_MESSAGE;
        ops[4].data.recv_message.recv_message = &s->recv_bb;
        ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[5].data.recv_status_on_client.trailing_metadata = &s->md_trail;
        ops[5].data.recv_status_on_client.status = &s->status;
        ops[5].data.recv_status_on_client.status_details = &s->details;
        if (s->call == NULL || start(s, ops, 6, T_UNARY) != GRPC_CALL_OK) {
            s->status = GRPC_STATUS_INTERNAL;
            request_end(L, s, false, NULL, GRPC_STATUS_INTERNAL);
            call_release(L, s);
        }
        return;
    }
    ops[0].op = GRPC_OP_SEND_MESSAGE;
    ops[0].data.send_message.send_message = s->send_bb;
    if (start(s, ops, 1, T_SEND) != GRPC_CALL_OK)
        s->send_done = true;
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_MESSAGE;
    ops[0].data.recv_message.recv_message = &s->recv_bb;
    if (start(s, ops, 1, T_RECV) != GRPC_CALL_OK) {
        s->recv_done = true;
        grpc_call_cancel(s->call, NULL); /* the status batch ends the stream */
    }
}

/* Opens a stream on a closed slot: the call, its metadata and its status batches. */
static void stream_open(gloop *L, gslot *s)
{
    grpc_op ops[2];

    s->call = grpc_channel_create_registered_call(L->chans[s->chan], NULL, GRPC_PROPAGATE_DEFAULTS,
                                                  L->cq, L->handles[s->chan],
                                                  gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    if (s->call == NULL)
        return;
    s->stream_open = true;
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[1].data.recv_initial_metadata.recv_initial_metadata = &s->md_init;
    if (start(s, ops, 2, T_OPEN) != GRPC_CALL_OK)
        grpc_call_cancel(s->call, NULL);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &s->md_trail;
    ops[0].data.recv_status_on_client.status = &s->status;
    ops[0].data.recv_status_on_client.status_details = &s->details;
    if (start(s, ops, 1, T_STATUS) != GRPC_CALL_OK) {
        /* Nothing would ever end this call: give it up at once. */
        grpc_call_cancel(s->call, NULL);
        s->stream_open = false;
        return;
    }
    make_idle(L, s);
}

/* A stream slot after any of its batches completed: ends its request when both halves are
 * done (or the stream ended), releases the call when nothing is outstanding. */
static void stream_settle(gloop *L, gslot *s)
{
    if (s->state == GS_BUSY && s->send_done && s->recv_done) {
        if (s->got_answer) {
            grpc_slice sl = buffer_bytes(s->recv_bb);
            Inference__ModelStreamInferResponse *a = inference__model_stream_infer_response__unpack(
                NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
            grpc_slice_unref(sl);
            grpc_byte_buffer_destroy(s->recv_bb);
            s->recv_bb = NULL;
            grpc_byte_buffer_destroy(s->send_bb);
            s->send_bb = NULL;
            if (a == NULL)
                request_end(L, s, true, "the answer is not a ModelStreamInferResponse", 0);
            else
                request_end(L, s, true, a->error_message[0] != '\0' ? a->error_message : NULL, 0);
            if (a != NULL)
                inference__model_stream_infer_response__free_unpacked(a, NULL);
            if (s->stream_open)
                make_idle(L, s);
            else
                s->state = GS_CLOSED;
        } else if (s->status_done) {
            /* The stream ended under the request: its status says why. */
            request_end(L, s, false, NULL,
                        s->status == GRPC_STATUS_OK ? GRPC_STATUS_UNKNOWN : s->status);
            s->state = GS_CLOSED;
        }
    }
    if (s->status_done && s->ops == 0 && s->state != GS_BUSY) {
        if (s->state == GS_IDLE && s->status != GRPC_STATUS_OK && measured(L, s)) {
            /* An idle stream that the server ended with an error: say so once. */
            note_failure(
                L->r, "stream ended: gRPC %s: %.*s", perf_grpc_code_name((int)s->status),
                (int)(GRPC_SLICE_LENGTH(s->details) < 160 ? GRPC_SLICE_LENGTH(s->details) : 160),
                (const char *)GRPC_SLICE_START_PTR(s->details));
        }
        if (s->status == GRPC_STATUS_UNAVAILABLE)
            s->retry_at = perf_now_ns() + 10000000u;
        call_release(L, s);
    }
}

static void on_event(gloop *L, gtag *t, bool success)
{
    gslot *s = t->s;

    s->ops--;
    switch (t->kind) {
    case T_UNARY:
        if (s->status == GRPC_STATUS_OK && s->recv_bb != NULL) {
            request_end(L, s, true, NULL, GRPC_STATUS_OK);
        } else {
            if (s->status == GRPC_STATUS_OK)
                s->status = GRPC_STATUS_INTERNAL; /* OK without a message */
            request_end(L, s, false, NULL, s->status);
            if (s->status == GRPC_STATUS_UNAVAILABLE)
                s->retry_at = perf_now_ns() + 10000000u;
        }
        call_release(L, s);
        return;
    case T_OPEN:
    case T_HALFCLOSE:
        break;
    case T_SEND:
        s->send_done = true;
        if (!success)
            grpc_call_cancel(s->call, NULL);
        break;
    case T_RECV:
        s->recv_done = true;
        s->got_answer = success && s->recv_bb != NULL;
        break;
    case T_STATUS:
        s->status_done = true;
        s->stream_open = false;
        break;
    }
    stream_settle(L, s);
}

static double thread_cpu_s(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void progress(const gloop *L, uint64_t now, uint64_t t0)
{
    const perf_result *r = L->r;

    if (now < L->t_meas) {
        fprintf(stderr, "\r%s: warming up %.1f/%.1f s   \033[K", L->o->label,
                (double)(now - t0) / 1e9, L->o->warmup_s);
    } else {
        double m = (double)(now - L->t_meas) / 1e9;
        fprintf(stderr, "\r%s: %.1f s  %" PRIu64 " ok  %.0f req/s  %" PRIu64 " failed\033[K",
                L->o->label, m, r->ok, m > 0 ? (double)r->completed / m : 0.0, r->failed);
    }
    fflush(stderr);
}

/* Whether any batch is outstanding. */
static bool any_ops(const gloop *L)
{
    for (size_t i = 0; i < L->nslots; i++) {
        if (L->slots[i].ops > 0)
            return true;
    }
    return false;
}

/* Takes the next event (up to wait_ns) and handles it; false on queue timeout. wait_ns 0
 * does not wait: the far past as the deadline. gRPC turns a deadline into whole milliseconds,
 * rounding up, so "now" would poll until the next millisecond boundary (grpc/grpc#28779):
 * up to 1 ms lost after every batch of events, most of a batch-1 call's time. */
static bool poll_once(gloop *L, uint64_t wait_ns)
{
    gpr_timespec dl = wait_ns == 0
                          ? gpr_inf_past(GPR_CLOCK_MONOTONIC)
                          : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_nanos((int64_t)wait_ns, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_next(L->cq, dl, NULL);

    if (ev.type != GRPC_OP_COMPLETE)
        return false;
    on_event(L, ev.tag, ev.success != 0);
    return true;
}

bool perf_grpc_load_run(const perf_workload *w, const perf_load_opts *o, perf_result *r,
                        char *errbuf, size_t errlen)
{
    gloop L;
    uint64_t t0, next_progress, next_timeout_scan = 0, interval = 0, timeout_ns, k_issued = 0;
    double cpu0;
    bool open_loop = o->rate > 0, stopping = false, issuing = true, ok = false;
    bool show = o->progress && isatty(2);
    size_t n;

    memset(&L, 0, sizeof(L));
    L.w = w;
    L.o = o;
    L.r = r;
    n = open_loop ? (o->max_connections > 0 ? o->max_connections : 64) : o->concurrency;
    if (n == 0) {
        perf_errf(errbuf, errlen, "no connections to use");
        return false;
    }
    L.nslots = n;
    L.nchans = o->grpc_channels > 0 ? o->grpc_channels : 1;
    if (L.nchans > n)
        L.nchans = n;
    if ((L.slots = calloc(n, sizeof(*L.slots))) == NULL ||
        (L.idle = calloc(n, sizeof(*L.idle))) == NULL ||
        (L.chans = calloc(L.nchans, sizeof(*L.chans))) == NULL ||
        (L.handles = calloc(L.nchans, sizeof(*L.handles))) == NULL) {
        free(L.slots);
        free(L.idle);
        free(L.chans);
        perf_errf(errbuf, errlen, "out of memory");
        return false;
    }
    keel__cli_absl_release_mode();
    grpc_init();
    L.cq = grpc_completion_queue_create_for_next(NULL);
    for (size_t i = 0; i < L.nchans; i++) {
        if ((L.chans[i] = channel_open_direct(&w->target, errbuf, errlen)) == NULL) {
            while (i-- > 0)
                grpc_channel_destroy(L.chans[i]);
            cq_destroy(L.cq);
            grpc_shutdown();
            free(L.slots);
            free(L.idle);
            free(L.chans);
            free(L.handles);
            return false;
        }
        L.handles[i] =
            grpc_channel_register_call(L.chans[i], w->stream ? M_STREAM : M_INFER, NULL, NULL);
    }
    for (size_t i = 0; i < n; i++) {
        gslot *s = &L.slots[i];
        s->chan = i % L.nchans;
        s->details = grpc_empty_slice();
        grpc_metadata_array_init(&s->md_init);
        grpc_metadata_array_init(&s->md_trail);
        for (int k = 0; k < 6; k++)
            s->tags[k] = (gtag){s, k};
        if (w->stream)
            s->state = GS_CLOSED;
        else
            make_idle(&L, s);
    }
    timeout_ns = (uint64_t)(o->timeout_s * 1e9);
    cpu0 = thread_cpu_s();
    t0 = perf_now_ns();
    L.t_meas = t0 + (uint64_t)(o->warmup_s * 1e9);
    L.t_end = o->duration_s > 0 ? L.t_meas + (uint64_t)(o->duration_s * 1e9) : UINT64_MAX;
    if (open_loop)
        interval = (uint64_t)(1e9 / o->rate);
    next_progress = t0 + 500000000u;

    for (;;) {
        uint64_t now = perf_now_ns(), wait_ns = 50000000u;

        if (issuing && (now >= L.t_end || (o->stop != NULL && atomic_load(o->stop)))) {
            stopping = true;
            if (L.t_end == UINT64_MAX || now < L.t_end)
                L.t_end = now;
        }
        /* A request without an answer in time: cancel its call (a stream's: the slot
         * reopens it). The channel has no deadline filter (minimal stack), so this is what
         * enforces --timeout; a unary call also carries it to the server as its deadline.
         * Every 10 ms at most: the scan is over every slot. */
        if (now >= next_timeout_scan) {
            next_timeout_scan = now + 10000000u;
            for (size_t i = 0; i < n; i++) {
                gslot *s = &L.slots[i];
                if (s->state == GS_BUSY && s->call != NULL && now - s->t_sent > timeout_ns)
                    grpc_call_cancel_with_status(s->call, GRPC_STATUS_DEADLINE_EXCEEDED,
                                                 "keel perf: no answer within --timeout", NULL);
            }
        }
        if (issuing) {
            /* Streams to (re)open: every slot of a closed loop, the pool of an open one as
             * it is needed. */
            for (size_t i = 0; w->stream && !stopping && i < n; i++) {
                gslot *s = &L.slots[i];
                if (s->state == GS_CLOSED && s->call == NULL && now >= s->retry_at &&
                    (!open_loop || L.nidle == 0))
                    stream_open(&L, s);
            }
            if (!open_loop && !stopping) {
                for (size_t i = 0; i < n; i++) {
                    if (L.slots[i].state == GS_IDLE && now >= L.slots[i].retry_at)
                        slot_send(&L, &L.slots[i], now, now);
                }
                wait_ns = 10000000u; /* a slot waiting for retry_at */
            } else if (open_loop) {
                uint64_t horizon = now < L.t_end ? now : L.t_end;
                uint64_t due = (horizon - t0) / interval + 1;
                while (k_issued < due && L.nidle > 0) {
                    slot_send(&L, &L.slots[L.idle[L.nidle - 1]], t0 + k_issued * interval, now);
                    k_issued++;
                }
                {
                    uint64_t next = t0 + k_issued * interval;
                    wait_ns =
                        next > now ? (next - now < 50000000u ? next - now : 50000000u) : 1000000u;
                }
                if (stopping) {
                    uint64_t due_start =
                        L.t_meas > t0 ? (L.t_meas - t0 + interval - 1) / interval : 0;
                    uint64_t first = k_issued > due_start ? k_issued : due_start;
                    if (due > first)
                        r->unsent = due - first;
                }
            }
            if (stopping) {
                issuing = false;
                /* Streams: half-close the idle ones now, the busy ones once answered. */
            }
        } else {
            if (L.busy == 0) {
                bool closing = false;
                for (size_t i = 0; i < n; i++) {
                    gslot *s = &L.slots[i];
                    if (s->call != NULL && s->stream_open && s->state == GS_IDLE) {
                        grpc_op op;
                        memset(&op, 0, sizeof(op));
                        op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
                        s->state = GS_CLOSED; /* the status batch releases it */
                        idle_remove(&L, s);
                        if (start(s, &op, 1, T_HALFCLOSE) != GRPC_CALL_OK)
                            grpc_call_cancel(s->call, NULL);
                        closing = true;
                    }
                }
                if (!closing && !any_ops(&L))
                    break;
            }
        }
        /* Handle every event that is ready, waiting up to wait_ns for the first. */
        if (poll_once(&L, wait_ns)) {
            while (poll_once(&L, 0))
                ;
        }
        if (show && now >= next_progress) {
            progress(&L, now, t0);
            next_progress = now + 500000000u;
        }
        if (!issuing && L.busy == 0 && !any_ops(&L)) {
            bool open = false;
            for (size_t i = 0; i < n; i++)
                open |= L.slots[i].call != NULL;
            if (!open)
                break;
        }
    }
    r->window_s = L.t_end > L.t_meas ? (double)(L.t_end - L.t_meas) / 1e9 : 0.0;
    r->cpu_s = thread_cpu_s() - cpu0;
    r->elapsed_s = (double)(perf_now_ns() - t0) / 1e9;
    if (show)
        fprintf(stderr, "\r\033[K");
    ok = true;

    /* Every batch has completed (the loop only ends so): release what is left. */
    for (size_t i = 0; i < n; i++) {
        gslot *s = &L.slots[i];
        if (s->call != NULL)
            grpc_call_unref(s->call);
        grpc_metadata_array_destroy(&s->md_init);
        grpc_metadata_array_destroy(&s->md_trail);
        grpc_slice_unref(s->details);
        if (s->send_bb != NULL)
            grpc_byte_buffer_destroy(s->send_bb);
        if (s->recv_bb != NULL)
            grpc_byte_buffer_destroy(s->recv_bb);
    }
    for (size_t i = 0; i < L.nchans; i++)
        grpc_channel_destroy(L.chans[i]);
    cq_destroy(L.cq);
    grpc_shutdown();
    free(L.slots);
    free(L.idle);
    free(L.chans);
    free(L.handles);
    return ok;
}
