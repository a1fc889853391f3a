/*
 * test_restrict.c: restricted API groups (src/server/restrict.h) and the edge checks
 * (src/server/edge.h), without any HTTP library.
 *
 * What a user would notice if it broke: a request without the key (or with it twice, or with
 * a near miss) let through; a right key refused because of header-name case; a bad rule
 * accepted at start-up, or a secret printed in the error; a gRPC method in the wrong group; a
 * repository path left in an error message, or a client's own URL mangled; "%2F" or "%00" in
 * a target not caught.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

#include "edge.h"
#include "restrict.h"

static bool add(keel_restrict *r, const char *spec, char *msg)
{
    return keel__restrict_add(r, spec, msg, 512);
}

static bool allowed(const keel_restrict *r, keel_api_group g, const char *const *prefixes,
                    const char *const *hdrs /* name, value, name, value, ..., NULL */)
{
    keel_restrict_check k;

    keel__restrict_check_begin(&k, r, g, prefixes);
    for (size_t i = 0; hdrs != NULL && hdrs[i] != NULL; i += 2)
        keel__restrict_check_header(&k, hdrs[i], strlen(hdrs[i]), hdrs[i + 1], strlen(hdrs[i + 1]));
    return keel__restrict_check_allowed(&k);
}

static void test_group_names(void **state)
{
    (void)state;
    for (int g = 0; g < KEEL_API_NGROUPS; g++) {
        const char *n = keel__api_group_name((keel_api_group)g);
        assert_int_equal(keel__api_group_from_name(n, strlen(n)), g);
    }
    assert_int_equal(keel__api_group_from_name("Health", 6), KEEL_API_NONE);
    assert_int_equal(keel__api_group_from_name("health", 5), KEEL_API_NONE);
    assert_int_equal(keel__api_group_of_grpc("ModelInfer"), KEEL_API_INFERENCE);
    assert_int_equal(keel__api_group_of_grpc("/inference.GRPCInferenceService/RepositoryModelLoad"),
                     KEEL_API_MODEL_REPOSITORY);
    assert_int_equal(keel__api_group_of_grpc("ModelReady"), KEEL_API_HEALTH);
    assert_int_equal(keel__api_group_of_grpc("ModelConfig"), KEEL_API_MODEL_CONFIG);
    assert_int_equal(keel__api_group_of_grpc("ModelStatistics"), KEEL_API_STATISTICS);
    assert_int_equal(keel__api_group_of_grpc("ServerMetadata"), KEEL_API_METADATA);
    assert_int_equal(keel__api_group_of_grpc("Nope"), KEEL_API_NONE);
}

static void test_parse(void **state)
{
    keel_restrict r;
    char msg[512];

    (void)state;
    keel__restrict_init(&r);
    assert_true(add(&r, "model-repository,statistics:Admin-Key=s3cr:et=x", msg));
    assert_non_null(keel__restrict_rule(&r, KEEL_API_STATISTICS));
    assert_string_equal(keel__restrict_rule(&r, KEEL_API_STATISTICS)->key, "Admin-Key");
    assert_string_equal(keel__restrict_rule(&r, KEEL_API_STATISTICS)->value, "s3cr:et=x");
    assert_null(keel__restrict_rule(&r, KEEL_API_INFERENCE));
    /* A group already restricted, a group twice, unknown, malformed: refused, r unchanged,
     * the value never in the message. */
    assert_false(add(&r, "inference,statistics:K=SECRETV", msg));
    assert_non_null(strstr(msg, "multiple config groups"));
    assert_null(keel__restrict_rule(&r, KEEL_API_INFERENCE));
    assert_false(add(&r, "inference,inference:K=SECRETV", msg));
    assert_non_null(strstr(msg, "twice"));
    assert_false(add(&r, "inference,nope:K=SECRETV", msg));
    assert_non_null(strstr(msg, "'nope'"));
    assert_null(strstr(msg, "SECRETV"));
    const char *bad[] = {"inference",
                         "inference:K",
                         "inference:=SECRETV",
                         "inference:K=",
                         ":K=SECRETV",
                         "inference,:K=SECRETV",
                         ",inference:K=v",
                         "inference:K K=v",
                         "inference:K= SECRETV",
                         "inference:K=SECRETV ",
                         "inference:K=SE\x01",
                         "inference:K=@"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        msg[0] = '\0';
        assert_false(add(&r, bad[i], msg));
        assert_true(msg[0] != '\0');
        assert_null(strstr(msg, "SECRETV"));
    }
    assert_null(keel__restrict_rule(&r, KEEL_API_INFERENCE));
    assert_int_equal(r.nrules, 1);
    keel__restrict_fini(&r);
    assert_int_equal(r.nrules, 0);
}

static void test_value_file(void **state)
{
    char path[] = "/tmp/keel-restrict-XXXXXX";
    char spec[128], msg[512];
    keel_restrict r;
    int fd = mkstemp(path);

    (void)state;
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "from-a-file\r\n", 13), 13);
    close(fd);
    keel__restrict_init(&r);
    snprintf(spec, sizeof(spec), "inference:X-Key=@%s", path);
    assert_true(add(&r, spec, msg));
    assert_string_equal(keel__restrict_rule(&r, KEEL_API_INFERENCE)->value, "from-a-file");
    keel__restrict_fini(&r);
    unlink(path);
    assert_false(add(&r, spec, msg)); /* gone */
    assert_non_null(strstr(msg, path));
    keel__restrict_fini(&r);
}

static void test_check(void **state)
{
    static const char *const grpc[] = {"keel-grpc-protocol-", "triton-grpc-protocol-", NULL};
    keel_restrict r;
    char msg[512];

    (void)state;
    keel__restrict_init(&r);
    assert_true(add(&r, "inference:X-Key=abc", msg));
    /* Open groups need nothing. */
    assert_true(allowed(&r, KEEL_API_HEALTH, NULL, NULL));
    assert_true(allowed(&r, KEEL_API_NONE, NULL, NULL));
    /* The right value, any name case. */
    assert_true(allowed(&r, KEEL_API_INFERENCE, NULL, (const char *[]){"X-Key", "abc", NULL}));
    assert_true(allowed(&r, KEEL_API_INFERENCE, NULL,
                        (const char *[]){"Host", "x", "x-key", "abc", "Y", "z", NULL}));
    /* Missing, wrong, near misses, twice. */
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL, NULL));
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL, (const char *[]){"X-Key", "abd", NULL}));
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL, (const char *[]){"X-Key", "ab", NULL}));
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL, (const char *[]){"X-Key", "abcd", NULL}));
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL, (const char *[]){"X-Key", "", NULL}));
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL, (const char *[]){"X-Keys", "abc", NULL}));
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL,
                         (const char *[]){"X-Key", "abc", "X-Key", "abc", NULL}));
    assert_false(allowed(&r, KEEL_API_INFERENCE, NULL,
                         (const char *[]){"X-Key", "no", "x-key", "abc", NULL}));
    /* gRPC: only the prefixed names count. */
    assert_true(allowed(&r, KEEL_API_INFERENCE, grpc,
                        (const char *[]){"triton-grpc-protocol-x-key", "abc", NULL}));
    assert_true(allowed(&r, KEEL_API_INFERENCE, grpc,
                        (const char *[]){"keel-grpc-protocol-x-key", "abc", NULL}));
    assert_false(allowed(&r, KEEL_API_INFERENCE, grpc, (const char *[]){"x-key", "abc", NULL}));
    assert_string_equal(
        keel__restrict_message(keel__restrict_rule(&r, KEEL_API_INFERENCE), NULL, msg, sizeof(msg)),
        "This API is restricted, expecting header 'X-Key'");
    assert_string_equal(
        keel__restrict_message_grpc(keel__restrict_rule(&r, KEEL_API_INFERENCE), msg, sizeof(msg)),
        "This protocol is restricted, expecting header 'triton-grpc-protocol-X-Key'");
    keel__restrict_fini(&r);
    assert_true(keel__restrict_equal("abc", 3, "abc", 3));
    assert_false(keel__restrict_equal("", 0, "abc", 3));
    assert_false(keel__restrict_equal("abcabc", 6, "abc", 3));
    assert_false(keel__restrict_equal("abc", 3, "", 0));
    assert_true(keel__restrict_equal("", 0, "", 0));
}

static void test_target(void **state)
{
    char msg[256];

    (void)state;
    assert_int_equal(keel__edge_check_target("/v2/models/heart/infer", 22, msg, sizeof(msg)), 0);
    assert_int_equal(keel__edge_check_target("/v2/models/a%20b/ready?x=%2F", 28, msg, sizeof(msg)),
                     0);
    assert_int_equal(keel__edge_check_target("/v2/models/a%2Fb/infer", 22, msg, sizeof(msg)), 400);
    assert_non_null(strstr(msg, "%2F"));
    assert_int_equal(keel__edge_check_target("/v2/models/a%2fb", 16, msg, sizeof(msg)), 400);
    assert_int_equal(keel__edge_check_target("/v2/models/a%00", 15, msg, sizeof(msg)), 400);
    assert_int_equal(keel__edge_check_target("/v2?q=%00", 9, msg, sizeof(msg)), 400);
    assert_int_equal(keel__edge_check_target("/v2\0/x", 6, msg, sizeof(msg)), 400);
    assert_non_null(strstr(msg, "NUL"));
    assert_int_equal(keel__edge_check_target("/v2/%2", 6, msg, sizeof(msg)), 0);
    assert_int_equal(keel__edge_check_model_name("heart", msg, sizeof(msg)), 0);
    assert_int_equal(keel__edge_check_model_name("my model%", msg, sizeof(msg)), 0);
    assert_int_equal(keel__edge_check_model_name("..", msg, sizeof(msg)), 400);
    assert_int_equal(keel__edge_check_model_name(".", msg, sizeof(msg)), 400);
    assert_int_equal(keel__edge_check_model_name("a\x01", msg, sizeof(msg)), 400);
    assert_int_equal(keel__edge_check_model_name("", msg, sizeof(msg)), 400);
}

static void expect_redacted(const keel_redact *r, const char *in, const char *want)
{
    size_t len;
    char *out = keel__redact(r, in, strlen(in), &len);

    if (want == NULL) {
        assert_null(out);
        assert_int_equal(len, 0);
        return;
    }
    assert_non_null(out);
    assert_string_equal(out, want);
    assert_int_equal(len, strlen(want));
    free(out);
}

static void test_redact(void **state)
{
    keel_redact r;

    (void)state;
    assert_true(keel__redact_init(&r, "/srv/models/"));
    expect_redacted(&r,
                    "{\"error\":\"model 'm' failed to load: /srv/models/m/1/model.json: not "
                    "an XGBoost model\"}",
                    "{\"error\":\"model 'm' failed to load: " KEEL_REDACTED_PATH
                    ": not an XGBoost model\"}");
    expect_redacted(&r, "/srv/models//m/config.json, /srv/models",
                    KEEL_REDACTED_PATH ", " KEEL_REDACTED_PATH);
    /* Not inside the repository, or not at the start of a word: kept. */
    expect_redacted(&r, "/srv/models2/x and x/srv/models/y", NULL);
    expect_redacted(&r, "unknown endpoint '/v2/models/x'", NULL);
    keel__redact_fini(&r);
    /* "/" as the repository would match every URL: not used. */
    assert_true(keel__redact_init(&r, "/"));
    expect_redacted(&r, "unknown endpoint '/v2/models/x'", NULL);
    keel__redact_fini(&r);
    /* Relative roots as messages spell them. */
    assert_true(keel__redact_init(&r, "models"));
    expect_redacted(&r, "'models/a/1/model.onnx': bad", "'" KEEL_REDACTED_PATH "': bad");
    keel__redact_fini(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_names), cmocka_unit_test(test_parse),
        cmocka_unit_test(test_value_file),  cmocka_unit_test(test_check),
        cmocka_unit_test(test_target),      cmocka_unit_test(test_redact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
