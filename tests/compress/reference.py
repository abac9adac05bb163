"""A whole-model reference for the streaming compressor: the same math on a model held in
memory, with one ordinary forward pass for the statistics. The streaming pipeline must write the
same factors (tests/compress/test_streaming.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from compress import allocate, calibrate, decompose, models
from soco_serve.layout import basis_name, u_name, v_name, weight_name


@torch.no_grad()
def collect_grams(model, refs, windows, batch_size=4) -> calibrate.GramSet:
    """Every site's ``XᵀX`` from full forward passes over the windows."""
    grams = calibrate.GramSet()
    handles = calibrate.attach_gram_hooks(refs, grams)
    try:
        for b in calibrate.batches(windows, batch_size):
            model(input_ids=b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return grams


def load(path: Path):
    model, tok, _ = models.load_model(str(path))
    spec = models.arch_spec(model)
    return model, tok, spec, models.find_linears(model, spec)


@torch.no_grad()
def compress(model, refs, spec, method: str, ratio: float, windows, batch_size=4, group_size=2,
             refit=False, alpha=0.5) -> dict[str, torch.Tensor]:
    """The linear tensors of a whole-model compression (svd, asvd, svd-llm, basis-sharing)."""
    grams = collect_grams(model, refs, windows, batch_size)
    shares = method == "basis-sharing"
    plan = allocate.plan_ranks(refs, ratio, group_size=group_size if shares else 1,
                               shared_kinds=("q", "k", "v", "gate", "up") if shares else ())
    wh = decompose.Whitenings()
    out: dict[str, torch.Tensor] = {}
    dtype = refs[0].module.weight.dtype
    for g in plan.groups.values():
        site = (tuple(m.layer for m in g.members), g.members[0].spec.site)
        basis, coeffs = decompose.shared_basis([m.module.weight for m in g.members],
                                               wh.get(site, sum(grams[m.site_key] for m in g.members)), g.rank)
        out[basis_name(g.basis_id)] = basis.to(dtype)
        out.update({u_name(m.name): c.to(dtype) for m, c in zip(g.members, coeffs)})
    for r in refs:
        a = plan.assignments[r.name]
        w = r.module.weight
        if a.kind == "dense":
            out[weight_name(r.name)] = w.to(dtype)
        elif a.kind == "lowrank":
            if method == "svd":
                u, v = decompose.truncated_svd(w, a.rank)
            elif method == "asvd":
                u, v = decompose.scaled_svd(w, a.rank, in_scale=decompose.activation_scale(
                    grams.stats[r.site_key].abs_mean, alpha))
            else:
                u, v = decompose.whitened_svd(w, wh.get(r.site_key, grams[r.site_key]), a.rank)
                if w.shape[0] < w.shape[1]:  # the pipeline's cheaper route to the same optimum
                    u, v = decompose.projected_svd(w, grams[r.site_key], a.rank)
            out[u_name(r.name)], out[v_name(r.name)] = u.to(dtype), v.to(dtype)
    if refit:
        _refit(model, spec, refs, plan, out, windows, batch_size)
    return out


def _refit(model, spec, refs, plan, out, windows, batch_size):
    """The coefficient update on the whole compressed model, layer by layer."""
    from soco_serve.hf import LowRankLinear, swapped

    dtype = refs[0].module.weight.dtype
    mods = {}
    for r in refs:
        a = plan.assignments[r.name]
        if a.kind == "dense":
            continue
        v = out[basis_name(a.basis)] if a.kind == "shared" else out[v_name(r.name)]
        mods[r.name] = LowRankLinear(torch.nn.Parameter(out[u_name(r.name)].clone(), requires_grad=False),
                                     torch.nn.Parameter(v, requires_grad=False))
    with swapped(model, mods):
        inputs = calibrate.layer_inputs(model, spec, windows, batch_size)
        for i, layer in enumerate(models.decoder_layers(model, spec)):
            mine = [r for r in refs if r.layer == i]
            live = [models.LinearRef(r.name, r.layer, r.spec, model.get_submodule(r.name)) for r in mine]
            grams = calibrate.GramSet()
            handles = calibrate.attach_gram_hooks(live, grams)
            calibrate.run_layer(layer, inputs)
            for h in handles:
                h.remove()
            for r in mine:
                a = plan.assignments[r.name]
                if a.kind == "shared":
                    u = decompose.refit_coefficients(r.module.weight, out[basis_name(a.basis)], grams[r.site_key])
                    out[u_name(r.name)] = u.to(dtype)
                    mods[r.name].u.data = out[u_name(r.name)]
            inputs = calibrate.run_layer(layer, inputs)
