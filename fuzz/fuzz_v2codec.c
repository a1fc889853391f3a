/*
 * fuzz_v2codec.c: libFuzzer driver for the KServe V2 request decoder and response encoder
 * (src/server/v2codec.h, v2codec_internal.h).
 *
 * DESIGN
 * An infer request body comes straight from the network, so every byte string must give
 * either a decoded request or a 400 with a message, never a crash, a leak, undefined
 * behaviour or an allocation out of proportion to the body. Input layout: the first 8 bytes
 * (little-endian) choose the Inference-Header-Content-Length value: top bit set means the
 * header is absent ((size_t)-1), otherwise the value modulo (body length + 2), so header
 * lengths past the end of the body are tried too. The rest is the body, passed with its exact
 * length and no terminating NUL.
 *
 * Besides the sanitizers, the driver aborts (libFuzzer saves the input) when the contract is
 * broken:
 *   - the status is 200 or 400 (500 means an allocation failed, which must not happen for
 *     the small inputs libFuzzer makes); on 400 the message is a terminated, non-empty string
 *     and the result is empty; keel_v2_error_json accepts it;
 *   - on 200 every tensor is consistent: a KServe datatype, a non-empty name, count = the
 *     product of the shape, bytes = count x element size (BYTES: exactly count
 *     length-prefixed elements), binary data inside the body's binary section;
 *   - round trip: the decoded inputs, encoded as response outputs (binary ones in the binary
 *     section) and turned back into a request by renaming "outputs" to "inputs", decode to
 *     the same tensors byte for byte;
 *   - the vector path of FP32 arrays (fastfloat.h, on CPUs that have it) and the scalar path
 *     give the same status, message and tensors (decoded a second time with the vector path
 *     off);
 *   - keel accepts what the codec accepts: keel_v2_decode_infer on a real keel_request (a
 *     runtime on an empty repository, made once) returns 200, or a 400 only for more
 *     dimensions than keel allows.
 *
 * Build and run: fuzz/README.md.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fastfloat.h"
#include "v2codec.h"
#include "v2codec_internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static keel_runtime *rt;

static void check(int ok, const char *what, const char *detail)
{
    if (!ok) {
        fprintf(stderr, "fuzz_v2codec: contract broken: %s\n%s\n", what,
                detail != NULL ? detail : "");
        abort();
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static char dir[] = "/tmp/fuzz_v2codec.XXXXXX";
    keel_runtime_opts o;

    (void)argc;
    (void)argv;
    check(mkdtemp(dir) != NULL, "mkdtemp", dir);
    keel_runtime_opts_init(&o);
    o.model_repository = dir;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 1;
    check(keel_runtime_create(&o, &rt) == KEEL_OK, "keel_runtime_create", dir);
    return 0;
}

static void check_tensor(const keel__v2_tensor *t, const char *body, size_t body_len)
{
    size_t count = 1;

    check(t->name != NULL && t->name[0] != '\0', "empty input name", NULL);
    check(t->datatype > KEEL_TYPE_INVALID && t->datatype < KEEL_TYPE_COUNT_, "bad datatype",
          t->name);
    check(t->ndim <= KEEL__V2_MAX_DIMS, "too many dimensions", t->name);
    for (size_t i = 0; i < t->ndim; i++) {
        check(t->shape[i] >= 0, "negative dimension", t->name);
        check(!__builtin_mul_overflow(count, (size_t)t->shape[i], &count), "count overflows",
              t->name);
    }
    check(count == t->count, "count is not the product of the shape", t->name);
    check(t->bytes == 0 || t->data != NULL, "bytes without data", t->name);
    if (t->datatype == KEEL_TYPE_BYTES) {
        const unsigned char *p = t->data;
        size_t off = 0;
        for (size_t i = 0; i < count; i++) {
            uint32_t l;
            check(t->bytes - off >= 4, "BYTES framing: short length", t->name);
            memcpy(&l, p + off, 4);
            off += 4;
            check(t->bytes - off >= l, "BYTES framing: short element", t->name);
            off += l;
        }
        check(off == t->bytes, "BYTES framing: trailing bytes", t->name);
    } else {
        check(t->bytes == count * keel_datatype_size(t->datatype), "bytes != count x size",
              t->name);
    }
    if (t->binary && t->bytes > 0)
        check((const char *)t->data >= body && (const char *)t->data + t->bytes <= body + body_len,
              "binary data outside the body", t->name);
    check(t->binary != t->owned || t->bytes == 0, "binary data must be borrowed, JSON owned",
          t->name);
}

static void roundtrip(const keel__v2_request *r)
{
    static const char prefix[] = "{\"model_name\":\"m\",\"model_version\":\"1\",\"outputs\":";
    static const char inputs[] = "{\"inputs\":";
    keel_tensor_view *v = calloc(r->ninputs + 1, sizeof(*v));
    bool *bin = calloc(r->ninputs + 1, sizeof(*bin));
    keel_v2_response resp;
    keel__v2_request r2;
    char err[512];
    char *again;
    size_t alen;
    size_t hl;
    int st;

    check(v != NULL && bin != NULL, "calloc", NULL);
    for (size_t i = 0; i < r->ninputs; i++) {
        const keel__v2_tensor *t = &r->inputs[i];
        v[i] = (keel_tensor_view){t->name, t->datatype, t->shape, t->ndim, t->data, t->bytes};
        bin[i] = t->binary;
    }
    st = keel__v2_encode("m", 1, NULL, v, bin, r->ninputs, &resp, err, sizeof(err));
    check(st == 0, "encode failed", err);
    check(resp.body_len >= strlen(prefix) && memcmp(resp.body, prefix, strlen(prefix)) == 0,
          "response prefix", resp.body);
    alen = resp.body_len - strlen(prefix) + strlen(inputs);
    again = malloc(alen);
    check(again != NULL, "malloc", NULL);
    memcpy(again, inputs, strlen(inputs));
    memcpy(again + strlen(inputs), resp.body + strlen(prefix), resp.body_len - strlen(prefix));
    hl = resp.has_binary ? resp.json_len - strlen(prefix) + strlen(inputs) : (size_t)-1;
    st = keel__v2_decode(again, alen, hl, &r2, err, sizeof(err));
    if (st != 200)
        fprintf(stderr, "re-decode of:\n%.*s\n", (int)resp.json_len, resp.body);
    check(st == 200, "the encoded response does not decode back", err);
    check(r2.ninputs == r->ninputs, "round trip changed the input count", NULL);
    for (size_t i = 0; i < r->ninputs; i++) {
        const keel__v2_tensor *a = &r->inputs[i], *b = &r2.inputs[i];
        check(strcmp(a->name, b->name) == 0, "round trip changed a name", a->name);
        check(a->datatype == b->datatype && a->ndim == b->ndim &&
                  memcmp(a->shape, b->shape, a->ndim * sizeof(int64_t)) == 0,
              "round trip changed a datatype or shape", a->name);
        check(a->bytes == b->bytes && (a->bytes == 0 || memcmp(a->data, b->data, a->bytes) == 0),
              "round trip changed the data", a->name);
    }
    keel__v2_request_fini(&r2);
    free(again);
    free(resp.body);
    free(v);
    free(bin);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *body = (const char *)data;
    size_t len = size;
    size_t header_len = (size_t)-1;
    keel__v2_request r;
    char err[512];
    int st;

    if (size >= 8) {
        uint64_t u = 0;
        for (int i = 7; i >= 0; i--)
            u = u << 8 | data[i];
        body += 8;
        len -= 8;
        if ((u >> 63) == 0)
            header_len = (size_t)(u % (len + 2));
    }
    memset(err, 'x', sizeof(err));
    st = keel__v2_decode(body, len, header_len, &r, err, sizeof(err));
    check(st == 200 || st == 400, "unexpected status", err);
    check(memchr(err, '\0', sizeof(err)) != NULL, "message not NUL-terminated", NULL);
    if (keel__ff_simd_level() >= 1) {
        keel__v2_request rs;
        char errs[512];
        int sts;

        keel__ff_simd_force(0);
        sts = keel__v2_decode(body, len, header_len, &rs, errs, sizeof(errs));
        keel__ff_simd_force(-1);
        check(sts == st, "the scalar path gives another status", st == 200 ? errs : err);
        check(st == 200 || strcmp(err, errs) == 0, "the scalar path gives another message", errs);
        if (st == 200) {
            check(rs.ninputs == r.ninputs, "the scalar path gives other inputs", NULL);
            for (size_t i = 0; i < r.ninputs; i++)
                check(rs.inputs[i].bytes == r.inputs[i].bytes &&
                          (r.inputs[i].bytes == 0 ||
                           memcmp(rs.inputs[i].data, r.inputs[i].data, r.inputs[i].bytes) == 0),
                      "the scalar path decodes other values", r.inputs[i].name);
            keel__v2_request_fini(&rs);
        }
    }
    if (st != 200) {
        char *ej = keel_v2_error_json(err);
        check(err[0] != '\0', "empty error message", NULL);
        check(r.ninputs == 0 && r.inputs == NULL && r.params == NULL && r.info.id == NULL &&
                  r.info.outputs == NULL,
              "result not empty after an error", err);
        check(ej != NULL && strncmp(ej, "{\"error\":\"", 10) == 0, "error JSON", ej);
        free(ej);
        return 0;
    }
    for (size_t i = 0; i < r.ninputs; i++)
        check_tensor(&r.inputs[i], body, len);
    roundtrip(&r);
    keel__v2_request_fini(&r);

    {
        keel_request *req = NULL;
        keel_v2_request_info info;
        check(keel_request_create(rt, "m", -1, &req) == KEEL_OK, "keel_request_create", NULL);
        st = keel_v2_decode_infer(req, body, len, header_len, &info, err, sizeof(err));
        check(st == 200 || (st == 400 && strstr(err, "dimensions") != NULL),
              "keel refused what the codec accepted", err);
        keel_v2_request_info_fini(&info);
        keel_request_destroy(req);
    }
    return 0;
}
