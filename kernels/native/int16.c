/* Wide-integer kernels for 3..8 bits: the network of bitserial.c with each quantized conv computed as
 * dot products of int16 activation codes and int16 weight levels into int32 (AVX2 vpmaddwd).
 *
 * At k bits (N = 2^k, n = N - 1) with weight codes c and activation codes a the conv's integer is
 *     I = sum(a (2c + 1 - N))
 * -- the integer the bit-serial kernels build from popcounts. |I| <= 9 cin n n < 2^31 for cin <= 3000,
 * so int32 accumulators are exact. vpmaddwd multiplies int16 pairs and adds each pair into an int32 lane;
 * codes (<= 255) and levels (|level| <= 255) both fit int16, so nothing saturates (vpmaddubsw's int16 pair
 * sums would at 8 bits). Between layers activations are int16 codes, NHWC over a zero-padded image.
 *
 * The requantizer (bn, clip, round) is the float64 expression itself, per value and in the reference's
 * order: at up to 255 levels it is cheaper than a threshold search. The bit-serial kernels count thresholds
 * found by bisection on this very expression, so both give the same codes and the same logits (tested).
 *
 * Dispatch AVX2 -> portable C per call; the C code is the scalar reference the AVX2 code is tested
 * against, bit for bit (integer convs exactly, the float parts by doing the same operations in order).
 */
#include "common.h"

#define ROWS 6  /* output pixels per AVX2 micro-tile */
#define COLS 16 /* output channels per micro-tile: two ymm of int32 */

typedef struct {
    int cin, cout, stride;
    const int16_t *w1, *w2;        /* levels 2c + 1 - N packed [cout / COLS][9 cin / 2][COLS][2] */
    batchnorm bn1, bn2;            /* [cin] before conv1, [cout] before conv2 */
    const double *alpha1, *alpha2; /* [cout]: weight scale / (N n) */
} apq_block16;

typedef struct {
    int bits, height, width, nblocks;
    int stem_cout, stem_kernel;    /* the stem has one input channel */
    const double *stem_w;          /* [kernel*kernel][stem_cout] */
    const apq_block16 *blocks;
    int head_in, head_out;
    batchnorm head_bn;             /* [head_in] */
    const double *fc_w, *fc_b;     /* [head_out][head_in], [head_out] */
} apq_net16;

/* Activations: codes [(H + 2) (W + 2)][c] int16 over an image padded by one zero pixel on every side. The
 * window of output pixel p (stride s) starts at padded index s (oy (W + 2) + ox), tap k at + off[k]. */
static inline size_t padded_pixels(int H, int W) { return (size_t)(H + 2) * (W + 2); }

static inline int origin(int p, int Wo, int Wp, int stride) { return stride * ((p / Wo) * Wp + p % Wo); }

/* ---------------------------------------------------------------- the conv: out[p][o] = I */

static void conv_scalar(const int16_t *in, int W, int cin, int stride, int Ho, int Wo, const int16_t *w, int cout,
                        int32_t *out) {
    const int Wp = W + 2, half = cin / 2;
    for (int p = 0; p < Ho * Wo; p++) {
        const int g = origin(p, Wo, Wp, stride);
        for (int o = 0; o < cout; o++) {
            const int16_t *wo = w + (size_t)(o / COLS) * 9 * half * COLS * 2 + (o % COLS) * 2;
            int32_t acc = 0;
            for (int k = 0; k < 9; k++) {
                const int16_t *a = in + (size_t)(g + (k / 3) * Wp + k % 3) * cin;
                for (int j = 0; j < half; j++) {
                    const int16_t *wj = wo + (size_t)(k * half + j) * COLS * 2;
                    acc += a[2 * j] * wj[0] + a[2 * j + 1] * wj[1];
                }
            }
            out[(size_t)p * cout + o] = acc;
        }
    }
}

#ifdef APQ_X86
/* ROWS pixels x COLS channels of int32 accumulators (12 ymm) stay in registers over the whole window;
 * per channel pair: 2 weight loads, ROWS broadcasts of an activation pair, 2 ROWS vpmaddwd. Channel
 * blocks are the outer loop so one block's weights (9 cin / 2 x 64 bytes) stay in L1 across the pixels.
 * Requires cout % COLS == 0 and even cin. */
TARGET_AVX2 static void conv_avx2(const int16_t *in, int W, int cin, int stride, int Ho, int Wo, const int16_t *w,
                                  int cout, int32_t *out) {
    const int Wp = W + 2, half = cin / 2, npix = Ho * Wo;
    int off[9];
    for (int k = 0; k < 9; k++) off[k] = ((k / 3) * Wp + k % 3) * cin;
    for (int ob = 0; ob < cout / COLS; ob++) {
        const __m256i *wb = (const __m256i *)(w + (size_t)ob * 9 * half * COLS * 2);
        for (int p0 = 0; p0 < npix; p0 += ROWS) {
            const int16_t *a[ROWS];
            for (int r = 0; r < ROWS; r++) /* a short last tile repeats its last pixel, stored once */
                a[r] = in + (size_t)origin(p0 + r < npix ? p0 + r : npix - 1, Wo, Wp, stride) * cin;
            __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
            __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
            for (int k = 0; k < 9; k++) {
                const int32_t *a0 = (const int32_t *)(a[0] + off[k]), *a1 = (const int32_t *)(a[1] + off[k]);
                const int32_t *a2 = (const int32_t *)(a[2] + off[k]), *a3 = (const int32_t *)(a[3] + off[k]);
                const int32_t *a4 = (const int32_t *)(a[4] + off[k]), *a5 = (const int32_t *)(a[5] + off[k]);
                const __m256i *wk = wb + (size_t)k * half * 2;
                for (int j = 0; j < half; j++) {
                    const __m256i w0 = _mm256_loadu_si256(wk + 2 * j), w1 = _mm256_loadu_si256(wk + 2 * j + 1);
                    __m256i b;
#define STEP(r)                                                       \
    b = _mm256_set1_epi32(a##r[j]);                                   \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(b, w0)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(b, w1));
                    STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
#undef STEP
                }
            }
            const __m256i c[ROWS][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
            for (int r = 0; r < ROWS && p0 + r < npix; r++) {
                int32_t *dst = out + (size_t)(p0 + r) * cout + ob * COLS;
                _mm256_storeu_si256((__m256i *)dst, c[r][0]);
                _mm256_storeu_si256((__m256i *)(dst + 8), c[r][1]);
            }
        }
    }
}
#endif

static void conv(int path, const int16_t *in, int W, int cin, int stride, int Ho, int Wo, const int16_t *w, int cout,
                 int32_t *out) {
#ifdef APQ_X86
    if (path != PATH_SCALAR && cout % COLS == 0) {
        conv_avx2(in, W, cin, stride, Ho, Wo, w, cout, out);
        return;
    }
#endif
    conv_scalar(in, W, cin, stride, Ho, Wo, w, cout, out);
}

/* ---------------------------------------------------------------- requantization and the residual
 * codes: v[p][c] -> quantize(bn(v)) into the padded image out (interior only; the border stays 0), where
 * v = x (float64) or, for conv1's output, v = I * alpha[c]. */

static void codes_scalar(const double *x, const int32_t *ints, const double *alpha, int H, int W, int c,
                         const batchnorm *bn, int bits, int16_t *out) {
    const double n = (double)((1 << bits) - 1);
    for (int p = 0; p < H * W; p++) {
        int16_t *dst = out + ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * c;
        for (int ch = 0; ch < c; ch++) {
            const size_t i = (size_t)p * c + ch;
            const double v = ints ? (double)ints[i] * alpha[ch] : x[i];
            dst[ch] = (int16_t)quantize(bn_apply(bn, ch, v), n);
        }
    }
}

static void residual_scalar(const int32_t *ints, const double *alpha, int npix, int c, double *x) {
    for (size_t i = 0; i < (size_t)npix * c; i++) x[i] += (double)ints[i] * alpha[i % c];
}

#ifdef APQ_X86
/* Four channels per vector, the scalar operations in the scalar order (no FMA: built -ffp-contract=off).
 * clip by max/min equals the scalar's compares for every non-NaN value. c % 4 == 0. */
TARGET_AVX2 static void codes_avx2(const double *x, const int32_t *ints, const double *alpha, int H, int W, int c,
                                   const batchnorm *bn, int bits, int16_t *out) {
    const __m256d n = _mm256_set1_pd((double)((1 << bits) - 1)), half = _mm256_set1_pd(0.5);
    const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
    for (int p = 0; p < H * W; p++) {
        int16_t *dst = out + ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * c;
        for (int ch = 0; ch < c; ch += 4) {
            const size_t i = (size_t)p * c + ch;
            const __m256d v = ints ? _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(ints + i))),
                                                   _mm256_loadu_pd(alpha + ch))
                                   : _mm256_loadu_pd(x + i);
            __m256d z = _mm256_div_pd(_mm256_sub_pd(v, _mm256_loadu_pd(bn->mean + ch)), _mm256_loadu_pd(bn->denom + ch));
            z = _mm256_add_pd(_mm256_mul_pd(z, _mm256_loadu_pd(bn->gamma + ch)), _mm256_loadu_pd(bn->beta + ch));
            z = _mm256_min_pd(_mm256_max_pd(z, zero), one);
            const __m128i q = _mm256_cvttpd_epi32(_mm256_floor_pd(_mm256_add_pd(_mm256_mul_pd(z, n), half)));
            _mm_storel_epi64((__m128i *)(dst + ch), _mm_packs_epi32(q, q));
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
#endif

static void codes(int path, const double *x, const int32_t *ints, const double *alpha, int H, int W, int c,
                  const batchnorm *bn, int bits, int16_t *out) {
#ifdef APQ_X86
    if (path != PATH_SCALAR && c % 4 == 0) {
        codes_avx2(x, ints, alpha, H, W, c, bn, bits, out);
        return;
    }
#endif
    codes_scalar(x, ints, alpha, H, W, c, bn, bits, out);
}

static void residual(int path, const int32_t *ints, const double *alpha, int npix, int c, double *x) {
#ifdef APQ_X86
    if (path != PATH_SCALAR && c % 4 == 0) {
        residual_avx2(ints, alpha, npix, c, x);
        return;
    }
#endif
    residual_scalar(ints, alpha, npix, c, x);
}

/* ---------------------------------------------------------------- the network */

typedef struct {
    const apq_net16 *net;
    const double *images;
    float *logits;
    int path;
} job16;

static int forward_range16(const void *ctx, int b0, int b1) {
    const job16 *jb = ctx;
    const apq_net16 *net = jb->net;
    const int H0 = net->height, W0 = net->width, path = jb->path;
    int cmax = net->stem_cout, status = 0;
    for (int i = 0; i < net->nblocks; i++)
        if (net->blocks[i].cout > cmax) cmax = net->blocks[i].cout;
    const size_t npix = (size_t)H0 * W0, padded = padded_pixels(H0, W0) * cmax;
    double *x = malloc(sizeof(double) * npix * cmax), *xs = malloc(sizeof(double) * npix * cmax);
    int16_t *pa = malloc(sizeof(int16_t) * padded), *pb = malloc(sizeof(int16_t) * padded);
    int32_t *acc = malloc(sizeof(int32_t) * npix * cmax);
    if (!x || !xs || !pa || !pb || !acc) {
        status = -2;
        goto done;
    }
    for (int img = b0; img < b1; img++) {
        int H = H0, W = W0, C = net->stem_cout;
        apq_stem(path, jb->images + (size_t)img * npix, H, W, net->stem_kernel, net->stem_w, C, x);
        for (int i = 0; i < net->nblocks; i++) {
            const apq_block16 *b = net->blocks + i;
            const int s = b->stride, Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
            memset(pa, 0, sizeof(int16_t) * padded_pixels(H, W) * b->cin);
            codes(path, x, NULL, NULL, H, W, b->cin, &b->bn1, net->bits, pa);
            conv(path, pa, W, b->cin, s, Ho, Wo, b->w1, b->cout, acc);
            memset(pb, 0, sizeof(int16_t) * padded_pixels(Ho, Wo) * b->cout);
            codes(path, NULL, acc, b->alpha1, Ho, Wo, b->cout, &b->bn2, net->bits, pb);
            if (s != 1 || b->cin != b->cout) {
                apq_shortcut(x, H, W, b->cin, b->cout, s, xs);
                double *t = x;
                x = xs;
                xs = t;
            }
            conv(path, pb, Wo, b->cout, 1, Ho, Wo, b->w2, b->cout, acc);
            residual(path, acc, b->alpha2, Ho * Wo, b->cout, x);
            H = Ho;
            W = Wo;
            C = b->cout;
        }
        apq_head(x, H * W, C, &net->head_bn, net->head_in, net->head_out, net->fc_w, net->fc_b,
                 jb->logits + (size_t)img * net->head_out);
    }
done:
    free(x);
    free(xs);
    free(pa);
    free(pb);
    free(acc);
    return status;
}

static int valid_net(const apq_net16 *net) {
    if (net->bits < 1 || net->bits > 8 || net->head_in > 1024) return 0;
    for (int i = 0; i < net->nblocks; i++) {
        const apq_block16 *b = net->blocks + i;
        if (b->cin % 2 || b->cout % COLS || b->cin > 3000 || b->cout > 3000) return 0;
    }
    return 1;
}

/* logits [B][head_out] (float32) for images [B][height][width] (float64, pixels / 255), split across up to
 * `threads` threads. Returns 0, -1 (path not supported by this CPU), -2 (out of memory), -3 (bad
 * arguments: besides the counts, every conv needs even cin and cout a multiple of 16). */
int apq_forward_int16(const apq_net16 *net, const double *images, int batch, float *logits, int threads, int path) {
    path = apq_resolve_path(path);
    if (path < 0) return -1;
    if (path == PATH_AVX512) path = PATH_AVX2; /* no AVX-512 code here: AVX2 runs on those CPUs */
    if (batch < 0 || threads < 1 || !valid_net(net)) return -3;
    const job16 jb = {net, images, logits, path};
    return apq_parallel(forward_range16, &jb, batch, threads);
}

/* Test entry: I for codes [B][H][W][cin] (int16, zero point 0) and packed levels, out [B][Ho][Wo][cout]. */
int apq_conv_int16(const int16_t *codes_in, int batch, int H, int W, int cin, const int16_t *w, int cout, int stride,
                   int32_t *out, int path) {
    path = apq_resolve_path(path);
    if (path < 0) return -1;
    if (cin % 2 || cout % COLS) return -3;
    const int Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
    int16_t *padded = calloc(padded_pixels(H, W) * cin, sizeof(int16_t));
    if (!padded) return -2;
    for (int b = 0; b < batch; b++) {
        for (int p = 0; p < H * W; p++)
            memcpy(padded + ((size_t)(p / W + 1) * (W + 2) + p % W + 1) * cin,
                   codes_in + ((size_t)b * H * W + p) * cin, sizeof(int16_t) * cin);
        conv(path, padded, W, cin, stride, Ho, Wo, w, cout, out + (size_t)b * Ho * Wo * cout);
    }
    free(padded);
    return 0;
}
