// Variable-size collectives over CUDA IPC: all_gatherv and reduce_scatterv, one kernel per
// call (moecomm.collectives), and the local stacked reduction of their NCCL path.
//
// Workspace (one SymmetricBuffer per rank): flags u64 [kVcMaxBlocks][kVcMaxRanks] at offset
// 0, then two data buffers of buffer_bytes; call k uses buffer k % 2; then the Lamport
// buffers of the small-call path (see "Lamport path" below). State words (local): the
// call counter, the grid-arrival count, the abort word of the bounded waits.
//
// Work split (every rank launches the same grid: it depends only on the row counts, the
// same on every rank): a segment of n bytes (what one rank sends one peer) is cut into
// chunks of ceil(n / grid) rounded up to 16 bytes, chunk b belonging to block b on the
// sending and the receiving rank alike; a chunk is cut into items of item_bytes. Block b of
// call k, step t = 0, 1, ...:
//  1. push item t of what it sends each peer into the peer's buffer k % 2 (all_gatherv:
//     also straight into the own output);
//  2. after a block barrier, raise flag[b][rank] = value(k, t) at each such peer (release,
//     system scope: the barrier makes the whole block's writes part of it);
//  3. wait until flag[b][s] >= value(k, t - 1) for every peer s that sends it an item t - 1
//     (bounded), and copy (all_gatherv) or sum in rank order (reduce_scatterv) those items
//     from its own buffer k % 2.
// So pushing item t overlaps the peers' items t - 1 in flight and their copy out.
// value(k, t) = ((k + 1) << 32) + t + 1 (64 bits) grows within a call and from call to
// call; a wait takes a value within [value(k, t), value(k + 2, 0)) only: a peer may be a
// call ahead, and a slot of a block past the recent grids may be any number of calls old
// (only one 2^32 calls old, within a call, would alias). A block with nothing
// to send a peer still raises value(k, 0) once, and one with nothing to receive still
// waits for it: every block hears from every peer every call.
// That makes reuse of buffer k % 2 by call k + 2 safe: a rank enters call k + 2 after its
// call k + 1 heard from every peer, which raises its flags only after pdl_wait(), i.e.
// once its call k (the last reader of buffer k % 2) has completed.
#include "allreduce.cuh"  // allreduce::accumulate: the rank-order fp32 sum of 16-byte vectors

using namespace moecomm;
using allreduce::accumulate;

namespace {

constexpr int kStateCall = 0;
constexpr int kStateArrived = 1;
constexpr int kStateAbort = 2;
constexpr int kUnroll = 4;

__device__ __forceinline__ uint8_t* data(const VcWorkspace& ws, int r, uint32_t call) {
  return reinterpret_cast<uint8_t*>(ws.peers[r]) + ws.data_off + (size_t)(call & 1u) * ws.buffer_bytes;
}

__device__ __forceinline__ uint64_t* flag(const VcWorkspace& ws, int r, int b, int s) {
  return reinterpret_cast<uint64_t*>(ws.peers[r]) + (size_t)b * config::kVcMaxRanks + s;
}

// Bytes [lo, hi) of a segment of n bytes that this block moves.
__device__ __forceinline__ void chunk(uint64_t n, uint64_t& lo, uint64_t& hi) {
  const uint64_t c = ((n + gridDim.x - 1) / gridDim.x + 15) & ~(uint64_t)15;
  lo = min(n, (uint64_t)blockIdx.x * c);
  hi = min(n, lo + c);
}

// Items of item_bytes in this block's chunk of a segment of n bytes.
__device__ __forceinline__ uint32_t items(uint64_t n, uint64_t item_bytes) {
  uint64_t lo, hi;
  chunk(n, lo, hi);
  return (uint32_t)((hi - lo + item_bytes - 1) / item_bytes);
}

// Byte range [lo, hi) of item t of this block's chunk of a segment of n bytes (empty past
// the last item).
__device__ __forceinline__ void item_range(uint64_t n, uint64_t item_bytes, uint32_t t,
                                           uint64_t& lo, uint64_t& hi) {
  uint64_t c0, c1;
  chunk(n, c0, c1);
  lo = min(c1, c0 + (uint64_t)t * item_bytes);
  hi = min(c1, lo + item_bytes);
}

// Flag of item t of call k: the call number in the high word, the item in the low one
// (wait_flag_in, common.cuh: a slot of a block past the recent grids may be any number of
// calls old).
__device__ __forceinline__ uint64_t flag_value(uint32_t k, uint32_t t) {
  return ((uint64_t)(k + 1) << 32) + t + 1;
}

// The block copies n bytes from src to each of dst[0..ndst): 16-byte vectors (kUnroll
// loads in flight per thread) when every address and n are multiples of 16, else 4-byte
// words when they are multiples of 4, else bytes. kPeer: src is memory a peer wrote
// (read through L2 only).
template <bool kPeer>
__device__ __forceinline__ void block_copy(uint8_t* const* dst, int ndst, const uint8_t* src,
                                           uint64_t n) {
  if (n == 0) return;
  uintptr_t align = (uintptr_t)src | (uintptr_t)n;
  for (int d = 0; d < ndst; ++d) align |= (uintptr_t)dst[d];
  if ((align & 15) == 0) {
    const uint64_t nvec = n / 16;
    for (uint64_t v0 = threadIdx.x; v0 < nvec; v0 += kUnroll * blockDim.x) {
      Vec16 x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint64_t v = v0 + u * blockDim.x;
        if (v < nvec) x[u] = kPeer ? ld_vec16_cg(src + v * 16) : ld_vec16(src + v * 16);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint64_t v = v0 + u * blockDim.x;
        if (v < nvec)
          for (int d = 0; d < ndst; ++d) st_vec16(dst[d] + v * 16, x[u]);
      }
    }
  } else if ((align & 3) == 0) {
    for (uint64_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
      const uint32_t x = kPeer ? *(const volatile uint32_t*)(src + 4 * i)
                               : *(const uint32_t*)(src + 4 * i);
      for (int d = 0; d < ndst; ++d) *(uint32_t*)(dst[d] + 4 * i) = x;
    }
  } else {
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint8_t x = kPeer ? *(const volatile uint8_t*)(src + i) : src[i];
      for (int d = 0; d < ndst; ++d) dst[d][i] = x;
    }
  }
}

__device__ __forceinline__ WaitContext wait_context(const VcWorkspace& ws, uint32_t code) {
  return WaitContext{ws.error_word, ws.state + kStateAbort, ws.timeout_ns, code};
}

// Step 2: a block barrier, then thread p raises flag[b][rank] = value at peer p if `to_p`.
__device__ __forceinline__ void signal_peer(const VcWorkspace& ws, uint64_t value, bool to_p) {
  __syncthreads();
  if (threadIdx.x < ws.world && threadIdx.x != ws.rank && to_p)
    st_release_sys(flag(ws, threadIdx.x, blockIdx.x, ws.rank), value);
}

// Step 3: thread s waits for flag[b][s] to reach value if `from_s`: an item at or past it
// of this call, or of the next (a peer may be a call ahead, never two), not a value of
// an older call (the slot's block may have been past the grids since). Block-uniform;
// false if a wait gave up.
__device__ __forceinline__ bool wait_peer(const VcWorkspace& ws, uint64_t value, bool from_s,
                                          const WaitContext& w) {
  bool ok = true;
  if (threadIdx.x < ws.world && threadIdx.x != ws.rank && from_s)
    ok = wait_flag_in(flag(ws, ws.rank, blockIdx.x, threadIdx.x), value,
                      uint64_t{2} << 32, w, threadIdx.x);
  return __syncthreads_and(ok);
}

__device__ __forceinline__ uint32_t begin_call(const VcWorkspace& ws) {
  return word_of(grid_read_and_arrive(ws.state, &ws.state[kStateArrived]), kStateCall);
}

__device__ __forceinline__ void end_call(const VcWorkspace& ws, uint32_t k) {
  if (grid_all_arrived(&ws.state[kStateArrived])) ws.state[kStateCall] = k + 1;
}

}  // namespace

// all_gatherv: tensor i of rank s lands at rows [row0(s), row0(s) + rows[s]) of dst[i] on
// every rank. A data buffer mirrors the outputs: tensor i's region (region_off[i]) holds
// [sum(rows), row_bytes[i]] bytes, so a row sits at the same offset in both. What rank s
// sends is the sequence of its items over tensors 0, 1, ...
struct GatherItems {
  const AllGathervArgs& a;
  // Items of rank s's segments (all tensors) in this block.
  __device__ __forceinline__ uint32_t count(int s) const {
    uint32_t m = 0;
    for (int i = 0; i < a.num_tensors; ++i)
      m += items((uint64_t)a.rows[s] * a.row_bytes[i], a.item_bytes);
    return m;
  }
  // Item t of rank s: its tensor and byte range within rank s's segment of that tensor.
  __device__ __forceinline__ int find(int s, uint32_t t, uint64_t& lo, uint64_t& hi) const {
    for (int i = 0; i < a.num_tensors; ++i) {
      const uint64_t n = (uint64_t)a.rows[s] * a.row_bytes[i];
      const uint32_t m = items(n, a.item_bytes);
      if (t < m) {
        item_range(n, a.item_bytes, t, lo, hi);
        return i;
      }
      t -= m;
    }
    lo = hi = 0;
    return -1;
  }
};

extern "C" __global__ void __launch_bounds__(1024) vc_all_gatherv(const AllGathervArgs a) {
  const VcWorkspace& ws = a.ws;
  const GatherItems g{a};
  pdl_wait();
  const uint32_t k = begin_call(ws);
  int64_t row0[config::kVcMaxRanks];
  uint32_t m[config::kVcMaxRanks];  // items each rank sends (this block)
  uint32_t steps = 0;
  int64_t r0 = 0;
  for (int s = 0; s < ws.world; ++s) {
    row0[s] = r0;
    r0 += a.rows[s];
    m[s] = g.count(s);
    steps = max(steps, max(m[s], 1u));
  }
  const uint8_t* buf = data(ws, ws.rank, k);
  const WaitContext w = wait_context(ws, config::kErrAllGatherv);
  bool ok = true;
  for (uint32_t t = 0; t <= steps && ok; ++t) {
    if (t < max(m[ws.rank], 1u)) {
      uint64_t lo, hi;
      const int i = g.find(ws.rank, t, lo, hi);
      if (i >= 0) {
        const uint64_t off = (uint64_t)row0[ws.rank] * a.row_bytes[i] + lo;
        uint8_t* dst[config::kVcMaxRanks];
        dst[0] = reinterpret_cast<uint8_t*>(a.dst[i]) + off;
        for (int q = 1; q < ws.world; ++q) {
          const int p = ws.rank + q < ws.world ? ws.rank + q : ws.rank + q - ws.world;
          dst[q] = data(ws, p, k) + a.region_off[i] + off;
        }
        block_copy<false>(dst, ws.world, reinterpret_cast<const uint8_t*>(a.src[i]) + lo, hi - lo);
      }
      signal_peer(ws, flag_value(k, t), true);
    }
    if (t == 0) continue;
    const uint32_t u = t - 1;
    const bool from = threadIdx.x < ws.world && u < max(m[threadIdx.x], 1u);
    if (!(ok = wait_peer(ws, flag_value(k, u), from, w))) break;
    for (int q = 1; q < ws.world; ++q) {
      const int s = ws.rank + q < ws.world ? ws.rank + q : ws.rank + q - ws.world;
      uint64_t lo, hi;
      const int i = u < m[s] ? g.find(s, u, lo, hi) : -1;
      if (i < 0) continue;
      const uint64_t off = (uint64_t)row0[s] * a.row_bytes[i] + lo;
      uint8_t* dst = reinterpret_cast<uint8_t*>(a.dst[i]) + off;
      block_copy<true>(&dst, 1, buf + a.region_off[i] + off, hi - lo);
    }
  }
  pdl_launch_dependents();
  end_call(ws, k);
}

// reduce_scatterv: rank p's rows of every rank's input go to slot `rank` of p's buffer
// ([world][rows[p] * row_bytes]); rank r sums its slots (its own rows read from `in`) in
// rank order 0, 1, ... in fp32, starting from +0, and rounds once.
template <typename T>
__device__ __forceinline__ void reduce_scatterv(const ReduceScattervArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const VcWorkspace& ws = a.ws;
  const uint8_t* in = static_cast<const uint8_t*>(a.in);
  pdl_wait();
  const uint32_t k = begin_call(ws);
  int64_t row0[config::kVcMaxRanks];
  uint32_t m[config::kVcMaxRanks];  // items of each rank's segment (this block)
  uint32_t steps = 0;
  int64_t r0 = 0;
  for (int s = 0; s < ws.world; ++s) {
    row0[s] = r0;
    r0 += a.rows[s];
    m[s] = items((uint64_t)a.rows[s] * a.row_bytes, a.item_bytes);
    steps = max(steps, max(m[s], 1u));
  }
  const uint64_t n_own = (uint64_t)a.rows[ws.rank] * a.row_bytes;
  const uint8_t* own = in + (uint64_t)row0[ws.rank] * a.row_bytes;
  const uint8_t* buf = data(ws, ws.rank, k);
  uint8_t* out = static_cast<uint8_t*>(a.out);
  const WaitContext w = wait_context(ws, config::kErrReduceScatterv);
  bool ok = true;
  for (uint32_t t = 0; t <= steps && ok; ++t) {
    bool pushed = false;
    for (int q = 1; q < ws.world; ++q) {
      const int p = ws.rank + q < ws.world ? ws.rank + q : ws.rank + q - ws.world;
      if (t >= max(m[p], 1u)) continue;
      pushed = true;
      const uint64_t n = (uint64_t)a.rows[p] * a.row_bytes;
      uint64_t lo, hi;
      item_range(n, a.item_bytes, t, lo, hi);
      uint8_t* dst = data(ws, p, k) + (uint64_t)ws.rank * n + lo;
      block_copy<false>(&dst, 1, in + (uint64_t)row0[p] * a.row_bytes + lo, hi - lo);
    }
    if (pushed)
      signal_peer(ws, flag_value(k, t), threadIdx.x < ws.world && t < max(m[threadIdx.x], 1u));
    if (t == 0 || t - 1 >= max(m[ws.rank], 1u)) continue;
    const uint32_t u = t - 1;
    if (!(ok = wait_peer(ws, flag_value(k, u), true, w))) break;
    uint64_t lo, hi;
    item_range(n_own, a.item_bytes, u, lo, hi);
    for (uint64_t off = lo + 16 * threadIdx.x; off < hi; off += 16 * blockDim.x) {
      float acc[K] = {};
      for (int s = 0; s < ws.world; ++s)
        accumulate<T>(acc, s == ws.rank ? ld_vec16(own + off) : ld_vec16_cg(buf + s * n_own + off),
                      false);
      st_vec16(out + off, round_pack<T>(acc));
    }
  }
  pdl_launch_dependents();
  end_call(ws, k);
}

// ------------------------------------------------------------------ Lamport path
// Small calls (moecomm.collectives picks the path by a byte model) skip the flags: the
// all-reduce's Lamport protocol of allreduce.cuh, reused as is over the workspace's own
// Lamport buffers [3][world][lamport_slot] (ArWorkspace `a.lamport`, its own call counter
// and state words): rank s writes only slot s of a peer's buffer k % 3, every word holds
// 0x80000000 ("not yet written") between uses, receivers poll their own buffer until no
// 32-bit word of a vector holds it, and each call refills with the sentinel what its peers
// wrote two calls before (clear_previous). One kernel, no barrier, no flag.
//
// Arrival: a slot starts with a header vector that the sender writes every call, rows or
// not, and the receiver waits for from every peer every call. Without it a rank that
// receives nothing (no rows of its own in reduce_scatterv, no rows from any peer in
// all_gatherv) waits for no peer, so it could run two calls ahead and write a peer's
// buffer (k + 2) % 3 while that peer, still in call k, refills it with the sentinel. With
// it, rank p enters call k + 2 only after its call k + 1 heard from us, which we sent after
// our call k (and its refill) completed: the all-reduce's argument, made for every size.
//
// Payload words equal to the sentinel:
//  * reduce_scatterv sends canonical vectors (Lamport<T>::canonical: fp32 -0.0 and 16-bit
//    -0.0 halves become +0), so no word is 0x80000000. That is exact: the sum starts at +0
//    in fp32 and x + (-0) == x + (+0) == x for every x (+0 included: the accumulator is
//    never -0), so a -0.0 input never changes the rounded result.
//  * all_gatherv moves arbitrary bytes, where 0x80000000 is a legal word. A rank's stream
//    (its segment of tensor 0, then tensor 1, ..., each padded to 16 bytes) travels in lines
//    of 512 bytes: 31 payload vectors and one mask vector. Lane i < 31 of a warp owns
//    payload vector i and sends it with every 0x80000000 word replaced by 0; lane 31 sends
//    the mask: word j has bit i set where vector i's word j was 0x80000000 (the ballot of
//    the 31 payload lanes, bit 31 always clear, so a mask word is never the sentinel). The
//    receiving warp polls its line (the mask included) until no word is pending and puts
//    the flagged words back: the bytes arrive bitwise, at 1/32 extra traffic, with no
//    assumption beyond 32-bit single-copy atomicity (the one Lamport already makes).
using allreduce::Call;
using allreduce::clear_previous;
using allreduce::lamport;

namespace {

constexpr uint32_t kSentinel = 0x80000000u;
constexpr int kLineVecs = 31;     // payload vectors of a 512-byte line (+ one mask vector)
constexpr int kLineBytes = 512;
static_assert(config::kVcMaxRanks <= config::kArMaxRanks, "VcWorkspace ranks fit ArWorkspace");

__device__ __forceinline__ uint32_t global_warp() { return (uint32_t)(global_thread_id() / 32); }
__device__ __forceinline__ uint32_t global_warps() { return (uint32_t)(global_thread_count() / 32); }

// n (<= 16) bytes at p as a vector, the rest +0 (a plain 16-byte load when aligned and full).
__device__ __forceinline__ Vec16 load_bytes(const uint8_t* p, uint32_t n) {
  if (n == 16 && ((uintptr_t)p & 15) == 0) return ld_vec16(p);
  union { Vec16 v; uint8_t b[16]; } u;
  u.v = Vec16{0, 0, 0, 0};
  for (uint32_t i = 0; i < n; ++i) u.b[i] = p[i];
  return u.v;
}

__device__ __forceinline__ void store_bytes(uint8_t* p, uint32_t n, const Vec16& x) {
  if (n == 16 && ((uintptr_t)p & 15) == 0) {
    st_vec16(p, x);
    return;
  }
  union { Vec16 v; uint8_t b[16]; } u;
  u.v = x;
  for (uint32_t i = 0; i < n; ++i) p[i] = u.b[i];
}

// Rank s's all_gatherv stream: payload vector v is bytes [16 (v - first), ...) of its
// segment of one tensor.
struct GatherStream {
  const AllGathervArgs& a;
  __device__ __forceinline__ uint64_t seg_bytes(int s, int i) const {
    return (uint64_t)a.rows[s] * a.row_bytes[i];
  }
  __device__ __forceinline__ uint64_t vecs(int s) const {
    uint64_t n = 0;
    for (int i = 0; i < a.num_tensors; ++i) n += (seg_bytes(s, i) + 15) / 16;
    return n;
  }
  __device__ __forceinline__ uint64_t lines(int s) const { return (vecs(s) + kLineVecs - 1) / kLineVecs; }
  // Vector v of rank s: its tensor (-1 past the end), byte offset in the segment, bytes.
  __device__ __forceinline__ int find(int s, uint64_t v, uint64_t& off, uint32_t& n) const {
    for (int i = 0; i < a.num_tensors; ++i) {
      const uint64_t b = seg_bytes(s, i), nv = (b + 15) / 16;
      if (v < nv) {
        off = 16 * v;
        n = (uint32_t)min((uint64_t)16, b - off);
        return i;
      }
      v -= nv;
    }
    return -1;
  }
};

// Mask bit `lane` of each word: which words of this lane's vector are the sentinel.
__device__ __forceinline__ Vec16 sentinel_mask(const Vec16& x) {
  const uint32_t keep = 0x7FFFFFFFu;  // lanes 0..30: bit 31 stays clear
  return Vec16{__ballot_sync(~0u, x.x == kSentinel) & keep, __ballot_sync(~0u, x.y == kSentinel) & keep,
               __ballot_sync(~0u, x.z == kSentinel) & keep, __ballot_sync(~0u, x.w == kSentinel) & keep};
}

__device__ __forceinline__ uint32_t unzero(uint32_t w) { return w == kSentinel ? 0u : w; }

constexpr int kHeader = config::kVcLamportHeaderBytes;  // payload starts past the header

// Header: block 0, thread p raises the arrival vector in slot `rank` of peer p's buffer.
__device__ __forceinline__ void announce(const ArWorkspace& ws, int buf) {
  if (blockIdx.x == 0 && threadIdx.x < ws.world && threadIdx.x != ws.rank)
    st_vec16(lamport(ws, threadIdx.x, buf, ws.rank), Vec16{1u, 1u, 1u, 1u});
}

// Block 0, thread s waits for peer s's arrival vector in its slot of our buffer (bounded;
// a timeout is recorded like any other wait's).
__device__ __forceinline__ void await_peers(const ArWorkspace& ws, int buf, const WaitContext& w) {
  if (blockIdx.x != 0 || threadIdx.x >= ws.world || threadIdx.x == ws.rank) return;
  const uint8_t* src = lamport(ws, ws.rank, buf, threadIdx.x);
  Vec16 x = ld_vec16_volatile(src);
  lamport_wait<float>(src, x, w, threadIdx.x);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(1024) vc_all_gatherv_lamport(const AllGathervArgs a) {
  const ArWorkspace& ws = a.lamport;
  const GatherStream g{a};
  const int lane = threadIdx.x & 31, rank = ws.rank;
  int64_t row0[config::kVcMaxRanks];
  uint64_t nlines[config::kVcMaxRanks];
  uint64_t most = 0;
  int64_t r0 = 0;
  for (int s = 0; s < ws.world; ++s) {
    row0[s] = r0;
    r0 += a.rows[s];
    nlines[s] = g.lines(s);
    most = max(most, nlines[s]);
  }
  pdl_wait();
  const Call call = allreduce::begin_call(ws);
  const int buf = call.index % 3;
  announce(ws, buf);
  // Push: own lines to every peer's slot `rank`; the own rows straight to the output.
  for (uint64_t l = global_warp(); l < nlines[rank]; l += global_warps()) {
    Vec16 x{0, 0, 0, 0};
    uint64_t off = 0;
    uint32_t n = 0;
    const int i = lane < kLineVecs ? g.find(rank, l * kLineVecs + lane, off, n) : -1;
    if (i >= 0) {
      x = load_bytes(reinterpret_cast<const uint8_t*>(a.src[i]) + off, n);
      store_bytes(reinterpret_cast<uint8_t*>(a.dst[i]) + (uint64_t)row0[rank] * a.row_bytes[i] + off,
                  n, x);
    }
    const Vec16 mask = sentinel_mask(x);
    if (lane == kLineVecs) x = mask;
    else x = Vec16{unzero(x.x), unzero(x.y), unzero(x.z), unzero(x.w)};
    if (i >= 0 || lane == kLineVecs)
      for (int q = 1; q < ws.world; ++q) {
        const int p = rank + q < ws.world ? rank + q : rank + q - ws.world;
        st_vec16(lamport(ws, p, buf, rank) + kHeader + l * kLineBytes + lane * 16, x);
      }
  }
  pdl_launch_dependents();
  clear_previous<float>(ws, call);
  // Receive: line l of peer s, the warp's items taken over peers in order.
  const WaitContext w = allreduce::wait_context(ws, config::kErrAllGatherv);
  uint64_t total = 0;
  for (int s = 0; s < ws.world; ++s) total += s == rank ? 0 : nlines[s];
  for (uint64_t j = global_warp(); j < total; j += global_warps()) {
    int s = 0;
    uint64_t l = j;
    for (; s < ws.world; ++s) {
      if (s == rank) continue;
      if (l < nlines[s]) break;
      l -= nlines[s];
    }
    uint64_t off = 0;
    uint32_t n = 0;
    const int i = lane < kLineVecs ? g.find(s, l * kLineVecs + lane, off, n) : -1;
    bool ok = true;
    Vec16 x{0, 0, 0, 0};
    if (i >= 0 || lane == kLineVecs) {
      const uint8_t* src = lamport(ws, rank, buf, s) + kHeader + l * kLineBytes + lane * 16;
      x = ld_vec16_volatile(src);
      ok = lamport_wait<float>(src, x, w, s);
    }
    if (!__all_sync(~0u, ok)) break;
    const uint32_t bit = 1u << lane;
    const uint32_t m0 = __shfl_sync(~0u, x.x, kLineVecs), m1 = __shfl_sync(~0u, x.y, kLineVecs),
                   m2 = __shfl_sync(~0u, x.z, kLineVecs), m3 = __shfl_sync(~0u, x.w, kLineVecs);
    if (i < 0) continue;
    if (m0 & bit) x.x = kSentinel;
    if (m1 & bit) x.y = kSentinel;
    if (m2 & bit) x.z = kSentinel;
    if (m3 & bit) x.w = kSentinel;
    store_bytes(reinterpret_cast<uint8_t*>(a.dst[i]) + (uint64_t)row0[s] * a.row_bytes[i] + off, n, x);
  }
  await_peers(ws, buf, w);
  allreduce::end_call(ws, call, (uint32_t)(kHeader + most * kLineBytes));
}

// reduce_scatterv over the Lamport buffers: slot s of rank r's buffer holds rank s's rows of
// rank r (canonical); rank r sums every slot (its own rows read from `in`) in rank order
// from +0 in fp32 and rounds once: the pipelined path's bits.
template <typename T>
__device__ __forceinline__ void reduce_scatterv_lamport(const ReduceScattervArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  constexpr int kPoll = 4;  // slots a thread has in flight
  const ArWorkspace& ws = a.lamport;
  const int rank = ws.rank;
  const uint8_t* in = static_cast<const uint8_t*>(a.in);
  int64_t row0[config::kVcMaxRanks];
  uint64_t most = 0, total = 0;
  int64_t r0 = 0;
  for (int s = 0; s < ws.world; ++s) {
    row0[s] = r0;
    r0 += a.rows[s];
    const uint64_t nv = (uint64_t)a.rows[s] * a.row_bytes / 16;
    most = max(most, nv);
    total += s == rank ? 0 : nv;
  }
  const size_t tid = global_thread_id(), stride = global_thread_count();
  pdl_wait();
  const Call call = allreduce::begin_call(ws);
  const int buf = call.index % 3;
  announce(ws, buf);
  for (uint64_t j = tid; j < total; j += stride) {
    int p = 0;
    uint64_t v = j;
    for (; p < ws.world; ++p) {
      if (p == rank) continue;
      const uint64_t nv = (uint64_t)a.rows[p] * a.row_bytes / 16;
      if (v < nv) break;
      v -= nv;
    }
    const Vec16 x = Lamport<T>::canonical(ld_vec16(in + (uint64_t)row0[p] * a.row_bytes + v * 16));
    st_vec16(lamport(ws, p, buf, rank) + kHeader + v * 16, x);
  }
  pdl_launch_dependents();
  clear_previous<float>(ws, call);
  const WaitContext w = allreduce::wait_context(ws, config::kErrReduceScatterv);
  const uint64_t n_own = (uint64_t)a.rows[rank] * a.row_bytes / 16;
  const uint8_t* own = in + (uint64_t)row0[rank] * a.row_bytes;
  const uint8_t* slot0 = lamport(ws, rank, buf, 0) + kHeader;
  uint8_t* out = static_cast<uint8_t*>(a.out);
  bool ok = true;
  for (uint64_t v = tid; ok && v < n_own; v += stride) {
    float acc[K] = {};
    for (int s0 = 0; ok && s0 < ws.world; s0 += kPoll) {
      Vec16 x[kPoll];
#pragma unroll
      for (int u = 0; u < kPoll; ++u) {
        const int s = s0 + u;
        if (s < ws.world)
          x[u] = s == rank ? ld_vec16(own + v * 16) : ld_vec16_volatile(slot0 + s * ws.lamport_slot + v * 16);
      }
#pragma unroll
      for (int u = 0; u < kPoll; ++u) {
        const int s = s0 + u;
        if (!ok || s >= ws.world) continue;
        if (s != rank) ok = lamport_wait<float>(slot0 + s * ws.lamport_slot + v * 16, x[u], w, s);
        if (ok) accumulate<T>(acc, x[u], false);
      }
    }
    if (ok) st_vec16(out + v * 16, round_pack<T>(acc));
  }
  await_peers(ws, buf, w);
  allreduce::end_call(ws, call, (uint32_t)(kHeader + most * 16));
}

template <typename T>
__device__ __forceinline__ void stack_reduce(const StackReduceArgs& a) {
  constexpr int K = Pack16<T>::kLanes;
  const uint8_t* in = static_cast<const uint8_t*>(a.in);
  uint8_t* out = static_cast<uint8_t*>(a.out);
  pdl_wait();
  for (size_t v = global_thread_id(); v < (size_t)a.nvec; v += global_thread_count()) {
    float acc[K] = {};
    for (int64_t s = 0; s < a.slots; ++s)
      accumulate<T>(acc, ld_vec16(in + ((size_t)s * a.nvec + v) * 16), false);
    st_vec16(out + v * 16, round_pack<T>(acc));
  }
  pdl_launch_dependents();
}

#define MOECOMM_VC_KERNELS(SUFFIX, T)                                                    \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      vc_reduce_scatterv_##SUFFIX(const ReduceScattervArgs a) {                          \
    reduce_scatterv<T>(a);                                                               \
  }                                                                                      \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      vc_reduce_scatterv_lamport_##SUFFIX(const ReduceScattervArgs a) {                  \
    reduce_scatterv_lamport<T>(a);                                                       \
  }                                                                                      \
  extern "C" __global__ void vc_stack_reduce_##SUFFIX(const StackReduceArgs a) {         \
    stack_reduce<T>(a);                                                                  \
  }

MOECOMM_VC_KERNELS(bf16, __nv_bfloat16)
MOECOMM_VC_KERNELS(fp16, __half)
MOECOMM_VC_KERNELS(fp32, float)
