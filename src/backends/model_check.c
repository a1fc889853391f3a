/*
 * model_check.c: runs keel-model-check on a model's bytes and turns how it ended into a load
 * error (see model_check.h for the design).
 *
 * DESIGN
 * One call: locate the helper, copy the bytes into a memfd, build the environment (this
 * process's, GLIBC_TUNABLES replaced by a malloc perturb byte), run the child through
 * core/child.c with the deadline, read its one-line verdict. Everything allocated here is
 * released before returning.
 *
 * Passed checks are remembered: a process-wide ring of the SHA-256 digests (OpenSSL's
 * libcrypto) of the last PASSED_MAX checks that passed, each over the helper's path, its
 * arguments and the bytes. The same bytes checked the same way are not checked again, so a
 * reload of an unchanged file (an eviction reload, a repository poll, a load/unload cycle)
 * costs a hash, not a process (measured in docs/PERFORMANCE.md). A failed check is never
 * remembered. The ring's lock, passed_mu, is a leaf: held only to compare or copy digests,
 * never while the child runs; any thread may call in, several at once.
 */
#include "backends/model_check.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/child.h"
#include "core/core.h"

extern char **environ;

#define DEFAULT_CHECK_TIMEOUT_MS 60000
#define CHECK_REPLY_LEN 1024
#define MAX_ARGS 256
#define PASSED_MAX 64
#define DIGEST_LEN 32

static pthread_mutex_t passed_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned char passed[PASSED_MAX][DIGEST_LEN]; /* under passed_mu */
static size_t npassed, passed_next;                  /* under passed_mu */

/* SHA-256 over argv (each with its NUL) then the bytes; false if libcrypto failed. */
static bool check_digest(char *const argv[], const keel__model_check *c,
                         unsigned char out[DIGEST_LEN])
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned int len = 0;
    bool ok = ctx != NULL && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1;

    for (size_t i = 0; ok && argv[i] != NULL; i++)
        ok = EVP_DigestUpdate(ctx, argv[i], strlen(argv[i]) + 1) == 1;
    ok = ok && EVP_DigestUpdate(ctx, c->bytes, c->len) == 1 &&
         EVP_DigestFinal_ex(ctx, out, &len) == 1 && len == DIGEST_LEN;
    EVP_MD_CTX_free(ctx);
    return ok;
}

static bool passed_before(const unsigned char d[DIGEST_LEN])
{
    bool found = false;

    pthread_mutex_lock(&passed_mu);
    for (size_t i = 0; i < npassed && !found; i++)
        found = memcmp(passed[i], d, DIGEST_LEN) == 0;
    pthread_mutex_unlock(&passed_mu);
    return found;
}

static void remember_passed(const unsigned char d[DIGEST_LEN])
{
    pthread_mutex_lock(&passed_mu);
    memcpy(passed[passed_next], d, DIGEST_LEN);
    passed_next = (passed_next + 1) % PASSED_MAX;
    if (npassed < PASSED_MAX)
        npassed++;
    pthread_mutex_unlock(&passed_mu);
}

/* The helper's absolute path into buf: $KEEL_MODEL_CHECK, else beside /proc/self/exe (keel and
 * the tests), else where `cmake --install` put it (a program embedding an installed libkeel). */
static bool helper_path(char *buf, size_t len)
{
    const char *env = getenv("KEEL_MODEL_CHECK");
    char exe[PATH_MAX];
    ssize_t n;
    char *slash;

    if (env != NULL && env[0] != '\0')
        return (size_t)snprintf(buf, len, "%s", env) < len;
    if ((n = readlink("/proc/self/exe", exe, sizeof(exe) - 1)) <= 0)
        return false;
    exe[n] = '\0';
    if ((slash = strrchr(exe, '/')) == NULL)
        return false;
    *slash = '\0';
    if ((size_t)snprintf(buf, len, "%s/keel-model-check", exe) >= len)
        return false;
#ifdef KEEL_MODEL_CHECK_INSTALLED
    if (access(buf, X_OK) != 0)
        return (size_t)snprintf(buf, len, "%s", KEEL_MODEL_CHECK_INSTALLED) < len;
#endif
    return true;
}

static uint64_t check_timeout_ms(void)
{
    const char *env = getenv("KEEL_MODEL_CHECK_TIMEOUT_MS");
    char *end;
    unsigned long long v;

    if (env == NULL || env[0] == '\0')
        return DEFAULT_CHECK_TIMEOUT_MS;
    errno = 0;
    v = strtoull(env, &end, 10);
    if (errno != 0 || *end != '\0' || v == 0)
        return DEFAULT_CHECK_TIMEOUT_MS;
    return v;
}

/* The reply's message line, with control characters replaced, into out. */
static void reply_message(const char *reply, char *out, size_t len)
{
    size_t i = 0;

    if (strncmp(reply, "error: ", 7) == 0)
        reply += 7;
    for (; reply[i] != '\0' && reply[i] != '\n' && i + 1 < len && i < 400; i++)
        out[i] = (unsigned char)reply[i] < 0x20 || reply[i] == 0x7f ? '?' : reply[i];
    out[i] = '\0';
}

/* The model's bytes in a memfd, read from the start (-1 and a message on failure). */
static int bytes_memfd(const keel__model_check *c, keel_err *err, char *errbuf, size_t errlen)
{
    size_t off = 0;
    int fd;

    if ((fd = memfd_create("keel-model-check", MFD_CLOEXEC)) == -1) {
        keel__errf(errbuf, errlen, "%s: memfd_create: %s", c->path, strerror(errno));
        *err = errno == EMFILE || errno == ENFILE || errno == ENOMEM ? KEEL_ENOMEM : KEEL_EIO;
        return -1;
    }
    while (off < c->len) {
        ssize_t n = write(fd, (const char *)c->bytes + off, c->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            keel__errf(errbuf, errlen, "%s: writing the model to a memfd: %s", c->path,
                       strerror(errno));
            *err = errno == ENOMEM || errno == ENOSPC ? KEEL_ENOMEM : KEEL_EIO;
            close(fd);
            return -1;
        }
        off += (size_t)n;
    }
    if (lseek(fd, 0, SEEK_SET) != 0) {
        keel__errf(errbuf, errlen, "%s: lseek on the memfd: %s", c->path, strerror(errno));
        *err = KEEL_EIO;
        close(fd);
        return -1;
    }
    return fd;
}

/*
 * The checker's environment: this process's, with GLIBC_TUNABLES replaced by a malloc perturb
 * byte. glibc then fills every block it hands out with 0xaa and every block freed with 0x55,
 * so a pointer a parser reads from uninitialised, stale or out-of-bounds heap memory is
 * 0xaaaa... or 0x5555..., never a valid address, and the bad access faults in the checker
 * instead of passing by luck (measured: the ONNX test data's Dropout-with-mask model, which
 * reads past its output blobs, faulted in 2 of 4 perturb values and passed without one).
 * Sanitizer builds replace malloc, so there the tunable does nothing. Returns a malloc'd array
 * of borrowed strings (free the array only), or NULL.
 */
static char **checker_env(void)
{
    static char perturb[] = "GLIBC_TUNABLES=glibc.malloc.perturb=85";
    size_t n = 0, k = 0;
    char **env;

    while (environ[n] != NULL)
        n++;
    if ((env = keel__calloc(n + 2, sizeof(*env))) == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (strncmp(environ[i], "GLIBC_TUNABLES=", 15) != 0)
            env[k++] = environ[i];
    }
    env[k++] = perturb;
    env[k] = NULL;
    return env;
}

keel_err keel__model_check_run(const keel__model_check *c, char *errbuf, size_t errlen)
{
    char helper[PATH_MAX], reply[CHECK_REPLY_LEN], msg[420], sub[256];
    char *argv[MAX_ARGS + 4];
    char **env = NULL;
    unsigned char digest[DIGEST_LEN];
    bool have_digest;
    uint64_t timeout = check_timeout_ms();
    keel__child_result res;
    size_t a = 0;
    int fd = -1;
    keel_err err;

    if (!helper_path(helper, sizeof(helper))) {
        keel__errf(errbuf, errlen, "%s: cannot locate keel-model-check (set KEEL_MODEL_CHECK)",
                   c->path);
        return KEEL_ELOAD;
    }
    if (access(helper, X_OK) != 0) {
        keel__errf(errbuf, errlen,
                   "%s: the model check helper %s is not executable (%s); install it beside "
                   "the program or set KEEL_MODEL_CHECK",
                   c->path, helper, strerror(errno));
        return KEEL_ELOAD;
    }
    argv[a++] = helper;
    argv[a++] = (char *)c->kind;
    argv[a++] = (char *)c->path;
    for (size_t i = 0; c->args != NULL && c->args[i] != NULL; i++) {
        if (a == MAX_ARGS) {
            keel__errf(errbuf, errlen, "%s: too many arguments for the model check", c->path);
            return KEEL_ELOAD;
        }
        argv[a++] = c->args[i];
    }
    argv[a] = NULL;
    /* The path (argv[2]) is a name for messages: the same bytes under another name pass. */
    argv[2] = (char *)"-";
    have_digest = check_digest(argv, c, digest);
    argv[2] = (char *)c->path;
    if (have_digest && passed_before(digest))
        return KEEL_OK;
    if ((env = checker_env()) == NULL) {
        keel__errf(errbuf, errlen, "%s: out of memory starting the model check", c->path);
        return KEEL_ENOMEM;
    }
    if ((fd = bytes_memfd(c, &err, errbuf, errlen)) == -1)
        goto done;
    if ((err = keel__child_run(argv, env, fd, timeout, reply, sizeof(reply), &res, sub,
                               sizeof(sub))) != KEEL_OK) {
        keel__errf(errbuf, errlen, "%s: model check: %s", c->path, sub);
        goto done;
    }
    reply_message(reply, msg, sizeof(msg));
    err = KEEL_ELOAD;
    switch (res.end) {
    case KEEL__CHILD_TIMEDOUT:
        keel__errf(errbuf, errlen,
                   "%s: the model check (%s) did not finish within %" PRIu64 " ms and was "
                   "killed (KEEL_MODEL_CHECK_TIMEOUT_MS); the file is malformed or too large",
                   c->path, c->library, timeout);
        break;
    case KEEL__CHILD_SIGNALED:
        keel__errf(errbuf, errlen,
                   "%s: %s crashed on this model file (signal %d, %s) in the "
                   "model check; the file is malformed or unsupported",
                   c->path, c->library, res.status, strsignal(res.status));
        break;
    case KEEL__CHILD_EXITED:
        if (res.status == 0 && strncmp(reply, "ok\n", 3) == 0) {
            err = KEEL_OK;
            if (have_digest)
                remember_passed(digest);
        } else if (strncmp(reply, "error: ", 7) == 0)
            keel__errf(errbuf, errlen, "%s", msg); /* the helper names the file itself */
        else
            keel__errf(errbuf, errlen,
                       "%s: the model check exited with status %d without a verdict (a crash "
                       "caught by a sanitizer, or a broken helper)",
                       c->path, res.status);
        break;
    }

done:
    if (fd != -1)
        close(fd);
    free(env);
    return err;
}
