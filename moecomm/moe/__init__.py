"""MoE expert-parallel all-to-all: ``MoeAlltoAll`` (static layout), ``EPAllToAll`` (compact
expert-major layout) and their helpers."""

from .alltoall import (
    Fp8Dispatch,
    Fp8Rows,
    MoeAlltoAll,
    MoeAlltoAllConfig,
    RoutingHandle,
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_sanitize_expert_ids,
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
    "Fp8Dispatch",
    "Fp8Rows",
    "MoeAlltoAll",
    "MoeAlltoAllConfig",
    "RoutingHandle",
    "moe_a2a_get_workspace_size_per_rank",
    "moe_a2a_sanitize_expert_ids",
]
