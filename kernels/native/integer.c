/* Integer kernels: the network of bitserial.c with each quantized conv computed as dot products of
 * activation codes and weights into int32, at one of two widths.
 *
 * At k bits (N = 2^k, n = N - 1) with weight codes c and activation codes a the conv's integer is
 *     I = sum(a (2c + 1 - N))
 * -- the integer the bit-serial kernels build from popcounts. |I| <= 9 cin n n < 2^31 for cin <= 3000,
 * so int32 results are exact.
 *
 * - width 16 (any k): int16 codes x int16 levels 2c + 1 - N. AVX2 vpmaddwd (each int16 pair multiplied
 *   and summed into an int32 lane, so nothing saturates even at 8 bits); AVX-512 VNNI vpdpwssd, the same
 *   with the accumulate fused, 16 channels per zmm.
 * - width 8: uint8 codes x int8 levels (k <= 7: they reach +-127). At k = 8 the levels reach +-255, so
 *   the weights are the half-levels h = c - 128 (level = 2h + 1) and I = 2 sum(a h) + sum(a), the
 *   window's activation sum coming from a pass over the input (window_sums). AVX-512 VNNI vpdpbusd sums
 *   four uint8 x int8 products into an int32 lane exactly: every k. AVX2 vpmaddubsw has int16 pair sums
 *   that saturate above 32767: a pair is at most 2 n n (32258 at k = 7; 65280 with half-levels at k = 8,
 *   so AVX2 serves k <= 7); the pairs are summed in int16 lanes for at most 32767 / (2 n n) steps (a
 *   whole 3x3x128 window at k <= 3, 72 steps at k = 4, one at k = 7) and then widened into int32 with
 *   vpmaddwd by ones. Every partial sum is therefore exact.
 *
 * The requantizer (bn, clip, round) is the float64 expression itself, per value and in the reference's
 * order. At k <= 3 the SIMD code counts thresholds instead (the bit-serial kernels' way: found by
 * bisection on this very expression, at most 7 compares per value, no division), so every path gives the
 * same codes and the same logits (tested). Between layers activations are codes (int16 or uint8 by
 * width), NHWC over a zero-padded image. Outside the convs the AVX-512 path has its own requantizer and
 * residual add (the same operations at 8 lanes) and runs the AVX2 code for the rest.
 *
 * Dispatch AVX-512 -> AVX2 -> portable C per call; the C code is the scalar reference the SIMD code is
 * tested against, bit for bit (integer convs exactly, the float parts by doing the same operations in
 * order).
 */
#include "common.h"

#define ROWS 6  /* output pixels per AVX2 micro-tile */
#define ZROWS 7 /* output pixels per AVX-512 micro-tile (7 divides the 7x7, 14x14 and 28x28 images) */
#define COLS 16 /* output channels per micro-tile: two ymm or one zmm of int32 */

typedef struct {
    int cin, cout, stride;
    const void *w1, *w2;           /* packed [cout / COLS][9 cin / G][COLS][G]: int16 levels with G = 2
                                      (width 16), int8 levels (half-levels at k = 8) with G = 4 (width 8) */
    batchnorm bn1, bn2;            /* [cin] before conv1, [cout] before conv2 */
    const double *alpha1, *alpha2; /* [cout]: weight scale / (N n) */
    /* The requantizers as thresholds (NULL: compute the expression), SIMD layout [n][channels]:
     * bn1 on the residual stream, code = #{j : xsign x >= xthr_t[j]}; bn2 on conv1's output,
     * code = #{j : isign I > ithr_t[j]} (the integer thresholds minus one). */
    const double *xthr_t;
    const int32_t *xsign, *ithr_t, *isign;
} apq_block_int;

typedef struct {
    int bits, height, width, nblocks;
    int stem_cout, stem_kernel;    /* the stem has one input channel */
    const double *stem_w;          /* [kernel*kernel][stem_cout] */
    const apq_block_int *blocks;
    int head_in, head_out;
    batchnorm head_bn;             /* [head_in] */
    const double *fc_w, *fc_b;     /* [head_out][head_in], [head_out] */
} apq_net_int;

/* Input channels per weight group (and per activation broadcast) at a width. */
static inline int group_of(int width) { return width == 8 ? 4 : 2; }

/* Steps of int16 pair sums a width-8 AVX2 lane can take before it must be widened (see the top). */
static inline int chunk_of(int bits) {
    const int n = (1 << bits) - 1;
    return 32767 / (2 * n * n);
}

/* The most bits a width serves on a path (width 8 on AVX2: its int16 pair sums, see the top). */
static inline int max_bits_of(int width, int path) { return width == 8 && path == PATH_AVX2 ? 7 : 8; }

/* Activations: codes [(H + 2) (W + 2)][c] over an image padded by one zero pixel on every side. The
 * window of output pixel p (stride s) starts at padded index s (oy (W + 2) + ox), tap k at + off[k]. */
static inline size_t padded_pixels(int H, int W) { return (size_t)(H + 2) * (W + 2); }

static inline int origin(int p, int Wo, int Wp, int stride) { return stride * ((p / Wo) * Wp + p % Wo); }

static inline int32_t load32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ---------------------------------------------------------------- the conv: out[p][o] = I */

static void conv_scalar(int width, int bits, const void *in, int W, int cin, int stride, int Ho, int Wo, const void *w,
                        int cout, int32_t *out) {
    const int Wp = W + 2, G = group_of(width), groups = 9 * cin / G, half = width == 8 && bits == 8;
    for (int p = 0; p < Ho * Wo; p++) {
        const int g = origin(p, Wo, Wp, stride);
        for (int o = 0; o < cout; o++) {
            const size_t wo = (size_t)(o / COLS) * groups * COLS * G + (o % COLS) * G;
            int32_t acc = 0, sum = 0;
            for (int k = 0; k < 9; k++) {
                const size_t a = (size_t)(g + (k / 3) * Wp + k % 3) * cin;
                for (int ch = 0; ch < cin; ch++) {
                    const int r = k * cin + ch;
                    const size_t wi = wo + (size_t)(r / G) * COLS * G + r % G;
                    if (width == 8) {
                        acc += ((const uint8_t *)in)[a + ch] * ((const int8_t *)w)[wi];
                        sum += ((const uint8_t *)in)[a + ch];
                    } else {
                        acc += ((const int16_t *)in)[a + ch] * ((const int16_t *)w)[wi];
                    }
                }
            }
            out[(size_t)p * cout + o] = half ? 2 * acc + sum : acc;
        }
    }
}

#ifdef APQ_X86
/* sums[p] = sum(a) over output pixel p's window, for the SIMD width-8 kernels' I = 2 sum(a h) + sum(a)
 * at k = 8: the codes summed per padded pixel (rows, [(H + 2) (W + 2)]; vpsadbw, 32 codes at a time),
 * then over the 9 taps. (The scalar conv sums each window itself.) */
TARGET_AVX2 static void window_sums(const uint8_t *in, int H, int W, int cin, int stride, int Ho, int Wo,
                                    int32_t *rows, int32_t *sums) {
    const int Wp = W + 2;
    const __m256i zero = _mm256_setzero_si256();
    for (size_t q = 0; q < padded_pixels(H, W); q++) {
        const uint8_t *src = in + q * cin;
        __m256i acc = zero;
        int ch = 0;
        for (; ch + 32 <= cin; ch += 32)
            acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(src + ch)), zero));
        const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        int32_t s = (int32_t)(_mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1));
        for (; ch < cin; ch++) s += src[ch];
        rows[q] = s;
    }
    for (int p = 0; p < Ho * Wo; p++) {
        const int32_t *r = rows + origin(p, Wo, Wp, stride);
        sums[p] = r[0] + r[1] + r[2] + r[Wp] + r[Wp + 1] + r[Wp + 2] + r[2 * Wp] + r[2 * Wp + 1] + r[2 * Wp + 2];
    }
}
#endif

#ifdef APQ_X86
/* ROWS pixels x COLS channels of accumulators (12 ymm) stay in registers over the whole window; per
 * channel group: 2 weight loads, ROWS broadcasts of a group of activations, 2 ROWS multiply-adds. Channel
 * blocks are the outer loop so one block's weights stay in L1 across the pixels. a[r]: the window origins
 * of the tile's pixels (a short last tile repeats its last pixel, stored once). */
#define TILE_POINTERS(T)                                                                         \
    const T *a[ROWS];                                                                            \
    for (int r = 0; r < ROWS; r++)                                                               \
        a[r] = in + (size_t)origin(p0 + r < npix ? p0 + r : npix - 1, Wo, Wp, stride) * cin;

#define STORE_TILE(c)                                                                            \
    for (int r = 0; r < ROWS && p0 + r < npix; r++) {                                            \
        int32_t *dst = out + (size_t)(p0 + r) * cout + ob * COLS;                                \
        _mm256_storeu_si256((__m256i *)dst, c[r][0]);                                            \
        _mm256_storeu_si256((__m256i *)(dst + 8), c[r][1]);                                      \
    }

/* Width 16: int32 accumulators, vpmaddwd per activation pair. Requires cout % COLS == 0, even cin. */
TARGET_AVX2 static void conv16_avx2(const int16_t *in, int W, int cin, int stride, int Ho, int Wo, const int16_t *w,
                                    int cout, int32_t *out) {
    const int Wp = W + 2, half = cin / 2, npix = Ho * Wo;
    int off[9];
    for (int k = 0; k < 9; k++) off[k] = ((k / 3) * Wp + k % 3) * cin;
    for (int ob = 0; ob < cout / COLS; ob++) {
        const __m256i *wb = (const __m256i *)(w + (size_t)ob * 9 * half * COLS * 2);
        for (int p0 = 0; p0 < npix; p0 += ROWS) {
            TILE_POINTERS(int16_t)
            __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
            __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
            for (int k = 0; k < 9; k++) {
                const int16_t *a0 = a[0] + off[k], *a1 = a[1] + off[k], *a2 = a[2] + off[k];
                const int16_t *a3 = a[3] + off[k], *a4 = a[4] + off[k], *a5 = a[5] + off[k];
                const __m256i *wk = wb + (size_t)k * half * 2;
                for (int j = 0; j < half; j++) {
                    const __m256i w0 = _mm256_loadu_si256(wk + 2 * j), w1 = _mm256_loadu_si256(wk + 2 * j + 1);
                    __m256i b;
#define STEP(r)                                                    \
    b = _mm256_set1_epi32(load32(a##r + 2 * j));                   \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(b, w0)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(b, w1));
                    STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
#undef STEP
                }
            }
            const __m256i c[ROWS][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
            STORE_TILE(c)
        }
    }
}

/* Width 8: int16 accumulators, vpmaddubsw per activation quad, widened into int32 every `chunk` quads
 * (chunk_of(bits)). Requires cout % COLS == 0, cin % 4 == 0, k <= 7. */
TARGET_AVX2 static void conv8_avx2(const uint8_t *in, int W, int cin, int stride, int Ho, int Wo, const int8_t *w,
                                   int cout, int chunk, int32_t *out) {
    const int Wp = W + 2, quads = cin / 4, npix = Ho * Wo;
    const __m256i ones = _mm256_set1_epi16(1);
    int off[9];
    for (int k = 0; k < 9; k++) off[k] = ((k / 3) * Wp + k % 3) * cin;
    for (int ob = 0; ob < cout / COLS; ob++) {
        const __m256i *wb = (const __m256i *)(w + (size_t)ob * 9 * quads * COLS * 4);
        for (int p0 = 0; p0 < npix; p0 += ROWS) {
            TILE_POINTERS(uint8_t)
            __m256i c[ROWS][2];
            for (int r = 0; r < ROWS; r++) c[r][0] = c[r][1] = _mm256_setzero_si256();
            __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00;
            __m256i s30 = s00, s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00;
#define WIDEN(r)                                                               \
    c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(s##r##0, ones));     \
    c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(s##r##1, ones));     \
    s##r##0 = s##r##1 = _mm256_setzero_si256();
            int left = chunk;
            for (int k = 0; k < 9; k++) {
                const uint8_t *a0 = a[0] + off[k], *a1 = a[1] + off[k], *a2 = a[2] + off[k];
                const uint8_t *a3 = a[3] + off[k], *a4 = a[4] + off[k], *a5 = a[5] + off[k];
                const __m256i *wk = wb + (size_t)k * quads * 2;
                for (int j = 0; j < quads;) {
                    const int j1 = quads - j < left ? quads : j + left;
                    left -= j1 - j;
                    for (; j < j1; j++) {
                        const __m256i w0 = _mm256_loadu_si256(wk + 2 * j), w1 = _mm256_loadu_si256(wk + 2 * j + 1);
                        __m256i b;
#define STEP(r)                                                       \
    b = _mm256_set1_epi32(load32(a##r + 4 * j));                      \
    s##r##0 = _mm256_add_epi16(s##r##0, _mm256_maddubs_epi16(b, w0)); \
    s##r##1 = _mm256_add_epi16(s##r##1, _mm256_maddubs_epi16(b, w1));
                        STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
#undef STEP
                    }
                    if (left == 0) {
                        WIDEN(0) WIDEN(1) WIDEN(2) WIDEN(3) WIDEN(4) WIDEN(5)
                        left = chunk;
                    }
                }
            }
            WIDEN(0) WIDEN(1) WIDEN(2) WIDEN(3) WIDEN(4) WIDEN(5)
#undef WIDEN
            STORE_TILE(c)
        }
    }
}
#undef STORE_TILE

/* AVX-512 VNNI: ZROWS pixels x COLS channels, one zmm of int32 accumulators per pixel, one fused
 * multiply-accumulate per pixel and weight group (vpdpbusd: four uint8 x int8 products; vpdpwssd: two
 * int16 x int16), each exact in int32. Otherwise as the AVX2 kernels: per group one weight load and
 * ZROWS broadcasts. With sums (width 8 at k = 8) stores 2 acc + sums[p]. Requires cout % COLS == 0 and
 * cin % G == 0. */
#define ZTILE(T, G, DOT)                                                                                   \
    const int Wp = W + 2, groups = cin / (G), npix = Ho * Wo;                                              \
    int off[9];                                                                                           \
    for (int k = 0; k < 9; k++) off[k] = ((k / 3) * Wp + k % 3) * cin;                                    \
    for (int ob = 0; ob < cout / COLS; ob++) {                                                            \
        const __m512i *wb = (const __m512i *)(w + (size_t)ob * 9 * groups * COLS * (G));                  \
        for (int p0 = 0; p0 < npix; p0 += ZROWS) {                                                        \
            const T *a[ZROWS];                                                                            \
            for (int r = 0; r < ZROWS; r++)                                                               \
                a[r] = in + (size_t)origin(p0 + r < npix ? p0 + r : npix - 1, Wo, Wp, stride) * cin;      \
            __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0;    \
            for (int k = 0; k < 9; k++) {                                                                 \
                const T *a0 = a[0] + off[k], *a1 = a[1] + off[k], *a2 = a[2] + off[k], *a3 = a[3] + off[k]; \
                const T *a4 = a[4] + off[k], *a5 = a[5] + off[k], *a6 = a[6] + off[k];                     \
                const __m512i *wk = wb + (size_t)k * groups;                                              \
                for (int j = 0; j < groups; j++) {                                                        \
                    const __m512i wv = _mm512_loadu_si512((const void *)(wk + j));                       \
                    c0 = DOT(c0, _mm512_set1_epi32(load32(a0 + (G) * j)), wv);                           \
                    c1 = DOT(c1, _mm512_set1_epi32(load32(a1 + (G) * j)), wv);                           \
                    c2 = DOT(c2, _mm512_set1_epi32(load32(a2 + (G) * j)), wv);                           \
                    c3 = DOT(c3, _mm512_set1_epi32(load32(a3 + (G) * j)), wv);                           \
                    c4 = DOT(c4, _mm512_set1_epi32(load32(a4 + (G) * j)), wv);                           \
                    c5 = DOT(c5, _mm512_set1_epi32(load32(a5 + (G) * j)), wv);                           \
                    c6 = DOT(c6, _mm512_set1_epi32(load32(a6 + (G) * j)), wv);                           \
                }                                                                                         \
            }                                                                                             \
            const __m512i c[ZROWS] = {c0, c1, c2, c3, c4, c5, c6};                                        \
            for (int r = 0; r < ZROWS && p0 + r < npix; r++) {                                            \
                __m512i v = c[r];                                                                         \
                if (sums) v = _mm512_add_epi32(_mm512_add_epi32(v, v), _mm512_set1_epi32(sums[p0 + r]));  \
                _mm512_storeu_si512((void *)(out + (size_t)(p0 + r) * cout + ob * COLS), v);              \
            }                                                                                             \
        }                                                                                                 \
    }

TARGET_AVX512 static void conv8_avx512(const uint8_t *in, int W, int cin, int stride, int Ho, int Wo, const int8_t *w,
                                       int cout, const int32_t *sums, int32_t *out) {
    ZTILE(uint8_t, 4, _mm512_dpbusd_epi32)
}

TARGET_AVX512 static void conv16_avx512(const int16_t *in, int W, int cin, int stride, int Ho, int Wo, const int16_t *w,
                                        int cout, int32_t *out) {
    const int32_t *sums = NULL;
    ZTILE(int16_t, 2, _mm512_dpwssd_epi32)
}
#undef ZTILE
#undef TILE_POINTERS
#endif

/* out[p][o] = I. scratch: (H + 2) (W + 2) + Ho Wo int32 for the window sums of width 8 at k = 8. */
static void conv(int path, int width, int bits, const void *in, int H, int W, int cin, int stride, int Ho, int Wo,
                 const void *w, int cout, int32_t *scratch, int32_t *out) {
#ifdef APQ_X86
    if (path != PATH_SCALAR && cout % COLS == 0) {
        int32_t *sums = NULL;
        if (width == 8 && bits == 8) {
            sums = scratch + padded_pixels(H, W);
            window_sums(in, H, W, cin, stride, Ho, Wo, scratch, sums);
        }
        if (path == PATH_AVX512 && width == 8)
            conv8_avx512(in, W, cin, stride, Ho, Wo, w, cout, sums, out);
        else if (path == PATH_AVX512)
            conv16_avx512(in, W, cin, stride, Ho, Wo, w, cout, out);
        else if (width == 8)
            conv8_avx2(in, W, cin, stride, Ho, Wo, w, cout, chunk_of(bits), out);
        else
            conv16_avx2(in, W, cin, stride, Ho, Wo, w, cout, out);
        return;
    }
#endif
    (void)H, (void)scratch;
    conv_scalar(width, bits, in, W, cin, stride, Ho, Wo, w, cout, out);
}

/* ---------------------------------------------------------------- requantization and the residual
 * codes: v[p][c] -> quantize(bn(v)) into the padded image out (interior only; the border stays 0), where
 * v = x (float64) or, for conv1's output, v = I * alpha[c]. out holds int16 (width 16) or uint8 codes. */

static void codes_scalar(int width, const double *x, const int32_t *ints, const double *alpha, int H, int W, int c,
                         const batchnorm *bn, int bits, void *out) {
    const double n = (double)((1 << bits) - 1);
    for (int p = 0; p < H * W; p++) {
        const size_t dst = ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * c;
        for (int ch = 0; ch < c; ch++) {
            const size_t i = (size_t)p * c + ch;
            const double v = ints ? (double)ints[i] * alpha[ch] : x[i];
            const int q = quantize(bn_apply(bn, ch, v), n);
            if (width == 8)
                ((uint8_t *)out)[dst + ch] = (uint8_t)q;
            else
                ((int16_t *)out)[dst + ch] = (int16_t)q;
        }
    }
}

static void residual_scalar(const int32_t *ints, const double *alpha, int npix, int c, double *x) {
    for (size_t i = 0; i < (size_t)npix * c; i++) x[i] += (double)ints[i] * alpha[i % c];
}

#ifdef APQ_X86
/* Four channels per vector, the scalar operations in the scalar order (no FMA: built -ffp-contract=off).
 * clip by max/min equals the scalar's compares for every non-NaN value. c % 4 == 0. */
TARGET_AVX2 static void codes_avx2(int width, const double *x, const int32_t *ints, const double *alpha, int H, int W,
                                   int c, const batchnorm *bn, int bits, void *out) {
    const __m256d n = _mm256_set1_pd((double)((1 << bits) - 1)), half = _mm256_set1_pd(0.5);
    const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
    for (int p = 0; p < H * W; p++) {
        const size_t dst = ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * c;
        for (int ch = 0; ch < c; ch += 4) {
            const size_t i = (size_t)p * c + ch;
            const __m256d v = ints ? _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(ints + i))),
                                                   _mm256_loadu_pd(alpha + ch))
                                   : _mm256_loadu_pd(x + i);
            __m256d z = _mm256_div_pd(_mm256_sub_pd(v, _mm256_loadu_pd(bn->mean + ch)), _mm256_loadu_pd(bn->denom + ch));
            z = _mm256_add_pd(_mm256_mul_pd(z, _mm256_loadu_pd(bn->gamma + ch)), _mm256_loadu_pd(bn->beta + ch));
            z = _mm256_min_pd(_mm256_max_pd(z, zero), one);
            const __m128i q = _mm256_cvttpd_epi32(_mm256_floor_pd(_mm256_add_pd(_mm256_mul_pd(z, n), half)));
            const __m128i q16 = _mm_packs_epi32(q, q);
            if (width == 8) {
                const int32_t q8 = _mm_cvtsi128_si32(_mm_packus_epi16(q16, q16));
                memcpy((uint8_t *)out + dst + ch, &q8, sizeof q8);
            } else {
                _mm_storel_epi64((__m128i *)((int16_t *)out + dst + ch), q16);
            }
        }
    }
}

TARGET_AVX2 static void residual_avx2(const int32_t *ints, const double *alpha, int npix, int c, double *x) {
    for (int p = 0; p < npix; p++)
        for (int ch = 0; ch < c; ch += 4) {
            const size_t i = (size_t)p * c + ch;
            const __m256d d = _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(ints + i)));
            _mm256_storeu_pd(x + i, _mm256_add_pd(_mm256_loadu_pd(x + i), _mm256_mul_pd(d, _mm256_loadu_pd(alpha + ch))));
        }
}

/* codes_avx2 and residual_avx2 at eight channels per vector: the same operations, so the same results.
 * c % 8 == 0. */
TARGET_AVX512 static void codes_avx512(int width, const double *x, const int32_t *ints, const double *alpha, int H,
                                       int W, int c, const batchnorm *bn, int bits, void *out) {
    const __m512d n = _mm512_set1_pd((double)((1 << bits) - 1)), half = _mm512_set1_pd(0.5);
    const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
    for (int p = 0; p < H * W; p++) {
        const size_t dst = ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * c;
        for (int ch = 0; ch < c; ch += 8) {
            const size_t i = (size_t)p * c + ch;
            const __m512d v = ints ? _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)(ints + i))),
                                                   _mm512_loadu_pd(alpha + ch))
                                   : _mm512_loadu_pd(x + i);
            __m512d z = _mm512_div_pd(_mm512_sub_pd(v, _mm512_loadu_pd(bn->mean + ch)), _mm512_loadu_pd(bn->denom + ch));
            z = _mm512_add_pd(_mm512_mul_pd(z, _mm512_loadu_pd(bn->gamma + ch)), _mm512_loadu_pd(bn->beta + ch));
            z = _mm512_min_pd(_mm512_max_pd(z, zero), one);
            const __m512d r = _mm512_roundscale_pd(_mm512_add_pd(_mm512_mul_pd(z, n), half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            const __m256i q = _mm512_cvttpd_epi32(r); /* 0..n */
            if (width == 8)
                _mm_storel_epi64((__m128i *)((uint8_t *)out + dst + ch), _mm256_cvtepi32_epi8(q));
            else
                _mm_storeu_si128((__m128i *)((int16_t *)out + dst + ch), _mm256_cvtepi32_epi16(q));
        }
    }
}

TARGET_AVX512 static void residual_avx512(const int32_t *ints, const double *alpha, int npix, int c, double *x) {
    for (int p = 0; p < npix; p++)
        for (int ch = 0; ch < c; ch += 8) {
            const size_t i = (size_t)p * c + ch;
            const __m512d d = _mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)(ints + i)));
            _mm512_storeu_pd(x + i, _mm512_add_pd(_mm512_loadu_pd(x + i), _mm512_mul_pd(d, _mm512_loadu_pd(alpha + ch))));
        }
}
#endif

static void codes(int path, int width, const double *x, const int32_t *ints, const double *alpha, int H, int W, int c,
                  const batchnorm *bn, int bits, void *out) {
#ifdef APQ_X86
    if (path == PATH_AVX512 && c % 8 == 0) {
        codes_avx512(width, x, ints, alpha, H, W, c, bn, bits, out);
        return;
    }
    if (path != PATH_SCALAR && c % 4 == 0) {
        codes_avx2(width, x, ints, alpha, H, W, c, bn, bits, out);
        return;
    }
#endif
    codes_scalar(width, x, ints, alpha, H, W, c, bn, bits, out);
}

static void residual(int path, const int32_t *ints, const double *alpha, int npix, int c, double *x) {
#ifdef APQ_X86
    if (path == PATH_AVX512 && c % 8 == 0) {
        residual_avx512(ints, alpha, npix, c, x);
        return;
    }
    if (path != PATH_SCALAR && c % 4 == 0) {
        residual_avx2(ints, alpha, npix, c, x);
        return;
    }
#endif
    residual_scalar(ints, alpha, npix, c, x);
}

#ifdef APQ_X86
/* Eight codes (int32 lanes) -> the padded image at dst: int16 or uint8 by width. */
TARGET_AVX2 AI void store_codes8(int width, __m256i q, void *out, size_t dst) {
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    if (width == 8)
        _mm_storel_epi64((__m128i *)((uint8_t *)out + dst), _mm_packus_epi16(q16, q16));
    else
        _mm_storeu_si128((__m128i *)((int16_t *)out + dst), q16);
}

/* codes by thresholds, conv1's integer outputs: 8 channels per vector, c % 8 == 0. */
TARGET_AVX2 static void codes_ints_thr_avx2(int width, const int32_t *ints, int H, int W, int c, const int32_t *thr_t,
                                            const int32_t *sign, int bits, void *out) {
    const int n = (1 << bits) - 1;
    for (int p = 0; p < H * W; p++) {
        const size_t dst = ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * c;
        for (int ch = 0; ch < c; ch += 8) {
            const __m256i v = _mm256_sign_epi32(_mm256_loadu_si256((const __m256i *)(ints + (size_t)p * c + ch)),
                                                _mm256_loadu_si256((const __m256i *)(sign + ch)));
            __m256i q = _mm256_setzero_si256();
            for (int j = 0; j < n; j++) /* a true compare is -1 */
                q = _mm256_sub_epi32(q, _mm256_cmpgt_epi32(v, _mm256_loadu_si256((const __m256i *)(thr_t + (size_t)j * c + ch))));
            store_codes8(width, q, out, dst + ch);
        }
    }
}

/* codes by thresholds, the float64 residual stream: 8 channels per step (two vectors), c % 8 == 0. */
TARGET_AVX2 static void codes_x_thr_avx2(int width, const double *x, int H, int W, int c, const double *thr_t,
                                         const int32_t *sign, int bits, void *out) {
    const int n = (1 << bits) - 1;
    const __m256i odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int p = 0; p < H * W; p++) {
        const size_t dst = ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * c;
        for (int ch = 0; ch < c; ch += 8) {
            const double *src = x + (size_t)p * c + ch;
            const __m256d v0 = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(sign + ch))),
                                             _mm256_loadu_pd(src));
            const __m256d v1 = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(sign + ch + 4))),
                                             _mm256_loadu_pd(src + 4));
            __m256i q0 = _mm256_setzero_si256(), q1 = q0; /* int64 counts */
            for (int j = 0; j < n; j++) {
                const double *t = thr_t + (size_t)j * c + ch;
                q0 = _mm256_sub_epi64(q0, _mm256_castpd_si256(_mm256_cmp_pd(v0, _mm256_loadu_pd(t), _CMP_GE_OQ)));
                q1 = _mm256_sub_epi64(q1, _mm256_castpd_si256(_mm256_cmp_pd(v1, _mm256_loadu_pd(t + 4), _CMP_GE_OQ)));
            }
            /* the low int32 of each count, in channel order */
            const __m128i lo0 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(q0, odd));
            const __m128i lo1 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(q1, odd));
            store_codes8(width, _mm256_set_m128i(lo1, lo0), out, dst + ch);
        }
    }
}
#endif

/* bn1 + quantizer of the residual stream x into the padded image out. */
static void codes_x(int path, int width, const double *x, int H, int W, const apq_block_int *b, int bits, void *out) {
#ifdef APQ_X86
    if (path != PATH_SCALAR && b->xthr_t && b->cin % 8 == 0) {
        codes_x_thr_avx2(width, x, H, W, b->cin, b->xthr_t, b->xsign, bits, out);
        return;
    }
#endif
    codes(path, width, x, NULL, NULL, H, W, b->cin, &b->bn1, bits, out);
}

/* bn2 + quantizer of conv1's integer outputs (I * alpha1) into the padded image out. */
static void codes_ints(int path, int width, const int32_t *ints, int H, int W, const apq_block_int *b, int bits,
                       void *out) {
#ifdef APQ_X86
    if (path != PATH_SCALAR && b->ithr_t && b->cout % 8 == 0) {
        codes_ints_thr_avx2(width, ints, H, W, b->cout, b->ithr_t, b->isign, bits, out);
        return;
    }
#endif
    codes(path, width, NULL, ints, b->alpha1, H, W, b->cout, &b->bn2, bits, out);
}

/* ---------------------------------------------------------------- the network */

typedef struct {
    const apq_net_int *net;
    const double *images;
    float *logits;
    int path, width;
} job_int;

static int forward_range(const void *ctx, int b0, int b1) {
    const job_int *jb = ctx;
    const apq_net_int *net = jb->net;
    const int H0 = net->height, W0 = net->width, path = jb->path, width = jb->width, bits = net->bits;
    const size_t elem = width / 8; /* bytes per activation code */
    int cmax = net->stem_cout, status = 0;
    for (int i = 0; i < net->nblocks; i++)
        if (net->blocks[i].cout > cmax) cmax = net->blocks[i].cout;
    const size_t npix = (size_t)H0 * W0, padded = padded_pixels(H0, W0) * cmax;
    double *x = apq_alloc(sizeof(double) * npix * cmax), *xs = apq_alloc(sizeof(double) * npix * cmax);
    void *pa = apq_alloc(elem * padded), *pb = apq_alloc(elem * padded);
    int32_t *acc = apq_alloc(sizeof(int32_t) * npix * cmax);
    int32_t *scratch = apq_alloc(sizeof(int32_t) * (padded_pixels(H0, W0) + npix));
    if (!x || !xs || !pa || !pb || !acc || !scratch) {
        status = -2;
        goto done;
    }
    for (int img = b0; img < b1; img++) {
        int H = H0, W = W0, C = net->stem_cout;
        apq_stem(path, jb->images + (size_t)img * npix, H, W, net->stem_kernel, net->stem_w, C, x);
        for (int i = 0; i < net->nblocks; i++) {
            const apq_block_int *b = net->blocks + i;
            const int s = b->stride, Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
            memset(pa, 0, elem * padded_pixels(H, W) * b->cin);
            codes_x(path, width, x, H, W, b, bits, pa);
            conv(path, width, bits, pa, H, W, b->cin, s, Ho, Wo, b->w1, b->cout, scratch, acc);
            memset(pb, 0, elem * padded_pixels(Ho, Wo) * b->cout);
            codes_ints(path, width, acc, Ho, Wo, b, bits, pb);
            if (s != 1 || b->cin != b->cout) {
                shortcut(x, H, W, b->cin, b->cout, s, xs);
                double *t = x;
                x = xs;
                xs = t;
            }
            conv(path, width, bits, pb, Ho, Wo, b->cout, 1, Ho, Wo, b->w2, b->cout, scratch, acc);
            residual(path, acc, b->alpha2, Ho * Wo, b->cout, x);
            H = Ho;
            W = Wo;
            C = b->cout;
        }
        head(x, H * W, C, &net->head_bn, net->head_in, net->head_out, net->fc_w, net->fc_b,
             jb->logits + (size_t)img * net->head_out);
    }
done:
    free(x);
    free(xs);
    free(pa);
    free(pb);
    free(acc);
    free(scratch);
    return status;
}

/* What a width needs of a conv: cin a multiple of its group, cout of COLS; k <= max_bits_of(width, path). */
static int valid_conv(int width, int bits, int path, int cin, int cout) {
    if (width != 8 && width != 16) return 0;
    if (bits < 1 || bits > max_bits_of(width, path)) return 0;
    return cin > 0 && cin % group_of(width) == 0 && cout > 0 && cout % COLS == 0 && cin <= 3000 && cout <= 3000;
}

static int valid_net(const apq_net_int *net, int width, int path) {
    if (net->head_in > 1024) return 0;
    for (int i = 0; i < net->nblocks; i++) {
        const apq_block_int *b = net->blocks + i;
        if (!valid_conv(width, net->bits, path, b->cin, b->cout) || !valid_conv(width, net->bits, path, b->cout, b->cout))
            return 0;
    }
    return 1;
}

/* logits [B][head_out] (float32) for images [B][height][width] (float64, pixels / 255), split across up to
 * `threads` threads, with every conv at `width` (8 or 16). Returns 0, -1 (path not supported by this CPU),
 * -2 (out of memory), -3 (bad arguments: besides the counts, every conv's cin must be a multiple of 2
 * (width 16) or 4 (width 8), its cout of 16, and width 8 on AVX2 serves k <= 7). */
int apq_forward_int(const apq_net_int *net, const double *images, int batch, float *logits, int threads, int path,
                    int width) {
    path = apq_resolve_path(path);
    if (path < 0) return -1;
    if (batch < 0 || threads < 1 || !valid_net(net, width, path)) return -3;
    const job_int jb = {net, images, logits, path, width};
    return apq_parallel(forward_range, &jb, batch, threads);
}

/* Test entry: I for k-bit codes [B][H][W][cin] (uint8, zero point 0) and weights packed for `width`,
 * out [B][Ho][Wo][cout]. */
int apq_conv_int(const uint8_t *codes_in, int batch, int H, int W, int cin, const void *w, int cout, int stride,
                 int bits, int width, int32_t *out, int path) {
    path = apq_resolve_path(path);
    if (path < 0) return -1;
    if (!valid_conv(width, bits, path, cin, cout)) return -3;
    const int Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
    const size_t elem = width / 8;
    uint8_t *padded = calloc(padded_pixels(H, W) * cin, elem);
    int32_t *scratch = malloc(sizeof(int32_t) * (padded_pixels(H, W) + (size_t)Ho * Wo));
    if (!padded || !scratch) {
        free(padded);
        free(scratch);
        return -2;
    }
    for (int b = 0; b < batch; b++) {
        for (int p = 0; p < H * W; p++) {
            const uint8_t *src = codes_in + ((size_t)b * H * W + p) * cin;
            const size_t dst = ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * cin;
            for (int ch = 0; ch < cin; ch++) {
                if (width == 8)
                    padded[dst + ch] = src[ch];
                else
                    ((int16_t *)padded)[dst + ch] = src[ch];
            }
        }
        conv(path, width, bits, padded, H, W, cin, stride, Ho, Wo, w, cout, scratch, out + (size_t)b * Ho * Wo * cout);
    }
    free(padded);
    free(scratch);
    return 0;
}
