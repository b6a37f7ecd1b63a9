/* CPU kernels, AVX2 + FMA: one-row (up to 4 rows) matrix-vector products, the depthformer's
   codebook step and the backbone's one-position step built on them, and a GEMM for more rows
   (prefill, serving batches; see its section).

   Decoding reads every weight once per token for one activation row, so a step's time is the
   weight bytes over memory bandwidth. On a 2-core AVX2 CPU torch's bf16 GEMV streams weights
   at 9-14 GB/s and its int8 kernel at 5-12 GB/s, where a plain read of the memory gets 17-29
   (it varies with the other tenants); these loops reach 12-18 GB/s (bench/cpu_kernels.py).
   What makes the difference:
   - one weight row at a time, read front to back in 64-byte steps, with a software prefetch
     PREFETCH bytes ahead: one sequential stream per core keeps the memory busy;
   - bf16 weights widen to fp32 with a shift (bf16 is the top half of an fp32);
   - int8 weights multiply int16-rounded activations with madd (16 products an instruction,
     exact in int32), because widening int8 all the way to fp32 costs more instructions than
     the memory leaves time for. Each activation row is rounded to int16 with its own scale
     (relative error <= 2^-16 of its largest entry, far below the weights' int8 rounding).
   Sums are fp32 (int32 within blocks of INT_BLOCK columns for int8).

   The depthformer step (lfm_depth_step) runs every layer of one codebook step and that
   codebook's head in one call: 48 layer steps a frame at official size, each ~40 small torch
   ops (norms, rotary, attention over <= 8 slots, residuals) that cost more in dispatch than
   in arithmetic. The backbone step (lfm_backbone_step) does the same for one new position of
   every layer: ~25 ops a layer, 16 layers. Both round to bf16 where the torch engine's bf16
   tensors do, so the two agree to the order of fp32 sums.

   Rows of each product are split across `threads` OpenMP threads. Loaded after torch, the
   library shares torch's OpenMP runtime (same SONAME), so there is one thread pool, not two. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 4
#ifndef PREFETCH
#define PREFETCH 1024
#endif
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

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

static inline __m256 widen_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256i widen_int8(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}

/* ---- matrix-vector products ----------------------------------------------------------------- */

typedef struct {
    const void *weight;   /* bf16 [n, k], or int8 [n, k] when scales is set */
    const float *scales;  /* int8: one per weight row; NULL for bf16 */
    int n, k;
} Linear;

/* sums[r] = w . x[r] for one bf16 weight row; x fp32 [R][k]. R is a constant where inlined. */
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

/* The same for an int8 weight row and int16 activations. */
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

#define BF16_ROWS(R)                                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                  \
    for (int j = 0; j < n; j++) {                                                      \
        float sums[MAX_ROWS];                                                          \
        dot_bf16((const uint16_t *)L->weight + (long)j * k, x, R, k, sums);            \
        for (int r = 0; r < R; r++) y[(long)r * n + j] = sums[r];                     \
    }

#define INT8_ROWS(R)                                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                  \
    for (int j = 0; j < n; j++) {                                                      \
        float sums[MAX_ROWS];                                                          \
        dot_int8((const int8_t *)L->weight + (long)j * k, xq, R, k, sums);             \
        for (int r = 0; r < R; r++) y[(long)r * n + j] = sums[r] * L->scales[j] * xscale[r]; \
    }

/* y [rows, n] = x [rows, k] @ W.T in fp32 (not rounded); rows <= MAX_ROWS. 0, or -2 when out of
   memory. An int8 product of a row that is not finite is a row of NaN. */
static int matvec(const Linear *L, const float *x, int rows, float *y, int threads) {
    int n = L->n, k = L->k;
    if (!L->scales) {
        switch (rows) {
        case 1: BF16_ROWS(1) break;
        case 2: BF16_ROWS(2) break;
        case 3: BF16_ROWS(3) break;
        default: BF16_ROWS(4) break;
        }
        return 0;
    }
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)rows * k);
    if (!xq) return -2;
    float xscale[MAX_ROWS];
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * k;
        float amax = 0.0f;
        int finite = 1;
        for (int i = 0; i < k; i++) {
            amax = fmaxf(amax, fabsf(xr[i]));
            finite &= isfinite(xr[i]) != 0;
        }
        xscale[r] = finite ? (amax > 0.0f ? amax / 32767.0f : 1.0f) : NAN;
        float inv = finite && amax > 0.0f ? 32767.0f / amax : 0.0f;
        for (int i = 0; i < k; i++) xq[(long)r * k + i] = (int16_t)lrintf(xr[i] * inv);
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

/* y [rows, n] = x [rows, k] @ W.T (+ bias [n]), x, bias and y bf16: the product in fp32, the
   bias added, one rounding. scales NULL: bf16 weight; else int8 weight and fp32 row scales.
   0 on success, -1 for a bad row count, -2 when out of memory. */
int lfm_linear(const void *weight, const float *scales, const uint16_t *x, const uint16_t *bias, uint16_t *y,
               int rows, int n, int k, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    Linear L = {weight, scales, n, k};
    float *xf = malloc(sizeof(float) * (size_t)rows * k);
    float *yf = malloc(sizeof(float) * (size_t)rows * n);
    int rc = xf && yf ? 0 : -2;
    if (!rc) {
        for (long i = 0; i < (long)rows * k; i++) xf[i] = bf16_to_float(x[i]);
        rc = matvec(&L, xf, rows, yf, threads);
    }
    if (!rc)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < n; j++)
                y[(long)r * n + j] = float_to_bf16(yf[(long)r * n + j] + (bias ? bf16_to_float(bias[j]) : 0.0f));
    free(xf);
    free(yf);
    return rc;
}

/* ---- many-row products (prefill) ------------------------------------------------------------- */

/* Prefill multiplies tens of rows by each weight: compute-bound, not memory-bound. Without bf16
   arithmetic torch converts the whole weight to fp32 into a buffer and runs oneDNN's fp32 GEMM,
   an extra pass over memory, and its bf16 fallback for fewer rows is slower still. Two kernels,
   both widening the weights to fp32 a few rows at a time, both with fp32 sums rounded once:

   - Few rows (a serving batch, fewer than OP_MIN_ROWS): a thread widens GEMM_PANEL weight rows
     into an fp32 panel, then multiplies every activation row by it in tiles of GEMM_MR rows x
     GEMM_NR panel rows: 8-wide fp32 dot products over the whole row, each sum reduced once.
     The panel is used by only a few tiles, so it is widened whole and read from L2.
   - More rows (prefill): outer products. The activations are transposed once ([k][16] for
     each tile of 16 rows: one contiguous stream per tile) and taken in blocks of OP_KC
     columns that stay in L2; a thread widens OP_NR weight rows of a block into a panel that
     stays in L1, and each tile of 16 activation rows x OP_NR weight rows adds, per column, two
     activation vectors times six broadcast weights into twelve accumulators. Per 12 FMAs it
     loads 64 bytes from L2, against 224 for the dot-product tile, whose loads from L2 held it
     to ~60% of the FMA peak (this one alone: 88% of a core's). Partial sums live in a chunk of
     OP_NC weight rows x rows (L2) between column blocks; chunks go to the threads one at a
     time.

   Int8 weights widen the same way; the row scale multiplies the finished sum. */

#define GEMM_MR 3
#define GEMM_NR 4
#define GEMM_PANEL 8 /* weight rows widened at a time: two groups of GEMM_NR */
#define OP_MIN_ROWS 16 /* from here on the outer-product tiles */
#define OP_MAX_ROWS 128 /* activation rows at a time: their block of OP_KC columns stays in L2 */
#define OP_NR 6         /* weight rows a tile: each broadcast against 16 activation rows */
#define OP_KC 512       /* columns a block: the block's activations stay in L2, a panel in L1 */
#define OP_NC 96        /* weight rows a chunk: the chunk's partial sums stay in L2 */

/* What a tile's sums are for: the weight rows' scales (int8) and bias (bf16), either NULL. */
typedef struct {
    const float *scales;
    const uint16_t *bias;
} Epilogue;

/* Output column c's finished sum, scaled, biased and rounded to bf16. */
static inline uint16_t epilogue(float sum, Epilogue e, long c) {
    return float_to_bf16((e.scales ? sum * e.scales[c] : sum) + (e.bias ? bf16_to_float(e.bias[c]) : 0.0f));
}

/* The sums of a tile, scaled, biased and rounded into y [rows, n] bf16. */
static inline __attribute__((always_inline)) void gemm_store(const __m256 *acc, Epilogue e, uint16_t *y, int R,
                                                             int C, int n) {
    for (int r = 0; r < R; r++) {
        const __m256 *a = acc + r * GEMM_NR;
        uint16_t *yr = y + (long)r * n;
        if (C == 4) { /* the four sums at once: three horizontal adds and one of the two halves */
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            if (e.scales) s = _mm_mul_ps(s, _mm_loadu_ps(e.scales));
            if (e.bias)
                s = _mm_add_ps(s, _mm_castsi128_ps(_mm_slli_epi32(
                                      _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)e.bias)), 16)));
            float v[4];
            _mm_storeu_ps(v, s);
            for (int c = 0; c < 4; c++) yr[c] = float_to_bf16(v[c]);
            continue;
        }
        for (int c = 0; c < C; c++) yr[c] = epilogue(hsum(a[c]), e, c);
    }
}

/* Any R x C tile (the edges): R activation rows from x against C panel rows, rows of k floats. */
static inline __attribute__((always_inline)) void gemm_tile(const float *panel, Epilogue e, const float *x,
                                                            uint16_t *y, int R, int C, int n, int k) {
    __m256 acc[GEMM_MR * GEMM_NR];
    for (int j = 0; j < GEMM_MR * GEMM_NR; j++) acc[j] = _mm256_setzero_ps();
    for (long i = 0; i < k; i += 8)
        for (int c = 0; c < C; c++) {
            __m256 wv = _mm256_loadu_ps(panel + (long)c * k + i);
            for (int r = 0; r < R; r++)
                acc[r * GEMM_NR + c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (long)r * k + i), acc[r * GEMM_NR + c]);
        }
    gemm_store(acc, e, y, R, C, n);
}

/* A full 3 x 4 tile as one asm loop, because compilers spill here: it needs all 16 vector
   registers (the accumulator of activation row r and panel row c in ymm(4 r + c), the 3
   activation vectors in ymm12-14, one panel vector in ymm15). Panel rows 0-3 are at p0, p1,
   p0 + 2 ws and p1 + 2 ws (ws: bytes per panel row), activation rows 0-2 at q, q + xs and
   q + 2 xs. */
#define X3 "vmovups (%[q]), %%ymm12\n\t" "vmovups (%[q],%[xs]), %%ymm13\n\t" "vmovups (%[q],%[xs],2), %%ymm14\n\t"
#define FMA3(at, r0, r1, r2) "vmovups " at ", %%ymm15\n\t" "vfmadd231ps %%ymm15, %%ymm12, %%ymm" r0 "\n\t" \
    "vfmadd231ps %%ymm15, %%ymm13, %%ymm" r1 "\n\t" "vfmadd231ps %%ymm15, %%ymm14, %%ymm" r2 "\n\t"
#define ZERO12 "vxorps %%xmm0, %%xmm0, %%xmm0\n\t" "vxorps %%xmm1, %%xmm1, %%xmm1\n\t" \
    "vxorps %%xmm2, %%xmm2, %%xmm2\n\t" "vxorps %%xmm3, %%xmm3, %%xmm3\n\t" "vxorps %%xmm4, %%xmm4, %%xmm4\n\t" \
    "vxorps %%xmm5, %%xmm5, %%xmm5\n\t" "vxorps %%xmm6, %%xmm6, %%xmm6\n\t" "vxorps %%xmm7, %%xmm7, %%xmm7\n\t" \
    "vxorps %%xmm8, %%xmm8, %%xmm8\n\t" "vxorps %%xmm9, %%xmm9, %%xmm9\n\t" "vxorps %%xmm10, %%xmm10, %%xmm10\n\t" \
    "vxorps %%xmm11, %%xmm11, %%xmm11\n\t"
#define STORE12 "vmovups %%ymm0, (%[acc])\n\t" "vmovups %%ymm1, 32(%[acc])\n\t" "vmovups %%ymm2, 64(%[acc])\n\t" \
    "vmovups %%ymm3, 96(%[acc])\n\t" "vmovups %%ymm4, 128(%[acc])\n\t" "vmovups %%ymm5, 160(%[acc])\n\t"   \
    "vmovups %%ymm6, 192(%[acc])\n\t" "vmovups %%ymm7, 224(%[acc])\n\t" "vmovups %%ymm8, 256(%[acc])\n\t" \
    "vmovups %%ymm9, 288(%[acc])\n\t" "vmovups %%ymm10, 320(%[acc])\n\t" "vmovups %%ymm11, 352(%[acc])\n\t"

static inline __attribute__((always_inline)) void gemm_tile34(const float *panel, Epilogue e, const float *x,
                                                              uint16_t *y, int n, int k) {
    long ws = 4L * k, xs = 4L * k, count = k / 8;
    const float *p0 = panel, *p1 = panel + k, *q = x;
    __m256 acc[GEMM_MR * GEMM_NR];
    __asm__ volatile(ZERO12 "1:\n\t" X3 FMA3("(%[p0])", "0", "4", "8") FMA3("(%[p1])", "1", "5", "9")
                     FMA3("(%[p0],%[ws],2)", "2", "6", "10") FMA3("(%[p1],%[ws],2)", "3", "7", "11")
                     "add $32, %[p0]\n\t" "add $32, %[p1]\n\t" "add $32, %[q]\n\t" "dec %[count]\n\t" "jnz 1b\n\t"
                     STORE12
                     : [p0] "+r"(p0), [p1] "+r"(p1), [q] "+r"(q), [count] "+r"(count)
                     : [ws] "r"(ws), [xs] "r"(xs), [acc] "r"(acc)
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                       "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
    gemm_store(acc, e, y, GEMM_MR, GEMM_NR, n);
}

/* out [count] fp32 = weight values [at, at + count) widened (bf16, or int8 unscaled); count a
   multiple of 8. */
static void widen_row(const void *weight, int int8, long at, int count, float *out) {
    if (int8)
        for (int i = 0; i < count; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                          _mm_loadl_epi64((const __m128i *)((const int8_t *)weight + at + i)))));
    else
        for (int i = 0; i < count; i += 8) _mm256_storeu_ps(out + i, widen_bf16((const uint16_t *)weight + at + i));
}

/* The cache lines of `rows` runs of `bytes` weight bytes, `stride` bytes apart, fetched a few
   at a time (`row`, `line`: where the next one is). */
typedef struct {
    const char *at;
    long stride, bytes;
    int rows, row;
    long line;
} Prefetch;

static inline long prefetch_lines(const Prefetch *p) { return p->rows * ((p->bytes + 63) / 64); }

static inline void prefetch_some(Prefetch *p, long count) {
    for (; count > 0 && p->row < p->rows; count--) {
        _mm_prefetch(p->at + p->stride * p->row + 64 * p->line, _MM_HINT_T0);
        if (64 * ++p->line >= p->bytes) p->line = 0, p->row++;
    }
}

/* One tile of R activation rows against panel rows [c0, c0 + C) (C <= GEMM_NR). */
static inline __attribute__((always_inline)) void gemm_group(const float *panel, Epilogue e, const float *x,
                                                             uint16_t *yr, int R, int c0, int C, int n, int k) {
    const float *pg = panel + (long)c0 * k;
    Epilogue eg = {e.scales ? e.scales + c0 : NULL, e.bias ? e.bias + c0 : NULL};
    yr += c0;
    if (R == GEMM_MR && C == GEMM_NR)
        gemm_tile34(pg, eg, x, yr, n, k);
    else if (C == GEMM_NR) /* constant shapes unroll; only the last panel may be narrower */
        gemm_tile(pg, eg, x, yr, R, GEMM_NR, n, k);
    else
        gemm_tile(pg, eg, x, yr, R, C, n, k);
}

/* y's columns [0, C) of every row, from one panel of C <= GEMM_PANEL weight rows. A row tile's
   activations meet each group of GEMM_NR panel rows in turn, so the second group finds them
   in L1 where they fit (rows of up to ~2,000 columns). Meanwhile `next` (the next panel's
   weights) is fetched a few lines a tile: all at once they would overrun the core's
   outstanding misses. */
static void gemm_columns(const float *panel, Epilogue e, const float *xf, uint16_t *y, int m, int C, int n, int k,
                         Prefetch next) {
    int tiles = (m + GEMM_MR - 1) / GEMM_MR;
    long per_tile = (prefetch_lines(&next) + tiles - 1) / tiles;
    for (int r0 = 0; r0 < m; r0 += GEMM_MR) {
        prefetch_some(&next, per_tile);
        const float *x = xf + (long)r0 * k;
        uint16_t *yr = y + (long)r0 * n;
        for (int c0 = 0; c0 < C; c0 += GEMM_NR) {
            int Cg = C - c0 < GEMM_NR ? C - c0 : GEMM_NR;
            switch (m - r0) { /* 1-2 rows left at the end: 1 or 2 x 4 tiles fit the registers as compiled */
            case 1: gemm_group(panel, e, x, yr, 1, c0, Cg, n, k); break;
            case 2: gemm_group(panel, e, x, yr, 2, c0, Cg, n, k); break;
            default: gemm_group(panel, e, x, yr, GEMM_MR, c0, Cg, n, k); break;
            }
        }
    }
}

/* y [rows, n] = x [rows, k] @ W.T for fewer than OP_MIN_ROWS rows: the dot-product tiles. */
static int gemm_rows(const void *weight, const float *scales, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                     int rows, int n, int k, int threads) {
    int int8 = scales != NULL, failed = 0, panels = (n + GEMM_PANEL - 1) / GEMM_PANEL;
    long wsize = int8 ? 1 : 2;
    float *xf = malloc(sizeof(float) * (size_t)rows * k);
    if (!xf) return -2;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#pragma omp for schedule(static)
        for (long i = 0; i < (long)rows * k; i += 8) _mm256_storeu_ps(xf + i, widen_bf16(x + i));
        float *panel = aligned_alloc(64, sizeof(float) * GEMM_PANEL * k);
        failed = panel == NULL;
#pragma omp for schedule(dynamic, 8) /* runs of 8 panels: the prefetch of the next one mostly hits */
        for (int b = 0; b < panels; b++) {
            if (!panel) continue;
            int j = b * GEMM_PANEL, C = n - j < GEMM_PANEL ? n - j : GEMM_PANEL;
            int after = n - j - C < GEMM_PANEL ? n - j - C : GEMM_PANEL;
            for (int c = 0; c < C; c++) widen_row(weight, int8, (long)(j + c) * k, k, panel + (long)c * k);
            Prefetch next = {(const char *)weight + (long)(j + C) * k * wsize, 0, (long)after * k * wsize, 1, 0, 0};
            Epilogue e = {scales ? scales + j : NULL, bias ? bias + j : NULL};
            gemm_columns(panel, e, xf, y + j, rows, C, n, k, next);
        }
        free(panel);
    }
    free(xf);
    return failed ? -2 : 0;
}

/* The 16 x 6 outer-product tile as one asm loop (compilers spill its 12 accumulators): for
   each of kc columns, activations xt[i][0..16) (16 floats a column) in ymm12-13 times each panel row's weight
   (broadcast into ymm14 or ymm15) into the sums yt[j][0..16), j < 6, kept in ymm(2 j) and
   ymm(2 j + 1) and loaded from / stored back to yt (rows mp floats apart). Panel rows 0-5 are
   at p, p + ps, p + 2 ps, p3, p3 + ps, p3 + 2 ps. */
#define OP_BCAST(at, b, c0, c1) "vbroadcastss " at ", %%ymm" b "\n\t" \
    "vfmadd231ps %%ymm12, %%ymm" b ", %%ymm" c0 "\n\t" "vfmadd231ps %%ymm13, %%ymm" b ", %%ymm" c1 "\n\t"
static inline void op_tile16(const float *xt, long mp, const float *panel, int kc, float *yt) {
    long cs = 4 * mp, ps = 4L * kc, count = kc;
    float *c = yt, *c3 = yt + 3 * mp;
    const float *p = panel, *p3 = panel + 3L * kc, *x = xt;
    __asm__ volatile("vmovups (%[c]), %%ymm0\n\t" "vmovups 32(%[c]), %%ymm1\n\t"
                     "vmovups (%[c],%[cs]), %%ymm2\n\t" "vmovups 32(%[c],%[cs]), %%ymm3\n\t"
                     "vmovups (%[c],%[cs],2), %%ymm4\n\t" "vmovups 32(%[c],%[cs],2), %%ymm5\n\t"
                     "vmovups (%[c3]), %%ymm6\n\t" "vmovups 32(%[c3]), %%ymm7\n\t"
                     "vmovups (%[c3],%[cs]), %%ymm8\n\t" "vmovups 32(%[c3],%[cs]), %%ymm9\n\t"
                     "vmovups (%[c3],%[cs],2), %%ymm10\n\t" "vmovups 32(%[c3],%[cs],2), %%ymm11\n\t"
                     "1:\n\t"
                     "vmovups (%[x]), %%ymm12\n\t" "vmovups 32(%[x]), %%ymm13\n\t"
                     OP_BCAST("(%[p])", "14", "0", "1") OP_BCAST("(%[p],%[ps])", "15", "2", "3")
                     OP_BCAST("(%[p],%[ps],2)", "14", "4", "5") OP_BCAST("(%[p3])", "15", "6", "7")
                     OP_BCAST("(%[p3],%[ps])", "14", "8", "9") OP_BCAST("(%[p3],%[ps],2)", "15", "10", "11")
                     "add $4, %[p]\n\t" "add $4, %[p3]\n\t" "add $64, %[x]\n\t" "dec %[count]\n\t" "jnz 1b\n\t"
                     "vmovups %%ymm0, (%[c])\n\t" "vmovups %%ymm1, 32(%[c])\n\t"
                     "vmovups %%ymm2, (%[c],%[cs])\n\t" "vmovups %%ymm3, 32(%[c],%[cs])\n\t"
                     "vmovups %%ymm4, (%[c],%[cs],2)\n\t" "vmovups %%ymm5, 32(%[c],%[cs],2)\n\t"
                     "vmovups %%ymm6, (%[c3])\n\t" "vmovups %%ymm7, 32(%[c3])\n\t"
                     "vmovups %%ymm8, (%[c3],%[cs])\n\t" "vmovups %%ymm9, 32(%[c3],%[cs])\n\t"
                     "vmovups %%ymm10, (%[c3],%[cs],2)\n\t" "vmovups %%ymm11, 32(%[c3],%[cs],2)\n\t"
                     : [p] "+r"(p), [p3] "+r"(p3), [x] "+r"(x), [count] "+r"(count)
                     : [ps] "r"(ps), [c] "r"(c), [c3] "r"(c3), [cs] "r"(cs)
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                       "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}

/* The 8 x 6 tile, for a last 8 rows (rows are padded to a multiple of 8): xt [kc][8]. */
static inline void op_tile8(const float *xt, long mp, const float *panel, int kc, float *yt) {
    __m256 acc[OP_NR];
    for (int j = 0; j < OP_NR; j++) acc[j] = _mm256_loadu_ps(yt + j * mp);
    for (int i = 0; i < kc; i++) {
        __m256 a = _mm256_loadu_ps(xt + 8L * i);
        for (int j = 0; j < OP_NR; j++) acc[j] = _mm256_fmadd_ps(a, _mm256_broadcast_ss(panel + (long)j * kc + i), acc[j]);
    }
    for (int j = 0; j < OP_NR; j++) _mm256_storeu_ps(yt + j * mp, acc[j]);
}

/* Columns [k0, k0 + kc) of the chunk's weight rows [row0, row0 + rows) times the activations
   (xt: tiles of 16 rows, or a last one of 8, each [k][16 or 8] with k columns), added to the
   chunk's sums yt [rows][mp]; `next` (the panel after the last one here) is fetched meanwhile,
   a few lines a tile. */
static void op_block(const void *weight, int int8, long row0, int rows, int n, int k, int k0, int kc,
                     const float *xt, long mp, float *panel, float *yt, Prefetch *next) {
    int tiles = (int)((mp + 15) / 16);
    for (int q = 0; q < rows; q += OP_NR) {
        long r = row0 + q;
        for (int c = 0; c < OP_NR; c++) { /* rows past n widen to zeros */
            if (r + c < n) widen_row(weight, int8, (r + c) * k + k0, kc, panel + (long)c * kc);
            else memset(panel + (long)c * kc, 0, sizeof(float) * kc);
        }
        Prefetch ahead = *next;
        if (q + OP_NR < rows) { /* the next panel: the chunk's following rows of this block */
            long wsize = int8 ? 1 : 2;
            int count = n - r - OP_NR < OP_NR ? (int)(n - r - OP_NR) : OP_NR;
            ahead = (Prefetch){(const char *)weight + ((r + OP_NR) * k + k0) * wsize, k * wsize, kc * wsize, count, 0, 0};
        }
        long per_tile = (prefetch_lines(&ahead) + tiles - 1) / tiles;
        float *yq = yt + (long)q * mp;
        long m0 = 0;
        for (; m0 + 16 <= mp; m0 += 16) {
            prefetch_some(&ahead, per_tile);
            op_tile16(xt + m0 * k + 16L * k0, mp, panel, kc, yq + m0);
        }
        if (m0 < mp) op_tile8(xt + m0 * k + 8L * k0, mp, panel, kc, yq + m0);
    }
}

/* lfm_gemm over at least OP_MIN_ROWS rows (at most OP_MAX_ROWS): the outer-product tiles. */
static int op_rows(const void *weight, const float *scales, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                   int rows, int n, int k, int threads) {
    int int8 = scales != NULL, failed = 0;
    long mp = (rows + 7) / 8 * 8, wsize = int8 ? 1 : 2;
    Epilogue e = {scales, bias};
    float *xt = aligned_alloc(64, sizeof(float) * mp * k);
    if (!xt) return -2;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < k; i++) /* transposed a tile at a time, rows padded with zeros */
            for (long m0 = 0; m0 < mp; m0 += 16) {
                long width = mp - m0 < 16 ? mp - m0 : 16;
                float *column = xt + m0 * k + width * i;
                for (long r = 0; r < width; r++) column[r] = m0 + r < rows ? bf16_to_float(x[(m0 + r) * k + i]) : 0.0f;
            }
        float *panel = aligned_alloc(64, sizeof(float) * OP_NR * OP_KC);
        float *yt = aligned_alloc(64, sizeof(float) * OP_NC * mp);
        failed = !panel || !yt;
        /* Chunks handed out one at a time: on a shared machine one core can lose a share of its
           time to another tenant, and a fixed split would leave the other waiting for it. */
#pragma omp for schedule(dynamic, 1)
        for (long row0 = 0; row0 < n; row0 += OP_NC) {
            if (failed) continue;
            int chunk = n - row0 < OP_NC ? (int)(n - row0) : OP_NC;
            memset(yt, 0, sizeof(float) * OP_NC * mp);
            for (int k0 = 0; k0 < k; k0 += OP_KC) {
                int kc = k - k0 < OP_KC ? k - k0 : OP_KC;
                /* after this block's last panel: the chunk's first panel in the next block */
                int next_kc = k - k0 - kc < OP_KC ? k - k0 - kc : OP_KC;
                int next_rows = chunk < OP_NR ? chunk : OP_NR;
                Prefetch next = {(const char *)weight + (row0 * k + k0 + kc) * wsize, k * wsize, next_kc * wsize,
                                 next_kc ? next_rows : 0, 0, 0};
                op_block(weight, int8, row0, chunk, n, k, k0, kc, xt, mp, panel, yt, &next);
            }
            for (int r = 0; r < rows; r++) /* sums [chunk][mp] -> y's rows, scaled, biased, rounded */
                for (int j = 0; j < chunk; j++) y[(long)r * n + row0 + j] = epilogue(yt[(long)j * mp + r], e, row0 + j);
        }
        free(panel);
        free(yt);
    }
    free(xt);
    return failed ? -2 : 0;
}

/* y [rows, n] = x [rows, k] @ W.T (+ bias [n]) for many rows, x, bias and y bf16: fp32 sums,
   one rounding. scales NULL: bf16 weight; else int8 weight and fp32 row scales. k a multiple of 16.
   0 on success, -1 for a bad shape, -2 when out of memory. */
int lfm_gemm(const void *weight, const float *scales, const uint16_t *x, const uint16_t *bias, uint16_t *y, int rows,
             int n, int k, int threads) {
    if (rows < 1 || n < 1 || k < 16 || k % 16) return -1;
    if (rows < OP_MIN_ROWS) return gemm_rows(weight, scales, x, bias, y, rows, n, k, threads);
    /* Blocks of rows: a block's activations stay in L2 while every weight passes them, and the
       buffers stay small for a long prompt (each block widens the weights once); blocks of equal
       size, so none is left with a few rows. */
    int blocks = (rows + OP_MAX_ROWS - 1) / OP_MAX_ROWS, per_block = (rows + blocks - 1) / blocks;
    for (int r0 = 0; r0 < rows; r0 += per_block) {
        int count = rows - r0 < per_block ? rows - r0 : per_block;
        int rc = op_rows(weight, scales, x + (long)r0 * k, bias, y + (long)r0 * n, count, n, k, threads);
        if (rc) return rc;
    }
    return 0;
}

/* The cores' FMA peak in GFLOP/s, for benchmarks to measure against: each thread runs twelve
   independent 8-wide FMA chains (enough to cover the FMA latency on two pipes) from registers
   for `iterations` rounds. */
double lfm_fma_gflops(long iterations, int threads) {
    double start = omp_get_wtime();
    int team = 1; /* the threads the runtime gave, which may be fewer than asked for */
#pragma omp parallel num_threads(threads)
    {
        long count = iterations;
#pragma omp single nowait
        team = omp_get_num_threads();
        __asm__ volatile(ZERO12 "vxorps %%xmm12, %%xmm12, %%xmm12\n\t" "vxorps %%xmm13, %%xmm13, %%xmm13\n\t"
                         "1:\n\t"
                         "vfmadd231ps %%ymm12, %%ymm13, %%ymm0\n\t" "vfmadd231ps %%ymm12, %%ymm13, %%ymm1\n\t"
                         "vfmadd231ps %%ymm12, %%ymm13, %%ymm2\n\t" "vfmadd231ps %%ymm12, %%ymm13, %%ymm3\n\t"
                         "vfmadd231ps %%ymm12, %%ymm13, %%ymm4\n\t" "vfmadd231ps %%ymm12, %%ymm13, %%ymm5\n\t"
                         "vfmadd231ps %%ymm12, %%ymm13, %%ymm6\n\t" "vfmadd231ps %%ymm12, %%ymm13, %%ymm7\n\t"
                         "vfmadd231ps %%ymm12, %%ymm13, %%ymm8\n\t" "vfmadd231ps %%ymm12, %%ymm13, %%ymm9\n\t"
                         "vfmadd231ps %%ymm12, %%ymm13, %%ymm10\n\t" "vfmadd231ps %%ymm12, %%ymm13, %%ymm11\n\t"
                         "dec %[count]\n\t" "jnz 1b\n\t"
                         : [count] "+r"(count)
                         :
                         : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                           "xmm11", "xmm12", "xmm13", "cc");
    }
    return 12.0 * 16.0 * (double)iterations * team / (omp_get_wtime() - start) / 1e9;
}

/* ---- pieces of both steps -------------------------------------------------------------------- */

/* 1 / rms(x) over n values, in fp32 (torch's rms_norm of an fp32 tensor). */
static inline float inv_rms(const float *x, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / n + eps);
}

/* x = bf16(x + bf16(proj)) over n values: a residual add of two bf16 tensors. */
static void add_residual(float *x, const float *proj, long n) {
    for (long i = 0; i < n; i++) x[i] = round_bf16(x[i] + round_bf16(proj[i]));
}

/* The feed-forward's gate in bf16: gated [rows, F] = silu(a) * b for the halves a, b of each
   row of ab [rows, 2 F] (w1's and w3's outputs), every op rounded as torch's bf16 ops round. */
static void silu_gate(const float *ab, int rows, int F, float *gated) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < F; i++) {
            float a = round_bf16(ab[(long)r * 2 * F + i]), b = round_bf16(ab[(long)r * 2 * F + F + i]);
            gated[(long)r * F + i] = round_bf16(round_bf16(a / (1.0f + expf(-a))) * b);
        }
}

/* x [rows, dim] += bf16(in @ L.T): a projection added to the residual stream. 0, or matvec's error. */
static int project_add(const Linear *L, const float *in, int rows, float *proj, float *x, int threads) {
    int rc = matvec(L, in, rows, proj, threads);
    if (!rc) add_residual(x, proj, (long)rows * L->n);
    return rc;
}

/* The gated feed-forward on normed rows h [rows, dim], added to x; ab [rows, 2 F], gated
   [rows, F] and proj [rows, dim] are scratch. 0, or matvec's error. */
static int feed_forward(const Linear *w13, const Linear *w2, const float *h, int rows, float *ab, float *gated,
                        float *proj, float *x, int threads) {
    int rc = matvec(w13, h, rows, ab, threads);
    if (rc) return rc;
    silu_gate(ab, rows, w2->k, gated);
    return project_add(w2, gated, rows, proj, x, threads);
}

/* ---- the depthformer's codebook step -------------------------------------------------------- */

typedef struct {
    Linear qkv, out, w13, w2;
    const float *operator_norm, *ffn_norm; /* [dim] */
    const float *qk_norm;                  /* [heads + kv_heads, head_dim]: q heads', then k heads' */
} DepthLayer;

typedef struct {
    int n_layers, dim, heads, kv_heads, head_dim, slots, ffn_dim;
    float eps, qk_eps, head_eps;
    const float *cos2, *sin2; /* [slots, head_dim]: interleaved-pair rotary as x * cos2 + swap(x) * sin2 */
    const DepthLayer *layers;
    const Linear *logits;          /* one logits head per codebook */
    const float *const *head_norm; /* its norm weight [dim] */
} Depth;

/* out = bf16(rms_norm(x) * weight) over n values, the norm in fp32. */
static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float inv = inv_rms(x, n, eps);
    for (int i = 0; i < n; i++) out[i] = round_bf16(x[i] * inv * weight[i]);
}

/* One layer of the codebook step over x [rows, dim] (fp32 holding bf16 values), in place.
   0, or matvec's error. */
static int depth_layer(const Depth *d, const DepthLayer *L, int slot, float *x, float *k_cache, float *v_cache,
                       int rows, float *work, int threads) {
    const int D = d->dim, H = d->heads, KV = d->kv_heads, hd = d->head_dim, S = d->slots, F = d->ffn_dim;
    const int nqkv = L->qkv.n, group = H / KV;
    /* work: the layout lfm_depth_step sizes (per row: D + widest qkv + H * hd + 3 F + D) */
    float *h = work, *qkv = h + MAX_ROWS * D, *att = qkv + MAX_ROWS * nqkv, *ab = att + MAX_ROWS * H * hd;
    float *gated = ab + MAX_ROWS * 2 * F, *proj = gated + MAX_ROWS * F;
    const float *cos2 = d->cos2 + (long)slot * hd, *sin2 = d->sin2 + (long)slot * hd;
    int rc;

    for (int r = 0; r < rows; r++) rms_norm(x + (long)r * D, L->operator_norm, D, d->eps, h + (long)r * D);
    if ((rc = matvec(&L->qkv, h, rows, qkv, threads))) return rc;
    for (int r = 0; r < rows; r++) {
        float *row = qkv + (long)r * nqkv;
        for (int i = 0; i < nqkv; i++) row[i] = round_bf16(row[i]);
        /* per-head norm of q and k, then rotary at this slot; k and v go to the caches */
        for (int head = 0; head < H + KV; head++) {
            float *v = row + head * hd, normed[hd];
            rms_norm(v, L->qk_norm + (long)head * hd, hd, d->qk_eps, normed);
            for (int i = 0; i < hd; i++) {
                float swapped = normed[i ^ 1];
                float a = normed[i] * cos2[i], b = swapped * sin2[i];
                v[i] = round_bf16(a + b);
            }
        }
        for (int g = 0; g < KV; g++) {
            long at = (((long)r * KV + g) * S + slot) * hd;
            memcpy(k_cache + at, row + (H + g) * hd, sizeof(float) * hd);
            memcpy(v_cache + at, row + (H + KV + g) * hd, sizeof(float) * hd);
        }
        /* attention of each q head over slots 0..slot of its kv head, in fp32 */
        float scale = 1.0f / sqrtf((float)hd);
        for (int q = 0; q < H; q++) {
            const float *qv = row + q * hd;
            int g = q / group;
            const float *kc = k_cache + ((long)r * KV + g) * S * hd, *vc = v_cache + ((long)r * KV + g) * S * hd;
            float p[S], top = -INFINITY, total = 0.0f;
            for (int t = 0; t <= slot; t++) {
                float s = 0.0f;
                for (int i = 0; i < hd; i++) s += qv[i] * kc[(long)t * hd + i];
                p[t] = s * scale;
                top = fmaxf(top, p[t]);
            }
            for (int t = 0; t <= slot; t++) total += p[t] = expf(p[t] - top);
            float *o = att + (long)r * H * hd + q * hd;
            for (int i = 0; i < hd; i++) {
                float s = 0.0f;
                for (int t = 0; t <= slot; t++) s += p[t] / total * vc[(long)t * hd + i];
                o[i] = round_bf16(s);
            }
        }
    }
    if ((rc = project_add(&L->out, att, rows, proj, x, threads))) return rc;
    for (int r = 0; r < rows; r++) rms_norm(x + (long)r * D, L->ffn_norm, D, d->eps, h + (long)r * D);
    return feed_forward(&L->w13, &L->w2, h, rows, ab, gated, proj, x, threads);
}

/* One codebook step for `rows` rows: x [rows, dim] bf16 in (the slot's input) and out (the last
   layer's output); k/v caches fp32 [rows, kv_heads, slots, head_dim] per layer, in `caches` as
   k0, v0, k1, v1, ...; logits [rows, d->logits[slot].n] bf16 out. 0, or -1 / -2 as lfm_linear. */
int lfm_depth_step(const Depth *d, int slot, uint16_t *x, float *const *caches, uint16_t *logits, int rows,
                   int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    const int D = d->dim, F = d->ffn_dim, HD = d->heads * d->head_dim;
    int nqkv = 0;
    for (int l = 0; l < d->n_layers; l++) nqkv = nqkv > d->layers[l].qkv.n ? nqkv : d->layers[l].qkv.n;
    const Linear *head = &d->logits[slot];
    size_t per_row = (size_t)D + nqkv + HD + 3 * (size_t)F + D;
    if (per_row < (size_t)D + head->n) per_row = (size_t)D + head->n; /* the head: normed x, logits */
    float *xf = malloc(sizeof(float) * MAX_ROWS * D);
    float *work = malloc(sizeof(float) * MAX_ROWS * per_row);
    if (!xf || !work) {
        free(xf);
        free(work);
        return -2;
    }
    for (long i = 0; i < (long)rows * D; i++) xf[i] = bf16_to_float(x[i]);
    int rc = 0;
    for (int l = 0; l < d->n_layers && !rc; l++)
        rc = depth_layer(d, &d->layers[l], slot, xf, caches[2 * l], caches[2 * l + 1], rows, work, threads);
    if (!rc) {
        for (long i = 0; i < (long)rows * D; i++) x[i] = float_to_bf16(xf[i]);
        for (int r = 0; r < rows; r++)
            rms_norm(xf + (long)r * D, d->head_norm[slot], D, d->head_eps, work + (long)r * D);
        float *y = work + MAX_ROWS * D;
        rc = matvec(head, work, rows, y, threads);
        for (long i = 0; !rc && i < (long)rows * head->n; i++) logits[i] = float_to_bf16(y[i]);
    }
    free(xf);
    free(work);
    return rc;
}

/* ---- the backbone's one-position decode step ------------------------------------------------ */

typedef struct {
    int attention;                         /* 1: grouped-query attention, 0: gated short conv */
    Linear in, out, w13, w2;               /* in: qkv (attention) or in_proj (conv) */
    const uint16_t *operator_norm, *ffn_norm; /* bf16 [dim] */
    const uint16_t *qk_norm;               /* attention: bf16 [heads + kv_heads, head_dim] */
    const float *conv_taps;                /* conv: fp32 [conv_len, dim], tap i for lag conv_len - 1 - i */
} BackboneLayer;

typedef struct {
    int n_layers, dim, heads, kv_heads, head_dim, ffn_dim, conv_len;
    float eps, qk_eps;
    const uint16_t *final_norm; /* bf16 [dim] */
    const BackboneLayer *layers;
} Backbone;

/* out = bf16(weight * bf16(rms_norm(x))): the backbone's norm, the weight applied in bf16. */
static void rms_norm_hf(const float *x, const uint16_t *weight, int n, float eps, float *out) {
    float inv = inv_rms(x, n, eps);
    for (int i = 0; i < n; i++) out[i] = round_bf16(bf16_to_float(weight[i]) * round_bf16(x[i] * inv));
}

/* One query row over `length` cached keys and values (bf16 [length, hd]), fp32 softmax. */
static void attend_cached(const float *q, const uint16_t *keys, const uint16_t *values, int length, int hd,
                          float *scores, float *out) {
    float scale = 1.0f / sqrtf((float)hd), top = -INFINITY, total = 0.0f;
    for (int t = 0; t < length; t++) {
        const uint16_t *kt = keys + (long)t * hd;
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), widen_bf16(kt + i), acc);
        scores[t] = hsum(acc) * scale;
        top = fmaxf(top, scores[t]);
    }
    for (int t = 0; t < length; t++) total += scores[t] = expf(scores[t] - top);
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int t = 0; t < length; t++) {
        __m256 p = _mm256_set1_ps(scores[t] / total);
        const uint16_t *vt = values + (long)t * hd;
        for (int i = 0; i < hd; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, widen_bf16(vt + i), _mm256_loadu_ps(out + i)));
    }
}

/* One layer of the one-position step over x [rows, dim] (fp32 holding bf16 values), in place;
   keys, values or the conv state of layer l in state[2 l], state[2 l + 1]. `work`: the layout
   lfm_backbone_step sizes. 0, or matvec's error. */
static int backbone_layer(const Backbone *b, const BackboneLayer *layer, void *const *state, const uint16_t *cos,
                          const uint16_t *sin, int position, int capacity, float *x, int rows, float *work,
                          int widest_in, int threads) {
    const int D = b->dim, H = b->heads, KV = b->kv_heads, hd = b->head_dim, F = b->ffn_dim, L = b->conv_len;
    const int length = position + 1, group = H / KV, half = hd / 2, nin = layer->in.n;
    float *h = work, *in = h + MAX_ROWS * D, *mix = in + MAX_ROWS * widest_in;
    float *ab = mix + MAX_ROWS * (H * hd > D ? H * hd : D), *gated = ab + MAX_ROWS * 2 * F;
    float *proj = gated + MAX_ROWS * F, *scores = proj + MAX_ROWS * D;
    int rc;

    for (int r = 0; r < rows; r++) rms_norm_hf(x + (long)r * D, layer->operator_norm, D, b->eps, h + (long)r * D);
    if ((rc = matvec(&layer->in, h, rows, in, threads))) return rc;
    for (long i = 0; i < (long)rows * nin; i++) in[i] = round_bf16(in[i]);
    if (layer->attention) {
        uint16_t *keys = state[0], *values = state[1];
        for (int r = 0; r < rows; r++) {
            float *row = in + (long)r * nin;
            for (int head = 0; head < H + KV; head++) { /* norm, then rotate-half rotary, in bf16 */
                float *v = row + head * hd, normed[hd];
                rms_norm_hf(v, layer->qk_norm + (long)head * hd, hd, b->qk_eps, normed);
                for (int i = 0; i < hd; i++) {
                    float rotated = i < half ? -normed[i + half] : normed[i - half];
                    float c = bf16_to_float(cos[i]), s = bf16_to_float(sin[i]);
                    v[i] = round_bf16(round_bf16(normed[i] * c) + round_bf16(rotated * s));
                }
            }
            for (int g = 0; g < KV; g++) {
                long at = (((long)r * KV + g) * capacity + position) * hd;
                for (int i = 0; i < hd; i++) {
                    keys[at + i] = float_to_bf16(row[(H + g) * hd + i]);
                    values[at + i] = float_to_bf16(row[(H + KV + g) * hd + i]);
                }
            }
        }
        /* every (row, head) pair attends on its own: parallel for long histories */
        #pragma omp parallel for schedule(static) num_threads(threads) if (length >= 256)
        for (int pair = 0; pair < rows * H; pair++) {
            int r = pair / H, q = pair % H;
            long base = ((long)r * KV + q / group) * capacity * hd;
            float o[hd];
            attend_cached(in + (long)r * nin + q * hd, keys + base, values + base, length, hd,
                          scores + (long)pair * length, o);
            for (int i = 0; i < hd; i++) mix[(long)r * H * hd + q * hd + i] = round_bf16(o[i]);
        }
    } else {
        uint16_t *conv = state[0];
        for (int r = 0; r < rows; r++) {
            const float *bg = in + (long)r * nin, *cg = bg + D, *xv = cg + D;
            for (int c = 0; c < D; c++) {
                uint16_t *s = conv + ((long)r * D + c) * (L - 1);
                float u_new = round_bf16(bg[c] * xv[c]);
                float v = bf16_to_float(s[0]) * layer->conv_taps[c];
                for (int i = 1; i < L - 1; i++) v = v + bf16_to_float(s[i]) * layer->conv_taps[(long)i * D + c];
                v = v + u_new * layer->conv_taps[(long)(L - 1) * D + c];
                for (int i = 0; i + 1 < L - 1; i++) s[i] = s[i + 1];
                s[L - 2] = float_to_bf16(u_new);
                mix[(long)r * D + c] = round_bf16(cg[c] * round_bf16(v));
            }
        }
    }
    if ((rc = project_add(&layer->out, mix, rows, proj, x, threads))) return rc;
    for (int r = 0; r < rows; r++) rms_norm_hf(x + (long)r * D, layer->ffn_norm, D, b->eps, h + (long)r * D);
    return feed_forward(&layer->w13, &layer->w2, h, rows, ab, gated, proj, x, threads);
}

/* x [rows, dim] bf16 in: the new position's inputs; out: the final norm of the last layer's
   output. state: per layer, attention: keys, values bf16 [rows, kv_heads, capacity, head_dim];
   conv: its state bf16 [rows, dim, conv_len - 1], two pointers each (the second unused for conv).
   Every row is at `position` (0-based) and writes its keys there; cos/sin bf16 [head_dim] are
   that position's rotary angles. 0, or -1 / -2 as lfm_linear. */
int lfm_backbone_step(const Backbone *b, uint16_t *x, void *const *state, const uint16_t *cos,
                      const uint16_t *sin, int position, int capacity, int rows, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    const int D = b->dim, H = b->heads, hd = b->head_dim, F = b->ffn_dim, length = position + 1;
    int widest_in = 0;
    for (int l = 0; l < b->n_layers; l++) widest_in = widest_in > b->layers[l].in.n ? widest_in : b->layers[l].in.n;
    /* per row: x, h, in, mix, ab, gated, proj, then the attention scores */
    size_t per_row = 3 * (size_t)D + widest_in + (size_t)(H * hd > D ? H * hd : D) + 3 * (size_t)F;
    float *xf = malloc(sizeof(float) * (MAX_ROWS * (per_row + (size_t)H * length)));
    if (!xf) return -2;
    float *work = xf + MAX_ROWS * D;
    int rc = 0;
    for (long i = 0; i < (long)rows * D; i++) xf[i] = bf16_to_float(x[i]);
    for (int l = 0; l < b->n_layers && !rc; l++)
        rc = backbone_layer(b, &b->layers[l], state + 2 * l, cos, sin, position, capacity, xf, rows, work,
                            widest_in, threads);
    for (int r = 0; r < rows && !rc; r++) {
        rms_norm_hf(xf + (long)r * D, b->final_norm, D, b->eps, work);
        for (int i = 0; i < D; i++) x[(long)r * D + i] = float_to_bf16(work[i]);
    }
    free(xf);
    return rc;
}
