/*
 * fuzz_pbtxt.c: libFuzzer driver for keel__config_parse_pbtxt (src/repository/config.h),
 * the config.pbtxt reader: protobuf's TextFormat through src/repository/pbtxt.cpp, then
 * config.c's validation of the JSON it produces.
 *
 * DESIGN
 * A Triton model repository may come from anyone who can write to its directory, so every
 * byte string must give either a config or KEEL_ECONFIG/KEEL_ENOMEM with a message, never a
 * crash, a leak, an uncaught C++ exception or undefined behaviour. The driver aborts (so
 * libFuzzer keeps the input) when the contract is broken: on error *out is NULL, the code
 * is ECONFIG or ENOMEM and the message names the file; on success the name is the directory
 * name and the normalised JSON parses as config.json to the same normalised JSON (the same
 * configuration whichever file it came from). The sanitizers catch the rest.
 *
 * Build and run: fuzz/README.md.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repository/config.h"

#define FUZZ_PATH "models/m/config.pbtxt"
#define FUZZ_DIR "m"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int ok, const char *what, const char *detail)
{
    if (!ok) {
        fprintf(stderr, "fuzz_pbtxt: contract broken: %s\n%s\n", what,
                detail != NULL ? detail : "");
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    keel__model_config *cfg = (keel__model_config *)1, *again = NULL;
    char err[1024];
    keel_err rc;

    err[0] = 'x';
    rc = keel__config_parse_pbtxt(FUZZ_PATH, FUZZ_DIR, (const char *)data, size, &cfg, err,
                                  sizeof(err));
    if (rc != KEEL_OK) {
        check(cfg == NULL, "*out not NULL on error", err);
        check(rc == KEEL_ECONFIG || rc == KEEL_ENOMEM, "unexpected error code", err);
        check(memchr(err, '\0', sizeof(err)) != NULL, "message not terminated", NULL);
        check(strncmp(err, FUZZ_PATH, strlen(FUZZ_PATH)) == 0, "message does not name the file",
              err);
        return 0;
    }
    check(cfg != NULL && strcmp(cfg->name, FUZZ_DIR) == 0, "name is not the directory name",
          cfg != NULL ? cfg->json : NULL);
    /* The served JSON is a valid config.json for the same configuration. */
    rc = keel__config_parse("models/m/config.json", FUZZ_DIR, cfg->json, strlen(cfg->json), &again,
                            err, sizeof(err));
    check(rc == KEEL_OK, "normalised JSON does not parse as config.json", err);
    check(strcmp(again->json, cfg->json) == 0, "normalised JSON is not stable", cfg->json);
    keel__config_destroy(again);
    keel__config_destroy(cfg);
    return 0;
}
