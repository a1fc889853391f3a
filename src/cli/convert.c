/*
 * convert.c: `keel convert`, which prints a model's effective configuration as config.json.
 *
 * DESIGN
 * The effective configuration is what keel serves, so it is taken from a real load rather
 * than from the configuration file alone: a runtime in explicit control mode loads the one
 * model (config.json or Triton's config.pbtxt; Triton's backend "fil" shows as "xgboost",
 * and inputs and outputs an onnx config left out are filled in from the model file), and
 * keel_model_config_json gives the normalised JSON, printed indented on standard output.
 * Warnings about Triton fields keel ignores reach standard error through the log. Uses the
 * public header only; single-threaded apart from the runtime's own threads.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/keel.h"

/* Called by keel.c's main for `keel convert` (declared there too: no header of its own). */
int keel_convert_main(int argc, char **argv);

static void convert_help(FILE *f)
{
    fputs("usage: keel convert --model-repository DIR --model NAME\n"
          "\n"
          "Loads the model NAME of DIR (config.json or Triton's config.pbtxt) and prints the\n"
          "configuration keel serves it with, as config.json: every default filled in,\n"
          "Triton's backend names mapped to keel's, inputs and outputs read from an ONNX\n"
          "model filled in. Fields keel ignores are reported on standard error. To switch a\n"
          "model to config.json, write the output to config.json and remove config.pbtxt\n"
          "(a folder with both is an error).\n"
          "\n"
          "exit status: 0 success, 1 the model did not load, 2 usage error\n",
          f);
}

static void convert_log(void *user, keel_log_level level, const char *msg)
{
    (void)user;
    /* Errors are printed once, from keel_model_load's message. */
    if (level == KEEL_LOG_WARN)
        fprintf(stderr, "keel: warning: %s\n", msg);
}

int keel_convert_main(int argc, char **argv)
{
    const char *repo = NULL, *model = NULL;
    keel_runtime_opts ro;
    keel_runtime *rt = NULL;
    char *text = NULL, *pretty = NULL;
    char errbuf[1024] = "";
    json_t *root = NULL;
    keel_err err;
    int rc = 1;

    for (int i = 0; i < argc; i++) {
        const char **dst = NULL;
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            convert_help(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--model-repository") == 0)
            dst = &repo;
        else if (strcmp(argv[i], "--model") == 0)
            dst = &model;
        if (dst == NULL) {
            fprintf(stderr, "keel: convert: unexpected argument '%s'\n", argv[i]);
            convert_help(stderr);
            return 2;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "keel: convert: option '%s' needs a value\n", argv[i]);
            return 2;
        }
        *dst = argv[++i];
    }
    if (repo == NULL || model == NULL) {
        fprintf(stderr, "keel: convert: --model-repository DIR and --model NAME are required\n");
        return 2;
    }

    keel_runtime_opts_init(&ro);
    ro.model_repository = repo;
    ro.control = KEEL_CONTROL_EXPLICIT;
    ro.log_fn = convert_log;
    ro.log_level = KEEL_LOG_WARN;
    if ((err = keel_runtime_create(&ro, &rt)) != KEEL_OK) {
        fprintf(stderr, "keel: %s: cannot open this model repository: %s\n", repo,
                keel_strerror(err));
        goto done;
    }
    if ((err = keel_model_load(rt, model, errbuf, sizeof(errbuf))) != KEEL_OK) {
        fprintf(stderr, "keel: model %s: %s\n", model,
                errbuf[0] != '\0' ? errbuf : keel_strerror(err));
        goto done;
    }
    if ((err = keel_model_config_json(rt, model, &text)) != KEEL_OK) {
        fprintf(stderr, "keel: model %s: reading its configuration: %s\n", model,
                keel_strerror(err));
        goto done;
    }
    if ((root = json_loads(text, 0, NULL)) == NULL ||
        (pretty = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER)) == NULL) {
        fprintf(stderr, "keel: model %s: cannot format its configuration\n", model);
        goto done;
    }
    printf("%s\n", pretty);
    rc = fflush(stdout) == 0 ? 0 : 1;

done:
    free(pretty);
    json_decref(root);
    free(text);
    keel_runtime_destroy(rt);
    return rc;
}
