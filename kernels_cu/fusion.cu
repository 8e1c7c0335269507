// Fused all-reduce: all-reduce + residual add + RMSNorm (+ FP8 / NVFP4 / per-token-group
// FP8 / dynamic FP8 quantization) in one kernel, bf16 or fp16 rows of `hidden` elements.
//
// Rows are the unit of work: a block owns whole rows (the norm needs a row's sum of
// squares); thread t holds vectors t and t + blockDim.x of a row (16 bytes each, at most
// V). One-shot: every block pushes its rows' contributions into the Lamport
// buffers, prefetches gamma and the residual, then polls, reduces and runs the epilogue
// row by row. Two-shot: the rows are split into world segments, reduce-scattered through
// the inboxes and all-gathered, with block-level flags (protocol: allreduce.cuh). The
// `local` kernels run the epilogue alone on rows already reduced (rmsnorm_fusion). A
// swizzled NVFP4 scale array's padding rows are zeroed by blocks past the rows' where the
// host adds them (one-shot and local, few tokens), else by every thread.
//
// Rounding points: moecomm.reference (each intermediate rounded to the I/O dtype where the
// unfused ops round; quantizers read the rounded norm output). Quantizers, fp32, every
// operation rounded to nearest (no contraction):
//   FP8 static: q = e4m3(v * (1 / scale)), the reciprocal rounded once;
//   dynamic FP8: s = max(amax / 448, 2^-9 / 448), q = e4m3(v / s);
//   group FP8: s = 2^ceil(log2(max(amax / 448, 1e-10))), q = e4m3(v / s);
//   NVFP4: sf = e4m3(gs * (amax * (1/6))), o = gs / float(sf) (0 if sf is 0),
//          code = e2m1(v * o).
#include "allreduce.cuh"
#include "quant.cuh"

using namespace moecomm;
using namespace moecomm::allreduce;

namespace {

// A thread holds V 16-byte vectors of a row. Kernels suffixed _v1: V = 1, at most 512
// threads a block (registers to spare); _w1: V = 1, up to 1024 threads (64 registers);
// _v2: V = 2, up to 1024 threads (rows of up to 16384 16-bit elements on one block).
// The algorithms take V and kThreads, the kernel's most threads per block.
static_assert(2 * 8 * 1024 >= config::kFusionMaxHidden, "rows must fit a block");


// This rank's contribution to vector v of row `row` (before the all-reduce), rounded
// once to T as moecomm.reference.moe_reduction / moe_finalize specify.
template <typename T>
__device__ __forceinline__ Vec16 contribution(const FusionArgs& a, size_t row, int v) {
  const size_t h = a.hidden;
  if (a.source == kSourceInput) return ld_vec16(static_cast<const T*>(a.input) + row * h + v * 8);
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  const T* rows = static_cast<const T*>(a.moe_rows);
  Pack16<T> x;
  if (a.source == kSourceMoeReduction) {
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


// A thread's share of one row: vectors threadIdx.x + k * blockDim.x, k < V.
template <int V>
struct RowVecs {
  Vec16 v[V];
};

// The part of a row this block holds. A row belongs to a cluster of blocks (sm_90 thread
// block clusters; one block elsewhere): block c of n holds vectors [c, c + 1) * hvec / n,
// thread t vectors first + t + k * blockDim.x. The row's sum of squares (and amax) are
// reduced over the cluster; group and NVFP4 blocks never straddle two blocks (the host
// keeps a block's share a multiple of 32 vectors).
struct RowSlice {
  int first, end;  // vectors of a row

  __device__ explicit RowSlice(int hvec) {
    // clusters of 1, 2, 4 or 8 blocks: a shift, not an integer division (about 25
    // instructions ahead of the first push)
    const int len = hvec >> (31 - __clz((int)cluster_size()));
    first = (int)cluster_rank() * len;
    end = first + len;
  }
  __device__ __forceinline__ int vec(int k) const { return first + threadIdx.x + k * blockDim.x; }
  __device__ __forceinline__ bool has(int k) const { return vec(k) < end; }
  // Rows: this block's cluster, stepping by the grid's clusters (read when needed, so
  // they hold no registers).
  __device__ __forceinline__ uint32_t first_row() const { return cluster_id(); }
  __device__ __forceinline__ uint32_t row_step() const { return cluster_count(); }
  __device__ __forceinline__ bool leader() const { return cluster_rank() == 0; }
};

template <typename T, int V>
__device__ __forceinline__ void load_row(const void* src, size_t row, int hvec,
                                         const RowSlice& sl, RowVecs<V>& out) {
  const T* p = static_cast<const T*>(src) + row * hvec * 8;
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (sl.has(k)) out.v[k] = ld_vec16(p + sl.vec(k) * 8);
}

// What the epilogue reads besides the reduced row, loaded before the polling.
template <int V>
struct Prefetch {
  RowVecs<V> gamma;
  float scale;  // FP8: 1 / scale_factor; NVFP4: the global scale
};

template <typename T, int Q, int V>
__device__ __forceinline__ Prefetch<V> prefetch(const FusionArgs& a, const RowSlice& sl) {
  Prefetch<V> f;
  f.scale = 0.f;
  if (a.residual_in != nullptr) load_row<T, V>(a.gamma, 0, a.hidden / 8, sl, f.gamma);
  if (Q == kQuantFp8) f.scale = __frcp_rn(*a.scale);
  if (Q == kQuantNvfp4) f.scale = *a.scale;
  return f;
}

// The epilogue of reduced row `row`: `ar` holds this thread's vectors of the all-reduced
// row (rounded to T), `res` its residual vectors.
template <typename T, int Q, int V>
__device__ __forceinline__ void epilogue(const FusionArgs& a, size_t row, const RowSlice& sl,
                                         const RowVecs<V>& ar, const RowVecs<V>& res,
                                         const Prefetch<V>& f) {
  const int hvec = a.hidden / 8;
  const size_t base = row * a.hidden;
  if (a.allreduce_out != nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (sl.has(k)) st_vec16(static_cast<T*>(a.allreduce_out) + base + sl.vec(k) * 8, ar.v[k]);
  }
  if (a.residual_in == nullptr) return;  // kAllReduce

  // residual_out = io(ar + residual); the norm reads the rounded value
  float r[V][8];
  float sumsq = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int v = sl.vec(k);
    if (v >= sl.end) continue;
    Pack16<T> x, rs, out;
    x.vec = ar.v[k];
    rs.vec = res.v[k];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      out.lane[i] = from_float<T>(__fadd_rn(to_float(x.lane[i]), to_float(rs.lane[i])));
      r[k][i] = to_float(out.lane[i]);
      sumsq = __fadd_rn(sumsq, __fmul_rn(r[k][i], r[k][i]));
    }
    if (a.residual_out != nullptr)
      st_vec16(static_cast<T*>(a.residual_out) + base + v * 8, out.vec);
  }
  const float ms = __fdiv_rn(cluster_reduce<false>(sumsq), (float)a.hidden);
  const float rstd = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(ms, a.eps)));

  // norm_out = io((r * rstd) * (gamma + weight_bias)); quantizers read the rounded value
  float amax_row = 0.f;
  float amax_vec[V];  // per vector (NVFP4: two make a block); 0 where inactive
#pragma unroll
  for (int k = 0; k < V; ++k) {
    amax_vec[k] = 0.f;
    const int v = sl.vec(k);
    if (v >= sl.end) continue;
    Pack16<T> g, n;
    g.vec = f.gamma.v[k];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float w = __fadd_rn(to_float(g.lane[i]), a.weight_bias);
      n.lane[i] = from_float<T>(__fmul_rn(__fmul_rn(r[k][i], rstd), w));
      r[k][i] = to_float(n.lane[i]);
      amax_vec[k] = fmaxf(amax_vec[k], fabsf(r[k][i]));
    }
    amax_row = fmaxf(amax_row, amax_vec[k]);
    if (a.norm_out != nullptr) st_vec16(static_cast<T*>(a.norm_out) + base + v * 8, n.vec);
  }

  if (Q == kQuantFp8 || Q == kQuantDynamicFp8) {
    float s = 0.f;
    if (Q == kQuantDynamicFp8) {
      s = fmaxf(__fdiv_rn(cluster_reduce<true>(amax_row), 448.f), 1.f / (448.f * 512.f));
      if (threadIdx.x == 0 && sl.leader()) static_cast<float*>(a.scale_out)[row] = s;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int v = sl.vec(k);
      if (v >= sl.end) continue;
      float q[8];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        q[i] = Q == kQuantFp8 ? __fmul_rn(r[k][i], f.scale) : __fdiv_rn(r[k][i], s);
      store_codes<8>(a.quant_out + base + v * 8, pack_codes<8>(q));
    }
  }

  if (Q == kQuantNvfp4) {
    // 16-element blocks = vectors (2j, 2j+1), held by adjacent lanes (blockDim is even).
    const float gs = f.scale;
    const int blocks_per_row = a.hidden / 16;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int v = sl.vec(k);
      const bool active = v < sl.end;  // every lane of the warp runs the shuffle
      const float amax = fmaxf(amax_vec[k], __shfl_xor_sync(0xffffffffu, amax_vec[k], 1));
      if (!active) continue;
      const uint8_t sf = e4m3_encode(__fmul_rn(gs, __fmul_rn(amax, 1.f / 6.f)));
      const float sf_val = e4m3_decode(sf);
      const float out_scale = sf_val == 0.f ? 0.f : __fdiv_rn(gs, sf_val);
      float p[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) p[i] = __fmul_rn(r[k][i], out_scale);
      const uint32_t packed = e2m1_pack8(p);
      *reinterpret_cast<uint32_t*>(a.quant_out + (base + v * 8) / 2) = packed;
      if ((v & 1) == 0) {
        const uint32_t kb = (uint32_t)v / 2;
        const size_t off = a.swizzled ? nvfp4_swizzled_offset(row, kb, a.hidden)
                                      : row * blocks_per_row + kb;
        static_cast<uint8_t*>(a.scale_out)[off] = sf;
      }
    }
  }

  if (Q == kQuantGroupFp8) {
    // A group of g elements = g/8 consecutive vectors on g/8 consecutive lanes.
    const int lanes = a.group_size / 8;
    const size_t mn = (a.tokens + 3) / 4 * 4;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int v = sl.vec(k);
      const bool active = v < sl.end;
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(active ? r[k][i] : 0.f));
      for (int o = 1; o < lanes; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      if (!active) continue;
      const uint32_t e = ue8m0_ceil(fmaxf(__fdiv_rn(amax, 448.f), 1e-10f));
      const float scale = ue8m0_decode(e);
      float q[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) q[i] = __fdiv_rn(r[k][i], scale);
      store_codes<8>(a.quant_out + base + v * 8, pack_codes<8>(q));
      const int group = v / lanes;
      if (v % lanes == 0) {
        // int32 word (row, group / 4) of the MN-major layout, byte group % 4
        uint8_t* sf = static_cast<uint8_t*>(a.scale_out);
        const size_t word = (size_t)(group / 4) * mn + row;
        sf[word * 4 + group % 4] = (uint8_t)e;
        // The storage's padding is written 0, as the reference and quant.cu write it:
        // the missing groups of a row's last word, and this group's byte in the rows
        // tokens..mn-1 of every word column but the last (which the storage lacks).
        const int groups = (int)(a.hidden / a.group_size);
        if (group == groups - 1)
          for (int b = group % 4 + 1; b < 4; ++b) sf[word * 4 + b] = 0;
        if (row + 1 == a.tokens && group / 4 < (groups - 1) / 4)
          for (size_t pad = a.tokens; pad < mn; ++pad)
            sf[((size_t)(group / 4) * mn + pad) * 4 + group % 4] = 0;
      }
    }
  }
}

// Zero the padding of a swizzled NVFP4 scale array (rows up to a multiple of 128, block
// columns up to a multiple of 4) so it matches the reference byte for byte. Padding rows
// live in the last 128-row band only; that band's 512-byte tiles are walked 16 bytes at a
// time in memory order (consecutive threads, consecutive chunks: coalesced). Chunk m of a
// tile holds 4 scale columns of rows m, m + 32, m + 64, m + 96 of the band (one word
// each): one 16-byte store of zeros when all four rows are padding (and the array is
// 16-byte aligned), else a word per padding row. The bytes past the last column of real
// rows (hidden % 64 != 0) follow one by one.
// Threads tid, tid + stride, ... share the work.
__device__ __forceinline__ void zero_sf_padding(const FusionArgs& a, uint32_t tid,
                                                uint32_t stride) {
  const uint32_t cols = a.hidden / 16, tiles = (cols + 3) / 4;
  const uint32_t rows = (uint32_t)a.tokens, band = rows / 128;
  uint8_t* sf = static_cast<uint8_t*>(a.scale_out);
  if (rows % 128) {
    const bool wide = (reinterpret_cast<uintptr_t>(sf) & 15) == 0;  // else 4-byte aligned
    uint8_t* tile0 = sf + (size_t)band * tiles * 512;
    for (uint32_t i = tid; i < tiles * 32; i += stride) {
      const uint32_t m = i % 32, row = band * 128 + m;  // the row of the chunk's word 0
      uint8_t* chunk = tile0 + (size_t)(i / 32) * 512 + m * 16;
      if (row >= rows && wide) {
        st_vec16(chunk, Vec16{0u, 0u, 0u, 0u});
      } else {
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q)
          if (row + 32 * q >= rows) reinterpret_cast<uint32_t*>(chunk)[q] = 0u;
      }
    }
  }
  const uint32_t tail = tiles * 4 - cols;  // padding bytes in the last word of a real row
  for (uint32_t i = tid; i < rows * tail; i += stride)
    sf[nvfp4_swizzled_offset(i / tail, cols + i % tail, a.hidden)] = 0;
}

__device__ __forceinline__ void zero_sf_padding(const FusionArgs& a) {
  zero_sf_padding(a, (uint32_t)global_thread_id(), (uint32_t)global_thread_count());
}

// Where the host added blocks past the rows' clusters (moecomm/fusion.py, _padding_grid),
// those blocks alone zero the padding, so that the rows' warps, whose chain of dependent
// instructions sets a small call's time, do none of it; else every thread shares it.
__device__ __forceinline__ void zero_sf_padding_aside(const FusionArgs& a) {
  const uint32_t row_blocks =
      (uint32_t)min((uint64_t)cluster_count(), a.tokens) * cluster_size();
  if (gridDim.x <= row_blocks) {
    zero_sf_padding(a);
  } else if (blockIdx.x >= row_blocks) {
    zero_sf_padding(a, (blockIdx.x - row_blocks) * blockDim.x + threadIdx.x,
                    (gridDim.x - row_blocks) * blockDim.x);
  }
}

// The split one-shot's pushers (push_blocks > 0): every row's contributions, walked flat
// (vector i of the walk is vector i % hvec of row i / hvec, advanced without a division),
// kPushUnroll vectors in flight per thread.
template <typename T>
__device__ __forceinline__ void push_rows_flat(const FusionArgs& a, int buf) {
  constexpr int kPushUnroll = 4;
  const int hvec = a.hidden / 8;
  const size_t total = a.tokens * hvec, stride = (size_t)a.push_blocks * blockDim.x;
  const size_t drow = stride / hvec;
  const int dv = (int)(stride - drow * hvec);
  size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t row = i0 / hvec;
  int v = (int)(i0 - row * hvec);
  for (; i0 < total; i0 += kPushUnroll * stride) {
    Vec16 x[kPushUnroll];
#pragma unroll
    for (int u = 0; u < kPushUnroll; ++u) {
      if (i0 + u * stride < total) x[u] = contribution<T>(a, row, v);
      row += drow;
      v += dv;
      if (v >= hvec) {
        v -= hvec;
        ++row;
      }
    }
#pragma unroll
    for (int u = 0; u < kPushUnroll; ++u)
      if (i0 + u * stride < total)
        push_lamport(a.ws, buf, (i0 + u * stride) * 16, Lamport<T>::canonical(x[u]));
  }
}

// One-shot. With push_blocks = 0, every block (cluster) pushes its rows' contributions,
// then polls, reduces and runs the epilogue on them. With push_blocks = P (the split, as
// allreduce.cu's oneshot_split: one block per SM, no clusters), blocks [0, P) push every
// row and only arrive; blocks P.. clear, poll, reduce and run the epilogue on rows
// blockIdx.x - P, stepping by gridDim.x - P.
template <typename T, int Q, int V, int kThreads>
__device__ __forceinline__ void oneshot(const FusionArgs& a) {
  const ArWorkspace& ws = a.ws;
  const int hvec = a.hidden / 8;
  const RowSlice sl(hvec);
  const uint32_t pushers = a.push_blocks;
  pdl_wait();
  // The first row's contributions (canonical), loaded ahead of the call's state words so
  // that their latencies overlap, where registers are to spare (_v1: a spill elsewhere
  // costs more than it saves: hidden 7168 x 128 on one rank 6.2 against 5.7 us).
  constexpr bool kEarly = kThreads <= 512;
  const size_t row0 = sl.first_row();
  Vec16 first[V];
  if (kEarly && pushers == 0 && row0 < a.tokens) {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (sl.has(k)) first[k] = Lamport<T>::canonical(contribution<T>(a, row0, sl.vec(k)));
  }
  const Call call = begin_call(ws);
  const int buf = call.index % 3;
  if (pushers == 0) {
    for (size_t row = row0; row < a.tokens; row += sl.row_step()) {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (sl.has(k))
          push_lamport(ws, buf, (row * hvec + sl.vec(k)) * 16,
                       kEarly && row == row0
                           ? first[k]
                           : Lamport<T>::canonical(contribution<T>(a, row, sl.vec(k))));
    }
  } else if (blockIdx.x < pushers) {
    push_rows_flat<T>(a, buf);
    pdl_launch_dependents();
    end_call(ws, call, (uint32_t)(a.tokens * a.hidden * sizeof(T)));
    return;
  }
  pdl_launch_dependents();
  const Prefetch<V> f = prefetch<T, Q, V>(a, sl);
  const uint32_t tid = (blockIdx.x - pushers) * blockDim.x + threadIdx.x;
  const uint32_t nthreads = (gridDim.x - pushers) * blockDim.x;
  clear_previous<T>(ws, call, tid, nthreads);
  if (Q == kQuantNvfp4 && a.swizzled) {
    if (pushers == 0)
      zero_sf_padding_aside(a);
    else
      zero_sf_padding(a, tid, nthreads);
  }

  const WaitContext w = wait_context(ws, config::kErrAllreduceOneshot);
  for (size_t row = sl.first_row() - pushers; row < a.tokens; row += sl.row_step() - pushers) {
    RowVecs<V> res, ar;
    if (a.residual_in != nullptr) load_row<T, V>(a.residual_in, row, hvec, sl, res);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (!sl.has(k)) continue;
      float acc[8];
      const Vec16 own = kEarly && pushers == 0 && row == row0
                            ? first[k]
                            : Lamport<T>::canonical(contribution<T>(a, row, sl.vec(k)));
      // A wait that gave up (recorded for the host) leaves garbage in acc; the block goes
      // on regardless, so that every block of its cluster meets the same cluster
      // barriers, and every later wait gives up at once (the abort word).
      reduce_lamport<T>(ws, buf, (row * hvec + sl.vec(k)) * 16, own, acc, w);
      ar.v[k] = round_pack<T>(acc);
    }
    epilogue<T, Q, V>(a, row, sl, ar, res, f);
  }
  end_call(ws, call, (uint32_t)(a.tokens * a.hidden * sizeof(T)));
}

template <typename T, int Q, int V, int kThreads>
__device__ __forceinline__ void twoshot(const FusionArgs& a) {
  const ArWorkspace& ws = a.ws;
  const int hvec = a.hidden / 8;
  const size_t seg = (a.tokens + ws.world - 1) / ws.world;  // rows per rank
  const int rank = ws.rank, world = ws.world;
  pdl_wait();
  const Call call = begin_call(ws);
  const uint64_t value = flag_value(call, 0);
  const WaitContext w = wait_context(ws, config::kErrAllreduceTwoshot);

  // 1. rows of segment p go to rank p's reduce-scatter inbox, slot `rank`
  for (int q = 1; q < world; ++q) {
    const int p = rank + q < world ? rank + q : rank + q - world;
    uint8_t* inbox = base(ws, p) + ws.rs_off + (size_t)rank * ws.rs_slot;
    for (size_t j = blockIdx.x; j < seg && p * seg + j < a.tokens; j += gridDim.x)
      for (int v = threadIdx.x; v < hvec; v += blockDim.x)
        st_vec16(inbox + (j * hvec + v) * 16,
                 Lamport<T>::canonical(contribution<T>(a, p * seg + j, v)));
  }
  signal_peers(ws, 0, value);
  pdl_launch_dependents();
  const RowSlice sl(hvec);  // launched without clusters: the whole row
  const Prefetch<V> f = prefetch<T, Q, V>(a, sl);
  clear_previous<T>(ws, call);
  if (Q == kQuantNvfp4 && a.swizzled) zero_sf_padding(a);

  // 2. reduce the own segment, push each reduced row to every rank's all-gather inbox
  bool ok = wait_peers(ws, 0, value, w);
  if (ok) {
    const uint8_t* rs = base(ws, rank) + ws.rs_off;
    for (size_t j = blockIdx.x; j < seg && rank * seg + j < a.tokens; j += gridDim.x)
      for (int v = threadIdx.x; v < hvec; v += blockDim.x) {
        float acc[8];
        for (int s = 0; s < world; ++s)
          accumulate<T>(acc,
                        s == rank ? Lamport<T>::canonical(contribution<T>(a, rank * seg + j, v))
                                  : ld_vec16_cg(rs + s * ws.rs_slot + (j * hvec + v) * 16),
                        s == 0);
        const Vec16 r = round_pack<T>(acc);
        for (int i = 0; i < world; ++i)
          st_vec16(base(ws, i) + ws.ag_off + ((rank * seg + j) * hvec + v) * 16, r);
      }
    signal_peers(ws, 1, value);
    ok = wait_peers(ws, 1, value, w);
  }

  // 3. every row this block index owns in any segment: epilogue from the gathered rows
  const uint8_t* ag = base(ws, rank) + ws.ag_off;
  for (int p = 0; p < world && ok; ++p)
    for (size_t j = blockIdx.x; j < seg && p * seg + j < a.tokens; j += gridDim.x) {
      const size_t row = p * seg + j;
      RowVecs<V> res, ar;
      if (a.residual_in != nullptr) load_row<T, V>(a.residual_in, row, hvec, sl, res);
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (sl.has(k)) ar.v[k] = ld_vec16_cg(ag + (row * hvec + sl.vec(k)) * 16);
      epilogue<T, Q, V>(a, row, sl, ar, res, f);
    }
  end_call(ws, call, 0);
}

// The epilogue alone on rows already reduced (by NCCL, say): residual + RMSNorm (+ quant)
// as one kernel, no communication.
template <typename T, int Q, int V, int kThreads>
__device__ __forceinline__ void local(const FusionArgs& a) {
  const int hvec = a.hidden / 8;
  const RowSlice sl(hvec);
  pdl_wait();
  const Prefetch<V> f = prefetch<T, Q, V>(a, sl);
  if (Q == kQuantNvfp4 && a.swizzled) zero_sf_padding_aside(a);
  for (size_t row = sl.first_row(); row < a.tokens; row += sl.row_step()) {
    RowVecs<V> res, x;
    if (a.residual_in != nullptr) load_row<T, V>(a.residual_in, row, hvec, sl, res);
    load_row<T, V>(a.input, row, hvec, sl, x);
    epilogue<T, Q, V>(a, row, sl, x, res, f);
  }
}

}  // namespace

#define MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, QNAME, Q, VNAME, V, THREADS)                \
  extern "C" __global__ void __launch_bounds__(THREADS)                                     \
      fusion_##ALGO##_##QNAME##_##SUFFIX##_##VNAME(const FusionArgs a) {                    \
    ALGO<T, Q, V, THREADS>(a);                                                              \
  }
#define MOECOMM_FUSION_QUANTS(ALGO, SUFFIX, T, VNAME, V, THREADS)                          \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, none, kQuantNone, VNAME, V, THREADS)              \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, fp8, kQuantFp8, VNAME, V, THREADS)                \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, nvfp4, kQuantNvfp4, VNAME, V, THREADS)            \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, group_fp8, kQuantGroupFp8, VNAME, V, THREADS)     \
  MOECOMM_FUSION_KERNEL(ALGO, SUFFIX, T, dynamic_fp8, kQuantDynamicFp8, VNAME, V, THREADS)
#define MOECOMM_FUSION_ALGOS(SUFFIX, T, VNAME, V, THREADS)     \
  MOECOMM_FUSION_QUANTS(oneshot, SUFFIX, T, VNAME, V, THREADS) \
  MOECOMM_FUSION_QUANTS(twoshot, SUFFIX, T, VNAME, V, THREADS) \
  MOECOMM_FUSION_QUANTS(local, SUFFIX, T, VNAME, V, THREADS)

MOECOMM_FUSION_ALGOS(bf16, __nv_bfloat16, v1, 1, 512)
MOECOMM_FUSION_ALGOS(fp16, __half, v1, 1, 512)
MOECOMM_FUSION_ALGOS(bf16, __nv_bfloat16, w1, 1, 1024)
MOECOMM_FUSION_ALGOS(fp16, __half, w1, 1, 1024)
MOECOMM_FUSION_ALGOS(bf16, __nv_bfloat16, v2, 2, 1024)
MOECOMM_FUSION_ALGOS(fp16, __half, v2, 2, 1024)
