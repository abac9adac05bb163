"""Every compression method, one class each, behind one interface; :data:`REGISTRY` names them.

The pipeline (:mod:`compress.pipeline`) streams the model group by group and asks the method
five things: how many adjacent layers form a group, which statistics it needs, whether it has a
stage over the whole model before the group loop (:meth:`Method.prepare`: FWSVD's gradients,
SoCo's score training; onloading a group at a time too), how a group's weights and statistics
become factors (:meth:`Method.decompose`), and whether it refits them on the compressed model's
own activations (:meth:`Method.refine`). Adding a method is one class here and one line in the
registry; nothing else names a method.

Statistics come from the dense model's activations for every method (as in the SVD-LLM, ASVD and
Basis Sharing papers); only a refit (Basis Sharing's coefficient update) reads the compressed
model's activations, which the pipeline carries beside the dense ones for such methods.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from soco_serve.hf import lowrank_modules, swapped
from soco_serve.layout import BasisEntry, LinearEntry, basis_name, bias_name, u_name, v_name, weight_name

from . import allocate, calibrate, decompose, soco
from .factors import Decomposition
from .models import ArchSpec, LinearRef, decoder_layers
from .workdir import load_tensors, save_tensors

if TYPE_CHECKING:
    from .config import CompressConfig


@dataclass
class GroupWork:
    """One group of adjacent decoder layers, as a method sees it."""

    layers: range
    refs: list[LinearRef]  # the group's linears, onloaded (their modules hold the dense weights)
    grams: calibrate.GramSet | None  # the group's input sites, from the dense activations
    prepared: Any  # what the method's whole-model stage returned (None without one)
    cfg: "CompressConfig"
    dtype: torch.dtype  # of the written tensors
    compute_dtype: torch.dtype  # of the onloaded model
    model: nn.Module  # the model skeleton with this group onloaded
    spec: ArchSpec
    partial: Decomposition = field(default_factory=Decomposition)  # what :meth:`Method.early` factored


@dataclass
class ModelWork:
    """The whole model, as a method's whole-model stage (:meth:`Method.prepare`) sees it: layers
    onloaded a group at a time, the dense inputs of the first layer for the calibration windows,
    and the work folder, where the stage caches what a rerun after a kill should not redo."""

    cfg: "CompressConfig"
    layers: calibrate.LayerSource
    model: nn.Module  # the skeleton (meta device) that ``layers`` onloads into
    spec: ArchSpec
    refs: list[LinearRef]
    groups: list[range]
    calib_ids: torch.Tensor  # [windows, seq_len], each starting with ``window_prefix``
    window_prefix: tuple[int, ...]  # the tokens the tokenizer puts before a text (data.window_prefix)
    calib: list[calibrate.LayerInput]  # the first layer's inputs for ``calib_ids``, on ``device``
    device: torch.device
    compute_dtype: torch.dtype
    cache: Callable[[str], Path]  # a file of the work folder, by name
    scratch: Callable[[str], Path]  # a folder of the work folder for temporary files, by name
    note_memory: Callable[[], None]  # call while statistics are alive (the report's peak)
    progress: bool


class Method:
    """The interface; subclasses set the class attributes and implement :meth:`decompose`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_grams: ClassVar[bool] = True  # Gram statistics (and mean |x|) of the dense activations
    whole_model_stage: ClassVar[bool] = False  # has a :meth:`prepare` stage before the group loop
    several_ratios: ClassVar[bool] = False  # one run can write checkpoints at several ratios
    shares_bases: ClassVar[bool] = False  # honours --group-size
    default_group_size: ClassVar[int] = 1
    own_settings: ClassVar[tuple[str, ...]] = ()  # CompressConfig fields that only this method reads

    def group_size(self, cfg: "CompressConfig", n_layers: int) -> int:
        return cfg.group_size if self.shares_bases else 1

    def prepare(self, mw: ModelWork) -> Any:
        """The whole-model stage (only when :attr:`whole_model_stage`); its result reaches every
        group as :attr:`GroupWork.prepared`. Memory bounded like the group loop's: one group of
        layers at a time."""
        raise NotImplementedError

    def refits(self, cfg: "CompressConfig") -> bool:
        """Whether :meth:`refine` needs the compressed model's activations at the group's input."""
        return False

    def check(self, cfg: "CompressConfig") -> None:
        """Refuse settings this method cannot honour (before any work)."""

    def early(self, work: GroupWork, layer: int) -> None:
        """Called as soon as ``layer``'s statistics are in (``work.grams`` then holds the group's
        statistics up to that layer): a method may factor into ``work.partial`` what needs no
        later layer and free those statistics, so that a group's peak is not every site of
        every layer. :meth:`decompose` completes ``work.partial``."""

    def decompose(self, work: GroupWork) -> list[Decomposition]:
        """The group's factors, one :class:`Decomposition` per ratio of ``work.cfg.ratio_list``."""
        raise NotImplementedError

    def refine(self, work: GroupWork, dec: Decomposition,
               inputs: list[calibrate.LayerInput]) -> list[calibrate.LayerInput]:
        """Refit ``dec`` in place on the compressed activations ``inputs`` at the group's input;
        returns the compressed group's outputs. Only called when :meth:`refits`."""
        raise NotImplementedError


def biases(refs: list[LinearRef], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {bias_name(r.name): r.module.bias.detach().to(dtype) for r in refs if r.module.bias is not None}


def entry(ref: LinearRef, a: allocate.Assignment) -> LinearEntry:
    m = ref.module
    return LinearEntry(a.kind, m.in_features, m.out_features, a.rank, a.basis, m.bias is not None)  # type: ignore[arg-type]


class PrivateFactors(Method):
    """Every matrix on its own: the plan's uniform rank (or dense), factored by :meth:`factor`."""

    def decompose(self, work: GroupWork) -> list[Decomposition]:
        cfg = work.cfg
        plan = allocate.plan_ranks(work.refs, cfg.ratio, force_factorize=cfg.force_factorize, full_rank=cfg.full_rank)
        whitenings = decompose.Whitenings()
        out = Decomposition(damping=whitenings.damping, tensors=biases(work.refs, work.dtype))
        for r in work.refs:
            a = plan.assignments[r.name]
            if a.kind == "dense":
                out.tensors[weight_name(r.name)] = r.module.weight.detach().to(work.dtype)
            else:
                u, v = self.factor(r, a.rank, work, whitenings)  # type: ignore[arg-type]
                out.tensors[u_name(r.name)], out.tensors[v_name(r.name)] = u.to(work.dtype), v.to(work.dtype)
            out.linears[r.name] = entry(r, a)
        return [out]

    def factor(self, ref: LinearRef, rank: int, work: GroupWork,
               whitenings: decompose.Whitenings) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Svd(PrivateFactors):
    name, summary = "svd", "plain truncated SVD of each weight (weakest baseline)"
    needs_grams = False

    def factor(self, ref, rank, work, whitenings):
        return decompose.truncated_svd(ref.module.weight.detach(), rank)


class Fwsvd(PrivateFactors):
    name, summary = "fwsvd", "Fisher-weighted SVD: rows weighted by the loss's squared gradients"
    needs_grams, whole_model_stage = False, True

    def prepare(self, mw: ModelWork) -> dict[str, torch.Tensor]:
        """The gradient statistics (:func:`calibrate.collect_fisher`), cached in the work folder."""
        path = mw.cache("fisher")
        if path.is_file():
            return load_tensors(path)[0]
        scratch = mw.scratch("fisher")
        fisher = calibrate.collect_fisher(mw.layers, mw.model, mw.spec, mw.refs, mw.calib_ids, mw.calib,
                                          lambda i: scratch / f"layer-{i:05d}.pt", mw.progress)
        save_tensors(path, fisher)
        return fisher

    def factor(self, ref, rank, work, whitenings):
        assert work.prepared is not None
        return decompose.scaled_svd(ref.module.weight.detach(), rank,
                                    out_scale=decompose.fisher_scale(work.prepared[ref.name]))


class Asvd(PrivateFactors):
    name, summary = "asvd", "activation-aware SVD: input channels scaled by mean |x|^alpha"
    own_settings = ("asvd_alpha",)

    def check(self, cfg):
        if not cfg.asvd_alpha >= 0:
            raise ValueError(f"--asvd-alpha must be >= 0, got {cfg.asvd_alpha}")

    def factor(self, ref, rank, work, whitenings):
        assert work.grams is not None
        scale = decompose.activation_scale(work.grams.stats[ref.site_key].abs_mean, work.cfg.asvd_alpha)
        return decompose.scaled_svd(ref.module.weight.detach(), rank, in_scale=scale)


class SvdLlm(PrivateFactors):
    name, summary = "svd-llm", "whitened SVD: truncation aware of the calibration activations"

    def factor(self, ref, rank, work, whitenings):
        assert work.grams is not None
        gram = work.grams[ref.site_key]
        return decompose.whitened_factors(ref.module.weight.detach(), gram, rank,
                                          lambda: whitenings.get(ref.site_key, gram))


class BasisSharing(Method):
    """One whitened basis per group of adjacent layers for the shared kinds; the others private
    (svd-llm). The coefficient update refits each layer's coefficients, basis fixed, on the inputs
    the already-compressed layers produce (:func:`decompose.refit_coefficients`)."""

    name, summary = "basis-sharing", "whitened SVD with one basis shared by adjacent layers"
    shares_bases = True
    default_group_size = 2

    def refits(self, cfg):
        return cfg.coefficient_update == "on" or (cfg.coefficient_update == "auto" and not cfg.full_rank)

    @staticmethod
    def plan(work: GroupWork) -> allocate.Plan:
        cfg = work.cfg
        return allocate.plan_ranks(work.refs, cfg.ratio, group_size=len(work.layers), shared_kinds=cfg.shared_types,
                                   force_factorize=cfg.force_factorize, full_rank=cfg.full_rank)

    def early(self, work: GroupWork, layer: int) -> None:
        """The layer's private matrices whose input site no shared matrix reads (by default o and
        down, whose sites are the largest: the down projection's is intermediate²), factored and
        their statistics freed at once: the group's peak is its shared sites plus one layer's
        private ones."""
        plan = self.plan(work)
        mine = [r for r in work.refs if r.layer == layer]
        shared_sites = {r.spec.site for r in mine if plan.assignments[r.name].kind == "shared"}
        ready = [r for r in mine if r.spec.site not in shared_sites]
        whitenings = decompose.Whitenings()
        for r in ready:
            self._private(r, plan.assignments[r.name], work, whitenings, work.partial)
        work.partial.damping.update(whitenings.damping)
        assert work.grams is not None
        for key in {r.site_key for r in ready}:
            work.grams.stats.pop(key, None)

    @staticmethod
    def _private(r: LinearRef, a: allocate.Assignment, work: GroupWork, whitenings: decompose.Whitenings,
                 out: Decomposition) -> None:
        """A private (svd-llm) or dense matrix of the group, into ``out``."""
        assert work.grams is not None
        if a.kind == "dense":
            out.tensors[weight_name(r.name)] = r.module.weight.detach().to(work.dtype)
        else:
            gram = work.grams[r.site_key]
            u, v = decompose.whitened_factors(r.module.weight.detach(), gram, a.rank,  # type: ignore[arg-type]
                                              lambda: whitenings.get(r.site_key, gram))
            out.tensors[u_name(r.name)], out.tensors[v_name(r.name)] = u.to(work.dtype), v.to(work.dtype)
        out.linears[r.name] = entry(r, a)

    def decompose(self, work: GroupWork) -> list[Decomposition]:
        plan = self.plan(work)
        assert work.grams is not None
        whitenings = decompose.Whitenings()
        out = work.partial
        out.tensors.update(biases(work.refs, work.dtype))
        for g in plan.groups.values():
            site = (tuple(m.layer for m in g.members), g.members[0].spec.site)
            gram = sum(work.grams[m.site_key] for m in g.members)
            basis, coeffs = decompose.shared_basis([m.module.weight for m in g.members], whitenings.get(site, gram),
                                                   g.rank)
            out.tensors[basis_name(g.basis_id)] = basis.to(work.dtype)
            out.bases[g.basis_id] = BasisEntry(g.rank, basis.shape[1], [m.name for m in g.members])
            for m, c in zip(g.members, coeffs):
                out.tensors[u_name(m.name)] = c.to(work.dtype)
                out.linears[m.name] = entry(m, plan.assignments[m.name])
        for r in work.refs:
            if r.name not in out.linears:
                self._private(r, plan.assignments[r.name], work, whitenings, out)
        out.damping.update(whitenings.damping)
        out.linears = {r.name: out.linears[r.name] for r in work.refs}  # model order
        return [out]

    def refine(self, work, dec, inputs):
        """Layer by layer: the compressed layer runs on the compressed inputs, its shared
        coefficients are refit to the Gram matrices of what it actually receives, and the refit
        layer produces the next layer's inputs."""
        compute = work.compute_dtype
        for i in work.layers:
            mine = [r for r in work.refs if r.layer == i]
            mods = lowrank_modules({r.name: dec.linears[r.name] for r in mine}, dec.bases, dec.tensors.__getitem__,
                                   compute)
            layer = decoder_layers(work.model, work.spec)[i]
            with swapped(work.model, mods):
                live = [LinearRef(r.name, r.layer, r.spec, mods[r.name]) for r in mine]  # type: ignore[arg-type]
                grams = calibrate.GramSet()
                handles = calibrate.attach_gram_hooks(live, grams)
                try:
                    calibrate.run_layer(layer, inputs)
                finally:
                    for h in handles:
                        h.remove()
                for r in mine:
                    e = dec.linears[r.name]
                    if e.kind != "shared":
                        continue
                    u = decompose.refit_coefficients(r.module.weight.detach(), dec.tensors[basis_name(e.basis)],
                                                     grams[r.site_key])
                    dec.tensors[u_name(r.name)] = u.to(work.dtype)
                    mods[r.name].u.data = dec.tensors[u_name(r.name)].to(compute)
                inputs = calibrate.run_layer(layer, inputs)
        return inputs


class Soco(Method):
    """SoCo (:mod:`compress.soco`): learned scores on every whitened component, one global
    threshold. Its whole-model stage walks the dense model a group at a time for the spectra
    (cached per group in the work folder), then trains the scores end to end against the dense
    model's next-token distribution with each group onloaded in turn and recomputed for the
    backward pass (:class:`soco.Stack`), so memory stays one group's whatever the depth. The group
    loop then folds each group at the global threshold."""

    name = "soco"
    summary = "SoCo: learned scores on every whitened SVD component, pruned to the budget (on shared bases with --group-size > 1)"
    needs_grams = False  # its statistics are taken in its whole-model stage
    whole_model_stage = True
    several_ratios = True
    shares_bases = True
    own_settings = ("soco",)

    def check(self, cfg):
        if cfg.full_rank:
            raise ValueError("--full-rank does not apply to --method soco (use --method svd-llm --full-rank)")

    def prepare(self, mw: ModelWork) -> soco.Trained:
        cfg = mw.cfg
        shared = cfg.shared_types if cfg.group_size > 1 else ()
        for r in cfg.ratio_list:
            soco.check_reachable(mw.refs, r, cfg.group_size, shared, cfg.force_factorize)
        windows = soco.training_windows(mw.calib_ids, cfg.soco.seq_len, mw.window_prefix)
        t0 = time.perf_counter()
        paths = [mw.cache(f"soco-spectra-{g:05d}") for g in range(len(mw.groups))]
        end = max((g + 1 for g, p in enumerate(paths) if not p.is_file()), default=0)  # groups to walk
        xs = mw.calib
        for g in tqdm(range(end), desc="soco spectra", unit="group", disable=not mw.progress or end == 0):
            refs = [r for r in mw.refs if r.layer in mw.groups[g]]
            with mw.layers.loaded(list(mw.groups[g])) as mods:
                if paths[g].is_file():  # finished before a restart: only walk the activations on
                    for m in mods:
                        xs = calibrate.run_layer(m, xs)
                    continue
                grams = calibrate.GramSet()
                for i, m in zip(mw.groups[g], mods):
                    xs = calibrate.layer_statistics(m, [r for r in refs if r.layer == i], grams, xs)
                grams.check()
                mw.note_memory()
                blocks, damping = soco.build_blocks(refs, grams, group_size=len(mw.groups[g]) if shared else 1,
                                                    shared_kinds=shared, init=cfg.soco.init, dtype=mw.compute_dtype,
                                                    progress=False, prior_power=cfg.soco.prior)
                del grams
                soco.save_blocks(paths[g], blocks, damping)
                del blocks
        del xs
        loaded = [soco.load_blocks(p, [r for r in mw.refs if r.layer in grp], mw.device)
                  for p, grp in zip(paths, mw.groups)]
        groups_blocks = [b for b, _ in loaded]
        stack = soco.Stack(mw.layers, mw.model, mw.spec, mw.groups, groups_blocks, mw.device,
                           soco.FactorFiles(paths, groups_blocks, mw.device))
        t_spectra = time.perf_counter() - t0
        scores_path = mw.cache("soco-scores")
        if scores_path.is_file():  # trained before a restart
            saved, meta = load_tensors(scores_path)
            with torch.no_grad():
                for k, b in enumerate(stack.all_blocks):
                    b.scores.copy_(saved[str(k)])
            log = json.loads(meta["log"])
        else:
            hold = cfg.soco_offload == "off" or (cfg.soco_offload == "auto" and stack.fits())
            with stack.held() if hold else nullcontext(stack) as running:
                teacher = soco.teacher_topk(running, windows, cfg.soco.topk, progress=mw.progress)
                t_teacher = time.perf_counter() - t0 - t_spectra
                log = soco.train(running, windows, teacher, min(cfg.ratio_list), cfg.soco, cfg.force_factorize,
                                 mw.progress)
            log["held_in_memory"] = hold
            log.update(seconds=dict(spectra=round(t_spectra, 1), teacher=round(t_teacher, 1),
                                    train=round(time.perf_counter() - t0 - t_spectra - t_teacher, 1)),
                       windows=dict(count=int(windows.shape[0]), seq_len=int(windows.shape[1])),
                       group_size=cfg.group_size, init=cfg.soco.init)
            if log["stopped"]:
                print(f"soco: WARNING: training stopped early: {log['stopped']}")
            save_tensors(scores_path, {str(k): b.scores for k, b in enumerate(stack.all_blocks)},
                         {"log": json.dumps(log)})
        return soco.Trained(stack, soco.prune(stack, cfg.ratio_list, cfg.force_factorize), [d for _, d in loaded], log)

    def decompose(self, work: GroupWork) -> list[Decomposition]:
        trained: soco.Trained = work.prepared
        return trained.fold(trained.stack.groups.index(work.layers), work.dtype, work.cfg.force_factorize,
                            [r.name for r in work.refs])


DEFAULT = BasisSharing.name
REGISTRY: dict[str, Method] = {m.name: m for m in (Svd(), Fwsvd(), Asvd(), SvdLlm(), BasisSharing(), Soco())}


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"--method must be one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def foreign_settings(method: Method) -> set[str]:
    """The CompressConfig fields that other methods own (left out of this method's manifest)."""
    return {f for m in REGISTRY.values() if m is not method for f in m.own_settings} - set(method.own_settings)
