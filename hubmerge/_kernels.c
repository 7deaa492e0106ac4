/* The merge diagnostics of one piece in a single pass over its inputs (quality/diagnostics.py).

   The torch path forms the task vectors, copies them to float64 for their Gram matrix and counts signs with
   numpy: a dozen passes over memory per piece, as costly as the merge itself. Here each input is read once,
   eight positions at a time, and every sum and count is taken from registers.

   Same numbers as the torch path (tests/test_diagnostics_kernel.py holds the two together):
   - τᵢ = float(θᵢ) − float(θ_base), one float32 rounding, as torch.sub in float32;
   - the Gram matrix in float64: a product of two float32 values is exact in float64, so only the order of
     the additions differs from torch's addmm (the tests hold them to 1e-12, relative);
   - every count is an exact integer, a NaN counted as numpy's max, min and compares count it;
   - a trimming method's elected sign is the sign of the float32 sum of the trimmed τᵢ in model order, which
     is torch.sum(dim=0)'s order for up to 16 models.

   GCC's vector extensions (GCC and Clang): the build is optional (setup.py), and without it the diagnostics
   take their torch path. Plain C otherwise, loaded with ctypes, which releases the GIL so both merge threads
   measure at once; the module init at the end only makes the shared object a valid Python extension. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__GNUC__)
#error "the diagnostics kernel needs GCC's vector extensions (GCC or Clang); hubmerge uses its torch path"
#endif

#define MAX_MODELS 8  /* more models: the caller measures with torch (kernel.MAX_MODELS) */
#define LANES 8
#define FLUSH (1 << 20) /* positions between flushes of the int32 lane counts into int64 */

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));

enum { HM_FLOAT32 = 0, HM_BFLOAT16 = 1 };

/* The counts, at counts[HM_HEAD + HM_PER_MODEL * i + field] for model i. */
enum { HM_CONFLICT = 0, HM_SIGN_POSITIVE = 1, HM_SIGN_NEGATIVE = 2, HM_HEAD = 3 };
enum { HM_MODEL_CONFLICT, HM_KEPT, HM_DROPPED, HM_UNDECIDED_POSITIVE, HM_UNDECIDED_NEGATIVE, HM_NAN, HM_PER_MODEL };

/* Eight positions of an input as float32: bfloat16 is the top half of a float32, so the conversion is exact. */
static inline __attribute__((always_inline)) v8f load8(const void *data, int dtype, int64_t k) {
    if (dtype == HM_BFLOAT16) {
        v8h half;
        memcpy(&half, (const uint16_t *)data + k, sizeof half);
        return (v8f)(__builtin_convertvector(half, v8u) << 16);
    }
    v8f x;
    memcpy(&x, (const float *)data + k, sizeof x);
    return x;
}

static inline __attribute__((always_inline)) float load1(const void *data, int dtype, int64_t k) {
    if (dtype == HM_BFLOAT16) {
        uint32_t bits = (uint32_t)((const uint16_t *)data)[k] << 16;
        float x;
        memcpy(&x, &bits, sizeof x);
        return x;
    }
    return ((const float *)data)[k];
}

/* One piece for `n` models; inlined into a copy per n (the dispatch below), so that every loop over the
   models is unrolled and every sum and count lives in a register. */
static inline __attribute__((always_inline)) void measure_n(
    const int n, int64_t numel, const void *base, int base_dtype, const void *const *models,
    const int32_t *dtypes, const float *shrink, double *gram, int64_t *counts) {
    v4d products[MAX_MODELS][MAX_MODELS] = {{{0}}};
    double tail[MAX_MODELS][MAX_MODELS] = {{0}};
    int64_t total[HM_HEAD + HM_PER_MODEL * MAX_MODELS] = {0};
    int64_t whole = numel - numel % LANES;

    for (int64_t block = 0; block < whole; block += FLUSH) {
        int64_t end = block + FLUSH < whole ? block + FLUSH : whole;
        /* Each count as 8 int32 lanes of −1 per hit (a vector compare's true), flushed every FLUSH positions. */
        v8i conflicts = {0}, positive = {0}, negative = {0};
        v8i per[MAX_MODELS][HM_PER_MODEL] = {{{0}}};
        for (int64_t k = block; k < end; k += LANES) {
            v8f reference = load8(base, base_dtype, k), t[MAX_MODELS];
            v8i any_positive = {0}, any_negative = {0}, any_nan = {0};
            for (int i = 0; i < n; i++) {
                t[i] = load8(models[i], dtypes[i], k) - reference;
                any_positive |= t[i] > 0.0f;
                any_negative |= t[i] < 0.0f;
                any_nan |= t[i] != t[i];
            }
            /* A sign conflict: some τ > 0 and some τ < 0, and no NaN (numpy's max and min are NaN there). */
            v8i conflict = any_positive & any_negative & ~any_nan;
            conflicts += conflict;
            v4d low[MAX_MODELS], high[MAX_MODELS];
            for (int i = 0; i < n; i++) {
                per[i][HM_MODEL_CONFLICT] += conflict & (t[i] != 0.0f);
                v4f half[2];  /* the two halves of t[i] (memcpy: __builtin_shufflevector needs GCC 12) */
                memcpy(half, &t[i], sizeof half);
                low[i] = __builtin_convertvector(half[0], v4d);
                high[i] = __builtin_convertvector(half[1], v4d);
                /* One float64 accumulator of four lanes per pair: few enough to stay in registers. */
                for (int j = 0; j <= i; j++) products[i][j] += low[i] * low[j] + high[i] * high[j];
            }
            if (shrink == NULL) continue;
            v8f elected = {0};
            for (int i = 0; i < n; i++) {
                if (shrink[i] >= 0.0f) {  /* hardshrink: 0 within [−λ, λ], the value elsewhere (NaN too) */
                    v8i within = (t[i] >= -shrink[i]) & (t[i] <= shrink[i]);
                    t[i] = (v8f)((v8i)t[i] & ~within);
                }
                elected = i == 0 ? t[i] : elected + t[i];
            }
            v8i up = elected > 0.0f, down = elected < 0.0f, undecided = ~(up | down);
            positive += up;
            negative += down;
            for (int i = 0; i < n; i++) {
                v8i above = t[i] > 0.0f, below = t[i] < 0.0f;
                per[i][HM_KEPT] += above | below;
                per[i][HM_DROPPED] += (above & down) | (below & up);
                per[i][HM_UNDECIDED_POSITIVE] += above & undecided;
                per[i][HM_UNDECIDED_NEGATIVE] += below & undecided;
                per[i][HM_NAN] += t[i] != t[i];
            }
        }
        for (int l = 0; l < LANES; l++) {
            total[HM_CONFLICT] -= conflicts[l];
            total[HM_SIGN_POSITIVE] -= positive[l];
            total[HM_SIGN_NEGATIVE] -= negative[l];
            for (int i = 0; i < n; i++) {
                for (int f = 0; f < HM_PER_MODEL; f++) total[HM_HEAD + HM_PER_MODEL * i + f] -= per[i][f][l];
            }
        }
    }

    /* The last numel % 8 positions, one at a time, by the same rules. */
    for (int64_t k = whole; k < numel; k++) {
        float reference = load1(base, base_dtype, k), t[MAX_MODELS];
        int any_positive = 0, any_negative = 0, any_nan = 0;
        for (int i = 0; i < n; i++) {
            t[i] = load1(models[i], dtypes[i], k) - reference;
            any_positive |= t[i] > 0.0f;
            any_negative |= t[i] < 0.0f;
            any_nan |= t[i] != t[i];
        }
        int conflict = any_positive & any_negative & !any_nan;
        total[HM_CONFLICT] += conflict;
        for (int i = 0; i < n; i++) {
            total[HM_HEAD + HM_PER_MODEL * i + HM_MODEL_CONFLICT] += conflict & (t[i] != 0.0f);
            for (int j = 0; j <= i; j++) tail[i][j] += (double)t[i] * (double)t[j];
        }
        if (shrink == NULL) continue;
        float elected = 0.0f;
        for (int i = 0; i < n; i++) {
            if (shrink[i] >= 0.0f && t[i] >= -shrink[i] && t[i] <= shrink[i]) t[i] = 0.0f;
            elected = i == 0 ? t[i] : elected + t[i];
        }
        int up = elected > 0.0f, down = elected < 0.0f, undecided = !(up | down);
        total[HM_SIGN_POSITIVE] += up;
        total[HM_SIGN_NEGATIVE] += down;
        for (int i = 0; i < n; i++) {
            int above = t[i] > 0.0f, below = t[i] < 0.0f;
            int64_t *mine = total + HM_HEAD + HM_PER_MODEL * i;
            mine[HM_KEPT] += above | below;
            mine[HM_DROPPED] += (above & down) | (below & up);
            mine[HM_UNDECIDED_POSITIVE] += above & undecided;
            mine[HM_UNDECIDED_NEGATIVE] += below & undecided;
            mine[HM_NAN] += t[i] != t[i];
        }
    }

    /* The Gram matrix: each entry's four lanes pairwise, then the tail; both halves written. */
    for (int i = 0; i < n; i++) {
        for (int j = 0; j <= i; j++) {
            v4d s = products[i][j];
            gram[i * n + j] = gram[j * n + i] = ((s[0] + s[1]) + (s[2] + s[3])) + tail[i][j];
        }
    }
    memcpy(counts, total, (size_t)(HM_HEAD + HM_PER_MODEL * n) * sizeof(int64_t));
}

/* The diagnostics of one piece of `numel` positions.

   base, models[i]: the inputs, float32 or bfloat16 (`base_dtype`, `model_dtypes[i]`), contiguous.
   shrink: NULL for a method that does not trim; else per model the hardshrink threshold λᵢ of its cut-off
       (the largest float32 below it): a trimmed τᵢ is 0 within [−λᵢ, λᵢ] and keeps its value elsewhere (NaN
       kept); λᵢ < 0 keeps every entry (a cut-off of 0).
   gram: n×n float64 (row-major); counts: HM_HEAD + HM_PER_MODEL·n int64. Both written.
   Returns 0, or −1 for an n it does not take (then nothing is written).

   On x86-64 Linux an AVX2 copy of the function is built beside the baseline one and chosen when the library
   loads: the same operations in the same order, so the same results either way. */
#if defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
int hubmerge_measure(int64_t n, int64_t numel, const void *base, int32_t base_dtype, const void *const *models,
                     const int32_t *model_dtypes, const float *shrink, double *gram, int64_t *counts) {
    switch (n) {
#define HM_CASE(N)                                                                             \
    case N:                                                                                    \
        measure_n(N, numel, base, base_dtype, models, model_dtypes, shrink, gram, counts);     \
        return 0;
        HM_CASE(1) HM_CASE(2) HM_CASE(3) HM_CASE(4) HM_CASE(5) HM_CASE(6) HM_CASE(7) HM_CASE(8)
#undef HM_CASE
    default:
        return -1;
    }
}

static struct PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
