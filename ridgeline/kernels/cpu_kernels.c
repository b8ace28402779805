/* Fused CPU kernels for the decode hot path (see ridgeline/kernels/__init__.py for why).

   Each kernel does in one pass what the PyTorch path does in several ATen ops, and rounds
   where those ops round (every bfloat16 intermediate the PyTorch path stores is rounded here
   too), so the two paths agree to a bfloat16 ulp and exactly in structure. Tensors are
   float32 (bf = 0) or bfloat16 (bf = 1) and contiguous unless a row stride is given; every
   exported function is single-threaded (the loader calls decode attention through a handle
   that releases the GIL when it splits a step's rows over Python threads). Compiled at first use
   with -O3 in the CPU's variant (kernels/__init__.py: AVX-512, AVX2 or portable), -fopenmp: the
   `omp simd` pragmas let the compiler vectorise float reductions without -ffast-math. */

#include <stdlib.h>

#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* exp(x) for x <= ~88 (Cephes' expf: range reduction by ln 2, degree-6 polynomial, ~1 ulp);
   written out so that loops over it vectorise. Returns 0 below -87. */
INLINE float exp_approx(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.0f ? 0.0f : p * scale;
}

/* ------------------------------------------------------------------ RMSNorm (+ residual add)

   If delta is not NULL: h += delta (in place, rounded to the dtype) first. Then
   out = round(h * rsqrt(mean(h^2) + eps) * w), as F.rms_norm does (one rounding). */
INLINE void add_rms_norm(void *h, const void *delta, const void *w, void *out, int64_t rows, int64_t n,
                         float eps, int bf) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t o = r * n;
        float ss = 0.0f;
        if (delta) {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < n; i++) {
                float v = round_to(load(h, o + i, bf) + load(delta, o + i, bf), bf);
                store(h, o + i, v, bf);
                ss += v * v;
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < n; i++) {
                float v = load(h, o + i, bf);
                ss += v * v;
            }
        }
        float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++)
            store(out, o + i, load(h, o + i, bf) * inv * load(w, i, bf), bf);
    }
}

void rl_add_rms_norm_f32(void *h, const void *delta, const void *w, void *out, int64_t rows, int64_t n, float eps) {
    add_rms_norm(h, delta, w, out, rows, n, eps, 0);
}
void rl_add_rms_norm_bf16(void *h, const void *delta, const void *w, void *out, int64_t rows, int64_t n, float eps) {
    add_rms_norm(h, delta, w, out, rows, n, eps, 1);
}

/* ------------------------------------------------------------------ SiLU(gate) * up

   gate_up: [rows, 2 * inter] (gate first), out: [rows, inter] = round(round(silu(gate)) * up). */
INLINE void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t inter, int bf) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t gi = r * 2 * inter, oi = r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) {
            float g = load(gate_up, gi + i, bf);
            float s = round_to(g / (1.0f + exp_approx(-g)), bf);
            store(out, oi + i, s * load(gate_up, gi + inter + i, bf), bf);
        }
    }
}

void rl_silu_mul_f32(const void *gate_up, void *out, int64_t rows, int64_t inter) { silu_mul(gate_up, out, rows, inter, 0); }
void rl_silu_mul_bf16(const void *gate_up, void *out, int64_t rows, int64_t inter) { silu_mul(gate_up, out, rows, inter, 1); }

/* ------------------------------------------------------------------ rotary + KV-cache write

   qk: rows of (hq + hkv) heads of d values, row stride qk_stride; v: rows of hkv heads, row
   stride v_stride. cos/sin: [positions, d] tables with sin's first half negated (rotate-half
   as x * cos + roll(x, d/2) * sin). Writes roped q to q_out [rows, hq, d] and roped k and v
   to the caches' [slot, hkv, d] rows. */
INLINE void rope_store(const void *qk, int64_t qk_stride, const void *v, int64_t v_stride, int64_t rows,
                       int64_t hq, int64_t hkv, int64_t d, const int64_t *positions, const void *cos_t,
                       const void *sin_t, void *q_out, void *k_cache, void *v_cache, const int64_t *slots, int bf) {
    int64_t half = d / 2;
    for (int64_t r = 0; r < rows; r++) {
        int64_t c0 = positions[r] * d;
        for (int64_t h = 0; h < hq + hkv; h++) {
            int64_t src = r * qk_stride + h * d;
            void *dst = h < hq ? q_out : k_cache;
            int64_t o = h < hq ? (r * hq + h) * d : (slots[r] * hkv + (h - hq)) * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) {
                int64_t j = i < half ? i + half : i - half;
                float a = round_to(load(qk, src + i, bf) * load(cos_t, c0 + i, bf), bf);
                float b = round_to(load(qk, src + j, bf) * load(sin_t, c0 + i, bf), bf);
                store(dst, o + i, a + b, bf);
            }
        }
        size_t row_bytes = (size_t)(hkv * d) * (bf ? 2 : 4);
        memcpy((char *)v_cache + (size_t)slots[r] * row_bytes, (const char *)v + (size_t)(r * v_stride) * (bf ? 2 : 4),
               row_bytes);
    }
}

void rl_rope_store_f32(const void *qk, int64_t qk_stride, const void *v, int64_t v_stride, int64_t rows, int64_t hq,
                       int64_t hkv, int64_t d, const int64_t *positions, const void *cos_t, const void *sin_t,
                       void *q_out, void *k_cache, void *v_cache, const int64_t *slots) {
    rope_store(qk, qk_stride, v, v_stride, rows, hq, hkv, d, positions, cos_t, sin_t, q_out, k_cache, v_cache, slots, 0);
}
void rl_rope_store_bf16(const void *qk, int64_t qk_stride, const void *v, int64_t v_stride, int64_t rows, int64_t hq,
                        int64_t hkv, int64_t d, const int64_t *positions, const void *cos_t, const void *sin_t,
                        void *q_out, void *k_cache, void *v_cache, const int64_t *slots) {
    rope_store(qk, qk_stride, v, v_stride, rows, hq, hkv, d, positions, cos_t, sin_t, q_out, k_cache, v_cache, slots, 1);
}

/* ------------------------------------------------------------------ paged decode attention

   One query per sequence: q [b, hkv * grp, d]; keys of row i are the cache slots slots[i, :lk]
   with additive bias[i, :lk] (0 or -inf; -inf keys are skipped). Reads each key and value row
   straight from the paged cache, once for the grp query heads that share it, with float32
   scores, softmax and accumulation. out: [b, hq, d] in the inputs' dtype, or in float32 when
   lse (float32 [b, hq]) is given: Hydragen merges the parts in float32 by their log-sum-exps. */
#define MAX_HEADS 256 /* query heads */

/* q . k over d values: with AVX-512, bf16 pair dot products (AVX512-BF16) or float32 FMAs into
   one vector, reduced once; otherwise 16 float partial sums, which the compiler vectorises
   without reassociating a scalar reduction. */
INLINE float dot_qk(const float *qf, const uint16_t *qb, const void *k, int64_t kb, int64_t d, int bf) {
#if defined(__AVX512BF16__)
    if (bf && d % 32 == 0) {
        __m512 acc = _mm512_setzero_ps();
        const uint16_t *kp = (const uint16_t *)k + kb;
        for (int64_t e = 0; e < d; e += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + e), (__m512bh)_mm512_loadu_si512(kp + e));
        return _mm512_reduce_add_ps(acc);
    }
#endif
#if defined(__AVX512F__)
    if (!bf && d % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        const float *kp = (const float *)k + kb;
        for (int64_t e = 0; e < d; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + e), _mm512_loadu_ps(kp + e), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    (void)qb;
    if (d % 16 == 0) {
        float part[16] = {0};
        for (int64_t e = 0; e < d; e += 16)
            for (int l = 0; l < 16; l++) part[l] += qf[e + l] * load(k, kb + e + l, bf);
        float s = 0.0f;
        for (int l = 0; l < 16; l++) s += part[l];
        return s;
    }
    float s = 0.0f;
    for (int64_t e = 0; e < d; e++) s += qf[e] * load(k, kb + e, bf);
    return s;
}

/* Hint the cache rows of a slot PREFETCH_AHEAD keys ahead: decode attention walks each layer's
   K/V once, from memory (30 layers' K/V do not stay in cache), and the prefetchers do not
   follow block-table jumps. */
#define PREFETCH_AHEAD 8

INLINE void prefetch_row(const void *base, int64_t slot, int64_t row_bytes) {
    const char *p = (const char *)base + slot * row_bytes;
    for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
}

INLINE void decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *slots,
                             const void *bias, int64_t b, int64_t hkv, int64_t grp, int64_t d, int64_t lk,
                             float scale, void *out, float *lse, int bf) {
    int64_t hq = hkv * grp, row = hkv * d, row_bytes = row * (bf ? 2 : 4);
    float *scores = (float *)malloc(sizeof(float) * (size_t)(hq * lk));
    float *qf = (float *)malloc(sizeof(float) * (size_t)(2 * hq * d)), *acc = qf + hq * d;
    uint16_t *qb = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(hq * d));
    float m[MAX_HEADS], l[MAX_HEADS];
    for (int64_t i = 0; i < b; i++) {
        const int64_t *row_slots = slots + i * lk;
        for (int64_t e = 0; e < hq * d; e++) {
            qf[e] = load(q, i * hq * d + e, bf);
            qb[e] = bf ? ((const uint16_t *)q)[i * hq * d + e] : 0;
            acc[e] = 0.0f;
        }
        for (int64_t h = 0; h < hq; h++) m[h] = -INFINITY;
        /* scores: keys in order, every head of a key's cache row at once (one contiguous read) */
        for (int64_t j = 0; j < lk; j++) {
            if (j + PREFETCH_AHEAD < lk) prefetch_row(k_cache, row_slots[j + PREFETCH_AHEAD], row_bytes);
            float bj = load(bias, i * lk + j, bf);
            for (int64_t h = 0; h < hq; h++) {
                float s = -INFINITY;
                if (bj != -INFINITY)
                    s = dot_qk(qf + h * d, qb + h * d, k_cache, row_slots[j] * row + (h / grp) * d, d, bf) * scale + bj;
                scores[h * lk + j] = s;
                if (s > m[h]) m[h] = s;
            }
        }
        for (int64_t h = 0; h < hq; h++) {
            float sum = 0.0f, mh = m[h];
            float *sh = scores + h * lk;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < lk; j++) {
                float p = sh[j] == -INFINITY ? 0.0f : exp_approx(sh[j] - mh);
                sh[j] = p;
                sum += p;
            }
            l[h] = sum;
        }
        for (int64_t j = 0; j < lk; j++) {
            if (j + PREFETCH_AHEAD < lk) prefetch_row(v_cache, row_slots[j + PREFETCH_AHEAD], row_bytes);
            if (load(bias, i * lk + j, bf) == -INFINITY) continue;
            int64_t vb = row_slots[j] * row;
            for (int64_t h = 0; h < hq; h++) {
                float p = scores[h * lk + j];
                float *ah = acc + h * d;
                int64_t vh = vb + (h / grp) * d;
#pragma omp simd
                for (int64_t e = 0; e < d; e++) ah[e] += p * load(v_cache, vh + e, bf);
            }
        }
        for (int64_t h = 0; h < hq; h++) {
            float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f; /* every key masked: zeros, lse -inf */
            for (int64_t e = 0; e < d; e++) store(out, (i * hq + h) * d + e, acc[h * d + e] * inv, bf && !lse);
            if (lse) lse[i * hq + h] = l[h] > 0.0f ? m[h] + logf(l[h]) : -INFINITY;
        }
    }
    free(scores);
    free(qf);
    free(qb);
}

int64_t rl_decode_attention_max_heads(void) { return MAX_HEADS; }


void rl_decode_attention_f32(const void *q, const void *k_cache, const void *v_cache, const int64_t *slots,
                             const void *bias, int64_t b, int64_t hkv, int64_t grp, int64_t d, int64_t lk, float scale,
                             void *out, float *lse) {
    decode_attention(q, k_cache, v_cache, slots, bias, b, hkv, grp, d, lk, scale, out, lse, 0);
}
void rl_decode_attention_bf16(const void *q, const void *k_cache, const void *v_cache, const int64_t *slots,
                              const void *bias, int64_t b, int64_t hkv, int64_t grp, int64_t d, int64_t lk,
                              float scale, void *out, float *lse) {
    decode_attention(q, k_cache, v_cache, slots, bias, b, hkv, grp, d, lk, scale, out, lse, 1);
}
