// Kernels of the MoE benchmark (moecomm/bench/moe.py), not of the runtime: the GPU head
// start before each eager pair, and the NCCL baseline's pack and combine steps.
#include "common.cuh"

using namespace moecomm;

// Busy-waits `ns` nanoseconds of global time, so the host has enqueued what follows
// before the GPU reaches it.
extern "C" __global__ void bench_spin(uint64_t ns) {
  const uint64_t t0 = global_timer_ns();
  while (global_timer_ns() - t0 < ns) {
  }
}

// dst[j, :] = src[idx[j], :], rows of `words` words of type V.
template <typename V>
__device__ __forceinline__ void gather_rows(V* dst, const V* src, const int* idx, int64_t rows,
                                            int64_t words) {
  const int64_t n = rows * words, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t j = i / words;
    dst[i] = src[(int64_t)idx[j] * words + (i - j * words)];
  }
}

extern "C" __global__ void bench_gather16(Vec16* dst, const Vec16* src, const int* idx,
                                          int64_t rows, int64_t words) {
  gather_rows(dst, src, idx, rows, words);
}

extern "C" __global__ void bench_gather4(uint32_t* dst, const uint32_t* src, const int* idx,
                                         int64_t rows, int64_t words) {
  gather_rows(dst, src, idx, rows, words);
}

// out[t, :] = bf16(sum over r < ep with slot[t, r] >= 0 of back[slot[t, r], :]), summed in
// fp32 from +0 in rank order and rounded to nearest even once; rows of `vecs` 16-byte
// vectors (8 bf16 each).
extern "C" __global__ void bench_combine_sum(Vec16* out, const Vec16* back, const int* slot,
                                             int64_t tokens, int64_t ep, int64_t vecs) {
  using Pack = Pack16<__nv_bfloat16>;
  const int64_t n = tokens * vecs, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t t = i / vecs, v = i - t * vecs;
    float acc[Pack::kLanes];
#pragma unroll
    for (int q = 0; q < Pack::kLanes; ++q) acc[q] = 0.f;
    for (int64_t r = 0; r < ep; ++r) {
      const int s = slot[t * ep + r];
      if (s < 0) continue;
      Pack x;
      x.vec = back[(int64_t)s * vecs + v];
#pragma unroll
      for (int q = 0; q < Pack::kLanes; ++q) acc[q] += to_float(x.lane[q]);
    }
    out[i] = round_pack<__nv_bfloat16>(acc);
  }
}
