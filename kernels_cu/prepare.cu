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
