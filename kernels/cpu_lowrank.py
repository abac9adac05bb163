"""Low-rank layers on a CPU: one fused C++ kernel for every token count.

Why a kernel of our own. At decode batch sizes a linear layer is bandwidth-bound: its time is
the time to stream its weights from memory. Through a GEMM library a low-rank layer is several
small products (one shrink, one expand per output segment, a concatenation); each is too small
to keep both cores streaming and pays a call's overhead, so on the project's 2-core machine half
the bytes took 70-80 % of the dense time (``benchmarks/cpu_kernel_bench.py``). The kernel
(``csrc/lowrank_cpu.cpp``) streams every factor of a layer once per call, both phases split
over all threads, and writes each segment's block of the output in place; for prefill it is a
register-blocked GEMM on the same packed factors.

Factors are packed once, at load time, into panels of :data:`PANEL` outputs (see the C++ file):
one copy, no padding, the same bytes as the checkpoint. :class:`CpuLowRank` holds one layer. Its
shrink factor may come in row blocks (*parts*, as :data:`kernels.segments.ShrinkFactors`), each
packed on its own, so that a basis shared by several layers is packed, and held, once.

The kernel is compiled for this machine (``-march=native``) on first use with
``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed once; the build is cached
under ``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Where it cannot be
built, :func:`available` says so (logged once) and callers keep the torch path.
This module imports neither vLLM nor Triton.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .segments import SegmentTable, plan_segments

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "lowrank_cpu.cpp"
EXTENSION_NAME = "soco_lowrank_cpu"
NAMESPACE = "soco_cpu"  # torch.ops.soco_cpu.{lowrank, shrink, expand}
PANEL = 32  # outputs per panel: must equal PANEL in csrc/lowrank_cpu.cpp


@functools.cache
def available() -> bool:
    """Build (once per machine) and load the kernel, with its shapes for torch.compile; False,
    logged once, if that fails."""
    try:
        build()
    except Exception as exc:  # no compiler, no ninja, a build error: the torch path still serves
        logger.warning("soco: the CPU low-rank kernel could not be built (%s); low-rank layers use torch.mm", exc)
        return False
    _register_fakes(NAMESPACE)
    return True


def build(name: str = EXTENSION_NAME, namespace: str = NAMESPACE, isa_flags: Sequence[str] = ("-march=native",)) -> None:
    """Compile and load the kernel as ``torch.ops.<namespace>`` (cached by torch across processes).

    ``isa_flags`` pick the instruction set (the tests also build ``-mno-avx512f`` and plain-C++
    variants under other names and namespaces, so every path is checked on every machine).
    """
    from torch.utils.cpp_extension import load

    load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", *isa_flags, "-fopenmp", f"-DSOCO_CPU_NS={namespace}"],
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` as the kernel's panels, flat: panel ``p`` is ``wᵀ[:, 32p : 32p + 32]`` row-major
    (the last one narrower when ``N`` is not a multiple of :data:`PANEL`); float32, no padding."""
    n, k = w.shape
    full = n // PANEL
    head = w[: full * PANEL].reshape(full, PANEL, k).transpose(1, 2).reshape(-1)
    tail = w[full * PANEL :].t().reshape(-1)
    return torch.cat([head, tail]).to(torch.float32).contiguous()


def unpack_panels(flat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_panels`: ``[N, K]``."""
    full = n // PANEL
    head = flat[: full * PANEL * k].reshape(full, k, PANEL).transpose(1, 2).reshape(full * PANEL, k)
    tail = flat[full * PANEL * k : n * k].reshape(k, n - full * PANEL).t()
    return torch.cat([head, tail])


@dataclass
class CpuLowRank:
    """One (possibly fused) low-rank layer in the kernel's layout: ``y = expand(x v_catᵀ) + bias``.

    ``v`` packs ``v_cat [rank_total, in]`` as row blocks of ``v_ranks`` rows each (a shared basis:
    one tensor for its whole group), ``u`` every non-identity segment's ``U_j [out_j, r_j]`` one
    after another (panels, no row padding), ``meta`` the tensor form of ``segments``.
    """

    v: tuple[torch.Tensor, ...]
    v_ranks: tuple[int, ...]
    u: torch.Tensor
    meta: torch.Tensor
    segments: SegmentTable
    in_features: int
    out_features: int

    @property
    def rank_total(self) -> int:
        return sum(self.v_ranks)

    @classmethod
    def build(cls, v: torch.Tensor | Sequence[torch.Tensor], in_features: int, us: Sequence[torch.Tensor | None],
              ranks: Sequence[int]) -> CpuLowRank:
        """From ``v`` (``v_cat``, or its row blocks, already :func:`pack_panels`-ed, so a shared
        basis is packed once) and the segments' expand factors (None: identity segment, as
        :func:`kernels.pack_expand` takes them)."""
        segments = plan_segments(us, ranks)
        v_parts = (v,) if isinstance(v, torch.Tensor) else tuple(v)
        rank_total = segments.total_rank
        if not v_parts or any(p.numel() % in_features for p in v_parts) \
                or sum(p.numel() for p in v_parts) != rank_total * in_features:
            raise ValueError(f"CpuLowRank: v holds {[p.numel() for p in v_parts]} floats, segment ranks sum to "
                             f"{rank_total}: need rows x {in_features} inputs, {rank_total} rows in all")
        # Unpadded rows (alignment 1): each segment's panels start where its U_j would, u_offset
        # counts floats of the concatenated panels.
        u_parts = [pack_panels(u) for u in us if u is not None]
        u_flat = torch.cat(u_parts) if u_parts else torch.empty(0)
        meta = segments.tensor()
        v_ranks = tuple(p.numel() // in_features for p in v_parts)
        return cls(v_parts, v_ranks, u_flat, meta, segments, in_features, segments.total_out)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return forward(x, self.v, self.u, self.meta, bias, self.v_ranks, self.out_features)

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        return shrink(x, self.v, self.v_ranks)

    def expand(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return expand(h, self.u, self.meta, bias, self.out_features)


# The ops, on explicit tensors: a vLLM layer passes its own Parameters and buffers, so that
# torch.compile sees them as the module's state (never as constants baked into a graph).


def forward(x: torch.Tensor, v: Sequence[torch.Tensor], u: torch.Tensor, meta: torch.Tensor,
            bias: torch.Tensor | None, v_ranks: Sequence[int], out_features: int) -> torch.Tensor:
    """``y = expand(x v_catᵀ) + bias``: ``x [..., in] -> [..., out_features]``, one kernel call;
    ``v`` the panels of ``v_cat``'s row blocks, ``v_ranks`` their rows."""
    x2d = _rows(x, v[0].numel() // v_ranks[0])
    y = torch.ops.soco_cpu.lowrank(x2d, list(v), u, meta, bias, list(v_ranks), out_features)
    return y.view(*x.shape[:-1], out_features)


def shrink(x: torch.Tensor, v: Sequence[torch.Tensor], v_ranks: Sequence[int]) -> torch.Tensor:
    """``h = x v_catᵀ``: ``[..., in] -> [tokens, sum(v_ranks)]`` (row-parallel TP all-reduces ``h``)."""
    return torch.ops.soco_cpu.shrink(_rows(x, v[0].numel() // v_ranks[0]), list(v), list(v_ranks))


def expand(h: torch.Tensor, u: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
           out_features: int) -> torch.Tensor:
    """Each segment's ``h_j U_jᵀ`` (+ bias) in its block: ``[tokens, rank_total] -> [tokens, out_features]``."""
    return torch.ops.soco_cpu.expand(h, u, meta, bias, out_features)


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., {in_features}], got {tuple(x.shape)}")
    x2d = x.reshape(-1, in_features)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _register_fakes(namespace: str) -> None:
    """Shapes for torch.compile (vLLM's CPU default traces the model once with Dynamo)."""
    lib = namespace + "::"
    torch.library.register_fake(lib + "shrink")(lambda x, v, ranks: x.new_empty(x.shape[0], sum(ranks)))
    torch.library.register_fake(lib + "expand")(
        lambda h, u, meta, bias, out_features: h.new_empty(h.shape[0], out_features))
    torch.library.register_fake(lib + "lowrank")(
        lambda x, v, u, meta, bias, ranks, out_features: x.new_empty(x.shape[0], out_features))

