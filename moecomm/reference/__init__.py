"""NumPy reference of every moecomm op and quantization format: the spec in code.

Every GPU kernel in ``kernels_cu/`` is tested against these functions, so each function
states exactly where it rounds. Only NumPy, the standard library and moecomm's pure-Python
facts (``moecomm.constants``: limits, patterns; ``moecomm.layouts``: scale layouts) are
used; the low-precision formats are implemented here with integer/bit arithmetic
(vectorised, no per-element Python loops) and checked against ``ml_dtypes`` by the CPU
tests. The runtime never imports the reference.

Modules, split like the runtime:

* ``formats``: I/O dtypes, bf16 bits, e4m3fn, e2m1 and UE8M0 codecs.
* ``layouts``: NVFP4 nibble packing and 128x4 scale swizzle, UE8M0 packing and its
  MN-major storage (array versions of ``moecomm.layouts``).
* ``quant``: static FP8, NVFP4, per-token-group FP8, dynamic FP8 and their inverses.
* ``allreduce``: all-reduce, residual + RMSNorm, ``allreduce_fusion`` and the MoE
  reductions fused before the all-reduce (its docstring lists the rounding points).
* ``mixed``: mixed TP/DP collectives (all-reduce + all-gather, reduce-scatter +
  all-reduce).
* ``moe``: MoE all-to-all, static layout and compact expert-major layout.
* ``dcp``: decode context-parallel all-to-all of partial attention outputs and the LSE
  combine.
* ``prepare``: all_gatherv / reduce_scatterv, the MoE prepare/finalize plans and transfers
  of data-parallel serving, and a MoE layer with scaling experts.

Every public name is re-exported here: ``from moecomm import reference;
reference.quant_nvfp4(...)``.

Conventions
-----------
* I/O dtypes are bf16, fp16 and fp32. A bf16 array is a ``np.uint16`` array of bf16 bit
  patterns (an ``ml_dtypes.bfloat16`` array is accepted as input and read through a
  uint16 view); fp16 is ``np.float16``; fp32 is ``np.float32``. Outputs in bf16 are
  always ``np.uint16`` bit patterns. ``dtype`` arguments take ``"bf16"``, ``"fp16"``,
  ``"fp32"`` or a NumPy dtype (``np.uint16`` means bf16).
* All arithmetic is fp32 (IEEE, round-to-nearest-even, no FTZ, correctly rounded
  division) unless a docstring says float64. Conversions to narrower types are RNE.
* FP8 is e4m3fn (bias 7, max 448, no inf, NaN = 0x7F/0xFF), stored as uint8 codes.
  FP4 is e2m1 (grid 0, 0.5, 1, 1.5, 2, 3, 4, 6; sign bit 0x8), one code per uint8, or two
  per byte with the LOW nibble holding the even element. UE8M0 is an exponent byte ``e``
  with value ``2**(e - 127)`` (255 = NaN).
* Reductions over ranks, experts and top-k slots run in a fixed ascending order in fp32
  and round once to the output dtype at the end.
"""

from __future__ import annotations

from . import allreduce, dcp, formats, layouts, mixed, moe, prepare, quant
from .allreduce import *  # noqa: F401,F403
from .dcp import *  # noqa: F401,F403
from .formats import *  # noqa: F401,F403
from .layouts import *  # noqa: F401,F403
from .mixed import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
from .prepare import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403

__all__ = [*formats.__all__, *layouts.__all__, *quant.__all__, *allreduce.__all__,
           *mixed.__all__, *moe.__all__, *dcp.__all__, *prepare.__all__]
