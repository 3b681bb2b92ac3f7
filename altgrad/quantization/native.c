/* The CPU fast path of the operand cast: amax, power-of-two scale and rounding onto a
 * minifloat grid (nearest even or stochastic), for float32 or bfloat16 tensors, in two passes
 * over memory; and the statistics of a cast in one more.
 *
 * Built on first use by altgrad/quantization/native.py (the system C compiler, -O3
 * -march=native, OpenMP when available) and loaded with ctypes. It computes exactly what
 * kernel.round_nearest_by_scaling, kernel.round_float32_bits (stochastic) and
 * scaling.pow2_scale compute; the tests compare them bit for bit on every bfloat16 value, on
 * float32 values across all binades, and against gfloat.
 *
 * Rounding is by magic addition: for |y| in binade e (floored at the format's emin), the
 * constant C = 2^(e + 23 - M) has a float32 ulp equal to the grid spacing 2^(e - M), so
 * (|y| + C) - C rounds |y| to the grid, ties to even, in the FPU's default rounding mode. Both
 * operations are exact but the one rounding; the file must be compiled without fast-math
 * (no reassociation). Needs M >= 1, a spacing of at least 2^-125 (as the by-scaling kernel)
 * and max < 2^(105 + M), so that C is a finite float32: kernel.native_nearest_fits.
 *
 * Vectors are GCC/Clang vector extensions, 16 lanes: one AVX-512 register, two AVX2 ones, four
 * NEON ones; the compiler picks the instructions for the machine it builds on.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));

enum { FLOAT32 = 0, BFLOAT16 = 1 };
/* params[]: the same int32 layout as kernel.py's params tensor */
enum { P_MANTISSA, P_EMIN_BIASED, P_MAX_BITS, P_OVERFLOW_BITS, P_SR_BITS };

/* The format's params as values (kept in registers in the loops; a pointer would be re-read at
 * every store, which may alias it), and the unscale of a dequantizing cast. sr_bits: the random
 * bits of stochastic rounding, 1..30 (30: the exact rule; kernel.py's module doc). */
typedef struct {
    int32_t mantissa, emin_biased, max_bits, overflow_bits, sr_bits;
    int unscaled;  /* write q * unscale (a power of two), not q */
    float unscale;
} grid_t;

static grid_t grid_of(const int32_t *p) {
    grid_t g = {p[P_MANTISSA], p[P_EMIN_BIASED], p[P_MAX_BITS], p[P_OVERFLOW_BITS], p[P_SR_BITS], 0, 1.0f};
    return g;
}

#define ABS_MASK 0x7fffffff
#define RANDOM_BITS 30
#define INF_BITS 0x7f800000

static inline vi splat(int32_t v) { return (vi){0} + v; }
static inline vi blend(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }
/* Signed max and min; where the vector width is AVX-512's, the one-instruction forms (GCC's
 * vector extensions have no max, and the blend costs three). */
#if defined(__AVX512F__)
static inline vi vmax(vi a, vi b) { return (vi)_mm512_max_epi32((__m512i)a, (__m512i)b); }
static inline vi vmin(vi a, vi b) { return (vi)_mm512_min_epi32((__m512i)a, (__m512i)b); }
#else
static inline vi vmax(vi a, vi b) { return blend(a > b, a, b); }
static inline vi vmin(vi a, vi b) { return blend(a < b, a, b); }
#endif

/* LANES elements from x + i as float32 bit patterns (a bfloat16 is the top half of one). */
static inline vi load_full(const void *x, int type, int64_t i) {
    if (type == BFLOAT16) {
#if defined(__AVX512F__)
        /* one widening load (GCC splits the generic conversion into halves) */
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
        return (vi)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
        vh h;
        memcpy(&h, (const uint16_t *)x + i, sizeof h);
        return __builtin_convertvector(h, vi) << 16;
#endif
    }
    vi v;
    memcpy(&v, (const int32_t *)x + i, sizeof v);
    return v;
}

static inline vi load_part(const void *x, int type, int64_t i, int64_t count) {
    vi v = {0};
    for (int64_t k = 0; k < count; k++)
        v[k] = type == BFLOAT16 ? (int32_t)((uint32_t)((const uint16_t *)x)[i + k] << 16)
                                : ((const int32_t *)x)[i + k];
    return v;
}

/* float32 to bfloat16, round to nearest even (exact values are simply truncated); NaN stays NaN. */
static inline vh to_bfloat16(vi bits) {
    vu u = (vu)bits; /* unsigned: the rounding carry may wrap, which signed lanes must not */
    vi rounded = (vi)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    vi quiet_nan = (vi)((u >> 16) | 0x40u);
    return __builtin_convertvector(blend((bits & ABS_MASK) > INF_BITS, quiet_nan, rounded), vh);
}

static inline void store(void *out, int type, int64_t i, int64_t count, vi bits) {
    if (type == BFLOAT16) {
        vh h = to_bfloat16(bits);
        if (count == LANES) memcpy((uint16_t *)out + i, &h, sizeof h);
        else for (int64_t k = 0; k < count; k++) ((uint16_t *)out)[i + k] = h[k];
    } else {
        if (count == LANES) memcpy((int32_t *)out + i, &bits, sizeof bits);
        else for (int64_t k = 0; k < count; k++) ((int32_t *)out)[i + k] = bits[k];
    }
}

/* A bfloat16 store of values known to be exact in bfloat16 (grid values of a format whose grid
 * fits it, no NaN): the top halves, no rounding. */
static inline void store_exact(void *out, int type, int64_t i, int64_t count, vi bits) {
    if (type != BFLOAT16 || count != LANES) {
        store(out, type, i, count, bits);
        return;
    }
    vh h = __builtin_convertvector((vi)((vu)bits >> 16), vh);
    memcpy((uint16_t *)out + i, &h, sizeof h);
}

/* y = x * scale as float32 bits; without a scale (quantize), x itself: no multiplication, so
 * that signalling NaNs and subnormals under flush-to-zero pass exactly as in the torch kernel. */
static inline vi scaled_bits(vi bits, vf scale, int scaled) {
    if (!scaled) return bits;
    vf y;
    memcpy(&y, &bits, sizeof y);
    y = y * scale;
    memcpy(&bits, &y, sizeof bits);
    return bits;
}

/* (v + c) - c on float32 bit patterns: v rounded to nearest even at the float32 ulp of c (the
 * magic addition described above; both operations exact but the one rounding). */
static inline vi magic_round(vi v_bits, vi c_bits) {
    vf v, c;
    memcpy(&v, &v_bits, sizeof v);
    memcpy(&c, &c_bits, sizeof c);
    vf r = (v + c) - c;
    vi out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* |y| (float32 bits) rounded to nearest even on the grid of its binade (biased exponent, floored
 * at emin): (|y| + C) - C with C = 2^(binade + 23 - M). */
static inline vi round_magnitude(vi magnitude, vi binade, int32_t mantissa_bits) {
    return magic_round(magnitude, (binade + (23 - mantissa_bits)) << 23);
}

/* q(y * scale) as float32 bits: the rules of kernel.round_nearest_by_scaling. */
static inline vi round_nearest(vi bits, vf scale, int scaled, grid_t g, int64_t index, const uint32_t *seed) {
    (void)index, (void)seed;
    vi y_bits = scaled_bits(bits, scale, scaled);
    vi magnitude = y_bits & ABS_MASK;
    /* capped so that C stays finite; only values beyond 2^(232+M) are capped, far past any max */
    vi binade = vmin(vmax(magnitude >> 23, splat(g.emin_biased)), splat(231 + g.mantissa));
    vi out = round_magnitude(magnitude, binade, g.mantissa);
    out = blend(out > g.max_bits, splat(g.overflow_bits), out); /* overflow, and inf in */
    out |= y_bits & (int32_t)0x80000000;
    return blend(magnitude > INF_BITS, y_bits, out); /* NaN in, NaN out */
}

/* The same for inputs known to be finite with |y| <= max (no overflow, no inf, no NaN): the
 * operand cast's usual case, where the scale comes from the tensor's own finite amax. The magic
 * constant carries y's sign (round to nearest even is symmetric), and the sign is put back at
 * the end for the values that round to zero (x - x is +0). */
static inline vi round_nearest_in_range(vi bits, vf scale, int scaled, grid_t g, int64_t index,
                                       const uint32_t *seed) {
    (void)index, (void)seed;
    vi y_bits = scaled_bits(bits, scale, scaled);
    vi sign = y_bits & (int32_t)0x80000000;
    vi c_bits = (vmax(y_bits & INF_BITS, splat(g.emin_biased << 23)) + ((23 - g.mantissa) << 23)) | sign;
    return magic_round(y_bits, c_bits) | sign;
}

/* kernel._mix32 in 32-bit lanes: the int64 products masked to 32 bits are uint32 products. */

static inline vu mix32(vu h) {
    h ^= h >> 16;
    h *= 0x21F0AAADu;
    h ^= h >> 15;
    h *= 0x735A2D97u;
    return h ^ (h >> 15);
}

/* kernel.random_bits: 30 bits per element from its flat index and the seed pair. */
static inline vi random_bits(int64_t index, const uint32_t *seed) {
    vu lane;
    for (int k = 0; k < LANES; k++) lane[k] = (uint32_t)k;
    vu low = (uint32_t)index + lane;
    vu high = (vu){0} + (uint32_t)((uint64_t)index >> 32);
    high -= (vu)(low < (uint32_t)index); /* the low word wrapped within this vector: carry */
    vu h = mix32(mix32(low ^ seed[0]) ^ high ^ seed[1]);
    return (vi)(h >> 2);
}

/* random_bits of one flat index, in scalar code (vectorizable loops use it). */
static inline uint32_t random_bits_at(int64_t index, uint32_t seed0, uint32_t seed1) {
    uint32_t h = (uint32_t)index ^ seed0;
    h ^= h >> 16; h *= 0x21F0AAADu; h ^= h >> 15; h *= 0x735A2D97u; h ^= h >> 15;
    h ^= (uint32_t)((uint64_t)index >> 32) ^ seed1;
    h ^= h >> 16; h *= 0x21F0AAADu; h ^= h >> 15; h *= 0x735A2D97u; h ^= h >> 15;
    return h >> 2;
}

/* random_bits for the n indices from start (tests compare it with the torch reference). */
void altgrad_random_bits(int64_t start, int64_t n, const int64_t *seed, int32_t *out) {
    uint32_t words[2] = {(uint32_t)seed[0], (uint32_t)seed[1]};
    for (int64_t i = 0; i < n; i += LANES) {
        vi bits = random_bits(start + i, words);
        for (int64_t k = 0; k < LANES && i + k < n; k++) out[i + k] = bits[k];
    }
}

/* Stochastic rounding of y = x * scale: the integer rules of kernel.round_float32_bits, with
 * g.sr_bits random bits (the fraction of a grid step truncated to that many bits). */
static inline vi round_stochastic(vi bits, vf scale, int scaled, grid_t g, int64_t index, const uint32_t *seed) {
    vi y_bits = scaled_bits(bits, scale, scaled);
    vi magnitude = y_bits & ABS_MASK;
    vi exponent = magnitude >> 23;
    vi exponent_eff = vmax(exponent, splat(1));
    vi significand = (magnitude & 0x7fffff) | ((exponent > 0) & (1 << 23));
    vi exponent_target = vmax(exponent_eff, splat(g.emin_biased));
    vi exact_shift = 23 - g.mantissa + exponent_target - exponent_eff;
    vi kept = vmin(exact_shift, splat(g.sr_bits));
    vi truncated = significand >> vmin(exact_shift - kept, splat(31));
    vi noise = random_bits(index, seed) & ((splat(1) << kept) - 1);
    vi steps = (truncated + noise) >> kept;
    vf steps_f = __builtin_convertvector(steps, vf);
    vi out;
    memcpy(&out, &steps_f, sizeof out);
    /* times 2^(target - 127 - M): added to the exponent field, in wrapping unsigned arithmetic */
    out = (vi)((vu)out + ((vu)(exponent_target - 127 - g.mantissa) << 23));
    out = blend(steps == 0, splat(0), out);
    out = blend(out > g.max_bits, splat(g.overflow_bits), out);
    out = blend(magnitude == INF_BITS, splat(g.overflow_bits), out); /* inf in: as overflow */
    out = blend(magnitude > INF_BITS, magnitude, out); /* NaN in, NaN out */
    return out | (y_bits & (int32_t)0x80000000);
}

/* q (float32 bits) as written: times the unscale of a dequantizing cast (a power of two that
 * keeps every grid value a float32 normal, so exact; zero, inf and NaN pass), else q itself. */
static inline vi unscaled_bits(vi bits, grid_t g) {
    if (!g.unscaled) return bits;
    vf q;
    memcpy(&q, &bits, sizeof q);
    q = q * g.unscale;
    memcpy(&bits, &q, sizeof bits);
    return bits;
}

/* The map over whole vectors; with track set, also the integer max of the input magnitudes (as
 * altgrad_amax_bits: a NaN anywhere wins) into best, in the same pass. */
#define ROUND_LOOP(ROUND, STORE, IN, OUT)                                                     \
    _Pragma("omp parallel num_threads(threads) firstprivate(g, s) reduction(max : best) if(blocks >= 4096)") \
    {                                                                                         \
        vi magnitudes = {0};                                                                  \
        _Pragma("omp for nowait")                                                             \
        for (int64_t b = 0; b < blocks; b++) {                                                \
            vi bits = load_full(x, IN, b * LANES);                                            \
            if (track) magnitudes = vmax(magnitudes, bits & ABS_MASK);                        \
            STORE(out, OUT, b * LANES, LANES, unscaled_bits(ROUND(bits, s, scaled, g, b * LANES, seed), g)); \
        }                                                                                     \
        for (int k = 0; k < LANES; k++) best = magnitudes[k] > best ? magnitudes[k] : best;   \
    }

/* One loop per type pair, so that the loads and stores inside are branch-free. */
#define ROUND_ALL_STORE(ROUND, STORE)                                                         \
    do {                                                                                      \
        if (in_type == BFLOAT16 && out_type == BFLOAT16) { ROUND_LOOP(ROUND, STORE, BFLOAT16, BFLOAT16) } \
        else if (in_type == BFLOAT16) { ROUND_LOOP(ROUND, STORE, BFLOAT16, FLOAT32) }         \
        else if (out_type == BFLOAT16) { ROUND_LOOP(ROUND, STORE, FLOAT32, BFLOAT16) }        \
        else { ROUND_LOOP(ROUND, STORE, FLOAT32, FLOAT32) }                                   \
        int64_t done = blocks * LANES;                                                        \
        if (done < n) {                                                                       \
            vi bits = load_part(x, in_type, done, n - done);                                  \
            vi magnitudes = bits & ABS_MASK; /* the padding lanes are zero */                \
            for (int k = 0; k < LANES; k++) best = magnitudes[k] > best ? magnitudes[k] : best; \
            store(out, out_type, done, n - done, unscaled_bits(ROUND(bits, s, scaled, g, done, seed), g)); \
        }                                                                                     \
    } while (0)
#define ROUND_ALL(ROUND) ROUND_ALL_STORE(ROUND, store)

/* ---- bfloat16 in, bfloat16 out, nearest, in range, on the grid / s: 16-bit lanes ----------------
 * The backward's gradient casts are this case. Rounding a bfloat16 x to the nearest even value
 * of the grid shifted by the scale (the direct rounding of round_nearest_in_range) is integer
 * arithmetic on its 16 bits: clear the low s bits of the magnitude with round-half-to-even, where
 * s = 7 - M in the grid's binades from its floor binade E0 up, so a vector whose non-zero lanes
 * all lie there takes five integer operations on 32 lanes (a carry out of the mantissa moves to
 * the next binade, as it should; zero stays zero). Below E0 the spacing is fixed, 2^(E0 - M):
 * s = 7 - M + (E0 - e) per lane, with e = 1 for bfloat16 subnormals (their integer encoding
 * continues the normal one, with a leading 0 instead of the implicit 1). There, at s = 7 the kept
 * part is that leading bit (its parity breaks a tie); at s = 8 a normal value lies in
 * [2^e, 2^(e+1)) with spacing 2^(e+1), so it rounds up above 2^e and to 0 at 2^e (a tie goes to
 * the even 0), and a subnormal is below half the spacing; from s = 9 on every value is below half
 * the spacing: 0. Values out of range (inf, NaN, beyond max) can only occur in a guessed pass,
 * whose output the amax then rejects. */
typedef int16_t vs __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh2 __attribute__((vector_size(LANES * 4)));  /* also altgrad_amax_bits' lanes */
#define LANES16 (2 * LANES)

static inline vs splat16(int16_t v) { return (vs){0} + v; }
static inline vs blend16(vs mask, vs a, vs b) { return (a & mask) | (b & ~mask); }
/* Unsigned 16-bit max: one instruction with AVX-512BW, else a compare and a blend. */
#if defined(__AVX512BW__)
static inline vh2 vmax_u16(vh2 a, vh2 b) { return (vh2)_mm512_max_epu16((__m512i)a, (__m512i)b); }
#else
static inline vh2 vmax_u16(vh2 a, vh2 b) { vh2 m = a > b; return (a & m) | (b & ~m); }
#endif

/* Whether any lane is non-zero and below `floor` (magnitudes as unsigned 16-bit integers). */
static inline int any_below(vs m, vs floor) {
    vh2 below = (vh2)(m - splat16(1)) < (vh2)(floor - splat16(1));
#if defined(__AVX512BW__)
    return _mm512_movepi16_mask((__m512i)below) != 0;
#else
    uint16_t any = 0;
    for (int k = 0; k < LANES16; k++) any |= below[k];
    return any != 0;
#endif
}

/* Every lane, wherever it lies (the rules above). */
static inline vs round_bf16_below(vs m, vs e0, vs keep) {
    vs zero = {0}, one = splat16(1);
    vs e = m >> 7;
    vs normal = e > zero;
    vs below = e0 - blend16(normal, e, one);
    vs s = keep + blend16(below > zero, below, zero);
    s = blend16(s > splat16(9), splat16(9), s);
    vs t = (one << s) - one;                                          /* the s low bits */
    vs lsb = blend16(s <= splat16(6), (m >> blend16(s <= splat16(6), s, zero)) & one, normal & one);
    vs r = (m + (t >> 1) + (lsb & t & one)) & ~t;                     /* s <= 7 */
    vs up = ((e + one) << 7) & ((m & splat16(0x7f)) != zero) & normal; /* s = 8 */
    r = blend16(s == splat16(8), up, r);
    return blend16(s >= splat16(9), zero, r);
}

/* 32 lanes rounded (the rules above), their magnitudes folded into *magnitudes. */
static inline vs round_bf16_vector(vs bits, vs *magnitudes, int keep, vs e0, vs floor, vs t) {
    vs m = bits & splat16(0x7fff);
    *magnitudes = (vs)vmax_u16((vh2)*magnitudes, (vh2)m);
    /* t & 1: the kept lowest bit breaks ties only where bits are cleared (keep = 0: M = 7) */
    vs r = any_below(m, floor) ? round_bf16_below(m, e0, splat16((int16_t)keep))
                               : (m + (t >> 1) + ((m >> keep) & t & splat16(1))) & ~t;
    return r | (bits & splat16((int16_t)0x8000));
}

/* The map: out = the rounded bits; returns the max of the input magnitudes as float32 bits.
 * The tail goes through the same code in a zero-padded vector. */
static int32_t round_map_bf16_direct(const uint16_t *x, int64_t n, grid_t g, uint16_t *out, int threads) {
    const int keep = 7 - g.mantissa; /* 0..6: native nearest needs M >= 1, and the grid fits bfloat16 */
    const vs e0 = splat16((int16_t)g.emin_biased), floor = splat16((int16_t)(g.emin_biased << 7));
    const vs t = splat16((int16_t)((1 << keep) - 1));
    int64_t blocks = n / LANES16;
    int16_t best = 0;
    #pragma omp parallel num_threads(threads) reduction(max : best) if(blocks >= 2048)
    {
        vs magnitudes = {0};
        #pragma omp for nowait
        for (int64_t b = 0; b < blocks; b++) {
            vs bits;
            memcpy(&bits, x + b * LANES16, sizeof bits);
            vs r = round_bf16_vector(bits, &magnitudes, keep, e0, floor, t);
            memcpy(out + b * LANES16, &r, sizeof r);
        }
        for (int k = 0; k < LANES16; k++) best = magnitudes[k] > best ? magnitudes[k] : best;
    }
    int64_t done = blocks * LANES16;
    if (done < n) {
        vs bits = {0}, magnitudes = {0};
        memcpy(&bits, x + done, (size_t)(n - done) * sizeof *x);
        vs r = round_bf16_vector(bits, &magnitudes, keep, e0, floor, t);
        memcpy(out + done, &r, (size_t)(n - done) * sizeof *out);
        for (int k = 0; k < LANES16; k++) best = magnitudes[k] > best ? magnitudes[k] : best;
    }
    return (int32_t)best << 16;
}

enum { NEAREST, NEAREST_IN_RANGE, STOCHASTIC };

/* Whether every value of the format's grid is exact in bfloat16: at most 7 mantissa bits (every
 * value of a simulated format is a float32 normal number, so its exponent fits as well). */
static inline int grid_fits_bfloat16(grid_t g) { return g.mantissa <= 7; }

/* out = q(x * scale) over n elements in the given mode; returns the max of the input magnitudes
 * as float32 bits (altgrad_amax_bits) where track is set, else 0. */
static int32_t round_map(const void *x, int in_type, int64_t n, float scale, int scaled, grid_t g,
                         void *out, int out_type, int threads, int mode, const uint32_t *seed, int track) {
    vf s = (vf){0} + scale;
    int64_t blocks = n / LANES;
    int32_t best = 0;
    if (mode == NEAREST_IN_RANGE && !scaled && !g.unscaled && in_type == BFLOAT16 && out_type == BFLOAT16
        && grid_fits_bfloat16(g)) {
        int32_t amax = round_map_bf16_direct(x, n, g, out, threads);
        return track ? amax : 0;
    }
    if (mode == STOCHASTIC) ROUND_ALL(round_stochastic);
    else if (mode == NEAREST_IN_RANGE && grid_fits_bfloat16(g)) ROUND_ALL_STORE(round_nearest_in_range, store_exact);
    else if (mode == NEAREST_IN_RANGE) ROUND_ALL(round_nearest_in_range);
    else ROUND_ALL(round_nearest);
    return track ? best : 0;
}

/* The seed pair of kernel.random_bits, from the two int64 values (each < 2^32) draw_seed makes. */
static void seed_words(const int64_t *seed, uint32_t words[2]) {
    words[0] = (uint32_t)seed[0];
    words[1] = (uint32_t)seed[1];
}

/* out[i] = q(x[i] * scale) for the format in params; in_type/out_type: FLOAT32 or BFLOAT16.
 * seed NULL: round to nearest even (formats where the magic addition is exact); else
 * stochastic rounding with kernel.random_bits(seed) (any format). */
void altgrad_round(const void *x, int in_type, int64_t n, float scale, const int32_t *params,
                   const int64_t *seed, void *out, int out_type, int threads) {
    uint32_t words[2] = {0, 0};
    if (seed) seed_words(seed, words);
    round_map(x, in_type, n, scale, scale != 1.0f, grid_of(params), out, out_type, threads,
              seed ? STOCHASTIC : NEAREST, words, 0);
}

/* max |x| as float32 bits. Integer max of the magnitudes orders finite values and inf as floats
 * do and ranks any NaN above them, so a NaN anywhere gives a NaN, like torch's amax. bfloat16
 * magnitudes are compared as 16-bit integers (vmax_u16), twice the lanes per vector. */
int32_t altgrad_amax_bits(const void *x, int type, int64_t n, int threads) {
    const int64_t width = type == BFLOAT16 ? 2 * LANES : LANES; /* elements per vector */
    int64_t vectors = n / width;
    int32_t best = 0;
    #pragma omp parallel num_threads(threads) reduction(max : best) if(n >= 262144)
    {
        if (type == BFLOAT16) {
            vh2 acc0 = {0}, acc1 = {0}; /* two chains: the max latency, not the loads, bounds one */
            #pragma omp for nowait
            for (int64_t b = 0; b < vectors / 2; b++) {
                vh2 v0, v1;
                memcpy(&v0, (const uint16_t *)x + 2 * b * width, sizeof v0);
                memcpy(&v1, (const uint16_t *)x + (2 * b + 1) * width, sizeof v1);
                acc0 = vmax_u16(acc0, v0 & 0x7fff);
                acc1 = vmax_u16(acc1, v1 & 0x7fff);
            }
            acc0 = vmax_u16(acc0, acc1);
            for (int k = 0; k < 2 * LANES; k++) best = (int32_t)acc0[k] << 16 > best ? (int32_t)acc0[k] << 16 : best;
        } else {
            vi acc0 = {0}, acc1 = {0};
            #pragma omp for nowait
            for (int64_t b = 0; b < vectors / 2; b++) {
                acc0 = vmax(acc0, load_full(x, FLOAT32, 2 * b * width) & ABS_MASK);
                acc1 = vmax(acc1, load_full(x, FLOAT32, (2 * b + 1) * width) & ABS_MASK);
            }
            acc0 = vmax(acc0, acc1);
            for (int k = 0; k < LANES; k++) best = acc0[k] > best ? acc0[k] : best;
        }
    }
    for (int64_t i = vectors / 2 * 2 * width; i < n; i += LANES) {
        int64_t count = n - i < LANES ? n - i : LANES;
        vi v = load_part(x, type, i, count) & ABS_MASK;
        for (int64_t k = 0; k < count; k++) best = v[k] > best ? v[k] : best;
    }
    return best;
}

/* scaling.pow2_scale on the float32 fields: the largest 2^k with amax 2^k <= max, times
 * 2^-margin, k within float32's normal range; 1 where amax is 0, negative or not finite. */
static float pow2_scale(int32_t amax_bits, int32_t max_bits, int32_t margin) {
    if (amax_bits <= 0 || amax_bits >= INF_BITS) return 1.0f;
    int32_t exponent = (amax_bits >> 23) < 1 ? 1 : amax_bits >> 23;
    int32_t k = (max_bits >> 23) - exponent - ((amax_bits & 0x7fffff) > (max_bits & 0x7fffff)) - margin;
    k = k < -126 ? -126 : (k > 127 ? 127 : k);
    int32_t scale_bits = (k + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return scale;
}

/* k of a power of two 2^k (a normal float32) */
static int32_t exponent_of(float power_of_two) {
    int32_t bits;
    memcpy(&bits, &power_of_two, sizeof bits);
    return (bits >> 23) - 127;
}

/* Whether q / scale is exact for every value q of the grid: the smallest non-zero value,
 * 2^(emin - M), and the largest stay float32 (and bfloat16) normal numbers after the division by
 * the power of two scale = 2^k. scaling.dequantize_exact states the same rule. */
static int dequantize_exact(grid_t g, float scale) {
    int32_t k = exponent_of(scale);
    return (g.emin_biased - 127) - g.mantissa - k >= -126 && (g.max_bits >> 23) - 127 - k <= 127;
}

/* Whether an in-range cast that dequantize_exact allows may round x directly on the grid / s:
 * the magic constant of x's largest binade (max's, or the floor binade where that is higher: a
 * grid without exponent bits) stays finite, and where x * s would be a float32 subnormal
 * (inexact) it is below half the smallest grid value, so both round it to zero. */
static int direct_fits(grid_t g, float scale) {
    int32_t top = (g.max_bits >> 23) > g.emin_biased ? g.max_bits >> 23 : g.emin_biased;
    return top - exponent_of(scale) + 23 - g.mantissa <= 254 && (g.emin_biased - 127) - g.mantissa >= -125;
}

/* How a cast with a given scale writes its values: the rounding mode, whether x is multiplied by
 * the scale, and the grid (with the unscale of a dequantizing cast). */
typedef struct {
    int mode, scaled, dequantized;
    grid_t g;
} plan_t;

static plan_t cast_plan(grid_t g, float scale, int in_range, int stochastic, int dequantize) {
    plan_t p = {stochastic ? STOCHASTIC : in_range ? NEAREST_IN_RANGE : NEAREST, 1, 0, g}; /* x * scale, as torch */
    p.dequantized = dequantize && dequantize_exact(g, scale);
    if (p.dequantized && p.mode == NEAREST_IN_RANGE && direct_fits(g, scale)) {
        /* q(x s) / s is x rounded on the grid divided by s = 2^k: the same grid with its floor
         * binade k lower. Rounding x there gives the same bits without the two multiplications. */
        p.g.emin_biased -= exponent_of(scale);
        p.scaled = 0;
    } else if (p.dequantized) {
        p.g.unscaled = 1;
        p.g.unscale = 1.0f / scale; /* a power of two */
    }
    return p;
}

/* amax finite and amax * scale <= max: every |x * scale| is in range (the products are exact or
 * round monotonically, so none exceeds amax * scale) */
static int in_range(int32_t amax_bits, float scale, grid_t g) {
    float amax, largest;
    memcpy(&amax, &amax_bits, sizeof amax);
    memcpy(&largest, &g.max_bits, sizeof largest);
    return amax_bits < INF_BITS && amax * scale <= largest;
}

/* The operand cast: amax of x, the scale from reference_amax (delayed scaling) or from that amax
 * (reference_amax NULL), and out = q(x * scale), stochastic where seed is given. Returns the
 * scale; writes the amax to amax_out. With dequantize set, out = q(x * scale) / scale where that
 * is exact for the whole grid (dequantize_exact): *dequantized_out says which was written.
 *
 * guess (current scaling; 0 for none): the scale this tensor stream had last time. The cast is
 * then made with it in one pass that finds the amax as it goes; where the amax gives that very
 * scale (and mode), the values written are exactly those of the two-pass cast, else it is redone
 * with the right scale (the amax pass saved either way). Scales change by powers of two only when
 * the amax crosses one, so the guess is usually right. */
float altgrad_cast(const void *x, int in_type, int64_t n, const float *reference_amax, const int32_t *params,
                   int32_t margin, const int64_t *seed, void *out, int out_type, int threads, float *amax_out,
                   int dequantize, int *dequantized_out, float guess) {
    grid_t g = grid_of(params);
    uint32_t words[2] = {0, 0};
    if (seed) seed_words(seed, words);
    int32_t amax_bits;
    float scale;
    plan_t plan;
    if (!reference_amax && guess > 0.0f) {
        plan_t guessed = cast_plan(g, guess, 1, seed != NULL, dequantize);
        amax_bits = round_map(x, in_type, n, guess, guessed.scaled, guessed.g, out, out_type, threads, guessed.mode,
                              words, 1);
        scale = pow2_scale(amax_bits, g.max_bits, margin);
        plan = cast_plan(g, scale, in_range(amax_bits, scale, g), seed != NULL, dequantize);
        if (scale != guess || plan.mode != guessed.mode)
            round_map(x, in_type, n, scale, plan.scaled, plan.g, out, out_type, threads, plan.mode, words, 0);
    } else {
        amax_bits = altgrad_amax_bits(x, in_type, n, threads);
        int32_t reference_bits = amax_bits;
        if (reference_amax) memcpy(&reference_bits, reference_amax, sizeof reference_bits);
        scale = pow2_scale(reference_bits, g.max_bits, margin);
        plan = cast_plan(g, scale, in_range(amax_bits, scale, g), seed != NULL, dequantize);
        round_map(x, in_type, n, scale, plan.scaled, plan.g, out, out_type, threads, plan.mode, words, 0);
    }
    memcpy(amax_out, &amax_bits, sizeof amax_bits);
    *dequantized_out = plan.dequantized;
    return scale;
}

/* What a cast did (scaling.measure_quantization's statistics) in one pass over x and q, with
 * y = x * scale formed on the fly: counts {overflow: finite |y| > max, underflow: y != 0 and
 * q == 0}, sums {signal: sum y^2, noise: sum (y - q)^2 where both are finite} in double, and
 * present[256]: 1 for every float32 exponent field of the format's values (from smallest, its
 * least positive value, to largest) that occurs in q. A dequantized cast's q (q / scale) is
 * passed with q_scale = scale. The fields are gathered as bits of 32-bit words, in vectors, for
 * the words the format's fields can fall in (one for E4M3 and E5M2). */
typedef double vd __attribute__((vector_size(LANES * 4)));
typedef float vf_half __attribute__((vector_size(LANES * 2)));

/* the lanes [offset, offset + LANES/2) widened to double (memcpy, not __builtin_shufflevector,
 * which GCC only has from version 12) */
static inline vd half_to_double(vf v, int offset) {
#if defined(__AVX512F__)
    /* in registers (the generic form goes through the stack) */
    __m512 f = (__m512)v;
    __m256 h = offset == 0 ? _mm512_castps512_ps256(f)
                           : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1));
    return (vd)_mm512_cvtps_pd(h);
#else
    vf_half half;
    memcpy(&half, (const float *)&v + offset, sizeof half);
    return __builtin_convertvector(half, vd);
#endif
}

void altgrad_measure(const void *x, int x_type, const void *q, int q_type, int64_t n, float scale, float q_scale,
                     float smallest, float largest, int64_t *counts, double *sums, uint8_t *present, int threads) {
    int64_t overflow = 0, underflow = 0;
    double signal = 0.0, noise = 0.0;
    int64_t blocks = (n + LANES - 1) / LANES;
    int32_t smallest_bits, largest_bits;
    memcpy(&smallest_bits, &smallest, sizeof smallest_bits);
    memcpy(&largest_bits, &largest, sizeof largest_bits);
    /* field - base: the bit of a field in the words; two words in registers cover E4M3 to E6M1 */
    const uint32_t base = (uint32_t)(smallest_bits >> 23);
    const int top = largest_bits >> 23, words = (top - (int)base) / 32 + 1;
    #pragma omp parallel num_threads(threads) reduction(+ : overflow, underflow, signal, noise) if(n >= 65536)
    {
        vu low = {0}, high = {0}, more[6] = {{0}};
        vd signal_acc = {0}, noise_acc = {0};
        vi overflow_acc = {0}, underflow_acc = {0};
        #pragma omp for nowait
        for (int64_t b = 0; b < blocks; b++) {
            int64_t i = b * LANES, count = n - i < LANES ? n - i : LANES;
            vi x_bits = count == LANES ? load_full(x, x_type, i) : load_part(x, x_type, i, count);
            vi q_bits = count == LANES ? load_full(q, q_type, i) : load_part(q, q_type, i, count);
            vf y, qf;
            memcpy(&y, &x_bits, sizeof y);
            memcpy(&qf, &q_bits, sizeof qf);
            qf = qf * q_scale; /* 1, or the scale of a dequantized cast (a power of two: exact) */
            memcpy(&q_bits, &qf, sizeof q_bits);
            y = y * scale;
            vi y_bits;
            memcpy(&y_bits, &y, sizeof y_bits);
            vi y_finite = (y_bits & ABS_MASK) < INF_BITS, q_finite = (q_bits & ABS_MASK) < INF_BITS;
            vf clean;
            vi clean_bits = y_bits & y_finite;
            memcpy(&clean, &clean_bits, sizeof clean);
            vf error = clean - qf;
            vi error_bits;
            memcpy(&error_bits, &error, sizeof error_bits);
            error_bits &= y_finite & q_finite;
            memcpy(&error, &error_bits, sizeof error);
            /* padding lanes are x = 0, q = 0: they add nothing to any count or sum */
            overflow_acc -= (clean > largest) | (clean < -largest); /* a true lane is -1 */
            underflow_acc -= (y != 0.0f) & (qf == 0.0f);
            vd c_lo = half_to_double(clean, 0), c_hi = half_to_double(clean, LANES / 2);
            vd e_lo = half_to_double(error, 0), e_hi = half_to_double(error, LANES / 2);
            signal_acc += c_lo * c_lo + c_hi * c_hi;
            noise_acc += e_lo * e_lo + e_hi * e_hi;
            vu rel = (((vu)q_bits >> 23) & 0xffu) - base; /* zero (field 0) wraps: no bit */
            vu bit = ((vu){0} + 1u) << (rel & 31u), word = rel >> 5;
            low |= bit & (vu)(word == 0u);
            if (words > 1) high |= bit & (vu)(word == 1u);
            for (int w = 2; w < words; w++) more[w - 2] |= bit & (vu)(word == (uint32_t)w);
        }
        for (int k = 0; k < LANES; k++) {
            overflow += overflow_acc[k];
            underflow += underflow_acc[k];
        }
        for (int k = 0; k < LANES / 2; k++) {
            signal += signal_acc[k];
            noise += noise_acc[k];
        }
        #pragma omp critical
        for (int w = 0; w < words; w++)
            for (int k = 0; k < LANES; k++) {
                uint32_t bits = w == 0 ? low[k] : w == 1 ? high[k] : more[w - 2][k];
                for (int b = 0; b < 32 && (int)base + 32 * w + b <= top; b++) /* not inf or NaN */
                    present[base + 32 * w + b] |= (bits >> b) & 1u;
            }
    }
    counts[0] = overflow;
    counts[1] = underflow;
    sums[0] = signal;
    sums[1] = noise;
}

/* alive[c] |= some row r has q[r, c] != 0 (-0 counts as zero), for a rows x cols matrix. */
void altgrad_nonzero_columns(const void *q, int type, int64_t rows, int64_t cols, uint8_t *alive) {
    for (int64_t r = 0; r < rows; r++) {
        if (type == BFLOAT16) {
            const uint16_t *row = (const uint16_t *)q + r * cols;
            for (int64_t c = 0; c < cols; c++) alive[c] |= (row[c] & 0x7fff) != 0;
        } else {
            const uint32_t *row = (const uint32_t *)q + r * cols;
            for (int64_t c = 0; c < cols; c++) alive[c] |= (row[c] & 0x7fffffffu) != 0;
        }
    }
}

/* ---- Optimizer steps on a format's grid (altgrad.optim) ------------------------------------
 * One pass per weight tensor, float32, the exact operation sequence of the optimizers' eager
 * torch code (each operation rounds once: no fast-math, no contraction), so both give the same
 * bits (tested). Plain loops: the compiler vectorizes them (-O3, -fno-math-errno for sqrtf).
 *
 * hyper[] (float32): beta1, 1 - beta1, beta2, 1 - beta2, 1 / sqrt(1 - beta2^t), eps,
 * step size (lr / (1 - beta1^t); the lr itself for a direction without bias correction),
 * decay (lr * weight_decay), scale, 1 / scale, max_stiffness (manifold; +inf for none).
 * Tensors from 16k elements are split over the threads.
 */
#include <math.h>

enum { H_BETA1, H_C1, H_BETA2, H_C2, H_INV_BIAS2_SQRT, H_EPS, H_STEP, H_DECAY, H_SCALE, H_INVERSE, H_CAP };

static inline float pow2f(int32_t e) { /* 2^e for e in [-126, 127] */
    int32_t bits = (e + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Adam's moments (updated in place) and m / (sqrt(v_hat) + eps); times the step size, Adam's step. */
static inline float adam_direction(float g, float *m, float *v, const float *h) {
    float mm = m[0] * h[H_BETA1] + g * h[H_C1];
    float vv = v[0] * h[H_BETA2] + (g * g) * h[H_C2];
    m[0] = mm;
    v[0] = vv;
    return mm / (sqrtf(vv) * h[H_INV_BIAS2_SQRT] + h[H_EPS]);
}

/* The binade of |w * scale| floored at emin (zeros and float32 subnormals included), capped at top. */
static inline int32_t scaled_binade(float w, float scale, int32_t emin, int32_t top) {
    float a = fabsf(w * scale);
    int32_t bits;
    memcpy(&bits, &a, sizeof bits);
    int32_t b = (bits >> 23) - 127;
    b = b < emin ? emin : b;
    return b > top ? top : b;
}

/* ManifoldAdamW: w <- w - (d step + w decay) S(w), S(w) = min(2^(binade - M) / scale, max_stiffness). */
void altgrad_manifold_step(float *w, const float *g, float *m, float *v, int64_t n, const float *h, int32_t emin,
                           int32_t mantissa, int32_t top_binade, int threads) {
    #pragma omp parallel for simd num_threads(threads) if(n >= 16384)
    for (int64_t i = 0; i < n; i++) {
        float d = adam_direction(g[i], m + i, v + i, h);
        float stiffness = pow2f(scaled_binade(w[i], h[H_SCALE], emin, top_binade) - mantissa) * h[H_INVERSE];
        stiffness = stiffness < h[H_CAP] ? stiffness : h[H_CAP];
        w[i] = w[i] - (d * h[H_STEP] + w[i] * h[H_DECAY]) * stiffness;
    }
}

/* AdamW on a stored weight (arms B, C): w <- w - (d step + w decay), the projection follows. */
void altgrad_adam_step(float *w, const float *g, float *m, float *v, int64_t n, const float *h, int threads) {
    #pragma omp parallel for simd num_threads(threads) if(n >= 16384)
    for (int64_t i = 0; i < n; i++) {
        float d = adam_direction(g[i], m + i, v + i, h);
        w[i] = w[i] - (d * h[H_STEP] + w[i] * h[H_DECAY]);
    }
}

/* The moves of one chunk [start, end) of altgrad_grid_step, and its counts. few (sr_bits > 0) is a
 * constant where it is inlined: each loop computes only its own stochastic rule (the default
 * loop is the one without sr_bits, op for op). Branch-free otherwise, so that the compiler
 * vectorizes the loop (table lookups become gathers). */
typedef struct { int32_t flips, updates, stopped; } grid_counts_t;

static inline __attribute__((always_inline)) grid_counts_t grid_chunk(
    float *restrict w, const float *restrict g, float *restrict m, float *restrict v, int64_t start, int64_t end,
    const float *h, int32_t emin, int32_t mantissa, int32_t top_code, float limit, const float *restrict table,
    uint32_t seed0, uint32_t seed1, int stochastic, const int few, int32_t sr_bits) {
    const float scale = h[H_SCALE], inverse = h[H_INVERSE], decay = h[H_DECAY], step = h[H_STEP];
    const float beta1 = h[H_BETA1], c1 = h[H_C1], beta2 = h[H_BETA2], c2 = h[H_C2],
                inv_bias2_sqrt = h[H_INV_BIAS2_SQRT], eps = h[H_EPS];
    const int32_t few_mask = few ? (1 << sr_bits) - 1 : 0;
    const float few_scale = few ? pow2f(sr_bits) : 1.0f;
    int32_t flip = 0, update = 0, stop = 0;
    #pragma omp simd reduction(+ : flip, update, stop)
    for (int64_t i = start; i < end; i++) {
        float wi = w[i], gi = g[i];
        int32_t bits = (int32_t)random_bits_at(i, seed0, seed1); /* uniform on [0, 2^30) */
        float mm = m[i] * beta1 + gi * c1;
        float vv = v[i] * beta2 + (gi * gi) * c2;
        m[i] = mm;
        v[i] = vv;
        float d = mm / (sqrtf(vv) * inv_bias2_sqrt + eps);
        float proposed = -(d * step + wi * decay);
        proposed = proposed != proposed ? 0.0f : proposed; /* torch.nan_to_num */
        proposed = proposed > 3.4028234663852886e38f ? limit : proposed;
        proposed = proposed < -3.4028234663852886e38f ? -limit : proposed;
        float stochastic_moves;
        if (few) {
            /* sr_bits N: |v|'s fraction truncated to N bits plus the low N random bits, carried out
             * (kernel.round_float32_bits' rule on the integer grid: toward zero by frac(2^N f) 2^-N) */
            float magnitude = fabsf(proposed), magnitude_whole = floorf(magnitude);
            int32_t truncated = (int32_t)((magnitude - magnitude_whole) * few_scale); /* < 2^N: exact */
            stochastic_moves = copysignf(magnitude_whole + (float)((truncated + (bits & few_mask)) >> sr_bits),
                                         proposed);
        } else {
            /* floor(v) + 1 with probability frac(v), to 2^-30: bits < ceil(frac 2^30), all exact
             * (frac(v) is a float32, times 2^30 exact, its ceiling an integer), so never 1 for frac 0 */
            float whole = floorf(proposed);
            stochastic_moves = whole + (float)(bits < (int32_t)ceilf((proposed - whole) * 0x1p30f));
        }
        float nearest_moves = nearbyintf(proposed);
        float moves = stochastic ? stochastic_moves : nearest_moves;
        moves = moves > limit ? limit : moves;
        moves = moves < -limit ? -limit : moves;
        float a = fabsf(wi * scale);
        int32_t magnitude_bits, sign;
        memcpy(&magnitude_bits, &a, sizeof magnitude_bits);
        memcpy(&sign, &wi, sizeof sign);
        sign >>= 31; /* -1 for negative (and -0), else 0 */
        int32_t binade = (magnitude_bits >> 23) - 127;
        binade = binade < emin ? emin : binade;
        int32_t code = ((binade - emin) << mantissa) + (int32_t)(a * pow2f(mantissa - binade));
        int32_t rung = (code ^ sign) - sign;
        int32_t target_raw = rung + (int32_t)moves, target = target_raw;
        target = target > top_code ? top_code : target;
        target = target < -top_code ? -top_code : target;
        int32_t negative = target >> 31;
        float value = table[(target ^ negative) - negative];
        int32_t value_bits;
        memcpy(&value_bits, &value, sizeof value_bits);
        value_bits |= negative & (int32_t)0x80000000;
        memcpy(&value, &value_bits, sizeof value);
        w[i] = value * inverse;
        stop += (target_raw > top_code) | (target_raw < -top_code);
        flip += target != rung;
        update += gi != 0.0f;
    }
    return (grid_counts_t){flip, update, stop};
}

/* GridOptim on a stored weight: v = -(d step + w decay) rungs, moved floor(v + U) (stochastic:
 * floor(v), plus one with probability frac(v) to 2^-30; with sr_bits N in 1..30, 0 for none:
 * sign(v) (floor|v| plus one with probability floor(frac|v| 2^N) / 2^N), the casts' few-bit rule) or
 * round-half-even(v) rungs, clipped to +-clip, along the signed codes, stopped at +-top_code.
 * counts[]: flips (code changed), updates (g != 0), moves the top end stopped. */
void altgrad_grid_step(float *restrict w, const float *restrict g, float *restrict m, float *restrict v, int64_t n,
                       const float *h, int32_t emin, int32_t mantissa, int32_t top_code, int32_t clip,
                       const float *restrict table, const int64_t *seed, int32_t sr_bits, int64_t *counts,
                       int threads) {
    uint32_t words[2] = {0, 0};
    if (seed) seed_words(seed, words);
    const int stochastic = seed != NULL;
    const float limit = (float)clip;
    int64_t flips = 0, updates = 0, blocked = 0;
    const int64_t chunk = 4096, chunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for num_threads(threads) reduction(+ : flips, updates, blocked) if(n >= 16384)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        grid_counts_t done = sr_bits > 0
            ? grid_chunk(w, g, m, v, c * chunk, end, h, emin, mantissa, top_code, limit, table, words[0], words[1],
                         stochastic, 1, sr_bits)
            : grid_chunk(w, g, m, v, c * chunk, end, h, emin, mantissa, top_code, limit, table, words[0], words[1],
                         stochastic, 0, 0);
        flips += done.flips;
        updates += done.updates;
        blocked += done.stopped;
    }
    counts[0] = flips;
    counts[1] = updates;
    counts[2] = blocked;
}

/* The weight-storage projection, in place: s = pow2_scale(amax(w)), w <- q(w s) / s, nearest or
 * stochastic (seed given) as the operand cast; returns s. */
static inline vi project_block(vi bits, vf s, vf inverse, grid_t g, int64_t i, const uint32_t *words, int mode) {
    vi q = mode == STOCHASTIC ? round_stochastic(bits, s, 1, g, i, words)
         : mode == NEAREST_IN_RANGE ? round_nearest_in_range(bits, s, 1, g, i, words)
         : round_nearest(bits, s, 1, g, i, words);
    vf f;
    memcpy(&f, &q, sizeof f);
    f = f * inverse; /* a power of two: exact */
    memcpy(&q, &f, sizeof q);
    return q;
}

float altgrad_project(float *w, int64_t n, const int32_t *params, int32_t margin, const int64_t *seed, int threads) {
    int32_t amax_bits = altgrad_amax_bits(w, FLOAT32, n, threads);
    float scale = pow2_scale(amax_bits, params[P_MAX_BITS], margin), amax, largest;
    memcpy(&amax, &amax_bits, sizeof amax);
    memcpy(&largest, &params[P_MAX_BITS], sizeof largest);
    uint32_t words[2] = {0, 0};
    int mode = NEAREST;
    if (seed) {
        seed_words(seed, words);
        mode = STOCHASTIC;
    } else if (amax_bits < INF_BITS && amax * scale <= largest) {
        mode = NEAREST_IN_RANGE;
    }
    vf s = (vf){0} + scale, inverse = (vf){0} + 1.0f / scale;
    grid_t g = grid_of(params);
    int64_t blocks = n / LANES;
    #pragma omp parallel for num_threads(threads) firstprivate(g) if(blocks >= 1024)
    for (int64_t b = 0; b < blocks; b++)
        store(w, FLOAT32, b * LANES, LANES,
              project_block(load_full(w, FLOAT32, b * LANES), s, inverse, g, b * LANES, words, mode));
    int64_t done = blocks * LANES;
    if (done < n)
        store(w, FLOAT32, done, n - done,
              project_block(load_part(w, FLOAT32, done, n - done), s, inverse, g, done, words, mode));
    return scale;
}

/* pow2_scale(amax(x)): the current power-of-two scale of a tensor, without casting it. */
float altgrad_amax_scale(const float *x, int64_t n, int32_t max_bits, int32_t margin, int threads) {
    return pow2_scale(altgrad_amax_bits(x, FLOAT32, n, threads), max_bits, margin);
}

/* ---- What an optimizer step did to a weight on its grid (training/monitors/updates.py) ------
 * One pass over float32 tensors: out[0] updates (grad != 0), out[1] flips (before != after in
 * weight units, after = after_scaled * after_inverse, a power of two: exact), out[2] stalled
 * (updated and not flipped), out[3] and out[4] the sum and the sum of squares of the magnitude
 * codes of after_scaled (codes.magnitude_codes: (b - emin) 2^M + |v| 2^(M - b), b the binade of
 * |v| floored at emin; every grid value is a float32 normal number or zero). Integer sums: exact
 * in any order. */
void altgrad_update_stats(const float *restrict before, const float *restrict after_scaled, float after_inverse,
                          const float *restrict grad, int64_t n, int32_t emin, int32_t mantissa, int64_t *out,
                          int threads) {
    int64_t updates = 0, flips = 0, stalled = 0, code_sum = 0, code_squares = 0;
    #pragma omp parallel for num_threads(threads) if(n >= 65536) \
        reduction(+ : updates, flips, stalled, code_sum, code_squares)
    for (int64_t i = 0; i < n; i++) {
        float v = after_scaled[i];
        int updated = grad[i] != 0.0f, flipped = before[i] != v * after_inverse;
        updates += updated;
        flips += flipped;
        stalled += updated & !flipped;
        int32_t bits;
        memcpy(&bits, &v, sizeof bits);
        bits &= ABS_MASK;
        int32_t binade = (bits >> 23) - 127;
        binade = binade < emin ? emin : binade;
        int32_t step_bits = (mantissa - binade + 127) << 23; /* 2^(M - b): M - b <= M - emin <= 126 */
        float magnitude, step;
        memcpy(&magnitude, &bits, sizeof magnitude);
        memcpy(&step, &step_bits, sizeof step);
        int64_t code = ((int64_t)(binade - emin) << mantissa) + (int64_t)(magnitude * step);
        code_sum += code;
        code_squares += code * code;
    }
    out[0] = updates, out[1] = flips, out[2] = stalled, out[3] = code_sum, out[4] = code_squares;
}
