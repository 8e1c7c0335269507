// Fused all-reduce: all-reduce + residual add + RMSNorm (+ FP8 / NVFP4 / per-token-group
// FP8 / dynamic FP8 quantization) in one kernel, bf16 or fp16 rows of `hidden` elements.
//
// Rows are the unit of work: a block owns whole rows (the norm needs a row's sum of
// squares), each thread up to kMaxVecs 16-byte vectors of a row (vector v of a row
// belongs to thread v % blockDim.x). One-shot pushes the input into the Lamport buffers
// and spins per row; two-shot splits the rows into world segments, reduce-scatters them
// through the inboxes and all-gathers the reduced rows, with the same block-level flag
// barriers as the plain all-reduce. Rounding points: moecomm/reference.py.
#include "allreduce.cuh"
#include "quant.cuh"

using namespace moecomm;
using namespace moecomm::allreduce;

namespace {

constexpr int kMaxVecs = 4;      // vectors of a row per thread
constexpr int kMaxThreads = 512;  // block size limit: hidden <= kMaxVecs * 8 * 512 = 16384

enum Quant { kNone = 0, kFp8 = 1, kFp4 = 2, kGroupFp8 = 3, kDynamicFp8 = 4 };
// What each rank contributes to the all-reduce.
enum Source { kInput = 0, kMoeReduction = 1, kMoeFinalize = 2 };

// Per-call arguments (by value). Field order and types match _FusionArgs in fusion.py.
struct FusionArgs {
  const void* input;        // [tokens, hidden]
  const void* residual_in;  // [tokens, hidden] or null (kAllReduce)
  const void* gamma;        // [hidden]
  const float* scale;       // device scalar: FP8 multiplier / NVFP4 global scale
  void* allreduce_out;      // each output may be null when the pattern does not need it
  void* residual_out;
  void* norm_out;
  uint8_t* quant_out;
  void* scale_out;
  // kMoeReduction: moe_rows = active experts' outputs [E, T, H], moe_scale = [E, T] fp32,
  //   moe_extra = token_input [T, H].
  // kMoeFinalize: moe_rows = permuted expert outputs [P, H], moe_index = [T, k] int32
  //   (< 0: not on this rank), moe_scale = expert_scale_factor [T, k] or null,
  //   moe_extra = shared_expert_output [T, H] or null.
  const void* moe_rows;
  const void* moe_scale;
  const void* moe_extra;
  const int32_t* moe_index;
  uint64_t tokens;
  uint32_t hidden;
  float eps;
  float weight_bias;
  uint32_t group_size;      // per-token-group FP8: elements per scale
  uint32_t swizzled;        // NVFP4 scale layout: 1 = 128x4 swizzled, 0 = linear
  uint32_t source;          // Source
  uint32_t moe_count;       // experts E (reduction) or top_k (finalize)
  uint32_t moe_scale_fp32;  // finalize: moe_scale is fp32 (1) or the I/O dtype (0)
  float routed_scaling;     // finalize: multiplies the routed sum
  uint32_t pad_;
};

// This rank's contribution to vector v of row `row` (before the all-reduce), rounded
// once to T as moecomm.reference.moe_reduction / moe_finalize specify.
template <typename T>
__device__ __forceinline__ Vec16 contribution(const FusionArgs& a, size_t row, int v) {
  const size_t h = a.hidden;
  if (a.source == kInput) return ld_vec16(static_cast<const T*>(a.input) + row * h + v * 8);
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  const T* rows = static_cast<const T*>(a.moe_rows);
  Pack16<T> x;
  if (a.source == kMoeReduction) {
    const float* scale = static_cast<const float*>(a.moe_scale);
    for (uint32_t e = 0; e < a.moe_count; ++e) {
      const float s = scale[e * a.tokens + row];
      x.vec = ld_vec16(rows + (e * a.tokens + row) * h + v * 8);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(to_float(x.lane[i]), s));
    }
    x.vec = ld_vec16(static_cast<const T*>(a.moe_extra) + row * h + v * 8);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], to_float(x.lane[i]));
  } else {
    for (uint32_t j = 0; j < a.moe_count; ++j) {
      const int p = a.moe_index[row * a.moe_count + j];
      if (p < 0) continue;  // adds +0 in the reference: no change to an accumulator >= +0
      x.vec = ld_vec16(rows + (size_t)p * h + v * 8);
      float w = 1.f;
      if (a.moe_scale != nullptr) {
        const size_t at = row * a.moe_count + j;
        w = a.moe_scale_fp32 ? static_cast<const float*>(a.moe_scale)[at]
                             : to_float(static_cast<const T*>(a.moe_scale)[at]);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
        acc[i] = __fadd_rn(acc[i], a.moe_scale != nullptr ? __fmul_rn(to_float(x.lane[i]), w)
                                                           : to_float(x.lane[i]));
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = __fmul_rn(acc[i], a.routed_scaling);
    if (a.moe_extra != nullptr) {
      x.vec = ld_vec16(static_cast<const T*>(a.moe_extra) + row * h + v * 8);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], to_float(x.lane[i]));
    }
  }
  return round_pack<T>(acc);
}

template <typename T>
struct Row {
  Vec16 v[kMaxVecs];
};

// The epilogue of one reduced row `row`: `ar` holds this thread's vectors of the
// all-reduced row (already rounded to T).
template <typename T, int Q>
__device__ void epilogue(const FusionArgs& a, size_t row, const Row<T>& ar) {
  const int hvec = a.hidden / 8;
  const size_t base = row * a.hidden;
  if (a.allreduce_out != nullptr) {
    for (int k = 0; k < kMaxVecs; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      if (v < hvec) st_vec16(static_cast<T*>(a.allreduce_out) + base + v * 8, ar.v[k]);
    }
  }
  if (a.residual_in == nullptr) return;  // kAllReduce

  // residual_out = io(ar + residual); the norm reads the rounded value
  float r[kMaxVecs][8];
  float sumsq = 0.f;
  for (int k = 0; k < kMaxVecs; ++k) {
    const int v = threadIdx.x + k * blockDim.x;
    if (v >= hvec) continue;
    Pack16<T> x, res, out;
    x.vec = ar.v[k];
    res.vec = ld_vec16(static_cast<const T*>(a.residual_in) + base + v * 8);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      out.lane[i] = from_float<T>(to_float(x.lane[i]) + to_float(res.lane[i]));
      r[k][i] = to_float(out.lane[i]);
      sumsq += r[k][i] * r[k][i];
    }
    if (a.residual_out != nullptr)
      st_vec16(static_cast<T*>(a.residual_out) + base + v * 8, out.vec);
  }
  const float ms = __fdiv_rn(block_sum(sumsq), (float)a.hidden);
  const float rstd = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(ms, a.eps)));

  // norm_out = io((r * rstd) * (gamma + weight_bias)); quantizers read the rounded value
  float amax_row = 0.f;
  for (int k = 0; k < kMaxVecs; ++k) {
    const int v = threadIdx.x + k * blockDim.x;
    if (v >= hvec) continue;
    Pack16<T> g, n;
    g.vec = ld_vec16(static_cast<const T*>(a.gamma) + v * 8);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float w = __fadd_rn(to_float(g.lane[i]), a.weight_bias);
      n.lane[i] = from_float<T>(__fmul_rn(__fmul_rn(r[k][i], rstd), w));
      r[k][i] = to_float(n.lane[i]);
      amax_row = fmaxf(amax_row, fabsf(r[k][i]));
    }
    if (a.norm_out != nullptr) st_vec16(static_cast<T*>(a.norm_out) + base + v * 8, n.vec);
  }

  if (Q == kFp8 || Q == kDynamicFp8) {
    float scale = 0.f;
    if (Q == kFp8) {
      scale = *a.scale;
    } else {
      // scale = max(amax / 448, 2^-9 / 448); q = e4m3(v / scale)
      const float s = fmaxf(__fdiv_rn(block_max(amax_row), 448.f), 1.f / (448.f * 512.f));
      if (threadIdx.x == 0) static_cast<float*>(a.scale_out)[row] = s;
      scale = s;
    }
    for (int k = 0; k < kMaxVecs; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      if (v >= hvec) continue;
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float q = Q == kFp8 ? __fmul_rn(r[k][i], scale) : __fdiv_rn(r[k][i], scale);
        const uint32_t c = e4m3_encode(q);
        if (i < 4) lo |= c << (8 * i); else hi |= c << (8 * (i - 4));
      }
      *reinterpret_cast<uint2*>(a.quant_out + base + v * 8) = make_uint2(lo, hi);
    }
  }

  if (Q == kFp4) {
    // 16-element blocks = vectors (2j, 2j+1), held by adjacent lanes (blockDim is even).
    const float gs = *a.scale;
    const int blocks_per_row = a.hidden / 16;
    for (int k = 0; k < kMaxVecs; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      const bool active = v < hvec;  // every lane of the warp runs the shuffle
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(active ? r[k][i] : 0.f));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      if (!active) continue;
      const uint8_t sf = e4m3_encode(__fdiv_rn(__fmul_rn(gs, amax), 6.f));
      const float sf_val = e4m3_decode(sf);
      uint32_t packed = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t c =
            sf_val == 0.f ? 0u : e2m1_encode(__fdiv_rn(__fmul_rn(r[k][i], gs), sf_val));
        packed |= c << (4 * i);
      }
      *reinterpret_cast<uint32_t*>(a.quant_out + (base + v * 8) / 2) = packed;
      if ((v & 1) == 0) {
        const size_t kb = v / 2;
        const size_t off = a.swizzled ? nvfp4_swizzled_offset(row, kb, a.hidden)
                                      : row * blocks_per_row + kb;
        static_cast<uint8_t*>(a.scale_out)[off] = sf;
      }
    }
  }

  if (Q == kGroupFp8) {
    // A group of g elements = g/8 consecutive vectors on g/8 consecutive lanes.
    const int lanes = a.group_size / 8;
    const size_t mn = (a.tokens + 3) / 4 * 4;
    for (int k = 0; k < kMaxVecs; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      const bool active = v < hvec;
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(active ? r[k][i] : 0.f));
      for (int o = 1; o < lanes; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      if (!active) continue;
      const uint32_t e = ue8m0_ceil(fmaxf(__fdiv_rn(amax, 448.f), 1e-10f));
      const float scale = ue8m0_decode(e);
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t c = e4m3_encode(__fdiv_rn(r[k][i], scale));
        if (i < 4) lo |= c << (8 * i); else hi |= c << (8 * (i - 4));
      }
      *reinterpret_cast<uint2*>(a.quant_out + base + v * 8) = make_uint2(lo, hi);
      const int group = v / lanes;
      if (v % lanes == 0) {
        // int32 word (row, group / 4) of the MN-major layout, byte group % 4
        const size_t word = (size_t)(group / 4) * mn + row;
        static_cast<uint8_t*>(a.scale_out)[word * 4 + group % 4] = (uint8_t)e;
      }
    }
  }
}

// Zero the padding of a swizzled NVFP4 scale array (rows up to a multiple of 128,
// block columns up to a multiple of 4) so it matches the reference byte for byte.
__device__ void zero_sf_padding(const FusionArgs& a) {
  const size_t cols = a.hidden / 16, pcols = (cols + 3) / 4 * 4;
  const size_t rows = a.tokens, prows = (rows + 127) / 128 * 128;
  uint8_t* sf = static_cast<uint8_t*>(a.scale_out);
  for (size_t i = global_thread_id(); i < prows * pcols; i += global_thread_count()) {
    const size_t m = i / pcols, k = i % pcols;
    if (m >= rows || k >= cols) sf[nvfp4_swizzled_offset(m, k, a.hidden)] = 0;
  }
}

template <typename T, int Q>
__device__ void oneshot(const FusionArgs& a, const Workspace& ws) {
  const uint32_t call = ws.state[0];
  const int buf = call % 3;
  const int hvec = a.hidden / 8;
  const size_t n = a.tokens * a.hidden;
  for (size_t i = global_thread_id(); i < a.tokens * hvec; i += global_thread_count()) {
    const Vec16 x = Lamport<T>::canonical(contribution<T>(a, i / hvec, (int)(i % hvec)));
    for (int r = 0; r < ws.world; ++r) {
      const int peer = (ws.rank + r) % ws.world;
      st_vec16_volatile(ws.lamport(peer, buf, ws.rank) + i * 16, x);
    }
  }
  if (Q == kFp4 && a.swizzled) zero_sf_padding(a);

  bool failed = false;
  for (size_t row = blockIdx.x; row < a.tokens; row += gridDim.x) {
    Row<T> ar;
    for (int k = 0; k < kMaxVecs && !failed; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      if (v >= hvec) continue;
      float acc[8];
      for (int s = 0; s < ws.world && !failed; ++s) {
        Vec16 x;
        failed = !wait_lamport<T>(ws, buf, s, (row * hvec + v) * 16, x);
        accumulate<T>(acc, x, s == 0);
      }
      ar.v[k] = round_pack<T>(acc);
    }
    if (__syncthreads_or(failed)) return;
    epilogue<T, Q>(a, row, ar);
  }
  // The grid has at most `tokens` blocks, so each block has read every peer's data.
  clear_previous<T>(ws, call);
  finish_call(ws, call, (uint32_t)(n * sizeof(T)));
}

template <typename T, int Q>
__device__ void twoshot(const FusionArgs& a, const Workspace& ws) {
  const uint32_t call = ws.state[0];
  const uint32_t epoch = call + 1;
  const int hvec = a.hidden / 8;
  const size_t seg = (a.tokens + ws.world - 1) / ws.world;  // rows per rank
  if (Q == kFp4 && a.swizzled) zero_sf_padding(a);

  // 1. rows of segment p go to rank p's inbox, slot `rank`
  for (int i = 1; i <= ws.world; ++i) {
    const int peer = (ws.rank + i) % ws.world;
    uint8_t* inbox = ws.base(peer) + ws.rs_off + (size_t)ws.rank * ws.rs_slot;
    for (size_t j = blockIdx.x; j < seg && peer * seg + j < a.tokens; j += gridDim.x)
      for (int v = threadIdx.x; v < hvec; v += blockDim.x)
        st_vec16(inbox + (j * hvec + v) * 16,
                 Lamport<T>::canonical(contribution<T>(a, peer * seg + j, v)));
  }
  if (!block_barrier(ws, 0, epoch)) return;
  clear_previous<T>(ws, call);

  // 2. reduce the own segment, push each reduced row to every rank
  for (size_t j = blockIdx.x; j < seg && ws.rank * seg + j < a.tokens; j += gridDim.x)
    for (int v = threadIdx.x; v < hvec; v += blockDim.x) {
      float acc[8];
      for (int s = 0; s < ws.world; ++s)
        accumulate<T>(acc, ld_vec16_cg(ws.base(ws.rank) + ws.rs_off + s * ws.rs_slot +
                                       (j * hvec + v) * 16), s == 0);
      const Vec16 r = round_pack<T>(acc);
      for (int i = 0; i < ws.world; ++i) {
        const int peer = (ws.rank + i) % ws.world;
        st_vec16(ws.base(peer) + ws.ag_off + ((ws.rank * seg + j) * hvec + v) * 16, r);
      }
    }
  if (!block_barrier(ws, 1, epoch)) return;

  // 3. every row this block index owns in any segment: epilogue from the gathered rows
  for (int p = 0; p < ws.world; ++p)
    for (size_t j = blockIdx.x; j < seg && p * seg + j < a.tokens; j += gridDim.x) {
      const size_t row = p * seg + j;
      Row<T> ar;
      for (int k = 0; k < kMaxVecs; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v < hvec) ar.v[k] = ld_vec16_cg(ws.base(ws.rank) + ws.ag_off + (row * hvec + v) * 16);
      }
      epilogue<T, Q>(a, row, ar);
    }
  finish_call(ws, call, 0);
}

// The epilogue alone on rows already reduced (by NCCL, say): residual + RMSNorm (+ quant)
// as one kernel, no communication.
template <typename T, int Q>
__device__ void local(const FusionArgs& a) {
  const int hvec = a.hidden / 8;
  if (Q == kFp4 && a.swizzled) zero_sf_padding(a);
  for (size_t row = blockIdx.x; row < a.tokens; row += gridDim.x) {
    Row<T> x;
    for (int k = 0; k < kMaxVecs; ++k) {
      const int v = threadIdx.x + k * blockDim.x;
      if (v < hvec) x.v[k] = ld_vec16(static_cast<const T*>(a.input) + (row * hvec + v) * 8);
    }
    epilogue<T, Q>(a, row, x);
  }
}

}  // namespace

#define MOECOMM_LOCAL_KERNEL(SUFFIX, T, QNAME, Q)                                     \
  extern "C" __global__ void __launch_bounds__(kMaxThreads)                           \
      fusion_local_##QNAME##_##SUFFIX(FusionArgs a) {                                 \
    local<T, Q>(a);                                                                   \
  }
#define MOECOMM_LOCAL_QUANTS(SUFFIX, T)                         \
  MOECOMM_LOCAL_KERNEL(SUFFIX, T, none, kNone)                  \
  MOECOMM_LOCAL_KERNEL(SUFFIX, T, fp8, kFp8)                    \
  MOECOMM_LOCAL_KERNEL(SUFFIX, T, fp4, kFp4)                    \
  MOECOMM_LOCAL_KERNEL(SUFFIX, T, group_fp8, kGroupFp8)         \
  MOECOMM_LOCAL_KERNEL(SUFFIX, T, dynamic_fp8, kDynamicFp8)

MOECOMM_LOCAL_QUANTS(bf16, __nv_bfloat16)
MOECOMM_LOCAL_QUANTS(fp16, __half)

#define MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, QNAME, Q)                                  \
  extern "C" __global__ void __launch_bounds__(kMaxThreads)                                \
      fusion_##ALGO##_##QNAME##_##SUFFIX(FusionArgs a, MOECOMM_AR_ARGS) {                  \
    ALGO<T, Q>(a, MOECOMM_AR_WS);                                                         \
  }
#define MOECOMM_FUSION_QUANTS(ALGO, SUFFIX, T)                   \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, none, kNone)            \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, fp8, kFp8)              \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, fp4, kFp4)              \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, group_fp8, kGroupFp8)   \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, dynamic_fp8, kDynamicFp8)

MOECOMM_FUSION_QUANTS(oneshot, bf16, __nv_bfloat16)
MOECOMM_FUSION_QUANTS(oneshot, fp16, __half)
MOECOMM_FUSION_QUANTS(twoshot, bf16, __nv_bfloat16)
MOECOMM_FUSION_QUANTS(twoshot, fp16, __half)
