/*
 * config.h: a model's configuration (config.json or Triton's config.pbtxt), parsed and
 * validated.
 *
 * DESIGN
 * config.json is the JSON form of Triton's model configuration; config.pbtxt is its protobuf
 * text form, turned into the same JSON by pbtxt.cpp, so one validator serves both (see
 * docs/OPERATIONS.md for the fields and what keel does with each Triton field). Validation
 * is strict: an unknown field is an error (with the nearest known name when one is close),
 * a Triton field keel cannot honour is an error saying so, and the few that are harmless
 * to ignore become warnings in cfg->warnings. Triton's backend "fil" becomes keel's
 * "xgboost" and "onnxruntime" (or platform "onnxruntime_onnx") keel's "onnx". keel__config_parse()
 * turns the file's bytes into an immutable keel__model_config that a generation owns; nothing here
 * holds locks or threads, and every function may be called from any thread on distinct objects. A
 * parse error names the file, the field (as a JSON path, e.g. "input[1].dims[0]") and what was
 * expected.
 */
#ifndef KEEL_REPOSITORY_CONFIG_H
#define KEEL_REPOSITORY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

#define KEEL__MAX_DIMS 8
#define KEEL__DEFAULT_MAX_QUEUE_SIZE 1024
#define KEEL__DEFAULT_INSTANCE_COUNT 1
#define KEEL__MAX_INSTANCE_COUNT 64

typedef struct keel__tensor_config {
    char *name;
    keel_datatype datatype;
    int64_t dims[KEEL__MAX_DIMS]; /* -1 = variable; batch dimension NOT included */
    size_t ndims;
} keel__tensor_config;

typedef enum keel__version_policy_kind {
    KEEL__POLICY_LATEST = 0,
    KEEL__POLICY_ALL,
    KEEL__POLICY_SPECIFIC,
} keel__version_policy_kind;

/* How a reload replaces a serving generation (config.json "keel": {"swap_policy": ...}). */
typedef enum keel__swap_policy {
    KEEL__SWAP_AVAILABILITY = 0, /* build and warm the new one, then retire the old (default) */
    KEEL__SWAP_RESOURCE,         /* retire and free the old one first, then build the new one:
                                    requests wait (within their deadlines) meanwhile */
} keel__swap_policy;

/* config.json "preprocess": clients send encoded images as the BYTES input `input`; a
 * preprocessing worker decodes, converts, resizes and normalises them into the FP32 model
 * input `output_input` (docs/OPERATIONS.md). Validated against the model's inputs at parse. */
typedef struct keel__preprocess_config {
    char *input;        /* the BYTES input clients send; not one of the model's inputs */
    char *output_input; /* the model's FP32 input it becomes */
    int format;         /* 0 auto, 1 jpeg, 2 png (keel__img_format) */
    int color;          /* 0 RGB, 1 GRAY */
    int layout;         /* 0 NCHW, 1 NHWC */
    uint32_t width, height;
    float scale; /* value = (pixel * scale - mean[c]) / std[c]; default 1/255, 0, 1 */
    float mean[3], std[3];
    uint64_t max_pixels;     /* decoded pixels per image; default 25,000,000 */
    uint64_t max_file_bytes; /* one encoded image; default 16 MiB */
} keel__preprocess_config;

/* What a request past its queue timeout gets (Triton's ModelQueuePolicy.TimeoutAction). */
typedef enum keel__timeout_action {
    KEEL__TIMEOUT_REJECT = 0, /* answered KEEL_ETIMEDOUT at its deadline, while it waits */
    KEEL__TIMEOUT_DELAY,      /* moved behind every request not past its timeout */
} keel__timeout_action;

/* One priority level's queue policy (dynamic_batching.default_queue_policy, or an entry of
 * priority_queue_policy). */
typedef struct keel__queue_policy {
    keel__timeout_action timeout_action;
    uint64_t default_timeout_us; /* 0 = none */
    bool allow_timeout_override; /* a request's timeout may be longer than the default */
    uint32_t max_queue_size;     /* queued requests of the level; 0 = no bound of its own */
} keel__queue_policy;

#define KEEL__MAX_PRIORITY_LEVELS 16
#define KEEL__MAX_PREFERRED_SIZES 16

typedef struct keel__model_config {
    char *name;             /* must equal the model's directory name */
    char *backend;          /* "xgboost", ... */
    int64_t max_batch_size; /* 0 = no batch dimension */
    keel__tensor_config *inputs;
    size_t ninputs;
    keel__tensor_config *outputs;
    size_t noutputs;
    int instance_count; /* sum of instance_group[].count, default 1 */
    keel__version_policy_kind policy;
    uint32_t latest_n; /* for LATEST, default 1 */
    int64_t *versions; /* for SPECIFIC, sorted ascending, no duplicates */
    size_t nversions;
    uint32_t max_queue_size;     /* dynamic_batching.default_queue_policy; 0 in JSON = default */
    uint64_t default_timeout_us; /* 0 = none */
    /* dynamic_batching (present = batching on; requests queued together are merged into one
     * backend call when max_batch_size > 0; sched.c). */
    bool batching;
    int64_t preferred[KEEL__MAX_PREFERRED_SIZES]; /* ascending, unique; none = max_batch_size */
    size_t npreferred;
    uint64_t max_queue_delay_us;
    bool preserve_ordering;
    uint32_t priority_levels;        /* 0 = one level */
    uint32_t default_priority_level; /* 1..priority_levels; 0 when there are no levels */
    /* [0] is default_queue_policy; [1..priority_levels] each level's (a copy of the default
     * where priority_queue_policy does not name the level). default_timeout_us and
     * max_queue_size above are qpolicy[0]'s, max_queue_size with keel's default filled in. */
    keel__queue_policy qpolicy[KEEL__MAX_PRIORITY_LEVELS + 1];
    char *default_model_filename; /* NULL = backend's default */
    /* "parameters": {"key": {"string_value": "v"}} flattened to key/value pairs. */
    char **param_keys;
    char **param_values;
    size_t nparams;
    bool pinned;                         /* "keel": {"pinned": true}: never evicted */
    keel__swap_policy swap_policy;       /* "keel": {"swap_policy": ...} */
    keel__preprocess_config *preprocess; /* NULL = none */
    char *json;     /* the normalised config as JSON text (defaults filled in) */
    char *warnings; /* NULL, or one line per harmless field keel ignores (for the log) */
} keel__model_config;

/*
 * Parses config.json's bytes. path is used in messages only; dir_name is the model's
 * directory name (config "name" must match it; if "name" is missing it is filled in).
 * On KEEL_OK *out is owned by the caller (keel__config_destroy). On error *out is NULL, the
 * return is KEEL_ECONFIG (or KEEL_ENOMEM) and errbuf holds e.g.
 * "models/heart/config.json: input[0].data_type: expected a string like \"TYPE_FP32\"".
 */
keel_err keel__config_parse(const char *path, const char *dir_name, const char *text, size_t len,
                            keel__model_config **out, char *errbuf, size_t errlen);

/* Parses config.pbtxt's bytes (Triton's protobuf text format, through pbtxt.h) with the same
 * rules and messages as keel__config_parse; messages about a field also give its line and
 * column ("models/m/config.pbtxt:7:5: input[0].dims[0]: ..."). */
keel_err keel__config_parse_pbtxt(const char *path, const char *dir_name, const char *text,
                                  size_t len, keel__model_config **out, char *errbuf,
                                  size_t errlen);

/* Reads the file at path and parses it, as config.pbtxt if the name ends in ".pbtxt", else
 * as config.json (errors name the file; a missing file is ECONFIG). */
keel_err keel__config_load(const char *path, const char *dir_name, keel__model_config **out,
                           char *errbuf, size_t errlen);

/* The configuration file of <model_dir>: config.json or config.pbtxt. Both present is
 * KEEL_ECONFIG naming both; neither is KEEL_ECONFIG. On KEEL_OK *path is malloc'd. */
keel_err keel__config_find(const char *model_dir, char **path, char *errbuf, size_t errlen);

/* Whether <model_dir> has a config.json or a config.pbtxt (a model folder). */
bool keel__config_exists(const char *model_dir);

/* keel__config_find + keel__config_load. */
keel_err keel__config_load_dir(const char *model_dir, const char *dir_name,
                               keel__model_config **out, char *errbuf, size_t errlen);

void keel__config_destroy(keel__model_config *cfg);

/* Rebuilds cfg->json after a backend filled in inputs or outputs config.json left out
 * (backends that read them from the model file: "onnx"). KEEL_OK or KEEL_ENOMEM. */
keel_err keel__config_rebuild_json(keel__model_config *cfg);

/* Looks up a parameter value; NULL if absent. */
const char *keel__config_param(const keel__model_config *cfg, const char *key);

/*
 * Scans <model_dir> for numeric version folders and applies the policy. On KEEL_OK *out is a
 * malloc'd ascending array of the versions to serve (possibly empty) and *count its size.
 * A SPECIFIC version without its folder is KEEL_ECONFIG naming the folder.
 */
keel_err keel__config_select_versions(const keel__model_config *cfg, const char *model_dir,
                                      int64_t **out, size_t *count, char *errbuf, size_t errlen);

#endif
