/* Matrix multiplication with GGUF block-quantized weights, kept in the file's own block layout.

   y[m, n] = sum_k x[m, k] * W[n, k] for W in Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K.
   Every format is read as sub-blocks of 32 weights along k, each w = d_half * q + mn with q a
   small integer (K-quant super-blocks of 256 are 8 such sub-blocks; Q6_K has one scale per 16
   weights, so a sub-block has two). The activations are quantized per 32 values to 8 bits
   (d = max|x| / 127, q = round(x / d), llama.cpp's Q8_0), so each sub-block's dot product is one
   integer dot product of 32 byte pairs:

       sum_i w_i x_i ~= d_w * d_x * sum_i q_i a_i + mn * d_x * sum_i a_i

   The error against the float weights is the activation rounding alone: at most
   sum over sub-blocks of (max|x| / 254) * sum |w_i| (tests/test_quant_kernels.py checks it).

   Work is split into tiles: up to MR activation rows share each unpacked weight sub-block, and
   a chunk of NC weight rows (a few KB) stays in cache while every activation tile passes over
   it, so a wide step (prefill) reads the weights from memory once and never makes a dense copy.
   Decode (m <= MR) is one tile: each weight byte is read once per step. Weight rows are split
   over OpenMP threads (the runtime torch itself uses). Built three times by the loader:
   scalar (portable C), AVX2 + FMA + F16C (_mm256_maddubs_epi16) and AVX-512 (the AVX2 code with
   VNNI's _mm256_dpbusd_epi32 where the CPU has it); RIDGELINE_CPU_ISA picks one. */

#include <stdlib.h>

#include "common.h"

enum { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, NUM_FORMATS };

/* bytes per block and weights per block of each format */
static const int64_t BLOCK_BYTES[NUM_FORMATS] = {18, 20, 22, 24, 34, 144, 176, 210};
static const int64_t BLOCK_WEIGHTS[NUM_FORMATS] = {32, 32, 32, 32, 32, 256, 256, 256};

/* Quantized activations, one row after another: per row the nsb sub-blocks' 32 values
   a = round(x / d) (nsb * 32 bytes), then their scales d and sums s = d * sum(a) as two float
   arrays padded with zeros to a multiple of 8 (so groups of 8 sub-blocks load them as vectors). */
typedef struct {
    const uint8_t *base;
    int64_t nsb, pad, stride; /* sub-blocks per row, padded count, bytes per row */
} q8rows;

INLINE int64_t q8_stride(int64_t nsb) { return nsb * 32 + 8 * ((nsb + 7) / 8 * 8); }
INLINE const int8_t *XQ(const q8rows *x, int64_t r, int64_t j) {
    return (const int8_t *)(x->base + r * x->stride + j * 32);
}
INLINE const float *XD(const q8rows *x, int64_t r, int64_t j) {
    return (const float *)(x->base + r * x->stride + x->nsb * 32) + j;
}
INLINE const float *XS(const q8rows *x, int64_t r, int64_t j) { return XD(x, r, j) + x->pad; }

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

static void quantize_row_q8(const void *x, int64_t k, int bf, uint8_t *row) {
    int64_t nsb = k / 32, pad = (nsb + 7) / 8 * 8;
    float *ds = (float *)(row + nsb * 32), *ss = ds + pad;
    for (int64_t b = nsb; b < pad; b++) ds[b] = ss[b] = 0.0f;
    for (int64_t b = 0; b < nsb; b++) {
        int8_t *oq = (int8_t *)row + b * 32;
#if defined(__AVX2__)
        __m256 v[4];
        for (int i = 0; i < 4; i++) {
            int64_t e = b * 32 + i * 8;
            if (bf) {
                __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + e));
                v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            } else {
                v[i] = _mm256_loadu_ps((const float *)x + e);
            }
        }
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4), d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256i i32[4], sum = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            sum = _mm256_add_epi32(sum, i32[i]);
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)oq, p);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        ds[b] = d;
        ss[b] = d * (float)_mm_cvtsi128_si32(s4);
#else
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            float a = fabsf(load(x, b * 32 + i, bf));
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            int qv = (int)nearbyintf(load(x, b * 32 + i, bf) * id);
            oq[i] = (int8_t)qv;
            sum += qv;
        }
        ds[b] = d;
        ss[b] = d * (float)sum;
#endif
    }
}

/* ------------------------------------------------------------------ row dot products

   rowdot_*: out[r] = W_row . X_r for the mr activation rows X_r of x (quantized
   sub-blocks), nsb sub-blocks per row. */

#if defined(__AVX2__)

/* 32 bytes: the low nibbles of p[0..15] then the high nibbles. */
INLINE __m256i nibbles32(const uint8_t *p) {
    __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    t = _mm256_srlv_epi32(t, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(t, _mm256_set1_epi8(0x0F));
}

/* 32 bytes: 0x10 where bit i of the 32-bit word at p is set. */
INLINE __m256i bits32_as_0x10(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                            3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(0x10));
}

/* Eight int32 partial sums of u[i] * a[i] (u unsigned bytes < 128, a signed), as floats. */
INLINE __m256 dot_us(__m256i u, __m256i a) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)));
#endif
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The row dots walk a weight row in groups of 8 sub-blocks. Per group the 8 weight scales (and
   offsets) form one vector; per activation row they are multiplied by the 8 activation scales
   at once (sc[r][b] = d_w * d_x), and the offset terms mn * s_x are one vector FMA. The integer
   dot product of each sub-block is then converted and scaled into the row's accumulator. */
#define GROUP_SCALES(DW, MW, J0)                                                                   \
    float sc[MR][8] __attribute__((aligned(32)));                                                  \
    for (int r = 0; r < mr; r++) {                                                                 \
        __m256 dx = _mm256_loadu_ps(XD(x, r, (J0)));                                               \
        _mm256_store_ps(sc[r], _mm256_mul_ps((DW), dx));                                           \
        macc[r] = _mm256_fmadd_ps((MW), _mm256_loadu_ps(XS(x, r, (J0))), macc[r]);                 \
    }
/* unsigned q (offset in the group's MW) */
#define ACC_UNSIGNED(U, B, J)                                                                      \
    for (int r_ = 0; r_ < mr; r_++) {                                                                 \
        __m256 p_ = dot_us((U), _mm256_loadu_si256((const __m256i *)XQ(x, r_, (J))));                \
        acc[r_] = _mm256_fmadd_ps(p_, _mm256_broadcast_ss(&sc[r_][(B)]), acc[r_]);                     \
    }
/* signed q (Q8_0, Q6_K): |q| times a with q's sign; SC: per-half int16 scales (Q6_K) or ones */
#define ACC_SIGNED(S, SC, B, J)                                                                    \
    {                                                                                              \
        __m256i ab_ = _mm256_sign_epi8((S), (S));                                                   \
        for (int r_ = 0; r_ < mr; r_++) {                                                             \
            __m256i a_ = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)XQ(x, r_, (J))), (S)); \
            __m256 p_ = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ab_, a_), (SC)));   \
            acc[r_] = _mm256_fmadd_ps(p_, _mm256_broadcast_ss(&sc[r_][(B)]), acc[r_]);                 \
        }                                                                                          \
    }

#define ROWDOT_BEGIN                                                                               \
    __m256 acc[MR], macc[MR];                                                                      \
    for (int r = 0; r < mr; r++) acc[r] = macc[r] = _mm256_setzero_ps();
#define ROWDOT_END                                                                                 \
    for (int r = 0; r < mr; r++) out[r] = hsum(_mm256_add_ps(acc[r], macc[r]));

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

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: blocks of 32 with one float16 scale (and Q4_1 / Q5_1 a
   float16 offset; Q4_0 / Q5_0 are read as unsigned with offset -8 d / -16 d). */
INLINE void rowdot_b32(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, float *out) {
    ROWDOT_BEGIN
    const int64_t bb = fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : fmt == Q5_0 ? 22 : fmt == Q5_1 ? 24 : 34;
    const int has_min = fmt == Q4_1 || fmt == Q5_1, five = fmt == Q5_0 || fmt == Q5_1;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t j0 = 0; j0 < nsb; j0 += 8) {
        const int g = (int)(nsb - j0 < 8 ? nsb - j0 : 8);
        const uint8_t *b0 = w + j0 * bb;
        __m256i heads = block_heads(b0, bb, g);
        __m256 dw = f16_halves(heads, 0);
        __m256 mw = has_min ? f16_halves(heads, 1)
                            : _mm256_mul_ps(dw, _mm256_set1_ps(fmt == Q4_0 ? -8.0f : fmt == Q5_0 ? -16.0f : 0.0f));
        GROUP_SCALES(dw, mw, j0)
#define B32_BODY(b)                                                                                \
    {                                                                                              \
        const uint8_t *q = b0 + (b) * bb + (has_min ? 4 : 2);                                      \
        if (fmt == Q8_0) {                                                                         \
            __m256i s8 = _mm256_loadu_si256((const __m256i *)q);                                   \
            ACC_SIGNED(s8, ones, (b), j0 + (b))                                                    \
        } else {                                                                                   \
            __m256i u = five ? _mm256_or_si256(nibbles32(q + 4), bits32_as_0x10(q)) : nibbles32(q); \
            ACC_UNSIGNED(u, (b), j0 + (b))                                                         \
        }                                                                                          \
    }
        if (g == 8) { /* a constant trip count: unrolled, addresses folded */
#pragma GCC unroll 8
            for (int b = 0; b < 8; b++) B32_BODY(b)
        } else {
            for (int b = 0; b < g; b++) B32_BODY(b)
        }
#undef B32_BODY
    }
    ROWDOT_END
}

/* Q4_K and Q5_K: per super-block, 4 chunks of 32 bytes whose low nibbles are sub-block 2c and
   high nibbles sub-block 2c + 1 (Q5_K: bit s of qh[l] is the fifth bit of sub-block s); each
   sub-block's scale d * sc and offset -dmin * m from 6-bit sc, m. */
INLINE void rowdot_qk45(const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, float *out, int five) {
    ROWDOT_BEGIN
    const int64_t bb = five ? 176 : 144;
    const __m256i lo4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    for (int64_t sb = 0; sb < nsb / 8; sb++) {
        const uint8_t *b = w + sb * bb, *qs = b + (five ? 48 : 16);
        /* the 8 six-bit scales and mins, four bytes at a time (scale_min_k4's layout) */
        uint32_t u[3];
        memcpy(u, b + 4, 12);
        const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
        __m128i sc8 = _mm_setr_epi32((int)(u[0] & m6), (int)((u[2] & m4) | (((u[0] >> 6) & m2) << 4)), 0, 0);
        __m128i mn8 = _mm_setr_epi32((int)(u[1] & m6), (int)(((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4)), 0, 0);
        __m256 dw = _mm256_mul_ps(_mm256_set1_ps(f16at(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc8)));
        __m256 mw = _mm256_mul_ps(_mm256_set1_ps(-f16at(b + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn8)));
        GROUP_SCALES(dw, mw, sb * 8)
        __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            for (int h = 0; h < 2; h++) {
                int s = 2 * c + h;
                __m256i u = h ? _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4) : _mm256_and_si256(v, lo4);
                if (five) {
                    __m256i hb = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)), one);
                    u = _mm256_or_si256(u, _mm256_slli_epi16(hb, 4));
                }
                ACC_UNSIGNED(u, s, sb * 8 + s)
            }
        }
    }
    ROWDOT_END
}

INLINE void rowdot_q6_k(const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, float *out) {
    ROWDOT_BEGIN
    const __m256i lo4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb / 8; sb++) {
        const uint8_t *b = w + sb * 210;
        const int8_t *scales = (const int8_t *)(b + 192);
        GROUP_SCALES(_mm256_set1_ps(f16at(b + 208)), zero, sb * 8)
        /* the 16 int8 scales as int32 lanes holding the scale in both 16-bit halves, so one
           permute gives a sub-block's [scale of its first 16 x 8 | of its second 16 x 8] */
        __m256i sc_dup[2];
        for (int i = 0; i < 2; i++) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(scales + 8 * i)));
            sc_dup[i] = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16));
        }
        for (int half = 0; half < 2; half++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * half));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * half + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half));
            for (int p = 0; p < 4; p++) {
                __m256i ql = p & 1 ? ql1 : ql0;
                __m256i nib = p >= 2 ? _mm256_and_si256(_mm256_srli_epi16(ql, 4), lo4) : _mm256_and_si256(ql, lo4);
                __m256i hb = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * p)), three);
                __m256i s = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16(hb, 4)), off);
                const int i0 = 2 * p, i1 = 2 * p + 1;
                __m256i sc16 = _mm256_permutevar8x32_epi32(sc_dup[half],
                                                           _mm256_setr_epi32(i0, i0, i0, i0, i1, i1, i1, i1));
                ACC_SIGNED(s, sc16, half * 4 + p, sb * 8 + half * 4 + p)
            }
        }
    }
    ROWDOT_END
}

INLINE void rowdot(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, float *out) {
    switch (fmt) {
    case Q4_K: rowdot_qk45(w, x, nsb, mr, out, 0); break;
    case Q5_K: rowdot_qk45(w, x, nsb, mr, out, 1); break;
    case Q6_K: rowdot_q6_k(w, x, nsb, mr, out); break;
    /* each a constant, so every format gets its own specialised loop */
    case Q4_0: rowdot_b32(Q4_0, w, x, nsb, mr, out); break;
    case Q4_1: rowdot_b32(Q4_1, w, x, nsb, mr, out); break;
    case Q5_0: rowdot_b32(Q5_0, w, x, nsb, mr, out); break;
    case Q5_1: rowdot_b32(Q5_1, w, x, nsb, mr, out); break;
    default: rowdot_b32(Q8_0, w, x, nsb, mr, out); break;
    }
}

#else /* portable C: decode each sub-block with the reference unpack */

INLINE void rowdot(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, const int mr, float *out) {
    float acc[MR] = {0};
    for (int64_t j = 0; j < nsb; j++) {
        int8_t q[32];
        float d0, d1, mn;
        unpack_sub(fmt, w, j, q, &d0, &d1, &mn);
        for (int r = 0; r < mr; r++) {
            const int8_t *a = XQ(x, r, j);
            int s0 = 0, s1 = 0;
            for (int l = 0; l < 16; l++) s0 += q[l] * a[l];
            for (int l = 16; l < 32; l++) s1 += q[l] * a[l];
            acc[r] += *XD(x, r, j) * (d0 * (float)s0 + d1 * (float)s1) + mn * *XS(x, r, j);
        }
    }
    for (int r = 0; r < mr; r++) out[r] = acc[r];
}

#endif

/* rowdot with mr a compile-time constant, so the accumulators live in registers. */
static void rowdot_any(int fmt, const uint8_t *w, const q8rows *x, int64_t nsb, int mr, float *out) {
    switch (mr) {
    case 1: rowdot(fmt, w, x, nsb, 1, out); break;
    case 2: rowdot(fmt, w, x, nsb, 2, out); break;
    case 3: rowdot(fmt, w, x, nsb, 3, out); break;
    case 4: rowdot(fmt, w, x, nsb, 4, out); break;
    case 5: rowdot(fmt, w, x, nsb, 5, out); break;
    case 6: rowdot(fmt, w, x, nsb, 6, out); break;
    case 7: rowdot(fmt, w, x, nsb, 7, out); break;
    default: rowdot(fmt, w, x, nsb, 8, out); break;
    }
}

/* ------------------------------------------------------------------ matmul */

int64_t rl_quant_row_bytes(int fmt, int64_t k) { return k / BLOCK_WEIGHTS[fmt] * BLOCK_BYTES[fmt]; }

/* Minimum work (weight sub-blocks x activation rows) for a step to use more than one thread:
   a fork/join of the (spinning) OpenMP team costs ~1-2 us, a thread does ~1,000 sub-block dot products in that. */
#define PARALLEL_MIN_WORK 4096

/* y [m, n] (float32 or bfloat16, like x) = x [m, k] @ W^T (+ bias [n], x's dtype). k must be a
   multiple of the format's block. */
void rl_quant_matmul(int fmt, const uint8_t *w, int64_t n, int64_t k, const void *x, int64_t m, int bf,
                     const void *bias, void *y, int64_t threads) {
    int64_t nsb = k / 32, row_bytes = rl_quant_row_bytes(fmt, k);
    int64_t xstride = q8_stride(nsb);
    uint8_t *xq = (uint8_t *)malloc((size_t)(m * xstride));
    int nt = (int)(threads < 1 ? 1 : threads);
    if (n * nsb * m < PARALLEL_MIN_WORK) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && m >= 64)
    for (int64_t r = 0; r < m; r++) quantize_row_q8((const char *)x + r * k * (bf ? 2 : 4), k, bf, xq + r * xstride);
    /* decode: one tile of rows, weight rows split evenly; wide steps: chunks of NC rows */
    int64_t chunk = m <= MR ? (n + nt - 1) / nt : NC;
    int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n0 = c * chunk, n1 = n0 + chunk < n ? n0 + chunk : n;
        for (int64_t m0 = 0; m0 < m; m0 += MR) {
            int mr = (int)(m - m0 < MR ? m - m0 : MR);
            q8rows tile = {xq + m0 * xstride, nsb, (nsb + 7) / 8 * 8, xstride};
            for (int64_t row = n0; row < n1; row++) {
                float out[MR];
                rowdot_any(fmt, w + row * row_bytes, &tile, nsb, mr, out);
                float bv = bias ? load(bias, row, bf) : 0.0f;
                for (int r = 0; r < mr; r++) store(y, (m0 + r) * n + row, out[r] + bv, bf);
            }
        }
    }
    free(xq);
}
