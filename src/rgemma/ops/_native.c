/* rgemma.ops._native: weight-streaming matmul kernels for few-row CPU products.
 *
 * y (rows, n) = x (rows, k) @ W (n, k)^T (+ bias), the product of decode, where
 * each weight element is read once from memory per call and the rows of x stay in
 * cache. The speed of a decode step is the rate at which the weights stream.
 *
 *   linear_bf16: bfloat16 x and W, float32 accumulation.
 *   linear_int8: float32 x, int8 W with one float32 scale per output row.
 *   linear_f32: float32 x and W.
 *
 * Each function is built for several instruction sets (GCC's target attribute) and
 * the best the CPU has is chosen at import (`isa()` names it): AVX-512 with BF16
 * (VDPBF16PS: a bfloat16 pair product summed into float32), AVX-512F, AVX2 with
 * FMA, and portable C. The same arithmetic per output element whatever the number
 * of rows, so a row's result does not depend on the other rows of the call.
 * Threads: OpenMP over blocks of output columns (`threads` per call, torch's
 * count); the GIL is released while the kernel runs.
 *
 * Arguments are addresses (Tensor.data_ptr()) and sizes: the Python side
 * (rgemma/ops/native.py) checks dtypes, shapes, devices and contiguity; this file
 * trusts them. The reference every kernel is tested against is F.linear
 * (tests/ops/test_native.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WB 4 /* weight rows per register block */
#define XB 4 /* x rows per register block */
#define PREFETCH_ROWS 8 /* weight rows ahead that are prefetched (page crossings) */
#define KB_F32 512       /* columns per block of a weight tile, float32 x (4 rows: 8 KiB) */
#define KB_BF16 1024     /* the same for bfloat16 x */
#define CHUNK 16 /* weight rows per parallel work item */
#define MAX_ROWS 64 /* rows of x per call at most (the Python side splits larger) */

typedef struct {
    const void *x;   /* (rows, k): bfloat16 (linear_bf16) or float32 (linear_int8) */
    const float *xf; /* x as float32 for the paths without a bfloat16 product, or NULL */
    const void *w;   /* (n, k): bfloat16, int8 or float32 */
    const float *scale; /* (n,) int8 scales, or NULL */
    const void *bias;   /* (n,) or NULL */
    int bias_bf16;      /* bias dtype: 1 bfloat16, 0 float32 */
    void *y;            /* (rows, n) */
    int out_bf16;       /* output dtype: 1 bfloat16, 0 float32 */
    int64_t rows, n, k;
} Job;

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* y[r, i] = dot * scale[i] + bias[i], in the output dtype. */
static inline void finish(const Job *j, int64_t r, int64_t i, float dot) {
    if (j->scale) dot *= j->scale[i];
    if (j->bias)
        dot += j->bias_bf16 ? bf16_to_f32(((const uint16_t *)j->bias)[i])
                            : ((const float *)j->bias)[i];
    if (j->out_bf16)
        ((uint16_t *)j->y)[r * j->n + i] = f32_to_bf16(dot);
    else
        ((float *)j->y)[r * j->n + i] = dot;
}

enum { KIND_BF16, KIND_INT8, KIND_F32 }; /* the weight's type */

/* ---- portable C: float32 x (j->xf), bfloat16, int8 or float32 W ---------------- */

static void block_c(const Job *j, int64_t i0, int64_t i1, int kind) {
    for (int64_t r = 0; r < j->rows; r++) {
        const float *x = j->xf + r * j->k;
        for (int64_t i = i0; i < i1; i++) {
            float acc = 0.0f;
            if (kind == KIND_INT8) {
                const int8_t *w = (const int8_t *)j->w + i * j->k;
                for (int64_t c = 0; c < j->k; c++) acc += (float)w[c] * x[c];
            } else if (kind == KIND_F32) {
                const float *w = (const float *)j->w + i * j->k;
                for (int64_t c = 0; c < j->k; c++) acc += w[c] * x[c];
            } else {
                const uint16_t *w = (const uint16_t *)j->w + i * j->k;
                for (int64_t c = 0; c < j->k; c++) acc += bf16_to_f32(w[c]) * x[c];
            }
            finish(j, r, i, acc);
        }
    }
}

/* ---- AVX2 + FMA: 8 float32 lanes, W widened to float32 ----------------------- */

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static void block_avx2(const Job *j, int64_t i0, int64_t i1, int kind) {
    const int64_t k = j->k, kv = k & ~(int64_t)7;
    for (int64_t r0 = 0; r0 < j->rows; r0 += 2) {
        const int nr = j->rows - r0 < 2 ? 1 : 2;
        const float *x0 = j->xf + r0 * k, *x1 = j->xf + (r0 + nr - 1) * k;
        for (int64_t i = i0; i < i1; i += 2) {
            const int nw = i1 - i < 2 ? 1 : 2;
            const int64_t ia = i, ib = i + nw - 1;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
            for (int64_t c = 0; c < kv; c += 8) {
                __m256 wa, wb;
                if (kind == KIND_INT8) {
                    wa = load8_i8((const int8_t *)j->w + ia * k + c);
                    wb = load8_i8((const int8_t *)j->w + ib * k + c);
                } else if (kind == KIND_F32) {
                    wa = _mm256_loadu_ps((const float *)j->w + ia * k + c);
                    wb = _mm256_loadu_ps((const float *)j->w + ib * k + c);
                } else {
                    wa = load8_bf16((const uint16_t *)j->w + ia * k + c);
                    wb = load8_bf16((const uint16_t *)j->w + ib * k + c);
                }
                __m256 xa = _mm256_loadu_ps(x0 + c), xb = _mm256_loadu_ps(x1 + c);
                a00 = _mm256_fmadd_ps(wa, xa, a00);
                a01 = _mm256_fmadd_ps(wa, xb, a01);
                a10 = _mm256_fmadd_ps(wb, xa, a10);
                a11 = _mm256_fmadd_ps(wb, xb, a11);
            }
            float d[2][2] = {{hsum8(a00), hsum8(a01)}, {hsum8(a10), hsum8(a11)}};
            for (int64_t c = kv; c < k; c++) {
                float wa, wb;
                if (kind == KIND_INT8) {
                    wa = ((const int8_t *)j->w)[ia * k + c];
                    wb = ((const int8_t *)j->w)[ib * k + c];
                } else if (kind == KIND_F32) {
                    wa = ((const float *)j->w)[ia * k + c];
                    wb = ((const float *)j->w)[ib * k + c];
                } else {
                    wa = bf16_to_f32(((const uint16_t *)j->w)[ia * k + c]);
                    wb = bf16_to_f32(((const uint16_t *)j->w)[ib * k + c]);
                }
                d[0][0] += wa * x0[c], d[0][1] += wa * x1[c];
                d[1][0] += wb * x0[c], d[1][1] += wb * x1[c];
            }
            for (int a = 0; a < nw; a++)
                for (int b = 0; b < nr; b++) finish(j, r0 + b, i + a, d[a][b]);
        }
    }
}

/* ---- AVX-512F: 16 float32 lanes, W widened to float32 ------------------------- */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 static inline __m512 load16_bf16(const uint16_t *p, __mmask16 m) {
    const __m256i v = m == (__mmask16)0xffff ? _mm256_loadu_si256((const __m256i *)p)
                                             : _mm256_maskz_loadu_epi16(m, (const void *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

AVX512 static inline __m512 load16_i8(const int8_t *p, __mmask16 m) {
    const __m128i v = m == (__mmask16)0xffff ? _mm_loadu_si128((const __m128i *)p)
                                             : _mm_maskz_loadu_epi8(m, (const void *)p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}

AVX512 static inline __m512 load16_f32(const float *p, __mmask16 m) {
    return m == (__mmask16)0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

AVX512BF16 static inline __m512i load32_raw16(const uint16_t *p, __mmask32 m) {
    return m == (__mmask32)0xffffffffu ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
}

/* The products: float32 FMA on widened W, or AVX-512 BF16's pair product into float32. */
#define FMA_F32(acc, wv, xv) _mm512_fmadd_ps(wv, xv, acc)
#define DP_BF16(acc, wv, xv) _mm512_dpbf16_ps(acc, (__m512bh)(wv), (__m512bh)(xv))

/* One register tile: NW weight rows (from w + i*k) x NR rows of x (xp[]) over the
 * columns [c0, c1), STEP columns per vector (LOADW / LOADX take a pointer and a lane
 * mask, all ones in the main loop), MAC the product into float32 accumulators;
 * compile-time sizes so the NW * NR accumulators live in registers. They start
 * from zero at c0 == 0 (else from `keep`) and are reduced into the output at
 * c1 == k (else saved to `keep`). Prefetch: the rows PREFETCH_ROWS ahead; with
 * `passes` passes of x over an unblocked row, each pass fetches its share of the
 * lines, so memory is busy in every pass. */
#define TILE(ATTR, NAME, TW, TX, STEP, MASK_T, WV_T, XV_T, LOADW, LOADX, MAC, NW, NR)      \
    ATTR static void tile_##NAME##_##NW##x##NR(                                          \
        const Job *j, const TW *w, const TX *const *xp, int64_t i, int64_t r0, int nw,   \
        int64_t c0, int64_t c1, float *keep, int pass, int passes) {                     \
        const int64_t k = j->k, cv = c0 + ((c1 - c0) / STEP) * STEP;                     \
        const int64_t lines = (k * (int64_t)sizeof(TW) + 63) / 64;                       \
        const int64_t share = (lines + passes - 1) / passes;                             \
        const TW *wp[NW];                                                                \
        for (int a = 0; a < NW; a++) wp[a] = w + (i + (a < nw ? a : nw - 1)) * k;        \
        const char *pf = (const char *)(w + (i + PREFETCH_ROWS < j->n ? i + PREFETCH_ROWS : i) * k); \
        __m512 acc[NW][NR];                                                              \
        for (int a = 0; a < NW; a++)                                                     \
            for (int b = 0; b < NR; b++)                                                 \
                acc[a][b] = c0 == 0 ? _mm512_setzero_ps()                                \
                                    : _mm512_loadu_ps(keep + (a * NR + b) * 16);         \
        int64_t c = c0;                                                                  \
        for (; c < cv; c += STEP) {                                                      \
            const int64_t byte = c * (int64_t)sizeof(TW);                                \
            if (byte % 64 < STEP * (int64_t)sizeof(TW)) { /* a new line of W */          \
                const int64_t l = byte / 64;                                             \
                if (c0 == 0 && c1 == k) {                                                \
                    if (l % passes == 0 && l / passes + pass * share < lines)            \
                        for (int a = 0; a < NW; a++)                                     \
                            _mm_prefetch(pf + a * k * (int64_t)sizeof(TW) +              \
                                             (l / passes + pass * share) * 64,           \
                                         _MM_HINT_T0);                                   \
                } else if (pass == 0) {                                                  \
                    for (int a = 0; a < NW; a++)                                         \
                        _mm_prefetch(pf + a * k * (int64_t)sizeof(TW) + byte, _MM_HINT_T0); \
                }                                                                        \
            }                                                                            \
            WV_T wv[NW];                                                                 \
            XV_T xv[NR];                                                                 \
            for (int a = 0; a < NW; a++) wv[a] = LOADW(wp[a] + c, (MASK_T)~(MASK_T)0);   \
            for (int b = 0; b < NR; b++) xv[b] = LOADX(xp[b] + c, (MASK_T)~(MASK_T)0);   \
            for (int a = 0; a < NW; a++)                                                 \
                for (int b = 0; b < NR; b++) acc[a][b] = MAC(acc[a][b], wv[a], xv[b]);   \
        }                                                                                \
        if (c < c1) {                                                                    \
            const MASK_T m = (MASK_T)((1ull << (c1 - c)) - 1);                           \
            WV_T wv[NW];                                                                 \
            XV_T xv[NR];                                                                 \
            for (int a = 0; a < NW; a++) wv[a] = LOADW(wp[a] + c, m);                    \
            for (int b = 0; b < NR; b++) xv[b] = LOADX(xp[b] + c, m);                    \
            for (int a = 0; a < NW; a++)                                                 \
                for (int b = 0; b < NR; b++) acc[a][b] = MAC(acc[a][b], wv[a], xv[b]);   \
        }                                                                                \
        if (c1 == k) {                                                                   \
            for (int a = 0; a < nw; a++)                                                 \
                for (int b = 0; b < NR; b++)                                             \
                    finish(j, r0 + b, i + a, _mm512_reduce_add_ps(acc[a][b]));           \
        } else {                                                                         \
            for (int a = 0; a < NW; a++)                                                 \
                for (int b = 0; b < NR; b++)                                             \
                    _mm512_storeu_ps(keep + (a * NR + b) * 16, acc[a][b]);               \
        }                                                                                \
    }

/* The tiles 8x1, 4x2, 4x3, 4x4 of one kernel, and its block: weight rows [i0, i1)
 * against every row of x (XS: its rows, at most MAX_ROWS), one tile of weight rows
 * at a time; with more than KB_ROWS rows of x the tile's columns go in blocks of KB
 * that stay in L1 while every pass of XB rows of x meets them, so the weights
 * stream from memory once. */
#define KERNEL(ATTR, NAME, TW, TX, XS, KB, KB_ROWS, STEP, MASK_T, WV_T, XV_T, LOADW, LOADX, MAC) \
    TILE(ATTR, NAME, TW, TX, STEP, MASK_T, WV_T, XV_T, LOADW, LOADX, MAC, 8, 1)           \
    TILE(ATTR, NAME, TW, TX, STEP, MASK_T, WV_T, XV_T, LOADW, LOADX, MAC, 4, 2)           \
    TILE(ATTR, NAME, TW, TX, STEP, MASK_T, WV_T, XV_T, LOADW, LOADX, MAC, 4, 3)           \
    TILE(ATTR, NAME, TW, TX, STEP, MASK_T, WV_T, XV_T, LOADW, LOADX, MAC, 4, 4)           \
    ATTR static void block_##NAME(const Job *j, int64_t i0, int64_t i1) {                \
        const int64_t k = j->k, kb = j->rows <= KB_ROWS ? k : KB;                        \
        const int passes = (int)((j->rows + XB - 1) / XB);                               \
        const TW *w = (const TW *)j->w;                                                  \
        float keep[MAX_ROWS * WB * 16] __attribute__((aligned(64)));                     \
        const TX *xp[MAX_ROWS];                                                          \
        for (int64_t r = 0; r < j->rows; r++) xp[r] = (const TX *)(XS) + r * k;          \
        for (int64_t r = j->rows; r < passes * XB; r++) xp[r] = xp[j->rows - 1];         \
        const int step = j->rows == 1 ? 8 : 4;                                           \
        for (int64_t i = i0; i < i1; i += step) {                                        \
            const int nw = i1 - i < step ? (int)(i1 - i) : step;                         \
            for (int64_t c0 = 0; c0 < k; c0 += kb) {                                     \
                const int64_t c1 = c0 + kb < k ? c0 + kb : k;                            \
                for (int64_t r0 = 0; r0 < j->rows; r0 += XB) {                           \
                    const int nr = j->rows - r0 < XB ? (int)(j->rows - r0) : XB;         \
                    const int pass = (int)(r0 / XB);                                     \
                    float *kp = keep + r0 * WB * 16;                                     \
                    if (nr == 1)                                                         \
                        tile_##NAME##_8x1(j, w, xp + r0, i, r0, nw, c0, c1, kp, pass, passes); \
                    else if (nr == 2)                                                    \
                        tile_##NAME##_4x2(j, w, xp + r0, i, r0, nw, c0, c1, kp, pass, passes); \
                    else if (nr == 3)                                                    \
                        tile_##NAME##_4x3(j, w, xp + r0, i, r0, nw, c0, c1, kp, pass, passes); \
                    else                                                                 \
                        tile_##NAME##_4x4(j, w, xp + r0, i, r0, nw, c0, c1, kp, pass, passes); \
                }                                                                        \
            }                                                                            \
        }                                                                                \
    }

/* AVX-512F: W widened to float32, float32 x (j->xf), 16 columns per vector. */
#define F32_KERNEL(NAME, TW, LOADW)                                                      \
    KERNEL(AVX512, NAME, TW, float, j->xf, KB_F32, XB, 16, __mmask16, __m512, __m512,    \
           LOADW, load16_f32, FMA_F32)
F32_KERNEL(avx512_i8, int8_t, load16_i8)
F32_KERNEL(avx512_f32, float, load16_f32)
F32_KERNEL(avx512_bf16, uint16_t, load16_bf16)
/* AVX-512 BF16: bfloat16 x and W, VDPBF16PS, 32 columns per vector. */
KERNEL(AVX512BF16, avx512bf16, uint16_t, uint16_t, j->x, KB_BF16, 2 * XB, 32, __mmask32,
       __m512i, __m512i, load32_raw16, load32_raw16, DP_BF16)

/* ---- dispatch ------------------------------------------------------------------ */

enum { ISA_C, ISA_AVX2, ISA_AVX512, ISA_AVX512BF16 };
static const char *ISA_NAMES[] = {"c", "avx2", "avx512", "avx512bf16"};
static int g_isa = ISA_C;    /* the best this CPU has */
static int g_force = -1;     /* set_isa(): tests run every path this CPU can */

static int detect_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
        if (__builtin_cpu_supports("avx512bf16")) return ISA_AVX512BF16;
        return ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_C;
}

static void run_block(const Job *j, int isa, int kind, int64_t i0, int64_t i1) {
    if (isa == ISA_AVX512BF16 && kind == KIND_BF16)
        block_avx512bf16(j, i0, i1);
    else if (isa >= ISA_AVX512 && kind == KIND_INT8)
        block_avx512_i8(j, i0, i1);
    else if (isa >= ISA_AVX512 && kind == KIND_F32)
        block_avx512_f32(j, i0, i1);
    else if (isa >= ISA_AVX512)
        block_avx512_bf16(j, i0, i1);
    else if (isa == ISA_AVX2)
        block_avx2(j, i0, i1, kind);
    else
        block_c(j, i0, i1, kind);
}

/* 0, or -1 when memory for the widened x could not be allocated. */
static int run(Job *j, int kind, int threads) {
    const int isa = g_force >= 0 ? g_force : g_isa;
    float *xf = NULL;
    if (kind != KIND_BF16) {
        j->xf = (const float *)j->x;
    } else if (isa != ISA_AVX512BF16) { /* widen bfloat16 x once per call */
        xf = (float *)malloc((size_t)(j->rows * j->k) * sizeof(float));
        if (xf == NULL) return -1;
        for (int64_t t = 0; t < j->rows * j->k; t++)
            xf[t] = bf16_to_f32(((const uint16_t *)j->x)[t]);
        j->xf = xf;
    }
    const int64_t chunks = (j->n + CHUNK - 1) / CHUNK;
    if (threads > chunks) threads = (int)chunks; /* no idle threads started */
    if (threads <= 1 || chunks < 2) {
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t i0 = c * CHUNK, i1 = i0 + CHUNK < j->n ? i0 + CHUNK : j->n;
            run_block(j, isa, kind, i0, i1);
        }
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t i0 = c * CHUNK, i1 = i0 + CHUNK < j->n ? i0 + CHUNK : j->n;
            run_block(j, isa, kind, i0, i1);
        }
    }
    free(xf);
    return 0;
}

/* ---- Python ------------------------------------------------------------------- */

static PyObject *py_linear(PyObject *args, int kind) {
    unsigned long long y, x, w, scale, bias;
    long long rows, n, k;
    int out_bf16, bias_bf16, threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLiii", &y, &x, &w, &scale, &bias, &rows, &n, &k,
                          &out_bf16, &bias_bf16, &threads))
        return NULL;
    if (rows < 0 || n < 0 || k < 0 || rows > MAX_ROWS) {
        PyErr_SetString(PyExc_ValueError, "sizes out of range (rows: 0..64)");
        return NULL;
    }
    Job j = {(const void *)(uintptr_t)x, NULL, (const void *)(uintptr_t)w,
             (const float *)(uintptr_t)scale, (const void *)(uintptr_t)bias, bias_bf16,
             (void *)(uintptr_t)y, out_bf16, rows, n, k};
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = run(&j, kind, threads);
    Py_END_ALLOW_THREADS if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *linear_bf16(PyObject *self, PyObject *args) {
    return py_linear(args, KIND_BF16);
}
static PyObject *linear_int8(PyObject *self, PyObject *args) {
    return py_linear(args, KIND_INT8);
}
static PyObject *linear_f32(PyObject *self, PyObject *args) { return py_linear(args, KIND_F32); }

static PyObject *isa(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(ISA_NAMES[g_force >= 0 ? g_force : g_isa]);
}

static PyObject *isas(PyObject *self, PyObject *args) { /* every path this CPU runs */
    PyObject *out = PyList_New(0);
    for (int i = 0; i <= g_isa; i++) {
        PyObject *s = PyUnicode_FromString(ISA_NAMES[i]);
        PyList_Append(out, s);
        Py_DECREF(s);
    }
    return out;
}

static PyObject *set_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "z", &name)) return NULL;
    if (name == NULL) {
        g_force = -1;
        Py_RETURN_NONE;
    }
    for (int i = 0; i <= g_isa; i++)
        if (strcmp(name, ISA_NAMES[i]) == 0) {
            g_force = i;
            Py_RETURN_NONE;
        }
    for (int i = g_isa + 1; i < (int)(sizeof(ISA_NAMES) / sizeof(*ISA_NAMES)); i++)
        if (strcmp(name, ISA_NAMES[i]) == 0) {
            PyErr_Format(PyExc_ValueError, "instruction set %s is not available on this CPU",
                         name);
            return NULL;
        }
    PyErr_Format(PyExc_ValueError, "unknown instruction set %s (c, avx2, avx512, avx512bf16)",
                 name);
    return NULL;
}

static PyMethodDef METHODS[] = {
    {"linear_bf16", linear_bf16, METH_VARARGS,
     "linear_bf16(y, x, w, 0, bias, rows, n, k, out_bf16, bias_bf16, threads)"},
    {"linear_int8", linear_int8, METH_VARARGS,
     "linear_int8(y, x, q, scale, bias, rows, n, k, out_bf16, bias_bf16, threads)"},
    {"linear_f32", linear_f32, METH_VARARGS,
     "linear_f32(y, x, w, 0, bias, rows, n, k, 0, 0, threads)"},
    {"isa", isa, METH_NOARGS, "the instruction set the kernels use"},
    {"isas", isas, METH_NOARGS, "every instruction set this CPU can run"},
    {"set_isa", set_isa, METH_VARARGS, "force an instruction set (None: the best)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__native(void) {
    g_isa = detect_isa();
    return PyModule_Create(&MODULE);
}
