/*
 * syscall_cost.c: what one system call costs on this machine, for bench/request_cost.sh.
 *
 * DESIGN
 * A benchmark run by hand (never by the test suite). Times a million calls each of three
 * system calls that do almost nothing in the kernel: futex(FUTEX_WAKE) on a word nobody
 * waits on (what libgomp's team barrier issues at the end of every OpenMP parallel region,
 * so twice per XGBoost predict call), epoll_wait with timeout 0 on an empty set (what an
 * extra pass of an HTTP loop turn costs at least) and getppid (the bare round trip). On a
 * machine where these take ~1 us, a served request's syscalls are a large part of its cost.
 *
 * Usage: syscall_cost [CALLS]   prints one line: ns per call of each.
 */
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 1000000;
    int word = 0, ep;
    struct epoll_event ev[8];
    double t0, t1, t2, t3;

    if (n <= 0 || (ep = epoll_create1(0)) < 0) {
        fprintf(stderr, "usage: syscall_cost [CALLS > 0]\n");
        return 2;
    }
    t0 = now_s();
    for (long i = 0; i < n; i++)
        (void)syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
    t1 = now_s();
    for (long i = 0; i < n; i++)
        (void)epoll_wait(ep, ev, 8, 0);
    t2 = now_s();
    for (long i = 0; i < n; i++)
        (void)syscall(SYS_getppid);
    t3 = now_s();
    printf("futex_wake %.0f ns, epoll_wait(0) %.0f ns, getppid %.0f ns per call\n",
           (t1 - t0) / (double)n * 1e9, (t2 - t1) / (double)n * 1e9, (t3 - t2) / (double)n * 1e9);
    close(ep);
    return 0;
}
