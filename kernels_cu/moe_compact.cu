// MoE all-to-all, compact expert-major layout (moecomm/moe/compact.py, EPAllToAll).
//
// The exchange itself is MoeAlltoAll's (moe_a2a.cu): a dispatch of the payloads
// [x, topk_ids, token index, weights] brings every token once to each rank owning one of
// its experts, block s of each receive tensor holding source s's tokens in token order.
// The kernels here are local to a rank:
//
// expand  (grid G = chunks x slices): the received rows (s, i) with i < recv_counts[s],
//         flattened in (s, i) order, are cut into G / slices equal chunks; block b takes
//         chunk b / slices and copies column slice b % slices of its rows (few rows: the
//         copy spreads over more SMs; slice 0 alone writes the per-entry records). Every
//         block counts the local entries (s, i, j) of all rows per local expert (the
//         expert offsets) and of the rows before its chunk (its chunk's start in each
//         expert): a redundant read of the received ids instead of a grid-wide count pass
//         and a second kernel. Block 0 writes tokens_per_expert, the expert offsets and
//         the overflow stats. Then each block walks its chunk in order: warp 0 gives each
//         local entry its row pos = chunk start of e + entries of e before it (a stable
//         counting sort: rows ordered by local expert, then source rank, token, k slot),
//         and the block copies its slice of row (s, i) of the received x, read once, to
//         recv_x[pos] of each of its entries, with the entry's (s, token, j) and weight
//         (slice 0). Rows at pos >= capacity are dropped
//         (counted, never written). It also records where each (s, i, j) went, for
//         combine: `inv` (local combine), or, for the exact combine, pos + 1 (0: dropped)
//         stored straight into source s's `codes` [token, j] (CUDA IPC); and it keeps a
//         copy of this rank's own topk_ids, which name each slot's owner for its pull.
// pull    (exact combine, one kernel): the combine handshake of MoeAlltoAll (a2a.cuh:
//         "my y, weights and codes are ready", then wait for every rank's), after which
//         every token pulls its k rows from the owners' y buffers and sums them in slot
//         order in fp32 - the reference's single sum. Using the exchange's own combine
//         counters keeps its reasoning for the next dispatch (moe_a2a.cu) intact.
// reduce  (local combine): each received (s, i) sums its own rows in slot order in fp32
//         into MoeAlltoAll's combine payload (rounded to y's dtype); MoeAlltoAll.combine
//         then sums the ranks' partials in rank order.
// stage   copies the valid rows of y into the symmetric y buffer (exact combine, when y
//         was not written there directly).
#include "a2a.cuh"

using namespace moecomm;

namespace {

constexpr int kMaxRanks = config::kA2aMaxRanks;
static_assert(kMaxRanks <= 32, "load_prefix scans the counts in one warp");
constexpr int kMaxExperts = config::kCompactMaxLocalExperts;
constexpr int kCombineThreads = config::kCompactCombineThreads;  // pull, reduce
constexpr int kTile = config::kCompactMaxTopK;  // entries (row, slot) an expand step ranks

// Words of the stats array (moecomm.constants.CompactStat).
constexpr int kStatRows = MOECOMM_STAT_ROWS;
constexpr int kStatNeeded = MOECOMM_STAT_NEEDED;
constexpr int kStatDropped = MOECOMM_STAT_DROPPED;
constexpr int kStatMaxNeeded = MOECOMM_STAT_MAX_NEEDED;
constexpr int kStatMaxDropped = MOECOMM_STAT_MAX_DROPPED;

using DispatchParams = CompactDispatchArgs;
using PullParams = CompactPullArgs;
using ReduceParams = CompactReduceArgs;

}  // namespace

namespace {

// s_pref[s] = received rows from sources < s (counts clamped to [0, rmax]); s_pref[ep] = V.
// Warp 0 loads the counts at once and scans them; the caller synchronizes.
__device__ void load_prefix(const int32_t* recv_counts, int ep, int64_t rmax, int32_t* s_pref) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int32_t n = lane < ep ? (int32_t)min((int64_t)max(recv_counts[lane], 0), rmax) : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(~0u, n, o);
      if (lane >= o) n += y;
    }
    if (lane < ep) s_pref[lane + 1] = n;
    if (lane == 0) s_pref[0] = 0;
  }
}

// Source of flattened received row v (< s_pref[ep]).
__device__ __forceinline__ int source_of(int64_t v, const int32_t* s_pref) {
  int s = 0;
  while (v >= s_pref[s + 1]) ++s;
  return s;
}

// Rows [v0, v1) of chunk c of V = s_pref[ep] rows cut into n equal chunks.
__device__ __forceinline__ void chunk_rows(const int32_t* s_pref, int ep, uint32_t c, uint32_t n,
                                           int64_t& v0, int64_t& v1) {
  const int64_t V = s_pref[ep];
  const int64_t chunk = (V + n - 1) / n;
  v0 = min(V, (int64_t)c * chunk);
  v1 = min(V, v0 + chunk);
}

// Local expert of id, or -1 when another rank owns it or it is invalid.
__device__ __forceinline__ int local_expert(int32_t id, int lo, int epr) {
  const int e = id - lo;
  return id >= lo && e < epr ? e : -1;
}

// In place: s_val[0..n) := exclusive prefix sums; returns the total. Every thread calls;
// blockDim.x a multiple of 32.
__device__ int32_t block_exclusive_scan(int32_t* s_val, int n) {
  __shared__ int32_t s_warp[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int b0 = min(n, (int)threadIdx.x * per), b1 = min(n, b0 + per);
  int32_t own = 0;
  for (int i = b0; i < b1; ++i) own += s_val[i];
  int32_t incl = own;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t y = __shfl_up_sync(~0u, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int32_t t = lane < nwarps ? s_warp[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(~0u, t, o);
      if (lane >= o) t += y;
    }
    s_warp[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  int32_t run = incl - own + (warp > 0 ? s_warp[warp - 1] : 0);
  for (int i = b0; i < b1; ++i) {
    const int32_t v = s_val[i];
    s_val[i] = run;
    run += v;
  }
  const int32_t total = s_warp[nwarps - 1];
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------- combine helpers
template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[Pack16<T>::kLanes], const Vec16& v,
                                           bool weighted, float w) {
  Pack16<T> x;
  x.vec = v;
#pragma unroll
  for (int i = 0; i < Pack16<T>::kLanes; ++i) {
    const float f = to_float(x.lane[i]);
    // __fmul_rn: the product is rounded on its own (never fused into the add), as in the
    // reference's fp32 `row * weight` followed by `acc + product`.
    acc[i] = __fadd_rn(acc[i], weighted ? __fmul_rn(f, w) : f);
  }
}

// Sums a row's slots j = 0..k-1 in slot order, four loads in flight: fetch(j, x, w) loads
// slot j's vector and weight and returns false when the slot holds nothing.
template <typename T, typename Fetch>
__device__ __forceinline__ Vec16 sum_slots(int k, bool weighted, Fetch fetch) {
  float acc[Pack16<T>::kLanes];
#pragma unroll
  for (int i = 0; i < Pack16<T>::kLanes; ++i) acc[i] = 0.f;
  for (int j0 = 0; j0 < k; j0 += 4) {
    Vec16 x[4];
    float w[4];
    bool have[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) have[i] = j0 + i < k && fetch(j0 + i, x[i], w[i]);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (have[i]) accumulate<T>(acc, x[i], weighted, w[i]);
  }
  return round_pack<T>(acc);
}

// Exact combine. A warp takes a piece of kPullUnits x 32 16-byte columns of token t's
// row: lane j reads slot j's id and code once (32 slots at a time) and the slot's owner
// row address and weight are shuffled to the warp; each lane then loads its columns of
// kPullSlots slots before adding, in slot order.
constexpr int kPullUnits = config::kCompactPullUnits;  // (the host sizes the grid with it)
constexpr int kPullSlots = 8;  // top-8: one round of loads
constexpr int kPullPiece = 32 * kPullUnits;

template <typename T>
__device__ void pull(const PullParams& p) {
  constexpr int K = Pack16<T>::kLanes;
  const A2aWorkspace& ws = p.ws;
  pdl_wait();
  a2a::signal_ready(ws, a2a::kCombineCountOff);  // ready at the start (a2a.cuh)
  const uint32_t seen = a2a::begin(ws, a2a::kStateCombineSeen);
  const bool ok = a2a::wait_all(ws, a2a::kCombineCountOff, seen + 1,
                                a2a::wait_context(ws, config::kErrCompactCombine));
  pdl_launch_dependents();
  if (ok) {
    const int k = (int)p.top_k;
    const int epr = (int)p.experts_per_rank;
    const int num_experts = ws.ep_size * epr;
    const bool weighted = p.apply_weights != 0;
    const int64_t row = p.row_bytes;
    const int nvec = (int)(row / 16);
    const int pieces_per_row = (nvec + kPullPiece - 1) / kPullPiece;
    const int64_t pieces = p.num_tokens * pieces_per_row;
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t q = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); q < pieces;
         q += warps) {
      const int64_t t = q / pieces_per_row;
      const int c0 = (int)(q - t * pieces_per_row) * kPullPiece + lane;
      float acc[kPullUnits][K];
#pragma unroll
      for (int u = 0; u < kPullUnits; ++u) {
#pragma unroll
        for (int i = 0; i < K; ++i) acc[u][i] = 0.f;
      }
      for (int j0 = 0; j0 < k; j0 += 32) {
        // Lane j: slot j0 + j's owner row (0: nothing to add) and weight. Codes are
        // checked, so no read ever leaves the owner's buffer.
        uint64_t my_row = 0;
        float my_w = 1.f;
        if (j0 + lane < k) {
          const int64_t at = t * k + j0 + lane;
          const int32_t id = p.ids[at];
          const int32_t code = p.codes[at];
          if (id >= 0 && id < num_experts && code >= 1 && code <= p.capacity) {
            const uint64_t base = p.peers[id / epr];
            my_row = base + p.y_off + (uint64_t)(code - 1) * row;
            if (weighted) my_w = __ldcg(reinterpret_cast<const float*>(base + p.w_off) + code - 1);
          }
        }
        const int n = min(32, k - j0);
        for (int g = 0; g < n; g += kPullSlots) {
          uint64_t src[kPullSlots];
          float w[kPullSlots];
          Vec16 x[kPullUnits][kPullSlots];
#pragma unroll
          for (int i = 0; i < kPullSlots; ++i) {
            src[i] = __shfl_sync(~0u, my_row, (g + i) & 31);
            w[i] = __shfl_sync(~0u, my_w, (g + i) & 31);
            if (g + i >= n) src[i] = 0;  // warp-uniform
          }
#pragma unroll
          for (int i = 0; i < kPullSlots; ++i) {
            if (!src[i]) continue;
#pragma unroll
            for (int u = 0; u < kPullUnits; ++u) {
              const int c = c0 + 32 * u;
              if (c < nvec)
                x[u][i] = ld_vec16_cg(reinterpret_cast<const uint8_t*>(src[i]) + (size_t)c * 16);
            }
          }
#pragma unroll
          for (int i = 0; i < kPullSlots; ++i) {
            if (!src[i]) continue;
#pragma unroll
            for (int u = 0; u < kPullUnits; ++u)
              if (c0 + 32 * u < nvec) accumulate<T>(acc[u], x[u][i], weighted, w[i]);
          }
        }
      }
      uint8_t* dst = p.out + (size_t)t * row;
#pragma unroll
      for (int u = 0; u < kPullUnits; ++u) {
        const int c = c0 + 32 * u;
        if (c < nvec) st_vec16(dst + (size_t)c * 16, round_pack<T>(acc[u]));
      }
    }
  }
  a2a::end(ws, a2a::kStateCombineSeen, seen + gridDim.x);
}

// Local combine: received row (s, i) sums its own rows (slot order) into the payload.
template <typename T>
__device__ void reduce(const ReduceParams& p) {
  __shared__ int32_t s_pref[kMaxRanks + 1];
  const int ep = (int)p.ep_size;
  load_prefix(p.recv_counts, ep, p.runtime_max, s_pref);
  __syncthreads();
  const int64_t row = p.row_bytes;
  const int64_t nvec = row / 16;
  const int64_t units = (int64_t)s_pref[ep] * nvec;
  const int k = (int)p.top_k;
  const bool weighted = p.apply_weights != 0;
  for (int64_t u = global_thread_id(); u < units; u += global_thread_count()) {
    const int64_t v = u / nvec;
    const int64_t col = (u - v * nvec) * 16;
    const int s = source_of(v, s_pref);
    const int64_t flat = (int64_t)s * p.runtime_max + (v - s_pref[s]);
    const int32_t* where = p.inv + flat * k;
    const Vec16 sum = sum_slots<T>(k, weighted, [&](int j, Vec16& x, float& w) {
      const int32_t pos = where[j];
      if (pos < 0 || pos >= p.capacity) return false;
      x = ld_vec16(p.y + (int64_t)pos * row + col);
      w = weighted ? p.recv_w[pos] : 1.f;
      return true;
    });
    st_vec16(p.payload + flat * row + col, sum);
  }
}

// Block 0: the layout's per-expert outputs and the stats, from the totals s_tot and their
// exclusive prefix s_off (needed = all entries).
__device__ void write_layout(const DispatchParams& p, const int32_t* s_tot, const int32_t* s_off,
                             int32_t needed) {
  const int epr = (int)p.experts_per_rank;
  const int32_t cap = (int32_t)p.capacity;
  for (int e = threadIdx.x; e < epr; e += blockDim.x) {
    const int32_t lo = min(s_off[e], cap);
    p.tokens_per_expert[e] = min(s_off[e] + s_tot[e], cap) - lo;
    p.offsets[e] = lo;
  }
  if (threadIdx.x == 0) {
    const int32_t stored = min(needed, cap);
    const int32_t dropped = needed - stored;
    p.offsets[epr] = stored;
    p.stats[kStatRows] = stored;
    p.stats[kStatNeeded] = needed;
    p.stats[kStatDropped] = dropped;
    // reductions, not read-modify-writes: no load for the block's thread 0 to wait on
    atomicMax(&p.stats[kStatMaxNeeded], needed);
    atomicMax(&p.stats[kStatMaxDropped], dropped);
  }
}

}  // namespace

// ---------------------------------------------------------------- dispatch side
// The expand's copy: vectors b, b + blockDim.x, ... (kUnroll of them, < total) of the
// block's column slice [c0, c0 + by_vec.d) of the tile's rows, row r = flat row s_flat[r]
// of the received x. A tile holds at most kTile / k rows, so its vector indices fit 32
// bits for any row the workspace can hold.
constexpr int kUnroll = 4;

__device__ __forceinline__ void load_vectors(const DispatchParams& p, const int64_t* s_flat,
                                             const Divider& by_vec, uint32_t c0, uint32_t b,
                                             uint32_t total, Vec16 (&v)[kUnroll]) {
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) {
    const uint32_t u = b + i * blockDim.x;
    if (u < total) {
      const uint32_t r = by_vec(u);
      v[i] = ld_vec16(p.x + s_flat[r] * p.row_bytes + (int64_t)(c0 + u - r * by_vec.d) * 16);
    }
  }
}

extern "C" __global__ void __launch_bounds__(1024) moe_compact_expand(const DispatchParams p) {
  __shared__ int32_t s_pref[kMaxRanks + 1];
  __shared__ int32_t s_tot[kMaxExperts];  // entries of each local expert, all rows
  __shared__ int32_t s_off[kMaxExperts];  // then its exclusive prefix: the expert's offset
  __shared__ int32_t s_run[kMaxExperts];  // entries before the chunk, then the next row
  __shared__ int32_t s_pos[kTile];        // row of each entry of the tile; -1: another
                                          // rank's (or no) expert, -2: dropped
  __shared__ int16_t s_list[kTile];       // the tile's stored entries, in order
  __shared__ int64_t s_flat[kTile];       // received row (s * rmax + i) of each tile row
  __shared__ int32_t s_src[kTile];        // its source rank
  __shared__ int32_t s_tok[kTile];        // its token index at the source
  __shared__ float s_w[kTile];            // each entry's weight
  __shared__ int s_count;
  const int ep = (int)p.ep_size;
  const int epr = (int)p.experts_per_rank;
  const int k = (int)p.top_k;
  const int lo = (int)(p.rank * p.experts_per_rank);
  const int32_t cap = (int32_t)p.capacity;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tile_rows = kTile / k;
  // Block b = chunk b / slices of the rows, copying column slice b % slices of them (the
  // host makes gridDim.x a multiple of slices, and slices <= the vectors of a row).
  const uint32_t slices = (uint32_t)p.slices;
  const uint32_t slice = blockIdx.x % slices;
  const uint32_t nvec = (uint32_t)(p.row_bytes / 16);
  const uint32_t width = (nvec + slices - 1) / slices;
  const uint32_t c0 = min(nvec, slice * width);
  const uint32_t w = min(nvec, c0 + width) - c0;  // the slice's columns (0: none)
  // Divisions by invariants, once: entries q < kTile of a tile by k, vectors u of the
  // slice of a tile's rows by the slice's width.
  const Divider by_k((uint32_t)k, kTile);
  const Divider by_vec(max(w, 1u), (uint64_t)tile_rows * width);
  pdl_wait();  // the dispatch's receive tensors and counts
  pdl_launch_dependents();
  // Where the whole received id space [ep, rmax, k] fits kSpec ids a thread, the ids are
  // loaded before the counts that say which of them are valid: the two loads overlap.
  constexpr int kSpec = 4;
  const int64_t space = (int64_t)ep * p.runtime_max * k;
  const bool one_pass = space <= (int64_t)kSpec * blockDim.x;
  int32_t spec[kSpec];
  if (one_pass) {
#pragma unroll
    for (int i = 0; i < kSpec; ++i) {
      const int64_t f = threadIdx.x + (int64_t)i * blockDim.x;
      spec[i] = f < space ? p.ids[f] : -1;
    }
  }
  load_prefix(p.recv_counts, ep, p.runtime_max, s_pref);
  for (int e = threadIdx.x; e < epr; e += blockDim.x) s_tot[e] = s_run[e] = 0;
  if (p.ids_copy != nullptr)
    for (int64_t q = global_thread_id(); q < p.num_tokens * k; q += global_thread_count())
      p.ids_copy[q] = p.ids_in[q];
  __syncthreads();
  int64_t v0, v1;
  chunk_rows(s_pref, ep, blockIdx.x / slices, gridDim.x / slices, v0, v1);

  // 1. Count. Source s's received ids are contiguous: [s * rmax * k, + rows_s * k).
  if (one_pass) {
    const int64_t per_source = p.runtime_max * k;
    const Divider by_source((uint32_t)per_source, (uint64_t)space);
#pragma unroll
    for (int i = 0; i < kSpec; ++i) {
      const int64_t f = threadIdx.x + (int64_t)i * blockDim.x;
      if (f >= space) break;
      const int s = (int)by_source((uint32_t)f);
      const int64_t q = f - s * per_source;
      const int64_t n = (int64_t)(s_pref[s + 1] - s_pref[s]) * k;
      const int e = local_expert(spec[i], lo, epr);
      if (q >= n || e < 0) continue;
      atomicAdd(&s_tot[e], 1);
      if (q < max((int64_t)0, (v0 - s_pref[s]) * k)) atomicAdd(&s_run[e], 1);
    }
  } else {
    for (int s = 0; s < ep; ++s) {
      const int32_t* ids = p.ids + (int64_t)s * p.runtime_max * k;
      const int64_t n = (int64_t)(s_pref[s + 1] - s_pref[s]) * k;
      const int64_t before = min(n, max((int64_t)0, (v0 - s_pref[s]) * k));
      // kSpec ids a thread loaded at once, then counted: the loads of a batch overlap
      for (int64_t q0 = threadIdx.x; q0 < n; q0 += kSpec * blockDim.x) {
        int32_t id[kSpec];
#pragma unroll
        for (int i = 0; i < kSpec; ++i) {
          const int64_t q = q0 + (int64_t)i * blockDim.x;
          id[i] = q < n ? ids[q] : -1;
        }
#pragma unroll
        for (int i = 0; i < kSpec; ++i) {
          const int e = local_expert(id[i], lo, epr);
          if (e < 0) continue;
          atomicAdd(&s_tot[e], 1);
          if (q0 + (int64_t)i * blockDim.x < before) atomicAdd(&s_run[e], 1);
        }
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < epr; e += blockDim.x) s_off[e] = s_tot[e];
  __syncthreads();
  const int32_t needed = block_exclusive_scan(s_off, epr);
  if (blockIdx.x == 0) write_layout(p, s_tot, s_off, needed);
  for (int e = threadIdx.x; e < epr; e += blockDim.x) s_run[e] += s_off[e];
  __syncthreads();

  const int64_t row = p.row_bytes;
  for (int64_t r0 = v0; r0 < v1; r0 += tile_rows) {
    const int nrows = (int)min((int64_t)tile_rows, v1 - r0);
    const int nent = nrows * k;
    for (int r = threadIdx.x; r < nrows; r += blockDim.x) {
      const int s = source_of(r0 + r, s_pref);
      s_src[r] = s;
      s_flat[r] = (int64_t)s * p.runtime_max + (r0 + r - s_pref[s]);
    }
    __syncthreads();

    // 2. Warp 0 ranks the tile's entries in order: equal experts within 32 entries are
    //    found with match_any, earlier lanes first, then the expert's counter advances.
    //    Meanwhile every thread loads its first vectors of the tile's rows (step 4) and
    //    the other warps fetch the rows' token indices and the entries' weights (steps 3
    //    and 4), so that those loads are in flight while warp 0 works.
    const uint32_t total = (uint32_t)nrows * w;
    Vec16 v[kUnroll];
    load_vectors(p, s_flat, by_vec, c0, threadIdx.x, total, v);
    if (warp != 0) {
      for (int q = threadIdx.x - 32; q < nent; q += blockDim.x - 32) {
        const int r = (int)by_k(q);
        s_w[q] = p.w[s_flat[r] * k + (q - r * k)];
        if (q - r * k == 0) s_tok[r] = p.tok[s_flat[r]];
      }
    }
    if (warp == 0) {
      int n = 0;
      for (int q0 = 0; q0 < nent; q0 += 32) {
        const int q = q0 + lane;
        int e = -1;
        if (q < nent) {
          const int r = (int)by_k(q);
          e = local_expert(p.ids[s_flat[r] * k + (q - r * k)], lo, epr);
        }
        const uint32_t peers = __match_any_sync(~0u, e);
        const int before = __popc(peers & ((1u << lane) - 1u));
        const int32_t pos = e >= 0 ? s_run[e] + before : -1;
        __syncwarp();
        if (e >= 0 && before == 0) s_run[e] += __popc(peers);
        __syncwarp();
        const bool stored = e >= 0 && pos < cap;
        const uint32_t ballot = __ballot_sync(~0u, stored);
        if (stored) s_list[n + __popc(ballot & ((1u << lane) - 1u))] = (int16_t)q;
        if (q < nent) s_pos[q] = stored ? pos : e >= 0 ? -2 : -1;
        n += __popc(ballot);
      }
      if (lane == 0) s_count = n;
    }
    __syncthreads();
    const int stored = s_count;

    // 3. Where every (s, i, j) of the tile went, for combine (slice 0 of the chunk).
    if (p.inv != nullptr && slice == 0)
      for (int q = threadIdx.x; q < nent; q += blockDim.x) {
        const int r = (int)by_k(q);
        p.inv[s_flat[r] * k + (q - r * k)] = s_pos[q];
      }
    if (p.codes_off >= 0 && slice == 0)
      for (int q = threadIdx.x; q < nent; q += blockDim.x) {
        const int32_t pos = s_pos[q];
        if (pos == -1) continue;  // the slot's owner is another rank (or none)
        const int r = (int)by_k(q);
        int32_t* codes = reinterpret_cast<int32_t*>(p.peers[s_src[r]] + p.codes_off);
        codes[(int64_t)s_tok[r] * k + (q - r * k)] = pos >= 0 ? pos + 1 : 0;
      }

    // 4. Each stored entry's source and weight (slice 0) and its hidden row's slice; a
    //    row's vector is read once and stored to every entry of the row.
    for (int n = threadIdx.x; slice == 0 && n < stored; n += blockDim.x) {
      const int q = s_list[n];
      const int r = (int)by_k(q), j = q - r * k;
      const int32_t pos = s_pos[q];
      p.src[3 * (size_t)pos] = s_src[r];
      p.src[3 * (size_t)pos + 1] = s_tok[r];
      p.src[3 * (size_t)pos + 2] = j;
      p.recv_w[pos] = s_w[q];
    }
    if (stored) {
      for (uint32_t b = threadIdx.x; b < total; b += kUnroll * blockDim.x) {
        if (b != threadIdx.x) load_vectors(p, s_flat, by_vec, c0, b, total, v);
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
          const uint32_t u = b + i * blockDim.x;
          if (u >= total) break;
          const uint32_t r = by_vec(u);
          const int64_t col = (int64_t)(c0 + u - r * by_vec.d) * 16;
          for (int j = 0; j < k; ++j) {
            const int32_t pos = s_pos[r * k + j];
            if (pos >= 0) st_vec16(p.recv_x + (int64_t)pos * row + col, v[i]);
          }
        }
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- combine side
// Rows [0, min(stats[kStatRows], capacity)) of y (local) to dst (the symmetric y buffer).
extern "C" __global__ void moe_compact_stage(const CompactStageArgs a) {
  const int64_t rows = min((int64_t)max(a.stats[kStatRows], 0), a.capacity);
  copy_vec16(a.dst, a.y, (size_t)(rows * a.row_bytes / 16));
}

#define MOECOMM_COMPACT_COMBINE(SUFFIX, T)                                                   \
  extern "C" __global__ void __launch_bounds__(kCombineThreads) moe_compact_pull_##SUFFIX(   \
      const PullParams p) {                                                                  \
    pull<T>(p);                                                                              \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(kCombineThreads) moe_compact_reduce_##SUFFIX( \
      const ReduceParams p) {                                                                \
    reduce<T>(p);                                                                            \
  }

MOECOMM_COMPACT_COMBINE(bf16, __nv_bfloat16)
MOECOMM_COMPACT_COMBINE(fp16, __half)
MOECOMM_COMPACT_COMBINE(fp32, float)
