/* Bit-serial any-precision kernels: the quantized body of the network on k-bit codes.
 *
 * Weights are the artifact's bit-planes as stored: [8][cout][row_words] uint64, plane 0 = MSB, rows in
 * (kh, kw, cin) order; k bits read planes 0..k-1 only. Activations are k-bit unsigned codes with zero
 * point 0, kept as k {0,1} planes over a zero-padded image (layout at plane_stride below).
 *
 * For weight codes c and activation codes a at k bits (N = 2^k, n = N - 1), the conv is exactly
 *     y = scale / (N n) * I,   I = 2 * sum(c a) + (1 - N) * sum(a)
 *     sum(c a) = sum_{p,q} 2^{(k-1-p)+(k-1-q)} popcount(W_p & A_q)
 * The sum(a) term (the mid-rise weight offset) is the per-pixel activation sum over the receptive field;
 * zero padding is activation code 0, so it needs no correction.
 *
 * Output pixels are processed in tiles of TILE: the tile's receptive fields are gathered into a bit row
 * per pixel laid out like a weight row (im2col on the fly, only TILE rows live, in L1; for stride 1 the
 * SIMD gather loads 4 neighbouring pixels per instruction), the AND+popcount core runs over it, then the
 * epilogue (scale, BN, clip, requantize, pack; or scale + float residual add) runs on the tile while it
 * is still in cache. Accumulators are 64-bit. The SIMD code lives in avx2.h and avx512.h.
 *
 * Dispatch: AVX-512 (VPOPCNTDQ; VNNI for integer.c) -> AVX2 -> portable C, chosen at run time per call
 * (target attributes, no -march flags at build time). The portable C core is the scalar reference the
 * SIMD cores are tested against, bit for bit. Build with -ffp-contract=off: the float epilogue must round
 * identically on every path.
 */
#include <pthread.h>

#include "common.h"

#define TILE 8
#define STRIP 4 /* tiles per core call, at most (the AVX-512 core's register block) */
#define MAX_BITS 8

/* ---------------------------------------------------------------- dispatch */

int apq_cpu_supports(int path) {
    if (path == PATH_SCALAR) return 1;
#ifdef APQ_X86
    __builtin_cpu_init();
    if (path == PATH_AVX2) return __builtin_cpu_supports("avx2");
#ifdef APQ_EMULATE_AVX512
    if (path == PATH_AVX512) return __builtin_cpu_supports("avx2"); /* SIMDe's AVX-512 on AVX2 */
#endif
    if (path == PATH_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni") &&
               __builtin_cpu_supports("avx512vpopcntdq");
#endif
    return 0;
}

int apq_resolve_path(int path) {
    if (path != PATH_AUTO) return apq_cpu_supports(path) ? path : -1;
    if (apq_cpu_supports(PATH_AVX512)) return PATH_AVX512;
    if (apq_cpu_supports(PATH_AVX2)) return PATH_AVX2;
    return PATH_SCALAR;
}

int apq_best_path(void) { return apq_resolve_path(PATH_AUTO); }

/* ---------------------------------------------------------------- cores
 * A core computes dot[o][t] = sum(c a) for output channels [0, cout) and the TILE pixels of a tile.
 * tile: [bits][row_words][TILE] uint64 (pixel t's row of plane q, word w at tile[(q*rw + w)*TILE + t]).
 * w: the artifact planes, plane p row o at w + (p*cout + o)*rw.
 */

AI void core_channel(const uint64_t *tile, const uint64_t *w, int bits, int cout, int o, int rw, int64_t *dot) {
    int64_t acc[TILE] = {0};
    for (int p = 0; p < bits; p++) {
        const uint64_t *wr = w + ((size_t)p * cout + o) * rw;
        for (int q = 0; q < bits; q++) {
            const int shift = 2 * bits - 2 - p - q;
            const uint64_t *ar = tile + (size_t)q * rw * TILE;
            for (int t = 0; t < TILE; t++) {
                int64_t s = 0;
                for (int i = 0; i < rw; i++) s += __builtin_popcountll(wr[i] & ar[i * TILE + t]);
                acc[t] += s << shift;
            }
        }
    }
    memcpy(dot + (size_t)o * TILE, acc, sizeof acc);
}

AI void core_scalar(const uint64_t *tile, const uint64_t *w, int bits, int cout, int rw, int64_t *dot) {
    for (int o = 0; o < cout; o++) core_channel(tile, w, bits, cout, o, rw, dot);
}

static inline int words_for(int c) { return (c + 63) / 64; }

/* Activation planes of an H x W image: k planes of cw = ceil(c / 64) words per pixel, stored plane-major
 * over the image padded by one zero pixel on every side: word j of plane q of pixel (y, x) is
 *     a[(q * cw + j) * P + (y + 1) * (W + 2) + (x + 1)],   P = plane_stride(H, W).
 * Padding makes a 3x3 window a fixed set of offsets from its top-left corner (no bounds checks), and the
 * words of neighbouring pixels are contiguous, so SIMD code gathers 4 pixels per load (implicit im2col).
 * TILE words of zero slack after each word array keep the last tile's reads inside the buffer. */
static inline size_t plane_stride(int H, int W) { return (size_t)(H + 2) * (W + 2) + TILE; }

#ifdef APQ_X86
#include "avx2.h"
#include "avx512.h"
#endif

/* The core over nt tiles, tile k at tile + k * tile_words, its dot at dot + k * cout * TILE. */
AI void run_core(int path, const uint64_t *tile, int nt, size_t tile_words, const uint64_t *w, const uint64_t *wn,
                 int bits, int cout, int rw, int64_t *dot) {
#ifdef APQ_X86
    if (path == PATH_AVX512) {
        core_avx512(tile, nt, tile_words, w, bits, cout, rw, dot, NULL);
        return;
    }
#endif
    for (int k = 0; k < nt; k++) {
        const uint64_t *tk = tile + k * tile_words;
        int64_t *dk = dot + (size_t)k * cout * TILE;
#ifdef APQ_X86
        if (path == PATH_AVX2) {
            core_avx2(tk, w, wn, bits, cout, rw, dk);
            continue;
        }
#endif
        core_scalar(tk, w, bits, cout, rw, dk);
    }
}

/* The AVX2 core's weights: the top k planes of w [8][cout][rw] split into nibbles, out [2][k][cout][rw]:
 * each byte's low nibble, then its high nibble shifted down (each byte then holds a lookup index). */
void apq_split_nibbles(const uint64_t *w, int bits, int cout, int rw, uint64_t *out) {
    const size_t n = (size_t)bits * cout * rw;
    const uint64_t low = 0x0f0f0f0f0f0f0f0fULL;
    for (size_t i = 0; i < n; i++) {
        out[i] = w[i] & low;
        out[n + i] = (w[i] >> 4) & low;
    }
}

/* ---------------------------------------------------------------- requantization by thresholds
 * The requantizer code(v) = floor(clip(bn(v), 0, 1) * n + 0.5) is monotone in v (every correctly rounded
 * float operation is), so it equals a count of thresholds: code(v) = #{j : s v >= U_j}, s = +-1. The
 * thresholds are found once per bits by bisection on the very float64 expression the reference
 * computes, so the kernels' codes are the reference's codes while costing a compare or two per value. */

/* Conv outputs: v = I * alpha[c] for integer I in [-imax, imax]. thr [c][n] int64, sign [c]. */
void apq_int_thresholds(const batchnorm *bn, const double *alpha, int channels, int bits, int64_t imax,
                        int64_t *thr, int32_t *sign) {
    const int n = (1 << bits) - 1;
    for (int c = 0; c < channels; c++) {
#define CODE(i) quantize(bn_apply(bn, c, (double)(s * (i)) * alpha[c]), (double)n)
        int64_t s = 1;
        if (CODE(-imax) > CODE(imax)) s = -1;
        sign[c] = (int32_t)s;
        for (int j = 1; j <= n; j++) {
            int64_t lo = -imax, hi = imax; /* least v with CODE(v) >= j, or imax + 1 */
            if (CODE(hi) < j) {
                thr[(size_t)c * n + j - 1] = imax + 1;
                continue;
            }
            while (lo < hi) {
                const int64_t mid = lo + (hi - lo) / 2;
                if (CODE(mid) >= j) hi = mid;
                else lo = mid + 1;
            }
            thr[(size_t)c * n + j - 1] = lo;
        }
#undef CODE
    }
}

static inline uint64_t key_of(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ULL);
}

static inline double double_of(uint64_t k) {
    const uint64_t u = (k >> 63) ? (k & 0x7fffffffffffffffULL) : ~k;
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The residual stream: v = x, any float64. thr [c][n] float64, sign [c]. */
void apq_float_thresholds(const batchnorm *bn, int channels, int bits, double *thr, int32_t *sign) {
    const int n = (1 << bits) - 1;
    for (int c = 0; c < channels; c++) {
#define CODE(x) quantize(bn_apply(bn, c, s * (x)), (double)n)
        double s = 1.0;
        if (CODE(-DBL_MAX) > CODE(DBL_MAX)) s = -1.0;
        sign[c] = (int32_t)s;
        for (int j = 1; j <= n; j++) {
            if (CODE(DBL_MAX) < j) {
                thr[(size_t)c * n + j - 1] = INFINITY;
                continue;
            }
            if (CODE(-DBL_MAX) >= j) {
                thr[(size_t)c * n + j - 1] = -INFINITY;
                continue;
            }
            uint64_t lo = key_of(-DBL_MAX), hi = key_of(DBL_MAX);
            while (lo < hi) {
                const uint64_t mid = lo + (hi - lo) / 2;
                if (CODE(double_of(mid)) >= j) hi = mid;
                else lo = mid + 1;
            }
            thr[(size_t)c * n + j - 1] = double_of(lo);
        }
#undef CODE
    }
}

/* #{j : v >= thr[j]} for ascending thr[0..n-1]. */
#define COUNT_AT_LEAST(v, thr, n, out)                                                 \
    do {                                                                               \
        if ((n) <= 3) {                                                                \
            int c_ = 0;                                                                \
            for (int j_ = 0; j_ < (n); j_++) c_ += (v) >= (thr)[j_];                   \
            (out) = c_;                                                                \
        } else {                                                                       \
            int lo_ = 0, hi_ = (n);                                                    \
            while (lo_ < hi_) {                                                        \
                const int mid_ = (lo_ + hi_) / 2;                                      \
                if ((v) >= (thr)[mid_]) lo_ = mid_ + 1;                                \
                else hi_ = mid_;                                                       \
            }                                                                          \
            (out) = lo_;                                                               \
        }                                                                              \
    } while (0)

/* ---------------------------------------------------------------- activations */

AI void put_code(uint64_t *a, size_t P, int bits, int cw, int ch, int code) {
    for (int q = 0; q < bits; q++)
        a[((size_t)q * cw + (ch >> 6)) * P] |= (uint64_t)((code >> (bits - 1 - q)) & 1) << (ch & 63);
}

/* x [H*W][c] float64 -> the padded planes (see plane_stride) of the k-bit codes of bn(x). */
AI void pack_activations(const double *x, int H, int W, int c, const double *thr, const int32_t *sign, int bits,
                         uint64_t *out) {
    const int cw = words_for(c), n = (1 << bits) - 1;
    const size_t P = plane_stride(H, W);
    memset(out, 0, sizeof(uint64_t) * P * bits * cw);
    for (int i = 0; i < H * W; i++) {
        uint64_t *dst = out + (size_t)(i / W + 1) * (W + 2) + i % W + 1;
        const double *src = x + (size_t)i * c;
        for (int ch = 0; ch < c; ch++) {
            int code;
            const double v = sign[ch] * src[ch];
            COUNT_AT_LEAST(v, thr + (size_t)ch * n, n, code);
            put_code(dst, P, bits, cw, ch, code);
        }
    }
}

/* ---------------------------------------------------------------- one quantized conv */

enum { EPI_INT = 0, EPI_PACK = 1, EPI_RESIDUAL = 2 };

typedef struct {
    int mode;
    int64_t *out_int;      /* EPI_INT: [pix][cout] */
    const int64_t *thr;    /* EPI_PACK: [cout][n] integer thresholds of the next BN + quantizer */
    const int32_t *sign;   /* EPI_PACK: [cout] */
    const int64_t *cmp_t;  /* EPI_PACK: [n][cout], the thresholds with the sign folded in (SIMD) */
    const uint8_t *flip;   /* EPI_PACK: [64 * words(cout)], 0xFF where the sign is -1 (SIMD) */
    uint64_t *out_planes;  /* EPI_PACK: padded planes of the output image */
    const double *alpha;   /* EPI_RESIDUAL: [cout], weight scale / (N n) */
    double *residual;      /* EPI_RESIDUAL: [pix][cout], I * alpha is added in place */
} epilogue;

/* The epilogue of one tile: dot [cout][TILE] and the lanes' window sums asum, output pixels pix (-1:
 * dropped) and their padded indices dst. */
AI void epilogue_tile(int path, const int64_t *dot, const int64_t *asum, const int *pix, const int *dst, int cout,
                      int bits, size_t Po, const epilogue *epi) {
    const int cwo = words_for(cout), n = (1 << bits) - 1;
    const int64_t offset = 1 - (1LL << bits);
#ifdef APQ_X86
    if (path == PATH_AVX512 && epi->mode == EPI_PACK && bits <= 4) {
        epilogue_pack_avx512(dot, asum, pix, dst, cout, bits, epi->cmp_t, epi->flip, epi->out_planes, Po);
        return;
    }
    if (path == PATH_AVX512 && epi->mode == EPI_RESIDUAL && cout % 8 == 0) {
        epilogue_residual_avx512(dot, asum, pix, cout, bits, epi->alpha, epi->residual);
        return;
    }
    if (path != PATH_SCALAR && epi->mode == EPI_PACK && bits <= 4) {
        epilogue_pack_avx2(dot, asum, pix, dst, cout, bits, epi->cmp_t, epi->flip, epi->out_planes, Po);
        return;
    }
    if (path != PATH_SCALAR && epi->mode == EPI_RESIDUAL && cout % 4 == 0) {
        epilogue_residual_avx2(dot, asum, pix, cout, bits, epi->alpha, epi->residual);
        return;
    }
#endif
    for (int t = 0; t < TILE; t++) {
        if (pix[t] < 0) continue;
        const size_t p = (size_t)pix[t];
        if (epi->mode == EPI_INT) {
            for (int o = 0; o < cout; o++) epi->out_int[p * cout + o] = 2 * dot[(size_t)o * TILE + t] + offset * asum[t];
        } else if (epi->mode == EPI_PACK) {
            uint64_t *out = epi->out_planes + dst[t];
            for (int o = 0; o < cout; o++) {
                const int64_t v = epi->sign[o] * (2 * dot[(size_t)o * TILE + t] + offset * asum[t]);
                int code;
                COUNT_AT_LEAST(v, epi->thr + (size_t)o * n, n, code);
                put_code(out, Po, bits, cwo, o, code);
            }
        } else {
            double *res = epi->residual + p * cout;
            for (int o = 0; o < cout; o++)
                res[o] += (double)(2 * dot[(size_t)o * TILE + t] + offset * asum[t]) * epi->alpha[o];
        }
    }
}

/* The tile's bit rows, laid out like weight rows: tile[(q * rw + d) * TILE + t] is word d of plane q of
 * lane t's receptive field (taps in (kh, kw) order, cin bits each). g[t] is lane t's window origin. */
AI void gather(const uint64_t *in, size_t P, int cin, int bits, int rw, const int *g, const int *off,
               uint64_t *tile) {
    const int cw = words_for(cin);
    for (int t = 0; t < TILE; t++)
        for (int k = 0; k < 9; k++)
            for (int q = 0; q < bits; q++)
                for (int j = 0; j < cw; j++) {
                    const uint64_t v = in[((size_t)q * cw + j) * P + g[t] + off[k]];
                    const int bit = k * cin + 64 * j, d = bit >> 6, sh = bit & 63;
                    uint64_t *row = tile + ((size_t)q * rw + d) * TILE + t;
                    row[0] |= v << sh;
                    if (sh && d + 1 < rw) row[TILE] |= v >> (64 - sh);
                }
}

/* The lanes of a conv's tiles, which depend on its shape only, so a forward pass builds them once per
 * conv for all its images. Tiles run over window origins (top-left corners, padded coordinates). Dense
 * (stride 1 on a wide image): every origin of rows 0..Ho-1, so consecutive lanes are consecutive words
 * and the SIMD gather loads 4 lanes at once; the two border columns between rows are computed and
 * dropped, which costs 2 / (W + 2) of the core. On narrow images that waste (13 % at 14 x 14, 22 % at
 * 7 x 7, more with the last tile's spare lanes) outweighs the cheaper gather: there, as for stride 2, the
 * lanes are the output pixels' origins. Per lane, TILE per tile: g the window origin, pix the output
 * pixel (-1: dropped), dst its index in the padded output planes. */
typedef struct {
    int count, dense;
    int *g, *pix, *dst;
} lanes;

static int lanes_init(lanes *ln, int H, int W, int stride) {
    const int Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, Wp = W + 2;
    ln->dense = stride == 1 && Wp >= 20;
    ln->count = ln->dense ? (Ho - 1) * Wp + Wo : Ho * Wo;
    const int n = (ln->count + TILE - 1) / TILE * TILE, row = ln->dense ? Wp : Wo;
    ln->g = malloc(sizeof(int) * 3 * (size_t)n);
    if (!ln->g) return -2;
    ln->pix = ln->g + n;
    ln->dst = ln->pix + n;
    for (int i = 0, oy = 0, ox = 0; i < n; i++) {
        const int ok = i < ln->count && ox < Wo;
        ln->g[i] = ln->dense ? i : (ok ? stride * (oy * Wp + ox) : 0);
        ln->pix[i] = ok ? oy * Wo + ox : -1;
        ln->dst[i] = ok ? (oy + 1) * (Wo + 2) + ox + 1 : -1;
        if (++ox == row) ox = 0, oy++;
    }
    return 0;
}

/* 3x3 conv, pad 1, stride 1 or 2, on padded planes of an H x W image; ln: its lanes (lanes_init). tile:
 * STRIP*bits*rw*TILE words, dot: STRIP*cout*TILE int64 (at 1 bit on AVX-512, the packing compares' masks),
 * sums: 2 * plane_stride(H, W) int64 scratch (each padded pixel's activation sum, then each window
 * origin's). */
AI void conv3x3(int path, const uint64_t *in, int H, int W, int cin, int bits, const uint64_t *w, const uint64_t *wn,
                int cout, int rw, int stride, const lanes *ln, uint64_t *tile, int64_t *dot, int64_t *sums,
                const epilogue *epi) {
    const int Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, Wp = W + 2, cw = words_for(cin);
    const int cwo = words_for(cout);
    const size_t P = plane_stride(H, W), Po = plane_stride(Ho, Wo);
    int off[9];
    for (int k = 0; k < 9; k++) off[k] = (k / 3) * Wp + k % 3;
    /* Activation sums: per padded pixel, then over each 3x3 window by origin (its top-left corner), as a
     * row pass and a column pass: wsum[f] = sum of pixsum over the window at f. */
    int64_t *pixsum = sums + P, *wsum = sums;
    memset(pixsum, 0, sizeof(int64_t) * P);
    for (int q = 0; q < bits; q++)
        for (int j = 0; j < cw; j++) {
            const uint64_t *plane = in + ((size_t)q * cw + j) * P;
            for (size_t f = 0; f < P; f++) pixsum[f] += (int64_t)__builtin_popcountll(plane[f]) << (bits - 1 - q);
        }
    const size_t origins = (size_t)H * Wp; /* every origin of a window inside the padded image */
    for (size_t f = 0; f < origins + 2 * (size_t)Wp; f++) pixsum[f] += pixsum[f + 1] + pixsum[f + 2];
    for (size_t f = 0; f < origins; f++) wsum[f] = pixsum[f] + pixsum[f + Wp] + pixsum[f + 2 * (size_t)Wp];
    if (epi->mode == EPI_PACK) memset(epi->out_planes, 0, sizeof(uint64_t) * Po * bits * cwo);
    const int count = ln->count;
    const size_t tile_words = (size_t)bits * rw * TILE;
    const int small = path == PATH_AVX512 && cin < 64 && 64 % cin == 0; /* gather_small_avx512 */
    /* A strip of up to STRIP tiles at a time: the AVX-512 core keeps 4 tiles x 4 channels of accumulators
     * in registers, so each weight word it loads serves 32 pixels. */
    const int strip = path == PATH_AVX512 ? STRIP : 1;
    /* AVX-512 packing at 1 bit: the compares run on the core's accumulators (core_pack) */
    const int fused = path == PATH_AVX512 && epi->mode == EPI_PACK && bits == 1 && cout % 4 == 0;
    const int cpad = cwo * 64;
    if (fused) memset(dot, 0, (size_t)STRIP * cpad); /* masks: the channels past cout stay zero */
    for (int s0 = 0; s0 < count; s0 += strip * TILE) {
        const int nt = (count - s0 + TILE - 1) / TILE < strip ? (count - s0 + TILE - 1) / TILE : strip;
        const int *g = ln->g + s0, *pix = ln->pix + s0, *dst = ln->dst + s0; /* the strip's lanes */
        int64_t asum[STRIP * TILE];
        for (int i = 0; i < nt * TILE; i++) asum[i] = pix[i] >= 0 ? wsum[g[i]] : 0;
#ifdef APQ_X86
        if (small)
            gather_small_avx512(in, P, cin, bits, rw, nt, g, ln->dense, off, tile, tile_words);
        else
#endif
            for (int k = 0; k < nt; k++) {
                uint64_t *tk = tile + k * tile_words;
                if (path == PATH_SCALAR || cin % 64) memset(tk, 0, sizeof(uint64_t) * tile_words);
#ifdef APQ_X86
                if (path != PATH_SCALAR)
                    gather_avx2(in, P, cin, bits, rw, s0 + k * TILE, ln->dense ? NULL : g + k * TILE, off, tk);
                else
#endif
                    gather(in, P, cin, bits, rw, g + k * TILE, off, tk);
            }
#ifdef APQ_X86
        if (fused) { /* the packing compares run in the core; dot's buffer holds their masks */
            const core_pack pk = {epi->cmp_t, asum, (uint8_t *)dot, cpad};
            core_avx512(tile, nt, tile_words, w, bits, cout, rw, NULL, &pk);
            for (int k = 0; k < nt; k++)
                epilogue_masks_avx512(pk.masks + (size_t)k * cpad, pix + k * TILE, dst + k * TILE, cout, epi->flip,
                                      epi->out_planes, Po);
            continue;
        }
#endif
        run_core(path, tile, nt, tile_words, w, wn, bits, cout, rw, dot);
        for (int k = 0; k < nt; k++)
            epilogue_tile(path, dot + (size_t)k * cout * TILE, asum + k * TILE, pix + k * TILE, dst + k * TILE, cout,
                          bits, Po, epi);
    }
}

/* ---------------------------------------------------------------- the network */

/* Everything float is float64, like the reference: the residual stream, BN, the stem and the head. Only
 * the quantized convs are integer, and exact. */
typedef struct {
    int cin, cout, stride, rw1, rw2;
    const uint64_t *w1, *w2;              /* artifact planes [8][cout][rw] */
    const uint64_t *w1n, *w2n;            /* their top k planes split into nibbles (split_nibbles) */
    const double *xthr;                   /* [cin][n]: bn1 + quantizer on the residual stream */
    const double *xthr_t;                 /* [n][cin]: the same, transposed (SIMD) */
    const int32_t *xsign;                 /* [cin] */
    const double *xneg;                   /* [cin]: -0.0 where xsign is -1, else +0.0 (SIMD) */
    const int64_t *ithr;                  /* [cout][n]: conv1 output -> bn2 + quantizer */
    const int32_t *isign;                 /* [cout] */
    const int64_t *icmp_t;                /* [n][cout]: the same with the sign folded in (SIMD) */
    const uint8_t *iflip;                 /* [64 * words(cout)]: 0xFF where isign is -1, else 0 */
    const double *alpha2;                 /* [cout]: conv2 weight scale / (N n) */
} apq_block;

typedef struct {
    int bits, height, width, nblocks;
    int stem_cout, stem_kernel;           /* the stem has one input channel */
    const double *stem_w;                 /* [kernel*kernel][stem_cout] */
    const apq_block *blocks;
    int head_in, head_out;
    batchnorm head_bn;                    /* [head_in] */
    const double *fc_w, *fc_b;            /* [head_out][head_in], [head_out] */
} apq_net;

AI void stem(const double *img, int H, int W, int kk, const double *wt, int cout, double *out) {
    const int pad = kk / 2;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            double *acc = out + ((size_t)y * W + x) * cout;
            for (int o = 0; o < cout; o++) acc[o] = 0.0;
            for (int ky = 0; ky < kk; ky++) {
                const int iy = y + ky - pad;
                if (iy < 0 || iy >= H) continue;
                for (int kx = 0; kx < kk; kx++) {
                    const int ix = x + kx - pad;
                    if (ix < 0 || ix >= W) continue;
                    const double v = img[iy * W + ix];
                    const double *wr = wt + (size_t)(ky * kk + kx) * cout;
                    for (int o = 0; o < cout; o++) acc[o] += v * wr[o];
                }
            }
        }
}

void apq_stem(int path, const double *img, int H, int W, int kk, const double *wt, int cout, double *out) {
#ifdef APQ_X86
    if (path == PATH_AVX512 && cout % 16 == 0 && stem_avx512(img, H, W, kk, wt, cout, out) == 0) return;
    if (path == PATH_AVX2 && cout % 16 == 0 && stem_avx2(img, H, W, kk, wt, cout, out) == 0) return;
#endif
    stem(img, H, W, kk, wt, cout, out);
}

typedef struct {
    apq_range_fn fn;
    const void *ctx;
    int b0, b1, status;
} range_job;

static void *range_thread(void *arg) {
    range_job *j = arg;
    j->status = j->fn(j->ctx, j->b0, j->b1);
    return NULL;
}

int apq_parallel(apq_range_fn fn, const void *ctx, int batch, int threads) {
    if (threads > batch) threads = batch;
    if (threads > 64) threads = 64;
    if (threads <= 1) return fn(ctx, 0, batch);
    range_job jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    for (int i = 0; i < threads; i++)
        jobs[i] = (range_job){fn, ctx, (int)((long)batch * i / threads), (int)((long)batch * (i + 1) / threads), 0};
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&tids[i], NULL, range_thread, &jobs[i]) == 0;
    range_thread(&jobs[0]);
    int status = jobs[0].status;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(tids[i], NULL);
        else range_thread(&jobs[i]); /* could not start a thread: do its share here */
        if (jobs[i].status && !status) status = jobs[i].status;
    }
    return status;
}

typedef struct {
    const apq_net *net;
    const double *images;
    float *logits;
    int path;
} job;

AI int forward_body(const job *jb, int b0, int b1, int path) {
    const apq_net *net = jb->net;
    const int bits = net->bits, H0 = net->height, W0 = net->width;
    int cmax = net->stem_cout, rwmax = 1, status = 0;
    for (int i = 0; i < net->nblocks; i++) {
        const apq_block *b = net->blocks + i;
        if (b->cout > cmax) cmax = b->cout;
        if (b->rw1 > rwmax) rwmax = b->rw1;
        if (b->rw2 > rwmax) rwmax = b->rw2;
    }
    const size_t npix = (size_t)H0 * W0;
    double *x = apq_alloc(sizeof(double) * npix * cmax);
    double *xs = apq_alloc(sizeof(double) * npix * cmax);
    const size_t P0 = plane_stride(H0, W0);
    uint64_t *pa = apq_alloc(sizeof(uint64_t) * P0 * bits * words_for(cmax));
    uint64_t *pb = apq_alloc(sizeof(uint64_t) * P0 * bits * words_for(cmax));
    uint64_t *tile = apq_alloc(sizeof(uint64_t) * STRIP * (size_t)bits * rwmax * TILE);
    int64_t *dot = apq_alloc(sizeof(int64_t) * STRIP * (size_t)cmax * TILE);
    int64_t *sums = apq_alloc(sizeof(int64_t) * 2 * P0);
    lanes *ln = calloc(2 * (size_t)net->nblocks, sizeof(lanes)); /* [block][conv1, conv2] */
    if (!x || !xs || !pa || !pb || !tile || !dot || !sums || !ln) {
        status = -2;
        goto done;
    }
    for (int i = 0, H = H0, W = W0; i < net->nblocks && !status; i++) {
        const int s = net->blocks[i].stride;
        status = lanes_init(&ln[2 * i], H, W, s);
        H = (H - 1) / s + 1;
        W = (W - 1) / s + 1;
        if (!status) status = lanes_init(&ln[2 * i + 1], H, W, 1);
    }
    if (status) goto done;
    for (int img = b0; img < b1; img++) {
        int H = H0, W = W0, C = net->stem_cout;
        apq_stem(path, jb->images + (size_t)img * npix, H, W, net->stem_kernel, net->stem_w, C, x);
        for (int i = 0; i < net->nblocks; i++) {
            const apq_block *b = net->blocks + i;
            const int s = b->stride, Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
#ifdef APQ_X86
            if (path == PATH_AVX512 && b->cin % 8 == 0 && bits <= 4)
                pack_activations_avx512(x, H, W, b->cin, b->xthr_t, b->xneg, bits, pa);
            else if (path != PATH_SCALAR && b->cin % 8 == 0 && bits <= 4)
                pack_activations_avx2(x, H, W, b->cin, b->xthr_t, b->xneg, bits, pa);
            else
#endif
                pack_activations(x, H, W, b->cin, b->xthr, b->xsign, bits, pa);
            epilogue e1 = {.mode = EPI_PACK, .thr = b->ithr, .sign = b->isign, .cmp_t = b->icmp_t, .flip = b->iflip,
                           .out_planes = pb};
            conv3x3(path, pa, H, W, b->cin, bits, b->w1, b->w1n, b->cout, b->rw1, s, &ln[2 * i], tile, dot, sums, &e1);
            if (s != 1 || b->cin != b->cout) {
                shortcut(x, H, W, b->cin, b->cout, s, xs);
                double *t = x;
                x = xs;
                xs = t;
            }
            epilogue e2 = {.mode = EPI_RESIDUAL, .alpha = b->alpha2, .residual = x};
            conv3x3(path, pb, Ho, Wo, b->cout, bits, b->w2, b->w2n, b->cout, b->rw2, 1, &ln[2 * i + 1], tile, dot, sums,
                    &e2);
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
    free(tile);
    free(dot);
    free(sums);
    for (int i = 0; ln && i < 2 * net->nblocks; i++) free(ln[i].g);
    free(ln);
    return status;
}

static int forward_scalar(const job *jb, int b0, int b1) { return forward_body(jb, b0, b1, PATH_SCALAR); }
#ifdef APQ_X86
TARGET_AVX2 static int forward_avx2(const job *jb, int b0, int b1) { return forward_body(jb, b0, b1, PATH_AVX2); }
TARGET_AVX512 static int forward_avx512(const job *jb, int b0, int b1) { return forward_body(jb, b0, b1, PATH_AVX512); }
#endif

static int forward_range(const void *ctx, int b0, int b1) {
    const job *jb = ctx;
#ifdef APQ_X86
    if (jb->path == PATH_AVX512) return forward_avx512(jb, b0, b1);
    if (jb->path == PATH_AVX2) return forward_avx2(jb, b0, b1);
#endif
    return forward_scalar(jb, b0, b1);
}

/* logits [B][head_out] (float32) for images [B][height][width] (float64, pixels / 255). Images are split
 * across up to `threads` threads (the calling thread is one of them). Returns 0, -1 (path not supported by
 * this CPU), -2 (out of memory), -3 (bad arguments). */
int apq_forward(const apq_net *net, const double *images, int batch, float *logits, int threads, int path) {
    path = apq_resolve_path(path);
    if (path < 0) return -1;
    if (batch < 0 || threads < 1 || net->bits < 1 || net->bits > MAX_BITS || net->head_in > 1024) return -3;
    const job jb = {net, images, logits, path};
    return apq_parallel(forward_range, &jb, batch, threads);
}

/* Test entry: integer conv outputs I = 2 sum(c a) + (1 - N) sum(a) for k-bit codes [B][H][W][cin] (uint8)
 * and artifact-layout planes, out [B][Ho][Wo][cout]. Returns 0, -1 (path unsupported), -2 (no memory). */
int apq_conv_codes(const uint8_t *codes, int batch, int H, int W, int cin, int bits, const uint64_t *w, int cout,
                   int rw, int stride, int64_t *out, int path) {
    path = apq_resolve_path(path);
    if (path < 0) return -1;
    const int cw = words_for(cin), Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
    const size_t P = plane_stride(H, W);
    uint64_t *planes = calloc(P * bits * cw, sizeof(uint64_t));
    uint64_t *wn = apq_alloc(sizeof(uint64_t) * 2 * (size_t)bits * cout * rw);
    uint64_t *tile = apq_alloc(sizeof(uint64_t) * STRIP * (size_t)bits * rw * TILE);
    int64_t *dot = apq_alloc(sizeof(int64_t) * STRIP * (size_t)cout * TILE);
    int64_t *sums = apq_alloc(sizeof(int64_t) * 2 * P);
    lanes ln = {0};
    int status = (planes && wn && tile && dot && sums) ? lanes_init(&ln, H, W, stride) : -2;
    if (!status) apq_split_nibbles(w, bits, cout, rw, wn);
    for (int b = 0; b < batch && !status; b++) {
        memset(planes, 0, sizeof(uint64_t) * P * bits * cw);
        for (int i = 0; i < H * W; i++)
            for (int c = 0; c < cin; c++)
                put_code(planes + (size_t)(i / W + 1) * (W + 2) + i % W + 1, P, bits, cw, c,
                         codes[((size_t)b * H * W + i) * cin + c]);
        epilogue e = {.mode = EPI_INT, .out_int = out + (size_t)b * Ho * Wo * cout};
        conv3x3(path, planes, H, W, cin, bits, w, wn, cout, rw, stride, &ln, tile, dot, sums, &e);
    }
    free(planes);
    free(wn);
    free(tile);
    free(dot);
    free(sums);
    free(ln.g);
    return status;
}
