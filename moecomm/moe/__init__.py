"""MoE expert-parallel all-to-all: ``MoeAlltoAll`` (static layout), ``EPAllToAll`` (compact
expert-major layout) and their helpers; the prepare/finalize classes of data-parallel
serving (``prepare_finalize``)."""

from .alltoall import (
    Fp8Dispatch,
    Fp8Rows,
    MoeAlltoAll,
    MoeAlltoAllConfig,
    RoutingHandle,
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_sanitize_expert_ids,
)
from .prepare_finalize import (
    FlashInferAllGatherMoEPrepareAndFinalize,
    FlashInferAllToAllMoEPrepareAndFinalize,
    FlashInferCutlassMoEPrepareAndFinalize,
    FusedMoEQuantConfig,
    PrepareResult,
    create_flashinfer_prepare_finalize,
    create_prepare_finalize,
)
from .compact import (
    CapacityError,
    EPAll2AllLayer,
    EPAllToAll,
    EPDispatchOutput,
    EPLayout,
)

__all__ = [
    "CapacityError",
    "EPAll2AllLayer",
    "EPAllToAll",
    "EPDispatchOutput",
    "EPLayout",
    "FlashInferAllGatherMoEPrepareAndFinalize",
    "FlashInferAllToAllMoEPrepareAndFinalize",
    "FlashInferCutlassMoEPrepareAndFinalize",
    "Fp8Dispatch",
    "FusedMoEQuantConfig",
    "Fp8Rows",
    "MoeAlltoAll",
    "MoeAlltoAllConfig",
    "RoutingHandle",
    "PrepareResult",
    "create_flashinfer_prepare_finalize",
    "create_prepare_finalize",
    "moe_a2a_get_workspace_size_per_rank",
    "moe_a2a_sanitize_expert_ids",
]
