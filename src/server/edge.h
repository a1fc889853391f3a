/*
 * edge.h: checks at the edge of the server that need no HTTP library: the raw request target
 * (NUL bytes, encoded slashes) and the removal of repository paths from error messages.
 *
 * DESIGN
 * Pure functions over strings plus one read-only table (keel_redact) built on the main thread
 * before the server starts and read by any thread afterwards; no locks. The HTTP server calls
 * them from its handler (server_guard.c); a gRPC front end can call them on its own strings.
 */
#ifndef KEEL_SERVER_EDGE_H
#define KEEL_SERVER_EDGE_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Checks a request target as the client sent it (before percent-decoding). raw holds len
 * bytes (len may exceed strlen(raw): a NUL inside is what is looked for). Returns 0, or 400
 * with the reason in msg: a NUL byte, raw or encoded (%00), anywhere in the target; an encoded
 * slash (%2F) in the path, which would otherwise decode into a separator inside a model name.
 */
unsigned keel__edge_check_target(const char *raw, size_t len, char *msg, size_t msglen);

/*
 * Whether a model name taken from a URL is one keel could serve: not empty, at most 255 bytes,
 * not starting with '.' (".", "..", hidden directories), no '/', no control character (the
 * repository's own rule). Returns 0, or 400 with the reason in msg.
 */
unsigned keel__edge_check_model_name(const char *name, char *msg, size_t msglen);

/* The repository's root as messages spell it: as configured and as resolved, JSON-escaped. */
typedef struct keel_redact {
    char *roots[2];
    size_t nroots;
} keel_redact;

/* Builds the table for the repository root repo (borrowed). false on ENOMEM. */
bool keel__redact_init(keel_redact *r, const char *repo);
void keel__redact_fini(keel_redact *r);

#define KEEL_REDACTED_PATH "<repository path>"

/*
 * Replaces every path inside the repository found in text (len bytes; JSON text or plain
 * text) by KEEL_REDACTED_PATH: a root at the start of a word, followed by '/' or the end of
 * the word, up to the end of that word (a blank, a quote, ':', ',', ';', ')' or ']').
 * Returns a malloc'd copy (length in *outlen) if anything was replaced, else NULL (also on
 * ENOMEM, when the caller should not send the text; *outlen is then (size_t)-1).
 */
char *keel__redact(const keel_redact *r, const char *text, size_t len, size_t *outlen);

#endif
