/* Projections with 8-bit activations (`--quantize w8a8|w4a8`): each row of x is rounded to
   int8 with its own scale (max |x[r]| / 127, round half to even), then multiplied by int8
   or int4 weights in integer arithmetic, as llama.cpp's Q8_0/Q4_0 do:

     w8a8: y[r, n] = xs[r] * s[n] * sum_k xq[r, k] q[n, k]                     (+ bias[n])
     w4a8: y[r, n] = xs[r] * sum_g (s[n, g] * sum_{k in g} xq[r, k] u[n, k]
                                    + lo[n, g] * sum_{k in g} xq[r, k])          (+ bias[n])

   that is x_hat @ W^T with x_hat = xs * xq and W the dequantized weights of quant.c's
   formats (server.engine.quant: the reference). The integer sums are exact; only the
   few float operations after them round.

   With AVX-512 VNNI the inner products are vpdpbusd (64 byte products a instruction, 4x
   fp32 FMA's): it multiplies unsigned by signed bytes, so w8a8 stores xq + 128 and
   subtracts 128 * sum_k q[n, k] (wsum, computed once by the caller), and w4a8 multiplies
   the unsigned nibbles u by the signed xq, stored in the nibbles' order: of each 64
   inputs, 0-15, 32-47, 16-31, 48-63 (quant.c's int4 blocks hold inputs i and 16 + i in
   one byte). Without VNNI, plain C loops over the same quantized rows. Rows are done RB
   at a time, output channels NB at a time (each weight vector loaded once for RB rows,
   each row vector once for NB channels), channels split over the OpenMP team. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include "simd.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
#else
#define VNNI 0
#endif

#define RB 4 /* rows a tile */
#define NB 4 /* output channels a tile */

/* x [m, K] (row stride xs) -> xq [m, kp] bytes (kp: K rounded up to 64; the padding 0, or
   128 when shifted) and xscale [m]. shifted: xq + 128 as unsigned; nibble_order: each 64
   inputs stored as 0-15, 32-47, 16-31, 48-63. gsum [m, K / group] (when not NULL): the
   sum of xq over each group. */
static void quantize_rows(const float *x, int64_t xs, int64_t m, int64_t k_len, int64_t kp,
                          int shifted, int nibble_order, uint8_t *xq, float *xscale,
                          int32_t *gsum, int64_t group)
{
    const int pad = shifted ? 128 : 0;
    const int64_t ng = gsum ? k_len / group : 0;
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * xs;
        uint8_t *qr = xq + r * kp;
        int32_t *gs = gsum ? gsum + r * ng : NULL;
        for (int64_t g = 0; g < ng; g++) gs[g] = 0;
        float amax = 0.0f;
        int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        __m512 mx = _mm512_setzero_ps();
        for (; k + 16 <= k_len; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
        amax = _mm512_reduce_max_ps(mx);
#endif
        for (; k < k_len; k++) amax = fmaxf(amax, fabsf(xr[k]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        xscale[r] = amax / 127.0f;
        /* the last 64 padded first (in the nibble order its inputs are spread over it) */
        for (k = k_len & ~(int64_t)63; k < kp; k++) qr[k] = (uint8_t)pad;
        k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        /* 16 at a time (the pieces the nibble order moves): the conversion rounds half to
           even, as nearbyintf below */
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (; k + 16 <= k_len; k += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), vinv));
            v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
            if (gs) gs[k / group] += _mm512_reduce_add_epi32(v);
            int64_t p = k;
            if (nibble_order) { /* piece j of 16 in its 64 -> place {0, 2, 1, 3}[j] */
                const int64_t j = (k >> 4) & 3;
                p = (k & ~(int64_t)63) | ((j == 1 ? 2 : j == 2 ? 1 : j) << 4);
            }
            _mm_storeu_si128((__m128i *)(qr + p),
                             _mm512_cvtepi32_epi8(_mm512_add_epi32(v, _mm512_set1_epi32(pad))));
        }
#endif
        for (; k < k_len; k++) {
            float v = nearbyintf(xr[k] * inv); /* the default rounding: half to even */
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            int64_t p = k;
            if (nibble_order) {
                const int64_t j = (k >> 4) & 3;
                p = (k & ~(int64_t)63) | ((j == 1 ? 2 : j == 2 ? 1 : j) << 4) | (k & 15);
            }
            qr[p] = (uint8_t)((int)v + pad);
            if (gs) gs[k / group] += (int)v;
        }
    }
}

#if VNNI
/* The lane sums of a0..a3, in that order. */
static inline __m128i reduce4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3)
{
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static inline __m128 reduce4_ps(__m512 a0, __m512 a1, __m512 a2, __m512 a3)
{
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* acc[r][j] = sum_k xu[r, k] * q[n + j, k] (xu unsigned, q signed), r < nr, j < nb. */
static inline __attribute__((always_inline)) void
tile_w8(const uint8_t *xu, int64_t kp, const int8_t *q, int64_t k_len, int nr, int nb,
        int32_t acc[RB][NB])
{
    __m512i a[RB][NB];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nb; j++) a[r][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= k_len; k += 64) {
        __m512i w[NB];
        for (int j = 0; j < nb; j++) w[j] = _mm512_loadu_si512(q + j * k_len + k);
        for (int r = 0; r < nr; r++) {
            const __m512i xv = _mm512_loadu_si512(xu + r * kp + k);
            for (int j = 0; j < nb; j++) a[r][j] = _mm512_dpbusd_epi32(a[r][j], xv, w[j]);
        }
    }
    if (k < k_len) { /* the weights' last partial 64 (xu is padded) */
        const __mmask64 mask = (~0ULL) >> (64 - (k_len - k));
        __m512i w[NB];
        for (int j = 0; j < nb; j++) w[j] = _mm512_maskz_loadu_epi8(mask, q + j * k_len + k);
        for (int r = 0; r < nr; r++) {
            const __m512i xv = _mm512_loadu_si512(xu + r * kp + k);
            for (int j = 0; j < nb; j++) a[r][j] = _mm512_dpbusd_epi32(a[r][j], xv, w[j]);
        }
    }
    for (int r = 0; r < nr; r++)
        if (nb == NB)
            _mm_storeu_si128((__m128i *)acc[r], reduce4_epi32(a[r][0], a[r][1], a[r][2], a[r][3]));
        else
            for (int j = 0; j < nb; j++) acc[r][j] = _mm512_reduce_add_epi32(a[r][j]);
}

/* acc[r][j] = sum over 64-input chunks of s[g] * (u . xq) for the int4 row n + j (a lane's
   group: g0 = 64c / G in lanes 0-3 and 8-11, g1 = (64c + 32) / G in 4-7 and 12-15). */
static inline __attribute__((always_inline)) void
tile_w4(const int8_t *xq, int64_t kp, const uint8_t *q, const float *s, int64_t ng,
        int64_t k_len, int64_t group, int nr, int nb, float acc[RB][NB])
{
    __m512 a[RB][NB];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nb; j++) a[r][j] = _mm512_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m128i low16 = _mm_set1_epi8(0x0f);
    for (int64_t k = 0; k < k_len; k += 64) {
        __m512i u[NB];
        __m512 sv[NB];
        const int64_t g0 = k / group, g1 = (k + 32) / group;
        if (k + 64 <= k_len) {
            for (int j = 0; j < nb; j++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(q + j * (k_len / 2) + k / 2));
                u[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low)),
                                          _mm256_and_si256(_mm256_srli_epi16(b, 4), low), 1);
                sv[j] = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(s[j * ng + g0]),
                                             _mm512_set1_ps(s[j * ng + g1]));
            }
        } else { /* a last block of 32: inputs 0-15 in lanes 0-3, 16-31 in 8-11 */
            for (int j = 0; j < nb; j++) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(q + j * (k_len / 2) + k / 2));
                u[j] = _mm512_inserti32x4(_mm512_zextsi128_si512(_mm_and_si128(b, low16)),
                                          _mm_and_si128(_mm_srli_epi16(b, 4), low16), 2);
                sv[j] = _mm512_set1_ps(s[j * ng + g0]);
            }
        }
        for (int r = 0; r < nr; r++) {
            const __m512i xv = _mm512_loadu_si512(xq + r * kp + k);
            for (int j = 0; j < nb; j++)
                a[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(
                    _mm512_setzero_si512(), u[j], xv)), sv[j], a[r][j]);
        }
    }
    for (int r = 0; r < nr; r++)
        if (nb == NB)
            _mm_storeu_ps(acc[r], reduce4_ps(a[r][0], a[r][1], a[r][2], a[r][3]));
        else
            for (int j = 0; j < nb; j++) acc[r][j] = _mm512_reduce_add_ps(a[r][j]);
}
#else
static inline void tile_w8(const uint8_t *xu, int64_t kp, const int8_t *q, int64_t k_len,
                           int nr, int nb, int32_t acc[RB][NB])
{
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nb; j++) {
            const uint8_t *xr = xu + r * kp;
            const int8_t *qn = q + j * k_len;
            int32_t t = 0;
            for (int64_t k = 0; k < k_len; k++) t += (int32_t)xr[k] * qn[k];
            acc[r][j] = t;
        }
}

static inline void tile_w4(const int8_t *xq, int64_t kp, const uint8_t *q, const float *s,
                           int64_t ng, int64_t k_len, int64_t group, int nr, int nb,
                           float acc[RB][NB])
{
    (void)kp;
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nb; j++) {
            const int8_t *xr = xq + r * kp;
            const uint8_t *qn = q + j * (k_len / 2);
            float t = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                int32_t d = 0;
                for (int64_t k = g * group; k < (g + 1) * group; k++) {
                    const int64_t blk = k / 32 * 16, i = k % 32;
                    const int uk = i < 16 ? qn[blk + i] & 15 : qn[blk + i - 16] >> 4;
                    d += uk * xr[k];
                }
                t += s[j * ng + g] * (float)d;
            }
            acc[r][j] = t;
        }
}
#endif

#define DISPATCH(call_nr_nb)                                                             \
    switch (nr * 8 + nb) {                                                               \
    case 4 * 8 + 4: call_nr_nb(4, 4); break;                                             \
    case 3 * 8 + 4: call_nr_nb(3, 4); break;                                             \
    case 2 * 8 + 4: call_nr_nb(2, 4); break;                                             \
    case 1 * 8 + 4: call_nr_nb(1, 4); break;                                             \
    default: /* the last channels (N not a multiple of NB): one at a time */             \
        call_general(nr, nb);                                                            \
    }

/* y[r, n] = w8a8 (above) for r < m, n < N; wsum[n] = sum_k q[n, k]. Returns -1 with no
   memory for the quantized rows. */
int q8a8_matmul(const float *x, int64_t xs, int64_t m, const int8_t *q, const float *s,
                const int32_t *wsum, const float *bias, int64_t n_out, int64_t k_len,
                float *y, int64_t ys, int64_t threads)
{
    const int64_t kp = (k_len + 63) & ~(int64_t)63;
    uint8_t *xu = malloc((size_t)(m * kp) + sizeof(float) * (size_t)m);
    if (!xu) return -1;
    float *xscale = (float *)(xu + m * kp);
    quantize_rows(x, xs, m, k_len, kp, 1, 0, xu, xscale, NULL, 32);
    const int64_t nblocks = (n_out + NB - 1) / NB;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int64_t n0 = blk * NB;
        const int nb = n_out - n0 < NB ? (int)(n_out - n0) : NB;
        const int8_t *qn = q + n0 * k_len;
        for (int64_t r0 = 0; r0 < m; r0 += RB) {
            const int nr = m - r0 < RB ? (int)(m - r0) : RB;
            const uint8_t *xr = xu + r0 * kp;
            int32_t acc[RB][NB];
#define CALL(a, b) tile_w8(xr, kp, qn, k_len, a, b, acc)
#define call_general(a, b) for (int j = 0; j < (b); j++) {                               \
                int32_t one[RB][NB];                                                     \
                tile_w8(xr, kp, qn + j * k_len, k_len, a, 1, one);                       \
                for (int r = 0; r < (a); r++) acc[r][j] = one[r][0];                     \
            }
            DISPATCH(CALL)
#undef CALL
#undef call_general
            for (int r = 0; r < nr; r++)
                for (int j = 0; j < nb; j++) {
                    const int64_t n = n0 + j;
                    const float t = (float)(acc[r][j] - 128 * wsum[n]) * (xscale[r0 + r] * s[n]);
                    y[(r0 + r) * ys + n] = bias ? t + bias[n] : t;
                }
        }
    }
    free(xu);
    return 0;
}

/* y[r, n] = w4a8 (above) for the int4 weight (q [N, K/2], s and lo [N, K/G]); K and G
   multiples of 32. Returns -1 with no memory for the quantized rows. */
int q4a8_matmul(const float *x, int64_t xs, int64_t m, const uint8_t *q, const float *s,
                const float *lo, const float *bias, int64_t n_out, int64_t k_len,
                int64_t group, float *y, int64_t ys, int64_t threads)
{
    const int64_t kp = (k_len + 63) & ~(int64_t)63, ng = k_len / group;
    uint8_t *buf = malloc((size_t)(m * kp) + sizeof(float) * (size_t)(m + m * ng)
                          + sizeof(int32_t) * (size_t)(m * ng));
    if (!buf) return -1;
    float *xscale = (float *)(buf + m * kp), *gsumf = xscale + m;
    int32_t *gsum = (int32_t *)(gsumf + m * ng);
    quantize_rows(x, xs, m, k_len, kp, 0, VNNI, buf, xscale, gsum, group);
    for (int64_t i = 0; i < m * ng; i++) gsumf[i] = (float)gsum[i];
    const int8_t *xq = (const int8_t *)buf;
    const int64_t nblocks = (n_out + NB - 1) / NB;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int64_t n0 = blk * NB;
        const int nb = n_out - n0 < NB ? (int)(n_out - n0) : NB;
        const uint8_t *qn = q + n0 * (k_len / 2);
        const float *sn = s + n0 * ng;
        for (int64_t r0 = 0; r0 < m; r0 += RB) {
            const int nr = m - r0 < RB ? (int)(m - r0) : RB;
            const int8_t *xr = xq + r0 * kp;
            float acc[RB][NB];
#define CALL(a, b) tile_w4(xr, kp, qn, sn, ng, k_len, group, a, b, acc)
#define call_general(a, b) for (int j = 0; j < (b); j++) {                               \
                float one[RB][NB];                                                       \
                tile_w4(xr, kp, qn + j * (k_len / 2), sn + j * ng, ng, k_len, group, a, 1, \
                        one);                                                            \
                for (int r = 0; r < (a); r++) acc[r][j] = one[r][0];                     \
            }
            DISPATCH(CALL)
#undef CALL
#undef call_general
            for (int r = 0; r < nr; r++)
                for (int j = 0; j < nb; j++) {
                    const int64_t n = n0 + j;
                    const float *lon = lo + n * ng, *gs = gsumf + (r0 + r) * ng;
                    float off = 0.0f;
                    for (int64_t g = 0; g < ng; g++) off += lon[g] * gs[g];
                    const float t = xscale[r0 + r] * (acc[r][j] + off);
                    y[(r0 + r) * ys + n] = bias ? t + bias[n] : t;
                }
        }
    }
    free(buf);
    return 0;
}
