/*
 * server_opts.c: the options of `keel serve`, its --help, and keel_server_main().
 *
 * DESIGN
 * Runs on the main thread before anything else starts; holds no state. Options take their
 * value as the next argument or after '='; every number is checked for range, and every
 * mistake is one "keel serve: ..." line on stderr and exit status 2.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cliutil.h"
#include "server.h"

void keel_server_opts_init(keel_server_opts *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->http_address = "127.0.0.1";
    opts->http_port = 8000;
    opts->control = KEEL_SERVER_CONTROL_NONE;
    opts->repository_poll_secs = 15;
    opts->repository_settle_ms = 1000;
    opts->load_retry_max_secs = 60;
    opts->http_threads = 2;
    opts->worker_threads = 0;
    opts->max_request_bytes = 64u << 20;
    opts->http_timeout_secs = 30;
    opts->max_connections = 1024;
    /* 16 KiB: headers up to ~15.5 KiB (Node.js's default limit is 16 KiB, nginx's one line
     * 8 KiB); libmicrohttpd clears the pool for every request, so its size is paid per
     * request (docs/PERFORMANCE.md, issue 11). */
    opts->http_connection_memory = 16u << 10;
    opts->infer_on_http_thread = KEEL_SERVER_INLINE_AUTO;
    opts->inline_max_us = 200;
    opts->exit_timeout_secs = 30;
    opts->stuck_exit_secs = 30;
    opts->shutdown_grace_secs = 1;
    opts->log_level = KEEL_LOG_INFO;
    opts->preprocess_workers = 2;
    opts->preprocess_timeout_ms = 10000;
    opts->preprocess_max_bytes = 64u << 20;
    opts->grpc_address = NULL; /* = --http-address */
    opts->grpc_port = 8001;
    opts->access_log = NULL;
    opts->access_log_json = false;
    opts->access_log_buffer_bytes = 1u << 20;
    keel__restrict_init(&opts->restricted);
}

void keel_server_opts_fini(keel_server_opts *opts)
{
    if (opts != NULL)
        keel__restrict_fini(&opts->restricted);
}

void keel_server_print_help(FILE *f)
{
    fputs("usage: keel serve --model-repository DIR [options]\n"
          "\n"
          "Serves the models of DIR over HTTP with the KServe V2 (Open Inference Protocol)\n"
          "REST API and Triton's binary-tensor, model-repository, statistics and\n"
          "model-configuration extensions, plus Prometheus metrics at /metrics.\n"
          "The same API is served over gRPC (service inference.GRPCInferenceService, Triton's\n"
          "and KServe's wire contract, and grpc.health.v1.Health/Check) on --grpc-port.\n"
          "When the sockets listen, lines go to standard output, HTTP's first:\n"
          "  level=info msg=listening address=ADDR port=PORT\n"
          "  level=info msg=listening protocol=grpc address=ADDR port=PORT\n"
          "Everything else is logged to standard error as logfmt lines.\n"
          "\n"
          "options:\n"
          "  --model-repository DIR      the model repository (required)\n"
          "  --http-address ADDR         IPv4 or IPv6 address to listen on (default 127.0.0.1)\n"
          "  --http-port N               port (default 8000; 0 = any free port)\n"
          "  --grpc-address ADDR         IPv4 or IPv6 address for gRPC (default: --http-address)\n"
          "  --grpc-port N               gRPC port (default 8001; 0 = any free port; -1 = no\n"
          "                              gRPC); a port in use is an error at start\n"
          "  --model-control-mode MODE   none (default): load every model at start, refuse\n"
          "                              load/unload requests; poll: as none, then watch the\n"
          "                              repository (inotify, plus a full scan every\n"
          "                              --repository-poll-secs), load new and changed models\n"
          "                              once their files have settled, unload removed ones;\n"
          "                              explicit: load nothing (but --load-model) at start,\n"
          "                              load/unload through the repository API\n"
          "  --repository-poll-secs N    poll mode: seconds between full scans (default 15)\n"
          "  --repository-settle-ms N    poll mode: a changed model loads once none of its\n"
          "                              files changed for N ms (default 1000)\n"
          "  --load-retry-max-secs N     none/poll: a failed load is retried after 1 s,\n"
          "                              doubling up to N seconds (default 60)\n"
          "  --model-memory-limit N      bytes all loaded models may hold (suffix k/m/g;\n"
          "                              default 0 = no limit); a load that would exceed it\n"
          "                              evicts the least recently used models not marked\n"
          "                              pinned, which load again on their next request\n"
          "  --load-model NAME           explicit mode: load NAME at start (repeatable);\n"
          "                              '*' loads every model of the repository\n"
          "  --http-threads N            HTTP event loops, one thread each (default 2)\n"
          "  --worker-threads N          inference threads (default 0 = number of CPUs)\n"
          "  --max-request-bytes N       largest request body, suffix k/m/g allowed\n"
          "                              (default 64m); larger bodies get 413, larger gRPC\n"
          "                              messages RESOURCE_EXHAUSTED (at most 2047m with gRPC)\n"
          "  --http-timeout-secs N       close connections idle this long (default 30;\n"
          "                              0 = never)\n"
          "  --max-connections N         concurrent connections (default 1024)\n"
          "  --http-connection-memory N  bytes of libmicrohttpd's per-connection pool, suffix\n"
          "                              k/m/g (default 16k): it holds the request line and\n"
          "                              headers (larger ones get 414/431) and the read\n"
          "                              buffer, and is cleared for every request\n"
          "  --infer-on-io-thread auto|on|off\n"
          "                              (old name: --infer-on-http-thread) auto (default):\n"
          "                              when the model's queue is empty, a context is idle,\n"
          "                              it needs no preprocessing and its recent run time for\n"
          "                              that batch size is under --inline-max-us, the thread\n"
          "                              that decoded the request (an HTTP thread, or the gRPC\n"
          "                              completion-queue thread) runs the inference itself\n"
          "                              (no thread hand-off); otherwise an inference thread\n"
          "                              does; on: that thread runs every request that finds an\n"
          "                              idle context and an empty queue (other connections or\n"
          "                              calls it serves wait meanwhile); off: I/O threads\n"
          "                              never compute\n"
          "  --inline-max-us N           auto: a model runs on the I/O thread only if its\n"
          "                              estimated run time is below N microseconds (default\n"
          "                              200; 0 = never)\n"
          "  --shutdown-grace-secs N     on SIGTERM/SIGINT: not ready but still serving for\n"
          "                              N seconds (default 1)\n"
          "  --exit-timeout-secs N       then wait up to N seconds for requests in flight\n"
          "                              before cancelling them (default 30)\n"
          "  --stuck-exit-secs N         then wait up to N seconds for model calls still\n"
          "                              running (answered, but their backend has not\n"
          "                              returned); after that exit with status 3 without\n"
          "                              freeing them (default 30)\n"
          "  --preprocess-workers N      worker processes decoding images for models with a\n"
          "                              \"preprocess\" section (default 2; 0 = none, such\n"
          "                              models then fail to load)\n"
          "  --preprocess-timeout-ms N   deadline of one request's preprocessing when the\n"
          "                              request's own is later (default 10000); a worker\n"
          "                              that overruns it is killed and replaced\n"
          "  --preprocess-max-bytes N    encoded images plus decoded tensor of one request,\n"
          "                              suffix k/m/g (default 64m); larger ones get 400\n"
          "  --http-restricted-api GROUPS:KEY=VALUE\n"
          "                              requests to the API groups GROUPS (comma-separated:\n"
          "                              health, metadata, inference, model-config,\n"
          "                              model-repository, statistics, metrics, and Triton's\n"
          "                              shared-memory, trace, logging) need the header\n"
          "                              KEY: VALUE, else they get 403 (repeatable; a group in\n"
          "                              one rule only). VALUE may be @FILE: the value is read\n"
          "                              from FILE, so it does not show in ps\n"
          "  --log-level LEVEL           error, warn, info (default) or debug\n"
          "  --log-format logfmt         the log format (logfmt is the only one)\n"
          "  --access-log PATH|-         one line per request to PATH (appended; reopened on\n"
          "                              SIGHUP for logrotate) or to standard output (-);\n"
          "                              default off\n"
          "  --access-log-format FMT     logfmt (default) or json\n"
          "  --access-log-buffer-bytes N the access log's buffer, suffix k/m/g (default 1m);\n"
          "                              lines that do not fit while the disk is slow are\n"
          "                              dropped and counted, requests never wait\n"
          "  --trace-dir DIR             where Triton-format trace files go; enables\n"
          "                              tracing through /v2[/models/M]/trace/setting\n"
          "                              (trace_file names a file in DIR)\n"
          "  -h, --help                  print this help\n"
          "\n"
          "exit status: 0 clean shutdown, 1 runtime failure, 2 usage error\n",
          f);
}

/* The one copy of these lives in src/cliutil (shared with keel, keel perf and keel soak). */
#define usage(...) keel__cli_usage_error("keel serve", KEEL_SERVER_EXIT_USAGE, __VA_ARGS__)
#define parse_u64 keel__cli_parse_u64

/* A byte count with an optional binary suffix k, m or g, from 1 KiB to 1 TiB. */
static bool parse_bytes(const char *s, uint64_t *out)
{
    return keel__cli_parse_bytes(s, 1024, UINT64_C(1) << 40, out);
}

typedef enum opt_id {
    O_HELP,
    O_REPO,
    O_ADDR,
    O_PORT,
    O_GRPC_ADDR,
    O_GRPC_PORT,
    O_MODE,
    O_POLL,
    O_SETTLE,
    O_RETRY_MAX,
    O_MEM_LIMIT,
    O_LOAD,
    O_HTTP_THREADS,
    O_WORKERS,
    O_MAX_BYTES,
    O_HTTP_TIMEOUT,
    O_MAX_CONN,
    O_CONN_MEM,
    O_INLINE,
    O_INLINE_MAX,
    O_EXIT_TIMEOUT,
    O_STUCK_EXIT,
    O_GRACE,
    O_LOG_LEVEL,
    O_LOG_FORMAT,
    O_PREP_WORKERS,
    O_PREP_TIMEOUT,
    O_PREP_MAX_BYTES,
    O_RESTRICTED,
    O_ACCESS_LOG,
    O_ACCESS_LOG_FORMAT,
    O_ACCESS_LOG_BUFFER,
    O_TRACE_DIR,
} opt_id;

static const struct {
    const char *name;
    opt_id id;
    bool has_arg;
} options[] = {
    {"--help", O_HELP, false},
    {"-h", O_HELP, false},
    {"--model-repository", O_REPO, true},
    {"--http-address", O_ADDR, true},
    {"--http-port", O_PORT, true},
    {"--grpc-address", O_GRPC_ADDR, true},
    {"--grpc-port", O_GRPC_PORT, true},
    {"--model-control-mode", O_MODE, true},
    {"--repository-poll-secs", O_POLL, true},
    {"--repository-settle-ms", O_SETTLE, true},
    {"--load-retry-max-secs", O_RETRY_MAX, true},
    {"--model-memory-limit", O_MEM_LIMIT, true},
    {"--load-model", O_LOAD, true},
    {"--http-threads", O_HTTP_THREADS, true},
    {"--worker-threads", O_WORKERS, true},
    {"--max-request-bytes", O_MAX_BYTES, true},
    {"--http-timeout-secs", O_HTTP_TIMEOUT, true},
    {"--max-connections", O_MAX_CONN, true},
    {"--http-connection-memory", O_CONN_MEM, true},
    {"--infer-on-io-thread", O_INLINE, true},
    {"--infer-on-http-thread", O_INLINE, true}, /* the old name, kept working */
    {"--inline-max-us", O_INLINE_MAX, true},
    {"--exit-timeout-secs", O_EXIT_TIMEOUT, true},
    {"--stuck-exit-secs", O_STUCK_EXIT, true},
    {"--shutdown-grace-secs", O_GRACE, true},
    {"--log-level", O_LOG_LEVEL, true},
    {"--log-format", O_LOG_FORMAT, true},
    {"--preprocess-workers", O_PREP_WORKERS, true},
    {"--preprocess-timeout-ms", O_PREP_TIMEOUT, true},
    {"--preprocess-max-bytes", O_PREP_MAX_BYTES, true},
    {"--http-restricted-api", O_RESTRICTED, true},
    {"--access-log", O_ACCESS_LOG, true},
    {"--access-log-format", O_ACCESS_LOG_FORMAT, true},
    {"--access-log-buffer-bytes", O_ACCESS_LOG_BUFFER, true},
    {"--trace-dir", O_TRACE_DIR, true},
};

static int parse_args(int argc, char **argv, keel_server_opts *o)
{
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        const char *eq = strchr(arg, '=');
        size_t namelen = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
        const char *val = NULL;
        size_t k;
        uint64_t n;

        if (arg[0] != '-')
            return usage("unexpected argument '%s'", arg);
        for (k = 0; k < sizeof(options) / sizeof(options[0]); k++) {
            if (strlen(options[k].name) == namelen && strncmp(arg, options[k].name, namelen) == 0)
                break;
        }
        if (k == sizeof(options) / sizeof(options[0]))
            return usage("unknown option '%.*s'", (int)namelen, arg);
        if (options[k].has_arg) {
            if (eq != NULL)
                val = eq + 1;
            else if (i + 1 < argc)
                val = argv[++i];
            else
                return usage("option '%s' needs a value", arg);
        } else if (eq != NULL) {
            return usage("option '%.*s' takes no value", (int)namelen, arg);
        }

        switch (options[k].id) {
        case O_HELP:
            return -1;
        case O_REPO:
            o->model_repository = val;
            break;
        case O_ADDR:
            o->http_address = val;
            break;
        case O_PORT:
            if (!parse_u64(val, 0, 65535, &n))
                return usage("--http-port: '%s' is not a port (0-65535)", val);
            o->http_port = (int)n;
            break;
        case O_GRPC_ADDR:
            o->grpc_address = val;
            break;
        case O_GRPC_PORT:
            if (strcmp(val, "-1") == 0)
                o->grpc_port = -1;
            else if (!parse_u64(val, 0, 65535, &n))
                return usage("--grpc-port: '%s' is not a port (0-65535, or -1 for no gRPC)", val);
            else
                o->grpc_port = (int)n;
            break;
        case O_MODE:
            if (strcmp(val, "none") == 0)
                o->control = KEEL_SERVER_CONTROL_NONE;
            else if (strcmp(val, "poll") == 0)
                o->control = KEEL_SERVER_CONTROL_POLL;
            else if (strcmp(val, "explicit") == 0)
                o->control = KEEL_SERVER_CONTROL_EXPLICIT;
            else
                return usage("--model-control-mode: '%s' is not none, poll or explicit", val);
            break;
        case O_POLL:
            if (!parse_u64(val, 1, 86400, &n))
                return usage("--repository-poll-secs: '%s' is not a number of seconds "
                             "(1-86400)",
                             val);
            o->repository_poll_secs = (unsigned)n;
            break;
        case O_SETTLE:
            if (!parse_u64(val, 0, 600000, &n))
                return usage("--repository-settle-ms: '%s' is not a number of milliseconds "
                             "(0-600000)",
                             val);
            o->repository_settle_ms = (unsigned)n;
            break;
        case O_RETRY_MAX:
            if (!parse_u64(val, 1, 86400, &n))
                return usage("--load-retry-max-secs: '%s' is not a number of seconds (1-86400)",
                             val);
            o->load_retry_max_secs = (unsigned)n;
            break;
        case O_MEM_LIMIT:
            if (strcmp(val, "0") == 0)
                o->model_memory_limit = 0;
            else if (!parse_bytes(val, &o->model_memory_limit))
                return usage("--model-memory-limit: '%s' is not a byte count (0, or 1k to 1024g; "
                             "suffix k/m/g)",
                             val);
            break;
        case O_LOAD:
            if (val[0] == '\0')
                return usage("--load-model needs a model name");
            if (o->nload_models == KEEL_SERVER_MAX_LOAD_MODELS)
                return usage("--load-model: at most %d models", KEEL_SERVER_MAX_LOAD_MODELS);
            o->load_models[o->nload_models++] = val;
            break;
        case O_PREP_WORKERS:
            if (!parse_u64(val, 0, 64, &n))
                return usage("--preprocess-workers: '%s' is not a process count (0-64)", val);
            o->preprocess_workers = (int)n;
            break;
        case O_PREP_TIMEOUT:
            if (!parse_u64(val, 1, 3600000, &n))
                return usage("--preprocess-timeout-ms: '%s' is not a number of milliseconds "
                             "(1-3600000)",
                             val);
            o->preprocess_timeout_ms = (unsigned)n;
            break;
        case O_PREP_MAX_BYTES:
            if (!parse_bytes(val, &o->preprocess_max_bytes))
                return usage("--preprocess-max-bytes: '%s' is not a byte count (1k to 1024g; "
                             "suffix k/m/g)",
                             val);
            break;
        case O_HTTP_THREADS:
            if (!parse_u64(val, 1, 256, &n))
                return usage("--http-threads: '%s' is not a thread count (1-256)", val);
            o->http_threads = (unsigned)n;
            break;
        case O_WORKERS:
            if (!parse_u64(val, 0, 64, &n))
                return usage("--worker-threads: '%s' is not a thread count (0-64)", val);
            o->worker_threads = (int)n;
            break;
        case O_MAX_BYTES:
            if (!parse_bytes(val, &n))
                return usage("--max-request-bytes: '%s' is not a size from 1k to 1024g", val);
            o->max_request_bytes = n;
            break;
        case O_HTTP_TIMEOUT:
            if (!parse_u64(val, 0, 86400, &n))
                return usage("--http-timeout-secs: '%s' is not a number of seconds (0-86400)", val);
            o->http_timeout_secs = (unsigned)n;
            break;
        case O_CONN_MEM:
            if (!keel__cli_parse_bytes(val, 1024, UINT64_C(1) << 30, &n) || n < 4096)
                return usage("--http-connection-memory: '%s' is not a byte count (4k-1g)", val);
            o->http_connection_memory = (unsigned)n;
            break;
        case O_MAX_CONN:
            if (!parse_u64(val, 1, 65536, &n))
                return usage("--max-connections: '%s' is not a count (1-65536)", val);
            o->max_connections = (unsigned)n;
            break;
        case O_INLINE:
            if (strcmp(val, "auto") == 0)
                o->infer_on_http_thread = KEEL_SERVER_INLINE_AUTO;
            else if (strcmp(val, "on") == 0)
                o->infer_on_http_thread = KEEL_SERVER_INLINE_ON;
            else if (strcmp(val, "off") == 0)
                o->infer_on_http_thread = KEEL_SERVER_INLINE_OFF;
            else
                return usage("%s: '%s' is not auto, on or off", options[k].name, val);
            break;
        case O_INLINE_MAX:
            if (!parse_u64(val, 0, 1000000, &n))
                return usage("--inline-max-us: '%s' is not a number of microseconds (0-1000000)",
                             val);
            o->inline_max_us = (unsigned)n;
            break;
        case O_EXIT_TIMEOUT:
            if (!parse_u64(val, 0, 86400, &n))
                return usage("--exit-timeout-secs: '%s' is not a number of seconds (0-86400)", val);
            o->exit_timeout_secs = (unsigned)n;
            break;
        case O_STUCK_EXIT:
            if (!parse_u64(val, 0, 86400, &n))
                return usage("--stuck-exit-secs: '%s' is not a number of seconds (0-86400)", val);
            o->stuck_exit_secs = (unsigned)n;
            break;
        case O_GRACE:
            if (!parse_u64(val, 0, 3600, &n))
                return usage("--shutdown-grace-secs: '%s' is not a number of seconds (0-3600)",
                             val);
            o->shutdown_grace_secs = (unsigned)n;
            break;
        case O_LOG_LEVEL:
            if (strcmp(val, "error") == 0)
                o->log_level = KEEL_LOG_ERROR;
            else if (strcmp(val, "warn") == 0 || strcmp(val, "warning") == 0)
                o->log_level = KEEL_LOG_WARN;
            else if (strcmp(val, "info") == 0)
                o->log_level = KEEL_LOG_INFO;
            else if (strcmp(val, "debug") == 0)
                o->log_level = KEEL_LOG_DEBUG;
            else
                return usage("--log-level: '%s' is not error, warn, info or debug", val);
            break;
        case O_ACCESS_LOG:
            if (val[0] == '\0')
                return usage("--access-log needs a path (or - for standard output)");
            o->access_log = val;
            break;
        case O_ACCESS_LOG_FORMAT:
            if (strcmp(val, "logfmt") == 0)
                o->access_log_json = false;
            else if (strcmp(val, "json") == 0)
                o->access_log_json = true;
            else
                return usage("--access-log-format: '%s' is not logfmt or json", val);
            break;
        case O_ACCESS_LOG_BUFFER:
            if (!parse_bytes(val, &n) || n > (UINT64_C(1) << 30))
                return usage("--access-log-buffer-bytes: '%s' is not a size from 1k to 1g", val);
            o->access_log_buffer_bytes = n;
            break;
        case O_TRACE_DIR:
            if (val[0] == '\0')
                return usage("--trace-dir needs a directory");
            o->trace_dir = val;
            break;
        case O_LOG_FORMAT:
            if (strcmp(val, "logfmt") != 0)
                return usage("--log-format: '%s' is not supported (only logfmt)", val);
            break;
        case O_RESTRICTED: {
            char msg[512];
            /* The message never holds the value; the groups and the key are not secret. */
            if (!keel__restrict_add(&o->restricted, val, msg, sizeof(msg)))
                return usage("--http-restricted-api: %s", msg);
            break;
        }
        }
    }
    if (o->model_repository == NULL || o->model_repository[0] == '\0')
        return usage("--model-repository DIR is required");
    if (o->http_address[0] == '\0')
        return usage("--http-address needs an address");
    if (o->grpc_address != NULL && o->grpc_address[0] == '\0')
        return usage("--grpc-address needs an address");
    if (o->grpc_port >= 0 && o->max_request_bytes > (uint64_t)INT32_MAX)
        return usage("--max-request-bytes: gRPC messages are limited to %" PRId32
                     " bytes; give at most 2047m, or --grpc-port -1",
                     INT32_MAX);
    if (o->nload_models > 0 && o->control != KEEL_SERVER_CONTROL_EXPLICIT)
        return usage("--load-model needs --model-control-mode explicit");
    for (size_t i = 0; i < o->nload_models && o->nload_models > 1; i++)
        if (strcmp(o->load_models[i], "*") == 0)
            return usage("--load-model '*' loads every model: give no other --load-model");
    return KEEL_SERVER_EXIT_OK;
}

int keel_server_parse_args(int argc, char **argv, keel_server_opts *o)
{
    int rc;

    keel_server_opts_init(o);
    if ((rc = parse_args(argc, argv, o)) != KEEL_SERVER_EXIT_OK)
        keel_server_opts_fini(o);
    return rc;
}

int keel_server_main(int argc, char **argv)
{
    keel_server_opts o;
    int rc = keel_server_parse_args(argc, argv, &o);

    if (rc == -1) {
        keel_server_print_help(stdout);
        return fflush(stdout) == 0 ? KEEL_SERVER_EXIT_OK : KEEL_SERVER_EXIT_RUNTIME;
    }
    if (rc != KEEL_SERVER_EXIT_OK)
        return rc;
    rc = keel_server_run(&o);
    keel_server_opts_fini(&o);
    return rc;
}
