/* One decode token through a layer's non-matmul parts, fp32, CPU: the engine's path for a
   step of a single token (single-stream decoding), where PyTorch's per-op cost (about
   28 small ops a layer) is a third of the token's time. The matmuls stay PyTorch's (BLAS
   reads the weights at memory speed); these replace the ops between them with one call
   each. Each computes what server/engine/model.py's PyTorch ops compute, in fp32. */
#include <math.h>
#include <stdint.h>

/* out = x / sqrt(mean(x^2) + eps) * w, for one row of h. */
void rms_norm_row(const float *x, const float *w, float *out, int64_t h, float eps)
{
    float ss = 0.0f;
    #pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < h; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)h + eps);
    #pragma omp simd
    for (int64_t i = 0; i < h; i++) out[i] = w[i] * (x[i] * inv);
}

/* The residual add and the next norm: x += d; out = rms_norm(x) * w. */
void add_rms_norm_row(float *x, const float *d, const float *w, float *out, int64_t h,
                      float eps)
{
    #pragma omp simd
    for (int64_t i = 0; i < h; i++) x[i] += d[i];
    rms_norm_row(x, w, out, h, eps);
}

/* out[i] = silu(gu[i]) * gu[n + i]: the gate and up halves of the fused projection. */
void silu_mul_row(const float *gu, float *out, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float g = gu[i];
        out[i] = g / (1.0f + expf(-g)) * gu[n + i];
    }
}

/* RoPE in place on `heads` heads of d: x * cos + roll(x, d/2) * sin_rot (model._rope). */
static void rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin_rot)
{
    int64_t half = d / 2;
    float tmp[512];
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * d;
        for (int64_t i = 0; i < d; i++) tmp[i] = v[i];
        for (int64_t i = 0; i < d; i++)
            v[i] = tmp[i] * cos[i] + tmp[i < half ? i + half : i - half] * sin_rot[i];
    }
}

/* One token at position pos of cache row `row`: RoPE on its q and k (inside qkv, which
   it changes), k and v written into the cache [rows, kv_heads, max_len, d], and
   attention of every query head over the row's positions 0..pos (grouped query heads
   share a kv head). out: [heads * d]. Returns -1 if d is over 512. */
int decode_attention_row(float *qkv, const float *cos, const float *sin_rot, float *kc,
                         float *vc, int64_t row, int64_t pos, int64_t heads, int64_t kv_heads,
                         int64_t d, int64_t max_len, float *scores, float *out)
{
    if (d > 512) return -1;
    float *q = qkv, *k = qkv + heads * d, *v = k + kv_heads * d;
    rope(q, heads, d, cos, sin_rot);
    rope(k, kv_heads, d, cos, sin_rot);
    for (int64_t g = 0; g < kv_heads; g++) {
        int64_t base = ((row * kv_heads + g) * max_len + pos) * d;
        for (int64_t i = 0; i < d; i++) {
            kc[base + i] = k[g * d + i];
            vc[base + i] = v[g * d + i];
        }
    }
    const float scale = 1.0f / sqrtf((float)d);
    const int64_t group = heads / kv_heads, n = pos + 1;
    for (int64_t h = 0; h < heads; h++) {
        const float *qh = q + h * d;
        const float *keys = kc + (row * kv_heads + h / group) * max_len * d;
        const float *vals = vc + (row * kv_heads + h / group) * max_len * d;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            float s = 0.0f;
            #pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < d; i++) s += qh[i] * keys[j * d + i];
            s *= scale;
            scores[j] = s;
            m = s > m ? s : m;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            scores[j] = expf(scores[j] - m);
            sum += scores[j];
        }
        float *oh = out + h * d;
        for (int64_t i = 0; i < d; i++) oh[i] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            float p = scores[j] / sum;
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) oh[i] += p * vals[j * d + i];
        }
    }
    return 0;
}
