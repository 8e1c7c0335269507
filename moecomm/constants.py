"""Facts shared by the runtime, the CUDA kernels and the NumPy reference.

Limits, alignments, enums and error codes live here once. Pure Python (no CuPy), so the
reference and the CPU tests import it on any machine. ``kernel_defines()`` turns every
value into an NVRTC ``-D`` option; the kernels read them as ``MOECOMM_*`` macros through
``kernels_cu/config.cuh`` and have no copy of their own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# ------------------------------------------------------------------------ alignment
VECTOR_BYTES = 16    # the kernels' vector access; rows and addresses on the fast paths
REGION_ALIGN = 256   # every workspace region starts on this boundary

# ------------------------------------------------------------------------ all-reduce
AR_MAX_RANKS = 16        # ranks of an IPC all-reduce group
AR_MAX_BLOCKS = 1024     # blocks of one all-reduce launch (flag slots per rank)
AR_LAMPORT_BUFFERS = 3   # rotating Lamport buffers
FUSION_MAX_HIDDEN = 16384  # elements of a fused row (kernel register budget)

# ------------------------------------------------------------------------ MoE all-to-all
A2A_MAX_RANKS = 32       # ep size of MoeAlltoAll / EPAllToAll
A2A_MAX_PAYLOADS = 8     # payloads of one dispatch
A2A_HEADER_BYTES = 4096  # flags and counts at the start of a MoE workspace
A2A_FP8_GROUP = 128      # elements per scale of the FP8 dispatch
A2A_DISPATCH_SUB = 128   # tokens a dispatch block gives slots at once (32 per warp)
A2A_COMBINE_UNITS = 4    # 16-byte columns a combine lane sums at once (a warp: 32x that)
A2A_COMBINE_GROUP = 2    # ranks whose columns a combine lane copies at once
A2A_COMBINE_DEPTH = 2    # such copies in flight per combine lane (shared-memory ring)
# ranks of the all-to-all-v path across nodes (moecomm.moe.prepare_finalize): its plan
# kernel takes every rank's token count by value
A2A_PLAN_MAX_RANKS = 256

BARRIER_MAX_RANKS = 32  # ranks of a device-side barrier (moecomm.barrier)
# ------------------------------------------------------------------------ v-collectives
VC_MAX_RANKS = 16        # ranks of an IPC all_gatherv / reduce_scatterv group
VC_MAX_TENSORS = 8       # tensors of one all_gatherv call
VC_MAX_BLOCKS = 512      # blocks of one v-collective launch (flag slots per rank)
VC_LAMPORT_HEADER_BYTES = 16  # arrival vector at the start of each v-collective Lamport slot

COMPACT_MAX_LOCAL_EXPERTS = 1024
COMPACT_MAX_TOP_K = 256
COMPACT_MAX_CAPACITY = 1 << 24  # rows of recv_x (int32 row indices, far from overflow)
COMPACT_PULL_UNITS = 1  # 16-byte columns an exact-combine lane sums at once (a warp: 32x)
COMPACT_COMBINE_THREADS = 256  # block size of the combine kernels (their launch bounds)

# ------------------------------------------------------------------------ decode CP all-to-all
DCP_MAX_RANKS = AR_MAX_RANKS  # the exchange reuses the all-reduce's Lamport workspace protocol
DCP_SENTINEL_WORD = 0x80000000  # "not yet written" word of its Lamport buffers (fp32 -0.0)


class ErrorCode(enum.IntEnum):
    """Which op recorded a timeout in a device error word (``moecomm.errors``)."""

    ALLREDUCE_ONESHOT = 1
    ALLREDUCE_TWOSHOT = 2
    MIXED = 3
    ALLREDUCE_REGISTERED = 4
    A2A_DISPATCH = 16
    A2A_COMBINE = 17
    COMPACT_COMBINE = 18
    DCP_ALLTOALL = 32
    BARRIER = 48
    ALL_GATHERV = 34
    REDUCE_SCATTERV = 35

    @property
    def op(self) -> str:
        return _ERROR_OPS[self]


_ERROR_OPS = {
    ErrorCode.ALLREDUCE_ONESHOT: "all_reduce (one-shot)",
    ErrorCode.ALLREDUCE_TWOSHOT: "all_reduce (two-shot)",
    ErrorCode.MIXED: "run_mixed_comm",
    ErrorCode.ALLREDUCE_REGISTERED: "CustomAllReduce.all_reduce (registered buffers)",
    ErrorCode.A2A_DISPATCH: "MoeAlltoAll.dispatch",
    ErrorCode.A2A_COMBINE: "MoeAlltoAll.combine",
    ErrorCode.COMPACT_COMBINE: "EPAllToAll.combine",
    ErrorCode.DCP_ALLTOALL: "DcpAlltoAll.alltoall",
    ErrorCode.BARRIER: "barrier",
    ErrorCode.ALL_GATHERV: "all_gatherv",
    ErrorCode.REDUCE_SCATTERV: "reduce_scatterv",
}


class MixedCommOp(enum.IntEnum):
    """A mixed TP/DP collective (``moecomm.mixed``); FlashInfer's values.

    With ``x`` of shape ``[rows, ...]`` on the rank at (tp, dp): ALLREDUCE sums over the TP
    group; ALLGATHER concatenates the DP group's inputs (``[dp * rows, ...]``);
    REDUCESCATTER gives block ``dp`` of the DP group's sum (``rows / dp_size``);
    ALLREDUCE_ALLGATHER is ALLREDUCE then ALLGATHER (attention DP -> MoE);
    REDUCESCATTER_ALLREDUCE is REDUCESCATTER then ALLREDUCE (MoE -> attention DP).
    """

    ALLREDUCE = 0
    ALLGATHER = 1
    REDUCESCATTER = 2
    ALLREDUCE_ALLGATHER = 3
    REDUCESCATTER_ALLREDUCE = 4


class CompactStat(enum.IntEnum):
    """Words of EPAllToAll's int32 stats array on the device (moe_compact.cu)."""

    ROWS = 0          # rows stored by the last dispatch
    NEEDED = 1        # rows the last dispatch produced
    DROPPED = 2       # rows it dropped (needed - capacity, or 0)
    MAX_NEEDED = 3    # sticky max of NEEDED until the host resets it
    MAX_DROPPED = 4   # sticky max of DROPPED


class Quant(enum.IntEnum):
    """The quantizing epilogue of a fused all-reduce (a compile-time kernel choice)."""

    NONE = 0
    FP8 = 1          # static per-tensor e4m3: q = sat(v * (1 / scale_factor))
    NVFP4 = 2        # e2m1 in 16-element blocks, e4m3 block scales
    GROUP_FP8 = 3    # per-token-group e4m3, UE8M0 scales
    DYNAMIC_FP8 = 4  # per-token e4m3, fp32 scale per token


class Source(enum.IntEnum):
    """What each rank contributes to a fused all-reduce."""

    INPUT = 0          # the input rows
    MOE_REDUCTION = 1  # sum_e experts[e] * scale[e] + token_input
    MOE_FINALIZE = 2   # un-permuted top-k expert rows, scaled, + shared expert output


class StatsFormat(enum.IntEnum):
    """What ``softmax_stats[..., :S]`` of one partial attention output hold, for the DCP
    LSE combine (``moecomm.dcp.lse_combine``). Partial outputs are normalised by their own
    softmax denominator (what attention kernels return with their LSE).

    LSE: ``stats[..., 0]`` = natural log of the partial's sum of ``exp(score)``; the other
        entries are ignored (vLLM's and FlashInfer's ``basee``).
    LSE_BASE2: the same in base 2 (``log2 sum 2**score``: FlashInfer MLA's ``base2``).
    MAX_SUMEXP: ``stats[..., 0]`` = the partial's max score ``m``, ``stats[..., 1]`` =
        ``sum exp(score - m)``; its LSE is ``m + log(sum)``.

    A partial whose LSE is not finite (-inf: an empty KV shard; +inf, NaN; or a sum <= 0)
    has weight 0.
    """

    LSE = 0
    LSE_BASE2 = 1
    MAX_SUMEXP = 2


class AllReduceFusionPattern(enum.IntEnum):
    """Fused all-reduce patterns, with FlashInfer 0.7.2's values: an integer taken from
    code written for FlashInfer picks the same pattern."""

    kAllReduce = 0
    kARResidualRMSNorm = 1
    kARResidualRMSNormFP8Quant = 2
    kARResidualRMSNormFP4Quant = 3
    kARResidualRMSNormOutFP8Quant = 4
    kARResidualRMSNormOutFP4Quant = 5
    kMoEReductionARResidualRMSNorm = 6
    kMoEFinalizeARResidualRMSNorm = 7
    kARResidualRMSNormPerTokenGroupFP8PackedQuant = 8
    kARResidualRMSNormOutPerTokenGroupFP8PackedQuant = 9
    kARResidualRMSNormDynamicFP8Quant = 10
    kARResidualRMSNormOutDynamicFP8Quant = 11

    @property
    def spec(self) -> "PatternSpec":
        return PATTERNS[self]


class QuantizationSFLayout(enum.IntEnum):
    """NVFP4 scale-factor layout (FlashInfer's values)."""

    SWIZZLED_128x4 = 0
    LINEAR = 2


@dataclass(frozen=True)
class PatternSpec:
    """What a fused pattern computes.

    norm: residual add + RMSNorm. quant: the quantizer of the norm output.
    norm_out: the pattern writes ``norm_out`` too. source: the contribution the pattern
    implies (``Source.INPUT`` for the plain patterns, which the MoE entry points may
    replace; the MoE patterns name theirs).
    """

    norm: bool
    quant: Quant = Quant.NONE
    norm_out: bool = False
    source: Source = Source.INPUT

    @property
    def outputs(self) -> tuple[str, ...]:
        """Outputs the caller must pass (``allreduce_out`` is optional for the others)."""
        if not self.norm:
            return ("allreduce_out",)
        outs = ["residual_out"]
        if self.norm_out:
            outs.append("norm_out")
        if self.quant != Quant.NONE:
            outs.append("quant_out")
            if self.quant != Quant.FP8:
                outs.append("scale_out")
        return tuple(outs)


_P = AllReduceFusionPattern
PATTERNS: dict[AllReduceFusionPattern, PatternSpec] = {
    _P.kAllReduce: PatternSpec(norm=False),
    _P.kARResidualRMSNorm: PatternSpec(norm=True, norm_out=True),
    _P.kARResidualRMSNormFP8Quant: PatternSpec(norm=True, quant=Quant.FP8),
    _P.kARResidualRMSNormFP4Quant: PatternSpec(norm=True, quant=Quant.NVFP4),
    _P.kARResidualRMSNormOutFP8Quant: PatternSpec(norm=True, quant=Quant.FP8, norm_out=True),
    _P.kARResidualRMSNormOutFP4Quant: PatternSpec(norm=True, quant=Quant.NVFP4, norm_out=True),
    _P.kMoEReductionARResidualRMSNorm: PatternSpec(norm=True, norm_out=True,
                                                   source=Source.MOE_REDUCTION),
    _P.kMoEFinalizeARResidualRMSNorm: PatternSpec(norm=True, norm_out=True,
                                                  source=Source.MOE_FINALIZE),
    _P.kARResidualRMSNormPerTokenGroupFP8PackedQuant: PatternSpec(norm=True,
                                                                  quant=Quant.GROUP_FP8),
    _P.kARResidualRMSNormOutPerTokenGroupFP8PackedQuant: PatternSpec(
        norm=True, quant=Quant.GROUP_FP8, norm_out=True),
    _P.kARResidualRMSNormDynamicFP8Quant: PatternSpec(norm=True, quant=Quant.DYNAMIC_FP8),
    _P.kARResidualRMSNormOutDynamicFP8Quant: PatternSpec(norm=True, quant=Quant.DYNAMIC_FP8,
                                                         norm_out=True),
}
del _P

# Group sizes of the per-token-group FP8 patterns.
GROUP_FP8_SIZES = (8, 16, 32, 64, 128, 256)
# Smallest scales: dynamic FP8 max(amax / 448, this); group FP8 max(amax / 448, this).
DYNAMIC_FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)
GROUP_FP8_MIN_SCALE = 1e-10
FP8_E4M3_MAX = 448.0
NVFP4_BLOCK = 16


def _enum_defines(prefix: str, members: type[enum.IntEnum]) -> dict[str, int]:
    return {f"MOECOMM_{prefix}_{m.name.upper()}": int(m) for m in members}


def kernel_defines() -> dict[str, int]:
    """Every constant the kernels use, as NVRTC ``-D`` name -> int."""
    values = {
        "MOECOMM_VECTOR_BYTES": VECTOR_BYTES,
        "MOECOMM_AR_MAX_RANKS": AR_MAX_RANKS,
        "MOECOMM_AR_MAX_BLOCKS": AR_MAX_BLOCKS,
        "MOECOMM_AR_LAMPORT_BUFFERS": AR_LAMPORT_BUFFERS,
        "MOECOMM_FUSION_MAX_HIDDEN": FUSION_MAX_HIDDEN,
        "MOECOMM_A2A_MAX_RANKS": A2A_MAX_RANKS,
        "MOECOMM_A2A_MAX_PAYLOADS": A2A_MAX_PAYLOADS,
        "MOECOMM_A2A_HEADER_BYTES": A2A_HEADER_BYTES,
        "MOECOMM_A2A_FP8_GROUP": A2A_FP8_GROUP,
        "MOECOMM_A2A_DISPATCH_SUB": A2A_DISPATCH_SUB,
        "MOECOMM_A2A_COMBINE_UNITS": A2A_COMBINE_UNITS,
        "MOECOMM_A2A_COMBINE_GROUP": A2A_COMBINE_GROUP,
        "MOECOMM_A2A_COMBINE_DEPTH": A2A_COMBINE_DEPTH,
        "MOECOMM_A2A_PLAN_MAX_RANKS": A2A_PLAN_MAX_RANKS,
        "MOECOMM_BARRIER_MAX_RANKS": BARRIER_MAX_RANKS,
        "MOECOMM_VC_MAX_RANKS": VC_MAX_RANKS,
        "MOECOMM_VC_MAX_TENSORS": VC_MAX_TENSORS,
        "MOECOMM_VC_MAX_BLOCKS": VC_MAX_BLOCKS,
        "MOECOMM_VC_LAMPORT_HEADER_BYTES": VC_LAMPORT_HEADER_BYTES,
        "MOECOMM_COMPACT_MAX_LOCAL_EXPERTS": COMPACT_MAX_LOCAL_EXPERTS,
        "MOECOMM_COMPACT_MAX_TOP_K": COMPACT_MAX_TOP_K,
        "MOECOMM_COMPACT_PULL_UNITS": COMPACT_PULL_UNITS,
        "MOECOMM_COMPACT_COMBINE_THREADS": COMPACT_COMBINE_THREADS,
    }
    values.update(_enum_defines("ERR", ErrorCode))
    values.update(_enum_defines("QUANT", Quant))
    values.update(_enum_defines("STAT", CompactStat))
    values.update(_enum_defines("SOURCE", Source))
    values.update(_enum_defines("STATS", StatsFormat))
    return values
