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
 *
 * Greedy rows need only each row's argmax, which numpy found by reading the whole [rows, N] float32
 * result back from memory (~0.7 ms per 16-row step on the default model's 262,144 columns). With
 * `argmax` given, the kernel also keeps each row's running maximum while the values are still in
 * registers: per lane the first column holding it (strictly greater replaces), merged across lanes and
 * threads by value, ties to the lower column: numpy's first-occurrence rule. A row holding a NaN gets
 * -1 (numpy would return the NaN's index; the caller asks numpy then).
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK_N 16
#define BLOCKS_PER_TILE 3
#define TILE_N (BLOCK_N * BLOCKS_PER_TILE)
#define MAX_THREADS 64
#define MAX_ARGMAX_ROWS 256 /* rows a call may ask the argmax of */

/* One thread's running maximum of each row, per lane (column n mod 16): value, column, and whether a
 * NaN was seen. */
typedef struct {
    float value[MAX_ARGMAX_ROWS][BLOCK_N];
    int32_t column[MAX_ARGMAX_ROWS][BLOCK_N];
    uint8_t nan[MAX_ARGMAX_ROWS];
} RowMax;

typedef struct {
    const uint8_t *q;
    int rows, K, N;
    const int8_t *packed;
    const int32_t *corr;
    const float *col_scale, *row_scale;
    float *out;
    int tile_begin, tile_end;
    RowMax *best; /* NULL: no argmax */
} Work;

/* Fold the 16 values of columns n..n+15 (lanes in `mask`) into row's running maximum. */
static inline void track_max(RowMax *best, int row, __m512 v, __mmask16 mask, int n) {
    __m512 held = _mm512_loadu_ps(best->value[row]);
    __mmask16 greater = _mm512_mask_cmp_ps_mask(mask, v, held, _CMP_GT_OQ);
    if (_mm512_mask_cmp_ps_mask(mask, v, v, _CMP_UNORD_Q)) best->nan[row] = 1;
    if (greater) {
        _mm512_storeu_ps(best->value[row], _mm512_mask_blend_ps(greater, held, v));
        __m512i columns = _mm512_add_epi32(_mm512_set1_epi32(n), _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
        _mm512_storeu_si512(best->column[row], _mm512_mask_blend_epi32(greater, _mm512_loadu_si512(best->column[row]), columns));
    }
}

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
        v = _mm512_mul_ps(v, _mm512_set1_ps(row_scale[i]));                                              \
        _mm512_mask_storeu_ps(out + (size_t)(i) * N + n, mask, v);                                       \
        if (best) track_max(best, row0 + (i), v, mask, n);                                               \
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
    static void tile_##ROWS(const Work *w, int row0, int tile) {                                         \
        enum { MR = ROWS };                                                                              \
        const int K = w->K, N = w->N, K4 = K / 4;                                                        \
        const uint8_t *q = w->q + (size_t)row0 * K;                                                      \
        const float *row_scale = w->row_scale + row0;                                                    \
        float *out = w->out + (size_t)row0 * N;                                                          \
        RowMax *best = w->best;                                                                          \
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
    if (w->best) {
        for (int m = 0; m < w->rows; m++) {
            for (int lane = 0; lane < BLOCK_N; lane++) {
                w->best->value[m][lane] = -__builtin_inff();
                w->best->column[m][lane] = -1;
            }
            w->best->nan[m] = 0;
        }
    }
    for (int tile = w->tile_begin; tile < w->tile_end; tile++) {
        int m = 0;
        for (; m + 8 <= w->rows; m += 8) tile_8(w, m, tile);
        if (m + 4 <= w->rows) {
            tile_4(w, m, tile);
            m += 4;
        }
        if (m + 2 <= w->rows) {
            tile_2(w, m, tile);
            m += 2;
        }
        if (m < w->rows) tile_1(w, m, tile);
    }
    return NULL;
}

/* Each row's column of its maximum over every thread's lanes (the lowest column among equal values),
 * -1 where a NaN was seen. A row of -inf only keeps column -1 in every lane: its first column, 0. */
static void merge_argmax(const Work *work, int threads, int rows, int32_t *argmax) {
    for (int m = 0; m < rows; m++) {
        float value = -__builtin_inff();
        int32_t column = -1, nan = 0;
        for (int t = 0; t < threads; t++) {
            const RowMax *best = work[t].best;
            nan |= best->nan[m];
            for (int lane = 0; lane < BLOCK_N; lane++) {
                int32_t c = best->column[m][lane];
                float v = best->value[m][lane];
                if (c >= 0 && (column < 0 || v > value || (v == value && c < column))) {
                    value = v;
                    column = c;
                }
            }
        }
        argmax[m] = nan ? -1 : (column < 0 ? 0 : column);
    }
}

/* logits [rows, N] from q [rows, K] and row_scale [rows]; the column tiles split over `threads`
 * threads (this one and threads - 1 started for the call). With `argmax` (rows <= MAX_ARGMAX_ROWS),
 * also each row's argmax (see the top of the file). Returns 0; -1 if a thread failed to start (the
 * work is then done on this thread); -2 if argmax was asked for more rows than it can hold, -3 if its
 * memory could not be had (nothing is computed then). */
int toolkit_int8_head(const uint8_t *q, const float *row_scale, int rows, int K, int N, const int8_t *packed,
                      const int32_t *corr, const float *col_scale, float *out, int threads, int32_t *argmax) {
    int tiles = (N + TILE_N - 1) / TILE_N;
    if (argmax && rows > MAX_ARGMAX_ROWS) return -2;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > tiles) threads = tiles;
    Work work[MAX_THREADS];
    RowMax *best = NULL; /* one per thread, this call's own (~33 KB each) */
    if (argmax && !(best = malloc(sizeof(RowMax) * (size_t)threads))) return -3;
    pthread_t started[MAX_THREADS];
    int status = 0, running = 0;
    for (int t = 0; t < threads; t++) {
        work[t] = (Work){q, rows, K, N, packed, corr, col_scale, row_scale, out,
                         (int)((long)tiles * t / threads), (int)((long)tiles * (t + 1) / threads),
                         best ? &best[t] : NULL};
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
    if (best) {
        merge_argmax(work, threads, rows, argmax);
        free(best);
    }
    return status;
}
