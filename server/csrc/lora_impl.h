/* The LoRA kernel's body, included by lora.c once per slot-table element type: WT
   (float, or uint16_t holding bf16), WLOAD (W of them from memory as an fp32 vector),
   WSCALAR (one as fp32) and NAME (the functions' names for that type). x, the scratch
   t and y are fp32 for both. */

/* t[k][c0 : c0 + nb*W] = x[k] @ a[:, c0 : c0 + nb*W] for k < n; a is [in_f, ncols].
   P partial sums over i (P from nb, never from n) keep enough FMAs in flight. pf, when
   not NULL, ticks once a row of a. */
static inline __attribute__((always_inline)) void
NAME(shrink_block)(const float *x, int64_t xs, const WT *a, int64_t in_f, int64_t ncols,
             int64_t c0, float *t, int64_t ts, prefetch_plan *pf, const int n, const int nb)
{
    const int P = nb == 1 ? 4 : nb == 2 ? 2 : 1;
    vec acc[4][NR][NB];
    for (int p = 0; p < P; p++)
        for (int k = 0; k < n; k++)
            for (int b = 0; b < nb; b++) acc[p][k][b] = VZERO();
    int64_t i = 0;
    for (; i + P <= in_f; i += P)
        for (int p = 0; p < P; p++) {
            const WT *ai = a + (i + p) * ncols + c0;
            /* non-temporal: the tables are read once a step and should not evict the
               step's activations (served bf16 A/B: the adapter side +2.5% net) */
            __builtin_prefetch((const char *)ai + 1024, 0, 0);
            if (pf) pf_tick(pf);
            vec av[NB];
            for (int b = 0; b < nb; b++) av[b] = WLOAD(ai + b * W);
            for (int k = 0; k < n; k++) {
                vec xv = VSET1(x[k * xs + i + p]);
                for (int b = 0; b < nb; b++) acc[p][k][b] = VFMA(xv, av[b], acc[p][k][b]);
            }
        }
    for (; i < in_f; i++) {
        const WT *ai = a + i * ncols + c0;
        for (int k = 0; k < n; k++) {
            vec xv = VSET1(x[k * xs + i]);
            for (int b = 0; b < nb; b++) acc[0][k][b] = VFMA(xv, WLOAD(ai + b * W), acc[0][k][b]);
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

static void NAME(shrink_rows)(const float *x, int64_t xs, const WT *a, int64_t in_f,
                        int64_t ncols, float *t, int64_t ts, int n, prefetch_plan *pf)
{
    int64_t vcols = ncols / W * W;
    for (int64_t c0 = 0; c0 < vcols; c0 += NB * W) {
        int nb = (int)((vcols - c0) / W < NB ? (vcols - c0) / W : NB);
        DISPATCH(NAME(shrink_block), n, nb, x, xs, a, in_f, ncols, c0, t, ts,
                 c0 == 0 ? pf : NULL)
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
            const WT *ai = a + i * ncols + vcols;
            for (int k = 0; k < n; k++) {
                const float xv = x[k * xs + i];
                for (int64_t c = 0; c < tail; c++)
                    acc[k][c] = SFMA(xv, WSCALAR(ai[c]), acc[k][c]);
            }
        }
        for (int k = 0; k < n; k++)
            for (int64_t c = 0; c < tail; c++) t[k * ts + vcols + c] = acc[k][c];
    }
}

/* y[k][c0 : c0 + nb*W] += t[k][q0:q1] @ bm[q0:q1, c0 : c0 + nb*W] for k < n; bm is [r, sz].
   pf, when not NULL, ticks once a block (by_segment's: its b_plan has fetched bm). */
static inline __attribute__((always_inline)) void
NAME(expand_block)(const float *t, int64_t ts, const WT *bm, int64_t q0, int64_t q1, int64_t sz,
             int64_t c0, float *y, int64_t ys, prefetch_plan *pf, const int n, const int nb)
{
    if (pf) pf_tick(pf);
    vec acc[NR][NB];
    for (int k = 0; k < n; k++)
        for (int b = 0; b < nb; b++) acc[k][b] = VLOAD(y + k * ys + c0 + b * W);
    for (int64_t q = q0; q < q1; q++) {
        const WT *bq = bm + q * sz + c0;
        if (!pf) __builtin_prefetch((const char *)bq + 512, 0, 0);  /* else B is in L2 */
        vec bv[NB];
        for (int b = 0; b < nb; b++) bv[b] = WLOAD(bq + b * W);
        for (int k = 0; k < n; k++) {
            vec tv = VSET1(t[k * ts + q]);
            for (int b = 0; b < nb; b++) acc[k][b] = VFMA(tv, bv[b], acc[k][b]);
        }
    }
    for (int k = 0; k < n; k++)
        for (int b = 0; b < nb; b++) VSTORE(y + k * ys + c0 + b * W, acc[k][b]);
}

/* y[k][c_begin : c_end] += t[k][0:r] @ bm[:, c_begin : c_end] for k < n. QB rows of bm at
   a time, each swept across the columns, so bm is read as QB contiguous runs (all r rows
   of a few columns at a time would be r strided runs, which the hardware prefetcher
   follows badly) while y is read and written r / QB times from L1. Each y element still
   sums y + t[0] b[0] + t[1] b[1] + ... in that order. */
static void NAME(expand_rows)(const float *t, int64_t ts, const WT *bm, int64_t r, int64_t sz,
                        int64_t c_begin, int64_t c_end, float *y, int64_t ys, int n,
                        prefetch_plan *pf)
{
    const int64_t vend = c_begin + (c_end - c_begin) / W * W;
    for (int64_t q0 = 0; q0 < r; q0 += QB) {
        const int64_t q1 = q0 + QB < r ? q0 + QB : r;
        for (int64_t c0 = c_begin; c0 < vend; c0 += NB * W) {
            int nb = (int)((vend - c0) / W < NB ? (vend - c0) / W : NB);
            DISPATCH(NAME(expand_block), n, nb, t, ts, bm, q0, q1, sz, c0, y, ys, pf)
        }
    }
    for (int64_t c = vend; c < c_end; c++)
        for (int k = 0; k < n; k++) {
            float acc = y[k * ys + c];
            for (int64_t q = 0; q < r; q++)
                acc = SFMA(t[k * ts + q], WSCALAR(bm[q * sz + c]), acc);
            y[k * ys + c] = acc;
        }
}

/* Enough segments to share: each thread takes whole segments, shrink then expand, so no
   barrier splits the call and each slot's A and B stream back to back. A thread claims
   its next segment before it starts this one, to prefetch the next A during this expand
   (prefetch_plan). */
static void NAME(by_segment)(const float *x, int64_t xs, float *y, int64_t ys, float *t,
                             const int64_t *desc, const int64_t *segs, int64_t nsegs,
                             int64_t threads)
{
    const int64_t in_f = desc[0], ncols = desc[2], r = desc[3], nmods = desc[4];
    const int64_t *bits = (const int64_t *)desc[5], stride = desc[6];
    const WT *A = (const WT *)desc[1];
    const int64_t *mods = desc + 7;
    int64_t claimed = 0;
    #pragma omp parallel num_threads(threads)
    {
        int64_t j = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
        while (j < nsegs) {
            const int64_t next = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
            const int64_t s = segs[3 * j], start = segs[3 * j + 1], end = segs[3 * j + 2];
            const int64_t sbits = bits[s * stride];
            prefetch_plan b_plan = {.steps = in_f}, a_plan = {0};  /* ticks: A rows, B blocks */
            for (int64_t m = 0; m < nmods; m++)
                if (sbits >> m & 1) {
                    const int64_t sz = mods[3 * m + 2];
                    pf_add(&b_plan, (const WT *)mods[3 * m] + s * r * sz,
                           (int64_t)sizeof(WT) * r * sz);
                    a_plan.steps += (r + QB - 1) / QB * ((sz / W + NB - 1) / NB);
                }
            if (next < nsegs && bits[segs[3 * next] * stride])
                pf_add(&a_plan, A + segs[3 * next] * in_f * ncols,
                       (int64_t)sizeof(WT) * in_f * ncols);
            for (int64_t t0 = start; sbits && t0 < end; t0 += NR) {
                const int n = (int)(end - t0 < NR ? end - t0 : NR);
                NAME(shrink_rows)(x + t0 * xs, xs, A + s * in_f * ncols, in_f, ncols,
                                  t + t0 * ncols, ncols, n, t0 == start ? &b_plan : NULL);
                for (int64_t m = 0; m < nmods; m++) {
                    const int64_t *md = mods + 3 * m;
                    if (sbits >> m & 1)
                        NAME(expand_rows)(t + t0 * ncols + m * r, ncols,
                                          (const WT *)md[0] + s * r * md[2], r, md[2], 0,
                                          md[2], y + t0 * ys + md[1], ys, n,
                                          t0 == start ? &a_plan : NULL);
                }
            }
            j = next;
        }
    }
}

/* Few segments (one stream, a few adapters): shrink by segment, then expand by (segment,
   module, column chunk), so that every thread has work. */
static void NAME(by_chunk)(const float *x, int64_t xs, float *y, int64_t ys, float *t,
                           const int64_t *desc, const int64_t *segs, int64_t nsegs,
                           int64_t threads)
{
    const int64_t in_f = desc[0], ncols = desc[2], r = desc[3], nmods = desc[4];
    const int64_t *bits = (const int64_t *)desc[5], stride = desc[6];
    const WT *A = (const WT *)desc[1];
    const int64_t *mods = desc + 7;
    int64_t max_size = 0;
    for (int64_t m = 0; m < nmods; m++)
        if (mods[3 * m + 2] > max_size) max_size = mods[3 * m + 2];
    const int64_t nchunks = (max_size + CHUNK - 1) / CHUNK;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < nsegs; j++) {
            int64_t s = segs[3 * j], start = segs[3 * j + 1], end = segs[3 * j + 2];
            if (!bits[s * stride]) continue;
            for (int64_t t0 = start; t0 < end; t0 += NR)
                NAME(shrink_rows)(x + t0 * xs, xs, A + s * in_f * ncols, in_f, ncols,
                            t + t0 * ncols, ncols, (int)(end - t0 < NR ? end - t0 : NR), NULL);
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
            const WT *bm = (const WT *)md[0] + s * r * sz;
            for (int64_t t0 = start; t0 < end; t0 += NR)
                NAME(expand_rows)(t + t0 * ncols + m * r, ncols, bm, r, sz, c_begin, c_end,
                            y + t0 * ys + md[1], ys, (int)(end - t0 < NR ? end - t0 : NR),
                            NULL);
        }
    }
}

/* desc: in_f, A (pointer), ncols, r, nmods, bits (pointer), bits stride, then per module
   B (pointer), column offset in y, size. bits[slot * stride]: the modules the slot's
   adapter targets in this (layer, group). segs: nsegs x (slot, start, end), tokens < ntok.
   Returns 0, or -1 when the scratch cannot be allocated. */
int NAME(lora_segments)(const float *x, int64_t xs, float *y, int64_t ys, int64_t ntok,
                  const int64_t *desc, const int64_t *segs, int64_t nsegs, int64_t threads)
{
    float *t = malloc(sizeof(float) * (size_t)(ntok * desc[2]));  /* [ntok, ncols] */
    if (!t) return -1;
    if (nsegs >= 2 * threads)
        NAME(by_segment)(x, xs, y, ys, t, desc, segs, nsegs, threads);
    else
        NAME(by_chunk)(x, xs, y, ys, t, desc, segs, nsegs, threads);
    free(t);
    return 0;
}
