// Mixed communication (moecomm.mixed): all-reduce over TP groups, all-gather /
// reduce-scatter over DP groups and their combinations, as one kernel per call.
//
// mixed_oneshot_{bf16,fp16,fp32}: inside one node, on the all-reduce workspace's Lamport
//   protocol (allreduce.cuh): input block j is pushed into slot `rank` of the Lamport
//   buffer of every rank of push_mask[j] (at offset 0: a rank receives at most one block
//   from each source), then each output block polls and sums its sources in list order.
//   A call is a one-shot call of the workspace's call sequence: it clears the buffer the
//   previous call used and records the bytes it wrote, so it interleaves with all_reduce.
//   That protocol needs every rank to hear from every peer in every call (a rank must not
//   run two calls ahead of one it never waits for), so a peer that gets no data from this
//   rank gets a 16-byte token (+0.0) in its slot instead, and waits for it.
// mixed_reduce_{bf16,fp16,fp32}: the same sums over inputs NCCL gathered into `staged`.
//
// Both sum in fp32 in the listed order and round once; inputs are read canonically
// (-0.0 as +0.0), so every mode gives the same bits.
#include "allreduce.cuh"

using namespace moecomm;
using namespace moecomm::allreduce;

namespace {

__device__ __forceinline__ int source(const MixedArgs& a, uint32_t block, uint32_t k) {
  return (int)((a.src_rows[block] >> (4 * k)) & 0xF);
}

// Whether rank s is a source of any output block.
__device__ __forceinline__ bool is_source(const MixedArgs& a, int s) {
  for (uint32_t i = 0; i < a.out_blocks; ++i)
    for (uint32_t k = 0; k < a.src_count[i]; ++k)
      if (source(a, i, k) == s) return true;
  return false;
}

// Poll vector `p` of a Lamport slot until peer s wrote it; false if the wait gave up.
template <typename T>
__device__ __forceinline__ bool poll(const uint8_t* p, Vec16& x, int s, const WaitContext& w) {
  x = ld_vec16_volatile(p);
  return lamport_wait<T>(p, x, w, s);
}

template <typename T>
__device__ __forceinline__ void mixed_oneshot(const MixedArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const ArWorkspace& ws = a.ws;
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  const size_t uvec = a.unit / K;  // vectors per block
  const size_t tid = global_thread_id(), stride = global_thread_count();
  pdl_wait();
  const Call call = begin_call(ws);
  const int buf = call.index % 3;
  if (tid == 0) {
    uint32_t sent = 1u << ws.rank;
    for (uint32_t j = 0; j < a.in_blocks; ++j) sent |= a.push_mask[j];
    for (int r = 0; r < ws.world; ++r)
      if (!(sent >> r & 1u)) st_vec16(lamport(ws, r, buf, ws.rank), Vec16{});
  }
  for (uint32_t j = 0; j < a.in_blocks; ++j) {
    const uint32_t mask = a.push_mask[j] & ~(1u << ws.rank);
    if (mask == 0) continue;
    for (size_t v = tid; v < uvec; v += stride) {
      const Vec16 x = Lamport<T>::canonical(ld_vec16(in + j * a.unit + v * K));
      for (int i = 1; i < ws.world; ++i) {
        const int r = ws.rank + i < ws.world ? ws.rank + i : ws.rank + i - ws.world;
        if (mask >> r & 1u) st_vec16(lamport(ws, r, buf, ws.rank) + v * 16, x);
      }
    }
  }
  pdl_launch_dependents();
  clear_previous<T>(ws, call);
  const WaitContext w = wait_context(ws, config::kErrMixed);
  const T* own = in + (size_t)a.in_block * a.unit;
  bool ok = true;
  for (size_t t = tid; ok && t < a.out_blocks * uvec; t += stride) {
    const uint32_t i = (uint32_t)(t / uvec);
    const size_t v = t - i * uvec;
    float acc[K];
    for (uint32_t k = 0; k < a.src_count[i]; ++k) {
      const int s = source(a, i, k);
      Vec16 x;
      if (s == ws.rank) {
        x = Lamport<T>::canonical(ld_vec16(own + v * K));
      } else if (!(ok = poll<T>(lamport(ws, ws.rank, buf, s) + v * 16, x, s, w))) {
        break;
      }
      accumulate<T>(acc, x, k == 0);
    }
    if (ok) st_vec16(out + (size_t)i * a.unit + v * K, round_pack<T>(acc));
  }
  // Tokens of the peers that sent no data.
  if (ok && blockIdx.x == 0 && threadIdx.x < ws.world && threadIdx.x != ws.rank &&
      !is_source(a, threadIdx.x)) {
    Vec16 x;
    poll<T>(lamport(ws, ws.rank, buf, threadIdx.x), x, threadIdx.x, w);
  }
  end_call(ws, call, (uint32_t)(uvec * 16));
}

template <typename T>
__device__ __forceinline__ void mixed_reduce(const MixedArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const T* staged = static_cast<const T*>(a.staged) + (size_t)a.in_block * a.unit;
  T* out = static_cast<T*>(a.out);
  const size_t uvec = a.unit / K;
  pdl_wait();
  for (size_t t = global_thread_id(); t < a.out_blocks * uvec; t += global_thread_count()) {
    const uint32_t i = (uint32_t)(t / uvec);
    const size_t v = t - i * uvec;
    float acc[K];
    for (uint32_t k = 0; k < a.src_count[i]; ++k)
      accumulate<T>(acc,
                    Lamport<T>::canonical(
                        ld_vec16(staged + (size_t)source(a, i, k) * a.row_elems + v * K)),
                    k == 0);
    st_vec16(out + (size_t)i * a.unit + v * K, round_pack<T>(acc));
  }
  pdl_launch_dependents();
}

}  // namespace

#define MOECOMM_MIXED_KERNELS(SUFFIX, T)                                                 \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      mixed_oneshot_##SUFFIX(const MixedArgs a) {                                        \
    mixed_oneshot<T>(a);                                                                 \
  }                                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      mixed_reduce_##SUFFIX(const MixedArgs a) {                                         \
    mixed_reduce<T>(a);                                                                  \
  }

MOECOMM_MIXED_KERNELS(bf16, __nv_bfloat16)
MOECOMM_MIXED_KERNELS(fp16, __half)
MOECOMM_MIXED_KERNELS(fp32, float)
