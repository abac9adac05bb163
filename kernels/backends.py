"""Low-rank kernels as objects: one interface, one implementation per way of running a layer.

This follows vLLM's own pattern for linear kernels (``dispatch_unquantized_gemm``,
``init_fp8_linear_kernel``): the layer method picks one kernel object when the weights are
loaded, the kernel packs the layer's factors once into the layout it reads, and every forward
is one call on that object. The tensors stay the layer's Parameters and buffers, read from the
layer on every call, so that torch.compile sees them as module state (never as constants baked
into a cached graph); the kernel object holds only Python ints and the names of those tensors.

* :class:`CpuKernel`: the fused C++ kernel (:mod:`kernels.cpu_lowrank`), float32 on a CPU;
* :class:`CudaKernel`: the custom ops (:mod:`kernels.ops`), which choose per call between the
  Triton decode kernels and the torch path; the expand factors padded for the Triton loads;
* :class:`TorchKernel`: the same ops without padding, where neither of the others applies (their
  dispatch then always takes the torch path).

This module imports neither Triton nor vLLM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch.nn import Module, Parameter

from . import cpu_lowrank
from .ops import lowrank_expand, lowrank_forward, lowrank_shrink
from .segments import U_ROW_ALIGN, PackedExpand, pack_expand


class LowRankKernel(ABC):
    """How one layer runs ``y = expand(x v_catᵀ) + bias``; ``v_cat``'s row blocks are the layer's
    attributes ``v_names`` (a shared basis: one Parameter held by every layer of its group), the
    expand factors its ``lowrank_u``."""

    description: str = ""

    def __init__(self, v_names: Sequence[str]):
        self.v_names = tuple(v_names)

    @classmethod
    @abstractmethod
    def can_implement(cls, v: torch.Tensor) -> bool:
        """Whether this kernel runs factors like ``v`` (its device and dtype)."""

    @abstractmethod
    def pack(self, layer: Module, in_features: int, us: Sequence[torch.Tensor | None], ranks: Sequence[int]) -> None:
        """Replace the layer's loaded factors by this kernel's layout, once, after loading.

        ``us``: per segment its ``U_j [out_j, r_j]``, None for an identity segment; ``ranks``:
        per segment its rows of ``v_cat``.
        """

    @abstractmethod
    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``[..., in] -> [..., out]``."""

    @abstractmethod
    def shrink(self, layer: Module, x: torch.Tensor) -> torch.Tensor:
        """``h = x v_catᵀ``: ``[..., in] -> [..., R]`` (a row-parallel layer all-reduces ``h``)."""

    @abstractmethod
    def expand(self, layer: Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Each segment's block from ``h``: ``[..., R] -> [..., out]``."""

    def v(self, layer: Module) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(layer, name) for name in self.v_names)


class CpuKernel(LowRankKernel):
    """One C++ call per layer, whatever the token count; factors in the kernel's panels."""

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"fused CPU kernel ({torch.backends.cpu.get_cpu_capability()})"

    @classmethod
    def can_implement(cls, v: torch.Tensor) -> bool:
        return v.device.type == "cpu" and v.dtype == torch.float32 and cpu_lowrank.available()

    def pack(self, layer: Module, in_features: int, us: Sequence[torch.Tensor | None], ranks: Sequence[int]) -> None:
        # The panels replace the loaded factors in place, so the layer holds one copy of each; a
        # shared part is one Parameter for its group, packed by the first layer that gets here
        # (panels are flat, loaded factors 2-D).
        for v in self.v(layer):
            if v.dim() == 2:
                v.data = cpu_lowrank.pack_panels(v.data)
        cpu = cpu_lowrank.CpuLowRank.build([v.data for v in self.v(layer)], in_features, us, ranks)
        layer.lowrank_u = Parameter(cpu.u, requires_grad=False)
        layer.register_buffer("lowrank_meta", cpu.meta, persistent=False)
        self.v_ranks, self.out_features = cpu.v_ranks, cpu.out_features

    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return cpu_lowrank.forward(x, self.v(layer), layer.lowrank_u, layer.lowrank_meta, bias, self.v_ranks,
                                   self.out_features)

    def shrink(self, layer: Module, x: torch.Tensor) -> torch.Tensor:
        h = cpu_lowrank.shrink(x, self.v(layer), self.v_ranks)
        return h.view(*x.shape[:-1], h.shape[-1])

    def expand(self, layer: Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = cpu_lowrank.expand(h.reshape(-1, h.shape[-1]), layer.lowrank_u, layer.lowrank_meta, bias,
                               self.out_features)
        return y.view(*h.shape[:-1], self.out_features)


class TorchKernel(LowRankKernel):
    """The custom ops of :mod:`kernels.ops` on the expand factors packed into one flat buffer."""

    description = "torch path"
    ROW_ALIGN = 1  # no padding: the torch path reads any stride

    @classmethod
    def can_implement(cls, v: torch.Tensor) -> bool:
        return True

    def pack(self, layer: Module, in_features: int, us: Sequence[torch.Tensor | None], ranks: Sequence[int]) -> None:
        packed = pack_expand(us, ranks, self.ROW_ALIGN)
        # The packed buffer replaces the loaded one: the layer holds one copy of U.
        layer.lowrank_u = Parameter(packed.u_flat, requires_grad=False)
        self.packed: PackedExpand = packed

    def apply(self, layer: Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return lowrank_forward(x, self.v(layer), self.packed, bias)

    def shrink(self, layer: Module, x: torch.Tensor) -> torch.Tensor:
        return lowrank_shrink(x, self.v(layer))

    def expand(self, layer: Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return lowrank_expand(h, self.packed, bias)


class CudaKernel(TorchKernel):
    """As :class:`TorchKernel`, with ``U``'s rows padded for the Triton kernels' aligned loads,
    which the ops then pick for decode-sized batches."""

    description = "Triton decode kernels (torch path for prefill)"
    ROW_ALIGN = U_ROW_ALIGN

    @classmethod
    def can_implement(cls, v: torch.Tensor) -> bool:
        return v.is_cuda


KERNELS: tuple[type[LowRankKernel], ...] = (CpuKernel, CudaKernel, TorchKernel)
"""In order of preference; the last one runs anything."""


def choose_kernel(v: torch.Tensor) -> type[LowRankKernel]:
    """The first of :data:`KERNELS` that runs factors like ``v``."""
    return next(k for k in KERNELS if k.can_implement(v))
