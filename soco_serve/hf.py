"""Build a transformers model with low-rank linear layers from the soco layout.

Part of the serving package (it needs nothing from the compressor). Used by ``soco-compress
eval``, by the compressor itself (the coefficient update and evaluation run on the very modules a
checkpoint describes), by the tests, and by anyone who wants the compressed model without vLLM. A shared basis is one ``nn.Parameter`` referenced by every layer
of its group, so it is held once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from soco_serve.layout import (
    BasisEntry,
    CheckpointError,
    CheckpointReader,
    LinearEntry,
    Manifest,
    basis_name,
    bias_name,
    u_name,
    v_name,
    weight_name,
)


class LowRankLinear(nn.Module):
    """``y = (x Vᵀ) Uᵀ + b`` with ``U [out, r]``, ``V [r, in]``; ``V`` may be a shared basis."""

    def __init__(self, u: nn.Parameter, v: nn.Parameter, bias: nn.Parameter | None = None):
        super().__init__()
        if u.shape[1] != v.shape[0]:
            raise ValueError(f"U {list(u.shape)} and V {list(v.shape)} disagree on the rank")
        self.u, self.v, self.bias = u, v, bias
        self.in_features, self.out_features, self.rank = v.shape[1], u.shape[0], v.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _param(t: torch.Tensor, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(t.to(dtype) if dtype is not None else t, requires_grad=False)


def lowrank_modules(linears: Mapping[str, LinearEntry], bases: Mapping[str, BasisEntry],
                    get: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """The module for each named linear as stored: ``nn.Linear`` (dense) or :class:`LowRankLinear`;
    the layers of one shared basis hold the same ``nn.Parameter``."""
    shared: dict[str, nn.Parameter] = {}
    out: dict[str, nn.Module] = {}
    for name, e in linears.items():
        bias = _param(get(bias_name(name)), dtype) if e.bias else None
        if e.kind == "dense":
            mod: nn.Module = nn.Linear(e.in_features, e.out_features, bias=e.bias, device="meta")
            mod.weight = _param(get(weight_name(name)), dtype)
            mod.bias = bias
        else:
            if e.kind == "shared":
                assert e.basis is not None and e.basis in bases
                if e.basis not in shared:
                    shared[e.basis] = _param(get(basis_name(e.basis)), dtype)
                v = shared[e.basis]
            else:
                v = _param(get(v_name(name)), dtype)
            mod = LowRankLinear(_param(get(u_name(name)), dtype), v, bias)
        out[name] = mod
    return out


def _set_module(model: nn.Module, name: str, mod: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError as exc:
        raise CheckpointError(f"manifest names linear {name!r}, which this model does not have") from exc
    old = getattr(owner, child, None)
    setattr(owner, child, mod)
    return old  # type: ignore[return-value]


def install_factors(model: nn.Module, manifest: Manifest, get: Callable[[str], torch.Tensor],
                    dtype: torch.dtype | None = None) -> None:
    """Replace every linear named in the manifest by its stored representation, in place."""
    for name, mod in lowrank_modules(manifest.linears, manifest.bases, get, dtype).items():
        _set_module(model, name, mod)


@contextmanager
def swapped(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """The named submodules replaced for the duration of the block, the originals put back after."""
    old = {name: _set_module(model, name, mod) for name, mod in modules.items()}
    try:
        yield model
    finally:
        for name, mod in old.items():
            _set_module(model, name, mod)


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(parent)
    except AttributeError:
        raise CheckpointError(f"checkpoint tensor {name!r} matches no module of the model") from None
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        raise CheckpointError(f"checkpoint tensor {name!r} matches no parameter of the model")


def load_soco_model(ckpt_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """A transformers causal LM with the checkpoint's low-rank layers (lazily read, mmapped)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = CheckpointReader(ckpt_dir)
    m = reader.manifest
    dtype = dtype or getattr(torch, m.dtype)
    config = AutoConfig.from_pretrained(ckpt_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    install_factors(model, m, reader.get, dtype)
    consumed = set(m.expected_shapes())
    for name in reader.names():
        if name not in consumed:
            _set_tensor(model, name, reader.get(name).to(dtype))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: tensors missing from the checkpoint: {missing[:5]}")
    return model.to(device).eval()
