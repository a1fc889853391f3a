/*
 * pbtxt.h: Triton's config.pbtxt (protobuf text format of inference.ModelConfig) read into
 * the JSON form config.c validates. The C interface over pbtxt.cpp, keel's second C++ file.
 *
 * DESIGN
 * Why protobuf's own TextFormat (Debian libprotobuf-dev) through a C++ shim, rather than
 * protobuf-c or a hand-written reader: the text format has many corners (nested '<' '>'
 * blocks, list syntax, string concatenation, escapes, '#' comments, 'f' float suffixes,
 * enum names or numbers) and Triton parses config.pbtxt with exactly this parser, so keel
 * accepts the same files, with the same rules, by construction. protobuf-c has no text
 * format. keel's schema is src/repository/proto/model_config.proto (a subset of Triton's,
 * field numbers and types identical), compiled by protoc at build time.
 *
 * The parser runs with unknown fields allowed: each field the schema does not declare is
 * skipped and reported (message type, field name, line, column) so that config.c, which
 * owns the table of Triton fields and what keel does with each, can refuse it, warn about
 * it or call it a typo with a suggestion. Every other problem (syntax, a wrong type, an
 * unknown enum value, a duplicate singular field, an integer out of range, non-UTF-8 text)
 * is an error naming the file, line and column. Lines and columns are 1-based.
 *
 * No state and no locks; any thread may call it. Every C++ exception (std::bad_alloc
 * included) is caught at this boundary: nothing aborts or prints.
 */
#ifndef KEEL_REPOSITORY_PBTXT_H
#define KEEL_REPOSITORY_PBTXT_H

#include <stddef.h>

#include "keel/keel.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Parses the text (len bytes, need not be NUL-terminated; path is for messages only).
 * On KEEL_OK *out is a keel__malloc'd JSON document owned by the caller:
 *   {"config": <the ModelConfig in protobuf's JSON form, proto field names>,
 *    "skipped": [["ModelConfig", "sequence_batching", line, column], ...],
 *    "where": {"input[0].dims[1]": [line, column], ...}}
 * "where" gives the position of every field that was set, by config.c's path names, so its
 * messages about values can point into the file. On error the return is KEEL_ECONFIG (or
 * KEEL_ENOMEM) and errbuf holds "<path>:<line>:<column>: <message>"; *out is NULL, except
 * after a syntax error that followed skipped fields: then it is {"skipped": [...]} (owned by
 * the caller), because protobuf cannot skip every form of unknown field and the section it
 * failed in may be one config.c refuses with a clearer message.
 */
keel_err keel__pbtxt_to_json(const char *path, const char *text, size_t len, char **out,
                             char *errbuf, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
