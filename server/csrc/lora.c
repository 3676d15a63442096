/* Per-row LoRA for the CPU, fp32: decode rows and short prefill chunks (few rows per
   adapter).

   For every segment j = (slot s, tokens [start, end)) and every module m of a projection
   group whose bit is set in the slot's bits for this layer:

       y[t, off_m : off_m + size_m] += (x[t] @ A[s][:, m*r : (m+1)*r]) @ B_m[s]

   A [slots, in_f, ncols] and B_m [slots, r, size_m] are one layer of the slot tables
   (server/adapters/slots.py). Reading those tables is the whole cost of decode-time LoRA,
   so each slot's weights are streamed once per step from memory, with register-blocked
   FMAs: about 1.3x the speed of the same work as torch.bmm over the slot table (which
   also reads the slots without rows), and in one call per group instead of ~5 ops.
   Two phases, each split over the OpenMP team torch uses: shrink (x @ A into a scratch
   [tokens, ncols]) by segment, then expand by (segment, module, column chunk).
   A row's delta never depends on the other rows of the step (the summation order is
   fixed by the table's shape alone). */
#include <stdint.h>
#include <stdlib.h>
#include "simd.h"

#define NR 4          /* rows done together */
#define NB 4          /* vectors of columns done together */
#define CHUNK (4 * NB * W) /* output columns of one expand work item */

/* t[k][c0 : c0 + nb*W] = x[k] @ a[:, c0 : c0 + nb*W] for k < n; a is [in_f, ncols].
   P partial sums over i (P from nb, never from n) keep enough FMAs in flight. */
static inline __attribute__((always_inline)) void
shrink_block(const float *x, int64_t xs, const float *a, int64_t in_f, int64_t ncols,
             int64_t c0, float *t, int64_t ts, const int n, const int nb)
{
    const int P = nb == 1 ? 4 : nb == 2 ? 2 : 1;
    vec acc[4][NR][NB];
    for (int p = 0; p < P; p++)
        for (int k = 0; k < n; k++)
            for (int b = 0; b < nb; b++) acc[p][k][b] = VZERO();
    int64_t i = 0;
    for (; i + P <= in_f; i += P)
        for (int p = 0; p < P; p++) {
            const float *ai = a + (i + p) * ncols + c0;
            vec av[NB];
            for (int b = 0; b < nb; b++) av[b] = VLOAD(ai + b * W);
            for (int k = 0; k < n; k++) {
                vec xv = VSET1(x[k * xs + i + p]);
                for (int b = 0; b < nb; b++) acc[p][k][b] = VFMA(xv, av[b], acc[p][k][b]);
            }
        }
    for (; i < in_f; i++) {
        const float *ai = a + i * ncols + c0;
        for (int k = 0; k < n; k++) {
            vec xv = VSET1(x[k * xs + i]);
            for (int b = 0; b < nb; b++) acc[0][k][b] = VFMA(xv, VLOAD(ai + b * W), acc[0][k][b]);
        }
    }
    for (int k = 0; k < n; k++)
        for (int b = 0; b < nb; b++) {
            vec s = acc[0][k][b];
            if (P == 4) s = VADD(VADD(s, acc[1][k][b]), VADD(acc[2][k][b], acc[3][k][b]));
            else if (P == 2) s = VADD(s, acc[1][k][b]);
            VSTORE(t + k * ts + c0 + b * W, s);
        }
}

/* y[k][c0 : c0 + nb*W] += t[k][0:r] @ bm[:, c0 : c0 + nb*W] for k < n; bm is [r, sz]. */
static inline __attribute__((always_inline)) void
expand_block(const float *t, int64_t ts, const float *bm, int64_t r, int64_t sz, int64_t c0,
             float *y, int64_t ys, const int n, const int nb)
{
    vec acc[NR][NB];
    for (int k = 0; k < n; k++)
        for (int b = 0; b < nb; b++) acc[k][b] = VLOAD(y + k * ys + c0 + b * W);
    for (int64_t q = 0; q < r; q++) {
        const float *bq = bm + q * sz + c0;
        vec bv[NB];
        for (int b = 0; b < nb; b++) bv[b] = VLOAD(bq + b * W);
        for (int k = 0; k < n; k++) {
            vec tv = VSET1(t[k * ts + q]);
            for (int b = 0; b < nb; b++) acc[k][b] = VFMA(tv, bv[b], acc[k][b]);
        }
    }
    for (int k = 0; k < n; k++)
        for (int b = 0; b < nb; b++) VSTORE(y + k * ys + c0 + b * W, acc[k][b]);
}

/* Calls fn(..., n, nb) with n and nb as constants, so the accumulators live in registers. */
#define DISPATCH(fn, n, nb, ...)                                                    \
    switch ((n) * 8 + (nb)) {                                                       \
    case 9: fn(__VA_ARGS__, 1, 1); break;  case 10: fn(__VA_ARGS__, 1, 2); break;  \
    case 11: fn(__VA_ARGS__, 1, 3); break; case 12: fn(__VA_ARGS__, 1, 4); break;  \
    case 17: fn(__VA_ARGS__, 2, 1); break; case 18: fn(__VA_ARGS__, 2, 2); break;  \
    case 19: fn(__VA_ARGS__, 2, 3); break; case 20: fn(__VA_ARGS__, 2, 4); break;  \
    case 25: fn(__VA_ARGS__, 3, 1); break; case 26: fn(__VA_ARGS__, 3, 2); break;  \
    case 27: fn(__VA_ARGS__, 3, 3); break; case 28: fn(__VA_ARGS__, 3, 4); break;  \
    case 33: fn(__VA_ARGS__, 4, 1); break; case 34: fn(__VA_ARGS__, 4, 2); break;  \
    case 35: fn(__VA_ARGS__, 4, 3); break; case 36: fn(__VA_ARGS__, 4, 4); break;  \
    }

static void shrink_rows(const float *x, int64_t xs, const float *a, int64_t in_f,
                        int64_t ncols, float *t, int64_t ts, int n)
{
    int64_t vcols = ncols / W * W;
    for (int64_t c0 = 0; c0 < vcols; c0 += NB * W) {
        int nb = (int)((vcols - c0) / W < NB ? (vcols - c0) / W : NB);
        DISPATCH(shrink_block, n, nb, x, xs, a, in_f, ncols, c0, t, ts)
    }
    /* The last ncols % W columns (all of a rank-8 bucket's o and down columns with
       AVX-512): i outermost, so a's rows are read once, contiguously, and the compiler
       can vectorize over the columns; each column still sums over i in order. */
    const int64_t tail = ncols - vcols;
    if (tail) {
        float acc[NR][W];
        for (int k = 0; k < n; k++)
            for (int64_t c = 0; c < tail; c++) acc[k][c] = 0.0f;
        for (int64_t i = 0; i < in_f; i++) {
            const float *ai = a + i * ncols + vcols;
            for (int k = 0; k < n; k++) {
                const float xv = x[k * xs + i];
                for (int64_t c = 0; c < tail; c++) acc[k][c] += xv * ai[c];
            }
        }
        for (int k = 0; k < n; k++)
            for (int64_t c = 0; c < tail; c++) t[k * ts + vcols + c] = acc[k][c];
    }
}

static void expand_rows(const float *t, int64_t ts, const float *bm, int64_t r, int64_t sz,
                        int64_t c_begin, int64_t c_end, float *y, int64_t ys, int n)
{
    int64_t vend = c_begin + (c_end - c_begin) / W * W;
    for (int64_t c0 = c_begin; c0 < vend; c0 += NB * W) {
        int nb = (int)((vend - c0) / W < NB ? (vend - c0) / W : NB);
        DISPATCH(expand_block, n, nb, t, ts, bm, r, sz, c0, y, ys)
    }
    for (int64_t c = vend; c < c_end; c++)
        for (int k = 0; k < n; k++) {
            float acc = y[k * ys + c];
            for (int64_t q = 0; q < r; q++) acc += t[k * ts + q] * bm[q * sz + c];
            y[k * ys + c] = acc;
        }
}

/* desc: in_f, A (pointer), ncols, r, nmods, bits (pointer), bits stride, then per module
   B (pointer), column offset in y, size. bits[slot * stride]: the modules the slot's
   adapter targets in this (layer, group). segs: nsegs x (slot, start, end), tokens < ntok.
   Returns 0, or -1 when the scratch cannot be allocated. */
int lora_segments(const float *x, int64_t xs, float *y, int64_t ys, int64_t ntok,
                  const int64_t *desc, const int64_t *segs, int64_t nsegs, int64_t threads)
{
    const int64_t in_f = desc[0], ncols = desc[2], r = desc[3], nmods = desc[4];
    const int64_t *bits = (const int64_t *)desc[5], stride = desc[6];
    const float *A = (const float *)desc[1];
    const int64_t *mods = desc + 7;
    int64_t max_size = 0;
    for (int64_t m = 0; m < nmods; m++)
        if (mods[3 * m + 2] > max_size) max_size = mods[3 * m + 2];
    const int64_t nchunks = (max_size + CHUNK - 1) / CHUNK;
    float *t = malloc(sizeof(float) * (size_t)(ntok * ncols));
    if (!t) return -1;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < nsegs; j++) {
            int64_t s = segs[3 * j], start = segs[3 * j + 1], end = segs[3 * j + 2];
            if (!bits[s * stride]) continue;
            for (int64_t t0 = start; t0 < end; t0 += NR)
                shrink_rows(x + t0 * xs, xs, A + s * in_f * ncols, in_f, ncols,
                            t + t0 * ncols, ncols, (int)(end - t0 < NR ? end - t0 : NR));
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < nsegs * nmods * nchunks; item++) {
            int64_t j = item / (nmods * nchunks), m = item / nchunks % nmods;
            int64_t c_begin = item % nchunks * CHUNK;
            int64_t s = segs[3 * j], start = segs[3 * j + 1], end = segs[3 * j + 2];
            const int64_t *md = mods + 3 * m;
            int64_t sz = md[2];
            if (c_begin >= sz || !(bits[s * stride] >> m & 1)) continue;
            int64_t c_end = c_begin + CHUNK < sz ? c_begin + CHUNK : sz;
            const float *bm = (const float *)md[0] + s * r * sz;
            for (int64_t t0 = start; t0 < end; t0 += NR)
                expand_rows(t + t0 * ncols + m * r, ncols, bm, r, sz, c_begin, c_end,
                            y + t0 * ys + md[1], ys, (int)(end - t0 < NR ? end - t0 : NR));
        }
    }
    free(t);
    return 0;
}
