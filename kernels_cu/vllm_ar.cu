// All-reduce reading every rank's registered input in place (moecomm.vllm_ar): no staging
// copy, the peers' input addresses come from a device table that may be filled after a
// CUDA graph captured the launch.
//
// allreduce_registered_{bf16,fp16,fp32}: on the all-reduce workspace's call sequence and
// two-shot flags (allreduce.cuh). Block b of every rank: (1) publishes stage-0 flag "my
// input is ready" to every peer and waits for theirs; (2) sums its vectors of every
// rank's input in rank order in fp32, canonically (-0.0 as +0.0), rounds once: the same
// bits as all_reduce; (3) publishes stage-1 flag "done reading" and waits for the peers',
// so no rank's next kernel overwrites an input a peer still reads. Every rank launches the
// same grid (block b pairs with block b).
#include "allreduce.cuh"

using namespace moecomm;
using namespace moecomm::allreduce;

namespace {

// Vector v of a peer's n-element input (full vectors bypass L1: the peer wrote them);
// lanes past the end read as +0.
template <typename T>
__device__ __forceinline__ Vec16 load_peer(const T* in, size_t v, size_t n) {
  constexpr int K = Pack16<T>::kLanes;
  if ((v + 1) * K <= n) return ld_vec16_cg(in + v * K);
  Pack16<T> p;
#pragma unroll
  for (int i = 0; i < K; ++i)
    p.lane[i] = v * K + i < n ? in[v * K + i] : from_float<T>(0.f);
  return p.vec;
}

template <typename T>
__device__ __forceinline__ void registered(const RegAllReduceArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const ArWorkspace& ws = a.ws;
  T* out = static_cast<T*>(a.out);
  const size_t nvec = (a.n + K - 1) / K;
  pdl_wait();
  const Call call = begin_call(ws);
  clear_previous<T>(ws, call);
  const WaitContext w = wait_context(ws, config::kErrAllreduceRegistered);
  const uint64_t value = flag_value(call, 0);
  signal_peers(ws, 0, value);
  bool ok = wait_peers(ws, 0, value, w);
  if (ok) {
    const T* src[kArMaxRanks];
    for (int s = 0; s < ws.world; ++s)
      src[s] = reinterpret_cast<const T*>(a.table[s] + a.offset);
    for (size_t v = global_thread_id(); v < nvec; v += global_thread_count()) {
      float acc[K];
      for (int s = 0; s < ws.world; ++s)
        accumulate<T>(acc, Lamport<T>::canonical(load_peer(src[s], v, a.n)), s == 0);
      store_output(out, v, a.n, round_pack<T>(acc));
    }
    signal_peers(ws, 1, value);
    ok = wait_peers(ws, 1, value, w);
  }
  pdl_launch_dependents();
  end_call(ws, call, 0);
}

}  // namespace

#define MOECOMM_REG_KERNEL(SUFFIX, T)                                                    \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      allreduce_registered_##SUFFIX(const RegAllReduceArgs a) {                          \
    registered<T>(a);                                                                    \
  }

MOECOMM_REG_KERNEL(bf16, __nv_bfloat16)
MOECOMM_REG_KERNEL(fp16, __half)
MOECOMM_REG_KERNEL(fp32, float)
