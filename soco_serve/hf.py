"""A soco checkpoint as a transformers model, with the low-rank layers it stores.

Two ways in, one set of modules (:class:`LowRankLinear`, also the modules the compressor
optimises and evaluates, so a checkpoint is run exactly as it was measured):

* :func:`load_soco_model`: our own loader, for any readable format version; used by
  ``soco-compress eval``, the compressor, the tests and benchmarks.
* ``AutoModelForCausalLM.from_pretrained(dir)`` after ``import soco_serve`` (format 2 on), through
  transformers' own extension point for pre-quantized checkpoints, so generation, pipelines and
  evaluation harnesses need no change. ``config.json`` says ``"quant_method": "soco"``; importing
  this module registers :class:`SocoConfig` and :class:`SocoHfQuantizer` under that name. The
  quantizer's hooks, in the order ``from_pretrained`` calls them:

  1. :meth:`SocoHfQuantizer.update_tp_plan` is the first hook that sees the model config, and it
     runs before the weight files are resolved: it points ``config.transformers_weights`` (the
     config's own way of naming a weights index) at ``soco-model.safetensors.index.json``, so the
     soco shards are read. The pointer is never written to ``config.json``: without soco-serve,
     transformers must not find any weights there (below).
  2. ``preprocess_model`` (:meth:`SocoHfQuantizer._process_model_before_weight_loading`) finds
     the folder from the checkpoint files it is given, reads and validates the manifest with
     :class:`~soco_serve.layout.CheckpointReader`, checks the model's linears against it, and
     puts empty (meta) :class:`LowRankLinear` modules in place of the factorized ones.
  3. :meth:`SocoHfQuantizer.update_weight_conversions` maps every factor tensor to the
     parameters it fills (``<layer>.lowrank_u`` to ``<layer>.u``, a basis ``soco_bases.<id>`` to
     the ``v`` of every layer of its group) with transformers' ``WeightConverter``; the
     conversion (:class:`LoadFactor`) casts to the model's dtype and gives every layer of a group
     the same ``Parameter``, so a shared basis is held once, as in :func:`load_soco_model`.
     Everything else (embeddings, norms, biases, dense linears, a tied head) loads as for any
     model.
  4. ``postprocess_model`` checks that every factor was loaded.

Without soco-serve, transformers warns "Unknown quantization type, got soco", skips quantization
and then fails, because the folder has no ``model.safetensors`` (the shards are deliberately
named otherwise): a soco checkpoint never loads as random or dense weights. Re-saving is refused
(:meth:`SocoHfQuantizer.is_serializable`): a checkpoint is written by the compressor only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightTransform
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from soco_serve.layout import (
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    QUANT_METHOD,
    BasisEntry,
    CheckpointError,
    CheckpointReader,
    LinearEntry,
    Manifest,
    basis_name,
    bias_name,
    check_quantization_config,
    u_name,
    v_name,
    weight_name,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------


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
    """A transformers causal LM with the checkpoint's low-rank layers (lazily read, mmapped).

    Reads every format version this soco-serve reads (``from_pretrained`` needs version 2, whose
    ``config.json`` names the quantization method); transformers only builds the empty model.
    """
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


# ---------------------------------------------------------------------------------------------
# from_pretrained: transformers' quantizer extension point
# ---------------------------------------------------------------------------------------------


@register_quantization_config(QUANT_METHOD)
class SocoConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of a soco checkpoint (:func:`soco_serve.layout.quantization_config`).

    It only names the method and the format version; the layers are described by the manifest.
    A format this soco-serve cannot read is refused here, before any weight is touched.
    """

    def __init__(self, format_version: int = FORMAT_VERSION, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        check_quantization_config({"quant_method": kwargs.pop("quant_method", QUANT_METHOD),
                                   "format_version": format_version})


class LoadFactor(ConversionOps):
    """One checkpoint factor into the module parameter(s) it fills.

    The tensor is cast to the parameter's dtype (transformers loads a renamed tensor of a
    pre-quantized model in its stored dtype) and wrapped in one ``Parameter`` given to every
    target: a shared basis becomes the ``v`` of all layers of its group, held once. Each target
    is recorded in ``loaded``, which the quantizer checks after loading (transformers only logs a
    failed conversion, and would leave the parameter uninitialised).
    """

    def __init__(self, loaded: set[str]):
        self.loaded = loaded

    def __deepcopy__(self, memo: dict[int, Any]) -> "LoadFactor":
        # transformers copies a converter for every tensor it loads; the record stays one set
        return self

    def convert(self, input_dict: dict[str, list[torch.Tensor]], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, model: nn.Module | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        assert target_patterns and model is not None
        ((tensor,),) = input_dict.values()
        param = nn.Parameter(tensor.to(model.get_parameter(target_patterns[0]).dtype), requires_grad=False)
        self.loaded.update(target_patterns)
        return {name: param for name in target_patterns}  # the first target first: it names the converter


def _exact(name: str) -> str:
    """A converter source pattern matching exactly one checkpoint tensor name."""
    return f"^{re.escape(name)}$"


@register_quantizer(QUANT_METHOD)
class SocoHfQuantizer(HfQuantizer):
    """Builds the low-rank model of a soco checkpoint inside ``from_pretrained`` (see the module docstring)."""

    requires_calibration = True  # only ever pre-compressed: a dense model is compressed by soco-compress

    def __init__(self, quantization_config: SocoConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.ckpt_dir: Path | None = None
        self.manifest: Manifest | None = None
        self.conversions: list[WeightConverter] = []
        self.expected: set[str] = set()  # parameters the factors must fill
        self.loaded: set[str] = set()  # filled by LoadFactor
        self.groups: dict[str, list[str]] = {}  # basis id -> the modules that share it

    # -- before the model is built ---------------------------------------------------------------
    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, Mapping) and "disk" in device_map.values():
            raise ValueError("soco checkpoints cannot be offloaded to disk (device_map has 'disk'): a shared basis "
                             "is one parameter of several layers")

    def update_tp_plan(self, config: Any) -> Any:
        """Point transformers at the soco shards (see the module docstring): the first quantizer hook
        that receives the config, called before ``from_pretrained`` resolves the weight files."""
        if getattr(config, "distributed_config", None) is not None:
            raise ValueError("soco checkpoints load on one process in transformers (no tensor parallelism); "
                             "serve them with vLLM for that")
        config.transformers_weights = INDEX_FILE
        return config

    # -- the empty model -------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not checkpoint_files:
            raise CheckpointError("soco: from_pretrained gave the quantizer no checkpoint files (a soco checkpoint "
                                  "is a local folder; pass its path)")
        self.ckpt_dir = Path(checkpoint_files[0]).parent
        manifest = self.manifest = CheckpointReader(self.ckpt_dir).manifest
        where = self.ckpt_dir / MANIFEST_FILE
        arch = (getattr(model.config, "architectures", None) or [None])[0]
        if arch is not None and manifest.architecture != arch:
            raise CheckpointError(f"{where}: architecture is {manifest.architecture!r}, config.json says {arch!r}")
        names = {name: _module_name(model, name, where) for name in manifest.linears}
        for name, e in manifest.linears.items():
            _check_linear(model.get_submodule(names[name]), e, f"{where}: linears[{name!r}]", names[name])

        factorized = {n: e for n, e in manifest.linears.items() if e.kind != "dense"}
        if not factorized:
            return model
        dtype = model.get_submodule(names[next(iter(factorized))]).weight.dtype  # what the dense layer would be
        shapes = manifest.expected_shapes()

        def empty(tensor: str) -> torch.Tensor:
            return torch.empty(shapes[tensor], dtype=dtype, device="meta")

        for name, mod in lowrank_modules(factorized, manifest.bases, empty).items():
            _set_module(model, names[name], mod)

        def convert(tensor: str, targets: list[str]) -> WeightConverter:
            self.expected.update(targets)
            return WeightConverter(_exact(tensor), targets, operations=[LoadFactor(self.loaded)])

        for name, e in factorized.items():
            self.conversions.append(convert(u_name(name), [names[name] + ".u"]))
            if e.kind == "lowrank":
                self.conversions.append(convert(v_name(name), [names[name] + ".v"]))
        for bid, b in manifest.bases.items():
            self.groups[bid] = [names[layer] for layer in b.layers]
            self.conversions.append(convert(basis_name(bid), [m + ".v" for m in self.groups[bid]]))
        return model

    def get_weight_conversions(self) -> list[WeightTransform]:
        return list(self.conversions)

    def update_weight_conversions(self, weight_conversions: list[WeightTransform]) -> list[WeightTransform]:
        """Ours first: transformers applies the first converter whose pattern matches a tensor, and
        ours match exactly one soco tensor name each."""
        return self.get_weight_conversions() + weight_conversions

    # -- after loading ---------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        never = sorted(self.expected - self.loaded)
        if never:
            raise CheckpointError(f"{self.ckpt_dir}: soco factors never loaded into {never[:5]} (transformers "
                                  "logged why above)")
        for bid, layers in self.groups.items():
            mods = [model.get_submodule(m) for m in layers]
            basis = mods[0].v
            if any(m.v is not basis for m in mods):
                raise CheckpointError(f"{self.ckpt_dir}: basis {basis_name(bid)!r} was loaded more than once")
            devices = {basis.device} | {m.u.device for m in mods}
            if len(devices) > 1 or basis.is_meta:
                raise ValueError(f"{self.ckpt_dir}: the layers sharing basis {basis_name(bid)!r} ({layers}) must be "
                                 f"on one device, got {sorted(map(str, devices))}: choose a device_map that "
                                 "keeps them together (and offloads nothing)")
        return model

    def is_serializable(self) -> bool:
        """Refused: a soco checkpoint is written by the compressor, in the layout of
        ``soco_serve.layout``, which ``save_pretrained`` does not write."""
        logger.warning("soco: save_pretrained cannot write a soco checkpoint (make one with soco-compress; "
                       "the checkpoint folder itself is what from_pretrained loads)")
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _module_name(model: nn.Module, name: str, where: Path) -> str:
    """The model's module for a manifest linear: the same name, or without the base model's prefix
    when the model is the base model itself (``AutoModel`` rather than ``AutoModelForCausalLM``)."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for candidate in (name, name.removeprefix(prefix)):
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    raise CheckpointError(f"{where}: names linear {name!r}, which {type(model).__name__} does not have")


def _check_linear(mod: nn.Module, e: LinearEntry, where: str, name: str) -> None:
    got = (getattr(mod, "out_features", None), getattr(mod, "in_features", None))
    if got != (e.out_features, e.in_features):
        raise CheckpointError(f"{where} is [{e.out_features}, {e.in_features}], but the model's {name!r} "
                              f"({type(mod).__name__}) is {list(got)}")
