"""CPU: a low-rank layer's products as oneDNN matmuls on weights prepacked once.

vLLM's dense CPU layers do not call ``torch.nn.functional.linear``: at load time they hand each
weight to oneDNN, which reorders it into its own blocked layout, and every forward runs the
prepared primitive (``vllm/model_executor/layers/utils.py: dispatch_cpu_unquantized_gemm``).
With plain ``torch.mm`` on the unpacked factors a half-size low-rank model decoded slower than
the dense one (0.84x at one request, see the README's serving results). So the low-rank layers
take the same road: one prepacked primitive for the shrink ``v_cat`` and one per expand ``U_j``.

The primitives own their packed copies, so the layer's own factor tensors are released after
packing (as vLLM releases dense weights); a shared basis is packed once for its whole group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm.platforms import CpuArchEnum, current_platform

from kernels import Segment, plan_segments

# Primitive cache entries per weight (one per distinct batch shape), as vLLM's dense layers use.
PRIMITIVE_CACHE = 32


def onednn_available() -> bool:
    """Whether this vLLM build has the oneDNN matmul ops (x86 and Arm CPU builds do)."""
    return bool(getattr(ops, "_supports_onednn", False)) and current_platform.get_cpu_architecture() != CpuArchEnum.POWERPC


def prepack(weight: torch.Tensor) -> Any:
    """A oneDNN matmul handler for ``y = x weightᵀ`` (``weight [out, in]``); it keeps its own copy."""
    return ops.create_onednn_mm(weight.t(), PRIMITIVE_CACHE)


@dataclass
class OneDnnLowRank:
    """``y = expand(x v_catᵀ)`` with every factor prepacked: the CPU twin of ``kernels.lowrank_forward``.

    ``shrink`` is the handler of ``v_cat`` (shared by a basis group's layers); ``expand`` holds one
    handler per segment's ``U_j`` (None for an identity segment, whose output is its slice of ``h``).
    """

    shrink: Any
    expand: tuple[Any | None, ...]
    segments: tuple[Segment, ...]
    total_out: int

    @classmethod
    def build(cls, shrink: Any, us: list[torch.Tensor | None], ranks: list[int]) -> OneDnnLowRank:
        """Prepack every segment's ``U_j`` (None: identity), as :func:`kernels.pack_expand` takes them."""
        segments = plan_segments(us, ranks)
        return cls(shrink, tuple(None if u is None else prepack(u) for u in us), segments,
                   sum(s.out_size for s in segments))

    def shrink_x(self, x: torch.Tensor) -> torch.Tensor:
        """``h = x v_catᵀ``: ``[..., in] -> [tokens, R]``."""
        return ops.onednn_mm(self.shrink, x.reshape(-1, x.shape[-1]), None)

    def expand_h(self, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Each segment's ``h_j U_jᵀ`` (+ its bias), side by side: ``[tokens, R] -> [tokens, total_out]``.

        oneDNN writes whole rows only, so a fused layer's blocks are computed apart and
        concatenated (one copy of the output, small beside the products).
        """
        blocks = []
        for seg, handler in zip(self.segments, self.expand):
            h_j = h if len(self.expand) == 1 else h[:, seg.rank_offset : seg.rank_offset + seg.rank]
            b_j = None if bias is None else bias[seg.out_offset : seg.out_offset + seg.out_size]
            if handler is None:
                blocks.append(h_j if b_j is None else h_j + b_j)
            else:
                blocks.append(ops.onednn_mm(handler, h_j, b_j))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.expand_h(self.shrink_x(x), bias)
        return y.view(*x.shape[:-1], self.total_out)
