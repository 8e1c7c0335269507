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
// -0 and of tiny negatives is kept; NaN -> 0x7.
__device__ __forceinline__ uint32_t e2m1_encode(float x) {
  const float a = fabsf(x);
  uint32_t code;
  if (!(a == a)) return 0x7u;
  if (a <= 0.25f) code = 0;
  else if (a < 0.75f) code = 1;
  else if (a <= 1.25f) code = 2;
  else if (a < 1.75f) code = 3;
  else if (a <= 2.5f) code = 4;
  else if (a < 3.5f) code = 5;
  else if (a <= 5.f) code = 6;
  else code = 7;
  return code | ((__float_as_uint(x) >> 28) & 0x8u);
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
