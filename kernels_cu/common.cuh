// moecomm device helpers shared by every kernel source.
//
// - 16-byte vector loads/stores, plain and for memory other GPUs write (volatile, so the
//   value is re-read from memory and never served from L1);
// - bf16 / fp16 <-> fp32 conversion, the Lamport sentinel;
// - release/acquire on 32-bit flags, programmatic dependent launch;
// - a bounded spin-wait: it gives up after a timeout and records the rank it waited for
//   in an error word, so a dead peer never hangs a process;
// - block and thread-block-cluster reductions.
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

// Word i (0-3) of v.
__device__ __forceinline__ uint32_t word_of(const Vec16& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ Vec16 ld_vec16(const void* p) {
  return *reinterpret_cast<const Vec16*>(p);
}

__device__ __forceinline__ void st_vec16(void* p, const Vec16& v) {
  *reinterpret_cast<Vec16*>(p) = v;
}

// Brings the line of p into L2 (a hint: no value is returned, nothing is ordered).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
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

// Streams through L2 only: for data a peer wrote before a flag we acquired.
__device__ __forceinline__ Vec16 ld_vec16_cg(const void* p) {
  Vec16 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ---------------------------------------------------------------- division by an invariant
// floor(x / d) for 0 <= x <= max_x, d >= 1, without the ~20-instruction division sequence
// per use: umulhi(x, floor((2^32 - 1) / d) + 1) is exact whenever x * d <= 2^32 (for d a
// power of two the factor is 2^32 / d; otherwise the product overshoots x / d by less than
// x / 2^32 < 1 / d). d = 1 (the factor wraps to 0) gives x; where x * d may exceed 2^32,
// the plain quotient. One division when made, a multiply per use.
struct Divider {
  uint32_t d;
  uint32_t factor;
  bool exact;

  __device__ __forceinline__ Divider(uint32_t divisor, uint64_t max_x)
      : d(divisor), factor(0xFFFFFFFFu / divisor + 1u),
        exact(max_x * divisor <= (1ull << 32)) {}

  __device__ __forceinline__ uint32_t operator()(uint32_t x) const {
    if (factor == 0u) return x;
    return exact ? __umulhi(x, factor) : x / d;
  }
};

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

// A 16-byte vector seen as elements of T (8 x 16-bit or 4 x fp32).
template <typename T>
union Pack16 {
  static constexpr int kLanes = 16 / sizeof(T);
  Vec16 vec;
  T lane[kLanes];
};

// fp32 lanes rounded (RNE) to T and packed into one 16-byte vector.
template <typename T>
__device__ __forceinline__ Vec16 round_pack(const float (&acc)[Pack16<T>::kLanes]) {
  Pack16<T> p;
#pragma unroll
  for (int i = 0; i < Pack16<T>::kLanes; ++i) p.lane[i] = from_float<T>(acc[i]);
  return p.vec;
}

// ---------------------------------------------------------------- Lamport sentinel
// Lamport buffers hold -0.0 ("not yet written") until a peer's data lands; writers turn
// -0.0 into +0.0 so real data never looks unwritten. Checked on 32-bit words.
template <typename T>
struct Lamport {
  static constexpr uint32_t kWord = sizeof(T) == 2 ? 0x80008000u : 0x80000000u;

  static __device__ __forceinline__ bool word_pending(uint32_t w) {
    if (sizeof(T) == 2) return (w & 0xFFFFu) == 0x8000u || (w >> 16) == 0x8000u;
    return w == 0x80000000u;
  }
  static __device__ __forceinline__ bool pending(const Vec16& v) {
    return word_pending(v.x) | word_pending(v.y) | word_pending(v.z) | word_pending(v.w);
  }
  static __device__ __forceinline__ uint32_t word_canonical(uint32_t w) {
    if (sizeof(T) == 2) {
      if ((w & 0xFFFFu) == 0x8000u) w &= 0xFFFF0000u;
      if ((w >> 16) == 0x8000u) w &= 0x0000FFFFu;
      return w;
    }
    return w == 0x80000000u ? 0u : w;
  }
  static __device__ __forceinline__ Vec16 canonical(Vec16 v) {
    v.x = word_canonical(v.x);
    v.y = word_canonical(v.y);
    v.z = word_canonical(v.z);
    v.w = word_canonical(v.w);
    return v;
  }
  static __device__ __forceinline__ Vec16 sentinel() { return Vec16{kWord, kWord, kWord, kWord}; }
};

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

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_add_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// No value comes back, so the issuing thread does not wait for the round trip. The
// release costs the issuing warp a wait for every memory operation it has in flight.
__device__ __forceinline__ void red_add_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void red_add_relaxed_gpu(uint32_t* p, uint32_t v) {
  asm volatile("red.relaxed.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Four words at once (p 16-byte aligned); no later memory operation of the thread passes it.
__device__ __forceinline__ Vec16 ld_acquire_gpu_v4(const uint32_t* p) {
  Vec16 v;
  asm volatile("ld.acquire.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// Returns the old value; acquires what earlier adds released (a release sequence).
__device__ __forceinline__ uint32_t atom_add_acq_rel_gpu(uint32_t* p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t ld_acquire_gpu(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_gpu(uint64_t* p, uint64_t v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// ---------------------------------------------------------------- asynchronous copies
// cp.async (sm_80+): 16 bytes from global (or a peer's) memory into shared memory without
// a register; `src_bytes` 0 writes 16 zero bytes and reads nothing. Bytes in flight then
// cost shared memory, not registers. A thread's copies land in commit groups, in order.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                   (uint32_t)__cvta_generic_to_shared(smem)),
               "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Returns once at most N of this thread's commit groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------- grid arrival
// A kernel whose block 0 updates local state words at its end, that every block reads at
// its start: each block, once all its threads have read them, arrives (a reduction that
// returns nothing, so no thread waits), and block 0 updates only when every block has
// arrived. No fence: the next kernel of the stream sees the update at the kernel boundary.
// grid_arrive: `thread` arrives for the block with a release, which holds its warp until
// that warp's memory operations in flight are done.
__device__ __forceinline__ void grid_arrive(uint32_t* arrived, unsigned thread = 0) {
  __syncthreads();
  if (threadIdx.x == thread) red_add_release_gpu(arrived, 1u);
}

// The same for state words that fit one 16-byte vector (`words`, 16-byte aligned): thread
// 0 reads them with one acquire load, so its arrival, a relaxed reduction, cannot pass
// the read and holds no warp; the block gets the words through shared memory (`slot`).
__device__ __forceinline__ Vec16 grid_read_and_arrive(const uint32_t* words, uint32_t* arrived,
                                                      Vec16& slot) {
  if (threadIdx.x == 0) slot = ld_acquire_gpu_v4(words);
  __syncthreads();
  if (threadIdx.x == 0) red_add_relaxed_gpu(arrived, 1u);
  return slot;
}

__device__ __forceinline__ Vec16 grid_read_and_arrive(const uint32_t* words, uint32_t* arrived) {
  __shared__ Vec16 slot;
  return grid_read_and_arrive(words, arrived, slot);
}

// Block 0, thread 0, at its end: waits until every block has arrived, resets the count
// and returns true; every other thread returns false at once.
__device__ __forceinline__ bool grid_all_arrived(uint32_t* arrived) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return false;
  while (ld_acquire_gpu(arrived) < gridDim.x) {
  }
  *arrived = 0;
  return true;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---------------------------------------------------------------- programmatic launch
// A kernel launched with programmatic stream serialization (moecomm.launch, pdl=True) may
// start while the previous kernel of its stream still runs: pdl_wait() returns once that
// kernel has completed and its memory is visible; nothing it writes may be touched
// before. pdl_launch_dependents() lets the next kernel of the stream begin launching.
// Both are no-ops without the launch attribute and before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------- bounded waits
// Every op that waits for peers owns two words: `error_word`, in mapped host memory, that
// the host reads (bits 0..15 = 1 + the rank that never arrived, bits 16..31 = the op's
// error code; the first failure wins), and `abort`, in device memory, raised with it so
// that every other waiter of the op gives up too. Waiters poll only `abort`: thousands of
// spinning warps reading host memory over PCIe would stall the GPU (and any late peer).
struct WaitContext {
  uint32_t* error_word;  // mapped host memory
  uint32_t* abort;       // device memory, 0 while healthy
  uint64_t timeout_ns;   // 0 = wait forever
  uint32_t code;         // the op's error code (moecomm.constants.ErrorCode)
};

__device__ __forceinline__ void record_timeout(const WaitContext& w, int peer) {
  atomicCAS(w.error_word, 0u, (w.code << 16) | (uint32_t)(peer + 1));
  *(volatile uint32_t*)w.abort = 1u;
}

// Bookkeeping of one bounded spin-wait: give_up() is cheap on most iterations; every
// 256th it reads the clock and the abort word. True when the wait must end: the timeout
// passed (recorded as `peer` never arriving) or another waiter already gave up.
struct SpinTimer {
  uint64_t start = 0;
  uint32_t spin = 0;

  __device__ __forceinline__ bool give_up(const WaitContext& w, int peer) {
    if ((++spin & 255u) != 0u) return false;
    if (*(const volatile uint32_t*)w.abort != 0u) return true;
    const uint64_t now = global_timer_ns();
    if (start == 0) {
      start = now;
    } else if (w.timeout_ns != 0 && now - start > w.timeout_ns) {
      record_timeout(w, peer);
      return true;
    }
    return false;
  }
};

// Spins until *flag is in [target, target + window) (modulo 2^32 or 2^64: U is uint32_t
// or uint64_t), acquire at system scope. A ">=" compare would take a value 2^31 behind
// for one ahead; no value outside the window is ever taken for the target's. The 64-bit
// flags serve slots that not every call writes (a block past a smaller call's grid),
// whose value may be any number of calls old: they carry the 32-bit call number in their
// high word (flag_value in allreduce.cuh and collectives.cu), so a stale value passes
// only when its call number is this call's or the next one's, 2^32 calls later.
// False when the wait gave up (see SpinTimer).
template <typename U>
__device__ __forceinline__ bool wait_flag_in(const U* flag, U target, U window,
                                             const WaitContext& w, int peer) {
  SpinTimer timer;
  while (ld_acquire_sys(flag) - target >= window) {
    if (timer.give_up(w, peer)) return false;
  }
  return true;
}

// Spins until *flag >= target (wrapping compare: within 2^31 ahead), for counters every
// call advances. False when the wait gave up.
__device__ __forceinline__ bool wait_flag_geq(const uint32_t* flag, uint32_t target,
                                              const WaitContext& w, int peer) {
  return wait_flag_in<uint32_t>(flag, target, 1u << 31, w, peer);
}

// Re-polls the Lamport vector at p (x: its value as last loaded) until no word of it is
// pending, i.e. peer `peer` wrote it. False when the wait gave up (see SpinTimer).
template <typename T>
__device__ __forceinline__ bool lamport_wait(const uint8_t* p, Vec16& x, const WaitContext& w,
                                             int peer) {
  SpinTimer timer;
  while (Lamport<T>::pending(x)) {
    if (timer.give_up(w, peer)) return false;
    x = ld_vec16_volatile(p);
  }
  return true;
}

// ---------------------------------------------------------------- block reductions
// Sum / max of one float per thread over the whole block (every thread gets the result;
// the max is of non-negative values, such as an amax: 0 is its identity).
// All threads of the block must call; blockDim.x a multiple of 32, at most 1024.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v) {
  __shared__ float partial[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x / 32) ? partial[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  return v;
}


// ---------------------------------------------------------------- thread block clusters
// Where this block stands among thread block clusters (sm_90+): its rank in its cluster,
// the cluster's size, the cluster's index in the grid and the grid's number of clusters.
// A launch without clusters, and any earlier arch, has clusters of one block.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOECOMM_SPECIAL_REGISTER(NAME, REGISTER, ELSEWHERE)        \
  __device__ __forceinline__ uint32_t NAME() {                      \
    uint32_t v;                                                     \
    asm("mov.u32 %0, %%" REGISTER ";" : "=r"(v));                   \
    return v;                                                       \
  }
#else
#define MOECOMM_SPECIAL_REGISTER(NAME, REGISTER, ELSEWHERE) \
  __device__ __forceinline__ uint32_t NAME() { return ELSEWHERE; }
#endif
MOECOMM_SPECIAL_REGISTER(cluster_rank, "cluster_ctarank", 0)
MOECOMM_SPECIAL_REGISTER(cluster_size, "cluster_nctarank", 1)
MOECOMM_SPECIAL_REGISTER(cluster_id, "clusterid.x", blockIdx.x)
MOECOMM_SPECIAL_REGISTER(cluster_count, "nclusterid.x", gridDim.x)
#undef MOECOMM_SPECIAL_REGISTER

// Sum / max of one float per thread over every block of the cluster: each block's value
// (block_reduce), then the blocks' values in cluster-rank order, read from their shared
// memory. Every thread of every block of the cluster must call; all get the result.
template <bool kMax>
__device__ __forceinline__ float cluster_reduce(float v) {
  v = block_reduce<kMax>(v);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t n = cluster_size();
  if (n > 1) {
    __shared__ float s_value;
    if (threadIdx.x == 0) s_value = v;
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    const uint32_t local = (uint32_t)__cvta_generic_to_shared(&s_value);
    for (uint32_t r = 0; r < n; ++r) {
      uint32_t remote;
      float x;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(r));
      asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(x) : "r"(remote) : "memory");
      v = r == 0 ? x : (kMax ? fmaxf(v, x) : v + x);
    }
    // Nobody may overwrite s_value (next row) before every block has read it.
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  }
#endif
  return v;
}

__device__ __forceinline__ size_t global_thread_id() {
  return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ size_t global_thread_count() {
  return (size_t)gridDim.x * blockDim.x;
}

// dst[i] = src[i] for nvec 16-byte vectors, the grid sharing them (or threads first,
// first + stride, ...: a part of them), four loads in flight per thread before the first
// store.
__device__ __forceinline__ void copy_vec16(uint8_t* dst, const uint8_t* src, size_t nvec,
                                           size_t first = global_thread_id(),
                                           size_t stride = global_thread_count()) {
  size_t i = first;
  for (; i + 3 * stride < nvec; i += 4 * stride) {
    const Vec16 a = ld_vec16(src + 16 * i), b = ld_vec16(src + 16 * (i + stride));
    const Vec16 c = ld_vec16(src + 16 * (i + 2 * stride));
    const Vec16 d = ld_vec16(src + 16 * (i + 3 * stride));
    st_vec16(dst + 16 * i, a);
    st_vec16(dst + 16 * (i + stride), b);
    st_vec16(dst + 16 * (i + 2 * stride), c);
    st_vec16(dst + 16 * (i + 3 * stride), d);
  }
  for (; i < nvec; i += stride) st_vec16(dst + 16 * i, ld_vec16(src + 16 * i));
}

}  // namespace moecomm
