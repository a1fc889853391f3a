/*
 * sdnotify.c: READY/STOPPING/STATUS/WATCHDOG for systemd (see sdnotify.h for the design).
 */
#include "sdnotify.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "server_log.h"

struct keel__srv_watchdog {
    pthread_t thread;
    int wake[2]; /* stop: the main thread writes, the watchdog polls */
    bool v6;
    unsigned port;
    uint64_t usec; /* WatchdogSec */
};

void keel__srv_notify(const char *state, const char *status)
{
    if (getenv("NOTIFY_SOCKET") == NULL)
        return;
    if (status != NULL)
        sd_notifyf(0, "%s\nSTATUS=%s", state, status);
    else
        sd_notify(0, state);
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Waits until fd is ready for events or the deadline (monotonic ms) passes. */
static bool wait_fd(int fd, short events, uint64_t deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        uint64_t now = mono_ms();
        int r;

        if (now >= deadline)
            return false;
        r = poll(&p, 1, (int)(deadline - now));
        if (r > 0)
            return (p.revents & (events | POLLHUP | POLLERR)) != 0;
        if (r < 0 && errno != EINTR)
            return false;
    }
}

/* One GET /v2/health/live over loopback; true when the status line says 200 in time. */
static bool probe(const keel__srv_watchdog *w, uint64_t timeout_ms)
{
    static const char req[] = "GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n"
                              "Connection: close\r\n\r\n";
    uint64_t deadline = mono_ms() + timeout_ms;
    struct sockaddr_in a4 = {0};
    struct sockaddr_in6 a6 = {0};
    char buf[64];
    size_t got = 0;
    bool ok = false;
    int fd;

    fd = socket(w->v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    if (w->v6) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)w->port);
        a6.sin6_addr = in6addr_loopback;
    } else {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)w->port);
        a4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    }
    if (connect(fd, w->v6 ? (struct sockaddr *)&a6 : (struct sockaddr *)&a4,
                w->v6 ? sizeof(a6) : sizeof(a4)) != 0 &&
        errno != EINPROGRESS)
        goto done;
    if (!wait_fd(fd, POLLOUT, deadline) ||
        send(fd, req, sizeof(req) - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof(req) - 1))
        goto done;
    while (got < 12 && wait_fd(fd, POLLIN, deadline)) {
        ssize_t n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    buf[got] = '\0';
    ok = got >= 12 && strncmp(buf, "HTTP/1.", 7) == 0 && strncmp(buf + 9, "200", 3) == 0;
done:
    close(fd);
    return ok;
}

static void *watchdog_main(void *arg)
{
    keel__srv_watchdog *w = arg;
    uint64_t period_ms = w->usec / 2000u;
    bool failing = false;

    if (period_ms == 0)
        period_ms = 1;
    for (;;) {
        struct pollfd p = {.fd = w->wake[0], .events = POLLIN};
        uint64_t start = mono_ms();

        if (probe(w, period_ms / 2 > 0 ? period_ms / 2 : 1)) {
            sd_notify(0, "WATCHDOG=1");
            if (failing)
                keel__srv_log(KEEL_LOG_INFO, "watchdog: the server answers again", NULL);
            failing = false;
        } else if (!failing) {
            keel__srv_log(KEEL_LOG_WARN,
                          "watchdog: GET /v2/health/live over loopback got no 200 in time; not "
                          "pinging systemd",
                          NULL);
            failing = true;
        }
        for (;;) {
            uint64_t now = mono_ms();
            int r = poll(&p, 1, now - start >= period_ms ? 0 : (int)(period_ms - (now - start)));
            if (r > 0)
                return NULL; /* stop */
            if (r == 0)
                break;
            if (errno != EINTR)
                return NULL;
        }
    }
}

keel_err keel__srv_watchdog_start(bool v6, unsigned port, keel__srv_watchdog **out)
{
    keel__srv_watchdog *w;
    uint64_t usec = 0;

    *out = NULL;
    if (getenv("NOTIFY_SOCKET") == NULL || sd_watchdog_enabled(0, &usec) <= 0 || usec == 0)
        return KEEL_OK;
    if ((w = calloc(1, sizeof(*w))) == NULL)
        return KEEL_ENOMEM;
    w->v6 = v6;
    w->port = port;
    w->usec = usec;
    if (pipe2(w->wake, O_CLOEXEC) != 0) {
        free(w);
        return KEEL_ERESOURCE;
    }
    if (pthread_create(&w->thread, NULL, watchdog_main, w) != 0) {
        close(w->wake[0]);
        close(w->wake[1]);
        free(w);
        return KEEL_ERESOURCE;
    }
    *out = w;
    return KEEL_OK;
}

void keel__srv_watchdog_stop(keel__srv_watchdog *w)
{
    if (w == NULL)
        return;
    while (write(w->wake[1], "x", 1) < 0 && errno == EINTR)
        ;
    pthread_join(w->thread, NULL);
    close(w->wake[0]);
    close(w->wake[1]);
    free(w);
}
