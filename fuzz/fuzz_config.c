/*
 * fuzz_config.c: libFuzzer driver for keel__config_parse (src/repository/config.h).
 *
 * DESIGN
 * config.json is the one file of a model repository that keel parses itself, and a
 * repository may come from anyone who can write to its directory, so every byte string must
 * give either a config or KEEL_ECONFIG/KEEL_ENOMEM with a message, never a crash, a leak or
 * undefined behaviour. Each input is parsed with a fixed path and directory name; the bytes
 * are passed with their length and no terminating NUL, as keel__config_load passes a file.
 *
 * Besides AddressSanitizer and UndefinedBehaviorSanitizer (and LeakSanitizer at exit), the
 * driver checks the contract of config.h and aborts (a crash libFuzzer reports with the
 * input) when it is broken:
 *   - on error: *out is NULL, the code is ECONFIG or ENOMEM, and the message is a
 *     NUL-terminated string starting with the path;
 *   - on success: the name is the directory name, and the normalised JSON parses again to a
 *     config whose normalised JSON is the same text (the round trip test_config.c checks on
 *     its fixed examples).
 * Fault injection is not compiled into this target (the sources are built without
 * KEEL_FAULT_INJECTION), so ENOMEM only happens when jansson or malloc really fail.
 *
 * Build and run: fuzz/README.md.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repository/config.h"

#define FUZZ_PATH "models/heart/config.json"
#define FUZZ_DIR "heart"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int ok, const char *what, const char *detail)
{
    if (!ok) {
        fprintf(stderr, "fuzz_config: contract broken: %s\n%s\n", what,
                detail != NULL ? detail : "");
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    keel__model_config *cfg = (keel__model_config *)&cfg; /* must be reset to NULL or set */
    keel__model_config *again = NULL;
    char errbuf[512];
    char errbuf2[512];
    keel_err err;

    memset(errbuf, 'x', sizeof(errbuf)); /* a missing NUL would show as an overflow */
    err = keel__config_parse(FUZZ_PATH, FUZZ_DIR, (const char *)data, size, &cfg, errbuf,
                             sizeof(errbuf));
    if (err != KEEL_OK) {
        check(cfg == NULL, "*out not NULL after an error", NULL);
        check(err == KEEL_ECONFIG || err == KEEL_ENOMEM, "unexpected error code",
              keel_err_name(err));
        check(memchr(errbuf, '\0', sizeof(errbuf)) != NULL, "message not NUL-terminated", NULL);
        check(strncmp(errbuf, FUZZ_PATH ": ", strlen(FUZZ_PATH ": ")) == 0,
              "message does not start with the path", errbuf);
        return 0;
    }
    check(cfg != NULL && cfg->name != NULL && strcmp(cfg->name, FUZZ_DIR) == 0,
          "name is not the directory name", cfg != NULL ? cfg->name : NULL);
    check(cfg->json != NULL, "no normalised JSON", NULL);

    err = keel__config_parse(FUZZ_PATH, FUZZ_DIR, cfg->json, strlen(cfg->json), &again, errbuf2,
                             sizeof(errbuf2));
    if (err == KEEL_ENOMEM) {
        keel__config_destroy(cfg);
        return 0;
    }
    check(err == KEEL_OK, "the normalised JSON does not parse", errbuf2);
    check(strcmp(again->json, cfg->json) == 0, "the normalised JSON does not normalise to itself",
          cfg->json);
    keel__config_destroy(again);
    keel__config_destroy(cfg);
    return 0;
}
