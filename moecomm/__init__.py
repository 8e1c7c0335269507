"""moecomm: GPU communication for MoE and tensor-parallel inference, without PyTorch.

Arrays go in through DLPack (CuPy, PyTorch, JAX) and come out as ``cupy.ndarray``.
"""

from .mapping import Mapping

__version__ = "0.1.0"

__all__ = ["ProcessGroup", "Mapping", "init", "default_group", "__version__"]


def __getattr__(name):
    # CUDA-facing parts import CuPy, and the group mpi4py (whose import initialises MPI):
    # load them on first use, so `import moecomm` (and the pure-Python Mapping, logger and
    # reference) neither needs a CUDA driver nor starts MPI in a program that never
    # makes a group.
    lazy = {
        **{n: "group" for n in ("ProcessGroup", "default_group", "init")},
        "SymmetricBuffer": "symmetric",
        "create_shared_buffer": "symmetric",
        "free_shared_buffer": "symmetric",
        "NcclCommunicator": "nccl",
        "as_array": "tensors",
        "all_reduce": "allreduce",
        "create_allreduce_workspace": "allreduce",
        "allreduce_fusion": "fusion",
        "create_allreduce_fusion_workspace": "fusion",
        "AllReduceFusionPattern": "fusion",
        "MoeAlltoAll": "moe",
        "DcpAlltoAll": "dcp",
        "lse_combine": "dcp",
        "pack_strided_memory": "strided",
        **{n: "mixed" for n in ("MixedCommOp", "MixedCommMode", "MixedCommHandler",
                                "run_mixed_comm")},
        **{n: "vllm_ar" for n in ("CustomAllReduce", "vllm_init_custom_ar",
                                  "vllm_register_buffer", "vllm_all_reduce",
                                  "vllm_get_graph_buffer_ipc_meta",
                                  "vllm_register_graph_buffers", "vllm_meta_size",
                                  "vllm_dispose")},
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module 'moecomm' has no attribute {name!r}")
