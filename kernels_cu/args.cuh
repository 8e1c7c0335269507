// The argument struct of every kernel family, declared once. Each kernel takes exactly
// one of these by value; moecomm/kernel_args.py mirrors them field for field (a CPU test
// compares the two), and moecomm.launch patches them in place per call.
//
// Compile-time choices (element type, quantizer, algorithm) are kernel names, not fields.
// Rules that keep the mirror exact: one field per line; fixed-width types, pointers,
// float; array extents are MOECOMM_* constants.
#pragma once
#include "common.cuh"
#include "config.cuh"

namespace moecomm {

// ------------------------------------------------------------------ all-reduce family
// The all-reduce workspace as kernels see it (moecomm.allreduce.AllReduceWorkspace).
struct ArWorkspace {
  uint64_t peers[MOECOMM_AR_MAX_RANKS];  // base address of every rank's buffer
  uint32_t* state;                       // local control words (allreduce.cuh kState*)
  uint32_t* error_word;                  // mapped host memory (moecomm.errors)
  uint64_t timeout_ns;                   // bound of every wait for a peer, 0 = forever
  uint64_t lamport_off;                  // Lamport buffers [3][world][lamport_slot]
  uint64_t lamport_slot;                 // bytes per rank slot: the one-shot limit
  uint64_t rs_off;                       // two-shot reduce-scatter inbox [world][rs_slot]
  uint64_t rs_slot;                      // bytes per rank slot
  uint64_t ag_off;                       // two-shot all-gather inbox [max bytes]
  uint64_t flag_off;                     // two-shot flags u64 [2][AR_MAX_BLOCKS][AR_MAX_RANKS]
  int32_t rank;
  int32_t world;
};

// all_reduce (allreduce.cu): out = sum over ranks of in.
struct AllReduceArgs {
  const void* in;       // [n] of T
  void* out;            // [n] of T, may be `in`
  uint64_t n;           // elements
  uint32_t chunk_vecs;  // two-shot: 16-byte vectors a block moves per pipelined chunk
  uint32_t push_blocks;  // one-shot: 0, or the blocks that only push (the rest reduce)
  ArWorkspace ws;
};

// Mixed communication (mixed.cu). Every block of `unit` elements of the output is a sum,
// over the sources listed for it, of block `in_block` of each source's input: output
// block i sums src_count[i] sources whose indices are the 4-bit fields of src_rows[i],
// lowest first (mixed_oneshot: ranks of the workspace; mixed_reduce: rows of `staged`).
struct MixedArgs {
  const void* in;        // [in_blocks * unit] of T, this rank's input
  void* out;             // [out_blocks * unit] of T
  const void* staged;    // mixed_reduce: rows of row_elems elements (inputs gathered by NCCL)
  uint64_t unit;         // elements per block; unit * sizeof(T) is a multiple of 16
  uint64_t row_elems;    // mixed_reduce: elements per staged row
  uint32_t in_blocks;    // blocks of `in`
  uint32_t out_blocks;   // blocks of `out`
  uint32_t in_block;     // the block of each source's input that is summed
  uint32_t push_mask[MOECOMM_AR_MAX_RANKS];  // mixed_oneshot: input block j goes to these ranks
  uint32_t src_count[MOECOMM_AR_MAX_RANKS];  // sources per output block
  uint64_t src_rows[MOECOMM_AR_MAX_RANKS];   // 4-bit source indices per output block
  ArWorkspace ws;
};

// All-reduce reading the peers' registered inputs in place (vllm_ar.cu): out = sum over
// ranks r of table[r] + offset.
struct RegAllReduceArgs {
  const uint64_t* table;  // [world] device table: each rank's input address
  void* out;              // [n] of T
  uint64_t offset;        // bytes added to every table entry
  uint64_t n;             // elements
  ArWorkspace ws;
};

// allreduce_fusion, the MoE fusions and rmsnorm_fusion (fusion.cu).
struct FusionArgs {
  const void* input;         // [tokens, hidden] (Source kSourceInput)
  const void* residual_in;   // [tokens, hidden] or null (kAllReduce)
  const void* gamma;         // [hidden]
  const float* scale;        // device scalar: FP8 dequantization scale / NVFP4 global scale
  void* allreduce_out;       // outputs, null when the pattern does not write them
  void* residual_out;
  void* norm_out;
  uint8_t* quant_out;
  void* scale_out;
  const void* moe_rows;      // MoE reduction: experts' outputs [E, T, H]; finalize: [P, H]
  const void* moe_scale;     // reduction: [E, T] fp32; finalize: [T, k] or null
  const void* moe_extra;     // reduction: token_input [T, H]; finalize: shared output or null
  const int32_t* moe_index;  // finalize: [T, k] rows of moe_rows, < 0 = not on this rank
  uint64_t tokens;
  uint32_t hidden;
  uint32_t source;           // Source
  float eps;
  float weight_bias;
  uint32_t group_size;       // per-token-group FP8: elements per scale
  uint32_t swizzled;         // NVFP4 scale layout: 1 = 128x4 swizzled, 0 = linear
  uint32_t moe_count;        // experts E (reduction) or top_k (finalize)
  uint32_t moe_scale_fp32;   // finalize: moe_scale is fp32 (1) or the I/O dtype (0)
  float routed_scaling;      // finalize: multiplies the routed sum
  uint32_t push_blocks;      // one-shot: 0, or the blocks that only push (the rest reduce)
  ArWorkspace ws;            // unused by rmsnorm_fusion
};

// ------------------------------------------------------------------ MoE all-to-all family
// MoeAlltoAll's workspace as kernels see it (moecomm.moe.alltoall; layout: moe_a2a.cu).
struct A2aWorkspace {
  uint64_t peers[MOECOMM_A2A_MAX_RANKS];  // base address of every rank's workspace
  uint32_t* state;                        // local control words (moe_a2a.cu kState*)
  uint32_t* error_word;                   // mapped host memory (moecomm.errors)
  uint64_t timeout_ns;                    // bound of every wait for a peer, 0 = forever
  int32_t rank;
  int32_t ep_size;
};

// MoeAlltoAll.dispatch (moe_a2a.cu): every payload row of every token to every distinct
// rank owning one of its experts.
struct DispatchArgs {
  const int32_t* experts;                       // [T, top_k] token_selected_experts
  int32_t* send_slot;                           // [T, ep] local: token t's row on rank r
  int32_t* recv_counts;                         // [ep] local: rows received per source
  int32_t* route_slot;                          // routing handle [T, ep]: send_slot's copy
  int32_t* route_total;                         // routing handle [ep]: rows sent per target
  uint64_t* chunk_counts;                       // [grid, ep] local: (tag << 32) | count
  uint64_t src[MOECOMM_A2A_MAX_PAYLOADS];       // payload p: [T, *] input rows
  uint64_t row_bytes[MOECOMM_A2A_MAX_PAYLOADS]; // bytes per received row (fp8: H codes)
  uint64_t recv_off[MOECOMM_A2A_MAX_PAYLOADS];  // workspace offset of receive tensor p
  uint64_t scale_off;                           // fp8: workspace offset of the scales
  uint64_t scale_row_bytes;                     // fp8: bytes of one token's scales
  int32_t num_tokens;                           // T
  int32_t top_k;
  int32_t num_experts;
  int32_t experts_per_rank;
  int32_t runtime_max;                          // rows per source block of a receive tensor
  int32_t num_payloads;
  int32_t id_payload;                           // payload sanitised per target, or -1
  int32_t invalid_id;
  int32_t quant_payload;                        // fp8: the bf16 payload quantized, or -1
  int32_t scale_format;                         // fp8: 0 fp32 scales, 1 UE8M0 packed
  int32_t route_mode;                           // 0: layout pass; 1: and record; 2: replay
  A2aWorkspace ws;
};

// MoeAlltoAll.combine (moe_a2a.cu): per token, the sum of its targets' rows.
struct CombineArgs {
  const uint8_t* payload;     // [ep, runtime_max, row_bytes] this rank's expert outputs
  uint8_t* out;               // [T, row_bytes]
  const int32_t* send_slot;   // [T, ep] from the dispatch
  const int32_t* recv_counts; // [ep] from the dispatch
  uint64_t region_off;        // workspace offset of the combine region
  uint64_t row_bytes;         // a multiple of 16
  int32_t num_tokens;         // T of the dispatch
  int32_t runtime_max;
  int32_t stage;              // 1: copy the payload's valid rows into the region first
  A2aWorkspace ws;
};

// moe_a2a_sanitize_expert_ids: ids [ep, runtime_max, width] int32, in place.
struct SanitizeArgs {
  int32_t* ids;
  const int32_t* counts;      // [ep] valid rows per source block
  int64_t ep_size;
  int64_t runtime_max;
  int64_t width;
  int32_t lo;                 // ids in [lo, hi) are kept
  int32_t hi;
  int32_t invalid;
};

// ------------------------------------------------------------------ compact layer family
// EPAllToAll (moe_compact.cu): count + scatter after MoeAlltoAll.dispatch, pull or reduce
// around MoeAlltoAll.combine.
struct CompactDispatchArgs {
  const int32_t* ids;          // [ep, rmax, top_k] received expert ids
  const int32_t* tok;          // [ep, rmax] received token indices
  const uint8_t* x;            // [ep, rmax, row_bytes] received hidden rows
  const float* w;              // [ep, rmax, top_k] received weights
  const int32_t* recv_counts;  // [ep] rows received from each source
  uint8_t* recv_x;             // [capacity, row_bytes] out
  float* recv_w;               // [capacity] out
  int32_t* src;                // [capacity, 3] out: (source rank, token, k slot)
  int32_t* inv;                // [ep, rmax, top_k] out: row of each entry or < 0; or null
  uint64_t peers[MOECOMM_A2A_MAX_RANKS];  // exact combine: every rank's symmetric buffer
  int64_t codes_off;           // exact combine: codes i32 [max_tokens, top_k] in it, or -1
  const int32_t* ids_in;       // [T, top_k] this rank's topk_ids ...
  int32_t* ids_copy;           // ... kept here for its combine
  int64_t num_tokens;          // T
  int32_t* stats;              // [8] (moecomm.constants.CompactStat)
  int32_t* tokens_per_expert;  // [epr] out
  int32_t* offsets;            // [epr + 1] out
  int64_t ep_size;
  int64_t rank;
  int64_t experts_per_rank;
  int64_t top_k;
  int64_t runtime_max;
  int64_t capacity;
  int64_t row_bytes;           // a multiple of 16
  int64_t slices;              // blocks per row chunk, each copying a slice of the columns
};

struct CompactPullArgs {
  uint64_t peers[MOECOMM_A2A_MAX_RANKS];  // every rank's symmetric buffer (y, weights, codes)
  const int32_t* ids;          // [T, top_k] this rank's topk_ids (the dispatch's copy)
  const int32_t* codes;        // [T, top_k] slot j's row + 1 at its owner, 0: dropped
  uint8_t* out;                // [T, row_bytes]
  int64_t y_off;               // the y buffer [capacity, row_bytes] in the symmetric buffer
  int64_t w_off;               // the received weights [capacity] fp32 in it
  int64_t num_tokens;
  int64_t top_k;
  int64_t experts_per_rank;
  int64_t row_bytes;
  int64_t capacity;
  int64_t apply_weights;
  A2aWorkspace ws;             // the exchange's: the combine handshake (a2a.cuh)
};

struct CompactReduceArgs {
  const uint8_t* y;            // [capacity, row_bytes] expert outputs
  const float* recv_w;         // [capacity]
  const int32_t* inv;          // [ep, rmax, top_k]
  const int32_t* recv_counts;  // [ep]
  uint8_t* payload;            // [ep, rmax, row_bytes] MoeAlltoAll's combine region
  int64_t ep_size;
  int64_t runtime_max;
  int64_t top_k;
  int64_t row_bytes;
  int64_t capacity;
  int64_t apply_weights;
};

// Rows [0, min(stats[ROWS], capacity)) of y to dst.
struct CompactStageArgs {
  const uint8_t* y;
  uint8_t* dst;
  const int32_t* stats;
  int64_t row_bytes;
  int64_t capacity;
};

// ------------------------------------------------------------------ decode CP family
// DcpAlltoAll.alltoall (dcp.cu): row r's slice for peer p, o_in[r, p] and stats_in[r, p],
// to peer p; o_out[r, s] and stats_out[r, s] receive peer s's slice for this rank.
struct DcpArgs {
  const void* o_in;        // [rows, cp, D] of T (fp16 / bf16)
  const float* stats_in;   // [rows, cp, S]
  void* o_out;             // [rows, cp, D] of T, may be o_in
  float* stats_out;        // [rows, cp, S], may be stats_in
  uint64_t rows;
  uint32_t o_vecs;         // D * sizeof(T) / 16
  uint32_t stats_dim;      // S, even
  uint32_t row_vecs;       // 16-byte vectors of one row in a Lamport slot: o_vecs + ceil(S / 4)
  ArWorkspace ws;          // Lamport buffers only (lamport_off, lamport_slot); world = cp
};

// lse_combine (dcp.cu): out[r] = the partials o[r, 0..cp) merged by their softmax stats.
struct DcpCombineArgs {
  const void* o;           // [rows, cp, D] of T
  const float* stats;      // [rows, cp, S]
  void* out;               // [rows, D] of T
  float* lse_out;          // [rows] or null
  uint64_t rows;
  uint32_t o_vecs;         // D * sizeof(T) / 16
  uint32_t stats_dim;      // S
  uint32_t cp;
  uint32_t format;         // StatsFormat
};

// ------------------------------------------------------------------ barrier
// barrier (barrier.cu): every rank's buffer holds u32 arrival counters [max ranks];
// entry s is incremented by rank s once per call.
struct BarrierArgs {
  uint64_t peers[MOECOMM_BARRIER_MAX_RANKS];  // base address of every rank's counters
  uint32_t* state;                            // local: [0] calls so far, [1] abort word
  uint32_t* error_word;                       // mapped host memory (moecomm.errors)
  uint64_t timeout_ns;                        // bound of the wait for a peer, 0 = forever
  int32_t rank;
  int32_t world;
};

// ------------------------------------------------------------------ v-collectives family
// VCollectiveWorkspace as kernels see it (moecomm.collectives; protocol: collectives.cu).
struct VcWorkspace {
  uint64_t peers[MOECOMM_VC_MAX_RANKS];  // base address of every rank's buffer
  uint32_t* state;                       // local control words (collectives.cu kState*)
  uint32_t* error_word;                  // mapped host memory (moecomm.errors)
  uint64_t timeout_ns;                   // bound of every wait for a peer, 0 = forever
  uint64_t data_off;                     // the two data buffers [2][buffer_bytes]
  uint64_t buffer_bytes;
  int32_t rank;
  int32_t world;
};

// all_gatherv (collectives.cu): dst[i] rows of every rank, rank order.
struct AllGathervArgs {
  uint64_t src[MOECOMM_VC_MAX_TENSORS];        // tensor i: this rank's rows[rank] rows
  uint64_t dst[MOECOMM_VC_MAX_TENSORS];        // tensor i: [sum(rows), row_bytes[i]]
  uint64_t row_bytes[MOECOMM_VC_MAX_TENSORS];
  uint64_t region_off[MOECOMM_VC_MAX_TENSORS]; // tensor i's region in a data buffer
  uint64_t item_bytes;                         // a multiple of 16 (collectives.cu)
  int64_t rows[MOECOMM_VC_MAX_RANKS];          // rows of every rank
  int64_t num_tensors;
  VcWorkspace ws;
  ArWorkspace lamport;                         // the small-call path's Lamport buffers
};

// reduce_scatterv (collectives.cu): out = sum over ranks of their rows of this rank.
struct ReduceScattervArgs {
  const void* in;                      // [sum(rows), row] of T
  void* out;                           // [rows[rank], row] of T
  int64_t rows[MOECOMM_VC_MAX_RANKS];  // rows of every rank
  int64_t row_bytes;                   // a multiple of 16
  int64_t item_bytes;                  // a multiple of 16 (collectives.cu)
  VcWorkspace ws;
  ArWorkspace lamport;                 // the small-call path's Lamport buffers
};

// Sum of `slots` stacked arrays of T in slot order (fp32, one rounding): the NCCL path of
// reduce_scatterv.
struct StackReduceArgs {
  const void* in;   // [slots, nvec * 16 bytes]
  void* out;        // [nvec * 16 bytes]
  int64_t nvec;
  int64_t slots;
};

// ------------------------------------------------------------------ prepare / finalize
// ids[i] = expert_map[ids[i]] for ids in [0, num_experts); others unchanged (prepare.cu).
struct MapIdsArgs {
  int32_t* ids;
  const int32_t* expert_map;  // [num_experts]
  int64_t n;
  int64_t num_experts;
};

// x[t, :] *= T(w[t]) in place (apply_router_weight_on_input, prepare.cu).
struct ScaleRowsArgs {
  void* x;           // [tokens, cols] of T
  const float* w;    // [tokens]
  int64_t tokens;
  int64_t cols;
};

// The all-to-all-v plan applied locally to all-gathered tokens (the path across nodes,
// prepare.cu): rows of every source routed to `rank`, laid out as MoeAlltoAll's receive
// tensors [ep, runtime_max, ...].
struct A2aPlanArgs {
  const int32_t* ids;                  // gathered [sum(rows), top_k]
  int32_t* inv;                        // [sum(rows)] out: received row of each, or -1
  int32_t* src_row;                    // [ep * runtime_max] out: gathered row, -1 = padding
  int64_t rows[MOECOMM_A2A_PLAN_MAX_RANKS];  // tokens of every rank
  int64_t top_k;
  int64_t num_experts;
  int64_t experts_per_rank;
  int64_t rank;
  int64_t runtime_max;
};

struct A2aTakeRowsArgs {
  uint64_t src[MOECOMM_A2A_MAX_PAYLOADS];        // gathered payload p [sum(rows), row_bytes]
  uint64_t dst[MOECOMM_A2A_MAX_PAYLOADS];        // received payload p [ep * runtime_max, row_bytes]
  uint64_t row_bytes[MOECOMM_A2A_MAX_PAYLOADS];  // multiples of 4
  const int32_t* src_row;                        // [n_rows] from the plan
  int64_t n_rows;
  int64_t num_payloads;
  int64_t id_payload;                            // ids: kept in [lo, hi), else -1
  int64_t lo;
  int64_t hi;
};

// z[g] = inv[g] >= 0 ? y[inv[g]] : +0 (rows of row_bytes, a multiple of 16).
struct A2aPutRowsArgs {
  const uint8_t* y;    // [ep * runtime_max, row_bytes] expert outputs
  uint8_t* z;          // [total, row_bytes]
  const int32_t* inv;  // [total]
  int64_t total;
  int64_t row_bytes;
};

// ------------------------------------------------------------------ quantizers
// moecomm.quant (quant.cu): standalone quantizers and the NVFP4 scale interleave.
struct QuantArgs {
  const void* x;        // [rows, cols] bf16/fp16/fp32; interleave: linear sf [rows, cols/16]
  uint8_t* q;           // codes [rows, cols] (FP8) or packed e2m1 [rows, cols/2] (NVFP4)
  void* scale_out;      // fp32 per token / per group, UE8M0 int32 storage, NVFP4 sf bytes
  const float* scale;   // device scalar: FP8 dequantization scale / NVFP4 global scale
  uint64_t rows;
  uint32_t cols;        // elements per row (a multiple of 16)
  uint32_t group_size;  // per-token-group FP8: elements per scale
  uint32_t swizzled;    // NVFP4 scale layout: 1 = 128x4 swizzled, 0 = linear
  uint32_t ue8m0;       // per-token-group FP8: 1 = UE8M0 MN-major storage, 0 = fp32
};

// ------------------------------------------------------------------ small kernels
// Fill `nbytes` (a multiple of 16) at `dst` with a repeated 32-bit word.
struct FillArgs {
  uint8_t* dst;
  uint64_t nbytes;
  uint32_t word;
};

// Copy `nbytes` (a multiple of 16, both 16-byte aligned): the peer-copy benchmark.
struct CopyArgs {
  uint8_t* dst;
  const uint8_t* src;
  uint64_t nbytes;
};

// out[p * nbytes + i] = byte i at `offset` of peer p's buffer (a SymmetricBuffer test).
struct GatherArgs {
  const uint64_t* peer_ptrs;  // [num_peers] device table of buffer addresses
  uint8_t* out;
  uint64_t offset;
  uint64_t nbytes;
  int32_t num_peers;
};

}  // namespace moecomm
