/*
 * server.h: `keel serve`, the KServe V2 / Open Inference Protocol HTTP server.
 *
 * DESIGN
 * The server is a program built on the public API (keel/keel.h) and nothing else of libkeel.
 * This header is what the command line (src/cli/keel.c) needs: parse the `serve` options and
 * run the server until SIGTERM or SIGINT. Both functions are meant for the main thread of a
 * process that runs one server: keel_server_run() blocks SIGTERM, SIGINT, SIGHUP (reopens
 * the access log) and ignores SIGPIPE
 * for the whole process before it starts any thread, and logs to stderr.
 *
 * Exit codes: 0 clean shutdown, 1 runtime failure (repository missing, cannot listen, ...),
 * 2 usage error.
 */
#ifndef KEEL_SERVER_SERVER_H
#define KEEL_SERVER_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "keel/keel.h"
#include "restrict.h"

/* KEEL_SERVER_EXIT_STUCK: shut down, but model calls still running after the drain outlasted
 * --stuck-exit-secs, so the process exited without waiting for them or freeing the runtime
 * (the process's exit frees everything; the cause is logged). */
enum {
    KEEL_SERVER_EXIT_OK = 0,
    KEEL_SERVER_EXIT_RUNTIME = 1,
    KEEL_SERVER_EXIT_USAGE = 2,
    KEEL_SERVER_EXIT_STUCK = 3
};

typedef enum keel_server_control {
    KEEL_SERVER_CONTROL_NONE = 0, /* load every model at start; load/unload API refused */
    KEEL_SERVER_CONTROL_POLL,     /* as NONE, then re-scan the repository periodically */
    KEEL_SERVER_CONTROL_EXPLICIT, /* load only --load-model models; the API loads/unloads */
} keel_server_control;

#define KEEL_SERVER_MAX_LOAD_MODELS 64

typedef enum keel_server_inline {
    KEEL_SERVER_INLINE_AUTO = 0,
    KEEL_SERVER_INLINE_ON,
    KEEL_SERVER_INLINE_OFF,
} keel_server_inline;

typedef struct keel_server_opts {
    const char *model_repository;  /* required; borrowed */
    const char *http_address;      /* default "127.0.0.1"; IPv4 or IPv6 literal */
    int http_port;                 /* default 8000; 0 = any free port */
    const char *grpc_address;      /* default NULL = http_address */
    int grpc_port;                 /* default 8001; 0 = any free port; -1 = no gRPC */
    keel_server_control control;   /* default NONE */
    unsigned repository_poll_secs; /* POLL: seconds between full scans; default 15 */
    unsigned repository_settle_ms; /* POLL: quiet time before a changed model loads; 1000 */
    unsigned load_retry_max_secs;  /* NONE/POLL: longest wait between load retries; 60 */
    uint64_t model_memory_limit;   /* bytes all models may hold; 0 = no limit */
    unsigned http_threads;         /* libmicrohttpd thread pool; default 2 */
    int worker_threads;            /* keel inference threads; 0 = CPUs */
    uint64_t max_request_bytes;    /* default 64 MiB */
    unsigned http_timeout_secs;    /* idle connection timeout; default 30 */
    unsigned max_connections;      /* default 1024 */
    /* libmicrohttpd's per-connection memory pool (headers and its read buffer; it bounds the
     * header size and is cleared for every request): default 16 KiB. */
    unsigned http_connection_memory;
    /* Where an infer runs (--infer-on-io-thread, old name --infer-on-http-thread; HTTP and
     * gRPC): AUTO (default) on the I/O thread that decoded it when the model
     * is fast (keel_runtime_opts.inline_max_us, KEEL_SUBMIT_RUN_IF_FAST), else on an
     * inference thread; ON whenever a context is idle (KEEL_SUBMIT_RUN_HERE); OFF never. */
    keel_server_inline infer_on_http_thread;
    unsigned inline_max_us;       /* AUTO's bound on a model's estimated run time; default 200 */
    unsigned exit_timeout_secs;   /* drain bound at shutdown; default 30 */
    unsigned stuck_exit_secs;     /* then bound on waiting for running model calls; default 30 */
    unsigned shutdown_grace_secs; /* not-ready-but-serving time at shutdown; default 1 */
    keel_log_level log_level;     /* default KEEL_LOG_INFO */
    /* Image preprocessing processes (default 2; 0 = none), the deadline of one request's
     * preprocessing (default 10000 ms) and its byte limit (default 64 MiB). */
    int preprocess_workers;
    unsigned preprocess_timeout_ms;
    uint64_t preprocess_max_bytes;
    /* Access log: NULL = off (default), "-" = standard output, else a file appended to and
     * reopened on SIGHUP; json = one JSON object per line instead of logfmt; the writer's
     * two buffers hold access_log_buffer_bytes each (default 1 MiB): lines beyond are
     * dropped and counted, never waited for. */
    const char *access_log;
    bool access_log_json;
    uint64_t access_log_buffer_bytes;
    /* Triton's trace extension: the directory trace files are written to (NULL = tracing
     * cannot be turned on through /v2/trace/setting). */
    const char *trace_dir;
    const char *load_models[KEEL_SERVER_MAX_LOAD_MODELS]; /* EXPLICIT: loaded at start */
    size_t nload_models;
    /* --http-restricted-api rules (owned: keys and values, some read from files). */
    keel_restrict restricted;
} keel_server_opts;

void keel_server_opts_init(keel_server_opts *opts);
/* Frees what parsing allocated (the restricted-API rules). */
void keel_server_opts_fini(keel_server_opts *opts);

/*
 * Parses the options of `keel serve` (argv[0] is the first option, not the program name).
 * Returns KEEL_SERVER_EXIT_OK, KEEL_SERVER_EXIT_USAGE after printing why to stderr, or -1 if
 * --help was asked for (the caller prints keel_server_print_help()). Values are borrowed from
 * argv, except the restricted-API rules: call keel_server_opts_fini() after a KEEL_SERVER_EXIT_OK
 * (on any other return nothing is left to free).
 */
int keel_server_parse_args(int argc, char **argv, keel_server_opts *opts);
void keel_server_print_help(FILE *f);

/* Runs the server until SIGTERM/SIGINT and a clean shutdown. Returns an exit code. */
int keel_server_run(const keel_server_opts *opts);

/* parse + run: the body of `keel serve`. */
int keel_server_main(int argc, char **argv);

#endif
