/* Instruction throughput on this CPU: how many vpmaddwd (16 int16 multiply-adds), vpmaddubsw and fp32
 * FMA (8 multiply-adds) one core retires per ns, over 10 independent accumulator chains. The peaks in
 * docs/PERFORMANCE.md (int16 vs fp32 GMAC/s per core) come from this.
 *
 *     gcc -O2 -mavx2 -mfma bench/simd_peak.c -o /tmp/simd_peak && taskset -c 1 /tmp/simd_peak
 *
 * Ten named accumulators (registers) with distinct start values, so the compiler can neither merge the
 * chains nor keep them in memory; the empty asm keeps w opaque.
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define N 100000000L

static double seconds(struct timespec a, struct timespec b) {
    return (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
}

static void vpmaddwd(void) {
    __m256i a0 = _mm256_set1_epi32(1), a1 = _mm256_set1_epi32(2), a2 = _mm256_set1_epi32(3), a3 = _mm256_set1_epi32(4), a4 = _mm256_set1_epi32(5), a5 = _mm256_set1_epi32(6), a6 = _mm256_set1_epi32(7), a7 = _mm256_set1_epi32(8), a8 = _mm256_set1_epi32(9), a9 = _mm256_set1_epi32(10);
    __m256i w = _mm256_set1_epi32(3);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < N; i++) {
        __asm__ volatile("" : "+x"(w));
        a0 = _mm256_madd_epi16(a0, w);
        a1 = _mm256_madd_epi16(a1, w);
        a2 = _mm256_madd_epi16(a2, w);
        a3 = _mm256_madd_epi16(a3, w);
        a4 = _mm256_madd_epi16(a4, w);
        a5 = _mm256_madd_epi16(a5, w);
        a6 = _mm256_madd_epi16(a6, w);
        a7 = _mm256_madd_epi16(a7, w);
        a8 = _mm256_madd_epi16(a8, w);
        a9 = _mm256_madd_epi16(a9, w);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), a2), a3), a4), a5), a6), a7), a8), a9);
    printf("%-11s %5.2f per ns  (%g)\n", "vpmaddwd", 10.0 * N / seconds(t0, t1) / 1e9, (double)_mm256_extract_epi32(r, 0));
}

static void vpmaddubsw(void) {
    __m256i a0 = _mm256_set1_epi32(1), a1 = _mm256_set1_epi32(2), a2 = _mm256_set1_epi32(3), a3 = _mm256_set1_epi32(4), a4 = _mm256_set1_epi32(5), a5 = _mm256_set1_epi32(6), a6 = _mm256_set1_epi32(7), a7 = _mm256_set1_epi32(8), a8 = _mm256_set1_epi32(9), a9 = _mm256_set1_epi32(10);
    __m256i w = _mm256_set1_epi32(3);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < N; i++) {
        __asm__ volatile("" : "+x"(w));
        a0 = _mm256_maddubs_epi16(a0, w);
        a1 = _mm256_maddubs_epi16(a1, w);
        a2 = _mm256_maddubs_epi16(a2, w);
        a3 = _mm256_maddubs_epi16(a3, w);
        a4 = _mm256_maddubs_epi16(a4, w);
        a5 = _mm256_maddubs_epi16(a5, w);
        a6 = _mm256_maddubs_epi16(a6, w);
        a7 = _mm256_maddubs_epi16(a7, w);
        a8 = _mm256_maddubs_epi16(a8, w);
        a9 = _mm256_maddubs_epi16(a9, w);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), a2), a3), a4), a5), a6), a7), a8), a9);
    printf("%-11s %5.2f per ns  (%g)\n", "vpmaddubsw", 10.0 * N / seconds(t0, t1) / 1e9, (double)_mm256_extract_epi32(r, 0));
}

static void fp_FMA(void) {
    __m256 a0 = _mm256_set1_ps(0.999f * 1), a1 = _mm256_set1_ps(0.999f * 2), a2 = _mm256_set1_ps(0.999f * 3), a3 = _mm256_set1_ps(0.999f * 4), a4 = _mm256_set1_ps(0.999f * 5), a5 = _mm256_set1_ps(0.999f * 6), a6 = _mm256_set1_ps(0.999f * 7), a7 = _mm256_set1_ps(0.999f * 8), a8 = _mm256_set1_ps(0.999f * 9), a9 = _mm256_set1_ps(0.999f * 10);
    __m256 w = _mm256_set1_ps(0.999f * 3);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < N; i++) {
        __asm__ volatile("" : "+x"(w));
        a0 = _mm256_fmadd_ps(a0, w, w);
        a1 = _mm256_fmadd_ps(a1, w, w);
        a2 = _mm256_fmadd_ps(a2, w, w);
        a3 = _mm256_fmadd_ps(a3, w, w);
        a4 = _mm256_fmadd_ps(a4, w, w);
        a5 = _mm256_fmadd_ps(a5, w, w);
        a6 = _mm256_fmadd_ps(a6, w, w);
        a7 = _mm256_fmadd_ps(a7, w, w);
        a8 = _mm256_fmadd_ps(a8, w, w);
        a9 = _mm256_fmadd_ps(a9, w, w);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const __m256 r = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), a2), a3), a4), a5), a6), a7), a8), a9);
    printf("%-11s %5.2f per ns  (%g)\n", "fp32 FMA", 10.0 * N / seconds(t0, t1) / 1e9, (double)_mm256_cvtss_f32(r));
}

int main(void) {
    vpmaddwd();
    vpmaddubsw();
    fp_FMA();
    return 0;
}
