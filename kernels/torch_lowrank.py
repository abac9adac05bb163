"""The torch path of a low-rank layer: one shrink product (per part of ``v_cat``), one product per segment.

It serves every device and token count the faster kernels do not take (prefill on CUDA, CPUs
without the fused kernel, dtypes other than float32 on a CPU), and it is what
:func:`lowrank_forward_reference` is checked against. Its products are written into column
blocks of one output (``out=`` views), which Dynamo cannot trace: inside a model it runs behind
the custom ops of :mod:`kernels.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .segments import PackedExpand, ShrinkFactors, check_inputs, shrink_parts


def lowrank_forward_torch(
    x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [..., in] -> [..., total_out]`` on the torch path, whatever the device."""
    check_inputs(x, v_cat, packed, bias)
    y = forward_2d(x.reshape(-1, x.shape[-1]), v_cat, packed, bias)
    return y.view(*x.shape[:-1], packed.total_out)


def forward_2d(
    x2d: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None
) -> torch.Tensor:
    """One shrink GEMM per part, then each segment's GEMM written straight into its column block of ``out``.

    BLAS takes the strided column blocks (``h`` slices, ``out`` slices, transposed ``U`` views)
    as leading dimensions, so nothing is copied (but ``h`` [tokens, R], concatenated when
    ``v_cat`` comes in parts); the Python work is per segment, never per token.
    """
    return expand_2d(shrink_2d(x2d, shrink_parts(v_cat)), packed, bias)


def shrink_2d(x2d: torch.Tensor, parts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """``h = x v_catᵀ`` from ``v_cat``'s row blocks.

    Without ``out``: plain products (concatenated for several blocks), so that it traces under
    torch.compile. With ``out`` (``[tokens, R]``, any row stride, e.g. the Triton path's padded
    ``h``): each block's product written into its columns.
    """
    if out is None:
        if len(parts) == 1:
            return torch.mm(x2d, parts[0].t())
        return torch.cat([torch.mm(x2d, v.t()) for v in parts], dim=1)
    start = 0
    for v in parts:
        torch.mm(x2d, v.t(), out=out[:, start : start + v.shape[0]])
        start += v.shape[0]
    return out


def expand_2d(h: torch.Tensor, packed: PackedExpand, bias: torch.Tensor | None) -> torch.Tensor:
    """Each segment's product ``h_j U_jᵀ`` (or copy of ``h_j``) into its column block; ``h`` is left as is."""
    if packed.num_segments == 1:  # plain layer: no output blocks to place
        (u_t,) = packed.expand_t
        if u_t is None:
            return h if bias is None else h + bias
        return torch.mm(h, u_t) if bias is None else torch.addmm(bias, h, u_t)
    out = h.new_empty(h.shape[0], packed.total_out)
    for seg, u_t in zip(packed.segments, packed.expand_t):
        h_j = h[:, seg.rank_offset : seg.rank_offset + seg.rank]
        out_j = out[:, seg.out_offset : seg.out_offset + seg.out_size]
        bias_j = None if bias is None else bias[seg.out_offset : seg.out_offset + seg.out_size]
        if u_t is None:
            out_j.copy_(h_j) if bias_j is None else torch.add(h_j, bias_j, out=out_j)
        elif bias_j is None:
            torch.mm(h_j, u_t, out=out_j)
        else:
            torch.addmm(bias_j, h_j, u_t, out=out_j)
    return out


def lowrank_forward_reference(
    x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The obviously-correct result, in float64: each segment separately, then concatenated."""
    x64, v64 = x.double(), torch.cat(shrink_parts(v_cat)).double()
    blocks = []
    for seg, u in zip(packed.segments, packed.unpack()):
        h = x64 @ v64[seg.rank_offset : seg.rank_offset + seg.rank].T
        blocks.append(h if u is None else h @ u.double().T)
    y = torch.cat(blocks, dim=-1)
    return y if bias is None else y + bias.double()
