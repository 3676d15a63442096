/* Decode tokens through a layer's non-matmul parts, fp32, CPU: the engine's path for
   steps whose tokens are all decode tokens (one per row), where PyTorch spends about 28
   small ops a layer and its batched attention reads every row's keys up to the longest
   row. The matmuls stay PyTorch's (BLAS); these replace the ops between them with one
   call each, and attention reads each row's own positions only. Each computes what
   server/engine/model.py's PyTorch ops compute, in fp32 (tests compare them). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* e^x to about 2 ulp for x in [-87, 88] (clamped there); vectorizes under omp simd.
   (Needs IEEE rounding to nearest and no -ffast-math reassociation.) */
static inline float exp_approx(float x)
{
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* round to nearest by adding and subtracting 1.5 * 2^23 (no floorf: it would not
       vectorize without -fno-trapping-math) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187045e-06f, r);
    float p = 1.0f / 5040;
    p = fmaf(p, r, 1.0f / 720);
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static void rms_norm_row(const float *x, const float *w, float *out, int64_t h, float eps)
{
    float ss = 0.0f;
    #pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < h; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)h + eps);
    #pragma omp simd
    for (int64_t i = 0; i < h; i++) out[i] = w[i] * (x[i] * inv);
}

/* out = x / sqrt(mean(x^2) + eps) * w, for n rows of h (contiguous). */
void rms_norm_rows(const float *x, const float *w, float *out, int64_t n, int64_t h, float eps)
{
    for (int64_t k = 0; k < n; k++) rms_norm_row(x + k * h, w, out + k * h, h, eps);
}

/* The residual add and the next norm: x += d; out = rms_norm(x) * w (n rows of h). */
void add_rms_norm_rows(float *x, const float *d, const float *w, float *out, int64_t n,
                       int64_t h, float eps)
{
    for (int64_t k = 0; k < n; k++) {
        float *xk = x + k * h;
        const float *dk = d + k * h;
        #pragma omp simd
        for (int64_t i = 0; i < h; i++) xk[i] += dk[i];
        rms_norm_row(xk, w, out + k * h, h, eps);
    }
}

/* out[k, i] = silu(gu[k, i]) * gu[k, m + i]: the gate and up halves of the fused
   projection, n rows of 2m -> n rows of m. */
void silu_mul_rows(const float *gu, float *out, int64_t n, int64_t m)
{
    for (int64_t k = 0; k < n; k++) {
        const float *g = gu + k * 2 * m, *u = g + m;
        float *o = out + k * m;
        #pragma omp simd
        for (int64_t i = 0; i < m; i++) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
    }
}

/* RoPE in place on one head of d: x * cos + roll(x, d/2) * sin_rot (model._rope). */
static void rope(float *v, int64_t d, const float *cos, const float *sin_rot)
{
    int64_t half = d / 2;
    float tmp[512];
    memcpy(tmp, v, sizeof(float) * (size_t)d);
    for (int64_t i = 0; i < d; i++)
        v[i] = tmp[i] * cos[i] + tmp[i < half ? i + half : i - half] * sin_rot[i];
}

/* scores[h * len + j] = (q_h . keys[j]) * scale for the group's query heads h: each key
   is read once for the whole group. */
static void scores_qk(const float *q, const float *keys, int64_t len, int64_t group,
                      int64_t d, float scale, float *scores)
{
    if (d % W == 0 && d <= 8 * W && group <= 8) {
        vec qv[8][8];
        const int64_t nv = d / W;
        for (int64_t h = 0; h < group; h++)
            for (int64_t b = 0; b < nv; b++) qv[h][b] = VLOAD(q + h * d + b * W);
        for (int64_t j = 0; j < len; j++) {
            const float *kj = keys + j * d;
            /* the keys 16 ahead: each (row, kv head) is a short stream the hardware prefetcher
               meets cold (measured: 23 -> 20 ms a 32-row step of the default model) */
            for (int64_t b = 0; b < d; b += 16) __builtin_prefetch(kj + 16 * d + b, 0, 3);
            vec kv[8];
            for (int64_t b = 0; b < nv; b++) kv[b] = VLOAD(kj + b * W);
            for (int64_t h = 0; h < group; h++) {
                vec acc = VZERO();
                for (int64_t b = 0; b < nv; b++) acc = VFMA(qv[h][b], kv[b], acc);
                scores[h * len + j] = vsum(acc) * scale;
            }
        }
        return;
    }
    for (int64_t j = 0; j < len; j++)
        for (int64_t h = 0; h < group; h++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < d; i++) acc += q[h * d + i] * keys[j * d + i];
            scores[h * len + j] = acc * scale;
        }
}

/* n decode tokens, token k at position pos[k] of cache row row[k] (one token a row):
   RoPE on its q and k (inside qkv [n, (heads + 2 kv_heads) d], which it changes), its k
   and v written into the cache [rows, kv_heads, max_len, d], and attention of every
   query head over the row's positions 0..pos[k] (with a sliding window > 0, the last
   `window` of them: pos[k] - window + 1..pos[k]), scores scaled by `scale`; the query
   heads of a group share their kv head's reads. cos/sin_rot: [max_len, d] tables. out:
   [n, heads * d]. Work is split by (token, kv head) over `threads`. Returns -1 if d is
   over 512 or no memory. */
int decode_attention_rows(float *qkv, const int64_t *pos, const int64_t *row, int64_t n,
                          const float *cos, const float *sin_rot, float *kc, float *vc,
                          int64_t heads, int64_t kv_heads, int64_t d, int64_t max_len,
                          int64_t window, float scale, float *out, int64_t threads)
{
    if (d > 512) return -1;
    const int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * d;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < n * kv_heads; item++) {
        int64_t k = item / kv_heads, g = item % kv_heads, p = pos[k];
        int64_t first = window > 0 && p + 1 > window ? p + 1 - window : 0, len = p + 1 - first;
        float *q = qkv + k * width + g * group * d;
        float *key = qkv + k * width + (heads + g) * d, *val = key + kv_heads * d;
        const float *c = cos + p * d, *s = sin_rot + p * d;
        for (int64_t h = 0; h < group; h++) rope(q + h * d, d, c, s);
        rope(key, d, c, s);
        float *keys = kc + (row[k] * kv_heads + g) * max_len * d;
        float *vals = vc + (row[k] * kv_heads + g) * max_len * d;
        memcpy(keys + p * d, key, sizeof(float) * (size_t)d);
        memcpy(vals + p * d, val, sizeof(float) * (size_t)d);
        keys += first * d;
        vals += first * d;
        float *scores = malloc(sizeof(float) * (size_t)(group * len));
        if (!scores) {
            failed = 1;
            continue;
        }
        scores_qk(q, keys, len, group, d, scale, scores);
        for (int64_t h = 0; h < group; h++) {
            float *sh = scores + h * len, m = -INFINITY, sum = 0.0f;
            for (int64_t j = 0; j < len; j++) m = sh[j] > m ? sh[j] : m;
            #pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < len; j++) {
                sh[j] = exp_approx(sh[j] - m);
                sum += sh[j];
            }
            float inv = 1.0f / sum;
            #pragma omp simd
            for (int64_t j = 0; j < len; j++) sh[j] *= inv;
        }
        float *o = out + k * heads * d + g * group * d;
        memset(o, 0, sizeof(float) * (size_t)(group * d));
        for (int64_t j = 0; j < len; j++) {
            const float *vj = vals + j * d;
            for (int64_t b = 0; b < d; b += 16) __builtin_prefetch(vj + 16 * d + b, 0, 3);
            for (int64_t h = 0; h < group; h++) {
                float pj = scores[h * len + j];
                float *oh = o + h * d;
                #pragma omp simd
                for (int64_t i = 0; i < d; i++) oh[i] += pj * vj[i];
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
