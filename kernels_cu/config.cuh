// The constants shared with Python. Every value comes from moecomm/constants.py as an
// NVRTC -D option (moecomm.kernels adds them to every compile); nothing is defined twice.
#pragma once

#ifndef MOECOMM_VECTOR_BYTES
#error "kernels_cu/ is compiled through moecomm.kernels, which defines the MOECOMM_* constants"
#endif

namespace moecomm {
namespace config {

constexpr int kVectorBytes = MOECOMM_VECTOR_BYTES;

constexpr int kArMaxRanks = MOECOMM_AR_MAX_RANKS;
constexpr int kArMaxBlocks = MOECOMM_AR_MAX_BLOCKS;
constexpr int kArLamportBuffers = MOECOMM_AR_LAMPORT_BUFFERS;
constexpr int kFusionMaxHidden = MOECOMM_FUSION_MAX_HIDDEN;

constexpr int kA2aMaxRanks = MOECOMM_A2A_MAX_RANKS;
constexpr int kA2aMaxPayloads = MOECOMM_A2A_MAX_PAYLOADS;
constexpr int kA2aHeaderBytes = MOECOMM_A2A_HEADER_BYTES;
constexpr int kA2aFp8Group = MOECOMM_A2A_FP8_GROUP;
constexpr int kA2aDispatchSub = MOECOMM_A2A_DISPATCH_SUB;
constexpr int kA2aCombineUnits = MOECOMM_A2A_COMBINE_UNITS;
constexpr int kA2aCombineGroup = MOECOMM_A2A_COMBINE_GROUP;
constexpr int kA2aCombineDepth = MOECOMM_A2A_COMBINE_DEPTH;

constexpr int kBarrierMaxRanks = MOECOMM_BARRIER_MAX_RANKS;
constexpr int kVcMaxRanks = MOECOMM_VC_MAX_RANKS;
constexpr int kVcMaxTensors = MOECOMM_VC_MAX_TENSORS;
constexpr int kVcMaxBlocks = MOECOMM_VC_MAX_BLOCKS;
constexpr int kVcLamportHeaderBytes = MOECOMM_VC_LAMPORT_HEADER_BYTES;

constexpr int kCompactMaxLocalExperts = MOECOMM_COMPACT_MAX_LOCAL_EXPERTS;
constexpr int kCompactMaxTopK = MOECOMM_COMPACT_MAX_TOP_K;
constexpr int kCompactPullUnits = MOECOMM_COMPACT_PULL_UNITS;
constexpr int kCompactCombineThreads = MOECOMM_COMPACT_COMBINE_THREADS;

// Error codes of the device error word (moecomm.constants.ErrorCode).
constexpr uint32_t kErrAllreduceOneshot = MOECOMM_ERR_ALLREDUCE_ONESHOT;
constexpr uint32_t kErrAllreduceTwoshot = MOECOMM_ERR_ALLREDUCE_TWOSHOT;
constexpr uint32_t kErrMixed = MOECOMM_ERR_MIXED;
constexpr uint32_t kErrAllreduceRegistered = MOECOMM_ERR_ALLREDUCE_REGISTERED;
constexpr uint32_t kErrA2aDispatch = MOECOMM_ERR_A2A_DISPATCH;
constexpr uint32_t kErrA2aCombine = MOECOMM_ERR_A2A_COMBINE;
constexpr uint32_t kErrCompactCombine = MOECOMM_ERR_COMPACT_COMBINE;
constexpr uint32_t kErrDcpAlltoall = MOECOMM_ERR_DCP_ALLTOALL;
constexpr uint32_t kErrBarrier = MOECOMM_ERR_BARRIER;
constexpr uint32_t kErrAllGatherv = MOECOMM_ERR_ALL_GATHERV;
constexpr uint32_t kErrReduceScatterv = MOECOMM_ERR_REDUCE_SCATTERV;

}  // namespace config

// The quantizing epilogue of a fused all-reduce (moecomm.constants.Quant).
enum Quant : int {
  kQuantNone = MOECOMM_QUANT_NONE,
  kQuantFp8 = MOECOMM_QUANT_FP8,
  kQuantNvfp4 = MOECOMM_QUANT_NVFP4,
  kQuantGroupFp8 = MOECOMM_QUANT_GROUP_FP8,
  kQuantDynamicFp8 = MOECOMM_QUANT_DYNAMIC_FP8,
};

// What each rank contributes to a fused all-reduce (moecomm.constants.Source).
enum Source : int {
  kSourceInput = MOECOMM_SOURCE_INPUT,
  kSourceMoeReduction = MOECOMM_SOURCE_MOE_REDUCTION,
  kSourceMoeFinalize = MOECOMM_SOURCE_MOE_FINALIZE,
};

// What softmax_stats hold for the DCP LSE combine (moecomm.constants.StatsFormat).
enum StatsFormat : int {
  kStatsLse = MOECOMM_STATS_LSE,
  kStatsLseBase2 = MOECOMM_STATS_LSE_BASE2,
  kStatsMaxSumexp = MOECOMM_STATS_MAX_SUMEXP,
};

}  // namespace moecomm
