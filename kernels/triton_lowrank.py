"""Triton kernels for low-rank linear layers at decode batch sizes (CUDA; the interpreter in tests).

Decode is memory-bound: the time is the bytes of ``V`` and ``U`` streamed from HBM plus launch
latency. The low-rank path has an intermediate ``h = x Vᵀ [tokens, R]`` that every output tile
needs in full, so there are two sensible ways to run it, both implemented by one kernel body:

* ``"fused"`` (one launch, ``h`` never leaves the SM): each program recomputes the part of ``h``
  its segment needs, rank chunk by rank chunk, and immediately contracts it with its tile of
  ``U``. The price is that every output tile re-reads its segment's ``V`` (from L2 after the first
  tile). That is cheap when ``V`` is small (the default SmolLM2 layers: a few hundred KB), where the
  saved launch and the saved ``h`` round trip dominate.
* ``"two_phase"`` (split at the rank): cuBLAS computes ``h`` for all segments in one product (a
  few KB, it stays in L2), then ONE launch of the same kernel expands every segment from ``h``.
  Each weight byte is read once, so this wins when re-reading ``V`` per tile would cost more than a
  launch (7B-sized layers: ``V`` is megabytes and there are hundreds of output tiles). The
  second phase alone (:func:`launch_expand`) also serves row-parallel layers under tensor
  parallelism, where ``h`` arrives all-reduced.

:func:`choose_mode` picks by the bytes of ``V`` the fused form would re-read, against
:data:`FUSED_REREAD_BUDGET_BYTES`. A layer whose ``V`` comes in parts (a basis shared with other
layers beside the layer's own rows) always runs two-phase: the fused kernel reads one ``V``.
A single grid-synchronised launch (phase 1, grid barrier, phase 2) would avoid both costs but
deadlocks unless every program is resident at once (MPS, MIG, concurrent kernels) and cannot run
under the interpreter, so it is deliberately not used.

Both modes handle any number of segments in one launch: the grid runs over the output tiles of all
segments, and each program finds its segment from the int32 table ``PackedExpand.meta`` on the
device. Any rank and size is allowed (masked tails); fp16/bf16/fp32 inputs accumulate in fp32.
``h`` is rounded to the input dtype before the expand, as the torch path does.

Kernel code uses only Triton builtins, not the ``@triton.jit`` helpers of ``triton.language.standard``
(``tl.zeros``, ``tl.cdiv``, ``tl.sigmoid``, ...): those are compiled-or-interpreted at ``import
triton`` time, which breaks the interpreted copy of this module the tests load in-process (error:
"Cannot call @triton.jit'd outside of the scope of a kernel").

The host code reads only shapes and Python ints: no syncs, no data-dependent shapes, so it can be
captured in a CUDA graph. No autotuning (it would benchmark during graph capture): the block sizes
in :func:`default_config` are reasoned, not tuned, and must be tuned on a GPU with
``benchmarks/kernel_bench.py``: on their first GPU run (an H200,
``benchmarks/results/kernel_bench_nvidia-h200_*.json``) both modes were slower than the dense
product, the fused one far slower at 7B shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from .segments import META_FIELDS, U_ROW_ALIGN, PackedExpand, ShrinkFactors, check_inputs, shrink_parts
from .torch_lowrank import shrink_2d

Mode = Literal["auto", "fused", "two_phase"]

# The fused form is used while the extra bytes of V it re-reads (all from L2 after the first
# tile) stay under this; above it the cuBLAS shrink + one expand launch is taken. NOT MEASURED:
# ~2-3 us of H100 L2 bandwidth, the order of one saved launch. Tune with kernel_bench.py (the
# `triton_fused` and `triton_two_phase` columns).
FUSED_REREAD_BUDGET_BYTES = 8 * 1024 * 1024

# Kernels defined while TRITON_INTERPRET=1 run on the CPU interpreter, where bf16 tl.dot is
# broken (triton-lang/triton#11584); there the dot operands are upcast to fp32.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Rows of PackedExpand.meta, as compile-time constants for the kernels.
_RANK_OFFSET = tl.constexpr(META_FIELDS.index("rank_offset"))
_RANK = tl.constexpr(META_FIELDS.index("rank"))
_OUT_OFFSET = tl.constexpr(META_FIELDS.index("out_offset"))
_OUT_SIZE = tl.constexpr(META_FIELDS.index("out_size"))
_U_OFFSET = tl.constexpr(META_FIELDS.index("u_offset"))
_U_STRIDE = tl.constexpr(META_FIELDS.index("u_stride"))
_U_ALIGN = tl.constexpr(U_ROW_ALIGN)
_IDENTITY = tl.constexpr(META_FIELDS.index("identity"))


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch. ``block_m``, ``block_n`` and ``block_r`` must be >= 16 (``tl.dot``)."""

    block_m: int = 16
    block_n: int = 64
    block_r: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_r", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value}")


def default_config(num_tokens: int, mode: Literal["fused", "two_phase"]) -> KernelConfig:
    """Reasoned (NOT MEASURED) tiles for ``num_tokens`` rows.

    ``block_m`` covers all tokens up to 64 so each weight tile is read by one program only.
    The two-phase expand uses narrower output tiles (more programs to keep HBM busy: a 4096-wide
    output gives 128 of them); the fused form uses wider ones, because each tile re-reads ``V``.
    """
    block_m = min(64, max(16, triton.next_power_of_2(num_tokens)))
    if mode == "fused":
        return KernelConfig(block_m=block_m, block_n=64, block_r=64, block_k=64)
    return KernelConfig(block_m=block_m, block_n=32, block_r=64, block_k=64)


def fused_reread_bytes(
    num_tokens: int, in_features: int, packed: PackedExpand, element_size: int, config: KernelConfig
) -> int:
    """Bytes of ``V`` the fused form reads beyond one pass (every program after a segment's first re-reads it)."""
    m_blocks = triton.cdiv(num_tokens, config.block_m)
    extra_rows = sum(
        (triton.cdiv(s.out_size, config.block_n) * m_blocks - 1) * s.rank for s in packed.segments if not s.identity
    )
    return extra_rows * in_features * element_size


def choose_mode(
    num_tokens: int, in_features: int, packed: PackedExpand, element_size: int
) -> Literal["fused", "two_phase"]:
    """``"fused"`` while its re-read of ``V`` fits :data:`FUSED_REREAD_BUDGET_BYTES`, else ``"two_phase"``."""
    reread = fused_reread_bytes(num_tokens, in_features, packed, element_size, default_config(num_tokens, "fused"))
    return "fused" if reread <= FUSED_REREAD_BUDGET_BYTES else "two_phase"


def lowrank_forward_triton(
    x2d: torch.Tensor,
    v_cat: ShrinkFactors,
    packed: PackedExpand,
    bias: torch.Tensor | None = None,
    *,
    mode: Mode = "auto",
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[tokens, in] -> [tokens, total_out]``, all segments in one launch (after the cuBLAS shrink in ``"two_phase"``).

    ``mode`` and ``config`` override :func:`choose_mode` and :func:`default_config` (benchmarks,
    tests); ``out`` is an optional preallocated result (row stride free, columns contiguous).
    """
    _check_2d(x2d, v_cat, packed, bias)
    return launch(x2d, v_cat, packed, bias, gated=False, mode=mode, config=config, out=out)


def lowrank_silu_mul_triton(
    x2d: torch.Tensor,
    v_cat: ShrinkFactors,
    packed: PackedExpand,
    bias: torch.Tensor | None = None,
    *,
    mode: Mode = "auto",
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(gate) * up`` of a gate/up pair, ``[tokens, in] -> [tokens, out_gate]``; each program computes both tiles.

    Arguments as for :func:`lowrank_forward_triton`.
    """
    _check_2d(x2d, v_cat, packed, bias)
    packed.segments.check_gated()
    return launch(x2d, v_cat, packed, bias, gated=True, mode=mode, config=config, out=out)


def _check_2d(x2d: torch.Tensor, v_cat: ShrinkFactors, packed: PackedExpand, bias: torch.Tensor | None) -> None:
    check_inputs(x2d, v_cat, packed, bias)
    if x2d.dim() != 2:
        raise ValueError(f"the Triton path takes 2-D x [tokens, in], got shape {tuple(x2d.shape)}")


def launch(
    x2d: torch.Tensor,
    v_cat: ShrinkFactors,
    packed: PackedExpand,
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    mode: Mode = "auto",
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole layer on inputs the caller has already validated (:func:`kernels.ops.lowrank_forward` does)."""
    if mode not in ("auto", "fused", "two_phase"):
        raise ValueError(f"mode must be 'auto', 'fused' or 'two_phase', got {mode!r}")
    parts = shrink_parts(v_cat)
    if mode == "fused" and len(parts) > 1:
        raise ValueError(f"the fused form reads one V; this layer's comes in {len(parts)} parts (use 'two_phase')")
    num_tokens, in_features = x2d.shape
    if mode == "auto":
        mode = choose_mode(num_tokens, in_features, packed, x2d.element_size()) if len(parts) == 1 else "two_phase"
    cfg = config or default_config(num_tokens, mode)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    if mode == "fused":
        v = parts[0] if parts[0].stride(-1) == 1 else parts[0].contiguous()
        return _run(x2d, v, packed, bias, fused=True, gated=gated, config=cfg, out=out)
    return _run(_shrink(x2d, parts), None, packed, bias, fused=False, gated=gated, config=cfg, out=out)


def launch_expand(
    h2d: torch.Tensor,
    packed: PackedExpand,
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The expand alone, from a given ``h [tokens, R]`` (validated by :func:`kernels.ops.lowrank_expand`)."""
    h2d = h2d if h2d.stride(-1) == 1 else h2d.contiguous()
    cfg = config or default_config(h2d.shape[0], "two_phase")
    return _run(h2d, None, packed, bias, fused=False, gated=gated, config=cfg, out=out)


def _run(
    src: torch.Tensor,
    v_cat: torch.Tensor | None,
    packed: PackedExpand,
    bias: torch.Tensor | None,
    *,
    fused: bool,
    gated: bool,
    config: KernelConfig,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """One launch over all output tiles. ``src`` is x (``fused``: h is recomputed from ``v_cat``) or h."""
    num_tokens = src.shape[0]
    if gated:
        n_out = packed.segments[0].out_size
        n_tiles = triton.cdiv(n_out, config.block_n)
    else:
        n_out = packed.total_out
        n_tiles = sum(triton.cdiv(s.out_size, config.block_n) for s in packed.segments)
    out = _output(out, (num_tokens, n_out), src)
    if num_tokens == 0:
        return out
    # Pointers that are never dereferenced (no V in the expand, no U, no bias) still need a tensor.
    v_cat = src if v_cat is None else v_cat
    u_flat = packed.u_flat if packed.u_flat.numel() else src
    grid = (n_tiles, triton.cdiv(num_tokens, config.block_m))
    _lowrank_kernel[grid](
        src, src.stride(0), v_cat, v_cat.stride(0), u_flat, packed.meta,
        bias if bias is not None else out, out, out.stride(0), num_tokens, v_cat.shape[1],
        NUM_SEGS=packed.num_segments,
        HAS_BIAS=bias is not None,
        FUSED_SHRINK=fused,
        GATED=gated,
        RANKS_ALIGNED=all(seg.rank % U_ROW_ALIGN == 0 for seg in packed.segments),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        UPCAST=INTERPRETED and src.dtype == torch.bfloat16,
        PRECISION="ieee" if src.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    return out


def _output(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """``out`` after checking it can take the result, or a new tensor."""
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {list(shape)} {like.dtype} on {like.device} with contiguous rows, got "
            f"{list(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}"
        )
    return out


def _shrink(x2d: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Phase 1 of two-phase: ``h = x v_catᵀ`` by cuBLAS (one product per part of ``V``), rows
    padded to 16 elements.

    The padded row stride is divisible by 16, which Triton specialises on; with ranks that are
    multiples of :data:`U_ROW_ALIGN` every segment's slice of ``h`` then starts aligned.
    """
    rank = sum(v.shape[0] for v in parts)
    h = torch.empty((x2d.shape[0], -(-rank // 16) * 16), device=x2d.device, dtype=x2d.dtype)[:, :rank]
    return shrink_2d(x2d, parts, out=h)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """fp32-accumulating ``a @ b``; fp32 operands at full (IEEE) precision, not TF32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _shrink_tile(
    x_ptr, stride_xm, v_rows_ptr, stride_v, offs_m, mask_m, offs_r, mask_r, K,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """fp32 ``x[offs_m] @ V[offs_r]ᵀ`` (``[BLOCK_M, BLOCK_R]``), looping over the K = in dimension."""
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        v_ptrs = v_rows_ptr + offs_r[None, :] * stride_v + offs_k[:, None]  # V rows, transposed: [BLOCK_K, BLOCK_R]
        v = tl.load(v_ptrs, mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        acc += _dot(x, v, UPCAST, PRECISION)
    return acc


@triton.jit
def _segment_tile(
    src_ptr, stride_src_m, v_ptr, stride_v, u_ptr, meta_ptr, seg, tile, offs_m, mask_m, K,
    NUM_SEGS: tl.constexpr, FUSED_SHRINK: tl.constexpr, RANKS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """fp32 output tile ``tile`` (columns relative to the segment) of segment ``seg``, without bias.

    ``src`` is x (``FUSED_SHRINK``: ``h`` is recomputed here) or the precomputed ``h [tokens, R]``.
    """
    rank_offset = tl.load(meta_ptr + _RANK_OFFSET * NUM_SEGS + seg)
    rank = tl.load(meta_ptr + _RANK * NUM_SEGS + seg)
    if RANKS_ALIGNED:  # all ranks are multiples of _U_ALIGN: h slices start aligned, loads vectorise
        rank_offset = tl.multiple_of(rank_offset, _U_ALIGN)
        rank = tl.multiple_of(rank, _U_ALIGN)
    out_size = tl.load(meta_ptr + _OUT_SIZE * NUM_SEGS + seg)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_size
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if tl.load(meta_ptr + _IDENTITY * NUM_SEGS + seg) != 0:
        # Dense part: the output columns are h's columns rank_offset + n.
        if FUSED_SHRINK:
            acc = _shrink_tile(
                src_ptr, stride_src_m, v_ptr + rank_offset * stride_v, stride_v, offs_m, mask_m, offs_n, mask_n, K,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
        else:
            h_ptrs = src_ptr + offs_m[:, None] * stride_src_m + rank_offset + offs_n[None, :]
            acc = tl.load(h_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    else:
        # U_j rows are zero-padded to u_stride, a multiple of _U_ALIGN: masking U at u_stride
        # instead of rank keeps the mask constant over aligned groups, so U loads vectorise.
        u_stride = tl.multiple_of(tl.load(meta_ptr + _U_STRIDE * NUM_SEGS + seg), _U_ALIGN)
        u_seg_ptr = u_ptr + tl.multiple_of(tl.load(meta_ptr + _U_OFFSET * NUM_SEGS + seg), _U_ALIGN)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            if FUSED_SHRINK:
                h = _shrink_tile(
                    src_ptr, stride_src_m, v_ptr + rank_offset * stride_v, stride_v, offs_m, mask_m, offs_r, mask_r, K,
                    BLOCK_M, BLOCK_R, BLOCK_K, UPCAST, PRECISION,
                )  # fmt: skip
            else:
                h_ptrs = src_ptr + offs_m[:, None] * stride_src_m + rank_offset + offs_r[None, :]
                h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            # The transposed tile [BLOCK_R, BLOCK_N]; h is zero beyond rank, and so is the padding.
            u_ptrs = u_seg_ptr + offs_n[None, :] * u_stride + offs_r[:, None]
            u = tl.load(u_ptrs, mask=(offs_r < u_stride)[:, None] & mask_n[None, :], other=0.0)
            acc += _dot(h.to(u.dtype), u, UPCAST, PRECISION)
    return acc


@triton.jit
def _find_segment(meta_ptr, tile, NUM_SEGS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(segment, tile within it) of global output tile ``tile``; tiles are numbered segment by segment."""
    seg = 0
    local = tile
    start = 0
    for j in tl.static_range(NUM_SEGS):
        hit = tile >= start  # the last segment starting at or before `tile` owns it
        seg = tl.where(hit, j, seg)
        local = tl.where(hit, tile - start, local)
        start += (tl.load(meta_ptr + _OUT_SIZE * NUM_SEGS + j) + BLOCK_N - 1) // BLOCK_N
    return seg, local


@triton.jit
def _lowrank_kernel(
    src_ptr, stride_src_m, v_ptr, stride_v, u_ptr, meta_ptr, bias_ptr, out_ptr, stride_out_m, M, K,
    NUM_SEGS: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_SHRINK: tl.constexpr, GATED: tl.constexpr,
    RANKS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid ``(output tiles, token blocks)``. Plain: one tile of one segment. ``GATED``: the same
    tile of gate (segment 0) and up (segment 1), stored as ``silu(gate) * up``."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if GATED:
        gate = _segment_tile(
            src_ptr, stride_src_m, v_ptr, stride_v, u_ptr, meta_ptr, 0, pid_n, offs_m, mask_m, K,
            NUM_SEGS, FUSED_SHRINK, RANKS_ALIGNED, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        up = _segment_tile(
            src_ptr, stride_src_m, v_ptr, stride_v, u_ptr, meta_ptr, 1, pid_n, offs_m, mask_m, K,
            NUM_SEGS, FUSED_SHRINK, RANKS_ALIGNED, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < tl.load(meta_ptr + _OUT_SIZE * NUM_SEGS + 0)
        if HAS_BIAS:
            up_offset = tl.load(meta_ptr + _OUT_OFFSET * NUM_SEGS + 1)
            gate += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
            up += tl.load(bias_ptr + up_offset + cols, mask=mask_n, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    else:
        seg, tile = _find_segment(meta_ptr, pid_n, NUM_SEGS, BLOCK_N)
        y = _segment_tile(
            src_ptr, stride_src_m, v_ptr, stride_v, u_ptr, meta_ptr, seg, tile, offs_m, mask_m, K,
            NUM_SEGS, FUSED_SHRINK, RANKS_ALIGNED, BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < tl.load(meta_ptr + _OUT_SIZE * NUM_SEGS + seg)
        cols = tl.load(meta_ptr + _OUT_OFFSET * NUM_SEGS + seg) + offs_n
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out_m + cols[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
