/*
 * fastfloat.h: JSON number text <-> FP32/FP64/FP16 for the V2 codec, bit-identical to the C
 * library (strtof/strtod for parsing; the "%.Pg until it round-trips" loop for printing).
 *
 * DESIGN
 * Why hand-written: the project rule is not to hand-write what a well-kept library does unless
 * a benchmark shows we must. bench/bench_decode.c measured, on the 2-core development VM, per
 * FP32 number of a request body of typical values (0.708333, -0.320755, 1, -1, 1.5e-3):
 * jansson's DOM (json_loadb + json_number_value) 209 ns, yajl's streaming tokenizer alone (a
 * number callback that does nothing) 22 ns, strtof alone 43 ns; this scanner and conversion,
 * with the JSON parsing around them, 9 ns (docs/PERFORMANCE.md, "JSON tensor decoding").
 * Debian ships no C library for this (no fast_float, Ryu or double-conversion for C), so the
 * fast paths are kept small and exact, and everything else falls back to strtof/strtod on a
 * NUL-terminated copy.
 *
 * Parsing. keel__ff_scan() checks the RFC 8259 number grammar and collects up to 19
 * significant digits in a uint64 m and a decimal exponent e (value = m * 10^e). Then:
 *   FP32: with m < 2^53 and -22 <= e < 0, d = m * (10^-e rounded to double) is within
 *         about 2 units in the last place of m * 10^e, and rounding d to float gives the
 *         correctly rounded float (what glibc's strtof returns) unless d lies within 8 units
 *         of a midpoint between two floats: those few take the exact paths below. (A
 *         multiplication, because a division by 10^k costs more on this CPU.) Exact paths:
 *         if m < 2^24 and |e| <= 10, (float)m and 10^|e| are exact floats, so one IEEE
 *         multiplication or division rounds once, correctly. Else if m < 2^53 and |e| <= 22
 *         the same holds in double (Clinger's fast path); the double is then rounded to
 *         float, which equals the direct rounding unless the double landed exactly on a
 *         midpoint (checked on the bits; such inputs, and subnormal or overflowing results,
 *         go to strtof).
 *   FP64: m < 2^53 and |e| <= 22, else strtod.
 *   FP16: the number is parsed to double as above, then rounded to half with round to nearest
 *         even (what numpy's float16(float(text)) does; like numpy this rounds twice, which
 *         differs from a direct decimal-to-half rounding only for decimal inputs within 2^-53
 *         relative of a half midpoint).
 * All of this needs FLT_EVAL_METHOD == 0 (SSE arithmetic, no x87 excess precision), the
 * default rounding mode, and the "C" LC_NUMERIC locale for the strtof fallback (keel never
 * calls setlocale; a host program that does must keep LC_NUMERIC as "C").
 *
 * The text is read 8 digits at a time (SWAR, keel__ff_scan_fast) when 32 bytes follow it.
 *
 * The vector path (x86-64 with AVX2, BMI1, BMI2 and POPCNT, checked at run time and cached in
 * keel__ff_simd_level; everything else takes the scalar code above). For FP32 arrays v2codec.c
 * finds the separators first, so every number's end is known before it is converted and no
 * number waits for the previous one. keel__ff_f32x2_avx2 then converts two numbers per
 * instruction: one 16-byte load each; digit and point masks; the shape (length, point) checked
 * by mask arithmetic and one lookup in keel__ff_shapes, which also holds the pshufb control
 * that squeezes the point out and right-aligns the digits, 10^-(fraction digits) and the
 * smallest m without a leading zero; three multiply-adds and one 64-bit multiply-add make
 * m < 10^15; m exact in double; d = m * (10^k rounded to double), k = exponent - fraction
 * digits in -22..22 (an exponent part of up to 3 digits is parsed by scalar code, only for
 * numbers that have one); the same midpoint guard as the FP32 reciprocal path above (two
 * roundings, so within 2^-52 relative; rounding to float is correct unless d is within 8
 * units of a float midpoint); both floats rounded and signed at once. Anything else (more
 * than 15 digits, |k| > 22, whitespace before the separator, invalid text, a near-midpoint
 * d) is declined and goes through keel__ff_scan_fast + keel__ff_to_f32, so the vector path
 * can only be faster, never different. Measured (docs/PERFORMANCE.md): about 3.9 to 4.4 ns per
 * number against 6.4 to 15 for the scalar path.
 *
 * Printing. keel__ff_format_f32() returns exactly what the loop "for P in 6..9: snprintf
 * %.Pg; stop when strtof gives the float back" returns (the shortest round-trip form, except
 * for subnormals, which get at least 6 digits, and the rare floats whose shortest form is not
 * the correctly rounded one), about 6 times faster: the P digits are computed in double arithmetic
 * (error below 3e-7 of a unit in the last digit), a result too close to a rounding tie is handed to
 * snprintf, and the round trip is checked with the parser above. FP16 uses P = 3..5 and FP64 P
 * = 15..17 (FP64 with snprintf and strtod; it is rarely an output type of keel's backends).
 *
 * Everything here is pure and reentrant.
 */
#ifndef KEEL_SERVER_FASTFLOAT_H
#define KEEL_SERVER_FASTFLOAT_H

#include <float.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

_Static_assert(FLT_EVAL_METHOD == 0, "the exact fast paths need float/double evaluation "
                                     "without excess precision (SSE2 on x86)");

/* Outcome of converting a number. */
enum {
    KEEL__FF_OK = 0,
    KEEL__FF_RANGE, /* finite text whose value overflows the type (would be +-inf) */
    KEEL__FF_NOMEM, /* the fallback's copy of a very long number could not be allocated */
};

/* A scanned JSON number: value = (neg ? -1 : 1) * m * 10^e unless many is set. */
typedef struct keel__ff_num {
    uint64_t m;
    int64_t e;
    bool neg;
    bool integer; /* no fraction and no exponent part */
    bool many;    /* more than 19 significant digits: m and e are not usable */
} keel__ff_num;

/* The exact powers of ten used by the fast paths. */
extern const float keel__ff_p10f[11];
extern const double keel__ff_p10d[23];
extern const double keel__ff_p10inv[23]; /* 10^-k rounded to nearest double */

/*
 * Scans one JSON number starting at p (no leading whitespace). Returns the first byte after
 * it, or NULL if the text at p does not start with a valid JSON number. Never reads at or
 * beyond end. The caller checks what follows (e.g. "01" scans as "0" followed by "1").
 */
static inline const char *keel__ff_scan(const char *p, const char *end, keel__ff_num *n)
{
    uint64_t m = 0;
    int64_t e = 0;
    int nd = 0; /* significant digits taken into m */
    bool many = false;

    n->m = 0;
    n->e = 0;
    n->many = false;
    n->neg = false;
    n->integer = true;
    if (p < end && *p == '-') {
        n->neg = true;
        p++;
    }
    if (p >= end)
        return NULL;
    if (*p == '0') {
        p++;
    } else if ((unsigned)(*p - '1') < 9u) {
        do {
            if (nd < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                nd++;
            } else {
                many = true;
            }
            p++;
        } while (p < end && (unsigned)(*p - '0') < 10u);
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        p++;
        n->integer = false;
        if (p >= end || (unsigned)(*p - '0') >= 10u)
            return NULL;
        do {
            unsigned dg = (unsigned)(*p - '0');
            if (m == 0 && dg == 0) {
                e--; /* a leading zero of the fraction is not significant */
            } else if (nd < 19) {
                m = m * 10 + dg;
                nd++;
                e--;
            } else {
                many = true;
            }
            p++;
        } while (p < end && (unsigned)(*p - '0') < 10u);
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        bool eneg = false;
        int64_t x = 0;

        p++;
        n->integer = false;
        if (p < end && (*p == '+' || *p == '-')) {
            eneg = *p == '-';
            p++;
        }
        if (p >= end || (unsigned)(*p - '0') >= 10u)
            return NULL;
        do {
            if (x < 100000000) /* saturate: the value is 0 or infinite long before this */
                x = x * 10 + (*p - '0');
            p++;
        } while (p < end && (unsigned)(*p - '0') < 10u);
        e += eneg ? -x : x;
    }
    n->m = m;
    n->e = e;
    n->many = many;
    return p;
}

extern const uint64_t keel__ff_p10u[20];

/* Number of leading decimal digits among the 8 bytes of t = (8 bytes of text) ^ "00000000"
 * (first byte lowest): byte b of t is a digit iff b < 10, i.e. neither b nor b + 0x76 has the
 * high bit set. A carry out of b + 0x76 only happens for b >= 0x8A, a non-digit, and only
 * disturbs the bytes after it. */
static inline int keel__ff_digits8(uint64_t t)
{
    uint64_t nd = ((t + UINT64_C(0x7676767676767676)) | t) & UINT64_C(0x8080808080808080);
    return nd == 0 ? 8 : __builtin_ctzll(nd) >> 3;
}

/* The value of the first k (1..8) digits of t (as above), without a branch per digit: the
 * digits are shifted to the top of the word (the bytes below become 0, i.e. leading zero
 * digits), then the 8-digit SWAR conversion (pairs, quads, all) is applied. */
static inline uint64_t keel__ff_value8(uint64_t t, int k)
{
    t <<= 8 * (8 - k);
    t = (t * 10) + (t >> 8);
    t = (((t & UINT64_C(0x000000FF000000FF)) * (100 + (UINT64_C(1000000) << 32))) +
         (((t >> 16) & UINT64_C(0x000000FF000000FF)) * (1 + (UINT64_C(10000) << 32)))) >>
        32;
    return t;
}

/* 8 bytes of text at p, each minus '0' as an XOR (digits become 0..9). */
static inline uint64_t keel__ff_load8(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian: the first byte is the lowest */
    return v ^ UINT64_C(0x3030303030303030);
}

/* keel__ff_scan, out of line, for the fast scanner's unusual cases (so that the fast path
 * stays small where it is inlined). */
const char *keel__ff_scan_slow(const char *p, const char *end, keel__ff_num *n);

/*
 * Like keel__ff_scan, faster for the common shapes of numbers in tensor data: at most 7
 * integer digits, at most 15 fraction digits (19 in all) and an exponent of at most 3 digits
 * are read 8 digits at a time, with no branch per digit. Anything else, and anything within
 * 32 bytes of end, is handed to keel__ff_scan, so both give the same results and errors.
 */
static inline const char *keel__ff_scan_fast(const char *p, const char *end, keel__ff_num *n)
{
    const char *s = p;
    uint64_t v, m;
    int ni, nf = 0;
    bool neg;

    if (end - p < 32)
        return keel__ff_scan_slow(p, end, n);
    neg = *s == '-';
    s += neg;
    m = (unsigned char)s[0] - (unsigned)'0';
    if (m <= 9 && (unsigned char)s[1] - (unsigned)'0' > 9) {
        ni = 1; /* one integer digit ("0" for most features): no SWAR needed */
    } else {
        v = keel__ff_load8(s);
        ni = keel__ff_digits8(v);
        if (ni == 0 || ni == 8 || *s == '0')
            return keel__ff_scan_slow(p, end, n);
        m = keel__ff_value8(v, ni);
    }
    s += ni;
    n->integer = true;
    if (*s == '.') {
        s++;
        v = keel__ff_load8(s);
        nf = keel__ff_digits8(v);
        if (nf == 0)
            return keel__ff_scan_slow(p, end, n);
        if (nf < 8) {
            m = m * keel__ff_p10u[nf] + keel__ff_value8(v, nf);
        } else {
            uint64_t v2 = keel__ff_load8(s + 8);
            int nf2 = keel__ff_digits8(v2);
            if (nf2 == 8 || ni + 8 + nf2 > 19)
                return keel__ff_scan_slow(p, end, n);
            m = m * 100000000 + keel__ff_value8(v, 8);
            if (nf2 > 0)
                m = m * keel__ff_p10u[nf2] + keel__ff_value8(v2, nf2);
            nf += nf2;
        }
        s += nf;
        n->integer = false;
    }
    n->e = -nf;
    if ((*s | 0x20) == 'e') {
        int x = 0;
        int k = 0;
        bool eneg;

        s++;
        eneg = *s == '-';
        s += *s == '-' || *s == '+';
        while (k < 4 && (unsigned)(*s - '0') < 10u) {
            x = x * 10 + (*s - '0');
            s++;
            k++;
        }
        if (k == 0 || k == 4)
            return keel__ff_scan_slow(p, end, n);
        n->e += eneg ? -x : x;
        n->integer = false;
    }
    n->m = m;
    n->neg = neg;
    n->many = false;
    return s;
}

/* Slow paths: strtof/strtod on a NUL-terminated copy of text[0..len). KEEL__FF_RANGE when the
 * result is infinite. */
int keel__ff_slow_f32(const char *text, size_t len, float *out);
int keel__ff_slow_f64(const char *text, size_t len, double *out);

/* m * 10^e as float when the fast paths apply (see DESIGN); false when they do not. */
static inline bool keel__ff_fast_f32(uint64_t m, int64_t e, float *out)
{
    double d;
    uint64_t bits;

    if (e < 0 && e >= -22 && m < (UINT64_C(1) << 53)) {
        /* m * (10^-k rounded to double): within 2^-52 relative of m / 10^k, so about 2 units
         * in the last place of d. Rounding d to float is then correct unless d lies within a
         * few units of a midpoint between two floats; only those take a division. */
        d = (double)m * keel__ff_p10inv[-e];
        memcpy(&bits, &d, sizeof(bits));
        /* No range check: 0 or 1e-22 <= d < 2^53, always a normal float (or zero). */
        if ((bits & UINT64_C(0x1FFFFFFF)) - UINT64_C(0x10000000) + 8 > 16) {
            *out = (float)d;
            return true;
        }
        if (m < (UINT64_C(1) << 24) && e >= -10) {
            *out = (float)m / keel__ff_p10f[-e]; /* exact operands, one rounding */
            return true;
        }
    } else if (e >= 0 && e <= 10 && m < (UINT64_C(1) << 24)) {
        *out = (float)m * keel__ff_p10f[e]; /* exact operands, one rounding */
        return true;
    }
    if (m < (UINT64_C(1) << 53) && e >= -22 && e <= 22) {
        /* Clinger: exact operands, so d is m * 10^e correctly rounded to double. */
        d = e < 0 ? (double)m / keel__ff_p10d[-e] : (double)m * keel__ff_p10d[e];
        memcpy(&bits, &d, sizeof(bits));
        /* Normal float range, and not exactly halfway between two floats. */
        if (d >= FLT_MIN && d <= FLT_MAX && (bits & UINT64_C(0x1FFFFFFF)) != UINT64_C(0x10000000)) {
            *out = (float)d;
            return true;
        }
    }
    return false;
}

/*
 * Which vector path the decoder uses: 0 = none (the scalar code above), 1 = AVX2 with BMI1,
 * BMI2 and POPCNT (x86-64-v3: Intel since 2013, AMD since 2015). Detected once (cpuid, through
 * __builtin_cpu_supports, which also checks that the OS saves the AVX state) and cached;
 * keel__ff_simd_force() overrides it for tests and benchmarks (-1: detect again).
 */
int keel__ff_simd_level(void);
void keel__ff_simd_force(int level);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KEEL__FF_HAVE_AVX2 1
#include <immintrin.h>

#define KEEL__FF_AVX2_TARGET __attribute__((target("avx2,bmi,bmi2,popcnt")))

/* What the vector path needs to know about a number of len bytes (after the sign) with its
 * first non-digit at dp (the point, or dp == len: no point). See fastfloat.c. */
typedef struct keel__ff_shape {
    uint8_t gather[16]; /* pshufb control: the digits without the point, right-aligned */
    double scale;       /* 10^-(fraction digits), rounded to nearest */
    double mmin;        /* m below this is invalid: a leading zero ("01"); 1e300 when the shape
                           itself is ("", ".5", "5.", 16 digits) */
} keel__ff_shape;

/* Rows of 32 (17 used) so that the index is two shifts. */
extern const keel__ff_shape keel__ff_shapes[17][32];
/* keel__ff_p10s[22 + k] = 10^k rounded to nearest, -22 <= k <= 22. */
extern const double keel__ff_p10s[45];

/* One number's scalar half of the vector path: its shape's pshufb control, (10^k, minimum m)
 * and whether it is of the vector path's shape at all. */
typedef struct keel__ff_vnum {
    __m128i gather;
    __m128d sm;
    uint32_t bad;
} keel__ff_vnum;

/* The value of an exponent part "e" [+-] 1 to 3 digits spanning [q, e); a value that makes
 * every index into keel__ff_p10s invalid (1000) when [q, e) is not that. Taken only by
 * numbers with something after their digits. */
static inline int32_t keel__ff_exp_part(const char *q, const char *e)
{
    const ptrdiff_t n = e - q;
    uint32_t neg, d0, d1, d2;

    /* "e" or "E", an optional sign, 1 to 3 digits: 2 to 5 bytes. */
    if (n < 2 || n > 5 || ((unsigned char)q[0] | 0x20u) != 'e')
        return 1000;
    neg = q[1] == '-';
    q += 1 + (q[1] == '-' || q[1] == '+');
    d0 = (uint32_t)((unsigned char)q[0] - '0');
    switch (e - q) {
    case 1:
        return d0 > 9 ? 1000 : neg ? -(int32_t)d0 : (int32_t)d0;
    case 2:
        d1 = (uint32_t)((unsigned char)q[1] - '0');
        if (d0 > 9 || d1 > 9)
            return 1000;
        return neg ? -(int32_t)(d0 * 10 + d1) : (int32_t)(d0 * 10 + d1);
    case 3:
        d1 = (uint32_t)((unsigned char)q[1] - '0');
        d2 = (uint32_t)((unsigned char)q[2] - '0');
        if (d0 > 9 || d1 > 9 || d2 > 9)
            return 1000;
        return neg ? -(int32_t)(d0 * 100 + d1 * 10 + d2) : (int32_t)(d0 * 100 + d1 * 10 + d2);
    default:
        return 1000;
    }
}

/* The scalar half for the number [s, e) (s after the sign) whose 16 bytes gave the digit mask
 * dig and point mask dot (bits 0..15). Valid iff its first non-digit that is not its first
 * point is at e or starts an exponent part ending at e, the shape (len, dp) is one the table
 * allows, and (checked later, on m) m is not below the table's minimum. */
KEEL__FF_AVX2_TARGET __attribute__((always_inline)) static inline void
keel__ff_vnum_shape(keel__ff_vnum *v, const char *s, const char *e, uint32_t dig, uint32_t dot)
{
    /* Bits 16..63 set too, so both counts are at most 16. */
    const uint64_t nondig = ~(uint64_t)(dig & 0xFFFFu);
    const uint64_t dp = _tzcnt_u64(nondig);
    const uint64_t len = _tzcnt_u64(nondig ^ (_blsi_u64(nondig) & (uint64_t)(dot & 0xFFFFu)));
    const keel__ff_shape *sh = &keel__ff_shapes[len][dp];

    v->gather = _mm_load_si128((const __m128i *)(const void *)sh->gather);
    if (__builtin_expect(s + len == e, 1)) {
        v->sm = _mm_load_pd(&sh->scale); /* (scale, mmin) */
        v->bad = 0;
    } else {
        /* An exponent part, or not a number of this shape. */
        const uint32_t k =
            (uint32_t)(22 + keel__ff_exp_part(s + len, e) - (int32_t)(dp < len ? len - 1 - dp : 0));
        v->bad = k > 44;
        v->sm = _mm_setr_pd(keel__ff_p10s[k > 44 ? 22 : k], sh->mmin);
    }
}

/*
 * The FP32 vector path for the common shape of tensor data: -?D+(.D+)?([eE][+-]?D{1,3})? with
 * at most 16 bytes before the exponent part counting the sign, at most 15 digits and a power
 * of ten 10^(exponent - fraction digits) within 10^-22..10^22, whose end e is already known
 * (v2codec.c finds the separators first, so no number waits for the previous one to end).
 * Two numbers at once (a and b, written to out[0] and out[1]), one 16-byte load each and no
 * branch per digit or per shape: the bytes are classified as digits and points at once, the
 * validity of each number is a few mask operations and a table lookup by its shape (length,
 * point), the point is squeezed out and the digits right-aligned by one pshufb, three
 * multiply-adds and one multiply-add in 64 bits make m (< 10^15 < 2^53, so exact in double).
 * The value m * 10^k is d = m * (10^k rounded to double): two roundings, within 2^-52 of the
 * exact value, so d rounded to float is the correctly rounded float (strtof's) unless d lies
 * within 8 units (of its last place) of a midpoint between two floats; |k| <= 22 and
 * m <= 10^15 keep d a normal float. Those few near-midpoint numbers, and any number of
 * another shape or invalid (whitespace before e, an exponent of 4 digits, "01", "1."), make
 * this return false, storing nothing: the caller then takes the numbers one by one through
 * keel__ff_f32_avx2, then keel__ff_scan_fast + keel__ff_to_f32, which give the exact float or
 * the exact error. Reads the 17 bytes at each number's start whatever e is: the caller
 * guarantees them readable. Call only from code compiled with KEEL__FF_AVX2_TARGET, when
 * keel__ff_simd_level() >= 1.
 */
/* A pair between the two halves of keel__ff_f32x2_avx2 (a loop may start the next pair's
 * first half before this pair's second half, so the two chains overlap). */
typedef struct keel__ff_x2 {
    __m256i digits; /* right-aligned digits of a (lane 0) and b (lane 1) */
    __m256d sm;     /* (10^k of a, minimum m of a, 10^k of b, minimum m of b) */
    uint64_t signs; /* the two floats' sign bits */
    uint32_t bad;
} keel__ff_x2;

/* First half: loads, masks, shapes, the digits gathered. */
KEEL__FF_AVX2_TARGET __attribute__((always_inline)) static inline void
keel__ff_x2_front(keel__ff_x2 *st, const char *pa, const char *ea, const char *pb, const char *eb)
{
    /* 16 bytes from each number's first byte, its sign included: the loads wait for
     * nothing, and the sign shifts the masks (a negative number has 15 bytes for the rest,
     * so one of 16 more bytes is declined) and the pshufb control by one byte. */
    const __m256i v = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)pa)),
        _mm_loadu_si128((const __m128i *)(const void *)pb), 1);
    const __m256i dd = _mm256_sub_epi8(v, _mm256_set1_epi8('0'));
    const __m256i minus = _mm256_cmpeq_epi8(v, _mm256_set1_epi8('-'));
    const uint32_t mm = (uint32_t)_mm256_movemask_epi8(minus);
    const uint32_t nega = mm & 1u;
    const uint32_t negb = (mm >> 16) & 1u;
    const uint32_t dig = (uint32_t)_mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_min_epu8(dd, _mm256_set1_epi8(9)), dd));
    const uint32_t dot =
        (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_set1_epi8('.')));
    keel__ff_vnum a, b;

    keel__ff_vnum_shape(&a, pa + nega, ea, (dig & 0xFFFFu) >> nega, (dot & 0xFFFFu) >> nega);
    keel__ff_vnum_shape(&b, pb + negb, eb, dig >> 16 >> negb, dot >> 16 >> negb);
    /* Each lane's control, one byte on for a sign (minus's byte 0, -1 or 0, in every byte of
     * its lane, subtracted; zeroing lanes stay >= 0x80). */
    st->digits = _mm256_shuffle_epi8(
        dd, _mm256_sub_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(a.gather), b.gather, 1),
                            _mm256_shuffle_epi8(minus, _mm256_setzero_si256())));
    st->sm = _mm256_insertf128_pd(_mm256_castpd128_pd256(a.sm), b.sm, 1);
    st->signs = (uint64_t)negb << 63 | (uint64_t)nega << 31;
    st->bad = a.bad | b.bad;
}

/* Second half: m, the double, the checks, the two floats. */
KEEL__FF_AVX2_TARGET __attribute__((always_inline)) static inline bool
keel__ff_x2_back(const keel__ff_x2 *st, float *out)
{
    __m256i x, m;
    __m256d dm, d;
    __m128 f;
    uint32_t bad;

    x = _mm256_maddubs_epi16(st->digits, _mm256_set1_epi16(0x010A) /* (10, 1) byte pairs */);
    x = _mm256_madd_epi16(x, _mm256_set1_epi32(0x00010064) /* (100, 1) */);
    x = _mm256_madd_epi16(_mm256_packs_epi32(x, x), _mm256_set1_epi32(0x00012710) /* (10000, 1) */);
    /* Per 128-bit lane, 32-bit elements (high 8 digits, low 8 digits, ...): m in 64 bits. */
    m = _mm256_add_epi64(_mm256_mul_epu32(x, _mm256_set1_epi64x(100000000)),
                         _mm256_srli_epi64(x, 32));
    /* m < 2^52 as a double: its bits under the exponent of 2^52, less 2^52 (exact). */
    dm = _mm256_sub_pd(
        _mm256_castsi256_pd(_mm256_or_si256(m, _mm256_set1_epi64x(0x4330000000000000))),
        _mm256_set1_pd(0x1p52));
    bad = st->bad | ((uint32_t)_mm256_movemask_pd(_mm256_cmp_pd(dm, st->sm, _CMP_LT_OQ)) & 0xAu);
    d = _mm256_blend_pd(_mm256_mul_pd(dm, st->sm), _mm256_setzero_pd(), 0xA);
    {
        /* |low 29 bits of d - 2^28| <= 8: near a float midpoint (see keel__ff_fast_f32). */
        const __m256i t = _mm256_abs_epi32(_mm256_sub_epi32(
            _mm256_and_si256(_mm256_castpd_si256(d), _mm256_set1_epi64x(0x1FFFFFFF)),
            _mm256_set1_epi64x(0x10000000)));
        bad |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi64x((int64_t)((uint64_t)INT32_MIN << 32 | 9u)), t)));
    }
    if (__builtin_expect(bad != 0, 0))
        return false;
    f = _mm256_cvtpd_ps(d); /* (a, 0, b, 0) */
    f = _mm_castsi128_ps(
        _mm_or_si128(_mm_shuffle_epi32(_mm_castps_si128(f), _MM_SHUFFLE(3, 1, 2, 0)),
                     _mm_cvtsi64_si128((int64_t)st->signs)));
    _mm_storel_epi64((__m128i *)(void *)out, _mm_castps_si128(f));
    return true;
}

KEEL__FF_AVX2_TARGET __attribute__((always_inline)) static inline bool
keel__ff_f32x2_avx2(const char *pa, const char *ea, const char *pb, const char *eb, float *out)
{
    keel__ff_x2 st;

    keel__ff_x2_front(&st, pa, ea, pb, eb);
    return keel__ff_x2_back(&st, out);
}

/*
 * The same for one number (the last of an odd count, and the numbers of a pair that
 * keel__ff_f32x2_avx2 declined): true and *out set, or false and nothing stored.
 */
KEEL__FF_AVX2_TARGET __attribute__((always_inline)) static inline bool
keel__ff_f32_avx2(const char *p, const char *e, float *out)
{
    const uint32_t neg = (((uint32_t)(unsigned char)*p ^ 0x2Du) - 1u) >> 31;
    const char *s = p + neg;
    const __m128i v = _mm_loadu_si128((const __m128i *)(const void *)s);
    const __m128i dd = _mm_sub_epi8(v, _mm_set1_epi8('0'));
    const uint32_t dig =
        (uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_min_epu8(dd, _mm_set1_epi8(9)), dd));
    const uint32_t dot = (uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8('.')));
    keel__ff_vnum a;
    __m128i x;
    uint64_t hl, m, bits;
    double dm, d;
    float f;
    uint32_t fb;

    keel__ff_vnum_shape(&a, s, e, dig, dot);
    if (a.bad)
        return false;
    x = _mm_shuffle_epi8(dd, a.gather);
    x = _mm_maddubs_epi16(x, _mm_setr_epi8(10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1));
    x = _mm_madd_epi16(x, _mm_setr_epi16(100, 1, 100, 1, 100, 1, 100, 1));
    x = _mm_madd_epi16(_mm_packs_epi32(x, x),
                       _mm_setr_epi16(10000, 1, 10000, 1, 10000, 1, 10000, 1));
    hl = (uint64_t)_mm_cvtsi128_si64(x);
    m = (hl & 0xFFFFFFFFu) * 100000000u + (hl >> 32);
    dm = (double)(int64_t)m;
    if (dm < _mm_cvtsd_f64(_mm_unpackhi_pd(a.sm, a.sm)))
        return false;
    d = dm * _mm_cvtsd_f64(a.sm);
    memcpy(&bits, &d, sizeof(bits));
    if ((bits & UINT64_C(0x1FFFFFFF)) - UINT64_C(0x10000000) + 8 <= 16)
        return false;
    f = (float)d;
    memcpy(&fb, &f, sizeof(fb));
    fb |= neg << 31;
    memcpy(out, &fb, sizeof(fb));
    return true;
}
#endif

/* Converts a scanned number (text is its text, used by the fallback) to float. */
static inline int keel__ff_to_f32(const keel__ff_num *n, const char *text, size_t len, float *out)
{
    float f;

    if (!n->many) {
        if (n->m == 0) {
            *out = n->neg ? -0.0f : 0.0f;
            return KEEL__FF_OK;
        }
        if (keel__ff_fast_f32(n->m, n->e, &f)) {
            *out = n->neg ? -f : f;
            return KEEL__FF_OK;
        }
    }
    return keel__ff_slow_f32(text, len, out);
}

/* Converts a scanned number (text is its text, used by the fallback) to double. */
static inline int keel__ff_to_f64(const keel__ff_num *n, const char *text, size_t len, double *out)
{
    if (!n->many) {
        if (n->m == 0) {
            *out = n->neg ? -0.0 : 0.0;
            return KEEL__FF_OK;
        }
        if (n->m < (UINT64_C(1) << 53) && n->e >= -22 && n->e <= 22) {
            double d = (double)n->m;
            d = n->e < 0 ? d / keel__ff_p10d[-n->e] : d * keel__ff_p10d[n->e];
            *out = n->neg ? -d : d;
            return KEEL__FF_OK;
        }
    }
    return keel__ff_slow_f64(text, len, out);
}

/* Rounds a double to IEEE binary16 bits, round to nearest even; overflow gives +-inf and NaN
 * a quiet NaN. */
uint16_t keel__ff_f64_to_f16(double d);
/* The exact value of binary16 bits. */
double keel__ff_f16_to_f64(uint16_t h);

/* Longest text the format functions write, without the terminating NUL. */
#define KEEL__FF_FMT_MAX 32

/*
 * Writes the shortest-round-trip text of a finite value (see DESIGN) to buf, which must hold
 * KEEL__FF_FMT_MAX + 1 bytes, NUL-terminated; returns its length. The text is valid JSON
 * ("1e-05", "-0", "0.1"). Non-finite values are the caller's business (keel writes null).
 */
size_t keel__ff_format_f32(float x, char *buf);
size_t keel__ff_format_f64(double x, char *buf);
size_t keel__ff_format_f16(uint16_t h, char *buf);

/* Decimal text of an integer; buf holds at least 21 bytes; no NUL; returns the length. */
size_t keel__ff_format_u64(uint64_t v, char *buf);
size_t keel__ff_format_i64(int64_t v, char *buf);

#endif
