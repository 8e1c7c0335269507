// The all-reduce workspace as kernels see it, and the pieces every all-reduce kernel
// (plain in allreduce.cu, fused in fusion.cu) is built from.
//
// Workspace (one SymmetricBuffer per rank, offsets given by the host):
//   lamport_off: 3 rotating buffers x world slots x lamport_slot bytes, set to -0.0
//   rs_off:      world slots x rs_slot bytes (two-shot reduce-scatter inbox)
//   ag_off:      max bytes                  (two-shot all-gather inbox)
//   flag_off:    uint32 flags[2 stages][kMaxBlocks][kMaxRanks]
// and a local uint32 state[8]: [0] call counter, [1] blocks done, [2..4] bytes per slot
// last written into each Lamport buffer (what the next-but-one call must clear).
//
// Every call uses Lamport buffer call % 3 and clears buffer (call + 2) % 3 (the one of
// the previous call) once it knows every peer has started this call. Peers sum in rank
// order in fp32 and round once, so all ranks and both algorithms agree bit for bit.
#pragma once
#include "common.cuh"


namespace moecomm {
namespace allreduce {

constexpr int kMaxBlocks = 256;  // flags per stage and rank: MAX_BLOCKS in allreduce.py
constexpr int kMaxRanks = 16;    // MAX_RANKS in allreduce.py
constexpr uint32_t kCodeOneshot = 1;  // error codes: _CODES in allreduce.py
constexpr uint32_t kCodeTwoshot = 2;

struct Workspace {
  const uint64_t* peers;  // [world] base pointers of every rank's SymmetricBuffer
  int rank;
  int world;
  size_t lamport_off;
  size_t lamport_slot;    // bytes of one Lamport slot (the one-shot limit)
  size_t rs_off;
  size_t rs_slot;         // bytes of one reduce-scatter slot (a segment's limit)
  size_t ag_off;
  size_t flag_off;
  uint32_t* state;        // local, see the top of the file
  uint32_t* error_word;   // mapped host memory
  uint64_t timeout_ns;

  __device__ uint8_t* base(int r) const { return reinterpret_cast<uint8_t*>(peers[r]); }
  __device__ uint8_t* lamport(int owner, int buf, int slot) const {
    return base(owner) + lamport_off + ((size_t)buf * world + slot) * lamport_slot;
  }
};

// Input vector v of n elements; lanes past the end read as +0.
template <typename T>
__device__ __forceinline__ Vec16 load_input(const T* in, size_t v, size_t n) {
  constexpr int K = Pack16<T>::kLanes;
  if ((v + 1) * K <= n) return ld_vec16(in + v * K);
  Pack16<T> p;
#pragma unroll
  for (int i = 0; i < K; ++i) p.lane[i] = v * K + i < n ? in[v * K + i] : from_float<T>(0.f);
  return p.vec;
}

template <typename T>
__device__ __forceinline__ void store_output(T* out, size_t v, size_t n, const Vec16& x) {
  constexpr int K = Pack16<T>::kLanes;
  if ((v + 1) * K <= n) {
    st_vec16(out + v * K, x);
    return;
  }
  Pack16<T> p;
  p.vec = x;
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (v * K + i < n) out[v * K + i] = p.lane[i];
}

template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[Pack16<T>::kLanes], const Vec16& x,
                                           bool first) {
  Pack16<T> p;
  p.vec = x;
#pragma unroll
  for (int i = 0; i < Pack16<T>::kLanes; ++i)
    acc[i] = first ? to_float(p.lane[i]) : acc[i] + to_float(p.lane[i]);
}

// Refill the previous call's Lamport buffer with the sentinel. Called once every peer is
// known to be in this call (so none still writes there); the grid shares the work.
template <typename T>
__device__ void clear_previous(const Workspace& ws, uint32_t call) {
  const int prev = (call + 2) % 3;
  const size_t nvec = ws.state[2 + prev] / 16;
  if (nvec == 0) return;
  const Vec16 s = Lamport<T>::sentinel();
  for (size_t i = global_thread_id(); i < nvec * ws.world; i += global_thread_count()) {
    const int slot = (int)(i / nvec);
    st_vec16(ws.lamport(ws.rank, prev, slot) + (i % nvec) * 16, s);
  }
}

// The last block to finish advances the call counter and records what to clear next.
__device__ void finish_call(const Workspace& ws, uint32_t call, uint32_t lamport_bytes) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&ws.state[1], 1u) == gridDim.x - 1) {
      ws.state[2 + (call + 2) % 3] = 0;
      ws.state[2 + call % 3] = lamport_bytes;
      ws.state[1] = 0;
      ws.state[0] = call + 1;
      __threadfence();
    }
  }
}

// Block-level barrier of stage `stage`: after it, every peer's block blockIdx.x has
// finished the writes it made before its own barrier. False if a peer never arrived.
__device__ bool block_barrier(const Workspace& ws, int stage, uint32_t epoch) {
  __threadfence_system();
  __syncthreads();
  const size_t flag = ws.flag_off + (((size_t)stage * kMaxBlocks + blockIdx.x) * kMaxRanks) * 4;
  bool ok = true;
  if (threadIdx.x < ws.world) {
    const int peer = threadIdx.x;
    st_release_sys(reinterpret_cast<uint32_t*>(ws.base(peer) + flag) + ws.rank, epoch);
    ok = wait_flag_geq(reinterpret_cast<const uint32_t*>(ws.base(ws.rank) + flag) + peer, epoch,
                       ws.timeout_ns, peer, ws.error_word, kCodeTwoshot);
  }
  return __syncthreads_and(ok);
}

// Waits until vector `byte_off` of slot `s` of the own Lamport buffer is written and
// returns it; false if the wait gave up.
template <typename T>
__device__ __forceinline__ bool wait_lamport(const Workspace& ws, int buf, int s, size_t byte_off,
                                             Vec16& x) {
  const uint8_t* src = ws.lamport(ws.rank, buf, s) + byte_off;
  x = ld_vec16_volatile(src);
  SpinTimer timer(ws.timeout_ns);
  while (Lamport<T>::pending(x)) {
    if (timer.give_up(ws.error_word, s, kCodeOneshot)) return false;
    x = ld_vec16_volatile(src);
  }
  return true;
}

}  // namespace allreduce
}  // namespace moecomm

// Kernel parameters of the workspace, in this order, after each kernel's own.
#define MOECOMM_AR_ARGS                                                                     \
  const uint64_t *peers, int rank, int world, uint64_t lamport_off, uint64_t lamport_slot, \
      uint64_t rs_off, uint64_t rs_slot, uint64_t ag_off, uint64_t flag_off, uint32_t *state,  \
      uint32_t *error_word, uint64_t timeout_ns
#define MOECOMM_AR_WS                                                                       \
  moecomm::allreduce::Workspace{peers,   rank,     world,    lamport_off, lamport_slot, rs_off,    \
                                rs_slot, ag_off, flag_off, state,       error_word,   timeout_ns}
