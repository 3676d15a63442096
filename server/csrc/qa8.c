/* Projections with 8-bit activations (`--quantize w8a8|w4a8`): each row of x is rounded to
   int8 with its own scale (max |x[r]| / 127, round half to even), then multiplied by int8
   or int4 weights in integer arithmetic, as llama.cpp's Q8_0/Q4_0 do:

     w8a8: y[r, n] = xs[r] * s[n] * sum_k xq[r, k] q[n, k]                     (+ bias[n])
     w4a8: y[r, n] = xs[r] * sum_g (s[n, g] * sum_{k in g} xq[r, k] u[n, k]
                                    + lo[n, g] * sum_{k in g} xq[r, k])          (+ bias[n])

   that is x_hat @ W^T with x_hat = xs * xq and W the dequantized weights (int8 as
   quant.c's; int4 with groups of 32 in an interleaved layout, q4a8_matmul below;
   server.engine.quant has the reference). The integer sums are exact; only the few float
   operations after them round.

   With AVX-512 VNNI the inner products are vpdpbusd (64 byte products an instruction, 4x
   fp32 FMA's): it multiplies unsigned by signed bytes, so w8a8 stores xq + 128 and
   subtracts 128 * sum_k q[n, k] (wsum, computed once by the caller), and w4a8 multiplies
   the unsigned nibbles u by the signed xq. Without VNNI, plain C loops over the same
   quantized rows. Both take 16 output channels and RB rows at a time (each weight vector
   loaded once for RB rows); the blocks of channels are split over the OpenMP team. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include "simd.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
#else
#define VNNI 0
#endif

#define RB 6 /* rows a tile */

/* x [m, K] (row stride xs) -> xq [m, kp] bytes (kp: K rounded up to 64; the padding 0, or
   128 when shifted) and xscale [m]. shifted: xq + 128 as unsigned. gsum [m, K / group]
   (when not NULL): the sum of xq over each group. */
static void quantize_rows(const float *x, int64_t xs, int64_t m, int64_t k_len, int64_t kp,
                          int shifted, uint8_t *xq, float *xscale,
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
        for (k = k_len; k < kp; k++) qr[k] = (uint8_t)pad;
        k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        /* 16 at a time: the conversion rounds half to even, as nearbyintf below */
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (; k + 16 <= k_len; k += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), vinv));
            v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
            if (gs) gs[k / group] += _mm512_reduce_add_epi32(v);
            _mm_storeu_si128((__m128i *)(qr + k),
                             _mm512_cvtepi32_epi8(_mm512_add_epi32(v, _mm512_set1_epi32(pad))));
        }
#endif
        for (; k < k_len; k++) {
            float v = nearbyintf(xr[k] * inv); /* the default rounding: half to even */
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            qr[k] = (uint8_t)((int)v + pad);
            if (gs) gs[k / group] += (int)v;
        }
    }
}

/* y[r, n] = w8a8 (above) for the int8 weight in the interleaved layout of
   server.engine.quant.interleave_int8: for each block of 16 output channels, K / 4 runs of
   64 bytes, byte 4 * lane + b of run j holding q[n0 + lane, 4 j + b] (K padded to 4, N to
   16, with zeros). One vpdpbusd multiplies 4 inputs of one row (broadcast) by those of 16
   channels: a lane holds one channel's sum, so no horizontal sums. s, wsum [N]: the
   channels' scales and sum_k q[n, k]. Returns -1 with no memory for the quantized rows. */
int q8a8_matmul(const float *x, int64_t xs, int64_t m, const int8_t *q, const float *s,
                const int32_t *wsum, const float *bias, int64_t n_out, int64_t k_len,
                float *y, int64_t ys, int64_t threads)
{
    const int64_t kp = (k_len + 63) & ~(int64_t)63, kq = (k_len + 3) / 4;
    uint8_t *xu = malloc((size_t)(m * kp) + sizeof(float) * (size_t)m);
    if (!xu) return -1;
    float *xscale = (float *)(xu + m * kp);
    quantize_rows(x, xs, m, k_len, kp, 1, xu, xscale, NULL, 32);
    const int64_t nblocks = (n_out + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int8_t *qb = q + blk * kq * 64;
        const int64_t n0 = blk * 16, nb = n_out - n0 < 16 ? n_out - n0 : 16;
        for (int64_t r0 = 0; r0 < m; r0 += RB) {
            const int nr = m - r0 < RB ? (int)(m - r0) : RB;
#if VNNI
            __m512i a0[RB], a1[RB];
            for (int r = 0; r < RB; r++) a0[r] = a1[r] = _mm512_setzero_si512();
            int64_t j = 0;
            for (; j + 2 <= kq; j += 2) {
                const __m512i w0 = _mm512_loadu_si512(qb + j * 64);
                const __m512i w1 = _mm512_loadu_si512(qb + j * 64 + 64);
                for (int r = 0; r < RB; r++) {
                    if (r >= nr) break;
                    const int32_t *xr = (const int32_t *)(xu + (r0 + r) * kp);
                    a0[r] = _mm512_dpbusd_epi32(a0[r], _mm512_set1_epi32(xr[j]), w0);
                    a1[r] = _mm512_dpbusd_epi32(a1[r], _mm512_set1_epi32(xr[j + 1]), w1);
                }
            }
            if (j < kq) {
                const __m512i w0 = _mm512_loadu_si512(qb + j * 64);
                for (int r = 0; r < nr; r++) {
                    const int32_t *xr = (const int32_t *)(xu + (r0 + r) * kp);
                    a0[r] = _mm512_dpbusd_epi32(a0[r], _mm512_set1_epi32(xr[j]), w0);
                }
            }
            const __mmask16 mask = (__mmask16)((1u << nb) - 1);
            const __m512i off = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, wsum + n0), 7);
            const __m512 sv = _mm512_maskz_loadu_ps(mask, s + n0);
            const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
            for (int r = 0; r < nr; r++) {
                const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                    _mm512_add_epi32(a0[r], a1[r]), off)),
                    _mm512_mul_ps(_mm512_set1_ps(xscale[r0 + r]), sv));
                _mm512_mask_storeu_ps(y + (r0 + r) * ys + n0, mask, _mm512_add_ps(t, bv));
            }
#else
            for (int r = 0; r < nr; r++) {
                const uint8_t *xr = xu + (r0 + r) * kp;
                for (int lane = 0; lane < nb; lane++) {
                    int32_t t = 0;
                    for (int64_t k = 0; k < k_len; k++)
                        t += (int32_t)xr[k] * qb[(k / 4) * 64 + lane * 4 + k % 4];
                    const int64_t n = n0 + lane;
                    const float v = (float)(t - 128 * wsum[n]) * (xscale[r0 + r] * s[n]);
                    y[(r0 + r) * ys + n] = bias ? v + bias[n] : v;
                }
            }
#endif
        }
    }
    free(xu);
    return 0;
}

/* y[r, n] = w4a8 (above) for the int4 weight in the interleaved layout of
   server.engine.quant.interleave_int4: for each block of 16 output channels and group g of
   32 inputs, 256 bytes: 4 pairs of 64 bytes, byte 4 * lane + b of pair p holding
   u[n0 + lane, 32 g + 8 p + b] (low nibble) and u[n0 + lane, 32 g + 8 p + 4 + b] (high);
   s and lo [blocks, K / 32, 16]. One vpdpbusd multiplies 4 inputs of one row (broadcast)
   by those of 16 channels, so a lane sums a whole group before its scale is applied: one
   conversion and two FMAs a group instead of one a 64 inputs. Returns -1 with no memory
   for the quantized rows. */
int q4a8_matmul(const float *x, int64_t xs, int64_t m, const uint8_t *q, const float *s,
                const float *lo, const float *bias, int64_t n_out, int64_t k_len,
                float *y, int64_t ys, int64_t threads)
{
    const int64_t kp = (k_len + 63) & ~(int64_t)63, ng = k_len / 32;
    uint8_t *buf = malloc((size_t)(m * kp) + sizeof(float) * (size_t)(m + m * ng)
                          + sizeof(int32_t) * (size_t)(m * ng));
    if (!buf) return -1;
    float *xscale = (float *)(buf + m * kp), *gsumf = xscale + m;
    int32_t *gsum = (int32_t *)(gsumf + m * ng);
    quantize_rows(x, xs, m, k_len, kp, 0, buf, xscale, gsum, 32);
    for (int64_t i = 0; i < m * ng; i++) gsumf[i] = (float)gsum[i];
    const int8_t *xq = (const int8_t *)buf;
    const int64_t nblocks = (n_out + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const uint8_t *qb = q + blk * ng * 256;
        const float *sb = s + blk * ng * 16, *lb = lo + blk * ng * 16;
        const int64_t n0 = blk * 16, nb = n_out - n0 < 16 ? n_out - n0 : 16;
        for (int64_t r0 = 0; r0 < m; r0 += RB) {
            const int nr = m - r0 < RB ? (int)(m - r0) : RB;
#if VNNI
            __m512 acc[RB];
            for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
            const __m512i low = _mm512_set1_epi8(0x0f);
            for (int64_t g = 0; g < ng; g++) {
                __m512i u[8];
                for (int p = 0; p < 4; p++) {
                    const __m512i v = _mm512_loadu_si512(qb + g * 256 + p * 64);
                    u[2 * p] = _mm512_and_si512(v, low);
                    u[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                const __m512 sv = _mm512_loadu_ps(sb + g * 16), lv = _mm512_loadu_ps(lb + g * 16);
                for (int r = 0; r < RB; r++) {
                    if (r >= nr) break;
                    const int32_t *xr = (const int32_t *)(xq + (r0 + r) * kp + g * 32);
                    __m512i t0 = _mm512_setzero_si512(), t1 = t0;
                    for (int qd = 0; qd < 8; qd += 2) {
                        t0 = _mm512_dpbusd_epi32(t0, u[qd], _mm512_set1_epi32(xr[qd]));
                        t1 = _mm512_dpbusd_epi32(t1, u[qd + 1], _mm512_set1_epi32(xr[qd + 1]));
                    }
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)), sv, acc[r]);
                    acc[r] = _mm512_fmadd_ps(lv, _mm512_set1_ps(gsumf[(r0 + r) * ng + g]), acc[r]);
                }
            }
            const __mmask16 mask = (__mmask16)((1u << nb) - 1);
            const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
            for (int r = 0; r < nr; r++)
                _mm512_mask_storeu_ps(y + (r0 + r) * ys + n0, mask, _mm512_fmadd_ps(
                    _mm512_set1_ps(xscale[r0 + r]), acc[r], bv));
#else
            for (int r = 0; r < nr; r++) {
                const int8_t *xr = xq + (r0 + r) * kp;
                for (int lane = 0; lane < nb; lane++) {
                    float t = 0.0f;
                    for (int64_t g = 0; g < ng; g++) {
                        int32_t d = 0;
                        for (int p = 0; p < 4; p++)
                            for (int b = 0; b < 4; b++) {
                                const uint8_t v = qb[g * 256 + p * 64 + lane * 4 + b];
                                d += (v & 15) * xr[g * 32 + 8 * p + b]
                                     + (v >> 4) * xr[g * 32 + 8 * p + 4 + b];
                            }
                        t = fmaf((float)d, sb[g * 16 + lane], t);
                        t = fmaf(lb[g * 16 + lane], gsumf[(r0 + r) * ng + g], t);
                    }
                    y[(r0 + r) * ys + n0 + lane] = xscale[r0 + r] * t + (bias ? bias[n0 + lane] : 0.0f);
                }
            }
#endif
        }
    }
    free(buf);
    return 0;
}
