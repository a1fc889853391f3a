/*
 * embed.c: the smallest program that embeds an installed libkeel, built by test_install.sh
 * with nothing but `pkg-config --cflags --libs keel`: it serves one model of a repository in
 * process and prints the first output of one request, so the test can compare it with what
 * `keel infer` answers for the same row.
 *
 * Usage: embed REPOSITORY MODEL INPUT_NAME V1 V2 ...   (one FP32 row)
 */
#include <keel/keel.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    keel_runtime_opts opts;
    keel_runtime *rt = NULL;
    keel_request *req = NULL;
    keel_tensor_view out;
    float row[256];
    int64_t shape[2] = {1, 0};
    char err[512];
    keel_err e;
    int rc = 1;

    if (argc < 5 || argc - 4 > 256) {
        fprintf(stderr, "usage: embed REPOSITORY MODEL INPUT V1 [V2 ...]\n");
        return 2;
    }
    for (int i = 4; i < argc; i++)
        row[i - 4] = strtof(argv[i], NULL);
    shape[1] = argc - 4;
    keel_runtime_opts_init(&opts);
    opts.model_repository = argv[1];
    opts.control = KEEL_CONTROL_EXPLICIT;
    opts.worker_threads = 1;
    if ((e = keel_runtime_create(&opts, &rt)) != KEEL_OK) {
        fprintf(stderr, "embed: keel_runtime_create: %s\n", keel_strerror(e));
        return 1;
    }
    if ((e = keel_model_load(rt, argv[2], err, sizeof(err))) != KEEL_OK) {
        fprintf(stderr, "embed: loading %s: %s\n", argv[2], err);
        goto done;
    }
    if ((e = keel_request_create(rt, argv[2], -1, &req)) != KEEL_OK ||
        (e = keel_request_add_input(req, argv[3], KEEL_TYPE_FP32, shape, 2, row,
                                    sizeof(float) * (size_t)shape[1])) != KEEL_OK ||
        (e = keel_infer(req)) != KEEL_OK) {
        fprintf(stderr, "embed: infer: %s: %s\n", keel_strerror(e),
                req != NULL ? keel_request_error(req) : "");
        goto done;
    }
    if ((e = keel_request_output(req, 0, &out)) != KEEL_OK || out.datatype != KEEL_TYPE_FP32 ||
        out.bytes < sizeof(float)) {
        fprintf(stderr, "embed: no FP32 output\n");
        goto done;
    }
    printf("%.9g\n", (double)((const float *)out.data)[0]);
    rc = 0;
done:
    keel_request_destroy(req);
    keel_runtime_destroy(rt);
    return rc;
}
