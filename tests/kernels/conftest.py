"""Fixtures for the kernel tests.

Triton decides at decoration time (module import) whether a ``@triton.jit`` function is compiled
or interpreted, from ``TRITON_INTERPRET``. Setting the variable for the whole pytest process
would also turn the real module's kernels (used by the GPU tests) into interpreted ones, and
would come too late if another test already imported the module. So the interpreter tests get
their own copy of ``kernels/triton_lowrank.py``, imported under another name while
``TRITON_INTERPRET=1`` is set; ``kernels.triton_lowrank`` itself is left untouched.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

import kernels
from kernels import PackedExpand, lowrank_forward, pack_expand
from tests.helpers import import_benchmark

_MODULE_FILE = Path(kernels.__file__).with_name("triton_lowrank.py")


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@pytest.fixture(scope="session")
def interpreted() -> ModuleType:
    """A private copy of :mod:`kernels.triton_lowrank` whose kernels run on the Triton CPU interpreter."""
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("kernels._triton_lowrank_interpreted", _MODULE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    with _env("TRITON_INTERPRET", "1"):
        spec.loader.exec_module(module)
    assert module.INTERPRETED, "TRITON_INTERPRET=1 did not take effect"
    return module


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@dataclass
class Layer:
    """A random low-rank layer plus its dense weight (float64): the oracle independent of the kernels."""

    v_cat: torch.Tensor
    packed: PackedExpand
    bias: torch.Tensor | None
    dense: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.v_cat.shape[1]

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.double() @ self.dense.T
        return y if self.bias is None else y + self.bias.double()


def build_layer(
    in_features: int,
    segments: Sequence[tuple[int, int | None]],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    bias: bool = False,
) -> Layer:
    """``segments``: ``(out, rank)`` each, rank None for an identity (dense) segment.

    Factors are scaled by 1/sqrt(fan-in), so outputs stay O(1) in every dtype, and rounded to
    ``dtype`` before the dense oracle is formed, so the oracle sees the kernels' weights.
    """
    ranks = [out if rank is None else rank for out, rank in segments]
    v_cat = (torch.randn(sum(ranks), in_features, dtype=torch.float64, device=device) / in_features**0.5).to(dtype)
    us = [
        None if rank is None else (torch.randn(out, rank, dtype=torch.float64, device=device) / rank**0.5).to(dtype)
        for out, rank in segments
    ]
    rows = v_cat.double().split(ranks)
    dense = torch.cat([v if u is None else u.double() @ v for u, v in zip(us, rows)])
    b = torch.randn(dense.shape[0], dtype=torch.float64, device=device).to(dtype) if bias else None
    return Layer(v_cat, pack_expand(us, ranks), b, dense)


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Relative Frobenius error within the tolerance of ``dtype`` (default ``y.dtype``); all elements finite.

    Kernel outputs are NaN-poisoned before the call, so an element never written fails here.
    """
    tol = TOL[dtype or y.dtype]
    assert y.shape == ref.shape, f"shape {tuple(y.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(y).all(), f"{(~torch.isfinite(y)).sum().item()} non-finite (unwritten?) elements"
    err = ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


# Relative-error tolerances per input dtype (fp32 accumulation everywhere).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture
def make_layer() -> Callable[..., Layer]:
    """:func:`build_layer`."""
    return build_layer


@pytest.fixture
def check_close() -> Callable[..., None]:
    """:func:`assert_close`."""
    return assert_close


class Linear(torch.nn.Module):
    """Holds its factors as a vLLM layer does: ``V`` a Parameter (or one per row block, given
    ``v_split``: a basis shared with other layers beside the layer's own rows), the pack a plain attribute."""

    def __init__(self, v_cat: torch.Tensor, packed: PackedExpand, bias: torch.Tensor | None,
                 v_split: Sequence[int] | None = None):
        super().__init__()
        blocks = v_cat.split(list(v_split)) if v_split else (v_cat,)
        self.v_names = tuple(f"v{i}" for i in range(len(blocks)))
        for name, block in zip(self.v_names, blocks):
            self.register_parameter(name, torch.nn.Parameter(block.clone(), requires_grad=False))
        self.packed, self.bias = packed, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = tuple(getattr(self, name) for name in self.v_names)
        return lowrank_forward(x, v, self.packed, self.bias)


@pytest.fixture(scope="session")
def silu_mul() -> Callable[..., torch.Tensor]:
    """The gated SiLU form of a gate/up layer, which lives in its only user, ``benchmarks/decode_bench.py``."""
    return import_benchmark("decode_bench").lowrank_silu_mul


def compiled_graphs(module: torch.nn.Module) -> tuple[Callable[..., torch.Tensor], list[torch.fx.GraphModule]]:
    """``module`` compiled as vLLM compiles a model (whole graph), and the FX graphs Dynamo made."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(module, backend=backend, fullgraph=True), graphs
