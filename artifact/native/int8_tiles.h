/* The per-row int8 product on AVX-512 VNNI, shared by the LM head (lm_head_int8.c) and the layers'
 * linear operator (int8_linear.c):
 *
 *   out[m, n] = (float)(sum_k q[m, k] * w[k, n] - corr[n]) * col_scale[n] * row_scale[m]
 *
 * q uint8 [rows, K], w int8 packed (below), corr[n] = 128 * the column's sum (q's zero point 128). The
 * integer sum is exact, and the two float products are those onnxruntime computes for
 * MatMulIntegerToFloat (a_scale 1.0) followed by a Mul by the row scale, in that order.
 *
 * Packed weights: column blocks of 16, each [K/4][16 columns][4 k] bytes (one zmm per 4 k), the column
 * count padded with zero columns to a multiple of 48 (TILE_N); corr and col_scale padded alike. An
 * 8 x 48 block of outputs is kept in 24 zmm accumulators (VPDPBUSD), and the next tile's weights are
 * prefetched while this one computes.
 */
#ifndef TOOLKIT_INT8_TILES_H
#define TOOLKIT_INT8_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK_N 16
#define BLOCKS_PER_TILE 3
#define TILE_N (BLOCK_N * BLOCKS_PER_TILE)
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

/* Rows row_begin .. row_end - 1 of one 48-column tile, 8 rows at a time, then 4, 2, 1. Each row's values
 * are the same whichever group computes it (the same instructions per row). */
static void tile_rows(const Work *w, int row_begin, int row_end, int tile) {
    int m = row_begin;
    for (; m + 8 <= row_end; m += 8) tile_8(w, m, tile);
    if (m + 4 <= row_end) {
        tile_4(w, m, tile);
        m += 4;
    }
    if (m + 2 <= row_end) {
        tile_2(w, m, tile);
        m += 2;
    }
    if (m < row_end) tile_1(w, m, tile);
}
#endif
