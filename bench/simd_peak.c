/* Instruction throughput on this CPU: how many vpmaddwd (16 int16 multiply-adds), vpmaddubsw and fp32
 * FMA (8 multiply-adds) one core retires per ns, over 10 independent accumulator chains; on an AVX-512
 * CPU also the zmm forms: vpdpbusd (64 uint8 x int8 multiply-adds), vpdpwssd (32 int16), fp32 FMA (16)
 * and vpopcntq after an XOR (the two ops of 512 one-bit products). The peaks in docs/PERFORMANCE.md come from this.
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

/* One timing loop for any vector type: T the type, SET(v) a splat, STEP(a, w) the instruction under test,
 * ADD a reduction for the printout, FIRST(r) its first lane as a number. */
#define CHAINS(NAME, T, SET, STEP, ADD, FIRST)                                                               \
    do {                                                                                                     \
        T a0 = SET(1), a1 = SET(2), a2 = SET(3), a3 = SET(4), a4 = SET(5), a5 = SET(6), a6 = SET(7);         \
        T a7 = SET(8), a8 = SET(9), a9 = SET(10), w = SET(3);                                                \
        struct timespec t0, t1;                                                                              \
        clock_gettime(CLOCK_MONOTONIC, &t0);                                                                 \
        for (long i = 0; i < N; i++) {                                                                       \
            __asm__ volatile("" : "+x"(w));                                                                  \
            a0 = STEP(a0, w), a1 = STEP(a1, w), a2 = STEP(a2, w), a3 = STEP(a3, w), a4 = STEP(a4, w);        \
            a5 = STEP(a5, w), a6 = STEP(a6, w), a7 = STEP(a7, w), a8 = STEP(a8, w), a9 = STEP(a9, w);        \
        }                                                                                                    \
        clock_gettime(CLOCK_MONOTONIC, &t1);                                                                 \
        const T r = ADD(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7))), ADD(a8, a9));     \
        printf("%-12s %5.2f per ns  (%g)\n", NAME, 10.0 * N / seconds(t0, t1) / 1e9, (double)FIRST(r));      \
    } while (0)

#define FMA(a, w) _mm256_fmadd_ps(a, w, w)
#define FIRST_INT(r) _mm256_extract_epi32(r, 0)
#define SET_PS(v) _mm256_set1_ps(0.999f * (v))

#define ZDPBUSD(a, w) _mm512_dpbusd_epi32(a, w, w)
#define ZDPWSSD(a, w) _mm512_dpwssd_epi32(a, w, w)
#define ZPOPCNT(a, w) _mm512_popcnt_epi64(_mm512_xor_si512(a, w)) /* with the XOR an AND would be */
#define ZFMA(a, w) _mm512_fmadd_ps(a, w, w)
#define ZFIRST_INT(r) _mm_cvtsi128_si32(_mm512_castsi512_si128(r))
#define ZSET_PS(v) _mm512_set1_ps(0.999f * (v))

__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vpopcntdq"))) static void avx512(void) {
    CHAINS("zmm dpbusd", __m512i, _mm512_set1_epi32, ZDPBUSD, _mm512_add_epi32, ZFIRST_INT);
    CHAINS("zmm dpwssd", __m512i, _mm512_set1_epi32, ZDPWSSD, _mm512_add_epi32, ZFIRST_INT);
    CHAINS("zmm popcntq", __m512i, _mm512_set1_epi64, ZPOPCNT, _mm512_add_epi64, ZFIRST_INT);
    CHAINS("zmm fp32 FMA", __m512, ZSET_PS, ZFMA, _mm512_add_ps, _mm512_cvtss_f32);
}

int main(void) {
    CHAINS("vpmaddwd", __m256i, _mm256_set1_epi32, _mm256_madd_epi16, _mm256_add_epi32, FIRST_INT);
    CHAINS("vpmaddubsw", __m256i, _mm256_set1_epi32, _mm256_maddubs_epi16, _mm256_add_epi32, FIRST_INT);
    CHAINS("fp32 FMA", __m256, SET_PS, FMA, _mm256_add_ps, _mm256_cvtss_f32);
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vpopcntdq")) avx512();
    return 0;
}
