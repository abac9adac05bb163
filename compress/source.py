"""The load stage: a Hugging Face model read one piece at a time, never materialised whole.

The model is built on the meta device from ``config.json`` (buffers such as rotary frequencies
are real: they are computed, not stored); :meth:`Source.onload` reads the tensors of one module
(a decoder layer, the embeddings, the head) from the memory-mapped safetensors shards onto a
device, and :meth:`Source.offload` returns them to the meta device. So peak memory is one group
of layers plus whatever the caller keeps, whatever the depth.

Shards are checked when the source is opened (headers, sizes, the index) and every tensor when
it is read (shape against the module, finite values), and errors name the shard and tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soco_serve.layout import CheckpointError, safetensors_header

from .models import ArchSpec, LinearRef, ModelError, arch_spec, find_linears, resolve_model

INDEX_NAMES = ("model.safetensors.index.json",)
SINGLE_FILE = "model.safetensors"
HASH_CHUNK = 64 * 1024**2


@dataclass(frozen=True)
class _Where:
    file: Path
    dtype: str
    shape: tuple[int, ...]


class Source:
    """A dense causal LM on disk: its config, tokenizer, shard index and a meta-device skeleton.

    ``dtype`` (None: the checkpoint's own) is the compute dtype every onloaded tensor is cast to.
    """

    def __init__(self, model: str | Path | None, dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.path = resolve_model(None if model is None else str(model))
        if not isinstance(self.path, Path):
            raise ModelError(f"{self.path}: hub ids are not read in streaming mode; download the model folder first "
                             "(huggingface-cli download) and pass its path")
        self.where = self._index()
        try:
            self.config = AutoConfig.from_pretrained(self.path)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:  # transformers raises many types for unreadable folders
            raise ModelError(f"{self.path}: could not read the config or tokenizer ({type(exc).__name__}: {exc})") from exc
        stored = {w.dtype for w in self.where.values()}
        self.dtype = dtype or _common_dtype(self.config, stored)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.eval()
        self.spec: ArchSpec = arch_spec(self.model)  # unsupported architectures fail here, before any work
        self.refs: list[LinearRef] = find_linears(self.model, self.spec)
        self.n_layers = len(self.model.get_submodule(self.spec.layers))
        tied = getattr(self.config, "tie_word_embeddings", False)
        self._aliases = _tied_aliases(self.model) if tied else {}
        self._names_of: dict[str, list[str]] = {}
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            self._names_of.setdefault(self._resolve(name), []).append(name)
        self._live: dict[str, nn.Parameter] = {}  # onloaded tensors by stored name (tied weights held once)
        self._meta: dict[str, nn.Parameter] = {}  # their meta stand-ins once offloaded
        names = {n for n, _ in self.model.named_parameters()} | {
            n for n, b in self.model.named_buffers() if n.rpartition(".")[2] in _persistent(self.model, n)}
        missing = sorted(n for n in names if self._resolve(n) not in self.where)
        if missing:
            raise ModelError(f"{self.path}: tensors missing from the safetensors files: {missing[:5]}"
                             f"{' …' if len(missing) > 5 else ''}")

    # -- reading ------------------------------------------------------------------------------
    def _index(self) -> dict[str, _Where]:
        files: dict[str, Path] = {}
        index = next((self.path / n for n in INDEX_NAMES if (self.path / n).is_file()), None)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise ModelError(f"{index}: unreadable shard index ({exc})") from exc
            for name, fname in weight_map.items():
                files[name] = self.path / fname
        elif (self.path / SINGLE_FILE).is_file():
            files = {}
        else:
            raise ModelError(f"{self.path}: no {SINGLE_FILE} or {INDEX_NAMES[0]} (streaming reads safetensors only)")
        where: dict[str, _Where] = {}
        for f in sorted(set(files.values()) or {self.path / SINGLE_FILE}):
            if not f.is_file():
                raise ModelError(f"{f}: shard listed in the index is missing")
            try:
                header = safetensors_header(f)
            except CheckpointError as exc:
                raise ModelError(str(exc)) from None
            for name, meta in header.items():
                if name != "__metadata__":
                    where[name] = _Where(f, meta["dtype"], tuple(meta["shape"]))
        for name, f in files.items():
            if name not in where:
                raise ModelError(f"{f}: tensor {name!r} listed in the index is missing from the shard")
        return where

    def _resolve(self, name: str) -> str:
        return self._aliases.get(name, name)

    def _set_everywhere(self, key: str, param: nn.Parameter) -> None:
        """Point every name of the stored tensor ``key`` (tied weights have several) at ``param``."""
        for name in self._names_of.get(key, (key,)):
            owner, _, attr = name.rpartition(".")
            (self.model.get_submodule(owner) if owner else self.model)._parameters[attr] = param

    def is_alias(self, name: str) -> bool:
        """A tied weight's second name (the checkpoint stores the tensor once, under its first)."""
        return name in self._aliases

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored (memory-mapped read), checked to be finite."""
        from safetensors import safe_open

        key = self._resolve(name)
        w = self.where.get(key)
        if w is None:
            raise ModelError(f"{self.path}: tensor {name!r} not found in the safetensors files")
        try:
            with safe_open(str(w.file), framework="pt") as f:
                t = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise ModelError(f"{w.file}: tensor {key!r} is unreadable ({type(exc).__name__}: {exc})") from exc
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"{w.file}: weight {key!r} contains NaN or Inf")
        return t

    def onload(self, prefix: str, device: torch.device | str = "cpu") -> nn.Module:
        """Materialise the module at ``prefix`` (its parameters and persistent buffers) on ``device``."""
        mod = self.model.get_submodule(prefix)
        for name, p in list(mod.named_parameters(recurse=True)):
            full = f"{prefix}.{name}" if prefix else name
            key = self._resolve(full)
            t = self._live.get(key)
            t = self.read(full) if t is None else t
            if tuple(t.shape) != tuple(p.shape):
                raise ModelError(f"{self.where[key].file}: tensor {full!r} has shape {list(t.shape)}, "
                                 f"the model's config expects {list(p.shape)}")
            if key not in self._live:  # a tied weight already onloaded under its other name is reused
                self._live[key] = nn.Parameter(t.to(device=device, dtype=self.dtype), requires_grad=False)
            self._set_everywhere(key, self._live[key])
        for name, b in list(mod.named_buffers(recurse=True)):
            full = f"{prefix}.{name}" if prefix else name
            owner, _, attr = name.rpartition(".")
            m = mod.get_submodule(owner) if owner else mod
            if self._resolve(full) in self.where:
                m._buffers[attr] = self.read(full).to(device)
            elif b is not None:
                m._buffers[attr] = b.to(device)
        return mod

    def offload(self, prefix: str) -> None:
        """Return a module's parameters to the meta device (frees their memory)."""
        mod = self.model.get_submodule(prefix)
        for name, p in list(mod.named_parameters(recurse=True)):
            key = self._resolve(f"{prefix}.{name}" if prefix else name)
            self._live.pop(key, None)
            if key not in self._meta:  # tied weights stay tied on the meta device too
                self._meta[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            self._set_everywhere(key, self._meta[key])

    def layer_prefix(self, i: int) -> str:
        return f"{self.spec.layers}.{i}"

    def outer_prefixes(self) -> list[str]:
        """Modules outside the decoder layers that own parameters (embeddings, final norm, head)."""
        layers = self.spec.layers
        owners = {n.rpartition(".")[0] for n, _ in self.model.named_parameters()}
        return sorted(o for o in owners if o != layers and not o.startswith(layers + "."))

    def outer_tensor_names(self) -> list[str]:
        """Every stored tensor outside the decoder layers (what the checkpoint copies as it is)."""
        layers = self.spec.layers + "."
        return sorted(n for n in self.where if not n.startswith(layers))

    def layer_tensor_names(self, i: int) -> list[str]:
        p = self.layer_prefix(i) + "."
        return sorted(n for n in self.where if n.startswith(p))

    # -- provenance ---------------------------------------------------------------------------
    def weights_sha256(self) -> str:
        """A hash of every stored tensor (name and bytes, in name order), read shard by shard."""
        h = hashlib.sha256()
        for name in sorted(self.where):
            h.update(name.encode())
            t = self.read(name)
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def dense_params(self) -> int:
        """Parameters of the model, tied weights counted once."""
        return sum(p.numel() for p in self.model.parameters())


def _persistent(model: nn.Module, name: str) -> set[str]:
    owner = name.rpartition(".")[0]
    m = model.get_submodule(owner) if owner else model
    return set(m._buffers) - set(getattr(m, "_non_persistent_buffers_set", set()))


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Ties the head to the input embeddings (transformers does it when it loads weights, which the
    skeleton never does) and maps every second name of a shared tensor to its first name."""
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and in_emb is not None:
        out_emb.weight = in_emb.weight
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _common_dtype(config: Any, stored: set[str]) -> torch.dtype:
    want = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(want, torch.dtype):
        return want
    if isinstance(want, str) and hasattr(torch, want):
        return getattr(torch, want)
    floats = [_STORED_DTYPES[s] for s in stored if s in _STORED_DTYPES]
    return floats[0] if len(set(floats)) == 1 else torch.float32
