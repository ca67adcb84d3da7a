/* AVX-512 kernels of bitserial.c (included by it only): the AND+popcount core and the per-pixel work
 * around it (stem, epilogues, activation packing, the gather when 64 / cin taps share a word), each the
 * AVX2 code's twin at 8 lanes per zmm and tested equal to the portable C. The AVX2 code this target
 * includes runs the rest (the gather for other cin). */

/* The packing epilogue at 1 bit, run on the accumulators of the core's block (cout % 4 == 0): with
 * I = 2 dot - asum, channel o's bit is [2 dot >= asum + cmp_t[o]], complemented where flip says
 * (epilogue_pack_avx512_k has the derivation). The bits go to masks [tile][cpad], one byte per channel,
 * bit t = lane t. (Written for 1 bit only: at more bits the compiler kept the accumulators in memory.) */
typedef struct {
    const int64_t *cmp_t, *asum; /* [n][cout]; [tile][TILE] */
    uint8_t *masks;
    int cpad;                    /* channels per row of masks: cout rounded up to 64 */
} core_pack;

/* AVX-512: 8 pixels = one zmm, VPOPCNTQ per 64-bit lane. A register block of NT tiles x 4 output
 * channels: each activation load serves 4 channels and each weight broadcast NT tiles, and the 16
 * accumulators are set up and stored once per block, which at the short rows of narrow convs (5 words
 * for 32 channels) was a third of the one-tile core's time. The plane pairs are summed by Horner's rule
 * on their weight 2^s, s = (k-1-p) + (k-1-q) from high to low (acc = 2 acc + the pairs at s), so no
 * second set of accumulators is needed. */
TARGET_AVX512 AI void core_avx512_nt(const uint64_t *tile, size_t tile_words, const uint64_t *w, int bits, int cout,
                                     int rw, int64_t *dot, const core_pack *pk, const int NT) {
    int o = 0;
    for (; o + 4 <= cout; o += 4) {
        __m512i acc[4][4]; /* [tile][channel] */
        for (int k = 0; k < NT; k++)
            for (int c = 0; c < 4; c++) acc[k][c] = _mm512_setzero_si512();
        for (int s = 2 * bits - 2; s >= 0; s--) {
            if (s < 2 * bits - 2)
                for (int k = 0; k < NT; k++)
                    for (int c = 0; c < 4; c++) acc[k][c] = _mm512_slli_epi64(acc[k][c], 1);
            for (int p = 0; p < bits; p++) {
                const int q = 2 * bits - 2 - s - p;
                if (q < 0 || q >= bits) continue;
                /* one pointer per channel's row, so the loop's addressing is base + 8 i */
                const uint64_t *w0 = w + ((size_t)p * cout + o) * rw, *w1 = w0 + rw, *w2 = w1 + rw, *w3 = w2 + rw;
                const uint64_t *ar = tile + (size_t)q * rw * TILE;
                for (size_t i = 0; i < (size_t)rw; i++) {
                    const __m512i b0 = _mm512_set1_epi64((long long)w0[i]), b1 = _mm512_set1_epi64((long long)w1[i]);
                    const __m512i b2 = _mm512_set1_epi64((long long)w2[i]), b3 = _mm512_set1_epi64((long long)w3[i]);
                    for (int k = 0; k < NT; k++) {
                        const __m512i a = _mm512_loadu_si512((const void *)(ar + k * tile_words + i * TILE));
                        acc[k][0] = _mm512_add_epi64(acc[k][0], _mm512_popcnt_epi64(_mm512_and_si512(a, b0)));
                        acc[k][1] = _mm512_add_epi64(acc[k][1], _mm512_popcnt_epi64(_mm512_and_si512(a, b1)));
                        acc[k][2] = _mm512_add_epi64(acc[k][2], _mm512_popcnt_epi64(_mm512_and_si512(a, b2)));
                        acc[k][3] = _mm512_add_epi64(acc[k][3], _mm512_popcnt_epi64(_mm512_and_si512(a, b3)));
                    }
                }
            }
        }
        if (pk) { /* 1 bit: X = asum, one threshold */
            for (int k = 0; k < NT; k++) {
                const __m512i X = _mm512_loadu_si512((const void *)(pk->asum + k * TILE));
                for (int c = 0; c < 4; c++)
                    pk->masks[(size_t)k * pk->cpad + o + c] = _mm512_cmpge_epi64_mask(
                        _mm512_slli_epi64(acc[k][c], 1), _mm512_add_epi64(X, _mm512_set1_epi64(pk->cmp_t[o + c])));
            }
            continue;
        }
        for (int k = 0; k < NT; k++)
            for (int c = 0; c < 4; c++)
                _mm512_storeu_si512((void *)(dot + ((size_t)k * cout + o + c) * TILE), acc[k][c]);
    }
    for (; o < cout; o++)
        for (int k = 0; k < NT; k++) core_channel(tile + k * tile_words, w, bits, cout, o, rw, dot + (size_t)k * cout * TILE);
}

/* pk: NULL, or the 1-bit packing epilogue's compares to run in place of storing dot (cout % 4 == 0). */
TARGET_AVX512 static void core_avx512(const uint64_t *tile, int nt, size_t tile_words, const uint64_t *w, int bits,
                                      int cout, int rw, int64_t *dot, const core_pack *pk) {
    switch (nt) {
    case 4: core_avx512_nt(tile, tile_words, w, bits, cout, rw, dot, pk, 4); break;
    case 3: core_avx512_nt(tile, tile_words, w, bits, cout, rw, dot, pk, 3); break;
    case 2: core_avx512_nt(tile, tile_words, w, bits, cout, rw, dot, pk, 2); break;
    default: core_avx512_nt(tile, tile_words, w, bits, cout, rw, dot, pk, 1);
    }
}

/* The stem at 8 channels per vector, 16 channels (two zmm) x 4 horizontally adjacent pixels per pass, over
 * a zero-padded copy of the image so that every pixel runs the same taps. Per channel the sum runs in the
 * scalar stem's order. A tap whose pixel is zero adds 0 * w = +-0 to the sum, which leaves it unchanged
 * (the sum starts at +0 and never becomes -0: it is +0 or a sum of nonzero products), so the taps in
 * `taps` (bit ky * kk + kx; toff: their offsets in the padded image) are the only ones run: the padding,
 * as in the scalar stem, and the taps that are zero for all the pass's pixels, ~40 % of them on
 * Fashion-MNIST's black backgrounds. */
TARGET_AVX512 AI void stem_pixels_avx512(const double *pimg, const int *toff, uint64_t taps, const double *wt,
                                         int cout, int npx, double *dst) {
    for (int o = 0; o < cout; o += 16) {
        __m512d a[4][2];
        for (int t = 0; t < 4; t++) a[t][0] = a[t][1] = _mm512_setzero_pd();
        for (uint64_t m = taps; m; m &= m - 1) {
            const int k = __builtin_ctzll(m);
            const double *wr = wt + (size_t)k * cout + o, *src = pimg + toff[k];
            const __m512d w0 = _mm512_loadu_pd(wr), w1 = _mm512_loadu_pd(wr + 8);
            for (int t = 0; t < npx; t++) {
                const __m512d v = _mm512_set1_pd(src[t]);
                a[t][0] = _mm512_add_pd(a[t][0], _mm512_mul_pd(v, w0));
                a[t][1] = _mm512_add_pd(a[t][1], _mm512_mul_pd(v, w1));
            }
        }
        for (int t = 0; t < npx; t++) {
            _mm512_storeu_pd(dst + (size_t)t * cout + o, a[t][0]);
            _mm512_storeu_pd(dst + (size_t)t * cout + o + 8, a[t][1]);
        }
    }
}

/* The taps of a pass of npx pixels at p (padded image) with a nonzero pixel, as stem_pixels_avx512 takes
 * them; all of them when the pass's rows are wider than a zmm. */
TARGET_AVX512 AI uint64_t stem_taps_avx512(const double *p, int Wp, int kk, int npx) {
    const int cols = npx + kk - 1;
    if (cols > 8) return kk * kk == 64 ? ~0ULL : (1ULL << (kk * kk)) - 1;
    uint64_t taps = 0;
    for (int ky = 0; ky < kk; ky++) {
        const __m512d row = _mm512_maskz_loadu_pd((__mmask8)((1u << cols) - 1), p + (size_t)ky * Wp);
        const unsigned nonzero = _mm512_cmp_pd_mask(row, _mm512_setzero_pd(), _CMP_NEQ_UQ);
        unsigned any = 0; /* bit kx: one of columns kx .. kx + npx - 1 is nonzero (no branches: they mispredict) */
        for (int t = 0; t < npx; t++) any |= nonzero >> t;
        taps |= (uint64_t)(any & ((1u << kk) - 1)) << (ky * kk);
    }
    return taps;
}

/* 0 on success, -2 without a padded copy (stem_padded): the caller runs the scalar stem then. */
TARGET_AVX512 static int stem_avx512(const double *img, int H, int W, int kk, const double *wt, int cout, double *out) {
    const int Wp = W + 2 * (kk / 2);
    int toff[64];
    double *pimg = stem_padded(img, H, W, kk, Wp, toff);
    if (!pimg) return -2;
    for (int y = 0; y < H; y++) {
        int x = 0;
        for (; x + 4 <= W; x += 4) {
            const double *p = pimg + (size_t)y * Wp + x;
            stem_pixels_avx512(p, toff, stem_taps_avx512(p, Wp, kk, 4), wt, cout, 4, out + ((size_t)y * W + x) * cout);
        }
        for (; x < W; x++) {
            const double *p = pimg + (size_t)y * Wp + x;
            stem_pixels_avx512(p, toff, stem_taps_avx512(p, Wp, kk, 1), wt, cout, 1, out + ((size_t)y * W + x) * cout);
        }
    }
    free(pimg);
    return 0;
}

/* The AVX2 per-pixel work at 8 lanes per zmm, where it is worth it: the compares of the packing code
 * become mask registers, kept as one byte per channel; 64 channels' bytes are one zmm, from which
 * vptestmb picks out a pixel's (or, below, a plane's) 64-bit word in one instruction. */

/* (1 - N) asum[t] for the tile's 8 lanes: the weight offset's term of I = 2 dot + (1 - N) asum. */
TARGET_AVX512 AI __m512i weight_offsets_avx512(const int64_t *asum, int bits) {
    const __m512i offset = _mm512_set1_epi64(1 - (1LL << bits));
    return _mm512_mullo_epi64(_mm512_loadu_si512((const void *)asum), offset);
}

/* One plane word of 64 channels for each lane of a tile: masks [64] (byte o, bit t = lane t's bit of
 * channel o) complemented per flip [64], transposed by vptestmb, stored at plane[dst[t]] for kept lanes. */
TARGET_AVX512 AI void store_plane_words_avx512(const uint8_t *masks, const uint8_t *flip, const int *pix,
                                               const int *dst, uint64_t *plane) {
    const __m512i bytes = _mm512_xor_si512(_mm512_loadu_si512((const void *)masks), _mm512_loadu_si512((const void *)flip));
    for (int t = 0; t < TILE; t++)
        if (pix[t] >= 0) plane[dst[t]] = _mm512_test_epi8_mask(bytes, _mm512_set1_epi8((char)(1 << t)));
}

/* The packing epilogue, the 8 lanes of a tile in one zmm, sign folded into the thresholds. With
 * I = 2 dot - X, X = (N - 1) asum: for sign +1, I >= T_j <=> 2 dot >= X + T_j; for sign -1,
 * -I >= T_j <=> not (2 dot >= X + 1 - T_j), so the code is n minus the count of the ascending
 * thresholds 1 - T_{n+1-j}, i.e. the complement of its planes. cmp_t [n][cout] holds the thresholds
 * c_j, flip [64 * words] the complement per channel (0 or 0xFF, zero past cout). */
TARGET_AVX512 AI void epilogue_pack_avx512_k(const int64_t *dot, const int64_t *asum, const int *pix, const int *dst,
                                             int cout, int bits, const int64_t *cmp_t, const uint8_t *flip,
                                             uint64_t *out, size_t Po) {
    const int n = (1 << bits) - 1, cwo = words_for(cout);
    const __m512i X = _mm512_mullo_epi64(_mm512_loadu_si512((const void *)asum), _mm512_set1_epi64(n));
    for (int wd = 0; wd < cwo; wd++) {
        uint8_t masks[4][64]; /* [plane][channel]: bit t = lane t's bit of that plane (bits <= 4) */
        const int o0 = wd * 64, o1 = o0 + 64 < cout ? o0 + 64 : cout;
        if (o1 - o0 < 64) memset(masks, 0, sizeof masks);
        for (int o = o0; o < o1; o++) {
            const __m512i v = _mm512_slli_epi64(_mm512_loadu_si512((const void *)(dot + (size_t)o * TILE)), 1);
            __mmask8 p[4] = {0};
            for (int j = 1; j <= n; j++) {
                const __m512i c = _mm512_add_epi64(X, _mm512_set1_epi64(cmp_t[(size_t)(j - 1) * cout + o]));
                const __mmask8 m = _mm512_cmpge_epi64_mask(v, c);
                for (int b = 0; b < bits && (j & ((1 << b) - 1)) == 0; b++) p[bits - 1 - b] ^= m;
            }
            for (int q = 0; q < bits; q++) masks[q][o - o0] = p[q];
        }
        for (int q = 0; q < bits; q++)
            store_plane_words_avx512(masks[q], flip + o0, pix, dst, out + ((size_t)q * cwo + wd) * Po);
    }
}

TARGET_AVX512 static void epilogue_pack_avx512(const int64_t *dot, const int64_t *asum, const int *pix, const int *dst,
                                               int cout, int bits, const int64_t *cmp_t, const uint8_t *flip,
                                               uint64_t *out, size_t Po) {
    switch (bits) {
    case 1: epilogue_pack_avx512_k(dot, asum, pix, dst, cout, 1, cmp_t, flip, out, Po); break;
    case 2: epilogue_pack_avx512_k(dot, asum, pix, dst, cout, 2, cmp_t, flip, out, Po); break;
    default: epilogue_pack_avx512_k(dot, asum, pix, dst, cout, bits, cmp_t, flip, out, Po);
    }
}

/* The rest of the 1-bit packing epilogue after the core's compares: a tile's masks [cpad], a plane word
 * per 64 channels. */
TARGET_AVX512 static void epilogue_masks_avx512(const uint8_t *masks, const int *pix, const int *dst, int cout,
                                                const uint8_t *flip, uint64_t *out, size_t Po) {
    for (int wd = 0; wd < words_for(cout); wd++)
        store_plane_words_avx512(masks + 64 * wd, flip + 64 * wd, pix, dst, out + (size_t)wd * Po);
}

/* epilogue_residual_avx2 for cout % 8 == 0: 8x8 blocks of dot ([o][t]) converted to double (vcvtqq2pd,
 * exact for |I| < 2^53) and transposed to pixel rows; then the same multiply and add. */
TARGET_AVX512 static void epilogue_residual_avx512(const int64_t *dot, const int64_t *asum, const int *pix, int cout,
                                                   int bits, const double *alpha, double *res) {
    const __m512i oa = weight_offsets_avx512(asum, bits);
    for (int o = 0; o < cout; o += 8) {
        __m512d r[8], s[8], c[8];
        for (int k = 0; k < 8; k++)
            r[k] = _mm512_cvtepi64_pd(
                _mm512_add_epi64(_mm512_slli_epi64(_mm512_loadu_si512((const void *)(dot + (size_t)(o + k) * TILE)), 1), oa));
        /* transpose: c[t] lane k = r[k] lane t (pairs, then 128-bit lanes twice) */
        for (int k = 0; k < 8; k += 2) {
            s[k] = _mm512_unpacklo_pd(r[k], r[k + 1]);
            s[k + 1] = _mm512_unpackhi_pd(r[k], r[k + 1]);
        }
        for (int h = 0; h < 8; h += 4) {
            r[h] = _mm512_shuffle_f64x2(s[h], s[h + 2], 0x88);     /* lanes 0, 4 of rows h..h+3 */
            r[h + 1] = _mm512_shuffle_f64x2(s[h], s[h + 2], 0xDD); /* lanes 2, 6 */
            r[h + 2] = _mm512_shuffle_f64x2(s[h + 1], s[h + 3], 0x88); /* lanes 1, 5 */
            r[h + 3] = _mm512_shuffle_f64x2(s[h + 1], s[h + 3], 0xDD); /* lanes 3, 7 */
        }
        c[0] = _mm512_shuffle_f64x2(r[0], r[4], 0x88);
        c[4] = _mm512_shuffle_f64x2(r[0], r[4], 0xDD);
        c[2] = _mm512_shuffle_f64x2(r[1], r[5], 0x88);
        c[6] = _mm512_shuffle_f64x2(r[1], r[5], 0xDD);
        c[1] = _mm512_shuffle_f64x2(r[2], r[6], 0x88);
        c[5] = _mm512_shuffle_f64x2(r[2], r[6], 0xDD);
        c[3] = _mm512_shuffle_f64x2(r[3], r[7], 0x88);
        c[7] = _mm512_shuffle_f64x2(r[3], r[7], 0xDD);
        const __m512d al = _mm512_loadu_pd(alpha + o);
        for (int t = 0; t < TILE; t++) {
            if (pix[t] < 0) continue;
            double *d = res + (size_t)pix[t] * cout + o;
            _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), _mm512_mul_pd(c[t], al)));
        }
    }
}

/* pack_activations_avx2_k for c % 8 == 0: eight channels per compare, each compare a mask byte. The sign
 * is applied as an XOR of the sign bit (neg [c]: -0.0 where the sign is -1, else +0.0), which negates
 * exactly as the multiply by -1 does. */
TARGET_AVX512 AI void pack_activations_avx512_k(const double *x, int H, int W, int c, const double *thr_t,
                                                const double *neg, int bits, uint64_t *out) {
    const int cw = words_for(c), n = (1 << bits) - 1;
    const size_t P = plane_stride(H, W);
    memset(out, 0, sizeof(uint64_t) * P * bits * cw);
    for (int y = 0; y < H; y++)
        for (int xx = 0; xx < W; xx++) {
            uint64_t *dst = out + (size_t)(y + 1) * (W + 2) + xx + 1;
            const double *src = x + ((size_t)y * W + xx) * c;
            for (int j = 0; j < cw; j++) {
                uint64_t word[MAX_BITS] = {0};
                const int c1 = 64 * j + 64 < c ? 64 * j + 64 : c;
                for (int ch = 64 * j; ch < c1; ch += 8) {
                    const __m512d v = _mm512_xor_pd(_mm512_loadu_pd(src + ch), _mm512_loadu_pd(neg + ch));
                    __mmask8 plane[MAX_BITS] = {0};
                    for (int k = 1; k <= n; k++) {
                        const __mmask8 m =
                            _mm512_cmp_pd_mask(v, _mm512_loadu_pd(thr_t + (size_t)(k - 1) * c + ch), _CMP_GE_OQ);
                        for (int b = 0; b < bits && (k & ((1 << b) - 1)) == 0; b++) plane[bits - 1 - b] ^= m;
                    }
                    for (int q = 0; q < bits; q++) word[q] |= (uint64_t)plane[q] << (ch & 63);
                }
                for (int q = 0; q < bits; q++) dst[((size_t)q * cw + j) * P] = word[q];
            }
        }
}

TARGET_AVX512 static void pack_activations_avx512(const double *x, int H, int W, int c, const double *thr_t,
                                                  const double *neg, int bits, uint64_t *out) {
    switch (bits) {
    case 1: pack_activations_avx512_k(x, H, W, c, thr_t, neg, 1, out); break;
    case 2: pack_activations_avx512_k(x, H, W, c, thr_t, neg, 2, out); break;
    default: pack_activations_avx512_k(x, H, W, c, thr_t, neg, bits, out);
    }
}

/* The gather when cin < 64 divides 64 (the 32 channels of the first stage), for a strip of nt tiles
 * (g: their lanes' origins, TILE per tile), each tile's 8 lanes in one zmm: 64 / cin taps share each
 * word, which is assembled from its taps in a register and stored once (the AVX2 gather ORs every tap
 * into a zeroed tile, two read-modify-writes per tap). Writes every word of the tiles. Lanes that are 8
 * consecutive origins (every dense tile) are one load; other lanes are loaded one by one. (For
 * cin % 64 == 0 a zmm version of the AVX2 gather was no faster, and with vpgatherqq for the scattered
 * lanes slower.) */
TARGET_AVX512 static void gather_small_avx512(const uint64_t *in, size_t P, int cin, int bits, int rw, int nt,
                                              const int *g, int dense, const int *off, uint64_t *tile,
                                              size_t tile_words) {
    const int per = 64 / cin; /* taps per word; one word of channels per tap (cw = 1) */
    for (int k = 0; k < nt; k++) {
        const int *gk = g + k * TILE, run = dense || gk[7] - gk[0] == 7;
        if (run && cin == 32 && rw == 5) { /* two taps per word, tap j's word in dwords 2 (j % 2) */
            for (int q = 0; q < bits; q++) {
                const uint64_t *base = in + (size_t)q * P + gk[0];
                uint64_t *row = tile + k * tile_words + (size_t)q * rw * TILE;
                for (int d = 0; d < 4; d++) {
                    const __m512i lo = _mm512_loadu_si512((const void *)(base + off[2 * d]));
                    const __m512i hi = _mm512_loadu_si512((const void *)(base + off[2 * d + 1]));
                    /* odd dwords from hi's even ones: lo | hi << 32, one instruction */
                    _mm512_storeu_si512((void *)(row + d * TILE), _mm512_mask_shuffle_epi32(lo, 0xAAAA, hi, _MM_PERM_CCAA));
                }
                _mm512_storeu_si512((void *)(row + 4 * TILE), _mm512_loadu_si512((const void *)(base + off[8])));
            }
            continue;
        }
        for (int q = 0; q < bits; q++)
            for (int d = 0; d < rw; d++) {
                __m512i word = _mm512_setzero_si512();
                for (int j = d * per, sh = 0; j < 9 && j < (d + 1) * per; j++, sh += cin) {
                    const uint64_t *base = in + (size_t)q * P + off[j];
                    const __m512i a = run ? _mm512_loadu_si512((const void *)(base + gk[0]))
                                          : _mm512_set_epi64((long long)base[gk[7]], (long long)base[gk[6]],
                                                             (long long)base[gk[5]], (long long)base[gk[4]],
                                                             (long long)base[gk[3]], (long long)base[gk[2]],
                                                             (long long)base[gk[1]], (long long)base[gk[0]]);
                    word = _mm512_or_si512(word, _mm512_sll_epi64(a, _mm_cvtsi32_si128(sh)));
                }
                _mm512_storeu_si512((void *)(tile + k * tile_words + ((size_t)q * rw + d) * TILE), word);
            }
    }
}
