/* merge_chunk: one chunk of a task-arithmetic merge in a single pass: trim, mask or band each task vector,
 * weight it, combine (a sum, or TIES' sign election and disjoint sum), normalize, scale, add the base.
 * tally_chunk: one chunk of TIES' and Breadcrumbs' threshold scan (sparsify.magnitude_cuts), every cut at once.
 * weighted_sum_chunk: one chunk of a linear merge (interpolation.linear and model_soup).
 * dare_chunk: one chunk of DARE's prepare pass (sparsify.random_masks): Philox drop masks and L1 sums.
 * point_chunk: one chunk of a point between checkpoints (evaluations.lm_path.write_point), float64 sums.
 * stats_chunks: a tensor's data-free merge statistics (merging/merge_stats.py), numpy's pairwise sums.
 * row_ranks: stable ascending ranks per row (DELLA's MagPrune probabilities), by radix sort.
 * della_chunk: DELLA's MagPrune masks (row ranks, Philox draws) and L1 sums over a range of rows.
 * elect_chunk: one chunk of MagMax, consensus TA, EMR or RAM (elementwise elections over task vectors).
 * side_chunk: one chunk of TALL masks' and EMR's per-task side outputs (task vector, masks, EMR's L1 sums).
 *
 * Yadav et al. 2023 (TIES-Merging, Alg. 1), Yu et al. 2024 (DARE, eq. 1-2), Davari and Belilovsky 2024
 * (Model Breadcrumbs), Ilharco et al. 2023 (task arithmetic). The float32 operations, their order, and the edge
 * cases (signed zeros, NaN) are those of TaskVectorMerge.apply in merging/methods/task_arithmetic.py, which the
 * tests compare bit for bit: the torch ops there run one pass each over a cache-sized chunk, this runs them all
 * per entry with the models' values in registers (the common case: trims by a cut) or per block of 256 entries in
 * L1 (masks, bands, the ties that run out mid-chunk). Build with -ffp-contract=off: a fused multiply-add would
 * round differently.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline)) /* into each clone of merge_chunk below */
#else
#define INLINE static inline
#endif

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };
enum { KEEP_ALL = 0, KEEP_ABOVE = 1, KEEP_PARTIAL_TIES = 2, KEEP_MASK = 3, KEEP_BAND = 4 };
enum { POST_NONE = 0, POST_DIVIDE = 1, POST_MULTIPLY = 2 };

typedef struct {
    const void *data;     /* this chunk of the model's stored tensor */
    int dtype;            /* DTYPE_* */
    int keep;             /* KEEP_*: which entries of the task vector survive */
    float cut;            /* KEEP_ABOVE: zero |tau| <= cut; KEEP_PARTIAL_TIES: the threshold t */
    long long allowed;    /* KEEP_PARTIAL_TIES: keep the first `allowed` entries with |tau| == t */
    const uint8_t *mask;  /* KEEP_MASK: one bit per entry, entry j at bit j % 8 of byte j / 8 (sparsify.pack_mask) */
    int post;             /* POST_*: rescale after the trim */
    float post_value;
    float weight;         /* the torch path skips a weight of 1; multiplying by 1 gives the same bits */
    /* KEEP_BAND (Breadcrumbs): what the outer cut (outer_keep, cut, allowed) keeps minus what the inner one
     * (inner_keep, inner_cut, inner_allowed) keeps; each rule KEEP_ALL, KEEP_ABOVE or KEEP_PARTIAL_TIES */
    int outer_keep, inner_keep;
    float inner_cut;
    long long inner_allowed;
} Model;

static uint32_t spread_bits[256]; /* bit l of the index moved to bit 4 l: one word's keep bits into entry order */
static float bit_floats[256][8];  /* bit r of the index as 0.0f or 1.0f at position r (mask bytes as floats) */

INLINE void load(const void *data, int dtype, Py_ssize_t start, int len, float *out) {
    if (dtype == DTYPE_F32) {
        memcpy(out, (const float *)data + start, (size_t)len * sizeof(float));
    } else {
        const uint16_t *h = (const uint16_t *)data + start;
        for (int j = 0; j < len; j++) {  /* bf16 is the top half of a float32 */
            union { uint32_t u; float f; } v = {.u = (uint32_t)h[j] << 16};
            out[j] = v.f;
        }
    }
}

/* tau <- x - base, kept, rescaled and weighted, in one loop (tau holds x on entry). A rescale or weight that is
 * not applied is a multiplication by 1, which leaves every float32 as it is (NaNs are quiet after the
 * subtraction); only the division is left out when unused, being the slow one. */
INLINE void trim(const Model *md, Py_ssize_t start, int len, const float *b, float *tau, long long *ties_seen,
                 const int divide) {
    const float by = md->post_value;
    const float times = md->post == POST_MULTIPLY ? md->post_value : 1.0f;
    const float w = md->weight;
    if (md->keep == KEEP_MASK) {
        const uint8_t *m = md->mask + start / 8; /* blocks start at multiples of 256 entries */
        float kept[BLOCK + 8];
        for (int q = 0; q < (len + 7) / 8; q++) /* the bits as 0 / 1, eight at a time */
            for (int r = 0; r < 8; r++) kept[8 * q + r] = (float)((m[q] >> r) & 1);
        for (int j = 0; j < len; j++) {
            float t = (tau[j] - b[j]) * kept[j];
            tau[j] = ((divide ? t / by : t) * times) * w;
        }
    } else if (md->keep == KEEP_PARTIAL_TIES) { /* one chunk per model: the one where the kept ties run out */
        const float threshold = md->cut;
        for (int j = 0; j < len; j++) {
            float t = tau[j] - b[j], a = fabsf(t);
            int keep = a > threshold;
            if (a == threshold) keep = ++*ties_seen <= md->allowed;
            t = copysignf(a * (keep ? 1.0f : 0.0f), t);
            tau[j] = ((divide ? t / by : t) * times) * w;
        }
    } else { /* KEEP_ABOVE: torch's threshold, |tau| <= cut becomes 0 (NaN stays); KEEP_ALL: a cut at -inf, where
              * copysign(|t|, t) is t, bit for bit, NaN included */
        const float cut = md->keep == KEEP_ALL ? -INFINITY : md->cut;
        for (int j = 0; j < len; j++) {
            float t = tau[j] - b[j], a = fabsf(t);
            t = copysignf(a <= cut ? 0.0f : a, t);
            tau[j] = ((divide ? t / by : t) * times) * w;
        }
    }
}

/* kept[j] <- |tau_j| where the rule keeps it, else +0 (as MagnitudeCut.keep_) */
INLINE void keep_by_rule(int keep, float cut, long long allowed, const float *x, const float *b, int len,
                         float *kept, long long *ties_seen) {
    if (keep == KEEP_PARTIAL_TIES) {
        for (int j = 0; j < len; j++) {
            float a = fabsf(x[j] - b[j]);
            int k = a > cut;
            if (a == cut) k = ++*ties_seen <= allowed;
            kept[j] = a * (k ? 1.0f : 0.0f);
        }
    } else { /* KEEP_ABOVE, or KEEP_ALL as a cut at -inf */
        if (keep == KEEP_ALL) cut = -INFINITY;
        for (int j = 0; j < len; j++) {
            float a = fabsf(x[j] - b[j]);
            kept[j] = a <= cut ? 0.0f : a;
        }
    }
}

/* Breadcrumbs: tau <- copysign(outer - inner, x - base), rescaled and weighted */
INLINE void band(const Model *md, int len, const float *b, float *tau, long long *ties_seen) {
    float outer[BLOCK], inner[BLOCK];
    keep_by_rule(md->outer_keep, md->cut, md->allowed, tau, b, len, outer, ties_seen);
    keep_by_rule(md->inner_keep, md->inner_cut, md->inner_allowed, tau, b, len, inner, ties_seen + 1);
    const float times = md->post == POST_MULTIPLY ? md->post_value : 1.0f;
    const float w = md->weight;
    for (int j = 0; j < len; j++) {
        float t = copysignf(outer[j] - inner[j], tau[j] - b[j]);
        tau[j] = ((md->post == POST_DIVIDE ? t / md->post_value : t) * times) * w;
    }
}

INLINE void task_vector(const Model *md, Py_ssize_t start, int len, const float *b, float *tau,
                        long long *ties_seen) {
    if (md->keep == KEEP_BAND)
        band(md, len, b, tau, ties_seen);
    else if (md->post == POST_DIVIDE)
        trim(md, start, len, b, tau, ties_seen, 1);
    else
        trim(md, start, len, b, tau, ties_seen, 0);
}

typedef struct {
    int consensus, normalize, positive_weights, divide_by_total, scale_by_lambda;
    float min_weight, total, lambda;
} Combine;

/* AVX2 where the processor has it (chosen when the module loads), else the baseline: 3x the speed of SSE2 on
 * this kernel (measured: TIES on a 5504 x 2048 weight of 4 models, 28 vs 83 ms); the same bits either way */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define REGISTER_MODELS 8 /* the most models merge_in_registers takes */

/* The common case in registers: every model kept whole or above a cut (task arithmetic, TIES away from the chunk
 * where its kept ties run out), no division by a keep probability, all inputs of one dtype. Each entry goes
 * through the same float32 operations as in the block loop below, in the same order, but with the m models'
 * values in registers instead of round trips through L1 buffers (M is a constant in each instance, so the loop
 * over models unrolls and the loop over entries vectorizes). KEEP_ALL is a cut at -inf, as in `trim`. */
INLINE void merge_in_registers(const Model *models, const int M, const int bf16, const void *base, Py_ssize_t n,
                               const Combine *c, float *restrict out, const int masked, const float *restrict kept,
                               const int banded) {
    const void *data[REGISTER_MODELS];
    float cut[REGISTER_MODELS], inner[REGISTER_MODELS], times[REGISTER_MODELS], weight[REGISTER_MODELS];
    int band[REGISTER_MODELS];
    for (int i = 0; i < M; i++) {
        const Model *md = &models[i];
        band[i] = md->keep == KEEP_BAND;
        const int outer_rule = band[i] ? md->outer_keep : md->keep;
        data[i] = md->data;
        cut[i] = outer_rule == KEEP_ALL ? -INFINITY : md->cut;
        inner[i] = md->inner_keep == KEEP_ALL ? -INFINITY : md->inner_cut;
        times[i] = md->post == POST_MULTIPLY ? md->post_value : 1.0f;
        weight[i] = md->weight;
    }
    /* the options as operands (dividing or multiplying by 1 leaves every float32 as it is, NaN included), so the
     * loops hold no branch */
    const int normalize = c->normalize, positive = c->positive_weights;
    const float low = c->min_weight, scale = c->scale_by_lambda ? c->lambda : 1.0f;
    const float total = c->divide_by_total ? c->total : 1.0f;
#define VALUE(p, j) (bf16 ? ((union { uint32_t u; float f; }){.u = (uint32_t)((const uint16_t *)(p))[j] << 16}).f \
                          : ((const float *)(p))[j])
#define TASK_VECTORS                                                                                          \
    const float b = VALUE(base, j);                                                                           \
    float tau[REGISTER_MODELS];                                                                               \
    for (int i = 0; i < M; i++) {                                                                             \
        float t = VALUE(data[i], j) - b, a = fabsf(t), outer = a <= cut[i] ? 0.0f : a;                        \
        if (banded) /* Breadcrumbs, as `band`: what the outer cut keeps minus what the inner one keeps */     \
            outer = outer - (band[i] ? (a <= inner[i] ? 0.0f : a) : 0.0f);                                    \
        t = copysignf(outer, t);                                                                              \
        if (masked) t = t * kept[i * BLOCK + j]; /* (x - b) * bit, as `trim` (copysign(|t|, t) is t) */       \
        tau[i] = (t * times[i]) * weight[i];                                                                  \
    }
    if (c->consensus) {
        for (Py_ssize_t j = 0; j < n; j++) {
            TASK_VECTORS
            float sum = tau[0];
            for (int i = 1; i < M; i++) sum = sum + tau[i];
            const float elected = copysignf(1.0f, sum);
            float mixed = 0.0f, divisor = 0.0f;
            for (int i = 0; i < M; i++) {
                float p = tau[i] * elected;
                float agreeing = p < 0.0f ? 0.0f : p;
                float counted = (agreeing > 0.0f ? 1.0f : 0.0f) * weight[i];
                mixed = i == 0 ? agreeing : mixed + agreeing;
                divisor = i == 0 ? counted : divisor + counted;
            }
            mixed = mixed * elected;
            const float by = !normalize ? 1.0f : positive ? (divisor < low ? low : divisor)
                                                          : (divisor == 0.0f ? 1.0f : divisor);
            out[j] = ((mixed / by) * scale) + b;
        }
    } else {
        for (Py_ssize_t j = 0; j < n; j++) {
            TASK_VECTORS
            float mixed = tau[0];
            for (int i = 1; i < M; i++) mixed = mixed + tau[i];
            out[j] = ((mixed / total) * scale) + b;
        }
    }
#undef TASK_VECTORS
#undef VALUE
}

static inline const void *shifted(const void *data, int dtype, Py_ssize_t start) {
    return dtype == DTYPE_BF16 ? (const void *)((const uint16_t *)data + start) : (const void *)((const float *)data + start);
}

/* Append the 4-byte entries of src[0 .. len) whose `wanted` flag is 1 to out[kept ..]; returns the new count.
 * Every entry of a 16-entry group holding some is written and the count advanced past the wanted ones only (no
 * branch to mispredict; the caller leaves room for len more entries past `kept`). */
INLINE long long append_wanted(void *out, long long kept, const void *src, const uint8_t *wanted, int len) {
    unsigned char *o = (unsigned char *)out;
    const unsigned char *in = (const unsigned char *)src;
    int j = 0;
    for (; j + 16 <= len; j += 16) { /* a group's 16 flags tested as two 8-byte words */
        uint64_t w0, w1;
        memcpy(&w0, wanted + j, 8);
        memcpy(&w1, wanted + j + 8, 8);
        if (w0 | w1)
            for (int q = j; q < j + 16; q++) {
                memcpy(o + 4 * kept, in + 4 * (size_t)q, 4);
                kept += wanted[q];
            }
    }
    for (; j < len; j++) {
        memcpy(o + 4 * kept, in + 4 * (size_t)j, 4);
        kept += wanted[j];
    }
    return kept;
}

/* merge_in_registers where it applies (returns 1), else 0; `kept`: NULL, or each model's BLOCK entries' mask bits
 * as 0 / 1 (1 for a model without a mask) where n <= BLOCK and some model is KEEP_MASK */
INLINE int merge_fast_kept(const Model *models, int m, const void *base, int base_dtype, Py_ssize_t n,
                           const Combine *c, float *out, const float *kept) {
    int banded = 0;
    if (m > REGISTER_MODELS)
        return 0;
    for (int i = 0; i < m; i++) {
        const Model *md = &models[i];
        const int plain_band = !kept && md->keep == KEEP_BAND && (md->outer_keep == KEEP_ALL ||
            md->outer_keep == KEEP_ABOVE) && (md->inner_keep == KEEP_ALL || md->inner_keep == KEEP_ABOVE);
        if ((md->keep != KEEP_ALL && md->keep != KEEP_ABOVE && !(kept && md->keep == KEEP_MASK) && !plain_band)
            || md->post == POST_DIVIDE || md->dtype != base_dtype)
            return 0;
        banded |= plain_band;
    }
#define CASE(M)                                                                                               \
    case M:                                                                                                   \
        if (kept && base_dtype == DTYPE_BF16)                                                                 \
            merge_in_registers(models, M, 1, base, n, c, out, 1, kept, 0);                                    \
        else if (kept)                                                                                        \
            merge_in_registers(models, M, 0, base, n, c, out, 1, kept, 0);                                    \
        else if (banded && base_dtype == DTYPE_BF16)                                                          \
            merge_in_registers(models, M, 1, base, n, c, out, 0, NULL, 1);                                    \
        else if (banded)                                                                                      \
            merge_in_registers(models, M, 0, base, n, c, out, 0, NULL, 1);                                    \
        else if (base_dtype == DTYPE_BF16)                                                                    \
            merge_in_registers(models, M, 1, base, n, c, out, 0, NULL, 0);                                    \
        else                                                                                                  \
            merge_in_registers(models, M, 0, base, n, c, out, 0, NULL, 0);                                    \
        return 1;
    switch (m) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
    }
#undef CASE
    return 0;
}

INLINE int merge_fast(const Model *models, int m, const void *base, int base_dtype, Py_ssize_t n, const Combine *c,
                      float *out) {
    return merge_fast_kept(models, m, base, base_dtype, n, c, out, NULL);
}

/* DARE (every model masked or kept whole, no division): merge_in_registers per block of BLOCK entries, the masks'
 * bits expanded to 0 / 1 floats in L1 first. Returns 0 (nothing done) where it does not apply. */
INLINE int merge_masked(const Model *models, int m, const void *base, int base_dtype, Py_ssize_t n, const Combine *c,
                        float *out) {
    int masked = 0;
    if (m > REGISTER_MODELS)
        return 0;
    for (int i = 0; i < m; i++) {
        if ((models[i].keep != KEEP_ALL && models[i].keep != KEEP_MASK) || models[i].post == POST_DIVIDE ||
            models[i].dtype != base_dtype)
            return 0;
        masked |= models[i].keep == KEEP_MASK;
    }
    if (!masked)
        return 0;
    float kept[REGISTER_MODELS * BLOCK];
    Model segment[REGISTER_MODELS];
    for (int i = 0; i < m; i++)
        if (models[i].keep != KEEP_MASK)
            for (int j = 0; j < BLOCK; j++) kept[i * BLOCK + j] = 1.0f;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        for (int i = 0; i < m; i++) {
            segment[i] = models[i];
            segment[i].data = shifted(models[i].data, models[i].dtype, start);
            if (models[i].keep == KEEP_MASK) {
                const uint8_t *bits = models[i].mask + start / 8; /* blocks start at multiples of 256 entries */
                for (int q = 0; q < (len + 7) / 8; q++)
                    memcpy(kept + i * BLOCK + 8 * q, bit_floats[bits[q]], sizeof(bit_floats[0]));
            }
        }
        merge_fast_kept(segment, m, shifted(base, base_dtype, start), base_dtype, len, c, out + start, kept);
    }
    return 1;
}

/* KEEP_PARTIAL_TIES: the end of the entry holding the model's allowed-th tie |x - base| == threshold (n if none) */
INLINE Py_ssize_t ties_end(const Model *md, const void *base, int base_dtype, Py_ssize_t n) {
    float x[BLOCK], b[BLOCK];
    long long seen = 0;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        load(base, base_dtype, start, len, b);
        load(md->data, md->dtype, start, len, x);
        int block = 0;
        for (int j = 0; j < len; j++) block += fabsf(x[j] - b[j]) == md->cut;
        if (seen + block < md->allowed) {
            seen += block;
            continue;
        }
        for (int j = 0; j < len; j++)
            if (fabsf(x[j] - b[j]) == md->cut && ++seen == md->allowed) return start + j + 1;
    }
    return n;
}

/* The chunk where some models' kept ties run out (TIES), in registers: split where each such model's allowed-th
 * tie ends, every segment is a plain cut per model, just below the threshold (ties kept) before that point, at it
 * (ties dropped) after, which keeps exactly the entries the running tie count keeps (and |t| * 1, |t| * 0 are
 * |t|, +0: the same bits). Returns 0 (nothing done) where merge_in_registers would not apply to the segments. */
INLINE int merge_split(const Model *models, int m, const void *base, int base_dtype, Py_ssize_t n, const Combine *c,
                       float *out) {
    Py_ssize_t ends[REGISTER_MODELS];
    int partial = 0;
    if (m > REGISTER_MODELS)
        return 0;
    for (int i = 0; i < m; i++) {
        const Model *md = &models[i];
        if ((md->keep != KEEP_ALL && md->keep != KEEP_ABOVE && md->keep != KEEP_PARTIAL_TIES) ||
            md->post == POST_DIVIDE || md->dtype != base_dtype)
            return 0;
        ends[i] = md->keep == KEEP_PARTIAL_TIES ? ties_end(md, base, base_dtype, n) : -1;
        partial |= md->keep == KEEP_PARTIAL_TIES;
    }
    if (!partial)
        return 0;
    Model segment[REGISTER_MODELS];
    for (Py_ssize_t start = 0, stop; start < n; start = stop) {
        stop = n;
        for (int i = 0; i < m; i++)
            if (ends[i] > start && ends[i] < stop) stop = ends[i];
        for (int i = 0; i < m; i++) {
            segment[i] = models[i];
            segment[i].data = shifted(models[i].data, models[i].dtype, start);
            if (models[i].keep == KEEP_PARTIAL_TIES) {
                segment[i].keep = KEEP_ABOVE;
                segment[i].cut = start < ends[i] ? nextafterf(models[i].cut, -INFINITY) : models[i].cut;
            }
        }
        merge_fast(segment, m, shifted(base, base_dtype, start), base_dtype, stop - start, c, out + start);
    }
    return 1;
}

/* work: (3 + m) BLOCK floats; ties_seen: 2 m zeros (two cuts per model at most) */
VECTOR_CLONES static void merge_chunk(const Model *models, int m, const void *base, int base_dtype, Py_ssize_t n,
                                      const Combine *c, float *out, float *work, long long *ties_seen) {
    if (merge_fast(models, m, base, base_dtype, n, c, out) || merge_split(models, m, base, base_dtype, n, c, out) ||
        merge_masked(models, m, base, base_dtype, n, c, out))
        return;
    float *b = work, *elected = work + BLOCK, *divisor = work + 2 * BLOCK, *taus = work + 3 * BLOCK;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        load(base, base_dtype, start, len, b);
        for (int i = 0; i < m; i++) {
            float *tau = taus + (size_t)i * BLOCK;
            load(models[i].data, models[i].dtype, start, len, tau);
            task_vector(&models[i], start, len, b, tau, &ties_seen[2 * i]);
        }
        float *mixed = out + start;
        if (c->consensus) {
            /* elected sign: copysign(1, sum_i w_i tau_i), the sum folded left from model 0 */
            memcpy(elected, taus, (size_t)len * sizeof(float));
            for (int i = 1; i < m; i++) {
                const float *t = taus + (size_t)i * BLOCK;
                for (int j = 0; j < len; j++) elected[j] = elected[j] + t[j];
            }
            for (int j = 0; j < len; j++) elected[j] = copysignf(1.0f, elected[j]);
            /* agreeing entries: relu(w_i tau_i * elected), as torch's relu (keeps -0 and NaN); the divisor
             * sums w_i over them (torch.sign of a non-negative: 1 above zero, else 0) */
            const float w0 = models[0].weight;
            for (int j = 0; j < len; j++) {
                float p = taus[j] * elected[j];
                float agreeing = p < 0.0f ? 0.0f : p;
                mixed[j] = agreeing;
                divisor[j] = (agreeing > 0.0f ? 1.0f : 0.0f) * w0;
            }
            for (int i = 1; i < m; i++) {
                const float *t = taus + (size_t)i * BLOCK;
                const float w = models[i].weight;
                for (int j = 0; j < len; j++) {
                    float p = t[j] * elected[j];
                    float agreeing = p < 0.0f ? 0.0f : p;
                    mixed[j] = mixed[j] + agreeing;
                    divisor[j] = divisor[j] + (agreeing > 0.0f ? 1.0f : 0.0f) * w;
                }
            }
            for (int j = 0; j < len; j++) mixed[j] = mixed[j] * elected[j];
            if (c->normalize && c->positive_weights) {
                const float low = c->min_weight;
                for (int j = 0; j < len; j++) mixed[j] = mixed[j] / (divisor[j] < low ? low : divisor[j]);
            } else if (c->normalize) {
                for (int j = 0; j < len; j++) mixed[j] = mixed[j] / (divisor[j] == 0.0f ? 1.0f : divisor[j]);
            }
        } else {
            memcpy(mixed, taus, (size_t)len * sizeof(float));
            for (int i = 1; i < m; i++) {
                const float *t = taus + (size_t)i * BLOCK;
                for (int j = 0; j < len; j++) mixed[j] = mixed[j] + t[j];
            }
            if (c->divide_by_total)
                for (int j = 0; j < len; j++) mixed[j] = mixed[j] / c->total;
        }
        if (c->scale_by_lambda)
            for (int j = 0; j < len; j++) mixed[j] = mixed[j] * c->lambda;
        for (int j = 0; j < len; j++) mixed[j] = mixed[j] + b[j];
    }
}

/* merge_chunk(out, n, base, base_dtype, models, combine): out is a float32 buffer of n entries; models a
 * tuple of (data, dtype, keep, cut, allowed, mask, post, post_value, weight, outer_keep, inner_keep,
 * inner_cut, inner_allowed); combine a tuple
 * (consensus, normalize, positive_weights, min_weight, divide_by_total, scale_by_lambda, total, lambda).
 * Addresses are integers (the Python side checks sizes, dtypes and contiguity). Releases the GIL. */
static PyObject *py_merge_chunk(PyObject *self, PyObject *args) {
    unsigned long long out_addr, base_addr;
    Py_ssize_t n;
    int base_dtype;
    PyObject *models_obj, *combine_obj;
    if (!PyArg_ParseTuple(args, "KnKiO!O!", &out_addr, &n, &base_addr, &base_dtype, &PyTuple_Type, &models_obj,
                          &PyTuple_Type, &combine_obj))
        return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(models_obj);
    if (m < 1) {
        PyErr_SetString(PyExc_ValueError, "merge_chunk: no models");
        return NULL;
    }
    Combine c;
    if (!PyArg_ParseTuple(combine_obj, "iiifiiff", &c.consensus, &c.normalize, &c.positive_weights,
                          &c.min_weight, &c.divide_by_total, &c.scale_by_lambda, &c.total, &c.lambda))
        return NULL;
    Model *models = (Model *)calloc((size_t)m, sizeof(Model));
    float *work = (float *)malloc(sizeof(float) * BLOCK * (size_t)(3 + m));
    long long *ties_seen = (long long *)calloc(2 * (size_t)m, sizeof(long long));
    if (!models || !work || !ties_seen) {
        free(models);
        free(work);
        free(ties_seen);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long data, mask;
        Model *md = &models[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(models_obj, i), "KiifLKiffiifL", &data, &md->dtype, &md->keep,
                              &md->cut, &md->allowed, &mask, &md->post, &md->post_value, &md->weight,
                              &md->outer_keep, &md->inner_keep, &md->inner_cut, &md->inner_allowed)) {
            free(models);
            free(work);
            free(ties_seen);
            return NULL;
        }
        md->data = (const void *)(uintptr_t)data;
        md->mask = (const uint8_t *)(uintptr_t)mask;
    }
    Py_BEGIN_ALLOW_THREADS
    merge_chunk(models, (int)m, (const void *)(uintptr_t)base_addr, base_dtype, n, &c, (float *)(uintptr_t)out_addr,
                work, ties_seen);
    Py_END_ALLOW_THREADS
    free(models);
    free(work);
    free(ties_seen);
    Py_RETURN_NONE;
}

/* weighted_sum_chunk: one chunk of a linear merge (interpolation.weighted_sum, then the division by the weights'
 * total; Wortsman et al. 2022): ((x_0 w_0 + x_1 w_1) + ...) / total, each product and each sum rounded to float32
 * (no fused multiply-add), summed left to right, as the torch ops there and mergekit's (x * w).sum(0) / w.sum().
 * total = 1 leaves every float32 as it is. In registers for up to REGISTER_MODELS inputs of one dtype, else per
 * block of BLOCK entries in L1. */
typedef struct {
    const void *data; /* this chunk of the model's stored tensor */
    int dtype;        /* DTYPE_* */
    float weight;
} Input;

INLINE void sum_in_registers(const Input *inputs, const int M, const int bf16, Py_ssize_t n, float total,
                             float *restrict out) {
    const void *data[REGISTER_MODELS];
    float weight[REGISTER_MODELS];
    for (int i = 0; i < M; i++) {
        data[i] = inputs[i].data;
        weight[i] = inputs[i].weight;
    }
#define VALUE(p, j) (bf16 ? ((union { uint32_t u; float f; }){.u = (uint32_t)((const uint16_t *)(p))[j] << 16}).f \
                          : ((const float *)(p))[j])
    for (Py_ssize_t j = 0; j < n; j++) {
        float sum = VALUE(data[0], j) * weight[0];
        for (int i = 1; i < M; i++) sum = sum + VALUE(data[i], j) * weight[i];
        out[j] = sum / total;
    }
#undef VALUE
}

VECTOR_CLONES static void weighted_sum_chunk(const Input *inputs, int m, Py_ssize_t n, float total, float *out) {
    int same = m <= REGISTER_MODELS;
    for (int i = 1; i < m; i++) same &= inputs[i].dtype == inputs[0].dtype;
    if (same) {
        const int bf16 = inputs[0].dtype == DTYPE_BF16;
#define CASE(M)                                                                                               \
    case M:                                                                                                   \
        if (bf16)                                                                                             \
            sum_in_registers(inputs, M, 1, n, total, out);                                                    \
        else                                                                                                  \
            sum_in_registers(inputs, M, 0, n, total, out);                                                    \
        return;
        switch (m) {
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        }
#undef CASE
    }
    float x[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        float *sum = out + start;
        load(inputs[0].data, inputs[0].dtype, start, len, sum);
        for (int j = 0; j < len; j++) sum[j] = sum[j] * inputs[0].weight;
        for (int i = 1; i < m; i++) {
            const float w = inputs[i].weight;
            load(inputs[i].data, inputs[i].dtype, start, len, x);
            for (int j = 0; j < len; j++) sum[j] = sum[j] + x[j] * w;
        }
        for (int j = 0; j < len; j++) sum[j] = sum[j] / total;
    }
}

/* weighted_sum_chunk(out, n, inputs, total): out a float32 buffer of n entries; inputs a tuple of (data, dtype,
 * weight); addresses are integers (the Python side checks sizes, dtypes and contiguity). Releases the GIL. */
static PyObject *py_weighted_sum_chunk(PyObject *self, PyObject *args) {
    unsigned long long out_addr;
    Py_ssize_t n;
    PyObject *inputs_obj;
    float total;
    if (!PyArg_ParseTuple(args, "KnO!f", &out_addr, &n, &PyTuple_Type, &inputs_obj, &total))
        return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(inputs_obj);
    if (m < 1) {
        PyErr_SetString(PyExc_ValueError, "weighted_sum_chunk: no inputs");
        return NULL;
    }
    Input *inputs = (Input *)calloc((size_t)m, sizeof(Input));
    if (!inputs)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long data;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(inputs_obj, i), "Kif", &data, &inputs[i].dtype, &inputs[i].weight)) {
            free(inputs);
            return NULL;
        }
        inputs[i].data = (const void *)(uintptr_t)data;
    }
    Py_BEGIN_ALLOW_THREADS
    weighted_sum_chunk(inputs, (int)m, n, total, (float *)(uintptr_t)out_addr);
    Py_END_ALLOW_THREADS
    free(inputs);
    Py_RETURN_NONE;
}

/* TIES' and Breadcrumbs' threshold scan of one chunk, every cut of every model in one pass (the base block is
 * read once for all of them, and a model's block once for both Breadcrumbs cuts): a = |x - base|; per cut,
 * counts a > hi and a == heavy, copies the a in [lo, hi] other than heavy into its `candidates` (in order),
 * flags NaN. The same tally as sparsify._split_at_bracket without its sums. */
typedef struct {
    const void *x;      /* this chunk of the model's stored tensor */
    int dtype;          /* DTYPE_* */
    float lo, hi, heavy;
    int has_heavy;
    float *candidates;  /* room for n entries */
    long long above, heavy_count, kept;
    int nan;
} Cut;

VECTOR_CLONES static void tally_chunk(Cut *cuts, int count, const void *base, int base_dtype, Py_ssize_t n) {
    float a[BLOCK], b[BLOCK];
    uint8_t wanted[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        load(base, base_dtype, start, len, b);
        const void *loaded = NULL;
        for (int c = 0; c < count; c++) {
            Cut *cut = &cuts[c];
            if (cut->x != loaded) {
                load(cut->x, cut->dtype, start, len, a);
                for (int j = 0; j < len; j++) a[j] = fabsf(a[j] - b[j]);
                loaded = cut->x;
            }
            const float lo = cut->lo, hi = cut->hi;
            const float skip = cut->has_heavy ? cut->heavy : NAN; /* nothing equals NaN */
            int block_up = 0, block_same = 0, block_nan = 0, block_inside = 0;
            for (int j = 0; j < len; j++) {
                float v = a[j];
                block_nan += v != v;
                block_up += v > hi;
                block_same += v == skip;
                int inside = (v >= lo) & (v <= hi) & (v != skip);
                wanted[j] = (uint8_t)inside;
                block_inside += inside;
            }
            cut->above += block_up;
            cut->heavy_count += block_same;
            cut->nan |= block_nan > 0;
            if (block_inside) {
                /* about 1% of the entries (`candidates` has room: kept < n before each write) */
                cut->kept = append_wanted(cut->candidates, cut->kept, a, wanted, len);
            }
        }
    }
}

/* tally_chunk(base, base_dtype, n, cuts) -> ((above, heavy_count, candidates_written, has_nan), ...) per cut;
 * cuts a tuple of (x, x_dtype, lo, hi, heavy, has_heavy, candidates), `candidates` the address of a float32
 * buffer of n entries. Addresses are integers (the Python side checks sizes, dtypes and contiguity). Releases
 * the GIL. */
static PyObject *py_tally_chunk(PyObject *self, PyObject *args) {
    unsigned long long base;
    int base_dtype;
    Py_ssize_t n;
    PyObject *cuts_obj;
    if (!PyArg_ParseTuple(args, "KinO!", &base, &base_dtype, &n, &PyTuple_Type, &cuts_obj))
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(cuts_obj);
    Cut *cuts = (Cut *)calloc(count > 0 ? (size_t)count : 1, sizeof(Cut));
    if (!cuts)
        return PyErr_NoMemory();
    for (Py_ssize_t c = 0; c < count; c++) {
        unsigned long long x, candidates;
        Cut *cut = &cuts[c];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(cuts_obj, c), "KifffiK", &x, &cut->dtype, &cut->lo, &cut->hi,
                              &cut->heavy, &cut->has_heavy, &candidates)) {
            free(cuts);
            return NULL;
        }
        cut->x = (const void *)(uintptr_t)x;
        cut->candidates = (float *)(uintptr_t)candidates;
    }
    Py_BEGIN_ALLOW_THREADS
    tally_chunk(cuts, (int)count, (const void *)(uintptr_t)base, base_dtype, n);
    Py_END_ALLOW_THREADS
    PyObject *result = PyTuple_New(count);
    for (Py_ssize_t c = 0; result && c < count; c++) {
        PyObject *item = Py_BuildValue("LLLO", cuts[c].above, cuts[c].heavy_count, cuts[c].kept,
                                       cuts[c].nan ? Py_True : Py_False);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyTuple_SET_ITEM(result, c, item);
    }
    free(cuts);
    return result;
}

/* dare_chunk: one chunk of DARE's prepare pass (sparsify.random_masks): per model, the Bernoulli(keep) drop mask of
 * its entries, packed 8 entries to a byte, and optionally the float64 sums of |x - base| and of its kept entries.
 * The bits are those of merging/methods/philox.py: entry j of stream s (the model) is kept when (r >> 8) <
 * threshold = ceil(keep 2^24), r word j % 4 of Philox4x32-10 (Salmon et al. 2011) of the counter (j / 4 low and
 * high 32 bits, s, 0) under the 64-bit key. PHILOX_GROUPS counters are run side by side through each round (the
 * loop over them vectorizes: 32 x 32 -> 64-bit products are one instruction per 4 or 8 lanes). The sums follow
 * numpy's float32 -> float64 `sum` exactly (merging.methods.sparsify._sum64): buffers of 8192 entries, each summed
 * pairwise as numpy's pairwise_sum (8 accumulators up to 128 entries), the buffers' sums added left to right. */
#define SUM_BUFFER 8192 /* numpy's default buffer size (np.getbufsize()) */
#define PHILOX_GROUPS 64 /* counters per call of a `philox_bits` kernel: 256 entries, 32 mask bytes */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u


/* The keep bits of counters first .. first + PHILOX_GROUPS - 1 (entries 4 first ..): 32 bytes into `bytes`. Three
 * versions of the same integer operations (the same bits): plain C, AVX2 (8 counters per vector) and AVX-512 (16),
 * chosen when the module loads. */
typedef void (*PhiloxBits)(uint32_t k0, uint32_t k1, uint32_t stream, uint64_t first, uint32_t threshold,
                           uint8_t *bytes);

static void philox_bits_plain(uint32_t k0, uint32_t k1, uint32_t stream, uint64_t first, uint32_t threshold,
                              uint8_t *bytes) {
    for (int g = 0; g < PHILOX_GROUPS; g += 2) {
        uint32_t byte = 0;
        for (int h = 0; h < 2; h++) {
            uint32_t x0 = (uint32_t)(first + (uint64_t)(g + h)), x1 = (uint32_t)((first + (uint64_t)(g + h)) >> 32);
            uint32_t x2 = stream, x3 = 0, a = k0, b = k1;
            for (int r = 0; r < 10; r++) {
                const uint64_t p0 = (uint64_t)PHILOX_M0 * x0, p1 = (uint64_t)PHILOX_M1 * x2;
                const uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1 ^ a, y2 = (uint32_t)(p0 >> 32) ^ x3 ^ b;
                x1 = (uint32_t)p1;
                x3 = (uint32_t)p0;
                x0 = y0;
                x2 = y2;
                a += PHILOX_W0;
                b += PHILOX_W1;
            }
            byte |= (((x0 >> 8) < threshold) | (((x1 >> 8) < threshold) << 1) | (((x2 >> 8) < threshold) << 2) |
                     (((x3 >> 8) < threshold) << 3)) << (4 * h);
        }
        bytes[g / 2] = (uint8_t)byte;
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define PHILOX_SIMD 1

/* hi, lo of m * x per 32-bit lane: the even lanes' products, then the odd lanes' (shifted down), blended */
#define MULHILO(SFX, x, m, hi, lo)                                                                                \
    do {                                                                                                          \
        const __typeof__(x) even = _mm##SFX##_mul_epu32(x, m), odd = _mm##SFX##_mul_epu32(_mm##SFX##_srli_epi64(x, 32), m); \
        lo = BLEND##SFX(even, _mm##SFX##_slli_epi64(odd, 32));                                                    \
        hi = BLEND##SFX(_mm##SFX##_srli_epi64(even, 32), odd);                                                    \
    } while (0)
#define BLEND256(a, b) _mm256_blend_epi32(a, b, 0xAA)
#define BLEND512(a, b) _mm512_mask_blend_epi32((__mmask16)0xAAAA, a, b)

/* One Philox4x32-10 pass over CHAINS independent vectors of counters, interleaved round by round (each round's
 * products wait on the previous round: chains side by side keep the multipliers busy). */
#define PHILOX_VECTOR(SFX, VEC, LANES, CHAINS, SET1, XOR, LOAD, ZERO)                                              \
    VEC x0[CHAINS], x1[CHAINS], x2[CHAINS], x3[CHAINS];                                                           \
    for (int c = 0; c < CHAINS; c++) {                                                                            \
        uint32_t low[LANES], high[LANES];                                                                         \
        for (int l = 0; l < LANES; l++) {                                                                         \
            low[l] = (uint32_t)(first + (uint64_t)(g + c * LANES + l));                                           \
            high[l] = (uint32_t)((first + (uint64_t)(g + c * LANES + l)) >> 32);                                  \
        }                                                                                                         \
        x0[c] = LOAD(low);                                                                                        \
        x1[c] = LOAD(high);                                                                                       \
        x2[c] = SET1((int)stream);                                                                                \
        x3[c] = ZERO();                                                                                           \
    }                                                                                                             \
    uint32_t a = k0, b = k1;                                                                                      \
    for (int r = 0; r < 10; r++) {                                                                                \
        const VEC ka = SET1((int)a), kb = SET1((int)b);                                                           \
        for (int c = 0; c < CHAINS; c++) {                                                                        \
            VEC hi0, lo0, hi1, lo1;                                                                               \
            MULHILO(SFX, x0[c], m0, hi0, lo0);                                                                    \
            MULHILO(SFX, x2[c], m1, hi1, lo1);                                                                    \
            x0[c] = XOR(XOR(hi1, x1[c]), ka);                                                                     \
            x2[c] = XOR(XOR(hi0, x3[c]), kb);                                                                     \
            x1[c] = lo1;                                                                                          \
            x3[c] = lo0;                                                                                          \
        }                                                                                                         \
        a += PHILOX_W0;                                                                                           \
        b += PHILOX_W1;                                                                                           \
    }

#define AVX2_CHAINS 2 /* 16 ymm registers: two chains of four words, the constants beside them */
#define AVX512_CHAINS 4

__attribute__((target("avx2"))) static void philox_bits_avx2(uint32_t k0, uint32_t k1, uint32_t stream, uint64_t first,
                                                              uint32_t threshold, uint8_t *bytes) {
    const __m256i m0 = _mm256_set1_epi64x(PHILOX_M0), m1 = _mm256_set1_epi64x(PHILOX_M1);
    const __m256i limit = _mm256_set1_epi32((int)threshold); /* words >> 8 < 2^24: signed compares are exact */
    for (int g = 0; g < PHILOX_GROUPS; g += 8 * AVX2_CHAINS) {
#define LOAD256(p) _mm256_loadu_si256((const __m256i *)(p))
        PHILOX_VECTOR(256, __m256i, 8, AVX2_CHAINS, _mm256_set1_epi32, _mm256_xor_si256, LOAD256, _mm256_setzero_si256)
#undef LOAD256
        for (int c = 0; c < AVX2_CHAINS; c++) {
            const __m256i words[4] = {x0[c], x1[c], x2[c], x3[c]};
            uint32_t bits = 0;
            for (int w = 0; w < 4; w++) {
                const __m256i kept = _mm256_cmpgt_epi32(limit, _mm256_srli_epi32(words[w], 8));
                bits |= spread_bits[_mm256_movemask_ps(_mm256_castsi256_ps(kept))] << w;
            }
            memcpy(bytes + (g + 8 * c) / 2, &bits, 4);
        }
    }
}

__attribute__((target("avx512f"))) static void philox_bits_avx512(uint32_t k0, uint32_t k1, uint32_t stream,
                                                                   uint64_t first, uint32_t threshold, uint8_t *bytes) {
    const __m512i m0 = _mm512_set1_epi64(PHILOX_M0), m1 = _mm512_set1_epi64(PHILOX_M1);
    const __m512i limit = _mm512_set1_epi32((int)threshold);
    for (int g = 0; g < PHILOX_GROUPS; g += 16 * AVX512_CHAINS) {
#define LOAD512(p) _mm512_loadu_si512((const void *)(p))
        PHILOX_VECTOR(512, __m512i, 16, AVX512_CHAINS, _mm512_set1_epi32, _mm512_xor_si512, LOAD512, _mm512_setzero_si512)
#undef LOAD512
        for (int c = 0; c < AVX512_CHAINS; c++) {
            const __m512i words[4] = {x0[c], x1[c], x2[c], x3[c]};
            uint64_t bits = 0;
            for (int w = 0; w < 4; w++) {
                const __mmask16 kept = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(words[w], 8), limit);
                bits |= ((uint64_t)spread_bits[kept & 0xFF] | ((uint64_t)spread_bits[kept >> 8] << 32)) << w;
            }
            memcpy(bytes + (g + 16 * c) / 2, &bits, 8);
        }
    }
}
#endif

static PhiloxBits philox_bits = philox_bits_plain;

static void init_tables(void) { /* and choose the Philox kernel */
    for (int m = 0; m < 256; m++) {
        uint32_t v = 0;
        for (int l = 0; l < 8; l++) {
            v |= (uint32_t)((m >> l) & 1) << (4 * l);
            bit_floats[m][l] = (float)((m >> l) & 1);
        }
        spread_bits[m] = v;
    }
#ifdef PHILOX_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        philox_bits = philox_bits_avx512;
    else if (__builtin_cpu_supports("avx2"))
        philox_bits = philox_bits_avx2;
#endif
}

/* the mask bits of entries [start, start + n) (start a multiple of 8) into `out` (ceil(n / 8) bytes, the unused
 * high bits of the last one zero, as np.packbits pads) */
static void philox_mask(uint32_t k0, uint32_t k1, uint32_t stream, uint64_t start, Py_ssize_t n, uint32_t threshold,
                        uint8_t *out) {
    uint8_t bytes[PHILOX_GROUPS / 2];
    for (Py_ssize_t done = 0; done < n; done += 4 * PHILOX_GROUPS) {
        const Py_ssize_t left = (n - done + 7) / 8;
        uint8_t *to = left >= PHILOX_GROUPS / 2 ? out + done / 8 : bytes; /* the last, partial group via `bytes` */
        philox_bits(k0, k1, stream, (start + (uint64_t)done) / 4, threshold, to);
        if (to == bytes)
            memcpy(out + done / 8, bytes, (size_t)left);
    }
    if (n % 8) out[n / 8] &= (uint8_t)((1u << (n % 8)) - 1);
}

/* which philox_bits version runs: "avx512f", "avx2" or "plain" */
static PyObject *py_philox_version(PyObject *self, PyObject *args) {
#ifdef PHILOX_SIMD
    if (philox_bits == philox_bits_avx512)
        return PyUnicode_FromString("avx512f");
    if (philox_bits == philox_bits_avx2)
        return PyUnicode_FromString("avx2");
#endif
    return PyUnicode_FromString("plain");
}

/* philox_use(version): run this philox_bits version ("avx512f", "avx2", "plain"; tests compare them); returns
 * whether this processor has it */
static PyObject *py_philox_use(PyObject *self, PyObject *args) {
    const char *version;
    if (!PyArg_ParseTuple(args, "s", &version))
        return NULL;
    if (strcmp(version, "plain") == 0) {
        philox_bits = philox_bits_plain;
        Py_RETURN_TRUE;
    }
#ifdef PHILOX_SIMD
    if (strcmp(version, "avx512f") == 0 && __builtin_cpu_supports("avx512f")) {
        philox_bits = philox_bits_avx512;
        Py_RETURN_TRUE;
    }
    if (strcmp(version, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
        philox_bits = philox_bits_avx2;
        Py_RETURN_TRUE;
    }
#endif
    Py_RETURN_FALSE;
}

VECTOR_CLONES static double pairwise_sum(const float *a, Py_ssize_t n) {
    if (n < 8) {
        double res = 0.;
        for (Py_ssize_t i = 0; i < n; i++) res += (double)a[i];
        return res;
    }
    if (n <= 128) {
        double r[8], res;
        Py_ssize_t i;
        for (int j = 0; j < 8; j++) r[j] = (double)a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += (double)a[i + j];
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += (double)a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

typedef struct {
    const void *x;      /* this chunk of the model's stored tensor */
    int dtype;          /* DTYPE_* */
    uint32_t k0, k1, stream; /* the Philox key words and stream (the model's index) */
    uint32_t threshold; /* ceil(keep 2^24) */
    uint8_t *mask;      /* ceil(n / 8) bytes */
    double total, kept;
} Draw;

typedef struct {
    double total, kept;
} Sums;

/* numpy's pairwise sums (pairwise_sum above) of |x - base| and of its kept entries over entries [start, start + n),
 * each leaf's values made from the stored x, base and mask bits as it is summed (no buffers written and read back).
 * `bits` holds entry start's bit at bit 0 of its first byte (leaves start at multiples of 8 entries). */
VECTOR_CLONES static Sums masked_pairwise(const void *x, int x_dtype, const void *base, int base_dtype,
                                          Py_ssize_t start, Py_ssize_t n, const uint8_t *bits) {
    if (n <= 128) {
        float a[136], k[136];
        load(x, x_dtype, start, (int)n, a);
        load(base, base_dtype, start, (int)n, k);
        for (int j = 0; j < n; j++) a[j] = fabsf(a[j] - k[j]);
        for (int q = 0; q < (n + 7) / 8; q++) memcpy(k + 8 * q, bit_floats[bits[q]], sizeof(bit_floats[0]));
        for (int j = 0; j < n; j++) k[j] = a[j] * k[j];
        return (Sums){pairwise_sum(a, n), pairwise_sum(k, n)};
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    const Sums left = masked_pairwise(x, x_dtype, base, base_dtype, start, n2, bits);
    const Sums right = masked_pairwise(x, x_dtype, base, base_dtype, start + n2, n - n2, bits + n2 / 8);
    return (Sums){left.total + right.total, left.kept + right.kept};
}

/* sums over [0, n) of |x - base| and of its kept entries, per model, in numpy's order: per buffer of SUM_BUFFER
 * entries a pairwise sum, the buffers' sums added left to right */
static void sum_masked(Draw *draws, int m, const void *base, int base_dtype, Py_ssize_t n) {
    for (Py_ssize_t start = 0; start < n; start += SUM_BUFFER) {
        const Py_ssize_t len = n - start < SUM_BUFFER ? n - start : SUM_BUFFER;
        for (int i = 0; i < m; i++) {
            Draw *d = &draws[i];
            const Sums s = masked_pairwise(d->x, d->dtype, base, base_dtype, start, len, d->mask + start / 8);
            d->total = start == 0 ? s.total : d->total + s.total;
            d->kept = start == 0 ? s.kept : d->kept + s.kept;
        }
    }
}

/* dare_chunk(base, base_dtype, n, start, draws, sums) -> ((total, kept), ...): entries [start, start + n) of the
 * tensor (start a multiple of 8), draws a tuple of (x, x_dtype, k0, k1, stream, threshold, mask) per model, `mask`
 * of ceil(n / 8) bytes; sums 0: masks only (x and base unread, sums 0). Releases the GIL. */
static PyObject *py_dare_chunk(PyObject *self, PyObject *args) {
    unsigned long long base, start;
    int base_dtype, sums;
    Py_ssize_t n;
    PyObject *draws_obj;
    if (!PyArg_ParseTuple(args, "KinKO!p", &base, &base_dtype, &n, &start, &PyTuple_Type, &draws_obj, &sums))
        return NULL;
    if (start % 8) {
        PyErr_SetString(PyExc_ValueError, "dare_chunk: start must be a multiple of 8");
        return NULL;
    }
    Py_ssize_t m = PyTuple_GET_SIZE(draws_obj);
    Draw *draws = (Draw *)calloc(m > 0 ? (size_t)m : 1, sizeof(Draw));
    if (!draws)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long x, mask;
        Draw *d = &draws[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(draws_obj, i), "KiIIIIK", &x, &d->dtype, &d->k0, &d->k1, &d->stream,
                              &d->threshold, &mask)) {
            free(draws);
            return NULL;
        }
        d->x = (const void *)(uintptr_t)x;
        d->mask = (uint8_t *)(uintptr_t)mask;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m; i++)
        philox_mask(draws[i].k0, draws[i].k1, draws[i].stream, start, n, draws[i].threshold, draws[i].mask);
    if (sums)
        sum_masked(draws, (int)m, (const void *)(uintptr_t)base, base_dtype, n);
    Py_END_ALLOW_THREADS
    PyObject *result = PyTuple_New(m);
    for (Py_ssize_t i = 0; result && i < m; i++) {
        PyObject *item = Py_BuildValue("dd", draws[i].total, draws[i].kept);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyTuple_SET_ITEM(result, i, item);
    }
    free(draws);
    return result;
}

/* point_chunk: one chunk of a point theta = sum_i w_i x_i between checkpoints (evaluations.lm_path.write_point),
 * the same bits as its torch ops on float64 chunks: each x_i read exactly as a double, sum = x_0 w_0 (one
 * rounding), then sum = fma(x_i, w_i, sum) for each later input (torch's add_(other, alpha=w) on float64 tensors
 * is a fused multiply-add, vectorized or not; the explicit fma() is unaffected by -ffp-contract=off), then
 * rounded to float32. One pass over the inputs instead of six over float64 buffers. */
typedef struct {
    const void *data; /* this chunk of the input's stored tensor */
    int dtype;        /* DTYPE_* */
    double weight;
} Term;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* fma() inlined and vectorized. Not "arch=haswell": its resolver tests the CPU model (haswell itself), so every
 * other AVX2 CPU ran the default clone, one libm fma() call per entry; x86-64-v3 tests the features. */
#define FMA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FMA_CLONES
#endif

INLINE double as_double(const void *data, int dtype, Py_ssize_t j) {
    if (dtype == DTYPE_F32)
        return (double)((const float *)data)[j];
    union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)data)[j] << 16};
    return (double)v.f;
}

/* Returns 1 when every sum is finite (the torch path checks the chunk's sum; float64 cannot overflow on float32
 * or bf16 inputs). */
FMA_CLONES static int point_chunk(const Term *terms, int m, Py_ssize_t n, float *out) {
    double sum[BLOCK];
    int finite = 1;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        const double w0 = terms[0].weight;
        if (terms[0].dtype == DTYPE_F32) {
            const float *x = (const float *)terms[0].data + start;
            for (int j = 0; j < len; j++) sum[j] = (double)x[j] * w0;
        } else {
            for (int j = 0; j < len; j++) sum[j] = as_double(terms[0].data, DTYPE_BF16, start + j) * w0;
        }
        for (int i = 1; i < m; i++) {
            const double w = terms[i].weight;
            if (terms[i].dtype == DTYPE_F32) {
                const float *x = (const float *)terms[i].data + start;
                for (int j = 0; j < len; j++) sum[j] = fma((double)x[j], w, sum[j]);
            } else {
                for (int j = 0; j < len; j++) sum[j] = fma(as_double(terms[i].data, DTYPE_BF16, start + j), w, sum[j]);
            }
        }
        int bad = 0;
        for (int j = 0; j < len; j++) {
            bad |= !(fabs(sum[j]) <= DBL_MAX); /* NaN compares false */
            out[start + j] = (float)sum[j];
        }
        finite &= !bad;
    }
    return finite;
}

/* point_chunk(out, n, terms): out a float32 buffer of n entries; terms a tuple of (data, dtype, weight), weights
 * as Python floats (doubles); addresses are integers (the Python side checks sizes, dtypes and contiguity).
 * Returns whether every entry is finite. Releases the GIL. */
static PyObject *py_point_chunk(PyObject *self, PyObject *args) {
    unsigned long long out_addr;
    Py_ssize_t n;
    PyObject *terms_obj;
    if (!PyArg_ParseTuple(args, "KnO!", &out_addr, &n, &PyTuple_Type, &terms_obj))
        return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(terms_obj);
    if (m < 1) {
        PyErr_SetString(PyExc_ValueError, "point_chunk: no terms");
        return NULL;
    }
    Term *terms = (Term *)calloc((size_t)m, sizeof(Term));
    if (!terms)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long data;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(terms_obj, i), "Kid", &data, &terms[i].dtype, &terms[i].weight)) {
            free(terms);
            return NULL;
        }
        terms[i].data = (const void *)(uintptr_t)data;
    }
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = point_chunk(terms, (int)m, n, (float *)(uintptr_t)out_addr);
    Py_END_ALLOW_THREADS
    free(terms);
    return PyBool_FromLong(finite);
}

/* stats_chunks: the data-free merge statistics of one tensor (merging/merge_stats.py, tensor_stats), numpy's bits.
 * Task vectors tau_i = x_i - base (or x_i), each entry read exactly as a double; per chunk of `chunk` entries, the
 * squared norms and pairwise dots are numpy's `np.multiply(a, b).sum()` of that chunk: 0.0 + the pairwise sum of
 * numpy's DOUBLE_pairwise_sum (blocks of at most 128 entries summed by 8 accumulators, longer ranges split at
 * n/2 rounded down to a multiple of 8), each product rounded before it is added (-ffp-contract=off). One pass
 * over the inputs instead of one numpy call per pair and chunk. */
#define PW_BLOCK 128

typedef struct {
    const void *data;
    int dtype;
} Vec;


INLINE void load_doubles(const Vec *v, Py_ssize_t start, int len, double *out) {
    if (v->dtype == DTYPE_F32) {
        const float *x = (const float *)v->data + start;
        for (int k = 0; k < len; k++) out[k] = (double)x[k];
    } else {
        const uint16_t *h = (const uint16_t *)v->data + start;
        for (int k = 0; k < len; k++) {
            union { uint32_t u; float f; } b = {.u = (uint32_t)h[k] << 16};
            out[k] = (double)b.f;
        }
    }
}

INLINE double pw_leaf(const double *x, const double *y, int n) {
    if (n < 8) {
        double res = 0.;
        for (int i = 0; i < n; i++) res += x[i] * y[i];
        return res;
    }
    double r[8];
    for (int k = 0; k < 8; k++) r[k] = x[k] * y[k];
    int i = 8;
    for (; i < n - (n % 8); i += 8)
        for (int k = 0; k < 8; k++) r[k] += x[i + k] * y[i + k];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += x[i] * y[i];
    return res;
}

typedef struct {
    const Vec *x;
    int m, pairs;
    const Vec *base;    /* NULL: the inputs themselves */
    double *tau;        /* m x PW_BLOCK */
    long long conflicts;
    int float_difference; /* tau = (double)((float)x - (float)base), model_stock's float32 task vectors */
} Stats;

/* The pairwise sums of entries [start, start + n) into out[0..pairs): the squares, then the dots (i < j). */
VECTOR_CLONES static void pw_node(Stats *st, Py_ssize_t start, Py_ssize_t n, double *out, double *scratch) {
    if (n <= PW_BLOCK) {
        int len = (int)n, m = st->m;
        for (int i = 0; i < m; i++) {
            double *t = st->tau + (size_t)i * PW_BLOCK;
            load_doubles(&st->x[i], start, len, t);
            if (st->base) {
                double b[PW_BLOCK];
                load_doubles(st->base, start, len, b);
                if (st->float_difference)
                    for (int k = 0; k < len; k++) t[k] = (double)((float)t[k] - (float)b[k]);
                else
                    for (int k = 0; k < len; k++) t[k] -= b[k];
            }
        }
        if (m > 1) {
            unsigned char pos[PW_BLOCK] = {0}, neg[PW_BLOCK] = {0};
            for (int i = 0; i < m; i++) {
                const double *t = st->tau + (size_t)i * PW_BLOCK;
                for (int k = 0; k < len; k++) {
                    pos[k] |= t[k] > 0;
                    neg[k] |= t[k] < 0;
                }
            }
            int both = 0;
            for (int k = 0; k < len; k++) both += pos[k] & neg[k];
            st->conflicts += both;
        }
        int p = 0;
        for (int i = 0; i < m; i++, p++)
            out[p] = pw_leaf(st->tau + (size_t)i * PW_BLOCK, st->tau + (size_t)i * PW_BLOCK, len);
        for (int i = 0; i < m && st->pairs > m; i++) /* the dots, unless only the squares are asked for */
            for (int j = i + 1; j < m; j++, p++)
                out[p] = pw_leaf(st->tau + (size_t)i * PW_BLOCK, st->tau + (size_t)j * PW_BLOCK, len);
        return;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    pw_node(st, start, n2, out, scratch);
    pw_node(st, start + n2, n - n2, scratch, scratch + st->pairs);
    for (int p = 0; p < st->pairs; p++) out[p] += scratch[p];
}

/* stats_chunks(out, n, chunk, inputs, base[, float_difference[, squares_only]]): out a float64 buffer of
 * ceil(n / chunk) x pairs entries (pairs = m squares, then the m (m - 1) / 2 dots i < j; with squares_only the m
 * squares alone); inputs a tuple of m (address, dtype); base (address, dtype) or None; float_difference: tau_i =
 * x_i - base rounded to float32 before the products (Model Stock's row norms and dots with chunk = its row
 * length, SCE's sums of squares; task_arithmetic.ModelStock and Sce). Returns the sign
 * conflicts (entries where some tau > 0 and another < 0). Releases the GIL. */
static PyObject *py_stats_chunks(PyObject *self, PyObject *args) {
    unsigned long long out_addr;
    Py_ssize_t n, chunk;
    PyObject *inputs_obj, *base_obj;
    int float_difference = 0, squares_only = 0;
    if (!PyArg_ParseTuple(args, "KnnO!O|pp", &out_addr, &n, &chunk, &PyTuple_Type, &inputs_obj, &base_obj,
                          &float_difference, &squares_only))
        return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(inputs_obj);
    if (m < 1 || m > 64 || chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "stats_chunks: 1 to 64 inputs and a positive chunk");
        return NULL;
    }
    Vec *x = (Vec *)calloc((size_t)m + 1, sizeof(Vec));
    int pairs = (int)(squares_only ? m : m + m * (m - 1) / 2);
    double *tau = (double *)malloc((size_t)m * PW_BLOCK * sizeof(double));
    double *scratch = (double *)malloc((size_t)pairs * 64 * sizeof(double));
    if (!x || !tau || !scratch) {
        free(x); free(tau); free(scratch);
        return PyErr_NoMemory();
    }
    int ok = 1;
    for (Py_ssize_t i = 0; i < m && ok; i++) {
        unsigned long long data;
        ok = PyArg_ParseTuple(PyTuple_GET_ITEM(inputs_obj, i), "Ki", &data, &x[i].dtype);
        x[i].data = (const void *)(uintptr_t)data;
    }
    Vec *base = NULL;
    if (ok && base_obj != Py_None) {
        unsigned long long data;
        ok = PyArg_ParseTuple(base_obj, "Ki", &data, &x[m].dtype);
        x[m].data = (const void *)(uintptr_t)data;
        base = &x[m];
    }
    if (!ok) {
        free(x); free(tau); free(scratch);
        return NULL;
    }
    Stats st = {x, (int)m, pairs, base, tau, 0, float_difference};
    double *out = (double *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0, c = 0; start < n; start += chunk, c++) {
        double *row = out + (size_t)c * pairs;
        pw_node(&st, start, n - start < chunk ? n - start : chunk, row, scratch);
        for (int p = 0; p < pairs; p++) row[p] = 0.0 + row[p]; /* numpy adds the sum to the identity */
    }
    Py_END_ALLOW_THREADS
    free(x); free(tau); free(scratch);
    return PyLong_FromLongLong(st.conflicts);
}

/* elect_chunk(kind, out, n, base, inputs, a, b, k) -> bool: one chunk of an elementwise task-vector election, the
 * float32 operations of its torch code in order (tau_i = x_i - base rounded first; scalars rounded to float32, as
 * torch does with Python numbers): ELECT_MAGMAX (competition.magmax: the tau of largest |tau|, the later one on
 * equal magnitudes; a = lambda), ELECT_CONSENSUS (masks.consensus_ta: TALL masks |tau_t| > a |total - tau_t|,
 * kept where at least k agree, b = lambda), ELECT_EMR (masks.emr: the elected sign's largest magnitude),
 * ELECT_RAM (ram.ram: entries |tau| > a kept, averaged over the models keeping them). Returns False, leaving `out`
 * unspecified, where an input, a task vector or their sum is not finite: NaNs take torch's own bits there, which
 * its vectorised and scalar loops choose differently, so the caller merges that chunk with the torch ops.
 * inputs a tuple of 1 to 64 (address, dtype); base (address, dtype). Releases the GIL. */
enum { ELECT_MAGMAX = 0, ELECT_CONSENSUS = 1, ELECT_EMR = 2, ELECT_RAM = 3 };

/* One block of the base into base_block and the task vectors tau[i * BLOCK + j] = x_i - base (float32); returns
 * whether every base entry and every task-vector entry is finite. */
INLINE int load_task_vectors(const Vec *base, const Vec *x, int m, Py_ssize_t start, int len, float *base_block,
                             float *tau) {
    int finite = 1;
    load(base->data, base->dtype, start, len, base_block);
    for (int j = 0; j < len; j++) finite &= fabsf(base_block[j]) <= FLT_MAX;
    for (int i = 0; i < m; i++) {
        float *t = tau + (size_t)i * BLOCK;
        load(x[i].data, x[i].dtype, start, len, t);
        for (int j = 0; j < len; j++) {
            t[j] = t[j] - base_block[j];
            finite &= fabsf(t[j]) <= FLT_MAX;
        }
    }
    return finite;
}

VECTOR_CLONES static int elect_chunk(int kind, float *out, Py_ssize_t n, const Vec *base, const Vec *x, int m,
                                     float a, float b, int k, float *tau) {
    int finite = 1;
    float base_block[BLOCK], total[BLOCK];
    for (Py_ssize_t start = 0; start < n && finite; start += BLOCK) {
        const int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        finite = load_task_vectors(base, x, m, start, len, base_block, tau);
        if (kind == ELECT_CONSENSUS || kind == ELECT_EMR) {
            memcpy(total, tau, (size_t)len * sizeof(float));
            for (int i = 1; i < m; i++)
                for (int j = 0; j < len; j++) total[j] = total[j] + tau[(size_t)i * BLOCK + j];
            for (int j = 0; j < len; j++) finite &= fabsf(total[j]) <= FLT_MAX;
        }
        float *o = out + start, acc[BLOCK], divisor[BLOCK]; /* per entry, models in the inner loop over entries */
        int votes[BLOCK];
        if (kind == ELECT_MAGMAX) {
            memcpy(acc, tau, (size_t)len * sizeof(float));
            for (int i = 1; i < m; i++) {
                const float *t = tau + (size_t)i * BLOCK;
                for (int j = 0; j < len; j++) acc[j] = fabsf(t[j]) >= fabsf(acc[j]) ? t[j] : acc[j];
            }
            for (int j = 0; j < len; j++) o[j] = base_block[j] + a * acc[j];
        } else if (kind == ELECT_CONSENSUS) {
            memset(votes, 0, sizeof(votes));
            for (int i = 0; i < m; i++) {
                const float *t = tau + (size_t)i * BLOCK;
                for (int j = 0; j < len; j++) votes[j] += fabsf(t[j]) > fabsf(total[j] - t[j]) * a;
            }
            for (int j = 0; j < len; j++) o[j] = base_block[j] + b * (total[j] * (votes[j] >= k ? 1.0f : 0.0f));
        } else if (kind == ELECT_EMR) {
            for (int j = 0; j < len; j++) {
                divisor[j] = total[j] > 0 ? 1.0f : -1.0f; /* the elected sign */
                acc[j] = 0.0f;
            }
            for (int i = 0; i < m; i++) {
                const float *t = tau + (size_t)i * BLOCK;
                for (int j = 0; j < len; j++) {
                    const float kept = fabsf(t[j]) * (t[j] * divisor[j] > 0 ? 1.0f : 0.0f);
                    acc[j] = kept > acc[j] ? kept : acc[j];
                }
            }
            for (int j = 0; j < len; j++) o[j] = base_block[j] + acc[j] * divisor[j];
        } else {
            memset(votes, 0, sizeof(votes));
            for (int i = 0; i < m; i++) {
                const float *t = tau + (size_t)i * BLOCK;
                for (int j = 0; j < len; j++) votes[j] += fabsf(t[j]) > a;
            }
            for (int j = 0; j < len; j++) {
                divisor[j] = (float)(votes[j] > 1 ? votes[j] : 1);
                acc[j] = 0.0f;
            }
            for (int i = 0; i < m; i++) {
                const float *t = tau + (size_t)i * BLOCK;
                for (int j = 0; j < len; j++) acc[j] = acc[j] + (fabsf(t[j]) > a ? t[j] : 0.0f) / divisor[j];
            }
            for (int j = 0; j < len; j++) o[j] = base_block[j] + acc[j];
        }
    }
    return finite;
}

static PyObject *py_elect_chunk(PyObject *self, PyObject *args) {
    int kind;
    unsigned long long out_addr, base_addr;
    Py_ssize_t n;
    int base_dtype;
    PyObject *inputs_obj;
    double a, b;
    long long k;
    if (!PyArg_ParseTuple(args, "iKn(Ki)O!ddL", &kind, &out_addr, &n, &base_addr, &base_dtype, &PyTuple_Type,
                          &inputs_obj, &a, &b, &k))
        return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(inputs_obj);
    if (m < 1 || m > 64 || kind < ELECT_MAGMAX || kind > ELECT_RAM) {
        PyErr_SetString(PyExc_ValueError, "elect_chunk: 1 to 64 inputs and a known kind");
        return NULL;
    }
    Vec x[64];
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long data;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(inputs_obj, i), "Ki", &data, &x[i].dtype)) return NULL;
        x[i].data = (const void *)(uintptr_t)data;
    }
    Vec base = {(const void *)(uintptr_t)base_addr, base_dtype};
    float *tau = (float *)malloc((size_t)m * BLOCK * sizeof(float));
    if (!tau) return PyErr_NoMemory();
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = elect_chunk(kind, (float *)(uintptr_t)out_addr, n, &base, x, (int)m, (float)a, (float)b,
                         k < INT_MIN ? INT_MIN : k > INT_MAX ? INT_MAX : (int)k, tau);
    Py_END_ALLOW_THREADS
    free(tau);
    return PyBool_FromLong(finite);
}

/* ---------------------------------------------------------------------------------------------------------------
 * side_chunk: one chunk of the per-task side outputs of TALL masks and EMR-merging (masks.py `tall_side_chunk`,
 * `emr_side_chunk`; written by merging/output/task_files.py beside the merged model), read once from the stored
 * inputs. SIDE_TALL (Wang et al. 2024, eq. 5): tau_MTL = sum_t tau_t folded from model 0, masks
 * |tau_t| > a |tau_MTL - tau_t|. SIDE_EMR (Huang et al. 2024, Alg. 1 lines 1-4): the unified vector
 * tau_uni = sign * max_t |tau_t| 1[tau_t sign > 0] with sign = 1 where the sum is > 0, else -1, masks
 * tau_t sign > 0, and with `sums` the rescalers' float64 sums of |tau_t| and of |tau_uni| M_t over the chunk (one
 * sum block, masks.SUM_BLOCK entries or the tensor's tail) in numpy's order: per SUM_BUFFER entries a pairwise sum
 * (pairwise_sum above), the buffers' sums added left to right (masks.block_sum). The float32 operations and their
 * order are those of masks.tall_masks and masks.emr_elect_inplace; the task vector goes out as float32 or as bf16
 * rounded to nearest even (torch's rounding of finite values). Returns False, leaving the outputs unspecified,
 * where an input, a task vector or their sum is not finite (NaN bits are torch's own: the caller runs the torch
 * ops on that chunk), else the sums (l1_0..l1_{m-1}, masked_0..masked_{m-1}), an empty tuple without `sums`.
 * --------------------------------------------------------------------------------------------------------------- */
enum { SIDE_TALL = 0, SIDE_EMR = 1 };

INLINE uint16_t bf16_nearest_even(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* `work`: m BLOCK floats (task vectors), and with `sums` 2 m SUM_BUFFER floats (the summands of one buffer) */
VECTOR_CLONES static int side_chunk(int kind, Py_ssize_t n, const Vec *base, const Vec *x, int m, float a,
                                    void *tv, int tv_dtype, uint8_t *const *masks, int sums, double *out,
                                    float *work) {
    float *tau = work, *l1_terms = work + (size_t)m * BLOCK, *masked_terms = l1_terms + (size_t)m * SUM_BUFFER;
    float base_block[BLOCK], total[BLOCK], sign[BLOCK], acc[BLOCK], vec[BLOCK];
    for (Py_ssize_t buffer = 0; buffer < n; buffer += SUM_BUFFER) {
        const Py_ssize_t buffer_len = n - buffer < SUM_BUFFER ? n - buffer : SUM_BUFFER;
        for (Py_ssize_t start = buffer; start < buffer + buffer_len; start += BLOCK) {
            const int len = (int)(buffer + buffer_len - start < BLOCK ? buffer + buffer_len - start : BLOCK);
            const Py_ssize_t at = start - buffer; /* the entries' place in this buffer's summands */
            int finite = load_task_vectors(base, x, m, start, len, base_block, tau);
            memcpy(total, tau, (size_t)len * sizeof(float));
            for (int i = 1; i < m; i++)
                for (int j = 0; j < len; j++) total[j] = total[j] + tau[(size_t)i * BLOCK + j];
            for (int j = 0; j < len; j++) finite &= fabsf(total[j]) <= FLT_MAX;
            if (!finite) return 0;
            if (kind == SIDE_TALL) {
                for (int i = 0; i < m; i++) {
                    const float *t = tau + (size_t)i * BLOCK;
                    uint8_t *mask = masks[i] + start;
                    for (int j = 0; j < len; j++) mask[j] = fabsf(t[j]) > fabsf(total[j] - t[j]) * a;
                }
                memcpy(vec, total, (size_t)len * sizeof(float));
            } else {
                for (int j = 0; j < len; j++) {
                    sign[j] = total[j] > 0 ? 1.0f : -1.0f;
                    acc[j] = 0.0f;
                }
                for (int i = 0; i < m; i++) {
                    const float *t = tau + (size_t)i * BLOCK;
                    uint8_t *mask = masks[i] + start;
                    for (int j = 0; j < len; j++) {
                        const int keep = t[j] * sign[j] > 0;
                        const float kept = fabsf(t[j]) * (keep ? 1.0f : 0.0f);
                        mask[j] = (uint8_t)keep;
                        acc[j] = kept > acc[j] ? kept : acc[j];
                    }
                    if (sums) {
                        float *terms = l1_terms + (size_t)i * SUM_BUFFER + at;
                        for (int j = 0; j < len; j++) terms[j] = fabsf(t[j]);
                    }
                }
                if (sums) /* |tau_uni| M_t: acc where the mask holds, else +0 (acc is finite here) */
                    for (int i = 0; i < m; i++) {
                        const uint8_t *mask = masks[i] + start;
                        float *terms = masked_terms + (size_t)i * SUM_BUFFER + at;
                        for (int j = 0; j < len; j++) terms[j] = acc[j] * (mask[j] ? 1.0f : 0.0f);
                    }
                for (int j = 0; j < len; j++) vec[j] = acc[j] * sign[j];
            }
            if (tv_dtype == DTYPE_F32) {
                memcpy((float *)tv + start, vec, (size_t)len * sizeof(float));
            } else {
                uint16_t *h = (uint16_t *)tv + start;
                for (int j = 0; j < len; j++) h[j] = bf16_nearest_even(vec[j]);
            }
        }
        if (sums)
            for (int i = 0; i < m; i++) {
                const double l1 = pairwise_sum(l1_terms + (size_t)i * SUM_BUFFER, buffer_len);
                const double masked = pairwise_sum(masked_terms + (size_t)i * SUM_BUFFER, buffer_len);
                out[i] = buffer == 0 ? l1 : out[i] + l1;
                out[m + i] = buffer == 0 ? masked : out[m + i] + masked;
            }
    }
    if (sums && n == 0)
        for (int i = 0; i < 2 * m; i++) out[i] = 0.0;
    return 1;
}

/* side_chunk(kind, n, base, inputs, a, tv, tv_dtype, masks, work, sums) -> False | tuple: base (address, dtype),
 * inputs a tuple of 1 to 64 (address, dtype), tv the task vector's address (DTYPE_F32 or DTYPE_BF16), masks a tuple
 * of m addresses of n bytes, work the address of m BLOCK (+ 2 m SUM_BUFFER with sums) float32s. Releases the GIL. */
static PyObject *py_side_chunk(PyObject *self, PyObject *args) {
    int kind, base_dtype, tv_dtype, sums;
    Py_ssize_t n;
    unsigned long long base_addr, tv_addr, work_addr;
    PyObject *inputs_obj, *masks_obj;
    double a;
    if (!PyArg_ParseTuple(args, "in(Ki)O!dKiO!Kp", &kind, &n, &base_addr, &base_dtype, &PyTuple_Type, &inputs_obj,
                          &a, &tv_addr, &tv_dtype, &PyTuple_Type, &masks_obj, &work_addr, &sums))
        return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(inputs_obj);
    if (m < 1 || m > 64 || PyTuple_GET_SIZE(masks_obj) != m || n < 0 || (kind != SIDE_TALL && kind != SIDE_EMR) ||
        (tv_dtype != DTYPE_F32 && tv_dtype != DTYPE_BF16) || (sums && kind != SIDE_EMR)) {
        PyErr_SetString(PyExc_ValueError, "side_chunk: 1 to 64 inputs and as many masks, a known kind and dtype");
        return NULL;
    }
    Vec x[64];
    uint8_t *masks[64];
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long data;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(inputs_obj, i), "Ki", &data, &x[i].dtype)) return NULL;
        x[i].data = (const void *)(uintptr_t)data;
        unsigned long long mask = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(masks_obj, i));
        if (PyErr_Occurred()) return NULL;
        masks[i] = (uint8_t *)(uintptr_t)mask;
    }
    Vec base = {(const void *)(uintptr_t)base_addr, base_dtype};
    double out[128];
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = side_chunk(kind, n, &base, x, (int)m, (float)a, (void *)(uintptr_t)tv_addr, tv_dtype, masks, sums, out,
                        (float *)(uintptr_t)work_addr);
    Py_END_ALLOW_THREADS
    if (!finite) Py_RETURN_FALSE;
    PyObject *result = PyTuple_New(sums ? 2 * m : 0);
    if (!result) return NULL;
    for (Py_ssize_t i = 0; sums && i < 2 * m; i++) {
        PyObject *value = PyFloat_FromDouble(out[i]);
        if (!value) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, i, value);
    }
    return result;
}
/* ------------------------------------------ end of side_chunk ------------------------------------------------ */

/* row_ranks(values, rows, width, out): per row of a contiguous float32 matrix, each entry's 0-based position in the
 * row's stable ascending sort, as a float32 (DELLA's MagPrune ranks, sparsify.rank_keep_probability): the order of
 * torch.sort(stable=True), where -0 equals +0, NaNs are equal and last, and ties keep their index order. An LSD
 * radix sort of order-preserving 32-bit keys (rank_row: stable passes over the bits that vary in the row) instead of
 * a comparison sort: 10x torch's on a 5504 x 2048 weight. width < 2^24 (exact float32 ranks).
 * Releases the GIL. */
INLINE uint32_t order_key(float f) {
    union { float f; uint32_t u; } b = {.f = f};
    if (f != f) return 0xFFFFFFFFu;             /* every NaN, above +inf */
    if (f == 0.0f) b.u = 0;                      /* -0 as +0 */
    return (b.u & 0x80000000u) ? ~b.u : (b.u | 0x80000000u);
}

/* One stable LSD radix sort of `items` (n of them, `a` or `b` holding the result, which is returned) by the `bits`
 * bits of each item from bit `shift`: as few passes of up to RADIX_BITS bits as they need (buckets at most twice the
 * items), a pass skipped where every item has the same digit. */
#define RADIX_BITS 11
#define RADIX_SORT(NAME, T)                                                                                      \
    static T *NAME(T *a, T *b, Py_ssize_t n, int shift, int bits) {                                             \
        int digit = RADIX_BITS;                                                                                 \
        while (digit > 8 && ((Py_ssize_t)1 << digit) > 2 * n) digit--;                                          \
        const int passes = (bits + digit - 1) / digit;                                                          \
        digit = (bits + passes - 1) / passes;                                                                   \
        const T mask = ((T)1 << digit) - 1;                                                                     \
        uint32_t counts[4][1 << RADIX_BITS]; /* passes of at least 8 bits: 4 cover 32 */                       \
        for (int pass = 0; pass < passes; pass++) memset(counts[pass], 0, sizeof(uint32_t) << digit);           \
        for (Py_ssize_t j = 0; j < n; j++) {                                                                    \
            const T k = a[j] >> shift;                                                                          \
            for (int pass = 0; pass < passes; pass++) counts[pass][(k >> (pass * digit)) & mask]++;            \
        }                                                                                                       \
        T *src = a, *dst = b;                                                                                   \
        for (int pass = 0; pass < passes; pass++) {                                                             \
            uint32_t *c = counts[pass];                                                                         \
            const int at = shift + pass * digit;                                                                \
            if (c[(src[0] >> at) & mask] == (uint32_t)n) continue;                                              \
            uint32_t offset = 0;                                                                                \
            for (T d = 0; d <= mask; d++) {                                                                     \
                const uint32_t here = c[d];                                                                     \
                c[d] = offset;                                                                                  \
                offset += here;                                                                                 \
            }                                                                                                   \
            for (Py_ssize_t j = 0; j < n; j++) {                                                                \
                const T e = src[j];                                                                             \
                dst[c[(e >> at) & mask]++] = e;                                                                 \
            }                                                                                                   \
            T *t = src; src = dst; dst = t;                                                                     \
        }                                                                                                       \
        return src;                                                                                             \
    }
RADIX_SORT(radix_sort32, uint32_t)
RADIX_SORT(radix_sort64, uint64_t)

/* out[j] = values[rank of entry j] for one row of `width` floats, the rank its position in the row's stable ascending
 * order (work: 2 width uint64). Only the key bits that vary in the row order it (those above and below are the same in
 * every key); where they and the index fit in 32 bits (a bf16 checkpoint's task vector: differences of bf16 values
 * leave the low bits zero) the sort moves (key bits, index) as 32-bit items, else (key, index) as 64-bit ones. */
static void rank_row(const float *v, Py_ssize_t width, uint64_t *work, const float *values, float *out) {
    uint32_t any = 0, all = 0xFFFFFFFFu;
    uint32_t *keys = (uint32_t *)(work + width); /* the upper half, free until the 64-bit sort's second buffer */
    for (Py_ssize_t j = 0; j < width; j++) {
        const uint32_t k = order_key(v[j]);
        keys[j] = k;
        any |= k;
        all &= k;
    }
    const uint32_t varying = any ^ all;
    if (!varying) { /* every key equal: index order */
        memcpy(out, values, (size_t)width * sizeof(float));
        return;
    }
    const int low = __builtin_ctz(varying), bits = 32 - __builtin_clz(varying) - low;
    int index_bits = 0;
    while (((Py_ssize_t)1 << index_bits) < width) index_bits++;
    if (bits + index_bits <= 32) {
        uint32_t *a = (uint32_t *)work, *b = a + width;
        const uint32_t key_mask = bits == 32 ? 0xFFFFFFFFu : (1u << bits) - 1, index_mask = (1u << index_bits) - 1;
        for (Py_ssize_t j = 0; j < width; j++) a[j] = (((keys[j] >> low) & key_mask) << index_bits) | (uint32_t)j;
        const uint32_t *sorted = radix_sort32(a, b, width, index_bits, bits);
        for (Py_ssize_t r = 0; r < width; r++) out[sorted[r] & index_mask] = values[r];
    } else {
        uint64_t *a = work, *b = work + width; /* b overlaps keys: written after they are read */
        for (Py_ssize_t j = 0; j < width; j++) a[j] = ((uint64_t)keys[j] << 32) | (uint64_t)j;
        const uint64_t *sorted = radix_sort64(a, b, width, 32 + low, bits);
        for (Py_ssize_t r = 0; r < width; r++) out[(uint32_t)sorted[r]] = values[r];
    }
}

static void row_ranks(const float *values, Py_ssize_t rows, Py_ssize_t width, float *out, uint64_t *work,
                      float *positions) {
    for (Py_ssize_t p = 0; p < width; p++) positions[p] = (float)p;
    for (Py_ssize_t r = 0; r < rows; r++) rank_row(values + r * width, width, work, positions, out + r * width);
}

static PyObject *py_row_ranks(PyObject *self, PyObject *args) {
    unsigned long long values_addr, out_addr;
    Py_ssize_t rows, width;
    if (!PyArg_ParseTuple(args, "KnnK", &values_addr, &rows, &width, &out_addr)) return NULL;
    if (rows < 0 || width < 1 || width >= (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "row_ranks: rows >= 0 and 1 <= width < 2^24");
        return NULL;
    }
    uint64_t *work = (uint64_t *)malloc((size_t)width * 2 * sizeof(uint64_t));
    float *positions = (float *)malloc((size_t)width * sizeof(float));
    if (!work || !positions) {
        free(work);
        free(positions);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    row_ranks((const float *)(uintptr_t)values_addr, rows, width, (float *)(uintptr_t)out_addr, work, positions);
    Py_END_ALLOW_THREADS
    free(work);
    free(positions);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------------------------- DELLA
 * della_chunk: DELLA's MagPrune drop (Deep et al. 2024, section 3) over entries [start, stop) of a tensor of rows of
 * `width` entries (sparsify.magprune_masks, for TaskVectorMerge's `della` and `della_linear`). Per model and every row
 * the range touches (whole rows, wherever the range cuts them): the task vector's magnitudes |x - base|, their
 * stable ascending ranks in the row (rank_row: torch.sort(stable=True)'s order), the keep probabilities
 * p = (rank / (width - 1)) * span + low in float32 (span = 2 epsilon, low = density - epsilon: the operations of
 * sparsify.rank_keep_probability; a row of one entry: 0.5 span + low), and entry j kept when its Philox4x32-10
 * uniform is below p: u = (r >> 8) 2^-24, r word j % 4 of the block of counter (j / 4 low and high 32 bits, stream =
 * the model, 0) under the key (merging/methods/philox.py `uniforms`; the words dare_chunk draws), so the mask of an
 * entry depends on its row and index only, not on the range. Writes the range's packed mask (entry start + q at bit
 * q % 8 of byte q / 8) and, per SUM_BUFFER entries from start, numpy's pairwise sums of |tau| and of its kept entries
 * (masked_pairwise: a whole tensor's numpy sum is these added left to right when start is a multiple of SUM_BUFFER);
 * or instead (for `rescale: unbiased`) the range's keep probabilities. */
#define DELLA_COUNTERS 64 /* Philox counters per batch: 256 entries */

typedef struct {
    const void *x;           /* the model's whole stored tensor (flat) */
    int dtype;               /* DTYPE_* */
    uint32_t k0, k1, stream; /* the Philox key words and stream (the model's index) */
    float low, span;         /* density - epsilon, 2 epsilon as float32 */
    uint8_t *mask;           /* ceil(n / 8) bytes, or NULL */
    double *parts;           /* (total, kept) per SUM_BUFFER entries, or NULL */
    float *keep;             /* n floats, or NULL: the keep probabilities instead of a mask */
} Magprune;

/* Philox4x32-10's four words of counters first .. first + DELLA_COUNTERS - 1 (stream, 0 as the high words), in
 * entry order: out[4 g + w] is word w of counter first + g (the loop over counters vectorizes) */
VECTOR_CLONES static void philox_words(uint32_t k0, uint32_t k1, uint32_t stream, uint64_t first, uint32_t *out) {
    uint32_t x0[DELLA_COUNTERS], x1[DELLA_COUNTERS], x2[DELLA_COUNTERS], x3[DELLA_COUNTERS];
    for (int g = 0; g < DELLA_COUNTERS; g++) {
        const uint64_t c = first + (uint64_t)g;
        x0[g] = (uint32_t)c;
        x1[g] = (uint32_t)(c >> 32);
        x2[g] = stream;
        x3[g] = 0;
    }
    uint32_t a = k0, b = k1;
    for (int r = 0; r < 10; r++) {
        for (int g = 0; g < DELLA_COUNTERS; g++) {
            const uint64_t p0 = (uint64_t)PHILOX_M0 * x0[g], p1 = (uint64_t)PHILOX_M1 * x2[g];
            const uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1[g] ^ a, y2 = (uint32_t)(p0 >> 32) ^ x3[g] ^ b;
            x1[g] = (uint32_t)p1;
            x3[g] = (uint32_t)p0;
            x0[g] = y0;
            x2[g] = y2;
        }
        a += PHILOX_W0;
        b += PHILOX_W1;
    }
    for (int g = 0; g < DELLA_COUNTERS; g++) {
        out[4 * g] = x0[g];
        out[4 * g + 1] = x1[g];
        out[4 * g + 2] = x2[g];
        out[4 * g + 3] = x3[g];
    }
}

/* The mask bits of entries [a, b) of one row (its keep probabilities `p` from entry row_start), into `mask` (bit 0 of
 * byte 0 is entry `start`) */
VECTOR_CLONES static void magprune_draw(const Magprune *d, const float *p, Py_ssize_t row_start, Py_ssize_t a,
                                        Py_ssize_t b, Py_ssize_t start, uint8_t *mask) {
    uint32_t words[4 * DELLA_COUNTERS];
    uint8_t kept[4 * DELLA_COUNTERS];
    for (Py_ssize_t q = a & ~(Py_ssize_t)3; q < b; q += 4 * DELLA_COUNTERS) {
        philox_words(d->k0, d->k1, d->stream, (uint64_t)q / 4, words);
        const Py_ssize_t lo = q > a ? q : a, hi = q + 4 * DELLA_COUNTERS < b ? q + 4 * DELLA_COUNTERS : b;
        const float *pq = p + (lo - row_start);
        const uint32_t *wq = words + (lo - q);
        uint8_t *kq = kept + (lo - q);
        for (Py_ssize_t t = 0; t < hi - lo; t++) /* u exact: a 24-bit integer times a power of two */
            kq[t] = (float)(wq[t] >> 8) * 0x1p-24f < pq[t];
        Py_ssize_t j = lo;
        for (; j < hi && (j - start) % 8; j++) mask[(j - start) / 8] |= (uint8_t)(kept[j - q] << ((j - start) % 8));
        for (; j + 8 <= hi; j += 8) {
            const uint8_t *k = kept + (j - q);
            mask[(j - start) / 8] = (uint8_t)(k[0] | k[1] << 1 | k[2] << 2 | k[3] << 3 | k[4] << 4 | k[5] << 5 |
                                              k[6] << 6 | k[7] << 7);
        }
        for (; j < hi; j++) mask[(j - start) / 8] |= (uint8_t)(kept[j - q] << ((j - start) % 8));
    }
}

/* work: (3 + m) width floats, 2 width uint64 */
static void della_range(const Magprune *models, int m, const void *base, int base_dtype, Py_ssize_t width,
                        Py_ssize_t start, Py_ssize_t stop, float *work, uint64_t *order) {
    const Py_ssize_t n = stop - start;
    float *row = work, *base_row = work + width, *p = work + 2 * width, *by_rank = work + 3 * width;
    for (int i = 0; i < m; i++) {
        if (models[i].mask) memset(models[i].mask, 0, (size_t)((n + 7) / 8));
        float *values = by_rank + i * width; /* model i's keep probability at each rank */
        if (width == 1)
            values[0] = 0.5f * models[i].span + models[i].low;
        for (Py_ssize_t r = 0; width > 1 && r < width; r++)
            values[r] = ((float)r / (float)(width - 1)) * models[i].span + models[i].low;
    }
    for (Py_ssize_t row_start = start - start % width; row_start < stop; row_start += width) {
        const Py_ssize_t a = row_start > start ? row_start : start;
        const Py_ssize_t b = row_start + width < stop ? row_start + width : stop;
        load(base, base_dtype, row_start, (int)width, base_row);
        for (int i = 0; i < m; i++) {
            const Magprune *d = &models[i];
            load(d->x, d->dtype, row_start, (int)width, row);
            for (Py_ssize_t j = 0; j < width; j++) row[j] = fabsf(row[j] - base_row[j]);
            rank_row(row, width, order, by_rank + i * width, p);
            if (d->keep)
                memcpy(d->keep + (a - start), p + (a - row_start), (size_t)(b - a) * sizeof(float));
            else
                magprune_draw(d, p, row_start, a, b, start, d->mask);
        }
    }
    for (int i = 0; i < m; i++) {
        const Magprune *d = &models[i];
        if (!d->parts || d->keep) continue;
        for (Py_ssize_t s = 0; s < n; s += SUM_BUFFER) {
            const Py_ssize_t len = n - s < SUM_BUFFER ? n - s : SUM_BUFFER;
            const Sums sums = masked_pairwise(d->x, d->dtype, base, base_dtype, start + s, len, d->mask + s / 8);
            d->parts[2 * (s / SUM_BUFFER)] = sums.total;
            d->parts[2 * (s / SUM_BUFFER) + 1] = sums.kept;
        }
    }
}

/* della_chunk(base, base_dtype, width, start, stop, models): models a tuple of (x, x_dtype, k0, k1, stream, low,
 * span, mask, parts, keep) per model, x and base the whole flat tensors, mask / parts / keep addresses or 0 (see
 * della_range). 1 <= width < 2^24. Releases the GIL. */
static PyObject *py_della_chunk(PyObject *self, PyObject *args) {
    unsigned long long base;
    int base_dtype;
    Py_ssize_t width, start, stop;
    PyObject *models_obj;
    if (!PyArg_ParseTuple(args, "KinnnO!", &base, &base_dtype, &width, &start, &stop, &PyTuple_Type, &models_obj))
        return NULL;
    if (width < 1 || width >= (1 << 24) || start < 0 || stop < start) {
        PyErr_SetString(PyExc_ValueError, "della_chunk: 1 <= width < 2^24 and 0 <= start <= stop");
        return NULL;
    }
    const Py_ssize_t m = PyTuple_GET_SIZE(models_obj);
    Magprune *models = (Magprune *)calloc(m > 0 ? (size_t)m : 1, sizeof(Magprune));
    float *work = (float *)malloc((size_t)width * (size_t)(3 + m) * sizeof(float));
    uint64_t *order = (uint64_t *)malloc((size_t)width * 2 * sizeof(uint64_t));
    if (!models || !work || !order) {
        free(models);
        free(work);
        free(order);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long x, mask, parts, keep;
        Magprune *d = &models[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(models_obj, i), "KiIIIffKKK", &x, &d->dtype, &d->k0, &d->k1,
                              &d->stream, &d->low, &d->span, &mask, &parts, &keep) ||
            (!mask && !keep)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "della_chunk: a model needs a mask or keep");
            free(models);
            free(work);
            free(order);
            return NULL;
        }
        d->x = (const void *)(uintptr_t)x;
        d->mask = (uint8_t *)(uintptr_t)mask;
        d->parts = (double *)(uintptr_t)parts;
        d->keep = (float *)(uintptr_t)keep;
    }
    Py_BEGIN_ALLOW_THREADS
    della_range(models, (int)m, (const void *)(uintptr_t)base, base_dtype, width, start, stop, work, order);
    Py_END_ALLOW_THREADS
    free(models);
    free(work);
    free(order);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"tally_chunk", py_tally_chunk, METH_VARARGS, "The threshold scan of one chunk, every cut at once (see _fused.c)."},
    {"merge_chunk", py_merge_chunk, METH_VARARGS, "One chunk of a task-arithmetic merge (see _fused.c)."},
    {"weighted_sum_chunk", py_weighted_sum_chunk, METH_VARARGS, "One chunk of a linear merge (see _fused.c)."},
    {"point_chunk", py_point_chunk, METH_VARARGS, "One chunk of a point between checkpoints (see _fused.c)."},
    {"stats_chunks", py_stats_chunks, METH_VARARGS, "A tensor's merge statistics, chunk by chunk (see _fused.c)."},
    {"dare_chunk", py_dare_chunk, METH_VARARGS, "One chunk of DARE's masks and L1 sums (see _fused.c)."},
    {"elect_chunk", py_elect_chunk, METH_VARARGS, "One chunk of MagMax, consensus TA, EMR or RAM (see _fused.c)."},
    {"side_chunk", py_side_chunk, METH_VARARGS, "One chunk of TALL masks' and EMR's side outputs (see _fused.c)."},
    {"row_ranks", py_row_ranks, METH_VARARGS, "Stable ascending ranks per row of a float32 matrix (see _fused.c)."},
    {"della_chunk", py_della_chunk, METH_VARARGS, "DELLA's MagPrune masks and L1 sums of a range (see _fused.c)."},
    {"philox_version", py_philox_version, METH_NOARGS, "Which Philox kernel runs: avx512f, avx2 or plain."},
    {"philox_use", py_philox_use, METH_VARARGS, "Run this Philox kernel (tests); whether the processor has it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

static int add_pcb_methods(PyObject *module); /* the PCB section, at the end of the file */

PyMODINIT_FUNC PyInit__fused(void) {
    init_tables();
    PyObject *created = PyModule_Create(&module);
    if (created && add_pcb_methods(created) < 0) Py_CLEAR(created);
    return created;
}

/* =================================================================================================================
 * PCB: PCB-merging (Du et al. 2024, eq. 1-6; merging/methods/competition.py, class Pcb). One chunk of its passes:
 * pcb_tally (the sampled-bracket tallies of the magnitudes |tau| or of the scores beta, for the exact order
 * statistics), pcb_apply (the merge), and pcb_math (basin's float32 exp and tanh over an array, for the tests).
 * The float32 operations and their order are those of competition.py's torch code (`pcb_scores`, `pcb_merge`)
 * and of merging/methods/float_math.py, which the tests compare bit for bit.
 * ================================================================================================================= */

#define PCB_LOG2E 0x1.715476p+0f    /* float_math.LOG2E */
#define PCB_LN2_HI 0x1.62e4p-1f     /* float_math.LN2_HI: 15 significant bits, k LN2_HI exact for |k| < 2^8 */
#define PCB_LN2_LO 0x1.7f7d1cp-20f  /* float_math.LN2_LO */
#define PCB_ROUNDER 0x1.8p+23f      /* (t + ROUNDER) - ROUNDER: t rounded to an integer, ties to even */
#define PCB_EPS 1e-12f              /* the floor of the scores' sum (the authors' 1e-12), as torch rounds it */

INLINE float pcb_pow2(int k) { /* 2^k for k in [-126, 127] */
    union { uint32_t u; float f; } v = {.u = (uint32_t)(k + 127) << 23};
    return v.f;
}

/* x = k ln 2 + r (Cody and Waite), returns expm1(r) = r + r^2 Q(r) (float_math._reduce); |x| <= 104 */
INLINE float pcb_reduce(float x, int *k) {
    const float kf = (x * PCB_LOG2E + PCB_ROUNDER) - PCB_ROUNDER;
    const float r = (x - kf * PCB_LN2_HI) - kf * PCB_LN2_LO;
    float q = 0x1.a032bep-13f;
    q = q * r + 0x1.6d71f4p-10f;
    q = q * r + 0x1.11118ap-7f;
    q = q * r + 0x1.5554b2p-5f;
    q = q * r + 0x1.555554p-3f;
    q = q * r + 0x1p-1f;
    *k = (int)kf;
    return r + (r * r) * q;
}

/* float_math.exp32 */
INLINE float basin_expf(float x) {
    float xc = x > -104.0f ? x : -104.0f; /* NaN to -104: no NaN reaches the integer conversion */
    xc = xc < 89.0f ? xc : 89.0f;
    int k;
    const float p = pcb_reduce(xc, &k);
    const int k1 = k >> 1;
    const float y = ((p + 1.0f) * pcb_pow2(k1)) * pcb_pow2(k - k1);
    return x == x ? y : x;
}

/* basin_expf for x in [0, 88] (PCB's intra-balancing exponent n u^2, u in [0, 1], n <= 64): there neither clamp
 * acts, x is not NaN and (1 + expm1(r)) 2^k is normal, so one power of two gives the same bits as two (tested) */
INLINE float pcb_exp_small(float x) {
    int k;
    const float p = pcb_reduce(x, &k);
    return (p + 1.0f) * pcb_pow2(k);
}

/* float_math.tanh32 */
INLINE float basin_tanhf(float x) {
    float a = fabsf(x);
    a = a < 10.0f ? a : 10.0f;
    int k;
    const float p = pcb_reduce(a + a, &k);
    const float s = pcb_pow2(k);
    const float e = s * p + (s - 1.0f);
    const float t = e / (e + 2.0f);
    return x == x ? copysignf(t, x) : x;
}

/* AVX-512 (x86-64-v4), AVX2 or the baseline, chosen when the module loads; the same bits on each (IEEE float32
 * operations, no contraction). On the 2-core AMD EPYC reporting AVX-512 that clone takes 0.93 ns per entry and model
 * for a score tally and 0.81 for the merge, the AVX2 one 1.58 and 1.42 (measured, one thread). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PCB_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PCB_CLONES
#endif

PCB_CLONES static void pcb_math(int kind, const float *x, float *out, Py_ssize_t n) {
    if (kind == 0)
        for (Py_ssize_t j = 0; j < n; j++) out[j] = basin_expf(x[j]);
    else if (kind == 1)
        for (Py_ssize_t j = 0; j < n; j++) out[j] = basin_tanhf(x[j]);
    else
        for (Py_ssize_t j = 0; j < n; j++) out[j] = pcb_exp_small(x[j]);
}

/* pcb_math(kind, x, out, n): out[j] = exp(x[j]) (kind 0), tanh(x[j]) (kind 1) or pcb_exp_small(x[j]) (kind 2, for
 * x in [0, 88] only), float32 arrays by address */
static PyObject *py_pcb_math(PyObject *self, PyObject *args) {
    int kind;
    unsigned long long x, out;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iKKn", &kind, &x, &out, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pcb_math(kind, (const float *)(uintptr_t)x, (float *)(uintptr_t)out, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

enum { PCB_MAGNITUDES = 0, PCB_SCORES = 1 };

typedef struct {
    float low, high;     /* the clamp bounds of |tau| */
    float m_low, m_span; /* the clamped magnitudes' min and span (1 where constant) */
    float cut, s_span;   /* the scores' clamp from below (their min after it) and span */
} PcbRow;

typedef struct {
    uint32_t lo, hi, heavy; /* order keys (pcb_key): the bracket [lo, hi] and a heavily tied key inside it */
    int has_heavy;
    uint32_t *candidates;   /* room for n keys */
    long long below, heavy_count, kept;
} PcbBracket;

/* keys in [0, 2^32) that order like the floats, -0 just below +0 (competition.order_keys) */
INLINE uint32_t pcb_key(float f) {
    union { float f; uint32_t u; } b = {.f = f};
    return (b.u & 0x80000000u) ? ~b.u : (b.u | 0x80000000u);
}

/* One block's task vectors tau[i * BLOCK + j] = x_i - base (float32) and their sum over the models in model order
 * into `total`; returns the lowest model with a value that is not finite, or m. */
INLINE int pcb_load(Py_ssize_t start, int len, const Vec *base, const Vec *x, int m, float *tau, float *total) {
    float b[BLOCK];
    int bad = m;
    load(base->data, base->dtype, start, len, b);
    for (int i = 0; i < m; i++) {
        float *t = tau + (size_t)i * BLOCK;
        int finite = 1;
        load(x[i].data, x[i].dtype, start, len, t);
        for (int j = 0; j < len; j++) {
            t[j] = t[j] - b[j];
            finite &= fabsf(t[j]) <= FLT_MAX;
        }
        if (!finite && bad == m) bad = i;
    }
    memcpy(total, tau, (size_t)len * sizeof(float));
    for (int i = 1; i < m; i++)
        for (int j = 0; j < len; j++) total[j] = total[j] + tau[(size_t)i * BLOCK + j];
    return bad;
}

/* One model's scores (competition.pcb_scores): the magnitudes clamped to [low, high], intra-balancing
 * exp(n ((c - m_low) / m_span)^2), times inter-balancing tanh(tau * total) */
INLINE void pcb_scores(const PcbRow *row, float nf, const float *t, const float *total, int len, float *score,
                       float *clamped) {
    const float low = row->low, high = row->high, m_low = row->m_low, m_span = row->m_span;
    for (int j = 0; j < len; j++) {
        const float a = fabsf(t[j]);
        float c = a < high ? a : high;
        c = c > low ? c : low;
        const float u = (c - m_low) / m_span;
        score[j] = pcb_exp_small((u * u) * nf) * basin_tanhf(t[j] * total[j]);
        clamped[j] = c;
    }
}

/* pcb_tally's work for one block of one model: keys[0..len) against its brackets */
INLINE void pcb_bracket_block(PcbBracket *br, int count, const uint32_t *keys, int len) {
    uint8_t wanted[BLOCK];
    for (int w = 0; w < count; w++) {
        PcbBracket *c = &br[w];
        const uint32_t lo = c->lo, hi = c->hi, heavy = c->heavy;
        int below = 0, same = 0, inside_count = 0;
        if (c->has_heavy)
            for (int j = 0; j < len; j++) {
                const uint32_t k = keys[j];
                const int inside = (k >= lo) & (k <= hi) & (k != heavy);
                below += k < lo;
                same += k == heavy;
                wanted[j] = (uint8_t)inside;
                inside_count += inside;
            }
        else
            for (int j = 0; j < len; j++) {
                const uint32_t k = keys[j];
                const int inside = (k >= lo) & (k <= hi);
                below += k < lo;
                wanted[j] = (uint8_t)inside;
                inside_count += inside;
            }
        c->below += below;
        c->heavy_count += same;
        if (inside_count) /* as tally_chunk */
            c->kept = append_wanted(c->candidates, c->kept, keys, wanted, len);
    }
}

/* One chunk of a tally pass: per model i, the order keys of its magnitudes |tau_i| (PCB_MAGNITUDES) or of its
 * scores (PCB_SCORES), tallied against brackets[i * per_row .. (i + 1) * per_row) (count below lo, count equal
 * heavy, copy the keys in [lo, hi] other than heavy), and the largest key into max_key[i]. Returns the lowest
 * model whose task vector has a value that is not finite, or m. work: (m + 1) BLOCK floats. */
PCB_CLONES static int pcb_tally(int kind, Py_ssize_t n, const Vec *base, const Vec *x, int m, const PcbRow *rows,
                                   float nf, PcbBracket *brackets, int per_row, uint32_t *max_key, float *work) {
    float *tau = work, *total = work + (size_t)m * BLOCK;
    float value[BLOCK], clamped[BLOCK];
    uint32_t keys[BLOCK];
    int bad = m;
    for (int i = 0; i < m; i++) max_key[i] = 0;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        const int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        const int block_bad = pcb_load(start, len, base, x, m, tau, total);
        if (block_bad < bad) bad = block_bad;
        for (int i = 0; i < m; i++) {
            const float *t = tau + (size_t)i * BLOCK;
            if (kind == PCB_SCORES)
                pcb_scores(&rows[i], nf, t, total, len, value, clamped);
            else
                for (int j = 0; j < len; j++) value[j] = fabsf(t[j]);
            uint32_t top = max_key[i];
            for (int j = 0; j < len; j++) {
                keys[j] = pcb_key(value[j]);
                top = keys[j] > top ? keys[j] : top;
            }
            max_key[i] = top;
            pcb_bracket_block(brackets + (size_t)i * per_row, per_row, keys, len);
        }
    }
    return bad;
}

/* One chunk of the merge (competition.pcb_merge): out = base + lambda * sum_i sgn(tau_i) c_i s_i / max(sum_i s_i,
 * 1e-12), c_i the clamped magnitudes, s_i = (max(score_i, cut_i) - cut_i) / s_span_i, both sums in model order.
 * work: (m + 1) BLOCK floats. */
PCB_CLONES static void pcb_apply(float *out, Py_ssize_t n, const Vec *base, const Vec *x, int m,
                                    const PcbRow *rows, float nf, float lambda, float *work) {
    float *tau = work, *total = work + (size_t)m * BLOCK;
    float score[BLOCK], clamped[BLOCK], num[BLOCK], den[BLOCK], b[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        const int len = (int)(n - start < BLOCK ? n - start : BLOCK);
        pcb_load(start, len, base, x, m, tau, total);
        for (int i = 0; i < m; i++) {
            const float *t = tau + (size_t)i * BLOCK;
            const float cut = rows[i].cut, s_span = rows[i].s_span;
            pcb_scores(&rows[i], nf, t, total, len, score, clamped);
            for (int j = 0; j < len; j++) {
                const float s = score[j] > cut ? score[j] : cut;
                const float scale = (s - cut) / s_span;
                const float sign = (float)(t[j] > 0.0f) - (float)(t[j] < 0.0f);
                const float part = (sign * clamped[j]) * scale;
                num[j] = i == 0 ? part : num[j] + part;
                den[j] = i == 0 ? scale : den[j] + scale;
            }
        }
        load(base->data, base->dtype, start, len, b);
        float *o = out + start;
        for (int j = 0; j < len; j++) {
            const float d = den[j] < PCB_EPS ? PCB_EPS : den[j];
            o[j] = b[j] + lambda * (num[j] / d);
        }
    }
}

static int pcb_vecs(PyObject *tuple, Vec *x, Py_ssize_t m) {
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long data;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(tuple, i), "Ki", &data, &x[i].dtype)) return 0;
        x[i].data = (const void *)(uintptr_t)data;
    }
    return 1;
}

static int pcb_rows(PyObject *tuple, PcbRow *rows, Py_ssize_t m) {
    if (PyTuple_GET_SIZE(tuple) != m) {
        PyErr_SetString(PyExc_ValueError, "pcb: one row of parameters per model");
        return 0;
    }
    for (Py_ssize_t i = 0; i < m; i++)
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(tuple, i), "ffffff", &rows[i].low, &rows[i].high, &rows[i].m_low,
                              &rows[i].m_span, &rows[i].cut, &rows[i].s_span))
            return 0;
    return 1;
}

/* pcb_tally(kind, n, base, inputs, rows, nf, brackets) -> (((below, heavy_count, kept), ...) per bracket,
 * (max_key, ...) per model, the lowest model with a non-finite task-vector value or -1): base (address, dtype);
 * inputs a tuple of 1 to 64 (address, dtype); rows one (low, high, m_low, m_span, cut, s_span) per model (read
 * for PCB_SCORES); brackets per_row * m (lo, hi, heavy, has_heavy, candidates), model-major, candidates the
 * address of a buffer of n uint32. Releases the GIL. */
static PyObject *py_pcb_tally(PyObject *self, PyObject *args) {
    int kind, base_dtype;
    Py_ssize_t n;
    unsigned long long base_addr;
    PyObject *inputs_obj, *rows_obj, *brackets_obj;
    float nf;
    if (!PyArg_ParseTuple(args, "in(Ki)O!O!fO!", &kind, &n, &base_addr, &base_dtype, &PyTuple_Type, &inputs_obj,
                          &PyTuple_Type, &rows_obj, &nf, &PyTuple_Type, &brackets_obj))
        return NULL;
    const Py_ssize_t m = PyTuple_GET_SIZE(inputs_obj), count = PyTuple_GET_SIZE(brackets_obj);
    if (m < 1 || m > 64 || count % m || (kind != PCB_MAGNITUDES && kind != PCB_SCORES)) {
        PyErr_SetString(PyExc_ValueError, "pcb_tally: 1 to 64 inputs, brackets per model, a known kind");
        return NULL;
    }
    Vec x[64];
    PcbRow rows[64];
    uint32_t max_key[64];
    if (!pcb_vecs(inputs_obj, x, m) || !pcb_rows(rows_obj, rows, m)) return NULL;
    PcbBracket *brackets = (PcbBracket *)calloc(count > 0 ? (size_t)count : 1, sizeof(PcbBracket));
    if (!brackets) return PyErr_NoMemory();
    for (Py_ssize_t c = 0; c < count; c++) {
        unsigned long long candidates;
        PcbBracket *br = &brackets[c];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(brackets_obj, c), "IIIiK", &br->lo, &br->hi, &br->heavy,
                              &br->has_heavy, &candidates)) {
            free(brackets);
            return NULL;
        }
        br->candidates = (uint32_t *)(uintptr_t)candidates;
    }
    float *work = (float *)malloc((size_t)(m + 1) * BLOCK * sizeof(float));
    if (!work) {
        free(brackets);
        return PyErr_NoMemory();
    }
    Vec base = {(const void *)(uintptr_t)base_addr, base_dtype};
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = pcb_tally(kind, n, &base, x, (int)m, rows, nf, brackets, (int)(count / m), max_key, work);
    Py_END_ALLOW_THREADS
    free(work);
    PyObject *tallies = PyTuple_New(count), *tops = PyTuple_New(m), *result = NULL;
    for (Py_ssize_t c = 0; tallies && tops && c < count; c++) {
        PyObject *item = Py_BuildValue("LLL", brackets[c].below, brackets[c].heavy_count, brackets[c].kept);
        if (!item) goto done;
        PyTuple_SET_ITEM(tallies, c, item);
    }
    for (Py_ssize_t i = 0; tallies && tops && i < m; i++) {
        PyObject *item = PyLong_FromUnsignedLong(max_key[i]);
        if (!item) goto done;
        PyTuple_SET_ITEM(tops, i, item);
    }
    if (tallies && tops) result = Py_BuildValue("OOi", tallies, tops, bad < m ? bad : -1);
done:
    Py_XDECREF(tallies);
    Py_XDECREF(tops);
    free(brackets);
    return result;
}

/* pcb_apply(out, n, base, inputs, rows, nf, lambda): out a float32 buffer of n entries; the rest as pcb_tally.
 * Releases the GIL. */
static PyObject *py_pcb_apply(PyObject *self, PyObject *args) {
    unsigned long long out_addr, base_addr;
    Py_ssize_t n;
    int base_dtype;
    PyObject *inputs_obj, *rows_obj;
    float nf, lambda;
    if (!PyArg_ParseTuple(args, "Kn(Ki)O!O!ff", &out_addr, &n, &base_addr, &base_dtype, &PyTuple_Type, &inputs_obj,
                          &PyTuple_Type, &rows_obj, &nf, &lambda))
        return NULL;
    const Py_ssize_t m = PyTuple_GET_SIZE(inputs_obj);
    if (m < 1 || m > 64) {
        PyErr_SetString(PyExc_ValueError, "pcb_apply: 1 to 64 inputs");
        return NULL;
    }
    Vec x[64];
    PcbRow rows[64];
    if (!pcb_vecs(inputs_obj, x, m) || !pcb_rows(rows_obj, rows, m)) return NULL;
    float *work = (float *)malloc((size_t)(m + 1) * BLOCK * sizeof(float));
    if (!work) return PyErr_NoMemory();
    Vec base = {(const void *)(uintptr_t)base_addr, base_dtype};
    Py_BEGIN_ALLOW_THREADS
    pcb_apply((float *)(uintptr_t)out_addr, n, &base, x, (int)m, rows, nf, lambda, work);
    Py_END_ALLOW_THREADS
    free(work);
    Py_RETURN_NONE;
}

static PyMethodDef pcb_methods[] = {
    {"pcb_tally", py_pcb_tally, METH_VARARGS, "One chunk of PCB's bracket tallies (see _fused.c)."},
    {"pcb_apply", py_pcb_apply, METH_VARARGS, "One chunk of a PCB merge (see _fused.c)."},
    {"pcb_math", py_pcb_math, METH_VARARGS, "basin's float32 exp (kind 0), tanh (1) or PCB's exp (2) of an array."},
    {NULL, NULL, 0, NULL},
};

static int add_pcb_methods(PyObject *module) { return PyModule_AddFunctions(module, pcb_methods); }
