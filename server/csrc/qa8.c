/* Projections with 8-bit activations (`--quantize w8a8|w4a8`): each row of x is rounded to
   int8 in blocks of 32 inputs, each block with its own scale (max |x| / 127 over the
   block, round half to even: the activations of llama.cpp's Q8_0), then multiplied by
   int8 or int4 weights in integer arithmetic:

     w8a8: y[r, n] = s[n] * sum_g xs[r, g] * sum_{k in g} xq[r, k] q[n, k]      (+ bias[n])
     w4a8: y[r, n] = sum_g xs[r, g] * (s[n, g] * sum_{k in g} xq[r, k] u[n, k]
                                       + lo[n, g] * sum_{k in g} xq[r, k])      (+ bias[n])

   that is x_hat @ W^T with x_hat = xs * xq and W the dequantized weights (int8 per channel
   as quant.c's; int4 per group of 32 as quant.c's, in another layout), whose reference is
   server.engine.quant's. Each block's integer sum is exact; the float operations after
   it round.

   The weights are interleaved 16 output channels to a vector (server.engine.quant's
   interleave_int8 / interleave_int4): with AVX-512 VNNI one vpdpbusd multiplies 4 inputs
   of one row (broadcast) by those of 16 channels, 64 byte products an instruction (4x fp32
   FMA's), a lane holding one channel's sum: no horizontal sums, and each block of 32 is
   scaled once, one conversion and FMA a block. vpdpbusd multiplies unsigned by signed
   bytes: w8a8 stores xq + 128 and subtracts 128 * sum_{k in g} q[n, k] (wsum128, computed
   once by the caller); w4a8 multiplies the unsigned nibbles u by the signed xq. With AVX2
   and no VNNI, vpmaddubsw + vpmaddwd do the same on two halves of 8 channels (w8a8 with
   |xq| times the weight carrying xq's sign, so no pair sum leaves int16); elsewhere plain
   C loops over the same layouts. A block of 16 channels is done RB rows at a
   time (its weights stay in L1 while the row tiles pass); blocks of channels are split
   over the OpenMP team. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include "simd.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
#define AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#define VNNI 0
#define AVX2 1
#else
#define VNNI 0
#define AVX2 0
#endif
/* w8a8 multiplies xq + 128 (VNNI's unsigned operand; plain C the same) or, with AVX2,
   |xq| by the weight with xq's sign (vpmaddubsw's products stay within int16) */
#define W8_SHIFTED (!AVX2)

#define RB 6   /* rows a tile */
#define QB 32  /* inputs a block (one activation scale; one int4 weight group) */

/* x [m, K] (row stride xs) -> xq [m, kp] bytes (kp: K rounded up to QB, the padding 0, or
   128 when shifted) and xscale [m, ng], ng = kp / QB; shifted: xq + 128 as unsigned.
   gsx (when not NULL) [m, ng]: xscale times the block's sum of xq. */
static void quantize_blocks(const float *x, int64_t xs, int64_t m, int64_t k_len, int shifted,
                            uint8_t *xq, float *xscale, float *gsx)
{
    const int pad = shifted ? 128 : 0;
    const int64_t ng = (k_len + QB - 1) / QB, kp = ng * QB;
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * xs;
        uint8_t *qr = xq + r * kp;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t k0 = g * QB, k1 = k0 + QB < k_len ? k0 + QB : k_len;
            float amax = 0.0f;
            int32_t sum = 0;
            int64_t k = k0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            if (k1 - k0 == QB) { /* a whole block: the conversion rounds half to even, as
                                    nearbyintf below */
                const __m512 a = _mm512_loadu_ps(xr + k0), b = _mm512_loadu_ps(xr + k0 + 16);
                amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
                const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
                const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
                __m512i va = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
                __m512i vb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
                va = _mm512_min_epi32(_mm512_max_epi32(va, lo), hi);
                vb = _mm512_min_epi32(_mm512_max_epi32(vb, lo), hi);
                sum = _mm512_reduce_add_epi32(_mm512_add_epi32(va, vb));
                const __m512i p = _mm512_set1_epi32(pad);
                _mm_storeu_si128((__m128i *)(qr + k0), _mm512_cvtepi32_epi8(_mm512_add_epi32(va, p)));
                _mm_storeu_si128((__m128i *)(qr + k0 + 16),
                                 _mm512_cvtepi32_epi8(_mm512_add_epi32(vb, p)));
                xscale[r * ng + g] = amax / 127.0f;
                if (gsx) gsx[r * ng + g] = xscale[r * ng + g] * (float)sum;
                continue;
            }
#endif
            for (; k < k1; k++) amax = fmaxf(amax, fabsf(xr[k]));
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (k = k0; k < k1; k++) {
                float v = nearbyintf(xr[k] * inv); /* the default rounding: half to even */
                v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                qr[k] = (uint8_t)((int)v + pad);
                sum += (int)v;
            }
            for (; k < k0 + QB; k++) qr[k] = (uint8_t)pad;
            xscale[r * ng + g] = amax / 127.0f;
            if (gsx) gsx[r * ng + g] = xscale[r * ng + g] * (float)sum;
        }
    }
}

/* The scratch of a call: the quantized rows, their scales and (w4a8) scaled block sums. */
static uint8_t *scratch(int64_t m, int64_t k_len, float **xscale, float **gsx)
{
    const int64_t ng = (k_len + QB - 1) / QB;
    uint8_t *buf = malloc((size_t)(m * ng * QB) + 2 * sizeof(float) * (size_t)(m * ng));
    if (buf) {
        *xscale = (float *)(buf + m * ng * QB);
        *gsx = *xscale + m * ng;
    }
    return buf;
}

/* y[r, n] = w8a8 (above) for the int8 weight in the layout of
   server.engine.quant.interleave_int8: for each block of 16 output channels, kp / 4 runs
   of 64 bytes (kp: K rounded up to 32), byte 4 * lane + b of run j holding
   q[n0 + lane, 4 j + b] (N padded to 16, K to kp, with zeros). wsum128 [blocks, ng, 16]:
   128 * sum_{k in g} q[n, k]; s [N]: the channels' scales. Returns -1 with no memory for
   the quantized rows. */
int q8a8_matmul(const float *x, int64_t xs, int64_t m, const int8_t *q, const float *s,
                const int32_t *wsum128, const float *bias, int64_t n_out, int64_t k_len,
                float *y, int64_t ys, int64_t threads)
{
    const int64_t ng = (k_len + QB - 1) / QB, kp = ng * QB;
    float *xscale, *gsx;
    uint8_t *xu = scratch(m, k_len, &xscale, &gsx);
    if (!xu) return -1;
    quantize_blocks(x, xs, m, k_len, W8_SHIFTED, xu, xscale, NULL);
    const int64_t nblocks = (n_out + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int8_t *qb = q + blk * kp * 16;
        const int32_t *ob = wsum128 + blk * ng * 16;
        const int64_t n0 = blk * 16, nb = n_out - n0 < 16 ? n_out - n0 : 16;
        for (int64_t r0 = 0; r0 < m; r0 += RB) {
            const int nr = m - r0 < RB ? (int)(m - r0) : RB;
#if VNNI
            __m512 acc[RB];
            for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                __m512i w[8];
                for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(qb + (g * 8 + j) * 64);
                const __m512i off = _mm512_loadu_si512(ob + g * 16);
                for (int r = 0; r < RB; r++) {
                    if (r >= nr) break;
                    const int32_t *xr = (const int32_t *)(xu + (r0 + r) * kp + g * QB);
                    __m512i t0 = _mm512_setzero_si512(), t1 = t0;
                    for (int j = 0; j < 8; j += 2) {
                        t0 = _mm512_dpbusd_epi32(t0, _mm512_set1_epi32(xr[j]), w[j]);
                        t1 = _mm512_dpbusd_epi32(t1, _mm512_set1_epi32(xr[j + 1]), w[j + 1]);
                    }
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                        _mm512_add_epi32(t0, t1), off)),
                        _mm512_set1_ps(xscale[(r0 + r) * ng + g]), acc[r]);
                }
            }
            const __mmask16 mask = (__mmask16)((1u << nb) - 1);
            const __m512 sv = _mm512_maskz_loadu_ps(mask, s + n0);
            const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
            for (int r = 0; r < nr; r++)
                _mm512_mask_storeu_ps(y + (r0 + r) * ys + n0, mask,
                                      _mm512_fmadd_ps(acc[r], sv, bv));
#elif AVX2
            /* each 64-byte run as two halves of 8 channels; vpmaddubsw + vpmaddwd stand in
               for vpdpbusd (3 instructions, and the sign moved onto the weights) */
            const __m256i ones = _mm256_set1_epi16(1);
            (void)ob; /* (xq not shifted: nothing to take back) */
            for (int r = 0; r < nr; r++) {
                __m256 lo8 = _mm256_setzero_ps(), hi8 = lo8;
                for (int64_t g = 0; g < ng; g++) {
                    const int32_t *xr = (const int32_t *)(xu + (r0 + r) * kp + g * QB);
                    __m256i tl = _mm256_setzero_si256(), th = tl;
                    for (int j = 0; j < 8; j++) {
                        const __m256i xb = _mm256_set1_epi32(xr[j]), ax = _mm256_abs_epi8(xb);
                        const int8_t *wp = qb + (g * 8 + j) * 64;
                        const __m256i wl = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)wp), xb);
                        const __m256i wh = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(wp + 32)), xb);
                        tl = _mm256_add_epi32(tl, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, wl), ones));
                        th = _mm256_add_epi32(th, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, wh), ones));
                    }
                    const __m256 xsc = _mm256_set1_ps(xscale[(r0 + r) * ng + g]);
                    lo8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tl), xsc, lo8);
                    hi8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(th), xsc, hi8);
                }
                float t[16];
                _mm256_storeu_ps(t, lo8);
                _mm256_storeu_ps(t + 8, hi8);
                for (int lane = 0; lane < nb; lane++) {
                    const int64_t n = n0 + lane;
                    y[(r0 + r) * ys + n] = fmaf(t[lane], s[n], bias ? bias[n] : 0.0f);
                }
            }
#else
            for (int r = 0; r < nr; r++) {
                const uint8_t *xr = xu + (r0 + r) * kp;
                for (int lane = 0; lane < nb; lane++) {
                    float t = 0.0f;
                    for (int64_t g = 0; g < ng; g++) {
                        int32_t d = 0;
                        for (int64_t k = g * QB; k < (g + 1) * QB; k++)
                            d += (int32_t)xr[k] * qb[(k / 4) * 64 + lane * 4 + k % 4];
                        t = fmaf((float)(d - ob[g * 16 + lane]), xscale[(r0 + r) * ng + g], t);
                    }
                    const int64_t n = n0 + lane;
                    y[(r0 + r) * ys + n] = fmaf(t, s[n], bias ? bias[n] : 0.0f);
                }
            }
#endif
        }
    }
    free(xu);
    return 0;
}

/* y[r, n] = w4a8 (above) for the int4 weight in the layout of
   server.engine.quant.interleave_int4: for each block of 16 output channels and group g of
   32 inputs, 256 bytes: 4 pairs of 64 bytes, byte 4 * lane + b of pair p holding
   u[n0 + lane, 32 g + 8 p + b] (low nibble) and u[n0 + lane, 32 g + 8 p + 4 + b] (high);
   s and lo [blocks, K / 32, 16]. K a multiple of 32. Returns -1 with no memory for the
   quantized rows. */
int q4a8_matmul(const float *x, int64_t xs, int64_t m, const uint8_t *q, const float *s,
                const float *lo, const float *bias, int64_t n_out, int64_t k_len,
                float *y, int64_t ys, int64_t threads)
{
    const int64_t ng = k_len / QB, kp = ng * QB;
    float *xscale, *gsx;
    uint8_t *buf = scratch(m, k_len, &xscale, &gsx);
    if (!buf) return -1;
    quantize_blocks(x, xs, m, k_len, 0, buf, xscale, gsx);
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
                    const int64_t rg = (r0 + r) * ng + g;
                    const int32_t *xr = (const int32_t *)(xq + (r0 + r) * kp + g * QB);
                    __m512i t0 = _mm512_setzero_si512(), t1 = t0;
                    for (int j = 0; j < 8; j += 2) {
                        t0 = _mm512_dpbusd_epi32(t0, u[j], _mm512_set1_epi32(xr[j]));
                        t1 = _mm512_dpbusd_epi32(t1, u[j + 1], _mm512_set1_epi32(xr[j + 1]));
                    }
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)),
                                             _mm512_mul_ps(sv, _mm512_set1_ps(xscale[rg])), acc[r]);
                    acc[r] = _mm512_fmadd_ps(lv, _mm512_set1_ps(gsx[rg]), acc[r]);
                }
            }
            const __mmask16 mask = (__mmask16)((1u << nb) - 1);
            const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
            for (int r = 0; r < nr; r++)
                _mm512_mask_storeu_ps(y + (r0 + r) * ys + n0, mask, _mm512_add_ps(acc[r], bv));
#elif AVX2
            const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
            for (int r = 0; r < nr; r++) {
                __m256 lo8 = _mm256_setzero_ps(), hi8 = lo8;
                for (int64_t g = 0; g < ng; g++) {
                    const int64_t rg = (r0 + r) * ng + g;
                    const int32_t *xr = (const int32_t *)(xq + (r0 + r) * kp + g * QB);
                    __m256i tl = _mm256_setzero_si256(), th = tl;
                    for (int p = 0; p < 4; p++) {
                        const __m256i x0 = _mm256_set1_epi32(xr[2 * p]);
                        const __m256i x1 = _mm256_set1_epi32(xr[2 * p + 1]);
                        const uint8_t *vp = qb + g * 256 + p * 64;
                        const __m256i vl = _mm256_loadu_si256((const __m256i *)vp);
                        const __m256i vh = _mm256_loadu_si256((const __m256i *)(vp + 32));
                        tl = _mm256_add_epi32(tl, _mm256_madd_epi16(_mm256_add_epi16(
                            _mm256_maddubs_epi16(_mm256_and_si256(vl, low), x0),
                            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(vl, 4), low), x1)),
                            ones));
                        th = _mm256_add_epi32(th, _mm256_madd_epi16(_mm256_add_epi16(
                            _mm256_maddubs_epi16(_mm256_and_si256(vh, low), x0),
                            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(vh, 4), low), x1)),
                            ones));
                    }
                    const __m256 xsc = _mm256_set1_ps(xscale[rg]), gs = _mm256_set1_ps(gsx[rg]);
                    lo8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tl),
                                          _mm256_mul_ps(_mm256_loadu_ps(sb + g * 16), xsc), lo8);
                    hi8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(th),
                                          _mm256_mul_ps(_mm256_loadu_ps(sb + g * 16 + 8), xsc), hi8);
                    lo8 = _mm256_fmadd_ps(_mm256_loadu_ps(lb + g * 16), gs, lo8);
                    hi8 = _mm256_fmadd_ps(_mm256_loadu_ps(lb + g * 16 + 8), gs, hi8);
                }
                float t[16];
                _mm256_storeu_ps(t, lo8);
                _mm256_storeu_ps(t + 8, hi8);
                for (int lane = 0; lane < nb; lane++)
                    y[(r0 + r) * ys + n0 + lane] = t[lane] + (bias ? bias[n0 + lane] : 0.0f);
            }
#else
            for (int r = 0; r < nr; r++) {
                const int8_t *xr = xq + (r0 + r) * kp;
                for (int lane = 0; lane < nb; lane++) {
                    float t = 0.0f;
                    for (int64_t g = 0; g < ng; g++) {
                        const int64_t rg = (r0 + r) * ng + g;
                        int32_t d = 0;
                        for (int p = 0; p < 4; p++)
                            for (int b = 0; b < 4; b++) {
                                const uint8_t v = qb[g * 256 + p * 64 + lane * 4 + b];
                                d += (v & 15) * xr[g * QB + 8 * p + b]
                                     + (v >> 4) * xr[g * QB + 8 * p + 4 + b];
                            }
                        t = fmaf((float)d, sb[g * 16 + lane] * xscale[rg], t);
                        t = fmaf(lb[g * 16 + lane], gsx[rg], t);
                    }
                    y[(r0 + r) * ys + n0 + lane] = t + (bias ? bias[n0 + lane] : 0.0f);
                }
            }
#endif
        }
    }
    free(buf);
    return 0;
}

/* Which inner products this build does: 2 AVX-512 VNNI, 1 AVX2, 0 plain C (logged). */
int qa8_path(void)
{
    return VNNI ? 2 : AVX2 ? 1 : 0;
}
