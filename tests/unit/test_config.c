/*
 * test_config.c: config.json parsing, validation, normalisation and version selection.
 *
 * DESIGN
 * Each test parses literal config text with keel__config_parse() (or writes files for
 * keel__config_load() and keel__config_select_versions() into a fresh temp directory) and
 * checks what a user would see: the parsed values, the normalised JSON served by
 * GET /v2/models/{m}/config, and for bad input the error code and a message naming the file
 * and the field. The fault-injection test fails each keel allocation in turn; the suite runs
 * under ASan/LSan, so a leak on any error path fails it.
 */
#include "testutil.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/core.h"
#include "repository/config.h"

#define PATH "models/heart/config.json"

/* Every field keel reads, several in their alternative forms (integers as strings, null). */
static const char full_config[] =
    "{\n"
    "  \"name\": \"heart\",\n"
    "  \"backend\": \"xgboost\",\n"
    "  \"platform\": \"\",\n"
    "  \"max_batch_size\": \"16\",\n"
    "  \"input\": [\n"
    "    {\"name\": \"features\", \"data_type\": \"TYPE_FP32\", \"dims\": [13],\n"
    "     \"format\": \"FORMAT_NONE\", \"optional\": false, \"reshape\": null},\n"
    "    {\"name\": \"ids\", \"data_type\": \"TYPE_STRING\", \"dims\": [\"-1\", 2]}\n"
    "  ],\n"
    "  \"output\": [\n"
    "    {\"name\": \"prob\", \"data_type\": \"TYPE_FP64\", \"dims\": [1], \"label_filename\": "
    "\"\"},\n"
    "    {\"name\": \"class\", \"data_type\": \"TYPE_INT64\", \"dims\": [-1, 3, 4]}\n"
    "  ],\n"
    "  \"instance_group\": [{\"count\": 2, \"kind\": \"KIND_CPU\"}, {\"count\": \"3\"},\n"
    "                     {\"kind\": \"KIND_AUTO\", \"name\": \"x\"}],\n"
    "  \"version_policy\": {\"specific\": {\"versions\": [3, 1, \"3\", 7]}},\n"
    "  \"dynamic_batching\": {\"preferred_batch_size\": [4, 8],\n"
    "                       \"max_queue_delay_microseconds\": 100,\n"
    "                       \"default_queue_policy\": {\"max_queue_size\": \"100\",\n"
    "                            \"default_timeout_microseconds\": 2500,\n"
    "                            \"timeout_action\": \"REJECT\"}},\n"
    "  \"parameters\": {\"objective\": {\"string_value\": \"binary:logistic\"},\n"
    "                 \"nthread\": {\"string_value\": \"\"}},\n"
    "  \"default_model_filename\": \"model.json\",\n"
    "  \"keel\": {\"pinned\": true, \"swap_policy\": \"resource_preserving\"},\n"
    "  \"optimization\": {\"priority\": \"PRIORITY_DEFAULT\"},\n"
    "  \"sequence_batching\": null\n"
    "}\n";

/* The smallest valid config: everything else defaults. */
static const char min_config[] =
    "{\"backend\": \"xgboost\","
    " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"
    " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}";

/* The tensors of min_config, for building configs that are wrong elsewhere. */
#define TENSORS                                                                                    \
    "\"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"                 \
    " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]"

static keel__model_config *parse_ok(const char *text)
{
    keel__model_config *cfg = (keel__model_config *)1;
    char err[512] = "";
    keel_err rc = keel__config_parse(PATH, "heart", text, strlen(text), &cfg, err, sizeof(err));

    if (rc != KEEL_OK)
        fail_msg("parse failed (%s): %s", keel_err_name(rc), err);
    assert_non_null(cfg);
    return cfg;
}

/* Parses text expecting code; checks *out stays NULL and the message holds every needle. */
static void parse_fails(const char *text, size_t len, keel_err code, const char *needle1,
                        const char *needle2)
{
    keel__model_config *cfg = (keel__model_config *)1;
    char err[512] = "";
    keel_err rc;

    if (len == (size_t)-1)
        len = strlen(text);
    rc = keel__config_parse(PATH, "heart", text, len, &cfg, err, sizeof(err));
    if (rc != code)
        fail_msg("want %s, got %s (%s) for: %.200s", keel_err_name(code), keel_err_name(rc), err,
                 text);
    assert_null(cfg);
    if (strncmp(err, PATH ": ", strlen(PATH ": ")) != 0)
        fail_msg("message does not start with the file: \"%s\"", err);
    if (needle1 != NULL && strstr(err, needle1) == NULL)
        fail_msg("message \"%s\" lacks \"%s\" (config: %.200s)", err, needle1, text);
    if (needle2 != NULL && strstr(err, needle2) == NULL)
        fail_msg("message \"%s\" lacks \"%s\" (config: %.200s)", err, needle2, text);
}

/* ---- good configs */

static void check_full(const keel__model_config *cfg)
{
    assert_string_equal(cfg->name, "heart");
    assert_string_equal(cfg->backend, "xgboost");
    assert_int_equal(cfg->max_batch_size, 16);
    assert_true(cfg->pinned);
    assert_int_equal(cfg->swap_policy, KEEL__SWAP_RESOURCE);

    assert_int_equal(cfg->ninputs, 2);
    assert_string_equal(cfg->inputs[0].name, "features");
    assert_int_equal(cfg->inputs[0].datatype, KEEL_TYPE_FP32);
    assert_int_equal(cfg->inputs[0].ndims, 1);
    assert_int_equal(cfg->inputs[0].dims[0], 13);
    assert_string_equal(cfg->inputs[1].name, "ids");
    assert_int_equal(cfg->inputs[1].datatype, KEEL_TYPE_BYTES);
    assert_int_equal(cfg->inputs[1].ndims, 2);
    assert_int_equal(cfg->inputs[1].dims[0], -1);
    assert_int_equal(cfg->inputs[1].dims[1], 2);

    assert_int_equal(cfg->noutputs, 2);
    assert_string_equal(cfg->outputs[0].name, "prob");
    assert_int_equal(cfg->outputs[0].datatype, KEEL_TYPE_FP64);
    assert_int_equal(cfg->outputs[0].ndims, 1);
    assert_int_equal(cfg->outputs[0].dims[0], 1);
    assert_string_equal(cfg->outputs[1].name, "class");
    assert_int_equal(cfg->outputs[1].datatype, KEEL_TYPE_INT64);
    assert_int_equal(cfg->outputs[1].ndims, 3);
    assert_int_equal(cfg->outputs[1].dims[0], -1);
    assert_int_equal(cfg->outputs[1].dims[1], 3);
    assert_int_equal(cfg->outputs[1].dims[2], 4);

    assert_int_equal(cfg->instance_count, 6); /* 2 + 3 + default 1 */
    assert_int_equal(cfg->policy, KEEL__POLICY_SPECIFIC);
    assert_int_equal(cfg->nversions, 3); /* [3, 1, "3", 7] sorted, duplicate dropped */
    assert_int_equal(cfg->versions[0], 1);
    assert_int_equal(cfg->versions[1], 3);
    assert_int_equal(cfg->versions[2], 7);
    assert_int_equal(cfg->max_queue_size, 100);
    assert_int_equal(cfg->default_timeout_us, 2500);
    assert_string_equal(cfg->default_model_filename, "model.json");

    assert_int_equal(cfg->nparams, 2);
    assert_string_equal(keel__config_param(cfg, "objective"), "binary:logistic");
    assert_string_equal(keel__config_param(cfg, "nthread"), "");
    assert_null(keel__config_param(cfg, "missing"));
}

static void test_full_config(void **state)
{
    keel__model_config *cfg = parse_ok(full_config);

    (void)state;

    check_full(cfg);
    keel__config_destroy(cfg);
}

static void test_normalised_json(void **state)
{
    keel__model_config *cfg = parse_ok(full_config), *again;
    json_error_t jerr;
    json_t *j;

    (void)state;

    assert_non_null(cfg->json);
    j = json_loads(cfg->json, 0, &jerr);
    if (j == NULL)
        fail_msg("cfg->json is not JSON (%s): %s", jerr.text, cfg->json);
    assert_string_equal(json_string_value(json_object_get(j, "name")), "heart");
    assert_string_equal(json_string_value(json_object_get(j, "backend")), "xgboost");
    assert_int_equal(json_integer_value(json_object_get(j, "max_batch_size")), 16);
    {
        json_t *in1 = json_array_get(json_object_get(j, "input"), 1);
        assert_string_equal(json_string_value(json_object_get(in1, "name")), "ids");
        assert_string_equal(json_string_value(json_object_get(in1, "data_type")), "TYPE_STRING");
        /* "-1" given as a string comes back as an integer. */
        assert_true(json_is_integer(json_array_get(json_object_get(in1, "dims"), 0)));
        assert_int_equal(json_integer_value(json_array_get(json_object_get(in1, "dims"), 0)), -1);
        assert_null(json_object_get(in1, "format")); /* ignored fields are not echoed */
    }
    {
        json_t *out1 = json_array_get(json_object_get(j, "output"), 1);
        assert_string_equal(json_string_value(json_object_get(out1, "data_type")), "TYPE_INT64");
        assert_int_equal(json_array_size(json_object_get(out1, "dims")), 3);
    }
    {
        json_t *ig = json_object_get(j, "instance_group");
        assert_int_equal(json_array_size(ig), 1);
        assert_int_equal(json_integer_value(json_object_get(json_array_get(ig, 0), "count")), 6);
        assert_string_equal(json_string_value(json_object_get(json_array_get(ig, 0), "kind")),
                            "KIND_CPU");
    }
    {
        json_t *vs = json_object_get(
            json_object_get(json_object_get(j, "version_policy"), "specific"), "versions");
        assert_int_equal(json_array_size(vs), 3);
        assert_int_equal(json_integer_value(json_array_get(vs, 2)), 7);
    }
    {
        json_t *qp =
            json_object_get(json_object_get(j, "dynamic_batching"), "default_queue_policy");
        assert_int_equal(json_integer_value(json_object_get(qp, "max_queue_size")), 100);
        assert_int_equal(json_integer_value(json_object_get(qp, "default_timeout_microseconds")),
                         2500);
    }
    assert_string_equal(
        json_string_value(json_object_get(
            json_object_get(json_object_get(j, "parameters"), "objective"), "string_value")),
        "binary:logistic");
    assert_string_equal(json_string_value(json_object_get(j, "default_model_filename")),
                        "model.json");
    assert_null(json_object_get(j, "platform"));
    assert_true(json_is_true(json_object_get(json_object_get(j, "keel"), "pinned")));
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(j, "keel"), "swap_policy")),
        "resource_preserving");
    json_decref(j);

    /* The normalised form parses to the same config and normalises to itself. */
    again = parse_ok(cfg->json);
    check_full(again);
    assert_string_equal(again->json, cfg->json);
    keel__config_destroy(again);
    keel__config_destroy(cfg);
}

static void test_defaults(void **state)
{
    keel__model_config *cfg = parse_ok(min_config);
    json_t *j, *vp;

    (void)state;

    assert_string_equal(cfg->name, "heart"); /* filled from the directory */
    assert_int_equal(cfg->max_batch_size, 0);
    assert_int_equal(cfg->instance_count, KEEL__DEFAULT_INSTANCE_COUNT);
    assert_int_equal(cfg->policy, KEEL__POLICY_LATEST);
    assert_int_equal(cfg->latest_n, 1);
    assert_null(cfg->versions);
    assert_int_equal(cfg->nversions, 0);
    assert_int_equal(cfg->max_queue_size, KEEL__DEFAULT_MAX_QUEUE_SIZE);
    assert_int_equal(cfg->default_timeout_us, 0);
    assert_null(cfg->default_model_filename);
    assert_int_equal(cfg->nparams, 0);
    assert_null(keel__config_param(cfg, "x"));

    j = json_loads(cfg->json, 0, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "name")), "heart");
    assert_int_equal(json_integer_value(json_object_get(j, "max_batch_size")), 0);
    vp = json_object_get(json_object_get(j, "version_policy"), "latest");
    assert_int_equal(json_integer_value(json_object_get(vp, "num_versions")), 1);
    /* No dynamic_batching in the file: batching is off and the section is not served, and
     * the queue bound is keel's default. */
    assert_null(json_object_get(j, "dynamic_batching"));
    assert_false(cfg->batching);
    assert_int_equal(cfg->max_queue_size, KEEL__DEFAULT_MAX_QUEUE_SIZE);
    assert_int_equal(json_integer_value(json_object_get(
                         json_array_get(json_object_get(j, "instance_group"), 0), "count")),
                     KEEL__DEFAULT_INSTANCE_COUNT);
    assert_true(json_is_object(json_object_get(j, "parameters")));
    assert_null(json_object_get(j, "default_model_filename"));
    json_decref(j);
    keel__config_destroy(cfg);
}

/* Every dynamic_batching field, uint64 values as numbers or strings (Triton writes both). */
static void test_dynamic_batching(void **state)
{
    keel__model_config *cfg;
    json_t *j, *db;

    (void)state;
    cfg =
        parse_ok("{\"name\": \"heart\", \"backend\": \"xgboost\", \"max_batch_size\": 64,"
                 " \"dynamic_batching\": {\"preferred_batch_size\": [16, 4, 16],"
                 "  \"max_queue_delay_microseconds\": \"250\", \"preserve_ordering\": true,"
                 "  \"priority_levels\": \"3\", \"default_priority_level\": 2,"
                 "  \"default_queue_policy\": {\"max_queue_size\": 50,"
                 "    \"default_timeout_microseconds\": \"1000\"},"
                 "  \"priority_queue_policy\": {\"1\": {\"timeout_action\": \"DELAY\","
                 "    \"default_timeout_microseconds\": 7, \"allow_timeout_override\": true,"
                 "    \"max_queue_size\": 3}}},"
                 " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}],"
                 " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}");
    assert_true(cfg->batching);
    assert_int_equal(cfg->npreferred, 2); /* sorted, duplicates merged */
    assert_int_equal(cfg->preferred[0], 4);
    assert_int_equal(cfg->preferred[1], 16);
    assert_int_equal(cfg->max_queue_delay_us, 250);
    assert_true(cfg->preserve_ordering);
    assert_int_equal(cfg->priority_levels, 3);
    assert_int_equal(cfg->default_priority_level, 2);
    assert_int_equal(cfg->max_queue_size, 50);
    assert_int_equal(cfg->default_timeout_us, 1000);
    assert_int_equal(cfg->qpolicy[1].timeout_action, KEEL__TIMEOUT_DELAY);
    assert_int_equal(cfg->qpolicy[1].default_timeout_us, 7);
    assert_true(cfg->qpolicy[1].allow_timeout_override);
    assert_int_equal(cfg->qpolicy[1].max_queue_size, 3);
    /* Levels without a policy of their own take the default one. */
    assert_int_equal(cfg->qpolicy[2].default_timeout_us, 1000);
    assert_int_equal(cfg->qpolicy[3].timeout_action, KEEL__TIMEOUT_REJECT);
    j = json_loads(cfg->json, 0, NULL);
    db = json_object_get(j, "dynamic_batching");
    assert_int_equal(json_array_size(json_object_get(db, "preferred_batch_size")), 2);
    assert_string_equal(
        json_string_value(json_object_get(
            json_object_get(json_object_get(db, "priority_queue_policy"), "1"), "timeout_action")),
        "DELAY");
    json_decref(j);
    keel__config_destroy(cfg);
}

static void test_variants(void **state)
{
    keel__model_config *cfg;

    (void)state;

    /* latest with an explicit count; queue size 0 means the default; an empty instance_group
     * is the default; every Triton data type name maps. */
    cfg =
        parse_ok("{\"name\": \"heart\", \"backend\": \"xgboost\", \"max_batch_size\": 0,"
                 " \"version_policy\": {\"latest\": {\"num_versions\": 3}},"
                 " \"instance_group\": [],"
                 " \"dynamic_batching\": {\"default_queue_policy\": {\"max_queue_size\": 0}},"
                 " \"input\": [{\"name\": \"a\", \"data_type\": \"TYPE_BOOL\", \"dims\": [1]},"
                 "   {\"name\": \"b\", \"data_type\": \"TYPE_UINT8\", \"dims\": [1]},"
                 "   {\"name\": \"c\", \"data_type\": \"TYPE_UINT64\", \"dims\": [1]},"
                 "   {\"name\": \"d\", \"data_type\": \"TYPE_INT8\", \"dims\": [1]},"
                 "   {\"name\": \"e\", \"data_type\": \"TYPE_INT32\", \"dims\": [1]},"
                 "   {\"name\": \"f\", \"data_type\": \"TYPE_FP16\", \"dims\":"
                 "     [1, 2, 3, 4, 5, 6, 7, 8]}],"
                 " \"output\": [{\"name\": \"a\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}");
    assert_int_equal(cfg->policy, KEEL__POLICY_LATEST);
    assert_int_equal(cfg->latest_n, 3);
    assert_int_equal(cfg->instance_count, 1);
    assert_int_equal(cfg->max_queue_size, KEEL__DEFAULT_MAX_QUEUE_SIZE);
    assert_int_equal(cfg->inputs[0].datatype, KEEL_TYPE_BOOL);
    assert_int_equal(cfg->inputs[1].datatype, KEEL_TYPE_UINT8);
    assert_int_equal(cfg->inputs[2].datatype, KEEL_TYPE_UINT64);
    assert_int_equal(cfg->inputs[3].datatype, KEEL_TYPE_INT8);
    assert_int_equal(cfg->inputs[4].datatype, KEEL_TYPE_INT32);
    assert_int_equal(cfg->inputs[5].datatype, KEEL_TYPE_FP16);
    assert_int_equal(cfg->inputs[5].ndims, KEEL__MAX_DIMS);
    assert_int_equal(cfg->inputs[5].dims[7], 8);
    /* Input and output names are separate namespaces. */
    assert_string_equal(cfg->outputs[0].name, "a");
    assert_non_null(strstr(cfg->json, "\"TYPE_FP16\""));
    assert_non_null(strstr(cfg->json, "\"num_versions\":3"));
    keel__config_destroy(cfg);

    /* all; instance counts up to the maximum; null reads as absent (protobuf's rule). */
    cfg =
        parse_ok("{\"backend\": \"xgboost\", \"version_policy\": {\"latest\": null, "
                 "\"all\": {}}, \"name\": null, \"max_batch_size\": null,"
                 " \"parameters\": null, \"dynamic_batching\": null, \"keel\": null,"
                 " \"instance_group\": [{\"count\": 60}, {\"count\": 4}],"
                 " \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", \"dims\": [4]}],"
                 " \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}");
    assert_int_equal(cfg->policy, KEEL__POLICY_ALL);
    assert_int_equal(cfg->instance_count, KEEL__MAX_INSTANCE_COUNT);
    assert_non_null(strstr(cfg->json, "\"version_policy\":{\"all\":{}}"));
    keel__config_destroy(cfg);

    /* Without a directory name to compare against, the config's name is used. */
    {
        static const char text[] = "{\"name\": \"other\", \"backend\": \"b\", " TENSORS "}";
        char err[256];
        cfg = NULL;
        assert_int_equal(keel__config_parse(PATH, NULL, text, strlen(text), &cfg, err, sizeof(err)),
                         KEEL_OK);
        assert_string_equal(cfg->name, "other");
        keel__config_destroy(cfg);
        assert_int_equal(
            keel__config_parse(PATH, NULL, min_config, strlen(min_config), &cfg, err, sizeof(err)),
            KEEL_ECONFIG);
        assert_non_null(strstr(err, "name: required"));
    }
}

/* ---- bad configs */

#define WITH(extra) "{\"backend\": \"xgboost\", " TENSORS ", " extra "}"
#define IN(tensor)                                                                                 \
    "{\"backend\": \"xgboost\", \"input\": [{\"name\": \"ok\", \"data_type\": \"TYPE_FP32\", "     \
    "\"dims\": [1]}, " tensor "], \"output\": [{\"name\": \"y\", \"data_type\": "                  \
    "\"TYPE_FP32\", \"dims\": [1]}]}"

static const struct {
    const char *text;
    const char *needle1; /* the field path */
    const char *needle2; /* what was expected or got */
} bad_configs[] = {
    {"{\"name\": \"lung\", \"backend\": \"xgboost\", " TENSORS "}", "name: expected \"heart\"",
     "got \"lung\""},
    {"{\"name\": \"\", \"backend\": \"xgboost\", " TENSORS "}", "name: expected a non-empty string",
     NULL},
    {"{\"name\": 7, \"backend\": \"xgboost\", " TENSORS "}", "name: expected", "got 7"},
    {"{" TENSORS "}", "backend: required, e.g. \"xgboost\"", NULL},
    {"{\"backend\": \"\", " TENSORS "}", "backend: expected", "got \"\""},
    {"{\"backend\": [\"xgboost\"], " TENSORS "}", "backend: expected", "got an array"},
    {WITH("\"max_batch_size\": -1"), "max_batch_size: expected an integer from 0", "got -1"},
    {WITH("\"max_batch_size\": 1.5"), "max_batch_size: expected an integer", "got 1.5"},
    {WITH("\"max_batch_size\": \"8x\""), "max_batch_size: expected an integer", "got \"8x\""},
    {WITH("\"max_batch_size\": \"99999999999999999999\""), "max_batch_size: expected", NULL},
    {WITH("\"max_batch_size\": true"), "max_batch_size: expected", "got true"},
    {"{\"backend\": \"xgboost\", \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", "
     "\"dims\": [1]}]}",
     "input: required, expected a non-empty array", NULL},
    {"{\"backend\": \"xgboost\", \"input\": [], \"output\": [{\"name\": \"y\", \"data_type\": "
     "\"TYPE_FP32\", \"dims\": [1]}]}",
     "input: expected a non-empty array", "got an empty array"},
    {"{\"backend\": \"xgboost\", \"input\": {\"name\": \"x\"}, \"output\": []}", "input: expected",
     "got an object"},
    {"{\"backend\": \"xgboost\", \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", "
     "\"dims\": [4]}]}",
     "output: required", NULL},
    {"{\"backend\": \"xgboost\", \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", "
     "\"dims\": [4]}], \"output\": []}",
     "output: expected a non-empty array", NULL},
    {IN("7"), "input[1]: expected an object", "got 7"},
    {IN("{\"data_type\": \"TYPE_FP32\", \"dims\": [1]}"), "input[1].name: required", NULL},
    {IN("{\"name\": \"\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}"),
     "input[1].name: expected a non-empty string", NULL},
    {IN("{\"name\": \"ok\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}"),
     "input[1].name: duplicate name \"ok\"", "input[0]"},
    {IN("{\"name\": \"z\", \"data_type\": \"FP32\", \"dims\": [1]}"),
     "input[1].data_type: expected a string like \"TYPE_FP32\"", "got \"FP32\""},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_COMPLEX\", \"dims\": [1]}"),
     "input[1].data_type: expected", "got \"TYPE_COMPLEX\""},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_INVALID\", \"dims\": [1]}"),
     "input[1].data_type: expected", NULL},
    {IN("{\"name\": \"z\", \"dims\": [1]}"), "input[1].data_type: required", NULL},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_FP32\"}"), "input[1].dims: required", NULL},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_FP32\", \"dims\": []}"),
     "input[1].dims: expected an array of 1 to 8 dimensions", "got an empty array"},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_FP32\", \"dims\": [1,1,1,1,1,1,1,1,1]}"),
     "input[1].dims: expected an array of 1 to 8", NULL},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_FP32\", \"dims\": [4, 0]}"),
     "input[1].dims[1]: expected -1 or a positive integer, got 0", NULL},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_FP32\", \"dims\": [-2]}"),
     "input[1].dims[0]: expected -1 or a positive integer, got -2", NULL},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_FP32\", \"dims\": [\"abc\"]}"),
     "input[1].dims[0]: expected", "got \"abc\""},
    {IN("{\"name\": \"z\", \"data_type\": \"TYPE_FP32\", \"dims\": [2.0]}"),
     "input[1].dims[0]: expected -1 or a positive integer", "got 2.0"},
    {"{\"backend\": \"xgboost\", \"input\": [{\"name\": \"x\", \"data_type\": \"TYPE_FP32\", "
     "\"dims\": [4]}], \"output\": [{\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": "
     "[1]}, {\"name\": \"y\", \"data_type\": \"TYPE_FP32\", \"dims\": [1]}]}",
     "output[1].name: duplicate name \"y\"", "output[0]"},
    {WITH("\"instance_group\": {\"count\": 1}"), "instance_group: expected an array", NULL},
    {WITH("\"instance_group\": [1]"), "instance_group[0]: expected an object", NULL},
    {WITH("\"instance_group\": [{\"count\": 0}]"),
     "instance_group[0].count: expected an integer from 1 to 64", "got 0"},
    {WITH("\"instance_group\": [{\"count\": 65}]"), "instance_group[0].count: expected", "got 65"},
    {WITH("\"instance_group\": [{\"count\": 40}, {\"count\": 30}]"),
     "instance_group: expected at most 64 instances in total", "got 70"},
    {WITH("\"instance_group\": [{\"count\": 1, \"kind\": \"KIND_GPU\"}]"),
     "instance_group[0].kind: expected \"KIND_CPU\" or \"KIND_AUTO\"", "got \"KIND_GPU\""},
    {WITH("\"version_policy\": \"latest\""), "version_policy: expected an object", NULL},
    {WITH("\"version_policy\": {}"), "version_policy: expected exactly one of", NULL},
    {WITH("\"version_policy\": {\"latest\": {}, \"all\": {}}"),
     "version_policy: expected exactly one of", NULL},
    {WITH("\"version_policy\": {\"lastest\": {}}"), "version_policy: expected exactly one of",
     NULL},
    {WITH("\"version_policy\": {\"latest\": {\"num_versions\": 0}}"),
     "version_policy.latest.num_versions: expected an integer from 1", "got 0"},
    {WITH("\"version_policy\": {\"latest\": 2}"), "version_policy.latest: expected an object",
     "got 2"},
    {WITH("\"version_policy\": {\"all\": true}"), "version_policy.all: expected an object", NULL},
    {WITH("\"version_policy\": {\"specific\": {}}"), "version_policy.specific.versions: required",
     NULL},
    {WITH("\"version_policy\": {\"specific\": {\"versions\": []}}"),
     "version_policy.specific.versions: expected a non-empty array", NULL},
    {WITH("\"version_policy\": {\"specific\": {\"versions\": [1, 0]}}"),
     "version_policy.specific.versions[1]: expected an integer >= 1", "got 0"},
    {WITH("\"dynamic_batching\": []"), "dynamic_batching: expected an object", NULL},
    {WITH("\"dynamic_batching\": {\"default_queue_policy\": 5}"),
     "dynamic_batching.default_queue_policy: expected an object", NULL},
    {WITH("\"dynamic_batching\": {\"default_queue_policy\": {\"max_queue_size\": 1000001}}"),
     "dynamic_batching.default_queue_policy.max_queue_size: expected an integer from 0 to "
     "1000000",
     "got 1000001"},
    {WITH("\"dynamic_batching\": {\"default_queue_policy\": {\"max_queue_size\": -5}}"),
     "dynamic_batching.default_queue_policy.max_queue_size: expected", "got -5"},
    {WITH("\"dynamic_batching\": {\"default_queue_policy\": "
          "{\"default_timeout_microseconds\": \"-1\"}}"),
     "dynamic_batching.default_queue_policy.default_timeout_microseconds: expected", "got \"-1\""},
    {WITH("\"max_batch_size\": 8, \"dynamic_batching\": {\"preferred_batch_size\": [4, 9]}"),
     "dynamic_batching.preferred_batch_size[1]: expected an integer from 1 to 8", "got 9"},
    {WITH("\"dynamic_batching\": {\"preferred_batch_size\": [1]}"),
     "dynamic_batching.preferred_batch_size: needs max_batch_size > 0", NULL},
    {WITH("\"dynamic_batching\": {\"priority_levels\": 3}"),
     "dynamic_batching.default_priority_level: required when priority_levels is set", NULL},
    {WITH("\"dynamic_batching\": {\"priority_levels\": 3, \"default_priority_level\": 4}"),
     "dynamic_batching.default_priority_level: expected an integer from 1 to 3", "got 4"},
    {WITH("\"dynamic_batching\": {\"priority_levels\": 17, \"default_priority_level\": 1}"),
     "dynamic_batching.priority_levels: expected an integer from 0 to 16", "got 17"},
    {WITH("\"dynamic_batching\": {\"default_priority_level\": 1}"),
     "dynamic_batching.default_priority_level: expected an integer from 0 to 0", NULL},
    {WITH("\"dynamic_batching\": {\"priority_levels\": 2, \"default_priority_level\": 1,"
          " \"priority_queue_policy\": {\"3\": {}}}"),
     "dynamic_batching.priority_queue_policy.3: expected an integer from 1 to 2", NULL},
    {WITH("\"dynamic_batching\": {\"priority_queue_policy\": {\"1\": {}}}"),
     "dynamic_batching.priority_queue_policy.1: needs priority_levels > 0", NULL},
    {WITH("\"dynamic_batching\": {\"default_queue_policy\": {\"timeout_action\": \"DROP\"}}"),
     "dynamic_batching.default_queue_policy.timeout_action: expected \"REJECT\" or \"DELAY\"",
     "got \"DROP\""},
    {WITH("\"dynamic_batching\": {\"priority_levels\": 2, \"default_priority_level\": 1,"
          " \"priority_queue_policy\": {\"2\": {\"max_queue_sise\": 3}}}"),
     "dynamic_batching.priority_queue_policy.2.max_queue_sise: unknown field", NULL},
    {WITH("\"dynamic_batching\": {\"max_queue_delay_microseconds\": -1}"),
     "dynamic_batching.max_queue_delay_microseconds: expected an integer from 0", "got -1"},
    {WITH("\"dynamic_batching\": {\"preserve_ordering\": 1}"),
     "dynamic_batching.preserve_ordering: expected true or false", "got 1"},
    {WITH("\"parameters\": [1]"), "parameters: expected an object", NULL},
    {WITH("\"parameters\": {\"k\": \"v\"}"), "parameters.k: expected an object", "got \"v\""},
    {WITH("\"parameters\": {\"k\": {}}"), "parameters.k.string_value: required", NULL},
    {WITH("\"parameters\": {\"k\": {\"string_value\": 3}}"),
     "parameters.k.string_value: expected a string", "got 3"},
    {WITH("\"default_model_filename\": \"../model.json\""), "default_model_filename: expected",
     "got \"../model.json\""},
    {WITH("\"default_model_filename\": \"..\""), "default_model_filename: expected", NULL},
    {WITH("\"default_model_filename\": \"\""), "default_model_filename: expected", NULL},
    {WITH("\"default_model_filename\": 1"), "default_model_filename: expected", NULL},
    {WITH("\"keel\": \"fast\""), "keel: expected an object", "got \"fast\""},
    {WITH("\"keel\": {\"pinnned\": true}"), "keel: unknown setting \"pinnned\"", NULL},
    {WITH("\"keel\": {\"pinned\": 1}"), "keel.pinned: expected true or false", "got 1"},
    {WITH("\"keel\": {\"swap_policy\": \"fast\"}"), "keel.swap_policy: expected", "got \"fast\""},
};

static void test_bad_configs(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_configs) / sizeof(bad_configs[0]); i++)
        parse_fails(bad_configs[i].text, (size_t)-1, KEEL_ECONFIG, bad_configs[i].needle1,
                    bad_configs[i].needle2);
}

/* Inputs that are not a config at all: none may crash, leak or succeed. */
static void test_bad_json(void **state)
{
    static const char nul_inside[] = "{\"backend\": \"xgb\0oost\"}";
    char *deep;
    size_t i;

    (void)state;

    parse_fails("", 0, KEEL_ECONFIG, "invalid JSON at line 1", NULL);
    parse_fails(NULL, 0, KEEL_ECONFIG, "invalid JSON", NULL);
    parse_fails("   \n\n", (size_t)-1, KEEL_ECONFIG, "invalid JSON at line 3", NULL);
    parse_fails("{\n  \"backend\": \"xgboost\",\n  \"input\": [,]\n}", (size_t)-1, KEEL_ECONFIG,
                "invalid JSON at line 3 column", NULL);
    parse_fails("[]", (size_t)-1, KEEL_ECONFIG, "expected a JSON object at the top level", NULL);
    parse_fails("{\"backend\": \"a\", \"backend\": \"b\"}", (size_t)-1, KEEL_ECONFIG,
                "invalid JSON", "duplicate object key");
    parse_fails(nul_inside, sizeof(nul_inside) - 1, KEEL_ECONFIG, "invalid JSON", NULL);
    parse_fails("{\"backend\": \"a\\u0000b\"}", (size_t)-1, KEEL_ECONFIG, "invalid JSON", NULL);
    parse_fails("{\"backend\": \"\xff\xfe\"}", (size_t)-1, KEEL_ECONFIG, "invalid JSON", NULL);
    parse_fails("{\"max_batch_size\": 123456789012345678901234567890}", (size_t)-1, KEEL_ECONFIG,
                "invalid JSON", NULL);
    parse_fails("{\"max_batch_size\": 1e999}", (size_t)-1, KEEL_ECONFIG, "invalid JSON", NULL);
    parse_fails("{} trailing", (size_t)-1, KEEL_ECONFIG, "invalid JSON", NULL);
    parse_fails("{\"name\": \"heart\"", (size_t)-1, KEEL_ECONFIG, "invalid JSON", NULL);

    /* Deep nesting in an ignored key and in a known one. */
    deep = malloc(200003);
    assert_non_null(deep);
    for (i = 0; i < 100000; i++)
        deep[i] = '[';
    for (; i < 200000; i++)
        deep[i] = ']';
    parse_fails(deep, 200000, KEEL_ECONFIG, "invalid JSON", NULL);
    memcpy(deep, "{\"x\":", 5);
    parse_fails(deep, 200000, KEEL_ECONFIG, "invalid JSON", NULL);
    free(deep);

    /* Control characters copied into a message are replaced. */
    {
        keel__model_config *cfg;
        char err[512];
        assert_int_equal(
            keel__config_parse(PATH, "heart", "{\"name\": \"a\\nb\"}", 16, &cfg, err, sizeof(err)),
            KEEL_ECONFIG);
        assert_null(strchr(err, '\n'));
        assert_non_null(strstr(err, "got \"a?b\""));
    }
}

/* Byte-level mutations of a good config: every result is OK or ECONFIG, never a crash/leak. */
static void test_mutations(void **state)
{
    size_t len = strlen(full_config);
    char *buf = malloc(len);
    uint64_t rng = 12345;
    int round, ok = 0;

    (void)state;

    assert_non_null(buf);
    for (round = 0; round < 3000; round++) {
        keel__model_config *cfg = NULL;
        char err[256];
        size_t n = len;
        keel_err rc;

        memcpy(buf, full_config, len);
        for (int k = 0; k < 1 + round % 4; k++) {
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            size_t at = (size_t)(rng >> 33) % len;
            static const char pool[] = "{}[]\",:0-19aZ \\\x80\xff";
            buf[at] = pool[(rng >> 20) % (sizeof(pool) - 1)];
        }
        if (round % 7 == 0)
            n = (size_t)(rng >> 40) % len; /* truncated */
        rc = keel__config_parse(PATH, "heart", buf, n, &cfg, err, sizeof(err));
        if (rc == KEEL_OK) {
            assert_non_null(cfg);
            ok++;
            keel__config_destroy(cfg);
        } else {
            assert_int_equal(rc, KEEL_ECONFIG);
            assert_null(cfg);
            assert_true(strlen(err) > strlen(PATH));
        }
    }
    free(buf);
    /* Some mutations (inside ignored keys or whitespace) leave a valid config: the harness
     * reached the success path, not just the JSON syntax errors. */
    assert_true(ok > 0);
}

/* ---- files */

static void test_load(void **state)
{
    char *dir = tu_mkdtemp("config");
    char *path = tu_strf("%s/heart/config.json", dir);
    char *missing = tu_strf("%s/lung/config.json", dir);
    char *big = tu_strf("%s/big/config.json", dir);
    char *asdir = tu_strf("%s/odd/config.json", dir);
    keel__model_config *cfg = NULL;
    char err[512];
    char *blob;

    (void)state;

    tu_write_file(path, full_config, (size_t)-1);
    assert_int_equal(keel__config_load(path, "heart", &cfg, err, sizeof(err)), KEEL_OK);
    check_full(cfg);
    keel__config_destroy(cfg);

    cfg = (keel__model_config *)1;
    assert_int_equal(keel__config_load(missing, "lung", &cfg, err, sizeof(err)), KEEL_ECONFIG);
    assert_null(cfg);
    {
        char *want = tu_strf("%s: cannot open: No such file or directory", missing);
        assert_string_equal(err, want);
        free(want);
    }

    /* One byte over 1 MiB: rejected before parsing. Exactly 1 MiB is parsed (and, being
     * padded with spaces, accepted). */
    blob = malloc(1024 * 1024 + 1);
    assert_non_null(blob);
    memset(blob, ' ', 1024 * 1024 + 1);
    memcpy(blob, min_config, strlen(min_config));
    tu_write_file(big, blob, 1024 * 1024 + 1);
    assert_int_equal(keel__config_load(big, "big", &cfg, err, sizeof(err)), KEEL_ECONFIG);
    assert_null(cfg);
    assert_non_null(strstr(err, big));
    assert_non_null(strstr(err, "at most 1048576 bytes"));
    tu_write_file(big, blob, 1024 * 1024);
    assert_int_equal(keel__config_load(big, "big", &cfg, err, sizeof(err)), KEEL_OK);
    assert_string_equal(cfg->name, "big");
    keel__config_destroy(cfg);
    free(blob);

    /* Empty file and a directory in the file's place. */
    tu_write_file(path, "", 0);
    assert_int_equal(keel__config_load(path, "heart", &cfg, err, sizeof(err)), KEEL_ECONFIG);
    assert_non_null(strstr(err, "invalid JSON"));
    tu_mkdirs(asdir);
    assert_int_equal(keel__config_load(asdir, "odd", &cfg, err, sizeof(err)), KEEL_ECONFIG);
    assert_non_null(strstr(err, "not a regular file"));

    tu_rm_rf(dir);
    free(asdir);
    free(big);
    free(missing);
    free(path);
    free(dir);
}

/* ---- version selection */

static keel__model_config *policy_config(const char *policy)
{
    char *text = tu_strf(WITH("\"version_policy\": %s"), policy);
    keel__model_config *cfg = parse_ok(text);

    free(text);
    return cfg;
}

static void expect_versions(const char *policy, const char *dir, const int64_t *want, size_t n)
{
    keel__model_config *cfg = policy_config(policy);
    int64_t *got = (int64_t *)1;
    size_t count = 99;
    char err[512] = "";
    keel_err rc = keel__config_select_versions(cfg, dir, &got, &count, err, sizeof(err));

    if (rc != KEEL_OK)
        fail_msg("%s: %s: %s", policy, keel_err_name(rc), err);
    if (count != n)
        fail_msg("%s: want %zu versions, got %zu", policy, n, count);
    for (size_t i = 0; i < n; i++) {
        if (got[i] != want[i])
            fail_msg("%s: version[%zu] want %lld, got %lld", policy, i, (long long)want[i],
                     (long long)got[i]);
    }
    free(got);
    keel__config_destroy(cfg);
}

static void test_select_versions(void **state)
{
    char *dir = tu_mkdtemp("versions");
    char *empty = tu_strf("%s/empty", dir);
    char *p;
    static const char *const dirs[] = {
        "1", "2", "3", "10", "007", "0", "abc", "4x", ".9", "99999999999999999999", "-5"};

    (void)state;

    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        p = tu_strf("%s/%s", dir, dirs[i]);
        tu_mkdirs(p);
        free(p);
    }
    p = tu_strf("%s/5", dir); /* a regular file, not a version */
    tu_write_file(p, "x", 1);
    free(p);
    p = tu_strf("%s/11", dir); /* a symlink to a folder is a version folder */
    assert_int_equal(symlink("1", p), 0);
    free(p);
    p = tu_strf("%s/12", dir); /* a dangling symlink is not */
    assert_int_equal(symlink("nowhere", p), 0);
    free(p);
    tu_mkdirs(empty);

    {
        const int64_t w1[] = {11};
        const int64_t w2[] = {10, 11};
        const int64_t w_all[] = {1, 2, 3, 10, 11};
        const int64_t w_spec[] = {2, 10};
        expect_versions("{\"latest\": {}}", dir, w1, 1);
        expect_versions("{\"latest\": {\"num_versions\": 2}}", dir, w2, 2);
        expect_versions("{\"latest\": {\"num_versions\": 100}}", dir, w_all, 5);
        expect_versions("{\"all\": {}}", dir, w_all, 5);
        expect_versions("{\"specific\": {\"versions\": [10, 2]}}", dir, w_spec, 2);
        expect_versions("{\"latest\": {}}", empty, NULL, 0);
        expect_versions("{\"all\": {}}", empty, NULL, 0);
    }

    /* A listed version without its folder names the folder. */
    {
        keel__model_config *cfg = policy_config("{\"specific\": {\"versions\": [1, 5]}}");
        int64_t *got = (int64_t *)1;
        size_t count = 99;
        char err[512];
        char *want = tu_strf("%s/5: version folder listed in version_policy.specific does not "
                             "exist",
                             dir);
        assert_int_equal(keel__config_select_versions(cfg, dir, &got, &count, err, sizeof(err)),
                         KEEL_ECONFIG);
        assert_null(got);
        assert_int_equal(count, 0);
        assert_string_equal(err, want);
        free(want);

        /* A missing model directory. */
        p = tu_strf("%s/nope", dir);
        assert_int_equal(keel__config_select_versions(cfg, p, &got, &count, err, sizeof(err)),
                         KEEL_ENOTFOUND);
        assert_null(got);
        assert_non_null(strstr(err, p));
        free(p);
        keel__config_destroy(cfg);
    }

    tu_rm_rf(dir);
    free(empty);
    free(dir);
}

/* ---- allocation failures */

#ifdef KEEL_FAULT_INJECTION
static void test_alloc_failures(void **state)
{
    char *dir = tu_mkdtemp("faults");
    char *path = tu_strf("%s/heart/config.json", dir);
    char *v;
    uint64_t n;
    int parse_points = 0, load_points = 0, select_points = 0;

    (void)state;

    tu_write_file(path, full_config, (size_t)-1);
    for (int i = 1; i <= 8; i++) {
        v = tu_strf("%s/heart/%d", dir, i);
        tu_mkdirs(v);
        free(v);
    }

    /* Fail the nth keel allocation for every n until a run needs fewer than n: each failure
     * must surface as KEEL_ENOMEM with nothing leaked, and an unfailed run must succeed. */
    for (n = 1;; n++) {
        keel__model_config *cfg = (keel__model_config *)1;
        char err[256] = "";
        keel_err rc;

        keel__fault_arm_nth(KEEL__FAULT_ALLOC, n);
        rc = keel__config_parse(PATH, "heart", full_config, strlen(full_config), &cfg, err,
                                sizeof(err));
        bool fired = keel__fault_fired(KEEL__FAULT_ALLOC) > 0;
        keel__fault_disarm_all();
        if (fired) {
            if (rc != KEEL_ENOMEM)
                fail_msg("allocation %llu failed but parse returned %s (%s)", (unsigned long long)n,
                         keel_err_name(rc), err);
            assert_null(cfg);
            assert_string_equal(err, PATH ": out of memory");
            parse_points++;
        } else {
            assert_int_equal(rc, KEEL_OK);
            check_full(cfg);
            keel__config_destroy(cfg);
            break;
        }
    }
    assert_true(parse_points > 10); /* the full config allocates much more than this */

    for (n = 1;; n++) {
        keel__model_config *cfg = (keel__model_config *)1;
        char err[256];
        keel_err rc;

        keel__fault_arm_nth(KEEL__FAULT_ALLOC, n);
        rc = keel__config_load(path, "heart", &cfg, err, sizeof(err));
        bool fired = keel__fault_fired(KEEL__FAULT_ALLOC) > 0;
        keel__fault_disarm_all();
        if (!fired) {
            assert_int_equal(rc, KEEL_OK);
            keel__config_destroy(cfg);
            break;
        }
        assert_int_equal(rc, KEEL_ENOMEM);
        assert_null(cfg);
        load_points++;
    }
    assert_true(load_points > parse_points); /* the read buffer, then the parse */

    {
        keel__model_config *cfg = policy_config("{\"all\": {}}");
        char *model_dir = tu_strf("%s/heart", dir);
        for (n = 1;; n++) {
            int64_t *got = (int64_t *)1;
            size_t count = 99;
            char err[256];
            keel_err rc;

            keel__fault_arm_nth(KEEL__FAULT_ALLOC, n);
            rc = keel__config_select_versions(cfg, model_dir, &got, &count, err, sizeof(err));
            bool fired = keel__fault_fired(KEEL__FAULT_ALLOC) > 0;
            keel__fault_disarm_all();
            if (!fired) {
                assert_int_equal(rc, KEEL_OK);
                assert_int_equal(count, 8);
                free(got);
                break;
            }
            assert_int_equal(rc, KEEL_ENOMEM);
            assert_null(got);
            assert_int_equal(count, 0);
            select_points++;
        }
        assert_true(select_points >= 2); /* the scan array and the result */
        free(model_dir);
        keel__config_destroy(cfg);
    }

    tu_rm_rf(dir);
    free(path);
    free(dir);
}
#endif

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_config),
        cmocka_unit_test(test_normalised_json),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_variants),
        cmocka_unit_test(test_dynamic_batching),
        cmocka_unit_test(test_bad_configs),
        cmocka_unit_test(test_bad_json),
        cmocka_unit_test(test_mutations),
        cmocka_unit_test(test_load),
        cmocka_unit_test(test_select_versions),
#ifdef KEEL_FAULT_INJECTION
        cmocka_unit_test(test_alloc_failures),
#endif
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
