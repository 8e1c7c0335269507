// The handshake of the MoE all-to-all kernels (moe_a2a.cu; moe_compact.cu's exact combine
// keeps the combine half of it).
//
// The dispatch and combine kernels run on a grid that is the same on every rank (the host
// derives it from runtime_max and the SM budget), and each call adds exactly the grid size
// to a rank's entry in every peer's header (system-scope release adds); the value before
// the call lives in local state (kStateDispatchSeen / kStateCombineSeen), so counters are
// never reset and never raced.
//
// Dispatch: every block adds 1 once its rows are written; block 0 waits for the whole
// grid of every source. Combine ("ready"): an entry past seen + 1 means that rank's rows
// of this call can be read. With nothing to stage, block 0 adds the grid size as it starts
// (the rows were ready when the kernel started; blocks start in index order, and one add
// instead of one per block keeps the peers' counters free of contention); with staging,
// the block that completes the last staging unit adds the grid size at once. Readers wait
// for one add, not for every block of the peer, so a grid that does not fit on the SMs it
// gets (a GEMM on another stream holding the rest) runs in turns instead of stalling until
// the SMs free up.
//
// Header of every rank's workspace (moecomm/moe/alltoall.py): dispatch_count u32[32] at 0,
// combine_count u32[32] at 128, recv_count i32[32] at 256; entry s is written by rank s.
#pragma once
#include "args.cuh"

namespace moecomm {
namespace a2a {

constexpr size_t kDispatchCountOff = 0;
constexpr size_t kCombineCountOff = 128;
constexpr size_t kRecvCountOff = 256;

// Local state words (u32[8]).
constexpr int kStateDispatchSeen = 0;  // dispatch signals expected from each source so far
constexpr int kStateCombineSeen = 1;   // combine signals likewise
constexpr int kStateArrived = 2;       // blocks of the running kernel that read the above
constexpr int kStateAbort = 3;         // raised by a wait that gave up (common.cuh)
constexpr int kStateStageClaim = 4;    // combine staging units claimed (+1 per block's last try)
constexpr int kStateStageDone = 5;     // combine staging units completed

__device__ __forceinline__ uint8_t* peer_base(const A2aWorkspace& ws, int r) {
  return reinterpret_cast<uint8_t*>(ws.peers[r]);
}

__device__ __forceinline__ WaitContext wait_context(const A2aWorkspace& ws, uint32_t code) {
  return WaitContext{ws.error_word, ws.state + kStateAbort, ws.timeout_ns, code};
}

// Local state word `word` as the previous kernel left it. A block that reads it must
// arrive (grid_arrive on kStateArrived) once all its threads have, so that block 0 may
// change it at its end (end).
__device__ __forceinline__ uint32_t read_state(const A2aWorkspace& ws, int word) {
  return *(volatile const uint32_t*)&ws.state[word];
}

// The block reads local state word `word` (< 4) and arrives (grid_read_and_arrive: the
// first four words in one load, no warp held by the arrival), through shared `slot`.
__device__ __forceinline__ uint32_t begin(const A2aWorkspace& ws, int word, Vec16& slot) {
  return word_of(grid_read_and_arrive(ws.state, &ws.state[kStateArrived], slot), word);
}

__device__ __forceinline__ uint32_t begin(const A2aWorkspace& ws, int word) {
  __shared__ Vec16 slot;
  return begin(ws, word, slot);
}

__device__ __forceinline__ void end(const A2aWorkspace& ws, int word, uint32_t value) {
  if (grid_all_arrived(&ws.state[kStateArrived])) ws.state[word] = value;
}

// After this block's writes to every rank: add 1 to entry `rank` of counter array
// `count_off` in every rank's header. The barrier puts every thread's writes before the
// signalling thread's system-scope release, which is cumulative (allreduce.cuh,
// signal_peers).
__device__ __forceinline__ void signal_all(const A2aWorkspace& ws, size_t count_off) {
  __syncthreads();
  if (threadIdx.x < ws.ep_size)
    red_add_release_sys(
        reinterpret_cast<uint32_t*>(peer_base(ws, threadIdx.x) + count_off) + ws.rank, 1u);
}

// Combine with nothing to stage: block 0 adds the grid size to entry `rank` of counter
// array `count_off` in every rank's header (the rows were ready before the kernel began).
__device__ __forceinline__ void signal_ready(const A2aWorkspace& ws, size_t count_off) {
  if (blockIdx.x == 0 && threadIdx.x < ws.ep_size)
    red_add_release_sys(
        reinterpret_cast<uint32_t*>(peer_base(ws, threadIdx.x) + count_off) + ws.rank,
        gridDim.x);
}

// After the grid's staging is complete: add `n` to entry `rank` of counter array
// `count_off` at every rank (one thread; its acquire of the staging count makes the
// release cumulative over every block's writes).
__device__ __forceinline__ void signal_all_from_thread(const A2aWorkspace& ws, size_t count_off,
                                                       uint32_t n) {
  for (int r = 0; r < ws.ep_size; ++r)
    red_add_release_sys(reinterpret_cast<uint32_t*>(peer_base(ws, r) + count_off) + ws.rank, n);
}

// Threads 0..ep-1 wait until entry s of the own counter array `count_off` reaches
// `target`. Block-uniform; false if a wait gave up.
__device__ __forceinline__ bool wait_all(const A2aWorkspace& ws, size_t count_off,
                                         uint32_t target, const WaitContext& w) {
  bool ok = true;
  if (threadIdx.x < ws.ep_size) {
    const uint32_t* count =
        reinterpret_cast<const uint32_t*>(peer_base(ws, ws.rank) + count_off) + threadIdx.x;
    ok = wait_flag_geq(count, target, w, threadIdx.x);
  }
  return __syncthreads_and(ok);
}

}  // namespace a2a
}  // namespace moecomm
