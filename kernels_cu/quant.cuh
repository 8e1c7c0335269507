// Quantization formats, bit-exact with moecomm/reference.py:
// FP8 e4m3fn (RNE, saturating, NaN -> 0x7F), e2m1 (software RNE on every arch; NaN -> +6),
// UE8M0 power-of-two scales (smallest power of two >= v).
#pragma once
#include <cuda_fp8.h>

#include "common.cuh"

namespace moecomm {

// Two 16-bit elements in one 32-bit word (element 0 low): the packed type and fp32 values.
template <typename T>
struct Packed2;

template <>
struct Packed2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type of(uint32_t w) { return *reinterpret_cast<type*>(&w); }
  static __device__ __forceinline__ float2 to_float2(type p) {
    const uint32_t w = *reinterpret_cast<uint32_t*>(&p);
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
  }
};

template <>
struct Packed2<__half> {
  using type = __half2;
  static __device__ __forceinline__ type of(uint32_t w) { return *reinterpret_cast<type*>(&w); }
  static __device__ __forceinline__ float2 to_float2(type p) { return __half22float2(p); }
};

__device__ __forceinline__ uint8_t e4m3_encode(float x) {
  return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

// Four codes, a in byte 0: the bits of four e4m3_encode calls, from two conversions of a
// pair each (sm_89+: one cvt.rn.satfinite.e4m3x2 per pair, no masking or shifting per code).
__device__ __forceinline__ uint32_t e4m3x4_encode(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | hi << 16;
}

// E e4m3 codes, packed little-endian four to a word: E = 8 or 4 for one 16-byte vector
// of 16-bit or fp32 elements, 16 for a group's 16-element chunk.
template <int E>
struct Codes {
  uint32_t w[E / 4];
};

// The codes of E values, four to a word.
template <int E>
__device__ __forceinline__ Codes<E> pack_codes(const float (&y)[E]) {
  Codes<E> c;
#pragma unroll
  for (int k = 0; k < E; k += 4) c.w[k / 4] = e4m3x4_encode(y[k], y[k + 1], y[k + 2], y[k + 3]);
  return c;
}

// One vector's codes (E = 8 or 4) to dst, 8- or 4-byte aligned, in one store.
template <int E>
__device__ __forceinline__ void store_codes(uint8_t* dst, const Codes<E>& c) {
  if (E == 8) *reinterpret_cast<uint2*>(dst) = make_uint2(c.w[0], c.w[E / 8]);
  else *reinterpret_cast<uint32_t*>(dst) = c.w[0];
}

// Exact: the code's exponent and mantissa bits placed in an fp32 (a denormal for e = 0)
// and rebased by 2^(127 - 7); 0x7F/0xFF decode as +-480 (the encoder saturates finite
// values, so those codes only come from NaN).
__device__ __forceinline__ float e4m3_decode(uint8_t c) {
  const uint32_t b = (uint32_t)c;
  return __fmul_rn(__uint_as_float((b & 0x7Fu) << 20 | (b & 0x80u) << 24), 0x1p120f);
}

// e2m1 code (4 bits): RNE on {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating at 6; the sign of
// -0 and of tiny negatives is kept; NaN -> 0x7 (for the positive NaN every fp32 product
// on the GPU returns). Branch-free and exact: equal to the reference on every fp32 value
// with |x| <= 8 (swept once; tests/cpu/test_quant.py checks every bf16 value, the
// neighbourhood of every tie and random fp32 values). a = min(|x|, 6)
// is rounded to the e2m1 step of its binade by one fused add, 2^(22 + max(e, 0)) + a with
// e the exponent of a (the sum's ulp is then the step: 0.5 below 2, 1 below 4, 2 above),
// whose low bits count the steps n; the code is n + 2 * max(e, 0), read off the sum's
// mantissa and exponent. Five instructions for the fused add, two more per element to
// pack eight codes (e2m1_pack8) instead of a chain of comparisons: the NVFP4 quantizer is
// issue-bound otherwise.
__device__ __forceinline__ uint32_t e2m1_fused_add(float x) {
  const float a = fminf(fabsf(x), 6.f);  // NaN -> 6
  const uint32_t t = max(__float_as_uint(a), 0x3F800000u) & 0x7F800000u;  // 2^max(e, 0)
  return __float_as_uint(__fmaf_rn(__uint_as_float(t), 4194304.f, a));
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

// Byte 0 of words a, b, c, d (or, with selector nibbles 0xB/0xF, their sign bits
// replicated: 0xFB) gathered into bytes 0..3 of one word.
__device__ __forceinline__ uint32_t gather4(uint32_t a, uint32_t b, uint32_t c, uint32_t d,
                                            uint32_t lo) {
  return prmt(prmt(a, b, lo), prmt(c, d, lo << 8), 0x7610);
}

// Eight e2m1 codes in one word, x[k] in nibble k (the low nibble first). Per element,
// f + (f >> 22) of the fused add above has the magnitude code + 42 in its low byte (298 =
// 256 + 42); the bytes of the even and the odd elements are gathered into two words, whose
// bias comes off at once (exact modulo 2^32), and the sign bits are gathered the same way.
__device__ __forceinline__ uint32_t e2m1_pack8(const float (&x)[8]) {
  uint32_t r[8], s[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t f = e2m1_fused_add(x[k]);
    r[k] = f + (f >> 22);
    s[k] = __float_as_uint(x[k]);
  }
  const uint32_t even = gather4(r[0], r[2], r[4], r[6], 0x40u);
  const uint32_t odd = gather4(r[1], r[3], r[5], r[7], 0x40u);
  const uint32_t sign_even = gather4(s[0], s[2], s[4], s[6], 0xFBu);  // bytes 0x00 / 0xFF
  const uint32_t sign_odd = gather4(s[1], s[3], s[5], s[7], 0xFBu);
  const uint32_t signs = (sign_even & 0x08080808u) | (sign_odd & 0x80808080u);
  return (even + (odd << 4) - 0x2A2A2A2Au * 17u) | signs;
}

// Exponent byte of the smallest power of two >= v, for v > 2^-126 (normal, positive);
// capped at 254.
__device__ __forceinline__ uint32_t ue8m0_ceil(float v) {
  const uint32_t b = __float_as_uint(v);
  const uint32_t e = (b >> 23) + ((b & 0x7FFFFFu) != 0u);
  return e > 254u ? 254u : e;
}

__device__ __forceinline__ float ue8m0_decode(uint32_t e) {
  return __uint_as_float(e << 23);  // e >= 1
}

// Byte offset of NVFP4 scale (row m, 16-element block k) in the 128x4 swizzled layout,
// for rows of `cols` elements. Only the band term needs 64 bits (k < 2^25, cols < 2^31).
__device__ __forceinline__ size_t nvfp4_swizzled_offset(size_t m, uint32_t k, size_t cols) {
  const uint32_t band_bytes = (((uint32_t)cols + 63u) >> 6) << 9;  // 512 per 4 blocks
  const uint32_t lo = (uint32_t)m;
  return (m >> 7) * band_bytes +
         (((k >> 2) << 9) | ((lo & 31u) << 4) | (((lo >> 5) & 3u) << 2) | (k & 3u));
}

}  // namespace moecomm
