"""Stream calibration activations into Gram statistics, one float64 accumulator per input site.

Activations are never kept: a forward pre-hook on the first linear of each input site adds
``XᵀX`` of the batch into the site's accumulator and drops ``X``. Linears that read the same
activation (q/k/v; gate/up) share one accumulator.

:func:`layer_inputs` and :func:`run_layer` let later stages (the coefficient update) walk the
model layer by layer on the same calibration batches without re-running earlier layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import ArchSpec, LinearRef, decoder_layers


class CalibrationError(ValueError):
    """Calibration statistics are unusable (empty, NaN or Inf)."""


@dataclass
class GramStat:
    """Running ``XᵀX`` and ``Σ|x|`` per channel (float64) over ``tokens`` input rows."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, features: int) -> "GramStat":
        return cls(torch.zeros(features, features, dtype=torch.float64), torch.zeros(features, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean absolute activation per input channel (ASVD's statistic)."""
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class GramSet:
    """Gram statistics keyed by ``(layer index, input site)``."""

    stats: dict[tuple[int, str], GramStat] = field(default_factory=dict)

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        return self.stats[key].gram

    def check(self) -> None:
        for (layer, site), st in self.stats.items():
            if st.tokens == 0:
                raise CalibrationError(f"layer {layer} site {site!r}: no calibration tokens reached it")
            if not torch.isfinite(st.gram).all():
                raise CalibrationError(
                    f"layer {layer} site {site!r}: Gram statistics contain NaN or Inf "
                    "(the model's activations overflow on the calibration text)"
                )


def _site_heads(refs: Iterable[LinearRef]) -> dict[tuple[int, str], LinearRef]:
    heads: dict[tuple[int, str], LinearRef] = {}
    for r in refs:
        heads.setdefault(r.site_key, r)
    return heads


def attach_gram_hooks(refs: Iterable[LinearRef], grams: GramSet) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook the first linear of every site so its input accumulates into ``grams``."""
    handles = []
    for key, ref in _site_heads(refs).items():
        st = grams.stats.setdefault(key, GramStat.zeros(ref.module.in_features))

        def hook(_mod: nn.Module, args: tuple, st: GramStat = st) -> None:
            st.add(args[0].detach())

        handles.append(ref.module.register_forward_pre_hook(hook))
    return handles


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(windows, batch_size))


@torch.no_grad()
def collect_grams(model: nn.Module, refs: list[LinearRef], windows: torch.Tensor, batch_size: int = 4,
                  progress: bool = True) -> GramSet:
    """One dense forward pass over the calibration windows, accumulating every site's ``XᵀX``."""
    grams = GramSet()
    handles = attach_gram_hooks(refs, grams)
    device = next(model.parameters()).device
    try:
        for b in tqdm(batches(windows, batch_size), desc="calibrate", unit="batch", disable=not progress):
            model(input_ids=b.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    grams.check()
    return grams


def collect_fisher(model: nn.Module, refs: list[LinearRef], windows: torch.Tensor, batch_size: int = 4,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """FWSVD's statistic: per linear, the Fisher information of each output row, ``Σ_j (∂L/∂W_ij)²``
    summed over calibration batches (``L`` the next-token loss of a batch).

    Only the decoder linears' weights take gradients (everything else stays frozen), and each
    batch's gradients are folded into ``[out]`` float64 sums at once, so memory is one backward
    pass plus one vector per linear.
    """
    weights = [r.module.weight for r in refs]
    saved = {p: p.requires_grad for p in model.parameters()}
    fisher = {r.name: torch.zeros(r.module.out_features, dtype=torch.float64) for r in refs}
    device = weights[0].device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for b in tqdm(batches(windows, batch_size), desc="fisher", unit="batch", disable=not progress):
            b = b.to(device)
            with torch.enable_grad():
                loss = model(input_ids=b, labels=b, use_cache=False).loss
            if not torch.isfinite(loss):
                raise CalibrationError(f"the calibration loss is {loss.item()} (the model overflows on the text)")
            for r, g in zip(refs, torch.autograd.grad(loss, weights)):
                fisher[r.name] += g.to(torch.float64).pow(2).sum(1).cpu()
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    for name, f in fisher.items():
        if not torch.isfinite(f).all():
            raise CalibrationError(f"{name}: Fisher information contains NaN or Inf")
    return fisher


# ---------------------------------------------------------------------------------------------
# Layer-by-layer walking
# ---------------------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


@dataclass
class LayerInput:
    """What the model passes to its first decoder layer for one batch (hidden states + kwargs)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@torch.no_grad()
def layer_inputs(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, batch_size: int) -> list[LayerInput]:
    """Capture the first decoder layer's inputs for each batch (embeddings, rotary, masks).

    Architecture-neutral: whatever the model computes before its layers (position embeddings,
    attention masks) is recorded from a real forward call, which stops at layer 0.
    """
    layers = decoder_layers(model, spec)
    captured: list[LayerInput] = []

    def grab(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(LayerInput(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for b in batches(windows, batch_size):
            try:
                model(input_ids=b.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """Run one decoder layer on every batch; returns the next layer's inputs."""
    out = []
    for li in inputs:
        h = layer(li.hidden, **li.kwargs)
        out.append(LayerInput(h[0] if isinstance(h, tuple) else h, li.kwargs))
    return out
