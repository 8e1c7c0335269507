// Kernels over a SymmetricBuffer's peer pointer table: reading peers' memory directly.
#include "args.cuh"

using namespace moecomm;

// dst[i] = src[i] for nbytes, 16 bytes a thread-step when both are 16-byte aligned and the
// tail byte by byte. src or dst may be a peer's pointer (the copy then runs over
// NVLink/PCIe, as reads or as writes); the bandwidth probe of a symmetric buffer and the
// building block of tests.
extern "C" __global__ void copy_bytes(const CopyArgs a) {
  const uint8_t* __restrict__ src = a.src;
  uint8_t* __restrict__ dst = a.dst;
  const size_t nbytes = a.nbytes;
  const size_t tid = global_thread_id();
  const size_t stride = global_thread_count();
  size_t head = 0;
  if (((uintptr_t)src & 15u) == 0 && ((uintptr_t)dst & 15u) == 0) {
    copy_vec16(dst, src, nbytes / 16);
    head = nbytes / 16 * 16;
  }
  for (size_t i = head + tid; i < nbytes; i += stride) dst[i] = src[i];
}

// out[p * nbytes + i] = byte i of peer p's buffer at `offset`, for every peer p of the
// table (local rank order), reading each peer through its device pointer.
extern "C" __global__ void gather_peers(const GatherArgs a) {
  const size_t tid = global_thread_id();
  const size_t stride = global_thread_count();
  for (int p = 0; p < a.num_peers; ++p) {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(a.peer_ptrs[p]) + a.offset;
    for (size_t i = tid; i < a.nbytes; i += stride) a.out[(size_t)p * a.nbytes + i] = src[i];
  }
}
