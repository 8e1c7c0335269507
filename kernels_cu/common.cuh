// moecomm device helpers shared by every kernel source.
//
// - 16-byte vector loads/stores, plain and for memory other GPUs write (volatile, so the
//   value is re-read from memory and never served from L1);
// - bf16 / fp16 <-> fp32 conversion;
// - system-scope release/acquire on 32-bit flags;
// - a bounded spin-wait: it gives up after a timeout and records the rank it waited for
//   in an error word, so a dead peer never hangs a process.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC_RTC__)
// NVRTC has no C library headers: the fixed-width types, spelled out.
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>
#endif

namespace moecomm {

// ---------------------------------------------------------------- vector memory access
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};

__device__ __forceinline__ Vec16 ld_vec16(const void* p) {
  return *reinterpret_cast<const Vec16*>(p);
}

__device__ __forceinline__ void st_vec16(void* p, const Vec16& v) {
  *reinterpret_cast<Vec16*>(p) = v;
}

// Loads memory that a peer writes while we poll it: bypasses L1, sees the latest value.
__device__ __forceinline__ Vec16 ld_vec16_volatile(const void* p) {
  Vec16 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ void st_vec16_volatile(void* p, const Vec16& v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// ---------------------------------------------------------------- element conversion
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Convert<T>::to_float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Convert<T>::from_float(v);
}

// ---------------------------------------------------------------- system-scope ordering
// Flags live in memory that other GPUs read and write (CUDA IPC), so ordering must hold
// at system scope, not only within this GPU.
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t atomic_add_release_sys(uint32_t* p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.add.release.sys.global.u32 %0, [%1], %2;"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ void fence_acq_rel_sys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---------------------------------------------------------------- bounded waits
// Error word layout (uint32, zero means no error): bits 0..15 = 1 + the rank that never
// arrived, bits 16..31 = the op's error code. The first failure wins (atomicCAS), the
// host reads the word and raises naming the rank.
__device__ __forceinline__ void record_timeout(uint32_t* error_word, int peer, uint32_t code) {
  if (error_word != nullptr) {
    atomicCAS(error_word, 0u, (code << 16) | (uint32_t)(peer + 1));
  }
}

// Spins until *flag >= target (wrapping compare), acquire at system scope. Returns false
// after timeout_ns (0 = wait forever) or when another thread already recorded an error,
// so one timeout ends every waiter of the launch quickly.
__device__ __forceinline__ bool wait_flag_geq(const uint32_t* flag, uint32_t target,
                                              uint64_t timeout_ns, int peer,
                                              uint32_t* error_word, uint32_t code) {
  uint64_t start = 0;
  for (uint32_t spin = 0;; ++spin) {
    if ((int32_t)(ld_acquire_sys(flag) - target) >= 0) return true;
    if ((spin & 1023u) == 1023u) {
      if (error_word != nullptr && *(volatile uint32_t*)error_word != 0u) return false;
      uint64_t now = global_timer_ns();
      if (start == 0) {
        start = now;
      } else if (timeout_ns != 0 && now - start > timeout_ns) {
        record_timeout(error_word, peer, code);
        return false;
      }
    }
  }
}

__device__ __forceinline__ size_t global_thread_id() {
  return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ size_t global_thread_count() {
  return (size_t)gridDim.x * blockDim.x;
}

}  // namespace moecomm
