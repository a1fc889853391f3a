/*
 * perf.c: `keel perf`, a KServe V2 load generator (HTTP, or gRPC with --protocol grpc) in the
 * manner of Triton's perf_analyzer.
 *
 * DESIGN
 * Parses the options, prepares the workload (model metadata, request bodies;
 * src/perf/perf_bodies.c), then runs one measurement per load level: a concurrency sweep (closed
 * loop) or a request-rate sweep (open loop, latency from each request's due time). Per level it
 * prints one table row on standard output and, with --csv, one CSV row; the progress line goes to
 * standard error only when it is a terminal. Single-threaded. Exit status: 0 every measured request
 * succeeded, 1 some failed (or the run could not start), 2 usage error.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "perf_internal.h"

static void perf_help(FILE *f)
{
    fputs("usage: keel perf [options]\n"
          "\n"
          "Drives a KServe V2 server (keel serve, or any other) with inference requests over\n"
          "HTTP keep-alive connections or gRPC, and reports throughput and latency per load\n"
          "level.\n"
          "\n"
          "target:\n"
          "  -u, --url HOST:PORT           the server (default 127.0.0.1:8000, with --protocol\n"
          "                                grpc 127.0.0.1:8001; http:// allowed)\n"
          "  -i, --protocol http|grpc      HTTP/1.1 (default) or gRPC: ModelInfer calls with\n"
          "                                raw_input_contents (inference.GRPCInferenceService)\n"
          "  --grpc-stream                 gRPC: ModelStreamInfer, one stream per concurrent\n"
          "                                request, one message in flight on each\n"
          "  --grpc-channels N             gRPC: spread the calls over N channels (HTTP/2\n"
          "                                connections; default 1, as Triton's client)\n"
          "  -m, --model NAME              the model to infer on\n"
          "  --model-version N             a specific version (default: the server's choice)\n"
          "  --endpoint PATH               GET PATH instead of inferring (e.g. /v2/health/live:\n"
          "                                shows what the generator itself can drive)\n"
          "load (one of):\n"
          "  --concurrency-range A[:B[:S]] closed loop: A, A+S, ... B requests in flight, one\n"
          "                                per connection (gRPC: calls or streams; default 1)\n"
          "  --request-rate-range A[:B[:S]] open loop: A, A+S, ... B requests per second sent on\n"
          "                                schedule; latency counts from the scheduled time\n"
          "  --max-connections N           open loop: connection pool (gRPC: calls in flight;\n"
          "                                default 64)\n"
          "requests:\n"
          "  -b, --batch-size N            rows per request (default 1)\n"
          "  --input-tensor-format json|binary\n"
          "                                JSON data arrays (default) or Triton's binary tensor\n"
          "                                extension (outputs are then asked for in binary too);\n"
          "                                HTTP only (gRPC sends raw_input_contents)\n"
          "  --input-data random|zero|FILE random values within the model's shapes (default),\n"
          "                                zeros, or rows of numbers from FILE (as keel infer\n"
          "                                reads them; one-input models), used in turn\n"
          "  --input NAME:TYPE:D1xD2...    the request shape of an input, batch included (skips\n"
          "                                the metadata request; repeatable)\n"
          "  --seed N                      seed of the random data (default fixed)\n"
          "measurement:\n"
          "  --warmup SECS                 unmeasured seconds before each level (default 1)\n"
          "  -d, --duration SECS           measured seconds per level (default 5)\n"
          "  --timeout SECS                a request not answered in time fails (default 30)\n"
          "  -f, --csv FILE                write one CSV row per level to FILE\n"
          "  --no-progress                 no progress line on a terminal\n"
          "  -h, --help                    print this help\n"
          "\n"
          "Output: per level, requests per second, inferences (rows) per second, latency\n"
          "p50/p90/p99/p99.9/max of the successful requests, and failed requests by HTTP status\n"
          "or transport error (connect, reset, timeout, protocol); over gRPC by status name\n"
          "(NOT_FOUND, UNAVAILABLE, DEADLINE_EXCEEDED, ...) and stream_error (a stream answer\n"
          "with an error_message). Latencies are kept in a\n"
          "histogram with 0.1 % relative precision. The generator's own CPU time per request\n"
          "is reported too (its thread's user + system time over the requests it sent), so a\n"
          "run shows how far the generator is from being the bottleneck.\n"
          "exit status: 0 no request failed, 1 some failed or the run could not start, 2 usage\n",
          f);
}

#define perf_usage(...) keel__cli_usage_error("keel perf", PERF_EXIT_USAGE, __VA_ARGS__)

/* "A", "A:B" or "A:B:S" of positive numbers. */
static bool parse_range(const char *s, double *a, double *b, double *step, double max)
{
    char tmp[128], *p1, *p2;

    if (strlen(s) >= sizeof(tmp))
        return false;
    strcpy(tmp, s);
    p1 = strchr(tmp, ':');
    if (p1 != NULL)
        *p1++ = '\0';
    p2 = p1 != NULL ? strchr(p1, ':') : NULL;
    if (p2 != NULL)
        *p2++ = '\0';
    if (!keel__cli_parse_double(tmp, 1e-3, max, a))
        return false;
    *b = *a;
    *step = 1;
    if (p1 != NULL && !keel__cli_parse_double(p1, *a, max, b))
        return false;
    if (p2 != NULL && !keel__cli_parse_double(p2, 1e-3, max, step))
        return false;
    return true;
}

static double us(uint64_t ns)
{
    return (double)ns / 1e3;
}

int keel_perf_main(int argc, char **argv)
{
    perf_workload w;
    perf_data_opts d = {.input_data = "random", .seed = 0, .variants = 16};
    perf_load_opts lo = {.concurrency = 1,
                         .max_connections = 64,
                         .warmup_s = 1,
                         .duration_s = 5,
                         .timeout_s = 30,
                         .progress = true};
    const char *url = NULL, *csv_path = NULL, *format = NULL;
    double ra = 1, rb = 1, rs = 1;
    bool rate_mode = false, any_failed = false;
    uint64_t batch = 1;
    char err[512];
    FILE *csv = NULL;
    int rc = PERF_EXIT_RUNTIME;

    memset(&w, 0, sizeof(w));
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        char name[64];
        const char *eq = strchr(a, '=');
        size_t nl = eq != NULL && a[0] == '-' && a[1] == '-' ? (size_t)(eq - a) : strlen(a);
        if (nl >= sizeof(name))
            return perf_usage("unknown option '%s'", a);
        memcpy(name, a, nl);
        name[nl] = '\0';
#define TAKE()                                                                                     \
    do {                                                                                           \
        if (eq != NULL && nl < strlen(a))                                                          \
            v = eq + 1;                                                                            \
        else if (i + 1 < argc)                                                                     \
            v = argv[++i];                                                                         \
        else                                                                                       \
            return perf_usage("option '%s' needs a value", name);                                  \
    } while (0)
        if (strcmp(name, "-h") == 0 || strcmp(name, "--help") == 0) {
            perf_help(stdout);
            return PERF_EXIT_OK;
        } else if (strcmp(name, "-u") == 0 || strcmp(name, "--url") == 0) {
            TAKE();
            url = v;
        } else if (strcmp(name, "-i") == 0 || strcmp(name, "--protocol") == 0) {
            TAKE();
            if (strcmp(v, "http") != 0 && strcmp(v, "grpc") != 0)
                return perf_usage("--protocol: '%s' is not http or grpc", v);
            w.grpc = strcmp(v, "grpc") == 0;
        } else if (strcmp(name, "--grpc-stream") == 0) {
            w.stream = true;
        } else if (strcmp(name, "--grpc-channels") == 0) {
            uint64_t x;
            TAKE();
            if (!keel__cli_parse_u64(v, 1, 1024, &x))
                return perf_usage("--grpc-channels: '%s' is not in 1..1024", v);
            lo.grpc_channels = (unsigned)x;
        } else if (strcmp(name, "-m") == 0 || strcmp(name, "--model") == 0) {
            TAKE();
            w.model = (char *)v;
        } else if (strcmp(name, "--model-version") == 0) {
            uint64_t x;
            TAKE();
            if (!keel__cli_parse_u64(v, 0, INT64_MAX, &x))
                return perf_usage("--model-version: '%s' is not a version number", v);
            w.version = (char *)v;
        } else if (strcmp(name, "--endpoint") == 0) {
            TAKE();
            if (v[0] != '/')
                return perf_usage("--endpoint: '%s' does not start with /", v);
            w.endpoint = (char *)v;
        } else if (strcmp(name, "--concurrency-range") == 0) {
            TAKE();
            if (!parse_range(v, &ra, &rb, &rs, 100000) || ra != (double)(uint64_t)ra ||
                rb != (double)(uint64_t)rb || rs != (double)(uint64_t)rs || ra < 1)
                return perf_usage("--concurrency-range: '%s' is not A[:B[:STEP]] of whole "
                                  "numbers >= 1",
                                  v);
            rate_mode = false;
        } else if (strcmp(name, "--request-rate-range") == 0) {
            TAKE();
            if (!parse_range(v, &ra, &rb, &rs, 1e7))
                return perf_usage("--request-rate-range: '%s' is not A[:B[:STEP]] of positive "
                                  "numbers",
                                  v);
            rate_mode = true;
        } else if (strcmp(name, "--max-connections") == 0) {
            uint64_t x;
            TAKE();
            if (!keel__cli_parse_u64(v, 1, 100000, &x))
                return perf_usage("--max-connections: '%s' is not in 1..100000", v);
            lo.max_connections = (unsigned)x;
        } else if (strcmp(name, "-b") == 0 || strcmp(name, "--batch-size") == 0) {
            TAKE();
            if (!keel__cli_parse_u64(v, 1, 1u << 20, &batch))
                return perf_usage("--batch-size: '%s' is not in 1..1048576", v);
        } else if (strcmp(name, "--input-tensor-format") == 0) {
            TAKE();
            if (strcmp(v, "json") != 0 && strcmp(v, "binary") != 0)
                return perf_usage("--input-tensor-format: '%s' is not json or binary", v);
            format = v;
        } else if (strcmp(name, "--input-data") == 0) {
            TAKE();
            d.input_data = v;
        } else if (strcmp(name, "--input") == 0) {
            TAKE();
            if (w.ninputs == sizeof(w.inputs) / sizeof(w.inputs[0]))
                return perf_usage("too many --input options");
            if (!perf_input_spec_parse(v, &w.inputs[w.ninputs]))
                return perf_usage("--input: '%s' is not NAME:DATATYPE:D1xD2...", v);
            w.ninputs++;
        } else if (strcmp(name, "--seed") == 0) {
            TAKE();
            if (!keel__cli_parse_u64(v, 1, UINT64_MAX, &d.seed))
                return perf_usage("--seed: '%s' is not a positive integer", v);
        } else if (strcmp(name, "--warmup") == 0) {
            TAKE();
            if (!keel__cli_parse_double(v, 0, 86400, &lo.warmup_s))
                return perf_usage("--warmup: '%s' is not in 0..86400 seconds", v);
        } else if (strcmp(name, "-d") == 0 || strcmp(name, "--duration") == 0) {
            TAKE();
            if (!keel__cli_parse_double(v, 0.01, 86400 * 30, &lo.duration_s))
                return perf_usage("--duration: '%s' is not a positive number of seconds", v);
        } else if (strcmp(name, "--timeout") == 0) {
            TAKE();
            if (!keel__cli_parse_double(v, 0.001, 3600, &lo.timeout_s))
                return perf_usage("--timeout: '%s' is not in 0.001..3600 seconds", v);
        } else if (strcmp(name, "-f") == 0 || strcmp(name, "--csv") == 0) {
            TAKE();
            csv_path = v;
        } else if (strcmp(name, "--no-progress") == 0) {
            lo.progress = false;
        } else if (a[0] == '-') {
            return perf_usage("unknown option '%s'", a);
        } else {
            return perf_usage("unexpected argument '%s'", a);
        }
#undef TAKE
    }
    if ((w.model == NULL) == (w.endpoint == NULL))
        return perf_usage("give exactly one of --model and --endpoint");
    if (!w.grpc && (w.stream || lo.grpc_channels > 0))
        return perf_usage("--grpc-stream and --grpc-channels need --protocol grpc");
    if (w.grpc && w.endpoint != NULL)
        return perf_usage("--endpoint is HTTP only");
    if (w.grpc && format != NULL)
        return perf_usage("--input-tensor-format is HTTP only (gRPC sends raw_input_contents)");
    if (url == NULL)
        url = w.grpc ? "127.0.0.1:8001" : "127.0.0.1:8000";
    w.batch = (unsigned)batch;
    w.binary = format != NULL && strcmp(format, "binary") == 0;
    if (!perf_target_parse(url, &w.target, err, sizeof(err))) {
        fprintf(stderr, "keel perf: %s\n", err);
        return PERF_EXIT_USAGE;
    }
    if (w.ninputs > 0 && batch != 1)
        return perf_usage("--batch-size with --input: give the batch in the --input shape");
    if (!perf_workload_prepare(&w, &d, err, sizeof(err))) {
        fprintf(stderr, "keel perf: %s\n", err);
        goto done;
    }
    if (csv_path != NULL) {
        if ((csv = fopen(csv_path, "we")) == NULL) {
            fprintf(stderr, "keel perf: %s: %s\n", csv_path, strerror(errno));
            goto done;
        }
        fputs("mode,level,window_s,requests,ok,failed,throughput_rps,infer_per_s,p50_us,p90_us,"
              "p99_us,p999_us,max_us,mean_us,unsent,connections,gen_cpu_us_per_req,errors\n",
              csv);
    }
    if (w.endpoint != NULL)
        printf("keel perf: GET %s on %s:%s, ", w.endpoint, w.target.host, w.target.port);
    else
        printf("keel perf: model %s%s%s on %s:%s, batch %u, %s, ", w.model,
               w.version != NULL ? " version " : "", w.version != NULL ? w.version : "",
               w.target.host, w.target.port, w.batch,
               w.stream   ? "gRPC ModelStreamInfer"
               : w.grpc   ? "gRPC ModelInfer"
               : w.binary ? "binary tensors"
                          : "JSON tensors");
    printf("%.3g s per level after %.3g s warm-up\n", lo.duration_s, lo.warmup_s);
    printf("%12s %10s %10s %9s %9s %9s %9s %9s %8s  %s\n", rate_mode ? "rate/s" : "concurrency",
           "req/s", "infer/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "failed",
           "errors");
    fflush(stdout);
    for (double level = ra; level <= rb + 1e-9; level += rs) {
        perf_result r;
        char label[64], errs[512];
        double rps, ips, gen_us;
        uint64_t rows0 = 0, execs0 = 0, rows1 = 0, execs1 = 0;
        bool have_rows;
        if (!perf_result_init(&r)) {
            fprintf(stderr, "keel perf: out of memory\n");
            goto done;
        }
        if (rate_mode) {
            lo.rate = level;
            snprintf(label, sizeof(label), "rate %.6g/s", level);
        } else {
            lo.rate = 0;
            lo.concurrency = (unsigned)level;
            snprintf(label, sizeof(label), "concurrency %u", lo.concurrency);
        }
        lo.label = label;
        have_rows = perf_server_rows(&w, &rows0, &execs0);
        if (!perf_load_run(&w, &lo, &r, err, sizeof(err))) {
            fprintf(stderr, "keel perf: %s\n", err);
            perf_result_fini(&r);
            goto done;
        }
        rps = r.window_s > 0 ? (double)r.completed / r.window_s : 0;
        ips = w.endpoint != NULL ? rps : rps * w.batch;
        perf_result_errors(&r, errs, sizeof(errs));
        {
            char q[5][32];
            const double qs[4] = {0.50, 0.90, 0.99, 0.999};
            for (int k = 0; k < 5; k++) {
                uint64_t ns = k < 4 ? perf_hist_quantile(&r.hist, qs[k]) : r.hist.max;
                if (r.hist.total == 0)
                    snprintf(q[k], sizeof(q[k]), "-");
                else
                    snprintf(q[k], sizeof(q[k]), "%.3f", (double)ns / 1e6);
            }
            printf("%12.6g %10.0f %10.0f %9s %9s %9s %9s %9s %8" PRIu64 "  %s%s\n", level, rps, ips,
                   q[0], q[1], q[2], q[3], q[4], r.failed, errs[0] != '\0' ? errs : "-",
                   r.unsent > 0 ? "  (generator fell behind)" : "");
        }
        if (r.unsent > 0)
            printf("%12s %" PRIu64 " requests due in the window were never sent: every one of "
                   "the %u %s was busy (raise --max-connections or lower the rate)\n",
                   "", r.unsent, lo.max_connections, w.grpc ? "call slots" : "connections");
        for (size_t k = 0; k < r.nnotes; k++)
            printf("%12s failure: %s\n", "", r.notes[k]);
        fflush(stdout);
        {
            uint64_t sent = r.ok + r.failed;
            gen_us = sent > 0 ? r.cpu_s * 1e6 / (double)sent : 0.0;
        }
        printf("%12s generator: %.1f us of CPU per request, %.0f %% of one core\n", "", gen_us,
               r.elapsed_s > 0 ? 100.0 * r.cpu_s / r.elapsed_s : 0.0);
        /* The server's side: rows per backend call over the level (warm-up included; other
         * clients' requests too), from the statistics extension. */
        if (have_rows && perf_server_rows(&w, &rows1, &execs1) && execs1 > execs0)
            printf("%12s server: %" PRIu64 " rows in %" PRIu64
                   " backend executions, average batch %.2f\n",
                   "", rows1 - rows0, execs1 - execs0,
                   (double)(rows1 - rows0) / (double)(execs1 - execs0));
        if (csv != NULL)
            fprintf(csv,
                    "%s,%.6g,%.3f,%" PRIu64 ",%" PRIu64 ",%" PRIu64
                    ",%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%" PRIu64 ",%" PRIu64 ",%.2f,%s\n",
                    rate_mode ? "rate" : "concurrency", level, r.window_s, r.completed, r.ok,
                    r.failed, rps, ips, us(perf_hist_quantile(&r.hist, 0.50)),
                    us(perf_hist_quantile(&r.hist, 0.90)), us(perf_hist_quantile(&r.hist, 0.99)),
                    us(perf_hist_quantile(&r.hist, 0.999)), us(r.hist.max),
                    r.hist.total > 0 ? r.hist.sum / (double)r.hist.total / 1e3 : 0.0, r.unsent,
                    r.max_conns, gen_us, errs);
        if (r.failed > 0)
            any_failed = true;
        perf_result_fini(&r);
    }
    rc = any_failed ? PERF_EXIT_RUNTIME : PERF_EXIT_OK;
done:
    if (csv != NULL && fclose(csv) != 0) {
        fprintf(stderr, "keel perf: %s: write error\n", csv_path);
        rc = PERF_EXIT_RUNTIME;
    }
    perf_workload_fini(&w);
    return rc;
}
