// MoE all-to-all, static layout (MoeAlltoAll): dispatch, combine, sanitize.
//
// Every rank owns one SymmetricBuffer (the workspace), laid out by moecomm/moe/alltoall.py:
//   [0, A2A_HEADER_BYTES)  header: dispatch_count u32[32] at 0, combine_count u32[32] at
//                          128, recv_count i32[32] at 256; entry s is written by rank s
//   recv_off[p] ...        payload p's receive tensor [ep, runtime_max, row_bytes[p]]
//   scale_off ...          with FP8 dispatch: the scales [ep, runtime_max, scale_row_bytes]
//   region_off ...         the combine region [ep, runtime_max, row_bytes] (after the above)
// and local memory: send_slot i32[T, ep] (token t's row in block `rank` of rank r's
// receive tensors, -1 if t does not go to r), recv_counts i32[ep] (rows received from each
// source by the last dispatch) and state u32[8] (a2a.cuh's kState*).
//
// The handshake of both kernels (and of EPAllToAll's exact combine) is a2a.cuh's.
//
// Dispatch. Block b owns tokens [b*chunk, (b+1)*chunk). It counts, per target rank, the
// routed tokens before its chunk and in total: a ballot scan over all tokens where one pass
// of the block covers them, else its own chunk's counts published in chunk_counts (local,
// [grid, ep], tagged with the call) plus those of the blocks before it, the last block
// alone learning the totals. Then, kSub tokens at a time, warps 0..kSub/32-1 give each
// token its slot per target (a prefix over the warps, source order; where the scan saw
// every token and the chunk is one sub-chunk, the scan's route masks give the slots) and
// the block writes the tokens' rows of every payload, in one token-major walk, straight
// into each target's receive tensors (16-byte stores when rows and pointers allow, else
// 4-byte words), sanitising the id payload per target on the way. A block that knows the
// totals writes this rank's counts into every target's header; the id rows past the count
// are padded with the invalid id (by every block, or by the one that knows); then every
// block signals. Block 0 waits (bounded) until every source's blocks have signalled and
// copies the counts.
//
// FP8 dispatch (kernel moe_a2a_dispatch_fp8, the same steps): payload quant_payload is
// bf16 [T, H], H % 128 == 0. The block quantizes each of its tokens once, in registers,
// and stores the same e4m3 codes into every target's tensor recv_off[q] ([ep, runtime_max,
// H] bytes) and the 128-element group scales into the extra tensor scale_off ([ep,
// runtime_max, scale_row_bytes]): one fp32 per group, or UE8M0 exponent bytes packed four
// per int32 (group 4j+i in byte i, unused bytes 0), the latter bit-exact with
// moecomm.reference.quant_fp8_per_token_group (formulas at quant_rows).
//
// Combine. The rows peers read sit at region_off: the combine region, or a receive tensor
// whose rows the payload is (read in place: block s of it is written and read by rank s
// alone); any other payload is first copied (its valid rows, recv_counts[s] of block s)
// into the combine region (units claimed by whichever blocks run). The rank then signals
// that its rows are ready, waits until every peer's are (a2a.cuh) and pulls, for each
// token, the row of every target rank r (ascending r) from r's region at [rank,
// send_slot[t, r]], summing in fp32 from +0, rounding once. The pull is token-major:
// a warp reads a token's slots once and then streams a piece of its rows, with several
// 16-byte loads of two ranks in flight per lane, either into registers (pull_registers:
// the lowest latency) or, under an SM budget, into a shared-memory ring that keeps more
// bytes in flight per SM than registers can hold (pull_ring).
//
// Why no barrier is needed between calls: a rank's dispatch k+1 writes a peer's receive
// tensors only after its own combine k saw every peer ready in combine k, i.e. after every
// peer finished reading its own receive tensors for call k (its expert work came before
// its combine; staging happens before the signal); a rank rewrites its combine region
// only after its dispatch k+1 completed, i.e. after every peer finished combine k (a peer
// sends dispatch k+1 only after its combine k). dispatch and combine must alternate.
#include "a2a.cuh"
#include "quant.cuh"

using namespace moecomm;
using namespace moecomm::a2a;

namespace {

constexpr int kMaxRanks = config::kA2aMaxRanks;
constexpr int kMaxPayloads = config::kA2aMaxPayloads;
static_assert(kMaxPayloads <= 8, "copy_rows packs a payload entry into 3 bits");
// Dispatch: a block's chunk goes in sub-chunks of kSub tokens; warps 0..kSubWarps-1 give
// 32 tokens each their slots (counting them while the other warps still copy). The slots
// live in dynamic shared memory, int32 [kSub, ep] (the host sizes it).
constexpr int kSub = config::kA2aDispatchSub;
constexpr int kSubWarps = kSub / 32;
static_assert(kSub % 32 == 0, "A2A_DISPATCH_SUB: whole warps");
// Combine: 16-byte columns a lane sums at once, ranks loaded before adding, and the
// columns of a warp's piece of a row (the host sizes the grid with the same kPiece).
constexpr int kUnits = config::kA2aCombineUnits;
constexpr int kGroup = config::kA2aCombineGroup;
constexpr int kDepth = config::kA2aCombineDepth;  // copies in flight per lane (see combine)
constexpr int kPiece = 32 * kUnits;

// DispatchArgs::route_mode: the layout pass alone, the layout pass recorded into a routing
// handle (route_slot = send_slot, route_total = rows per target), or the layout replayed
// from one (steps 1 and the slot assignment skipped; the handle's ids were the same).
constexpr int kRouteRecord = 1;
constexpr int kRouteReplay = 2;

// ---------------------------------------------------------------- word access
// A row is moved as 16-byte vectors or, when its size or address is not a multiple of
// 16, as 4-byte words. Sanitising keeps an int32 id when lo <= id < hi.
template <typename W>
struct Word;

template <>
struct Word<uint32_t> {
  static __device__ __forceinline__ uint32_t load(const uint8_t* p) {
    return *reinterpret_cast<const uint32_t*>(p);
  }
  static __device__ __forceinline__ void store(uint8_t* p, uint32_t v) {
    *reinterpret_cast<uint32_t*>(p) = v;
  }
  static __device__ __forceinline__ uint32_t fill(uint32_t x) { return x; }
  static __device__ __forceinline__ uint32_t keep(uint32_t v, int lo, int hi, uint32_t bad) {
    const int id = (int)v;
    return id >= lo && id < hi ? v : bad;
  }
};

template <>
struct Word<Vec16> {
  static __device__ __forceinline__ Vec16 load(const uint8_t* p) { return ld_vec16(p); }
  static __device__ __forceinline__ void store(uint8_t* p, const Vec16& v) { st_vec16(p, v); }
  static __device__ __forceinline__ Vec16 fill(uint32_t x) { return Vec16{x, x, x, x}; }
  static __device__ __forceinline__ Vec16 keep(const Vec16& v, int lo, int hi, uint32_t bad) {
    return Vec16{Word<uint32_t>::keep(v.x, lo, hi, bad), Word<uint32_t>::keep(v.y, lo, hi, bad),
                 Word<uint32_t>::keep(v.z, lo, hi, bad), Word<uint32_t>::keep(v.w, lo, hi, bad)};
  }
};

// The rank owning a valid expert id x (0 <= x < num_experts), x / experts_per_rank,
// without a division per id: every block maps every id of every token in its layout pass,
// and the divisions took about 3 of that pass's 14 us at 4096 tokens, top-8.
struct ExpertOwner {
  Divider div;

  __device__ __forceinline__ explicit ExpertOwner(const DispatchArgs& p)
      : div((uint32_t)p.experts_per_rank, (uint64_t)p.num_experts) {}

  __device__ __forceinline__ int operator()(int x) const { return (int)div((uint32_t)x); }
};

// Bit r set: token t has a valid expert on rank r. The ids are read as 16-byte vectors
// when top_k % 4 == 0 and the array is 16-byte aligned (two loads in flight at top-8).
__device__ __forceinline__ uint32_t route_mask(const DispatchArgs& p, const ExpertOwner& owner,
                                               int64_t t) {
  const int32_t* e = p.experts + t * p.top_k;
  const uint32_t num_experts = (uint32_t)p.num_experts;
  uint32_t m = 0;
  auto add = [&](int x) {
    if ((uint32_t)x < num_experts) m |= 1u << owner(x);
  };
  if ((p.top_k & 3) == 0 && (reinterpret_cast<uintptr_t>(p.experts) & 15u) == 0) {
    const int4* v = reinterpret_cast<const int4*>(e);
    const int n = p.top_k >> 2;
    int k = 0;
    for (; k + 2 <= n; k += 2) {
      const int4 a = __ldg(v + k), b = __ldg(v + k + 1);
      add(a.x), add(a.y), add(a.z), add(a.w), add(b.x), add(b.y), add(b.z), add(b.w);
    }
    if (k < n) {
      const int4 a = __ldg(v + k);
      add(a.x), add(a.y), add(a.z), add(a.w);
    }
  } else {
#pragma unroll 4
    for (int k = 0; k < p.top_k; ++k) add(__ldg(e + k));
  }
  return m;
}

// One payload of a copy walk (copy_rows), set up once per block: its source rows, the
// offset of this rank's block in every target's receive tensor, its row in bytes, and
// where its words end within a token's share of the walk.
struct CopyPayload {
  const uint8_t* src;
  size_t dst;
  uint32_t row;
  uint32_t end;  // words of this payload and the walk's earlier ones, per token
};

// The walk over the payloads in bit mask `payloads`, moved as words W: one entry per
// payload in mask order (threads 0..num_payloads-1 fill them; a barrier must follow).
template <typename W>
__device__ __forceinline__ void plan_copy(const DispatchArgs& p, uint32_t payloads,
                                          CopyPayload* s_walk) {
  const int q = threadIdx.x;
  if (q >= p.num_payloads || !((payloads >> q) & 1u)) return;
  uint32_t end = 0;
  for (int e = 0; e <= q; ++e)
    if ((payloads >> e) & 1u) end += (uint32_t)(p.row_bytes[e] / sizeof(W));
  const int i = __popc(payloads & ((1u << q) - 1u));
  s_walk[i] = CopyPayload{reinterpret_cast<const uint8_t*>(p.src[q]),
                          p.recv_off[q] + (size_t)p.ws.rank * p.runtime_max * p.row_bytes[q],
                          (uint32_t)p.row_bytes[q], end};
}

// Copy the rows of n tokens (c0 .. c0+n-1, slots in s_slot) of the payloads of walk
// `s_walk` (plan_copy; `words` per token, `count` payloads, `id_walk` the id payload's
// entry or -1) to every target, moved as words W, kUnroll words in flight per thread.
// The walk is token-major: a token's words of every payload in turn, so that small rows
// (ids, weights) ride in the big payload's load rounds instead of adding their own. A
// thread's position (token, word) advances by blockDim.x words per step without a
// division where a token's words outnumber the block's threads.
template <typename W>
__device__ void copy_rows(const DispatchArgs& p, const CopyPayload* s_walk, int count,
                          uint32_t words, int id_walk, const int32_t* s_slot, int64_t c0,
                          int n) {
  constexpr int kUnroll = 4;
  const int ep = p.ws.ep_size;
  const int rank = p.ws.rank;
  const int epr = p.experts_per_rank;
  const uint32_t bad = (uint32_t)(int32_t)p.invalid_id;
  const uint32_t step = blockDim.x;
  const uint32_t wrap = step / words, skip = step - wrap * words;  // per step: tokens, words
  int tl = (int)(threadIdx.x / words);
  uint32_t w = threadIdx.x - (uint32_t)tl * words;
  while (tl < n) {
    W x[kUnroll];
    int item[kUnroll][2];  // token; word in its row << 3 | payload entry
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      item[u][0] = tl;
      if (tl >= n) break;
      int e = 0;
      uint32_t first = 0;
      while (e + 1 < count && w >= s_walk[e].end) first = s_walk[e++].end;
      item[u][1] = (int)(w - first) << 3 | e;
      const CopyPayload& c = s_walk[e];
      x[u] = Word<W>::load(c.src + (size_t)(c0 + tl) * c.row + (size_t)(w - first) * sizeof(W));
      tl += (int)wrap;
      w += skip;
      if (w >= words) {
        w -= words;
        ++tl;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = item[u][0];
      if (t >= n) break;
      const int e = item[u][1] & 7;
      const CopyPayload& c = s_walk[e];
      const size_t off = c.dst + (size_t)(item[u][1] >> 3) * sizeof(W);
      const bool sanitize = e == id_walk;
      int r = rank;
      for (int j = 0; j < ep; ++j) {  // peers first, self last
        if (++r == ep) r = 0;
        const int slot = s_slot[t * ep + r];
        if (slot < 0) continue;
        const W y = sanitize ? Word<W>::keep(x[u], r * epr, (r + 1) * epr, bad) : x[u];
        Word<W>::store(peer_base(p.ws, r) + off + (size_t)slot * c.row, y);
      }
    }
  }
}

// e4m3 codes of x.lane[i..i+3] * mul, packed little-endian.
__device__ __forceinline__ uint32_t e4m3x4(const Pack16<__nv_bfloat16>& x, int i, float mul) {
  return e4m3x4_encode(__fmul_rn(to_float(x.lane[i]), mul), __fmul_rn(to_float(x.lane[i + 1]), mul),
                       __fmul_rn(to_float(x.lane[i + 2]), mul),
                       __fmul_rn(to_float(x.lane[i + 3]), mul));
}

// FP8 quantization of n bf16 tokens of `hidden` elements (src 16-byte aligned), once per
// token, stored into every target: a thread takes 16 elements (two 16-byte loads, one
// 16-byte store of codes), 8 threads one 128-element group, a warp 4 groups (one packed
// UE8M0 word). Each token's threads are padded to a multiple of 32 so that no warp
// straddles two tokens; padding lanes only take part in the shuffles. Per group (fp32):
//   amax = max |x|;  s = max(amax / 448, 1e-10f)      (correctly rounded division)
//   fp32:  scale = s,                      q = e4m3_sat(x * fp32(1 / scale))  (RN, RN)
//   ue8m0: e = ue8m0_ceil(s), scale = 2^(e-127), q = e4m3_sat(x * 2^(127-e)) (= x / scale)
// (multiplications, not one division per element: x * fp32(1/s) may differ from x / s in
// the last fp32 bit before the e4m3 rounding; the reference specifies the product).
// NaN inputs are outside the contract (fmaxf drops them from amax).
__device__ void quant_rows(const DispatchArgs& p, const int32_t* s_slot, const uint8_t* src,
                           int64_t hidden, size_t code_off, size_t scale_off, int n) {
  const int ep = p.ws.ep_size;
  const int rank = p.ws.rank;
  const bool ue8m0 = p.scale_format == 1;
  const int64_t scale_row = p.scale_row_bytes;
  const int units = (int)(hidden / 16);
  const int padded = (units + 31) & ~31;
  const int lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < n * padded; i += blockDim.x) {  // warp-uniform trips
    const int tl = i / padded;
    const int u = i - tl * padded;
    const bool active = u < units;  // uniform over each 8-lane group
    Pack16<__nv_bfloat16> x[2];  // kept as bf16: converted twice rather than held in fp32
    float amax = 0.f;
    if (active) {
      x[0].vec = ld_vec16(src + (size_t)tl * hidden * 2 + (size_t)u * 32);
      x[1].vec = ld_vec16(src + (size_t)tl * hidden * 2 + (size_t)u * 32 + 16);
#pragma unroll
      for (int k = 0; k < 16; ++k) amax = fmaxf(amax, fabsf(to_float(x[k / 8].lane[k % 8])));
    }
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, o));
    const float s = fmaxf(__fdiv_rn(amax, 448.f), 1e-10f);
    const uint32_t e = ue8m0_ceil(s);  // 94..254
    uint32_t word = 0;                 // ue8m0: lane 0 packs the warp's four groups
    if (ue8m0) {
#pragma unroll
      for (int g = 0; g < 4; ++g) word |= __shfl_sync(~0u, active ? e : 0u, 8 * g) << (8 * g);
    }
    if (!active) continue;
    // ue8m0: 2^(127-e) exactly (e = 254 gives the subnormal 2^-127); fp32: fp32(1 / s).
    const float mul = ue8m0 ? __uint_as_float(e < 254u ? (254u - e) << 23 : 0x400000u)
                            : __frcp_rn(s);
    const Vec16 q = {e4m3x4(x[0], 0, mul), e4m3x4(x[0], 4, mul), e4m3x4(x[1], 0, mul),
                     e4m3x4(x[1], 4, mul)};
    for (int j = 1; j <= ep; ++j) {
      const int r = (rank + j) % ep;  // peers first, self last
      const int slot = s_slot[tl * ep + r];
      if (slot < 0) continue;
      uint8_t* base = peer_base(p.ws, r);
      st_vec16(base + code_off + (size_t)slot * hidden + (size_t)u * 16, q);
      uint8_t* sc = base + scale_off + (size_t)slot * scale_row;
      if (ue8m0 && lane == 0)
        *reinterpret_cast<uint32_t*>(sc + (size_t)(u / 32) * 4) = word;
      else if (!ue8m0 && (lane & 7) == 0)
        *reinterpret_cast<float*>(sc + (size_t)(u / 8) * 4) = s;
    }
  }
}

// Rows [count[r], runtime_max) of block `rank` of every target's id tensor := invalid id,
// by threads tid, tid + stride, ...
template <typename W>
__device__ void pad_ids(const DispatchArgs& p, const int32_t* s_total, int64_t tid,
                        int64_t stride) {
  const int64_t row = (int64_t)p.row_bytes[p.id_payload];
  const int64_t per_row = row / (int64_t)sizeof(W);
  const W bad = Word<W>::fill((uint32_t)(int32_t)p.invalid_id);
  const size_t block_off = p.recv_off[p.id_payload] + (size_t)p.ws.rank * p.runtime_max * row;
  for (int r = 0; r < p.ws.ep_size; ++r) {
    uint8_t* dst = peer_base(p.ws, r) + block_off + (size_t)s_total[r] * row;
    const int64_t n = (p.runtime_max - s_total[r]) * per_row;
    for (int64_t i = tid; i < n; i += stride) Word<W>::store(dst + i * sizeof(W), bad);
  }
}


// ---------------------------------------------------------------- combine
template <typename T>
__device__ __forceinline__ void add_row(float (&acc)[Pack16<T>::kLanes], const Vec16& v) {
  Pack16<T> x;
  x.vec = v;
#pragma unroll
  for (int i = 0; i < Pack16<T>::kLanes; ++i) acc[i] += to_float(x.lane[i]);
}

// Step 3 of combine with register loads: a warp takes pieces w, w + warps, ...; lanes
// 0..ep-1 hold the piece's slots (loaded one piece ahead), and every lane loads its kUnits
// columns of kGroup ranks before adding, so that kUnits x kGroup loads are in flight per
// lane. The lowest latency: the path with every SM.
template <typename T>
__device__ __forceinline__ void pull_registers(const CombineArgs& p, size_t src_off) {
  constexpr int K = Pack16<T>::kLanes;
  const A2aWorkspace& ws = p.ws;
  const int ep = ws.ep_size;
  const int rank = ws.rank;
  const int64_t row = (int64_t)p.row_bytes;
  const int nvec = (int)(row / 16);
  const int pieces_per_row = (nvec + kPiece - 1) / kPiece;
  const int64_t pieces = (int64_t)p.num_tokens * pieces_per_row;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  // The warp's next piece: token t, piece pc of its row, advanced by `warps` pieces at a
  // time without a division. Its slots are loaded one piece ahead, so that their latency
  // overlaps the current piece's row loads instead of preceding them.
  const int64_t dt = warps / pieces_per_row;
  const int dpc = (int)(warps - dt * pieces_per_row);
  int64_t q = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  int64_t t = q / pieces_per_row;
  int pc = (int)(q - t * pieces_per_row);
  int next_slot = lane < ep && q < pieces ? p.send_slot[t * ep + lane] : -1;
  for (; q < pieces; q += warps) {
    const int my_slot = next_slot;
    const int64_t tq = t;
    const int c0 = pc * kPiece + lane;
    t += dt;
    pc += dpc;
    if (pc >= pieces_per_row) {
      pc -= pieces_per_row;
      ++t;
    }
    if (lane < ep && q + warps < pieces) next_slot = p.send_slot[t * ep + lane];
    float acc[kUnits][K];
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
#pragma unroll
      for (int i = 0; i < K; ++i) acc[j][i] = 0.f;
    }
    for (int r0 = 0; r0 < ep; r0 += kGroup) {
      int slot[kGroup];
      Vec16 x[kUnits][kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int s = __shfl_sync(~0u, my_slot, (r0 + i) & 31);
        slot[i] = r0 + i < ep ? s : -1;  // warp-uniform
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        if (slot[i] < 0) continue;
        const uint8_t* src = peer_base(ws, r0 + i) + src_off + (size_t)slot[i] * row;
#pragma unroll
        for (int j = 0; j < kUnits; ++j) {
          const int c = c0 + 32 * j;
          if (c < nvec) x[j][i] = ld_vec16_cg(src + (size_t)c * 16);
        }
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        if (slot[i] < 0) continue;
#pragma unroll
        for (int j = 0; j < kUnits; ++j)
          if (c0 + 32 * j < nvec) add_row<T>(acc[j], x[j][i]);
      }
    }
    uint8_t* dst = p.out + (size_t)tq * row;
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int c = c0 + 32 * j;
      if (c < nvec) st_vec16(dst + (size_t)c * 16, round_pack<T>(acc[j]));
    }
  }
}

// Step 3 of combine through a shared-memory ring: the same walk, but a unit (a piece's
// columns of kGroup consecutive ranks) is copied by cp.async into the lane's own entries
// of the warp's ring (zeros for a rank the token did not go to, or past ep: adding +0 to a
// sum that started at +0 changes no bit), kDepth units in flight while the lane adds the
// oldest. Bytes in flight then cost shared memory instead of registers, so that a few SMs
// (an SM budget) keep the link busy.
template <typename T>
__device__ __forceinline__ void pull_ring(const CombineArgs& p, size_t src_off) {
  constexpr int K = Pack16<T>::kLanes;
  const A2aWorkspace& ws = p.ws;
  const int ep = ws.ep_size;
  const int rank = ws.rank;
  const int64_t row = (int64_t)p.row_bytes;
  extern __shared__ __align__(16) Vec16 s_pull[];  // [warp][kDepth][kUnits][kGroup][32]
  const int nvec = (int)(row / 16);
  const int pieces_per_row = (nvec + kPiece - 1) / kPiece;
  const int64_t pieces = (int64_t)p.num_tokens * pieces_per_row;
  const int groups = (ep + kGroup - 1) / kGroup;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t q0 = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t units = (q0 < pieces ? (pieces - q0 + warps - 1) / warps : 0) * groups;
  Vec16* ring = s_pull + (size_t)(threadIdx.x >> 5) * kDepth * kUnits * kGroup * 32 + lane;
  const int64_t dt = warps / pieces_per_row;  // the walk advances without a division
  const int dpc = (int)(warps - dt * pieces_per_row);
  struct Cursor {
    int64_t t;
    int pc, g, st;
  };
  auto advance = [&](Cursor& x) {
    if (++x.st == kDepth) x.st = 0;
    if (++x.g < groups) return;
    x.g = 0;
    x.t += dt;
    x.pc += dpc;
    if (x.pc >= pieces_per_row) {
      x.pc -= pieces_per_row;
      ++x.t;
    }
  };
  const int64_t t0 = q0 / pieces_per_row;
  Cursor in{t0, (int)(q0 - t0 * pieces_per_row), 0, 0}, out = in;
  auto slot_of = [&](const Cursor& x) {  // lane r: the slot of rank r
    return lane < ep ? p.send_slot[x.t * ep + lane] : -1;
  };
  int in_slot = units > 0 ? slot_of(in) : -1, next_slot = -1;
  if (units > groups) {
    Cursor n = in;
    for (int g = 0; g < groups; ++g) advance(n);
    next_slot = slot_of(n);
  }
  int64_t issued = 0;
  auto issue = [&]() {  // the unit at `in`, or an empty commit group past the last
    if (issued < units) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int r = in.g * kGroup + i;
        const int s = __shfl_sync(~0u, in_slot, r & 31);
        const bool routed = r < ep && s >= 0;  // warp-uniform
        const uint8_t* src =
            peer_base(ws, routed ? r : rank) + src_off + (routed ? (size_t)s * row : 0);
#pragma unroll
        for (int j = 0; j < kUnits; ++j) {
          const int c = in.pc * kPiece + lane + 32 * j;
          if (c < nvec)
            cp_async16(ring + ((in.st * kUnits + j) * kGroup + i) * 32,
                       src + (routed ? (size_t)c * 16 : 0), routed ? 16u : 0u);
        }
      }
      ++issued;
      const bool new_piece = in.g == groups - 1;
      advance(in);
      if (new_piece) {
        in_slot = next_slot;
        if (issued + groups < units) {
          Cursor n = in;
          for (int g = 0; g < groups; ++g) advance(n);
          next_slot = slot_of(n);
        }
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int d = 0; d < kDepth - 1; ++d) issue();
  float acc[kUnits][K];
  for (int64_t u = 0; u < units; ++u) {
    issue();  // unit u + kDepth - 1, into the stage unit u - 1 used
    cp_async_wait<kDepth - 1>();  // unit u has landed
    if (out.g == 0) {
#pragma unroll
      for (int j = 0; j < kUnits; ++j) {
#pragma unroll
        for (int i = 0; i < K; ++i) acc[j][i] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
#pragma unroll
      for (int j = 0; j < kUnits; ++j)
        if (out.pc * kPiece + lane + 32 * j < nvec)
          add_row<T>(acc[j], ring[((out.st * kUnits + j) * kGroup + i) * 32]);
    }
    if (out.g == groups - 1) {
      uint8_t* dst = p.out + (size_t)out.t * row;
#pragma unroll
      for (int j = 0; j < kUnits; ++j) {
        const int c = out.pc * kPiece + lane + 32 * j;
        if (c < nvec) st_vec16(dst + (size_t)c * 16, round_pack<T>(acc[j]));
      }
    }
    advance(out);
  }
  cp_async_wait<0>();
}

// Step 1 of combine with a payload to stage: copy the valid rows of every source block
// into this rank's combine region. The copy is cut into gridDim.x units (unit u: the
// vectors a block u of a static split would copy) that blocks claim until none is left,
// so that whichever blocks are resident do all of it; the block completing the last unit
// adds gridDim.x to this rank's entry at every rank.
// `s_unit`: one shared word.
__device__ void stage(const CombineArgs& p, uint32_t& s_unit) {
  const A2aWorkspace& ws = p.ws;
  const int64_t row = (int64_t)p.row_bytes;
  const int64_t block_bytes = (int64_t)p.runtime_max * row;
  uint8_t* region = peer_base(ws, ws.rank) + p.region_off;
  const uint32_t units = gridDim.x;
  for (;;) {
    if (threadIdx.x == 0) s_unit = atomicAdd(&ws.state[kStateStageClaim], 1u);
    __syncthreads();
    const uint32_t u = s_unit;
    if (u >= units) break;  // block-uniform
    for (int s = 0; s < ws.ep_size; ++s)
      copy_vec16(region + s * block_bytes, p.payload + s * block_bytes,
                 (size_t)p.recv_counts[s] * row / 16, (size_t)u * blockDim.x + threadIdx.x,
                 (size_t)units * blockDim.x);
    __syncthreads();  // the unit's writes before the count; s_unit read by every thread
    if (threadIdx.x == 0 && atom_add_acq_rel_gpu(&ws.state[kStateStageDone], 1u) == units - 1)
      signal_all_from_thread(ws, kCombineCountOff, units);
  }
}

// kRing: pull through the shared-memory ring (the moe_a2a_combine_ring_* kernels), else
// into registers; two kernels, so that each keeps only its own path's registers.
template <typename T, bool kRing>
__device__ __forceinline__ void combine(const CombineArgs& p) {
  const A2aWorkspace& ws = p.ws;
  const int ep = ws.ep_size;
  const int rank = ws.rank;
  const int64_t row = (int64_t)p.row_bytes;
  const int64_t block_bytes = (int64_t)p.runtime_max * row;
  pdl_wait();
  // 1-2. This rank's rows are ready (staged into the combine region first, if they must
  //      be): tell every rank (a2a.cuh, "ready"), then wait until every rank's are.
  //      Without staging the signal goes first, ahead of the call-number read and the
  //      block's arrive, whose latencies it would otherwise add to every peer's wait.
  if (!p.stage) signal_ready(ws, kCombineCountOff);
  // the ring kernel's shared words for the state and the claim: the ring's first two (the
  // ring fills after the wait below); a static shared variable would halve its speed
  // (measured: blocks with static and dynamic shared memory)
  extern __shared__ __align__(16) Vec16 s_dynamic[];
  const uint32_t seen = kRing ? begin(ws, kStateCombineSeen, s_dynamic[1])
                              : begin(ws, kStateCombineSeen);
  if (p.stage) {
    if constexpr (kRing) {
      stage(p, *reinterpret_cast<uint32_t*>(s_dynamic));
    } else {
      __shared__ uint32_t s_unit;
      stage(p, s_unit);
    }
  }
  const bool ok = wait_all(ws, kCombineCountOff, seen + 1,
                           wait_context(ws, config::kErrA2aCombine));
  pdl_launch_dependents();

  // 3. Token t sums row (rank, slot) of every target r's region, r ascending, fp32 from +0.
  //    A row is cut into pieces of 32 x kUnits 16-byte columns (kPiece); the host picks
  //    the kernel, hence the path.
  if (ok) {
    const size_t src_off = p.region_off + (size_t)rank * block_bytes;
    if constexpr (kRing)
      pull_ring<T>(p, src_off);
    else
      pull_registers<T>(p, src_off);
  }
  if (p.stage && blockIdx.x == 0 && threadIdx.x == 0) {
    // every block has made its last claim (2 per unit-count: gridDim.x units, gridDim.x
    // failed tries): zero both counts for the next call
    uint32_t* claim = &ws.state[kStateStageClaim];
    while (ld_acquire_gpu(claim) < 2 * gridDim.x) {
    }
    atomicSub(claim, 2 * gridDim.x);
    atomicSub(&ws.state[kStateStageDone], gridDim.x);
  }
  end(ws, kStateCombineSeen, seen + gridDim.x);
}

// ---------------------------------------------------------------- dispatch
// s_sum[r] += the counts of target r in entries [0, n) of the dispatch's chunk_counts
// ([block, ep], each tagged with the call), every entry awaited (bounded) until it carries
// `tag` (a timeout names `rank`: its own blocks never counted). Threads take entries tid,
// tid + blockDim.x, ...; a wait that gave up counts 0.
__device__ void sum_counts(const uint64_t* counts, int64_t n, int ep, int rank, uint32_t tag,
                           int32_t* s_sum, const WaitContext& w) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    uint64_t v = ld_acquire_gpu(counts + i);
    SpinTimer timer;
    while ((uint32_t)(v >> 32) != tag) {
      if (timer.give_up(w, rank)) {
        v = 0;
        break;
      }
      v = ld_acquire_gpu(counts + i);
    }
    if ((uint32_t)v) atomicAdd(&s_sum[i % ep], (int32_t)(uint32_t)v);
  }
}

// Token t's slot on target r: into the sub-chunk's slots (s_slot, from token c0 on), the
// combine's send_slot and, when recording, the routing handle.
__device__ __forceinline__ void put_slot(const DispatchArgs& p, int32_t* s_slot, int64_t c0,
                                         int64_t t, int r, int slot) {
  const int ep = p.ws.ep_size;
  s_slot[(t - c0) * ep + r] = slot;
  p.send_slot[t * ep + r] = slot;
  if (p.route_mode == kRouteRecord) p.route_slot[t * ep + r] = slot;
}

// Step 1 of dispatch counts by a scan of every token (else by published chunk counts)
// where one pass of the block's warps, 64 tokens each, covers them all.
__device__ __forceinline__ bool counts_by_scan(const DispatchArgs& p) {
  return p.num_tokens <= (int64_t)(blockDim.x >> 5) * 64;
}

// kFp8: the moe_a2a_dispatch_fp8 instantiation, which quantizes payload quant_payload on
// the way; a kernel of its own so that the plain dispatch keeps its registers.
template <bool kFp8>
__device__ __forceinline__ void dispatch(const DispatchArgs& p) {
  __shared__ int32_t s_before[kMaxRanks];  // routed tokens before this block's chunk
  __shared__ int32_t s_total[kMaxRanks];   // routed tokens in all
  extern __shared__ int32_t s_slot[];     // [kSub, ep]: the sub-chunk's slots
  __shared__ int32_t s_count[kSubWarps][kMaxRanks];  // per assigning warp: tokens per target
  __shared__ int32_t s_next[2][kMaxRanks];  // next free slot per target, by sub-chunk parity
  const A2aWorkspace& ws = p.ws;
  const int ep = ws.ep_size;
  const int rank = ws.rank;
  const int64_t T = p.num_tokens;
  const int64_t chunk = (T + gridDim.x - 1) / gridDim.x;
  const int64_t t0 = min(T, (int64_t)blockIdx.x * chunk);
  const int64_t t1 = min(T, t0 + chunk);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;

  __shared__ CopyPayload s_vec_walk[kMaxPayloads], s_word_walk[kMaxPayloads];
  __shared__ int32_t s_warp_count[1024 / 32][kMaxRanks];  // scan: each warp's tokens per target
  uint32_t scan_ma = 0, scan_mb = 0;  // scan: the route masks of the lane's two tokens
  const ExpertOwner owner(p);
  if (threadIdx.x < kMaxRanks) s_before[threadIdx.x] = s_total[threadIdx.x] = 0;
  // payloads moved as 16-byte vectors where rows and pointers allow, else as 4-byte words
  uint32_t vec_payloads = 0, word_payloads = 0;
  for (int q = 0; q < p.num_payloads; ++q) {
    if (kFp8 && q == p.quant_payload) continue;
    if (((p.row_bytes[q] | p.src[q]) & 15u) == 0)
      vec_payloads |= 1u << q;
    else
      word_payloads |= 1u << q;
  }
  plan_copy<Vec16>(p, vec_payloads, s_vec_walk);
  plan_copy<uint32_t>(p, word_payloads, s_word_walk);
  __syncthreads();  // the counters are zero before any warp adds to them in step 1
  pdl_wait();
  // the call's target count (a2a.cuh); the block arrives once step 1 is done, by its last
  // warp, so that the arrive's fence does not hold up the first warp's tokens
  const uint32_t target = read_state(ws, kStateDispatchSeen) + gridDim.x;

  // 1. Per target: tokens routed before t0 and in total. Lane r of each warp counts r, two
  //    tokens per lane at a time. Where one pass of the block's warps covers every token,
  //    every block counts them all (`scan`). Beyond that, every block counts its own chunk
  //    alone, publishes the counts tagged with this call, and sums the published counts of
  //    the blocks before it (blocks start in index order, so every block it waits for is
  //    running); only the last block learns the totals. On 2 x H200, top-8 of 256, this
  //    took the pair from 362.1 to 355.8 us at 4096 tokens (190.7 to 187.8 at 2048), where
  //    every block reading every id had cost 11 us.
  //    Replaying a routing handle: the totals are the handle's, the slots too (step 2).
  const bool replay = p.route_mode == kRouteReplay;
  const bool scan = !replay && counts_by_scan(p);
  const bool last = blockIdx.x == gridDim.x - 1;
  if (replay) {
    if (threadIdx.x < ep) s_total[threadIdx.x] = p.route_total[threadIdx.x];
  } else {
    const int64_t from = scan ? 0 : t0, to = scan ? T : t1;
    int before = 0, own = 0;  // lane r: tokens on target r before t0 / in [from, to)
    for (int64_t base = from + (int64_t)warp * 64; base < to; base += (int64_t)nwarps * 64) {
      const int64_t ta = base + lane, tb = ta + 32;
      const uint32_t ma = ta < to ? route_mask(p, owner, ta) : 0u;
      const uint32_t mb = tb < to ? route_mask(p, owner, tb) : 0u;
      scan_ma = ma, scan_mb = mb;
      const uint32_t pa = __ballot_sync(~0u, ta < t0), pb = __ballot_sync(~0u, tb < t0);
      for (int r = 0; r < ep; ++r) {
        const uint32_t ba = __ballot_sync(~0u, (ma >> r) & 1u);
        const uint32_t bb = __ballot_sync(~0u, (mb >> r) & 1u);
        if (lane == r) {
          own += __popc(ba) + __popc(bb);
          before += __popc(ba & pa) + __popc(bb & pb);
        }
      }
    }
    if (lane < ep && own) {
      atomicAdd(&s_before[lane], before);
      atomicAdd(&s_total[lane], own);  // without `scan`: the chunk's own, for now
    }
    if (scan && lane < ep) s_warp_count[warp][lane] = own;  // one pass: this warp's tokens
    if (!scan) {
      __syncthreads();
      if (threadIdx.x < ep && !last)
        st_release_gpu(p.chunk_counts + (size_t)blockIdx.x * ep + threadIdx.x,
                       ((uint64_t)target << 32) | (uint32_t)s_total[threadIdx.x]);
      sum_counts(p.chunk_counts, (int64_t)blockIdx.x * ep, ep, rank, target, s_before,
                 wait_context(ws, config::kErrA2aDispatch));
      __syncthreads();
      if (last && threadIdx.x < ep) s_total[threadIdx.x] += s_before[threadIdx.x];
    }
  }
  grid_arrive(&ws.state[kStateArrived], blockDim.x - 32);  // with the block's barrier
  if (threadIdx.x < ep) s_next[0][threadIdx.x] = s_before[threadIdx.x];

  // 2. The chunk, `sub` tokens at a time: each assigning warp counts its 32 tokens per
  //    target (while the other warps may still copy the previous sub-chunk), then gives
  //    them their slots in token order after the earlier warps' tokens; the whole block
  //    then copies the sub-chunk's rows of every payload.
  //    Where the scan saw every token and the chunk is one sub-chunk, its route masks give
  //    the chunk's slots at once (token t's slot on target r: the tokens before t routed
  //    to r, those of the warps before t's plus t's rank in its warp), and the sub-chunk
  //    loop only copies (with the token-major copy walk, the pair on 2 x H200 took 13.0
  //    -> 11.3 us at 1 token, 23.8 -> 22.5 at 128; README, Decisions).
  const int sub_warps = min(kSubWarps, nwarps);
  const int sub = 32 * sub_warps;
  const bool slots_by_scan = scan && t1 - t0 <= sub;
  const bool assigns = !replay && !slots_by_scan && warp < sub_warps;
  if (slots_by_scan) {
    if ((int64_t)warp * 64 < t1 && (int64_t)warp * 64 + 64 > t0) {
      int first = 0;  // lane r: tokens on target r in the warps before this one
      if (lane < ep)
        for (int w = 0; w < warp; ++w) first += s_warp_count[w][lane];
      const int64_t ta = (int64_t)warp * 64 + lane, tb = ta + 32;
      const uint32_t below = (1u << lane) - 1u;
      for (int r = 0; r < ep; ++r) {
        const bool ga = (scan_ma >> r) & 1u, gb = (scan_mb >> r) & 1u;
        const uint32_t ba = __ballot_sync(~0u, ga), bb = __ballot_sync(~0u, gb);
        const int f = __shfl_sync(~0u, first, r);
        if (ta >= t0 && ta < t1) put_slot(p, s_slot, t0, ta, r, ga ? f + __popc(ba & below) : -1);
        if (tb >= t0 && tb < t1)
          put_slot(p, s_slot, t0, tb, r, gb ? f + __popc(ba) + __popc(bb & below) : -1);
      }
    }
    __syncthreads();  // slots in
  }
  // the two copy walks (planned before step 1, whose barriers publish them)
  const int vec_count = __popc(vec_payloads), word_count = __popc(word_payloads);
  const uint32_t vec_words = vec_count ? s_vec_walk[vec_count - 1].end : 0u;
  const uint32_t word_words = word_count ? s_word_walk[word_count - 1].end : 0u;
  const bool id_vec = p.id_payload >= 0 && ((vec_payloads >> p.id_payload) & 1u);
  const bool id_word = p.id_payload >= 0 && ((word_payloads >> p.id_payload) & 1u);
  const int id_vec_walk = id_vec ? __popc(vec_payloads & ((1u << p.id_payload) - 1u)) : -1;
  const int id_word_walk = id_word ? __popc(word_payloads & ((1u << p.id_payload) - 1u)) : -1;
  uint32_t m = 0;  // assigning warps: the route mask of the lane's token
  int parity = 0;
  for (int64_t c0 = t0; c0 < t1; c0 += sub, parity ^= 1) {
    const int n = (int)min((int64_t)sub, t1 - c0);
    const int i = warp * 32 + lane;  // the assigning lane's token in the sub-chunk
    if (!slots_by_scan) {  // assign the sub-chunk's slots
      if (assigns) {
        m = i < n ? route_mask(p, owner, c0 + i) : 0u;
        for (int r = 0; r < ep; ++r) {
          const uint32_t b = __ballot_sync(~0u, (m >> r) & 1u);
          if (lane == r) s_count[warp][r] = __popc(b);
        }
      }
      __syncthreads();  // counts in; the previous sub-chunk's copies done (s_slot free)
      if (replay) {
        for (int k = threadIdx.x; k < n * ep; k += blockDim.x) {
          const int slot = p.route_slot[c0 * ep + k];
          s_slot[k] = slot;
          p.send_slot[c0 * ep + k] = slot;
        }
      } else if (assigns) {
        int start = 0;  // lane r: the first slot of this warp's tokens on target r
        if (lane < ep) {
          start = s_next[parity][lane];
          for (int w = 0; w < warp; ++w) start += s_count[w][lane];
          if (warp == sub_warps - 1) s_next[parity ^ 1][lane] = start + s_count[warp][lane];
        }
        const uint32_t below = (1u << lane) - 1u;
        for (int r = 0; r < ep; ++r) {
          const bool go = (m >> r) & 1u;
          const uint32_t b = __ballot_sync(~0u, go);
          const int first = __shfl_sync(~0u, start, r);
          if (i < n) put_slot(p, s_slot, c0, c0 + i, r, go ? first + __popc(b & below) : -1);
        }
      }
      __syncthreads();  // slots in
    }
    if (kFp8) {
      const int q = p.quant_payload;
      const int64_t row = (int64_t)p.row_bytes[q];  // bf16 in: 2 * row bytes per token
      quant_rows(p, s_slot, reinterpret_cast<const uint8_t*>(p.src[q]) + c0 * 2 * row, row,
                 p.recv_off[q] + (size_t)rank * p.runtime_max * row,
                 p.scale_off + (size_t)rank * p.runtime_max * p.scale_row_bytes, n);
    }
    if (vec_count)
      copy_rows<Vec16>(p, s_vec_walk, vec_count, vec_words, id_vec_walk, s_slot, c0, n);
    if (word_count)
      copy_rows<uint32_t>(p, s_word_walk, word_count, word_words, id_word_walk, s_slot, c0, n);
  }

  // 3. Counts into every target's header (block 0, or the last block where only it knows
  //    them), id padding rows (every block, or that block alone); then this block is done.
  // (recomputed from the arguments: a flag kept live across step 2 spills a register)
  const bool known = p.route_mode == kRouteReplay || counts_by_scan(p);
  const bool last_block = blockIdx.x == gridDim.x - 1;
  if ((known ? blockIdx.x == 0 : last_block) && threadIdx.x < ep) {
    reinterpret_cast<int32_t*>(peer_base(ws, threadIdx.x) + kRecvCountOff)[rank] =
        s_total[threadIdx.x];
    if (p.route_mode == kRouteRecord) p.route_total[threadIdx.x] = s_total[threadIdx.x];
  }
  if (p.id_payload >= 0 && (known || last_block)) {
    const int64_t tid = known ? global_thread_id() : threadIdx.x;
    const int64_t stride = known ? global_thread_count() : blockDim.x;
    if ((p.row_bytes[p.id_payload] & 15u) == 0)
      pad_ids<Vec16>(p, s_total, tid, stride);
    else
      pad_ids<uint32_t>(p, s_total, tid, stride);
  }
  signal_all(ws, kDispatchCountOff);
  pdl_launch_dependents();

  // 4. Block 0: wait for every source's blocks, then copy the counts out.
  if (blockIdx.x == 0 &&
      wait_all(ws, kDispatchCountOff, target, wait_context(ws, config::kErrA2aDispatch)) &&
      threadIdx.x < ep)
    p.recv_counts[threadIdx.x] = *reinterpret_cast<const volatile int32_t*>(
        peer_base(ws, rank) + kRecvCountOff + 4 * threadIdx.x);
  end(ws, kStateDispatchSeen, target);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(1024) moe_a2a_dispatch(const DispatchArgs p) {
  dispatch<false>(p);
}

// At most 512 threads (the host launches MoeAlltoAllConfig.dispatch_threads, 512 by
// default): the quantizer needs more than 64 registers.
extern "C" __global__ void __launch_bounds__(512) moe_a2a_dispatch_fp8(const DispatchArgs p) {
  dispatch<true>(p);
}

// moe_a2a_combine_<dtype> pulls into registers, moe_a2a_combine_ring_<dtype> through the
// ring (dynamic shared memory: blockDim x kDepth x kUnits x kGroup x 16 bytes).
#define MOECOMM_A2A_COMBINE(SUFFIX, T)                                                     \
  extern "C" __global__ void __launch_bounds__(512) moe_a2a_combine_##SUFFIX(              \
      const CombineArgs p) {                                                               \
    combine<T, false>(p);                                                                  \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(512) moe_a2a_combine_ring_##SUFFIX(         \
      const CombineArgs p) {                                                               \
    combine<T, true>(p);                                                                   \
  }

MOECOMM_A2A_COMBINE(bf16, __nv_bfloat16)
MOECOMM_A2A_COMBINE(fp16, __half)
MOECOMM_A2A_COMBINE(fp32, float)

// In place on a receive tensor ids [ep, runtime_max, width] (int32): ids outside
// [lo, hi) and every id of rows past counts[s] in block s become `invalid`.
extern "C" __global__ void moe_a2a_sanitize(const SanitizeArgs a) {
  const int64_t n = a.ep_size * a.runtime_max * a.width;
  for (int64_t i = global_thread_id(); i < n; i += global_thread_count()) {
    const int64_t row = i / a.width;
    const int64_t s = row / a.runtime_max;
    const int32_t id = a.ids[i];
    if (row - s * a.runtime_max >= a.counts[s] || id < a.lo || id >= a.hi) a.ids[i] = a.invalid;
  }
}
