"""Every compression method, one class each, behind one interface; :data:`REGISTRY` names them.

The pipeline (:mod:`compress.pipeline`) streams the model group by group and asks the method
four things: how many adjacent layers form a group, which statistics it needs, how a group's
weights and statistics become factors (:meth:`Method.decompose`), and whether it refits them on
the compressed model's own activations (:meth:`Method.refine`). Adding a method is one class here
and one line in the registry; nothing else names a method.

Statistics come from the dense model's activations for every method (as in the SVD-LLM, ASVD and
Basis Sharing papers); only a refit (Basis Sharing's coefficient update) reads the compressed
model's activations, which the pipeline carries beside the dense ones for such methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from soco_serve.layout import BasisEntry, LinearEntry, basis_name, bias_name, u_name, v_name, weight_name

from . import allocate, calibrate, decompose, soco
from .factors import Decomposition
from .models import ArchSpec, LinearRef, decoder_layers

if TYPE_CHECKING:
    from .config import CompressConfig


@dataclass
class GroupWork:
    """One group of adjacent decoder layers, as a method sees it."""

    layers: range
    refs: list[LinearRef]  # the group's linears, onloaded (their modules hold the dense weights)
    grams: calibrate.GramSet | None  # the group's input sites, from the dense activations
    fisher: dict[str, torch.Tensor] | None  # per linear: row Fisher information (fwsvd)
    cfg: "CompressConfig"
    dtype: torch.dtype  # of the written tensors
    compute_dtype: torch.dtype  # of the onloaded model
    model: nn.Module  # the model skeleton with this group onloaded (everything, for whole-model methods)
    spec: ArchSpec
    calib: torch.Tensor | None = None  # calibration token windows (methods that train end to end)
    progress: bool = False


class Method:
    """The interface; subclasses set the class attributes and implement :meth:`decompose`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_grams: ClassVar[bool] = True  # Gram statistics (and mean |x|) of the dense activations
    needs_fisher: ClassVar[bool] = False  # row Fisher information of the calibration loss
    shares_bases: ClassVar[bool] = False  # honours --group-size
    default_group_size: ClassVar[int] = 1
    whole_model: ClassVar[bool] = False  # one group of every layer, embeddings and head onloaded
    own_settings: ClassVar[tuple[str, ...]] = ()  # CompressConfig fields that only this method reads

    def group_size(self, cfg: "CompressConfig", n_layers: int) -> int:
        if self.whole_model:
            return n_layers
        return cfg.group_size if self.shares_bases else 1

    def refits(self, cfg: "CompressConfig") -> bool:
        """Whether :meth:`refine` needs the compressed model's activations at the group's input."""
        return False

    def check(self, cfg: "CompressConfig") -> None:
        """Refuse settings this method cannot honour (before any work)."""

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
    needs_grams, needs_fisher = False, True

    def factor(self, ref, rank, work, whitenings):
        assert work.fisher is not None
        return decompose.scaled_svd(ref.module.weight.detach(), rank,
                                    out_scale=decompose.fisher_scale(work.fisher[ref.name]))


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

    def decompose(self, work: GroupWork) -> list[Decomposition]:
        cfg = work.cfg
        plan = allocate.plan_ranks(work.refs, cfg.ratio, group_size=len(work.layers), shared_kinds=cfg.shared_types,
                                   force_factorize=cfg.force_factorize, full_rank=cfg.full_rank)
        assert work.grams is not None
        whitenings = decompose.Whitenings()
        out = Decomposition(damping=whitenings.damping, tensors=biases(work.refs, work.dtype))
        for g in plan.groups.values():
            site = (tuple(m.layer for m in g.members), g.members[0].spec.site)
            gram = sum(work.grams[m.site_key] for m in g.members)
            basis, coeffs = decompose.shared_basis([m.module.weight for m in g.members], whitenings.get(site, gram),
                                                   g.rank)
            out.tensors[basis_name(g.basis_id)] = basis.to(work.dtype)
            out.bases[g.basis_id] = BasisEntry(g.rank, basis.shape[1], [m.name for m in g.members])
            for m, c in zip(g.members, coeffs):
                out.tensors[u_name(m.name)] = c.to(work.dtype)
        for r in work.refs:
            a = plan.assignments[r.name]
            if a.kind == "dense":
                out.tensors[weight_name(r.name)] = r.module.weight.detach().to(work.dtype)
            elif a.kind == "lowrank":
                gram = work.grams[r.site_key]
                u, v = decompose.whitened_factors(r.module.weight.detach(), gram, a.rank,  # type: ignore[arg-type]
                                                  lambda: whitenings.get(r.site_key, gram))
                out.tensors[u_name(r.name)], out.tensors[v_name(r.name)] = u.to(work.dtype), v.to(work.dtype)
            out.linears[r.name] = entry(r, a)
        return [out]

    def refine(self, work, dec, inputs):
        """Layer by layer: the compressed layer runs on the compressed inputs, its shared
        coefficients are refit to the Gram matrices of what it actually receives, and the refit
        layer produces the next layer's inputs."""
        from .hf_loader import lowrank_modules, swapped

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
    threshold. It trains end to end against the dense model's next-token distribution, so it
    onloads the whole model as one group: its memory still grows with depth."""

    name = "soco"
    summary = "SoCo: learned scores on every whitened SVD component, pruned to the budget (on shared bases with --group-size > 1)"
    shares_bases = True
    whole_model = True
    own_settings = ("soco",)

    def check(self, cfg):
        if cfg.full_rank:
            raise ValueError("--full-rank does not apply to --method soco (use --method svd-llm --full-rank)")

    def decompose(self, work: GroupWork) -> list[Decomposition]:
        cfg = work.cfg
        outs = soco.compress(work.model, work.refs, work.grams, work.calib, cfg.ratio_list, cfg.soco,
                             group_size=cfg.group_size, shared_kinds=cfg.shared_types if cfg.group_size > 1 else (),
                             force_factorize=cfg.force_factorize, dtype=work.dtype, progress=work.progress)
        return [dec for _, dec in outs]


DEFAULT = BasisSharing.name
REGISTRY: dict[str, Method] = {m.name: m for m in (Svd(), Fwsvd(), Asvd(), SvdLlm(), BasisSharing(), Soco())}


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"--method must be one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def foreign_settings(method: Method) -> set[str]:
    """The CompressConfig fields that other methods own (left out of this method's manifest)."""
    return {f for m in REGISTRY.values() if m is not method for f in m.own_settings} - set(method.own_settings)
