"""Low-rank linear kernels: a torch path (CPU serving, prefill) and Triton decode kernels (CUDA).

Importing this package imports neither Triton nor vLLM; see :mod:`kernels.lowrank`.
"""

from .lowrank import (
    META_FIELDS,
    TRITON_MAX_TOKENS,
    PackedExpand,
    Segment,
    check_inputs,
    lowrank_expand,
    lowrank_forward,
    lowrank_forward_reference,
    lowrank_forward_torch,
    lowrank_shrink,
    lowrank_silu_mul,
    pack_expand,
    plan_segments,
)

__all__ = [
    "META_FIELDS",
    "TRITON_MAX_TOKENS",
    "PackedExpand",
    "Segment",
    "check_inputs",
    "lowrank_expand",
    "lowrank_forward",
    "lowrank_forward_reference",
    "lowrank_forward_torch",
    "lowrank_shrink",
    "lowrank_silu_mul",
    "pack_expand",
    "plan_segments",
]
