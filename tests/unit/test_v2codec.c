/*
 * test_v2codec.c: the KServe V2 request decoder and response encoder (src/server/v2codec.h).
 *
 * What a client would notice if it broke: a malformed body answered with anything but a 400
 * naming the field; a number that decodes to a different float than strtof gives; an output
 * that does not parse back to the value the model produced; binary tensors sliced at the wrong
 * offsets. Most tests drive the internal steps (v2codec_internal.h) directly; one runs a body
 * end to end through keel with the mock backend (y = x * k).
 */
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "fastfloat.h"
#include "mock_backend.h"
#include "runtime/testhook.h"
#include "testutil.h"
#include "v2codec.h"
#include "v2codec_internal.h"

#define NOHDR ((size_t)-1)

static char errbuf[512];

static int decode_n(const char *body, size_t len, size_t header_len, keel__v2_request *r)
{
    int st = keel__v2_decode(body, len, header_len, r, errbuf, sizeof(errbuf));
    if (st != 200) {
        /* On failure nothing is left allocated and the message is a terminated string. */
        assert_null(r->inputs);
        assert_int_equal(r->ninputs, 0);
        assert_null(r->params);
        assert_null(r->info.id);
        assert_null(r->info.outputs);
        assert_true(strlen(errbuf) > 0 && strlen(errbuf) < sizeof(errbuf));
    }
    return st;
}

static int decode(const char *json, keel__v2_request *r)
{
    return decode_n(json, strlen(json), NOHDR, r);
}

/* Decodes a body that must succeed. */
static void decode_ok(const char *json, keel__v2_request *r)
{
    int st = decode(json, r);
    if (st != 200)
        fail_msg("decode failed (%d): %s\nbody: %s", st, errbuf, json);
}

/* A one-input request body. */
static char *one_input(const char *datatype, const char *shape, const char *data)
{
    return tu_strf("{\"inputs\":[{\"name\":\"x\",\"shape\":%s,\"datatype\":\"%s\",\"data\":%s}]}",
                   shape, datatype, data);
}

/* ---------------------------------------------------------------- malformed bodies */

typedef struct bad_case {
    const char *body;
    int status;
    const char *msg; /* substring of the message */
} bad_case;

/* Each body differs from a valid request in one way. */
static const bad_case bad_cases[] = {
    {"", 400, "invalid JSON at byte 0"},
    {"   ", 400, "the JSON is empty"},
    {"\xEF\xBB\xBF{\"inputs\":[]}", 400, "invalid JSON at byte 0"},
    {"[1,2]", 400, "the request must be a JSON object, got an array"},
    {"\"inputs\"", 400, "the request must be a JSON object, got a string"},
    {"{", 400, "invalid JSON at byte 1: expected a string key"},
    {"{\"inputs\":[]} x", 400, "invalid JSON at byte 14: unexpected data after the JSON object"},
    {"{\"inputs\" []}", 400, "expected ':' after an object key"},
    {"{1:2}", 400, "invalid JSON at byte 1: expected a string key"},
    {"{\"inputs\":[],}", 400, "expected a string key"},
    {"{\"inputs\":[]", 400, "expected ',' or '}' in an object"},
    {"{}", 400, "inputs: required"},
    {"{\"inputs\":{}}", 400, "inputs: expected an array, got an object"},
    {"{\"inputs\":[1]}", 400, "inputs[0]: expected an object, got 1"},
    {"{\"inputs\":[],\"inputs\":[]}", 400, "inputs: given more than once"},
    {"{\"inputs\":[{\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].name: required"},
    {"{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].shape: required"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"data\":[1]}]}", 400,
     "inputs[0].datatype: required"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\"}]}", 400,
     "inputs[0].data: required"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"shape\":[1],\"datatype\":\"FP32\","
     "\"data\":[1]}]}",
     400, "inputs[0].shape: given more than once"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]},"
     "{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[2]}]}",
     400, "inputs[1].name: input 'x' given more than once (also inputs[0])"},
    {"{\"inputs\":[{\"name\":\"\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].name: must not be empty"},
    {"{\"inputs\":[{\"name\":\"a\\u0000b\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}",
     400, "inputs[0].name: must not contain a NUL character"},
    {"{\"inputs\":[{\"name\":7,\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].name: expected a string, got 7"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP128\",\"data\":[1]}]}", 400,
     "inputs[0].datatype: unknown datatype \"FP128\""},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"TYPE_FP32\",\"data\":[1]}]}", 400,
     "inputs[0].datatype: unknown datatype \"TYPE_FP32\""},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":3,\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].shape: expected an array of non-negative integers, got 3"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2,-3],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].shape[1]: expected a non-negative integer, got -3"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1.5],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].shape[0]: expected a non-negative integer, got 1.5"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1e12],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].shape[0]: expected a non-negative integer, got 1e12"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[\"2\"],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].shape[0]: expected a non-negative integer, got a string"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[4294967296,4294967296],\"datatype\":\"FP32\","
     "\"data\":[1]}]}",
     400, "inputs[0].shape[1]: the element count of the shape overflows"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[9223372036854775808],\"datatype\":\"FP32\","
     "\"data\":[1]}]}",
     400, "inputs[0].shape[0]: 9223372036854775808 is out of range"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"
     "\"datatype\":\"FP32\",\"data\":[1]}]}",
     400, "inputs[0].shape[16]: more than 16 dimensions"},
    /* Refused before allocating the 4 TB buffer the shape asks for. */
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1000000000000],\"datatype\":\"FP32\","
     "\"data\":[1]}]}",
     400, "inputs[0].data: shape [1000000000000] needs 1000000000000 elements, more than the"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[3],\"datatype\":\"FP32\",\"data\":[1,2]}]}", 400,
     "inputs[0].data: 2 elements given, shape [3] needs 3"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"FP32\",\"data\":[1,2,3]}]}", 400,
     "inputs[0].data[2]: more elements than the 2 of shape [2]"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[],\"datatype\":\"FP32\",\"data\":[1,2]}]}", 400,
     "inputs[0].data[1]: more elements than the 1 of shape []"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2,2],\"datatype\":\"FP32\",\"data\":[[1,2],[3]]}]}",
     400, "inputs[0].data: 3 elements given, shape [2,2] needs 4"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":5}]}", 400,
     "inputs[0].data: expected an array, got 5"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[\"a\"]}]}", 400,
     "inputs[0].data[0]: expected a number for datatype FP32, got a string"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[4],\"datatype\":\"FP32\","
     "\"data\":[[1,2],[3,\"x\"]]}]}",
     400, "inputs[0].data[1][1]: expected a number for datatype FP32, got a string"},
    {"{\"inputs\":[{\"name\":\"x\",\"data\":[1,null],\"shape\":[2],\"datatype\":\"FP32\"}]}", 400,
     "inputs[0].data[1]: expected a number for datatype FP32, got null"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"INT32\",\"data\":[1,1.5]}]}", 400,
     "inputs[0].data[1]: expected an integer for datatype INT32, got 1.5"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"INT64\",\"data\":[1e2]}]}", 400,
     "inputs[0].data[0]: expected an integer for datatype INT64, got 1e2"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"INT8\",\"data\":[128]}]}", 400,
     "inputs[0].data[0]: 128 is out of range for datatype INT8"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"INT8\",\"data\":[-129]}]}", 400,
     "inputs[0].data[0]: -129 is out of range for datatype INT8"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"UINT8\",\"data\":[-1]}]}", 400,
     "inputs[0].data[0]: -1 is out of range for datatype UINT8"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"UINT16\",\"data\":[65536]}]}", 400,
     "inputs[0].data[0]: 65536 is out of range for datatype UINT16"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"UINT64\","
     "\"data\":[18446744073709551616]}]}",
     400, "inputs[0].data[0]: 18446744073709551616 is out of range for datatype UINT64"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"INT64\","
     "\"data\":[-9223372036854775809]}]}",
     400, "inputs[0].data[0]: -9223372036854775809 is out of range for datatype INT64"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1e39]}]}", 400,
     "inputs[0].data[0]: 1e39 is out of range for datatype FP32"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP64\",\"data\":[-1e309]}]}", 400,
     "inputs[0].data[0]: -1e309 is out of range for datatype FP64"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP16\",\"data\":[65520]}]}", 400,
     "inputs[0].data[0]: 65520 is out of range for datatype FP16"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"BOOL\",\"data\":[1]}]}", 400,
     "inputs[0].data[0]: expected true or false for datatype BOOL, got 1"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"BYTES\",\"data\":[1]}]}", 400,
     "inputs[0].data[0]: expected a string for datatype BYTES, got 1"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"BYTES\",\"data\":[\"a\",\"\xFF\"]}]"
     "}",
     400, "inputs[0].data[1]: invalid UTF-8 in a string at byte"},
    {"{\"inputs\":[{\"name\":\"\xC0\xAF\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "inputs[0].name: invalid UTF-8"},
    {"{\"inputs\":[{\"name\":\"\xED\xA0\x80\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}",
     400, "inputs[0].name: invalid UTF-8"},
    {"{\"inputs\":[{\"name\":\"\xF4\x90\x80\x80\",\"shape\":[1],\"datatype\":\"FP32\","
     "\"data\":[1]}]}",
     400, "inputs[0].name: invalid UTF-8"},
    {"{\"inputs\":[{\"name\":\"\\ud800\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "(in inputs[0].name): \\u escape of a high surrogate not followed by a low one"},
    {"{\"inputs\":[{\"name\":\"\\udc00x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "unpaired low surrogate"},
    {"{\"inputs\":[{\"name\":\"\\x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "invalid escape in a string"},
    {"{\"inputs\":[{\"name\":\"a\tb\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}", 400,
     "unescaped control character in a string"},
    {"{\"inputs\":[{\"name\":\"x", 400, "unterminated string"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"FP32\",\"data\":[1,2,]}]}", 400,
     "(in inputs[0].data[2]): expected a value"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"FP32\",\"data\":[1,02]}]}", 400,
     "(in inputs[0].data[1]): expected ',' or ']' in an array"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"FP32\",\"data\":[1,1.]}]}", 400,
     "(in inputs[0].data[1]): invalid number"},
    /* The same errors far from the end of the JSON (the fast scanner's territory). */
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[3],\"datatype\":\"FP32\",\"data\":[1,01.5,2],"
     "\"parameters\":{\"padding\":\"................................\"}}]}",
     400, "(in inputs[0].data[1]): expected ',' or ']' in an array"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[3],\"datatype\":\"FP64\",\"data\":[1,-.5,2],"
     "\"parameters\":{\"padding\":\"................................\"}}]}",
     400, "(in inputs[0].data[1]): invalid number"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[3],\"datatype\":\"FP32\",\"data\":[1 2,3],"
     "\"parameters\":{\"padding\":\"................................\"}}]}",
     400, "(in inputs[0].data[0]): expected ',' or ']' in an array"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"FP32\",\"data\":[1,NaN]}]}", 400,
     "(in inputs[0].data[1]): expected a value"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"FP32\",\"data\":[1,   2", 400,
     "(in inputs[0].data[1]): unexpected end of the JSON"},
    {"{\"inputs\":[{\"name\":\"x\",\"data\":[1,\"a\"],\"shape\":[2],\"datatype\":\"FP32\"}]}", 400,
     "inputs[0].data[1]: expected a number for datatype FP32, got a string"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}],"
     "\"x\":tru}",
     400, "(in x): invalid literal"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\","
     "\"parameters\":{\"binary_data_size\":4}}]}",
     400,
     "inputs[0].parameters.binary_data_size: input 'x' has binary data but the request has no "
     "binary section"},
    {"{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\","
     "\"parameters\":{\"binary_data_size\":-1}}]}",
     400, "inputs[0].parameters.binary_data_size: expected a non-negative integer, got -1"},
    {"{\"id\":5,\"inputs\":[]}", 400, "id: expected a string, got 5"},
    {"{\"parameters\":[],\"inputs\":[]}", 400, "parameters: expected an object, got an array"},
    {"{\"parameters\":{\"timeout\":-5},\"inputs\":[]}", 400,
     "parameters.timeout: expected a non-negative integer, got -5"},
    {"{\"parameters\":{\"timeout\":1.5},\"inputs\":[]}", 400,
     "parameters.timeout: expected a non-negative integer, got 1.5"},
    {"{\"parameters\":{\"foo\":null},\"inputs\":[]}", 400,
     "parameters.foo: expected a string, number or boolean, got null"},
    {"{\"parameters\":{\"foo\":{}},\"inputs\":[]}", 400,
     "parameters.foo: expected a string, number or boolean, got an object"},
    {"{\"parameters\":{\"a\":1,\"a\":2},\"inputs\":[]}", 400, "parameters.a: given more than once"},
    {"{\"parameters\":{\"binary_data_output\":\"yes\"},\"inputs\":[]}", 400,
     "parameters.binary_data_output: expected true or false, got a string"},
    {"{\"inputs\":[],\"outputs\":{}}", 400, "outputs: expected an array, got an object"},
    {"{\"inputs\":[],\"outputs\":[{}]}", 400, "outputs[0].name: required"},
    {"{\"inputs\":[],\"outputs\":[{\"name\":\"y\"},{\"name\":\"y\"}]}", 400,
     "outputs[1].name: output 'y' requested more than once"},
    {"{\"inputs\":[],\"outputs\":[{\"name\":\"y\",\"parameters\":{\"binary_data\":1}}]}", 400,
     "outputs[0].parameters.binary_data: expected true or false, got 1"},
    {"{\"inputs\":[],\"outputs\":[{\"name\":\"y\",\"parameters\":{\"classification\":2}}]}", 400,
     "outputs[0].parameters.classification: classification outputs are not supported"},
};

/* 65 levels of arrays under an unknown key, and in a data array. */
/* Names and the id live in the decoded request's own storage while they fit
 * (KEEL__V2_STRS bytes) and are allocated past it; one input needs no array allocation, more
 * do. Every name must come back intact either way (and ASan finds a wrong free). */
static void test_names_past_own_storage(void **state)
{
    char body[4096];
    char id[301];
    char names[6][81];
    size_t len;
    keel__v2_request r;

    (void)state;
    memset(id, 'i', sizeof(id) - 1);
    id[sizeof(id) - 1] = '\0';
    for (int i = 0; i < 6; i++) {
        memset(names[i], 'a' + i, sizeof(names[i]) - 1);
        names[i][sizeof(names[i]) - 1] = '\0';
    }
    len = (size_t)snprintf(body, sizeof(body), "{\"inputs\":[");
    for (int i = 0; i < 6; i++)
        len += (size_t)snprintf(body + len, sizeof(body) - len,
                                "%s{\"name\":\"%s\",\"shape\":[1],\"datatype\":\"INT32\","
                                "\"data\":[%d]}",
                                i ? "," : "", names[i], i);
    len += (size_t)snprintf(body + len, sizeof(body) - len, "],\"id\":\"%s\"}", id);
    assert_true(len < sizeof(body));
    decode_ok(body, &r);
    assert_int_equal(r.ninputs, 6);
    for (int i = 0; i < 6; i++) {
        int32_t v;
        assert_string_equal(r.inputs[i].name, names[i]);
        memcpy(&v, r.inputs[i].data, sizeof(v));
        assert_int_equal(v, i);
    }
    assert_string_equal(r.info.id, id);
    keel__v2_request_fini(&r);

    /* One input, a short name and id: all of it in the request's own storage. */
    decode_ok("{\"id\":\"q\",\"inputs\":[{\"name\":\"x\",\"shape\":[1],"
              "\"datatype\":\"INT32\",\"data\":[7]}]}",
              &r);
    assert_true(r.inputs == &r.one);
    assert_string_equal(r.inputs[0].name, "x");
    assert_string_equal(r.info.id, "q");
    assert_true(r.info.id >= r.strs && r.info.id < r.strs + sizeof(r.strs));
    keel__v2_request_fini(&r);
}

static void test_too_deep(void **state)
{
    keel__v2_request r;
    char body[512];
    char *b2;
    char deep[200];
    size_t o = 0;

    (void)state;
    for (int i = 0; i < 65; i++)
        deep[o++] = '[';
    for (int i = 0; i < 65; i++)
        deep[o++] = ']';
    deep[o] = '\0';
    snprintf(body, sizeof(body), "{\"inputs\":[],\"extra\":%s}", deep);
    assert_int_equal(decode(body, &r), 400);
    assert_non_null(strstr(errbuf, "nested too deeply"));
    b2 = one_input("FP32", "[0]", deep);
    assert_int_equal(decode(b2, &r), 400);
    assert_non_null(strstr(errbuf, "inputs[0].data["));
    assert_non_null(strstr(errbuf, "nested too deeply"));
    free(b2);
    /* 60 levels inside data are fine (64 with the enclosing object and arrays). */
    o = 0;
    for (int i = 0; i < 60; i++)
        deep[o++] = '[';
    deep[o++] = '7';
    for (int i = 0; i < 60; i++)
        deep[o++] = ']';
    deep[o] = '\0';
    b2 = one_input("INT32", "[1]", deep);
    decode_ok(b2, &r);
    assert_int_equal(*(const int32_t *)r.inputs[0].data, 7);
    keel__v2_request_fini(&r);
    free(b2);
}

static void test_malformed(void **state)
{
    size_t n = sizeof(bad_cases) / sizeof(bad_cases[0]);

    (void)state;
    assert_true(n >= 40);
    for (size_t i = 0; i < n; i++) {
        keel__v2_request r;
        int st = decode(bad_cases[i].body, &r);
        if (st != bad_cases[i].status || strstr(errbuf, bad_cases[i].msg) == NULL)
            fail_msg("case %zu: body %s\n  got %d \"%s\"\n  want %d \"...%s...\"", i,
                     bad_cases[i].body, st, errbuf, bad_cases[i].status, bad_cases[i].msg);
        if (st == 200)
            keel__v2_request_fini(&r);
    }
}

/* Each bad case still fails the same way when decoded from a copy with no NUL after it, and a
 * short error buffer gets a terminated prefix of the message. */
static void test_malformed_unterminated_and_short_err(void **state)
{
    size_t n = sizeof(bad_cases) / sizeof(bad_cases[0]);

    (void)state;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(bad_cases[i].body);
        char *copy = malloc(len + 1);
        char small[12];
        keel__v2_request r;
        int st;

        memcpy(copy, bad_cases[i].body, len);
        copy[len] = '}'; /* not part of the body */
        st = decode_n(copy, len, NOHDR, &r);
        assert_int_equal(st, bad_cases[i].status);
        memset(small, 'x', sizeof(small));
        st = keel__v2_decode(copy, len, NOHDR, &r, small, sizeof(small));
        assert_int_equal(st, bad_cases[i].status);
        assert_non_null(memchr(small, '\0', sizeof(small)));
        free(copy);
    }
}

static void test_header_length(void **state)
{
    keel__v2_request r;
    const char *body = "{\"inputs\":[]}";

    (void)state;
    assert_int_equal(decode_n(body, strlen(body), strlen(body) + 1, &r), 400);
    assert_non_null(strstr(errbuf, "Inference-Header-Content-Length is 14 but the body has only "
                                   "13 bytes"));
    /* The JSON stops at the header length: the rest is binary, not JSON. */
    assert_int_equal(decode_n(body, strlen(body), 5, &r), 400);
    assert_non_null(strstr(errbuf, "invalid JSON at byte 5"));
    /* Binary section present but unused. */
    assert_int_equal(decode_n("{\"inputs\":[]}xyz", 16, 13, &r), 400);
    assert_non_null(strstr(errbuf, "the binary section has 3 bytes but the inputs' "
                                   "binary_data_size add up to 0"));
    /* Header present, binary section empty: fine. */
    assert_int_equal(decode_n(body, strlen(body), strlen(body), &r), 200);
    keel__v2_request_fini(&r);
}

/* ---------------------------------------------------------------- datatypes */

static const keel__v2_tensor *only_input(const keel__v2_request *r, keel_datatype dt, size_t n)
{
    assert_int_equal(r->ninputs, 1);
    assert_string_equal(r->inputs[0].name, "x");
    assert_int_equal(r->inputs[0].datatype, dt);
    assert_int_equal(r->inputs[0].count, n);
    assert_true(r->inputs[0].owned);
    assert_false(r->inputs[0].binary);
    return &r->inputs[0];
}

static void test_integer_types(void **state)
{
    keel__v2_request r;
    char *b;

    (void)state;
    b = one_input("UINT8", "[3]", "[0,255,-0]");
    decode_ok(b, &r);
    {
        const uint8_t *v = only_input(&r, KEEL_TYPE_UINT8, 3)->data;
        assert_int_equal(r.inputs[0].bytes, 3);
        assert_int_equal(v[0], 0);
        assert_int_equal(v[1], 255);
        assert_int_equal(v[2], 0);
    }
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("UINT16", "[2]", "[65535,7]");
    decode_ok(b, &r);
    assert_int_equal(((const uint16_t *)only_input(&r, KEEL_TYPE_UINT16, 2)->data)[0], 65535);
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("UINT32", "[1]", "[4294967295]");
    decode_ok(b, &r);
    assert_int_equal(((const uint32_t *)only_input(&r, KEEL_TYPE_UINT32, 1)->data)[0], 4294967295u);
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("UINT64", "[2]", "[18446744073709551615, 12345678901234567890]");
    decode_ok(b, &r);
    {
        const uint64_t *v = only_input(&r, KEEL_TYPE_UINT64, 2)->data;
        assert_true(v[0] == UINT64_MAX);
        assert_true(v[1] == UINT64_C(12345678901234567890));
    }
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("INT8", "[2]", "[-128,127]");
    decode_ok(b, &r);
    assert_int_equal(((const int8_t *)only_input(&r, KEEL_TYPE_INT8, 2)->data)[0], -128);
    assert_int_equal(((const int8_t *)r.inputs[0].data)[1], 127);
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("INT16", "[2]", "[-32768,32767]");
    decode_ok(b, &r);
    assert_int_equal(((const int16_t *)only_input(&r, KEEL_TYPE_INT16, 2)->data)[0], -32768);
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("INT32", "[2]", "[-2147483648,2147483647]");
    decode_ok(b, &r);
    assert_int_equal(((const int32_t *)only_input(&r, KEEL_TYPE_INT32, 2)->data)[0], INT32_MIN);
    assert_int_equal(((const int32_t *)r.inputs[0].data)[1], INT32_MAX);
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("INT64", "[2]", "[-9223372036854775808,9223372036854775807]");
    decode_ok(b, &r);
    assert_true(((const int64_t *)only_input(&r, KEEL_TYPE_INT64, 2)->data)[0] == INT64_MIN);
    assert_true(((const int64_t *)r.inputs[0].data)[1] == INT64_MAX);
    keel__v2_request_fini(&r);
    free(b);

    b = one_input("INT32", "[1]", "[2147483648]");
    assert_int_equal(decode(b, &r), 400);
    assert_non_null(strstr(errbuf, "2147483648 is out of range for datatype INT32"));
    free(b);
}

static void test_bool_and_bytes(void **state)
{
    keel__v2_request r;
    char *b;
    const unsigned char *p;

    (void)state;
    b = one_input("BOOL", "[3]", "[true, false ,true]");
    decode_ok(b, &r);
    p = only_input(&r, KEEL_TYPE_BOOL, 3)->data;
    assert_int_equal(r.inputs[0].bytes, 3);
    assert_int_equal(p[0], 1);
    assert_int_equal(p[1], 0);
    assert_int_equal(p[2], 1);
    keel__v2_request_fini(&r);
    free(b);

    /* Escapes, a surrogate pair, an embedded NUL and an empty string, in keel's layout. */
    b = one_input("BYTES", "[2,2]",
                  "[[\"abc\",\"\"],[\"\\u00e9\\ud83d\\ude00\\n\",\"a\\u0000b\\\"\\\\/\"]]");
    decode_ok(b, &r);
    {
        static const unsigned char want[] = {3, 0, 0, 0, 'a',  'b',  'c',  0,    0,    0,    0,
                                             7, 0, 0, 0, 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80, '\n',
                                             6, 0, 0, 0, 'a',  0,    'b',  '"',  '\\', '/'};
        const keel__v2_tensor *t = only_input(&r, KEEL_TYPE_BYTES, 4);
        assert_int_equal(t->bytes, sizeof(want));
        assert_memory_equal(t->data, want, sizeof(want));
    }
    keel__v2_request_fini(&r);
    free(b);

    /* Raw UTF-8 passes through unchanged. */
    b = one_input("BYTES", "[1]", "[\"\xE2\x82\xAC \xF0\x9F\x98\x80\"]");
    decode_ok(b, &r);
    assert_int_equal(r.inputs[0].bytes, 4 + 8);
    assert_memory_equal((const char *)r.inputs[0].data + 4, "\xE2\x82\xAC \xF0\x9F\x98\x80", 8);
    keel__v2_request_fini(&r);
    free(b);
}

/* A string's plain runs are scanned 16 bytes at a time (v2codec.c plain_run): an escape, a
 * raw UTF-8 sequence or a control character at every position of strings of every length
 * around that step must decode (or fail) exactly as byte by byte. */
static void test_string_scan_positions(void **state)
{
    static const struct {
        const char *json; /* as written in the JSON string */
        const char *raw;  /* decoded bytes; NULL: the string is refused */
    } special[] = {
        {"\\n", "\n"}, {"\\\"", "\""}, {"\xC3\xA9", "\xC3\xA9"}, {"\x01", NULL}, {"\xC3", NULL}};
    (void)state;
    for (size_t sp = 0; sp < sizeof(special) / sizeof(special[0]); sp++) {
        for (size_t len = 0; len <= 40; len++) {
            for (size_t k = 0; k <= len; k++) {
                char str[128], want[128], data[160];
                size_t n = 0, wn = 0;
                keel__v2_request r;
                char *b;
                int st;

                for (size_t i = 0; i < k; i++)
                    str[n++] = want[wn++] = (char)('a' + i % 26);
                memcpy(str + n, special[sp].json, strlen(special[sp].json));
                n += strlen(special[sp].json);
                if (special[sp].raw != NULL) {
                    memcpy(want + wn, special[sp].raw, strlen(special[sp].raw));
                    wn += strlen(special[sp].raw);
                }
                for (size_t i = k; i < len; i++)
                    str[n++] = want[wn++] = (char)('A' + i % 26);
                str[n] = '\0';
                /* As a BYTES element (near the body's end) and as the input's name. */
                snprintf(data, sizeof(data), "[\"%s\"]", str);
                for (int as_name = 0; as_name < 2; as_name++) {
                    if (as_name) {
                        b = malloc(256);
                        assert_non_null(b);
                        snprintf(b, 256,
                                 "{\"inputs\":[{\"name\":\"%s\",\"shape\":[1],"
                                 "\"datatype\":\"FP32\",\"data\":[1]}]}",
                                 str);
                    } else {
                        b = one_input("BYTES", "[1]", data);
                    }
                    st = decode(b, &r);
                    if (special[sp].raw == NULL) {
                        if (st == 200)
                            fail_msg("special %zu at %zu of %zu: accepted", sp, k, len);
                        assert_non_null(strstr(errbuf, "in a string"));
                    } else {
                        if (st != 200)
                            fail_msg("special %zu at %zu of %zu: %s", sp, k, len, errbuf);
                        if (as_name) {
                            assert_int_equal(strlen(r.inputs[0].name), wn);
                            assert_memory_equal(r.inputs[0].name, want, wn);
                        } else {
                            assert_int_equal(r.inputs[0].bytes, 4 + wn);
                            assert_memory_equal((const char *)r.inputs[0].data + 4, want, wn);
                        }
                        keel__v2_request_fini(&r);
                    }
                    free(b);
                }
            }
        }
    }
}

static void test_float_types(void **state)
{
    static const char *texts[] = {"0.708333",
                                  "-0.320755",
                                  "1",
                                  "-1",
                                  "1.5e-3",
                                  "0",
                                  "-0",
                                  "3.4028235e38",
                                  "1e-45",
                                  "1.17549435E-38",
                                  "123456789012",
                                  "0.1",
                                  "16777217",
                                  "2.5e-320",
                                  "1e-50"};
    size_t n = sizeof(texts) / sizeof(texts[0]);
    char data[512];
    size_t o = 0;
    keel__v2_request r;
    char *b;

    (void)state;
    o += (size_t)snprintf(data + o, sizeof(data) - o, "[");
    for (size_t i = 0; i < n; i++)
        o += (size_t)snprintf(data + o, sizeof(data) - o, "%s%s", i ? "," : "", texts[i]);
    snprintf(data + o, sizeof(data) - o, "]");

    b = one_input("FP64", "[15]", data);
    decode_ok(b, &r);
    for (size_t i = 0; i < n; i++) {
        double want = strtod(texts[i], NULL);
        assert_memory_equal((const double *)r.inputs[0].data + i, &want, 8);
    }
    keel__v2_request_fini(&r);
    free(b);

    /* FP32: 2.5e-320 underflows to 0 like strtof does. */
    b = one_input("FP32", "[15]", data);
    decode_ok(b, &r);
    for (size_t i = 0; i < n; i++) {
        float want = strtof(texts[i], NULL);
        if (memcmp((const float *)r.inputs[0].data + i, &want, 4) != 0)
            fail_msg("%s: got %a want %a", texts[i], (double)((const float *)r.inputs[0].data)[i],
                     (double)want);
    }
    keel__v2_request_fini(&r);
    free(b);

    /* FP16: round to nearest even, subnormals, the largest finite value, signed zero. */
    b = one_input("FP16", "[9]",
                  "[1, 0.1, 65504, 65519.99, 5.960464477539063e-8, 2.98023223876953125e-8, -0, "
                  "-2, 1.00048828125]");
    decode_ok(b, &r);
    {
        static const uint16_t want[] = {0x3c00, 0x2e66, 0x7bff, 0x7bff, 0x0001,
                                        0x0000, 0x8000, 0xc000, 0x3c00};
        const uint16_t *h = only_input(&r, KEEL_TYPE_FP16, 9)->data;
        for (size_t i = 0; i < 9; i++) {
            if (h[i] != want[i])
                fail_msg("FP16 element %zu: got %04x want %04x", i, h[i], want[i]);
        }
    }
    keel__v2_request_fini(&r);
    free(b);
}

static void test_nested_and_order(void **state)
{
    keel__v2_request r;
    const char *body =
        "{\"id\":\"req-1\",\"outputs\":[{\"name\":\"b\",\"parameters\":{\"binary_data\":true}},"
        "{\"name\":\"a\"}],\"inputs\":["
        /* data before shape and datatype: decoded after the object */
        "{\"data\":[[1,2,3],[4,5,6]],\"name\":\"x\",\"datatype\":\"INT32\",\"shape\":[2,3]},"
        /* any nesting whose flattened count matches is accepted, as Triton does */
        "{\"name\":\"y\",\"shape\":[2,2],\"datatype\":\"FP32\",\"data\":[[1],[[2,3]],[],4],"
        "\"unknown\":{\"k\":[1,{\"z\":null}]}},"
        "{\"name\":\"z\",\"shape\":[0,3],\"datatype\":\"FP32\",\"data\":[]},"
        "{\"name\":\"w\",\"shape\":[0],\"datatype\":\"BYTES\",\"data\":[[],[]]}],"
        "\"parameters\":{\"timeout\":1500,\"binary_data_output\":false,\"s\":\"v\",\"n\":-1.5e3,"
        "\"t\":true,\"f\":false}}";
    static const int32_t want_x[] = {1, 2, 3, 4, 5, 6};
    static const float want_y[] = {1, 2, 3, 4};

    (void)state;
    decode_ok(body, &r);
    assert_int_equal(r.ninputs, 4);
    assert_string_equal(r.inputs[0].name, "x");
    assert_int_equal(r.inputs[0].ndim, 2);
    assert_int_equal(r.inputs[0].shape[0], 2);
    assert_int_equal(r.inputs[0].shape[1], 3);
    assert_int_equal(r.inputs[0].bytes, sizeof(want_x));
    assert_memory_equal(r.inputs[0].data, want_x, sizeof(want_x));
    assert_string_equal(r.inputs[1].name, "y");
    assert_memory_equal(r.inputs[1].data, want_y, sizeof(want_y));
    assert_int_equal(r.inputs[2].count, 0);
    assert_int_equal(r.inputs[2].bytes, 0);
    assert_int_equal(r.inputs[3].bytes, 0);
    assert_string_equal(r.info.id, "req-1");
    assert_int_equal(r.info.noutputs, 2);
    assert_string_equal(r.info.outputs[0].name, "b");
    assert_true(r.info.outputs[0].binary_given && r.info.outputs[0].binary);
    assert_string_equal(r.info.outputs[1].name, "a");
    assert_false(r.info.outputs[1].binary_given);
    assert_true(r.has_timeout);
    assert_int_equal(r.info.timeout_us, 1500);
    assert_false(r.info.binary_data_output);
    assert_int_equal(r.nparams, 4);
    assert_string_equal(r.params[0].key, "s");
    assert_string_equal(r.params[0].value, "v");
    assert_string_equal(r.params[1].key, "n");
    assert_string_equal(r.params[1].value, "-1.5e3");
    assert_string_equal(r.params[2].value, "true");
    assert_string_equal(r.params[3].value, "false");
    keel__v2_request_fini(&r);
}

/* ---------------------------------------------------------------- binary extension */

static char *binary_body(const char *json, const void *bin, size_t binlen, size_t *len)
{
    size_t jl = strlen(json);
    char *b = malloc(jl + binlen + 1);

    memcpy(b, json, jl);
    memcpy(b + jl, bin, binlen);
    *len = jl + binlen;
    return b;
}

static void test_binary_inputs(void **state)
{
    const char *json = "{\"inputs\":[{\"name\":\"a\",\"shape\":[3],\"datatype\":\"FP32\","
                       "\"parameters\":{\"binary_data_size\":12}},"
                       "{\"name\":\"j\",\"shape\":[1],\"datatype\":\"INT8\",\"data\":[5]},"
                       "{\"name\":\"s\",\"shape\":[2],\"datatype\":\"BYTES\","
                       "\"parameters\":{\"binary_data_size\":11,\"other\":\"ignored\"}},"
                       "{\"name\":\"e\",\"shape\":[0],\"datatype\":\"FP64\",\"parameters\":{"
                       "\"binary_data_size\":0}}"
                       "]}";
    float a[3] = {1.5f, NAN, -INFINITY};
    unsigned char bin[23];
    size_t len;
    char *body;
    keel__v2_request r;

    (void)state;
    memcpy(bin, a, 12);
    memcpy(bin + 12, "\x02\x00\x00\x00hi\x01\x00\x00\x00\xff", 11);
    body = binary_body(json, bin, sizeof(bin), &len);
    assert_int_equal(decode_n(body, len, strlen(json), &r), 200);
    assert_int_equal(r.ninputs, 4);
    /* Slices of the body in input order; JSON inputs in between take none. */
    assert_true(r.inputs[0].binary && !r.inputs[0].owned);
    assert_ptr_equal(r.inputs[0].data, body + strlen(json));
    assert_int_equal(r.inputs[0].bytes, 12);
    assert_false(r.inputs[1].binary);
    assert_int_equal(*(const int8_t *)r.inputs[1].data, 5);
    assert_ptr_equal(r.inputs[2].data, body + strlen(json) + 12);
    assert_int_equal(r.inputs[2].bytes, 11);
    assert_int_equal(r.inputs[3].bytes, 0);
    keel__v2_request_fini(&r);

    /* Sizes that do not add up to the section, in either direction. */
    assert_int_equal(decode_n(body, len - 1, strlen(json), &r), 400);
    assert_non_null(strstr(errbuf, "inputs[2].parameters.binary_data_size: input 's': 11 bytes "
                                   "from offset 12 run past the end of the 22-byte binary "
                                   "section"));
    free(body);
    body = binary_body(json, bin, sizeof(bin), &len);
    body = realloc(body, len + 1);
    body[len] = 'x';
    assert_int_equal(decode_n(body, len + 1, strlen(json), &r), 400);
    assert_non_null(strstr(errbuf, "the binary section has 24 bytes but the inputs' "
                                   "binary_data_size add up to 23"));
    free(body);

    /* A size that does not match shape x datatype names the input. */
    {
        const char *j2 = "{\"inputs\":[{\"name\":\"a\",\"shape\":[3],\"datatype\":\"FP32\","
                         "\"parameters\":{\"binary_data_size\":8}}]}";
        body = binary_body(j2, bin, 8, &len);
        assert_int_equal(decode_n(body, len, strlen(j2), &r), 400);
        assert_non_null(strstr(errbuf, "inputs[0].parameters.binary_data_size: input 'a': 8 bytes "
                                       "given, shape [3] of FP32 needs 3 elements of 4 bytes"));
        free(body);
    }
    /* BYTES framing is checked: 2 elements declared, the bytes hold 1 and a half. */
    {
        const char *j3 = "{\"inputs\":[{\"name\":\"s\",\"shape\":[2],\"datatype\":\"BYTES\","
                         "\"parameters\":{\"binary_data_size\":9}}]}";
        body = binary_body(j3, "\x02\x00\x00\x00hi\x01\x00\x00", 9, &len);
        assert_int_equal(decode_n(body, len, strlen(j3), &r), 400);
        assert_non_null(strstr(errbuf, "input 's': the 9 bytes are not exactly 2 length-prefixed "
                                       "BYTES elements"));
        free(body);
    }
    /* data and binary_data_size together. */
    {
        const char *j4 = "{\"inputs\":[{\"name\":\"a\",\"shape\":[1],\"datatype\":\"FP32\","
                         "\"data\":[1],\"parameters\":{\"binary_data_size\":4}}]}";
        body = binary_body(j4, bin, 4, &len);
        assert_int_equal(decode_n(body, len, strlen(j4), &r), 400);
        assert_non_null(strstr(errbuf, "inputs[0]: both \"data\" and"));
        free(body);
    }
}

/* ---------------------------------------------------------------- encoding */

static json_t *parse_json(const char *text, size_t len)
{
    json_error_t e;
    json_t *j = json_loadb(text, len, 0, &e);

    if (j == NULL)
        fail_msg("response is not JSON: %s (%s)", e.text, text);
    return j;
}

static void test_encode_json(void **state)
{
    static const float f[6] = {0.708333f, -0.320755f, 1.0f, 1.5e-3f, 3.4028235e38f, 1e-45f};
    static const float special[4] = {NAN, INFINITY, -INFINITY, -0.0f};
    static const int64_t i64[2] = {INT64_MIN, INT64_MAX};
    static const uint8_t bools[3] = {1, 0, 2};
    static const uint16_t halves[3] = {0x3c00, 0x2e66, 0x7c00};
    static const double dbl[2] = {0.1, -1e300};
    static const unsigned char strs[] = "\x05\x00\x00\x00q\"\\\n\x01\x00\x00\x00\x00";
    int64_t s23[2] = {2, 3}, s4[1] = {4}, s2[1] = {2}, s3[1] = {3};
    keel_tensor_view v[7] = {
        {"f", KEEL_TYPE_FP32, s23, 2, f, sizeof(f)},
        {"sp", KEEL_TYPE_FP32, s4, 1, special, sizeof(special)},
        {"i", KEEL_TYPE_INT64, s2, 1, i64, sizeof(i64)},
        {"b", KEEL_TYPE_BOOL, s3, 1, bools, sizeof(bools)},
        {"h", KEEL_TYPE_FP16, s3, 1, halves, sizeof(halves)},
        {"d", KEEL_TYPE_FP64, s2, 1, dbl, sizeof(dbl)},
        {"s\xff", KEEL_TYPE_BYTES, s2, 1, strs, 13},
    };
    keel_v2_response resp;
    char err[256];

    (void)state;
    assert_int_equal(keel__v2_encode("m\"1", 3, "id\n", v, NULL, 7, &resp, err, sizeof(err)), 0);
    assert_false(resp.has_binary);
    assert_int_equal(resp.json_len, resp.body_len);
    assert_int_equal(strlen(resp.body), resp.body_len);
    assert_string_equal(
        resp.body,
        "{\"model_name\":\"m\\\"1\",\"model_version\":\"3\",\"id\":\"id\\n\",\"outputs\":["
        "{\"name\":\"f\",\"datatype\":\"FP32\",\"shape\":[2,3],"
        "\"data\":[0.708333,-0.320755,1,0.0015,3.4028235e+38,1.4013e-45]},"
        "{\"name\":\"sp\",\"datatype\":\"FP32\",\"shape\":[4],\"data\":[null,null,null,-0]},"
        "{\"name\":\"i\",\"datatype\":\"INT64\",\"shape\":[2],"
        "\"data\":[-9223372036854775808,9223372036854775807]},"
        "{\"name\":\"b\",\"datatype\":\"BOOL\",\"shape\":[3],\"data\":[true,false,true]},"
        "{\"name\":\"h\",\"datatype\":\"FP16\",\"shape\":[3],\"data\":[1,0.1,null]},"
        "{\"name\":\"d\",\"datatype\":\"FP64\",\"shape\":[2],\"data\":[0.1,-1e+300]},"
        "{\"name\":\"s\xEF\xBF\xBD\",\"datatype\":\"BYTES\",\"shape\":[2],"
        "\"data\":[\"q\\\"\\\\\\n\\u0001\",\"\"]}]}");
    json_decref(parse_json(resp.body, resp.body_len));
    free(resp.body);

    /* Inconsistent tensors are a 500, not a crash. */
    v[0].bytes = 20;
    assert_int_equal(keel__v2_encode("m", 1, NULL, v, NULL, 1, &resp, err, sizeof(err)), 500);
    assert_non_null(strstr(err, "output 'f': 20 bytes for 6 elements of FP32"));
    assert_null(resp.body);
    v[6].bytes = 12;
    assert_int_equal(keel__v2_encode("m", 1, NULL, v + 6, NULL, 1, &resp, err, sizeof(err)), 500);
    assert_non_null(strstr(err, "BYTES data is not 2 length-prefixed elements"));
}

static void test_encode_binary(void **state)
{
    static const float f[2] = {1.0f, NAN};
    static const int32_t i[1] = {7};
    static const unsigned char bad_utf8[] = {2, 0, 0, 0, 0xC3, 0x28};
    int64_t s2[1] = {2}, s1[1] = {1};
    keel_tensor_view v[3] = {
        {"f", KEEL_TYPE_FP32, s2, 1, f, sizeof(f)},
        {"i", KEEL_TYPE_INT32, s1, 1, i, sizeof(i)},
        {"s", KEEL_TYPE_BYTES, s1, 1, bad_utf8, sizeof(bad_utf8)},
    };
    bool binary[3] = {true, false, false};
    keel_v2_response resp;
    char err[256];
    const char *want_json = "{\"model_name\":\"m\",\"model_version\":\"1\",\"outputs\":["
                            "{\"name\":\"f\",\"datatype\":\"FP32\",\"shape\":[2],"
                            "\"parameters\":{\"binary_data_size\":8}},"
                            "{\"name\":\"i\",\"datatype\":\"INT32\",\"shape\":[1],\"data\":[7]},"
                            "{\"name\":\"s\",\"datatype\":\"BYTES\",\"shape\":[1],"
                            "\"parameters\":{\"binary_data_size\":6}}]}";

    (void)state;
    /* The BYTES output is not UTF-8, so it goes binary although not asked to. */
    assert_int_equal(keel__v2_encode("m", 1, NULL, v, binary, 3, &resp, err, sizeof(err)), 0);
    assert_true(resp.has_binary);
    assert_int_equal(resp.json_len, strlen(want_json));
    assert_memory_equal(resp.body, want_json, resp.json_len);
    assert_int_equal(resp.body_len, resp.json_len + 8 + 6);
    assert_memory_equal(resp.body + resp.json_len, f, 8);
    assert_memory_equal(resp.body + resp.json_len + 8, bad_utf8, 6);
    json_decref(parse_json(resp.body, resp.json_len));
    free(resp.body);
}

static void test_error_json(void **state)
{
    char *s = keel_v2_error_json("inputs[0].name: bad \"x\"\\\n\x01\xff");
    json_t *j;

    (void)state;
    assert_non_null(s);
    assert_string_equal(s,
                        "{\"error\":\"inputs[0].name: bad \\\"x\\\"\\\\\\n\\u0001\xEF\xBF\xBD\"}");
    j = parse_json(s, strlen(s));
    assert_string_equal(json_string_value(json_object_get(j, "error")),
                        "inputs[0].name: bad \"x\"\\\n\x01\xEF\xBF\xBD");
    json_decref(j);
    free(s);
}

/*
 * Round trip: decode a request, encode its inputs as outputs (binary ones in the binary
 * section), turn the response into a request by renaming "outputs" to "inputs", decode again,
 * and compare every tensor byte for byte.
 */
static void roundtrip(const char *body, size_t len, size_t header_len)
{
    static const char prefix[] = "{\"model_name\":\"m\",\"model_version\":\"1\",\"outputs\":";
    keel__v2_request r1, r2;
    keel_tensor_view *v;
    bool *bin;
    keel_v2_response resp;
    char err[256];
    char *again;
    size_t alen, hl;

    assert_int_equal(decode_n(body, len, header_len, &r1), 200);
    v = calloc(r1.ninputs + 1, sizeof(*v));
    bin = calloc(r1.ninputs + 1, sizeof(*bin));
    for (size_t i = 0; i < r1.ninputs; i++) {
        const keel__v2_tensor *t = &r1.inputs[i];
        v[i] = (keel_tensor_view){t->name, t->datatype, t->shape, t->ndim, t->data, t->bytes};
        bin[i] = t->binary;
    }
    assert_int_equal(keel__v2_encode("m", 1, NULL, v, bin, r1.ninputs, &resp, err, sizeof(err)), 0);
    assert_memory_equal(resp.body, prefix, strlen(prefix));
    alen = resp.body_len - strlen(prefix) + strlen("{\"inputs\":");
    again = malloc(alen + 1);
    memcpy(again, "{\"inputs\":", strlen("{\"inputs\":"));
    memcpy(again + strlen("{\"inputs\":"), resp.body + strlen(prefix),
           resp.body_len - strlen(prefix) + 1);
    hl = resp.has_binary ? resp.json_len - strlen(prefix) + strlen("{\"inputs\":") : NOHDR;
    if (decode_n(again, alen, hl, &r2) != 200)
        fail_msg("re-decode failed: %s\n%s", errbuf, again);
    assert_int_equal(r2.ninputs, r1.ninputs);
    for (size_t i = 0; i < r1.ninputs; i++) {
        const keel__v2_tensor *a = &r1.inputs[i], *b = &r2.inputs[i];
        assert_string_equal(a->name, b->name);
        assert_int_equal(a->datatype, b->datatype);
        assert_int_equal(a->ndim, b->ndim);
        assert_memory_equal(a->shape, b->shape, a->ndim * sizeof(int64_t));
        assert_int_equal(a->bytes, b->bytes);
        if (a->bytes > 0 && memcmp(a->data, b->data, a->bytes) != 0)
            fail_msg("input '%s' (%s) changed in the round trip\n%s", a->name,
                     keel_datatype_name(a->datatype), resp.body);
    }
    keel__v2_request_fini(&r1);
    keel__v2_request_fini(&r2);
    free(resp.body);
    free(again);
    free(v);
    free(bin);
}

static void test_roundtrip_all_types(void **state)
{
    const char *body =
        "{\"inputs\":["
        "{\"name\":\"b\",\"shape\":[3],\"datatype\":\"BOOL\",\"data\":[true,false,true]},"
        "{\"name\":\"u8\",\"shape\":[2],\"datatype\":\"UINT8\",\"data\":[0,255]},"
        "{\"name\":\"u16\",\"shape\":[2],\"datatype\":\"UINT16\",\"data\":[1,65535]},"
        "{\"name\":\"u32\",\"shape\":[2],\"datatype\":\"UINT32\",\"data\":[2,4294967295]},"
        "{\"name\":\"u64\",\"shape\":[2],\"datatype\":\"UINT64\","
        "\"data\":[3,18446744073709551615]},"
        "{\"name\":\"i8\",\"shape\":[2],\"datatype\":\"INT8\",\"data\":[-128,127]},"
        "{\"name\":\"i16\",\"shape\":[2],\"datatype\":\"INT16\",\"data\":[-32768,32767]},"
        "{\"name\":\"i32\",\"shape\":[2],\"datatype\":\"INT32\",\"data\":[-2147483648,0]},"
        "{\"name\":\"i64\",\"shape\":[2],\"datatype\":\"INT64\","
        "\"data\":[-9223372036854775808,9223372036854775807]},"
        "{\"name\":\"f16\",\"shape\":[5],\"datatype\":\"FP16\","
        "\"data\":[0.1,-65504,6e-8,0.33325,-0]},"
        "{\"name\":\"f32\",\"shape\":[2,3],\"datatype\":\"FP32\","
        "\"data\":[[0.708333,-0.320755,1e-45],[3.4028235e38,0.1,-0]]},"
        "{\"name\":\"f64\",\"shape\":[3],\"datatype\":\"FP64\","
        "\"data\":[0.1,2.2250738585072014e-308,5e-324]},"
        "{\"name\":\"s\",\"shape\":[3],\"datatype\":\"BYTES\","
        "\"data\":[\"\",\"\\u0000\\u001f\\\"\",\"\xE2\x82\xAC\"]},"
        "{\"name\":\"empty\",\"shape\":[2,0],\"datatype\":\"FP32\",\"data\":[[],[]]}]}";
    const char *json = "{\"inputs\":[{\"name\":\"a\",\"shape\":[2],\"datatype\":\"FP32\","
                       "\"parameters\":{\"binary_data_size\":8}},"
                       "{\"name\":\"s\",\"shape\":[1],\"datatype\":\"BYTES\","
                       "\"parameters\":{\"binary_data_size\":6}},"
                       "{\"name\":\"c\",\"shape\":[1],\"datatype\":\"FP16\","
                       "\"parameters\":{\"binary_data_size\":2}}]}";
    unsigned char bin[16];
    float a[2] = {NAN, -INFINITY};
    uint16_t h = 0x7e00;
    char *b2;
    size_t len;

    (void)state;
    roundtrip(body, strlen(body), NOHDR);
    /* Binary inputs with values JSON cannot hold (NaN, inf, non-UTF-8) come back binary. */
    memcpy(bin, a, 8);
    memcpy(bin + 8, "\x02\x00\x00\x00\xC3\x28", 6);
    memcpy(bin + 14, &h, 2);
    b2 = binary_body(json, bin, sizeof(bin), &len);
    roundtrip(b2, len, strlen(json));
    free(b2);
}

/* ---------------------------------------------------------------- number properties */

static uint64_t rng_state = 0x9E3779B97F4A7C15u;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* A random JSON number: sign, 1..20 digits with an optional point, optional exponent. */
static void random_decimal(char *t)
{
    int nd = 1 + (int)(rnd() % 20);
    int point = (int)(rnd() % (unsigned)(nd + 1));
    char *q = t;

    if (rnd() & 1)
        *q++ = '-';
    if (point == 0 || rnd() % 4 == 0) { /* 0.xxx */
        *q++ = '0';
        *q++ = '.';
        for (int k = 0; k < nd; k++)
            *q++ = (char)('0' + rnd() % 10);
    } else {
        *q++ = (char)('1' + rnd() % 9);
        for (int k = 1; k < nd; k++) {
            if (k == point)
                *q++ = '.';
            *q++ = (char)('0' + rnd() % 10);
        }
    }
    *q = '\0';
    if (rnd() % 3 == 0)
        sprintf(q, "%c%s%d", rnd() & 1 ? 'e' : 'E',
                rnd() % 3 == 0 ? ""
                : rnd() & 1    ? "-"
                               : "+",
                (int)(rnd() % 50));
}

#ifdef KEEL__FF_HAVE_AVX2
/* The vector paths on t (the one-number path, and the pair path with t first and with t
 * second, next to "0.5"), each followed by a comma and padding as in a body. Each must either
 * decline or give exactly want (and want_ok must then hold). Returns how many of the three took
 * t. */
KEEL__FF_AVX2_TARGET static int vector_check(const char *t, float want, bool want_ok)
{
    char buf[192];
    size_t len = strlen(t);
    float f[2], g = 0.0f;
    int took = 0;

    assert_true(len + 64 < sizeof(buf));
    /* t,0.5, then spaces */
    memset(buf, ' ', sizeof(buf));
    memcpy(buf, t, len);
    memcpy(buf + len, ",0.5,", 5);
    if (keel__ff_f32_avx2(buf, buf + len, &g)) {
        if (!want_ok || memcmp(&g, &want, 4) != 0)
            fail_msg("'%s': vector path gives %a, strtof %a%s", t, (double)g, (double)want,
                     want_ok ? "" : " (should decline)");
        took++;
    }
    if (keel__ff_f32x2_avx2(buf, buf + len, buf + len + 1, buf + len + 4, f)) {
        if (!want_ok || memcmp(&f[0], &want, 4) != 0 || f[1] != 0.5f)
            fail_msg("'%s' (first of a pair): vector path gives %a, strtof %a%s", t, (double)f[0],
                     (double)want, want_ok ? "" : " (should decline)");
        took++;
    }
    /* 0.5,t, then spaces */
    memset(buf, ' ', sizeof(buf));
    memcpy(buf, "0.5,", 4);
    memcpy(buf + 4, t, len);
    buf[4 + len] = ',';
    if (keel__ff_f32x2_avx2(buf, buf + 3, buf + 4, buf + 4 + len, f)) {
        if (!want_ok || memcmp(&f[1], &want, 4) != 0 || f[0] != 0.5f)
            fail_msg("'%s' (second of a pair): vector path gives %a, strtof %a%s", t, (double)f[1],
                     (double)want, want_ok ? "" : " (should decline)");
        took++;
    }
    return took;
}
#endif

static void check_parse(const char *t)
{
    size_t len = strlen(t);
    keel__ff_num n, nf;
    const char *end = keel__ff_scan(t, t + len, &n);
    char padded[160];
    float f, wf;
    double d, wd;
    int st;

    if (end != t + len)
        fail_msg("%s: not scanned as one number", t);
    /* The SWAR scanner (used when 32 bytes follow) reads the same number the same way. */
    assert_true(len + 40 < sizeof(padded));
    memcpy(padded, t, len);
    memcpy(padded + len, ",0.5]}]}                                ", 40);
    if (keel__ff_scan_fast(padded, padded + len + 40, &nf) != padded + len)
        fail_msg("%s: the fast scanner stops elsewhere", t);
    if (nf.neg != n.neg || nf.integer != n.integer || nf.many != n.many ||
        (!n.many && (nf.m != n.m || nf.e != n.e)))
        fail_msg("%s: the fast scanner reads %" PRIu64 "e%" PRId64 ", the scanner %" PRIu64
                 "e%" PRId64,
                 t, nf.m, nf.e, n.m, n.e);
    st = keel__ff_to_f32(&nf, padded, len, &f);
    wf = strtof(t, NULL);
    if (isinf(wf) ? st != KEEL__FF_RANGE : (st != KEEL__FF_OK || memcmp(&f, &wf, 4) != 0))
        fail_msg("FP32 %s (fast scanner): got %a, strtof %a", t, (double)f, (double)wf);
    wf = strtof(t, NULL);
    st = keel__ff_to_f32(&n, t, len, &f);
    if (isinf(wf)) {
        assert_int_equal(st, KEEL__FF_RANGE);
    } else if (st != KEEL__FF_OK || memcmp(&f, &wf, 4) != 0) {
        fail_msg("FP32 %s: got %a, strtof %a", t, (double)f, (double)wf);
    }
#ifdef KEEL__FF_HAVE_AVX2
    if (keel__ff_simd_level() >= 1)
        (void)vector_check(t, wf, !isinf(wf));
#endif
    wd = strtod(t, NULL);
    st = keel__ff_to_f64(&n, t, len, &d);
    if (isinf(wd)) {
        assert_int_equal(st, KEEL__FF_RANGE);
    } else if (st != KEEL__FF_OK || memcmp(&d, &wd, 8) != 0) {
        fail_msg("FP64 %s: got %a, strtod %a", t, d, wd);
    }
}

/* The FP32 conversion is bit-identical to strtof on 2 million strings: random decimals (the
 * fast paths and their edges), the shortest form of random floats, and %.9g / %.17g of
 * random values. */
static void test_fp32_bit_identity(void **state)
{
    char t[80];

    (void)state;
    for (long i = 0; i < 2000000; i++) {
        switch (i % 4) {
        case 0:
        case 1:
            random_decimal(t);
            break;
        case 2: {
            uint32_t u = (uint32_t)rnd();
            float x;
            memcpy(&x, &u, 4);
            if (!isfinite(x))
                continue;
            keel__ff_format_f32(x, t);
            break;
        }
        default: {
            uint64_t u = rnd();
            double x;
            memcpy(&x, &u, 8);
            if (!isfinite(x))
                x = (double)(u >> 11) / 1e6;
            snprintf(t, sizeof(t), "%.*g", i % 8 == 3 ? 17 : 9, x);
            if (strchr(t, 'i') != NULL || strchr(t, 'n') != NULL)
                continue;
            break;
        }
        }
        check_parse(t);
    }
    /* Decimals whose nearest double is exactly halfway between two floats although they are
     * not: 0.xxxxxxxxxxxxxxxx (16 digits) nearest to a midpoint M = (2j+1) * 2^-25 in
     * [0.5, 0.9). Rounding through double would tie to even; strtof rounds toward the
     * decimal's side of M. M * 10^16 = (2j+1) * 5^16 / 2^9, exact in 64 bits. */
    for (int i = 0; i < 20000; i++) {
        uint64_t j = (UINT64_C(1) << 23) + rnd() % (UINT64_C(3) << 21);
        uint64_t num = (2 * j + 1) * UINT64_C(152587890625);
        uint64_t m = num / 512 + (num % 512 >= 256);
        snprintf(t, sizeof(t), "0.%016" PRIu64, m);
        check_parse(t);
    }
    /* The same in other binades and with other powers of ten: M = (2j+1) * 2^(b-24) for
     * b = -23..-1, written with 16 significant digits m * 10^-k (m < 2^53, k <= 22), so the
     * reciprocal path (m * 10^-k in double) must notice it may be on the wrong side of M. */
    for (int i = 0; i < 40000; i++) {
        int b = -1 - (int)(rnd() % 23);
        uint64_t odd = 2 * ((UINT64_C(1) << 23) + rnd() % (UINT64_C(1) << 23)) + 1;
        double M = ldexp((double)odd, b - 24);
        int k = 15 - (int)floor(log10(M));
        unsigned __int128 num = (unsigned __int128)odd, half;
        uint64_t m;
        for (int j = 0; j < k; j++)
            num *= 10;
        /* num / 2^(24 - b), rounded to nearest */
        half = (unsigned __int128)1 << (23 - b);
        m = (uint64_t)((num + half) >> (24 - b));
        if (k > 22 || m >= (UINT64_C(1) << 53))
            continue;
        snprintf(t, sizeof(t), "%" PRIu64 "e-%d", m, k);
        check_parse(t);
    }
    /* Hand-picked edges: ties, the fast-path limits, subnormals, overflow. */
    {
        static const char *edge[] = {"16777216",
                                     "16777217",
                                     "16777218",
                                     "9007199254740993",
                                     "1e10",
                                     "1e11",
                                     "1e22",
                                     "1e23",
                                     "1e-10",
                                     "1e-22",
                                     "1e-23",
                                     "3.4028235e38",
                                     "3.4028236e38",
                                     "3.40282357e38",
                                     "3.4028234664e38",
                                     "1.1754943e-38",
                                     "1.4e-45",
                                     "7e-46",
                                     "7.1e-46",
                                     "0.000000000000000000001",
                                     "123456789012345678901234567890",
                                     "1.00000000000000000000000001",
                                     "0.1000000000000000055511151231257827",
                                     "33554431",
                                     "33554433e-3",
                                     "4.5e15",
                                     "8388609.5",
                                     "1e0",
                                     "0e99999999999999",
                                     "0.7500000298023224"};
        for (size_t i = 0; i < sizeof(edge) / sizeof(edge[0]); i++)
            check_parse(edge[i]);
    }
}

/* Text that is not a JSON number, or only starts with one: both scanners stop at the same
 * place (NULL: no number at all). */
static void test_scanners_agree_on_invalid(void **state)
{
    static const char *bad[] = {"01",       "-01",         "00",
                                "-",        "--1",         "+1",
                                ".5",       "1.",          "1.e5",
                                "1e",       "1e+",         "1E-",
                                "0x10",     "1.5.5",       "-.5",
                                "1e5.5",    "123456789.5", "0.1234567890123456789",
                                "1e1234",   "-0",          "- 1",
                                "1 .5",     "NaN",         "Infinity",
                                "12345678", "0.12345678",  "0.1234567812345678x"};
    char padded[128];

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        size_t len = strlen(bad[i]);
        keel__ff_num a, b;
        const char *pa, *pb;

        memcpy(padded, bad[i], len);
        memset(padded + len, ']', 40);
        pa = keel__ff_scan(padded, padded + len + 40, &a);
        pb = keel__ff_scan_fast(padded, padded + len + 40, &b);
        if (pa != pb)
            fail_msg("'%s': scanner stops at %td, fast scanner at %td", bad[i],
                     pa ? pa - padded : -1, pb ? pb - padded : -1);
        if (pa != NULL && !a.many)
            assert_true(a.m == b.m && a.e == b.e && a.neg == b.neg && a.integer == b.integer);
    }
}

/* The vector path takes the common shapes (so a path that always declined would fail here)
 * and declines everything that is not a JSON number of its shape, leaving it to the scalar
 * scanner: text that is not JSON, whitespace before the separator, four-digit exponents, 16
 * digits, powers of ten beyond 10^22, values near a float midpoint. */
static void test_vector_path(void **state)
{
    static const char *takes[] = {"0.708333", "-0.320755", "1",           "-1",
                                  "1.5e-3",   "0",         "-0",          "0.70833296",
                                  "-1E+05",   "2e0",       "0.0",         "123456789012345",
                                  "1.5E-21",  "12e22",     "-0.00012345", "65504.25"};
    static const char *declines[] = {"01",
                                     "-01",
                                     "00",
                                     ".5",
                                     "1.",
                                     "1.e5",
                                     "1e",
                                     "1e+",
                                     "1E-",
                                     "--1",
                                     "- 1",
                                     "1 ",
                                     " 1",
                                     "1.5.5",
                                     "0x10",
                                     "1e1234",
                                     "1e-0001",
                                     "-",
                                     "",
                                     "+1",
                                     "1e5.5",
                                     "\"1\"",
                                     "[1]",
                                     "true",
                                     "NaN",
                                     "1e23",
                                     "1234567890123456",
                                     "0.1234567890123456",
                                     "1.5e-30",
                                     "1ee5",
                                     "1e--5",
                                     "1,5"};

    (void)state;
    if (keel__ff_simd_level() < 1) {
        print_message("no vector path on this CPU (AVX2, BMI1, BMI2, POPCNT)\n");
        skip();
    }
#ifdef KEEL__FF_HAVE_AVX2
    for (size_t i = 0; i < sizeof(takes) / sizeof(takes[0]); i++) {
        if (vector_check(takes[i], strtof(takes[i], NULL), true) != 3)
            fail_msg("'%s': the vector path declines it", takes[i]);
    }
    for (size_t i = 0; i < sizeof(declines) / sizeof(declines[0]); i++)
        (void)vector_check(declines[i], 0.0f, false);
    /* Near a midpoint: 16777217 (2^24 + 1) is exactly halfway between two floats; the vector
     * path must leave it (and its neighbours in the window) to the exact paths. */
    (void)vector_check("16777217", 0.0f, false);
    (void)vector_check("0.500000029802322387", 0.0f, false); /* 18 digits */
#endif
}

/* keel__v2_decode gives the same floats, statuses and messages with the vector path as with
 * the scalar path, on bodies of random numbers, separators and whitespace, with a wrong
 * element, a wrong count or a nested array now and then. */
static void test_flat_fp32_paths_agree(void **state)
{
    static const char *seps[] = {",", ", ", " , ", ",\n  ", ",\t"};
    static const char *wrong[] = {"01",       "1.",   "\"x\"", "[1]", "",   "1e",   "nan", "-",
                                  "1e-99999", "3e38", "4e38",  "1 2", "{}", "0.5]", "true"};
    char t[80];

    (void)state;
    for (int round = 0; round < 600; round++) {
        size_t n = 1 + rnd() % (round % 3 == 0 ? 600 : 60);
        size_t shape_n = n;
        char *data = NULL;
        size_t cap = n * 48 + 64, o = 0;
        char shape[48];
        char *body;
        keel__v2_request r0, r1;
        int st0, st1;
        char err0[512];
        float *want = malloc(n * sizeof(float));
        bool injected = false;

        assert_non_null(data = malloc(cap));
        assert_non_null(want);
        data[o++] = '[';
        if (rnd() % 8 == 0)
            data[o++] = ' ';
        for (size_t i = 0; i < n; i++) {
            switch (rnd() % 4) {
            case 0:
                random_decimal(t);
                break;
            case 1: {
                static const char *fixed[] = {"0.708333", "-0.320755", "1", "-1", "1.5e-3"};
                snprintf(t, sizeof(t), "%s", fixed[rnd() % 5]);
                break;
            }
            default: {
                float x = (float)((double)(rnd() % 2000001) / 1e6 - 1.0);
                keel__ff_format_f32(x, t);
                break;
            }
            }
            if (rnd() % 400 == 0) {
                snprintf(t, sizeof(t), "%s", wrong[rnd() % (sizeof(wrong) / sizeof(wrong[0]))]);
                injected = true;
            }
            want[i] = strtof(t, NULL);
            /* One separator throughout, or (every 6th body) any of them at each place. */
            o += (size_t)snprintf(data + o, cap - o, "%s%s",
                                  i == 0           ? ""
                                  : round % 6 == 5 ? seps[rnd() % 5]
                                                   : seps[round % 5],
                                  t);
        }
        if (rnd() % 10 == 0)
            data[o++] = ' ';
        data[o++] = ']';
        data[o] = '\0';
        if (rnd() % 50 == 0) {
            shape_n = n + (rnd() & 1 ? 1 : (size_t)-1);
            injected = true;
        }
        snprintf(shape, sizeof(shape), "[%zu]", shape_n);
        body = one_input("FP32", shape, data);

        keel__ff_simd_force(0);
        st0 = keel__v2_decode(body, strlen(body), NOHDR, &r0, err0, sizeof(err0));
        keel__ff_simd_force(-1);
        st1 = keel__v2_decode(body, strlen(body), NOHDR, &r1, errbuf, sizeof(errbuf));
        if (st0 != st1 || (st0 != 200 && strcmp(err0, errbuf) != 0))
            fail_msg("scalar %d '%s', vector %d '%s'\nbody: %s", st0, st0 == 200 ? "" : err0, st1,
                     st1 == 200 ? "" : errbuf, body);
        if (st0 == 200) {
            assert_int_equal(r0.inputs[0].bytes, r1.inputs[0].bytes);
            if (memcmp(r0.inputs[0].data, r1.inputs[0].data, r0.inputs[0].bytes) != 0)
                fail_msg("the paths decode different floats\nbody: %s", body);
            if (!injected && memcmp(r1.inputs[0].data, want, n * sizeof(float)) != 0)
                fail_msg("differs from strtof\nbody: %s", body);
            keel__v2_request_fini(&r0);
            keel__v2_request_fini(&r1);
        } else if (!injected) {
            /* Only a number out of FP32's range may fail a body built without a wrong element. */
            if (strstr(errbuf, "range") == NULL && strstr(errbuf, "FP32") == NULL)
                fail_msg("unexpected error %d '%s'\nbody: %s", st1, errbuf, body);
        }
        free(body);
        free(data);
        free(want);
    }
}

/* The printing of FP32 equals the loop "%.Pg for P = 6..9 until strtof round-trips". */
static void test_fp32_format(void **state)
{
    char a[64], b[64];

    (void)state;
    for (long i = 0; i < 400000; i++) {
        uint32_t u = (uint32_t)rnd();
        float x;
        int n = 0;

        if (i % 4 == 0)
            u = (u & 0x807fffffu) | (uint32_t)((120 + rnd() % 16) << 23); /* near 1 */
        memcpy(&x, &u, 4);
        if (!isfinite(x))
            continue;
        keel__ff_format_f32(x, a);
        for (int P = 6; P <= 9; P++) {
            n = snprintf(b, sizeof(b), "%.*g", P, (double)x);
            if (strtof(b, NULL) == x)
                break;
        }
        (void)n;
        if (strcmp(a, b) != 0)
            fail_msg("%a: got %s, want %s", (double)x, a, b);
        assert_true(strtof(a, NULL) == x);
    }
    /* Exact ties of the decimal rounding go through snprintf and agree with it. */
    keel__ff_format_f32(1234567.5f, a);
    assert_string_equal(a, "1234567.5");
    keel__ff_format_f32(0.5f, a);
    assert_string_equal(a, "0.5");
    keel__ff_format_f32(1e-5f, a);
    assert_string_equal(a, "1e-05");
    keel__ff_format_f32(-FLT_MAX, a);
    assert_string_equal(a, "-3.4028235e+38");
    keel__ff_format_f32(100000.0f, a);
    assert_string_equal(a, "100000");
    keel__ff_format_f32(1000000.0f, a);
    assert_string_equal(a, "1e+06");
}

/* Every half: FP16 printing equals "%.Pg for P = 3..5 until it converts back", and the
 * conversion from double agrees with the exact value of every half. */
static void test_fp16_all(void **state)
{
    char a[64], b[64];

    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        double x = keel__ff_f16_to_f64((uint16_t)h);
        if (!isfinite(x))
            continue;
        assert_int_equal(keel__ff_f64_to_f16(x), h);
        keel__ff_format_f16((uint16_t)h, a);
        for (int P = 3; P <= 5; P++) {
            snprintf(b, sizeof(b), "%.*g", P, x);
            if (keel__ff_f64_to_f16(strtod(b, NULL)) == h)
                break;
        }
        if (strcmp(a, b) != 0)
            fail_msg("half %04x: got %s want %s", h, a, b);
        /* Halfway to the next half rounds to the even one. */
        if ((h & 0x7fff) < 0x7bff) {
            double next = keel__ff_f16_to_f64((uint16_t)(h + 1));
            uint16_t r = keel__ff_f64_to_f16((x + next) / 2);
            assert_int_equal(r, (h & 1) ? h + 1 : h);
        }
    }
}

/* ---------------------------------------------------------------- through keel */

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
    f->repo = tu_mkdtemp("v2codec");
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

/* A JSON request through decode, the mock model (y = x), encode, and a JSON parser. */
static void test_end_to_end_json(void **state)
{
    fixture *f = *state;
    const char *body = "{\"id\":\"r1\",\"parameters\":{\"timeout\":5000000,\"priority\":1},"
                       "\"inputs\":[{\"name\":\"x\",\"shape\":[2,3],\"datatype\":\"FP32\","
                       "\"data\":[[0.708333,-0.320755,1],[-1,1.5e-3,3.4028235e38]]}],"
                       "\"outputs\":[{\"name\":\"y\"}]}";
    keel_request *req = NULL;
    keel_v2_request_info info;
    keel_v2_response resp;
    char err[256];
    json_t *j, *out;

    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_v2_decode_infer(req, body, strlen(body), NOHDR, &info, err, sizeof(err)),
                     200);
    assert_string_equal(info.id, "r1");
    assert_int_equal(info.timeout_us, 5000000);
    assert_string_equal(keel_request_id(req), "r1");
    /* timeout and priority are Triton's scheduling parameters: read, not passed on. */
    assert_int_equal(info.priority, 1);
    assert_null(keel_request_parameter(req, "priority"));
    assert_null(keel_request_parameter(req, "timeout"));
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_v2_encode_infer(req, "m", &info, &resp, err, sizeof(err)), 0);
    assert_false(resp.has_binary);
    assert_non_null(strstr(resp.body, "\"data\":[0.708333,-0.320755,1,-1,0.0015,3.4028235e+38]"));
    j = parse_json(resp.body, resp.body_len);
    assert_string_equal(json_string_value(json_object_get(j, "model_name")), "m");
    assert_string_equal(json_string_value(json_object_get(j, "model_version")), "1");
    assert_string_equal(json_string_value(json_object_get(j, "id")), "r1");
    out = json_array_get(json_object_get(j, "outputs"), 0);
    assert_string_equal(json_string_value(json_object_get(out, "name")), "y");
    assert_string_equal(json_string_value(json_object_get(out, "datatype")), "FP32");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(out, "shape"), 1)), 3);
    assert_true((float)json_real_value(json_array_get(json_object_get(out, "data"), 0)) ==
                0.708333f);
    json_decref(j);
    free(resp.body);
    keel_v2_request_info_fini(&info);
    keel_request_destroy(req);
}

/* Binary in, binary out (binary_data_output), and keel's own limits reported as a 400. */
static void test_end_to_end_binary(void **state)
{
    fixture *f = *state;
    const char *json = "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,4],\"datatype\":\"FP32\","
                       "\"parameters\":{\"binary_data_size\":16}}],"
                       "\"parameters\":{\"binary_data_output\":true}}";
    float x[4] = {0.25f, -3.0f, NAN, 1e-40f};
    keel_request *req = NULL;
    keel_v2_request_info info;
    keel_v2_response resp;
    char err[256];
    size_t len;
    char *body = binary_body(json, x, sizeof(x), &len);
    const char *tail;

    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_v2_decode_infer(req, body, len, strlen(json), &info, err, sizeof(err)),
                     200);
    assert_true(info.binary_data_output);
    assert_int_equal(keel_infer(req), KEEL_OK);
    assert_int_equal(keel_v2_encode_infer(req, "m", &info, &resp, err, sizeof(err)), 0);
    assert_true(resp.has_binary);
    tail = "{\"name\":\"y\",\"datatype\":\"FP32\",\"shape\":[1,4],"
           "\"parameters\":{\"binary_data_size\":16}}]}";
    assert_int_equal(resp.body_len, resp.json_len + 16);
    assert_memory_equal(resp.body + resp.json_len - strlen(tail), tail, strlen(tail));
    assert_memory_equal(resp.body + resp.json_len, x, 16);
    free(resp.body);
    keel_v2_request_info_fini(&info);
    keel_request_destroy(req);
    free(body);

    /* Ten dimensions pass the codec but not keel_request_add_input: a 400 naming the input. */
    body = one_input("FP32", "[1,1,1,1,1,1,1,1,1,1]", "[1]");
    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    assert_int_equal(keel_v2_decode_infer(req, body, strlen(body), NOHDR, &info, err, sizeof(err)),
                     400);
    assert_non_null(strstr(err, "inputs[0]: input 'x': 10 dimensions"));
    assert_null(info.id);
    keel_request_destroy(req);
    free(body);

    /* A requested output the model did not produce is a 500 at encode. */
    assert_int_equal(keel_request_create(f->rt, "m", -1, &req), KEEL_OK);
    json = "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,1],\"datatype\":\"FP32\",\"data\":[[2]]}],"
           "\"outputs\":[{\"name\":\"nope\"}]}";
    assert_int_equal(keel_v2_decode_infer(req, json, strlen(json), NOHDR, &info, err, sizeof(err)),
                     200);
    assert_int_not_equal(keel_infer(req), KEEL_OK); /* keel refuses the unknown output */
    assert_int_equal(keel_v2_encode_infer(req, "m", &info, &resp, err, sizeof(err)), 500);
    assert_non_null(strstr(err, "requested output 'nope' is missing"));
    keel_v2_request_info_fini(&info);
    keel_request_destroy(req);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_malformed_unterminated_and_short_err),
        cmocka_unit_test(test_too_deep),
        cmocka_unit_test(test_names_past_own_storage),
        cmocka_unit_test(test_header_length),
        cmocka_unit_test(test_integer_types),
        cmocka_unit_test(test_bool_and_bytes),
        cmocka_unit_test(test_string_scan_positions),
        cmocka_unit_test(test_float_types),
        cmocka_unit_test(test_nested_and_order),
        cmocka_unit_test(test_binary_inputs),
        cmocka_unit_test(test_encode_json),
        cmocka_unit_test(test_encode_binary),
        cmocka_unit_test(test_error_json),
        cmocka_unit_test(test_roundtrip_all_types),
        cmocka_unit_test(test_fp32_bit_identity),
        cmocka_unit_test(test_scanners_agree_on_invalid),
        cmocka_unit_test(test_vector_path),
        cmocka_unit_test(test_flat_fp32_paths_agree),
        cmocka_unit_test(test_fp32_format),
        cmocka_unit_test(test_fp16_all),
        cmocka_unit_test_setup_teardown(test_end_to_end_json, setup_keel, teardown_keel),
        cmocka_unit_test_setup_teardown(test_end_to_end_binary, setup_keel, teardown_keel),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
