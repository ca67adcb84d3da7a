/* Two AVX2 formulations of the 1-bit conv core on one layer's worth of data, checked equal and timed:
 *
 *  nibble: kernels/native/avx2.h's core_avx2, included. Weights split into nibbles; per channel and 256 bits of a
 *          tile row: AND (the lookup index), vpshufb on a popcount table, add; twice (low and high
 *          nibbles): 6 vector operations per 256 bit-MACs.
 *  table:  the lookup reversed. Per channel and nibble position g the weight nibble w selects a 16-byte
 *          table T_w[a] = popcount(a & w) (precomputed per layer: 16 bytes per weight nibble, 32 x the
 *          weight bits); the activations come as one byte per pixel and position (its nibble), and one
 *          vpshufb looks 16 pixels up in one channel's table: vpshufb + add per 128 bit-MACs, no AND,
 *          4 vector operations per 256 bit-MACs. Byte counts are widened to int16 every 63 positions.
 *          Needs PIX == 32.
 *
 * Layer shape as the bundled model's 7x7 stage (cin 128, 3x3: 1152 bits per row, cout 128), 32 pixels.
 *
 *     gcc -O3 -mavx2 bench/bitserial_core_lut.c -o /tmp/core_lut && taskset -c 1 /tmp/core_lut
 *
 * It times the cores alone: the activation layouts (bit rows per pixel, nibble bytes per pixel) would be
 * built by the gather in either case and are prepared once here.
 */
#include <stdio.h>
#include <time.h>

#include "../kernels/native/bitserial.c" /* the shipped core itself: core_avx2, TILE */

#define K 1152          /* bits per row */
#define RW (K / 64)     /* words per row */
#define G (K / 4)       /* nibble positions */
#define C 128           /* output channels */
#define PIX 32          /* pixels per call */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- table (the reversed lookup) */
/* tables: [C / 2][G][32] bytes, lane 0 channel 2j's table at g, lane 1 channel 2j+1's. nib: [G][PIX]
 * bytes. out: [C][PIX] int16. A pass: 4 channel pairs x 32 pixels = 8 byte accumulators, so each table
 * load (from L2 on this layer: 590 KB of tables) serves 32 pixels. */
/* -O2 for this function: gcc's -O3 (the library's flag, which the included core keeps) makes it 1.2 x
 * slower here (11.4 against 9.2-9.4 us). */
__attribute__((optimize("O2"))) static void core_table(const uint8_t *tables, const uint8_t *nib, int16_t *out) {
    const __m256i zero = _mm256_setzero_si256();
    for (int cp = 0; cp < C / 2; cp += 4) {
        __m256i w16[4][2][2]; /* int16 sums: [pair][pixel group][pixels 0-7 | 8-15 per lane] */
        for (int j = 0; j < 4; j++) w16[j][0][0] = w16[j][0][1] = w16[j][1][0] = w16[j][1][1] = zero;
        for (int g0 = 0; g0 < G; g0 += 63) {
            const int g1 = g0 + 63 < G ? g0 + 63 : G;
            __m256i s00 = zero, s01 = zero, s10 = zero, s11 = zero, s20 = zero, s21 = zero, s30 = zero, s31 = zero;
            for (int g = g0; g < g1; g++) {
                const __m256i a0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(nib + (size_t)g * PIX)));
                const __m256i a1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(nib + (size_t)g * PIX + 16)));
                const uint8_t *t = tables + ((size_t)cp * G + g) * 32;
#define LOOK(j)                                                                             \
    {                                                                                       \
        const __m256i tj = _mm256_loadu_si256((const __m256i *)(t + (size_t)(j) * G * 32)); \
        s##j##0 = _mm256_add_epi8(s##j##0, _mm256_shuffle_epi8(tj, a0));                  \
        s##j##1 = _mm256_add_epi8(s##j##1, _mm256_shuffle_epi8(tj, a1));                  \
    }
                LOOK(0) LOOK(1) LOOK(2) LOOK(3)
#undef LOOK
            }
            const __m256i s[4][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}};
            for (int j = 0; j < 4; j++)
                for (int h = 0; h < 2; h++) {
                    w16[j][h][0] = _mm256_add_epi16(w16[j][h][0], _mm256_unpacklo_epi8(s[j][h], zero));
                    w16[j][h][1] = _mm256_add_epi16(w16[j][h][1], _mm256_unpackhi_epi8(s[j][h], zero));
                }
        }
        for (int j = 0; j < 4; j++) /* lane 0: channel 2(cp+j), lane 1: 2(cp+j)+1; unpacklo = pixels 0-7 */
            for (int h = 0; h < 2; h++) {
                int16_t v[2][16];
                _mm256_storeu_si256((__m256i *)v[0], w16[j][h][0]);
                _mm256_storeu_si256((__m256i *)v[1], w16[j][h][1]);
                for (int lane = 0; lane < 2; lane++)
                    for (int p = 0; p < 8; p++) {
                        out[(size_t)(2 * (cp + j) + lane) * PIX + 16 * h + p] = v[0][lane * 8 + p];
                        out[(size_t)(2 * (cp + j) + lane) * PIX + 16 * h + 8 + p] = v[1][lane * 8 + p];
                    }
            }
    }
}

int main(void) {
    uint64_t *w = malloc(sizeof(uint64_t) * C * RW), *a = malloc(sizeof(uint64_t) * PIX * RW);
    srand(1);
    for (int i = 0; i < C * RW; i++) w[i] = ((uint64_t)rand() << 33) ^ ((uint64_t)rand() << 2) ^ (uint64_t)rand();
    for (int i = 0; i < PIX * RW; i++) a[i] = ((uint64_t)rand() << 33) ^ ((uint64_t)rand() << 2) ^ (uint64_t)rand();
    /* nibble layouts: weights split, tiles [RW][TILE] per 8 pixels */
    uint64_t *wn = aligned_alloc(64, sizeof(uint64_t) * 2 * C * RW);
    for (int i = 0; i < C * RW; i++) wn[i] = w[i] & 0x0f0f0f0f0f0f0f0fULL, wn[C * RW + i] = (w[i] >> 4) & 0x0f0f0f0f0f0f0f0fULL;
    uint64_t *tiles = aligned_alloc(64, sizeof(uint64_t) * PIX * RW);
    for (int t0 = 0; t0 < PIX; t0 += TILE)
        for (int i = 0; i < RW; i++)
            for (int t = 0; t < TILE; t++) tiles[(size_t)t0 * RW + i * TILE + t] = a[(size_t)(t0 + t) * RW + i];
    /* table layouts */
    uint8_t *tables = aligned_alloc(64, (size_t)C / 2 * G * 32), *nib = aligned_alloc(64, (size_t)G * PIX);
    for (int c = 0; c < C; c++)
        for (int g = 0; g < G; g++) {
            const int wv = (int)(w[(size_t)c * RW + g / 16] >> (4 * (g % 16))) & 15;
            for (int x = 0; x < 16; x++) tables[((size_t)(c / 2) * G + g) * 32 + (c % 2) * 16 + x] = (uint8_t)__builtin_popcount(x & wv);
        }
    for (int g = 0; g < G; g++)
        for (int p = 0; p < PIX; p++) nib[(size_t)g * PIX + p] = (uint8_t)((a[(size_t)p * RW + g / 16] >> (4 * (g % 16))) & 15);

    int64_t *dot = aligned_alloc(64, sizeof(int64_t) * C * PIX);
    int16_t *out = aligned_alloc(64, sizeof(int16_t) * C * PIX);
    for (int t0 = 0; t0 < PIX; t0 += TILE) core_avx2(tiles + (size_t)t0 * RW, w, wn, 1, C, RW, dot + (size_t)t0 * C);
    core_table(tables, nib, out);
    long bad = 0;
    for (int c = 0; c < C; c++)
        for (int p = 0; p < PIX; p++) {
            long ref = 0;
            for (int i = 0; i < RW; i++) ref += __builtin_popcountll(w[(size_t)c * RW + i] & a[(size_t)p * RW + i]);
            const int64_t got_n = dot[(size_t)(p / TILE) * TILE * C + (size_t)c * TILE + p % TILE];
            bad += got_n != ref || out[(size_t)c * PIX + p] != ref;
        }
    printf("mismatches: %ld of %d\n", bad, C * PIX);

    const double macs = (double)C * PIX * K;
    for (int round = 0; round < 3; round++) {
        double best_n = 1e9, best_t = 1e9;
        for (int rep = 0; rep < 200; rep++) {
            double t = now();
            for (int t0 = 0; t0 < PIX; t0 += TILE) core_avx2(tiles + (size_t)t0 * RW, w, wn, 1, C, RW, dot + (size_t)t0 * C);
            t = now() - t;
            if (t < best_n) best_n = t;
            t = now();
            core_table(tables, nib, out);
            t = now() - t;
            if (t < best_t) best_t = t;
        }
        printf("nibble %.1f us (%.0f bit-MAC/ns)   table %.1f us (%.0f bit-MAC/ns)   table/nibble %.2f\n", best_n * 1e6,
               macs / best_n * 1e-9, best_t * 1e6, macs / best_t * 1e-9, best_t / best_n);
    }
    return bad != 0;
}
