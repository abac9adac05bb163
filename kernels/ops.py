"""The layer's entry points as the custom ops ``torch.ops.soco_lowrank.{forward, expand}``.

:func:`lowrank_forward` sends small CUDA batches (decode) to the Triton kernels in
:mod:`kernels.triton_lowrank` and everything else to the torch path
(:mod:`kernels.torch_lowrank`); :func:`lowrank_shrink` and :func:`lowrank_expand` are its two
halves, for row-parallel layers under tensor parallelism (the shrink product is all-reduced in
between).

Why ops, as vLLM's own Triton-backed layers do: vLLM traces a model once, with a symbolic token
count, and drops Dynamo's guards, so a Python branch on the token count would be decided once
at trace time (for the largest batch: the torch path) and the decode kernels would never run;
and Dynamo cannot trace the torch path's products written into column blocks of one output
(``out=`` views), which vLLM's whole-graph compile would reject. Inside an op the branch runs on
every call, with the real count; torch.compile sees one opaque node of known output shape, and a
CUDA graph captures whichever kernels the captured size picks.

This module imports neither Triton nor vLLM, so it works on machines without a GPU; Triton is
imported on the first CUDA call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from types import ModuleType

import torch

from .segments import PackedExpand, SegmentTable, ShrinkFactors, check_bias_and_kinds, check_inputs, shrink_parts
from .torch_lowrank import expand_2d, forward_2d, shrink_2d

logger = logging.getLogger(__name__)

# Largest token count (rows of x) sent to the Triton decode kernels on CUDA; larger batches
# (prefill) are compute-bound and go to two cuBLAS products. Chosen without a GPU; the first H200
# run (benchmarks/results/kernel_bench_nvidia-h200_*.json, docs/results.md) found neither path
# faster than dense yet, so it is still to be set from `benchmarks/kernel_bench.py` on the target
# GPU (the token count where the `triton` and `torch` columns cross) once the kernels are tuned.
TRITON_MAX_TOKENS = 64


def lowrank_forward(
    x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = (x v_catᵀ)`` expanded per segment (``+ bias``): ``x [..., in] -> [..., total_out]``.

    CUDA inputs with at most :data:`TRITON_MAX_TOKENS` tokens run the Triton decode kernels (one
    launch for all segments, or a cuBLAS shrink and one launch, see :mod:`kernels.triton_lowrank`;
    always the latter when ``v_cat`` comes in parts); everything else runs the torch path. The
    choice is made at run time, also under torch.compile (see the module docstring). CUDA-graph
    safe: no host syncs and no data-dependent shapes.
    """
    check_inputs(x, v_cat, packed, bias)
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.ops.soco_lowrank.forward(x2d, list(shrink_parts(v_cat)), packed.u_flat, packed.meta, bias,
                                       packed.segments.ints)
    return y.view(*x.shape[:-1], y.shape[-1])


def lowrank_shrink(x: torch.Tensor, v_cat: ShrinkFactors) -> torch.Tensor:
    """The shrink half alone: ``x [..., in] -> h [..., R]`` (row-parallel layers all-reduce ``h``
    before :func:`lowrank_expand`)."""
    h = shrink_2d(x.reshape(-1, x.shape[-1]), shrink_parts(v_cat))
    return h.view(*x.shape[:-1], h.shape[-1])


def lowrank_expand(h: torch.Tensor, packed: PackedExpand, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The expand half alone: ``h [..., R]`` (a shrink product, e.g. all-reduced across TP ranks)
    to ``[..., total_out]``, each segment's block written in place.

    Small CUDA batches run the Triton expand (all segments in one launch, the two-phase kernel's
    second phase); everything else the torch path. ``h`` is not modified.
    """
    if h.dim() < 1 or h.shape[-1] != packed.total_rank:
        raise ValueError(f"lowrank_expand: h has {h.shape[-1]} columns, the packed factors expect {packed.total_rank}")
    check_bias_and_kinds(h, "h", packed, bias)
    h2d = h.reshape(-1, h.shape[-1])
    y = torch.ops.soco_lowrank.expand(h2d, packed.u_flat, packed.meta, bias, packed.segments.ints)
    return y.view(*h.shape[:-1], packed.total_out)


def decode_backend(rows: torch.Tensor, packed: PackedExpand) -> ModuleType | None:
    """The Triton module for a decode-sized CUDA batch (``rows [tokens, ...]``) on aligned factors, else None."""
    if packed.kernel_aligned and rows.is_cuda and rows.shape[0] <= TRITON_MAX_TOKENS:
        return _triton_backend()
    return None


@functools.cache
def _triton_backend() -> ModuleType | None:
    """:mod:`kernels.triton_lowrank`, or None (logged once) if Triton cannot be imported here."""
    try:
        from . import triton_lowrank
    except ImportError as exc:
        logger.warning("Triton unavailable (%s): low-rank layers use the torch path on CUDA too", exc)
        return None
    return triton_lowrank


# The ops are defined the way vLLM defines its own (a Library, one implementation for every
# backend, a fake for the shapes). The packed factors travel as the tensors ``u_flat`` and
# ``meta`` plus the table's ints (an op's schema takes no Python objects).
OP_NAMESPACE = "soco_lowrank"
_LIB = torch.library.Library(OP_NAMESPACE, "DEF")
_LIB.define("forward(Tensor x, Tensor[] v_parts, Tensor u_flat, Tensor meta, Tensor? bias, int[] table) -> Tensor")
_LIB.define("expand(Tensor h, Tensor u_flat, Tensor meta, Tensor? bias, int[] table) -> Tensor")


def _unpack_op_args(u_flat: torch.Tensor, meta: torch.Tensor, table: Sequence[int]) -> PackedExpand:
    return PackedExpand(u_flat, SegmentTable.from_ints(tuple(table)), meta)


def _forward_op(x2d: torch.Tensor, v_parts: list[torch.Tensor], u_flat: torch.Tensor, meta: torch.Tensor,
                bias: torch.Tensor | None, table: Sequence[int]) -> torch.Tensor:
    """The dispatch on the real token count."""
    packed = _unpack_op_args(u_flat, meta, table)
    backend = decode_backend(x2d, packed)
    if backend is not None:
        return backend.launch(x2d, tuple(v_parts), packed, bias)
    return forward_2d(x2d, tuple(v_parts), packed, bias)


def _expand_op(h2d: torch.Tensor, u_flat: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
               table: Sequence[int]) -> torch.Tensor:
    packed = _unpack_op_args(u_flat, meta, table)
    backend = decode_backend(h2d, packed)
    y = backend.launch_expand(h2d, packed, bias) if backend is not None else expand_2d(h2d, packed, bias)
    return y.clone() if y is h2d else y  # an op's output never aliases its input (one identity segment)


def _forward_fake(x2d, v_parts, u_flat, meta, bias, table):  # noqa: ANN001, ANN202 (the op's schema types them)
    return x2d.new_empty(x2d.shape[0], SegmentTable.from_ints(tuple(table)).total_out)


def _expand_fake(h2d, u_flat, meta, bias, table):  # noqa: ANN001, ANN202
    return h2d.new_empty(h2d.shape[0], SegmentTable.from_ints(tuple(table)).total_out)


_LIB.impl("forward", _forward_op, "CompositeExplicitAutograd")
_LIB.impl("expand", _expand_op, "CompositeExplicitAutograd")
torch.library.register_fake(f"{OP_NAMESPACE}::forward", _forward_fake, lib=_LIB)
torch.library.register_fake(f"{OP_NAMESPACE}::expand", _expand_fake, lib=_LIB)
