// Custom all-reduce over CUDA IPC: Lamport one-shot and two-shot (see allreduce.cuh).
#include "allreduce.cuh"

using namespace moecomm;
using namespace moecomm::allreduce;

namespace {

// One-shot push: write vectors of the input into slot `rank` of every peer's Lamport
// buffer `buf` (the grid shares the vectors).
template <typename T>
__device__ __forceinline__ void push_lamport(const T* in, size_t n, const Workspace& ws, int buf) {
  constexpr int K = Pack16<T>::kLanes;
  const size_t nvec = (n + K - 1) / K;
  for (size_t v = global_thread_id(); v < nvec; v += global_thread_count()) {
    const Vec16 x = Lamport<T>::canonical(load_input(in, v, n));
    for (int i = 0; i < ws.world; ++i) {
      const int peer = (ws.rank + i) % ws.world;
      st_vec16_volatile(ws.lamport(peer, buf, ws.rank) + v * 16, x);
    }
  }
}

// One-shot: push the whole input into slot `rank` of every peer's Lamport buffer, then
// spin on the own buffer until no slot holds the sentinel, and sum the slots in order.
template <typename T>
__device__ void oneshot(const T* in, T* out, size_t n, const Workspace& ws) {
  constexpr int K = Pack16<T>::kLanes;
  const uint32_t call = ws.state[0];
  const int buf = call % 3;
  const size_t nvec = (n + K - 1) / K;
  push_lamport(in, n, ws, buf);
  bool failed = false;
  for (size_t v = global_thread_id(); v < nvec && !failed; v += global_thread_count()) {
    float acc[K];
    for (int s = 0; s < ws.world && !failed; ++s) {
      Vec16 x;
      failed = !wait_lamport<T>(ws, buf, s, v * 16, x);
      accumulate<T>(acc, x, s == 0);
    }
    if (!failed) store_output(out, v, n, round_pack<T>(acc));
  }
  // The grid is sized so every block owns vector blockIdx.x * blockDim.x: after the
  // barrier each block has seen data from every peer, hence every peer is in this call.
  if (__syncthreads_or(failed)) return;
  clear_previous<T>(ws, call);
  finish_call(ws, call, (uint32_t)(nvec * 16));
}

// Two-shot: scatter segment p of the input to rank p, barrier, reduce the own segment and
// push the result to every rank, barrier, copy the gathered result out. Each block works
// on the same index set of every segment on every rank, so block-level barriers suffice.
template <typename T>
__device__ void twoshot(const T* in, T* out, size_t n, const Workspace& ws) {
  constexpr int K = Pack16<T>::kLanes;
  const uint32_t call = ws.state[0];
  const uint32_t epoch = call + 1;
  const size_t nvec = (n + K - 1) / K;
  const size_t seg = (nvec + ws.world - 1) / ws.world;
  const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t step = global_thread_count();

  for (int i = 1; i <= ws.world; ++i) {
    const int peer = (ws.rank + i) % ws.world;
    uint8_t* inbox = ws.base(peer) + ws.rs_off + (size_t)ws.rank * ws.rs_slot;
    for (size_t v = first; v < seg && peer * seg + v < nvec; v += step)
      st_vec16(inbox + v * 16, Lamport<T>::canonical(load_input(in, peer * seg + v, n)));
  }
  if (!block_barrier(ws, 0, epoch)) return;
  clear_previous<T>(ws, call);

  for (size_t v = first; v < seg && ws.rank * seg + v < nvec; v += step) {
    float acc[K];
    for (int s = 0; s < ws.world; ++s)
      accumulate<T>(acc, ld_vec16_cg(ws.base(ws.rank) + ws.rs_off + s * ws.rs_slot + v * 16),
                    s == 0);
    const Vec16 r = round_pack<T>(acc);
    for (int i = 0; i < ws.world; ++i) {
      const int peer = (ws.rank + i) % ws.world;
      st_vec16(ws.base(peer) + ws.ag_off + (ws.rank * seg + v) * 16, r);
    }
  }
  if (!block_barrier(ws, 1, epoch)) return;

  for (int p = 0; p < ws.world; ++p)
    for (size_t v = first; v < seg && p * seg + v < nvec; v += step)
      store_output(out, p * seg + v, n, ld_vec16_cg(ws.base(ws.rank) + ws.ag_off + (p * seg + v) * 16));
  finish_call(ws, call, 0);
}

}  // namespace

#define MOECOMM_AR_KERNELS(SUFFIX, T)                                                      \
  extern "C" __global__ void allreduce_oneshot_##SUFFIX(const T* in, T* out, uint64_t n,   \
                                                        MOECOMM_AR_ARGS) {                 \
    oneshot<T>(in, out, n, MOECOMM_AR_WS);                                                 \
  }                                                                                        \
  extern "C" __global__ void allreduce_twoshot_##SUFFIX(const T* in, T* out, uint64_t n,   \
                                                        MOECOMM_AR_ARGS) {                 \
    twoshot<T>(in, out, n, MOECOMM_AR_WS);                                                 \
  }

MOECOMM_AR_KERNELS(bf16, __nv_bfloat16)
MOECOMM_AR_KERNELS(fp16, __half)
MOECOMM_AR_KERNELS(fp32, float)

// Fill `nbytes` (a multiple of 16) at `p` with the -0.0 sentinel of the element type.
extern "C" __global__ void lamport_fill(uint8_t* p, uint64_t nbytes, uint32_t word) {
  const Vec16 s{word, word, word, word};
  for (size_t i = global_thread_id(); i < nbytes / 16; i += global_thread_count())
    st_vec16(p + i * 16, s);
}
