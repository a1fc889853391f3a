/*
 * fastfloat.c: the out-of-line half of fastfloat.h (fallbacks, FP16, printing).
 *
 * DESIGN
 * See fastfloat.h for why this exists and what it guarantees. The printing functions compute
 * the P significant digits of a float or half in double arithmetic: x * 10^k takes at most
 * three roundings (the table entries are exact for |k| <= 22), so the computed y is within
 * 4e-16 * y < 4e-7 of the exact value for y < 10^9. Whenever y's fraction is within 1e-6 of
 * one half, the rounding direction is not certain (and an exact tie must round like glibc
 * does), so that precision is formatted by snprintf itself; otherwise the digits are the
 * correctly rounded ones and the text equals snprintf's "%.Pg". Pure functions, reentrant.
 */
#include "fastfloat.h"

#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

const float keel__ff_p10f[11] = {1e0f, 1e1f, 1e2f, 1e3f, 1e4f, 1e5f, 1e6f, 1e7f, 1e8f, 1e9f, 1e10f};

const double keel__ff_p10d[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                  1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                  1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* The compiler converts each literal correctly rounded. */
const double keel__ff_p10inv[23] = {1e-0,  1e-1,  1e-2,  1e-3,  1e-4,  1e-5,  1e-6,  1e-7,
                                    1e-8,  1e-9,  1e-10, 1e-11, 1e-12, 1e-13, 1e-14, 1e-15,
                                    1e-16, 1e-17, 1e-18, 1e-19, 1e-20, 1e-21, 1e-22};

const uint64_t keel__ff_p10u[20] = {UINT64_C(1),
                                    UINT64_C(10),
                                    UINT64_C(100),
                                    UINT64_C(1000),
                                    UINT64_C(10000),
                                    UINT64_C(100000),
                                    UINT64_C(1000000),
                                    UINT64_C(10000000),
                                    UINT64_C(100000000),
                                    UINT64_C(1000000000),
                                    UINT64_C(10000000000),
                                    UINT64_C(100000000000),
                                    UINT64_C(1000000000000),
                                    UINT64_C(10000000000000),
                                    UINT64_C(100000000000000),
                                    UINT64_C(1000000000000000),
                                    UINT64_C(10000000000000000),
                                    UINT64_C(100000000000000000),
                                    UINT64_C(1000000000000000000),
                                    UINT64_C(10000000000000000000)};

#define p10u keel__ff_p10u

/* The vector path's level, detected on first use: -1 until then. A relaxed atomic: every
 * thread computes the same value, so a race only repeats the detection. */
static _Atomic int simd_level = -1;

int keel__ff_simd_level(void)
{
    int l = atomic_load_explicit(&simd_level, memory_order_relaxed);

    if (l < 0) {
#ifdef KEEL__FF_HAVE_AVX2
        l = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt")
                ? 1
                : 0;
#else
        l = 0;
#endif
        atomic_store_explicit(&simd_level, l, memory_order_relaxed);
    }
    return l;
}

void keel__ff_simd_force(int level)
{
#ifndef KEEL__FF_HAVE_AVX2
    if (level > 0)
        level = 0;
#endif
    atomic_store_explicit(&simd_level, level, memory_order_relaxed);
}

#ifdef KEEL__FF_HAVE_AVX2
/*
 * keel__ff_shapes[len][dp], built by the preprocessor. nd = digits (len, less the point if
 * dp < len); nf = fraction digits. gather lane i holds digit j = i - (16 - nd), read from
 * byte j, or j + 1 once past the point; lanes with j < 0 select zero (0x80). Invalid shapes:
 * len 0, a point first or last, 16 digits (m could pass 2^53), dp > len (never looked up).
 */
#define SH_ND(len, dp) ((len) - ((dp) < (len)))
#define SH_NF(len, dp) ((dp) < (len) ? (len)-1 - (dp) : 0)
#define SH_BAD(len, dp)                                                                            \
    ((len) == 0 || (dp) > (len) || ((dp) < (len) && ((dp) == 0 || (dp) == (len)-1)) ||             \
     SH_ND(len, dp) > 15)
#define SH_J(len, dp, i) ((i) - (16 - SH_ND(len, dp)))
#define SH_LANE(len, dp, i)                                                                        \
    (SH_J(len, dp, i) < 0 ? 0x80 : SH_J(len, dp, i) + (SH_J(len, dp, i) >= (dp)))
/* 10^-k, 0 <= k <= 15, as the compiler rounds the literal (to nearest). */
#define SH_P10INV(k)                                                                               \
    ((k) == 0    ? 1e0                                                                             \
     : (k) == 1  ? 1e-1                                                                            \
     : (k) == 2  ? 1e-2                                                                            \
     : (k) == 3  ? 1e-3                                                                            \
     : (k) == 4  ? 1e-4                                                                            \
     : (k) == 5  ? 1e-5                                                                            \
     : (k) == 6  ? 1e-6                                                                            \
     : (k) == 7  ? 1e-7                                                                            \
     : (k) == 8  ? 1e-8                                                                            \
     : (k) == 9  ? 1e-9                                                                            \
     : (k) == 10 ? 1e-10                                                                           \
     : (k) == 11 ? 1e-11                                                                           \
     : (k) == 12 ? 1e-12                                                                           \
     : (k) == 13 ? 1e-13                                                                           \
     : (k) == 14 ? 1e-14                                                                           \
                 : 1e-15)
/* 10^(k-1) for k digits, k >= 1: the smallest m without a leading zero. */
#define SH_P10M(k)                                                                                 \
    ((k) <= 1    ? 1e0                                                                             \
     : (k) == 2  ? 1e1                                                                             \
     : (k) == 3  ? 1e2                                                                             \
     : (k) == 4  ? 1e3                                                                             \
     : (k) == 5  ? 1e4                                                                             \
     : (k) == 6  ? 1e5                                                                             \
     : (k) == 7  ? 1e6                                                                             \
     : (k) == 8  ? 1e7                                                                             \
     : (k) == 9  ? 1e8                                                                             \
     : (k) == 10 ? 1e9                                                                             \
     : (k) == 11 ? 1e10                                                                            \
     : (k) == 12 ? 1e11                                                                            \
     : (k) == 13 ? 1e12                                                                            \
     : (k) == 14 ? 1e13                                                                            \
                 : 1e14)
/* More than one integer digit (dp > 1) means the first may not be 0. */
#define SH_MMIN(len, dp) (SH_BAD(len, dp) ? 1e300 : (dp) > 1 ? SH_P10M(SH_ND(len, dp)) : 0.0)
#define SH(len, dp)                                                                                \
    {                                                                                              \
        {SH_LANE(len, dp, 0),  SH_LANE(len, dp, 1),  SH_LANE(len, dp, 2),  SH_LANE(len, dp, 3),    \
         SH_LANE(len, dp, 4),  SH_LANE(len, dp, 5),  SH_LANE(len, dp, 6),  SH_LANE(len, dp, 7),    \
         SH_LANE(len, dp, 8),  SH_LANE(len, dp, 9),  SH_LANE(len, dp, 10), SH_LANE(len, dp, 11),   \
         SH_LANE(len, dp, 12), SH_LANE(len, dp, 13), SH_LANE(len, dp, 14), SH_LANE(len, dp, 15)},  \
            SH_P10INV(SH_NF(len, dp)), SH_MMIN(len, dp)                                            \
    }
#define SH_LEN(len)                                                                                \
    {                                                                                              \
        SH(len, 0), SH(len, 1), SH(len, 2), SH(len, 3), SH(len, 4), SH(len, 5), SH(len, 6),        \
            SH(len, 7), SH(len, 8), SH(len, 9), SH(len, 10), SH(len, 11), SH(len, 12),             \
            SH(len, 13), SH(len, 14), SH(len, 15), SH(len, 16)                                     \
    }

/* The compiler converts each literal correctly rounded. */
const double keel__ff_p10s[45] = {1e-22, 1e-21, 1e-20, 1e-19, 1e-18, 1e-17, 1e-16, 1e-15, 1e-14,
                                  1e-13, 1e-12, 1e-11, 1e-10, 1e-9,  1e-8,  1e-7,  1e-6,  1e-5,
                                  1e-4,  1e-3,  1e-2,  1e-1,  1e0,   1e1,   1e2,   1e3,   1e4,
                                  1e5,   1e6,   1e7,   1e8,   1e9,   1e10,  1e11,  1e12,  1e13,
                                  1e14,  1e15,  1e16,  1e17,  1e18,  1e19,  1e20,  1e21,  1e22};

_Alignas(64) const keel__ff_shape keel__ff_shapes[17][32] = {
    SH_LEN(0),  SH_LEN(1),  SH_LEN(2),  SH_LEN(3),  SH_LEN(4),  SH_LEN(5),
    SH_LEN(6),  SH_LEN(7),  SH_LEN(8),  SH_LEN(9),  SH_LEN(10), SH_LEN(11),
    SH_LEN(12), SH_LEN(13), SH_LEN(14), SH_LEN(15), SH_LEN(16)};
#endif

const char *keel__ff_scan_slow(const char *p, const char *end, keel__ff_num *n)
{
    return keel__ff_scan(p, end, n);
}

/* Copies text[0..len) NUL-terminated into buf (small) or a malloc'd block (*heap). */
static char *terminated_copy(const char *text, size_t len, char *buf, size_t buflen, char **heap)
{
    *heap = NULL;
    if (len < buflen) {
        memcpy(buf, text, len);
        buf[len] = '\0';
        return buf;
    }
    if (len == SIZE_MAX || (*heap = malloc(len + 1)) == NULL)
        return NULL;
    memcpy(*heap, text, len);
    (*heap)[len] = '\0';
    return *heap;
}

int keel__ff_slow_f32(const char *text, size_t len, float *out)
{
    char buf[64];
    char *heap;
    const char *s = terminated_copy(text, len, buf, sizeof(buf), &heap);
    float f;

    if (s == NULL)
        return KEEL__FF_NOMEM;
    f = strtof(s, NULL);
    free(heap);
    if (isinf(f))
        return KEEL__FF_RANGE;
    *out = f;
    return KEEL__FF_OK;
}

int keel__ff_slow_f64(const char *text, size_t len, double *out)
{
    char buf[64];
    char *heap;
    const char *s = terminated_copy(text, len, buf, sizeof(buf), &heap);
    double d;

    if (s == NULL)
        return KEEL__FF_NOMEM;
    d = strtod(s, NULL);
    free(heap);
    if (isinf(d))
        return KEEL__FF_RANGE;
    *out = d;
    return KEEL__FF_OK;
}

uint16_t keel__ff_f64_to_f16(double d)
{
    uint16_t sign = signbit(d) ? 0x8000u : 0u;
    double a = fabs(d);
    int ex;
    double r;

    if (isnan(d))
        return (uint16_t)(sign | 0x7e00u);
    /* 65520 is halfway between the largest half (65504) and 2^16; the tie goes to the even
     * neighbour, which is infinity. */
    if (a >= 65520.0)
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x1p-14) {
        /* Subnormal (or zero): units of 2^-24. rint rounds to nearest even; 1024 is the
         * encoding of the smallest normal, so a carry out of the subnormals is right too. */
        r = rint(a * 0x1p24);
        return (uint16_t)(sign | (uint16_t)r);
    }
    (void)frexp(a, &ex); /* a = f * 2^ex, 0.5 <= f < 1 */
    ex -= 1;             /* a = g * 2^ex, 1 <= g < 2, -14 <= ex <= 15 */
    r = rint(ldexp(a, 10 - ex));
    if (r >= 2048.0) {
        r = 1024.0;
        ex++;
    }
    if (ex > 15)
        return (uint16_t)(sign | 0x7c00u);
    return (uint16_t)(sign | (uint16_t)((ex + 15) << 10) | (uint16_t)((int)r - 1024));
}

double keel__ff_f16_to_f64(uint16_t h)
{
    int e = (h >> 10) & 0x1f;
    int m = h & 0x3ff;
    double v;

    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e == 31)
        v = m != 0 ? NAN : INFINITY;
    else
        v = ldexp((double)(1024 + m), e - 25);
    return (h & 0x8000u) ? -v : v;
}

static const char digit_pairs[201] = "00010203040506070809"
                                     "10111213141516171819"
                                     "20212223242526272829"
                                     "30313233343536373839"
                                     "40414243444546474849"
                                     "50515253545556575859"
                                     "60616263646566676869"
                                     "70717273747576777879"
                                     "80818283848586878889"
                                     "90919293949596979899";

size_t keel__ff_format_u64(uint64_t v, char *buf)
{
    char tmp[24];
    char *p = tmp + sizeof(tmp);
    size_t n;

    while (v >= 100) {
        unsigned r = (unsigned)(v % 100);
        v /= 100;
        p -= 2;
        memcpy(p, digit_pairs + 2 * r, 2);
    }
    if (v >= 10) {
        p -= 2;
        memcpy(p, digit_pairs + 2 * v, 2);
    } else {
        *--p = (char)('0' + v);
    }
    n = (size_t)(tmp + sizeof(tmp) - p);
    memcpy(buf, p, n);
    return n;
}

size_t keel__ff_format_i64(int64_t v, char *buf)
{
    if (v < 0) {
        buf[0] = '-';
        return 1 + keel__ff_format_u64((uint64_t)0 - (uint64_t)v, buf + 1);
    }
    return keel__ff_format_u64((uint64_t)v, buf);
}

/* Writes D (exactly P digits, D >= 10^(P-1)) with decimal exponent X as printf's %.Pg does:
 * style e if X < -4 or X >= P, else style f, trailing zeros removed in both. */
static size_t format_g(bool neg, uint64_t D, int P, int X, char *buf)
{
    char dig[24];
    size_t nd;
    size_t o = 0;

    while (D % 10 == 0 && D >= 10)
        D /= 10;
    nd = keel__ff_format_u64(D, dig);
    if (neg)
        buf[o++] = '-';
    if (X < -4 || X >= P) {
        unsigned ax = (unsigned)(X < 0 ? -X : X);

        buf[o++] = dig[0];
        if (nd > 1) {
            buf[o++] = '.';
            memcpy(buf + o, dig + 1, nd - 1);
            o += nd - 1;
        }
        buf[o++] = 'e';
        buf[o++] = X < 0 ? '-' : '+';
        if (ax >= 100)
            buf[o++] = (char)('0' + ax / 100);
        buf[o++] = (char)('0' + ax / 10 % 10);
        buf[o++] = (char)('0' + ax % 10);
    } else if (X >= 0) {
        size_t ip = (size_t)X + 1; /* digits before the point */

        if (nd <= ip) {
            memcpy(buf + o, dig, nd);
            o += nd;
            memset(buf + o, '0', ip - nd);
            o += ip - nd;
        } else {
            memcpy(buf + o, dig, ip);
            o += ip;
            buf[o++] = '.';
            memcpy(buf + o, dig + ip, nd - ip);
            o += nd - ip;
        }
    } else {
        size_t z = (size_t)(-X - 1);

        buf[o++] = '0';
        buf[o++] = '.';
        memset(buf + o, '0', z);
        o += z;
        memcpy(buf + o, dig, nd);
        o += nd;
    }
    buf[o] = '\0';
    return o;
}

/* v * 10^k for v > 0 with at most three roundings (every factor used is exact). */
static double scale10(double v, int k)
{
    while (k > 22) {
        v *= keel__ff_p10d[22];
        k -= 22;
    }
    while (k < -22) {
        v /= keel__ff_p10d[22];
        k += 22;
    }
    return k >= 0 ? v * keel__ff_p10d[k] : v / keel__ff_p10d[-k];
}

enum { KIND_F32, KIND_F16 };

/* Whether the text D * 10^e parses back to the magnitude of the value being printed. */
static bool round_trips(int kind, uint64_t D, int e, float want32, uint16_t want16)
{
    char text[48];

    if (kind == KIND_F32) {
        float f;
        if (keel__ff_fast_f32(D, e, &f))
            return f == fabsf(want32);
        snprintf(text, sizeof(text), "%" PRIu64 "e%d", D, e);
        return strtof(text, NULL) == fabsf(want32);
    } else {
        double d;
        if (e >= -22 && e <= 22)
            d = e < 0 ? (double)D / keel__ff_p10d[-e] : (double)D * keel__ff_p10d[e];
        else {
            snprintf(text, sizeof(text), "%" PRIu64 "e%d", D, e);
            d = strtod(text, NULL);
        }
        return (keel__ff_f64_to_f16(d) & 0x7fffu) == (want16 & 0x7fffu);
    }
}

/* snprintf's %.Pg, if it round-trips; 0 if not. */
static size_t snprintf_g(int kind, double v, int P, float want32, uint16_t want16, char *buf)
{
    int n = snprintf(buf, KEEL__FF_FMT_MAX + 1, "%.*g", P, v);

    if (n <= 0 || n > KEEL__FF_FMT_MAX)
        return 0;
    if (kind == KIND_F32 ? strtof(buf, NULL) == want32
                         : keel__ff_f64_to_f16(strtod(buf, NULL)) == want16)
        return (size_t)n;
    return 0;
}

/* The loop "for P in pmin..pmax: %.Pg until it round-trips" for a finite non-zero float or
 * half x (exactly representable in double). */
static size_t shortest(int kind, double x, int pmin, int pmax, float want32, uint16_t want16,
                       char *buf)
{
    bool neg = signbit(x);
    double v = fabs(x);
    int e2;
    int E;
    size_t n;

    (void)frexp(v, &e2);
    /* floor(log10(v)) or one less: floor((e2 - 1) * log10(2)) */
    E = (int)floor((e2 - 1) * 0.30102999566398119521);
    for (int P = pmin; P <= pmax; P++) {
        uint64_t D = 0;
        int k = 0;
        bool ok = false;

        /* E = floor(log10(v)): the exponent of the unrounded value. Near a power of ten the
         * computed y may fall on either side; both then round to the same digits. */
        for (int tries = 0; tries < 4; tries++) {
            double y, fl, fr;

            k = P - 1 - E;
            y = scale10(v, k);
            if (y >= (double)p10u[P]) {
                E++;
                continue;
            }
            if (y < (double)p10u[P - 1]) {
                E--;
                continue;
            }
            fl = floor(y);
            fr = y - fl;
            if (fabs(fr - 0.5) < 1e-6)
                break; /* too close to a tie to decide here */
            D = (uint64_t)fl + (fr > 0.5);
            if (D == p10u[P]) {
                /* Rounding carried into the next power of ten: %g then uses exponent E + 1
                 * and the digits 100...0. */
                D = p10u[P - 1];
                k--;
            }
            ok = true;
            break;
        }
        if (!ok) {
            if ((n = snprintf_g(kind, x, P, want32, want16, buf)) > 0)
                return n;
            continue;
        }
        if (round_trips(kind, D, -k, want32, want16))
            return format_g(neg, D, P, P - 1 - k, buf);
    }
    /* pmax digits always round-trip; this is only reached if that reasoning is wrong. */
    n = (size_t)snprintf(buf, KEEL__FF_FMT_MAX + 1, "%.*g", pmax + 2, x);
    return n;
}

size_t keel__ff_format_f32(float x, char *buf)
{
    if (x == 0.0f) {
        strcpy(buf, signbit(x) ? "-0" : "0");
        return strlen(buf);
    }
    return shortest(KIND_F32, (double)x, 6, 9, x, 0, buf);
}

size_t keel__ff_format_f16(uint16_t h, char *buf)
{
    double x = keel__ff_f16_to_f64(h);

    if (x == 0.0) {
        strcpy(buf, signbit(x) ? "-0" : "0");
        return strlen(buf);
    }
    return shortest(KIND_F16, x, 3, 5, 0.0f, h, buf);
}

size_t keel__ff_format_f64(double x, char *buf)
{
    int n = 0;

    for (int P = 15; P <= 17; P++) {
        n = snprintf(buf, KEEL__FF_FMT_MAX + 1, "%.*g", P, x);
        if (strtod(buf, NULL) == x)
            break;
    }
    return (size_t)n;
}
