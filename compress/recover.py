"""Recovery: a group's kept factors trained to reproduce the dense group (local distillation).

Truncation leaves every low-rank layer at the optimum of its own reconstruction objective, but
not of the model's: each layer's error feeds the next. Recovery trains what the checkpoint stores
for the group (``U``, ``V``, shared bases and the matrices kept dense; biases and norms frozen) so
that the compressed group, run on the *compressed* model's activations at its input, reproduces
the *dense* group's outputs on the dense activations. Because the input is what the compressed
model really sees, every group also learns to undo the error of the groups before it.

Training happens one group at a time, so its memory is bounded like the rest of the compressor
(one group onloaded, one group's activations and gradients). The ranks and shapes never change:
the checkpoint layout is the same as without recovery.

The loss is the mean, over tokens, of the relative squared error ``‖y − t‖² / ‖t‖²`` of the
group's output hidden state: scale-free (hidden states grow with depth) and per token, as the
final RMS norm sees them. The last group's output feeds nothing but the head, so with
``last_loss="kl"`` it is trained on the model's own objective instead: the KL divergence from the
dense model's next-token distribution (its top ``topk`` tokens and one bucket for the rest,
:func:`compress.soco.topk_kl`), through the model's final norm and head, at every ``kl_stride``-th
position (the head's product with the whole vocabulary can cost more than the group itself; every
position still runs through the group). The head's logits are computed a slice of positions at a
time and recomputed in the backward pass (:func:`sliced_kl`), so a large vocabulary does not make
the KL's memory grow with the positions per batch. With ``kl_groups`` K > 1 the last K groups are trained on
that KL, each through the *dense* layers after it (the compressed ones are not made yet when the
group trains): a hidden-state error then costs what the rest of the model makes of it, not its
norm. Memory stays bounded by K groups; the K-th last group's time grows with the layers after it.

The calibration batches are split once: the last ``holdout`` share is never trained on, and the
held-out loss decides early stopping and which state is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soco_serve.hf import lowrank_modules, swapped
from soco_serve.layout import LinearEntry, basis_name, u_name, v_name, weight_name

from .calibrate import LayerInput, forward_layer, position_slices, positions_per_slice
from .factors import Decomposition
from .soco import topk_kl, topk_logp


@dataclass
class RecoverConfig:
    """Settings of the recovery stage (``--recover-*``); the defaults are docs/results.md's (Recovery)."""

    steps: int | None = None  # optimizer steps per group (one calibration batch each); 0 = off; None = auto
    lr: float = 1e-2  # AdamW learning rate (cosine decay to zero over ``steps``), per tensor as ``lr_scale`` says
    lr_scale: str = "rms"  # rms: each tensor's rate is lr × its RMS at the start (see step_sizes); none: lr itself
    holdout: float = 0.125  # share of the calibration batches held out for validation
    check_every: int = 10  # steps between two validations
    patience: int = 3  # validations without improvement before stopping early
    last_loss: str = "kl"  # the last group's loss: hidden (its output, like every group) or kl (the next-token distribution)
    topk: int = 128  # teacher tokens kept per position for last_loss="kl"
    kl_stride: int = 1  # last_loss="kl" at every kl_stride-th position (the head's vocabulary-wide product is its cost)
    warmup: int = 0  # steps of linear warm-up before the cosine decay, in every group (see lr_factor)
    kl_groups: int = 1  # with last_loss="kl": how many of the last groups are trained on the KL (through the dense layers after them)
    kl_steps: int | None = None  # with last_loss="kl": the KL groups' own steps (None: ``steps``); each costs a head pass

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "RecoverConfig":
        """The settings a report recorded (``report.json``'s ``settings.recover``). A field it lacks was
        added after that run: the run had the behaviour the field's :data:`LEGACY` value names."""
        return cls(**{**LEGACY, **settings})

    def check(self) -> None:
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"--recover-steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"--recover-lr must be > 0, got {self.lr}")
        if self.lr_scale not in LR_SCALES:
            raise ValueError(f"--recover-lr-scale must be one of {', '.join(LR_SCALES)}, got {self.lr_scale!r}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"--recover-holdout must be between 0 and 1, got {self.holdout}")
        if self.last_loss not in LAST_LOSSES:
            raise ValueError(f"--recover-last-loss must be one of {', '.join(LAST_LOSSES)}, got {self.last_loss!r}")
        if self.warmup < 0:
            raise ValueError(f"--recover-warmup must be >= 0, got {self.warmup}")
        if self.kl_groups < 1:
            raise ValueError(f"--recover-kl-groups must be >= 1, got {self.kl_groups}")
        if self.kl_steps is not None and self.kl_steps < 1:
            raise ValueError(f"--recover-kl-steps must be >= 1, got {self.kl_steps}")
        if self.topk < 1 or self.kl_stride < 1:
            raise ValueError(f"recovery topk and --recover-kl-stride must be >= 1, got {self.topk} and {self.kl_stride}")
        if self.check_every < 1 or self.patience < 1:
            raise ValueError("recovery check_every and patience must be >= 1")


LR_SCALES = ("rms", "none")
LAST_LOSSES = ("hidden", "kl")
LEGACY = {"last_loss": "hidden", "kl_stride": 1, "warmup": 0, "kl_groups": 1, "kl_steps": None}  # what runs from before a field existed did (RecoverConfig.from_settings)
DEFAULT_STEPS = 32  # what "auto" means where recovery applies (docs/results.md, Recovery)


class RecoveryError(ValueError):
    """Recovery cannot run on this calibration set."""


def split_holdout(n_batches: int, holdout: float) -> tuple[list[int], list[int]]:
    """Training and validation batch indices: the last ``ceil(holdout·n)`` batches (at least one)
    are held out, and at least one batch is left to train on."""
    if n_batches < 2:
        raise RecoveryError(f"recovery needs at least 2 calibration batches (one held out), got {n_batches}; "
                            "raise --calib-windows, lower --batch-size, or turn recovery off with --recover-steps 0")
    n_val = min(max(1, math.ceil(holdout * n_batches)), n_batches - 1)
    return list(range(n_batches - n_val)), list(range(n_batches - n_val, n_batches))


def relative_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``‖y − t‖² / ‖t‖²`` (the last dimension is the hidden state)."""
    dtype = torch.promote_types(y.dtype, torch.float32)
    y, target = y.to(dtype), target.to(dtype)
    num = (y - target).pow(2).sum(-1)
    den = target.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return (num / den).mean()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning rate's factor at optimizer step ``step`` (0-based) of ``steps``: a linear ramp
    over the first ``warmup`` steps, then the cosine decay from 1 to 0 over the rest. Adam's first
    updates are about ``lr`` in size whatever the gradient, so a loss whose first gradients point
    somewhere the later ones do not can be driven up before it falls; the ramp keeps those steps
    small."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def step_sizes(params: Sequence[torch.Tensor], lr: float, scale: str) -> list[float]:
    """Each tensor's learning rate: ``lr`` times its RMS with ``scale="rms"``, ``lr`` with ``"none"``.

    Adam moves every element by about its learning rate per step, whatever the gradient's scale,
    so one absolute rate is a different relative change on every tensor and every model: a whitened
    ``V`` has small entries where the input dimension is large, and a rate that trains one model's
    ``V`` gently rewrites another's in ten steps. Scaled by the tensor's RMS, a step changes every
    tensor by about the same fraction (Adafactor's relative step size). A tensor of zeros keeps a
    zero rate: it has no scale to be relative to.
    """
    if scale == "none":
        return [lr] * len(params)
    return [lr * float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else lr for p in params]


@dataclass
class RecoveryLog:
    """What one group's recovery did (recorded per group in the report)."""

    loss: str = "hidden"  # what val_* measure: hidden (relative error of the output) or kl (next-token top-k KL)
    steps: int = 0  # optimizer steps taken
    best_step: int = 0  # the step whose state was kept (0: the truncation itself)
    val_before: float = float("nan")  # held-out loss of the truncated factors
    val_after: float = float("nan")  # held-out loss of the kept state
    train_first: float = float("nan")
    train_last: float = float("nan")
    stopped: str = "budget"  # budget | early (held-out loss stopped improving) | nonfinite | diverged
    seconds: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def distill(params: Sequence[nn.Parameter], loss: Callable[[int], torch.Tensor], n_batches: int,
            cfg: RecoverConfig, seed: int = 0, on_check: Callable[[int, float], None] | None = None) -> RecoveryLog:
    """Train ``params`` in place to lower ``loss(b)`` on the training batches (``b`` indexes the
    ``n_batches`` batches; :func:`split_holdout` keeps some apart); returns with the best held-out
    state restored. ``on_check(step, held-out loss)`` is called after every validation.

    Stops early when ``patience`` validations in a row do not improve on the best, and at once
    when a training or held-out loss is not finite or the held-out loss exceeds four times its
    starting value (diverged): the best state so far is kept either way, and ``stopped`` says why.
    """
    t0 = time.perf_counter()
    train, val = split_holdout(n_batches, cfg.holdout)
    log = RecoveryLog()

    def validate() -> float:
        with torch.no_grad():
            return float(sum(loss(b) for b in val) / len(val))

    log.val_before = best = validate()
    log.curve.append((0, best))
    if on_check is not None:
        on_check(0, best)
    saved = [p.detach().clone() for p in params]
    if not math.isfinite(best):
        log.stopped, log.val_after = "nonfinite", best
        log.seconds = round(time.perf_counter() - t0, 2)
        return log
    for p in params:
        p.requires_grad_(True)
    rates = step_sizes(params, cfg.lr, cfg.lr_scale)
    opt = torch.optim.AdamW([{"params": [p], "lr": r} for p, r in zip(params, rates)], lr=cfg.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    order = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    stale = 0
    try:
        for step in range(1, cfg.steps + 1):
            if not perm:
                perm = [train[i] for i in torch.randperm(len(train), generator=order).tolist()]
            b = perm.pop()
            with torch.enable_grad():
                value = loss(b)
            if not torch.isfinite(value):
                log.stopped = "nonfinite"
                break
            opt.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            log.steps = step
            log.train_last = float(value.detach())
            if step == 1:
                log.train_first = log.train_last
            if step % cfg.check_every and step != cfg.steps:
                continue
            v = validate()
            log.curve.append((step, v))
            if on_check is not None:
                on_check(step, v)
            if not math.isfinite(v):
                log.stopped = "nonfinite"
                break
            if v > 4 * log.val_before:
                log.stopped = "diverged"
                break
            if v < best:
                best, stale, log.best_step = v, 0, step
                for s, p in zip(saved, params):
                    s.copy_(p.detach())
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.stopped = "early"
                    break
    finally:
        with torch.no_grad():
            for s, p in zip(saved, params):
                p.copy_(s)
                p.requires_grad_(False)
    log.val_after = best
    log.seconds = round(time.perf_counter() - t0, 2)
    return log


def trainable(linears: Mapping[str, LinearEntry], mods: Mapping[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Checkpoint tensor name -> the module parameter that holds it, for everything recovery trains
    (a shared basis once, however many layers read it; biases are left out)."""
    out: dict[str, nn.Parameter] = {}
    for name, e in linears.items():
        m = mods[name]
        if e.kind == "dense":
            out[weight_name(name)] = m.weight  # type: ignore[assignment]
            continue
        out[u_name(name)] = m.u  # type: ignore[assignment]
        out[basis_name(e.basis) if e.kind == "shared" else v_name(name)] = m.v  # type: ignore[arg-type,assignment]
    return out


@dataclass
class KLHead:
    """What a group trained on the KL runs after its output, in two parts because only the second
    is position by position (and so can be sliced, :func:`sliced_kl`)."""

    rest: Callable[[int, torch.Tensor], torch.Tensor]  # batch, group output -> what the head reads, at the positions the KL counts
    logits: Callable[[int, slice, torch.Tensor], torch.Tensor]  # batch, slice of those positions, their hidden states -> logits
    vocab: int

    def positions_per_slice(self, batch: int) -> int:
        return positions_per_slice(batch, self.vocab)


def sliced_kl(logits: Callable[[slice, torch.Tensor], torch.Tensor], h: torch.Tensor, t_logp: torch.Tensor,
              t_idx: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`compress.soco.topk_kl` of ``logits(positions, h[:, positions])`` over all of ``h``'s
    positions (dim 1), ``size`` positions at a time. A vocabulary-wide tensor per position is the
    KL's largest buffer (a 128K vocabulary at 2,048 positions is 1 GB of float32 per tensor, and the
    backward pass keeps several), so each slice's logits are recomputed in the backward pass
    (activation checkpointing) and only one slice's are alive at a time. Equal to the one-piece KL
    up to round-off; in one piece (no recomputation) when ``size`` covers every position."""
    n = h.shape[1]
    if size >= n:
        return topk_kl(logits(slice(None), h), t_logp, t_idx)
    total = h.new_zeros((), dtype=torch.float32 if h.dtype != torch.float64 else h.dtype)
    for sl in position_slices(n, size):

        def part(x: torch.Tensor, sl: slice = sl) -> torch.Tensor:
            return topk_kl(logits(sl, x), t_logp[:, sl], t_idx[:, sl])

        total = total + checkpoint(part, h[:, sl], use_reentrant=False) * (sl.stop - sl.start)
    return total / n


def sliced_topk_logp(logits: Callable[[slice, torch.Tensor], torch.Tensor], h: torch.Tensor, k: int,
                     size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher side of :func:`sliced_kl`: :func:`compress.soco.topk_logp` ``size`` positions at a time."""
    parts = [topk_logp(logits(sl, h[:, sl]), k) for sl in position_slices(h.shape[1], size)]
    return torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)


def recover_group(model: nn.Module, layers: Sequence[nn.Module], dec: Decomposition, compute_dtype: torch.dtype,
                  inputs: list[LayerInput], targets: list[torch.Tensor], cfg: RecoverConfig, seed: int,
                  head: KLHead | None = None) -> tuple[RecoveryLog, list[LayerInput]]:
    """Distill the group's tensors in ``dec`` (updated in place, same dtypes and shapes) so that the
    compressed ``layers`` on ``inputs`` (the compressed model's activations) reproduce ``targets``
    (the dense group's outputs); returns the log and the recovered group's outputs.

    With ``head`` (through the layers after the group, if any, and the head) the group matches the
    next-token distribution that ``targets`` give through it instead."""
    mods = lowrank_modules(dec.linears, dec.bases, lambda n: dec.tensors[n].clone(), compute_dtype)
    params = trainable(dec.linears, mods)

    def run(b: int) -> torch.Tensor:
        h = inputs[b]
        for layer in layers:
            h = forward_layer(layer, h)
        return h.hidden

    def hidden_loss(b: int) -> torch.Tensor:
        return relative_error(run(b), targets[b].to(inputs[b].hidden.device))

    loss = hidden_loss
    if head is not None:
        kl_head = head  # narrowed for the closures
        size = [kl_head.positions_per_slice(x.hidden.shape[0]) for x in inputs]
        with torch.no_grad():
            teacher = [sliced_topk_logp(partial(kl_head.logits, b), kl_head.rest(b, t.to(inputs[b].hidden.device)),
                                        cfg.topk, size[b]) for b, t in enumerate(targets)]

        def loss(b: int) -> torch.Tensor:
            return sliced_kl(partial(kl_head.logits, b), kl_head.rest(b, run(b)), *teacher[b], size[b])

    with swapped(model, mods):
        log = distill(list(params.values()), loss, len(inputs), cfg, seed)
        log.loss = "hidden" if head is None else "kl"
        with torch.no_grad():
            outputs = [LayerInput(run(b), x.kwargs) for b, x in enumerate(inputs)]
    for name, p in params.items():
        dec.tensors[name] = p.detach().to(dec.tensors[name].dtype)
    return log, outputs
