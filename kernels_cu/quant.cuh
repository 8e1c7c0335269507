// Quantization formats, bit-exact with moecomm/reference.py:
// FP8 e4m3fn (RNE, saturating, NaN -> 0x7F), e2m1 (software RNE on every arch; NaN -> +6),
// UE8M0 power-of-two scales (smallest power of two >= v).
#pragma once
#include <cuda_fp8.h>

#include "common.cuh"

namespace moecomm {

__device__ __forceinline__ uint8_t e4m3_encode(float x) {
  return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float e4m3_decode(uint8_t c) {
  const int e = (c >> 3) & 0xF, m = c & 7;
  const float mag = e == 0 ? (float)m * 0.001953125f  // 2^-9
                           : __uint_as_float((uint32_t)(e + 120) << 23 | (uint32_t)m << 20);
  return (c & 0x80) ? -mag : mag;
}

// e2m1 code (4 bits): RNE on {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating at 6; the sign of
// -0 and of tiny negatives is kept; NaN -> 0x7 (for the positive NaN every fp32 product
// on the GPU returns). Branch-free and exact: equal to the reference on every fp32 value
// with |x| <= 8 (swept once; tests/cpu/test_quant.py checks every bf16 value, the
// neighbourhood of every tie and random fp32 values). a = min(|x|, 6)
// is rounded to the e2m1 step of its binade by one fused add, 2^(22 + max(e, 0)) + a with
// e the exponent of a (the sum's ulp is then the step: 0.5 below 2, 1 below 4, 2 above),
// whose low bits count the steps n; the code is n + 2 * max(e, 0), read off the sum's
// mantissa and exponent. About ten instructions instead of a chain of comparisons: the
// NVFP4 quantizer is issue-bound otherwise.
__device__ __forceinline__ uint32_t e2m1_magnitude_plus_298(float x) {
  const float a = fminf(fabsf(x), 6.f);  // NaN -> 6
  const uint32_t t = max(__float_as_uint(a), 0x3F800000u) & 0x7F800000u;  // 2^max(e, 0)
  const uint32_t f = __float_as_uint(__fmaf_rn(__uint_as_float(t), 4194304.f, a));
  return (f & 0x7Fu) + (f >> 22);  // steps + 2 * (149 + max(e, 0))
}

__device__ __forceinline__ uint32_t e2m1_encode(float x) {
  return (e2m1_magnitude_plus_298(x) - 298u) | ((__float_as_uint(x) >> 28) & 0x8u);
}

// Eight e2m1 codes in one word, x[k] in nibble k (the low nibble first): the codes' bias
// is taken off once for all eight (exact modulo 2^32) and the sign bits placed directly.
__device__ __forceinline__ uint32_t e2m1_pack8(const float (&x)[8]) {
  uint32_t w = 0, sign = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    w += e2m1_magnitude_plus_298(x[k]) << (4 * k);
    sign |= (__float_as_uint(x[k]) >> (28 - 4 * k)) & (0x8u << (4 * k));
  }
  return (w - 298u * 0x11111111u) | sign;
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

// Byte offset of NVFP4 scale (row m, 16-element block k) in the 128x4 swizzled layout
// for rows of `cols` elements.
__device__ __forceinline__ size_t nvfp4_swizzled_offset(size_t m, size_t k, size_t cols) {
  const size_t kt = (cols + 63) / 64;
  return (m / 128) * (kt * 512) + (k / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + k % 4;
}

}  // namespace moecomm
