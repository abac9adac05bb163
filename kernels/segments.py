"""The packing data model of a low-rank layer ``y = (x Vᵀ) Uᵀ + b``, shared by every kernel.

A fused layer (q/k/v, gate/up) has several output *segments* that share one input. Their
shrink factors are concatenated into one ``v_cat [R, in]`` so that the shrink is a single
product ``h = x v_catᵀ``; segment ``j`` then reads ``h[:, roff_j : roff_j + r_j]`` and writes
``out[:, ooff_j : ooff_j + out_j] = h_j U_jᵀ``. An *identity* segment is a part the compressor
kept dense: its rows of ``v_cat`` are the dense weight rows and its output block is ``h_j``.

``v_cat`` may also be given as its row blocks (*shrink parts*, see :data:`ShrinkFactors`): a
fused layer whose q basis is shared with the next layer but whose k and v are its own holds
those rows in two tensors, and copying the shared one into each layer would hold it twice. The
parts' products are written side by side into ``h``, so everything after the shrink is the same.

Where each segment lies is one :class:`SegmentTable`. The kernels read it in two forms made
from that one object: an int32 tensor on the factors' device (Triton and the CPU kernel, which
must not sync with the host or parse Python) and a tuple of ints (the custom ops' schema, which
takes no Python objects). This module imports neither Triton nor vLLM.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

# Rows of the segment table's tensor form (int32 [len(META_FIELDS), num_segments]).
META_FIELDS: tuple[str, ...] = ("rank_offset", "rank", "out_offset", "out_size", "u_offset", "u_stride", "identity")

# Rows of each packed U_j are padded with zeros to a multiple of this many elements (16 bytes
# in half precision), so the Triton kernels' loads of U, the bulk of the bytes, are aligned vectors.
U_ROW_ALIGN = 8

_INT32_MAX = 2**31 - 1

ShrinkFactors = torch.Tensor | Sequence[torch.Tensor]
"""``v_cat [R, in]``, or its row blocks in order (``[r_0, in], [r_1, in], ...`` with ``sum r_i = R``)."""


def shrink_parts(v: ShrinkFactors) -> tuple[torch.Tensor, ...]:
    """``v`` as a tuple of row blocks (one block when given one tensor)."""
    return (v,) if isinstance(v, torch.Tensor) else tuple(v)


@dataclass(frozen=True)
class Segment:
    """One output block of a (possibly fused) low-rank layer.

    ``U_j [out_size, rank]`` lies in the packed expand buffer at element ``u_offset`` with row
    stride ``u_stride`` (``rank`` rounded up to the pack's row alignment, zero-padded). An
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
        """The segment's column of :meth:`SegmentTable.tensor`, in :data:`META_FIELDS` order."""
        return tuple(int(getattr(self, name)) for name in META_FIELDS)


@dataclass(frozen=True)
class SegmentTable:
    """The segments of one layer, in output order: the one description every kernel reads."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a segment table needs at least one segment")

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, j: int) -> Segment:
        return self.segments[j]

    @property
    def total_rank(self) -> int:
        """Rows of the matching ``v_cat``."""
        return sum(s.rank for s in self.segments)

    @property
    def total_out(self) -> int:
        """Output features of the layer (all segments)."""
        return sum(s.out_size for s in self.segments)

    @property
    def ints(self) -> tuple[int, ...]:
        """Segment after segment, each in :data:`META_FIELDS` order: how the custom ops take the table."""
        return tuple(v for s in self.segments for v in s.as_row())

    @staticmethod
    @functools.cache
    def from_ints(ints: tuple[int, ...]) -> SegmentTable:
        """The inverse of :attr:`ints` (cached: a layer's table is the same on every call)."""
        n = len(META_FIELDS)
        if not ints or len(ints) % n:
            raise ValueError(f"a segment table holds {n} ints per segment, got {len(ints)}")
        return SegmentTable(tuple(Segment(*ints[i : i + n - 1], bool(ints[i + n - 1])) for i in range(0, len(ints), n)))

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int32 ``[len(META_FIELDS), num_segments]``: how the Triton and CPU kernels read the table."""
        rows = list(zip(*(s.as_row() for s in self.segments)))
        return torch.tensor(rows, dtype=torch.int32, device=device)

    def kernel_aligned(self) -> bool:
        """Whether every ``U_j`` row starts and strides on :data:`U_ROW_ALIGN` (the Triton kernels' contract)."""
        return all(s.identity or (s.u_stride % U_ROW_ALIGN == 0 and s.u_offset % U_ROW_ALIGN == 0)
                   for s in self.segments)

    def check_gated(self) -> None:
        """Raise unless this is a gate/up pair: two segments with equal output sizes."""
        sizes = [s.out_size for s in self.segments]
        if len(sizes) != 2 or sizes[0] != sizes[1]:
            raise ValueError(f"a SiLU-gated layer needs two segments (gate, up) of equal size, got output sizes {sizes}")


@dataclass
class PackedExpand:
    """The expand factors of all segments of one layer, packed for a single kernel launch.

    Build it with :func:`pack_expand`. ``meta`` is the table's tensor form on ``u_flat``'s
    device; use :meth:`to` to move or cast, which rebuilds it on the new device.
    """

    u_flat: torch.Tensor = field(repr=False)
    """1-D; ``U_j`` row-major with padded rows at ``segments[j].u_offset`` (empty if all are identity)."""
    segments: SegmentTable
    meta: torch.Tensor | None = field(default=None, repr=False)
    """The table's tensor form on ``u_flat.device``. Built from ``segments`` when not given
    (given: a layer's own buffer, no host-to-device copy)."""

    def __post_init__(self) -> None:
        if self.u_flat.dim() != 1:
            raise ValueError(f"PackedExpand.u_flat must be 1-D, got shape {tuple(self.u_flat.shape)}")
        for j, seg in enumerate(self.segments):
            end = seg.u_offset + seg.out_size * seg.u_stride
            if not seg.identity and (seg.u_stride < seg.rank or end > self.u_flat.numel()):
                numel = self.u_flat.numel()
                raise ValueError(f"PackedExpand: segment {j} ({seg}) does not fit u_flat of {numel} elements")
        if self.meta is None:
            self.meta = self.segments.tensor(self.u_flat.device)
        elif self.meta.shape != (len(META_FIELDS), len(self.segments)):
            raise ValueError(f"PackedExpand.meta must be [{len(META_FIELDS)}, {len(self.segments)}] "
                             f"for {len(self.segments)} segments, got {tuple(self.meta.shape)}")

    @property
    def total_rank(self) -> int:
        return self.segments.total_rank

    @property
    def total_out(self) -> int:
        return self.segments.total_out

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
        return self.segments.kernel_aligned()

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


def pack_expand(us: Sequence[torch.Tensor | None], ranks: Sequence[int], row_align: int = U_ROW_ALIGN) -> PackedExpand:
    """Pack the expand factors of one (possibly fused) layer into one zero-padded flat buffer.

    Args:
        us: per segment, ``U_j`` of shape ``[out_j, ranks[j]]``, or None for an identity segment
            (a part kept dense; its ``v_cat`` rows are the weight rows).
        ranks: per segment, the rank ``r_j`` (its rows in ``v_cat``); for an identity segment,
            its output size.

    All factors must share dtype and device; the buffer is a copy on that device.
    ``row_align`` pads each row of ``U_j``; the Triton kernels need :data:`U_ROW_ALIGN` (packs
    with other alignments always take the torch path), the torch path wastes nothing with 1.
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


def plan_segments(us: Sequence[torch.Tensor | None], ranks: Sequence[int], row_align: int = 1) -> SegmentTable:
    """The segment table :func:`pack_expand` would build, without packing (for kernels that keep
    the factors in their own layout, like the CPU kernel's panels); same checks and errors."""
    _check_factors(us, ranks)
    return _plan_segments(us, ranks, row_align)


def _plan_segments(us: Sequence[torch.Tensor | None], ranks: Sequence[int], row_align: int) -> SegmentTable:
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
    return SegmentTable(tuple(segments))


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
    check_bias_and_kinds(x, "x", packed, bias, parts)


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    if len(shapes) == 1:
        return f"shape {shapes[0]}"
    return f"shapes {', '.join(map(str, shapes))}" if shapes else "none"


def check_bias_and_kinds(
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
