/* The int8 engines' layer products as onnxruntime custom operators (domain toolkit.native.linear), on
 * the AVX-512 VNNI tiles of the LM head (int8_tiles.h).
 *
 * RowwiseInt8MatMul(x [..., K] float, w [K, N] int8, col_scale [N] float) -> y [..., N] float
 *   The per-row int8 linear of toolkit.export.rowwise_int8 in one node: what the graph computes with
 *   Abs, ReduceMax, Max(1e-12), Div(127), Div, Round, Add(128), Cast(uint8), MatMulIntegerToFloat and
 *   Mul by the row scale, in the same float operations (a true division, round half to even, the exact
 *   int32 sum, then * col_scale and * row_scale), so y is bitwise the graph's (tests/test_native_linear.py).
 *
 * Int8BlockMatMul(x [..., K] float, B [N, K/32, 32] uint8, scales [N * K/32] float; K, N) -> y [..., N]
 *   onnxruntime's MatMulNBits with bits 8, block_size 32, no zero points (128) and accuracy_level 4
 *   (com.microsoft, https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulNBits):
 *   x is quantized per block of 32 to int8 (scale max|x| / 127, round half to even, as MLAS's
 *   QuantizeARow_CompInt8), each block's exact int32 dot product with B - 128 is scaled by the two
 *   blocks' scales and summed in float32. The float sum's order is ours, not MLAS's: y agrees with
 *   onnxruntime's node to float rounding (tests), not bitwise; `toolkit validate` measures the engine.
 *
 * Why: at 16 decode rows on 2 Zen 4 cores, onnxruntime spent ~4.8 ms of a ~30 ms step in the layers'
 * MatMulIntegerToFloat, ~2.3 ms in the nine small nodes quantizing their inputs, and ~6.5 ms in
 * MatMulNBits (~100 G multiply-adds a second) while the LM head's tiles run ~300 G/s on the same cores.
 *
 * Every row's output is the same instruction sequence whatever the number of rows, the row group it
 * falls in or the split over threads: a token's output is bitwise the same decoded alone, in a batch, in
 * a prompt chunk or in a speculative draft.
 *
 * Initializer weights are packed into the tiles' layout when the session is made and held by the kernel
 * until it ends; a weight fed as a graph input is packed at every run.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "int8_tiles.h"
#include "ort_abi.h"

#define TYPE_UINT8 2 /* ONNXTensorElementDataType */
#define TYPE_INT8 3
#define BLOCK_K 32       /* Int8BlockMatMul's quantization block */
#define SERIAL_QUANTIZE 32 /* up to this many rows, their quantization runs on the calling thread */

typedef struct Linear {
    int block;  /* Int8BlockMatMul (else RowwiseInt8MatMul) */
    int K, N, padded, blocks;
    pthread_mutex_t lock;
    const void *packed_from; /* the weight packed (its address), NULL before any */
    int constant;            /* it is an initializer, packed when the session was made: its memory never changes */
    int8_t *packed;          /* [padded / 16][K / 4][16][4] */
    int32_t *corr;           /* [blocks][padded]: 128 * the column's (block's) sum */
    float *scale;            /* [blocks][padded]: the column's (block's) scale */
} Linear;

/* ---- packing ------------------------------------------------------------------------------------- */

/* w(k, n) as signed int8: RowwiseInt8MatMul's [K, N] int8, or MatMulNBits's [N][K] uint8 less 128. */
static inline int8_t weight_at(const Linear *L, const void *w, int k, int n) {
    if (L->block) return (int8_t)(((const uint8_t *)w)[(size_t)n * L->K + k] ^ 0x80);
    return ((const int8_t *)w)[(size_t)k * L->N + n];
}

static int pack(Linear *L, const void *w, const float *scales) {
    int K = L->K, N = L->N, P = L->padded, per_block = L->block ? BLOCK_K : K;
    free(L->packed);
    free(L->corr);
    free(L->scale);
    L->packed = aligned_alloc(64, (size_t)P * K);
    L->corr = calloc((size_t)L->blocks * P, sizeof(int32_t));
    L->scale = calloc((size_t)L->blocks * P, sizeof(float));
    L->packed_from = NULL;
    if (!L->packed || !L->corr || !L->scale) return 0;
    memset(L->packed, 0, (size_t)P * K);
    for (int n = 0; n < N; n++) {
        int8_t *column = L->packed + (size_t)(n / BLOCK_N) * K * BLOCK_N + (n % BLOCK_N) * 4;
        for (int k = 0; k < K; k++) {
            int8_t v = weight_at(L, w, k, n);
            column[(size_t)(k / 4) * BLOCK_N * 4 + k % 4] = v;
            L->corr[(size_t)(k / per_block) * P + n] += 128 * v;
        }
        for (int b = 0; b < L->blocks; b++)
            L->scale[(size_t)b * P + n] = L->block ? scales[(size_t)n * L->blocks + b] : scales[n];
    }
    L->packed_from = w;
    return 1;
}

/* ---- quantizing the input ----------------------------------------------------------------------- */

/* The graph's per-row quantization: s = max(max|x|, 1e-12) / 127, q = round_half_even(x / s) + 128. */
static void quantize_row(const float *x, int K, uint8_t *q, float *row_scale) {
    __m512 amax = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k)));
    }
    float s = fmaxf(_mm512_reduce_max_ps(amax), 1e-12f) / 127.0f;
    __m512 scale = _mm512_set1_ps(s), offset = _mm512_set1_ps(128.0f);
    for (int k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), scale),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_mask_cvtusepi32_storeu_epi8(q + k, m, _mm512_cvtps_epi32(_mm512_add_ps(r, offset)));
    }
    *row_scale = s;
}

/* MLAS's per-block quantization (QuantizeARow_CompInt8): s = max|x| / 127, q = round_half_even(x * (1 / s))
 * (0 where s is 0), stored + 128 as uint8 for VPDPBUSD, each 4 k as one 32-bit word at word[(k / 4) *
 * stride] (the rows interleaved: a row group's words for one 4 k are adjacent). */
static void quantize_blocks(const float *x, int K, uint32_t *word, size_t stride, float *block_scale) {
    for (int b = 0; b < K / BLOCK_K; b++) {
        __m512 lo = _mm512_loadu_ps(x + b * BLOCK_K), hi = _mm512_loadu_ps(x + b * BLOCK_K + 16);
        float s = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi))) / 127.0f;
        __m512 inverse = _mm512_set1_ps(s != 0.0f ? 1.0f / s : 0.0f);
        __m512i offset = _mm512_set1_epi32(128);
        __m512i a = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse)), offset);
        __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse)), offset);
        uint32_t packed[BLOCK_K / 4];
        _mm_storeu_si128((__m128i *)packed, _mm512_cvtusepi32_epi8(a));
        _mm_storeu_si128((__m128i *)(packed + 4), _mm512_cvtusepi32_epi8(c));
        for (int w = 0; w < BLOCK_K / 4; w++) word[(size_t)(b * (BLOCK_K / 4) + w) * stride] = packed[w];
        block_scale[b] = s;
    }
}

/* ---- the block tiles: 48 columns x a chunk of rows, int32 sums per block folded into float32 ---- */

typedef struct {
    const uint32_t *q;     /* [K / 4][rows]: x quantized + 128, 4 k to a word, the rows interleaved */
    int rows;
    const float *a_scale;  /* [rows][blocks] */
    const Linear *L;
    float *out;            /* [rows][N] */
} BlockWork;

#define BDOT(i, k4)                                                  \
    if (MR > i) {                                                    \
        __m512i a = _mm512_set1_epi32((int)q[(size_t)(k4) * rows + (i)]); \
        c##i##0 = _mm512_dpbusd_epi32(c##i##0, a, b0);               \
        c##i##1 = _mm512_dpbusd_epi32(c##i##1, a, b1);               \
        c##i##2 = _mm512_dpbusd_epi32(c##i##2, a, b2);               \
    }
/* 4 k of every row: the three 16-column weight vectors, then each row's 3 VPDPBUSD */
#define BSTEP(k4)                                                                                        \
    {                                                                                                    \
        const int8_t *at = b + (size_t)(k4) * 64;                                                        \
        __m512i b0 = _mm512_loadu_si512(at);                                                             \
        __m512i b1 = _mm512_loadu_si512(at + block);                                                     \
        __m512i b2 = _mm512_loadu_si512(at + 2 * block);                                                 \
        BDOT(0, k4) BDOT(1, k4) BDOT(2, k4) BDOT(3, k4) BDOT(4, k4) BDOT(5, k4) BDOT(6, k4) BDOT(7, k4)  \
    }
#define BFOLD(i, j)                                                                                      \
    _mm512_store_ps(f + (i) * TILE_N + (j) * BLOCK_N,                                                    \
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c##i##j, _mm512_loadu_si512(corr + (j) * BLOCK_N))), \
                                    _mm512_mul_ps(_mm512_loadu_ps(scale + (j) * BLOCK_N), as),          \
                                    _mm512_load_ps(f + (i) * TILE_N + (j) * BLOCK_N)));
#define BFOLD_ROW(i)                                                                                     \
    if (MR > i) {                                                                                        \
        __m512 as = _mm512_set1_ps(a_scale[(size_t)(i) * blocks + blk]);                                 \
        BFOLD(i, 0) BFOLD(i, 1) BFOLD(i, 2)                                                              \
    }

/* One block (32 k) of MR rows (1..8) against the tile's 48 columns, added to the rows' float sums f
 * ([MR][48]): 3 * MR int32 accumulators (VPDPBUSD) over the block's 8 steps of 4 k, written out in full,
 * then (sum - corr) * (b_scale * a_scale) + f. Out of line: inlined into the tile's loop, GCC 12 spilled
 * the accumulators and kept a pointer per row on the stack (71 instead of 129 G/s on one thread). */
#define DEFINE_BLOCK_STEP(ROWS)                                                                            \
    __attribute__((noinline)) static void block_step_##ROWS(const uint32_t *q, int rows, const float *a_scale, int blocks, \
                                  const int8_t *b, size_t block, int blk, const int32_t *corr,            \
                                  const float *scale, float *f) {                                         \
        enum { MR = ROWS };                                                                              \
        __m512i c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;                              \
        __m512i c40, c41, c42, c50, c51, c52, c60, c61, c62, c70, c71, c72;                              \
        c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = _mm512_setzero_si512();  \
        c40 = c41 = c42 = c50 = c51 = c52 = c60 = c61 = c62 = c70 = c71 = c72 = _mm512_setzero_si512();  \
        const int k0 = blk * (BLOCK_K / 4);                                                              \
        BSTEP(k0) BSTEP(k0 + 1) BSTEP(k0 + 2) BSTEP(k0 + 3) BSTEP(k0 + 4) BSTEP(k0 + 5) BSTEP(k0 + 6) BSTEP(k0 + 7) \
        BFOLD_ROW(0) BFOLD_ROW(1) BFOLD_ROW(2) BFOLD_ROW(3) BFOLD_ROW(4) BFOLD_ROW(5) BFOLD_ROW(6) BFOLD_ROW(7) \
    }

DEFINE_BLOCK_STEP(8)
DEFINE_BLOCK_STEP(4)
DEFINE_BLOCK_STEP(2)
DEFINE_BLOCK_STEP(1)

#define CHUNK_ROWS 64 /* rows per unit of work (and of the float sums kept on the stack) */

/* Rows row_begin .. row_end - 1 (at most CHUNK_ROWS) of one tile: block by block, every row group in
 * turn, so a block's 1.5 KB of weights is read from memory once and then from L1 for all the rows;
 * every row's sums are folded in the same order whichever group it falls in. */
static void block_tile_rows(const BlockWork *w, int row_begin, int row_end, int tile) {
    const Linear *L = w->L;
    const int K = L->K, N = L->N, P = L->padded, blocks = L->blocks, n0 = tile * TILE_N, rows = row_end - row_begin;
    const size_t block = (size_t)(K / 4) * 64;
    const int8_t *b = L->packed + (size_t)tile * BLOCKS_PER_TILE * block;
    float f[CHUNK_ROWS * TILE_N] __attribute__((aligned(64)));
    memset(f, 0, sizeof(float) * (size_t)rows * TILE_N);
    for (int blk = 0; blk < blocks; blk++) {
        /* the next tile's weights for this block into L2, while this one computes: they come from memory
         * (a tile of K = 2048 is 96 KB, more than L1 holds) */
        const int8_t *next = b + 3 * block + (size_t)blk * (BLOCK_K / 4) * 64;
        for (int j = 0; j < BLOCKS_PER_TILE; j++)
            for (int line = 0; line < BLOCK_K / 4; line++) _mm_prefetch((const char *)(next + j * block + line * 64), _MM_HINT_T1);
        const int32_t *corr = L->corr + (size_t)blk * P + n0;
        const float *scale = L->scale + (size_t)blk * P + n0;
        int m = 0;
        for (; m + 8 <= rows; m += 8)
            block_step_8(w->q + row_begin + m, w->rows, w->a_scale + (size_t)(row_begin + m) * blocks, blocks, b, block, blk, corr, scale, f + m * TILE_N);
        if (m + 4 <= rows) {
            block_step_4(w->q + row_begin + m, w->rows, w->a_scale + (size_t)(row_begin + m) * blocks, blocks, b, block, blk, corr, scale, f + m * TILE_N);
            m += 4;
        }
        if (m + 2 <= rows) {
            block_step_2(w->q + row_begin + m, w->rows, w->a_scale + (size_t)(row_begin + m) * blocks, blocks, b, block, blk, corr, scale, f + m * TILE_N);
            m += 2;
        }
        if (m < rows)
            block_step_1(w->q + row_begin + m, w->rows, w->a_scale + (size_t)(row_begin + m) * blocks, blocks, b, block, blk, corr, scale, f + m * TILE_N);
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < BLOCKS_PER_TILE && n0 + j * BLOCK_N < N; j++) {
            int n = n0 + j * BLOCK_N;
            __mmask16 mask = N - n >= BLOCK_N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
            _mm512_mask_storeu_ps(w->out + (size_t)(row_begin + m) * N + n, mask, _mm512_load_ps(f + m * TILE_N + j * BLOCK_N));
        }
}

/* ---- one run ------------------------------------------------------------------------------------- */

typedef struct Job {
    const Linear *L;
    const float *x;
    uint8_t *q;
    float *scales; /* per row (rowwise) or per row and block */
    int rows, tiles, chunks;
    Work rowwise;
    BlockWork blockwise;
} Job;

static void quantize_unit(void *data, size_t m) {
    Job *job = data;
    const Linear *L = job->L;
    const float *x = job->x + m * L->K;
    if (L->block)
        quantize_blocks(x, L->K, (uint32_t *)job->q + m, (size_t)job->rows, job->scales + m * L->blocks);
    else
        quantize_row(x, L->K, job->q + m * L->K, job->scales + m);
}

/* unit = tile * chunks + chunk: the units one thread takes in a row share a tile's weights */
static void product_unit(void *data, size_t unit) {
    const Job *job = data;
    int tile = (int)(unit / job->chunks), chunk = (int)(unit % job->chunks);
    int begin = chunk * CHUNK_ROWS, end = begin + CHUNK_ROWS < job->rows ? begin + CHUNK_ROWS : job->rows;
    if (job->L->block)
        block_tile_rows(&job->blockwise, begin, end, tile);
    else
        tile_rows(&job->rowwise, begin, end, tile);
}

static OrtStatus *run(void *ctx, void (*fn)(void *, size_t), size_t total, Job *job) {
    if (parallel_for != NULL && total > 1) return parallel_for(ctx, fn, total, 0, job);
    for (size_t i = 0; i < total; i++) fn(job, i);
    return NULL;
}

typedef struct Tensor {
    void *data;
    int type;
    size_t rank;
    int64_t dims[8];
    int64_t count;
} Tensor;

static OrtStatus *read_tensor(const void *value, Tensor *t) {
    void *info = NULL;
    OrtStatus *st;
    if ((st = API(API_GET_TENSOR_TYPE_AND_SHAPE, type_and_shape_fn)(value, &info))) return st;
    st = API(API_GET_TENSOR_ELEMENT_TYPE, element_type_fn)(info, &t->type);
    if (!st) st = API(API_GET_DIMENSIONS_COUNT, dims_count_fn)(info, &t->rank);
    if (!st && t->rank > 8) st = error(ERR_INVALID_ARGUMENT, "toolkit int8 linear: rank %ld%.0ld", (long)t->rank, 0);
    if (!st) st = API(API_GET_DIMENSIONS, dims_fn)(info, t->dims, t->rank);
    API(API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, release_fn)(info);
    if (!st) st = API(API_GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(value, &t->data);
    t->count = 1;
    for (size_t i = 0; !st && i < t->rank; i++) t->count *= t->dims[i];
    return st;
}

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21 /* Linux 5.4 */
#endif

/* After packing an initializer: onnxruntime maps the engine's external data file, so the weight's pages
 * (read once, to pack) are clean file pages that nothing reads again; counted in the resident set until
 * the kernel needs them (~95 MB on the default model). MADV_PAGEOUT reclaims them now: a hint that never
 * changes the memory's content (on anonymous memory without swap it does nothing; a later read faults
 * them back in). Errors (older kernels) are ignored. */
static void page_out(const void *data, size_t bytes) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t begin = ((uintptr_t)data + page - 1) / page * page, end = ((uintptr_t)data + bytes) / page * page;
    if (end > begin) madvise((void *)begin, end - begin, MADV_PAGEOUT);
}

/* Checks a weight and its scales against the kernel (a per-row kernel takes its shape from the first
 * weight it sees) and packs them, unless they are the initializers packed when the session was made (a
 * weight fed as an input may hold other values at the same address, so it is packed at every run). */
static OrtStatus *ready_weights(Linear *L, const Tensor *w, const Tensor *s) {
    OrtStatus *st = NULL;
    pthread_mutex_lock(&L->lock);
    if (L->block ? w->count != (int64_t)L->N * L->K || s->count != (int64_t)L->N * L->blocks
                 : w->rank != 2 || s->count != w->dims[1]) {
        st = error(ERR_INVALID_ARGUMENT, "toolkit int8 linear: weight of %ld values, %ld scales", (long)w->count, (long)s->count);
    } else {
        if (!L->block && L->packed_from == NULL) {
            L->K = (int)w->dims[0];
            L->N = (int)w->dims[1];
            L->padded = (L->N + TILE_N - 1) / TILE_N * TILE_N;
        }
        if (L->K % 4 || (!L->block && (L->K != w->dims[0] || L->N != w->dims[1])))
            st = error(ERR_INVALID_ARGUMENT, "toolkit int8 linear: a [%ld, %ld] weight", (long)w->dims[0], (long)w->dims[1]);
        else if (!(L->constant && L->packed_from == w->data) && !pack(L, w->data, s->data))
            st = error(ERR_FAIL, "toolkit int8 linear: out of memory packing a %ldx%ld weight", (long)L->K, (long)L->N);
    }
    pthread_mutex_unlock(&L->lock);
    return st;
}

static OrtStatus *compute(void *kernel, void *ctx) {
    Linear *L = kernel;
    const void *values[3];
    Tensor x, w, s;
    OrtStatus *st;
    for (size_t i = 0; i < 3; i++)
        if ((st = API(API_KERNEL_CONTEXT_GET_INPUT, get_input_fn)(ctx, i, &values[i]))) return st;
    if ((st = read_tensor(values[0], &x)) || (st = read_tensor(values[1], &w)) || (st = read_tensor(values[2], &s))) return st;
    if ((st = ready_weights(L, &w, &s))) return st;
    if (x.rank < 1 || x.dims[x.rank - 1] != L->K)
        return error(ERR_INVALID_ARGUMENT, "toolkit int8 linear: input's last dimension %ld, the weight's K %ld",
                     x.rank ? (long)x.dims[x.rank - 1] : 0L, (long)L->K);

    int64_t out_dims[8];
    memcpy(out_dims, x.dims, sizeof(int64_t) * x.rank);
    out_dims[x.rank - 1] = L->N;
    void *out = NULL, *out_value = NULL;
    if ((st = API(API_KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 0, out_dims, x.rank, &out_value))) return st;
    if ((st = API(API_GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(out_value, &out))) return st;
    int rows = (int)(x.count / L->K);
    if (rows == 0) return NULL;
    Job job = {L, x.data, malloc((size_t)rows * L->K), malloc(sizeof(float) * rows * L->blocks), rows,
               L->padded / TILE_N, (rows + CHUNK_ROWS - 1) / CHUNK_ROWS};
    if (!job.q || !job.scales) {
        free(job.q);
        free(job.scales);
        return error(ERR_FAIL, "toolkit int8 linear: out of memory for %ld rows of %ld", (long)rows, (long)L->K);
    }
    job.rowwise = (Work){job.q, rows, L->K, L->N, L->packed, L->corr, L->scale, job.scales, out, 0, 0, NULL};
    job.blockwise = (BlockWork){(const uint32_t *)job.q, rows, job.scales, L, out};
    if (rows <= SERIAL_QUANTIZE) {
        for (int m = 0; m < rows; m++) quantize_unit(&job, (size_t)m);
    } else {
        st = run(ctx, quantize_unit, (size_t)rows, &job);
    }
    if (!st) st = run(ctx, product_unit, (size_t)job.tiles * job.chunks, &job);
    free(job.q);
    free(job.scales);
    return st;
}

/* ---- the operators ------------------------------------------------------------------------------- */

static CustomOp rowwise_op, block_op;

static OrtStatus *create_kernel(const CustomOp *op, const void *api_table, const void *info, void **out) {
    (void)api_table;
    Linear *L = calloc(1, sizeof *L);
    if (L == NULL) return error(ERR_FAIL, "toolkit int8 linear: out of memory%.0ld%.0ld", 0, 0);
    L->block = op == &block_op;
    L->blocks = 1;
    if (L->block) {
        int64_t K = 0, N = 0, bits = 0, block_size = 0;
        attr_int_fn attr_int = API(API_KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn);
        OrtStatus *st;
        if ((st = attr_int(info, "K", &K)) || (st = attr_int(info, "N", &N)) || (st = attr_int(info, "bits", &bits))
            || (st = attr_int(info, "block_size", &block_size))) {
            free(L);
            return st;
        }
        if (bits != 8 || block_size != BLOCK_K || K <= 0 || K % BLOCK_K || N <= 0) {
            free(L);
            return error(ERR_INVALID_ARGUMENT, "toolkit Int8BlockMatMul: bits %ld, block_size %ld (8 and 32 only)", (long)bits, (long)block_size);
        }
        L->K = (int)K;
        L->N = (int)N;
        L->blocks = (int)(K / BLOCK_K);
        L->padded = (L->N + TILE_N - 1) / TILE_N * TILE_N;
    }
    pthread_mutex_init(&L->lock, NULL);
    *out = L;
    /* Weights that are initializers are packed now, when the session is made, not in the first run. */
    if (api_version >= API_VERSION_PARALLEL) {
        typedef OrtStatus *(*constant_fn)(const void *info, size_t index, int *is_constant, const void **out);
        constant_fn constant = API(API_KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR, constant_fn);
        const void *values[2] = {NULL, NULL};
        int is_constant[2] = {0, 0};
        Tensor w, s;
        OrtStatus *st = NULL;
        for (size_t i = 0; i < 2 && !st; i++) st = constant(info, i + 1, &is_constant[i], &values[i]);
        if (!st && is_constant[0] && is_constant[1] && values[0] && values[1] && !(st = read_tensor(values[0], &w))
            && !(st = read_tensor(values[1], &s)))
            st = ready_weights(L, &w, &s);
        if (st) {
            API(API_RELEASE_STATUS, release_fn)(st); /* the first run packs them, or reports what is wrong */
        } else if ((L->constant = L->packed_from != NULL)) {
            page_out(w.data, (size_t)L->K * L->N);
        }
    }
    return NULL;
}

static void destroy(void *kernel) {
    Linear *L = kernel;
    pthread_mutex_destroy(&L->lock);
    free(L->packed);
    free(L->corr);
    free(L->scale);
    free(L);
}

static const char *op_name(const CustomOp *op) { return op == &block_op ? "Int8BlockMatMul" : "RowwiseInt8MatMul"; }
static int input_type(const CustomOp *op, size_t i) { return i == 1 ? (op == &block_op ? TYPE_UINT8 : TYPE_INT8) : TYPE_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return 3; }
static int output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t output_count(const CustomOp *op) { (void)op; return 1; }

static CustomOp rowwise_op = CUSTOM_OP(op_name, input_type, input_count, output_type, output_count, destroy,
                                       required_io, create_kernel, compute);
static CustomOp block_op = CUSTOM_OP(op_name, input_type, input_count, output_type, output_count, destroy,
                                     required_io, create_kernel, compute);

/* onnxruntime's entry point for SessionOptions.register_custom_ops_library. */
OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base) {
    if (!load_api(base)) return NULL;
    static const CustomOp *const ops[] = {&rowwise_op, &block_op};
    return register_domain(options, "toolkit.native.linear", ops, 2);
}
