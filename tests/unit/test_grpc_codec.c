/*
 * test_grpc_codec.c: the gRPC codec (src/server/grpc_codec.c).
 *
 * Every datatype, sent as typed contents and as raw_input_contents, must decode to exactly
 * the bytes the HTTP codec (v2codec.c) makes of the same tensor in JSON; codec errors name
 * the field; a request through the mock model (y = x) encodes to raw_output_contents equal
 * to its input; JSON documents convert to protobuf messages field by field.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "grpc_codec.h"
#include "mock_backend.h"
#include "runtime/testhook.h"
#include "testutil.h"
#include "v2codec.h"

#define NOHDR ((size_t)-1)

typedef struct fixture {
    char *repo;
    keel_runtime *rt;
} fixture;

static int setup_keel(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    keel_runtime_opts o;

    mock_reset();
    mock_gate_open();
    f->repo = tu_mkdtemp("grpc_codec");
    mock_write_model(f->repo, "m", 1, 4, 0);
    mock_write_version(f->repo, "m", 1, 1.0);
    keel_runtime_opts_init(&o);
    o.model_repository = f->repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 1;
    assert_int_equal(keel_runtime_create(&o, &f->rt), KEEL_OK);
    assert_int_equal(keel__runtime_add_backend(f->rt, &mock_backend), KEEL_OK);
    assert_int_equal(keel_model_load(f->rt, "m", NULL, 0), KEEL_OK);
    *state = f;
    return 0;
}

static int teardown_keel(void **state)
{
    fixture *f = *state;

    keel_runtime_destroy(f->rt);
    tu_rm_rf(f->repo);
    free(f->repo);
    free(f);
    return 0;
}

/* A one-input request "x" of shape [1, n], no data yet; free with free_unpacked. */
static Inference__ModelInferRequest *one_input(const char *dt, size_t n, bool raw)
{
    Inference__ModelInferRequest *m = calloc(1, sizeof(*m));
    Inference__ModelInferRequest__InferInputTensor *t = calloc(1, sizeof(*t));

    assert_non_null(m);
    assert_non_null(t);
    inference__model_infer_request__init(m);
    inference__model_infer_request__infer_input_tensor__init(t);
    m->model_name = strdup("m");
    t->name = strdup("x");
    t->datatype = strdup(dt);
    t->n_shape = 2;
    t->shape = calloc(2, sizeof(int64_t));
    t->shape[0] = 1;
    t->shape[1] = (int64_t)n;
    m->n_inputs = 1;
    m->inputs = calloc(1, sizeof(*m->inputs));
    m->inputs[0] = t;
    if (!raw) {
        t->contents = calloc(1, sizeof(*t->contents));
        inference__infer_tensor_contents__init(t->contents);
    }
    return m;
}

static void set_raw(Inference__ModelInferRequest *m, const void *data, size_t len)
{
    m->n_raw_input_contents = 1;
    m->raw_input_contents = calloc(1, sizeof(ProtobufCBinaryData));
    m->raw_input_contents[0].data = malloc(len > 0 ? len : 1);
    memcpy(m->raw_input_contents[0].data, data, len);
    m->raw_input_contents[0].len = len;
}

#define SET_TYPED(m, field, type, vals, n)                                                         \
    do {                                                                                           \
        (m)->inputs[0]->contents->n_##field = (n);                                                 \
        (m)->inputs[0]->contents->field = malloc((n) * sizeof(type));                              \
        for (size_t k_ = 0; k_ < (n); k_++)                                                        \
            (m)->inputs[0]->contents->field[k_] = (type)(vals)[k_];                                \
    } while (0)

/* Decodes m (gRPC) and json (HTTP) into two requests and checks the input bytes are equal
 * (and equal to want, when given). */
static void same_as_http(fixture *f, Inference__ModelInferRequest *m, const char *json,
                         const void *want, size_t want_len)
{
    keel_request *a = NULL, *b = NULL;
    keel_v2_request_info info;
    char err[512];
    uint64_t timeout = 0;
    keel_err e;

    assert_int_equal(keel_request_create(f->rt, "m", -1, &a), KEEL_OK);
    assert_int_equal(keel_request_create(f->rt, "m", -1, &b), KEEL_OK);
    e = keel__grpc_decode_infer(m, a, &timeout, err, sizeof(err));
    if (e != KEEL_OK)
        fail_msg("gRPC decode failed: %s", err);
    if (keel_v2_decode_infer(b, json, strlen(json), NOHDR, &info, err, sizeof(err)) != 200)
        fail_msg("HTTP decode failed: %s\n%s", err, json);
    keel_tensor_view va, vb;
    assert_int_equal(keel__request_input_count(a), 1);
    assert_int_equal(keel__request_input_count(b), 1);
    assert_int_equal(keel__request_input(a, 0, &va), KEEL_OK);
    assert_int_equal(keel__request_input(b, 0, &vb), KEEL_OK);
    assert_int_equal(va.datatype, vb.datatype);
    assert_int_equal(va.ndim, vb.ndim);
    assert_memory_equal(va.shape, vb.shape, 2 * sizeof(int64_t));
    assert_int_equal(va.bytes, vb.bytes);
    assert_memory_equal(va.data, vb.data, va.bytes);
    if (want != NULL) {
        assert_int_equal(va.bytes, want_len);
        assert_memory_equal(va.data, want, want_len);
    }
    keel_v2_request_info_fini(&info);
    keel_request_destroy(a);
    keel_request_destroy(b);
}

static void both(fixture *f, const char *dt, size_t n, const char *json_data, const void *bytes,
                 size_t len, void (*fill)(Inference__ModelInferRequest *))
{
    char *json = tu_strf("{\"inputs\":[{\"name\":\"x\",\"shape\":[1,%zu],\"datatype\":\"%s\","
                         "\"data\":%s}]}",
                         n, dt, json_data);
    Inference__ModelInferRequest *m = one_input(dt, n, false);

    fill(m);
    same_as_http(f, m, json, bytes, len);
    inference__model_infer_request__free_unpacked(m, NULL);
    m = one_input(dt, n, true);
    set_raw(m, bytes, len);
    same_as_http(f, m, json, bytes, len);
    inference__model_infer_request__free_unpacked(m, NULL);
    free(json);
}

static const int32_t i8v[] = {-128, -1, 0, 127};
static const int32_t i16v[] = {-32768, -2, 7, 32767};
static const int32_t i32v[] = {INT32_MIN, -3, 0, INT32_MAX};
static const int64_t i64v[] = {INT64_MIN, -4, 1, INT64_MAX};
static const uint32_t u8v[] = {0, 1, 200, 255};
static const uint32_t u16v[] = {0, 2, 40000, 65535};
static const uint32_t u32v[] = {0, 3, 3000000000u, UINT32_MAX};
static const uint64_t u64v[] = {0, 4, 1ull << 63, UINT64_MAX};
static const float f32v[] = {0.5f, -1.25f, 3.4028235e38f, 1e-45f};
static const double f64v[] = {0.1, -2.5, 1.7976931348623157e308, 5e-324};
static const int bv[] = {1, 0, 0, 1};

static void fill_i8(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, int_contents, int32_t, i8v, 4);
}
static void fill_i16(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, int_contents, int32_t, i16v, 4);
}
static void fill_i32(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, int_contents, int32_t, i32v, 4);
}
static void fill_i64(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, int64_contents, int64_t, i64v, 4);
}
static void fill_u8(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, uint_contents, uint32_t, u8v, 4);
}
static void fill_u16(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, uint_contents, uint32_t, u16v, 4);
}
static void fill_u32(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, uint_contents, uint32_t, u32v, 4);
}
static void fill_u64(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, uint64_contents, uint64_t, u64v, 4);
}
static void fill_f32(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, fp32_contents, float, f32v, 4);
}
static void fill_f64(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, fp64_contents, double, f64v, 4);
}
static void fill_bool(Inference__ModelInferRequest *m)
{
    SET_TYPED(m, bool_contents, protobuf_c_boolean, bv, 4);
}
static void fill_bytes(Inference__ModelInferRequest *m)
{
    static const char *const s[] = {"", "a", "hello", "\xc3\xa9t\xc3\xa9"};
    Inference__InferTensorContents *c = m->inputs[0]->contents;

    c->n_bytes_contents = 4;
    c->bytes_contents = calloc(4, sizeof(ProtobufCBinaryData));
    for (size_t k = 0; k < 4; k++) {
        c->bytes_contents[k].len = strlen(s[k]);
        c->bytes_contents[k].data = (uint8_t *)strdup(s[k]);
    }
}

/* Every datatype: typed and raw decode to HTTP's bytes, which are the little-endian values. */
static void test_datatypes_match_http(void **state)
{
    fixture *f = *state;
    int8_t b8[4];
    int16_t b16[4];
    uint8_t ub8[4], bools[4];
    uint16_t ub16[4];
    uint8_t bytes[4 * 4 + 1 + 5 + 6];
    size_t off = 0;
    static const char *const s[] = {"", "a", "hello", "\xc3\xa9t\xc3\xa9"};

    for (size_t k = 0; k < 4; k++) {
        b8[k] = (int8_t)i8v[k];
        b16[k] = (int16_t)i16v[k];
        ub8[k] = (uint8_t)u8v[k];
        ub16[k] = (uint16_t)u16v[k];
        bools[k] = (uint8_t)bv[k];
    }
    for (size_t k = 0; k < 4; k++) {
        uint32_t n = (uint32_t)strlen(s[k]);
        memcpy(bytes + off, &n, 4); /* little-endian host (x86-64, arm64) */
        memcpy(bytes + off + 4, s[k], n);
        off += 4 + n;
    }
    both(f, "INT8", 4, "[-128,-1,0,127]", b8, sizeof(b8), fill_i8);
    both(f, "INT16", 4, "[-32768,-2,7,32767]", b16, sizeof(b16), fill_i16);
    both(f, "INT32", 4, "[-2147483648,-3,0,2147483647]", i32v, sizeof(i32v), fill_i32);
    both(f, "INT64", 4, "[-9223372036854775808,-4,1,9223372036854775807]", i64v, sizeof(i64v),
         fill_i64);
    both(f, "UINT8", 4, "[0,1,200,255]", ub8, sizeof(ub8), fill_u8);
    both(f, "UINT16", 4, "[0,2,40000,65535]", ub16, sizeof(ub16), fill_u16);
    both(f, "UINT32", 4, "[0,3,3000000000,4294967295]", u32v, sizeof(u32v), fill_u32);
    both(f, "UINT64", 4, "[0,4,9223372036854775808,18446744073709551615]", u64v, sizeof(u64v),
         fill_u64);
    both(f, "FP32", 4, "[0.5,-1.25,3.4028235e38,1e-45]", f32v, sizeof(f32v), fill_f32);
    both(f, "FP64", 4, "[0.1,-2.5,1.7976931348623157e308,5e-324]", f64v, sizeof(f64v), fill_f64);
    both(f, "BOOL", 4, "[true,false,false,true]", bools, sizeof(bools), fill_bool);
    both(f, "BYTES", 4, "[\"\",\"a\",\"hello\",\"\xc3\xa9t\xc3\xa9\"]", bytes, off, fill_bytes);
}

static void expect_error(fixture *f, Inference__ModelInferRequest *m, const char *w1,
                         const char *w2)
{
    keel_request *req = NULL;
    char err[512];
    uint64_t timeout;

    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel__grpc_decode_infer(m, req, &timeout, err, sizeof(err)), KEEL_EINVAL);
    if (strstr(err, w1) == NULL || (w2 != NULL && strstr(err, w2) == NULL))
        fail_msg("error '%s' does not name '%s' / '%s'", err, w1, w2 != NULL ? w2 : "");
    keel_request_destroy(req);
    inference__model_infer_request__free_unpacked(m, NULL);
}

static void test_errors_name_the_field(void **state)
{
    fixture *f = *state;
    Inference__ModelInferRequest *m;
    static const int32_t big[] = {1, 2, 300, 4};
    static const float three[] = {1, 2, 3};
    static const uint8_t badbytes[] = {5, 0, 0, 0, 'a'};

    m = one_input("INT8", 4, false);
    SET_TYPED(m, int_contents, int32_t, big, 4);
    expect_error(f, m, "inputs[0].contents.int_contents[2]", "300");
    m = one_input("FP32", 4, false);
    SET_TYPED(m, fp32_contents, float, three, 3);
    expect_error(f, m, "fp32_contents: 3 elements given", "needs 4");
    m = one_input("FP16", 4, false);
    expect_error(f, m, "FP16", "raw_input_contents");
    m = one_input("FP32", 4, true);
    set_raw(m, three, sizeof(three));
    expect_error(f, m, "raw_input_contents[0]: 12 bytes", "needs 16");
    m = one_input("BYTES", 1, true);
    set_raw(m, badbytes, sizeof(badbytes));
    expect_error(f, m, "raw_input_contents[0]", "BYTES");
    m = one_input("FP99", 4, true);
    expect_error(f, m, "inputs[0].datatype", "FP99");
    m = one_input("FP32", 4, true);
    m->inputs[0]->shape[1] = -4;
    expect_error(f, m, "inputs[0].shape[1]", "-4");
    m = one_input("FP32", 4, false); /* typed contents, but also raw */
    set_raw(m, f32v, sizeof(f32v));
    expect_error(f, m, "inputs[0].contents", "raw_input_contents");
}

/* Through the mock model (y = x): the answer's raw output is the input, with the version,
 * the id and the requested output. */
static void test_end_to_end(void **state)
{
    fixture *f = *state;
    Inference__ModelInferRequest *m = one_input("FP32", 4, true);
    Inference__ModelInferRequest__InferRequestedOutputTensor *o = calloc(1, sizeof(*o));
    keel_request *req = NULL;
    grpc_infer_out out;
    char err[512];
    uint64_t timeout = 0;
    uint8_t *packed;
    size_t len;
    Inference__ModelInferResponse *back;

    set_raw(m, f32v, sizeof(f32v));
    m->id = strdup("r9"); /* replaces the static empty default */
    inference__model_infer_request__infer_requested_output_tensor__init(o);
    o->name = strdup("y");
    m->n_outputs = 1;
    m->outputs = calloc(1, sizeof(*m->outputs));
    m->outputs[0] = o;
    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel__grpc_decode_infer(m, req, &timeout, err, sizeof(err)), KEEL_OK);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel__grpc_infer_out_fill(&out, req, "m", m, err, sizeof(err)), KEEL_OK);
    len = inference__model_infer_response__get_packed_size(&out.resp);
    packed = malloc(len);
    inference__model_infer_response__pack(&out.resp, packed);
    keel__grpc_infer_out_fini(&out);
    back = inference__model_infer_response__unpack(NULL, len, packed);
    assert_non_null(back);
    assert_string_equal(back->model_name, "m");
    assert_string_equal(back->model_version, "1");
    assert_string_equal(back->id, "r9");
    assert_int_equal(back->n_outputs, 1);
    assert_string_equal(back->outputs[0]->name, "y");
    assert_string_equal(back->outputs[0]->datatype, "FP32");
    assert_int_equal(back->n_raw_output_contents, 1);
    assert_int_equal(back->raw_output_contents[0].len, sizeof(f32v));
    assert_memory_equal(back->raw_output_contents[0].data, f32v, sizeof(f32v));
    inference__model_infer_response__free_unpacked(back, NULL);
    free(packed);
    keel_request_destroy(req);
    inference__model_infer_request__free_unpacked(m, NULL);
}

static void test_json_to_msg(void **state)
{
    const char *text =
        "{\"name\":\"heart\",\"backend\":\"xgboost\",\"max_batch_size\":256,"
        "\"input\":[{\"name\":\"features\",\"data_type\":\"TYPE_FP32\","
        "\"dims\":[13]}],\"instance_group\":[{\"count\":2,\"kind\":\"KIND_CPU\"}],"
        "\"unknown\":{\"x\":1},\"output\":[{\"name\":\"p\",\"data_type\":\"NOPE\"}]}";
    json_t *j = json_loads(text, 0, NULL);
    Inference__ModelConfig *c;

    (void)state;
    c = (Inference__ModelConfig *)keel__grpc_json_to_msg(&inference__model_config__descriptor, j);
    assert_non_null(c);
    assert_string_equal(c->name, "heart");
    assert_string_equal(c->backend, "xgboost");
    assert_int_equal(c->max_batch_size, 256);
    assert_int_equal(c->n_input, 1);
    assert_string_equal(c->input[0]->name, "features");
    assert_int_equal(c->input[0]->data_type, INFERENCE__DATA_TYPE__TYPE_FP32);
    assert_int_equal(c->input[0]->n_dims, 1);
    assert_int_equal(c->input[0]->dims[0], 13);
    assert_int_equal(c->n_instance_group, 1);
    assert_int_equal(c->instance_group[0]->count, 2);
    assert_int_equal(c->instance_group[0]->kind, INFERENCE__MODEL_INSTANCE_GROUP__KIND__KIND_CPU);
    assert_int_equal(c->n_output, 1);
    assert_int_equal(c->output[0]->data_type, INFERENCE__DATA_TYPE__TYPE_INVALID); /* skipped */
    protobuf_c_message_free_unpacked(&c->base, NULL);
    json_decref(j);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_datatypes_match_http),
        cmocka_unit_test(test_errors_name_the_field),
        cmocka_unit_test(test_end_to_end),
        cmocka_unit_test(test_json_to_msg),
    };

    return cmocka_run_group_tests(tests, setup_keel, teardown_keel);
}
