/* The per-row int8 LM head of toolkit.export.rowwise_int8, computed outside onnxruntime.
 *
 *   logits[m, n] = (float)(sum_k q[m, k] * w[k, n] - 128 * sum_k w[k, n]) * col_scale[n] * row_scale[m]
 *
 * q is uint8 (zero point 128), w int8; the sum is exact in int32 (|sum| <= K * 255 * 127), so any
 * order of accumulation gives the same integer, and the two float products are the ones onnxruntime
 * computes for MatMulIntegerToFloat (a_scale 1.0) followed by the Mul by the row scale: the logits are
 * bitwise those of the graph's own LM head on a CPU where MLAS also uses VNNI (tests/test_native_head.py).
 *
 * Why: on the default model the LM head is 262,144 x 640; at 16 decode rows MLAS's prepacked u8s8
 * GEMM ran it in ~12.5 ms on 2 Zen 4 cores, well under the cores' VNNI rate while its weights stream
 * from memory. This kernel keeps an 8 x 48 block of outputs in 24 zmm accumulators (VPDPBUSD) and
 * prefetches the next 48 columns' weights while it computes, which measured ~8.6 ms there
 * (benchmarks/native_head.py). It needs AVX-512 (F, BW) and AVX-512 VNNI; toolkit.runtime.native_head
 * builds it only on such CPUs and otherwise leaves the LM head in the graph.
 *
 * Packed weights (toolkit.runtime.native_head.Int8Head packs them): column blocks of 16, each
 * [K/4][16 columns][4 k] bytes (one zmm per 4 k), the column count padded with zero columns to a
 * multiple of 48 (TILE_N); corr[n] = 128 * the column's sum, and col_scale, padded alike.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define BLOCK_N 16
#define BLOCKS_PER_TILE 3
#define TILE_N (BLOCK_N * BLOCKS_PER_TILE)

typedef struct {
    const uint8_t *q;
    int rows, K, N;
    const int8_t *packed;
    const int32_t *corr;
    const float *col_scale, *row_scale;
    float *out;
    int tile_begin, tile_end;
} Work;

static inline __m512i broadcast4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

#define DOT_ROW(i)                                                   \
    if (MR > i) {                                                    \
        __m512i a = broadcast4(q + (size_t)(i) * K + 4 * k4);        \
        c##i##0 = _mm512_dpbusd_epi32(c##i##0, a, b0);               \
        c##i##1 = _mm512_dpbusd_epi32(c##i##1, a, b1);               \
        c##i##2 = _mm512_dpbusd_epi32(c##i##2, a, b2);               \
    }
#define STORE_ROW(i, j)                                                                                  \
    if (MR > i) {                                                                                        \
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c##i##j, corr)), scale);           \
        _mm512_mask_storeu_ps(out + (size_t)(i) * N + n, mask, _mm512_mul_ps(v, _mm512_set1_ps(row_scale[i]))); \
    }
#define STORE_BLOCK(j)                                                                                     \
    {                                                                                                    \
        int n = tile * TILE_N + (j) * BLOCK_N;                                                           \
        if (n < N) {                                                                                     \
            __mmask16 mask = N - n >= BLOCK_N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);   \
            __m512i corr = _mm512_loadu_si512(w->corr + n);                                              \
            __m512 scale = _mm512_loadu_ps(w->col_scale + n);                                            \
            STORE_ROW(0, j) STORE_ROW(1, j) STORE_ROW(2, j) STORE_ROW(3, j)                              \
            STORE_ROW(4, j) STORE_ROW(5, j) STORE_ROW(6, j) STORE_ROW(7, j)                              \
        }                                                                                                \
    }

/* MR (1..8) rows x one 48-column tile: 3 * MR accumulators, one 64-byte load per 16 columns and 4 k. */
#define DEFINE_TILE(ROWS)                                                                                  \
    static void tile_##ROWS(const Work *w, const uint8_t *q, const float *row_scale, float *out, int tile) { \
        enum { MR = ROWS };                                                                              \
        const int K = w->K, N = w->N, K4 = K / 4;                                                        \
        const size_t block = (size_t)K4 * 64;                                                            \
        const int8_t *b = w->packed + (size_t)tile * BLOCKS_PER_TILE * block;                            \
        __m512i c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;                              \
        __m512i c40, c41, c42, c50, c51, c52, c60, c61, c62, c70, c71, c72;                              \
        c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = _mm512_setzero_si512();  \
        c40 = c41 = c42 = c50 = c51 = c52 = c60 = c61 = c62 = c70 = c71 = c72 = _mm512_setzero_si512();  \
        for (int k4 = 0; k4 < K4; k4++) {                                                                \
            const int8_t *at = b + (size_t)k4 * 64;                                                      \
            /* the next tile's weights, while this one computes: they come from memory, not cache */    \
            _mm_prefetch((const char *)(at + 3 * block), _MM_HINT_T0);                                   \
            _mm_prefetch((const char *)(at + 4 * block), _MM_HINT_T0);                                   \
            _mm_prefetch((const char *)(at + 5 * block), _MM_HINT_T0);                                   \
            __m512i b0 = _mm512_loadu_si512(at);                                                         \
            __m512i b1 = _mm512_loadu_si512(at + block);                                                 \
            __m512i b2 = _mm512_loadu_si512(at + 2 * block);                                             \
            DOT_ROW(0) DOT_ROW(1) DOT_ROW(2) DOT_ROW(3) DOT_ROW(4) DOT_ROW(5) DOT_ROW(6) DOT_ROW(7)       \
        }                                                                                                \
        STORE_BLOCK(0) STORE_BLOCK(1) STORE_BLOCK(2)                                                     \
    }

DEFINE_TILE(8)
DEFINE_TILE(4)
DEFINE_TILE(2)
DEFINE_TILE(1)

static void *run_tiles(void *arg) {
    const Work *w = arg;
    for (int tile = w->tile_begin; tile < w->tile_end; tile++) {
        int m = 0;
        for (; m + 8 <= w->rows; m += 8)
            tile_8(w, w->q + (size_t)m * w->K, w->row_scale + m, w->out + (size_t)m * w->N, tile);
        if (m + 4 <= w->rows) {
            tile_4(w, w->q + (size_t)m * w->K, w->row_scale + m, w->out + (size_t)m * w->N, tile);
            m += 4;
        }
        if (m + 2 <= w->rows) {
            tile_2(w, w->q + (size_t)m * w->K, w->row_scale + m, w->out + (size_t)m * w->N, tile);
            m += 2;
        }
        if (m < w->rows)
            tile_1(w, w->q + (size_t)m * w->K, w->row_scale + m, w->out + (size_t)m * w->N, tile);
    }
    return NULL;
}

#define MAX_THREADS 64

/* logits [rows, N] from q [rows, K] and row_scale [rows]; the column tiles split over `threads`
 * threads (this one and threads - 1 started for the call). Returns 0, or -1 if a thread failed to start
 * (the work is then done on this thread). */
int toolkit_int8_head(const uint8_t *q, const float *row_scale, int rows, int K, int N, const int8_t *packed,
                      const int32_t *corr, const float *col_scale, float *out, int threads) {
    int tiles = (N + TILE_N - 1) / TILE_N;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > tiles) threads = tiles;
    Work work[MAX_THREADS];
    pthread_t started[MAX_THREADS];
    int status = 0, running = 0;
    for (int t = 0; t < threads; t++) {
        work[t] = (Work){q, rows, K, N, packed, corr, col_scale, row_scale, out,
                         (int)((long)tiles * t / threads), (int)((long)tiles * (t + 1) / threads)};
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&started[running], NULL, run_tiles, &work[t]) == 0) {
            running++;
        } else {
            run_tiles(&work[t]);
            status = -1;
        }
    }
    run_tiles(&work[0]);
    for (int t = 0; t < running; t++) pthread_join(started[t], NULL);
    return status;
}
