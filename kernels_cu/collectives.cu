// Variable-size collectives over CUDA IPC: all_gatherv and reduce_scatterv, one kernel per
// call (moecomm.collectives), and the local stacked reduction of their NCCL path.
//
// Workspace (one SymmetricBuffer per rank): flags u32 [kVcMaxBlocks][kVcMaxRanks] at offset
// 0, then two data buffers of buffer_bytes; call k uses buffer k % 2. State words (local):
// the call counter, the grid-arrival count, the abort word of the bounded waits.
//
// Protocol of call k, block b (every rank launches the same grid: it depends only on the
// row counts, which are the same on every rank):
//  1. push: b copies its chunk of every segment this rank sends into the peers' buffer
//     k % 2 (and, for all_gatherv, its chunk of the own rows straight into the output);
//  2. signal: after a block barrier, flag[b][rank] = k + 1 at every peer (release, system
//     scope: the barrier makes the whole block's writes part of it);
//  3. wait until flag[b][s] >= k + 1 in the own buffer for every peer s (bounded);
//  4. pull: b copies (all_gatherv) or sums in rank order (reduce_scatterv) its chunk of
//     every segment it received, from its own buffer k % 2.
// A segment of n bytes is cut into chunks of ceil(n / grid) rounded up to 16 bytes; chunk b
// belongs to block b on the sending and on the receiving rank alike, so one flag per
// (block, source) orders exactly the bytes that block reads.
// Reuse of buffer k % 2 by call k + 2 is safe: a rank enters call k + 2 after its call
// k + 1 waited for every peer's flag k + 2 of that call, which a peer raises only after
// pdl_wait(), i.e. once its call k (the last reader of buffer k % 2) has completed.
#include "allreduce.cuh"  // allreduce::accumulate: the rank-order fp32 sum of 16-byte vectors

using namespace moecomm;
using allreduce::accumulate;

namespace {

constexpr int kStateCall = 0;
constexpr int kStateArrived = 1;
constexpr int kStateAbort = 2;
constexpr int kUnroll = 4;

__device__ __forceinline__ uint8_t* data(const VcWorkspace& ws, int r, uint32_t call) {
  return reinterpret_cast<uint8_t*>(ws.peers[r]) + ws.data_off + (size_t)(call & 1u) * ws.buffer_bytes;
}

__device__ __forceinline__ uint32_t* flag(const VcWorkspace& ws, int r, int b, int s) {
  return reinterpret_cast<uint32_t*>(ws.peers[r]) + (size_t)b * config::kVcMaxRanks + s;
}

// Bytes [lo, hi) of a segment of n bytes that this block moves.
__device__ __forceinline__ void chunk(uint64_t n, uint64_t& lo, uint64_t& hi) {
  const uint64_t c = ((n + gridDim.x - 1) / gridDim.x + 15) & ~(uint64_t)15;
  lo = min(n, (uint64_t)blockIdx.x * c);
  hi = min(n, lo + c);
}

// The block copies n bytes from src to each of dst[0..ndst): 16-byte vectors (kUnroll
// loads in flight per thread) when every address and n are multiples of 16, else 4-byte
// words when they are multiples of 4, else bytes. kPeer: src is memory a peer wrote
// (read through L2 only).
template <bool kPeer>
__device__ __forceinline__ void block_copy(uint8_t* const* dst, int ndst, const uint8_t* src,
                                           uint64_t n) {
  if (n == 0) return;
  uintptr_t align = (uintptr_t)src | (uintptr_t)n;
  for (int d = 0; d < ndst; ++d) align |= (uintptr_t)dst[d];
  if ((align & 15) == 0) {
    const uint64_t nvec = n / 16;
    for (uint64_t v0 = threadIdx.x; v0 < nvec; v0 += kUnroll * blockDim.x) {
      Vec16 x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint64_t v = v0 + u * blockDim.x;
        if (v < nvec) x[u] = kPeer ? ld_vec16_cg(src + v * 16) : ld_vec16(src + v * 16);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint64_t v = v0 + u * blockDim.x;
        if (v < nvec)
          for (int d = 0; d < ndst; ++d) st_vec16(dst[d] + v * 16, x[u]);
      }
    }
  } else if ((align & 3) == 0) {
    for (uint64_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
      const uint32_t x = kPeer ? *(const volatile uint32_t*)(src + 4 * i)
                               : *(const uint32_t*)(src + 4 * i);
      for (int d = 0; d < ndst; ++d) *(uint32_t*)(dst[d] + 4 * i) = x;
    }
  } else {
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint8_t x = kPeer ? *(const volatile uint8_t*)(src + i) : src[i];
      for (int d = 0; d < ndst; ++d) dst[d][i] = x;
    }
  }
}

__device__ __forceinline__ WaitContext wait_context(const VcWorkspace& ws, uint32_t code) {
  return WaitContext{ws.error_word, ws.state + kStateAbort, ws.timeout_ns, code};
}

// Step 2 of the protocol.
__device__ __forceinline__ void signal_peers(const VcWorkspace& ws, uint32_t value) {
  __syncthreads();
  if (threadIdx.x < ws.world && threadIdx.x != ws.rank)
    st_release_sys(flag(ws, threadIdx.x, blockIdx.x, ws.rank), value);
}

// Step 3: block-uniform; false if a wait gave up.
__device__ __forceinline__ bool wait_peers(const VcWorkspace& ws, uint32_t value,
                                           const WaitContext& w) {
  bool ok = true;
  if (threadIdx.x < ws.world && threadIdx.x != ws.rank)
    ok = wait_flag_geq(flag(ws, ws.rank, blockIdx.x, threadIdx.x), value, w, threadIdx.x);
  return __syncthreads_and(ok);
}

__device__ __forceinline__ uint32_t begin_call(const VcWorkspace& ws) {
  const uint32_t k = *(volatile const uint32_t*)&ws.state[kStateCall];
  grid_arrive(&ws.state[kStateArrived]);
  return k;
}

__device__ __forceinline__ void end_call(const VcWorkspace& ws, uint32_t k) {
  if (grid_all_arrived(&ws.state[kStateArrived])) ws.state[kStateCall] = k + 1;
}

}  // namespace

// all_gatherv: tensor i of rank s lands at rows [row0(s), row0(s) + rows[s]) of dst[i] on
// every rank. A data buffer mirrors the outputs: tensor i's region (region_off[i]) holds
// [sum(rows), row_bytes[i]] bytes, so a row sits at the same offset in both.
extern "C" __global__ void __launch_bounds__(1024) vc_all_gatherv(const AllGathervArgs a) {
  const VcWorkspace& ws = a.ws;
  pdl_wait();
  const uint32_t k = begin_call(ws);
  int64_t own_row0 = 0;
  for (int s = 0; s < ws.rank; ++s) own_row0 += a.rows[s];
  for (int i = 0; i < a.num_tensors; ++i) {
    const uint64_t rb = a.row_bytes[i], off = (uint64_t)own_row0 * rb;
    uint64_t lo, hi;
    chunk((uint64_t)a.rows[ws.rank] * rb, lo, hi);
    uint8_t* dst[config::kVcMaxRanks];
    dst[0] = reinterpret_cast<uint8_t*>(a.dst[i]) + off + lo;
    for (int q = 1; q < ws.world; ++q) {
      const int p = ws.rank + q < ws.world ? ws.rank + q : ws.rank + q - ws.world;
      dst[q] = data(ws, p, k) + a.region_off[i] + off + lo;
    }
    block_copy<false>(dst, ws.world, reinterpret_cast<const uint8_t*>(a.src[i]) + lo, hi - lo);
  }
  signal_peers(ws, k + 1);
  pdl_launch_dependents();
  const WaitContext w = wait_context(ws, config::kErrAllGatherv);
  if (wait_peers(ws, k + 1, w)) {
    const uint8_t* buf = data(ws, ws.rank, k);
    int64_t row0 = 0;
    for (int s = 0; s < ws.world; row0 += a.rows[s], ++s) {
      if (s == ws.rank) continue;
      for (int i = 0; i < a.num_tensors; ++i) {
        const uint64_t rb = a.row_bytes[i], off = (uint64_t)row0 * rb;
        uint64_t lo, hi;
        chunk((uint64_t)a.rows[s] * rb, lo, hi);
        uint8_t* dst = reinterpret_cast<uint8_t*>(a.dst[i]) + off + lo;
        block_copy<true>(&dst, 1, buf + a.region_off[i] + off + lo, hi - lo);
      }
    }
  }
  end_call(ws, k);
}

// reduce_scatterv: rank p's rows of every rank's input go to slot `rank` of p's buffer
// ([world][rows[p] * row_bytes]); rank r sums its slots (its own rows read from `in`) in
// rank order 0, 1, ... in fp32, starting from +0, and rounds once.
template <typename T>
__device__ __forceinline__ void reduce_scatterv(const ReduceScattervArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const VcWorkspace& ws = a.ws;
  const uint8_t* in = static_cast<const uint8_t*>(a.in);
  pdl_wait();
  const uint32_t k = begin_call(ws);
  int64_t row0[config::kVcMaxRanks];
  int64_t r0 = 0;
  for (int s = 0; s < ws.world; ++s) {
    row0[s] = r0;
    r0 += a.rows[s];
  }
  for (int q = 1; q < ws.world; ++q) {
    const int p = ws.rank + q < ws.world ? ws.rank + q : ws.rank + q - ws.world;
    const uint64_t n = (uint64_t)a.rows[p] * a.row_bytes;
    uint64_t lo, hi;
    chunk(n, lo, hi);
    uint8_t* dst = data(ws, p, k) + (uint64_t)ws.rank * n + lo;
    block_copy<false>(&dst, 1, in + (uint64_t)row0[p] * a.row_bytes + lo, hi - lo);
  }
  signal_peers(ws, k + 1);
  pdl_launch_dependents();
  const WaitContext w = wait_context(ws, config::kErrReduceScatterv);
  if (wait_peers(ws, k + 1, w)) {
    const uint64_t n = (uint64_t)a.rows[ws.rank] * a.row_bytes;
    uint64_t lo, hi;
    chunk(n, lo, hi);
    const uint8_t* own = in + (uint64_t)row0[ws.rank] * a.row_bytes;
    const uint8_t* buf = data(ws, ws.rank, k);
    uint8_t* out = static_cast<uint8_t*>(a.out);
    for (uint64_t off = lo + 16 * threadIdx.x; off < hi; off += 16 * blockDim.x) {
      float acc[K] = {};
      for (int s = 0; s < ws.world; ++s)
        accumulate<T>(acc, s == ws.rank ? ld_vec16(own + off) : ld_vec16_cg(buf + s * n + off),
                      false);
      st_vec16(out + off, round_pack<T>(acc));
    }
  }
  end_call(ws, k);
}

template <typename T>
__device__ __forceinline__ void stack_reduce(const StackReduceArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const uint8_t* in = static_cast<const uint8_t*>(a.in);
  uint8_t* out = static_cast<uint8_t*>(a.out);
  pdl_wait();
  for (size_t v = global_thread_id(); v < (size_t)a.nvec; v += global_thread_count()) {
    float acc[K] = {};
    for (int64_t s = 0; s < a.slots; ++s)
      accumulate<T>(acc, ld_vec16(in + ((size_t)s * a.nvec + v) * 16), false);
    st_vec16(out + v * 16, round_pack<T>(acc));
  }
  pdl_launch_dependents();
}

#define MOECOMM_VC_KERNELS(SUFFIX, T)                                                    \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      vc_reduce_scatterv_##SUFFIX(const ReduceScattervArgs a) {                          \
    reduce_scatterv<T>(a);                                                               \
  }                                                                                      \
  extern "C" __global__ void vc_stack_reduce_##SUFFIX(const StackReduceArgs a) {         \
    stack_reduce<T>(a);                                                                  \
  }

MOECOMM_VC_KERNELS(bf16, __nv_bfloat16)
MOECOMM_VC_KERNELS(fp16, __half)
MOECOMM_VC_KERNELS(fp32, float)
