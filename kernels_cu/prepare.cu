// Local kernels of the MoE prepare/finalize path (moecomm.moe.prepare_finalize):
// expert-id renumbering through an expert_map, and the router weight applied to the
// activations (apply_router_weight_on_input).
#include "args.cuh"

using namespace moecomm;

// ids[i] = expert_map[ids[i]] where 0 <= ids[i] < num_experts; other ids are unchanged.
extern "C" __global__ void map_expert_ids(const MapIdsArgs a) {
  pdl_wait();
  for (size_t i = global_thread_id(); i < (size_t)a.n; i += global_thread_count()) {
    const int32_t id = a.ids[i];
    if (id >= 0 && id < a.num_experts) a.ids[i] = a.expert_map[id];
  }
  pdl_launch_dependents();
}

// x[t, c] = T(float(x[t, c]) * float(T(w[t]))): the weight is first rounded to x's type,
// then the product is taken in fp32 and rounded once (a tensor multiply in x's type).
template <typename T>
__device__ __forceinline__ void scale_rows(const ScaleRowsArgs& a) {
  T* x = static_cast<T*>(a.x);
  pdl_wait();
  const size_t n = (size_t)a.tokens * a.cols;
  for (size_t i = global_thread_id(); i < n; i += global_thread_count()) {
    const float w = to_float(from_float<T>(a.w[i / a.cols]));
    x[i] = from_float<T>(to_float(x[i]) * w);
  }
  pdl_launch_dependents();
}

#define MOECOMM_SCALE_ROWS_KERNEL(SUFFIX, T) \
  extern "C" __global__ void scale_rows_##SUFFIX(const ScaleRowsArgs a) { scale_rows<T>(a); }

MOECOMM_SCALE_ROWS_KERNEL(bf16, __nv_bfloat16)
MOECOMM_SCALE_ROWS_KERNEL(fp16, __half)
MOECOMM_SCALE_ROWS_KERNEL(fp32, float)

// ------------------------------------------------------------------ the path across nodes
// After an all-gather of every rank's tokens (ids, weights, payloads), each rank takes the
// rows routed to it into the layout MoeAlltoAll's dispatch produces, and puts its expert
// outputs back into gathered order for a reduce-scatter (moecomm.moe.prepare_finalize).

// Block s numbers, in token order, the tokens of source s that go to `rank` (any valid id
// in its expert range): received row s * runtime_max + slot. Block-wide exclusive scan
// by warp ballots.
extern "C" __global__ void __launch_bounds__(1024) a2a_plan(const A2aPlanArgs a) {
  __shared__ int32_t warp_sums[32];
  __shared__ int32_t base;
  const int s = blockIdx.x;
  int64_t off = 0;
  for (int q = 0; q < s; ++q) off += a.rows[q];
  const int64_t n = a.rows[s];
  const int64_t lo = a.rank * a.experts_per_rank, hi = lo + a.experts_per_rank;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  pdl_wait();
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int64_t j0 = 0; j0 < n; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    bool mine = false;
    if (j < n) {
      const int32_t* ids = a.ids + (off + j) * a.top_k;
      for (int64_t k = 0; k < a.top_k; ++k) {
        const int32_t e = ids[k];
        mine |= e >= 0 && e < a.num_experts && e >= lo && e < hi;
      }
    }
    const uint32_t ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int32_t before = base;
    for (int w = 0; w < warp; ++w) before += warp_sums[w];
    const int32_t slot = before + __popc(ballot & ((1u << lane) - 1u));
    if (j < n) {
      a.inv[off + j] = mine ? (int32_t)(s * a.runtime_max + slot) : -1;
      if (mine) a.src_row[s * a.runtime_max + slot] = (int32_t)(off + j);
    }
    __syncthreads();  // every thread has read base and warp_sums
    if (threadIdx.x == 0) {
      int32_t total = 0;
      for (int w = 0; w < warps; ++w) total += warp_sums[w];
      base += total;
    }
    __syncthreads();
  }
  for (int64_t i = base + threadIdx.x; i < a.runtime_max; i += blockDim.x)
    a.src_row[s * a.runtime_max + i] = -1;
  pdl_launch_dependents();
}

// One warp per received row: every payload's row copied from its gathered row (ids kept
// when in [lo, hi), else -1); a padding row gets ids -1 and nothing else.
extern "C" __global__ void a2a_take_rows(const A2aTakeRowsArgs a) {
  const int lane = threadIdx.x % 32;
  const size_t warps = global_thread_count() / 32;
  pdl_wait();
  for (size_t r = global_thread_id() / 32; r < (size_t)a.n_rows; r += warps) {
    const int32_t g = a.src_row[r];
    for (int p = 0; p < a.num_payloads; ++p) {
      const uint64_t rb = a.row_bytes[p];
      uint8_t* dst = reinterpret_cast<uint8_t*>(a.dst[p]) + r * rb;
      if (p == a.id_payload) {
        const int32_t* src = reinterpret_cast<const int32_t*>(a.src[p] + (uint64_t)(g < 0 ? 0 : g) * rb);
        for (uint64_t k = lane; k < rb / 4; k += 32) {
          const int32_t e = g < 0 ? -1 : src[k];
          reinterpret_cast<int32_t*>(dst)[k] = e >= a.lo && e < a.hi ? e : -1;
        }
        continue;
      }
      if (g < 0) continue;
      const uint8_t* src = reinterpret_cast<const uint8_t*>(a.src[p]) + (uint64_t)g * rb;
      if ((((uintptr_t)src | (uintptr_t)dst | rb) & 15) == 0) {
        for (uint64_t v = lane; v < rb / 16; v += 32) st_vec16(dst + v * 16, ld_vec16(src + v * 16));
      } else {
        for (uint64_t w = lane; w < rb / 4; w += 32)
          reinterpret_cast<uint32_t*>(dst)[w] = reinterpret_cast<const uint32_t*>(src)[w];
      }
    }
  }
  pdl_launch_dependents();
}

// One warp per gathered row: the expert output of the row this rank received, or zeros.
extern "C" __global__ void a2a_put_rows(const A2aPutRowsArgs a) {
  const int lane = threadIdx.x % 32;
  const size_t warps = global_thread_count() / 32;
  pdl_wait();
  for (size_t g = global_thread_id() / 32; g < (size_t)a.total; g += warps) {
    const int32_t r = a.inv[g];
    uint8_t* dst = a.z + g * a.row_bytes;
    for (uint64_t v = lane; v < (uint64_t)a.row_bytes / 16; v += 32)
      st_vec16(dst + v * 16, r < 0 ? Vec16{} : ld_vec16(a.y + (uint64_t)r * a.row_bytes + v * 16));
  }
  pdl_launch_dependents();
}
