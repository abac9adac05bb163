"""Low-rank linear layers ``y = (x Vᵀ) Uᵀ + b``, including vLLM's fused multi-output layers.

A fused layer (q/k/v, gate/up) has several output *segments* that share one input. Their
shrink factors are concatenated into one ``v_cat [R, in]`` so that the shrink is a single
product ``h = x v_catᵀ``; segment ``j`` then reads ``h[:, roff_j : roff_j + r_j]`` and writes
``out[:, ooff_j : ooff_j + out_j] = h_j U_jᵀ``. An *identity* segment is a part the compressor
kept dense: its rows of ``v_cat`` are the dense weight rows and its output block is ``h_j``.

``v_cat`` may also be given as its row blocks (*shrink parts*, see :data:`ShrinkFactors`): a
fused layer whose q basis is shared with the next layer but whose k and v are its own holds
those rows in two tensors, and copying the shared one into each layer would hold it twice. The
parts' products are written side by side into ``h``, so everything after the shrink is the same.

The expand factors of all segments are packed once, at load time, into a :class:`PackedExpand`:
one flat buffer plus the segment table, both as Python ints (the torch path) and as an int32
tensor on the buffer's device (the Triton kernels, which must not sync with the host).

:func:`lowrank_forward` is the entry point. It sends small CUDA batches (decode) to the Triton
kernels in :mod:`kernels.triton_lowrank` and everything else to :func:`lowrank_forward_torch`.
:func:`lowrank_expand` is the expand half alone (row-parallel layers under tensor parallelism)
and :func:`lowrank_silu_mul` a gate/up layer with its activation.

The three run as the custom ops ``torch.ops.soco_lowrank.{forward, expand}``, as vLLM's own
Triton-backed layers do. vLLM traces a model once, with a symbolic token count, and drops
Dynamo's guards, so a Python branch on the token count would be decided once at trace time (for
the largest batch: the torch path) and the decode kernels would never run; and Dynamo cannot
trace the torch path's products written into column blocks of one output (``out=`` views), which
vLLM's whole-graph compile would reject. Inside an op the branch runs on every call, with the
real count; torch.compile sees one opaque node of known output shape, and a CUDA graph captures
whichever kernels the captured size picks.

This module imports neither Triton nor vLLM, so it works on machines without a GPU; Triton is
imported on the first CUDA call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

# Largest token count (rows of x) sent to the Triton decode kernels on CUDA; larger batches
# (prefill) are compute-bound and go to two cuBLAS products. NOT MEASURED: chosen without a GPU.
# Set it from `benchmarks/kernel_bench.py` on the target GPU (the token count where the
# `triton` and `torch` columns cross).
TRITON_MAX_TOKENS = 64

# Rows of the segment table in `PackedExpand.meta` (int32 [len(META_FIELDS), num_segments]).
META_FIELDS: tuple[str, ...] = ("rank_offset", "rank", "out_offset", "out_size", "u_offset", "u_stride", "identity")

# Rows of each packed U_j are padded with zeros to a multiple of this many elements (16 bytes
# in half precision), so the kernels' loads of U, the bulk of the bytes, are aligned vectors.
U_ROW_ALIGN = 8

_INT32_MAX = 2**31 - 1

ShrinkFactors = torch.Tensor | Sequence[torch.Tensor]
"""``v_cat [R, in]``, or its row blocks in order (``[r_0, in], [r_1, in], ...`` with ``sum r_i = R``)."""


def shrink_parts(v: ShrinkFactors) -> tuple[torch.Tensor, ...]:
    """``v`` as a tuple of row blocks (one block when given one tensor)."""
    return (v,) if isinstance(v, torch.Tensor) else tuple(v)


@dataclass(frozen=True)
class Segment:
    """One output block of a (possibly fused) low-rank layer, as Python ints.

    ``U_j [out_size, rank]`` lies in :attr:`PackedExpand.u_flat` at element ``u_offset`` with
    row stride ``u_stride`` (``rank`` rounded up to :data:`U_ROW_ALIGN`, zero-padded). An
    identity segment has no ``U``: ``u_offset`` is -1 and ``u_stride`` 0.
    """

    rank_offset: int
    rank: int
    out_offset: int
    out_size: int
    u_offset: int
    u_stride: int
    identity: bool

    def as_row(self) -> tuple[int, ...]:
        """The segment's column of :attr:`PackedExpand.meta`, in :data:`META_FIELDS` order."""
        return tuple(int(getattr(self, name)) for name in META_FIELDS)


@dataclass
class PackedExpand:
    """The expand factors of all segments of one layer, packed for a single kernel launch.

    Build it with :func:`pack_expand`. ``meta`` and ``table`` are derived from ``segments`` on
    construction; use :meth:`to` to move or cast, which rebuilds them on the new device.
    """

    u_flat: torch.Tensor = field(repr=False)
    """1-D; ``U_j`` row-major with padded rows at ``segments[j].u_offset`` (empty if all are identity)."""
    segments: tuple[Segment, ...]
    meta: torch.Tensor | None = field(default=None, repr=False)
    """int32 ``[len(META_FIELDS), num_segments]`` on ``u_flat.device``: the table for Triton.
    Built from ``segments`` when not given (given: a layer's own buffer, no host-to-device copy)."""
    table: tuple[int, ...] = field(init=False, repr=False)
    """The segment table as Python ints, segment after segment (each in :data:`META_FIELDS`
    order): how the ops receive the segments (:func:`segments_from_table` reads it back)."""
    total_rank: int = field(init=False)
    """Rows of the matching ``v_cat``."""
    total_out: int = field(init=False)
    """Output features of the layer (all segments)."""

    def __post_init__(self) -> None:
        if self.u_flat.dim() != 1:
            raise ValueError(f"PackedExpand.u_flat must be 1-D, got shape {tuple(self.u_flat.shape)}")
        if not self.segments:
            raise ValueError("PackedExpand needs at least one segment")
        for j, seg in enumerate(self.segments):
            end = seg.u_offset + seg.out_size * seg.u_stride
            if not seg.identity and (seg.u_stride < seg.rank or end > self.u_flat.numel()):
                numel = self.u_flat.numel()
                raise ValueError(f"PackedExpand: segment {j} ({seg}) does not fit u_flat of {numel} elements")
        if self.meta is None:
            rows = list(zip(*(s.as_row() for s in self.segments)))
            self.meta = torch.tensor(rows, dtype=torch.int32, device=self.u_flat.device)
        elif self.meta.shape != (len(META_FIELDS), len(self.segments)):
            raise ValueError(f"PackedExpand.meta must be [{len(META_FIELDS)}, {len(self.segments)}] "
                             f"for {len(self.segments)} segments, got {tuple(self.meta.shape)}")
        self.table = tuple(v for s in self.segments for v in s.as_row())
        self.total_rank = sum(s.rank for s in self.segments)
        self.total_out = sum(s.out_size for s in self.segments)

    @property
    def expand_t(self) -> tuple[torch.Tensor | None, ...]:
        """``U_jᵀ`` as ``[rank, out_size]`` views of ``u_flat`` (None for identity): the torch path.
        Made when asked for: the ops rebuild a pack on every call, and the Triton path needs none."""
        return tuple(None if s.identity else self._u_view(s).t() for s in self.segments)

    def _u_view(self, seg: Segment) -> torch.Tensor:
        padded = self.u_flat[seg.u_offset : seg.u_offset + seg.out_size * seg.u_stride]
        return padded.view(seg.out_size, seg.u_stride)[:, : seg.rank]

    @property
    def kernel_aligned(self) -> bool:
        """Whether every ``U_j`` row starts and strides on :data:`U_ROW_ALIGN` (the Triton kernels' contract)."""
        return all(s.identity or (s.u_stride % U_ROW_ALIGN == 0 and s.u_offset % U_ROW_ALIGN == 0)
                   for s in self.segments)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def dtype(self) -> torch.dtype:
        return self.u_flat.dtype

    @property
    def device(self) -> torch.device:
        return self.u_flat.device

    def unpack(self) -> list[torch.Tensor | None]:
        """The expand factors ``U_j [out_j, r_j]`` (views; None for identity), as given to :func:`pack_expand`."""
        return [None if s.identity else self._u_view(s) for s in self.segments]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedExpand:
        """A copy on ``device`` and/or in ``dtype`` (the segment table stays int32)."""
        return PackedExpand(self.u_flat.to(device=device, dtype=dtype), self.segments)


@functools.cache
def segments_from_table(table: tuple[int, ...]) -> tuple[Segment, ...]:
    """The segments of :attr:`PackedExpand.table` (cached: a layer's table is the same every call)."""
    n = len(META_FIELDS)
    if not table or len(table) % n:
        raise ValueError(f"a segment table holds {n} ints per segment, got {len(table)}")
    return tuple(Segment(*table[i : i + n - 1], bool(table[i + n - 1])) for i in range(0, len(table), n))


def pack_expand(us: Sequence[torch.Tensor | None], ranks: Sequence[int], row_align: int = U_ROW_ALIGN) -> PackedExpand:
    """Pack the expand factors of one (possibly fused) layer into one zero-padded flat buffer.

    Args:
        us: per segment, ``U_j`` of shape ``[out_j, ranks[j]]``, or None for an identity segment
            (a part kept dense; its ``v_cat`` rows are the weight rows).
        ranks: per segment, the rank ``r_j`` (its rows in ``v_cat``); for an identity segment,
            its output size.

    All factors must share dtype and device; the buffer is a copy on that device.
    ``row_align`` pads each row of ``U_j``; the Triton kernels need :data:`U_ROW_ALIGN` (packs
    with other alignments always take the torch path), the CPU path wastes nothing with 1.
    """
    factors = _check_factors(us, ranks)
    segments = _plan_segments(us, ranks, row_align)
    if not factors:
        return PackedExpand(torch.empty(0), segments)
    last = segments[max(j for j, s in enumerate(segments) if not s.identity)]
    u_flat = factors[0].new_zeros(last.u_offset + last.out_size * last.u_stride)
    packed = PackedExpand(u_flat, segments)
    for view, u in zip(packed.unpack(), us):
        if u is not None:
            view.copy_(u.detach())
    return packed


def _check_factors(us: Sequence[torch.Tensor | None], ranks: Sequence[int]) -> list[torch.Tensor]:
    """The non-identity factors, after checking counts, types, ranks and shapes."""
    if len(us) != len(ranks):
        raise ValueError(f"pack_expand: got {len(us)} expand factors but {len(ranks)} ranks; need one rank per segment")
    if not us:
        raise ValueError("pack_expand: need at least one segment")
    for j, (u, rank) in enumerate(zip(us, ranks)):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"pack_expand: segment {j}: rank must be a positive int, got {rank!r}")
        if u is None:
            continue
        if not isinstance(u, torch.Tensor) or not u.is_floating_point():
            raise TypeError(f"pack_expand: segment {j}: U must be a floating-point tensor or None, got {u!r:.80}")
        if u.dim() != 2 or u.shape[1] != rank or u.shape[0] < 1:
            raise ValueError(
                f"pack_expand: segment {j}: U must be 2-D [out, rank] = [out, {rank}] with out >= 1, "
                f"got shape {tuple(u.shape)}"
            )
    factors = [u for u in us if u is not None]
    if len({(u.dtype, u.device) for u in factors}) > 1:
        seen = sorted({f"{u.dtype} on {u.device}" for u in factors})
        raise ValueError(f"pack_expand: all expand factors must share dtype and device, got {seen}")
    return factors


def plan_segments(us: Sequence[torch.Tensor | None], ranks: Sequence[int], row_align: int = 1) -> tuple[Segment, ...]:
    """The segment table :func:`pack_expand` would build, without packing (for paths that keep
    the factors in their own layout, like the CPU kernel's panels); same checks and errors."""
    _check_factors(us, ranks)
    return _plan_segments(us, ranks, row_align)


def _plan_segments(us: Sequence[torch.Tensor | None], ranks: Sequence[int],
                   row_align: int = U_ROW_ALIGN) -> tuple[Segment, ...]:
    """Offsets of every segment in ``v_cat``, the output and the padded ``u_flat`` (checked inputs)."""
    segments: list[Segment] = []
    rank_offset = out_offset = u_offset = 0
    for u, rank in zip(us, ranks):
        if u is None:
            segments.append(Segment(rank_offset, rank, out_offset, rank, -1, 0, True))
        else:
            u_stride = -(-rank // row_align) * row_align
            segments.append(Segment(rank_offset, rank, out_offset, u.shape[0], u_offset, u_stride, False))
            u_offset += u.shape[0] * u_stride
        rank_offset += rank
        out_offset += segments[-1].out_size
    if max(u_offset, rank_offset, out_offset) > _INT32_MAX:
        raise ValueError("pack_expand: layer too large for the kernels' int32 offsets (more than 2**31 - 1 elements)")
    return tuple(segments)


def check_inputs(x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None) -> None:
    """Raise a clear error unless ``x [..., in]``, ``v_cat [R, in]`` (or its parts), ``packed`` and
    ``bias`` fit together.

    Only shape, dtype and device metadata are read (no host sync), so this is safe on the hot path.
    """
    parts = shrink_parts(v_cat)
    shapes = [tuple(v.shape) for v in parts]
    if not parts or any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes) \
            or sum(s[0] for s in shapes) != packed.total_rank:
        raise ValueError(
            f"v_cat must be [total rank, in] = [{packed.total_rank}, in] for this PackedExpand (or row blocks "
            f"that stack to it), got {_shapes_text(shapes)}"
        )
    in_features = shapes[0][1]
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., in] with in = {in_features} (v_cat's columns), got {tuple(x.shape)}")
    _check_bias_and_kinds(x, "x", packed, bias, parts)


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    if len(shapes) == 1:
        return f"shape {shapes[0]}"
    return f"shapes {', '.join(map(str, shapes))}" if shapes else "none"


def _check_bias_and_kinds(
    x: torch.Tensor, x_name: str, packed: PackedExpand, bias: torch.Tensor | None,
    parts: tuple[torch.Tensor, ...] = (),
) -> None:
    """``bias`` is ``[total_out]``; every operand has ``x``'s dtype and device (``packed.meta`` its device)."""
    if bias is not None and bias.shape != (packed.total_out,):
        raise ValueError(f"bias must be [{packed.total_out}] (all segments' outputs), got shape {tuple(bias.shape)}")
    dtype, device = x.dtype, x.device
    operands = (*parts, bias, packed.u_flat if packed.u_flat.numel() else None)
    mismatch = any(t is not None and (t.dtype != dtype or t.device != device) for t in operands)
    if mismatch or packed.meta.device != device:
        v_names = ["v_cat"] if len(parts) == 1 else [f"v_cat part {i}" for i in range(len(parts))]
        names = (x_name, *v_names, "bias", "packed.u_flat", "packed.meta")
        desc = ", ".join(f"{name}: {t.dtype} on {t.device}" for name, t in zip(names, (x, *operands, packed.meta))
                         if t is not None)
        raise ValueError(f"low-rank layers need one dtype and device for all operands (packed.meta: the device), got {desc}")


def lowrank_forward(
    x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = (x v_catᵀ)`` expanded per segment (``+ bias``): ``x [..., in] -> [..., total_out]``.

    CUDA inputs with at most :data:`TRITON_MAX_TOKENS` tokens run the Triton decode kernels (one
    launch for all segments, or a cuBLAS shrink and one launch, see :mod:`kernels.triton_lowrank`;
    always the latter when ``v_cat`` comes in parts);
    everything else runs :func:`lowrank_forward_torch`. The choice is made at run time, also
    under torch.compile (see the module docstring). CUDA-graph safe: no host syncs and no
    data-dependent shapes.
    """
    check_inputs(x, v_cat, packed, bias)
    return _forward(x, v_cat, packed, bias, gated=False)


def lowrank_silu_mul(
    x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up low-rank layer: ``x [..., in] -> [..., intermediate]``.

    ``packed`` must have two segments of equal size (gate, then up), as vLLM's
    ``MergedColumnParallelLinear`` lays them out. Small CUDA batches fuse the activation into
    the expand kernel (the gate/up output never reaches memory); otherwise the activation
    follows :func:`lowrank_forward`.
    """
    check_inputs(x, v_cat, packed, bias)
    check_gated(packed)
    return _forward(x, v_cat, packed, bias, gated=True)


def _forward(x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None,
             gated: bool) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    parts = list(shrink_parts(v_cat))
    y = torch.ops.soco_lowrank.forward(x2d, parts, packed.u_flat, packed.meta, bias, packed.table, gated)
    return y.view(*x.shape[:-1], y.shape[-1])


def _forward_2d(x2d: torch.Tensor, v_cat: tuple[torch.Tensor, ...], packed: PackedExpand, bias: torch.Tensor | None,
                gated: bool) -> torch.Tensor:
    """The dispatch on the real token count (the body of ``torch.ops.soco_lowrank.forward``)."""
    backend = _decode_backend(x2d, packed)
    if backend is not None:
        return backend.launch(x2d, v_cat, packed, bias, gated=gated)
    y = _torch_forward_2d(x2d, v_cat, packed, bias)
    if not gated:
        return y
    gate, up = y.split(packed.segments[0].out_size, dim=-1)
    return torch.nn.functional.silu(gate).mul_(up)


def _decode_backend(rows: torch.Tensor, packed: PackedExpand) -> ModuleType | None:
    """The Triton module for a decode-sized CUDA batch (``rows [tokens, ...]``) on aligned factors, else None."""
    if packed.kernel_aligned and rows.is_cuda and rows.shape[0] <= TRITON_MAX_TOKENS:
        return _triton_backend()
    return None


def check_gated(packed: PackedExpand) -> None:
    """Raise unless ``packed`` is a gate/up pair: two segments with equal output sizes."""
    sizes = [s.out_size for s in packed.segments]
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise ValueError(f"a SiLU-gated layer needs two segments (gate, up) of equal size, got output sizes {sizes}")


def lowrank_forward_torch(
    x: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The torch path of :func:`lowrank_forward` (any device): one shrink product (per part of
    ``v_cat``), one product per segment."""
    check_inputs(x, v_cat, packed, bias)
    y = _torch_forward_2d(x.reshape(-1, x.shape[-1]), v_cat, packed, bias)
    return y.view(*x.shape[:-1], packed.total_out)


def _torch_forward_2d(
    x2d: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None
) -> torch.Tensor:
    """One shrink GEMM per part, then each segment's GEMM written straight into its column block of ``out``.

    BLAS takes the strided column blocks (``h`` slices, ``out`` slices, transposed ``U`` views)
    as leading dimensions, so nothing is copied (but ``h`` [tokens, R], concatenated when
    ``v_cat`` comes in parts); the Python work is per segment, never per token.
    """
    return _expand_2d(shrink_2d(x2d, shrink_parts(v_cat)), packed, bias)


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
    _check_bias_and_kinds(h, "h", packed, bias)
    h2d = h.reshape(-1, h.shape[-1])
    y = torch.ops.soco_lowrank.expand(h2d, packed.u_flat, packed.meta, bias, packed.table)
    return y.view(*h.shape[:-1], packed.total_out)


def _expand_dispatch_2d(h2d: torch.Tensor, packed: PackedExpand, bias: torch.Tensor | None) -> torch.Tensor:
    backend = _decode_backend(h2d, packed)
    return backend.launch_expand(h2d, packed, bias) if backend is not None else _expand_2d(h2d, packed, bias)


def _expand_2d(h: torch.Tensor, packed: PackedExpand, bias: torch.Tensor | None) -> torch.Tensor:
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


@functools.cache
def _triton_backend() -> ModuleType | None:
    """:mod:`kernels.triton_lowrank`, or None (logged once) if Triton cannot be imported here."""
    try:
        from . import triton_lowrank
    except ImportError as exc:
        logger.warning("Triton unavailable (%s): low-rank layers use the torch path on CUDA too", exc)
        return None
    return triton_lowrank


# The entry points as custom ops (see the module docstring), defined the way vLLM defines its
# own (a Library, one implementation for every backend, a fake for the shapes). The packed
# factors travel as the tensors ``u_flat`` and ``meta`` plus the Python-int table.
OP_NAMESPACE = "soco_lowrank"
_LIB = torch.library.Library(OP_NAMESPACE, "DEF")
_LIB.define("forward(Tensor x, Tensor[] v_parts, Tensor u_flat, Tensor meta, Tensor? bias, int[] table, bool gated) -> Tensor")
_LIB.define("expand(Tensor h, Tensor u_flat, Tensor meta, Tensor? bias, int[] table) -> Tensor")


def _unpack_op_args(u_flat: torch.Tensor, meta: torch.Tensor, table: Sequence[int]) -> PackedExpand:
    return PackedExpand(u_flat, segments_from_table(tuple(table)), meta)


def _forward_op(x2d: torch.Tensor, v_parts: list[torch.Tensor], u_flat: torch.Tensor, meta: torch.Tensor,
                bias: torch.Tensor | None, table: Sequence[int], gated: bool) -> torch.Tensor:
    return _forward_2d(x2d, tuple(v_parts), _unpack_op_args(u_flat, meta, table), bias, gated)


def _expand_op(h2d: torch.Tensor, u_flat: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
               table: Sequence[int]) -> torch.Tensor:
    y = _expand_dispatch_2d(h2d, _unpack_op_args(u_flat, meta, table), bias)
    return y.clone() if y is h2d else y  # an op's output never aliases its input (one identity segment)


def _forward_fake(x2d, v_parts, u_flat, meta, bias, table, gated):  # noqa: ANN001, ANN202 (the op's schema types them)
    segments = segments_from_table(tuple(table))
    return x2d.new_empty(x2d.shape[0], segments[0].out_size if gated else sum(s.out_size for s in segments))


def _expand_fake(h2d, u_flat, meta, bias, table):  # noqa: ANN001, ANN202
    return h2d.new_empty(h2d.shape[0], sum(s.out_size for s in segments_from_table(tuple(table))))


_LIB.impl("forward", _forward_op, "CompositeExplicitAutograd")
_LIB.impl("expand", _expand_op, "CompositeExplicitAutograd")
torch.library.register_fake(f"{OP_NAMESPACE}::forward", _forward_fake, lib=_LIB)
torch.library.register_fake(f"{OP_NAMESPACE}::expand", _expand_fake, lib=_LIB)
