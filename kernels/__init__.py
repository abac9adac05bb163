"""Low-rank linear kernels: a torch path, a fused CPU kernel and Triton decode kernels (CUDA).

Reading order: :mod:`kernels.segments` (the packing data model), :mod:`kernels.torch_lowrank`
(the torch path), :mod:`kernels.ops` (the custom ops and their per-call dispatch),
:mod:`kernels.triton_lowrank` and :mod:`kernels.cpu_lowrank` (the kernels), :mod:`kernels.backends`
(one object per way of running a layer, what the vLLM layers pick). Importing this package
imports neither Triton nor vLLM.
"""

from .ops import TRITON_MAX_TOKENS, lowrank_expand, lowrank_forward, lowrank_shrink
from .segments import META_FIELDS, PackedExpand, Segment, SegmentTable, check_inputs, pack_expand, plan_segments
from .torch_lowrank import lowrank_forward_reference, lowrank_forward_torch

__all__ = [
    "META_FIELDS",
    "TRITON_MAX_TOKENS",
    "PackedExpand",
    "Segment",
    "SegmentTable",
    "check_inputs",
    "lowrank_expand",
    "lowrank_forward",
    "lowrank_forward_reference",
    "lowrank_forward_torch",
    "lowrank_shrink",
    "pack_expand",
    "plan_segments",
]
