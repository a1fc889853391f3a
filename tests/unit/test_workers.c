/*
 * test_workers.c: the preprocessing pool (src/workers): processes, descriptors, supervision,
 * limits, teardown, and image decoding against references keel did not write.
 *
 * - A worker's /proc/PID/fd holds exactly stdin/stdout (/dev/null), stderr and one socket;
 *   neither it nor the fork server (one thread) holds a descriptor the parent opened first.
 * - kill -9 of a worker mid-task (also before it read its task): that task fails with a
 *   message naming signal 9 within its deadline, a new worker runs within 2 s, no zombie, fds
 *   and memfds back to the baseline.
 * - SIGSTOP of a worker: the deadline fires on time, the worker is replaced.
 * - Crash, exit, an unsealed result memfd, an over-limit task: each a clear error; restarts
 *   counted by cause. A worker that dies while idle is replaced without failing a task. A
 *   dead fork server makes the pool unhealthy and tasks fail at once.
 * - Teardown: no process, fd, memfd or zombie left. A zombie is not gone: the checks look at
 *   every descendant (workers are the fork server's children) and want /proc/PID absent.
 * - grace_hopper.jpg decoded in a worker equals `djpeg -ppm` byte for byte; libpng's
 *   interlaced pngtest.png equals PIL's RGB conversion byte for byte.
 * - Malformed images (truncated, random, a decompression bomb, a 100k x 100k header): an
 *   error naming the problem, and the worker stays alive.
 * - Resize and normalisation against properties computed here (block means, constants).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spng.h>

#include "repository/config.h"
#include "testutil.h"
#include "workers/image.h"
#include "workers/prep.h"

#if defined(__SANITIZE_THREAD__)
#define TU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TU_TSAN 1
#endif
#endif
#ifndef TU_TSAN
#define TU_TSAN 0
#endif

#define GRACE "/usr/share/matplotlib/mpl-data/sample_data/grace_hopper.jpg"
#define PNGTEST "/usr/share/doc/libpng-dev/examples/pngtest.png"

static char errbuf[512];

static keel__prep_pool *pool_open(int workers, uint32_t timeout_ms, uint64_t max_task)
{
    keel__prep_opts o;
    keel__prep_pool *p = NULL;

    keel__prep_opts_init(&o);
    o.workers = workers;
    o.task_timeout_ms = timeout_ms;
    if (max_task != 0)
        o.max_task_bytes = max_task;
    errbuf[0] = '\0';
    assert_int_equal(keel__prep_pool_create(&o, &p, errbuf, sizeof(errbuf)), KEEL_OK);
    return p;
}

#ifdef KEEL_FAULT_INJECTION /* helpers of the tests with the test task types */
/* Descriptors of this process whose link starts with "/memfd:". */
static int count_memfds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    assert_non_null(d);
    while ((e = readdir(d)) != NULL) {
        char path[300], link[256];
        ssize_t k;
        snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
        if ((k = readlink(path, link, sizeof(link) - 1)) <= 0)
            continue;
        link[k] = '\0';
        n += strncmp(link, "/memfd:", 7) == 0;
    }
    closedir(d);
    return n;
}

#endif

/* The state letter and parent of PID from /proc/PID/stat; false when there is no such process. */
static bool proc_stat(pid_t pid, char *state, pid_t *ppid)
{
    char path[64], buf[512], *rp;
    int pp = -1;
    bool ok = false;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return false;
    if (fgets(buf, sizeof(buf), f) != NULL && (rp = strrchr(buf, ')')) != NULL &&
        sscanf(rp + 1, " %c %d", state, &pp) == 2)
        ok = true;
    fclose(f);
    *ppid = pp;
    return ok;
}

/* True when PID is this process or one of its descendants (a worker is a child of the fork
 * server, not of this process, so its zombie would be missed by a look at direct children). */
static bool is_descendant(pid_t pid)
{
    pid_t self = getpid();
    for (int depth = 0; depth < 16 && pid > 1; depth++) {
        char st;
        pid_t ppid;
        if (pid == self)
            return true;
        if (!proc_stat(pid, &st, &ppid))
            return false;
        pid = ppid;
    }
    return pid == self;
}

/* Zombies anywhere below this process (children and the fork server's children alike). */
static int count_zombie_descendants(void)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;

    assert_non_null(d);
    while ((e = readdir(d)) != NULL) {
        char st;
        pid_t pid, ppid;
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        pid = (pid_t)atoi(e->d_name);
        if (proc_stat(pid, &st, &ppid) && st == 'Z' && is_descendant(ppid))
            n++;
    }
    closedir(d);
    return n;
}

#ifdef KEEL_FAULT_INJECTION /* only the tests with the test task types use these */
/* Running (or stopped): present and not a zombie. */
static bool process_exists(pid_t pid)
{
    char st = '?';
    pid_t ppid;

    if (!proc_stat(pid, &st, &ppid))
        return false;
    return st != 'Z' && st != 'X';
}

/* Gone means reaped: no /proc entry at all. A zombie is not gone, it is a process its parent
 * forgot to wait for. Waits up to ms for the parent to reap it. */
static bool process_gone(pid_t pid, int ms)
{
    char path[64];

    snprintf(path, sizeof(path), "/proc/%d", (int)pid);
    for (int t = 0;; t += 5) {
        if (access(path, F_OK) != 0)
            return true;
        if (t >= ms)
            return false;
        usleep(5000);
    }
}

#endif

/* The Threads: line of /proc/PID/status. */
static int proc_threads(pid_t pid)
{
    char path[64], line[256];
    FILE *f;
    int n = -1;

    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    assert_non_null(f = fopen(path, "r"));
    while (fgets(line, sizeof(line), f) != NULL) {
        if (sscanf(line, "Threads: %d", &n) == 1)
            break;
    }
    fclose(f);
    return n;
}

static pid_t only_worker(keel__prep_pool *p)
{
    pid_t pid = -1;
    assert_int_equal(keel__prep_worker_pids(p, &pid, 1), 1);
    return pid;
}

#ifdef KEEL_FAULT_INJECTION
/* Waits up to ms for a worker other than old to be listed; returns it or -1. */
static pid_t wait_new_worker(keel__prep_pool *p, pid_t old, int ms)
{
    for (int t = 0; t < ms; t += 5) {
        pid_t pid = -1;
        if (keel__prep_worker_pids(p, &pid, 1) == 1 && pid != old && process_exists(pid))
            return pid;
        usleep(5000);
    }
    return -1;
}

static void wait_busy(keel__prep_pool *p)
{
    keel__prep_stats s;
    for (int t = 0; t < 5000; t += 2) {
        keel__prep_stats_get(p, &s);
        if (s.bytes_in_flight > 0)
            return;
        usleep(2000);
    }
    fail_msg("no task became busy");
}

static keel_err echo(keel__prep_pool *p, uint32_t type, uint32_t param, size_t n)
{
    unsigned char *in = malloc(n + 1), *out = malloc(n + 1);
    keel_err err;

    for (size_t i = 0; i < n; i++)
        in[i] = (unsigned char)(i * 131 + 7);
    errbuf[0] = '\0';
    err = keel__prep_run(p, type, &param, sizeof(param), in, n, out, n, 0, errbuf, sizeof(errbuf));
    if (err == KEEL_OK)
        assert_memory_equal(in, out, n);
    free(in);
    free(out);
    return err;
}

#endif

/* ---- descriptors and processes */

static void list_fds(pid_t pid, char links[][256], int *n)
{
    char dir[64];
    DIR *d;
    struct dirent *e;

    *n = 0;
    snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)pid);
    assert_non_null(d = opendir(dir));
    while ((e = readdir(d)) != NULL) {
        char path[384];
        ssize_t k;
        int fd;
        if (e->d_name[0] == '.')
            continue;
        fd = atoi(e->d_name);
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        assert_true(fd < 16);
        k = readlink(path, links[fd], 255);
        assert_true(k > 0);
        links[fd][k] = '\0';
        (*n)++;
    }
    closedir(d);
}

static void test_worker_fds(void **state)
{
    int lsock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char *dir = tu_mkdtemp("workers-fds");
    char *file = tu_strf("%s/model.bin", dir);
    int ffd;
    keel__prep_pool *p;
    pid_t pids[2], fs;
    char links[16][256], marker_sock[256], marker_file[256], stderr_link[256];
    char status_path[64];
    int n;
    ssize_t k;

    (void)state;
    tu_write_file(file, "weights", (size_t)-1);
    ffd = open(file, O_RDONLY); /* deliberately without O_CLOEXEC */
    assert_true(lsock >= 0 && ffd >= 0);
    snprintf(status_path, sizeof(status_path), "/proc/self/fd/%d", lsock);
    k = readlink(status_path, marker_sock, sizeof(marker_sock) - 1);
    marker_sock[k > 0 ? k : 0] = '\0';
    snprintf(status_path, sizeof(status_path), "/proc/self/fd/%d", ffd);
    k = readlink(status_path, marker_file, sizeof(marker_file) - 1);
    marker_file[k > 0 ? k : 0] = '\0';
    k = readlink("/proc/self/fd/2", stderr_link, sizeof(stderr_link) - 1);
    stderr_link[k > 0 ? k : 0] = '\0';

    p = pool_open(2, 5000, 0);
    assert_int_equal(keel__prep_worker_pids(p, pids, 2), 2);
    for (int i = 0; i < 2; i++) {
        memset(links, 0, sizeof(links));
        list_fds(pids[i], links, &n);
        for (int j = 0; j < 16; j++)
            if (links[j][0] != '\0')
                print_message("worker %d fd %d -> %s\n", (int)pids[i], j, links[j]);
        assert_int_equal(n, 4);
        assert_string_equal(links[0], "/dev/null");
        assert_string_equal(links[1], "/dev/null");
        assert_string_equal(links[2], stderr_link);
        assert_true(strncmp(links[3], "socket:", 7) == 0);
        assert_string_not_equal(links[3], marker_sock);
    }
    fs = keel__prep_forkserver_pid(p);
    /* The fork server closes its copies of a new worker's socket and pidfd just after
     * replying: give it a moment. */
    for (int t = 0; t < 200; t++) {
        memset(links, 0, sizeof(links));
        list_fds(fs, links, &n);
        if (n == 5)
            break;
        usleep(5000);
    }
    assert_int_equal(n, 5); /* 0, 1, 2, the control socket, the SIGCHLD signalfd */
    for (int i = 0; i < 16; i++) {
        assert_string_not_equal(links[i], marker_sock);
        assert_string_not_equal(links[i], marker_file);
    }
    /* One thread: ThreadSanitizer's runtime restarts its background thread in a forked
     * child, which is the only other thread allowed. */
    assert_int_equal(proc_threads(fs), 1 + TU_TSAN);

    keel__prep_pool_destroy(p);
    close(lsock);
    close(ffd);
    tu_rm_rf(dir);
    free(dir);
    free(file);
}

/* The tests below drive the pool with the test task types (echo, sleep, crash, exit,
 * unsealed), which exist only where fault injection is compiled in (not in Release). */
#ifdef KEEL_FAULT_INJECTION
static void test_echo_and_teardown(void **state)
{
    int fds0 = tu_count_fds(), memfds0 = count_memfds();
    keel__prep_pool *p;
    keel__prep_stats s;
    pid_t pids[2], fs;

    (void)state;
    p = pool_open(2, 5000, 0);
    assert_int_equal(keel__prep_worker_pids(p, pids, 2), 2);
    fs = keel__prep_forkserver_pid(p);
    for (size_t n = 0; n < 3 * 1024 * 1024; n = n * 7 + 1)
        assert_int_equal(echo(p, KEEL__PREP_TASK_ECHO, 0, n), KEEL_OK);
    keel__prep_stats_get(p, &s);
    assert_true(s.healthy);
    assert_int_equal(s.workers_alive, 2);
    assert_int_equal(s.memfds_open, 0);
    assert_int_equal(s.bytes_in_flight, 0);
    assert_true(s.tasks_ok >= 8);
    assert_int_equal(count_memfds(), memfds0);
    keel__prep_pool_destroy(p);
    assert_int_equal(tu_count_fds(), fds0);
    assert_int_equal(count_memfds(), memfds0);
    assert_int_equal(count_zombie_descendants(), 0);
    assert_true(process_gone(fs, 0)); /* destroy waited for the fork server */
    assert_true(process_gone(pids[0], 2000));
    assert_true(process_gone(pids[1], 2000));
}

/* ---- supervision */

typedef struct bg_task {
    keel__prep_pool *p;
    uint32_t type, param;
    uint64_t deadline_ns;
    keel_err err;
    uint64_t elapsed_ns;
    char msg[512];
    pthread_t th;
} bg_task;

static void *bg_main(void *arg)
{
    bg_task *t = arg;
    unsigned char in[64] = {1, 2, 3}, out[64];
    uint64_t t0 = keel__now_ns();

    t->err = keel__prep_run(t->p, t->type, &t->param, sizeof(t->param), in, sizeof(in), out,
                            sizeof(out), t->deadline_ns, t->msg, sizeof(t->msg));
    t->elapsed_ns = keel__now_ns() - t0;
    return NULL;
}

static void bg_start(bg_task *t, keel__prep_pool *p, uint32_t type, uint32_t param,
                     uint64_t timeout_ms)
{
    memset(t, 0, sizeof(*t));
    t->p = p;
    t->type = type;
    t->param = param;
    t->deadline_ns = timeout_ms ? keel__now_ns() + timeout_ms * 1000000u : 0;
    assert_int_equal(pthread_create(&t->th, NULL, bg_main, t), 0);
}

static void test_kill9_mid_task(void **state)
{
    keel__prep_pool *p = pool_open(1, 10000, 0);
    int fds0 = tu_count_fds(), memfds0 = count_memfds();
    keel__prep_stats s;
    bg_task t;
    pid_t victim, fresh;
    uint64_t killed_at;

    (void)state;
    victim = only_worker(p);
    bg_start(&t, p, KEEL__PREP_TASK_SLEEP, 5000, 3000);
    wait_busy(p);
    usleep(20000); /* the worker is in its sleep */
    killed_at = keel__now_ns();
    assert_int_equal(kill(victim, SIGKILL), 0);
    pthread_join(t.th, NULL);
    assert_int_equal(t.err, KEEL_EBACKEND);
    assert_non_null(strstr(t.msg, "signal 9"));
    assert_true(keel__now_ns() - killed_at < 2000000000ull); /* well within its deadline */
    assert_true((fresh = wait_new_worker(p, victim, 2000)) > 0);
    assert_true(process_gone(victim, 2000)); /* reaped by the fork server, not a zombie */
    assert_int_equal(count_zombie_descendants(), 0);
    assert_int_equal(tu_count_fds(), fds0);
    assert_int_equal(count_memfds(), memfds0);
    keel__prep_stats_get(p, &s);
    assert_int_equal(s.restarts_signal, 1);
    assert_int_equal(s.tasks_crashed, 1);
    assert_int_equal(s.workers_alive, 1);
    assert_int_equal(s.memfds_open, 0);
    assert_true(s.healthy);
    assert_int_equal(echo(p, KEEL__PREP_TASK_ECHO, 0, 1000), KEEL_OK); /* the new one works */
    keel__prep_pool_destroy(p);
}

/* Killed with the task still unread in its socket: the pool sees ECONNRESET, not a reply. */
static void test_kill9_before_reading(void **state)
{
    keel__prep_pool *p = pool_open(1, 10000, 0);
    keel__prep_stats s;
    bg_task t;
    pid_t victim = only_worker(p);

    (void)state;
    assert_int_equal(kill(victim, SIGSTOP), 0);
    bg_start(&t, p, KEEL__PREP_TASK_ECHO, 0, 3000);
    wait_busy(p);
    usleep(20000);
    assert_int_equal(kill(victim, SIGKILL), 0);
    pthread_join(t.th, NULL);
    assert_int_equal(t.err, KEEL_EBACKEND);
    assert_non_null(strstr(t.msg, "signal 9"));
    keel__prep_stats_get(p, &s);
    assert_int_equal(s.restarts_signal, 1);
    assert_int_equal(s.restarts_protocol, 0);
    assert_true(wait_new_worker(p, victim, 2000) > 0);
    assert_true(process_gone(victim, 2000));
    assert_int_equal(count_zombie_descendants(), 0);
    keel__prep_pool_destroy(p);
}

static void test_sigstop_deadline(void **state)
{
    keel__prep_pool *p = pool_open(1, 10000, 0);
    int fds0 = tu_count_fds();
    keel__prep_stats s;
    bg_task t;
    pid_t victim;

    (void)state;
    victim = only_worker(p);
    bg_start(&t, p, KEEL__PREP_TASK_SLEEP, 100, 600);
    wait_busy(p);
    assert_int_equal(kill(victim, SIGSTOP), 0);
    pthread_join(t.th, NULL);
    print_message("elapsed %llu ms: %s\n", (unsigned long long)(t.elapsed_ns / 1000000), t.msg);
    assert_int_equal(t.err, KEEL_ETIMEDOUT);
    assert_non_null(strstr(t.msg, "deadline"));
    assert_true(t.elapsed_ns < 600000000ull + 300000000ull); /* no longer than its deadline */
    assert_true(wait_new_worker(p, victim, 2000) > 0);
    assert_true(process_gone(victim, 2000)); /* reaped by the fork server, not a zombie */
    assert_int_equal(count_zombie_descendants(), 0);
    assert_int_equal(tu_count_fds(), fds0);
    keel__prep_stats_get(p, &s);
    assert_int_equal(s.restarts_timeout, 1);
    assert_int_equal(s.tasks_timeout, 1);

    /* The pool's own task timeout applies to a task without a deadline of its own. */
    keel__prep_pool_destroy(p);
    p = pool_open(1, 300, 0);
    bg_start(&t, p, KEEL__PREP_TASK_SLEEP, 5000, 0);
    pthread_join(t.th, NULL);
    assert_int_equal(t.err, KEEL_ETIMEDOUT);
    assert_true(t.elapsed_ns >= 290000000ull && t.elapsed_ns < 800000000ull);
    keel__prep_pool_destroy(p);
}

static void test_crash_exit_unsealed(void **state)
{
    keel__prep_pool *p = pool_open(2, 5000, 0);
    int fds0 = tu_count_fds(), memfds0 = count_memfds();
    keel__prep_stats s;

    (void)state;
    assert_int_equal(echo(p, KEEL__PREP_TASK_CRASH, 0, 64), KEEL_EBACKEND);
    assert_non_null(strstr(errbuf, "signal 11"));
    assert_int_equal(echo(p, KEEL__PREP_TASK_EXIT, 0, 64), KEEL_EBACKEND);
    assert_non_null(strstr(errbuf, "exited with status 3"));
    assert_int_equal(echo(p, KEEL__PREP_TASK_UNSEALED, 0, 64), KEEL_EBACKEND);
    assert_non_null(strstr(errbuf, "not sealed"));
    /* The others carry on. */
    for (int i = 0; i < 10; i++)
        assert_int_equal(echo(p, KEEL__PREP_TASK_ECHO, 0, 4096), KEEL_OK);
    for (int t = 0; t < 400; t++) { /* the supervisor replaces the last one meanwhile */
        keel__prep_stats_get(p, &s);
        if (s.workers_alive == 2)
            break;
        usleep(5000);
    }
    keel__prep_stats_get(p, &s);
    assert_int_equal(s.restarts_signal, 1);
    assert_int_equal(s.restarts_exit, 1);
    assert_int_equal(s.restarts_protocol, 1);
    assert_int_equal(s.tasks_crashed, 3);
    assert_int_equal(s.workers_alive, 2);
    assert_int_equal(count_zombie_descendants(), 0);
    assert_int_equal(tu_count_fds(), fds0);
    assert_int_equal(count_memfds(), memfds0);
    keel__prep_pool_destroy(p);
}

static void test_idle_death_and_limits(void **state)
{
    keel__prep_pool *p = pool_open(1, 5000, 1024 * 1024);
    keel__prep_stats s;
    pid_t victim = only_worker(p);

    (void)state;
    assert_int_equal(kill(victim, SIGKILL), 0);
    assert_true(process_gone(victim, 2000)); /* the fork server reaped it */
    assert_int_equal(count_zombie_descendants(), 0);
    assert_int_equal(echo(p, KEEL__PREP_TASK_ECHO, 0, 1000), KEEL_OK);
    keel__prep_stats_get(p, &s);
    assert_int_equal(s.restarts_signal, 1);
    assert_int_equal(s.tasks_crashed, 0);

    /* 600 KiB in + 600 KiB out > 1 MiB per task: refused before any worker sees it. */
    assert_int_equal(echo(p, KEEL__PREP_TASK_ECHO, 0, 600 * 1024), KEEL_ERESOURCE);
    assert_non_null(strstr(errbuf, "exceeds the limit of 1048576 bytes per task"));
    keel__prep_stats_get(p, &s);
    assert_int_equal(s.tasks_rejected, 1);
    assert_int_equal(s.restarts_signal + s.restarts_exit + s.restarts_timeout, 1);
    assert_int_equal(echo(p, KEEL__PREP_TASK_ECHO, 0, 500 * 1024), KEEL_OK);
    keel__prep_pool_destroy(p);
}

static void test_forkserver_death(void **state)
{
    int fds0 = tu_count_fds();
    keel__prep_pool *p = pool_open(2, 5000, 0);
    pid_t fs = keel__prep_forkserver_pid(p);
    pid_t pids[2];
    keel_err err = KEEL_OK;

    (void)state;
    assert_int_equal(keel__prep_worker_pids(p, pids, 2), 2);
    assert_true(keel__prep_healthy(p));
    assert_int_equal(kill(fs, SIGKILL), 0);
    usleep(100000);
    assert_false(keel__prep_healthy(p));
    assert_int_equal(count_zombie_descendants(), 0); /* healthy() reaped the fork server */
    /* Its workers die with it (PR_SET_PDEATHSIG); tasks then fail at once. They were
     * reparented to init when it died, so reaping them is init's job: not running is the
     * most this test can ask of them. */
    for (int i = 0; i < 50 && (process_exists(pids[0]) || process_exists(pids[1])); i++)
        usleep(20000);
    assert_false(process_exists(pids[0]));
    assert_false(process_exists(pids[1]));
    for (int i = 0; i < 3 && err != KEEL_EUNAVAILABLE; i++)
        err = echo(p, KEEL__PREP_TASK_ECHO, 0, 100);
    assert_int_equal(err, KEEL_EUNAVAILABLE);
    assert_non_null(strstr(errbuf, "fork server is gone"));
    keel__prep_pool_destroy(p);
    assert_int_equal(tu_count_fds(), fds0);
}

#endif /* KEEL_FAULT_INJECTION */

/* ---- images */

static keel__image_spec spec_identity(uint32_t w, uint32_t h, keel__img_color c)
{
    keel__image_spec s;

    memset(&s, 0, sizeof(s));
    s.format = KEEL__IMG_AUTO;
    s.color = c;
    s.layout = KEEL__IMG_NHWC;
    s.width = w;
    s.height = h;
    s.scale = 1.0f;
    for (int i = 0; i < 3; i++)
        s.std[i] = 1.0f;
    s.max_pixels = KEEL__IMAGE_DEFAULT_MAX_PIXELS;
    s.max_file_bytes = KEEL__IMAGE_DEFAULT_MAX_FILE_BYTES;
    return s;
}

/* Runs an image task for one encoded image through the pool. */
static keel_err image_via_pool(keel__prep_pool *p, const keel__image_spec *spec, const void *img,
                               size_t len, float *out)
{
    keel__image_task t = {.spec = *spec, .count = 1};
    unsigned char *in = malloc(len + 4);
    uint32_t l = (uint32_t)len;
    keel_err err;

    memcpy(in, &l, 4);
    memcpy(in + 4, img, len);
    errbuf[0] = '\0';
    err = keel__prep_run(p, KEEL__PREP_TASK_IMAGE, &t, sizeof(t), in, len + 4, out,
                         keel__image_tensor_elems(spec) * sizeof(float), 0, errbuf, sizeof(errbuf));
    free(in);
    return err;
}

/* Parses a binary PPM/PGM (maxval 255): returns the pixel bytes. */
static unsigned char *read_pnm(const char *path, int *w, int *h, int *channels)
{
    size_t len;
    char *data = tu_read_file(path, &len);
    char magic[3] = {0};
    int maxval, off = 0;
    unsigned char *px;

    assert_non_null(data);
    assert_int_equal(sscanf(data, "%2s %d %d %d%n", magic, w, h, &maxval, &off), 4);
    assert_int_equal(maxval, 255);
    *channels = strcmp(magic, "P6") == 0 ? 3 : 1;
    off++; /* the single whitespace after maxval */
    assert_int_equal(len - (size_t)off, (size_t)*w * *h * *channels);
    px = malloc(len - (size_t)off);
    memcpy(px, data + off, len - (size_t)off);
    free(data);
    return px;
}

static void assert_tensor_equals_pixels(const float *t, const unsigned char *px, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += t[i] != (float)px[i];
    assert_int_equal(bad, 0);
}

static void test_jpeg_matches_djpeg(void **state)
{
    char *dir = tu_mkdtemp("workers-jpeg");
    char *ppm = tu_strf("%s/ref.ppm", dir), *pgm = tu_strf("%s/ref.pgm", dir);
    size_t len;
    char *jpg = tu_read_file(GRACE, &len);
    int w, h, c;
    unsigned char *ref;
    keel__prep_pool *p = pool_open(1, 10000, 0);
    keel__image_spec s;
    float *out;

    (void)state;
    assert_non_null(jpg);
    /* Reference decodes by libjpeg-turbo's djpeg with its defaults. */
    assert_int_equal(tu_run("djpeg -ppm -outfile '%s' '%s'", ppm, GRACE), 0);
    assert_int_equal(tu_run("djpeg -grayscale -pnm -outfile '%s' '%s'", pgm, GRACE), 0);
    ref = read_pnm(ppm, &w, &h, &c);
    assert_int_equal(c, 3);
    s = spec_identity((uint32_t)w, (uint32_t)h, KEEL__IMG_RGB);
    out = malloc(keel__image_tensor_elems(&s) * sizeof(float));
    assert_int_equal(image_via_pool(p, &s, jpg, len, out), KEEL_OK);
    assert_tensor_equals_pixels(out, ref, (size_t)w * h * 3);
    free(ref);
    ref = read_pnm(pgm, &w, &h, &c);
    assert_int_equal(c, 1);
    s.color = KEEL__IMG_GRAY;
    assert_int_equal(image_via_pool(p, &s, jpg, len, out), KEEL_OK);
    assert_tensor_equals_pixels(out, ref, (size_t)w * h);
    free(ref);
    free(out);
    free(jpg);
    keel__prep_pool_destroy(p);
    tu_rm_rf(dir);
    free(dir);
    free(ppm);
    free(pgm);
}

static void test_png_matches_pil(void **state)
{
    char *dir = tu_mkdtemp("workers-png");
    char *ppm = tu_strf("%s/ref.ppm", dir);
    size_t len;
    char *png = tu_read_file(PNGTEST, &len);
    int w, h, c;
    unsigned char *ref;
    keel__prep_pool *p = pool_open(1, 10000, 0);
    keel__image_spec s;
    float *out;

    (void)state;
    assert_non_null(png);
    /* PIL (Debian python3-pil) drops the alpha channel and applies no gamma, like keel. */
    assert_int_equal(tu_run("/usr/bin/python3 -c \"import sys; from PIL import Image; "
                            "im = Image.open(sys.argv[1]); assert im.info.get('interlace'); "
                            "im.convert('RGB').save(sys.argv[2])\" '%s' '%s'",
                            PNGTEST, ppm),
                     0);
    ref = read_pnm(ppm, &w, &h, &c);
    assert_int_equal(c, 3);
    s = spec_identity((uint32_t)w, (uint32_t)h, KEEL__IMG_RGB);
    out = malloc(keel__image_tensor_elems(&s) * sizeof(float));
    assert_int_equal(image_via_pool(p, &s, png, len, out), KEEL_OK);
    assert_tensor_equals_pixels(out, ref, (size_t)w * h * 3);
    free(ref);
    free(out);
    free(png);
    keel__prep_pool_destroy(p);
    tu_rm_rf(dir);
    free(dir);
    free(ppm);
}

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return c ^ 0xffffffffu;
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* A PNG signature and IHDR declaring w x h RGB, then an empty IDAT and IEND. */
static size_t png_header_only(unsigned char *b, uint32_t w, uint32_t h)
{
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    size_t n = 0;

    memcpy(b, sig, 8);
    n = 8;
    put32(b + n, 13);
    memcpy(b + n + 4, "IHDR", 4);
    put32(b + n + 8, w);
    put32(b + n + 12, h);
    b[n + 16] = 8; /* bit depth */
    b[n + 17] = 2; /* RGB */
    b[n + 18] = b[n + 19] = b[n + 20] = 0;
    put32(b + n + 21, crc32_of(b + n + 4, 17));
    n += 25;
    put32(b + n, 0);
    memcpy(b + n + 4, "IEND", 4);
    put32(b + n + 8, crc32_of(b + n + 4, 4));
    return n + 12;
}

static void test_malformed_images(void **state)
{
    char *dir = tu_mkdtemp("workers-bad");
    char *bomb = tu_strf("%s/bomb.png", dir);
    size_t len, blen;
    char *jpg = tu_read_file(GRACE, &len), *bd;
    keel__prep_pool *p = pool_open(1, 10000, 0);
    keel__image_spec s = spec_identity(8, 8, KEEL__IMG_RGB);
    float out[8 * 8 * 3];
    unsigned char hdr[64], rnd[4096];
    keel__prep_stats st;
    pid_t w0 = only_worker(p);

    (void)state;
    assert_int_equal(image_via_pool(p, &s, jpg, len / 2, out), KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "JPEG"));
    for (size_t i = 0; i < sizeof(rnd); i++)
        rnd[i] = (unsigned char)((i * 2654435761u) >> 13);
    assert_int_equal(image_via_pool(p, &s, rnd, sizeof(rnd), out), KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "not a JPEG or PNG"));
    /* A JPEG signature followed by garbage. */
    rnd[0] = 0xff, rnd[1] = 0xd8, rnd[2] = 0xff;
    assert_int_equal(image_via_pool(p, &s, rnd, sizeof(rnd), out), KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "JPEG"));
    /* 100k x 100k in a 57-byte PNG: refused from the header. */
    assert_int_equal(image_via_pool(p, &s, hdr, png_header_only(hdr, 100000, 100000), out),
                     KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "100000x100000"));
    assert_non_null(strstr(errbuf, "limit"));
    /* A real decompression bomb: 8000 x 8000 RGB (192 MB of pixels) of zeros in ~190 KB. */
    assert_int_equal(tu_run("/usr/bin/python3 -c \"import sys, zlib, struct\n"
                            "def chunk(t, d): return struct.pack('>I', len(d)) + t + d + "
                            "struct.pack('>I', zlib.crc32(t + d))\n"
                            "w = h = 8000\n"
                            "raw = zlib.compress(b'\\\\0' * ((w * 3 + 1) * h), 9)\n"
                            "open(sys.argv[1], 'wb').write(b'\\\\x89PNG\\\\r\\\\n\\\\x1a\\\\n' + "
                            "chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) + "
                            "chunk(b'IDAT', raw) + chunk(b'IEND', b''))\" '%s'",
                            bomb),
                     0);
    bd = tu_read_file(bomb, &blen);
    assert_true(blen < 1024 * 1024);
    assert_int_equal(image_via_pool(p, &s, bd, blen, out), KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "8000x8000 = 64000000 pixels, more than the limit"));
    /* Truncated PNG (half of the bomb's data). */
    assert_int_equal(image_via_pool(p, &s, bd, 100, out), KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "PNG"));
    /* Too large a file. */
    s.max_file_bytes = 1000;
    assert_int_equal(image_via_pool(p, &s, jpg, len, out), KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "larger than the limit of 1000 bytes"));

    /* The same worker answered all of these: no crash, no restart. */
    assert_int_equal(only_worker(p), w0);
    keel__prep_stats_get(p, &st);
    assert_int_equal(st.tasks_invalid, 7);
    assert_int_equal(st.restarts_signal + st.restarts_exit + st.restarts_timeout, 0);
    free(jpg);
    free(bd);
    keel__prep_pool_destroy(p);
    tu_rm_rf(dir);
    free(dir);
    free(bomb);
}

static void test_resize_normalise_layout(void **state)
{
    /* 4x4 RGB where channel c of pixel (x, y) is 10*c + 4*y + x + (x+y)%2 * 100. */
    uint8_t px[4 * 4 * 3];
    float out[2 * 2 * 3], up[6 * 6];
    keel__image_spec s = spec_identity(2, 2, KEEL__IMG_RGB);
    uint8_t flat[3 * 3];

    (void)state;
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++)
            for (int c = 0; c < 3; c++)
                px[(y * 4 + x) * 3 + c] = (uint8_t)(10 * c + 4 * y + x + (x + y) % 2 * 100);
    /* Halving with half-pixel centres samples the middle of each 2x2 block: its mean. */
    s.layout = KEEL__IMG_NCHW;
    s.scale = 0.5f;
    s.mean[0] = 1, s.mean[1] = 2, s.mean[2] = 3;
    s.std[0] = 2, s.std[1] = 4, s.std[2] = 8;
    keel__image_to_tensor(&s, px, 4, 4, out);
    for (int c = 0; c < 3; c++)
        for (int by = 0; by < 2; by++)
            for (int bx = 0; bx < 2; bx++) {
                double sum = 0;
                for (int dy = 0; dy < 2; dy++)
                    for (int dx = 0; dx < 2; dx++)
                        sum += px[((by * 2 + dy) * 4 + bx * 2 + dx) * 3 + c];
                float want = ((float)(sum / 4) * 0.5f - s.mean[c]) / s.std[c];
                assert_float_equal(out[(c * 2 + by) * 2 + bx], want, 1e-5);
            }
    /* NHWC holds the same values interleaved. */
    {
        float nhwc[2 * 2 * 3];
        s.layout = KEEL__IMG_NHWC;
        keel__image_to_tensor(&s, px, 4, 4, nhwc);
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < 4; i++)
                assert_true(nhwc[i * 3 + c] == out[c * 4 + i]);
    }
    /* Upscaling a constant image stays constant; gray has one channel. */
    memset(flat, 77, sizeof(flat));
    s = spec_identity(6, 6, KEEL__IMG_GRAY);
    keel__image_to_tensor(&s, flat, 3, 3, up);
    for (int i = 0; i < 36; i++)
        assert_true(up[i] == 77.0f);
}

/* ---- config.json "preprocess" and the runtime's image models */

#define IMG_CONFIG_FMT                                                                             \
    "{\"name\":\"img\",\"backend\":\"xgboost\",\"max_batch_size\":8,"                              \
    "\"input\":[{\"name\":\"features\",\"data_type\":\"TYPE_FP32\",\"dims\":[13]}],"               \
    "\"output\":[{\"name\":\"probability\",\"data_type\":\"TYPE_FP32\",\"dims\":[1]}],"            \
    "\"preprocess\":{%s}}"

static keel_err parse_pp(const char *pp, char *msg, size_t len)
{
    char *text = tu_strf(IMG_CONFIG_FMT, pp);
    keel__model_config *cfg = NULL;
    keel_err err = keel__config_parse("img/config.json", "img", text, strlen(text), &cfg, msg, len);

    keel__config_destroy(cfg);
    free(text);
    return err;
}

static void test_preprocess_config(void **state)
{
    char msg[512];
    const char *ok = "\"input\":\"image\",\"output_input\":\"features\",\"color\":\"GRAY\","
                     "\"width\":13,\"height\":1";
    char *text = tu_strf(IMG_CONFIG_FMT, ok);
    keel__model_config *cfg = NULL;
    static const struct {
        const char *pp, *words;
    } bad[] = {
        {"\"output_input\":\"features\",\"color\":\"GRAY\",\"width\":13,\"height\":1",
         "preprocess.input: required"},
        {"\"input\":\"image\",\"output_input\":\"nosuch\",\"width\":13,\"height\":1",
         "the model has no input named \"nosuch\""},
        {"\"input\":\"features\",\"output_input\":\"features\",\"width\":13,\"height\":1",
         "is one of the model's inputs"},
        {"\"input\":\"image\",\"output_input\":\"features\",\"width\":13,\"height\":1",
         "3 channels x 13 x 1 = 39 values per image, but input \"features\" holds 13"},
        {"\"input\":\"image\",\"output_input\":\"features\",\"color\":\"GRAY\",\"width\":13,"
         "\"height\":1,\"std\":[0]",
         "preprocess.std: must be finite and non-zero"},
        {"\"input\":\"image\",\"output_input\":\"features\",\"color\":\"GRAY\",\"width\":13,"
         "\"height\":1,\"layout\":\"CHW\"",
         "preprocess.layout: expected \"NCHW\" or \"NHWC\""},
        {"\"input\":\"image\",\"output_input\":\"features\",\"color\":\"GRAY\",\"width\":13,"
         "\"height\":1,\"mean\":[1,2,3]",
         "preprocess.mean: expected an array of 1 numbers"},
    };

    (void)state;
    assert_int_equal(
        keel__config_parse("img/config.json", "img", text, strlen(text), &cfg, msg, sizeof(msg)),
        KEEL_OK);
    assert_non_null(cfg->preprocess);
    assert_string_equal(cfg->preprocess->input, "image");
    assert_int_equal(cfg->preprocess->color, 1);
    assert_true(cfg->preprocess->scale == 1.0f / 255.0f);
    assert_non_null(strstr(cfg->json, "\"preprocess\":{\"input\":\"image\""));
    keel__config_destroy(cfg);
    free(text);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        msg[0] = '\0';
        assert_int_equal(parse_pp(bad[i].pp, msg, sizeof(msg)), KEEL_ECONFIG);
        if (strstr(msg, bad[i].words) == NULL)
            fail_msg("case %zu: '%s' lacks '%s'", i, msg, bad[i].words);
        assert_non_null(strstr(msg, "img/config.json"));
    }
}

/* A 26 x 2 gray PNG (libspng's encoder) as a BYTES element: 4-byte length, then the file. */
static unsigned char *png_element(const uint8_t *px, uint32_t w, uint32_t h, size_t *len)
{
    spng_ctx *ctx = spng_ctx_new(SPNG_CTX_ENCODER);
    struct spng_ihdr ihdr = {.width = w, .height = h, .bit_depth = 8, .color_type = 0};
    unsigned char *png, *el;
    size_t n = 0;
    int err = 0;

    assert_non_null(ctx);
    assert_int_equal(spng_set_option(ctx, SPNG_ENCODE_TO_BUFFER, 1), 0);
    assert_int_equal(spng_set_ihdr(ctx, &ihdr), 0);
    assert_int_equal(spng_encode_image(ctx, px, (size_t)w * h, SPNG_FMT_PNG, SPNG_ENCODE_FINALIZE),
                     0);
    png = spng_get_png_buffer(ctx, &n, &err);
    assert_non_null(png);
    el = malloc(n + 4);
    memcpy(el, &(uint32_t){(uint32_t)n}, 4);
    memcpy(el + 4, png, n);
    free(png);
    spng_ctx_free(ctx);
    *len = n + 4;
    return el;
}

static float infer_one(keel_runtime *rt, const char *input, keel_datatype dt, const int64_t *shape,
                       size_t ndim, const void *data, size_t bytes, keel_err want)
{
    keel_request *req = NULL;
    keel_tensor_view v;
    float p = -1;

    assert_int_equal(keel_request_create(rt, "img", -1, &req), KEEL_OK);
    assert_int_equal(keel_request_add_input(req, input, dt, shape, ndim, data, bytes), KEEL_OK);
    assert_int_equal(keel_infer(req), want);
    if (want == KEEL_OK) {
        assert_int_equal(keel_request_output_by_name(req, "probability", &v), KEEL_OK);
        memcpy(&p, v.data, sizeof(p));
        /* Resubmitted: its BYTES input was restored, so the same answer comes back. */
        assert_int_equal(keel_infer(req), KEEL_OK);
        assert_int_equal(keel_request_output_by_name(req, "probability", &v), KEEL_OK);
        assert_memory_equal(&p, v.data, sizeof(p));
    } else {
        snprintf(errbuf, sizeof(errbuf), "%s", keel_request_error(req));
    }
    keel_request_destroy(req);
    return p;
}

static void test_runtime_image_model(void **state)
{
    char *dir = tu_mkdtemp("workers-rt");
    char *repo = tu_strf("%s/models", dir), *cfgp = tu_strf("%s/img/config.json", repo);
    char *model = tu_strf("%s/m.json", dir), *dst = tu_strf("%s/img/1/model.json", repo);
    char *cfgtext =
        tu_strf(IMG_CONFIG_FMT, "\"input\":\"image\",\"output_input\":\"features\",\"color\":"
                                "\"GRAY\",\"width\":13,\"height\":1,\"mean\":[0.5],\"std\":[0.5]");
    int fds0 = tu_count_fds();
    keel_runtime_opts o;
    keel_runtime *rt = NULL;
    keel_preprocess_stats ps;
    uint8_t px[26 * 2];
    float ref[13], p_img, p_ref;
    unsigned char *el;
    size_t len;
    int64_t one = 1, shape2[2] = {1, 13};
    char msg[512];

    (void)state;
    assert_int_equal(tu_train_heart(dir, "m.json", "num_round = 5"), 0);
    tu_write_file(cfgp, cfgtext, (size_t)-1);
    tu_copy_file(model, dst);
    for (int i = 0; i < 52; i++)
        px[i] = (uint8_t)(i * 97 % 256);
    for (int x = 0; x < 13; x++) {
        double v = (px[2 * x] + px[2 * x + 1] + px[26 + 2 * x] + px[26 + 2 * x + 1]) / 4.0;
        ref[x] = ((float)v * (1.0f / 255.0f) - 0.5f) / 0.5f; /* halving = 2x2 block means */
    }
    el = png_element(px, 26, 2, &len);

    /* Without workers, an image model does not load. */
    keel_runtime_opts_init(&o);
    o.model_repository = repo;
    o.control = KEEL_CONTROL_EXPLICIT;
    o.worker_threads = 1;
    assert_int_equal(keel_runtime_create(&o, &rt), KEEL_OK);
    assert_int_equal(keel_model_load(rt, "img", msg, sizeof(msg)), KEEL_ECONFIG);
    assert_non_null(strstr(msg, "no preprocessing workers"));
    keel_runtime_destroy(rt);

    o.control = KEEL_CONTROL_NONE;
    o.preprocess_workers = 1;
    assert_int_equal(keel_runtime_create(&o, &rt), KEEL_OK);
    assert_true(keel_model_is_ready(rt, "img", -1));
    p_img = infer_one(rt, "image", KEEL_TYPE_BYTES, &one, 1, el, len, KEEL_OK);
    p_ref = infer_one(rt, "features", KEEL_TYPE_FP32, shape2, 2, ref, sizeof(ref), KEEL_OK);
    assert_memory_equal(&p_img, &p_ref, sizeof(float));
    el[4] ^= 0xff; /* no PNG signature any more */
    infer_one(rt, "image", KEEL_TYPE_BYTES, &one, 1, el, len, KEEL_EINVAL);
    assert_non_null(strstr(errbuf, "input 'image': image 0: not a JPEG or PNG"));
    keel_preprocess_stats_get(rt, &ps);
    assert_true(ps.enabled && ps.healthy);
    assert_int_equal(ps.workers_alive, 1);
    assert_int_equal(ps.tasks_ok, 2);
    assert_int_equal(ps.tasks_invalid, 1);
    assert_int_equal(ps.memfds_open, 0);

    /* Without its fork server the image model is not ready. */
    assert_int_equal(kill((pid_t)ps.forkserver_pid, SIGKILL), 0);
    for (int i = 0; i < 100 && keel_model_is_ready(rt, "img", -1); i++)
        usleep(10000);
    assert_false(keel_model_is_ready(rt, "img", -1));
    keel_runtime_destroy(rt);
    assert_int_equal(count_zombie_descendants(), 0);
    assert_int_equal(tu_count_fds(), fds0);
    free(el);
    tu_rm_rf(dir);
    free(dir);
    free(repo);
    free(cfgp);
    free(model);
    free(dst);
    free(cfgtext);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_worker_fds),
#ifdef KEEL_FAULT_INJECTION
        cmocka_unit_test(test_echo_and_teardown),    cmocka_unit_test(test_kill9_mid_task),
        cmocka_unit_test(test_kill9_before_reading), cmocka_unit_test(test_sigstop_deadline),
        cmocka_unit_test(test_crash_exit_unsealed),  cmocka_unit_test(test_idle_death_and_limits),
        cmocka_unit_test(test_forkserver_death),
#endif
        cmocka_unit_test(test_jpeg_matches_djpeg),   cmocka_unit_test(test_png_matches_pil),
        cmocka_unit_test(test_malformed_images),     cmocka_unit_test(test_resize_normalise_layout),
        cmocka_unit_test(test_preprocess_config),    cmocka_unit_test(test_runtime_image_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
