// The all-reduce workspace protocol, shared by the plain all-reduce (allreduce.cu) and the
// fused one (fusion.cu).
//
// Shared memory of every rank (ArWorkspace, offsets from the host):
//   Lamport buffers [3][world][lamport_slot]: one-shot inboxes, slot s written by rank s,
//     holding -0.0 ("not yet written") between uses;
//   rs inbox [world][rs_slot], ag inbox [max bytes]: two-shot reduce-scatter / all-gather;
//   flags u64 [2 stages][kArMaxBlocks][kArMaxRanks]: two-shot, entry (stage, b, s) written
//     by block b of rank s.
// Local control words (state, not shared): see kState* below.
//
// A call k reads the call number k at its start (begin_call) and block 0 advances it at
// its end (end_call) once every block has read it, with no fence: the next kernel of the
// stream sees the new value at the kernel boundary (pdl_wait with programmatic launch).
// One-shot call k pushes into Lamport buffer k % 3 and clears buffer (k + 2) % 3, the one
// call k - 1 used: every peer wrote it before we could finish call k - 1, and no peer
// writes it again before call k + 2, which a peer can only start once it has our data of
// call k + 1. Two-shot flags carry the 64-bit value ((k + 1) << 32) + chunk + 1, monotonic
// over calls and chunks, so they never need resetting; a wait takes a slot's value only
// from this call (that chunk or a later one) or the next, since a slot of a block past
// the recent grids may be any number of calls old: only a value 2^32 calls old (within
// one call) would alias, where 32-bit values with the call in their upper 20 bits aliased
// at every 2^20 calls. The inboxes are reused by
// the next two-shot call: a block ends only after the peers' stage-1 flags of its chunks,
// which they publish after reading their rs inbox, and a peer writes our ag inbox only
// after our stage-0 flag of the next call. With the copy engines (allreduce.cu) the same
// holds: our copy into a peer's rs inbox follows our previous kernel in stream order, our
// copy out of the ag inbox precedes the next kernel, which publishes stage 0.
//
// Reductions sum the ranks in order 0, 1, ... in fp32 and round once: every rank and both
// algorithms produce the same bits. Writers turn -0.0 into +0.0.
#pragma once
#include "args.cuh"

namespace moecomm {
namespace allreduce {

using config::kArMaxBlocks;
using config::kArMaxRanks;

// Local control words; words 4-7 are read as one vector.
constexpr int kStateArrived = 0;       // blocks of the running call that read words 4-7
constexpr int kStateAbort = 1;         // raised by a wait that gave up (common.cuh)
constexpr int kStateCall = 4;          // calls completed
constexpr int kStateLamportBytes = 5;  // [5 + b]: bytes per slot the last user of Lamport
                                       // buffer b wrote (what the next-but-one call clears)
constexpr int kStateWords = 8;


__device__ __forceinline__ uint8_t* base(const ArWorkspace& ws, int r) {
  return reinterpret_cast<uint8_t*>(ws.peers[r]);
}

__device__ __forceinline__ uint8_t* lamport(const ArWorkspace& ws, int owner, int buf, int slot) {
  return base(ws, owner) + ws.lamport_off + ((size_t)buf * ws.world + slot) * ws.lamport_slot;
}

__device__ __forceinline__ WaitContext wait_context(const ArWorkspace& ws, uint32_t code) {
  return WaitContext{ws.error_word, ws.state + kStateAbort, ws.timeout_ns, code};
}

struct Call {
  uint32_t index;        // k
  uint32_t clear_bytes;  // bytes per slot of Lamport buffer (k + 2) % 3 to clear
};

// The block reads the call number and the three buffers' sizes in one load, and arrives
// (grid_read_and_arrive) so block 0 may change them. Issue the first input loads before
// calling: their latency overlaps.
__device__ __forceinline__ Call begin_call(const ArWorkspace& ws) {
  static_assert(kStateLamportBytes == kStateCall + 1, "words 4-7: the call, then the sizes");
  const Vec16 s = grid_read_and_arrive(&ws.state[kStateCall], &ws.state[kStateArrived]);
  return Call{s.x, word_of(s, 1 + (s.x + 2) % 3)};
}

// Block 0, after its own work: once every block has arrived, advance the call number and
// record that this call wrote `lamport_bytes` per slot of buffer k % 3 (0 for two-shot)
// and cleared buffer (k + 2) % 3.
__device__ __forceinline__ void end_call(const ArWorkspace& ws, const Call& call,
                                         uint32_t lamport_bytes) {
  if (!grid_all_arrived(&ws.state[kStateArrived])) return;
  ws.state[kStateLamportBytes + (call.index + 2) % 3] = 0;
  ws.state[kStateLamportBytes + call.index % 3] = lamport_bytes;
  ws.state[kStateCall] = call.index + 1;
}

// Refill the slots of Lamport buffer (k + 2) % 3 that call k - 1's peers wrote with the
// sentinel of T (a rank never writes its own slot); threads tid, tid + stride, ... share
// the work (by default the grid's).
template <typename T>
__device__ __forceinline__ void clear_previous(const ArWorkspace& ws, const Call& call,
                                               uint32_t tid, uint32_t stride) {
  const uint32_t nvec = call.clear_bytes / 16;
  if (nvec == 0) return;
  const Vec16 s = Lamport<T>::sentinel();
  const int prev = (call.index + 2) % 3;
  for (int slot = 0; slot < ws.world; ++slot) {
    if (slot == ws.rank) continue;
    uint8_t* p = lamport(ws, ws.rank, prev, slot);
    for (uint32_t i = tid; i < nvec; i += stride) st_vec16(p + (size_t)i * 16, s);
  }
}

template <typename T>
__device__ __forceinline__ void clear_previous(const ArWorkspace& ws, const Call& call) {
  clear_previous<T>(ws, call, (uint32_t)global_thread_id(), (uint32_t)global_thread_count());
}

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

// One-shot push: vector `x` (already canonical) into slot `rank` of every peer's Lamport
// buffer `buf` at byte offset `off`. The own contribution never goes through memory: the
// reduction takes it from the caller.
__device__ __forceinline__ void push_lamport(const ArWorkspace& ws, int buf, size_t off,
                                             const Vec16& x) {
  for (int i = 1; i < ws.world; ++i) {
    const int r = ws.rank + i < ws.world ? ws.rank + i : ws.rank + i - ws.world;
    st_vec16(lamport(ws, r, buf, ws.rank) + off, x);
  }
}

// One-shot reduction of the vector at byte offset `off`: slot s of the own Lamport buffer
// `buf` for every peer s (loaded kPollSlots at a time, re-polled while they still hold
// the sentinel), `own` (canonical) for this rank; summed in rank order into `acc`. False if
// a wait gave up.
template <typename T>
__device__ __forceinline__ bool reduce_lamport(const ArWorkspace& ws, int buf, size_t off,
                                               const Vec16& own, float (&acc)[Pack16<T>::kLanes],
                                               const WaitContext& w) {
  constexpr int kPollSlots = 2;
  const uint8_t* slot0 = lamport(ws, ws.rank, buf, 0) + off;
  for (int s0 = 0; s0 < ws.world; s0 += kPollSlots) {
    Vec16 x[kPollSlots];
#pragma unroll
    for (int i = 0; i < kPollSlots; ++i) {
      const int s = s0 + i;
      if (s < ws.world) x[i] = s == ws.rank ? own : ld_vec16_volatile(slot0 + s * ws.lamport_slot);
    }
#pragma unroll
    for (int i = 0; i < kPollSlots; ++i) {
      const int s = s0 + i;
      if (s >= ws.world) continue;
      if (!lamport_wait<T>(slot0 + s * ws.lamport_slot, x[i], w, s)) return false;
      accumulate<T>(acc, x[i], s == 0);
    }
  }
  return true;
}

// Two-shot flag of (stage, block b, source rank s) in rank r's buffer.
__device__ __forceinline__ uint64_t* flag(const ArWorkspace& ws, int r, int stage, int b, int s) {
  return reinterpret_cast<uint64_t*>(base(ws, r) + ws.flag_off) +
         ((size_t)stage * kArMaxBlocks + b) * kArMaxRanks + s;
}

// Two-shot flag of `chunk` of this call: the call number above, the chunk below.
__device__ __forceinline__ uint64_t flag_value(const Call& call, uint32_t chunk) {
  return ((uint64_t)(call.index + 1) << 32) + chunk + 1;
}

// After this block's writes to every peer: publish (stage, blockIdx.x) = value to them.
// The barrier makes every thread's writes part of what the signalling thread has observed,
// and its system-scope release is cumulative: a peer that acquires the flag sees them all.
// No thread waits for its own writes to drain before the block moves on.
__device__ __forceinline__ void signal_peers(const ArWorkspace& ws, int stage, uint64_t value) {
  __syncthreads();
  if (threadIdx.x < ws.world && threadIdx.x != ws.rank)
    st_release_sys(flag(ws, threadIdx.x, stage, blockIdx.x, ws.rank), value);
}

// Wait until every peer's block blockIdx.x published `value` (or a later chunk) for
// `stage`; a slot may hold a value from any older call (its block was past the grids
// since), which must not pass (the window also admits a call ahead, which the protocol
// never produces). Block-uniform; false if a wait gave up.
__device__ __forceinline__ bool wait_peers(const ArWorkspace& ws, int stage, uint64_t value,
                                           const WaitContext& w) {
  bool ok = true;
  if (threadIdx.x < ws.world && threadIdx.x != ws.rank)
    ok = wait_flag_in(flag(ws, ws.rank, stage, blockIdx.x, threadIdx.x), value,
                      uint64_t{2} << 32, w, threadIdx.x);
  return __syncthreads_and(ok);
}

}  // namespace allreduce
}  // namespace moecomm
