/*
 * test_pbtxt.c: Triton's config.pbtxt (src/repository/pbtxt.cpp through config.c), the
 * strict field checks of both formats, and Triton's FIL and ONNX Runtime configurations
 * mapped to keel's backends.
 *
 * DESIGN
 * Configurations are literal text in the shapes Triton's documentation shows. A good one is
 * checked through what a user sees: the normalised JSON keel serves (equal to that of the
 * same configuration written as config.json) and the warnings for fields keel ignores. A bad
 * one must fail with KEEL_ECONFIG and a message naming the file, line and column and what
 * was wrong (the malformed corpus: unterminated strings, wrong types, unknown enum values,
 * blocks left open, duplicate fields, huge numbers, non-UTF-8, deep nesting). The
 * fault-injection test fails each keel allocation in turn; the suite runs under ASan/LSan.
 */
#include "testutil.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/core.h"
#include "repository/config.h"

#define PB "models/m/config.pbtxt"
#define JS "models/m/config.json"

/* Triton's FIL backend documentation's example, for a 13-feature XGBoost JSON classifier. */
static const char fil_pbtxt[] = "backend: \"fil\"\n"
                                "max_batch_size: 32768\n"
                                "input [\n"
                                " {\n"
                                "    name: \"input__0\"\n"
                                "    data_type: TYPE_FP32\n"
                                "    dims: [ 13 ]\n"
                                "  }\n"
                                "]\n"
                                "output [\n"
                                " {\n"
                                "    name: \"output__0\"\n"
                                "    data_type: TYPE_FP32\n"
                                "    dims: [ 1 ]\n"
                                "  }\n"
                                "]\n"
                                "instance_group [{ kind: KIND_AUTO }]\n"
                                "parameters [\n"
                                "  {\n"
                                "    key: \"model_type\"\n"
                                "    value: { string_value: \"xgboost_json\" }\n"
                                "  },\n"
                                "  {\n"
                                "    key: \"output_class\"\n"
                                "    value: { string_value: \"true\" }\n"
                                "  }\n"
                                "]\n"
                                "\n"
                                "dynamic_batching {}\n";

/* The same, as config.json (what `keel convert` users would write by hand). */
static const char fil_json[] =
    "{\"backend\": \"fil\", \"max_batch_size\": 32768,"
    " \"input\": [{\"name\": \"input__0\", \"data_type\": \"TYPE_FP32\", \"dims\": [13]}],"
    " \"output\": [{\"name\": \"output__0\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}],"
    " \"instance_group\": [{\"kind\": \"KIND_AUTO\"}],"
    " \"parameters\": {\"model_type\": {\"string_value\": \"xgboost_json\"},"
    "                \"output_class\": {\"string_value\": \"true\"}},"
    " \"dynamic_batching\": {}}";

static keel__model_config *parse(bool pbtxt, const char *text, size_t len)
{
    keel__model_config *cfg = (keel__model_config *)1;
    char err[1024] = "";
    keel_err rc = pbtxt ? keel__config_parse_pbtxt(PB, "m", text, len, &cfg, err, sizeof(err))
                        : keel__config_parse(JS, "m", text, len, &cfg, err, sizeof(err));

    if (rc != KEEL_OK)
        fail_msg("parse failed (%s): %s", keel_err_name(rc), err);
    assert_non_null(cfg);
    return cfg;
}

/* Expects a failure whose message is exactly want. */
static void parse_bad(bool pbtxt, const char *text, size_t len, const char *want)
{
    keel__model_config *cfg = (keel__model_config *)1;
    char err[1024] = "";
    keel_err rc = pbtxt ? keel__config_parse_pbtxt(PB, "m", text, len, &cfg, err, sizeof(err))
                        : keel__config_parse(JS, "m", text, len, &cfg, err, sizeof(err));

    if (rc != KEEL_ECONFIG || strcmp(err, want) != 0)
        fail_msg("input:\n%.*s\nwant ECONFIG \"%s\"\ngot  %s \"%s\"", (int)len, text, want,
                 keel_err_name(rc), err);
    assert_null(cfg);
}

static void test_fil(void **state)
{
    keel__model_config *p, *j;

    (void)state;
    p = parse(true, fil_pbtxt, strlen(fil_pbtxt));
    assert_string_equal(p->backend, "xgboost");
    assert_string_equal(p->default_model_filename, "xgboost.json");
    assert_int_equal(p->max_batch_size, 32768);
    assert_int_equal(p->ninputs, 1);
    assert_string_equal(p->inputs[0].name, "input__0");
    assert_int_equal(p->inputs[0].datatype, KEEL_TYPE_FP32);
    assert_int_equal(p->inputs[0].ndims, 1);
    assert_int_equal(p->inputs[0].dims[0], 13);
    assert_string_equal(p->outputs[0].name, "output__0");
    assert_string_equal(keel__config_param(p, "output_class"), "true");
    assert_int_equal(p->instance_count, 1);
    assert_null(p->warnings);
    /* The same configuration as config.json serves the same thing. */
    j = parse(false, fil_json, strlen(fil_json));
    assert_string_equal(p->json, j->json);
    keel__config_destroy(p);
    keel__config_destroy(j);
}

static void test_fil_model_types(void **state)
{
    static const struct {
        const char *type, *file;
    } cases[] = {{"xgboost", "xgboost.model"},
                 {"xgboost_json", "xgboost.json"},
                 {"xgboost_ubj", "xgboost.ubj"},
                 {NULL, "xgboost.model"}};
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *text = tu_strf("backend: \"fil\"\n"
                             "input [{ name: \"x\" data_type: TYPE_FP32 dims: [4] }]\n"
                             "output [{ name: \"y\" data_type: TYPE_FP32 dims: [1] }]\n"
                             "%s%s%s",
                             cases[i].type != NULL ? "parameters { key: \"model_type\" value { "
                                                     "string_value: \""
                                                   : "",
                             cases[i].type != NULL ? cases[i].type : "",
                             cases[i].type != NULL ? "\" } }\n" : "");
        keel__model_config *cfg = parse(true, text, strlen(text));
        assert_string_equal(cfg->default_model_filename, cases[i].file);
        keel__config_destroy(cfg);
        free(text);
    }
    /* model_filename given: it wins. A performance setting is a warning with its place. */
    {
        static const char text[] = "backend: \"fil\"\n"
                                   "default_model_filename: \"trees.json\"\n"
                                   "input [{ name: \"x\" data_type: TYPE_FP32 dims: [4] }]\n"
                                   "output [{ name: \"y\" data_type: TYPE_FP32 dims: [1] }]\n"
                                   "parameters { key: \"model_type\" value { string_value: "
                                   "\"xgboost_json\" } }\n"
                                   "parameters { key: \"storage_type\" value { string_value: "
                                   "\"SPARSE\" } }\n";
        keel__model_config *cfg = parse(true, text, strlen(text));
        assert_string_equal(cfg->default_model_filename, "trees.json");
        assert_non_null(cfg->warnings);
        assert_string_equal(cfg->warnings,
                            PB ":6:1: parameters.storage_type: ignored: a performance setting of "
                               "Triton's FIL backend; answers are the same without it\n");
        keel__config_destroy(cfg);
    }
}

static void test_onnxruntime(void **state)
{
    /* Triton's two spellings, with and without an interface section. */
    static const char *const texts[] = {
        "platform: \"onnxruntime_onnx\"\nmax_batch_size: 8\n",
        "backend: \"onnxruntime\"\nmax_batch_size: 8\n",
        "name: \"m\"\nplatform: \"onnxruntime_onnx\"\nbackend: \"onnxruntime\"\n"
        "max_batch_size: 8\n"
        "input [ { name: \"pixels\" data_type: TYPE_FP32 dims: [ 64 ] } ]\n"
        "output [ { name: \"probabilities\", data_type: TYPE_FP32, dims: [ 10 ] } ]\n"
        "default_model_filename: \"digits.onnx\"\n"
        "instance_group [ { count: 2 kind: KIND_CPU } ]\n",
    };
    (void)state;
    for (size_t i = 0; i < 3; i++) {
        keel__model_config *cfg = parse(true, texts[i], strlen(texts[i]));
        assert_string_equal(cfg->backend, "onnx");
        assert_int_equal(cfg->max_batch_size, 8);
        assert_int_equal(cfg->ninputs, i == 2 ? 1 : 0);
        assert_int_equal(cfg->noutputs, i == 2 ? 1 : 0);
        /* The served JSON reads back as config.json to the same configuration, "input": []
         * included (fuzz_pbtxt found that it did not). */
        {
            keel__model_config *back = parse(false, cfg->json, strlen(cfg->json));
            assert_string_equal(back->json, cfg->json);
            keel__config_destroy(back);
        }
        if (i == 2) {
            assert_string_equal(cfg->default_model_filename, "digits.onnx");
            assert_int_equal(cfg->instance_count, 2);
            assert_int_equal(cfg->outputs[0].dims[0], 10);
        }
        keel__config_destroy(cfg);
    }
}

/* The same configuration in both formats gives the same normalised JSON. */
static void test_same_as_json(void **state)
{
    static const char pb[] =
        "# a comment\n"
        "name: \"m\" backend: \"xgboost\" max_batch_size: 16\n"
        "version_policy: { specific: { versions: [1, 3] } }\n"
        "input [ { name: \"x\" data_type: TYPE_FP32 dims: [ 4 ] format: FORMAT_NONE } ]\n"
        "output [ { name: \"y\" data_type: TYPE_FP32 dims: [ 1 ] } ]\n"
        "instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 } ]\n"
        "dynamic_batching { default_queue_policy { max_queue_size: 100 "
        "default_timeout_microseconds: 2500 }\n"
        "  preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100\n"
        "  priority_levels: 2 default_priority_level: 2\n"
        "  priority_queue_policy { key: 1 value: { timeout_action: DELAY "
        "default_timeout_microseconds: 50 allow_timeout_override: true } } }\n"
        "parameters: { key: \"threshold\" value: { string_value: \"0.25\" } }\n"
        "parameters: { key: \"output_class\" value: { string_value: \"true\" } }\n";
    static const char js[] =
        "{\"name\": \"m\", \"backend\": \"xgboost\", \"max_batch_size\": 16,"
        " \"version_policy\": {\"specific\": {\"versions\": [1, 3]}},"
        " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"
        " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}],"
        " \"instance_group\": [{\"count\": 2, \"kind\": \"KIND_CPU\"}, {\"count\": 1}],"
        " \"dynamic_batching\": {\"default_queue_policy\": {\"max_queue_size\": 100,"
        "   \"default_timeout_microseconds\": 2500},"
        "   \"preferred_batch_size\": [4, 8], \"max_queue_delay_microseconds\": 100,"
        "   \"priority_levels\": 2, \"default_priority_level\": 2,"
        "   \"priority_queue_policy\": {\"1\": {\"timeout_action\": \"DELAY\","
        "     \"default_timeout_microseconds\": \"50\", \"allow_timeout_override\": true}}},"
        " \"parameters\": {\"threshold\": {\"string_value\": \"0.25\"},"
        "                \"output_class\": {\"string_value\": \"true\"}}}";
    keel__model_config *p, *j;

    (void)state;
    p = parse(true, pb, strlen(pb));
    j = parse(false, js, strlen(js));
    assert_string_equal(p->json, j->json);
    assert_int_equal(p->instance_count, 3);
    assert_int_equal(p->qpolicy[1].timeout_action, KEEL__TIMEOUT_DELAY);
    assert_int_equal(p->qpolicy[1].default_timeout_us, 50);
    assert_int_equal(p->npreferred, 2);
    keel__config_destroy(p);
    keel__config_destroy(j);
}

#define IO                                                                                         \
    "input [ { name: \"x\" data_type: TYPE_FP32 dims: [4] } ]\n"                                   \
    "output [ { name: \"y\" data_type: TYPE_FP32 dims: [1] } ]\n"

/* Positions in Triton's list form (`input [ {..}, {..} ]`), where protobuf records one
 * location for several values: messages point at the field inside the value, or at the
 * parameter's key, never at another value. */
static void test_list_form_positions(void **state)
{
    static const char bad_dims[] = "backend: \"xgboost\"\n"
                                   "input [\n"
                                   "  { name: \"a\" data_type: TYPE_FP32 dims: [4] },\n"
                                   "  { name: \"b\" data_type: TYPE_FP32\n"
                                   "    dims: [ 0 ] }\n"
                                   "]\n"
                                   "input { name: \"c\" data_type: TYPE_FP32 dims: [1] }\n"
                                   "output [ { name: \"y\" data_type: TYPE_FP32 dims: [1] } ]\n";
    static const char params[] =
        "backend: \"fil\"\n" IO "parameters [\n"
        "  { key: \"model_type\" value { string_value: \"xgboost_json\" } },\n"
        "  {\n"
        "    key: \"algo\"\n"
        "    value: { string_value: \"NAIVE\" } }\n"
        "]\n"
        "parameters { key: \"output_class\" value { string_value: \"true\" } }\n";
    keel__model_config *cfg;

    (void)state;
    parse_bad(true, bad_dims, strlen(bad_dims),
              PB ":5:5: input[1].dims[0]: expected -1 or a positive integer, got \"0\"");
    cfg = parse(true, params, strlen(params));
    assert_string_equal(cfg->warnings, PB ":7:5: parameters.algo: ignored: a performance setting "
                                          "of Triton's FIL backend; answers are the same without "
                                          "it\n");
    keel__config_destroy(cfg);
}

/* The malformed corpus: each is refused with file, line, column and what was wrong. */
static void test_malformed(void **state)
{
    static const struct {
        const char *text;
        const char *want;
    } cases[] = {
        {"name: \"abc\n", PB ":1:11: String literals cannot cross line boundaries."},
        {"backend: \"xgboost\"\nmax_batch_size: \"eight\"\n",
         PB ":2:17: Expected integer, got: \"eight\""},
        {"backend: \"fil\"\ninput [ { name: \"x\" data_type: TYPE_FLOAT32 dims: [4] } ]\n",
         PB ":2:45: Unknown enumeration value of \"TYPE_FLOAT32\" for field \"data_type\"."},
        {"backend: \"fil\"\ninput [ { name: \"x\" ",
         PB ":2:21: Expected identifier, got: the end of the file (a block left open?)"},
        {"max_batch_size: 1\nmax_batch_size: 2\n",
         PB ":2:15: Non-repeated field \"max_batch_size\" is specified multiple times."},
        {"max_batch_size: 99999999999999999999\n",
         PB ":1:17: Integer out of range (99999999999999999999)"},
        {"max_batch_size: 4294967296\n", PB ":1:17: Integer out of range (4294967296)"},
        {"name: \"\xff\"\n", PB ":1:8: the file is not valid UTF-8 (byte 0xff)"},
        {"backend: \"xgboost\"\n# caf\xc3\n", PB ":2:6: the file is not valid UTF-8 (byte 0xc3)"},
        {"name: \"\\xff\"\n",
         PB ":1:1: name: the string is not valid UTF-8 (an escape like \\xff?)"},
        {"backend: \"xgboost\"\ninput [ { name: \"x\" data_type: TYPE_FP32 dims: [0] } ]\n"
         "output { name: \"y\" data_type: TYPE_FP32 dims: 1 }\n",
         PB ":2:42: input[0].dims[0]: expected -1 or a positive integer, got \"0\""},
        {"backend: \"xgboost\"\nmax_batch_sizee: 8\n" IO,
         PB ":2:1: max_batch_sizee: unknown field \"max_batch_sizee\"; did you mean "
            "\"max_batch_size\"?"},
        {"backend: \"xgboost\"\n" IO "  sequence_batching { max_sequence_idle_microseconds: 5 }\n",
         PB ":4:3: sequence_batching: keel does not support Triton's sequence_batching: keel "
            "serves stateless models only"},
        {"backend: \"xgboost\"\n" IO "ensemble_scheduling { step [ { model_name: \"a\" } ] }\n",
         PB ":4:1: ensemble_scheduling: keel does not support Triton's ensemble_scheduling: keel "
            "has no ensembles"},
        {"backend: \"xgboost\"\ninput [ { name: \"x\" data_type: TYPE_FP32 dims: [4] "
         "optional: true } ]\noutput [ { name: \"y\" data_type: TYPE_FP32 dims: [1] } ]\n",
         PB ":2:52: input[0].optional: keel does not support Triton's optional: every input keel "
            "declares is required"},
        {"backend: \"xgboost\"\n" IO "model_transaction_policy { decoupled: true }\n",
         PB ":4:1: model_transaction_policy: keel does not support Triton's "
            "model_transaction_policy: decoupled models are not supported: keel answers each "
            "request once"},
        {"backend: \"xgboost\"\n" IO "instance_group [ { kind: KIND_CPU cuont: 2 } ]\n",
         PB ":4:35: instance_group[].cuont: unknown field \"cuont\"; did you mean \"count\"?"},
        {"backend: \"xgboost\"\n" IO "instance_group [ { kind: KIND_GPU } ]\n",
         PB ":4:20: instance_group[0].kind: expected \"KIND_CPU\" or \"KIND_AUTO\" (keel serves on "
            "CPU), got \"KIND_GPU\""},
        {"backend: \"fil\"\n" IO
         "parameters { key: \"thresold\" value { string_value: \"0.3\" } }\n",
         PB ":4:1: parameters.thresold: unknown FIL parameter \"thresold\"; did you mean "
            "\"threshold\"?"},
        {"backend: \"fil\"\n" IO
         "parameters { key: \"model_type\" value { string_value: \"lightgbm\" } }\n",
         PB ":4:1: parameters.model_type: keel does not support \"lightgbm\" models: keel's FIL "
            "mapping serves XGBoost models (xgboost, xgboost_json, xgboost_ubj)"},
        {"backend: \"fil\"\n" IO
         "parameters { key: \"output_class\" value { string_value: \"yes\" } }\n",
         PB ":4:42: parameters.output_class.string_value: expected \"true\" or \"false\", got "
            "\"yes\""},
        {"backend: \"fil\"\n" IO
         "parameters { key: \"predict_proba\" value { string_value: \"true\" } }\n",
         PB ":4:1: parameters.predict_proba: \"true\" needs output_class \"true\" (probabilities "
            "are for classifiers)"},
        {"backend: \"fil\"\n" IO
         "parameters { key: \"threshold\" value { string_value: \"1e300\" } }\n",
         PB ":4:39: parameters.threshold.string_value: expected a number like \"0.5\", got "
            "\"1e300\""},
        {"platform: \"tensorrt_plan\"\n" IO,
         PB ":1:1: platform: keel does not support platform \"tensorrt_plan\" (keel serves "
            "\"onnxruntime_onnx\" with its onnx backend; other models need backend \"xgboost\", "
            "\"fil\" or \"onnx\")"},
        {"max_batch_size: 4\n" IO,
         PB ": backend: required, e.g. \"xgboost\" (or Triton's \"fil\", \"onnxruntime\", or "
            "platform \"onnxruntime_onnx\")"},
        {"input: [ < name: \"x\" > ] }\n", PB ":1:26: Expected identifier, got: }"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        parse_bad(true, cases[i].text, strlen(cases[i].text), cases[i].want);

    /* Nested past the recursion limit: an error, not a stack overflow. */
    {
        size_t n = 5000, len = n * strlen("optimization {");
        char *deep = malloc(len + 1);
        assert_non_null(deep);
        for (size_t i = 0; i < n; i++)
            memcpy(deep + i * 14, "optimization {", 14);
        deep[len] = '\0';
        keel__model_config *cfg = (keel__model_config *)1;
        char err[512];
        assert_int_equal(keel__config_parse_pbtxt(PB, "m", deep, len, &cfg, err, sizeof(err)),
                         KEEL_ECONFIG);
        assert_null(cfg);
        assert_non_null(strstr(err, "recursion limit"));
        free(deep);
    }
    /* A NUL byte. */
    parse_bad(true, "name: \"m\"\n\0", 11, PB ":2:1: the file holds a NUL byte");
}

/* The two cases in config.json: a typo and a section keel does not implement. */
static void test_strict_json(void **state)
{
    static const char typo[] =
        "{\"backend\": \"xgboost\", \"max_batch_sizee\": 8,"
        " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"
        " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}";
    static const char seq[] =
        "{\"backend\": \"xgboost\", \"sequence_batching\": {},"
        " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"
        " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}";
    static const char far[] =
        "{\"backend\": \"xgboost\", \"colour\": 1,"
        " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"
        " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}";
    static const char warm[] =
        "{\"backend\": \"xgboost\", \"model_warmup\": [{\"name\": \"w\"}],"
        " \"dynamic_batching\": {\"max_queue_delay_microseconds\": 100},"
        " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"
        " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}";
    keel__model_config *cfg;

    (void)state;
    parse_bad(false, typo, strlen(typo),
              JS ": max_batch_sizee: unknown field \"max_batch_sizee\"; did you mean "
                 "\"max_batch_size\"?");
    parse_bad(false, seq, strlen(seq),
              JS ": sequence_batching: keel does not support Triton's sequence_batching: keel "
                 "serves stateless models only");
    parse_bad(false, far, strlen(far),
              JS ": colour: unknown field \"colour\" (not a field of Triton's ModelConfig)");
    cfg = parse(false, warm, strlen(warm));
    assert_string_equal(cfg->warnings,
                        JS ": model_warmup: ignored: keel's backends warm a model up themselves "
                           "before it serves\n");
    assert_true(cfg->batching);
    assert_int_equal(cfg->max_queue_delay_us, 100);
    keel__config_destroy(cfg);
}

/* A model folder with both files is an error naming both; one of them is found. */
static void test_find(void **state)
{
    char *dir = tu_mkdtemp("pbtxt");
    char *model = tu_strf("%s/m", dir);
    char *js = tu_strf("%s/config.json", model), *pb = tu_strf("%s/config.pbtxt", model);
    char *path = NULL, *want;
    keel__model_config *cfg = NULL;
    char err[1024];

    (void)state;
    tu_mkdirs(model);
    assert_int_equal(keel__config_find(model, &path, err, sizeof(err)), KEEL_ECONFIG);
    assert_false(keel__config_exists(model));
    tu_write_file(pb, fil_pbtxt, (size_t)-1);
    assert_true(keel__config_exists(model));
    assert_int_equal(keel__config_load_dir(model, "m", &cfg, err, sizeof(err)), KEEL_OK);
    assert_string_equal(cfg->backend, "xgboost");
    keel__config_destroy(cfg);
    tu_write_file(js, fil_json, (size_t)-1);
    assert_int_equal(keel__config_find(model, &path, err, sizeof(err)), KEEL_ECONFIG);
    assert_null(path);
    want = tu_strf("%s and %s: a model folder holds one configuration; remove one of them", js, pb);
    assert_string_equal(err, want);
    free(want);
    unlink(pb);
    assert_int_equal(keel__config_find(model, &path, err, sizeof(err)), KEEL_OK);
    assert_string_equal(path, js);
    free(path);
    tu_rm_rf(dir);
    free(js);
    free(pb);
    free(model);
    free(dir);
}

#ifdef KEEL_FAULT_INJECTION
static void test_alloc_failures(void **state)
{
    (void)state;
    for (unsigned long long n = 1;; n++) {
        keel__model_config *cfg = (keel__model_config *)1;
        char err[256] = "";
        keel_err rc;

        keel__fault_arm_nth(KEEL__FAULT_ALLOC, n);
        rc =
            keel__config_parse_pbtxt(PB, "m", fil_pbtxt, strlen(fil_pbtxt), &cfg, err, sizeof(err));
        bool fired = keel__fault_fired(KEEL__FAULT_ALLOC) > 0;
        keel__fault_disarm_all();
        if (fired) {
            if (rc != KEEL_ENOMEM)
                fail_msg("allocation %llu failed but parse returned %s (%s)", n, keel_err_name(rc),
                         err);
            assert_null(cfg);
            continue;
        }
        assert_int_equal(rc, KEEL_OK);
        keel__config_destroy(cfg);
        assert_true(n > 5);
        break;
    }
}
#endif

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fil),
        cmocka_unit_test(test_fil_model_types),
        cmocka_unit_test(test_onnxruntime),
        cmocka_unit_test(test_same_as_json),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_strict_json),
        cmocka_unit_test(test_find),
        cmocka_unit_test(test_list_form_positions),
#ifdef KEEL_FAULT_INJECTION
        cmocka_unit_test(test_alloc_failures),
#endif
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
