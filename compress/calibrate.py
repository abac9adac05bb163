"""The statistics stage: activations walked layer by layer, folded into float64 statistics.

A forward pre-hook on the first linear of each input site adds ``XᵀX`` of the batch into the
site's accumulator and drops ``X``. Linears that read the same activation (q/k/v; gate/up) share
one accumulator, and only the layers being compressed have accumulators at all.

:func:`layer_inputs` captures what the model feeds its decoder layers (embeddings, rotary
tables, masks) from a real forward call, :func:`run_layer` advances a batch list through one
layer, and :func:`head_logits` finishes from the last layer's output. The pipeline walks every
stream (dense and compressed, calibration and evaluation) with these three, so no architecture's
forward is written here. :func:`collect_fisher` does the backward pass the same way, one layer
at a time, recomputing each layer from its saved input.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .models import ArchSpec, LinearRef, decoder_layers


class CalibrationError(ValueError):
    """Calibration statistics are unusable (empty, NaN or Inf)."""


_LIVE: "weakref.WeakSet[GramStat]" = weakref.WeakSet()


def live_stat_bytes() -> int:
    """Bytes held by every Gram accumulator still alive (the pipeline reports its peak)."""
    return sum(st.gram.numel() * st.gram.element_size() + st.abs_sum.numel() * st.abs_sum.element_size()
               for st in list(_LIVE))


@dataclass(eq=False)
class GramStat:
    """Running ``XᵀX`` and ``Σ|x|`` per channel (float64) over ``tokens`` input rows."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    def __post_init__(self) -> None:
        _LIVE.add(self)

    @classmethod
    def zeros(cls, features: int, device: torch.device | str = "cpu") -> "GramStat":
        return cls(torch.zeros(features, features, dtype=torch.float64, device=device),
                   torch.zeros(features, dtype=torch.float64, device=device))

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
        st = grams.stats.get(key) or grams.stats.setdefault(
            key, GramStat.zeros(ref.module.in_features, device_of(ref.module)))

        def hook(_mod: nn.Module, args: tuple, st: GramStat = st) -> None:
            st.add(args[0].detach())

        handles.append(ref.module.register_forward_pre_hook(hook))
    return handles


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(windows, batch_size))


# ---------------------------------------------------------------------------------------------
# Layer-by-layer walking
# ---------------------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


@dataclass
class LayerInput:
    """What the model passes to its decoder layers for one batch: the first layer's hidden states,
    and each layer's keyword arguments (rotary tables, masks), keyed by the layer module.

    Per layer, because architectures differ between layers: sliding-window layers get another
    mask than global ones (Gemma 2 and 3, Qwen3 with windows), Gemma 3's local layers other
    rotary tables. The dicts of layers of one type hold the same tensors, so this costs nothing.
    """

    hidden: torch.Tensor
    kwargs: dict[nn.Module, dict[str, Any]]

    def kwargs_for(self, layer: nn.Module) -> dict[str, Any]:
        try:
            return self.kwargs[layer]
        except KeyError:
            raise KeyError(f"no captured inputs for decoder layer {type(layer).__name__} (not a layer of the "
                           "model the inputs were captured from)") from None


@torch.no_grad()
def layer_inputs(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, batch_size: int) -> list[LayerInput]:
    """Capture the decoder layers' inputs for each batch (embeddings, rotary tables, masks).

    Architecture-neutral: whatever the model computes for its layers is recorded from a real
    forward call in which every layer is a pass-through that records its arguments (so the
    layers themselves never run and may still be on the meta device); the call stops after the
    last layer has been recorded.
    """
    layers = list(decoder_layers(model, spec))
    captured: list[LayerInput] = []

    def recorder(layer: nn.Module) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if layer is layers[0]:
                captured.append(LayerInput(hidden, {}))
            captured[-1].kwargs[layer] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if layer is layers[-1]:
                raise _StopForward
            # the next layers only record their arguments, which do not depend on it
            return (hidden,) if spec.tuple_output else hidden

        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # an instance forward (accelerate's hooks) is kept
    for layer in layers:
        layer.forward = recorder(layer)
    device = next(model.parameters()).device
    try:
        for b in batches(windows, batch_size):
            try:
                model(input_ids=b.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer, fwd in zip(layers, own):
            if fwd is None:
                del layer.forward  # the class's own forward again
            else:
                layer.forward = fwd
    return captured


def forward_layer(layer: nn.Module, li: LayerInput) -> LayerInput:
    """One decoder layer on one batch (differentiable: recovery trains through it)."""
    h = layer(li.hidden, **li.kwargs_for(layer))
    return LayerInput(h[0] if isinstance(h, tuple) else h, li.kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """Run one decoder layer on every batch; returns the next layer's inputs."""
    return [forward_layer(layer, li) for li in inputs]


@torch.no_grad()
def layer_statistics(layer: nn.Module, refs: list[LinearRef], grams: "GramSet | None", inputs: list[LayerInput],
                     keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[LayerInput]:
    """Run one decoder layer on every batch, adding its linears' input statistics (``refs``, the
    layer's own) into ``grams`` (None: just run it); returns the next layer's inputs. Batches move
    to the layer's device one at a time, and ``keep`` stores each output before the next batch
    runs (where the stream keeps its activations)."""
    handles = attach_gram_hooks(refs, grams) if grams is not None else []
    device = device_of(layer)
    try:
        out = []
        for li in inputs:
            h = forward_layer(layer, LayerInput(li.hidden.to(device), li.kwargs)).hidden
            out.append(LayerInput(keep(h) if keep else h, li.kwargs))
        return out
    finally:
        for h in handles:
            h.remove()


def device_of(mod: nn.Module) -> torch.device:
    p = next(mod.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Replay(nn.Module):
    """Stands in for the whole decoder stack: returns the hidden states it is given."""

    def __init__(self, tuple_output: bool) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.tuple_output = tuple_output

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        assert self.hidden is not None
        return (self.hidden,) if self.tuple_output else self.hidden


LOGITS_SLICE_BYTES = 1 << 29  # the most one vocabulary-wide float32 tensor may take where logits are sliced


def positions_per_slice(batch: int, vocab: int) -> int:
    """How many positions of a batch of ``batch`` windows the head may take at once so that one
    ``[batch, positions, vocab]`` float32 tensor stays within :data:`LOGITS_SLICE_BYTES`. A
    vocabulary-wide tensor per position is what grows fastest with the model's vocabulary (a 152K
    vocabulary at 2 × 512 positions is 0.6 GB per tensor, and a loss keeps more than one)."""
    return max(1, LOGITS_SLICE_BYTES // (4 * batch * vocab))


def position_slices(n: int, size: int) -> list[slice]:
    """``n`` positions in consecutive slices of ``size`` (the last one shorter)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def head_logits(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits given its last decoder layer's output ``hidden`` for ``input_ids``.

    Runs the model's own forward with the decoder stack replaced by a stand-in that returns
    ``hidden``, so whatever the architecture does after its layers (final norm, head, logit
    soft-capping) is done by its own code. Gradients flow back to ``hidden``.
    """
    owner_name, _, attr = spec.layers.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    layers = getattr(owner, attr)
    replay = _Replay(spec.tuple_output)
    replay.hidden = hidden
    setattr(owner, attr, nn.ModuleList([replay]))
    try:
        return model(input_ids=input_ids.to(hidden.device), use_cache=False).logits
    finally:
        setattr(owner, attr, layers)


def collect_fisher(run_layers: "LayerSource", model: nn.Module, spec: ArchSpec, refs: list[LinearRef],
                   windows: torch.Tensor, inputs: list[LayerInput], spill: Callable[[int], Any],
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """FWSVD's statistic: per linear, the Fisher information of each output row, ``Σ_j (∂L/∂W_ij)²``
    summed over calibration batches (``L`` the next-token loss of a batch), one layer at a time.

    Forward: every layer's input is saved (``spill(i)`` gives a path for layer ``i``; the caller
    decides where: disk for large models). Backward, from the head down: each layer is onloaded,
    recomputed from its saved input with gradients on, and given the gradient of its output, which
    yields its weights' gradients (folded into ``[out]`` float64 sums at once) and the gradient of
    its input for the layer below. Memory: one layer, one batch's graph, the activations of one
    layer boundary.
    """
    n = len(decoder_layers(model, spec))
    batch_ids = [b for b in torch.split(windows, inputs[0].hidden.shape[0])] if inputs else []
    hidden = [li.hidden for li in inputs]
    for i in tqdm(range(n), desc="fisher forward", unit="layer", disable=not progress):
        torch.save(hidden, spill(i))
        with run_layers.loaded([i]) as (layer,):
            hidden = [h.hidden for h in run_layer(layer, [LayerInput(h, li.kwargs) for h, li in zip(hidden, inputs)])]
    grads = []
    with run_layers.outer():
        for ids, h in zip(batch_ids, hidden):
            h = h.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = head_logits(model, spec, ids, h)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       ids[:, 1:].reshape(-1).to(logits.device))
            if not torch.isfinite(loss):
                raise CalibrationError(f"the calibration loss is {loss.item()} (the model overflows on the text)")
            grads.append(torch.autograd.grad(loss, h)[0])
    fisher: dict[str, torch.Tensor] = {}
    for i in tqdm(range(n - 1, -1, -1), desc="fisher backward", unit="layer", disable=not progress):
        saved = torch.load(spill(i), weights_only=True)
        mine = [r for r in refs if r.layer == i]
        with run_layers.loaded([i]) as (layer,):
            live = {r.name: layer.get_submodule(r.spec.path).weight for r in mine}
            rows = {name: torch.zeros(w.shape[0], dtype=torch.float64) for name, w in live.items()}
            for w in live.values():
                w.requires_grad_(True)
            try:
                for k, (h, li) in enumerate(zip(saved, inputs)):
                    h = h.detach().requires_grad_(True)
                    with torch.enable_grad():
                        out = layer(h, **li.kwargs_for(layer))
                        out = out[0] if isinstance(out, tuple) else out
                        got = torch.autograd.grad(out, [h, *live.values()], grads[k])
                    grads[k] = got[0]
                    for name, g in zip(live, got[1:]):
                        rows[name] += g.to(torch.float64).pow(2).sum(1).cpu()
            finally:
                for w in live.values():
                    w.requires_grad_(False)
        Path(spill(i)).unlink(missing_ok=True)
        for name, f in rows.items():
            if not torch.isfinite(f).all():
                raise CalibrationError(f"{name}: Fisher information contains NaN or Inf")
        fisher.update(rows)
    return fisher


class LayerSource:
    """What the whole-model stages (:func:`collect_fisher`, soco's training) need from the load
    stage: layers and the outer modules, onloaded for the duration of a ``with`` block
    (implemented by the pipeline over :class:`~compress.source.Source`, and by :class:`Resident`)."""

    def loaded(self, layers: list[int]) -> Any:
        raise NotImplementedError

    def outer(self) -> Any:
        raise NotImplementedError


class Resident(LayerSource):
    """A model held whole in memory: nothing to onload."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model, self.spec = model, spec

    @contextmanager
    def loaded(self, layers: list[int]) -> Iterator[list[nn.Module]]:
        mods = decoder_layers(self.model, self.spec)
        yield [mods[i] for i in layers]

    @contextmanager
    def outer(self) -> Iterator[None]:
        yield
