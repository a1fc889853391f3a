/*
 * model_check.h: check a model file's bytes in keel-model-check, a child process, before a
 * backend parses them in the server.
 *
 * DESIGN
 * Some backends' parsers crash or hang on malformed files (OpenCV's ONNX importer and forward,
 * XGBoost's JSON/UBJSON reader and tree walk). A backend's model_load hands the bytes it
 * read to keel__model_check_run, which runs `keel-model-check <kind> <path> <args...>` (the
 * tool, src/tools/keel_model_check.c) through core/child.c with the bytes on its stdin (a
 * memfd: the child checks exactly what this process will load), a deadline, and an
 * environment whose malloc perturbs freed and fresh memory (so a bad access faults in the
 * child instead of passing by luck). The load fails with a message naming the file and what
 * happened: the helper's own error, the signal it died of, or the deadline it ran past. No
 * state, no locks: any thread may call it (keel's loader threads do), several at once.
 *
 * The helper is found through $KEEL_MODEL_CHECK, else as keel-model-check beside the running
 * executable (/proc/self/exe), else where `cmake --install` put it; its deadline is
 * $KEEL_MODEL_CHECK_TIMEOUT_MS (default 60000).
 */
#ifndef KEEL_BACKENDS_MODEL_CHECK_H
#define KEEL_BACKENDS_MODEL_CHECK_H

#include <stddef.h>

#include "keel/keel.h"

typedef struct keel__model_check {
    const char *kind;    /* the helper's first argument: "onnx", "xgboost" */
    const char *library; /* whose parser is guarded, for messages: "OpenCV", "XGBoost" */
    const char *path;    /* the file, for messages and the helper's NAME argument */
    const void *bytes;   /* borrowed */
    size_t len;
    char *const *args; /* further arguments (NULL-terminated), or NULL */
} keel__model_check;

/* KEEL_OK only if the helper exited 0 after replying "ok"; else KEEL_ELOAD (or KEEL_ENOMEM,
 * KEEL_EIO when it could not be run) with a message in errbuf that names the file. */
keel_err keel__model_check_run(const keel__model_check *c, char *errbuf, size_t errlen);

#endif
