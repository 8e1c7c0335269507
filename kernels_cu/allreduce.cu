// Custom all-reduce over CUDA IPC: Lamport one-shot (for large messages with its SMs split
// into pushers and reducers) and pipelined two-shot (protocol: allreduce.cuh). Kernels
// allreduce_{oneshot,oneshot_split,twoshot,twoshot_ce}_{bf16,fp16,fp32} and fill_words take
// one argument struct (args.cuh).
#include "allreduce.cuh"

using namespace moecomm;
using namespace moecomm::allreduce;

namespace {

constexpr int kUnroll = 4;  // 16-byte vectors a thread has in flight in the copy loops
constexpr int kReduceUnroll = 4;  // vectors a split one-shot reducer takes at once
constexpr int kReduceGroup = 2;   // ranks' vectors a two-shot reducer loads at once

// One-shot: every thread pushes its vectors into slot `rank` of every peer's Lamport
// buffer, clears its share of the previous buffer, then polls its vectors' peer slots and
// sums them with its own input in rank order.
template <typename T>
__device__ __forceinline__ void oneshot(const AllReduceArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const ArWorkspace& ws = a.ws;
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  const size_t nvec = (a.n + K - 1) / K;
  const size_t tid = global_thread_id(), stride = global_thread_count();
  pdl_wait();
  const Vec16 first = tid < nvec ? load_input(in, tid, a.n) : Vec16{};  // overlaps begin_call
  const Call call = begin_call(ws);
  const int buf = call.index % 3;
  for (size_t v = tid; v < nvec; v += stride)
    push_lamport(ws, buf, v * 16,
                 Lamport<T>::canonical(v == tid ? first : load_input(in, v, a.n)));
  pdl_launch_dependents();
  clear_previous<T>(ws, call);
  const WaitContext w = wait_context(ws, config::kErrAllreduceOneshot);
  for (size_t v = tid; v < nvec; v += stride) {
    float acc[K];
    const Vec16 own = Lamport<T>::canonical(v == tid ? first : load_input(in, v, a.n));
    if (!reduce_lamport<T>(ws, buf, v * 16, own, acc, w)) break;
    store_output(out, v, a.n, round_pack<T>(acc));
  }
  end_call(ws, call, (uint32_t)(nvec * 16));
}

// One-shot for large messages, the roles split by SM: blocks [0, push_blocks) push every
// vector (kUnroll loads in flight per thread); the others clear the previous buffer, then
// poll and reduce kReduceUnroll vectors per thread at a time (the later ones' peer slots
// prefetched into L2 while the first is polled). The host gives each block an SM of its
// own (its shared memory request admits one per SM), so the reducers' local loads and
// stores never queue behind the remote stores in an SM's memory pipeline, and the
// reduction keeps pace with the arrivals instead of starting after the pushes drained.
// Pushers never wait, and have the lower block indices, hence are made resident first.
template <typename T>
__device__ __forceinline__ void oneshot_split(const AllReduceArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const ArWorkspace& ws = a.ws;
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  const size_t nvec = (a.n + K - 1) / K;
  const uint32_t pushers = a.push_blocks;
  pdl_wait();
  const Call call = begin_call(ws);
  const int buf = call.index % 3;
  if (blockIdx.x < pushers) {
    constexpr int PU = kUnroll;
    const size_t stride = (size_t)pushers * blockDim.x;
    for (size_t v0 = blockIdx.x * blockDim.x + threadIdx.x; v0 < nvec; v0 += PU * stride) {
      Vec16 x[PU];
#pragma unroll
      for (int u = 0; u < PU; ++u)
        if (v0 + u * stride < nvec) x[u] = load_input(in, v0 + u * stride, a.n);
#pragma unroll
      for (int u = 0; u < PU; ++u)
        if (v0 + u * stride < nvec)
          push_lamport(ws, buf, (v0 + u * stride) * 16, Lamport<T>::canonical(x[u]));
    }
    pdl_launch_dependents();
  } else {
    const uint32_t tid = (blockIdx.x - pushers) * blockDim.x + threadIdx.x;
    const uint32_t stride = (gridDim.x - pushers) * blockDim.x;
    pdl_launch_dependents();
    clear_previous<T>(ws, call, tid, stride);
    const WaitContext w = wait_context(ws, config::kErrAllreduceOneshot);
    constexpr int RU = kReduceUnroll;
    const uint8_t* slot0 = lamport(ws, ws.rank, buf, 0);
    bool ok = true;
    for (size_t v0 = tid; ok && v0 < nvec; v0 += RU * (size_t)stride) {
      Vec16 own[RU];
#pragma unroll
      for (int u = 0; u < RU; ++u) {
        const size_t v = v0 + u * (size_t)stride;
        if (v >= nvec) break;
        own[u] = Lamport<T>::canonical(load_input(in, v, a.n));
        if (u > 0)
          for (int s = 0; s < ws.world; ++s)
            if (s != ws.rank) prefetch_l2(slot0 + s * ws.lamport_slot + v * 16);
      }
#pragma unroll
      for (int u = 0; u < RU; ++u) {
        const size_t v = v0 + u * (size_t)stride;
        if (v >= nvec) break;
        float acc[K];
        if (!(ok = reduce_lamport<T>(ws, buf, v * 16, own[u], acc, w))) break;
        store_output(out, v, a.n, round_pack<T>(acc));
      }
    }
  }
  end_call(ws, call, (uint32_t)(nvec * 16));
}

// Vectors [lo, hi) of a chunk, kUnroll loads in flight per thread: f(v, x) for each.
template <typename Load, typename Use>
__device__ __forceinline__ void for_chunk(size_t lo, size_t hi, Load load, Use use) {
  for (size_t v0 = lo + threadIdx.x; v0 < hi; v0 += kUnroll * blockDim.x) {
    Vec16 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v0 + u * blockDim.x < hi) x[u] = load(v0 + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v0 + u * blockDim.x < hi) use(v0 + u * blockDim.x, x[u]);
  }
}

// Two-shot, pipelined over chunks of chunk_vecs vectors. Segment p (ceil(nvec / world)
// vectors) is reduced by rank p; chunk j of every segment belongs to block j % grid.
//  A. each block sends its copy of its chunks of every peer's segment to that peer's
//     reduce-scatter inbox, publishing stage-0 flag per chunk;
//  B. per chunk of the own segment: wait for the peers' copies, sum in rank order, write
//     `out` and every peer's all-gather inbox, publish stage-1 flag;
//  C. one chunk behind B: wait for the peers' reduced chunks, copy them to `out`.
// With the copy engines (kCopyEngine), the host copies every peer's segment into its
// inbox before the kernel and the gathered segments to `out` after it: A only publishes
// (stream order has completed the copies) and C only waits. B canonicalizes every vector
// it sums (the copy engines move raw ones), so both give the same bits.
template <typename T, bool kCopyEngine>
__device__ __forceinline__ void twoshot(const AllReduceArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const ArWorkspace& ws = a.ws;
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  const size_t nvec = (a.n + K - 1) / K;
  const size_t seg = (nvec + ws.world - 1) / ws.world;
  const size_t chunk = a.chunk_vecs;
  const size_t nchunks = (seg + chunk - 1) / chunk;
  const int rank = ws.rank, world = ws.world;
  // vectors of chunk j of segment p: [lo, hi)
  auto lo = [&](int p, size_t j) { return p * seg + j * chunk; };
  auto hi = [&](int p, size_t j) {
    return min(min(p * seg + (j + 1) * chunk, (p + 1) * seg), nvec);
  };
  auto own = [&](size_t v) { return Lamport<T>::canonical(load_input(in, v, a.n)); };

  pdl_wait();
  const Call call = begin_call(ws);
  clear_previous<T>(ws, call);
  const WaitContext w = wait_context(ws, config::kErrAllreduceTwoshot);

  uint32_t i = 0;
  if (kCopyEngine) {  // every chunk is in the peers' inboxes: one flag covers them all
    const uint32_t mine = blockIdx.x < nchunks ? (nchunks - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    if (mine > 0) signal_peers(ws, 0, flag_value(call, mine - 1));
  } else {
    for (size_t j = blockIdx.x; j < nchunks; j += gridDim.x, ++i) {
      for (int q = 1; q < world; ++q) {
        const int p = rank + q < world ? rank + q : rank + q - world;
        uint8_t* inbox = base(ws, p) + ws.rs_off + (size_t)rank * ws.rs_slot;
        for_chunk(lo(p, j), hi(p, j), own, [&](size_t v, const Vec16& x) {
          st_vec16(inbox + (v - p * seg) * 16, x);
        });
      }
      signal_peers(ws, 0, flag_value(call, i));
    }
  }
  pdl_launch_dependents();

  const uint8_t* rs = base(ws, rank) + ws.rs_off;  // slot s: rs + s * rs_slot
  const uint8_t* ag = base(ws, rank) + ws.ag_off;
  auto copy_out = [&](size_t j) {
    if (kCopyEngine) return;
    for (int q = 1; q < world; ++q) {
      const int p = rank + q < world ? rank + q : rank + q - world;
      for_chunk(lo(p, j), hi(p, j), [&](size_t v) { return ld_vec16_cg(ag + v * 16); },
                [&](size_t v, const Vec16& x) { store_output(out, v, a.n, x); });
    }
  };
  auto inbox = [&](int s, size_t v) {
    return ld_vec16_cg(rs + s * ws.rs_slot + (v - rank * seg) * 16);
  };
  bool ok = true;
  i = 0;
  size_t last = 0;
  for (size_t j = blockIdx.x; j < nchunks; j += gridDim.x, ++i) {
    if (!(ok = wait_peers(ws, 0, flag_value(call, i), w))) break;
    for (size_t v = lo(rank, j) + threadIdx.x; v < hi(rank, j); v += blockDim.x) {
      // kReduceGroup ranks' vectors loaded at once, then canonicalized and summed in rank
      // order.
      const Vec16 mine = load_input(in, v, a.n);
      float acc[K];
#pragma unroll
      for (int s0 = 0; s0 < kArMaxRanks; s0 += kReduceGroup) {
        if (s0 >= world) break;
        Vec16 x[kReduceGroup];
#pragma unroll
        for (int g = 0; g < kReduceGroup; ++g)
          if (s0 + g < world && s0 + g != rank) x[g] = inbox(s0 + g, v);
#pragma unroll
        for (int g = 0; g < kReduceGroup; ++g)
          if (s0 + g < world)
            accumulate<T>(acc, Lamport<T>::canonical(s0 + g == rank ? mine : x[g]), s0 + g == 0);
      }
      const Vec16 r = round_pack<T>(acc);
      store_output(out, v, a.n, r);
      for (int q = 1; q < world; ++q) {
        const int p = rank + q < world ? rank + q : rank + q - world;
        st_vec16(base(ws, p) + ws.ag_off + v * 16, r);
      }
    }
    signal_peers(ws, 1, flag_value(call, i));
    if (i > 0) {
      if (!(ok = wait_peers(ws, 1, flag_value(call, i - 1), w))) break;
      copy_out(last);
    }
    last = j;
  }
  if (ok && i > 0 && wait_peers(ws, 1, flag_value(call, i - 1), w)) copy_out(last);
  end_call(ws, call, 0);
}

}  // namespace

#define MOECOMM_AR_KERNELS(SUFFIX, T)                                                    \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      allreduce_oneshot_##SUFFIX(const AllReduceArgs a) {                                \
    oneshot<T>(a);                                                                       \
  }                                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      allreduce_oneshot_split_##SUFFIX(const AllReduceArgs a) {                          \
    oneshot_split<T>(a);                                                                 \
  }                                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      allreduce_twoshot_##SUFFIX(const AllReduceArgs a) {                                \
    twoshot<T, false>(a);                                                                \
  }                                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      allreduce_twoshot_ce_##SUFFIX(const AllReduceArgs a) {                             \
    twoshot<T, true>(a);                                                                 \
  }

MOECOMM_AR_KERNELS(bf16, __nv_bfloat16)
MOECOMM_AR_KERNELS(fp16, __half)
MOECOMM_AR_KERNELS(fp32, float)

// Fill a region with a repeated 32-bit word (the Lamport sentinel at creation).
extern "C" __global__ void fill_words(const FillArgs a) {
  const Vec16 s{a.word, a.word, a.word, a.word};
  for (size_t i = global_thread_id(); i < a.nbytes / 16; i += global_thread_count())
    st_vec16(a.dst + i * 16, s);
}
