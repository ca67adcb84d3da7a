/* What bitserial.c and integer.c share: dispatch, the float64 BatchNorm and requantizer every path must
 * compute identically, and the float parts of the network (stem, shortcut, head) around the quantized
 * convs. Everything float is float64, like the reference engine. */
#ifndef APQ_COMMON_H
#define APQ_COMMON_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define APQ_X86 1
#endif

#define AI static inline __attribute__((always_inline))
#define TARGET_AVX2 __attribute__((target("avx2,popcnt")))
#ifdef APQ_EMULATE_AVX512
/* A test build: the AVX-512 code on SIMDe's portable intrinsics, so that an AVX2 machine runs it and the
 * tests compare it with the other paths (emulate_avx512.h). */
#include "emulate_avx512.h"
#define TARGET_AVX512 TARGET_AVX2
#else
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vpopcntdq,avx2,popcnt")))
#endif

enum { PATH_AUTO = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_AVX512 = 3 };

/* The path to run for a requested one: AUTO -> the best this CPU has; -1 if the CPU lacks it. */
int apq_resolve_path(int path);

typedef struct {
    const double *mean, *denom, *gamma, *beta; /* denom = sqrt(var + eps) */
} batchnorm;

/* BatchNorm in inference form, in the order the reference computes it. */
static inline double bn_apply(const batchnorm *bn, int c, double x) {
    return (x - bn->mean[c]) / bn->denom[c] * bn->gamma[c] + bn->beta[c];
}

/* The reference's activation quantizer: floor(clip(z, 0, 1) * n + 0.5). */
static inline int quantize(double z, double n) {
    z = z < 0.0 ? 0.0 : (z > 1.0 ? 1.0 : z);
    return (int)floor(z * n + 0.5);
}

/* The stem conv (one input channel, zero padding kernel / 2): img [H*W] -> out [H*W][cout]. */
void apq_stem(int path, const double *img, int H, int W, int kk, const double *wt, int cout, double *out);

/* Option-A shortcut: x [H*W][cin] subsampled by stride, channels zero-filled up to cout -> out. Inlined
 * into each path's forward pass, so it is compiled (and vectorized) for that path's target. */
AI void shortcut(const double *x, int H, int W, int cin, int cout, int stride, double *out) {
    const int Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, n = cin < cout ? cin : cout;
    for (int y = 0; y < Ho; y++)
        for (int xx = 0; xx < Wo; xx++) {
            const double *src = x + ((size_t)(y * stride) * W + xx * stride) * cin;
            double *dst = out + ((size_t)y * Wo + xx) * cout;
            memcpy(dst, src, sizeof(double) * n);
            memset(dst + n, 0, sizeof(double) * (cout - n));
        }
}

/* relu(bn(x)), global average pool, linear: x [npix][c] -> logits [head_out] (head_in <= 1024). Inlined
 * like shortcut: the BN runs across channels, each channel's sum in pixel order. */
AI void head(const double *x, int npix, int c, const batchnorm *bn, int head_in, int head_out, const double *fc_w,
             const double *fc_b, float *logits) {
    double pooled[1024];
    const int hin = head_in < 1024 ? head_in : 1024;
    for (int ch = 0; ch < hin; ch++) pooled[ch] = 0.0;
    for (int p = 0; p < npix; p++)
        for (int ch = 0; ch < hin; ch++) {
            const double v = bn_apply(bn, ch, x[(size_t)p * c + ch]);
            pooled[ch] += v > 0.0 ? v : 0.0;
        }
    for (int ch = 0; ch < hin; ch++) pooled[ch] /= (double)npix;
    for (int o = 0; o < head_out; o++) {
        double acc = 0.0;
        for (int ch = 0; ch < hin; ch++) acc += pooled[ch] * fc_w[(size_t)o * head_in + ch];
        logits[o] = (float)(acc + fc_b[o]);
    }
}

/* Scratch for the kernels, 64-byte aligned: SIMD rows then never straddle a cache line. With malloc's
 * 16-byte alignment the same code ran 1.5 x slower in some processes than in others (whichever offset the
 * heap gave the tile and dot buffers), and stayed so for the life of the process. Free with free(). */
static inline void *apq_alloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Runs fn(ctx, b0, b1) over [0, batch) split across up to `threads` threads, the caller being one of
 * them; returns the first non-zero status. */
typedef int (*apq_range_fn)(const void *ctx, int b0, int b1);
int apq_parallel(apq_range_fn fn, const void *ctx, int batch, int threads);

#endif
