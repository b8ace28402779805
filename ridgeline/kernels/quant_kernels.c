/* Matrix multiplication with GGUF block-quantized weights, kept in the file's own block layout.

   y[m, n] = sum_k x[m, k] * W[n, k] for W in Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K.
   Every format is read as sub-blocks of 32 weights along k, each w = d_half * q + mn with q a
   small integer (K-quant super-blocks of 256 are 8 such sub-blocks; Q6_K has one scale per 16
   weights, so a sub-block has two). The activations are quantized to bytes, scaled by
   d = max|x| / 127 over each 32 values for the formats with blocks of 32 (as llama.cpp's Q8_0)
   and over each 256 for the K-quants (its Q8_K): a = round(x / d). With act_bytes = 2 a second
   byte holds the rounding left over, b = round((x / d - a) * 254), so x ~= d * (a + b / 254),
   about 15 bits. Each sub-block's dot product is one (two) integer dot products of 32 byte pairs:

       sum_i w_i x_i ~= d_w * d_x * (sum_i q_i a_i [+ sum_i q_i b_i / 254]) + mn * d_x * sum_i (a_i [+ b_i / 254])

   and within a K-quant super-block the 8 sub-blocks' integer products, times their integer
   scales, add up in int32 before the float multiply-adds (the offsets come from per-16
   activation sums). One byte (the default: llama.cpp's numerics) moves the default model's
   logprobs by 0.06 on average and parts 7 of 8 greedy test paths from float32 at near ties; with
   the second byte they match, at twice the integer work. The error against the float weights is
   the activation rounding alone: at most sum over activation blocks of
   (max|x| / 254^bytes) * sum |w_i| (tests/test_quant_kernels.py checks it).

   Work is split into tiles: up to MR activation rows share each unpacked weight sub-block, and
   a chunk of NC weight rows (a few KB) stays in cache while every activation tile passes over
   it, so a wide step (prefill) reads the weights from memory once and never makes a dense copy.
   Decode (m <= MR) is one tile: each weight byte is read once per step. Weight rows are split
   over OpenMP threads (the runtime torch itself uses). Built three times by the loader:
   scalar (portable C), AVX2 + FMA + F16C (_mm256_maddubs_epi16) and AVX-512 (the AVX2 code with
   VNNI's _mm256_dpbusd_epi32 / _mm256_dpwssd_epi32 where the CPU has them); RIDGELINE_CPU_ISA
   picks one. */

#include <stdlib.h>

#include "common.h"

enum { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, NUM_FORMATS };

/* bytes per block and weights per block of each format */
static const int64_t BLOCK_BYTES[NUM_FORMATS] = {18, 20, 22, 24, 34, 144, 176, 210};
static const int64_t BLOCK_WEIGHTS[NUM_FORMATS] = {32, 32, 32, 32, 32, 256, 256, 256};

/* Quantized activations, one row after another, in one of two layouts.
   Per 32 values (for the formats with blocks of 32): the nsb sub-blocks' first bytes a
   (nsb * 32), their second bytes b (nsb * 32), then their scales d and sums
   s = d * sum(a + b / 254) (one byte: d * sum(a)) as two float arrays padded to a multiple of 8 (groups of 8
   sub-blocks load them as vectors). The AVX2 builds store each pair of sub-blocks (2i, 2i + 1)
   interleaved by halves, [first 16 of 2i | first 16 of 2i + 1 | last 16 of 2i | last 16 of
   2i + 1], the order in which two weight blocks land in the two 128-bit lanes of one register.
   Per 256 values (for the K-quants): a and b in order (k bytes each), one float scale per 256,
   then the int16 sums of every 16 a, and of every 16 b: a K-quant super-block's 8 sub-block dot
   products add up in integers and its offsets come from the sums. */
typedef struct {
    const uint8_t *base;
    int64_t stride, bofs, dofs, sofs, s2ofs; /* bytes per row; offsets of b, the scales, the sums */
} q8rows;

INLINE int64_t q8_pad(int64_t nsb) { return (nsb + 7) / 8 * 8; }
INLINE int64_t q8_stride(int64_t nsb) { return nsb * 64 + 8 * q8_pad(nsb); }
INLINE int64_t q8k_stride(int64_t nsb) { return nsb * 64 + (nsb / 8) * (4 + 64); }
INLINE q8rows q8_layout(const uint8_t *base, int64_t nsb, int kq) {
    int64_t dofs = nsb * 64, sofs = dofs + 4 * (kq ? nsb / 8 : q8_pad(nsb));
    q8rows x = {base, kq ? q8k_stride(nsb) : q8_stride(nsb), nsb * 32, dofs, sofs, sofs + 32 * (nsb / 8)};
    return x;
}
/* row r's first / second bytes of sub-block j, scale of block j (of 32 or of 256 values), sum of
   block j (blocks of 32) */
INLINE const int8_t *XQ(const q8rows *x, int64_t r, int64_t j) {
    return (const int8_t *)(x->base + r * x->stride + j * 32);
}
INLINE const int8_t *XQ2(const q8rows *x, int64_t r, int64_t j) { return XQ(x, r, j) + x->bofs; }
INLINE const float *XD(const q8rows *x, int64_t r, int64_t j) {
    return (const float *)(x->base + r * x->stride + x->dofs) + j;
}
INLINE const float *XS(const q8rows *x, int64_t r, int64_t j) {
    return (const float *)(x->base + r * x->stride + x->sofs) + j;
}
/* K layout: the 16 sums of the first (XKS) or second (XKS2) bytes of super-block sb */
INLINE const int16_t *XKS(const q8rows *x, int64_t r, int64_t sb) {
    return (const int16_t *)(x->base + r * x->stride + x->sofs) + 16 * sb;
}
INLINE const int16_t *XKS2(const q8rows *x, int64_t r, int64_t sb) {
    return (const int16_t *)(x->base + r * x->stride + x->s2ofs) + 16 * sb;
}
#define INV254 (1.0f / 254.0f)

#define MR 8  /* activation rows per tile (8 float accumulators + temporaries fit 16 ymm registers) */
#define NC 16 /* weight rows per chunk in wide steps */

INLINE uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

INLINE float f16at(const uint8_t *p) { return fp16_to_f32(rd16(p)); }

/* K-quant 6-bit scale and min of sub-block j from the 12 packed bytes (llama.cpp's layout). */
INLINE void scale_min_k4(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ------------------------------------------------------------------ reference decode (scalar)

   Sub-block j of a row: q[32] small integers, d0 / d1 the scales of its two halves, mn the
   offset: w_i = (i < 16 ? d0 : d1) * q_i + mn. Used for dequantization (embedding rows,
   reference tests) and by the scalar matmul. */
static void unpack_sub(int fmt, const uint8_t *row, int64_t j, int8_t *q, float *d0, float *d1, float *mn) {
    *mn = 0.0f;
    if (fmt <= Q8_0) {
        const uint8_t *b = row + j * BLOCK_BYTES[fmt];
        float d = f16at(b);
        *d0 = *d1 = d;
        if (fmt == Q8_0) {
            memcpy(q, b + 2, 32);
            return;
        }
        int has_min = fmt == Q4_1 || fmt == Q5_1;
        if (has_min) *mn = f16at(b + 2);
        const uint8_t *qs = b + (has_min ? 4 : 2);
        uint32_t qh = 0;
        if (fmt == Q5_0 || fmt == Q5_1) {
            memcpy(&qh, qs, 4);
            qs += 4;
        }
        int off = fmt == Q4_0 ? 8 : fmt == Q5_0 ? 16 : 0;
        for (int i = 0; i < 16; i++) {
            int lo = qs[i] & 0xF, hi = qs[i] >> 4;
            if (fmt == Q5_0 || fmt == Q5_1) {
                lo |= ((qh >> i) & 1) << 4;
                hi |= ((qh >> (i + 16)) & 1) << 4;
            }
            q[i] = (int8_t)(lo - off);
            q[i + 16] = (int8_t)(hi - off);
        }
        return;
    }
    const uint8_t *b = row + (j / 8) * BLOCK_BYTES[fmt];
    int s = (int)(j % 8);
    if (fmt == Q4_K || fmt == Q5_K) {
        float d = f16at(b), dmin = f16at(b + 2);
        int sc, m;
        scale_min_k4(s, b + 4, &sc, &m);
        *d0 = *d1 = d * (float)sc;
        *mn = -dmin * (float)m;
        const uint8_t *qs = b + (fmt == Q4_K ? 16 : 48) + 32 * (s / 2), *qh = b + 16;
        for (int l = 0; l < 32; l++) {
            int v = s & 1 ? qs[l] >> 4 : qs[l] & 0xF;
            if (fmt == Q5_K) v |= ((qh[l] >> s) & 1) << 4;
            q[l] = (int8_t)v;
        }
        return;
    }
    /* Q6_K: ql[128], qh[64], scales[16] (int8), d */
    int half = s / 4, p = s % 4;
    const uint8_t *ql = b + 64 * half + 32 * (p & 1), *qh = b + 128 + 32 * half;
    const int8_t *sc = (const int8_t *)(b + 192) + 8 * half + 2 * p;
    float d = f16at(b + 208);
    *d0 = d * (float)sc[0];
    *d1 = d * (float)sc[1];
    for (int l = 0; l < 32; l++) {
        int v = (p >= 2 ? ql[l] >> 4 : ql[l] & 0xF) | (((qh[l] >> (2 * p)) & 3) << 4);
        q[l] = (int8_t)(v - 32);
    }
}

/* rows[i] = W[ids[i], :] as float32 or bfloat16 (the embedding lookup, and dequantization). */
void rl_dequant_rows(int fmt, const uint8_t *w, int64_t k, const int64_t *ids, int64_t count, void *out, int bf) {
    int64_t nsb = k / 32, row_bytes = k / BLOCK_WEIGHTS[fmt] * BLOCK_BYTES[fmt];
    for (int64_t i = 0; i < count; i++) {
        const uint8_t *row = w + ids[i] * row_bytes;
        for (int64_t j = 0; j < nsb; j++) {
            int8_t q[32];
            float d0, d1, mn;
            unpack_sub(fmt, row, j, q, &d0, &d1, &mn);
            for (int l = 0; l < 32; l++) store(out, i * k + j * 32 + l, (l < 16 ? d0 : d1) * (float)q[l] + mn, bf);
        }
    }
}

/* ------------------------------------------------------------------ activation quantization */

#if defined(__AVX2__)
INLINE __m256 load8(const void *x, int64_t e, int bf) {
    if (!bf) return _mm256_loadu_ps((const float *)x + e);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + e));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

INLINE int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

/* max |x| over the 8 * nv values from x[e] */
INLINE float absmax(const void *x, int64_t e, int nv, int bf) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < nv; i++) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, load8(x, e + 8 * i, bf)));
    return hmax(mx);
}
#else
INLINE float absmax(const void *x, int64_t e, int nv, int bf) {
    float amax = 0.0f;
    for (int i = 0; i < 8 * nv; i++) {
        float a = fabsf(load(x, e + i, bf));
        amax = a > amax ? a : amax;
    }
    return amax;
}
#endif

/* The 32 values from x[e] times id as two bytes each, a = round(v) and b = round((v - a) * 254),
   in order (AVX2: one register each, q[0] = a, q[1] = b; else bytes at out[0..31], out[32..63]);
   sums[0..1] = the sums of each 16 a, sums[2..3] of each 16 b. */
#if defined(__AVX2__)
INLINE void round32(const void *x, int64_t e, float id, int bf, __m256i q[2], int sums[4]) {
    __m256i ia[4], ib[4];
    for (int i = 0; i < 4; i++) {
        __m256 v = _mm256_mul_ps(load8(x, e + 8 * i, bf), _mm256_set1_ps(id));
        __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        ia[i] = _mm256_cvtps_epi32(r);
        ib[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, r), _mm256_set1_ps(254.0f)),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i *parts[2] = {ia, ib};
    for (int t = 0; t < 2; t++) {
        __m256i *p = parts[t];
        sums[2 * t] = hsum_i32(_mm256_add_epi32(p[0], p[1]));
        sums[2 * t + 1] = hsum_i32(_mm256_add_epi32(p[2], p[3]));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(p[0], p[1]), _mm256_packs_epi32(p[2], p[3]));
        q[t] = _mm256_permutevar8x32_epi32(packed, order);
    }
}
#else
INLINE void round32(const void *x, int64_t e, float id, int bf, int8_t *out, int sums[4]) {
    sums[0] = sums[1] = sums[2] = sums[3] = 0;
    for (int i = 0; i < 32; i++) {
        float v = load(x, e + i, bf) * id, r = nearbyintf(v);
        int qa = (int)r, qb = (int)nearbyintf((v - r) * 254.0f);
        out[i] = (int8_t)qa;
        out[32 + i] = (int8_t)qb;
        sums[i / 16] += qa;
        sums[2 + i / 16] += qb;
    }
}
#endif

/* One row of k values, per 32 (nsb = k / 32 sub-blocks) into `row` (q8_stride bytes). */
static void quantize_row_q8(const void *x, int64_t k, int bf, int two, uint8_t *row) {
    int64_t nsb = k / 32, pad = q8_pad(nsb);
    float *ds = (float *)(row + nsb * 64), *ss = ds + pad;
    for (int64_t b = nsb; b < pad; b++) ds[b] = ss[b] = 0.0f;
    for (int64_t b = 0; b < nsb; b++) {
        float amax = absmax(x, b * 32, 4, bf), d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sums[4];
#if defined(__AVX2__)
        __m256i q[2];
        round32(x, b * 32, id, bf, q, sums);
        for (int t = 0; t < 2; t++) {
            uint8_t *o = row + t * nsb * 32;
            if ((b | 1) < nsb) { /* a full pair: interleave the halves */
                o += (b & ~(int64_t)1) * 32 + (b & 1) * 16;
                _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(q[t]));
                _mm_storeu_si128((__m128i *)(o + 32), _mm256_extracti128_si256(q[t], 1));
            } else {
                _mm256_storeu_si256((__m256i *)(o + b * 32), q[t]);
            }
        }
#else
        int8_t q[64];
        round32(x, b * 32, id, bf, q, sums);
        memcpy(row + b * 32, q, 32);
        memcpy(row + nsb * 32 + b * 32, q + 32, 32);
#endif
        ds[b] = d;
        /* the sum of the values the products use (a, or a + b / 254): the offset term's error
           then cancels part of theirs (for Q4_1, w ~= d (q - 8) rather than d q) */
        ss[b] = d * ((float)(sums[0] + sums[1]) + (two ? (float)(sums[2] + sums[3]) * INV254 : 0.0f));
    }
}

/* One row of k values, per 256 into `row` (q8k_stride bytes). */
static void quantize_row_q8k(const void *x, int64_t k, int bf, uint8_t *row) {
    int64_t nsk = k / 256;
    uint8_t *ds = row + 2 * k;
    int16_t *sums_a = (int16_t *)(ds + 4 * nsk), *sums_b = sums_a + 16 * nsk;
    for (int64_t s = 0; s < nsk; s++) {
        float amax = absmax(x, s * 256, 32, bf), d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        memcpy(ds + 4 * s, &d, 4);
        for (int b = 0; b < 8; b++) {
            int sums[4];
            int64_t e = s * 256 + b * 32;
#if defined(__AVX2__)
            __m256i q[2];
            round32(x, e, id, bf, q, sums);
            _mm256_storeu_si256((__m256i *)(row + e), q[0]);
            _mm256_storeu_si256((__m256i *)(row + k + e), q[1]);
#else
            int8_t q[64];
            round32(x, e, id, bf, q, sums);
            memcpy(row + e, q, 32);
            memcpy(row + k + e, q + 32, 32);
#endif
            for (int h = 0; h < 2; h++) {
                sums_a[16 * s + 2 * b + h] = (int16_t)sums[h];
                sums_b[16 * s + 2 * b + h] = (int16_t)sums[2 + h];
            }
        }
    }
}

/* ------------------------------------------------------------------ row dot products

   rowdot_*: out[r] = W_row . X_r for the mr activation rows X_r of x (quantized), nsb
   sub-blocks per row. */

#if defined(__AVX2__)

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#else
#define VNNI 0
#endif

/* 32 bytes: the low nibbles of p[0..15] then the high nibbles. */
INLINE __m256i nibbles32(const uint8_t *p) {
    __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    t = _mm256_srlv_epi32(t, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(t, _mm256_set1_epi8(0x0F));
}

/* 32 bytes: 0x10 where bit i of v is set. */
INLINE __m256i bits32_as_0x10(uint32_t v) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                            3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(0x10));
}

INLINE uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* int32 sums of u[i] * a[i] over each 4 bytes, added to acc (u unsigned bytes < 128, a signed) */
INLINE __m256i dpbusd(__m256i acc, __m256i u, __m256i a) {
#if VNNI
    return _mm256_dpbusd_epi32(acc, u, a);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)));
#endif
}

/* acc + the int32 sums over byte pairs of u * a (int16, no overflow for u < 64), each pair of
   those times the int16 scales sc */
INLINE __m256i dot_scaled(__m256i acc, __m256i u, __m256i a, __m256i sc) {
#if VNNI
    return _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(u, a), sc);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), sc));
#endif
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define ROWDOT_BEGIN                                                                               \
    __m256 acc[MR];                                                                                \
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
#define ROWDOT_END                                                                                 \
    for (int r = 0; r < mr; r++) out[r] = hsum(acc[r]);

/* The 32 bits at the start of each of the g (<= 8) blocks from p, `stride` bytes apart, in one
   masked gather (zeros past g): a block's float16 scale in the low half, Q4_1 / Q5_1's float16
   offset in the high half. */
INLINE __m256i block_heads(const uint8_t *p, int64_t stride, int g) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i idx = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)stride));
    __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(g), lane);
    return _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)p, idx, mask, 1);
}

/* The low (hi = 0) or high float16 of each 32-bit lane, as 8 floats. */
INLINE __m256 f16_halves(__m256i v, int hi) {
    v = hi ? _mm256_srli_epi32(v, 16) : _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
    return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

/* int32 sums over each 4 bytes of lo * a[0..31] + hi * a[32..63] (unsigned weights < 64: on AVX2
   the two int16 pair sums cannot overflow) */
INLINE __m256i dot_pair(__m256i lo, __m256i hi, const int8_t *a) {
    const __m256i *v = (const __m256i *)a;
#if VNNI
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256(v)), hi,
                               _mm256_loadu_si256(v + 1));
#else
    __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(v)),
                                   _mm256_maddubs_epi16(hi, _mm256_loadu_si256(v + 1)));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: blocks of 32 with one float16 scale (and Q4_1 / Q5_1 a
   float16 offset; Q4_0 / Q5_0 are read as unsigned with offset -8 d / -16 d). Walked in groups
   of 8 blocks: the 8 scales (and offsets) are one vector, multiplied per activation row by its 8
   activation scales (sc[r] = d_w * d_x), the offset terms mn * s_x are one FMA. Two blocks go
   through one register, block 2i in the low lane and 2i + 1 in the high one (matching the
   interleaved activations), so their integer dot products come out as the low and high four
   lanes, scaled by the lanes [sc 2i x 4 | sc 2i + 1 x 4]. */
INLINE void rowdot_b32(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, const int two,
                       float *out) {
    ROWDOT_BEGIN
    const int64_t bb = fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : fmt == Q5_0 ? 22 : fmt == Q5_1 ? 24 : 34;
    const int has_min = fmt == Q4_1 || fmt == Q5_1, five = fmt == Q5_0 || fmt == Q5_1;
    const int64_t qoff = (has_min ? 4 : 2) + (five ? 4 : 0); /* the quants' offset in a block */
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256 inv254 = _mm256_set1_ps(INV254);
    for (int64_t j0 = 0; j0 < nsb; j0 += 8) {
        const int g = (int)(nsb - j0 < 8 ? nsb - j0 : 8);
        const uint8_t *b0 = w + j0 * bb;
        __m256i heads = block_heads(b0, bb, g);
        __m256 dw = f16_halves(heads, 0);
        __m256 mw = has_min ? f16_halves(heads, 1)
                            : _mm256_mul_ps(dw, _mm256_set1_ps(fmt == Q4_0 ? -8.0f : fmt == Q5_0 ? -16.0f : 0.0f));
        __m256 sc[MR];
        for (int r = 0; r < mr; r++) {
            sc[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(XD(x, r, j0)));
            if (fmt != Q8_0) acc[r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(XS(x, r, j0)), acc[r]);
        }
#define PAIR_BODY(b)                                                                               \
    {                                                                                              \
        const uint8_t *qa = b0 + (b) * bb + qoff, *qb = qa + bb;                                   \
        const __m256i lanes = _mm256_setr_epi32(b, b, b, b, b + 1, b + 1, b + 1, b + 1);           \
        if (fmt == Q8_0) {                                                                         \
            __m256i w0 = _mm256_loadu2_m128i((const __m128i *)qb, (const __m128i *)qa);            \
            __m256i w1 = _mm256_loadu2_m128i((const __m128i *)(qb + 16), (const __m128i *)(qa + 16)); \
            __m256i u0 = _mm256_sign_epi8(w0, w0), u1 = _mm256_sign_epi8(w1, w1);                  \
            for (int r = 0; r < mr; r++) {                                                         \
                const __m256i *a = (const __m256i *)XQ(x, r, j0 + (b)), *a2 = (const __m256i *)XQ2(x, r, j0 + (b)); \
                __m256i p = dpbusd(_mm256_setzero_si256(), u0, _mm256_sign_epi8(_mm256_loadu_si256(a), w0)); \
                __m256 t = _mm256_cvtepi32_ps(dpbusd(p, u1, _mm256_sign_epi8(_mm256_loadu_si256(a + 1), w1))); \
                if (two) {                                                                         \
                    __m256i p2 = dpbusd(_mm256_setzero_si256(), u0, _mm256_sign_epi8(_mm256_loadu_si256(a2), w0)); \
                    p2 = dpbusd(p2, u1, _mm256_sign_epi8(_mm256_loadu_si256(a2 + 1), w1));         \
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p2), inv254, t);                        \
                }                                                                                  \
                acc[r] = _mm256_fmadd_ps(t, _mm256_permutevar8x32_ps(sc[r], lanes), acc[r]);       \
            }                                                                                      \
        } else {                                                                                   \
            __m256i v = _mm256_loadu2_m128i((const __m128i *)qb, (const __m128i *)qa);            \
            __m256i lo = _mm256_and_si256(v, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4); \
            if (five) {                                                                            \
                uint32_t ha = rd32(qa - 4), hb = rd32(qb - 4);                                     \
                lo = _mm256_or_si256(lo, bits32_as_0x10((ha & 0xFFFF) | (hb << 16)));              \
                hi = _mm256_or_si256(hi, bits32_as_0x10((ha >> 16) | (hb & 0xFFFF0000u)));         \
            }                                                                                      \
            for (int r = 0; r < mr; r++) {                                                         \
                __m256 t = _mm256_cvtepi32_ps(dot_pair(lo, hi, XQ(x, r, j0 + (b))));                \
                if (two) t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_pair(lo, hi, XQ2(x, r, j0 + (b)))), inv254, t); \
                acc[r] = _mm256_fmadd_ps(t, _mm256_permutevar8x32_ps(sc[r], lanes), acc[r]);       \
            }                                                                                      \
        }                                                                                          \
    }
        if (g == 8) { /* a constant trip count: unrolled, addresses folded */
#pragma GCC unroll 4
            for (int b = 0; b < 8; b += 2) PAIR_BODY(b)
        } else {
            int b = 0;
            for (; b + 1 < g; b += 2) PAIR_BODY(b)
            if (b < g) { /* the row's last block, alone (its activations are not interleaved) */
                const uint8_t *q = b0 + b * bb + qoff;
                __m256i u, s = _mm256_setzero_si256();
                if (fmt == Q8_0) {
                    s = _mm256_loadu_si256((const __m256i *)q);
                    u = _mm256_sign_epi8(s, s);
                } else {
                    u = nibbles32(q);
                    if (five) u = _mm256_or_si256(u, bits32_as_0x10(rd32(q - 4)));
                }
                for (int r = 0; r < mr; r++) {
                    __m256i a = _mm256_loadu_si256((const __m256i *)XQ(x, r, j0 + b));
                    if (fmt == Q8_0) a = _mm256_sign_epi8(a, s);
                    __m256 t = _mm256_cvtepi32_ps(dpbusd(_mm256_setzero_si256(), u, a));
                    if (two) {
                        __m256i a2 = _mm256_loadu_si256((const __m256i *)XQ2(x, r, j0 + b));
                        if (fmt == Q8_0) a2 = _mm256_sign_epi8(a2, s);
                        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dpbusd(_mm256_setzero_si256(), u, a2)), inv254, t);
                    }
                    acc[r] = _mm256_fmadd_ps(t, _mm256_permutevar8x32_ps(sc[r], _mm256_set1_epi32(b)), acc[r]);
                }
            }
        }
#undef PAIR_BODY
    }
    ROWDOT_END
}

/* int16 v (16 lanes) -> the int16 in lane i (< 8) of each 128-bit half, in all 8 lanes of it */
INLINE __m256i bcast16(__m256i v, int i) { return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)((2 * i + 1) << 8 | 2 * i))); }
INLINE __m256i bcast16_2(__m256i v, int i0, int i1) {
    return _mm256_shuffle_epi8(v, _mm256_setr_m128i(_mm_set1_epi16((short)((2 * i0 + 1) << 8 | 2 * i0)),
                                                    _mm_set1_epi16((short)((2 * i1 + 1) << 8 | 2 * i1))));
}

/* The int32 sums over the first activation bytes (a) and, with two, the second (b) as floats:
   a + b / 254, or a alone (with two a compile-time 0, b's computation is dropped) */
INLINE __m256 two_bytes(__m256i a, __m256i b, const int two) {
    __m256 f = _mm256_cvtepi32_ps(a);
    return two ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), _mm256_set1_ps(INV254), f) : f;
}

/* The 8 six-bit scales and mins from the 12 bytes at p (scale_min_k4's layout), in one vector
   pass: sc16 = [sc_0..7 | sc_0..7] and mn16 = [m_0 m_0 m_1 m_1 ... m_7 m_7] as int16. Reads 16
   bytes (the 4 after the scales are the block's quants). */
INLINE void k4_scales(const uint8_t *p, __m256i *sc16, __m256i *mn16) {
    __m128i v = _mm_loadu_si128((const __m128i *)p); /* u0 u1 u2 _ */
    __m128i lo = _mm_and_si128(v, _mm_set1_epi32(0x3f3f3f3f)); /* sc 0-3, m 0-3 in lanes 0, 1 */
    __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, 0xA0), _mm_setr_epi32(0, 0, 0, 4)),
                               _mm_set1_epi32(0x0f0f0f0f)); /* lanes 2, 3: u2 & m4, (u2 >> 4) & m4 */
    __m128i top = _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(v, 0x40), 6),
                                               _mm_set1_epi32(0x03030303)), 4); /* lanes 2, 3 from u0, u1 */
    __m128i all = _mm_blend_epi32(lo, _mm_or_si128(hi, top), 0xC);  /* sc 0-3, m 0-3, sc 4-7, m 4-7 */
    all = _mm_shuffle_epi32(all, 0xD8);                               /* sc 0-7, m 0-7 */
    *sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(all));
    __m128i mn = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(all, all));
    *mn16 = _mm256_setr_m128i(_mm_unpacklo_epi16(mn, mn), _mm_unpackhi_epi16(mn, mn));
}

/* Q4_K and Q5_K against Q8_K activations: per super-block, 4 chunks of 32 bytes whose low
   nibbles are sub-block 2c and high nibbles sub-block 2c + 1 (Q5_K: bit s of qh[l] is the fifth
   bit of sub-block s). w = d * sc_s * q - dmin * m_s with 6-bit sc_s, m_s: the sub-blocks' dot
   products times sc_s add up in int32, the offsets are sum_s m_s * (the activation sums). */
INLINE void rowdot_qk45(const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, const int two, float *out,
                        int five) {
    ROWDOT_BEGIN
    const int64_t bb = five ? 176 : 144;
    const __m256i lo4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    for (int64_t sb = 0; sb < nsb / 8; sb++) {
        const uint8_t *b = w + sb * bb, *qs = b + (five ? 48 : 16);
        __m256i sc16, mn16;
        k4_scales(b + 4, &sc16, &mn16);
        const float d = f16at(b), dmin = f16at(b + 2);
        __m256i sumi[MR], sumi2[MR];
        for (int r = 0; r < mr; r++) sumi[r] = sumi2[r] = _mm256_setzero_si256();
        __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const int s = 2 * c + h;
                __m256i q = h ? _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4) : _mm256_and_si256(v, lo4);
                if (five) q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, s), one), 4));
                __m256i scs = bcast16(sc16, s);
                for (int r = 0; r < mr; r++) {
                    sumi[r] = dot_scaled(sumi[r], q, _mm256_loadu_si256((const __m256i *)XQ(x, r, sb * 8 + s)), scs);
                    if (two) sumi2[r] = dot_scaled(sumi2[r], q, _mm256_loadu_si256((const __m256i *)XQ2(x, r, sb * 8 + s)), scs);
                }
            }
        }
        for (int r = 0; r < mr; r++) {
            const float dx = *XD(x, r, sb);
            /* the offsets from the same bytes as the products: their errors partly cancel */
            __m256i mins = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)XKS(x, r, sb)), mn16);
            __m256i mins2 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)XKS2(x, r, sb)), mn16);
            acc[r] = _mm256_fmadd_ps(two_bytes(sumi[r], sumi2[r], two), _mm256_set1_ps(d * dx), acc[r]);
            acc[r] = _mm256_fmadd_ps(two_bytes(mins, mins2, two), _mm256_set1_ps(-dmin * dx), acc[r]);
        }
    }
    ROWDOT_END
}

/* Q6_K against Q8_K activations: q = 6 bits - 32 with an int8 scale per 16 weights. The
   unsigned 6 bits times the activations, times the scales, add up in int32 over the
   super-block; the -32 comes off once, as 32 * sum of scale * activation sum per 16. */
INLINE void rowdot_q6_k(const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, const int two, float *out) {
    ROWDOT_BEGIN
    const __m256i lo4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < nsb / 8; sb++) {
        const uint8_t *b = w + sb * 210;
        __m256i sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192))); /* 16 scales */
        __m256i sc_half[2] = {_mm256_permute2x128_si256(sc_all, sc_all, 0x00),
                              _mm256_permute2x128_si256(sc_all, sc_all, 0x11)};
        __m256i sumi[MR], sumi2[MR];
        for (int r = 0; r < mr; r++) sumi[r] = sumi2[r] = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int half = 0; half < 2; half++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * half));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * half + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half));
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                __m256i ql = p & 1 ? ql1 : ql0;
                __m256i nib = p >= 2 ? _mm256_and_si256(_mm256_srli_epi16(ql, 4), lo4) : _mm256_and_si256(ql, lo4);
                __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * p), three);
                __m256i q = _mm256_or_si256(nib, _mm256_slli_epi16(hb, 4));
                __m256i scs = bcast16_2(sc_half[half], 2 * p, 2 * p + 1);
                const int j = sb * 8 + half * 4 + p;
                for (int r = 0; r < mr; r++) {
                    sumi[r] = dot_scaled(sumi[r], q, _mm256_loadu_si256((const __m256i *)XQ(x, r, j)), scs);
                    if (two) sumi2[r] = dot_scaled(sumi2[r], q, _mm256_loadu_si256((const __m256i *)XQ2(x, r, j)), scs);
                }
            }
        }
        const float d = f16at(b + 208);
        for (int r = 0; r < mr; r++) {
            __m256i off = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)XKS(x, r, sb)), sc_all);
            __m256i off2 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)XKS2(x, r, sb)), sc_all);
            __m256i s = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(off, 5));
            __m256i s2 = _mm256_sub_epi32(sumi2[r], _mm256_slli_epi32(off2, 5));
            acc[r] = _mm256_fmadd_ps(two_bytes(s, s2, two), _mm256_set1_ps(d * *XD(x, r, sb)), acc[r]);
        }
    }
    ROWDOT_END
}

INLINE void rowdot(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, const int two, float *out) {
    switch (fmt) {
    case Q4_K: rowdot_qk45(w, x, nsb, mr, two, out, 0); break;
    case Q5_K: rowdot_qk45(w, x, nsb, mr, two, out, 1); break;
    case Q6_K: rowdot_q6_k(w, x, nsb, mr, two, out); break;
    /* each a constant, so every format gets its own specialised loop */
    case Q4_0: rowdot_b32(Q4_0, w, x, nsb, mr, two, out); break;
    case Q4_1: rowdot_b32(Q4_1, w, x, nsb, mr, two, out); break;
    case Q5_0: rowdot_b32(Q5_0, w, x, nsb, mr, two, out); break;
    case Q5_1: rowdot_b32(Q5_1, w, x, nsb, mr, two, out); break;
    default: rowdot_b32(Q8_0, w, x, nsb, mr, two, out); break;
    }
}

#else /* portable C: decode each sub-block with the reference unpack */

INLINE void rowdot(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, const int two, float *out) {
    float acc[MR] = {0};
    const int kq = fmt >= Q4_K;
    for (int64_t j = 0; j < nsb; j++) {
        int8_t q[32];
        float d0, d1, mn;
        unpack_sub(fmt, w, j, q, &d0, &d1, &mn);
        for (int r = 0; r < mr; r++) {
            const int8_t *a = XQ(x, r, j), *b = XQ2(x, r, j);
            int s[2][2] = {{0, 0}, {0, 0}}, sa = 0, sb = 0;
            for (int l = 0; l < 32; l++) {
                s[0][l / 16] += q[l] * a[l];
                sa += a[l];
                if (two) {
                    s[1][l / 16] += q[l] * b[l];
                    sb += b[l];
                }
            }
            float dx = *XD(x, r, kq ? j / 8 : j);
            acc[r] += dx * (d0 * ((float)s[0][0] + (float)s[1][0] * INV254) + d1 * ((float)s[0][1] + (float)s[1][1] * INV254) +
                            mn * ((float)sa + (float)sb * INV254));
        }
    }
    for (int r = 0; r < mr; r++) out[r] = acc[r];
}

#endif

/* rowdot with mr and two compile-time constants, so the accumulators live in registers. */
#define ROWDOT_MR(TWO)                                                                             \
    switch (mr) {                                                                                  \
    case 1: rowdot(fmt, w, x, nsb, 1, TWO, out); break;                                            \
    case 2: rowdot(fmt, w, x, nsb, 2, TWO, out); break;                                            \
    case 3: rowdot(fmt, w, x, nsb, 3, TWO, out); break;                                            \
    case 4: rowdot(fmt, w, x, nsb, 4, TWO, out); break;                                            \
    case 5: rowdot(fmt, w, x, nsb, 5, TWO, out); break;                                            \
    case 6: rowdot(fmt, w, x, nsb, 6, TWO, out); break;                                            \
    case 7: rowdot(fmt, w, x, nsb, 7, TWO, out); break;                                            \
    default: rowdot(fmt, w, x, nsb, 8, TWO, out); break;                                           \
    }
static void rowdot_any(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, int mr, int two, float *out) {
    if (two) {
        ROWDOT_MR(1)
    } else {
        ROWDOT_MR(0)
    }
}
#undef ROWDOT_MR

/* ------------------------------------------------------------------ matmul */

int64_t rl_quant_row_bytes(int fmt, int64_t k) { return k / BLOCK_WEIGHTS[fmt] * BLOCK_BYTES[fmt]; }

/* Minimum work (weight sub-blocks x activation rows) for a step to use more than one thread:
   a fork/join of the (spinning) OpenMP team costs ~1-2 us, a thread does ~1,000 sub-block dot products in that. */
#define PARALLEL_MIN_WORK 4096

/* y [m, n] (float32 or bfloat16, like x) = x [m, k] @ W^T (+ bias [n], x's dtype). k must be a
   multiple of the format's block. act_bytes: 2 = the activations' second bytes count (about 15
   bits), 1 = the first alone (8 bits, llama.cpp's numerics: less work per weight). */
void rl_quant_matmul(int fmt, const uint8_t *w, int64_t n, int64_t k, const void *x, int64_t m, int bf,
                     const void *bias, void *y, int64_t act_bytes, int64_t threads) {
    int64_t nsb = k / 32, row_bytes = rl_quant_row_bytes(fmt, k);
    const int kq = fmt >= Q4_K; /* K-quants: activations per 256 (Q8_K), else per 32 */
    int64_t xstride = kq ? q8k_stride(nsb) : q8_stride(nsb);
    uint8_t *xq = (uint8_t *)malloc((size_t)(m * xstride));
    int nt = (int)(threads < 1 ? 1 : threads);
    if (n * nsb * m < PARALLEL_MIN_WORK) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && m >= 64)
    for (int64_t r = 0; r < m; r++) {
        const void *xr = (const char *)x + r * k * (bf ? 2 : 4);
        if (kq) quantize_row_q8k(xr, k, bf, xq + r * xstride);
        else quantize_row_q8(xr, k, bf, act_bytes == 2, xq + r * xstride);
    }
    /* decode: one tile of rows, weight rows split evenly; wide steps: chunks of NC rows */
    int64_t chunk = m <= MR ? (n + nt - 1) / nt : NC;
    int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n0 = c * chunk, n1 = n0 + chunk < n ? n0 + chunk : n;
        for (int64_t m0 = 0; m0 < m; m0 += MR) {
            int mr = (int)(m - m0 < MR ? m - m0 : MR);
            q8rows tile = q8_layout(xq + m0 * xstride, nsb, kq);
            for (int64_t row = n0; row < n1; row++) {
                float out[MR];
                rowdot_any(fmt, w + row * row_bytes, &tile, nsb, mr, act_bytes == 2, out);
                float bv = bias ? load(bias, row, bf) : 0.0f;
                for (int r = 0; r < mr; r++) store(y, (m0 + r) * n + row, out[r] + bv, bf);
            }
        }
    }
    free(xq);
}
