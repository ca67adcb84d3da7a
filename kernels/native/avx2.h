/* AVX2 kernels of bitserial.c: the AND+popcount core and the per-pixel work around it (stem, activation
 * packing, epilogues). Included by bitserial.c only. Each function here has a portable C twin in
 * bitserial.c that computes the same bits: the same float64 operations in the same order per value (no
 * FMA, no reassociation), so every path gives identical logits (tested). */

/* AVX2 has no 64-bit popcount: a nibble lookup (vpshufb) gives byte counts, summed over up to 31 words
 * (8 * 31 < 256, no byte overflow), then vpsadbw to 64-bit lanes. The weights come split into nibbles
 * (wn: the low nibble of each byte, then the high nibble shifted down, see split_nibbles), so a masked
 * AND is the lookup index itself: per channel and vector two ANDs, two lookups and two adds, and the one
 * shift of the activations is shared by 4 channels. 4 channels x 8 pixels (two ymm) per pass. */
TARGET_AVX2 static void core_avx2(const uint64_t *tile, const uint64_t *w, const uint64_t *wn, int bits, int cout,
                                  int rw, int64_t *dot) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                                         2, 2, 3, 2, 3, 3, 4);
    const __m256i zero = _mm256_setzero_si256();
    const size_t high = (size_t)bits * cout * rw; /* wn + high: the high nibbles */
    int o = 0;
    for (; o + 4 <= cout; o += 4) {
        for (int p = 0; p < bits; p++) {
            /* one pointer per channel's row, so the loop's addressing is base + 8 i (no index arithmetic) */
            const uint64_t *wl0 = wn + ((size_t)p * cout + o) * rw, *wl1 = wl0 + rw, *wl2 = wl1 + rw, *wl3 = wl2 + rw;
            const uint64_t *wh0 = wl0 + high, *wh1 = wl1 + high, *wh2 = wl2 + high, *wh3 = wl3 + high;
            for (int q = 0; q < bits; q++) {
                const int sh = 2 * bits - 2 - p - q;
                const __m128i shift = _mm_cvtsi32_si128(sh);
                const uint64_t *ar = tile + (size_t)q * rw * TILE;
                for (size_t i0 = 0; i0 < (size_t)rw; i0 += 31) {
                    const size_t i1 = i0 + 31 < (size_t)rw ? i0 + 31 : (size_t)rw;
                    __m256i s00 = zero, s01 = zero, s10 = zero, s11 = zero, s20 = zero, s21 = zero, s30 = zero,
                            s31 = zero; /* s[channel][pixel half] */
                    for (size_t i = i0; i < i1; i++) {
                        __m256i a0 = _mm256_loadu_si256((const __m256i *)(ar + i * TILE));
                        __m256i a1 = _mm256_loadu_si256((const __m256i *)(ar + i * TILE + 4));
                        __m256i b;
#define COUNT(c, wv)                                                                        \
    b = _mm256_set1_epi64x((long long)(wv)[i]);                                             \
    s##c##0 = _mm256_add_epi8(s##c##0, _mm256_shuffle_epi8(lut, _mm256_and_si256(a0, b))); \
    s##c##1 = _mm256_add_epi8(s##c##1, _mm256_shuffle_epi8(lut, _mm256_and_si256(a1, b)));
                        COUNT(0, wl0) COUNT(1, wl1) COUNT(2, wl2) COUNT(3, wl3)
                        a0 = _mm256_srli_epi16(a0, 4);
                        a1 = _mm256_srli_epi16(a1, 4);
                        COUNT(0, wh0) COUNT(1, wh1) COUNT(2, wh2) COUNT(3, wh3)
#undef COUNT
                    }
                    const __m256i s[4][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}};
                    const int first = p == 0 && q == 0 && i0 == 0; /* the dot products start here */
                    for (int c = 0; c < 4; c++)
                        for (int h = 0; h < 2; h++) {
                            __m256i *d = (__m256i *)(dot + (size_t)(o + c) * TILE + 4 * h);
                            __m256i add = _mm256_sad_epu8(s[c][h], zero);
                            if (sh) add = _mm256_sll_epi64(add, shift); /* never at 1 bit */
                            _mm256_storeu_si256(d, first ? add : _mm256_add_epi64(_mm256_loadu_si256(d), add));
                        }
                }
            }
        }
    }
    for (; o < cout; o++) core_channel(tile, w, bits, cout, o, rw, dot);
}

/* The stem (one input channel, float64) for cout % 16 == 0, over a zero-padded copy of the image: 16
 * channels x 2 horizontally adjacent pixels of accumulators stay in registers across the kernel window,
 * and per channel the sum runs in the scalar stem's order. As in stem_avx512, a tap whose pixel is zero
 * adds 0 * w = +-0, which leaves the sum unchanged (it starts at +0 and never becomes -0), so only the
 * taps in `taps` run (bit ky * kk + kx; toff: their offsets in the padded image): those with a nonzero
 * pixel for either pixel of the pass. That drops the padding's taps without a bounds check, and ~40 %
 * of the rest on Fashion-MNIST's black backgrounds. */
TARGET_AVX2 AI void stem_pixels_avx2(const double *p, const int *toff, uint64_t taps, const double *wt, int cout,
                                     int two, double *dst) {
    for (int o = 0; o < cout; o += 16) {
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (uint64_t m = taps; m; m &= m - 1) {
            const int k = __builtin_ctzll(m);
            const double *wr = wt + (size_t)k * cout + o, *src = p + toff[k];
            const __m256d w0 = _mm256_loadu_pd(wr), w1 = _mm256_loadu_pd(wr + 4);
            const __m256d w2 = _mm256_loadu_pd(wr + 8), w3 = _mm256_loadu_pd(wr + 12);
            const __m256d v = _mm256_set1_pd(src[0]);
            a0 = _mm256_add_pd(a0, _mm256_mul_pd(v, w0));
            a1 = _mm256_add_pd(a1, _mm256_mul_pd(v, w1));
            a2 = _mm256_add_pd(a2, _mm256_mul_pd(v, w2));
            a3 = _mm256_add_pd(a3, _mm256_mul_pd(v, w3));
            if (two) {
                const __m256d u = _mm256_set1_pd(src[1]);
                b0 = _mm256_add_pd(b0, _mm256_mul_pd(u, w0));
                b1 = _mm256_add_pd(b1, _mm256_mul_pd(u, w1));
                b2 = _mm256_add_pd(b2, _mm256_mul_pd(u, w2));
                b3 = _mm256_add_pd(b3, _mm256_mul_pd(u, w3));
            }
        }
        _mm256_storeu_pd(dst + o, a0);
        _mm256_storeu_pd(dst + o + 4, a1);
        _mm256_storeu_pd(dst + o + 8, a2);
        _mm256_storeu_pd(dst + o + 12, a3);
        if (two) {
            _mm256_storeu_pd(dst + cout + o, b0);
            _mm256_storeu_pd(dst + cout + o + 4, b1);
            _mm256_storeu_pd(dst + cout + o + 8, b2);
            _mm256_storeu_pd(dst + cout + o + 12, b3);
        }
    }
}

/* The taps of a pass of 1 + two pixels at p (padded image, rows Wp apart, readable kk + 3 columns wide)
 * with a nonzero pixel, as stem_pixels_avx2 takes them. */
TARGET_AVX2 AI uint64_t stem_taps_avx2(const double *p, int Wp, int kk, int two) {
    uint64_t taps = 0;
    for (int ky = 0; ky < kk; ky++) {
        unsigned nonzero = 0; /* bit c: column c of the row is nonzero (NaN counts: it is not zero) */
        for (int c = 0; c < kk + two; c += 4) {
            const __m256d v = _mm256_loadu_pd(p + (size_t)ky * Wp + c);
            nonzero |= (unsigned)_mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_NEQ_UQ)) << c;
        }
        if (two) nonzero |= nonzero >> 1;
        taps |= (uint64_t)(nonzero & ((1u << kk) - 1)) << (ky * kk);
    }
    return taps;
}

/* The SIMD stems' zero-padded copy of the image: kk / 2 zero pixels on every side, rows Wp apart, and the
 * kk x kk taps' offsets in it (toff); NULL without memory or for kk > 8 (more taps than a mask's bits). */
static double *stem_padded(const double *img, int H, int W, int kk, int Wp, int *toff) {
    const int pad = kk / 2;
    double *pimg = kk <= 8 ? calloc((size_t)(H + 2 * pad) * Wp, sizeof(double)) : NULL;
    if (!pimg) return NULL;
    for (int k = 0; k < kk * kk; k++) toff[k] = (k / kk) * Wp + k % kk;
    for (int y = 0; y < H; y++) memcpy(pimg + (size_t)(y + pad) * Wp + pad, img + (size_t)y * W, sizeof(double) * W);
    return pimg;
}

/* 0 on success, -2 without a padded copy (stem_padded): the caller runs the scalar stem then. */
TARGET_AVX2 static int stem_avx2(const double *img, int H, int W, int kk, const double *wt, int cout, double *out) {
    const int Wp = W + 2 * (kk / 2) + 3; /* + 3: stem_taps_avx2 reads 4 columns at a time */
    int toff[64];
    double *pimg = stem_padded(img, H, W, kk, Wp, toff);
    if (!pimg) return -2;
    for (int y = 0; y < H; y++) {
        int x = 0;
        for (; x + 2 <= W; x += 2) {
            const double *p = pimg + (size_t)y * Wp + x;
            stem_pixels_avx2(p, toff, stem_taps_avx2(p, Wp, kk, 1), wt, cout, 1, out + ((size_t)y * W + x) * cout);
        }
        if (x < W) {
            const double *p = pimg + (size_t)y * Wp + x;
            stem_pixels_avx2(p, toff, stem_taps_avx2(p, Wp, kk, 0), wt, cout, 0, out + ((size_t)y * W + x) * cout);
        }
    }
    free(pimg);
    return 0;
}

/* Bit b of the code of a value, from the masks M_j = [v >= thr_j] of ascending thresholds (so
 * M_1 >= M_2 >= ...): code = #{j : M_j}, and its bit b is the XOR of M_j over the multiples j of 2^b. */

/* pack_activations for c % 8 == 0 and bits <= 4, thresholds transposed: thr_t [n][c], the sign as a sign
 * bit to XOR: neg [c] (-0.0 where it is -1; sign * x is exactly x with its sign bit flipped). Eight
 * channels per step (two compares per threshold); a plane's word is built in a register and stored once. */
TARGET_AVX2 AI void pack_activations_avx2_k(const double *x, int H, int W, int c, const double *thr_t,
                                            const double *neg, int bits, uint64_t *out) {
    const int cw = words_for(c), n = (1 << bits) - 1;
    const size_t P = plane_stride(H, W);
    memset(out, 0, sizeof(uint64_t) * P * bits * cw);
    for (int i = 0; i < H * W; i++) {
        uint64_t *dst = out + (size_t)(i / W + 1) * (W + 2) + i % W + 1;
        const double *src = x + (size_t)i * c;
        for (int j = 0; j < cw; j++) {
            uint64_t word[MAX_BITS] = {0};
            const int c1 = 64 * j + 64 < c ? 64 * j + 64 : c;
            for (int ch = 64 * j; ch < c1; ch += 8) {
                const __m256d v0 = _mm256_xor_pd(_mm256_loadu_pd(neg + ch), _mm256_loadu_pd(src + ch));
                const __m256d v1 = _mm256_xor_pd(_mm256_loadu_pd(neg + ch + 4), _mm256_loadu_pd(src + ch + 4));
                int plane[MAX_BITS] = {0};
                for (int k = 1; k <= n; k++) {
                    const double *t = thr_t + (size_t)(k - 1) * c + ch;
                    const int m = _mm256_movemask_pd(_mm256_cmp_pd(v0, _mm256_loadu_pd(t), _CMP_GE_OQ)) |
                                  _mm256_movemask_pd(_mm256_cmp_pd(v1, _mm256_loadu_pd(t + 4), _CMP_GE_OQ)) << 4;
                    for (int b = 0; b < bits && (k & ((1 << b) - 1)) == 0; b++) plane[bits - 1 - b] ^= m;
                }
                for (int q = 0; q < bits; q++) word[q] |= (uint64_t)plane[q] << (ch & 63);
            }
            for (int q = 0; q < bits; q++) dst[((size_t)q * cw + j) * P] = word[q];
        }
    }
}

/* Compiled once per bits (constant loop bounds unroll), like the packing epilogue below. */
TARGET_AVX2 static void pack_activations_avx2(const double *x, int H, int W, int c, const double *thr_t,
                                              const double *neg, int bits, uint64_t *out) {
    switch (bits) {
    case 1: pack_activations_avx2_k(x, H, W, c, thr_t, neg, 1, out); break;
    case 2: pack_activations_avx2_k(x, H, W, c, thr_t, neg, 2, out); break;
    case 3: pack_activations_avx2_k(x, H, W, c, thr_t, neg, 3, out); break;
    default: pack_activations_avx2_k(x, H, W, c, thr_t, neg, bits, out);
    }
}

/* gather (implicit im2col): each (tap, plane, word) of 4 lanes is one vector, shifted into place (OR-ed
 * into the zeroed tile; stored as is when cin % 64 == 0, the tile then needs no zeroing). Dense
 * tiles (g == NULL: lane t's window origin is g0 + t) load 4 consecutive pixels per instruction; other
 * tiles assemble the vector from the lanes' origins g[t]. */
TARGET_AVX2 static void gather_avx2(const uint64_t *in, size_t P, int cin, int bits, int rw, int g0, const int *g,
                                    const int *off, uint64_t *tile) {
    const int cw = words_for(cin);
    /* origins ascend within a tile, so 4 lanes 3 apart are 4 consecutive words: one load */
    const int run0 = g && g[3] - g[0] == 3, run1 = g && g[7] - g[4] == 3;
    for (int k = 0; k < 9; k++)
        for (int q = 0; q < bits; q++)
            for (int j = 0; j < cw; j++) {
                const uint64_t *base = in + ((size_t)q * cw + j) * P + off[k];
                __m256i a0, a1;
                if (g) {
                    a0 = run0 ? _mm256_loadu_si256((const __m256i *)(base + g[0]))
                              : _mm256_set_epi64x((long long)base[g[3]], (long long)base[g[2]],
                                                  (long long)base[g[1]], (long long)base[g[0]]);
                    a1 = run1 ? _mm256_loadu_si256((const __m256i *)(base + g[4]))
                              : _mm256_set_epi64x((long long)base[g[7]], (long long)base[g[6]],
                                                  (long long)base[g[5]], (long long)base[g[4]]);
                } else {
                    a0 = _mm256_loadu_si256((const __m256i *)(base + g0));
                    a1 = _mm256_loadu_si256((const __m256i *)(base + g0 + 4));
                }
                const int bit = k * cin + 64 * j, d = bit >> 6, sh = bit & 63;
                __m256i *row = (__m256i *)(tile + ((size_t)q * rw + d) * TILE);
                if (cin % 64 == 0) { /* every tile word comes from one (tap, word): store, nothing to merge */
                    _mm256_storeu_si256(row, a0);
                    _mm256_storeu_si256(row + 1, a1);
                    continue;
                }
                const __m128i l = _mm_cvtsi32_si128(sh);
                _mm256_storeu_si256(row, _mm256_or_si256(_mm256_loadu_si256(row), _mm256_sll_epi64(a0, l)));
                _mm256_storeu_si256(row + 1, _mm256_or_si256(_mm256_loadu_si256(row + 1), _mm256_sll_epi64(a1, l)));
                if (sh && d + 1 < rw) {
                    const __m128i r = _mm_cvtsi32_si128(64 - sh);
                    _mm256_storeu_si256(row + 2, _mm256_or_si256(_mm256_loadu_si256(row + 2), _mm256_srl_epi64(a0, r)));
                    _mm256_storeu_si256(row + 3, _mm256_or_si256(_mm256_loadu_si256(row + 3), _mm256_srl_epi64(a1, r)));
                }
            }
}

/* The packing epilogue for bits <= 4: for each output channel, the 8 pixels of the tile are the lanes.
 * The sign is folded into the thresholds as in epilogue_pack_avx512_k: with I = 2 dot + (1 - N) asum,
 * a channel's code is #{j : I >= cmp_t[j]}, its planes complemented where flip says. AVX2 compares only
 * with >, so the lanes hold I + 1 (the + 1 is folded into the per-lane offset). A channel's bit enters
 * each plane's word by doubling the word and subtracting the mask (-1 or 0), from the word's last
 * channel down, so that channel o lands at bit o % 64. Lane t with pix[t] >= 0 lands at padded index
 * dst[t] of the output planes (plane stride Po). */
TARGET_AVX2 AI void epilogue_pack_avx2_k(const int64_t *dot, const int64_t *asum, const int *pix, const int *dst,
                                         int cout, int bits, const int64_t *cmp_t, const uint8_t *flip,
                                         uint64_t *out, size_t Po) {
    const int n = (1 << bits) - 1, cwo = words_for(cout);
    const int64_t offset = 1 - (1LL << bits);
    const __m256i oa0 = _mm256_set_epi64x(offset * asum[3] + 1, offset * asum[2] + 1, offset * asum[1] + 1,
                                          offset * asum[0] + 1);
    const __m256i oa1 = _mm256_set_epi64x(offset * asum[7] + 1, offset * asum[6] + 1, offset * asum[5] + 1,
                                          offset * asum[4] + 1);
    for (int wd = 0; wd < cwo; wd++) {
        __m256i acc0[MAX_BITS], acc1[MAX_BITS];
        for (int q = 0; q < bits; q++) acc0[q] = acc1[q] = _mm256_setzero_si256();
        const int o0 = wd * 64, o1 = o0 + 64 < cout ? o0 + 64 : cout;
        for (int o = o1 - 1; o >= o0; o--) {
            const __m256i v0 = _mm256_add_epi64(_mm256_slli_epi64(_mm256_loadu_si256((const __m256i *)(dot + (size_t)o * TILE)), 1), oa0);
            const __m256i v1 = _mm256_add_epi64(_mm256_slli_epi64(_mm256_loadu_si256((const __m256i *)(dot + (size_t)o * TILE + 4)), 1), oa1);
            __m256i p0[MAX_BITS], p1[MAX_BITS];
            for (int q = 0; q < bits; q++) p0[q] = p1[q] = _mm256_setzero_si256();
            for (int j = 1; j <= n; j++) {
                const __m256i t = _mm256_set1_epi64x(cmp_t[(size_t)(j - 1) * cout + o]);
                const __m256i m0 = _mm256_cmpgt_epi64(v0, t), m1 = _mm256_cmpgt_epi64(v1, t);
                for (int b = 0; b < bits && (j & ((1 << b) - 1)) == 0; b++) {
                    p0[bits - 1 - b] = _mm256_xor_si256(p0[bits - 1 - b], m0);
                    p1[bits - 1 - b] = _mm256_xor_si256(p1[bits - 1 - b], m1);
                }
            }
            for (int q = 0; q < bits; q++) {
                acc0[q] = _mm256_sub_epi64(_mm256_add_epi64(acc0[q], acc0[q]), p0[q]);
                acc1[q] = _mm256_sub_epi64(_mm256_add_epi64(acc1[q], acc1[q]), p1[q]);
            }
        }
        const uint8_t *fw = flip + (size_t)o0; /* 64 bytes, zero past cout: the word's complement bits */
        const uint64_t complement =
            (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_loadu_si256((const __m256i *)fw)) |
            (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_loadu_si256((const __m256i *)(fw + 32))) << 32;
        for (int q = 0; q < bits; q++) {
            uint64_t lanes[TILE];
            _mm256_storeu_si256((__m256i *)lanes, acc0[q]);
            _mm256_storeu_si256((__m256i *)(lanes + 4), acc1[q]);
            uint64_t *plane = out + ((size_t)q * cwo + wd) * Po;
            for (int t = 0; t < TILE; t++)
                if (pix[t] >= 0) plane[dst[t]] = lanes[t] ^ complement;
        }
    }
}

TARGET_AVX2 static void epilogue_pack_avx2(const int64_t *dot, const int64_t *asum, const int *pix, const int *dst,
                                           int cout, int bits, const int64_t *cmp_t, const uint8_t *flip,
                                           uint64_t *out, size_t Po) {
    switch (bits) {
    case 1: epilogue_pack_avx2_k(dot, asum, pix, dst, cout, 1, cmp_t, flip, out, Po); break;
    case 2: epilogue_pack_avx2_k(dot, asum, pix, dst, cout, 2, cmp_t, flip, out, Po); break;
    case 3: epilogue_pack_avx2_k(dot, asum, pix, dst, cout, 3, cmp_t, flip, out, Po); break;
    default: epilogue_pack_avx2_k(dot, asum, pix, dst, cout, bits, cmp_t, flip, out, Po);
    }
}

/* The residual epilogue for cout % 4 == 0: res[pix][o] += (double)I * alpha[o]. 4x4 blocks of dot
 * ([o][t]) are transposed to pixel rows; int64 -> double exactly by the 2^52 + 2^51 trick (|I| < 2^51). */
TARGET_AVX2 static void epilogue_residual_avx2(const int64_t *dot, const int64_t *asum, const int *pix, int cout,
                                               int bits, const double *alpha, double *res) {
    const int64_t offset = 1 - (1LL << bits);
    const __m256i magic_i = _mm256_set1_epi64x(0x4338000000000000LL);
    const __m256d magic_d = _mm256_castsi256_pd(magic_i);
    __m256i oa[TILE]; /* offset * asum per lane, broadcast once per tile */
    for (int t = 0; t < TILE; t++) oa[t] = _mm256_set1_epi64x(offset * asum[t]);
    for (int o = 0; o < cout; o += 4) {
        const __m256d al = _mm256_loadu_pd(alpha + o);
        for (int t0 = 0; t0 < TILE; t0 += 4) {
            __m256i r[4];
            for (int k = 0; k < 4; k++) r[k] = _mm256_loadu_si256((const __m256i *)(dot + (size_t)(o + k) * TILE + t0));
            /* transpose: c[t] = dot[o..o+3][t0 + t] */
            const __m256d u0 = _mm256_unpacklo_pd(_mm256_castsi256_pd(r[0]), _mm256_castsi256_pd(r[1]));
            const __m256d u1 = _mm256_unpackhi_pd(_mm256_castsi256_pd(r[0]), _mm256_castsi256_pd(r[1]));
            const __m256d u2 = _mm256_unpacklo_pd(_mm256_castsi256_pd(r[2]), _mm256_castsi256_pd(r[3]));
            const __m256d u3 = _mm256_unpackhi_pd(_mm256_castsi256_pd(r[2]), _mm256_castsi256_pd(r[3]));
            __m256i c[4];
            c[0] = _mm256_castpd_si256(_mm256_permute2f128_pd(u0, u2, 0x20));
            c[1] = _mm256_castpd_si256(_mm256_permute2f128_pd(u1, u3, 0x20));
            c[2] = _mm256_castpd_si256(_mm256_permute2f128_pd(u0, u2, 0x31));
            c[3] = _mm256_castpd_si256(_mm256_permute2f128_pd(u1, u3, 0x31));
            for (int t = 0; t < 4; t++) {
                if (pix[t0 + t] < 0) continue;
                const __m256i i = _mm256_add_epi64(_mm256_slli_epi64(c[t], 1), oa[t0 + t]);
                const __m256d d = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(i, magic_i)), magic_d);
                double *dst = res + (size_t)pix[t0 + t] * cout + o;
                _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), _mm256_mul_pd(d, al)));
            }
        }
    }
}
