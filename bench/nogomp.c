/*
 * nogomp.c: an LD_PRELOAD library for measurement only (never linked into keel): it runs a
 * one-thread OpenMP parallel region as a plain call, without libgomp's team.
 *
 * DESIGN
 * A benchmark aid run by hand (never by the test suite). XGBoost 1.6 enters `#pragma omp
 * parallel` twice per predict call even with nthread 1, and libgomp ends every region in its
 * team barrier, whose last thread calls futex_wake unconditionally: two system calls per
 * call, about 1 us each on the development VM (bench/syscall_cost.c). Preloading this
 * library makes GOMP_parallel with num_threads 1 call the region's body directly (what an
 * orphaned OpenMP construct outside any parallel region does: a team of one) and forwards
 * every other request to libgomp, which tells how much of a raw call and of a served request
 * the two regions cost: their syscalls and the team set-up around them (docs/PERFORMANCE.md,
 * session 13: about 5 us of a 12 us batch-1 call on that VM). It relies on XGBoost passing its
 * nthread as the region's num_threads, as 1.6 does; it is not a fix for keel to ship.
 *
 * Build: cc -O2 -shared -fPIC -o build-bench/nogomp.so bench/nogomp.c -ldl
 * Use:   LD_PRELOAD=$PWD/build-bench/nogomp.so build-bench/bench_infer --callgrind raw ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);

static gomp_parallel_fn real; /* libgomp's, found before main runs: no race */

__attribute__((constructor)) static void find_real(void)
{
    real = (gomp_parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
}

void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);

void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)
{
    if (num_threads == 1 || real == NULL) {
        /* real is NULL only if nothing in the process has libgomp, so nothing calls this */
        fn(data);
        return;
    }
    real(fn, data, num_threads, flags);
}
