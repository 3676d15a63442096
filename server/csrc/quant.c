/* Weight-only quantized projections for the CPU: y[m, n] = x[m] . w[n] (+ bias[n]), with
   x and y fp32 and w stored in 8 or 4 bits (or bf16, or fp32), widened in registers (the activations are
   never quantized, so y is the fp32 matmul with the dequantized weights up to rounding).

   Decode reads every weight once per step, so its time is the bytes read: 1 byte a weight
   (int8) or about 0.6 (int4 with group 32) instead of fp32's 4. PyTorch's own weight-only
   ops (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) have vectorized paths for AVX-512
   only and were 10-100x slower than fp32 BLAS on an AVX2 CPU (benchmarks/quant_kernels.py).

   int8: q [N, K] int8, per output channel scale s [N]:   w[n, k] = s[n] * q[n, k].
   int4: q [N, K/2] bytes, per (n, group of G inputs) scale s and minimum lo [N, K/G]:
         w[n, k] = lo[n, g] + s[n, g] * u[n, k], u in 0..15; a group's 32 inputs i < 16 and
         16 + i share byte i of each 16-byte block (low nibble, high nibble). G = 32 * b.
   Rows are done NR at a time so each weight is unpacked once per NR rows (with AVX-512,
   from TILE_ROWS rows: once a call, into tiles; `tiles` below); output channels are
   split over the OpenMP team. A row alone (a decode step of one stream) is summed in
   4 chains, rows in a batch in one chain each: the two agree to fp32 rounding. */
#include <stdint.h>
#include <stdlib.h>
#include "simd.h"

#define NR 8 /* rows (tokens) done together */

#if W == 8 || W == 16
/* 8 int8 weights -> 8 floats */
static inline __m256 load_i8x8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 8 unsigned bytes -> 8 floats */
static inline __m256 load_u8x8(__m128i b)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

/* The weight types of dot_w and rows_matmul. */
enum { WT_F32, WT_I8, WT_BF16 };

/* acc[r] = x[r] . w (K weights of type wt), r < nr. One row: 4 chains of FMAs in flight
   (their latency bounds it); several rows: one chain a row, each weight vector loaded
   (and converted) once. wt and nr are constants at every call: the branches fold and the
   row loops unroll. */
#if W == 8 || W == 16
static inline __m256 load_w8(const void *w, int wt, int64_t k)
{
    if (wt == WT_I8) return load_i8x8((const int8_t *)w + k);
    if (wt == WT_BF16)  /* bf16 is the top half of an fp32 */
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
            _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k))), 16));
    return _mm256_loadu_ps((const float *)w + k);
}
#endif

static inline __attribute__((always_inline)) void
dot_w(const float *x, int64_t xs, const void *w, int wt, int64_t k_len, int nr, float *acc)
{
    int64_t k = 0;
#if W == 8 || W == 16
    __m256 a[NR];
    for (int r = 0; r < nr; r++) a[r] = _mm256_setzero_ps();
    if (nr == 1) {
        __m256 c1 = a[0], c2 = a[0], c3 = a[0];
        for (; k + 32 <= k_len; k += 32) {
            a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_w8(w, wt, k), a[0]);
            c1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load_w8(w, wt, k + 8), c1);
            c2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load_w8(w, wt, k + 16), c2);
            c3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load_w8(w, wt, k + 24), c3);
        }
        a[0] = _mm256_add_ps(_mm256_add_ps(a[0], c1), _mm256_add_ps(c2, c3));
    }
    for (; k + 8 <= k_len; k += 8) {
        __m256 wv = load_w8(w, wt, k);
        for (int r = 0; r < nr; r++)
            a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * xs + k), wv, a[r]);
    }
    for (int r = 0; r < nr; r++) acc[r] = hsum8(a[r]);
#else
    for (int r = 0; r < nr; r++) acc[r] = 0.0f;
#endif
    for (; k < k_len; k++) {
        float wk = wt == WT_I8 ? (float)((const int8_t *)w)[k]
                 : wt == WT_BF16 ? bf16_to_f32(((const uint16_t *)w)[k]) : ((const float *)w)[k];
        for (int r = 0; r < nr; r++) acc[r] += x[r * xs + k] * wk;
    }
}

/* y[r, n] = s[n] * (x[r] . w[n]) + bias[n] for r < m, n in [0, N); s NULL: no scale. */
static inline __attribute__((always_inline)) void
rows_matmul(const float *x, int64_t xs, int64_t m, const void *w, int wt, const float *s,
            const float *bias, int64_t n_out, int64_t k_len, float *y, int64_t ys,
            int64_t threads)
{
    const int64_t wsize = wt == WT_I8 ? 1 : wt == WT_BF16 ? 2 : 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_out; n++) {
        const void *wn = (const char *)w + n * k_len * wsize;
        const float b = bias ? bias[n] : 0.0f, sn = s ? s[n] : 1.0f;
        for (int64_t r0 = 0; r0 < m; r0 += NR) {
            float acc[NR];
            int nr = m - r0 < NR ? (int)(m - r0) : NR;
            const float *xr = x + r0 * xs;
            switch (nr) { /* constant nr: the row loops unroll */
            case 8: dot_w(xr, xs, wn, wt, k_len, 8, acc); break;
            case 7: dot_w(xr, xs, wn, wt, k_len, 7, acc); break;
            case 6: dot_w(xr, xs, wn, wt, k_len, 6, acc); break;
            case 5: dot_w(xr, xs, wn, wt, k_len, 5, acc); break;
            case 4: dot_w(xr, xs, wn, wt, k_len, 4, acc); break;
            case 3: dot_w(xr, xs, wn, wt, k_len, 3, acc); break;
            case 2: dot_w(xr, xs, wn, wt, k_len, 2, acc); break;
            default: dot_w(xr, xs, wn, wt, k_len, 1, acc); break;
            }
            for (int r = 0; r < nr; r++) y[(r0 + r) * ys + n] = sn * acc[r] + b;
        }
    }
}


#if W == 16
/* A batch of rows with AVX-512 (int8 and int4, from TILE_ROWS rows; `tiles`): each thread
   dequantizes TN output channels at a time into an fp32 scratch [TN][K] in L1 (once a
   call, where the NR-row path converts every weight once per NR rows), then runs TR rows
   at a time against it, 512-bit FMAs into TR x TN accumulators. Each (row, channel) sums
   in 16 lanes over k and then across the lanes: the same for every row of the batch, and
   within fp32 rounding of the NR-row path. The default model's projections and head at
   32 rows, 2 threads, Zen 5: int8 1.17x and int4 1.30x the NR-row path's speed (16 rows:
   1.04x, 1.12x); TN x TR = 4 x 6, 8 x 3, 4 x 4 and 8 x 2 were slower. */
#define TILE_ROWS 16
#define TN 2
#define TR 12

/* out[r * TN + j] = x[r] . wt[j] for r < nr, j < TN; wt [TN][K] fp32 in the scratch. */
static inline __attribute__((always_inline)) void
tile_dot(const float *x, int64_t xs, const float *wt, int64_t k_len, int nr, float *out)
{
    __m512 acc[TR][TN];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < TN; j++) acc[r][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= k_len; k += 16) {
        __m512 w[TN];
        for (int j = 0; j < TN; j++) w[j] = _mm512_loadu_ps(wt + j * k_len + k);
        for (int r = 0; r < nr; r++) {
            const __m512 xv = _mm512_loadu_ps(x + r * xs + k);
            for (int j = 0; j < TN; j++) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
        }
    }
    if (k < k_len) {
        const __mmask16 mk = (__mmask16)((1u << (k_len - k)) - 1);
        __m512 w[TN];
        for (int j = 0; j < TN; j++) w[j] = _mm512_maskz_loadu_ps(mk, wt + j * k_len + k);
        for (int r = 0; r < nr; r++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mk, x + r * xs + k);
            for (int j = 0; j < TN; j++) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < TN; j++) out[r * TN + j] = _mm512_reduce_add_ps(acc[r][j]);
}

/* out[r][j] = x[r0 + r] . wt[j] for every row of the batch, TR rows at a time. */
static void tile_rows(const float *x, int64_t xs, int64_t m, const float *wt, int64_t k_len,
                      float *out)
{
    for (int64_t r0 = 0; r0 < m; r0 += TR) {
        const float *xr = x + r0 * xs;
        float *o = out + r0 * TN;
        switch (m - r0 < TR ? (int)(m - r0) : TR) { /* constant nr: registers */
        case 12: tile_dot(xr, xs, wt, k_len, 12, o); break;
        case 11: tile_dot(xr, xs, wt, k_len, 11, o); break;
        case 10: tile_dot(xr, xs, wt, k_len, 10, o); break;
        case 9: tile_dot(xr, xs, wt, k_len, 9, o); break;
        case 8: tile_dot(xr, xs, wt, k_len, 8, o); break;
        case 7: tile_dot(xr, xs, wt, k_len, 7, o); break;
        case 6: tile_dot(xr, xs, wt, k_len, 6, o); break;
        case 5: tile_dot(xr, xs, wt, k_len, 5, o); break;
        case 4: tile_dot(xr, xs, wt, k_len, 4, o); break;
        case 3: tile_dot(xr, xs, wt, k_len, 3, o); break;
        case 2: tile_dot(xr, xs, wt, k_len, 2, o); break;
        default: tile_dot(xr, xs, wt, k_len, 1, o); break;
        }
    }
}

/* The weights of a tiled call: int8 (q, s) or int4 (q, s, lo, group, and xsum: the rows'
   sums over each group, as q4_matmul computes them). */
typedef struct {
    const void *q;
    const float *s, *lo, *xsum;
    int64_t group;
} tile_weights;

/* w = channel n's weights in fp32: int8 q[n] (its scale comes after the dot product), or
   int4 s[n, g] * u[n] (lo's part comes after: tile_result), as the NR-row paths have them. */
static inline __attribute__((always_inline)) void
tile_dequantize(const tile_weights *tw, const int int4, int64_t n, int64_t k_len, float *w)
{
    int64_t k = 0;
    if (!int4) {
        const int8_t *qn = (const int8_t *)tw->q + n * k_len;
        for (; k + 16 <= k_len; k += 16)
            _mm512_storeu_ps(w + k, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(qn + k)))));
        for (; k < k_len; k++) w[k] = (float)qn[k];
        return;
    }
    const int64_t group = tw->group;
    const uint8_t *qn = (const uint8_t *)tw->q + n * (k_len / 2);
    const float *sn = tw->s + n * (k_len / group);
    const __m128i mask = _mm_set1_epi8(0x0f);
    for (; k < k_len; k += 32) {
        const __m512 sg = _mm512_set1_ps(sn[k / group]);
        const __m128i b = _mm_loadu_si128((const __m128i *)(qn + k / 2));
        const __m128i lo4 = _mm_and_si128(b, mask);
        const __m128i hi4 = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        _mm512_storeu_ps(w + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo4)), sg));
        _mm512_storeu_ps(w + k + 16,
                         _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi4)), sg));
    }
}

/* y[r, n] without the bias, from the dot product of row r with tile_dequantize's weights. */
static inline __attribute__((always_inline)) float
tile_result(const tile_weights *tw, const int int4, int64_t n, int64_t r, int64_t k_len,
            float dot)
{
    if (!int4) return tw->s[n] * dot;
    const int64_t ng = k_len / tw->group;
    const float *lon = tw->lo + n * ng, *xsr = tw->xsum + r * ng;
    float off = 0.0f;
    for (int64_t g = 0; g < ng; g++) off += lon[g] * xsr[g];
    return dot + off;
}

/* One thread's share of `tiles` (its channels of the team's static split); int4 a constant
   at both calls, so each weight type gets its own loop. */
static inline __attribute__((always_inline)) void
tiles_thread(const float *x, int64_t xs, int64_t m, const tile_weights *tw, const int int4,
             const float *bias, int64_t n_out, int64_t k_len, float *y, int64_t ys,
             int *failed)
{
    float *wt = malloc(sizeof(float) * (size_t)(TN * k_len + TN * m));
    if (!wt) {
        #pragma omp atomic write
        *failed = 1;
    }
    float *out = wt + TN * k_len;
    #pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < n_out; n0 += TN) {
        if (!wt) continue;
        const int tn = n_out - n0 < TN ? (int)(n_out - n0) : TN;
        for (int j = 0; j < TN; j++) {
            if (j < tn) tile_dequantize(tw, int4, n0 + j, k_len, wt + j * k_len);
            else memset(wt + j * k_len, 0, sizeof(float) * (size_t)k_len);
        }
        tile_rows(x, xs, m, wt, k_len, out);
        for (int j = 0; j < tn; j++) {
            const float b = bias ? bias[n0 + j] : 0.0f;
            for (int64_t r = 0; r < m; r++)
                y[r * ys + n0 + j] = tile_result(tw, int4, n0 + j, r, k_len,
                                                 out[r * TN + j]) + b;
        }
    }
    free(wt);
}

/* q8_matmul and q4_matmul (tw->lo set) for m >= TILE_ROWS rows. Returns -1 with no memory
   for the scratch (the caller then takes the NR-row path). */
static int tiles(const float *x, int64_t xs, int64_t m, const tile_weights *tw,
                 const float *bias, int64_t n_out, int64_t k_len, float *y, int64_t ys,
                 int64_t threads)
{
    int failed = 0;
    if (tw->lo) {
        #pragma omp parallel num_threads(threads)
        tiles_thread(x, xs, m, tw, 1, bias, n_out, k_len, y, ys, &failed);
    } else {
        #pragma omp parallel num_threads(threads)
        tiles_thread(x, xs, m, tw, 0, bias, n_out, k_len, y, ys, &failed);
    }
    return failed ? -1 : 0;
}
#endif

void q8_matmul(const float *x, int64_t xs, int64_t m, const int8_t *q, const float *s,
               const float *bias, int64_t n_out, int64_t k_len, float *y, int64_t ys,
               int64_t threads)
{
#if W == 16
    const tile_weights tw = {q, s, NULL, NULL, 0};
    if (m >= TILE_ROWS && tiles(x, xs, m, &tw, bias, n_out, k_len, y, ys, threads) == 0)
        return;
#endif
    rows_matmul(x, xs, m, q, WT_I8, s, bias, n_out, k_len, y, ys, threads);
}

/* fp32 weights [N, K] (nn.Linear's layout), few rows (server.engine.ops). */
void f32_matmul(const float *x, int64_t xs, int64_t m, const float *w, const float *bias,
                int64_t n_out, int64_t k_len, float *y, int64_t ys, int64_t threads)
{
    rows_matmul(x, xs, m, w, WT_F32, NULL, bias, n_out, k_len, y, ys, threads);
}

/* bf16 weights [N, K] (a bf16 model's Projection), fp32 x, bias and y: few rows on a CPU,
   where PyTorch's bf16 matmul of one row is ~60x slower than this. */
void bf16_matmul(const float *x, int64_t xs, int64_t m, const uint16_t *w, const float *bias,
                 int64_t n_out, int64_t k_len, float *y, int64_t ys, int64_t threads)
{
    rows_matmul(x, xs, m, w, WT_BF16, NULL, bias, n_out, k_len, y, ys, threads);
}

/* acc[r] = x[r] . w_n for the int4 row (q, s, lo) of K inputs in groups of G; xsum[r, g]
   holds the sum of x[r] over group g. */
static inline __attribute__((always_inline)) void
dot_i4(const float *x, int64_t xs, const float *xsum, int64_t ng, const uint8_t *q,
       const float *s, const float *lo, int64_t k_len, int64_t group, int nr, float *acc)
{
#if W == 8 || W == 16
    /* several rows: the group's scale is folded into the unpacked weights (shared by the
       rows), one chain of FMAs a row */
    __m256 yacc[NR], c1 = _mm256_setzero_ps();
    for (int r = 0; r < nr; r++) yacc[r] = _mm256_setzero_ps();
    const __m128i mask = _mm_set1_epi8(0x0f);
    for (int64_t g = 0; g < ng && nr == 1; g++) {
        /* one row: the group's sum in 2 chains, then scaled once (no multiply a weight) */
        __m256 t0 = _mm256_setzero_ps(), t1 = t0;
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(q + k / 2));
            __m128i lo4 = _mm_and_si128(b, mask), hi4 = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            t0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_u8x8(lo4), t0);
            t1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load_u8x8(_mm_srli_si128(lo4, 8)), t1);
            t0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load_u8x8(hi4), t0);
            t1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load_u8x8(_mm_srli_si128(hi4, 8)), t1);
        }
        const __m256 sg = _mm256_set1_ps(s[g]);
        if (g & 1) c1 = _mm256_fmadd_ps(sg, _mm256_add_ps(t0, t1), c1);
        else yacc[0] = _mm256_fmadd_ps(sg, _mm256_add_ps(t0, t1), yacc[0]);
    }
    for (int64_t g = 0; g < ng && nr > 1; g++) {
        const __m256 sg = _mm256_set1_ps(s[g]);
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(q + k / 2));
            __m128i lo4 = _mm_and_si128(b, mask), hi4 = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            __m256 w0 = _mm256_mul_ps(load_u8x8(lo4), sg);
            __m256 w1 = _mm256_mul_ps(load_u8x8(_mm_srli_si128(lo4, 8)), sg);
            __m256 w2 = _mm256_mul_ps(load_u8x8(hi4), sg);
            __m256 w3 = _mm256_mul_ps(load_u8x8(_mm_srli_si128(hi4, 8)), sg);
            for (int r = 0; r < nr; r++) {
                const float *xk = x + r * xs + k;
                __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(xk), w0, yacc[r]);
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 8), w1, t);
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 16), w2, t);
                yacc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 24), w3, t);
            }
        }
    }
    if (nr == 1) yacc[0] = _mm256_add_ps(yacc[0], c1);
    for (int r = 0; r < nr; r++) {
        float off = 0.0f;
        for (int64_t g = 0; g < ng; g++) off += lo[g] * xsum[r * ng + g];
        acc[r] = hsum8(yacc[r]) + off;
    }
#else
    const int64_t ng2 = ng;
    for (int r = 0; r < nr; r++) {
        float total = 0.0f;
        for (int64_t g = 0; g < ng2; g++) {
            float gs = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                const int64_t blk = k / 32 * 16, i = k % 32;
                const int u = i < 16 ? q[blk + i] & 15 : q[blk + i - 16] >> 4;
                gs += x[r * xs + k] * (float)u;
            }
            total += s[g] * gs + lo[g] * xsum[r * ng + g];
        }
        acc[r] = total;
    }
    (void)k_len;
#endif
}

/* y[r, n] = x[r] . w[n] + bias[n] for the int4 weight (q [N, K/2], s and lo [N, K/G]).
   K and G multiples of 32. Returns -1 with no memory for the row sums. */
int q4_matmul(const float *x, int64_t xs, int64_t m, const uint8_t *q, const float *s,
              const float *lo, const float *bias, int64_t n_out, int64_t k_len,
              int64_t group, float *y, int64_t ys, int64_t threads)
{
    const int64_t ng = k_len / group;
    float *xsum = malloc(sizeof(float) * (size_t)(m * ng));
    if (!xsum) return -1;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < ng; g++) {
            float t = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) t += x[r * xs + k];
            xsum[r * ng + g] = t;
        }
#if W == 16
    const tile_weights tw = {q, s, lo, xsum, group};
    if (m >= TILE_ROWS && tiles(x, xs, m, &tw, bias, n_out, k_len, y, ys, threads) == 0) {
        free(xsum);
        return 0;
    }
#endif
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_out; n++) {
        const uint8_t *qn = q + n * (k_len / 2);
        const float *sn = s + n * ng, *lon = lo + n * ng;
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t r0 = 0; r0 < m; r0 += NR) {
            float acc[NR];
            int nr = m - r0 < NR ? (int)(m - r0) : NR;
            const float *xr = x + r0 * xs, *xsr = xsum + r0 * ng;
            switch (nr) {
            case 8: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 8, acc); break;
            case 7: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 7, acc); break;
            case 6: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 6, acc); break;
            case 5: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 5, acc); break;
            case 4: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 4, acc); break;
            case 3: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 3, acc); break;
            case 2: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 2, acc); break;
            default: dot_i4(xr, xs, xsr, ng, qn, sn, lon, k_len, group, 1, acc); break;
            }
            for (int r = 0; r < nr; r++) y[(r0 + r) * ys + n] = acc[r] + b;
        }
    }
    free(xsum);
    return 0;
}

