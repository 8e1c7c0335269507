// Device-side barrier over CUDA IPC (moecomm.barrier): no rank's kernel after the barrier
// starts before every rank's kernels before it have completed, without the host.
//
// Every rank owns a SymmetricBuffer of u32 counters, one per rank; entry s of rank r's
// counters counts the calls rank s has made. A call is one block: thread r (< world)
// adds 1, with a system-scope release, to entry `rank` of rank r's counters, then waits
// (bounded, acquire) until entry r of its own counters reaches this rank's call count.
// The count lives in local device state, so no host value changes between calls and the
// launch can be captured in a CUDA graph and replayed. Counters are never reset: a peer
// is at most one call ahead (it cannot pass call k+1 before this rank signalled it), and
// the wrapping compare of wait_flag_geq survives 2^32 calls.
//
// Launched without programmatic dependent launch: the previous kernel of the stream has
// completed (its writes, to own or peer memory, done) before the fence and the signal.
#include "args.cuh"

using namespace moecomm;

namespace {
constexpr int kStateCalls = 0;
constexpr int kStateAbort = 1;
}  // namespace

extern "C" __global__ void __launch_bounds__(config::kBarrierMaxRanks)
    device_barrier(const BarrierArgs a) {
  const uint32_t target = *(volatile const uint32_t*)&a.state[kStateCalls] + 1u;
  __syncthreads();  // every thread read the count before thread 0 updates it
  bool ok = true;
  if (threadIdx.x < a.world) {
    __threadfence_system();
    red_add_release_sys(reinterpret_cast<uint32_t*>(a.peers[threadIdx.x]) + a.rank, 1u);
    const WaitContext w{a.error_word, a.state + kStateAbort, a.timeout_ns, config::kErrBarrier};
    ok = wait_flag_geq(reinterpret_cast<const uint32_t*>(a.peers[a.rank]) + threadIdx.x,
                       target, w, threadIdx.x);
  }
  ok = __syncthreads_and(ok);
  if (threadIdx.x == 0 && ok) a.state[kStateCalls] = target;
}
