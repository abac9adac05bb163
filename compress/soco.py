"""SoCo: learn which singular components to keep (arXiv 2502.15092), on private or shared bases.

Every decoder linear starts from its whitened SVD (the svd-llm decomposition, all components):
``W = Σ_i σ_i u_i (v_iᵀ S⁻¹)``. Each component gets a learnable score ``s_i ≥ 0`` (init 1):
``W' = U · diag(σ ⊙ s) · Vᵀ S⁻¹``, computed as ``y = ((x (Vᵀ S⁻¹)ᵀ) ⊙ (σ ⊙ s)) Uᵀ``; nothing else
is trained. With ``--group-size N`` (soco on Basis Sharing) the unit is a group of N adjacent
layers: the SVD of their stacked weights gives one basis shared by the group, and every layer
has its own scores on the shared components (its own ``diag(s_j)`` on its coefficients).

**Blocks and exact storage.** A block is what pays for a component: a private matrix
``[out, in]`` or a shared group (stacked ``[n·out, in]``). Keeping ``k`` components of a block
stores ``k·(in + n·out)`` numbers (the basis once plus every layer's coefficient columns: a layer
that does not use a kept component stores a zero column; storing the basis pruned to the union of
the layers' components is what makes this layout-v1 compatible). Above the block's break-even rank
(:func:`allocate.breakeven_rank` of ``[n·out, in]``) its layers are stored dense (``n·in·out``)
unless ``--force-factorize``; at least one component is always kept (layout ranks are ≥ 1).
:meth:`Block.stored` is that rule, and :func:`stored_params` sums it; it equals
``Manifest.stored_linear_params()`` of the checkpoint that :func:`fold` produces (tested).

**Losses** (the penalties are scaled by ``ḡ``, a running RMS of the distillation gradient on the
scores, floored at 1e-6 nats per unit score, so their weights are unit-free):

* distillation: ``KL(p_dense ‖ p_scored)`` per token, on the teacher's top-k tokens plus one "rest"
  bucket (:func:`topk_kl`: the exact KL of the coarsened distributions, zero iff they agree);
* compression (stages 1-2): ``κ·ḡ·N·max(0, B(s) − B_target)``, ``B`` the stored fraction of the
  dense linear parameters and ``N = P_dense / mean component cost``. Its gradient comes from a soft
  count of the components in use, ``u_ε(s) = min(1, (1+ε)s/(s+ε))`` per component (exact at
  ``s = 0`` and ``s ≥ 1``, concave: small scores are pushed harder than large ones), times the
  component's parameter cost, without the dense cap (straight-through), so a block above break-even
  still feels the pressure that takes it below. Its value is that soft count in stage 1 (smooth
  from the start, when no score is zero yet) and the exact stored count in stage 2. ``κ`` is a dual
  variable: ``log κ`` moves by ``dual_rate`` per step (proportionally within ±0.5 pp) towards the
  budget;
* sparsity (stage 3): ``ν·ḡ·Σ_{i pruned} ĉ_i s_i``, the cost-weighted L1 norm of the scores that
  the global threshold puts outside the budget (``ĉ`` relative parameter cost): it drives exactly
  those scores to zero. Every Adam step is followed by the projection ``s ← max(s, 0)``, which is
  what makes scores exactly zero; a zero score can leave zero when the distillation gradient pulls
  harder than the penalties (pruned components come back).

**Stages** (one run, coarse to fine; each switch and its reason is logged with the stage's
distillation loss, ratio and time):

1. coarse compression: the budget target ramps linearly from the start (all components) to the
   target plus ``margin`` over ``stage1·steps`` steps; learning rate ``lr``. Ends at the first step
   after the ramp where the soft budget is within 0.5 pp of that, or at twice the ramp length;
2. refinement, the paper's alternating stage (learning rate ``fine_lr·lr``): the hinge on the exact
   count switches compression on while over budget and off while under, so steps alternate between
   pruning and pure distillation, which lets pruned components come back; the budget stays
   ``margin`` (default 2 % of the dense linear parameters) above the target. Ends when the last
   ``stage3·steps`` steps begin;
3. decisive sparsification: the budget is enforced exactly. Every step the global threshold (below)
   at the target splits the components; the pruned ones are switched off in the forward pass (their
   scores still get the distillation gradient, straight through, so one that gains importance
   re-enters) and the sparsity term drives their scores to exactly zero. The model trained in this
   stage is the checkpoint, so every score ends at zero or inside the budget.

**No step prunes past the budget** (:func:`hold_floor`). Adam moves every score under the
compression term by about its step size, so scores that started level reach zero together and
one step of a short, fast schedule can prune far below the budget; the run then ends with
zero-score components kept to fill it (``kept_zero``), i.e. more compressed than asked. After
each step, if the exact count is below the stage's floor (stages 1-2: their budget less 0.5 pp;
stage 3: what its threshold keeps), the components this step zeroed get their scores back, best
first, until it is not, and their first moments are cleared. The log counts them (``given_back``).

**Budget by projection** (the default; ``--soco-budget penalty`` is the paper's term above;
:func:`project_budget`). The penalty has a
cost that the overshoot does not explain: while it is on, Adam lowers every score by about its
step size, so the whole model shrinks towards zero before any component is removed, and a short
schedule has no steps left to undo that. With a projection instead, stages 1-2 have no compression
term: after each step the components below the global threshold (:func:`threshold_mask`) of a
budget that ramps from dense to the target over stage 1 are set to zero, and the kept scores are
trained by the distillation alone. No margin is needed (the count is exact); stage 3 is unchanged.
It won at both schedules measured (docs/results.md, "soco at a short schedule").

**Prior.** The spectrum's own ordering is kept as a prior: each component has
``p_i = (σ_i / rms σ of its block)^α`` (``--soco-prior``, α = 1; 0 turns it off). Components are
ranked by ``score·p`` and the compression gradient on a score is divided by ``p``, so untrained
(all-ones) scores already rank like a global, scale-free svd-llm truncation, and a short run only
has to learn the corrections. (Without it, Adam moves every score at the same speed and a short run
loses the SVD's ordering: on the tiny test model 30 steps then ended worse than svd-llm.)

**Pruning.** Components are ordered globally by ``score·p`` (a shared component by the largest
score of its layers; ties by σ). One global threshold — the shortest prefix of that order — is
chosen so that the exact stored count meets the target, and every zero score is pruned too unless
that alone would overshoot the target by more than 0.5 pp (then zero-score components are kept as
needed and the count reported as ``kept_zero``). One component at a time, so the achieved ratio
lands within about 0.01 pp above the target. Several ratios from one run (``--ratio 0.3,0.4,0.5``)
train towards the smallest and prune the same scores further for the others. On shared bases
this is also the stable way to a high ratio: trained directly towards 0.5, soco on shared bases
ends far worse than trained towards 0.2 and pruned to 0.5 (docs/results.md,
``benchmarks/results/quality_soco*.json``).

**Folding.** Kept components keep their learned scores: ``U·√(σs)``, ``√(σs)·Vᵀ S⁻¹`` (private),
``σ·Vᵀ S⁻¹`` as the basis and ``U_j·diag(s_j)`` as layer ``j``'s coefficients (shared), and a dense
block stores ``Σ_{s_i > 0} σ_i s_i u_i v_iᵀ S⁻¹``. The result is an ordinary
:class:`~compress.factors.Decomposition`, so writing, loaders and serving need no change.

**Memory: one group of layers, whatever the depth.** Nothing holds the whole model. The spectra
are taken a group at a time from the dense calibration activations and each group's blocks are
written to the work folder (:func:`save_blocks`); between uses a block keeps only its scores,
``σ`` and prior in memory (the budget and the threshold need no more). The dense teacher runs once
over the training windows, a group at a time, and only its top-k log-probabilities are kept
(``k = 128``: 260 KB per 256-token window instead of the whole vocabulary's logits). A training
step (:class:`Stack`) walks the groups forward without a graph, keeping only each group's input,
then from the head down onloads each group again (dense weights and factors), recomputes it with
gradients and passes the gradient of its input to the group below: the whole model's gradient
(tested) for one extra forward pass and two onloads per group and step. Rereading every layer
twice a step is the price of that bound, so where the model and its factors fit in half of the
available memory (``--soco-offload auto``, the default; ``on`` and ``off`` force either way) the
stack holds them for the whole training instead (:meth:`Stack.held`) and takes each step in one
autograd pass through the whole model: the same gradient and the same checkpoint (tested). The group loop then folds each group at the global threshold, so evaluation,
recovery and resume work as for every method.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from soco_serve.layout import BasisEntry, LinearEntry, basis_name, bias_name, u_name, v_name, weight_name

from . import allocate, calibrate, decompose, models
from .factors import Decomposition

F64 = torch.float64
WITHIN = 0.005  # the achieved ratio must be within 0.5 percentage points of the target
G_FLOOR = 1e-6  # smallest ḡ used to scale the penalties


class SocoError(ValueError):
    """SoCo cannot run on this input (unreachable target, no calibration text, …)."""


@dataclass
class SocoConfig:
    """Training settings.

    The defaults are sized for SmolLM2-135M on 2 CPU cores: 16 steps of one 256-token window
    (4 K training tokens, a quarter of the calibration windows seen once), after which the recovery
    stage (:mod:`compress.recover`) distills the kept factors. The shorter the training, the closer
    each group stays to its own truncation optimum, which is what the local recovery starts from:
    with recovery, 16 steps beat 32, 32 beat 64, and all beat far longer training, which recovery
    then makes worse (docs/results.md, "soco's schedule and recovery"); without recovery the longer
    trainings are the better ones. One step costs a forward
    pass without a graph, a recomputed forward pass with one, and the backward pass (see the
    module docstring); the report's ``soco.seconds`` says what a run took. On a GPU, closer to the
    paper's scale:
    ``--device cuda --calib-windows 256 --seq-len 2048
    --soco-seq-len 1024 --soco-batch-size 4 --soco-steps 2000 --soco-lr 0.02``.
    """

    steps: int = 16
    lr: float = 0.05
    seq_len: int = 256  # training windows: the calibration windows cut to this length
    batch_size: int = 1  # training windows per step
    topk: int = 128  # teacher log-probabilities kept per token
    stage1: float = 0.3  # share of steps over which stage 1 ramps the budget down
    stage3: float = 0.25  # share of steps of stage 3
    sparsity: float = 1.0  # ν: weight of the sparsity regulariser in stage 3 (reached halfway)
    init: str = "full"  # "full": every component; "breakeven": each block's break-even rank
    prior: float = 1.0  # α: rank and push components by score·(σ/rms σ of the block)^α; 0 = scores alone
    kappa0: float = 1.0  # initial compression weight (relative to ḡ)
    dual_rate: float = 0.05  # log κ step per training step
    eps: float = 0.1  # soft count's ε (stages 1 and 2)
    margin: float = 0.02  # stages 1-2 aim this fraction of the dense linear parameters above the budget
    budget: str = "projection"  # "projection": prune the lowest keys each step; "penalty": the paper's compression term
    fine_lr: float = 0.5  # learning rate factor of stages 2 and 3
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise SocoError(f"--soco-steps must be ≥ 0, got {self.steps}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise SocoError(f"--soco-lr must be positive, got {self.lr}")
        if self.seq_len < 2 or self.batch_size < 1 or self.topk < 1:
            raise SocoError("--soco-seq-len must be ≥ 2, --soco-batch-size and --soco-topk ≥ 1")
        if not (0 <= self.stage1 and 0 <= self.stage3 and self.stage1 + self.stage3 <= 1):
            raise SocoError(f"stage shares must be ≥ 0 and sum to ≤ 1, got stage1={self.stage1}, stage3={self.stage3}")
        if self.init not in ("full", "breakeven"):
            raise SocoError(f"--soco-init must be 'full' or 'breakeven', got {self.init!r}")
        if self.budget not in ("penalty", "projection"):
            raise SocoError(f"--soco-budget must be 'penalty' or 'projection', got {self.budget!r}")


# ---------------------------------------------------------------------------------------------
# Blocks: the components of one private matrix or one shared group
# ---------------------------------------------------------------------------------------------


@dataclass
class Block:
    refs: list[models.LinearRef]  # one (private) or the group's layers (shared)
    basis_id: str | None  # shared groups only
    sigma: torch.Tensor  # [R]
    v: torch.Tensor  # [R, in]: rows of Vᵀ S⁻¹
    us: list[torch.Tensor]  # per layer [out, R]
    scores: torch.Tensor  # [n, R], requires grad
    mask: torch.Tensor | None = None  # [R] components inside the budget (stage 3 only)
    prior: torch.Tensor | None = None  # [R] (σ_i / rms σ of the block)^α: the spectrum's own ordering

    @property
    def n(self) -> int:
        return len(self.refs)

    @property
    def rank(self) -> int:
        return self.sigma.numel()

    @property
    def in_features(self) -> int:
        return self.v.shape[1]

    @property
    def out_features(self) -> int:
        return self.us[0].shape[0]

    @property
    def cost(self) -> int:
        """Stored numbers per kept component."""
        return self.in_features + self.n * self.out_features

    @property
    def dense(self) -> int:
        return self.n * self.in_features * self.out_features

    @property
    def breakeven(self) -> int:
        return allocate.breakeven_rank(self.in_features, self.n * self.out_features)

    def stored(self, kept: int, force_factorize: bool = False) -> int:
        """What the writer stores for this block when ``kept`` components survive."""
        kept = max(1, kept)
        if not force_factorize and kept > self.breakeven:
            return self.dense
        return kept * self.cost

    def score(self) -> torch.Tensor:
        """Per component: the score, or a shared component's largest layer score (0 = unused)."""
        return self.scores[0] if self.n == 1 else self.scores.max(0).values

    def key(self) -> torch.Tensor:
        """Global ranking key: the score times the prior (the relative singular value)."""
        return self.score() if self.prior is None else self.score() * self.prior


class ScoredLinear(nn.Module):
    """``y = ((x Vᵀ) ⊙ (σ ⊙ s_j)) U_jᵀ + b``; only ``s`` is trained."""

    def __init__(self, block: Block, j: int, bias: torch.Tensor | None):
        super().__init__()
        self._block = [block]  # not registered: model.parameters() stays the dense model's
        self.j, self.bias = j, bias
        self.in_features, self.out_features = block.in_features, block.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._block[0]
        s = b.scores[self.j]
        if b.mask is not None:  # stage 3: pruned components off, gradient straight through
            s = s + (s * b.mask - s).detach()
        h = F.linear(x, b.v) * (b.sigma * s)
        return F.linear(h, b.us[self.j], self.bias)


def build_blocks(refs: list[models.LinearRef], grams: calibrate.GramSet, *, group_size: int = 1,
                 shared_kinds: tuple[str, ...] = (), init: str = "full", dtype: torch.dtype | None = None,
                 progress: bool = True, prior_power: float = 1.0) -> tuple[list[Block], dict[str, float]]:
    """Whitened spectra of every block, all components (or the break-even rank with
    ``init="breakeven"``), scores at 1. Returns the blocks and the whitening ridges used."""
    whitenings = decompose.Whitenings()
    dtype = dtype or refs[0].module.weight.dtype
    blocks = []
    for members, bid in tqdm(units(refs, group_size, shared_kinds), desc="soco spectra", unit="block",
                             disable=not progress):
        if bid is None:
            r = members[0]
            u, sigma, v = decompose.whitened_spectrum(r.module.weight.detach(), whitenings.get(r.site_key, grams[r.site_key]))
            us = [u]
        else:
            site = (tuple(m.layer for m in members), members[0].spec.site)
            us, sigma, v = decompose.shared_spectrum([m.module.weight.detach() for m in members],
                                                     whitenings.get(site, sum(grams[m.site_key] for m in members)))
        if init == "breakeven":
            keep = max(1, min(sigma.numel(), allocate.breakeven_rank(v.shape[1], len(members) * us[0].shape[0])))
            sigma, v, us = sigma[:keep], v[:keep], [u[:, :keep] for u in us]
        prior = (sigma / sigma.pow(2).mean().sqrt().clamp(min=torch.finfo(F64).tiny)) ** prior_power
        blocks.append(Block(list(members), bid, sigma.to(dtype), v.to(dtype).contiguous(),
                            [u.to(dtype).contiguous() for u in us],
                            torch.ones(len(members), sigma.numel(), dtype=dtype, device=v.device,
                                       requires_grad=True),
                            prior=prior.to(dtype) if prior_power else None))
    order = {r.name: i for i, r in enumerate(refs)}
    blocks.sort(key=lambda b: order[b.refs[0].name])
    return blocks, whitenings.damping


def units(refs: list[models.LinearRef], group_size: int = 1,
          shared_kinds: tuple[str, ...] = ()) -> list[tuple[list[models.LinearRef], str | None]]:
    """The blocks' layers: shared groups (Basis Sharing's grouping, :func:`allocate.plan_ranks`)
    with their basis id, then every private matrix."""
    plan = allocate.plan_ranks(refs, 0.5, group_size=group_size, shared_kinds=shared_kinds, full_rank=True)
    out: list[tuple[list[models.LinearRef], str | None]] = [(g.members, bid) for bid, g in plan.groups.items()]
    by_name = {r.name: r for r in refs}
    return out + [([by_name[n]], None) for n, a in plan.assignments.items() if a.kind != "shared"]


def check_reachable(refs: list[models.LinearRef], ratio: float, group_size: int = 1,
                    shared_kinds: tuple[str, ...] = (), force_factorize: bool = False) -> None:
    """The smallest checkpoint keeps one component per block: refuse targets beyond it (before
    any decomposition)."""
    allocate.check_ratio(ratio)
    floor = dense = 0
    for members, _ in units(refs, group_size, shared_kinds):
        d_in, d_out, n = members[0].module.in_features, members[0].module.out_features, len(members)
        rank1 = d_in + n * d_out
        floor += rank1 if force_factorize or allocate.breakeven_rank(d_in, n * d_out) >= 1 else n * d_in * d_out
        dense += n * d_in * d_out
    if ratio > 1 - floor / dense:
        raise SocoError(
            f"target ratio {ratio} cannot be reached: even one component per matrix stores {floor:,} of "
            f"{dense:,} linear parameters (ratio {1 - floor / dense:.4f} at most)"
        )


class installed:
    """Context manager: the scored layers replace the model's linears; the dense ones come back
    on exit, and the model's own parameters are frozen meanwhile."""

    def __init__(self, model: nn.Module, blocks: list[Block]):
        self.model, self.blocks = model, blocks

    def __enter__(self) -> nn.Module:
        self.grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.grad_flags:
            p.requires_grad_(False)
        for b in self.blocks:
            for j, r in enumerate(b.refs):
                _swap(self.model, r.name, ScoredLinear(b, j, r.module.bias))
        return self.model

    def __exit__(self, *exc: object) -> None:
        for b in self.blocks:
            for r in b.refs:
                _swap(self.model, r.name, r.module)
        for p, flag in self.grad_flags:
            p.requires_grad_(flag)


def _swap(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, mod)


# ---------------------------------------------------------------------------------------------
# The scored model, a group of layers at a time
# ---------------------------------------------------------------------------------------------


class FactorFiles:
    """Every group's blocks' factors (``v``, ``us``) in a file of their own, onloaded for one
    group at a time; between onloads they are meta tensors (shapes only). The scores, ``σ`` and
    the prior stay in memory: they are all the budget and the threshold need."""

    def __init__(self, paths: list[Path], blocks: list[list[Block]], device: torch.device):
        self.paths, self.blocks, self.device = paths, blocks, device

    @contextmanager
    def loaded(self, g: int) -> Iterator[None]:
        from .workdir import load_tensors

        tensors = load_tensors(self.paths[g])[0]
        try:
            for k, b in enumerate(self.blocks[g]):
                b.v = tensors[f"{k}.v"].to(self.device)
                b.us = [tensors[f"{k}.u{j}"].to(self.device) for j in range(b.n)]
            del tensors
            yield
        finally:
            for b in self.blocks[g]:
                b.v = b.v.to("meta")
                b.us = [u.to("meta") for u in b.us]


def save_blocks(path: Path, blocks: list[Block], damping: dict[str, float]) -> None:
    """One group's blocks (factors, spectrum, prior, members) and its whitening ridges, atomically."""
    from .workdir import save_tensors

    tensors: dict[str, torch.Tensor] = {}
    for k, b in enumerate(blocks):
        tensors[f"{k}.v"], tensors[f"{k}.sigma"] = b.v, b.sigma
        tensors.update({f"{k}.u{j}": u for j, u in enumerate(b.us)})
        if b.prior is not None:
            tensors[f"{k}.prior"] = b.prior
    meta = [{"refs": [r.name for r in b.refs], "basis_id": b.basis_id} for b in blocks]
    save_tensors(path, tensors, {"blocks": json.dumps(meta), "damping": json.dumps(damping)})


def load_blocks(path: Path, refs: list[models.LinearRef],
                device: torch.device) -> tuple[list[Block], dict[str, float]]:
    """The blocks :func:`save_blocks` wrote, factors left on the meta device (:class:`FactorFiles`
    onloads them), scores at 1. Only the spectra and priors are read; the factors' shapes come
    from the file's header."""
    from safetensors import safe_open

    def meta_like(f: Any, key: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(f.get_slice(key).get_shape(), dtype=dtype, device="meta")

    by_name = {r.name: r for r in refs}
    blocks = []
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
        for k, m in enumerate(json.loads(meta["blocks"])):
            sigma = f.get_tensor(f"{k}.sigma")
            blocks.append(Block([by_name[n] for n in m["refs"]], m["basis_id"], sigma.to(device),
                                meta_like(f, f"{k}.v", sigma.dtype),
                                [meta_like(f, f"{k}.u{j}", sigma.dtype) for j in range(len(m["refs"]))],
                                torch.ones(len(m["refs"]), sigma.numel(), dtype=sigma.dtype, device=device,
                                           requires_grad=True),
                                prior=f.get_tensor(f"{k}.prior").to(device) if f"{k}.prior" in names else None))
    return blocks, json.loads(meta["damping"])


class Stack:
    """The model as training sees it: its decoder layers in groups, each group onloaded (from a
    :class:`calibrate.LayerSource`) with its blocks swapped in only while it runs, so memory holds
    one group's weights and graph whatever the depth. The gradient of a step reaches the scores
    group by group from the head down, each group recomputed from its saved input: exactly the
    whole model's gradient, for one extra forward pass (tested against the whole model's autograd).
    A stack ``whole`` (every group and factor resident: :meth:`held`) takes that gradient in one
    autograd pass through the whole model instead, since nothing needs to be freed between groups."""

    def __init__(self, layers: calibrate.LayerSource, model: nn.Module, spec: models.ArchSpec,
                 groups: list[range], blocks: list[list[Block]], device: torch.device,
                 factors: FactorFiles | None = None, whole: bool = False):
        self.layers, self.model, self.spec, self.groups = layers, model, spec, groups
        self.blocks, self.device, self.factors, self.whole = blocks, device, factors, whole

    @classmethod
    def resident(cls, model: nn.Module, spec: models.ArchSpec, blocks: list[Block], group_size: int = 1) -> "Stack":
        """A model held whole in memory (tests, small models), in groups of ``group_size`` layers."""
        n = len(models.decoder_layers(model, spec))
        groups = [range(a, min(a + group_size, n)) for a in range(0, n, group_size)]
        per = [[b for b in blocks if b.refs[0].layer in g] for g in groups]
        device = next(model.parameters()).device
        return cls(calibrate.Resident(model, spec), model, spec, groups, per, device)

    def fits(self, share: float = 0.5) -> bool:
        """Whether holding every layer and factor in memory needs less than ``share`` of the memory
        available now (``/proc/meminfo``): then training need not reread them every step."""
        need = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.factors:
            need += sum(p.stat().st_size for p in self.factors.paths)
        try:
            with open("/proc/meminfo") as f:
                avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return False
        return need < share * avail

    @contextmanager
    def held(self) -> Iterator["Stack"]:
        """This stack with every group, its factors and the outer modules onloaded once for the
        duration, its steps taken in one autograd pass: the same gradient without the per-step
        reads and the recomputation, for models that fit in memory."""
        with ExitStack() as stack:
            stack.enter_context(self.layers.outer())
            stack.enter_context(self.layers.loaded([i for g in self.groups for i in g]))
            if self.factors:
                for g in range(len(self.groups)):
                    stack.enter_context(self.factors.loaded(g))
            yield Stack(calibrate.Resident(self.model, self.spec), self.model, self.spec, self.groups, self.blocks,
                        self.device, whole=True)

    @property
    def all_blocks(self) -> list[Block]:
        return [b for g in self.blocks for b in g]

    @contextmanager
    def group(self, g: int, scored: bool = True) -> Iterator[list[nn.Module]]:
        """Group ``g``'s layers onloaded, with the scored linears in place when ``scored``."""
        with self.layers.loaded(list(self.groups[g])) as mods:
            if not scored:
                yield mods
                return
            with (self.factors.loaded(g) if self.factors else nullcontext()), installed(self.model, self.blocks[g]):
                yield mods

    def inputs(self, ids: torch.Tensor) -> calibrate.LayerInput:
        """The first decoder layer's inputs for one batch (the outer modules must be onloaded)."""
        return calibrate.layer_inputs(self.model, self.spec, ids, ids.shape[0])[0]

    def kl_backward(self, ids: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor,
                    kl_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The distillation loss of one batch, its gradient accumulated into the scores' ``.grad``
        (not when the loss is not finite). The outer modules must be onloaded."""
        if self.whole:
            return self._kl_backward_whole(ids, t_logp, t_idx, kl_fn)
        x = self.inputs(ids)
        starts = []
        with torch.no_grad():
            for g in range(len(self.groups)):
                starts.append(x.hidden)
                with self.group(g) as mods:
                    for m in mods:
                        x = calibrate.forward_layer(m, x)
        h = x.hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            kl = kl_fn(calibrate.head_logits(self.model, self.spec, ids, h), t_logp, t_idx)
            if not torch.isfinite(kl):
                return kl.detach()
            (grad,) = torch.autograd.grad(kl, h)
        for g in reversed(range(len(self.groups))):
            h = starts[g].detach().requires_grad_(True)
            with self.group(g) as mods, torch.enable_grad():
                y = calibrate.LayerInput(h, x.kwargs)
                for m in mods:
                    y = calibrate.forward_layer(m, y)
                torch.autograd.backward(y.hidden, grad, inputs=[h, *(b.scores for b in self.blocks[g])])
            grad = h.grad
        return kl.detach()

    def _kl_backward_whole(self, ids: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor,
                           kl_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """:meth:`kl_backward` for a stack held whole: one graph through every group (they all stay
        resident, so the graph may span them) and one backward pass, into the scores only."""
        x = self.inputs(ids)
        with installed(self.model, self.all_blocks), torch.enable_grad():
            for g in self.groups:
                with self.layers.loaded(list(g)) as mods:
                    for m in mods:
                        x = calibrate.forward_layer(m, x)
            kl = kl_fn(calibrate.head_logits(self.model, self.spec, ids, x.hidden), t_logp, t_idx)
            if torch.isfinite(kl):
                kl.backward(inputs=[b.scores for b in self.all_blocks])
        return kl.detach()


# ---------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------


def dense_params(blocks: list[Block]) -> int:
    return sum(b.dense for b in blocks)


def stored_params(blocks: list[Block], kept: list[int], force_factorize: bool = False) -> int:
    """Exact stored linear parameters when block ``i`` keeps ``kept[i]`` components."""
    return sum(b.stored(k, force_factorize) for b, k in zip(blocks, kept))


def nonzero_counts(blocks: list[Block]) -> list[int]:
    with torch.no_grad():
        return [int((b.score() > 0).sum()) for b in blocks]


def nonzero_fraction(blocks: list[Block], force_factorize: bool = False) -> float:
    """Stored fraction of the dense linear parameters if every nonzero score were kept."""
    return stored_params(blocks, nonzero_counts(blocks), force_factorize) / dense_params(blocks)


def soft_use(s: torch.Tensor, eps: float) -> torch.Tensor:
    """``u_ε(s) = min(1, (1+ε)s/(s+ε))``: 0 at 0, 1 for s ≥ 1, → [s > 0] as ε → 0."""
    return ((1 + eps) * s / (s + eps)).clamp(max=1.0)


def soft_stored(blocks: list[Block], eps: float, force_factorize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable stored parameters: (capped value with linear straight-through gradient,
    uncapped linear count). Both equal :func:`stored_params` of the nonzero counts when every
    score is 0 or ≥ 1 (the uncapped one only where no block is above break-even)."""
    capped, linear = [], []
    for b in blocks:
        u = soft_use(b.score(), eps)
        if b.prior is not None:  # value: the count; gradient: weighted by 1/prior (weak components pushed harder)
            u = u.detach() + (u - u.detach()) / b.prior.clamp(min=1e-3)
        k = u.sum().clamp(min=1.0)
        lin = k * b.cost
        val = lin if force_factorize else lin.clamp(max=float(b.dense))
        capped.append(lin + (val - lin).detach())
        linear.append(lin)
    return torch.stack(capped).sum(), torch.stack(linear).sum()


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    """The dense model's top-k log-probabilities per token of every training window."""

    logp: torch.Tensor  # [n, T, k]
    idx: torch.Tensor  # [n, T, k] int32


@torch.no_grad()
def teacher_topk(stack: "Stack", windows: torch.Tensor, k: int, batch_size: int = 2,
                 progress: bool = True) -> Teacher:
    """The dense model's top-k log-probabilities of every window: one pass, a group of layers at
    a time over all windows (each group onloaded once), then the head a batch at a time."""
    batches = list(torch.split(windows.to(stack.device), batch_size))
    with stack.layers.outer():
        xs = [stack.inputs(b) for b in batches]
    for g in tqdm(range(len(stack.groups)), desc="soco teacher", unit="group", disable=not progress):
        with stack.group(g, scored=False) as mods:
            for m in mods:
                xs = calibrate.run_layer(m, xs)
    logps, idxs = [], []
    with stack.layers.outer():
        for b, x in zip(batches, xs):
            v, i = topk_logp(calibrate.head_logits(stack.model, stack.spec, b, x.hidden), k)
            logps.append(v.cpu())
            idxs.append(i.cpu())
    return Teacher(torch.cat(logps), torch.cat(idxs))


def topk_logp(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest next-token log-probabilities of ``logits`` (float32 at least) and their token
    ids (int32): the teacher side of :func:`topk_kl`. No gradient."""
    with torch.no_grad():
        lp = torch.log_softmax(logits.float() if logits.dtype != F64 else logits, dim=-1)
        v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return v, i.to(torch.int32)


def topk_kl(logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Mean per-token ``KL(teacher ‖ student)`` over the teacher's top-k tokens plus one bucket for
    the rest of the vocabulary (exact KL of the coarsened distributions; 0 iff they agree there)."""
    if logits.dtype != F64:
        logits = logits.float()
    t_logp = t_logp.to(logits.dtype)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    s_logp = logits.gather(-1, t_idx.long()) - lse
    p_t = t_logp.exp()
    head = (p_t * (t_logp - s_logp)).sum(-1)
    tiny = torch.finfo(logits.dtype).tiny
    tail_t = (1 - p_t.sum(-1)).clamp_min(tiny)
    tail_s = (1 - s_logp.exp().sum(-1)).clamp_min(tiny)
    return (head + tail_t * (tail_t.log() - tail_s.log())).mean()


def training_windows(calib: torch.Tensor | None, seq_len: int, prefix: tuple[int, ...] = ()) -> torch.Tensor:
    """The calibration windows cut into training windows of ``seq_len`` tokens.

    Every calibration window starts with the tokenizer's ``prefix`` (:func:`compress.data.window_prefix`,
    Gemma's BOS); so does every piece cut from it, because a model trained with a BOS at the start
    of each sequence reads a piece without one as text it never saw (the teacher's distribution
    there is not the one served). The text after the prefix is cut into ``seq_len - len(prefix)``
    tokens per piece; the tail that does not fill a piece is dropped.
    """
    if calib is None or calib.numel() == 0 or calib.shape[0] == 0:
        raise SocoError("soco needs calibration text: the calibration set is empty")
    length = calib.shape[1]
    if min(length, seq_len) < 2:
        raise SocoError(f"calibration windows of {length} tokens are too short to train on")
    if length <= seq_len:
        return calib
    p = len(prefix)
    if p and not bool((calib[:, :p] == torch.tensor(prefix, dtype=calib.dtype)).all()):
        raise SocoError(f"calibration windows do not start with the tokenizer's prefix {list(prefix)}")
    if seq_len - p < 1:
        raise SocoError(f"training windows of {seq_len} tokens leave no text after the tokenizer's prefix {list(prefix)}")
    body = seq_len - p
    pieces = calib[:, p : p + ((length - p) // body) * body].reshape(-1, body)
    return torch.cat([calib[:1, :p].expand(pieces.shape[0], p), pieces], dim=1)


# ---------------------------------------------------------------------------------------------
# Global threshold
# ---------------------------------------------------------------------------------------------


@dataclass
class Pruning:
    keep: list[torch.Tensor]  # bool [R] per block: components stored
    stored: int
    ratio: float
    threshold: float  # largest pruned score (0.0 when only zeros were pruned)
    pruned_nonzero: int  # components with a nonzero score that the threshold pruned
    kept_zero: int  # components with a zero score kept (only when zeros alone would overshoot)


def threshold_mask(blocks: list[Block], ratio: float, force_factorize: bool = False,
                   prune_all_zeros: bool = True) -> Pruning:
    """One global threshold on the scores: the shortest prefix of the global order (score, ties by
    σ; a shared component by its largest layer score) whose removal meets ``ratio`` under the
    exact storage rule. With ``prune_all_zeros`` every zero score is pruned as well, unless that
    alone overshoots the target by more than 0.5 pp (then zeros are kept as needed, reported)."""
    p_dense = dense_params(blocks)
    budget = (1 - ratio) * p_dense
    with torch.no_grad():
        keys = torch.cat([b.key().detach().double().cpu() for b in blocks])
        sig = torch.cat([b.sigma.double().cpu() for b in blocks])
    owner = torch.cat([torch.full((b.rank,), i, dtype=torch.long) for i, b in enumerate(blocks)])
    order = torch.sort(sig, stable=True).indices
    order = order[torch.sort(keys[order], stable=True).indices]
    ranks = torch.tensor([b.rank for b in blocks])

    def stored_after(j: int) -> int:
        kept = ranks - torch.bincount(owner[order[:j]], minlength=len(blocks))
        return stored_params(blocks, kept.tolist(), force_factorize)

    lo, hi = 0, keys.numel()
    if stored_after(hi) > budget:
        raise SocoError(f"target ratio {ratio} is out of reach even with one component per matrix")
    if stored_after(lo) <= budget:
        j = 0
    else:
        while hi - lo > 1:  # invariant: stored_after(lo) > budget >= stored_after(hi)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if stored_after(mid) <= budget else (mid, hi)
        j = hi
    n_zero = int((keys <= 0).sum())
    if prune_all_zeros and n_zero > j and 1 - stored_after(n_zero) / p_dense <= ratio + WITHIN:
        j = n_zero
    stored = stored_after(j)
    pruned = torch.zeros(keys.numel(), dtype=torch.bool)
    pruned[order[:j]] = True
    keep = [k.to(b.sigma.device) for k, b in zip(torch.split(~pruned, ranks.tolist()), blocks)]
    for b, k in zip(blocks, keep):
        if not k.any():  # layout ranks are >= 1: keep the block's best component
            k[int(torch.argmax(b.key().detach()))] = True
    return Pruning(keep, stored, 1 - stored / p_dense, float(keys[order[j - 1]]) if j else 0.0,
                   int((keys[order[:j]] > 0).sum()), int(((keys <= 0) & ~pruned).sum()))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def project_budget(blocks: list[Block], fraction: float, force_factorize: bool = False) -> float:
    """Zero the scores outside the global threshold that stores ``fraction`` of the dense linear
    parameters (:func:`threshold_mask`; nothing above dense). Returns the stored fraction after.

    Why: a penalty on the count moves every score under Adam by about its step size, so the whole
    model shrinks long before a component is removed; pruning the lowest keys leaves the kept
    scores to the distillation alone, which a short schedule can afford."""
    if fraction < 1.0:
        pr = threshold_mask(blocks, 1.0 - fraction, force_factorize)
        with torch.no_grad():
            for b, k in zip(blocks, pr.keep):
                b.scores[:, ~k] = 0.0
    return nonzero_fraction(blocks, force_factorize)


def hold_floor(blocks: list[Block], before: list[torch.Tensor], floor: float,
               force_factorize: bool = False) -> list[torch.Tensor]:
    """Undo one step's pruning where it went below the budget: if the exact stored count is under
    ``floor`` parameters, the components this step took to zero (in use in ``before``, unused now)
    get their ``before`` scores back, highest ``before`` key first (ties by σ), until the count
    is at ``floor`` again; the fewest such components. Scores are updated in place; returns a
    bool ``[R]`` per block of the components given back.

    Why: under the compression term Adam moves every score by about its step size whatever its
    importance, so scores that started level reach zero on the same step, and one step can prune
    far past the budget (kept zero-score components at the end, a model more compressed than the
    ratio asked for). This projection bounds that overshoot to one component."""
    back = [torch.zeros(b.rank, dtype=torch.bool, device=b.scores.device) for b in blocks]
    with torch.no_grad():
        counts = nonzero_counts(blocks)
        stored = stored_params(blocks, counts, force_factorize)
        if stored >= floor:
            return back
        keys, sigmas, owner, index = [], [], [], []
        for i, (b, s0) in enumerate(zip(blocks, before)):
            was = s0.max(0).values if b.n > 1 else s0[0]
            new = torch.nonzero((was > 0) & (b.score() == 0)).flatten()
            if new.numel():
                key = was if b.prior is None else was * b.prior
                keys.append(key[new].double().cpu())
                sigmas.append(b.sigma[new].double().cpu())
                owner.append(torch.full((new.numel(),), i, dtype=torch.long))
                index.append(new.cpu())
        if not keys:
            return back
        key, sig, own, idx = torch.cat(keys), torch.cat(sigmas), torch.cat(owner), torch.cat(index)
        order = torch.sort(sig, descending=True, stable=True).indices
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
        for j in order.tolist():
            i, b = int(own[j]), blocks[int(own[j])]
            stored += b.stored(counts[i] + 1, force_factorize) - b.stored(counts[i], force_factorize)
            counts[i] += 1
            back[i][int(idx[j])] = True
            if stored >= floor:
                break
        for b, s0, m in zip(blocks, before, back):
            if m.any():
                b.scores[:, m] = s0[:, m].to(b.scores.dtype)
    return back


def _scores(blocks: list[Block]) -> list[torch.Tensor]:
    return [b.scores.detach().clone() for b in blocks]


def _restore(blocks: list[Block], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b, s in zip(blocks, saved):
            b.scores.copy_(s)


def train(stack: Stack, windows: torch.Tensor, teacher: Teacher, ratio: float,
          cfg: SocoConfig, force_factorize: bool = False, progress: bool = True,
          kl_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = topk_kl) -> dict[str, Any]:
    """The three-stage score training (module docstring) of ``stack``'s blocks; scores are updated
    in place. Returns the training log. A non-finite loss or score stops training: the last good
    scores are restored and the stop is reported in the log (``stopped``)."""
    blocks = stack.all_blocks
    scores = [b.scores for b in blocks]
    # eps and the floor of ḡ are in nats per unit score: distillation gradients below 1e-8 (numerical
    # noise at the dense point) move nothing; the compression push starts from the dense point anyway
    opt = torch.optim.Adam(scores, lr=cfg.lr, betas=(0.8, 0.95), eps=1e-8)
    p_dense = dense_params(blocks)
    n_comp = sum(b.n * b.rank for b in blocks)
    c_mean = sum(b.cost * b.rank for b in blocks) / sum(b.rank for b in blocks)
    rel_cost = [b.cost / c_mean for b in blocks]
    n_eff = p_dense / c_mean
    target = 1.0 - ratio  # stored fraction
    project = cfg.budget == "projection"
    # penalty: stages 1-2 stay under-compressed by `margin`, stage 3 trims to the target; a projection is exact
    safe = target if project else target + cfg.margin
    steps = cfg.steps
    ramp = max(1, round(cfg.stage1 * steps))
    stage3_start = steps - round(cfg.stage3 * steps)
    device = stack.device
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    with torch.no_grad():
        b_lin0 = float(soft_stored(blocks, cfg.eps, force_factorize)[1]) / p_dense
    log_kappa = math.log(cfg.kappa0) if cfg.kappa0 > 0 and not project else None
    g_ema, kl_ema, kl_val = 0.0, None, None
    stage, t_stage = 1, time.perf_counter()
    ctrl = b_lin0
    start = 1.0 if project else b_lin0  # stage 1's ramp: the exact count starts at dense, the soft one above it
    good = _scores(blocks)
    history: list[dict[str, Any]] = []
    stages: dict[str, dict[str, Any]] = {}
    stopped, cursor, done, given_back = None, 0, 0, 0

    def exact_fraction() -> float:
        return nonzero_fraction(blocks, force_factorize)

    def switch(new: int, step: int, why: str) -> None:
        nonlocal stage, t_stage
        stages[str(stage)].update(end_step=step, seconds=round(time.perf_counter() - t_stage, 1), kl_end=kl_ema,
                                  ratio_end=round(1 - exact_fraction(), 5), ended_because=why)
        stage, t_stage = new, time.perf_counter()
        stages[str(new)] = {"start_step": step, "kl_start": kl_ema}
        for group in opt.param_groups:  # coarse to fine
            group["lr"] = cfg.lr * cfg.fine_lr

    stages["1"] = {"start_step": 0, "kl_start": None}
    bar = tqdm(total=steps, desc="soco train", unit="step", disable=not progress)
    try:
        with stack.layers.outer():
            for step in range(steps):
                # -- stage switching (criteria in the module docstring) ----------------------
                if stage == 1 and step >= stage3_start:
                    switch(3 if stage3_start == step else 2, step, "step budget of stages 1-2 used")
                elif stage == 1 and step >= ramp and ctrl <= safe + WITHIN:
                    switch(2, step, "soft budget reached the target after the ramp")
                elif stage == 1 and step >= 2 * ramp:
                    switch(2, step, "twice the ramp length")
                if stage == 2 and step >= stage3_start:
                    switch(3, step, "stage 3 share of the steps reached")
                if stage == 3:
                    pr = threshold_mask(blocks, ratio, force_factorize, prune_all_zeros=False)
                    for b, k in zip(blocks, pr.keep):
                        b.mask = k.to(b.scores.dtype)
                    nu = cfg.sparsity * min(1.0, 2 * (step - stage3_start + 1) / max(1, steps - stage3_start))
                b_target = max(safe, start + (safe - start) * step / ramp) if stage == 1 else safe

                # -- distillation --------------------------------------------------------------
                if cursor + cfg.batch_size > windows.shape[0]:
                    order, cursor = torch.randperm(windows.shape[0], generator=gen), 0
                pick = order[cursor: cursor + cfg.batch_size]
                cursor += cfg.batch_size
                opt.zero_grad(set_to_none=True)
                kl = stack.kl_backward(windows[pick].to(device), teacher.logp[pick].to(device),
                                       teacher.idx[pick].to(device), kl_fn)
                if not torch.isfinite(kl):
                    stopped = f"non-finite distillation loss at step {step} (stage {stage}); kept the last good scores"
                    break
                kl_val = float(kl.detach())
                kl_ema = kl_val if kl_ema is None else 0.9 * kl_ema + 0.1 * kl_val
                g2 = sum(float((s.grad.double() ** 2).sum()) for s in scores if s.grad is not None)
                g_ema = math.sqrt(g2 / n_comp) if step == 0 else 0.9 * g_ema + 0.1 * math.sqrt(g2 / n_comp)
                g_bar = max(g_ema, G_FLOOR)

                # -- compression (stages 1-2) or sparsity (stage 3) ----------------------------
                reg = None
                if stage < 3 and log_kappa is not None:
                    capped, linear = soft_stored(blocks, cfg.eps, force_factorize)
                    if stage == 1:
                        b_ctrl = linear / p_dense
                    else:  # the exact stored fraction as value, the soft count's gradient
                        b_ctrl = capped / p_dense + (exact_fraction() - capped.detach() / p_dense)
                    reg = math.exp(log_kappa) * g_bar * n_eff * torch.relu(b_ctrl - b_target)
                    ctrl = float(b_ctrl.detach())
                elif stage == 3 and nu > 0:
                    reg = nu * g_bar * sum(rc * (b.scores * (1 - b.mask)).sum() for rc, b in zip(rel_cost, blocks))
                if reg is not None and reg.requires_grad:
                    reg.backward()
                opt.step()
                with torch.no_grad():
                    for s in scores:
                        s.clamp_(min=0.0)
                if project and stage < 3:
                    ctrl = project_budget(blocks, b_target, force_factorize)
                # never prune past the budget in one step: stages 1-2 stay above theirs (the exact count
                # is capped at dense while the ramp starts above it), stage 3 keeps what its threshold keeps
                floor = pr.stored if stage == 3 else (min(b_target, 1.0) - WITHIN) * p_dense
                if stage == 3 or log_kappa is not None or project:
                    back = hold_floor(blocks, good, floor, force_factorize)
                    n_back = sum(int(m.sum()) for m in back)
                    if n_back:
                        given_back += n_back
                        stages[str(stage)]["given_back"] = stages[str(stage)].get("given_back", 0) + n_back
                        for s, m in zip(scores, back):  # their momentum would take them straight back to zero
                            if m.any() and s in opt.state:
                                opt.state[s]["exp_avg"][:, m] = 0.0
                if not all(bool(torch.isfinite(s).all()) for s in scores):
                    stopped = f"non-finite scores after step {step} (stage {stage}); kept the last good scores"
                    break
                good = _scores(blocks)
                done = step + 1
                if stage < 3 and log_kappa is not None and cfg.dual_rate > 0:
                    log_kappa += cfg.dual_rate * max(-1.0, min(1.0, (ctrl - b_target) / WITHIN))
                    log_kappa = max(-25.0, min(25.0, log_kappa))
                ratio_now = 1 - exact_fraction()
                if step % cfg.log_every == 0 or step == steps - 1:
                    allv = torch.cat([s.detach().flatten() for s in scores])
                    history.append(dict(step=step, stage=stage, kl=round(kl_val, 5), ratio_nonzero=round(ratio_now, 5),
                                        kappa=round(math.exp(log_kappa), 4) if log_kappa is not None else 0.0,
                                        zero=round(float((allv == 0).double().mean()), 4),
                                        amplified=round(float((allv > 1).double().mean()), 4), given_back=given_back))
                    given_back = 0
                bar.set_postfix(stage=stage, kl=f"{kl_ema:.4f}", ratio=f"{ratio_now:.3f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()
        for b in blocks:
            b.mask = None
        _restore(blocks, good)  # after a stop: the last good scores; otherwise a no-op
    stages[str(stage)].update(end_step=done, seconds=round(time.perf_counter() - t_stage, 1), kl_end=kl_ema,
                              ratio_end=round(1 - exact_fraction(), 5), ended_because=stopped or "last step")
    allv = torch.cat([b.scores.detach().flatten() for b in blocks])
    nonzero = allv[allv > 0]
    return dict(
        steps_done=done, stopped=stopped, trained_for=ratio, stages=stages, history=history,
        final=dict(ratio_nonzero=round(1 - exact_fraction(), 5), kl=kl_ema,
                   zero=round(float((allv == 0).double().mean()), 4),
                   small_nonzero=int((nonzero < 0.05).sum()),
                   amplified=round(float((allv > 1).double().mean()), 4),
                   max_score=round(float(allv.max()), 3) if allv.numel() else None),
    )


# ---------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------


def fold(blocks: list[Block], keep: list[torch.Tensor], dtype: torch.dtype, force_factorize: bool = False,
         order: list[str] | None = None) -> Decomposition:
    """The checkpoint's linear part: scores folded into the factors (module docstring).
    ``order``: the linears' names in model order (default: block order)."""
    out = Decomposition()
    entries: dict[str, LinearEntry] = {}
    with torch.no_grad():
        for b, k in zip(blocks, keep):
            rank = int(k.sum())
            for r in b.refs:
                if r.module.bias is not None:
                    out.tensors[bias_name(r.name)] = r.module.bias.detach().to(dtype)
            sig = b.sigma.to(F64)
            v = b.v.to(F64)
            scaled = [sig * b.scores[j].detach().to(F64) for j in range(b.n)]  # σ ⊙ s_j
            has_bias = [r.module.bias is not None for r in b.refs]
            if not force_factorize and rank > b.breakeven:
                for j, r in enumerate(b.refs):
                    nz = b.scores[j].detach() > 0
                    w = (b.us[j].to(F64)[:, nz] * scaled[j][nz]) @ v[nz]
                    out.tensors[weight_name(r.name)] = w.to(dtype)
                    entries[r.name] = LinearEntry("dense", b.in_features, b.out_features, bias=has_bias[j])
            elif b.basis_id is None:
                r = b.refs[0]
                root = scaled[0][k].sqrt()
                out.tensors[u_name(r.name)] = (b.us[0].to(F64)[:, k] * root).to(dtype)
                out.tensors[v_name(r.name)] = (root[:, None] * v[k]).to(dtype)
                entries[r.name] = LinearEntry("lowrank", b.in_features, b.out_features, rank, bias=has_bias[0])
            else:
                out.tensors[basis_name(b.basis_id)] = (sig[k, None] * v[k]).to(dtype)
                out.bases[b.basis_id] = BasisEntry(rank, b.in_features, [r.name for r in b.refs])
                for j, r in enumerate(b.refs):
                    s = b.scores[j].detach().to(F64)[k]
                    out.tensors[u_name(r.name)] = (b.us[j].to(F64)[:, k] * s).to(dtype)
                    entries[r.name] = LinearEntry("shared", b.in_features, b.out_features, rank, b.basis_id,
                                                  has_bias[j])
    names = order or [r.name for b in blocks for r in b.refs]
    out.linears = {n: entries[n] for n in names}
    return out


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """What soco's whole-model stage leaves for the group loop: the trained stack (every group's
    blocks, factors on disk), one pruning per target ratio, each group's whitening ridges and the
    training log. The group loop folds one group at a time (:meth:`fold`)."""

    stack: Stack
    prunings: list[Pruning]
    damping: list[dict[str, float]]
    log: dict[str, Any]

    def fold(self, g: int, dtype: torch.dtype, force_factorize: bool, order: list[str]) -> list[Decomposition]:
        """Group ``g``'s checkpoint part for every ratio (its layers must be onloaded: biases)."""
        first = sum(len(b) for b in self.stack.blocks[:g])
        blocks = self.stack.blocks[g]
        outs = []
        with self.stack.factors.loaded(g) if self.stack.factors else nullcontext():
            for pr in self.prunings:
                dec = fold(blocks, pr.keep[first: first + len(blocks)], dtype, force_factorize, order)
                dec.damping.update(self.damping[g])
                if g == 0:  # the run's log travels with the first group
                    dec.log = {**self.log, "prune": dict(ratio=round(pr.ratio, 6), stored=pr.stored,
                                                         threshold=pr.threshold, pruned_nonzero=pr.pruned_nonzero,
                                                         kept_zero=pr.kept_zero)}
                outs.append(dec)
        return outs


def prune(stack: Stack, ratios: list[float], force_factorize: bool = False) -> list[Pruning]:
    """One global threshold per ratio on the trained scores (warning when zero scores are kept)."""
    out = []
    for r in ratios:
        pr = threshold_mask(stack.all_blocks, r, force_factorize)
        if pr.kept_zero:
            print(f"soco: WARNING: ratio {r}: {pr.kept_zero} zero-score components kept to stay within 0.5 pp")
        out.append(pr)
    return out
