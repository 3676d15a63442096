/* Per-row LoRA for the CPU: decode rows and short prefill chunks (few rows per adapter).
   Activations in fp32; slot tables in fp32 (lora_segments) or in bf16 (lora_segments_bf16,
   the bf16 engine's: half the bytes to stream, widened to fp32 in registers, so one
   step of either sums the same way).

   For every segment j = (slot s, tokens [start, end)) and every module m of a projection
   group whose bit is set in the slot's bits for this layer:

       y[t, off_m : off_m + size_m] += (x[t] @ A[s][:, m*r : (m+1)*r]) @ B_m[s]

   A [slots, in_f, ncols] and B_m [slots, r, size_m] are one layer of the slot tables
   (server/adapters/slots.py). Reading those tables is the whole cost of decode-time LoRA,
   so each slot's weights are streamed once per step from memory, with register-blocked
   FMAs: about 1.3x the speed of the same work as torch.bmm over the slot table (which
   also reads the slots without rows), and in one call per group instead of ~5 ops.
   Shrink (x @ A into a scratch [tokens, ncols]) then expand (the scratch @ B_m), over the
   OpenMP team torch uses: with at least two segments a thread, each thread takes whole
   segments (no barrier inside the call; 16 adapters x 2 rows, 2 threads: 8-10% faster
   than the split below); with fewer (one stream), shrink by segment, then expand by
   (segment, module, column chunk), so that every thread has work.
   A row's delta never depends on the other rows of the step (the summation order is
   fixed by the table's shape alone). */
#include <stdint.h>
#include <stdlib.h>
#include "simd.h"

#define NR 4          /* rows done together */
#define NB 4          /* vectors of columns done together */
#define CHUNK 512 /* output columns of one expand work item (a multiple of W) */
#define QB 4      /* rows of B an expand block reads */

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

/* The scalar tails' multiply-add: fused wherever the CPU fuses (as the vector body does),
   so that both table types' tails round alike whatever the compiler contracts. */
#ifdef __FMA__
#define SFMA(a, b, c) __builtin_fmaf(a, b, c)
#else
#define SFMA(a, b, c) ((a) * (b) + (c))
#endif

/* Memory to prefetch into L2 a few lines at a time, spread over `steps` ticks of other
   work (pf_tick): by_segment fetches a segment's B while its shrink streams A, and the
   thread's next segment's A while this one's expand reads B. Two streams are in flight
   instead of one, and each phase finds most of its lines in L2 (16 adapters x 2 rows,
   2 threads, Zen 5: bf16 tables 8.0 -> 6.6 ms a step, fp32 12.8 -> 12.0). */
#define PF_REGIONS 4  /* a group has at most 3 modules */
#define PF_LINE 64
typedef struct {
    const char *p[PF_REGIONS];
    int64_t lines[PF_REGIONS], total, done, off, tick, steps;
    int nreg, reg;
} prefetch_plan;

static inline void pf_add(prefetch_plan *c, const void *p, int64_t bytes)
{
    if (c->nreg == PF_REGIONS) return;
    c->p[c->nreg] = p;
    c->lines[c->nreg++] = (bytes + PF_LINE - 1) / PF_LINE;
    c->total += (bytes + PF_LINE - 1) / PF_LINE;
}

static inline __attribute__((always_inline)) void pf_tick(prefetch_plan *c)
{
    if (c->tick >= c->steps) return;
    const int64_t target = ++c->tick * c->total / c->steps;
    for (; c->done < target; c->done++) {
        __builtin_prefetch(c->p[c->reg] + c->off * PF_LINE, 0, 2);
        if (++c->off == c->lines[c->reg]) c->off = 0, c->reg++;
    }
}

#define WT float
#define WLOAD(p) VLOAD(p)
#define WSCALAR(v) (v)
#define NAME(f) f
#include "lora_impl.h"
#undef WT
#undef WLOAD
#undef WSCALAR
#undef NAME

#define WT uint16_t
#define WLOAD(p) VLOAD_BF16(p)
#define WSCALAR(v) bf16_to_f32(v)
#define NAME(f) f##_bf16
#include "lora_impl.h"
