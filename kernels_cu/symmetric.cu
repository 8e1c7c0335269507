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
    const size_t nvec = nbytes / 16;
    // Four independent 16-byte loads in flight per thread before the first store.
    size_t i = tid;
    for (; i + 3 * stride < nvec; i += 4 * stride) {
      Vec16 a = ld_vec16(src + 16 * i);
      Vec16 b = ld_vec16(src + 16 * (i + stride));
      Vec16 c = ld_vec16(src + 16 * (i + 2 * stride));
      Vec16 d = ld_vec16(src + 16 * (i + 3 * stride));
      st_vec16(dst + 16 * i, a);
      st_vec16(dst + 16 * (i + stride), b);
      st_vec16(dst + 16 * (i + 2 * stride), c);
      st_vec16(dst + 16 * (i + 3 * stride), d);
    }
    for (; i < nvec; i += stride) st_vec16(dst + 16 * i, ld_vec16(src + 16 * i));
    head = nvec * 16;
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
