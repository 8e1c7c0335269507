"""MoE expert-parallel all-to-all: ``MoeAlltoAll`` (static layout) and its helpers."""

from .alltoall import (
    MoeAlltoAll,
    moe_a2a_get_workspace_size_per_rank,
    moe_a2a_sanitize_expert_ids,
)

__all__ = ["MoeAlltoAll", "moe_a2a_get_workspace_size_per_rank", "moe_a2a_sanitize_expert_ids"]
