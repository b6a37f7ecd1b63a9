/* One-row (up to 4 rows) matrix-vector products for CPU decoding, AVX2 + FMA.

   Decoding reads every weight once per token for one activation row, so a step's time is the
   weight bytes over memory bandwidth. On a 2-core AVX2 CPU torch's bf16 GEMV streams weights
   at 10-15 GB/s and its int8 kernel at 8-12 GB/s against ~24 GB/s the memory gives; these loops
   reach 16-20 GB/s. What makes the difference:
   - one weight row at a time, read front to back in 64-byte steps, with a software prefetch
     PREFETCH bytes ahead: one sequential stream per core keeps the memory busy;
   - bf16 weights widen to fp32 with a shift (bf16 is the top half of an fp32);
   - int8 weights multiply int16-rounded activations with madd (16 products an instruction,
     exact in int32), because widening int8 all the way to fp32 costs more instructions than
     the memory leaves time for. Each activation row is rounded to int16 with its own scale
     (relative error <= 2^-16 of its largest entry, far below the weights' int8 rounding).
   Sums are fp32 (int32 within blocks of INT_BLOCK columns for int8); the output is rounded to
   bf16 (round to nearest even) after the bias is added.

   Rows of the output are split across `threads` OpenMP threads. Loaded after torch, the library
   shares torch's OpenMP runtime (same SONAME), so there is one thread pool, not two. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 4
#define PREFETCH 1024
#define INT_BLOCK 1024 /* int8 x int16 sums per int32 lane stay below 2^31 over this many columns */

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m256 widen_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256i widen_int8(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}

static inline void store_row(uint16_t *y, int n, int rows, const float *sums, const uint16_t *bias) {
    float b = bias ? bf16_to_float(bias[0]) : 0.0f;
    for (int r = 0; r < rows; r++) y[(long)r * n] = float_to_bf16(sums[r] + b);
}

/* ---- bf16 weights ------------------------------------------------------------------------ */

/* sums[r] = w . x[r] for one weight row; x fp32 [R][k]. R is a constant where it is inlined. */
static inline __attribute__((always_inline)) void dot_bf16(const uint16_t *w, const float *x, int R, int k,
                                                           float *sums) {
    __m256 acc[MAX_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        _mm_prefetch((const char *)(w + i) + PREFETCH, _MM_HINT_T0);
        __m256 w0 = widen_bf16(w + i), w1 = widen_bf16(w + i + 8);
        __m256 w2 = widen_bf16(w + i + 16), w3 = widen_bf16(w + i + 24);
        for (int r = 0; r < R; r++) {
            const float *xr = x + (long)r * k + i;
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        for (int j = i; j < k; j++) s += bf16_to_float(w[j]) * x[(long)r * k + j];
        sums[r] = s;
    }
}

#define BF16_ROWS(R)                                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                  \
    for (int j = 0; j < n; j++) {                                                      \
        float sums[MAX_ROWS];                                                          \
        dot_bf16(w + (long)j * k, xf, R, k, sums);                                     \
        store_row(y + j, n, R, sums, bias ? bias + j : NULL);                          \
    }

/* y [rows, n] = x [rows, k] @ w [n, k].T (+ bias [n]); all bf16, rows <= MAX_ROWS. */
int lfm_gemv_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y, int rows, int n,
                  int k, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    float *xf = malloc(sizeof(float) * (size_t)rows * k);
    if (!xf) return -2;
    for (long i = 0; i < (long)rows * k; i++) xf[i] = bf16_to_float(x[i]);
    switch (rows) {
    case 1: BF16_ROWS(1) break;
    case 2: BF16_ROWS(2) break;
    case 3: BF16_ROWS(3) break;
    default: BF16_ROWS(4) break;
    }
    free(xf);
    return 0;
}

/* ---- int8 weights, one scale per weight row ----------------------------------------------- */

static inline __attribute__((always_inline)) void dot_int8(const int8_t *w, const int16_t *x, int R, int k,
                                                           float *sums) {
    __m256 total[MAX_ROWS];
    for (int r = 0; r < R; r++) total[r] = _mm256_setzero_ps();
    int i = 0;
    while (i + 64 <= k) {
        __m256i acc[MAX_ROWS][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        int end = i + INT_BLOCK < k ? i + INT_BLOCK : k;
        for (; i + 64 <= end; i += 64) {
            _mm_prefetch((const char *)(w + i) + PREFETCH, _MM_HINT_T0);
            __m256i w0 = widen_int8(w + i), w1 = widen_int8(w + i + 16);
            __m256i w2 = widen_int8(w + i + 32), w3 = widen_int8(w + i + 48);
            for (int r = 0; r < R; r++) {
                const __m256i *xr = (const __m256i *)(x + (long)r * k + i);
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, _mm256_loadu_si256(xr)));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, _mm256_loadu_si256(xr + 1)));
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w2, _mm256_loadu_si256(xr + 2)));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w3, _mm256_loadu_si256(xr + 3)));
            }
        }
        for (int r = 0; r < R; r++)
            total[r] = _mm256_add_ps(total[r], _mm256_cvtepi32_ps(_mm256_add_epi32(acc[r][0], acc[r][1])));
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(total[r]);
        for (int j = i; j < k; j++) s += (float)w[j] * (float)x[(long)r * k + j];
        sums[r] = s;
    }
}

#define INT8_ROWS(R)                                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                  \
    for (int j = 0; j < n; j++) {                                                      \
        float sums[MAX_ROWS];                                                          \
        dot_int8(w + (long)j * k, xq, R, k, sums);                                     \
        for (int r = 0; r < R; r++) sums[r] *= scales[j] * xscale[r];                 \
        store_row(y + j, n, R, sums, bias ? bias + j : NULL);                          \
    }

/* y [rows, n] = x [rows, k] @ (w [n, k] * scales[:, None]).T (+ bias [n]); x, bias, y bf16,
   w int8, scales fp32. A row of x that is not finite gives a row of NaN. */
int lfm_gemv_int8(const int8_t *w, const float *scales, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                  int rows, int n, int k, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)rows * k);
    if (!xq) return -2;
    float xscale[MAX_ROWS];
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + (long)r * k;
        float amax = 0.0f;
        for (int i = 0; i < k; i++) amax = fmaxf(amax, fabsf(bf16_to_float(xr[i])));
        int finite = 1;
        for (int i = 0; i < k && finite; i++) finite = isfinite(bf16_to_float(xr[i]));
        xscale[r] = finite ? (amax > 0.0f ? amax / 32767.0f : 1.0f) : NAN;
        float inv = finite && amax > 0.0f ? 32767.0f / amax : 0.0f;
        for (int i = 0; i < k; i++) xq[(long)r * k + i] = (int16_t)lrintf(bf16_to_float(xr[i]) * inv);
    }
    switch (rows) {
    case 1: INT8_ROWS(1) break;
    case 2: INT8_ROWS(2) break;
    case 3: INT8_ROWS(3) break;
    default: INT8_ROWS(4) break;
    }
    free(xq);
    return 0;
}
