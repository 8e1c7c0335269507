// Standalone quantizers (moecomm.quant) and the NVFP4 scale-factor interleave, bit-exact
// with moecomm.reference. Input rows are bf16 / fp16 / fp32, `cols` a multiple of 16,
// read as 16-byte vectors (E elements each). Formulas, fp32, every operation rounded to
// nearest (no contraction); the conversions are quant.cuh's, shared with fusion.cu:
//   static FP8:      q = e4m3(v * (1 / scale)), the reciprocal rounded once;
//   per-token FP8:   s = max(amax / 448, 2^-9 / 448), q = e4m3(v / s);
//   group FP8 fp32:  s = max(amax / 448, 1e-10), q = e4m3(v * (1 / s));
//   group FP8 UE8M0: s = 2^ceil(log2(max(amax / 448, 1e-10))), q = e4m3(v / s);
//   NVFP4:           sf = e4m3(gs * (amax * (1/6))), o = gs / float(sf) (0 if sf is 0),
//                    code = e2m1(v * o), two codes per byte, the even element low.
// Every kernel walks its work items with a grid-stride loop (the host sizes the grid:
// moecomm.quant._grid) and writes every byte of its outputs' layouts, padding
// included, so no output needs clearing first. Each is launched with programmatic
// dependent launch unless the caller turns it off: it reads nothing before pdl_wait(), and
// lets the next kernel start launching at once (a dependent that reads its outputs waits
// for its whole grid in its own pdl_wait()), so that back-to-back kernels overlap one's
// tail with the next one's launch.
#include "args.cuh"
#include "quant.cuh"

using namespace moecomm;

namespace {

// Static per-tensor FP8: one thread per vector.
template <typename T>
__device__ __forceinline__ void fp8_static(const QuantArgs& a) {
  constexpr int E = Pack16<T>::kLanes;
  const float inv = __frcp_rn(*a.scale);
  const size_t n = a.rows * a.cols / E;
  const T* x = static_cast<const T*>(a.x);
  for (size_t i = global_thread_id(); i < n; i += global_thread_count()) {
    Pack16<T> v;
    v.vec = ld_vec16(x + i * E);
    float y[E];
#pragma unroll
    for (int k = 0; k < E; ++k) y[k] = __fmul_rn(to_float(v.lane[k]), inv);
    store_codes<E>(a.q + i * E, pack_codes<E>(y));
  }
}

// Dynamic per-token FP8: one block per row (amax over the block, then the row again).
template <typename T>
__device__ __forceinline__ void fp8_token(const QuantArgs& a) {
  constexpr int E = Pack16<T>::kLanes;
  const uint32_t nv = a.cols / E;
  for (size_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    float amax = 0.f;
    for (uint32_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Pack16<T> v;
      v.vec = ld_vec16(x + i * E);
#pragma unroll
      for (int k = 0; k < E; ++k) amax = fmaxf(amax, fabsf(to_float(v.lane[k])));
    }
    amax = block_reduce<true>(amax);
    const float s = fmaxf(__fdiv_rn(amax, 448.f), 1.f / (448.f * 512.f));
    for (uint32_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Pack16<T> v;
      v.vec = ld_vec16(x + i * E);
      float y[E];
#pragma unroll
      for (int k = 0; k < E; ++k) y[k] = __fdiv_rn(to_float(v.lane[k]), s);
      store_codes<E>(a.q + row * a.cols + i * E, pack_codes<E>(y));
    }
    if (threadIdx.x == 0) static_cast<float*>(a.scale_out)[row] = s;
  }
}

// Per-token-group FP8. The group's scale from its amax, per format: fp32 s (codes times
// fp32(1 / s)) or the UE8M0 byte e (codes divided by 2^(e - 127)).
struct GroupScale {
  float s, div, mul;
  uint32_t e;
  __device__ __forceinline__ explicit GroupScale(float amax) {
    s = fmaxf(__fdiv_rn(amax, 448.f), 1e-10f);
    e = ue8m0_ceil(s);
    div = ue8m0_decode(e);
    mul = __frcp_rn(s);
  }
  // v in units of the scale (its e4m3 code is e4m3_encode of this)
  __device__ __forceinline__ float scaled(float v, bool ue8m0) const {
    return ue8m0 ? __fdiv_rn(v, div) : __fmul_rn(v, mul);
  }
};

// Byte of group slot (row, gi) in the UE8M0 MN-major storage (mn = rows rounded up to 4).
__device__ __forceinline__ size_t ue8m0_byte(uint32_t row, uint32_t gi, uint32_t mn) {
  return ((size_t)(gi / 4) * mn + row) * 4 + gi % 4;
}

// Codes of 16 consecutive elements at x (one 16-byte store at q).
template <typename T>
__device__ __forceinline__ void group_chunk_codes(const Pack16<T> (&v)[16 / Pack16<T>::kLanes],
                                                  const GroupScale& gs, bool ue8m0, uint8_t* q) {
  constexpr int E = Pack16<T>::kLanes;
  float y[16];
#pragma unroll
  for (int j = 0; j < 16 / E; ++j)
#pragma unroll
    for (int k = 0; k < E; ++k) y[j * E + k] = gs.scaled(to_float(v[j].lane[k]), ue8m0);
  const Codes<16> c = pack_codes<16>(y);
  st_vec16(q, Vec16{c.w[0], c.w[1], c.w[2], c.w[3]});
}

// Groups of up to 512 elements with a power-of-two number L of 16-element chunks: one
// thread per chunk, a group on L adjacent lanes (amax by shuffles; chunks of a group
// never straddle a warp, since K / 16 is a multiple of L): a warp reads 1 KiB of bf16
// rows and writes 512 bytes of codes. Other group sizes: one thread per group, looping
// over its chunks twice (amax, then codes). Scales: fp32 [rows, groups], or the UE8M0
// bytes, whose storage padding (bytes of missing groups in each row's last word, words of
// rows rows..mn-1 except in the last word column, which the storage does not have) the
// grid then writes as 0.
template <typename T>
__device__ __forceinline__ void fp8_group(const QuantArgs& a) {
  constexpr int E = Pack16<T>::kLanes, V = 16 / E;
  const uint32_t g = a.group_size, groups = a.cols / g, chunks = a.cols / 16;
  const uint32_t rows = (uint32_t)a.rows;
  const uint32_t words = (groups + 3) / 4, mn = (rows + 3) / 4 * 4;
  const bool ue8m0 = a.ue8m0 != 0;
  const uint32_t lanes = g / 16;  // L
  const T* x = static_cast<const T*>(a.x);
  uint8_t* sf8 = static_cast<uint8_t*>(a.scale_out);
  float* sf32 = static_cast<float*>(a.scale_out);
  const size_t tid = global_thread_id(), stride = global_thread_count();
  if (lanes <= 32 && (lanes & (lanes - 1)) == 0) {
    const size_t n = (size_t)rows * chunks;
    const uint32_t lane = threadIdx.x % 32;
    for (size_t u = tid; u - lane < n; u += stride) {  // warp-uniform: shuffles below
      const bool active = u < n;
      Pack16<T> v[V];
      float amax = 0.f;
      if (active) {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j].vec = ld_vec16(x + u * 16 + j * E);
#pragma unroll
        for (int j = 0; j < V; ++j)
#pragma unroll
          for (int k = 0; k < E; ++k) amax = fmaxf(amax, fabsf(to_float(v[j].lane[k])));
      }
      for (uint32_t o = 1; o < lanes; o <<= 1)
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      if (!active) continue;
      const GroupScale gs(amax);
      group_chunk_codes<T>(v, gs, ue8m0, a.q + u * 16);
      const uint32_t row = (uint32_t)(u / chunks), c = (uint32_t)(u - (size_t)row * chunks);
      if (c % lanes == 0) {
        if (ue8m0) sf8[ue8m0_byte(row, c / lanes, mn)] = (uint8_t)gs.e;
        else sf32[(size_t)row * groups + c / lanes] = gs.s;
      }
    }
  } else {
    const size_t n = (size_t)rows * groups;
    for (size_t u = tid; u < n; u += stride) {
      const size_t first = u * g;  // element offset of the group (rows are contiguous)
      float amax = 0.f;
      for (uint32_t i = 0; i < g; i += 16) {
        Pack16<T> v[V];
#pragma unroll
        for (int j = 0; j < V; ++j) v[j].vec = ld_vec16(x + first + i + j * E);
#pragma unroll
        for (int j = 0; j < V; ++j)
#pragma unroll
          for (int k = 0; k < E; ++k) amax = fmaxf(amax, fabsf(to_float(v[j].lane[k])));
      }
      const GroupScale gs(amax);
      for (uint32_t i = 0; i < g; i += 16) {
        Pack16<T> v[V];
#pragma unroll
        for (int j = 0; j < V; ++j) v[j].vec = ld_vec16(x + first + i + j * E);
        group_chunk_codes<T>(v, gs, ue8m0, a.q + first + i);
      }
      const uint32_t row = (uint32_t)(u / groups), gi = (uint32_t)(u - (size_t)row * groups);
      if (ue8m0) sf8[ue8m0_byte(row, gi, mn)] = (uint8_t)gs.e;
      else sf32[u] = gs.s;
    }
  }
  if (ue8m0) {  // the storage's padding
    const uint32_t tail = words * 4 - groups;  // missing groups of a row's last word
    const size_t pad_rows = (size_t)rows * tail, gap = (size_t)(mn - rows) * (words - 1) * 4;
    for (size_t i = tid; i < pad_rows + gap; i += stride) {
      if (i < pad_rows) {
        sf8[ue8m0_byte((uint32_t)(i / tail), groups + (uint32_t)(i % tail), mn)] = 0;
      } else {
        const size_t j = i - pad_rows;  // (gap row, slot) of the first words - 1 columns
        const uint32_t slot = (uint32_t)(j % ((words - 1) * 4));
        sf8[ue8m0_byte(rows + (uint32_t)(j / ((words - 1) * 4)), slot, mn)] = 0;
      }
    }
  }
}

// NVFP4, one 16-element block: its amax (exact in T: packed max for 16-bit T), scale byte
// and 16 codes (two words, element 2i in the low nibble of byte i).
template <typename T>
__device__ __forceinline__ uint8_t nvfp4_block(const Vec16 (&v)[16 / Pack16<T>::kLanes],
                                               float gs, uint2& codes) {
  constexpr int V = 16 / Pack16<T>::kLanes;
  float f[16];
  float amax;
  if constexpr (sizeof(T) == 2) {
    using P = Packed2<T>;
    const uint32_t w[8] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
    typename P::type m = __habs2(P::of(w[0]));
#pragma unroll
    for (int i = 1; i < 8; ++i) m = __hmax2(m, __habs2(P::of(w[i])));
    const float2 m2 = P::to_float2(m);
    amax = fmaxf(0.f, fmaxf(m2.x, m2.y));  // as fmaxf over |v|: NaN lanes drop out
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 e = P::to_float2(P::of(w[i]));
      f[2 * i] = e.x;
      f[2 * i + 1] = e.y;
    }
  } else {
    amax = 0.f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      Pack16<T> p;
      p.vec = v[j];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        f[j * 4 + k] = to_float(p.lane[k]);
        amax = fmaxf(amax, fabsf(f[j * 4 + k]));
      }
    }
  }
  const uint8_t code = e4m3_encode(__fmul_rn(gs, __fmul_rn(amax, 1.f / 6.f)));
  const float sf_val = e4m3_decode(code);
  const float out_scale = sf_val == 0.f ? 0.f : __fdiv_rn(gs, sf_val);
  float p[2][8];
#pragma unroll
  for (int i = 0; i < 16; ++i) p[i / 8][i % 8] = __fmul_rn(f[i], out_scale);
  codes = make_uint2(e2m1_pack8(p[0]), e2m1_pack8(p[1]));
  return code;
}

// NVFP4 work item: blocks kb and kb + 1 of `row` (two 16-byte loads per block of
// bf16/fp16, four of fp32, all issued first; 16 bytes of codes out, or two 8-byte stores
// where they are not 16-byte aligned). Returns the scale bytes (block kb + i in byte i),
// 0 for blocks outside the matrix (the swizzled layout's padding).
template <typename T>
__device__ __forceinline__ uint32_t nvfp4_pair(const QuantArgs& a, uint32_t row, uint32_t kb,
                                               uint32_t kc, float gs, bool wide_q) {
  constexpr int V = 16 / Pack16<T>::kLanes;  // vectors per block
  if (row >= (uint32_t)a.rows || kb >= kc) return 0;
  const bool two = kb + 1 < kc;
  const T* src = static_cast<const T*>(a.x) + (size_t)row * a.cols + kb * 16;
  Vec16 v0[V], v1[V];
#pragma unroll
  for (int j = 0; j < V; ++j) v0[j] = ld_vec16(src + j * Pack16<T>::kLanes);
  if (two) {
#pragma unroll
    for (int j = 0; j < V; ++j) v1[j] = ld_vec16(src + 16 + j * Pack16<T>::kLanes);
  }
  uint2 c0, c1 = make_uint2(0u, 0u);
  const uint32_t s0 = nvfp4_block<T>(v0, gs, c0);
  const uint32_t s1 = two ? nvfp4_block<T>(v1, gs, c1) : 0u;
  uint8_t* q = a.q + (size_t)row * (a.cols / 2) + kb * 8;
  if (wide_q) {
    *reinterpret_cast<uint4*>(q) = make_uint4(c0.x, c0.y, c1.x, c1.y);
  } else {
    *reinterpret_cast<uint2*>(q) = c0;
    if (two) *reinterpret_cast<uint2*>(q + 8) = c1;
  }
  return s0 | s1 << 8;
}

// NVFP4: one thread per pair of scale bytes, walked in the memory order of the scale
// output, so a warp's scale stores are contiguous. Swizzled: the 128x4 layout's order (a
// warp covers 16 rows x 4 blocks, whose codes are 32 contiguous bytes per row), padding
// rows and columns included and written as 0, so the whole array is written in the same
// pass. Linear: row-major pairs, a half pair at each row's end when the row has an odd
// number of blocks. A thread's position advances by the grid stride without a division
// per item. (Pairs rather than single blocks: fewer instructions per block, and the
// 16-byte code stores; measured on H200 at 4096 x 7168 bf16, 22.3 us against 22.7.)
template <typename T>
__device__ __forceinline__ void nvfp4(const QuantArgs& a) {
  const uint32_t kc = a.cols / 16, rows = (uint32_t)a.rows;
  const uint32_t start = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  const float gs = *a.scale;
  uint8_t* sf = static_cast<uint8_t*>(a.scale_out);
  const bool wide_q = kc % 2 == 0 && (reinterpret_cast<uintptr_t>(a.q) & 15) == 0;
  if (a.swizzled) {
    // byte offset o = band * band_bytes + tile * 512 + (m % 32) * 16 + (m % 128 / 32) * 4 + kb % 4
    const uint32_t band_bytes = (kc + 3) / 4 * 512, bands = (rows + 127) / 128;
    const uint32_t step = 2 * stride, dband = step / band_bytes, drem = step - dband * band_bytes;
    uint32_t band = 2 * start / band_bytes, rem = 2 * start - band * band_bytes;
    while (band < bands) {
      const uint32_t j = rem % 512;
      const uint32_t row = band * 128 + (j % 16) / 4 * 32 + j / 16;
      const uint32_t kb = rem / 512 * 4 + j % 4;
      const uint32_t s = nvfp4_pair<T>(a, row, kb, kc, gs, wide_q);
      *reinterpret_cast<uint16_t*>(sf + (size_t)band * band_bytes + rem) = (uint16_t)s;
      band += dband;
      rem += drem;
      if (rem >= band_bytes) {
        rem -= band_bytes;
        ++band;
      }
    }
    return;
  }
  const uint32_t items = (kc + 1) / 2;  // per row
  const bool wide_sf = kc % 2 == 0 && (reinterpret_cast<uintptr_t>(sf) & 1) == 0;
  const uint32_t drow = stride / items, dk = stride - drow * items;
  uint32_t row = start / items, k = start - row * items;
  while (row < rows) {
    const uint32_t kb = 2 * k;
    const size_t off = (size_t)row * kc + kb;
    const uint32_t s = nvfp4_pair<T>(a, row, kb, kc, gs, wide_q);
    if (wide_sf) {
      *reinterpret_cast<uint16_t*>(sf + off) = (uint16_t)s;
    } else {
      sf[off] = (uint8_t)s;
      if (kb + 1 < kc) sf[off + 1] = (uint8_t)(s >> 8);
    }
    row += drow;
    k += dk;
    if (k >= items) {
      k -= items;
      ++row;
    }
  }
}

// Linear scale factors [rows, cols/16] -> the 128x4 swizzled layout: one thread per
// 4-byte word of the output (4 scale columns of one row), in memory order; padding 0.
__device__ __forceinline__ void sf_interleave(const QuantArgs& a) {
  const uint32_t kc = a.cols / 16, kt = (kc + 3) / 4, rows = (uint32_t)a.rows;
  const uint32_t words = (rows + 127) / 128 * 128 * kt;
  const uint8_t* src = static_cast<const uint8_t*>(a.x);
  uint32_t* dst = static_cast<uint32_t*>(a.scale_out);
  for (uint32_t w = (uint32_t)global_thread_id(); w < words; w += (uint32_t)global_thread_count()) {
    const uint32_t band = w / (kt * 128), rem = w - band * kt * 128;
    const uint32_t tile = rem / 128, j = rem % 128;  // word j of a 512-byte tile
    const uint32_t m = band * 128 + (j % 4) * 32 + j / 4;
    uint32_t word = 0;
    if (m < rows) {
#pragma unroll
      for (uint32_t i = 0; i < 4; ++i) {
        const uint32_t k = tile * 4 + i;
        if (k < kc) word |= (uint32_t)src[(size_t)m * kc + k] << (8 * i);
      }
    }
    dst[w] = word;
  }
}

// Every kernel's first step (see the file comment).
__device__ __forceinline__ void pdl_prologue() {
  pdl_wait();
  pdl_launch_dependents();
}

}  // namespace

#define MOECOMM_QUANT_KERNELS(SUFFIX, T)                                                       \
  extern "C" __global__ void __launch_bounds__(256) quant_fp8_static_##SUFFIX(const QuantArgs a) { \
    pdl_prologue();                                                                            \
    fp8_static<T>(a);                                                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) quant_fp8_token_##SUFFIX(const QuantArgs a) { \
    pdl_prologue();                                                                            \
    fp8_token<T>(a);                                                                           \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) quant_fp8_group_##SUFFIX(const QuantArgs a) { \
    pdl_prologue();                                                                            \
    fp8_group<T>(a);                                                                           \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) quant_nvfp4_##SUFFIX(const QuantArgs a) {  \
    pdl_prologue();                                                                            \
    nvfp4<T>(a);                                                                               \
  }

MOECOMM_QUANT_KERNELS(bf16, __nv_bfloat16)
MOECOMM_QUANT_KERNELS(fp16, __half)
MOECOMM_QUANT_KERNELS(fp32, float)

extern "C" __global__ void __launch_bounds__(256) nvfp4_sf_interleave(const QuantArgs a) {
  pdl_prologue();
  sf_interleave(a);
}
