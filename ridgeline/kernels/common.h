/* Helpers shared by the kernel sources: bfloat16 / float16 conversions and value access for
   tensors that are float32 (bf = 0) or bfloat16 (bf = 1). */
#ifndef RIDGELINE_COMMON_H
#define RIDGELINE_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__AVX2__) || defined(__F16C__))
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* IEEE half to float: F16C where the build has it, else bit manipulation (subnormals included). */
INLINE float fp16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        float f = (float)man * (1.0f / 16777216.0f); /* man * 2^-24 */
        return sign ? -f : f;
    }
    u = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

INLINE float load(const void *p, int64_t i, int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

INLINE void store(void *p, int64_t i, float v, int bf) {
    if (bf) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* The value an op with output dtype bf/f32 would have stored. */
INLINE float round_to(float v, int bf) { return bf ? bf16_to_f32(f32_to_bf16(v)) : v; }

#endif
