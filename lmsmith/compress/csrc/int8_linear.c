/* Weight-only int8 linear for AVX2+FMA CPUs: y[m,n] = scale[n] * sum_k x[m,k] * w[n,k].
 *
 * x: (M, K) float32 row-major, w: (N, K) int8 row-major (nn.Linear's (out, in) layout, unpacked),
 * scale: (N,) float32, y: (M, N) float32. Any M, K, N (scalar tail over K, single-row tail over N).
 *
 * Why: PyTorch's aten._weight_int8pack_mm has no fast path on AVX2-only CPUs, and decoding is
 * bound by reading the weight, which int8 makes 4x smaller than fp32. The weight is widened
 * int8 -> int32 -> fp32 in registers, 8 lanes at a time, and each widened vector is reused for two
 * rows of x (register tile: 2 rows of x by 4 rows of w = 8 accumulators), so a batch of rows pays
 * the conversion once per pair. Threads split the output features; each thread's 4 weight rows stay
 * in L1 while it walks over all rows of x.
 *
 * Built by lmsmith/compress/native.py with -O3 -mavx2 -mfma -fopenmp; libgomp is linked by its
 * soname, so inside a torch process it resolves to the OpenMP runtime torch already loaded.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS_PER_BLOCK 4 /* weight rows (output features) per task */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 int8 weights -> 8 floats */
static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Rows are short (576 bytes for SmolLM2), too short for the hardware prefetcher to ramp up on each of
 * the 4 row streams, so a block would wait on DRAM; fetching the next block (4*K bytes, contiguous)
 * while this one computes made the 49152x576 LM head 2.3x faster at 1 row. One cache line per
 * 16 values of k covers the next block by the end of this one. Prefetching past the end is harmless. */
static inline void prefetch_next_block(const int8_t *block, int64_t K, int64_t k) {
    _mm_prefetch((const char *)(block + 4 * K + 4 * k), _MM_HINT_T0);
}

static inline float dot_tail(const float *x, const int8_t *w, int64_t k, int64_t K) {
    float r = 0.0f;
    for (; k < K; k++) r += x[k] * (float)w[k];
    return r;
}

/* two rows of x (x0, x1) times four rows of w, written to y0[0..3] and y1[0..3] */
static void tile_2x4(const float *x0, const float *x1, const int8_t *w, const float *s,
                     float *y0, float *y1, int64_t K) {
    const int8_t *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        prefetch_next_block(w, K, k);
        __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);
        __m256 b0 = widen8(w0 + k), b1 = widen8(w1 + k), b2 = widen8(w2 + k), b3 = widen8(w3 + k);
        a00 = _mm256_fmadd_ps(b0, u, a00); a10 = _mm256_fmadd_ps(b0, v, a10);
        a01 = _mm256_fmadd_ps(b1, u, a01); a11 = _mm256_fmadd_ps(b1, v, a11);
        a02 = _mm256_fmadd_ps(b2, u, a02); a12 = _mm256_fmadd_ps(b2, v, a12);
        a03 = _mm256_fmadd_ps(b3, u, a03); a13 = _mm256_fmadd_ps(b3, v, a13);
    }
    y0[0] = s[0] * (hsum(a00) + dot_tail(x0, w0, k, K));
    y0[1] = s[1] * (hsum(a01) + dot_tail(x0, w1, k, K));
    y0[2] = s[2] * (hsum(a02) + dot_tail(x0, w2, k, K));
    y0[3] = s[3] * (hsum(a03) + dot_tail(x0, w3, k, K));
    y1[0] = s[0] * (hsum(a10) + dot_tail(x1, w0, k, K));
    y1[1] = s[1] * (hsum(a11) + dot_tail(x1, w1, k, K));
    y1[2] = s[2] * (hsum(a12) + dot_tail(x1, w2, k, K));
    y1[3] = s[3] * (hsum(a13) + dot_tail(x1, w3, k, K));
}

/* one row of x times four rows of w; two accumulators per weight row (k and k+8) hide FMA latency */
static void tile_1x4(const float *x, const int8_t *w, const float *s, float *y, int64_t K) {
    const int8_t *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        prefetch_next_block(w, K, k);
        __m256 u = _mm256_loadu_ps(x + k), v = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(widen8(w0 + k), u, a0); c0 = _mm256_fmadd_ps(widen8(w0 + k + 8), v, c0);
        a1 = _mm256_fmadd_ps(widen8(w1 + k), u, a1); c1 = _mm256_fmadd_ps(widen8(w1 + k + 8), v, c1);
        a2 = _mm256_fmadd_ps(widen8(w2 + k), u, a2); c2 = _mm256_fmadd_ps(widen8(w2 + k + 8), v, c2);
        a3 = _mm256_fmadd_ps(widen8(w3 + k), u, a3); c3 = _mm256_fmadd_ps(widen8(w3 + k + 8), v, c3);
    }
    for (; k + 8 <= K; k += 8) {
        __m256 u = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(widen8(w0 + k), u, a0); a1 = _mm256_fmadd_ps(widen8(w1 + k), u, a1);
        a2 = _mm256_fmadd_ps(widen8(w2 + k), u, a2); a3 = _mm256_fmadd_ps(widen8(w3 + k), u, a3);
    }
    y[0] = s[0] * (hsum(_mm256_add_ps(a0, c0)) + dot_tail(x, w0, k, K));
    y[1] = s[1] * (hsum(_mm256_add_ps(a1, c1)) + dot_tail(x, w1, k, K));
    y[2] = s[2] * (hsum(_mm256_add_ps(a2, c2)) + dot_tail(x, w2, k, K));
    y[3] = s[3] * (hsum(_mm256_add_ps(a3, c3)) + dot_tail(x, w3, k, K));
}

/* one row of x times one row of w: the last N % 4 output features */
static float dot_1x1(const float *x, const int8_t *w, int64_t K) {
    __m256 a = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(widen8(w + k), _mm256_loadu_ps(x + k), a);
    return hsum(a) + dot_tail(x, w, k, K);
}

/* output features [n, n+4) for all M rows */
static void full_block(const float *x, const int8_t *w, const float *s, float *y,
                       int64_t M, int64_t K, int64_t N, int64_t n) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
        tile_2x4(x + m * K, x + (m + 1) * K, w + n * K, s + n, y + m * N + n, y + (m + 1) * N + n, K);
    if (m < M) tile_1x4(x + m * K, w + n * K, s + n, y + m * N + n, K);
}

/* output features [n, N), fewer than 4, for all M rows */
static void tail_block(const float *x, const int8_t *w, const float *s, float *y,
                       int64_t M, int64_t K, int64_t N, int64_t n) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = n; j < N; j++) y[m * N + j] = s[j] * dot_1x1(x + m * K, w + j * K, K);
}

void lmsmith_int8_linear(const float *x, const int8_t *w, const float *scale, float *y,
                         int64_t M, int64_t K, int64_t N, int32_t nthreads) {
    int64_t full = N / ROWS_PER_BLOCK;
    int64_t blocks = full + (N % ROWS_PER_BLOCK != 0);
    if (nthreads < 1) nthreads = 1;
    /* the tail block is one more task, so it runs alongside the others instead of after them */
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        if (b < full) full_block(x, w, scale, y, M, K, N, b * ROWS_PER_BLOCK);
        else tail_block(x, w, scale, y, M, K, N, b * ROWS_PER_BLOCK);
    }
}
