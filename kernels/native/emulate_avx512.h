/* The test build's AVX-512 (common.h, APQ_EMULATE_AVX512): SIMDe's portable intrinsics, plus the few
 * the kernels use that SIMDe 0.7 lacks, written lane by lane from their definitions in Intel's intrinsics
 * guide. Never part of the installed library. */
#ifndef APQ_EMULATE_AVX512_H
#define APQ_EMULATE_AVX512_H

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

/* Masked-off lanes are zero and are not read. */
static inline __m512d apq_maskz_loadu_pd(__mmask8 k, const void *p) {
    double v[8];
    for (int i = 0; i < 8; i++) v[i] = (k >> i) & 1 ? ((const double *)p)[i] : 0.0;
    return _mm512_loadu_pd(v);
}

static inline __m512d apq_cvtepi32_pd(__m256i a) {
    int32_t s[8];
    double v[8];
    _mm256_storeu_si256((__m256i *)s, a);
    for (int i = 0; i < 8; i++) v[i] = (double)s[i];
    return _mm512_loadu_pd(v);
}

/* Truncation; NaN and values out of int32's range give INT32_MIN (the "integer indefinite"). */
static inline __m256i apq_cvttpd_epi32(__m512d a) {
    double s[8];
    int32_t v[8];
    _mm512_storeu_pd(s, a);
    for (int i = 0; i < 8; i++) v[i] = s[i] > -2147483649.0 && s[i] < 2147483648.0 ? (int32_t)s[i] : INT32_MIN;
    return _mm256_loadu_si256((const __m256i *)v);
}

static inline __m512d apq_cvtepi64_pd(__m512i a) {
    int64_t s[8];
    double v[8];
    _mm512_storeu_si512(s, a);
    for (int i = 0; i < 8; i++) v[i] = (double)s[i];
    return _mm512_loadu_pd(v);
}

/* Eight int32 lanes truncated to 8 or 16 bits, packed into the low bytes of the result, the rest zero. */
static inline __m128i apq_cvtepi32_epi8(__m256i a) {
    int32_t s[8];
    uint8_t v[16] = {0};
    _mm256_storeu_si256((__m256i *)s, a);
    for (int i = 0; i < 8; i++) v[i] = (uint8_t)s[i];
    return _mm_loadu_si128((const __m128i *)v);
}

static inline __m128i apq_cvtepi32_epi16(__m256i a) {
    int32_t s[8];
    uint16_t v[8];
    _mm256_storeu_si256((__m256i *)s, a);
    for (int i = 0; i < 8; i++) v[i] = (uint16_t)s[i];
    return _mm_loadu_si128((const __m128i *)v);
}

/* Lanes with their bit of k set: a's 32-bit elements shuffled within each 128-bit block by imm; the
 * others: src's. */
static inline __m512i apq_mask_shuffle_epi32(__m512i src, __mmask16 k, __m512i a, int imm) {
    uint32_t s[16], x[16], v[16];
    _mm512_storeu_si512(s, src);
    _mm512_storeu_si512(x, a);
    for (int i = 0; i < 16; i++) v[i] = (k >> i) & 1 ? x[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)] : s[i];
    return _mm512_loadu_si512(v);
}

/* Some compilers' headers define these as macros, and a later SIMDe may alias them itself. */
#undef _mm512_maskz_loadu_pd
#define _mm512_maskz_loadu_pd apq_maskz_loadu_pd
#undef _mm512_cvtepi32_pd
#define _mm512_cvtepi32_pd apq_cvtepi32_pd
#undef _mm512_cvtepi64_pd
#define _mm512_cvtepi64_pd apq_cvtepi64_pd
#undef _mm512_cvttpd_epi32
#define _mm512_cvttpd_epi32 apq_cvttpd_epi32
#undef _mm256_cvtepi32_epi8
#define _mm256_cvtepi32_epi8 apq_cvtepi32_epi8
#undef _mm256_cvtepi32_epi16
#define _mm256_cvtepi32_epi16 apq_cvtepi32_epi16
#undef _mm512_mask_shuffle_epi32
#define _mm512_mask_shuffle_epi32 apq_mask_shuffle_epi32
#undef _mm512_shuffle_f64x2
#define _mm512_shuffle_f64x2 simde_mm512_shuffle_f64x2

#endif
