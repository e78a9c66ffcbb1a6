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
#include <pthread.h>
#include <stdlib.h>

#include "int8_tiles.h"

#define MAX_THREADS 64

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
    for (int tile = w->tile_begin; tile < w->tile_end; tile++) tile_rows(w, 0, w->rows, tile);
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
