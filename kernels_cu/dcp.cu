// Decode context-parallel all-to-all and the LSE combine that follows it (moecomm.dcp).
//
// dcp_alltoall_{bf16,fp16}: one kernel, no barrier. It reuses the all-reduce's Lamport
// protocol (allreduce.cuh): three rotating buffers [3][cp][lamport_slot] per rank, slot s
// written only by rank s, every word holding the fp32 -0.0 pattern 0x80000000 ("not yet
// written") between uses; a device call counter picks the buffer, and each call refills
// with the sentinel the slots its peers wrote two calls ago.
//
// A row of the message to one peer is its partial output (D * sizeof(T) bytes, o_vecs
// 16-byte vectors) followed by its S fp32 stats padded with +0.0 to whole vectors. A
// vector is still unwritten while any 32-bit word of it is pending: for output vectors, a
// word with a 16-bit half 0x8000 (the sentinel word's high half is one), for stats vectors
// the word 0x80000000. Writers turn -0.0 into +0.0, so real data never looks unwritten:
// the exchange is bitwise except that -0.0 arrives as +0.0.
//
// A thread handles the same vectors of the space (row, peer, vector) when pushing and when
// receiving (kUnroll of them in flight), so the own slice is copied straight to the output
// (canonical too: every -0.0 arrives as +0.0, the own slice's included) and the outputs
// may be the inputs (in place).
//
// dcp_combine_{bf16,fp16}: out[r] = sum_p w_p o[r, p] / sum_p w_p in fp32, peers in order,
// w_p = exp(lse_p - max lse) (exp2 for base-2 LSE); a partial with a non-finite LSE has
// weight 0; with none finite the output is 0 and the LSE -inf. One thread per 16-byte
// output vector; each computes its row's weights.
#include "allreduce.cuh"

using namespace moecomm;
using namespace moecomm::allreduce;

namespace {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Vector j of row rp (= row * cp + peer) of the inputs: output lanes, or stats + padding.
template <typename T>
__device__ __forceinline__ Vec16 load_slice(const DcpArgs& a, size_t rp, uint32_t j) {
  if (j < a.o_vecs) return ld_vec16(static_cast<const uint8_t*>(a.o_in) + (rp * a.o_vecs + j) * 16);
  const uint32_t k = 4 * (j - a.o_vecs);
  const float* s = a.stats_in + rp * a.stats_dim + k;
  Pack16<float> p;
#pragma unroll
  for (int l = 0; l < 4; ++l) p.lane[l] = k + l < a.stats_dim ? s[l] : 0.f;
  return p.vec;
}

template <typename T>
__device__ __forceinline__ void store_slice(const DcpArgs& a, size_t rp, uint32_t j,
                                            const Vec16& x) {
  if (j < a.o_vecs) {
    st_vec16(static_cast<uint8_t*>(a.o_out) + (rp * a.o_vecs + j) * 16, x);
    return;
  }
  const uint32_t k = 4 * (j - a.o_vecs);
  float* s = a.stats_out + rp * a.stats_dim + k;
  Pack16<float> p;
  p.vec = x;
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (k + l < a.stats_dim) s[l] = p.lane[l];
}

template <typename T>
__device__ __forceinline__ bool pending(const DcpArgs& a, uint32_t j, const Vec16& x) {
  return j < a.o_vecs ? Lamport<T>::pending(x) : Lamport<float>::pending(x);
}

template <typename T>
__device__ __forceinline__ Vec16 canonical(const DcpArgs& a, uint32_t j, const Vec16& x) {
  return j < a.o_vecs ? Lamport<T>::canonical(x) : Lamport<float>::canonical(x);
}

constexpr int kUnroll = 4;  // vectors a thread has in flight

// Vector i of the space (row, peer, j): its row of the inputs/outputs rp = row * cp + peer,
// and where it lives in a Lamport slot.
struct Item {
  size_t rp;
  uint32_t j;
  int peer;
  size_t slot_off;  // bytes into the slot
};

__device__ __forceinline__ Item item(const DcpArgs& a, size_t i) {
  const uint32_t rv = a.row_vecs;
  const size_t rp = i / rv;
  const uint32_t j = (uint32_t)(i - rp * rv);
  const int cp = a.ws.world;
  const size_t row = rp / cp;
  return Item{rp, j, (int)(rp - row * cp), (row * rv + j) * 16};
}

template <typename T>
__device__ __forceinline__ void alltoall(const DcpArgs& a) {
  const ArWorkspace& ws = a.ws;
  const int rank = ws.rank;
  const size_t n = a.rows * ws.world * a.row_vecs;
  const size_t tid = global_thread_id(), stride = global_thread_count();
  pdl_wait();
  const Call call = begin_call(ws);
  const int buf = call.index % 3;
  for (size_t i0 = tid; i0 < n; i0 += kUnroll * stride) {
    Vec16 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = i0 + u * stride;
      if (i < n) {
        const Item it = item(a, i);
        x[u] = load_slice<T>(a, it.rp, it.j);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = i0 + u * stride;
      if (i >= n) continue;
      const Item it = item(a, i);
      // The own slice goes straight to the output, canonical like every peer's (-0.0 as
      // +0.0), so a rank's output does not depend on which slice is its own.
      const Vec16 v = canonical<T>(a, it.j, x[u]);
      if (it.peer == rank)
        store_slice<T>(a, it.rp, it.j, v);
      else
        st_vec16(lamport(ws, it.peer, buf, rank) + it.slot_off, v);
    }
  }
  pdl_launch_dependents();
  clear_previous<float>(ws, call);  // uniform 0x80000000 words
  const WaitContext w = wait_context(ws, config::kErrDcpAlltoall);
  bool ok = true;
  for (size_t i0 = tid; ok && i0 < n; i0 += kUnroll * stride) {
    Vec16 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = i0 + u * stride;
      if (i >= n) continue;
      const Item it = item(a, i);
      if (it.peer != rank) x[u] = ld_vec16_volatile(lamport(ws, rank, buf, it.peer) + it.slot_off);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = i0 + u * stride;
      if (!ok || i >= n) continue;
      const Item it = item(a, i);
      if (it.peer == rank) continue;
      const uint8_t* src = lamport(ws, rank, buf, it.peer) + it.slot_off;
      SpinTimer timer;
      while (pending<T>(a, it.j, x[u])) {
        if (timer.give_up(w, it.peer)) {
          ok = false;
          break;
        }
        x[u] = ld_vec16_volatile(src);
      }
      if (ok) store_slice<T>(a, it.rp, it.j, x[u]);
    }
  }
  end_call(ws, call, (uint32_t)(a.rows * a.row_vecs * 16));
}

// The LSE of one partial's stats; not finite when the partial has no weight.
__device__ __forceinline__ float partial_lse(const float* st, uint32_t format) {
  if (format == kStatsMaxSumexp) return st[0] + logf(st[1]);  // log(0) = -inf, log(<0) = NaN
  return st[0];
}

template <typename T>
__device__ __forceinline__ void combine(const DcpCombineArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const size_t n = a.rows * a.o_vecs;
  const bool base2 = a.format == kStatsLseBase2;
  pdl_wait();
  for (size_t i = global_thread_id(); i < n; i += global_thread_count()) {
    const size_t row = i / a.o_vecs;
    const uint32_t j = (uint32_t)(i % a.o_vecs);
    const float* st = a.stats + row * a.cp * a.stats_dim;
    float m = neg_inf();
    for (uint32_t p = 0; p < a.cp; ++p) {
      const float l = partial_lse(st + p * a.stats_dim, a.format);
      if (isfinite(l)) m = fmaxf(m, l);
    }
    float acc[K];
#pragma unroll
    for (int l = 0; l < K; ++l) acc[l] = 0.f;
    float wsum = 0.f;
    if (m != neg_inf()) {
      const uint8_t* o = static_cast<const uint8_t*>(a.o) + (row * a.cp * a.o_vecs + j) * 16;
      for (uint32_t p = 0; p < a.cp; ++p) {
        const float l = partial_lse(st + p * a.stats_dim, a.format);
        if (!isfinite(l)) continue;
        const float wp = base2 ? exp2f(l - m) : expf(l - m);
        wsum += wp;
        Pack16<T> x;
        x.vec = ld_vec16(o + (size_t)p * a.o_vecs * 16);
#pragma unroll
        for (int q = 0; q < K; ++q) acc[q] += wp * to_float(x.lane[q]);
      }
#pragma unroll
      for (int q = 0; q < K; ++q) acc[q] = acc[q] / wsum;
    }
    st_vec16(static_cast<uint8_t*>(a.out) + i * 16, round_pack<T>(acc));
    if (a.lse_out != nullptr && j == 0)
      a.lse_out[row] = m == neg_inf() ? neg_inf() : m + (base2 ? log2f(wsum) : logf(wsum));
  }
  pdl_launch_dependents();
}

}  // namespace

#define MOECOMM_DCP_KERNELS(SUFFIX, T)                                                   \
  extern "C" __global__ void __launch_bounds__(1024) dcp_alltoall_##SUFFIX(const DcpArgs a) { \
    alltoall<T>(a);                                                                      \
  }                                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      dcp_combine_##SUFFIX(const DcpCombineArgs a) {                                     \
    combine<T>(a);                                                                       \
  }

MOECOMM_DCP_KERNELS(bf16, __nv_bfloat16)
MOECOMM_DCP_KERNELS(fp16, __half)
