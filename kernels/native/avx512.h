/* AVX-512 kernels of bitserial.c (included by it only): the AND+popcount core. Everything around the core
 * runs the AVX2 code, which this target includes. */

/* AVX-512: 8 pixels = one zmm, VPOPCNTQ per 64-bit lane; 4 output channels share each activation load. */
TARGET_AVX512 static void core_avx512(const uint64_t *tile, const uint64_t *w, int bits, int cout, int rw, int64_t *dot) {
    int o = 0;
    for (; o + 4 <= cout; o += 4) {
        __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (int p = 0; p < bits; p++) {
            const uint64_t *w0 = w + ((size_t)p * cout + o) * rw;
            for (int q = 0; q < bits; q++) {
                const __m128i shift = _mm_cvtsi32_si128(2 * bits - 2 - p - q);
                const uint64_t *ar = tile + (size_t)q * rw * TILE;
                __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
                for (int i = 0; i < rw; i++) {
                    const __m512i a = _mm512_loadu_si512((const void *)(ar + i * TILE));
                    s0 = _mm512_add_epi64(s0, _mm512_popcnt_epi64(_mm512_and_si512(a, _mm512_set1_epi64((long long)w0[i]))));
                    s1 = _mm512_add_epi64(s1, _mm512_popcnt_epi64(_mm512_and_si512(a, _mm512_set1_epi64((long long)w0[rw + i]))));
                    s2 = _mm512_add_epi64(s2, _mm512_popcnt_epi64(_mm512_and_si512(a, _mm512_set1_epi64((long long)w0[2 * rw + i]))));
                    s3 = _mm512_add_epi64(s3, _mm512_popcnt_epi64(_mm512_and_si512(a, _mm512_set1_epi64((long long)w0[3 * rw + i]))));
                }
                acc0 = _mm512_add_epi64(acc0, _mm512_sll_epi64(s0, shift));
                acc1 = _mm512_add_epi64(acc1, _mm512_sll_epi64(s1, shift));
                acc2 = _mm512_add_epi64(acc2, _mm512_sll_epi64(s2, shift));
                acc3 = _mm512_add_epi64(acc3, _mm512_sll_epi64(s3, shift));
            }
        }
        _mm512_storeu_si512((void *)(dot + (size_t)o * TILE), acc0);
        _mm512_storeu_si512((void *)(dot + (size_t)(o + 1) * TILE), acc1);
        _mm512_storeu_si512((void *)(dot + (size_t)(o + 2) * TILE), acc2);
        _mm512_storeu_si512((void *)(dot + (size_t)(o + 3) * TILE), acc3);
    }
    for (; o < cout; o++) core_channel(tile, w, bits, cout, o, rw, dot);
}
