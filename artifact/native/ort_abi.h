/* The parts of onnxruntime's C ABI our custom operators use (gqa_attention.c, int8_linear.c).
 *
 * The C API is reached through the function table OrtGetApiBase()->GetApi() returns, by index;
 * onnxruntime appends to that table and never reorders it (the ABI promise of onnxruntime_c_api.h,
 * https://github.com/microsoft/onnxruntime/blob/main/include/onnxruntime/core/session/onnxruntime_c_api.h).
 * The indices below are positions in that header's `struct OrtApi`; no onnxruntime header is needed to
 * build. Each operator library includes this once (its own `api` table and `parallel_for`).
 */
#ifndef TOOLKIT_ORT_ABI_H
#define TOOLKIT_ORT_ABI_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>


typedef void OrtStatus;
typedef struct OrtApiBase {
    const void *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum {  /* positions in struct OrtApi (onnxruntime_c_api.h) */
    API_CREATE_STATUS = 0,
    API_CREATE_CUSTOM_OP_DOMAIN = 26,
    API_CUSTOM_OP_DOMAIN_ADD = 27,
    API_ADD_CUSTOM_OP_DOMAIN = 28,
    API_GET_TENSOR_MUTABLE_DATA = 51,
    API_GET_TENSOR_ELEMENT_TYPE = 60,
    API_GET_DIMENSIONS_COUNT = 61,
    API_GET_DIMENSIONS = 62,
    API_GET_TENSOR_TYPE_AND_SHAPE = 65,
    API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
    API_KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
    API_KERNEL_CONTEXT_GET_INPUT = 90,
    API_KERNEL_CONTEXT_GET_OUTPUT = 91,
    API_RELEASE_STATUS = 93,
    API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
    API_KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR = 249, /* since API version 15 */
    API_KERNEL_CONTEXT_PARALLEL_FOR = 274, /* since API version 18 */
};
#define API_VERSION 13           /* the table this file needs without ParallelFor */
#define API_VERSION_PARALLEL 18  /* the first with KernelContext_ParallelFor */
#define ERR_INVALID_ARGUMENT 2   /* OrtErrorCode ORT_INVALID_ARGUMENT */
#define ERR_FAIL 1               /* ORT_FAIL */
#define TYPE_FLOAT 1             /* ONNXTensorElementDataType */
#define TYPE_INT32 6
#define TYPE_FLOAT16 10

/* struct OrtCustomOp as of API version 16, the first whose kernels return a status (KernelComputeV2);
 * onnxruntime reads no member past what `version` says the struct has. */
typedef struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct CustomOp *op, const void *api, const void *info);
    const char *(*GetName)(const struct CustomOp *op);
    const char *(*GetExecutionProviderType)(const struct CustomOp *op);
    int (*GetInputType)(const struct CustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct CustomOp *op);
    int (*GetOutputType)(const struct CustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct CustomOp *op);
    void (*KernelCompute)(void *kernel, void *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct CustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct CustomOp *op, const void *api, const void *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, void *context);
} CustomOp;
#define CUSTOM_OP_VERSION 16

typedef OrtStatus *(*create_status_fn)(int code, const char *msg);
typedef OrtStatus *(*get_input_fn)(const void *ctx, size_t index, const void **out);
typedef OrtStatus *(*get_output_fn)(void *ctx, size_t index, const int64_t *dims, size_t count, void **out);
typedef OrtStatus *(*mutable_data_fn)(const void *value, void **out);
typedef OrtStatus *(*type_and_shape_fn)(const void *value, void **info);
typedef OrtStatus *(*element_type_fn)(const void *info, int *out);
typedef OrtStatus *(*dims_count_fn)(const void *info, size_t *out);
typedef OrtStatus *(*dims_fn)(const void *info, int64_t *dims, size_t count);
typedef void (*release_fn)(void *p);
typedef OrtStatus *(*attr_int_fn)(const void *info, const char *name, int64_t *out);
typedef OrtStatus *(*attr_float_fn)(const void *info, const char *name, float *out);
typedef OrtStatus *(*parallel_for_fn)(const void *ctx, void (*fn)(void *, size_t), size_t total, size_t batches, void *data);

static const void *const *api;          /* the OrtApi table */
static parallel_for_fn parallel_for;    /* NULL before API version 18: the kernel runs on one thread */
#define API(index, type) ((type)api[index])

static OrtStatus *error(int code, const char *fmt, long a, long b) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, a, b);
    return API(API_CREATE_STATUS, create_status_fn)(code, msg);
}

static uint32_t api_version; /* the table's version: API_VERSION_PARALLEL or API_VERSION */

/* The callbacks every operator here answers alike: the CPU provider, every input and output
 * INPUT_OUTPUT_REQUIRED (0) unless the operator says otherwise, default memory, arity 1. */
__attribute__((unused)) static const char *cpu_provider(const CustomOp *op) { (void)op; return NULL; }
__attribute__((unused)) static int required_io(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }
__attribute__((unused)) static int default_memory(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }  /* OrtMemTypeDefault */
__attribute__((unused)) static int one(const CustomOp *op) { (void)op; return 1; }

/* A struct OrtCustomOp (version 16) from what differs between operators; `input_characteristic` decides
 * which inputs are optional. */
#define CUSTOM_OP(name, input_type, input_count, output_type, output_count, destroy, input_characteristic, create, compute) \
    {CUSTOM_OP_VERSION, NULL, name, cpu_provider, input_type, input_count, output_type, output_count, NULL, destroy,          \
     input_characteristic, required_io, default_memory, one, one, one, one, create, compute}

/* Fills `api`, `api_version` and `parallel_for` from onnxruntime's base; 0 when even API version 13 is missing. */
static int load_api(const OrtApiBase *base) {
    api = (const void *const *)base->GetApi(API_VERSION);
    if (api == NULL) return 0;
    const void *const *newer = (const void *const *)base->GetApi(API_VERSION_PARALLEL);
    parallel_for = newer ? (parallel_for_fn)newer[API_KERNEL_CONTEXT_PARALLEL_FOR] : NULL;
    if (newer) api = newer;
    api_version = newer ? API_VERSION_PARALLEL : API_VERSION;
    return 1;
}

/* Adds `ops` (count of them) to a new custom op domain `name` on the session options. */
static OrtStatus *register_domain(void *options, const char *name, const CustomOp *const *ops, size_t count) {
    void *domain = NULL;
    OrtStatus *st = ((OrtStatus * (*)(const char *, void **)) api[API_CREATE_CUSTOM_OP_DOMAIN])(name, &domain);
    if (st) return st;
    for (size_t i = 0; i < count; i++)
        if ((st = ((OrtStatus * (*)(void *, const CustomOp *)) api[API_CUSTOM_OP_DOMAIN_ADD])(domain, ops[i]))) return st;
    return ((OrtStatus * (*)(void *, void *)) api[API_ADD_CUSTOM_OP_DOMAIN])(options, domain);
}
#endif
