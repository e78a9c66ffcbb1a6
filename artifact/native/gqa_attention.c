/* GroupQueryAttention over a key/value cache, as an onnxruntime custom operator (domain toolkit.native).
 *
 * Semantics: those of onnxruntime's CPU GroupQueryAttention (com.microsoft, contrib_ops/cpu/bert/
 * group_query_attention.cc and gqa_attention_base.h at https://github.com/microsoft/onnxruntime) for the
 * inputs the onnxruntime-genai builder's graphs use, with rotary embedding inside:
 *
 *   0 query [B, S, Nq*H]   1 key [B, S, Nkv*H]   2 value [B, S, Nkv*H]
 *     or, packed: 0 [B, S, (Nq + 2 Nkv)*H] (query, key, value heads in that order), 1 and 2 absent
 *   3 past_key [B, Nkv, P, H]   4 past_value [B, Nkv, P, H]
 *   5 seqlens_k [B] int32 (each row's total length - 1)   6 total_sequence_length [] int32
 *   7 cos_cache [max_positions, H/2]   8 sin_cache [max_positions, H/2]
 *   outputs: 0 [B, S, Nq*H], 1 present_key, 2 present_value [B, Nkv, max(P, total), H]
 *
 * Row b's S new tokens sit at positions past_b .. past_b+S-1, past_b = seqlens_k[b] + 1 - S (0 on a first
 * prompt, total_sequence_length == S). Their keys (rotated) and values are written into the present
 * cache at those positions; when present is bound to the past's memory (toolkit.runtime.shared_kv) that
 * is all the cache traffic there is. A query at position p attends to keys p - local_window_size + 1 .. p
 * (the last local_window_size keys, itself included, as onnxruntime 1.31 computes it; all keys up to p
 * where local_window_size <= 0), scaled by `scale` (0: 1/sqrt(H)), with softcap (softcap * tanh(x /
 * softcap)) where it is positive.
 *
 * GroupQueryAttentionF16Cache is the same operator over a float16 cache (past and present key/value
 * float16, everything else float32): the new keys (rotated) and values are rounded to nearest even as
 * they are stored and read back exactly (vcvtph2ps), every product and sum stays float32. Half the bytes
 * per cached token, which the decode step streams from memory; llama.cpp's default cache type too.
 *
 * Why our own: at 16 decode rows of ~170 cached tokens onnxruntime's operator took 8.3 ms of a 34 ms
 * step on 2 Zen 4 cores (the step without it: 26.2 ms), while the step's attention reads ~100 MB of
 * cache, ~3 ms at this machine's bandwidth. onnxruntime runs one GEMM per (row, query head), so each
 * row's keys and values are read once per query head (4 times on the default model) and the whole
 * probability matrix of the cache's capacity is written; here the query heads that share a key/value
 * head are computed in one pass over its keys, with the probabilities of the live positions only.
 *
 * Every (query, key) product is the same instruction sequence whatever the batch, the number of new
 * tokens or the work split: a row's attention output is bitwise the same decoded one token at a time,
 * in a prompt chunk, or verified with a speculative draft (tests/test_native_attention.py).
 *
 * The onnxruntime C API is reached through its function table by position (ort_abi.h).
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

/* ---- the kernel ---------------------------------------------------------------------------------- */

typedef struct Kernel {
    int num_heads, kv_heads, window, rotary;
    int half_cache;  /* the cache (past/present) holds float16, not float32 */
    float scale, softcap;
} Kernel;

#define MAX_HEAD 512
#define MAX_GROUP 16 /* query heads per key/value head */

/* e^x for x <= 0 (softmax arguments), 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6
 * polynomial (Taylor, relative error < 2e-7 there), 2^n by scalef. Arguments below -87 give 0. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Non-interleaved rotary (rotate_half): pairs (i, i + H/2) turned by the position's angle. */
static void rotate(const float *x, float *out, int head, const float *cos_row, const float *sin_row) {
    int half = head / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        out[i] = a * cos_row[i] - b * sin_row[i];
        out[i + half] = b * cos_row[i] + a * sin_row[i];
    }
}

static void softmax_rows(float *scores, int group, int n);

/* The cache's 16 elements at `p` as float32: a float32 cache, or a float16 one (F16C's conversion, exact). */
static inline __m512 load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* One query position of one row and one key/value head: its `group` query heads (already rotated, in
 * q[group][head]) against keys lo .. hi-1 of k / v ([positions][head], elements of the cache's type);
 * results to out[group][head]. scores: scratch of group * (hi - lo) floats. One function per cache type,
 * the same instructions but the loads. */
#define DEFINE_ATTEND(NAME, ELEMENT, LOAD)                                                                  \
static void NAME(const Kernel *kn, int group, int head, const float *q, const ELEMENT *k, const ELEMENT *v, \
                 int lo, int hi, float *scores, float *out) {                                              \
    int n = hi - lo, chunks = head / 16;                                                                   \
    for (int j = 0; j < n; j++) {                                                                          \
        const ELEMENT *key = k + (size_t)(lo + j) * head;                                                  \
        for (int g = 0; g < group; g++) {                                                                  \
            const float *qg = q + (size_t)g * head;                                                        \
            __m512 acc = _mm512_setzero_ps();                                                              \
            for (int c = 0; c < chunks; c++)                                                               \
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), LOAD(key + 16 * c), acc);              \
            float s = _mm512_reduce_add_ps(acc) * kn->scale;                                               \
            if (kn->softcap > 0.0f) s = kn->softcap * tanhf(s / kn->softcap);                              \
            scores[(size_t)g * n + j] = s;                                                                 \
        }                                                                                                  \
    }                                                                                                      \
    softmax_rows(scores, group, n);                                                                        \
    /* out[g] = sum_j p[g][j] v[j], 64 columns at a time: 4 zmm per head in registers, keys in order */    \
    for (int c0 = 0; c0 < head; c0 += 64) {                                                                \
        int width = head - c0 < 64 ? (head - c0) / 16 : 4;                                                 \
        for (int g = 0; g < group; g++) {                                                                  \
            const float *pg = scores + (size_t)g * n;                                                      \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                    \
            for (int j = 0; j < n; j++) {                                                                  \
                const ELEMENT *val = v + (size_t)(lo + j) * head + c0;                                     \
                __m512 p = _mm512_set1_ps(pg[j]);                                                          \
                a0 = _mm512_fmadd_ps(p, LOAD(val), a0);                                                    \
                if (width > 1) a1 = _mm512_fmadd_ps(p, LOAD(val + 16), a1);                                \
                if (width > 2) a2 = _mm512_fmadd_ps(p, LOAD(val + 32), a2);                                \
                if (width > 3) a3 = _mm512_fmadd_ps(p, LOAD(val + 48), a3);                                \
            }                                                                                              \
            float *o = out + (size_t)g * head + c0;                                                        \
            _mm512_storeu_ps(o, a0);                                                                       \
            if (width > 1) _mm512_storeu_ps(o + 16, a1);                                                   \
            if (width > 2) _mm512_storeu_ps(o + 32, a2);                                                   \
            if (width > 3) _mm512_storeu_ps(o + 48, a3);                                                   \
        }                                                                                                  \
    }                                                                                                      \
}
DEFINE_ATTEND(attend_f32, float, load_f32)
DEFINE_ATTEND(attend_f16, uint16_t, load_f16)

/* Each of the `group` rows of n scores to its softmax, in place. */
static void softmax_rows(float *scores, int group, int n) {
    for (int g = 0; g < group; g++) {  /* softmax over the row's keys */
        float *sg = scores + (size_t)g * n, m = -INFINITY, sum = 0.0f;
        for (int j = 0; j < n; j++) m = sg[j] > m ? sg[j] : m;
        __m512 vm = _mm512_set1_ps(m), vsum = _mm512_setzero_ps();
        int j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sg + j), vm));
            _mm512_storeu_ps(sg + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (j < n) {
            __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), vm));
            e = _mm512_maskz_mov_ps(tail, e);
            _mm512_mask_storeu_ps(sg + j, tail, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        sum = _mm512_reduce_add_ps(vsum);
        float inv = 1.0f / sum;
        for (j = 0; j < n; j++) sg[j] *= inv;
    }
}

typedef struct Job {
    const Kernel *kn;
    const float *query, *cos, *sin;
    size_t query_stride;       /* floats from one token's query heads to the next's (packed: q, k and v heads) */
    void *present_k, *present_v;  /* float, or uint16_t (float16) where kn->half_cache */
    float *output;
    const int32_t *past;       /* per row: cached positions before the new tokens */
    int seq, head, present_len;
    int failed;                /* a work unit could not get its scratch memory */
} Job;

/* Work unit `index`: (row, key/value head, new token). */
static void run_unit(void *data, size_t index) {
    Job *job = (Job *)data;
    const Kernel *kn = job->kn;
    int kv = kn->kv_heads, group = kn->num_heads / kv, head = job->head;
    int s = (int)(index % (size_t)job->seq);
    int h = (int)(index / (size_t)job->seq % (size_t)kv);
    int b = (int)(index / ((size_t)job->seq * kv));
    int p = job->past[b] + s;
    int lo = kn->window > 0 && p >= kn->window ? p - kn->window + 1 : 0, hi = p + 1;
    float q[MAX_GROUP * MAX_HEAD], stack_scores[MAX_GROUP * 1024];
    float *scores = stack_scores;
    if ((size_t)group * (hi - lo) > sizeof stack_scores / sizeof *stack_scores) {
        scores = malloc(sizeof(float) * group * (size_t)(hi - lo));
        if (scores == NULL) {
            job->failed = 1;
            return;
        }
    }
    const float *qrow = job->query + ((size_t)b * job->seq + s) * job->query_stride + (size_t)h * group * head;
    for (int g = 0; g < group; g++) {
        if (kn->rotary)
            rotate(qrow + (size_t)g * head, q + (size_t)g * head, head, job->cos + (size_t)p * (head / 2),
                   job->sin + (size_t)p * (head / 2));
        else
            memcpy(q + (size_t)g * head, qrow + (size_t)g * head, sizeof(float) * head);
    }
    size_t cache = ((size_t)b * kv + h) * (size_t)job->present_len * head;
    float *out = job->output + ((size_t)b * job->seq + s) * (size_t)kn->num_heads * head + (size_t)h * group * head;
    if (kn->half_cache)
        attend_f16(kn, group, head, q, (const uint16_t *)job->present_k + cache, (const uint16_t *)job->present_v + cache,
                   lo, hi, scores, out);
    else
        attend_f32(kn, group, head, q, (const float *)job->present_k + cache, (const float *)job->present_v + cache,
                   lo, hi, scores, out);
    if (scores != stack_scores) free(scores);
}

typedef struct Tensor {
    const void *value;
    void *data;
    int64_t dims[8];
    size_t rank;
    int type;
} Tensor;

/* Input `index`; t->value NULL (and no error) where an optional input is absent. */
static OrtStatus *read_input(const void *ctx, size_t index, Tensor *t) {
    memset(t, 0, sizeof *t);
    OrtStatus *st = API(API_KERNEL_CONTEXT_GET_INPUT, get_input_fn)(ctx, index, &t->value);
    if (st || t->value == NULL) return st;
    void *info = NULL;
    if ((st = API(API_GET_TENSOR_TYPE_AND_SHAPE, type_and_shape_fn)(t->value, &info))) return st;
    st = API(API_GET_DIMENSIONS_COUNT, dims_count_fn)(info, &t->rank);
    if (!st && t->rank > 8) st = error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: input %ld has rank %ld", (long)index, (long)t->rank);
    if (!st) st = API(API_GET_DIMENSIONS, dims_fn)(info, t->dims, t->rank);
    if (!st) st = API(API_GET_TENSOR_ELEMENT_TYPE, element_type_fn)(info, &t->type);
    API(API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, release_fn)(info);
    if (!st) st = API(API_GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(t->value, &t->data);
    return st;
}

static OrtStatus *output(void *ctx, size_t index, const int64_t *dims, size_t rank, void **data) {
    void *value = NULL;
    OrtStatus *st = API(API_KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, index, dims, rank, &value);
    if (!st) st = API(API_GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(value, data);
    return st;
}

/* The head's `head` floats into the cache at element `at`: as they are, or rounded to float16 (nearest even). */
static void store_row(void *cache, size_t at, const float *x, int head, int half) {
    if (!half) {
        memcpy((float *)cache + at, x, sizeof(float) * head);
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
    for (int c = 0; c < head; c += 16)
        _mm256_storeu_si256((__m256i *)(dst + c), _mm512_cvtps_ph(_mm512_loadu_ps(x + c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

static void serial_for(Job *job, size_t total) {
    for (size_t i = 0; i < total; i++) run_unit(job, i);
}

static OrtStatus *compute(void *kernel, void *ctx) {
    Kernel kn_run = *(const Kernel *)kernel, *kn = &kn_run;
    Tensor in[9];
    OrtStatus *st;
    for (size_t i = 0; i < 9; i++)
        if ((st = read_input(ctx, i, &in[i]))) return st;
    int packed = in[1].value == NULL && in[2].value == NULL;
    for (size_t i = 0; i < 9; i++) {
        int want = (i == 5 || i == 6) ? TYPE_INT32 : (i == 3 || i == 4) && kn->half_cache ? TYPE_FLOAT16 : TYPE_FLOAT;
        if (packed && (i == 1 || i == 2)) continue;
        if (in[i].value == NULL) return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: input %ld is missing%.0ld", (long)i, 0);
        if (in[i].type != want) return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: input %ld has element type %ld", (long)i, in[i].type);
    }
    Tensor *q = &in[0], *k = &in[1], *v = &in[2], *pk = &in[3], *pv = &in[4], *lens = &in[5], *cs = &in[7], *sn = &in[8];
    if (q->rank != 3 || (!packed && (k->rank != 3 || v->rank != 3)) || pk->rank != 4 || pv->rank != 4 || lens->rank != 1
        || cs->rank != 2 || sn->rank != 2)
        return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: unexpected input ranks%.0ld%.0ld", 0, 0);
    int rows = (int)q->dims[0], seq = (int)q->dims[1], kv = kn->kv_heads, width = kn->num_heads + (packed ? 2 * kv : 0);
    int head = (int)(q->dims[2] / width), past_len = (int)pk->dims[2];
    int total = *(const int32_t *)in[6].data;
    if (q->dims[2] != (int64_t)head * width || lens->dims[0] != rows
        || (!packed && (k->dims[2] != (int64_t)head * kv || v->dims[2] != k->dims[2] || k->dims[0] != rows
                        || v->dims[0] != rows || k->dims[1] != seq || v->dims[1] != seq)))
        return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: query/key/value shapes disagree (rows %ld, tokens %ld)", rows, seq);
    if (kn->scale == 0.0f) kn->scale = 1.0f / sqrtf((float)head);  /* onnxruntime's default */
    /* where each token's new keys and values start, and the floats from one token's to the next's */
    const float *keys = packed ? (const float *)q->data + (size_t)kn->num_heads * head : (const float *)k->data;
    const float *values = packed ? keys + (size_t)kv * head : (const float *)v->data;
    size_t kv_stride = packed ? (size_t)width * head : (size_t)kv * head;
    if (pk->dims[0] != rows || pk->dims[1] != kv || pk->dims[3] != head || memcmp(pk->dims, pv->dims, sizeof(int64_t) * 4))
        return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: past key/value are not [%ld, %ld, L, H]", rows, kv);
    if (head % 16 || head > MAX_HEAD || (kn->rotary && (cs->dims[1] * 2 != head || sn->dims[1] != cs->dims[1] || sn->dims[0] != cs->dims[0])))
        return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: head size %ld (rotary table width %ld) not supported", head, (long)cs->dims[1]);
    int present_len = past_len > total ? past_len : total;
    int32_t *past = malloc(sizeof(int32_t) * (rows > 0 ? rows : 1));
    if (past == NULL) return error(ERR_FAIL, "toolkit GroupQueryAttention: out of memory (%ld rows)%.0ld", rows, 0);
    const int32_t *seqlens = (const int32_t *)lens->data;
    int first_prompt = total == seq;
    for (int b = 0; b < rows; b++) {
        past[b] = first_prompt ? 0 : seqlens[b] + 1 - seq;
        int end = past[b] + seq;
        if (past[b] < 0 || past[b] > past_len || end > present_len || (kn->rotary && end > cs->dims[0])) {
            st = error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: row %ld's length %ld does not fit the cache or the rotary table", b, seqlens[b] + 1L);
            free(past);
            return st;
        }
    }
    int64_t out_dims[3] = {rows, seq, (int64_t)kn->num_heads * head}, cache_dims[4] = {rows, kv, present_len, head};
    void *out, *present_k, *present_v;
    size_t es = kn->half_cache ? 2 : 4;  /* bytes per cache element */
    if ((st = output(ctx, 0, out_dims, 3, &out)) || (st = output(ctx, 1, cache_dims, 4, &present_k))
        || (st = output(ctx, 2, cache_dims, 4, &present_v))) {
        free(past);
        return st;
    }
    size_t slot = (size_t)present_len * head, past_slot = (size_t)past_len * head;
    if (present_k != pk->data || present_v != pv->data) {
        /* not sharing: each row's cached positions copied in, the rest zero (as onnxruntime leaves it) */
        memset(present_k, 0, es * slot * rows * kv);
        memset(present_v, 0, es * slot * rows * kv);
        for (size_t r = 0; r < (size_t)rows * kv; r++) {
            size_t live = (size_t)past[r / kv] * head;
            memcpy((char *)present_k + es * r * slot, (const char *)pk->data + es * r * past_slot, es * live);
            memcpy((char *)present_v + es * r * slot, (const char *)pv->data + es * r * past_slot, es * live);
        }
    }
    /* the new tokens' keys (rotated) and values into the cache */
    int half = head / 2;
    for (int b = 0; b < rows; b++)
        for (int s = 0; s < seq; s++) {
            int p = past[b] + s;
            for (int h = 0; h < kv; h++) {
                size_t src = ((size_t)b * seq + s) * kv_stride + (size_t)h * head;
                size_t dst = ((size_t)b * kv + h) * slot + (size_t)p * head;
                float rotated[MAX_HEAD];
                if (kn->rotary)
                    rotate(keys + src, rotated, head, (const float *)cs->data + (size_t)p * half,
                           (const float *)sn->data + (size_t)p * half);
                store_row(present_k, dst, kn->rotary ? rotated : keys + src, head, kn->half_cache);
                store_row(present_v, dst, values + src, head, kn->half_cache);
            }
        }
    Job job = {kn, (const float *)q->data, (const float *)cs->data, (const float *)sn->data, (size_t)width * head,
               present_k, present_v, (float *)out, past, seq, head, present_len, 0};
    size_t units = (size_t)rows * kv * seq;
    if (parallel_for != NULL && units > 1) {
        st = parallel_for(ctx, run_unit, units, 0, &job);
        if (st) {
            free(past);
            return st;
        }
    } else {
        serial_for(&job, units);
    }
    free(past);
    if (job.failed) return error(ERR_FAIL, "toolkit GroupQueryAttention: out of memory for the scores of %ld tokens%.0ld", present_len, 0);
    return NULL;
}

static int half_cache(const CustomOp *op);

static OrtStatus *create_kernel(const CustomOp *op, const void *api_table, const void *info, void **out) {
    (void)api_table;
    int64_t num_heads = 0, kv_heads = 0, window = -1, rotary = 0, interleaved = 0, smooth = 0;
    float scale = 0.0f, softcap = 0.0f;
    attr_int_fn attr_int = API(API_KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn);
    attr_float_fn attr_float = API(API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT, attr_float_fn);
    release_fn release = API(API_RELEASE_STATUS, release_fn);
    OrtStatus *st;
    if ((st = attr_int(info, "num_heads", &num_heads))) return st;
    if ((st = attr_int(info, "kv_num_heads", &kv_heads))) return st;
    /* the optional attributes: a missing one is an error status, released, and the default kept */
    if ((st = attr_int(info, "local_window_size", &window))) release(st);
    if ((st = attr_int(info, "do_rotary", &rotary))) release(st);
    if ((st = attr_int(info, "rotary_interleaved", &interleaved))) release(st);
    if ((st = attr_int(info, "smooth_softmax", &smooth))) release(st);
    if ((st = attr_float(info, "scale", &scale))) release(st);
    if ((st = attr_float(info, "softcap", &softcap))) release(st);
    if (num_heads <= 0 || kv_heads <= 0 || num_heads % kv_heads || num_heads / kv_heads > MAX_GROUP)
        return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: %ld query heads over %ld key/value heads not supported", (long)num_heads, (long)kv_heads);
    if (interleaved || smooth)
        return error(ERR_INVALID_ARGUMENT, "toolkit GroupQueryAttention: rotary_interleaved=%ld / smooth_softmax=%ld not supported", (long)interleaved, (long)smooth);
    Kernel *kn = malloc(sizeof *kn);
    if (kn == NULL) return error(ERR_FAIL, "toolkit GroupQueryAttention: out of memory%.0ld%.0ld", 0, 0);
    kn->num_heads = (int)num_heads;
    kn->kv_heads = (int)kv_heads;
    kn->window = (int)window;
    kn->rotary = rotary == 1;
    kn->half_cache = half_cache(op);
    kn->scale = scale;  /* 0: 1/sqrt(head size), known at each run */
    kn->softcap = softcap;
    *out = kn;
    return NULL;
}

static void destroy(void *kernel) { free(kernel); }
static CustomOp gqa_op, gqa_f16_op;
static int half_cache(const CustomOp *op) { return op == &gqa_f16_op; }
static const char *op_name(const CustomOp *op) { return half_cache(op) ? "GroupQueryAttentionF16Cache" : "GroupQueryAttention"; }
static int input_type(const CustomOp *op, size_t i) {
    return (i == 5 || i == 6) ? TYPE_INT32 : (i == 3 || i == 4) && half_cache(op) ? TYPE_FLOAT16 : TYPE_FLOAT;
}
static size_t input_count(const CustomOp *op) { (void)op; return 9; }
static int output_type(const CustomOp *op, size_t i) { return i > 0 && half_cache(op) ? TYPE_FLOAT16 : TYPE_FLOAT; }
static size_t output_count(const CustomOp *op) { (void)op; return 3; }
/* key and value are optional (absent: packed into the query); the rest INPUT_OUTPUT_REQUIRED */
static int input_characteristic(const CustomOp *op, size_t i) { (void)op; return i == 1 || i == 2; }

/* GroupQueryAttention over a float32 cache, and GroupQueryAttentionF16Cache: the same over a float16 one
 * (past_key/value and present_key/value float16; everything else, the arithmetic included, float32) */
static CustomOp gqa_op = CUSTOM_OP(op_name, input_type, input_count, output_type, output_count, destroy,
                                   input_characteristic, create_kernel, compute);
static CustomOp gqa_f16_op = CUSTOM_OP(op_name, input_type, input_count, output_type, output_count, destroy,
                                       input_characteristic, create_kernel, compute);

/* onnxruntime's entry point for SessionOptions.register_custom_ops_library. */
OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base) {
    if (!load_api(base)) return NULL;  /* cannot even report it; onnxruntime then fails on the unknown op */
    static const CustomOp *const ops[] = {&gqa_op, &gqa_f16_op};
    return register_domain(options, "toolkit.native", ops, 2);
}

/* The table position check tests/test_native_attention.py runs: the version string through OrtApiBase
 * and a status made and read back through the table. */
int toolkit_gqa_api_check(const OrtApiBase *base, char *version, size_t size) {
    const void *const *table = (const void *const *)base->GetApi(API_VERSION_PARALLEL);
    if (table == NULL) return -1;
    snprintf(version, size, "%s", base->GetVersionString());
    OrtStatus *st = ((create_status_fn)table[API_CREATE_STATUS])(ERR_INVALID_ARGUMENT, "probe");
    const char *msg = ((const char *(*)(const OrtStatus *))table[2])(st);
    int code = ((int (*)(const OrtStatus *))table[1])(st);
    int ok = msg != NULL && strcmp(msg, "probe") == 0 && code == ERR_INVALID_ARGUMENT;
    ((release_fn)table[API_RELEASE_STATUS])(st);
    return ok ? 0 : -2;
}
